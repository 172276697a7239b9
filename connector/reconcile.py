"""Delete reconciliation after a retention gap.

When the platform trimmed its stream past our checkpoint, the repair (``recover`` from the
checkpoint) re-sends what *changed*, but deletions in the lost window leave no trace: the database
snapshot has no tombstones. So once the repair has caught up, this module

1. lists every object the platform holds now, through one extra recover-mode connection
   (``from=0&recover=<now>``, read until the live part begins; ids only, kept in SQLite);
2. materialises the archive's own state (snapshot + segments, on disk);
3. returns a synthetic ``delete`` event for every object alive in the archive but gone from the
   platform, carrying its last known STIX and ``origin.referer = "opencti-sync-reconcile"``.

The pipeline writes those events like any other batch (so an OpenCTI target deletes them too).
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
from pathlib import Path

import httpx
import orjson
from httpx_sse import connect_sse

from .errors import SourceRetryable, StreamGoneError
from .events import EventId, StreamEvent, octi_ext
from .source import SourceConfig, iso_now, iso_to_id, tls_verify
from .storage import Storage

__all__ = ["REFERER", "reconcile_deletes", "platform_ids"]

log = logging.getLogger(__name__)

REFERER = "opencti-sync-reconcile"


def platform_ids(config: SourceConfig, db: sqlite3.Connection) -> int:
    """Fill table ``ids(id)`` with the internal and STIX ids of every object on the platform."""
    db.execute("CREATE TABLE IF NOT EXISTS ids (id TEXT PRIMARY KEY)")
    recover = iso_now()
    recover_id = iso_to_id(recover) or EventId(0, 0)  # iso_now() always parses
    base = config.url.rstrip("/")
    url = f"{base}/stream/{config.stream_id or 'live'}"
    params = {
        "from": "0",
        "recover": recover,
        "listen-delete": "true" if config.listen_delete else "false",
        "no-dependencies": "true",
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
            for sse in source.iter_sse():
                if sse.event == "heartbeat":
                    break  # recovery is over: the server is idle in the live part
                if sse.event not in ("create", "update", "merge"):
                    continue
                if EventId.is_valid(sse.id) and EventId.parse(sse.id) > recover_id:
                    break  # a live event: the snapshot part has ended
                try:
                    stix = orjson.loads(sse.data).get("data") or {}
                except (orjson.JSONDecodeError, AttributeError):
                    continue
                ids = [stix.get("id"), octi_ext(stix).get("id")]
                db.executemany(
                    "INSERT OR IGNORE INTO ids VALUES (?)",
                    [(i,) for i in ids if isinstance(i, str)],
                )
                seen += 1
    except httpx.HTTPError as exc:
        raise SourceRetryable(f"reconcile listing failed: {exc}") from exc
    db.commit()
    return seen


def reconcile_deletes(
    storage: Storage, config: SourceConfig, *, at: EventId, work_dir: Path | None = None
) -> list[StreamEvent]:
    """Synthetic delete events (id ``at``) for archived objects the platform no longer has."""
    from .restore import materialise

    work = Path(tempfile.mkdtemp(prefix="reconcile-", dir=work_dir))
    db = sqlite3.connect(work / "platform-ids.sqlite")
    try:
        listed = platform_ids(config, db)
        state = materialise(storage, until=None, work_dir=work)
        out: list[StreamEvent] = []
        try:
            for key, stix_id, _event, data in state.objects():
                found = db.execute(
                    "SELECT 1 FROM ids WHERE id IN (?, ?) LIMIT 1", (key, stix_id)
                ).fetchone()
                if found is not None:
                    continue
                envelope = {
                    "version": "4",
                    "type": "delete",
                    "scope": "external",
                    "message": "deleted while the stream's retention was lost (reconciled)",
                    "origin": {"referer": REFERER},
                    "data": data,
                }
                raw = orjson.dumps(envelope).decode()
                out.append(StreamEvent(at, str(at), "delete", raw, envelope))
        finally:
            state.close()
        log.warning(
            "Delete reconciliation done.",
            extra={"platform_objects": listed, "deleted": len(out), "event_id": str(at)},
        )
        return out
    finally:
        db.close()
