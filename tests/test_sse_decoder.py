"""The bytes-level SSE decoder of the stream source: framing per the SSE specification."""

from __future__ import annotations

import pytest

from connector.source import SseBytesDecoder
from connector.sse import Oversized

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


def _feed(decoder: SseBytesDecoder, data: bytes, size: int) -> list[tuple[str, str, bytes]]:
    out = []
    for i in range(0, len(data), size):
        out += decoder.feed(data[i : i + size])
    return out


def test_a_long_message_in_small_chunks_comes_out_whole() -> None:
    """Only the new bytes are searched for a message's end (a long one costs linear time)."""
    payload = b'{"d":"' + bytes(range(32, 127)) * 20_000 + b'"}'
    stream = STREAM + b"id: 7-0\nevent: create\ndata: " + payload + b"\n\n"
    assert _feed(SseBytesDecoder(), stream, 997) == [*EXPECTED, ("create", "7-0", payload)]


@pytest.mark.parametrize("size", [1, 100, 4096])
def test_an_oversized_message_is_cut_to_its_head_and_the_stream_goes_on(size: int) -> None:
    limit = 10_000
    big = b'id: 8-0\nevent: create\ndata: {"x":"' + b"A" * 50_000 + b'"}\n\n'
    after = b"id: 9-0\nevent: update\ndata: {}\n\n"
    stream = STREAM + big + after
    decoder = SseBytesDecoder(limit)
    out: list[tuple[str, str, bytes]] = []
    for i in range(0, len(stream), size):
        out += decoder.feed(stream[i : i + size])
        held = sum(len(p) for p in decoder._parts)  # noqa: SLF001 - the bound under test
        assert held <= limit + size
    assert out[: len(EXPECTED)] == EXPECTED
    (name, id_text, head), last = out[len(EXPECTED) :]
    assert (name, id_text) == ("create", "8-0")
    assert isinstance(head, Oversized) and head.size >= 50_000
    assert 0 < len(head) <= 4096 and head.startswith(b"id: 8-0\nevent: create\n")
    assert last == ("update", "9-0", b"{}")


@pytest.mark.parametrize("size", [1, 7, 100, 4096, 65_536, 200_000])
def test_the_limit_and_the_size_are_the_messages_wherever_the_stream_is_cut(size: int) -> None:
    """A message over the limit that arrived whole in one chunk went through (100 KB with a
    64 KiB limit), and one read past was counted a byte more or less depending on where the
    chunks were cut: its quarantine record (which states the size) then differed between two
    deliveries, and was stored twice. A message at the limit is taken, one byte more is not."""
    limit = 10_000
    head = b"id: 8-0\nevent: create\ndata: "
    at_limit = head + b"B" * (limit - len(head))
    over = head + b"A" * 50_000
    stream = STREAM + at_limit + b"\n\n" + over + b"\n\n" + b"id: 9-0\nevent: update\ndata: {}\n\n"
    out = _feed(SseBytesDecoder(limit), stream, size)
    assert out[: len(EXPECTED)] == EXPECTED
    taken, (name, id_text, cut), last = out[len(EXPECTED) :]
    assert taken == ("create", "8-0", at_limit[len(head) :])
    assert (name, id_text) == ("create", "8-0") and isinstance(cut, Oversized)
    assert cut.size == len(over)
    assert bytes(cut) == over[:4096]
    assert last == ("update", "9-0", b"{}")
    one_more = head + b"C" * (limit - len(head) + 1)
    (got,) = _feed(SseBytesDecoder(limit), one_more + b"\n\n", size)
    assert isinstance(got[2], Oversized) and got[2].size == limit + 1


def test_only_the_first_space_after_the_colon_is_removed() -> None:
    """The field's value starts after one optional space: a second one is the value's."""
    stream = b'id:7-0\nevent:create\ndata:  {"a":1}\n\n' + b"id:  8-0\nevent: update\ndata: {}\n\n"
    assert SseBytesDecoder().feed(stream) == [
        ("create", "7-0", b' {"a":1}'),
        ("update", " 8-0", b"{}"),  # not an id the source takes: quarantined there
    ]


@pytest.mark.parametrize("size", [1, 7, 4096, 200_000])
def test_a_message_of_any_fields_at_the_limit_is_taken(size: int) -> None:
    """The limit is the message's, whatever its fields: one with a comment line (not the
    platform's usual three lines) at exactly the limit is taken, one byte more is not."""
    limit = 10_000
    head = b": a comment\nid: 8-0\nevent: create\ndata: "
    at_limit = head + b"B" * (limit - len(head))
    (taken,) = _feed(SseBytesDecoder(limit), at_limit + b"\n\n", size)
    assert taken == ("create", "8-0", at_limit[len(head) :])
    (cut,) = _feed(SseBytesDecoder(limit), at_limit + b"B\n\n", size)
    assert isinstance(cut[2], Oversized) and cut[2].size == limit + 1


def test_a_long_message_comes_out_as_soon_as_its_end_arrives() -> None:
    """A long message whose blank line is cut between two chunks comes out with the chunk that
    completes it. Held instead until a later chunk holding a blank line, the next message's
    bytes were counted with it: two messages each under the limit read past as one."""
    limit = 400_000  # above the size from which only the new bytes are searched
    first = b"id: 7-0\nevent: create\ndata: " + b"A" * 300_000
    second = b"id: 8-0\nevent: create\ndata: " + b"C" * 200_000
    decoder = SseBytesDecoder(limit)
    assert _feed(decoder, first + b"\n", 65_536) == []
    assert decoder.feed(b"\n") == [("create", "7-0", first[-300_000:])]
    assert _feed(decoder, second, 65_536) == []
    assert decoder.feed(b"\n\n") == [("create", "8-0", second[-200_000:])]


def test_a_block_without_data_or_event_dispatches_nothing() -> None:
    """A keep-alive comment, an id alone: no message (the id is kept for the next one)."""
    decoder = SseBytesDecoder()
    assert decoder.feed(b": keep-alive\n\nid: 9-0\n\n:\n\n") == []
    assert decoder.feed(b"data: {}\n\n") == [("message", "9-0", b"{}")]


def test_an_id_in_the_platforms_message_form_is_the_next_messages_too() -> None:
    """The last event id stays until another is given, whatever form the message that gave it
    took (the platform's three lines are read by a faster path than other messages)."""
    stream = b"id: 7-0\nevent: create\ndata: {}\n\nevent: update\ndata: {}\n\n"
    assert SseBytesDecoder().feed(stream) == [("create", "7-0", b"{}"), ("update", "7-0", b"{}")]


@pytest.mark.parametrize("size", [1, 2, 4, 64])
def test_a_byte_order_mark_before_the_first_line_is_ignored(size: int) -> None:
    """SSE ignores one leading U+FEFF. Read as part of the first line, it made the
    ``connected`` message's first field an unknown one: a message named "message", skipped by
    the source, and the connect-time retention check with it. One further on is data."""
    bom = b"\xef\xbb\xbf"
    assert _feed(SseBytesDecoder(), bom + STREAM, size) == EXPECTED
    later = b"id: 9-0\nevent: create\ndata: " + bom + b"{}\n\n"
    assert _feed(SseBytesDecoder(), bom + later, size) == [("create", "9-0", bom + b"{}")]
