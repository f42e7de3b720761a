"""A remote OpenAI-compatible upstream as a backend (ours; the nearest twin is lemonade HEAD's `cloud`
recipe, head-llm-surface.md §7.14): vLLM or TGI on a GPU box, another lemonade, a llama-server on
another host.

A user model with recipe `remote` names the upstream's OpenAI base URL (`base_url`, e.g.
`http://gpu-box:8000/v1`), its model id there (`checkpoint`) and, optionally, the environment variable
that holds its API key (`api_key_env`; the key is read through `path_utils` when the model loads, sent
as `Authorization: Bearer`, and never stored or logged). Nothing is spawned:

  * `ensure_ready` probes the upstream (`GET <base_url>/models`, else `<origin>/health`) and fails with
    the upstream's own status and message, or 502 naming the host when it cannot be reached;
  * `forward` is the base class's: JSON and SSE relayed through `http_client`'s lean client (http or
    https, straight to the host: no proxy, as for every backend), `model` rewritten to the upstream's
    id, a non-200 answer passed on with its status and message;
  * the router counts it in no pool and never evicts it (`unmetered`): it uses nothing here;
  * `/health` shows the upstream URL and the last thing seen of it (`health_details`).
"""
from __future__ import annotations

import enum
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

from lemonade.error_types import (BackendError, ConfigurationError, InvalidRequestError, LemonadeError, NetworkError,
                                  UpstreamError)
from lemonade.utils import http_client, path_utils
from lemonade.wrapped_server import Answered, BackendCall, ReplySink, State, Telemetry, WrappedServer

log = logging.getLogger(__name__)

SCHEMES = ("http", "https")
PROBE_TIMEOUT = 10.0  # seconds for the probe at load: a remote host, maybe far away
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPENAI_PREFIX = "/v1"  # our endpoints are OpenAI paths; the upstream's base URL already ends in its own


def check_base_url(url: str) -> str:
    """`url` without its trailing slash if it can name an upstream: http or https, a host, no user
    or password (a key goes in `api_key_env`, where it is not written to disk), no query or fragment.
    Raises InvalidRequestError saying what is wrong."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise InvalidRequestError(f"Invalid base_url {url!r}: {e}") from None
    if parts.scheme not in SCHEMES:
        raise InvalidRequestError(f"Invalid base_url {url!r}: the scheme must be http or https")
    if not parts.hostname:
        raise InvalidRequestError(f"Invalid base_url {url!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequestError(f"Invalid base_url: credentials in the URL are refused (they would be "
                                  "stored in user_models.json); put the key in an environment variable "
                                  "and name it with api_key_env")
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise InvalidRequestError(f"Invalid base_url {url!r}: no query or fragment allowed")
    if port == 0:
        raise InvalidRequestError(f"Invalid base_url {url!r}: port 0")
    return text.rstrip("/")


def check_env_name(name: str) -> str:
    """`name` if it can name an environment variable (letters, digits, `_`; not starting with a
    digit). Raises InvalidRequestError: `api_key_env` takes the variable's name, never the key."""
    if not _ENV_NAME.fullmatch(name):
        raise InvalidRequestError(f"Invalid api_key_env: {len(name)} characters that are not an environment "
                                  "variable name (give the variable's name, e.g. VLLM_API_KEY, not the key)")
    return name


class UpstreamState(enum.Enum):
    UNKNOWN = "unknown"  # not probed yet
    OK = "ok"  # answered the last call or probe
    UNREACHABLE = "unreachable"  # no connection, or the connection broke off
    ERROR = "error"  # answered with a server error, or refused the key


@dataclass(frozen=True)
class UpstreamHealth:
    state: UpstreamState
    detail: str
    at: float  # time.monotonic() of the observation


class RemoteServer(WrappedServer):
    """One model of a remote upstream. No child: the state is READY once a probe succeeded, until
    `stop` (unload); a call that fails leaves it READY, so the next one tries again."""

    unmetered = True
    health_paths = ()

    def __init__(self, model_name: str, checkpoint: str, recipe: str, base_url: str, api_key_env: str = ""):
        super().__init__(model_name, checkpoint, recipe)
        self.upstream = check_base_url(base_url)
        self.api_key_env = check_env_name(api_key_env) if api_key_env else ""
        self.server_name = f"remote upstream {self.upstream}"
        self._headers: dict[str, str] | None = None  # with the key; read at load, kept in memory only
        self._health = UpstreamHealth(UpstreamState.UNKNOWN, "not probed yet", time.monotonic())
        self._health_lock = threading.Lock()  # guards _health

    # -- lifecycle ---------------------------------------------------------------------------------

    def ensure_ready(self, progress: Callable | None = None) -> None:
        """Probe the upstream unless a probe already succeeded. Blocks up to about 2 × PROBE_TIMEOUT.
        Raises ConfigurationError (the key's variable is not set), BackendError (502: unreachable),
        UpstreamError (the upstream answered the probe with an error: its status and message)."""
        with self._cond:
            if self._state is State.READY:
                return
        headers = self._auth_headers()
        self._probe(headers)
        with self._cond:
            self._headers, self._state, self.telemetry = headers, State.READY, Telemetry()
            self._cond.notify_all()
        log.info("Remote model %s ready: %s at %s", self.model_name, self.checkpoint, self.upstream)

    def stop(self) -> None:
        """Forget the upstream (nothing runs here). Safe twice."""
        with self._cond:
            self._state, self._headers = State.STOPPED, None
            self._cond.notify_all()

    def is_ready(self) -> bool:
        with self._cond:
            return self._state is State.READY

    def base_url(self) -> str:
        return self.upstream

    def _auth_headers(self) -> dict[str, str] | None:
        if not self.api_key_env:
            return None
        key = path_utils.secret_from_env(self.api_key_env)
        if key is None:
            raise ConfigurationError(f"Model {self.model_name} needs its API key in the environment variable "
                                     f"{self.api_key_env}, which is not set in the server's environment")
        if not http_client.FIELD_VALUE.fullmatch(key):
            raise ConfigurationError(f"The API key in {self.api_key_env} holds a line break or another control "
                                     "character and cannot be sent")
        return {"Authorization": f"Bearer {key}"}

    def _probe(self, headers: dict[str, str] | None) -> None:
        """`GET <base>/models`; an upstream without that route is asked `<origin>/health`."""
        reply = self._get(self.upstream + "/models", headers)
        if reply.status == 200:
            self._note(UpstreamState.OK, "answered /models")
            ids = _model_ids(reply.body)
            if ids and self.checkpoint not in ids:
                log.warning("Remote upstream %s does not list model %s (it lists: %s); requests go there anyway",
                            self.upstream, self.checkpoint, ", ".join(ids[:10]))
            return
        if reply.status not in (401, 403):
            parts = urlsplit(self.upstream)
            health = self._get(f"{parts.scheme}://{parts.netloc}/health", headers)
            if health.status == 200:
                self._note(UpstreamState.OK, "answered /health")
                return
        message = _message_of(reply.body) or f"HTTP {reply.status}"
        self._note(UpstreamState.ERROR, f"HTTP {reply.status}")
        raise UpstreamError(f"Remote upstream {self.upstream} for {self.model_name} answered the probe of "
                            f"/models with HTTP {reply.status}: {message}", reply.status,
                            {"upstream": self.upstream, "status_code": reply.status})

    def _get(self, url: str, headers: dict[str, str] | None) -> http_client.JsonReply:
        try:
            return http_client.fetch_json(url, PROBE_TIMEOUT, headers)
        except NetworkError as e:
            raise self.failure_error(e) from e

    # -- forwarding --------------------------------------------------------------------------------

    def endpoint_url(self, endpoint: str) -> str:
        return self.upstream + endpoint.removeprefix(_OPENAI_PREFIX)

    def request_headers(self) -> dict[str, str] | None:
        return self._headers

    def rewrite_request(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """The client named our model; the upstream knows it by its own id (the checkpoint)."""
        if body.get("model") == self.checkpoint:
            return body
        return {**body, "model": self.checkpoint}

    def forward(self, call: BackendCall, sink: ReplySink) -> Answered | None:
        """The base class's forward, noting what the upstream did for `/health`. Returns and raises as it."""
        return super().forward(call, _Observed(sink, self._note))

    def failure_error(self, error: LemonadeError) -> LemonadeError:
        """A call without a (complete) answer: 502 naming the upstream."""
        detail = error.message.removeprefix("Network error: ")
        self._note(UpstreamState.UNREACHABLE, detail)
        what = "did not answer in time" if isinstance(error, http_client.BackendTimeout) else "failed"
        return BackendError(f"Remote upstream {self.upstream} for {self.model_name} {what}: {detail}",
                            {"upstream": self.upstream})

    # -- health ------------------------------------------------------------------------------------

    def _note(self, state: UpstreamState, detail: str) -> None:
        with self._health_lock:
            self._health = UpstreamHealth(state, detail, time.monotonic())

    def health(self) -> UpstreamHealth:
        with self._health_lock:
            return self._health

    def health_details(self) -> dict[str, Any]:
        """The upstream and the last thing seen of it (no probe: `/health` is polled and must not wait
        on a far host)."""
        seen = self.health()
        return {"upstream": {"base_url": self.upstream, "model": self.checkpoint, "state": seen.state.value,
                             "detail": seen.detail,
                             "seconds_since_check": round(time.monotonic() - seen.at, 1)}}


class _Observed:
    """A sink that notes whether the upstream answered (for `/health`) and passes everything on;
    chunks go straight to the wrapped sink's method."""

    def __init__(self, sink: ReplySink, note: Callable[[UpstreamState, str], None]):
        self._sink, self._note = sink, note
        self.stream_chunk = sink.stream_chunk
        self.stream_end = sink.stream_end

    def json(self, status: int, body: Any) -> None:
        if status >= 500 or status in (401, 403):
            self._note(UpstreamState.ERROR, f"HTTP {status}")
        else:
            self._note(UpstreamState.OK, f"answered HTTP {status}")
        self._sink.json(status, body)

    def stream_start(self) -> None:
        self._note(UpstreamState.OK, "streaming")
        self._sink.stream_start()


def _model_ids(body: Any) -> list[str]:
    """The ids of an OpenAI `/models` answer."""
    data = body.get("data") if isinstance(body, dict) else None
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)] if isinstance(data, list) else []


def _message_of(body: Any) -> str:
    """The error message of an upstream's answer (OpenAI nested error, a plain `error` string, or text)."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
        if isinstance(body.get("detail"), str):
            return body["detail"]
    return body.strip()[:300] if isinstance(body, str) else ""
