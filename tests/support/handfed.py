"""A pipeline fed by hand: the real ``Pipeline`` and ``ArchiveSink`` over a ``LocalStorage``,
its source never started; a test hands it the items the source would (``_handle``) and asks it
to flush when it wants. For the pipeline's own rules (what a batch holds, when the checkpoint
may move), without a stream's timing."""

from __future__ import annotations

import threading

import orjson

from connector.archive import ArchiveSink
from connector.checkpoint import Checkpoint, CheckpointStore
from connector.events import OCTI_EXT, EventId, StreamEvent
from connector.pipeline import BatchPolicy, Pipeline
from connector.source import SourceConfig, SseSource
from connector.storage.local import LocalStorage

BASE_MS = 1_800_000_000_000


def at(ms: int, seq: int = 0) -> EventId:
    """An event id ``ms`` milliseconds after ``BASE_MS``."""
    return EventId(BASE_MS + ms, seq)


def malware(
    event_id: EventId, n: int, kind: str = "create", referer: str | None = None
) -> StreamEvent:
    """An event about malware ``n`` with id ``event_id`` (its own group), from ``referer``."""
    stix = {
        "type": "malware",
        "id": f"malware--00000000-0000-4000-8000-{n:012d}",
        "name": f"m{n}",
        "is_family": True,
        "extensions": {OCTI_EXT: {"id": f"iid-{n}", "type": "Malware"}},
    }
    origin = {"referer": referer} if referer else {}
    env = {"version": "4", "type": kind, "origin": origin, "data": stix}
    return StreamEvent(event_id, str(event_id), kind, orjson.dumps(env).decode(), env)


def hand_fed(
    storage: LocalStorage, *, resume: EventId | None = None, policy: BatchPolicy | None = None
) -> Pipeline:
    """A pipeline into an archive at ``storage``, its checkpoint saved there at ``resume``."""
    cp = Checkpoint(stream_id="live", source_url="http://x")
    if resume is not None:
        cp.last_event_id = cp.last_segment_last_id = str(resume)
    store = CheckpointStore(storage)
    store.save(cp)
    source = SseSource(SourceConfig(url="http://x", token="t", stream_id="live"), resume=resume)
    return Pipeline(
        source=source,
        sinks=[ArchiveSink(storage)],
        store=store,
        checkpoint=cp,
        policy=policy or BatchPolicy(max_age_secs=3600),
        stop=threading.Event(),
    )


def saved_position(storage: LocalStorage) -> str | None:
    """The checkpoint's position as saved in ``storage`` (not the pipeline's copy)."""
    cp = CheckpointStore(storage).load()
    return cp.last_event_id if cp is not None else None
