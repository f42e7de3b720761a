"""CLI start-up time: `lemonade --version`, `--help`, `lemonade-server status` (no server, and a server
running), against `python -c pass` as the floor and, when given, a C++ `lemonade-server`.

    python bench/cli_startup.py [--runs 40] [--cpp-server PATH]

Bytecode is cached (in a private PYTHONPYCACHEPREFIX), as for an installed wheel. Every command runs `--runs` times, round-robin (so a load spike hits all alike); the figure is the
median wall time of fork + exec + exit. Our console scripts are run directly (not through a pyenv shim).
Goals: `--version` <= floor + 20 ms, `status` <= floor + 40 ms.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as c

VERSION_BUDGET = 0.020
STATUS_BUDGET = 0.040


def time_commands(commands: dict[str, list[str]], env: dict, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in commands}
    for name, argv in commands.items():  # warm the page cache
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(runs):
        for name, argv in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    return times


def start_serving(server: Path, env: dict, home: Path) -> tuple[subprocess.Popen, int]:
    port = c.harness.free_port()
    proc = subprocess.Popen([str(server), "serve", "--port", str(port)], env=env, cwd=str(home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}")
        try:
            return c.request(port, "GET", "/api/v1/health", timeout=2)[0] == 200
        except OSError:
            return False

    c.harness.wait_for(up, 120, "lemonade-server serve")
    return proc, port


def main() -> None:
    p = c.parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=40)
    args = p.parse_args()
    c.print_header("CLI start-up")
    work = Path(tempfile.mkdtemp(prefix="lemonade-bench-cli-"))
    home = work / "home"
    runtime = work / "runtime"
    home.mkdir()
    runtime.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEMONADE_", "HF_"))}
    env.update(HOME=str(home), LEMONADE_RUNTIME_DIR=str(runtime))
    # An installed wheel has its bytecode compiled; an editable checkout under PYTHONDONTWRITEBYTECODE
    # would compile every module on every run. Cache bytecode in a private dir (the warm-up fills it).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    lemonade = str(c.our_binary("lemonade"))
    server = c.our_binary("lemonade-server")
    commands = {
        "floor": [sys.executable, "-c", "pass"],
        "version": [lemonade, "--version"],
        "help": [lemonade, "--help"],
        "status_down": [str(server), "status"],
    }
    cpp = c.cpp_server_path(args)
    if cpp:
        commands.update(cpp_version=[str(cpp), "--version"], cpp_help=[str(cpp), "--help"],
                        cpp_status_down=[str(cpp), "status"])
    times = time_commands(commands, env, args.runs)
    proc, _ = start_serving(server, env, home)
    try:
        times.update(time_commands({"status_up": [str(server), "status"]}, env, args.runs))
    finally:
        subprocess.run([str(server), "stop"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    med = {name: c.median(values) for name, values in times.items()}
    floor = med["floor"]
    rows = [c.Row("`python -c pass` (floor)", c.fmt_ms(floor))]

    def row(metric: str, key: str, budget: float | None, cpp_key: str | None) -> None:
        value = med[key]
        ref = med.get(cpp_key) if cpp_key else None
        goal = f"<= floor + {budget * 1000:.0f} ms" if budget else ""
        met = ("yes" if value <= floor + budget else "no") if budget else ""
        rows.append(c.Row(metric, f"{c.fmt_ms(value)} (floor + {(value - floor) * 1000:.1f})",
                          c.fmt_ms(ref) if ref else "", f"{value / ref:.1f}x C++" if ref else "", goal, met))

    row("`lemonade --version`", "version", VERSION_BUDGET, "cpp_version" if cpp else None)
    row("`lemonade --help`", "help", None, "cpp_help" if cpp else None)
    row("`lemonade-server status`, no server", "status_down", STATUS_BUDGET, "cpp_status_down" if cpp else None)
    row("`lemonade-server status`, server up", "status_up", STATUS_BUDGET, None)
    c.write_rows(args, rows)


if __name__ == "__main__":
    main()
