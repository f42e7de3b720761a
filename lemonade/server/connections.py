"""Client connections of the HTTP server: one loop thread holds every connection that has no request
in progress; a bounded pool of handler threads serves requests (ours; cpp-httplib has a thread pool
and per-read timeouts, nginx bounds the head in time: `client_header_timeout`).

    accept ─▶ idle (no byte yet, or keep-alive between requests) ─▶ reading the head ─▶ queued ─▶ a worker
                 ▲                                                                         │
                 └──────────────────────── keep-alive: parked again ◀──────────────────────┘

The loop (`selectors`, epoll on Linux) accepts, waits for a connection's next request and reads its
head without blocking; a connection costs a file descriptor and no thread until its head is complete.
So, whatever the clients do:

* handler threads are at most `Limits.workers`; complete heads past that wait in a queue of at most
  `Limits.queued`, and one more is answered 503;
* idle connections are at most `Limits.idle`, and each lasts at most `Limits.idle_timeout`. Past the
  count one is closed: the oldest kept alive between requests (a server may close those at any time,
  RFC 9112 §9.3, and clients expect it) before the oldest new one, never one whose request has already
  arrived in the socket (closing over unread bytes resets it: the client would lose its request);
* a request head must arrive whole within `Limits.header_timeout` of its first byte (and without a
  silence longer than `idle_timeout`), or the connection is closed without an answer, as nginx does;
* open connections are at most `Limits.connections` (and half the process's file limit): a new one
  past it takes the place of the oldest idle one, else of the oldest unfinished head, else gets 503.

Nothing here logs while holding a lock, and the loop never blocks on a client.
"""
from __future__ import annotations

import collections
import errno
import itertools
import logging
import resource
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

RECV_SIZE = 65536
MAX_LOOP_HEAD = 65536  # a head not complete within this many bytes goes to a worker, which applies the field limits
TICK = 0.25  # seconds between deadline checks of the loop
WORKER_IDLE_SECONDS = 5.0  # a worker without work waits this long for the next before it ends
MAX_IDLE_WORKERS = 32  # workers kept waiting for work after a burst
LINGER_SECONDS = 0.005  # a worker waits this long for the next request on the connection it served
SERVE, PARK, CLOSE = "serve", "park", "close"  # what a worker does with a connection after a request
EVICTION_SCAN = 8  # idle connections looked at per table for one without a waiting request
ACCEPTS_PER_WAKE = 64  # accept at most this many in a row, so heads of accepted ones are read too
BUSY_BODY = b'{"error":{"message":"Server busy: too many connections or queued requests; try again","type":"server_busy"}}'
BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
               b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(BUSY_BODY), BUSY_BODY))


@dataclass(frozen=True)
class Limits:
    """The bounds of the connection layer (see the module docstring); seconds for the timeouts."""

    workers: int = 128
    queued: int = 512
    idle: int = 256
    connections: int = 1024
    header_timeout: float = 10.0
    idle_timeout: float = 60.0

    def for_this_process(self) -> "Limits":
        """`connections` (and `idle`) capped at half the soft limit of open files, so sockets never
        take the descriptors the server needs for files, backends and pipes ("Too many open files")."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        cap = max(16, soft // 2) if soft != resource.RLIM_INFINITY else self.connections
        connections = min(self.connections, cap)
        return Limits(self.workers, self.queued, min(self.idle, connections), connections,
                      self.header_timeout, self.idle_timeout)


class Connection:
    """One client connection and the bytes received on it that no request has consumed yet."""

    __slots__ = ("sock", "address", "buf", "since", "head_started", "last_read", "scanned")

    def __init__(self, sock: socket.socket, address) -> None:
        self.sock, self.address = sock, address
        self.buf = bytearray()
        self.since = self.last_read = time.monotonic()
        self.head_started = 0.0  # when the current head's first byte came (0: none yet)
        self.scanned = 0  # bytes of buf already searched for the end of the head

    def head_complete(self) -> bool:
        """Whether buf holds a whole request head (its empty line), or more than the loop reads."""
        buf = self.buf
        if buf[:1] == b"\n" or buf[:2] == b"\r\n":  # an empty request line: the handler closes
            return True
        start = max(0, self.scanned - 2)
        self.scanned = len(buf)
        return buf.find(b"\n\r\n", start) >= 0 or buf.find(b"\n\n", start) >= 0 or len(buf) > MAX_LOOP_HEAD

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _request_waiting(conn: Connection) -> bool:
    """Whether bytes from the client wait unread in the socket (a request the loop has not read yet)."""
    try:
        return bool(conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing waiting (EAGAIN), or reset or broken: nothing to lose by closing it
        return False


class ConnReader:
    """The handler's `rfile`: first the bytes the loop already read, then the socket. `readline` and
    `read` block like a BufferedReader's. While `deadline` (monotonic) is set, reads end with
    TimeoutError once it passes: the whole request head is bounded in time, not each read."""

    def __init__(self, conn: Connection, timeout: float):
        self.conn, self.timeout = conn, timeout
        self.deadline: float | None = None

    def _fill(self) -> bool:
        """Receive more into the buffer; False at the end of the input. Raises TimeoutError."""
        sock = self.conn.sock
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("request head not received in time")
            sock.settimeout(min(remaining, self.timeout))
        try:
            data = sock.recv(RECV_SIZE)
        finally:
            if self.deadline is not None:
                sock.settimeout(self.timeout)
        if not data:
            return False
        self.conn.buf += data
        return True

    def readline(self, limit: int = -1) -> bytes:
        buf = self.conn.buf
        start = 0
        while True:
            end = buf.find(b"\n", start, limit if limit >= 0 else None)
            if end >= 0:
                end += 1
                break
            if 0 <= limit <= len(buf):
                end = limit
                break
            start = len(buf)
            if not self._fill():
                end = len(buf)
                break
        line = bytes(buf[:end])
        del buf[:end]
        return line

    def read(self, size: int = -1) -> bytes:
        buf = self.conn.buf
        if size < 0:
            while self._fill():
                pass
            size = len(buf)
        if len(buf) >= size:
            data = bytes(buf[:size])
            del buf[:size]
            return data
        out = bytearray(size)
        got = len(buf)
        out[:got] = buf
        buf.clear()
        view = memoryview(out)
        sock = self.conn.sock
        while got < size:
            n = sock.recv_into(view[got:])
            if n == 0:
                break
            got += n
        view.release()
        del out[got:]
        return bytes(out)

    def head_buffered(self) -> bool:
        """Whether the next request's head is already here whole (pipelining), or more of it than
        the loop would read: the worker that has it goes on with it."""
        conn = self.conn
        conn.scanned = 0
        return bool(conn.buf) and conn.head_complete()

    def close(self) -> None:
        pass


class SocketWriter:
    """The handler's `wfile`: every write goes out at once (`sendall`), nothing is buffered."""

    def __init__(self, sock: socket.socket):
        self._sock = sock

    def write(self, data) -> int:
        self._sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class ConnectionServer:
    """The loop and the worker pool. `serve(conn)` runs on a worker for a connection whose request
    head is complete; it returns True to keep the connection (it comes back to the loop) or False
    once it has closed it. `run()` blocks until `stop()`."""

    def __init__(self, listener: socket.socket, limits: Limits, serve: Callable[[Connection], bool],
                 thread_name: str = "lemonade-http"):
        self.listener, self.limits, self.serve = listener, limits, serve
        self.thread_name = thread_name
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # Loop-only state (no lock): connections without a request in progress, oldest first; those
        # kept alive after a request apart from new ones, which are closed only after them.
        self._idle: collections.OrderedDict[Connection, None] = collections.OrderedDict()
        self._new: collections.OrderedDict[Connection, None] = collections.OrderedDict()
        self._reading: collections.OrderedDict[Connection, None] = collections.OrderedDict()
        self._accepting = True
        self._accept_paused_until = 0.0
        # Shared with workers, under _lock: handed-back connections, the queue, worker counts.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._parked: list[Connection] = []
        self._queue: collections.deque[Connection] = collections.deque()
        self._workers = 0  # threads alive
        self._waiting = 0  # of those, waiting for work
        self._open = 0  # connections accepted and not yet closed
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Accept and read heads until `stop()`. Blocks."""
        self.listener.setblocking(False)
        self._selector.register(self.listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(TICK):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._take_parked()
                    else:
                        self._readable(key.data)
                self._expire(time.monotonic())
        finally:
            for conn in list(self._idle) + list(self._new) + list(self._reading):
                self._close(conn)
            self._selector.close()
            self._stopped.set()

    def stop(self, timeout: float = 5.0) -> None:
        """End `run()` (from another thread); connections it holds are closed. Blocks until then."""
        self._stopping.set()
        self._wake()
        self._stopped.wait(timeout)
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
            self._work.notify_all()
        for conn in queued:
            self._close(conn)

    def _accept(self) -> None:
        now = time.monotonic()
        if now < self._accept_paused_until:
            return
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, address = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: free the oldest idle one and let the backlog wait a moment.
                    self._evict_one()
                    self._accept_paused_until = now + 0.1
                    log.warning("accept failed (%s); closed the oldest idle connection", e.strerror)
                    return
                continue  # ECONNABORTED and the like: that client is gone already
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, address)
            with self._lock:
                self._open += 1
                full = self._open > self.limits.connections
            if full and not self._evict_one():
                self._refuse(conn)
                continue
            self._add_idle(conn, self._new)

    def _add_idle(self, conn: Connection, table: collections.OrderedDict) -> None:
        conn.since = time.monotonic()
        conn.head_started = 0.0
        table[conn] = None
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        while len(self._idle) + len(self._new) > self.limits.idle and self._evict_idle():
            pass

    def _evict_idle(self) -> bool:
        """Close one idle connection, kept-alive ones first, oldest first, passing over any whose
        request is already waiting in the socket (the loop reads it soon); False if none could go."""
        for table in (self._idle, self._new):
            for conn in itertools.islice(table, EVICTION_SCAN):
                if not _request_waiting(conn):
                    self._close(conn)
                    return True
        return False

    def _evict_one(self) -> bool:
        """Make room for a new connection: an idle one as `_evict_idle` picks it; if each it looked at
        has a request waiting, the oldest idle one anyway; else the oldest unfinished head. False if
        the loop holds no connection at all."""
        if self._evict_idle():
            return True
        for table in (self._idle, self._new, self._reading):
            if table:
                self._close(next(iter(table)))
                return True
        return False

    def _readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        now = time.monotonic()
        if conn in self._idle or conn in self._new:
            self._idle.pop(conn, None)
            self._new.pop(conn, None)
            self._reading[conn] = None
            conn.head_started = now
        conn.buf += data
        conn.last_read = now
        if conn.head_complete():
            self._selector.unregister(conn.sock)
            del self._reading[conn]
            self._dispatch(conn)

    def _expire(self, now: float) -> None:
        """Close idle connections silent for idle_timeout, and heads past their deadline (both tables
        are in order of age, so only their fronts are looked at)."""
        for table in (self._idle, self._new):
            while table:
                conn = next(iter(table))
                if now - conn.since < self.limits.idle_timeout:
                    break
                self._close(conn)
        overdue = [conn for conn in self._reading if self._head_overdue(conn, now)]
        for conn in overdue:
            self._close(conn)

    def _head_overdue(self, conn: Connection, now: float) -> bool:
        return (now - conn.head_started >= self.limits.header_timeout
                or now - conn.last_read >= self.limits.idle_timeout)

    def _close(self, conn: Connection) -> None:
        """Close a connection the loop holds (idle, reading, or just accepted)."""
        self._idle.pop(conn, None)
        self._new.pop(conn, None)
        self._reading.pop(conn, None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.close()
        with self._lock:
            self._open -= 1

    def _refuse(self, conn: Connection) -> None:
        """503 and close, without waiting: the answer fits the socket's empty send buffer."""
        try:
            conn.sock.send(BUSY_ANSWER)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        conn.close()
        with self._lock:
            self._open -= 1

    # -- handing connections between the loop and the workers -------------------------------------

    def _dispatch(self, conn: Connection) -> None:
        """A complete head: to a waiting worker, a new worker, the queue, or a 503."""
        start_worker = False
        with self._lock:
            if self._waiting > len(self._queue) or (self._workers >= self.limits.workers
                                                    and len(self._queue) < self.limits.queued):
                self._queue.append(conn)
                self._work.notify()
                return
            if self._workers < self.limits.workers:
                self._workers += 1
                start_worker = True
        if start_worker:
            threading.Thread(target=self._work_on, args=(conn,), name=self.thread_name, daemon=True).start()
        else:
            conn.sock.setblocking(False)
            self._refuse(conn)

    def _work_on(self, conn: Connection | None) -> None:
        """A worker: serve connections until none comes within WORKER_IDLE_SECONDS."""
        while conn is not None:
            keep = False
            try:
                conn.sock.setblocking(True)
                conn.sock.settimeout(self.limits.idle_timeout)
                keep = self.serve(conn)
                while keep and (after := self._linger(conn)) != PARK:  # a client sending request after request
                    keep = after == SERVE and self.serve(conn)
            except (ConnectionError, TimeoutError) as e:  # the client went away or stalled mid-head
                log.debug("Connection from %s ended: %r", conn.address, e)
                keep = False
            except Exception:  # the handler answers its own errors; this is a bug, never a dead worker
                log.exception("Unhandled error while serving %s", conn.address)
                keep = False
            if keep and not self._stopping.is_set():
                self._park(conn)
            else:
                conn.close()
                with self._lock:
                    self._open -= 1
            conn = self._next_work()

    def _linger(self, conn: Connection) -> str:
        """After a request on a kept connection: SERVE when the next head arrived whole within
        LINGER_SECONDS, CLOSE when the client closed, else PARK (back to the loop, with what came).
        Only while no other work waits for a worker. Parking and being handed back costs two thread
        wake-ups; a client that sends its next request at once is served on this thread instead."""
        with self._lock:
            if self._queue or self._stopping.is_set():
                return PARK
        sock = conn.sock
        try:
            sock.settimeout(LINGER_SECONDS)
            data = sock.recv(RECV_SIZE)
        except (TimeoutError, BlockingIOError):
            return PARK
        except OSError:
            return CLOSE
        finally:
            try:
                sock.settimeout(self.limits.idle_timeout)
            except OSError:
                pass
        if not data:
            return CLOSE
        conn.buf += data
        conn.head_started = conn.last_read = time.monotonic()
        conn.scanned = 0
        return SERVE if conn.head_complete() else PARK

    def _next_work(self) -> Connection | None:
        with self._lock:
            deadline = time.monotonic() + WORKER_IDLE_SECONDS
            while not self._queue:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._waiting >= MAX_IDLE_WORKERS or self._stopping.is_set():
                    self._workers -= 1
                    return None
                self._waiting += 1
                self._work.wait(remaining)
                self._waiting -= 1
            return self._queue.popleft()

    def _park(self, conn: Connection) -> None:
        """A worker hands a kept-alive connection back to the loop."""
        conn.sock.setblocking(False)
        with self._lock:
            self._parked.append(conn)
        self._wake()

    def _take_parked(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            parked, self._parked = self._parked, []
        now = time.monotonic()
        for conn in parked:
            if not conn.buf:
                self._add_idle(conn, self._idle)
                continue
            conn.head_started = conn.last_read = now  # part of the next head came with the last request
            conn.scanned = 0
            if conn.head_complete():
                self._dispatch(conn)
                continue
            self._reading[conn] = None
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is pending already (or we are closing)

    # -- figures ----------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Open connections, worker threads (alive, waiting for work) and queued heads; the loop's
        own tables are read without its lock, so idle/reading may be a moment old."""
        with self._lock:
            figures = {"open": self._open, "workers": self._workers, "waiting_workers": self._waiting,
                       "queued": len(self._queue)}
        figures.update(idle=len(self._idle) + len(self._new), reading=len(self._reading))
        return figures

    def close(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            sock.close()
