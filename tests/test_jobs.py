"""Job lock, schedules and the background runner (real scheduler, real storage)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import BinaryIO

import orjson
import pytest
from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from connector import jobs
from connector.errors import ConfigError, RetryableError
from connector.jobs import (
    LOCK_KEY,
    JobLock,
    JobRunner,
    LockHeld,
    LockRecord,
    parse_schedule,
    run_retention_job,
    run_snapshot_job,
)
from connector.locks import elapsed_clock
from connector.metrics import REGISTRY
from connector.retention import RetentionPolicy
from connector.snapshot import list_snapshots
from connector.storage import Body, Storage
from connector.storage.local import LocalStorage
from tests.support.connector import ROOT, wait_until
from tests.support.s3 import moto_server, s3_settings, s3_storage  # noqa: F401
from tests.test_verify import build_good


def _runner(storage: Storage, tmp_path: Path, *, snapshot: str, retention: str) -> JobRunner:
    """A runner with these schedules, keeping one day of history."""
    return JobRunner(
        storage,
        snapshot_schedule=snapshot,
        retention_schedule=retention,
        retention=RetentionPolicy(keep_days=1, keep_snapshots=0),
        work_dir=tmp_path / "w",
    )


def test_parse_schedule() -> None:
    assert parse_schedule("") is None
    assert parse_schedule("   ") is None
    cron = parse_schedule("0 3 * * *")
    assert isinstance(cron, CronTrigger)
    every = parse_schedule("every 15m")
    assert isinstance(every, IntervalTrigger)
    assert every.interval == dt.timedelta(minutes=15)
    day = parse_schedule("every 1d")
    assert isinstance(day, IntervalTrigger) and day.interval == dt.timedelta(days=1)
    for bad in ("every 0s", "every 5w", "0 3 * *", "61 * * * *", "daily"):
        with pytest.raises(ConfigError) as info:
            parse_schedule(bad, "snapshot.schedule")
        assert info.value.key == "snapshot.schedule"


def test_lock_excludes_and_releases(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    first = JobLock(storage, "snapshot")
    with first:
        record = orjson.loads(storage.get(LOCK_KEY))
        assert record["owner"] == first.owner and record["job"] == "snapshot"
        with pytest.raises(LockHeld, match="snapshot"), JobLock(storage, "retention"):
            pass
        assert first.held
    assert not storage.exists(LOCK_KEY)
    with JobLock(storage, "retention"):
        assert storage.exists(LOCK_KEY)


def test_release_ends_the_renewals_at_once(tmp_path: Path) -> None:
    """A renewal thread left running would renew a lock that is gone (and call it lost), and
    release would wait on it for its whole join timeout."""
    storage = LocalStorage(tmp_path / "a")
    lock = JobLock(storage, "release-check", ttl_secs=3)  # renewed every second
    lock.acquire()
    started = time.monotonic()
    lock.release()
    assert time.monotonic() - started < 2
    assert not [t for t in threading.enumerate() if t.name == "lock-renew-release-check"]
    assert not storage.exists(LOCK_KEY) and not lock.lost


@pytest.mark.parametrize("here", [False, True])
def test_expired_lock_is_taken_over(tmp_path: Path, here: bool) -> None:
    """At once: a record this machine's clock dated past, or one from anywhere dated long past
    (another machine's clock may run minutes behind ours, not an hour)."""
    storage = LocalStorage(tmp_path / "a")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5 if here else 3600)
    record = {"owner": "dead-process", "job": "snapshot", "expires_at": past.isoformat()}
    if here:  # a holder on this machine whose pid is not known (pid 0)
        record["pidns"] = JobLock(storage, "x")._record().pidns
    storage.put(LOCK_KEY, orjson.dumps(record))
    lock = JobLock(storage, "retention")
    with lock:
        assert orjson.loads(storage.get(LOCK_KEY))["owner"] == lock.owner
    assert not storage.exists(LOCK_KEY)


def test_unreadable_lock_counts_as_expired(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    storage.put(LOCK_KEY, b"{truncated")
    with JobLock(storage, "snapshot") as lock:
        assert lock.held


def test_release_keeps_a_lock_taken_over_by_another(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    lock = JobLock(storage, "snapshot")
    lock.acquire()
    future = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    other = {"owner": "other", "job": "retention", "expires_at": future.isoformat()}
    storage.put(LOCK_KEY, orjson.dumps(other))
    lock.release()
    assert orjson.loads(storage.get(LOCK_KEY))["owner"] == "other"


def test_a_storage_blip_at_release_neither_keeps_the_lock_nor_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two transient failures while the job lock is released: it is still released, and the
    job's own outcome is not replaced by the storage's error."""
    monkeypatch.setattr(jobs, "_RELEASE_PAUSES", (0.01, 0.01, 0.01), raising=False)

    class Blip(LocalStorage):
        failures = 0

        def delete(self, key: str) -> None:
            if key == LOCK_KEY and self.failures < 2:
                self.failures += 1
                raise RetryableError("S3 delete locks/archive-jobs.json: (transient)")
            super().delete(key)

    storage = Blip(tmp_path / "a")
    with JobLock(storage, "snapshot"):
        pass
    assert storage.failures == 2 and not storage.exists(LOCK_KEY)
    with JobLock(storage, "retention"):  # the next job is not held off
        pass


def test_snapshot_and_retention_exclude_each_other(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    with JobLock(storage, "snapshot"):
        with pytest.raises(LockHeld):
            run_retention_job(storage, RetentionPolicy(keep_days=1, keep_snapshots=0))
        with pytest.raises(LockHeld):
            run_snapshot_job(storage, tmp_path / "w")
    assert list_snapshots(storage) == []
    info = run_snapshot_job(storage, tmp_path / "w")
    assert info is not None and not storage.exists(LOCK_KEY)
    assert run_snapshot_job(storage, tmp_path / "w") is None  # nothing new


def test_a_snapshot_job_that_lost_its_lock_does_not_commit(tmp_path: Path) -> None:
    """A job paused past its lease loses the lock; the new holder's retention may delete its
    parts as a killed job's leftovers. It must then not write its manifest (which would name
    missing parts): here another process takes the lock over while the first part is written."""
    root = tmp_path / "a"
    build_good(LocalStorage(root))
    taker = JobLock(LocalStorage(root), "retention", owner="another-process")
    takeovers = []

    class TakenOverMidway(LocalStorage):
        def put_if_absent(self, key: str, body: Body) -> bool:
            written = super().put_if_absent(key, body)
            if key.startswith("snapshots/") and not takeovers:
                found = taker._read_tagged()  # noqa: SLF001 - the record as a taker reads it
                assert found is not None
                taker.take_over(found[1])  # as after the holder's lease ran out
                takeovers.append(key)
            return written

    storage = TakenOverMidway(root)
    with pytest.raises(LockHeld, match="taken over"):
        run_snapshot_job(storage, tmp_path / "w")
    assert list_snapshots(storage) == []  # nothing committed; the parts are retention's
    record = taker.read()
    assert record is not None and record.owner == "another-process"  # the lock stays the taker's
    taker.release()
    info = run_snapshot_job(storage, tmp_path / "w")  # the next try commits
    assert info is not None and [s.as_of for s in list_snapshots(storage)] == [info.as_of]


def test_lock_on_s3(s3_storage: Storage) -> None:  # noqa: F811
    with JobLock(s3_storage, "snapshot"):
        with pytest.raises(LockHeld):
            JobLock(s3_storage, "retention").acquire()
    with JobLock(s3_storage, "retention"):
        pass
    assert not s3_storage.exists(LOCK_KEY)


def _errors(kind: str) -> float:
    return REGISTRY.get_sample_value("opencti_sync_errors_total", {"kind": kind}) or 0.0


def test_failing_job_is_counted_and_never_raises(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    # A damaged manifest makes the snapshot job fail (PermanentError from the archive reader).
    first = next(iter(storage.list("manifests/")))
    storage.put(first, b"{not json")
    runner = _runner(storage, tmp_path, snapshot="0 3 * * *", retention="")
    before = _errors("job_snapshot")
    runner.run_snapshot()  # direct call: must not raise
    assert runner.failures["snapshot"] == 1
    assert _errors("job_snapshot") == before + 1
    assert not storage.exists(LOCK_KEY)  # the lock was released despite the failure

    # Through the real scheduler thread: run the job now, wait for it, the scheduler lives on.
    done = threading.Event()
    errors_seen: list[object] = []
    runner.scheduler.add_listener(errors_seen.append, EVENT_JOB_ERROR)
    runner.scheduler.add_listener(lambda _event: done.set(), EVENT_JOB_EXECUTED | EVENT_JOB_ERROR)
    runner.start()
    try:
        runner.scheduler.modify_job("snapshot", next_run_time=dt.datetime.now(dt.UTC))
        assert done.wait(20)
        assert runner.failures["snapshot"] == 2
        assert runner.scheduler.running
        # The wrapper swallowed the failure: apscheduler saw a normal completion.
        assert errors_seen == []
        assert runner.scheduler.get_job("snapshot") is not None
        assert runner.scheduler.get_job("retention") is None
    finally:
        runner.shutdown()
    assert not runner.scheduler.running


def test_a_scheduled_snapshot_is_logged_in_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator reads what the job did, not a dataclass dump of every part."""
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    runner = _runner(storage, tmp_path, snapshot="0 3 * * *", retention="")
    caplog.set_level("INFO", logger="connector.jobs")
    runner.run_snapshot()
    runner.run_snapshot()
    done = [r.result for r in caplog.records if r.getMessage() == "Archive job finished."]  # type: ignore[attr-defined]
    info = list_snapshots(storage)[-1]
    assert done == [
        f"snapshot {info.as_of}: {info.object_count} objects, {info.tombstone_count} "
        f"tombstones, {len(info.parts)} parts with its state image, "
        f"{sum(p.size for p in info.parts)} bytes "
        "(based on nothing)",
        "snapshot: nothing new since the last one",
    ]


def test_interval_jobs_overdue_at_start_run_soon(tmp_path: Path) -> None:
    """``every 24h`` counts from each start: a connector redeployed daily would never take a
    snapshot. Interval jobs first run within five minutes of start; a snapshot job then waits
    for one interval after the newest snapshot when that is still ahead."""
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)

    def restart() -> JobRunner:
        runner = _runner(storage, tmp_path, snapshot="every 24h", retention="every 24h")
        runner.start()
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=301)
        for name in ("snapshot", "retention"):
            assert runner.scheduler.get_job(name).next_run_time <= soon
        return runner

    runner = restart()  # no snapshot yet: the first run takes one
    try:
        runner.run_snapshot()
        assert runner.runs["snapshot"] == 1 and len(list_snapshots(storage)) == 1
    finally:
        runner.shutdown()
    runner = restart()  # a fresh snapshot: the first run moves to a day after it
    try:
        runner.run_snapshot()
        assert runner.runs["snapshot"] == 0
        later = runner.scheduler.get_job("snapshot").next_run_time
        assert later >= dt.datetime.now(dt.UTC) + dt.timedelta(hours=23)
    finally:
        runner.shutdown()
    info = list_snapshots(storage)[-1]  # the newest snapshot two days old: due at once
    manifest = orjson.loads(storage.get(info.manifest_key))
    manifest["created_at"] = "2001-01-01T00:00:00Z"
    storage.put(info.manifest_key, orjson.dumps(manifest))
    runner = restart()
    try:
        runner.run_snapshot()
        assert runner.runs["snapshot"] == 1
    finally:
        runner.shutdown()
    # The newest snapshot stamped by a clock a month ahead (written while this host's ran
    # ahead, or by another machine): the schedule waited a month, again after each restart.
    info = list_snapshots(storage)[-1]
    manifest = orjson.loads(storage.get(info.manifest_key))
    ahead = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    manifest["created_at"] = ahead.isoformat(timespec="seconds").replace("+00:00", "Z")
    storage.put(info.manifest_key, orjson.dumps(manifest))
    runner = restart()
    try:
        runner.run_snapshot()
        assert runner.runs["snapshot"] == 0
        later = runner.scheduler.get_job("snapshot").next_run_time
        assert later <= dt.datetime.now(dt.UTC) + dt.timedelta(hours=24, minutes=5)
    finally:
        runner.shutdown()


def test_a_snapshot_time_without_an_offset_is_read_as_utc(tmp_path: Path) -> None:
    """A newest snapshot whose created_at has no UTC offset (a manifest from another tool, or
    edited by hand): read as UTC. Compared as it was with the aware clock, the due check raised
    a TypeError outside the job's guard, straight into the scheduler, and no snapshot was taken
    (neither run nor counted as failed)."""
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    runner = _runner(storage, tmp_path, snapshot="0 3 * * *", retention="")
    runner.run_snapshot()
    info = list_snapshots(storage)[-1]
    manifest = orjson.loads(storage.get(info.manifest_key))
    manifest["created_at"] = "2001-01-01T00:00:00"  # long due
    storage.put(info.manifest_key, orjson.dumps(manifest))
    runner = _runner(storage, tmp_path, snapshot="every 24h", retention="")
    runner.start()
    try:
        runner.run_snapshot()  # direct call: must not raise
        assert runner.runs["snapshot"] == 1 and runner.failures["snapshot"] == 0
    finally:
        runner.shutdown()


def test_runner_rejects_bad_schedule(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        JobRunner(
            LocalStorage(tmp_path / "a"),
            snapshot_schedule="",
            retention_schedule="every day",
            retention=RetentionPolicy(keep_days=1, keep_snapshots=0),
            work_dir=tmp_path / "w",
        )
    assert info.value.key == "retention.schedule"


def test_lock_held_job_is_skipped_not_failed(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    runner = _runner(storage, tmp_path, snapshot="", retention="every 1h")
    with JobLock(storage, "snapshot"):
        runner.run_retention()
    assert runner.runs["retention"] == 1 and runner.failures["retention"] == 0


def test_jobs_of_one_process_take_turns_instead_of_skipping(tmp_path: Path) -> None:
    """Both schedules firing at once (same cron line): each job runs, one after the other."""
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    runner = _runner(storage, tmp_path, snapshot="every 1h", retention="every 1h")
    threads = [
        threading.Thread(target=runner.run_snapshot),
        threading.Thread(target=runner.run_retention),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert runner.runs == {"snapshot": 1, "retention": 1}
    assert runner.skipped == {"snapshot": 0, "retention": 0}
    assert runner.failures == {"snapshot": 0, "retention": 0}
    assert len(list_snapshots(storage)) == 1


def test_a_job_locked_out_by_another_process_is_retried(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    runner = _runner(storage, tmp_path, snapshot="every 24h", retention="")
    runner.start()
    try:
        with JobLock(storage, "retention"):  # another connector's job on the same archive
            runner.run_snapshot()
        assert runner.skipped["snapshot"] == 1 and runner.failures["snapshot"] == 0
        retry = runner.scheduler.get_job("snapshot-retry")
        assert retry is not None and retry.next_run_time < dt.datetime.now(dt.UTC) + dt.timedelta(
            hours=1
        )
    finally:
        runner.shutdown()


def _foreign(storage: Storage, expires_in: float, *, seq: int = 0) -> None:
    """Write the lock record of a job on another machine (its own clock, its own host); ``seq``
    changes the record as a renewal does."""
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_in)
    record = LockRecord(f"other-host-job-{seq}", "snapshot", expires, "another-host", 4242, "")
    storage.put(LOCK_KEY, record.to_json())


def _owner(storage: Storage) -> str:
    return str(orjson.loads(storage.get(LOCK_KEY))["owner"])


@pytest.mark.parametrize("one_owner", [False, True])
def test_a_live_holder_whose_clock_runs_behind_keeps_the_lock(
    tmp_path: Path, one_owner: bool
) -> None:
    """Another machine's clock runs minutes behind ours: each renewal writes a date already past
    by our clock. The holder renews, so the lock is never taken over, whatever its dates say;
    also when a renewal changes only the expiry, its owner staying (as a real holder renews:
    each renewal is a new sighting, the record never seen unchanged for a lease)."""
    storage = LocalStorage(tmp_path / "a")
    # A renewal is a read and a conditional write (two fsyncs): on a loaded machine one can take
    # a good part of a second, so the lease leaves far more than that between two renewals.
    lock = JobLock(storage, "retention", ttl_secs=1.5)
    renewing = threading.Event()
    displaced: list[str] = []

    def renew() -> None:  # often within the lease, as a live holder does: only its own record
        for seq in range(1, 1_000_000):
            if renewing.wait(0.2):
                return
            data, tag = storage.get_with_tag(LOCK_KEY)
            owner = orjson.loads(data)["owner"]
            if not owner.startswith("other-host-job-"):
                displaced.append(owner)
                return
            expires = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
            owner = "other-host-job-0" if one_owner else f"other-host-job-{seq}"
            record = LockRecord(owner, "snapshot", expires, "another-host", 1)
            storage.replace_if(LOCK_KEY, record.to_json(), tag)

    _foreign(storage, -300)
    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 4.5  # three leases by our clock
        while time.monotonic() < deadline and not displaced:
            with pytest.raises(LockHeld):
                lock.acquire()
            time.sleep(0.05)
    finally:
        renewing.set()
        thread.join()
    assert displaced == [] and _owner(storage).startswith("other-host-job-")
    assert not lock.held


def test_a_dead_holder_whose_clock_ran_ahead_is_taken_over_after_a_lease(tmp_path: Path) -> None:
    """Another machine's clock ran a day ahead, then its job died: its record says it holds the
    lock until tomorrow. Seen unchanged for a whole lease by our clock, it is taken over."""
    storage = LocalStorage(tmp_path / "a")
    _foreign(storage, 86_400)
    ttl = 0.5
    lock = JobLock(storage, "snapshot", ttl_secs=ttl)
    first_seen = time.monotonic()
    deadline = first_seen + 30
    while True:
        try:
            lock.acquire()
            break
        except LockHeld:
            assert time.monotonic() < deadline, "a dead holder's lock was never taken over"
            time.sleep(0.05)
    try:
        assert time.monotonic() - first_seen >= ttl  # not before a whole lease
        assert _owner(storage) == lock.owner
    finally:
        lock.release()


def test_a_scheduled_job_takes_over_a_dead_holders_lock_on_its_retry(tmp_path: Path) -> None:
    """The runner's jobs share what they saw of the lock between their tries: a retry a lease
    after the skip takes over a record no one renewed meanwhile, however far ahead its date."""
    storage = LocalStorage(tmp_path / "a")
    build_good(storage)
    runner = JobRunner(
        storage,
        snapshot_schedule="",
        retention_schedule="every 1h",
        retention=RetentionPolicy(keep_days=1, keep_snapshots=0),
        work_dir=tmp_path / "w",
        lock_ttl_secs=0.3,
    )
    _foreign(storage, 86_400)
    runner.run_retention()
    assert runner.skipped["retention"] == 1
    time.sleep(0.4)
    runner.run_retention()
    assert runner.runs["retention"] == 2
    assert runner.skipped["retention"] == 1 and runner.failures["retention"] == 0
    # Taken over (then released, or left to expire: so short a lease was not renewed lately).
    assert not storage.exists(LOCK_KEY) or _owner(storage) != "other-host-job-0"


def test_snapshots_take_the_archive_codec_and_level(tmp_path: Path) -> None:
    """``ARCHIVE_CODEC=gzip`` (an operator who reads the archive with standard tools) gives
    gzip snapshots, parts and state image alike, from the command and from the schedule; a
    restore opens them."""
    from connector.__main__ import _start_jobs
    from connector.restore import materialise_plan
    from connector.settings import load_settings

    storage = LocalStorage(tmp_path / "a")
    archive = build_good(storage)
    env = {
        "ARCHIVE_URI": str(tmp_path / "a"),
        "ARCHIVE_CODEC": "gzip",
        "ARCHIVE_COMPRESSION_LEVEL": "9",
        "OPENCTI_SYNC_WORK_DIR": str(tmp_path / "w"),
        "PATH": os.environ["PATH"],
    }
    done = subprocess.run(
        [sys.executable, "-m", "connector", "snapshot"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    (by_command,) = list_snapshots(storage)
    archive.create(9)
    archive.flush()
    stop = threading.Event()
    runner = _start_jobs(
        load_settings(None, env={**env, "SNAPSHOT_SCHEDULE": "0 3 * * *"}), storage, stop
    )
    try:
        runner.run_snapshot()
    finally:
        stop.set()
        runner.shutdown()
    by_schedule = list_snapshots(storage)[-1]
    assert by_schedule.as_of != by_command.as_of
    for info in (by_command, by_schedule):
        assert info.codec == "gzip" and info.state_image is not None
        for part in info.parts:
            body = storage.get(part.key)
            assert part.key.endswith(".gz") and body[:2] == b"\x1f\x8b", part.key
            assert body[8] == 2  # the gzip header's "best compression" flag: level 9
    state, plan = materialise_plan(storage, until=None, work_dir=tmp_path / "r")
    state.close()
    assert plan.snapshot == by_schedule.key and plan.objects == len(archive.objects)


def test_a_storage_blip_does_not_end_the_lock_renewals(tmp_path: Path) -> None:
    """A renewal failing for a transient reason is tried again at the next interval: one blip
    must not leave the lock to expire under a long job."""

    class Blip(LocalStorage):
        armed = False
        failures = 0

        def get_with_tag(self, key: str) -> tuple[bytes, str]:
            if key == LOCK_KEY and self.armed:
                self.armed = False
                self.failures += 1
                raise RetryableError("S3 read locks/archive-jobs.json failed (transient)")
            return super().get_with_tag(key)

    storage = Blip(tmp_path / "a")
    lock = JobLock(storage, "snapshot", ttl_secs=0.3)  # renewed every 0.1 s
    with lock:
        storage.armed = True
        wait_until(lambda: storage.failures == 1, 30, what="the failed renewal")
        failed_at = elapsed_clock()
        # Liveness only: a renewal after the blip comes at the next interval.
        wait_until(lambda: lock.renewed_at > failed_at, 30, what="a renewal after the blip")
        assert not lock.lost


def test_a_lock_not_renewed_for_half_a_lease_is_not_deleted_at_release(tmp_path: Path) -> None:
    """Renewals failing (a storage outage) for over half a lease: another process may take the
    lock over between release's read and its delete, so release leaves it to expire."""

    class Outage(LocalStorage):
        renewals_fail = False
        take_over_on_read = False

        def replace_if(self, key: str, body: bytes, tag: str) -> bool:
            if key == LOCK_KEY and self.renewals_fail:
                raise RetryableError("S3 write locks/archive-jobs.json failed (transient)")
            return super().replace_if(key, body, tag)

        def get(self, key: str) -> bytes:
            data = super().get(key)
            if key == LOCK_KEY and self.take_over_on_read and threading.current_thread() is main:
                # Another process takes the (by now expired) lock over right after our read.
                future = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
                other = {"owner": "other", "job": "retention", "expires_at": future.isoformat()}
                super().put(key, orjson.dumps(other))
            return data

    main = threading.current_thread()
    storage = Outage(tmp_path / "a")
    lock = JobLock(storage, "snapshot", ttl_secs=0.4)
    lock.acquire()
    storage.renewals_fail = True
    time.sleep(0.3)  # past half the lease without a renewal (a lower bound, not a timing)
    storage.take_over_on_read = True
    lock.release()
    # No delete: the lock is ours, left to expire (and a take-over meanwhile would keep its).
    assert storage.exists(LOCK_KEY)


def test_a_held_lock_is_renewed_well_before_it_expires(tmp_path: Path) -> None:
    """Every third of a lease: a reader on this machine, who goes by the record's date, never
    finds it near its expiry while its holder lives."""
    storage = LocalStorage(tmp_path / "a")
    ttl = 3.0  # renewed every second: a slow renewal on a loaded machine still fits
    with JobLock(storage, "snapshot", ttl_secs=ttl) as lock:
        margins = []
        deadline = time.monotonic() + 1.2 * ttl  # past a whole lease since it was taken
        while time.monotonic() < deadline:
            record = lock.read()
            assert record is not None and record.owner == lock.owner
            margins.append((record.expires_at - dt.datetime.now(dt.UTC)).total_seconds())
            time.sleep(0.05)
    assert min(margins) > ttl / 4, min(margins)


class _LostAnswer(LocalStorage):
    """A compare-and-swap applied whose answer is lost: the client's retry of it is refused
    (the object is no longer the one read), so the caller hears False once."""

    lose = False

    def replace_if(self, key: str, body: bytes, tag: str) -> bool:
        done = super().replace_if(key, body, tag)
        if self.lose and key == LOCK_KEY:
            self.lose = False
            return False
        return done


def test_a_renewal_whose_answer_was_lost_keeps_the_lock(tmp_path: Path) -> None:
    storage = _LostAnswer(tmp_path / "a")
    with JobLock(storage, "snapshot", ttl_secs=600) as lock:  # no renewal of its own here
        storage.lose = True
        lock.renew()  # reads again: the record is ours, written by that very renewal
        assert not lock.lost and _owner(storage) == lock.owner


# A snapshot job in a child process, stopped (SIGSTOP, as a frozen VM) while it writes the part
# whose key holds argv[3]: ``PART`` is printed, then the write waits a moment, long enough for
# the parent to stop it.
_PAUSED_SNAPSHOT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from connector.jobs import LockHeld, run_snapshot_job
    from connector.storage.local import LocalStorage

    class Pausing(LocalStorage):
        paused = False

        def put_if_absent(self, key, body):
            if key.startswith("snapshots/") and sys.argv[3] in key and not Pausing.paused:
                Pausing.paused = True
                print("PART", key, flush=True)
                time.sleep(1.0)
            return super().put_if_absent(key, body)

    try:
        run_snapshot_job(Pausing(sys.argv[1]), Path(sys.argv[2]), ttl_secs=1.5)
    except LockHeld as exc:
        print("LOST", exc, flush=True)
    """
)


@pytest.mark.parametrize("paused_at", ["part-", "tombstones-"])
def test_a_snapshot_job_paused_past_its_lease_writes_nothing_more(
    tmp_path: Path, paused_at: str
) -> None:
    """Paused past its lease while it wrote a part (the first one, or the last one before its
    state image), another process took the lock over (and may commit the same snapshot).
    Resumed, the job wrote its other parts and its state image over what the new holder may
    have committed: only its manifest was refused."""
    root = tmp_path / "a"
    storage = LocalStorage(root)
    build_good(storage)
    child = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_SNAPSHOT, str(root), str(tmp_path / "w"), paused_at],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        first = child.stdout.readline().split()
        assert first[:1] == ["PART"], first
        child.send_signal(signal.SIGSTOP)
        time.sleep(2.0)  # past the lease of 1.5 s
        taker = JobLock(storage, "retention", ttl_secs=60)
        taker.acquire()  # the stopped holder's lease ran out
        try:
            child.send_signal(signal.SIGCONT)
            out, _ = child.communicate(timeout=60)
            assert out.startswith("LOST"), out
            written = sorted(storage.list("snapshots/"))
            assert written[-1] == first[1] and not [k for k in written if "state" in k], written
            assert _owner(storage) == taker.owner
        finally:
            taker.release()
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGCONT)
            child.kill()
            child.wait()


def test_a_lock_of_this_machine_expires_by_the_boot_clock_not_the_wall_clock(
    tmp_path: Path,
) -> None:
    """The wall clock stepped forward (an NTP step, a VM resumed): a live holder's record on
    this machine looks expired by its date while it still holds the lock; stepped back, a dead
    one's looks alive. Records of this boot carry their expiry on the kernel's boot clock."""
    storage = LocalStorage(tmp_path / "a")
    here = JobLock(storage, "x")._record()  # noqa: SLF001 - this machine's pid namespace
    now = dt.datetime.now(dt.UTC)
    live = LockRecord(
        "live-holder", "snapshot", now - dt.timedelta(minutes=1), here.host, os.getpid(),
        here.pidns, elapsed_clock() + 60,
    )  # fmt: skip
    storage.put(LOCK_KEY, live.to_json())
    with pytest.raises(LockHeld):
        JobLock(storage, "retention").acquire()
    dead = LockRecord(
        "dead-holder", "snapshot", now + dt.timedelta(hours=1), here.host, os.getpid(),
        here.pidns, elapsed_clock() - 1,
    )  # fmt: skip
    storage.put(LOCK_KEY, dead.to_json())
    with JobLock(storage, "retention") as lock:
        assert _owner(storage) == lock.owner
        # Its own record carries the boot clock's expiry: the date alone, stepped past, is not
        # enough to take it over.
        record = lock.read()
        assert record is not None and record.boot_expires > elapsed_clock()
        stepped = dataclasses.replace(record, expires_at=now - dt.timedelta(minutes=1))
        storage.put(LOCK_KEY, stepped.to_json())
        with pytest.raises(LockHeld):
            JobLock(storage, "snapshot").acquire()


class _InterruptedConfirm(LocalStorage):
    """Ctrl-C (or SIGTERM's handler) arrives while a lock just written is read back."""

    armed = False

    def get_with_tag(self, key: str) -> tuple[bytes, str]:
        if self.armed and key == LOCK_KEY:
            self.armed = False
            raise KeyboardInterrupt
        return super().get_with_tag(key)


@pytest.mark.parametrize("taken_over", [False, True])
def test_a_signal_while_the_lock_is_taken_leaves_no_lock_behind(
    tmp_path: Path, taken_over: bool
) -> None:
    """`prune` got SIGTERM after it wrote its record and before it confirmed it: it exited 143
    and its record held every job off for the whole lease (10 minutes)."""
    storage = _InterruptedConfirm(tmp_path / "a")
    if taken_over:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
        dead = {"owner": "dead-process", "job": "snapshot", "expires_at": past.isoformat()}
        storage.put(LOCK_KEY, orjson.dumps(dead))
    lock = JobLock(storage, "retention")
    original = lock._still_ours  # noqa: SLF001

    def confirm_read() -> None:  # the take-over's read comes after its settle
        storage.armed = True
        original()

    lock._still_ours = confirm_read  # type: ignore[method-assign]  # noqa: SLF001
    with pytest.raises(KeyboardInterrupt):
        lock.acquire()
    assert not storage.exists(LOCK_KEY)
    with JobLock(storage, "snapshot"):  # the next job is not held off
        pass


def test_a_retention_pass_stops_at_shutdown(tmp_path: Path) -> None:
    """Retention took no stop: a long pass (a manifest read at a time from a slow store, then
    the deletions) held `run`'s exit for minutes after SIGTERM."""
    from connector.retention import RetentionStopped
    from tests.test_retention import at_day, build_days

    stop = threading.Event()

    class StopsAtTheFirstDeletion(LocalStorage):
        deleted: list[str] = []

        def delete(self, key: str) -> None:
            if key != LOCK_KEY:
                if not self.deleted:
                    stop.set()  # SIGTERM arrives while the first object is deleted
                self.deleted.append(key)
            super().delete(key)

        read_stopped: list[str] = []

        def open(self, key: str) -> BinaryIO:
            if stop.is_set():
                self.read_stopped.append(key)
            return super().open(key)

    storage = StopsAtTheFirstDeletion(tmp_path / "a")
    build_days(storage, tmp_path, days=8, snapshot_days={2, 5})
    policy = RetentionPolicy(keep_days=4, keep_snapshots=0)
    with pytest.raises(RetentionStopped):
        run_retention_job(storage, policy, now=at_day(8), stop=stop)
    assert len(storage.deleted) == 1 and not storage.exists(LOCK_KEY)
    with pytest.raises(RetentionStopped):  # planning stops too: at the base's parts
        run_retention_job(storage, policy, now=at_day(8), stop=stop)
    no_base = RetentionPolicy(keep_days=30, keep_snapshots=0)
    with pytest.raises(RetentionStopped):  # and at the manifests, with no base to check
        run_retention_job(storage, no_base, now=at_day(8), stop=stop)
    assert len(storage.deleted) == 1
    # Once stopped, no snapshot part is read (a few manifests say where the archive ends).
    assert not [k for k in storage.read_stopped if k.startswith("snapshots/")]
    stop.clear()
    report = run_retention_job(storage, policy, now=at_day(8), stop=stop)
    assert report.deleted > 0 and len(storage.deleted) == 1 + report.deleted  # the rest


def test_a_committed_snapshots_parts_are_never_replaced(tmp_path: Path) -> None:
    """A part found in place with other bytes is an earlier attempt's leftover, replaced: unless
    the snapshot was committed meanwhile (by a process that took the lock over), whose part it
    then is."""
    from connector.snapshot import write_snapshot

    root = tmp_path / "a"
    build_good(LocalStorage(root))
    info = write_snapshot(LocalStorage(root), work_dir=tmp_path / "w")
    assert info is not None
    committed = {p.key: LocalStorage(root).get(p.key) for p in info.parts}
    manifest = LocalStorage(root).get(info.manifest_key)
    LocalStorage(root).delete(info.manifest_key)  # as before that process's commit
    part = info.parts[0].key

    class CommittedWhileRead(LocalStorage):
        def get(self, key: str) -> bytes:
            data = super().get(key)
            if key == part:  # the other process commits as this one compares the part
                self.put(info.manifest_key, manifest)
            return data

    with pytest.raises(RetryableError, match="committed by another process"):
        write_snapshot(CommittedWhileRead(root), work_dir=tmp_path / "w2", level=19)
    assert {k: LocalStorage(root).get(k) for k in committed} == committed


def test_the_runner_stops_its_retention_at_shutdown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`run`'s scheduled retention gets the runner's stop: set by shutdown, the pass ends at its
    next deletion, said as a stop, not a failure."""
    from tests.test_retention import at_day, build_days

    holder: list[JobRunner] = []

    class ShutdownAtTheFirstDeletion(LocalStorage):
        deleted: list[str] = []

        def delete(self, key: str) -> None:
            if key != LOCK_KEY:
                holder[0].stop.set()  # what shutdown sets
                self.deleted.append(key)
            super().delete(key)

    storage = ShutdownAtTheFirstDeletion(tmp_path / "a")
    build_days(storage, tmp_path, days=8, snapshot_days={2, 5})
    follow = dt.datetime.now(dt.UTC)
    assert follow > at_day(8)  # the archive's days are long past: a 4-day window prunes
    runner = JobRunner(
        storage,
        snapshot_schedule="",
        retention_schedule="every 1d",
        retention=RetentionPolicy(keep_days=4, keep_snapshots=0),
        work_dir=tmp_path / "w",
    )
    holder.append(runner)
    with caplog.at_level("INFO", logger="connector.jobs"):
        runner.run_retention()
    assert len(storage.deleted) == 1 and runner.failures["retention"] == 0
    assert "stopped for shutdown" in caplog.text and not storage.exists(LOCK_KEY)


class _FailingRenewals(LocalStorage):
    """The store refuses the renewal thread's requests for a while (a transient error each
    time): the lock is not renewed, and that thread cannot see a take-over either."""

    def get_with_tag(self, key: str) -> tuple[bytes, str]:
        if threading.current_thread().name.startswith("lock-renew-"):
            raise RetryableError("S3 get locks/archive-jobs.json: (transient)")
        return super().get_with_tag(key)


def test_a_jobs_write_checks_a_lock_not_renewed_for_half_a_lease(tmp_path: Path) -> None:
    """Its renewals failing, a job past half its lease may have lost the lock without knowing:
    the check before its next write reads the record again."""
    storage = _FailingRenewals(tmp_path / "a")
    lock = JobLock(storage, "snapshot", ttl_secs=1.0)
    lock.acquire()
    try:
        lock.guard()  # just taken: no read
        time.sleep(0.6)
        future = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
        other = {"owner": "taker", "job": "retention", "expires_at": future.isoformat()}
        storage.put(LOCK_KEY, orjson.dumps(other))  # taken over once the lease ran out
        with pytest.raises(LockHeld):
            lock.guard()
        assert lock.lost
    finally:
        lock.release()
    assert _owner(storage) == "taker"
