"""The amqp transport and the broker's ``max_message_size``: an event too large for the broker is
quarantined, not a stop of the whole sync; real pycti + pika + a private RabbitMQ node configured
with a small limit + the platform double's worker."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from connector.events import StreamEvent
from connector.sim.platform import platform_state
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.sim.worker import PlatformWorker
from connector.target import amqp
from connector.target.opencti import OpenCTITarget
from tests.support.rabbitmq import RabbitNode, private_broker
from tests.support.simlog import sim_events
from tests.support.target import batch_of, malware, target_for

TOKEN = "amqp-size-token-0123456789"
LIMIT = 1024 * 1024  # the broker's max_message_size here (RabbitMQ 4.x default: 16 MiB)


@pytest.fixture(scope="module")
def small_broker() -> Iterator[RabbitNode]:
    yield from private_broker("octisync-rabbit-size-", f"max_message_size = {LIMIT}\n")


@pytest.fixture()
def platform_b(small_broker: RabbitNode) -> Iterator[SimServer]:
    store = SimStore()
    store.api_token = TOKEN  # type: ignore[attr-defined]
    with SimServer(token=TOKEN, store=store, amqp_url=small_broker.url) as server:
        yield server


def _target(b: SimServer, **kwargs: Any) -> OpenCTITarget:
    sink = target_for(b.url, token=TOKEN, transport="amqp", **kwargs)
    sink.check()
    return sink


def _worker(b: SimServer, sink: OpenCTITarget) -> PlatformWorker:
    return platform_state(b.store).workers[sink.connector_id]


def test_event_larger_than_the_broker_takes_is_quarantined(platform_b: SimServer) -> None:
    """The broker closes the channel on the big message (406 "message size ... larger than
    configured max size"): that event is quarantined, the others are delivered, the limit is
    learned so the next big event is withheld without a refusal."""
    sink = _target(platform_b)
    a = SimStore()
    a.upsert(malware("small before"))
    a.upsert(malware("huge", description="x" * LIMIT))
    a.upsert(malware("small after"))
    events, pos = sim_events(a)
    try:
        sink.write(batch_of(events))
        assert [q.id_text for q in sink.rejected] == [events[1].id_text]
        assert "larger than the broker's maximum message size" in sink.rejected[0].reason
        assert sink.amqp_max_message_bytes == LIMIT  # from the broker's own words
        assert sink.last_event_id == events[-1].id_text
        assert sink.publisher is not None and sink.publisher.published == 2
        assert _worker(platform_b, sink).wait_handled(2, timeout=30)
        assert platform_b.store.get(malware("small after")["id"]) is not None
        assert platform_b.store.get(malware("huge")["id"]) is None

        a.upsert(malware("huge again", description="y" * LIMIT))
        a.upsert(malware("small last"))
        events, _ = sim_events(a, pos)
        sink.write(batch_of(events))
        assert [q.id_text for q in sink.rejected] == [events[0].id_text]
        assert sink.publisher is not None and sink.publisher.published == 3
        assert _worker(platform_b, sink).wait_handled(3, timeout=30)
        assert not _worker(platform_b, sink).failures
    finally:
        sink.close()


def test_committed_chunks_are_not_published_again(
    platform_b: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal comes in the third transaction: the two committed before it stay as they
    are, only the rest of the batch is published again."""
    monkeypatch.setattr(amqp, "_TX_CHUNK", 4)
    sink = _target(platform_b)
    a = SimStore()
    for n in range(12):
        extra = {"description": "z" * (LIMIT + 10)} if n == 9 else {}
        a.upsert(malware(f"object {n}", **extra))
    events, _ = sim_events(a)
    try:
        sink.write(batch_of(events))
        assert [q.id_text for q in sink.rejected] == [events[9].id_text]
        assert sink.publisher is not None and sink.publisher.published == 11
        worker = _worker(platform_b, sink)
        assert worker.wait_handled(11, timeout=30)
        assert worker.handled == 11 and not worker.failures
        assert platform_b.store.object_count == 11
    finally:
        sink.close()


def test_configured_limit_withholds_an_event_the_broker_would_take(
    platform_b: SimServer,
) -> None:
    """``amqp_max_message_bytes`` (default 16 MiB minus a margin) is checked before publishing."""
    sink = _target(platform_b, amqp_max_message_bytes=64 * 1024)
    a = SimStore()
    a.upsert(malware("medium", description="m" * (128 * 1024)))  # the broker would take it
    a.upsert(malware("small"))
    events, _ = sim_events(a)
    try:
        sink.write(batch_of(events))
        assert [q.id_text for q in sink.rejected] == [events[0].id_text]
        assert sink.rejected[0].event == "create-refused-by-target"
        assert sink.publisher is not None and sink.publisher.published == 1
        assert _worker(platform_b, sink).wait_handled(1, timeout=30)
        assert platform_b.store.get(malware("small")["id"]) is not None
    finally:
        sink.close()


def test_one_oversized_event_does_not_withhold_events_sharing_its_id(platform_b: SimServer) -> None:  # noqa: F811
    """Events share a stream id (a live event's dependencies, recovery objects of one
    millisecond, a reconciliation's deletes): only the oversized one is withheld and recorded."""
    sink = _target(platform_b, amqp_max_message_bytes=LIMIT)
    a = SimStore()
    a.upsert(malware("small before"))
    a.upsert(malware("huge", description="x" * LIMIT))
    a.upsert(malware("small after"))
    events, _ = sim_events(a)
    first = events[0].id_text
    events = [StreamEvent.from_sse(first, ev.event, ev.data) for ev in events]
    try:
        sink.write(batch_of(events))
        assert sink.publisher is not None and sink.publisher.published == 2
        assert len(sink.rejected) == 1 and "huge" in sink.rejected[0].raw
    finally:
        sink.close()
