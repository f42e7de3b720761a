"""The parity harness: runs `lemonade-router` / `lemonade-server` binaries chosen by path, knowing
nothing of how they are built. The same code drives our console scripts and a C++ build of upstream
61dda2d04 (spec cli.md, http-api.md).

What any binary of either kind needs, prepared without network:
  * a private `HOME`, so the HF cache (`~/.cache/huggingface/hub`), the lemonade cache
    (`~/.cache/lemonade`) and `~/.local/share` are private; `HF_*` and `LEMONADE_*` settings of the
    caller are dropped;
  * an HF cache in which the registry model `Qwen3-0.6B-GGUF` (checkpoint `unsloth/Qwen3-0.6B-GGUF:Q4_0`)
    resolves to the gemma-3-270m GGUF, stored in one of two layouts (`SEED_LAYOUTS`);
  * `llama-server` where each kind looks for it: `<dir of the router binary>/llama/vulkan/llama-server`
    (C++ B, router-and-backends.md §8.2) and `$LEMONADE_LLAMA_SERVER` (ours);
  * a free port per server.

C++ B resolves its own directory through `/proc/self/exe`, so a symlink to the binary would resolve to
the real directory. For a C++ build the harness therefore *copies* both binaries into a private bin
directory, with a `resources` symlink to the original `resources/` and the `llama/vulkan/` layout beside
them. `lemonade-server` then finds that `lemonade-router` first (it searches its own directory first,
cli.md §3), and the router finds that `llama-server`.

C++ B keeps its locks, PID file and log at fixed paths in `/tmp` (cli.md §5.1), so runs against it must
be serial (no pytest-xdist) and no other lemonade may run on the machine meanwhile. Our binaries take
`$LEMONADE_RUNTIME_DIR` for those paths, and the harness gives them a private one, so a run against our
binaries cannot disturb a server the user has running.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

CPP = "cpp"
PYTHON = "python"
FLAVOURS = (CPP, PYTHON)

MODEL = "Qwen3-0.6B-GGUF"
CHECKPOINT = "unsloth/Qwen3-0.6B-GGUF:Q4_0"
REPO_DIR = "models--unsloth--Qwen3-0.6B-GGUF"
GGUF_NAME = "Qwen3-0.6B-Q4_0.gguf"
SNAPSHOT = hashlib.sha1(b"lemonade parity harness").hexdigest()  # a commit-shaped snapshot name

SEED_LAYOUTS = ("cpp-layout", "hub-layout")  # real file in the snapshot | blob + relative symlink

START_DEADLINE = 120.0  # router up and answering /health (the machine may be busy)
LOAD_TIMEOUT = 600.0  # load of the 270M model on a busy 2-core machine
STOP_DEADLINE = 30.0

CPP_RUNTIME_DIR = Path("/tmp")  # fixed in C++ B (cli.md §2, §5.1)
ENV_PREFIXES_DROPPED = ("LEMONADE_", "HF_", "HUGGINGFACE_")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate` until truthy; AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_binary(name: str) -> Path | None:
    """Our installed console script: the one beside the running Python (not a pyenv shim, which would
    add a bash start-up to every call), else the first on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def detect_flavour(binary: Path) -> str:
    """`cpp` for a native executable (ELF), `python` for a script (our console scripts start `#!`).
    `--version` cannot tell them apart: both print `lemonade-router version 9.0.2`."""
    with open(binary.resolve(), "rb") as f:
        magic = f.read(4)
    return CPP if magic == b"\x7fELF" else PYTHON


@dataclass
class Binaries:
    """The binaries under test, as they will be run, and what the session gave them."""

    flavour: str
    router: Path  # the path that is executed (a private copy for C++)
    server: Path
    original_router: Path
    original_server: Path
    llama_server: Path
    bin_dir: Path | None  # private copy dir (C++ only)
    runtime_dir: Path  # where locks, PID file and server log live

    @property
    def is_cpp(self) -> bool:
        return self.flavour == CPP

    @property
    def pid_file(self) -> Path:
        return self.runtime_dir / "lemonade-router.pid"


def prepare_binaries(flavour: str, router: Path, server: Path, llama_server: Path, work: Path) -> Binaries:
    """For C++, copy both binaries into `work/bin` with `resources` and `llama/vulkan/llama-server`
    beside them; ours run in place. Returns what to execute."""
    runtime_dir = CPP_RUNTIME_DIR
    bin_dir = None
    run_router, run_server = router, server
    if flavour == CPP:
        bin_dir = work / "bin"
        bin_dir.mkdir(parents=True)
        run_router = bin_dir / "lemonade-router"
        run_server = bin_dir / "lemonade-server"
        shutil.copy2(router.resolve(), run_router)
        shutil.copy2(server.resolve(), run_server)
        for src_dir in {router.resolve().parent, server.resolve().parent}:
            resources = src_dir / "resources"
            if resources.is_dir() and not (bin_dir / "resources").exists():
                (bin_dir / "resources").symlink_to(resources)
        # Without a local resources dir, C++ falls back to /usr/local/share/lemonade-server and
        # /usr/share/lemonade-server, which the copy still reaches (http-api.md §4.20).
    else:
        runtime_dir = work / "runtime"
        runtime_dir.mkdir(parents=True)
    llama_dir = (bin_dir or work) / "llama" / "vulkan"
    llama_dir.mkdir(parents=True, exist_ok=True)
    # A symlink is enough: the loader finds llama-server's libraries from its real path.
    (llama_dir / "llama-server").symlink_to(llama_server)
    return Binaries(flavour, run_router, run_server, router, server, llama_server, bin_dir, runtime_dir)


def seed_hf_cache(home: Path, gguf: Path, gguf_sha256: str, layout: str) -> Path:
    """Place `gguf` as `Qwen3-0.6B-Q4_0.gguf` of `unsloth/Qwen3-0.6B-GGUF` in `$HOME/.cache/huggingface/hub`.

    cpp-layout: a real file in `snapshots/<commit>/` plus `refs/main` (what C++ B's downloader writes).
    hub-layout: `blobs/<sha256>`, a relative symlink from the snapshot, `refs/main` (huggingface_hub).
    The file is a hard link to the session's copy when the filesystem allows. Returns the snapshot file.
    """
    repo = home / ".cache" / "huggingface" / "hub" / REPO_DIR
    snapshot = repo / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    target = snapshot / GGUF_NAME
    if layout == "cpp-layout":
        _link_or_copy(gguf, target)
    elif layout == "hub-layout":
        (repo / "blobs").mkdir()
        _link_or_copy(gguf, repo / "blobs" / gguf_sha256)
        target.symlink_to(Path("..") / ".." / "blobs" / gguf_sha256)
    else:
        raise ValueError(f"unknown layout {layout}")
    return target


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_env(binaries: Binaries, home: Path) -> dict[str, str]:
    """The environment of every process under test: the caller's, minus proxies and every lemonade or
    HF setting, with a private HOME. Offline flags keep our side off the network; C++ B has no such
    flag and never needs the network for what the tests do."""
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and not k.startswith(ENV_PREFIXES_DROPPED)}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", LEMONADE_CI_MODE="1",
               LEMONADE_LLAMA_SERVER=str(binaries.llama_server), PYTHONUNBUFFERED="1")
    env.pop("XDG_CACHE_HOME", None)
    env.pop("XDG_DATA_HOME", None)
    if not binaries.is_cpp:
        env["LEMONADE_RUNTIME_DIR"] = str(binaries.runtime_dir)
    return env


def processes_mentioning(marker: str, name: str = "llama-server") -> list[psutil.Process]:
    """Live processes named like `name` whose command line contains `marker` (a private HOME)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if name in cmdline and marker in cmdline and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_all(processes: list[psutil.Process]) -> None:
    for proc in processes:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=10)


@dataclass
class Router:
    """A `lemonade-router --port P` process with its private HOME."""

    binaries: Binaries
    home: Path
    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return self.url + "/api/v1"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> "Router":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binaries.router), "--port", str(self.port), *self.extra_args],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=str(self.home))

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.binaries.router} exited with {self.proc.returncode}:\n"
                                     f"{self.log_text()}")
            try:
                return requests.get(self.api + "/health", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(healthy, START_DEADLINE, "the router to answer /api/v1/health")
        return self

    def llama_servers(self) -> list[psutil.Process]:
        return processes_mentioning(str(self.home))

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the router and wait for it; kill it at the deadline. Leaves llama-server alone."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def cleanup(self) -> None:
        """Stop the router, then kill any llama-server it left (C++ B orphans them on SIGTERM)."""
        self.stop()
        kill_all(self.llama_servers())


@dataclass
class CliResult:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


def run_cli(binary: Path, args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120.0) -> CliResult:
    argv = [str(binary), *args]
    done = subprocess.run(argv, env=env, cwd=str(cwd), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    return CliResult(argv, done.returncode, done.stdout, done.stderr)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def make_home(base: Path, gguf: tuple[Path, str], layout: str | None) -> Path:
    home = base / "home"
    home.mkdir(parents=True)
    if layout:
        seed_hf_cache(home, gguf[0], gguf[1], layout)
    return home


def start_router(binaries: Binaries, base: Path, gguf, layout: str | None = "hub-layout", *args: str,
                 log_level: str = "debug") -> Router:
    """A router on a free port with a fresh HOME under `base`, seeded in `layout` (None: empty cache)."""
    home = make_home(base, gguf, layout)
    router = Router(binaries, home, make_env(binaries, home), free_port(),
                    base / "router.log", extra_args=("--log-level", log_level, *args))
    try:
        return router.start()
    except BaseException:
        router.cleanup()
        raise
