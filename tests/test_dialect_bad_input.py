"""Bad input on every Ollama and Anthropic route, over raw sockets: broken JSON, wrong types, bodies over
the limit (413 from the headers alone), truncated bodies, other methods. Every answer is below 500, in
the route's dialect (Ollama's `{"error": "<text>"}`, Anthropic's `{"type":"error","error":{…}}`) with the
status HEAD gives, with CORS headers; a connection the server keeps serves the next request; nothing
loads a model; threads and fds come back to the baseline. (Clients that leave mid-stream are in
test_ollama_api.py and test_anthropic_api.py, which have a model loaded.)
"""
from __future__ import annotations

import json
import random
import socket

import pytest
import requests

from api_support import (CORS, DEFAULT_MODEL, raw_connection, raw_request, read_response, request_bytes, running_server,
                         server_process, settled_resources, wait_for_baseline)

SEED = 20261203
CASES = 300
OLLAMA_BODY_ROUTES = [("POST", "/api/chat"), ("POST", "/api/generate"), ("POST", "/api/show"), ("POST", "/api/pull"),
                      ("POST", "/api/embed"), ("POST", "/api/embeddings"), ("DELETE", "/api/delete")]
ANTHROPIC_ROUTES = [("POST", p + e) for p in ("/v1/", "/api/v1/") for e in ("messages", "messages/count_tokens")]
BODY_ROUTES = OLLAMA_BODY_ROUTES + ANTHROPIC_ROUTES
ANTHROPIC_TYPES = {400: "invalid_request_error", 404: "not_found_error", 408: "invalid_request_error",
                   413: "request_too_large"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("dialect-bad"), seeded_hub_cache) as s:
        yield s


def is_anthropic(path: str) -> bool:
    return "/messages" in path


def error_text(path: str, status: int, body: bytes) -> str:
    """The message of a dialect error body, checking its exact shape."""
    answer = json.loads(body)
    if is_anthropic(path):
        assert set(answer) == {"type", "error"} and answer["type"] == "error", answer
        assert set(answer["error"]) == {"type", "message"}, answer
        assert answer["error"]["type"] == ANTHROPIC_TYPES[status], (status, answer)
        return answer["error"]["message"]
    assert set(answer) <= {"error", "code"} and isinstance(answer["error"], str), answer
    return answer["error"]


def check_answer(path: str, data: bytes, response, expected: int | None = None) -> str:
    where = f"{path}: {data[:160]!r} -> {response.status} {response.body[:200]!r}"
    assert response.status < 500 and (expected is None or response.status == expected), where
    for key, value in CORS.items():
        assert response.getheader(key) == value, where
    assert response.getheader("Content-Type") == "application/json", where
    return error_text(path, response.status, response.body)


# -- exact answers -----------------------------------------------------------------------------------

BROKEN_JSON = [
    (b"", "Request body is empty; expected a JSON object"),
    (b"[1]", "Expected a JSON object, got array"),
    (b'{"model": "x",', "Invalid JSON: Expecting property name enclosed in double quotes: line 1 column 15 (char 14)"),
    (b"\xff{}", "Request body is not valid UTF-8: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
    (b'{"model": "x", "temperature": NaN}', "Invalid JSON: NaN is not valid JSON"),
    (b"[" * 100000, "Invalid JSON: nested too deeply"),
]


@pytest.mark.parametrize("method,path", BODY_ROUTES)
def test_broken_json_is_a_400_in_the_dialect(server, method, path):
    for body, message in BROKEN_JSON:
        data = request_bytes(method, path, body, {"Content-Length": len(body)})
        response = raw_request(server.port, data, method)
        assert check_answer(path, data, response, 400) == message


WRONG_TYPES = {
    "/api/chat": [({"model": 5}, "'model' must be a string, got number"),
                  ({}, "model is required"),
                  ({"model": "m", "messages": "hi"}, "'messages' must be an array, got string"),
                  ({"model": "m", "messages": [5]}, "'messages[0]' must be an object, got number"),
                  ({"model": "m", "messages": [{"content": 1}]}, "'messages[0].content' must be a string, got number"),
                  ({"model": "m", "stream": "yes"}, "'stream' must be a boolean, got string"),
                  ({"model": "m", "options": []}, "'options' must be an object, got array"),
                  ({"model": "m", "options": {"num_predict": "x"}}, "'options.num_predict' must be an integer, got string"),
                  ({"model": "m", "options": {"num_ctx": 1.5}}, "'options.num_ctx' must be an integer, got number"),
                  ({"model": "m", "keep_alive": []}, "'keep_alive' must be a number or a string, got array"),
                  ({"model": "m", "tools": {}}, "'tools' must be an array, got object")],
    "/api/generate": [({"model": ["m"]}, "'model' must be a string, got array"),
                      ({"model": "m", "prompt": 5}, "'prompt' must be a string, got number"),
                      ({"model": "m", "options": {"stop": [1]}}, "'options.stop[0]' must be a string, got number")],
    "/api/show": [({}, "name is required"), ({"name": 5}, "'name' must be a string, got number")],
    "/api/pull": [({}, "name is required"), ({"model": DEFAULT_MODEL, "stream": "no"},
                                             "'stream' must be a boolean, got string")],
    "/api/embed": [({"model": "m"}, "input is required"), ({"model": "m", "input": 5},
                                                           "'input' must be a string or an array, got number")],
    "/api/embeddings": [({"model": "m"}, "prompt is required"), ({"input": "x"}, "model is required")],
    "/api/delete": [({}, "name is required"), ({"model": {}}, "'model' must be a string, got object")],
    "messages": [({"messages": []}, "model is required"),
                 ({"model": "m"}, "messages is required"),
                 ({"model": "m", "messages": {}}, "'messages' must be an array, got object"),
                 ({"model": "m", "messages": [{"role": 1}]}, "'messages[0].role' must be a string, got number"),
                 ({"model": "m", "messages": [], "system": 5}, "'system' must be a string or an array, got number"),
                 ({"model": "m", "messages": [], "stream": 1}, "'stream' must be a boolean, got number"),
                 ({"model": "m", "messages": [], "tools": "x"}, "'tools' must be an array, got string"),
                 ({"model": "m", "messages": [], "stop_sequences": [1]}, "'stop_sequences[0]' must be a string, got number"),
                 ({"model": "m", "messages": [], "ctx_size": "big"}, "'ctx_size' must be an integer, got string")],
}


@pytest.mark.parametrize("method,path", BODY_ROUTES)
def test_wrong_types_name_the_field(server, method, path):
    cases = WRONG_TYPES["messages" if is_anthropic(path) else path]
    with raw_connection(server.port) as sock:  # one keep-alive connection: every 400 leaves it usable
        for body, message in cases:
            data = request_bytes(method, path, json.dumps(body).encode())
            sock.sendall(data)
            response = read_response(sock, method)
            assert check_answer(path, data, response, 400) == message
            assert response.getheader("Connection") != "close"
    assert not server.llama_processes()


@pytest.mark.parametrize("method,path", BODY_ROUTES)
def test_huge_bodies_are_413_from_the_headers(server, method, path):
    for framing in ({"Content-Length": 10**12}, {"Transfer-Encoding": "chunked"}):
        data = request_bytes(method, path, b"", framing)
        if "Transfer-Encoding" in framing:
            data += b"FFFFFFFFFF\r\n"  # one chunk of a terabyte, announced and never sent
        with raw_connection(server.port) as sock:
            sock.sendall(data)
            response = read_response(sock, method)
        assert "exceeds the limit" in check_answer(path, data, response, 413)
        assert response.getheader("Connection") == "close"


@pytest.mark.parametrize("method,path", BODY_ROUTES)
def test_truncated_bodies(server, method, path):
    data = request_bytes(method, path, b'{"model": "x"', {"Content-Length": 500})
    with raw_connection(server.port) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        response = read_response(sock, method)
    assert check_answer(path, data, response, 400) == "Request body ended after 13 of 500 bytes (Content-Length)"


def test_methods_and_head_rules(server):
    for method, path in (("GET", "/api/chat"), ("PUT", "/api/chat"), ("POST", "/api/delete"), ("GET", "/v1/messages"),
                         ("DELETE", "/api/tags"), ("HEAD", "/api/delete"), ("POST", "/api/v0/messages")):
        response = raw_request(server.port, request_bytes(method, path, b"{}"), method)
        assert response.status == 404, (method, path)
    for path in ("/api/tags", "/api/ps", "/api/version"):
        head = raw_request(server.port, request_bytes("HEAD", path), "HEAD")
        get = requests.get(server.url + path)
        assert head.status == get.status_code == 200 and head.body == b""
        assert head.getheader("Content-Length") == get.headers["Content-Length"]
    options = raw_request(server.port, request_bytes("OPTIONS", "/api/delete", b"",
                                                     {"Access-Control-Request-Method": "DELETE"}), "OPTIONS")
    assert options.status == 204 and "DELETE" in options.getheader("Access-Control-Allow-Methods")


@pytest.mark.parametrize("path", ["/api/create", "/api/copy", "/api/push", "/api/blobs/sha256:00"])
def test_not_supported_routes_never_read_their_bodies(server, path):
    small = raw_request(server.port, request_bytes("POST", path, b'{"model": "x"}'), "POST")
    assert small.status == 501 and json.loads(small.body) == {"error": "not supported by Lemonade"}
    with raw_connection(server.port) as sock:  # a blob upload of 50 GB: answered at once, connection closed
        sock.sendall(request_bytes("POST", path, b"", {"Content-Length": 50 * 2**30}) + b"\0" * 65536)
        response = read_response(sock, "POST")
    assert response.status == 501 and response.getheader("Connection") == "close"


def test_unknown_models_answer_in_the_dialect_without_loading(server):
    cases = [("/api/chat", {"model": "fz-none", "messages": []}, 404, "model 'fz-none' not found, try pulling it first"),
             ("/api/generate", {"model": "fz-none:latest"}, 404, "model 'fz-none' not found, try pulling it first"),
             ("/api/show", {"model": "fz-none"}, 404, "model 'fz-none' not found"),
             ("/api/pull", {"name": "fz-none"}, 404, "model 'fz-none' not found"),
             ("/api/embed", {"model": "fz-none", "input": "x"}, 404, "model 'fz-none' not found"),
             ("/v1/messages", {"model": "fz-none", "messages": []}, 404,
              "model 'fz-none' not found, try pulling it first"),
             ("/api/v1/messages/count_tokens", {"model": "fz-none", "messages": []}, 404,
              "model 'fz-none' not found, try pulling it first")]
    for path, body, status, message in cases:
        data = request_bytes("POST", path, json.dumps(body).encode())
        assert check_answer(path, data, raw_request(server.port, data, "POST"), status) == message
    assert not server.llama_processes()


# -- a seeded storm over every route ------------------------------------------------------------------

def _mutation(rng: random.Random, path: str) -> bytes:
    """A body that is wrong somewhere, never a valid request (nothing may load)."""
    bad = [5, -1.5, True, None, [], {}, ["x"], {"a": 1}, "", "\u00e9\u4e2d\U0001f34b"]
    if is_anthropic(path):
        body: dict = {"model": rng.choice(["fz-x", 5, None, ""]), "messages": rng.choice([[], "x", [1], [{"role": []}]])}
        field = rng.choice(["system", "max_tokens", "temperature", "top_k", "stream", "tools", "tool_choice", "thinking"])
    else:
        body = {"model": rng.choice(["fz-x", 5, None, "", ":latest"]), "name": rng.choice(["fz-y", 3, None])}
        field = rng.choice(["messages", "prompt", "input", "options", "keep_alive", "stream", "tools", "format", "think"])
    body[field] = rng.choice(bad)
    if rng.random() < 0.3:
        return json.dumps(body).encode()[:rng.randint(0, 60)]  # cut anywhere
    return json.dumps(body).encode()


def test_storm_of_bad_requests(server):
    proc = server_process(server)
    for _ in range(3):
        requests.get(server.url + "/api/tags")
    baseline = settled_resources(proc)
    rng = random.Random(SEED)
    statuses: dict[int, int] = {}
    for _ in range(CASES):
        method, path = rng.choice(BODY_ROUTES)
        body = _mutation(rng, path)
        data = request_bytes(method, path, body, {"Content-Length": len(body)})
        with raw_connection(server.port) as sock:
            sock.sendall(data)
            response = read_response(sock, method)
            check_answer(path, data, response)
            statuses[response.status] = statuses.get(response.status, 0) + 1
            if response.getheader("Connection", "").lower() != "close":
                sock.sendall(request_bytes("GET", "/api/version"))
                assert read_response(sock).status == 200
    print(f"\nstorm: statuses {dict(sorted(statuses.items()))}")
    assert set(statuses) <= {400, 404} and statuses.get(400, 0) > CASES / 2
    assert not server.llama_processes()  # nothing malformed loaded a model
    wait_for_baseline(proc, baseline)
