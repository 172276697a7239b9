"""``opencti-sync restore`` and ``verify --against-opencti``: wiring of restore.py to the CLI.

The archive's checkpoint names the platform it was taken from; restoring into that same platform
is refused unless ``--force`` (a restore replays old state over live data).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .archive import ArchiveReader
from .archive_position import archive_end
from .checkpoint import Checkpoint, configured_store
from .errors import ConfigError, ConnectorError
from .events import EventId, octi_ext
from .restore import (
    TextProgress,
    materialise_plan,
    parse_until,
    private_file,
    restore_to_target,
    to_bundle,
)
from .settings import Settings
from .snapshot import ScratchDb, list_snapshots, pruned_before, remove_stale_scratch
from .source import iso_to_id
from .state import StateStore, remove_state_files
from .storage import Storage, open_storage

__all__ = ["run_restore_cli", "verify_against_opencti", "compare_with_target"]

MAX_FILE_MB = 35.0
"""``--max-file-mb`` when not given (with ``--opencti``; a bundle holds every file)."""

log = logging.getLogger(__name__)


def _archive(settings: Settings) -> Storage:
    if not settings.archive.uri:
        raise ConfigError("archive.uri", "required (--archive or ARCHIVE_URI)")
    return open_storage(settings.archive.uri, **settings.s3_options())


def _target(
    settings: Settings, url: str, token: str, *, source_url: str | None, force: bool
) -> Any:
    from .target.opencti import OpenCTITarget

    t = settings.target
    scope = f"{settings.connector.id}:" if settings.connector.id else ""
    return OpenCTITarget(
        url=url,
        token=token,
        ssl_verify=t.ssl_verify,
        ca_bundle=t.ca_bundle or None,
        # Never `run`'s own id (CONNECTOR_ID): the restore's pings would rewrite the state of
        # the connector `run` syncs into that platform with (its replay mark).
        connector_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"opencti-sync-restore:{scope}{url}")),
        connector_name=f"{settings.connector.name} (restore)",
        synchronized=t.synchronized,
        source_url=source_url,
        source_token=settings.opencti.token or None,
        allow_same_platform=force,
        replay_guard=False,
    )


def _check_flags(args: argparse.Namespace, settings: Settings) -> None:
    """Refuse combinations that would silently ignore a flag, and say what is missing now,
    not after the whole state is built."""
    if not args.opencti and not args.to_bundle:
        raise ConfigError("--opencti", "give a target platform (--opencti URL) or --to-bundle FILE")
    if args.opencti and args.to_bundle:
        raise ConfigError("--to-bundle", "give either --opencti URL or --to-bundle FILE, not both")
    if args.max_file_mb is not None and not 0 < args.max_file_mb < math.inf:
        # inf passed and then failed as a bare OverflowError once the whole state was built.
        raise ConfigError("--max-file-mb", "must be a positive, finite number of MB")
    if args.to_bundle:
        given = [
            flag
            for flag, value in (
                ("--max-file-mb", args.max_file_mb is not None),  # a bundle holds every file
                ("--dry-run", args.dry_run),
                ("--apply-deletes / --no-apply-deletes", args.apply_deletes is not None),
                ("--force", args.force),
                ("--token", args.token),
            )
            if value
        ]
        if given:
            raise ConfigError(given[0], "applies to --opencti only, not to --to-bundle")
        folder = Path(args.to_bundle).parent
        if not folder.is_dir():
            raise ConfigError("--to-bundle", f"no such directory: {folder}")
        if Path(args.to_bundle).is_dir():
            raise ConfigError("--to-bundle", f"{args.to_bundle} is a directory: name a file")
    elif not (args.token or settings.target.opencti_token):
        raise ConfigError("--token", "required with --opencti (or TARGET_OPENCTI_TOKEN)")


def run_restore_cli(settings: Settings, args: argparse.Namespace) -> int:
    storage = _archive(settings)
    _check_flags(args, settings)
    until = parse_until(args.until) if args.until else None
    work = Path(args.work_dir)
    try:
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError("--work-dir", f"cannot use {work}: {exc.strerror or exc}") from None
    # Where ``run`` keeps it (``checkpoint.uri``), which may not be the archive.
    checkpoints = configured_store(settings, storage)
    cp = checkpoints.load()
    if cp is None:
        log.warning(
            "No checkpoint found (in the archive, or at checkpoint.uri / CHECKPOINT_URI): a "
            "point inside the first recovery and lost newest segments cannot be detected."
        )
    first_end = cp.first_recovery_end if cp else None
    recovered = iso_to_id(first_end) if first_end else None
    if until is not None and recovered is not None and until < recovered and not args.allow_partial:
        unknown = _versions_unknown(storage, until, recovered, work)
        if unknown:
            raise ConnectorError(
                f"--until {args.until} is inside the archive's first recovery (up to "
                f"{first_end}), which holds each object only as it was at its end: {unknown} "
                "objects are held only as they were later (changed before the recovery, or "
                "created after that point and sent with an object that existed then), so the "
                "state at that point is unknown. Accept that state with --allow-partial"
            )
    gap = _gap_around(cp, until) if cp is not None and until is not None else None
    if gap is not None and not args.allow_partial:
        lo, hi = gap
        raise ConnectorError(
            f"--until {args.until} is inside a retention gap: the platform's stream lost the "
            f"events after {lo}, and the repair (a new recovery, then the reconciliation of the "
            f"lost deletes) wrote them back only up to {hi}, each object as it was then: what "
            "was deleted or changed in that window is unknown at that point (an object deleted "
            "before it is still live). Restore a point outside it, or accept that state with "
            "--allow-partial"
        )
    lost = None if args.allow_partial else _lost_tail(storage, cp, until)
    if lost:
        raise ConnectorError(lost + _elsewhere(checkpoints.storage, storage))
    state, plan = materialise_plan(
        storage, until=until, work_dir=work, allow_partial=args.allow_partial
    )
    try:
        print(
            f"state as of {plan.as_of}: {plan.objects} objects, {plan.tombstones} tombstones "
            f"(snapshot {plan.snapshot or 'none'} + {plan.segments} segments, {plan.events} events)"
        )
        if plan.as_of is None:
            # Nothing to restore is never a success: a wrong path, or a point before the history.
            if until is not None and pruned_before(ArchiveReader(storage)) is not None:
                snaps = list_snapshots(storage)
                oldest = f"snapshot {snaps[0].as_of}" if snaps else "none: no snapshot is left"
                raise ConnectorError(
                    f"--until {args.until} is before the history retention kept in "
                    f"{storage.describe()}: it was pruned (the oldest restorable point is the "
                    f"{oldest}; `opencti-sync status` shows restorable_from)"
                )
            where = f"at or before {args.until}" if until is not None else ""
            raise ConnectorError(
                f"the archive at {storage.describe()} holds no event {where}".strip()
                + " (check --archive / ARCHIVE_URI and --until; `opencti-sync status` shows "
                "what it holds)"
            )
        want = cp.recorded_end if cp else None
        if (
            want is not None
            and not args.allow_partial
            and (until is None or until >= want)
            and plan.as_of < want
        ):
            # The listings looked whole, but what the plan could use ends earlier (a snapshot
            # over the lost segments that turned out damaged).
            raise ConnectorError(
                _lost_tail_message(storage, plan.as_of, want, cp)
                + _elsewhere(checkpoints.storage, storage)
            )
        if plan.incomplete and not args.allow_partial:
            raise ConnectorError(
                "the archive's oldest segments were pruned and no usable snapshot covers them: "
                "objects unchanged since would be missing. Repair or restore the snapshot, or "
                "accept a partial state with --allow-partial"
            )
        if args.to_bundle:
            count = _write_bundle(state, Path(args.to_bundle), files=storage)
            print(f"wrote {count} objects to {args.to_bundle}")
            return 0
        token = args.token or settings.target.opencti_token  # checked by _check_flags
        target = _target(
            settings,
            args.opencti,
            token,
            source_url=cp.source_url if cp else None,
            force=args.force,
        )
        apply_deletes = True if args.apply_deletes is None else bool(args.apply_deletes)
        progress = (
            None if args.dry_run else _MeteredProgress(TextProgress("restore", stream=sys.stderr))
        )
        stop_metrics = _serve_metrics(settings) if progress is not None else None
        try:
            # Before the progress file is read: it belongs to this platform only (its id).
            target.check()
            report = restore_to_target(
                state,
                target,
                apply_deletes=apply_deletes,
                dry_run=args.dry_run,
                progress=progress,
                resume_file=work / "restore-progress.json",
                target_name=args.opencti.rstrip("/"),
                target_id=target.platform_id,
                files=storage,
                max_file_bytes=int(
                    (MAX_FILE_MB if args.max_file_mb is None else args.max_file_mb) * 1024 * 1024
                ),
            )
        finally:
            target.close()
            if stop_metrics is not None:
                stop_metrics()
        print(orjson.dumps(_summary(report), option=orjson.OPT_INDENT_2).decode())
        return 0
    finally:
        _drop_state(state)


def _write_bundle(state: StateStore, path: Path, *, files: Storage) -> int:
    """The bundle is written beside its name and renamed when whole: a failed write (a full
    disk) leaves no truncated bundle that looks like a restore."""
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "wb", opener=private_file) as out:
            count = to_bundle(state, out, files=files)
        part.replace(path)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise ConnectorError(f"cannot write the bundle {path}: {exc.strerror or exc}") from None
    except BaseException:
        part.unlink(missing_ok=True)  # interrupted (Ctrl-C) or failed: no partial bundle left
        raise
    return count


def _lost_tail(storage: Storage, cp: Checkpoint | None, until: EventId | None) -> str | None:
    """The checkpoint names the newest segment's last id; an archive that ends before it lost
    its newest segments (or manifests), and a restore at a point past its end would silently
    miss them: the message that says so, or None. Checked on the listings before planning."""
    want = cp.recorded_end if cp else None
    if want is None:
        return None
    end = archive_end(storage, until)
    if end is not None and (end >= want or (until is not None and until <= end)):
        return None
    return _lost_tail_message(storage, end, want, cp)


def _elsewhere(kept: Storage, archive: Storage) -> str:
    """A checkpoint kept apart may belong to another copy of the archive than the one given."""
    if kept.describe() == archive.describe():
        return ""
    return (
        f" (checkpoint read from {kept.describe()}, checkpoint.uri / CHECKPOINT_URI: restoring"
        " another copy of the archive, leave that setting out)"
    )


def _lost_tail_message(
    storage: Storage, end: EventId | None, want: EventId, cp: Checkpoint | None
) -> str:
    return (
        f"the archive at {storage.describe()} ends at {end or 'nothing'}, but its checkpoint "
        f"says it holds events up to {want} (segment {cp.last_segment if cp else None}): the "
        "newest segments or their manifests are missing (`opencti-sync verify` shows them). "
        "Restore a point at or before the archive's end with --until, or accept this state "
        "with --allow-partial"
    )


def _gap_around(cp: Checkpoint, until: EventId) -> tuple[EventId, EventId] | None:
    """The retention gap whose window holds ``until``: ``(checkpoint, repaired)``, None when
    no gap does. Nothing after the checkpoint was archived until the repair: its recovery sends
    each object as it is at its end (under its updated_at) and the reconciliation writes the
    lost window's deletes and merges at its own time, so the state is known again only from
    the later of the two (the reconciliation of this gap, when done)."""
    rec = cp.reconcile or {}
    for gap in cp.retention_gaps:
        start = str(gap.get("checkpoint_event_id") or "")
        if not EventId.is_valid(start):
            continue
        lo = EventId.parse(start)
        archived = str(gap.get("archive_last_event_id") or "")
        if EventId.is_valid(archived) and not gap.get("in_connection"):
            # An earlier run had archived past the checkpoint: the loss starts after that. (Not
            # for a gap found during a connection: what was received after its position, the
            # archive's end included, may miss events anywhere.)
            lo = max(lo, EventId.parse(archived))
        ends: list[EventId] = []
        first = str(gap.get("first_retained_event_id") or "")
        if EventId.is_valid(first):
            ends.append(EventId.parse(first))
        recovered = iso_to_id(str(gap.get("repair_recover_until") or ""))
        if recovered is not None:
            ends.append(recovered)
        done = str(rec.get("done_at_event_id") or "")
        if rec.get("checkpoint_event_id") == start and EventId.is_valid(done):
            ends.append(EventId.parse(done))
        hi = max(ends, default=lo)
        if lo < until < hi:
            return lo, hi
    return None


_UNKNOWN_GLOB = "recovery-unknown-*.sqlite*"  # a killed count's scratch files


def _versions_unknown(storage: Storage, until: EventId, recovered: EventId, work_dir: Path) -> int:
    """Objects the first recovery holds only in a version from after ``until``: their state
    then is unknown. Recovery sends each object once, as it is at the recovery's end, under its
    ``updated_at`` or, as a dependency, under the id of the object that needed it (so possibly
    at or below ``until``). Those existing at ``until`` but updated after it have an unknown
    version; those created after it but sent at or below it would appear too early. Objects
    created after ``until`` and sent after it are rightly absent; the others are right.

    Their ids are counted once each in a scratch database in ``work_dir``: a recovery sends the
    whole platform."""
    work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    remove_stale_scratch(work_dir, _UNKNOWN_GLOB)
    path = work_dir / f"recovery-unknown-{uuid.uuid4().hex}.sqlite"
    with ScratchDb(path, "CREATE TABLE unknown (sid TEXT PRIMARY KEY);") as scratch:
        db = scratch.db
        for ev in ArchiveReader(storage).events(until=recovered):
            if not ev.synthetic:
                continue
            octi = octi_ext(ev.stix)
            created = iso_to_id(str(octi.get("created_at") or ""))
            updated = iso_to_id(str(octi.get("updated_at") or ""))
            if created is None:
                continue
            later = updated is not None and created.ms <= until.ms < updated.ms
            if later or (created.ms > until.ms and ev.id <= until):
                db.execute("INSERT OR IGNORE INTO unknown VALUES (?)", (ev.stix_id,))
        return int(db.execute("SELECT count(*) FROM unknown").fetchone()[0])


def _drop_state(state: StateStore) -> None:
    """Close the materialised state and delete its file: every run rebuilds it from the archive
    (a restore resumes from its progress file), and it is as large as the state."""
    state.close()
    remove_state_files(state.path)


def _serve_metrics(settings: Settings) -> Callable[[], None] | None:
    """``/metrics`` while a restore pushes (hours, on a large platform), when enabled. A port
    already taken (a ``run`` beside it) costs the metrics, never the restore."""
    if not settings.metrics.enabled:
        return None
    from .metrics import serve

    try:
        return serve(settings.metrics.host, settings.metrics.port)
    except OSError as exc:
        log.warning(
            "Restore metrics not served on %s:%s (%s); the restore goes on.",
            settings.metrics.host,
            settings.metrics.port,
            exc.strerror or exc,
        )
        return None


class _MeteredProgress:
    """The terminal bar / log lines, plus the restore_progress_ratio gauge."""

    def __init__(self, inner: TextProgress) -> None:
        self.inner = inner

    def update(self, done: int, total: int) -> None:
        from . import metrics

        metrics.RESTORE_PROGRESS.set(done / total if total else 1.0)
        self.inner.update(done, total)

    def close(self) -> None:
        self.inner.close()


def _summary(report: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: v for k, v in asdict(report).items() if v not in (None, {}, [])}


def _version(stix: dict[str, Any]) -> str:
    return str(octi_ext(stix).get("updated_at") or stix.get("modified") or "")


# Meta objects are listed by other platform queries (markingDefinitions, labels, ...). Marking
# definitions are compared one by one through the platform's ``stix(id)`` query: there are few,
# and a missing marking hides every object it protects from the users it should reach. Labels,
# external references, kill-chain phases and vocabularies are not compared.
MARKING = "marking-definition"
META_TYPES = frozenset({MARKING, "label", "external-reference", "kill-chain-phase", "vocabulary"})
_UNCOMPARED = META_TYPES - {MARKING}
_STIX_QUERY = "query StixQuery($id: String!) { stix(id: $id) }"


_PAGE = 500  # platform objects per listing request
_SAMPLE = 5  # ids named per kind of difference


@dataclass
class Difference:
    """How many objects differ one way, and the first ``_SAMPLE`` of their ids (sorted)."""

    count: int = 0
    sample: list[str] = field(default_factory=list)


class TargetListing:
    """A platform's ``{standard id: updated_at}`` and its differences with the archive's state,
    in a scratch database in the work dir: both are as large as the platform."""

    def __init__(self, work_dir: Path) -> None:
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_scratch(work_dir, _AGAINST_GLOB)
        self._scratch = ScratchDb(
            work_dir / f"against-{uuid.uuid4().hex}.sqlite",
            "CREATE TABLE target (sid TEXT PRIMARY KEY, updated TEXT, seen INTEGER DEFAULT 0);"
            "CREATE TABLE tombs (sid TEXT PRIMARY KEY);"
            "CREATE TABLE diff (kind TEXT, sid TEXT, PRIMARY KEY (kind, sid));",
        )
        self.db = self._scratch.db

    def close(self) -> None:
        self._scratch.close()

    def add(self, rows: Iterable[tuple[str, str]]) -> None:
        """``(standard id, updated_at)`` of platform objects (a later one replaces)."""
        self.db.executemany("INSERT OR REPLACE INTO target (sid, updated) VALUES (?, ?)", rows)

    def _see(self, stix_id: str) -> str | None:
        row = self.db.execute("SELECT updated FROM target WHERE sid = ?", (stix_id,)).fetchone()
        if row is None:
            return None
        self.db.execute("UPDATE target SET seen = 1 WHERE sid = ?", (stix_id,))
        return str(row[0])

    def _difference(self, kind: str) -> Difference:
        count = self.db.execute("SELECT count(*) FROM diff WHERE kind = ?", (kind,)).fetchone()
        sample = self.db.execute(
            "SELECT sid FROM diff WHERE kind = ? ORDER BY sid LIMIT ?", (kind, _SAMPLE)
        )
        return Difference(int(count[0]), [str(r[0]) for r in sample])


_AGAINST_GLOB = "against-*.sqlite*"  # a killed comparison's scratch files


def compare_with_target(state: Any, listing: TargetListing) -> dict[str, Difference]:
    """Differences between the archive's state and a platform's objects in ``listing``: its
    core objects, relationships and sightings, plus the marking definitions it answered for
    (see ``_target_markings``)."""
    db = listing.db
    for _key, stix_id, _event, data in state.objects():
        have = listing._see(stix_id)
        if data.get("type") in _UNCOMPARED:
            continue
        if have is None:
            db.execute("INSERT OR IGNORE INTO diff VALUES ('missing', ?)", (stix_id,))
        elif have and _version(data) and have < _version(data):
            db.execute("INSERT OR IGNORE INTO diff VALUES ('stale', ?)", (stix_id,))
    db.executemany(
        "INSERT OR IGNORE INTO tombs VALUES (?)", ((t.stix_id,) for t in state.tombstones())
    )
    db.execute(
        "INSERT OR IGNORE INTO diff SELECT CASE WHEN sid IN (SELECT sid FROM tombs)"
        " THEN 'resurrected' ELSE 'extra' END, sid FROM target WHERE seen = 0"
    )
    return {
        kind: listing._difference(kind) for kind in ("missing", "stale", "resurrected", "extra")
    }


def _list_target(target: Any, listing: TargetListing) -> None:
    """The platform's core objects, relationships and sightings into ``listing``, a page at a
    time (pycti's ``getAll`` would hold the whole listing)."""
    api = target.api
    for lister in (
        api.stix_core_object,
        api.stix_core_relationship,
        api.stix_sighting_relationship,
    ):
        after: str | None = None
        while True:
            page = (
                lister.list(
                    customAttributes="id standard_id updated_at",
                    first=_PAGE,
                    after=after,
                    withPagination=True,
                )
                or {}
            )
            listing.add(
                (str(node.get("standard_id")), str(node.get("updated_at") or ""))
                for node in page.get("entities") or []
            )
            info = page.get("pagination") or {}
            cursor = info.get("endCursor")
            if not info.get("hasNextPage") or not cursor or cursor == after:
                break
            after = str(cursor)


def _marking_ids(state: Any) -> list[str]:
    """Marking definitions of the state, live (push phase 0) and tombstoned."""
    live = [rec.stix_id for rec in state.records(phase=0) if rec.stix_id.startswith(MARKING)]
    gone = [t.stix_id for t in state.tombstones() if t.stix_id.startswith(MARKING + "--")]
    return sorted(set(live + gone))


def _target_markings(target: Any, ids: list[str]) -> dict[str, str]:
    """``{standard id: updated_at}`` of the marking definitions among ``ids`` the platform holds."""
    out: dict[str, str] = {}
    for sid in ids:
        answer = target.api.query(_STIX_QUERY, {"id": sid})
        raw = ((answer or {}).get("data") or {}).get("stix")
        if isinstance(raw, str) and raw:
            obj = orjson.loads(raw)
            if isinstance(obj, dict) and obj.get("type") == MARKING:
                out[str(obj.get("id"))] = _version(obj)
    return out


def verify_against_opencti(
    storage: Storage,
    *,
    url: str,
    token: str,
    until: str | None,
    work_dir: Path,
    ssl_verify: bool = True,
    ca_bundle: str | None = None,
) -> bool:
    """Compare the archive's state at ``until`` with a platform's objects (ids and versions)."""
    from .target.opencti import OpenCTITarget

    state, plan = materialise_plan(
        storage, until=parse_until(until) if until else None, work_dir=work_dir
    )
    target = OpenCTITarget(
        url=url,
        token=token,
        ssl_verify=ssl_verify,
        ca_bundle=ca_bundle,
        connector_id=str(uuid.uuid4()),
        register=False,
        allow_same_platform=True,
        replay_guard=False,
    )
    listing: TargetListing | None = None
    try:
        target.check()
        listing = TargetListing(work_dir)
        _list_target(target, listing)
        listing.add(_target_markings(target, _marking_ids(state)).items())
        diff = compare_with_target(state, listing)
    finally:
        target.close()
        _drop_state(state)
        if listing is not None:
            listing.close()
    print(
        f"against {url} as of {plan.as_of} "
        "(core objects, relationships, sightings, marking definitions):"
    )
    for name, found in diff.items():
        sample = ", ".join(found.sample) + (" ..." if found.count > len(found.sample) else "")
        print(f"  {name:<12} {found.count:>7}  {sample}")
    ok = not any(found.count for found in diff.values())
    print("  platform matches the archive" if ok else "  DIFFERENCES found")
    return ok
