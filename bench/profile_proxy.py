"""cProfile of the router while it proxies: every thread of the server is profiled (cProfile alone sees
only the main thread), N requests are sent through it, and the merged profile is printed.

    python bench/profile_proxy.py [--requests 200] [--stream] [--tokens 1] [--sort tottime] [--top 40]

Times are per-thread CPU time (`time.thread_time`), so blocking waits cost nothing and what is left is
the work the proxy does. It starts our `lemonade-router` with the harness's HOME (see _common.Servers), through this file's
`--serve` mode, which installs a profiler in each thread before running the real entry point.
"""
from __future__ import annotations

import sys


def serve(out: str, argv: list[str]) -> None:
    """Run `lemonade-router argv` with a cProfile.Profile in every thread; dump the merged stats."""
    import cProfile
    import pstats
    import threading
    import time

    profiles: list[cProfile.Profile] = []
    guard = threading.Lock()  # guards `profiles`
    original_run = threading.Thread.run

    def profiled_run(self) -> None:
        prof = cProfile.Profile(time.thread_time)  # CPU time: waits cost nothing
        with guard:
            profiles.append(prof)
        prof.enable()
        try:
            original_run(self)
        finally:
            prof.disable()

    threading.Thread.run = profiled_run
    main_prof = cProfile.Profile(time.thread_time)  # CPU time: waits cost nothing
    from lemonade.cli_parser import main_router

    sys.argv = ["lemonade-router", *argv]
    main_prof.enable()
    try:
        main_router()
    except SystemExit:
        pass
    finally:
        main_prof.disable()
        with guard:
            done = [p for p in profiles if p.getstats()]
        stats = pstats.Stats(main_prof)
        for prof in done:
            try:
                stats.add(prof)
            except (TypeError, ValueError):
                pass  # a profiler still running in a daemon thread
        stats.dump_stats(out)


def drive() -> None:
    import argparse
    import http.client
    import json
    import pstats
    import tempfile
    from pathlib import Path

    import _common as c

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--sort", default="tottime")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "lemonade-proxy.prof"))
    args = p.parse_args()
    servers = c.Servers()
    b = servers.binaries(c.our_binary("lemonade-router"), c.our_binary("lemonade-server"), c.harness.PYTHON)
    wrapper = Path(servers.work) / "lemonade-router-profiled"
    wrapper.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                       f"from profile_proxy import serve\nserve({args.out!r}, sys.argv[1:])\n")
    wrapper.chmod(0o755)
    b.router = wrapper
    try:
        router = servers.start(b, load=True)
        body = json.dumps(c.chat_body(args.tokens, args.stream)).encode()
        conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=300)
        start = c.now()
        for _ in range(args.requests):
            conn.request("POST", "/api/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
        elapsed = c.now() - start
        conn.close()
        print(f"{args.requests} requests in {elapsed:.2f} s (load average {c.load_average()})")
    finally:
        servers.close()
    stats = pstats.Stats(args.out)
    stats.sort_stats(args.sort).print_stats(args.top)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3:])
    else:
        drive()
