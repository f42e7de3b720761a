"""HTTP rules with no model loaded: shapes, routing, CORS, error bodies (spec http-api.md, B).

One router for the module, seeded with `Qwen3-0.6B-GGUF` (hub layout); no test here loads a model.
"""
from __future__ import annotations

import json

import pytest
import requests

from .harness import CHECKPOINT, MODEL

pytestmark = pytest.mark.timeout(300)

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization",
}
POST_ENDPOINTS = ["chat/completions", "completions", "embeddings", "reranking", "responses", "pull", "load",
                  "unload", "delete", "params", "log-level"]
GENERIC_404 = "The requested endpoint does not exist"


def assert_cors(response: requests.Response) -> None:
    for key, value in CORS.items():
        assert response.headers.get(key) == value, (key, dict(response.headers))


def error_text(response: requests.Response) -> str:
    """The message of an error body: `{"error": "msg"}` (C++ management endpoints) or an error object."""
    error = response.json()["error"]
    return error.get("message", "") if isinstance(error, dict) else error


def assert_generic_404(response: requests.Response, path: str) -> None:
    assert response.status_code == 404
    assert response.json() == {"error": {"message": GENERIC_404, "path": path, "type": "not_found"}}


# -- status endpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/api/v0", "/api/v1"])
def test_health_shape_with_nothing_loaded(router, prefix, is_cpp):
    r = requests.get(router.url + prefix + "/health", timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    ga = {"checkpoint_loaded": None, "context_size": 4096,
          "log_streaming": {"sse": True, "websocket": False}, "model_loaded": None, "status": "ok"}
    body = r.json()
    assert {key: body.get(key) for key in ga} == ga  # a GA client reads the same answer
    if not is_cpp:  # ours adds HEAD's multi-model keys (CMake-parity-docs/router.md)
        assert body["all_models_loaded"] == [] and body["max_models"]["llm"] == 1
    assert_cors(r)


@pytest.mark.parametrize("path", ["health", "models", "stats", "system-info"])
def test_head_shortcut_is_empty_200(router, path):
    r = requests.head(f"{router.api}/{path}", timeout=10)
    assert r.status_code == 200 and r.content == b""


def test_models_lists_the_seeded_model(router):
    r = requests.get(router.api + "/models", timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == sorted(ids)
    (entry,) = [m for m in body["data"] if m["id"] == MODEL]
    assert entry == {"checkpoint": CHECKPOINT, "created": 1234567890, "id": MODEL, "object": "model",
                     "owned_by": "lemonade", "recipe": "llamacpp"}
    for m in body["data"]:
        assert set(m) == {"checkpoint", "created", "id", "object", "owned_by", "recipe"}


def test_models_show_all(router):
    r = requests.get(router.api + "/models", params={"show_all": "true"}, timeout=30)
    assert r.status_code == 200
    data = r.json()["data"]
    ids = [m["id"] for m in data]
    assert ids == sorted(ids) and len(data) > 10
    by_id = {m["id"]: m for m in data}
    assert by_id[MODEL] == {"checkpoint": CHECKPOINT, "created": 1234567890, "id": MODEL, "object": "model",
                            "owned_by": "lemonade", "recipe": "llamacpp", "name": MODEL, "downloaded": True,
                            "labels": ["reasoning"]}
    for m in data:
        assert set(m) == {"checkpoint", "created", "id", "object", "owned_by", "recipe", "name", "downloaded",
                          "labels"}
        assert m["name"] == m["id"] and isinstance(m["downloaded"], bool)
    assert by_id["Qwen3-8B-GGUF"]["downloaded"] is False
    assert not any(m["recipe"].startswith(("oga-", "flm", "ryzenai")) for m in data)  # Linux filter


@pytest.mark.differs_from_cpp("ours adds the OpenAI model object's `object`, `created` and `owned_by` "
                              "(HEAD §3.12), which the openai client's models.retrieve reads")
def test_model_by_id(router, is_cpp):
    r = requests.get(f"{router.api}/models/{MODEL}", timeout=10)
    assert r.status_code == 200
    expected = {"checkpoint": CHECKPOINT, "id": MODEL, "name": MODEL, "recipe": "llamacpp"}
    if not is_cpp:
        expected.update(object="model", created=1234567890, owned_by="lemonade")
    assert r.json() == expected


@pytest.mark.differs_from_cpp("a handler 404 names its cause; C++ replaces every 404 body with the generic one")
def test_model_by_id_unknown(router, is_cpp):
    path = "/api/v1/models/No-Such-Model"
    r = requests.get(router.url + path, timeout=10)
    assert r.status_code == 404
    error = r.json()["error"]
    if is_cpp:
        assert error == {"message": GENERIC_404, "path": path, "type": "not_found"}
    else:
        assert error["type"] == "not_found" and error["path"] == path and "No-Such-Model" in error["message"]
    assert_cors(r)


def test_stats_with_nothing_loaded(router):
    r = requests.get(router.api + "/stats", timeout=10)
    assert r.status_code == 200
    assert r.json() == {"error": {"message": "No model loaded", "type": "model_not_loaded"}}


@pytest.mark.parametrize("query", ["", "?verbose=true"])
def test_system_info_keys(router, query):
    r = requests.get(router.api + "/system-info" + query, timeout=60)
    assert r.status_code == 200
    body = r.json()
    expected = {"OS Version", "Processor", "Physical Memory", "devices"}
    if query:
        expected.add("Python Packages")
        assert body["Python Packages"] == ["not-applicable"]
    assert set(body) == expected
    assert set(body["devices"]) == {"cpu", "amd_igpu", "amd_dgpu", "nvidia_dgpu", "npu"}
    assert isinstance(body["devices"]["amd_dgpu"], list) and isinstance(body["devices"]["nvidia_dgpu"], list)
    assert {"name", "cores", "threads", "available", "inference_engines"} <= set(body["devices"]["cpu"])


# -- routing rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/health", "/api/v1/nope", "/anything/at/all", "/api/v1/load"])
def test_options_is_204_empty_with_cors(router, path):
    r = requests.options(router.url + path, data=b"ignored", timeout=10)
    assert r.status_code == 204 and r.content == b""
    assert_cors(r)


@pytest.mark.parametrize("endpoint", POST_ENDPOINTS)
def test_get_on_post_endpoint_is_405(router, endpoint):
    for prefix in ("/api/v0/", "/api/v1/"):
        r = requests.get(router.url + prefix + endpoint, timeout=10)
        assert r.status_code == 405, endpoint
        assert r.json() == {"error": "Method Not Allowed. Use POST for this endpoint"}
        assert_cors(r)
        head = requests.head(router.url + prefix + endpoint, timeout=10)
        assert head.status_code == 405 and head.content == b""


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_other_methods_are_generic_404(router, method):
    r = requests.request(method, router.api + "/health", timeout=10)
    assert_generic_404(r, "/api/v1/health")
    assert_cors(r)


@pytest.mark.parametrize("path", ["/api/v1/nope", "/v2/chat/completions", "/api/v2/health", "/api/v1/halt",
                                  "/api/v0/test"])
def test_unknown_route_is_generic_404(router, path):
    r = requests.get(router.url + path, timeout=10)
    assert_generic_404(r, path)
    assert_cors(r)


@pytest.mark.differs_from_cpp("lemonade HEAD's /v0 and /v1 prefixes: clients written for HEAD use /v1")
def test_v1_prefix_serves_the_openai_routes(router, is_cpp):
    models = requests.get(router.url + "/v1/models", timeout=30)
    chat = requests.get(router.url + "/v1/chat/completions", timeout=10)
    if is_cpp:
        assert_generic_404(models, "/v1/models")
        assert_generic_404(chat, "/v1/chat/completions")
    else:
        assert models.status_code == 200
        assert models.json() == requests.get(router.api + "/models", timeout=30).json()
        assert chat.status_code == 405  # a POST route, as under /api/v1
        assert chat.json() == {"error": "Method Not Allowed. Use POST for this endpoint"}
    assert_cors(models)


@pytest.mark.differs_from_cpp("a page of another origin may not drive the server (lemonade HEAD's origin check)")
def test_foreign_origin(router, is_cpp):
    origin = {"Origin": "https://evil.example"}
    health = requests.get(router.api + "/health", headers=origin, timeout=10)
    delete = requests.post(router.api + "/delete", data=b'{"model": "No-Such-Model"}', timeout=10,
                           headers={**origin, "Content-Type": "text/plain"})
    if is_cpp:
        assert health.status_code == 200 and health.headers["Access-Control-Allow-Origin"] == "*"
        assert delete.status_code == 422  # the delete ran; only the unknown name saved the model
    else:
        assert health.status_code == 403 and health.json() == {"error": "Origin not allowed"}
        assert delete.status_code == 403
        assert "Access-Control-Allow-Origin" not in health.headers
    local = requests.get(router.api + "/health", headers={"Origin": "http://localhost:5173"}, timeout=10)
    assert local.status_code == 200
    assert local.headers["Access-Control-Allow-Origin"] == ("*" if is_cpp else "http://localhost:5173")


def test_unknown_route_head_is_404_without_body(router):
    r = requests.head(router.api + "/nope", timeout=10)
    assert r.status_code == 404 and r.content == b""


def test_debug_test_route(router):
    r = requests.post(router.api + "/test", timeout=10)
    assert r.status_code == 200 and r.json() == {"test": "ok"}


def test_root_redirects_to_webapp(router):
    r = requests.get(router.url + "/", allow_redirects=False, timeout=10)
    assert r.status_code == 302 and r.headers["Location"] == "/webapp.html"


def test_webapp_is_templated(router):
    r = requests.get(router.url + "/webapp.html", timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "{{SERVER_MODELS_JS}}" not in r.text and "window.SERVER_MODELS" in r.text
    assert "window.PLATFORM = 'Linux'" in r.text
    assert r.headers["Cache-Control"] == "no-cache, no-store, must-revalidate"
    assert_cors(r)


# -- management endpoints: errors without network --------------------------------------------------


def test_params_stub(router):
    r = requests.post(router.api + "/params", data=b"not even json", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "success"}


def test_unload_with_nothing_loaded(router):
    r = requests.post(router.api + "/unload", timeout=60)
    assert r.status_code == 200
    assert r.json() == {"message": "Model unloaded successfully", "status": "success"}


def test_log_level_echo(router):
    r = requests.post(router.api + "/log-level", json={"level": "debug"}, timeout=10)
    assert r.status_code == 200 and r.json() == {"level": "debug", "status": "success"}


def test_delete_unknown_model_is_422(router):
    r = requests.post(router.api + "/delete", json={"model": "No-Such-Model"}, timeout=30)
    assert r.status_code == 422
    assert r.json() == {"error": "Model not found: No-Such-Model"}
    r = requests.post(router.api + "/delete", json={"model_name": "user.Nothing"}, timeout=30)
    assert r.status_code == 422 and r.json() == {"error": "Model not found: user.Nothing"}


@pytest.mark.differs_from_cpp("deleting a registry model that was never downloaded deletes nothing; C++ "
                              "answers success (`Deleted model: …`), ours 422 saying nothing was there")
def test_delete_never_downloaded(router, is_cpp):
    r = requests.post(router.api + "/delete", json={"model": "Qwen3-8B-GGUF"}, timeout=30)
    if is_cpp:
        assert r.status_code == 200 and r.json()["status"] == "success"
    else:
        assert r.status_code == 422
        assert r.json() == {"error": "Model Qwen3-8B-GGUF is not downloaded: nothing to delete"}


PULL_ERRORS = [
    ({"model": "Not-Registered", "checkpoint": "org/Some-GGUF:Q4_0", "recipe": "llamacpp"},
     "When registering a new model, the model name must include the `user` namespace, for example "
     "`user.Phi-4-Mini-GGUF`. Received: Not-Registered"),
    ({"model_name": "user.Unknown"},
     "Model user.Unknown is not registered with Lemonade Server. To register and install it, provide the "
     "`checkpoint` and `recipe` arguments, as well as the optional `reasoning` and `mmproj` arguments as "
     "appropriate."),
    ({"model": "user.Nothing", "checkpoint": "org/Some-GGUF", "recipe": "llamacpp"},
     "You are required to provide a 'variant' in the checkpoint field when registering a GGUF model. The "
     "variant is provided as CHECKPOINT:VARIANT. For example: Qwen/Qwen2.5-Coder-3B-Instruct-GGUF:Q4_0 or "
     "Qwen/Qwen2.5-Coder-3B-Instruct-GGUF:qwen2.5-coder-3b-instruct-q4_0.gguf"),
]


@pytest.mark.differs_from_cpp("pull validation errors are client errors (400); C++ answers 500, with the "
                              "same body {\"error\": msg}")
@pytest.mark.parametrize("body,message", PULL_ERRORS, ids=["no-user-prefix", "user-without-checkpoint",
                                                           "gguf-without-variant"])
def test_pull_validation(router, is_cpp, body, message):
    r = requests.post(router.api + "/pull", json=body, timeout=60)
    assert r.status_code == (500 if is_cpp else 400)
    assert r.json() == {"error": message}
    assert not list(router.home.rglob("user_models.json"))  # nothing was registered


@pytest.mark.differs_from_cpp("a pull of a name the registry lacks, given without a checkpoint, names the "
                              "closest registry names; C++ answers with its `user` namespace rule (and 500)")
def test_pull_unknown_name(router, is_cpp):
    r = requests.post(router.api + "/pull", json={"model": "Not-Registered"}, timeout=60)
    if is_cpp:
        assert r.status_code == 500 and "`user` namespace" in r.json()["error"]
    else:
        assert r.status_code == 400
        assert r.json()["error"].startswith("Unknown model: Not-Registered. Did you mean ")
    assert not list(router.home.rglob("user_models.json"))


@pytest.mark.differs_from_cpp("invalid JSON is a client error (400 with an error object); C++ answers 500 "
                              "with nlohmann's exception text")
@pytest.mark.parametrize("endpoint", ["chat/completions", "load", "pull", "delete"])
def test_invalid_json(router, is_cpp, endpoint):
    r = requests.post(f"{router.api}/{endpoint}", data=b"{not json", timeout=30,
                      headers={"Content-Type": "application/json"})
    if is_cpp:
        assert r.status_code == 500 and "parse_error" in r.json()["error"]
    else:
        assert r.status_code == 400
        assert error_text(r)
    assert_cors(r)


def test_chat_without_model_and_nothing_loaded_is_400(router):
    r = requests.post(router.api + "/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    assert r.json() == {"error": "No model loaded and no model specified in request"}


@pytest.mark.differs_from_cpp("unknown model on chat: 404 whose message names the model; C++ sends the "
                              "generic 'endpoint does not exist' body")
@pytest.mark.parametrize("stream", [False, True])
def test_chat_unknown_model_is_404(router, is_cpp, stream):
    path = "/api/v1/chat/completions"
    r = requests.post(router.url + path, timeout=30, json={
        "model": "No-Such-Model", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    error = r.json()["error"]
    if is_cpp:
        assert error == {"message": GENERIC_404, "path": path, "type": "not_found"}
    else:
        assert "No-Such-Model" in error["message"] and error["type"] == "not_found"
    assert_cors(r)


@pytest.mark.differs_from_cpp("load of an unknown model is 404 (not found); C++ answers 500 "
                              "{\"error\": \"Model not found: X\"}")
def test_load_unknown_model(router, is_cpp):
    r = requests.post(router.api + "/load", json={"model_name": "No-Such-Model"}, timeout=60)
    if is_cpp:
        assert r.status_code == 500 and r.json() == {"error": "Model not found: No-Such-Model"}
    else:
        assert r.status_code == 404
        assert error_text(r) == "Model not found: No-Such-Model"
    assert requests.get(router.api + "/health", timeout=10).json()["model_loaded"] is None


def test_v0_and_v1_answer_alike(router):
    for path in ("/health", "/models", "/models?show_all=true", f"/models/{MODEL}", "/stats"):
        v0 = requests.get(router.url + "/api/v0" + path, timeout=30)
        v1 = requests.get(router.url + "/api/v1" + path, timeout=30)
        assert (v0.status_code, v0.json()) == (v1.status_code, v1.json()), path


def test_json_bodies_are_compact_with_sorted_keys(router):
    raw = requests.get(router.api + "/health", timeout=10).content
    parsed = json.loads(raw)
    assert raw == json.dumps(parsed, separators=(",", ":"), sort_keys=True).encode()
