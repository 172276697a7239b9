"""Delete reconciliation after a retention gap.

When the platform trimmed its stream past our checkpoint, the repair (``recover`` from the
checkpoint) re-sends what *changed*, but deletions in the lost window leave no trace: the database
snapshot has no tombstones. Nor is the repair's copy of a change always archived: when the archive
had gone past the checkpoint (a target lagging behind it, a crash before the checkpoint), the
repair's groups at or below the archive's end are taken for ones it holds, and an object the
repair sent there as a dependency is not sent again at its own place. So once the repair has
caught up, this module

1. materialises the archive's state (snapshot + segments, on disk); with a target, also the
   state every sink had acknowledged when the gap was found, when the archive holds more (an
   earlier run stored it before it could checkpoint, and no stream re-sends it now);
2. lists every object the platform holds now, through one extra recover-mode connection
   (``from=0&recover=<now>``, with the connector's own dependency setting, read until an id past
   the recover point shows the live part has begun; ids kept in SQLite, and the whole object
   when the archive lacks it or holds it otherwise). A listing that ends any other way
   (the connection closes, the stream refuses recovery, nothing is listed while the archive
   holds objects) is an error, never a short list: each object missing from it would become a
   delete;
3. asks the platform's API about every archived live object missing from the listing
   (``stix(id)``, 100 ids per query): only those it no longer holds under their own id are gone.
   A stream's listing omits objects that are outside its filters and no longer a dependency of
   anything in them, though they still exist, and the stream itself never deletes those;
4. yields synthetic events with ``origin.referer = "opencti-sync-reconcile"``: a ``create``
   carrying the listed object for every one the archive lacks or holds otherwise (an earlier
   version, or references the platform re-pointed silently when a change lost with the window
   renamed or merged what they name); for every object alive in the archive but gone from the
   platform, with its last known STIX, a ``merge`` into the entity that answers to its id now,
   when the archive holds that entity or the listing refreshes it (it was merged away in the
   lost window: what referred to it follows it there, as on the platform), else a ``delete``.
   An object the platform answers for under a new standard id, same internal id, is still
   there (outside the listing). In the order ``_units`` gives: deletes first.

What it found waits in SQLite work files (removed when it is done), and the events come in groups
of at most ``GROUP_EVENTS`` events and ``GROUP_BYTES`` of data, each group under its own id just
below the idle position the reconciliation runs at (``reconcile_group``): a gap after a long
outage costs disk, not memory. The pipeline writes each group like any other batch (so an
OpenCTI target applies them too), and moves the checkpoint after the last.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from httpx_sse import connect_sse

from .errors import CannotReconcile, SourceRetryable, StreamGoneError
from .events import RECONCILE_REFERER, EventId, StreamEvent, loads_json, octi_ext
from .source import SourceConfig, is_raw_stream, iso_now, iso_to_id, tls_verify
from .stix_lookup import entities, stix_queries
from .storage import Storage

if TYPE_CHECKING:  # the state (sqlite, the fold) is imported when a reconciliation runs
    from .state import StateStore

__all__ = [
    "GROUP_BYTES",
    "GROUP_EVENTS",
    "REFERER",
    "archived_counts",
    "count_event",
    "platform_ids",
    "platform_resolves",
    "reconcile_deletes",
    "reconcile_group",
]

log = logging.getLogger(__name__)

REFERER = RECONCILE_REFERER


def platform_ids(
    config: SourceConfig, db: sqlite3.Connection, states: Sequence[StateStore] = ()
) -> int:
    """Fill table ``ids(id)`` with the internal and STIX ids of every object on the platform;
    with ``states``, table ``refresh(key, stix_id, data)`` with each listed object one of them
    lacks or holds otherwise."""
    from .state import push_phase

    db.execute("CREATE TABLE IF NOT EXISTS ids (id TEXT PRIMARY KEY)")
    db.execute(
        "CREATE TABLE IF NOT EXISTS refresh"
        " (key TEXT PRIMARY KEY, stix_id TEXT NOT NULL, phase INTEGER NOT NULL, data BLOB)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS refresh_stix ON refresh (stix_id)")
    recover = iso_now()
    recover_id = iso_to_id(recover) or EventId(0, 0)  # iso_now() always parses
    base = config.url.rstrip("/")
    # The raw stream cannot recover: its listing is the global live stream's (a raw stream
    # needs the same BYPASS capability), which holds every object.
    stream = "live" if is_raw_stream(config.stream_id) else config.stream_id
    url = f"{base}/stream/{stream}"
    params = {
        "from": "0",
        "recover": recover,
        "listen-delete": "true" if config.listen_delete else "false",
        # As the archive was built: on a filtered stream, some objects arrive only as
        # dependencies, and a listing without them would take those for deleted.
        "no-dependencies": "true" if config.no_dependencies else "false",
        "with-inferences": "true" if config.with_inferences else "false",
    }
    headers = {"Authorization": f"Bearer {config.token}"}
    seen = 0
    timeout = httpx.Timeout(10.0, read=config.read_timeout)
    try:
        with (
            httpx.Client(timeout=timeout, verify=tls_verify(config.verify)) as client,
            connect_sse(client, "GET", url, params=params, headers=headers) as source,
        ):
            status = source.response.status_code
            if status != 200:
                reason = source.response.reason_phrase
                if status == 429 or status >= 500:
                    raise SourceRetryable(f"reconcile listing: HTTP {status} {reason}")
                raise StreamGoneError(status, reason)
            complete = False
            for sse in source.iter_sse():
                if sse.event == "no-recover":
                    raise CannotReconcile("the platform refuses recovery on this stream")
                if EventId.is_valid(sse.id) and EventId.parse(sse.id) > recover_id:
                    complete = True  # a live event or an idle heartbeat: recovery is over
                    break
                if sse.event not in ("create", "update", "merge"):
                    continue  # heartbeats too: the platform's timer fires during recovery
                try:
                    stix = loads_json(sse.data).get("data") or {}
                except (orjson.JSONDecodeError, AttributeError):
                    continue
                ids = [i for i in (octi_ext(stix).get("id"), stix.get("id")) if isinstance(i, str)]
                db.executemany("INSERT OR IGNORE INTO ids VALUES (?)", [(i,) for i in ids])
                if ids and any(_differs(state, ids, stix) for state in states):
                    db.execute(
                        "INSERT OR REPLACE INTO refresh VALUES (?, ?, ?, ?)",
                        (ids[0], str(stix.get("id")), push_phase(stix), orjson.dumps(stix)),
                    )
                seen += 1
    except httpx.HTTPError as exc:
        raise SourceRetryable(f"reconcile listing failed: {exc}") from exc
    if not complete:
        raise SourceRetryable("reconcile listing: the stream ended before its recovery did")
    db.commit()
    return seen


def _differs(state: StateStore, ids: list[str], stix: dict[str, Any]) -> bool:
    """Whether the archive lacks the listed object or holds it otherwise (never a later one)."""
    from .state import version_of

    held = next((o for o in map(state.get, ids) if o is not None), None)
    if held is None:
        return True
    if version_of(stix) < version_of(held):
        return False  # the archive is ahead (sent ahead as a dependency): it stays
    return _canonical(held) != _canonical(stix)


def _canonical(stix: dict[str, Any]) -> bytes:
    return orjson.dumps(stix, option=orjson.OPT_SORT_KEYS)


def platform_resolves(
    config: SourceConfig, stix_ids: list[str]
) -> dict[str, tuple[str, str | None] | None]:
    """The entity the platform holds under each of ``stix_ids`` now: its standard id (the id
    itself, or another one: renamed, or merged into that entity) and internal id; None when it
    does not know the id. Asked through ``stix(id)``, 100 per query."""
    out: dict[str, tuple[str, str | None] | None] = {}
    headers = {"Authorization": f"Bearer {config.token}", "Content-Type": "application/json"}
    timeout = httpx.Timeout(30.0)
    try:
        with httpx.Client(timeout=timeout, verify=tls_verify(config.verify)) as client:
            for chunk, query, variables in stix_queries(stix_ids, "SyncReconcile"):
                body = {"query": query, "variables": variables}
                response = client.post(
                    f"{config.url.rstrip('/')}/graphql", content=orjson.dumps(body), headers=headers
                )
                out.update(entities(chunk, _graphql_data(response)))
    except httpx.HTTPError as exc:
        raise SourceRetryable(f"reconcile lookup failed: {exc}") from exc
    return out


def _graphql_data(response: httpx.Response) -> dict[str, Any]:
    status = response.status_code
    if status == 429 or status >= 500:
        raise SourceRetryable(f"reconcile lookup: HTTP {status} {response.reason_phrase}")
    try:
        answer = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        raise SourceRetryable(f"reconcile lookup: HTTP {status}, no GraphQL answer")
    errors = answer.get("errors")
    if errors or status >= 300:
        first = errors[0] if isinstance(errors, list) and errors else {}
        message = first.get("message") if isinstance(first, dict) else None
        # The token may read the stream but not the knowledge: no delete can be confirmed.
        raise CannotReconcile(f"the platform's API refuses the lookup: {message or status}")
    data = answer.get("data")
    return data if isinstance(data, dict) else {}


# A reconciliation's events are written in groups of at most this many events and bytes of
# data, each held in memory while it is written, like the pipeline's own batches: what it
# computes waits in its work files, so a gap after a long outage costs disk, not memory.
GROUP_EVENTS = 5_000
GROUP_BYTES = 16 * 1024 * 1024
_RESOLVE_PAGE = 10_000  # archived objects missing from the listing, asked about per round


def count_event(counts: Counter[str], ev: StreamEvent) -> None:
    """Count a reconciliation's event by name, and a merge's sources under "merged"."""
    counts[ev.event] += 1
    if ev.event == "merge":
        sources = (ev.envelope.get("context") or {}).get("sources") or []
        counts["merged"] += len(sources)


def archived_counts(storage: Storage, after: EventId | None) -> Counter[str]:
    """The reconciliation events the archive holds past ``after``, counted as ``count_event``
    does: the groups an earlier run stored and was stopped before it could checkpoint."""
    from .archive import ArchiveReader
    from .archive.layout import manifest_key

    reader = ArchiveReader(storage)
    counts = Counter[str]()
    start = manifest_key(after) if after is not None else None
    for ref in reader.manifests(start_after=start):
        if ref.manifest.first != ref.manifest.last:
            continue  # a group is written alone, in segments of its own: not the recovery's
        for ev in reader.segment_events(ref.manifest):
            if (after is None or ev.group > after) and ev.reconciled:
                count_event(counts, ev)
    return counts


def reconcile_group(at: EventId, index: int) -> EventId:
    """The id of the ``index``-th group a reconciliation at the idle position ``at`` writes:
    ``<at's ms - 1>-<index>``, below ``at`` and, as long as the archive ends before
    ``<at's ms - 1>-0`` (the pipeline waits for such a position), above everything archived."""
    return EventId(at.ms - 1, index)


def reconcile_deletes(
    storage: Storage,
    config: SourceConfig,
    *,
    at: EventId,
    as_of: EventId | None = None,
    work_dir: Path | None = None,
    max_events: int | None = None,
    max_bytes: int | None = None,
) -> Iterator[list[StreamEvent]]:
    """Groups of synthetic events (ids from ``reconcile_group``): creates for what the archive
    missed, merges and deletes for archived objects the platform no longer holds under their own
    id, in the order ``_units`` gives (deletes first). Groups hold about ``max_events`` events (``GROUP_EVENTS``) and
    ``max_bytes`` of data (``GROUP_BYTES``) at most.

    ``as_of``: the last group every sink acknowledged (the pipeline passes it when a target
    syncs); what the archive holds past it (a crash, a target refusing) is compared as well, and
    written again, so that every sink gets it.

    A generator: the archive is materialised, the platform listed and compared when the first
    group is asked for (errors are raised then); the groups are then read from the work files,
    which are removed when the generator ends or is closed.
    """
    work = Path(tempfile.mkdtemp(prefix="reconcile-", dir=work_dir))
    try:
        db = sqlite3.connect(work / "platform-ids.sqlite")
        try:
            counts = _compare(storage, config, db, work, as_of)
            log.warning("Delete reconciliation compared.", extra={**counts, "event_id": str(at)})
            yield from _groups(db, at, max_events or GROUP_EVENTS, max_bytes or GROUP_BYTES)
        finally:
            db.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _compare(
    storage: Storage,
    config: SourceConfig,
    db: sqlite3.Connection,
    work: Path,
    as_of: EventId | None,
) -> Any:
    """Fill the work tables: ``refresh`` (listed, and missing from the archive or held
    otherwise), ``targets`` / ``merge_sources`` and ``deletes``. Returns the counts to log.

    The archive's whole state, and with ``as_of`` before its end also the state as of it: an
    object either lacks or holds otherwise is refreshed, one alive in either and not listed is
    gone (the events are then written again for the archive, which held them already)."""
    from .restore import materialise

    db.executescript(
        """
        CREATE TABLE gone (key TEXT PRIMARY KEY, stix_id TEXT NOT NULL, data BLOB NOT NULL);
        CREATE TABLE targets (n INTEGER PRIMARY KEY, stix_id TEXT UNIQUE, data BLOB NOT NULL);
        CREATE TABLE merge_sources (stix_id TEXT NOT NULL, data BLOB NOT NULL);
        CREATE INDEX merge_sources_target ON merge_sources (stix_id);
        CREATE TABLE deletes (data BLOB NOT NULL);
        """
    )
    states = [materialise(storage, until=None, work_dir=work / "archive")]
    try:
        end = states[0].as_of
        if as_of is not None and (end is None or as_of < end):
            states.append(materialise(storage, until=as_of, work_dir=work / "acked"))
        listed = platform_ids(config, db, states)
        archived = states[0].counts()["objects"]
        if listed == 0 and archived:
            # A platform that lost everything it held is far likelier a platform not ready
            # (an empty search index after a restart) than a real mass delete.
            raise SourceRetryable(
                f"the platform listed no objects while the archive holds {archived}"
            )
        for state in states:
            for key, stix_id, _event, data in state.objects():
                found = db.execute(
                    "SELECT 1 FROM ids WHERE id IN (?, ?) LIMIT 1", (key, stix_id)
                ).fetchone()
                if found is None:
                    db.execute(
                        "INSERT OR IGNORE INTO gone VALUES (?, ?, ?)",
                        (key, stix_id, orjson.dumps(data)),
                    )
        after = 0
        while True:
            page = db.execute(
                "SELECT rowid, key, stix_id, data FROM gone WHERE rowid > ? ORDER BY rowid LIMIT ?",
                (after, _RESOLVE_PAGE),
            ).fetchall()
            if not page:
                break
            after = page[-1][0]
            now = platform_resolves(config, [stix_id for _, _, stix_id, _ in page])
            for _, key, stix_id, data in page:
                _classify(db, states, key, stix_id, data, now.get(stix_id))
        db.commit()
    finally:
        for state in states:
            state.close()
    return {
        "platform_objects": listed,
        "unlisted": _count(db, "gone"),
        "refreshed": _count(db, "refresh"),
        "deleted": _count(db, "deletes"),
        "merged": _count(db, "merge_sources"),
    }


def _classify(
    db: sqlite3.Connection,
    states: Sequence[StateStore],
    key: str,
    stix_id: str,
    data: bytes,
    found: tuple[str, str | None] | None,
) -> None:
    """An archived object missing from the listing: kept, merged into the entity that answers
    to its id now, or deleted."""
    if found is None:
        db.execute("INSERT INTO deletes VALUES (?)", (data,))
        return
    holder, holder_iid = found
    if holder == stix_id or holder_iid == key:
        return  # still there (renamed or not), outside the stream's listing
    target: dict[str, Any] | None = None
    if holder:
        # As listed when the archive lacks it or holds it otherwise (refreshed first): a
        # target platform must not be set back by the merge's upsert.
        listed = db.execute("SELECT data FROM refresh WHERE stix_id = ?", (holder,)).fetchone()
        held = (state.get(holder) for state in states)
        target = orjson.loads(listed[0]) if listed else next((t for t in held if t), None)
    if target is None or _key_of(target) == key:
        db.execute("INSERT INTO deletes VALUES (?)", (data,))  # merged outside the listing
        return
    target_id = str(target.get("id"))
    db.execute(
        "INSERT OR IGNORE INTO targets (stix_id, data) VALUES (?, ?)",
        (target_id, orjson.dumps(target)),
    )
    db.execute("INSERT INTO merge_sources VALUES (?, ?)", (target_id, data))


def _count(db: sqlite3.Connection, table: str) -> int:
    return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608


def _groups(
    db: sqlite3.Connection, at: EventId, max_events: int, max_bytes: int
) -> Iterator[list[StreamEvent]]:
    """The events, cut into groups of about ``max_events`` events and ``max_bytes`` at most,
    between units only (see ``_units``)."""
    group: list[StreamEvent] = []
    size = index = 0
    for unit in _units(db):
        for name, data, context in unit:
            ev = _reconciled(reconcile_group(at, index), name, data, context)
            group.append(ev)
            size += ev.size
        if len(group) >= max_events or size >= max_bytes:
            yield group
            group, size, index = [], 0, index + 1
    if group:
        yield group


_Spec = tuple[str, dict[str, Any], dict[str, Any] | None]  # event name, data, context


def _units(db: sqlite3.Connection) -> Iterator[list[_Spec]]:
    """The events, in units a group never splits. First the deletes: what the platform lists
    exists now, so it came after any delete that freed one of its ids (a deleted object's old
    standard id taken again), and a delete must not cascade over it. Then the refreshed objects
    in push order (a target pushes runs of upserts in bundles, and an object must not come a
    bundle before what it references), each merge target's refresh with its merge right after
    it (a target applying them in separate batches would take the refreshed entity, which
    carries its sources' ids, for one of them); then the merges of targets not refreshed."""
    for (data,) in db.execute("SELECT data FROM deletes ORDER BY rowid"):
        yield [("delete", orjson.loads(data), None)]
    merged: set[str] = set()
    refreshed = db.execute(
        "SELECT r.data, t.stix_id FROM refresh r LEFT JOIN targets t ON t.stix_id = r.stix_id"
        " ORDER BY r.phase, r.key"
    )
    for data, target_id in refreshed:
        unit: list[_Spec] = [("create", orjson.loads(data), None)]
        if target_id is not None and target_id not in merged:
            merged.add(target_id)
            unit.append(_merge(db, target_id, unit[0][1]))
        yield unit
    for target_id, target in db.execute("SELECT stix_id, data FROM targets ORDER BY n"):
        if target_id not in merged:
            yield [_merge(db, target_id, orjson.loads(target))]


def _merge(db: sqlite3.Connection, target_id: str, target: dict[str, Any]) -> _Spec:
    sources = [
        orjson.loads(source)
        for (source,) in db.execute(
            "SELECT data FROM merge_sources WHERE stix_id = ? ORDER BY rowid", (target_id,)
        )
    ]
    return "merge", target, {"sources": sources}


def _key_of(stix: dict[str, Any]) -> str:
    iid = octi_ext(stix).get("id")
    return iid if isinstance(iid, str) and iid else str(stix.get("id"))


# Why each kind of reconciliation event was written (its ``message``).
_MESSAGES = {
    # The object as the listing sent it, as a recovery would (a create of its current state).
    "create": "changed while the stream's retention was lost (reconciled)",
    "delete": "deleted while the stream's retention was lost (reconciled)",
    # The target (as listed when the reconciliation refreshes it, else as archived) and the
    # sources' last known STIX in ``context.sources``; no patch, the lost window's is unknown.
    "merge": "merged while the stream's retention was lost (reconciled)",
}


def _reconciled(
    at: EventId, name: str, data: dict[str, Any], context: dict[str, Any] | None = None
) -> StreamEvent:
    """A reconciliation event as the platform would have sent it, with ``REFERER``."""
    envelope: dict[str, Any] = {
        "version": "4",
        "type": name,
        "scope": "external",
        "message": _MESSAGES[name],
        "origin": {"referer": REFERER},
        "data": data,
    }
    if context is not None:
        envelope["context"] = context
    return StreamEvent(at, str(at), name, orjson.dumps(envelope).decode(), envelope)
