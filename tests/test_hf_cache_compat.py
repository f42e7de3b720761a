"""Cache compatibility both ways with the real `huggingface_hub`, both pointed at the loopback hub.

huggingface_hub freezes its env at import, so every call here passes `endpoint=` and `cache_dir=`;
`HF_HUB_DISABLE_XET=1` is set before the import (the loopback hub never offers xet anyway).
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
huggingface_hub = pytest.importorskip("huggingface_hub")

from hfhub import GEMMA_FILE, GEMMA_REPO, file_sha256, gemma_gguf, gguf_bytes, hf_env, hub  # noqa: E402,F401
from lemonade.model_manager.hf_download import download_checkpoint, is_checkpoint_downloaded  # noqa: E402
from lemonade.model_manager.hf_select import gguf_selection, whole_repo  # noqa: E402

GGUF = gguf_selection()

pytestmark = pytest.mark.timeout(120)

REPO = "org/compat-GGUF"
FILES = {
    "compat-Q4_0.gguf": gguf_bytes(2_500_000, seed=1),
    "compat-Q8_0.gguf": gguf_bytes(30_000, seed=2),
    "sub/dir/extra.gguf": gguf_bytes(10_000, seed=3),
    "config.json": b'{"model_type": "compat"}\n',
    "tokenizer_config.json": b"{}\n",
    "README.md": b"# compat\n",
}


@pytest.fixture
def quiet_hf(caplog):
    """Collect huggingface_hub's log warnings and Python warnings; the test asserts there are none."""
    caplog.set_level(logging.WARNING, logger="huggingface_hub")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub")] + [
            str(w.message) for w in caught]


def test_huggingface_hub_reads_what_lemonade_downloaded(hub, hf_env, quiet_hf):
    repo = hub.add_repo(REPO, FILES)
    snap = download_checkpoint(f"{REPO}:Q4_0", GGUF)
    wanted = ["compat-Q4_0.gguf", "config.json", "tokenizer_config.json"]

    for name in wanted:
        path = huggingface_hub.hf_hub_download(REPO, name, cache_dir=hf_env, local_files_only=True,
                                               endpoint=hub.endpoint, token=False)
        assert path == str(snap / name) and Path(path).read_bytes() == FILES[name]

    info = huggingface_hub.scan_cache_dir(hf_env)
    assert info.warnings == []
    (cached,) = info.repos
    assert cached.repo_id == REPO and cached.repo_type == "model"
    (revision,) = cached.revisions
    assert revision.commit_hash == repo.commit and revision.refs == frozenset({"main"})
    assert {f.file_name: f.size_on_disk for f in revision.files} == {n: len(FILES[n]) for n in wanted}
    assert cached.size_on_disk == sum(len(FILES[n]) for n in wanted)

    hub.clear_log()  # online, huggingface_hub sends a HEAD but downloads nothing already there
    huggingface_hub.hf_hub_download(REPO, "compat-Q4_0.gguf", cache_dir=hf_env, endpoint=hub.endpoint,
                                    token=False)
    assert hub.body_gets() == []
    assert quiet_hf() == []


def test_huggingface_hub_completes_a_partial_lemonade_snapshot(hub, hf_env, quiet_hf):
    hub.add_repo(REPO, FILES)
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    hub.clear_log()
    folder = huggingface_hub.snapshot_download(REPO, cache_dir=hf_env, endpoint=hub.endpoint, token=False)
    # Only the files lemonade did not take; its blobs are reused.
    assert sorted(r.file for r in hub.body_gets()) == ["README.md", "compat-Q8_0.gguf", "sub/dir/extra.gguf"]
    assert sorted(os.listdir(folder)) == ["README.md", "compat-Q4_0.gguf", "compat-Q8_0.gguf", "config.json",
                                          "sub", "tokenizer_config.json"]
    assert huggingface_hub.scan_cache_dir(hf_env).warnings == []
    assert quiet_hf() == []


def test_lemonade_reads_what_huggingface_hub_downloaded(hub, hf_env, quiet_hf):
    path, sha = gemma_gguf()
    repo = hub.add_repo(GEMMA_REPO, {GEMMA_FILE: path, "config.json": b"{}\n", "README.md": b"# gemma\n"},
                        sha256={GEMMA_FILE: sha})
    checkpoint = f"{GEMMA_REPO}:Q4_K_M"
    assert not is_checkpoint_downloaded(checkpoint, GGUF)
    folder = huggingface_hub.snapshot_download(GEMMA_REPO, cache_dir=hf_env, endpoint=hub.endpoint, token=False)
    assert quiet_hf() == []
    assert is_checkpoint_downloaded(checkpoint, GGUF)
    assert is_checkpoint_downloaded(GEMMA_REPO, GGUF)  # empty variant: the first GGUF
    assert is_checkpoint_downloaded(GEMMA_REPO, whole_repo)   # every file of the repo, per HF's tree listing

    hub.clear_log()
    snap = download_checkpoint(checkpoint, GGUF)
    assert str(snap) == folder and snap.name == repo.commit
    assert hub.body_gets() == [] and hub.requests(method="HEAD") == []
    assert [r.path.split("?")[0] for r in hub.log] == [f"/api/models/{GEMMA_REPO}"]
    assert file_sha256(snap / GEMMA_FILE) == sha


def test_offline_huggingface_hub_snapshot_sees_lemonade_tree_as_partial(hub, hf_env):
    """Our trees/<commit>.json is the full listing, so HF knows a variant-only pull is not the whole repo."""
    hub.add_repo(REPO, FILES)
    download_checkpoint(f"{REPO}:Q4_0", GGUF)
    with pytest.raises(huggingface_hub.errors.IncompleteSnapshotError):
        huggingface_hub.snapshot_download(REPO, cache_dir=hf_env, endpoint=hub.endpoint, token=False,
                                          local_files_only=True)
    download_checkpoint(REPO, whole_repo)  # every file: now the snapshot is whole
    folder = huggingface_hub.snapshot_download(REPO, cache_dir=hf_env, endpoint=hub.endpoint, token=False,
                                               local_files_only=True)
    assert os.path.isfile(os.path.join(folder, "sub", "dir", "extra.gguf"))
