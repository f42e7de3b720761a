"""Connections cannot pile up threads or file descriptors (issue 15 items 4 and 5), against a real
`lemonade serve`. Bounds are asserted, not times: the latency figures are in bench/churn.py.

* Churn: 200 clients open a connection per request for 10 s, half of them never close theirs. Main
  kept a thread per open connection (6,617 threads and fds in 20 s); now handler threads stay within
  the pool's bound and descriptors within the connection bound, and every request is answered.
* Slowloris: 120 connections that trickle a request head a byte a second are closed once the head
  deadline (`LEMONADE_HEADER_TIMEOUT`, 3 s here) passes, and hold no thread meanwhile.
* 1,000 connections that send nothing: no thread each, at most `Limits.idle` of them kept (the oldest
  are closed), and requests on new connections are served throughout.
"""
from __future__ import annotations

import select
import socket
import threading
import time

import pytest
import requests

from api_support import resources, running_server, server_process, settled_resources, wait_for
HEADER_TIMEOUT = 3.0
# The server's defaults (`connections.Limits`; test_limits_match_the_server_defaults keeps them equal).
WORKERS, IDLE, CONNECTIONS = 128, 256, 1024
THREAD_SLACK = 12  # the loop, the log handler, a few request threads of the server's own
REQUEST = b"GET /api/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("limits"), seeded_hub_cache,
                        env_extra={"LEMONADE_HEADER_TIMEOUT": str(HEADER_TIMEOUT)}) as s:
        s.process = server_process(s)  # type: ignore[attr-defined]
        yield s


class Peak:
    """The highest (threads, fds) of a process, sampled on a thread until `stop()`."""

    def __init__(self, proc):
        self.proc, self.threads, self.fds = proc, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            threads, fds = resources(self.proc)
            self.threads, self.fds = max(self.threads, threads), max(self.fds, fds)
            time.sleep(0.1)

    def stop(self) -> "Peak":
        self._stop.set()
        self._thread.join()
        return self


def get_models(port: int) -> socket.socket:
    """One request on a new connection; returns the connection, still open, after the whole answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(REQUEST)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return sock


def closed_by_server(socks: list[socket.socket]) -> set[int]:
    """Indexes of the sockets the server has closed (EOF waiting to be read). poll(), not select():
    the test holds more than FD_SETSIZE descriptors."""
    poller = select.poll()
    by_fd = {sock.fileno(): i for i, sock in enumerate(socks)}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    closed = set()
    for fd, _ in poller.poll(0):
        try:
            if socks[by_fd[fd]].recv(1, socket.MSG_PEEK) == b"":
                closed.add(by_fd[fd])
        except OSError:
            closed.add(by_fd[fd])
    return closed


def test_connection_churn_keeps_threads_and_fds_bounded(server):
    baseline = settled_resources(server.process)
    peak = Peak(server.process)
    stop = threading.Event()
    answered, failures, kept = [0], [], []
    lock = threading.Lock()

    def client(leaky: bool) -> None:
        while not stop.is_set():
            try:
                sock = get_models(server.port)
            except Exception as e:  # noqa: BLE001 (counted and shown below)
                with lock:
                    failures.append(repr(e))
                continue
            with lock:
                answered[0] += 1
                if leaky:
                    kept.append(sock)  # walks away with the connection open
                else:
                    sock.close()

    clients = [threading.Thread(target=client, args=(i % 2 == 1,), daemon=True) for i in range(200)]
    for t in clients:
        t.start()
    time.sleep(10)
    stop.set()
    for t in clients:
        t.join(timeout=60)
    peak.stop()
    for sock in kept:
        sock.close()
    assert failures == [] and answered[0] > 200
    assert peak.threads <= baseline[0] + WORKERS + THREAD_SLACK, (peak.threads, baseline, len(kept))
    assert peak.fds <= baseline[1] + CONNECTIONS + 16, (peak.fds, baseline, len(kept))
    assert len(kept) > CONNECTIONS  # more connections were left open than the server keeps


def test_trickled_heads_are_cut_at_the_head_deadline_and_hold_no_thread(server):
    baseline = settled_resources(server.process)
    peak = Peak(server.process)
    socks = []
    for _ in range(120):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"GET /api/v1/health HTTP/1.1\r\nX-Slow: ")
        socks.append(sock)
    opened = time.monotonic()
    closed_at: dict[int, float] = {}
    while len(closed_at) < len(socks) and time.monotonic() - opened < HEADER_TIMEOUT + 30:
        gone = closed_by_server(socks)
        for i, sock in enumerate(socks):  # a byte a second each: every single read is prompt
            if i in closed_at:
                continue
            try:
                if i in gone:
                    raise ConnectionResetError
                sock.send(b"a")
            except OSError:
                closed_at[i] = time.monotonic() - opened
        assert requests.get(server.api + "/health", timeout=10).status_code == 200  # others are served
        time.sleep(1)
    peak.stop()
    for sock in socks:
        sock.close()
    assert len(closed_at) == len(socks), f"{len(socks) - len(closed_at)} trickling connections still open"
    assert max(closed_at.values()) < HEADER_TIMEOUT + 10  # the head deadline, not a per-read timeout
    assert peak.threads <= baseline[0] + THREAD_SLACK, (peak.threads, baseline)


def test_idle_connections_are_bounded_in_count_and_cost_no_thread(server):
    baseline = settled_resources(server.process)
    peak = Peak(server.process)
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(1000)]

    wait_for(lambda: len(closed_by_server(socks)) >= 1000 - IDLE, 30,
             what="the oldest idle connections to be closed")
    get_models(server.port).close()  # a new connection is served
    peak.stop()
    closed = closed_by_server(socks)
    assert 1000 - len(closed) <= IDLE and 999 not in closed  # the newest are the ones kept
    for sock in socks:
        sock.close()
    assert peak.threads <= baseline[0] + THREAD_SLACK, (peak.threads, baseline)
    assert peak.fds <= baseline[1] + IDLE + 16, (peak.fds, baseline)


def test_kept_alive_connections_go_before_a_new_one_still_sending(server):
    """A client that has just connected may not have sent its request yet; closing it would cost it
    the request (churning clients saw resets). Past the idle bound, connections kept alive after a
    request go first: a server may close those at any time and clients expect it."""
    newcomer = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    wait_for(lambda: accepted_connections(server) >= 1, 10, what="the newcomer to be accepted")
    kept = [get_models(server.port) for _ in range(IDLE + 20)]  # each parks after its answer
    wait_for(lambda: len(closed_by_server(kept)) >= 20, 30, what="kept-alive connections to be closed")
    assert closed_by_server([newcomer]) == set()
    newcomer.sendall(REQUEST)
    assert newcomer.recv(65536).startswith(b"HTTP/1.1 200 ")
    for sock in kept + [newcomer]:
        sock.close()


def accepted_connections(server) -> int:
    """The server's open connections as the kernel sees them (its process's TCP sockets)."""
    return sum(1 for c in server.process.net_connections(kind="tcp") if c.status == "ESTABLISHED"
               and c.laddr.port == server.port)


def test_limits_match_the_server_defaults():
    from lemonade.server.connections import Limits

    limits = Limits()
    assert (limits.workers, limits.idle, limits.connections) == (WORKERS, IDLE, CONNECTIONS)
    assert limits.for_this_process().connections == CONNECTIONS  # this machine allows 1024 sockets
