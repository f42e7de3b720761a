"""Inference routes against the real llama-server and the real gemma GGUF: chat/completions,
completions, embeddings, reranking (+ `rerank`), responses, and the telemetry they feed to `/stats`
(spec http-api §4.4-§4.8, §5, §6).

One server for the module; tests run in file order so the model switches stay few:
embedded gemma (chat) → `user.GemmaRerank` (`--reranking`) → `user.GemmaEmbed` (`--embeddings`).
A second server with `--llamacpp-args "--pooling mean"` serves real embedding vectors.
"""
from __future__ import annotations

import json

import openai
import pytest
import requests

from api_support import (DEFAULT_MODEL, GEMMA_CHECKPOINT, HELLO, assert_cors, backend_cmdline, compact,
                         running_server, sse_frames)

EMBED, RERANK = "user.GemmaEmbed", "user.GemmaRerank"
USER_MODELS = {
    "GemmaEmbed": {"checkpoint": GEMMA_CHECKPOINT, "recipe": "llamacpp", "labels": ["custom", "embeddings"]},
    "GemmaRerank": {"checkpoint": GEMMA_CHECKPOINT, "recipe": "llamacpp", "labels": ["custom", "reranking"]},
}
TIMEOUT = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("inference"), seeded_hub_cache, user_models=USER_MODELS) as s:
        yield s


def chat(server, **fields) -> requests.Response:
    body = {"model": DEFAULT_MODEL, "messages": HELLO, "max_tokens": 8, **fields}
    return requests.post(server.api + "/chat/completions", json=body, timeout=TIMEOUT, stream=fields.get("stream", False))


def expected_stats(frame: dict, prompt_tokens: int) -> dict:
    """What B's telemetry makes of a llama.cpp response or last stream frame (§6)."""
    timings = frame["timings"]
    return {"decode_token_times": [], "input_tokens": timings["prompt_n"], "output_tokens": timings["predicted_n"],
            "prompt_tokens": prompt_tokens, "time_to_first_token": timings["prompt_ms"] / 1000.0,
            "tokens_per_second": timings["predicted_per_second"]}


# -- chat and completions on the embedded model --------------------------------------------------------

def test_chat_non_streaming_shape(server):
    reply = chat(server)
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "application/json"
    assert_cors(reply.headers)
    body = reply.json()
    assert reply.content == compact(body)  # re-serialized: compact, keys sorted (§0)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["usage"]["completion_tokens"] > 0 and "timings" in body
    health = requests.get(server.api + "/health").json()
    assert health["model_loaded"] == DEFAULT_MODEL and health["checkpoint_loaded"] == GEMMA_CHECKPOINT
    assert len(server.llama_processes()) == 1


def test_stats_from_non_streaming(server):
    body = chat(server, max_tokens=6).json()
    stats = requests.get(server.api + "/stats").json()
    assert stats == expected_stats(body, body["usage"]["prompt_tokens"])
    assert stats["output_tokens"] > 0 and stats["tokens_per_second"] > 0 and stats["time_to_first_token"] > 0


def test_chat_streaming_headers_and_frames(server):
    before = requests.get(server.api + "/stats").json()
    reply = chat(server, stream=True, max_tokens=10)
    assert reply.status_code == 200
    for key, value in {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                       "X-Accel-Buffering": "no", "Transfer-Encoding": "chunked"}.items():
        assert reply.headers[key] == value
    assert_cors(reply.headers)
    raw = reply.raw.read()  # the bytes as relayed; llama-server's own framing, untouched
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"[DONE]") == 1
    frames = [json.loads(f) for f in sse_frames(raw)[:-1]]
    assert all(f["object"] == "chat.completion.chunk" for f in frames)
    assert b" " in raw.split(b"\n", 1)[0]  # llama-server's spacing survives (not re-serialized)
    last = next(f for f in reversed(frames) if "timings" in f or "usage" in f)
    # Streaming updates every figure but prompt_tokens (B §6).
    assert requests.get(server.api + "/stats").json() == expected_stats(last, before["prompt_tokens"])


def test_completions(server):
    reply = requests.post(server.api + "/completions", timeout=TIMEOUT,
                          json={"model": DEFAULT_MODEL, "prompt": "The lemon tree", "max_tokens": 6})
    assert reply.status_code == 200 and reply.content == compact(reply.json())
    body = reply.json()
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    assert requests.get(server.api + "/stats").json() == expected_stats(body, body["usage"]["prompt_tokens"])
    stream = requests.post(server.api + "/completions", timeout=TIMEOUT, stream=True,
                           json={"model": DEFAULT_MODEL, "prompt": "Once", "max_tokens": 6, "stream": True})
    raw = stream.raw.read()
    assert stream.status_code == 200 and raw.endswith(b"data: [DONE]\n\n")


def test_openai_client(server):
    client = openai.OpenAI(base_url=server.api, api_key="unused", timeout=TIMEOUT)
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=HELLO, max_tokens=6)
    assert reply.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model=DEFAULT_MODEL, messages=HELLO, max_tokens=6, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
    models = client.models.list()
    assert DEFAULT_MODEL in [m.id for m in models.data]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO)


def test_unknown_fields_pass_through(server):
    reply = chat(server, max_tokens=2, frobnicate={"deep": [1, 2, {"x": None}]}, another_unknown="yes")
    assert reply.status_code == 200 and reply.json()["object"] == "chat.completion"


def test_no_model_uses_loaded_one(server):
    reply = requests.post(server.api + "/chat/completions", timeout=TIMEOUT,
                          json={"messages": HELLO, "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["choices"]


def test_messages_reach_the_embedded_model(server):
    """The embedded model's chat template renders the messages (a template name after `--jinja` would
    be taken as literal Jinja and every prompt would be the same few tokens)."""
    short = chat(server, max_tokens=1, messages=[{"role": "user", "content": "Hi."}]).json()["timings"]
    long = chat(server, max_tokens=1, messages=[{"role": "user", "content": "Hi. " * 40}]).json()["timings"]
    assert long["cache_n"] + long["prompt_n"] > short["cache_n"] + short["prompt_n"] + 30


@pytest.mark.parametrize("stream", [False, True])
def test_backend_400_keeps_status_and_reason(server, stream):
    """B answers 200 with a wrapper that says only "llama-server request failed" (chat) or a broken
    stream; we keep llama-server's status and put its reason in `message` (HEAD's wrapper)."""
    reply = chat(server, max_tokens="many", stream=stream)
    assert reply.status_code == 400
    body = reply.json()
    assert reply.content == compact(body)
    assert "max_tokens" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["status_code"] == 400
    details = body["error"]["details"]
    assert details["backend"] == "llama-server"
    assert details["status_code"] == 400
    assert details["response"]["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in details["response"]["error"]["message"]


def test_backend_400_on_completions(server):
    reply = requests.post(server.api + "/completions", json={"model": DEFAULT_MODEL, "max_tokens": 2}, timeout=TIMEOUT)
    assert reply.status_code == 400
    assert reply.json()["error"]["details"]["response"]["error"]["message"].endswith("key 'prompt' not found")


@pytest.mark.parametrize("field,value,message", [
    ("model", 5, "'model' must be a string, got number"),
    ("stream", "yes", "'stream' must be a boolean, got string"),
    ("messages", "hi", "'messages' must be an array, got string"),
    ("messages", [1, 2], "'messages' must be an array of objects"),
])
def test_wrong_types_rejected_before_the_backend(server, field, value, message):
    body = {"model": DEFAULT_MODEL, "messages": HELLO, "max_tokens": 1, field: value}
    reply = requests.post(server.api + "/chat/completions", json=body, timeout=TIMEOUT)
    assert reply.status_code == 400
    assert reply.json() == {"error": {"message": message, "type": "invalid_request"}}


def test_null_model_and_stream_count_as_absent(server):
    reply = requests.post(server.api + "/chat/completions", timeout=TIMEOUT,
                          json={"model": None, "stream": None, "messages": HELLO, "max_tokens": 1})
    assert reply.status_code == 200


def test_responses_loads_then_422(server):
    for model in (DEFAULT_MODEL, None):
        body = {"input": "hi"} | ({"model": model} if model else {})
        reply = requests.post(server.api + "/responses", json=body, timeout=TIMEOUT)
        assert reply.status_code == 422
        assert reply.content == compact({"error": {
            "code": "responses_not_supported", "message": "Responses API not supported for recipe: llamacpp",
            "type": "unsupported_recipe"}})


# -- embeddings and reranking ---------------------------------------------------------------------------

def test_reranking_on_model_without_label(server):
    """llama-server started without `--reranking` refuses with 501; the client gets 400 (no SDK retries
    it), with llama-server's status kept in `status_code` and its answer in `details`."""
    reply = requests.post(server.api + "/reranking", json={"model": DEFAULT_MODEL, "query": "q", "documents": ["d"]},
                          timeout=TIMEOUT)
    assert reply.status_code == 400 and reply.json()["error"]["status_code"] == 501
    response = reply.json()["error"]["details"]["response"]
    assert response["error"]["type"] == "not_supported_error"
    assert "--reranking" in response["error"]["message"]


def test_embeddings_on_model_without_label(server):
    reply = requests.post(server.api + "/embeddings", json={"model": DEFAULT_MODEL, "input": "hello"}, timeout=TIMEOUT)
    assert reply.status_code == 400 and reply.json()["error"]["status_code"] == 501
    response = reply.json()["error"]["details"]["response"]
    assert response["error"]["type"] == "not_supported_error"
    assert "--embeddings" in response["error"]["message"]


@pytest.mark.parametrize("endpoint", ["reranking", "rerank"])
def test_reranking_real_scores(server, endpoint):
    documents = ["A lemon is a yellow citrus fruit.", "Cars drive on roads.", "Lemonade is made from lemons."]
    reply = requests.post(f"{server.api}/{endpoint}", timeout=TIMEOUT,
                          json={"model": RERANK, "query": "What is a lemon?", "documents": documents})
    assert reply.status_code == 200
    body = reply.json()
    assert reply.content == compact(body)
    assert body["object"] == "list" and body["usage"]["prompt_tokens"] > 0
    assert sorted(r["index"] for r in body["results"]) == [0, 1, 2]
    assert all(isinstance(r["relevance_score"], float) for r in body["results"])
    assert "--reranking" in backend_cmdline(server)
    assert requests.get(server.api + "/health").json()["model_loaded"] == RERANK


def test_reranking_top_n_and_backend_validation(server):
    reply = requests.post(server.api + "/reranking", timeout=TIMEOUT,
                          json={"model": RERANK, "query": "lemon", "documents": ["a", "b", "c"], "top_n": 1})
    assert reply.status_code == 200 and len(reply.json()["results"]) == 1
    reply = requests.post(server.api + "/reranking", json={"model": RERANK, "query": "lemon", "documents": []},
                          timeout=TIMEOUT)
    assert reply.status_code == 400
    assert reply.json()["error"]["details"]["response"]["error"]["message"] == \
        '"documents" must be a non-empty string array'


def test_embeddings_without_pooling_is_llama_servers_400(server):
    """B's command line for an `embeddings` model (`--embeddings`, no `--pooling`) on a GGUF without a
    pooling type: llama-server refuses the OpenAI route, and the client sees why."""
    reply = requests.post(server.api + "/embeddings", json={"model": EMBED, "input": "hello"}, timeout=TIMEOUT)
    assert reply.status_code == 400
    assert reply.json()["error"]["details"]["response"]["error"]["message"] == \
        "Pooling type 'none' is not OAI compatible. Please use a different pooling type"
    argv = backend_cmdline(server)
    assert argv[argv.index("--ctx-size") + 1] == "8192" and "--embeddings" in argv


def test_stats_not_touched_by_embeddings(server):
    stats = requests.get(server.api + "/stats").json()
    assert stats["input_tokens"] == 0 and stats["output_tokens"] == 0  # fresh backend, only embeddings


def test_enable_thinking_false_prepends_no_think(server):
    """B prepends `/no_think\\n` to the last user message (§4.4): llama-server sees a longer prompt
    (cached plus evaluated tokens). Run on the user model, which uses the GGUF's default template."""
    def prompt_length(**fields) -> int:
        timings = chat(server, model=EMBED, max_tokens=1, **fields).json()["timings"]
        return timings["cache_n"] + timings["prompt_n"]

    plain, rewritten, untouched = prompt_length(), prompt_length(enable_thinking=False), \
        prompt_length(enable_thinking=True)
    assert rewritten > plain == untouched, (plain, rewritten, untouched)


def test_real_embeddings_with_pooling(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("embed"), seeded_hub_cache, "--llamacpp-args", "--pooling mean",
                        user_models=USER_MODELS) as server:
        client = openai.OpenAI(base_url=server.api, api_key="unused", timeout=TIMEOUT)
        result = client.embeddings.create(model=EMBED, input=["hello world", "a lemon"])
        assert len(result.data) == 2 and [d.index for d in result.data] == [0, 1]
        first, second = (d.embedding for d in result.data)
        assert len(first) == len(second) == 640  # gemma-3-270m's hidden size
        assert all(isinstance(x, float) for x in first) and any(x != 0.0 for x in first)
        assert first != second
        reply = requests.post(server.api + "/embeddings", json={"model": EMBED, "input": "hi"}, timeout=TIMEOUT)
        assert reply.status_code == 200 and reply.content == compact(reply.json())
        argv = backend_cmdline(server)
        assert argv[-2:] == ["--pooling", "mean"] and "--embeddings" in argv
