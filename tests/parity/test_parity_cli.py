"""The two command lines, byte for byte where spec cli.md quotes them (B, v9.0.2).

`lemonade-router`: no subcommands, CLI11 flags and exit codes (§2). `lemonade-server`: the client with
`serve run list pull delete status stop` (§3, §6), found by the PID file in the runtime dir (/tmp for
C++; a private dir for ours, see harness.py).
"""
from __future__ import annotations

import subprocess

import pytest
import requests

from .harness import MODEL, free_port, run_cli, wait_for

pytestmark = pytest.mark.timeout(300)

VERSION = "9.0.2"
ROUTER_HELP = """lemonade-router - Lightweight LLM server
Usage: {argv0} [OPTIONS]

Options:
  -h,--help                   Print this help message and exit
  -v,--version                Show version number
  --port INT [8000]           Port number to serve on
  --host TEXT [localhost]     Address to bind for connections
  --log-level TEXT:{{critical,error,warning,info,debug,trace}} [info] 
                              Log level for the server
  --llamacpp TEXT:{{vulkan,rocm,metal}} [vulkan] 
                              LlamaCpp backend to use
  --ctx-size INT [4096]       Context size for the model
  --llamacpp-args TEXT        Custom arguments to pass to llama-server (must not conflict with managed args)
"""
SERVER_HELP = """lemonade-server - Lemonade Server

Usage: lemonade-server <command> [options]

Commands:
  serve                    Start the server (default if no command specified)
  list                     List available models
  pull <model>             Download a model
  delete <model>           Delete a model
  run <model>              Run a model (starts server if needed)
  status                   Check server status
  stop                     Stop the server

  --help, -h               Show this help message
  --version, -v            Show version
"""
RULE = "-" * 100
TABLE_HEADER = f"{'Model Name':<40}{'Downloaded':<12}Details"


# -- lemonade-router -------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_router_version(binaries, cli_home, flag):
    home, env = cli_home
    result = run_cli(binaries.router, [flag], env, home)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"lemonade-router version {VERSION}\n", "")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_router_help(binaries, cli_home, flag):
    home, env = cli_home
    result = run_cli(binaries.router, [flag], env, home)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == ROUTER_HELP.format(argv0=binaries.router)


@pytest.mark.parametrize("args,code,message", [
    (["serve"], 109, "The following argument was not expected: serve"),
    (["--bogus"], 109, "The following argument was not expected: --bogus"),
    (["--port", "abc"], 104, "Could not convert: --port = abc"),
    (["--llamacpp", "cpu"], 105, "--llamacpp: cpu not in {vulkan,rocm,metal}"),
    (["--log-level", "loud"], 105, "--log-level: loud not in {critical,error,warning,info,debug,trace}"),
    (["--port"], 114, "--port: 1 required INT missing"),
    (["--port", "1", "--port", "2"], 114, "--port: At Most 1 required but received 2"),
], ids=["subcommand", "unknown-flag", "not-int", "bad-backend", "bad-log-level", "missing-value", "twice"])
def test_router_bad_flags(binaries, cli_home, args, code, message):
    home, env = cli_home
    result = run_cli(binaries.router, args, env, home, timeout=30)
    assert result.returncode == code, result.stderr
    assert result.stderr == f"{message}\nRun with --help for more information.\n"
    assert result.stdout == ""


# -- lemonade-server: no server needed ------------------------------------------------------------


@pytest.mark.parametrize("args", [["--version"], ["-v"], ["status", "--version"], ["--port", "1", "-v"]])
def test_server_version(binaries, cli_home, args):
    home, env = cli_home
    result = run_cli(binaries.server, args, env, home)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"lemonade-server version {VERSION}\n", "")


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["list", "--help"]])
def test_server_help(binaries, cli_home, args):
    home, env = cli_home
    result = run_cli(binaries.server, args, env, home)
    assert (result.returncode, result.stdout, result.stderr) == (0, SERVER_HELP, "")


@pytest.mark.parametrize("args", [[], ["--port", "9000", "serve"]])
def test_server_no_command(binaries, cli_home, args):
    home, env = cli_home
    result = run_cli(binaries.server, args, env, home)
    assert result.returncode == 1
    assert result.stderr == "Error: No command specified\n\n"
    assert result.stdout.startswith(SERVER_HELP)


def test_server_unknown_command(binaries, cli_home):
    home, env = cli_home
    result = run_cli(binaries.server, ["foo"], env, home)
    assert result.returncode == 1
    assert result.stderr == "Error: Unknown command 'foo'\n\n"
    assert result.stdout.startswith(SERVER_HELP)


def test_status_and_stop_with_no_server(binaries, cli_home):
    home, env = cli_home
    status = run_cli(binaries.server, ["status"], env, home)
    assert (status.returncode, status.stdout) == (1, "Server is not running\n")
    stop = run_cli(binaries.server, ["stop"], env, home)
    assert (stop.returncode, stop.stdout) == (0, "Lemonade Server is not running\n")


@pytest.mark.parametrize("command,usage", [
    ("pull", "pull <model_name> [--checkpoint CHECKPOINT] [--recipe RECIPE] [--reasoning] [--vision] "
             "[--mmproj MMPROJ]"),
    ("delete", "delete <model_name>"),
])
def test_model_name_required(binaries, cli_home, command, usage):
    home, env = cli_home
    result = run_cli(binaries.server, [command], env, home)
    assert result.returncode == 1
    assert result.stderr == f"Error: model name required\nUsage: lemonade-server {usage}\n"


def assert_model_table(lines: list[str]) -> None:
    assert lines[0] == TABLE_HEADER and lines[1] == RULE and lines[-1] == RULE
    rows = lines[2:-1]
    assert f"{MODEL:<40}{'Yes':<12}llamacpp" in rows
    names = [row[:40].rstrip() for row in rows]
    assert names == sorted(names)


@pytest.mark.differs_from_cpp("list with no server running works in-process and spawns nothing, so there "
                              "is no '[ServerManager] PID file created' line; C++ spawns a throw-away router")
def test_list_with_no_server(binaries, cli_home, is_cpp):
    home, env = cli_home
    result = run_cli(binaries.server, ["list", "--port", str(free_port())], env, home, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.lines
    if is_cpp:
        assert lines[0] == f"[ServerManager] PID file created: {binaries.pid_file}"
        lines = lines[1:]
    assert_model_table(lines)
    assert not binaries.pid_file.exists()


# -- lemonade-server with a running `serve` ---------------------------------------------------------


@pytest.fixture
def serving(binaries, cli_home, tmp_path):
    """`lemonade-server serve --port P` in the background; yields (port, process, stdout path)."""
    home, env = cli_home
    port = free_port()
    out_path = tmp_path / "serve.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([str(binaries.server), "serve", "--port", str(port)], env=env, cwd=str(home),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited with {proc.returncode}:\n{out_path.read_text()}")
        try:
            return requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(up, 120, "lemonade-server serve to answer /health")
        wait_for(lambda: binaries.pid_file.exists(), 30, "the PID file")
        yield port, proc, out_path
    finally:
        if proc.poll() is None:
            run_cli(binaries.server, ["stop"], env, home, timeout=60)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_serve_status_list_stop(binaries, cli_home, serving):
    home, env = cli_home
    port, proc, out_path = serving
    pid_lines = binaries.pid_file.read_text().splitlines()
    assert pid_lines[1] == str(port) and int(pid_lines[0]) > 0

    status = run_cli(binaries.server, ["status"], env, home)
    assert (status.returncode, status.stdout) == (0, f"Server is running on port {port}\n")

    stop = run_cli(binaries.server, ["stop"], env, home, timeout=60)
    assert stop.returncode == 0
    lines = stop.lines
    assert lines[0] == f"Stopping server on port {port}..."
    assert lines[1] == f"Found router process (PID: {pid_lines[0]})"
    assert f"Sending SIGTERM to router (PID: {pid_lines[0]})..." in lines
    assert "Waiting for processes to exit (up to 5 seconds)..." in lines
    assert lines[-2:] == ["All processes exited, shutdown complete!", "Lemonade Server stopped successfully."]
    proc.wait(30)

    after = run_cli(binaries.server, ["status"], env, home)
    assert (after.returncode, after.stdout) == (1, "Server is not running\n")
    out = out_path.read_text()
    assert f"Lemonade Server v{VERSION} started on port {port}\n" in out
    assert f"Chat and manage models: http://localhost:{port}\n" in out


def test_serve_while_serving_is_refused(binaries, cli_home, serving):
    home, env = cli_home
    result = run_cli(binaries.server, ["serve", "--port", str(free_port())], env, home, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(
        "Error: Another instance of lemonade-server serve/run is already running.\n"
        "Only one persistent server can run at a time.\n\n"
        "To check server status: lemonade-server status\n"
        "To stop the server: lemonade-server stop\n")


@pytest.mark.differs_from_cpp("pull of a name the registry lacks names the closest registry names; C++ "
                              "answers with its `user` namespace rule, meant for new registrations")
def test_pull_and_delete_errors_through_the_server(binaries, cli_home, serving, is_cpp):
    home, env = cli_home
    pull = run_cli(binaries.server, ["pull", "Not-Registered"], env, home, timeout=60)
    assert pull.returncode == 1
    assert pull.stdout == "Pulling model: Not-Registered\n"
    if is_cpp:
        assert pull.stderr == ("Error pulling model: When registering a new model, the model name must include "
                               "the `user` namespace, for example `user.Phi-4-Mini-GGUF`. Received: Not-Registered\n")
    else:
        assert pull.stderr.startswith("Error pulling model: Unknown model: Not-Registered. Did you mean ")
    delete = run_cli(binaries.server, ["delete", "No-Such-Model"], env, home, timeout=60)
    assert delete.returncode == 1
    assert delete.stdout == "Deleting model: No-Such-Model\n"
    assert delete.stderr == "Error deleting model: Model not found: No-Such-Model\n"
    assert requests.get(f"http://127.0.0.1:{serving[0]}/api/v1/health", timeout=10).status_code == 200


@pytest.mark.differs_from_cpp("list/pull/delete against a running server leave its PID file alone; C++ B "
                              "deletes it (cli.md §7 defect 1), so status then says 'Server is not running'")
def test_list_against_running_server_keeps_it_visible(binaries, cli_home, serving, is_cpp):
    home, env = cli_home
    port = serving[0]
    listing = run_cli(binaries.server, ["list"], env, home)
    assert listing.returncode == 0, listing.stderr
    assert_model_table(listing.lines)  # no "PID file created" line: nothing was spawned
    status = run_cli(binaries.server, ["status"], env, home)
    if is_cpp:
        assert (status.returncode, status.stdout) == (1, "Server is not running\n")
        assert not binaries.pid_file.exists()
    else:
        assert (status.returncode, status.stdout) == (0, f"Server is running on port {port}\n")
    assert requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=10).status_code == 200
