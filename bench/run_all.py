"""Run every benchmark and print one markdown table: metric | lemonade | reference | ratio | goal | met?

    python bench/run_all.py [--quick] [--cpp-router PATH] [--cpp-server PATH] [--skip download ...]

Each bench runs as its own process (so one's imports and children cannot skew another), in the order
below, and writes its rows to a temp file; their own printouts go to stdout as they run. `download.py`
(owned apart) prints its own figures; it is run with a small repo and its output is appended verbatim.
The machine's load average is printed with the table: figures taken at a load average above the
core count mostly measure the other work on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHES = {
    "cli_startup": (["--runs", "40"], ["--runs", "15"]),
    "idle_memory": ([], []),
    "proxy_overhead": (["--requests", "200"], ["--requests", "200"]),
    "streaming": (["--streams", "20"], ["--streams", "8"]),
    "concurrency": (["--rounds", "10"], ["--rounds", "2"]),
    "multi_model": (["--rounds", "3"], ["--rounds", "1"]),
    "multi_host": (["--rounds", "8"], ["--rounds", "2"]),  # needs root (network namespaces), else says so
    "churn": (["--seconds", "60"], ["--seconds", "15"]),
}
DOWNLOAD_ARGS = ["--repeat", "1", "--extra-mb", "20"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--cpp-router", default=os.environ.get("LEMONADE_BENCH_CPP_ROUTER"))
    p.add_argument("--cpp-server", default=os.environ.get("LEMONADE_BENCH_CPP_SERVER"))
    p.add_argument("--skip", nargs="*", default=[], help=f"benches to leave out: {', '.join(BENCHES)}, download")
    args = p.parse_args()
    cpp = (["--cpp-router", args.cpp_router] if args.cpp_router else []) + (
        ["--cpp-server", args.cpp_server] if args.cpp_server else [])
    before = os.getloadavg()
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (full, quick) in BENCHES.items():
            if name in args.skip:
                continue
            out = Path(tmp) / f"{name}.json"
            argv = [sys.executable, str(HERE / f"{name}.py"), *(quick if args.quick else full), *cpp, "--json", str(out)]
            code = subprocess.call(argv)
            if code or not out.exists():
                failed.append(f"{name} (exit {code})")
                continue
            rows += [(name, r) for r in json.loads(out.read_text())]
    download_out = ""
    if "download" not in args.skip and (HERE / "download.py").exists():
        done = subprocess.run([sys.executable, str(HERE / "download.py"), *DOWNLOAD_ARGS], capture_output=True,
                              text=True)
        download_out = done.stdout + (f"\n(download.py exited {done.returncode}: {done.stderr[-500:]})"
                                      if done.returncode else "")
    after = os.getloadavg()
    print("\n| bench | metric | lemonade | reference | ratio | goal | met? |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['metric']} | {r['lemonade']} | {r['reference']} | {r['ratio']} | {r['goal']} | {r['met']} |")
    print(f"\nload average (1/5/15 min) before: {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}; "
          f"after: {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}; cores: {os.cpu_count()}")
    if download_out:
        print("\n### bench/download.py " + " ".join(DOWNLOAD_ARGS) + "\n```\n" + download_out.strip() + "\n```")
    if failed:
        print("\nfailed: " + ", ".join(failed))
    missed = [r["metric"] for _, r in rows if r["met"] == "no"]
    if missed:
        print("goals missed: " + "; ".join(missed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
