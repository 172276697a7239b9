"""The snapshot and retention jobs cut at every storage call, then run again.

The simulator's generator plays a random history on a sample (creates, updates, standard-id
changes, merges, deletes), the real ``ArchiveSink`` archives it in small segments into a local
directory (a quarantine record and the checkpoint after each quarter of it), and the real
snapshot job writes snapshots on the way. Three archives to start from:

* *before snapshot*: the history's first three quarters, snapshots S1 and S2 after the first
  and the second; the job writes S3;
* *before retention*: the same with S3, then the last quarter. The clock (``now``, given to
  the job) puts the window's start W between S2 and S3: S2 is the base, so S1, the segments
  S2 covers and the quarantine records before it go;
* *with S4*: the same with S4 at its end (with ``keep_snapshots=1`` retention deletes S3
  too), and the lock of a retention job killed just after it took it.

A clean run of a job records every call it makes to the archive's storage (a subclass of our
``LocalStorage``: listings, reads, the lock's writes and compare-and-swap, puts, deletes).
Each case runs the job again on a fresh copy and cuts it at one of those calls: ``kill``, the
process dies just before it; ``kill-after``, just after it returned (for writes only: after a
read is the same as before the next call). From the cut on no call of that run reaches the
archive, the lock's release included; the lock record left then names a process that is gone,
as a killed job's does. Then the jobs go on: the cut job again; or the other job, then the cut
one again; or (after a cut snapshot) the connector archives the last quarter, then a snapshot
and retention.

Checked after the cut and after each job that follows:

* ``verify`` finds no error; its warnings are only those the docs allow after a crash (an
  orphan segment, an unfinished snapshot);
* a restore to points inside the window (W itself included) and to the archive's end equals
  the restore of the same history from an archive of segments alone (objects, aliases,
  tombstones, row for row), which equals the simulator's own state; to a point before W it is
  that too, or said incomplete, or refused: never silently wrong;
* nothing that the uncut jobs keep is missing: the base snapshot, the segments after it, the
  quarantine records it does not cover;

and once the jobs are done the archive holds exactly what the uncut jobs leave: every object
byte for byte, but for the dates in the checkpoint and in snapshot manifests, and the snapshot
a manifest says it was built on (a cut may leave one fewer).

``CUT_EVERYWHERE=1`` cuts at every call (292 cases, about 6 min); otherwise at 9 (about 15 s).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard

from connector.archive import ArchiveReader
from connector.archive.layout import quarantine_key
from connector.checkpoint import CHECKPOINT_KEY, Checkpoint, CheckpointStore
from connector.errors import PermanentError
from connector.events import EventId, StreamEvent
from connector.jobs import LOCK_KEY, run_retention_job, run_snapshot_job
from connector.restore import materialise_plan
from connector.retention import RetentionPolicy, trusted_now
from connector.sim import sample_bundle
from connector.sim.generator import generate
from connector.sim.store import SimStore
from connector.snapshot import STATE_KIND, list_snapshots
from connector.storage.local import LocalStorage
from connector.verify import format_report, verify_archive
from tests.support import cuts
from tests.support.simlog import sim_events
from tests.support.statedb import state_tables
from tests.test_state import (
    SAMPLE,
    archive_events,
    assert_equal_objects,
    sim_objects,
    state_objects,
    ticking_clock,
)

EVERYWHERE, LONG = cuts.EVERYWHERE, cuts.LONG
DAY_MS = 86_400_000
POLICY = RetentionPolicy(keep_days=1, keep_snapshots=1)
# What verify may warn about in an archive a job was cut in (docs/ARCHIVE.md).
ALLOWED_WARNINGS = ("orphan segment ", "unfinished snapshot ")
WRITES = ("put", "put_if_absent", "replace_if", "delete")


Killed = cuts.Uncaught
Plan = cuts.UncaughtPlan
CutStorage = cuts.CutStorage


def _bury(root: Path) -> None:
    """The lock a killed job left names its process, which is gone now."""
    cuts.bury(LocalStorage(root), LOCK_KEY)


# ---------------------------------------------------------------------- the history
@dataclass
class World:
    plain: LocalStorage  # the whole history, segments only: the reference
    starts: dict[str, Path]  # the archives the sweeps start from, by name
    rest: list[StreamEvent]  # the history's last quarter, archived by the "run" job
    now: dt.datetime
    window: EventId
    inside: list[EventId]  # restore points inside the window
    outside: list[EventId]  # restore points before it
    tmp: Path
    references: dict[EventId, dict[str, list[tuple[Any, ...]]]]

    def reference(self, until: EventId) -> dict[str, list[tuple[Any, ...]]]:
        if until not in self.references:
            self.references[until] = _tables(self.plain, until, self.tmp / "reference")
        return self.references[until]


def _tables(storage: LocalStorage, until: EventId | None, work: Path) -> dict[str, Any]:
    state, _ = materialise_plan(storage, until=until, work_dir=work)
    state.close()
    return state_tables(work / "restore-state.sqlite")


def _quarantine(storage: LocalStorage, after: EventId) -> None:
    record = {
        "reason": "unreadable event (test)",
        "after_event_id": str(after),
        "id": f"{after.ms}-{after.seq + 1}",
        "event": "update",
        "data": "not json",
    }
    body = orjson.dumps(record)
    storage.put_if_absent(quarantine_key(after, hashlib.sha256(body).hexdigest()), body)


def _checkpoint(storage: LocalStorage, last: EventId) -> None:
    newest = ArchiveReader(storage).newest()
    assert newest is not None and newest.last == last
    CheckpointStore(storage).save(
        Checkpoint(
            "live",
            "http://platform.test",
            last_event_id=str(last),
            last_segment=newest.segment,
            last_segment_last_id=str(last),
        )
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("jobs-cut")
    store = SimStore(clock=ticking_clock(step=DAY_MS // 96))  # a quarter of an hour an edit
    store.load_bundle(sample_bundle(SAMPLE))
    marks = []
    for n in range(8):
        generate(store, 25, seed=n)
        marks.append((EventId.parse(str(store.last_event_id)), sim_objects(store)))
    stream, _ = sim_events(store)
    kinds = {ev.event for ev in stream}
    assert {"create", "update", "merge", "delete"} <= kinds, kinds

    plain = LocalStorage(tmp / "plain")
    archive_events(plain, stream, per_segment=9)
    # The reference is the simulator's own state where the history says it.
    for until, objects in marks:
        state, _ = materialise_plan(plain, until=until, work_dir=tmp / "marks")
        with state:
            assert_equal_objects(state_objects(state), objects)

    root = tmp / "before-snapshot" / "archive"
    storage = LocalStorage(root)
    quarters = [len(stream) * q // 4 for q in range(5)]
    last: EventId | None = None
    for q in range(3):
        last = _archive(storage, stream[quarters[q] : quarters[q + 1]], last)
        if q < 2:
            assert run_snapshot_job(storage, tmp / "work") is not None
    rest = stream[quarters[3] :]
    # Before retention: the snapshot job ran, then the connector archived the last quarter;
    # and the same with the snapshot of that.
    before_retention = tmp / "before-retention" / "archive"
    shutil.copytree(root, before_retention)
    storage = LocalStorage(before_retention)
    assert run_snapshot_job(storage, tmp / "work") is not None
    _archive(storage, rest, last)
    with_s4 = tmp / "with-s4" / "archive"
    shutil.copytree(before_retention, with_s4)
    assert run_snapshot_job(LocalStorage(with_s4), tmp / "work") is not None
    s1, s2, s3, s4 = (s.as_of for s in list_snapshots(LocalStorage(with_s4)))
    assert s3 == last and s4 == stream[-1].id
    window = EventId(s2.ms + (s3.ms - s2.ms) // 3, 0)
    now = dt.datetime.fromtimestamp((window.ms + DAY_MS) / 1000, dt.UTC)
    for path in (root, before_retention, with_s4):
        assert trusted_now(LocalStorage(path), now) == now
    # There, a retention job was killed just after it took the lock: the next one takes it over.
    with pytest.raises(Killed):
        run_retention_job(CutStorage(with_s4, Plan(0, "kill-after")), POLICY, now=now)
    _bury(with_s4)
    ids = sorted({ev.id for ev in stream})
    inside = [i for i in ids if i >= window]
    outside = [i for i in ids if i < window]
    return World(
        plain=plain,
        starts={"before snapshot": root, "before retention": before_retention, "with S4": with_s4},
        rest=rest,
        now=now,
        window=window,
        inside=[window, *inside[:: max(1, len(inside) // 7)], s3, s4],
        outside=[s1, outside[len(outside) // 2], s2, outside[-1]],
        tmp=tmp,
        references={},
    )


def _archive(storage: LocalStorage, events: list[StreamEvent], after: EventId | None) -> EventId:
    """What the connector does meanwhile: ``events`` archived after ``after``, with a
    quarantine record after them and the checkpoint."""
    last = archive_events(storage, events, per_segment=9, after=after)
    assert last is not None
    _quarantine(storage, last)
    _checkpoint(storage, last)
    return last


# ---------------------------------------------------------------------- the jobs and checks
Job = Callable[[LocalStorage, Path], None]


def _job(name: str, world: World) -> Job:
    """The snapshot job, the retention job (at ``world.now``), or the connector archiving the
    history's last quarter ("run")."""

    def snapshot(storage: LocalStorage, work: Path) -> None:
        run_snapshot_job(storage, work)

    def retention(storage: LocalStorage, _work: Path) -> None:
        run_retention_job(storage, POLICY, now=world.now)

    def run(storage: LocalStorage, _work: Path) -> None:
        _archive(storage, world.rest, _end(storage))

    return {"snapshot": snapshot, "retention": retention, "run": run}[name]


def _end(storage: LocalStorage) -> EventId:
    """Where the archive ends (the checkpoint's position)."""
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.last_event_id is not None
    return EventId.parse(cp.last_event_id)


def _contents(root: Path) -> dict[str, bytes]:
    """Every object of the archive but the lock; snapshot manifests and the checkpoint
    without their dates (and a snapshot without the one it was built on); a snapshot's state
    image as the tables it holds (its bytes depend on how its database was built: from the
    previous snapshot's image or parts, or from the segments), and its entry in the manifest
    without its sha256 and size."""
    storage = LocalStorage(root)
    out: dict[str, bytes] = {}
    for key in storage.list():
        if key == LOCK_KEY:
            continue
        body = storage.get(key)
        if key.startswith("snapshots/") and key.endswith("/manifest.json"):
            manifest = orjson.loads(body)
            # Its date, and the snapshot it was built on: a cut job may leave one fewer.
            manifest.pop("created_at")
            manifest.pop("based_on")
            for part in manifest["parts"]:
                if part["kind"] == STATE_KIND:
                    part.pop("sha256"), part.pop("size")
            body = orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS)
        elif key.startswith("snapshots/") and "/state.sqlite" in key:
            image = root.parent / "image.sqlite"
            image.write_bytes(zstandard.ZstdDecompressor().stream_reader(body).read())
            body = repr(state_tables(image)).encode()
            image.unlink()
        elif key == CHECKPOINT_KEY:
            checkpoint = orjson.loads(body)
            checkpoint.pop("saved_at")
            body = orjson.dumps(checkpoint, option=orjson.OPT_SORT_KEYS)
        out[key] = body
    return out


def _check(world: World, root: Path, keep: set[str], what: str) -> None:
    """The archive at ``root`` verifies, restores right and holds what the jobs keep."""
    storage = LocalStorage(root)
    work = root.parent / "check"
    report = verify_archive(storage, work_dir=work / "verify")
    assert report.ok, f"{what}: verify: {format_report(report)}"
    odd = [w for w in report.warnings if not w.startswith(ALLOWED_WARNINGS)]
    assert not odd, f"{what}: verify warns {odd}"
    missing = sorted(k for k in keep if not storage.exists(k))
    assert not missing, f"{what}: deleted what the policy keeps: {missing[:5]}"
    end = _end(storage)
    for until in [*(p for p in world.inside if p <= end), None]:
        want = world.reference(end if until is None else until)
        got = _tables(storage, until, work / "restore")
        for table in ("objects", "aliases", "tombstones"):
            assert got[table] == want[table], f"{what}: restore --until {until}: {table} differ"
    for until in world.outside:
        try:
            state, plan = materialise_plan(storage, until=until, work_dir=work / "restore")
        except PermanentError:
            continue  # refused: the history before the window is pruned (or being pruned)
        state.close()
        if plan.incomplete:
            continue  # said
        got = state_tables(work / "restore" / "restore-state.sqlite")
        want = world.reference(until)
        for table in ("objects", "aliases", "tombstones"):
            assert got[table] == want[table], (
                f"{what}: restore --until {until} (before the window) silently wrong: "
                f"{table} differ"
            )


@dataclass
class Sweep:
    """One job cut, and the jobs that may follow it."""

    start: str  # the archive it starts from (``World.starts``)
    cut: str  # the job cut
    then: tuple[tuple[str, ...], ...]  # each: the jobs run after the cut, in order


def _uncut(world: World, sweep: Sweep, tmp: Path) -> tuple[list[str], list[dict[str, bytes]]]:
    """The cut job's calls in a clean run, and what each sequence leaves uncut."""
    root = tmp / "clean" / "archive"
    shutil.copytree(world.starts[sweep.start], root)
    plan = Plan()
    _job(sweep.cut, world)(CutStorage(root, plan), tmp / "clean" / "work")
    finals = []
    for n, jobs in enumerate(sweep.then):
        again = tmp / f"clean-{n}" / "archive"
        shutil.copytree(root, again)
        for job in jobs:
            _job(job, world)(LocalStorage(again), tmp / f"clean-{n}" / "work")
        finals.append(_contents(again))
    return plan.calls, finals


def _case(
    world: World, sweep: Sweep, finals: list[dict[str, bytes]], tmp: Path, cut: int, how: str
) -> None:
    root = tmp / "cut" / "archive"
    shutil.copytree(world.starts[sweep.start], root)
    start = set(_contents(root))
    plan = Plan(cut, how)
    try:
        _job(sweep.cut, world)(CutStorage(root, plan), tmp / "cut" / "work")
    except Killed:
        pass
    assert plan.dead, "the cut was never reached"
    _bury(root)
    keep_any = set.intersection(*(start & set(final) for final in finals))
    _check(world, root, keep_any, "after the cut")
    for n, jobs in enumerate(sweep.then):
        again = tmp / f"then-{n}" / "archive"
        shutil.copytree(root, again)
        keep = start & set(finals[n])
        for k, job in enumerate(jobs):
            _job(job, world)(LocalStorage(again), tmp / f"then-{n}" / "work")
            _check(world, again, keep, f"then {' + '.join(jobs[: k + 1])}")
        got = _contents(again)
        assert sorted(got) == sorted(finals[n]), (
            f"then {' + '.join(jobs)}: the archive differs from the uncut jobs': "
            f"{sorted(set(got) ^ set(finals[n]))[:5]}"
        )
        differ = [k for k in got if got[k] != finals[n][k]]
        assert not differ, f"then {' + '.join(jobs)}: objects differ: {differ[:5]}"


Case = tuple[int, str]  # the call cut, and how
Sample = Callable[[list[str]], list[Case]]


def _cuts(calls: list[str], sample: Sample) -> list[Case]:
    """Every case (CUT_EVERYWHERE: each call killed before it, each write after it too), or
    the sampled ones."""
    if not EVERYWHERE:
        return sample(calls)
    out: list[Case] = []
    for i, call in enumerate(calls):
        out.append((i, "kill"))
        if call.split(" ")[0] in WRITES:
            out.append((i, "kill-after"))
    return out


def _first(calls: list[str], method: str, key: str = "", *, after: int = -1) -> int:
    """The first call ``method`` on a key starting with ``key``, after call ``after``."""
    return next(
        i
        for i, call in enumerate(calls)
        if i > after and call.split(" ")[0] == method and call.split(" ")[1].startswith(key)
    )


def _sweep(world: World, sweep: Sweep, tmp: Path, sample: Sample) -> list[str]:
    calls, finals = _uncut(world, sweep, tmp)
    failures: list[str] = []
    cases = _cuts(calls, sample)
    for i, how in cases:
        try:
            _case(world, sweep, finals, tmp / f"{how}-{i}", i, how)
        except AssertionError as exc:
            failures.append(f"{how} {i} {calls[i]}: {str(exc)[:600]}")
    print(f"{sweep.start}: {sweep.cut} ({len(calls)} calls) cut in {len(cases)} cases")
    assert not failures, f"{len(failures)} of {len(cases)} cuts failed:\n" + "\n".join(failures)
    return calls


# ---------------------------------------------------------------------- tests
def test_the_uncut_jobs_keep_every_restore_point(world: World, tmp_path: Path) -> None:
    """The starting archives and the uncut jobs pass every check, and retention has a real
    base and things of every kind to delete."""
    for name, start in world.starts.items():
        _check(world, start, set(), f"start {name}")
    root = tmp_path / "archive"
    shutil.copytree(world.starts["before retention"], root)
    before = set(_contents(root))
    report = run_retention_job(LocalStorage(root), POLICY, now=world.now)
    s1, s2, s3, s4 = (s.as_of for s in list_snapshots(LocalStorage(world.starts["with S4"])))
    assert report.base == str(s2) and report.window_start == world.window
    kinds = report.counts()
    assert kinds.get("snapshot") and kinds.get("segment") and kinds.get("quarantine"), kinds
    assert kinds["manifest"] == kinds["segment"] >= 3, kinds
    _check(world, root, set(), "uncut retention")
    run_snapshot_job(LocalStorage(root), tmp_path / "work")
    run_retention_job(LocalStorage(root), POLICY, now=world.now)
    # The base stays, and S3 goes, with keep_snapshots=1.
    assert [s.as_of for s in list_snapshots(LocalStorage(root))] == [s2, s4]
    _check(world, root, set(), "uncut jobs")
    assert len(before - set(_contents(root))) > 10


def _snapshot_sample(calls: list[str]) -> list[Case]:
    """A part just written, the manifest (before and after: the commit)."""
    manifest = next(i for i, c in enumerate(calls) if c.endswith("/manifest.json") and "put" in c)
    return [
        (_first(calls, "put_if_absent", "snapshots/"), "kill-after"),
        (manifest, "kill"),
        (manifest, "kill-after"),
    ]


@LONG
def test_a_snapshot_job_cut_at_every_call(world: World, tmp_path: Path) -> None:
    """Cut anywhere, then: run again; retention, then run again; or the connector archives
    more, then a snapshot and retention."""
    sweep = Sweep(
        "before snapshot",
        "snapshot",
        (("snapshot",), ("retention", "snapshot"), ("run", "snapshot", "retention")),
    )
    calls = _sweep(world, sweep, tmp_path, _snapshot_sample)
    assert any(c.startswith("put_if_absent snapshots/") for c in calls), calls


def _retention_sample(calls: list[str]) -> list[Case]:
    """An old snapshot's manifest just deleted (its parts left); a segment's manifest about
    to go, and just deleted (the segment left an orphan); the lock left unreleased."""
    segment_manifest = _first(
        calls, "delete", "manifests/", after=_first(calls, "delete", "events/")
    )
    return [
        (_first(calls, "delete", "snapshots/"), "kill-after"),
        (segment_manifest, "kill"),
        (segment_manifest, "kill-after"),
        (_first(calls, "delete", LOCK_KEY), "kill"),
    ]


@LONG
def test_a_retention_job_cut_at_every_call(world: World, tmp_path: Path) -> None:
    """Cut anywhere, then: run again; or a snapshot, then run again."""
    sweep = Sweep("before retention", "retention", (("retention",), ("snapshot", "retention")))
    calls = _sweep(world, sweep, tmp_path, _retention_sample)
    assert any(c.startswith("delete manifests/") for c in calls), calls


def _newer_snapshot_sample(calls: list[str]) -> list[Case]:
    """The snapshot beyond ``keep_snapshots`` (newer than the base): its manifest just
    deleted; the lock of the killed job just taken over."""
    manifests = [
        i
        for i, c in enumerate(calls)
        if c.startswith("delete snapshots/") and c.endswith("/manifest.json")
    ]
    return [(manifests[-1], "kill-after"), (_first(calls, "replace_if", LOCK_KEY), "kill-after")]


@LONG
def test_a_retention_job_deleting_a_newer_snapshot_cut_at_every_call(
    world: World, tmp_path: Path
) -> None:
    """With S4 there, retention also deletes S3 (``keep_snapshots=1``), once it took over
    the lock a killed job left: cut anywhere, then run again."""
    sweep = Sweep("with S4", "retention", (("retention",),))
    calls = _sweep(world, sweep, tmp_path, _newer_snapshot_sample)
    s3 = str(list_snapshots(LocalStorage(world.starts["with S4"]))[2].as_of.key)
    assert f"delete snapshots/{s3}/manifest.json" in calls, calls
    assert f"replace_if {LOCK_KEY}" in calls, calls
