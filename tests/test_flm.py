"""FastFlowLM backend: unit tests of the CLI glue, then the real `lemonade serve` end to end.

The only stand-in is the `flm` executable itself (tests/flm_standin.py), since FLM needs an AMD NPU.
Everything else is the product: the server subprocess, the registry's flm models (made visible by
`RYZENAI_SKIP_PROCESSOR_CHECK=1`, system-info §7), router, backend, process_manager.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import requests

import flm_standin
from conftest import start_server, wait_for
from lemonade.backends import fastflowlm_server as flm
from lemonade.error_types import DownloadError, FileError, InstallationError
from lemonade.utils import path_utils

MODEL, CKPT = "Qwen3-0.6b-FLM", "qwen3:0.6b"  # a registry model with recipe flm
OTHER_MODEL, OTHER_CKPT = "Gemma3-1b-it-FLM", "gemma3:1b"


@pytest.fixture()
def standin(tmp_path, monkeypatch) -> Path:
    """The stand-in `flm` as `$LEMONADE_FLM` for in-process calls; returns its state dir."""
    state = tmp_path / "flm-state"
    exe = flm_standin.install(tmp_path / "bin", state, installed=[CKPT], known=[OTHER_CKPT])
    monkeypatch.setenv(flm.path_utils.ENV_FLM, str(exe))
    monkeypatch.setenv(flm_standin.ENV_DIR, str(state))
    return state


def calls(state: Path) -> list[list[str]]:
    return [c["argv"] for c in flm_standin.read_jsonl(state, "calls.jsonl")]


def set_state(state: Path, **changes) -> None:
    flm_standin.write_state(state, {**flm_standin.read_state(state), **changes})


def standin_processes(marker: str) -> list[psutil.Process]:
    """Live stand-in processes whose command line contains `marker` (a test's private dir)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


# -- unit: parsing, argv, finding flm -------------------------------------------------------------

@pytest.mark.parametrize("output, expected", [
    ("Models:\n  - qwen3:0.6b ✅\n  - gemma3:1b ⏬\n", ["qwen3:0.6b"]),
    ("- llama3.2:1b ✅\r\n-  gpt-oss:20b  ✅ (13 GB)\n", ["llama3.2:1b", "gpt-oss:20b"]),
    ("qwen3:0.6b ✅\n", []),  # no "- " prefix
    ("- qwen3:0.6b✅\n", []),  # C++ looks for " ✅" with the space
    ("", []),
])
def test_parse_list(output, expected):
    assert flm.parse_list(output) == expected


@pytest.mark.parametrize("output, expected", [
    ("FLM v0.9.4\n", "0.9.4"), ("FastFlowLM\nFLM v1.0.0-rc1 (build 7)\n", "1.0.0-rc1"),
    ("flm 0.9.4", None), ("", None),
])
def test_parse_version(output, expected):
    assert flm.parse_version(output) == expected


def test_serve_argv_is_exact(standin):
    server = flm.FastFlowLMServer(MODEL, CKPT, "flm", 8192)
    server.prepare()
    assert server.build_argv(8123) == [os.environ["LEMONADE_FLM"], "serve", CKPT, "--ctx-len", "8192",
                                       "--port", "8123"]


def test_rewrite_sets_checkpoint_and_leaves_the_request_alone():
    server = flm.FastFlowLMServer(MODEL, CKPT, "flm", 4096)
    body = {"model": MODEL, "messages": []}
    assert server.rewrite_request("/v1/chat/completions", body) == {"model": CKPT, "messages": []}
    assert body["model"] == MODEL  # the handler compares identity to decide whether to re-dump
    assert server.rewrite_request("/v1/embeddings", body) is body  # C++ forwards embeddings as sent
    raw = b'{"messages": [], "model": "m"}'
    assert server.request_payload("/v1/embeddings", body, raw) is raw
    assert json.loads(server.request_payload("/v1/completions", body, raw))["model"] == CKPT


def test_find_flm_order(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LEMONADE_FLM", raising=False)
    assert flm.find_flm() is None
    assert flm.is_model_pulled(CKPT) is False  # no flm: nothing is pulled, as C++
    with pytest.raises(InstallationError, match="FLM not installed"):
        flm.require_flm()
    on_path = flm_standin.install(tmp_path, tmp_path / "s")
    assert flm.find_flm() == str(on_path)
    monkeypatch.setenv("LEMONADE_FLM", str(tmp_path / "missing"))
    with pytest.raises(InstallationError, match="flm not found at .*missing"):
        flm.find_flm()  # an explicit override never falls through to PATH


def test_version_and_list_through_the_cli(standin):
    assert flm.flm_version(flm.require_flm()) == flm_standin.VERSION
    assert flm.installed_checkpoints() == [CKPT]
    assert flm.is_model_pulled(CKPT) and not flm.is_model_pulled(OTHER_CKPT)


def test_ready_timeout_from_env(monkeypatch):
    monkeypatch.delenv(path_utils.ENV_FLM_READY_TIMEOUT, raising=False)
    assert flm.flm_ready_timeout() == flm.READY_TIMEOUT
    monkeypatch.setenv(path_utils.ENV_FLM_READY_TIMEOUT, "2.5")
    assert flm.flm_ready_timeout() == 2.5
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv(path_utils.ENV_FLM_READY_TIMEOUT, bad)
        assert flm.flm_ready_timeout() == flm.READY_TIMEOUT


# -- unit: pull and remove ------------------------------------------------------------------------

def test_pull_argv_and_force(standin):
    flm.pull(OTHER_CKPT)
    flm.pull(OTHER_CKPT, force=True)
    assert calls(standin)[-2:] == [["pull", OTHER_CKPT], ["pull", OTHER_CKPT, "--force"]]
    assert flm.is_model_pulled(OTHER_CKPT)


def test_pull_failure_names_the_exit_code(standin):
    set_state(standin, pull_exit_code=7)
    with pytest.raises(DownloadError, match="^FLM pull failed with exit code: 7$"):
        flm.pull(OTHER_CKPT)


def test_pull_and_remove_are_bounded(standin, monkeypatch):
    set_state(standin, hang=["pull", "remove"])
    monkeypatch.setattr(flm, "PULL_TIMEOUT", 0.5)
    monkeypatch.setattr(flm, "REMOVE_TIMEOUT", 0.5)
    with pytest.raises(DownloadError, match="FLM pull timed out"):
        flm.pull(OTHER_CKPT)
    with pytest.raises(FileError, match=f"^Failed to delete FLM model {MODEL}: FLM remove timed out$"):
        flm.remove(CKPT, MODEL)
    assert not standin_processes(str(standin.parent / "bin")), "a timed-out flm command was left running"


def test_remove(standin):
    flm.remove(CKPT, MODEL)
    assert calls(standin)[-1] == ["remove", CKPT] and not flm.is_model_pulled(CKPT)
    set_state(standin, remove_exit_code=5)
    with pytest.raises(FileError, match=f"^Failed to delete FLM model {MODEL}: FLM remove failed with exit code 5$"):
        flm.remove(CKPT, MODEL)
    with pytest.raises(FileError, match="empty checkpoint"):
        flm.remove("", MODEL)


def test_missing_flm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LEMONADE_FLM", raising=False)
    for call in (lambda: flm.pull(CKPT), lambda: flm.remove(CKPT, MODEL),
                 lambda: flm.FastFlowLMServer(MODEL, CKPT, "flm", 4096).ensure_ready()):
        with pytest.raises(InstallationError, match="FLM not installed"):
            call()


# -- end to end: the real server with the stand-in on PATH ----------------------------------------

def flm_env(tmp_path: Path, fault: str = "", ready_timeout: str = "") -> dict[str, str]:
    """A private server environment whose PATH starts with the stand-in `flm`."""
    bin_dir, state = tmp_path / "bin", tmp_path / "flm-state"
    flm_standin.install(bin_dir, state, known=[CKPT, OTHER_CKPT])
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and k not in ("HF_HOME", "LEMONADE_FLM")}
    runtime = tmp_path / "run"  # own single-instance lock: several servers run side by side
    runtime.mkdir(exist_ok=True)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", HF_HUB_CACHE=str(tmp_path / "hub"),
               LEMONADE_RUNTIME_DIR=str(runtime),
               LEMONADE_CACHE_DIR=str(tmp_path / "lemonade"), LEMONADE_CI_MODE="1", PYTHONUNBUFFERED="1",
               RYZENAI_SKIP_PROCESSOR_CHECK="1", HF_HUB_OFFLINE="0", FLM_STANDIN_DIR=str(state),
               FLM_STANDIN_FAULT=fault)
    if ready_timeout:
        env[path_utils.ENV_FLM_READY_TIMEOUT] = ready_timeout
    return env


@pytest.fixture(scope="module")
def flm_server(tmp_path_factory):
    """One `lemonade serve` for the happy-path tests, which run in file order."""
    tmp_path = tmp_path_factory.mktemp("flm")
    server = start_server(flm_env(tmp_path), tmp_path, "--ctx-size", "2048")
    server.state = tmp_path / "flm-state"
    server.flm_marker = str(tmp_path / "bin")
    yield server
    server.stop()
    wait_for(lambda: not standin_processes(server.flm_marker), 15, what="flm serve to exit after teardown")


def served_requests(server) -> list[dict]:
    return flm_standin.read_jsonl(server.state, "requests.jsonl")


def serve_processes(server) -> list[psutil.Process]:
    return [p for p in standin_processes(server.flm_marker) if "serve" in p.cmdline()]


def test_registry_flm_models_are_listed(flm_server):
    everything = requests.get(flm_server.api + "/models", params={"show_all": "true"}, timeout=30).json()
    by_id = {m["id"]: m for m in everything["data"]}
    assert by_id[MODEL]["recipe"] == "flm" and by_id[MODEL]["checkpoint"] == CKPT
    assert by_id[MODEL]["downloaded"] is False
    downloaded = requests.get(flm_server.api + "/models", timeout=30).json()
    assert MODEL not in {m["id"] for m in downloaded["data"]}


def test_pull_through_the_api(flm_server):
    answer = requests.post(flm_server.api + "/pull", json={"model_name": MODEL}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert ["pull", CKPT] == calls(flm_server.state)[-1][:2]
    downloaded = requests.get(flm_server.api + "/models", timeout=30).json()
    assert MODEL in {m["id"] for m in downloaded["data"]}


def test_explicit_pull_passes_force(flm_server):
    requests.post(flm_server.api + "/pull", json={"model_name": MODEL}, timeout=60).raise_for_status()
    assert calls(flm_server.state)[-1] == ["pull", CKPT, "--force"]


def test_chat_non_streaming_rewrites_model_and_sets_stats(flm_server):
    import openai

    client = openai.OpenAI(base_url=flm_server.api, api_key="unused")
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Hello from the NPU!"
    assert served_requests(flm_server)[-1] == {"path": "/v1/chat/completions", "model": CKPT, "stream": False}
    serve = [argv for argv in calls(flm_server.state) if argv[0] == "serve"]
    assert len(serve) == 1 and serve[0][:4] == ["serve", CKPT, "--ctx-len", "2048"]  # the server's --ctx-size
    stats = requests.get(flm_server.api + "/stats", timeout=10).json()
    assert stats["input_tokens"] == flm_standin.PROMPT_TOKENS and stats["output_tokens"] == 5
    assert stats["time_to_first_token"] == pytest.approx(0.125)
    assert stats["tokens_per_second"] == pytest.approx(42.5)
    assert stats["prompt_tokens"] == flm_standin.PROMPT_TOKENS


def test_chat_streaming_rewrites_model_and_sets_stats(flm_server):
    import openai

    client = openai.OpenAI(base_url=flm_server.api, api_key="unused")
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Hello from the NPU!"
    assert served_requests(flm_server)[-1] == {"path": "/v1/chat/completions", "model": CKPT, "stream": True}
    stats = requests.get(flm_server.api + "/stats", timeout=10).json()
    assert stats["input_tokens"] == flm_standin.STREAM_PROMPT_TOKENS  # taken from the last SSE frame
    assert stats["tokens_per_second"] == pytest.approx(42.5)


def test_completions_rewrite_model_both_ways(flm_server):
    import openai

    client = openai.OpenAI(base_url=flm_server.api, api_key="unused")
    assert client.completions.create(model=MODEL, prompt="hi").choices[0].text == "Hello from the NPU!"
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt="hi", stream=True))
    assert streamed == "Hello from the NPU!"
    assert [r["model"] for r in served_requests(flm_server)[-2:]] == [CKPT, CKPT]


def test_embeddings_and_rerank_keep_the_model_name(flm_server):
    emb = requests.post(flm_server.api + "/embeddings", json={"model": MODEL, "input": ["a", "b"]}, timeout=30)
    assert emb.status_code == 200 and len(emb.json()["data"]) == 2
    rerank = requests.post(flm_server.api + "/reranking",
                           json={"model": MODEL, "query": "q", "documents": ["x", "y"]}, timeout=30)
    assert rerank.status_code == 200 and len(rerank.json()["results"]) == 2
    assert served_requests(flm_server)[-2:] == [  # C++ forwards these bodies untouched (http-api §4.6)
        {"path": "/v1/embeddings", "model": MODEL, "stream": False},
        {"path": "/v1/rerank", "model": MODEL, "stream": False}]


def test_unload_leaves_no_flm_process(flm_server):
    assert serve_processes(flm_server), "flm serve should be running before the unload"
    requests.post(flm_server.api + "/unload", timeout=30).raise_for_status()
    wait_for(lambda: not serve_processes(flm_server), 15, what="flm serve to exit after /unload")


def test_delete_runs_flm_remove(flm_server):
    answer = requests.post(flm_server.api + "/delete", json={"model": MODEL}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert calls(flm_server.state)[-1] == ["remove", CKPT]
    assert CKPT not in flm_standin.read_state(flm_server.state)["installed"]


def test_pull_failure_through_the_api(flm_server):
    set_state(flm_server.state, pull_exit_code=9)
    answer = requests.post(flm_server.api + "/pull", json={"model_name": OTHER_MODEL}, timeout=60)
    assert answer.status_code == 500
    assert "FLM pull failed with exit code: 9" in answer.text


def test_sigterm_leaves_no_flm_process(tmp_path):
    server = start_server(flm_env(tmp_path), tmp_path)
    marker = str(tmp_path / "bin")
    try:
        requests.post(server.api + "/load", json={"model_name": MODEL}, timeout=60).raise_for_status()
        assert standin_processes(marker)
    finally:
        server.stop(signal.SIGTERM)
    wait_for(lambda: not standin_processes(marker), 15, what="flm serve to exit after SIGTERM")


def test_flm_that_exits_at_start_is_a_clear_error(tmp_path):
    server = start_server(flm_env(tmp_path, fault="exit"), tmp_path)
    try:
        answer = requests.post(server.api + "/load", json={"model_name": MODEL}, timeout=60)
        assert answer.status_code == 500
        assert "FastFlowLM failed to start: process exited with code 3" in answer.text
        # The child's own words go to the server log, not to the client (they may quote file bytes and
        # absolute paths: issue 15 item 3), as C++ logs them.
        wait_for(lambda: "no NPU device found" in server.log_text(), 10, what="the child's output in the log")
        assert "no NPU device found" not in answer.text
    finally:
        server.stop()
    assert not standin_processes(str(tmp_path / "bin"))


def test_flm_that_hangs_is_killed_at_the_deadline(tmp_path):
    server = start_server(flm_env(tmp_path, fault="hang", ready_timeout="2"), tmp_path)
    marker = str(tmp_path / "bin")
    try:
        started = time.monotonic()
        answer = requests.post(server.api + "/load", json={"model_name": MODEL}, timeout=120)
        elapsed = time.monotonic() - started
        assert answer.status_code == 500
        assert "FastFlowLM failed to start within 2 s" in answer.text
        assert 2 <= elapsed < 60  # the 2 s deadline plus pull and stop on a loaded machine; not 300 s
        wait_for(lambda: not standin_processes(marker), 15, what="the hung flm serve to be killed")
    finally:
        server.stop()
