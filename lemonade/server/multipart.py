"""A streaming `multipart/form-data` reader (the `cgi` module is gone from newer Pythons).

File parts are written to disk as they arrive, never held in memory: the reader keeps at most one
read block plus the boundary length in its buffer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

from lemonade.error_types import InvalidRequestError

BLOCK = 1 << 20
MAX_HEADER_BYTES = 16 * 1024
MAX_FIELD_BYTES = 1 << 20
MAX_EPILOGUE_BYTES = 1 << 20  # bytes after the closing delimiter we drain to keep the connection
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_PARAM = re.compile(r';\s*([a-zA-Z*]+)="((?:[^"\\]|\\.)*)"')


def boundary_of(content_type: str) -> str | None:
    if not content_type.lower().startswith("multipart/form-data"):
        return None
    match = _BOUNDARY.search(content_type)
    return match.group(1) if match else None


@dataclass
class Part:
    name: str
    filename: str | None
    headers: dict[str, str] = field(default_factory=dict)


class _Source:
    """Bounded reads from the request body (exactly Content-Length bytes)."""

    def __init__(self, rfile: BinaryIO, length: int):
        self.rfile, self.remaining = rfile, length

    def read(self) -> bytes:
        if self.remaining <= 0:
            return b""
        data = self.rfile.read(min(BLOCK, self.remaining))
        if not data:
            raise InvalidRequestError("Request body ended before Content-Length bytes arrived")
        self.remaining -= len(data)
        return data


def read_multipart(rfile: BinaryIO, length: int, boundary: str,
                   on_field: Callable[[str, str], None],
                   open_file: Callable[[Part], BinaryIO]) -> int:
    """Parse the body; text fields go to `on_field`, file parts are written to `open_file(part)`'s
    stream (closed by the reader). Returns how many body bytes are left unread (an epilogue longer
    than MAX_EPILOGUE_BYTES); 0 means the body is consumed. Raises InvalidRequestError on malformed
    input, TimeoutError when the client stalls."""
    source = _Source(rfile, length)
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    buffer = b"\r\n" + source.read()  # the first delimiter has no leading CRLF
    start = _find_delimiter(buffer, delimiter, source)
    buffer = buffer[start:]
    while True:
        buffer = _fill(buffer, source, len(delimiter) + 2)
        after = buffer[len(delimiter):len(delimiter) + 2]
        if after == b"--":
            return _drain(source)  # closing delimiter; what follows is an epilogue
        if after != b"\r\n":
            raise InvalidRequestError("Malformed multipart body: bad delimiter line")
        buffer = buffer[len(delimiter) + 2:]
        headers, buffer = _read_headers(buffer, source)
        part = _part_from_headers(headers)
        if part.filename is None:
            value, buffer = _read_body(buffer, source, delimiter, None, MAX_FIELD_BYTES)
            on_field(part.name, value.decode("utf-8", "replace"))
        else:
            sink = open_file(part)
            try:
                _, buffer = _read_body(buffer, source, delimiter, sink, None)
            finally:
                sink.close()


def _drain(source: _Source) -> int:
    drained = 0
    while source.remaining > 0 and drained < MAX_EPILOGUE_BYTES:
        drained += len(source.read())
    return source.remaining


def _fill(buffer: bytes, source: _Source, size: int) -> bytes:
    while len(buffer) < size:
        more = source.read()
        if not more:
            raise InvalidRequestError("Malformed multipart body: truncated")
        buffer += more
    return buffer


def _find_delimiter(buffer: bytes, delimiter: bytes, source: _Source) -> int:
    while True:
        index = buffer.find(delimiter)
        if index >= 0:
            return index
        if len(buffer) > MAX_HEADER_BYTES:
            raise InvalidRequestError("Malformed multipart body: no boundary found")
        more = source.read()
        if not more:
            raise InvalidRequestError("Malformed multipart body: no boundary found")
        buffer += more


def _read_headers(buffer: bytes, source: _Source) -> tuple[dict[str, str], bytes]:
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEADER_BYTES:
            raise InvalidRequestError("Malformed multipart body: part headers too long")
        more = source.read()
        if not more:
            raise InvalidRequestError("Malformed multipart body: truncated part headers")
        buffer += more
    raw, buffer = buffer.split(b"\r\n\r\n", 1)
    headers = {}
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    return headers, buffer


def _part_from_headers(headers: dict[str, str]) -> Part:
    disposition = headers.get("content-disposition", "")
    if not disposition.lower().startswith("form-data"):
        raise InvalidRequestError("Malformed multipart body: part without form-data disposition")
    params = {k.lower(): v.replace('\\"', '"') for k, v in _PARAM.findall(disposition)}
    if "name" not in params:
        raise InvalidRequestError("Malformed multipart body: part without a name")
    return Part(params["name"], params.get("filename"), headers)


def _read_body(buffer: bytes, source: _Source, delimiter: bytes, sink: BinaryIO | None,
               limit: int | None) -> tuple[bytes, bytes]:
    """Copy bytes up to the next delimiter into `sink` (or collect them, at most `limit`)."""
    collected = bytearray()
    keep = len(delimiter)
    while True:
        index = buffer.find(delimiter)
        if index >= 0:
            data, buffer = buffer[:index], buffer[index:]
        else:
            cut = max(0, len(buffer) - keep)  # the tail may hold the start of a delimiter
            data, buffer = buffer[:cut], buffer[cut:]
        if data:
            if sink is not None:
                sink.write(data)
            else:
                collected += data
                if limit is not None and len(collected) > limit:
                    raise InvalidRequestError("Multipart field too large")
        if index >= 0:
            return bytes(collected), buffer
        more = source.read()
        if not more:
            raise InvalidRequestError("Malformed multipart body: truncated part")
        buffer += more
