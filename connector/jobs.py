"""Archive maintenance jobs (snapshot, retention), under their shared lock, and their schedule.

Snapshot and retention take ONE lock object, ``locks/archive-jobs.json`` (``locks.JobLock``: its
guarantees are there), so they never run at the same time on the same archive, whichever process
(the ``run`` scheduler or a CLI command) starts them.

A job failure is logged and counted (``opencti_sync_errors_total{kind="job_<name>"}``); it never
propagates into the caller's stream loop.

``JobRunner.shutdown`` sets a stop event the running snapshot checks per segment and per part (it
then aborts: nothing committed, lock released, scratch file deleted) and waits for it at most
``shutdown_timeout_secs``. A killed run's scratch database is removed by the next snapshot job
once it holds the lock.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from . import metrics
from .errors import ConfigError, ConnectorError
from .locks import LOCK_KEY, JobLock, LockHeld, LockRecord, LockWatch
from .retention import (
    RetentionPolicy,
    RetentionReport,
    RetentionStopped,
    apply_retention,
    plan_retention,
)
from .storage import Storage

if TYPE_CHECKING:
    from .snapshot import SnapshotInfo

__all__ = [
    "LOCK_KEY",
    "JobLock",
    "JobRunner",
    "LockHeld",
    "LockRecord",
    "parse_schedule",
    "run_retention_job",
    "run_snapshot_job",
]

log = logging.getLogger(__name__)

_RETRY_SECS = 600  # a job skipped because another process holds the archive runs again then


_EVERY_RE = re.compile(r"^every\s+(\d+)\s*([smhd])$", re.IGNORECASE)
_UNIT_SECS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_schedule(text: str, key: str = "schedule") -> BaseTrigger | None:
    """A trigger for a cron expression (5 fields, UTC) or ``every <N>s|m|h|d``; '' → None.

    Raises ``ConfigError(key, ...)`` for anything else.
    """
    text = text.strip()
    if not text:
        return None
    m = _EVERY_RE.match(text)
    if m is not None:
        secs = int(m.group(1)) * _UNIT_SECS[m.group(2).lower()]
        if secs <= 0:
            raise ConfigError(key, f"interval must be positive: {text!r}")
        if secs > 366 * 86400:
            # Longer overflowed the scheduler's dates (a traceback from any command).
            raise ConfigError(key, f"interval must be at most a year: {text!r}")
        return IntervalTrigger(seconds=secs, timezone=dt.UTC)
    if len(text.split()) != 5:
        raise ConfigError(
            key, f"expected a 5-field cron expression or 'every <N>s|m|h|d', got {text!r}"
        )
    try:
        return CronTrigger.from_crontab(text, timezone=dt.UTC)
    except ValueError as exc:
        raise ConfigError(key, f"invalid cron expression {text!r}: {exc}") from exc


def run_snapshot_job(
    storage: Storage,
    work_dir: Path,
    *,
    ttl_secs: float = 600,
    stop: threading.Event | None = None,
    watch: LockWatch | None = None,
    state_image: bool = True,
    codec: str = "zstd",
    level: int = 3,
) -> SnapshotInfo | None:
    """Write a snapshot under the job lock; returns what ``write_snapshot`` returns (None when
    there was nothing new; ``state_image``, ``codec`` and ``level`` as there: the archive's).
    Raises ``LockHeld`` when another job runs, or took the lock over before the commit (nothing
    committed), ``SnapshotStopped`` (nothing committed, lock released) when ``stop`` is set
    meanwhile. ``watch``: what earlier tries saw of the lock (``JobLock``).

    Once the lock is held, the scratch files of snapshot runs that were killed are deleted."""
    # The state helper's module; imported late on purpose.
    from .snapshot import remove_stale_scratch, write_snapshot

    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with JobLock(storage, "snapshot", ttl_secs, watch=watch) as lock:
        remove_stale_scratch(work_dir)
        # A job paused for longer than the lease (a suspended VM) may have lost the lock to a
        # retention that took its parts for a killed job's leftovers: it commits only if the
        # lock is still its own (``LockHeld`` otherwise: retried later, parts left to retention).
        return write_snapshot(
            storage,
            work_dir=work_dir,
            stop=stop,
            before_commit=lock.renew,
            guard=lock.guard,
            state_image=state_image,
            codec=codec,
            level=level,
        )


def describe_snapshot(info: SnapshotInfo | None) -> str:
    """What a snapshot job did, in one line for the operator (log, ``snapshot`` command)."""
    if info is None:
        return "snapshot: nothing new since the last one"
    return (
        f"snapshot {info.as_of}: {info.object_count} objects, {info.tombstone_count} tombstones, "
        f"{len(info.parts)} parts{' with its state image' if info.state_image else ''}, "
        f"{sum(p.size for p in info.parts)} bytes "
        f"(based on {info.based_on or 'nothing'})"
    )


def run_retention_job(
    storage: Storage,
    policy: RetentionPolicy,
    dry_run: bool = False,
    *,
    now: dt.datetime | None = None,
    ttl_secs: float = 600,
    watch: LockWatch | None = None,
    stop: threading.Event | None = None,
) -> RetentionReport:
    """Plan (and unless ``dry_run``, apply) retention under the job lock. ``stop`` set: raises
    ``RetentionStopped`` at the next manifest read or deletion (the lock is released)."""
    with JobLock(storage, "retention", ttl_secs, watch=watch):
        report = plan_retention(storage, policy, now or dt.datetime.now(dt.UTC), stop=stop)
        if dry_run:
            for d in report.deletions:
                log.info(
                    "Retention would delete an object.", extra={"key": d.key, "reason": d.reason}
                )
        else:
            apply_retention(storage, report, stop=stop)
        return report


_FIRST_RUN_SECS = 300  # an interval job's first run comes this soon after start (at most)
_DUE_SLACK = dt.timedelta(seconds=60)  # a snapshot due within this is taken at its first run


def _newest_snapshot_time(storage: Storage) -> dt.datetime | None:
    from .snapshot import list_snapshots

    try:
        snaps = list_snapshots(storage)
        if not snaps:
            return None
        created = dt.datetime.fromisoformat(snaps[-1].created_at)
    except Exception:  # noqa: BLE001 - unreadable now: the job itself will say why
        return None
    # A time without an offset (not one this connector writes) is UTC: compared as it is with
    # the aware clock, it raised outside the job's guard (_snapshot_due runs before it).
    return created if created.tzinfo is not None else created.replace(tzinfo=dt.UTC)


class JobRunner:
    """Runs the scheduled jobs in a background scheduler beside the stream consumer."""

    def __init__(
        self,
        storage: Storage,
        *,
        snapshot_schedule: str,
        retention_schedule: str,
        retention: RetentionPolicy,
        work_dir: Path,
        shutdown_timeout_secs: float = 20.0,
        lock_ttl_secs: float = 600,
        state_image: bool = True,
        codec: str = "zstd",
        level: int = 3,
    ) -> None:
        self.storage = storage
        self.state_image = state_image
        # The snapshots' compression: the archive's (``archive.codec``, ``compression_level``).
        self.codec, self.level = codec, level
        self.lock_ttl_secs = lock_ttl_secs
        # One sighting of the lock for every try of both jobs: a retry after a skip takes over
        # a record no one renewed for a whole lease, whatever another machine's clock wrote.
        self._lock_watch = LockWatch()
        self.retention = retention
        self.work_dir = work_dir
        self.shutdown_timeout_secs = shutdown_timeout_secs
        # Validate both before anything starts: a typo is a configuration error at start-up.
        self._triggers = {
            "snapshot": parse_schedule(snapshot_schedule, "snapshot.schedule"),
            "retention": parse_schedule(retention_schedule, "retention.schedule"),
        }
        self.scheduler = BackgroundScheduler(timezone=dt.UTC)
        self.runs: dict[str, int] = {"snapshot": 0, "retention": 0}
        self.failures: dict[str, int] = {"snapshot": 0, "retention": 0}
        self.skipped: dict[str, int] = {"snapshot": 0, "retention": 0}
        # This process's jobs take turns (two schedules firing together must not lock each
        # other out); the archive lock still keeps other processes' jobs apart.
        self._turn = threading.Lock()
        # Set by shutdown: the running snapshot stops at its next segment or part, and no job
        # starts any more.
        self.stop = threading.Event()
        self._active = 0  # jobs entered (running or waiting for their turn)
        # An interval snapshot schedule's interval until its first run (see _snapshot_due).
        self._snapshot_interval: dt.timedelta | None = None
        self._idle = threading.Condition()

    def start(self) -> None:
        jobs = {"snapshot": self.run_snapshot, "retention": self.run_retention}
        for name, trigger in self._triggers.items():
            if trigger is None:
                continue
            self.scheduler.add_job(
                jobs[name],
                self._first_due(name, trigger),
                id=name,
                name=name,
                max_instances=1,
                coalesce=True,
                misfire_grace_time=None,
            )
        if self.scheduler.get_jobs():
            self.scheduler.start()
            log.info(
                "Archive jobs scheduled.",
                extra={k: str(v) for k, v in self._triggers.items() if v is not None},
            )

    def _first_due(self, name: str, trigger: BaseTrigger) -> BaseTrigger:
        """An interval counts from each start: a connector restarted more often than its
        interval (daily redeploys, ``every 24h``) would never run the job. The first run comes
        after at most ``_FIRST_RUN_SECS``; a snapshot then waits for one interval after the
        newest snapshot when that is still ahead (``_snapshot_due``, read in the job's thread,
        not here: a storage outage must not hold the start). Retention keeps no record of its
        runs: it is cheap and idempotent. Cron schedules follow the clock and need none of it."""
        if not isinstance(trigger, IntervalTrigger):
            return trigger
        interval: dt.timedelta = trigger.interval
        if name == "snapshot":
            self._snapshot_interval = interval
        first = dt.datetime.now(dt.UTC) + min(interval, dt.timedelta(seconds=_FIRST_RUN_SECS))
        return IntervalTrigger(seconds=interval.total_seconds(), start_date=first, timezone=dt.UTC)

    def _snapshot_due(self) -> bool:
        """On the first run of an interval snapshot job: whether the newest snapshot is at least
        one interval old; if not, the job moves to that time instead of running."""
        interval, self._snapshot_interval = self._snapshot_interval, None
        if interval is None:
            return True
        last = _newest_snapshot_time(self.storage)
        now = dt.datetime.now(dt.UTC)
        if last is None:
            return True
        # At most one interval from now: a snapshot stamped by a clock running ahead (this
        # host's then, or another machine's) would otherwise hold the schedule until that date.
        due = min(last + interval, now + interval)
        if due <= now + _DUE_SLACK:
            return True
        try:
            self.scheduler.modify_job("snapshot", next_run_time=due)
        except JobLookupError:
            return False  # shut down meanwhile
        log.info(
            "Archive snapshot not due yet: the newest one is recent.",
            extra={"job": "snapshot", "next_run": due.isoformat()},
        )
        return False

    def shutdown(self, timeout_secs: float | None = None) -> bool:
        """Stop scheduling, ask a running job to stop and wait for it at most ``timeout_secs``
        (default ``shutdown_timeout_secs``). Returns whether no job is left running.

        A snapshot stops at its next segment or part; a job still running at the deadline (a
        stuck storage call) is left to its worker thread, which the interpreter joins at exit.
        """
        self.stop.set()
        if self.scheduler.running:
            # Never wait=True: that joins the running job without any limit.
            self.scheduler.shutdown(wait=False)
        timeout = self.shutdown_timeout_secs if timeout_secs is None else timeout_secs
        with self._idle:
            idle = self._idle.wait_for(lambda: self._active == 0, timeout=max(timeout, 0.0))
        if not idle:
            log.warning(
                "An archive job is still running after the shutdown timeout; not waiting for it.",
                extra={"timeout_secs": timeout},
            )
        return idle

    def _retry_later(self, name: str) -> None:
        if not self.scheduler.running or self.stop.is_set():
            return
        run = self.run_snapshot if name == "snapshot" else self.run_retention
        self.scheduler.add_job(
            run,
            "date",
            run_date=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=_RETRY_SECS),
            id=f"{name}-retry",
            name=f"{name} (retry)",
            replace_existing=True,
            misfire_grace_time=None,
        )

    def run_snapshot(self) -> None:
        if not self.stop.is_set() and not self._snapshot_due():
            return
        self._guarded(
            "snapshot",
            lambda: describe_snapshot(
                run_snapshot_job(
                    self.storage,
                    self.work_dir,
                    ttl_secs=self.lock_ttl_secs,
                    stop=self.stop,
                    watch=self._lock_watch,
                    state_image=self.state_image,
                    codec=self.codec,
                    level=self.level,
                )
            ),
        )

    def run_retention(self) -> None:
        self._guarded(
            "retention",
            lambda: run_retention_job(
                self.storage,
                self.retention,
                ttl_secs=self.lock_ttl_secs,
                watch=self._lock_watch,
                stop=self.stop,
            ),
        )

    def _guarded(self, name: str, job: Any) -> None:
        """Run one job; nothing it raises may reach the scheduler or the stream loop."""
        with self._idle:
            self._active += 1
        try:
            with self._turn:
                if self.stop.is_set():
                    log.info("Archive job not started: shutting down.", extra={"job": name})
                    return
                self._run_guarded(name, job)
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def _run_guarded(self, name: str, job: Any) -> None:
        from .snapshot import SnapshotStopped  # late, as run_snapshot_job's import

        self.runs[name] += 1
        try:
            result = job()
        except (SnapshotStopped, RetentionStopped) as exc:
            log.info("Archive job stopped for shutdown.", extra={"job": name, "reason": str(exc)})
        except LockHeld as exc:
            # Another process's job holds the archive: try again soon, not at the next
            # scheduled time (which may be a day away).
            self.skipped[name] += 1
            metrics.ERRORS.labels(f"job_{name}_skipped").inc()
            log.warning(
                "Archive job skipped: lock held; retrying later.",
                extra={"job": name, "reason": str(exc), "retry_in_secs": _RETRY_SECS},
            )
            self._retry_later(name)
        except Exception as exc:  # noqa: BLE001 - a job must never stop the stream consumer
            self.failures[name] += 1
            metrics.ERRORS.labels(f"job_{name}").inc()
            log.error(
                "Archive job failed.",
                extra={"job": name, "error": f"{type(exc).__name__}: {exc}"},
                exc_info=not isinstance(exc, ConnectorError),
            )
        else:
            log.info("Archive job finished.", extra={"job": name, "result": str(result)})
