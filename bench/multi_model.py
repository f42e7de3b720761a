"""The cost of a second resident model: router RSS with one and with two models loaded (llama-server
children excluded), and the load time of a second model while the first one is idle vs while it serves
two streaming clients, measured side by side in one run. C++ GA keeps one model, so there is no C++ column.

    python bench/multi_model.py [--rounds 3]
"""
from __future__ import annotations

import json
import subprocess
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


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    c.print_header("Second resident model")
    servers = c.Servers()
    b = servers.binaries(c.our_binary("lemonade-router"), c.our_binary("lemonade-server"), c.harness.PYTHON)
    home = c.harness.make_home(servers.work / "multi", servers.gguf, "hub-layout")
    env = c.harness.make_env(b, home)
    cache = home / ".cache" / "lemonade"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "user_models.json").write_text(json.dumps(
        {"Second": {"checkpoint": c.harness.CHECKPOINT, "recipe": "llamacpp", "labels": ["custom"]}}))
    port = c.harness.free_port()
    proc = subprocess.Popen([str(c.our_binary("lemonade")), "serve", "--port", str(port), "--max-loaded-models",
                             "2"], env=env, cwd=str(home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    alone, busy, one, two, frames = [], [], [], [], []
    try:
        c.harness.wait_for(lambda: _up(port, proc), 120, "lemonade serve")
        timed_load(port, c.MODEL)
        c.request(port, "POST", c.chat_path(False), c.chat_body(4, False), c.LOAD_TIMEOUT)
        for _ in range(args.rounds):
            time.sleep(SETTLE)
            one.append(rss_mib(proc.pid))
            alone.append(timed_load(port, SECOND))
            c.request(port, "POST", c.chat_path(False), {**c.chat_body(4, False), "model": SECOND}, c.LOAD_TIMEOUT)
            time.sleep(SETTLE)
            two.append(rss_mib(proc.pid))
            unload(port, SECOND)
            stop, served = threading.Event(), []
            clients = [threading.Thread(target=keep_streaming, args=(port, stop, served)) for _ in range(2)]
            for t in clients:
                t.start()
            c.harness.wait_for(lambda: served, 120, "the first model to serve")
            busy.append(timed_load(port, SECOND))
            stop.set()
            for t in clients:
                t.join()
            frames.append(len(served))
            unload(port, SECOND)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        c.harness.kill_all(c.harness.processes_mentioning(str(home)))
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


def _up(port: int, proc: subprocess.Popen) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"lemonade serve exited with {proc.returncode}")
    try:
        return c.request(port, "GET", "/api/v1/health", timeout=2)[0] == 200
    except OSError:
        return False


if __name__ == "__main__":
    main()
