"""Concurrent streaming clients: aggregate tokens/s through lemonade vs straight to the same llama-server,
for 1, 8 and 32 clients, each streaming a fixed number of tokens; the figure is total SSE content frames
over wall time. Direct and through runs alternate, `--rounds` times each.

    python bench/concurrency.py [--clients 1 8 32] [--tokens 16] [--rounds 10] [--cpp-router PATH]

Goal: through / direct >= 0.95 at every level. llama-server keeps both cores of a 2-core machine busy
(its compute threads spin), so single rounds swing by ±10 % either way; the ratio is of the means over
all rounds, and the row shows the range of the per-round ratios. At 8 clients llama-server's 4 slots
run two waves, and how the requests of a wave are split into prompt batches depends on how closely
they arrive, which a proxy's few milliseconds of spread can change: that level moves most.
"""
from __future__ import annotations

import threading

import _common as c
from streaming import one_stream

GOAL = 0.95


def aggregate_tps(port: int, direct: bool, clients: int, tokens: int) -> float:
    import json

    body = json.dumps(c.chat_body(tokens, True)).encode()
    results: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)

    def client() -> None:
        barrier.wait()
        try:
            r = one_stream(port, c.chat_path(direct), body)
            results.append(len(r["frames"]) - 2)  # minus the final usage frame and [DONE]
        except BaseException as e:  # reported below; a thread must not die silently
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = c.now()
    for t in threads:
        t.join()
    elapsed = c.now() - start
    if errors:
        raise RuntimeError(f"{len(errors)} of {clients} streams failed: {errors[0]!r}")
    return sum(results) / elapsed


def run(router: c.harness.Router, levels: list[int], tokens: int,
        rounds: int) -> dict[int, tuple[float, float, list[float]]]:
    """Per level: (mean tok/s through, mean tok/s direct, the ratio of each round's pair)."""
    backend = c.backend_port(router)
    aggregate_tps(backend, True, 1, tokens)  # warm-up
    out = {}
    for n in levels:
        d, t = [], []
        for i in range(rounds):
            if i % 2:
                d.append(aggregate_tps(backend, True, n, tokens))
                t.append(aggregate_tps(router.port, False, n, tokens))
            else:
                t.append(aggregate_tps(router.port, False, n, tokens))
                d.append(aggregate_tps(backend, True, n, tokens))
        out[n] = (sum(t) / rounds, sum(d) / rounds, [a / b for a, b in zip(t, d)])
        print(f"  {n:>2} clients: through {out[n][0]:.1f} tok/s, direct {out[n][1]:.1f} tok/s, "
              f"ratio {out[n][0] / out[n][1]:.3f}, per round {' '.join(f'{r:.3f}' for r in out[n][2])}",
              flush=True)
    return out


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    c.print_header(f"Concurrency, {args.tokens} tokens per stream, {args.rounds} rounds")
    servers = c.Servers()
    try:
        ours = run(servers.ours(), args.clients, args.tokens, args.rounds)
        ref = None
        if args.cpp_router:
            servers.close()
            print("  C++ router:")
            ref = run(servers.cpp(args.cpp_router, c.cpp_server_path(args)), args.clients, args.tokens, args.rounds)
    finally:
        servers.close()
    rows = []
    for n, (through, direct, per_round) in ours.items():
        ratio = through / direct
        ref_text = f"{direct:.1f} tok/s direct" + (f"; C++ {ref[n][0]:.1f} ({ref[n][0] / ref[n][1]:.3f})" if ref else "")
        spread = f" (rounds {min(per_round):.2f}–{max(per_round):.2f})" if len(per_round) > 1 else ""
        rows.append(c.Row(f"{n} concurrent streams, aggregate tok/s", f"{through:.1f} tok/s", ref_text,
                          f"{ratio:.3f}{spread}", f">= {GOAL}", "yes" if ratio >= GOAL else "no"))
    c.write_rows(args, rows)


if __name__ == "__main__":
    main()
