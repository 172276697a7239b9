"""Shared pieces of the OpenCTI-target tests (both transports): a batch of stream events, a STIX
malware factory, and a source-store → target-platform pair that follows A's stream."""

from __future__ import annotations

import uuid
from typing import Any

from connector.events import StreamEvent
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.sink import Batch
from connector.target.opencti import OpenCTITarget
from tests.support.compare import assert_same_state
from tests.support.simlog import sim_events

__all__ = ["Sync", "batch_of", "malware", "target_for"]


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
