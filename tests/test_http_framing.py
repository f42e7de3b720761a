"""Request framing and request-target bounds (issue 15 items 13 and 10), on a real `lemonade serve`.

* RFC 9112 §6.1: a request with both Content-Length and Transfer-Encoding, or whose final transfer coding
  is not exactly `chunked`, has a body of unknown length: 400 and the connection closed (a coding before
  `chunked` that we cannot decode: 501). Serving such a request and keeping the connection is how
  requests are smuggled past a proxy that frames them the other way.
* A request line over 8192 bytes is a 414 (cpp-httplib's bound); a long `/static/` path is a 404 that
  never reaches the file system. `webui.static_file` is linear: counted, not timed.
"""
from __future__ import annotations

import json
import os

import pytest

from api_support import raw_connection, raw_request, read_response, read_until_closed, running_server, wait_for

LOAD_BODY = b'{"model_name": ""}'  # /load refuses it with its own message: proof the body was read
CHUNKED_LOAD_BODY = b"12\r\n" + LOAD_BODY + b"\r\n0\r\n\r\n"
FOLLOW_UP = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("framing"), seeded_hub_cache) as s:
        yield s


def _load_head(*fields: str) -> bytes:
    return ("POST /api/v1/load HTTP/1.1\r\nHost: x\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n").encode()


def _answer_then_closed(port: int, data: bytes) -> tuple:
    """Send `data` (a request, then a second request smuggled behind it); the one answer and whether
    the server closed the connection instead of reading the second request."""
    with raw_connection(port, timeout=10) as sock:
        sock.sendall(data)
        response = read_response(sock, "POST")
        return response, read_until_closed(sock)


@pytest.mark.parametrize("fields, body, status, message", [
    (("Content-Length: 23", "Transfer-Encoding: chunked"), CHUNKED_LOAD_BODY, 400,
     "Request has both Content-Length and Transfer-Encoding"),
    (("Transfer-Encoding: chunked", "Content-Length: 23"), CHUNKED_LOAD_BODY, 400,
     "Request has both Content-Length and Transfer-Encoding"),
    (("Transfer-Encoding: chunked, gzip",), CHUNKED_LOAD_BODY, 400,
     "Unsupported Transfer-Encoding 'chunked, gzip': the final coding must be chunked, once"),
    (("Transfer-Encoding: xchunked",), CHUNKED_LOAD_BODY, 400,
     "Unsupported Transfer-Encoding 'xchunked': the final coding must be chunked, once"),
    (("Transfer-Encoding: chunked", "Transfer-Encoding: identity"), CHUNKED_LOAD_BODY, 400,
     "Unsupported Transfer-Encoding 'chunked, identity': the final coding must be chunked, once"),
    (("Transfer-Encoding: chunked, chunked",), CHUNKED_LOAD_BODY, 400,
     "Unsupported Transfer-Encoding 'chunked, chunked': the final coding must be chunked, once"),
    (("Transfer-Encoding: gzip, chunked",), CHUNKED_LOAD_BODY, 501, "Transfer coding 'gzip' is not supported"),
])
def test_ambiguous_framing_is_refused_and_the_connection_closed(server, fields, body, status, message):
    response, rest = _answer_then_closed(server.port, _load_head(*fields) + body + FOLLOW_UP)
    assert response.status == status and response.getheader("Connection") == "close"
    assert json.loads(response.body) == {"error": {"message": message, "type": "invalid_request"}}
    assert rest == b""  # the smuggled request was never read


def test_transfer_encoding_in_http_1_0_is_refused(server):
    head = b"POST /api/v1/load HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
    response, rest = _answer_then_closed(server.port, head + CHUNKED_LOAD_BODY + FOLLOW_UP)
    assert response.status == 400 and response.getheader("Connection") == "close"
    assert json.loads(response.body)["error"]["message"] == "Transfer-Encoding is not allowed in an HTTP/1.0 request"
    assert rest == b""


@pytest.mark.parametrize("coding", ["chunked", "Chunked", " chunked "])
def test_plain_chunked_is_still_read_and_the_connection_kept(server, coding):
    with raw_connection(server.port) as sock:
        sock.sendall(_load_head(f"Transfer-Encoding:{coding}") + CHUNKED_LOAD_BODY)
        response = read_response(sock, "POST")
        assert response.status == 400 and json.loads(response.body) == {"error": "'model_name' is required"}
        assert response.getheader("Connection") is None
        sock.sendall(FOLLOW_UP)
        assert read_response(sock).status == 200  # the next request on the same connection


def test_a_request_line_over_8192_bytes_is_414(server):
    path = "/static/" + "a/" * 32_000  # a 64 KB path
    response = raw_request(server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), timeout=10)
    assert response.status == 414 and response.getheader("Connection") == "close"
    assert json.loads(response.body) == {"error": {"message": "Request line longer than 8192 bytes",
                                                   "type": "bad_request"}}
    wait_for(lambda: "[Server] Error 414" in server.log_text(), 10, what="the 414 in the log")


def test_a_long_static_path_under_the_line_bound_is_404(server):
    path = "/static/" + "a/" * 4000
    response = raw_request(server.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), timeout=10)
    assert response.status == 404
    assert raw_request(server.port, b"GET /static/styles.css HTTP/1.1\r\nHost: x\r\n\r\n").status == 200


def test_static_lookup_does_linear_bounded_work(monkeypatch):
    """Counted file-system calls: none for a path over the bound, at most one per component plus a
    few under it (the old check made one lstat per component of a growing path, then built every
    parent: seconds of CPU for 64 KB)."""
    from lemonade.server import webui
    from lemonade.utils import path_utils

    fixed = len(path_utils.static_dir().resolve().parts) + 8  # finding and resolving the root, then is_file
    calls = []
    real_lstat, real_stat = os.lstat, os.stat
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: calls.append(p) or real_lstat(p, *a, **k))
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: calls.append(p) or real_stat(p, *a, **k))
    assert webui.static_file("a/" * 4000) is None
    assert calls == []
    assert webui.static_file("a/" * 500) is None
    assert len(calls) <= 500 + fixed
    calls.clear()
    assert webui.static_file("styles.css") is not None and len(calls) <= 1 + fixed
    for escape in ("../webui.py", "../../lemonade/__init__.py", "js/../../webapp.html/..", "", ".", "\0x"):
        assert webui.static_file(escape) is None, escape
