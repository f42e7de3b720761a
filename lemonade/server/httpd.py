"""HTTP plumbing of the server (C++ `server/server.cpp`): dispatch through the route table
(`routes`), pre-dispatch hooks, CORS, error shapes, SSE framing.

`ThreadingHTTPServer` with HTTP/1.1 keep-alive. Handlers are thin: parse, call the router or the
model manager, write. Every response goes through `_send`, which adds CORS and writes headers and
body in one system call; SSE responses use chunked framing written chunk by chunk.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional
from urllib.parse import parse_qs, unquote, urlsplit

from lemonade import error_types
from lemonade.streaming_proxy import ClientGone
from lemonade.error_types import (InvalidRequestError, LemonadeError, RequestTimeoutError,
                                  RequestTooLargeError, UnsupportedCodingError)
from lemonade.server.connections import Connection, ConnectionServer, ConnReader, Limits, SocketWriter
from lemonade.server.routes import METHOD_NOT_ALLOWED, Head, Route, RouteTable, default_table
from lemonade.utils import path_utils
from lemonade.utils.json_utils import dumps
from lemonade.utils.http_client import ChunkError, HeaderError, header_lines, next_chunk_size, read_chunk_data

log = logging.getLogger(__name__)

MAX_JSON_BODY = 32 * 1024 * 1024  # larger bodies get 413 without being read
MAX_REQUEST_LINE = 8192  # longer request lines get 414, as cpp-httplib (CPPHTTPLIB_REQUEST_URI_MAX_LENGTH)
CLIENT_IDLE_TIMEOUT = 60.0  # a silent client cannot pin a connection (or a handler thread) forever
HEADER_TIMEOUT = 10.0  # a request head must arrive whole within this (nginx client_header_timeout: 60 s)
DISCARD_LIMIT = 1024 * 1024  # unread bodies up to this size are drained to keep the connection
# Methods cpp-httplib parses (httplib.h `parse_request_line`) but for which no route exists: 404.
# Any other method is a malformed request line for httplib: 400 (http.server would say 501).
KNOWN_METHODS_WITHOUT_ROUTES = ("PUT", "DELETE", "PATCH", "CONNECT", "TRACE")
# GA's CORS headers: what an answer carries unless a hook (`security.origin_hook`) set the request's own
# (`Handler.cors_headers`), e.g. an allowed `Origin` echoed back.
CORS_HEADERS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "Content-Type, Authorization"),
)
SSE_CONTENT_TYPE = "text/event-stream"
STREAM_HEADERS = (("Cache-Control", "no-cache"), ("Connection", "keep-alive"), ("X-Accel-Buffering", "no"),
                  ("Transfer-Encoding", "chunked"))
METHOD_NOT_ALLOWED_BODY = b'{"error": "Method Not Allowed. Use POST for this endpoint"}'  # literal in C++

class Headers:
    """Request header fields: names case-insensitive, repeated fields kept in order.

    Stands in for the `email.message.Message` that http.server builds for every request: the `email`
    parser cost about 0.1 ms per request on the proxy's hot path (bench/proxy_overhead.py), for the
    five fields we read (Content-Length, Transfer-Encoding, Content-Type, Connection, Expect)."""

    __slots__ = ("_fields",)

    def __init__(self) -> None:
        self._fields: dict[str, list[str]] = {}

    def add(self, name: str, value: str) -> None:
        self._fields.setdefault(name.lower(), []).append(value)

    def get(self, name: str, default=None):
        values = self._fields.get(name.lower())
        return values[0] if values else default

    def get_all(self, name: str, default=None):
        return list(self._fields.get(name.lower(), ())) or default

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._fields


def read_header_fields(rfile) -> Headers:
    """A request's header fields (`http_client.header_lines` reads them). Raises HeaderError: 431 as
    http.server, 400 for a line that is not `name: value` (cpp-httplib refuses those too; an obs-fold
    continuation line is one of them, as RFC 9112 §5.2 allows; so are blanks around the name, §5.1)."""
    headers = Headers()
    for line, name, value in header_lines(rfile):
        if not name or name != name.strip():
            raise HeaderError(400, f"Malformed header line: {line[:60]!r}")
        headers.add(name.decode("latin-1"), value.decode("latin-1"))
    return headers


class ClientDisconnected(Exception):
    """The client went away while we were writing to it."""


class ResponseComplete(Exception):
    """The handler has written everything it will (e.g. the headers of a HEAD on an SSE route)."""


Hook = Callable[["Handler", Optional[Route]], bool]  # True: the hook answered the request itself


class LemonadeHTTPServer(ThreadingHTTPServer):
    """The listening socket, with connections held by `connections.ConnectionServer`: a loop thread
    keeps every connection between requests and reads request heads without blocking; a bounded pool
    of handler threads serves complete requests (a connection that only waits, or trickles its head,
    costs a file descriptor and no thread). See that module for the limits."""

    daemon_threads = True  # handler threads never block exit; shutdown stops backends explicitly
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], api, client_timeout: float = CLIENT_IDLE_TIMEOUT,
                 routes: RouteTable | None = None, hooks: list[Hook] | None = None,
                 limits: Limits | None = None):
        """`client_timeout` bounds every read from and write to a client socket (a stalled body, a
        client that stops reading a stream) and how long an idle keep-alive connection is kept.
        `limits`: connection and thread bounds (default `Limits()` with `client_timeout` as the idle
        timeout and `$LEMONADE_HEADER_TIMEOUT` for request heads). `hooks` run before every dispatch,
        in order (origin checks, keys, metrics plug in here)."""
        self.api = api
        self.routes = routes or default_table()
        self.hooks: list[Hook] = list(hooks or ())
        self.client_timeout = client_timeout
        self.limits = (limits or Limits(idle_timeout=client_timeout,
                                        header_timeout=path_utils.header_timeout(HEADER_TIMEOUT))
                       ).for_this_process()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, Handler)
        self.connections = ConnectionServer(self.socket, self.limits, self._serve_connection,
                                            thread_name=f"lemonade-http-{self.server_address[1]}")
        self._loop_running = threading.Event()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Run the connection loop until `shutdown()`. Blocks."""
        self._loop_running.set()
        self.connections.run()

    def shutdown(self) -> None:
        """Stop the loop (from another thread) and close the connections it holds; requests being
        served finish on their own threads. Blocks until the loop has ended."""
        if self._loop_running.is_set():
            self.connections.stop()

    def server_close(self) -> None:
        super().server_close()
        connections = getattr(self, "connections", None)  # absent when the bind failed in __init__
        if connections is not None:
            connections.close()

    def _serve_connection(self, conn: Connection) -> bool:
        """On a worker: serve the requests whose heads are here; True to keep the connection."""
        handler = Handler(conn, conn.address, self)
        return not handler.close_connection

    def busy_handlers(self) -> int:
        """Handler threads serving a connection now (waiting ones not counted)."""
        counts = self.connections.counts()
        return counts["workers"] - counts["waiting_workers"]


class Handler(BaseHTTPRequestHandler):
    """Serves the requests of one connection whose heads are already received (the first one, and any
    pipelined behind it), on a worker thread; `close_connection` then says whether it is kept."""

    protocol_version = "HTTP/1.1"
    server_version = "lemonade"
    sys_version = ""
    cors_headers: tuple = CORS_HEADERS  # per request; hooks replace it (see CORS_HEADERS)
    timeout = CLIENT_IDLE_TIMEOUT

    def setup(self) -> None:
        self.conn: Connection = self.request
        self.connection = self.conn.sock  # its timeout and TCP_NODELAY are set by the connection layer
        self.rfile = ConnReader(self.conn, self.server.client_timeout)
        self.wfile = SocketWriter(self.connection)

    def handle(self) -> None:
        """The first request (its head came whole through the loop, or its first part did: the rest
        must come by the head deadline), then each pipelined one already here."""
        header_timeout = self.server.limits.header_timeout
        self.close_connection = True
        self.rfile.deadline = (self.conn.head_started or time.monotonic()) + header_timeout
        self.handle_one_request()
        while not self.close_connection and self.rfile.head_buffered():
            self.rfile.deadline = time.monotonic() + header_timeout
            self.handle_one_request()

    def finish(self) -> None:
        pass  # the socket belongs to the connection layer, which keeps or closes it

    # -- request line and header fields ---------------------------------------------------------------

    def parse_request(self) -> bool:
        """Check the request line and read the header fields (replaces http.server's, whose header
        parsing went through `email`). On failure the error answer is sent and False returned."""
        self.command = None
        self.cors_headers = CORS_HEADERS  # nothing of the previous request on this connection carries over
        self.request_version = self.default_request_version
        self.http_version = (0, 9)
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if len(self.requestline) > MAX_REQUEST_LINE:
            self.requestline = self.requestline[:80]  # what the log shows of it
            self.send_error(414, f"Request line longer than {MAX_REQUEST_LINE} bytes")
            return False
        words = self.requestline.split()
        if not words:
            return False
        if len(words) == 3:
            version = _http_version(words[2])
            if version is None:
                self.send_error(400, f"Bad request version ({words[2]!r})")
                return False
            if version >= (2, 0):
                self.send_error(505, f"Invalid HTTP version ({words[2]})")
                return False
            self.request_version, self.http_version = words[2], version
            self.close_connection = version < (1, 1)
        elif len(words) != 2 or words[0] != "GET":  # two words: HTTP/0.9, which only knew GET
            self.send_error(400, f"Bad request syntax ({self.requestline!r})")
            return False
        self.command, self.path = words[0], words[1]
        if self.path.startswith("//"):  # `//host/x` reads as a URL with a host to clients: never echo it
            self.path = "/" + self.path.lstrip("/")
        try:
            self.headers = read_header_fields(self.rfile)
        except HeaderError as e:
            self.send_error(e.status, str(e))
            return False
        finally:
            self.rfile.deadline = None  # the head is in: the body is read with per-read timeouts
        connection = self.headers.get("Connection", "").lower()
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        if (self.headers.get("Expect", "").lower() == "100-continue" and self.request_version >= "HTTP/1.1"
                and not self.handle_expect_100()):
            return False
        return True

    # -- dispatch ----------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_CONNECT(self) -> None:
        self._dispatch("CONNECT")

    def do_TRACE(self) -> None:
        self._dispatch("TRACE")

    def _begin(self, method: str) -> None:
        """Per-request state; the path is percent-decoded before routing, as httplib does. Raises
        ValueError for a request target urlsplit refuses, InvalidRequestError for a body whose
        length cannot be known (`body_framing`)."""
        self.status_sent = 0
        self.route = None
        self.outcome = ""  # set by a handler whose status line cannot tell (an SSE stream that failed)
        self.url_path, self.query = self.path, {}
        self.chunked = body_framing(self.headers, self.http_version)
        self.body_pending = self.chunked or self.headers.get("Content-Length", "0").strip() not in ("", "0")
        url = urlsplit(self.path)  # may raise ValueError (e.g. "//[": an unclosed IPv6 literal)
        self.url_path, self.query = unquote(url.path), parse_qs(url.query)
        log.debug("[Server PRE-ROUTE] %s %s", method, self.url_path)

    def _dispatch(self, method: str) -> None:
        try:
            self._begin(method)
        except (ValueError, LemonadeError) as e:  # a request target urlsplit refused, or bad framing
            self.close_connection = True  # the body's end is unknown: nothing after it can be read
            self.body_pending = False
            error = e if isinstance(e, LemonadeError) else InvalidRequestError(f"Malformed request target: {e}")
            self.send_error_exc(error)
            self._log_done()
            return
        route, params = self.server.routes.match(method, self.url_path)
        self.route = route
        try:
            self._serve(method, route, params)
        except ResponseComplete:
            pass
        except (ClientDisconnected, BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except LemonadeError as e:
            self.send_error_exc(e)
        except TimeoutError:  # the client stalled mid-body (socket timeout): free the thread
            self.close_connection = True
            self.send_error_exc(RequestTimeoutError(
                f"Request body not received within {self.server.client_timeout:g} s"))
        except RecursionError:  # JSON nested deeper than the interpreter can walk
            self.send_error_exc(InvalidRequestError("Request JSON is nested too deeply"))
        except Exception as e:  # the last line of defence: a JSON 500, never a dead thread
            log.exception("Error handling %s %s", method, self.url_path)
            self.send_error_exc(LemonadeError(f"{type(e).__name__}: {e}"))
        self._log_done()

    def _serve(self, method: str, route: Route | None, params: dict[str, str]) -> None:
        """Hooks, then the row's rules, then its handler."""
        if route is None or not route.reads_body or method == "OPTIONS":
            self._discard_body()  # keep-alive needs the body off the wire before we answer
        for hook in self.server.hooks:
            if hook(self, route):
                return
        if method == "OPTIONS":  # any path, no check that it exists (C++ §2.4)
            self._send(204, b"", None)
        elif route is None:
            self.send_json(404, error_types.not_found_body(self.url_path))
        elif route.handler == METHOD_NOT_ALLOWED:
            self._send(405, METHOD_NOT_ALLOWED_BODY, "application/json")
        elif method == "HEAD" and route.head is Head.EMPTY:
            self._send(200, b"", None)
        else:
            getattr(self.server.api, route.handler)(self, **params)

    def _log_done(self) -> None:
        """The access line. A stream's status line went out as 200 before its work ended; when that
        work failed, the line says so and is a warning (`POST /api/v1/pull - 200 (failed: …)`)."""
        status = self.status_sent or "closed"
        if self.outcome:
            log.warning("[Server] %s %s - %s (%s)", self.command, self.url_path, status, self.outcome)
        else:
            log.info("[Server] %s %s - %s", self.command, self.url_path, status)

    # -- request bodies ----------------------------------------------------------------------------

    def content_length(self) -> int:
        """The declared body length. Raises InvalidRequestError (and closes) if it is unusable."""
        values = {v.strip() for v in self.headers.get_all("Content-Length") or ()}
        if not values:
            return 0
        if len(values) > 1:
            self.close_connection = True
            raise InvalidRequestError("Conflicting Content-Length headers")
        value = values.pop()
        if not (value.isascii() and value.isdigit()) or len(value) > 20:  # digits only, as RFC 9110 says
            self.close_connection = True
            raise InvalidRequestError(f"Invalid Content-Length: {value[:40]!r}")
        return int(value)

    def read_body(self, limit: int = MAX_JSON_BODY) -> bytes:
        """The whole request body. Raises RequestTooLargeError past `limit` without reading it,
        InvalidRequestError when the body ends early, TimeoutError when the client stalls."""
        if self.chunked:
            body = self._read_chunked(limit)
        else:
            length = self.content_length()
            if length > limit:
                raise RequestTooLargeError(f"Request body of {length} bytes exceeds the limit of {limit}")
            body = self.rfile.read(length) if length else b""
            if len(body) < length:
                self.close_connection = True
                raise InvalidRequestError(
                    f"Request body ended after {len(body)} of {length} bytes (Content-Length)")
        self.body_pending = False
        return body

    def _read_chunked(self, limit: int) -> bytes:
        # Local import: the one chunked decoder lives in http_client (this keeps the edit to this method).
        parts, total = [], 0
        try:
            while size := next_chunk_size(self.rfile):
                total += size
                if total > limit:
                    raise RequestTooLargeError(f"Request body exceeds the limit of {limit} bytes")
                parts.append(read_chunk_data(self.rfile, size))
        except ChunkError as e:
            self.close_connection = True
            what = "Chunked request body ended early" if e.cut else "Malformed chunked request body"
            raise InvalidRequestError(f"{what}: {e}") from None
        return b"".join(parts)

    def _discard_body(self) -> None:
        """Drop a body nobody reads. Small ones are drained so the connection survives; anything
        large or malformed closes the connection instead (never read into memory)."""
        if not self.body_pending:
            return
        try:
            self.read_body(DISCARD_LIMIT)
        except (InvalidRequestError, OSError):
            self.close_connection = True
        self.body_pending = False

    # -- responses ---------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str | None,
              headers: tuple = ()) -> None:
        """Write status line, headers (CORS included) and body in one write."""
        lines = [f"{self.protocol_version} {status} {self.responses.get(status, ('',))[0]}"]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        lines += [f"{k}: {v}" for k, v in self.cors_headers + tuple(headers)]
        lines.append(f"Content-Length: {len(body)}")
        if getattr(self, "body_pending", False):
            self.close_connection = True  # the unread body would be parsed as the next request
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + body)
        self.status_sent = status

    def send_json(self, status: int, obj) -> None:
        self._send(status, dumps(obj), "application/json")

    def send_bytes(self, status: int, body: bytes, content_type: str | None, headers: tuple = ()) -> None:
        """`body` as is; no Content-Type header when `content_type` is None."""
        self._send(status, body, content_type, headers)

    def send_error_exc(self, error: LemonadeError) -> None:
        """Answer `error` in the shape of the route that failed (`error_types.render`)."""
        if self.status_sent:
            return  # headers already went out (e.g. mid-stream); nothing sane to add
        route = getattr(self, "route", None)
        style = route.errors.value if route is not None else "openai"
        status, body = error_types.render(error, style, self.url_path)
        try:
            self.send_json(status, body)
        except OSError:
            self.close_connection = True

    def start_sse(self, extra_headers: tuple = ()) -> None:
        """Send the SSE headers. For HEAD that is the whole answer: raises ResponseComplete."""
        self.start_stream(SSE_CONTENT_TYPE, extra_headers)

    def start_stream(self, content_type: str, extra_headers: tuple = ()) -> None:
        """Send the headers of a 200 answer of `content_type` whose body follows in chunks
        (`write_chunk`, `end_chunks`): SSE, or the NDJSON of the Ollama dialect. Raises
        ClientDisconnected; for HEAD the headers are the whole answer: raises ResponseComplete."""
        lines = [f"{self.protocol_version} 200 OK", f"Content-Type: {content_type}"]
        lines += [f"{k}: {v}" for k, v in STREAM_HEADERS + self.cors_headers + tuple(extra_headers)]
        try:
            self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        except OSError as e:
            raise ClientDisconnected() from e
        self.status_sent = 200
        if self.command == "HEAD":
            raise ResponseComplete()

    def write_chunk(self, data: bytes) -> None:
        """One HTTP chunk per backend chunk, in a single write (wfile is unbuffered)."""
        if not data:
            return
        try:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError) as e:
            raise ClientDisconnected() from e

    def end_chunks(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError as e:
            raise ClientDisconnected() from e

    def relay_writer(self) -> Callable[[bytes], None]:
        """`write_chunk` for a relay (`streaming_proxy.relay`, a `ReplySink`): a client that left
        raises streaming_proxy.ClientGone, which makes the relay close its backend request."""
        def write(data: bytes) -> None:
            try:
                self.write_chunk(data)
            except ClientDisconnected as e:
                self.close_connection = True
                raise ClientGone() from e
        return write

    def log_message(self, format: str, *args) -> None:
        log.debug("%s - %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, oversized headers) as JSON, not HTML.

        httplib answers 400 to a method or HTTP version it does not parse; http.server would say
        501 or 505, which would blame the server for a malformed request."""
        if code in (501, 505):
            code = 400
        self.close_connection = True
        self.body_pending = False
        if not isinstance(getattr(self, "path", None), str):
            self.path = ""
        self.url_path = getattr(self, "url_path", None) or self.path
        if getattr(self, "command", None) is None:
            self.command = "GET"
        self.status_sent = 0
        body = error_types.error_body(message or "Bad request", "bad_request")
        try:
            self.send_json(code, body)
        except OSError:
            pass
        log.info("[Server] Error %d: %s", code, message or "bad request")


def body_framing(headers: Headers, version: tuple[int, int]) -> bool:
    """Whether the request body is chunked (else it is Content-Length bytes, or none), by RFC 9112
    §6.1. Raises InvalidRequestError (400; the caller closes the connection) for Transfer-Encoding
    together with Content-Length, on an HTTP/1.0 request, or with a final coding other than exactly
    `chunked` (`chunked, gzip`, `xchunked`, chunked twice); UnsupportedCodingError (501) for a coding
    before `chunked` (we decode none). http.server would read `chunked, gzip` as chunked and serve a
    request with both fields, which is how requests are smuggled past a proxy."""
    fields = headers.get_all("Transfer-Encoding")
    if not fields:
        return False
    if "Content-Length" in headers:
        raise InvalidRequestError("Request has both Content-Length and Transfer-Encoding")
    if version < (1, 1):
        raise InvalidRequestError(f"Transfer-Encoding is not allowed in an HTTP/{version[0]}.{version[1]} request")
    codings = [c.strip().lower() for field in fields for c in field.split(",")]
    if codings[-1] != "chunked" or codings.count("chunked") != 1:
        raise InvalidRequestError(
            f"Unsupported Transfer-Encoding {', '.join(fields)[:80]!r}: the final coding must be chunked, once")
    if len(codings) > 1:
        raise UnsupportedCodingError(f"Transfer coding {codings[0][:40]!r} is not supported")
    return True


def _http_version(word: str) -> tuple[int, int] | None:
    """(major, minor) of `HTTP/x.y`, or None when the word is not one."""
    name, _, number = word.partition("/")
    major, dot, minor = number.partition(".")
    if name != "HTTP" or not dot or not (major.isdigit() and minor.isdigit() and major.isascii()
                                         and minor.isascii()) or len(major) > 10 or len(minor) > 10:
        return None
    return int(major), int(minor)


def serve_forever_in_thread(server: LemonadeHTTPServer) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name="http-server", daemon=True)
    thread.start()
    return thread
