"""The CLI against a server started with both keys (head-llm-surface.md §1.3, §4.1): with the keys in its
environment every command works (the admin key is sent, as HEAD's CLI does); with only the API key the
admin route (`pin`) is refused; without a key the server's refusal is printed, naming the variables to
set, exit 1. `status` and `stop` need no key (a PID file and a signal). `run` loads with the key.
"""
from __future__ import annotations

import signal

import pytest

from conftest import DEFAULT_MODEL, llama_processes
from test_cli_helpers import cli_env, run_cli, start_cli

pytestmark = pytest.mark.timeout(900)

USER_KEY = "cli-user-key-41d2"
ADMIN_KEY = "cli-admin-key-9e07"
HINT = "(set LEMONADE_ADMIN_API_KEY or LEMONADE_API_KEY to the server's key)"


@pytest.fixture()
def envs(tmp_path, seeded_hub_cache):
    """The server's environment (both keys) and three client environments sharing its runtime dir."""
    base = cli_env(tmp_path, seeded_hub_cache)
    keyed = {**base, "LEMONADE_API_KEY": USER_KEY, "LEMONADE_ADMIN_API_KEY": ADMIN_KEY}
    return {"server": keyed, "admin": keyed, "user": {**base, "LEMONADE_API_KEY": USER_KEY}, "none": base}


@pytest.fixture()
def served(envs, tmp_path, llama_server_bin):
    server = start_cli(envs["server"], tmp_path, "lemonade", "serve")
    yield server
    server.stop(signal.SIGTERM)  # our server stops its llama-server on SIGTERM


def ok(result, *expected_lines: str) -> None:
    assert result.returncode == 0, (result.stdout, result.stderr)
    for line in expected_lines:
        assert line in result.stdout.splitlines(), (line, result.stdout)


def refused(result, message: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert f"{message} {HINT}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_commands_with_and_without_keys(served, envs):
    env = envs["admin"]
    ok(run_cli("lemonade", "status", env=env), f"Server is running on port {served.port}")
    listed = run_cli("lemonade", "list", env=env)
    ok(listed)
    assert any(line.startswith(DEFAULT_MODEL) and "Yes" in line for line in listed.stdout.splitlines())
    ok(run_cli("lemonade", "pull", DEFAULT_MODEL, env=env), f"Model pulled successfully: {DEFAULT_MODEL}")
    ok(run_cli("lemonade", "load", DEFAULT_MODEL, env=env, timeout=600), f"Model loaded: {DEFAULT_MODEL}")
    ok(run_cli("lemonade", "pin", DEFAULT_MODEL, env=env), f"Model pinned: {DEFAULT_MODEL}")
    ok(run_cli("lemonade", "unpin", DEFAULT_MODEL, env=env), f"Model unpinned: {DEFAULT_MODEL}")

    # only the API key: the model routes work, the admin route is refused
    user = envs["user"]
    ok(run_cli("lemonade", "list", env=user))
    refused(run_cli("lemonade", "pin", DEFAULT_MODEL, env=user), "Error: Invalid or missing admin API key")

    # no key: a clear refusal, exit 1, for every command that talks to the server
    none = envs["none"]
    refused(run_cli("lemonade", "list", env=none), "Error listing models: Invalid or missing API key")
    refused(run_cli("lemonade-server", "pull", DEFAULT_MODEL, env=none),
            "Error pulling model: Invalid or missing API key")
    refused(run_cli("lemonade", "delete", DEFAULT_MODEL, env=none),
            "Error deleting model: Invalid or missing API key")
    refused(run_cli("lemonade", "load", DEFAULT_MODEL, env=none), "Error: Invalid or missing API key")
    refused(run_cli("lemonade", "unload", env=none), "Error: Invalid or missing API key")
    refused(run_cli("lemonade", "unpin", DEFAULT_MODEL, env=none), "Error: Invalid or missing admin API key")
    assert "[Server] POST /api/v1/delete - 401" in served.out()
    ok(run_cli("lemonade", "status", env=none), f"Server is running on port {served.port}")

    # the key again: unload, then delete for real (the model is gone from the list)
    ok(run_cli("lemonade", "unload", env=env), "All models unloaded")
    ok(run_cli("lemonade", "delete", DEFAULT_MODEL, env=env), f"Model deleted successfully: {DEFAULT_MODEL}")
    listed = run_cli("lemonade", "list", env=env)
    assert any(line.startswith(DEFAULT_MODEL) and "No" in line for line in listed.stdout.splitlines())

    # stop is a signal: no key needed, and the server is gone
    result = run_cli("lemonade", "stop", env=none)
    ok(result, "Lemonade Server stopped successfully.")
    assert served.proc.wait(timeout=10) == 0
    for key in (USER_KEY, ADMIN_KEY):
        assert key not in served.out() + served.err()


def test_run_with_keys_loads_through_its_own_server(envs, tmp_path, llama_server_bin):
    env = envs["server"]
    server = start_cli(env, tmp_path, "lemonade-server", "run", DEFAULT_MODEL, deadline=300)
    try:
        assert "Model loaded successfully!" in server.out().splitlines()
        assert len(llama_processes(env["HF_HUB_CACHE"])) == 1
        assert "[Server] POST /api/v1/load - 200" in server.out()
        ok(run_cli("lemonade", "stop", env=env), "Lemonade Server stopped successfully.")
        assert server.proc.wait(timeout=10) == 0
        assert not llama_processes(env["HF_HUB_CACHE"])
    finally:
        server.stop(signal.SIGKILL)
