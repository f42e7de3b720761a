"""Resumable file download: the twin of the C++ `HttpClient::download_file` (`utils/http_client.cpp`).

One owner for everything both downloaders need (the Hugging Face pull in `model_manager/hf_download.py`
and the llama.cpp release install in `backends/llamacpp_install.py`):

  * bytes go to `<dest>.incomplete`, opened for append, and only a finished (and, with a hasher,
    verified) file is renamed to `<dest>`: nothing half-written ever sits under the final name;
  * an interrupted transfer resumes with `Range: bytes=N-` from what is on disk, also across runs;
    a 200 to a ranged request, or a 416, truncates and starts over (huggingface_hub `http_get`);
  * retries are bounded: TRIES_WITHOUT_PROGRESS attempts in a row that bring no byte, a budget that
    starts over whenever bytes arrive, and MAX_ATTEMPTS in all; backoff between them, a numeric
    `Retry-After` wins;
  * the read timeout is a stall timeout (silence between bytes), never a total;
  * free disk space is checked before writing, and a full disk while writing gives the same error,
    naming the path and the bytes needed against the bytes free;
  * the file is created by `open()`, so the kernel applies the process umask to its mode: no chmod,
    and no `os.umask` flip (a race in a threaded server).

The caller keeps its own policy: the HF pull holds its blob lock and passes a hasher, a header
function (the token goes to hub URLs only) and a hook for an expired CDN URL; the install checks the zip.
"""
from __future__ import annotations

import errno
import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import urlsplit

import requests

from lemonade.error_types import DownloadError, NetworkError
from lemonade.utils import path_utils
from lemonade.utils.http_client import CONNECT_TIMEOUT, session_for

log = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
READ_TIMEOUT = 60.0             # a stall, not a total
TRIES_WITHOUT_PROGRESS = 5      # attempts in a row that bring no byte (huggingface_hub http_get: 5)
MAX_ATTEMPTS = 100              # hard bound even when every attempt brings a few bytes
BACKOFF = (1.0, 2.0, 4.0, 8.0, 8.0)  # sleeps between retries (huggingface_hub H:469-569); tests shrink it
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# What `requests` raises for a dropped, refused or stalled connection before or while streaming.
RETRYABLE_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


class NoSpaceError(DownloadError):
    """The disk holding `path` has fewer than `needed` bytes free (`free`), or filled up while writing.
    HTTP 507 (Insufficient Storage); the message names the file by `path_utils.shown_path`."""

    error_type = "insufficient_storage"
    status = 507

    def __init__(self, name: str, path: Path, needed: int | None, free: int):
        want = f"need {needed} bytes ({needed / 1e6:.1f} MB)" if needed is not None else "need more space"
        shown = path_utils.shown_path(path)
        super().__init__(f"No space left on the disk to download {name}: {want}, {free} bytes "
                         f"({free / 1e6:.1f} MB) free for {shown}",
                         {"path": shown, "bytes_needed": needed, "bytes_free": free})
        self.path, self.needed, self.free = path, needed, free


class ChecksumError(DownloadError):
    """The finished file does not hash to the expected digest, twice in a row."""


def network_cause(error: BaseException) -> tuple[str, bool]:
    """(a one-line cause, whether retrying can help) of a failed request. `requests` wraps the real
    cause two or three levels deep (ConnectionError → urllib3 MaxRetryError → NewConnectionError →
    the socket error), and its text repeats the whole chain; this finds the socket-level cause.

    An unresolvable host, a refused connection, a connect timeout and a TLS failure are not
    retried: without a network (or with a wrong HF_ENDPOINT) each retry only adds its backoff to
    the wait before the same answer. Resets, read timeouts and cut bodies are retried."""
    import socket
    import ssl

    seen: set[int] = set()
    stack: list[BaseException] = [error]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError":
            return "cannot resolve the host name (no network or no DNS)", False
        if isinstance(e, ConnectionRefusedError):
            return "connection refused", False
        if isinstance(e, requests.exceptions.ConnectTimeout):
            return "connection timed out", False
        if isinstance(e, (ssl.SSLError, requests.exceptions.SSLError)) and e is not error:
            return f"TLS error ({e})", False
        if isinstance(e, requests.exceptions.ProxyError):
            return "the proxy refused or failed the connection", False
        if isinstance(e, ConnectionResetError):
            return "connection reset by the server", True
        if isinstance(e, (requests.exceptions.ReadTimeout, socket.timeout)):
            return "no answer in time (read timeout)", True
        stack.extend(x for x in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args)
                     if isinstance(x, BaseException))
    if isinstance(error, requests.exceptions.SSLError):
        return "TLS error", False
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200], True


def retry_delay(attempt: int, response: requests.Response | None) -> float:
    """Backoff before the `attempt`-th retry (0-based); a numeric Retry-After on the answer wins (H:144-166)."""
    if response is not None:
        value = response.headers.get("Retry-After", "")
        if value.isdigit():
            return float(value) + 1
    return BACKOFF[min(attempt, len(BACKOFF) - 1)]


def check_disk_space(path: Path, needed: int, name: str) -> None:
    """Raise NoSpaceError unless the file system of `path` has `needed` bytes free."""
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise NoSpaceError(name, path, needed, free)


class BackgroundHash:
    """A hashlib object fed on a helper thread, so hashing overlaps the socket reads (hashlib and
    recv both release the GIL): verifying costs no wall time on a fast link. The bounded queue keeps
    at most a few chunks in memory when the disk or the hash is the slower side."""

    def __init__(self, hasher: Hasher):
        self._hasher = hasher
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, name="download-hash", daemon=True)
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


class _RetryableStatus(Exception):
    """A 408/429/5xx answer: retried with backoff like a dropped connection."""

    def __init__(self, response: requests.Response):
        parts = urlsplit(response.url)  # the origin only: a signed URL's query is a credential
        super().__init__(f"HTTP {response.status_code} from {parts.scheme}://{parts.netloc}")
        self.delay = retry_delay(0, response) if response.headers.get("Retry-After") else None


class _Interrupted(NetworkError):
    """The body stopped before its end: resumed with Range."""


def _status_error(response: requests.Response, name: str, url: str) -> DownloadError:
    # `url` is the one asked for: after a redirect, `response.url` may carry a signed query (a credential).
    return DownloadError(f"Failed to download {name} (status: {response.status_code})",
                         {"status": response.status_code, "url": url})


class FileDownload:
    """Downloads `url` to `dest` through `<dest>.incomplete`; `run()` does the work.

    `size`: the expected length when known beforehand (HF's HEAD); else it comes from the answer's
    Content-Range or Content-Length. `headers(url)`: extra request headers for that URL (auth).
    `progress(done, total)`: after every chunk; `done` goes back down when a transfer starts over,
    and an exception it raises cancels the download (the partial file stays for a later resume).
    `hasher()` + `digest`: a fresh hashlib-like object, fed every byte of the file on a helper thread;
    a mismatch discards the file and downloads it once more. `refresh_url(url)`: asked once, on a
    403, for a replacement URL (an expired signed URL); None means the 403 stands. `http_error(resp)`:
    the exception for an answer that is not retried (default: DownloadError with the status).
    The offset and the hasher live on the instance, so an exception in the middle of a stream leaves
    the count of bytes on disk right for the next Range request.
    """

    def __init__(self, url: str, dest: Path, *, name: str | None = None, size: int | None = None,
                 headers: Callable[[str], dict[str, str]] | None = None,
                 timeout: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
                 progress: Callable[[int, int | None], None] | None = None,
                 hasher: Callable[[], Hasher] | None = None, digest: str | None = None,
                 refresh_url: Callable[[str], str | None] | None = None,
                 http_error: Callable[[requests.Response], Exception] | None = None):
        self.url, self.dest, self.name = url, Path(dest), name or Path(dest).name
        self.part = self.dest.with_name(self.dest.name + ".incomplete")
        self.size, self.timeout = size, timeout
        self.headers = headers or (lambda url: {})
        self.progress = progress or (lambda done, total: None)
        self.new_hasher, self.digest = hasher, digest
        self.refresh_url, self.refreshed = refresh_url, False
        self.http_error = http_error or (lambda r: _status_error(r, self.name, self.url))
        self.offset = 0
        self.hash: BackgroundHash | None = None

    def run(self) -> int:
        """Download, verify, rename to `dest`; returns the size. Blocks for the whole transfer.

        Raises NetworkError (no progress after retries), DownloadError (an HTTP error, or whatever
        `http_error` builds), NoSpaceError, ChecksumError, and whatever `progress` raises. On any
        error the partial file stays in `<dest>.incomplete` for a later resume."""
        for attempt in range(2):
            try:
                self._fetch()
            finally:
                if self.hash is not None:
                    self.hash.close()
            if self.hash is None or self.hash.hexdigest() == self.digest:
                # `open()` created the file, so its mode is already 0o666 & ~umask: nothing to chmod.
                os.replace(self.part, self.dest)
                return self.offset
            log.warning("Checksum mismatch for %s (attempt %d); discarding %s", self.name, attempt + 1, self.part)
            self.part.unlink()
            self.offset = 0
            self.progress(0, self.size)
        raise ChecksumError(f"Downloaded {self.name} does not match its checksum {self.digest}",
                            {"file": self.name})

    def _done(self) -> bool:
        return self.size is not None and self.offset >= self.size

    def _fetch(self) -> None:
        with open(self.part, "ab", buffering=0) as f:
            self.offset = f.seek(0, os.SEEK_END)
            if self.size is not None:
                if self.offset > self.size:
                    f.truncate(0)
                    self.offset = 0
                check_disk_space(self.part, self.size - self.offset, self.name)
            self.hash = BackgroundHash(self.new_hasher()) if self.new_hasher else None
            if self.offset and self.hash is not None:
                _hash_prefix(self.part, self.offset, self.hash)
            self.progress(self.offset, self.size)
            failures, attempts = 0, 0
            while not self._done():
                attempts += 1
                if attempts > MAX_ATTEMPTS:
                    raise NetworkError(f"Gave up downloading {self.name} after {MAX_ATTEMPTS} attempts")
                before = self.offset
                try:
                    self._get(f)
                    continue
                except (_Interrupted, _RetryableStatus) as e:
                    error: Exception = e
                    cause = str(e)
                except RETRYABLE_ERRORS as e:
                    error = e
                    cause, retryable = network_cause(e)
                    if not retryable:
                        origin = urlsplit(self.url)
                        raise NetworkError(f"Cannot reach {origin.scheme}://{origin.netloc} to download "
                                           f"{self.name}: {cause}") from e
                except requests.RequestException as e:  # a bad URL, too many redirects: no retry helps
                    raise NetworkError(f"Download of {self.name} failed: {e}") from e
                # Bytes arrived: the budget starts over (FD:459-486); MAX_ATTEMPTS still bounds it.
                failures = 0 if self.offset > before else failures + 1
                if failures >= TRIES_WITHOUT_PROGRESS:
                    raise NetworkError(f"Download of {self.name} failed: {cause}") from error
                delay = getattr(error, "delay", None) or BACKOFF[min(failures, len(BACKOFF) - 1)]
                log.warning("Download of %s interrupted at %d/%s bytes (%s); resuming in %.1fs", self.name,
                            self.offset, self.size if self.size is not None else "?", cause, delay)
                time.sleep(delay)

    def _restart(self, f) -> None:
        if self.hash is not None:
            self.hash.close()
        f.truncate(0)
        self.offset = 0
        self.progress(0, self.size)
        self.hash = BackgroundHash(self.new_hasher()) if self.new_hasher else None

    def _get(self, f) -> None:
        """One GET from `self.offset`. Raises RETRYABLE_ERRORS, _Interrupted or _RetryableStatus to be
        resumed; returns early (nothing written) after a restart on a 416 or a refreshed URL."""
        url, offset = self.url, self.offset
        headers = {"Accept-Encoding": "identity", **self.headers(url)}  # byte counts are the file's
        if offset:
            headers["Range"] = f"bytes={offset}-"
        with session_for(url).get(url, headers=headers, stream=True, timeout=self.timeout) as r:
            status = r.status_code
            if status in RETRY_STATUSES:
                raise _RetryableStatus(r)
            if status == 403 and self.refresh_url is not None and not self.refreshed:
                self.refreshed = True
                fresh = self.refresh_url(url)
                if fresh:
                    self.url = fresh
                    return
            if status not in (200, 206, 416):
                raise self.http_error(r)
            if offset and (status != 206 or not r.headers.get("Content-Range", "").startswith(f"bytes {offset}-")):
                # The server ignored (200) or refused (416) our range: start over (FD:386-398). A partial
                # that is already complete never gets here: _fetch verifies it without a request.
                log.warning("Server answered %d to Range bytes=%d- for %s; restarting", status, offset, self.name)
                self._restart(f)
                if status != 200:
                    return
            elif status == 416:
                raise self.http_error(r)
            if self.size is None:
                self.size = _total_size(r, self.offset)
                if self.size is not None:
                    check_disk_space(self.part, self.size - self.offset, self.name)
            self._copy(r, f)

    def _copy(self, r: requests.Response, f) -> None:
        size, progress = self.size, self.progress
        update = self.hash.update if self.hash is not None else None
        # read1 returns what one socket read brings (<= CHUNK_SIZE), so bytes that arrived before a
        # cut are on disk for the next Range; iter_content/read(n) drop a partly filled chunk.
        raw = r.raw
        read = raw.read1 if hasattr(raw, "read1") else raw.read  # urllib3 < 2 has no read1
        while True:
            try:
                chunk = read(CHUNK_SIZE, decode_content=True)
            except Exception as e:  # noqa: BLE001
                # Broad on purpose: this call only reads the socket through urllib3, whose exception
                # classes (ProtocolError, ReadTimeoutError, SSLError...) are not ours to import. Any of
                # them means the transfer broke; what is on disk is intact and resumable. Nothing else
                # runs inside this try (writes and the progress callback are outside it).
                raise _Interrupted(f"{type(e).__name__}: {e}") from e
            if not chunk:
                break
            self._write(f, chunk)
            if update is not None:
                update(chunk)
            self.offset += len(chunk)
            progress(self.offset, size)
            if size is not None and self.offset > size:
                self._restart(f)
                raise DownloadError(f"Server sent more than the {size} bytes of {self.name}")
        if size is None:
            self.size = self.offset  # no length was announced: the end of the body is the end of the file
        elif self.offset < size:
            raise _Interrupted(f"connection closed after {self.offset} of {size} bytes")

    def _write(self, f, chunk: bytes) -> None:
        """Write all of `chunk` (an unbuffered write may take part of it). A full disk raises NoSpaceError."""
        view = memoryview(chunk)
        try:
            while view:
                view = view[f.write(view):]
        except OSError as e:
            if e.errno not in NO_SPACE_ERRNOS:
                raise
            needed = self.size - self.offset if self.size is not None else None
            raise NoSpaceError(self.name, self.part, needed, shutil.disk_usage(self.part.parent).free) from e


def _total_size(r: requests.Response, offset: int) -> int | None:
    """The whole file's size from Content-Range (`bytes a-b/total`), else offset + Content-Length."""
    total = r.headers.get("Content-Range", "").rpartition("/")[2]
    if r.status_code == 206 and total.isdigit():
        return int(total)
    length = r.headers.get("Content-Length", "")
    return offset + int(length) if length.isdigit() else None


def _hash_prefix(path: Path, length: int, hasher: BackgroundHash) -> None:
    """Feed the first `length` bytes already on disk (a resumed download) to the hasher."""
    with open(path, "rb", buffering=0) as f:
        while length > 0:
            block = f.read(min(CHUNK_SIZE * 8, length))
            if not block:
                break
            hasher.update(block)
            length -= len(block)
