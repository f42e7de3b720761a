"""`lemonade-server run` under a parent that reads only one of its two pipes, line by line, as CI harnesses
do (upstream test/server_cli.py test_003 blocks on each pipe in turn). Each pipe must deliver its lines
while the server runs, without PYTHONUNBUFFERED, and whatever the parent does with the other pipe.

The browser is observed through `$BROWSER` (read by the standard `webbrowser` module): a script that
writes the URL it was given to a file. `$DISPLAY` is set to a fake value so that only
`LEMONADE_DISABLE_BROWSER` decides.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import requests

from conftest import DEFAULT_MODEL, free_port, llama_processes, wait_for
from test_cli_helpers import cli_env, script

pytestmark = pytest.mark.timeout(400)

LOAD_DEADLINE = 180.0  # upstream test_003's wait for the model


class OnePipe:
    """Every line of one pipe, read by a daemon thread as it arrives."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))


@pytest.fixture()
def browser_env(tmp_path, seeded_hub_cache) -> tuple[dict, Path]:
    """The CLI env with a fake display, a `$BROWSER` that records its URL, and no PYTHONUNBUFFERED."""
    env = cli_env(tmp_path, seeded_hub_cache)
    env.pop("PYTHONUNBUFFERED", None)
    opened = tmp_path / "browser-opened"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\nprintf "%s\\n" "$1" > "{opened}"\n')
    browser.chmod(0o755)
    env.update(DISPLAY=":99", BROWSER=f"{browser} %s")
    return env, opened


def start_run(env: dict, port: int) -> subprocess.Popen:
    return subprocess.Popen([script("lemonade-server"), "run", DEFAULT_MODEL, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


def interrupt(proc: subprocess.Popen, unread) -> tuple[int, list[str]]:
    """SIGINT, with the so far unread pipe now drained so that the shutdown lines cannot block; returns the
    exit code and every line of that pipe."""
    rest = OnePipe(unread)
    proc.send_signal(signal.SIGINT)
    code = proc.wait(30)
    rest.join(10)
    return code, rest.lines


def loaded_model(port: int) -> str | None:
    return requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=10).json().get("model_loaded")


def test_parent_reading_only_stderr_gets_the_browser_note_once_loaded(browser_env):
    env, opened = browser_env
    env["LEMONADE_DISABLE_BROWSER"] = "1"
    port = free_port()
    proc = start_run(env, port)
    try:
        err = OnePipe(proc.stderr)
        wait_for(lambda: err.lines or proc.poll() is not None, LOAD_DEADLINE, what="a line on stderr")
        assert err.lines == ["Not opening a browser: LEMONADE_DISABLE_BROWSER is set"]
        # The line comes after the load: a parent released by it finds the model loaded.
        assert loaded_model(port) == DEFAULT_MODEL
        code, out = interrupt(proc, proc.stdout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert code == 0
    url = f"http://localhost:{port}/?model={DEFAULT_MODEL}#llm-chat"
    assert f"Open the chat in a browser: {url}" in out
    assert not [line for line in out if line.startswith("Opening browser")]
    assert not opened.exists(), "a browser was started although LEMONADE_DISABLE_BROWSER=1"
    assert not llama_processes(env["HF_HUB_CACHE"])


def test_parent_reading_only_stdout_gets_every_line_and_the_browser_the_url(browser_env):
    env, opened = browser_env
    port = free_port()
    proc = start_run(env, port)
    url = f"http://localhost:{port}/?model={DEFAULT_MODEL}#llm-chat"
    expected = [f"Running model: {DEFAULT_MODEL}", f"Loading model {DEFAULT_MODEL}...", "Model loaded successfully!",
                f"Opening browser: {url}", "Press Ctrl+C to stop"]
    try:
        out = OnePipe(proc.stdout)
        wait_for(lambda: [line for line in out.lines if line in expected] == expected or proc.poll() is not None,
                 LOAD_DEADLINE, what="the run lines on stdout")
        assert [line for line in out.lines if line in expected] == expected, "\n".join(out.lines)
        assert loaded_model(port) == DEFAULT_MODEL
        wait_for(lambda: opened.exists() and opened.read_text() == url + "\n", 30, what="the browser to get the URL")
        code, err = interrupt(proc, proc.stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert code == 0
    assert err == []  # a browser that opened leaves stderr alone
    assert not llama_processes(env["HF_HUB_CACHE"])


GLUE_PROBE = textwrap.dedent("""
    import logging, sys, threading
    from lemonade.logging_config import configure_logging, print_line
    configure_logging("info")
    log = logging.getLogger("probe")
    threads = [threading.Thread(target=lambda: [print_line("Shutting down server...") for _ in range(20000)]),
               threading.Thread(target=lambda: [log.info("[Server] POST /api/v1/load - 404") for _ in range(20000)])]
    for t in threads: t.start()
    for t in threads: t.join()
""")


def test_console_lines_are_never_glued_to_log_records_of_other_threads():
    # With print(), which writes the text and the newline separately, over a thousand of these 40000 lines
    # come out glued (`Shutting down server...2025-... INFO probe: ...`) on a 2-core machine.
    done = subprocess.run([sys.executable, "-c", GLUE_PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 40000
    glued = [line for line in lines
             if line != "Shutting down server..." and not line.endswith(" INFO probe: [Server] POST /api/v1/load - 404")]
    assert glued == []
