"""What OpenAI tools rely on, through the official `openai` client against the real llama-server
(issue 16 item 2): the `model` of every answer and stream chunk is the name the client sent (HEAD
§7.2; llama-server writes its GGUF path there), `models.retrieve` gets a whole model object, and a
backend's "not supported" 501 is a 400 the client does not retry.

The server's Hugging Face cache lives under a directory with non-ASCII characters, so the GGUF path
that llama-server writes into each frame is not plain ASCII: the stream rewrite must match the exact
bytes llama-server emits.
"""
from __future__ import annotations

import httpx
import openai
import pytest

from api_support import DEFAULT_MODEL, GEMMA_CHECKPOINT, HELLO, running_server
from lemonade.error_types import backend_status_for_client

QUOTED = 'user.Gemma "Zitrone" ü'  # a user model whose name needs escaping in JSON
USER_MODELS = {'Gemma "Zitrone" ü': {"checkpoint": GEMMA_CHECKPOINT, "recipe": "llamacpp", "labels": ["custom"]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("openai-zitrone-ü"), seeded_hub_cache,
                        user_models=USER_MODELS) as s:
        assert not s.env["HF_HUB_CACHE"].isascii()
        yield s


class CountingClient:
    """An openai client that counts the HTTP requests it sends (retries included)."""

    def __init__(self, server):
        self.sent: list[str] = []
        hooks = {"request": [lambda request: self.sent.append(f"{request.method} {request.url.path}")]}
        self.client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=2,
                                    http_client=httpx.Client(event_hooks=hooks, timeout=300))


@pytest.fixture()
def client(server) -> CountingClient:
    return CountingClient(server)


@pytest.mark.parametrize("model", [DEFAULT_MODEL, QUOTED])
def test_chat_answer_names_the_requested_model(client, model):
    reply = client.client.chat.completions.create(model=model, messages=HELLO, max_tokens=4)
    assert reply.model == model
    assert reply.choices[0].message.role == "assistant"


@pytest.mark.parametrize("model", [DEFAULT_MODEL, QUOTED])
def test_every_stream_chunk_names_the_requested_model(client, model):
    chunks = list(client.client.chat.completions.create(model=model, messages=HELLO, max_tokens=6, stream=True))
    assert len(chunks) >= 3
    assert [c.model for c in chunks] == [model] * len(chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # text still arrives


def test_completions_name_the_requested_model(client):
    reply = client.client.completions.create(model=DEFAULT_MODEL, prompt="A lemon is", max_tokens=4)
    assert reply.model == DEFAULT_MODEL
    chunks = list(client.client.completions.create(model=DEFAULT_MODEL, prompt="A lemon is", max_tokens=4,
                                                   stream=True))
    assert chunks and {c.model for c in chunks} == {DEFAULT_MODEL}


def test_models_retrieve_is_a_model_object(client):
    model = client.client.models.retrieve(DEFAULT_MODEL)
    assert (model.id, model.object, model.created, model.owned_by) == (DEFAULT_MODEL, "model", 1234567890,
                                                                       "lemonade")
    listed = {m.id: m for m in client.client.models.list()}
    assert listed[DEFAULT_MODEL].owned_by == model.owned_by


def test_unknown_model_retrieve_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.client.models.retrieve("no-such-model")


def test_unsupported_endpoint_is_a_bad_request_without_retries(client):
    """llama-server answers 501 to embeddings when it was not started with `--embeddings`; a 5xx makes
    the openai client retry (twice, with backoff), and no retry can help."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.client.embeddings.create(model=DEFAULT_MODEL, input="hello")
    error = caught.value
    assert error.status_code == 400
    assert "--embeddings" in error.message  # llama-server's reason, not a generic one
    assert error.body["status_code"] == 501 and error.body["type"] == "not_supported_error"
    assert client.sent == ["POST /api/v1/embeddings"]


@pytest.mark.parametrize("status,body,expected", [
    (501, {"error": {"code": 501, "message": "no", "type": "not_supported_error"}}, 400),
    (501, "plain text", 400),
    (500, {"error": {"message": "x", "type": "not_supported_error"}}, 400),
    (503, {"error": {"message": "x", "type": "unsupported_operation"}}, 400),
    (500, {"error": {"message": "x", "type": "server_error"}}, 500),
    (503, {"error": {"message": "Loading model", "type": "unavailable_error"}}, 503),
    (400, {"error": {"message": "bad", "type": "invalid_request_error"}}, 400),
    (404, {"error": {"message": "x", "type": "not_supported_error"}}, 404),
])
def test_backend_status_for_client(status, body, expected):
    assert backend_status_for_client(status, body) == expected
