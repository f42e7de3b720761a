"""A pull onto a full disk (issue 15 item 8): the HF cache is a 4 MB tmpfs, the model is 12 MB.

The streaming pull must end with an `error` event that says no space is left, with the file's
cache-relative path and the bytes needed, at once (not after a stall); `lemonade pull` must print that
message, through a running server and without one. Needs root (mount); skipped otherwise.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import free_port, start_server, wait_for
from hfhub import Fault, gguf_bytes, hub, hub_env  # noqa: F401  (hub is a fixture)

BIG = {"big-Q4_0.gguf": gguf_bytes(12_000_000, seed=21), "config.json": b'{"model_type": "big"}\n'}
PULL = {"model_name": "user.Big", "checkpoint": "org/big-GGUF:Q4_0", "recipe": "llamacpp"}
NEEDED = 12_000_000

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MB tmpfs, unmounted at teardown."""
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def env(hub, tmp_path, tiny_disk):
    hub.add_repo("org/big-GGUF", BIG)
    environment = hub_env(hub, tiny_disk / "hub")
    run = tmp_path / "run"
    run.mkdir()
    environment.update(LEMONADE_CACHE_DIR=str(tmp_path / "lemonade"), LEMONADE_CI_MODE="1",
                       LEMONADE_RUNTIME_DIR=str(run), LEMONADE_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    return {k: v for k, v in environment.items() if not k.lower().endswith("_proxy")}


def assert_no_space_message(text: str) -> None:
    assert "No space left" in text, text
    assert f"need {NEEDED} bytes" in text, text
    # The file by its place in the cache, never the server's absolute path.
    assert "models--org--big-GGUF/blobs/" in text and ".incomplete" in text, text
    assert "tiny-disk" not in text, text


def test_streaming_pull_reports_no_space_at_once(env, tmp_path):
    server = start_server(env, tmp_path)
    try:
        start = time.monotonic()
        with requests.post(server.api + "/pull", json={**PULL, "stream": True}, stream=True, timeout=30) as reply:
            assert reply.status_code == 200
            body = reply.raw.read()  # the whole stream: it must end, with a proper chunked end
        assert time.monotonic() - start < 20
        events = [block for block in body.decode().split("\n\n") if block]
        assert events[-1].startswith("event: error\ndata: "), events
        error = json.loads(events[-1].split("data: ", 1)[1])["error"]
        assert_no_space_message(error)
        assert "user.Big" not in requests.get(server.api + "/models?show_all=true").json()["data"]
        # The JSON variant says the same, with a 507 (Insufficient Storage).
        reply = requests.post(server.api + "/pull", json=PULL, timeout=30)
        assert reply.status_code == 507
        assert_no_space_message(reply.json()["error"])
        # What `lemonade pull` prints through the running server.
        done = subprocess.run([shutil.which("lemonade"), "pull", "user.Big", "--checkpoint", PULL["checkpoint"],
                               "--recipe", "llamacpp"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert_no_space_message(done.stdout + done.stderr)
    finally:
        server.stop()


def test_disk_filling_mid_download_is_the_same_error(env, hub, tiny_disk, tmp_path):
    """The space check passes (3 MB of 4 MB), then something else fills the disk while the download
    stalls; the resumed write hits ENOSPC and the stream says so."""
    hub.add_repo("org/mid-GGUF", {"mid-Q4_0.gguf": gguf_bytes(3_000_000, seed=22)})
    hub.add_fault("org/mid-GGUF", "mid-Q4_0.gguf", Fault(stall_after=1_000_000, stall_seconds=3))
    server = start_server(env, tmp_path)
    try:
        blobs = tiny_disk / "hub" / "models--org--mid-GGUF" / "blobs"
        with requests.post(server.api + "/pull", stream=True, timeout=60, json={
                "model_name": "user.Mid", "checkpoint": "org/mid-GGUF:Q4_0", "recipe": "llamacpp",
                "stream": True}) as reply:
            def partial_size() -> int:
                return sum(p.stat().st_size for p in blobs.glob("*.incomplete")) if blobs.is_dir() else 0

            wait_for(lambda: partial_size() >= 1_000_000, 30, what="the first MB to be written")
            with open(tiny_disk / "filler", "wb") as filler:  # another writer takes the rest of the disk
                try:
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()
                except OSError:
                    pass
            body = reply.raw.read()
        events = [block for block in body.decode().split("\n\n") if block]
        assert events[-1].startswith("event: error\ndata: "), events
        error = json.loads(events[-1].split("data: ", 1)[1])["error"]
        assert "No space left" in error and "models--org--mid-GGUF/blobs/" in error, error
        assert "tiny-disk" not in error, error
    finally:
        server.stop()


def test_cli_pull_without_server_reports_no_space(env):
    done = subprocess.run([shutil.which("lemonade"), "pull", "user.Big", "--checkpoint", PULL["checkpoint"],
                           "--recipe", "llamacpp"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert_no_space_message(done.stdout + done.stderr)
    assert not Path(env["LEMONADE_CACHE_DIR"], "user_models.json").exists()
