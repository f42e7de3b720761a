"""Faults during a download: cut body, corrupt byte, stall, 416, 200 to a Range, 5xx, and SIGKILL
of the downloading process at random points of the real 250 MB gemma GGUF."""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hfhub import GEMMA_FILE, GEMMA_REPO, Fault, file_sha256, gemma_gguf, gguf_bytes, hf_env, hub  # noqa: F401
from lemonade.error_types import DownloadError, LemonadeError
from lemonade.model_manager.hf_download import download_checkpoint, is_checkpoint_downloaded
from lemonade.model_manager.hf_select import gguf_selection

GGUF = gguf_selection()

pytestmark = pytest.mark.timeout(120)

REPO = "org/faulty-GGUF"
NAME = "faulty-Q4_0.gguf"
DATA = gguf_bytes(4_000_000, seed=42)
SHA = hashlib.sha256(DATA).hexdigest()


def blobs(cache: Path, repo: str = REPO) -> Path:
    return cache / ("models--" + repo.replace("/", "--")) / "blobs"


def cdn_gets(hub) -> list:
    return hub.requests(server="cdn", method="GET")


def range_start(request) -> int | None:
    value = request.header("Range")
    return int(value[len("bytes="):-1]) if value else None


def assert_complete(cache: Path) -> None:
    blob = blobs(cache) / SHA
    assert blob.read_bytes() == DATA
    assert not (blobs(cache) / f"{SHA}.incomplete").exists()
    assert is_checkpoint_downloaded(f"{REPO}:Q4_0", GGUF)


@pytest.fixture
def faulty(hub, hf_env):
    hub.add_repo(REPO, {NAME: DATA, "config.json": b"{}"})
    return hub


def test_cut_body_resumes_with_range(faulty, hf_env):
    faulty.add_fault(REPO, NAME, Fault(cut_after=1_234_567))
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    gets = cdn_gets(faulty)
    assert len(gets) == 2 and range_start(gets[0]) is None
    # The resume point is what reached the disk: whole chunks, at most the cut.
    assert 0 < range_start(gets[1]) <= 1_234_567 and gets[1].status == 206
    assert_complete(hf_env)


def test_cut_twice_in_a_row_and_then_small_file_cut(faulty, hf_env):
    faulty.add_fault(REPO, NAME, Fault(cut_after=2_500_000))
    faulty.add_fault(REPO, NAME, Fault(cut_after=3_500_000))
    faulty.add_fault(REPO, "config.json", Fault(cut_after=1))
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    starts = [range_start(g) for g in cdn_gets(faulty)]
    assert starts[0] is None and 0 < starts[1] <= 2_500_000 and starts[1] < starts[2] <= 3_500_000
    config_gets = faulty.requests(server="hub", method="GET", path_contains="config.json")
    assert len(config_gets) == 2 and config_gets[-1].status in (200, 206)
    assert_complete(hf_env)


def test_every_interruption_that_brings_bytes_resets_the_retry_budget(faulty, hf_env):
    for i in range(1, 9):  # 8 cuts in a row, more than the 5 tries without progress
        faulty.add_fault(REPO, NAME, Fault(cut_after=i * 450_000))
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    assert len(cdn_gets(faulty)) == 9
    assert_complete(hf_env)


def test_expired_cdn_url_is_refreshed_once(faulty, hf_env):
    faulty.add_fault(REPO, NAME, Fault(status=403))
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    heads = faulty.requests(method="HEAD", path_contains=NAME)
    assert len(heads) == 2 and [g.status for g in cdn_gets(faulty)] == [403, 200]
    assert_complete(hf_env)


def test_a_raising_progress_callback_cancels_and_the_next_pull_resumes(faulty, hf_env):
    faulty.throttle_bps = 20e6  # so the callback sees the file arrive in several reads

    class Cancelled(Exception):
        pass

    def cancel_half_way(event):
        if event.file == NAME and event.bytes_done >= 2_000_000:
            raise Cancelled

    with pytest.raises(Cancelled):
        download_checkpoint(f"{REPO}:Q4_0", GGUF, progress=cancel_half_way)
    part = blobs(hf_env) / f"{SHA}.incomplete"
    kept = part.stat().st_size
    assert kept >= 2_000_000 and not is_checkpoint_downloaded(f"{REPO}:Q4_0", GGUF)
    faulty.clear_log()
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    assert [range_start(g) for g in cdn_gets(faulty)] == [kept]
    assert_complete(hf_env)


def test_corrupt_byte_is_detected_and_redownloaded(faulty, hf_env):
    faulty.add_fault(REPO, NAME, Fault(corrupt_at=3_000_000))
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    assert [g.header("Range") for g in cdn_gets(faulty)] == [None, None]  # the whole file again
    assert_complete(hf_env)


def test_persistent_corruption_fails_without_a_blob(faulty, hf_env):
    faulty.add_fault(REPO, NAME, Fault(corrupt_at=10, times=99))
    with pytest.raises(DownloadError, match="does not match its checksum"):
        download_checkpoint(f"{REPO}:Q4_0", GGUF)
    assert not (blobs(hf_env) / SHA).exists()
    assert not (blobs(hf_env) / f"{SHA}.incomplete").exists()
    assert not is_checkpoint_downloaded(f"{REPO}:Q4_0", GGUF)


def test_corrupt_partial_left_on_disk_is_caught(faulty, hf_env):
    part = blobs(hf_env) / f"{SHA}.incomplete"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"XXXX" + DATA[4:1_000_000])  # a previous run's bytes, rotten
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    assert [g.header("Range") for g in cdn_gets(faulty)] == ["bytes=1000000-", None]
    assert_complete(hf_env)


def test_stall_times_out_then_resumes(faulty, hf_env):
    faulty.add_fault(REPO, NAME, Fault(stall_after=2_200_000, stall_seconds=6))  # client read timeout: 2 s
    started = time.monotonic()
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    assert time.monotonic() - started < 6  # gave up on the stalled connection, did not wait it out
    starts = [range_start(g) for g in cdn_gets(faulty)]
    assert starts[0] is None and 0 < starts[1] <= 2_200_000 and len(starts) == 2
    assert_complete(hf_env)


def test_416_discards_the_partial_and_restarts(faulty, hf_env):
    part = blobs(hf_env) / f"{SHA}.incomplete"
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA[:500_000])
    faulty.add_fault(REPO, NAME, Fault(status=416))
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    gets = cdn_gets(faulty)
    assert [(g.header("Range"), g.status) for g in gets] == [("bytes=500000-", 416), (None, 200)]
    assert_complete(hf_env)


def test_200_to_a_range_truncates_and_restarts(faulty, hf_env):
    part = blobs(hf_env) / f"{SHA}.incomplete"
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA[:700_000])
    faulty.add_fault(REPO, NAME, Fault(ignore_range=True))
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    assert [(g.header("Range"), g.status) for g in cdn_gets(faulty)] == [("bytes=700000-", 200)]
    assert_complete(hf_env)


def test_oversized_partial_is_truncated(faulty, hf_env):
    part = blobs(hf_env) / f"{SHA}.incomplete"
    part.parent.mkdir(parents=True)
    part.write_bytes(DATA + b"garbage")
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    assert [g.header("Range") for g in cdn_gets(faulty)] == [None]
    assert_complete(hf_env)


@pytest.mark.parametrize("where", ["body", "resolve", "api"])
def test_5xx_is_retried_with_backoff(faulty, hf_env, where):
    path = "" if where == "api" else NAME
    faulty.add_fault(REPO, path, Fault(status=500, where=where, times=2))
    faulty.add_fault(REPO, path, Fault(status=503, where=where, times=1))
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    statuses = [r.status for r in faulty.log if r.status >= 500]
    assert statuses == [500, 500, 503]
    assert_complete(hf_env)


def test_5xx_forever_gives_up(faulty, hf_env):
    faulty.add_fault(REPO, NAME, Fault(status=502, times=1000))
    with pytest.raises(LemonadeError, match="502"):
        download_checkpoint(f"{REPO}:Q4_0", GGUF)
    assert 2 <= len(cdn_gets(faulty)) <= 10
    assert not is_checkpoint_downloaded(f"{REPO}:Q4_0", GGUF)


# ---------------------------------------------------------------- SIGKILL during the real gemma download

PULL = ("import sys; from lemonade.model_manager.hf_download import download_checkpoint; "
        "from lemonade.model_manager.hf_select import gguf_selection; "
        "download_checkpoint(sys.argv[1], gguf_selection())")
KILLS = 10


def _wait_for(condition, deadline: float, proc: subprocess.Popen, what: str) -> None:
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"downloader exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_sigkill_at_random_points_then_resume(hub, hf_env, tmp_path):
    path, sha = gemma_gguf()
    size = path.stat().st_size
    hub.add_repo(GEMMA_REPO, {GEMMA_FILE: path}, sha256={GEMMA_FILE: sha})
    hub.throttle_bps = 80e6  # ~3 s for the whole file: long enough to kill it ten times
    part = blobs(hf_env, GEMMA_REPO) / f"{sha}.incomplete"
    seed = int(time.time())
    rng = random.Random(seed)
    # One random point in each tenth of the file, so every run has new bytes to fetch before its kill.
    step = size // (KILLS + 1)
    targets = [step * i + rng.randrange(2 << 20, step - (2 << 20)) for i in range(KILLS)]
    checkpoint = f"{GEMMA_REPO}:Q4_K_M"
    log = open(tmp_path / "pull.log", "wb")
    on_disk = 0
    for n, target in enumerate(targets + [None]):
        hub.clear_log()
        proc = subprocess.Popen([sys.executable, "-c", PULL, checkpoint], stdout=log, stderr=log)
        try:
            if target is None:
                assert proc.wait(timeout=60) == 0, (tmp_path / "pull.log").read_text()
            else:
                _wait_for(lambda: part.exists() and part.stat().st_size >= target, time.monotonic() + 30, proc,
                          f"{target} bytes (seed {seed}, run {n})")
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        gets = hub.requests(server="cdn", method="GET")
        expected_range = f"bytes={on_disk}-" if on_disk else None
        assert [g.header("Range") for g in gets][:1] == [expected_range], f"seed {seed}, run {n}"
        if target is not None:
            assert not is_checkpoint_downloaded(checkpoint, GGUF)
            on_disk = part.stat().st_size
            assert on_disk >= target
    blob = blobs(hf_env, GEMMA_REPO) / sha
    assert file_sha256(blob) == sha and not part.exists()
    assert is_checkpoint_downloaded(checkpoint, GGUF)
    assert os.readlink(blob.parent.parent / "snapshots" / hub.repos[GEMMA_REPO].commit / GEMMA_FILE) == \
        f"../../blobs/{sha}"
