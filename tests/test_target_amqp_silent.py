"""The AMQP publisher against a broker that goes silent (a network partition: the TCP link stays
up, nothing comes back), through a relay that stops forwarding. A real private RabbitMQ node."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pika  # type: ignore[import-untyped]
import pytest

from connector.errors import RetryableError
from connector.sim.platform import WORKER_EXCHANGE
from connector.target import amqp
from connector.target.amqp import AmqpEndpoint, AmqpPublisher
from tests.support.rabbitmq import RabbitNode, rabbitmq  # noqa: F401
from tests.test_target_amqp import _answer


class FreezeProxy:
    """A TCP relay to the broker that, while ``frozen``, holds what it reads instead of
    forwarding it: both ends see an open connection that answers nothing."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen = False
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
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                while self.frozen:
                    time.sleep(0.05)
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
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq.url))
    try:
        channel = conn.channel()
        channel.exchange_declare(WORKER_EXCHANGE, exchange_type="direct", durable=True)
        channel.queue_declare("silent_q", durable=True)
        channel.queue_bind("silent_q", WORKER_EXCHANGE, routing_key="push_routing_x")
    finally:
        conn.close()
    proxy = FreezeProxy(rabbitmq.port)
    answer = _answer(rabbitmq, "octisync-test-password")
    answer["config"]["connection"]["port"] = proxy.port
    publisher = AmqpPublisher(AmqpEndpoint.from_registration(answer), timeout=5)
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
    publisher.check()
    proxy.frozen = True
    with pytest.raises(RetryableError) as caught:
        publisher.publish([b'{"n": 2}'])
    assert "target.amqp_host" not in str(caught.value), str(caught.value)
