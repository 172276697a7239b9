"""AMQP transport for the OpenCTI target: one message per stream event on the connector's push queue.

This is how the platform's own Synchronizer feeds its workers (opencti-stream-protocol.md §6.4):
``{type: "event", applicant_id, content: base64(JSON {id, type, data, context}), event_id,
synchronized, previous_standard, update: true}`` published to ``push_exchange`` with
``push_routing``. Unlike ``stixBundlePush`` it carries the source ``event_id`` (stale-update
protection), ``synchronized`` (perfect sync: removals propagate) and ``previous_standard``.

The broker coordinates come from the platform's ``registerConnector`` answer. Messages are
persistent (delivery_mode 2) and mandatory, published in order, and ``publish`` returns only when
the broker has durably taken every one of them: that is the "target acknowledged" the checkpoint
waits for. pika's exceptions are translated here; the password never leaves this module.

Batching: the channel is transactional (``tx.select`` once). A batch is published without waiting,
then committed, ``_TX_CHUNK`` messages per ``tx.commit``. RabbitMQ answers ``commit-ok`` only when
the channel has no unconfirmed message left: the same queue confirmations a publisher confirm
waits for (persistent messages written to disk, or replicated on a quorum queue), whatever the
queue type. A queue refusing a message fails the commit ("partial tx completion", retryable like a
nack). The ``basic.return`` of an unroutable mandatory message is sent during the commit, before
``commit-ok`` (rabbitmq.com "Broker Semantics", tx table; checked by a test), so a return is seen
before ``publish`` returns. A failure before ``commit-ok`` raises, and the batch is sent again
later (the target is idempotent). Publisher confirms with one ``multiple`` ack wait would give the
same guarantee at the same speed (measured: ~9,000 msg/s for both against ~1,200 for one confirm
per message), but pika's ``BlockingChannel`` waits for each confirm; streaming them needs pika's
asynchronous channel (private ``_impl`` or a ``SelectConnection`` with its own I/O loop).
Transactions reach it with the blocking API as is. The per-message confirm path stays available
(``confirm_each=True``) for comparison (``bench/amqp_publish.py``).

A broker that goes silent (a network partition: the TCP link up, nothing answered) would hold a
blocking pika call until the heartbeat gives up, ~2 heartbeats (about 70 s measured). pika has no
time limit of its own on a ``tx.commit`` (nor on a flush of a full socket buffer), and its
``BlockingConnection`` is not thread-safe. So each connection lives on a thread of its own
(``_Link``) that alone calls pika; the caller waits for each call with a limit: ``timeout`` (the
target's request timeout) without progress, or the owner's ``deadline`` (the run's shutdown
deadline once it is stopping). A call that outlives it raises ``RetryableError`` and its link is
given up: nothing else is sent on it, its thread closes the connection when pika returns and
ends. The pipeline sends the batch again on a new connection; a transaction committed after it
was given up only duplicates messages, which the target takes harmlessly (see "Batching"). A
broker that answers heartbeats but not the commit (a stalled queue) never ends such a thread:
while ``_MAX_RETIRED`` given-up links still wait, no new connection is opened (the write raises
``RetryableError`` at once), so a long outage holds at most that many threads and sockets.
"""

from __future__ import annotations

import base64
import logging
import queue
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import orjson
import pika  # type: ignore[import-untyped]  # pycti's AMQP client; no stubs published
import pika.exceptions  # type: ignore[import-untyped]

from ..errors import ConfigError, PermanentError, RetryableError, SinkError
from ..events import StreamEvent
from ..files import Inlined, names_files
from .common import (
    LiveIds,
    MergeLookahead,
    left_the_view,
    live_aliases_of,
    merge_source_ids,
    previous_standard,
    without_aliases,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "OPENCTI_SYSTEM_UUID",
    "AmqpEndpoint",
    "AmqpPublisher",
    "Message",
    "MessageTooLarge",
    "event_messages",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
# pika logs every failed connection attempt at ERROR with a traceback; we translate the failure
# into one RetryableError / PermanentError that the pipeline logs once per retry instead. Set on
# pika's module loggers: pycti resets the "pika" parent's level whenever it builds a client.
for _name in [n for n in logging.root.manager.loggerDict if n.startswith("pika.")]:
    logging.getLogger(_name).setLevel(logging.CRITICAL)

# The applicant the platform's Synchronizer uses when the sync has no user of its own.
OPENCTI_SYSTEM_UUID = "6a4b11e1-90ca-4e42-ba42-db7bc7f7d505"
_CLOSE_WAIT_S = 5.0  # longest wait for a close-ok (see AmqpPublisher.close)
_POLL_S = 0.2  # how often a caller waiting on the link looks at its limits
# While a link connects, pika's own limit (the same timeout) ends the wait first and says why
# (a broker that cannot be reached is not one that stopped answering).
_CONNECT_GRACE_S = 1.0
# Links given up whose thread still waits on the broker (see AmqpPublisher._on_link): past this
# many, no new connection is opened until one of them ends.
_MAX_RETIRED = 2
_HEARTBEAT_S = 30  # a dead broker is noticed within ~2 heartbeats even while waiting for a commit
# Messages per transaction: bounds what the broker holds uncommitted for one channel (~2 MB of
# 2 KB events) while keeping commits (one disk sync each) rare; throughput is flat from 500 up.
_TX_CHUNK = 1000
# RabbitMQ 4.x's default max_message_size is 16 MiB (3.x: 128 MiB); it bounds the body. Keep a
# margin below it. A broker configured lower is learned from its refusal (see MessageTooLarge).
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024 - 64 * 1024
_MAX_SIZE = re.compile(r"max(?:imum)? (?:message )?size (?:of )?(\d+)", re.IGNORECASE)


class MessageTooLarge(PermanentError):
    """The broker closed the channel on a message over its ``max_message_size`` (406
    PRECONDITION_FAILED "message size N is larger than configured max size M"). ``limit`` is M
    when the broker said it. Nothing of the uncommitted transaction was taken."""

    def __init__(self, message: str, limit: int | None) -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True, slots=True)
class AmqpEndpoint:
    """Where to publish: the broker and the connector's push exchange / routing key."""

    host: str
    port: int
    vhost: str
    use_ssl: bool
    user: str
    password: str = field(repr=False)
    exchange: str
    routing_key: str

    @classmethod
    def from_registration(
        cls,
        answer: Mapping[str, Any],
        *,
        host: str = "",
        port: int = 0,
        use_ssl: bool | None = None,
    ) -> AmqpEndpoint:
        """From ``registerConnector``'s answer; ``host``/``port``/``use_ssl`` override it (a
        broker reachable under another name from outside the platform's network)."""
        config = answer.get("config") if isinstance(answer, Mapping) else None
        conn = config.get("connection") if isinstance(config, Mapping) else None
        if not isinstance(config, Mapping) or not isinstance(conn, Mapping):
            raise PermanentError(
                "OpenCTI target: the registration answer has no queue configuration "
                "(config.connection); use target.transport: api"
            )
        exchange, routing = config.get("push_exchange"), config.get("push_routing")
        if not isinstance(exchange, str) or not exchange or not isinstance(routing, str):
            raise PermanentError(
                "OpenCTI target: the registration answer names no push exchange / routing key"
            )
        try:
            reg_port = int(conn.get("port") or 0)
        except (TypeError, ValueError):
            reg_port = 0
        final_host = host or str(conn.get("host") or "")
        final_port = port or reg_port or 5672
        if not final_host:
            raise ConfigError("target.amqp_host", "the platform announced no broker host")
        return cls(
            host=final_host,
            port=final_port,
            vhost=str(conn.get("vhost") or "/"),
            use_ssl=bool(conn.get("use_ssl")) if use_ssl is None else use_ssl,
            user=str(conn.get("user") or ""),
            password=str(conn.get("pass") or ""),
            exchange=exchange,
            routing_key=routing,
        )

    def describe(self) -> str:
        scheme = "amqps" if self.use_ssl else "amqp"
        return (
            f"{scheme}://{self.user}@{self.host}:{self.port}{'' if self.vhost == '/' else '/'}"
            f"{self.vhost} (exchange {self.exchange}, routing key {self.routing_key})"
        )


def _message(
    ev: StreamEvent, data: dict[str, Any], event_type: str, applicant_id: str, synchronized: bool
) -> bytes:
    payload = {"id": ev.id_text, "type": event_type, "data": data}
    context = ev.envelope.get("context")
    if context is not None:
        payload["context"] = context
    content = orjson.dumps(payload)
    prev = previous_standard(ev) if event_type == "update" else None
    message = {
        "type": "event",
        "applicant_id": applicant_id,
        "content": base64.b64encode(content).decode("ascii"),
        # The platform fills a missing event_id with "<ms>-<seq>" of the stream id; so do we.
        "event_id": str(ev.envelope.get("event_id") or ev.id_text),
        "synchronized": synchronized,
        "previous_standard": prev,
        "update": True,
    }
    return orjson.dumps(message)


class Message(NamedTuple):
    """One message to publish for the event at index ``at`` of the batch (by index, not event id:
    dependency events, recovery objects of one millisecond and a reconciliation's deletes share
    their id). ``extra``: the event's object once more, with the attached file ``keys`` inline
    (after the event's own messages; it may go in another transaction than they do)."""

    at: int
    body: bytes
    keys: tuple[str, ...] = ()
    extra: bool = False


def event_messages(
    events: Sequence[StreamEvent],
    *,
    applicant_id: str,
    synchronized: bool,
    live_aliases: Mapping[str, set[str]] | None = None,
    carry: Callable[[dict[str, Any]], Iterator[Inlined]] | None = None,
    forget: Callable[[dict[str, Any]], None] | None = None,
    limit: Callable[[], int] | None = None,
) -> Iterator[Message]:
    """The messages to publish for ``events``, in this order.

    One message per event, like the Synchronizer, with two differences that keep the target
    equal to the source: until a merge is applied, no upsert carries its sources' ids among
    its aliases (``MergeLookahead``; ``live_aliases`` extends it to merges in later batches),
    and a merge is preceded by an upsert of its target, so a target the other platform never
    received is created instead of failing the merge. With ``carry``
    (``connector.files.FileCarrier.one_by_one``), an upsert's or a merge target's attached
    files follow its messages, one ``extra`` message per file, built as they are read; not
    when one of the event's own messages is above ``limit()`` (the event will be quarantined,
    and its files are left to a later event). ``forget`` (``FileCarrier.forget``) is told of
    each delete as its message is built: the target deletes the files with the object, so the
    object coming back, later in the same batch too, carries them again.

    Yielded event by event, ``events`` read twice and never held (see ``plan_pushes``).
    """
    lookahead, live = MergeLookahead(events), LiveIds()
    for index, event in enumerate(events):
        ev = event.parsed()
        later_sources, others = lookahead.after(index), live.taken(ev)
        kind = ev.event
        if kind not in ("create", "update", "merge", "delete") or left_the_view(ev):
            continue  # (a delete that only left the view: kept, see common.left_the_view)
        data = ev.stix
        if kind == "merge":
            pre = without_aliases(data, later_sources | merge_source_ids(ev))
            own = [
                _message(ev, pre, "update", applicant_id, synchronized),
                _message(ev, data, kind, applicant_id, synchronized),
            ]
            # After the merge, the target holds the sources' ids: its files go with them.
            data = without_aliases(data, later_sources)
        else:
            if kind != "delete":
                data = without_aliases(
                    data, later_sources | others | live_aliases_of(live_aliases, ev)
                )
            own = [_message(ev, data, kind, applicant_id, synchronized)]
        if kind == "delete" and forget is not None:
            forget(data)  # (a file message of an earlier event may not be acknowledged yet)
        yield from (Message(index, body) for body in own)
        if carry is None or kind == "delete" or not names_files(ev):
            continue
        if limit is None or max(len(body) for body in own) <= limit():
            for done in carry(data):
                body = _message(ev, done.stix, "update", applicant_id, synchronized)
                yield Message(index, body, done.keys, True)


class _NoAnswer(Exception):
    """A call on the broker connection outlived its limit (see ``AmqpPublisher._on_link``)."""


class _Link:
    """One broker connection and the thread that alone uses it: pika's ``BlockingConnection``
    must only be used from one thread. ``call`` runs a function there and waits for it with a
    limit; ``retire`` ends the link: its thread closes the connection once pika returns."""

    def __init__(self, name: str) -> None:
        self.conn: Any = None  # made and used on the link's thread only
        self.channel: Any = None
        self.returned: list[Any] = []  # basic.return of the current transaction
        self.retired = False
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None]
        self._calls = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            fn, result = call
            if self.retired:  # given up before it started: nothing more goes on this link
                result.set_exception(_NoAnswer())
                continue
            try:
                result.set_result(fn())
            except BaseException as exc:  # the caller's to handle
                result.set_exception(exc)
        conn, self.conn, self.channel = self.conn, None, None
        if conn is not None:
            _close_connection(conn)

    def call(self, fn: Callable[[], T], give_up_at: Callable[[], float]) -> T:
        """``fn()`` on the link's thread. ``give_up_at()`` is asked again every ``_POLL_S`` (a
        stop may come during the wait); once it has passed the link is retired, and this
        raises ``_NoAnswer`` while ``fn`` may still be waiting on the broker."""
        result: Future[T] = Future()
        self._calls.put((fn, result))
        while not result.done():
            left = give_up_at() - time.monotonic()
            if left <= 0:
                self.retire()
                raise _NoAnswer()
            wait_futures([result], timeout=min(_POLL_S, left))
        return result.result()

    def retire(self) -> None:
        if not self.retired:
            self.retired = True
            self._calls.put(None)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> bool:
        """Whether the link's thread ended (its connection closed) within ``timeout``."""
        self._thread.join(timeout)
        return not self.alive


class AmqpPublisher:
    """A transactional publisher on one broker connection, reopened after any failure.

    ``confirm_each=True`` selects the former path: a confirm channel that waits for the broker's
    ack of each message (about 7x slower; kept for the benchmark).

    Every wait on the broker ends, with ``RetryableError``, after ``timeout`` seconds without
    progress (a commit-ok, a confirm) or at ``deadline()`` (a monotonic time, None: none), which
    the owner sets to the run's shutdown deadline (see the module docstring).
    """

    def __init__(
        self,
        endpoint: AmqpEndpoint,
        *,
        ssl_verify: bool = True,
        ca_bundle: str | None = None,
        timeout: float = 30.0,
        confirm_each: bool = False,
        deadline: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.endpoint = endpoint
        self._ssl_verify = ssl_verify
        self._ca_bundle = ca_bundle
        self._timeout = timeout
        self.confirm_each = confirm_each
        self.deadline = deadline
        self._link: _Link | None = None
        # Links given up, kept while their thread still waits on the broker.
        self._retired: list[_Link] = []
        self.published = 0
        # How many leading messages of the last ``publish`` call the broker durably took, also
        # when it raised (the chunks committed before the failure).
        self.committed = 0

    def _parameters(self) -> Any:
        ep = self.endpoint
        ssl_options = None
        if ep.use_ssl:
            context = ssl.create_default_context(cafile=self._ca_bundle or None)
            if not self._ssl_verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            ssl_options = pika.SSLOptions(context, server_hostname=ep.host)
        return pika.ConnectionParameters(
            host=ep.host,
            port=ep.port,
            virtual_host=ep.vhost,
            credentials=pika.PlainCredentials(ep.user, ep.password),
            ssl_options=ssl_options,
            heartbeat=_HEARTBEAT_S,
            connection_attempts=1,
            socket_timeout=self._timeout,
            stack_timeout=self._timeout,
            blocked_connection_timeout=self._timeout,
        )

    def _on_link(self, fn: Callable[[_Link], T], progress: Callable[[], int] = lambda: 0) -> T:
        """``fn(link)`` on the connection's own thread, given up after ``timeout`` without
        ``progress()`` changing, or at ``deadline()``."""
        link = self._link
        if link is None:
            # A broker that sends heartbeats but never answers (a queue stalled: no commit-ok)
            # keeps a given-up link's thread and connection forever: one more per retry.
            self._retired = [old for old in self._retired if old.alive]
            if len(self._retired) >= _MAX_RETIRED:
                raise _NoAnswer(
                    f"{len(self._retired)} connections given up still wait on it; "
                    "no new one until one of them ends"
                )
            ep = self.endpoint
            link = self._link = _Link(f"amqp-{ep.host}:{ep.port}")
        since, seen = time.monotonic(), progress()

        def give_up_at() -> float:
            nonlocal since, seen
            if (now := progress()) != seen:
                since, seen = time.monotonic(), now
            limit, stop_at = since + self._timeout, self.deadline()
            if link.conn is None:  # not connected yet (set on the link's thread once it is)
                limit += _CONNECT_GRACE_S
            return limit if stop_at is None else min(limit, stop_at)

        started = time.monotonic()
        try:
            return link.call(lambda: fn(link), give_up_at)
        except _NoAnswer:
            stopping = self.deadline() is not None
            raise _NoAnswer(
                f"no answer after {time.monotonic() - started:.1f} s"
                + (" (the run is stopping)" if stopping else f" (timeout {self._timeout:g} s)")
            ) from None

    def _connect(self, link: _Link) -> Any:
        """On the link's thread: its channel, opened (again) when needed."""
        if link.channel is not None and link.conn is not None and link.conn.is_open:
            try:
                link.conn.process_data_events(time_limit=0)  # heartbeats; notices a dead link
                if link.channel.is_open:
                    return link.channel
            except pika.exceptions.AMQPError:
                pass
        conn, link.conn, link.channel = link.conn, None, None
        if conn is not None:
            _close_connection(conn)
        link.conn = pika.BlockingConnection(self._parameters())
        channel = link.conn.channel()
        if self.confirm_each:
            channel.confirm_delivery()
        else:
            link.returned = []
            channel.add_on_return_callback(
                lambda _ch, method, props, body: link.returned.append(method)
            )
            channel.tx_select()
        # Fails with NOT_FOUND when the platform never declared the exchange.
        channel.exchange_declare(self.endpoint.exchange, passive=True)
        link.channel = channel
        return channel

    def check(self) -> None:
        """Connect and verify the push exchange exists."""
        self._guard("connect", lambda: self._on_link(self._connect))

    def publish(self, bodies: Sequence[bytes]) -> None:
        """Publish in order; returns once the broker durably took every message (else raises:
        nothing of an uncommitted chunk was taken, the first ``committed`` messages were)."""
        self.committed = 0
        if not bodies:
            return
        # Messages taken, counted on the link's thread: a call given up on may go on there.
        taken = [0]

        def run(link: _Link) -> None:
            channel = self._connect(link)
            props = pika.BasicProperties(
                delivery_mode=2, content_type="application/json", content_encoding="utf-8"
            )
            exchange, routing_key = self.endpoint.exchange, self.endpoint.routing_key
            for start in range(0, len(bodies), _TX_CHUNK):
                if link.retired:  # the caller gave up: its retry sends the batch again
                    raise _NoAnswer()
                chunk = bodies[start : start + _TX_CHUNK]
                for body in chunk:
                    # Transactional: no wait here. confirm_each: waits for the ack (or a return).
                    channel.basic_publish(
                        exchange, routing_key, body, properties=props, mandatory=True
                    )
                    if self.confirm_each:
                        taken[0] += 1
                if not self.confirm_each:
                    self._commit(link, channel)
                    taken[0] += len(chunk)

        try:
            self._guard(
                f"publish of {len(bodies)} message(s)",
                lambda: self._on_link(run, lambda: taken[0]),
            )
        finally:
            self.committed = taken[0]
            self.published += self.committed

    def _commit(self, link: _Link, channel: Any) -> None:
        channel.tx_commit()
        # A return precedes commit-ok on the wire; pika queued it as a pending event, which
        # this dispatches (without waiting) to the return callback.
        link.conn.process_data_events(time_limit=0)
        if link.returned:
            returned, link.returned = link.returned, []
            raise pika.exceptions.UnroutableError(returned)

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except SinkError:
            self._drop()
            raise
        except Exception as exc:  # pika raises many types; classify, then reconnect next time
            self._drop()
            raise self._translate(what, exc) from None

    def _drop(self) -> None:
        """Give the connection up without waiting: its thread closes it (see ``close``)."""
        link, self._link = self._link, None
        if link is not None:
            link.retire()
            self._retired.append(link)

    def _scrub(self, text: str) -> str:
        password = self.endpoint.password
        return (text.replace(password, "***") if password else text)[:400]

    def _translate(self, what: str, exc: Exception) -> SinkError:
        ex = pika.exceptions
        where = f"OpenCTI target broker {self.endpoint.describe()}: {what}"
        # pika's connection errors carry their cause in args with an empty str().
        text = str(exc) or "; ".join(repr(a) for a in exc.args)
        detail = self._scrub(f"{type(exc).__name__}: {text}")
        if isinstance(exc, ex.ProbableAuthenticationError | ex.ProbableAccessDeniedError) and (
            "StreamLostError" in text
        ):
            # pika's guess from the handshake state when the link dropped without a word from
            # the broker (a refused login or vhost comes as ConnectionClosedByBroker 403/530):
            # a network blip or a broker going down, nothing was refused.
            return RetryableError(f"{where}: link lost during the AMQP handshake ({detail})")
        if isinstance(exc, ex.ProbableAuthenticationError | ex.AuthenticationError):
            return PermanentError(
                f"{where}: login refused ({detail}) - check the broker user and password the "
                "platform announced"
            )
        if isinstance(exc, ex.ProbableAccessDeniedError):
            return PermanentError(f"{where}: access to the virtual host refused ({detail})")
        if isinstance(exc, ex.ConnectionClosedByBroker | ex.ChannelClosedByBroker):
            code = exc.reply_code
            if code == 404:
                return PermanentError(
                    f"{where}: {detail} - the push exchange does not exist on the broker; is "
                    "the connector registered on the target platform?"
                )
            if code in (403, 530):
                return PermanentError(f"{where}: access refused ({detail})")
            if code in (320, 541):  # broker shutting down / internal error: try again later
                return RetryableError(f"{where}: {detail}")
            if code == 406 and "partial tx" in str(exc.reply_text):  # a queue refused: a nack
                return RetryableError(f"{where}: the broker refused the message(s) ({detail})")
            if code == 406 and "message size" in str(exc.reply_text).lower():
                found = _MAX_SIZE.search(str(exc.reply_text))
                return MessageTooLarge(
                    f"{where}: a message is larger than the broker's max_message_size ({detail})",
                    int(found.group(1)) if found else None,
                )
            return PermanentError(f"{where}: {detail}")
        if isinstance(exc, ex.UnroutableError):
            return PermanentError(
                f"{where}: unroutable - no queue is bound to routing key "
                f"{self.endpoint.routing_key}; is the connector registered on the target?"
            )
        if isinstance(exc, ex.NackError):
            return RetryableError(f"{where}: the broker refused the message(s) (nack)")
        if isinstance(exc, _NoAnswer):
            # The link may be up: a partition, or a broker too busy to answer in time.
            return RetryableError(f"{where}: the broker stopped answering ({exc}); given up")
        if isinstance(exc, ex.AMQPHeartbeatTimeout | ex.ConnectionBlockedTimeout):
            # Connected, then the broker went silent (missed heartbeats) or kept the connection
            # blocked (a resource alarm) too long: not a wrong host or port.
            return RetryableError(f"{where}: the broker stopped answering ({detail})")
        if isinstance(exc, ex.AMQPConnectionError) and not isinstance(
            exc, ex.StreamLostError | ex.ConnectionClosed
        ):
            # Never connected: most often the platform announced its broker under a name only
            # its own network resolves (e.g. "rabbitmq" inside docker compose).
            return RetryableError(
                f"{where}: cannot reach the broker ({detail}) - if it is reachable from here "
                "under another name or port, set target.amqp_host / target.amqp_port; "
                "otherwise target.transport: api"
            )
        if isinstance(exc, ex.AMQPError | OSError | TimeoutError):
            return RetryableError(f"{where}: {detail}")
        return RetryableError(f"{where}: unexpected {detail}")

    def close(self) -> None:
        """Close the connection, waiting at most ``_CLOSE_WAIT_S`` for the broker's close-ok.

        pika's close waits for it without a limit of its own: a broker gone silent (a network
        partition) holds it until the heartbeat gives up, ~2 heartbeats, past the shutdown
        timeout; the run releases its lease only after its sinks are closed. The link's thread
        goes on closing it then (a daemon: it does not hold the exit)."""
        link, self._link = self._link, None
        if link is None:
            return
        link.retire()
        if not link.join(min(_CLOSE_WAIT_S, self._timeout)):
            log.warning(
                "The target's broker did not answer the connection close; left behind.",
                extra={"broker": self.endpoint.describe()},
            )


def _close_connection(conn: Any) -> None:
    try:
        if conn.is_open:
            conn.close()
    except Exception as exc:  # closing a broken link: nothing left to do
        log.debug("AMQP close: %s", type(exc).__name__)
