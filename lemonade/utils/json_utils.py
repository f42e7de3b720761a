"""JSON files and bodies, and the one atomic file writer (C++ `utils/json_utils.cpp`).

Files are written atomically (temp file in the same directory, fsync, rename) so a crash never leaves
a half-written registry; `write_atomic` is the only temp-and-rename writer of the program (the HF cache's
refs and tree listings, the PID file, the JSON files). Bodies we build are compact with sorted keys and
raw UTF-8, the bytes nlohmann::json produces for the C++ server (spec http-api.md §0).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def dumps(obj: Any) -> bytes:
    """Serialise like the C++ server: compact, keys sorted, non-ASCII as raw UTF-8."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")


def read_json(path: Path, default: Any = None) -> Any:
    """Parse a JSON file; return `default` if it does not exist. Raises ValueError on bad JSON."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def write_atomic(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Replace `path` with `data` (a str is written as UTF-8); readers see the old or the new file,
    never a mix. Blocks on the file system; raises OSError, after removing the temp file.

    The temp file has a unique name in the same directory (so the rename stays on one file system and
    two writers never share one), is fsynced, renamed over `path`, and the directory is fsynced.
    `mode`: the file's permission bits; None gives what `open()` gives, 0o666 less the umask (the
    kernel applies it at creation: the umask is never read or set). Parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        with open(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Replace `path` with `obj` as JSON (raw UTF-8, a final newline) through `write_atomic`."""
    write_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
