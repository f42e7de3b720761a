"""Installing `llama-server` from its pinned GitHub release (C++ `llamacpp_server.cpp` `install()`,
spec router-and-backends.md §8.1-§8.3).

`ensure_installed(backend)` is what C++ B ran at the start of every load: keep an executable that is
already in `<base>/llama/<backend>/` (reinstall only when both marker files exist and disagree with
the pin), else download the release zip into the HF cache dir, extract it, write `version.txt` and
`backend.txt`, and delete the zip. Error messages are B's.

Where we differ from B, and why:
* The zip is extracted by `zipfile` into a staging dir beside the install dir, the markers are
  written there, and the staging dir is renamed into place. B extracted in place with `unzip -o`, so a
  crash mid-extraction left an executable without markers, which every later start then used as-is.
* Members that would land outside the install dir (zip-slip, absolute names, escaping symlinks)
  fail the extraction. `unzip` only warned and skipped them.
* The download (`utils/download.py`, shared with the HF pull) goes to `<asset>.incomplete`, resumes a
  cut transfer with `Range` (B started over, or rather failed), retries 5xx answers with backoff, stops
  on a stall (60 s without a byte) instead of hanging, checks free disk space first, and is renamed only
  when whole; a failed download leaves nothing behind (B left the error body under the final name).
* An upgrade replaces the old install dir only after the new release is extracted (B deleted it
  first), so a failed download keeps the working binary.
* Offline mode (`path_utils.is_offline()`) never touches the network: a missing install is an error,
  and an install whose markers disagree with the pin is used with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import stat
import threading
import zipfile
from pathlib import Path

from lemonade.error_types import DownloadError, InstallationError, NetworkError
from lemonade.model_manager.hf_download import DownloadProgress, ProgressCallback
from lemonade.utils import download, http_client, path_utils

log = logging.getLogger(__name__)

INSTALL_SUBPATHS = ("build/bin/llama-server", "llama-server", "bin/llama-server")  # C++ B order, §8.2

VERSIONS_FILE = "backend_versions.json"
VERSION_MARKER = "version.txt"
BACKEND_MARKER = "backend.txt"
MIN_ZIP_SIZE = 1024 * 1024  # C++ MIN_ZIP_SIZE: anything smaller is an error page or a cut transfer
DEFAULT_ROCM_ARCH = "gfx110X"  # C++ identify_rocm_arch() fallback (system-info.md §8)
CHUNK_SIZE = 1 << 20  # zip extraction copy buffer
CONNECT_TIMEOUT = http_client.CONNECT_TIMEOUT
READ_TIMEOUT = download.READ_TIMEOUT  # a stall, not a total: C++ set no timeout at all for this download
EXECUTABLE_MODE = 0o755
WINDOWS_EXE = "llama-server.exe"

RELEASE_REPOS = {"vulkan": "ggml-org/llama.cpp", "metal": "ggml-org/llama.cpp", "rocm": "lemonade-sdk/llamacpp-rocm"}

_locks: dict[str, threading.Lock] = {}
_locks_lock = threading.Lock()  # guards _locks; each per-backend lock covers one check-and-install


# ---------------------------------------------------------------- version pin (§8.1) ---------------

def pinned_version(backend: str) -> str:
    """The version `resources/backend_versions.json` pins for `backend`. Raises InstallationError
    with the C++ messages (`get_llamacpp_version` and `JsonUtils::load_from_file`)."""
    path = path_utils.resource_path(VERSIONS_FILE)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InstallationError(f"Failed to open file: {path}") from e
    try:
        config = json.loads(text)
    except ValueError as e:
        raise InstallationError(f"Failed to parse JSON from file {path}: {e}") from e
    section = config.get("llamacpp") if isinstance(config, dict) else None
    if not isinstance(section, dict):
        raise InstallationError("backend_versions.json is missing 'llamacpp' section")
    version = section.get(backend)
    if not isinstance(version, str):
        raise InstallationError(f"backend_versions.json is missing version for backend: {backend}")
    return version


# ---------------------------------------------------------------- release asset (§8.3 step 3) -----

def rocm_arch() -> str:
    """C++ `identify_rocm_arch`: the iGPU's arch, else the first dGPU's, else gfx110X. Detects now
    (no hardware cache, as C++ `create_system_info()`); blocks on lspci."""
    from lemonade import system_info  # only the ROCm path pays for hardware detection

    devices = system_info.get_device_dict()
    igpu = devices.get("amd_igpu") or {}
    for gpu in [igpu, *(devices.get("amd_dgpu") or [])]:
        if gpu.get("available") and gpu.get("name"):
            arch = system_info.rocm_arch_for_gpu(gpu["name"])
            if arch:
                return arch
    return DEFAULT_ROCM_ARCH


def _os_family(system: str | None) -> str:
    return {"Darwin": "macOS", "Windows": "Windows"}.get(system or platform.system(), "Linux")


def asset_name(backend: str, version: str, system: str | None = None, arch: str | None = None) -> str:
    """The release file C++ downloads. `system` is a `platform.system()` value (default: this host);
    `arch` overrides ROCm detection. Raises InstallationError on an unsupported OS/backend pair."""
    family = _os_family(system)
    if backend == "rocm":
        if family == "macOS":
            raise InstallationError("ROCm llamacpp only supported on Windows and Linux")
        target = arch or rocm_arch()
        os_tag = "windows" if family == "Windows" else "ubuntu"
        return f"llama-{version}-{os_tag}-rocm-{target}-x64.zip"
    if backend == "metal":
        if family != "macOS":
            raise InstallationError("Metal llamacpp only supported on macOS")
        return f"llama-{version}-bin-macos-arm64.zip"
    if backend == "vulkan":
        if family == "macOS":
            raise InstallationError("Vulkan llamacpp only supported on Windows and Linux")
        return f"llama-{version}-bin-{'win' if family == 'Windows' else 'ubuntu'}-vulkan-x64.zip"
    # C++ treated anything else as vulkan; the CLI only accepts these three, so name the mistake.
    raise InstallationError(f"Unknown llamacpp backend: {backend} (expected vulkan, rocm or metal)")


def asset_url(backend: str, version: str, system: str | None = None, arch: str | None = None) -> str:
    """`<base>/<repo>/releases/download/<version>/<asset>`, base from `path_utils.llamacpp_download_base()`."""
    return (f"{path_utils.llamacpp_download_base()}/{RELEASE_REPOS[backend]}/releases/download/{version}/"
            f"{asset_name(backend, version, system, arch)}")


# ---------------------------------------------------------------- install dir state (§8.2, §8.3) --

def find_executable(install_dir: Path) -> Path | None:
    """C++ `find_executable_in_install_dir`: first existing candidate (existence, not mode)."""
    subpaths = (WINDOWS_EXE,) if _os_family(None) == "Windows" else INSTALL_SUBPATHS
    for sub in subpaths:
        if (install_dir / sub).is_file():
            return install_dir / sub
    return None


def _read_marker(path: Path) -> str | None:
    """The first line of a marker file (C++ `std::getline`), or None when the file is absent."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    lines = text.splitlines()
    return lines[0] if lines else ""


def installed_markers(backend: str) -> tuple[str | None, str | None]:
    """(version.txt, backend.txt) of the install dir; None for a missing file."""
    install_dir = path_utils.llama_install_dir(backend)
    return _read_marker(install_dir / VERSION_MARKER), _read_marker(install_dir / BACKEND_MARKER)


def needs_install(backend: str, version: str | None = None) -> bool:
    """Whether `ensure_installed` would download (§8.3 steps 1-2). No side effects; raises
    InstallationError only when the pin cannot be read and markers must be compared."""
    install_dir = path_utils.llama_install_dir(backend)
    if find_executable(install_dir) is None:
        return True
    have_version, have_backend = installed_markers(backend)
    if have_version is None or have_backend is None:
        return False  # a hand-placed binary without markers is used as-is, offline
    return have_version != (version or pinned_version(backend)) or have_backend != backend


# ---------------------------------------------------------------- public entry point --------------

def _backend_lock(backend: str) -> threading.Lock:
    with _locks_lock:
        return _locks.setdefault(backend, threading.Lock())


def ensure_installed(backend: str, progress: ProgressCallback | None = None) -> Path:
    """The llama-server executable of `backend`'s install dir, installing or upgrading it first if
    needed (C++ `LlamaCppServer::install`). Blocks for the whole download and extraction; concurrent
    callers for one backend wait for the first. Raises InstallationError (C++ messages)."""
    with _backend_lock(backend):
        install_dir = path_utils.llama_install_dir(backend)
        exe = find_executable(install_dir)
        if exe is not None:
            have_version, have_backend = installed_markers(backend)
            if have_version is None or have_backend is None:
                log.debug("[LlamaCpp] Found llama-server at: %s (no version markers; used as-is)", exe)
                return exe
            version = pinned_version(backend)
            if have_version == version and have_backend == backend:
                log.debug("[LlamaCpp] Found llama-server at: %s", exe)
                return exe
            if path_utils.is_offline():
                log.warning("[LlamaCpp] %s is version %s (pinned: %s) but offline mode is on; using it",
                            exe, have_version, version)
                return exe
            # C++ deleted the dir here, before downloading; we swap it only once the new one is
            # extracted, so a failed download keeps a working llama-server.
            log.info("[LlamaCpp] Upgrading from %s to %s", have_version, version)
        else:
            version = pinned_version(backend)
        return _install(backend, version, install_dir, progress)


def _install(backend: str, version: str, install_dir: Path, progress: ProgressCallback | None) -> Path:
    url = asset_url(backend, version)
    if path_utils.is_offline():
        raise InstallationError(
            f"llama-server ({backend} {version}) is not installed in {install_dir} and offline mode is "
            f"on (LEMONADE_OFFLINE / HF_HUB_OFFLINE); it would be downloaded from: {url}")
    log.info("[LlamaCpp] Installing llama-server (backend: %s, version: %s)", backend, version)
    asset = url.rsplit("/", 1)[1]
    cache_dir = path_utils.hf_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    zip_path = cache_dir / asset
    log.info("[LlamaCpp] Downloading from: %s to: %s", url, zip_path)
    _download(url, zip_path, progress)
    staging = install_dir.with_name(f".{install_dir.name}.installing")
    try:
        exe = _unpack(zip_path, staging, backend, version)
        if install_dir.exists():  # the version being upgraded, or a dir without an executable
            shutil.rmtree(install_dir)
        os.replace(staging, install_dir)
    finally:
        zip_path.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    exe = install_dir / exe.relative_to(staging)
    log.info("[LlamaCpp] Installation complete: %s", exe)
    return exe


# ---------------------------------------------------------------- download (§8.3 step 4) ----------

def _download(url: str, dest: Path, progress: ProgressCallback | None) -> None:
    """Download `url` to `dest` through `dest.incomplete` (`download.FileDownload`: Range resume,
    bounded retries, stall timeout, disk-space check), then check the size. Follows redirects (GitHub
    answers with a 302 to its CDN) and sends no credentials. Blocks; raises InstallationError (the C++
    message; a full disk says so, with the path and the bytes needed and free). Nothing is left behind
    on failure; a partial file from a killed earlier run is resumed."""
    failed = f"Failed to download llama-server from: {url}"

    def report(done: int, total: int | None) -> None:
        if progress:
            progress(DownloadProgress(dest.name, 1, 1, done, total or 0, done, total or 0, stage="install"))

    job = download.FileDownload(url, dest, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), progress=report)
    try:
        done = job.run()
    except download.NoSpaceError as e:
        raise InstallationError(e.message, e.details) from e
    except DownloadError as e:  # an HTTP error status
        raise InstallationError(failed, {**e.details, "reason": e.message}) from e
    except (NetworkError, OSError) as e:  # no progress after the retries; an unwritable cache dir
        raise InstallationError(failed, {"reason": str(e)}) from e
    finally:
        job.part.unlink(missing_ok=True)  # gone after the rename; otherwise nothing half-written stays
    log.info("[LlamaCpp] Downloaded %s: %d MB", dest.name, done // (1024 * 1024))
    if done < MIN_ZIP_SIZE:
        dest.unlink(missing_ok=True)
        raise InstallationError("Downloaded file is too small (< 1 MB), likely corrupted or incomplete",
                                {"bytes": done, "url": url})


# ---------------------------------------------------------------- extract (§8.3 steps 5-6) --------

def _unpack(zip_path: Path, staging: Path, backend: str, version: str) -> Path:
    """Extract into a fresh `staging`, check the executable, write the markers, chmod 0755.
    Returns the executable inside `staging`. Raises InstallationError; the caller removes zip and staging."""
    shutil.rmtree(staging, ignore_errors=True)  # a crashed earlier attempt
    staging.mkdir(parents=True)
    log.info("[LlamaCpp] Extracting ZIP to %s", staging)
    try:
        extract_zip(zip_path, staging)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError) as e:
        # RuntimeError: an encrypted member or (NotImplementedError) an unsupported compression method
        raise InstallationError("Failed to extract llama-server archive", {"reason": str(e)}) from e
    exe = find_executable(staging)
    if exe is None:
        raise InstallationError("Extraction failed: executable not found. Downloaded file may be corrupted.")
    (staging / VERSION_MARKER).write_text(version, encoding="utf-8")
    (staging / BACKEND_MARKER).write_text(backend, encoding="utf-8")
    if os.name != "nt":
        exe.chmod(EXECUTABLE_MODE)
    return exe


def _inside(root: Path, path: str) -> bool:
    real = os.path.realpath(path)
    return real == str(root) or real.startswith(str(root) + os.sep)


def _member_path(root: Path, name: str) -> Path:
    """Where member `name` goes; ValueError for absolute names, drive letters or `..` parts."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
        raise ValueError(f"archive member escapes the install dir: {name!r}")
    return root.joinpath(*[p for p in parts if p not in ("", ".")])


def extract_zip(zip_path: Path, dest: Path) -> None:
    """Extract every member of `zip_path` under `dest`, keeping Unix mode bits and symlinks (as
    `unzip` does). Raises ValueError for a member or symlink that would leave `dest`, and
    zipfile.BadZipFile / OSError for a damaged archive (CRCs are checked while reading)."""
    root = Path(os.path.realpath(dest))
    with zipfile.ZipFile(zip_path) as archive:
        for info in archive.infolist():
            target = _member_path(root, info.filename)
            # Re-checked per member through realpath: an earlier symlink member may redirect a parent.
            if not _inside(root, str(target.parent)):
                raise ValueError(f"archive member escapes the install dir: {info.filename!r}")
            mode = (info.external_attr >> 16) if info.create_system == 3 else 0
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink() or target.exists():
                target.unlink()  # `unzip -o` replaces; never write through an existing link
            if stat.S_ISLNK(mode):
                _extract_symlink(archive, info, root, target)
                continue
            with archive.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK_SIZE)
            if mode & 0o777:
                target.chmod(mode & 0o777)  # no setuid/setgid from a download


def _extract_symlink(archive: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path, target: Path) -> None:
    link = archive.read(info).decode("utf-8")
    if os.path.isabs(link) or not _inside(root, os.path.join(target.parent, link)):
        raise ValueError(f"archive symlink escapes the install dir: {info.filename!r} -> {link!r}")
    os.symlink(link, target)
