"""Shared pieces of the OpenCTI-target tests (both transports): a batch of stream events, a STIX
malware factory, and a source-store → target-platform pair that follows A's stream."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
from httpx_sse import connect_sse

from connector.events import EventId, StreamEvent
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.sink import Batch
from connector.target.opencti import OpenCTITarget
from tests.support.compare import assert_same_state
from tests.support.simlog import sim_events

__all__ = ["Sync", "batch_of", "leaving_the_filter", "malware", "stream_events", "target_for"]


def batch_of(events: list[StreamEvent]) -> Batch:
    return Batch(first_id=events[0].id, last_id=events[-1].id, events=events)


def target_for(url: str, **kwargs: Any) -> OpenCTITarget:
    """A target on platform ``url`` with a fresh connector id; ``kwargs`` (``token`` among them)
    override the rest."""
    options: dict[str, Any] = {
        "url": url,
        "connector_id": str(uuid.uuid4()),
        "source_url": "http://source.example:4000",
    }
    options.update(kwargs)
    return OpenCTITarget(**options)


def malware(name: str, **extra: Any) -> dict[str, Any]:
    """A STIX malware whose id derives from its name (deterministic across runs)."""
    stix = {
        "type": "malware",
        "spec_version": "2.1",
        "id": f"malware--{uuid.uuid5(uuid.NAMESPACE_DNS, name)}",
        "created": "2024-01-01T00:00:00.000Z",
        "modified": "2024-01-01T00:00:00.000Z",
        "name": name,
        "is_family": True,
    }
    stix.update(extra)
    return stix


class Sync:
    """Source store A, target platform B, and a cursor over A's stream."""

    def __init__(self, a: SimStore, b: SimServer, target: OpenCTITarget) -> None:
        self.a, self.b, self.target, self.pos = a, b, target, 0

    def step(self) -> list[StreamEvent]:
        events, self.pos = sim_events(self.a, self.pos)
        if events:
            self.target.write(batch_of(events))
            self.applied()
        return events

    def applied(self) -> None:
        """After a write: wait until B has applied it (the API push path applies before it
        answers, so nothing to wait for here)."""

    def assert_converged(self) -> None:
        assert_same_state(self.a.dump_bundle(), self.b.store.dump_bundle())


def stream_events(sim: SimServer, stream: str, after: str) -> list[StreamEvent]:
    """The data events of ``/stream/<stream>`` after ``after``, over HTTP, until a heartbeat
    reaches the simulator's last event."""
    last = EventId.parse(str(sim.store.last_event_id))
    out: list[StreamEvent] = []
    headers = {"Authorization": f"Bearer {sim.token}"}
    url = f"{sim.url}/stream/{stream}"
    with (
        httpx.Client(timeout=30) as client,
        connect_sse(client, "GET", url, params={"from": after}, headers=headers) as source,
    ):
        for sse in source.iter_sse():
            if sse.event in ("create", "update", "merge", "delete"):
                out.append(StreamEvent.from_sse(sse.id, sse.event, sse.data))
            elif sse.event == "heartbeat" and EventId.is_valid(sse.id or ""):
                if EventId.parse(sse.id) >= last:
                    break
    return out


_KEEP = {
    "mode": "and",
    "filterGroups": [],
    "filters": [{"key": ["objectLabel"], "values": ["keep"], "operator": "eq", "mode": "or"}],
}
_M = "malware--00000000-0000-4000-8000-00000000000a"
_I = "intrusion-set--00000000-0000-4000-8000-00000000000b"
_R = "relationship--00000000-0000-4000-8000-00000000000c"
_RP = "report--00000000-0000-4000-8000-00000000000d"


def leaving_the_filter(
    target: OpenCTITarget, b: SimServer, applied: Callable[[], None] = lambda: None
) -> None:
    """A filtered stream sends an update that takes an object out of its filter as a
    ``delete`` carrying the update (protocol doc §5.3, §8.14). The object was not deleted
    upstream, the archive keeps it as last seen, and the relationship and the report holding it
    are unchanged and still in the filter: the target must keep them all (a delete there
    cascades over them, and the stream never sends them again). ``applied`` waits until B
    applied what the target sent (amqp: its worker)."""
    with SimServer(token="source-token", heartbeat_secs=0.2) as sim_a:
        a = sim_a.store
        a.create({"type": "malware", "id": _M, "name": "m", "labels": ["keep"], "is_family": True})
        a.create({"type": "intrusion-set", "id": _I, "name": "i", "labels": ["keep"]})
        a.create(
            {
                "type": "relationship",
                "id": _R,
                "relationship_type": "uses",
                "source_ref": _I,
                "target_ref": _M,
                "labels": ["keep"],
            }
        )
        report = {"type": "report", "id": _RP, "name": "r", "labels": ["keep"]}
        a.create({**report, "published": "2025-01-01T00:00:00.000Z", "object_refs": [_M, _I]})
        sim_a.add_stream("keep", filters=_KEEP)
        target.write(batch_of(stream_events(sim_a, "keep", "0")))
        applied()
        assert all(b.store.get(x) is not None for x in (_M, _I, _R, _RP))
        mark = str(a.last_event_id)
        a.update(_M, set={"labels": ["other"]})  # M leaves the filter; nothing is deleted
        events = stream_events(sim_a, "keep", mark)
        assert [(e.event, e.envelope["type"]) for e in events] == [("delete", "update")]
        target.write(batch_of(events))
        applied()
        assert a.get(_R) is not None and _M in a.get(_RP)["object_refs"]
        assert b.store.get(_M) is not None, "an object only out of the filter was deleted on B"
        assert b.store.get(_R) is not None, "a relationship still in the filter is gone from B"
        report_b = b.store.get(_RP)
        assert report_b is not None and _M in (report_b.get("object_refs") or [])
