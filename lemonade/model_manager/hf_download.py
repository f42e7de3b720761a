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
import os
import queue
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote, urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from lemonade import __version__
from lemonade.error_types import DownloadError, NetworkError
from lemonade.model_manager.hf_cache import (
    COMMIT_RE, RepoDir, blob_lock, cached_snapshot, check_repo_path, check_revision, delete_repo_cache,
    ensure_cache_dirs, is_checkpoint_downloaded, is_complete_file, link_pointer, snapshot_dir, write_ref,
    write_tree)
from lemonade.model_manager.hf_select import Selection, split_checkpoint
from lemonade.utils.path_utils import hf_endpoint, hf_token, is_offline

__all__ = ["DownloadProgress", "ProgressCallback", "download_checkpoint", "is_checkpoint_downloaded",
           "delete_repo_cache", "snapshot_dir"]

log = logging.getLogger(__name__)

# Timeouts (seconds) as huggingface_hub reads them (spec §2); the read timeout is the stall timeout.
ENV_DOWNLOAD_TIMEOUT = "HF_HUB_DOWNLOAD_TIMEOUT"
ENV_ETAG_TIMEOUT = "HF_HUB_ETAG_TIMEOUT"
DEFAULT_TIMEOUT = 10.0
CHUNK_SIZE = 1 << 20
TRIES_WITHOUT_PROGRESS = 5      # resume attempts in a row that bring no byte (HF http_get: 5)
MAX_ATTEMPTS = 100              # hard bound even when every attempt brings a few bytes
BACKOFF = (1.0, 2.0, 4.0, 8.0, 8.0)  # sleeps between retries of one request (H:469-569); tests shrink it
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_REDIRECTS = 20
ETAG_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}$")
HUB_ORIGINS = ("https://huggingface.co", "https://hf.co", "https://hub-ci.huggingface.co")
# What a dropped, refused or stalled connection raises (the urllib3 ones come from reading `raw`).
NETWORK_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                  urllib3.exceptions.ProtocolError, urllib3.exceptions.ReadTimeoutError)


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

_session: requests.Session | None = None
_session_lock = threading.Lock()  # guards creation of the one pooled session


def _get_session() -> requests.Session:
    global _session
    with _session_lock:
        if _session is None:
            s = requests.Session()
            s.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=16))
            s.mount("https://", HTTPAdapter(pool_connections=4, pool_maxsize=16))
            s.headers["User-Agent"] = f"lemonade/{__version__}; python/{sys.version.split()[0]}"
            _session = s
        return _session


def _timeout(env: str) -> tuple[float, float]:
    try:
        t = float(os.environ.get(env) or DEFAULT_TIMEOUT)
    except ValueError:
        t = DEFAULT_TIMEOUT
    return (t, t)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _is_hub(url: str) -> bool:
    """Hub origins get the token; anything else (a CDN's signed URL) never does (FD:1812-1822)."""
    return _origin(url) in {_origin(hf_endpoint()), *HUB_ORIGINS}


def _headers(url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    headers = {"Accept-Encoding": "identity", **(extra or {})}
    token = hf_token()
    if token and _is_hub(url):
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _retry_delay(attempt: int, response: requests.Response | None) -> float:
    """Backoff for the `attempt`-th retry; a numeric Retry-After on 429/503 wins (H:144-166)."""
    if response is not None:
        value = response.headers.get("Retry-After", "")
        if value.isdigit():
            return float(value) + 1
    return BACKOFF[min(attempt, len(BACKOFF) - 1)]


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


def _request(method: str, url: str, what: str, timeout_env: str, **kwargs) -> requests.Response:
    """A metadata request with bounded backoff on network errors and 408/429/5xx. Blocks."""
    for attempt in range(len(BACKOFF) + 1):
        response = None
        try:
            response = _get_session().request(method, url, headers=_headers(url), timeout=_timeout(timeout_env),
                                               **kwargs)
            if response.status_code not in RETRY_STATUSES:
                return response
            error: Exception = _http_error(response, what)
        except NETWORK_ERRORS as e:
            error = e
        if attempt == len(BACKOFF):
            break
        delay = _retry_delay(attempt, response)
        log.warning("%s failed (%s); retrying in %.1fs", what, error, delay)
        time.sleep(delay)
    if isinstance(error, DownloadError):
        raise error
    raise NetworkError(f"{what}: {error}") from error


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
    response = _request("GET", url, "Failed to fetch model info from Hugging Face API", ENV_ETAG_TIMEOUT,
                        params={"blobs": "true"})
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
        response = _request("HEAD", url, what, ENV_ETAG_TIMEOUT, allow_redirects=False)
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

class _BackgroundHash:
    """A hashlib object fed on a helper thread, so hashing overlaps the socket reads (hashlib and
    recv both release the GIL): verifying costs no wall time on a fast link. The bounded queue keeps
    at most a few chunks in memory when the disk or the hash is the slower side."""

    def __init__(self, hasher):
        self._hasher = hasher
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, name="hf-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._hasher.update(chunk)

    def update(self, chunk: bytes) -> None:
        self._queue.put(chunk)

    def close(self) -> None:
        """Stop the thread (idempotent); blocks until the queued chunks are hashed."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return self._hasher.hexdigest()


def _new_hasher(etag: str, size: int) -> _BackgroundHash | None:
    """The hash the etag is: sha256 for LFS (64 hex), git blob sha1 for regular files (40 hex)."""
    if re.fullmatch(r"[0-9a-f]{64}", etag):
        return _BackgroundHash(hashlib.sha256())
    if re.fullmatch(r"[0-9a-f]{40}", etag):
        h = hashlib.sha1()
        h.update(b"blob %d\0" % size)
        return _BackgroundHash(h)
    return None  # an etag of another shape: size check only


def _hash_prefix(path: Path, length: int, hasher) -> None:
    """Feed the first `length` bytes already on disk (a resumed download) to the hasher."""
    with open(path, "rb", buffering=0) as f:
        while length > 0:
            block = f.read(min(CHUNK_SIZE * 8, length))
            if not block:
                break
            hasher.update(block)
            length -= len(block)


def _check_disk_space(part: Path, need: int, file: str) -> None:
    free = shutil.disk_usage(part.parent).free
    if need > free:
        raise DownloadError(f"Not enough disk space to download {file}: need {need / 1e6:.1f} MB, "
                            f"{free / 1e6:.1f} MB free in {part.parent}")


class _RetryableStatus(Exception):
    """A 408/429/5xx answer to a GET: retried with backoff like a dropped connection."""

    def __init__(self, response: requests.Response):
        super().__init__(f"HTTP {response.status_code} from {_origin(response.url)}")
        self.delay = _retry_delay(0, response) if response.headers.get("Retry-After") else None


class _BlobFetch:
    """Streams one file into `<blob>.incomplete`, resuming across retries, then verifies it.

    State (offset, hasher) lives on the instance so an exception in the middle of a stream leaves
    the count of bytes on disk right for the next Range request.
    """

    def __init__(self, repo_id: str, file: str, meta: FileMeta, on_bytes: Callable[[int], None]):
        self.repo_id, self.file, self.meta, self.on_bytes = repo_id, file, meta, on_bytes
        self.offset, self.hasher, self.refreshed = 0, None, False

    def run(self, blob: Path) -> None:
        """Download, verify, rename to `blob`. One full re-download if the hash is wrong. Blocks."""
        part = blob.with_name(blob.name + ".incomplete")
        for attempt in range(2):
            try:
                self._fetch(part)
            finally:
                if self.hasher is not None:
                    self.hasher.close()
            if self.hasher is None or self.hasher.hexdigest() == self.meta.etag:
                os.chmod(part, 0o666 & ~_umask())
                os.replace(part, blob)
                return
            log.warning("Checksum mismatch for %s (attempt %d); discarding %s", self.file, attempt + 1, part)
            part.unlink()
            self.on_bytes(-self.offset)
        raise DownloadError(f"Downloaded {self.file} does not match its checksum {self.meta.etag}",
                            {"file": self.file})

    def _fetch(self, part: Path) -> None:
        size = self.meta.size
        with open(part, "ab", buffering=0) as f:
            self.offset = f.seek(0, os.SEEK_END)
            if self.offset > size:
                f.truncate(0)
                self.offset = 0
            _check_disk_space(part, size - self.offset, self.file)
            self.hasher = _new_hasher(self.meta.etag, size)
            if self.offset and self.hasher is not None:
                _hash_prefix(part, self.offset, self.hasher)
            self.on_bytes(self.offset)
            failures, attempts = 0, 0
            while self.offset < size:
                attempts += 1
                if attempts > MAX_ATTEMPTS:
                    raise NetworkError(f"Gave up downloading {self.file} after {MAX_ATTEMPTS} attempts")
                before = self.offset
                try:
                    self._get(f)
                    continue
                except (*NETWORK_ERRORS, _RetryableStatus) as e:
                    error: Exception = e
                # Bytes arrived: the budget starts over (FD:459-486); MAX_ATTEMPTS still bounds it.
                failures = 0 if self.offset > before else failures + 1
                if failures >= TRIES_WITHOUT_PROGRESS:
                    raise NetworkError(f"Download of {self.file} failed: {error}") from error
                delay = getattr(error, "delay", None) or BACKOFF[min(failures, len(BACKOFF) - 1)]
                log.warning("Download of %s interrupted at %d/%d bytes (%s); resuming in %.1fs", self.file,
                            self.offset, size, error, delay)
                time.sleep(delay)

    def _restart(self, f) -> None:
        if self.hasher is not None:
            self.hasher.close()
        f.truncate(0)
        self.on_bytes(-self.offset)
        self.offset, self.hasher = 0, _new_hasher(self.meta.etag, self.meta.size)

    def _get(self, f) -> None:
        """One GET from `self.offset`. Raises NETWORK_ERRORS or _RetryableStatus to be resumed."""
        url, offset = self.meta.location, self.offset
        extra = {"Range": f"bytes={offset}-"} if offset else {}
        with _get_session().get(url, headers=_headers(url, extra), stream=True,
                                timeout=_timeout(ENV_DOWNLOAD_TIMEOUT)) as r:
            status = r.status_code
            if status in RETRY_STATUSES:
                raise _RetryableStatus(r)
            if status == 403 and not self.refreshed and not _is_hub(url):
                # A signed CDN URL that expired: ask the hub for a fresh one, once (spec §6 step 7).
                self.refreshed = True
                self.meta = head_file(self.repo_id, self.meta.commit, self.file)
                return
            if status not in (200, 206, 416):
                raise _http_error(r, f"Failed to download {self.file}")
            if offset and (status != 206 or not r.headers.get("Content-Range", "").startswith(f"bytes {offset}-")):
                # The server ignored (200) or refused (416) our range: start over (FD:386-398). A partial
                # that is already complete never gets here: _fetch verifies it without a request.
                log.warning("Server answered %d to Range bytes=%d- for %s; restarting", status, offset, self.file)
                self._restart(f)
                if status != 200:
                    return
            elif status == 416:
                raise _http_error(r, f"Failed to download {self.file}")
            size, write, on_bytes = self.meta.size, f.write, self.on_bytes
            update = self.hasher.update if self.hasher is not None else None
            # read1 returns what one socket read brings (<= CHUNK_SIZE), so bytes that arrived before a
            # cut are on disk for the next Range; iter_content/read(n) drop a partly filled chunk.
            raw = r.raw
            read = raw.read1 if hasattr(raw, "read1") else raw.read  # urllib3 < 2 has no read1
            while chunk := read(CHUNK_SIZE, decode_content=True):
                write(chunk)
                if update is not None:
                    update(chunk)
                self.offset += len(chunk)
                on_bytes(len(chunk))
                if self.offset > size:
                    self._restart(f)
                    raise DownloadError(f"Server sent more than the {size} bytes of {self.file}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- a whole pull

class _Progress:
    """Turns byte counts into DownloadProgress events for one pull."""

    def __init__(self, callback: ProgressCallback | None, files: list[str], sizes: list[int]):
        self.callback, self.files, self.sizes = callback, files, sizes
        self.total_bytes, self.total_done = sum(sizes), 0
        self.index, self.done = 0, 0

    def start(self, index: int) -> None:
        self.index, self.done = index, 0

    def add(self, n: int) -> None:
        self.done += n
        self.total_done += n
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
                            f"is not in the Hugging Face cache {repo.cache}")
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
            bar.add(sizes[i])
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
            _BlobFetch(repo.repo_id, file, meta, bar.add).run(blob)
        else:
            bar.add(meta.size)
        link_pointer(blob, repo.pointer(commit, file))
