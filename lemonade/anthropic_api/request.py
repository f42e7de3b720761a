"""Anthropic Messages request → OpenAI chat/completions body (C++ HEAD `S/anthropic_api.cpp:188-478`,
spec head §6.1).

Top-level fields of the wrong type are a 400 (`InvalidRequestError`); inside the content, HEAD's
policy is kept: what cannot be translated is dropped with a warning, and the warnings travel to the
client (header, `warnings` on the answer, `message_delta.warnings` when streaming).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from lemonade.dialects import normalize_model_name
from lemonade.error_types import InvalidRequestError
from lemonade.utils import json_checks as checks
from lemonade.utils.json_utils import dumps

@dataclass
class Translated:
    """A translated `/v1/messages` request. `openai` is the body for llama-server's
    `/v1/chat/completions`, with `stream` set; `model` is the normalized name the answer carries."""

    model: str
    openai: dict[str, Any]
    stream: bool
    warnings: list[str] = field(default_factory=list)


class _Warnings(list):
    """The request's warnings, each once, in order (HEAD `add_warning`)."""

    def add(self, text: str) -> None:
        if text not in self:
            self.append(text)


def tool_use_id() -> str:
    """An id for a tool call that came without one (Anthropic's own ids look like `toolu_…`)."""
    return "toolu_" + secrets.token_hex(12)


def translate_request(body: dict[str, Any], beta: str | None = None,
                      require_max_tokens: bool = False) -> Translated:
    """Check and translate a parsed `/v1/messages` body. `beta` is the `?beta=` query value if any.

    Pure; raises InvalidRequestError for a missing model or messages, or a top-level field of the
    wrong type. `require_max_tokens` is off because HEAD does not require it (Anthropic does).
    """
    model = _model(body)
    _check_top_level(body, require_max_tokens)
    warnings = _Warnings()
    if beta is not None and beta != "true":
        warnings.add(f"Ignored unsupported beta query value: {beta}")
    openai: dict[str, Any] = {"model": model, "messages": _messages(body, warnings)}
    if "max_tokens" in body:
        # llama.cpp reads max_tokens; HEAD copies max_completion_tokens over later (spec head §7.2).
        openai["max_completion_tokens"] = openai["max_tokens"] = body["max_tokens"]
    for key in ("temperature", "top_p", "top_k"):
        if body.get(key) is not None:
            openai[key] = body[key]
    if body.get("stop_sequences") is not None:
        openai["stop"] = body["stop_sequences"]
    _tools(body, openai, warnings)
    _output_format(body, openai, warnings)
    _thinking(body, openai, warnings)
    for ignored in ("metadata", "context_management"):
        if ignored in body:
            warnings.add(f"Ignored '{ignored}' field")
    stream = bool(body.get("stream", False))
    openai["stream"] = stream
    if stream:
        # The usage frame at the end of the stream carries the counts of `message_delta` (ours: HEAD
        # reads `usage` but does not ask for it, and llama-server sends it only when asked).
        openai["stream_options"] = {"include_usage": True}
    return Translated(model, openai, stream, list(warnings))


def warning_header(warnings: list[str]) -> str | None:
    """The `X-Lemonade-Warning` header value, or None when there is nothing to say."""
    return " | ".join(warnings) if warnings else None


def _model(body: dict[str, Any]) -> str:
    model = checks.optional(body, "model", "string")
    model = normalize_model_name(model or "")
    if not model:
        raise InvalidRequestError("model is required")
    return model


def _check_top_level(body: dict[str, Any], require_max_tokens: bool) -> None:
    if body.get("messages") is None:
        raise InvalidRequestError("messages is required")
    for i, message in enumerate(checks.objects(body["messages"], "messages")):
        checks.optional(message, "role", "string", where=f"messages[{i}].role")
        checks.optional(message, "content", "string", "array", where=f"messages[{i}].content")
    if require_max_tokens and body.get("max_tokens") is None:
        raise InvalidRequestError("max_tokens is required")
    checks.optional(body, "system", "string", "array")
    checks.optional(body, "max_tokens", "integer")
    checks.optional(body, "temperature", "number")
    checks.optional(body, "top_p", "number")
    checks.optional(body, "top_k", "integer")
    checks.optional(body, "stream", "boolean")
    checks.optional(body, "tools", "array")
    checks.optional(body, "tool_choice", "object")
    checks.optional(body, "output_config", "object")
    checks.optional(body, "thinking", "object")
    if body.get("stop_sequences") is not None:
        checks.strings(body["stop_sequences"], "stop_sequences")


def _join_text_blocks(value: Any, where: str, warnings: _Warnings) -> str:
    """A string, or the `text` of an array's text blocks joined with LF (HEAD `join_text_blocks`)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        warnings.add(f"Ignored non-string/non-array '{where}' field")
        return ""
    parts = []
    for block in value:
        if not isinstance(block, dict):
            warnings.add(f"Ignored non-object block in '{where}'")
        elif block.get("type") == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        else:
            warnings.add(f"Ignored unsupported '{where}' block type: {block.get('type', '')}")
    return "\n".join(parts)


def _messages(body: dict[str, Any], warnings: _Warnings) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.get("system") is not None:
        system = _join_text_blocks(body["system"], "system", warnings)
        if system:
            messages.append({"role": "system", "content": system})
    for message in body["messages"]:
        role = message.get("role") or "user"
        if role == "system":
            warnings.add("Ignored 'system' role in messages; use top-level system field")
            continue
        if role not in ("user", "assistant"):
            warnings.add(f"Unsupported role '{role}' mapped to 'user'")
            role = "user"
        content = message.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
        else:
            messages.extend(_block_message(role, content or [], warnings))
    return messages


def _block_message(role: str, blocks: list[Any], warnings: _Warnings) -> list[dict[str, Any]]:
    """One Anthropic message with content blocks → its OpenAI messages: the `tool` messages of its
    `tool_result` blocks first, then the message itself (see the parity page: HEAD puts the tool
    messages after it, which separates them from the assistant's tool_calls)."""
    parts: list[dict[str, Any]] = []
    tool_calls: list[dict[str, Any]] = []
    tool_messages: list[dict[str, Any]] = []
    for block in blocks:
        if not isinstance(block, dict):
            warnings.add("Ignored non-object message content block")
            continue
        kind = block.get("type", "")
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and isinstance(block.get("source"), dict):
            image = _image_part(block["source"])
            if image is None:
                warnings.add("Ignored image block with unsupported source format")
            else:
                parts.append(image)
        elif kind == "tool_use":
            call = _tool_call(role, block, warnings)
            if call is not None:
                tool_calls.append(call)
        elif kind == "tool_result":
            result = _tool_result(role, block, warnings)
            if result is not None:
                tool_messages.append(result)
        else:
            warnings.add(f"Ignored unsupported message content block type: {kind}")
    out: dict[str, Any] = {"role": role, "content": _content(parts)}
    if tool_calls:
        out["tool_calls"] = tool_calls
    if role == "assistant" or parts or tool_calls:
        return tool_messages + [out]
    return tool_messages


def _content(parts: list[dict[str, Any]]) -> Any:
    """Text-only content is flattened into one string (LF-joined), as HEAD does; otherwise parts."""
    if all(part["type"] == "text" for part in parts):
        return "\n".join(part["text"] for part in parts)
    return parts


def _image_part(source: dict[str, Any]) -> dict[str, Any] | None:
    media_type, data = source.get("media_type"), source.get("data")
    if source.get("type") != "base64" or not isinstance(media_type, str) or not media_type \
            or not isinstance(data, str) or not data:
        return None
    return {"type": "image_url", "image_url": {"url": f"data:{media_type};base64,{data}"}}


def _tool_call(role: str, block: dict[str, Any], warnings: _Warnings) -> dict[str, Any] | None:
    if role != "assistant":
        warnings.add("Ignored tool_use block outside assistant role")
        return None
    name = block.get("name")
    if not isinstance(name, str) or not name:
        warnings.add("Ignored tool_use block missing name")
        return None
    tool_input = block.get("input", {})
    if not isinstance(tool_input, dict):
        warnings.add("tool_use.input was not an object; wrapped as _value")
        tool_input = {"_value": tool_input}
    call_id = block.get("id")
    return {"id": call_id if isinstance(call_id, str) and call_id else tool_use_id(), "type": "function",
            "function": {"name": name, "arguments": dumps(tool_input).decode("utf-8")}}


def _tool_result(role: str, block: dict[str, Any], warnings: _Warnings) -> dict[str, Any] | None:
    if role != "user":
        warnings.add("Ignored tool_result block outside user role")
        return None
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        warnings.add("Ignored tool_result block missing tool_use_id")
        return None
    content = _tool_result_text(block["content"], warnings) if "content" in block else ""
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def _tool_result_text(content: Any, warnings: _Warnings) -> str:
    """HEAD `stringify_anthropic_tool_result_content`: a string, text blocks joined with LF, or an
    object as JSON text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if not isinstance(block, dict):
                warnings.add("Ignored non-object block in tool_result.content")
            elif block.get("type") == "text" and isinstance(block.get("text"), str):
                parts.append(block["text"])
            else:
                warnings.add(f"Ignored unsupported block type in tool_result.content: {block.get('type', '')}")
        return "\n".join(parts)
    if isinstance(content, dict):
        return dumps(content).decode("utf-8")
    warnings.add("Ignored unsupported type for tool_result.content")
    return ""


def _tools(body: dict[str, Any], openai: dict[str, Any], warnings: _Warnings) -> None:
    tools = []
    for tool in body.get("tools") or []:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            warnings.add("Ignored invalid tool definition in 'tools'")
            continue
        schema = tool.get("input_schema")
        description = tool.get("description")
        tools.append({"type": "function", "function": {
            "name": tool["name"], "description": description if isinstance(description, str) else "",
            "parameters": schema if isinstance(schema, dict) else {}}})
    if tools:
        openai["tools"] = tools
    choice = body.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type", "auto")
    if kind in ("auto", "any", "none"):
        openai["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
    elif kind == "tool":
        name = choice.get("name")
        if isinstance(name, str) and name:
            openai["tool_choice"] = {"type": "function", "function": {"name": name}}
        else:
            warnings.add("Ignored tool_choice.type=tool without name")
    else:
        warnings.add(f"Ignored unsupported tool_choice.type: {kind}")
    if choice.get("disable_parallel_tool_use") is True:
        openai["parallel_tool_calls"] = False  # ours: HEAD ignores the flag


def _output_format(body: dict[str, Any], openai: dict[str, Any], warnings: _Warnings) -> None:
    output_format = (body.get("output_config") or {}).get("format")
    if not isinstance(output_format, dict):
        return
    kind = output_format.get("type", "")
    if kind == "json_schema" and isinstance(output_format.get("schema"), dict):
        openai["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": "response", "schema": output_format["schema"]}}
    elif kind == "json_object":
        openai["response_format"] = {"type": "json_object"}
    else:
        warnings.add(f"Ignored unsupported output_config.format type: {kind}")


def _thinking(body: dict[str, Any], openai: dict[str, Any], warnings: _Warnings) -> None:
    thinking = body.get("thinking")
    if thinking is None:
        return
    kind = thinking.get("type", "")
    if kind in ("enabled", "disabled"):
        openai["enable_thinking"] = kind == "enabled"  # the chat path's thinking controls read it
    else:
        warnings.add(f"Ignored unsupported thinking.type: {kind}")
