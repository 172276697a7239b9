"""Server-Sent Events framing on bytes (the stream's wire format), shared by the reader thread
and the parse worker process."""

from __future__ import annotations

import re

__all__ = ["SseBytesDecoder"]

# Possessive quantifiers and "." (any byte but a newline: the decoder has already turned CR and
# CRLF into LF) let the regex engine run its fastest loop over the ~2 KB data line.
_FAST_MESSAGE = re.compile(rb"id: ([^\n\0]*+)\nevent: (.*+)\ndata: (.*+)\n\n")


class SseBytesDecoder:
    """Server-Sent Events framing on bytes: lines end at CRLF, LF or CR, never elsewhere.

    Our own small decoder instead of httpx-sse's text decoders (which we use elsewhere): the hot
    path then never decodes the stream to text and back, and the data bytes reach the archive
    exactly as they came. Splitting only on the three SSE line ends keeps raw U+2028 inside data
    (a multi-byte UTF-8 sequence that bytes-level splitting cannot cut). Yields (event name, last
    event id, data) per dispatched message; ``event`` is "message" when the server named none.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._cr = False  # the previous chunk ended with CR: a LF right after it is the same end
        self._last_id = ""

    def feed(self, chunk: bytes) -> list[tuple[str, str, bytes]]:
        if self._cr:
            self._cr = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                self._cr = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buf = self._buf + chunk if self._buf else chunk
        out: list[tuple[str, str, bytes]] = []
        start = 0
        size = len(buf)
        while start < size:
            # Fast path, scanned in C: the platform's own "id: X\nevent: Y\ndata: Z\n\n".
            m = _FAST_MESSAGE.match(buf, start)
            if m is not None:
                self._last_id = m.group(1).decode("latin-1")
                out.append((m.group(2).decode("latin-1"), self._last_id, m.group(3)))
                start = m.end()
                continue
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            self._dispatch(buf[start:end], out)
            start = end + 2
        self._buf = buf[start:]
        return out

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
