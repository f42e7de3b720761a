"""FastFlowLM (`flm`) as a backend for recipe `flm` (C++ `server/backends/fastflowlm_server.cpp`, spec §10).

`flm` is AMD's NPU runtime. Lemonade drives it through its CLI only:
`flm version`, `flm list`, `flm pull <ckpt> [--force]`, `flm remove <ckpt>` and
`flm serve <ckpt> --ctx-len <ctx> --port <port>`, an OpenAI-compatible server whose readiness is
`GET /api/tags` (it has no `/health`).

Finding `flm`: `$LEMONADE_FLM` (ours), then `PATH`, then (Windows only) the Program Files paths of §10.
C++ B downloads and runs `flm-setup.exe` from GitHub when `flm` is missing or outdated; that installer
exists for Windows only, so here a missing `flm` is an InstallationError that says how to get one.

Subprocesses: the `serve` child, `pull` and `remove` go through `process_manager` (own process group,
output drained, stopped on timeout). `version` and `list` are quick queries whose output we parse whole;
they use `subprocess.run` with a timeout (it kills them when it expires), since they are never long-lived
children that could outlive the server.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from typing import Any

from lemonade.error_types import DownloadError, FileError, InstallationError
from lemonade.utils import path_utils, process_manager
from lemonade.wrapped_server import WrappedServer

log = logging.getLogger(__name__)

EXE_NAME = "flm"
WINDOWS_PATHS = (r"C:\Program Files\FastFlowLM\flm.exe", r"C:\Program Files (x86)\FastFlowLM\flm.exe")
INSTALL_URL = "https://github.com/FastFlowLM/FastFlowLM/releases/latest/download/flm-setup.exe"

READY_TIMEOUT = 300.0  # C++ B: 300 attempts of ≤1 s on /api/tags (§3.4), as a wall-clock deadline
PULL_TIMEOUT = 300.0  # C++: `flm pull` waited ≤300 s (§3.4)
REMOVE_TIMEOUT = 60.0  # C++: `flm remove` waited ≤60 s (§9.5)
VERSION_TIMEOUT = 5.0  # C++: 50 × 100 ms for `flm version`
LIST_TIMEOUT = 30.0  # C++ had none (popen waits forever); a hung `flm list` must not hang /models

INSTALLED_MARK = " \u2705"  # " ✅" after an installed checkpoint in `flm list`
MODEL_REWRITE_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")  # http-api §4.4, §4.5 (B)
_VERSION_RE = re.compile(r"FLM v(\S+)")


# -- finding flm and asking it questions ----------------------------------------------------------

def find_flm() -> str | None:
    """The `flm` executable to run, or None. Raises InstallationError when `$LEMONADE_FLM` names
    something that is not an executable file (falling through would run a binary nobody asked for)."""
    override = path_utils.flm_override()
    if override:
        if os.path.isfile(override) and os.access(override, os.X_OK):
            return override
        raise InstallationError(f"flm not found at {override} (given by ${path_utils.ENV_FLM})")
    found = shutil.which(EXE_NAME)
    if found:
        return found
    if sys.platform == "win32":
        return next((p for p in WINDOWS_PATHS if os.path.isfile(p)), None)
    return None


def require_flm() -> str:
    """`find_flm()`, or an InstallationError saying how to install FLM."""
    flm = find_flm()
    if flm is None:
        how = (f"download and run {INSTALL_URL}" if sys.platform == "win32" else
               f"FLM (FastFlowLM) runs on AMD Ryzen AI NPUs; put `flm` on PATH or set ${path_utils.ENV_FLM}")
        raise InstallationError(f"FLM not installed. Please install FLM and try again: {how}")
    return flm


def _query(flm: str, *args: str, timeout: float) -> str | None:
    """Stdout+stderr of a quick `flm` query, or None when it fails, times out or cannot start."""
    try:
        done = subprocess.run([flm, *args], stdin=subprocess.DEVNULL, capture_output=True,
                              encoding="utf-8", errors="replace", timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("`flm %s` failed: %s", " ".join(args), e)
        return None
    if done.returncode != 0:
        log.warning("`flm %s` exited with code %d", " ".join(args), done.returncode)
        return None
    return done.stdout + done.stderr


def parse_version(output: str) -> str | None:
    """The version from `flm version` output such as `FLM v0.9.4`, or None."""
    match = _VERSION_RE.search(output)
    return match.group(1) if match else None


def flm_version(flm: str) -> str | None:
    """Run `flm version` (blocks ≤ VERSION_TIMEOUT); None when it does not report a version."""
    output = _query(flm, "version", timeout=VERSION_TIMEOUT)
    return parse_version(output) if output is not None else None


def parse_list(output: str) -> list[str]:
    """Installed checkpoints in `flm list` output: lines `- <checkpoint> ✅` (C++
    `get_flm_installed_models`: trimmed line starts with `- `, the text before ` ✅` is the checkpoint)."""
    installed = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("- ") and INSTALLED_MARK in line:
            installed.append(line[2:line.index(INSTALLED_MARK)].strip())
    return installed


def installed_checkpoints() -> list[str]:
    """Checkpoints `flm list` reports as installed; empty when flm is missing or fails (as C++)."""
    try:
        flm = find_flm()
    except InstallationError as e:
        log.warning("%s", e.message)
        return []
    if flm is None:
        return []
    output = _query(flm, "list", timeout=LIST_TIMEOUT)
    return parse_list(output) if output is not None else []


def is_model_pulled(checkpoint: str) -> bool:
    """Whether `flm list` shows `checkpoint` installed (spec §9.3). Blocks ≤ LIST_TIMEOUT."""
    return checkpoint in installed_checkpoints()


def engine_status() -> dict[str, Any]:
    """The `flm` entry of an NPU's `inference_engines` (system-info.md §5). Blocks ≤ VERSION_TIMEOUT."""
    try:
        flm = find_flm()
    except InstallationError:
        flm = None
    if flm is None:
        return {"available": False, "version": "unknown"}
    return {"available": True, "version": flm_version(flm) or "unknown"}


# -- pull and remove ------------------------------------------------------------------------------

def pull_argv(flm: str, checkpoint: str, force: bool) -> list[str]:
    # C++ adds --force unless do_not_upgrade: an explicit pull re-fetches, an auto-load pull does not.
    return [flm, "pull", checkpoint] + (["--force"] if force else [])


def _run_bounded(name: str, argv: list[str], timeout: float) -> int | None:
    """Run `argv` to completion through process_manager; its exit code, or None after `timeout`
    (the child is then stopped). Blocks; raises OSError if it cannot start."""
    child = process_manager.spawn(name, argv)
    try:
        return child.popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    finally:
        process_manager.stop(child)  # no-op once it exited; stops it on timeout or interruption


def pull(checkpoint: str, force: bool = False) -> None:
    """`flm pull <checkpoint> [--force]` (spec §9.4 step 4). Blocks ≤ PULL_TIMEOUT.

    Raises InstallationError (no flm) or DownloadError (`FLM pull failed with exit code: N`, timeout).
    """
    flm = require_flm()
    log.info("Pulling FLM model %s%s", checkpoint, " (--force)" if force else "")
    try:
        code = _run_bounded("flm pull", pull_argv(flm, checkpoint, force), PULL_TIMEOUT)
    except OSError as e:
        raise DownloadError(f"FLM pull failed: {e}") from e
    if code is None:
        # C++ stopped waiting and reported success with the pull still running; we stop it and say so.
        raise DownloadError(f"FLM pull timed out after {PULL_TIMEOUT:.0f} s")
    if code != 0:
        raise DownloadError(f"FLM pull failed with exit code: {code}")
    log.info("FLM model pull completed: %s", checkpoint)


def remove(checkpoint: str, model_name: str | None = None) -> None:
    """`flm remove <checkpoint>` (spec §9.5). Blocks ≤ REMOVE_TIMEOUT. Raises InstallationError or
    FileError with C++'s messages (`Failed to delete FLM model <name>: …`)."""
    name = model_name or checkpoint
    if not checkpoint:
        raise FileError("FLM model has empty checkpoint field, cannot delete")
    flm = require_flm()
    try:
        code = _run_bounded("flm remove", [flm, "remove", checkpoint], REMOVE_TIMEOUT)
    except OSError as e:
        raise FileError(f"Failed to delete FLM model {name}: {e}") from e
    if code is None:
        raise FileError(f"Failed to delete FLM model {name}: FLM remove timed out")
    if code != 0:
        raise FileError(f"Failed to delete FLM model {name}: FLM remove failed with exit code {code}")
    log.info("Deleted FLM model %s (%s)", name, checkpoint)


def flm_ready_timeout() -> float:
    """The readiness deadline: `$LEMONADE_FLM_READY_TIMEOUT` seconds if set and positive, else 300 s."""
    value = path_utils.flm_ready_timeout_setting()
    try:
        seconds = float(value) if value else READY_TIMEOUT
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        log.warning("Ignoring %s=%r (not a positive number)", path_utils.ENV_FLM_READY_TIMEOUT, value)
        return READY_TIMEOUT
    return seconds


# -- the server -----------------------------------------------------------------------------------

class FastFlowLMServer(WrappedServer):
    """One `flm serve` child for one FLM checkpoint."""

    server_name = "FastFlowLM"
    health_paths = ("/api/tags",)  # FLM has no /health (C++ wait_for_ready)

    def __init__(self, model_name: str, checkpoint: str, recipe: str, ctx_size: int):
        super().__init__(model_name, checkpoint, recipe)
        self.ctx_size = ctx_size
        self.flm = EXE_NAME  # replaced by the resolved path in prepare()

    def prepare(self, progress=None) -> None:
        """Find flm and check it runs (blocks ≤ VERSION_TIMEOUT). Raises InstallationError."""
        flm = require_flm()
        version = flm_version(flm)
        if version is None:
            raise InstallationError(f"FLM at {flm} did not report a version (`flm version`); "
                                    "please reinstall FLM and try again")
        # No upgrade check: C++ compares with the latest GitHub tag and runs flm-setup.exe (Windows only).
        log.info("Using FLM v%s at %s", version, flm)
        self.flm = flm

    def build_argv(self, port: int) -> list[str]:
        return [self.flm, "serve", self.checkpoint, "--ctx-len", str(self.ctx_size), "--port", str(port)]

    def ready_timeout(self) -> float:
        return flm_ready_timeout()

    def rewrite_request(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """FLM serves by its own checkpoint name (e.g. `qwen3:0.6b`), not Lemonade's model name (§10).
        Only chat/completions get the rewrite; embeddings and rerank are forwarded as sent (C++
        FastFlowLMServer::embeddings/reranking, http-api §4.6)."""
        if endpoint not in MODEL_REWRITE_ENDPOINTS:
            return body
        return {**body, "model": self.checkpoint}
