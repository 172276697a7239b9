"""Retention: delete archive history older than the policy allows, never what a restore needs.

The rules, with W = now - keep_days (an event id built from milliseconds; object mtimes are
never used, since copies and restores change them):

* ``now`` is the clock's, unless that runs more than a day ahead of the archive's newest
  position (the checkpoint, which follows the platform's clock): then that position plus a day;
* the *base* is the newest committed snapshot with ``as_of <= W`` whose parts all match their
  manifest's size and sha256 (what a restore checks). A restore to any point in
  ``[W, now]`` starts from the base and replays the segments after it, so the base and every
  segment whose last group id is above ``base.as_of`` are kept;
* segments (and orphan segments) wholly at or before ``base.as_of`` are covered by the base and
  go, manifest first: the manifest is the segment's commit marker, so a crash between the two
  deletes leaves an orphan segment (verify: warning) rather than a manifest naming a missing
  segment (verify: error);
* snapshots older than the base go (they restore only to points outside the window); with
  ``keep_snapshots > 0`` only the newest ``keep_snapshots`` snapshots are kept besides the base.
  A snapshot is deleted manifest first for the same reason. Unfinished snapshot directories
  (no manifest) older than the newest committed snapshot are crash leftovers (a snapshot job
  killed before its commit, a retention killed between a manifest and its parts) and go too,
  base or no base: a snapshot job writes past the newest committed snapshot, and runs only
  while retention does not hold the job lock;
* quarantine objects stay for operators to inspect until the event they follow is itself covered
  by the base (older than the window and compacted away); then they go;
* with no base (no snapshot, keep_days 0, or all snapshots newer than W) no segment is deleted,
  and the oldest snapshot able to start a restore from the oldest kept segment is protected
  (and, while the oldest manifests are damaged, the newest snapshot before each of their
  segments: what such a segment continues from is unknown until its manifest is repaired).

``plan_retention`` only reads (streamed listings; the plan holds one row per deletion);
``apply_retention`` executes a plan. ``run_retention_job`` (connector.jobs) wraps both in the
archive job lock.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from . import metrics
from .archive.layout import (
    EVENTS_PREFIX,
    MANIFESTS_PREFIX,
    QUARANTINE_PREFIX,
    id_from_key,
    manifest_key_for_segment,
)
from .archive.reader import ArchiveReader
from .archive.segment import HashingReader, read_manifest
from .checkpoint import CheckpointStore
from .errors import ConfigError, ConnectorError, MalformedEvent, NotFound
from .events import EventId
from .storage import Storage

__all__ = [
    "SNAPSHOTS_PREFIX",
    "Deletion",
    "RetentionPolicy",
    "RetentionReport",
    "RetentionStopped",
    "SnapshotRef",
    "apply_retention",
    "committed_snapshots",
    "plan_retention",
    "trusted_now",
]

log = logging.getLogger(__name__)

SNAPSHOTS_PREFIX = "snapshots/"
_DAY_MS = 86_400_000
_CLOCK_SLACK_MS = _DAY_MS  # how far "now" may run ahead of the archive's newest position


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """``keep_days``: restorable history in days (0: forever). ``keep_snapshots``: newest
    snapshots kept besides the base (0: no count limit)."""

    keep_days: int
    keep_snapshots: int

    def __post_init__(self) -> None:
        if self.keep_days < 0:
            raise ConfigError("retention.keep_days", "must be >= 0")
        if self.keep_snapshots < 0:
            raise ConfigError("retention.keep_snapshots", "must be >= 0")


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """A committed snapshot: its directory prefix, as-of id and parsed manifest."""

    prefix: str
    as_of: EventId
    manifest: dict[str, Any]

    @property
    def manifest_key(self) -> str:
        return f"{self.prefix}manifest.json"


@dataclass(frozen=True, slots=True)
class Deletion:
    key: str
    kind: str  # segment | manifest | snapshot | quarantine
    reason: str


class DeletionPlan:
    """The deletions planned, in plan order: rows in a spooled temporary file (in memory up to
    1 MiB, on disk past it), since a plan has a row per object deleted (every quarantine record:
    one per quarantined event), and counts by kind."""

    _MEMORY = 1 << 20

    def __init__(self) -> None:
        self._rows: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=self._MEMORY)
        self._count = 0
        self.kinds: dict[str, int] = {}

    def append(self, deletion: Deletion) -> None:
        self._rows.seek(0, os.SEEK_END)
        self._rows.write(orjson.dumps([deletion.key, deletion.kind, deletion.reason]) + b"\n")
        self._count += 1
        self.kinds[deletion.kind] = self.kinds.get(deletion.kind, 0) + 1

    def __iter__(self) -> Iterator[Deletion]:
        offset = 0
        while True:
            # Read by offset: a caller may append (or iterate again) between two rows.
            self._rows.seek(offset)
            line = self._rows.readline()
            if not line:
                return
            offset = self._rows.tell()
            key, kind, reason = orjson.loads(line)
            yield Deletion(key, kind, reason)

    def __len__(self) -> int:
        return self._count

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DeletionPlan | list):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DeletionPlan({self._count} rows, {self.kinds})"


@dataclass
class RetentionReport:
    policy: RetentionPolicy
    window_start: EventId
    base: str | None = None  # as_of id of the base snapshot
    deletions: DeletionPlan = field(default_factory=DeletionPlan)
    kept_segments: int = 0
    kept_snapshots: list[str] = field(default_factory=list)
    note: str = ""
    dry_run: bool = True  # becomes False once apply_retention ran
    deleted: int = 0

    def counts(self) -> dict[str, int]:
        return dict(self.deletions.kinds)

    def __str__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(self.counts().items())) or "nothing"
        verb = "would delete" if self.dry_run else "deleted"
        text = (
            f"retention: window starts at {self.window_start}, base snapshot "
            f"{self.base or '-'}; {verb} {counts}; kept {self.kept_segments} segments and "
            f"{len(self.kept_snapshots)} snapshots"
        )
        return f"{text} ({self.note})" if self.note else text


def window_start(policy: RetentionPolicy, now: dt.datetime) -> EventId:
    """The oldest restore point the policy promises; EventId(0, 0) when keeping forever."""
    if policy.keep_days <= 0:
        return EventId(0, 0)
    ms = int(now.timestamp() * 1000) - policy.keep_days * _DAY_MS
    return EventId(max(ms, 0), 0)


def committed_snapshots(storage: Storage) -> list[SnapshotRef]:
    """Snapshots whose manifest exists (= committed), oldest first. Snapshots are few."""
    out: list[SnapshotRef] = []
    for key in storage.list(SNAPSHOTS_PREFIX):
        if not key.endswith("/manifest.json"):
            continue
        prefix = key[: -len("manifest.json")]
        try:
            manifest = orjson.loads(storage.get(key))
            as_of = EventId.parse(str(manifest["as_of_event_id"]))
        except NotFound:
            continue
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("Unreadable snapshot manifest ignored.", extra={"key": key})
            continue
        out.append(SnapshotRef(prefix, as_of, manifest))
    out.sort(key=lambda s: s.as_of)
    return out


def _snapshot_dirs(storage: Storage) -> Iterator[tuple[str, list[str]]]:
    """(directory prefix, keys) per snapshot directory; listing is sorted, so dirs are runs."""
    current: str | None = None
    keys: list[str] = []
    for key in storage.list(SNAPSHOTS_PREFIX):
        parts = key[len(SNAPSHOTS_PREFIX) :].split("/", 1)
        if len(parts) != 2:
            continue
        prefix = f"{SNAPSHOTS_PREFIX}{parts[0]}/"
        if prefix != current:
            if current is not None:
                yield current, keys
            current, keys = prefix, []
        keys.append(key)
    if current is not None:
        yield current, keys


def _snapshot_id(prefix: str) -> EventId | None:
    try:
        return EventId.from_key(prefix[len(SNAPSHOTS_PREFIX) :].rstrip("/"))
    except ValueError:
        return None


def _parts_intact(storage: Storage, snap: SnapshotRef, stop: threading.Event | None) -> bool:
    """The manifest as a restore reads it, and every part present with the size and sha256 it
    records: a base snapshot must be loadable before the segments it replaces are deleted. Its
    state image is not read: a restore that cannot use it loads these parts."""
    from .snapshot import STATE_KIND, SnapshotInfo  # here: `run` starts without the state store

    try:
        info = SnapshotInfo.from_json(orjson.dumps(snap.manifest))
    except MalformedEvent as exc:
        log.warning(
            "Snapshot not usable as a retention base: a restore would refuse its manifest.",
            extra={"snapshot": str(snap.as_of), "error": exc.reason},
        )
        return False
    try:
        for part in info.parts:
            if part.kind == STATE_KIND:
                continue
            _check_stop(stop)
            if storage.size(part.key) != part.size:
                raise ValueError(part.key)
            with storage.open(part.key) as fh:
                body = HashingReader(fh)
                body.drain()
            if body.sha.hexdigest() != part.sha256:
                raise ValueError(part.key)
    except (NotFound, ValueError) as exc:
        log.warning(
            "Snapshot not usable as a retention base: a part is missing or damaged.",
            extra={"snapshot": str(snap.as_of), "part": str(exc)},
        )
        return False
    return True


def _pruned_floor(storage: Storage, snapshots: list[SnapshotRef]) -> set[EventId]:
    """With no base: the snapshots a restore to a point before the oldest kept segments needs,
    when older segments were pruned. The one at the position the oldest manifest continues
    from; and for each damaged manifest before it (what its segment continues from unknown),
    the newest snapshot before that segment's first group, so that a repaired manifest finds
    its snapshot still there: a deleted snapshot cannot be had again."""
    floor: set[EventId] = set()
    for key in storage.list(MANIFESTS_PREFIX):
        if not key.endswith(".json"):
            continue
        try:
            oldest = read_manifest(storage, key)
        except NotFound:
            continue
        except MalformedEvent:
            try:
                first = id_from_key(key)
            except ValueError:
                continue
            before = [s.as_of for s in snapshots if s.as_of < first]
            if before:
                floor.add(before[-1])
            continue
        if oldest.after_event_id:
            # Older segments were pruned: some snapshot must stand in for them.
            after = EventId.parse(oldest.after_event_id)
            standing = [s.as_of for s in snapshots if s.as_of >= after]
            if standing:
                floor.add(standing[0])
        break
    return floor


def _archive_position(storage: Storage) -> EventId | None:
    """The newest position the archive records, on the platform's clock: the checkpoint's (it
    follows idle heartbeats too) or, without one here, the newest segment's last group."""
    try:
        cp = CheckpointStore(storage).load()
    except ConnectorError:
        cp = None
    if cp is not None and cp.last_event_id:
        return EventId.parse(cp.last_event_id)
    newest = ArchiveReader(storage).newest()
    return newest.last if newest is not None else None


def trusted_now(storage: Storage, now: dt.datetime) -> dt.datetime:
    """``now``, unless it runs more than a day ahead of the archive's own position: a host
    clock set in the future would otherwise move the window forward and delete history that is
    inside it. (A connector stopped for long makes retention keep more, never less.)"""
    position = _archive_position(storage)
    if position is None:
        return now
    bound = position.ms + _CLOCK_SLACK_MS
    if now.timestamp() * 1000 <= bound:
        return now
    trusted = dt.datetime.fromtimestamp(bound / 1000, dt.UTC)
    log.warning(
        "Retention measures its window from the archive's newest position plus a day: the "
        "clock is further ahead of it.",
        extra={"clock": now.isoformat(), "position": str(position), "now": trusted.isoformat()},
    )
    return trusted


class RetentionStopped(ConnectorError):
    """``stop`` was set (a shutdown): the pass ended there, as a killed one would."""


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise RetentionStopped("retention stopped for shutdown; the next pass goes on")


def plan_retention(
    storage: Storage,
    policy: RetentionPolicy,
    now: dt.datetime,
    *,
    stop: threading.Event | None = None,
) -> RetentionReport:
    """What retention would delete now, and why. Reads only. ``stop`` set: raises
    ``RetentionStopped`` at the next manifest or snapshot part read."""
    now = trusted_now(storage, now)
    report = RetentionReport(policy, window_start(policy, now))
    snapshots = committed_snapshots(storage)
    if not snapshots:
        report.note = "no snapshot in the archive: nothing can replace old segments"
        report.kept_segments = sum(1 for k in storage.list(MANIFESTS_PREFIX) if k.endswith(".json"))
        log.info("Retention deletes nothing.", extra={"reason": report.note})
        return report
    older = [s for s in snapshots if s.as_of <= report.window_start]
    # The base must be restorable: its parts have to be there before anything relies on it.
    base = next((s for s in reversed(older) if _parts_intact(storage, s, stop)), None)
    protected: set[EventId] = set()
    if base is not None:
        report.base = str(base.as_of)
        protected.add(base.as_of)
    else:
        report.note = "no snapshot at or before the window start: no segment is old enough"
        protected |= _pruned_floor(storage, snapshots)
    newest = (
        {s.as_of for s in snapshots[-policy.keep_snapshots :]} if policy.keep_snapshots else None
    )
    for snap in snapshots:
        if snap.as_of in protected:
            reason = None
        elif base is not None and snap.as_of < base.as_of:
            reason = f"older than base snapshot {base.as_of}"
        elif newest is not None and snap.as_of not in newest:
            reason = f"beyond the newest {policy.keep_snapshots} snapshots"
        else:
            reason = None
        if reason is None:
            report.kept_snapshots.append(str(snap.as_of))
        else:
            _plan_snapshot(storage, report, snap.prefix, reason)
    _plan_unfinished_snapshots(storage, report, snapshots[-1].as_of, {s.prefix for s in snapshots})
    _plan_segments(storage, report, base.as_of if base is not None else None, stop)
    if base is not None:
        _plan_quarantine(storage, report, base.as_of)
    return report


def _plan_snapshot(storage: Storage, report: RetentionReport, prefix: str, reason: str) -> None:
    manifest = f"{prefix}manifest.json"
    report.deletions.append(Deletion(manifest, "snapshot", reason))
    for key in storage.list(prefix):
        if key != manifest:
            report.deletions.append(Deletion(key, "snapshot", reason))


def _plan_unfinished_snapshots(
    storage: Storage, report: RetentionReport, newest: EventId, committed: set[str]
) -> None:
    for prefix, keys in _snapshot_dirs(storage):
        as_of = _snapshot_id(prefix)
        if prefix in committed or as_of is None or as_of >= newest:
            continue  # a newer unfinished one may be in progress elsewhere: leave it
        if f"{prefix}manifest.json" in keys:
            # Committed, its manifest damaged since: it may be the only copy of pruned history,
            # and a repaired manifest needs its parts. Left for the operator (verify says it).
            log.warning(
                "Snapshot with an unreadable manifest left in place; run verify.",
                extra={"snapshot": prefix},
            )
            continue
        for key in keys:
            report.deletions.append(
                Deletion(key, "snapshot", f"unfinished snapshot older than snapshot {newest}")
            )


def _plan_segments(
    storage: Storage, report: RetentionReport, base: EventId | None, stop: threading.Event | None
) -> None:
    planned: set[str] = set()
    for key in storage.list(MANIFESTS_PREFIX):
        if not key.endswith(".json"):
            continue
        _check_stop(stop)
        try:
            manifest = read_manifest(storage, key)
        except NotFound:
            continue
        except MalformedEvent:
            log.warning("Damaged manifest left in place; run verify.", extra={"key": key})
            report.kept_segments += 1
            continue
        if base is None or manifest.last > base:
            report.kept_segments += 1
            continue
        reason = f"covered by base snapshot {base}"
        report.deletions.append(Deletion(key, "manifest", reason))
        report.deletions.append(Deletion(manifest.segment, "segment", reason))
        planned.add(manifest.segment)
    if base is None:
        return
    for key in storage.list(EVENTS_PREFIX):
        try:
            first = id_from_key(key)
            mkey = manifest_key_for_segment(key)
        except ValueError:
            continue
        if first > base:
            break  # keys are in stream order
        if key in planned or storage.exists(mkey):
            continue
        report.deletions.append(
            Deletion(key, "segment", f"orphan segment (no manifest) before base snapshot {base}")
        )


def _plan_quarantine(storage: Storage, report: RetentionReport, base: EventId) -> None:
    for key in storage.list(QUARANTINE_PREFIX):
        after_key = key[len(QUARANTINE_PREFIX) :].split("/", 1)[0]
        try:
            after = EventId.from_key(after_key)
        except ValueError:
            continue
        if after >= base:
            break  # keys are in stream order
        report.deletions.append(
            Deletion(key, "quarantine", f"follows an event covered by base snapshot {base}")
        )


def apply_retention(
    storage: Storage, report: RetentionReport, *, stop: threading.Event | None = None
) -> RetentionReport:
    """Delete what ``report`` planned, in plan order (every commit marker before its data).
    ``stop`` set: raises ``RetentionStopped`` before the next deletion, which leaves what a
    killed pass leaves (the next pass removes the rest)."""
    report.dry_run = False
    for d in report.deletions:
        _check_stop(stop)
        storage.delete(d.key)
        report.deleted += 1
        metrics.DELETIONS.labels(d.kind).inc()
        log.info("Retention deleted an object.", extra={"key": d.key, "reason": d.reason})
    log.info(
        "Retention applied.",
        extra={
            "window_start": str(report.window_start),
            "base_snapshot": report.base,
            "deleted": report.counts(),
            "kept_segments": report.kept_segments,
            "kept_snapshots": len(report.kept_snapshots),
        },
    )
    return report
