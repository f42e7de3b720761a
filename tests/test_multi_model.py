"""Several models resident (lemonade HEAD §3): real llama-server children, the embedded GGUF under
several model names. Per-type pools, LRU by last use, busy models kept, pinning, idle unload that
health polls do not reset, parallel loads, and a killed child reloaded alone."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest
import requests

from api_support import GEMMA_CHECKPOINT, running_server
from conftest import DEFAULT_MODEL, wait_for
from hfhub import gemma_gguf, hub, hub_env  # noqa: F401  (hub is a fixture)

CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
# The same GGUF under more names: three chat models and one embedding model (label `embeddings`).
USER_MODELS = {
    "Gemma-B": {"checkpoint": GEMMA_CHECKPOINT, "recipe": "llamacpp", "labels": ["custom"]},
    "Gemma-C": {"checkpoint": GEMMA_CHECKPOINT, "recipe": "llamacpp", "labels": ["custom"]},
    "Gemma-Embed": {"checkpoint": GEMMA_CHECKPOINT, "recipe": "llamacpp", "labels": ["embeddings"]},
}
A, B, C, EMBED = DEFAULT_MODEL, "user.Gemma-B", "user.Gemma-C", "user.Gemma-Embed"
LOAD_TIMEOUT = 300


def health(server) -> dict:
    return requests.get(server.api + "/health", timeout=10).json()


def loaded_names(server) -> set[str]:
    return {entry["model_name"] for entry in health(server)["all_models_loaded"]}


def pids(server) -> dict[str, int]:
    return {entry["model_name"]: entry["pid"] for entry in health(server)["all_models_loaded"]}


def load(server, name: str, **extra) -> requests.Response:
    return requests.post(server.api + "/load", json={"model_name": name, **extra}, timeout=LOAD_TIMEOUT)


def chat(server, name: str, **extra) -> requests.Response:
    return requests.post(server.api + "/chat/completions", json={"model": name, **CHAT, **extra},
                         timeout=LOAD_TIMEOUT)


def alive_llama_pids(server) -> set[int]:
    return {p.pid for p in server.llama_processes()}


@pytest.fixture
def serve(tmp_path, seeded_hub_cache, llama_server_bin):
    """Start a server with the extra model names; stopped (and checked for leftovers) at teardown."""
    started = []

    def start(*args: str, env_extra: dict | None = None):
        context = running_server(tmp_path / f"s{len(started)}", seeded_hub_cache, *args,
                                 user_models=USER_MODELS, env_extra=env_extra)
        server = context.__enter__()
        started.append(context)
        return server

    yield start
    for context in started:
        context.__exit__(None, None, None)


def test_an_llm_and_an_embedding_model_are_resident_together(serve):
    server = serve()  # default limits: one model per type, as HEAD
    assert chat(server, A).status_code == 200
    r = requests.post(server.api + "/embeddings", json={"model": EMBED, "input": "lemon"}, timeout=LOAD_TIMEOUT)
    # gemma has no pooling head: llama-server's own 400 comes back, and its child keeps running
    assert r.status_code == 400 and "pooling" in r.json()["error"]["message"].lower()
    body = health(server)
    entries = {e["model_name"]: e for e in body["all_models_loaded"]}
    assert set(entries) == {A, EMBED}
    assert entries[A]["type"] == "llm" and entries[EMBED]["type"] == "embedding"
    assert entries[A]["slot_pool"] == "standard/llm" and entries[A]["recipe"] == "llamacpp"
    assert body["max_models"] == {"llm": 1, "embedding": 1, "reranking": 1}
    assert body["model_loaded"] == EMBED  # GA's key: the most recently used model
    assert len(alive_llama_pids(server)) == 2 == len({e["pid"] for e in entries.values()})
    assert alive_llama_pids(server) == {e["pid"] for e in entries.values()}
    # a second chat model takes the chat slot; the embedding model stays
    assert chat(server, B).status_code == 200
    assert loaded_names(server) == {B, EMBED}
    wait_for(lambda: len(alive_llama_pids(server)) == 2, 30, what="the evicted child to exit")


def test_lru_eviction_follows_last_use_not_load_order(serve):
    server = serve("--max-loaded-models", "2")
    assert load(server, A).status_code == 200
    assert load(server, B).status_code == 200
    first_pids = pids(server)
    assert chat(server, A).status_code == 200  # A is now the most recently used, although loaded first
    assert load(server, C).status_code == 200
    assert loaded_names(server) == {A, C}
    assert pids(server)[A] == first_pids[A]  # A kept its child
    wait_for(lambda: first_pids[B] not in alive_llama_pids(server), 30, what="B's llama-server to exit")
    log = server.log_text()
    assert f"Unloading {B} (least recently used llm model) to load {C}" in log


def _stream(server, name: str, tokens: int, events: dict) -> None:
    """A chat stream of exactly `tokens` tokens (ignore_eos), read to the end."""
    body = {"model": name, "messages": [{"role": "user", "content": "Count."}], "max_tokens": tokens,
            "ignore_eos": True, "stream": True}
    with requests.post(server.api + "/chat/completions", json=body, stream=True, timeout=LOAD_TIMEOUT) as r:
        events["status"] = r.status_code
        frames = []
        for line in r.iter_lines():
            if line:
                frames.append(line)
                events.setdefault("first_frame", time.monotonic())
        events["frames"] = frames
        events["end"] = time.monotonic()


def test_a_busy_model_is_not_evicted_while_it_streams(serve):
    server = serve()
    assert load(server, A).status_code == 200
    events: dict = {}
    reader = threading.Thread(target=_stream, args=(server, A, 300, events))
    reader.start()
    wait_for(lambda: "first_frame" in events, 120, what="the stream to begin")
    assert health(server)["all_models_loaded"][0]["is_streaming"] is True
    r = load(server, B)  # must wait for the stream, not cut it
    loaded_at = time.monotonic()
    reader.join(timeout=LOAD_TIMEOUT)
    assert r.status_code == 200
    assert events["status"] == 200 and events["frames"][-1] == b"data: [DONE]"
    assert not any(b'"error"' in f for f in events["frames"])
    assert events["end"] <= loaded_at  # the stream finished before B's load did
    assert loaded_names(server) == {B}


def test_a_load_that_waits_too_long_for_a_busy_model_answers_a_clear_error(serve):
    # The bound is $LEMONADE_BACKEND_TIMEOUT (also the longest silence allowed inside a stream: not so short
    # that a busy machine cuts the stream being waited for)
    server = serve(env_extra={"LEMONADE_BACKEND_TIMEOUT": "8"})
    assert load(server, A).status_code == 200
    events: dict = {}
    reader = threading.Thread(target=_stream, args=(server, A, 3000, events))
    reader.start()
    wait_for(lambda: "first_frame" in events, 120, what="the stream to begin")
    r = load(server, B)
    assert r.status_code == 503
    message = r.json()["error"]
    assert f"Cannot load {B}" in message and A in message and "busy" in message
    assert "end" not in events  # the stream is still running, untouched
    assert loaded_names(server) == {A}
    requests.post(server.api + "/unload", json={"model_name": A}, timeout=60)  # cut it to end the test
    reader.join(timeout=60)


def test_pinned_models_stay_and_a_full_pinned_pool_refuses(serve):
    server = serve("--max-loaded-models", "2")
    assert load(server, A, pinned=True).status_code == 200
    assert load(server, B).status_code == 200
    assert chat(server, B).status_code == 200  # B used last; A is older but pinned
    assert load(server, C).status_code == 200
    assert loaded_names(server) == {A, C}
    r = requests.post(server.url + "/internal/pin", json={"model_name": C, "pinned": True}, timeout=10)
    assert r.status_code == 200 and r.json() == {"model_name": C, "pinned": True, "status": "success"}
    assert health(server)["pinned_models"]["llm"] == 2
    r = load(server, B)
    assert r.status_code == 409
    assert r.json() == {"error": "All loaded models of type standard/llm are pinned. Unload a model first."}
    assert loaded_names(server) == {A, C}
    r = requests.post(server.url + "/internal/pin", json={"model_name": A, "pinned": False}, timeout=10)
    assert r.status_code == 200
    assert load(server, B).status_code == 200
    assert loaded_names(server) == {B, C}


@pytest.mark.parametrize("body, message", [
    ({"pinned": True}, "Parameter 'model' or 'model_name' is required"),
    ({"model_name": DEFAULT_MODEL}, "Parameter 'pinned' is required and must be a boolean"),
    ({"model_name": DEFAULT_MODEL, "pinned": "yes"}, "Parameter 'pinned' is required and must be a boolean"),
    ({"model_name": "Not-Loaded", "pinned": True}, "Model not loaded: Not-Loaded"),
])
def test_pin_validation(serve, body, message):
    server = serve()
    r = requests.post(server.url + "/internal/pin", json=body, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["message"] == message


def test_idle_models_unload_even_while_health_is_polled(serve):
    server = serve("--idle-timeout", "3", "--max-loaded-models", "2")
    assert load(server, B, pinned=True).status_code == 200
    assert load(server, A).status_code == 200
    started = time.monotonic()  # A's last use: the end of its load
    (pid_a,) = [e["pid"] for e in health(server)["all_models_loaded"] if e["model_name"] == A]
    polls = 0

    def a_gone() -> bool:
        nonlocal polls
        polls += 1
        return A not in loaded_names(server)

    wait_for(a_gone, 60, interval=0.2, what=f"{A} to be unloaded after 3 s idle")
    assert time.monotonic() - started >= 2.9 and polls > 5  # health polls did not keep it
    assert loaded_names(server) == {B}  # pinned: never idle-unloaded
    wait_for(lambda: pid_a not in alive_llama_pids(server), 30, what="the idle child to exit")
    assert f"Unloading model {A} after 3 s without a request" in server.log_text()


def test_loads_of_two_models_run_in_parallel(serve, hub, tmp_path):
    """A model still downloading (throttled hub) does not hold up another model's load."""
    path, sha = gemma_gguf()
    hub.add_repo("org/gemma-copy-GGUF", {path.name: path}, sha256={path.name: sha})
    hub.throttle_bps = 40e6  # ~6 s for the 250 MB GGUF
    slow = "user.Gemma-Download"
    extra = hub_env(hub, tmp_path / "unused")
    server = serve("--max-loaded-models", "2",
                   env_extra={k: extra[k] for k in ("HF_ENDPOINT", "HF_HUB_DISABLE_XET")} | {"HF_HUB_OFFLINE": "0"})
    models_file = os.path.join(server.env["LEMONADE_CACHE_DIR"], "user_models.json")
    registry = json.load(open(models_file))
    registry["Gemma-Download"] = {"checkpoint": f"org/gemma-copy-GGUF:{path.name}", "recipe": "llamacpp",
                                  "labels": ["custom"]}
    json.dump(registry, open(models_file, "w"))
    progress: list[dict] = []
    done: dict = {}

    def slow_load() -> None:
        with requests.post(server.api + "/load", json={"model_name": slow, "stream": True}, stream=True,
                           timeout=LOAD_TIMEOUT) as r:
            event = None
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    progress.append({"event": event, **json.loads(line[6:])})
        done["slow"] = time.monotonic()

    worker = threading.Thread(target=slow_load)
    worker.start()
    wait_for(lambda: any(p["event"] == "progress" and p.get("file") for p in progress), 60,
             what="the download to report progress")
    assert load(server, A).status_code == 200  # served while the other model downloads
    fast_done = time.monotonic()
    worker.join(timeout=LOAD_TIMEOUT)
    assert fast_done < done["slow"]
    assert loaded_names(server) == {A, slow}
    stages = [p["stage"] for p in progress if p["event"] == "progress"]
    assert stages[0] == "download"  # one stream of events: the download first, then the health wait
    assert stages == sorted(stages, key=["download", "starting"].index)
    assert all(p.get("file") == path.name for p in progress if p.get("stage") == "download")
    assert progress[-1]["event"] == "complete" and progress[-1]["model_name"] == slow


def test_kill_9_of_one_child_reloads_only_that_one(serve):
    server = serve("--max-loaded-models", "2")
    assert chat(server, A).status_code == 200
    assert chat(server, B).status_code == 200
    before = pids(server)
    os.kill(before[A], signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(before[A]) or psutil.Process(before[A]).status() == psutil.STATUS_ZOMBIE,
             10, what="the killed child to die")
    wait_for(lambda: A not in loaded_names(server), 10, what="/health to leave the dead child out")
    assert chat(server, A).status_code == 200  # the next request loads it again
    after = pids(server)
    assert after[A] != before[A] and after[B] == before[B]
    assert server.log_text().count(f"Loading model {B}") == 1
