"""Request bodies as the handlers of every API dialect read them: strict JSON objects, typed optional
fields, and the chat path's one body rewrite (C++ B `/no_think`, spec http-api §4.4).

Shared by `handlers` (OpenAI and Lemonade routes) and the Ollama and Anthropic routes
(`ollama_routes`, `anthropic_routes`). Pure; every failure is an InvalidRequestError.
"""
from __future__ import annotations

import json
import re
from typing import Any

from lemonade.error_types import InvalidRequestError
from lemonade.utils import json_checks

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object. Raises InvalidRequestError with the parser's reason.

    Stricter than `json.loads`, like nlohmann (which the C++ server and llama-server use): UTF-8
    only (a BOM is skipped), no `NaN`/`Infinity`, no unpaired surrogate escapes. Each of those would
    otherwise reach llama-server as bytes it refuses, or fail when we serialise the body again."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"Request body is not valid UTF-8: {e}") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise InvalidRequestError("Request body is empty; expected a JSON object")
    try:
        body = _STRICT_DECODER.decode(text)
    except ValueError as e:
        raise InvalidRequestError(f"Invalid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequestError("Invalid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequestError(f"Expected a JSON object, got {_json_type(body)}")
    if _SURROGATE_ESCAPE.search(raw):
        _check_encodable(body)
    return body


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every request: `json.loads` with any keyword argument builds a new one per call.
_STRICT_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _check_encodable(value) -> None:
    """Unpaired surrogate escapes (`"\\ud800"`) decode to strings no UTF-8 encoder accepts."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError("Invalid JSON: unpaired UTF-16 surrogate in a string") from None


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def optional_field(body: dict, key: str, kind: type, kind_name: str):
    """`body[key]` if present and of `kind` (a bool is not a number here); None if absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        article = "an" if kind_name[0] in "aeiou" else "a"
        raise InvalidRequestError(f"'{key}' must be {article} {kind_name}, got {_json_type(value)}")
    return value


def check_messages(messages: list) -> None:
    """The message fields llama-server fails on with a 500 when they have the wrong type (tried
    against it: a number as `role` or `name`, a text part whose `text` is missing or not a string,
    `tool_calls` that is not an array of objects). Raises InvalidRequestError naming the field."""
    if not all(isinstance(m, dict) for m in messages):
        raise InvalidRequestError("'messages' must be an array of objects")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        json_checks.check(message.get("role"), f"{where}.role", "string")
        json_checks.optional(message, "name", "string", where=f"{where}.name")
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "text":
                    json_checks.check(part.get("text"), f"{where}.content[{j}].text", "string")
        tool_calls = json_checks.optional(message, "tool_calls", "array", where=f"{where}.tool_calls")
        if tool_calls is not None:
            json_checks.objects(tool_calls, f"{where}.tool_calls")


def apply_no_think(body: dict) -> bool:
    """C++ B: `enable_thinking: false` prepends `/no_think\\n` to the last user message with string
    content (§4.4 step 2). Returns whether the body changed."""
    messages = body.get("messages")
    if body.get("enable_thinking") is not False or not isinstance(messages, list):
        return False
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user" and isinstance(message.get("content"), str):
            message["content"] = "/no_think\n" + message["content"]
            return True
    return False
