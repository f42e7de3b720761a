"""The server process (C++ `server/server.cpp` + `server/main.cpp`): wire the parts, serve, shut down.

Package layout: `httpd` (HTTP plumbing and the route table), `handlers` (one method per endpoint),
`webui` (page and static files).
"""
from __future__ import annotations

import logging
import signal
import sys
import threading

log = logging.getLogger(__name__)


def run_server(config, on_ready=None) -> int:
    """Serve until SIGINT/SIGTERM or `/internal/shutdown`; every backend child is stopped on the way
    out, whatever the reason. `on_ready(port, request_shutdown)` runs in a thread once the listener
    is up (used by `run`). Returns the exit code."""
    from lemonade.backends.llamacpp_server import LlamaCppOptions
    from lemonade.error_types import LemonadeError
    from lemonade.model_manager import ModelManager
    from lemonade.router import Router
    from lemonade.server.handlers import Api
    from lemonade.server.httpd import LemonadeHTTPServer, serve_forever_in_thread

    models = ModelManager()
    try:
        models.supported_models()
    except LemonadeError as e:
        print(f"Error: {e.message}", file=sys.stderr)
        return 1
    try:
        for info in models.seed_embedded():
            log.info("Embedded model %s placed in the Hugging Face cache", info.name)
    except LemonadeError as e:
        log.warning("Could not place the embedded models: %s", e.message)
    router = Router(models, LlamaCppOptions(ctx_size=config.ctx_size, backend=config.llamacpp,
                                            custom_args=config.llamacpp_args,
                                            binary=config.llama_server))
    stop = threading.Event()
    api = Api(router, models, config, on_shutdown=stop.set)
    bind_host = "127.0.0.1" if config.host == "localhost" else config.host
    try:
        httpd = LemonadeHTTPServer((bind_host, config.port), api)
    except OSError as e:
        print(f"Error: cannot listen on {config.host}:{config.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    config.port = httpd.server_address[1]  # the real port when 0 was asked for
    print("Starting Lemonade Server...")
    print(f"  Port: {config.port}\n  Host: {config.host}\n  Log level: {config.log_level}\n"
          f"  Context size: {config.ctx_size}", flush=True)
    log.info("[Server] Starting on %s:%d", config.host, config.port)

    def on_signal(signum, frame) -> None:
        # shutdown() must not run on the thread inside serve_forever; the main thread waits on `stop`.
        print("\n[Server] Shutdown signal received, exiting...", flush=True)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    thread = serve_forever_in_thread(httpd)
    if on_ready is not None:
        threading.Thread(target=on_ready, args=(config.port, stop.set), daemon=True).start()
    try:
        while not stop.wait(1.0):  # a bounded wait keeps signal delivery prompt
            pass
    finally:
        httpd.shutdown()
        httpd.server_close()
        router.shutdown()
        thread.join(timeout=5)
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.info("[Server] Stopped")
    return 0
