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
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import IO, Any, Protocol

import orjson
import zstandard

from ..errors import MalformedEvent
from ..events import EventId, StreamEvent, archive_line_parts, parse_archive_line
from ..storage import Body, Storage, body_chunks
from .spool import Spool

__all__ = [
    "EncodedSegment",
    "Manifest",
    "encode_segment",
    "iter_manifest_rows",
    "iter_segment_lines",
    "read_manifest",
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
    # The attached files its events name were archived with it (connector/files.py). Written
    # only when true: manifests of archives without files keep their old bytes.
    files: bool = False

    @property
    def first(self) -> EventId:
        return EventId.parse(self.first_event_id)

    @property
    def last(self) -> EventId:
        return EventId.parse(self.last_event_id)

    def to_json(self) -> bytes:
        if self.files:
            return orjson.dumps(self.__dict__)
        return orjson.dumps({k: v for k, v in self.__dict__.items() if k != "files"})

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            obj = orjson.loads(data)
            if obj.get("format") != FORMAT:
                raise MalformedEvent(f"unsupported manifest format {obj.get('format')!r}")
            # Fields a later version adds are ignored: an archive stays readable after a
            # downgrade from then on (versions before this rule reject ``files``).
            m = cls(**{k: v for k, v in obj.items() if k in _FIELDS})
            m.first, m.last  # noqa: B018 - validates both ids
            return m
        except (orjson.JSONDecodeError, TypeError, AttributeError, ValueError) as exc:
            raise MalformedEvent(f"damaged manifest: {exc}") from exc


_FIELDS = frozenset(Manifest.__dataclass_fields__)


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
_ROWS_AT_ONCE = 4096  # manifest rows serialised per orjson call
_OBJECTS = b'"objects":[]'


class EncodedSegment:
    """A segment's compressed body and its manifest, spooled (``Spool``): in memory, or for a
    huge dependency group in scratch files. ``manifest`` is the header alone (no ``objects``
    rows); ``manifest_body()`` is the whole manifest, byte for byte ``Manifest.to_json`` of it
    with its rows. Close it once written."""

    def __init__(self, body: Spool, manifest: Manifest, rows: Spool) -> None:
        self._body = body
        self.manifest = manifest
        self._rows = rows
        self._manifest_body: Spool | None = None

    @property
    def spooled(self) -> bool:
        """Whether the body or the rows went to a scratch file."""
        return self._body.spilled or self._rows.spilled

    def body(self) -> Body:
        return self._body.body()

    def manifest_body(self) -> Body:
        header = self.manifest.to_json()
        at = header.index(_OBJECTS) + len(_OBJECTS) - 1
        rows = self._rows.body()
        if isinstance(rows, bytes):
            return header[:at] + rows + header[at:]
        if self._manifest_body is None:
            out = Spool(self._rows.directory, self._rows.limit, "manifest-")
            out.write(header[:at])
            for chunk in body_chunks(rows):
                out.write(chunk)
            out.write(header[at:])
            self._manifest_body = out
        return self._manifest_body.body()

    def close(self) -> None:
        for spool in (self._body, self._rows, self._manifest_body):
            if spool is not None:
                spool.close()


def encode_segment(
    key: str,
    events: Iterable[StreamEvent],
    *,
    first: EventId,
    last: EventId,
    codec: str,
    level: int,
    after: EventId | None = None,
    spool_dir: Path | None = None,
    spool_bytes: int = 1 << 62,
    files: bool = False,
) -> EncodedSegment:
    """Compress ``events`` into a segment body and describe it in a manifest, in one pass over
    them (a huge group's events are read back from disk for each pass). Past ``spool_bytes``,
    the body and the manifest's rows go to scratch files in ``spool_dir``."""
    # Compressed in slices of ~1 MiB: the whole uncompressed segment never sits in memory.
    comp = _compressor(codec, level)
    body = Spool(spool_dir, spool_bytes, "segment-")
    rows = Spool(spool_dir, spool_bytes, "rows-")
    try:
        sha = hashlib.sha256()
        raw_size = 0
        count = 0
        chunk: list[bytes] = []
        chunk_size = 0
        objects: list[list[Any]] = []
        counts: Counter[str] = Counter()
        merged: list[list[Any]] = []

        def compressed(data: bytes) -> None:
            sha.update(data)
            body.write(data)

        def add_rows() -> None:
            counts.update(map(_event_name, objects))
            if rows.size:
                rows.write(b",")
            rows.write(orjson.dumps(objects)[1:-1])
            objects.clear()

        for ev in events:
            parts = archive_line_parts(ev)
            chunk += parts
            chunk_size += len(parts[0]) + len(parts[1]) + 2
            if chunk_size >= 1 << 20:
                compressed(comp.compress(b"".join(chunk)))
                raw_size += chunk_size
                chunk, chunk_size = [], 0
            objects.append([ev.id_text, ev.event, ev.stix_id, ev.internal_id, ev.version_time])
            if len(objects) >= _ROWS_AT_ONCE:
                add_rows()
            count += 1
            if ev.event == "merge":
                sources = ev.envelope.get("context", {}).get("sources", [])
                merged.append(
                    [ev.id_text, ev.stix_id, [s.get("id") for s in sources if isinstance(s, dict)]]
                )
        compressed(comp.compress(b"".join(chunk)))
        raw_size += chunk_size
        compressed(comp.flush())
        if objects:
            add_rows()
    except BaseException:
        body.close()
        rows.close()
        raise
    manifest = Manifest(
        segment=key,
        codec=codec,
        first_event_id=str(first),
        last_event_id=str(last),
        event_count=count,
        size=body.size,
        raw_size=raw_size,
        sha256=sha.hexdigest(),
        counts=dict(counts),
        objects=[],
        merged=merged,
        after_event_id=str(after) if after is not None else None,
        files=files,
    )
    return EncodedSegment(body, manifest, rows)


def iter_segment_lines(fileobj: IO[bytes], codec: str) -> Iterator[bytes]:
    """Archive lines of a segment, split on ``\\n`` only (data may hold U+2028)."""
    stream = open_decompressed(fileobj, codec)
    for line in stream:
        if line.strip():
            yield line


def iter_segment_events(lines: Iterable[bytes]) -> Iterator[StreamEvent]:
    for line in lines:
        yield parse_archive_line(line)


# A manifest as ``Manifest.to_json`` lays it out: the per-event rows sit between these two, and
# neither can occur inside a JSON string (its quotes are not escaped) nor inside the rows (arrays
# of strings and nulls).
_ROWS_START = b',"objects":['
_ROWS_END = b'],"merged":['
_STR = rb'(?:"(?:[^"\\]++|\\.)*+"|null)'
_ROW = re.compile(rb"\[" + _STR + rb"(?:," + _STR + rb")*+\]")
_READ = 1 << 20


def read_manifest(storage: Storage, key: str) -> Manifest:
    """The manifest at ``key`` without its per-event rows (``objects`` left empty), read as a
    stream: a huge group's manifest (tens of MB of rows) is never held whole. Raises
    ``NotFound`` and ``MalformedEvent`` as ``Manifest.from_json``; damage inside the rows is
    verify's to find (``iter_manifest_rows``)."""
    with storage.open(key) as fh:
        head, rest, found = _until_rows(fh)
        if not found:  # not laid out as written here: parsed whole
            return Manifest.from_json(head + fh.read())
        while (end := rest.find(_ROWS_END)) < 0:
            chunk = fh.read(_READ)
            if not chunk:
                raise MalformedEvent("damaged manifest: its rows never end")
            rest = rest[-(len(_ROWS_END) - 1) :] + chunk
        return Manifest.from_json(head + rest[end:] + fh.read())


def iter_manifest_rows(fileobj: IO[bytes]) -> Iterator[list[Any]]:
    """The per-event rows of a manifest, read as a stream. Raises ``MalformedEvent``."""
    head, rest, found = _until_rows(fileobj)
    if not found:
        yield from Manifest.from_json(head + fileobj.read()).objects
        return
    buf = bytearray(rest)
    pos = 0
    eof = False
    while True:
        if not eof and len(buf) - pos < _READ:
            # A row is far shorter than a read: with this much ahead, none is cut.
            del buf[:pos]
            pos = 0
            chunk = fileobj.read(_READ)
            eof = not chunk
            buf += chunk
        if pos < len(buf) and buf[pos] == ord("]"):
            return
        row = _ROW.match(buf, pos)
        if row is None or row.end() >= len(buf) or buf[row.end()] not in b",]":
            raise MalformedEvent(f"damaged manifest: unreadable row at byte {pos} of its rows")
        yield orjson.loads(row.group())
        pos = row.end() + (buf[row.end()] == ord(","))


def _until_rows(fileobj: IO[bytes]) -> tuple[bytes, bytes, bool]:
    """Read up to the rows: the manifest's bytes up to and with ``"objects":[``, what was read
    after them, and True; or everything read and False for a manifest laid out otherwise."""
    head = b""
    while (at := head.find(_ROWS_START)) < 0:
        chunk = fileobj.read(_READ)
        if not chunk or len(head) > _READ:
            return head + chunk, b"", False
        head += chunk
    cut = at + len(_ROWS_START)
    return head[:cut], head[cut:], True


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
