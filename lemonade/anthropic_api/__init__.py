"""The Anthropic Messages dialect: pure translation to and from llama-server's OpenAI API (C++ HEAD
`S/anthropic_api.cpp`, `I/anthropic_error.h`; spec head §6). No I/O here: the HTTP layer
(`lemonade/server/anthropic_routes.py`) parses, calls these functions, forwards through the router and
writes.

Entry points for the HTTP layer, in order, per route
-----------------------------------------------------
`POST /v1/messages` (query `?beta=<v>`):
  1. `body = parse_json_object(raw)`; `t = translate_request(body, beta=query.get("beta"))`
     (raises InvalidRequestError → render with `errors.from_exception`).
  2. Auto-load `t.model` with `dialects.load_options(body)` (only `ctx_size`); on failure answer
     `errors.load_failure(t.model)` (404), or `errors.residency_conflict(msg)` (409).
  3. Pass `t.openai` through the chat path's rewrite (thinking controls: `enable_thinking`).
  4. Header `X-Lemonade-Warning: warning_header(t.warnings)` when not None.
  5. `t.stream` false: forward to `/v1/chat/completions`; 200 → `message_response(reply, t.model,
     t.warnings)`; otherwise `errors.from_backend(status, body)` → (status, body).
  6. `t.stream` true: open the backend stream; non-200 → `errors.from_backend(status, body)` as a JSON
     answer. Else start `text/event-stream` (Cache-Control: no-cache, X-Accel-Buffering: no),
     `s = MessageStream(t.model, t.warnings)`; for each `frame in sse.iter_json(chunks)`: write
     `s.feed(frame)` if non-empty; if the transport breaks, write `s.error({"message": str(e),
     "type": "streaming_error"})`; at the end write `s.final()` (empty after an error).
  Any other exception: `errors.from_exception(e)` (500 `api_error`).

`POST /v1/messages/count_tokens` (ours; HEAD has none):
  1. `t = count_tokens.template_request(body, beta)`; 2. auto-load as above; 3. thinking rewrite of
  `t.openai`; 4. forward `t.openai` to `/apply-template`; 5. forward
  `count_tokens.tokenize_request(reply)` to `/tokenize`; 6. answer `count_tokens.count_response(reply)`.
  A non-200 from either call: `errors.from_backend(status, body)`.

Error bodies are always `{"type":"error","error":{"type","message"}}` (`errors.error_body`).
"""
from lemonade.anthropic_api import count_tokens, errors
from lemonade.anthropic_api.request import Translated, translate_request, warning_header
from lemonade.anthropic_api.response import PING, MessageStream, message_response, sse_event, stop_reason

__all__ = ["MessageStream", "PING", "Translated", "count_tokens", "errors", "message_response",
           "sse_event", "stop_reason", "translate_request", "warning_header"]
