"""Offline pulls (issue: offline `pull` of a model that is not in the cache answered success). Offline,
a pull of a model that is complete succeeds; of one that is not, it fails with a message naming the
model, the offline setting and what is missing, a non-zero CLI exit, and nothing written to the cache
or the registry. Over HTTP (JSON and SSE), through the CLI with and without a server."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from api_support import GEMMA_CHECKPOINT, running_server
from conftest import DEFAULT_MODEL, free_port

MISSING = "Qwen3-0.6B-GGUF"  # a built-in whose files are not in the test cache
MISSING_CKPT = "unsloth/Qwen3-0.6B-GGUF:Q4_0"


def expected(setting: str, model: str = MISSING, missing: str = f"the files of {MISSING_CKPT}") -> str:
    return (f"Model {model} is not downloaded, and offline mode ({setting}) forbids downloading it. "
            f"Missing: {missing}")


def tree(root: Path) -> list[str]:
    """Every path under `root` with its size: what "nothing written" is checked against."""
    return sorted(f"{p.relative_to(root)}:{p.lstat().st_size if not p.is_dir() else 'd'}" for p in root.rglob("*"))


def lemonade(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("lemonade"), *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache):
    with running_server(tmp_path_factory.mktemp("offline"), seeded_hub_cache) as s:
        yield s


def test_http_pull_of_a_missing_model_is_a_clear_error_and_writes_nothing(server):
    hub, user_file = Path(server.env["HF_HUB_CACHE"]), Path(server.env["LEMONADE_CACHE_DIR"]) / "user_models.json"
    before = tree(hub)
    for key in ("model", "model_name"):
        r = requests.post(server.api + "/pull", json={key: MISSING}, timeout=60)
        assert r.status_code == 400
        assert r.json() == {"error": expected("HF_HUB_OFFLINE=1")}
    r = requests.post(server.api + "/pull", json={"model": "user.New", "checkpoint": "org/new-GGUF:new-Q4_0.gguf",
                                                  "recipe": "llamacpp"}, timeout=60)
    assert r.status_code == 400
    assert r.json() == {"error": expected("HF_HUB_OFFLINE=1", "user.New", "new-Q4_0.gguf")}
    assert tree(hub) == before and not user_file.exists()


def test_http_streamed_pull_of_a_missing_model_ends_with_an_error_event(server):
    with requests.post(server.api + "/pull", json={"model": MISSING, "stream": True}, stream=True, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines(decode_unicode=True) if line]
    assert lines == ["event: error", "data: " + json.dumps({"error": expected("HF_HUB_OFFLINE=1")},
                                                              separators=(",", ":"))]


def test_http_pull_of_a_complete_model_succeeds_offline(server):
    r = requests.post(server.api + "/pull", json={"model": DEFAULT_MODEL}, timeout=60)
    assert r.status_code == 200 and r.json() == {"model_name": DEFAULT_MODEL, "status": "success"}


def test_cli_pull_without_a_server(lemonade_env):
    env = {**lemonade_env, "LEMONADE_PORT": str(free_port())}
    hub = Path(env["HF_HUB_CACHE"])
    before = tree(hub)
    done = lemonade(env, "pull", MISSING)
    assert done.returncode == 1
    assert done.stderr.strip() == f"Error pulling model: {expected('HF_HUB_OFFLINE=1')}"
    assert tree(hub) == before
    done = lemonade(env, "pull", DEFAULT_MODEL)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == f"Model pulled successfully: {DEFAULT_MODEL}"


def test_cli_pull_through_a_server_with_lemonade_offline(tmp_path, seeded_hub_cache):
    env_extra = {"HF_HUB_OFFLINE": "", "LEMONADE_OFFLINE": "1"}
    with running_server(tmp_path, seeded_hub_cache, env_extra=env_extra) as server:
        before = tree(Path(server.env["HF_HUB_CACHE"]))
        done = lemonade(server.env, "pull", MISSING, "--checkpoint", MISSING_CKPT)
        assert done.returncode == 1
        assert done.stderr.strip() == (
            f"Error pulling model: {expected('LEMONADE_OFFLINE=1')}")
        assert tree(Path(server.env["HF_HUB_CACHE"])) == before
        assert not (Path(server.env["LEMONADE_CACHE_DIR"]) / "user_models.json").exists()
        done = lemonade(server.env, "pull", DEFAULT_MODEL)
        assert done.returncode == 0, done.stderr


def test_cli_pull_of_a_registered_user_model_keeps_the_registry(tmp_path, seeded_hub_cache):
    user_models = {"Kept": {"checkpoint": GEMMA_CHECKPOINT, "recipe": "llamacpp", "labels": ["custom"]}}
    with running_server(tmp_path, seeded_hub_cache, user_models=user_models) as server:
        registry = Path(server.env["LEMONADE_CACHE_DIR"]) / "user_models.json"
        before = registry.read_bytes()
        done = lemonade(server.env, "pull", "user.Other", "--checkpoint", "org/x-GGUF:x.gguf", "--recipe", "llamacpp")
        assert done.returncode == 1 and "offline mode (HF_HUB_OFFLINE=1)" in done.stderr
        assert registry.read_bytes() == before
        assert os.path.getsize(registry) > 0
