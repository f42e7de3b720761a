"""Router process lifecycle: signals, the single-instance lock, a busy port (spec cli.md §2)."""
from __future__ import annotations

import signal
import socket

import pytest
import requests

from .harness import LOAD_TIMEOUT, MODEL, free_port, run_cli, wait_for

pytestmark = pytest.mark.timeout(int(LOAD_TIMEOUT) + 200)


@pytest.mark.differs_from_cpp("SIGTERM to the router stops llama-server; C++ _exit(0)s and orphans it")
def test_sigterm_to_router_and_its_llama_server(router_factory, is_cpp):
    server = router_factory()
    r = requests.post(server.api + "/load", json={"model_name": MODEL}, timeout=LOAD_TIMEOUT)
    assert r.status_code == 200, r.text
    (llama,) = server.llama_servers()
    assert server.stop(signal.SIGTERM) == 0
    assert "[Server] Shutdown signal received, exiting..." in server.log_text()
    if is_cpp:
        assert llama.is_running(), "C++ B leaves llama-server running after SIGTERM"
    else:
        wait_for(lambda: not server.llama_servers(), 15, "llama-server to exit with the router")


def test_second_router_is_refused(router_factory, binaries, tmp_path):
    server = router_factory(None)
    result = run_cli(binaries.router, ["--port", str(free_port())], server.env, tmp_path, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: Another instance of lemonade-router is already running.\n"
                                    "Only one instance can run at a time.\n")
    assert requests.get(server.api + "/health", timeout=10).status_code == 200


@pytest.mark.differs_from_cpp("a busy port is an error (exit 1 with a message); C++ ignores listen()'s "
                              "result and exits 0")
def test_busy_port(binaries, cli_home, tmp_path, is_cpp):
    home, env = cli_home
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = run_cli(binaries.router, ["--port", str(port), "--host", "127.0.0.1"], env, home, timeout=60)
    if is_cpp:
        assert result.returncode == 0
    else:
        assert result.returncode == 1 and str(port) in result.stderr
