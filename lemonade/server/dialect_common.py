"""What the Ollama and Anthropic routes share on the HTTP side (the translation itself is in
`lemonade.ollama_api` and `lemonade.anthropic_api`): their error renderers, HEAD's auto-load, and a
`ReplySink` that translates a backend's SSE stream frame by frame.

Importing this module registers the `ollama` and `anthropic` error styles in
`error_types.RENDERERS`, so every error raised on those routes (bad JSON, a body over the limit, a
backend that died) is answered in the route's dialect. `handlers` imports it through the route mixins.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Callable, Protocol

from lemonade import error_types
from lemonade.anthropic_api import errors as anthropic_errors
from lemonade.dialects import load_options
from lemonade.error_types import InvalidRequestError, LemonadeError, ModelNotFoundError, SlotsPinnedError
from lemonade.ollama_api import errors as ollama_errors
from lemonade.server.routes import Errors
from lemonade.sse import FrameReader

log = logging.getLogger(__name__)

AUTO_CTX = -1  # HEAD's "size it automatically"; here: the server's context size

Answer = tuple[int, dict[str, Any]]


def _render_ollama(error: LemonadeError, path: str) -> Answer:
    return ollama_errors.from_exception(error)


def _render_anthropic(error: LemonadeError, path: str) -> Answer:
    return anthropic_errors.from_exception(error)


error_types.RENDERERS[Errors.OLLAMA.value] = _render_ollama
error_types.RENDERERS[Errors.ANTHROPIC.value] = _render_anthropic


# -- auto-load ---------------------------------------------------------------------------------------

def requested_ctx_size(body: dict[str, Any]) -> int | None:
    """The context size a request asks its auto-load for (`options.num_ctx`, a top-level `ctx_size`
    winning, `dialects.load_options`), or None for the server's. -1 is HEAD's "automatic", which here
    means the server's size; 0 is llama-server's "the model's own". Raises InvalidRequestError for a
    non-integer or a value below -1."""
    ctx = load_options(body).get("ctx_size")
    if ctx is None or ctx == AUTO_CTX:
        return None
    if ctx < 0:
        raise InvalidRequestError(f"ctx_size must be -1 (automatic), 0 (the model's own) or positive, got {ctx}")
    return ctx


def auto_load(h, router, model: str, body: dict[str, Any], not_found: Callable[[], Answer],
              conflict: Callable[[str], Answer]) -> bool:
    """HEAD's auto-load before a dialect request (spec head §5): a loaded model is used as it is (a
    requested context size is ignored, logged at debug); else the model is downloaded if needed and
    loaded with the one option `ctx_size`. Blocks for that. Returns False when it has answered the
    request itself: `not_found()` for a model that is not registered, `conflict(message)` when every
    loaded model of its type is pinned. Other load failures propagate with their own status and reason
    (HEAD answers 404 "not found" for every reason), e.g. ModelBusyError's 503 when the models that
    would give way stayed busy."""
    ctx = requested_ctx_size(body)
    try:
        _, already = router.load(model, ctx_size=ctx, progress=_log_progress)
    except ModelNotFoundError:
        h.send_json(*not_found())
        return False
    except SlotsPinnedError as e:
        h.send_json(*conflict(e.message))
        return False
    if already and ctx is not None:
        log.debug("Ignoring requested ctx_size=%d for already-loaded %s", ctx, model)
    return True


def _log_progress(event) -> None:
    log.debug("Load progress: %s", event)


# -- replies ----------------------------------------------------------------------------------------

class StreamTranslator(Protocol):
    """`ollama_api.ChatStream`/`GenerateStream`, `anthropic_api.MessageStream`."""

    def feed(self, chunk: dict[str, Any]) -> bytes: ...

    def error(self, error: Any) -> bytes: ...

    def final(self) -> bytes: ...


class TranslatingSink:
    """A `wrapped_server.ReplySink` for a dialect. A whole answer goes to `whole(status, body)`; a
    stream is read frame by frame (`sse.FrameReader`), each frame translated at once and the bytes of
    one backend chunk written as one HTTP chunk, so nothing is held beyond one incomplete frame. A
    client that left raises streaming_proxy.ClientGone from `stream_chunk`: the relay then closes the
    backend request, which cancels the generation."""

    def __init__(self, h, whole: Callable[[int, Any], None], translator: StreamTranslator | None = None,
                 content_type: str = "", headers: tuple = ()):
        self.h = h
        self.whole = whole
        self.translator = translator
        self.content_type = content_type
        self.headers = headers
        self._frames = FrameReader()
        self._write: Callable[[bytes], None] | None = None  # set when a stream starts

    def json(self, status: int, body: Any) -> None:
        self.whole(status, body)

    def stream_start(self) -> None:
        self._write = self.h.relay_writer()
        self.h.start_stream(self.content_type, self.headers)

    def stream_chunk(self, data: bytes) -> None:
        out = b"".join(self.translator.feed(frame) for frame in self._frames.feed(data))
        if out:
            self._write(out)

    def stream_end(self, error: dict[str, Any] | None) -> None:
        """Translate what is left, then the dialect's closing record, or its error record when the
        backend broke the stream off. Raises ClientDisconnected if the client left meanwhile."""
        out = b"".join(self.translator.feed(frame) for frame in self._frames.close())
        out += self.translator.error(error) if error is not None else self.translator.final()
        if out:
            self.h.write_chunk(out)
        self.h.end_chunks()


def backend_object(status: int, body: Any) -> tuple[int, Any]:
    """A 200 answer whose body is not a JSON object is the backend's fault: (502, an error object
    for the dialect's `from_backend`). Anything else is returned as it is."""
    if status == 200 and not isinstance(body, dict):
        return 502, {"error": {"message": "the backend answered 200 with a body that is not a JSON object",
                               "type": "backend_error"}}
    return status, body


def header_value(text: str) -> str:
    """`text` safe for a header line: ASCII, no CR/LF (JSON string escapes), since warnings quote
    client input such as a role name."""
    return json.dumps(text, ensure_ascii=True)[1:-1]
