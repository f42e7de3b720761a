"""The backend base class (C++ `server/wrapped_server.cpp`, spec router-and-backends §4).

A backend is a small state machine with one writer of its state (llama-swap `process.go`):

    STOPPED ──ensure_ready──▶ STARTING ──healthy──▶ READY ──stop──▶ STOPPING ──▶ STOPPED
        ▲                        │ fails / stopped meanwhile            (a dead child is STOPPED too)
        └────────────────────────┘

`ensure_ready()` is the only way in: ready → return; stopped or dead → start; starting → wait for that
start; stopping → wait, then start. Callers ask, they never peek at the state to decide. Subclasses
describe their command line and readiness probe; this class picks the port, spawns through
`process_manager`, waits for health and forwards requests through `http_client`.

`forward(call, sink)` is the one way a request reaches the child, JSON or SSE: it owns the telemetry
of `/stats`, returns what the answer reported (the router sums it for `/metrics`) and reports a child
that died or hung during the call.
"""
from __future__ import annotations

import enum
import logging
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from lemonade import streaming_proxy
from lemonade.error_types import (LemonadeError, ModelNotLoadedError, NetworkError, ProcessError,
                                  backend_error_body, backend_status_for_client)
from lemonade.utils import http_client, json_utils, path_utils, process_manager

log = logging.getLogger(__name__)

READY_TIMEOUT = 300.0  # C++ B: 3000 polls ≈ 5 min (§3.4), as a wall-clock deadline here
READY_POLL_INTERVAL = 0.1
READY_PROBE_TIMEOUT = 1.0
HUNG_PROBE_TIMEOUT = 5.0  # a healthy llama-server answers /health at once, even while generating
STREAM_IDLE_TIMEOUT = 600.0  # default silence allowed inside a stream; `$LEMONADE_BACKEND_TIMEOUT` wins
STARTING_REPORT_SECONDS = 1.0  # how often a load reports that it is still waiting for health


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


@dataclass
class StartProgress:
    """A load's own progress event (the download and install report `DownloadProgress`)."""

    stage: str  # "starting": the child runs and is not healthy yet
    model: str
    elapsed: float = 0.0


@dataclass(frozen=True)
class CallFigures:
    """What one answered request reported in `usage` / `timings`: the feed of `/stats` (`Telemetry`)
    and of the `/metrics` counters (`Totals`). `prompt_tokens` and `cache_tokens` are None when the
    answer did not report them."""

    input_tokens: int = 0
    output_tokens: int = 0
    time_to_first_token: float = 0.0
    tokens_per_second: float = 0.0
    prompt_tokens: int | None = None  # `usage.prompt_tokens`
    cache_tokens: int | None = None  # llama.cpp `timings.cache_n`: prompt tokens served from its cache

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "CallFigures":
        """`usage` first, then llama.cpp's `timings` override; absent fields are 0 (C++ B §6)."""
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        timings = body.get("timings") if isinstance(body.get("timings"), dict) else {}
        input_tokens = int(usage.get("prompt_tokens", 0) or 0)
        output_tokens = int(usage.get("completion_tokens", 0) or 0)
        ttft = float(usage.get("prefill_duration_ttft", 0.0) or 0.0)
        tps = float(usage.get("decoding_speed_tps", 0.0) or 0.0)
        if timings:
            input_tokens = int(timings.get("prompt_n", input_tokens) or 0)
            output_tokens = int(timings.get("predicted_n", output_tokens) or 0)
            ttft = float(timings.get("prompt_ms", 0.0) or 0.0) / 1000.0
            tps = float(timings.get("predicted_per_second", 0.0) or 0.0)
        prompt = int(usage["prompt_tokens"] or 0) if "prompt_tokens" in usage else None
        cache = int(timings["cache_n"] or 0) if "cache_n" in timings else None
        return cls(input_tokens, output_tokens, ttft, tps, prompt, cache)


@dataclass
class Totals:
    """Counters since the server started (`/metrics`, HEAD `prometheus_metrics.cpp`): one request per
    answered call; token sums from the figures the answers reported."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    prompt_tokens: int = 0
    cache_tokens: int = 0

    def add(self, figures: CallFigures | None) -> None:
        """Count one answered request (`figures` None: it reported none, e.g. an embedding)."""
        self.requests += 1
        if figures is None:
            return
        self.input_tokens += max(figures.input_tokens, 0)
        self.output_tokens += max(figures.output_tokens, 0)
        # HEAD counts `usage.prompt_tokens`, else the input tokens (router.cpp 2404-2406)
        prompt = figures.prompt_tokens if figures.prompt_tokens is not None else figures.input_tokens
        self.prompt_tokens += max(prompt, 0)
        self.cache_tokens += max(figures.cache_tokens or 0, 0)


@dataclass
class Telemetry:
    """Figures of the last completed request (http-api §6); reset with every (re)load."""

    input_tokens: int = 0
    output_tokens: int = 0
    time_to_first_token: float = 0.0
    tokens_per_second: float = 0.0
    prompt_tokens: int = 0
    decode_token_times: list = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"decode_token_times": list(self.decode_token_times), "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens, "prompt_tokens": self.prompt_tokens,
                "time_to_first_token": self.time_to_first_token,
                "tokens_per_second": self.tokens_per_second}

    def update(self, body: dict[str, Any], streaming: bool) -> CallFigures:
        """Take figures from a response body or the last SSE frame with `usage`/`timings`, and return
        them. `prompt_tokens` is only taken from non-streaming responses, as in B."""
        figures = CallFigures.from_body(body)
        self.input_tokens = figures.input_tokens
        self.output_tokens = figures.output_tokens
        self.time_to_first_token = figures.time_to_first_token
        self.tokens_per_second = figures.tokens_per_second
        if not streaming and figures.prompt_tokens is not None:
            self.prompt_tokens = figures.prompt_tokens
        return figures


@dataclass
class BackendCall:
    """One request for a backend. `raw` is the client's body as received: forwarded as is when nothing
    rewrote the body (C++ does so for streams, http-api §4.4; the hot path skips a serialisation)."""

    endpoint: str
    body: dict[str, Any]
    raw: bytes | None = None
    stream: bool = False
    telemetry: bool = True  # completions update /stats; embeddings and rerank do not (C++ B)
    # The model name the client asked for; answers of a backend with a `reply_model_token` (llama-server,
    # which names the GGUF path there) name the model so (HEAD §7.2). The router fills it in when None.
    reply_model: str | None = None


@dataclass(frozen=True)
class Answered:
    """A call the backend answered in full; `figures` when it reported usage (and keeps telemetry)."""

    figures: CallFigures | None = None


class ReplySink(Protocol):
    """Where `forward` delivers the answer; the HTTP layer implements one per API dialect."""

    def json(self, status: int, body: Any) -> None:
        """The backend's whole answer: its body when 200, else `error_types.backend_error_body`."""

    def stream_start(self) -> None:
        """The backend answered 200 to a streaming call; chunks follow."""

    def stream_chunk(self, data: bytes) -> None:
        """Bytes as the backend sent them. Raises streaming_proxy.ClientGone when the client left."""

    def stream_end(self, error: dict[str, Any] | None) -> None:
        """The stream is over; `error` (an OpenAI error object) when the backend broke it off."""


class WrappedServer:
    """One backend child serving one model."""

    server_name = "backend"
    health_paths: tuple[str, ...] = ("/health", "/v1/health")
    exposes_metrics = False  # serves Prometheus text at /metrics (re-exported by our /metrics)
    # Unmetered backends use nothing on this machine (a remote upstream): they never count against a
    # pool of the router and are never evicted (HEAD's cloud models, head-llm-surface.md §3.1).
    unmetered = False
    exit_wait = 1.0  # seconds a failed call waits for the child to exit, to report its death instead

    def __init__(self, model_name: str, checkpoint: str, recipe: str):
        self.model_name = model_name
        self.checkpoint = checkpoint
        self.recipe = recipe
        self.telemetry = Telemetry()
        self._state = State.STOPPED
        self._port = 0
        self._child: process_manager.Child | None = None
        self._argv: list[str] = []
        self._start_error: BaseException | None = None
        self._starts = 0  # how many starts began; a waiter compares to tell "my start failed"
        self._cond = threading.Condition()  # guards every field above; never held across I/O

    # -- what a subclass describes ----------------------------------------------------------------

    def build_argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def child_env(self) -> dict[str, str] | None:
        return None

    def prepare(self, progress: Callable | None = None) -> None:
        """Work before the spawn (find or install the binary); may block and raise."""

    def ready_timeout(self) -> float:
        return READY_TIMEOUT

    def death_error(self, child: process_manager.Child) -> LemonadeError | None:
        """Why the child exited, when its output says more than its exit code (a subclass reads it);
        None for the generic message. Called after the child has exited; may block briefly."""
        return None

    def health_details(self) -> dict[str, Any]:
        """Extra fields of this model's `/health` entry (a remote upstream's URL and state, RPC
        workers). Must not block for long: `/health` is polled."""
        return {}

    # -- lifecycle ---------------------------------------------------------------------------------

    def ensure_ready(self, progress: Callable | None = None) -> None:
        """Return once the child is healthy, starting it if needed. Blocks for a start (minutes at
        worst); concurrent callers share one start, and one that waited on a start that failed gets
        that start's error. Raises ProcessError, InstallationError and the like."""
        while True:
            with self._cond:
                if self._state is State.READY and self._child is not None and self._child.is_alive():
                    return
                if self._state in (State.STARTING, State.STOPPING):
                    attempt = self._starts
                    self._cond.wait()
                    if self._starts == attempt and self._state is State.STOPPED and self._start_error:
                        raise self._start_error
                    continue
                died = self._state is State.READY
                if not died:  # STOPPED: this caller starts it
                    self._state, self._start_error = State.STARTING, None
                    self._starts += 1
                    attempt = self._starts
            if died:
                log.warning("%s for %s died (exit code %s); starting it again", self.server_name,
                            self.model_name, self.exit_code())
                self.stop()  # reaps the child; the next round starts a new one
                continue
            self._start(progress, attempt)
            return

    def _is_current(self, attempt: int) -> bool:
        """Whether start `attempt` still owns the state (no stop or newer start came). Under _cond."""
        return self._state is State.STARTING and self._starts == attempt

    def _start(self, progress: Callable | None, attempt: int) -> None:
        try:
            self.prepare(progress)
            port = process_manager.find_free_port()
            argv = self.build_argv(port)
            log.info("%s will use port %d", self.server_name, port)
            log.debug("Command: %s", " ".join(argv))
            try:
                child = process_manager.spawn(self.server_name, argv, env=self.child_env())
            except OSError as e:
                raise ProcessError(f"Failed to start {self.server_name}: {e}") from e
            with self._cond:
                current = self._is_current(attempt)
                if current:
                    self._child, self._port, self._argv = child, port, argv
            if not current:
                process_manager.stop(child)
                raise self._stopped_while_starting()
            self._wait_for_ready(child, port, progress, attempt)
            with self._cond:
                if self._is_current(attempt):
                    self._state = State.READY
                    self.telemetry = Telemetry()
                    self._cond.notify_all()
                    log.info("%s is ready: model %s, pid %d, port %d", self.server_name, self.model_name,
                             child.pid, port)
                    return
            raise self._stopped_while_starting()
        except BaseException as e:
            self._abandon_start(attempt, e)  # never leave a half-started child behind
            raise

    def _stopped_while_starting(self) -> ProcessError:
        return ProcessError(f"{self.server_name} for {self.model_name} was stopped while it started")

    def _abandon_start(self, attempt: int, error: BaseException) -> None:
        with self._cond:
            if not self._is_current(attempt):
                return  # a stop() took this attempt over and finishes it
            child, self._child = self._child, None
            self._state = State.STOPPING
        if child is not None:
            process_manager.stop(child)
        with self._cond:
            self._state, self._port, self._start_error = State.STOPPED, 0, error
            self._cond.notify_all()

    def _wait_for_ready(self, child: process_manager.Child, port: int, progress: Callable | None,
                        attempt: int) -> None:
        """Poll the health URLs until one answers 200; fail at once if the child exits or a stop came."""
        timeout = self.ready_timeout()
        started = time.monotonic()
        deadline, next_report = started + timeout, started + STARTING_REPORT_SECONDS
        urls = [f"http://127.0.0.1:{port}{p}" for p in self.health_paths]
        while True:
            if not child.is_alive():
                reason = self.death_error(child)
                if reason is not None:
                    raise reason
                raise self._exited_while_starting(child)
            with self._cond:
                if not self._is_current(attempt):
                    raise self._stopped_while_starting()
            if any(http_client.is_reachable(url, READY_PROBE_TIMEOUT) for url in urls):
                return
            now = time.monotonic()
            if now > deadline:
                raise ProcessError(f"{self.server_name} failed to start within {timeout:.0f} s")
            if progress is not None and now >= next_report:
                progress(StartProgress("starting", self.model_name, now - started))
                next_report = now + STARTING_REPORT_SECONDS
            time.sleep(READY_POLL_INTERVAL)

    def _exited_while_starting(self, child: process_manager.Child) -> ProcessError:
        """The error for a child that exited before it was ready. Its last output goes to the log, not
        into the answer: it quotes absolute paths and, for a file that is not what it should be, the
        file's first bytes (llama.cpp's "invalid magic characters"), neither of which a client is owed."""
        code = child.exit_code()
        child.wait_drained()
        log.error("%s for %s exited with code %s while starting; its last output:", self.server_name,
                  self.model_name, code)
        for line in child.output_tail:
            log.error("  [%s] %s", self.server_name, line)
        return ProcessError(f"{self.server_name} failed to start: process exited with code {code} "
                            "(its output is in the server log)")

    def stop(self) -> None:
        """Stop the child (TERM, bounded wait, KILL). Blocks for that; safe twice and on a dead child.
        A start in progress is cut short: its `ensure_ready` raises, callers waiting on it start anew."""
        with self._cond:
            while self._state is State.STOPPING:
                self._cond.wait()
            if self._state is State.STOPPED:
                return
            self._state = State.STOPPING
            child, self._child = self._child, None
        if child is not None:
            process_manager.stop(child)
        with self._cond:
            self._state, self._port, self._start_error = State.STOPPED, 0, None
            self._cond.notify_all()

    # -- questions ---------------------------------------------------------------------------------

    def is_ready(self) -> bool:
        """Ready and its child still running (a child that died since shows up here at once)."""
        with self._cond:
            return self._state is State.READY and self._child is not None and self._child.is_alive()

    def state(self) -> State:
        with self._cond:
            return self._state

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.pid if child else None

    @property
    def port(self) -> int:
        return self._port

    @property
    def launch_command(self) -> list[str]:
        return list(self._argv)

    def exit_code(self) -> int | None:
        child = self._child
        return child.exit_code() if child else None

    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    # -- forwarding --------------------------------------------------------------------------------

    def rewrite_request(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """Per-backend body rewrite before forwarding to `endpoint` (FLM replaces `model`). Returns
        `body` itself when nothing changes, a new dict otherwise; identity by default."""
        return body

    def reply_model_token(self) -> bytes | None:
        """For a backend whose answers name the model by something of its own that means nothing to
        the client (llama-server: the GGUF path), the exact bytes of that `"model":…` member: answers
        and stream frames then name the model as the client asked (HEAD §7.2), a stream through a
        bytes replace per chunk (no parsing on the hot path). None (the default): answers keep the
        backend's name (a remote upstream answers with its own model id, on purpose)."""
        return None

    def endpoint_url(self, endpoint: str) -> str:
        """Where a call to `endpoint` (an OpenAI path such as `/v1/chat/completions`) goes."""
        return self.base_url() + endpoint

    def request_headers(self) -> dict[str, str] | None:
        """Extra headers of every forwarded request (a remote upstream's key); none for a child."""
        return None

    def request_payload(self, endpoint: str, body: dict[str, Any], raw: bytes | None = None) -> bytes:
        """The bytes to send: the client's own `raw` bytes when nothing rewrote the body, else the
        (rewritten) body serialised."""
        rewritten = self.rewrite_request(endpoint, body)
        return raw if raw is not None and rewritten is body else json_utils.dumps(rewritten)

    def forward(self, call: BackendCall, sink: ReplySink) -> Answered | None:
        """Send `call` to the child and deliver the answer to `sink`. Blocks for the whole answer
        (a stream until it ends). Returns `Answered` when the backend answered 200 in full (with the
        figures it reported, when the call keeps telemetry), None otherwise. Raises
        ModelNotLoadedError (not ready), NetworkError or ProcessError (no answer: the child died, or
        hung and was stopped) before anything reached the sink; once a stream started, failures end
        it through `sink.stream_end(error)`."""
        if not self.is_ready():
            raise ModelNotLoadedError(self.server_name)
        payload = self.request_payload(call.endpoint, call.body, call.raw)
        url, headers = self.endpoint_url(call.endpoint), self.request_headers()
        if not call.stream:
            try:
                reply = http_client.post_json(url, payload, headers=headers)
            except NetworkError as e:
                raise self.failure_error(e) from e
            if reply.status != 200:  # C++ GA wrapped it and answered 200; we keep the status
                sink.json(*self.error_reply(reply.status, reply.body))
                return None
            figures = None
            if isinstance(reply.body, dict):
                if call.telemetry:
                    figures = self.telemetry.update(reply.body, streaming=False)
                if call.reply_model is not None and "model" in reply.body and self.reply_model_token():
                    reply.body["model"] = call.reply_model
            sink.json(200, reply.body)
            return Answered(figures)
        try:
            response = http_client.post_stream(url, payload, path_utils.backend_timeout(STREAM_IDLE_TIMEOUT),
                                               headers=headers)
        except NetworkError as e:
            raise self.failure_error(e) from e
        if response.status_code != 200:
            try:
                detail = response.json_or_text()
            except NetworkError as e:
                raise self.failure_error(e) from e
            finally:
                response.close()
            sink.json(*self.error_reply(response.status_code, detail))
            return None
        sink.stream_start()
        result = streaming_proxy.relay(response, self._chunk_writer(call, sink))
        if not result.completed:
            return None  # the client left; the upstream request is closed, which stops the generation
        error, figures = None, None
        if result.error is not None:
            error = {"message": self.failure_error(result.error).message, "type": "backend_error"}
        elif call.telemetry and result.last_stats_frame:
            figures = self.telemetry.update(result.last_stats_frame, streaming=True)
        sink.stream_end(error)
        return Answered(figures) if error is None else None

    def error_reply(self, status: int, response: Any) -> tuple[int, dict[str, Any]]:
        """(status, body) for the client from a backend's non-200 answer: `backend_status_for_client`'s
        status, except that a 5xx `is_input_error` calls a refused request is a 400 of type
        `invalid_request_error`. The body keeps the backend's own status (`status_code`) and answer."""
        body = backend_error_body(self.server_name, status, response)
        shown = backend_status_for_client(status, response)
        if shown >= 500 and self.is_input_error(status, response):
            body["error"]["type"] = "invalid_request_error"
            return 400, body
        return shown, body

    def is_input_error(self, status: int, response: Any) -> bool:
        """Whether a 5xx answer is the backend refusing the request's content (a bad field) rather
        than failing; none by default."""
        return False

    def _chunk_writer(self, call: BackendCall, sink: ReplySink) -> Callable[[bytes], None]:
        """`sink.stream_chunk`, with the `model` member of each frame renamed to the client's name.
        llama-server sends one whole frame per HTTP chunk, so the member is never split between two
        chunks; a bytes replace costs about a microsecond for a frame (bench/proxy_overhead.py)."""
        token = self.reply_model_token()
        if token is None or call.reply_model is None:
            return sink.stream_chunk
        renamed = b'"model":' + json_utils.dumps(call.reply_model)
        if renamed == token:
            return sink.stream_chunk
        write = sink.stream_chunk

        def write_renamed(chunk: bytes) -> None:
            write(chunk.replace(token, renamed))
        return write_renamed

    def failure_error(self, error: LemonadeError) -> LemonadeError:
        """The error to report for a call that got no (complete) answer. A failed call to a child
        that has just died reports the death (the next request starts it again), not a bare
        connection error. A child that timed out and no longer answers its health probe is hung: it
        is stopped and reported, and started again next time. Blocks up to `exit_wait` (+ a probe)."""
        child = self._child
        if isinstance(error, http_client.BackendTimeout) and child is not None and child.is_alive():
            if not http_client.is_reachable(self.base_url() + self.health_paths[0], HUNG_PROBE_TIMEOUT):
                log.error("%s (pid %d) is hung: %s; stopping it", self.server_name, child.pid, error.message)
                self.stop()
                return ProcessError(f"{self.server_name} did not answer ({error.message}) and was "
                                    "stopped; the next request starts it again")
            return error
        if child is not None:
            try:
                child.popen.wait(timeout=self.exit_wait)
            except subprocess.TimeoutExpired:  # still running: the network error stands
                return error
            reason = self.death_error(child)
            if reason is not None:
                return reason
            return ProcessError(f"{self.server_name} exited with code {child.exit_code()} "
                                "while handling the request")
        if self.state() in (State.STOPPING, State.STOPPED):
            return ProcessError(f"{self.server_name} for {self.model_name} was unloaded while handling "
                                "the request")
        return error
