"""Relay an SSE response from a backend to the client (C++ `server/streaming_proxy.cpp`, spec §6).

Bytes go through untouched, one write per received chunk, nothing collected: only a bounded tail is
kept to read the last frame's `usage`/`timings` for telemetry. If the backend ends without
`data: [DONE]` (also when it dies mid-stream) the marker is appended, as C++ does.
"""
from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

from lemonade.error_types import NetworkError
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


class ClientGone(Exception):
    """The client closed its connection; the relay stops and closes the upstream."""


def relay(response: http_client.BackendResponse, write: Callable[[bytes], None]) -> RelayResult:
    """Copy the open backend `response` to `write` until either side ends. Blocks for the stream.

    `write` sends one chunk to the client (already framed by the caller) and raises ClientGone when
    the client has disconnected. The upstream response is always closed, which makes llama-server
    stop generating for a client that left.
    """
    recent: collections.deque = collections.deque(maxlen=TAIL_CHUNKS)  # no copying per chunk
    seam = b""  # the end of the previous chunk, for a marker split across two chunks
    saw_done = False
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
        except (NetworkError, OSError) as e:
            # A backend that drops mid-stream ends the stream normally (C++ treats curl's
            # partial-file/recv errors as success).
            log.warning("Backend stream ended early: %s", e)
        if not saw_done:
            log.debug("Backend stream had no [DONE]; appending it")
            write(DONE_FRAME)
    except ClientGone:
        log.debug("Client disconnected during stream; closing the backend request")
        return RelayResult(False, saw_done, None)
    finally:
        response.close()
    return RelayResult(True, saw_done, last_stats_frame(b"".join(recent)[-TAIL_BYTES:]))


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
