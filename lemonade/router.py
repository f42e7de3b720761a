"""Which model is loaded, and the load / unload / auto-load decisions (C++ `server/router.cpp`).

State: a table of loaded backends keyed by model name, with an in-flight count per backend.
  * `_table` (a Condition) guards the table and the counts; it is never held across I/O.
  * `_load_lock` serialises loads, like C++ B's `is_loading` flag: it is held while a backend starts
    (which can take minutes) but never while a request is proxied, so traffic to a loaded model flows
    during another model's load until that load evicts it.
The GA policy (at most one model; a new load replaces the old) lives in the pure function
`models_to_evict`, so later policies change that function, not this structure.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from lemonade.backends.llamacpp_server import LlamaCppOptions, LlamaCppServer
from lemonade.error_types import (InvalidRequestError, ModelNotLoadedError, ProcessError,
                                  UnsupportedOperationError)
from lemonade.model_manager import ModelInfo, ModelManager
from lemonade.utils import http_client, path_utils
from lemonade.wrapped_server import WrappedServer

log = logging.getLogger(__name__)

MAX_LOADED_MODELS = 1  # C++ GA: one backend child at a time
EVICT_DRAIN_TIMEOUT = 300.0  # how long a load waits for requests on the model it evicts


def models_to_evict(target: str, loaded: list[str], max_loaded: int = MAX_LOADED_MODELS) -> list[str]:
    """Names to unload before `target` can be loaded (oldest first). Pure: no state, no logging."""
    others = [name for name in loaded if name != target]
    excess = len(others) + 1 - max_loaded
    return others[:excess] if excess > 0 else []


@dataclass
class _Entry:
    info: ModelInfo
    backend: WrappedServer
    in_flight: int = 0


class Router:
    def __init__(self, models: ModelManager, llamacpp: LlamaCppOptions):
        self.models = models
        self.llamacpp = llamacpp
        self._table = threading.Condition()  # guards _loaded, in-flight counts, _closed
        self._loaded: dict[str, _Entry] = {}
        self._load_lock = threading.Lock()  # serialises loads; see module docstring
        self._closed = False

    # -- queries -----------------------------------------------------------------------------------

    def loaded(self) -> ModelInfo | None:
        """The loaded model (the most recent when a policy allows several)."""
        with self._table:
            entries = list(self._loaded.values())
        return entries[-1].info if entries else None

    def loaded_backend(self) -> WrappedServer | None:
        with self._table:
            entries = list(self._loaded.values())
        return entries[-1].backend if entries else None

    # -- use and load ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def use(self, name: str | None) -> Iterator[WrappedServer]:
        """Yield a ready backend for `name` (None: the loaded model), loading it first if needed.

        The backend cannot be evicted while the caller holds it. Raises ModelNotFoundError,
        InvalidRequestError (no model given, none loaded) or load errors.
        """
        if name is None:
            current = self.loaded()
            if current is None:
                raise InvalidRequestError("No model loaded and no model specified in request")
            name = current.name
        entry, _ = self._ensure_loaded(name, acquire=True)
        try:
            yield entry.backend
        finally:
            with self._table:
                entry.in_flight -= 1
                self._table.notify_all()

    def load(self, name: str) -> tuple[ModelInfo, bool]:
        """Load `name` if it is not loaded; returns (info, was_already_loaded). Blocks for the load."""
        entry, already = self._ensure_loaded(name, acquire=False)
        return entry.info, already

    def _acquire_if_ready(self, name: str, acquire: bool) -> _Entry | None:
        with self._table:
            entry = self._loaded.get(name)
            if entry is not None and entry.backend.is_alive():
                if acquire:
                    entry.in_flight += 1
                return entry
        return None

    def _ensure_loaded(self, name: str, acquire: bool) -> tuple[_Entry, bool]:
        entry = self._acquire_if_ready(name, acquire)
        if entry is not None:
            return entry, True
        with self._load_lock:
            # Re-check under the load lock: a concurrent request may have loaded it meanwhile.
            entry = self._acquire_if_ready(name, acquire)
            if entry is not None:
                return entry, True
            self._drop_dead(name)
            info = self.models.get_model(name)
            if not self.models.is_downloaded(info):
                log.info("Model %s is not downloaded; pulling it", name)
                self.models.download(name, do_not_upgrade=True)
            with self._table:
                victims = models_to_evict(name, list(self._loaded))
            for victim in victims:
                self._evict(victim)
            backend = self._make_backend(info)
            log.info("Loading model %s (%s)", name, info.checkpoint)
            backend.load()
            with self._table:
                if self._closed:  # shutdown began while we were loading
                    backend_to_stop = backend
                else:
                    backend_to_stop = None
                    entry = _Entry(info, backend, in_flight=1 if acquire else 0)
                    self._loaded[name] = entry
            if backend_to_stop is not None:
                backend_to_stop.unload()
                raise ProcessError("Server is shutting down")
            return entry, False

    def _drop_dead(self, name: str) -> None:
        with self._table:
            entry = self._loaded.get(name)
            if entry is None or entry.backend.is_alive():
                return
            del self._loaded[name]
        code = entry.backend.child.exit_code() if entry.backend.child else None
        log.warning("Backend for %s died (exit code %s); reloading", name, code)
        entry.backend.unload()

    def _evict(self, name: str) -> None:
        """Unload `name` once its in-flight requests are done (bounded wait, then cut)."""
        deadline = time.monotonic() + EVICT_DRAIN_TIMEOUT
        with self._table:
            entry = self._loaded.get(name)
            if entry is None:
                return
            while entry.in_flight > 0 and time.monotonic() < deadline:
                self._table.wait(timeout=max(0.0, deadline - time.monotonic()))
            if entry.in_flight > 0:
                log.warning("Evicting %s with %d request(s) still running", name, entry.in_flight)
            self._loaded.pop(name, None)
        log.info("Unloading model %s to make room", name)
        entry.backend.unload()

    def _make_backend(self, info: ModelInfo) -> WrappedServer:
        if info.recipe == "flm":
            from lemonade.backends.fastflowlm_server import FastFlowLMServer

            return FastFlowLMServer(info.name, info.checkpoint, info.recipe, self.llamacpp.ctx_size)
        if info.recipe.startswith("oga-") or info.recipe == "ryzenai":
            raise UnsupportedOperationError(f"Recipe {info.recipe} is not supported by this server")
        gguf = self.models.resolved_path(info)
        if gguf is None:
            raise ProcessError(f"GGUF file not found for checkpoint: {info.checkpoint}")
        template = path_utils.resource_path(info.chat_template) if info.chat_template else None
        return LlamaCppServer(info.name, info.checkpoint, info.recipe, gguf, info.labels,
                              self.models.mmproj_path(info), self.llamacpp, template)

    # -- unload and shutdown -----------------------------------------------------------------------

    def unload(self) -> None:
        """Stop every loaded backend at once (C++ `/unload`: running requests are cut)."""
        with self._table:
            entries = list(self._loaded.values())
            self._loaded.clear()
        for entry in entries:
            log.info("Unloading model %s", entry.info.name)
            entry.backend.unload()

    def shutdown(self) -> None:
        """Refuse further loads and stop every backend; a load finishing later stops its own child."""
        with self._table:
            self._closed = True
        self.unload()

    # -- forwarding --------------------------------------------------------------------------------

    def forward(self, backend: WrappedServer, endpoint: str, body: dict, raw: bytes | None = None,
                telemetry: bool = True) -> http_client.JsonReply:
        """Non-streaming call (`raw`: the client's bytes of `body`, forwarded when nothing rewrites
        it); successful completions update the backend's telemetry (C++ B §6)."""
        reply = backend.forward_json(endpoint, body, raw)
        if telemetry and reply.status == 200 and isinstance(reply.body, dict):
            backend.telemetry.update(reply.body, streaming=False)
        return reply

    def telemetry(self) -> dict:
        backend = self.loaded_backend()
        if backend is None:
            raise ModelNotLoadedError()
        return backend.telemetry.to_dict()
