"""The cost of a second resident model: router RSS with one and with two models loaded (llama-server
children excluded), and the load time of a second model while the first one is idle vs while it serves
two streaming clients, measured side by side in one run. C++ GA keeps one model, so there is no C++ column.

On 2 cores the second load is slower while the first model generates because both llama-server
processes want the same cores: starting a bare llama-server while another one streams took 4.4x as long
as starting it beside an idle one (0.87 s vs 3.79 s), the same order as through the router (~5x).

    python bench/multi_model.py [--rounds 3]
"""
from __future__ import annotations

import threading
import time

import psutil

import _common as c

SECOND = "user.Second"
SETTLE = 2.0


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / (1 << 20)


def timed_load(port: int, name: str) -> float:
    started = c.now()
    status, body = c.request(port, "POST", "/api/v1/load", {"model_name": name}, c.LOAD_TIMEOUT)
    if status != 200:
        raise RuntimeError(f"load of {name} failed: {status} {body[:300]!r}")
    return c.now() - started


def unload(port: int, name: str) -> None:
    c.request(port, "POST", "/api/v1/unload", {"model_name": name}, c.LOAD_TIMEOUT)


def keep_streaming(port: int, stop: threading.Event, served: list[int]) -> None:
    while not stop.is_set():
        status, raw = c.request(port, "POST", c.chat_path(False), c.chat_body(64, True), c.LOAD_TIMEOUT)
        if status == 200:
            served.append(c.count_frames(raw))


def load_while_serving(port: int) -> float:
    """The second model's load time while two clients keep streaming from the first."""
    stop, served = threading.Event(), []
    clients = [threading.Thread(target=keep_streaming, args=(port, stop, served)) for _ in range(2)]
    for t in clients:
        t.start()
    try:
        c.harness.wait_for(lambda: served, 120, "the first model to serve")
        return timed_load(port, SECOND)
    finally:
        stop.set()
        for t in clients:
            t.join()


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    c.print_header("Second resident model")
    servers = c.Servers()
    second = {"Second": {"checkpoint": c.harness.CHECKPOINT, "recipe": "llamacpp", "labels": ["custom"]}}
    alone, busy, one, two = [], [], [], []
    try:
        with c.lemonade_serve(servers, "multi", "--max-loaded-models", "2", user_models=second) as serving:
            port, pid = serving.port, serving.proc.pid
            timed_load(port, c.MODEL)
            c.request(port, "POST", c.chat_path(False), c.chat_body(4, False), c.LOAD_TIMEOUT)
            for _ in range(args.rounds):
                time.sleep(SETTLE)
                one.append(rss_mib(pid))
                alone.append(timed_load(port, SECOND))
                c.request(port, "POST", c.chat_path(False), {**c.chat_body(4, False), "model": SECOND},
                          c.LOAD_TIMEOUT)
                time.sleep(SETTLE)
                two.append(rss_mib(pid))
                unload(port, SECOND)
                busy.append(load_while_serving(port))
                unload(port, SECOND)
    finally:
        servers.close()
    rss1, rss2 = c.median(one), c.median(two)
    t_alone, t_busy = c.median(alone), c.median(busy)
    print(f"  rounds: loads alone {[round(x, 2) for x in alone]} s, while serving {[round(x, 2) for x in busy]} s")
    rows = [
        c.Row("router RSS, two models loaded (excl. llama-server)", f"{rss2:.1f} MiB", f"{rss1:.1f} MiB one model",
              f"+{rss2 - rss1:.1f} MiB"),
        c.Row("second model load time while the first streams to 2 clients", f"{t_busy:.2f} s",
              f"{t_alone:.2f} s first idle", f"{t_busy / t_alone:.2f}x"),
    ]
    c.write_rows(args, rows)


if __name__ == "__main__":
    main()
