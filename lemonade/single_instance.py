"""One server per machine (C++ `include/lemon/single_instance.h`) and the PID file the CLI finds it by.

Linux twin of the C++ guard: an exclusive non-blocking `flock` on `<runtime dir>/lemonade_<App>.lock`
(`Router` for whoever serves HTTP, `Server` for `lemonade-server serve|run`), kept for the life of the
process. The kernel drops the lock when the process dies, however it dies, so a crash never leaves a
stale lock behind. The runtime dir is `/tmp` unless `LEMONADE_RUNTIME_DIR` says otherwise
(`path_utils.runtime_dir`).

The PID file (`lemonade-router.pid`, C++ `tray_app.cpp` get_server_info, cli.md §5.1) holds
`<pid>\\n<port>\\n`; we add a third line with the host, which C++ readers ignore (they read two ints).
Only the standard library is imported here, so `--help`/`--version` stay light.
"""
from __future__ import annotations

import errno
import fcntl
import os
from typing import NamedTuple
from pathlib import Path

from lemonade.utils import path_utils
from lemonade.utils.json_utils import write_atomic

ROUTER = "Router"
SERVER = "Server"
PID_FILE_NAME = "lemonade-router.pid"

# Messages and exit code of the C++ guard (server/main.cpp L33-37, tray_app.cpp L290-299).
ROUTER_BUSY_MESSAGE = ("Error: Another instance of lemonade-router is already running.\n"
                       "Only one instance can run at a time.\n")
LOCK_EXIT_CODE = 1

_held: dict[str, int] = {}  # app name -> fd of the lock we hold; only the main thread touches it


def lock_path(app_name: str) -> Path:
    return path_utils.runtime_dir() / f"lemonade_{app_name}.lock"


def server_busy_message(prog: str) -> str:
    return (f"Error: Another instance of {prog} serve/run is already running.\n"
            "Only one persistent server can run at a time.\n\n"
            f"To check server status: {prog} status\n"
            f"To stop the server: {prog} stop\n")


def is_another_instance_running(app_name: str) -> bool:
    """Take the lock for `app_name` and keep it until `release` or exit. True if another process holds
    it. Idempotent: asking again for a lock we hold answers False. Never blocks.

    As in C++, a lock file that cannot be opened (another user's, mode 0644) lets the check pass."""
    if app_name in _held:
        return False
    fd, error = _try_lock(app_name)
    if fd is not None:
        _held[app_name] = fd
        return False
    return error is not None and error.errno in (errno.EWOULDBLOCK, errno.EAGAIN)


def _try_lock(app_name: str) -> tuple[int | None, OSError | None]:
    """Take the lock without waiting: (fd holding it, None); (None, None) when the lock file cannot
    be opened; (None, the error) when flock refuses."""
    try:
        fd = os.open(lock_path(app_name), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o666)
    except OSError:
        return None, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        return None, e
    return fd, None


def release(app_name: str) -> None:
    """Drop a lock we hold (a no-op otherwise). The file stays, as in C++."""
    fd = _held.pop(app_name, None)
    if fd is not None:
        os.close(fd)


def lock_is_free(app_name: str) -> bool:
    """Whether nobody holds the lock (takes and drops it at once; C++ `stop` does the same, L1290)."""
    if app_name in _held:
        return False
    fd, error = _try_lock(app_name)
    if fd is not None:
        os.close(fd)  # closing releases the flock at once
    return error is None


# -- PID file ----------------------------------------------------------------------------------


class ServerInfo(NamedTuple):  # not a dataclass: `dataclasses` costs ~12 ms of CLI start-up
    pid: int
    port: int
    host: str = ""  # empty when the file came from a C++ client (two lines only)


def pid_file_path() -> Path:
    return path_utils.runtime_dir() / PID_FILE_NAME


def write_pid_file(port: int, host: str) -> None:
    """Write `<pid>\\n<port>\\n<host>\\n` for this process: temp file + rename, so a reader never sees
    half a file."""
    write_atomic(pid_file_path(), f"{os.getpid()}\n{port}\n{host}\n")


def remove_pid_file_if_ours() -> None:
    """Remove the PID file if it names this process (a newer server's file is left alone)."""
    info = _read_pid_file()
    if info is not None and info.pid == os.getpid():
        _unlink(pid_file_path())


def _read_pid_file() -> ServerInfo | None:
    try:
        fields = pid_file_path().read_text().split()
    except OSError:
        return None
    try:
        return ServerInfo(int(fields[0]), int(fields[1]), fields[2] if len(fields) > 2 else "")
    except (IndexError, ValueError):
        return ServerInfo(0, 0)  # unreadable: treated as stale below


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass  # another user's file in sticky /tmp: C++ `remove()` fails silently too


def _is_alive_not_zombie(pid: int) -> bool:
    """C++ `is_process_alive_not_zombie` (tray_app.cpp L156-182): kill(pid, 0), then the state in
    /proc/<pid>/stat. Any kill error, EPERM included, means not ours to talk to."""
    if pid <= 0:  # kill(0, 0) would probe our own process group
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (not Linux): kill said it exists
    close = stat.rfind(")")
    return not (close != -1 and close + 2 < len(stat) and stat[close + 2] == "Z")


def find_server() -> ServerInfo | None:
    """Discovery as C++ B on Linux (cli.md §5.1): the PID file names a live process, or the stale
    file is removed and the answer is None. No HTTP probe."""
    info = _read_pid_file()
    if info is None:
        return None
    if _is_alive_not_zombie(info.pid):
        return info
    _unlink(pid_file_path())
    return None
