"""Model management routes on a real server (spec http-api §4.9-§4.13, §4.19): load, unload, pull,
delete, params, and `/internal/shutdown`; plus the real cause of an auto-load failure, which B hides
behind a generic 404 (CMake-parity-docs/server.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from api_support import (DEFAULT_MODEL, GEMMA_CHECKPOINT, HELLO, compact, not_found, raw_request,
                         request_bytes, running_server, wait_for)

USER_MODELS = {
    "Gone": {"checkpoint": "nobody/missing-GGUF:missing.gguf", "recipe": "llamacpp", "labels": ["custom"]},
    "Doomed": {"checkpoint": "nobody/doomed-GGUF:doomed.gguf", "recipe": "llamacpp", "labels": ["custom"]},
}
TIMEOUT = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("models"), seeded_hub_cache, user_models=USER_MODELS) as s:
        yield s


def post(server, route: str, body=None, data: bytes | None = None) -> requests.Response:
    return requests.post(f"{server.api}/{route}", json=body, data=data, timeout=TIMEOUT)


def test_load_and_already_loaded(server):
    reply = post(server, "load", {"model_name": DEFAULT_MODEL, "ctx_size": 99, "mmproj": "ignored"})
    assert reply.status_code == 200
    assert reply.content == compact({"checkpoint": GEMMA_CHECKPOINT, "model_name": DEFAULT_MODEL,
                                     "recipe": "llamacpp", "status": "success"})
    assert len(server.llama_processes()) == 1
    reply = post(server, "load", {"model_name": DEFAULT_MODEL})
    assert reply.content == compact({"checkpoint": GEMMA_CHECKPOINT, "message": "Model already loaded",
                                     "model_name": DEFAULT_MODEL, "recipe": "llamacpp", "status": "success"})
    assert requests.get(server.api + "/health").json()["model_loaded"] == DEFAULT_MODEL


@pytest.mark.parametrize("body,status,message", [
    ({}, 400, "'model_name' is required"),
    ({"model": DEFAULT_MODEL}, 400, "'model_name' is required"),  # B reads model_name only (§4.10)
    ({"model_name": 7}, 400, "'model_name' must be a string, got number"),
    ({"model_name": "no-such-model"}, 404, "Model not found: no-such-model"),
])
def test_load_errors_keep_bs_string_shape(server, body, status, message):
    reply = post(server, "load", body)
    assert reply.status_code == status and reply.json() == {"error": message}


OFFLINE_GONE = ("Model user.Gone is not downloaded, and offline mode (HF_HUB_OFFLINE=1) forbids downloading it. "
                "Missing: missing.gguf")


def test_auto_load_failure_names_the_real_cause(server):
    """A registered model whose file is not in the cache, offline. B answers chat with the generic 404
    "endpoint does not exist" (and GA ignores the offline flag); we say what went wrong."""
    reply = post(server, "chat/completions", {"model": "user.Gone", "messages": HELLO})
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == OFFLINE_GONE and reply.json()["error"]["type"] == "offline"
    reply = post(server, "load", {"model_name": "user.Gone"})
    assert reply.status_code == 400
    assert reply.json() == {"error": OFFLINE_GONE}
    # The evicted model is gone (the load replaced it before failing), and nothing was left running.
    assert requests.get(server.api + "/health").json()["model_loaded"] in (None, DEFAULT_MODEL)


def test_unload_all_or_one(server):
    """GA ignores the body (unload all); HEAD reads an optional model name (head-llm-surface.md §3.6)."""
    post(server, "load", {"model_name": DEFAULT_MODEL})
    expected = b'{"message":"Model unloaded successfully","status":"success"}'
    for data in (b"", b"not json at all", b"{}"):
        reply = post(server, "unload", data=data)
        assert reply.status_code == 200 and reply.content == expected
        wait_for(lambda: not server.llama_processes(), 15, what="llama-server to stop")
    reply = post(server, "unload", data=b'{"model_name": "whatever"}')
    assert reply.status_code == 404 and reply.content == b'{"error":"Model not loaded: whatever"}'
    post(server, "load", {"model_name": DEFAULT_MODEL})
    reply = post(server, "unload", data=b'{"model_name": "%s:latest"}' % DEFAULT_MODEL.encode())
    assert reply.status_code == 200
    assert reply.json() == {"message": "Model unloaded successfully", "model_name": DEFAULT_MODEL,
                            "status": "success"}
    wait_for(lambda: not server.llama_processes(), 15, what="llama-server to stop")
    health = requests.get(server.api + "/health").json()
    assert health["model_loaded"] is None and health["checkpoint_loaded"] is None
    assert requests.get(server.api + "/stats").json()["error"]["type"] == "model_not_loaded"


def test_pull_downloaded_model_without_network(server):
    for key in ("model", "model_name"):
        reply = post(server, "pull", {key: DEFAULT_MODEL, "do_not_upgrade": True})
        assert reply.status_code == 200
        assert reply.content == compact({"model_name": DEFAULT_MODEL, "status": "success"})
    # `model` wins over `model_name` (§4.9).
    reply = post(server, "pull", {"model": DEFAULT_MODEL, "model_name": "ignored", "do_not_upgrade": True})
    assert reply.json()["model_name"] == DEFAULT_MODEL


def test_pull_streaming_events(server):
    reply = requests.post(server.api + "/pull", json={"model": DEFAULT_MODEL, "stream": True}, timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "text/event-stream"
    assert reply.content.rstrip().endswith(b'event: complete\ndata: {"model_name":"' + DEFAULT_MODEL.encode()
                                           + b'","status":"success"}')
    bad = requests.post(server.api + "/pull", json={"model": "nope", "stream": True}, timeout=TIMEOUT)
    assert b"event: error" in bad.content and b"Unknown model: nope. Did you mean " in bad.content


@pytest.mark.parametrize("body,message", [
    ({}, "'model' or 'model_name' is required"),
    ({"model": 5}, "'model' or 'model_name' is required"),
    ({"model": "Phi-Unknown", "checkpoint": "org/Phi-GGUF:Q4_0"}, "When registering a new model, the model name must include the `user` namespace, "
                               "for example `user.Phi-4-Mini-GGUF`. Received: Phi-Unknown"),
    ({"model": "user.New"}, "Model user.New is not registered with Lemonade Server. To register and install it, "
                            "provide the `checkpoint` and `recipe` arguments, as well as the optional "
                            "`reasoning` and `mmproj` arguments as appropriate."),
    ({"model": "user.New", "checkpoint": "org/Thing-GGUF", "recipe": "llamacpp"},
     "You are required to provide a 'variant' in the checkpoint field when registering a GGUF model. "
     "The variant is provided as CHECKPOINT:VARIANT. For example: Qwen/Qwen2.5-Coder-3B-Instruct-GGUF:Q4_0 or "
     "Qwen/Qwen2.5-Coder-3B-Instruct-GGUF:qwen2.5-coder-3b-instruct-q4_0.gguf"),
    ({"model": "user.New", "checkpoint": 3}, "'checkpoint' must be a string, got number"),
    ({"model": "user.New", "reasoning": "yes"}, "'reasoning' must be a boolean, got string"),
])
def test_pull_validation(server, body, message):
    """B's messages; B sends them with 500, we with 400 (server.md)."""
    reply = post(server, "pull", body)
    assert reply.status_code == 400 and reply.json() == {"error": message}


def test_delete(server):
    reply = post(server, "delete", {"model": "no-such-model"})
    assert reply.status_code == 422 and reply.content == b'{"error":"Model not found: no-such-model"}'
    reply = post(server, "delete", {"model_name": "user.Doomed"})
    assert reply.status_code == 200
    assert reply.content == b'{"message":"Deleted model: user.Doomed","status":"success"}'
    assert requests.get(server.api + "/models/user.Doomed").status_code == 404
    registry = json.loads((Path(server.env["LEMONADE_CACHE_DIR"]) / "user_models.json").read_text())
    assert "Doomed" not in registry and "Gone" in registry
    assert post(server, "delete", {}).json() == {"error": "'model' or 'model_name' is required"}


def test_params_stub(server):
    assert post(server, "params", {"temperature": 2}).content == b'{"status":"success"}'


def test_shutdown_stops_server_and_backend(tmp_path, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path, seeded_hub_cache) as server:
        post(server, "load", {"model_name": DEFAULT_MODEL})
        assert len(server.llama_processes()) == 1
        assert requests.get(server.url + "/internal/shutdown").json() == not_found("/internal/shutdown")
        reply = raw_request(server.port, request_bytes("POST", "/internal/shutdown", b"{}"), method="POST")
        assert reply.status == 200 and reply.body == b'{"status":"shutting down"}'
        assert reply.getheader("Connection") == "close"
        assert server.proc.wait(timeout=60) == 0
        wait_for(lambda: not server.llama_processes(), 15, what="llama-server to exit with the server")
