"""Which files of a Hugging Face repo a pull takes (C++ `model_manager.cpp` `identify_gguf_models`).

Pure functions, no I/O. A *selection* is a function `(siblings, variant, repo) -> [repo paths]`; each
recipe's spec (`lemonade.backends.registry`) names the one it uses: `gguf_selection(mmproj)` for
llama.cpp (table-tested against every case of spec router-and-backends.md §9.4) or `whole_repo`.
The downloader applies it to the hub's listing and `hf_cache.checkpoint_files` to the cached one, so
"what a pull fetches" and "is it downloaded" are one rule.
"""
from __future__ import annotations

from typing import Callable

from lemonade.error_types import NotInRepositoryError

Selection = Callable[[list, str, str], list]  # (siblings, variant, repo) -> repo paths, in order

# Downloaded beside the GGUF when the repo has them (C++ model_manager.cpp L1100-1105).
CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# Appended to every selection error, verbatim from the C++ (model_manager.cpp L60-75).
VARIANT_HINT = """
    The CHECKPOINT:VARIANT scheme is used to specify model files in Hugging Face repositories.

    The VARIANT format can be one of several types:
    0. wildcard (*): download all .gguf files in the repo
    1. Full filename: exact file to download
    2. None/empty: gets the first .gguf file in the repository (excludes mmproj files)
    3. Quantization variant: find a single file ending with the variant name (case insensitive)
    4. Folder name: downloads all .gguf files in the folder that matches the variant name (case insensitive)

    Examples:
    - "ggml-org/gpt-oss-120b-GGUF:*" -> downloads all .gguf files in repo
    - "unsloth/Qwen3-8B-GGUF:qwen3.gguf" -> downloads "qwen3.gguf"
    - "unsloth/Qwen3-30B-A3B-GGUF" -> downloads "Qwen3-30B-A3B-GGUF.gguf"
    - "unsloth/Qwen3-8B-GGUF:Q4_1" -> downloads "Qwen3-8B-GGUF-Q4_1.gguf"
    - "unsloth/Qwen3-30B-A3B-GGUF:Q4_0" -> downloads all files in "Q4_0/" folder
    """


def split_checkpoint(checkpoint: str) -> tuple[str, str]:
    """`org/repo[:variant]` -> (repo, variant); split at the first `:` like the C++ (L953)."""
    repo, _, variant = checkpoint.partition(":")
    return repo, variant


def is_gguf(name: str) -> bool:
    """The one GGUF test of the project: the name ends in `.gguf`, in any case."""
    return name.lower().endswith(".gguf")


def is_mmproj(name: str) -> bool:
    return "mmproj" in name.lower()


def select_gguf(siblings: list[str], variant: str, repo: str = "") -> list[str]:
    """The GGUF file(s) of `variant`, first the one llama-server is given. Raises NotInRepositoryError
    (a DownloadError)."""
    if variant == "*":  # case 0: every .gguf, sorted (mmproj included, as in C++)
        found = sorted(f for f in siblings if is_gguf(f))
        if not found:
            raise NotInRepositoryError(f"No .gguf files found in repository {repo}. {VARIANT_HINT}")
        return found
    if is_gguf(variant):  # case 1: an exact repo path (case-sensitive match, as in C++)
        if variant not in siblings:
            raise NotInRepositoryError(
                f"File {variant} not found in Hugging Face repository {repo}. {VARIANT_HINT}")
        return [variant]
    if not variant:  # case 2: the first non-mmproj .gguf in repo order
        for f in siblings:
            if is_gguf(f) and not is_mmproj(f):
                return [f]
        raise NotInRepositoryError(f"No .gguf files found in Hugging Face repository {repo}. {VARIANT_HINT}")
    suffix = f"{variant}.gguf".lower()  # case 3: the single file ending in <variant>.gguf
    ending = [f for f in siblings if f.lower().endswith(suffix) and not is_mmproj(f)]
    if len(ending) == 1:
        return ending
    if len(ending) > 1:
        raise NotInRepositoryError(
            f"Multiple .gguf files found for variant {variant}, but only one is allowed. {VARIANT_HINT}")
    prefix = f"{variant}/".lower()  # case 4: every .gguf in the folder <variant>/ (sharded models)
    shards = sorted(f for f in siblings if is_gguf(f) and f.lower().startswith(prefix))
    if not shards:
        raise NotInRepositoryError(f"No .gguf files found for variant {variant}. {VARIANT_HINT}")
    return shards


def gguf_selection(mmproj: str = "") -> Selection:
    """llama.cpp's rule: the variant's GGUF(s) (§9.4), then `mmproj` (must exist), then the config
    files the repo has; no duplicates. The first path is the file llama-server is given."""
    def select(siblings: list, variant: str, repo: str = "") -> list:
        files = select_gguf(siblings, variant, repo)
        if mmproj:
            if mmproj not in siblings:
                raise NotInRepositoryError(f"The provided mmproj file {mmproj} was not found in {repo}.")
            files.append(mmproj)
        files.extend(f for f in CONFIG_FILES if f in siblings)
        return list(dict.fromkeys(files))
    return select


def whole_repo(siblings: list, variant: str = "", repo: str = "") -> list:
    """Every file of the repo, in listing order (ONNX and other directory-shaped models)."""
    return list(dict.fromkeys(siblings))
