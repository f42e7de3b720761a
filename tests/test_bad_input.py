"""Malformed requests, tried on purpose, over raw sockets (every byte under the test's control).

* A seeded generator sends well over 500 malformed requests (request lines, headers, framing, bodies,
  types, paths, multipart) to a real `lemonade serve`. Each must get a complete HTTP answer below 500,
  a JSON error object for every status ≥ 400 (except HEAD), and CORS headers; a connection the server
  keeps open must serve a following request. Afterwards the server answers a real chat correctly and
  its threads and fds are back to the baseline.
* Bodies beyond the limit get 413 from the headers alone. A client that leaves mid-stream cancels the
  llama-server task (its `/slots`, its log). A client that stalls is cut by the socket timeout without
  holding up anyone else (in-process server with a 1 s timeout).
"""
from __future__ import annotations

import json
import random
import socket
import threading
import time

import pytest
import requests

from api_support import (settled_resources, CORS, DEFAULT_MODEL, HELLO, backend_connections, backend_port,
                         raw_connection, raw_request, read_response, read_until_closed, request_bytes,
                         running_server, server_process, slots_busy, wait_for, wait_for_baseline)

SEED = 20251125
CASES = 640
POST_ROUTES = ("chat/completions", "completions", "embeddings", "reranking", "responses", "pull", "load",
               "delete", "log-level", "unload", "params")
JSON_ROUTES = ("chat/completions", "completions", "embeddings", "reranking", "responses", "pull", "load",
               "delete", "log-level")


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("bad"), seeded_hub_cache) as s:
        yield s


# -- the generator ---------------------------------------------------------------------------------------

def _text(rng: random.Random, n: int = 12) -> str:
    alphabet = "abcXYZ019 _-./\\\"'{}[]:,\u00e9\u4e2d\U0001f34b\t"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))


def _bad_json(rng: random.Random) -> bytes:
    choices = [
        lambda: b"",
        lambda: b"   \r\n\t ",
        lambda: b'{"model": "x", "messages": [',
        lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))),
        lambda: json.dumps(rng.choice([[], [1, 2], 5, -1.5, "s", None, True, False])).encode(),
        lambda: b'{"model": "\xff\xfe\xfd"}',
        lambda: json.dumps({"model": "fz-x"}).encode("utf-16"),
        lambda: b'{"model": "fz-x", "temperature": NaN}',
        lambda: b'{"model": "fz-x", "temperature": -Infinity}',
        lambda: b'{"model": "\\ud800fz"}',
        lambda: b'{"a":' * rng.randint(2000, 6000) + b"1" + b"}" * 10,
        lambda: b"[" * rng.randint(2000, 6000),
        lambda: b'{"model": ' + b"9" * rng.randint(4400, 6000) + b"}",
        lambda: b"\xef\xbb\xbf" + bytes(rng.getrandbits(8) for _ in range(8)),
        lambda: b"{'model': 'single quotes'}",
        lambda: b'{"model": "fz-x",}',
        lambda: b"{\"model\": \"fz-x\"} trailing",
        lambda: b"\x00" * rng.randint(1, 20),
    ]
    return rng.choice(choices)()


def _wrong_types(rng: random.Random, route: str) -> bytes:
    bad = [5, 1.5, True, [], {}, ["x"], {"a": 1}]
    body: dict = {"model": "fz-" + _text(rng, 6), "messages": HELLO, "max_tokens": 1,
                  "model_name": "fz-" + _text(rng, 6), "level": "info", "input": "x", "query": "q",
                  "documents": ["d"]}
    field = rng.choice(["model", "stream", "messages", "model_name", "level", "checkpoint", "recipe",
                        "reasoning", "do_not_upgrade"])
    body[field] = rng.choice(bad + ["yes", None] if field in ("stream", "reasoning") else bad)
    if field == "messages" and rng.random() < 0.5:
        body["messages"] = rng.choice(["hi", 3, [1, 2], [None], [[]]])
    for _ in range(rng.randint(0, 3)):  # unknown fields ride along
        body["fz_" + _text(rng, 5)] = rng.choice([None, 1, "x", [1], {"k": [None]}])
    return json.dumps(body).encode()


def _unknown_model(rng: random.Random) -> bytes:
    name = "fz-" + _text(rng, 20)
    return json.dumps({"model": name, "model_name": name, "messages": HELLO, "input": "x",
                       "query": "q", "documents": ["d"], "prompt": "p", "max_tokens": 1}).encode()


def _multipart(rng: random.Random) -> tuple[dict, bytes]:
    boundary = "fz" + str(rng.randint(0, 10**9))
    kind = rng.randint(0, 7)
    if kind == 0:
        return {"Content-Type": "multipart/form-data"}, b"no boundary"
    if kind == 1:
        return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, b"garbage without delimiter"
    if kind == 2:
        body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"model_name\"\r\n\r\nuser.x".encode()
        return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body  # truncated
    if kind == 3:
        body = f"--{boundary}\r\nX: y\r\n\r\nvalue\r\n--{boundary}--\r\n".encode()
        return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body  # no disposition
    if kind == 4:
        name = rng.choice(["../../etc/x.gguf", "/abs/x.gguf", "a/../../x.gguf", "dir/./x.gguf"])
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model_name\"\r\n\r\nuser.fz\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"recipe\"\r\n\r\nllamacpp\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"model_files\"; filename=\"{name}\"\r\n"
                f"\r\nGGUF\r\n--{boundary}--\r\n").encode()
        return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body
    if kind == 5:
        fields = {"model_name": rng.choice(["", "fz", "user.fz"]), "recipe": rng.choice(["", "bogus", "llamacpp"])}
        body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                        for k, v in fields.items()) + f"--{boundary}--\r\n".encode()
        return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body
    if kind == 6:
        return {"Content-Type": rng.choice(["application/json", "text/plain", ""])}, b'{"model_name": "user.x"}'
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, bytes(rng.getrandbits(8) for _ in range(200))


def generate(rng: random.Random, port: int):
    """Yield (label, request bytes, method, half_close) for one malformed request."""
    del port
    kind = rng.choices(["json", "types", "unknown", "framing", "line", "path", "multipart", "methods"],
                       weights=[30, 20, 8, 14, 10, 10, 6, 6])[0]
    route = "/api/" + rng.choice(["v0", "v1"]) + "/" + rng.choice(JSON_ROUTES)
    if kind == "json":
        body = _bad_json(rng)
        return kind, request_bytes("POST", route, body, {"Content-Length": len(body)}), "POST", False
    if kind == "types":
        body = _wrong_types(rng, route)
        return kind, request_bytes("POST", route, body), "POST", False
    if kind == "unknown":
        route = "/api/v1/" + rng.choice(["chat/completions", "completions", "embeddings", "reranking",
                                         "responses", "load", "delete"])
        return kind, request_bytes("POST", route, _unknown_model(rng)), "POST", False
    if kind == "framing":
        variant = rng.randint(0, 8)
        if variant == 0:
            value = rng.choice(["abc", "-5", "1.5", "0x10", " ", "+3", "1e3", "١٢"])
            return kind, request_bytes("POST", route, b"{}", {"Content-Length": value}), "POST", False
        if variant == 1:  # two different lengths
            head = f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}"
            return kind, head.encode(), "POST", False
        if variant == 2:  # declared more than sent, then EOF
            return kind, request_bytes("POST", route, b'{"model"', {"Content-Length": 500}), "POST", True
        if variant == 3:  # broken chunk size
            data = f"POST {route} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
            return kind, data.encode(), "POST", False
        if variant == 4:  # chunked, cut short, EOF
            data = f"POST {route} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{{\"a\""
            return kind, data.encode(), "POST", True
        if variant == 5:  # chunked, valid framing, bad JSON inside
            body = _bad_json(rng)[:4000] or b"x"
            data = (f"POST {route} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{len(body):x}\r\n").encode() \
                + body + b"\r\n0\r\n\r\n"
            return kind, data, "POST", False
        if variant == 6:  # body on a GET / OPTIONS / HEAD
            method = rng.choice(["GET", "OPTIONS"])
            path = rng.choice(["/api/v1/health", "/api/v1/load", "/nope", "/api/v1/models"])
            return kind, request_bytes(method, path, b'{"x": 1}' * rng.randint(1, 50)), method, False
        if variant == 7:  # way over the limit: answered from the headers alone
            return kind, request_bytes("POST", route, b"", {"Content-Length": 10**12}), "POST", False
        return kind, request_bytes("POST", route, b"", {"Transfer-Encoding": "chunked"}) + b"FFFFFFFFFF\r\n", "POST", False
    if kind == "line":
        variant = rng.randint(0, 8)
        lines = [
            lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 80))) + b"\r\n\r\n",
            lambda: b"GET /api/v1/health HTTP/2.0\r\nHost: x\r\n\r\n",
            lambda: b"GET /api/v1/health HTTP/1.1 extra\r\nHost: x\r\n\r\n",
            lambda: b"GET\r\n\r\n",
            lambda: b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
            lambda: b"GET /api/v1/health HTTP/1.1\r\nX-Long: " + b"b" * 70000 + b"\r\n\r\n",
            lambda: b"GET /api/v1/health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n",
            lambda: b"GET /api/v1/health HTTP/1.1\r\nno colon here\r\n\r\n",
            lambda: b"GET /api/v1/health HTTP/x.y\r\n\r\n",
        ]
        return kind, lines[variant](), "GET", False
    if kind == "path":
        path = rng.choice([
            "/api/v1/" + _text(rng, 20).replace(" ", "%20").replace("\t", "%09"),
            "/api/v1/models/" + "%" + rng.choice(["zz", "0", "ff", "00", "c3%28"]),
            "/api/v1/models?show_all=" + _text(rng, 8).replace(" ", "+"),
            "/api/v1/system-info?verbose=%ff%fe&&&==",
            "//[unclosed",
            "http://[::1/api/v1/health",
            "*",
            "/api/v1/models/" + "x" * 5000,
            "/static/" + "../" * rng.randint(1, 8) + "etc/passwd",
            "/static/%2e%2e/%2e%2e/etc/passwd",
            "/static/%00",
            "/static/" + "y" * 300,
            "/\u00e9\u4e2d".encode().decode("latin-1"),
        ])
        method = rng.choice(["GET", "HEAD"])
        data = f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode("utf-8")
        return kind, data, method, False
    if kind == "multipart":
        headers, body = _multipart(rng)
        return kind, request_bytes("POST", "/api/v1/add-local-model", body, headers), "POST", False
    method = rng.choice(["PUT", "DELETE", "PATCH", "TRACE", "CONNECT", "FOO", "get", "POSTX", "PRI"])
    return kind, request_bytes(method, rng.choice(["/api/v1/load", "/", "/api/v1/health"]), b"{}"), "GET", False


def check_answer(label: str, data: bytes, response) -> None:
    where = f"{label}: {data[:120]!r} -> {response.status} {response.body[:200]!r}"
    assert response.status < 500, where
    headers = dict(response.getheaders())
    for key, value in CORS.items():
        assert headers.get(key) == value, where
    if response.status >= 400 and response.body:
        assert headers.get("Content-Type") == "application/json", where
        assert "error" in json.loads(response.body), where


def test_fuzz_malformed_requests(server):
    proc = server_process(server)
    for _ in range(5):  # warm up lazy imports and caches before the baseline
        requests.get(server.api + "/health")
        requests.get(server.api + "/models?show_all=true")
        requests.get(server.api + "/system-info")
    baseline = settled_resources(proc)
    rng = random.Random(SEED)
    kinds: dict[str, int] = {}
    statuses: dict[int, int] = {}
    for _ in range(CASES):
        label, data, method, half_close = generate(rng, server.port)
        kinds[label] = kinds.get(label, 0) + 1
        with raw_connection(server.port, timeout=30) as sock:
            try:
                sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered (413) and closed while we were still sending
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            response = read_response(sock, "HEAD" if method == "HEAD" else method)
            check_answer(label, data, response)
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.getheader("Connection", "").lower() != "close" and not half_close:
                # The server kept the connection: the malformed request left nothing behind on it.
                sock.sendall(request_bytes("GET", "/api/v1/health"))
                follow = read_response(sock)
                assert follow.status == 200, (label, data[:120], follow.status, follow.body[:200])
    print(f"\nfuzz: {sum(kinds.values())} requests, kinds {kinds}, statuses {dict(sorted(statuses.items()))}")
    assert sum(kinds.values()) >= 500 and len(kinds) == 8, kinds
    assert not any(s >= 500 for s in statuses), statuses
    assert not server.llama_processes()  # nothing malformed loaded a model
    wait_for_baseline(proc, baseline)


@pytest.mark.parametrize("route", ["chat/completions", "load", "add-local-model"])
def test_huge_content_length_is_413_from_headers(server, route):
    headers = {"Content-Length": 10**12, "Content-Type": "multipart/form-data; boundary=x"}
    with raw_connection(server.port) as sock:
        sock.sendall(request_bytes("POST", f"/api/v1/{route}", b"", headers))
        response = read_response(sock, "POST")  # no body was sent; the answer comes anyway
    assert response.status == 413 and response.getheader("Connection") == "close"
    error = json.loads(response.body)["error"]
    text = error if isinstance(error, str) else error["message"]
    assert "exceeds the limit" in text


def test_exact_errors_for_classic_mistakes(server):
    cases = [
        (b"", "Request body is empty; expected a JSON object"),
        (b"[1]", "Expected a JSON object, got array"),
        (b"\xff{}", "Request body is not valid UTF-8: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
        (b'{"temperature": NaN}', "Invalid JSON: NaN is not valid JSON"),
        (b'{"model": "\\udc00"}', "Invalid JSON: unpaired UTF-16 surrogate in a string"),
        (b"[" * 100000, "Invalid JSON: nested too deeply"),
    ]
    for body, message in cases:
        reply = requests.post(server.api + "/chat/completions", data=body)
        assert reply.status_code == 400
        assert reply.json() == {"error": {"message": message, "type": "invalid_request"}}
        # Management routes keep B's string shape.
        reply = requests.post(server.api + "/load", data=body)
        assert reply.status_code == 400 and reply.json() == {"error": message}


HEALTH_LINE = b"GET /api/v1/health HTTP/1.1\r\n"


@pytest.mark.parametrize("head, status, message", [
    (HEALTH_LINE + b"no colon here\r\n\r\n", 400, "Malformed header line: b'no colon here\\r\\n'"),
    (HEALTH_LINE + b"X-A: 1\r\n folded\r\n\r\n", 400, "Malformed header line: b' folded\\r\\n'"),
    (HEALTH_LINE + b"Bad name : 1\r\n\r\n", 400, "Malformed header line: b'Bad name : 1\\r\\n'"),
    (HEALTH_LINE + b": no name\r\n\r\n", 400, "Malformed header line: b': no name\\r\\n'"),
    (HEALTH_LINE + b"X-Long: " + b"b" * 70000 + b"\r\n\r\n", 431, "Line too long"),
    (HEALTH_LINE + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", 431,
     "More than 100 header fields"),
    (b"GET /api/v1/health HTTP/1.x\r\n\r\n", 400, "Bad request version ('HTTP/1.x')"),
    (b"GET /api/v1/health HTTP/\xd9\xa1.1\r\n\r\n", 400, "Bad request version ('HTTP/\u00d9\u00a1.1')"),
    (b"GET /api/v1/health HTTP/2.0\r\n\r\n", 400, "Invalid HTTP version (HTTP/2.0)"),
    (b"POST /api/v1/load\r\n\r\n", 400, "Bad request syntax ('POST /api/v1/load')"),
])
def test_malformed_header_blocks_get_a_json_error_and_a_closed_connection(server, head, status, message):
    response = raw_request(server.port, head)
    assert response.status == status and response.getheader("Connection") == "close"
    assert json.loads(response.body) == {"error": {"message": message, "type": "bad_request"}}
    assert response.getheader("Access-Control-Allow-Origin") == "*"


def test_header_blocks_at_the_limits_are_read(server):
    """100 fields, names in any case, repeated fields, HTTP/1.0 keep-alive: all served, and the
    connection stays usable where the client asked for it."""
    body = b'{"model_name": ""}'
    fields = b"".join(b"X-%d: y\r\n" % i for i in range(97))
    head = (b"POST /api/v1/load HTTP/1.0\r\nconnection: Keep-Alive\r\ncontent-length: %d\r\n" % len(body)
            + b"CONTENT-TYPE: application/json\r\n" + fields + b"\r\n")
    with raw_connection(server.port) as sock:
        sock.sendall(head + body)
        response = read_response(sock, "POST")
        assert response.status == 400 and json.loads(response.body) == {"error": "'model_name' is required"}
        assert response.getheader("Connection") is None  # kept open, as asked
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nX-Dup: 1\r\nX-Dup: 2\r\n\r\n")
        assert read_response(sock).status == 200
    # Conflicting repeats of Content-Length are still caught (they are read as a list).
    head = b"POST /api/v1/load HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 3\r\n\r\n{}"
    response = raw_request(server.port, head, "POST")
    assert response.status == 400 and json.loads(response.body) == {"error": "Conflicting Content-Length headers"}


CHUNKED_LOAD = b"POST /api/v1/load HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
LOAD_BODY = b'{"model_name": ""}'  # a valid body that /load refuses with a message of its own


@pytest.mark.parametrize("body, message", [
    (b"12;ext=\"v\"\r\n" + LOAD_BODY + b"\r\n0\r\nX-Trailer: 1\r\n\r\n", "'model_name' is required"),
    (b"+12\r\n" + LOAD_BODY + b"\r\n0\r\n\r\n", "Malformed chunked request body: malformed chunk-size line"),
    (b"0x12\r\n" + LOAD_BODY + b"\r\n0\r\n\r\n", "Malformed chunked request body: malformed chunk-size line"),
    (b"12\r\n" + LOAD_BODY + b"0\r\n\r\n", "Malformed chunked request body: no CRLF after a chunk's data"),
    (b"12\r\n" + LOAD_BODY + b"\r\n0\r\nbad trailer\r\n\r\n", "Malformed chunked request body: bad trailer"),
])
def test_chunked_request_bodies_follow_rfc_9112(server, body, message):
    response = raw_request(server.port, CHUNKED_LOAD + body, "POST")
    assert response.status == 400
    assert json.loads(response.body)["error"].startswith(message)
    if message != "'model_name' is required":
        assert response.getheader("Connection") == "close"


def test_real_chat_after_the_storm(server):
    reply = requests.post(server.api + "/chat/completions", timeout=300,
                          json={"model": DEFAULT_MODEL, "messages": HELLO, "max_tokens": 8})
    assert reply.status_code == 200
    body = reply.json()
    assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] > 0


def test_client_leaving_mid_stream_cancels_generation(server):
    requests.post(server.api + "/load", json={"model_name": DEFAULT_MODEL}, timeout=300)
    proc = server_process(server)
    port = backend_port(server)
    baseline = settled_resources(proc)
    for round_ in range(3):
        body = json.dumps({"model": DEFAULT_MODEL, "messages": HELLO, "max_tokens": 4000, "stream": True,
                           "ignore_eos": True}).encode()
        with raw_connection(server.port, timeout=120) as sock:
            sock.sendall(request_bytes("POST", "/api/v1/chat/completions", body))
            received = b""
            while received.count(b"data: ") < 3:
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
            assert slots_busy(port)  # llama-server is generating for us
        # The socket is closed: the next chunk the relay writes fails, the relay closes its
        # llama-server request, and llama-server cancels the task long before 4000 tokens.
        wait_for(lambda: not slots_busy(port), 30, interval=0.2, what="llama-server to stop generating")
        wait_for(lambda: server.log_text().count("cancel task") > round_, 10, what="llama-server's cancel line")
    assert backend_connections(proc, port) <= 2  # closed, not leaked (at most a pooled idle one)
    start = time.monotonic()
    reply = requests.post(server.api + "/chat/completions", timeout=300,
                          json={"model": DEFAULT_MODEL, "messages": HELLO, "max_tokens": 4})
    assert reply.status_code == 200 and time.monotonic() - start < 60
    assert requests.get(server.api + "/health").json()["model_loaded"] == DEFAULT_MODEL
    wait_for_baseline(proc, baseline)


# -- slow clients, against an in-process server with a short socket timeout ----------------------------

@pytest.fixture()
def quick_timeout_server(tmp_path, seeded_hub_cache, monkeypatch):
    from api_support import private_env
    from lemonade.backends.llamacpp_server import LlamaCppOptions
    from lemonade.cli_parser import ServerConfig
    from lemonade.backends import registry
    from lemonade.router import Router
    from lemonade.server.handlers import Api
    from lemonade.server.httpd import LemonadeHTTPServer, serve_forever_in_thread

    for key, value in private_env(tmp_path, seeded_hub_cache).items():
        monkeypatch.setenv(key, value)
    models = registry.model_manager()
    router = Router(models, LlamaCppOptions())
    api = Api(router, models, ServerConfig(port=0), on_shutdown=lambda: None)
    httpd = LemonadeHTTPServer(("127.0.0.1", 0), api, client_timeout=1.0)
    thread = serve_forever_in_thread(httpd)
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    router.shutdown()
    thread.join(timeout=5)


def test_stalled_clients_are_cut_and_block_nobody(quick_timeout_server):
    """Four stalled clients: silent, inside the request line, inside the header fields (all three
    held by the connection loop, no thread), and inside the body (the only one on a handler thread).
    Everyone else is served at once meanwhile; each stalled one is cut after the 1 s timeout."""
    httpd = quick_timeout_server
    port = httpd.server_address[1]
    requests.get(f"http://127.0.0.1:{port}/api/v1/health")
    wait_for(lambda: httpd.busy_handlers() == 0, 5, what="the warm-up handler to end")
    stalls = [b"", b"POST /api/v1/chat/comp", b"POST /api/v1/params HTTP/1.1\r\nHost: x\r\nContent-Le",
              b"POST /api/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mod"]
    sockets = []
    for data in stalls:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(data)
        sockets.append(sock)
    wait_for(lambda: httpd.busy_handlers() == 1 and httpd.connections.counts()["reading"] == 2, 5,
             what="the loop to hold three stalled clients and a handler the fourth")
    # Others are served at once while the stalled clients wait.
    for _ in range(20):
        start = time.monotonic()
        assert requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=5).status_code == 200
        assert time.monotonic() - start < 2
    answers = []
    for sock in sockets:
        start = time.monotonic()
        data = read_until_closed(sock)
        answers.append((data, time.monotonic() - start))
        sock.close()
    # Stalled before the request line or inside the headers: closed without an answer.
    assert [a[0] for a in answers[:3]] == [b"", b"", b""]
    # Stalled inside the body: 408 with a JSON error, then closed.
    head, _, body = answers[3][0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head
    assert json.loads(body) == {"error": {"message": "Request body not received within 1 s",
                                          "type": "invalid_request"}}
    assert all(elapsed < 5 for _, elapsed in answers)
    wait_for(lambda: httpd.busy_handlers() == 0, 5, what="handler threads to end")


def test_handler_threads_are_reused_and_do_not_linger(quick_timeout_server, monkeypatch):
    """A new connection is served by a handler thread that is waiting, not by a new thread; open
    connections without a request cost no thread at all; after a burst at most MAX_IDLE_WORKERS
    wait for work, and those end after WORKER_IDLE_SECONDS."""
    from lemonade.server import connections

    monkeypatch.setattr(connections, "WORKER_IDLE_SECONDS", 1.0)
    monkeypatch.setattr(connections, "MAX_IDLE_WORKERS", 4)  # below the burst below
    httpd = quick_timeout_server
    url = f"http://127.0.0.1:{httpd.server_address[1]}/api/v1/health"
    seen = set()
    for _ in range(10):  # one connection after another: one thread serves them all
        assert requests.get(url, headers={"Connection": "close"}).status_code == 200
        wait_for(lambda: httpd.busy_handlers() == 0, 5, what="the handler to finish its connection")
        seen.update(_handler_thread_objects(httpd))
    assert len(seen) == 1
    burst = [socket.create_connection(httpd.server_address, timeout=10) for _ in range(10)]
    wait_for(lambda: httpd.connections.counts()["idle"] == 10, 5, what="the loop to hold the open connections")
    assert _handler_threads(httpd) <= 1  # open and silent: no thread each
    for sock in burst:  # all ten at once: a handler each, up to the pool's bound
        sock.sendall(request_bytes("GET", "/api/v1/params", headers={"Connection": "close"}))
    for sock in burst:
        assert read_response(sock).status == 405
        sock.close()
    wait_for(lambda: httpd.busy_handlers() == 0, 5, what="the burst to be served")
    assert _handler_threads(httpd) <= connections.MAX_IDLE_WORKERS
    wait_for(lambda: _handler_threads(httpd) == 0, 10, what="waiting handlers to end")
    assert requests.get(url).status_code == 200  # and a new one starts when none is waiting


def _handler_thread_objects(httpd) -> list[threading.Thread]:
    """Handler threads of the in-process server, busy or waiting for a connection."""
    return [t for t in threading.enumerate() if t.name == f"lemonade-http-{httpd.server_address[1]}"]


def _handler_threads(httpd) -> int:
    return len(_handler_thread_objects(httpd))
