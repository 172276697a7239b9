"""Segment bodies (compressed JSON Lines) and their manifests.

A segment is consecutive whole dependency groups of the stream, one archive line per event:
``{"id": "<sse id>", "event": "<sse event name>", "data": <data object exactly as received>}``.
Compression is deterministic (gzip with mtime 0, zstd without a timestamp) so that the same batch
always gives the same bytes and the same sha256.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import IO, Any, Protocol

import orjson
import zstandard

from ..errors import MalformedEvent
from ..events import EventId, StreamEvent, archive_line_parts, parse_archive_line

__all__ = [
    "Manifest",
    "encode_segment",
    "iter_segment_lines",
    "iter_segment_events",
    "compress",
    "open_decompressed",
]

FORMAT = 1


@dataclass
class Manifest:
    segment: str
    codec: str
    first_event_id: str
    last_event_id: str
    event_count: int
    size: int
    raw_size: int
    sha256: str
    counts: dict[str, int] = field(default_factory=dict)
    # One row per event: [event id, event name, STIX id, internal id, version time].
    objects: list[list[str]] = field(default_factory=list)
    # One row per merge: [event id, target STIX id, [source STIX ids]].
    merged: list[list[Any]] = field(default_factory=list)
    # The previous segment's last group id: consecutive manifests chain through it.
    after_event_id: str | None = None
    format: int = FORMAT

    @property
    def first(self) -> EventId:
        return EventId.parse(self.first_event_id)

    @property
    def last(self) -> EventId:
        return EventId.parse(self.last_event_id)

    def to_json(self) -> bytes:
        return orjson.dumps(self.__dict__)

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            obj = orjson.loads(data)
            if obj.get("format") != FORMAT:
                raise MalformedEvent(f"unsupported manifest format {obj.get('format')!r}")
            m = cls(**obj)
            m.first, m.last  # noqa: B018 - validates both ids
            return m
        except (orjson.JSONDecodeError, TypeError, AttributeError, ValueError) as exc:
            raise MalformedEvent(f"damaged manifest: {exc}") from exc


class _Compressor(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


def _compressor(codec: str, level: int) -> _Compressor:
    """A streaming compressor: deterministic output (no timestamps) for the same input."""
    if codec == "zstd":
        return zstandard.ZstdCompressor(level=level).compressobj()
    # wbits 31: a gzip member whose header carries mtime 0, readable by gzip.GzipFile.
    return zlib.compressobj(level, zlib.DEFLATED, 31)


def compress(raw: bytes, codec: str, level: int) -> bytes:
    comp = _compressor(codec, level)
    return comp.compress(raw) + comp.flush()


def open_decompressed(fileobj: IO[bytes], codec: str) -> IO[bytes]:
    """A streaming line-readable view of a compressed segment."""
    if codec == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(fileobj, read_across_frames=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return gzip.GzipFile(fileobj=fileobj, mode="rb")  # type: ignore[return-value]


_event_name = itemgetter(1)  # of a manifest's objects row


def encode_segment(
    key: str,
    events: Sequence[StreamEvent],
    *,
    first: EventId,
    last: EventId,
    codec: str,
    level: int,
    after: EventId | None = None,
) -> tuple[bytes, Manifest]:
    """Compress ``events`` into a segment body and describe it in a manifest, in one pass over
    them (a huge group's events are read back from disk for each pass)."""
    # Compressed in slices of ~1 MiB: the whole uncompressed segment never sits in memory.
    comp = _compressor(codec, level)
    out = bytearray()
    raw_size = 0
    chunk: list[bytes] = []
    chunk_size = 0
    objects: list[list[Any]] = []
    merged: list[list[Any]] = []
    for ev in events:
        parts = archive_line_parts(ev)
        chunk += parts
        chunk_size += len(parts[0]) + len(parts[1]) + 2
        if chunk_size >= 1 << 20:
            out += comp.compress(b"".join(chunk))
            raw_size += chunk_size
            chunk, chunk_size = [], 0
        objects.append([ev.id_text, ev.event, ev.stix_id, ev.internal_id, ev.version_time])
        if ev.event == "merge":
            sources = ev.envelope.get("context", {}).get("sources", [])
            merged.append(
                [ev.id_text, ev.stix_id, [s.get("id") for s in sources if isinstance(s, dict)]]
            )
    out += comp.compress(b"".join(chunk))
    raw_size += chunk_size
    out += comp.flush()
    body = bytes(out)
    del out
    counts = Counter(map(_event_name, objects))
    manifest = Manifest(
        segment=key,
        codec=codec,
        first_event_id=str(first),
        last_event_id=str(last),
        event_count=len(events),
        size=len(body),
        raw_size=raw_size,
        sha256=hashlib.sha256(body).hexdigest(),
        counts=dict(counts),
        objects=objects,
        merged=merged,
        after_event_id=str(after) if after is not None else None,
    )
    return body, manifest


def iter_segment_lines(fileobj: IO[bytes], codec: str) -> Iterator[bytes]:
    """Archive lines of a segment, split on ``\\n`` only (data may hold U+2028)."""
    stream = open_decompressed(fileobj, codec)
    for line in stream:
        if line.strip():
            yield line


def iter_segment_events(lines: Iterable[bytes]) -> Iterator[StreamEvent]:
    for line in lines:
        yield parse_archive_line(line)


class HashingReader(io.RawIOBase):
    """Hashes and counts every byte read through it, so one read both decodes and checks an
    object against its manifest (verify, a restore's fold, a snapshot load, retention)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.sha = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha.update(data)
        self.size += n
        return n

    def drain(self) -> None:
        """Read (and hash) whatever the reader did not."""
        while self.readinto(bytearray(1 << 20)):
            pass
