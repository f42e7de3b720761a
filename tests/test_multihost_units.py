"""Table tests of the pure parts of "several machines": the unmetered pool in the eviction and idle
policies, remote upstream settings (base URL, key variable, endpoint mapping, model rewrite), RPC
worker lists per model and on the llama-server command line, request header lines, what each recipe
accepts at registration, the CLI parsing of `pull` settings and `rpc-worker`."""
from __future__ import annotations

import json
from pathlib import PurePosixPath

import pytest

from lemonade import cli_parser, server_manager
from lemonade.backends import llamacpp_rpc, registry
from lemonade.backends.llamacpp_rpc import Worker
from lemonade.backends.llamacpp_server import LlamaCppOptions, build_argv
from lemonade.backends.remote_server import RemoteServer, check_base_url, check_env_name
from lemonade.error_types import InvalidRequestError, RegistryError
from lemonade.model_manager import ModelInfo, registry as model_registry
from lemonade.router import EvictionPlan, SlotView, idle_victims, plan_eviction
from lemonade.utils import http_client


def _slot(name, kind="llm", last=0.0, busy=False, pinned=False, unmetered=False):
    return SlotView(name, kind, last, busy, pinned, unmetered)


# -- the unmetered pool ---------------------------------------------------------------------------

@pytest.mark.parametrize("target,unmetered,slots,limit,expected", [
    # a remote model needs no room: a full pool of local models stays as it is
    ("r", True, [_slot("a")], 1, EvictionPlan()),
    ("r", True, [_slot("a", pinned=True)], 1, EvictionPlan()),
    ("r", True, [_slot("a", busy=True), _slot("b")], 2, EvictionPlan()),
    # remote models are nobody's peers: they neither fill a pool nor give way
    ("b", False, [_slot("r", unmetered=True)], 1, EvictionPlan()),
    ("b", False, [_slot("r", last=0, unmetered=True), _slot("a", last=5)], 1, EvictionPlan(victims=("a",))),
    ("b", False, [_slot("r", unmetered=True), _slot("a", pinned=True)], 1, EvictionPlan(pinned_full=True)),
    ("c", False, [_slot("r1", unmetered=True), _slot("r2", unmetered=True), _slot("a")], 2, EvictionPlan()),
    # without unmetered slots the policy is unchanged
    ("b", False, [_slot("a")], 1, EvictionPlan(victims=("a",))),
])
def test_plan_eviction_with_unmetered_models(target, unmetered, slots, limit, expected):
    assert plan_eviction(target, "llm", slots, limit, unmetered) == expected


@pytest.mark.parametrize("slots,expected", [
    ([_slot("r", unmetered=True), _slot("a")], ["a"]),
    ([_slot("r", unmetered=True)], []),
])
def test_idle_unload_never_takes_an_unmetered_model(slots, expected):
    assert idle_victims(slots, now=100, idle_timeout=60) == expected


# -- remote upstream settings ----------------------------------------------------------------------

@pytest.mark.parametrize("url,expected", [
    ("http://10.0.0.5:8000/v1", "http://10.0.0.5:8000/v1"),
    ("https://api.example.com/v1/", "https://api.example.com/v1"),
    (" http://gpu-box/v1 ", "http://gpu-box/v1"),
    ("http://[fd00::5]:8000/v1", "http://[fd00::5]:8000/v1"),
    ("http://host", "http://host"),
])
def test_base_url_accepted(url, expected):
    assert check_base_url(url) == expected


@pytest.mark.parametrize("url,reason", [
    ("ftp://host/v1", "scheme must be http or https"),
    ("host:8000/v1", "scheme must be http or https"),
    ("file:///etc/passwd", "scheme must be http or https"),
    ("http:///v1", "no host"),
    ("http://user:secret@host/v1", "credentials in the URL are refused"),
    ("http://token@host/v1", "credentials in the URL are refused"),
    ("http://host/v1?key=x", "no query or fragment"),
    ("http://host/v1#x", "no query or fragment"),
    ("http://host:99999/v1", "Port out of range"),
    ("http://host:0/v1", "port 0"),
])
def test_base_url_refused(url, reason):
    with pytest.raises(InvalidRequestError) as err:
        check_base_url(url)
    assert reason in err.value.message
    assert "secret" not in err.value.message  # a credential is never echoed back


@pytest.mark.parametrize("name,ok", [
    ("VLLM_API_KEY", True), ("_K", True), ("k9", True),
    ("9K", False), ("sk-abc123", False), ("A B", False), ("", False), ("KEY=x", False),
])
def test_api_key_env_is_a_variable_name(name, ok):
    if ok:
        assert check_env_name(name) == name
    else:
        with pytest.raises(InvalidRequestError) as err:
            check_env_name(name)
        assert name not in err.value.message or not name  # a key given by mistake is not echoed


@pytest.mark.parametrize("base,endpoint,expected", [
    ("http://h:8000/v1", "/v1/chat/completions", "http://h:8000/v1/chat/completions"),
    ("http://h:8000/v1/", "/v1/completions", "http://h:8000/v1/completions"),
    ("https://h/openai/v1", "/v1/embeddings", "https://h/openai/v1/embeddings"),
    ("http://h:8080", "/v1/rerank", "http://h:8080/rerank"),
])
def test_remote_endpoint_urls(base, endpoint, expected):
    assert RemoteServer("user.r", "up-id", "remote", base).endpoint_url(endpoint) == expected


def test_remote_rewrites_the_model_to_the_upstream_id_and_keeps_the_raw_body_when_it_can():
    server = RemoteServer("user.r", "meta/llama-3", "remote", "http://h/v1")
    body = {"model": "user.r", "messages": []}
    assert server.rewrite_request("/v1/chat/completions", body) == {"model": "meta/llama-3", "messages": []}
    assert body["model"] == "user.r"  # the caller's dict is not changed
    same = {"model": "meta/llama-3"}
    assert server.rewrite_request("/v1/chat/completions", same) is same
    assert server.request_payload("/v1/x", same, b'{"model":"meta/llama-3"}') == b'{"model":"meta/llama-3"}'
    assert server.unmetered and not server.is_ready() and server.pid is None


def test_remote_key_comes_from_the_named_variable_only_at_load(monkeypatch):
    server = RemoteServer("user.r", "m", "remote", "http://h/v1", "LEMONADE_TEST_KEY")
    monkeypatch.delenv("LEMONADE_TEST_KEY", raising=False)
    with pytest.raises(Exception) as err:
        server._auth_headers()
    assert "LEMONADE_TEST_KEY" in str(err.value) and err.value.status == 500
    monkeypatch.setenv("LEMONADE_TEST_KEY", "sk-1")
    assert server._auth_headers() == {"Authorization": "Bearer sk-1"}
    monkeypatch.setenv("LEMONADE_TEST_KEY", "sk-1\r\nX-Evil: 1")
    with pytest.raises(Exception) as err:
        server._auth_headers()
    assert "sk-1" not in str(err.value)


@pytest.mark.parametrize("headers,expected", [
    (None, ""),
    ({}, ""),
    ({"Authorization": "Bearer k"}, "Authorization: Bearer k\r\n"),
    ({"A": "1", "B-c": "x y"}, "A: 1\r\nB-c: x y\r\n"),
])
def test_header_block(headers, expected):
    assert http_client.header_block(headers) == expected


@pytest.mark.parametrize("headers", [{"A": "1\r\nB: 2"}, {"A": "1\n"}, {"A B": "1"}, {"A:": "1"}, {"": "1"}])
def test_header_block_refuses_what_would_split_the_request(headers):
    with pytest.raises(ValueError):
        http_client.header_block(headers)


# -- RPC workers per model and on the command line --------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("", None),
    ("  ", None),
    ("none", ()),
    (" NONE ", ()),
    ("10.0.0.2:50052", (Worker("10.0.0.2", 50052),)),
    ("a:1, b:2", (Worker("a", 1), Worker("b", 2))),
])
def test_model_workers(text, expected):
    assert llamacpp_rpc.model_workers(text) == expected


def test_with_model_workers_overrides_the_server_list_only_when_the_model_has_one():
    server = LlamaCppOptions(rpc_workers=(Worker("s", 1),))
    assert llamacpp_rpc.with_model_workers(server, "") is server
    assert llamacpp_rpc.with_model_workers(server, "none").rpc_workers == ()
    assert llamacpp_rpc.with_model_workers(server, "m:2").rpc_workers == (Worker("m", 2),)
    with pytest.raises(InvalidRequestError):
        llamacpp_rpc.with_model_workers(server, "m")


def test_argv_with_rpc_workers():
    options = LlamaCppOptions(rpc_workers=(Worker("10.0.0.2", 50052), Worker("gpu", 7)))
    argv = build_argv("/bin/llama-server", "/m.gguf", 8001, options, [])
    assert argv == ["/bin/llama-server", "-m", "/m.gguf", "--ctx-size", "4096", "--port", "8001", "--jinja", "--metrics",
                    "--context-shift", "--keep", "16", "--reasoning-format", "auto",
                    "--rpc", "10.0.0.2:50052,gpu:7", "-ngl", "99"]
    with pytest.raises(InvalidRequestError, match="'--rpc' is managed by Lemonade"):
        build_argv("x", "m", 1, LlamaCppOptions(rpc_workers=(Worker("a", 1),), custom_args="--rpc b:2"), [])
    # without workers of ours, a user may still pass --rpc through --llamacpp-args
    assert build_argv("x", "m", 1, LlamaCppOptions(custom_args="--rpc b:2"), [])[-2:] == ["--rpc", "b:2"]


def test_the_backend_kind_follows_the_worker_list(tmp_path):
    spec = registry.spec_for("llamacpp")
    info = ModelInfo("user.m", "org/repo:q", "llamacpp")
    files = registry.ModelFiles(tmp_path / "m.gguf")
    assert type(spec.make_backend(info, files, LlamaCppOptions())).__name__ == "LlamaCppServer"
    rpc = spec.make_backend(info, files, LlamaCppOptions(rpc_workers=(Worker("w", 1),)))
    assert isinstance(rpc, llamacpp_rpc.RpcLlamaCppServer) and rpc.workers == (Worker("w", 1),)
    info.rpc_workers = "none"
    local = spec.make_backend(info, files, LlamaCppOptions(rpc_workers=(Worker("w", 1),)))
    assert not isinstance(local, llamacpp_rpc.RpcLlamaCppServer) and local.options.rpc_workers == ()


# -- what each recipe accepts at registration ---------------------------------------------------------

def _info(recipe, **settings):
    return ModelInfo("user.x", "id", recipe, **settings)


@pytest.mark.parametrize("recipe,settings,error", [
    ("remote", {"base_url": "http://h/v1"}, None),
    ("remote", {"base_url": "https://h/v1", "api_key_env": "KEY"}, None),
    ("remote", {}, "needs base_url"),
    ("remote", {"base_url": "http://h/v1", "rpc_workers": "a:1"}, "rpc_workers is a setting of llamacpp"),
    ("remote", {"base_url": "http://h/v1", "api_key_env": "sk-live-123"}, "Invalid api_key_env"),
    ("llamacpp", {"rpc_workers": "a:1,b:2"}, None),
    ("llamacpp", {"rpc_workers": "none"}, None),
    ("llamacpp", {"rpc_workers": "a"}, "expected host:port"),
    ("llamacpp", {"rpc_workers": "[::1]:5"}, "IPv4 only"),
    ("llamacpp", {"base_url": "http://h/v1"}, "settings of the remote recipe"),
    ("flm", {"rpc_workers": "a:1"}, "rpc_workers is a setting of llamacpp"),
    ("oga-cpu", {"api_key_env": "K"}, "settings of the remote recipe"),
    ("whispercpp", {"base_url": "http://h/v1"}, "settings of the remote recipe"),
    ("flm", {}, None),
])
def test_check_registration(recipe, settings, error):
    spec = registry.spec_for(recipe)
    if error is None:
        spec.check_registration(_info(recipe, **settings))
    else:
        with pytest.raises(RegistryError, match=error.replace("[", r"\[")):
            spec.check_registration(_info(recipe, **settings))


def test_remote_is_always_downloaded_and_never_uploadable():
    spec = registry.spec_for("remote")
    info = _info("remote", base_url="http://h/v1")
    assert spec.model_files(info) == registry.ModelFiles(None) and spec.missing(info) == []
    assert spec.runs_here() and "remote" not in registry.uploadable_recipes()


def test_add_local_model_refuses_the_remote_recipe():
    from lemonade.server import upload

    with pytest.raises(RegistryError, match="Invalid recipe. Must be one of: llamacpp"):
        upload._validate({"model_name": "user.x", "recipe": "remote"}, [PurePosixPath("a.gguf")],
                         registry.model_manager())


def test_user_entry_keeps_the_settings_and_never_a_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LEMONADE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LEMONADE_TEST_KEY", "sk-very-secret")
    manager = registry.model_manager()
    manager.download("user.r", checkpoint="up-id", recipe="remote",
                     settings={"base_url": "http://h:8000/v1", "api_key_env": "LEMONADE_TEST_KEY"})
    stored = json.loads((tmp_path / "user_models.json").read_text())
    assert stored == {"r": {"checkpoint": "up-id", "recipe": "remote", "suggested": True, "labels": ["custom"],
                            "base_url": "http://h:8000/v1", "api_key_env": "LEMONADE_TEST_KEY"}}
    assert "sk-very-secret" not in (tmp_path / "user_models.json").read_text()
    info = model_registry.load_user()["user.r"]
    assert (info.base_url, info.api_key_env, info.rpc_workers) == ("http://h:8000/v1", "LEMONADE_TEST_KEY", "")
    assert manager.is_downloaded(info)
    # a registered model's settings change without repeating its checkpoint; a bad one changes nothing
    manager.download("user.r", settings={"base_url": "https://other/v1"})
    assert manager.get_model("user.r").base_url == "https://other/v1"
    with pytest.raises(RegistryError):
        manager.download("user.r", settings={"base_url": "http://a:b@h/v1"})
    assert manager.get_model("user.r").base_url == "https://other/v1"
    with pytest.raises(RegistryError, match="only be set on a user model"):
        manager.download("Gemma-3-270m-GGUF", settings={"rpc_workers": "a:1"})
    with pytest.raises(RegistryError, match="Unknown model setting"):
        manager.download("user.r", settings={"api_key": "sk-1"})
    manager.delete("user.r")  # nothing on disk: unregistering is all
    assert "user.r" not in manager.supported_models()


# -- command lines --------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens,expected", [
    (["--checkpoint", "m", "--recipe", "remote", "--base-url", "http://h/v1", "--api-key-env", "K"],
     {"model": "user.x", "checkpoint": "m", "recipe": "remote", "base_url": "http://h/v1", "api_key_env": "K"}),
    (["--rpc-workers", "a:1,b:2"], {"model": "user.x", "rpc_workers": "a:1,b:2"}),
    (["--base-url"], {"model": "user.x"}),  # a value option at the end takes nothing, as C++'s
])
def test_pull_body_settings(tokens, expected):
    assert server_manager.pull_body("user.x", tokens) == expected


def test_rpc_workers_flag_is_the_servers_for_serve_and_the_models_for_pull(monkeypatch):
    monkeypatch.setenv("LEMONADE_RPC_WORKERS", "env:1")
    serve = cli_parser.parse_client_args(["serve", "--rpc-workers", "a:1"], ("--rpc-workers",))
    assert serve.config.rpc_workers == "a:1" and serve.positionals == []
    pull = cli_parser.parse_client_args(["pull", "user.x", "--rpc-workers", "b:2"], ())
    assert pull.positionals == ["user.x", "--rpc-workers", "b:2"]
    assert cli_parser.parse_client_args(["serve"], ()).config.rpc_workers == "env:1"


@pytest.mark.parametrize("tokens,expected", [
    ([], cli_parser.RpcWorkerArgs("127.0.0.1", 50052, None, "info")),
    (["--host", "0.0.0.0", "--port", "6000", "--threads", "2"], cli_parser.RpcWorkerArgs("0.0.0.0", 6000, 2, "info")),
    (["--port=7", "--log-level", "debug"], cli_parser.RpcWorkerArgs("127.0.0.1", 7, None, "debug")),
])
def test_parse_rpc_worker_args(tokens, expected, monkeypatch):
    monkeypatch.setenv("LEMONADE_PORT", "9999")  # the server's settings are not the worker's
    monkeypatch.setenv("LEMONADE_HOST", "0.0.0.0")
    assert cli_parser.parse_rpc_worker_args(tokens) == expected


@pytest.mark.parametrize("tokens,message", [
    (["--port", "x"], "--port expects a whole number, got 'x'"),
    (["--threads"], "--threads needs a value"),
    (["--bogus", "1"], "unexpected argument '--bogus' for rpc-worker"),
    (["extra"], "unexpected argument 'extra'"),
    (["--log-level", "loud"], "--log-level must be one of"),
])
def test_parse_rpc_worker_args_refuses(tokens, message):
    with pytest.raises(cli_parser.UsageError) as err:
        cli_parser.parse_rpc_worker_args(tokens)
    assert message in err.value.message and err.value.code == 1


def test_rpc_worker_help_and_bad_input_without_starting_anything(capsys):
    assert cli_parser.main_client("lemonade", ["rpc-worker", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: lemonade rpc-worker [--host ADDRESS] [--port PORT] [--threads N]" in out
    assert "rpc-server has no authentication" in " ".join(out.split())
    assert cli_parser.main_client("lemonade", ["rpc-worker", "--port", "x"]) == 1
    assert "--port expects a whole number" in capsys.readouterr().err
    assert cli_parser.main_client("lemonade-server", ["rpc-worker"]) == 1  # C++'s command set only
    assert "Unknown command 'rpc-worker'" in capsys.readouterr().err
    assert cli_parser.main_client("lemonade", ["--help"]) == 0
    assert "rpc-worker [--host H] [--port P] [--threads N]" in capsys.readouterr().out
