"""The server process (C++ `server/server.cpp` + `server/main.cpp`): wire the parts, serve, shut down.

Package layout: `httpd` (HTTP plumbing and the route table), `handlers` (one method per endpoint),
`webui` (page and static files).
"""
from __future__ import annotations

import logging
import signal
import sys
import threading

from lemonade.logging_config import print_line  # stdlib-only module: costs nothing at import

log = logging.getLogger(__name__)


# Console lines of the two front ends (cli.md §2 router banner and signal line; §5.2/§6 serve lines).
_ROUTER_SIGNAL_LINE = "\n[Server] Shutdown signal received, exiting..."
_CLIENT_SIGNAL_LINES = {signal.SIGINT: "\nReceived interrupt signal, shutting down...",
                        signal.SIGTERM: "\nReceived termination signal, exiting..."}


def _print_router_banner(config) -> None:
    print_line("Starting Lemonade Server...")
    print_line(f"  Port: {config.port}\n  Host: {config.host}\n  Log level: {config.log_level}\n"
               f"  Context size: {config.ctx_size}")


def _print_started(config) -> None:
    from lemonade import __version__, single_instance

    shown_host = "localhost" if config.host == "0.0.0.0" else config.host
    print_line(f"Lemonade Server v{__version__} started on port {config.port}")
    print_line(f"Chat and manage models: http://{shown_host}:{config.port}")
    print_line(f"[ServerManager] PID file created: {single_instance.pid_file_path()}")


def _fail(message: str, persistent: bool) -> int:
    print_line(message, file=sys.stderr)
    if persistent:
        print_line("Error: Failed to start server", file=sys.stderr)
    return 1


def run_server(config, on_ready=None, persistent: bool = False) -> int:
    """Serve until SIGINT/SIGTERM or `/internal/shutdown`; every backend child is stopped on the way
    out, whatever the reason. Blocks; returns the exit code.

    Holds the router lock (`single_instance`) for its life and publishes itself in the PID file once
    listening, so `status`, `stop`, `list`, `pull` and `delete` find it. `persistent=False` is
    `lemonade-router` (router banner and signal line); `persistent=True` is `lemonade-server serve|run`
    (the client's start, signal and shutdown lines). `on_ready(port, request_shutdown)` runs in a thread
    once the listener is up and the PID file is written."""
    from lemonade import single_instance

    if not persistent:
        _print_router_banner(config)  # C++ prints it before the Server constructor (main.cpp L58-62)
    if single_instance.is_another_instance_running(single_instance.ROUTER):
        return _fail(single_instance.ROUTER_BUSY_MESSAGE, persistent)
    try:
        return _serve(config, on_ready, persistent)
    finally:
        single_instance.remove_pid_file_if_ours()
        single_instance.release(single_instance.ROUTER)


def _attach_log_file(config) -> None:
    """Also write the log to `server_log_path()`, truncated at start (C++ `lemonade-server` sends the
    router's output there), so `/logs/stream` has a file to tail whoever started the server. With
    `--log-file` the log already goes to that file, which `/logs/stream` tails instead."""
    from lemonade.utils import path_utils

    if config.log_file:
        return
    path = path_utils.server_log_path()
    try:
        handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    except OSError as e:
        log.warning("Cannot write the log file %s: %s", path, e)
        return
    from lemonade.logging_config import one_line_formatter

    handler.setFormatter(one_line_formatter())  # the file is what /logs/stream serves: one line per record
    logging.getLogger().addHandler(handler)


def _serve(config, on_ready, persistent: bool) -> int:
    from lemonade import single_instance
    from lemonade.backends import llamacpp_rpc, registry
    from lemonade.backends.llamacpp_server import LlamaCppOptions
    from lemonade.error_types import LemonadeError
    from lemonade.router import Limits, Router
    from lemonade.server import security
    from lemonade.server.handlers import Api
    from lemonade.server.httpd import CLIENT_IDLE_TIMEOUT, LemonadeHTTPServer, serve_forever_in_thread
    from lemonade.utils import path_utils

    _attach_log_file(config)
    models = registry.model_manager()
    try:
        models.supported_models()
    except LemonadeError as e:
        return _fail(f"Error: {e.message}", persistent)
    try:
        for info in models.seed_embedded():
            log.info("Embedded model %s placed in the Hugging Face cache", info.name)
    except LemonadeError as e:
        log.warning("Could not place the embedded models: %s", e.message)
    try:
        workers = tuple(llamacpp_rpc.parse_workers(config.rpc_workers)) if config.rpc_workers else ()
    except LemonadeError as e:
        return _fail(f"Error: --rpc-workers / ${path_utils.ENV_RPC_WORKERS}: {e.message}", persistent)
    options = LlamaCppOptions(ctx_size=config.ctx_size, backend=config.llamacpp,
                              custom_args=config.llamacpp_args, binary=config.llama_server,
                              rpc_workers=workers)
    if workers:
        log.info("llama.cpp RPC workers for every llamacpp model: %s", llamacpp_rpc.format_workers(workers))
    router = Router(models, options, Limits(config.max_loaded_models, config.idle_timeout))
    stop = threading.Event()
    api = Api(router, models, config, on_shutdown=stop.set)
    bind_host = "127.0.0.1" if config.host == "localhost" else config.host
    keys = security.Keys.from_env()  # read once: a running server keeps the keys it started with
    try:
        httpd = LemonadeHTTPServer((bind_host, config.port), api,
                                   client_timeout=path_utils.client_timeout(CLIENT_IDLE_TIMEOUT),
                                   hooks=security.default_hooks(keys))
    except OSError as e:
        # C++ ignores listen()'s result and exits 0 on a busy port (cli.md §2); we say so and fail.
        return _fail(f"Error: cannot listen on {config.host}:{config.port}: {e.strerror or e}", persistent)
    config.port = httpd.server_address[1]  # the real port when 0 was asked for
    log.info("[Server] Starting on %s:%d", config.host, config.port)
    log.info("[Server] %s", security.describe(keys))
    warning = security.unsecured_bind_warning(bind_host, keys)
    if warning:
        log.warning("[Server] %s", warning)
    single_instance.write_pid_file(config.port, config.host)
    if persistent:
        _print_started(config)

    def on_signal(signum, frame) -> None:
        # shutdown() must not run on the thread inside serve_forever; the main thread waits on `stop`.
        line = _CLIENT_SIGNAL_LINES.get(signum, "") if persistent else _ROUTER_SIGNAL_LINE
        print_line(line)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = serve_forever_in_thread(httpd)
    if on_ready is not None:
        threading.Thread(target=on_ready, args=(config.port, stop.set), daemon=True).start()
    try:
        while not stop.wait(1.0):  # a bounded wait keeps signal delivery prompt
            pass
    finally:
        if persistent:
            print_line("Shutting down server...")
        httpd.shutdown()
        httpd.server_close()
        router.shutdown()
        thread.join(timeout=5)
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.info("[Server] Stopped")
        if persistent:
            print_line("Server stopped successfully")
    return 0
