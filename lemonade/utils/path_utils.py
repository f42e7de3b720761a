"""Every path and environment variable the program reads, in one place (C++ `utils/path_utils.cpp`).

Functions read `os.environ` on each call (never frozen at import), so tests and long-running servers
see changes. The HF variables follow `huggingface_hub`'s `constants.py`, because lemonade and
`huggingface_hub` share one cache (spec hf-hub-protocol.md §2). Every on/off flag goes through
`is_true` (huggingface_hub's rule), so `LEMONADE_OFFLINE=true` and `LEMONADE_CI_MODE=0` mean what they
say (C++ had a rule per variable; CMake-parity-docs/path_utils.md lists the differences).
(Passing `env=` to a child process is not reading; `server_manager`'s DISPLAY check is still its own.)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DEFAULT_HF_ENDPOINT = "https://huggingface.co"

# Environment variable names owned by this module.
ENV_LEMONADE_CACHE_DIR = "LEMONADE_CACHE_DIR"
ENV_LEMONADE_OFFLINE = "LEMONADE_OFFLINE"
ENV_LLAMA_SERVER = "LEMONADE_LLAMA_SERVER"  # explicit llama-server override (ours; C++ had none)
ENV_FLM = "LEMONADE_FLM"  # explicit flm override (ours)
ENV_FLM_READY_TIMEOUT = "LEMONADE_FLM_READY_TIMEOUT"  # seconds (ours: tests shorten the deadline)
ENV_BACKEND_TIMEOUT = "LEMONADE_BACKEND_TIMEOUT"  # seconds a backend may take to answer (ours)
ENV_CLIENT_TIMEOUT = "LEMONADE_CLIENT_TIMEOUT"  # seconds a client socket may stay silent (ours)
ENV_HEADER_TIMEOUT = "LEMONADE_HEADER_TIMEOUT"  # seconds a request head may take to arrive whole (ours)
ENV_LLAMACPP_DOWNLOAD_BASE = "LEMONADE_LLAMACPP_DOWNLOAD_BASE"  # release mirror (ours; C++: github.com)
ENV_RUNTIME_DIR = "LEMONADE_RUNTIME_DIR"  # locks, PID file, server log (ours; C++: /tmp)
ENV_CI_MODE = "LEMONADE_CI_MODE"  # no hardware cache (system-info §6)
ENV_SKIP_PROCESSOR_CHECK = "RYZENAI_SKIP_PROCESSOR_CHECK"  # NPU recipes without an NPU (system-info §7)
ENV_HF_DOWNLOAD_TIMEOUT = "HF_HUB_DOWNLOAD_TIMEOUT"  # seconds, connect and stall (huggingface_hub)
ENV_HF_ETAG_TIMEOUT = "HF_HUB_ETAG_TIMEOUT"  # seconds, metadata requests (huggingface_hub)
DEFAULT_HF_TIMEOUT = 10.0  # huggingface_hub's default for both
# `lemonade-server` settings read from the environment before argv (tray_app.cpp L511-516, cli.md §4);
# `cli_parser` parses the values.
ENV_PORT = "LEMONADE_PORT"
ENV_HOST = "LEMONADE_HOST"
ENV_CTX_SIZE = "LEMONADE_CTX_SIZE"
ENV_LLAMACPP = "LEMONADE_LLAMACPP"
ENV_LLAMACPP_ARGS = "LEMONADE_LLAMACPP_ARGS"
ENV_LOG_LEVEL = "LEMONADE_LOG_LEVEL"
ENV_MAX_LOADED_MODELS = "LEMONADE_MAX_LOADED_MODELS"  # HEAD's `max_loaded_models` (ours as an env var)
ENV_IDLE_TIMEOUT = "LEMONADE_IDLE_TIMEOUT"  # ours
ENV_RPC_WORKERS = "LEMONADE_RPC_WORKERS"  # llama.cpp RPC workers host:port,... for every llamacpp model (ours)
SERVER_SETTINGS = (ENV_PORT, ENV_HOST, ENV_CTX_SIZE, ENV_LLAMACPP, ENV_LLAMACPP_ARGS, ENV_LOG_LEVEL,
                   ENV_MAX_LOADED_MODELS, ENV_IDLE_TIMEOUT, ENV_RPC_WORKERS)
DEFAULT_LLAMACPP_DOWNLOAD_BASE = "https://github.com"
# `run` never starts a browser: upstream's Python `lemonade-server run` (src/lemonade_server/cli.py L352 at
# 61dda2d04), which its CI test test/server_cli.py sets; C++ B has no such switch and always tries xdg-open.
ENV_DISABLE_BROWSER = "LEMONADE_DISABLE_BROWSER"
# Security (lemonade HEAD, head-llm-surface.md §4): the two keys and the origin allowlist. The keys are
# secrets: no child process inherits them (`child_environment`).
ENV_API_KEY = "LEMONADE_API_KEY"
ENV_ADMIN_API_KEY = "LEMONADE_ADMIN_API_KEY"
ENV_ALLOWED_ORIGINS = "LEMONADE_ALLOWED_ORIGINS"
SECRET_ENV_VARS = (ENV_API_KEY, ENV_ADMIN_API_KEY)
_TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


def is_true(value: str | None) -> bool:
    """huggingface_hub's truthiness rule: 1/ON/YES/TRUE in any case (constants.py `_is_true`); the one
    rule for every flag this program reads."""
    return value is not None and value.strip().upper() in _TRUE_VALUES


def _flag(name: str) -> bool:
    return is_true(os.environ.get(name))


def _expand(path: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(path)))


def hf_home() -> Path:
    """`HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`."""
    if os.environ.get("HF_HOME"):
        return _expand(os.environ["HF_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = _expand(xdg) if xdg else Path.home() / ".cache"
    return base / "huggingface"


def hf_cache_dir() -> Path:
    """The hub cache: `HF_HUB_CACHE`, legacy `HUGGINGFACE_HUB_CACHE`, else `<hf_home>/hub`."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return _expand(os.environ[name])
    return hf_home() / "hub"


def hf_endpoint() -> str:
    """`HF_ENDPOINT` without its trailing slash, else the public hub."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")


def hf_token() -> str | None:
    """The first non-empty of `HF_TOKEN`, `HUGGING_FACE_HUB_TOKEN`, the token file (`HF_TOKEN_PATH`)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = (os.environ.get(name) or "").strip()
        if value:
            return value
    token_path = os.environ.get("HF_TOKEN_PATH")
    path = _expand(token_path) if token_path else hf_home() / "token"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def offline_setting() -> str | None:
    """`NAME=value` of the variable that turns offline mode on, or None when online: `LEMONADE_OFFLINE`
    truthy (C++: only "1"), else the first non-empty of HF's flags, as huggingface_hub reads them."""
    if _flag(ENV_LEMONADE_OFFLINE):
        return f"{ENV_LEMONADE_OFFLINE}={os.environ[ENV_LEMONADE_OFFLINE]}"
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value:
            return f"{name}={value}" if is_true(value) else None
    return None


def is_offline() -> bool:
    return offline_setting() is not None


def lemonade_cache_dir() -> Path:
    """`$LEMONADE_CACHE_DIR`, else `~/.cache/lemonade` (user_models.json, hardware_info.json)."""
    value = os.environ.get(ENV_LEMONADE_CACHE_DIR)
    return _expand(value) if value else Path.home() / ".cache" / "lemonade"


def user_models_path() -> Path:
    return lemonade_cache_dir() / "user_models.json"


def resources_dir() -> Path:
    """Installed: the `lemonade/resources` package (mapped from the top-level `resources/`).

    Source checkout without install: `<repo>/resources`.
    """
    installed = PACKAGE_DIR / "resources"
    if (installed / "server_models.json").exists():
        return installed
    return PACKAGE_DIR.parent / "resources"


def resource_path(relative: str) -> Path:
    return resources_dir() / relative


def static_dir() -> Path:
    return resource_path("static")


def executable_dir() -> Path:
    """Directory of the running entry point (C++: dir of /proc/self/exe), used for install layouts."""
    import shutil  # lazily: only install-dir lookups need it, not CLI start-up

    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    found = shutil.which(argv0) if argv0 and os.sep not in argv0 else argv0
    return Path(found).resolve().parent if found else Path(sys.executable).resolve().parent


def llama_install_base() -> Path:
    """C++ B's install base (router-and-backends §8.2): the exe dir, or a share dir for system installs."""
    exe_dir = executable_dir()
    if str(exe_dir) in ("/usr/local/bin", "/usr/bin"):
        for share in ("/usr/local/share/lemonade-server", "/usr/share/lemonade-server"):
            if Path(share).is_dir():
                return Path(share)
    return exe_dir


def llama_install_dir(backend: str) -> Path:
    return llama_install_base() / "llama" / backend


def llama_server_override() -> str | None:
    return os.environ.get(ENV_LLAMA_SERVER) or None


def flm_override() -> str | None:
    return os.environ.get(ENV_FLM) or None


def flm_ready_timeout_setting() -> str | None:
    """The raw `$LEMONADE_FLM_READY_TIMEOUT` (the FLM backend validates it)."""
    return os.environ.get(ENV_FLM_READY_TIMEOUT) or None


def _seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


def backend_timeout(default: float) -> float:
    """`$LEMONADE_BACKEND_TIMEOUT` seconds if it is a positive number, else `default` (C++: 300 s)."""
    return _seconds(ENV_BACKEND_TIMEOUT, default)


def client_timeout(default: float) -> float:
    """`$LEMONADE_CLIENT_TIMEOUT` seconds if it is a positive number, else `default`."""
    return _seconds(ENV_CLIENT_TIMEOUT, default)


def header_timeout(default: float) -> float:
    """`$LEMONADE_HEADER_TIMEOUT` seconds if it is a positive number, else `default` (the whole request
    head, from its first byte: nginx's client_header_timeout)."""
    return _seconds(ENV_HEADER_TIMEOUT, default)


def hf_download_timeout() -> float:
    """`$HF_HUB_DOWNLOAD_TIMEOUT` seconds if positive, else 10: connect and stall timeout of file GETs."""
    return _seconds(ENV_HF_DOWNLOAD_TIMEOUT, DEFAULT_HF_TIMEOUT)


def hf_etag_timeout() -> float:
    """`$HF_HUB_ETAG_TIMEOUT` seconds if positive, else 10: timeout of metadata requests (API, HEAD)."""
    return _seconds(ENV_HF_ETAG_TIMEOUT, DEFAULT_HF_TIMEOUT)


def ci_mode() -> bool:
    """`$LEMONADE_CI_MODE` truthy: detect hardware every time, never cache it (C++: set at all)."""
    return _flag(ENV_CI_MODE)


def skip_processor_check() -> bool:
    """`$RYZENAI_SKIP_PROCESSOR_CHECK` truthy: treat the NPU as present (C++: exactly 1, true or yes)."""
    return _flag(ENV_SKIP_PROCESSOR_CHECK)


def windows_system_root() -> str:
    """`%SystemRoot%`, else `C:\\Windows` (where the Vulkan loader DLL is looked for)."""
    return os.environ.get("SystemRoot", r"C:\Windows")


def server_settings_from_env() -> dict[str, str]:
    """The `lemonade-server` settings present in the environment, by variable name, as raw strings
    (an empty value counts as set, as C++ `getenv` does); `cli_parser` parses them."""
    return {name: os.environ[name] for name in SERVER_SETTINGS if name in os.environ}


def secret_from_env(name: str) -> str | None:
    """The value of the environment variable `name`, None when it is unset or empty: a remote
    upstream's API key, which its model entry names (`api_key_env`) instead of holding. Callers
    never log or store the value."""
    return os.environ.get(name) or None


def llamacpp_download_base() -> str:
    """Where llama.cpp release zips come from: `$LEMONADE_LLAMACPP_DOWNLOAD_BASE`, else github.com."""
    return (os.environ.get(ENV_LLAMACPP_DOWNLOAD_BASE) or DEFAULT_LLAMACPP_DOWNLOAD_BASE).rstrip("/")


def browser_disabled() -> bool:
    """`$LEMONADE_DISABLE_BROWSER` by the one flag rule (upstream's Python CLI took any non-empty value,
    so there `0` disabled too; its CI sets `1`)."""
    return _flag(ENV_DISABLE_BROWSER)


def has_display() -> bool:
    """Whether a browser can be shown: always on macOS and Windows, else an X11 `$DISPLAY` or a
    `$WAYLAND_DISPLAY`."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def runtime_dir() -> Path:
    """Where the single-instance locks, the PID file and the server log live: `$LEMONADE_RUNTIME_DIR`
    (ours, so tests and CI jobs can run several servers side by side), else `/tmp` as in C++
    (`include/lemon/single_instance.h`, `tray_app.cpp` get_server_info)."""
    value = os.environ.get(ENV_RUNTIME_DIR)
    return _expand(value) if value else Path("/tmp")


def shown_path(path: str | os.PathLike) -> str:
    """How an error a client sees names a file of ours: relative to the cache or directory it lies in
    (`<HF cache>/models--org--name/blobs/….incomplete`, `<lemonade cache>/user_models.json`,
    `<runtime dir>/lemonade-server.log`), so answers never give away the server's directory layout;
    any other path is shown as given. No file-system access (nothing is resolved)."""
    text = os.path.abspath(os.fspath(path))
    for label, root in (("<HF cache>", hf_cache_dir()), ("<lemonade cache>", lemonade_cache_dir()),
                        ("<runtime dir>", runtime_dir())):
        base = os.path.abspath(root)
        if text == base or text.startswith(base.rstrip(os.sep) + os.sep):
            return label + text[len(base):]
    return os.fspath(path)


def server_log_path() -> Path:
    """The C++ CLI's server log (cli.md §3): `/tmp/lemonade-server.log`, under `runtime_dir()`."""
    return runtime_dir() / "lemonade-server.log"


def api_key() -> str:
    """`$LEMONADE_API_KEY`, or "" when unset or empty (then the API routes need no key)."""
    return os.environ.get(ENV_API_KEY, "")


def admin_api_key() -> str:
    """`$LEMONADE_ADMIN_API_KEY`, or "" (`server.security.Keys` then uses the API key in its place)."""
    return os.environ.get(ENV_ADMIN_API_KEY, "")


def client_api_key() -> str:
    """The key a CLI command sends: the admin key when set, else the API key (HEAD `cli/main.cpp`
    1544-1548: the admin key opens every route); "" for none."""
    return os.environ.get(ENV_ADMIN_API_KEY) or api_key()


def allowed_origins_setting() -> str:
    """The raw `$LEMONADE_ALLOWED_ORIGINS` (comma list, `*`, `null`); `server.security` parses it."""
    return os.environ.get(ENV_ALLOWED_ORIGINS, "")


def child_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: `env` (else ours) without the secrets of SECRET_ENV_VARS,
    which no backend needs and which `/proc/<pid>/environ` would show."""
    source = dict(os.environ) if env is None else dict(env)
    for name in SECRET_ENV_VARS:
        source.pop(name, None)
    return source
