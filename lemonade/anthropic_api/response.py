"""OpenAI chat answer → Anthropic Messages answer, whole or streamed (C++ HEAD
`S/anthropic_api.cpp:480-920`, spec head §6.2-6.3).

`message_response` translates a non-streaming answer. `MessageStream` is fed llama-server's SSE
frames one at a time (parsed, see `lemonade.sse.iter_json`) and returns the Anthropic SSE bytes to
write at once; `final()` closes the message when the backend stream ends.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from lemonade.anthropic_api import errors
from lemonade.anthropic_api.request import tool_use_id
from lemonade.utils.json_utils import dumps

log = logging.getLogger(__name__)

UNKNOWN_TOOL = "unknown_tool"  # the name of a streamed tool call that came without one (HEAD)


def message_id() -> str:
    """HEAD's id for an answer whose backend gave none: `msg_<epoch ms>`."""
    return f"msg_{int(time.time() * 1000)}"


def stop_reason(finish_reason: Any) -> str:
    """OpenAI `finish_reason` → Anthropic `stop_reason` (HEAD `map_finish_reason_to_anthropic_stop_reason`)."""
    return {"length": "max_tokens", "tool_calls": "tool_use"}.get(finish_reason, "end_turn")


def usage(openai_usage: Any, timings: Any = None) -> dict[str, int]:
    """Anthropic `usage` from OpenAI `usage`; without it, from llama.cpp `timings` (the prompt count
    there is split into cached `cache_n` and evaluated `prompt_n`)."""
    if isinstance(openai_usage, dict):
        return {"input_tokens": _int(openai_usage.get("prompt_tokens")),
                "output_tokens": _int(openai_usage.get("completion_tokens"))}
    if isinstance(timings, dict):
        return {"input_tokens": _int(timings.get("prompt_n")) + _int(timings.get("cache_n")),
                "output_tokens": _int(timings.get("predicted_n"))}
    return {"input_tokens": 0, "output_tokens": 0}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def message_response(openai: dict[str, Any], model: str, warnings: list[str]) -> dict[str, Any]:
    """A non-streaming Anthropic message from llama-server's chat answer. Pure.

    The text block comes first, present when there is text or no tool call; a tool call with no
    name is skipped with a warning; `end_turn` becomes `tool_use` when a tool block is present."""
    warnings = list(warnings)
    choices = openai.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    text = _message_text(message.get("content"))
    blocks: list[dict[str, Any]] = []
    for call in message.get("tool_calls") or []:
        if not isinstance(call, dict):
            continue
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        name = function.get("name")
        if not isinstance(name, str) or not name:
            _warn(warnings, "Encountered tool_call without function name")
            continue
        call_id = call.get("id")
        blocks.append({"type": "tool_use", "id": call_id if isinstance(call_id, str) and call_id else tool_use_id(),
                       "name": name, "input": _tool_input(function.get("arguments"), warnings)})
    if text or not blocks:
        blocks.insert(0, {"type": "text", "text": text})
    reason = stop_reason(choice.get("finish_reason", "stop"))
    if reason == "end_turn" and any(b["type"] == "tool_use" for b in blocks):
        reason = "tool_use"
    backend_id = openai.get("id")
    answer = {"id": backend_id if isinstance(backend_id, str) and backend_id else message_id(),
              "type": "message", "role": "assistant", "model": model, "content": blocks,
              "stop_reason": reason, "stop_sequence": None,
              "usage": usage(openai.get("usage"), openai.get("timings"))}
    if warnings:
        answer["warnings"] = warnings
    return answer


def _warn(warnings: list[str], text: str) -> None:
    if text not in warnings:
        warnings.append(text)


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(b["text"] for b in content
                         if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str))
    return ""


def _tool_input(arguments: Any, warnings: list[str]) -> dict[str, Any]:
    """OpenAI `arguments` (a JSON string) → an Anthropic `input` object (HEAD `parse_openai_tool_arguments`)."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        if arguments is not None:
            _warn(warnings, "Tool arguments had unsupported type; using empty object")
        return {}
    if not arguments:
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        _warn(warnings, "Failed to parse tool arguments as JSON; wrapped as _raw")
        return {"_raw": arguments}
    if isinstance(parsed, dict):
        return parsed
    _warn(warnings, "Tool arguments were not an object; wrapped as _value")
    return {"_value": parsed}


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One Anthropic SSE frame: `event: <name>\\ndata: <json>\\n\\n` (`S/anthropic_api.cpp:76-79`)."""
    return b"event: " + name.encode("ascii") + b"\ndata: " + dumps(data) + b"\n\n"


PING = sse_event("ping", {"type": "ping"})


class MessageStream:
    """Translates one OpenAI chat stream into Anthropic events. Not thread-safe: one per request.

    Event order (spec head §6.3, with the differences listed in CMake-parity-docs/anthropic_api.md):
    `message_start` and a `ping` on the first frame that is not an error; then content blocks, each
    `content_block_start`, its deltas and its `content_block_stop` before the next block starts,
    numbered 0, 1, 2 in the order they start (text as `text_delta`, a tool call as `tool_use` with
    `input_json_delta` fragments); at the end `message_delta` (stop reason, usage, warnings) and
    `message_stop`. A backend error frame becomes an `error` event, and nothing follows it.

    HEAD sends no `ping`; the real Anthropic API sends one right after `message_start`, and so do we
    (`send_ping=False` gives HEAD's sequence). HEAD also fixes the text block at index 0 and a tool
    call at index i+1 with all stops at the end; the Anthropic SDK files blocks by their order of
    arrival, so a stream with only tool calls (index 1, no index 0) breaks it. Hence the renumbering.
    """

    def __init__(self, model: str, warnings: list[str] | None = None, send_ping: bool = True):
        self.model = model
        self.warnings = list(warnings or [])
        self.send_ping = send_ping
        self.failed = False
        self._started = False  # message_start sent
        self._next_index = 0
        self._open: tuple[str, int] | None = None  # ("text", -1) or ("tool", openai index) of the open block
        self._tool_blocks: dict[int, int] = {}  # OpenAI tool-call index → Anthropic block index
        self._text_block: int | None = None
        self._stop_reason = "end_turn"
        self._usage = {"input_tokens": 0, "output_tokens": 0}

    def feed(self, chunk: dict[str, Any]) -> bytes:
        """The Anthropic SSE bytes for one parsed OpenAI stream frame (b"" when it adds nothing).
        A frame with an `error` key is handed to `error`. Frames after an error are ignored."""
        if self.failed:
            return b""
        if "error" in chunk:
            return self.error(chunk["error"])
        out = [self._message_start(chunk.get("id"))] if not self._started else []
        if isinstance(chunk.get("usage"), dict) or isinstance(chunk.get("timings"), dict):
            self._usage = usage(chunk.get("usage"), chunk.get("timings"))
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        content = delta.get("content")
        if isinstance(content, str) and content:
            out.append(self._text_delta(content))
        for call in delta.get("tool_calls") or []:
            if isinstance(call, dict):
                out.append(self._tool_delta(call))
        if choice.get("finish_reason") is not None:
            self._stop_reason = stop_reason(choice["finish_reason"])
        return b"".join(out)

    def error(self, error: Any) -> bytes:
        """The `error` event for a backend error: the value of an in-stream `{"error":…}` frame, or an
        object the handler builds when the stream breaks (`{"message":…,"type":"streaming_error"}`).
        The stream ends with it: `final()` and `feed()` return nothing afterwards. Its error type comes
        from the status rule of `errors.backend_error_status`."""
        if self.failed:
            return b""
        self.failed = True
        log.warning("Backend error in an Anthropic stream: %.500s", dumps({"error": error}).decode("utf-8", "replace"))
        _, body = errors.from_backend(None, {"error": error})
        return sse_event("error", body)

    def final(self) -> bytes:
        """The closing events, once the backend stream has ended: a `message_start` if none was sent,
        an empty text block if no block was, the stop of the open block, `message_delta`, `message_stop`."""
        if self.failed:
            return b""
        out = [self._message_start(None)] if not self._started else []
        if self._next_index == 0:
            out.append(self._start_text())
        out.append(self._close_open())
        reason = self._stop_reason
        if reason == "end_turn" and self._tool_blocks:
            reason = "tool_use"
        message_delta = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None},
                         "usage": dict(self._usage)}
        if self.warnings:
            message_delta["warnings"] = self.warnings
        out.append(sse_event("message_delta", message_delta))
        out.append(sse_event("message_stop", {"type": "message_stop"}))
        return b"".join(out)

    def _message_start(self, backend_id: Any) -> bytes:
        self._started = True
        message = {"id": backend_id if isinstance(backend_id, str) and backend_id else message_id(),
                   "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        frame = sse_event("message_start", {"type": "message_start", "message": message})
        return frame + PING if self.send_ping else frame

    def _close_open(self) -> bytes:
        if self._open is None:
            return b""
        index = self._text_block if self._open[0] == "text" else self._tool_blocks[self._open[1]]
        self._open = None
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _start_text(self) -> bytes:
        out = self._close_open()
        self._text_block, self._next_index = self._next_index, self._next_index + 1
        self._open = ("text", -1)
        return out + sse_event("content_block_start", {"type": "content_block_start", "index": self._text_block,
                                                       "content_block": {"type": "text", "text": ""}})

    def _text_delta(self, text: str) -> bytes:
        out = b"" if self._open == ("text", -1) else self._start_text()
        return out + sse_event("content_block_delta", {"type": "content_block_delta", "index": self._text_block,
                                                       "delta": {"type": "text_delta", "text": text}})

    def _tool_delta(self, call: dict[str, Any]) -> bytes:
        openai_index = call.get("index", 0)
        if not isinstance(openai_index, int) or openai_index < 0:
            return b""
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        out = b""
        if openai_index not in self._tool_blocks:
            out = self._close_open()
            index, self._next_index = self._next_index, self._next_index + 1
            self._tool_blocks[openai_index] = index
            self._open = ("tool", openai_index)
            call_id, name = call.get("id"), function.get("name")
            block = {"type": "tool_use", "id": call_id if isinstance(call_id, str) and call_id else tool_use_id(),
                     "name": name if isinstance(name, str) and name else UNKNOWN_TOOL, "input": {}}
            out += sse_event("content_block_start", {"type": "content_block_start", "index": index,
                                                     "content_block": block})
        elif self._open != ("tool", openai_index):
            # llama-server finishes one call before the next; a late fragment of an earlier call still
            # goes to that call's block rather than being lost.
            log.debug("Fragment for tool call %d after its block was closed", openai_index)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            out += sse_event("content_block_delta", {"type": "content_block_delta",
                                                     "index": self._tool_blocks[openai_index],
                                                     "delta": {"type": "input_json_delta", "partial_json": arguments}})
        return out
