"""Command lines (C++ `server/cli_parser.cpp` for `lemonade-router`, `tray/tray_app.cpp` L489-613 for
`lemonade-server`; spec cli.md §2-§3).

Both parsers are written by hand because the C++ ones have exact texts and quirks that click cannot
produce: CLI11's messages and exit codes (109, 104, 105, 114) for the router, and the tray app's
"argv[1] is the command, everything unknown is a positional" scan for `lemonade-server`. `lemonade` is
the same implementation as `lemonade-server` under our name, plus `--llama-server PATH`.

Start-up is kept light: this module imports only the standard library; the server, requests and
psutil are imported by the command that needs them, never by `--help` or `--version`.
"""
from __future__ import annotations

import re
import sys

from lemonade import __version__
from lemonade.backends import LLAMACPP_BACKENDS
from lemonade.utils import path_utils

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
DEFAULT_PORT = 8000
DEFAULT_HOST = "localhost"
DEFAULT_CTX_SIZE = 4096
COMMANDS = ("serve", "list", "pull", "delete", "run", "status", "stop")
# Ours (`lemonade` only; `lemonade-server` keeps C++ GA's command set): HEAD's multi-model commands,
# and `rpc-worker` (a llama.cpp RPC worker on this machine, for a server on another).
OUR_COMMANDS = ("load", "unload", "pin", "unpin", "rpc-worker")

# `lemonade-server` settings read from the environment before argv (tray_app.cpp L511-516, cli.md §4):
# the names and the reading belong to path_utils; the parsing is here.
ENV_PORT, ENV_HOST, ENV_CTX_SIZE = path_utils.ENV_PORT, path_utils.ENV_HOST, path_utils.ENV_CTX_SIZE
ENV_LLAMACPP, ENV_LLAMACPP_ARGS = path_utils.ENV_LLAMACPP, path_utils.ENV_LLAMACPP_ARGS
ENV_LOG_LEVEL = path_utils.ENV_LOG_LEVEL
ENV_MAX_LOADED_MODELS, ENV_IDLE_TIMEOUT = path_utils.ENV_MAX_LOADED_MODELS, path_utils.ENV_IDLE_TIMEOUT
ENV_RPC_WORKERS = path_utils.ENV_RPC_WORKERS
RPC_WORKER_DEFAULT_HOST = "127.0.0.1"  # rpc-server's own default: it has no authentication
RPC_WORKER_DEFAULT_PORT = 50052  # rpc-server's own default (llamacpp_rpc.DEFAULT_PORT)



class _Record:
    """Equality and repr by attributes. (Not a dataclass: importing `dataclasses` pulls in inspect and
    ast, about 13 ms of the `--version` start-up budget.)"""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class ServerConfig(_Record):
    """Server-wide settings of one server (C++ router flags)."""

    def __init__(self, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, log_level: str = "info",
                 llamacpp: str = "vulkan", ctx_size: int = DEFAULT_CTX_SIZE, llamacpp_args: str = "",
                 llama_server: str | None = None, max_loaded_models: int = 1, idle_timeout: float = 0.0,
                 rpc_workers: str = "", log_file: str | None = None):
        self.port = port
        self.host = host
        self.log_level = log_level
        self.llamacpp = llamacpp
        self.ctx_size = ctx_size
        self.llamacpp_args = llamacpp_args
        self.llama_server = llama_server  # explicit llama-server binary (ours; `lemonade --llama-server`)
        self.max_loaded_models = max_loaded_models  # per model type; -1 = unlimited (HEAD §3.1)
        self.idle_timeout = idle_timeout  # seconds without a request before a model unloads; 0 = never
        self.rpc_workers = rpc_workers  # llama.cpp RPC workers `host:port,...` for llamacpp models (ours)
        self.log_file = log_file  # `serve/run --log-file PATH`: the log goes there (appended), not to stdout



# == lemonade-router (CLI11) ===================================================================

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

# CLI11 exit codes (CLI/Error.hpp ExitCodes).
CLI11_CONVERSION_ERROR = 104
CLI11_VALIDATION_ERROR = 105
CLI11_EXTRAS_ERROR = 109
CLI11_ARGUMENT_MISMATCH = 114

# Router options in CLI11 definition order (cli_parser.cpp L10-31): name -> (type name, allowed set).
_ROUTER_OPTIONS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "--port": ("INT", None),
    "--host": ("TEXT", None),
    "--log-level": ("TEXT", LOG_LEVELS),
    "--llamacpp": ("TEXT", LLAMACPP_BACKENDS),
    "--ctx-size": ("INT", None),
    "--llamacpp-args": ("TEXT", None),
}
_INT32 = (-2**31, 2**31 - 1)


class UsageError(Exception):
    """A command-line error: the message for stderr and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class RouterArgs(_Record):
    def __init__(self, config: ServerConfig, show_help: bool = False, show_version: bool = False):
        self.config = config
        self.show_help = show_help
        self.show_version = show_version


def parse_router_args(argv: list[str]) -> RouterArgs:
    """CLI11's rules for the router's options (cli.md §2). Raises UsageError with CLI11's message/code.

    Order of checks, as CLI11 does them: a value-less option fails while scanning; then per option
    (definition order) the allowed set, the repeat count and the integer conversion; then `--help`;
    then any token left over."""
    values: dict[str, list[str]] = {name: [] for name in _ROUTER_OPTIONS}
    flags = {"help": False, "version": False}
    extras: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        i += 1
        if token == "--":
            extras.extend(tokens[i:])
            break
        if token in ("-h", "--help"):
            flags["help"] = True
            continue
        if token in ("-v", "--version"):
            flags["version"] = True
            continue
        name, eq, inline = token.partition("=")
        if token.startswith("--") and name in _ROUTER_OPTIONS:
            if eq:
                values[name].append(inline)
            elif i < len(tokens):
                # CLI11 takes the required value even when it looks like a flag (`--llamacpp-args -fa`).
                values[name].append(tokens[i])
                i += 1
            else:
                raise UsageError(f"{name}: 1 required {_ROUTER_OPTIONS[name][0]} missing", CLI11_ARGUMENT_MISMATCH)
            continue
        extras.append(token)
    config = ServerConfig()
    for name, (type_name, allowed) in _ROUTER_OPTIONS.items():
        given = values[name]
        if not given:
            continue
        for value in given:
            if allowed is not None and value not in allowed:
                raise UsageError(f"{name}: {value} not in {{{','.join(allowed)}}}", CLI11_VALIDATION_ERROR)
        if len(given) > 1:
            raise UsageError(f"{name}: At Most 1 required but received {len(given)}", CLI11_ARGUMENT_MISMATCH)
        value: str | int = given[0]
        if type_name == "INT":
            if not re.fullmatch(r"[+-]?\d+", given[0]) or not _INT32[0] <= int(given[0]) <= _INT32[1]:
                raise UsageError(f"Could not convert: {name} = {given[0]}", CLI11_CONVERSION_ERROR)
            value = int(given[0])
        setattr(config, name[2:].replace("-", "_"), value)
    if flags["help"]:
        return RouterArgs(config, show_help=True)
    if extras:
        plural = "arguments were" if len(extras) > 1 else "argument was"
        raise UsageError(f"The following {plural} not expected: {' '.join(extras)}", CLI11_EXTRAS_ERROR)
    return RouterArgs(config, show_version=flags["version"])


def main_router() -> None:
    from lemonade import single_instance

    prog = sys.argv[0] if sys.argv and sys.argv[0] else "lemonade-router"
    # C++ checks the lock before parsing, so even --help/--version fail while a router runs
    # (server/main.cpp L33-37, cli.md §2 (obs)).
    if single_instance.is_another_instance_running(single_instance.ROUTER):
        print(single_instance.ROUTER_BUSY_MESSAGE, file=sys.stderr)
        sys.exit(single_instance.LOCK_EXIT_CODE)
    try:
        parsed = parse_router_args(sys.argv[1:])
    except UsageError as e:
        print(e.message, file=sys.stderr)
        print("Run with --help for more information.", file=sys.stderr)
        sys.exit(e.code)
    if parsed.show_help:
        sys.stdout.write(ROUTER_HELP.format(prog=prog))
        return
    if parsed.show_version:
        print(f"lemonade-router version {__version__}")
        return
    from lemonade.logging_config import configure_logging
    from lemonade.server import run_server

    configure_logging(parsed.config.log_level)

    sys.exit(run_server(parsed.config))


# == lemonade-server / lemonade (tray_app.cpp) ==================================================


class ClientArgs(_Record):
    """The tray app's parse result (tray_app.cpp parse_arguments)."""

    def __init__(self, command: str = "", positionals: list[str] | None = None,
                 config: ServerConfig | None = None, show_help: bool = False, show_version: bool = False):
        self.command = command
        self.positionals = positionals if positionals is not None else []
        self.config = config if config is not None else ServerConfig()
        self.show_help = show_help
        self.show_version = show_version


def stoi(text: str) -> int | None:
    """`std::stoi`: optional blanks and sign, then digits; trailing junk is ignored (`80x` -> 80).
    None where stoi throws (no digits, or outside int)."""
    match = re.match(r"[ \t\n\v\f\r]*([+-]?\d+)", text)
    if not match:
        return None
    value = int(match.group(1))
    return value if _INT32[0] <= value <= _INT32[1] else None


def _env_defaults(config: ServerConfig) -> None:
    """Environment first, flags later override (L192-194). A bad integer is ignored (L497-508)."""
    env = path_utils.server_settings_from_env()
    for name, attr in ((ENV_PORT, "port"), (ENV_CTX_SIZE, "ctx_size")):
        if name in env:
            value = stoi(env[name])
            if value is not None:
                setattr(config, attr, value)
    for name, attr in ((ENV_HOST, "host"), (ENV_LOG_LEVEL, "log_level"), (ENV_LLAMACPP, "llamacpp"),
                       (ENV_LLAMACPP_ARGS, "llamacpp_args"), (ENV_RPC_WORKERS, "rpc_workers")):
        if name in env:
            setattr(config, attr, env[name])
    for name, attr in ((ENV_MAX_LOADED_MODELS, "max_loaded_models"), (ENV_IDLE_TIMEOUT, "idle_timeout")):
        if name in env:
            _set_limit(config, attr, env[name], f"${name}")


def _set_limit(config: ServerConfig, attr: str, text: str, source: str) -> None:
    """`max_loaded_models` (-1 or a positive integer, HEAD's rule) or `idle_timeout` (seconds ≥ 0).
    Raises UsageError (exit 1) naming the flag or variable it came from."""
    try:
        value = int(text) if attr == "max_loaded_models" else float(text)
    except ValueError:
        value = None
    if attr == "max_loaded_models" and (value is None or (value < 1 and value != -1)):
        raise UsageError(f"Error: {source} must be -1 (unlimited) or a positive integer, got '{text}'", 1)
    if attr == "idle_timeout" and (value is None or not value >= 0 or value == float("inf")):
        raise UsageError(f"Error: {source} must be a number of seconds (0 = never), got '{text}'", 1)
    setattr(config, attr, value)


def parse_client_args(argv: list[str], extra_value_flags: tuple[str, ...] = ()) -> ClientArgs:
    """The tray app's scan (cli.md §3). Raises UsageError (exit 1) where C++ dies on `std::stoi`."""
    args = ClientArgs()
    _env_defaults(args.config)
    if not argv or argv[0].startswith("-"):
        # No command: only -h/-v anywhere count; anything else is "No command specified" (L556-575).
        for token in argv:
            if token in ("--help", "-h"):
                args.show_help = True
                break
            if token in ("--version", "-v"):
                args.show_version = True
                break
        return args
    args.command = argv[0]
    # `--log-file` is in C++'s help and not parsed there (its value became a positional); ours does
    # what the help says (cli_parser.md, differences).
    value_flags = {"--log-level": "log_level", "--port": "port", "--host": "host", "--ctx-size": "ctx_size",
                   "--llamacpp": "llamacpp", "--llamacpp-args": "llamacpp_args", "--log-file": "log_file",
                   "--max-loaded-models": "max_loaded_models", "--idle-timeout": "idle_timeout"}
    value_flags.update({flag: flag[2:].replace("-", "_") for flag in extra_value_flags})
    i = 1
    while i < len(argv):
        token = argv[i]
        if token in ("--help", "-h"):
            args.show_help = True
            return args
        if token in ("--version", "-v"):
            args.show_version = True
            return args
        if token in value_flags and i + 1 < len(argv):
            value = argv[i + 1]
            attr = value_flags[token]
            if attr in ("port", "ctx_size"):
                number = stoi(value)
                if number is None:
                    # C++: uncaught std::invalid_argument -> `Fatal error: stoi`, exit 1 (tray/main.cpp).
                    raise UsageError(f"Fatal error: stoi: {token} expects an integer, got '{value}'", 1)
                setattr(args.config, attr, number)
            elif attr in ("max_loaded_models", "idle_timeout"):
                _set_limit(args.config, attr, value, token)
            else:
                setattr(args.config, attr, value)
            i += 2
            continue
        if token != "--no-tray":  # always on for Linux; accepted and ignored
            args.positionals.append(token)
        i += 1
    return args


class RpcWorkerArgs(_Record):
    def __init__(self, host: str = RPC_WORKER_DEFAULT_HOST, port: int = RPC_WORKER_DEFAULT_PORT,
                 threads: int | None = None, log_level: str = "info"):
        self.host = host
        self.port = port
        self.threads = threads
        self.log_level = log_level


RPC_WORKER_USAGE = "rpc-worker [--host ADDRESS] [--port PORT] [--threads N] [--log-level LEVEL]"


def parse_rpc_worker_args(tokens: list[str]) -> RpcWorkerArgs:
    """`rpc-worker`'s own options (the tray scan's `--host`/`--port` would take the server's
    defaults and `$LEMONADE_HOST`/`$LEMONADE_PORT`, which are not the worker's). Raises UsageError
    (exit 1) on an unknown option, a missing value or a number that is not one."""
    args = RpcWorkerArgs()
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name, eq, inline = token.partition("=")
        if name not in ("--host", "--port", "--threads", "--log-level"):
            raise UsageError(f"Error: unexpected argument '{token}' for rpc-worker\nUsage: lemonade {RPC_WORKER_USAGE}", 1)
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(tokens):
            value, i = tokens[i + 1], i + 2
        else:
            raise UsageError(f"Error: {name} needs a value\nUsage: lemonade {RPC_WORKER_USAGE}", 1)
        if name in ("--port", "--threads"):
            if not re.fullmatch(r"\d+", value):
                raise UsageError(f"Error: {name} expects a whole number, got '{value}'", 1)
            setattr(args, name[2:], int(value))
        elif name == "--log-level" and value not in LOG_LEVELS:
            raise UsageError(f"Error: --log-level must be one of {', '.join(LOG_LEVELS)}, got '{value}'", 1)
        else:
            setattr(args, name[2:].replace("-", "_"), value)
    return args


def client_help(prog: str, serve_options: bool, ours: bool) -> str:
    """Help text of tray_app.cpp print_usage (L577-609), with `prog` for the program name."""
    lines = [f"{prog} - Lemonade Server", "", f"Usage: {prog} <command> [options]", "", "Commands:",
             "  serve                    Start the server (default if no command specified)",
             "  list                     List available models",
             "  pull <model>             Download a model",
             "  delete <model>           Delete a model",
             "  run <model>              Run a model (starts server if needed)",
             "  status                   Check server status",
             "  stop                     Stop the server"]
    if ours:
        lines += ["  load <model> [--pinned]  Load a model on the running server",
                  "  unload [<model>]         Unload one model, or every model",
                  "  pin <model>              Keep a loaded model resident (never evicted)",
                  "  unpin <model>            Let a pinned model be evicted again",
                  "  rpc-worker [--host H] [--port P] [--threads N]",
                  "                           Run a llama.cpp RPC worker (rpc-server) for a server on",
                  "                           another machine (default 127.0.0.1:50052; it has no",
                  "                           authentication: bind a trusted network's address only)"]
    lines.append("")
    if serve_options:
        # `lemonade-server` keeps C++'s bytes; `lemonade` states what it does: `localhost` (bound as
        # 127.0.0.1) is the default everywhere else, and where the log goes.
        host_default, log_file = ("localhost", "Write the log to PATH (appended), not the console") if ours \
            else ("127.0.0.1", "Log file path")
        lines += ["Serve Options:",
                  "  --port PORT              Server port (default: 8000)",
                  f"  --host HOST              Server host (default: {host_default})",
                  "  --ctx-size SIZE          Context size (default: 4096)",
                  "  --llamacpp BACKEND       LlamaCpp backend: vulkan, rocm, metal (default: vulkan)",
                  "  --llamacpp-args ARGS     Custom arguments for llama-server",
                  f"  --log-file PATH          {log_file}",
                  "  --log-level LEVEL        Log level: info, debug, trace (default: info)",
                  "  --no-tray                Start server without tray (default on Linux)"]
        if ours:
            lines += ["  --llama-server PATH      llama-server binary to run (default: $LEMONADE_LLAMA_SERVER)",
                      "  --max-loaded-models N    Models resident per type: llm, embedding, reranking",
                      "                           (default: 1, -1 = unlimited; $LEMONADE_MAX_LOADED_MODELS)",
                      "  --idle-timeout SECONDS   Unload a model unused this long (default: 0 = never;",
                      "                           $LEMONADE_IDLE_TIMEOUT)",
                      "  --rpc-workers H:P,...    llama.cpp RPC workers for llamacpp models",
                      "                           ($LEMONADE_RPC_WORKERS)"]
        lines.append("")
    lines += ["  --help, -h               Show this help message", "  --version, -v            Show version", ""]
    return "\n".join(lines)


def _dispatch(prog: str, args: ClientArgs) -> int:
    from lemonade import server_manager

    command, rest, config = args.command, args.positionals, args.config
    ours = prog != "lemonade-server"  # `lemonade` adds the loaded models to status, sizes to list
    if command == "status":
        return server_manager.status(loaded_models=ours)
    if command == "stop":
        return server_manager.stop()
    if command == "list":
        return server_manager.list_models(config, with_sizes=ours)
    if command == "pull":
        return server_manager.pull(config, rest, prog)
    if command == "delete":
        return server_manager.delete(config, rest, prog)
    if command == "serve":
        return server_manager.serve(config, prog)
    if command in OUR_COMMANDS:
        return server_manager.residency_command(command, rest, prog)
    return server_manager.run(config, rest, prog)


def _parse_for(prog: str, argv: list[str]) -> ClientArgs:
    """`parse_client_args` with the flags of `prog`: `lemonade` adds `--llama-server`, and
    `--rpc-workers` for serve and run (after `pull` it is the model's own list). Raises UsageError."""
    ours = prog != "lemonade-server"
    serving = bool(argv) and argv[0] in ("serve", "run")
    extra = ("--llama-server",) + (("--rpc-workers",) if serving else ()) if ours else ()
    return parse_client_args(argv, extra)


def main_client(prog: str, argv: list[str]) -> int:
    """`lemonade-server` and `lemonade`: parse, pre-dispatch checks (L266-322), run one command."""
    ours = prog != "lemonade-server"
    if ours and argv[:1] == ["rpc-worker"]:
        return _rpc_worker(prog, argv[1:])
    try:
        args = _parse_for(prog, argv)
        if ours and not (args.command or args.show_help or args.show_version):
            # `lemonade` alone (or with serve flags only) serves, as the help says of `serve`.
            # `lemonade-server` keeps C++'s "No command specified" (cli_parser.md, differences).
            args = _parse_for(prog, ["serve", *argv])
    except UsageError as e:
        print(e.message, file=sys.stderr)
        return e.code
    if args.show_help:
        sys.stdout.write(client_help(prog, args.command in ("serve", "run"), ours))
        return 0
    if args.show_version:
        print(f"{prog} version {__version__}")
        return 0
    if not args.command:
        print("Error: No command specified\n", file=sys.stderr)
        sys.stdout.write(client_help(prog, False, ours))
        return 1
    if args.command not in COMMANDS + (OUR_COMMANDS if ours else ()):
        print(f"Error: Unknown command '{args.command}'\n", file=sys.stderr)
        sys.stdout.write(client_help(prog, False, ours))
        return 1
    try:
        return _dispatch(prog, args)
    except KeyboardInterrupt:  # Ctrl+C during list/pull/delete/stop: no traceback
        return 130


def _rpc_worker(prog: str, tokens: list[str]) -> int:
    """`lemonade rpc-worker`: parsed on its own (see `parse_rpc_worker_args`), then run until Ctrl+C."""
    if "--help" in tokens or "-h" in tokens:
        print(f"Usage: {prog} {RPC_WORKER_USAGE}\n\n{RPC_WORKER_HELP}")
        return 0
    try:
        args = parse_rpc_worker_args(tokens)
    except UsageError as e:
        print(e.message, file=sys.stderr)
        return e.code
    from lemonade import server_manager

    try:
        return server_manager.rpc_worker(args.host, args.port, args.threads, args.log_level)
    except KeyboardInterrupt:
        return 130


RPC_WORKER_HELP = f"""\
Runs llama.cpp's rpc-server from the llama.cpp install, so that a lemonade server on another machine
can put a model's layers here (`lemonade serve --rpc-workers THIS_ADDRESS:PORT`). Stops on Ctrl+C.

  --host ADDRESS    IPv4 address to listen on (default: {RPC_WORKER_DEFAULT_HOST}). rpc-server has no
                    authentication: listen only on a trusted network's address (or 0.0.0.0 there).
  --port PORT       TCP port (default: {RPC_WORKER_DEFAULT_PORT})
  --threads N       CPU threads (default: rpc-server's)
  --log-level LEVEL {", ".join(LOG_LEVELS)} (default: info; debug shows rpc-server's output)"""


def main_lemonade() -> None:
    sys.exit(main_client("lemonade", sys.argv[1:]))


def main_server() -> None:
    sys.exit(main_client("lemonade-server", sys.argv[1:]))
