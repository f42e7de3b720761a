"""Connection churn: 200 clients for 60 s against `lemonade serve`, what the server process keeps.

    python bench/churn.py [--clients 200] [--seconds 60] [--baseline PATH] [--json OUT]

Every client opens a new connection per request (`GET /api/v1/models`, keep-alive asked for) and reads
the answer. Half of them close the connection after it; the other half walk away and leave it open,
as a crowd of clients that never close idle keep-alive connections does. Sampled every 0.25 s: the
server's threads, open file descriptors and RSS (maximum over the run); per request: latency from
connect to the end of the answer (p50, p99) and failures (refused, reset, timed out, a 503 answer).

`--baseline PATH` runs the same against the `lemonade` package of another checkout (PYTHONPATH=PATH,
e.g. a `git worktree` of main) first, and prints ours / baseline ratios. Issue 15 item 4: main had
5,347 threads and 5,352 fds after such a run, p99 6 s, and "Too many open files" at the limit.
No model is loaded: the figure is the HTTP layer's.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

import _common as c

REQUEST = b"GET /api/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"
SAMPLE_INTERVAL = 0.25
CLIENT_TIMEOUT = 30.0


@dataclass
class Figures:
    max_threads: int = 0
    max_fds: int = 0
    max_rss_mb: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    leaked: int = 0

    def fail(self, kind: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1


def start_server(pythonpath: str | None, work: Path) -> tuple[subprocess.Popen, int]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LEMONADE_", "HF_", "HUGGINGFACE_")) and not k.lower().endswith("_proxy")}
    env.update(HF_HUB_CACHE=str(work / "hub"), LEMONADE_CACHE_DIR=str(work / "lemonade"), HF_HUB_OFFLINE="1",
               LEMONADE_CI_MODE="1", LEMONADE_RUNTIME_DIR=str(work / "run"), PYTHONUNBUFFERED="1")
    (work / "run").mkdir(parents=True)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    else:
        env["PYTHONPATH"] = str(c.REPO)
    port = c.harness.free_port()
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen([shutil.which("lemonade") or "lemonade", "serve", "--port", str(port), "--log-level", "info"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(work))
    log.close()
    c.harness.wait_for(lambda: _answers(port) or proc.poll() is not None, 60, "the server to answer")
    if proc.poll() is not None:
        raise RuntimeError(f"lemonade serve exited with {proc.returncode}: {(work / 'server.log').read_text()[-2000:]}")
    return proc, port


def _answers(port: int) -> bool:
    try:
        return c.request(port, "GET", "/api/v1/health", timeout=2)[0] == 200
    except OSError:
        return False


def serving_process(proc: subprocess.Popen, port: int) -> psutil.Process:
    """The process that listens on `port` (the console script may be a wrapper)."""
    root = psutil.Process(proc.pid)
    for p in [root] + root.children(recursive=True):
        try:
            if any(conn.laddr.port == port and conn.status == psutil.CONN_LISTEN for conn in p.net_connections("tcp")):
                return p
        except psutil.Error:
            continue
    return root


def one_request(port: int) -> tuple[socket.socket | None, float | None, str | None]:
    """(the open socket, latency, failure kind)."""
    start = time.perf_counter()
    sock = None
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
        sock.sendall(REQUEST)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("closed before the answer")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("closed mid-answer")
            body += chunk
        if status != 200:
            sock.close()
            return None, None, f"status {status}"
        return sock, time.perf_counter() - start, None
    except (socket.timeout, TimeoutError):
        kind = "timed out"
    except ConnectionRefusedError:
        kind = "refused"
    except OSError as e:
        kind = type(e).__name__
    if sock is not None:
        sock.close()
    return None, None, kind


def run_load(port: int, server: psutil.Process, clients: int, seconds: float) -> Figures:
    figures = Figures()
    lock = threading.Lock()
    stop = threading.Event()
    kept: list[socket.socket] = []

    def client(leaky: bool) -> None:
        while not stop.is_set():
            sock, latency, failure = one_request(port)
            with lock:
                if failure:
                    figures.fail(failure)
                else:
                    figures.latencies.append(latency)
                if sock is not None:
                    if leaky:
                        kept.append(sock)  # walks away: the connection stays open, idle
                        figures.leaked += 1
                    else:
                        sock.close()
            if failure:
                time.sleep(0.05)

    def sampler() -> None:
        while not stop.is_set():
            try:
                threads, fds, rss = server.num_threads(), server.num_fds(), server.memory_info().rss / 2**20
            except psutil.Error:
                return
            with lock:
                figures.max_threads = max(figures.max_threads, threads)
                figures.max_fds = max(figures.max_fds, fds)
                figures.max_rss_mb = max(figures.max_rss_mb, rss)
            time.sleep(SAMPLE_INTERVAL)

    threads = [threading.Thread(target=client, args=(i % 2 == 1,), daemon=True) for i in range(clients)]
    threads.append(threading.Thread(target=sampler, daemon=True))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=CLIENT_TIMEOUT + 5)
    for sock in kept:
        sock.close()
    return figures


def measure(label: str, pythonpath: str | None, clients: int, seconds: float) -> Figures:
    work = Path(tempfile.mkdtemp(prefix=f"lemonade-churn-{label}-"))
    proc, port = start_server(pythonpath, work)
    try:
        figures = run_load(port, serving_process(proc, port), clients, seconds)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return figures


def summary(f: Figures) -> dict[str, float]:
    return {"max threads": f.max_threads, "max fds": f.max_fds, "max RSS MB": round(f.max_rss_mb, 1),
            "requests": len(f.latencies), "p50 ms": round(c.pct(f.latencies, 0.5) * 1000, 2),
            "p99 ms": round(c.pct(f.latencies, 0.99) * 1000, 2), "failures": sum(f.failures.values()),
            "failure kinds": dict(f.failures)}


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--baseline", default=None, help="a checkout whose lemonade package to compare with")
    args = p.parse_args()
    soft, hard = __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)
    if soft < 20000:  # the leaky half keeps thousands of sockets open on our side too
        __import__("resource").setrlimit(__import__("resource").RLIMIT_NOFILE, (min(hard, 20000), hard))
    c.print_header(f"connection churn: {args.clients} clients for {args.seconds:g} s, half of them leave "
                   "their connections open")
    runs = {}
    if args.baseline:
        runs["baseline"] = summary(measure("baseline", str(Path(args.baseline).resolve()), args.clients, args.seconds))
        print(f"  baseline ({args.baseline}): {runs['baseline']}", flush=True)
    runs["ours"] = summary(measure("ours", None, args.clients, args.seconds))
    print(f"  ours: {runs['ours']}", flush=True)
    sys.path.insert(0, str(c.REPO))  # this checkout's lemonade: the one measured as "ours"
    from lemonade.server.connections import Limits

    limits = Limits()
    goals = {"max threads": (f"<= {limits.workers + 8} (handler pool + 8)", lambda v: v <= limits.workers + 8),
             "max fds": (f"<= {limits.connections + 64} (connection bound + 64)", lambda v: v <= limits.connections + 64),
             "failures": ("0", lambda v: v == 0)}
    rows = []
    for metric, ours in runs["ours"].items():
        if metric == "failure kinds":
            continue
        goal, met = goals.get(metric, ("", None))
        row = c.Row(f"churn {metric}", str(ours), goal=goal, met=("yes" if met(ours) else "no") if met else "")
        if "baseline" in runs:
            base = runs["baseline"][metric]
            row.reference, row.ratio = f"{base} baseline", (f"{ours / base:.3g}" if base else "-")
        rows.append(row)
    c.write_rows(args, rows)


if __name__ == "__main__":
    sys.exit(main())
