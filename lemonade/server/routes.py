"""The route table (C++ `server/server.cpp` `setup_routes`): one row per method and path, carrying
every attribute the dispatcher needs, so nothing about a route is kept anywhere else.

A row says which `handlers.Api` method serves it, whether that handler reads the request body (every
other body is drained before the handler runs), how its errors are shaped, what HEAD does, and which
key class guards it (used by the pre-dispatch hooks of `httpd`). Pure data and a pure `match`,
table-tested.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class Errors(enum.Enum):
    """How a route renders an error (`error_types.render`)."""

    OPENAI = "openai"  # {"error": {"message", "type", …}} (C++ ErrorResponse)
    STRING = "string"  # {"error": "<text>"}: the C++ management handlers' shape, read by its CLI
    OLLAMA = "ollama"  # {"error": "<text>"} with HEAD's Ollama statuses (`ollama_api.errors`)
    ANTHROPIC = "anthropic"  # {"type": "error", "error": {"type", "message"}} (`anthropic_api.errors`)


class Head(enum.Enum):
    GET = "get"  # run the GET handler; only the head of its answer is sent
    EMPTY = "empty"  # 200 with no body and no work (C++ answers HEAD on status routes so)


class Auth(enum.Enum):
    """Key classes of lemonade HEAD (head-llm-surface.md §4.1)."""

    PUBLIC = "public"  # the web page, static files, liveness: never a key
    API = "api"  # inference and model routes: the API key (or the admin key)
    ADMIN = "admin"  # /internal/*: the admin key only


@dataclass(frozen=True)
class Route:
    method: str  # GET, POST or DELETE (HEAD looks up GET; OPTIONS is answered before routing)
    path: str  # exact, or ending in "{name}": that name takes the rest of the path
    handler: str  # a method of `handlers.Api`, or "method_not_allowed"
    reads_body: bool = False
    errors: Errors = Errors.OPENAI
    head: Head = Head.GET
    auth: Auth = Auth.API

    @property
    def param(self) -> str | None:
        if self.path.endswith("}") and "{" in self.path:
            return self.path[self.path.rindex("{") + 1:-1]
        return None

    @property
    def prefix(self) -> str:
        return self.path[:self.path.rindex("{")] if self.param else self.path


# GA's two prefixes, then HEAD's two (head-llm-surface.md §7.1: every OpenAI and Lemonade endpoint under all four).
API_PREFIXES = ("/api/v0/", "/api/v1/", "/v0/", "/v1/")
METHOD_NOT_ALLOWED = "method_not_allowed"


def _api(method: str, endpoint: str, handler: str, **attrs) -> list[Route]:
    """The route under every API prefix; a POST route also answers GET (and HEAD) with 405, as C++."""
    rows = [Route(method, prefix + endpoint, handler, **attrs) for prefix in API_PREFIXES]
    if method == "POST":
        rows += [Route("GET", prefix + endpoint, METHOD_NOT_ALLOWED) for prefix in API_PREFIXES]
    return rows


_STATUS = {"head": Head.EMPTY}  # GA's HEAD shortcut on the status routes
_BODY = {"reads_body": True}
_MANAGEMENT = {"reads_body": True, "errors": Errors.STRING}
_OLLAMA = {"errors": Errors.OLLAMA}
_OLLAMA_BODY = {"reads_body": True, "errors": Errors.OLLAMA}
_ANTHROPIC_BODY = {"reads_body": True, "errors": Errors.ANTHROPIC}

# The Ollama API (HEAD `S/ollama_api.cpp:156-223`, spec head §5.1): under `/api/` only, no prefix
# variants, and no 405 rows (httplib answers another method there with its 404). The four routes
# Lemonade does not support answer 501 and never read their (possibly large) bodies.
OLLAMA_ROUTES: list[Route] = [
    Route("POST", "/api/chat", "ollama_chat", **_OLLAMA_BODY),
    Route("POST", "/api/generate", "ollama_generate", **_OLLAMA_BODY),
    Route("GET", "/api/tags", "ollama_tags", **_OLLAMA),
    Route("POST", "/api/show", "ollama_show", **_OLLAMA_BODY),
    Route("DELETE", "/api/delete", "ollama_delete", **_OLLAMA_BODY),
    Route("POST", "/api/pull", "ollama_pull", **_OLLAMA_BODY),
    Route("POST", "/api/embed", "ollama_embed", **_OLLAMA_BODY),
    Route("POST", "/api/embeddings", "ollama_embeddings", **_OLLAMA_BODY),
    Route("GET", "/api/ps", "ollama_ps", **_OLLAMA),
    Route("GET", "/api/version", "ollama_version", **_OLLAMA),
    *(Route("POST", path, "ollama_not_supported", **_OLLAMA)
      for path in ("/api/create", "/api/copy", "/api/push", "/api/blobs/{digest}")),
]

# Anthropic Messages (HEAD `S/anthropic_api.cpp:183-186`, spec head §6): HEAD serves only
# `POST /v1/messages`; the `/api/v1` twins and count_tokens are ours (the issue asks for both).
ANTHROPIC_ROUTES: list[Route] = [
    Route("POST", prefix + endpoint, handler, **_ANTHROPIC_BODY)
    for prefix in ("/v1/", "/api/v1/")
    for endpoint, handler in (("messages", "anthropic_messages"),
                              ("messages/count_tokens", "anthropic_count_tokens"))
]

ROUTES: list[Route] = [
    *_api("GET", "health", "health", **_STATUS),
    *_api("GET", "models", "models", **_STATUS),
    *_api("GET", "models/{id}", "model_by_id"),
    *_api("GET", "stats", "stats", **_STATUS),
    *_api("GET", "system-info", "system_info", **_STATUS),
    *_api("GET", "logs/stream", "logs_stream"),
    *_api("POST", "chat/completions", "chat_completions", **_BODY),
    *_api("POST", "completions", "completions", **_BODY),
    *_api("POST", "embeddings", "embeddings", **_MANAGEMENT),
    *_api("POST", "reranking", "reranking", **_MANAGEMENT),
    *_api("POST", "rerank", "reranking", **_MANAGEMENT),
    *_api("POST", "responses", "responses", **_MANAGEMENT),
    *_api("POST", "pull", "pull", **_MANAGEMENT),
    *_api("POST", "load", "load", **_MANAGEMENT),
    *_api("POST", "unload", "unload", **_MANAGEMENT),
    *_api("POST", "delete", "delete", **_MANAGEMENT),
    *_api("POST", "params", "params", **_MANAGEMENT),
    *_api("POST", "add-local-model", "add_local_model", **_MANAGEMENT),
    *_api("POST", "log-level", "log_level", **_MANAGEMENT),
    Route("POST", "/api/v1/test", "test", reads_body=True),
    Route("POST", "/internal/shutdown", "shutdown", reads_body=True, auth=Auth.ADMIN),
    Route("POST", "/internal/pin", "pin", reads_body=True, auth=Auth.ADMIN),
    Route("GET", "/live", "live", auth=Auth.PUBLIC),
    Route("GET", "/metrics", "metrics"),  # HEAD §7.6: root only, the API key when one is set
    Route("GET", "/", "root", auth=Auth.PUBLIC),
    Route("GET", "/webapp.html", "webapp", auth=Auth.PUBLIC),
    Route("GET", "/static/{path}", "static", auth=Auth.PUBLIC),
    *OLLAMA_ROUTES,
    *ANTHROPIC_ROUTES,
]


class RouteTable:
    """Exact paths in a dict, parameterised ones in table order."""

    def __init__(self, routes: list[Route]):
        self._exact: dict[tuple[str, str], Route] = {}
        self._patterns: list[Route] = []
        for route in routes:
            if route.param:
                self._patterns.append(route)
            elif (route.method, route.path) in self._exact:
                raise ValueError(f"duplicate route {route.method} {route.path}")
            else:
                self._exact[(route.method, route.path)] = route

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str]]:
        """The row serving `method path` and its parameters; (None, {}) means 404. HEAD is looked up
        as GET (the row's `head` says what HEAD does)."""
        verb = "GET" if method == "HEAD" else method
        route = self._exact.get((verb, path))
        if route is not None:
            return route, {}
        for route in self._patterns:
            if route.method == verb and path.startswith(route.prefix) and len(path) > len(route.prefix):
                return route, {route.param: path[len(route.prefix):]}
        return None, {}

    def __iter__(self):
        yield from self._exact.values()
        yield from self._patterns


def default_table() -> RouteTable:
    return RouteTable(ROUTES)
