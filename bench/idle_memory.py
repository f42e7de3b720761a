"""Memory of the server process itself: RSS (and USS) of `lemonade serve` with no model loaded, and with
the model loaded (our process only; llama-server is reported apart). With `--cpp-router`, the same for
the C++ router.

    python bench/idle_memory.py [--cpp-router PATH]

Goal: < 40 MB RSS idle.
"""
from __future__ import annotations

import time

import psutil

import _common as c

IDLE_GOAL_MB = 40.0
SETTLE = 2.0  # seconds after a state change before sampling


def mib(n: int) -> float:
    return n / (1 << 20)


def sample(pid: int) -> tuple[float, float]:
    proc = psutil.Process(pid)
    full = proc.memory_full_info()
    return mib(full.rss), mib(full.uss)


def measure(port: int, pid: int, router: c.harness.Router | None, home) -> dict[str, float]:
    time.sleep(SETTLE)
    out: dict[str, float] = {}
    out["idle_rss"], out["idle_uss"] = sample(pid)
    status, body = c.request(port, "POST", "/api/v1/load", {"model_name": c.MODEL}, c.LOAD_TIMEOUT)
    if status != 200:
        raise RuntimeError(f"load failed: {status} {body[:300]!r}")
    c.request(port, "POST", "/api/v1/chat/completions", c.chat_body(4, False), c.LOAD_TIMEOUT)
    time.sleep(SETTLE)
    out["loaded_rss"], out["loaded_uss"] = sample(pid)
    llama = c.harness.processes_mentioning(str(home))
    out["llama_rss"] = sum(mib(p.memory_info().rss) for p in llama)
    return out


def ours_serve(servers: c.Servers) -> dict[str, float]:
    """`lemonade serve --port P` (the command the README shows) with the harness's HOME and env."""
    with c.lemonade_serve(servers, "serve") as serving:
        return measure(serving.port, serving.proc.pid, None, serving.home)


def main() -> None:
    args = c.parser(__doc__.splitlines()[0]).parse_args()
    c.print_header("Idle memory")
    servers = c.Servers()
    try:
        ours = ours_serve(servers)
        ref = None
        if args.cpp_router:
            router = servers.cpp(args.cpp_router, c.cpp_server_path(args), load=False)
            ref = measure(router.port, router.proc.pid, router, router.home)
    finally:
        servers.close()
    print(f"  ours: {ours}" + (f"\n  C++: {ref}" if ref else ""))

    def row(metric, key, goal=None):
        value = ours[key]
        r = ref[key] if ref else None
        return c.Row(metric, f"{value:.1f} MiB", f"{r:.1f} MiB (C++)" if r else "",
                     f"{value / r:.1f}x" if r else "", f"< {goal:.0f} MB" if goal else "",
                     ("yes" if value * 1.048576 < goal else "no") if goal else "")

    rows = [row("server RSS, idle", "idle_rss", IDLE_GOAL_MB), row("server USS, idle", "idle_uss"),
            row("server RSS, model loaded (excl. llama-server)", "loaded_rss"),
            row("llama-server RSS (for scale)", "llama_rss")]
    c.write_rows(args, rows)


if __name__ == "__main__":
    main()
