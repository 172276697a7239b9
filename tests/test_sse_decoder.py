"""The bytes-level SSE decoder of the stream source: framing per the SSE specification."""

from __future__ import annotations

import pytest

from connector.source import SseBytesDecoder

STREAM = (
    b'event: connected\ndata: {"a":1}\n\n'
    b'id: 1-0\nevent: create\ndata: {"x":"\xe2\x80\xa8 \xe2\x80\xa9"}\n\n'
    b"id: 2-0\r\nevent: update\r\ndata: {}\r\n\r\n"
    b': a comment line\nid: 3-0\nevent: heartbeat\ndata: "d"\n\n'
    b'id: 4-0\revent: delete\rdata: {"y":2}\r\r'
    b'id: 5-0\nevent: merge\ndata: {"a":\ndata: 1}\n\n'
    b"id: bad\x00id\nevent: create\ndata: {}\n\n"
    b'data: {"no":"event name"}\n\n'
)
EXPECTED = [
    ("connected", "", b'{"a":1}'),
    ("create", "1-0", b'{"x":"\xe2\x80\xa8 \xe2\x80\xa9"}'),
    ("update", "2-0", b"{}"),
    ("heartbeat", "3-0", b'"d"'),
    ("delete", "4-0", b'{"y":2}'),
    ("merge", "5-0", b'{"a":\n1}'),
    ("create", "5-0", b"{}"),  # an id containing NUL is ignored: the last id stays
    ("message", "5-0", b'{"no":"event name"}'),
]


def test_whole_stream() -> None:
    assert SseBytesDecoder().feed(STREAM) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 13, 64])
def test_any_chunking_gives_the_same_messages(size: int) -> None:
    decoder = SseBytesDecoder()
    out = []
    for i in range(0, len(STREAM), size):
        out += decoder.feed(STREAM[i : i + size])
    assert out == EXPECTED


def test_incomplete_message_waits_for_its_end() -> None:
    decoder = SseBytesDecoder()
    assert decoder.feed(b"id: 1-0\nevent: create\ndata: {}\n") == []
    assert decoder.feed(b"\n") == [("create", "1-0", b"{}")]
