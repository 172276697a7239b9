"""Point-in-time restore: materialise the state at an event, then bundle it or push it.

``materialise`` starts from the newest snapshot at or before the wanted position and folds only
the segments after it (never a full replay when a snapshot exists). ``restore_to_target`` pushes
the state in dependency order (markings and identities, other objects, relationships, sightings,
relationships of relationships or sightings, containers, notes, relationships of containers or
notes; an object referencing one of the same or a later phase, such as a relationship of a
relationship or a report in a grouping, after it, see ``StateStore.push_records``)
in acknowledged batches, then deletes every tombstoned id so a restore never
brings back what was deleted or merged away. After each acknowledged batch it records its
position in a small JSON file, so a restart with the same arguments and the same target platform
continues from there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, Protocol, TextIO, runtime_checkable

import orjson

from .archive import ArchiveReader
from .errors import ConfigError, PayloadTooLarge
from .events import EventId
from .files import FILES_MARK, each_file_inline, file_entries, with_file_data
from .snapshot import fold_segments, list_snapshots, pruned_before, seed_state, state_sha256
from .state import PHASES, StateStore, remove_state_files
from .storage import Storage
from .storage.local import fsync_dir

__all__ = [
    "KnownIds",
    "ResolvesIds",
    "STEPS",
    "Progress",
    "RestorePlan",
    "RestoreReport",
    "RestoreTarget",
    "TextProgress",
    "materialise",
    "materialise_plan",
    "parse_until",
    "private_file",
    "restore_to_target",
    "to_bundle",
]

log = logging.getLogger(__name__)


def private_file(path: str, flags: int) -> int:
    """``open(..., opener=private_file)``: a file of the restore's (a copy of the CTI, a target
    URL) readable by its owner and group only, as the archive's own files are."""
    return os.open(path, flags, 0o640)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_SEQ = 10**10 - 1  # the largest sequence an event id can carry (10 digits)
_SAMPLE = 10
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
    # The archive's oldest segments were pruned and no snapshot stood in for them: objects not
    # changed since are missing from this state.
    incomplete: bool = False


def parse_until(text: str) -> EventId:
    """``<ms>-<seq>`` as is; an ISO 8601 date or time → every event at or before that instant."""
    text = text.strip()
    if EventId.is_valid(text):
        return EventId.parse(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError("--until", f"not an event id or ISO 8601 date: {text[:64]!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    # Whole milliseconds by integer arithmetic: ``timestamp() * 1000`` in floating point puts
    # some instants one millisecond early (2038-06-04T14:17:18.107Z), leaving out their events.
    ms = (when - _EPOCH) // timedelta(milliseconds=1)
    if ms < 0:
        raise ConfigError("--until", "date before 1970")
    return EventId(ms, _MAX_SEQ)


def materialise_plan(
    storage: Storage, *, until: EventId | None, work_dir: Path, allow_partial: bool = False
) -> tuple[StateStore, RestorePlan]:
    """The state after every event with group id ``<= until`` (all events when None).

    A damaged segment (sha256) or a gap in the chain raises ``PermanentError``; with
    ``allow_partial`` a gap is only logged."""
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db_path = work_dir / "restore-state.sqlite"
    db_path.unlink(missing_ok=True)  # always rebuilt: the archive is the source of truth
    candidates = [s for s in list_snapshots(storage) if until is None or s.as_of <= until]
    try:
        state, seed = seed_state(db_path, storage, candidates)  # closed on failure
    except BaseException:
        remove_state_files(db_path)  # as large as the platform: not left to fill the work dir
        raise
    try:
        reader = ArchiveReader(storage)
        incomplete = seed is None and _warn_if_pruned(reader)
        segments, events, _ = fold_segments(
            state,
            reader,
            start_after=seed.last_segment_manifest if seed else None,
            until=until,
            allow_gaps=allow_partial,
        )
        state.settle()  # the whole state in SQL before anything reads it, and the memory freed
    except BaseException:
        with contextlib.suppress(Exception):
            state.close()  # its last write may fail too (a full disk)
        remove_state_files(db_path)
        raise
    counts = state.counts()
    plan = RestorePlan(
        as_of=state.as_of,
        snapshot=seed.key if seed else None,
        segments=segments,
        events=events,
        objects=counts["objects"],
        tombstones=counts["tombstones"],
        incomplete=incomplete,
    )
    # Counts stay numbers and a missing snapshot stays null in JSON logs; the position is text.
    fields = asdict(plan)
    fields["as_of"] = str(plan.as_of) if plan.as_of is not None else None
    log.info("State materialised.", extra=fields)
    return state, plan


def materialise(storage: Storage, *, until: EventId | None, work_dir: Path) -> StateStore:
    return materialise_plan(storage, until=until, work_dir=work_dir)[0]


def _warn_if_pruned(reader: ArchiveReader) -> bool:
    """Whether the oldest segment continues one that is gone (said loudly when it does)."""
    first = pruned_before(reader)
    if first is not None:
        log.warning(
            "The archive's oldest segments are gone and no snapshot covers them: objects "
            "not changed since then are missing from the restored state.",
            extra={"first_segment": first},
        )
    return first is not None


# ---------------------------------------------------------------------- bundle export
def to_bundle(state: StateStore, out: BinaryIO, *, files: Storage | None = None) -> int:
    """Write the state as one STIX 2.1 bundle, streamed, in push order. Returns the count.
    ``files``: the archive, whose attached files go inline (``data``, base64), as the
    platform's worker and OpenCTI's restore-files connector import them."""
    marker = str(state.as_of) if state.as_of else "empty"
    out.write(b'{"type":"bundle","id":"bundle--')
    out.write(str(uuid.uuid5(_BUNDLE_NS, marker)).encode())
    out.write(b'","objects":[')
    count = 0
    for phase in range(len(PHASES)):
        # The stored bytes are already compact JSON of the object: written as they are.
        for blob in state.blobs(phase=phase):
            if count:
                out.write(b",\n")
            if files is not None and FILES_MARK in blob:
                done = with_file_data(orjson.loads(blob), files)
                _say_lacking(done.stix, done.lacking)
                blob = orjson.dumps(done.stix)
            out.write(blob)
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


@runtime_checkable
class ResolvesIds(Protocol):
    """Optional: which object (its standard id) the target holds under each given id.

    Needed to delete merged-away sources safely: on a target that already holds the merge, the
    source id is an alias of the merge target, and deleting it would delete the target.
    """

    def resolve_ids(self, stix_ids: list[str]) -> dict[str, str]: ...


# Restore steps, in order: merged-away sources the target still holds as objects, the push
# phases, then every other tombstoned id.
STEPS = ("merged-away", *PHASES, "deleted")
_MERGED_STEP, _DELETED_STEP = 0, len(STEPS) - 1


@dataclass
class RestoreReport:
    dry_run: bool
    as_of: str | None
    pushed: int = 0
    deleted: int = 0  # objects the target held (when it can say: KnownIds), asked to delete
    batches: int = 0
    skipped_deletes: int = 0  # tombstoned ids now carried by a live object (merged into it)
    unchecked_merged: int = 0  # merged-away ids not checked: the target cannot resolve ids
    resumed_from: dict[str, Any] | None = None
    files: int = 0  # attached files pushed inline (a dry run: named)
    files_lacking: int = 0  # named by an object, not in the archive (gone when archived)
    files_too_large: int = 0  # left out: above --max-file-mb, or refused by the platform (413)
    upserts_by_type: dict[str, int] = field(default_factory=dict)
    deletes_by_type: dict[str, int] = field(default_factory=dict)
    # Dry run against a target that implements ``known_ids`` only.
    created_by_type: dict[str, int] = field(default_factory=dict)
    updated_by_type: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[str]] = field(default_factory=dict)

    def count(self, table: dict[str, int], sample: str, stix_id: str) -> None:
        kind = stix_id.split("--", 1)[0]
        table[kind] = table.get(kind, 0) + 1
        ids = self.samples.setdefault(sample, [])
        if len(ids) < _SAMPLE:
            ids.append(stix_id)


# Summary counts a resumed run carries on from the progress file, so that its summary covers
# the whole restore as ``pushed`` and ``deleted`` do.
_CARRIED = (
    "files",
    "files_lacking",
    "files_too_large",
    "skipped_deletes",
    "unchecked_merged",
    "upserts_by_type",
    "deletes_by_type",
)


# What each part of the progress file's fingerprint stands for, in the operator's words. Each
# changes what a restore pushes or where: progress made under other values does not count.
_FINGERPRINT_WORDS = {
    "as_of": "the point in time (--until)",
    "state_sha256": "the archived state",
    "tombstones": "the archived state",
    "apply_deletes": "--apply-deletes",
    "batch_size": "the batch size",
    "target": "the target platform (--opencti)",
    "target_id": "platform at that address (its id changed: reinstalled since?)",
    "files": "whether attached files are pushed",
    "max_file_bytes": "--max-file-mb",
}


def _what_differs(saved: Any, fingerprint: dict[str, Any]) -> str:
    """Why a progress file's fingerprint is not this restore's, for the log."""
    if not isinstance(saved, dict):
        return "no fingerprint"
    if any(key not in saved for key in fingerprint):
        return "written by an older version, which recorded less of the restore's settings"
    changed = [_FINGERPRINT_WORDS.get(k, k) for k in fingerprint if saved.get(k) != fingerprint[k]]
    return "another " + ", ".join(dict.fromkeys(changed)) if changed else "other settings"


class _Resume:
    """The restore position, saved atomically after every acknowledged batch."""

    def __init__(self, path: Path | None, fingerprint: dict[str, Any]) -> None:
        self.path, self.fingerprint = path, fingerprint
        # The position in a step: its last acknowledged key, and in a push phase the rank it
        # was pushed under (``StateStore.push_records``; 0 in a file without one).
        self.step, self.last_key, self.last_rank = 0, "", 0
        self.pushed = self.deleted = self.batches = 0
        # What the progress display had counted (ids skipped or not held count too).
        self.counted = 0
        self.tallies: dict[str, Any] = {}  # ``_CARRIED`` counts of the report
        # Ids the target held that a delete request sent after the last position asks it to
        # delete: written before the request, so that a run stopped once it was acknowledged
        # (before the position moved past it) leaves their count to the run that resumes it.
        self.deleting: set[str] = set()
        self.resumed: dict[str, Any] | None = None
        if path is None or not path.exists():
            return
        try:
            saved = orjson.loads(path.read_bytes())
            theirs = saved.get("fingerprint") if isinstance(saved, dict) else None
            if theirs != fingerprint:
                log.warning(
                    "Restore progress belongs to another restore (%s); starting over: "
                    "everything is pushed again.",
                    _what_differs(theirs, fingerprint),
                )
                return
            step, last_key = int(saved["step"]), str(saved["last_key"])
            last_rank = int(saved.get("last_rank", 0))
            pushed, deleted, batches = (int(saved[k]) for k in ("pushed", "deleted", "batches"))
            counted = int(saved.get("counted", pushed + deleted))  # absent in older files
            tallies = saved.get("tallies")
            tallies = tallies if isinstance(tallies, dict) else {}
            deleting = saved.get("deleting") or []  # absent in older files
            deleting = {str(sid) for sid in deleting} if isinstance(deleting, list) else set()
            if not 0 <= step < len(STEPS) or saved.get("step_name") != STEPS[step]:
                # Written by a version whose steps differ: its position means something else.
                log.warning("Restore progress from another version's steps; starting over.")
                return
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("Ignoring an unreadable restore progress file: %s", exc)
            return
        self.step, self.last_key, self.last_rank = step, last_key, last_rank
        self.pushed, self.deleted, self.batches = pushed, deleted, batches
        self.counted, self.tallies, self.deleting = counted, tallies, deleting
        self.resumed = {"step": STEPS[step], "last_key": last_key}
        if last_rank:
            self.resumed["last_rank"] = last_rank

    def save(self, step: int, at: tuple[int, str], deleting: Collection[str] = ()) -> None:
        """The position ``at`` in ``step`` with the counts set before; ``deleting``: the ids
        of a delete request about to be sent after that position (see ``self.deleting``)."""
        self.step, (self.last_rank, self.last_key) = step, at
        self.deleting = set(deleting)
        last_key = self.last_key
        if self.path is None:
            return
        body = orjson.dumps(
            {
                "format": 1,
                "fingerprint": self.fingerprint,
                "step": step,
                "step_name": STEPS[step],
                "last_key": last_key,
                "last_rank": self.last_rank,
                "pushed": self.pushed,
                "deleted": self.deleted,
                "batches": self.batches,
                "counted": self.counted,
                "tallies": self.tallies,
                "deleting": sorted(self.deleting),
            },
            option=orjson.OPT_INDENT_2,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb", opener=private_file) as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        # The rename is an entry of the directory: a power cut could undo it until that is
        # synced too, and the next run would go on from an older position, with older counts.
        fsync_dir(self.path.parent)

    def start_after(self, step: int) -> str | None:
        """Where ``step`` resumes (None: from its start); steps already done are skipped."""
        return (self.last_key or None) if step == self.step else None

    def push_after(self, step: int) -> tuple[int, str] | None:
        """Where push phase ``step`` resumes: ``(rank, key)``, None from its start."""
        if step != self.step or not (self.last_key or self.last_rank):
            return None
        return self.last_rank, self.last_key

    def saving_deletes(self, ids: Collection[str]) -> None:
        """Written before a delete request for ``ids``: the same position and counts."""
        self.save(self.step, (self.last_rank, self.last_key), deleting=ids)

    def done(self) -> None:
        if self.path is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        # Else a power cut could bring the file back: the same restore run again later would
        # take itself for finished and push nothing.
        fsync_dir(self.path.parent)


class _Run:
    """One restore run: the target, the report, the resume position and the progress bar."""

    def __init__(
        self,
        state: StateStore,
        target: RestoreTarget,
        resume: _Resume,
        report: RestoreReport,
        progress: Progress | None,
        total: int,
        dry_run: bool,
    ) -> None:
        self.state, self.target, self.resume, self.report = state, target, resume, report
        self.progress, self.total, self.dry_run = progress, total, dry_run
        self.done = resume.counted
        self.lookup = target if dry_run and isinstance(target, KnownIds) else None
        # Deletes are counted as the target held them: an id it does not hold is a no-op.
        self.holds = target if isinstance(target, KnownIds) else None
        self.resolver = target if isinstance(target, ResolvesIds) else None
        # Ids the run this one resumes was deleting when it stopped (held by the target then).
        self.deleting = set(resume.deleting)

    def tick(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress.update(min(self.done, self.total), self.total)

    def push(
        self, batch: list[dict[str, Any]], step: int, at: tuple[int, str], *, save: bool = True
    ) -> None:
        report = self.report
        ids = [str(o["id"]) for o in batch]
        known = self.lookup.known_ids(ids) if self.lookup is not None else None
        for sid in ids:
            report.count(report.upserts_by_type, "upsert", sid)
            if known is not None:
                if sid in known:
                    report.count(report.updated_by_type, "update", sid)
                else:
                    report.count(report.created_by_type, "create", sid)
        if not self.dry_run:
            self.target.push_objects(batch)
            report.pushed += len(batch)
            report.batches += 1
        self.tick(len(batch))  # before the save: a resumed run counts on from there
        if save and not self.dry_run:
            self._save(step, at)

    def push_with_files(
        self, stix: dict[str, Any], files: Storage, max_bytes: int, step: int, at: tuple[int, str]
    ) -> None:
        """Push one object, then once per archived file with that file's bytes inline (a dry
        run only counts them): a request holds one file, so files that each fit the platform's
        max_payload_body_size all go. A file refused for its size (413) is left out, said and
        counted. The position is saved once the object's last file is acknowledged."""
        report = self.report
        if self.dry_run:
            report.files += len(file_entries(stix))
            self.push([stix], step, at)
            return
        self.push([stix], step, at, save=False)
        lacking: list[str] = []
        too_large: list[str] = []
        for copy in each_file_inline(stix, files, max_bytes=max_bytes):
            if copy.stix is None:
                (lacking if copy.why == "lacking" else too_large).append(copy.name)
                continue
            try:
                self.target.push_objects([copy.stix])
            except PayloadTooLarge:
                too_large.append(copy.name)
                continue
            report.files += 1
            report.batches += 1
        report.files_lacking += len(lacking)
        _say_lacking(stix, lacking)
        if too_large:
            report.files_too_large += len(too_large)
            log.warning(
                "Attached files too large for the platform's requests were left out: upload "
                "them by hand from the archive (files/), or raise its max_payload_body_size "
                "and --max-file-mb.",
                extra={"object": stix.get("id"), "files": too_large},
            )
        self._save(step, at)

    def delete(
        self,
        ids: list[str],
        step: int,
        last_key: str,
        *,
        resolved: bool = False,
        asked: list[str] | None = None,
    ) -> None:
        """``resolved``: the target said it holds every one of ``ids`` under that very id (the
        caller asked it), so it is not asked again. ``asked``: the batch the caller kept
        ``ids`` from (``ids`` when None); those of its ids the stopped run this one resumes was
        deleting count as deleted, held still or gone since, as in a run never stopped."""
        report = self.report
        if resolved or self.holds is None or not ids:
            present = set(ids)
        else:
            present = self.holds.known_ids(ids)
        batch = ids if asked is None else asked
        present |= self.deleting.intersection(batch)
        self.deleting -= present
        if ids and present and not self.dry_run:
            # Before the request: acknowledged and then stopped, the position has not moved,
            # and the ids it deleted are gone when the resumed run asks again.
            self.resume.saving_deletes(present)
        for sid in batch:
            if sid in present:
                report.count(report.deletes_by_type, "delete", sid)
        if not self.dry_run:
            if ids:
                # Every id is sent (one the lookup missed is deleted all the same); those the
                # target held are counted.
                self.target.delete_ids(ids)
            if ids or present:
                report.deleted += len(present)
                report.batches += 1
        self.tick(len(ids))
        if not self.dry_run:
            self._save(step, (0, last_key))

    def _save(self, step: int, at: tuple[int, str]) -> None:
        r = self.report
        self.resume.pushed, self.resume.deleted, self.resume.batches = (
            r.pushed,
            r.deleted,
            r.batches,
        )
        self.resume.counted = self.done
        tallies: dict[str, Any] = {}
        for key in _CARRIED:
            value = getattr(r, key)
            tallies[key] = dict(value) if isinstance(value, dict) else value
        self.resume.tallies = tallies
        self.resume.save(step, at)


def restore_to_target(
    state: StateStore,
    target: RestoreTarget,
    *,
    apply_deletes: bool = True,
    dry_run: bool = False,
    progress: Progress | None = None,
    resume_file: Path | None = None,
    batch_size: int = 500,
    target_name: str | None = None,
    target_id: str | None = None,
    files: Storage | None = None,
    max_file_bytes: int = 35 * 1024 * 1024,
) -> RestoreReport:
    """Push the state into ``target``; see the module docstring. Resumable via ``resume_file``.
    ``files``: the archive, whose attached files are pushed inline after their objects, one
    file a request (those above ``max_file_bytes`` left out: see ``each_file_inline``).

    A restart with the same state, arguments, ``target_name`` (the platform's URL: progress
    made on one platform says nothing about another) and ``target_id`` (the platform's own id:
    one reinstalled at the same URL after the kill holds none of it) continues after the last
    acknowledged batch, so at most one batch is pushed twice (pushes are idempotent upserts).
    Any other value of what decides what is pushed and where (the state, ``apply_deletes``,
    ``batch_size``, ``target_name``, ``target_id``, whether ``files`` are pushed,
    ``max_file_bytes``) starts over, said in the log; what only decides how (the target's
    token, timeouts) is not part of it.
    """
    if batch_size < 1:
        raise ConfigError("restore.batch_size", "must be positive")
    counts = state.counts()
    as_of = str(state.as_of) if state.as_of else None
    fingerprint: dict[str, Any] = {
        "as_of": as_of,
        "state_sha256": state_sha256(state),
        "tombstones": counts["tombstones"],
        "apply_deletes": apply_deletes,
        "batch_size": batch_size,
        "target": target_name,
        "target_id": target_id,
        # Objects already pushed went with the files of these rules: a run with others must
        # push them again, or their files would never be sent (or be left out unsaid).
        "files": files is not None,
        "max_file_bytes": max_file_bytes if files is not None else None,
    }
    resume = _Resume(None if dry_run else resume_file, fingerprint)
    report = RestoreReport(dry_run=dry_run, as_of=as_of, resumed_from=resume.resumed)
    report.pushed, report.deleted, report.batches = resume.pushed, resume.deleted, resume.batches
    _carry_on(report, resume.tallies)
    total = counts["objects"] + (counts["tombstones"] if apply_deletes else 0)
    run = _Run(state, target, resume, report, progress, total, dry_run)
    run.tick(0)
    if apply_deletes and resume.step <= _MERGED_STEP:
        _merged_away(run, batch_size)
    for index in range(len(PHASES)):
        step = index + 1
        if step < resume.step:
            continue
        batch: list[dict[str, Any]] = []
        last = (0, "")
        for rank, rec in state.push_records(index, after=resume.push_after(step)):
            if files is not None and file_entries(rec.data):
                # Pushed alone, then once per file: a bundle never carries two objects' files.
                if batch:
                    run.push(batch, step, last)
                    batch = []
                run.push_with_files(rec.data, files, max_file_bytes, step, (rank, rec.key))
                continue
            batch.append(rec.data)
            last = (rank, rec.key)
            if len(batch) >= batch_size:
                run.push(batch, step, last)
                batch = []
        if batch:
            run.push(batch, step, last)
    if apply_deletes:
        _deleted(run, batch_size)
    if not dry_run:
        resume.done()
    if progress is not None:
        progress.close()
    log.info(
        "Restore dry run finished." if dry_run else "Restore finished.",
        extra={"pushed": report.pushed, "deleted": report.deleted, "batches": report.batches},
    )
    return report


def _carry_on(report: RestoreReport, tallies: dict[str, Any]) -> None:
    """The counts a stopped run had saved, into the report of the run that resumes it (a value
    of another shape, from a damaged file, is left out)."""
    for key in _CARRIED:
        value, start = tallies.get(key), getattr(report, key)
        if isinstance(start, int) and isinstance(value, int):
            setattr(report, key, value)
        elif isinstance(start, dict) and isinstance(value, dict):
            counts = {str(k): n for k, n in value.items() if isinstance(n, int)}
            setattr(report, key, counts)


def _merged_away(run: _Run, batch_size: int) -> None:
    """Delete merged-away sources that the target still holds as objects of their own.

    Runs before any push: afterwards the merge target, carrying the source ids as aliases,
    would answer to them too.
    """
    state, after = run.state, run.resume.start_after(_MERGED_STEP)
    pending: list[str] = []
    last_key = ""

    def flush() -> None:
        nonlocal pending
        if run.resolver is None:
            run.report.unchecked_merged += len(pending)
            run.tick(len(pending))
            pending = []
            return
        held = run.resolver.resolve_ids(pending) if pending else {}
        doomed = [sid for sid in pending if held.get(sid) == sid]
        run.tick(len(pending) - len(doomed))  # counted before the position passes them
        run.delete(doomed, _MERGED_STEP, last_key, resolved=True, asked=pending)
        pending = []

    for tomb in state.tombstones(after=after):
        if tomb.reason == "merged" and state.get(tomb.stix_id) is not None:
            pending.append(tomb.stix_id)
            last_key = tomb.key
            if len(pending) >= batch_size:
                flush()
    flush()
    if run.report.unchecked_merged:
        log.warning(
            "The target cannot resolve ids: merged-away objects it may still hold separately "
            "were left alone.",
            extra={"count": run.report.unchecked_merged},
        )


def _deleted(run: _Run, batch_size: int) -> None:
    """Delete every tombstoned id that no live object answers to, in the state and, when the
    target can say (``ResolvesIds``), on the target: an id it holds only as an alias of another
    entity (a merge target deleted and created again since, which the platform still finds
    under a source's old id) is not deleted there, as deleting it would delete that entity."""
    state = run.state
    after = run.resume.start_after(_DELETED_STEP)
    ids: list[str] = []
    last_key = after or ""

    def flush() -> None:
        nonlocal ids
        doomed, resolved = ids, False
        if run.resolver is not None and ids:
            resolved = True
            held = run.resolver.resolve_ids(ids)
            doomed = [sid for sid in ids if held.get(sid) == sid]
            aliases = [sid for sid in ids if held.get(sid) not in (None, sid)]
            if aliases:
                run.report.skipped_deletes += len(aliases)
                log.info(
                    "Tombstoned ids the target holds only as aliases of other entities: not "
                    "deleted there.",
                    extra={"count": len(aliases), "sample": aliases[:5]},
                )
            run.tick(len(ids) - len(doomed))
        run.delete(doomed, _DELETED_STEP, last_key, resolved=resolved, asked=ids)
        ids = []

    for tomb in state.tombstones(after=after):
        last_key = tomb.key
        if state.get(tomb.stix_id) is not None:
            if tomb.reason != "merged":
                run.report.skipped_deletes += 1  # the id was taken over by a live object
                run.tick(1)
            continue  # merged-away: handled (or counted) before the pushes
        ids.append(tomb.stix_id)
        if len(ids) >= batch_size:
            flush()
    if ids or (last_key != (after or "")):
        flush()


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


def _say_lacking(stix: dict[str, Any], lacking: list[str]) -> None:
    if lacking:
        log.warning(
            "Attached files not in the archive (gone from the platform when archived, or "
            "archived without file backup): the object is restored without them.",
            extra={"object": stix.get("id"), "files": lacking},
        )


def _hms(seconds: float) -> str:
    secs = int(seconds)
    return f"{secs // 3600}:{secs % 3600 // 60:02d}:{secs % 60:02d}"
