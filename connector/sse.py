"""Server-Sent Events framing on bytes (the stream's wire format), shared by the reader thread
and the parse worker process."""

from __future__ import annotations

import re

__all__ = ["MAX_EVENT_BYTES", "Oversized", "SseBytesDecoder"]

# Possessive quantifiers and "." (any byte but a newline: the decoder has already turned CR and
# CRLF into LF) let the regex engine run its fastest loop over the ~2 KB data line.
_FAST_MESSAGE = re.compile(rb"id: ([^\n\0]*+)\nevent: (.*+)\ndata: (.*+)\n\n")

MAX_EVENT_BYTES = 64 * 1024 * 1024
_HEAD_BYTES = 4096  # what an oversized message keeps, for its quarantine record
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark: one at the stream's start is ignored
_RESCAN_BYTES = 256 * 1024


class Oversized(bytes):
    """The first bytes of a message larger than the decoder's limit (``size`` in all), given in
    place of its data: the caller quarantines it instead of parsing it."""

    size: int


class SseBytesDecoder:
    """Server-Sent Events framing on bytes: lines end at CRLF, LF or CR, never elsewhere; a
    byte order mark before the first line is ignored.

    Our own small decoder instead of httpx-sse's text decoders (which we use elsewhere): the hot
    path then never decodes the stream to text and back, and the data bytes reach the archive
    exactly as they came. Splitting only on the three SSE line ends keeps raw U+2028 inside data
    (a multi-byte UTF-8 sequence that bytes-level splitting cannot cut). Yields (event name, last
    event id, data) per dispatched message; ``event`` is "message" when the server named none.

    A message still incomplete is kept as a list of chunks and only the new bytes are searched
    for its end, so a long message costs linear time. One larger than ``max_bytes`` (its lines,
    without the blank line that ends it) comes out as ``Oversized`` data, its first bytes, and
    is not held: the rest is read past (a hostile or broken stream cannot grow the reader's
    memory without bound). The limit and the size are the message's, wherever the stream was
    cut into chunks.
    """

    def __init__(self, max_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_bytes
        self._parts: list[bytes] = []  # the incomplete message: no blank line in it
        self._size = 0
        self._skipped: Oversized | None = None  # reading past an oversized message
        self._cr = False  # the previous chunk ended with CR: a LF right after it is the same end
        self._last_id = ""
        self._start: bytes | None = b""  # the first bytes, until a BOM is ruled out

    def feed(self, chunk: bytes) -> list[tuple[str, str, bytes]]:
        if self._start is not None:
            # SSE ignores one byte order mark before the first line (even cut across chunks):
            # read as part of it, the first field's name was not its own.
            chunk = self._start + chunk
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                self._start = chunk
                return []
            self._start = None
            if chunk.startswith(_BOM):
                chunk = chunk[len(_BOM) :]
        if self._cr:
            self._cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                self._cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        out: list[tuple[str, str, bytes]] = []
        if not chunk:
            return out
        if self._parts:
            # The kept bytes hold no blank line. Past a few chunks' worth, look for one only
            # where the new bytes join (a long message then costs linear time); below, the
            # usual case (the start of the next message), one copy and the scan below.
            if self._size > _RESCAN_BYTES:
                joined = self._parts[-1][-1:] == b"\n" and chunk[:1] == b"\n"
                if not joined and chunk.find(b"\n\n") < 0:
                    self._keep(chunk, out)
                    return out
            buf = self._parts[0] + chunk if len(self._parts) == 1 else b"".join(self._parts) + chunk
            self._parts, self._size = [], 0
        else:
            buf = chunk
        if self._skipped is not None:
            end = buf.find(b"\n\n")
            # Less the byte kept from the previous chunk (_keep_tail), counted already: the
            # size is the message's, however the stream was cut into chunks.
            self._skipped.size += (end if end >= 0 else len(buf)) - 1
            if end < 0:
                self._keep_tail(buf)
                return out
            self._flush_skipped(out)
            buf = buf[end + 2 :]
        start = 0
        size = len(buf)
        while start < size:
            # Fast path, scanned in C: the platform's own "id: X\nevent: Y\ndata: Z\n\n".
            m = _FAST_MESSAGE.match(buf, start)
            if m is not None:
                if m.end() - start - 2 > self._max:  # whole in the buffer, and too large
                    self._oversized(buf[start : m.end() - 2], out)
                else:
                    self._last_id = m.group(1).decode("latin-1")
                    out.append((m.group(2).decode("latin-1"), self._last_id, m.group(3)))
                start = m.end()
                continue
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            if end - start > self._max:
                self._oversized(buf[start:end], out)
            else:
                self._dispatch(buf[start:end], out)
            start = end + 2
        if start < size:
            self._keep(buf[start:] if start else buf, out)
        return out

    def _keep(self, data: bytes, out: list[tuple[str, str, bytes]]) -> None:
        """Hold ``data`` (no blank line in it) as part of the incomplete message."""
        if self._skipped is not None:
            self._skipped.size += len(data)
            self._keep_tail(data)
            return
        self._parts.append(data)
        self._size += len(data)
        # Past the limit even if the last byte is the blank line's first (a message exactly at
        # the limit completes in the next chunk, and is measured whole there).
        if self._size > self._max + 1:
            head = b"".join(self._parts)
            self._skipped = Oversized(head[:_HEAD_BYTES])
            self._skipped.size = len(head)
            self._parts, self._size = [], 0
            self._keep_tail(head)

    def _oversized(self, block: bytes, out: list[tuple[str, str, bytes]]) -> None:
        """A message over the limit that arrived whole: the same ``Oversized`` as one read past
        (its size is the message's, wherever the stream was cut)."""
        self._skipped = Oversized(block[:_HEAD_BYTES])
        self._skipped.size = len(block)
        self._flush_skipped(out)

    def _keep_tail(self, data: bytes) -> None:
        # While reading past: only the last byte matters (a blank line across two chunks).
        self._parts, self._size = [data[-1:]], 1

    def _flush_skipped(self, out: list[tuple[str, str, bytes]]) -> None:
        head = self._skipped
        assert head is not None
        self._skipped = None
        # Its name and id from the head's whole lines, read as any message's (this sets the
        # last event id); the data cut short is the head itself.
        fields: list[tuple[str, str, bytes]] = []
        self._dispatch(head[: head.rfind(b"\n") + 1], fields)
        out.append((fields[0][0] if fields else "message", self._last_id, head))

    def _dispatch(self, block: bytes, out: list[tuple[str, str, bytes]]) -> None:
        event = b""
        data: list[bytes] = []
        seen = False
        for line in block.split(b"\n"):
            if not line or line[:1] == b":":
                continue
            name, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data.append(value)
                seen = True
            elif name == b"event":
                event = value
                seen = True
            elif name == b"id" and b"\0" not in value:
                self._last_id = value.decode("latin-1")
        if seen:
            name_text = event.decode("latin-1") if event else "message"
            out.append((name_text, self._last_id, b"\n".join(data)))
