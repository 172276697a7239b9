"""A huge dependency group's segment is built in scratch files, and its manifest read as a stream.

Segments rotate at ARCHIVE_MAX_BYTES, but a dependency group is never split: a popular entity's
relationships, sent whole after a reconnect, make one segment of hundreds of thousands of events.
Its compressed body and its manifest's per-event rows then go to scratch files in the work dir
(past CONNECTOR_SPILL_BYTES), the storage reads them from there, and the archive's readers skip
or stream the rows. The bytes stored are the same either way.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import tracemalloc
import uuid
from pathlib import Path

import orjson
import pytest

from connector.archive import ArchiveReader, ArchiveSink
from connector.archive.layout import manifest_key, segment_key
from connector.archive.segment import (
    _READ,
    Manifest,
    compress,
    encode_segment,
    iter_manifest_rows,
    iter_segment_lines,
    open_decompressed,
    read_manifest,
)
from connector.errors import MalformedEvent, PermanentError
from connector.events import OCTI_EXT, EventId, StreamEvent
from connector.pending import PendingEvents
from connector.restore import materialise
from connector.sink import Batch
from connector.storage.local import LocalStorage
from connector.verify import verify_archive
from tests.support.handfed import at, malware

GROUP = EventId(1_800_000_000_000, 0)


def _event(i: int, name: str = "create") -> StreamEvent:
    """Event ``i`` of one dependency group (they all carry the group's id)."""
    stix = f"indicator--{uuid.UUID(int=i)}"
    data: dict[str, object] = {
        "id": stix,
        "type": "indicator",
        "spec_version": "2.1",
        "modified": "2026-01-01T00:00:00.000Z",
        "description": f"indicator {i} " + "x" * 200,
        "extensions": {OCTI_EXT: {"id": str(uuid.UUID(int=i + 1))}},
    }
    envelope: dict[str, object] = {"data": data, "message": "m", "version": "4"}
    if name == "merge":
        envelope["context"] = {"sources": [{"id": f"indicator--{uuid.UUID(int=i + 10**9)}"}]}
    return StreamEvent(GROUP, str(GROUP), name, orjson.dumps(envelope))


def _events(n: int) -> list[StreamEvent]:
    return [_event(i, "merge" if i % 97 == 5 else "create") for i in range(n)]


def _rows(events: list[StreamEvent]) -> list[list[object]]:
    return [[e.id_text, e.event, e.stix_id, e.internal_id, e.version_time] for e in events]


def _bytes(body: object) -> bytes:
    if isinstance(body, bytes):
        return body
    assert isinstance(body, io.IOBase | object) and hasattr(body, "read")
    body.seek(0)  # type: ignore[attr-defined]
    return body.read()  # type: ignore[attr-defined,no-any-return]


def test_a_spooled_segment_is_the_segment_built_in_memory(tmp_path: Path) -> None:
    events = _events(3000)
    common = {"first": GROUP, "last": GROUP, "codec": "zstd", "level": 3, "after": None}
    held = encode_segment("events/k.zst", events, **common)  # type: ignore[arg-type]
    spooled = encode_segment(
        "events/k.zst",
        iter(events),  # a stream of events, read once (a spilled group read back)
        spool_dir=tmp_path,
        spool_bytes=4096,
        **common,  # type: ignore[arg-type]
    )
    try:
        assert isinstance(held.body(), bytes) and isinstance(held.manifest_body(), bytes)
        assert not isinstance(spooled.body(), bytes)  # it did leave memory
        assert not isinstance(spooled.manifest_body(), bytes)
        assert _bytes(spooled.body()) == held.body()
        assert _bytes(spooled.manifest_body()) == held.manifest_body()
        # The manifest the archive format describes, its rows and counts included.
        manifest = Manifest.from_json(_bytes(held.manifest_body()))
        assert manifest.to_json() == held.manifest_body()
        raw = open_decompressed(io.BytesIO(held.body()), "zstd").read()
        assert manifest.raw_size == len(raw) > 1 << 20  # compressed in more than one slice
    finally:
        held.close()
        spooled.close()
    assert manifest.objects == _rows(events)
    assert manifest.event_count == 3000 and manifest.counts == {"create": 2969, "merge": 31}
    assert len(manifest.merged) == 31
    assert list(tmp_path.iterdir()) == []  # scratch files unlinked


def _manifest(rows: list[list[object]]) -> Manifest:
    return Manifest(
        segment="events/2026/01/01/1800000000000-0.jsonl.zst",
        codec="zstd",
        first_event_id=str(GROUP),
        last_event_id=str(GROUP),
        event_count=len(rows),
        size=1,
        raw_size=1,
        sha256="0" * 64,
        counts={"create": len(rows)},
        objects=rows,
        merged=[["1-0", "a", ["b"]]],
        after_event_id="1-0",
    )


# Strings that look like the manifest's own structure must not cut its rows.
TRICKY = ['x"],"merged":[', '],"merged":[', "a\\", 'q\\"],[', "\u2028 é", None]


@pytest.mark.parametrize("count", [0, 1, 40_000])  # 40k rows: about 6 MB, several reads
def test_manifest_rows_are_skipped_or_streamed(tmp_path: Path, count: int) -> None:
    storage = LocalStorage(tmp_path)
    rows = [[f"{i}-0", "create", f"x--{i}", TRICKY[i % len(TRICKY)], None] for i in range(count)]
    whole = _manifest(rows)
    storage.put_if_absent("manifests/m.json", whole.to_json())
    header = read_manifest(storage, "manifests/m.json")
    assert header.objects == []
    header.objects = rows
    assert header == whole
    with storage.open("manifests/m.json") as fh:
        assert list(iter_manifest_rows(fh)) == rows


def test_a_manifest_laid_out_otherwise_is_parsed_whole(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    whole = _manifest([["1-0", "create", "x--1", "i", None]])
    fields = dict(reversed(list(whole.__dict__.items())))  # another key order
    storage.put_if_absent("manifests/m.json", orjson.dumps(fields, option=orjson.OPT_INDENT_2))
    header = read_manifest(storage, "manifests/m.json")
    assert header.event_count == 1 and header.after_event_id == "1-0"
    with storage.open("manifests/m.json") as fh:
        assert list(iter_manifest_rows(fh)) == whole.objects


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b.replace(b'["7-0"', b'["7-0', 1),  # a row cut open
        lambda b: b.replace(b'],["9-0"', b']x["9-0"', 1),  # garbage between rows
        lambda b: b[: b.index(b'["11-0"') + 5],  # truncated inside the rows
    ],
)
def test_damaged_rows_are_reported(tmp_path: Path, damage: object) -> None:
    storage = LocalStorage(tmp_path)
    rows: list[list[object]] = [[f"{i}-0", "create", f"x--{i}", "i", None] for i in range(20)]
    storage.put_if_absent("manifests/m.json", damage(_manifest(rows).to_json()))  # type: ignore[operator]
    with storage.open("manifests/m.json") as fh, pytest.raises(MalformedEvent):
        list(iter_manifest_rows(fh))


def test_verify_reports_a_manifest_damaged_inside_its_rows(tmp_path: Path) -> None:
    """Readers skip the rows; verify reads them, and finds them damaged or wrong."""
    storage = LocalStorage(tmp_path / "a")
    events = _events(50)
    ArchiveSink(storage).write(Batch(first_id=GROUP, last_id=GROUP, events=events))
    assert verify_archive(storage, work_dir=tmp_path / "w").ok
    key = manifest_key(GROUP)
    path = tmp_path / "a" / key
    good = path.read_bytes()
    path.write_bytes(good.replace(b'"create","indicator', b'"create",indicator', 1))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert any(f"manifest {key} is damaged" in e for e in report.errors), report.errors
    assert read_manifest(storage, key).event_count == 50  # a restore still reads it
    wrong_id = good.replace(b'[["1800000000000-0"', b'[["1800000000000-1"', 1)
    path.write_bytes(wrong_id)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert any("manifest row says 1800000000000-1" in e for e in report.errors), report.errors


def test_a_huge_group_is_written_without_holding_its_segment(tmp_path: Path) -> None:
    """The events wait on disk (the pipeline's spill), the segment and its manifest are built in
    scratch files: writing a 30,000-event group allocates about 5 MB (the same for 60,000), where
    building both in memory took 18 MB (a 4.4 MB manifest and its rows as lists)."""
    pending = PendingEvents(tmp_path / "work", spill_bytes=65536)
    for i in range(30_000):
        pending.append(_event(i))
    batch = Batch(first_id=GROUP, last_id=GROUP, events=pending.head(len(pending)))
    storage = LocalStorage(tmp_path / "a")
    sink = ArchiveSink(storage, spool_dir=tmp_path / "work", spool_bytes=65536)
    tracemalloc.start()
    try:
        sink.write(batch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pending.close()
    assert sink.last.events == 30_000
    manifest_size = storage.size(manifest_key(GROUP))
    assert manifest_size > 4_000_000  # the rows, serialised
    assert peak < 8_000_000, f"peak {peak:,} bytes while writing"
    # What was stored reads back whole.
    ref = next(ArchiveReader(storage).manifests(rows=True))
    assert ref.manifest.event_count == 30_000 and len(ref.manifest.objects) == 30_000
    assert sum(1 for _ in ArchiveReader(storage).events()) == 30_000
    assert verify_archive(storage, work_dir=tmp_path / "v").ok
    assert list((tmp_path / "work").iterdir()) == []


def test_a_manifest_field_this_version_does_not_know_is_ignored() -> None:
    """A later version's field must not make the manifest 'damaged' after a downgrade."""
    whole = _manifest([["1-0", "create", "x--1", "i", None]])
    fields = {**whole.__dict__, "added_later": {"anything": [1, 2]}}
    assert Manifest.from_json(orjson.dumps(fields)) == whole
    files_on = Manifest(**{**whole.__dict__, "files": True})
    assert b'"files":true' in files_on.to_json() and b'"files"' not in whole.to_json()
    assert Manifest.from_json(files_on.to_json()) == files_on


def test_a_spool_the_work_dir_cannot_take_is_kept_in_memory_only_up_to_a_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The work dir unusable (full, read-only, a path through a file): a spool past its limit
    was kept in memory without bound, so a multi-GB attached file got the process killed for
    its memory, again at every restart. Now up to a bound, then an error the batch retries."""
    from connector.archive import spool
    from connector.errors import RetryableError

    monkeypatch.setattr(spool, "_MEMORY_FALLBACK", 1 << 20)  # our own bound, made small
    through_a_file = tmp_path / "file"
    through_a_file.write_text("x")
    s = spool.Spool(through_a_file / "work", 64 * 1024, "file-")
    try:
        s.write(b"a" * (512 * 1024))  # past the limit: no scratch file, kept in memory
        assert not s.spilled
        with pytest.raises(RetryableError, match="scratch file"):
            s.write(b"b" * (1 << 20))  # past the bound
    finally:
        s.close()


def test_a_manifest_names_each_merge_and_its_sources(tmp_path: Path) -> None:
    """The manifest's ``merged`` rows (docs/ARCHIVE.md): ``[event id, target STIX id, [source
    STIX ids]]``, the sources as the merge event's context lists them."""
    target = "malware--00000000-0000-4000-8000-000000000001"
    sources = [f"malware--00000000-0000-4000-8000-00000000000{n}" for n in (2, 3)]
    at = EventId(1_800_000_000_000, 0)
    env = {
        "version": "4",
        "type": "merge",
        "data": {"type": "malware", "id": target, "extensions": {OCTI_EXT: {"id": "iid-1"}}},
        "context": {"sources": [{"type": "malware", "id": s} for s in sources]},
    }
    merge = StreamEvent(at, str(at), "merge", orjson.dumps(env).decode(), env)
    storage = LocalStorage(tmp_path / "a")
    ArchiveSink(storage).write(Batch(first_id=at, last_id=at, events=[merge]))
    manifest = orjson.loads(storage.get(manifest_key(at)))
    assert manifest["merged"] == [[str(at), target, sources]]


def _segments(storage: LocalStorage, codec: str = "zstd") -> list[StreamEvent]:
    """Three segments of two groups each, written by the sink; their events."""
    sink = ArchiveSink(storage, codec=codec)
    events: list[StreamEvent] = []
    for n in range(3):
        run = [malware(at(n), 2 * n), malware(at(n, 1), 2 * n + 1)]
        sink.write(Batch(first_id=run[0].id, last_id=run[-1].id, events=run))
        events += run
    return events


def _materialised(storage: LocalStorage, work: Path) -> list[str]:
    with materialise(storage, until=None, work_dir=work) as state:
        return [stix_id for _, stix_id, _, _ in state.objects()]


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
def test_segments_read_back_in_their_manifests_codec(tmp_path: Path, codec: str) -> None:
    """The reader and a restore decode each segment with the codec its manifest names."""
    storage = LocalStorage(tmp_path / "a")
    events = _segments(storage, codec)
    reader = ArchiveReader(storage)
    assert [ev.id for ev in reader.events()] == [ev.id for ev in events]
    assert sorted(_materialised(storage, tmp_path / "w")) == sorted(ev.stix_id for ev in events)


def test_the_archives_end_is_its_newest_readable_manifest(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    events = _segments(storage)
    newest = ArchiveReader(storage).newest()
    assert newest is not None and newest.last == events[-1].id
    storage.put(manifest_key(events[-2].id), b'{"format": 1, "segm')  # torn
    newest = ArchiveReader(storage).newest()
    assert newest is not None and newest.last == events[-3].id


def test_a_damaged_manifest_stops_the_reader_instead_of_being_skipped(tmp_path: Path) -> None:
    """A segment whose manifest cannot be read is not left out of what the archive gives back
    (a restore without it would miss its events): reading stops there, naming it."""
    storage = LocalStorage(tmp_path / "a")
    events = _segments(storage)
    storage.put(manifest_key(events[2].id), b'{"format": 1, "segm')  # torn
    with pytest.raises(PermanentError, match="is damaged"):
        list(ArchiveReader(storage).events())


def test_the_reader_gives_each_group_once_from_after_to_until(tmp_path: Path) -> None:
    """A group's id is the running maximum of event ids from its segment's first; ``events``
    gives the groups in ``(after, until]``, each once, also when a segment copied by hand
    overlaps the one before."""
    storage = LocalStorage(tmp_path / "a")
    events = _segments(storage)
    reader = ArchiveReader(storage)
    assert [ev.id for ev in reader.events(after=at(0), until=at(2))] == [
        at(0, 1),
        at(1),
        at(1, 1),
        at(2),
    ]
    # The same stream cut otherwise: a segment from (1, 1) to (2, 0), copied in beside them.
    other = LocalStorage(tmp_path / "b")
    run = [malware(at(1, 1), 3), malware(at(2), 4)]
    ArchiveSink(other).write(Batch(first_id=run[0].id, last_id=run[-1].id, events=run))
    for key in [*other.list("events/"), *other.list("manifests/")]:
        storage.put(key, other.get(key))
    assert len(list(reader.manifests())) == 4
    assert [ev.id for ev in reader.events()] == [ev.id for ev in events]


def test_a_manifest_of_another_format_or_with_unreadable_ids_is_damaged() -> None:
    """A later format may lay its rows out otherwise: read as this one, it would give wrong
    positions. Ids that are no event ids would fail later, outside the damage checks."""
    whole = _manifest([["1-0", "create", "x--1", "i", None]])
    for changed in ({"format": 2}, {"first_event_id": "yesterday"}, {"last_event_id": "1-x"}):
        with pytest.raises(MalformedEvent, match="manifest"):
            Manifest.from_json(orjson.dumps({**whole.__dict__, **changed}))


def _rewrite_segment(storage: LocalStorage, first: EventId, body: bytes, manifest: bool) -> None:
    """The segment at ``first`` stored as ``body``; its manifest says so when ``manifest``."""
    key = manifest_key(first)
    header = read_manifest(storage, key)
    storage.put(header.segment, body)
    if manifest:
        whole = orjson.loads(storage.get(key))
        whole["sha256"], whole["size"] = hashlib.sha256(body).hexdigest(), len(body)
        storage.put(key, orjson.dumps(whole))


def _lines(storage: LocalStorage, first: EventId) -> list[bytes]:
    header = read_manifest(storage, manifest_key(first))
    with storage.open(header.segment) as fh:
        return list(iter_segment_lines(fh, header.codec))


def test_a_segment_whose_bytes_are_not_its_manifests_is_not_restored(tmp_path: Path) -> None:
    """The same lines compressed otherwise decode well: the sha256 tells them apart."""
    storage = LocalStorage(tmp_path / "a")
    events = _segments(storage)
    _rewrite_segment(storage, events[2].id, compress(b"".join(_lines(storage, events[2].id)),
                     "zstd", 19), manifest=False)  # fmt: skip
    with pytest.raises(PermanentError, match="sha256 differs"):
        _materialised(storage, tmp_path / "w")


def test_a_segment_of_several_zstd_frames_is_read_whole(tmp_path: Path) -> None:
    """A segment recompressed by another tool (a parallel zstd writes a frame per slice)."""
    storage = LocalStorage(tmp_path / "a")
    events = _segments(storage)
    lines = _lines(storage, events[2].id)
    assert len(lines) == 2
    body = b"".join(compress(line, "zstd", 3) for line in lines)
    _rewrite_segment(storage, events[2].id, body, manifest=True)
    assert sorted(_materialised(storage, tmp_path / "w")) == sorted(ev.stix_id for ev in events)


@pytest.mark.parametrize("straddle", [1, 6, 11])
def test_the_end_of_a_manifests_rows_across_two_reads(tmp_path: Path, straddle: int) -> None:
    """The bytes that end the rows, cut between two reads of the manifest, are still found."""
    storage = LocalStorage(tmp_path)
    marker = b'],"merged":['
    pad = (
        _READ - straddle - _manifest([["1-0", "create", "x--1", "", None]]).to_json().index(marker)
    )
    whole = _manifest([["1-0", "create", "x--1", "p" * pad, None]])
    assert whole.to_json().index(marker) == _READ - straddle
    storage.put_if_absent("manifests/m.json", whole.to_json())
    header = read_manifest(storage, "manifests/m.json")
    assert header.objects == [] and header.merged == whole.merged


def test_a_segment_naming_no_predecessor_is_restored(tmp_path: Path) -> None:
    """A manifest whose ``after_event_id`` is null after the first (a segment copied by hand,
    another writer: verify reports the chain's break) continues the archive for a restore."""
    storage = LocalStorage(tmp_path / "a")
    events = _segments(storage)
    key = manifest_key(events[2].id)
    whole = orjson.loads(storage.get(key))
    assert whole["after_event_id"] == str(events[1].id)
    storage.put(key, orjson.dumps({**whole, "after_event_id": None}))
    assert sorted(_materialised(storage, tmp_path / "w")) == sorted(ev.stix_id for ev in events)


def test_keys_sort_in_stream_order_across_days_months_and_years() -> None:
    """Readers, retention and the sink's scan take the listing order for stream order: the date
    folders are zero-padded as the ids are, or October's keys would list before September's."""
    days = [(2026, 1, 9), (2026, 1, 10), (2026, 9, 30), (2026, 10, 1), (2026, 12, 31), (2027, 1, 1)]
    ids = [EventId(int(dt.datetime(*d, tzinfo=dt.UTC).timestamp() * 1000), 0) for d in days]
    for name in (lambda i: segment_key(i, "zstd"), manifest_key):
        keys = [name(i) for i in ids]
        assert sorted(keys) == keys, keys
