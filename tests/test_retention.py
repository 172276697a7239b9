"""Retention keeps every restore point of the window and deletes only what a snapshot covers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import orjson
import pytest

from connector.archive import ArchiveReader
from connector.archive.layout import (
    EVENTS_PREFIX,
    manifest_key_for_segment,
    quarantine_key,
    segment_key,
)
from connector.checkpoint import Checkpoint, CheckpointStore
from connector.errors import PermanentError
from connector.events import EventId
from connector.jobs import LOCK_KEY, run_retention_job
from connector.metrics import REGISTRY
from connector.retention import RetentionPolicy, apply_retention, plan_retention
from connector.snapshot import fold_segments, list_snapshots, state_sha256, write_snapshot
from connector.state import StateStore
from connector.storage import Storage
from connector.storage.local import LocalStorage
from connector.verify import format_report, verify_archive
from tests.support.s3 import moto_server, s3_settings, s3_storage  # noqa: F401
from tests.support.snapshots import and_its_image
from tests.test_verify import DAY_MS, ArchiveBuilder

T0 = 1_700_000_000_000


def build_days(storage: Storage, tmp: Path, days: int, snapshot_days: set[int]) -> ArchiveBuilder:
    """One segment (3 events) per day; a snapshot right after each day in ``snapshot_days``."""
    b = ArchiveBuilder(storage, T0, step_ms=DAY_MS // 3)
    for day in range(days):
        b.day(segments=1)
        if day == 4:
            b.delete(1000)
            b.create(1000 + 50 + day)
            b.flush()
        if day in snapshot_days:
            assert write_snapshot(storage, work_dir=tmp / "snap") is not None
    return b


def at_day(day: float) -> dt.datetime:
    return dt.datetime.fromtimestamp((T0 + day * DAY_MS) / 1000, dt.UTC)


def state_at(storage: Storage, tmp: Path, until: EventId, seed: str | None) -> str:
    """The restored state's checksum at ``until``: from a snapshot (or the origin) + segments."""
    state = StateStore(tmp / f"state-{seed}-{until.key}.sqlite")
    try:
        start_after = None
        if seed is not None:
            info = next(s for s in list_snapshots(storage) if str(s.as_of) == seed)
            state.load_snapshot(storage, info.key)
            start_after = info.last_segment_manifest
        fold_segments(state, ArchiveReader(storage), start_after=start_after, until=until)
        return state_sha256(state)
    finally:
        state.close()


def follow_until(storage: Storage, when: dt.datetime) -> None:
    """The checkpoint a connector following the stream up to ``when`` leaves in the archive."""
    position = EventId(int(when.timestamp() * 1000), 0)
    CheckpointStore(storage).save(Checkpoint("live", "http://platform", str(position)))


def deleted_count(kind: str) -> float:
    value = REGISTRY.get_sample_value(
        "opencti_sync_retention_deleted_objects_total", {"kind": kind}
    )
    return value or 0.0


def test_window_honoured_and_restore_inside_window_complete(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=10, snapshot_days={2, 6})
    snaps = list_snapshots(storage)
    now = at_day(10.5)
    policy = RetentionPolicy(keep_days=5, keep_snapshots=0)
    window = EventId(int(now.timestamp() * 1000) - 5 * DAY_MS, 0)
    # Reference: the state at the very start of the window, replayed from the origin.
    expected = state_at(storage, tmp_path, window, None)
    before = [r.manifest for r in ArchiveReader(storage).manifests()]
    segments_deleted = deleted_count("segment")

    report = plan_retention(storage, policy, now)
    base = snaps[0]
    assert report.base == str(base.as_of) and base.as_of <= window < snaps[1].as_of
    apply_retention(storage, report)

    after = [r.manifest for r in ArchiveReader(storage).manifests()]
    assert [m.segment for m in after] == [m.segment for m in before if m.last > base.as_of]
    assert all(not storage.exists(m.segment) for m in before if m.last <= base.as_of)
    assert len(after) < len(before)
    assert [s.as_of for s in list_snapshots(storage)] == [s.as_of for s in snaps]
    # The oldest restore point of the window is still complete: base + kept segments.
    assert state_at(storage, tmp_path, window, str(base.as_of)) == expected
    assert deleted_count("segment") - segments_deleted == len(before) - len(after)
    verified = verify_archive(storage, work_dir=tmp_path / "w")
    assert verified.ok, format_report(verified)
    assert any("pruned" in n for n in verified.notes)

    # Later on (the connector following the idle stream's heartbeats meanwhile), the second
    # snapshot becomes the base and the first one goes.
    follow_until(storage, at_day(13))
    report = plan_retention(storage, policy, at_day(13))
    assert report.base == str(snaps[1].as_of)
    apply_retention(storage, report)
    assert [s.as_of for s in list_snapshots(storage)] == [snaps[1].as_of]
    verified = verify_archive(storage, work_dir=tmp_path / "w")
    assert verified.ok, format_report(verified)


def test_manifest_deleted_before_its_segment(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=5, snapshot_days={2})
    report = plan_retention(storage, RetentionPolicy(keep_days=1, keep_snapshots=0), at_day(6))
    kinds = [d.kind for d in report.deletions if d.kind in ("manifest", "segment")]
    assert kinds and kinds == ["manifest", "segment"] * (len(kinds) // 2)
    snap = [d.key for d in report.deletions if d.kind == "snapshot"]
    assert snap == []  # the only snapshot is the base


def test_no_snapshot_deletes_nothing(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days=set())
    keys = sorted(storage.list())
    report = run_retention_job(
        storage, RetentionPolicy(keep_days=1, keep_snapshots=1), now=at_day(30)
    )
    assert report.deletions == []
    assert "no snapshot" in report.note
    assert sorted(storage.list()) == keys


def test_snapshot_newer_than_window_deletes_no_segment(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days={5})
    # A quarantine record follows an event no base covers: it stays for operators too.
    storage.put(quarantine_key(EventId(T0, 0), "d" * 64), orjson.dumps({"reason": "test"}))
    report = plan_retention(storage, RetentionPolicy(keep_days=3, keep_snapshots=0), at_day(6))
    assert report.base is None
    assert report.deletions == []


def test_dry_run_deletes_nothing(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days={3})
    keys = sorted(storage.list())
    report = run_retention_job(
        storage, RetentionPolicy(keep_days=1, keep_snapshots=0), dry_run=True, now=at_day(8)
    )
    assert report.deletions and report.dry_run
    assert "would delete" in str(report)
    assert sorted(storage.list()) == keys
    assert not storage.exists(LOCK_KEY)


def test_keep_snapshots_with_forever_window(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days={1, 2, 3, 4})
    snaps = list_snapshots(storage)
    segments = len(list(ArchiveReader(storage).manifests()))
    report = run_retention_job(storage, RetentionPolicy(keep_days=0, keep_snapshots=2))
    assert report.base is None
    assert [s.as_of for s in list_snapshots(storage)] == [s.as_of for s in snaps[-2:]]
    assert len(list(ArchiveReader(storage).manifests())) == segments
    assert not any(k.startswith(f"snapshots/{snaps[0].key}/") for k in storage.list("snapshots/"))
    verified = verify_archive(storage, work_dir=tmp_path / "w")
    assert verified.ok, format_report(verified)


def test_unfinished_snapshots_older_than_the_newest_go_even_without_a_base(
    tmp_path: Path,
) -> None:
    """Keeping history forever (no base): what a killed job left of a snapshot (its parts,
    no manifest: a snapshot job killed before its commit, or a retention killed between a
    snapshot's manifest and its parts) goes once a newer snapshot is committed. One past the
    newest committed snapshot may be a snapshot job's work in progress: it stays."""
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days={1, 2, 4})
    left = list_snapshots(storage)[1]
    storage.delete(left.manifest_key)  # as a retention killed after the manifest leaves it
    ahead = f"snapshots/{EventId(T0 + 9 * DAY_MS, 0).key}/part-00000.jsonl.zst"
    storage.put(ahead, b"a snapshot job's part, its manifest not written yet")
    segments = len(list(ArchiveReader(storage).manifests()))
    report = run_retention_job(storage, RetentionPolicy(keep_days=0, keep_snapshots=0))
    assert report.base is None
    assert not any(k.startswith(f"snapshots/{left.key}/") for k in storage.list("snapshots/"))
    assert storage.exists(ahead)
    assert len(list(ArchiveReader(storage).manifests())) == segments
    assert len(list_snapshots(storage)) == 2


def test_keep_snapshots_never_drops_the_base(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=8, snapshot_days={1, 5, 6, 7})
    snaps = list_snapshots(storage)
    report = run_retention_job(
        storage, RetentionPolicy(keep_days=4, keep_snapshots=1), now=at_day(7)
    )
    kept = [s.as_of for s in list_snapshots(storage)]
    assert report.base == str(snaps[0].as_of)
    assert kept == [snaps[0].as_of, snaps[-1].as_of]
    verified = verify_archive(storage, work_dir=tmp_path / "w")
    assert verified.ok, format_report(verified)


def test_quarantine_kept_until_covered_by_base(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days={2})
    old = quarantine_key(EventId(T0 + DAY_MS // 2, 0), "a" * 64)
    recent = quarantine_key(EventId(T0 + 5 * DAY_MS, 0), "b" * 64)
    for key in (old, recent):
        storage.put(key, orjson.dumps({"reason": "test"}))
    run_retention_job(storage, RetentionPolicy(keep_days=2, keep_snapshots=0), now=at_day(6))
    assert not storage.exists(old)
    assert storage.exists(recent)


def test_a_quarantine_record_at_the_base_position_is_kept(tmp_path: Path) -> None:
    """A record's key names the position before its event: one at the base snapshot's own
    position came after it, and the snapshot does not hold it."""
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days={2})
    base = list_snapshots(storage)[0].as_of
    before, at_base = (quarantine_key(p, "c" * 64) for p in (EventId(base.ms - 1, 0), base))
    for key in (before, at_base):
        storage.put(key, orjson.dumps({"reason": "test"}))
    run_retention_job(storage, RetentionPolicy(keep_days=2, keep_snapshots=0), now=at_day(6))
    assert not storage.exists(before)
    assert storage.exists(at_base)


@pytest.mark.parametrize("damage", ["missing", "flipped byte"])
@pytest.mark.parametrize("which", ["part", "state image"])
def test_base_with_a_damaged_part_is_not_used(tmp_path: Path, damage: str, which: str) -> None:
    """A restore would refuse that snapshot (sha256): the segments it covers must stay. Its
    state image alone damaged, a restore loads the parts instead: it is still the base."""
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days={2})
    info = list_snapshots(storage)[0]
    part = info.state_image if which == "state image" else info.parts[0]
    assert part is not None
    if damage == "missing":
        storage.delete(part.key)
    else:
        body = bytearray(storage.get(part.key))
        body[len(body) // 2] ^= 0x01  # same size: only the checksum tells
        storage.put(part.key, bytes(body))
    report = plan_retention(storage, RetentionPolicy(keep_days=1, keep_snapshots=0), at_day(8))
    if which == "state image":
        assert report.base == str(info.as_of)
        assert any(d.kind == "segment" for d in report.deletions)
        return
    assert report.base is None
    assert not any(d.kind in ("segment", "manifest") for d in report.deletions)


def test_a_clock_far_ahead_does_not_move_the_window(tmp_path: Path) -> None:
    """The host clock 30 days ahead: the window is measured from the archive's own position
    (plus a day), so history that is inside the real window stays."""
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=10, snapshot_days={2, 6, 9})
    follow_until(storage, at_day(10.5))
    policy = RetentionPolicy(keep_days=5, keep_snapshots=0)
    honest = plan_retention(storage, policy, at_day(10.5))
    ahead = plan_retention(storage, policy, at_day(40.5))
    assert ahead.base == honest.base == str(list_snapshots(storage)[0].as_of)
    assert ahead.deletions == honest.deletions


def test_retention_on_s3(s3_storage: Storage, tmp_path: Path) -> None:  # noqa: F811
    build_days(s3_storage, tmp_path, days=4, snapshot_days={1})
    before = len(list(ArchiveReader(s3_storage).manifests()))
    report = run_retention_job(
        s3_storage, RetentionPolicy(keep_days=1, keep_snapshots=0), now=at_day(5)
    )
    assert report.deleted > 0
    assert len(list(ArchiveReader(s3_storage).manifests())) == before - 2
    verified = verify_archive(s3_storage, work_dir=tmp_path / "w")
    assert verified.ok, format_report(verified)


def test_no_snapshot_is_written_without_the_pruned_history(tmp_path: Path) -> None:
    """Retention pruned what the only snapshot covers, then that snapshot lost a part: a new
    snapshot of the remaining segments alone would lack the pruned objects (and retention would
    take it for a base). The job refuses instead, and nothing more is deleted."""
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days={2})
    follow_until(storage, at_day(8))
    policy = RetentionPolicy(keep_days=1, keep_snapshots=0)
    apply_retention(storage, plan_retention(storage, policy, at_day(8)))
    (first,) = list_snapshots(storage)
    for part in and_its_image(first, first.parts[0]):
        storage.delete(part.key)
    with pytest.raises(PermanentError, match="pruned"):
        write_snapshot(storage, work_dir=tmp_path / "snap")
    assert [s.as_of for s in list_snapshots(storage)] == [first.as_of]
    keys = sorted(storage.list())
    apply_retention(storage, plan_retention(storage, policy, at_day(8)))
    assert sorted(storage.list()) == keys


def test_a_base_snapshot_whose_manifest_a_restore_refuses_lets_no_segment_go(
    tmp_path: Path,
) -> None:
    """One flipped byte in a field name of the base snapshot's manifest: its parts still match
    their sha256, so retention took it for its base and deleted the segments it replaced, while
    a restore refuses that manifest and skips the snapshot: the history was gone."""
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days={2})
    (snap,) = list_snapshots(storage)
    body = storage.get(snap.manifest_key)
    assert b'"object_count"' in body
    storage.put(snap.manifest_key, body.replace(b'"object_count"', b'"object_coult"'))
    assert list_snapshots(storage) == []  # what restore and the snapshot job see

    report = plan_retention(storage, RetentionPolicy(keep_days=1, keep_snapshots=0), at_day(8))
    assert report.base is None
    assert not [d.key for d in report.deletions if d.kind == "segment"]
    apply_retention(storage, report)
    verified = verify_archive(storage, work_dir=tmp_path / "w")
    assert "oldest segments are missing" not in format_report(verified)


def test_a_snapshot_whose_manifest_was_torn_is_not_taken_for_an_unfinished_one(
    tmp_path: Path,
) -> None:
    """The first prune deletes the segments the snapshot of day 2 replaces; then that
    snapshot's manifest is torn (a disk error, a bad copy). The next prune must not delete its
    parts as a killed job's leftovers: with the manifest put back, the restore to day 4 must
    start from it again and give the state it gave before."""
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=8, snapshot_days={2, 5})
    old, _ = list_snapshots(storage)
    policy = RetentionPolicy(keep_days=6, keep_snapshots=0)
    first = run_retention_job(storage, policy, now=at_day(9.6))
    assert first.base == str(old.as_of)
    assert [d for d in first.deletions if d.kind == "segment"]
    day4 = EventId(T0 + 4 * DAY_MS, 0)
    before = state_at(storage, tmp_path / "before", day4, str(old.as_of))
    body = storage.get(old.manifest_key)
    storage.put(old.manifest_key, body[: len(body) // 2])
    keys = {k for k in storage.list(f"snapshots/{old.key}/")}

    second = run_retention_job(storage, policy, now=at_day(9.7))
    assert {k for k in storage.list(f"snapshots/{old.key}/")} == keys
    assert not [d for d in second.deletions if d.key.startswith(f"snapshots/{old.key}/")]
    verified = verify_archive(storage, work_dir=tmp_path / "w")
    assert f"{old.manifest_key} is damaged" in format_report(verified)
    storage.put(old.manifest_key, body)
    assert state_at(storage, tmp_path / "after", day4, str(old.as_of)) == before


class _RetentionDuringVerify(LocalStorage):
    """The archive as ``verify`` reads it while ``run``'s scheduled retention prunes it: the
    retention job runs (through its own storage object, as another process would) right after
    verify opened the oldest segment."""

    def __init__(self, root: Path, prune: Callable[[], None]) -> None:
        super().__init__(root)
        self._prune = prune
        self.pruned = False

    def open(self, key: str) -> BinaryIO:
        fh = super().open(key)
        if key.startswith("events/") and not self.pruned:
            self.pruned = True
            self._prune()
        return fh


def test_verify_overlapping_retention_does_not_call_a_healthy_archive_damaged(
    tmp_path: Path,
) -> None:
    """A scheduled verify overlapping run's scheduled retention (both at 03:00) reported
    "segment(s) missing" and a snapshot the segments no longer reach, and exited 1 on an
    archive the next verify found whole."""
    root = tmp_path / "a"
    plain = LocalStorage(root)
    build_days(plain, tmp_path, days=8, snapshot_days={3})
    follow_until(plain, at_day(9))
    policy = RetentionPolicy(keep_days=2, keep_snapshots=0)

    def prune() -> None:
        assert run_retention_job(plain, policy, now=at_day(9)).deleted > 0

    racing = _RetentionDuringVerify(root, prune)
    report = verify_archive(racing, work_dir=tmp_path / "w1")
    assert racing.pruned
    assert report.ok, format_report(report)
    assert any("pruned the archive while it was verified" in n for n in report.notes)
    assert verify_archive(plain, work_dir=tmp_path / "w2").ok


def test_a_segment_whose_manifest_is_damaged_is_not_deleted_as_an_orphan(tmp_path: Path) -> None:
    """A damaged manifest is left for verify to report, and so is its segment: only a segment
    with no manifest at all is an orphan (a crash between the two deletes)."""
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days={3})
    segment = next(iter(storage.list(EVENTS_PREFIX)))
    storage.put(manifest_key_for_segment(segment), b"{damaged")
    report = run_retention_job(
        storage, RetentionPolicy(keep_days=1, keep_snapshots=0), now=at_day(8)
    )
    assert report.base is not None and report.deletions  # other old segments went
    assert segment not in {d.key for d in report.deletions}
    assert storage.exists(segment) and storage.exists(manifest_key_for_segment(segment))


def test_without_a_base_the_snapshot_before_the_oldest_kept_segment_stays(tmp_path: Path) -> None:
    """Older segments were pruned by an earlier retention: with no base now (a longer window),
    the snapshot the oldest kept segment follows is the only start of a restore to a point
    before the next snapshot, and keep_snapshots must not take it."""
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=8, snapshot_days={2, 6, 7})
    first = run_retention_job(
        storage, RetentionPolicy(keep_days=1, keep_snapshots=0), now=at_day(9)
    )
    snaps = [str(s.as_of) for s in list_snapshots(storage)]
    assert first.base == snaps[0] and len(snaps) == 2  # day 6's (the base), day 7's
    report = plan_retention(storage, RetentionPolicy(keep_days=30, keep_snapshots=1), at_day(9))
    assert report.base is None
    assert report.kept_snapshots == snaps  # day 6's protected, day 7's the newest
    assert [d for d in report.deletions if d.kind == "snapshot"] == []


def test_a_snapshot_goes_manifest_first(tmp_path: Path) -> None:
    """A snapshot's manifest commits it: deleted before its parts, a retention killed midway
    leaves an unfinished snapshot (the next run removes it), never a committed snapshot whose
    parts are gone, which a restore would pick and fail on."""
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=8, snapshot_days={1, 2, 6})
    old = list_snapshots(storage)[:2]
    follow_until(storage, at_day(12))
    report = plan_retention(storage, RetentionPolicy(keep_days=1, keep_snapshots=0), at_day(12))
    assert report.base == str(list_snapshots(storage)[2].as_of)
    rows = [d.key for d in report.deletions if d.kind == "snapshot"]
    for snap in old:
        mine = [k for k in rows if k.startswith(f"snapshots/{snap.key}/")]
        assert len(mine) > 1 and mine[0] == snap.manifest_key, mine
        assert sorted(mine) == sorted(storage.list(f"snapshots/{snap.key}/"))


def test_an_orphan_segment_at_the_base_goes_and_one_after_it_stays(tmp_path: Path) -> None:
    """An orphan (a segment without its manifest, left by a retention killed between the two
    deletes) is judged by its first group: at the base position it holds nothing past the base,
    after it, it may."""
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days={2})
    base = list_snapshots(storage)[0].as_of
    at_base = segment_key(base, "zstd")
    after_base = segment_key(EventId(base.ms, base.seq + 1), "zstd")
    for key in (at_base, after_base):
        storage.put(key, b"an orphan's bytes")
    report = run_retention_job(
        storage, RetentionPolicy(keep_days=2, keep_snapshots=0), now=at_day(6)
    )
    assert report.base == str(base)
    assert not storage.exists(at_base)
    assert storage.exists(after_base)


def test_without_a_base_a_damaged_oldest_manifest_keeps_the_snapshot_its_segment_follows(
    tmp_path: Path,
) -> None:
    """Older segments pruned, no base now, and the oldest kept manifest damaged: what its
    segment continues from is unknown, so the newest snapshot before the segment stays (a
    repaired manifest needs it), and so does the one the next manifest continues from."""
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=8, snapshot_days={2, 3, 5, 7})
    follow_until(storage, at_day(9))
    first = run_retention_job(
        storage, RetentionPolicy(keep_days=6, keep_snapshots=0), now=at_day(9)
    )
    snaps = [str(s.as_of) for s in list_snapshots(storage)]
    assert first.base == snaps[0] and len(snaps) == 4  # day 2's, then 3, 5, 7
    oldest = next(iter(storage.list("manifests/")))
    storage.put(oldest, b"{damaged")
    report = plan_retention(storage, RetentionPolicy(keep_days=30, keep_snapshots=1), at_day(9))
    assert report.base is None
    # Day 2's (before the damaged segment), day 3's (the next manifest's), day 7's (newest).
    assert report.kept_snapshots == [snaps[0], snaps[1], snaps[3]]


def test_prune_dry_run_deletes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`opencti-sync prune --dry-run` lists what retention would delete and deletes none of it;
    without the flag the same plan is applied."""
    from connector.__main__ import main

    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days={2})
    config = tmp_path / "config.yml"
    config.write_text(f"retention: {{keep_days: 1}}\nconnector: {{work_dir: {tmp_path / 'w'}}}\n")
    argv = ["prune", "--archive", str(tmp_path / "a"), "--config", str(config)]
    before = sorted(storage.list())
    assert main([*argv, "--dry-run"]) == 0
    assert sorted(storage.list()) == before
    assert main(argv) == 0
    assert set(storage.list()) < set(before)
    capsys.readouterr()
