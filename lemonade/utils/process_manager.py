"""Child processes: spawn, watch, stop (C++ `utils/process_manager.cpp`).

Only this module starts or kills processes. Every child gets its own session (process group), so a stop
reaches its whole tree, and on Linux `PR_SET_PDEATHSIG` so it dies with us even if we are SIGKILLed
(upstream leaves llama-server running in that case). PDEATHSIG fires when the *thread* that forked
exits, so all spawns go through one long-lived spawner thread rather than short-lived request threads.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from lemonade.utils import path_utils

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 5.0  # SIGTERM grace before SIGKILL (C++: 50 × 100 ms)
OUTPUT_TAIL_LINES = 40  # lines of child output kept for error messages
PORT_RANGE = (8001, 9000)  # C++ choose_port range (router-and-backends §4)
_PR_SET_PDEATHSIG = 1

_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lemonade-spawner")
try:  # loaded here, not in the child: only async-signal-safe work belongs between fork and exec
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _prctl = None


def _set_parent_death_signal() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    """A running child, its drained output and how to name it in logs."""

    name: str
    popen: subprocess.Popen
    output_tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=OUTPUT_TAIL_LINES))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def tail_text(self) -> str:
        return "\n".join(self.output_tail)

    def wait_drained(self, limit: float = 1.0) -> None:
        """Give the output thread up to `limit` seconds to read the last words of a child that has
        exited (it closes stdout at the end), so an error can quote them. Blocks; never raises."""
        deadline = time.monotonic() + limit
        stdout = self.popen.stdout
        while stdout is not None and not stdout.closed and time.monotonic() < deadline:
            time.sleep(0.01)


def spawn(name: str, argv: Sequence[str], env: dict[str, str] | None = None,
          child_log: logging.Logger | None = None, ignore_sigpipe: bool = False) -> Child:
    """Start `argv` (a list, never a shell string) in its own session; drain its output into the log.

    `ignore_sigpipe` leaves SIGPIPE (and SIGXFSZ) ignored in the child, as Python has them, instead of
    restoring the default: for a child that writes to sockets without MSG_NOSIGNAL and would otherwise
    be killed when a peer goes away (ggml's rpc-server). Blocks only for the fork/exec. Raises OSError
    if the executable cannot be run.
    """
    def start() -> subprocess.Popen:
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=path_utils.child_environment(env), start_new_session=True, restore_signals=not ignore_sigpipe,
            preexec_fn=_set_parent_death_signal if _prctl is not None else None)

    popen = _spawner.submit(start).result()
    child = Child(name, popen)
    threading.Thread(target=_drain, args=(child, child_log or log), name=f"{name}-output",
                     daemon=True).start()
    log.info("Started %s (pid %d)", name, popen.pid)
    return child


def _drain(child: Child, child_log: logging.Logger) -> None:
    # An unread PIPE blocks the child once full: read every line, keep a bounded tail for errors.
    assert child.popen.stdout is not None
    for raw in child.popen.stdout:
        line = raw.decode("utf-8", "replace").rstrip()
        child.output_tail.append(line)
        if "GET /health" not in line:  # readiness polls would flood the log
            child_log.debug("[%s] %s", child.name, line)
    child.popen.stdout.close()


def stop(child: Child, grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM the child's process group, wait up to `grace`, then SIGKILL and reap. Safe to call twice."""
    if child.popen.returncode is not None:
        return
    tree = _descendants(child.pid)
    _signal_group(child.pid, signal.SIGTERM)
    try:
        child.popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) did not respond to SIGTERM, using SIGKILL", child.name, child.pid)
        _signal_group(child.pid, signal.SIGKILL)
        child.popen.wait()
    _kill_leftovers(tree)
    log.info("Stopped %s (pid %d, exit %s)", child.name, child.pid, child.popen.returncode)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the child leads its own group (start_new_session)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def _descendants(pid: int) -> list:
    import psutil  # lazily: psutil is not needed to start a child

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _kill_leftovers(processes: list) -> None:
    """Children that left the group (setsid of their own) are killed one by one."""
    import psutil

    for proc in processes:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=1.0)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


_port_lock = threading.Lock()  # guards _recently_chosen
_recently_chosen: collections.deque = collections.deque(maxlen=16)


def find_free_port(host: str = "127.0.0.1", port_range: tuple[int, int] = PORT_RANGE) -> int:
    """First bindable port in the C++ range. A port handed out moments ago is skipped, since its
    child may not have bound it yet. Raises OSError when the range is exhausted."""
    with _port_lock:
        for port in range(port_range[0], port_range[1] + 1):
            if port not in _recently_chosen and port_is_free(port, host):
                _recently_chosen.append(port)
                return port
    raise OSError(f"No free port in {port_range[0]}-{port_range[1]}")
