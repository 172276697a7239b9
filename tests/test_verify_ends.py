"""verify at both ends of the archive: the newest segments the checkpoint names, and the oldest
segments, which retention deletes only once a committed snapshot stands in for them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from connector.checkpoint import Checkpoint, CheckpointStore
from connector.retention import RetentionPolicy, apply_retention, plan_retention
from connector.snapshot import list_snapshots, write_snapshot
from connector.storage import Storage
from connector.storage.local import LocalStorage
from connector.verify import format_report, verify_archive
from tests.test_verify import build_good, manifests


def _save_checkpoint(storage: Storage) -> None:
    """The checkpoint the pipeline saves after writing the archive's newest segment."""
    refs = manifests(storage)
    last = refs[-1].manifest
    CheckpointStore(storage).save(
        Checkpoint(
            stream_id="live",
            source_url="http://127.0.0.1",
            last_event_id=last.last_event_id,
            last_segment=last.segment,
            last_segment_last_id=last.last_event_id,
            segments_written=len(refs),
        )
    )


def _drop(storage: Storage, index: int) -> None:
    """Segment and manifest gone (a partial copy, a lifecycle rule, an operator)."""
    ref = manifests(storage)[index]
    storage.delete(ref.manifest.segment)
    storage.delete(ref.manifest_key)


def test_lost_newest_segment_is_an_error(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    _save_checkpoint(storage)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)

    lost = manifests(storage)[-1].manifest
    _drop(storage, -1)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any(
        "newest segments are missing" in e and lost.segment in e and lost.last_event_id in e
        for e in report.errors
    ), report.errors


def test_archive_ending_before_the_checkpoint_is_an_error(tmp_path: Path) -> None:
    """The last segment's manifest is there, but the archive stops short of the checkpoint's
    last_segment_last_id (e.g. the newest manifests were restored from an older copy)."""
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    _save_checkpoint(storage)
    cp = CheckpointStore(storage).load()
    assert cp is not None
    cp.last_segment = manifests(storage)[0].manifest.segment
    CheckpointStore(storage).save(cp)
    _drop(storage, -1)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any("the archive ends at" in e for e in report.errors), report.errors


def test_tail_unchecked_without_a_checkpoint_in_the_archive(tmp_path: Path) -> None:
    """The checkpoint may live elsewhere: then the archive's end cannot be checked."""
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    _drop(storage, -1)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)


def test_newest_segments_pruned_behind_a_snapshot_are_fine(tmp_path: Path) -> None:
    """A connector idle for longer than keep_days: retention deletes every segment the base
    snapshot covers, the newest included."""
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    _save_checkpoint(storage)
    assert write_snapshot(storage, work_dir=tmp_path / "s") is not None
    plan = plan_retention(
        storage, RetentionPolicy(keep_days=1, keep_snapshots=0), dt.datetime(2030, 1, 1)
    )
    apply_retention(storage, plan)
    assert manifests(storage) == []
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)


def test_a_snapshot_older_than_the_lost_newest_segments_does_not_stand_in(tmp_path: Path) -> None:
    """Only a snapshot reaching the checkpoint's last id covers newest segments gone missing;
    an older one (taken before them) does not."""
    storage = LocalStorage(tmp_path / "a")
    b = build_good(storage)
    assert write_snapshot(storage, work_dir=tmp_path / "s") is not None
    b.update(1, description="after the snapshot")
    b.flush()
    _save_checkpoint(storage)
    _drop(storage, -1)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any("newest segments are missing" in e for e in report.errors), report.errors


def test_lost_oldest_segment_without_a_snapshot_is_an_error(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    _drop(storage, 0)
    assert not list_snapshots(storage)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any("oldest segments are missing" in e for e in report.errors), report.errors


def test_oldest_segments_need_a_snapshot_reaching_the_oldest_kept_one(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    b = build_good(storage)  # three segments
    assert write_snapshot(storage, work_dir=tmp_path / "s") is not None  # as of segment 3
    b.update(1, description="later")
    b.flush()
    b.update(1, description="later still")
    b.flush()
    # What retention does: the segments the snapshot covers go, the snapshot stays.
    for _ in range(3):
        _drop(storage, 0)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert report.ok, format_report(report)
    assert any("pruned by retention" in n for n in report.notes)

    # One segment more gone: the snapshot no longer reaches the oldest kept segment.
    _drop(storage, 0)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    assert not report.ok
    assert any("oldest segments are missing" in e for e in report.errors), report.errors
