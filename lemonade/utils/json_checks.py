"""Type checks for fields of a parsed JSON request body, with messages that name the field.

The dialect translators (`ollama_api`, `anthropic_api`) check the fields they read before touching
them, so a wrong type is a 400 that says what is wrong rather than a crash deep in a translation or an
opaque answer from llama-server. Every check raises `InvalidRequestError`; nothing here logs.
"""
from __future__ import annotations

from typing import Any

from lemonade.error_types import InvalidRequestError

_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
                    float: "number", type(None): "null"}
# Which Python types stand for each JSON kind a check may ask for. A bool is not a number here,
# although Python says `isinstance(True, int)`.
_KINDS: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float),
}


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (`object`, `array`, `string`, …)."""
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def is_kind(value: Any, kind: str) -> bool:
    """Whether `value` is of the JSON `kind` (one of the keys of `_KINDS`)."""
    if isinstance(value, bool) and kind != "boolean":
        return False
    return isinstance(value, _KINDS[kind])


def _describe(kinds: tuple[str, ...]) -> str:
    names = [("an " if k[0] in "aeiou" else "a ") + k for k in kinds]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check(value: Any, where: str, *kinds: str) -> Any:
    """`value` if it is of one of `kinds`; raises InvalidRequestError naming `where` otherwise."""
    if not any(is_kind(value, k) for k in kinds):
        raise InvalidRequestError(f"'{where}' must be {_describe(kinds)}, got {json_type(value)}")
    return value


def optional(body: dict[str, Any], key: str, *kinds: str, where: str = "") -> Any:
    """`body[key]` checked against `kinds`; None when the key is absent or null."""
    value = body.get(key)
    if value is None:
        return None
    return check(value, where or key, *kinds)


def objects(value: Any, where: str) -> list[dict[str, Any]]:
    """`value` as a list of objects; raises InvalidRequestError naming the first bad item."""
    check(value, where, "array")
    for i, item in enumerate(value):
        check(item, f"{where}[{i}]", "object")
    return value


def strings(value: Any, where: str) -> list[str]:
    """`value` as a list of strings; raises InvalidRequestError naming the first bad item."""
    check(value, where, "array")
    for i, item in enumerate(value):
        check(item, f"{where}[{i}]", "string")
    return value
