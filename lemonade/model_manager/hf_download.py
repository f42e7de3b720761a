"""The Hugging Face downloader: stdlib + `requests`, sharing its cache with `huggingface_hub`.

C++ twin: `model_manager.cpp` `download_from_huggingface` (L998-1170). The C++ wrote real files into
`snapshots/<sha>/`; we write the standard layout (blobs named by etag, relative symlinks, refs), so
`huggingface_hub` and lemonade each see what the other downloaded (spec hf-hub-protocol.md §4, §6).
A file goes to `blobs/<etag>.incomplete`, resumes with Range after any interruption, and is renamed
into place only after its size and hash match the etag: a partial file is never reported downloaded.
"""
from __future__ import annotations

import hashlib
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urljoin, urlsplit

import requests

from lemonade import __version__
from lemonade.error_types import DownloadError, NetworkError
from lemonade.model_manager.hf_cache import (
    COMMIT_RE, RepoDir, blob_lock, cached_snapshot, check_repo_path, check_revision, delete_repo_cache,
    ensure_cache_dirs, is_checkpoint_downloaded, is_complete_file, link_pointer, snapshot_dir, write_ref,
    write_tree)
from lemonade.model_manager.hf_select import Selection, split_checkpoint
from lemonade.utils import download
from lemonade.utils.http_client import session_for
from lemonade.utils.path_utils import hf_download_timeout, hf_endpoint, hf_etag_timeout, hf_token, is_offline

__all__ = ["DownloadProgress", "ProgressCallback", "download_checkpoint", "is_checkpoint_downloaded",
           "delete_repo_cache", "snapshot_dir"]

log = logging.getLogger(__name__)

MAX_REDIRECTS = 20
ETAG_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}$")
HUB_ORIGINS = ("https://huggingface.co", "https://hf.co", "https://hub-ci.huggingface.co")
USER_AGENT = f"lemonade/{__version__}; python/{sys.version.split()[0]}"  # sent on every hub/CDN request


@dataclass
class DownloadProgress:
    """One event of a pull; the CLI bar, SSE `progress` events and log lines are views of it."""

    file: str          # repo path of the file being downloaded
    file_index: int    # 1-based
    file_count: int
    bytes_done: int    # of this file
    bytes_total: int   # of this file
    total_done: int    # over all files of this pull
    total_bytes: int
    stage: str = "download"  # "install": the llama.cpp release a load fetches first (same event stream)

    @property
    def percent(self) -> float:
        return 100.0 * self.total_done / self.total_bytes if self.total_bytes else 100.0


ProgressCallback = Callable[[DownloadProgress], None]


@dataclass
class FileMeta:
    """What the HEAD of a resolve URL says about one file (spec §1 "HEAD")."""

    commit: str
    etag: str
    size: int
    location: str


# ---------------------------------------------------------------- HTTP plumbing

def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _is_hub(url: str) -> bool:
    """Hub origins get the token; anything else (a CDN's signed URL) never does (FD:1812-1822)."""
    return _origin(url) in {_origin(hf_endpoint()), *HUB_ORIGINS}


def _headers(url: str) -> dict[str, str]:
    """Headers of every request to `url`: our User-Agent, identity encoding (byte counts are the
    file's), and the token when `url` is the hub."""
    headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
    token = hf_token()
    if token and _is_hub(url):
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _http_error(response: requests.Response, what: str) -> DownloadError:
    """One error per response, classified by header as huggingface_hub does (H:826-996)."""
    code = response.headers.get("X-Error-Code", "")
    message = response.headers.get("X-Error-Message", "")
    status = response.status_code
    if status == 401 or code in ("RepoNotFound", "GatedRepo"):
        hint = "repository not found, private or gated (set HF_TOKEN to a token with access)"
        if message == "Invalid credentials in Authorization header":
            hint = "invalid HF_TOKEN"
    elif code == "RevisionNotFound":
        hint = "revision not found"
    elif code == "EntryNotFound":
        hint = "file not found"
    else:
        hint = message or response.reason or ""
    return DownloadError(f"{what} (status: {status}): {hint}",
                         {"status": status, "error_code": code, "url": response.url})


def _request(method: str, url: str, what: str, **kwargs) -> requests.Response:
    """A metadata request, retried with bounded backoff on 408/429/5xx and on connections that broke.
    A host that cannot be reached at all (no DNS, refused, connect timeout: `download.network_cause`)
    fails at once, naming the host and the cause. Each retry is one log line, which names the cause
    the first time and whenever it changes. Blocks; raises DownloadError, NetworkError."""
    backoff = download.BACKOFF
    timeout = hf_etag_timeout()
    origin = _origin(url)
    shown = None
    for attempt in range(len(backoff) + 1):
        response = None
        try:
            response = session_for(url).request(method, url, headers=_headers(url), timeout=(timeout, timeout),
                                                **kwargs)
            if response.status_code not in download.RETRY_STATUSES:
                return response
            error: Exception = _http_error(response, what)
            cause = f"HTTP {response.status_code}"
        except download.RETRYABLE_ERRORS as e:
            error = e
            cause, retryable = download.network_cause(e)
            if not retryable:
                raise _unreachable(origin, cause) from e
        if attempt == len(backoff):
            break
        delay = download.retry_delay(attempt, response)
        step = f"retry {attempt + 1}/{len(backoff)} in {delay:g} s"
        if cause != shown:
            log.warning("%s: %s (%s); %s", what, cause, origin, step)
            shown = cause
        else:
            log.warning("%s: %s", what, step)
        time.sleep(delay)
    if isinstance(error, DownloadError):
        raise error
    raise NetworkError(f"{what}: {cause} ({origin}, {len(backoff) + 1} attempts)") from error


def _unreachable(origin: str, cause: str) -> NetworkError:
    where = f"the Hugging Face hub at {origin}" if _is_hub(origin) else origin
    return NetworkError(f"Cannot reach {where}: {cause}. Set HF_ENDPOINT to use a mirror, or "
                        "LEMONADE_OFFLINE=1 to use only the models already downloaded.",
                        {"host": origin, "cause": cause})


# ---------------------------------------------------------------- repo info and file metadata

@dataclass
class RepoInfo:
    commit: str
    siblings: list[str]
    tree: dict[str, dict] | None  # the listing in trees/<commit>.json form, when the API gave blob data


def fetch_repo_info(repo_id: str, revision: str = "main") -> RepoInfo:
    """`GET {ep}/api/models/<repo>[/revision/<rev>]?blobs=true` (spec §1). Blocks; raises Download/NetworkError."""
    url = f"{hf_endpoint()}/api/models/{repo_id}"
    if revision != "main":  # the C++ asked the bare URL; a pinned revision needs the long form
        url += f"/revision/{quote(revision, safe='')}"
    response = _request("GET", url, "Failed to fetch model info from Hugging Face API", params={"blobs": "true"})
    if response.status_code != 200:
        raise _http_error(response, "Failed to fetch model info from Hugging Face API")
    try:
        data = response.json()
        commit = data["sha"]
        siblings = [s for s in data["siblings"] if isinstance(s, dict) and "rfilename" in s]
    except (ValueError, KeyError, TypeError) as e:
        raise DownloadError("Invalid model info response from Hugging Face API") from e
    if not isinstance(commit, str) or not COMMIT_RE.match(commit):
        raise DownloadError(f"Invalid model info response from Hugging Face API: sha {commit!r}")
    names = [check_repo_path(s["rfilename"]) for s in siblings]
    tree: dict[str, dict] | None = {}
    for s in siblings:
        if not isinstance(s.get("size"), int) or not isinstance(s.get("blobId"), str):
            tree = None  # the listing is only cached when it is complete (spec §4 trees/)
            break
        entry = {"size": s["size"], "blob_id": s["blobId"]}
        lfs = s.get("lfs")
        if isinstance(lfs, dict) and "sha256" in lfs:
            entry.update(lfs_sha256=lfs["sha256"], lfs_size=lfs.get("size", s["size"]))
        tree[s["rfilename"]] = entry
    return RepoInfo(commit, names, tree)


def _normalize_etag(value: str) -> str:
    """Strip a weak `W/` and the quotes (FD `_normalize_etag`)."""
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')


def head_file(repo_id: str, commit: str, file: str) -> FileMeta:
    """HEAD the resolve URL, following hub-internal redirects only; a redirect to another host (the
    CDN) is itself the answer (spec §1 "HEAD"). Blocks; raises DownloadError/NetworkError."""
    url = f"{hf_endpoint()}/{repo_id}/resolve/{commit}/{quote(file)}"
    what = f"Failed to get metadata of {file} from Hugging Face"
    for _ in range(MAX_REDIRECTS):
        response = _request("HEAD", url, what, allow_redirects=False)
        location = response.headers.get("Location")
        if not (300 <= response.status_code < 400 and location):
            break
        target = urljoin(url, location)
        if _origin(target) != _origin(url) and not _is_hub(target):
            break
        url = target
    if response.status_code >= 400:
        raise _http_error(response, what)
    h = response.headers
    etag = _normalize_etag(h.get("X-Linked-Etag") or h.get("ETag") or "")
    size = h.get("X-Linked-Size") or (h.get("Content-Length") if response.status_code < 300 else None)
    commit_seen = h.get("X-Repo-Commit", "")
    if not etag or not commit_seen or not (size or "").isdigit():
        raise DownloadError(f"{what}: the hub answered without X-Repo-Commit, ETag or size")
    if not ETAG_RE.match(etag):  # it becomes a file name under blobs/
        raise DownloadError(f"{what}: unusable ETag {etag!r}")
    location = urljoin(url, h["Location"]) if 300 <= response.status_code < 400 else url
    return FileMeta(commit_seen, etag, int(size), location)


# ---------------------------------------------------------------- one blob

def _hash_for(etag: str, size: int):
    """A factory of the hash the etag is: sha256 for LFS (64 hex), git blob sha1 for regular files
    (40 hex); None for an etag of another shape (size check only)."""
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return hashlib.sha256
    if re.fullmatch(r"[0-9a-f]{40}", etag):
        def git_sha1():
            h = hashlib.sha1()
            h.update(b"blob %d\0" % size)
            return h
        return git_sha1
    return None


def _fetch_blob(repo_id: str, file: str, meta: FileMeta, blob: Path, on_bytes: Callable[[int], None]) -> None:
    """Stream one file into `<blob>.incomplete` (resumable), verify it against the etag, rename it to
    `blob` (download.FileDownload). Blocks; the caller holds the blob lock."""
    hasher = _hash_for(meta.etag, meta.size)

    def refresh(url: str) -> str | None:
        # A signed CDN URL that expired answers 403: ask the hub for a fresh one, once (spec §6 step 7).
        return None if _is_hub(url) else head_file(repo_id, meta.commit, file).location

    timeout = hf_download_timeout()
    download.FileDownload(
        meta.location, blob, name=file, size=meta.size, headers=_headers, timeout=(timeout, timeout),
        progress=lambda done, total: on_bytes(done), hasher=hasher, digest=meta.etag if hasher else None,
        refresh_url=refresh, http_error=lambda r: _http_error(r, f"Failed to download {file}")).run()


# ---------------------------------------------------------------- a whole pull

class _Progress:
    """Turns byte counts into DownloadProgress events for one pull."""

    def __init__(self, callback: ProgressCallback | None, files: list[str], sizes: list[int]):
        self.callback, self.files, self.sizes = callback, files, sizes
        self.total_bytes, self.total_done = sum(sizes), 0
        self.index, self.done = 0, 0

    def start(self, index: int) -> None:
        self.index, self.done = index, 0

    def set(self, done: int) -> None:
        """`done` bytes of the current file are on disk (fewer than before when a transfer restarts)."""
        self.total_done += done - self.done
        self.done = done
        if self.callback:
            i = self.index
            self.callback(DownloadProgress(self.files[i], i + 1, len(self.files), self.done, self.sizes[i],
                                           self.total_done, self.total_bytes))


def download_checkpoint(checkpoint: str, select: Selection, progress: ProgressCallback | None = None,
                        revision: str = "main") -> Path:
    """Download the files of `checkpoint` ("org/repo[:variant]") that `select` picks (an
    `hf_select` selection, named by the recipe's spec) into the HF cache and return the snapshot dir.
    Blocks for the whole download; safe to call concurrently (blob locks).

    Offline (LEMONADE_OFFLINE=1, HF_HUB_OFFLINE) sends no request: returns the cached snapshot or
    raises DownloadError. Raises InvalidRequestError (bad id/path), DownloadError (HTTP errors, §9.4
    selection errors, checksum, disk space), NetworkError (hub unreachable after retries).
    A `progress` callback that raises cancels the pull with its exception; the partial file stays in
    blobs/<etag>.incomplete and the next pull resumes it (C++: a callback returning false cancels).
    """
    repo_id, variant = split_checkpoint(checkpoint)
    repo = RepoDir.of(repo_id)
    check_revision(revision)
    if is_offline():
        if is_checkpoint_downloaded(checkpoint, select, revision):
            return cached_snapshot(repo, revision)
        raise DownloadError(f"Offline mode is enabled (LEMONADE_OFFLINE / HF_HUB_OFFLINE) and {checkpoint} "
                            "is not in the Hugging Face cache")
    try:
        info = fetch_repo_info(repo_id, revision)
    except NetworkError:
        if is_checkpoint_downloaded(checkpoint, select, revision):  # spec STYLE hf #6
            log.warning("Hugging Face is unreachable; using the cached %s", checkpoint)
            return cached_snapshot(repo, revision)
        raise
    files = select(info.siblings, variant, repo_id)
    commit = info.commit
    ensure_cache_dirs(repo, commit)
    write_ref(repo, revision, commit)  # after the snapshot dir exists (FD:1233-1242)
    if info.tree is not None:
        write_tree(repo, commit, info.tree)
    metas: list[FileMeta | None] = []
    sizes: list[int] = []
    for file in files:  # metadata first: skip what is present, learn every size for the totals
        pointer = repo.pointer(commit, file)
        meta = None if is_complete_file(pointer) else head_file(repo_id, commit, file)
        metas.append(meta)
        sizes.append(meta.size if meta else pointer.stat().st_size)
    bar = _Progress(progress, files, sizes)
    for i, (file, meta) in enumerate(zip(files, metas)):
        bar.start(i)
        if meta is None:
            bar.set(sizes[i])
            continue
        _download_file(repo, commit, file, meta, bar)
    log.info("Downloaded %s (%d files, %.1f MB) into %s", checkpoint, len(files), bar.total_bytes / 1e6,
             repo.snapshot(commit))
    return repo.snapshot(commit)


def _download_file(repo: RepoDir, commit: str, file: str, meta: FileMeta, bar: _Progress) -> None:
    blob = repo.blob(meta.etag)
    with blob_lock(repo.lock(meta.etag)):
        if not is_complete_file(blob):  # checked again under the lock: another pull may have won
            log.info("Downloading %s/%s (%.1f MB)", repo.repo_id, file, meta.size / 1e6)
            _fetch_blob(repo.repo_id, file, meta, blob, bar.set)
        else:
            bar.set(meta.size)
        link_pointer(blob, repo.pointer(commit, file))
