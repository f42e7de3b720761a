"""The web app page and static files (spec http-api §4.20).

`webapp.html` is a template: the port, the supported models and the platform are substituted in.
Static files are served only from inside `resources/static`; anything that resolves outside is a 404.
"""
from __future__ import annotations

import mimetypes
import platform
from pathlib import Path

from lemonade.utils import path_utils
from lemonade.utils.json_utils import dumps

NO_CACHE = (("Cache-Control", "no-cache, no-store, must-revalidate"), ("Pragma", "no-cache"),
            ("Expires", "0"))
_PLATFORMS = {"Windows": "Windows", "Darwin": "Darwin", "Linux": "Linux"}
# cpp-httplib's table (httplib.h `find_content_type`) for the shipped kinds; others via mimetypes.
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html",
          ".htm": "text/html", ".ico": "image/x-icon", ".svg": "image/svg+xml", ".png": "image/png",
          ".json": "application/json", ".txt": "text/plain", ".woff2": "font/woff2"}


def render_webapp(template: str, models: dict, port: int) -> str:
    server_models = {name: info.public_dict() for name, info in sorted(models.items())}
    platform_name = _PLATFORMS.get(platform.system(), "Unknown")
    return (template
            .replace("{{SERVER_PORT}}", str(port))  # exactly the placeholder (C++ ate two more chars)
            .replace("{{SERVER_MODELS_JS}}",
                     "<script>window.SERVER_MODELS = " + dumps(server_models).decode() + ";</script>")
            .replace("{{PLATFORM_JS}}", f"<script>window.PLATFORM = '{platform_name}';</script>"))


def serve_webapp(h, models, port: int) -> None:
    from lemonade.error_types import not_found_body

    try:
        template = (path_utils.static_dir() / "webapp.html").read_text(encoding="utf-8")
    except OSError:
        h.send_json(404, not_found_body(h.url_path))
        return
    page = render_webapp(template, models.supported_models(), port)
    h.send_bytes(200, page.encode("utf-8"), "text/html; charset=utf-8", NO_CACHE)


def static_file(relative: str) -> Path | None:
    """The file under the static dir for a (percent-decoded) URL path, or None: missing, a directory,
    outside the static dir after resolving `..` and symlinks, or a name the OS refuses (NUL, too long)."""
    root = path_utils.static_dir().resolve()
    try:
        candidate = (root / relative).resolve()
        if root not in candidate.parents or not candidate.is_file():
            return None
    except (OSError, ValueError):
        return None
    return candidate


def serve_static(h, relative: str) -> None:
    """`relative` is already percent-decoded by the dispatcher; decoding again would turn
    `%252e%252e` into `..`."""
    from lemonade.error_types import not_found_body

    path = static_file(relative)
    if path is None:
        h.send_json(404, not_found_body(h.url_path))
        return
    content_type = _TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    h.send_bytes(200, path.read_bytes(), content_type, NO_CACHE)
