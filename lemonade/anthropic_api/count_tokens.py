"""`POST /v1/messages/count_tokens` (ours: C++ HEAD has no such route, spec head §6).

A count that matches what `/v1/messages` will bill needs the prompt exactly as llama-server builds it:
the chat template applied to the translated messages, tools included. llama-server's `/tokenize`
only tokenizes a string, so the count takes two backend calls:

1. `POST /apply-template` with the translated chat body (`template_request`). llama-server runs the
   same request parser and Jinja template as `/v1/chat/completions` and answers `{"prompt": <text>}`.
2. `POST /tokenize` with that text (`tokenize_request`), with the same flags llama-server uses when
   it tokenizes a templated chat prompt: special tokens written as text (`<start_of_turn>`) parsed as
   tokens, and the model's BOS added.
3. `{"input_tokens": len(tokens)}` (`count_response`).

The count equals the `prompt_tokens` a chat completion of the same body reports (the test checks it
against the real llama-server).
"""
from __future__ import annotations

from typing import Any

from lemonade.anthropic_api.request import Translated, translate_request
from lemonade.error_types import BackendError

APPLY_TEMPLATE_ENDPOINT = "/apply-template"
TOKENIZE_ENDPOINT = "/tokenize"
# Keys of a translated body that change the templated prompt; the rest (sampling, limits, output
# format) do not, and /apply-template has no use for them.
_TEMPLATE_KEYS = ("messages", "tools", "tool_choice", "parallel_tool_calls", "enable_thinking",
                  "chat_template_kwargs", "reasoning_effort")


def template_request(body: dict[str, Any], beta: str | None = None) -> Translated:
    """Check and translate a count_tokens body (a `/v1/messages` body without `max_tokens`). The
    returned `openai` is the body for `/apply-template`; apply the chat path's thinking controls to
    it first, as for `/v1/messages`. Pure; raises InvalidRequestError as `translate_request`."""
    translated = translate_request(body, beta)
    translated.openai = {k: v for k, v in translated.openai.items() if k in _TEMPLATE_KEYS or k == "model"}
    translated.stream = False
    return translated


def tokenize_request(template_reply: Any) -> dict[str, Any]:
    """The `/tokenize` body for `/apply-template`'s answer. Raises BackendError if it has no prompt."""
    prompt = template_reply.get("prompt") if isinstance(template_reply, dict) else None
    if not isinstance(prompt, str):
        raise BackendError("llama-server /apply-template returned no prompt")
    return {"content": prompt, "add_special": True, "parse_special": True}


def count_response(tokenize_reply: Any) -> dict[str, int]:
    """`{"input_tokens": n}` from `/tokenize`'s answer. Raises BackendError if it has no token list."""
    tokens = tokenize_reply.get("tokens") if isinstance(tokenize_reply, dict) else None
    if not isinstance(tokens, list):
        raise BackendError("llama-server /tokenize returned no tokens")
    return {"input_tokens": len(tokens)}
