"""A remote OpenAI-compatible upstream as a model, on one machine: the real llama-server serving the
gemma GGUF over https (a certificate made for the test, trusted through SSL_CERT_FILE) and requiring
an API key, registered in a real `lemonade serve` through `/pull` and through the CLI.

What it pins down: the key is read from the variable the entry names and sent, never stored or
logged; chat and streams go through with `model` rewritten; the upstream's own errors come back with
its status and message (a wrong key is llama-server's 401); a certificate that does not verify and a
missing key variable are clear errors; bad registrations are refused and change nothing; the remote
model sits in the unmetered pool and neither evicts nor is evicted by a local model.
(The topologies across hosts are in tests/test_multihost_netns.py.)
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import openai
import pytest
import requests

from conftest import DEFAULT_MODEL, free_port, make_env, start_server, wait_for

KEY_VAR, WRONG_KEY_VAR, UNSET_VAR = "LEMONADE_TEST_UPSTREAM_KEY", "LEMONADE_TEST_WRONG_KEY", "LEMONADE_TEST_UNSET_KEY"
KEY = "sk-test-0123456789"
UPSTREAM_ID = "gemma-upstream"  # llama-server's --alias: the id the upstream knows the model by
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl; `.ci/run` installs it)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed to make the test certificate (apt-get install openssl)"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, seeded_hub_cache, llama_server_bin, certificate) -> str:
    """The real llama-server over https with an API key; its OpenAI base URL."""
    gguf = next(seeded_hub_cache.rglob("*.gguf"))
    cert, key = certificate
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "llama-server.log"
    proc = subprocess.Popen([str(llama_server_bin), "-m", str(gguf), "--port", str(port), "--ctx-size", "2048",
                             "--alias", UPSTREAM_ID, "--api-key", KEY, "--ssl-key-file", str(key),
                             "--ssl-cert-file", str(cert)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def up() -> bool:
        assert proc.poll() is None, f"llama-server exited {proc.returncode}:\n{log.read_text()}"
        try:
            return requests.get(f"https://127.0.0.1:{port}/health", verify=str(cert), timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(up, 120, interval=0.2, what="the https llama-server to load")
        yield f"https://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, upstream, certificate):
    tmp_path = tmp_path_factory.mktemp("lemonade")
    env = make_env(tmp_path, seeded_hub_cache)
    env.update({KEY_VAR: KEY, WRONG_KEY_VAR: "sk-wrong", "SSL_CERT_FILE": str(certificate[0])})
    env.pop(UNSET_VAR, None)
    server = start_server(env, tmp_path)
    server.env = env
    yield server
    server.stop()
    wait_for(lambda: not server.llama_processes(), 15, what="llama-server to exit after teardown")


def pull(server, name: str, **fields) -> requests.Response:
    return requests.post(server.api + "/pull", json={"model": name, **fields}, timeout=60)


def register(server, name: str, base_url: str, key_var: str | None = KEY_VAR) -> None:
    fields = {"recipe": "remote", "checkpoint": UPSTREAM_ID, "base_url": base_url}
    if key_var:
        fields["api_key_env"] = key_var
    reply = pull(server, name, **fields)
    assert reply.status_code == 200, reply.text


def chat(server, model: str, **extra) -> requests.Response:
    return requests.post(server.api + "/chat/completions", json={"model": model, **CHAT, **extra}, timeout=120)


def loaded(server) -> dict:
    entries = requests.get(server.api + "/health", timeout=10).json()["all_models_loaded"]
    return {m["model_name"]: m for m in entries}


def test_remote_model_over_https_with_a_key(server, upstream):
    register(server, "user.remote", upstream)
    models = {m["id"]: m for m in requests.get(server.api + "/models", timeout=10).json()["data"]}
    assert models["user.remote"]["recipe"] == "remote" and models["user.remote"]["base_url"] == upstream
    assert models["user.remote"]["checkpoint"] == UPSTREAM_ID  # "downloaded": nothing to fetch

    client = openai.OpenAI(base_url=server.api, api_key="unused")
    answer = client.chat.completions.create(model="user.remote", **CHAT)
    assert answer.choices[0].message.role == "assistant"
    assert answer.model == UPSTREAM_ID  # the upstream was asked for its own id, and answered as itself
    pieces = list(client.chat.completions.create(model="user.remote", stream=True, **CHAT))
    assert pieces and pieces[-1].choices[0].finish_reason == "length"

    entry = loaded(server)["user.remote"]
    assert entry["slot_pool"] == "unmetered" and entry["backend_url"] == upstream and entry["pid"] is None
    assert entry["upstream"]["base_url"] == upstream and entry["upstream"]["state"] == "ok"
    assert entry["upstream"]["model"] == UPSTREAM_ID
    stats = requests.get(server.api + "/stats", timeout=10).json()
    assert stats["output_tokens"] == 4  # the upstream's timings reach /stats as a local model's do

    user_file = Path(server.env["LEMONADE_CACHE_DIR"]) / "user_models.json"
    assert json.loads(user_file.read_text())["remote"]["api_key_env"] == KEY_VAR
    for text in (user_file.read_text(), server.log_text()):
        assert KEY not in text  # the key is neither stored nor logged (debug log included)


def test_the_upstreams_own_errors_come_back_honestly(server, upstream):
    register(server, "user.wrongkey", upstream, WRONG_KEY_VAR)
    reply = chat(server, "user.wrongkey")
    # llama-server refuses the key: its status and message, not a generic 500
    assert reply.status_code == 401, reply.text
    assert "Invalid API Key" in reply.json()["error"]["message"]
    assert "sk-wrong" not in reply.text

    register(server, "user.nokey", upstream, UNSET_VAR)
    reply = chat(server, "user.nokey")
    assert reply.status_code == 500 and reply.json()["error"]["type"] == "configuration_error"
    assert UNSET_VAR in reply.json()["error"]["message"]

    # the certificate is for 127.0.0.1; "localhost" does not match it: a clear 502, no request sent
    register(server, "user.badcert", upstream.replace("127.0.0.1", "localhost"))
    reply = chat(server, "user.badcert")
    assert reply.status_code == 502, reply.text
    message = reply.json()["error"]["message"]
    assert "localhost" in message and "certificate" in message.lower()

    # the upstream is fine with a body it can serve, and says so when it cannot
    reply = chat(server, "user.remote", max_tokens="many")
    assert 400 <= reply.status_code < 500 and reply.json()["error"]["status_code"] == reply.status_code


@pytest.mark.parametrize("fields,message", [
    ({"base_url": "ftp://127.0.0.1/v1"}, "the scheme must be http or https"),
    ({"base_url": f"https://user:{KEY}@127.0.0.1/v1"}, "credentials in the URL are refused"),
    ({}, "needs base_url"),
    ({"base_url": "https://127.0.0.1/v1", "api_key_env": KEY}, "Invalid api_key_env"),
    ({"base_url": 5}, "'base_url' must be a string"),
])
def test_bad_registrations_are_refused_and_change_nothing(server, fields, message):
    before = requests.get(server.api + "/models?show_all=true", timeout=10).json()
    reply = pull(server, "user.bad", recipe="remote", checkpoint=UPSTREAM_ID, **fields)
    assert reply.status_code == 400 and message in reply.json()["error"], reply.text
    assert KEY not in reply.text
    assert requests.get(server.api + "/models?show_all=true", timeout=10).json() == before


def test_cli_pull_registers_a_remote_model(server, upstream):
    done = subprocess.run(["lemonade", "pull", "user.cli", "--recipe", "remote", "--base-url", upstream,
                           "--checkpoint", UPSTREAM_ID, "--api-key-env", KEY_VAR],
                          env=server.env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Model pulled successfully: user.cli" in done.stdout
    assert chat(server, "user.cli").status_code == 200
    listed = subprocess.run(["lemonade", "list"], env=server.env, capture_output=True, text=True, timeout=60)
    assert any(line.startswith("user.cli") and line.rstrip().endswith("remote") for line in listed.stdout.splitlines())
    bad = subprocess.run(["lemonade", "pull", "user.cli2", "--recipe", "remote", "--checkpoint", "x",
                          "--base-url", "http://a:b@h/v1"], env=server.env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "credentials in the URL are refused" in bad.stderr


def test_remote_and_local_models_do_not_evict_each_other(server, upstream):
    # the server keeps one model per type (the default): a local llm and a remote one still coexist
    assert chat(server, DEFAULT_MODEL).status_code == 200
    assert chat(server, "user.remote").status_code == 200
    assert chat(server, DEFAULT_MODEL).status_code == 200
    models = loaded(server)
    assert {DEFAULT_MODEL, "user.remote"} <= set(models)
    assert models[DEFAULT_MODEL]["slot_pool"] == "standard/llm" and models["user.remote"]["slot_pool"] == "unmetered"
    # unloading the remote model forgets it; deleting unregisters it and touches no file
    assert requests.post(server.api + "/unload", json={"model_name": "user.cli"}, timeout=10).status_code == 200
    reply = requests.post(server.api + "/delete", json={"model": "user.cli"}, timeout=10)
    assert reply.status_code == 200, reply.text
    assert "user.cli" not in {m["id"] for m in requests.get(server.api + "/models", timeout=10).json()["data"]}
    assert models[DEFAULT_MODEL]["pid"] in [p.pid for p in server.llama_processes()]  # local model untouched
