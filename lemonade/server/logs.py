"""`GET /api/v{0,1}/logs/stream`: the server log as SSE (C++ B, spec http-api §4.18).

The whole file from the start, one `data:` event per line, then new lines as they are appended
(polled every 500 ms), with a `: heartbeat` comment when a poll finds nothing. Ends when the client
leaves. A missing log file is a 404. A file that shrinks (truncated or replaced by a new server) is
read again from its start. HEAD gets the SSE headers only.
"""
from __future__ import annotations

import os
import re
import time

from lemonade.error_types import not_found_body
from lemonade.server.httpd import ClientDisconnected
from lemonade.utils import path_utils

POLL_INTERVAL = 0.5  # C++ B polls every 500 ms
READ_BLOCK = 65536
MAX_LINE = 65536
HEARTBEAT = b": heartbeat\n\n"
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # TAB is harmless in a field


def stream_log(h, path: str | None = None) -> None:
    """Stream `path` (`serve --log-file`), else `server_log_path()`. Blocks until the client leaves
    (or for HEAD, returns after the headers)."""
    path = path or path_utils.server_log_path()
    try:
        log_file = open(path, "rb")
    except OSError:
        h.send_json(404, not_found_body(h.url_path, f"Log file not found: {path_utils.shown_path(path)}"))
        return
    try:
        h.start_sse()
        pending = b""
        while True:
            data = log_file.read(READ_BLOCK)
            if data:
                pending += data
                *lines, pending = pending.split(b"\n")
                if len(pending) > MAX_LINE:  # a line without end is sent in pieces, not hoarded
                    lines, pending = lines + [pending], b""
                if lines:
                    h.write_chunk(b"".join(b"data: " + sse_safe(line) + b"\n\n" for line in lines))
                continue
            h.write_chunk(HEARTBEAT)  # also how a departed client is noticed
            time.sleep(POLL_INTERVAL)
            if _replaced(log_file, path):  # truncated, or a new server wrote a new file
                try:
                    fresh = open(path, "rb")
                except OSError:
                    continue  # gone again: keep the old one and look at the next poll
                log_file.close()
                log_file, pending = fresh, b""
    except ClientDisconnected:
        h.close_connection = True
    finally:
        log_file.close()


def sse_safe(line: bytes) -> bytes:
    """One log line as the text of one `data:` field: a CR ends a field in SSE (so a bare `\\r` in the
    line could add `event:` or `id:` fields), so it and the other control bytes become `\\xNN`
    escapes. The server's own records are already escaped (`logging_config`); the file may hold other
    writers' lines (a child's output, a C++ router's)."""
    line = line.removesuffix(b"\r")
    return _CONTROL_BYTES.sub(lambda m: b"\\x%02x" % m.group()[0], line) if _CONTROL_BYTES.search(line) else line


def _replaced(log_file, path) -> bool:
    """True when `path` is now another file, or shorter than what we have read of it."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    before = os.fstat(log_file.fileno())
    return (now.st_ino, now.st_dev) != (before.st_ino, before.st_dev) or now.st_size < log_file.tell()
