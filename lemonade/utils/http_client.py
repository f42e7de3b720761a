"""HTTP calls to backends and probes (C++ `utils/http_client.cpp`).

Two kinds of client, by cost:
  * the hot path, a request proxied to a backend child (`post_json`, `post_stream`), uses pooled
    keep-alive connections to 127.0.0.1 and a small HTTP/1.1 client of its own (see "the wire"
    below): `requests` cost about 2.3 ms of CPU per call here, `http.client` 0.7 ms, this one less
    than half of that (bench/profile_proxy.py, bench/proxy_overhead.py). The same client reaches
    remote upstreams (another host, http or https, extra headers such as a key; never a proxy);
  * everything else (health probes, downloads) uses one pooled `requests.Session` per origin. Sessions
    for loopback targets ignore `HTTP_PROXY` and friends (`trust_env = False`).
"""
from __future__ import annotations

import json
import re
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from lemonade.error_types import NetworkError
from lemonade.utils import path_utils

USER_AGENT = "lemon.cpp/1.0"  # the C++ client's UA (router-and-backends §4); llama-server logs it
POOL_SIZE = 64  # concurrent streams per backend; requests' default of 10 would queue the 11th client
BACKEND_TIMEOUT = 300.0  # C++ total timeout for non-streaming backend calls (§3.4)
CONNECT_TIMEOUT = 10.0
STREAM_IDLE_TIMEOUT = 600.0  # a stream silent this long is dead; there is no total limit

class _RetryOnDroppedConnection(HTTPAdapter):
    """One retry on a fresh connection when a request fails at the connection level.

    llama-server (cpp-httplib) closes a connection after a few requests or 5 s idle, after a stream
    sometimes without `Connection: close`; a request sent on a pooled connection at that moment fails
    before the server has read it, so sending it again is safe (libcurl in C++ B does the same).
    `HTTPAdapter.send` returns once the answer's head is read (the body is read later, outside it), so
    a `requests.ConnectionError` here means no answer arrived: refused, reset or closed. A read timeout
    (`requests.ReadTimeout`, not a ConnectionError) is never retried: the backend did receive that request.
    """

    def send(self, request, **kwargs):
        try:
            return super().send(request, **kwargs)
        except requests.ConnectionError:
            return super().send(request, **kwargs)


_sessions: dict[str, requests.Session] = {}
_sessions_lock = threading.Lock()  # guards _sessions


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def session_for(url: str) -> requests.Session:
    """The shared session for `url`'s origin, created on first use: the only `requests.Session` factory
    (probes, the llama.cpp release download, Hugging Face). Its User-Agent is the C++ client's; a
    caller that needs another sends it as a per-request header."""
    origin = _origin(url)
    with _sessions_lock:
        session = _sessions.get(origin)
        if session is None:
            session = requests.Session()
            adapter = _RetryOnDroppedConnection(pool_connections=4, pool_maxsize=POOL_SIZE)
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


def post_json(url: str, body: bytes, timeout: float | None = None,
              headers: Mapping[str, str] | None = None) -> JsonReply:
    """POST a JSON body to a backend (a loopback child, or a remote upstream over http or https, with
    extra `headers` such as its Authorization) and parse the answer. Blocks; raises NetworkError when
    no answer arrives (BackendTimeout after `timeout`, default `$LEMONADE_BACKEND_TIMEOUT` or 300 s)."""
    if timeout is None:
        timeout = path_utils.backend_timeout(BACKEND_TIMEOUT)
    response = _backend_request("POST", url, body, timeout, headers=headers)
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


def fetch_json(url: str, timeout: float, headers: Mapping[str, str] | None = None) -> JsonReply:
    """GET `url` through the backend client (no proxy, as every backend call) and parse the answer:
    a remote upstream's health probe. Blocks up to about `timeout`; raises NetworkError."""
    response = _backend_request("GET", url, b"", timeout, headers=headers)
    try:
        return JsonReply(response.status_code, response.json_or_text())
    finally:
        response.close()


def post_stream(url: str, body: bytes, read_timeout: float = STREAM_IDLE_TIMEOUT,
                headers: Mapping[str, str] | None = None) -> "BackendResponse":
    """POST to a backend and return the open response (iterate `iter_chunks`, then close).

    No total timeout: a long generation is not cut (C++ cut at 300 s; spec http-api §5 recommends not
    to). `read_timeout` bounds the silence between two chunks, so a hung backend frees the thread.
    """
    # A connection is not kept after a stream: llama-server often closes it right after the last chunk
    # without saying so, and the next request would pay a failed attempt before its retry.
    return _backend_request("POST", url, body, read_timeout, keep_alive=False, headers=headers)


def iter_chunks(response: "BackendResponse") -> Iterator[bytes]:
    """Yield bytes as they arrive, one HTTP chunk at a time, without re-splitting (never line-based):
    llama-server sends one SSE frame per chunk, so nothing waits for a buffer to fill."""
    return response.iter_chunks()


class BackendResponse:
    """An answer from a backend: status, headers (lower-case names), body. Closing it returns a fully
    read keep-alive connection to its pool and drops any other."""

    def __init__(self, pool: "_ConnectionPool", conn: "_Connection", head: "_Head", keep_alive: bool = True):
        self._pool, self._conn = pool, conn
        self.status_code = head.status
        self.headers = head.headers
        self._body = _BodyReader(conn.rfile, head)
        self._keep_alive = keep_alive and not head.will_close

    def iter_chunks(self) -> Iterator[bytes]:
        try:
            while True:
                chunk = self._body.read_some()
                if not chunk:
                    return
                yield chunk
        except socket.timeout as e:
            raise BackendTimeout("no data within the stream's idle timeout") from e
        except (OSError, ValueError) as e:
            raise NetworkError(str(e) or type(e).__name__) from e

    def read(self) -> bytes:
        try:
            return self._body.read_all()
        except socket.timeout as e:
            raise BackendTimeout("the answer stalled") from e
        except (OSError, ValueError) as e:
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
        if conn is not None:
            self._pool.release(conn, self._keep_alive and self._body.done)


# -- the wire ----------------------------------------------------------------------------------------
# A lean HTTP/1.1 client for our own children on 127.0.0.1, and for remote upstreams (other hosts,
# https through `ssl`, never through a proxy). `http.client` parses every header block
# with the `email` package and sends head and body in two writes; on this path that cost about 0.45 ms
# per proxied request on a machine idling between requests (bench/proxy_overhead.py), most of the
# router's added latency. What a backend may send us is narrow (llama-server, flm), so a small parser
# of status line, header fields and Content-Length or chunked framing is enough.

MAX_LINE = 65536  # longest request, status, header or chunk-size line (http.server's and http.client's limit)
MAX_HEADERS = 100
JOIN_BODY_LIMIT = 65536  # bodies up to this size leave in the same write as the head
_REQUEST_HEAD = ("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nAccept-Encoding: identity\r\n"
                 "Content-Type: application/json\r\nUser-Agent: " + USER_AGENT + "\r\n"
                 "Content-Length: {length}\r\n{extra}\r\n")
FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # no CR, LF or other controls: no header injection
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token


def header_block(headers: Mapping[str, str] | None) -> str:
    """Extra request header lines, each ending in CRLF. Raises ValueError on a name that is not a
    token or a value holding CR, LF or another control character (it would split the request)."""
    if not headers:
        return ""
    lines = []
    for name, value in headers.items():
        if not _FIELD_NAME.fullmatch(name) or not FIELD_VALUE.fullmatch(value):
            raise ValueError(f"header {name!r} has a name or value that cannot be sent")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


class HeaderError(Exception):
    """A header block we refuse; `status` is what a server answers for it (431 or 400); `ended` when
    the input stopped before the block did."""

    def __init__(self, status: int, message: str, ended: bool = False):
        super().__init__(message)
        self.status, self.ended = status, ended


def header_lines(rfile, strict_end: bool = False) -> Iterator[tuple[bytes, bytes, bytes]]:
    """(line, name, stripped value) of each header line up to the empty line; read by both sides of
    the proxy (`httpd` for requests, `_Connection` for a backend's answers) and for chunked trailers.
    Raises HeaderError: 431 for a line over MAX_LINE or more than MAX_HEADERS fields, 400 for a line
    without a colon, and with `strict_end` 400 when the input ends before the empty line."""
    for _ in range(MAX_HEADERS + 1):
        line = rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise HeaderError(431, "Line too long")
        if line in (b"\r\n", b"\n"):
            return
        if not line:
            if strict_end:
                raise HeaderError(400, "The input ended before the empty line after the fields", ended=True)
            return
        name, colon, value = line.partition(b":")
        if not colon:
            raise HeaderError(400, f"Malformed header line: {line[:60]!r}")
        yield line, name, value.strip()
    raise HeaderError(431, f"More than {MAX_HEADERS} header fields")


# -- chunked transfer coding (RFC 9112 §7.1), one decoder for request bodies (httpd) and answers ------
#   chunk = chunk-size [ chunk-ext ] CRLF chunk-data CRLF;  last-chunk = 1*"0" [ chunk-ext ] CRLF,
#   then trailer field lines and a final CRLF. chunk-size is 1*HEXDIG: no sign, no "0x", no blanks.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE = re.compile(rb"(?P<size>[0-9A-Fa-f]+)(?:[ \t]*;[ \t]*" + _TOKEN
                         + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*\r\n")
MAX_CHUNK_SIZE_DIGITS = 16  # a size past 2**64 is an attack, not a body


class ChunkError(ValueError):
    """Broken chunked framing. `cut` is True when the input ended in the middle of the body."""

    def __init__(self, message: str, cut: bool = False):
        super().__init__(message)
        self.cut = cut


def next_chunk_size(rfile) -> int:
    """Read one chunk-size line (with its extensions, which are checked and ignored) and return the
    size. At the last chunk (0) the trailer section is read too (fields checked, bounded like header
    fields, discarded). Raises ChunkError."""
    line = rfile.readline(MAX_LINE + 1)
    if not line.endswith(b"\n") and len(line) <= MAX_LINE:
        raise ChunkError("the body ended before the last chunk", cut=True)
    match = _CHUNK_LINE.fullmatch(line)
    if match is None or len(match["size"].lstrip(b"0")) > MAX_CHUNK_SIZE_DIGITS:
        raise ChunkError(f"malformed chunk-size line: {line[:40]!r}")
    size = int(match["size"], 16)
    if size == 0:
        try:
            for _ in header_lines(rfile, strict_end=True):
                pass  # trailer fields: nothing we read uses them
        except HeaderError as e:
            raise ChunkError(f"bad trailer section: {e}", cut=e.ended) from None
    return size


def read_chunk_data(rfile, size: int) -> bytes:
    """The `size` bytes of a chunk and the CRLF that must follow them. Raises ChunkError."""
    data = rfile.read(size)
    if len(data) < size:
        raise ChunkError(f"the body ended {size - len(data)} bytes into a chunk of {size}", cut=True)
    end = rfile.readline(3)
    if end != b"\r\n":
        raise ChunkError(f"no CRLF after a chunk's data: {end!r}", cut=end in (b"", b"\r"))
    return data


def read_chunk(rfile) -> bytes:
    """The data of the next chunk; b"" once the last chunk and its trailers are read. Raises ChunkError."""
    size = next_chunk_size(rfile)
    return read_chunk_data(rfile, size) if size else b""


class _Dropped(NetworkError):
    """The backend closed the connection before answering: the request was not processed."""


@dataclass
class _Head:
    status: int
    headers: dict[str, str]
    will_close: bool


class _Connection:
    """One connection to a backend: the request goes out in one write, the answer is read through a
    buffered reader."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None):
        self.host, self.port, self.tls = host, port, tls
        self.authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.sock: socket.socket | None = None
        self.rfile = None

    def send(self, method: str, path: str, body: bytes, timeout: float, extra: str = "") -> None:
        """Connect (with TLS for https) if needed and write the request. Raises OSError (ssl.SSLError
        included, e.g. a certificate that does not verify)."""
        if self.sock is None:
            sock = socket.create_connection((self.host, self.port), CONNECT_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(sock, server_hostname=self.host)
                except BaseException:
                    sock.close()
                    raise
            self.sock, self.rfile = sock, sock.makefile("rb")
        self.sock.settimeout(timeout)
        head = _REQUEST_HEAD.format(method=method, path=path, authority=self.authority, length=len(body),
                                    extra=extra).encode("latin-1")
        if len(body) <= JOIN_BODY_LIMIT:
            self.sock.sendall(head + body)
        else:  # a large body (an image, say) is not copied just to save one write
            self.sock.sendall(head)
            self.sock.sendall(body)

    def read_head(self) -> _Head:
        """The status line and header fields of the answer (informational 1xx answers skipped).
        Raises _Dropped when the backend closed first, NetworkError on a malformed head, OSError."""
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if not line:
                raise _Dropped("the backend closed the connection without answering")
            version, _, rest = line.partition(b" ")
            code = rest[:3]
            if not version.startswith(b"HTTP/1.") or len(line) > MAX_LINE or not code.isdigit():
                raise NetworkError(f"malformed status line from the backend: {line[:80]!r}")
            headers = self._read_fields()
            status = int(code)
            if 100 <= status < 200:
                continue
            connection = headers.get("connection", "").lower()
            will_close = "close" in connection or (version == b"HTTP/1.0" and "keep-alive" not in connection)
            return _Head(status, headers, will_close)

    def _read_fields(self) -> dict[str, str]:
        """Header fields by lower-case name, repeats joined with ", ". Blanks around a name are
        dropped, as RFC 9112 §5.1 asks of a client (a server refuses them)."""
        headers: dict[str, str] = {}
        try:
            for _, name, value in header_lines(self.rfile):
                key, text = name.strip().lower().decode("latin-1"), value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
        except HeaderError as e:
            raise NetworkError(f"{e} (from the backend)") from None
        return headers

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            self.rfile.close()
            sock.close()


class _BodyReader:
    """The body of one answer: chunked, Content-Length, or up to the close. `read_some` hands over
    one transfer chunk (or what one read brought) as soon as it is there, never more."""

    def __init__(self, rfile, head: _Head):
        self._rfile = rfile
        self._chunked = "chunked" in head.headers.get("transfer-encoding", "").lower()
        length = head.headers.get("content-length")
        self._remaining: int | None = None
        if head.status in (204, 304):
            self._remaining = 0
        elif not self._chunked and length is not None:
            if not length.isdigit():
                raise NetworkError(f"bad Content-Length from the backend: {length[:40]!r}")
            self._remaining = int(length)
        self.done = self._remaining == 0

    def read_some(self) -> bytes:
        """Up to one chunk of the body; b"" at its end. Raises ValueError on broken framing
        (including a body cut short), OSError."""
        if self.done:
            return b""
        if self._chunked:
            return self._next_chunk()
        if self._remaining is None:  # no length: the body ends when the backend closes
            data = self._rfile.read1(65536)
            self.done = not data
            return data
        data = self._rfile.read1(min(65536, self._remaining))
        if not data:
            raise ValueError(f"the backend closed the connection with {self._remaining} bytes of the body unsent")
        self._remaining -= len(data)
        self.done = self._remaining == 0
        return data

    def read_all(self) -> bytes:
        if self._remaining is not None and not self._chunked and not self.done:
            data = self._rfile.read(self._remaining)  # one call for the common non-streaming answer
            if len(data) < self._remaining:
                raise ValueError(f"the backend closed the connection after {len(data)} of "
                                 f"{self._remaining} bytes of the body")
            self._remaining, self.done = 0, True
            return data
        return b"".join(iter(self.read_some, b""))

    def _next_chunk(self) -> bytes:
        try:
            data = read_chunk(self._rfile)
        except ChunkError as e:
            raise ChunkError(f"{e} (from the backend)", e.cut) from None
        self.done = not data
        return data


class _ConnectionPool:
    """Keep-alive connections to one backend, kept only while the backend is otherwise idle.

    llama-server (cpp-httplib) gives each open connection one of its few HTTP worker threads until it
    closes or sits idle for 5 s. An idle connection parked in a pool therefore holds a worker that a
    queued request needs: with 32 streams at once that cost about 8 % of throughput
    (bench/concurrency.py). So a finished request keeps its connection only when no other request to
    that backend is in flight (the next sequential request reuses it: that is the latency win), and at
    most one is kept.
    """

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None):
        self.host, self.port, self.tls = host, port, tls
        self._idle: _Connection | None = None
        self._in_flight = 0
        self._lock = threading.Lock()  # guards _idle and _in_flight

    def acquire(self) -> tuple[_Connection, bool]:
        with self._lock:
            self._in_flight += 1
            conn, self._idle = self._idle, None
        if conn is not None:
            return conn, True
        return _Connection(self.host, self.port, self.tls), False

    def release(self, conn: _Connection, reusable: bool = True) -> None:
        """Hand back a connection whose request is over; it is closed unless it can be kept."""
        with self._lock:
            self._in_flight -= 1
            if reusable and self._in_flight == 0 and self._idle is None:
                self._idle, conn = conn, None
        if conn is not None:
            conn.close()


_pools: dict[tuple[str, str, int], _ConnectionPool] = {}
_pools_lock = threading.Lock()  # guards _pools
_DROPPED = (_Dropped, ConnectionResetError, BrokenPipeError)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _pool_for(url: str) -> tuple[_ConnectionPool, str]:
    parts = urlsplit(url)
    scheme = parts.scheme or "http"
    if scheme not in _DEFAULT_PORTS:
        raise NetworkError(f"unsupported URL scheme {scheme!r} in {url}")
    key = (scheme, parts.hostname or "127.0.0.1", parts.port or _DEFAULT_PORTS[scheme])
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            tls = ssl.create_default_context() if scheme == "https" else None  # verifies the certificate
            pool = _pools[key] = _ConnectionPool(key[1], key[2], tls)
    return pool, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _backend_request(method: str, url: str, body: bytes, timeout: float, keep_alive: bool = True,
                     headers: Mapping[str, str] | None = None) -> BackendResponse:
    """Send one request and read the answer's head. A pooled connection that the backend has closed
    meanwhile (llama-server drops keep-alive connections after 5 s idle or a few requests, after a
    stream sometimes without `Connection: close`) fails before the request was read, so it is sent once
    more on a fresh connection (libcurl in C++ B does the same). A timeout is never retried."""
    pool, path = _pool_for(url)
    try:
        extra = header_block(headers)
    except ValueError as e:
        raise NetworkError(str(e)) from None
    while True:
        conn, reused = pool.acquire()
        try:
            conn.send(method, path, body, timeout, extra)
            return BackendResponse(pool, conn, conn.read_head(), keep_alive)
        except socket.timeout as e:
            pool.release(conn, reusable=False)
            raise BackendTimeout(f"no answer within {timeout:g} s") from e
        except (NetworkError, OSError) as e:
            pool.release(conn, reusable=False)
            if reused and isinstance(e, _DROPPED):
                continue  # only a kept connection is retried, so this loop ends
            if isinstance(e, NetworkError):
                raise
            raise NetworkError(str(e) or type(e).__name__) from e


def is_reachable(url: str, timeout: float = 1.0) -> bool:
    """True iff GET `url` answers 200 within `timeout` seconds (C++ `is_reachable`). Blocks up to
    about twice `timeout` (connect, then the answer); never raises.

    The health probe of a child that is starting: a refused connection is its normal answer for the
    first few rounds, so this uses a fresh `http.client` connection (stdlib, no logging) rather than a
    `requests` session, whose urllib3 pool reports connection failures in the server log."""
    import http.client

    parts = urlsplit(url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = connection_class(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                     headers={"User-Agent": USER_AGENT})
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        conn.close()
