"""Point-in-time restore: materialise the state at an event, then bundle it or push it.

``materialise`` starts from the newest snapshot at or before the wanted position and folds only
the segments after it (never a full replay when a snapshot exists). ``restore_to_target`` pushes
the state in dependency order (markings and identities, other objects, relationships, sightings,
containers, notes) in acknowledged batches, then deletes every tombstoned id so a restore never
brings back what was deleted or merged away. After each acknowledged batch it records its
position in a small JSON file, so a restart with the same arguments continues from there.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TextIO, runtime_checkable

import orjson

from .archive import ArchiveReader
from .errors import ConfigError
from .events import EventId
from .snapshot import fold_segments, list_snapshots, state_sha256
from .state import PHASES, StateStore
from .storage import Storage

__all__ = [
    "KnownIds",
    "Progress",
    "RestorePlan",
    "RestoreReport",
    "RestoreTarget",
    "TextProgress",
    "materialise",
    "materialise_plan",
    "parse_until",
    "restore_to_target",
    "to_bundle",
]

log = logging.getLogger(__name__)

_MAX_SEQ = 10**10 - 1  # the largest sequence an event id can carry (10 digits)
_SAMPLE = 10
_DELETE_PHASE = len(PHASES)
_BUNDLE_NS = uuid.UUID("0d7f3a52-61c4-4b8e-9a0f-5c2e7b1d9e43")


# ---------------------------------------------------------------------- materialising
@dataclass(frozen=True, slots=True)
class RestorePlan:
    """How a state was materialised: from which snapshot, with how many segments on top."""

    as_of: EventId | None
    snapshot: str | None  # as-of key of the seed snapshot
    segments: int
    events: int
    objects: int
    tombstones: int


def parse_until(text: str) -> EventId:
    """``<ms>-<seq>`` as is; an ISO 8601 date or time → every event at or before that instant."""
    text = text.strip()
    if EventId.is_valid(text):
        return EventId.parse(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError("until", f"not an event id or ISO 8601 date: {text[:64]!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ms = int(when.timestamp() * 1000)
    if ms < 0:
        raise ConfigError("until", "date before 1970")
    return EventId(ms, _MAX_SEQ)


def materialise_plan(
    storage: Storage, *, until: EventId | None, work_dir: Path
) -> tuple[StateStore, RestorePlan]:
    """The state after every event with group id ``<= until`` (all events when None)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    db_path = work_dir / "restore-state.sqlite"
    db_path.unlink(missing_ok=True)  # always rebuilt: the archive is the source of truth
    state = StateStore(db_path)
    try:
        seed = None
        for info in list_snapshots(storage):
            if until is None or info.as_of <= until:
                seed = info
        reader = ArchiveReader(storage)
        if seed is not None:
            state.load_snapshot(storage, seed.key)
        else:
            _warn_if_pruned(reader)
        segments, events, _ = fold_segments(
            state,
            reader,
            start_after=seed.last_segment_manifest if seed else None,
            until=until,
        )
    except BaseException:
        state.close()
        raise
    counts = state.counts()
    plan = RestorePlan(
        as_of=state.as_of,
        snapshot=seed.key if seed else None,
        segments=segments,
        events=events,
        objects=counts["objects"],
        tombstones=counts["tombstones"],
    )
    log.info("State materialised.", extra={k: str(v) for k, v in asdict(plan).items()})
    return state, plan


def materialise(storage: Storage, *, until: EventId | None, work_dir: Path) -> StateStore:
    return materialise_plan(storage, until=until, work_dir=work_dir)[0]


def _warn_if_pruned(reader: ArchiveReader) -> None:
    for ref in reader.manifests():
        if ref.manifest.after_event_id is not None:
            log.warning(
                "The archive's oldest segments are gone and no snapshot covers them: objects "
                "not changed since then are missing from the restored state.",
                extra={"first_segment": ref.manifest.segment},
            )
        return


# ---------------------------------------------------------------------- bundle export
def to_bundle(state: StateStore, out: BinaryIO) -> int:
    """Write the state as one STIX 2.1 bundle, streamed, in push order. Returns the count."""
    marker = str(state.as_of) if state.as_of else "empty"
    out.write(b'{"type":"bundle","id":"bundle--')
    out.write(str(uuid.uuid5(_BUNDLE_NS, marker)).encode())
    out.write(b'","objects":[')
    count = 0
    for phase in range(len(PHASES)):
        for rec in state.records(phase=phase):
            if count:
                out.write(b",\n")
            out.write(orjson.dumps(rec.data))
            count += 1
    out.write(b"]}\n")
    return count


# ---------------------------------------------------------------------- pushing
class RestoreTarget(Protocol):
    """Where a restore writes (``connector.target.opencti.OpenCTITarget`` is one)."""

    def push_objects(self, objects: list[dict[str, Any]]) -> None:
        """Upsert the objects in order; returns once acknowledged."""
        ...

    def delete_ids(self, stix_ids: list[str]) -> None:
        """Delete by STIX id; unknown ids are not an error."""
        ...


@runtime_checkable
class KnownIds(Protocol):
    """Optional: a target that can tell which ids it already holds (dry-run create/update)."""

    def known_ids(self, stix_ids: list[str]) -> set[str]: ...


class Progress(Protocol):
    def update(self, done: int, total: int) -> None: ...

    def close(self) -> None: ...


@dataclass
class RestoreReport:
    dry_run: bool
    as_of: str | None
    pushed: int = 0
    deleted: int = 0
    batches: int = 0
    skipped_deletes: int = 0  # tombstoned ids that now name a live object (merged into it)
    resumed_from: dict[str, Any] | None = None
    upserts_by_type: dict[str, int] = field(default_factory=dict)
    deletes_by_type: dict[str, int] = field(default_factory=dict)
    # Dry run against a target that implements ``known_ids`` only.
    created_by_type: dict[str, int] = field(default_factory=dict)
    updated_by_type: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)

    def _count(self, table: dict[str, int], sample: str, stix_id: str) -> None:
        kind = stix_id.split("--", 1)[0]
        table[kind] = table.get(kind, 0) + 1
        ids = self.samples.setdefault(sample, [])
        if len(ids) < _SAMPLE:
            ids.append(stix_id)


class _Resume:
    """The restore position, saved atomically after every acknowledged batch."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any]) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.phase, self.last_key = 0, ""
        self.pushed = self.deleted = self.batches = 0
        self.resumed: dict[str, Any] | None = None
        if path is None or not path.exists():
            return
        try:
            saved = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            log.warning("Ignoring an unreadable restore progress file: %s", exc)
            return
        if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
            log.warning("Restore progress belongs to another restore; starting over.")
            return
        self.phase, self.last_key = int(saved["phase"]), str(saved["last_key"])
        self.pushed, self.deleted = int(saved["pushed"]), int(saved["deleted"])
        self.batches = int(saved["batches"])
        self.resumed = {"phase": self.phase, "last_key": self.last_key}

    def save(self, phase: int, last_key: str) -> None:
        self.phase, self.last_key = phase, last_key
        if self.path is None:
            return
        body = orjson.dumps(
            {
                "format": 1,
                "fingerprint": self.fingerprint,
                "phase": phase,
                "phase_name": PHASES[phase] if phase < len(PHASES) else "deletes",
                "last_key": last_key,
                "pushed": self.pushed,
                "deleted": self.deleted,
                "batches": self.batches,
            },
            option=orjson.OPT_INDENT_2,
        )
        tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def done(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def restore_to_target(
    state: StateStore,
    target: RestoreTarget,
    *,
    apply_deletes: bool = True,
    dry_run: bool = False,
    progress: Progress | None = None,
    resume_file: Path | None = None,
    batch_size: int = 500,
) -> RestoreReport:
    """Push the state into ``target``; see the module docstring. Resumable via ``resume_file``."""
    if batch_size < 1:
        raise ConfigError("restore.batch_size", "must be positive")
    counts = state.counts()
    as_of = str(state.as_of) if state.as_of else None
    fingerprint: dict[str, Any] = {
        "as_of": as_of,
        "state_sha256": state_sha256(state),
        "tombstones": counts["tombstones"],
        "apply_deletes": apply_deletes,
    }
    resume = _Resume(None if dry_run else resume_file, fingerprint)
    report = RestoreReport(dry_run=dry_run, as_of=as_of)
    report.resumed_from = resume.resumed
    report.pushed, report.deleted, report.batches = resume.pushed, resume.deleted, resume.batches
    total = counts["objects"] + (counts["tombstones"] if apply_deletes else 0)
    done = resume.pushed + resume.deleted + _skipped_before(state, resume)
    lookup = target if dry_run and isinstance(target, KnownIds) else None

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress.update(done, total)

    tick(0)
    for phase in range(len(PHASES)):
        if phase < resume.phase:
            continue
        after = resume.last_key if phase == resume.phase else ""
        batch: list[dict[str, Any]] = []
        last_key = after
        for rec in state.records(phase=phase, after=after or None):
            batch.append(rec.data)
            last_key = rec.key
            if len(batch) >= batch_size:
                _push(target, batch, report, resume, lookup, dry_run, phase, last_key)
                tick(len(batch))
                batch = []
        if batch:
            _push(target, batch, report, resume, lookup, dry_run, phase, last_key)
            tick(len(batch))
    if apply_deletes:
        after = resume.last_key if resume.phase == _DELETE_PHASE else ""
        ids: list[str] = []
        last_key = after
        for tomb in state.tombstones(after=after or None):
            last_key = tomb.key
            if state.get(tomb.stix_id) is not None:
                report.skipped_deletes += 1  # its id now belongs to a live (merge target) object
                tick(1)
            else:
                ids.append(tomb.stix_id)
            if len(ids) >= batch_size:
                _delete(target, ids, report, resume, lookup, dry_run, last_key)
                tick(len(ids))
                ids = []
        if ids or (last_key != after and not dry_run):
            _delete(target, ids, report, resume, lookup, dry_run, last_key)
            tick(len(ids))
    if not dry_run:
        resume.done()
    if progress is not None:
        progress.close()
    log.info(
        "Restore finished." if not dry_run else "Restore dry run finished.",
        extra={"pushed": report.pushed, "deleted": report.deleted, "batches": report.batches},
    )
    return report


def _skipped_before(state: StateStore, resume: _Resume) -> int:
    # Skipped deletes are not persisted; recount them so a resumed progress bar starts right.
    if resume.phase != _DELETE_PHASE:
        return 0
    return sum(
        1
        for t in state.tombstones()
        if t.key <= resume.last_key and state.get(t.stix_id) is not None
    )


def _push(
    target: RestoreTarget,
    batch: list[dict[str, Any]],
    report: RestoreReport,
    resume: _Resume,
    lookup: KnownIds | None,
    dry_run: bool,
    phase: int,
    last_key: str,
) -> None:
    known = lookup.known_ids([str(o["id"]) for o in batch]) if lookup is not None else None
    for obj in batch:
        sid = str(obj["id"])
        report._count(report.upserts_by_type, "upsert", sid)
        if known is not None:
            if sid in known:
                report._count(report.updated_by_type, "update", sid)
            else:
                report._count(report.created_by_type, "create", sid)
    if dry_run:
        return
    target.push_objects(batch)
    report.pushed += len(batch)
    report.batches += 1
    resume.pushed, resume.batches = report.pushed, report.batches
    resume.save(phase, last_key)


def _delete(
    target: RestoreTarget,
    ids: list[str],
    report: RestoreReport,
    resume: _Resume,
    lookup: KnownIds | None,
    dry_run: bool,
    last_key: str,
) -> None:
    present = lookup.known_ids(ids) if lookup is not None else set(ids)
    for sid in ids:
        if sid in present:
            report._count(report.deletes_by_type, "delete", sid)
    if dry_run:
        return
    if ids:
        target.delete_ids(ids)
        report.deleted += len(ids)
        report.batches += 1
    resume.deleted, resume.batches = report.deleted, report.batches
    resume.save(_DELETE_PHASE, last_key)


# ---------------------------------------------------------------------- progress display
class TextProgress:
    """A one-line progress bar with rate and ETA on a terminal; periodic log lines otherwise."""

    def __init__(
        self,
        label: str = "restore",
        *,
        stream: TextIO | None = None,
        interval: float = 10.0,
        width: int = 30,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ) -> None:
        self.label, self.stream, self.width, self.clock = label, stream or sys.stderr, width, clock
        self.tty = self.stream.isatty() if tty is None else tty
        # Redraw a terminal often, but log sparingly.
        self.interval = 0.2 if self.tty else interval
        self._start: tuple[float, int] | None = None
        self._last_shown = float("-inf")
        self._state = (0, 0)

    def update(self, done: int, total: int) -> None:
        now = self.clock()
        if self._start is None:
            self._start = (now, done)
        self._state = (done, total)
        if now - self._last_shown >= self.interval:
            self._show(now)

    def line(self, now: float | None = None) -> str:
        """The current progress as text (``45.0% 450/1000 12.3/s ETA 0:00:44``)."""
        now = self.clock() if now is None else now
        done, total = self._state
        start_t, start_done = self._start or (now, done)
        elapsed = now - start_t
        rate = (done - start_done) / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * done / total if total else 100.0
        eta = "?" if rate <= 0 else _hms((total - done) / rate)
        text = f"{pct:5.1f}% {done}/{total} {rate:.1f}/s ETA {eta}"
        if self.tty:
            filled = int(self.width * min(pct, 100.0) / 100)
            text = f"[{'#' * filled}{'.' * (self.width - filled)}] {text}"
        return f"{self.label} {text}"

    def _show(self, now: float) -> None:
        self._last_shown = now
        if self.tty:
            self.stream.write("\r" + self.line(now))
            self.stream.flush()
        else:
            log.info(self.line(now))

    def close(self) -> None:
        self._show(self.clock())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _hms(seconds: float) -> str:
    secs = int(seconds)
    return f"{secs // 3600}:{secs % 3600 // 60:02d}:{secs % 60:02d}"
