"""Status routes and the global HTTP rules of spec http-api §2 on a server that never loads a model:
health, models, models/{id}, stats, system-info, log-level, params, test, OPTIONS, HEAD, GET on POST
routes, unknown routes and methods, CORS, serialization (§0), keep-alive and the request log lines."""
from __future__ import annotations

import http.client

import pytest
import requests

import lemonade

from api_support import (DEFAULT_MODEL, GEMMA_CHECKPOINT, METHOD_NOT_ALLOWED, POST_ENDPOINTS,
                         assert_cors, compact, not_found, raw_request, request_bytes, running_server,
                         wait_for)

USER_MODELS = {"Org/Slashed": {"checkpoint": GEMMA_CHECKPOINT, "recipe": "llamacpp", "labels": ["custom"]}}
PREFIXES = ("/api/v0", "/api/v1")


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache):
    with running_server(tmp_path_factory.mktemp("status"), seeded_hub_cache, user_models=USER_MODELS) as s:
        yield s


@pytest.mark.parametrize("prefix", PREFIXES)
def test_health_bytes(server, prefix):
    reply = requests.get(server.url + prefix + "/health")
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "application/json"
    # GA's keys and values, plus HEAD's multi-model keys (head-llm-surface.md §3.10), in C++'s bytes
    assert reply.content == (b'{"all_models_loaded":[],"checkpoint_loaded":null,"context_size":4096,'
                             b'"log_streaming":{"sse":true,"websocket":false},'
                             b'"max_models":{"embedding":1,"llm":1,"reranking":1},"model_loaded":null,'
                             b'"pinned_models":{"embedding":0,"llm":0,"reranking":0},"status":"ok",'
                             b'"version":"' + lemonade.__version__.encode() + b'"}')
    assert_cors(reply.headers)


@pytest.mark.parametrize("endpoint", ["health", "models", "stats", "system-info"])
def test_head_shortcut_is_empty_200(server, endpoint):
    for prefix in PREFIXES:
        reply = raw_request(server.port, request_bytes("HEAD", f"{prefix}/{endpoint}"), method="HEAD")
        assert reply.status == 200 and reply.body == b""
        assert reply.getheader("Content-Length") == "0"
        assert_cors(dict(reply.getheaders()))


def test_models_default_lists_downloaded_only(server):
    reply = requests.get(server.api + "/models")
    data = reply.json()
    assert reply.content == compact(data)  # compact, keys sorted (§0)
    ids = [m["id"] for m in data["data"]]
    assert ids == sorted(ids)
    assert DEFAULT_MODEL in ids and "user.Org/Slashed" in ids  # the user model shares gemma's file
    assert "Qwen3-0.6B-GGUF" not in ids
    entry = next(m for m in data["data"] if m["id"] == DEFAULT_MODEL)
    assert entry == {"checkpoint": GEMMA_CHECKPOINT, "created": 1234567890, "id": DEFAULT_MODEL,
                     "object": "model", "owned_by": "lemonade", "recipe": "llamacpp"}


def test_models_show_all(server):
    for flag, full in (("true", True), ("1", False), ("TRUE", False), ("false", False)):
        data = requests.get(server.api + f"/models?show_all={flag}").json()["data"]
        names = {m["id"] for m in data}
        assert ("Qwen3-0.6B-GGUF" in names) is full  # only the exact string `true` counts (§4.2)
    data = requests.get(server.api + "/models?show_all=true").json()["data"]
    user = next(m for m in data if m["id"] == "user.Org/Slashed")
    assert user == {"checkpoint": GEMMA_CHECKPOINT, "created": 1234567890, "downloaded": True,
                    "id": "user.Org/Slashed", "labels": ["custom"], "name": "user.Org/Slashed",
                    "object": "model", "owned_by": "lemonade", "recipe": "llamacpp"}
    assert next(m for m in data if m["id"] == "Qwen3-0.6B-GGUF")["downloaded"] is False


@pytest.mark.parametrize("path", ["/models/user.Org/Slashed", "/models/user.Org%2FSlashed"])
def test_model_by_id_with_slash(server, path):
    reply = requests.get(server.api + path)
    assert reply.status_code == 200
    assert reply.content == compact({"checkpoint": GEMMA_CHECKPOINT, "created": 1234567890,
                                     "id": "user.Org/Slashed", "name": "user.Org/Slashed",
                                     "object": "model", "owned_by": "lemonade", "recipe": "llamacpp"})


def test_model_by_id_unknown(server):
    reply = requests.get(server.api + "/models/no-such-model")
    assert reply.status_code == 404
    # B's keys and path; the message names the cause instead of B's fixed text (server.md, difference 1).
    assert reply.json() == not_found("/api/v1/models/no-such-model", "Model not found: no-such-model")
    assert_cors(reply.headers)
    head = raw_request(server.port, request_bytes("HEAD", "/api/v1/models/no-such-model"), method="HEAD")
    assert head.status == 404 and head.body == b""


def test_stats_without_model(server):
    reply = requests.get(server.api + "/stats")
    assert reply.status_code == 200  # B answers 200 here (§4.15)
    assert reply.content == b'{"error":{"message":"No model loaded","type":"model_not_loaded"}}'


def test_system_info(server):
    plain = requests.get(server.api + "/system-info").json()
    assert {"OS Version", "Processor", "Physical Memory", "devices"} <= set(plain)
    assert "Python Packages" not in plain
    for flag in ("true", "1"):
        verbose = requests.get(server.api + f"/system-info?verbose={flag}").json()
        assert verbose["Python Packages"] == ["not-applicable"]


def test_log_level_echo(server):
    reply = requests.post(server.api + "/log-level", json={"level": "debug"})
    assert reply.status_code == 200 and reply.content == b'{"level":"debug","status":"success"}'
    # Not validated (§4.17).
    assert requests.post(server.api + "/log-level", json={"level": "loud"}).json() == {
        "level": "loud", "status": "success"}
    # B: 500 {"error": "<nlohmann text>"}; ours: 400 with the same string shape (server.md).
    for body in ({}, {"level": 3}):
        reply = requests.post(server.api + "/log-level", json=body)
        assert reply.status_code == 400 and reply.json() == {"error": "'level' must be a string"}


def test_params_stub_ignores_body(server):
    for data in (b"", b"not json", b'{"temperature": 0.1}'):
        reply = requests.post(server.api + "/params", data=data)
        assert reply.status_code == 200 and reply.content == b'{"status":"success"}'


def test_debug_route_v1_only(server):
    reply = requests.post(server.url + "/api/v1/test")
    assert reply.status_code == 200 and reply.content == b'{"test": "ok"}'
    assert requests.post(server.url + "/api/v0/test").status_code == 404
    assert requests.get(server.url + "/api/v1/test").status_code == 404


def test_responses_without_model_and_nothing_loaded(server):
    reply = requests.post(server.api + "/responses", json={"input": "hi"})
    assert reply.status_code == 400
    assert reply.json() == {"error": "No model loaded and no model specified in request"}


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions", "embeddings", "reranking"])
def test_no_model_and_nothing_loaded(server, endpoint):
    reply = requests.post(f"{server.api}/{endpoint}", json={"messages": [], "input": "x"})
    assert reply.status_code == 400
    assert reply.text == '{"error":"No model loaded and no model specified in request"}'


def test_unknown_model_on_inference(server):
    for endpoint in ("chat/completions", "completions"):
        reply = requests.post(f"{server.api}/{endpoint}", json={"model": "nope", "prompt": "x"})
        assert reply.status_code == 404
        assert reply.json() == not_found(f"/api/v1/{endpoint}", "Model not found: nope")
    for endpoint in ("embeddings", "reranking", "responses"):
        # B: 500 {"error":"Model not found: nope"}; ours keeps the string shape, with 404.
        reply = requests.post(f"{server.api}/{endpoint}", json={"model": "nope", "input": "x"})
        assert reply.status_code == 404 and reply.json() == {"error": "Model not found: nope"}
    assert not server.llama_processes()


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("endpoint", POST_ENDPOINTS)
def test_get_on_post_route_is_405(server, prefix, endpoint):
    reply = requests.get(f"{server.url}{prefix}/{endpoint}")
    assert reply.status_code == 405 and reply.content == METHOD_NOT_ALLOWED
    assert reply.headers["Content-Type"] == "application/json"
    assert_cors(reply.headers)
    head = raw_request(server.port, request_bytes("HEAD", f"{prefix}/{endpoint}"), method="HEAD")
    assert head.status == 405 and head.body == b""


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_404(server, method):
    for path in ("/api/v1/load", "/api/v1/health", "/api/v0/models"):
        reply = requests.request(method, server.url + path, data=b'{"a":1}')
        assert reply.status_code == 404 and reply.json() == not_found(path)
        assert_cors(reply.headers)


@pytest.mark.parametrize("path", ["/v2/models", "/api/v2/health", "/api/v1/healthz", "/api/v1/",
                                  "/api/v1/halt", "/api/v1/logs/ws", "/api/v1/migration/cleanup",
                                  "/internal/shutdown", "/webapp"])
def test_unknown_routes(server, path):
    reply = requests.get(server.url + path)
    assert reply.status_code == 404
    assert reply.content == compact(not_found(path))
    assert_cors(reply.headers)


def test_options_anywhere(server):
    for path in ("/api/v1/chat/completions", "/nowhere", "/static/x", "/"):
        reply = requests.options(server.url + path, data=b"ignored body")
        assert reply.status_code == 204 and reply.content == b""
        assert reply.headers["Content-Length"] == "0"
        assert_cors(reply.headers)


def test_percent_encoded_route(server):
    """httplib decodes the path before matching, so encoded letters reach the same route."""
    reply = requests.get(server.url + "/api/v1/%68ealth")
    assert reply.status_code == 200 and reply.json()["status"] == "ok"


def test_keep_alive_serves_many_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        sockets = set()
        for i in range(20):
            path, method = [("/api/v1/health", "GET"), ("/api/v1/nope", "GET"), ("/api/v1/load", "GET"),
                            ("/api/v1/params", "POST"), ("/x", "OPTIONS")][i % 5]
            conn.request(method, path, body=b"{}" if method == "POST" else None)
            response = conn.getresponse()
            response.read()
            assert response.status in (200, 204, 404, 405)
            sockets.add(id(conn.sock))
        assert len(sockets) == 1  # one connection all along
    finally:
        conn.close()


def test_request_log_lines(server):
    requests.get(server.api + "/health")
    requests.get(server.api + "/no-such-route")
    # An access line is written after its answer, by the thread that served it: await both.
    lines = ("[Server] GET /api/v1/no-such-route - 404", "[Server] GET /api/v1/health - 200")
    wait_for(lambda: all(line in server.log_text() for line in lines), 10, what="the request log lines")
    assert "[Server PRE-ROUTE] GET /api/v1/health" in server.log_text()  # debug level


def test_every_error_is_json_with_cors(server):
    cases = [("GET", "/api/v1/nope", None), ("POST", "/api/v1/load", b"[]"), ("POST", "/api/v1/pull", b"{"),
             ("POST", "/api/v1/chat/completions", b'{"model": 5}'), ("GET", "/api/v1/models/x", None),
             ("POST", "/api/v1/delete", b'{"model": "nope"}'), ("POST", "/api/v1/add-local-model", b"x")]
    for method, path, body in cases:
        reply = requests.request(method, server.url + path, data=body)
        assert reply.status_code >= 400 and reply.headers["Content-Type"] == "application/json"
        assert "error" in reply.json(), (path, reply.text)
        assert_cors(reply.headers)

