"""`POST /api/v{0,1}/add-local-model` (C++ B `handle_add_local_model`, spec http-api §4.14).

Uploaded files are streamed into a staging directory inside the HF cache, checked in the C++ order,
then moved into `models--<name>` in one rename. A refused or broken upload leaves nothing behind.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from lemonade.error_types import (ConflictError, InvalidRequestError, LemonadeError, LengthRequiredError,
                                  RegistryError, RequestTooLargeError, simple_error_body)
from lemonade.backends import registry
from lemonade.model_manager import USER_PREFIX
from lemonade.model_manager.registry import ModelInfo, save_user_model
from lemonade.server import multipart
from lemonade.utils import path_utils

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 256 * 1024**3  # larger uploads get 413 before a byte of the body is read
NAME_MAX = 255  # bytes in one path component (Linux file systems)
_TRUE = ("true", "True", "1")


def _stored_name(filename: str) -> PurePosixPath:
    """The path below the model dir: the browser's relative path minus its first folder. Raises
    InvalidRequestError (400) for anything that would leave the directory or that no file system
    takes: a NUL, a name over NAME_MAX bytes."""
    shown = filename[:100] + ("…" if len(filename) > 100 else "")
    if "\0" in filename:
        raise InvalidRequestError(f"Invalid file name in upload (NUL character): {shown!r}")
    path = PurePosixPath(filename.replace("\\", "/"))
    parts = path.parts[1:] if len(path.parts) > 1 else path.parts
    if not parts or path.is_absolute() or any(p in ("..", "", ".") for p in parts):
        raise InvalidRequestError(f"Invalid file name in upload: {shown}")
    if any(len(p.encode("utf-8", "surrogateescape")) > NAME_MAX for p in parts):
        raise InvalidRequestError(f"File name in upload longer than {NAME_MAX} bytes: {shown}")
    return PurePosixPath(*parts)


class _Layout:
    """The files and folders of one upload so far: a name used twice, or both as a file and as a
    folder (`a` and `a/b`), is refused before anything is written (400), not left to the OS (500)."""

    def __init__(self) -> None:
        self.files: set[PurePosixPath] = set()
        self.folders: set[PurePosixPath] = set()

    def add(self, relative: PurePosixPath) -> None:
        parents = set(relative.parents) - {PurePosixPath(".")}
        if relative in self.files or relative in self.folders or parents & self.files:
            raise InvalidRequestError(f"File name in upload clashes with another file or folder of it: {relative}")
        self.files.add(relative)
        self.folders |= parents


def handle_add_local_model(h, manager) -> None:
    boundary = multipart.boundary_of(h.headers.get("Content-Type", ""))
    if boundary is None:
        raise RegistryError("Request must be multipart/form-data")
    if h.chunked:
        raise LengthRequiredError("Uploads need a Content-Length")
    length = h.content_length()
    if length > MAX_UPLOAD_BYTES:
        raise RequestTooLargeError(f"Upload of {length} bytes exceeds the limit of {MAX_UPLOAD_BYTES}")
    cache = path_utils.hf_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=cache))
    try:
        status, body = _store(h, manager, length, boundary, staging, cache)
    finally:
        if staging.exists():  # gone before we answer: a client may look at the cache at once
            shutil.rmtree(staging, ignore_errors=True)
    h.send_json(status, body)


def _store(h, manager, length: int, boundary: str, staging: Path, cache: Path) -> tuple[int, dict]:
    """Receive, check, move into place and register; the answer as (status, body). Raises only
    TimeoutError (client stalled: 408 from the dispatcher) and ConnectionError (client gone)."""
    try:
        fields, files = _receive(h, length, boundary, staging)
        info = _validate(fields, files, manager)
        target = cache / ("models--" + info.name[len(USER_PREFIX):].replace("/", "-"))
        if target.exists() or target.is_symlink():
            # Never replace a folder this upload did not create: `user.org--repo` would otherwise
            # delete the hub download `models--org--repo` (C++ B removes it).
            raise ConflictError(f"Model name '{info.name}' maps onto the existing cache folder "
                                f"{target.name}; please use a different name.")
        staging.rename(target)
        _finish_registration(info, fields, files, target, cache)
    except LemonadeError as e:
        return e.status, simple_error_body(e.message)
    except (TimeoutError, ConnectionError):
        raise
    except OSError as e:
        where = f" ({path_utils.shown_path(e.filename)})" if e.filename else ""
        return 500, simple_error_body(f"Failed to upload model: {e.strerror or e}{where}")
    return 200, {"message": f"Model {info.name} uploaded and registered successfully", "status": "success"}


def _receive(h, length: int, boundary: str, staging: Path) -> tuple[dict[str, str], list[PurePosixPath]]:
    fields: dict[str, str] = {}
    files: list[PurePosixPath] = []
    layout = _Layout()

    def on_field(name: str, value: str) -> None:
        fields[name] = value

    def open_file(part: multipart.Part):
        if part.name != "model_files":
            return open("/dev/null", "wb")  # other file fields are ignored, as in C++
        relative = _stored_name(part.filename or "")
        layout.add(relative)
        destination = staging / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        files.append(relative)
        return open(destination, "wb")

    try:
        unread = multipart.read_multipart(h.rfile, length, boundary, on_field, open_file)
    except InvalidRequestError:
        h.close_connection = True  # the rest of the body is unread
        raise
    h.body_pending = unread > 0  # a long epilogue is left on the wire: the answer closes
    return fields, files


def _validate(fields: dict[str, str], files: list[PurePosixPath], manager) -> ModelInfo:
    name, recipe = fields.get("model_name", ""), fields.get("recipe", "")
    if not name or not recipe:
        raise RegistryError("model_name and recipe are required")
    if not name.startswith(USER_PREFIX):
        raise RegistryError("Model name must start with 'user.'")
    recipes = registry.uploadable_recipes()
    if recipe not in recipes:
        raise RegistryError("Invalid recipe. Must be one of: " + ", ".join(recipes))
    if not files:
        raise RegistryError("No model files provided for upload")
    registry.spec_for(recipe).check_upload([f.name for f in files])
    if name in manager.supported_models():
        raise ConflictError(f"Model name '{name}' already exists. Please use a different name.")
    labels = ["custom"] + (["reasoning"] if fields.get("reasoning") in _TRUE else []) \
        + (["vision"] if fields.get("vision") in _TRUE else [])
    return ModelInfo(name=name, checkpoint=fields.get("checkpoint", ""), recipe=recipe, labels=labels,
                     mmproj=fields.get("mmproj", ""), suggested=True, source="local_upload")


def _finish_registration(info: ModelInfo, fields: dict, files: list[PurePosixPath], target: Path,
                         cache: Path) -> None:
    variant = info.checkpoint.split(":", 1)[1] if ":" in info.checkpoint else ""
    resolved = registry.spec_for(info.recipe).upload_target(target, variant)
    info.checkpoint = str(resolved.relative_to(cache))
    if info.mmproj:
        match = next((target / f for f in files if f.name == info.mmproj), None)
        # Stored relative to the cache like the checkpoint (C++ stores an absolute path).
        info.mmproj = str(match.relative_to(cache)) if match is not None else ""
    save_user_model(info)
    log.info("Registered uploaded model %s at %s", info.name, resolved)
