"""Pull, list, delete and auto-download end to end: the installed CLI and server against the loopback
hub, with the real `huggingface_hub` reading and writing the same cache."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
import huggingface_hub  # noqa: E402

from conftest import DEFAULT_MODEL, free_port, wait_for  # noqa: E402
from hfhub import gguf_bytes, hub, hub_env  # noqa: E402,F401  (hub is a fixture)

TINY = {"tiny-Q4_0.gguf": gguf_bytes(300_000, seed=11), "tiny-Q8_0.gguf": gguf_bytes(200_000, seed=12),
        "config.json": b'{"model_type": "tiny"}\n', "README.md": b"# tiny\n"}
QWEN_REPO = "unsloth/Qwen3-0.6B-GGUF"


@pytest.fixture
def env(hub, tmp_path, seeded_hub_cache):
    """Lemonade pointed at the loopback hub; the cache already holds the embedded model (hard links)."""
    root = tmp_path / "pull"  # apart from the dirs of conftest's lemonade_env in the same tmp_path
    shutil.copytree(seeded_hub_cache, root / "hub", symlinks=True, copy_function=os.link)
    environment = hub_env(hub, root / "hub")
    (root / "run").mkdir()
    environment.update(LEMONADE_CACHE_DIR=str(root / "lemonade"), LEMONADE_CI_MODE="1",
                       LEMONADE_RUNTIME_DIR=str(root / "run"), LEMONADE_PORT=str(free_port()))
    return {k: v for k, v in environment.items() if not k.lower().endswith("_proxy")}


def gemma_blob(seeded_hub_cache: Path) -> Path:
    return next((seeded_hub_cache / "models--hugginllam--gemma-3-270m-Q4_K_M-GGUF" / "blobs").iterdir())


def lemonade(env, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("lemonade"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_cli_pull_is_seen_by_huggingface_hub(hub, env, tmp_path):
    hub.add_repo("org/tiny-GGUF", TINY)
    done = lemonade(env, "pull", "user.Tiny", "--checkpoint", "org/tiny-GGUF:Q4_0", "--recipe", "llamacpp")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "Pulling model: user.Tiny"
    assert done.stdout.splitlines()[-1] == "Model pulled successfully: user.Tiny"

    cache = Path(env["HF_HUB_CACHE"])
    path = huggingface_hub.hf_hub_download("org/tiny-GGUF", "tiny-Q4_0.gguf", cache_dir=cache,
                                           local_files_only=True)
    assert Path(path).read_bytes() == TINY["tiny-Q4_0.gguf"]
    (repo,) = [r for r in huggingface_hub.scan_cache_dir(cache).repos if r.repo_id == "org/tiny-GGUF"]
    (revision,) = repo.revisions
    assert revision.commit_hash == hub.repos["org/tiny-GGUF"].commit
    assert {f.file_name for f in revision.files} == {"tiny-Q4_0.gguf", "config.json"}
    assert {f.file_name: f.size_on_disk for f in revision.files}["tiny-Q4_0.gguf"] == 300_000

    registry = json.loads((Path(env["LEMONADE_CACHE_DIR"]) / "user_models.json").read_text())
    assert registry == {"Tiny": {"checkpoint": "org/tiny-GGUF:Q4_0", "recipe": "llamacpp", "suggested": True,
                                 "labels": ["custom"]}}
    listing = lemonade(env, "list")
    row = next(line for line in listing.stdout.splitlines() if line.startswith("user.Tiny"))
    assert row.split() == ["user.Tiny", "Yes", "0.00", "llamacpp"]  # Size (GB): 300 kB on disk

    deleted = lemonade(env, "delete", "user.Tiny")
    assert deleted.returncode == 0, deleted.stderr
    assert not (cache / "models--org--tiny-GGUF").exists()
    assert json.loads((Path(env["LEMONADE_CACHE_DIR"]) / "user_models.json").read_text()) == {}


def test_eight_concurrent_pulls_keep_every_registry_entry(hub, env):
    hub.add_repo("org/tiny-GGUF", TINY)
    procs = [subprocess.Popen([shutil.which("lemonade"), "pull", f"user.M{i}", "--checkpoint",
                               "org/tiny-GGUF:Q4_0", "--recipe", "llamacpp"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(8)]
    outcomes = [(p.wait(timeout=300), p.stderr.read().decode()) for p in procs]
    assert all(code == 0 for code, _ in outcomes), outcomes
    registry = json.loads((Path(env["LEMONADE_CACHE_DIR"]) / "user_models.json").read_text())
    assert sorted(registry) == [f"M{i}" for i in range(8)]


@pytest.mark.parametrize("flag", ["LEMONADE_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_pull_sends_nothing(hub, env, flag):
    hub.add_repo("org/tiny-GGUF", TINY)
    env[flag] = "1"
    lemonade(env, "pull", "user.Tiny", "--checkpoint", "org/tiny-GGUF:Q4_0", "--recipe", "llamacpp")
    assert hub.requests() == []


def test_pull_validation_messages(env):
    unknown = lemonade(env, "pull", "NotAModel", "--checkpoint", "org/tiny-GGUF:Q4_0", "--recipe", "llamacpp")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == (
        "Error pulling model: When registering a new model, the model name must include the `user` "
        "namespace, for example `user.Phi-4-Mini-GGUF`. Received: NotAModel")
    no_variant = lemonade(env, "pull", "user.X", "--checkpoint", "org/x-GGUF", "--recipe", "llamacpp")
    assert no_variant.returncode == 1 and "You are required to provide a 'variant'" in no_variant.stderr
    unregistered = lemonade(env, "pull", "user.X")
    assert unregistered.returncode == 1 and "is not registered with Lemonade Server" in unregistered.stderr


def test_snapshot_download_by_huggingface_hub_then_serve_offline(hub, env, seeded_hub_cache, server_factory,
                                                                 tmp_path):
    hub.add_repo(QWEN_REPO, {"Qwen3-0.6B-Q4_0.gguf": gemma_blob(seeded_hub_cache),
                             "config.json": b"{}\n"})
    cache = Path(env["HF_HUB_CACHE"])
    huggingface_hub.snapshot_download(QWEN_REPO, cache_dir=cache, endpoint=hub.endpoint)
    hub.clear_log()
    env["HF_HUB_OFFLINE"] = "1"
    listing = lemonade(env, "list")
    assert next(line for line in listing.stdout.splitlines()
                if line.startswith("Qwen3-0.6B-GGUF ")).split() == \
        ["Qwen3-0.6B-GGUF", "Yes", f"{gemma_blob(seeded_hub_cache).stat().st_size / 1e9:.2f}", "llamacpp"]
    server = server_factory(env=env)
    reply = requests.post(server.api + "/chat/completions", timeout=300, json={
        "model": "Qwen3-0.6B-GGUF", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["choices"]
    assert hub.requests() == []


def test_first_chat_downloads_then_loads(hub, env, seeded_hub_cache, server_factory):
    hub.add_repo(QWEN_REPO, {"Qwen3-0.6B-Q4_0.gguf": gemma_blob(seeded_hub_cache)})
    server = server_factory(env=env)
    reply = requests.post(server.api + "/chat/completions", timeout=600, json={
        "model": "Qwen3-0.6B-GGUF", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["choices"]
    assert [r.file for r in hub.body_gets()] == ["Qwen3-0.6B-Q4_0.gguf"]
    models = requests.get(server.api + "/models").json()["data"]
    assert "Qwen3-0.6B-GGUF" in {m["id"] for m in models}


def test_pull_stream_reports_progress(hub, env, server_factory):
    hub.add_repo("org/tiny-GGUF", TINY)
    server = server_factory(env=env)
    with requests.post(server.api + "/pull", stream=True, timeout=120, json={
            "model_name": "user.Tiny", "checkpoint": "org/tiny-GGUF:Q8_0", "recipe": "llamacpp",
            "stream": True}) as reply:
        assert reply.headers["Content-Type"] == "text/event-stream"
        events = [block for block in reply.text.split("\n\n") if block]
    kinds = [block.split("\n")[0] for block in events]
    assert kinds[-1] == "event: complete" and "event: progress" in kinds
    last = json.loads(events[-2].split("data: ", 1)[1])
    assert last["percent"] == 100.0 and last["bytes_downloaded"] == last["bytes_total"]
    answer = requests.post(server.api + "/pull", json={"model_name": "user.Nope", "stream": True}, timeout=60)
    assert answer.text.startswith("event: error\ndata: ")


def test_delete_refuses_paths_outside_the_cache(env, tmp_path, server_factory):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    cache = Path(env["HF_HUB_CACHE"])
    cache.mkdir(parents=True, exist_ok=True)
    registry = Path(env["LEMONADE_CACHE_DIR"])
    registry.mkdir(parents=True, exist_ok=True)
    (registry / "user_models.json").write_text(json.dumps({
        "Escape": {"checkpoint": "../precious:x", "recipe": "llamacpp", "labels": ["custom"]},
        "Upload": {"checkpoint": "../precious", "recipe": "llamacpp", "source": "local_upload"}}))
    server = server_factory(env=env)
    for name in ("user.Escape", "user.Upload"):
        reply = requests.post(server.api + "/delete", json={"model_name": name}, timeout=30)
        assert reply.status_code == 400, reply.text
        assert "error" in reply.json()
    assert (outside / "keep.txt").read_text() == "keep"
    assert DEFAULT_MODEL in {m["id"] for m in requests.get(server.api + "/models").json()["data"]}


def test_cli_pull_through_running_server_shows_progress(hub, env, server_factory):
    hub.add_repo("org/tiny-GGUF", TINY)
    server = server_factory(env=env)
    done = lemonade(env, "pull", "user.Tiny", "--checkpoint", "org/tiny-GGUF:Q4_0", "--recipe", "llamacpp")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Pulling model: user.Tiny" and lines[-1] == "Model pulled successfully: user.Tiny"
    assert any(line.startswith("tiny-Q4_0.gguf (1/2): 300000/300000 bytes") for line in lines), lines
    # The request line is logged once the handler returns, which may be after the CLI read the end.
    wait_for(lambda: "POST /api/v1/pull - 200" in server.log_text(), 10, what="the request log line")
    assert "user.Tiny" in {m["id"] for m in requests.get(server.api + "/models").json()["data"]}


def test_cli_pull_draws_a_bar_on_a_tty(hub, env):
    import pty

    hub.add_repo("org/tiny-GGUF", TINY)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([shutil.which("lemonade"), "pull", "user.Tiny", "--checkpoint",
                             "org/tiny-GGUF:Q4_0", "--recipe", "llamacpp"],
                            env=env, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    output = b""
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        output += data
    assert proc.wait(timeout=60) == 0
    os.close(leader)
    text = output.decode("utf-8", "replace")
    assert "\r[" in text and "100.0%" in text and "MB/s" in text and "ETA" in text, text
    assert "Model pulled successfully: user.Tiny" in text
