"""Ollama error answers: the flat `{"error":"<message>"}` and the statuses HEAD uses (C++ HEAD
`S/ollama_api.cpp`, spec head §5 "Errors" and §5.1). Each function returns `(status, body)`.

| condition | status | function |
|---|---|---|
| no model (chat, generate, embed) / name (show, delete, pull) | 400 | `from_exception(InvalidRequestError)` |
| a field of the wrong type (ours; HEAD throws a 500 or forwards it) | 400 | the same |
| `input`/`prompt` missing on embed/embeddings | 400 | the same |
| auto-load failed on chat/generate (any reason) | 404 | `load_failure(m, "chat")` |
| auto-load failed on embed/embeddings | 404 | `load_failure(m, "embed")` |
| unknown model on show/pull | 404 | `not_found(m)` |
| delete failed: "not found"/"not supported" in the message, else | 404 / 500 | `delete_failure(msg)` |
| pull while offline | 400 | `offline()` |
| residency conflict | 409 | `residency_conflict(msg)` |
| the backend answered with an error | its status (HEAD: 500) | `from_backend(status, body)` |
| any other exception | 500 | `from_exception(e)` |
| create, copy, push, blobs | 501 | `not_supported()` |
"""
from __future__ import annotations

from typing import Any

from lemonade.dialects import backend_error_message, backend_error_object, backend_error_status
from lemonade.error_types import LemonadeError
from lemonade.ollama_api.response import ndjson

RESIDENCY_CONFLICT = "router_residency_conflict"
OFFLINE_CODE = "lemond_offline"


def error_body(message: str) -> dict[str, str]:
    """Ollama's one error shape."""
    return {"error": message}


def error_line(message: str) -> bytes:
    """The NDJSON error line of a stream that fails after it started (`/api/pull`, chat, generate)."""
    return ndjson(error_body(message))


def from_exception(error: BaseException) -> tuple[int, dict[str, Any]]:
    """A LemonadeError keeps its status and message (a 400 from a request check); anything else is a
    500 with its text, as HEAD's catch-all."""
    if isinstance(error, LemonadeError):
        return error.status, error_body(error.message)
    return 500, error_body(str(error) or type(error).__name__)


def from_backend(status: int | None, body: Any) -> tuple[int, dict[str, Any]]:
    """The backend's failed answer (`status`, parsed `body`), or an in-stream `{"error":…}` frame
    (`status` None). HEAD answers 500 for every backend error (`send_backend_error`); we keep the
    backend's status by the rule of `dialects.backend_error_status`, as HEAD's own OpenAI routes do,
    so a context overflow is a 400 the client can act on."""
    error = backend_error_object(status, body)
    return backend_error_status(error), error_body(backend_error_message(error))


def load_failure(model: str, route: str) -> tuple[int, dict[str, Any]]:
    """Auto-load failed; `route` is "chat"/"generate" (a hint to pull) or "embed"/"embeddings"."""
    if route in ("chat", "generate"):
        return 404, error_body(f"model '{model}' not found, try pulling it first")
    return not_found(model)


def not_found(model: str) -> tuple[int, dict[str, Any]]:
    return 404, error_body(f"model '{model}' not found")


def delete_failure(message: str) -> tuple[int, dict[str, Any]]:
    """`/api/delete` failed: 404 when the message says "not found" or "not supported", else 500."""
    status = 404 if "not found" in message or "not supported" in message else 500
    return status, error_body(message)


def offline(detail: str = "") -> tuple[int, dict[str, Any]]:
    """HEAD's offline refusal; `detail` (ours) says which files are missing and which setting is on."""
    message = "Lemond is in offline mode, models not downloaded" + (f": {detail}" if detail else "")
    return 400, {"error": message, "code": OFFLINE_CODE}


def residency_conflict(message: str) -> tuple[int, dict[str, Any]]:
    return 409, {"error": message, "type": RESIDENCY_CONFLICT, "code": RESIDENCY_CONFLICT}


def not_supported() -> tuple[int, dict[str, Any]]:
    return 501, error_body("not supported by Lemonade")
