"""Recipe → spec: the one place that knows what a recipe means (ours; C++ spreads it over `router.cpp`,
`model_manager.cpp`, `system_info.cpp` and `server.cpp`).

A model's `recipe` names how it runs. Each recipe has one `RecipeSpec` that answers every question the
rest of the program used to answer with `if recipe == ...`:

    runs_here()                 may models of this recipe be listed on this machine (system_info, §7)
    engines(type, name)         its part of `/system-info`'s `inference_engines` for one device
    selection(info)             which repo files a pull fetches (`hf_select`), hence "downloaded?"
    model_files(info)           the cached files a backend loads, or None when not downloaded
    fetch(info, progress, force), delete(info)
    make_backend(info, files, options)   the `WrappedServer` that serves it (files: `ModelFiles`)
    check_registration(info)    the settings a user entry of this recipe may carry (`pull`)
    check_upload(names), upload_target(directory, variant)   what `add-local-model` accepts

The router, the model manager (given `spec_for` when it is built, see `model_manager()`), the upload
handler and `/system-info` ask this module; none of them branches on a recipe string.
Layering: this module imports `model_manager`'s cache modules and the backends; `model_manager` never
imports `backends`, so the two packages form no cycle.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Callable

from lemonade import system_info
from lemonade.error_types import InvalidRequestError, RegistryError, UnsupportedOperationError
from lemonade.model_manager import ModelFiles, ModelManager, hf_cache, hf_select
from lemonade.model_manager.registry import ModelInfo

log = logging.getLogger(__name__)

Progress = Callable[[Any], None]
REMOTE_RECIPE = "remote"  # a remote OpenAI-compatible upstream (ours)


class RecipeSpec:
    """A recipe whose files come from a Hugging Face repo and which no backend here can run.

    Subclasses override what differs. The defaults describe directory-shaped models (ONNX): every
    file of the repo is fetched; `make_backend` refuses with the C++ message."""

    name = ""
    uploadable = False  # `add-local-model` accepts it (C++ list: llamacpp and the three OGA recipes)

    def __init__(self, name: str):
        self.name = name

    # -- where it runs -------------------------------------------------------------------------------

    def runs_here(self) -> bool:
        """C++ `filter_models_by_backend`: unknown recipes stay listed."""
        return True

    def engines(self, device_type: str, device_name: str) -> dict[str, Any]:
        return {}

    # -- files -------------------------------------------------------------------------------------

    def selection(self, info: ModelInfo) -> hf_select.Selection:
        return hf_select.whole_repo

    def model_files(self, info: ModelInfo) -> ModelFiles | None:
        """Cached files of `info`, None unless every file the selection names is complete."""
        paths = hf_cache.checkpoint_files(info.checkpoint, self.selection(info))
        if paths is None:
            return None
        mmproj = next((p for p in paths if p.as_posix().endswith("/" + info.mmproj)), None) if info.mmproj else None
        return ModelFiles(paths[0], mmproj)

    def has_files(self, info: ModelInfo) -> bool:
        """Anything of `info` on disk (its repo's cache folder, a partial download included)."""
        return hf_cache.RepoDir.of(info.repo_id).path.exists()

    def disk_usage(self, info: ModelInfo) -> int | None:
        """Bytes the cached files of `info` take (the blobs its selection names); None when it is not
        downloaded. Stats files only."""
        paths = hf_cache.checkpoint_files(info.checkpoint, self.selection(info))
        return None if paths is None else sum(path.stat().st_size for path in paths)

    def missing(self, info: ModelInfo) -> list[str]:
        """The files a fetch would download, as far as the cache can tell offline."""
        return hf_cache.missing_files(info.checkpoint, self.selection(info))

    def fetch(self, info: ModelInfo, progress: Progress | None, force: bool) -> None:
        """Download what `model_files` needs. Blocks; raises DownloadError, NetworkError."""
        from lemonade.model_manager import hf_download  # lazily: `requests` only when a pull runs

        hf_download.download_checkpoint(info.checkpoint, self.selection(info), progress=progress)

    def delete(self, info: ModelInfo) -> None:
        """Remove the repo's cache folder; a missing folder is only a warning (C++ §9.5)."""
        hf_cache.delete_repo_cache(info.repo_id)

    # -- running -------------------------------------------------------------------------------------

    def make_backend(self, info: ModelInfo, files: ModelFiles, options):
        raise UnsupportedOperationError(f"Recipe {self.name} is not supported by this server")

    # -- registration --------------------------------------------------------------------------

    def check_registration(self, info: ModelInfo) -> None:
        """Raise RegistryError when `info` carries settings this recipe does not take: `base_url`
        and `api_key_env` belong to remote upstreams, `rpc_workers` to llama.cpp."""
        if info.base_url or info.api_key_env:
            raise RegistryError(f"base_url and api_key_env are settings of the {REMOTE_RECIPE} recipe, "
                                f"not of {self.name or 'a model without a recipe'}")
        if info.rpc_workers:
            raise RegistryError(f"rpc_workers is a setting of llamacpp models, not of {self.name}")

    # -- uploads -----------------------------------------------------------------------------------

    def check_upload(self, names: list[str]) -> None:
        """Raise RegistryError when the uploaded file names cannot make a model of this recipe."""

    def upload_target(self, directory: Path, variant: str) -> Path:
        """What an uploaded model's checkpoint points at, inside `directory`."""
        return directory


class LlamaCppSpec(RecipeSpec):
    uploadable = True

    def runs_here(self) -> bool:
        return True

    def engines(self, device_type: str, device_name: str) -> dict[str, Any]:
        from lemonade.backends import llamacpp_server

        return llamacpp_server.inference_engines(device_type, device_name)

    def selection(self, info: ModelInfo) -> hf_select.Selection:
        return hf_select.gguf_selection(info.mmproj)

    def make_backend(self, info: ModelInfo, files: ModelFiles, options):
        """A llama-server for `info`; with RPC workers (the model's own list, else the server's) the
        kind that checks its workers before each start (`llamacpp_rpc`)."""
        from lemonade.backends import llamacpp_rpc
        from lemonade.backends.llamacpp_server import LlamaCppServer
        from lemonade.utils import path_utils

        template = path_utils.resource_path(info.chat_template) if info.chat_template else None
        options = llamacpp_rpc.with_model_workers(options, info.rpc_workers)
        kind = llamacpp_rpc.RpcLlamaCppServer if options.rpc_workers else LlamaCppServer
        return kind(info.name, info.checkpoint, info.recipe, files.main, info.labels, files.mmproj,
                    options, template)

    def check_registration(self, info: ModelInfo) -> None:
        from lemonade.backends import llamacpp_rpc

        super().check_registration(dataclasses.replace(info, rpc_workers=""))
        try:
            llamacpp_rpc.model_workers(info.rpc_workers)
        except InvalidRequestError as e:
            raise RegistryError(e.message) from None

    def check_upload(self, names: list[str]) -> None:
        if not any(hf_select.is_gguf(n) for n in names):
            raise RegistryError("At least one .gguf file is required for llamacpp")

    def upload_target(self, directory: Path, variant: str) -> Path:
        """The variant's file, else the first non-mmproj GGUF, else the directory (C++ §4.14)."""
        ggufs = sorted(p for p in directory.rglob("*") if p.is_file() and hf_select.is_gguf(p.name))
        if variant:
            for p in ggufs:
                if p.name in (variant, variant + ".gguf"):
                    return p
        return next((p for p in ggufs if not hf_select.is_mmproj(p.name)), directory)


class FlmSpec(RecipeSpec):
    """FastFlowLM: `flm` keeps its own model store; pulls and deletes go through its CLI."""

    uploadable = False

    def runs_here(self) -> bool:
        return system_info.npu_available()

    def engines(self, device_type: str, device_name: str) -> dict[str, Any]:
        from lemonade.backends import fastflowlm_server

        if device_type != "npu" or sys.platform != "win32":  # C++ reports flm on Windows NPUs only
            return {}
        return {"flm": fastflowlm_server.engine_status()}

    def model_files(self, info: ModelInfo) -> ModelFiles | None:
        from lemonade.backends import fastflowlm_server

        return ModelFiles(None) if fastflowlm_server.is_model_pulled(info.checkpoint) else None

    def has_files(self, info: ModelInfo) -> bool:
        return self.model_files(info) is not None

    def disk_usage(self, info: ModelInfo) -> int | None:
        return None  # in flm's own store, which does not say

    def missing(self, info: ModelInfo) -> list[str]:
        return [info.checkpoint]  # flm's own store: the checkpoint is the unit

    def fetch(self, info: ModelInfo, progress: Progress | None, force: bool) -> None:
        from lemonade.backends import fastflowlm_server

        fastflowlm_server.pull(info.checkpoint, force=force)  # C++: --force unless do_not_upgrade

    def delete(self, info: ModelInfo) -> None:
        from lemonade.backends import fastflowlm_server

        fastflowlm_server.remove(info.checkpoint, model_name=info.name)

    def make_backend(self, info: ModelInfo, files: ModelFiles, options):
        from lemonade.backends.fastflowlm_server import FastFlowLMServer

        return FastFlowLMServer(info.name, info.checkpoint, info.recipe, options.ctx_size)


class OgaSpec(RecipeSpec):
    """ONNX Runtime GenAI (Ryzen AI): listed where C++ lists it, never runnable here (no Linux build)."""

    def __init__(self, name: str, needs_npu: bool, listed: bool = True):
        super().__init__(name)
        self.needs_npu = needs_npu
        self.listed = listed
        self.uploadable = listed  # the C++ upload list: oga-npu, oga-hybrid, oga-cpu

    def runs_here(self) -> bool:
        if not self.listed or sys.platform == "darwin":
            return False
        return system_info.npu_available() if self.needs_npu else True

    def engines(self, device_type: str, device_name: str) -> dict[str, Any]:
        if device_type not in ("cpu", "amd_igpu", "amd_dgpu", "npu"):
            return {}
        return {"oga": {"available": _oga_installed()}}

    def upload_target(self, directory: Path, variant: str) -> Path:
        """The folder holding `genai_config.json`, else the directory (C++ §4.14)."""
        config = next(iter(sorted(directory.rglob("genai_config.json"))), None)
        return config.parent if config else directory


def _oga_installed() -> bool:
    """C++'s probe for `ryzenai-server`: on PATH, or at two paths relative to the working directory
    (POSIX) or the executable's directory (Windows) (system-info.md §9)."""
    import shutil

    from lemonade.utils import path_utils

    exe = "ryzenai-server.exe" if sys.platform == "win32" else "ryzenai-server"
    base = path_utils.executable_dir() if sys.platform == "win32" else Path.cwd()
    rel = [Path("../../../ryzenai-server/build/bin/Release") / exe, Path("ryzenai-server") / exe]
    return shutil.which("ryzenai-server") is not None or any((base / p).is_file() for p in rel)


class RemoteSpec(RecipeSpec):
    """A remote OpenAI-compatible upstream (vLLM, TGI, another lemonade, a llama-server elsewhere):
    nothing to fetch or run here; the checkpoint is the upstream's model id (ours)."""

    def model_files(self, info: ModelInfo) -> ModelFiles | None:
        return ModelFiles(None)  # always "downloaded": there is nothing to fetch

    def missing(self, info: ModelInfo) -> list[str]:
        return []

    def fetch(self, info: ModelInfo, progress: Progress | None, force: bool) -> None:
        """Nothing to download."""

    def delete(self, info: ModelInfo) -> None:
        """Nothing on disk: deleting unregisters (the model manager drops the user entry)."""

    def has_files(self, info: ModelInfo) -> bool:
        return False  # a delete only removes the user entry

    def disk_usage(self, info: ModelInfo) -> int | None:
        return None

    def make_backend(self, info: ModelInfo, files: ModelFiles, options):
        from lemonade.backends.remote_server import RemoteServer

        return RemoteServer(info.name, info.checkpoint, info.recipe, info.base_url, info.api_key_env)

    def check_registration(self, info: ModelInfo) -> None:
        from lemonade.backends.remote_server import check_base_url, check_env_name

        if info.rpc_workers:
            raise RegistryError(f"rpc_workers is a setting of llamacpp models, not of {self.name}")
        if not info.base_url:
            raise RegistryError(f"A {self.name} model needs base_url: the upstream's OpenAI base URL, "
                                "e.g. http://gpu-box:8000/v1")
        try:
            check_base_url(info.base_url)
            if info.api_key_env:
                check_env_name(info.api_key_env)
        except InvalidRequestError as e:
            raise RegistryError(e.message) from None


class UnknownSpec(RecipeSpec):
    """A recipe this port does not know (whispercpp, sd-cpp, …): listed as C++ lists it (never on
    macOS, where C++ keeps only llamacpp), fetched whole, not runnable."""

    def runs_here(self) -> bool:
        return sys.platform != "darwin"


_SPECS: dict[str, RecipeSpec] = {
    "llamacpp": LlamaCppSpec("llamacpp"),
    "flm": FlmSpec("flm"),
    "oga-npu": OgaSpec("oga-npu", needs_npu=True),
    "oga-hybrid": OgaSpec("oga-hybrid", needs_npu=True),
    "oga-cpu": OgaSpec("oga-cpu", needs_npu=True),  # C++ groups oga-cpu with the NPU recipes (spec §7)
    "oga-igpu": OgaSpec("oga-igpu", needs_npu=False, listed=False),  # C++ never lists it
    REMOTE_RECIPE: RemoteSpec(REMOTE_RECIPE),
}


def spec_for(recipe: str) -> RecipeSpec:
    """The spec of `recipe`; an unknown recipe gets a generic one (listed, fetched whole, not runnable),
    as C++ keeps unknown recipes in the registry."""
    spec = _SPECS.get(recipe)
    return spec if spec is not None else UnknownSpec(recipe)


def uploadable_recipes() -> tuple[str, ...]:
    return tuple(name for name, spec in _SPECS.items() if spec.uploadable)


def model_manager() -> ModelManager:
    """A model manager that asks this registry about recipes."""
    return ModelManager(spec_for)


def inference_engines(device_type: str, device_name: str) -> dict[str, Any]:
    """`inference_engines` of one device for `/system-info` (system-info.md §5), every spec asked."""
    engines: dict[str, Any] = {}
    one_per_kind = {type(spec): spec for spec in _SPECS.values()}  # the four OGA recipes share one engine
    for spec in one_per_kind.values():
        engines.update(spec.engines(device_type, device_name))
    return engines
