"""Streaming relay: time to first byte and the gaps between SSE frames, direct to llama-server vs through
lemonade (interleaved, same llama-server). Proves frames are neither coalesced nor delayed: the frame
counts must match, the frames read per socket read must stay ~1, and the gap distribution through
lemonade must match the direct one.

    python bench/streaming.py [--streams 20] [--tokens 32] [--cpp-router PATH]
"""
from __future__ import annotations

import http.client
import json

import _common as c


def one_stream(port: int, path: str, body: bytes) -> dict:
    """Send one streaming chat; returns TTFB, the arrival time of each frame, frames per read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        start = c.now()
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{path}: {response.status} {response.read()[:200]!r}")
        ttfb = None
        frames: list[float] = []
        per_read: list[int] = []
        pending = b""
        while True:
            data = response.read1(65536)
            if not data:
                break
            t = c.now() - start
            ttfb = t if ttfb is None else ttfb
            pending += data
            *complete, pending = pending.split(b"\n\n")
            complete = [f for f in complete if f.strip()]
            per_read.append(len(complete))
            frames.extend([t] * len(complete))
        return {"ttfb": ttfb, "frames": frames, "per_read": [n for n in per_read if n]}
    finally:
        conn.close()


def run(router: c.harness.Router, streams: int, tokens: int) -> dict:
    body = json.dumps(c.chat_body(tokens, True)).encode()
    backend = c.backend_port(router)
    one_stream(backend, c.chat_path(True), body)  # warm-up
    one_stream(router.port, c.chat_path(False), body)
    out = {"direct": [], "through": []}
    failed = {"direct": [], "through": []}
    for i in range(streams):
        order = (("direct", backend, True), ("through", router.port, False))
        for name, port, direct in (order if i % 2 else order[::-1]):
            for _ in range(3):  # a failure is counted and reported, then the stream is sent again
                try:
                    out[name].append(one_stream(port, c.chat_path(direct), body))
                    break
                except (RuntimeError, OSError) as e:
                    failed[name].append(repr(e)[:200])
    summary = {}
    for name, runs in out.items():
        gaps = [b - a for r in runs for a, b in zip(r["frames"], r["frames"][1:])]
        reads = [n for r in runs for n in r["per_read"]]
        summary[name] = {
            "ttfb_p50": c.median([r["ttfb"] for r in runs]),
            "frames": sorted({len(r["frames"]) for r in runs}),
            "gap_p50": c.median(gaps), "gap_p95": c.pct(gaps, 0.95), "gap_max": max(gaps),
            "frames_per_read_max": max(reads), "reads_with_2plus": sum(n > 1 for n in reads) / len(reads),
            "last_frame_p50": c.median([r["frames"][-1] for r in runs]),
            "failed": failed[name],
        }
    return summary


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=20)
    p.add_argument("--tokens", type=int, default=32)
    args = p.parse_args()
    c.print_header(f"Streaming relay, {args.streams} streams of {args.tokens} tokens each way")
    servers = c.Servers()
    try:
        ours = run(servers.ours(), args.streams, args.tokens)
        ref = None
        if args.cpp_router:
            servers.close()
            ref = run(servers.cpp(args.cpp_router, c.cpp_server_path(args)), args.streams, args.tokens)
    finally:
        servers.close()
    for label, s in (("ours", ours), ("C++", ref)):
        if s:
            print(f"  {label}: {json.dumps(s, default=lambda v: round(v, 5))}")
    d, t = ours["direct"], ours["through"]
    ms = c.fmt_ms
    same_frames = d["frames"] == t["frames"]
    rows = [
        c.Row("stream TTFB p50 (through vs direct)", ms(t["ttfb_p50"]), ms(d["ttfb_p50"]) + " direct",
              f"{t['ttfb_p50'] / d['ttfb_p50']:.3f}"),
        c.Row("SSE frames per stream (through vs direct)", str(t["frames"]), str(d["frames"]) + " direct", "",
              "equal", "yes" if same_frames else "no"),
        c.Row("inter-frame gap p50 (through vs direct)", ms(t["gap_p50"]), ms(d["gap_p50"]) + " direct",
              f"{t['gap_p50'] / d['gap_p50']:.3f}"),
        c.Row("inter-frame gap p95 (through vs direct)", ms(t["gap_p95"]), ms(d["gap_p95"]) + " direct",
              f"{t['gap_p95'] / d['gap_p95']:.3f}"),
        c.Row("reads holding 2+ frames (through vs direct)", f"{t['reads_with_2plus']:.1%}",
              f"{d['reads_with_2plus']:.1%} direct", "", "no coalescing (≈ direct)",
              "yes" if t["reads_with_2plus"] <= d["reads_with_2plus"] + 0.05 else "no"),
        c.Row("last frame p50 (through vs direct)", ms(t["last_frame_p50"]), ms(d["last_frame_p50"]) + " direct",
              f"{t['last_frame_p50'] / d['last_frame_p50']:.3f}"),
    ]
    rows.append(c.Row("streams that failed (through vs direct)", str(len(t["failed"])),
                      f"{len(d['failed'])} direct", "", "0", "yes" if not t["failed"] else "no"))
    if ref:
        rows.append(c.Row("C++: stream TTFB p50 / gap p50 through", "", f"{ms(ref['through']['ttfb_p50'])} / "
                          f"{ms(ref['through']['gap_p50'])}"))
    c.write_rows(args, rows)


if __name__ == "__main__":
    main()
