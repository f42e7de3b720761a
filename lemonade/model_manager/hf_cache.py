"""The Hugging Face cache layout, shared with `huggingface_hub` both ways (spec hf-hub-protocol.md §4).

    <cache>/CACHEDIR.TAG
    <cache>/.locks/models--org--name/<etag>.lock
    <cache>/models--org--name/blobs/<etag>[.incomplete]
    <cache>/models--org--name/refs/<revision>             40 hex, no newline
    <cache>/models--org--name/snapshots/<commit>/<path>   relative symlink to ../../blobs/<etag>
    <cache>/models--org--name/trees/<commit>.json         the full listing of the commit

Only layout and file-system helpers live here; no network.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lemonade.error_types import DownloadError, FileError, InvalidRequestError
from lemonade.model_manager.hf_select import Selection, is_gguf, split_checkpoint
from lemonade.utils.json_utils import write_atomic
from lemonade.utils.path_utils import hf_cache_dir, shown_path

log = logging.getLogger(__name__)

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")  # only full lowercase shas are commits (FD:81)
# huggingface_hub's validate_repo_id: optional namespace, then a name of word chars, '-' and '.'.
REPO_ID_RE = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]{1,96}$")
CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by huggingface_hub.\n"
    "# For information about cache directory tags, see:\n"
    "#\thttps://bford.info/cachedir/\n"
)
DRIVE_RE = re.compile(r"^[A-Za-z]:")  # "C:..." would be absolute on Windows
TREE_FORMAT_VERSION = 1  # huggingface_hub `_tree_cache.py` TREE_CACHE_FORMAT_VERSION


def check_repo_id(repo_id: str) -> str:
    """Return `repo_id` if it can only name a folder inside the cache; else InvalidRequestError."""
    if not REPO_ID_RE.match(repo_id or "") or ".." in repo_id or "--" in repo_id:
        raise InvalidRequestError(f"Invalid Hugging Face repository id: {repo_id!r}")
    return repo_id


def check_repo_path(path: str) -> str:
    """Reject server-sent or user-given file paths that would escape the snapshot (FD `_local_folder`)."""
    parts = path.split("/")
    if (not path or path.startswith("/") or "\\" in path or "\0" in path or DRIVE_RE.match(path)
            or any(p in ("", ".", "..") for p in parts)):
        raise InvalidRequestError(f"Invalid file path in Hugging Face repository: {path!r}")
    return path


def check_revision(revision: str) -> str:
    """A revision names refs/<revision>; `refs/pr/1` is fine, `..` or absolute paths are not."""
    if revision and revision != "main":
        check_repo_path(revision)
    return revision


@dataclass(frozen=True)
class RepoDir:
    """The cache folder of one model repo; every path of the layout is derived here."""

    cache: Path
    repo_id: str

    @classmethod
    def of(cls, repo_id: str, cache: Path | None = None) -> "RepoDir":
        return cls(Path(cache) if cache is not None else hf_cache_dir(), check_repo_id(repo_id))

    @property
    def folder_name(self) -> str:
        return "models--" + self.repo_id.replace("/", "--")  # FD repo_folder_name

    @property
    def path(self) -> Path:
        return self.cache / self.folder_name

    def blob(self, etag: str) -> Path:
        return self.path / "blobs" / etag

    def snapshot(self, commit: str) -> Path:
        return self.path / "snapshots" / commit

    def pointer(self, commit: str, file: str) -> Path:
        return self.snapshot(commit) / check_repo_path(file)

    def ref(self, revision: str) -> Path:
        return self.path / "refs" / check_revision(revision)

    def lock(self, etag: str) -> Path:
        return self.cache / ".locks" / self.folder_name / f"{etag}.lock"

    def tree(self, commit: str) -> Path:
        return self.path / "trees" / f"{commit}.json"


def read_ref(repo: RepoDir, revision: str) -> str | None:
    """The commit `refs/<revision>` names, read exactly (no strip: HF readers don't strip either)."""
    try:
        commit = repo.ref(revision).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if COMMIT_RE.match(commit) else None


def write_ref(repo: RepoDir, revision: str, commit: str) -> None:
    """Point `refs/<revision>` at `commit` (atomically, no newline); skipped if unchanged."""
    if revision == commit or read_ref(repo, revision) == commit:
        return
    write_atomic(repo.ref(revision), commit)


def ensure_cache_dirs(repo: RepoDir, commit: str) -> None:
    """Create blobs/, the snapshot dir (before any ref points at it) and CACHEDIR.TAG."""
    (repo.path / "blobs").mkdir(parents=True, exist_ok=True)
    repo.snapshot(commit).mkdir(parents=True, exist_ok=True)
    tag = repo.cache / "CACHEDIR.TAG"
    if not tag.exists():
        with contextlib.suppress(OSError):  # the tag is a courtesy to backup tools, never fatal
            tag.write_text(CACHEDIR_TAG)


@contextlib.contextmanager
def blob_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `.locks/<repo>/<etag>.lock` (blocks). The file is never deleted,
    because unlinking a lock file someone else is waiting on lets two writers in (FD:1249-1273)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def link_pointer(blob: Path, pointer: Path) -> None:
    """Make `pointer` a relative symlink to `blob` (FD `_create_symlink`), replacing a stale one."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(blob, pointer.parent)
    if pointer.is_symlink() and os.readlink(pointer) == target:
        return
    tmp = pointer.with_name(f".{pointer.name}.{secrets.token_hex(4)}.tmp")
    try:
        os.symlink(target, tmp)
    except OSError:  # a file system without symlinks: copy, like huggingface_hub does for a shared blob
        shutil.copyfile(blob, tmp)
    os.replace(tmp, pointer)


def is_complete_file(path: Path) -> bool:
    """A regular file after following links (a dangling link or a directory is not)."""
    return path.is_file()


def snapshot_files(snapshot: Path) -> list[str]:
    """Repo paths of the complete files under a snapshot dir, sorted (links followed)."""
    if not snapshot.is_dir():
        return []
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def read_tree(repo: RepoDir, commit: str) -> dict[str, dict] | None:
    """The full listing `trees/<commit>.json` (written by us or by huggingface_hub), or None."""
    try:
        data = json.loads(repo.tree(commit).read_text(encoding="utf-8"))
        if data.get("format_version") == TREE_FORMAT_VERSION and isinstance(data.get("files"), dict):
            return data["files"]
    except (OSError, ValueError, AttributeError):
        pass
    return None


def write_tree(repo: RepoDir, commit: str, files: dict[str, dict]) -> None:
    """Write the full listing of `commit` in huggingface_hub's format; the caller guarantees it is
    complete (HF treats it as the whole repo: a partial one would make it skip files)."""
    path = repo.tree(commit)
    if path.exists():
        return
    data = {"format_version": TREE_FORMAT_VERSION, "files": {k: files[k] for k in sorted(files)}}
    write_atomic(path, json.dumps(data, indent=1))


def delete_repo_cache(repo_id: str) -> Path:
    """Remove `<cache>/models--org--name` and return its path. Blocks on the file system.

    Raises InvalidRequestError for an id that could name anything but a direct child of the cache
    ("..", absolute, backslashes, or a repo folder that is a symlink leading elsewhere), and FileError
    when the removal fails. A missing folder is not an error: it is logged and the path returned,
    matching C++ B's delete_model ("missing -> warning only", router-and-backends.md §9.5).
    """
    repo = RepoDir.of(repo_id)
    path = repo.path
    if path.is_symlink() or path.resolve().parent != repo.cache.resolve():
        raise InvalidRequestError(f"Refusing to delete {shown_path(path)}: it resolves outside the Hugging Face cache")
    if not path.exists():
        log.warning("Nothing to delete: %s does not exist", path)
        return path
    try:
        shutil.rmtree(path)
    except OSError as e:
        raise FileError(f"Failed to delete {shown_path(path)}: {e.strerror or e}") from e
    log.info("Deleted %s", path)
    return path


# ---------------------------------------------------------------- what is in the cache (no network)

def snapshot_dir(checkpoint: str, revision: str = "main") -> Path | None:
    """The snapshot `refs/<revision>` points to, if it exists."""
    repo = RepoDir.of(split_checkpoint(checkpoint)[0])
    commit = revision if COMMIT_RE.match(revision) else read_ref(repo, revision)
    if commit and repo.snapshot(commit).is_dir():
        return repo.snapshot(commit)
    return None


def cached_snapshot(repo: RepoDir, revision: str) -> Path:
    for snap in candidate_snapshots(repo, revision):
        return snap
    raise DownloadError(f"No snapshot of {repo.repo_id} in the Hugging Face cache")


def candidate_snapshots(repo: RepoDir, revision: str) -> list[Path]:
    """The snapshot the ref names; without a usable ref, every snapshot (C++ A wrote `snapshots/main`,
    and the embedded models' snapshot has no ref)."""
    commit = revision if COMMIT_RE.match(revision) else read_ref(repo, revision)
    if commit and repo.snapshot(commit).is_dir():
        return [repo.snapshot(commit)]
    root = repo.path / "snapshots"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def checkpoint_files(checkpoint: str, select: Selection, revision: str = "main") -> list[Path] | None:
    """The cached files a pull of `checkpoint` with `select` would fetch, first the one a backend
    loads; None unless every one of them is complete. This is the project's one answer to "is this
    model downloaded?". No network.

    The file list is the commit's full listing (`trees/<commit>.json`, written by us or by
    huggingface_hub) when present, else the files in the snapshot; a sharded GGUF counts only with
    all its shards. Partial downloads live in blobs/*.incomplete, so they never count.
    """
    repo_id, variant = split_checkpoint(checkpoint)
    try:
        repo = RepoDir.of(repo_id)
    except InvalidRequestError:
        return None  # a hand-edited registry entry names no folder of the cache: not downloaded
    for snap in candidate_snapshots(repo, revision):
        present = set(snapshot_files(snap))
        tree = read_tree(repo, snap.name)
        listing = list(tree) if tree is not None else sorted(present)
        try:
            wanted = select(listing, variant, repo_id)
        except DownloadError:
            continue
        if wanted and all(f in present for f in wanted) and _shards_complete(wanted, present):
            return [snap / f for f in wanted]
    return None


def missing_files(checkpoint: str, select: Selection, revision: str = "main") -> list[str]:
    """Which files a pull would still have to fetch, as far as the cache can tell without the network:
    from the cached listing of the commit, else from the variant when it names a file; [] when the
    cache knows nothing of the repo's files (the caller then names the checkpoint)."""
    repo_id, variant = split_checkpoint(checkpoint)
    try:
        repo = RepoDir.of(repo_id)
    except InvalidRequestError:
        return []
    for snap in candidate_snapshots(repo, revision):
        present = set(snapshot_files(snap))
        tree = read_tree(repo, snap.name)
        try:
            wanted = select(list(tree) if tree is not None else sorted(present), variant, repo_id)
        except DownloadError:
            continue
        return [f for f in wanted if f not in present]
    return [variant] if is_gguf(variant) else []


def is_checkpoint_downloaded(checkpoint: str, select: Selection, revision: str = "main") -> bool:
    return checkpoint_files(checkpoint, select, revision) is not None


def inside_cache(relative: str, cache: Path | None = None) -> Path | None:
    """`<cache>/<relative>` resolved (links followed), or None when it would lie outside the cache
    (a hand-edited or hostile registry entry must not reach other files)."""
    root = (cache or hf_cache_dir()).resolve()
    try:
        path = (root / relative.replace("\\", "/")).resolve()
    except (OSError, ValueError):
        return None
    return path if root in path.parents else None


_SHARD_RE = re.compile(r"^(?P<stem>.*)-(?P<i>\d{5})-of-(?P<n>\d{5})(?P<ext>\.gguf)$", re.IGNORECASE)


def _shards_complete(wanted: list[str], present: set[str]) -> bool:
    """`x-00001-of-00003.gguf` needs its two siblings too (llama.cpp split naming)."""
    for f in wanted:
        m = _SHARD_RE.match(f)
        if m:
            n = int(m["n"])
            for i in range(1, n + 1):
                if f"{m['stem']}-{i:05d}-of-{m['n']}{m['ext']}" not in present:
                    return False
    return True
