"""Relay an SSE response from a backend to the client (C++ `server/streaming_proxy.cpp`, spec §6).

Bytes go through untouched, one write per received chunk, nothing collected: only a bounded tail is
kept to read the last frame's `usage`/`timings` for telemetry. A backend that ends its stream cleanly
without `data: [DONE]` gets the marker appended, as C++ does. A stream the backend breaks off (it died,
was unloaded, or the connection failed) is reported to the caller instead, who ends it with an error
frame and no `[DONE]`, so a client never mistakes a cut answer for a complete one (C++ appends
`[DONE]` there too; see CMake-parity-docs/streaming_proxy.md).
"""
from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

from lemonade.error_types import LemonadeError, NetworkError
from lemonade.utils import http_client

log = logging.getLogger(__name__)

DONE_FRAME = b"data: [DONE]\n\n"
TAIL_BYTES = 16384  # enough for the final frames, which carry usage/timings
TAIL_CHUNKS = 32  # llama-server sends one frame per chunk; the stats frame is among the last few
_DONE = b"[DONE]"
_FRAME_PREFIXES = (b"data: ", b"ChatCompletionChunk: ")  # the second is an FLM debug format


@dataclass
class RelayResult:
    completed: bool  # False when the client went away
    saw_done: bool
    last_stats_frame: dict[str, Any] | None
    error: LemonadeError | None = None  # the backend broke the stream off


class ClientGone(Exception):
    """The client closed its connection; the relay stops and closes the upstream."""


def relay(response: http_client.BackendResponse, write: Callable[[bytes], None]) -> RelayResult:
    """Copy the open backend `response` to `write` until either side ends. Blocks for the stream.

    `write` sends one chunk to the client (already framed by the caller) and raises ClientGone when
    the client has disconnected. The upstream response is always closed, which makes llama-server
    stop generating for a client that left. A broken-off stream returns with `error` set and nothing
    appended.
    """
    recent: collections.deque = collections.deque(maxlen=TAIL_CHUNKS)  # no copying per chunk
    seam = b""  # the end of the previous chunk, for a marker split across two chunks
    saw_done = False
    error: LemonadeError | None = None
    try:
        try:
            for chunk in http_client.iter_chunks(response):
                if not chunk:
                    continue
                write(chunk)
                recent.append(chunk)
                if not saw_done:
                    saw_done = _DONE in chunk or _DONE in seam + chunk[:len(_DONE)]
                    seam = chunk[-len(_DONE):]
        except NetworkError as e:
            error = e
        except OSError as e:
            error = NetworkError(str(e) or type(e).__name__)
        if error is not None and saw_done:
            error = None  # the answer was complete; only the connection's end was untidy
        if error is not None:
            log.warning("Backend stream broke off: %s", error.message)
        elif not saw_done:
            log.debug("Backend stream had no [DONE]; appending it")
            write(DONE_FRAME)
    except ClientGone:
        log.debug("Client disconnected during stream; closing the backend request")
        return RelayResult(False, saw_done, None)
    finally:
        response.close()
    return RelayResult(True, saw_done, last_stats_frame(b"".join(recent)[-TAIL_BYTES:]), error)


def last_stats_frame(tail: bytes) -> dict[str, Any] | None:
    """The last JSON frame that has `usage` or `timings` (C++ telemetry parse, spec §6 step 3)."""
    for line in reversed(tail.split(b"\n")):
        for prefix in _FRAME_PREFIXES:
            if line.startswith(prefix):
                payload = line[len(prefix):].strip()
                if payload == _DONE:
                    break
                try:
                    frame = json.loads(payload)
                except ValueError:
                    break
                if isinstance(frame, dict) and ("usage" in frame or "timings" in frame):
                    return frame
                break
    return None
