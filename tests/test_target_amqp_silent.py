"""The AMQP publisher against a broker that goes silent (a network partition: the TCP link stays
up, nothing comes back), through a relay that stops forwarding. A real private RabbitMQ node."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika  # type: ignore[import-untyped]
import pytest

from connector.errors import RetryableError
from connector.pipeline import ShutdownTimeout
from connector.run_lease import lease_holder
from connector.sim import sample_bundle
from connector.sim.generator import generate
from connector.sim.platform import WORKER_EXCHANGE
from connector.sim.server import SimServer
from connector.storage.local import LocalStorage
from connector.target import amqp
from connector.target.amqp import AmqpEndpoint, AmqpPublisher
from tests.support.connector import ConnectorThread, archived_events, checkpoint_id, wait_until
from tests.support.rabbitmq import RabbitNode, rabbitmq  # noqa: F401
from tests.test_target_amqp import (
    SAMPLE,
    _declare_exchange,
    _run_env,
    _synced,
    _wait_converged,
    publisher_via,
)

# pika's own limit on a wait for a silent broker: ~2 heartbeats of 30 s (about 70 s measured).
_HEARTBEAT_END_S = 2 * amqp._HEARTBEAT_S


class FreezeProxy:
    """A TCP relay to the broker that, while ``frozen``, holds what it reads instead of
    forwarding it: both ends see an open connection that answers nothing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
        self.delay = 0.0  # seconds each read from the broker is held (a slow link)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            for src, dst, answers in ((client, upstream, False), (upstream, client, True)):
                pump = threading.Thread(target=self._pump, args=(src, dst, answers))
                pump.daemon = True
                pump.start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while data := src.recv(65536):
                while self.frozen:
                    time.sleep(0.05)
                if answers and self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.frozen = False
        self._listener.close()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass


@pytest.fixture()
def relayed_publisher(rabbitmq: RabbitNode) -> Iterator[tuple[AmqpPublisher, FreezeProxy]]:  # noqa: F811
    _declare_exchange(rabbitmq)
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    try:
        channel = conn.channel()
        channel.queue_declare("silent_q", durable=True)
        channel.queue_bind("silent_q", WORKER_EXCHANGE, routing_key="push_routing_x")
    finally:
        conn.close()
    proxy = FreezeProxy(rabbitmq.port)
    publisher = publisher_via(rabbitmq, proxy.port, timeout=5)
    try:
        yield publisher, proxy
    finally:
        proxy.close()
        publisher.close()


def test_closing_a_link_to_a_silent_broker_is_bounded(
    relayed_publisher: tuple[AmqpPublisher, FreezeProxy],
) -> None:
    """At shutdown the target closes its broker connection before the run releases its lease:
    pika waits for close-ok until its heartbeat gives up (about 70 s with the 30 s heartbeat),
    past the shutdown timeout and docker's grace period (SIGKILL: the lease stays taken)."""
    publisher, proxy = relayed_publisher
    publisher.publish([b'{"n": 1}'])
    proxy.frozen = True
    started = time.monotonic()
    publisher.close()
    assert time.monotonic() - started < 15


def test_a_broker_gone_silent_is_not_reported_as_unreachable(
    relayed_publisher: tuple[AmqpPublisher, FreezeProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missed-heartbeat timeout on an established link is retryable; the error must not tell
    the operator to change target.amqp_host / amqp_port (the broker was reached)."""
    publisher, proxy = relayed_publisher
    monkeypatch.setattr(amqp, "_HEARTBEAT_S", 1)
    monkeypatch.setattr(publisher, "_timeout", 30.0)  # pika's heartbeat ends the wait first
    publisher.check()
    proxy.frozen = True
    with pytest.raises(RetryableError) as caught:
        publisher.publish([b'{"n": 2}'])
    assert "AMQPHeartbeatTimeout" in str(caught.value), str(caught.value)
    assert "target.amqp_host" not in str(caught.value), str(caught.value)


def _drain(rabbit: RabbitNode, queue: str) -> list[bytes]:
    conn = pika.BlockingConnection(pika.URLParameters(rabbit.url))
    try:
        channel, bodies = conn.channel(), []
        while True:
            method, _props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return bodies
            bodies.append(body)
    finally:
        conn.close()


def test_a_publish_to_a_silent_broker_gives_up_then_the_batch_goes_again(
    relayed_publisher: tuple[AmqpPublisher, FreezeProxy],
    rabbitmq: RabbitNode,  # noqa: F811
) -> None:
    """A commit to a broker gone silent waited for pika's heartbeat (~70 s): past the shutdown
    timeout of a run stopped meanwhile. It ends after the request timeout (5 s here) with a
    retryable error, and the batch sent again once the link is back arrives whole (a commit
    that completes late on the given-up connection only adds duplicates)."""
    publisher, proxy = relayed_publisher
    _drain(rabbitmq, "silent_q")
    publisher.publish([b'{"n": 0}'])
    proxy.frozen = True
    bodies = [f'{{"n": "{uuid.uuid4()}"}}'.encode() for _ in range(3)]
    started = time.monotonic()
    with pytest.raises(RetryableError) as caught:
        publisher.publish(bodies)
    assert time.monotonic() - started < _HEARTBEAT_END_S / 2
    assert "stopped answering" in str(caught.value), str(caught.value)
    assert publisher.committed == 0
    proxy.frozen = False
    publisher.publish(bodies)  # the pipeline's retry, on a new connection
    assert publisher.committed == len(bodies)
    queued = _drain(rabbitmq, "silent_q")
    assert set(bodies) <= set(queued), queued


def test_a_publish_to_a_silent_broker_ends_by_the_owners_deadline(
    relayed_publisher: tuple[AmqpPublisher, FreezeProxy],
) -> None:
    """With a long request timeout, a publish waiting on a silent broker still ends at the
    deadline its owner gives it (the pipeline: the run's shutdown deadline once stopping)."""
    publisher, proxy = relayed_publisher
    publisher._timeout = 600.0
    publisher.check()
    proxy.frozen = True
    end = time.monotonic() + 2
    publisher.deadline = lambda: end
    with pytest.raises(RetryableError) as caught:
        publisher.publish([b'{"n": 3}'])
    assert time.monotonic() - end < 5
    assert "stopping" in str(caught.value), str(caught.value)


def test_run_stopped_during_a_publish_to_a_silent_broker_exits_in_time(
    rabbitmq: RabbitNode,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``run`` (amqp transport through a relay) while the broker goes silent during a batch,
    then a stop: the run ends within the shutdown timeout (3 s here; the request timeout is
    60 s, pika's heartbeat ~70 s), the checkpoint not moved past what the target took, and the
    run lease released."""
    shutdown = 3.0
    a = SimServer(token="token-a", heartbeat_secs=0.2).start()
    b = SimServer(token="token-b", heartbeat_secs=0.2, amqp_url=rabbitmq.url).start()
    proxy = FreezeProxy(rabbitmq.port)
    try:
        a.store.load_bundle(sample_bundle(SAMPLE))
        archive = str(tmp_path / "archive")
        env = _run_env(
            a,
            b,
            archive,
            TARGET_AMQP_PORT=str(proxy.port),
            CONNECTOR_SHUTDOWN_TIMEOUT_SECS=str(shutdown),
        )
        storage = LocalStorage(archive)
        run = ConnectorThread(env).start()
        try:
            wait_until(lambda: _synced(storage, a), timeout=120, what="sync")
            _wait_converged(a, b)
            held = checkpoint_id(storage)
            archived = len(archived_events(storage))
            proxy.frozen = True
            generate(a.store, 20, seed=7)
            # The archive sink writes a batch before the target does: the publish is under way.
            wait_until(
                lambda: len(archived_events(storage)) > archived, timeout=60, what="archived"
            )
            time.sleep(1)
            assert run.alive
            stopped = time.monotonic()
            run.stop_event.set()
            run.join(_HEARTBEAT_END_S)
            took = time.monotonic() - stopped
            assert not run.alive, "the run waited on the silent broker"
        finally:
            run.stop_event.set()
            proxy.frozen = False
            run.join(120)
        assert took < shutdown + 10, took
        assert isinstance(run.error, ShutdownTimeout), run.error
        assert checkpoint_id(storage) == held
        assert lease_holder(storage) is None
    finally:
        proxy.close()
        a.stop()
        b.stop()


def _queue_process(rabbit: RabbitNode, queue: str, action: str) -> None:
    """``sys:suspend`` / ``sys:resume`` the broker's process of ``queue``: the node, its
    connections and their heartbeats go on, the queue answers nothing (a stalled queue: no
    confirm, so no commit-ok, for a transaction that published to it)."""
    expr = (
        f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)), '
        f"sys:{action}(amqqueue:get_pid(Q))."
    )
    ctl = Path(rabbit.server).with_name("rabbitmqctl")
    subprocess.run(
        [str(ctl), "-n", rabbit.nodename, "eval", expr],
        env=rabbit._env(),
        capture_output=True,
        timeout=60,
        check=True,
    )


def test_given_up_links_to_a_stalled_queue_are_bounded(
    relayed_publisher: tuple[AmqpPublisher, FreezeProxy],
    rabbitmq: RabbitNode,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broker that keeps sending heartbeats but never answers the commit (its queue stalled)
    holds a given-up link's thread in tx.commit for as long as it lasts: pika's heartbeat never
    ends it. The pipeline retries for as long as the outage lasts; each retry must not leave
    one more thread and connection behind."""
    publisher, _proxy = relayed_publisher
    monkeypatch.setattr(amqp, "_HEARTBEAT_S", 1)  # pika would have given up on a silent link
    publisher._timeout = 1.5
    publisher.check()
    name = publisher._link._thread.name  # type: ignore[union-attr]

    def links() -> int:
        return sum(1 for t in threading.enumerate() if t.name == name)

    _queue_process(rabbitmq, "silent_q", "suspend")
    try:
        for attempt in range(6):
            with pytest.raises(RetryableError) as caught:
                publisher.publish([f'{{"attempt": {attempt}}}'.encode()])
            assert "stopped answering" in str(caught.value), str(caught.value)
        time.sleep(4 * amqp._HEARTBEAT_S)  # what a silent link would have needed to end
        assert links() <= 3, links()  # the link in use and two given up
    finally:
        _queue_process(rabbitmq, "silent_q", "resume")
    wait_until(lambda: links() == 0, timeout=30, what="the given-up links end")
    publisher.publish([b'{"n": "after"}'])
    assert publisher.committed == 1


def test_a_broker_that_cannot_be_reached_is_reported_as_such() -> None:
    """A broker address that drops connection attempts (a firewall, a wrong address): the start
    check fails after the request timeout, retryable, with the advice to set target.amqp_host /
    amqp_port, not as a broker that was reached and stopped answering."""
    with socket.create_server(("127.0.0.1", 0), backlog=0) as blackhole:
        port = blackhole.getsockname()[1]
        # The backlog is full: further SYNs are dropped, a connection attempt waits unanswered.
        with socket.create_connection(("127.0.0.1", port)):
            endpoint = AmqpEndpoint("127.0.0.1", port, "/", False, "u", "secret", "ex", "rk")
            publisher = AmqpPublisher(endpoint, timeout=2)
            started = time.monotonic()
            with pytest.raises(RetryableError) as caught:
                publisher.check()
            took = time.monotonic() - started
            publisher.close()
    assert took < 2 + 3, took
    assert "cannot reach the broker" in str(caught.value), str(caught.value)
    assert "target.amqp_host" in str(caught.value), str(caught.value)


def test_nothing_more_is_sent_on_a_link_given_up(
    relayed_publisher: tuple[AmqpPublisher, FreezeProxy],
    rabbitmq: RabbitNode,  # noqa: F811
) -> None:
    """A publish given up (here at once: the owner's deadline has passed) must not go on on the
    link's thread: the caller reported the batch as not taken and its retry sends it again."""
    publisher, _proxy = relayed_publisher
    publisher.check()
    name = publisher._link._thread.name  # type: ignore[union-attr]
    _drain(rabbitmq, "silent_q")
    publisher.deadline = lambda: time.monotonic() - 1
    body = f'{{"n": "{uuid.uuid4()}"}}'.encode()
    with pytest.raises(RetryableError):
        publisher.publish([body] * 3)
    assert publisher.committed == 0
    wait_until(
        lambda: not any(t.name == name for t in threading.enumerate()),
        timeout=30,
        what="the given-up link ends",
    )
    assert body not in _drain(rabbitmq, "silent_q")


def test_a_commit_given_up_on_sends_none_of_the_next_chunks(
    relayed_publisher: tuple[AmqpPublisher, FreezeProxy],
    rabbitmq: RabbitNode,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A commit given up on (the broker silent) completes late on the link's thread once the
    broker answers again; the next chunks of that batch are not published there (the caller
    reported the batch not taken, and its retry sends them again, in order, on a new link)."""
    publisher, proxy = relayed_publisher
    monkeypatch.setattr(amqp, "_TX_CHUNK", 1)  # one transaction per message
    publisher.check()
    name = publisher._link._thread.name  # type: ignore[union-attr]
    _drain(rabbitmq, "silent_q")
    bodies = [f'{{"n": "{uuid.uuid4()}"}}'.encode() for _ in range(3)]
    proxy.frozen = True
    with pytest.raises(RetryableError):
        publisher.publish(bodies)
    assert publisher.committed == 0
    proxy.frozen = False  # the first commit reaches the broker and is answered
    wait_until(
        lambda: not any(t.name == name for t in threading.enumerate()),
        timeout=30,
        what="the given-up link ends",
    )
    assert _drain(rabbitmq, "silent_q") == bodies[:1]


def test_a_publish_making_progress_is_not_given_up_at_the_timeout(
    relayed_publisher: tuple[AmqpPublisher, FreezeProxy],
    rabbitmq: RabbitNode,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request timeout bounds a wait without progress, not a whole publish: a batch of
    several transactions, each answered well within it, goes through though it takes longer
    in all (a slow link must not give up a large batch again and again)."""
    publisher, proxy = relayed_publisher
    monkeypatch.setattr(amqp, "_TX_CHUNK", 1)
    publisher._timeout = 3.0  # far above one commit's ~0.8 s, also on a loaded machine
    publisher.check()
    _drain(rabbitmq, "silent_q")
    bodies = [f'{{"n": "{uuid.uuid4()}"}}'.encode() for _ in range(6)]
    proxy.delay = 0.8  # each commit-ok: ~0.8 s; the six: ~4.8 s
    started = time.monotonic()
    publisher.publish(bodies)
    assert time.monotonic() - started > publisher._timeout
    assert publisher.committed == len(bodies)
    assert _drain(rabbitmq, "silent_q") == bodies
