"""Delete reconciliation after a retention gap.

When the platform trimmed its stream past our checkpoint, the repair (``recover`` from the
checkpoint) re-sends what *changed*, but deletions in the lost window leave no trace: the database
snapshot has no tombstones. Nor is the repair's copy of a change always archived: when the archive
had gone past the checkpoint (a target lagging behind it, a crash before the checkpoint), the
repair's groups at or below the archive's end are taken for ones it holds, and an object the
repair sent there as a dependency is not sent again at its own place. So once the repair has
caught up, this module

1. materialises the archive's own state (snapshot + segments, on disk);
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
4. returns synthetic events with ``origin.referer = "opencti-sync-reconcile"``: a ``create``
   carrying the listed object for every one the archive lacks or holds otherwise (an earlier
   version, or references the platform re-pointed silently when a change lost with the window
   renamed or merged what they name);
   then, for every object alive in the archive but gone from the platform, with its last known
   STIX, a ``merge`` into the entity that answers to its id now, when the archive holds that
   entity or the listing refreshes it (it was merged away in the lost window: what referred to
   it follows it there, as on the platform), else a ``delete``. An object the platform answers
   for under a new standard id, same internal id, is still there (outside the listing).

The pipeline writes those events like any other batch (so an OpenCTI target applies them too).
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import orjson
from httpx_sse import connect_sse

from .errors import CannotReconcile, SourceRetryable, StreamGoneError
from .events import EventId, StreamEvent, loads_json, octi_ext
from .source import SourceConfig, iso_now, iso_to_id, tls_verify
from .stix_lookup import entities, stix_queries
from .storage import Storage

if TYPE_CHECKING:  # the state (sqlite, the fold) is imported when a reconciliation runs
    from .state import StateStore

__all__ = ["REFERER", "platform_ids", "platform_resolves", "reconcile_deletes"]

log = logging.getLogger(__name__)

REFERER = "opencti-sync-reconcile"


def platform_ids(
    config: SourceConfig, db: sqlite3.Connection, state: StateStore | None = None
) -> int:
    """Fill table ``ids(id)`` with the internal and STIX ids of every object on the platform;
    with ``state``, table ``refresh(key, stix_id, data)`` with each listed object it lacks or
    holds otherwise."""
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
    stream = "live" if config.stream_id in ("", "raw") else config.stream_id
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
                if state is not None and ids and _differs(state, ids, stix):
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


def reconcile_deletes(
    storage: Storage, config: SourceConfig, *, at: EventId, work_dir: Path | None = None
) -> list[StreamEvent]:
    """Synthetic events (id ``at``): creates for what the archive missed, then merges and
    deletes for archived objects the platform no longer holds under their own id."""
    from .restore import materialise

    work = Path(tempfile.mkdtemp(prefix="reconcile-", dir=work_dir))
    db = sqlite3.connect(work / "platform-ids.sqlite")
    try:
        state = materialise(storage, until=None, work_dir=work)
        try:
            listed = platform_ids(config, db, state)
            archived = state.counts()["objects"]
            if listed == 0 and archived:
                # A platform that lost everything it held is far likelier a platform not ready
                # (an empty search index after a restart) than a real mass delete.
                raise SourceRetryable(
                    f"the platform listed no objects while the archive holds {archived}"
                )
            unlisted: list[tuple[str, str, dict[str, Any]]] = []
            for key, stix_id, _event, data in state.objects():
                found = db.execute(
                    "SELECT 1 FROM ids WHERE id IN (?, ?) LIMIT 1", (key, stix_id)
                ).fetchone()
                if found is None:
                    unlisted.append((key, stix_id, data))
            now = platform_resolves(config, [stix_id for _, stix_id, _ in unlisted])
            merges: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
            deletes: list[dict[str, Any]] = []
            for key, stix_id, data in unlisted:
                found = now.get(stix_id)
                if found is None:
                    deletes.append(data)
                    continue
                holder, holder_iid = found
                if holder == stix_id or holder_iid == key:
                    continue  # still there (renamed or not), outside the stream's listing
                target = None
                if holder:
                    # As listed when the archive lacks it or holds it otherwise (refreshed
                    # first): a target platform must not be set back by the merge's upsert.
                    listed_row = db.execute(
                        "SELECT data FROM refresh WHERE stix_id = ?", (holder,)
                    ).fetchone()
                    target = orjson.loads(listed_row[0]) if listed_row else state.get(holder)
                if target is not None and _key_of(target) != key:
                    merges.setdefault(str(target.get("id")), (target, []))[1].append(data)
                else:
                    deletes.append(data)  # merged into an entity outside the stream's listing
            refreshed = [
                _reconciled(at, "create", orjson.loads(data))
                # In push order: a target pushes runs of upserts in bundles, and an object must
                # not come a bundle before what it references.
                for (data,) in db.execute("SELECT data FROM refresh ORDER BY phase, key")
            ]
        finally:
            state.close()
        out = list(refreshed)
        out.extend(
            _reconciled(at, "merge", target, {"sources": sources})
            for target, sources in merges.values()
        )
        out.extend(_reconciled(at, "delete", data) for data in deletes)
        log.warning(
            "Delete reconciliation done.",
            extra={
                "platform_objects": listed,
                "unlisted": len(unlisted),
                "refreshed": len(refreshed),
                "deleted": len(deletes),
                "merged": sum(len(sources) for _, sources in merges.values()),
                "event_id": str(at),
            },
        )
        return out
    finally:
        db.close()


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
