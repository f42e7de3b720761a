"""Which models are loaded, and the load / evict / unload decisions (C++ `server/router.cpp`; several
models resident as lemonade HEAD, spec head-llm-surface.md §3).

State: a table of slots keyed by model name, one slot per loaded (or loading) model, each with its
backend, model type, pin, in-flight count and time of last use.
  * `_table` (a Condition) guards the table and every slot's counters; it is never held across I/O
    (no download, no start, no stop, no proxied request).
  * One lock per model name serialises the loads of that model, so concurrent requests share one
    load and loads of different models run side by side. The backend's own `ensure_ready` does the
    rest of the waiting (`wrapped_server`).
Decisions are pure functions, table-tested and free of logging (llama-swap's `EvictionFor`):
`plan_eviction` (which slots give way to a load: least recently used first, never a busy or pinned
one) and `idle_victims` (the idle unload). The log line comes when a decision is carried out.
Limits: `max_loaded` models per type (llm, embedding, reranking; -1 = unlimited; 1 keeps C++ GA's
one-model behaviour for chat models) and an optional idle timeout.
Unmetered models (a remote upstream: `WrappedServer.unmetered`) use nothing on this machine: as HEAD's
cloud models they sit in no pool, never count against one, and are never evicted or idle-unloaded.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from lemonade.backends.llamacpp_server import LlamaCppOptions
from lemonade.backends.registry import RecipeSpec, spec_for
from lemonade.error_types import (ModelBusyError, ModelNotLoadedError, ModelNotLoadedNamedError,
                                  NoModelError, ProcessError, SlotsPinnedError)
from lemonade.model_manager import ModelInfo, ModelManager
from lemonade.utils import path_utils
from lemonade.wrapped_server import Answered, BackendCall, CallFigures, ReplySink, Totals, WrappedServer

log = logging.getLogger(__name__)

DEFAULT_MAX_LOADED = 1  # per model type (HEAD `max_loaded_models`; GA: one model)
SLOT_WAIT_DEFAULT = 300.0  # how long a load waits for busy models to finish: `$LEMONADE_BACKEND_TIMEOUT`
IDLE_CHECK_MAX_INTERVAL = 5.0  # the idle reaper looks at least this often (HEAD's eviction pass: 5 s)
RESIDENCY_CLASS = "standard"  # HEAD's pools are (type, residency class); every model here is standard


@dataclass(frozen=True)
class Limits:
    max_loaded: int = DEFAULT_MAX_LOADED  # per model type; -1 means unlimited
    idle_timeout: float = 0.0  # seconds without a request before a model is unloaded; 0 = never


@dataclass(frozen=True)
class SlotView:
    """What the pure decisions see of a slot."""

    name: str
    model_type: str
    last_use: float
    busy: bool  # serving a request, or still loading
    pinned: bool
    unmetered: bool = False  # in no pool: counts against none, never evicted (a remote upstream)


@dataclass(frozen=True)
class EvictionPlan:
    victims: tuple[str, ...] = ()  # unload these (oldest use first), then load
    wait_for: tuple[str, ...] = ()  # nothing can go yet: wait until one of these is idle
    pinned_full: bool = False  # every model that would have to go is pinned: refuse


def plan_eviction(target: str, target_type: str, slots: list[SlotView], limit: int,
                  unmetered: bool = False) -> EvictionPlan:
    """Room for `target` in its type's pool: the least recently used unpinned, idle models give way.
    An `unmetered` target needs no room, and unmetered slots are nobody's peers.
    Pure: no state, no logging (it runs again after every wait)."""
    if unmetered:
        return EvictionPlan()
    peers = [s for s in slots if s.model_type == target_type and s.name != target and not s.unmetered]
    if limit < 0 or len(peers) < limit:
        return EvictionPlan()
    need = len(peers) + 1 - limit
    candidates = sorted((s for s in peers if not s.pinned), key=lambda s: s.last_use)
    if len(candidates) < need:
        return EvictionPlan(pinned_full=True)
    idle = [s for s in candidates if not s.busy]
    if len(idle) >= need:
        return EvictionPlan(victims=tuple(s.name for s in idle[:need]))
    return EvictionPlan(wait_for=tuple(s.name for s in candidates if s.busy))


def idle_victims(slots: list[SlotView], now: float, idle_timeout: float) -> list[str]:
    """Models unused for `idle_timeout` seconds that are neither busy, pinned nor unmetered. Pure."""
    if idle_timeout <= 0:
        return []
    return [s.name for s in slots
            if not s.busy and not s.pinned and not s.unmetered and now - s.last_use >= idle_timeout]


@dataclass
class Slot:
    info: ModelInfo
    backend: WrappedServer
    pinned: bool = False
    loading: bool = True
    in_flight: int = 0
    streams: int = 0
    last_use: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def model_type(self) -> str:
        return self.info.model_type

    def view(self) -> SlotView:
        return SlotView(self.name, self.model_type, self.last_use, self.loading or self.in_flight > 0,
                        self.pinned, self.backend.unmetered)


@dataclass(frozen=True)
class LoadedModel:
    """A snapshot of one loaded model, for `/health` and `/api/ps`."""

    info: ModelInfo
    backend: WrappedServer
    pinned: bool
    in_flight: int
    streams: int
    last_use: float


@dataclass
class ModelUsage:
    """What `/metrics` reports of one model seen since the server started (kept after an unload, as HEAD
    keeps its per-model telemetry records)."""

    info: ModelInfo
    last: CallFigures | None = None  # the figures of its last answer that reported any
    totals: Totals = field(default_factory=Totals)
    loads: int = 0
    load_seconds: float = 0.0  # its last load: from the start of the child to healthy (ours; HEAD has none)


@dataclass(frozen=True)
class UsageSnapshot:
    models: list[ModelUsage]  # copies, in the order the models were first seen
    totals: Totals  # every model together
    loaded: list[LoadedModel]


class Router:
    def __init__(self, models: ModelManager, options: LlamaCppOptions, limits: Limits = Limits(),
                 recipes: Callable[[str], RecipeSpec] = spec_for):
        self.models = models
        self.options = options
        self.limits = limits
        self.recipes = recipes
        self._table = threading.Condition()  # guards _slots, every slot's fields, _closed
        self._slots: dict[str, Slot] = {}
        self._closed = False
        self._load_locks: dict[str, threading.Lock] = {}  # one per model name; guarded by _table
        self._usage_lock = threading.Lock()  # guards _usage and _totals (never held across I/O)
        self._usage: dict[str, ModelUsage] = {}
        self._totals = Totals()
        if limits.idle_timeout > 0:
            threading.Thread(target=self._unload_idle_forever, name="idle-unload", daemon=True).start()

    # -- questions ---------------------------------------------------------------------------------

    def loaded(self) -> list[LoadedModel]:
        """Ready models, most recently used first. Asking does not count as a use."""
        with self._table:
            slots = [s for s in self._slots.values() if not s.loading]
            snapshot = [LoadedModel(s.info, s.backend, s.pinned, s.in_flight, s.streams, s.last_use)
                        for s in sorted(slots, key=lambda s: s.last_use, reverse=True)]
        return [m for m in snapshot if m.backend.is_ready()]  # a dead child is not loaded

    def most_recent(self) -> ModelInfo | None:
        models = self.loaded()
        return models[0].info if models else None

    def telemetry(self) -> dict[str, Any]:
        """`/stats`: the figures of the most recently used model (C++ has one model)."""
        models = self.loaded()
        if not models:
            raise ModelNotLoadedError()
        return models[0].backend.telemetry.to_dict()

    # -- load and use ------------------------------------------------------------------------------

    def load(self, name: str, pinned: bool | None = None, progress: Callable | None = None,
             ctx_size: int | None = None) -> tuple[ModelInfo, bool]:
        """Load `name` unless it is loaded; returns (info, was_already_loaded). `pinned` sets the pin
        (None keeps it). `ctx_size` overrides the server's context size for this load only; a model
        already loaded keeps the one it has (HEAD's auto-load, spec head §5). Blocks for a download
        and a start. Raises ModelNotFoundError, SlotsPinnedError, ModelBusyError, download and start
        errors."""
        slot, already = self._acquire(name, progress, for_request=False, pinned=pinned, ctx_size=ctx_size)
        return slot.info, already

    def forward(self, name: str | None, call: BackendCall, sink: ReplySink,
                progress: Callable | None = None) -> None:
        """Send `call` to model `name` (None: the most recently used model), loading it first if
        needed, and deliver the answer to `sink`. The model cannot be evicted while this runs. An answered
        call is counted for `/metrics` (`usage`). Raises NoModelError, the load errors, and the
        backend's (see `WrappedServer.forward`)."""
        if name is None:
            current = self.most_recent()
            if current is None:
                raise NoModelError()
            name = current.name
        if call.reply_model is None:
            call.reply_model = name  # answers name the model as the client asked for it (HEAD §7.2)
        slot, _ = self._acquire(name, progress, for_request=True, stream=call.stream)
        try:
            answered = slot.backend.forward(call, sink)
        finally:
            with self._table:
                slot.in_flight -= 1
                if call.stream:
                    slot.streams -= 1
                slot.last_use = time.monotonic()
                self._table.notify_all()
        if answered is not None:
            self._record_answer(slot.info, answered)

    def _acquire(self, name: str, progress: Callable | None, for_request: bool, stream: bool = False,
                 pinned: bool | None = None, ctx_size: int | None = None) -> tuple[Slot, bool]:
        """The ready slot of `name`, counted as in use when `for_request`; (slot, was_loaded)."""
        slot = self._take_if_ready(name, for_request, stream, pinned)
        if slot is not None:
            return slot, True
        with self._load_lock(name):
            slot = self._take_if_ready(name, for_request, stream, pinned)  # loaded by another meanwhile
            if slot is not None:
                return slot, True
            slot = self._load(name, progress, pinned, ctx_size)
            with self._table:
                if self._slots.get(name) is not slot:  # unloaded the moment it became ready
                    raise ProcessError(f"Model {name} was unloaded while it loaded")
                self._use(slot, for_request, stream, pinned)
            return slot, False

    def _take_if_ready(self, name: str, for_request: bool, stream: bool, pinned: bool | None) -> Slot | None:
        with self._table:
            slot = self._slots.get(name)
            if slot is None or slot.loading or not slot.backend.is_ready():
                return None
            self._use(slot, for_request, stream, pinned)
            return slot

    @staticmethod
    def _use(slot: Slot, for_request: bool, stream: bool, pinned: bool | None) -> None:
        """Stamp a use (under _table): health polls never get here, so they keep models idle."""
        slot.last_use = time.monotonic()
        if pinned is not None:
            slot.pinned = pinned
        if for_request:
            slot.in_flight += 1
            if stream:
                slot.streams += 1

    def _load_lock(self, name: str) -> threading.Lock:
        with self._table:
            return self._load_locks.setdefault(name, threading.Lock())

    def _load(self, name: str, progress: Callable | None, pinned: bool | None, ctx_size: int | None) -> Slot:
        """Download if needed, make room, start. Runs under `name`'s load lock only."""
        info = self.models.get_model(name)
        self._drop_dead(name)
        files = self.models.model_files(info)
        if files is None:
            log.info("Model %s is not downloaded; pulling it", name)
            self.models.download(name, do_not_upgrade=True, progress=progress)
            files = self.models.model_files(info)
            if files is None:
                raise ProcessError(f"Model {name} was pulled but its files are not complete in the cache")
        options = self.options if ctx_size is None else dataclasses.replace(self.options, ctx_size=ctx_size)
        backend = self.recipes(info.recipe).make_backend(info, files, options)
        slot = Slot(info, backend, pinned=bool(pinned))
        self._make_room(slot)
        log.info("Loading model %s (%s)", name, info.checkpoint)
        started = time.monotonic()
        try:
            backend.ensure_ready(progress)
        except BaseException:
            with self._table:
                if self._slots.get(name) is slot:
                    del self._slots[name]
                self._table.notify_all()
            raise
        self._record_load(info, time.monotonic() - started)
        with self._table:
            slot.loading = False
            slot.last_use = time.monotonic()
            self._table.notify_all()
        return slot

    def _drop_dead(self, name: str) -> None:
        """A slot whose child died (kill -9, crash) is removed and its child reaped; only that model
        is loaded again."""
        with self._table:
            slot = self._slots.get(name)
            if slot is None or slot.loading or slot.backend.is_ready():
                return
            del self._slots[name]
            self._table.notify_all()
        log.warning("Backend for %s died (exit code %s); loading it again", name, slot.backend.exit_code())
        slot.backend.stop()

    def _make_room(self, slot: Slot) -> None:
        """Reserve `slot` in the table, unloading what the eviction plan names. Waits (bounded, the
        table lock released) while the models that would have to go are busy."""
        wait_limit = path_utils.backend_timeout(SLOT_WAIT_DEFAULT)
        deadline = time.monotonic() + wait_limit
        with self._table:
            while True:
                if self._closed:
                    raise ProcessError("Server is shutting down")
                views = [s.view() for s in self._slots.values()]
                plan = plan_eviction(slot.name, slot.model_type, views, self.limits.max_loaded,
                                     slot.backend.unmetered)
                if plan.pinned_full:
                    raise SlotsPinnedError(f"{RESIDENCY_CLASS}/{slot.model_type}")
                if not plan.wait_for:
                    victims = [self._slots.pop(v) for v in plan.victims]
                    self._slots[slot.name] = slot
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ModelBusyError(
                        f"Cannot load {slot.name}: the loaded {slot.model_type} model(s) "
                        f"{', '.join(plan.wait_for)} stayed busy for {wait_limit:g} s and the limit is "
                        f"{self.limits.max_loaded} per type; try again when they are idle")
                self._table.wait(remaining)
        for victim in victims:
            log.info("Unloading %s (least recently used %s model) to load %s", victim.name,
                     victim.model_type, slot.name)
            victim.backend.stop()

    # -- usage counters (`/metrics`) ------------------------------------------------------------------

    def _model_usage(self, info: ModelInfo) -> ModelUsage:
        """Under _usage_lock."""
        usage = self._usage.get(info.name)
        if usage is None:
            usage = self._usage[info.name] = ModelUsage(info)
        return usage

    def _record_answer(self, info: ModelInfo, answered: Answered) -> None:
        with self._usage_lock:
            usage = self._model_usage(info)
            usage.totals.add(answered.figures)
            self._totals.add(answered.figures)
            if answered.figures is not None:
                usage.last = answered.figures

    def _record_load(self, info: ModelInfo, seconds: float) -> None:
        with self._usage_lock:
            usage = self._model_usage(info)
            usage.loads += 1
            usage.load_seconds = seconds

    def usage(self) -> UsageSnapshot:
        """Counters of every model seen since start, and the loaded models; copies, safe to read."""
        loaded = self.loaded()
        with self._usage_lock:
            models = [dataclasses.replace(u, totals=dataclasses.replace(u.totals)) for u in self._usage.values()]
            totals = dataclasses.replace(self._totals)
        return UsageSnapshot(models, totals, loaded)

    # -- unload and pin ----------------------------------------------------------------------------

    def unload(self, name: str | None = None) -> None:
        """Stop one model (raises ModelNotLoadedNamedError if it is not loaded) or every model.
        Running requests on it are cut, as C++ `/unload` does."""
        with self._table:
            if name is None:
                slots = list(self._slots.values())
                self._slots.clear()
            elif name in self._slots:
                slots = [self._slots.pop(name)]
            else:
                raise ModelNotLoadedNamedError(name)
            self._table.notify_all()
        for slot in slots:
            log.info("Unloading model %s", slot.name)
            slot.backend.stop()

    def set_pinned(self, name: str, pinned: bool) -> None:
        """Pin (never evicted, never idle-unloaded) or unpin a loaded model."""
        with self._table:
            slot = self._slots.get(name)
            if slot is None:
                raise ModelNotLoadedNamedError(name)
            slot.pinned = pinned
            self._table.notify_all()
        log.info("Model %s %s", name, "pinned" if pinned else "unpinned")

    def pinned_count(self) -> dict[str, int]:
        with self._table:
            counts: dict[str, int] = {}
            for slot in self._slots.values():
                if slot.pinned:
                    counts[slot.model_type] = counts.get(slot.model_type, 0) + 1
            return counts

    def shutdown(self) -> None:
        """Refuse further loads and stop every backend; a load finishing later stops its own child."""
        with self._table:
            self._closed = True
            self._table.notify_all()
        self.unload()

    # -- idle unload -------------------------------------------------------------------------------

    def _unload_idle_forever(self) -> None:
        timeout = self.limits.idle_timeout
        interval = min(IDLE_CHECK_MAX_INTERVAL, max(timeout / 4, 0.05))
        while True:
            with self._table:
                self._table.wait(interval)
                if self._closed:
                    return
                names = idle_victims([s.view() for s in self._slots.values()], time.monotonic(), timeout)
                slots = [self._slots.pop(n) for n in names]
                if slots:
                    self._table.notify_all()
            for slot in slots:
                log.info("Unloading model %s after %.0f s without a request", slot.name, timeout)
                slot.backend.stop()
