"""The endpoint handlers (C++ `server/server.cpp` handle_* functions), one method per route.

Each handler parses the request, calls the router or the model manager, and writes the answer through
the `Handler` helpers of `httpd`. Shapes and statuses follow spec http-api.md (B); where B hides the
real cause of an error we return it (see CMake-parity-docs/server.md).
"""
from __future__ import annotations

import json
import logging
import re
import threading
from typing import Any

from lemonade import streaming_proxy
from lemonade.error_types import (InvalidRequestError, LemonadeError, ModelNotFoundError,
                                  ModelNotLoadedError, error_body, simple_error_body)
from lemonade.server.httpd import ClientDisconnected
from lemonade.utils.json_utils import dumps

log = logging.getLogger(__name__)

MODEL_CREATED = 1234567890  # the constant `created` of C++ model entries (§4.2)
SHUTDOWN_DELAY = 0.1  # C++ answers, then stops 100 ms later (§4.19)


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


class Api:
    def __init__(self, router, models, config, on_shutdown):
        self.router = router
        self.manager = models
        self.config = config
        self.on_shutdown = on_shutdown
        self.requested_log_level = config.log_level  # C++ stores it and nothing reads it (§4.17)

    # -- status ------------------------------------------------------------------------------------

    def health(self, h) -> None:
        loaded = self.router.loaded()
        h.send_json(200, {
            "checkpoint_loaded": loaded.checkpoint if loaded else None,
            "context_size": self.config.ctx_size,
            "log_streaming": {"sse": True, "websocket": False},
            "model_loaded": loaded.name if loaded else None,
            "status": "ok",
        })

    def models(self, h) -> None:
        show_all = h.query.get("show_all", [""])[0] == "true"
        entries = []
        for name, info in sorted(self.manager.supported_models().items()):
            downloaded = self.manager.is_downloaded(info)
            if not show_all and not downloaded:
                continue
            entry = {"checkpoint": info.checkpoint, "created": MODEL_CREATED, "id": name,
                     "object": "model", "owned_by": "lemonade", "recipe": info.recipe}
            if show_all:
                entry.update(name=name, downloaded=downloaded, labels=info.labels)
            entries.append(entry)
        h.send_json(200, {"data": entries, "object": "list"})

    def model_by_id(self, h, id: str) -> None:
        info = self.manager.get_model(id)  # ModelNotFoundError → 404
        h.send_json(200, {"checkpoint": info.checkpoint, "id": info.name, "name": info.name,
                          "recipe": info.recipe})

    def stats(self, h) -> None:
        try:
            h.send_json(200, self.router.telemetry())
        except ModelNotLoadedError as e:
            h.send_json(200, e.to_body())  # C++ answers 200 here (§4.15)

    def system_info(self, h) -> None:
        from lemonade import system_info

        verbose = h.query.get("verbose", [""])[0].lower() in ("true", "1")
        h.send_json(200, system_info.get_system_info(verbose))

    # -- inference ---------------------------------------------------------------------------------

    def _inference_body(self, h) -> tuple[bytes, dict, str | None, bool]:
        """Read and check the fields Lemonade itself interprets (§4.4); the rest is the backend's."""
        raw = h.read_body()
        body = parse_json_object(raw)
        model = optional_field(body, "model", str, "string")
        stream = optional_field(body, "stream", bool, "boolean")
        messages = optional_field(body, "messages", list, "array")
        if messages is not None and not all(isinstance(m, dict) for m in messages):
            raise InvalidRequestError("'messages' must be an array of objects")
        if model is None and self.router.loaded() is None:
            h.send_json(400, simple_error_body("No model loaded and no model specified in request"))
            raise _Answered()
        return raw, body, model, bool(stream)

    def _proxy(self, h, endpoint: str, rewrite=None, check=None, telemetry: bool = True) -> None:
        try:
            raw, body, model, stream = self._inference_body(h)
        except _Answered:
            return
        if rewrite and rewrite(body):
            raw = None  # the body changed: it is serialised again
        with self.router.use(model) as backend:
            if stream:
                self._relay(h, backend, endpoint, raw, body)
                return
            reply = self.router.forward(backend, endpoint, body, raw, telemetry=telemetry)
        if reply.status == 200:
            status, answer = check(reply.body) if check else (200, reply.body)
            h.send_json(status, answer)
        else:  # C++ wraps it and answers 200; we keep the wrapper and the backend's status
            h.send_json(reply.status, backend_error_body(backend.server_name, reply.status, reply.body))

    def _relay(self, h, backend, endpoint: str, raw: bytes | None, body: dict) -> None:
        """Stream the backend's SSE answer. `raw` is the client's body when nothing rewrote it: C++
        forwards the original bytes in that case (§4.4)."""
        response = backend.open_stream(endpoint, backend.request_payload(endpoint, body, raw))
        if response.status_code != 200:
            # Answer with the backend's status and body instead of a broken 200 stream (C++ §5).
            try:
                detail = response.json_or_text()
            finally:
                response.close()
            h.send_json(response.status_code,
                        backend_error_body(backend.server_name, response.status_code, detail))
            return
        h.start_sse()
        result = streaming_proxy.relay(response, _chunk_writer(h))
        if result.completed:
            h.end_chunks()
            if result.last_stats_frame:
                backend.telemetry.update(result.last_stats_frame, streaming=True)
        else:
            h.close_connection = True

    def chat_completions(self, h) -> None:
        self._proxy(h, "/v1/chat/completions", rewrite=apply_no_think)

    def completions(self, h) -> None:
        self._proxy(h, "/v1/completions", check=_check_completion)

    def embeddings(self, h) -> None:
        self._proxy(h, "/v1/embeddings", telemetry=False)  # C++ keeps telemetry for completions only

    def reranking(self, h) -> None:
        self._proxy(h, "/v1/rerank", telemetry=False)

    def responses(self, h) -> None:
        try:
            _, _, model, _ = self._inference_body(h)
        except _Answered:
            return
        with self.router.use(model) as backend:
            recipe = backend.recipe
        # B loads first, then refuses every non-OGA recipe (§4.8); no OGA backend exists on Linux.
        h.send_json(422, {"error": {"code": "responses_not_supported",
                                    "message": f"Responses API not supported for recipe: {recipe}",
                                    "type": "unsupported_recipe"}})

    # -- model management --------------------------------------------------------------------------

    def load(self, h) -> None:
        body = parse_json_object(h.read_body())
        name = optional_field(body, "model_name", str, "string")
        if not name:
            raise InvalidRequestError("'model_name' is required")
        info, already = self.router.load(name)
        answer = {"checkpoint": info.checkpoint, "model_name": info.name, "recipe": info.recipe,
                  "status": "success"}
        if already:
            answer["message"] = "Model already loaded"
        h.send_json(200, answer)

    def unload(self, h) -> None:
        h.read_body()  # ignored, as in C++
        self.router.unload()
        h.send_json(200, {"message": "Model unloaded successfully", "status": "success"})

    def pull(self, h) -> None:
        body = parse_json_object(h.read_body())
        name = body.get("model") or body.get("model_name")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("'model' or 'model_name' is required")
        kwargs = {
            "checkpoint": optional_field(body, "checkpoint", str, "string") or "",
            "recipe": optional_field(body, "recipe", str, "string") or "",
            "reasoning": bool(optional_field(body, "reasoning", bool, "boolean")),
            "vision": bool(optional_field(body, "vision", bool, "boolean")),
            "mmproj": optional_field(body, "mmproj", str, "string") or "",
            "do_not_upgrade": bool(optional_field(body, "do_not_upgrade", bool, "boolean")),
        }
        if optional_field(body, "stream", bool, "boolean"):
            self._pull_stream(h, name, kwargs)
            return
        self.manager.download(name, **kwargs)
        h.send_json(200, {"model_name": name, "status": "success"})

    def _pull_stream(self, h, name: str, kwargs: dict) -> None:
        """SSE variant added upstream after GA: `progress`, then `complete` or `error` events."""
        h.start_sse()
        write = _chunk_writer(h)

        def on_progress(p) -> None:
            write(b"event: progress\ndata: " + dumps(progress_event(p)) + b"\n\n")

        try:
            self.manager.download(name, progress=on_progress, **kwargs)
            write(b"event: complete\ndata: " + dumps({"model_name": name, "status": "success"}) + b"\n\n")
        except LemonadeError as e:
            write(b"event: error\ndata: " + dumps({"error": e.message}) + b"\n\n")
        except streaming_proxy.ClientGone:
            h.close_connection = True
            return
        h.end_chunks()

    def delete(self, h) -> None:
        body = parse_json_object(h.read_body())
        name = body.get("model") or body.get("model_name")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("'model' or 'model_name' is required")
        try:
            self.manager.delete(name)
        except ModelNotFoundError:
            h.send_json(422, simple_error_body(f"Model not found: {name}"))
            return
        h.send_json(200, {"message": f"Deleted model: {name}", "status": "success"})

    def params(self, h) -> None:
        h.read_body()
        h.send_json(200, {"status": "success"})

    def log_level(self, h) -> None:
        body = parse_json_object(h.read_body())
        level = body.get("level")
        if not isinstance(level, str):
            raise InvalidRequestError("'level' must be a string")
        self.requested_log_level = level
        h.send_json(200, {"level": level, "status": "success"})

    def add_local_model(self, h) -> None:
        from lemonade.server import upload

        upload.handle_add_local_model(h, self.manager)

    def logs_stream(self, h) -> None:
        from lemonade.server import logs

        logs.stream_log(h)

    # -- misc --------------------------------------------------------------------------------------

    def shutdown(self, h) -> None:
        h.read_body()
        h.close_connection = True
        h.send_json(200, {"status": "shutting down"})
        threading.Timer(SHUTDOWN_DELAY, self.on_shutdown).start()

    def test(self, h) -> None:
        h.read_body()
        h.send_bytes(200, b'{"test": "ok"}', "application/json")

    def root(self, h) -> None:
        h.send_bytes(302, b"", "text/plain", (("Location", "/webapp.html"),))

    def webapp(self, h) -> None:
        from lemonade.server import webui

        webui.serve_webapp(h, self.manager, self.config.port)

    def static(self, h, path: str) -> None:
        from lemonade.server import webui

        webui.serve_static(h, path)


def backend_error_body(server_name: str, status: int, response: Any) -> dict[str, Any]:
    """C++ B's wrapper of a backend's non-200 answer (§4.4): `<server> request failed`."""
    return error_body(f"{server_name} request failed", "backend_error",
                      {"response": response, "status_code": status})


def _check_completion(body) -> tuple[int, Any]:
    """C++ completions (§4.5): a backend body with `error` → 500 with it; without `choices` → 500."""
    if isinstance(body, dict) and "error" in body:
        return 500, body
    if not isinstance(body, dict) or "choices" not in body:
        return 500, simple_error_body("Backend returned invalid response format")
    return 200, body


class _Answered(Exception):
    """The handler already wrote its answer."""


def _chunk_writer(h):
    def write(data: bytes) -> None:
        try:
            h.write_chunk(data)
        except ClientDisconnected as e:
            raise streaming_proxy.ClientGone() from e
    return write


def progress_event(p) -> dict[str, Any]:
    """A DownloadProgress as upstream's SSE `progress` event fields."""
    return {"file": p.file, "file_index": p.file_index, "total_files": p.file_count,
            "bytes_downloaded": p.bytes_done, "bytes_total": p.bytes_total,
            "total_download_size": p.total_bytes, "total_downloaded": p.total_done,
            "percent": round(p.percent, 1)}

