"""Who may call the server: API keys, browser origins, cross-site requests (lemonade HEAD `server.cpp`
860-1087 and `utils/origin_utils.h`; spec head-llm-surface.md §4). Two pre-dispatch hooks for
`httpd.LemonadeHTTPServer(hooks=[...])`, in this order, as HEAD runs them:

  1. `origin_hook(policy)`: the CORS answer headers of the request, and 403 for a foreign `Origin`, or
     for a state-changing request a browser marks cross-site (`Sec-Fetch-Site`) without sending one.
  2. `key_hook(keys)`: 401 unless the request presents the key its route class needs.

A route's class is the stricter of its row's `auth` and HEAD's path rule (`/api/*`, `/v0/*`, `/v1/*`
need the API key, `/internal/*` the admin key), so a row added later, or a path no row serves, is never
less guarded than HEAD guards it. Everything but the two hooks is a pure function, table-tested in
tests/test_security.py. Where we go past HEAD (CMake-parity-docs/security.md): `x-api-key` is read
beside `Authorization: Bearer`, keys are compared in constant time, a form post or a `fetch` with a
simple content type from another site is refused even without an `Origin`, and the web UI keeps working
when served from an IP literal other than loopback.
"""
from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable

from lemonade.server.routes import Auth, Route

# Bodies exactly as HEAD writes them (a space after the colon; its CLI and web app compare text).
API_KEY_REFUSED = b'{"error": "Invalid or missing API key"}'
ADMIN_KEY_REFUSED = b'{"error": "Invalid or missing admin API key"}'
ORIGIN_REFUSED = b'{"error": "Origin not allowed"}'
CROSS_SITE_REFUSED = b'{"error": "Cross-site request not allowed"}'  # ours: HEAD has no such check

API_PATH_PREFIXES = ("/api/", "/v0/", "/v1/")
ADMIN_PATH_PREFIX = "/internal/"
METRICS_PATH = "/metrics"
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
# `Sec-Fetch-Site` values that mean the request did not come from a page of another site.
SAME_SITE_FETCHES = frozenset({"same-origin", "none"})
_STRICTNESS = {Auth.PUBLIC: 0, Auth.API: 1, Auth.ADMIN: 2}

ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
GA_ALLOW_HEADERS = "Content-Type, Authorization"
# HEAD's list plus the headers Anthropic's and Ollama's clients send (x-api-key, anthropic-version).
ALLOW_HEADERS = ("Content-Type, Authorization, x-api-key, anthropic-version, X-Client-Session-Id, "
                 "X-Account-Session-Id, mcp-protocol-version, traceparent, Mcp-Session-Id")
# What a preflight may ask for, echoed back to an allowed origin: header names and commas only.
_REQUESTED_HEADERS = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
MAX_REQUESTED_HEADERS = 2048
_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
WEB_SCHEMES = frozenset(_DEFAULT_PORTS)


# -- keys -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """The server's keys; "" means none. With no admin key, the API key is the admin key too (HEAD
    `server.cpp` 650-656; an empty admin variable counts as unset, where HEAD would leave `/internal/*`
    open)."""

    api: str = ""
    admin: str = ""

    def __post_init__(self) -> None:
        if not self.admin:
            object.__setattr__(self, "admin", self.api)

    @classmethod
    def from_env(cls) -> "Keys":
        from lemonade.utils import path_utils

        return cls(path_utils.api_key(), path_utils.admin_api_key())

    def __repr__(self) -> str:  # never show a key, even in a traceback or a debug dump
        return f"Keys(api={'set' if self.api else 'unset'}, admin={'set' if self.admin else 'unset'})"


def path_class(path: str) -> Auth:
    """HEAD's rule by path alone (`server.cpp` 975-982): it also covers paths no route serves."""
    if path.startswith(ADMIN_PATH_PREFIX):
        return Auth.ADMIN
    if path.startswith(API_PATH_PREFIXES) or path == METRICS_PATH:
        return Auth.API
    return Auth.PUBLIC


def required_class(route: Route | None, path: str) -> Auth:
    """The stricter of the route row's class and the path rule."""
    by_path = path_class(path)
    if route is None or _STRICTNESS[by_path] >= _STRICTNESS[route.auth]:
        return by_path
    return route.auth


def presented_credentials(authorization: str | None, x_api_key: str | None) -> list[str]:
    """The keys a request presents: `Authorization: Bearer <k>` (the scheme word in any case; HEAD
    drops any first 7 characters) and `x-api-key: <k>` (Anthropic's clients; HEAD ignores it)."""
    found = []
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            found.append(token.strip())
    if x_api_key and x_api_key.strip():
        found.append(x_api_key.strip())
    return found


def _matches(presented: Iterable[str], key: str) -> bool:
    """Constant time in the key's content (`hmac.compare_digest`); every candidate is compared."""
    wanted = key.encode("utf-8")
    hit = False
    for candidate in presented:
        hit |= hmac.compare_digest(candidate.encode("utf-8", "surrogateescape"), wanted)
    return hit


def key_accepted(needed: Auth, keys: Keys, presented: list[str]) -> bool:
    """HEAD's hierarchy: the admin key opens everything; the API key opens the API routes (and
    `/internal/*` only when it is also the admin key); a class with no key configured is open."""
    if needed is Auth.PUBLIC:
        return True
    if needed is Auth.ADMIN:
        return not keys.admin or _matches(presented, keys.admin)
    if not keys.api:
        return True
    return _matches(presented, keys.api) or (bool(keys.admin) and _matches(presented, keys.admin))


def refusal_body(needed: Auth) -> bytes:
    return ADMIN_KEY_REFUSED if needed is Auth.ADMIN else API_KEY_REFUSED


# -- origins --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    scheme: str  # lower case; "" when the text had none
    host: str  # lower case; IPv6 in brackets; "null" for the opaque origin
    port: int = -1  # -1: none written

    def effective_port(self) -> int:
        return self.port if self.port != -1 else _DEFAULT_PORTS.get(self.scheme, -1)

    def matches(self, other: "Origin") -> bool:
        return (self.scheme, self.host, self.effective_port()) == (other.scheme, other.host,
                                                                   other.effective_port())

    @property
    def is_opaque_null(self) -> bool:
        return not self.scheme and self.host == "null" and self.port == -1


def _port(text: str) -> int | None:
    if not text or not (text.isascii() and text.isdigit()) or len(text) > 5 or int(text) > 65535:
        return None
    return int(text)


def parse_origin(text: str) -> Origin | None:
    """An `Origin` value or an allowlist item, as HEAD's `parse_origin`; None when it is not one
    (userinfo, query, fragment, a path on a web scheme, a bad port)."""
    text = text.strip()
    if not text or any(c in text for c in "@?#"):
        return None
    if text.lower() == "null":
        return Origin("", "null")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    scheme = scheme.lower()
    rest, slash, path = rest.partition("/")
    if slash and path and scheme in WEB_SCHEMES:
        return None
    if not rest:
        return Origin(scheme, scheme) if scheme else None  # `file://`, `app://`: the scheme is all
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            return None
        host, tail = rest[:end + 1].lower(), rest[end + 1:]
        if not tail:
            return Origin(scheme, host)
        port = _port(tail[1:]) if tail.startswith(":") else None
        return Origin(scheme, host, port) if port is not None else None
    if rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
        port = _port(port_text)
        return Origin(scheme, host.lower(), port) if port is not None else None
    return Origin(scheme, rest.lower())  # no port, or a bare IPv6 address


def is_loopback_origin(origin: Origin) -> bool:
    """Allowed without configuration (HEAD): loopback hosts, `*.localhost`, and any origin whose scheme
    is not a web one (`file://`, `app://`, `tauri://`; a desktop app's page)."""
    if origin.host in ("localhost", "127.0.0.1", "[::1]", "::1") or origin.host.endswith(".localhost"):
        return True
    return bool(origin.scheme) and origin.scheme not in WEB_SCHEMES


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class OriginPolicy:
    """`LEMONADE_ALLOWED_ORIGINS` parsed once: a comma list of `scheme://host[:port]`, `*`, `null`."""

    allow_all: bool = False
    allow_null: bool = False
    allowed: tuple[Origin, ...] = ()

    @classmethod
    def parse(cls, setting: str) -> "OriginPolicy":
        allow_all = allow_null = False
        allowed = []
        for item in setting.split(","):
            item = item.strip()
            if item == "*":  # HEAD honours `*` only as the whole setting; in a list it means the same
                allow_all = True
            elif item.lower() == "null":
                allow_null = True
            elif item:
                origin = parse_origin(item)
                if origin is not None and origin.scheme:  # an item without a scheme matches nothing
                    allowed.append(origin)
        return cls(allow_all, allow_null, tuple(allowed))

    @classmethod
    def from_env(cls) -> "OriginPolicy":
        from lemonade.utils import path_utils

        return cls.parse(path_utils.allowed_origins_setting())

    def allows(self, origin_text: str, host_header: str | None = None) -> bool:
        """Whether a request with `Origin: origin_text` may proceed. `host_header` lets the web UI's own
        page through when it was loaded from an IP literal (ours: HEAD refuses it unless listed). A DNS
        name is never trusted that way: after DNS rebinding, a foreign page shares its name with us."""
        origin = parse_origin(origin_text)
        if origin is None:
            return False
        if is_loopback_origin(origin) or self.allow_all:
            return True
        if origin.is_opaque_null:
            return self.allow_null
        if any(origin.matches(item) for item in self.allowed):
            return True
        return _same_ip_origin(origin, host_header)


def _same_ip_origin(origin: Origin, host_header: str | None) -> bool:
    if not host_header or origin.scheme not in ("http", "https") or not _ip_literal(origin.host):
        return False
    host = parse_origin(f"{origin.scheme}://{host_header.strip()}")
    return host is not None and origin.matches(host)


def cross_site_without_origin(method: str, sec_fetch_site: str | None) -> bool:
    """A state-changing request that a browser marks as coming from another site but that carries no
    `Origin` (old browsers' form posts; HEAD lets it through): refused."""
    return (method in STATE_CHANGING_METHODS and sec_fetch_site is not None
            and sec_fetch_site.strip().lower() not in SAME_SITE_FETCHES)


def cors_headers(origin_text: str | None, requested_headers: str | None,
                 private_network: bool) -> tuple[tuple[str, str], ...]:
    """The CORS headers of an answer. No `Origin`: GA's three (its `*` is read by no browser: only a
    cross-origin request, which always has an `Origin`, consults it). An allowed `Origin`: echoed, as
    HEAD does, with a preflight's requested headers echoed when they are plain names, and Private
    Network Access granted when asked. `Vary: Origin` always, so no cache mixes the two."""
    if origin_text is None:
        return (("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Methods", ALLOW_METHODS),
                ("Access-Control-Allow-Headers", GA_ALLOW_HEADERS), ("Vary", "Origin"))
    allow_headers = ALLOW_HEADERS
    if (requested_headers and len(requested_headers) <= MAX_REQUESTED_HEADERS
            and _REQUESTED_HEADERS.fullmatch(requested_headers.strip())):
        allow_headers = requested_headers.strip()
    headers = [("Access-Control-Allow-Origin", origin_text.strip()),
               ("Access-Control-Allow-Methods", ALLOW_METHODS),
               ("Access-Control-Allow-Headers", allow_headers), ("Vary", "Origin")]
    if private_network:
        headers.append(("Access-Control-Allow-Private-Network", "true"))
    return tuple(headers)


REFUSED_CORS = (("Access-Control-Allow-Methods", ALLOW_METHODS), ("Vary", "Origin"))


# -- the hooks ------------------------------------------------------------------------------------


def origin_hook(policy: OriginPolicy):
    """Sets the request's CORS headers; answers 403 itself for a refused origin or cross-site request."""

    def check_origin(h, route: Route | None) -> bool:
        origins = h.headers.get_all("Origin") or []
        if not origins:
            h.cors_headers = cors_headers(None, None, False)
            if cross_site_without_origin(h.command, h.headers.get("Sec-Fetch-Site")):
                h.send_bytes(403, CROSS_SITE_REFUSED, "application/json")
                return True
            return False
        origin = origins[0]
        if len(set(origins)) > 1 or not policy.allows(origin, h.headers.get("Host")):
            h.cors_headers = REFUSED_CORS
            h.send_bytes(403, ORIGIN_REFUSED, "application/json")
            return True
        private = h.headers.get("Access-Control-Request-Private-Network", "").strip().lower() == "true"
        h.cors_headers = cors_headers(origin, h.headers.get("Access-Control-Request-Headers"), private)
        return False

    return check_origin


def key_hook(keys: Keys):
    """Answers 401 itself unless the request presents the key its route class needs; OPTIONS is never
    checked (a browser's preflight carries no credentials)."""

    def check_key(h, route: Route | None) -> bool:
        if h.command == "OPTIONS":
            return False
        needed = required_class(route, h.url_path)
        presented = presented_credentials(h.headers.get("Authorization"), h.headers.get("x-api-key"))
        if key_accepted(needed, keys, presented):
            return False
        h.send_bytes(401, refusal_body(needed), "application/json", (("WWW-Authenticate", "Bearer"),))
        return True

    return check_key


def default_hooks(keys: Keys) -> list:
    """The hooks `run_server` installs: origins (`LEMONADE_ALLOWED_ORIGINS`, read once), then keys."""
    return [origin_hook(OriginPolicy.from_env()), key_hook(keys)]


def describe(keys: Keys) -> str:
    """One log line saying which routes need a key (never the key)."""
    if not keys.admin:
        return "No API key set: every route is open to clients that can reach this address"
    if not keys.api:
        return "Admin API key set: /internal/* needs it; /api, /v0, /v1 and /metrics need no key"
    if keys.admin == keys.api:
        return "API key set: /api, /v0, /v1, /metrics and /internal/* need it"
    return "API key and admin API key set: /api, /v0, /v1 and /metrics need either; /internal/* the admin key"


def is_loopback_bind(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def unsecured_bind_warning(host: str, keys: Keys) -> str | None:
    """HEAD's start-up warning (`server.cpp` 2026-2058) for a non-loopback bind without a key that
    guards the API routes; None when there is nothing to warn about."""
    if is_loopback_bind(host) or keys.api:
        return None
    if not keys.admin:
        return (f"Serving on non-loopback host '{host}' without an API key. All endpoints, including the "
                "/internal/* control endpoints, are reachable from other machines unauthenticated. Set "
                "LEMONADE_API_KEY to secure all endpoints; LEMONADE_ADMIN_API_KEY on its own only secures "
                "the /internal/* control endpoints.")
    return (f"Serving on non-loopback host '{host}' with only an admin API key set. The /internal/* "
            "control endpoints are protected, but the inference and model-management endpoints (/api, "
            "/v0, /v1) are reachable from other machines unauthenticated. Set LEMONADE_API_KEY to "
            "secure them.")
