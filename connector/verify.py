"""``verify``: prove an archive is whole, in constant memory, before anyone needs to restore it.

Checked, streaming one object at a time:

* every manifest parses and sits under the key its first id gives; its segment exists; the
  segment's size and sha256 match (hashed while it is decoded, one read); event count, first and
  last group id, per-event rows and counts match the decoded lines;
* segments without a manifest are warnings (a crash between the two writes leaves one);
* continuity: each manifest starts after the previous one ends and its ``after_event_id`` names
  the previous segment's last id. A break is an error unless the checkpoint's
  ``retention_gaps`` explain it. A recorded gap also restarts the patch chains (below), even
  where the segments chain (the connector went on from its checkpoint, the stream did not), and
  inside a segment when the gap was found before the groups ahead of it were written. A gap
  found during a connection (``in_connection``: the platform's trimming may have overtaken its
  reader) leaves the events received between its two ids unchecked, and chains restart past it
  and where its repair resumed (``repair_from_event_id``);
* head: when the oldest kept segment continues from a deleted one, a committed snapshot must be
  able to start a restore there (its as-of at or after that segment's ``after_event_id``), as
  retention guarantees; otherwise the oldest segments are lost (error);
* tail: when the checkpoint is found (in the archive, or where ``checkpoint.uri`` points), the
  segment it names as ``last_segment`` must have its manifest and the archive must reach its
  ``last_segment_last_id``; otherwise the newest segments are lost (the stream resumes after
  them);
* patch chains: an ``update``/``merge`` whose object's previous version was set by the event
  just before it (same object, no break or quarantined event in between) must turn back into
  that version when its ``reverse_patch`` is applied; otherwise an event was missed upstream.
  Reference fields are left out of the comparison (top-level ``*_ref``/``*_refs`` and the
  OpenCTI extension's ``*_ref``/``*_refs``, ``granted_refs`` included): the platform rewrites
  them without an event when a referenced object is deleted, merged or gets a new standard id.
  A dependency is no link (the object as loaded when sent, often past the update after it),
  except one a recovery sent (id at or below its recover point, from ``checkpoint.json``) that is
  later than the version the chain holds: a recovery sends an object once, so the updates such a
  dependency holds get no event of their own. A recovery or reconciliation copy, and such a
  dependency, is the object as read when sent: no link for an update no later than it (it was
  read after the position the live part goes on from, and may hold the updates it repeats), the
  link for a later one.
  On a filtered stream, an object outside the filter gets its updates only while a container in
  the filter holds it (container path), so updates made meanwhile never arrive, by design. Verify
  cannot tell such deliveries apart, so a mismatch on an object the archive has seen in some
  container's ``object_refs`` (and that is no container itself) is a warning, not an error; a
  mismatch on any other object stays an error. The last version of every object lives in a
  sqlite index in ``work_dir``, not in memory;
* snapshots: each committed snapshot's parts exist with matching sha256, size and counts; when
  the state helper is available, each snapshot is recomputed from the previous one (or from an
  empty state when the archive starts at the beginning of the stream) plus the segments in
  between, and its ``state_sha256`` and counts compared. A state image (the restore's database,
  stored beside the parts) is checked by its sha256 and size and, when this version can open
  it, opened and compared with the manifest (position, counts, ``state_sha256``): a restore
  opens it instead of the parts. A damaged image is an error; the snapshot still serves a
  restore through its parts.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import jsonpatch
import orjson

from .archive import ArchiveReader
from .archive.layout import (
    EVENTS_PREFIX,
    MANIFESTS_PREFIX,
    QUARANTINE_PREFIX,
    id_from_key,
    manifest_key_for_segment,
)
from .archive.segment import (
    HashingReader,
    Manifest,
    iter_manifest_rows,
    iter_segment_lines,
    read_manifest,
)
from .checkpoint import CHECKPOINT_KEY, Checkpoint, CheckpointStore
from .errors import ConnectorError, MalformedEvent, NotFound, PermanentError, RetryableError
from .events import OCTI_EXT, EventId, StreamEvent, octi_ext, parse_archive_line
from .files import file_entries, file_key, missing_key, names_files
from .reconcile import REFERER
from .snapshot import (
    SNAPSHOTS_PREFIX,
    STATE_KIND,
    ScratchDb,
    SnapshotInfo,
    claim_scratch,
    drop_scratch,
    fold_segments,
    open_state_image,
    remove_stale_scratch,
    snapshot_manifest_key,
    state_sha256,
)
from .source import iso_to_id
from .state import StateStore, version_of
from .storage import Storage

__all__ = ["VerifyReport", "format_report", "verify_archive"]

_SCRATCH_GLOB = "verify-*.sqlite*"  # this module's scratch files: the index, the replayed state
_PASSES = 3  # at most, while retention prunes the archive under a verify (verify_archive)

log = logging.getLogger(__name__)

# Messages kept per level; counts stay exact beyond it (a wrecked archive must not eat memory).
MAX_MESSAGES = 200

# Relationship fields the platform denormalises from the endpoints: they change when an endpoint
# changes, without an update event (or patch) on the relationship itself.
_DENORMALISED = frozenset(
    {
        "source_value",
        "target_value",
        "source_type",
        "target_type",
        "source_ref_object_marking_refs",
        "target_ref_object_marking_refs",
    }
)


@dataclass
class VerifyReport:
    archive: str = ""
    segments: int = 0
    events: int = 0
    bytes: int = 0
    first_event_id: str | None = None
    last_event_id: str | None = None
    snapshots: int = 0
    snapshots_recomputed: int = 0
    updates_checked: int = 0
    orphans: int = 0
    files: int = 0  # attached files found archived
    files_gone: int = 0  # recorded as gone from the platform (or unreadable) when archived
    files_not_archived: int = 0  # named by events archived without file backup
    error_count: int = 0
    warning_count: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def error(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_MESSAGES:
            self.errors.append(message)
        log.error("Archive verification error.", extra={"detail": message})

    def warning(self, message: str) -> None:
        self.warning_count += 1
        if len(self.warnings) < MAX_MESSAGES:
            self.warnings.append(message)
        log.warning("Archive verification warning.", extra={"detail": message})


def format_report(report: VerifyReport) -> str:
    rows = [
        ("archive", report.archive),
        ("segments", f"{report.segments} ({report.bytes} bytes)"),
        ("events", str(report.events)),
        ("first id", report.first_event_id or "-"),
        ("last id", report.last_event_id or "-"),
        ("snapshots", f"{report.snapshots} ({report.snapshots_recomputed} recomputed)"),
        ("updates checked", str(report.updates_checked)),
        ("orphan segments", str(report.orphans)),
        ("attached files", f"{report.files} ({report.files_gone} gone from the platform)"),
        ("errors", str(report.error_count)),
        ("warnings", str(report.warning_count)),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"NOTE     {n}" for n in report.notes]
    lines += [f"ERROR    {e}" for e in report.errors]
    if report.error_count > len(report.errors):
        lines.append(f"ERROR    ... {report.error_count - len(report.errors)} more")
    lines += [f"WARNING  {w}" for w in report.warnings]
    if report.warning_count > len(report.warnings):
        lines.append(f"WARNING  ... {report.warning_count - len(report.warnings)} more")
    lines.append(f"{'result':<{width}}  {'OK' if report.ok else 'DAMAGED'}")
    return "\n".join(lines)


class _Index:
    """Last seen version of every object (sqlite in work_dir), plus quarantine positions."""

    def __init__(self, path: Path) -> None:
        # A killed verify's file is removed by the next one.
        self._scratch = ScratchDb(
            path,
            "CREATE TABLE objs (key TEXT PRIMARY KEY, event_id TEXT, gen INTEGER, data BLOB,"
            " copy INTEGER);"
            "CREATE TABLE segs (key TEXT PRIMARY KEY);"
            "CREATE TABLE quar (after TEXT);"
            "CREATE TABLE members (sid TEXT PRIMARY KEY);"
            "CREATE TABLE files (key TEXT PRIMARY KEY);"
            "CREATE INDEX quar_after ON quar (after);",
        )
        self.path, self.db = path, self._scratch.db

    def close(self) -> None:
        self._scratch.close()

    def get(self, key: str) -> tuple[str, int, bytes, bool] | None:
        row = self.db.execute("SELECT event_id, gen, data, copy FROM objs WHERE key = ?", (key,))
        found = row.fetchone()
        return None if found is None else (found[0], found[1], found[2], bool(found[3]))

    def put(self, key: str, event_id: str, gen: int, data: bytes, copy: bool) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO objs VALUES (?, ?, ?, ?, ?)",
            (key, event_id, gen, data, copy),
        )

    def forget(self, key: str) -> None:
        self.db.execute("DELETE FROM objs WHERE key = ?", (key,))

    def add_members(self, ids: list[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO members VALUES (?)", [(i,) for i in ids])

    def any_member(self, ids: set[str]) -> bool:
        return any(
            self.db.execute("SELECT 1 FROM members WHERE sid = ?", (i,)).fetchone() is not None
            for i in ids
        )

    def first_sight_of_file(self, key: str) -> bool:
        """True the first time ``key`` (an attached file's) is given: an archive holds millions
        of file versions, remembered here rather than in memory."""
        return self.db.execute("INSERT OR IGNORE INTO files VALUES (?)", (key,)).rowcount == 1

    def quarantined_between(self, low: EventId, high: EventId) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM quar WHERE after >= ? AND after < ? LIMIT 1", (low.key, high.key)
        )
        return row.fetchone() is not None


def _object_key(stix: dict[str, Any]) -> str:
    internal = octi_ext(stix).get("id")
    if isinstance(internal, str) and internal:
        return internal
    return str(stix.get("id", ""))


def _is_ref(name: str) -> bool:
    return name.endswith(("_ref", "_refs"))


def _comparable(stix: Any) -> Any:
    """``stix`` without what the platform changes silently: reference fields (a referenced
    object deleted, merged or given a new standard id) and denormalised relationship fields."""
    if not isinstance(stix, dict):
        return stix
    out = {k: v for k, v in stix.items() if not _is_ref(k)}
    octi = octi_ext(stix)
    if octi:
        out["extensions"] = {
            **stix["extensions"],
            OCTI_EXT: {k: v for k, v in octi.items() if k not in _DENORMALISED and not _is_ref(k)},
        }
    return out


def _stix_ids(*versions: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for stix in versions:
        if isinstance(stix.get("id"), str):
            out.add(stix["id"])
        others = octi_ext(stix).get("stix_ids")
        if isinstance(others, list):
            out.update(i for i in others if isinstance(i, str))
    return out


def _members(stix: dict[str, Any]) -> list[str]:
    refs = stix.get("object_refs")
    return [r for r in refs if isinstance(r, str)] if isinstance(refs, list) else []


class _Verifier:
    def __init__(self, storage: Storage, report: VerifyReport, index: _Index) -> None:
        self.storage = storage
        self.report = report
        self.index = index
        # Bumped at every break in the event chain: versions from before it are not compared.
        self.gen = 0
        self.gaps: list[tuple[EventId, EventId | None]] = []
        self.chain_breaks: list[EventId] = []  # where a retention gap restarts patch chains
        self.unchecked: list[tuple[EventId, EventId]] = []  # spans no patch chain is checked in
        # (where the segments after it begin, its recover point) of the first run's recovery and
        # of each retention-gap repair; and the one the segment being checked belongs to.
        self.recoveries: list[tuple[EventId, EventId]] = []
        self.recover_point: EventId | None = None
        # The oldest segment starts the stream (no pruned history before it).
        self.origin = False
        # The oldest kept segment's after_event_id when it names a segment no longer here.
        self.head_after: EventId | None = None
        self.checkpoint: Checkpoint | None = None
        self.snapshot_ids: list[EventId] = []  # as-of ids of the committed, usable snapshots
        self._images: set[str] = set()  # snapshots whose state image is to be opened
        self.head_key: str | None = None  # the first manifest read (retention may delete it)

    # -- set-up ----------------------------------------------------------------------------

    def load_context(self, checkpoints: CheckpointStore) -> None:
        try:
            cp = checkpoints.load()
        except ConnectorError as exc:
            self.report.warning(f"checkpoint.json unreadable ({exc}); retention gaps unknown")
            cp = None
        self.checkpoint = cp
        first = iso_to_id(cp.first_recovery_end) if cp and cp.first_recovery_end else None
        if first is not None:
            self.recoveries.append((EventId(0, 0), first))
        for gap in cp.retention_gaps if cp else []:
            try:
                low = EventId.parse(str(gap.get("checkpoint_event_id")))
            except ValueError:
                continue
            high_text = gap.get("first_retained_event_id")
            high = EventId.parse(high_text) if isinstance(high_text, str) and high_text else None
            self.gaps.append((low, high))
            end = gap.get("archive_last_event_id")
            # The patch chains break after whatever was archived or complete when the gap was
            # found: the archive's end, past the checkpoint when an earlier run stored more
            # before it could checkpoint, or the checkpoint's position, past the archive's end
            # when complete groups were still pending (they share a segment with the repair's).
            valid = isinstance(end, str) and EventId.is_valid(end)
            at = max(EventId.parse(str(end)), low) if valid else low
            if gap.get("in_connection") and high is not None:
                # Found during a connection: the events received between the two ids may miss
                # some anywhere in between (the trim overtook the platform's reader there), so
                # no chain is checked in that span, and they restart past it.
                self.unchecked.append((low, high))
                self.report.notes.append(
                    f"retention gap found during a connection: patch chains from {low} to "
                    f"{high} not checked"
                )
                self.chain_breaks.append(high)
                at = max(at, high)
                # The repair resumed from where the connector was, past the span: its copies
                # (and the updates whose events it does not send) go on from there.
                resumed = gap.get("repair_from_event_id")
                if isinstance(resumed, str) and EventId.is_valid(resumed):
                    at = max(at, EventId.parse(resumed))
            self.chain_breaks.append(at)
            repair = gap.get("repair_recover_until")
            repair_id = iso_to_id(repair) if isinstance(repair, str) else None
            if repair_id is not None:
                self.recoveries.append((self.chain_breaks[-1], repair_id))
        self.recoveries.sort()
        for key in self.storage.list(QUARANTINE_PREFIX):
            after = key[len(QUARANTINE_PREFIX) :].split("/", 1)[0]
            self.index.db.execute("INSERT INTO quar VALUES (?)", (after,))

    def _gap_explains(self, prev_last: EventId, first: EventId) -> bool:
        return any(prev_last <= low < first for low, _ in self.gaps)

    # -- segments --------------------------------------------------------------------------

    def manifests(self) -> Iterator[tuple[str, Manifest | None]]:
        for key in self.storage.list(MANIFESTS_PREFIX):
            if not key.endswith(".json"):
                continue
            try:
                manifest = read_manifest(self.storage, key)  # its rows: see _decode
            except NotFound:
                continue  # deleted by retention while we listed
            except MalformedEvent as exc:
                self.report.error(f"manifest {key} is damaged: {exc.reason}")
                yield key, None
            else:
                yield key, manifest

    def check_segments(self) -> None:
        prev: Manifest | None = None
        unknown = False  # the previous manifest was unreadable: its end is unknown
        for key, m in self.manifests():
            self.head_key = self.head_key or key
            if m is None:
                unknown, self.gen = True, self.gen + 1
                continue
            self.index.db.execute("INSERT OR IGNORE INTO segs VALUES (?)", (m.segment,))
            try:
                if id_from_key(key) != m.first:
                    self.report.error(f"manifest {key} describes first id {m.first_event_id}")
            except ValueError:
                self.report.error(f"manifest {key} has a malformed name")
            if self.report.segments == 0 and not unknown:
                self.origin = m.after_event_id is None
                if m.after_event_id is not None:
                    try:
                        self.head_after = EventId.parse(m.after_event_id)
                    except ValueError:
                        self.report.error(f"manifest {key} has a malformed after_event_id")
            if not unknown:
                self.check_continuity(key, prev, m)
            unknown = False
            self.check_segment(key, m, prev)
            r = self.report
            r.segments += 1
            r.events += m.event_count
            r.bytes += m.size
            r.first_event_id = r.first_event_id or m.first_event_id
            r.last_event_id = m.last_event_id
            prev = m
            self.index.db.commit()  # one transaction per segment keeps sqlite's cache small
        self.index.db.commit()

    def check_continuity(self, key: str, prev: Manifest | None, m: Manifest) -> None:
        if prev is None:
            return  # the head is checked against the snapshots (check_head)
        if m.first <= prev.last:
            self.report.error(
                f"manifest {key} overlaps the previous segment: first {m.first_event_id} <= "
                f"previous last {prev.last_event_id}"
            )
            self.gen += 1
            return
        if m.after_event_id == prev.last_event_id:
            if any(prev.last <= at < m.first for at in self.chain_breaks):
                # The stream's retention lost events between these segments, though their chain
                # holds (the connector went on from its checkpoint): patch chains start again.
                self.gen += 1
                self.report.notes.append(
                    f"retention gap before {m.first_event_id}: patch chains restart there"
                )
            return
        self.gen += 1
        if self._gap_explains(prev.last, m.first):
            self.report.notes.append(
                f"chain break before {m.first_event_id} explained by a recorded retention gap"
            )
            return
        if m.after_event_id is None:
            self.report.error(
                f"manifest {key} does not continue the chain: previous segment ends at "
                f"{prev.last_event_id}, this one has no after_event_id"
            )
        else:
            self.report.error(
                f"segment(s) missing before {m.first_event_id}: manifest {key} continues from "
                f"{m.after_event_id} but the previous segment ends at {prev.last_event_id}"
            )

    def check_head(self, snapshots: list[SnapshotInfo]) -> None:
        """Retention deletes segments only below a committed snapshot: without one able to
        start a restore from the oldest kept segment, the oldest segments are lost."""
        after = self.head_after
        if after is None:
            return
        if any(snap.as_of >= after for snap in snapshots):
            self.report.notes.append(
                f"archive starts after {after} (older segments pruned by retention)"
            )
            return
        self.report.error(
            f"the oldest segments are missing: the oldest kept segment continues from {after} "
            "and no committed snapshot can start a restore there"
        )

    def check_tail(self) -> None:
        """The archive's checkpoint names the last segment written and its last id: the stream
        resumes after them, so segments missing there are lost for good (unless a committed
        snapshot covers them: retention deletes segments wholly at or before its base)."""
        cp = self.checkpoint
        if cp is None or not (cp.last_segment or cp.last_segment_last_id):
            return
        try:
            if cp.last_segment_last_id:
                want = EventId.parse(cp.last_segment_last_id)
            else:
                want = id_from_key(str(cp.last_segment))
        except ValueError:
            self.report.error(
                f"checkpoint.json names a malformed last segment {cp.last_segment!r} / "
                f"{cp.last_segment_last_id!r}"
            )
            return
        if any(as_of >= want for as_of in self.snapshot_ids):
            return  # a snapshot covers the newest events (retention may have pruned them)
        problems = []
        if cp.last_segment:
            try:
                found = self.storage.exists(manifest_key_for_segment(cp.last_segment))
            except ValueError:
                found = False
            if not found:
                problems.append(f"its last segment {cp.last_segment} has no manifest")
        end = self.report.last_event_id
        if end is None or EventId.parse(end) < want:
            problems.append(f"the archive ends at {end or 'nothing'}, before {want}")
        if problems:
            self.report.error(
                "the newest segments are missing: checkpoint.json says the archive reaches "
                f"{want}, but " + " and ".join(problems)
            )

    def check_segment(self, key: str, m: Manifest, prev: Manifest | None) -> None:
        self.recover_point = next((r for at, r in reversed(self.recoveries) if at < m.first), None)
        try:
            fh = self.storage.open(m.segment)
        except NotFound:
            self.report.error(f"segment {m.segment} is missing (named by manifest {key})")
            self.gen += 1
            return
        with closing(fh):
            tee = HashingReader(fh)
            decoded = self._decode(key, m, tee, prev)
            tee.drain()
        problems = []
        if tee.size != m.size:
            problems.append(f"size {tee.size} != manifest {m.size}")
        if tee.sha.hexdigest() != m.sha256:
            problems.append("sha256 differs from the manifest (bytes changed)")
        if decoded is not None:
            problems.append(decoded)
        if problems:
            self.report.error(f"segment {m.segment}: " + "; ".join(problems))
            self.gen += 1

    def _cross(self, low: EventId, high: EventId) -> None:
        """The groups of a segment go from ``low`` to ``high``: a retention gap recorded between
        them (found before the pending batch was written, so inside the segment that holds the
        groups before and after it) restarts the patch chains there, as between segments."""
        if any(low <= at < high for at in self.chain_breaks):
            self.gen += 1
            self.recover_point = next((r for at, r in reversed(self.recoveries) if at < high), None)
            self.report.notes.append(f"retention gap before {high}: patch chains restart there")

    def _decode(
        self, key: str, m: Manifest, tee: HashingReader, prev: Manifest | None
    ) -> str | None:
        """Stream the events beside the manifest's rows, feed the patch-chain check; a problem
        description or None."""
        with _ManifestRows(self.storage, key, self.report) as rows:
            return self._decode_with(m, tee, prev, rows)

    def _decode_with(
        self, m: Manifest, tee: HashingReader, prev: Manifest | None, rows: _ManifestRows
    ) -> str | None:
        count = 0
        hwm: EventId | None = None
        group = m.first  # the running group id, from the segment's first
        counts: dict[str, int] = {}
        floor = prev.last if prev is not None else None
        try:
            stream: BinaryIO = io.BufferedReader(tee, 1 << 20)
            for line in iter_segment_lines(stream, m.codec):
                ev = parse_archive_line(line)
                if count == 0 and ev.id > m.first:
                    return f"first event {ev.id_text} is above the manifest's first id"
                row_id = rows.next_id()
                if row_id is not None and row_id != ev.id_text:
                    return f"event #{count} is {ev.id_text}, manifest row says {row_id}"
                if floor is not None and ev.id <= floor:
                    self.report.warning(
                        f"segment {m.segment}: event {ev.id_text} at or below the previous "
                        f"segment's end {floor} (late recovery event?)"
                    )
                if ev.id > group:
                    self._cross(group, ev.id)
                    group = ev.id
                hwm = ev.id if hwm is None or ev.id > hwm else hwm
                counts[ev.event] = counts.get(ev.event, 0) + 1
                count += 1
                self.check_event(ev)
                if names_files(ev):
                    self.check_files(ev, m.files)
        except Exception as exc:  # noqa: BLE001
            if _not_damage(exc):
                raise
            # zstd, gzip and JSON all have their own error types; any of them means damage.
            return f"cannot be decoded after {count} events: {type(exc).__name__}: {exc}"
        if count != m.event_count:
            return f"holds {count} events, manifest says {m.event_count}"
        if hwm is not None and str(max(hwm, m.first)) != m.last_event_id:
            return f"last group id is {max(hwm, m.first)}, manifest says {m.last_event_id}"
        if m.counts and counts != m.counts:
            return f"event counts {counts} differ from manifest {m.counts}"
        return None

    # -- patch chains ----------------------------------------------------------------------

    def check_event(self, ev: StreamEvent) -> None:
        stix = ev.stix
        key = _object_key(stix)
        origin = ev.envelope.get("origin")
        if ev.event != "delete":
            # Objects a container holds may reach a filtered stream by the container path only.
            self.index.add_members(_members(stix))
        referer = origin.get("referer") if isinstance(origin, dict) else None
        if referer == "init-dependencies":
            # A dependency is the object as loaded when it was sent, often past the update that
            # follows it in its group: no link of the chain, except in a recovery (below).
            point = self.recover_point
            if ev.event != "delete" and point is not None and ev.id <= point:
                self._recovery_dependency(key, ev.id_text, stix)
            return
        if ev.event == "delete":
            self.index.forget(key)
            return
        context = ev.envelope.get("context")
        reverse = context.get("reverse_patch") if isinstance(context, dict) else None
        checked = not any(low < ev.id <= high for low, high in self.unchecked)
        if checked and ev.event in ("update", "merge") and isinstance(reverse, list) and reverse:
            self._check_reverse(ev, key, stix, reverse)
        if ev.event == "merge" and isinstance(context, dict):
            for source in context.get("sources") or []:
                if isinstance(source, dict):
                    self.index.forget(_object_key(source))
        # A recovery or reconciliation copy is the object as it was when sent (see below).
        copy = referer in ("init-create", REFERER)
        self.index.put(key, ev.id_text, self.gen, orjson.dumps(stix), copy)

    def _recovery_dependency(self, key: str, event_id: str, stix: dict[str, Any]) -> None:
        """A recovery sends each object once: one that went as another's dependency is not sent
        again at its own place, so the updates it holds (made before the recover point) have no
        event, and the next live update follows it. It becomes the chain's link, as a recovery
        copy, when it is later than the version the chain holds."""
        row = self.index.get(key)
        if row is None or row[1] != self.gen:
            return  # nothing to follow (first sight, or the chain broke since)
        if version_of(stix) > version_of(orjson.loads(row[2])):
            self.index.put(key, event_id, self.gen, orjson.dumps(stix), True)

    def _check_reverse(
        self, ev: StreamEvent, key: str, stix: dict[str, Any], reverse: list[Any]
    ) -> None:
        row = self.index.get(key)
        if row is None:
            return  # first sight of the object (filtered stream, pruned history): nothing to do
        prev_id, gen, data, copy = row
        if gen != self.gen or self.index.quarantined_between(EventId.parse(prev_id), ev.id):
            return  # something may legitimately sit between the two versions
        previous = orjson.loads(data)
        if copy and version_of(stix) <= version_of(previous):
            # A recovery copy (id <its updated_at ms>-0) or a reconciliation's is the object as
            # it was when read, with every update made until then: the live part repeats the
            # updates after its position (the recover point, the reconciliation's heartbeat)
            # that were already made, so this one may be in the copy.
            return
        self.report.updates_checked += 1
        try:
            rebuilt = jsonpatch.apply_patch(stix, reverse, in_place=False)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            self.report.error(
                f"{ev.event} {ev.id_text} does not follow {prev_id}: its reverse_patch does not "
                f"apply ({exc}); an event was missed upstream"
            )
            return
        if _comparable(rebuilt) == _comparable(previous):
            return
        message = (
            f"{ev.event} {ev.id_text} does not follow {prev_id} (object {key}): its "
            f"reverse_patch leads elsewhere; an event was missed upstream"
        )
        versions = [v for v in (stix, rebuilt, previous) if isinstance(v, dict)]
        if not any("object_refs" in v for v in versions) and self.index.any_member(
            _stix_ids(*versions)
        ):
            # A container holds it: on a filtered stream, the updates made while no container
            # in the filter held it are never sent (container path), so this may be no loss.
            self.report.warning(
                f"{message}, unless the stream is filtered (a container holds this object, "
                "so updates made while it sat in no container of the filter are not sent)"
            )
            return
        self.report.error(message)

    # -- orphans ---------------------------------------------------------------------------

    def file_notes(self) -> None:
        r = self.report
        if r.files_gone:
            r.warning(
                f"{r.files_gone} attached file(s) were gone from the platform (or not readable "
                "by the connector) when their events were archived: see files/*.missing"
            )
        if r.files_not_archived:
            r.notes.append(
                f"{r.files_not_archived} attached file reference(s) in segments written without "
                "file backup (ARCHIVE_FILES off, or an older version)"
            )

    def check_files(self, ev: StreamEvent, archived: bool) -> None:
        """Each attached file the event names is archived, or recorded as gone when it was."""
        for entry in file_entries(ev.stix):
            if not archived:
                self.report.files_not_archived += 1
                continue
            key = file_key(entry)
            if not self.index.first_sight_of_file(key):
                continue
            if self.storage.exists(key):
                self.report.files += 1
            elif self.storage.exists(missing_key(entry)):
                self.report.files_gone += 1
            else:
                self.report.error(
                    f"attached file {entry['name']!r} of {ev.stix_id} (event {ev.id_text}) is "
                    f"not in the archive ({key})"
                )

    def check_orphans(self) -> None:
        for key in self.storage.list(EVENTS_PREFIX):
            found = self.index.db.execute("SELECT 1 FROM segs WHERE key = ?", (key,)).fetchone()
            if found is not None:
                continue
            try:
                mkey = manifest_key_for_segment(key)
            except ValueError:
                self.report.warning(f"unexpected object under events/: {key}")
                continue
            if self.storage.exists(mkey):
                continue  # its manifest is damaged or names another key: reported already
            self.report.orphans += 1
            self.report.warning(f"orphan segment {key}: no manifest (a crash before the commit)")

    # -- snapshots -------------------------------------------------------------------------

    def snapshot_infos(self) -> list[SnapshotInfo]:
        """Committed snapshots, oldest first; damaged manifests and leftovers reported."""
        out: list[SnapshotInfo] = []
        current: str | None = None
        has_manifest = False
        for key in [*self.storage.list(SNAPSHOTS_PREFIX), None]:
            prefix = None if key is None else key[: key.rfind("/") + 1]
            if prefix != current:
                if current is not None and not has_manifest:
                    self.report.warning(f"unfinished snapshot {current} (no manifest) ignored")
                current, has_manifest = prefix, False
            if key is None or not key.endswith("/manifest.json"):
                continue
            has_manifest = True
            try:
                info = SnapshotInfo.from_json(self.storage.get(key))
            except NotFound:
                continue
            except MalformedEvent as exc:
                self.report.error(f"snapshot manifest {key} is damaged: {exc.reason}")
                continue
            if key != snapshot_manifest_key(info.as_of.key):
                self.report.error(f"snapshot manifest {key} describes as-of {info.as_of}")
                continue
            out.append(info)
        out.sort(key=lambda s: s.as_of)
        return out

    def check_snapshots(self, work_dir: Path) -> None:
        snapshots = self.snapshot_infos()
        self.report.snapshots = len(snapshots)
        self.check_head(snapshots)
        good = [snap for snap in snapshots if self.check_snapshot_parts(snap)]
        for snap in good:
            if snap.key in self._images:
                self.check_state_image(snap, work_dir)
        # Only a usable snapshot stands in for pruned (or lost) newest segments (check_tail).
        self.snapshot_ids = [snap.as_of for snap in good]
        if not good:
            return
        path = work_dir / f"verify-state-{uuid.uuid4().hex}.sqlite"
        claim = claim_scratch(path)  # a killed verify's file is removed by the next one
        state: StateStore | None = None
        try:
            state = StateStore(path, scratch=True)  # deleted below
            self._recompute(state, good)
        except Exception as exc:  # noqa: BLE001 - damage already reported stops the replay
            if _not_damage(exc):
                raise
            self.report.error(
                f"snapshot recomputation stopped: {type(exc).__name__}: {str(exc)[:200]}"
            )
        finally:
            if state is not None:
                with contextlib.suppress(Exception):
                    state.close()  # a scratch file deleted next: its last write may fail
            drop_scratch(path, claim)

    def _recompute(self, state: StateStore, good: list[SnapshotInfo]) -> None:
        """Fold the archive once, comparing the state with each snapshot as it is reached."""
        reader = ArchiveReader(self.storage)
        start_after: str | None = None
        if not self.origin:
            # No history before the oldest good snapshot: it is the starting point, not checked.
            first, good = good[0], good[1:]
            state.load_snapshot(self.storage, first.key)
            start_after = first.last_segment_manifest
        for snap in good:
            _, _, last_key = fold_segments(state, reader, start_after=start_after, until=snap.as_of)
            start_after = last_key or start_after
            self.report.snapshots_recomputed += 1
            problems = []
            if state.as_of != snap.as_of:
                problems.append(f"the segments reach {state.as_of}, not its as-of id")
            counts = state.counts()
            if counts["objects"] != snap.object_count:
                problems.append(
                    f"{counts['objects']} live objects recomputed, manifest says "
                    f"{snap.object_count}"
                )
            if counts["tombstones"] != snap.tombstone_count:
                problems.append(
                    f"{counts['tombstones']} tombstones recomputed, manifest says "
                    f"{snap.tombstone_count}"
                )
            if state_sha256(state) != snap.state_sha256:
                problems.append("state_sha256 differs from the previous snapshot + segments")
            if problems:
                self.report.error(f"snapshot {snap.as_of}: " + "; ".join(problems))
                # Carry on from what the snapshot says, so one bad snapshot is one error.
                state.load_snapshot(self.storage, snap.key)
                start_after = snap.last_segment_manifest

    def check_snapshot_parts(self, snap: SnapshotInfo) -> bool:
        """Whether the snapshot's parts are whole (its state image is reported, not counted:
        without it a restore loads the parts)."""
        name = f"snapshot {snap.as_of}"
        ok = True
        totals = {"objects": 0, "tombstones": 0}
        for part in snap.parts:
            if not part.key.startswith(f"{SNAPSHOTS_PREFIX}{snap.key}/"):
                self.report.error(f"{name}: part {part.key} lies outside the snapshot")
                ok = ok and part.kind == STATE_KIND
                continue
            image = part.kind == STATE_KIND
            if image and part == snap.state_image:
                self._images.add(snap.key)  # opened below, its sha256 checked as it is read
                continue
            problem = self._check_part(
                part.key, part.size, part.sha256, None if image else part.count, snap.codec
            )
            if problem:
                self.report.error(
                    f"{name}: {'state image' if image else 'part'} {part.key} {problem}"
                )
                ok = ok and image
            if not image:
                totals[part.kind] = totals.get(part.kind, 0) + part.count
        for kind, declared in (
            ("objects", snap.object_count),
            ("tombstones", snap.tombstone_count),
        ):
            if totals[kind] != declared:
                self.report.error(
                    f"{name}: parts hold {totals[kind]} {kind}, manifest says {declared}"
                )
                ok = False
        return ok

    def check_state_image(self, snap: SnapshotInfo, work_dir: Path) -> None:
        """The state image, opened as a restore opens it (its sha256 checked on the way), gives
        the manifest's state."""
        image = snap.state_image
        if image is None:
            return  # none, or another version's (its bytes were checked)
        path = work_dir / f"verify-image-{uuid.uuid4().hex}.sqlite"
        claim = claim_scratch(path)
        try:
            state = open_state_image(path, self.storage, snap, image)
            try:
                same = state_sha256(state) == snap.state_sha256
            finally:
                with contextlib.suppress(Exception):
                    state.close()
            if not same:
                self.report.error(
                    f"snapshot {snap.as_of}: state image {image.key} gives another state "
                    "(state_sha256 differs from the manifest)"
                )
        except PermanentError as exc:
            self.report.error(f"snapshot {snap.as_of}: {exc}")
        finally:
            drop_scratch(path, claim)

    def _check_part(
        self, key: str, size: int, sha: str, count: int | None, codec: str
    ) -> str | None:
        """What is wrong with a stored part (None: nothing). ``count``: the JSON lines it must
        hold; None for a part that is no JSON Lines (a state image), checked by its bytes."""
        try:
            fh = self.storage.open(key)
        except NotFound:
            return "is missing"
        lines = 0
        decode_error = None
        with closing(fh):
            tee = HashingReader(fh)
            if count is not None:
                try:
                    stream: BinaryIO = io.BufferedReader(tee, 1 << 20)
                    for line in iter_segment_lines(stream, codec):
                        orjson.loads(line)
                        lines += 1
                except Exception as exc:  # noqa: BLE001 - any decoder error means damage
                    decode_error = f"cannot be decoded: {type(exc).__name__}"
            tee.drain()
        if tee.sha.hexdigest() != sha:
            return "sha256 differs from the manifest (bytes changed)"
        if tee.size != size:
            return f"size {tee.size} != manifest {size}"
        if decode_error:
            return decode_error
        if count is not None and lines != count:
            return f"holds {lines} lines, manifest says {count}"
        return None


class _ManifestRows:
    """A manifest's per-event rows, read as a stream beside its segment's events (a huge
    group's rows are tens of MB). Damage among them is reported once; the rows then end."""

    def __init__(self, storage: Storage, key: str, report: VerifyReport) -> None:
        self._key = key
        self._report = report
        self._fh: BinaryIO | None = None
        self._rows: Iterator[list[Any]] | None = None
        try:
            self._fh = storage.open(key)
        except NotFound:
            return  # deleted by retention since it was read: the segment is checked without it
        self._rows = iter_manifest_rows(self._fh)

    def __enter__(self) -> _ManifestRows:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()

    def next_id(self) -> str | None:
        """The next row's event id; None once the rows ended."""
        if self._rows is None:
            return None
        try:
            row = next(self._rows)
        except StopIteration:
            row = None
        except MalformedEvent as exc:
            self._report.error(f"manifest {self._key} is damaged: {exc.reason}")
            row = None
        if row is None:
            self._rows = None
            return None
        return str(row[0]) if row else None


def _not_damage(exc: Exception) -> bool:
    """A failure of this machine, not of the segment being read: the work dir's database (a
    full disk), a transient storage error, or a system call failing (a damaged gzip file is an
    OSError without an errno)."""
    if isinstance(exc, sqlite3.Error | RetryableError):
        return True
    return isinstance(exc, OSError) and exc.errno is not None


def verify_archive(
    storage: Storage, *, work_dir: Path, checkpoints: CheckpointStore | None = None
) -> VerifyReport:
    """Check the whole archive; ``report.ok`` is False when anything is damaged. ``checkpoints``:
    where the connector keeps its checkpoint when not in the archive (``checkpoint.uri``).

    Retention may prune the archive's oldest segments and snapshots while it is read (verify
    takes no lock: it writes nothing, and may run with read-only credentials). A pass that found
    damage after the first segment it read was pruned is not believed: the archive is verified
    again, up to ``_PASSES`` times, and a note says so."""
    work_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_scratch(work_dir, _SCRATCH_GLOB)
    pruned = 0
    while True:
        report, head = _verify_once(storage, work_dir, checkpoints)
        if report.ok or head is None or storage.exists(head) or pruned + 1 >= _PASSES:
            break
        pruned += 1
        log.warning(
            "Retention pruned the archive while it was verified: verifying it again.",
            extra={"pruned": head, "errors": report.error_count},
        )
    if pruned:
        report.notes.append(
            f"retention pruned the archive while it was verified: verified {pruned + 1} times"
        )
    log.info(
        "Archive verified.",
        extra={
            "segments": report.segments,
            "events": report.events,
            "errors": report.error_count,
            "warnings": report.warning_count,
        },
    )
    return report


def _verify_once(
    storage: Storage, work_dir: Path, checkpoints: CheckpointStore | None
) -> tuple[VerifyReport, str | None]:
    """One pass over the archive, and the first manifest it read."""
    report = VerifyReport(archive=storage.describe())
    index = _Index(work_dir / f"verify-{uuid.uuid4().hex}.sqlite")
    try:
        v = _Verifier(storage, report, index)
        v.load_context(checkpoints or CheckpointStore(storage))
        v.check_segments()
        v.file_notes()
        v.check_orphans()
        v.check_snapshots(work_dir)
        v.check_tail()
    finally:
        index.close()
    if report.segments == 0 and report.snapshots == 0:
        # "OK" for an archive that is not there would hide a wrong path or bucket prefix.
        if storage.exists(CHECKPOINT_KEY):
            report.warning("the archive holds a checkpoint but no segment yet")
        else:
            report.error("no archive here: no segment, snapshot or checkpoint")
    return report, v.head_key
