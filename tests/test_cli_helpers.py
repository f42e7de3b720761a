"""Helpers of the CLI tests (no tests here): run the installed console scripts and start `serve` in a private runtime dir."""
from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from conftest import free_port, make_env, wait_for

SCRIPTS = Path(sys.executable).parent  # the real console scripts (pyenv shims would re-exec)
START_DEADLINE = 60.0


def script(name: str) -> str:
    path = SCRIPTS / name
    assert path.is_file(), f"{path} is not installed: pip install -e ."
    return str(path)


def cli_env(tmp_path: Path, seeded_hub_cache: Path) -> dict[str, str]:
    """make_env plus a private LEMONADE_RUNTIME_DIR (locks, PID file) and no display."""
    env = make_env(tmp_path, seeded_hub_cache)
    runtime = tmp_path / "run"
    runtime.mkdir(exist_ok=True)
    env["LEMONADE_RUNTIME_DIR"] = str(runtime)
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "LEMONADE_PORT", "LEMONADE_HOST", "LEMONADE_CTX_SIZE",
                 "LEMONADE_LLAMACPP", "LEMONADE_LLAMACPP_ARGS", "LEMONADE_LOG_LEVEL"):
        env.pop(name, None)
    return env


def run_cli(prog: str, *args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([script(prog), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@dataclass
class CliServer:
    proc: subprocess.Popen
    port: int
    out_path: Path
    err_path: Path
    env: dict

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def pid_file(self) -> Path:
        return Path(self.env["LEMONADE_RUNTIME_DIR"]) / "lemonade-router.pid"

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def start_cli(env: dict, tmp_path: Path, prog: str, *args: str, port: int | None = None,
              ready_line: str = "Press Ctrl+C to stop", deadline: float = START_DEADLINE) -> CliServer:
    """Start `prog args --port P` with stdout/stderr in files; wait (bounded) for `ready_line`."""
    port = port or free_port()
    out_path, err_path = tmp_path / f"{prog}-{port}.out", tmp_path / f"{prog}-{port}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([script(prog), *args, "--port", str(port)], env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL)
    server = CliServer(proc, port, out_path, err_path, env)

    def ready() -> bool:
        if ready_line in server.out():
            return True
        if proc.poll() is not None:
            raise AssertionError(f"{prog} exited {proc.returncode}:\n{server.out()}\n{server.err()}")
        return False

    try:
        wait_for(ready, deadline, what=f"{prog} to print {ready_line!r}")
    except AssertionError:
        server.stop(signal.SIGKILL)
        raise
    return server
