"""Anthropic Messages on `lemonade serve` (spec head §6), spoken to by the official `anthropic` Python
client and raw sockets, with the real llama-server and the embedded gemma GGUF behind it.

One server for the module; `user.GemmaTiny` is the same GGUF, loaded with a 256-token context asked for
in the request (`ctx_size`) to provoke a context overflow, then pinned to fill the chat pool. A second server runs llama-server with a
tool-calling chat template (`tests/data/tool_call_template.jinja`), under which the base model's
answers to a forced tool choice parse into real tool calls, to check tool use end to end.
"""
from __future__ import annotations

import json
from pathlib import Path

import anthropic
import ollama
import pytest
import requests

from api_support import (DEFAULT_MODEL, GEMMA_CHECKPOINT, assert_cors, backend_cmdline, leave_streams_mid_way,
                         running_server)
from dialect_support import sse_events

TINY = "user.GemmaTiny"
USER_MODELS = {"GemmaTiny": {"checkpoint": GEMMA_CHECKPOINT, "recipe": "llamacpp", "labels": ["custom"]}}
TOOL_TEMPLATE = Path(__file__).parent / "data" / "tool_call_template.jinja"
TIMEOUT = 300
GREEDY = {"temperature": 0}
LEMON = [{"role": "user", "content": "What is a lemon?"}]
WEATHER_TOOL = {"name": "get_weather", "description": "Get the weather for a city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("anthropic"), seeded_hub_cache, user_models=USER_MODELS) as s:
        yield s


def client_for(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return client_for(server.url)


def post(server, path: str, body: dict, stream: bool = False) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=TIMEOUT, stream=stream)


# -- messages ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "/api"])  # HEAD's /v1/messages, and ours under /api/v1
def test_message_whole(server, prefix):
    client = client_for(server.url + prefix)
    raw = client.messages.with_raw_response.create(model=DEFAULT_MODEL + ":latest", max_tokens=6, system="Be brief.",
                                                   messages=LEMON, extra_body=GREEDY)
    assert raw.http_request.url.path == prefix + "/v1/messages"
    assert raw.headers["content-type"] == "application/json" and "x-lemonade-warning" not in raw.headers
    assert_cors(raw.headers)
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant" and message.model == DEFAULT_MODEL
    assert message.id.startswith("chatcmpl-") and message.stop_reason == "max_tokens"
    assert [b.type for b in message.content] == ["text"] and message.content[0].text
    assert message.usage.output_tokens == 6 and message.usage.input_tokens > 5


def test_message_stream_event_sequence(server, client):
    """The raw SSE frames, in order (spec head §6.3, with our ping after message_start), and the SDK's
    reading of the same stream matching the whole answer."""
    reply = post(server, "/v1/messages", {"model": DEFAULT_MODEL, "max_tokens": 6, "stream": True, "messages": LEMON,
                                          **GREEDY})
    assert reply.status_code == 200 and reply.headers["Content-Type"] == "text/event-stream"
    assert reply.headers["Transfer-Encoding"] == "chunked" and reply.headers["X-Accel-Buffering"] == "no"
    assert reply.headers["Cache-Control"] == "no-cache"
    events = sse_events(reply.content)
    names = [name for name, _ in events]
    deltas = names.count("content_block_delta")
    assert names == ["message_start", "ping", "content_block_start", *["content_block_delta"] * deltas,
                     "content_block_stop", "message_delta", "message_stop"] and deltas >= 1
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["model"] == DEFAULT_MODEL and start["content"] == [] and start["stop_reason"] is None
    assert events[2][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert {data["delta"]["type"] for name, data in events if name == "content_block_delta"} == {"text_delta"}
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 6 and delta["usage"]["input_tokens"] > 5
    text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
    with client.messages.stream(model=DEFAULT_MODEL, max_tokens=6, messages=LEMON, extra_body=GREEDY) as stream:
        streamed = stream.get_final_message()
    whole = client.messages.create(model=DEFAULT_MODEL, max_tokens=6, messages=LEMON, extra_body=GREEDY)
    assert streamed.content[0].text == text == whole.content[0].text
    assert streamed.usage.output_tokens == 6 and streamed.stop_reason == "max_tokens"


def test_warnings_travel_in_header_body_and_stream(server):
    body = {"model": DEFAULT_MODEL, "max_tokens": 2, "metadata": {"user_id": "u"},
            "messages": [{"role": "caf\u00e9\r\nX-Injected: 1", "content": "Hi"}]}
    reply = post(server, "/v1/messages?beta=maybe", body)
    assert reply.status_code == 200 and "X-Injected" not in reply.headers
    warnings = reply.json()["warnings"]
    assert warnings == ["Ignored unsupported beta query value: maybe", "Unsupported role 'caf\u00e9\r\nX-Injected: 1' "
                        "mapped to 'user'", "Ignored 'metadata' field"]
    header = reply.headers["X-Lemonade-Warning"]
    assert header.isascii() and "\\r\\nX-Injected" in header and header.count(" | ") == 2
    events = sse_events(post(server, "/v1/messages?beta=maybe", {**body, "stream": True}).content)
    assert events[-2][1]["warnings"] == warnings


def test_count_tokens_matches_the_prompt_of_a_real_answer(server, client):
    request_ = {"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello."},
                                                    {"role": "user", "content": [{"type": "text", "text": "Weather?"}]}]}
    counted = client.messages.count_tokens(model=DEFAULT_MODEL, **request_)
    answer = client.messages.create(model=DEFAULT_MODEL, max_tokens=1, **request_)
    assert counted.input_tokens == answer.usage.input_tokens > 5
    reply = post(server, "/api/v1/messages/count_tokens", {"model": DEFAULT_MODEL, **request_})
    assert reply.status_code == 200 and reply.json() == {"input_tokens": counted.input_tokens}


# -- errors --------------------------------------------------------------------------------------------

def test_unknown_model_is_a_not_found_error(server, client):
    for stream in (False, True):
        with pytest.raises(anthropic.NotFoundError) as caught:
            if stream:
                with client.messages.stream(model="no-such-model", max_tokens=4, messages=LEMON) as s:
                    s.get_final_message()
            else:
                client.messages.create(model="no-such-model", max_tokens=4, messages=LEMON)
        assert caught.value.status_code == 404
        assert caught.value.body == {"type": "error", "error": {
            "type": "not_found_error", "message": "model 'no-such-model' not found, try pulling it first"}}
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="no-such-model", messages=LEMON)


def test_missing_model_and_messages(server):
    for body, message in (({"messages": LEMON}, "model is required"),
                          ({"model": DEFAULT_MODEL}, "messages is required"),
                          ({"model": DEFAULT_MODEL, "messages": LEMON, "max_tokens": "6"},
                           "'max_tokens' must be an integer, got string")):
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            reply = post(server, path, body)
            assert reply.status_code == 400
            assert reply.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": message}}


def test_context_overflow_in_a_small_context(server, client):
    """`ctx_size` in the body sizes the auto-load (llama-server gets `--ctx-size 256`); a longer prompt is
    llama-server's 400, answered as Anthropic's invalid_request_error before any stream starts."""
    long = [{"role": "user", "content": "lemon " * 400}]
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as caught:
            if stream:
                with client.messages.stream(model=TINY, max_tokens=4, messages=long, extra_body={"ctx_size": 256}) as s:
                    s.get_final_message()
            else:
                client.messages.create(model=TINY, max_tokens=4, messages=long, extra_body={"ctx_size": 256})
        assert caught.value.body["error"]["type"] == "invalid_request_error"
        assert "exceeds the available context size" in caught.value.body["error"]["message"]
    argv = backend_cmdline(server, TINY)
    assert argv[argv.index("--ctx-size") + 1] == "256"


def test_a_pinned_pool_is_a_residency_conflict(server, client):
    """Every loaded chat model pinned: a request for another one cannot load (409, HEAD's residency
    body in both dialects; HEAD itself answers 404 "not found" here)."""
    message = "All loaded models of type standard/llm are pinned. Unload a model first."
    requests.post(server.url + "/api/v1/load", json={"model_name": TINY, "pinned": True}, timeout=TIMEOUT)
    try:
        with pytest.raises(anthropic.ConflictError) as caught:
            client.messages.create(model=DEFAULT_MODEL, max_tokens=2, messages=LEMON)
        assert caught.value.body == {"type": "error", "error": {"type": "router_residency_conflict", "message": message}}
        reply = post(server, "/api/chat", {"model": DEFAULT_MODEL, "messages": LEMON})
        assert reply.status_code == 409 and reply.json() == {"error": message, "type": "router_residency_conflict",
                                                             "code": "router_residency_conflict"}
    finally:
        requests.post(server.url + "/internal/pin", json={"model_name": TINY, "pinned": False}, timeout=TIMEOUT)


def test_client_leaving_mid_stream_cancels_generation(server):
    """An assistant prefill that counts keeps the base model going; the client reads three deltas and
    leaves."""
    body = json.dumps({"model": DEFAULT_MODEL, "max_tokens": 4000, "stream": True, **GREEDY, "messages": [
        {"role": "user", "content": "Count to one thousand."},
        {"role": "assistant", "content": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"}]}).encode()
    post(server, "/v1/messages", {"model": DEFAULT_MODEL, "max_tokens": 1, "messages": LEMON})  # loaded
    leave_streams_mid_way(server, DEFAULT_MODEL, "/v1/messages", body, marker=b"event: content_block_delta")
    answer = client_for(server.url).messages.create(model=DEFAULT_MODEL, max_tokens=2, messages=LEMON)
    assert answer.usage.output_tokens == 2


# -- tool use with a tool-calling chat template --------------------------------------------------------

@pytest.fixture(scope="module")
def tool_server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("tools"), seeded_hub_cache,
                        "--llamacpp-args", f"--chat-template-file {TOOL_TEMPLATE}") as s:
        yield s


def test_tool_use_whole_and_streamed(tool_server):
    client = client_for(tool_server.url)
    ask = {"model": DEFAULT_MODEL, "max_tokens": 40, "tools": [WEATHER_TOOL], "tool_choice": {"type": "any"},
           "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    whole = client.messages.create(**ask, extra_body=GREEDY)
    calls = [b for b in whole.content if b.type == "tool_use"]
    assert calls and calls[0].name == "get_weather" and calls[0].input == {"city": "Paris"}
    assert whole.stop_reason in ("tool_use", "max_tokens")
    with client.messages.stream(**ask, extra_body=GREEDY) as stream:
        events = [(event.type, event.model_dump()) for event in stream
                  if event.type.startswith(("message_", "content_block_"))]  # the wire events, as the SDK read them
        final = stream.get_final_message()
    assert [b.input for b in final.content if b.type == "tool_use"][0] == {"city": "Paris"}
    blocks = [(d["index"], d["content_block"]["type"]) for n, d in events if n == "content_block_start"]
    assert [i for i, _ in blocks] == list(range(len(blocks))) and ("tool_use" in {t for _, t in blocks})
    open_block = None
    for name, data in events:  # each block: start, its deltas, stop, before the next one starts
        if name == "content_block_start":
            assert open_block is None
            open_block = data["index"]
        elif name == "content_block_delta":
            assert data["index"] == open_block
        elif name == "content_block_stop":
            assert data["index"] == open_block
            open_block = None
    tool_index = next(i for i, t in blocks if t == "tool_use")
    fragments = "".join(d["delta"]["partial_json"] for n, d in events
                        if n == "content_block_delta" and d["index"] == tool_index)
    assert json.loads(fragments) == {"city": "Paris"}
    assert events[-1][0] == "message_stop" and events[-2][0] == "message_delta"


def test_tool_result_round_trip(tool_server):
    """The assistant's tool_use and the user's tool_result go back through the translation and the
    template: a real answer, not a 4xx."""
    client = client_for(tool_server.url)
    answer = client.messages.create(model=DEFAULT_MODEL, max_tokens=4, tools=[WEATHER_TOOL], extra_body=GREEDY,
                                    messages=[{"role": "user", "content": "What is the weather in Paris?"},
                                              {"role": "assistant", "content": [
                                                  {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                   "input": {"city": "Paris"}}]},
                                              {"role": "user", "content": [
                                                  {"type": "tool_result", "tool_use_id": "toolu_1",
                                                   "content": "Sunny, 21 C"}]}])
    assert answer.usage.input_tokens > 20 and answer.usage.output_tokens > 0


def test_ollama_tool_calls_from_the_same_template(tool_server):
    """Ollama's chat with tools (no tool choice in Ollama's API): the template opens the call, and
    llama-server's tool call arrives with object arguments, whole and as the two streamed lines."""
    client = ollama.Client(host=tool_server.url, timeout=TIMEOUT)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather for a city",
                                                "parameters": WEATHER_TOOL["input_schema"]}}]
    ask = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
           "tools": tools, "options": {"num_predict": 40, **GREEDY}}
    whole = client.chat(**ask)
    assert whole.message.tool_calls[0].function.name == "get_weather"
    assert whole.message.tool_calls[0].function.arguments == {"city": "Paris"}
    first, done = list(client.chat(**ask, stream=True))
    assert not first.done and first.message.tool_calls == whole.message.tool_calls and done.done
