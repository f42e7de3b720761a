"""The HF downloader against the loopback hub: file selection, cache layout, auth, offline, delete."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import threading
from pathlib import Path

import pytest

from hfhub import LoopbackHub, git_blob_sha1, gguf_bytes, hf_env, hub  # noqa: F401 (fixtures)
from lemonade.error_types import DownloadError, InvalidRequestError
from lemonade.model_manager import hf_download
from lemonade.model_manager.hf_download import (
    DownloadProgress, delete_repo_cache, download_checkpoint, is_checkpoint_downloaded)
from lemonade.model_manager.hf_select import VARIANT_HINT, gguf_selection, whole_repo

GGUF = gguf_selection()

pytestmark = pytest.mark.timeout(60)

REPO = "org/tiny-GGUF"
Q4 = gguf_bytes(3_000_000, seed=4)
FILES = {
    "tiny-Q4_0.gguf": Q4,
    "tiny-Q8_0.gguf": gguf_bytes(40_000, seed=8),
    "mmproj-tiny-f16.gguf": gguf_bytes(20_000, seed=16),
    "config.json": b'{"model_type": "tiny"}\n',
    "tokenizer.json": b'{"version": "1.0"}\n',
    "README.md": b"# tiny\n",
}


def repo_dir(cache: Path, repo: str = REPO) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


# ---------------------------------------------------------------- select_files (spec §9.4), pure

SIB = ["b-Q4_0.gguf", "a-Q8_0.gguf", "mmproj-f16.gguf", "Q4_K_M/m-00002-of-00002.gguf",
       "Q4_K_M/m-00001-of-00002.gguf", "Q4_K_M/notes.txt", "sub/exact.gguf", "config.json",
       "tokenizer.model", "README.md"]
CONFIGS = ["config.json", "tokenizer.model"]


@pytest.mark.parametrize("variant,mmproj,expected", [
    ("*", "", sorted(f for f in SIB if f.endswith(".gguf")) + CONFIGS),     # case 0, mmproj included
    ("sub/exact.gguf", "", ["sub/exact.gguf"] + CONFIGS),                   # case 1, exact path
    ("", "", ["b-Q4_0.gguf"] + CONFIGS),                                    # case 2, repo order
    ("q8_0", "", ["a-Q8_0.gguf"] + CONFIGS),                                # case 3, case-insensitive
    ("f16", "", None),                                                      # see below
    ("q4_k_m", "", ["Q4_K_M/m-00001-of-00002.gguf", "Q4_K_M/m-00002-of-00002.gguf"] + CONFIGS),  # case 4
    ("Q4_0", "mmproj-f16.gguf", ["b-Q4_0.gguf", "mmproj-f16.gguf"] + CONFIGS),
])
def test_select_files_cases(variant, mmproj, expected):
    if expected is None:  # "f16" only matches the mmproj file, which case 3 excludes -> case 4 -> error
        with pytest.raises(DownloadError, match="No .gguf files found for variant f16"):
            gguf_selection(mmproj)(SIB, variant, "org/r")
        return
    assert gguf_selection(mmproj)(SIB, variant, "org/r") == expected


@pytest.mark.parametrize("siblings,variant,mmproj,message", [
    (["README.md"], "*", "", "No .gguf files found in repository org/r. "),
    (SIB, "missing.gguf", "", "File missing.gguf not found in Hugging Face repository org/r. "),
    (SIB, "SUB/EXACT.GGUF", "", "File SUB/EXACT.GGUF not found in Hugging Face repository org/r. "),
    (["mmproj-f16.gguf", "x.txt"], "", "", "No .gguf files found in Hugging Face repository org/r. "),
    (["a-Q4_0.gguf", "b-q4_0.gguf"], "Q4_0", "", "Multiple .gguf files found for variant Q4_0, but only one "
                                                 "is allowed. "),
    (SIB, "Q9_9", "", "No .gguf files found for variant Q9_9. "),
    (SIB, "Q4_0", "mmproj-nope.gguf", "The provided mmproj file mmproj-nope.gguf was not found in org/r."),
])
def test_select_files_errors_carry_the_cpp_messages(siblings, variant, mmproj, message):
    with pytest.raises(DownloadError) as info:
        gguf_selection(mmproj)(siblings, variant, "org/r")
    assert info.value.message.startswith(message)
    assert info.value.message.endswith(VARIANT_HINT) or "mmproj" in message


def test_select_files_other_recipes_take_every_file():
    assert whole_repo(SIB, "Q4_0") == SIB
    assert whole_repo(["a.onnx", "genai_config.json"], "") == ["a.onnx", "genai_config.json"]


def test_select_files_mmproj_suffix_is_excluded_from_case_3():
    sib = ["m-Q4_0.gguf", "mmproj-m-Q4_0.gguf"]
    assert gguf_selection("")(sib, "Q4_0") == ["m-Q4_0.gguf"]


# ---------------------------------------------------------------- download and layout

def test_download_writes_the_standard_cache_layout(hub, hf_env):
    repo = hub.add_repo(REPO, FILES)
    events: list[DownloadProgress] = []
    snap = download_checkpoint(f"{REPO}:Q4_0", GGUF, progress=events.append)

    base = repo_dir(hf_env)
    assert snap == base / "snapshots" / repo.commit
    assert (base / "refs" / "main").read_bytes() == repo.commit.encode()  # 40 hex, no newline
    assert (hf_env / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    assert sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*")) == [
        "config.json", "tiny-Q4_0.gguf", "tokenizer.json"]
    for name in ("tiny-Q4_0.gguf", "config.json", "tokenizer.json"):
        link = snap / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link))
        blob = link.resolve()
        assert blob.parent == (base / "blobs").resolve()
        expected_etag = (hashlib.sha256(FILES[name]).hexdigest() if name.endswith(".gguf")
                         else git_blob_sha1(FILES[name]))
        assert blob.name == expected_etag
        assert blob.read_bytes() == FILES[name]
        assert (hf_env / ".locks" / base.name / f"{expected_etag}.lock").exists()
    assert not list((base / "blobs").glob("*.incomplete"))
    assert (base / "trees" / f"{repo.commit}.json").exists()

    assert events[-1].total_done == events[-1].total_bytes == sum(len(FILES[n]) for n in
                                                                  ("tiny-Q4_0.gguf", "config.json", "tokenizer.json"))
    assert events[-1].percent == 100.0 and events[-1].file_count == 3
    assert all(b.total_done >= a.total_done for a, b in zip(events, events[1:]))
    assert is_checkpoint_downloaded(f"{REPO}:Q4_0", GGUF)
    assert not is_checkpoint_downloaded(f"{REPO}:Q8_0", GGUF)


def test_second_pull_downloads_nothing_and_upgrade_reuses_unchanged_blobs(hub, hf_env):
    hub.add_repo(REPO, FILES)
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    hub.clear_log()
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    assert hub.body_gets() == [] and hub.requests(method="HEAD") == []

    new = hub.add_repo(REPO, {**FILES, "config.json": b'{"model_type": "tiny", "v": 2}\n'})
    hub.clear_log()
    snap = download_checkpoint(f"{REPO}:Q4_0", GGUF)
    assert snap.name == new.commit and (repo_dir(hf_env) / "refs" / "main").read_text() == new.commit
    assert [r.file for r in hub.body_gets()] == ["config.json"]  # the GGUF blob is shared
    assert (snap / "tiny-Q4_0.gguf").read_bytes() == Q4


def test_token_goes_to_the_hub_but_never_to_the_cdn(hub, hf_env, monkeypatch):
    hub.add_repo(REPO, FILES, private=True)
    with pytest.raises(DownloadError, match=r"status: 401\): repository not found, private or gated"):
        download_checkpoint(f"{REPO}:Q4_0", GGUF)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(DownloadError, match="invalid HF_TOKEN"):
        download_checkpoint(f"{REPO}:Q4_0", GGUF)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    hub.clear_log()
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    hub_requests, cdn_requests = hub.requests(server="hub"), hub.requests(server="cdn")
    assert hub_requests and cdn_requests
    assert all(r.header("Authorization") == f"Bearer {hub.token}" for r in hub_requests)
    assert all(r.header("Authorization") is None for r in cdn_requests)
    assert all(r.status in (200, 206) for r in cdn_requests)


def test_every_request_carries_our_user_agent(hub, hf_env):
    hub.add_repo(REPO, FILES)
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    agents = {r.header("User-Agent") for r in hub.log}
    assert agents == {hf_download.USER_AGENT} and agents != {None}
    assert hf_download.USER_AGENT.startswith("lemonade/")


def test_blob_mode_follows_the_umask_and_the_umask_is_never_touched(hub, hf_env, monkeypatch):
    """The blob gets 0o666 & ~umask from open() itself; the download never calls os.umask, which is
    process-wide: a flip to 0 and back races every other thread creating a file meanwhile."""
    hub.add_repo(REPO, FILES)
    old = os.umask(0o027)
    calls: list[tuple] = []
    real_umask = os.umask

    def spy(*args):
        calls.append(args)
        return real_umask(*args)

    try:
        monkeypatch.setattr(os, "umask", spy)
        worker = threading.Thread(target=download_checkpoint, args=(f"{REPO}:Q4_0", GGUF))
        worker.start()
        worker.join(30)
        monkeypatch.setattr(os, "umask", real_umask)
    finally:
        real_umask(old)
    assert calls == []
    blobs = sorted((repo_dir(hf_env) / "blobs").iterdir())
    assert len(blobs) == 3
    for blob in blobs:
        assert stat.S_IMODE(blob.stat().st_mode) == 0o640, blob.name


def test_a_disk_that_fills_while_writing_is_a_clear_error_and_nothing_counts(hub, hf_env):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    repo = hub.add_repo(REPO, FILES)
    etag = repo.files["tiny-Q4_0.gguf"].etag
    blobs = repo_dir(hf_env) / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{etag}.incomplete").symlink_to("/dev/full")
    with pytest.raises(DownloadError, match=rf"No space left on the disk to download tiny-Q4_0.gguf: need {len(Q4)} "
                                            r"bytes \(3.0 MB\)") as e:
        download_checkpoint(f"{REPO}:Q4_0", GGUF)
    # Named by its place in the cache, not the server's absolute path (issue 15 item 12).
    assert e.value.details["path"] == f"<HF cache>/{repo_dir(hf_env).name}/blobs/{etag}.incomplete"
    assert e.value.details["bytes_needed"] == len(Q4) and e.value.details["bytes_free"] > 0
    assert not (blobs / etag).exists() and not is_checkpoint_downloaded(f"{REPO}:Q4_0", GGUF)


@pytest.mark.parametrize("flag, value", [("HF_HUB_OFFLINE", "1"), ("LEMONADE_OFFLINE", "1"),
                                         ("LEMONADE_OFFLINE", "true"), ("LEMONADE_OFFLINE", "YES")])
def test_offline_sends_no_request(hub, hf_env, monkeypatch, flag, value):
    hub.add_repo(REPO, FILES)
    monkeypatch.setenv(flag, value)
    with pytest.raises(DownloadError, match="Offline mode"):
        download_checkpoint(f"{REPO}:Q4_0", GGUF)
    assert hub.log == []
    monkeypatch.delenv(flag)
    snap = download_checkpoint(f"{REPO}:Q4_0", GGUF)
    monkeypatch.setenv(flag, value)
    hub.clear_log()
    assert download_checkpoint(f"{REPO}:Q4_0", GGUF) == snap
    assert hub.log == []


def test_unreachable_hub_falls_back_to_the_cache(hub, hf_env, monkeypatch):
    hub.add_repo(REPO, FILES)
    snap = download_checkpoint(f"{REPO}:Q4_0", GGUF)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    assert download_checkpoint(f"{REPO}:Q4_0", GGUF) == snap
    with pytest.raises(hf_download.NetworkError):
        download_checkpoint(f"{REPO}:Q8_0", GGUF)


def test_missing_repo_revision_and_bad_ids(hub, hf_env):
    hub.add_repo(REPO, FILES)
    with pytest.raises(DownloadError, match="status: 401"):
        download_checkpoint("org/nope-GGUF:Q4_0", GGUF)
    with pytest.raises(DownloadError, match="revision not found"):
        download_checkpoint(f"{REPO}:Q4_0", GGUF, revision="v9")
    with pytest.raises(DownloadError, match="File nope.gguf not found"):
        download_checkpoint(f"{REPO}:nope.gguf", GGUF)
    for bad in ("../etc", "/abs/x", "a\\b", "a/b/c", ""):
        with pytest.raises(InvalidRequestError):
            download_checkpoint(f"{bad}:Q4_0", GGUF)
    assert not repo_dir(hf_env).exists() or not list(repo_dir(hf_env).rglob("*.gguf"))


def test_a_hub_file_path_that_escapes_the_snapshot_is_refused(hub, hf_env):
    hub.add_repo("org/evil", {"../../../escape.gguf": b"GGUF", "ok.gguf": b"GGUF"})
    with pytest.raises(InvalidRequestError):
        download_checkpoint("org/evil", whole_repo)
    assert not (hf_env.parent / "escape.gguf").exists() and hub.body_gets() == []


def test_head_follows_a_relative_redirect_of_a_renamed_repo(hub, hf_env):
    hub.add_repo("org/new-GGUF", FILES)
    hub.renamed["org/old-GGUF"] = "org/new-GGUF"
    snap = download_checkpoint("org/old-GGUF:Q4_0", GGUF)
    heads = [(r.status, r.path.split("/")[2]) for r in hub.requests(method="HEAD", path_contains="Q4_0")]
    assert heads == [(307, "old-GGUF"), (302, "new-GGUF")]
    assert (snap / "tiny-Q4_0.gguf").read_bytes() == Q4
    assert snap.parent.parent.name == "models--org--old-GGUF"  # cached under the name asked for, as HF does


def test_pinned_revision_writes_no_main_ref(hub, hf_env):
    repo = hub.add_repo(REPO, FILES)
    snap = download_checkpoint(f"{REPO}:Q8_0", GGUF, revision=repo.commit)
    assert snap.name == repo.commit
    assert not (repo_dir(hf_env) / "refs" / "main").exists()
    assert hub.requests(path_contains=f"/api/models/{REPO}/revision/{repo.commit}")
    assert is_checkpoint_downloaded(f"{REPO}:Q8_0", GGUF, revision=repo.commit)


def test_other_recipes_download_every_file(hub, hf_env):
    repo = hub.add_repo("org/onnx", {"model.onnx": b"\x08\x01" * 5000, "sub/genai_config.json": b"{}",
                                     "README.md": b"x"})
    snap = download_checkpoint("org/onnx", whole_repo)
    assert sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()) == [
        "README.md", "model.onnx", "sub/genai_config.json"]
    link = snap / "sub" / "genai_config.json"
    assert os.readlink(link) == f"../../../blobs/{repo.files['sub/genai_config.json'].git_sha1}"
    assert is_checkpoint_downloaded("org/onnx", whole_repo)


def test_concurrent_pulls_share_one_download(hub, hf_env):
    hub.add_repo(REPO, FILES)
    hub.throttle_bps = 20e6  # ~0.15 s for the GGUF: both pulls overlap on the blob lock
    errors: list[BaseException] = []

    def pull():
        try:
            download_checkpoint(f"{REPO}:Q4_0", GGUF)
        except BaseException as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(hub.requests(server="cdn", method="GET")) == 1
    assert is_checkpoint_downloaded(f"{REPO}:Q4_0", GGUF)


def test_not_enough_disk_space_is_a_clear_error(hub, hf_env, monkeypatch):
    hub.add_repo(REPO, FILES)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1_000_000))
    size = len(FILES["tiny-Q4_0.gguf"])
    with pytest.raises(DownloadError, match=rf"No space left on the disk to download tiny-Q4_0.gguf: need {size} "
                                            r"bytes \(3.0 MB\), 1000000 bytes \(1.0 MB\) free for "
                                            r"<HF cache>/.*\.incomplete") as e:
        download_checkpoint(f"{REPO}:Q4_0", GGUF)
    assert e.value.details["path"].startswith(f"<HF cache>/{repo_dir(hf_env).name}/blobs/")
    assert e.value.status == 507
    assert hub.requests(server="cdn") == []


# ---------------------------------------------------------------- is_checkpoint_downloaded, offline

def _write(path: Path, data: bytes = b"GGUF") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_cpp_layouts_count_as_downloaded(hf_env):
    base = repo_dir(hf_env, "org/cpp-A-GGUF")  # C++ A: real files in snapshots/main, no refs
    _write(base / "snapshots" / "main" / "m-Q4_0.gguf")
    assert is_checkpoint_downloaded("org/cpp-A-GGUF:Q4_0", GGUF)
    assert not is_checkpoint_downloaded("org/cpp-A-GGUF:Q8_0", GGUF)

    sha = "a" * 40  # C++ B: refs/main -> snapshots/<sha> with real files
    base = repo_dir(hf_env, "org/cpp-B-GGUF")
    _write(base / "snapshots" / sha / "m-Q4_0.gguf")
    _write(base / "refs" / "main", sha.encode())
    assert is_checkpoint_downloaded("org/cpp-B-GGUF:Q4_0", GGUF)
    _write(base / "refs" / "main", b"b" * 40)  # a ref to a missing snapshot: fall back to any snapshot
    assert is_checkpoint_downloaded("org/cpp-B-GGUF:Q4_0", GGUF)


def test_partial_shards_and_dangling_links_do_not_count(hf_env):
    snap = repo_dir(hf_env, "org/shard-GGUF") / "snapshots" / ("c" * 40)
    _write(snap / "Q4_K_M" / "m-Q4_K_M-00001-of-00002.gguf")
    assert not is_checkpoint_downloaded("org/shard-GGUF:Q4_K_M", GGUF)
    _write(snap / "Q4_K_M" / "m-Q4_K_M-00002-of-00002.gguf")
    assert is_checkpoint_downloaded("org/shard-GGUF:Q4_K_M", GGUF)

    snap = repo_dir(hf_env, "org/dangling-GGUF") / "snapshots" / ("d" * 40)
    snap.mkdir(parents=True)
    (snap / "m-Q4_0.gguf").symlink_to("../../blobs/" + "e" * 64)  # blob still .incomplete
    _write(repo_dir(hf_env, "org/dangling-GGUF") / "blobs" / ("e" * 64 + ".incomplete"))
    assert not is_checkpoint_downloaded("org/dangling-GGUF:Q4_0", GGUF)
    assert not is_checkpoint_downloaded("org/never-GGUF:Q4_0", GGUF)


# ---------------------------------------------------------------- delete

def test_delete_repo_cache_removes_only_that_repo(hub, hf_env):
    hub.add_repo(REPO, FILES)
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    other = repo_dir(hf_env, "org/other")
    _write(other / "snapshots" / "main" / "x.gguf")
    assert delete_repo_cache(REPO) == repo_dir(hf_env)
    assert not repo_dir(hf_env).exists() and other.exists()
    assert not is_checkpoint_downloaded(f"{REPO}:Q4_0", GGUF)
    assert delete_repo_cache(REPO) == repo_dir(hf_env)  # missing: a warning, not an error


def test_delete_repo_cache_refuses_escapes(hf_env, tmp_path):
    victim = tmp_path / "victim"
    _write(victim / "keep.txt")
    for bad in ("..", "../victim", "/etc", "a\\..\\b", "org/..", "a/b/c", "", "org--x/y"):
        with pytest.raises(InvalidRequestError):
            delete_repo_cache(bad)
    hf_env.mkdir(parents=True, exist_ok=True)
    (hf_env / "models--org--link").symlink_to(victim, target_is_directory=True)
    with pytest.raises(InvalidRequestError, match="outside the Hugging Face cache"):
        delete_repo_cache("org/link")
    assert (victim / "keep.txt").exists()


def test_etag_precedence_prefers_x_linked_etag():
    assert hf_download._normalize_etag('W/"abc"') == "abc"
    assert re.fullmatch(r"[0-9a-f]{40}", git_blob_sha1(b"x"))


def test_loopback_hub_serves_ranges(hub):
    import requests

    hub.add_repo("org/r", {"f.gguf": b"GGUF0123456789"})
    r = requests.get(f"{hub.endpoint}/org/r/resolve/main/f.gguf", headers={"Range": "bytes=4-"})
    assert r.status_code == 206 and r.content == b"0123456789"
    assert r.headers["Content-Range"] == "bytes 4-13/14"
    assert hub.requests(server="cdn")[0].header("Range") == "bytes=4-"
    assert isinstance(hub, LoopbackHub)
