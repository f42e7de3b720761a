"""The Anthropic Messages dialect's translation core (`lemonade/anthropic_api/`), spec head §6.

Table tests of each rule; the stream translator on a real llama-server stream (`tests/data`, see
`dialect_support`) and on tool-call frames written by hand in the shape llama-server streams them
(the 270M base model does not call tools): the first delta of a call carries `id`, `type`,
`function.name` and an empty `arguments`, the following deltas carry `arguments` fragments only, each
call has its own `index`, then a `finish_reason` frame and the `include_usage` frame. The official
`anthropic` client reads what we produce (through an httpx2 MockTransport), and, at the end, the same
path and `count_tokens` run against the real llama-server.
"""
from __future__ import annotations

import json

import anthropic
import httpx2
import pytest

from dialect_support import (llama_direct, read_data, read_http, read_json, sse_events,  # noqa: F401
                             split_every)
from lemonade import sse
from lemonade.anthropic_api import MessageStream, count_tokens, errors, message_response, translate_request
from lemonade.anthropic_api import warning_header
from lemonade.error_types import BackendError, InvalidRequestError, RequestTooLargeError

M = "Gemma-3-270m-GGUF"
USER = [{"role": "user", "content": "hi"}]


def translate(**body):
    return translate_request({"model": M, "messages": USER, **body})


# -- requests -----------------------------------------------------------------------------------------

def test_minimal_request():
    t = translate_request({"model": M + ":latest", "messages": USER, "max_tokens": 16})
    assert t.model == M and t.stream is False and t.warnings == []
    assert t.openai == {"model": M, "messages": [{"role": "user", "content": "hi"}],
                        "max_completion_tokens": 16, "max_tokens": 16, "stream": False}


@pytest.mark.parametrize("system,expected,warnings", [
    ("Be brief.", [{"role": "system", "content": "Be brief."}], []),
    ([{"type": "text", "text": "a"}, {"type": "text", "text": "b", "cache_control": {"type": "ephemeral"}}],
     [{"role": "system", "content": "a\nb"}], []),
    ([{"type": "image"}, "x", {"type": "text", "text": "c"}], [{"role": "system", "content": "c"}],
     ["Ignored unsupported 'system' block type: image", "Ignored non-object block in 'system'"]),
    ("", [], []),
    ([], [], []),
])
def test_system(system, expected, warnings):
    t = translate(system=system)
    assert t.openai["messages"][:-1] == expected and t.warnings == warnings


def test_roles():
    t = translate_request({"model": M, "messages": [
        {"content": "no role"}, {"role": "system", "content": "dropped"},
        {"role": "developer", "content": "as user"}, {"role": "assistant", "content": "ok"}]})
    assert t.openai["messages"] == [{"role": "user", "content": "no role"}, {"role": "user", "content": "as user"},
                                    {"role": "assistant", "content": "ok"}]
    assert t.warnings == ["Ignored 'system' role in messages; use top-level system field",
                          "Unsupported role 'developer' mapped to 'user'"]


def msgs(*messages):
    t = translate_request({"model": M, "messages": list(messages)})
    return t.openai["messages"], t.warnings


IMG = {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "QUJD"}}


@pytest.mark.parametrize("content,expected,warnings", [
    ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "a\nb", []),
    ([{"type": "text", "text": "look"}, IMG],
     [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}}], []),
    ([{"type": "text", "text": "x"}, {"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}], "x",
     ["Ignored image block with unsupported source format"]),
    ([{"type": "text", "text": "x"}, {"type": "image", "source": {"type": "base64", "data": "QUJD"}}], "x",
     ["Ignored image block with unsupported source format"]),
    ([{"type": "text", "text": "x"}, {"type": "document"}, 5], "x",
     ["Ignored unsupported message content block type: document", "Ignored non-object message content block"]),
    ([{"type": "text", "text": "x"}, {"type": "tool_use", "id": "t", "name": "f", "input": {}}], "x",
     ["Ignored tool_use block outside assistant role"]),
])
def test_user_content_blocks(content, expected, warnings):
    out, seen = msgs({"role": "user", "content": content})
    assert out == [{"role": "user", "content": expected}] and seen == warnings


def test_assistant_tool_use_and_user_tool_result():
    out, warnings = msgs(
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "…", "signature": "s"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "name": "get_weather", "input": "Rome"},
            {"type": "tool_use", "id": "toolu_3", "input": {}},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "20C"},
            {"type": "tool_result", "tool_use_id": "toolu_2",
             "content": [{"type": "text", "text": "18C"}, {"type": "text", "text": "sunny"}, {"type": "image"}]},
            {"type": "tool_result", "tool_use_id": "toolu_4", "content": {"temp": 3}, "is_error": True},
            {"type": "tool_result", "tool_use_id": "toolu_5"},
            {"type": "tool_result", "tool_use_id": "toolu_6", "content": 7},
            {"type": "tool_result", "content": "no id"},
            {"type": "text", "text": "Thanks."}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_7", "content": "only"}]},
    )
    generated = out[1]["tool_calls"][1]["id"]
    assert generated.startswith("toolu_") and len(generated) > 10
    assert out == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": generated, "type": "function", "function": {"name": "get_weather", "arguments": "{\"_value\":\"Rome\"}"}}]},
        # the tool messages come first, right after the assistant's calls; then the user's text
        {"role": "tool", "tool_call_id": "toolu_1", "content": "20C"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "18C\nsunny"},
        {"role": "tool", "tool_call_id": "toolu_4", "content": "{\"temp\":3}"},
        {"role": "tool", "tool_call_id": "toolu_5", "content": ""},
        {"role": "tool", "tool_call_id": "toolu_6", "content": ""},
        {"role": "user", "content": "Thanks."},
        {"role": "tool", "tool_call_id": "toolu_7", "content": "only"},  # no empty user message after it
    ]
    assert warnings == [
        "Ignored unsupported message content block type: thinking",
        "tool_use.input was not an object; wrapped as _value",
        "Ignored tool_use block missing name",
        "Ignored tool_result block outside user role",
        "Ignored unsupported block type in tool_result.content: image",
        "Ignored unsupported type for tool_result.content",
        "Ignored tool_result block missing tool_use_id",
    ]


def test_assistant_with_only_tool_use_and_empty_messages():
    out, _ = msgs({"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f"}]},
                  {"role": "user", "content": []}, {"role": "assistant", "content": []}, {"role": "user"})
    assert out == [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("body,expected", [
    ({"temperature": 0.5, "top_p": 0.9, "top_k": 40}, {"temperature": 0.5, "top_p": 0.9, "top_k": 40}),
    ({"stop_sequences": ["\n\nHuman:"]}, {"stop": ["\n\nHuman:"]}),
    ({"max_tokens": 1}, {"max_completion_tokens": 1, "max_tokens": 1}),
    ({"temperature": None}, {}),
])
def test_generation_parameters(body, expected):
    openai = translate(**body).openai
    assert {k: v for k, v in openai.items() if k not in ("model", "messages", "stream")} == expected


def test_tools_and_tool_choice():
    t = translate(tools=[
        {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {}}},
        {"name": "bare"}, {"description": "no name"}, "x"])
    assert t.openai["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                          "parameters": {"type": "object", "properties": {}}}},
        {"type": "function", "function": {"name": "bare", "description": "", "parameters": {}}}]
    assert t.warnings == ["Ignored invalid tool definition in 'tools'"]
    assert "tools" not in translate(tools=[]).openai


@pytest.mark.parametrize("choice,expected,warnings", [
    ({"type": "auto"}, {"tool_choice": "auto"}, []),
    ({"type": "any"}, {"tool_choice": "required"}, []),
    ({"type": "none"}, {"tool_choice": "none"}, []),
    ({}, {"tool_choice": "auto"}, []),
    ({"type": "tool", "name": "f"}, {"tool_choice": {"type": "function", "function": {"name": "f"}}}, []),
    ({"type": "tool"}, {}, ["Ignored tool_choice.type=tool without name"]),
    ({"type": "magic"}, {}, ["Ignored unsupported tool_choice.type: magic"]),
    ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}, []),
])
def test_tool_choice(choice, expected, warnings):
    t = translate(tool_choice=choice)
    assert {k: t.openai[k] for k in ("tool_choice", "parallel_tool_calls") if k in t.openai} == expected
    assert t.warnings == warnings


@pytest.mark.parametrize("body,expected,warnings", [
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
     {"response_format": {"type": "json_schema", "json_schema": {"name": "response", "schema": {"type": "object"}}}}, []),
    ({"output_config": {"format": {"type": "json_object"}}}, {"response_format": {"type": "json_object"}}, []),
    ({"output_config": {"format": {"type": "json_schema"}}}, {}, ["Ignored unsupported output_config.format type: json_schema"]),
    ({"output_config": {"effort": "low"}}, {}, []),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, {"enable_thinking": True}, []),
    ({"thinking": {"type": "disabled"}}, {"enable_thinking": False}, []),
    ({"thinking": {"type": "adaptive"}}, {}, ["Ignored unsupported thinking.type: adaptive"]),
    ({"metadata": {"user_id": "u"}, "context_management": {}}, {},
     ["Ignored 'metadata' field", "Ignored 'context_management' field"]),
])
def test_output_thinking_ignored_fields(body, expected, warnings):
    t = translate(**body)
    assert {k: t.openai[k] for k in ("response_format", "enable_thinking") if k in t.openai} == expected
    assert t.warnings == warnings


@pytest.mark.parametrize("beta,warnings", [
    (None, []), ("true", []), ("false", ["Ignored unsupported beta query value: false"]),
    ("", ["Ignored unsupported beta query value: "]),
])
def test_beta_query(beta, warnings):
    assert translate_request({"model": M, "messages": USER}, beta=beta).warnings == warnings


def test_stream_asks_for_usage():
    t = translate(stream=True)
    assert t.stream and t.openai["stream"] is True and t.openai["stream_options"] == {"include_usage": True}


def test_warnings_are_deduplicated_and_joined_for_the_header():
    t = translate_request({"model": M, "messages": [{"role": "x", "content": "a"}, {"role": "x", "content": "b"},
                                                    {"role": "y", "content": "c"}]})
    assert t.warnings == ["Unsupported role 'x' mapped to 'user'", "Unsupported role 'y' mapped to 'user'"]
    assert warning_header(t.warnings) == "Unsupported role 'x' mapped to 'user' | Unsupported role 'y' mapped to 'user'"
    assert warning_header([]) is None


BAD = [
    ({"messages": USER}, "model is required"),
    ({"model": "", "messages": USER}, "model is required"),
    ({"model": 1, "messages": USER}, "'model' must be a string, got number"),
    ({"model": M}, "messages is required"),
    ({"model": M, "messages": {}}, "'messages' must be an array, got object"),
    ({"model": M, "messages": ["hi"]}, "'messages[0]' must be an object, got string"),
    ({"model": M, "messages": [{"role": 1}]}, "'messages[0].role' must be a string, got number"),
    ({"model": M, "messages": [{"content": 5}]}, "'messages[0].content' must be a string or an array, got number"),
    ({"model": M, "messages": USER, "system": 5}, "'system' must be a string or an array, got number"),
    ({"model": M, "messages": USER, "max_tokens": "10"}, "'max_tokens' must be an integer, got string"),
    ({"model": M, "messages": USER, "max_tokens": 1.5}, "'max_tokens' must be an integer, got number"),
    ({"model": M, "messages": USER, "temperature": "hot"}, "'temperature' must be a number, got string"),
    ({"model": M, "messages": USER, "top_k": 0.5}, "'top_k' must be an integer, got number"),
    ({"model": M, "messages": USER, "stream": 1}, "'stream' must be a boolean, got number"),
    ({"model": M, "messages": USER, "stop_sequences": "x"}, "'stop_sequences' must be an array, got string"),
    ({"model": M, "messages": USER, "stop_sequences": [1]}, "'stop_sequences[0]' must be a string, got number"),
    ({"model": M, "messages": USER, "tools": {}}, "'tools' must be an array, got object"),
    ({"model": M, "messages": USER, "tool_choice": "auto"}, "'tool_choice' must be an object, got string"),
    ({"model": M, "messages": USER, "thinking": True}, "'thinking' must be an object, got boolean"),
    ({"model": M, "messages": USER, "output_config": []}, "'output_config' must be an object, got array"),
]


@pytest.mark.parametrize("body,message", BAD, ids=[m for _, m in BAD])
def test_validation(body, message):
    with pytest.raises(InvalidRequestError) as caught:
        translate_request(body)
    assert caught.value.message == message
    assert errors.from_exception(caught.value) == (400, {"type": "error", "error": {
        "type": "invalid_request_error", "message": message}})


def test_max_tokens_can_be_required():
    with pytest.raises(InvalidRequestError, match="^max_tokens is required$"):
        translate_request({"model": M, "messages": USER}, require_max_tokens=True)


# -- whole answers ------------------------------------------------------------------------------------

def test_message_response_from_recorded_answer():
    recorded = read_json("llama_chat_response.json")
    assert message_response(recorded, M, []) == {
        "id": recorded["id"], "type": "message", "role": "assistant", "model": M,
        "content": [{"type": "text", "text": recorded["choices"][0]["message"]["content"]}],
        "stop_reason": "max_tokens", "stop_sequence": None,
        "usage": {"input_tokens": recorded["usage"]["prompt_tokens"], "output_tokens": recorded["usage"]["completion_tokens"]}}


def call(name, arguments, id_="c1"):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.mark.parametrize("message,finish,content,stop,warnings", [
    ({"content": "hi"}, "stop", [{"type": "text", "text": "hi"}], "end_turn", []),
    ({"content": "hi"}, "length", [{"type": "text", "text": "hi"}], "max_tokens", []),
    ({"content": ""}, None, [{"type": "text", "text": ""}], "end_turn", []),
    ({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, "stop",
     [{"type": "text", "text": "a\nb"}], "end_turn", []),
    ({"content": "", "tool_calls": [call("f", "{\"a\": 1}")]}, "tool_calls",
     [{"type": "tool_use", "id": "c1", "name": "f", "input": {"a": 1}}], "tool_use", []),
    ({"content": "Sure.", "tool_calls": [call("f", "")]}, "stop",
     [{"type": "text", "text": "Sure."}, {"type": "tool_use", "id": "c1", "name": "f", "input": {}}], "tool_use", []),
    ({"content": None, "tool_calls": [call("f", "{oops")]}, "tool_calls",
     [{"type": "tool_use", "id": "c1", "name": "f", "input": {"_raw": "{oops"}}], "tool_use",
     ["Failed to parse tool arguments as JSON; wrapped as _raw"]),
    ({"content": None, "tool_calls": [call("f", "[1]")]}, "tool_calls",
     [{"type": "tool_use", "id": "c1", "name": "f", "input": {"_value": [1]}}], "tool_use",
     ["Tool arguments were not an object; wrapped as _value"]),
    ({"content": None, "tool_calls": [call("f", {"b": 2})]}, "tool_calls",
     [{"type": "tool_use", "id": "c1", "name": "f", "input": {"b": 2}}], "tool_use", []),
    ({"content": "x", "tool_calls": [call("", "{}"), "junk"]}, "stop", [{"type": "text", "text": "x"}], "end_turn",
     ["Encountered tool_call without function name"]),
])
def test_message_response_table(message, finish, content, stop, warnings):
    answer = message_response({"id": "chatcmpl-1", "choices": [{"message": message, "finish_reason": finish}]},
                              M, ["from the request"])
    assert answer["content"] == content and answer["stop_reason"] == stop
    assert answer["warnings"] == ["from the request"] + warnings


def test_message_response_without_choices_or_id():
    answer = message_response({}, M, [])
    assert answer["id"].startswith("msg_") and answer["content"] == [{"type": "text", "text": ""}]
    assert answer["usage"] == {"input_tokens": 0, "output_tokens": 0} and "warnings" not in answer
    generated = message_response({"choices": [{"message": {"tool_calls": [{"function": {"name": "f"}}]}}]}, M, [])
    assert generated["content"][0]["id"].startswith("toolu_")


# -- streams ------------------------------------------------------------------------------------------

def run(stream: MessageStream, frames) -> list[tuple[str, dict]]:
    return sse_events(b"".join(stream.feed(f) for f in frames) + stream.final())


def test_stream_from_recorded_stream_exact_sequence():
    raw = read_data("llama_chat_stream.sse")
    frames = list(sse.iter_json(split_every(raw, 33)))
    events = run(MessageStream(M, ["w1"]), frames)
    texts = [f["choices"][0]["delta"]["content"] for f in frames
             if f["choices"] and f["choices"][0]["delta"].get("content")]
    expected = [
        ("message_start", {"type": "message_start", "message": {
            "id": frames[0]["id"], "type": "message", "role": "assistant", "model": M, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}}),
        ("ping", {"type": "ping"}),
        ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        *[("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}})
          for t in texts],
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                           "usage": {"input_tokens": frames[-1]["usage"]["prompt_tokens"],
                                     "output_tokens": frames[-1]["usage"]["completion_tokens"]},
                           "warnings": ["w1"]}),
        ("message_stop", {"type": "message_stop"}),
    ]
    assert events == expected and len(texts) == 8


def test_stream_without_ping_is_heads_sequence():
    frames = list(sse.iter_json([read_data("llama_chat_stream.sse")]))
    names = [name for name, _ in run(MessageStream(M, send_ping=False), frames)]
    assert names[:3] == ["message_start", "content_block_start", "content_block_delta"] and "ping" not in names


def test_stream_usage_from_timings_when_no_usage_frame():
    frames = [f for f in sse.iter_json([read_data("llama_chat_stream.sse")]) if f["choices"]]
    frames[-1]["timings"] = {"cache_n": 9, "prompt_n": 5, "predicted_n": 8}
    assert run(MessageStream(M), frames)[-2][1]["usage"] == {"input_tokens": 14, "output_tokens": 8}


def tool_frames(with_text: bool) -> list[dict]:
    """Hand-written, in llama-server's streaming shape (see the module docstring)."""
    def frame(delta=None, finish=None, **extra):
        return {"id": "chatcmpl-tools", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **extra}

    frames = [frame({"role": "assistant", "content": None})]
    if with_text:
        frames += [frame({"content": "Let me"}), frame({"content": " check."})]
    frames += [
        frame({"tool_calls": [{"index": 0, "id": "call_A", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        frame({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}),
        frame({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
        frame({"tool_calls": [{"index": 1, "id": "call_B", "type": "function",
                               "function": {"name": "get_time", "arguments": ""}}]}),
        frame({"tool_calls": [{"index": 1, "function": {"arguments": "{\"tz\": \"CET\"}"}}]}),
        frame(finish="tool_calls"),
        {"id": "chatcmpl-tools", "choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 21}},
    ]
    return frames


def test_stream_with_text_then_two_tool_calls():
    events = run(MessageStream(M, send_ping=False), tool_frames(with_text=True))
    assert [(n, d.get("index"), (d.get("delta") or d.get("content_block") or {}).get("type")) for n, d in events] == [
        ("message_start", None, None),
        ("content_block_start", 0, "text"), ("content_block_delta", 0, "text_delta"),
        ("content_block_delta", 0, "text_delta"), ("content_block_stop", 0, None),
        ("content_block_start", 1, "tool_use"), ("content_block_delta", 1, "input_json_delta"),
        ("content_block_delta", 1, "input_json_delta"), ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"), ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
        ("message_delta", None, None), ("message_stop", None, None)]
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "call_A", "name": "get_weather", "input": {}}
    assert events[6][1]["delta"] == {"type": "input_json_delta", "partial_json": "{\"city\": "}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert events[-2][1]["usage"] == {"input_tokens": 30, "output_tokens": 21}


def test_stream_tool_only_starts_at_index_zero():
    events = run(MessageStream(M, send_ping=False), tool_frames(with_text=False))
    starts = [(d["index"], d["content_block"]["type"]) for n, d in events if n == "content_block_start"]
    assert starts == [(0, "tool_use"), (1, "tool_use")]  # HEAD: 1 and 2, with no block 0


def test_stream_tool_call_without_id_or_name():
    s = MessageStream(M, send_ping=False)
    out = sse_events(s.feed({"choices": [{"delta": {"tool_calls": [{"function": {"arguments": "{}"}}]}}]}))
    block = out[1][1]["content_block"]
    assert block["name"] == "unknown_tool" and block["id"].startswith("toolu_") and out[1][1]["index"] == 0


def test_stream_end_turn_becomes_tool_use_and_empty_stream():
    frames = tool_frames(with_text=False)
    frames[-2]["choices"][0]["finish_reason"] = "stop"
    assert run(MessageStream(M), frames)[-2][1]["delta"]["stop_reason"] == "tool_use"
    empty = run(MessageStream(M), [])
    assert [n for n, _ in empty] == ["message_start", "ping", "content_block_start", "content_block_stop",
                                     "message_delta", "message_stop"]
    assert empty[0][1]["message"]["model"] == M and empty[0][1]["message"]["id"].startswith("msg_")
    assert empty[-2][1]["delta"]["stop_reason"] == "end_turn"


def test_stream_error_frame_ends_the_stream():
    """A backend error frame as HEAD's proxy writes it in a 200 stream: the recorded overflow error
    object plus `status_code` (spec head §7.4)."""
    status, body = read_http("llama_context_overflow.http")
    error_frame = {"error": {**body["error"], "status_code": status}}
    frames = list(sse.iter_json([read_data("llama_chat_stream.sse")]))
    s = MessageStream(M, send_ping=False)
    out = b"".join(s.feed(f) for f in frames[:3] + [error_frame] + frames[3:]) + s.final()
    events = sse_events(out)
    assert [n for n, _ in events] == ["message_start", "content_block_start", "content_block_delta",
                                      "content_block_delta", "error"]
    assert events[-1][1] == {"type": "error", "error": {"type": "invalid_request_error",
                                                        "message": body["error"]["message"]}}
    assert s.failed and s.final() == b"" and s.error({"message": "again"}) == b""
    first = MessageStream(M)
    assert sse_events(first.feed({"error": {"message": "gone", "type": "model_not_loaded"}}) + first.final()) == [
        ("error", {"type": "error", "error": {"type": "not_found_error", "message": "gone"}})]


# -- what the official client reads -------------------------------------------------------------------

def sdk(handler) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="unused", base_url="http://lemonade.test", max_retries=0,
                               http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))


def frames_handler(frames_for):
    def handler(request_: httpx2.Request) -> httpx2.Response:
        t = translate_request(json.loads(request_.content))
        s = MessageStream(t.model, t.warnings)
        body = b"".join(s.feed(f) for f in frames_for(t)) + s.final()
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=body)
    return handler


def test_sdk_reads_the_recorded_text_stream():
    frames = list(sse.iter_json([read_data("llama_chat_stream.sse")]))
    client = sdk(frames_handler(lambda t: frames))
    with client.messages.stream(model=M, max_tokens=8, messages=USER) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == message.content[0].text and text.startswith("What is a lemon?")
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 8 and message.model == M


@pytest.mark.parametrize("with_text", [True, False])
def test_sdk_reads_tool_use_streams(with_text):
    client = sdk(frames_handler(lambda t: tool_frames(with_text)))
    with client.messages.stream(model=M, max_tokens=64, messages=USER) as stream:
        message = stream.get_final_message()
    tools = [(b.id, b.name, b.input) for b in message.content if b.type == "tool_use"]
    assert tools == [("call_A", "get_weather", {"city": "Paris"}), ("call_B", "get_time", {"tz": "CET"})]
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content][:1] == (["text"] if with_text else ["tool_use"])


def test_sdk_raises_on_the_error_event():
    def frames_for(t):
        return [{"id": "x", "choices": [{"delta": {"content": "a"}}]}, {"error": {"message": "boom", "code": 503}}]

    with pytest.raises(anthropic.APIStatusError, match="boom"):
        with sdk(frames_handler(frames_for)).messages.stream(model=M, max_tokens=8, messages=USER) as stream:
            stream.get_final_message()


# -- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status,error_type", [
    (400, "invalid_request_error"), (401, "authentication_error"), (402, "billing_error"),
    (403, "permission_error"), (404, "not_found_error"), (409, "conflict_error"), (413, "request_too_large"),
    (429, "rate_limit_error"), (504, "timeout_error"), (529, "overloaded_error"), (422, "invalid_request_error"),
    (418, "invalid_request_error"), (500, "api_error"), (502, "api_error"), (503, "api_error"),
])
def test_error_type_by_status(status, error_type):
    assert errors.error_type_for_status(status) == error_type


@pytest.mark.parametrize("status,body,expected_status,message", [
    (None, {"error": {"message": "m", "status_code": 429}}, 429, "m"),
    (None, {"error": {"message": "m", "code": 413}}, 413, "m"),
    (None, {"error": {"message": "m", "code": "context_length_exceeded", "details": {"status_code": 404}}}, 404, "m"),
    (None, {"error": {"message": "m", "code": 200}}, 500, "m"),  # outside 400-599
    (None, {"error": {"message": "m", "status_code": True}}, 500, "m"),
    (None, {"error": {"message": "m", "type": "invalid_request"}}, 400, "m"),
    (None, {"error": {"message": "m", "type": "unsupported_operation"}}, 400, "m"),
    (None, {"error": {"message": "m", "type": "model_not_loaded"}}, 404, "m"),
    (None, {"error": {"type": "backend_error"}}, 500, "backend error"),
    (None, {"error": "plain"}, 500, "plain"),
    (503, "Loading model", 503, "Loading model"),  # a non-JSON body: its text
    (502, None, 502, "backend returned HTTP 502"),
    (500, {"error": {"message": "m", "code": 400}}, 500, "m"),  # the HTTP status is status_code, checked first
])
def test_backend_error_status_rule(status, body, expected_status, message):
    assert errors.from_backend(status, body) == (expected_status, {"type": "error", "error": {
        "type": errors.error_type_for_status(expected_status), "message": message}})


def test_recorded_context_overflow_is_invalid_request():
    status, body = read_http("llama_context_overflow.http")
    code, answer = errors.from_backend(status, body)
    assert code == 400 and answer["error"]["type"] == "invalid_request_error"
    assert "exceeds the available context size" in answer["error"]["message"]


def test_exception_and_load_errors():
    assert errors.from_exception(RuntimeError("boom")) == (500, {"type": "error", "error": {"type": "api_error", "message": "boom"}})
    assert errors.from_exception(RequestTooLargeError("big"))[1]["error"]["type"] == "request_too_large"
    assert errors.from_exception(BackendError("down"))[0] == 502
    assert errors.load_failure("x") == (404, {"type": "error", "error": {
        "type": "not_found_error", "message": "model 'x' not found, try pulling it first"}})
    assert errors.residency_conflict("full") == (409, {"type": "error", "error": {
        "type": "router_residency_conflict", "message": "full"}})


# -- count_tokens -------------------------------------------------------------------------------------

def test_count_tokens_requests():
    t = count_tokens.template_request({"model": M, "system": "s", "messages": USER, "temperature": 1,
                                       "tools": [{"name": "f", "input_schema": {}}], "stream": True,
                                       "thinking": {"type": "disabled"}})
    assert set(t.openai) == {"model", "messages", "tools", "enable_thinking"} and t.stream is False
    assert count_tokens.tokenize_request({"prompt": "<p>"}) == {"content": "<p>", "add_special": True,
                                                                "parse_special": True}
    assert count_tokens.count_response({"tokens": [1, 2, 3]}) == {"input_tokens": 3}
    with pytest.raises(BackendError):
        count_tokens.tokenize_request({"error": "x"})
    with pytest.raises(BackendError):
        count_tokens.count_response({"tokens": "abc"})


# -- against the real llama-server --------------------------------------------------------------------

def live_handler(llama):
    """The thin HTTP handler the module is designed for, with the real llama-server behind it."""
    def handler(request_: httpx2.Request) -> httpx2.Response:
        body = json.loads(request_.content)
        if request_.url.path == "/v1/messages/count_tokens":
            t = count_tokens.template_request(body)
            status, reply = llama.post(count_tokens.APPLY_TEMPLATE_ENDPOINT, t.openai)
            if status == 200:
                status, reply = llama.post(count_tokens.TOKENIZE_ENDPOINT, count_tokens.tokenize_request(reply))
            if status != 200:
                code, answer = errors.from_backend(status, reply)
                return httpx2.Response(code, json=answer)
            return httpx2.Response(200, json=count_tokens.count_response(reply))
        t = translate_request(body, beta=request_.url.params.get("beta"))
        if not t.stream:
            status, reply = llama.post("/v1/chat/completions", t.openai)
            if status != 200:
                code, answer = errors.from_backend(status, reply)
                return httpx2.Response(code, json=answer)
            return httpx2.Response(200, json=message_response(reply, t.model, t.warnings))
        status, chunks = llama.stream("/v1/chat/completions", t.openai)
        if status != 200:
            code, answer = errors.from_backend(status, chunks)
            return httpx2.Response(code, json=answer)
        s = MessageStream(t.model, t.warnings)

        def events():
            for frame in sse.iter_json(chunks):
                out = s.feed(frame)
                if out:
                    yield out
            yield s.final()
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=events())
    return handler


def test_live_messages(llama_direct):
    client = sdk(live_handler(llama_direct))
    whole = client.messages.create(model=M, max_tokens=6, extra_body={"temperature": 0}, system="Be brief.",
                                   messages=[{"role": "user", "content": "What is a lemon?"}])
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 6 and whole.content[0].text
    with client.messages.stream(model=M, max_tokens=6, extra_body={"temperature": 0}, system="Be brief.",
                                messages=[{"role": "user", "content": "What is a lemon?"}]) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == whole.content[0].text
    assert (streamed.usage.input_tokens, streamed.usage.output_tokens) == (whole.usage.input_tokens, 6)


def test_live_count_tokens_matches_the_prompt_of_a_real_answer(llama_direct):
    client = sdk(live_handler(llama_direct))
    for request_ in (
        {"system": "Be brief.", "messages": [{"role": "user", "content": "What is a lemon?"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": [{"type": "text", "text": "Weather?"}]}],
         "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]},
    ):
        counted = client.messages.count_tokens(model=M, **request_)
        answer = client.messages.create(model=M, max_tokens=1, **request_)
        assert counted.input_tokens == answer.usage.input_tokens > 5


def test_live_context_overflow(llama_direct):
    client = sdk(live_handler(llama_direct))
    long = [{"role": "user", "content": "lemon " * 400}]
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=M, max_tokens=4, messages=long)
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError, match="exceeds the available context size"):
        with client.messages.stream(model=M, max_tokens=4, messages=long) as stream:
            stream.get_final_message()
