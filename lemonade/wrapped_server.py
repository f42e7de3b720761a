"""The backend base class (C++ `server/wrapped_server.cpp`, spec router-and-backends §4).

A backend is a small state machine (STOPPED → STARTING → READY, back to STOPPED on unload or death).
Only `load` and `unload` write `state`. Subclasses describe their command line and readiness probe;
this class picks the port, spawns through `process_manager`, waits for health and forwards requests
through the pooled `http_client`.
"""
from __future__ import annotations

import enum
import logging
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from lemonade.error_types import ModelNotLoadedError, NetworkError, ProcessError
from lemonade.utils import http_client, json_utils, process_manager

log = logging.getLogger(__name__)

READY_TIMEOUT = 300.0  # C++ B: 3000 polls ≈ 5 min (§3.4), as a wall-clock deadline here
READY_POLL_INTERVAL = 0.1
READY_PROBE_TIMEOUT = 1.0
HUNG_PROBE_TIMEOUT = 5.0  # a healthy llama-server answers /health at once, even while generating


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"


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

    def update(self, body: dict[str, Any], streaming: bool) -> None:
        """Take figures from a response body or the last SSE frame with `usage`/`timings`.

        `usage` first, then `timings` (llama.cpp) override; absent fields become 0 (C++ B §6).
        `prompt_tokens` is only taken from non-streaming responses, as in B.
        """
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        timings = body.get("timings") if isinstance(body.get("timings"), dict) else {}
        self.input_tokens = int(usage.get("prompt_tokens", 0) or 0)
        self.output_tokens = int(usage.get("completion_tokens", 0) or 0)
        self.time_to_first_token = float(usage.get("prefill_duration_ttft", 0.0) or 0.0)
        self.tokens_per_second = float(usage.get("decoding_speed_tps", 0.0) or 0.0)
        if timings:
            self.input_tokens = int(timings.get("prompt_n", self.input_tokens) or 0)
            self.output_tokens = int(timings.get("predicted_n", self.output_tokens) or 0)
            self.time_to_first_token = float(timings.get("prompt_ms", 0.0) or 0.0) / 1000.0
            self.tokens_per_second = float(timings.get("predicted_per_second", 0.0) or 0.0)
        if not streaming and "prompt_tokens" in usage:
            self.prompt_tokens = int(usage["prompt_tokens"] or 0)


class WrappedServer:
    """One backend child serving one model."""

    server_name = "backend"
    health_paths: tuple[str, ...] = ("/health", "/v1/health")

    def __init__(self, model_name: str, checkpoint: str, recipe: str):
        self.model_name = model_name
        self.checkpoint = checkpoint
        self.recipe = recipe
        self.state = State.STOPPED
        self.port = 0
        self.child: process_manager.Child | None = None
        self.telemetry = Telemetry()
        self._state_lock = threading.Lock()  # guards state, port and child against load/unload races

    # -- what a subclass describes ----------------------------------------------------------------

    def build_argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def child_env(self) -> dict[str, str] | None:
        return None

    def prepare(self) -> None:
        """Work before the spawn (find or install the binary); may raise."""

    # -- lifecycle ---------------------------------------------------------------------------------

    def load(self, ready_timeout: float = READY_TIMEOUT) -> None:
        """Spawn the child and block until it is healthy. Raises ProcessError (child stopped) on failure."""
        self.prepare()
        with self._state_lock:
            if self.state is not State.STOPPED:
                return
            self.state = State.STARTING
            try:
                self.port = process_manager.find_free_port()
                log.info("%s will use port: %d", self.server_name, self.port)
                argv = self.build_argv(self.port)
                log.debug("Command: %s", " ".join(argv))
                self.child = process_manager.spawn(self.server_name, argv, env=self.child_env())
            except BaseException as e:
                self.state, self.port = State.STOPPED, 0
                if isinstance(e, OSError):
                    raise ProcessError(f"Failed to start {self.server_name}: {e}") from e
                raise
        try:
            self._wait_for_ready(ready_timeout)
        except BaseException:
            self.unload()  # never leave a half-started child behind, whatever interrupted the wait
            raise
        with self._state_lock:
            self.state = State.READY
        log.info("%s is ready: model %s, pid %d, port %d", self.server_name, self.model_name,
                 self.child.pid, self.port)

    def _wait_for_ready(self, timeout: float) -> None:
        """Poll the health URLs until one answers 200; fail at once if the child exits."""
        deadline = time.monotonic() + timeout
        urls = [f"http://127.0.0.1:{self.port}{p}" for p in self.health_paths]
        child = self.child
        assert child is not None
        while True:
            if not child.is_alive():
                tail = child.tail_text()
                raise ProcessError(
                    f"{self.server_name} failed to start: process exited with code {child.exit_code()}"
                    + (f"\n{tail}" if tail else ""))
            if any(http_client.is_reachable(url, READY_PROBE_TIMEOUT) for url in urls):
                return
            if time.monotonic() > deadline:
                raise ProcessError(f"{self.server_name} failed to start within {timeout:.0f} s")
            time.sleep(READY_POLL_INTERVAL)

    def unload(self) -> None:
        """Stop the child (TERM, bounded wait, KILL). Safe to call twice and on a dead child."""
        with self._state_lock:
            child, self.child = self.child, None
            self.state, self.port = State.STOPPED, 0
        if child is not None:
            process_manager.stop(child)

    def is_alive(self) -> bool:
        child = self.child
        return self.state is State.READY and child is not None and child.is_alive()

    @property
    def pid(self) -> int | None:
        child = self.child
        return child.pid if child else None

    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- forwarding --------------------------------------------------------------------------------

    def rewrite_request(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """Per-backend body rewrite before forwarding to `endpoint` (FLM replaces `model`). Returns
        `body` itself when nothing changes, a new dict otherwise; identity by default."""
        return body

    def request_payload(self, endpoint: str, body: dict[str, Any], raw: bytes | None = None) -> bytes:
        """The bytes to send to the child: the client's own `raw` bytes when nothing rewrote the body
        (C++ does so for streams, http-api §4.4; the backend parses the same JSON either way, and the
        hot path skips a serialisation), else the rewritten body serialised."""
        rewritten = self.rewrite_request(endpoint, body)
        return raw if raw is not None and rewritten is body else json_utils.dumps(rewritten)

    def forward_json(self, endpoint: str, body: dict[str, Any], raw: bytes | None = None) -> http_client.JsonReply:
        """POST to the child and return its status and parsed body. `raw` is the client's body as
        received (see `request_payload`). Raises ModelNotLoadedError or NetworkError (the child did
        not answer)."""
        if not self.is_alive():
            raise ModelNotLoadedError(self.server_name)
        try:
            return http_client.post_json(self.base_url() + endpoint, self.request_payload(endpoint, body, raw))
        except NetworkError as e:
            raise self._death_or(e) from e

    def _death_or(self, error: Exception) -> Exception:
        """A failed call to a child that has just died reports the death (the next request reloads
        it, since `is_alive` is then false), not a bare connection error. A child that timed out and
        no longer answers its health probe is hung: it is stopped and reported, and reloaded next time."""
        child = self.child
        if isinstance(error, http_client.BackendTimeout) and child is not None and child.is_alive():
            if not http_client.is_reachable(self.base_url() + self.health_paths[0], HUNG_PROBE_TIMEOUT):
                log.error("%s (pid %d) is hung: %s; stopping it", self.server_name, child.pid, error.message)
                self.unload()
                return ProcessError(f"{self.server_name} did not answer ({error.message}) and was "
                                    "stopped; the next request starts it again")
            return error
        if child is not None:
            try:
                child.popen.wait(timeout=1.0)
            except subprocess.TimeoutExpired:  # still running: the network error stands
                return error
            return ProcessError(f"{self.server_name} exited with code {child.exit_code()} "
                                "while handling the request")
        return error

    def open_stream(self, endpoint: str, body: bytes):
        """POST to the child and return the open streaming response (see streaming_proxy)."""
        if not self.is_alive():
            raise ModelNotLoadedError(self.server_name)
        try:
            return http_client.post_stream(self.base_url() + endpoint, body)
        except NetworkError as e:
            raise self._death_or(e) from e
