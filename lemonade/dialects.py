"""What the Ollama and Anthropic dialects share. In C++ HEAD both live in one class, `OllamaApi`
(`S/ollama_api.cpp`, `S/anthropic_api.cpp`, `I/anthropic_error.h`); here each dialect is a package
(`lemonade.ollama_api`, `lemonade.anthropic_api`) and this module holds the facts they both use:
model-name normalization, the auto-load options, and how a backend error is read.
"""
from __future__ import annotations

from typing import Any

from lemonade.utils import json_checks as checks

LATEST_SUFFIX = ":latest"
# Lemonade error types that name a client fault (`I/anthropic_error.h:38-45`).
_STATUS_BY_ERROR_TYPE = {"invalid_request": 400, "invalid_request_error": 400,
                         "unsupported_operation": 400, "model_not_loaded": 404}


def normalize_model_name(name: str) -> str:
    """Drop a trailing `:latest` (`S/ollama_api.cpp:228-235`); a bare `:latest` stays as it is."""
    if name.endswith(LATEST_SUFFIX) and len(name) > len(LATEST_SUFFIX):
        return name[:-len(LATEST_SUFFIX)]
    return name


def load_options(body: dict[str, Any]) -> dict[str, Any]:
    """The only option an auto-load forwards: `ctx_size` from `options.num_ctx`, a top-level `ctx_size`
    winning (`S/ollama_api.cpp:297-312`, used for `/v1/messages` too). Raises InvalidRequestError when
    either is not an integer."""
    result: dict[str, Any] = {}
    options = checks.optional(body, "options", "object") or {}
    if options.get("num_ctx") is not None:
        result["ctx_size"] = checks.check(options["num_ctx"], "options.num_ctx", "integer")
    if body.get("ctx_size") is not None:
        result["ctx_size"] = checks.check(body["ctx_size"], "ctx_size", "integer")
    return result


def backend_error_object(status: int | None, body: Any) -> dict[str, Any]:
    """The error object of a backend's failed answer, as HEAD's streaming proxy frames it (spec head
    §7.4): a JSON body's `error` object is kept, with `status_code` added; anything else becomes
    `{"message":<error string, body text, or "backend returned HTTP N">,"type":"backend_error"}`.

    `status` is the backend's HTTP status, or None for the value of an in-stream `{"error":…}` frame
    (pass `{"error": value}` as `body`)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = dict(error)
    else:
        if isinstance(error, str) and error:
            message = error
        elif isinstance(body, str) and body.strip():
            message = body.strip()
        else:
            message = f"backend returned HTTP {status}" if status else "backend error"
        error = {"message": message, "type": "backend_error"}
    if status is not None:
        error["status_code"] = status
    return error


def backend_error_status(error: Any) -> int:
    """The status to answer a backend error object with (`I/anthropic_error.h:13-48`): `status_code`
    or `code` (llama.cpp's own bodies carry `code`), then the same under `details`, when in 400-599;
    else by `type`; else 500."""
    if not isinstance(error, dict):
        return 500
    for source in (error, error.get("details")):
        if isinstance(source, dict):
            for key in ("status_code", "code"):
                value = source.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
                    return value
    return _STATUS_BY_ERROR_TYPE.get(error.get("type", ""), 500)


def backend_error_message(error: Any) -> str:
    """The text of a backend error object: its `message`, a bare string, else "backend error"."""
    if isinstance(error, dict):
        message = error.get("message")
        return message if isinstance(message, str) and message else "backend error"
    return error if isinstance(error, str) and error else "backend error"
