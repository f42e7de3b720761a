"""Resolve a registry entry to files in the HF cache (C++ B `resolve_model_path`, spec §9.2).

Reads both layouts: the hub's (snapshots are symlinks into blobs, `refs/main` names the commit) and
the C++ binary's (real files under `snapshots/<sha>/`). When `refs/main` points at an existing snapshot
that snapshot is searched first, so an older revision left in the cache never shadows the current one.
"""
from __future__ import annotations

from pathlib import Path

from lemonade.model_manager.hf_cache import RepoDir
from lemonade.model_manager.registry import ModelInfo
from lemonade.utils import path_utils


def repo_dir(repo_id: str, cache_dir: Path | None = None) -> Path:
    """`<cache>/models--org--name` (the layout rule lives in `hf_cache.RepoDir`). Unchecked on purpose:
    resolving a hand-edited registry entry must not raise; `/` never survives into the folder name."""
    return RepoDir(cache_dir or path_utils.hf_cache_dir(), repo_id).path


def _current_snapshot(directory: Path) -> Path | None:
    try:
        commit = (directory / "refs" / "main").read_text()
    except OSError:
        return None
    snapshot = directory / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


def gguf_files(root: Path) -> list[Path]:
    """Regular files (links followed) whose name contains `.gguf` and not `mmproj`, sorted by path."""
    found = [p for p in root.rglob("*") if ".gguf" in p.name and "mmproj" not in p.name.lower()
             and p.is_file()]
    return sorted(found, key=lambda p: str(p))


def _pick_variant(files: list[Path], variant: str, base: Path) -> Path | None:
    if not files:
        return None
    if variant in ("", "*"):
        return files[0]
    if ".gguf" in variant:
        exact = [f for f in files if f.name == Path(variant).name]
        return exact[0] if exact else None
    suffix = variant.lower() + ".gguf"
    for f in files:
        if f.name.lower().endswith(suffix):
            return f
    folder = variant.lower() + "/"
    for f in files:
        if folder in str(f.relative_to(base)).lower():
            return f
    return files[0]  # C++ falls back to the first file


def resolve_gguf(info: ModelInfo, cache_dir: Path | None = None) -> Path | None:
    """The GGUF llama-server should load, or None when none is in the cache."""
    directory = repo_dir(info.repo_id, cache_dir)
    if not directory.is_dir():
        return None
    snapshot = _current_snapshot(directory)
    for root in ([snapshot] if snapshot else []) + [directory / "snapshots", directory]:
        if root.is_dir():
            picked = _pick_variant(gguf_files(root), info.variant, root)
            if picked:
                return picked
    return None


def resolve_mmproj(info: ModelInfo, cache_dir: Path | None = None) -> Path | None:
    """The file named exactly `info.mmproj` anywhere under the repo folder (C++ §8.5)."""
    if not info.mmproj:
        return None
    directory = repo_dir(info.repo_id, cache_dir)
    if not directory.is_dir():
        return None
    matches = sorted(p for p in directory.rglob(info.mmproj) if p.is_file())
    return matches[0] if matches else None


def resolve_local_upload(info: ModelInfo, cache_dir: Path | None = None) -> Path | None:
    """`source == "local_upload"`: the checkpoint is a path relative to the cache (C++ §9.2).
    None when it would point outside the cache (a hand-edited registry must not reach other files)."""
    cache = (cache_dir or path_utils.hf_cache_dir()).resolve()
    path = (cache / info.checkpoint.replace("\\", "/")).resolve()
    return path if cache in path.parents else None
