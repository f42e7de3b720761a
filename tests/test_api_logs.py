"""`GET /api/v{0,1}/logs/stream` (spec http-api §4.18): the server log file as SSE from its first line,
new lines as they are written, heartbeats when idle, HEAD, a missing file, and a departed client."""
from __future__ import annotations

import socket
import time

import pytest
import requests

from lemonade.server.connections import WORKER_IDLE_SECONDS as HANDLER_IDLE_SECONDS

from api_support import (settled_resources, assert_cors, not_found, raw_connection, read_response, request_bytes, resources,
                         running_server, server_process, wait_for, wait_for_baseline)


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache):
    with running_server(tmp_path_factory.mktemp("logs"), seeded_hub_cache) as s:
        yield s


class SseReader:
    """Reads an SSE response's raw bytes from a socket (chunked framing included) until a marker."""

    def __init__(self, port: int, path: str = "/api/v1/logs/stream"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(request_bytes("GET", path))
        self.data = b""

    def until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.data:
            assert time.monotonic() < deadline, (marker, self.data[-500:])
            chunk = self.sock.recv(65536)
            assert chunk, self.data[-500:]
            self.data += chunk
        return self.data

    def close(self) -> None:
        self.sock.close()


def test_stream_from_the_first_line_then_live(server):
    first_line = server.runtime_log.read_bytes().split(b"\n", 1)[0]
    reader = SseReader(server.port)
    try:
        head = reader.until(b"\r\n\r\n").split(b"\r\n\r\n", 1)[0].decode()
        assert head.startswith("HTTP/1.1 200 ")
        for line in ("Content-Type: text/event-stream", "Cache-Control: no-cache", "X-Accel-Buffering: no",
                     "Transfer-Encoding: chunked", "Access-Control-Allow-Origin: *"):
            assert line in head
        reader.until(b"data: " + first_line + b"\n\n")
        requests.get(server.api + "/health?marker=live-line")  # its log line is written after we joined
        reader.until(b"[Server] GET /api/v1/health - 200\n\n")
        reader.until(b": heartbeat\n\n", timeout=5)
    finally:
        reader.close()


def test_head_sends_headers_only(server):
    with raw_connection(server.port) as sock:
        sock.sendall(request_bytes("HEAD", "/api/v0/logs/stream"))
        response = read_response(sock, "HEAD")
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        sock.sendall(request_bytes("GET", "/api/v1/health"))  # the connection is still usable
        assert read_response(sock).status == 200


def test_departed_clients_free_their_threads(server):
    proc = server_process(server)
    requests.get(server.api + "/health")
    # Quiet for longer than a handler thread waits for a next connection: none is left waiting.
    baseline = settled_resources(proc, timeout=4 * HANDLER_IDLE_SECONDS, quiet=HANDLER_IDLE_SECONDS + 1)
    readers = [SseReader(server.port) for _ in range(5)]
    for reader in readers:
        reader.until(b": heartbeat\n\n")
    assert resources(proc)[0] >= baseline[0] + 5  # a thread per open stream
    for reader in readers:
        reader.close()
    wait_for_baseline(proc, baseline, slack=1)


def test_missing_log_file_is_404(tmp_path, seeded_hub_cache):
    with running_server(tmp_path, seeded_hub_cache) as server:
        server.runtime_log.unlink()
        reply = requests.get(server.api + "/logs/stream")
        assert reply.status_code == 404
        # Named by its place in the runtime dir, not by the server's absolute path (issue 15 item 12).
        assert reply.json() == not_found("/api/v1/logs/stream", "Log file not found: <runtime dir>/lemonade-server.log")
        assert_cors(reply.headers)
        wait_for(lambda: server.proc.poll() is None, 1)
