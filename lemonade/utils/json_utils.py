"""JSON files and bodies (C++ `utils/json_utils.cpp`).

Files are written atomically (temp file in the same directory, fsync, rename) so a crash never leaves
a half-written registry. Bodies we build are compact with sorted keys and raw UTF-8, the bytes
nlohmann::json produces for the C++ server (spec http-api.md §0).
"""
from __future__ import annotations

import json
import os
import tempfile
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


def write_json_atomic(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Replace `path` with `obj` as JSON; readers see the old or the new file, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


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
