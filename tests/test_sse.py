"""The incremental SSE parser (`lemonade/sse.py`): table tests of the line and field rules, every split
point of a real llama-server stream, and arbitrary splits (hypothesis)."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dialect_support import read_data, split_at, split_every
from lemonade.sse import FrameReader, SseEvent, iter_events, iter_json, parse_frame

M = "message"

EVENT_TABLE = [
    # (case, raw bytes, expected events)
    ("LF frames", b"data: a\n\ndata: b\n\n", [(M, b"a"), (M, b"b")]),
    ("CRLF frames", b"data: a\r\n\r\ndata: b\r\n\r\n", [(M, b"a"), (M, b"b")]),
    ("CR-only frames", b"data: a\r\rdata: b\r\r", [(M, b"a"), (M, b"b")]),
    ("mixed line ends", b"data: a\r\n\ndata: b\r\r\n", [(M, b"a"), (M, b"b")]),
    ("multi-line data joined with LF", b"data: one\ndata: two\ndata:\n\n", [(M, b"one\ntwo\n")]),
    ("no space after the colon", b"data:x\n\n", [(M, b"x")]),
    ("only one space is stripped", b"data:  x\n\n", [(M, b" x")]),
    ("named events", b"event: error\ndata: {}\n\nevent: ping\ndata: p\n\n", [("error", b"{}"), ("ping", b"p")]),
    ("the event name resets after dispatch", b"event: x\ndata: 1\n\ndata: 2\n\n", [("x", b"1"), (M, b"2")]),
    ("comments skipped, ping heartbeat", b": ping\n\ndata: a\n: in the middle\n\n", [(M, b"a")]),
    ("id and retry ignored", b"id: 7\nretry: 100\ndata: a\n\n", [(M, b"a")]),
    ("unknown fields ignored", b"foo: bar\ndata: a\n\n", [(M, b"a")]),
    ("a field line without colon is a field with empty value", b"data\n\n", [(M, b"")]),
    ("an event without data is not dispatched", b"event: lonely\n\n\n\n", []),
    ("a leading BOM is skipped", b"\xef\xbb\xbfdata: a\n\n", [(M, b"a")]),
    ("a BOM later is data", b"data: \xef\xbb\xbfa\n\n", [(M, b"\xef\xbb\xbfa")]),
    ("last frame without the blank line is still dispatched", b"data: a\n\ndata: b\n", [(M, b"a"), (M, b"b")]),
    ("last line without any line end", b"data: a\n\ndata: b", [(M, b"a"), (M, b"b")]),
    ("last line CR at the very end", b"data: a\r", [(M, b"a")]),
    ("empty stream", b"", []),
    ("binary payload passes through", b"data: \xff\x00\n\n", [(M, b"\xff\x00")]),
]


@pytest.mark.parametrize("case,raw,expected", EVENT_TABLE, ids=[c[0] for c in EVENT_TABLE])
def test_events_whole(case, raw, expected):
    assert list(iter_events([raw])) == [SseEvent(*e) for e in expected]


@pytest.mark.parametrize("case,raw,expected", EVENT_TABLE, ids=[c[0] for c in EVENT_TABLE])
def test_events_one_byte_at_a_time(case, raw, expected):
    assert list(iter_events(split_every(raw, 1))) == [SseEvent(*e) for e in expected]


@pytest.mark.parametrize("case,raw,expected", EVENT_TABLE, ids=[c[0] for c in EVENT_TABLE])
def test_events_every_single_split_point(case, raw, expected):
    for cut in range(len(raw) + 1):
        assert list(iter_events([raw[:cut], raw[cut:]])) == [SseEvent(*e) for e in expected], cut


def test_crlf_split_between_cr_and_lf_is_one_line_end():
    # If the CR were taken as a line end on its own, the LF would make an empty line and dispatch
    # "a" early, before the second data line arrives.
    assert list(iter_events([b"data: a\r", b"\ndata: b\n\n"])) == [SseEvent(M, b"a\nb")]


def test_events_are_yielded_as_soon_as_complete():
    """Frame by frame: an event comes out when its blank line arrives, before the next chunk is read."""
    seen = []

    def chunks():
        for chunk in (b"data: 1\n", b"\n", b"data: 2\n\n"):
            yield chunk
            seen.append(chunk)

    events = iter_events(chunks())
    assert next(events) == SseEvent(M, b"1")
    assert seen == [b"data: 1\n"]  # the second chunk (the blank line) is being read, not the third
    assert next(events) == SseEvent(M, b"2")


RECORDED = ["llama_chat_stream.sse", "llama_completions_stream.sse"]


@pytest.mark.parametrize("name", RECORDED)
def test_recorded_stream_at_every_split_point(name):
    raw = read_data(name)
    whole = list(iter_events([raw]))
    assert whole[-1] == SseEvent(M, b"[DONE]")
    assert all(json.loads(e.data) for e in whole[:-1])
    for cut in range(0, len(raw) + 1, 7):
        assert list(iter_events([raw[:cut], raw[cut:]])) == whole


@pytest.mark.parametrize("name", RECORDED)
def test_recorded_stream_with_crlf_line_ends(name):
    raw = read_data(name)
    assert list(iter_events(split_every(raw.replace(b"\n", b"\r\n"), 5))) == list(iter_events([raw]))


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=4292), max_size=40),
       crlf=st.booleans())
def test_recorded_stream_arbitrary_splits(cuts, crlf):
    raw = read_data("llama_chat_stream.sse")
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    assert list(iter_events(split_at(raw, cuts))) == list(iter_events([raw]))


def test_iter_json_skips_done_comments_and_non_objects():
    raw = (b": ping\n\ndata: {\"a\": 1}\n\ndata: [DONE]\n\ndata: not json\n\n"
           b"data: [1, 2]\n\ndata: {\"b\":\ndata: 2}\n\ndata: {\"trunc")
    assert list(iter_json([raw])) == [{"a": 1}, {"b": 2}]


def test_iter_json_recorded_chat_stream():
    frames = list(iter_json(split_every(read_data("llama_chat_stream.sse"), 64)))
    assert frames[0]["choices"][0]["delta"]["role"] == "assistant"
    assert frames[-1]["choices"] == [] and frames[-1]["usage"]["completion_tokens"] == 8
    assert [f["choices"][0]["finish_reason"] for f in frames[:-1]][-1] == "length"


@pytest.mark.parametrize("data,expected", [
    (b"[DONE]", None), (b" [DONE] ", None), (b"{}", {}), (b"{\"x\":[1]}", {"x": [1]}),
    (b"null", None), (b"\"s\"", None), (b"{", None), (b"\xff", None),
])
def test_parse_frame(data, expected):
    assert parse_frame(data) == expected


def test_an_exception_from_the_chunks_propagates_after_the_complete_events():
    def chunks():
        yield b"data: a\n\ndata: b"
        raise ConnectionResetError("backend went away")

    events = iter_events(chunks())
    assert next(events) == SseEvent(M, b"a")
    with pytest.raises(ConnectionResetError):
        next(events)


def test_frame_reader_returns_each_frame_with_the_chunk_that_completes_it():
    """The push form the dialect sinks use: nothing is returned before a frame's blank line arrives
    (except at close), and nothing is held after it."""
    reader = FrameReader()
    assert reader.feed(b'data: {"a"') == []
    assert reader.feed(b': 1}\n') == []
    assert reader.feed(b'\ndata: [DONE]\n\ndata: {"b": 2}\n\ndata: {"c"') == [{"a": 1}, {"b": 2}]
    assert reader.feed(b": 3}") == []
    assert reader.close() == [{"c": 3}]


def test_frame_reader_gives_what_iter_json_gives_at_every_split():
    raw = read_data("llama_chat_stream.sse")
    expected = list(iter_json([raw]))
    for size in (1, 7, 64, 1000):
        reader = FrameReader()
        frames = [f for chunk in split_every(raw, size) for f in reader.feed(chunk)] + reader.close()
        assert frames == expected, size
