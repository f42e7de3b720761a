"""Command lines (C++ `server/cli_parser.cpp` and the CLI part of `tray/tray_app.cpp`).

Three entry points share one implementation: `lemonade` (serve, status, stop, list, pull, delete,
run), `lemonade-server` (the same subcommands) and `lemonade-router` (serve only, router flags).
Start-up is kept light: `--version` answers before click is imported, and command bodies import the
server, requests and psutil only when they run.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from lemonade import __version__

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
LLAMACPP_BACKENDS = ("vulkan", "rocm", "metal")
DEFAULT_PORT = 8000
DEFAULT_HOST = "localhost"
DEFAULT_CTX_SIZE = 4096


@dataclass
class ServerConfig:
    """Server-wide settings of one `serve` (C++ router flags)."""

    port: int = DEFAULT_PORT
    host: str = DEFAULT_HOST
    log_level: str = "info"
    llamacpp: str = "vulkan"
    ctx_size: int = DEFAULT_CTX_SIZE
    llamacpp_args: str = ""
    llama_server: str | None = None  # explicit llama-server binary (ours)


def _print_version(prog: str) -> None:
    print(f"{prog} version {__version__}")


def _fast_version(argv: list[str], prog: str) -> bool:
    """Answer `--version`/`-v` without importing click (C++ prints `<prog> version 9.0.2`)."""
    if len(argv) == 1 and argv[0] in ("--version", "-v"):
        _print_version(prog)
        return True
    return False


def configure_logging(level: str) -> None:
    import logging

    numeric = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
               "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG}[level]
    logging.basicConfig(level=numeric, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if numeric > logging.DEBUG:
        logging.getLogger("urllib3").setLevel(logging.WARNING)


def build_cli(prog: str):
    """The click group for `lemonade` / `lemonade-server`."""
    import click

    def server_options(f):
        options = [
            click.option("--port", type=int, default=DEFAULT_PORT, envvar="LEMONADE_PORT", show_default=True,
                         help="Port number to serve on"),
            click.option("--host", default=DEFAULT_HOST, envvar="LEMONADE_HOST", show_default=True,
                         help="Address to bind for connections"),
            click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info",
                         envvar="LEMONADE_LOG_LEVEL", show_default=True, help="Log level for the server"),
            click.option("--llamacpp", type=click.Choice(LLAMACPP_BACKENDS), default="vulkan",
                         envvar="LEMONADE_LLAMACPP", show_default=True, help="LlamaCpp backend to use"),
            click.option("--ctx-size", type=int, default=DEFAULT_CTX_SIZE, envvar="LEMONADE_CTX_SIZE",
                         show_default=True, help="Context size for the model"),
            click.option("--llamacpp-args", default="", envvar="LEMONADE_LLAMACPP_ARGS",
                         help="Custom arguments to pass to llama-server (must not conflict with managed args)"),
            click.option("--llama-server", "llama_server", default=None, envvar="LEMONADE_LLAMA_SERVER",
                         help="Path of the llama-server binary to run (overrides every other place)"),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    def client_options(f):
        f = click.option("--host", default=DEFAULT_HOST, envvar="LEMONADE_HOST", show_default=True,
                         help="Host of the running server")(f)
        return click.option("--port", type=int, default=DEFAULT_PORT, envvar="LEMONADE_PORT",
                            show_default=True, help="Port of the running server")(f)

    @click.group(name=prog, help=f"{prog} - Lemonade Server",
                 context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, "-v", "--version", message=f"{prog} version %(version)s")
    def cli() -> None:
        pass

    @cli.command(help="Start the server")
    @server_options
    def serve(**kwargs) -> None:
        sys.exit(_serve(ServerConfig(**kwargs)))

    @cli.command(help="Check server status")
    @client_options
    def status(host: str, port: int) -> None:
        from lemonade import server_manager

        sys.exit(server_manager.status(host, port))

    @cli.command(help="Stop the server")
    @client_options
    def stop(host: str, port: int) -> None:
        from lemonade import server_manager

        sys.exit(server_manager.stop(host, port))

    @cli.command(name="list", help="List available models")
    @client_options
    def list_models(host: str, port: int) -> None:
        from lemonade import server_manager

        sys.exit(server_manager.list_models(host, port))

    @cli.command(help="Download a model")
    @click.argument("model", required=False)
    @click.option("--checkpoint", default="", help="Hugging Face checkpoint, org/repo[:variant]")
    @click.option("--recipe", default="", help="Recipe (llamacpp, flm, ...)")
    @click.option("--reasoning", is_flag=True, help="The model is a reasoning model")
    @click.option("--vision", is_flag=True, help="The model has a vision projector")
    @click.option("--mmproj", default="", help="mmproj file name for vision models")
    @client_options
    def pull(model: str | None, host: str, port: int, **options) -> None:
        from lemonade import server_manager

        if not model:
            _usage_error(prog, "pull <model_name> [--checkpoint CHECKPOINT] [--recipe RECIPE] "
                               "[--reasoning] [--vision] [--mmproj MMPROJ]")
        sys.exit(server_manager.pull(host, port, model, options))

    @cli.command(help="Delete a model")
    @click.argument("model", required=False)
    @client_options
    def delete(model: str | None, host: str, port: int) -> None:
        from lemonade import server_manager

        if not model:
            _usage_error(prog, "delete <model_name>")
        sys.exit(server_manager.delete(host, port, model))

    @cli.command(help="Run a model (starts server if needed)")
    @click.argument("model", required=False)
    @server_options
    def run(model: str | None, **kwargs) -> None:
        from lemonade import server_manager

        if not model:
            _usage_error(prog, "run <model_name>")
        sys.exit(server_manager.run(ServerConfig(**kwargs), model))

    return cli


def _usage_error(prog: str, usage: str) -> None:
    print("Error: model name required", file=sys.stderr)
    print(f"Usage: {prog} {usage}", file=sys.stderr)
    sys.exit(1)


def _serve(config: ServerConfig) -> int:
    configure_logging(config.log_level)
    from lemonade.server import run_server

    return run_server(config)


def build_router_cli(prog: str = "lemonade-router"):
    """`lemonade-router`: no subcommands, the C++ router's flags."""
    import click

    @click.command(name=prog, help=f"{prog} - Lightweight LLM server",
                   context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, "-v", "--version", message=f"{prog} version %(version)s")
    @click.option("--port", type=int, default=DEFAULT_PORT, show_default=True, help="Port number to serve on")
    @click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to bind for connections")
    @click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True,
                  help="Log level for the server")
    @click.option("--llamacpp", type=click.Choice(LLAMACPP_BACKENDS), default="vulkan", show_default=True,
                  help="LlamaCpp backend to use")
    @click.option("--ctx-size", type=int, default=DEFAULT_CTX_SIZE, show_default=True,
                  help="Context size for the model")
    @click.option("--llamacpp-args", default="",
                  help="Custom arguments to pass to llama-server (must not conflict with managed args)")
    @click.option("--llama-server", "llama_server", default=None, envvar="LEMONADE_LLAMA_SERVER",
                  help="Path of the llama-server binary to run (ours; overrides every other place)")
    def router(**kwargs) -> None:
        sys.exit(_serve(ServerConfig(**kwargs)))

    return router


def main_lemonade() -> None:
    if _fast_version(sys.argv[1:], "lemonade"):
        return
    build_cli("lemonade")(prog_name="lemonade")


def main_server() -> None:
    if _fast_version(sys.argv[1:], "lemonade-server"):
        return
    build_cli("lemonade-server")(prog_name="lemonade-server")


def main_router() -> None:
    if _fast_version(sys.argv[1:], "lemonade-router"):
        return
    build_router_cli()(prog_name="lemonade-router")
