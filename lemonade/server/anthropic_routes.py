"""The Anthropic Messages routes (C++ HEAD `S/anthropic_api.cpp`, spec head §6): parse, translate
with `lemonade.anthropic_api`, auto-load, forward through the router, write. A mixin of
`handlers.Api`, which gives it `router`, `manager` and `config`.

A stream is `text/event-stream`: each SSE frame llama-server sends is translated into Anthropic events
at once (`dialect_common.TranslatingSink`); the closing `message_delta` and `message_stop` follow the
backend's end, an `error` event a stream the backend broke off.
"""
from __future__ import annotations

from typing import Any

from lemonade.anthropic_api import count_tokens, errors
from lemonade.anthropic_api.request import translate_request, warning_header
from lemonade.anthropic_api.response import MessageStream, message_response
from lemonade.server.dialect_common import TranslatingSink, auto_load, backend_object, header_value
from lemonade.server.httpd import SSE_CONTENT_TYPE
from lemonade.server.json_body import apply_no_think, parse_json_object
from lemonade.utils.json_utils import dumps
from lemonade.wrapped_server import BackendCall

CHAT_ENDPOINT = "/v1/chat/completions"
WARNING_HEADER = "X-Lemonade-Warning"


class AnthropicRoutes:
    """`POST /v1/messages` and `/v1/messages/count_tokens`, also under `/api/v1`."""

    def anthropic_messages(self, h) -> None:
        """Blocks for a load and the whole answer or stream."""
        body = parse_json_object(h.read_body())
        t = translate_request(body, beta=_beta(h))
        if not auto_load(h, self.router, t.model, body, lambda: errors.load_failure(t.model),
                         errors.residency_conflict):
            return
        apply_no_think(t.openai)
        warning = warning_header(t.warnings)
        headers = ((WARNING_HEADER, header_value(warning)),) if warning else ()

        def whole(status: int, reply: Any) -> None:
            status, reply = backend_object(status, reply)
            if status != 200:
                status, answer = errors.from_backend(status, reply)
            else:
                answer = message_response(reply, t.model, t.warnings)
            h.send_bytes(status, dumps(answer), "application/json", headers)

        sink = TranslatingSink(h, whole, MessageStream(t.model, t.warnings), SSE_CONTENT_TYPE, headers)
        self.router.forward(t.model, BackendCall(CHAT_ENDPOINT, t.openai, None, t.stream), sink)

    def anthropic_count_tokens(self, h) -> None:
        """The prompt's token count as the model's chat template and tokenizer make it: llama-server's
        `/apply-template`, then `/tokenize` (see `anthropic_api.count_tokens`). Blocks for a load."""
        body = parse_json_object(h.read_body())
        t = count_tokens.template_request(body, beta=_beta(h))
        if not auto_load(h, self.router, t.model, body, lambda: errors.load_failure(t.model),
                         errors.residency_conflict):
            return
        apply_no_think(t.openai)
        status, reply = self._backend_json(t.model, count_tokens.APPLY_TEMPLATE_ENDPOINT, t.openai)
        if status == 200:
            status, reply = self._backend_json(t.model, count_tokens.TOKENIZE_ENDPOINT,
                                               count_tokens.tokenize_request(reply))
        if status != 200:
            h.send_json(*errors.from_backend(status, reply))
            return
        h.send_json(200, count_tokens.count_response(reply))

    def _backend_json(self, model: str, endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
        """(status, body) of a small whole call to the model's backend (no telemetry)."""
        answer: list[tuple[int, Any]] = []
        sink = TranslatingSink(None, lambda status, reply: answer.append(backend_object(status, reply)))
        self.router.forward(model, BackendCall(endpoint, body, None, False, telemetry=False), sink)
        return answer[0]


def _beta(h) -> str | None:
    values = h.query.get("beta")
    return values[0] if values else None
