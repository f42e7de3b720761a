"""An incremental Server-Sent Events parser, for translating a backend stream frame by frame.

The Ollama and Anthropic dialects (`ollama_api`, `anthropic_api`) read llama-server's OpenAI SSE
stream, translate each frame and write the result at once. This module turns the byte chunks of
that stream, split anywhere, into events. It follows the WHATWG "event stream interpretation":

* a line ends with CRLF, LF or CR (a CR at the end of a chunk waits for the next chunk, in case an
  LF follows it);
* a line starting with `:` is a comment (`: ping` heartbeats) and is skipped;
* `field: value` loses one space after the colon; `data` lines of one event are joined with `\\n`;
* an empty line dispatches the event; an event without `data` is not dispatched;
* a leading byte-order mark is skipped; `id` and `retry` are read and ignored.

One difference from the standard, on purpose: when the stream ends, a pending event that has data
is still dispatched (the standard drops it). A backend that closes without the final blank line
(or dies mid-frame) then still gets its last frame translated; a truncated JSON frame fails to parse
in `iter_json` and is skipped there.

Nothing is buffered beyond the current incomplete line and the data lines of the current event.
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any, Iterable, Iterator, NamedTuple

log = logging.getLogger(__name__)

DEFAULT_EVENT = "message"  # the SSE standard's event type when no `event:` line is given
DONE_DATA = b"[DONE]"  # OpenAI's end-of-stream marker
_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class SseEvent(NamedTuple):
    """One dispatched event: its name (`message` unless an `event:` line said otherwise) and its
    data lines joined with LF, as bytes."""

    event: str
    data: bytes


def iter_events(chunks: Iterable[bytes]) -> Iterator[SseEvent]:
    """Yield each SSE event of a byte stream as soon as its terminating blank line arrives.

    Blocks only as long as iterating `chunks` blocks. Raises nothing of its own; an exception from
    `chunks` propagates (the events already complete have been yielded by then).
    """
    parser = _Parser()
    for chunk in chunks:
        yield from parser.feed(chunk)
    yield from parser.close()


def iter_json(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """Yield the JSON object of each event's data, skipping `[DONE]`, comments, and data that is not
    a JSON object (logged at debug). This is what the dialect stream translators are fed.

    Blocks and raises as `iter_events`.
    """
    reader = FrameReader()
    for chunk in chunks:
        yield from reader.feed(chunk)
    yield from reader.close()


class FrameReader:
    """`iter_json` for a stream that is pushed rather than pulled: the relay hands each backend chunk
    to `feed` as it arrives (`wrapped_server.ReplySink.stream_chunk`) and gets the frames that chunk
    completed; `close` gives the last one when the stream ends. Keeps only the incomplete line and
    the current event's data lines. Not thread-safe: one per stream."""

    def __init__(self) -> None:
        self._parser = _Parser()

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        return _json_frames(self._parser.feed(chunk))

    def close(self) -> list[dict[str, Any]]:
        return _json_frames(self._parser.close())


def _json_frames(events: Iterable[SseEvent]) -> list[dict[str, Any]]:
    frames = (parse_frame(event.data) for event in events)
    return [frame for frame in frames if frame is not None]


def parse_frame(data: bytes) -> dict[str, Any] | None:
    """One event's data as a JSON object, or None for `[DONE]` and for anything unparsable (C++
    HEAD skips both: `S/ollama_api.cpp` stream_sse_to_ndjson, `S/anthropic_api.cpp` 620-635)."""
    if data.strip() == DONE_DATA:
        return None
    try:
        frame = json.loads(data)
    except ValueError:
        log.debug("Skipping an SSE frame that is not JSON: %.200r", data)
        return None
    if not isinstance(frame, dict):
        log.debug("Skipping an SSE frame that is not a JSON object: %.200r", data)
        return None
    return frame


class _Parser:
    """The state between two chunks: the incomplete last line and the current event's fields."""

    def __init__(self) -> None:
        self._pending = bytearray()  # bytes after the last complete line
        self._data: list[bytes] = []
        self._event = ""
        self._started = False  # past the optional BOM

    def feed(self, chunk: bytes) -> Iterator[SseEvent]:
        if not chunk:
            return
        self._pending += chunk
        if not self._started:
            if len(self._pending) < len(_BOM) and _BOM.startswith(bytes(self._pending)):
                return  # maybe a BOM split across chunks: wait for more
            if self._pending.startswith(_BOM):
                del self._pending[:len(_BOM)]
            self._started = True
        start = 0
        buf = self._pending
        while True:
            match = _EOL.search(buf, start)
            if match is None:
                break
            if match.group() == b"\r" and match.end() == len(buf):
                break  # a CR at the very end may be the first half of a CRLF
            event = self._line(bytes(buf[start:match.start()]))
            start = match.end()
            if event is not None:
                yield event
        del buf[:start]

    def close(self) -> Iterator[SseEvent]:
        """The stream ended: the last line counts as complete, and a pending event is dispatched."""
        if self._pending:
            line = bytes(self._pending).rstrip(b"\r")
            self._pending.clear()
            event = self._line(line)
            if event is not None:
                yield event
        event = self._line(b"")
        if event is not None:
            yield event

    def _line(self, line: bytes) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(b":"):
            return None
        name, colon, value = line.partition(b":")
        if colon and value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        # `id`, `retry` and unknown fields are ignored: the relay has no use for them.
        return None

    def _dispatch(self) -> SseEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SseEvent(event or DEFAULT_EVENT, b"\n".join(data))
