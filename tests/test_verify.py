"""verify: a good archive passes; each kind of damage is named and makes the report not ok.

Archives are written by the real ArchiveSink into a LocalStorage (one run against moto S3);
updates carry real patch / reverse_patch pairs made with jsonpatch, as the platform sends them.
The ``ArchiveBuilder`` here is reused by the retention and job tests.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import jsonpatch
import orjson
import pytest
import zstandard

from connector.archive import ArchiveReader, ArchiveSink
from connector.archive.layout import (
    EVENTS_PREFIX,
    MANIFESTS_PREFIX,
    manifest_key,
    quarantine_key,
    segment_key,
)
from connector.archive.segment import compress, encode_segment
from connector.checkpoint import Checkpoint, CheckpointStore
from connector.events import OCTI_EXT, EventId, StreamEvent
from connector.sink import Batch
from connector.snapshot import list_snapshots, write_snapshot
from connector.storage import Storage
from connector.storage.local import LocalStorage
from connector.verify import format_report, verify_archive
from tests.support.handfed import malware
from tests.support.s3 import moto_server, s3_settings, s3_storage  # noqa: F401
from tests.support.simlog import copy_event

DAY_MS = 86_400_000


class ArchiveBuilder:
    """Makes platform-like events for a few malware objects and writes them as segments."""

    def __init__(self, storage: Storage, start_ms: int, step_ms: int = 1000) -> None:
        self.storage = storage
        self.sink = ArchiveSink(storage)
        self.ms = start_ms
        self.step = step_ms
        self.objects: dict[str, dict[str, Any]] = {}
        self.pending: list[StreamEvent] = []
        self.last: EventId | None = None

    def _stamp(self, stix: dict[str, Any]) -> None:
        """Version stamp of the event about to be emitted (the next id's milliseconds)."""
        when = f"2025-01-01T00:00:{(self.ms + self.step) % 60000 / 1000:06.3f}Z"
        stix["modified"] = when
        stix["extensions"][OCTI_EXT]["updated_at"] = when

    def _event(self, name: str, envelope: dict[str, Any]) -> StreamEvent:
        self.ms += self.step
        ev = StreamEvent.from_sse(f"{self.ms}-0", name, orjson.dumps(envelope).decode())
        self.pending.append(ev)
        return ev

    def create(self, n: int, **fields: Any) -> StreamEvent:
        stix: dict[str, Any] = {
            "id": f"malware--00000000-0000-4000-8000-{n:012d}",
            "type": "malware",
            "spec_version": "2.1",
            "name": f"malware {n}",
            "extensions": {OCTI_EXT: {"id": f"iid-{n}", "type": "Malware"}},
            **fields,
        }
        self._stamp(stix)
        self.objects[f"iid-{n}"] = stix
        return self._event("create", {"version": "4", "type": "create", "data": stix})

    def update(self, n: int, *, emit: bool = True, **changes: Any) -> StreamEvent | None:
        old = self.objects[f"iid-{n}"]
        new = copy.deepcopy(old)
        new.update(changes)
        self._stamp(new)
        self.objects[f"iid-{n}"] = new
        envelope = {
            "version": "4",
            "type": "update",
            "data": new,
            "context": {
                "patch": jsonpatch.make_patch(old, new).patch,
                "reverse_patch": jsonpatch.make_patch(new, old).patch,
            },
        }
        if not emit:  # the platform changed it, but the event never reached us
            self.ms += self.step
            return None
        return self._event("update", envelope)

    def delete(self, n: int) -> StreamEvent:
        stix = self.objects.pop(f"iid-{n}")
        return self._event("delete", {"version": "4", "type": "delete", "data": stix})

    def flush(self) -> Batch:
        """Write the pending events as one segment (one batch)."""
        events, self.pending = self.pending, []
        batch = Batch(
            first_id=events[0].id, last_id=events[-1].id, events=events, after_id=self.last
        )
        self.sink.write(batch)
        self.last = batch.last_id
        return batch

    def day(self, segments: int = 2, objects: int = 3) -> None:
        """A few segments of creates and updates."""
        for s in range(segments):
            for i in range(objects):
                n = 1000 + i
                if f"iid-{n}" in self.objects:
                    self.update(n, description=f"seen {self.ms} {s}")
                else:
                    self.create(n)
            self.flush()


def build_good(storage: Storage, start_ms: int = 1_700_000_000_000) -> ArchiveBuilder:
    b = ArchiveBuilder(storage, start_ms)
    b.create(1, labels=["a"])
    b.create(2)
    b.flush()
    b.update(1, labels=["a", "b"], description="x")
    b.update(2, name="renamed")
    b.update(1, labels=["b"])
    b.flush()
    b.delete(2)
    b.create(3)
    b.update(3, description="y")
    b.flush()
    return b


def record_gap(storage: Storage, checkpoint_at: EventId | None, **fields: object) -> None:
    """A checkpoint whose pipeline recorded one retention gap at ``checkpoint_at``."""
    checkpoint = Checkpoint(stream_id="live", source_url="http://127.0.0.1")
    gap = {"checkpoint_event_id": str(checkpoint_at), "first_retained_event_id": None, **fields}
    checkpoint.retention_gaps.append(gap)
    CheckpointStore(storage).save(checkpoint)


def manifests(storage: Storage) -> list[Any]:
    return list(ArchiveReader(storage).manifests())


def test_good_archive_passes(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert report.segments == 3
    assert report.events == 8
    assert report.updates_checked == 4
    assert report.first_event_id is not None and report.last_event_id is not None
    text = format_report(report)
    assert "result" in text and "OK" in text and "segments" in text
    assert list((tmp_path / "w").iterdir()) == []  # the sqlite index is removed


def test_corrupted_segment(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    seg = manifests(storage)[1].manifest.segment
    path = tmp_path / "a" / seg
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 0xFF
    path.write_bytes(bytes(body))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any(seg in e and "sha256" in e for e in report.errors), report.errors
    assert "DAMAGED" in format_report(report)
    # Nothing was pruned meanwhile: one pass is believed, not repeated (and said so).
    assert not any("pruned" in n for n in report.notes), report.notes


def test_missing_segment(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    seg = manifests(storage)[1].manifest.segment
    storage.delete(seg)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any("missing" in e and seg in e for e in report.errors), report.errors


def test_missing_segment_and_manifest_breaks_the_chain(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    ref = manifests(storage)[1]
    storage.delete(ref.manifest_key)
    storage.delete(ref.manifest.segment)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any("missing before" in e for e in report.errors), report.errors


def test_truncated_manifest(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    key = manifests(storage)[0].manifest_key
    body = storage.get(key)
    storage.put(key, body[: len(body) // 2])
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any(key in e and "damaged" in e for e in report.errors), report.errors


def test_orphan_segment_is_a_warning(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    b = build_good(storage)
    # A crash after the segment write and before the manifest: move the last manifest away
    # and keep the chain intact by leaving it the last segment.
    last = manifests(storage)[-1]
    storage.delete(last.manifest_key)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert report.orphans == 1
    assert any(last.manifest.segment in w for w in report.warnings)
    assert b.last is not None


def test_missed_update_breaks_the_patch_chain(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.create(1, labels=["a"])
    b.flush()
    b.update(1, emit=False, labels=["a", "hidden"])  # lost upstream
    missed_by = b.update(1, description="after the gap")
    b.flush()
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert missed_by is not None
    assert any(
        f"update {missed_by.id_text} does not follow" in e and "missed upstream" in e
        for e in report.errors
    ), report.errors


def test_denormalised_relationship_fields_are_not_a_break(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.create(1, source_ref="x", extensions={OCTI_EXT: {"id": "iid-1", "source_value": "old"}})
    b.flush()
    # The endpoint was renamed: the platform rewrites source_value without an event.
    b.objects["iid-1"]["extensions"][OCTI_EXT]["source_value"] = "new"
    b.update(1, description="later")
    b.flush()
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert report.updates_checked == 1


def test_snapshots_verified_and_bad_part_detected(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    b = build_good(storage)
    assert write_snapshot(storage, work_dir=tmp_path / "s") is not None
    b.update(1, description="after snapshot 1")
    b.create(4)
    b.flush()
    b.delete(1)
    b.flush()
    assert write_snapshot(storage, work_dir=tmp_path / "s") is not None
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert report.snapshots == 2
    assert report.snapshots_recomputed == 2  # the archive starts at the origin: both recomputed

    part = list_snapshots(storage)[1].parts[0].key
    path = tmp_path / "a" / part
    body = bytearray(path.read_bytes())
    body[-3] ^= 0x55
    path.write_bytes(bytes(body))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any(part in e and "sha256" in e for e in report.errors), report.errors


@pytest.mark.parametrize(
    "damage",
    ["flipped byte", "other state", "same counts, other state", "another version's, flipped"],
)
def test_a_state_image_that_cannot_serve_is_an_error(tmp_path: Path, damage: str) -> None:
    """The image a restore would open: a byte flipped (sha256), or a whole database holding
    another state than the manifest's (one object fewer, the manifest made to name it). The
    snapshot's parts still serve a restore: it is still checked against the segments."""
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    info = write_snapshot(storage, work_dir=tmp_path / "s")
    assert info is not None and info.state_image is not None
    key = info.state_image.key
    path = tmp_path / "a" / key
    if "other state" not in damage:
        body = bytearray(path.read_bytes())
        body[len(body) // 2] ^= 0x55
        path.write_bytes(bytes(body))
        if damage != "flipped byte":  # not opened by this version: its bytes are checked
            manifest = orjson.loads(storage.get(info.manifest_key))
            manifest["state_schema"] += 1
            storage.put(info.manifest_key, orjson.dumps(manifest))
    else:
        db = tmp_path / "other.sqlite"
        db.write_bytes(zstandard.ZstdDecompressor().stream_reader(path.read_bytes()).read())
        with sqlite3.connect(db) as conn:
            if damage == "other state":
                conn.execute("DELETE FROM objects WHERE rid = (SELECT max(rid) FROM objects)")
            else:  # one object at another event: only the state's checksum tells
                conn.execute(
                    "UPDATE objects SET event_id = '1-0' WHERE rid = (SELECT max(rid) FROM objects)"
                )
        body = compress(db.read_bytes(), "zstd", 3)
        path.write_bytes(body)
        manifest = orjson.loads(storage.get(info.manifest_key))
        (entry,) = [p for p in manifest["parts"] if p["kind"] == "state"]
        entry["sha256"], entry["size"] = hashlib.sha256(body).hexdigest(), len(body)
        storage.put(info.manifest_key, orjson.dumps(manifest))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    said = {"other state": "not the manifest's", "same counts, other state": "another state"}
    said = said.get(damage, "sha256 differs")
    assert [e for e in report.errors if "state image" in e] == [
        e for e in report.errors if key in e and said in e
    ], report.errors
    assert len(report.errors) == 1, report.errors
    assert report.snapshots_recomputed == 1
    assert not list((tmp_path / "w").glob("*.sqlite"))


def test_a_part_holding_other_than_its_count_is_named(tmp_path: Path) -> None:
    """A snapshot manifest whose part count (and total) says one object more than the part
    holds: the part is named, not only the recomputed total."""
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    info = write_snapshot(storage, work_dir=tmp_path / "s")
    assert info is not None
    manifest = orjson.loads(storage.get(info.manifest_key))
    part = next(p for p in manifest["parts"] if p["kind"] == "objects")
    part["count"] += 1
    manifest["object_count"] += 1
    storage.put(info.manifest_key, orjson.dumps(manifest))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    said = f"holds {part['count'] - 1} lines, manifest says {part['count']}"
    assert any(part["key"] in e and said in e for e in report.errors), report.errors


def test_snapshot_inconsistent_with_segments(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    info = write_snapshot(storage, work_dir=tmp_path / "s")
    assert info is not None
    # A manifest that lies about the state (e.g. written from a different history).
    obj = orjson.loads(storage.get(info.manifest_key))
    obj["state_sha256"] = "0" * 64
    storage.put(info.manifest_key, orjson.dumps(obj))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    # Said by the recomputation from the segments (the state image says it too).
    said = "state_sha256 differs from the previous snapshot + segments"
    assert any(said in e for e in report.errors), report.errors


def test_segment_count_mismatch_is_reported(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    ref = manifests(storage)[0]
    obj = orjson.loads(storage.get(ref.manifest_key))
    obj["event_count"] += 1
    storage.put(ref.manifest_key, orjson.dumps(obj))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any("manifest says" in e for e in report.errors), report.errors


@pytest.mark.parametrize(
    ("field", "said"),
    [("size", "!= manifest"), ("last_event_id", "last group id is")],
)
def test_a_manifest_field_unlike_its_segment_is_named(
    tmp_path: Path, field: str, said: str
) -> None:
    """The newest manifest says a size or a last group id its segment does not have (its bytes
    and sha256 untouched): the mismatch is damage, named."""
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    ref = manifests(storage)[-1]
    obj = orjson.loads(storage.get(ref.manifest_key))
    last = ref.manifest.last
    obj[field] = obj[field] + 1 if field == "size" else str(EventId(last.ms + 1, 0))
    storage.put(ref.manifest_key, orjson.dumps(obj))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any(ref.manifest.segment in e and said in e for e in report.errors), report.errors


def test_a_segment_starting_at_the_previous_ones_last_id_overlaps(tmp_path: Path) -> None:
    """A segment chained to the previous one (its after_event_id) but holding that segment's
    last group again: the same group stored twice is an overlap, an error."""
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.create(1)
    b.create(2)
    last = b.flush().last_id
    # Written elsewhere (this archive's sink would skip the group it holds), then copied in.
    other = LocalStorage(tmp_path / "other")
    ArchiveSink(other).write(
        Batch(first_id=last, last_id=last, events=[malware(last, 3)], after_id=None)
    )
    for key in [*other.list(EVENTS_PREFIX), *other.list(MANIFESTS_PREFIX)]:
        body = other.get(key)
        if key.startswith(MANIFESTS_PREFIX):
            obj = orjson.loads(body)
            obj["after_event_id"] = str(last)
            body = orjson.dumps(obj)
        storage.put(key, body)
    assert [r.manifest.first for r in manifests(storage)][-1] == last
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any("overlaps the previous segment" in e for e in report.errors), report.errors


def test_manifest_under_wrong_name(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    ref = manifests(storage)[0]
    other = manifest_key(EventId(ref.manifest.first.ms - 1, 0))
    storage.put(other, storage.get(ref.manifest_key))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok


def test_verify_on_s3(s3_storage: Storage, tmp_path: Path) -> None:  # noqa: F811
    build_good(s3_storage)
    assert write_snapshot(s3_storage, work_dir=tmp_path / "s") is not None
    report = verify_archive(s3_storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    seg = manifests(s3_storage)[0].manifest.segment
    s3_storage.put(seg, b"not a segment")
    report = verify_archive(s3_storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any(seg in e for e in report.errors)


@pytest.mark.parametrize("codec", ["gzip"])
def test_gzip_archive_passes(tmp_path: Path, codec: str) -> None:
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.sink = ArchiveSink(storage, codec=codec)
    b.create(1)
    b.update(1, description="d")
    b.flush()
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert report.updates_checked == 1


def test_a_gzip_segment_that_is_no_gzip_is_reported_not_raised(tmp_path: Path) -> None:
    """gzip says "not a gzipped file" with an OSError that has no errno: damage of the segment
    (reported), not a failure of this machine (raised)."""
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.sink = ArchiveSink(storage, codec="gzip")
    b.create(1)
    b.flush()
    seg = manifests(storage)[0].manifest.segment
    body = bytearray(storage.get(seg))
    body[0] ^= 0xFF  # the gzip magic number
    storage.put(seg, bytes(body))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any(seg in e and "cannot be decoded" in e for e in report.errors), report.errors


def test_no_archive_at_all_is_an_error_and_a_lone_checkpoint_a_warning(tmp_path: Path) -> None:
    """A wrong path or bucket prefix must not verify as OK; a connector that checkpointed but
    wrote no segment yet is only a warning."""
    storage = LocalStorage(tmp_path / "a")
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any("no archive here" in e for e in report.errors), report.errors
    CheckpointStore(storage).save(Checkpoint(stream_id="live", source_url="http://127.0.0.1"))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert any("checkpoint but no segment" in w for w in report.warnings), report.warnings


def test_a_quarantined_event_right_after_the_previous_version_explains_the_update(
    tmp_path: Path,
) -> None:
    """The update the platform sent right after the create was quarantined (a record at the
    create's id): the next update cannot follow the create, and that is no missed event."""
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    created = b.create(1, labels=["a"])
    b.flush()
    b.update(1, emit=False, labels=["a", "quarantined"])
    b.update(1, description="after it")
    b.flush()
    storage.put(quarantine_key(created.id, "0" * 32), b"{}")
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert report.updates_checked == 0


def test_a_container_held_by_another_container_still_errs_on_a_missed_update(
    tmp_path: Path,
) -> None:
    """The filtered stream's container path explains missed updates of what a container holds,
    not of a container (its own updates always reach the stream): an error, even when another
    container holds it."""
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.create(1, object_refs=["malware--00000000-0000-4000-8000-000000000099"])
    b.create(2, object_refs=[b.objects["iid-1"]["id"]])
    b.flush()
    b.update(1, emit=False, name="lost upstream")
    b.update(1, description="after the loss")
    b.flush()
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any("missed upstream" in e for e in report.errors), report.errors
    assert not report.warnings


def test_chain_break_unless_a_retention_gap_explains_it(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    b = build_good(storage)
    prev_last = b.last
    b.ms += 3_600_000
    b.create(9)
    # A writer that lost the chain (an archive copied by hand, another tool): the segment names
    # no predecessor. (ArchiveSink itself chains after what the archive holds.)
    events, b.pending = b.pending, []
    first = events[0].id
    key = segment_key(first, "zstd")
    encoded = encode_segment(
        key, events, first=first, last=events[-1].id, codec="zstd", level=3, after=None
    )
    storage.put_if_absent(key, encoded.body())
    storage.put_if_absent(manifest_key(first), encoded.manifest_body())
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any("does not continue the chain" in e for e in report.errors), report.errors

    # A retention gap recorded elsewhere (before the archive starts) explains nothing here.
    record_gap(storage, EventId(prev_last.ms - DAY_MS, 0))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert any("does not continue the chain" in e for e in report.errors), report.errors

    # The stream's own retention passed the checkpoint there, and the pipeline recorded it.
    record_gap(storage, prev_last)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert any("retention gap" in n for n in report.notes)


def test_updates_lost_in_a_retention_gap_are_no_missed_event(tmp_path: Path) -> None:
    """The connector goes on from its checkpoint after a retention gap, so the segment chain
    holds; the updates the stream trimmed before it was read are lost upstream, recorded."""
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.create(1, labels=["a"])
    b.flush()
    checkpoint_at = b.last
    b.update(1, emit=False, labels=["a", "trimmed"])  # trimmed before the connector came back
    b.update(1, description="after the repair")
    b.flush()
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok  # unexplained: an event was missed
    assert any("missed upstream" in e for e in report.errors), report.errors

    record_gap(storage, checkpoint_at)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert any("patch chains restart" in n for n in report.notes), report.notes


def test_a_retention_gap_breaks_the_chains_where_the_archive_went_on(tmp_path: Path) -> None:
    """An earlier run archived past the checkpoint (a target lagging) before the gap was found:
    the archive goes on after the gap from its own end, not from the checkpoint."""
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.create(1, labels=["a"])
    b.flush()
    checkpoint_at = b.last
    b.update(1, description="archived, not yet checkpointed")
    b.flush()
    archive_end = b.last
    b.update(1, emit=False, labels=["trimmed"])
    b.update(1, description="after the repair")
    b.flush()
    record_gap(storage, checkpoint_at)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok  # the break is not where the checkpoint was
    record_gap(storage, checkpoint_at, archive_last_event_id=str(archive_end))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert report.updates_checked == 1  # the update before the gap still follows the create


@pytest.mark.parametrize("referer", ["init-create", "opencti-sync-reconcile"])
def test_a_copy_read_after_the_updates_it_holds_is_no_missed_event(
    tmp_path: Path, referer: str
) -> None:
    """A recovery or reconciliation copy is read after its position (the recover point, the
    reconciliation's heartbeat): updates made in between come live after it, already in it."""
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.create(1, labels=["a"])
    b.flush()
    position = EventId(b.ms + 1, 0)
    first = b.update(1, description="made after the position, before the copy was read")
    second = b.update(1, labels=["a", "b"])
    assert first is not None and second is not None
    b.pending.insert(0, copy_event(str(position), b.objects["iid-1"], referer))
    b.flush()
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert report.updates_checked == 1  # the second follows the first

    # An update that does not follow the one before it is still missed upstream.
    b.update(1, emit=False, labels=["lost"])
    b.update(1, description="after the loss")
    b.flush()
    report = verify_archive(storage, work_dir=tmp_path / "w2")
    assert not report.ok


def test_a_gap_found_before_its_batch_was_written_restarts_chains_inside_a_segment(
    tmp_path: Path,
) -> None:
    """The gap was found while the groups before it were still pending (nothing archived yet):
    they and the groups after it went into one segment. The update after the gap does not
    follow the version before it (the one between was trimmed): its chain restarts at the gap's
    position inside the segment."""
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.create(1, labels=["a"])
    b.create(2, labels=["a"])
    gap_at = EventId(b.ms, 0)
    b.update(1, emit=False, labels=["trimmed"])
    b.update(1, description="after the repair")
    b.update(2, description="no gap in its chain")
    b.flush()
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok  # no gap recorded: a missed event
    record_gap(storage, gap_at)
    report = verify_archive(storage, work_dir=tmp_path / "w2")
    assert report.ok, format_report(report)
    assert report.segments == 1 and report.updates_checked == 0
    assert any("patch chains restart" in note for note in report.notes)


def test_a_gap_found_with_complete_groups_pending_restarts_chains_after_them(
    tmp_path: Path,
) -> None:
    """As the pipeline records it: the archive's end before the pending groups, the checkpoint's
    position after them. The chains restart after the pending groups, not before."""
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.create(1, labels=["a"])
    b.flush()
    archive_end = b.last
    b.update(1, labels=["a", "pending"])  # complete, still pending when the gap was found
    position = EventId(b.ms, 0)
    b.update(1, emit=False, labels=["trimmed"])
    b.update(1, description="after the repair")
    b.flush()
    record_gap(storage, position, archive_last_event_id=str(archive_end))
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert report.updates_checked == 1  # the pending update still follows the create


def test_a_gap_found_during_a_connection_leaves_its_span_unchecked(tmp_path: Path) -> None:
    """The platform's trimming overtook its reader during a connection (found at a later look
    at the oldest retained event): what was received between the position of the look before
    and the oldest event retained at the look that found it may miss events anywhere in that
    span, below the archive's end too. No chain is checked there; they restart past it, and
    again where the repair resumed (the connector's position then: the events of what changed
    after it and before the repair's recover date are not sent)."""
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.create(1, labels=["a"])
    b.create(2, labels=["a"])
    b.flush()
    position = b.last
    b.update(1, labels=["a", "received"])
    b.update(1, emit=False, labels=["trimmed under the reader"])
    b.update(1, description="received after the hole")
    b.flush()
    archive_end = b.last
    assert archive_end is not None
    first = EventId(archive_end.ms + 1, 0)  # the oldest retained event at the look
    b.update(2, labels=["a", "received past the span"])
    resumed = EventId(b.ms, 0)  # where the repair resumed from
    b.update(2, emit=False, labels=["changed before the repair's recover date"])
    b.update(1, labels=["past the span"])  # follows the version before, which is in the span
    b.update(2, description="after the repair's recover date")
    b.update(1, description="checked again")
    b.flush()
    gap = {"first_retained_event_id": str(first), "archive_last_event_id": str(archive_end)}
    record_gap(storage, position, **gap)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    # As a gap found on connecting, the chains would restart at the archive's end only.
    assert any("missed upstream" in e for e in report.errors), report.errors
    record_gap(storage, position, **gap, in_connection=True)
    report = verify_archive(storage, work_dir=tmp_path / "w2")
    assert [e for e in report.errors if "iid-2" in e or "000000000002" in e], report.errors
    record_gap(storage, position, **gap, in_connection=True, repair_from_event_id=str(resumed))
    report = verify_archive(storage, work_dir=tmp_path / "w3")
    assert report.ok, format_report(report)
    assert report.updates_checked == 1  # only the last: its previous version is past both
    assert any("found during a connection" in n for n in report.notes), report.notes


def _recovering_until(storage: Storage, ms: int) -> None:
    """A checkpoint saying the first run recovered up to ``ms``."""
    until = dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")
    cp = Checkpoint(stream_id="live", source_url="http://x", first_recover_until=until)
    CheckpointStore(storage).save(cp)


def test_a_checkpoint_from_before_first_recover_until_after_a_gap_names_no_first_end() -> None:
    """A checkpoint written before ``first_recover_until`` existed has only ``recover_until``;
    after a retention-gap repair that is the repair's date, not the first recovery's end, which
    is then unknown (taken for it, verify and restore would place the first recovery there)."""
    old = Checkpoint(stream_id="live", source_url="http://x", recover_until="2026-01-02T00:00:00Z")
    assert old.first_recovery_end == "2026-01-02T00:00:00Z"
    old.retention_gaps.append({"checkpoint_event_id": "1-0"})
    assert old.first_recovery_end is None


def test_a_recovery_dependency_later_than_the_chain_is_its_link(tmp_path: Path) -> None:
    """A recovery sends each object once: one that went as another's dependency is not sent
    again at its own place, so the updates that copy holds have no event of their own, and the
    next live update follows the copy. A dependency older than the chain (a stale re-send)
    changes nothing."""
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.create(1, labels=["a"])
    b.flush()
    created = copy.deepcopy(b.objects["iid-1"])
    b.update(1, emit=False, description="made before the recover point")
    b.pending.append(copy_event(str(EventId(b.ms + 1, 0)), b.objects["iid-1"]))
    _recovering_until(storage, b.ms + 1)
    b.pending.append(copy_event(str(EventId(b.ms + 1, 0)), created))  # a stale one
    b.update(1, labels=["a", "b"])
    b.flush()
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert report.updates_checked == 1

    # An update that does not follow the version before it is still missed upstream.
    b.update(1, emit=False, labels=["lost"])
    b.update(1, description="after the loss")
    b.flush()
    report = verify_archive(storage, work_dir=tmp_path / "w2")
    assert not report.ok


@pytest.mark.parametrize("recovering", [False, True])
def test_a_live_dependency_hides_no_missed_update(tmp_path: Path, recovering: bool) -> None:
    """On the live stream an object is sent as a dependency, at its update's id, just before
    the update (after every reconnect): loaded when sent, it already holds the update. The
    update is still checked against the version before it, so a missed one is reported, also
    after a recovery (the dependency's id is past the recover point)."""
    storage = LocalStorage(tmp_path / "a")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.create(1, labels=["a"])
    b.flush()
    if recovering:
        _recovering_until(storage, b.ms + 1)
    b.update(1, emit=False, labels=["lost"])
    update = b.update(1, description="after the loss")
    assert update is not None
    b.pending.insert(-1, copy_event(update.id_text, copy.deepcopy(b.objects["iid-1"])))
    b.flush()
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert report.updates_checked == 1


def test_unfinished_snapshot_is_a_warning(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    storage.put(f"snapshots/{EventId(1, 0).key}/part-00000.jsonl.zst", b"partial")
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert any("unfinished snapshot" in w for w in report.warnings)


_KILLED_VERIFY = """
import sys
from pathlib import Path
from tests.test_jobs_stop import SlowSegments
from connector.verify import verify_archive
verify_archive(SlowSegments(sys.argv[1]), work_dir=Path(sys.argv[2]))
"""


def test_the_scratch_files_of_a_killed_verify_are_removed_by_the_next(tmp_path: Path) -> None:
    """`verify` killed mid-way (a CronJob deadline, out of memory) left its index, a copy of
    every object's last version, in the work dir `run` shares: each kill added another one.
    The next verify removes them, and never the files of a verify still running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.test_jobs_stop import ROOT

    archive, work = tmp_path / "a", tmp_path / "w"
    build_good(LocalStorage(archive))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLOW_SEGMENT_SECS": "30"}
    args = [sys.executable, "-c", _KILLED_VERIFY, str(archive), str(work)]

    def files(n: int) -> set[Path]:
        deadline = time.monotonic() + 30
        while len(found := set(work.glob("verify-*.sqlite"))) < n:
            assert time.monotonic() < deadline, found
            time.sleep(0.05)
        return found

    running = subprocess.Popen(args, env=env)  # held by a live verify: to be left alone
    killed = None
    try:
        (alive,) = files(1)
        killed = subprocess.Popen(args, env=env)
        (left,) = files(2) - {alive}
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert verify_archive(LocalStorage(archive), work_dir=work).ok
        assert not left.exists() and alive.exists()
    finally:
        for child in (running, killed):
            if child is not None:
                child.send_signal(signal.SIGKILL)
                child.wait()
