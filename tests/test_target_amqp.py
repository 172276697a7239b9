"""OpenCTITarget with the AMQP transport: real pycti (registration), real pika, a real private
RabbitMQ node, and the platform double's worker consuming the connector's push queue.

Events come from simulator A's stream log; the target publishes one message per event; B's
worker applies them; B's state must then equal A's.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]
import pytest

from connector import metrics
from connector.errors import PermanentError, RetryableError
from connector.events import StreamEvent, octi_ext
from connector.sim import SAMPLE_BUNDLES, sample_bundle
from connector.sim.generator import generate
from connector.sim.platform import WORKER_EXCHANGE, platform_state
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.sim.worker import PlatformWorker
from connector.storage.local import LocalStorage
from connector.target import amqp
from connector.target.amqp import AmqpEndpoint, AmqpPublisher, Message, event_messages
from connector.target.opencti import OpenCTITarget
from tests.support.compare import assert_same_state, state_diff
from tests.support.connector import (
    ConnectorThread,
    base_env,
    caught_up,
    checkpoint_id,
    wait_until,
)
from tests.support.rabbitmq import CutProxy, RabbitNode, rabbitmq  # noqa: F401
from tests.support.served import free_port
from tests.support.simlog import sim_events as events_since
from tests.support.target import Sync as SyncBase
from tests.support.target import batch_of, leaving_the_filter, malware, target_for

TOKEN = "amqp-target-token-0123456789"
SAMPLE = "DATA-TEST-STIX2_v2.json"  # real platform test data, packaged by the simulator


class Sync(SyncBase):
    """Source store A, target platform B (with its queue worker), a cursor over A's stream."""

    @property
    def worker(self) -> PlatformWorker:
        return platform_state(self.b.store).workers[self.target.connector_id]

    def applied(self) -> None:
        self.drain()

    def drain(self) -> None:
        """Wait until B's worker handled every message the target published."""
        assert self.target.publisher is not None
        published = self.target.publisher.published
        assert self.worker.wait_handled(published, timeout=60), "worker did not catch up"

    def assert_converged(self) -> None:
        assert not self.worker.failures, self.worker.failures[:3]
        super().assert_converged()


def make_target(url: str, **kwargs: Any) -> OpenCTITarget:
    return target_for(url, **{"token": TOKEN, "transport": "amqp", **kwargs})


@pytest.fixture()
def platform_b(rabbitmq: RabbitNode) -> Iterator[SimServer]:  # noqa: F811
    store = SimStore()
    store.api_token = TOKEN  # type: ignore[attr-defined]
    with SimServer(token=TOKEN, store=store, amqp_url=rabbitmq.url) as server:
        yield server


def _sync(platform_b: SimServer, **kwargs: Any) -> Iterator[Sync]:
    a = SimStore()
    a.load_bundle(sample_bundle(SAMPLE))
    target = make_target(platform_b.url, **kwargs)
    target.check()
    try:
        yield Sync(a, platform_b, target)
    finally:
        target.close()


@pytest.fixture()
def sync(platform_b: SimServer) -> Iterator[Sync]:
    yield from _sync(platform_b, synchronized=True)


# ------------------------------------------------------------------------ convergence


def test_registration_gives_the_broker_and_messages_are_platform_events(sync: Sync) -> None:
    publisher = sync.target.publisher
    assert publisher is not None
    ep = publisher.endpoint
    cid = sync.target.connector_id
    assert (ep.exchange, ep.routing_key) == (WORKER_EXCHANGE, f"push_routing_{cid}")
    assert ep.password not in repr(ep) and ep.password not in ep.describe()
    events, _ = events_since(sync.a, 0)
    body = next(event_messages(events[:1], applicant_id="u", synchronized=True))[1]
    message = json.loads(body)
    assert set(message) == {
        "type",
        "applicant_id",
        "content",
        "event_id",
        "synchronized",
        "previous_standard",
        "update",
    }
    assert message["type"] == "event" and message["update"] is True
    content = json.loads(base64.b64decode(message["content"]))
    assert content["id"] == events[0].id_text and content["type"] == "create"
    assert content["data"]["id"] == events[0].stix_id


def test_creates_updates_merges_deletes_converge(sync: Sync) -> None:
    events = sync.step()
    assert len(events) == 67
    sync.assert_converged()
    # B applied each event with the source's event id: its own stream carries it, which is how
    # a two-way setup recognises (and drops) its own changes coming back.
    b_events, _ = events_since(sync.b.store, 0)
    assert {e.envelope.get("event_id") for e in b_events} == {e.id_text for e in events}

    a = sync.a
    a.upsert(malware("Alpha", description="first", aliases=["a1"]))
    for name in ("Target", "Source one", "Source two"):
        a.upsert(malware(name))
    sync.step()
    alpha = malware("Alpha")["id"]
    a.update(alpha, set={"description": "second", "aliases": ["a1", "a2"]})
    renamed = f"malware--{uuid.uuid5(uuid.NAMESPACE_DNS, 'Alpha renamed')}"
    a.update(alpha, set={"name": "Alpha renamed"}, new_id=renamed)
    target, s1, s2 = (malware(n)["id"] for n in ("Target", "Source one", "Source two"))
    a.merge(target, [s1, s2])
    victim = next(o["id"] for o in a.objects() if o["type"] == "indicator")
    a.delete(victim)
    events = sync.step()
    assert [e.event for e in events] == ["update", "update", "merge", "delete"]
    sync.assert_converged()
    b = sync.b.store
    moved = b.get(renamed)
    assert moved is not None and b.get(alpha) == moved  # previous_standard: no duplicate
    merged = b.get(s1)
    assert merged is not None and merged["id"] == target  # sources are aliases of the target
    assert all(o["id"] not in (s1, s2, victim) for o in b.objects())


def test_generated_edits_in_one_batch_converge(sync: Sync) -> None:
    sync.step()
    generate(sync.a, 200, seed=11)
    sync.step()
    sync.assert_converged()


def test_batch_of_several_hundred_events_spans_transactions_and_converges(
    sync: Sync, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One write of ~600 events, committed 128 messages per transaction: every message
    arrives, in order across the commits (updates and deletes after their creates)."""
    monkeypatch.setattr(amqp, "_TX_CHUNK", 128)
    sync.step()
    generate(sync.a, 600, seed=23)
    before = sync.target.publisher.published if sync.target.publisher else 0
    events = sync.step()
    assert len(events) >= 600
    assert {e.event for e in events} >= {"create", "update", "delete"}
    assert sync.target.publisher is not None
    assert sync.target.publisher.published - before > 4 * 128
    sync.assert_converged()


def test_a_batch_is_published_a_few_transactions_at_a_time_and_converges(
    sync: Sync, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The messages of a batch are built and published a bounded number at a time (a huge
    group waits on disk; it is never held whole as messages), and no event's messages are split
    between two publishes (a merge is an upsert and the merge)."""
    from connector.target import opencti

    monkeypatch.setattr(opencti, "_PUBLISH_MESSAGES", 7)
    sync.step()
    publisher = sync.target.publisher
    assert publisher is not None
    sizes: list[int] = []
    publish = publisher.publish

    def counted(bodies: Any) -> None:
        sizes.append(len(bodies))
        publish(bodies)

    monkeypatch.setattr(publisher, "publish", counted)
    generate(sync.a, 300, seed=29)
    events = sync.step()
    assert {e.event for e in events} >= {"create", "update", "delete", "merge"}
    assert len(sizes) > 30 and max(sizes) <= 8  # 7, or 8 when a merge's two end a chunk
    sync.assert_converged()
    pairs = [(0, b"a"), (1, b"b"), (1, b"c"), (2, b"d"), (3, b"e"), (3, b"f"), (4, b"g")]
    messages = [Message(at, body) for at, body in pairs]
    chunks = list(opencti._whole_events(iter(messages), 2))
    assert [[m.at for m in c] for c in chunks] == [[0, 1, 1], [2, 3, 3], [4]]
    # Large messages (attached files inline) close a chunk by their bytes, events kept whole...
    big = [Message(at, body * 40) for at, body in pairs]
    chunks = list(opencti._whole_events(iter(big), 1000, max_bytes=100))
    assert [[m.at for m in c] for c in chunks] == [[0, 1, 1], [2, 3, 3], [4]]
    # ... but for the extra messages that carry an event's files, one at a time.
    files = [Message(0, b"a" * 40), *(Message(0, b"f" * 60, ("k",), True) for _ in range(3))]
    chunks = list(opencti._whole_events(iter(files), 1000, max_bytes=100))
    assert [len(c) for c in chunks] == [2, 2]
    # An event's extra messages end a list: the next event is built once they are published.
    then = [Message(0, b"a"), Message(0, b"f", ("k",), True), Message(1, b"b"), Message(2, b"c")]
    chunks = list(opencti._whole_events(iter(then), 1000))
    assert [[m.at for m in c] for c in chunks] == [[0, 0], [1, 2]]


def test_perfect_sync_propagates_removals(sync: Sync) -> None:
    sync.a.upsert(malware("Labelled", description="to remove", labels=["x", "y"]))
    sync.step()
    oid = malware("Labelled")["id"]
    sync.a.update(oid, set={"labels": ["x"]}, unset=["description"])
    sync.step()
    sync.assert_converged()
    held = sync.b.store.get(oid)
    assert held is not None and held.get("labels") == ["x"] and "description" not in held


@pytest.fixture()
def merging_sync(platform_b: SimServer) -> Iterator[Sync]:
    yield from _sync(platform_b, synchronized=False)


def test_without_perfect_sync_removals_stay(merging_sync: Sync) -> None:
    sync = merging_sync
    sync.a.upsert(malware("Kept", description="stays on B", labels=["x", "y"]))
    sync.step()
    oid = malware("Kept")["id"]
    sync.a.update(oid, set={"labels": ["x"]}, unset=["description"])
    sync.step()
    held = sync.b.store.get(oid)
    assert held is not None and held.get("description") == "stays on B"
    assert held.get("labels") == ["x", "y"]


def test_two_way_sync_does_not_echo(rabbitmq: RabbitNode) -> None:  # noqa: F811
    """A → B and B → A at once: each change crosses once and its echo is a no-op upsert (the
    forwarded event id makes a late echo stale besides), so neither stream grows any more."""
    servers = []
    for token in (TOKEN, TOKEN + "-a"):
        store = SimStore()
        store.api_token = token  # type: ignore[attr-defined]
        servers.append(SimServer(token=token, store=store, amqp_url=rabbitmq.url).start())
    b, a = servers
    a.store.load_bundle(sample_bundle(SAMPLE))
    to_b = make_target(b.url, synchronized=True, source_url=a.url)
    to_a = make_target(a.url, token=TOKEN + "-a", synchronized=True, source_url=b.url)
    try:
        to_b.check()
        to_a.check()
        forward, back = Sync(a.store, b, to_b), Sync(b.store, a, to_a)

        def settle() -> None:
            for _ in range(4):  # more rounds than a change needs: an echo would keep going
                forward.step()
                back.step()

        settle()
        forward.assert_converged()
        counts = (a.store.event_count, b.store.event_count)
        settle()
        assert (a.store.event_count, b.store.event_count) == counts
        oid = next(o["id"] for o in b.store.objects() if o["type"] == "malware")
        b.store.update(oid, set={"description": "edited on B"})
        settle()
        held = a.store.get(oid)
        assert held is not None and held["description"] == "edited on B"
        assert a.store.event_count == counts[0] + 1  # the change, and no echo on either side
        assert b.store.event_count == counts[1] + 1
        assert_same_state(a.store.dump_bundle(), b.store.dump_bundle())
    finally:
        to_b.close()
        to_a.close()
        for server in servers:
            server.stop()


@pytest.mark.parametrize("transport", ["amqp", "api"])
@pytest.mark.parametrize("resolve", [True, False])
def test_merge_target_resent_in_an_earlier_batch(
    platform_b: SimServer, transport: str, resolve: bool
) -> None:
    """The stream can deliver a merge target already carrying its sources' ids (a dependency
    re-send, loaded at send time) in a batch before the merge. Asking the target which entity
    each alias names keeps the still-live source from being absorbed by that upsert."""
    a = SimStore()
    for name in ("Keeper", "Absorbed"):
        a.upsert(malware(name, description=name))
    target = make_target(platform_b.url, transport=transport, resolve_aliases=resolve)
    target.check()
    try:
        sync = Sync(a, platform_b, target)
        step = sync.step if transport == "amqp" else lambda: _write(sync)
        step()
        keeper, absorbed = malware("Keeper")["id"], malware("Absorbed")["id"]
        a.merge(keeper, [absorbed])
        events, sync.pos = events_since(a, sync.pos)
        (merge,) = events
        assert absorbed in octi_ext(merge.stix)["stix_ids"]
        resent = {"version": "4", "type": "update", "data": merge.stix, "context": {}}
        early = StreamEvent(merge.id, merge.id_text, "update", json.dumps(resent))
        for batch in ([early], [merge]):
            target.write(batch_of(batch))
            if transport == "amqp":
                sync.drain()
        diff = state_diff(a.dump_bundle(), platform_b.store.dump_bundle())
        if resolve:
            assert not diff, diff
            held = platform_b.store.get(absorbed)
            assert held is not None and held["id"] == keeper
        else:
            assert diff  # the upsert resolved to the source too: B no longer equals A
    finally:
        target.close()


def _write(sync: Sync) -> None:
    events, sync.pos = events_since(sync.a, sync.pos)
    if events:
        sync.target.write(batch_of(events))


# ------------------------------------------------------------------------ worker semantics


def _publish_raw(rabbit_url: str, cid: str, body: bytes) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(rabbit_url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish(WORKER_EXCHANGE, f"push_routing_{cid}", body, mandatory=True)
    finally:
        conn.close()


def test_stale_update_is_skipped(sync: Sync, rabbitmq: RabbitNode) -> None:  # noqa: F811
    sync.step()
    oid = malware("Versioned")["id"]
    sync.a.upsert(malware("Versioned", description="v1"))
    sync.step()
    sync.a.update(oid, set={"description": "v2"})
    old_update = sync.step()
    sync.a.update(oid, set={"description": "v3"})
    sync.step()
    before = sync.b.store.event_count
    # The v2 update delivered again, late (a redelivery, another worker overtaken): its event
    # id is older than what B holds, so B keeps v3 and publishes nothing.
    body = next(event_messages(old_update, applicant_id="u", synchronized=True))[1]
    handled = sync.worker.handled
    _publish_raw(rabbitmq.url, sync.target.connector_id, body)
    assert sync.worker.wait_handled(handled + 1)
    assert not sync.worker.failures
    held = sync.b.store.get(oid)
    assert held is not None and held["description"] == "v3"
    assert sync.b.store.event_count == before
    sync.assert_converged()


def test_refused_messages_are_recorded(sync: Sync, rabbitmq: RabbitNode) -> None:  # noqa: F811
    sync.step()
    cid = sync.target.connector_id
    first = events_since(sync.a, 0)[0][:1]
    good = json.loads(next(event_messages(first, applicant_id="u", synchronized=False))[1])
    no_event_id = {k: v for k, v in good.items() if k != "event_id"}
    unknown_target = dict(good)
    content = json.loads(base64.b64decode(good["content"]))
    content.update(
        type="merge", data=malware("Nowhere"), context={"sources": [{"id": content["data"]["id"]}]}
    )
    unknown_target["content"] = base64.b64encode(json.dumps(content).encode()).decode()
    bodies = [b"not json", json.dumps(no_event_id).encode(), json.dumps(unknown_target).encode()]
    handled = sync.worker.handled
    for body in bodies:
        _publish_raw(rabbitmq.url, cid, body)
    assert sync.worker.wait_handled(handled + len(bodies))
    reasons = [f.reason for f in sync.worker.failures]
    assert len(reasons) == 3
    assert "not JSON" in reasons[0]
    assert "event_id" in reasons[1]
    assert "Cannot find the merge target" in reasons[2]
    # Nacked without requeue: gone from the queue, and the next messages still flow.
    sync.worker.failures.clear()
    sync.a.upsert(malware("After refusals"))
    sync.step()
    sync.assert_converged()


def test_settings_choose_the_transport() -> None:
    from connector.__main__ import build_runtime
    from connector.errors import ConfigError
    from tests.support.connector import settings_for

    def target_for(**extra: str) -> OpenCTITarget:
        env = base_env(
            "http://127.0.0.1:9",
            "t",
            "",
            TARGET_OPENCTI_URL="http://127.0.0.1:8",
            TARGET_OPENCTI_TOKEN="tt",
            **extra,
        )
        sinks = build_runtime(settings_for(env))["sinks"]
        return next(s for s in sinks if isinstance(s, OpenCTITarget))

    default = target_for()
    assert default.transport == "amqp"
    assert (default.amqp_host, default.amqp_port, default.amqp_use_ssl) == ("", 0, None)
    custom = target_for(
        TARGET_TRANSPORT="api",
        TARGET_AMQP_HOST="mq.example",
        TARGET_AMQP_PORT="5671",
        TARGET_AMQP_USE_SSL="true",
    )
    assert custom.transport == "api"
    assert (custom.amqp_host, custom.amqp_port, custom.amqp_use_ssl) == ("mq.example", 5671, True)
    with pytest.raises(ConfigError, match="target.transport"):
        target_for(TARGET_TRANSPORT="carrier-pigeon")
    with pytest.raises(ConfigError, match="target.amqp_use_ssl"):
        target_for(TARGET_AMQP_USE_SSL="maybe")


def test_registration_answer_overrides() -> None:
    answer = {
        "config": {
            "connection": {
                "host": "rabbitmq",
                "port": 5672,
                "vhost": "octi",
                "use_ssl": False,
                "user": "u",
                "pass": "p",
            },
            "push_exchange": WORKER_EXCHANGE,
            "push_routing": "push_routing_1",
        }
    }
    announced = AmqpEndpoint.from_registration(answer)
    assert (announced.host, announced.port, announced.vhost, announced.use_ssl) == (
        "rabbitmq",
        5672,
        "octi",
        False,
    )
    moved = AmqpEndpoint.from_registration(answer, host="mq.example", port=5671, use_ssl=True)
    assert (moved.host, moved.port, moved.use_ssl) == ("mq.example", 5671, True)
    assert moved.describe().startswith("amqps://u@mq.example:5671/octi")
    with pytest.raises(PermanentError, match="queue configuration"):
        AmqpEndpoint.from_registration({"config": None})


# ------------------------------------------------------------------------ broker faults


def test_dead_broker_port_is_retryable(platform_b: SimServer) -> None:
    dead = free_port()
    target = make_target(platform_b.url, amqp_port=dead, requests_timeout=5)
    with pytest.raises(RetryableError) as err:
        target.check()
    target.close()
    # The operator is told what to set when the announced broker is not reachable from here.
    assert f"127.0.0.1:{dead}" in str(err.value) and "target.amqp_host" in str(err.value)


def _answer(rabbit: RabbitNode, password: str, exchange: str = WORKER_EXCHANGE) -> dict[str, Any]:
    """A registration answer naming the test broker (as a platform would announce it)."""
    connection = {"host": "127.0.0.1", "port": rabbit.port, "vhost": "/", "use_ssl": False}
    connection.update(user="octisync", **{"pass": password})
    return {
        "config": {
            "connection": connection,
            "push_exchange": exchange,
            "push_routing": "push_routing_x",
        }
    }


def _declare_exchange(rabbitmq: RabbitNode) -> None:  # noqa: F811
    """The platform's push exchange, as its registration leaves it."""
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    try:
        conn.channel().exchange_declare(WORKER_EXCHANGE, exchange_type="direct", durable=True)
    finally:
        conn.close()


def publisher_via(rabbitmq: RabbitNode, port: int, *, timeout: float) -> AmqpPublisher:  # noqa: F811
    """A publisher whose registration names ``port`` (a relay in front of the broker)."""
    answer = _answer(rabbitmq, "octisync-test-password")
    answer["config"]["connection"]["port"] = port
    return AmqpPublisher(AmqpEndpoint.from_registration(answer), timeout=timeout)


def test_wrong_broker_password_is_permanent_and_not_leaked(rabbitmq: RabbitNode) -> None:  # noqa: F811
    secret = "wrong-password-0xdeadbeef"
    publisher = AmqpPublisher(AmqpEndpoint.from_registration(_answer(rabbitmq, secret)))
    with pytest.raises(PermanentError) as caught:
        publisher.check()
    assert "login refused" in str(caught.value)
    assert secret not in str(caught.value) and secret not in repr(caught.value)
    publisher.close()


def test_missing_exchange_is_permanent(rabbitmq: RabbitNode) -> None:  # noqa: F811
    answer = _answer(rabbitmq, "octisync-test-password", exchange="no.such.exchange")
    publisher = AmqpPublisher(AmqpEndpoint.from_registration(answer))
    with pytest.raises(PermanentError, match="does not exist"):
        publisher.check()
    publisher.close()


def test_unroutable_batch_is_permanent(rabbitmq: RabbitNode) -> None:  # noqa: F811
    """The broker returns unroutable mandatory messages during the commit, before commit-ok:
    the publish that committed them raises."""
    answer = _answer(rabbitmq, "octisync-test-password")
    _declare_exchange(rabbitmq)  # no queue is bound to push_routing_x
    publisher = AmqpPublisher(AmqpEndpoint.from_registration(answer))
    try:
        with pytest.raises(PermanentError, match="unroutable"):
            publisher.publish([b'{"n": %d}' % i for i in range(300)])
        assert publisher.published == 0
    finally:
        publisher.close()


def test_queue_refusing_part_of_a_batch_is_retryable(rabbitmq: RabbitNode) -> None:  # noqa: F811
    """A queue that rejects publishes when full (a nack for publisher confirms) fails the whole
    commit; the publisher reports it as retryable, like a nack."""
    answer = _answer(rabbitmq, "octisync-test-password")
    answer["config"]["push_routing"] = routing = f"full_{uuid.uuid4().hex}"
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    try:
        channel = conn.channel()
        channel.exchange_declare(WORKER_EXCHANGE, exchange_type="direct", durable=True)
        args = {"x-max-length": 10, "x-overflow": "reject-publish"}
        channel.queue_declare(routing, durable=True, arguments=args)
        channel.queue_bind(routing, WORKER_EXCHANGE, routing_key=routing)
        publisher = AmqpPublisher(AmqpEndpoint.from_registration(answer))
        try:
            with pytest.raises(RetryableError, match="partial tx completion"):
                publisher.publish([b'{"n": %d}' % i for i in range(50)])
            assert publisher.published == 0
        finally:
            publisher.close()
        channel.queue_delete(routing)
    finally:
        conn.close()


@pytest.fixture()
def proxied_sync(platform_b: SimServer, rabbitmq: RabbitNode) -> Iterator[tuple[Sync, CutProxy]]:  # noqa: F811
    proxy = CutProxy(rabbitmq.port)
    try:
        for sync in _sync(platform_b, synchronized=True, amqp_port=proxy.port):
            yield sync, proxy
    finally:
        proxy.close()


def test_broker_lost_mid_batch_raises_then_the_batch_is_sent_again(
    proxied_sync: tuple[Sync, CutProxy],
    rabbitmq: RabbitNode,  # noqa: F811
) -> None:
    sync, proxy = proxied_sync
    sync.step()
    sync.assert_converged()
    generate(sync.a, 400, seed=31)
    events, sync.pos = events_since(sync.a, sync.pos)
    bodies = list(event_messages(events, applicant_id="u", synchronized=True))
    assert len(bodies) < amqp._TX_CHUNK  # one transaction
    handled, published = sync.worker.handled, sync.target.publisher.published  # type: ignore[union-attr]
    # The link drops once about half of the batch's bytes have gone out.
    proxy.cut_after(sum(len(m.body) for m in bodies) // 2)
    with pytest.raises(RetryableError):
        sync.target.write(batch_of(events))
    assert proxy.down
    assert sync.target.publisher is not None and sync.target.publisher.published == published
    # Nothing of the uncommitted transaction reached the queue.
    assert _queued(rabbitmq, f"push_{sync.target.connector_id}") == 0
    assert sync.worker.handled == handled
    with pytest.raises(RetryableError):  # still down: refused, not half-sent
        sync.target.write(batch_of(events))
    proxy.restore()
    sync.target.write(batch_of(events))  # the pipeline's retry: the same batch again
    assert sync.target.publisher.published == published + len(bodies)
    sync.drain()
    sync.assert_converged()


def _run_env(a: SimServer, b: SimServer, archive: str, **extra: str) -> dict[str, str]:
    """``run`` from A into the archive and into B over the amqp transport, perfect sync."""
    return base_env(
        a.url,
        "token-a",
        archive,
        TARGET_OPENCTI_URL=b.url,
        TARGET_OPENCTI_TOKEN="token-b",
        TARGET_SYNCHRONIZED="true",
        TARGET_TRANSPORT="amqp",
        **extra,
    )


def test_run_holds_the_checkpoint_when_the_broker_is_lost_mid_batch(
    rabbitmq: RabbitNode,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``run`` through a link that drops in the middle of a batch: with B's worker paused, the
    queue holds exactly the messages of the events up to the checkpoint (the cut transaction
    left nothing, and nothing past the checkpoint is missing); after the link is back B
    converges."""
    a = SimServer(token="token-a", heartbeat_secs=0.2).start()
    b = SimServer(token="token-b", heartbeat_secs=0.2, amqp_url=rabbitmq.url).start()
    proxy = CutProxy(rabbitmq.port)
    try:
        a.store.load_bundle(sample_bundle(SAMPLE))
        archive = str(tmp_path / "archive")
        env = _run_env(a, b, archive, TARGET_AMQP_PORT=str(proxy.port))
        storage = LocalStorage(archive)
        run = ConnectorThread(env).start()
        try:
            wait_until(lambda: _synced(storage, a), timeout=120, what="sync")
            _wait_converged(a, b)
            (worker,) = platform_state(b.store).workers.values()
            worker.stop()  # from here on the queue keeps what the broker took
            pos = a.store.event_count
            retries = _retries()
            proxy.cut_after(200_000)  # ~75 messages into the next 400 events
            generate(a.store, 400, seed=5)
            wait_until(lambda: _retries() >= retries + 3, timeout=120, what="retries")
            assert proxy.down
            held = checkpoint_id(storage)
            assert held is not None and not _synced(storage, a)
            new_events, _ = events_since(a.store, pos)
            up_to_held = [e for e in new_events if e.id <= held]
            expected = len(list(event_messages(up_to_held, applicant_id="u", synchronized=True)))
            assert _queued(rabbitmq, worker.queue) == expected
            proxy.restore()
            worker.start()
            wait_until(
                lambda: _synced(storage, a),
                timeout=120,
                what="checkpoint after the link is back",
            )
            _wait_converged(a, b)
        finally:
            run.stop()
        assert run.error is None
        assert all(not w.failures for w in platform_state(b.store).workers.values())
    finally:
        proxy.close()
        a.stop()
        b.stop()


def _queued(rabbit: RabbitNode, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    try:
        count: int = conn.channel().queue_declare(queue, passive=True).method.message_count
        return count
    finally:
        conn.close()


def test_broker_down_holds_the_checkpoint_then_converges(
    rabbitmq: RabbitNode,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``run`` with the amqp transport: while the broker is stopped the archive moves on but
    the checkpoint (the minimum of both sinks) does not; after a restart B converges."""
    a = SimServer(token="token-a", heartbeat_secs=0.2).start()
    b = SimServer(token="token-b", heartbeat_secs=0.2, amqp_url=rabbitmq.url).start()
    try:
        a.store.load_bundle([o for n in SAMPLE_BUNDLES[:2] for o in sample_bundle(n)["objects"]])
        archive = str(tmp_path / "archive")
        env = _run_env(a, b, archive)
        storage = LocalStorage(archive)
        run = ConnectorThread(env).start()
        try:
            wait_until(lambda: _synced(storage, a), timeout=120, what="sync")
            _wait_converged(a, b)
            rabbitmq.stop()
            retries = _retries()
            generate(a.store, 40, seed=5)
            # Writes to the target fail (RetryableError, retried): the checkpoint waits. (Read
            # once the first write failed: until the new events came, idle heartbeats could
            # still move it, nothing being pending.)
            wait_until(lambda: _retries() >= retries + 1, timeout=120, what="a failed write")
            held = checkpoint_id(storage)
            wait_until(lambda: _retries() >= retries + 4, timeout=120, what="retries")
            assert checkpoint_id(storage) == held
            assert not _synced(storage, a)
            rabbitmq.start()
            wait_until(
                lambda: _synced(storage, a),
                timeout=120,
                what="checkpoint after the broker is back",
            )
            _wait_converged(a, b)
        finally:
            run.stop()
        assert run.error is None
        workers = platform_state(b.store).workers
        assert all(not w.failures for w in workers.values())
    finally:
        if not rabbitmq.running():
            rabbitmq.start()
        a.stop()
        b.stop()


def _synced(storage: LocalStorage, a: SimServer) -> bool:
    """The checkpoint reached A's last event."""
    last = a.store.last_event_id
    return last is not None and caught_up(storage, last)


def _retries() -> float:
    labels = {"stage": "sending", "kind": "RetryableError"}
    return metrics.REGISTRY.get_sample_value("opencti_sync_retries_total", labels) or 0.0


def _wait_converged(a: SimServer, b: SimServer) -> None:
    wait_until(
        lambda: not state_diff(a.store.dump_bundle(), b.store.dump_bundle()),
        timeout=60,
        what="B equal to A",
    )


def test_an_object_leaving_the_filter_is_kept_with_what_holds_it(platform_b: SimServer) -> None:
    """The same on amqp: the delete message made B's worker delete the object and cascade
    (see tests.support.target.leaving_the_filter)."""
    target = make_target(platform_b.url)
    target.check()
    try:

        def applied() -> None:
            assert target.publisher is not None
            worker = platform_state(platform_b.store).workers[target.connector_id]
            assert worker.wait_handled(target.publisher.published, timeout=60)
            assert not worker.failures, worker.failures[:3]

        leaving_the_filter(target, platform_b, applied)
    finally:
        target.close()


def test_link_lost_during_the_handshake_is_retryable(rabbitmq: RabbitNode) -> None:  # noqa: F811
    """A connection dropped in the middle of the AMQP handshake (a network blip, a broker
    going down while a client logs in) is what pika reports as a "probable" authentication
    (cut after connection.start) or vhost access error (cut after connection.tune): the
    broker refused nothing, so it is retried, not a permanent stop of the run."""
    _declare_exchange(rabbitmq)
    proxy = CutProxy(rabbitmq.port)
    publisher = publisher_via(rabbitmq, proxy.port, timeout=10)
    try:
        proxy.cut_after(10**9)
        publisher.check()
        publisher.close()
        sent = 10**9 - proxy._budget  # type: ignore[operator]  # the whole handshake's bytes
        proxy.restore()
        errors: dict[int, str] = {}
        for cut in range(1, sent, 3):  # every third byte of what the client sends
            proxy.cut_after(cut)
            try:
                publisher.check()
            except RetryableError:
                pass
            except PermanentError as exc:
                errors[cut] = str(exc)
            proxy.restore()
        assert not errors, sorted({e[e.index(": connect: ") + 10 :][:40] for e in errors.values()})
        publisher.check()  # the link is back: connects
    finally:
        publisher.close()
        proxy.close()


def test_a_failed_status_ping_does_not_publish_a_durable_batch_again(
    sync: Sync,
    rabbitmq: RabbitNode,  # noqa: F811
) -> None:
    """The connector's status ping (the platform API, every 40 s) comes after the broker took
    the batch. With the platform's API down and its broker up (a platform restart), a failed
    ping must not make the committed batch count as not written: each retry of the pipeline
    would publish it once more, the queue filling with copies for as long as the API is away."""
    sync.step()
    sync.assert_converged()
    generate(sync.a, 30, seed=7, mix="creates")
    events, sync.pos = events_since(sync.a, sync.pos)
    queue = sync.worker.queue
    expected = len(list(event_messages(events, applicant_id="u", synchronized=True)))
    sync.b.stop()  # the platform's API and its workers; RabbitMQ stays up
    try:
        sync.target._last_ping = float("-inf")  # a status ping is due with this batch
        sync.target.api.session.close()  # its kept-alive connection to B: dropped as well
        for _ in range(3):  # the pipeline's retries
            try:
                sync.target.write(batch_of(events))
                break
            except RetryableError:
                continue
        assert _queued(rabbitmq, queue) == expected
    finally:
        sync.b.start()
    sync.drain()
    sync.assert_converged()


def test_a_merge_into_a_target_the_other_platform_never_got(platform_b: SimServer) -> None:
    """B never received the merge target nor its source (created before this connector): the
    merge's messages create the target first, then merge into it; B's worker refuses nothing.
    (B's entity does not answer to the source's id: nothing of the source was there to merge.)"""
    a = SimStore()
    for name in ("Never sent target", "Never sent source"):
        a.upsert(malware(name))
    keeper, gone = malware("Never sent target")["id"], malware("Never sent source")["id"]
    _, pos = events_since(a)  # B never saw the creates
    a.merge(keeper, [gone])
    target = make_target(platform_b.url)
    target.check()
    try:
        sync = Sync(a, platform_b, target)
        sync.pos = pos
        sync.step()
        sync.drain()
        assert not sync.worker.failures, sync.worker.failures[:3]
        held = platform_b.store.get(keeper)
        assert held is not None and held["name"] == "Never sent target"
        assert platform_b.store.object_count == 1  # the source was never there
    finally:
        target.close()


def test_a_message_carries_the_event_id_its_event_came_with() -> None:
    """An event a synchroniser applied on the source keeps the first platform's event id: the
    message carries it (the target's stale-update protection compares those), and only an event
    without one gets its own stream id, as the platform fills it."""
    a = SimStore()
    a.upsert(malware("Relayed"))
    relayed = "4000000000000-7"  # later than the object's own events: not a stale one
    a.upsert(malware("Relayed", description="v2"), event_id=relayed)
    events, _ = events_since(a, 0)
    assert events[-1].envelope.get("event_id") == relayed
    ids = [
        json.loads(m.body)["event_id"]
        for m in event_messages(events, applicant_id="u", synchronized=True)
    ]
    assert ids == [events[0].id_text, relayed]


def _offline_publisher(password: str = "octisync-test-password") -> AmqpPublisher:
    """A publisher never connected: its error translation is what these tests look at."""
    answer = {
        "config": {
            "connection": {"host": "127.0.0.1", "port": 9, "user": "u", "pass": password},
            "push_exchange": WORKER_EXCHANGE,
            "push_routing": "push_routing_x",
        }
    }
    return AmqpPublisher(AmqpEndpoint.from_registration(answer))


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (320, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"),
        (541, "INTERNAL_ERROR"),
    ],
)
def test_a_broker_closing_for_its_shutdown_or_an_internal_error_is_retryable(
    code: int, text: str
) -> None:
    """A broker stopping (a restart, an upgrade) or failing inside closes its connections: the
    batch goes again once it is back, the run does not stop as for a refusal."""
    closed = pika.exceptions.ConnectionClosedByBroker(code, text)
    error = _offline_publisher()._translate("publish of 3 message(s)", closed)
    assert isinstance(error, RetryableError), error
    assert text in str(error)


def test_the_broker_password_is_scrubbed_from_any_error_text() -> None:
    """Whatever a pika error says (its arguments may hold connection parameters), the broker
    password the platform announced never reaches an error, hence never a log."""
    secret = "announced-broker-secret-0x5eed"
    cause = pika.exceptions.AMQPConnectionError(f"cannot connect as u:{secret}@127.0.0.1:9")
    error = _offline_publisher(secret)._translate("connect", cause)
    assert secret not in str(error) and "u:***@127.0.0.1:9" in str(error), str(error)
