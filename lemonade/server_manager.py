"""The client side of a running server (C++ `tray/server_manager.cpp` and the commands of `tray_app.cpp`).

Probes use `urllib` from the standard library so `status` and `stop` start fast (no `requests`).
`list`, `pull` and `delete` talk to the server on the given port; with no server there, they do the
work in this process (the C++ CLI starts a throw-away router for it; the result is the same and nothing
is left running).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from typing import Any

PROBE_TIMEOUT = 2.0
STOP_WAIT = 15.0
PULL_TIMEOUT = 7200.0  # C++ client timeouts (cli.md §5.2)
LOAD_TIMEOUT = 240.0
RULE = "-" * 100


class HttpFailure(Exception):
    """A request the server answered with an error, or could not be sent."""


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "localhost", "") else host


def _url(host: str, port: int, path: str) -> str:
    host = _client_host(host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def request(host: str, port: int, method: str, path: str, body: dict | None = None,
            timeout: float = PROBE_TIMEOUT) -> Any:
    """Send one request and return the parsed JSON. Raises HttpFailure with the C++ client's message."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(_url(host, port, path), data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(req, timeout=timeout) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        raise HttpFailure(_error_message(e.code, e.read())) from None
    except (urllib.error.URLError, OSError, ValueError):
        raise HttpFailure("HTTP request failed: connection error") from None


def _error_message(status: int, raw: bytes) -> str:
    """C++ rule: the `error` string, else `detail`, else a status line (+ short body)."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"]
        for key in ("error", "detail"):
            if isinstance(parsed.get(key), str):
                return parsed[key]
    text = raw.decode("utf-8", "replace")
    return f"HTTP request failed with status: {status}" + (f": {text}" if len(text) < 200 else "")


def is_running(host: str, port: int) -> bool:
    try:
        return isinstance(request(host, port, "GET", "/api/v1/health"), dict)
    except HttpFailure:
        return False


# -- commands ------------------------------------------------------------------------------------


def status(host: str, port: int) -> int:
    if is_running(host, port):
        print(f"Server is running on port {port}")
        return 0
    print("Server is not running")
    return 1


def stop(host: str, port: int) -> int:
    if not is_running(host, port):
        print("Lemonade Server is not running")
        return 0
    print(f"Stopping server on port {port}...")
    try:
        request(host, port, "POST", "/internal/shutdown", {})
    except HttpFailure as e:
        print(f"Error stopping server: {e}", file=sys.stderr)
        return 1
    deadline = time.monotonic() + STOP_WAIT
    while is_running(host, port):
        if time.monotonic() > deadline:
            print("Error stopping server: still answering after shutdown", file=sys.stderr)
            return 1
        time.sleep(0.1)
    print("Lemonade Server stopped successfully.")
    return 0


def format_model_table(entries: list[dict]) -> str:
    lines = [f"{'Model Name':<40}{'Downloaded':<12}Details", RULE]
    for entry in entries:
        downloaded = "Yes" if entry.get("downloaded") else "No"
        lines.append(f"{entry.get('id', ''):<40}{downloaded:<12}{entry.get('recipe', '-')}")
    lines.append(RULE)
    return "\n".join(lines)


def _local_model_entries() -> list[dict]:
    from lemonade.model_manager import ModelManager

    models = ModelManager()
    models.seed_embedded()
    return [{"id": name, "downloaded": models.is_downloaded(info), "recipe": info.recipe}
            for name, info in sorted(models.supported_models().items())]


def list_models(host: str, port: int) -> int:
    from lemonade.error_types import LemonadeError

    try:
        if is_running(host, port):
            answer = request(host, port, "GET", "/api/v1/models?show_all=true", timeout=30)
            if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
                print("Invalid response format from server", file=sys.stderr)
                return 1
            entries = answer["data"]
        else:
            entries = _local_model_entries()
    except (HttpFailure, LemonadeError) as e:
        print(f"Error listing models: {e}", file=sys.stderr)
        return 1
    print(format_model_table(entries))
    return 0


def pull(host: str, port: int, model: str, options: dict) -> int:
    from lemonade.error_types import LemonadeError

    print(f"Pulling model: {model}", flush=True)
    body: dict[str, Any] = {"model": model}
    for key in ("checkpoint", "recipe", "mmproj"):
        if options.get(key):
            body[key] = options[key]
    for key in ("reasoning", "vision"):
        if options.get(key):
            body[key] = True
    try:
        if is_running(host, port):
            answer = request(host, port, "POST", "/api/v1/pull", body, timeout=PULL_TIMEOUT)
            if not (isinstance(answer, dict) and answer.get("status") == "success"):
                print("Failed to pull model", file=sys.stderr)
                return 1
        else:
            from lemonade.model_manager import ModelManager

            ModelManager().download(model, checkpoint=body.get("checkpoint", ""),
                                    recipe=body.get("recipe", ""), reasoning=bool(body.get("reasoning")),
                                    vision=bool(body.get("vision")), mmproj=body.get("mmproj", ""),
                                    progress=_progress_printer())
    except (HttpFailure, LemonadeError) as e:
        print(f"Error pulling model: {e}", file=sys.stderr)
        return 1
    print(f"Model pulled successfully: {model}")
    return 0


def _progress_printer():
    """A bar on a TTY (rewritten in place), plain lines otherwise; both from the same events."""
    tty = sys.stdout.isatty()
    started = time.monotonic()
    last = {"file": None, "printed": 0.0}

    def show(p) -> None:
        now = time.monotonic()
        rate = p.total_done / max(now - started, 1e-6)
        eta = (p.total_bytes - p.total_done) / rate if rate > 0 else 0
        if tty:
            width = max(10, min(40, shutil.get_terminal_size().columns - 70))
            filled = int(width * p.percent / 100)
            sys.stdout.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {p.percent:5.1f}% "
                             f"{p.file_index}/{p.file_count} {p.file[-24:]} "
                             f"{p.total_done / 1e6:.1f}/{p.total_bytes / 1e6:.1f} MB "
                             f"{rate / 1e6:.1f} MB/s ETA {eta:.0f}s ")
            if p.total_done >= p.total_bytes:
                sys.stdout.write("\n")
            sys.stdout.flush()
        elif p.file != last["file"] or now - last["printed"] >= 1.0 or p.bytes_done >= p.bytes_total:
            last.update(file=p.file, printed=now)
            print(f"{p.file} ({p.file_index}/{p.file_count}): {p.bytes_done}/{p.bytes_total} bytes, "
                  f"total {p.percent:.1f}%, {rate / 1e6:.1f} MB/s, ETA {eta:.0f}s", flush=True)

    return show


def delete(host: str, port: int, model: str) -> int:
    from lemonade.error_types import LemonadeError

    print(f"Deleting model: {model}", flush=True)
    try:
        if is_running(host, port):
            answer = request(host, port, "POST", "/api/v1/delete", {"model": model}, timeout=60)
            if not (isinstance(answer, dict) and answer.get("status") == "success"):
                print("Failed to delete model", file=sys.stderr)
                return 1
        else:
            from lemonade.model_manager import ModelManager

            ModelManager().delete(model)
    except (HttpFailure, LemonadeError) as e:
        print(f"Error deleting model: {e}", file=sys.stderr)
        return 1
    print(f"Model deleted successfully: {model}")
    return 0


def run(config, model: str) -> int:
    """Serve in this process and, once healthy, load `model` and open (or print) the chat URL."""
    import threading

    from lemonade.cli_parser import configure_logging
    from lemonade.server import run_server

    configure_logging(config.log_level)
    outcome = {"code": 0}

    def after_start(port: int, shutdown) -> None:
        print(f"Running model: {model}\nLoading model {model}...", flush=True)
        try:
            request(config.host, port, "POST", "/api/v1/load", {"model_name": model}, timeout=LOAD_TIMEOUT)
        except HttpFailure as e:
            print(f"Exception loading model: {e}\nFailed to load model", file=sys.stderr)
            outcome["code"] = 1
            shutdown()
            return
        url = f"http://{config.host}:{port}/?model={model}#llm-chat"
        print("Model loaded successfully!")
        if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
            import webbrowser

            print(f"Opening browser: {url}", flush=True)
            threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
        else:
            print(f"Open the chat in a browser: {url}", flush=True)

    code = run_server(config, on_ready=after_start)
    return outcome["code"] or code
