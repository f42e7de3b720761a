"""Black-box tests of the CLI against a running server: discovery by PID file, the single-instance locks,
serve/run/stop output, and no process left behind (spec cli.md §2, §5, §6, §7)."""
from __future__ import annotations

import signal
import subprocess
import time

import psutil
import pytest
import requests

from conftest import DEFAULT_MODEL, free_port, llama_processes, wait_for
from test_cli_helpers import cli_env, run_cli, start_cli

ROUTER_BUSY = "Error: Another instance of lemonade-router is already running.\nOnly one instance can run at a time.\n\n"


def server_busy(prog: str) -> str:
    return (f"Error: Another instance of {prog} serve/run is already running.\n"
            "Only one persistent server can run at a time.\n\n"
            f"To check server status: {prog} status\nTo stop the server: {prog} stop\n\n")


@pytest.fixture()
def env(tmp_path, seeded_hub_cache):
    return cli_env(tmp_path, seeded_hub_cache)


@pytest.fixture()
def served(env, tmp_path):
    server = start_cli(env, tmp_path, "lemonade-server", "serve")
    yield server
    server.stop(signal.SIGKILL)


def test_serve_prints_the_client_lines_and_publishes_pid_file(served):
    out = served.out().splitlines()
    assert f"Lemonade Server v9.0.2 started on port {served.port}" in out
    assert f"Chat and manage models: http://localhost:{served.port}" in out
    assert f"[ServerManager] PID file created: {served.pid_file()}" in out
    assert served.pid_file().read_text() == f"{served.proc.pid}\n{served.port}\nlocalhost\n"


def test_status_list_pull_delete_use_the_running_server(served, env):
    other_port = str(free_port())
    result = run_cli("lemonade-server", "status", "--port", other_port, env=env)
    assert (result.returncode, result.stdout) == (0, f"Server is running on port {served.port}\n")
    result = run_cli("lemonade", "status", "--port", other_port, env=env)  # + the loaded models (test_cli_ux)
    assert (result.returncode, result.stdout.splitlines()[0]) == (0, f"Server is running on port {served.port}")
    result = run_cli("lemonade-server", "list", "--port", other_port, env=env)  # the found port wins
    assert result.returncode == 0
    assert "Gemma-3-270m-GGUF                       Yes         llamacpp" in result.stdout.splitlines()
    assert "GET /api/v1/models" in served.out()
    result = run_cli("lemonade-server", "pull", "nope", env=env)
    assert result.returncode == 1
    assert result.stdout == "Pulling model: nope\n"
    assert result.stderr.startswith("Error pulling model: Unknown model: nope. Did you mean ")
    assert "POST /api/v1/pull" in served.out()
    result = run_cli("lemonade-server", "delete", "nope", env=env)
    assert (result.returncode, result.stdout, result.stderr) == \
        (1, "Deleting model: nope\n", "Error deleting model: Model not found: nope\n")
    # C++ defect §7.1: these commands deleted the PID file of the running server. Ours keep it.
    assert served.pid_file().exists()
    assert run_cli("lemonade-server", "status", env=env).returncode == 0


def test_second_serve_and_router_are_refused(served, env):
    # (`run` with a server up loads the model there: test_cli_ux.py)
    for prog in ("lemonade-server", "lemonade"):
        result = run_cli(prog, "serve", "--port", str(free_port()), env=env)
        assert (result.returncode, result.stderr) == (1, server_busy(prog))
    # C++ checks the router lock before parsing: even --version fails (cli.md §2).
    for args in (["--version"], ["--port", str(free_port())]):
        result = run_cli("lemonade-router", *args, env=env)
        assert (result.returncode, result.stdout, result.stderr) == (1, "", ROUTER_BUSY)
    assert served.proc.poll() is None


def test_stop_ends_the_server(served, env):
    result = run_cli("lemonade-server", "stop", env=env)
    assert result.returncode == 0
    assert result.stdout == (f"Stopping server on port {served.port}...\n"
                             f"Found router process (PID: {served.proc.pid})\n"
                             f"Sending SIGTERM to router (PID: {served.proc.pid})...\n"
                             "Waiting for processes to exit (up to 5 seconds)...\n"
                             "All processes exited, shutdown complete!\n"
                             "Lemonade Server stopped successfully.\n")
    assert served.proc.wait(timeout=10) == 0
    assert not served.pid_file().exists()
    assert run_cli("lemonade-server", "status", env=env).stdout == "Server is not running\n"


@pytest.mark.parametrize("sig, line", [(signal.SIGINT, "Received interrupt signal, shutting down..."),
                                       (signal.SIGTERM, "Received termination signal, exiting...")])
def test_serve_signal_lines(served, sig, line):
    assert served.stop(sig) == 0
    out = served.out()
    assert f"\n{line}\nShutting down server...\n" in out
    assert out.rstrip().endswith("Server stopped successfully")
    assert not served.pid_file().exists()


def test_shutdown_route_ends_serve(served):
    requests.post(f"http://127.0.0.1:{served.port}/internal/shutdown", timeout=10)
    assert served.proc.wait(timeout=30) == 0
    assert "Shutting down server..." in served.out()
    assert not served.pid_file().exists()


def test_stale_pid_file_after_sigkill(served, env):
    served.stop(signal.SIGKILL)
    assert served.pid_file().exists()
    assert run_cli("lemonade-server", "status", env=env).returncode == 1
    assert not served.pid_file().exists()
    # the kernel dropped the locks with the process: a new server starts at once
    again = start_cli(env, served.out_path.parent, "lemonade-server", "serve")
    try:
        assert run_cli("lemonade-server", "status", env=env).stdout == f"Server is running on port {again.port}\n"
    finally:
        assert again.stop(signal.SIGINT) == 0


def test_serve_takes_port_from_environment_and_flags_override(env, tmp_path):
    env_port, flag_port = free_port(), free_port()
    env = dict(env, LEMONADE_PORT=str(env_port))
    server = start_cli(env, tmp_path, "lemonade", "serve", port=flag_port)
    try:
        assert f"started on port {flag_port}" in server.out()
    finally:
        server.stop()
    proc = subprocess.Popen([str(server.proc.args[0]), "serve"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: run_cli("lemonade", "status", env=env).returncode == 0, 60, what="env-port server")
        assert run_cli("lemonade-server", "status", env=env).stdout == f"Server is running on port {env_port}\n"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


@pytest.mark.differs_from_cpp("C++ waits 5 s for a router that exits 105, then `Server failed to start`")
def test_serve_with_bad_backend(env):
    result = run_cli("lemonade-server", "serve", "--llamacpp", "cpu", "--port", str(free_port()), env=env)
    assert result.returncode == 1
    assert result.stderr == "--llamacpp: cpu not in {vulkan,rocm,metal}\nError: Failed to start server\n"


@pytest.mark.differs_from_cpp("C++ router exits 0 on a busy port")
def test_serve_on_busy_port(env):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        result = run_cli("lemonade-server", "serve", "--port", str(s.getsockname()[1]), env=env)
    assert result.returncode == 1
    assert result.stderr.endswith("Error: Failed to start server\n")
    assert "Error: cannot listen on localhost:" in result.stderr


def test_router_banner_signal_and_discovery(env, tmp_path):
    router = start_cli(env, tmp_path, "lemonade-router", "--ctx-size", "2048", ready_line="[Server] Starting on")
    try:
        assert router.out().startswith(f"Starting Lemonade Server...\n  Port: {router.port}\n  Host: localhost\n"
                                       "  Log level: info\n  Context size: 2048\n")
        # ours: a hand-started router is found too (C++ §7.2 defect)
        assert run_cli("lemonade-server", "status", env=env).stdout == f"Server is running on port {router.port}\n"
        assert run_cli("lemonade-server", "serve", "--port", str(free_port()), env=env).stderr == \
            ROUTER_BUSY + "Error: Failed to start server\n"
    finally:
        assert router.stop(signal.SIGINT) == 0
    assert "\n[Server] Shutdown signal received, exiting...\n" in router.out()
    assert not router.pid_file().exists()


# -- with llama-server: run, and nothing left behind ---------------------------------------------


def test_run_loads_and_stop_leaves_nothing(env, tmp_path, llama_server_bin):
    marker = env["HF_HUB_CACHE"]
    server = start_cli(env, tmp_path, "lemonade-server", "run", DEFAULT_MODEL, deadline=180)
    try:
        out = server.out()
        url = f"http://localhost:{server.port}/?model={DEFAULT_MODEL}#llm-chat"
        expected = [f"Running model: {DEFAULT_MODEL}", f"Loading model {DEFAULT_MODEL}...", "Model loaded successfully!",
                    f"Open the chat in a browser: {url}", "Press Ctrl+C to stop"]
        lines = out.splitlines()  # log lines of the load may come in between
        assert [line for line in lines if line in expected] == expected
        # Where C++ prints its xdg-open failure: stderr (cli.md §6 run).
        assert server.err() == "Not opening a browser: no display (DISPLAY and WAYLAND_DISPLAY are unset)\n"
        assert len(llama_processes(marker)) == 1
        result = run_cli("lemonade", "stop", env=env)
        assert result.returncode == 0
        assert "Found 1 child process(es) of router\n" in result.stdout
        assert result.stdout.endswith("Lemonade Server stopped successfully.\n")
        assert server.proc.wait(timeout=10) == 0
        assert not llama_processes(marker)
    finally:
        server.stop(signal.SIGKILL)


def test_sigterm_to_serve_leaves_no_llama_server(served, env, llama_server_bin):
    reply = requests.post(f"http://127.0.0.1:{served.port}/api/v1/load", json={"model_name": DEFAULT_MODEL},
                          timeout=300)
    assert reply.status_code == 200
    children = psutil.Process(served.proc.pid).children(recursive=True)
    assert children
    assert served.stop(signal.SIGTERM) == 0  # C++ §7.2: SIGTERM orphaned the router and llama-server
    wait_for(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children), 10,
             what="llama-server to exit")
    assert not llama_processes(env["HF_HUB_CACHE"])


def test_run_unknown_model_fails_and_stops(env, tmp_path):
    port = free_port()
    started = time.monotonic()
    result = run_cli("lemonade-server", "run", "nope", "--port", str(port), env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("Exception loading model: ")
    assert result.stderr.endswith("\nFailed to load model\n")
    assert result.stdout.index("Shutting down server...\n") < result.stdout.index("Server stopped successfully\n")
    assert "Press Ctrl+C to stop" not in result.stdout
    assert time.monotonic() - started < 60
    assert run_cli("lemonade-server", "status", env=env).returncode == 1
