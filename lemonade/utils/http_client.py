"""HTTP calls to backends and probes (C++ `utils/http_client.cpp`).

Two kinds of client, by cost:
  * the hot path, a request proxied to a backend child (`post_json`, `post_stream`), uses pooled
    keep-alive `http.client` connections to 127.0.0.1: `requests` costs about 2.3 ms of CPU per call
    here against 0.7 ms for `http.client` (bench/profile_proxy.py), which was most of the proxy's
    added latency;
  * everything else (health probes, downloads) uses one pooled `requests.Session` per origin. Sessions
    for loopback targets ignore `HTTP_PROXY` and friends (`trust_env = False`).
"""
from __future__ import annotations

import http.client
import json
import socket
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
    """POST a JSON body to a loopback backend and parse the answer. Blocks; raises NetworkError when
    no answer arrives (BackendTimeout after `timeout`, default `$LEMONADE_BACKEND_TIMEOUT` or 300 s)."""
    if timeout is None:
        timeout = path_utils.backend_timeout(BACKEND_TIMEOUT)
    response = _backend_post(url, body, timeout)
    try:
        return JsonReply(response.status_code, response.json_or_text())
    finally:
        response.close()


def get_json(url: str, timeout: float = BACKEND_TIMEOUT) -> JsonReply:
    """GET and parse the answer. Blocks; raises NetworkError when no answer arrives."""
    try:
        response = session_for(url).get(url, timeout=(CONNECT_TIMEOUT, timeout))
    except requests.ReadTimeout as e:
        raise BackendTimeout(f"no answer within {timeout:g} s") from e
    except requests.RequestException as e:
        raise NetworkError(str(e)) from e
    try:
        parsed: Any = response.json()
    except ValueError:
        parsed = response.text
    return JsonReply(response.status_code, parsed)


def post_stream(url: str, body: bytes, read_timeout: float = STREAM_IDLE_TIMEOUT) -> "BackendResponse":
    """POST to a loopback backend and return the open response (iterate `iter_chunks`, then close).

    No total timeout: a long generation is not cut (C++ cut at 300 s; spec http-api §5 recommends not
    to). `read_timeout` bounds the silence between two chunks, so a hung backend frees the thread.
    """
    # A connection is not kept after a stream: llama-server often closes it right after the last chunk
    # without saying so, and the next request would pay a failed attempt before its retry.
    return _backend_post(url, body, read_timeout, keep_alive=False)


def iter_chunks(response: "BackendResponse") -> Iterator[bytes]:
    """Yield bytes as they arrive, one HTTP chunk at a time, without re-splitting (never line-based):
    llama-server sends one SSE frame per chunk, so nothing waits for a buffer to fill."""
    return response.iter_chunks()


class BackendResponse:
    """An answer from a backend: status, headers, body. Closing it returns a fully read keep-alive
    connection to its pool and drops any other."""

    def __init__(self, pool: "_ConnectionPool", conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse, keep_alive: bool = True):
        self._pool, self._conn, self._response = pool, conn, response
        self._keep_alive = keep_alive
        self.status_code = response.status
        self.headers = response.headers

    def iter_chunks(self) -> Iterator[bytes]:
        try:
            while True:
                chunk = self._response.read1(65536)
                if not chunk:
                    return
                yield chunk
        except socket.timeout as e:
            raise BackendTimeout("no data within the stream's idle timeout") from e
        except (OSError, http.client.HTTPException) as e:
            raise NetworkError(str(e) or type(e).__name__) from e

    def read(self) -> bytes:
        try:
            return self._response.read()
        except socket.timeout as e:
            raise BackendTimeout("the answer stalled") from e
        except (OSError, http.client.HTTPException) as e:
            raise NetworkError(str(e) or type(e).__name__) from e

    def json(self) -> Any:
        return json.loads(self.read())

    def json_or_text(self) -> Any:
        """The body parsed as JSON, or as text when it is not JSON (read once)."""
        raw = self.read()
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    @property
    def text(self) -> str:
        return self.read().decode("utf-8", "replace")

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        reusable = self._keep_alive and self._response.isclosed() and not self._response.will_close
        if not reusable:
            self._response.close()
        self._pool.release(conn, reusable)


class _ConnectionPool:
    """Keep-alive connections to one backend, kept only while the backend is otherwise idle.

    llama-server (cpp-httplib) gives each open connection one of its few HTTP worker threads until it
    closes or sits idle for 5 s. An idle connection parked in a pool therefore holds a worker that a
    queued request needs: with 32 streams at once that cost about 8 % of throughput
    (bench/concurrency.py). So a finished request keeps its connection only when no other request to
    that backend is in flight (the next sequential request reuses it: that is the latency win), and at
    most one is kept.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._idle: http.client.HTTPConnection | None = None
        self._in_flight = 0
        self._lock = threading.Lock()  # guards _idle and _in_flight

    def acquire(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            self._in_flight += 1
            conn, self._idle = self._idle, None
        if conn is not None:
            return conn, True
        return http.client.HTTPConnection(self.host, self.port, timeout=CONNECT_TIMEOUT), False

    def release(self, conn: http.client.HTTPConnection, reusable: bool = True) -> None:
        """Hand back a connection whose request is over; it is closed unless it can be kept."""
        with self._lock:
            self._in_flight -= 1
            if reusable and self._in_flight == 0 and self._idle is None:
                self._idle, conn = conn, None
        if conn is not None:
            conn.close()


_pools: dict[tuple[str, int], _ConnectionPool] = {}
_pools_lock = threading.Lock()  # guards _pools
_DROPPED = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
            http.client.BadStatusLine)


def _pool_for(url: str) -> tuple[_ConnectionPool, str]:
    parts = urlsplit(url)
    key = (parts.hostname or "127.0.0.1", parts.port or 80)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = _ConnectionPool(*key)
    return pool, parts.path + (f"?{parts.query}" if parts.query else "")


def _backend_post(url: str, body: bytes, timeout: float, keep_alive: bool = True) -> BackendResponse:
    """Send one POST. A pooled connection that the backend has closed meanwhile (llama-server drops
    keep-alive connections after 5 s idle or a few requests, after a stream sometimes without
    `Connection: close`) fails before the request was read, so it is sent once more on a fresh
    connection (libcurl in C++ B does the same). A timeout is never retried."""
    pool, path = _pool_for(url)
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    while True:
        conn, reused = pool.acquire()
        try:
            if conn.sock is None:
                conn.connect()
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sock.settimeout(timeout)
            conn.request("POST", path, body=body, headers=headers)
            return BackendResponse(pool, conn, conn.getresponse(), keep_alive)
        except socket.timeout as e:
            pool.release(conn, reusable=False)
            raise BackendTimeout(f"no answer within {timeout:g} s") from e
        except _DROPPED as e:
            pool.release(conn, reusable=False)
            if reused:
                continue  # only a kept connection is retried, so this loop ends
            raise NetworkError(str(e) or type(e).__name__) from e
        except (OSError, http.client.HTTPException) as e:
            pool.release(conn, reusable=False)
            raise NetworkError(str(e) or type(e).__name__) from e


def is_reachable(url: str, timeout: float = 1.0) -> bool:
    """True iff GET `url` answers 200 within `timeout` seconds (C++ `is_reachable`)."""
    try:
        response = session_for(url).get(url, timeout=(timeout, timeout))
        response.close()
        return response.status_code == 200
    except requests.RequestException:
        return False
