"""Anthropic error bodies and their types by status (C++ HEAD `I/anthropic_error.h`).

The body is always `{"type":"error","error":{"type":<t>,"message":<m>}}` (spec head §6.4). The rule
that picks the status of a backend error lives in `lemonade.dialects`, shared with `ollama_api`.
"""
from __future__ import annotations

from typing import Any

from lemonade.dialects import backend_error_message, backend_error_object, backend_error_status
from lemonade.error_types import LemonadeError

# status → Anthropic error type (`I/anthropic_error.h:52-70`); other 4xx are invalid_request_error,
# everything else api_error.
ERROR_TYPE_BY_STATUS = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
    403: "permission_error", 404: "not_found_error", 409: "conflict_error",
    413: "request_too_large", 429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error",
}
RESIDENCY_CONFLICT = "router_residency_conflict"


def error_type_for_status(status: int) -> str:
    if status in ERROR_TYPE_BY_STATUS:
        return ERROR_TYPE_BY_STATUS[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(error_type: str, message: str) -> dict[str, Any]:
    """The one Anthropic error shape."""
    return {"type": "error", "error": {"type": error_type, "message": message}}


def error_for_status(status: int, message: str) -> tuple[int, dict[str, Any]]:
    """(status, body) with the error type that status stands for."""
    return status, error_body(error_type_for_status(status), message)


def from_backend(status: int | None, body: Any) -> tuple[int, dict[str, Any]]:
    """(status, Anthropic body) for a backend's failed answer or an in-stream `{"error":…}` frame."""
    error = backend_error_object(status, body)
    return error_for_status(backend_error_status(error), backend_error_message(error))


def from_exception(error: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, Anthropic body) for an exception raised while serving `/v1/messages`: a LemonadeError
    keeps its status (a 400 from validation is `invalid_request_error`); anything else is a 500
    `api_error` with its text (`S/anthropic_api.cpp:1006-1016`)."""
    if isinstance(error, LemonadeError):
        return error_for_status(error.status, error.message)
    return 500, error_body("api_error", str(error) or type(error).__name__)


def load_failure(model: str) -> tuple[int, dict[str, Any]]:
    """Auto-load failed for any reason (`S/anthropic_api.cpp:944-956`)."""
    return 404, error_body("not_found_error", f"model '{model}' not found, try pulling it first")


def residency_conflict(message: str) -> tuple[int, dict[str, Any]]:
    """The router cannot make room for the model (`S/anthropic_api.cpp:167-179`)."""
    return 409, error_body(RESIDENCY_CONFLICT, message)
