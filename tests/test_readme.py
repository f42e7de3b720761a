"""The README's commands, run as written (issue 16 item 5).

Every fenced `bash`/`python` block of README.md carries a marker comment right above it,
`<!-- readme-test: KIND -->` or `<!-- readme-test: skip: REASON -->`; this module reads the blocks from
the README itself, so the README and the test cannot drift, and a new block without a marker fails.

The command blocks use port 8000, as a reader would, so they run in a private network namespace
(`tests/netns.py`: its own loopback, so port 8000 is free whatever else runs on this machine). They run
one after the other, as a reader pastes them: `try-it` starts the server that `status`, `real-model`,
`local-gguf`, `several-models` (which restarts it with a limit of two) and the Ollama and Anthropic
client examples use; `security-key` restarts it with an API key. The Hugging Face hub of `real-model` is the loopback hub
(`tests/hfhub.py`) started inside the namespace, serving `unsloth/Qwen3-0.6B-GGUF` with the embedded
gemma GGUF's bytes under the name `Qwen3-0.6B-Q4_K_M.gguf` (no network here). Blocks that install
packages, need a GPU or a C++ build are reported as skipped with the marker's reason.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DEFAULT_MODEL, make_env
from netns import network  # noqa: F401  (a fixture)
from test_pytest_plugin import run_project

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
MARKER = re.compile(r"<!-- readme-test: ([a-z-]+)(?:: (.+?))? -->\n$")
COMMAND_LANGUAGES = ("bash", "sh", "shell", "console", "python")
SCRIPTS = Path(sys.executable).parent  # `lemonade` and `python` of the interpreter running the tests
HUB_SCRIPT = """
import signal, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from hfhub import LoopbackHub
hub = LoopbackHub().start()
hub.add_repo("unsloth/Qwen3-0.6B-GGUF", {"Qwen3-0.6B-Q4_K_M.gguf": Path(sys.argv[2]), "config.json": b"{}\\n"})
print(hub.endpoint, flush=True)
signal.pause()
"""


@dataclass
class Block:
    kind: str
    reason: str | None
    language: str
    text: str
    line: int


def readme_blocks() -> list[Block]:
    """Every fenced block with a command language, with the marker above it (kind "" if none)."""
    text = README.read_text()
    blocks = []
    for fence in FENCE.finditer(text):
        language = fence.group(1)
        if language not in COMMAND_LANGUAGES:
            continue
        before = text[:fence.start()]
        marker = MARKER.search(before[-300:])
        line = before.count("\n") + 1
        blocks.append(Block(marker.group(1) if marker else "", marker.group(2) if marker else None,
                            language, fence.group(2), line))
    return blocks


def block(kind: str) -> str:
    (found,) = [b.text for b in readme_blocks() if b.kind == kind]
    return found


RUN_KINDS = ("venv", "try-it", "status", "real-model", "local-gguf", "several-models", "ollama-client",
             "anthropic-client", "security-key", "pytest-example")


def test_every_command_block_is_marked():
    blocks = readme_blocks()
    assert blocks, "no command blocks found: has the README's fence style changed?"
    unmarked = [f"README.md line {b.line}" for b in blocks if b.kind not in RUN_KINDS + ("skip",)]
    assert unmarked == [], "add <!-- readme-test: KIND --> (or skip: REASON) above these blocks"
    assert all(b.reason for b in blocks if b.kind == "skip")
    assert sorted(b.kind for b in blocks if b.kind != "skip") == sorted(RUN_KINDS)


@pytest.mark.parametrize("skipped", [b for b in readme_blocks() if b.kind == "skip"],
                         ids=lambda b: f"line{b.line}")
def test_blocks_that_cannot_run_here(skipped):
    pytest.skip(f"README.md line {skipped.line}: {skipped.reason}")


def test_venv_block(tmp_path):
    done = subprocess.run(["bash", "-c", block("venv") + '\ncommand -v python'], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / ".venv" / "bin" / "python")  # activated


def reader_env(tmp_path: Path, seeded_hub_cache: Path) -> dict[str, str]:
    """A reader's shell: this checkout's `lemonade` and `python` first on PATH, a private cache that
    holds the embedded model, online (the hub is the loopback one, set by the caller)."""
    env = make_env(tmp_path, seeded_hub_cache)
    env.pop("HF_HUB_OFFLINE", None)
    env.update(PATH=f"{SCRIPTS}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(ROOT))
    for name in ("LEMONADE_PORT", "LEMONADE_HOST", "LEMONADE_LLAMACPP", "DISPLAY", "WAYLAND_DISPLAY"):
        env.pop(name, None)
    return env


def first_json(output: str, start: str) -> dict:
    """The JSON object that begins at the first `start` in `output` (what follows it is ignored)."""
    return json.JSONDecoder().raw_decode(output[output.index(start):])[0]


def run_block(host, kind: str, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one README block in the namespace, as a reader would paste it. Its output goes to files, not
    pipes: a server a block starts in the background keeps the block's stdout open for its whole life."""
    (found,) = [b for b in readme_blocks() if b.kind == kind]
    argv = ["python", "-c", found.text] if found.language == "python" else ["bash", "-c", found.text]
    out, err = cwd / f"{kind}.out", cwd / f"{kind}.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        code = host.run(argv, cwd=cwd, env=env, timeout=timeout, check=False, capture_output=False,
                        stdout=stdout, stderr=stderr).returncode
    return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())


def test_command_blocks_in_order(network, tmp_path, seeded_hub_cache, llama_server_bin):
    host = network.add_host("readme")
    work = tmp_path / "work"
    work.mkdir()
    env = reader_env(tmp_path, seeded_hub_cache)
    gemma = next((seeded_hub_cache / "models--hugginllam--gemma-3-270m-Q4_K_M-GGUF" / "blobs").iterdir())
    os.link(gemma, work / "my-model.gguf")  # the local GGUF of the `local-gguf` block

    hub = host.popen([sys.executable, "-c", HUB_SCRIPT, str(ROOT / "tests"), str(gemma)], env=env,
                     stdout=subprocess.PIPE, text=True)
    env["HF_ENDPOINT"] = hub.stdout.readline().strip()
    assert env["HF_ENDPOINT"].startswith("http://127.0.0.1:"), "the loopback hub did not start"

    done = run_block(host, "try-it", work, env)
    assert done.returncode == 0, done.stdout + done.stderr + (work / "lemonade-serve.log").read_text()
    assert done.stdout.strip() and "Traceback" not in done.stderr  # the model's answer

    done = run_block(host, "status", work, env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Server is running on port 8000"
    assert lines[2].split()[0] == DEFAULT_MODEL  # loaded by the try-it request
    assert any(line.startswith("Model Name") and "Size (GB)" in line for line in lines)

    done = run_block(host, "real-model", work, env)
    assert done.returncode == 0, done.stderr
    assert "Model pulled successfully: user.Qwen3-0.6B" in done.stdout
    answer = first_json(done.stdout, "{")
    assert answer["model"] == "user.Qwen3-0.6B" and answer["choices"][0]["message"]["role"] == "assistant"

    done = run_block(host, "local-gguf", work, env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "success", done.stdout
    models = host.run(["curl", "-s", "localhost:8000/api/v1/models"], env=env).stdout
    assert "user.My-Model-GGUF" in {m["id"] for m in json.loads(models)["data"]}  # downloaded

    done = run_block(host, "several-models", work, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Lemonade Server stopped successfully." in done.stdout  # the try-it server made way
    assert "Model loaded: Gemma-3-270m-GGUF (pinned)" in done.stdout
    health = first_json(done.stdout, '{"all_models_loaded"')  # curl prints it with no newline
    assert health["max_models"]["llm"] == 2 and health["all_models_loaded"][0]["pinned"] is True
    assert done.stdout.rstrip().endswith("Model unloaded: Gemma-3-270m-GGUF")

    done = run_block(host, "ollama-client", work, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("['Gemma-3-270m-GGUF:latest'")

    done = run_block(host, "anthropic-client", work, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "input_tokens=" in done.stdout

    done = run_block(host, "security-key", work, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Lemonade Server stopped successfully." in done.stdout  # the unkeyed server made way
    listed = first_json(done.stdout, '{"data"')
    assert DEFAULT_MODEL in {m["id"] for m in listed["data"]}  # /v1/models with the key
    assert "lemonade_" in done.stdout  # /metrics with the key
    assert "SyncPage[Model]" in done.stdout  # the openai client with the key
    refused = host.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "localhost:8000/v1/models"], env=env)
    assert refused.stdout == "401"  # the key is really required

    stop = host.run(["lemonade", "stop"], env=env, check=False)
    assert "Lemonade Server stopped successfully." in stop.stdout
    assert not (Path(env["LEMONADE_RUNTIME_DIR"]) / "lemonade-router.pid").exists()


def test_try_it_fails_clearly_when_the_server_cannot_start(network, tmp_path, seeded_hub_cache):
    """The same block, with a server that exits at once (a backend name it refuses): the reader gets
    the log's last lines and a failing status at once, not a traceback after a long wait."""
    host = network.add_host("fail")
    env = {**reader_env(tmp_path, seeded_hub_cache), "LEMONADE_LLAMACPP": "cpu"}
    started = time.monotonic()
    done = run_block(host, "try-it", tmp_path, env, timeout=120)
    assert time.monotonic() - started < 30
    assert done.returncode != 0
    assert done.stdout.startswith("lemonade serve is not answering; the end of lemonade-serve.log:\n")
    assert "--llamacpp: cpu not in {vulkan,rocm,metal}" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_pytest_example(tmp_path, lemonade_server_env):
    """The README's test file, in a project of its own, run by pytest with lemonade's plugin."""
    done, _ = run_project(tmp_path, lemonade_server_env, source=block("pytest-example"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_the_files_the_blocks_leave_are_ignored_by_git():
    """Run in a checkout, the blocks leave `lemonade-serve.log` (try-it) and `.venv/` (venv) behind;
    the README says git ignores them."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("lemonade-serve.log", ".venv/bin/python"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, timeout=30)
        assert done.returncode == 0, f"{path} is not ignored by git"
