"""The backend client's own HTTP/1.1 code (`utils/http_client.py`, "the wire"), against a scripted peer.

llama-server and flm only ever show the common cases (Content-Length answers, chunked SSE, closed
keep-alive connections now and then); these tests drive every framing and failure on cue through a
raw socket server whose every byte the test writes. The server records each connection it accepts,
so connection reuse is observed, not assumed.
"""
from __future__ import annotations

import io
import json
import queue
import socket
import threading
from typing import Callable

import pytest

from lemonade.error_types import NetworkError
from lemonade.utils import http_client


class ScriptedPeer:
    """Accepts connections; for each request it reads, calls `script(conn, request_bytes, n)` where n
    counts requests over all connections. Records (connection index, request head) per request."""

    def __init__(self, script: Callable[[socket.socket, bytes, int], bool | None]):
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.requests: list[tuple[int, bytes]] = []
        self.connections = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            index = self.connections
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, index), daemon=True).start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                length = int(next((l.split(b":")[1] for l in head.split(b"\r\n")
                                   if l.lower().startswith(b"content-length:")), b"0"))
                body = reader.read(length)
                self.requests.append((index, head + body))
                if self.script(conn, head + body, len(self.requests)) is False:
                    return  # the script closed the connection
        except OSError:
            return
        finally:
            reader.close()
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.listener.close()


@pytest.fixture
def peer():
    peers: list[ScriptedPeer] = []

    def make(script) -> ScriptedPeer:
        p = ScriptedPeer(script)
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.close()


def answer(body: bytes, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def test_request_is_one_write_with_the_headers_cpp_sends(peer):
    p = peer(lambda conn, req, n: conn.sendall(answer(b'{"ok":true}')))
    reply = http_client.post_json(p.url, b'{"model":"m"}')
    assert (reply.status, reply.body) == (200, {"ok": True})
    head, body = p.requests[0][1].split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields["User-Agent"] == "lemon.cpp/1.0" and fields["Content-Type"] == "application/json"
    assert fields["Host"] == f"127.0.0.1:{p.port}" and fields["Content-Length"] == "13"
    assert body == b'{"model":"m"}'


@pytest.mark.parametrize("size", [0, http_client.JOIN_BODY_LIMIT, http_client.JOIN_BODY_LIMIT + 1, 3_000_000])
def test_bodies_of_any_size_arrive_whole(peer, size):
    body = json.dumps({"image": "x" * max(0, size - 13)}).encode()[:size] if size else b""
    p = peer(lambda conn, req, n: conn.sendall(answer(b"{}")))
    assert http_client.post_json(p.url, body).status == 200
    head, sent = p.requests[0][1].split(b"\r\n\r\n", 1)
    assert sent == body and f"Content-Length: {len(body)}".encode() in head


def test_sequential_requests_reuse_one_connection(peer):
    p = peer(lambda conn, req, n: conn.sendall(answer(b'{"n":%d}' % n)))
    assert [http_client.post_json(p.url, b"{}").body["n"] for _ in range(5)] == [1, 2, 3, 4, 5]
    assert p.connections == 1


def test_connection_close_is_honoured(peer):
    def script(conn, req, n):
        conn.sendall(answer(b"{}", extra=b"Connection: close\r\n"))
        return False

    p = peer(script)
    for _ in range(3):
        assert http_client.post_json(p.url, b"{}").status == 200
    assert p.connections == 3


def test_a_silently_closed_keep_alive_connection_is_retried_once(peer):
    """llama-server closes a pooled connection without saying so; the next request goes out again on a
    fresh connection, and the peer sees it exactly once."""
    def script(conn, req, n):
        conn.sendall(answer(b'{"n":%d}' % n))
        return False  # closed after answering, no `Connection: close`

    p = peer(script)
    assert http_client.post_json(p.url, b"{}").body == {"n": 1}
    assert http_client.post_json(p.url, b"{}").body == {"n": 2}
    assert len(p.requests) == 2 and p.connections == 2


def test_a_fresh_connection_that_closes_is_an_error_not_a_loop(peer):
    p = peer(lambda conn, req, n: False)  # reads the request, closes without a word
    with pytest.raises(NetworkError, match="closed the connection without answering"):
        http_client.post_json(p.url, b"{}")
    assert len(p.requests) == 1


def test_informational_answers_are_skipped(peer):
    p = peer(lambda conn, req, n: conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b'{"a":1}')))
    assert http_client.post_json(p.url, b"{}").body == {"a": 1}


def test_error_status_and_non_json_body(peer):
    p = peer(lambda conn, req, n: conn.sendall(answer(b"model is busy", "503 Service Unavailable")))
    reply = http_client.post_json(p.url, b"{}")
    assert (reply.status, reply.body) == (503, "model is busy")


def test_body_without_length_ends_at_close(peer):
    def script(conn, req, n):
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"until":')
        conn.sendall(b'"close"}')
        conn.shutdown(socket.SHUT_WR)
        return False

    p = peer(script)
    assert http_client.post_json(p.url, b"{}").body == {"until": "close"}
    assert http_client.post_json(p.url, b"{}").status == 200
    assert p.connections == 2  # never kept: the end of the body was the end of the connection


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"short\":",  # cut short
    b"SPDY/9 200 OK\r\n\r\n",  # not HTTP/1.x
    b"HTTP/1.1 abc OK\r\n\r\n",  # no status code
    b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",  # malformed field
    b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",  # bad length
    b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n",  # too many fields
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk size
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"a\"",  # chunk cut short
])
def test_broken_answers_are_network_errors(peer, reply):
    def script(conn, req, n):
        conn.sendall(reply)
        return False

    p = peer(script)
    with pytest.raises(NetworkError):
        http_client.post_json(p.url, b"{}")
    # The broken connection was dropped, not pooled: the next call gets a fresh one.
    with pytest.raises(NetworkError):
        http_client.post_json(p.url, b"{}")
    assert p.connections == 2


def test_a_silent_backend_times_out_and_is_not_retried(peer):
    p = peer(lambda conn, req, n: None)  # reads and never answers
    with pytest.raises(http_client.BackendTimeout):
        http_client.post_json(p.url, b"{}", timeout=0.3)
    assert len(p.requests) == 1


def read_stream_reporting_each_chunk(url: str, received: queue.Queue) -> list[bytes]:
    """Open a stream and read it, putting each chunk in `received` the moment it is handed over (the
    peer waits on that queue before it sends more)."""
    response = http_client.post_stream(url, b"{}")
    got = []
    try:
        for chunk in http_client.iter_chunks(response):
            got.append(chunk)
            received.put(chunk)
    finally:
        response.close()
    return got


def test_stream_chunks_are_handed_over_one_by_one_as_they_arrive(peer):
    """Each transfer chunk reaches the caller before the peer sends the next one (the peer waits for
    the test to confirm): nothing is held back to fill a buffer."""
    frames = [b'data: {"i":%d}\n\n' % i for i in range(5)] + [b"data: [DONE]\n\n"]
    received: queue.Queue = queue.Queue()

    def script(conn, req, n):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for frame in frames:
            conn.sendall(b"%X\r\n%s\r\n" % (len(frame), frame))
            assert received.get(timeout=10) == frame  # the client has it before the next is sent
        conn.sendall(b"0\r\n\r\n")

    p = peer(script)
    got = read_stream_reporting_each_chunk(p.url, received)
    assert got == frames


def test_a_stream_cut_mid_chunk_ends_with_a_network_error(peer):
    def script(conn, req, n):
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n20\r\ndata")
        return False

    p = peer(script)
    response = http_client.post_stream(p.url, b"{}")
    got = []
    with pytest.raises(NetworkError):
        for chunk in http_client.iter_chunks(response):
            got.append(chunk)
    response.close()
    assert got == [b"data: "]


def test_a_content_length_stream_is_relayed_as_read(peer):
    """Without chunked framing, what one read brings is handed over at once too."""
    body = json.dumps({"x": "y" * 1000}).encode()
    first, rest = body[:100], body[100:]
    received: queue.Queue = queue.Queue()

    def script(conn, req, n):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + first)
        assert received.get(timeout=10) == first
        conn.sendall(rest)

    p = peer(script)
    got = read_stream_reporting_each_chunk(p.url, received)
    assert b"".join(got) == body and got[0] == first


# -- the one chunked decoder (RFC 9112 §7.1), shared with httpd's request bodies ----------------------

def decode_chunked(raw: bytes) -> list[bytes]:
    rfile = io.BufferedReader(io.BytesIO(raw))
    chunks = []
    while chunk := http_client.read_chunk(rfile):
        chunks.append(chunk)
    assert rfile.read() == b"", "the decoder read past the end of the chunked body"
    return chunks


@pytest.mark.parametrize("raw, chunks", [
    (b"5\r\nhello\r\n0\r\n\r\n", [b"hello"]),
    (b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n", [b"hello", b"!"]),
    (b"A\r\n0123456789\r\n0\r\n\r\n", [b"0123456789"]),
    (b"a\r\n0123456789\r\n000\r\n\r\n", [b"0123456789"]),
    (b"0005\r\nhello\r\n0\r\n\r\n", [b"hello"]),
    (b"5;name\r\nhello\r\n0;last\r\n\r\n", [b"hello"]),
    (b"5 ; a=b ;c = \"q \\\" x\"\r\nhello\r\n0\r\n\r\n", [b"hello"]),
    (b"5\r\nhello\r\n0\r\nX-Trailer: 1\r\nY: two\r\n\r\n", [b"hello"]),
    (b"5\r\nhe\r\no\r\n0\r\n\r\n", [b"he\r\no"]),  # CRLF inside the data is data
    (b"0\r\n\r\n", []),
])
def test_chunked_decoder_reads_valid_bodies(raw, chunks):
    assert decode_chunked(raw) == chunks


@pytest.mark.parametrize("raw, cut", [
    (b"+5\r\nhello\r\n0\r\n\r\n", False),     # a sign
    (b"-5\r\nhello\r\n0\r\n\r\n", False),
    (b"0x5\r\nhello\r\n0\r\n\r\n", False),    # a prefix
    (b" 5\r\nhello\r\n0\r\n\r\n", False),     # blanks around or inside the size
    (b"5 \r\nhello\r\n0\r\n\r\n", False),
    (b"5 5\r\nhello\r\n0\r\n\r\n", False),
    (b"zz\r\n", False),
    (b"\r\n", False),                        # no size at all
    (b"5\nhello\r\n0\r\n\r\n", False),        # a bare LF after the size
    (b"5;\r\nhello\r\n0\r\n\r\n", False),     # an extension without a name
    (b"5;a=\"open\r\nhello\r\n0\r\n\r\n", False),
    (b"5;a b\r\nhello\r\n0\r\n\r\n", False),
    (b"5\r\nhelloX0\r\n\r\n", False),          # no CRLF after the data
    (b"5\r\nhello\n0\r\n\r\n", False),
    (b"1" * 17 + b"\r\n", False),               # more than 64 bits
    (b"5\r\nhello\r\n0\r\nno colon\r\n\r\n", False),
    (b"5\r\nhello\r\n0\r\n" + b"X: y\r\n" * 101 + b"\r\n", False),  # trailers are bounded
    (b"", True),
    (b"5\r\nhel", True),
    (b"5\r\nhello", True),
    (b"5\r\nhello\r", True),
    (b"5\r\nhello\r\n", True),
    (b"5\r\nhello\r\n0\r\n", True),
    (b"5\r\nhello\r\n0\r\nX: y\r\n", True),
])
def test_chunked_decoder_refuses_broken_framing(raw, cut):
    with pytest.raises(http_client.ChunkError) as e:
        decode_chunked(raw)
    assert e.value.cut is cut


def test_chunk_extensions_and_trailers_from_a_backend_are_read(peer):
    def script(conn, req, n):
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"7;x=1\r\n{\"a\":1}\r\n0\r\nX-Checksum: abc\r\n\r\n")

    p = peer(script)
    assert http_client.post_json(p.url, b"{}").body == {"a": 1}
    assert http_client.post_json(p.url, b"{}").body == {"a": 1}
    assert p.connections == 1  # the trailers were consumed: the connection was clean for reuse


# -- the requests session (probes, downloads) ---------------------------------------------------------

def test_session_retries_once_on_a_kept_connection_closed_without_an_answer(peer):
    """The second request goes out on the kept connection; the peer reads it and closes without a
    word (llama-server's keep-alive race). It is sent again on a fresh connection."""
    def script(conn, req, n):
        if n == 2:
            return False
        conn.sendall(answer(b'{"n":%d}' % n))

    p = peer(script)
    assert http_client.get_json(p.url).body == {"n": 1}
    assert http_client.get_json(p.url).body == {"n": 3}
    assert p.connections == 2 and len(p.requests) == 3


def test_session_never_retries_a_read_timeout(peer):
    p = peer(lambda conn, req, n: None)  # reads and never answers
    with pytest.raises(http_client.BackendTimeout):
        http_client.get_json(p.url, timeout=0.3)
    assert len(p.requests) == 1


def test_session_retries_a_connection_that_closes_at_most_once(peer):
    p = peer(lambda conn, req, n: False)
    with pytest.raises(NetworkError):
        http_client.get_json(p.url)
    assert len(p.requests) == 2
