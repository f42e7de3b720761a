"""The client side of a server (C++ `tray/server_manager.cpp` and the commands of `tray/tray_app.cpp`;
spec cli.md §5-§6).

Process model: `serve` and `run` serve HTTP in this process (C++ forks and execs `lemonade-router`);
`list`, `pull` and `delete` with no server running do the work in this process (C++ spawns a throw-away
router). Either way nothing is left running when the command ends, and there is no child to orphan.
A running server is found as C++ B finds it on Linux: the PID file (`single_instance.find_server`).
Requests use `urllib` from the standard library, imported only when a request is sent, so `status`
and `stop` start fast.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

from lemonade import single_instance
from lemonade.logging_config import print_line

PROBE_TIMEOUT = 5.0  # C++ client read timeout (cli.md §5.2)
PULL_TIMEOUT = 7200.0
LOAD_TIMEOUT = 240.0
DELETE_TIMEOUT = 60.0  # C++ 5 s; a delete of a large repo can take longer
LIST_TIMEOUT = 30.0
STOP_WAIT = 5.0  # C++ terminate wait: 50 polls of 100 ms (tray_app.cpp L1283-1310)
STOP_POLL = 0.1
RULE = "-" * 100
PULL_USAGE = "pull <model_name> [--checkpoint CHECKPOINT] [--recipe RECIPE] [--reasoning] [--vision] [--mmproj MMPROJ]"
PULL_VALUE_OPTIONS = ("--checkpoint", "--recipe", "--mmproj")  # C++'s
# ours (not in the usage line, which is C++'s): a remote upstream's and an RPC model's settings
PULL_SETTINGS = {"--base-url": "base_url", "--api-key-env": "api_key_env", "--rpc-workers": "rpc_workers"}
DELETE_USAGE = "delete <model_name>"
RUN_USAGE = "run <model_name>"
NO_BROWSER_NOTE = "Not opening a browser: "  # + the reason; stderr, once the model is loaded
KEY_HINT = "LEMONADE_ADMIN_API_KEY or LEMONADE_API_KEY"  # named in the message of a 401


class HttpFailure(Exception):
    """A request the server answered with an error, or could not be sent."""


def _client_host(host: str) -> str:
    """Where a client connects: loopback for `localhost`, `0.0.0.0` or unknown (C++ server_manager.cpp
    L715), else the address the server bound."""
    return "127.0.0.1" if host in ("0.0.0.0", "localhost", "") else host


def _url(host: str, port: int, path: str) -> str:
    host = _client_host(host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def request(host: str, port: int, method: str, path: str, body: dict | None = None,
            timeout: float = PROBE_TIMEOUT, on_event=None) -> Any:
    """Send one request and return the parsed JSON. Raises HttpFailure with the C++ client's message.

    An SSE answer (our `/pull` with `"stream": true`) is handed event by event to
    `on_event(name, data)`; the last non-None value it returns is the result."""
    import json
    import urllib.error
    import urllib.request
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(_url(host, port, path), data=data, method=method,
                                 headers=request_headers(data is not None))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(req, timeout=timeout) as response:
            if on_event is not None and response.headers.get_content_type() == "text/event-stream":
                return _read_events(response, on_event)
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        message = _error_message(e.code, e.read())
        if e.code == 401:
            message += f" (set {KEY_HINT} to the server's key)"
        raise HttpFailure(message) from None
    except (urllib.error.URLError, OSError, ValueError):
        raise HttpFailure("HTTP request failed: connection error") from None


def request_headers(json_body: bool) -> dict[str, str]:
    """Content type, and the key as lemonade HEAD's CLI sends it: `Authorization: Bearer`, the admin key
    when one is set (it opens every route), else the API key (`path_utils.client_api_key`)."""
    from lemonade.utils import path_utils

    headers = {"Content-Type": "application/json"} if json_body else {}
    key = path_utils.client_api_key()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def _read_events(response, on_event) -> Any:
    import json

    event, result = "message", None
    for raw in response:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: "):
            value = on_event(event, json.loads(line[len("data: "):]))
            result = value if value is not None else result
        elif not line:
            event = "message"
    return result


def _error_message(status: int, raw: bytes) -> str:
    """C++ rule: the `error` string, else `detail`, else a status line (+ short body)."""
    import json

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


# -- status / stop ----------------------------------------------------------------------------


def status(loaded_models: bool = False) -> int:
    """cli.md §6 status: PID-file discovery only; the configured port plays no part. With
    `loaded_models` (`lemonade`; `lemonade-server` keeps C++'s one line) the table of loaded models
    follows, from `/health` (as `ollama ps`, HEAD's `lemonade status`). The exit code stays the PID
    file's answer, so `status` needs no key: when `/health` refuses (a key is required) or fails, stderr
    says why the table is missing."""
    info = single_instance.find_server()
    if info is None:
        print("Server is not running")
        return 1
    print(f"Server is running on port {info.port}", flush=True)
    if not loaded_models:
        return 0
    try:
        health = request(*_target(info), "GET", "/api/v1/health")
    except HttpFailure as e:
        print(f"Loaded models not shown: {e}", file=sys.stderr)
        return 0
    print(format_loaded_table(health if isinstance(health, dict) else {}))
    return 0


def format_loaded_table(health: dict) -> str:
    """The loaded models of a `/health` answer: HEAD's `all_models_loaded`, else GA's `model_loaded`."""
    loaded = health.get("all_models_loaded")
    if not isinstance(loaded, list):
        name = health.get("model_loaded")
        loaded = [{"model_name": name, "checkpoint": health.get("checkpoint_loaded")}] if name else []
    if not loaded:
        return "No models loaded."
    lines = [f"{'Model':<40}{'Type':<11}{'Device':<8}{'Recipe':<10}Checkpoint"]
    for m in loaded:
        name = f"{m.get('model_name', '?')}{' (pinned)' if m.get('pinned') else ''}"
        lines.append(f"{name:<40}{m.get('type', '-')!s:<11}{m.get('device', '-')!s:<8}"
                     f"{m.get('recipe', '-')!s:<10}{m.get('checkpoint') or '-'}")
    return "\n".join(lines)


def stop() -> int:
    """SIGTERM the server and wait (bounded) until it, its children and its lock are gone; SIGKILL the
    survivors at the deadline (C++ `execute_stop_command`, Linux branch). Always exits 0, as C++.

    Our server stops its own children on SIGTERM, so only the server is signalled first; its children
    are remembered beforehand so a force-kill still reaches them after they are reparented. A signal
    needs no API key: the operating system already limits it to the server's owner, which is the right
    judge for a local stop (`/internal/shutdown` with the admin key is the way for remote clients)."""
    import psutil

    info = single_instance.find_server()
    if info is None:
        print("Lemonade Server is not running")
        return 0
    print(f"Stopping server on port {info.port}...")
    print(f"Found router process (PID: {info.pid})")
    try:
        server = psutil.Process(info.pid)
        children = server.children(recursive=True)
    except psutil.Error:
        server, children = None, []
    if children:
        print(f"Found {len(children)} child process(es) of router")
    print(f"Sending SIGTERM to router (PID: {info.pid})...", flush=True)
    import signal

    try:
        os.kill(info.pid, signal.SIGTERM)
    except OSError:
        pass
    print(f"Waiting for processes to exit (up to {STOP_WAIT:.0f} seconds)...", flush=True)
    watched = ([server] if server else []) + children
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline:
        if not _alive(watched) and single_instance.lock_is_free(single_instance.SERVER):
            print("All processes exited, shutdown complete!")
            print("Lemonade Server stopped successfully.")
            return 0
        time.sleep(STOP_POLL)
    print("Timeout expired, forcing termination...")
    for proc in _alive(watched):
        label = "router" if proc is server else "child process"
        print(f"Force killing {label} (PID: {proc.pid})")
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(watched, timeout=1.0)
    single_instance.find_server()  # removes the PID file now that its process is gone
    print("Lemonade Server stopped successfully.")
    return 0


def _alive(processes: list) -> list:
    import psutil

    alive = []
    for proc in processes:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            pass
    return alive


# -- list / pull / delete ---------------------------------------------------------------------


def format_model_table(entries: list[dict], sizes: dict[str, str] | None = None) -> str:
    """C++ list table (tray_app.cpp L827-843): id padded to 40 (never cut), Yes/No padded to 12, recipe.
    With `sizes` (`lemonade list`) a `Size (GB)` column comes before the recipe, as HEAD's list."""
    size_head = f"{'Size (GB)':<11}" if sizes is not None else ""
    lines = [f"{'Model Name':<40}{'Downloaded':<12}{size_head}Details", RULE]
    for entry in entries:
        downloaded = "Yes" if entry.get("downloaded") is True else "No"
        size = f"{sizes.get(str(entry.get('id')), '-'):<11}" if sizes is not None else ""
        lines.append(f"{entry.get('id', 'unknown')!s:<40}{downloaded:<12}{size}{entry.get('recipe', '-')!s}")
    lines.append(RULE)
    return "\n".join(lines)


def model_sizes(entries: list[dict]) -> dict[str, str]:
    """Size in GB per listed model: the bytes on disk for a downloaded one, else the registry's figure
    (the download size), else nothing. Read from this machine's cache and registry; stats files only."""
    from lemonade.backends import registry

    models = registry.model_manager()
    known = models.supported_models()
    sizes = {}
    for entry in entries:
        info = known.get(str(entry.get("id")))
        if info is None:
            continue
        on_disk = models.disk_usage(info) if entry.get("downloaded") is True else None
        if on_disk is not None:
            sizes[info.name] = f"{on_disk / 1e9:.2f}"
        elif isinstance(info.size, (int, float)):
            sizes[info.name] = f"{info.size:.2f}"
    return sizes


def _local_model_entries() -> list[dict]:
    from lemonade.backends import registry

    models = registry.model_manager()
    models.seed_embedded()
    return [{"id": name, "downloaded": models.is_downloaded(info), "recipe": info.recipe}
            for name, info in sorted(models.supported_models().items())]


def _target(info: single_instance.ServerInfo) -> tuple[str, int]:
    return info.host, info.port


def list_models(config, with_sizes: bool = False) -> int:
    """cli.md §6 list: from the discovered server, else computed in this process (same table).
    `with_sizes` (`lemonade`) adds the Size (GB) column; `lemonade-server` keeps C++'s table."""
    from lemonade.error_types import LemonadeError

    info = single_instance.find_server()
    try:
        if info is not None:
            answer = request(*_target(info), "GET", "/api/v1/models?show_all=true", timeout=LIST_TIMEOUT)
            if not isinstance(answer, dict) or not isinstance(answer.get("data"), list):
                print("Invalid response format from server", file=sys.stderr)
                return 1
            entries = answer["data"]
        else:
            entries = _local_model_entries()
        sizes = model_sizes(entries) if with_sizes else None
    except (HttpFailure, LemonadeError) as e:
        print(f"Error listing models: {e}", file=sys.stderr)
        return 1
    print(format_model_table(entries, sizes))
    return 0


def _usage_error(prog: str, usage: str) -> int:
    print("Error: model name required", file=sys.stderr)
    print(f"Usage: {prog} {usage}", file=sys.stderr)
    return 1


def pull_body(name: str, options: list[str]) -> dict[str, Any]:
    """The /pull body from the tokens after NAME (tray_app.cpp L889-905): a value option takes the next
    token if there is one; unknown tokens are ignored."""
    body: dict[str, Any] = {"model": name}
    i = 0
    while i < len(options):
        token = options[i]
        key = token[2:]
        if token in PULL_VALUE_OPTIONS and i + 1 < len(options):
            body[key] = options[i + 1]
            i += 1
        elif token in PULL_SETTINGS and i + 1 < len(options):
            body[PULL_SETTINGS[token]] = options[i + 1]
            i += 1
        elif token in ("--reasoning", "--vision"):
            body[key] = True
        i += 1
    return body


def pull(config, positionals: list[str], prog: str) -> int:
    """cli.md §6 pull. Through the discovered server, else in this process with a progress display."""
    from lemonade.error_types import LemonadeError

    if not positionals:
        return _usage_error(prog, PULL_USAGE)
    model = positionals[0]
    body = pull_body(model, positionals[1:])
    print(f"Pulling model: {model}", flush=True)
    info = single_instance.find_server()
    try:
        if info is not None:
            # Ask for the SSE variant to show progress; a C++ server ignores `stream` and answers JSON.
            answer = request(*_target(info), "POST", "/api/v1/pull", {**body, "stream": True},
                             timeout=PULL_TIMEOUT, on_event=_pull_event_handler(_progress_printer()))
            if not (isinstance(answer, dict) and answer.get("status") == "success"):
                print("Failed to pull model", file=sys.stderr)
                return 1
        else:
            from lemonade.backends import registry

            registry.model_manager().download(model, checkpoint=body.get("checkpoint", ""),
                                    recipe=body.get("recipe", ""), reasoning=bool(body.get("reasoning")),
                                    vision=bool(body.get("vision")), mmproj=body.get("mmproj", ""),
                                    progress=_progress_printer(),
                                    settings={k: body[k] for k in PULL_SETTINGS.values() if k in body})
    except (HttpFailure, LemonadeError) as e:
        print(f"Error pulling model: {e}", file=sys.stderr)
        return 1
    print(f"Model pulled successfully: {model}")
    return 0


class _ProgressView:
    """A `/pull` SSE `progress` event with the attribute names of `hf_download.DownloadProgress`."""

    def __init__(self, data: dict):
        self.file = str(data.get("file", ""))
        self.file_index = int(data.get("file_index", 0))
        self.file_count = int(data.get("total_files", 0))
        self.bytes_done = int(data.get("bytes_downloaded", 0))
        self.bytes_total = int(data.get("bytes_total", 0))
        self.total_done = int(data.get("total_downloaded", 0))
        self.total_bytes = int(data.get("total_download_size", 0))
        self.percent = float(data.get("percent", 0.0))


def _pull_event_handler(show):
    def on_event(name: str, data: Any):
        if name == "progress" and isinstance(data, dict):
            show(_ProgressView(data))
        elif name == "complete":
            return {"status": "success"}
        elif name == "error":
            raise HttpFailure(data.get("error", "pull failed") if isinstance(data, dict) else str(data))
        return None
    return on_event


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
            width = max(10, min(40, os.get_terminal_size().columns - 70 if os.isatty(1) else 80))
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


def delete(config, positionals: list[str], prog: str) -> int:
    """cli.md §6 delete. Through the discovered server, else in this process."""
    from lemonade.error_types import LemonadeError

    if not positionals:
        return _usage_error(prog, DELETE_USAGE)
    model = positionals[0]
    print(f"Deleting model: {model}", flush=True)
    info = single_instance.find_server()
    try:
        if info is not None:
            answer = request(*_target(info), "POST", "/api/v1/delete", {"model": model}, timeout=DELETE_TIMEOUT)
            if not (isinstance(answer, dict) and answer.get("status") == "success"):
                print("Failed to delete model", file=sys.stderr)
                return 1
        else:
            from lemonade.backends import registry

            registry.model_manager().delete(model)
    except (HttpFailure, LemonadeError) as e:
        print(f"Error deleting model: {e}", file=sys.stderr)
        return 1
    print(f"Model deleted successfully: {model}")
    return 0


# -- serve / run ------------------------------------------------------------------------------


def _check_backend(config) -> bool:
    """C++ passes `--llamacpp` on unchecked and the router rejects it (exit 105), so start-up fails;
    we say why at once."""
    from lemonade.backends import LLAMACPP_BACKENDS

    if config.llamacpp in LLAMACPP_BACKENDS:
        return True
    print(f"--llamacpp: {config.llamacpp} not in {{{','.join(LLAMACPP_BACKENDS)}}}", file=sys.stderr)
    print("Error: Failed to start server", file=sys.stderr)
    return False


def _take_server_lock(prog: str) -> bool:
    if single_instance.is_another_instance_running(single_instance.SERVER):
        print(single_instance.server_busy_message(prog), file=sys.stderr)
        return False
    return True


def _start_logging(config) -> bool:
    """The log to stdout, or to `--log-file`; False (after saying why) when that file cannot be opened."""
    from lemonade.logging_config import configure_logging

    try:
        configure_logging(config.log_level, config.log_file)
    except OSError as e:
        print(f"Error: cannot write the log file {config.log_file}: {e.strerror or e}", file=sys.stderr)
        print("Error: Failed to start server", file=sys.stderr)
        return False
    return True


def serve(config, prog: str) -> int:
    """cli.md §6 serve: the persistent server, in this process, until Ctrl+C, SIGTERM or /internal/shutdown."""
    from lemonade.server import run_server

    if not _take_server_lock(prog):
        return single_instance.LOCK_EXIT_CODE
    if not _check_backend(config) or not _start_logging(config):
        return 1

    def ready(port: int, shutdown) -> None:
        print_line("Press Ctrl+C to stop")

    return run_server(config, on_ready=ready, persistent=True)


def run(config, positionals: list[str], prog: str) -> int:
    """cli.md §6 run: `serve`, then load NAME and show the chat (`_show_chat`). The name is checked
    before anything starts (C++ starts the server first). Blocks until the server stops; returns the
    exit code (1 when the load fails, after the server has shut down).

    With a server already running, NAME is loaded on it and the chat shown, and the command returns
    (the help's "starts server if needed"; C++ B refuses with its single-instance error instead)."""
    from lemonade.server import run_server

    if not positionals:
        return _usage_error(prog, RUN_USAGE)
    model = positionals[0]
    running = single_instance.find_server()
    if running is not None:
        return _run_on_running_server(running, model)
    if not _take_server_lock(prog):
        return single_instance.LOCK_EXIT_CODE
    if not _check_backend(config) or not _start_logging(config):
        return 1
    outcome = {"code": 0}

    def after_start(port: int, shutdown) -> None:
        print_line(f"Running model: {model}\nLoading model {model}...")
        try:
            request(config.host, port, "POST", "/api/v1/load", {"model_name": model}, timeout=LOAD_TIMEOUT)
        except HttpFailure as e:
            print_line(f"Exception loading model: {e}\nFailed to load model", file=sys.stderr)
            outcome["code"] = 1
            shutdown()
            return
        print_line("Model loaded successfully!")
        _show_chat(f"http://{config.host}:{port}/?model={model}#llm-chat")
        print_line("Press Ctrl+C to stop")

    code = run_server(config, on_ready=after_start, persistent=True)
    return outcome["code"] or code


def _run_on_running_server(info: single_instance.ServerInfo, model: str) -> int:
    """`run NAME` when a server is up: load NAME there (a download included, hence the pull timeout),
    then show the chat. Blocks for the load; exit code 0, or 1 when the server refuses."""
    print(f"Running model: {model}")
    print(f"Using the server already running on port {info.port}")
    print(f"Loading model {model}...", flush=True)
    try:
        request(*_target(info), "POST", "/api/v1/load", {"model_name": model}, timeout=PULL_TIMEOUT)
    except HttpFailure as e:
        print(f"Exception loading model: {e}\nFailed to load model", file=sys.stderr)
        return 1
    print("Model loaded successfully!", flush=True)
    _show_chat(f"http://{info.host or 'localhost'}:{info.port}/?model={model}#llm-chat", background=False)
    return 0


def _show_chat(url: str, background: bool = True) -> None:
    """Open the chat page in a browser, or print its URL and say on stderr why no browser was started.

    Streams as in C++ (tray_app.cpp L1022-1031, cli.md §6 run): the user's lines on stdout, and on stderr
    the one line a failed browser start gives there (C++: `sh: 1: xdg-open: not found` on a headless
    machine). That line comes once the model is loaded, so a parent that reads stderr line by line while
    it waits for the model (upstream test/server_cli.py test_003) is released as C++ releases it.
    Never blocks when `background`: a browser is started from a daemon thread, as C++ backgrounds
    xdg-open with `&`; otherwise (the process is about to exit) it waits for the browser command."""
    import threading

    from lemonade.utils import path_utils

    if path_utils.browser_disabled():
        reason = f"{path_utils.ENV_DISABLE_BROWSER} is set"
    elif not path_utils.has_display():
        reason = "no display (DISPLAY and WAYLAND_DISPLAY are unset)"
    else:
        print_line(f"Opening browser: {url}")
        if background:
            threading.Thread(target=_open_browser, args=(url,), name="browser", daemon=True).start()
        else:
            _open_browser(url)
        return
    print_line(f"Open the chat in a browser: {url}")
    print_line(f"{NO_BROWSER_NOTE}{reason}", file=sys.stderr)


def _open_browser(url: str) -> None:
    """Blocks while the browser command runs (`webbrowser` waits for some); reports a failure on stderr."""
    import webbrowser

    try:
        opened = webbrowser.open(url)
    except webbrowser.Error:
        opened = False
    if not opened:
        print_line(f"Could not open a browser for {url}", file=sys.stderr)


# -- load / unload / pin / unpin (ours, as lemonade HEAD's CLI: head-llm-surface.md §1.3) ---------

RESIDENCY_USAGE = {"load": "load <model_name> [--pinned]", "unload": "unload [<model_name>]",
                   "pin": "pin <model_name>", "unpin": "unpin <model_name>"}


def residency_command(command: str, positionals: list[str], prog: str) -> int:
    """Ask the running server to load, unload, pin or unpin a model. Exit 1 when no server runs,
    the name is missing, or the server refuses (its message is printed)."""
    names = [p for p in positionals if not p.startswith("--")]
    flags = {p for p in positionals if p.startswith("--")}
    if command != "unload" and not names:
        return _usage_error(prog, RESIDENCY_USAGE[command])
    unknown = flags - ({"--pinned"} if command == "load" else set())
    if unknown:
        print(f"Error: unknown option {sorted(unknown)[0]} for {command}", file=sys.stderr)
        print(f"Usage: {prog} {RESIDENCY_USAGE[command]}", file=sys.stderr)
        return 1
    info = single_instance.find_server()
    if info is None:
        print(f"Error: no server is running (start one with `{prog} serve`)", file=sys.stderr)
        return 1
    name = names[0] if names else None
    if command == "load":
        path, body, timeout = "/api/v1/load", {"model_name": name}, PULL_TIMEOUT
        if "--pinned" in flags:
            body["pinned"] = True
    elif command == "unload":
        path, body, timeout = "/api/v1/unload", ({"model_name": name} if name else {}), LIST_TIMEOUT
    else:
        path, body, timeout = "/internal/pin", {"model_name": name, "pinned": command == "pin"}, LIST_TIMEOUT
    try:
        request(*_target(info), "POST", path, body, timeout=timeout)
    except HttpFailure as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    done = {"load": f"Model loaded: {name}" + (" (pinned)" if "--pinned" in flags else ""),
            "unload": f"Model unloaded: {name}" if name else "All models unloaded",
            "pin": f"Model pinned: {name}", "unpin": f"Model unpinned: {name}"}
    print(done[command])
    return 0


# -- rpc-worker (ours) ---------------------------------------------------------------------------


def rpc_worker(host: str, port: int, threads: int | None, log_level: str = "info") -> int:
    """Run llama.cpp's rpc-server from the llama.cpp install on host:port until Ctrl+C or SIGTERM,
    then stop it (TERM, bounded wait, KILL). Blocks; returns 0 after a requested stop, 1 when the
    worker cannot start or exits by itself (its last output is printed)."""
    import signal
    import threading

    from lemonade.backends import llamacpp_rpc
    from lemonade.error_types import LemonadeError
    from lemonade.logging_config import configure_logging
    from lemonade.utils import process_manager

    configure_logging(log_level)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda signum, frame: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            child = llamacpp_rpc.start_worker(host, port, threads=threads)
        except LemonadeError as e:
            print(f"Error: {e.message}", file=sys.stderr)
            return 1
        shown = "<this machine's address>" if host == "0.0.0.0" else host
        print_line(f"RPC worker listening on {host}:{port} (rpc-server pid {child.pid})")
        print_line(f"Use it from the server's machine: lemonade serve --rpc-workers {shown}:{port}")
        print_line("Press Ctrl+C to stop")
        while not stop.wait(0.5):
            if not child.is_alive():
                child.wait_drained()
                print_line(f"Error: rpc-server exited with code {child.exit_code()}:\n{child.tail_text()}",
                           file=sys.stderr)
                return 1
        print_line("Stopping the RPC worker...")
        process_manager.stop(child)
        print_line("RPC worker stopped")
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
