"""`GET /api/v{0,1}/logs/stream`: the server log as SSE (C++ B, spec http-api §4.18).

The whole file from the start, one `data:` event per line, then new lines as they are appended
(polled every 500 ms), with a `: heartbeat` comment when a poll finds nothing. Ends when the client
leaves. A missing log file is a 404.
"""
from __future__ import annotations

import time

from lemonade.error_types import not_found_body
from lemonade.server.httpd import ClientDisconnected
from lemonade.utils import path_utils

POLL_INTERVAL = 0.5
HEARTBEAT = b": heartbeat\n\n"


def stream_log(h) -> None:
    path = path_utils.server_log_path()
    try:
        log_file = open(path, "rb")
    except OSError:
        h.send_json(404, not_found_body(h.url_path, f"Log file not found: {path}"))
        return
    with log_file:
        h.start_sse()
        pending = b""
        try:
            while True:
                data = log_file.read(65536)
                if data:
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    if lines:
                        h.write_chunk(b"".join(b"data: " + line.rstrip(b"\r") + b"\n\n" for line in lines))
                    continue
                h.write_chunk(HEARTBEAT)  # also how a departed client is noticed
                time.sleep(POLL_INTERVAL)
        except ClientDisconnected:
            h.close_connection = True
