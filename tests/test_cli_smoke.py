"""The CI recipe of docs/ci-smoke.md, run exactly as written there (the bash block is taken from the
page), against the real llama-server and the embedded model."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import psutil
import pytest

from conftest import free_port, llama_processes
from test_cli_helpers import SCRIPTS, cli_env, run_cli

DOC = Path(__file__).resolve().parent.parent / "docs" / "ci-smoke.md"


def recipe() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, "docs/ci-smoke.md must hold exactly one bash block"
    return blocks[0]


def lemonade_processes(runtime_dir: str) -> list:
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            environ = proc.info["environ"] or {}
        except psutil.Error:
            continue
        if "lemonade" in cmdline and environ.get("LEMONADE_RUNTIME_DIR") == runtime_dir:
            if proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


@pytest.fixture()
def smoke_env(tmp_path, seeded_hub_cache):
    env = cli_env(tmp_path, seeded_hub_cache)
    env["PATH"] = f"{SCRIPTS}:{env['PATH']}"
    env["PORT"] = str(free_port())
    script = tmp_path / "smoke.sh"
    script.write_text(recipe())
    return env, script


@pytest.mark.parametrize("model, code", [("Gemma-3-270m-GGUF", 0), ("no-such-model", 22)])
def test_ci_recipe_always_stops_the_server(smoke_env, llama_server_bin, model, code):
    env, script = smoke_env
    env["MODEL"] = model
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == code, result.stdout + result.stderr
    assert "Server is running on port" in result.stdout
    if code == 0:
        assert '"choices"' in result.stdout
        assert "--- server log ---" not in result.stdout
    else:
        assert "--- server log ---" in result.stdout  # curl -f failed with 22: the log is shown
    assert "Lemonade Server stopped successfully." in result.stdout
    assert not llama_processes(env["HF_HUB_CACHE"])
    assert not lemonade_processes(env["LEMONADE_RUNTIME_DIR"])
    assert run_cli("lemonade-server", "status", env=env).returncode == 1
