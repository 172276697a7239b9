"""The platform double's worker: consumes a connector's push queue from a real RabbitMQ.

It behaves like the platform's workers (opencti-worker ``push_handler.py``, protocol doc §6.5)
for the ``type: "event"`` messages the Synchronizer publishes: one consumer, a small prefetch,
``ack`` after the message is applied, ``nack`` without requeue when it cannot be (the message is
then gone, as on the platform) with the reason recorded in ``failures`` so tests can assert it.

Applying an event:

* create / update: a full-object upsert with the message's ``event_id`` (stale updates are
  skipped, like isOutdatedUpdate), ``synchronized`` (replace instead of merge: removals
  propagate) and ``previous_standard`` (an entity whose standard id changed is found by its old
  id);
* merge: ``store.merge(data.id, [s.id for s in context.sources])``; an unknown target fails;
* delete: ``store.delete(data.id)`` (an unknown id is nothing to do).

The store then publishes the resulting events on the double's own stream.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

import pika  # type: ignore[import-untyped]  # no stubs published
import pika.exceptions  # type: ignore[import-untyped]

from ..events import OCTI_EXT
from .store import SimStore

__all__ = ["MessageRefused", "PlatformWorker", "WorkerFailure", "apply_event_message"]

log = logging.getLogger(__name__)

_REQUIRED = (
    "type",
    "applicant_id",
    "content",
    "event_id",
    "synchronized",
    "previous_standard",
    "update",
)
_EVENTS = ("create", "update", "merge", "delete")


class MessageRefused(Exception):
    """The message cannot be applied (malformed, or the platform refuses the operation)."""


@dataclass(frozen=True, slots=True)
class WorkerFailure:
    """A message the worker nacked: why, and which event it carried (when readable)."""

    reason: str
    event_id: str | None
    body: bytes


def _decode(body: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The message and its decoded ``content``; MessageRefused naming what is wrong."""
    try:
        message = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageRefused(f"message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise MessageRefused("message is not a JSON object")
    missing = [k for k in _REQUIRED if k not in message]
    if missing:
        raise MessageRefused(f"message misses {', '.join(missing)}")
    if message["type"] != "event":
        raise MessageRefused(f"unsupported message type {message['type']!r}")
    if not isinstance(message["applicant_id"], str) or not message["applicant_id"]:
        raise MessageRefused("applicant_id must be a non-empty string")
    if not isinstance(message["event_id"], str) or not message["event_id"]:
        raise MessageRefused("event_id must be a non-empty string")
    if not isinstance(message["synchronized"], bool) or not isinstance(message["update"], bool):
        raise MessageRefused("synchronized and update must be booleans")
    prev = message["previous_standard"]
    if prev is not None and not (isinstance(prev, str) and "--" in prev):
        raise MessageRefused("previous_standard must be a STIX id or null")
    try:
        content = json.loads(base64.b64decode(str(message["content"]), validate=True))
    except (binascii.Error, ValueError) as exc:
        raise MessageRefused(f"content is not base64 JSON: {exc}") from None
    if not isinstance(content, dict):
        raise MessageRefused("content is not a JSON object")
    if content.get("type") not in _EVENTS:
        raise MessageRefused(f"content has unsupported event type {content.get('type')!r}")
    data = content.get("data")
    if not (
        isinstance(data, dict)
        and isinstance(data.get("id"), str)
        and "--" in data["id"]
        and isinstance(data.get("type"), str)
    ):
        raise MessageRefused("content.data is not a STIX object with an id and a type")
    return message, content


def apply_event_message(store: SimStore, body: bytes) -> str | None:
    """Apply one ``type: "event"`` message to ``store``; returns the store's new event id."""
    message, content = _decode(body)
    data: dict[str, Any] = content["data"]
    event_id: str = message["event_id"]
    kind = content["type"]
    ext = (data.get("extensions") or {}).get(OCTI_EXT)
    if isinstance(ext, dict) and ext.get("is_inferred"):
        return None  # the platform never imports inferred knowledge
    if kind in ("create", "update"):
        try:
            return store.upsert(
                data,
                previous_standard=message["previous_standard"],
                event_id=event_id,
                synchronized=message["synchronized"],
            )
        except ValueError as exc:
            raise MessageRefused(f"upsert refused: {exc}") from None
    if kind == "delete":
        return store.delete(data["id"], event_id=event_id)
    context = content.get("context")
    sources = context.get("sources") if isinstance(context, dict) else None
    if not isinstance(sources, list) or not all(
        isinstance(s, dict) and isinstance(s.get("id"), str) for s in sources
    ):
        raise MessageRefused("merge without context.sources ids")
    if store.get(data["id"]) is None:
        raise MessageRefused(f"Cannot find the merge target {data['id']}")
    return store.merge(data["id"], [s["id"] for s in sources], event_id=event_id)


class PlatformWorker:
    """One consumer thread on one push queue; reconnects while the broker is away."""

    def __init__(self, store: SimStore, amqp_url: str, queue: str, *, prefetch: int = 5) -> None:
        self.store = store
        self.amqp_url = amqp_url
        self.queue = queue
        self.prefetch = prefetch
        self.failures: list[WorkerFailure] = []
        self.applied = 0
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def handled(self) -> int:
        """Messages acked or nacked so far."""
        with self.cond:
            return self.applied + len(self.failures)

    def wait_handled(self, count: int, timeout: float = 30.0) -> bool:
        """Wait until ``count`` messages were handled (True) or ``timeout`` passed (False)."""
        with self.cond:
            return self.cond.wait_for(lambda: self.applied + len(self.failures) >= count, timeout)

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> PlatformWorker:
        if not self.running():
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, daemon=True, name=f"sim-worker-{self.queue[-8:]}"
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = None
            try:
                params = pika.URLParameters(self.amqp_url)
                params.connection_attempts = 1
                params.socket_timeout = 2
                conn = pika.BlockingConnection(params)
                channel = conn.channel()
                channel.basic_qos(prefetch_count=self.prefetch)
                channel.basic_consume(self.queue, self._on_message)
                while not self._stop.is_set():
                    conn.process_data_events(time_limit=0.1)
            except (pika.exceptions.AMQPError, OSError) as exc:
                log.debug("sim worker %s: %s; reconnecting", self.queue, type(exc).__name__)
                self._stop.wait(0.2)
            finally:
                if conn is not None and conn.is_open:
                    try:
                        conn.close()
                    except (pika.exceptions.AMQPError, OSError):
                        pass

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        try:
            apply_event_message(self.store, body)
        except Exception as exc:  # whatever the import raises: nack, record, carry on
            reason = str(exc) if isinstance(exc, MessageRefused) else f"{type(exc).__name__}: {exc}"
            event_id = None
            try:
                event_id = json.loads(body).get("event_id")
            except Exception:  # noqa: S110 - unreadable bodies are recorded without an id
                pass
            channel.basic_nack(method.delivery_tag, requeue=False)
            with self.cond:
                self.failures.append(WorkerFailure(reason, event_id, body))
                self.cond.notify_all()
            log.warning("sim worker refused a message: %s", reason)
            return
        channel.basic_ack(method.delivery_tag)
        with self.cond:
            self.applied += 1
            self.cond.notify_all()
