"""Web UI serving (spec http-api §4.20): `/` redirect, the templated `webapp.html`, `/static/*` with
content types and no-cache headers, and no way out of the static directory (the page itself and its
browser test belong to tests/test_webui.py)."""
from __future__ import annotations

import json
import re

import pytest
import requests

from api_support import (DEFAULT_MODEL, assert_cors, compact, not_found, raw_request, request_bytes,
                         running_server)
from lemonade.utils import path_utils

NO_CACHE = {"Cache-Control": "no-cache, no-store, must-revalidate", "Pragma": "no-cache", "Expires": "0"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache):
    with running_server(tmp_path_factory.mktemp("webui"), seeded_hub_cache) as s:
        yield s


def test_root_redirects(server):
    reply = requests.get(server.url + "/", allow_redirects=False)
    assert reply.status_code == 302 and reply.headers["Location"] == "/webapp.html"
    assert_cors(reply.headers)


def test_webapp_is_templated(server):
    reply = requests.get(server.url + "/webapp.html")
    assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/html")
    for key, value in NO_CACHE.items():
        assert reply.headers[key] == value
    assert_cors(reply.headers)
    page = reply.text
    assert "{{SERVER_PORT}}" not in page and "{{SERVER_MODELS_JS}}" not in page and "{{PLATFORM_JS}}" not in page
    assert "<script>window.PLATFORM = 'Linux';</script>" in page
    match = re.search(r"<script>window\.SERVER_MODELS = (.*?);</script>", page)
    models = json.loads(match.group(1))
    assert match.group(1).encode() == compact(models)
    assert models[DEFAULT_MODEL]["model_name"] == DEFAULT_MODEL
    assert set(models[DEFAULT_MODEL]) == {"checkpoint", "labels", "mmproj", "model_name", "recipe", "suggested"}
    template = (path_utils.static_dir() / "webapp.html").read_text()
    if "{{SERVER_PORT}}" in template:
        assert str(server.port) in page


@pytest.mark.parametrize("name,content_type", [
    ("styles.css", "text/css"), ("js/chat.js", "text/javascript"), ("js/shared.js", "text/javascript"),
    ("favicon.ico", "image/x-icon"), ("logs.html", "text/html"), ("webapp.html", "text/html"),
])
def test_static_files(server, name, content_type):
    reply = requests.get(f"{server.url}/static/{name}")
    assert reply.status_code == 200 and reply.headers["Content-Type"] == content_type
    assert reply.content == (path_utils.static_dir() / name).read_bytes()  # static webapp.html is raw
    for key, value in NO_CACHE.items():
        assert reply.headers[key] == value
    assert_cors(reply.headers)
    head = raw_request(server.port, request_bytes("HEAD", f"/static/{name}"), method="HEAD")
    assert head.status == 200 and head.body == b""
    assert int(head.getheader("Content-Length")) == len(reply.content)


@pytest.mark.parametrize("target", [
    "/static/../../etc/passwd",
    "/static/../../../../../../etc/passwd",
    "/static/js/../../../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/static/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/static/%252e%252e/%252e%252e/etc/passwd",  # decoded once only
    "/static//etc/passwd",
    "/static/%2fetc%2fpasswd",
    "/static/..\\..\\..\\etc\\passwd",
    "/static/%00",
    "/static/styles.css%00.js",
    "/static/" + "a" * 4000,
    "/static/",
    "/static/js",
    "/static/js/",
    "/static/nope.css",
])
def test_no_way_out_of_static(server, target):
    for method in ("GET", "HEAD"):
        reply = raw_request(server.port, request_bytes(method, target), method=method)
        assert reply.status == 404, (target, reply.status)
        assert b"root:" not in reply.body
        assert_cors(dict(reply.getheaders()))
        if method == "GET":
            body = json.loads(reply.body)
            assert body["error"]["type"] == "not_found" and body["error"]["message"] == \
                "The requested endpoint does not exist"


def test_post_on_static_is_404(server):
    reply = requests.post(server.url + "/static/styles.css", data=b"x")
    assert reply.status_code == 404 and reply.json() == not_found("/static/styles.css")
