"""`/metrics` and the `/v1` prefix against a real server with an API key (head-llm-surface.md §7.1, §7.6).

The official `openai` client talks to `/v1` (and `/v0`) with the key, as clients written for HEAD do;
`/metrics` is scraped with `prometheus_client`'s parser before and after, and the counters move by what
the answers reported. llama-server's own metrics come through under `lemonade_llamacpp_`, and no
llama-server sees the key in its environment.
"""
from __future__ import annotations

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from api_support import running_server
from conftest import DEFAULT_MODEL

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(900)

KEY = "metrics-key-2a77c0"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL_LABELS = {"model_name", "checkpoint", "type", "device", "recipe"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("metrics"), seeded_hub_cache,
                        env_extra={"LEMONADE_API_KEY": KEY}) as server:
        yield server


def scrape(server) -> dict[str, list]:
    """name → samples, through prometheus_client's parser (it fails on malformed text)."""
    reply = requests.get(server.url + "/metrics", headers=AUTH, timeout=30)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def value(found: dict, name: str, **labels) -> float:
    matches = [s.value for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (name, labels, found.get(name))
    return matches[0]


def test_counters_move_with_a_chat_through_v1(server):
    before = scrape(server)
    assert value(before, "lemonade_server_up") == 1
    assert before["lemonade_server_info"][0].labels["version"]
    assert value(before, "lemonade_loaded_models") == 0
    assert value(before, "lemonade_requests_total") == 0
    assert value(before, "lemonade_max_loaded_models", type="llm") == 1

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    chat = client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=8,
                                          messages=[{"role": "user", "content": "Say hello."}])
    assert chat.choices[0].message.content is not None
    streamed = client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=8, stream=True,
                                              messages=[{"role": "user", "content": "Count to three."}])
    chunks = list(streamed)  # read to the end: a stream the client leaves early is no answer
    assert any(chunk.choices and chunk.choices[0].delta.content for chunk in chunks)
    assert [m.id for m in client.models.list()] == [DEFAULT_MODEL]
    v0 = openai.OpenAI(base_url=server.url + "/v0", api_key=KEY, max_retries=0)
    assert v0.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL

    after = scrape(server)
    model = {"model_name": DEFAULT_MODEL, "recipe": "llamacpp", "type": "llm", "device": "cpu"}
    assert value(after, "lemonade_loaded_models") == 1
    assert value(after, "lemonade_model_loaded", **model) == 1
    assert value(after, "lemonade_requests_total") == 2
    assert value(after, "lemonade_model_requests_total", **model) == 2
    out_total = value(after, "lemonade_output_tokens_total")
    assert chat.usage.completion_tokens <= out_total <= 16
    assert value(after, "lemonade_input_tokens_total") >= chat.usage.prompt_tokens
    assert value(after, "lemonade_model_output_tokens_total", **model) == out_total
    assert value(after, "lemonade_model_tokens_per_second", **model) > 0
    assert value(after, "lemonade_model_time_to_first_token_seconds", **model) > 0
    assert value(after, "lemonade_model_loads_total", **model) == 1
    assert 0 < value(after, "lemonade_model_load_seconds", **model) < 600
    for sample in after["lemonade_model_info"]:
        assert set(sample.labels) == MODEL_LABELS
    # llama-server's own counters, re-exported with the model labels
    predicted = value(after, "lemonade_llamacpp_tokens_predicted_total", **model)
    assert predicted >= out_total - 1
    assert set(after["lemonade_llamacpp_tokens_predicted_total"][0].labels) >= MODEL_LABELS

    # an embedding-less model refuses embeddings: not an answer, not counted
    assert requests.post(server.url + "/v1/embeddings", headers=AUTH, timeout=60,
                         json={"model": DEFAULT_MODEL, "input": "x"}).status_code >= 400
    assert value(scrape(server), "lemonade_requests_total") == 2


def test_counters_stay_after_unload_and_the_model_shows_unloaded(server):
    assert requests.post(server.url + "/api/v1/unload", headers=AUTH, timeout=60).status_code == 200
    found = scrape(server)
    assert value(found, "lemonade_loaded_models") == 0
    assert value(found, "lemonade_model_loaded", model_name=DEFAULT_MODEL) == 0
    assert value(found, "lemonade_model_requests_total", model_name=DEFAULT_MODEL) >= 2
    assert "lemonade_llamacpp_tokens_predicted_total" not in found


def test_llama_server_never_sees_the_key(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    client.chat.completions.create(model=DEFAULT_MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}])
    (proc,) = server.llama_processes()
    assert "--metrics" in proc.cmdline()
    environ = psutil.Process(proc.pid).environ()
    assert "LEMONADE_API_KEY" not in environ and KEY not in "".join(environ.values())


def test_v1_without_the_key_is_refused_to_the_openai_client(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.models.list()
    assert err.value.status_code == 401
    assert requests.get(server.url + "/metrics", timeout=10).status_code == 401
