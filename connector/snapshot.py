"""Compacted snapshots: the state of every object as of one archive position.

    snapshots/<as-of-key>/part-<nnnnn>.jsonl.zst        live objects, one JSON line each
    snapshots/<as-of-key>/tombstones-<nnnnn>.jsonl.zst  deleted / merged-away objects
    snapshots/<as-of-key>/state.sqlite.zst              the restore's state database itself
    snapshots/<as-of-key>/manifest.json                 written last: its presence commits

A snapshot is built incrementally: the newest committed one seeds an on-disk ``StateStore``, the
segments committed after it are folded in one at a time, and the result is streamed out of SQLite
part by part. Parts are named by the as-of id and compressed deterministically, so re-running for
the same position writes nothing new. ``state_sha256`` is the sha256 of the lines
``"<key>\\t<event_id>\\n"`` of every live object in key order: two snapshots (or a snapshot and a
replay) of the same history have the same value.

The state image is the scratch database the snapshot was exported from, compressed whole: a
restore (or the next snapshot) whose state schema and row rules are the writer's decompresses it
and opens it, with no Python per object, instead of loading the parts row by row. The parts stay
the portable, documented form and the fallback: an image that is missing, damaged, of another
schema, holding more than the state's tables and indexes, or that does not give the manifest's
position and counts is passed over for them.

A run can be stopped (``stop``, a ``threading.Event``): it is checked before each folded segment,
each written part and the manifest, and a stopped run raises ``SnapshotStopped`` having committed
nothing. Its scratch database ``<work_dir>/snapshot-<uuid>.sqlite`` is deleted whatever happens;
one a killed process left is removed by ``remove_stale_scratch`` (the snapshot job calls it once
it holds the archive's job lock), which spares the scratch files of live runs (they hold an
``flock`` on theirs).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import gzip
import hashlib
import io
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
import zstandard

from .archive import ArchiveReader
from .archive.layout import CODEC_SUFFIX, SNAPSHOTS_PREFIX
from .archive.segment import HashingReader, iter_segment_lines, open_decompressed
from .errors import ConnectorError, MalformedEvent, NotFound, PermanentError, RetryableError
from .events import EventId
from .state import (
    SNAPSHOT_ROWS,
    STATE_SCHEMA,
    ObjectRecord,
    StateStore,
    TombstoneRecord,
    remove_state_files,
)
from .storage import Storage, body_chunks

__all__ = [
    "SNAPSHOTS_PREFIX",
    "STATE_KIND",
    "PartInfo",
    "SnapshotInfo",
    "SnapshotStopped",
    "fold_segments",
    "pruned_before",
    "iter_snapshot_object_lines",
    "iter_snapshot_objects",
    "iter_snapshot_tombstones",
    "list_snapshots",
    "open_state_image",
    "read_snapshot_manifest",
    "ScratchDb",
    "claim_scratch",
    "drop_scratch",
    "remove_stale_scratch",
    "seed_state",
    "snapshot_manifest_key",
    "state_sha256",
    "write_snapshot",
]

log = logging.getLogger(__name__)

FORMAT = 1
_MANIFEST = "manifest.json"
# A part also closes at this many uncompressed bytes, so its in-memory body stays bounded.
_PART_RAW_BYTES = 256 * 1024 * 1024
_SCRATCH_GLOB = "snapshot-*.sqlite*"
STATE_KIND = "state"  # the part that is the state image
_IMAGE_SUFFIX = {"zstd": ".sqlite.zst", "gzip": ".sqlite.gz"}


class SnapshotStopped(ConnectorError):
    """The run was asked to stop (shutdown); nothing was committed."""


def _check_stop(stop: threading.Event | None, where: str) -> None:
    if stop is not None and stop.is_set():
        raise SnapshotStopped(f"snapshot stopped {where}; nothing committed")


@dataclass(frozen=True, slots=True)
class PartInfo:
    key: str
    kind: str  # "objects" | "tombstones" | "state" (count: the objects in it)
    count: int
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """A committed snapshot, as its manifest describes it."""

    as_of: EventId
    based_on: str | None
    last_segment_manifest: str | None
    object_count: int
    tombstone_count: int
    parts: tuple[PartInfo, ...]
    state_sha256: str
    created_at: str
    codec: str = "zstd"
    # ``state.SNAPSHOT_ROWS`` of the writer: the rules its lines' row headers follow.
    rows: int | None = None
    # ``state.STATE_SCHEMA`` of the writer, when a state image is among the parts.
    state_schema: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def state_image(self) -> PartInfo | None:
        """The state image this code can open: written under the same state schema and row
        rules (a database of another layout would be rebuilt empty when opened)."""
        if self.state_schema != STATE_SCHEMA or self.rows != SNAPSHOT_ROWS:
            return None
        images = [p for p in self.parts if p.kind == STATE_KIND]
        return images[0] if len(images) == 1 else None

    @property
    def key(self) -> str:
        return self.as_of.key

    @property
    def manifest_key(self) -> str:
        return snapshot_manifest_key(self.as_of.key)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "format": FORMAT,
                "as_of_event_id": str(self.as_of),
                "based_on": self.based_on,
                "last_segment_manifest": self.last_segment_manifest,
                "object_count": self.object_count,
                "tombstone_count": self.tombstone_count,
                "codec": self.codec,
                "rows": self.rows,
                "state_schema": self.state_schema,
                "parts": [
                    {
                        "key": p.key,
                        "kind": p.kind,
                        "count": p.count,
                        "size": p.size,
                        "sha256": p.sha256,
                    }
                    for p in self.parts
                ],
                "state_sha256": self.state_sha256,
                "created_at": self.created_at,
            },
            option=orjson.OPT_INDENT_2,
        )

    @classmethod
    def from_json(cls, body: bytes) -> SnapshotInfo:
        try:
            obj = orjson.loads(body)
            if obj.get("format") != FORMAT:
                raise MalformedEvent(f"unsupported snapshot format {obj.get('format')!r}")
            parts = tuple(
                PartInfo(
                    str(p["key"]), str(p["kind"]), int(p["count"]), int(p["size"]), str(p["sha256"])
                )
                for p in obj["parts"]
            )
            return cls(
                as_of=EventId.parse(obj["as_of_event_id"]),
                based_on=obj.get("based_on"),
                last_segment_manifest=obj.get("last_segment_manifest"),
                object_count=int(obj["object_count"]),
                tombstone_count=int(obj["tombstone_count"]),
                parts=parts,
                state_sha256=str(obj["state_sha256"]),
                created_at=str(obj.get("created_at", "")),
                codec=str(obj.get("codec", "zstd")),
                rows=obj["rows"] if isinstance(obj.get("rows"), int) else None,
                state_schema=_opt_int(obj.get("state_schema")),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedEvent(f"damaged snapshot manifest: {exc}") from exc


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def snapshot_manifest_key(as_of_key: str) -> str:
    return f"{SNAPSHOTS_PREFIX}{as_of_key}/{_MANIFEST}"


def read_snapshot_manifest(storage: Storage, as_of_key: str) -> SnapshotInfo:
    """The committed snapshot at ``as_of_key`` (raises ``NotFound``, ``PermanentError``)."""
    key = snapshot_manifest_key(as_of_key)
    try:
        return SnapshotInfo.from_json(storage.get(key))
    except MalformedEvent as exc:
        raise PermanentError(f"snapshot manifest {key} is damaged: {exc.reason}") from exc


def list_snapshots(storage: Storage) -> list[SnapshotInfo]:
    """Every committed snapshot, oldest first (snapshots without a manifest are ignored)."""
    out: list[SnapshotInfo] = []
    for key in storage.list(SNAPSHOTS_PREFIX):
        parts = key[len(SNAPSHOTS_PREFIX) :].split("/")
        if len(parts) != 2 or parts[1] != _MANIFEST:
            continue
        try:
            out.append(read_snapshot_manifest(storage, parts[0]))
        except NotFound:
            continue  # removed by retention while we listed
        except PermanentError as exc:
            # Skipped, loudly: the older snapshots (or the segments) still serve (verify
            # reports it as an error).
            log.error("Snapshot manifest unusable; skipped.", extra={"key": key, "error": str(exc)})
    out.sort(key=lambda s: s.as_of)
    return out


class _Checked(HashingReader):
    """An object's body as it is read, hashed on the way: ``check`` reads the rest and compares
    the sha256 with the one its manifest records (a snapshot part, an archive segment)."""

    def __init__(self, fh: IO[bytes], key: str, sha256: str, what: str) -> None:
        super().__init__(fh)
        self.key, self.expected, self.what = key, sha256, what

    def check(self) -> None:
        self.drain()
        if self.sha.hexdigest() != self.expected:
            raise PermanentError(
                f"{self.what} {self.key} is damaged: its sha256 differs from the manifest"
            )


def _part_lines(storage: Storage, part: PartInfo, codec: str) -> Iterator[bytes]:
    """A part's lines; once the last is read, the part's sha256 is checked."""
    with storage.open(part.key) as fh:
        body = _Checked(fh, part.key, part.sha256, "snapshot part")
        try:
            for line in open_decompressed(body, codec):  # type: ignore[arg-type]
                if line.strip():
                    yield line
        except (zstandard.ZstdError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise PermanentError(f"snapshot part {part.key} is damaged: {exc}") from exc
        body.check()


def _iter_part_lines(storage: Storage, part: PartInfo, codec: str) -> Iterator[dict[str, Any]]:
    for line in _part_lines(storage, part, codec):
        try:
            record: dict[str, Any] = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise PermanentError(f"snapshot part {part.key} is damaged: {exc}") from exc
        yield record


def iter_snapshot_object_lines(storage: Storage, info: SnapshotInfo) -> Iterator[bytes]:
    """The snapshot's live objects as their JSON lines, unparsed, part by part, in key order."""
    for part in info.parts:
        if part.kind == "objects":
            yield from _part_lines(storage, part, info.codec)


def _records(storage: Storage, info: SnapshotInfo, kind: str) -> Iterator[tuple[Any, ...]]:
    """The ``kind`` parts' records as tuples of their fields (``ObjectRecord`` / ``TombstoneRecord``
    order). A record that lacks one is a damaged part, reported as such before its sha256 is."""
    fields = ObjectRecord._fields if kind == "objects" else TombstoneRecord._fields
    for part in info.parts:
        if part.kind == kind:
            for r in _iter_part_lines(storage, part, info.codec):
                try:
                    yield tuple(r[name] for name in fields)
                except (KeyError, TypeError) as exc:
                    raise PermanentError(
                        f"snapshot part {part.key} is damaged: a record lacks {exc}"
                    ) from exc


def iter_snapshot_objects(storage: Storage, info: SnapshotInfo) -> Iterator[ObjectRecord]:
    """The snapshot's live objects, streamed part by part, in key order."""
    return (ObjectRecord(*r) for r in _records(storage, info, "objects"))


def iter_snapshot_tombstones(storage: Storage, info: SnapshotInfo) -> Iterator[TombstoneRecord]:
    return (TombstoneRecord(*r) for r in _records(storage, info, "tombstones"))


def seed_state(
    db_path: Path, storage: Storage, candidates: list[SnapshotInfo]
) -> tuple[StateStore, SnapshotInfo | None]:
    """A scratch state at ``db_path``, seeded from the newest of ``candidates`` that loads.

    A damaged or incomplete snapshot is logged and skipped for the one before it (or none: the
    caller folds the segments from the start). A restore is when an operator can least afford to
    stop, and a damaged newest snapshot must not stop every later snapshot from being written.
    """
    state: StateStore | None = StateStore(db_path, scratch=True)
    try:
        for info in reversed(candidates):
            assert state is not None
            image = info.state_image
            if image is not None:
                state.close()
                state = None
                try:
                    state = open_state_image(db_path, storage, info, image)
                    return state, info
                except PermanentError as exc:
                    log.warning(
                        "Snapshot state image unusable, loading the snapshot's parts instead.",
                        extra={"snapshot": info.key, "error": str(exc)},
                    )
                state = _emptied(db_path)
            try:
                state.load_snapshot(storage, info.key)
            except PermanentError as exc:
                log.error(
                    "Snapshot unusable, trying an older one.",
                    extra={"snapshot": info.key, "error": str(exc)},
                )
                state.close()  # a failed load discards a scratch store: start a new one
                state = None
                state = _emptied(db_path)
                continue
            return state, info
    except BaseException:
        if state is not None:
            state.close()
        raise
    assert state is not None
    return state, None


def _write_scratch(out: IO[bytes], chunk: bytes, path: Path) -> None:
    """A write into the work dir, whose failure (a full disk) says so, as a database's does."""
    try:
        out.write(chunk)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"the work dir's database failed ({exc.strerror}): check free space and "
            "permissions of OPENCTI_SYNC_WORK_DIR / --work-dir",
            str(path),
        ) from exc


def _emptied(db_path: Path) -> StateStore:
    """A new scratch store at ``db_path``, emptied in place, not unlinked: a snapshot run holds
    an flock on this inode (remove_stale_scratch spares files a live run holds)."""
    if db_path.exists():
        os.truncate(db_path, 0)
    return StateStore(db_path, scratch=True)


def open_state_image(
    db_path: Path, storage: Storage, info: SnapshotInfo, image: PartInfo
) -> StateStore:
    """The scratch state at ``db_path`` (no store open on it; replaced in place, so that a
    claim's flock on it holds) made from the snapshot's state image: decompressed into it as it
    is read, its sha256 checked, then opened and checked against the manifest (position,
    counts). Raises ``PermanentError`` when it cannot serve; the file is then whatever was
    written."""
    try:
        with storage.open(image.key) as fh, open(db_path, "wb") as out:
            body = _Checked(fh, image.key, image.sha256, "snapshot state image")
            src = open_decompressed(body, info.codec)  # type: ignore[arg-type]
            while chunk := src.read(1 << 20):
                _write_scratch(out, chunk, db_path)
            body.check()
    except NotFound as exc:
        raise PermanentError(f"snapshot state image {image.key} is missing") from exc
    except (zstandard.ZstdError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise PermanentError(f"snapshot state image {image.key} is damaged: {exc}") from exc
    state: StateStore | None = None
    try:
        state = StateStore(db_path, scratch=True)
        foreign = state.foreign_schema()
        if foreign:
            raise PermanentError(
                f"snapshot state image {image.key} holds more than a state: {foreign[:3]}"
            )
        counts = state.counts()
        if (
            state.as_of != info.as_of
            or counts["objects"] != info.object_count
            or counts["tombstones"] != info.tombstone_count
        ):
            raise PermanentError(
                f"snapshot state image {image.key} holds {counts['objects']} objects and "
                f"{counts['tombstones']} tombstones as of {state.as_of}, not the manifest's"
            )
    except BaseException as exc:
        if state is not None:
            with contextlib.suppress(Exception):
                state.close()
        if isinstance(exc, (sqlite3.DatabaseError, ValueError)):
            raise PermanentError(f"snapshot state image {image.key} does not open: {exc}") from exc
        raise
    # The filter is filled by the first fold that needs it (see StateStore.load_lines).
    state.defer_filter(info.object_count // 8)
    return state


def state_sha256(state: StateStore) -> str:
    digest = hashlib.sha256()
    for key, event_id in state.key_event_pairs():
        digest.update(f"{key}\t{event_id}\n".encode())
    return digest.hexdigest()


def pruned_before(reader: ArchiveReader) -> str | None:
    """The oldest segment when it continues one that is gone (retention pruned what came
    before it: only a snapshot holds that history); None when the archive starts at its origin."""
    for ref in reader.manifests():
        return ref.manifest.segment if ref.manifest.after_event_id is not None else None
    return None


def fold_segments(
    state: StateStore,
    reader: ArchiveReader,
    *,
    start_after: str | None,
    until: EventId | None = None,
    stop: threading.Event | None = None,
    allow_gaps: bool = False,
) -> tuple[int, int, str | None]:
    """Apply committed segments after manifest key ``start_after`` (group ids ``<= until``).

    Each segment is one transaction; events whose group id the state already holds are skipped,
    so overlapping segments and a seed snapshot combine without double application. Returns
    (segments folded, events applied, last folded manifest key). ``stop`` set: raises
    ``SnapshotStopped`` before the next segment.

    Each segment's sha256 is checked against its manifest as it is read, and a segment that
    continues from a position no earlier segment reached (a lost segment or manifest) is a gap:
    both raise ``PermanentError`` (``allow_gaps``: a gap is only logged), so neither a restore nor
    a snapshot is silently built from damaged or incomplete history.
    """
    segments = events = 0
    last_key: str | None = None
    for ref in reader.manifests(start_after=start_after):
        m = ref.manifest  # read without its per-event rows (tens of MB per 50k events)
        done = state.as_of
        if done is not None and m.last <= done:
            continue
        if until is not None and m.first > until:
            break
        if (
            done is not None
            and m.after_event_id is not None
            and EventId.parse(m.after_event_id) > done
        ):
            if not allow_gaps:
                raise PermanentError(
                    f"archive gap before {m.segment}: it continues from {m.after_event_id}, which "
                    f"no segment reaches (the state is at {done}); `opencti-sync verify` shows "
                    "what is missing"
                )
            log.warning(
                "Archive gap: a segment continues from a position the state never reached.",
                extra={"segment": m.segment, "after": m.after_event_id, "state": str(done)},
            )
        _check_stop(stop, "while folding segments")
        # Lines straight into the state: one parse per line, no StreamEvent per event.
        try:
            fh = reader.storage.open(m.segment)
        except NotFound:
            raise PermanentError(
                f"archive segment {m.segment} is missing (its manifest {ref.manifest_key} is "
                "there); `opencti-sync verify` shows what else is"
            ) from None
        with fh:
            body = _Checked(fh, m.segment, m.sha256, "archive segment")
            try:
                events += state.fold_lines(
                    iter_segment_lines(body, m.codec),  # type: ignore[arg-type]
                    first=m.first,
                    done=done,
                    until=until,
                )
            except (
                MalformedEvent,
                zstandard.ZstdError,
                gzip.BadGzipFile,
                EOFError,
                zlib.error,
            ) as exc:
                body.check()  # changed bytes say so first
                raise PermanentError(f"archive segment {m.segment} cannot be read: {exc}") from exc
            body.check()
        segments += 1
        if until is not None and m.last > until:
            break  # a partial segment is never recorded as folded
        if state.as_of != m.last:
            # The segment's bytes match its manifest's sha256, but not its end: a damaged
            # last_event_id would move the state past the segments after it, skipped unseen.
            raise PermanentError(
                f"archive manifest {ref.manifest_key} is damaged: it says its segment ends at "
                f"{m.last_event_id}, its events end at {state.as_of}; `opencti-sync verify` "
                "shows what else is"
            )
        state.advance(m.last)
        last_key = ref.manifest_key
    return segments, events, last_key


class _PartWriter:
    """Compresses JSON lines into bounded parts (deterministic bytes for the same lines).

    Lines are compressed as they are added: a part holds only its compressed body (about a
    fifth of the lines) until it is stored.
    """

    def __init__(
        self,
        storage: Storage,
        prefix: str,
        kind: str,
        codec: str,
        level: int,
        limit: int,
        stop: threading.Event | None = None,
        guard: Callable[[], None] | None = None,
    ) -> None:
        self.storage, self.prefix, self.kind = storage, prefix, kind
        self.codec, self.level, self.limit = codec, level, limit
        self.stop = stop
        self.guard = guard  # before each write: raises unless the job still holds its lock
        self.parts: list[PartInfo] = []
        self.total = 0
        self._count = 0
        self._raw = 0
        self._body = io.BytesIO()
        self._sink: Any = None  # zstd compressobj or gzip file, open while the part has lines

    def add(self, line: bytes) -> None:
        if self._sink is None:
            self._body = io.BytesIO()
            if self.codec == "zstd":
                self._sink = zstandard.ZstdCompressor(level=self.level).compressobj()
            else:
                self._sink = gzip.GzipFile(
                    fileobj=self._body, mode="wb", compresslevel=self.level, mtime=0
                )
        if self.codec == "zstd":
            self._body.write(self._sink.compress(line))
        else:
            self._sink.write(line)
        self._count += 1
        self._raw += len(line)
        if self._count >= self.limit or self._raw >= _PART_RAW_BYTES:
            self.flush()

    def flush(self) -> None:
        if self._sink is None:
            return
        _check_stop(self.stop, "while writing parts")
        if self.codec == "zstd":
            self._body.write(self._sink.flush())
        else:
            self._sink.close()
        body = self._body.getvalue()
        self._sink, self._body = None, io.BytesIO()
        name = "part" if self.kind == "objects" else "tombstones"
        key = f"{self.prefix}{name}-{len(self.parts):05d}{CODEC_SUFFIX[self.codec]}"
        digest = hashlib.sha256(body).hexdigest()
        if self.guard is not None:
            self.guard()
        if not self.storage.put_if_absent(key, body):
            # Left by an attempt that crashed before its manifest: replace it if it differs.
            if hashlib.sha256(self.storage.get(key)).hexdigest() != digest:
                _uncommitted(self.storage, self.prefix)
                self.storage.put(key, body)
        self.parts.append(PartInfo(key, self.kind, self._count, len(body), digest))
        self.total += self._count
        self._count, self._raw = 0, 0


def _export(
    state: StateStore,
    storage: Storage,
    *,
    based_on: str | None,
    last_segment_manifest: str | None,
    codec: str,
    level: int,
    part_objects: int,
    stop: threading.Event | None = None,
    before_commit: Callable[[], None] | None = None,
    state_image: bool = True,
    guard: Callable[[], None] | None = None,
) -> SnapshotInfo:
    if state.as_of is None:
        raise PermanentError("cannot snapshot an empty state")
    prefix = f"{SNAPSHOTS_PREFIX}{state.as_of.key}/"
    objects = _PartWriter(storage, prefix, "objects", codec, level, part_objects, stop, guard)
    digest = hashlib.sha256()
    for row, aliases in state.snapshot_rows():
        key, stix_id, event_id, event, iid, stype, phase, version, refs, blob = row
        digest.update(f"{key}\t{event_id}\n".encode())
        # The header first (state.SNAPSHOT_ROWS): a restore parses only that. The stored JSON
        # goes in as it is (a Fragment): no parse and re-serialisation.
        record: dict[str, Any] = {"key": key, "stix_id": stix_id, "event_id": event_id}
        record["event"], record["iid"], record["type"], record["phase"] = event, iid, stype, phase
        record["version"], record["refs"] = version, orjson.Fragment(refs)
        record["aliases"], record["data"] = aliases, orjson.Fragment(blob)
        objects.add(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
    objects.flush()
    tombs = _PartWriter(storage, prefix, "tombstones", codec, level, part_objects, stop, guard)
    for t in state.tombstones():
        tombs.add(
            orjson.dumps(
                {
                    "key": t.key,
                    "stix_id": t.stix_id,
                    "event_id": t.event_id,
                    "reason": t.reason,
                    "into": t.into,
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
        )
    tombs.flush()
    parts = objects.parts + tombs.parts
    if state_image:
        parts.append(
            _write_state_image(state, storage, prefix, codec, level, objects.total, stop, guard)
        )
    info = SnapshotInfo(
        as_of=state.as_of,
        based_on=based_on,
        last_segment_manifest=last_segment_manifest,
        object_count=objects.total,
        tombstone_count=tombs.total,
        parts=tuple(parts),
        state_sha256=digest.hexdigest(),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        codec=codec,
        rows=SNAPSHOT_ROWS,
        state_schema=STATE_SCHEMA if state_image else None,
    )
    # The manifest commits the snapshot: written last, never replaced.
    _check_stop(stop, "before its manifest")
    if before_commit is not None:
        before_commit()
    storage.put_if_absent(info.manifest_key, info.to_json())
    return info


def _uncommitted(storage: Storage, prefix: str) -> None:
    """Before replacing what an earlier attempt left under ``prefix``: a committed snapshot's
    objects are never replaced (this job lost its lock, and another process committed)."""
    if storage.exists(f"{prefix}manifest.json"):
        raise RetryableError(f"snapshot {prefix} was committed by another process meanwhile")


def _write_state_image(
    state: StateStore,
    storage: Storage,
    prefix: str,
    codec: str,
    level: int,
    objects: int,
    stop: threading.Event | None,
    guard: Callable[[], None] | None = None,
) -> PartInfo:
    """The state's database file, compressed whole into a scratch file beside it, then stored.
    A scratch store has no journal: once settled, every committed page is in the file."""
    _check_stop(stop, "before its state image")
    state.settle()
    key = f"{prefix}state{_IMAGE_SUFFIX[codec]}"
    with tempfile.TemporaryFile(dir=state.path.parent) as spool:
        with open(state.path, "rb") as db:
            if codec == "zstd":
                zstandard.ZstdCompressor(level=level).copy_stream(db, spool)
            else:
                with gzip.GzipFile(fileobj=spool, mode="wb", compresslevel=level, mtime=0) as gz:
                    shutil.copyfileobj(db, gz, 1 << 20)
        digest = hashlib.sha256()
        for chunk in body_chunks(spool):
            digest.update(chunk)
        size = spool.tell()
        _check_stop(stop, "while writing its state image")
        if guard is not None:
            guard()
        if not storage.put_if_absent(key, spool):
            # Left by an attempt killed before its manifest (an image's bytes depend on how
            # the database was built, so it is not compared): this one replaces it.
            _uncommitted(storage, prefix)
            storage.delete(key)
            if not storage.put_if_absent(key, spool):
                raise RetryableError(f"snapshot state image {key} was written meanwhile")
    return PartInfo(key, STATE_KIND, objects, size, digest.hexdigest())


def write_snapshot(
    storage: Storage,
    *,
    work_dir: Path,
    codec: str = "zstd",
    level: int = 3,
    part_objects: int = 50_000,
    stop: threading.Event | None = None,
    before_commit: Callable[[], None] | None = None,
    state_image: bool = True,
    guard: Callable[[], None] | None = None,
) -> SnapshotInfo | None:
    """Snapshot the archive's latest committed position; None when nothing is new.

    Seeds from the newest committed snapshot and folds only the segments after it. ``stop``
    set: raises ``SnapshotStopped`` at the next segment or part, before the manifest.
    ``before_commit``: called just before the manifest is written; what it raises leaves the
    snapshot uncommitted (the job checks that it still holds the archive lock).
    ``state_image``: store the state database itself too (``snapshot.state_image``).
    ``guard``: called before each part and the image is written; what it raises stops the
    snapshot there (the job's check that its lock is still its own, renewed when due).
    """
    if codec not in CODEC_SUFFIX:
        raise PermanentError(f"unknown snapshot codec {codec!r}")
    if part_objects < 1:
        raise PermanentError("part_objects must be positive")
    _check_stop(stop, "before it started")
    work_dir.mkdir(parents=True, exist_ok=True)
    db_path = work_dir / f"snapshot-{uuid.uuid4().hex}.sqlite"
    # Held until the file is gone: remove_stale_scratch spares a file a live run holds.
    claim = claim_scratch(db_path)
    try:
        # Deleted below, whatever happens.
        state, base = seed_state(db_path, storage, list_snapshots(storage))
    except BaseException:
        drop_scratch(db_path, claim)
        raise
    try:
        _check_stop(stop, "after loading its base")
        pruned = pruned_before(ArchiveReader(storage)) if base is None else None
        if pruned is not None:
            # A snapshot of the segments alone would lack every object of the pruned history,
            # and retention would then take it for a base and delete what is left of it.
            raise PermanentError(
                "no usable snapshot covers the history pruned before "
                f"{pruned}: not writing one without it (opencti-sync verify shows what is damaged)"
            )
        segments, events, last_key = fold_segments(
            state,
            ArchiveReader(storage),
            start_after=base.last_segment_manifest if base else None,
            stop=stop,
        )
        if segments == 0 or state.as_of is None or (base is not None and state.as_of <= base.as_of):
            return None
        if storage.exists(snapshot_manifest_key(state.as_of.key)):
            return None  # committed by a concurrent run
        info = _export(
            state,
            storage,
            based_on=str(base.as_of) if base else None,
            last_segment_manifest=last_key,
            codec=codec,
            level=level,
            part_objects=part_objects,
            stop=stop,
            before_commit=before_commit,
            state_image=state_image,
            guard=guard,
        )
        log.info(
            "Snapshot written.",
            extra={
                "as_of": str(info.as_of),
                "segments": segments,
                "events": events,
                "objects": info.object_count,
                "tombstones": info.tombstone_count,
            },
        )
        return info
    finally:
        try:
            state.close()
        finally:
            drop_scratch(db_path, claim)


def claim_scratch(db_path: Path) -> int:
    """Create the (empty) scratch database file and hold an exclusive ``flock`` on it. SQLite's
    own locks are ``fcntl`` locks, which ``flock`` does not touch; this descriptor is closed only
    after SQLite closed the database (closing a descriptor drops the process's ``fcntl`` locks
    on the file)."""
    fd = os.open(db_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        db_path.unlink(missing_ok=True)
        raise
    return fd


def drop_scratch(db_path: Path, claim: int) -> None:
    try:
        remove_state_files(db_path)
    finally:
        os.close(claim)


class ScratchDb:
    """A command's work database in its work dir (verify's index, a comparison's listing, a
    count): no journal and no syncs, held (``claim_scratch``) while open and deleted when
    closed; ``remove_stale_scratch`` deletes it if the process is killed."""

    def __init__(self, path: Path, schema: str) -> None:
        self.path = path
        self._claim = claim_scratch(path)
        try:
            self.db = sqlite3.connect(path)
            self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + schema)
        except BaseException:
            drop_scratch(path, self._claim)
            raise

    def close(self) -> None:
        self.db.close()
        drop_scratch(self.path, self._claim)

    def __enter__(self) -> ScratchDb:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_stale_scratch(work_dir: Path, pattern: str = _SCRATCH_GLOB) -> list[str]:
    """Delete the scratch databases (and their side files) of runs that died (killed, out of
    memory, power loss) in ``work_dir``: snapshot runs', or those ``pattern`` names (verify's);
    returns their names. A file a live run holds (its ``flock``, ``claim_scratch``) is left
    alone, so two processes sharing a work dir do not hurt each other."""
    removed: list[str] = []
    try:
        candidates = sorted(work_dir.glob(pattern))
    except OSError:
        return removed
    for path in candidates:
        base = path.name.split(".sqlite", 1)[0]
        db = path.with_name(f"{base}.sqlite")
        try:
            fd = os.open(db, os.O_RDONLY)
        except FileNotFoundError:
            fd = None  # a side file whose database is gone
        except OSError as exc:
            log.warning("Scratch file not inspected.", extra={"path": str(path), "error": str(exc)})
            continue
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run's
            try:
                path.unlink()
                removed.append(path.name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning(
                    "Stale scratch file not removed.", extra={"path": str(path), "error": str(exc)}
                )
        finally:
            if fd is not None:
                os.close(fd)
    if removed:
        log.info("Removed scratch files of dead runs.", extra={"files": removed})
    return removed
