"""The endpoint handlers (C++ `server/server.cpp` handle_* functions), one method per route.

Each handler parses the request, calls the router or the model manager, and writes the answer through
the `Handler` helpers of `httpd`. Shapes and statuses follow spec http-api.md (B); where B hides the
real cause of an error we return it (see CMake-parity-docs/server.md).
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from lemonade import __version__, streaming_proxy
from lemonade.error_types import (InvalidRequestError, LemonadeError, ModelNotFoundError,
                                  ModelNotLoadedError, ModelNotLoadedNamedError, simple_error_body)
from lemonade.model_manager import SETTINGS as MODEL_SETTINGS
from lemonade.server.anthropic_routes import AnthropicRoutes
from lemonade.server.json_body import apply_no_think, check_messages, optional_field, parse_json_object
from lemonade.server.ollama_routes import OllamaRoutes
from lemonade.utils import json_checks
from lemonade.utils.json_utils import dumps
from lemonade.wrapped_server import BackendCall, StartProgress

log = logging.getLogger(__name__)

MODEL_CREATED = 1234567890  # the constant `created` of C++ model entries (§4.2)
SHUTDOWN_DELAY = 0.1  # C++ answers, then stops 100 ms later (§4.19)


class Api(OllamaRoutes, AnthropicRoutes):
    """Every route's handler (`routes.ROUTES` names them); the Ollama and Anthropic ones come from
    their mixins."""

    def __init__(self, router, models, config, on_shutdown):
        self.router = router
        self.manager = models
        self.config = config
        self.on_shutdown = on_shutdown
        self.requested_log_level = config.log_level  # C++ stores it and nothing reads it (§4.17)
        from lemonade.server.metrics import BackendScraper

        self.scraper = BackendScraper()  # llama-server /metrics, cached per backend

    # -- status ------------------------------------------------------------------------------------

    def health(self, h) -> None:
        """GA's keys plus HEAD's list of every loaded model (head-llm-surface.md §3.10)."""
        loaded = self.router.loaded()
        current = loaded[0].info if loaded else None
        limit = self.router.limits.max_loaded
        pinned = self.router.pinned_count()
        h.send_json(200, {
            "all_models_loaded": [health_entry(m) for m in loaded],
            "checkpoint_loaded": current.checkpoint if current else None,
            "context_size": self.config.ctx_size,
            "log_streaming": {"sse": True, "websocket": False},
            "max_models": {kind: limit for kind in MODEL_TYPES},
            "model_loaded": current.name if current else None,
            "pinned_models": {kind: pinned.get(kind, 0) for kind in MODEL_TYPES},
            "status": "ok",
            "version": __version__,
        })

    def metrics(self, h) -> None:
        """Prometheus text (HEAD §7.6). Blocks for at most one scrape of each loaded llama-server."""
        from lemonade.server import metrics

        usage = self.router.usage()
        texts = {m.info.name: self.scraper.text(m.backend.base_url())
                 for m in usage.loaded if m.backend.exposes_metrics}
        limit = self.router.limits.max_loaded
        page = metrics.render(usage, __version__, {kind: limit for kind in MODEL_TYPES}, texts,
                              metrics.system_gauges())
        h.send_bytes(200, page.encode("utf-8"), metrics.CONTENT_TYPE)

    def live(self, h) -> None:
        """Liveness only: touches neither models nor the router (HEAD §7.7)."""
        h.send_json(200, {"status": "ok"})

    def models(self, h) -> None:
        show_all = h.query.get("show_all", [""])[0] == "true"
        entries = []
        for name, info in sorted(self.manager.supported_models().items()):
            downloaded = self.manager.is_downloaded(info)
            if not show_all and not downloaded:
                continue
            entry = {"checkpoint": info.checkpoint, "created": MODEL_CREATED, "id": name,
                     "object": "model", "owned_by": "lemonade", "recipe": info.recipe}
            if info.base_url:  # a remote upstream (ours); its key variable is not shown
                entry["base_url"] = info.base_url
            if show_all:
                entry.update(name=name, downloaded=downloaded, labels=info.labels)
            entries.append(entry)
        h.send_json(200, {"data": entries, "object": "list"})

    def model_by_id(self, h, id: str) -> None:
        """GA's fields plus the OpenAI model object's `object`, `created`, `owned_by` (HEAD §3.12),
        which the openai client's `models.retrieve` reads."""
        info = self.manager.get_model(id)  # ModelNotFoundError → 404
        h.send_json(200, {"checkpoint": info.checkpoint, "created": MODEL_CREATED, "id": info.name,
                          "name": info.name, "object": "model", "owned_by": "lemonade",
                          "recipe": info.recipe})

    def stats(self, h) -> None:
        try:
            h.send_json(200, self.router.telemetry())
        except ModelNotLoadedError as e:
            h.send_json(200, e.to_body())  # C++ answers 200 here (§4.15)

    def system_info(self, h) -> None:
        from lemonade import system_info
        from lemonade.backends.registry import inference_engines

        verbose = h.query.get("verbose", [""])[0].lower() in ("true", "1")
        h.send_json(200, system_info.get_system_info(verbose, engines=inference_engines))

    # -- inference ---------------------------------------------------------------------------------

    def _inference_body(self, h) -> tuple[bytes, dict, str | None, bool]:
        """Read and check the fields Lemonade itself interprets (§4.4); the rest is the backend's."""
        raw = h.read_body()
        body = parse_json_object(raw)
        model = optional_field(body, "model", str, "string")
        stream = optional_field(body, "stream", bool, "boolean")
        messages = optional_field(body, "messages", list, "array")
        if messages is not None:
            check_messages(messages)
        tools = optional_field(body, "tools", list, "array")
        if tools is not None:
            json_checks.objects(tools, "tools")
        return raw, body, model, bool(stream)

    def _proxy(self, h, endpoint: str, rewrite=None, check=None, telemetry: bool = True) -> None:
        raw, body, model, stream = self._inference_body(h)
        if rewrite and rewrite(body):
            raw = None  # the body changed: it is serialised again
        call = BackendCall(endpoint, body, raw, stream, telemetry)
        self.router.forward(model, call, OpenAiSink(h, check), progress=self._log_progress)

    @staticmethod
    def _log_progress(event) -> None:
        """An auto-load's progress goes to the log (a pull's goes to its client as well)."""
        log.debug("Load progress: %s", event)

    def chat_completions(self, h) -> None:
        self._proxy(h, "/v1/chat/completions", rewrite=apply_no_think)

    def completions(self, h) -> None:
        self._proxy(h, "/v1/completions", check=_check_completion)

    def embeddings(self, h) -> None:
        self._proxy(h, "/v1/embeddings", telemetry=False)  # C++ keeps telemetry for completions only

    def reranking(self, h) -> None:
        self._proxy(h, "/v1/rerank", telemetry=False)

    def responses(self, h) -> None:
        _, _, model, _ = self._inference_body(h)
        recipe = self.router.load(model)[0].recipe if model else self._current_recipe()
        # B loads first, then refuses every non-OGA recipe (§4.8); no OGA backend exists on Linux.
        h.send_json(422, {"error": {"code": "responses_not_supported",
                                    "message": f"Responses API not supported for recipe: {recipe}",
                                    "type": "unsupported_recipe"}})

    def _current_recipe(self) -> str:
        from lemonade.error_types import NoModelError

        current = self.router.most_recent()
        if current is None:
            raise NoModelError()
        return current.recipe

    # -- model management --------------------------------------------------------------------------

    def load(self, h) -> None:
        """Load a model (GA body), with HEAD's `pinned` and our `stream: true`: the load's progress
        (download, llama.cpp install, waiting for health) as the SSE events of a pull."""
        body = parse_json_object(h.read_body())
        name = optional_field(body, "model_name", str, "string")
        if not name:
            raise InvalidRequestError("'model_name' is required")
        pinned = optional_field(body, "pinned", bool, "boolean")

        def work(progress) -> dict[str, Any]:
            info, already = self.router.load(name, pinned=pinned, progress=progress)
            answer = {"checkpoint": info.checkpoint, "model_name": info.name, "recipe": info.recipe,
                      "status": "success"}
            if already:
                answer["message"] = "Model already loaded"
            return answer

        if optional_field(body, "stream", bool, "boolean"):
            progress_stream(h, work)
        else:
            h.send_json(200, work(None))

    def unload(self, h) -> None:
        """Unload every model, or the one named by `model_name` / `model` (HEAD §3.6; GA ignored the
        body). A body that is not JSON means "all", as in HEAD."""
        raw = h.read_body()
        try:
            body = parse_json_object(raw) if raw.strip() else {}
        except InvalidRequestError:
            body = {}
        name = body.get("model_name") or body.get("model")
        if isinstance(name, str) and name:
            name = name.removesuffix(":latest")
            self.router.unload(name)
            h.send_json(200, {"message": "Model unloaded successfully", "model_name": name, "status": "success"})
            return
        self.router.unload()
        h.send_json(200, {"message": "Model unloaded successfully", "status": "success"})

    def pin(self, h) -> None:
        """`POST /internal/pin {"model_name", "pinned"}` (HEAD §3.7): every error is a 400."""
        body = parse_json_object(h.read_body())
        name = body.get("model_name") or body.get("model")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("Parameter 'model' or 'model_name' is required")
        pinned = body.get("pinned")
        if not isinstance(pinned, bool):
            raise InvalidRequestError("Parameter 'pinned' is required and must be a boolean")
        try:
            self.router.set_pinned(name, pinned)
        except ModelNotLoadedNamedError as e:
            raise InvalidRequestError(e.message) from e
        h.send_json(200, {"model_name": name, "pinned": pinned, "status": "success"})

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
            # ours: a remote upstream (`recipe: remote`) and llama.cpp RPC workers of a user model
            "settings": {key: optional_field(body, key, str, "string") or "" for key in MODEL_SETTINGS},
        }

        def work(progress) -> dict[str, Any]:
            self.manager.download(name, progress=progress, **kwargs)
            return {"model_name": name, "status": "success"}

        if optional_field(body, "stream", bool, "boolean"):
            progress_stream(h, work)  # the SSE variant added upstream after GA
        else:
            h.send_json(200, work(None))

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

        logs.stream_log(h, self.config.log_file)

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


def _check_completion(body) -> tuple[int, Any]:
    """C++ completions (§4.5): a backend body with `error` → 500 with it; without `choices` → 500."""
    if isinstance(body, dict) and "error" in body:
        return 500, body
    if not isinstance(body, dict) or "choices" not in body:
        return 500, simple_error_body("Backend returned invalid response format")
    return 200, body


MODEL_TYPES = ("llm", "embedding", "reranking")  # the pools /health reports (HEAD lists more types)


def health_entry(model) -> dict[str, Any]:
    """One `all_models_loaded` entry (HEAD `router.cpp` 1286-1359; fields we cannot know are left out)."""
    info, backend = model.info, model.backend
    busy = model.in_flight > 0
    pool = "unmetered" if backend.unmetered else f"standard/{info.model_type}"  # HEAD: cloud models
    return {"model_name": info.name, "checkpoint": info.checkpoint, "type": info.model_type,
            "residency_class": "standard", "slot_pool": pool, "device": "cpu",
            "backend_url": backend.base_url(), "pid": backend.pid, "launch_command": backend.launch_command,
            "status": "in_use" if busy else "ready", "backend_alive": True,
            "backend_health": "busy" if busy else "ready", "loaded": True, "watchdog_reset": False,
            "pinned": model.pinned, "recipe": info.recipe, "recipe_options": {}, "is_busy": busy,
            "is_streaming": model.streams > 0, "last_use": int(model.last_use * 1000),
            **backend.health_details()}


class OpenAiSink:
    """Delivers a backend's answer in the OpenAI shapes of C++ (http-api §4.4-§4.7, §5)."""

    def __init__(self, h, check=None):
        self.h, self.check = h, check
        self.stream_chunk = h.relay_writer()  # ReplySink.stream_chunk: raises ClientGone when the client left

    def json(self, status: int, body: Any) -> None:
        if status == 200 and self.check:
            status, body = self.check(body)
        self.h.send_json(status, body)

    def stream_start(self) -> None:
        self.h.start_sse()

    def stream_end(self, error: dict | None) -> None:
        if error is not None:  # an OpenAI error object in a data frame, and no [DONE] (HEAD §7.4)
            self.h.outcome = f"stream broke off: {error.get('message', '')}"
            self.stream_chunk(b"data: " + dumps({"error": error}) + b"\n\n")
        self.h.end_chunks()


def progress_stream(h, work) -> None:
    """Run `work(progress)` with its progress as SSE `progress` events, then `complete` with its
    result, or `error` (a pull's event stream; a load's uses the same, http-api §4.9)."""
    h.start_sse()
    write = h.relay_writer()

    def on_progress(event) -> None:
        write(b"event: progress\ndata: " + dumps(progress_event(event)) + b"\n\n")

    try:
        result = work(on_progress)
        write(b"event: complete\ndata: " + dumps(result) + b"\n\n")
    except LemonadeError as e:
        h.outcome = f"failed: {e.message}"  # the access line's 200 went out before the work failed
        write(b"event: error\ndata: " + dumps({"error": e.message}) + b"\n\n")
    except streaming_proxy.ClientGone:
        h.close_connection = True
        return
    h.end_chunks()


def progress_event(p) -> dict[str, Any]:
    """A progress event as upstream's SSE `progress` fields: a DownloadProgress (file bytes), or a
    load's StartProgress (waiting for the backend's health)."""
    if isinstance(p, StartProgress):
        return {"stage": p.stage, "model_name": p.model, "elapsed": round(p.elapsed, 1)}
    return {"stage": p.stage, "file": p.file, "file_index": p.file_index, "total_files": p.file_count,
            "bytes_downloaded": p.bytes_done, "bytes_total": p.bytes_total,
            "total_download_size": p.total_bytes, "total_downloaded": p.total_done,
            "percent": round(p.percent, 1)}

