"""Exception classes and the one mapping to HTTP status and JSON body (C++ `include/lemon/error_types.h`).

Errors are raised at their source and rendered only at the edge (HTTP handler or CLI). The body shape
is the C++ `ErrorResponse::create`: `{"error":{"message":…,"type":…[,"details":{…}]}}`.
"""
from __future__ import annotations

from typing import Any


class LemonadeError(Exception):
    """Base class. `error_type` is the C++ error type string; `status` the HTTP status we answer with."""

    error_type = "internal_error"
    status = 500
    string_body = False  # C++ answers this one as {"error": "<text>"} on every route

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.details)


class ModelNotFoundError(LemonadeError):
    """A name that is not in the (recipe-filtered) registry. Message as C++: `Model not found: <name>`."""

    error_type = "not_found"
    status = 404

    def __init__(self, name: str):
        super().__init__(f"Model not found: {name}")
        self.name = name


class ModelNotDownloadedError(LemonadeError):
    """A delete of a known model that has nothing on disk. C++ answers "Deleted model" here; we say
    that nothing was deleted, with the status C++ gives a delete of an unknown model."""

    error_type = "not_found"
    status = 422

    def __init__(self, name: str):
        super().__init__(f"Model {name} is not downloaded: nothing to delete")
        self.name = name


class ModelNotLoadedError(LemonadeError):
    error_type = "model_not_loaded"
    status = 400

    def __init__(self, details: str = ""):
        super().__init__(f"No model loaded: {details}" if details else "No model loaded")


class InvalidRequestError(LemonadeError):
    error_type = "invalid_request"
    status = 400


class RequestTooLargeError(InvalidRequestError):
    status = 413


class RequestTimeoutError(InvalidRequestError):
    """The client did not send its request within the socket timeout."""

    status = 408


class LengthRequiredError(InvalidRequestError):
    status = 411


class UnsupportedCodingError(InvalidRequestError):
    """A request body in a transfer coding we cannot decode (RFC 9112 §6.1: 501)."""

    status = 501


class ConflictError(LemonadeError):
    """A name that is already taken (add-local-model)."""

    error_type = "invalid_request"
    status = 409


class UnsupportedOperationError(LemonadeError):
    error_type = "unsupported_operation"
    status = 422


class BackendError(LemonadeError):
    error_type = "backend_error"
    status = 502


class UpstreamError(BackendError):
    """A remote upstream answered with an error: its own status is ours, so a refused key stays a 401."""

    error_type = "upstream_error"

    def __init__(self, message: str, status: int, details: dict[str, Any] | None = None):
        super().__init__(message, details)
        self.status = status


class RpcWorkerError(BackendError):
    """A llama.cpp RPC worker a model needs is down, unreachable or busy, or was lost while in use."""

    error_type = "rpc_worker_error"


class ConfigurationError(LemonadeError):
    """A setting the server was given cannot work (e.g. a model's API key variable is not set)."""

    error_type = "configuration_error"
    status = 500


class NetworkError(LemonadeError):
    error_type = "network_error"
    status = 502

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"Network error: {message}", details)


class InstallationError(LemonadeError):
    error_type = "installation_error"
    status = 500


class DownloadError(LemonadeError):
    error_type = "download_error"
    status = 500


class NotInRepositoryError(DownloadError):
    """A pull names a variant or an mmproj file the repository does not have: the request is at fault,
    so 400 naming it (C++ answers 500 for every pull error)."""

    error_type = "invalid_request"
    status = 400


class OfflineError(DownloadError):
    """A model must be downloaded and offline mode forbids it (HEAD answers 400 `lemond_offline`; C++
    GA ignored the flag and failed on the network)."""

    error_type = "offline"
    status = 400


class ProcessError(LemonadeError):
    """A backend child that failed to start, died or hung."""

    error_type = "process_error"
    status = 500


class FileError(LemonadeError):
    error_type = "file_error"
    status = 500


class RegistryError(LemonadeError):
    """A pull/registration request the registry refuses (http-api §4.9 messages)."""

    error_type = "invalid_request"
    status = 400


def error_body(message: str, error_type: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The C++ `ErrorResponse::create` shape."""
    error: dict[str, Any] = {"message": message, "type": error_type}
    if details:
        error["details"] = details
    return {"error": error}


def not_found_body(path: str, message: str = "The requested endpoint does not exist") -> dict[str, Any]:
    """The C++ error handler's 404 body (http-api §2.6); `message` names the real cause where we know it."""
    return {"error": {"message": message, "path": path, "type": "not_found"}}


def simple_error_body(message: str) -> dict[str, Any]:
    """The C++ handlers' catch-all body `{"error":"<text>"}` (http-api §2.8, §4.10)."""
    return {"error": message}


def render(error: LemonadeError, style: str, path: str) -> tuple[int, dict[str, Any]]:
    """(status, body) of `error` on a route whose errors have `style` (`routes.Errors` values):
    "string" is `{"error": "<text>"}`; "openai" the nested object, with the endpoint's path added to
    a 404 (http-api §2.6). Dialect routes register their own styles in `RENDERERS`."""
    if style in RENDERERS:
        return RENDERERS[style](error, path)
    if style == "string" or error.string_body:
        return error.status, simple_error_body(error.message)
    if error.status == 404:
        return 404, not_found_body(path, error.message)
    return error.status, error.to_body()


RENDERERS: dict[str, Any] = {}  # style -> (error, path) -> (status, body), for the other API dialects


def backend_error_body(server_name: str, status: int, response: Any) -> dict[str, Any]:
    """A backend's non-200 answer as an OpenAI error (HEAD `wrapped_server.cpp` 114-150): the
    backend's own message and type where it gave them (C++ GA buried them in `details` under
    "<server> request failed"), its status, and the whole answer in `details`."""
    error = response.get("error") if isinstance(response, dict) else None
    error = error if isinstance(error, dict) else {}
    message = error.get("message") if isinstance(error.get("message"), str) else None
    if message is None:
        text = response if isinstance(response, str) else ""
        message = text.strip()[:500] or f"{server_name} answered with HTTP {status}"
    kind = error.get("type") if isinstance(error.get("type"), str) else None
    body: dict[str, Any] = {
        "message": message,
        "type": kind or ("invalid_request_error" if 400 <= status < 500 else "backend_error"),
        "status_code": status,
        "details": {"backend": server_name, "response": response, "status_code": status},
    }
    if "code" in error:
        body["code"] = error["code"]
    return {"error": body}


UNSUPPORTED_ERROR_TYPES = frozenset({"not_supported_error", "unsupported_operation"})


def backend_status_for_client(status: int, response: Any) -> int:
    """The status a client gets for a backend's non-200 answer: the backend's own, except that a
    5xx meaning "this model does not do that" (llama-server's 501 `not_supported_error`, e.g.
    embeddings from a server started without `--embeddings`) becomes 400. SDKs retry every 5xx
    (the openai client twice, with backoff), and no retry can help here; the body keeps the
    backend's status in `status_code`."""
    if status == 501:
        return 400
    error = response.get("error") if isinstance(response, dict) else None
    if status >= 500 and isinstance(error, dict) and error.get("type") in UNSUPPORTED_ERROR_TYPES:
        return 400
    return status


class NoModelError(InvalidRequestError):
    """A request names no model and none is loaded. C++ answers with a plain string body here."""

    string_body = True

    def __init__(self) -> None:
        super().__init__("No model loaded and no model specified in request")


class ModelNotLoadedNamedError(LemonadeError):
    """`/unload` or a pin of a model that is not loaded (HEAD: `Model not loaded: <name>`)."""

    error_type = "model_not_loaded"
    status = 404

    def __init__(self, name: str):
        super().__init__(f"Model not loaded: {name}")
        self.name = name


class SlotsPinnedError(LemonadeError):
    """A load needs a slot, and every loaded model of its type is pinned (HEAD `SlotsPinnedException`)."""

    error_type = "slots_pinned_error"
    status = 409

    def __init__(self, pool: str):
        super().__init__(f"All loaded models of type {pool} are pinned. Unload a model first.")


class ModelBusyError(LemonadeError):
    """A load needs a slot, and the models that could give one up kept serving requests."""

    error_type = "model_busy"
    status = 503
