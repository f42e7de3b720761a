"""HTTP calls to backends and probes (C++ `utils/http_client.cpp`).

One pooled `requests.Session` per target origin, sized for concurrent streams. Sessions for loopback
targets ignore `HTTP_PROXY` and friends (`trust_env = False`), so a proxy setting never reroutes calls
to our own children.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ReadTimeoutError
from urllib3.util.retry import Retry

from lemonade.error_types import NetworkError
from lemonade.utils import path_utils

USER_AGENT = "lemon.cpp/1.0"  # the C++ client's UA (router-and-backends §4); llama-server logs it
POOL_SIZE = 64  # concurrent streams per backend; requests' default of 10 would queue the 11th client
BACKEND_TIMEOUT = 300.0  # C++ total timeout for non-streaming backend calls (§3.4)
CONNECT_TIMEOUT = 10.0
STREAM_IDLE_TIMEOUT = 600.0  # a stream silent this long is dead; there is no total limit

class _RetryOnDroppedConnection(Retry):
    """One retry on a fresh connection when a pooled keep-alive connection turns out to be closed.

    llama-server (cpp-httplib) closes a connection after a few requests or 5 s idle, after a stream
    sometimes without `Connection: close`; a request sent on it at that moment fails before the server
    has read it, so sending it again is safe (libcurl in C++ B does the same). A read timeout is never
    retried: the backend did receive that request.
    """

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        if isinstance(error, ReadTimeoutError):
            raise error
        return super().increment(method, url, response, error, _pool, _stacktrace)


_sessions: dict[str, requests.Session] = {}
_sessions_lock = threading.Lock()  # guards _sessions


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def session_for(url: str) -> requests.Session:
    """The shared session for `url`'s origin; created on first use."""
    origin = _origin(url)
    with _sessions_lock:
        session = _sessions.get(origin)
        if session is None:
            session = requests.Session()
            retry = _RetryOnDroppedConnection(total=1, connect=1, read=1, status=0, other=0, redirect=0,
                                              allowed_methods=None, raise_on_status=False)
            adapter = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=retry)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = USER_AGENT
            session.trust_env = not _is_loopback(url)
            _sessions[origin] = session
        return session


@dataclass
class JsonReply:
    status: int
    body: Any  # parsed JSON, or the raw text when the body is not JSON


class BackendTimeout(NetworkError):
    """The peer accepted the request but did not answer in time."""


def post_json(url: str, body: bytes, timeout: float | None = None) -> JsonReply:
    """POST a JSON body and parse the answer. Blocks; raises NetworkError when no answer arrives
    (BackendTimeout after `timeout`, default `$LEMONADE_BACKEND_TIMEOUT` or 300 s)."""
    if timeout is None:
        timeout = path_utils.backend_timeout(BACKEND_TIMEOUT)
    return _json_call("POST", url, timeout, data=body, headers={"Content-Type": "application/json"},
                      allow_redirects=False)


def get_json(url: str, timeout: float = BACKEND_TIMEOUT) -> JsonReply:
    """GET and parse the answer. Blocks; raises NetworkError when no answer arrives."""
    return _json_call("GET", url, timeout)


def _json_call(method: str, url: str, timeout: float, **kwargs) -> JsonReply:
    try:
        response = session_for(url).request(method, url, timeout=(CONNECT_TIMEOUT, timeout), **kwargs)
    except requests.ReadTimeout as e:
        raise BackendTimeout(f"no answer within {timeout:g} s") from e
    except requests.RequestException as e:
        raise NetworkError(str(e)) from e
    try:
        parsed: Any = response.json()
    except ValueError:
        parsed = response.text
    return JsonReply(response.status_code, parsed)


def post_stream(url: str, body: bytes, read_timeout: float = STREAM_IDLE_TIMEOUT) -> requests.Response:
    """POST and return the open streaming response (caller iterates `iter_content` and closes it).

    No total timeout: a long generation is not cut (C++ cut at 300 s; spec http-api §5 recommends not
    to). `read_timeout` bounds the silence between two chunks, so a hung backend frees the thread.
    """
    try:
        return session_for(url).post(
            url, data=body, headers={"Content-Type": "application/json"}, stream=True,
            timeout=(CONNECT_TIMEOUT, read_timeout), allow_redirects=False)
    except requests.RequestException as e:
        raise NetworkError(str(e)) from e


def iter_chunks(response: requests.Response) -> Iterator[bytes]:
    """Yield bytes as they arrive, one HTTP chunk at a time, without re-splitting (never `iter_lines`).

    With `chunk_size=None` urllib3 hands over each transfer-encoding chunk as soon as it is read
    (llama-server sends one SSE frame per chunk), so nothing waits for a buffer to fill.
    """
    return response.iter_content(chunk_size=None)


def is_reachable(url: str, timeout: float = 1.0) -> bool:
    """True iff GET `url` answers 200 within `timeout` seconds (C++ `is_reachable`)."""
    try:
        response = session_for(url).get(url, timeout=(timeout, timeout))
        response.close()
        return response.status_code == 200
    except requests.RequestException:
        return False
