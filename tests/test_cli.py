"""Black-box tests of the three console scripts without a running server (spec cli.md §2, §3, §6).

Every run has a private LEMONADE_RUNTIME_DIR, so the locks and the PID file of parallel tests or of a
developer's own server are never touched.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lemonade.cli_parser import UsageError, parse_client_args, parse_router_args
from test_cli_helpers import cli_env, run_cli, script

ROUTER_HELP = """\
lemonade-router - Lightweight LLM server
Usage: {prog} [OPTIONS]

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

SERVER_HELP = """\
lemonade-server - Lemonade Server

Usage: lemonade-server <command> [options]

Commands:
  serve                    Start the server (default if no command specified)
  list                     List available models
  pull <model>             Download a model
  delete <model>           Delete a model
  run <model>              Run a model (starts server if needed)
  status                   Check server status
  stop                     Stop the server

"""
SERVE_OPTIONS = """\
Serve Options:
  --port PORT              Server port (default: 8000)
  --host HOST              Server host (default: 127.0.0.1)
  --ctx-size SIZE          Context size (default: 4096)
  --llamacpp BACKEND       LlamaCpp backend: vulkan, rocm, metal (default: vulkan)
  --llamacpp-args ARGS     Custom arguments for llama-server
  --log-file PATH          Log file path
  --log-level LEVEL        Log level: info, debug, trace (default: info)
  --no-tray                Start server without tray (default on Linux)

"""
HELP_TAIL = """\
  --help, -h               Show this help message
  --version, -v            Show version
"""
RULE = "-" * 100


@pytest.fixture()
def env(tmp_path, seeded_hub_cache):
    return cli_env(tmp_path, seeded_hub_cache)


# -- lemonade-router ---------------------------------------------------------------------------


def test_router_help_is_cli11_text(env):
    result = run_cli("lemonade-router", "--help", env=env)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == ROUTER_HELP.format(prog=script("lemonade-router"))
    assert run_cli("lemonade-router", "-h", env=env).stdout == result.stdout


@pytest.mark.parametrize("flag", ["-v", "--version"])
def test_router_version(env, flag):
    result = run_cli("lemonade-router", flag, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (0, "lemonade-router version 9.0.2\n", "")


@pytest.mark.parametrize("args, message, code", [
    (["serve"], "The following argument was not expected: serve", 109),
    (["--bogus"], "The following argument was not expected: --bogus", 109),
    (["serve", "--bogus"], "The following arguments were not expected: serve --bogus", 109),
    (["-v", "serve"], "The following argument was not expected: serve", 109),
    (["--port", "abc"], "Could not convert: --port = abc", 104),
    (["--port=80x"], "Could not convert: --port = 80x", 104),
    (["--ctx-size", "1.5"], "Could not convert: --ctx-size = 1.5", 104),
    (["--llamacpp", "cpu"], "--llamacpp: cpu not in {vulkan,rocm,metal}", 105),
    (["--log-level=loud"], "--log-level: loud not in {critical,error,warning,info,debug,trace}", 105),
    (["--port"], "--port: 1 required INT missing", 114),
    (["--host"], "--host: 1 required TEXT missing", 114),
    (["--port", "1", "--port=2"], "--port: At Most 1 required but received 2", 114),
])
def test_router_parse_errors(env, args, message, code):
    result = run_cli("lemonade-router", *args, env=env)
    assert result.returncode == code
    assert result.stdout == ""
    assert result.stderr == f"{message}\nRun with --help for more information.\n"


def test_router_parser_values():
    parsed = parse_router_args(["--port=9001", "--host", "0.0.0.0", "--llamacpp-args", "--flash-attn on",
                                "--ctx-size", "+512", "--log-level", "debug", "--llamacpp", "rocm"])
    config = parsed.config
    assert (config.port, config.host, config.ctx_size, config.log_level, config.llamacpp) == \
        (9001, "0.0.0.0", 512, "debug", "rocm")
    assert config.llamacpp_args == "--flash-attn on"
    assert parse_router_args(["--llamacpp-args", "-fa"]).config.llamacpp_args == "-fa"
    assert parse_router_args(["--help", "--bogus"]).show_help  # CLI11: help before extras
    with pytest.raises(UsageError) as error:
        parse_router_args(["--port", "--help"])  # the value is taken even if it looks like a flag
    assert error.value.code == 104


# -- lemonade-server / lemonade: help, version, pre-dispatch ----------------------------------


@pytest.mark.parametrize("args", [["-h"], ["--help"], ["--port", "1", "serve", "-h"], ["list", "--help"],
                                  ["foo", "-h"], ["--version", "-h"][::-1]])
def test_server_help(env, args):
    result = run_cli("lemonade-server", *args, env=env)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == SERVER_HELP + HELP_TAIL


@pytest.mark.parametrize("command", ["serve", "run"])
def test_server_help_for_serve_and_run_has_serve_options(env, command):
    result = run_cli("lemonade-server", command, "--port", "9", "--help", env=env)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == SERVER_HELP + SERVE_OPTIONS + HELP_TAIL


def test_lemonade_help_has_its_name_and_llama_server(env):
    result = run_cli("lemonade", "serve", "-h", env=env)
    assert result.returncode == 0
    assert result.stdout.startswith("lemonade - Lemonade Server\n\nUsage: lemonade <command> [options]\n")
    assert "  --llama-server PATH " in result.stdout


@pytest.mark.parametrize("prog", ["lemonade-server", "lemonade"])
@pytest.mark.parametrize("args", [["-v"], ["--version"], ["status", "-v"], ["--port", "1", "--version"]])
def test_server_version(env, prog, args):
    result = run_cli(prog, *args, env=env)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{prog} version 9.0.2\n", "")


@pytest.mark.parametrize("args", [[], ["--port", "9000", "serve"], ["--no-tray"]])
def test_no_command(env, args):
    result = run_cli("lemonade-server", *args, env=env)
    assert result.returncode == 1
    assert result.stderr == "Error: No command specified\n\n"
    assert result.stdout == SERVER_HELP + HELP_TAIL


def test_unknown_command(env):
    result = run_cli("lemonade-server", "foo", "--port", "1", env=env)
    assert result.returncode == 1
    assert result.stderr == "Error: Unknown command 'foo'\n\n"
    assert result.stdout == SERVER_HELP + HELP_TAIL


@pytest.mark.differs_from_cpp("C++ prints only `Fatal error: stoi`")
@pytest.mark.parametrize("flag", ["--port", "--ctx-size"])
def test_bad_integer_flag(env, flag):
    result = run_cli("lemonade-server", "status", flag, "abc", env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"Fatal error: stoi: {flag} expects an integer, got 'abc'\n"


def test_client_parser_rules(monkeypatch):
    for name in ("LEMONADE_PORT", "LEMONADE_CTX_SIZE", "LEMONADE_HOST", "LEMONADE_LLAMACPP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LEMONADE_PORT", "9100")
    monkeypatch.setenv("LEMONADE_CTX_SIZE", "oops")  # ignored silently
    monkeypatch.setenv("LEMONADE_HOST", "0.0.0.0")
    args = parse_client_args(["pull", "--checkpoint", "X", "--port", "80x", "user.Y", "--port=9", "--no-tray"])
    assert args.command == "pull"
    assert args.positionals == ["--checkpoint", "X", "user.Y", "--port=9"]  # C++: the model is `--checkpoint`
    assert (args.config.port, args.config.ctx_size, args.config.host) == (80, 4096, "0.0.0.0")
    assert parse_client_args(["serve"]).config.port == 9100  # env, no flag
    assert parse_client_args(["serve", "--port"]).positionals == ["--port"]  # no value: a positional
    assert parse_client_args(["serve", "--llamacpp-args", "-fa"]).config.llamacpp_args == "-fa"
    assert parse_client_args(["serve", "--llama-server", "/x"], ("--llama-server",)).config.llama_server == "/x"


# -- commands with no server --------------------------------------------------------------------


@pytest.mark.parametrize("prog", ["lemonade-server", "lemonade"])
def test_status_and_stop_without_server(env, prog):
    result = run_cli(prog, "status", "--port", "1", env=env)
    assert (result.returncode, result.stdout, result.stderr) == (1, "Server is not running\n", "")
    result = run_cli(prog, "stop", env=env)
    assert (result.returncode, result.stdout, result.stderr) == (0, "Lemonade Server is not running\n", "")


def test_stale_pid_file_is_removed(env):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid_file = os.path.join(env["LEMONADE_RUNTIME_DIR"], "lemonade-router.pid")
    with open(pid_file, "w") as f:
        f.write(f"{dead.pid}\n8000\n")
    result = run_cli("lemonade-server", "status", env=env)
    assert (result.returncode, result.stdout) == (1, "Server is not running\n")
    assert not os.path.exists(pid_file)


def test_list_without_server_prints_the_table(env):
    result = run_cli("lemonade-server", "list", env=env)
    assert (result.returncode, result.stderr) == (0, "")
    lines = result.stdout.splitlines()
    assert lines[0] == "Model Name                              Downloaded  Details"
    assert lines[1] == RULE and lines[-1] == RULE
    assert "Gemma-3-270m-GGUF                       Yes         llamacpp" in lines
    rows = lines[2:-1]
    assert rows and all(row[40:52].rstrip() in ("Yes", "No") for row in rows if len(row.split()[0]) <= 40)
    assert [row.split()[0] for row in rows] == sorted(row.split()[0] for row in rows)


@pytest.mark.parametrize("prog", ["lemonade-server", "lemonade"])
@pytest.mark.parametrize("command, usage", [
    ("pull", "pull <model_name> [--checkpoint CHECKPOINT] [--recipe RECIPE] [--reasoning] [--vision] "
             "[--mmproj MMPROJ]"),
    ("delete", "delete <model_name>"),
    ("run", "run <model_name>"),
])
def test_missing_model_name(env, prog, command, usage):
    result = run_cli(prog, command, "--port", "1", env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"Error: model name required\nUsage: {prog} {usage}\n"


@pytest.mark.differs_from_cpp("C++ answers an unknown name with its `user` namespace rule")
def test_pull_unknown_model_without_server(env):
    result = run_cli("lemonade-server", "pull", "nope", env=env)
    assert result.returncode == 1
    assert result.stdout == "Pulling model: nope\n"
    assert result.stderr.startswith("Error pulling model: Unknown model: nope. Did you mean ")


def test_pull_user_model_without_checkpoint(env):
    result = run_cli("lemonade-server", "pull", "user.Nope", "--recipe", "llamacpp", env=env)
    assert result.returncode == 1
    assert result.stderr.startswith("Error pulling model: Model user.Nope is not registered with Lemonade Server.")


def test_delete_unknown_model_without_server(env):
    result = run_cli("lemonade-server", "delete", "nope", env=env)
    assert result.returncode == 1
    assert result.stdout == "Deleting model: nope\n"
    assert result.stderr == "Error deleting model: Model not found: nope\n"


def test_delete_without_server(env):
    result = run_cli("lemonade", "delete", "Gemma-3-270m-GGUF", env=env)
    assert (result.returncode, result.stdout) == (0, "Deleting model: Gemma-3-270m-GGUF\n"
                                                     "Model deleted successfully: Gemma-3-270m-GGUF\n")
    assert not list(Path(env["HF_HUB_CACHE"]).glob("models--*gemma*"))


# -- light imports --------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["main_router", "main_server", "main_lemonade"])
@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_nothing_heavy(env, entry, flag):
    code = (f"import sys\nsys.argv = ['prog', {flag!r}]\nfrom lemonade.cli_parser import {entry}\n"
            f"try:\n    {entry}()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = [m for m in ('requests', 'psutil', 'http.server', 'click', 'urllib.request', 'lemonade.server')"
            " if m in sys.modules]\nprint('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "HEAVY []"
