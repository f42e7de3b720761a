"""The Ollama dialect: pure translation to and from llama-server's OpenAI API (C++ HEAD
`S/ollama_api.cpp`, spec head §5). No I/O here: the HTTP layer (`lemonade/server/ollama_routes.py`)
parses, calls these functions, forwards through the router and writes. Routes live under `/api/...`
only, with no `/v1` variants.

Entry points for the HTTP layer, in order, per route
-----------------------------------------------------
Every route: `body = parse_json_object(raw)`; any exception → `errors.from_exception(e)`
(InvalidRequestError → 400 with its message; others 500). Bodies are written with `json_utils.dumps`.

`POST /api/chat` and `POST /api/generate` (`route` = "chat" / "generate"):
  1. `model = request.model_name(body)`.
  2. `request.is_unload_request(body, route)` → unload `model` ignoring errors, answer 200
     `response.unload_response(model, route)`.
  3. `t = request.chat_request(body)` / `request.generate_request(body)`.
  4. Auto-load `t.model` with `dialects.load_options(body)`; failure → `errors.load_failure(t.model,
     route)` (404), or `errors.residency_conflict(msg)` (409). (An `image`-labelled model on generate
     is image generation in HEAD: out of scope.)
  5. Chat only: pass `t.openai` through the chat path's rewrite (thinking controls: `enable_thinking`).
  6. `t.backend_stream` false: forward to `/v1/chat/completions` (chat) or `/v1/completions`
     (generate). Non-200 → `errors.from_backend(status, body)`. 200 and `t.stream` false → answer
     `response.chat_response(reply, t.model)` / `response.generate_response(reply, t.model)`; 200 and
     `t.stream` true (chat with tools) → 200 `application/x-ndjson` body
     `response.tools_stream_lines(reply, t.model)`.
  7. `t.backend_stream` true: open the backend stream; non-200 → `errors.from_backend(status, body)`
     as JSON. Else start a chunked `application/x-ndjson` answer, `s = response.ChatStream(t.model)`
     (or `GenerateStream`); for each `frame in sse.iter_json(chunks)` write `s.feed(frame)` when
     non-empty; if the transport breaks, write `s.error({"message": str(e)})`; at the end write
     `s.final()` (empty after an error).
`GET /api/tags`: `catalog.tags_body(downloaded ModelInfos)`.
`POST /api/show`: `name = catalog.show_name(body)`; unknown → `errors.not_found(name)`; else
  `catalog.show_body(info, ctx_size)`.
`DELETE /api/delete`: `name = catalog.show_name(body)`; unload if loaded; delete; 200 with an empty
  body; an error → `errors.delete_failure(str(e))`.
`POST /api/pull`: `name = catalog.show_name(body)`; not registered → `errors.not_found(name)`; offline →
  `errors.offline()`; `catalog.pull_stream(body)` false → download, answer `{"status":"success"}`;
  else NDJSON: `catalog.PULL_STARTED`, one `catalog.pull_progress_line(p.file, p.bytes_done,
  p.bytes_total)` per progress event, `catalog.PULL_SUCCESS`; a failure → `errors.error_line(msg)`.
`POST /api/embed` / `POST /api/embeddings`: `model, openai = catalog.embed_request(body, legacy)`;
  auto-load (failure → `errors.load_failure(model, "embed")`); forward to `/v1/embeddings`; non-200 →
  `errors.from_backend`; else `catalog.embed_response` / `catalog.embeddings_response(reply, model)`.
`GET /api/ps`: `catalog.ps_body(loaded ModelInfos)`.   `GET /api/version`: `catalog.version_body()`.
`POST /api/create`, `/api/copy`, `/api/push`, `/api/blobs/<x>`: `errors.not_supported()` (501).
"""
from lemonade.ollama_api import catalog, errors, request, response
from lemonade.ollama_api.request import Translated, chat_request, generate_request, is_unload_request, model_name
from lemonade.ollama_api.response import ChatStream, GenerateStream, chat_response, generate_response

__all__ = ["ChatStream", "GenerateStream", "Translated", "catalog", "chat_request", "chat_response", "errors",
           "generate_request", "generate_response", "is_unload_request", "model_name", "request", "response"]
