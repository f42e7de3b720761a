"""Ollama `/api/chat` and `/api/generate` requests → OpenAI chat/completions and completions bodies
(C++ HEAD `S/ollama_api.cpp:120-150, 408-518`, spec head §5, §5.2, §5.3).

Every field that is read is checked first: a wrong type is an `InvalidRequestError` (400) naming the
field, where HEAD would throw from inside nlohmann (500) or forward something llama-server refuses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lemonade.dialects import normalize_model_name
from lemonade.error_types import InvalidRequestError
from lemonade.utils import json_checks as checks
from lemonade.utils.json_utils import dumps

# Ollama option → OpenAI field (`S/ollama_api.cpp:120-127`), with the JSON kinds we accept for each.
OPTION_MAP = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
              "num_predict": "max_tokens", "repeat_penalty": "frequency_penalty"}
_OPTION_KINDS = {"temperature": ("number",), "top_p": ("number",), "seed": ("integer",),
                 "stop": ("string", "array"), "num_predict": ("integer",), "repeat_penalty": ("number",),
                 "num_ctx": ("integer",)}
IMAGE_URL_PREFIX = "data:image/png;base64,"  # HEAD labels every Ollama image PNG; decoders sniff anyway
# Ask llama-server for the usage frame at the end of a stream: it is where the counts of the final
# record come from when a backend sends no llama.cpp `timings` (HEAD relies on usage alone).
STREAM_OPTIONS = {"include_usage": True}


@dataclass
class Translated:
    """A translated Ollama request. `openai` is the backend body with `stream` set to what the backend
    should do; `stream` is what the client asked for (Ollama's default: true). They differ for a
    streamed chat with tools: the backend answers whole and `response.tools_stream_lines` frames it."""

    model: str
    openai: dict[str, Any]
    stream: bool

    @property
    def backend_stream(self) -> bool:
        return bool(self.openai.get("stream"))


def model_name(body: dict[str, Any], key: str = "model", fallback: str | None = None,
               missing: str = "model is required") -> str:
    """The normalized model name from `body[key]` (or `body[fallback]` when that is empty), without
    `:latest`. Raises InvalidRequestError with `missing` (HEAD's wording) when there is none."""
    name = checks.optional(body, key, "string") or ""
    if not name and fallback:
        name = checks.optional(body, fallback, "string") or ""
    name = normalize_model_name(name)
    if not name:
        raise InvalidRequestError(missing)
    return name


def is_unload_request(body: dict[str, Any], route: str) -> bool:
    """Ollama's unload convention: no messages (chat) or an empty prompt (generate) with
    `keep_alive` 0 (`S/ollama_api.cpp:721-741, 860-880`). `route` is "chat" or "generate".

    HEAD compares `keep_alive == 0` as JSON, so only the number matches; Ollama also reads
    duration strings, so "0", "0s", "0m" count here too. `false` does not."""
    keep_alive = body.get("keep_alive")
    if isinstance(keep_alive, bool):
        return False
    if isinstance(keep_alive, str):
        stripped = keep_alive.strip().rstrip("hms").strip()
        if stripped not in ("0", "0.0"):
            return False
    elif keep_alive != 0:
        return False
    if route == "chat":
        return not body.get("messages")
    return not body.get("prompt")


def chat_request(body: dict[str, Any]) -> Translated:
    """Check and translate an `/api/chat` body. Pure; raises InvalidRequestError."""
    model = model_name(body)
    _check_common(body)
    messages = checks.optional(body, "messages", "array")
    tools = checks.optional(body, "tools", "array")
    if tools is not None:
        checks.objects(tools, "tools")
    fmt = checks.optional(body, "format", "string", "object")
    if body.get("think") is not None:
        checks.check(body["think"], "think", "boolean", "string")  # Ollama also takes "high"/"low"
    openai: dict[str, Any] = {"model": model}
    if messages is not None:
        openai["messages"] = _messages(checks.objects(messages, "messages"))
    openai.update(_options(body))
    if tools is not None:
        openai["tools"] = tools
    if fmt == "json":
        openai["response_format"] = {"type": "json_object"}  # a schema object is ignored, as in HEAD
    if "think" in body:
        openai["enable_thinking"] = body["think"]  # the chat path's thinking controls read it (§7.2)
    stream = _stream(body)
    # A streamed chat with tools asks the backend for a whole answer (`S/ollama_api.cpp:764-787`): Ollama
    # clients expect whole tool calls with object arguments, which OpenAI streams only in fragments.
    _set_stream(openai, stream and not tools)
    return Translated(model, openai, stream)


def generate_request(body: dict[str, Any]) -> Translated:
    """Check and translate an `/api/generate` body into a completions body. `system`, `template`,
    `raw`, `images` and `context` are ignored, as in HEAD. Pure; raises InvalidRequestError."""
    model = model_name(body)
    _check_common(body)
    prompt = checks.optional(body, "prompt", "string")
    openai: dict[str, Any] = {"model": model, "prompt": prompt or ""}
    openai.update(_options(body))
    stream = _stream(body)
    _set_stream(openai, stream)
    return Translated(model, openai, stream)


def _stream(body: dict[str, Any]) -> bool:
    stream = checks.optional(body, "stream", "boolean")
    return True if stream is None else stream  # Ollama streams unless told not to


def _set_stream(openai: dict[str, Any], stream: bool) -> None:
    openai["stream"] = stream
    if stream:
        openai["stream_options"] = dict(STREAM_OPTIONS)


def _check_common(body: dict[str, Any]) -> None:
    checks.optional(body, "keep_alive", "number", "string")
    options = checks.optional(body, "options", "object") or {}
    for source, prefix in ((options, "options."), (body, "")):
        for key, kinds in _OPTION_KINDS.items():
            if source.get(key) is not None:
                checks.check(source[key], prefix + key, *kinds)
                if key == "stop" and isinstance(source[key], list):
                    checks.strings(source[key], prefix + key)


def _options(body: dict[str, Any]) -> dict[str, Any]:
    """The mapped options: `options` first, the same key at the top level overriding (HEAD)."""
    mapped: dict[str, Any] = {}
    for source in (body.get("options") or {}, body):
        for ollama_key, openai_key in OPTION_MAP.items():
            if ollama_key in source:
                mapped[openai_key] = source[ollama_key]
    return mapped


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    call_ids_by_name: dict[str, str] = {}  # for tool messages that name the function, not the call
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = checks.optional(message, "role", "string", where=f"{where}.role") or "user"
        content = checks.optional(message, "content", "string", where=f"{where}.content") or ""
        images = checks.optional(message, "images", "array", where=f"{where}.images")
        converted: dict[str, Any] = {"role": role, "content": content}
        if images:
            parts = [{"type": "text", "text": content}] if content else []
            for image in checks.strings(images, f"{where}.images"):
                parts.append({"type": "image_url", "image_url": {"url": IMAGE_URL_PREFIX + image}})
            converted["content"] = parts
        tool_calls = checks.optional(message, "tool_calls", "array", where=f"{where}.tool_calls")
        if tool_calls:
            converted["tool_calls"] = _tool_calls(checks.objects(tool_calls, f"{where}.tool_calls"), where)
            for call in converted["tool_calls"]:
                name = call.get("function", {}).get("name")
                if isinstance(call.get("id"), str) and isinstance(name, str):
                    call_ids_by_name[name] = call["id"]
        if role == "tool":
            call_id = checks.optional(message, "tool_call_id", "string", where=f"{where}.tool_call_id")
            name = checks.optional(message, "tool_name", "string", where=f"{where}.tool_name")
            if call_id:
                converted["tool_call_id"] = call_id
            elif name in call_ids_by_name:
                converted["tool_call_id"] = call_ids_by_name[name]
        out.append(converted)
    return out


def _tool_calls(calls: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Ollama tool calls → OpenAI: `type` defaults to function, object arguments become JSON text
    (HEAD `normalize_openai_tool_calls`)."""
    out = []
    for j, call in enumerate(calls):
        call = dict(call)
        function = checks.optional(call, "function", "object", where=f"{where}.tool_calls[{j}].function")
        if function is None:
            out.append(call)
            continue
        if not isinstance(call.get("type"), str):
            call["type"] = "function"
        function = dict(function)
        if "arguments" in function and not isinstance(function["arguments"], str):
            function["arguments"] = dumps(function["arguments"]).decode("utf-8")
        call["function"] = function
        out.append(call)
    return out
