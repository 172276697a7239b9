"""AMQP publish throughput of the OpenCTI target: `python -m bench.amqp_publish [--events N]`.

Starts a private RabbitMQ node (tests/support/rabbitmq.py: Debian's rabbitmq-server, temp dirs,
free ports), declares a durable direct exchange and a durable queue bound to it like the
platform's push queue, builds N event messages from simulator bulk creates (~2 KB STIX each,
through ``event_messages`` like the target), and publishes them with ``AmqpPublisher`` in
batches of ``--batch`` messages: once with transactions (the default path) and once with one
confirm per message (``confirm_each=True``, the former path), in the same run, the queue
purged in between, so the ratio holds on a noisy machine. Only ``publish`` calls are timed.
Nothing consumes the queue: every message is persisted by the broker.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pika  # type: ignore[import-untyped]  # no stubs published

from connector.sim.generator import bulk_creates
from connector.sim.store import SimStore
from connector.target.amqp import AmqpEndpoint, AmqpPublisher, event_messages
from tests.support.rabbitmq import PASSWORD, USER, RabbitNode, find_server
from tests.support.simlog import sim_events

__all__ = ["main"]

EXCHANGE, QUEUE, ROUTING = "bench.push.exchange", "bench_push", "bench_push_routing"


def _bodies(n: int) -> list[bytes]:
    store = SimStore()
    bulk_creates(store, n, seed=1)
    events, _ = sim_events(store)
    messages = event_messages(events[:n], applicant_id="bench", synchronized=True)
    return [m.body for m in messages][:n]


def _declare(node: RabbitNode) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        channel = conn.channel()
        channel.exchange_declare(EXCHANGE, exchange_type="direct", durable=True)
        channel.queue_declare(QUEUE, durable=True)
        channel.queue_bind(QUEUE, EXCHANGE, routing_key=ROUTING)
    finally:
        conn.close()


def _queued_then_purge(node: RabbitNode) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(node.url))
    try:
        channel = conn.channel()
        count: int = channel.queue_declare(QUEUE, durable=True, passive=True).method.message_count
        channel.queue_purge(QUEUE)
        return count
    finally:
        conn.close()


def _run(node: RabbitNode, bodies: list[bytes], batch: int, *, confirm_each: bool) -> float:
    endpoint = AmqpEndpoint("127.0.0.1", node.port, "/", False, USER, PASSWORD, EXCHANGE, ROUTING)
    publisher = AmqpPublisher(endpoint, confirm_each=confirm_each)
    publisher.check()
    try:
        start = time.perf_counter()
        for i in range(0, len(bodies), batch):
            publisher.publish(bodies[i : i + batch])
        elapsed = time.perf_counter() - start
    finally:
        publisher.close()
    queued = _queued_then_purge(node)
    if queued != len(bodies):
        raise SystemExit(f"the queue holds {queued} messages, {len(bodies)} were published")
    return len(bodies) / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=5_000, help="messages per publish call")
    parser.add_argument("--rounds", type=int, default=1, help="alternate both paths this often")
    args = parser.parse_args(argv)
    server = find_server()
    if server is None:
        print("rabbitmq-server is not installed", file=sys.stderr)
        return 2
    bodies = _bodies(args.events)
    size = sum(map(len, bodies)) / len(bodies)
    print(f"{len(bodies)} messages, {size:.0f} bytes each on average, {args.batch} per publish")
    base = Path(tempfile.mkdtemp(prefix="bench-rabbit-"))
    node = RabbitNode(server, base)
    try:
        node.start()
        _declare(node)
        for _ in range(args.rounds):
            tx = _run(node, bodies, args.batch, confirm_each=False)
            each = _run(node, bodies, args.batch, confirm_each=True)
            print(
                f"transactions: {tx:,.0f} msg/s   confirm per message: {each:,.0f} msg/s   "
                f"ratio {tx / each:.1f}x"
            )
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
