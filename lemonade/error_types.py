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
