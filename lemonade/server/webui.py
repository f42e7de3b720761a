"""The web app page and static files (spec http-api §4.20).

`webapp.html` is a template: the port, the supported models and the platform are substituted in.
Static files are served only from inside `resources/static`; anything that resolves outside is a 404.
"""
from __future__ import annotations

import mimetypes
import platform
import re
from pathlib import Path

from lemonade.utils import path_utils
from lemonade.utils.json_utils import dumps

NO_CACHE = (("Cache-Control", "no-cache, no-store, must-revalidate"), ("Pragma", "no-cache"),
            ("Expires", "0"))
MAX_STATIC_PATH = 1024  # the shipped files have short paths; a longer one is a 404 without a disk access
_SCRIPT_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                                 "\u2028": "\\u2028", "\u2029": "\\u2029"})
_PLACEHOLDER = re.compile(r"\{\{(SERVER_PORT|SERVER_MODELS_JS|PLATFORM_JS)\}\}")
_PLATFORMS = {"Windows": "Windows", "Darwin": "Darwin", "Linux": "Linux"}
# cpp-httplib's table (httplib.h `find_content_type`) for the shipped kinds; others via mimetypes.
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html",
          ".htm": "text/html", ".ico": "image/x-icon", ".svg": "image/svg+xml", ".png": "image/png",
          ".json": "application/json", ".txt": "text/plain", ".woff2": "font/woff2"}


def script_json(value) -> str:
    """`value` as JSON that can sit inside an HTML `<script>` element: `<`, `>` and `&` as `\\u` escapes
    (so a string holding `</script>` or `<!--` cannot end or bend the element), and U+2028/U+2029 too
    (line terminators to JavaScript parsers before ES2019). The result is still the same JSON value."""
    return dumps(value).decode().translate(_SCRIPT_ESCAPES)


def render_webapp(template: str, models: dict, port: int) -> str:
    """The page with its placeholders filled in one pass, so text from a model entry is never scanned
    for a placeholder again (a model named `{{PLATFORM_JS}}` stays a name)."""
    server_models = {name: info.public_dict() for name, info in sorted(models.items())}
    platform_name = _PLATFORMS.get(platform.system(), "Unknown")
    values = {
        "SERVER_PORT": str(port),  # exactly the placeholder (C++ ate two more chars)
        "SERVER_MODELS_JS": "<script>window.SERVER_MODELS = " + script_json(server_models) + ";</script>",
        "PLATFORM_JS": f"<script>window.PLATFORM = '{platform_name}';</script>",  # a name from _PLATFORMS
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


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
    outside the static dir after resolving `..` and symlinks, a name the OS refuses (NUL), or longer
    than MAX_STATIC_PATH. The work is linear in the path and bounded: an over-long path never reaches
    the file system (resolving one `a/a/a/...` of 64 KB, then testing `root in path.parents`, took
    seconds of CPU: one lstat per component on a growing path, and one new Path per parent)."""
    if len(relative) > MAX_STATIC_PATH or "\0" in relative:
        return None
    root = path_utils.static_dir().resolve()
    try:
        candidate = (root / relative).resolve()
        if candidate == root or not candidate.is_relative_to(root) or not candidate.is_file():
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
