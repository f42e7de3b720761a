"""Request values cannot forge log lines or SSE fields (issue 15 item 11), on a real `lemonade serve`.

A percent-encoded CR LF in a URL used to end the access line and start a forged one (`2099-... INFO
...`); a bare CR became a line end for `/logs/stream` clients (SSE ends a field at CR), so the rest of
the URL could add `event:` and `id:` fields. Now every control character of a logged value is
escaped (`\\r`, `\\n`, `\\x1b`), in the log (stdout and the log file) and in the SSE data.
"""
from __future__ import annotations

import pytest
import requests

from api_support import raw_request, running_server, wait_for
from lemonade.sse import iter_events

FORGED_LINE = "2099-01-01 00:00:00,000 INFO lemonade.server.httpd: [Server] GET /forged - 200"
CRLF_TARGET = "/api/v1/health%0d%0a" + FORGED_LINE.replace(" ", "%20")
CR_TARGET = "/api/v1/nothing%0devent:%20pwned%0did:%2042%0ddata:%20injected"
C0_TARGET = "/api/v1/marker%00%1b[2J%7f%c2%85end"


@pytest.fixture(scope="module")
def server(tmp_path_factory, seeded_hub_cache, llama_server_bin):
    with running_server(tmp_path_factory.mktemp("forging"), seeded_hub_cache) as s:
        for target in (CRLF_TARGET, CR_TARGET, C0_TARGET):
            raw_request(s.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        yield s


def _log_lines(text: str) -> list[str]:
    return text.splitlines()


@pytest.mark.parametrize("where", ["stdout", "log file"])
def test_no_forged_line_in_the_log(server, where):
    def text() -> str:
        return server.log_text() if where == "stdout" else server.runtime_log.read_text(errors="replace")

    # Each access line is written after its answer (the debug PRE-ROUTE line names the target
    # earlier), so wait for the access lines themselves.
    wait_for(lambda: all(f"{end} - 404" in text() for end in ("end", "injected", FORGED_LINE)), 10,
             what="the three access lines")
    lines = _log_lines(text())
    assert not any(line.startswith("2099-01-01") for line in lines)
    assert any(line.endswith("[Server] GET /api/v1/health\\r\\n" + FORGED_LINE + " - 404") for line in lines)
    assert any("[Server] GET /api/v1/nothing\\revent: pwned\\rid: 42\\rdata: injected - 404" in line
               for line in lines)
    assert any("[Server] GET /api/v1/marker\\x00\\x1b[2J\\x7f\\x85end - 404" in line for line in lines)
    assert "\r" not in text() and "\x1b" not in text()


def test_log_stream_events_carry_no_injected_fields(server):
    # Each access line is written after its answer, by the worker thread that served it, so the two
    # lines asserted on may reach the log in either order: read until both have come.
    wanted = (b"[Server] GET /api/v1/nothing", b"end - 404")
    seen = []
    with requests.get(server.api + "/logs/stream", stream=True, timeout=30) as reply:
        for event in iter_events(reply.iter_content(None)):
            seen.append(event)
            if all(any(w in e.data for e in seen) for w in wanted):
                break
    assert {event.event for event in seen} == {"message"}  # no `event: pwned`
    assert not any(event.data.startswith(b"injected") for event in seen)
    (line,) = [e.data for e in seen if b"[Server] GET /api/v1/nothing" in e.data]
    assert line.endswith(b"[Server] GET /api/v1/nothing\\revent: pwned\\rid: 42\\rdata: injected - 404")


@pytest.mark.parametrize("line, sent", [
    (b"plain", b"plain"),
    (b"ends in CRLF\r", b"ends in CRLF"),
    (b"a\rid: 5\revent: x", b"a\\x0did: 5\\x0devent: x"),
    (b"nul\x00 esc\x1b del\x7f", b"nul\\x00 esc\\x1b del\\x7f"),
    (b"tab\tkept", b"tab\tkept"),
])
def test_log_lines_are_made_safe_for_one_sse_field(line, sent):
    """Lines another writer put in the log file (a child's output) are escaped by the stream itself."""
    from lemonade.server.logs import sse_safe

    assert sse_safe(line) == sent
