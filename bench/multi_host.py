"""Several machines on one: decode tokens/s of the gemma model through a remote upstream vs direct,
and with its layers on one llama.cpp RPC worker vs local, measured side by side in one run (the
rounds interleave the four ways, in a rotating order).

Hosts are network namespaces on a bridge (`tests/netns.py`; needs root): `lemonade serve` in A with
three user models (`user.remote` → the llama-server in B, `user.rpc` → layers on B's `lemonade
rpc-worker`, `user.local` → A alone), and the client in the root namespace. On these loopback
namespaces the "network" is memory copies: the figures measure the overhead of the extra hop (remote)
and of the RPC protocol (round trips per evaluated graph), not a real network; on a LAN each RPC
round trip adds its latency to every token.

    python bench/multi_host.py [--rounds 5] [--tokens 96]
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as c

UPSTREAM_PORT, LEMONADE_PORT, WORKER_PORT = 8080, 8000, 50052
WAYS = ("direct", "through", "local", "rpc")  # B's llama-server; A → B; A alone; A with B's worker
MODEL_OF = {"through": "user.remote", "local": "user.local", "rpc": "user.rpc"}
# One compute thread in every llama.cpp process: with two threads, ggml's spinning barriers collapse
# whenever another process takes a core (5 vs 20 tok/s measured on a busy 2-core machine), and the
# figures would compare thread scheduling instead of the paths.
THREADS = "1"
EMBEDDED = "Gemma-3-270m-GGUF"  # the embedded GGUF; A's three user models all point at it


def stream(host: str, port: int, path: str, model: str, tokens: int) -> tuple[float, float]:
    """One greedy streamed chat of exactly `tokens` tokens; (time to first token, decode tokens/s
    between the first and the last token frame), from the client's clock."""
    body = {**c.chat_body(tokens, True), "model": model}
    conn = http.client.HTTPConnection(host, port, timeout=c.LOAD_TIMEOUT)
    try:
        start = c.now()
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{host}:{port}{path} {model}: {response.status} {response.read()[:300]!r}")
        stamps, pending = [], b""
        while data := response.read1(65536):
            t = c.now() - start
            pending += data
            *frames, pending = pending.split(b"\n\n")
            stamps += [t for f in frames if b'"content":"' in f]
    finally:
        conn.close()
    if len(stamps) < 2:
        raise RuntimeError(f"{model}: {len(stamps)} token frames")
    return stamps[0], (len(stamps) - 1) / (stamps[-1] - stamps[0])


def wait_http(host: str, port: int, path: str, proc: subprocess.Popen, what: str) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", path)
            return conn.getresponse().status == 200
        except OSError:
            return False

    c.harness.wait_for(up, c.LOAD_TIMEOUT, what)


def setup(network, work: Path, started: list[subprocess.Popen]) -> tuple[str, str]:
    """Start B's llama-server and worker and A's lemonade (each appended to `started` at once);
    (A's address, B's address) once all answer."""
    from lemonade.model_manager import embedded, registry

    a, b = network.add_host("a"), network.add_host("b")
    hub = work / "hub"
    gguf = embedded.install(registry.load_builtin()[EMBEDDED], hub)
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(HF_HUB_CACHE=str(hub), LEMONADE_CACHE_DIR=str(work / "lemonade"), HF_HUB_OFFLINE="1",
               LEMONADE_CI_MODE="1", LEMONADE_RUNTIME_DIR=str(work), PYTHONUNBUFFERED="1")
    checkpoint = registry.load_builtin()[EMBEDDED].checkpoint
    (work / "lemonade").mkdir()
    (work / "lemonade" / "user_models.json").write_text(json.dumps({
        "remote": {"recipe": "remote", "checkpoint": "gemma", "base_url": f"http://{b.ip}:{UPSTREAM_PORT}/v1"},
        "local": {"recipe": "llamacpp", "checkpoint": checkpoint},
        "rpc": {"recipe": "llamacpp", "checkpoint": checkpoint, "rpc_workers": f"{b.ip}:{WORKER_PORT}"},
    }))
    lemonade = shutil.which("lemonade") or str(c.our_binary("lemonade"))
    logs = work / "logs"
    logs.mkdir()
    upstream = b.popen([str(c.llama_server_path()), "-m", str(gguf), "--host", b.ip, "--port", str(UPSTREAM_PORT),
                        "--ctx-size", "4096", "--jinja", "--threads", THREADS],
                       stdout=(logs / "upstream.log").open("wb"),
                       stderr=subprocess.STDOUT)
    started.append(upstream)
    worker = b.popen([lemonade, "rpc-worker", "--host", b.ip, "--port", str(WORKER_PORT), "--threads", THREADS], env=env,
                     stdout=(logs / "worker.log").open("wb"), stderr=subprocess.STDOUT)
    started.append(worker)
    serve = a.popen([lemonade, "serve", "--host", a.ip, "--port", str(LEMONADE_PORT), "--max-loaded-models", "2",
                     "--llamacpp-args", f"--threads {THREADS}"],
                    env=env, stdout=(logs / "serve.log").open("wb"), stderr=subprocess.STDOUT)
    started.append(serve)
    wait_http(b.ip, UPSTREAM_PORT, "/health", upstream, "llama-server in B")
    c.harness.wait_for(lambda: "Press Ctrl+C" in (logs / "worker.log").read_text() or worker.poll() is not None,
                       60, "lemonade rpc-worker in B")
    if worker.poll() is not None:
        raise RuntimeError(f"rpc-worker exited:\n{(logs / 'worker.log').read_text()}")
    wait_http(a.ip, LEMONADE_PORT, "/api/v1/health", serve, "lemonade serve in A")
    return a.ip, b.ip


def target(way: str, a_ip: str, b_ip: str) -> tuple[str, int, str, str]:
    if way == "direct":
        return b_ip, UPSTREAM_PORT, "/v1/chat/completions", "gemma"
    return a_ip, LEMONADE_PORT, "/api/v1/chat/completions", MODEL_OF[way]


def measure(a_ip: str, b_ip: str, rounds: int, tokens: int) -> dict[str, list[tuple[float, float]]]:
    for way in WAYS:  # warm-up: loads the models, fills caches
        stream(*target(way, a_ip, b_ip), tokens=8)
    results: dict[str, list[tuple[float, float]]] = {way: [] for way in WAYS}
    for r in range(rounds):
        for way in WAYS[r % len(WAYS):] + WAYS[:r % len(WAYS)]:
            results[way].append(stream(*target(way, a_ip, b_ip), tokens=tokens))
    return results


def rows_of(results: dict[str, list[tuple[float, float]]]) -> list[c.Row]:
    tps = {w: c.median([r[1] for r in rs]) for w, rs in results.items()}
    ttft = {w: c.median([r[0] for r in rs]) for w, rs in results.items()}
    note = " (loopback namespaces: overhead, not a network)"
    return [
        c.Row("remote upstream: decode tok/s, A's lemonade → B's llama-server vs direct to B" + note,
              f"{tps['through']:.1f} tok/s", f"{tps['direct']:.1f} tok/s direct", f"{tps['through'] / tps['direct']:.3f}"),
        c.Row("remote upstream: time to first token p50, through vs direct" + note,
              c.fmt_ms(ttft["through"]), c.fmt_ms(ttft["direct"]) + " direct", f"{ttft['through'] / ttft['direct']:.3f}"),
        c.Row("RPC: decode tok/s, layers on B's rpc-server vs local in A" + note,
              f"{tps['rpc']:.1f} tok/s", f"{tps['local']:.1f} tok/s local", f"{tps['rpc'] / tps['local']:.3f}"),
        c.Row("RPC: time to first token p50, one worker vs local" + note,
              c.fmt_ms(ttft["rpc"]), c.fmt_ms(ttft["local"]) + " local", f"{ttft['rpc'] / ttft['local']:.3f}"),
    ]


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=96)
    args = p.parse_args()
    c.print_header("Several machines (network namespaces)")
    import netns  # tests/netns.py, on the path through _common

    try:
        netns.check_available()
    except netns.NetnsUnavailable as e:
        c.write_rows(args, [c.Row("several machines", f"not measured: network namespaces unavailable ({e})")])
        return
    # a SIGTERM (run_all's timeout, `timeout`) unwinds like Ctrl+C, so the namespaces are torn down
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work = Path(tempfile.mkdtemp(prefix="lemonade-bench-multihost-"))
    started: list[subprocess.Popen] = []
    with netns.Network() as network:  # its teardown kills whatever is left in the namespaces
        try:
            a_ip, b_ip = setup(network, work, started)
            results = measure(a_ip, b_ip, args.rounds, args.tokens)
        finally:
            for proc in reversed(started):  # lemonade first: it stops its own children
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    shutil.rmtree(work, ignore_errors=True)
    for way, rs in results.items():
        print(f"  {way}: decode tok/s per round {[round(r[1], 1) for r in rs]}")
    c.write_rows(args, rows_of(results))


if __name__ == "__main__":
    sys.exit(main())
