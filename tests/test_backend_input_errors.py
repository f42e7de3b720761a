"""Bad input gets a 400, never llama-server's 500 (issue 15 item 12), against the real llama-server.

Tried against llama-server: it answers 500 `server_error` when parsing the messages or tools throws
(a number as `role` or `name`, a text part without `text`, a tool call without `type`) and when an
image goes to a model without a projector. Lemonade checks the fields it can before forwarding (400
naming the field) and turns the rest of those 500s into 400s that keep llama-server's message.
"""
from __future__ import annotations

import pytest
import requests

from api_support import DEFAULT_MODEL, running_server

USER = {"role": "user", "content": "hi"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("input-errors"), seeded_hub_cache) as s:
        assert requests.post(s.api + "/load", json={"model_name": DEFAULT_MODEL}, timeout=300).status_code == 200
        yield s


def chat(server, stream: bool = False, **fields) -> requests.Response:
    body = {"model": DEFAULT_MODEL, "messages": [USER], "max_tokens": 2, "stream": stream, **fields}
    return requests.post(server.api + "/chat/completions", json=body, timeout=120)


@pytest.mark.parametrize("fields, message", [
    ({"messages": [{"role": 5, "content": "hi"}]}, "'messages[0].role' must be a string, got number"),
    ({"messages": [{"content": "hi"}]}, "'messages[0].role' must be a string, got null"),
    ({"messages": [{"role": "user", "content": "hi", "name": 5}]}, "'messages[0].name' must be a string, got number"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "'messages[0].content[0].text' must be a string, got null"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "'messages[0].content[0].text' must be a string, got number"),
    ({"messages": [USER, {"role": "assistant", "content": "x", "tool_calls": 5}]},
     "'messages[1].tool_calls' must be an array, got number"),
    ({"messages": [USER, {"role": "assistant", "content": "x", "tool_calls": [5]}]},
     "'messages[1].tool_calls[0]' must be an object, got number"),
    ({"tools": 5}, "'tools' must be an array, got number"),
    ({"tools": [5]}, "'tools[0]' must be an object, got number"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_fields_llama_server_fails_on_are_checked_first(server, fields, message, stream):
    reply = chat(server, stream, **fields)
    assert reply.status_code == 400, reply.text
    assert reply.json() == {"error": {"message": message, "type": "invalid_request"}}


@pytest.mark.parametrize("fields, message", [
    ({"messages": [USER, {"role": "assistant", "content": "x", "tool_calls": [{"function": 5}]}]},
     'Failed to parse messages: Missing tool call type: {"function":5}'),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]},
     "image input is not supported"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_llama_server_input_errors_are_400_with_its_message(server, fields, message, stream):
    reply = chat(server, stream, **fields)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["message"].startswith(message) and error["type"] == "invalid_request_error"
    assert error["status_code"] == 500 and error["details"]["status_code"] == 500  # what llama-server said
    assert error["details"]["backend"] == "llama-server"


def test_a_good_request_still_works(server):
    reply = chat(server, messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "me"}])
    assert reply.status_code == 200 and reply.json()["choices"]
