"""The Ollama API routes (C++ HEAD `S/ollama_api.cpp`, spec head §5): parse, translate with
`lemonade.ollama_api`, auto-load, forward through the router, write. A mixin of `handlers.Api`, which
gives it `router`, `manager` and `config`.

Streams are NDJSON (`application/x-ndjson`, chunked): each SSE frame llama-server sends becomes one
line at once (`dialect_common.TranslatingSink`), then the final `done` record; a stream the backend
breaks off ends with Ollama's `{"error": …}` line.
"""
from __future__ import annotations

import logging
from typing import Any

from lemonade.error_types import InvalidRequestError, LemonadeError, ModelNotLoadedNamedError, OfflineError
from lemonade.ollama_api import catalog, errors, request, response
from lemonade.server.dialect_common import TranslatingSink, auto_load, backend_object
from lemonade.server.json_body import apply_no_think, parse_json_object
from lemonade.streaming_proxy import ClientGone
from lemonade.wrapped_server import BackendCall

log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
ENDPOINTS = {"chat": "/v1/chat/completions", "generate": "/v1/completions"}
EMBEDDINGS_ENDPOINT = "/v1/embeddings"


class OllamaRoutes:
    """One method per Ollama route (`routes.OLLAMA_ROUTES`)."""

    # -- generation --------------------------------------------------------------------------------

    def ollama_chat(self, h) -> None:
        self._ollama_generation(h, "chat")

    def ollama_generate(self, h) -> None:
        self._ollama_generation(h, "generate")

    def _ollama_generation(self, h, route: str) -> None:
        """`/api/chat` and `/api/generate` (spec head §5.2, §5.3). Blocks for a load and the answer."""
        body = parse_json_object(h.read_body())
        model = request.model_name(body)
        if request.is_unload_request(body, route):
            try:
                self.router.unload(model)
            except ModelNotLoadedNamedError:
                pass  # HEAD ignores every unload error here
            h.send_json(200, response.unload_response(model, route))
            return
        t = request.chat_request(body) if route == "chat" else request.generate_request(body)
        if not auto_load(h, self.router, t.model, body, lambda: errors.load_failure(t.model, route),
                         errors.residency_conflict):
            return
        if route == "chat":
            apply_no_think(t.openai)
        translator = response.ChatStream(t.model) if route == "chat" else response.GenerateStream(t.model)
        sink = TranslatingSink(h, lambda status, reply: _generation_answer(h, route, t, status, reply),
                               translator, NDJSON)
        call = BackendCall(ENDPOINTS[route], t.openai, None, t.backend_stream)
        self.router.forward(t.model, call, sink)

    # -- embeddings --------------------------------------------------------------------------------

    def ollama_embed(self, h) -> None:
        self._ollama_embedding(h, legacy=False)

    def ollama_embeddings(self, h) -> None:
        self._ollama_embedding(h, legacy=True)

    def _ollama_embedding(self, h, legacy: bool) -> None:
        """`/api/embed` (every vector) and `/api/embeddings` (the first one). A model that is not
        registered for embeddings is refused before it is loaded: its llama-server would run without
        `--embeddings` and could only refuse."""
        body = parse_json_object(h.read_body())
        model, openai = catalog.embed_request(body, legacy)
        info = self.manager.supported_models().get(model)
        if info is not None and info.model_type != "embedding":
            raise InvalidRequestError(
                f"model '{model}' does not support embeddings: it is not registered with the "
                "'embeddings' label (register a model with that label to embed)")
        if not auto_load(h, self.router, model, body, lambda: errors.load_failure(model, "embed"),
                         errors.residency_conflict):
            return
        shape = catalog.embeddings_response if legacy else catalog.embed_response

        def answer(status: int, reply: Any) -> None:
            status, reply = backend_object(status, reply)
            if status != 200:
                h.send_json(*errors.from_backend(status, reply))
            else:
                h.send_json(200, shape(reply, model))

        self.router.forward(model, BackendCall(EMBEDDINGS_ENDPOINT, openai, None, False, telemetry=False),
                            TranslatingSink(h, answer))

    # -- models ------------------------------------------------------------------------------------

    def ollama_tags(self, h) -> None:
        """Downloaded models (spec head §5.1)."""
        models = sorted(self.manager.supported_models().items())
        h.send_json(200, catalog.tags_body(info for _, info in models if self.manager.is_downloaded(info)))

    def ollama_ps(self, h) -> None:
        h.send_json(200, catalog.ps_body(m.info for m in self.router.loaded()))

    def ollama_version(self, h) -> None:
        h.send_json(200, catalog.version_body())

    def ollama_show(self, h) -> None:
        body = parse_json_object(h.read_body())
        name = catalog.show_name(body)
        info = self.manager.supported_models().get(name)
        if info is None:
            h.send_json(*errors.not_found(name))
            return
        h.send_json(200, catalog.show_body(info, self._context_size(name)))

    def _context_size(self, name: str) -> int:
        """The context the model's llama-server runs with when it is loaded, else the server's."""
        for model in self.router.loaded():
            argv = model.backend.launch_command
            if model.info.name == name and "--ctx-size" in argv[:-1]:
                return int(argv[argv.index("--ctx-size") + 1])
        return self.router.options.ctx_size

    def ollama_delete(self, h) -> None:
        """Unload if loaded, then delete; 200 with an empty body (spec head §5.1)."""
        body = parse_json_object(h.read_body())
        name = catalog.show_name(body)
        try:
            self.router.unload(name)
        except ModelNotLoadedNamedError:
            pass
        try:
            self.manager.delete(name)
        except LemonadeError as e:
            h.send_json(*errors.delete_failure(e.message))
            return
        h.send_bytes(200, b"", None)

    def ollama_pull(self, h) -> None:
        """Download a registered model (spec head §5.4). Streamed as NDJSON progress lines, whose
        headers go out only with the first line: until then a failure is still a plain answer with
        its status (an unknown model 404, offline 400 `lemond_offline`); after, an `{"error"}` line."""
        body = parse_json_object(h.read_body())
        name = catalog.show_name(body)
        stream = catalog.pull_stream(body)
        if self.manager.supported_models().get(name) is None:
            h.send_json(*errors.not_found(name))
            return
        lines = _LazyLines(h) if stream else None
        try:
            try:
                if lines is not None:
                    lines.write(catalog.PULL_STARTED, hold=True)
                self.manager.download(name, progress=lines.progress if lines else None)
            except LemonadeError as e:
                if lines is not None and lines.started:
                    lines.write(errors.error_line(e.message))
                elif isinstance(e, OfflineError):
                    h.send_json(*errors.offline(e.message))
                    return
                else:
                    raise
            else:
                if lines is None:
                    h.send_json(200, {"status": "success"})
                    return
                lines.write(catalog.PULL_SUCCESS)
        except ClientGone:
            return  # the client left; its progress line failed and stopped the download
        h.end_chunks()

    def ollama_not_supported(self, h, **params: str) -> None:
        h.send_json(*errors.not_supported())


def _generation_answer(h, route: str, t: request.Translated, status: int, reply: Any) -> None:
    """A whole backend answer to `/api/chat` or `/api/generate`; a streamed chat with tools gets its
    two NDJSON lines (the backend was asked for a whole answer, spec head §5.2)."""
    status, reply = backend_object(status, reply)
    if status != 200:
        h.send_json(*errors.from_backend(status, reply))
    elif route == "generate":
        h.send_json(200, response.generate_response(reply, t.model))
    elif t.stream:
        h.send_bytes(200, response.tools_stream_lines(reply, t.model), NDJSON)
    else:
        h.send_json(200, response.chat_response(reply, t.model))


class _LazyLines:
    """An NDJSON answer whose headers are sent with the first line that is not held back, so an error
    before it can still be a plain answer with a status. A client that left raises ClientGone."""

    def __init__(self, h):
        self.h = h
        self.started = False
        self._held = b""
        self._write = h.relay_writer()

    def write(self, line: bytes, hold: bool = False) -> None:
        if hold and not self.started:
            self._held += line
            return
        if not self.started:
            self.h.start_stream(NDJSON)
            self.started = True
            line, self._held = self._held + line, b""
        self._write(line)

    def progress(self, event) -> None:
        """A download progress event as an Ollama progress line (the llama.cpp install and the
        health wait of a load have no Ollama counterpart and are not written)."""
        if getattr(event, "stage", "download") == "download" and hasattr(event, "bytes_done"):
            self.write(catalog.pull_progress_line(event.file, event.bytes_done, event.bytes_total))
