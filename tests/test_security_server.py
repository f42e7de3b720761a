"""API keys and origins against real `lemonade serve` processes (spec head-llm-surface.md §4).

Three servers: both keys set, only `LEMONADE_API_KEY`, only `LEMONADE_ADMIN_API_KEY`. Every row of the
route table (and paths no row serves) is called with no key, a wrong key, the user key and the admin
key, in both header forms, and the answer is checked against HEAD's table, written out here: so a route
added later (the Ollama and Anthropic dialects) is covered by the same rule without a change here.
Then: origins and cross-site requests (403 before any key check), Private Network Access, the
start-up warning on a non-loopback bind, bad input on the new paths, and no key in any log.
"""
from __future__ import annotations

import contextlib
import os
import re

import pytest
import requests

from api_support import private_env, raw_request, request_bytes, stop_server
from conftest import start_server, wait_for
from lemonade.server.routes import default_table

pytestmark = pytest.mark.timeout(600)

USER_KEY = "user-key-7c1f9e2a"
ADMIN_KEY = "admin-key-5d3b8e44"
WRONG_KEY = "wrong-key-0b0b0b0b"
# HEAD's bodies, byte for byte (server.cpp 1035, 1043, 1045; a space after the colon).
API_REFUSED = b'{"error": "Invalid or missing API key"}'
ADMIN_REFUSED = b'{"error": "Invalid or missing admin API key"}'
ORIGIN_REFUSED = b'{"error": "Origin not allowed"}'

CONFIGS = {
    "both": {"LEMONADE_API_KEY": USER_KEY, "LEMONADE_ADMIN_API_KEY": ADMIN_KEY},
    "api-only": {"LEMONADE_API_KEY": USER_KEY, "LEMONADE_ALLOWED_ORIGINS": "https://app.example.com:8443, null"},
    "admin-only": {"LEMONADE_ADMIN_API_KEY": ADMIN_KEY},
}
# HEAD §4.1, per server: which of the credentials we send each route class accepts.
ACCEPTS = {
    "both": {"public": {"none", "wrong", "user", "admin"}, "api": {"user", "admin"}, "admin": {"admin"}},
    "api-only": {"public": {"none", "wrong", "user", "admin"}, "api": {"user"}, "admin": {"user"}},
    "admin-only": {"public": {"none", "wrong", "user", "admin"}, "api": {"none", "wrong", "user", "admin"},
                   "admin": {"admin"}},
}
# (credential name, header form) pairs sent to every route
CREDENTIALS = [("none", None), ("wrong", "bearer"), ("user", "bearer"), ("user", "x-api-key"),
               ("admin", "bearer"), ("admin", "x-api-key")]
KEY_VALUES = {"wrong": WRONG_KEY, "user": USER_KEY, "admin": ADMIN_KEY}
UNROUTED = [("GET", "/api/v1/nope"), ("POST", "/v1/nope"), ("GET", "/v0/nope"), ("GET", "/api/nope"),
            ("GET", "/internal/nope"), ("POST", "/internal/nope"), ("GET", "/nope"), ("PUT", "/api/v1/health"),
            ("DELETE", "/internal/pin"), ("GET", "/metrics/x")]


def heads_class(path: str) -> str:
    """HEAD's route classes by path (server.cpp 975-982), independent of our code."""
    if path.startswith("/internal/"):
        return "admin"
    if path.startswith(("/api/", "/v0/", "/v1/")) or path == "/metrics":
        return "api"
    return "public"


def every_request() -> list[tuple[str, str]]:
    """(method, path) of every route row, a parameter filled in, and paths no row serves."""
    calls = []
    for route in default_table():
        path = route.prefix + "x" if route.param else route.path
        calls.append((route.method, path))
    return sorted(set(calls)) + UNROUTED


def headers_for(name: str, form: str | None) -> dict:
    if form is None:
        return {}
    key = KEY_VALUES[name]
    return {"Authorization": f"Bearer {key}"} if form == "bearer" else {"x-api-key": key}


@pytest.fixture(scope="module")
def servers(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with contextlib.ExitStack() as stack:
        started = {}
        for name, extra in CONFIGS.items():
            tmp = tmp_path_factory.mktemp(f"sec-{name}")
            env = private_env(tmp, seeded_hub_cache)
            env.update(extra)
            server = start_server(env, tmp)
            server.runtime_log = tmp / "runtime" / "lemonade-server.log"
            stack.callback(stop_server, server)
            started[name] = server
        yield started


def call(server, method: str, path: str, headers: dict, body: bytes | None = None) -> tuple[int, bytes]:
    """One request; the body is read only when it is short (an SSE route never ends)."""
    data = body if body is not None else (b"{}" if method in ("POST", "PUT", "DELETE") else None)
    hdrs = dict(headers)
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    with requests.request(method, server.url + path, headers=hdrs, data=data, stream=True,
                          allow_redirects=False, timeout=60) as reply:
        length = int(reply.headers.get("Content-Length", "-1"))
        content = reply.raw.read(length) if 0 <= length <= 65536 else b""
        return reply.status_code, content


@pytest.mark.parametrize("config", list(CONFIGS))
def test_every_route_with_every_credential(servers, config):
    server = servers[config]
    failures = []
    for method, path in every_request():
        klass = heads_class(path)
        for name, form in CREDENTIALS:
            if path == "/internal/shutdown" and name in ACCEPTS[config][klass]:
                continue  # accepted, it would stop the server: test_shutdown_with_the_admin_key
            status, body = call(server, method, path, headers_for(name, form))
            if name in ACCEPTS[config][klass]:
                if status in (401, 403):
                    failures.append(f"{method} {path} [{name} via {form}] refused: {status} {body[:80]!r}")
            else:
                expected = ADMIN_REFUSED if klass == "admin" else API_REFUSED
                if (status, body) != (401, expected):
                    failures.append(f"{method} {path} [{name} via {form}] gave {status} {body[:80]!r}")
    assert not failures, "\n".join(failures[:40]) + f"\n({len(failures)} in all)"


def test_options_is_never_checked(servers):
    for path in ("/api/v1/chat/completions", "/internal/shutdown", "/metrics", "/v1/models"):
        status, body = call(servers["both"], "OPTIONS", path, {})
        assert (status, body) == (204, b""), path


def test_a_refusal_closes_the_connection_only_over_an_unread_body(servers):
    """401 to a POST whose body was not read closes the connection; a GET keeps it alive."""
    port = servers["both"].port
    reply = raw_request(port, request_bytes("POST", "/api/v1/pull", b'{"model": "x"}'))
    assert reply.status == 401 and reply.getheader("Connection") == "close"
    assert reply.getheader("WWW-Authenticate") == "Bearer"
    reply = raw_request(port, request_bytes("GET", "/api/v1/health"))
    assert reply.status == 401 and reply.getheader("Connection") is None


# -- origins --------------------------------------------------------------------------------------


def test_foreign_origin_is_refused_before_the_key(servers):
    server = servers["both"]
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for method, path in [("GET", "/live"), ("GET", "/webapp.html"), ("POST", "/api/v1/delete"),
                         ("POST", "/internal/shutdown"), ("OPTIONS", "/api/v1/delete"), ("GET", "/metrics")]:
        status, body = call(server, method, path, {"Origin": "https://evil.example", **admin})
        assert (status, body) == (403, ORIGIN_REFUSED), (method, path)
    # a form post: a simple content type, no preflight, the admin key even (a browser would not have it)
    status, body = call(server, "POST", "/internal/shutdown",
                        {"Origin": "http://evil.example:8080", "Content-Type": "application/x-www-form-urlencoded"},
                        body=b"a=b")
    assert (status, body) == (403, ORIGIN_REFUSED)
    assert requests.get(server.url + "/live", timeout=10).status_code == 200


def test_cross_site_post_without_origin_is_refused(servers):
    """What an old browser's form post looks like: Fetch Metadata, no Origin. A link (GET) still works."""
    server = servers["admin-only"]  # the API routes need no key here: only the cross-site rule stands
    for method, path in [("POST", "/api/v1/delete"), ("POST", "/api/v1/unload"), ("DELETE", "/api/v1/x")]:
        status, body = call(server, method, path, {"Sec-Fetch-Site": "cross-site",
                                                   "Content-Type": "text/plain"}, body=b"{}")
        assert status == 403 and body == b'{"error": "Cross-site request not allowed"}', (method, path)
    status, _ = call(server, "GET", "/webapp.html", {"Sec-Fetch-Site": "cross-site"})
    assert status == 200
    status, _ = call(server, "POST", "/api/v1/unload", {"Sec-Fetch-Site": "same-origin"})
    assert status == 200


def test_allowed_origin_is_echoed_with_vary_and_pna(servers):
    server = servers["both"]
    reply = requests.options(server.url + "/api/v1/chat/completions", timeout=10, headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, x-api-key",
        "Access-Control-Request-Private-Network": "true"})
    assert reply.status_code == 204
    assert reply.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert reply.headers["Access-Control-Allow-Private-Network"] == "true"
    assert reply.headers["Access-Control-Allow-Headers"] == "content-type, x-api-key"
    assert reply.headers["Vary"] == "Origin"
    reply = requests.get(server.url + "/api/v1/models", timeout=10,
                         headers={"Origin": "http://127.0.0.1:3000", "x-api-key": USER_KEY})
    assert reply.status_code == 200 and reply.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:3000"
    assert "Access-Control-Allow-Private-Network" not in reply.headers
    # a refused key still tells an allowed page why (the browser lets it read the 401)
    reply = requests.get(server.url + "/api/v1/models", timeout=10, headers={"Origin": "http://localhost:5173"})
    assert reply.status_code == 401 and reply.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    # no Origin: GA's headers (the parity harness checks them), and Vary so no cache mixes the two
    reply = requests.get(server.url + "/live", timeout=10)
    assert reply.headers["Access-Control-Allow-Origin"] == "*" and reply.headers["Vary"] == "Origin"


def test_allowlist_from_the_environment(servers):
    server = servers["api-only"]  # LEMONADE_ALLOWED_ORIGINS="https://app.example.com:8443, null"
    key = {"Authorization": f"Bearer {USER_KEY}"}
    for origin, allowed in [("https://app.example.com:8443", True), ("https://app.example.com", False),
                            ("null", True), ("https://evil.example", False), ("http://localhost", True)]:
        reply = requests.get(server.url + "/api/v1/health", timeout=10, headers={"Origin": origin, **key})
        assert (reply.status_code == 200) is allowed, origin
        if allowed:
            assert reply.headers["Access-Control-Allow-Origin"] == origin
    reply = requests.get(servers["both"].url + "/live", timeout=10, headers={"Origin": "null"})
    assert reply.status_code == 403  # null needs listing


def test_two_different_origins_are_refused(servers):
    data = request_bytes("GET", "/live", headers={"Origin": "http://localhost"})
    data = data.replace(b"\r\n\r\n", b"\r\nOrigin: https://evil.example\r\n\r\n", 1)
    reply = raw_request(servers["both"].port, data)
    assert reply.status == 403


# -- bad input on the new paths -------------------------------------------------------------------


@pytest.mark.parametrize("headers,status", [
    ({"Authorization": "Bearer " + "k" * 70000}, 431),  # a header line past http.server's limit
    ({"Authorization": "Bearer \xff\xfe"}, 401),  # latin-1 bytes that are no key
    ({"Authorization": "Bearer " + USER_KEY + "\x00"}, 401),
    ({"Authorization": "Bearer"}, 401),
    ({"Authorization": "Token " + USER_KEY}, 401),
    ({"x-api-key": ""}, 401),
    ({"Origin": "http://\x01evil"}, 403),
    ({"Origin": ""}, 403),
    ({"Origin": "https://" + "a" * 5000}, 403),
])
def test_malformed_credentials_and_origins(servers, headers, status):
    data = request_bytes("GET", "/api/v1/health", headers={k: v for k, v in headers.items()})
    data = data.replace("\xff\xfe".encode(), b"\xff\xfe")
    reply = raw_request(servers["both"].port, data)
    assert reply.status == status
    assert reply.getheader("Content-Type") == "application/json"


@pytest.mark.parametrize("method,path,body,status", [
    ("POST", "/metrics", b"", 404),
    ("PUT", "/metrics", b"", 404),
    ("POST", "/v1/chat/completions", b'{"model": 5}', 400),
    ("POST", "/v1/chat/completions", b'{"messages": "hi"}', 400),
    ("POST", "/v1/chat/completions", b'{"stream": "yes"}', 400),
    ("POST", "/v1/chat/completions", b"[]", 400),
    ("POST", "/v0/completions", b"{", 400),
    ("POST", "/v1/embeddings", "\ud800".encode("utf-8", "surrogatepass"), 400),
    ("POST", "/v1/load", b'{"model_name": 5}', 400),
    ("POST", "/v1/pull", b'{"model": ["x"]}', 400),
    ("POST", "/v1/delete", b'{"model": null}', 400),
    ("POST", "/internal/pin", b'{"model_name": 5, "pinned": "yes"}', 400),
    ("POST", "/internal/pin", b'{"model_name": "x", "pinned": "yes"}', 400),
    ("POST", "/internal/pin", b'{"model_name": "Gemma-3-270m-GGUF", "pinned": true}', 400),  # not loaded
])
def test_bad_input_on_new_paths(servers, method, path, body, status):
    got, reply = call(servers["both"], method, path, {"Authorization": f"Bearer {ADMIN_KEY}"}, body=body)
    assert got == status, reply
    assert reply.startswith(b"{")


def test_huge_bodies_are_refused_unread(servers):
    for path in ("/v1/chat/completions", "/internal/pin", "/v0/pull"):
        head = request_bytes("POST", path, headers={"Authorization": f"Bearer {ADMIN_KEY}",
                                                    "Content-Length": str(64 * 1024 * 1024)})
        reply = raw_request(servers["both"].port, head)
        assert reply.status == 413, path
    # without the key the answer is 401, still from the headers alone
    head = request_bytes("POST", "/v1/chat/completions", headers={"Content-Length": str(64 * 1024 * 1024)})
    assert raw_request(servers["both"].port, head).status == 401


def test_metrics_head_and_key(servers):
    server = servers["both"]
    assert requests.get(server.url + "/metrics", timeout=10).status_code == 401
    reply = requests.head(server.url + "/metrics", headers={"x-api-key": USER_KEY}, timeout=10)
    assert reply.status_code == 200 and reply.content == b""
    assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert requests.get(servers["admin-only"].url + "/metrics", timeout=10).status_code == 200


# -- the log never shows a key (runs after the requests above) ---------------------------------------


def test_no_key_in_any_log(servers):
    for server in servers.values():
        texts = [server.log_text(), server.runtime_log.read_text(errors="replace")]
        for text in texts:
            for key in (USER_KEY, ADMIN_KEY, WRONG_KEY):
                assert key not in text, f"{key} in the log of {server.url}"
            assert re.search(r"\[Server\] POST /internal/pin - 401", text)  # the requests were logged
        assert "need" in texts[0]  # the start-up line says which routes need a key


def test_shutdown_with_the_admin_key(servers):
    for name, key in (("both", USER_KEY), ("admin-only", USER_KEY)):
        status, body = call(servers[name], "POST", "/internal/shutdown", {"x-api-key": key})
        assert (status, body) == (401, ADMIN_REFUSED)
    for name, key in (("both", ADMIN_KEY), ("api-only", USER_KEY)):  # api-only: its key is the admin key
        server = servers[name]
        status, body = call(server, "POST", "/internal/shutdown", {"Authorization": f"Bearer {key}"})
        assert status == 200 and b"shutting down" in body
        assert server.proc.wait(timeout=30) == 0


# -- the warning on a non-loopback bind -------------------------------------------------------------


def test_warning_when_listening_beyond_loopback_without_a_key(tmp_path, seeded_hub_cache):
    env = private_env(tmp_path, seeded_hub_cache)
    server = start_server(env, tmp_path, "--host", "0.0.0.0")
    try:
        wait_for(lambda: "without an API key" in server.log_text(), 30, what="the warning")
        assert "Serving on non-loopback host '0.0.0.0'" in server.log_text()
    finally:
        stop_server(server)
    env["LEMONADE_API_KEY"] = USER_KEY
    server = start_server(env, tmp_path, "--host", "0.0.0.0")
    try:
        wait_for(lambda: "need" in server.log_text(), 30, what="the key line")
        assert "non-loopback" not in server.log_text()
    finally:
        stop_server(server)


def test_backend_children_do_not_inherit_the_keys():
    """`process_manager.spawn` drops both keys from a child's environment."""
    from lemonade.utils import process_manager

    os.environ["LEMONADE_API_KEY"], os.environ["LEMONADE_ADMIN_API_KEY"] = USER_KEY, ADMIN_KEY
    try:
        child = process_manager.spawn("env", ["/usr/bin/env"])
        child.popen.wait(timeout=10)
        wait_for(lambda: child.popen.stdout.closed, 10, what="the output to be drained")
        text = child.tail_text()
    finally:
        del os.environ["LEMONADE_API_KEY"], os.environ["LEMONADE_ADMIN_API_KEY"]
    assert "PATH=" in text and USER_KEY not in text and ADMIN_KEY not in text
