"""OpenAI answers → Ollama answers, whole or streamed as NDJSON (C++ HEAD `S/ollama_api.cpp:523-704,
715-998`, spec head §5.2, §5.3).

Counts and durations: `usage` gives `prompt_eval_count`/`eval_count`; llama.cpp's `timings`, when
present, override them with `prompt_n`/`predicted_n` and give the durations (`prompt_ms` and
`predicted_ms` in ns). `prompt_n` leaves out the prompt tokens llama-server had cached, as Ollama's own
`prompt_eval_count` does, so count and duration describe the same work.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from lemonade.dialects import backend_error_message
from lemonade.utils.json_utils import dumps

log = logging.getLogger(__name__)

CREATED_AT = "2024-01-01T00:00:00Z"  # HEAD answers with this constant, never the time
NS_PER_MS = 1_000_000
_DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


def ndjson(record: dict[str, Any]) -> bytes:
    """One NDJSON line."""
    return dumps(record) + b"\n"


def _first_choice(openai: dict[str, Any]) -> dict[str, Any]:
    choices = openai.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def stats(usage: Any, timings: Any) -> dict[str, int]:
    """`prompt_eval_count`, `eval_count` and the four durations from `usage` and `timings`."""
    out = dict.fromkeys(_DURATIONS, 0)
    out["prompt_eval_count"] = out["eval_count"] = 0
    if isinstance(usage, dict):
        out["prompt_eval_count"] = _int(usage.get("prompt_tokens")) or 0
        out["eval_count"] = _int(usage.get("completion_tokens")) or 0
    if isinstance(timings, dict):
        for source, target in (("prompt_n", "prompt_eval_count"), ("predicted_n", "eval_count")):
            if _int(timings.get(source)) is not None:
                out[target] = _int(timings[source])
        for source, target in (("prompt_ms", "prompt_eval_duration"), ("predicted_ms", "eval_duration")):
            if _int(timings.get(source)) is not None:
                out[target] = round(timings[source] * NS_PER_MS)
        out["total_duration"] = out["prompt_eval_duration"] + out["eval_duration"]
    return out


def _message(source: dict[str, Any], whole: bool) -> dict[str, Any]:
    """An OpenAI message (`whole`) or delta → an Ollama message; `reasoning_content` → `thinking`."""
    role, content = source.get("role"), source.get("content")
    message: dict[str, Any] = {"role": role if isinstance(role, str) else "assistant",
                               "content": content if isinstance(content, str) else ""}
    if isinstance(source.get("reasoning_content"), str):
        message["thinking"] = source["reasoning_content"]
    if "tool_calls" in source and source["tool_calls"] is not None:
        message["tool_calls"] = _tool_calls(source["tool_calls"]) if whole else source["tool_calls"]
    return message


def _tool_calls(calls: Any) -> Any:
    """OpenAI tool calls → Ollama's: `arguments` JSON text becomes an object, `{}` when it does not
    parse (HEAD `normalize_ollama_tool_calls`)."""
    if not isinstance(calls, list):
        return calls
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            try:
                arguments = json.loads(function["arguments"])
            except ValueError:
                arguments = {}
            call = {**call, "function": {**function, "arguments": arguments}}
        out.append(call)
    return out


def chat_response(openai: dict[str, Any], model: str) -> dict[str, Any]:
    """A non-streaming `/api/chat` answer from llama-server's chat answer. Pure."""
    choice = _first_choice(openai)
    message = choice.get("message")
    reason = choice.get("finish_reason")
    answer: dict[str, Any] = {"model": model, "created_at": CREATED_AT,
                              "message": _message(message if isinstance(message, dict) else {}, whole=True),
                              "done_reason": reason if isinstance(reason, str) else "stop", "done": True}
    answer.update(stats(openai.get("usage"), openai.get("timings")))
    return answer


def tools_stream_lines(openai: dict[str, Any], model: str) -> bytes:
    """The whole NDJSON body of a streamed chat with tools, answered by a non-streaming backend call
    (`S/ollama_api.cpp:764-787`): the converted message with `done:false`, then the done record."""
    answer = chat_response(openai, model)
    done = {"model": model, "created_at": CREATED_AT, "message": {"role": "assistant", "content": ""},
            "done": True, "done_reason": answer["done_reason"],
            **{k: answer[k] for k in (*_DURATIONS, "prompt_eval_count", "eval_count")}}
    first = {k: v for k, v in answer.items() if k not in _DURATIONS and not k.endswith("_count")}
    first["done"] = False
    del first["done_reason"]
    return ndjson(first) + ndjson(done)


def generate_response(openai: dict[str, Any], model: str) -> dict[str, Any]:
    """A non-streaming `/api/generate` answer from llama-server's completions answer. Pure.

    The counts are present only when the backend reported usage or timings, as in HEAD. Unlike HEAD
    (always `stop`), `done_reason` is the backend's finish reason, as for chat."""
    choice = _first_choice(openai)
    text, reason = choice.get("text"), choice.get("finish_reason")
    answer: dict[str, Any] = {"model": model, "created_at": CREATED_AT, "done": True,
                              "done_reason": reason if isinstance(reason, str) else "stop",
                              "response": text if isinstance(text, str) else "", "context": []}
    counts = stats(openai.get("usage"), openai.get("timings"))
    if not isinstance(openai.get("usage"), dict) and not isinstance(openai.get("timings"), dict):
        del counts["prompt_eval_count"], counts["eval_count"]
    answer.update(counts)
    return answer


def unload_response(model: str, route: str) -> dict[str, Any]:
    """The answer to the unload convention (`keep_alive` 0 and nothing to say); `route` is "chat" or
    "generate" (`S/ollama_api.cpp:729-740, 868-879`)."""
    answer: dict[str, Any] = {"model": model, "created_at": CREATED_AT}
    if route == "chat":
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    answer.update(done=True, done_reason="unload")
    return answer


class _Stream:
    """OpenAI SSE frames in, Ollama NDJSON lines out. One per request; not thread-safe.

    `feed(frame)` returns the line for one parsed frame (b"" for a frame with nothing to relay);
    `error(value)` the line for a backend error; `final()` the closing record once the backend stream
    has ended. The last `usage` and `timings` seen feed the final record's counts and durations."""

    def __init__(self, model: str):
        self.model = model
        self.failed = False
        self._usage: Any = None
        self._timings: Any = None

    def feed(self, chunk: dict[str, Any]) -> bytes:
        if self.failed:
            return b""
        if "error" in chunk:
            return self.error(chunk["error"])
        if "usage" in chunk and isinstance(chunk["usage"], dict):
            self._usage = chunk["usage"]
        if "timings" in chunk and isinstance(chunk["timings"], dict):
            self._timings = chunk["timings"]
        choice = _first_choice(chunk)
        if not choice:
            # The usage frame of `include_usage` has no choices: nothing to relay (HEAD writes a
            # line with no message for it).
            return b""
        record = {"model": self.model, "created_at": CREATED_AT, "done": False, **self._body(choice)}
        if choice.get("finish_reason") is not None:
            record.update(done=True, done_reason=choice["finish_reason"])
        return ndjson(record)

    def error(self, error: Any) -> bytes:
        """Ollama's in-stream error line `{"error":"<message>"}`, which its clients raise on. The stream
        ends with it: `final()` and `feed()` return nothing afterwards. (HEAD writes a line with no
        message and then the normal final record, so a client sees a normal end.)"""
        if self.failed:
            return b""
        self.failed = True
        log.warning("Backend error in an Ollama stream: %.500s", dumps({"error": error}).decode("utf-8", "replace"))
        return ndjson({"error": backend_error_message(error)})

    def final(self) -> bytes:
        if self.failed:
            return b""
        counts = stats(self._usage, self._timings)
        record = {"model": self.model, "created_at": CREATED_AT, **self._final_body(), "done": True,
                  "done_reason": "stop", **counts}
        return ndjson(record)

    def _body(self, choice: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _final_body(self) -> dict[str, Any]:
        raise NotImplementedError


class ChatStream(_Stream):
    """`/api/chat` streaming: each frame's delta becomes `message` (§5.2)."""

    def _body(self, choice: dict[str, Any]) -> dict[str, Any]:
        delta = choice.get("delta")
        return {"message": _message(delta if isinstance(delta, dict) else {}, whole=False)}

    def _final_body(self) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": ""}}


class GenerateStream(_Stream):
    """`/api/generate` streaming: each frame's `text` (or `delta.content`) becomes `response` (§5.3)."""

    def _body(self, choice: dict[str, Any]) -> dict[str, Any]:
        text = choice.get("text")
        if not isinstance(text, str):
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
        return {"response": text if isinstance(text, str) else ""}

    def _final_body(self) -> dict[str, Any]:
        return {"response": "", "context": []}
