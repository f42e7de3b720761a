"""Several machines, for real: two network namespaces joined by a bridge (`tests/netns.py`), with
`lemonade serve` in host A and, in host B, the real llama-server (a remote upstream) or the real
rpc-server started by `lemonade rpc-worker` (a llama.cpp RPC worker).

Remote upstream: A's lemonade proxies chat and streams to B's llama-server; a client leaving
mid-stream closes the upstream request (B's slot stops generating); B killed mid-stream ends the
stream with an error frame naming B while A keeps serving its local model; B back, the next request
works. RPC: A's llama-server puts the gemma GGUF's layers on B's worker (the weights and every
completion cross B's veth); the worker killed is a clear error naming it, the local model is
unaffected, the worker back serves again; the command stops its worker cleanly on Ctrl+C.

The servers start once per module (a load is seconds on 2 cores); the tests run in file order and
each leaves the hosts as it found them.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from conftest import DEFAULT_MODEL, make_env, wait_for
from netns import Host, module_network  # noqa: F401  (fixture)

UPSTREAM_PORT = 8080  # each namespace has its own port space
LEMONADE_PORT = 8000
WORKER_PORT = 50052
UPSTREAM_ID = "gemma-on-b"
LOCAL_MODEL = "user.local"  # the gemma GGUF with `rpc_workers: none`: served in A alone
REMOTE_MODEL = "user.remote"
RPC_MODEL = DEFAULT_MODEL  # uses the server's --rpc-workers
LOAD_DEADLINE = 180.0
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
LONG = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 3000,
        "ignore_eos": True, "stream": True}
WORKER_LINE = re.compile(r"RPC worker listening on \S+ \(rpc-server pid (\d+)\)")


def http() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # no proxy for the private bridge
    return session


@dataclass
class Upstream:
    """B's llama-server: start, SIGKILL, start again."""

    host: Host
    argv: list[str]
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host.ip}:{UPSTREAM_PORT}"

    def start(self) -> None:
        self.proc = self.host.popen(self.argv, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        session = http()

        def up() -> bool:
            assert self.proc.poll() is None, f"llama-server in B exited {self.proc.returncode}:\n{self.log.read_text()}"
            try:
                return session.get(self.url + "/health", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_for(up, LOAD_DEADLINE, interval=0.2, what="llama-server in B to load")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)  # `ip netns exec` execs: this is llama-server itself
        self.proc.wait(timeout=10)

    def generating(self) -> bool:
        return any(slot.get("is_processing") for slot in http().get(self.url + "/slots", timeout=5).json())


@dataclass
class Lemonade:
    proc: subprocess.Popen
    url: str
    log: Path
    env: dict

    @property
    def api(self) -> str:
        return self.url + "/api/v1"

    def chat(self, model: str, timeout: float = 120, **extra) -> requests.Response:
        return http().post(self.api + "/chat/completions", json={"model": model, **CHAT, **extra}, timeout=timeout)

    def loaded(self) -> dict[str, dict]:
        entries = http().get(self.api + "/health", timeout=30).json()["all_models_loaded"]
        return {m["model_name"]: m for m in entries}


@pytest.fixture(scope="module")
def hosts(module_network) -> tuple[Host, Host]:
    return module_network.add_host("a"), module_network.add_host("b")


@pytest.fixture(scope="module")
def gguf(seeded_hub_cache) -> Path:
    return next(seeded_hub_cache.rglob("*.gguf"))


@pytest.fixture(scope="module")
def upstream(hosts, gguf, llama_server_bin, tmp_path_factory) -> Upstream:
    _, b = hosts
    argv = [str(llama_server_bin), "-m", str(gguf), "--host", b.ip, "--port", str(UPSTREAM_PORT),
            "--ctx-size", "4096", "--alias", UPSTREAM_ID]
    upstream = Upstream(b, argv, tmp_path_factory.mktemp("upstream") / "llama-server.log")
    upstream.start()
    return upstream


@pytest.fixture(scope="module")
def lemonade(hosts, upstream, seeded_hub_cache, tmp_path_factory) -> Lemonade:
    """`lemonade serve` in A, its RPC worker list naming B, its user models written in
    user_models.json as a user registers them: a remote upstream on B and a local-only gemma."""
    a, b = hosts
    tmp_path = tmp_path_factory.mktemp("lemonade-a")
    env = make_env(tmp_path, seeded_hub_cache)
    checkpoint = json.loads((Path(__file__).resolve().parent.parent / "resources" / "embedded_models.json")
                            .read_text())[DEFAULT_MODEL]["checkpoint"]
    user_models = {
        REMOTE_MODEL.removeprefix("user."): {"recipe": "remote", "checkpoint": UPSTREAM_ID,
                                             "base_url": f"{upstream.url}/v1"},
        LOCAL_MODEL.removeprefix("user."): {"recipe": "llamacpp", "checkpoint": checkpoint, "rpc_workers": "none"},
    }
    (tmp_path / "lemonade").mkdir(exist_ok=True)
    (tmp_path / "lemonade" / "user_models.json").write_text(json.dumps(user_models))
    log = tmp_path / "lemonade-serve.log"
    proc = a.popen([shutil.which("lemonade") or "lemonade", "serve", "--host", a.ip, "--port", str(LEMONADE_PORT),
                    "--max-loaded-models", "2", "--rpc-workers", f"{b.ip}:{WORKER_PORT}", "--log-level", "debug"],
                   env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    server = Lemonade(proc, f"http://{a.ip}:{LEMONADE_PORT}", log, env)

    def up() -> bool:
        assert proc.poll() is None, f"lemonade serve in A exited {proc.returncode}:\n{log.read_text()}"
        try:
            return http().get(server.api + "/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_for(up, 60, what="lemonade serve in A")
    yield server
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def sse_frames(reply: requests.Response):
    """The `data:` payloads of an SSE reply, as they arrive."""
    buffer = b""
    for chunk in reply.iter_content(chunk_size=None):
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    yield line[len(b"data: "):].decode()


# -- a remote upstream on host B ---------------------------------------------------------------------

def test_chat_and_stream_through_a_remote_upstream(lemonade, upstream, hosts):
    _, b = hosts
    before = b.traffic()
    reply = lemonade.chat(REMOTE_MODEL)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == UPSTREAM_ID and reply.json()["choices"][0]["message"]["role"] == "assistant"
    with http().post(lemonade.api + "/chat/completions", json={"model": REMOTE_MODEL, **CHAT, "stream": True},
                     stream=True, timeout=120) as streamed:
        assert streamed.status_code == 200 and streamed.headers["Content-Type"].startswith("text/event-stream")
        frames = list(sse_frames(streamed))
    assert frames[-1] == "[DONE]" and json.loads(frames[-2])["choices"][0]["finish_reason"] == "length"
    after = b.traffic()
    assert after.rx_bytes - before.rx_bytes > 2000  # the answers came out of B
    entry = lemonade.loaded()[REMOTE_MODEL]
    assert entry["slot_pool"] == "unmetered" and entry["backend_url"] == f"{upstream.url}/v1"
    assert entry["upstream"]["state"] == "ok"


@contextlib.contextmanager
def long_stream(lemonade: Lemonade, model: str, first: int = 5):
    """A long streamed generation through A, open; yields its frame iterator after `first` frames.
    Leaving the block closes the client's connection."""
    with http().post(lemonade.api + "/chat/completions", json={"model": model, **LONG},
                     stream=True, timeout=120) as reply:
        assert reply.status_code == 200
        frames = sse_frames(reply)
        for _ in range(first):
            next(frames)
        yield frames


def test_client_leaving_mid_stream_closes_the_upstream_request(lemonade, upstream):
    with long_stream(lemonade, REMOTE_MODEL):
        assert upstream.generating()
    # the client is gone; A closes its request to B and B's slot stops long before 3000 tokens
    wait_for(lambda: not upstream.generating(), 15, interval=0.1, what="B to stop generating")
    assert lemonade.chat(REMOTE_MODEL).status_code == 200


def test_upstream_killed_mid_stream_then_back(lemonade, upstream, hosts):
    _, b = hosts
    assert lemonade.chat(LOCAL_MODEL).status_code == 200
    with long_stream(lemonade, REMOTE_MODEL) as frames:
        upstream.kill()
        rest = list(frames)  # ends: the stream is closed after the error frame
    errors = [json.loads(f)["error"] for f in rest if f.startswith("{") and "error" in json.loads(f)]
    assert errors and b.ip in errors[-1]["message"], rest[-3:]
    assert "[DONE]" not in rest  # a cut answer never looks complete

    # A keeps serving its local model; the remote one fails clearly, naming B
    assert lemonade.chat(LOCAL_MODEL).status_code == 200
    reply = lemonade.chat(REMOTE_MODEL)
    assert reply.status_code == 502 and f"{b.ip}:{UPSTREAM_PORT}" in reply.json()["error"]["message"], reply.text
    assert lemonade.loaded()[REMOTE_MODEL]["upstream"]["state"] == "unreachable"

    upstream.start()  # B is back: the next request works, nothing to reload in A
    reply = lemonade.chat(REMOTE_MODEL)
    assert reply.status_code == 200, reply.text
    assert lemonade.loaded()[REMOTE_MODEL]["upstream"]["state"] == "ok"


# -- a llama.cpp RPC worker on host B ----------------------------------------------------------------

def start_worker_command(host: Host, env: dict, log: Path) -> tuple[subprocess.Popen, int]:
    """`lemonade rpc-worker` in `host`; (the command, its rpc-server's pid) once it listens."""
    command = host.popen([shutil.which("lemonade") or "lemonade", "rpc-worker", "--host", host.ip,
                          "--port", str(WORKER_PORT), "--threads", "1"],
                         env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def listening():
        assert command.poll() is None, f"lemonade rpc-worker exited {command.returncode}:\n{log.read_text()}"
        found = WORKER_LINE.search(log.read_text())
        return int(found.group(1)) if found and "Press Ctrl+C to stop" in log.read_text() else None

    return command, wait_for(listening, 60, what="lemonade rpc-worker in B to listen")


def test_model_layers_on_a_worker_on_another_host(lemonade, hosts, gguf, tmp_path):
    a, b = hosts
    endpoint = f"{b.ip}:{WORKER_PORT}"
    command, worker_pid = start_worker_command(b, lemonade.env, tmp_path / "rpc-worker.log")

    before = b.traffic()
    reply = lemonade.chat(RPC_MODEL, timeout=LOAD_DEADLINE)
    assert reply.status_code == 200, reply.text
    after = b.traffic()
    assert after.tx_bytes - before.tx_bytes > gguf.stat().st_size // 2  # the layers went to B
    assert after.rx_bytes - before.rx_bytes > 100_000  # and the results came back from B
    models = lemonade.loaded()
    assert models[RPC_MODEL]["rpc_workers"] == [{"endpoint": endpoint, "state": "connected",
                                                "version": models[RPC_MODEL]["rpc_workers"][0]["version"]}]
    assert re.fullmatch(r"\d+\.\d+\.\d+", models[RPC_MODEL]["rpc_workers"][0]["version"])
    assert "--rpc" in models[RPC_MODEL]["launch_command"]
    quiet = b.traffic()
    assert lemonade.chat(LOCAL_MODEL).status_code == 200
    assert "--rpc" not in lemonade.loaded()[LOCAL_MODEL]["launch_command"]
    assert b.traffic().tx_bytes - quiet.tx_bytes < 100_000  # the local model does not touch B

    # the worker dies: the command says so; /health sees it at once; the next request fails clearly
    os.kill(worker_pid, signal.SIGKILL)
    assert command.wait(timeout=10) == 1
    assert "rpc-server exited with code -9" in (tmp_path / "rpc-worker.log").read_text()
    wait_for(lambda: lemonade.loaded()[RPC_MODEL]["rpc_workers"][0]["state"] == "down", 10,
             what="/health to show the worker down")
    reply = lemonade.chat(RPC_MODEL)
    assert reply.status_code == 502 and reply.json()["error"]["type"] == "rpc_worker_error", reply.text
    assert f"RPC worker {endpoint}" in reply.json()["error"]["message"] and "lost" in reply.json()["error"]["message"]
    assert lemonade.chat(LOCAL_MODEL).status_code == 200  # local models are unaffected
    reply = lemonade.chat(RPC_MODEL)  # loading again: refused before llama-server could abort
    assert reply.status_code == 502 and f"not ready: {endpoint} (down" in reply.json()["error"]["message"], reply.text

    # the worker back: the model loads again and answers
    command, worker_pid = start_worker_command(b, lemonade.env, tmp_path / "rpc-worker-2.log")
    reply = lemonade.chat(RPC_MODEL, timeout=LOAD_DEADLINE)
    assert reply.status_code == 200, reply.text

    # Ctrl+C stops the command and its worker cleanly (the model is unloaded first: it holds the worker)
    assert http().post(lemonade.api + "/unload", json={"model_name": RPC_MODEL}, timeout=30).status_code == 200
    command.send_signal(signal.SIGINT)
    assert command.wait(timeout=15) == 0
    assert "RPC worker stopped" in (tmp_path / "rpc-worker-2.log").read_text()
    wait_for(lambda: not _alive(worker_pid), 10, what="rpc-server to be gone")


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
