"""The OpenCTI stream source: our own SSE loop over httpx + httpx-sse, in a reader thread.

It connects to ``{url}/stream/{id}`` (or ``/stream`` for the raw stream), sends the start
position in exactly one way (the ``from`` query parameter, never ``Last-Event-ID``: the platform
gives ``from`` priority, so a client relying on the header would restart from the old ``from``
on every reconnect), reconnects on silence, EOF, network errors, 5xx and 429 with exponential
backoff and full jitter, and stops for good on 401 / 410 and other permanent answers.

It tracks dependency groups: the platform sends a trigger's dependencies with the trigger's own
id, so an id is complete only once a later distinct id, or a heartbeat above it, has arrived. It
emits ``Complete(id)`` markers; the pipeline checkpoints only complete ids, and a reconnect
resumes after the last complete one so a partial group is re-delivered whole.

The reader never writes state: it hands items to the pipeline through a bounded queue (which
also gives TCP back-pressure), one list per network chunk to keep per-event overhead low.
"""

from __future__ import annotations

import collections
import datetime as dt
import email.utils
import logging
import queue
import random
import ssl
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from .errors import MalformedEvent, SourceRetryable, StreamGoneError
from .events import (
    DATA_EVENTS,
    ControlEvent,
    EventId,
    Quarantined,
    StreamEvent,
)
from .progress import iso_to_ms
from .sse import MAX_EVENT_BYTES, Oversized, SseBytesDecoder

__all__ = [
    "Complete",
    "Disconnected",
    "Fatal",
    "GapDetected",
    "RecoverMoved",
    "RetainedThrough",
    "SourceConfig",
    "SseSource",
    "iso_now",
    "iso_to_id",
    "same_url",
    "SseBytesDecoder",
    "tls_verify",
]

log = logging.getLogger(__name__)

_INIT_REFERERS = ("init-create", "init-dependencies")
_KNOWN_CONTROL = {"consumer_metrics", "no-recover"}
# How far before an idle heartbeat's position a reconnection starts (see _resume_point).
_HEARTBEAT_SLACK_MS = 5_000
# A first recovery's date may be this far ahead of the platform's ``Date`` (whole seconds).
_DATE_SLACK_MS = 1_000
# A retention check's short connection: it holds the reader up, so it gives up early.
_CHECK_TIMEOUT = httpx.Timeout(5.0)
_CHECK_BYTES = 1 << 20  # a larger first message is no ``connected`` (a few hundred bytes)


@dataclass(frozen=True, slots=True)
class Complete:
    """Every event received so far belongs to groups at or below ``id``, all complete, but for
    the last ``behind`` ones: a recovery's hold passed those on past its bound before this
    position was found safe (see _RecoveryHold); they stay pending."""

    id: EventId
    behind: int = 0


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection ended; events after ``resume`` will be re-delivered. ``reason``'s text
    before its first colon is the reconnect metric's ``kind``: a fixed phrase, never a value
    (each distinct label is one more series)."""

    resume: EventId | None
    reason: str


@dataclass(frozen=True, slots=True)
class GapDetected:
    """The checkpoint is older than the oldest event the platform still retains; or, with
    ``in_connection``, the stream's trimming may have passed the platform's reader during a
    connection: events after ``position`` and before ``first_event_id`` may be missing from what
    was received."""

    position: EventId
    first_event_id: EventId
    repair_recover_until: str | None
    in_connection: bool = False
    # With ``in_connection``: the position the repair resumes from, past what was lost. What
    # changed after it comes again as the repair's copies, its events before the recover date
    # are not sent.
    repair_from: EventId | None = None


@dataclass(frozen=True, slots=True)
class RetainedThrough:
    """Everything received up to ``id`` is whole: the stream's trimming overtook the platform's
    reader nowhere below it (kept in the checkpoint for the next run's first look)."""

    id: EventId


@dataclass(frozen=True, slots=True)
class RecoverMoved:
    """The first recovery's date was older than the stream's retention, before anything of it
    was complete: it recovers as of ``recover_until`` instead (nothing lost, nothing durable
    to reconcile)."""

    recover_until: str


@dataclass(frozen=True, slots=True)
class Fatal:
    error: Exception


Item = (
    StreamEvent
    | Complete
    | Disconnected
    | GapDetected
    | RecoverMoved
    | RetainedThrough
    | Fatal
    | Quarantined
    | ControlEvent
)


def _weight(items: list[Item]) -> int:
    """Bytes of event data in one message of the queue."""
    total = 0
    for item in items:
        if isinstance(item, StreamEvent):
            total += len(item.data)
        elif isinstance(item, Quarantined):
            total += len(item.raw)
    return total


class ItemQueue(queue.Queue[list[Item]]):
    """The reader's hand-over to the pipeline: full at ``count`` messages or at ``max_bytes`` of
    event data, whichever comes first. Each message weighs at least ``max_bytes / count``, so
    the count still bounds small ones; one message larger than the rest of the room gets in
    when the queue is not full (a single event is never refused)."""

    def __init__(self, count: int, max_bytes: int) -> None:
        self._floor = max(1, max_bytes // max(1, count))
        super().__init__(maxsize=max(1, max_bytes))

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._weights: collections.deque[int] = collections.deque()
        self._total = 0

    def _qsize(self) -> int:
        return self._total

    def _put(self, item: list[Item]) -> None:
        weight = max(self._floor, _weight(item))
        super()._put(item)
        self._weights.append(weight)
        self._total += weight

    def _get(self) -> list[Item]:
        self._total -= self._weights.popleft()
        return super()._get()


def is_raw_stream(stream_id: str) -> bool:
    """Whether ``stream_id`` names the raw stream (``/stream``): every event in Redis order, with
    no recovery, filters or dependencies."""
    return stream_id in ("", "raw")


@dataclass(frozen=True)
class SourceConfig:
    url: str
    token: str
    stream_id: str = "live"
    verify: bool | str = True
    listen_delete: bool = True
    no_dependencies: bool = False
    with_inferences: bool = False
    recovery_page_size: int = 500  # see _RecoveryHold
    read_timeout: float = 45.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    retention_gap: str = "repair"
    # Seconds between two looks at the stream's oldest retained event while connected (0: off).
    retention_check: float = 60.0
    queue_size: int = 256
    # And at most this many bytes of event data read ahead of the pipeline (past the first
    # message): a message count alone let 256 events of up to max_event_bytes in.
    queue_bytes: int = 16 * 1024 * 1024
    max_event_bytes: int = MAX_EVENT_BYTES


def tls_verify(verify: bool | str) -> bool | ssl.SSLContext:
    """httpx's ``verify``: True / False, or a context trusting a CA bundle file."""
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return verify


def _norm_url(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower() or "https"
    port = parts.port or (443 if scheme == "https" else 80)
    host = (parts.hostname or "").lower()
    if host in ("localhost", "::1"):
        host = "127.0.0.1"
    return scheme, host, port, parts.path.rstrip("/")


def same_url(a: str, b: str) -> bool:
    """Whether two platform base URLs designate the same endpoint (scheme, host, port, path)."""
    return _norm_url(a) == _norm_url(b)


def iso_now() -> str:
    now = dt.datetime.now(dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def iso_to_id(text: str) -> EventId | None:
    """``<ms of an ISO 8601 date>-0``, or None when the text is no date."""
    try:
        return EventId(iso_to_ms(text), 0)
    except ValueError:
        return None


class SseSource:
    """Follows one stream from a position; run ``start()`` then read ``queue``."""

    def __init__(
        self,
        config: SourceConfig,
        *,
        resume: EventId | None,
        resume_data: EventId | None = None,
        start_from: str = "0",
        recover_until: str | None = None,
        retained_through: EventId | None = None,
        client_factory: Callable[[], httpx.Client] | None = None,
    ) -> None:
        self.config = config
        self.queue: queue.Queue[list[Item]] = ItemQueue(config.queue_size, config.queue_bytes)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._response: httpx.Response | None = None
        self._platform_ms: int | None = None  # the platform's clock: its last answer's Date
        self._client_factory = client_factory or self._default_client
        # Position state, owned by the reader thread.
        self._complete: EventId | None = resume
        self._hwm: EventId | None = resume
        # The newest complete group of data events (``_complete`` may be past it: a heartbeat).
        self._data_complete: EventId | None = resume_data
        self._start_from = start_from
        self._recover_until = recover_until
        self._unknown_logged: set[str] = set()
        self._check_failed_logged = False
        # Everything received up to here is whole: no trim overtook the platform's reader below
        # it (see _observe_retention). Kept in the checkpoint, it holds across restarts.
        self._retained_through = retained_through
        self._hold: _RecoveryHold | None = None
        # Dependency events a resumed recovery re-sends at our position (see _data_event).
        self._carried: list[StreamEvent] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> SseSource:
        self._thread = threading.Thread(target=self._run, name="sse-reader", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop reading. Safe from another thread: closing the response interrupts a read."""
        self._stop.set()
        response = self._response
        if response is not None:
            try:
                response.close()
            except Exception:  # noqa: BLE001 - best effort while tearing down
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _default_client(self) -> httpx.Client:
        timeout = httpx.Timeout(10.0, read=self.config.read_timeout)
        return httpx.Client(
            timeout=timeout, verify=tls_verify(self.config.verify), follow_redirects=False
        )

    # -- request ---------------------------------------------------------------------------

    def _url(self) -> str:
        base = self.config.url.rstrip("/")
        if is_raw_stream(self.config.stream_id):
            return f"{base}/stream"
        return f"{base}/stream/{self.config.stream_id}"

    def request_params(self) -> dict[str, str]:
        """Query parameters for the next connection (the position goes only here)."""
        params: dict[str, str] = {}
        point = self._resume_point()
        params["from"] = str(point) if point is not None else self._start_from
        if not is_raw_stream(self.config.stream_id):
            if self._recover_until:
                params["recover"] = self._recover_until
            params["listen-delete"] = "true" if self.config.listen_delete else "false"
            params["no-dependencies"] = "true" if self.config.no_dependencies else "false"
            params["with-inferences"] = "true" if self.config.with_inferences else "false"
        return params

    def _resume_point(self) -> EventId | None:
        """Where the next connection starts: the position, or up to ``_HEARTBEAT_SLACK_MS``
        before it when that is an idle heartbeat's (never before the newest data group, when
        one is known).

        A heartbeat id is the platform node's clock, an event id Redis's: an event appended in
        the heartbeat's millisecond, or by a Redis whose clock runs behind, sorts at or below
        it, and the platform reads strictly after ``from``. Starting a little earlier delivers
        such an event; nothing received is re-sent, since no data group lies in between.
        """
        complete, data = self._complete, self._data_complete
        if complete is None or self._recovering(complete):
            return complete
        if data is not None and complete <= data:
            return complete
        back = EventId(max(complete.ms - _HEARTBEAT_SLACK_MS, 0), 0)
        return min(complete, max(back, data) if data is not None else back)

    def _recovering(self, position: EventId) -> bool:
        if is_raw_stream(self.config.stream_id):
            # No recovery there (``recover`` is not sent): a gap repair's date only tells the
            # retention check what was seen, and the log is replayed in order.
            return False
        recover_id = iso_to_id(self._recover_until) if self._recover_until else None
        return recover_id is not None and position <= recover_id

    # -- the loop --------------------------------------------------------------------------

    def _emit(self, items: list[Item], *, final: bool = False) -> None:
        # A final report is delivered even while stopping (the pipeline drains the queue).
        deadline = 30.0
        while final or not self._stop.is_set():
            try:
                self.queue.put(items, timeout=0.5)
                return
            except queue.Full:
                deadline -= 0.5
                if final and deadline <= 0:
                    return

    def _run(self) -> None:
        attempt = 0
        try:
            client = self._client_factory()
        except Exception as exc:  # noqa: BLE001 - a bad TLS setting: said, and the run stops
            log.exception("Stream reader failed.")
            self._emit([Fatal(exc)], final=True)
            return
        try:
            while not self._stop.is_set():
                at_start, asked = self._complete, False
                reason = ""
                try:
                    self._connect_once(client)
                    reason = "stream ended (EOF)"
                except StreamGoneError as exc:
                    self._emit([Fatal(exc)], final=True)
                    return
                except _GapFail as exc:
                    self._emit([*exc.pending, Fatal(exc.error)], final=True)
                    return
                except (httpx.TransportError, SourceRetryable) as exc:
                    if _tls_verify_failed(exc):
                        # A certificate that does not verify will not start verifying by itself.
                        gone = StreamGoneError(
                            0,
                            f"TLS certificate verification failed for {self.config.url}: "
                            "set OPENCTI_CA_BUNDLE to the platform's CA (or fix the certificate)",
                        )
                        self._emit([Fatal(gone)], final=True)
                        return
                    reason = _describe(exc)
                except httpx.StreamError as exc:
                    reason = f"stream error: {exc}"
                except _Reconnect as exc:
                    self._emit(exc.pending)
                    reason = exc.reason
                    asked = True  # reconnect at once
                if self._stop.is_set():
                    return
                hold, self._hold = self._hold, None
                self._carried = []  # re-sent again on the next connection
                if hold is not None:
                    # What the recovery sent past the last safe position was never passed on.
                    self._complete, self._data_complete = hold.released
                # Whatever was pending beyond the last complete group will be re-sent.
                self._hwm = self._complete
                self._emit([Disconnected(self._complete, reason)])
                # The backoff starts again only after a connection that moved the position: one
                # cut each time inside the same group (a proxy's byte limit under a large
                # group) delivers every time and would otherwise reconnect at once, forever.
                attempt = 0 if asked or self._complete != at_start else attempt + 1
                delay = (
                    0.0
                    if attempt == 0
                    else random.uniform(
                        0,
                        min(
                            self.config.backoff_max,
                            self.config.backoff_initial * 2 ** (attempt - 1),
                        ),
                    )
                )
                log.warning(
                    "Stream reconnecting.",
                    extra={
                        "reason": reason,
                        "attempt": attempt,
                        "delay_secs": round(delay, 2),
                        "resume_event_id": str(self._complete) if self._complete else None,
                    },
                )
                if delay:
                    self._stop.wait(delay)
        except Exception as exc:  # noqa: BLE001 - the reader must report, never die silently
            log.exception("Stream reader failed.")
            self._emit([Fatal(exc)], final=True)
        finally:
            client.close()

    def _connect_once(self, client: httpx.Client) -> None:
        """One connection; what it moved ``_complete`` to decides the next backoff (``_run``),
        also when it ends in an error."""
        headers = {
            "Authorization": f"Bearer {self.config.token}",
            "Accept": "text/event-stream",
            "Cache-Control": "no-cache",
        }
        params = self.request_params()
        log.info("Stream connecting.", extra={"url": self._url(), "params": params})
        with client.stream("GET", self._url(), params=params, headers=headers) as response:
            self._response = response
            self._platform_ms = _date_ms(response.headers.get("date"))
            try:
                self._check_status(response)
                decoder = SseBytesDecoder(self.config.max_event_bytes)
                recover_id = iso_to_id(self._recover_until) if self._recover_until else None
                hold = None
                # The raw stream has no recovery (``recover`` is not even sent): its replay is
                # Redis ids in order, each group complete as it comes. Nothing to hold there.
                if recover_id is not None and not is_raw_stream(self.config.stream_id):
                    hold = _RecoveryHold(
                        recover_id,
                        self._complete,
                        self._data_complete,
                        self.config.recovery_page_size,
                    )
                self._hold = hold
                arrived = time.monotonic()
                check = self.config.retention_check
                due = arrived + check
                for chunk in response.iter_bytes():
                    now = time.monotonic()
                    if now - arrived > self.config.read_timeout:
                        # Not read for longer than a silent stream may last (back-pressure from
                        # a slow sink, a stopped process). The platform's reader waited on us
                        # meanwhile; were its stream trimmed past our position, it would go on
                        # from its oldest entry without a word. Reconnect before taking any of
                        # it: the connect-time retention check sees such a gap.
                        raise _Reconnect(f"reader stalled: not read for {now - arrived:.0f} s", [])
                    arrived = now
                    out: list[Item] = []
                    holding = hold is not None
                    for name, id_text, data in decoder.feed(chunk):
                        if hold is None:
                            self._handle(name, id_text, data, out)
                            continue
                        items: list[Item] = []
                        self._handle(name, id_text, data, items)
                        if self._recover_until is None:  # no-recover: nothing to hold
                            hold.done = True
                        out.extend(hold.feed(items, self._complete, self._data_complete))
                        if hold.done:
                            hold = self._hold = None
                    if out:
                        if not holding or len(out) <= _EMIT_ITEMS:
                            self._emit(out)
                        else:
                            # A recovery's hold can let go of thousands of items at once: in
                            # slices, as the network gives them, so that batches still rotate
                            # at their limits (the pipeline writes between two hand-overs).
                            for start in range(0, len(out), _EMIT_ITEMS):
                                self._emit(out[start : start + _EMIT_ITEMS])
                    if check > 0 and now >= due:
                        first = self._first_retained(client, headers)
                        if first is not None:
                            out = []
                            self._observe_retention(first, out)
                            if out:
                                self._emit(out)
                        due = time.monotonic() + check
                    if self._stop.is_set():
                        break
            finally:
                self._response = None

    # -- retention during a connection ----------------------------------------------------

    def _retained_floor(self) -> EventId | None:
        """The position the stream must still hold for nothing to be lost: the last complete
        group, or a recovery's live start when later. None before anything is complete and
        with no recovery: a replay from ``from`` takes the log from its oldest entry, and what
        is trimmed ahead of a reader starting there is below any position it held."""
        position = self._complete
        if position == EventId(0, 0):
            position = None
        recover_id = iso_to_id(self._recover_until) if self._recover_until else None
        if recover_id is not None and recover_id <= (_opt_id(self._start_from) or EventId(0, 0)):
            recover_id = None  # no recovery: the stream replays its log from ``from``
        points = [p for p in (position, recover_id) if p is not None]
        return max(points) if points else None

    def _observe_retention(self, first: EventId, out: list[Item]) -> None:
        """The stream's oldest retained event is ``first`` now (on connecting, and at each
        retention check): a gap when a trim may have overtaken the platform's reader since the
        last look; otherwise everything received so far is whole.

        The platform reads its stream for us from a cursor at or past our position, waiting on
        us while we are slower (back-pressure). Trimmed past that cursor, its read goes on from
        the oldest entry without a word (protocol doc §7): a reader slower than the platform
        writes (a slow target) loses events mid-connection, where the position the connection
        started from shows nothing. A trim that passed an entry before it was sent leaves the
        oldest retained event above that entry for good. So an oldest event at or below the
        position held at the last look proves nothing received since was lost; above it, some
        may have been: a gap from that position."""
        floor = self._retained_through
        if floor is not None and first > floor:
            log.error(
                "Stream retention passed the reader during a connection: events may have been "
                "lost on the platform side.",
                extra={"position_event_id": str(floor), "first_event_id": str(first)},
            )
            if self.config.retention_gap != "repair":
                gap = StreamGoneError(
                    0,
                    f"the platform trimmed its stream past {floor} while this connector read "
                    f"it (oldest retained event now {first}); set connector.retention_gap="
                    "repair to re-snapshot",
                )
                out.append(GapDetected(floor, first, None, in_connection=True))
                raise _GapFail(gap, out)
            self._recover_until = iso_now()
            gap_found = GapDetected(
                floor, first, self._recover_until, in_connection=True, repair_from=self._complete
            )
            out.append(gap_found)
            self._repairing(first, out)
            raise _Reconnect("retention gap: reconnecting in recover mode", out)
        through = self._retained_floor()
        if through is not None and (floor is None or through > floor):
            self._retained_through = through
            out.append(RetainedThrough(through))

    def _repairing(self, first: EventId, out: list[Item]) -> None:
        """A gap's repair, or a first recovery moved (recover as of now), covers everything
        before its date: the next look compares with that."""
        self._retained_through = repaired = self._retained_floor() or first
        out.append(RetainedThrough(repaired))

    def _first_retained(self, client: httpx.Client, headers: dict[str, str]) -> EventId | None:
        """The oldest event id the stream retains now, from the ``connected`` message of a
        second, short connection to it (closed once that is read); None when it does not say
        (said once in the log: until it does, the next look compares with the same position)."""
        try:
            with client.stream("GET", self._url(), headers=headers, timeout=_CHECK_TIMEOUT) as r:
                if r.status_code != 200:
                    why = f"HTTP {r.status_code} {r.reason_phrase or ''}".strip()
                else:
                    name, data = _first_message(r)
                    first = _first_event_id(name, data)
                    if first is not None:
                        return first
                    why = f"first message {name[:40]!r}, without firstEventId"
        except httpx.HTTPError as exc:
            why = _describe(exc)
        if not self._check_failed_logged:
            self._check_failed_logged = True
            log.warning("Stream retention check failed.", extra={"error": why})
        return None

    def _check_status(self, response: httpx.Response) -> None:
        status = response.status_code
        if status == 200:
            ctype = response.headers.get("content-type", "")
            if "text/event-stream" not in ctype:
                raise SourceRetryable(f"expected text/event-stream, got {ctype!r}")
            return
        reason = response.reason_phrase or ""
        if status == 429 or status >= 500:
            raise SourceRetryable(f"HTTP {status} {reason}".strip())
        if status == 401 and not reason:
            reason = "unauthorized (check OPENCTI_TOKEN and the stream id)"
        raise StreamGoneError(status, reason)

    # -- message handling ------------------------------------------------------------------

    def _handle(self, name: str, id_text: str, data: bytes, out: list[Item]) -> None:
        if isinstance(data, Oversized):
            reason = (
                f"message of {data.size} bytes, over connector.max_event_bytes "
                f"({self.config.max_event_bytes}); its first {len(data)} bytes are kept here"
            )
            self._quarantine(id_text, name, data, reason, out)
            return
        if name in DATA_EVENTS:
            self._data_event(name, id_text, data, out)
        elif name == "heartbeat":
            hb = self._position(id_text)
            if hb is None or self._in_recovery(hb):
                return
            if self._hwm is None or hb > self._hwm:
                self._complete_position(hb, out)
                out.append(Complete(hb))
        elif name == "connected":
            self._connected(data, out)
        elif name in _KNOWN_CONTROL:
            pos = self._position(id_text)
            if name == "no-recover":
                log.warning("The platform refuses recovery for this stream; continuing live.")
                self._recover_until = None
            elif (
                pos is not None
                and not self._in_recovery(pos)
                and (self._hwm is None or pos > self._hwm)
            ):
                # consumer_metrics carries a position like a heartbeat does.
                self._complete_position(pos, out)
                out.append(Complete(pos))
            out.append(ControlEvent(name, pos))
        else:
            self._unknown(name, id_text, data, out)

    def _in_recovery(self, position: EventId) -> bool:
        """A heartbeat-like position inside a recovery under way: the last id the platform sent,
        no more. Its ids go back and forth, so it completes nothing; and it is above every id
        taken in when that event was quarantined (its later ids below it were then dropped as
        re-sent). The recovery's groups are completed by later ids or its end."""
        hold = self._hold
        return hold is not None and position <= hold.recover_id

    def _complete_position(self, position: EventId, out: list[Item]) -> None:
        """A heartbeat-like position past ``_hwm``: it also completes a pending data group (and
        the dependency events carried, in a group of its own, see _data_event)."""
        if self._hwm is not None and self._hwm != self._complete:
            self._data_complete = self._hwm
        if self._carried:
            self._carry_into(position, out)
            self._data_complete = position
        self._hwm = self._complete = position

    def _carry_into(self, group: EventId, out: list[Item]) -> None:
        # Archived under the group's id, as a dependency is under its trigger's: kept under
        # their own id, at or below the previous group's, they read as going backwards (verify
        # warns of a late event where a segment started at the group). They are the objects as
        # sent now, so the later id is the truer one too.
        text = str(group)
        for carried in self._carried:
            carried.id = carried.group = group
            carried.id_text = text
            out.append(carried)
        self._carried = []

    def _position(self, id_text: str) -> EventId | None:
        try:
            return EventId.parse(id_text)
        except ValueError:
            log.warning(
                "Ignoring a control message with a malformed id.", extra={"id": id_text[:64]}
            )
            return None

    def _quarantine(
        self, id_text: str, name: str, data: bytes, reason: str, out: list[Item]
    ) -> None:
        after = self._complete or self._hwm or EventId(0, 0)
        text = data.decode("utf-8", "backslashreplace")  # keeps undecodable bytes visible
        out.append(Quarantined(after, id_text[:200], name[:200], text, reason))

    def _data_event(self, name: str, id_text: str, data: bytes, out: list[Item]) -> None:
        try:
            ev = StreamEvent.from_sse(id_text, name, data)
        except MalformedEvent as exc:
            self._quarantine(id_text, name, data, exc.reason, out)
            return
        hwm = self._hwm
        if hwm is None or ev.id > hwm:
            if hwm is not None and hwm != self._complete:
                self._complete = self._data_complete = hwm
                out.append(Complete(hwm))
            self._hwm = hwm = ev.id
            if self._carried:
                self._carry_into(hwm, out)
        elif hwm == self._complete:
            late = self._data_complete
            if (late is None or late < ev.id) and not self._recovering(ev.id):
                # At or below an idle heartbeat's position, above every data group (or before
                # the first: a new collection nothing matched yet): the heartbeat came from the
                # node's clock, this id from Redis's (same millisecond, or a clock behind).
                # New, not a re-send: a group of its own.
                ev.group = ev.id
                out.append(ev)
                if not ev.synthetic:
                    self._data_complete = ev.id
                    out.append(Complete(ev.id))
                return
            # This id's group is already complete (and may be durable): a re-sent recovery
            # object at or below our position is covered by it; anything else is out of order.
            if ev.referer == "init-dependencies" and self._recovering(hwm):
                # But not a dependency a recovery resumed inside it re-sends at our position
                # (past the recover point, a recovery re-sent from the heartbeat slack before
                # it is all covered: what changed since comes live, even when cached): it goes
                # with the object re-sent there (recovering ``updated_at >= from``), and may be
                # another object, changed after the position, that this connection now counts
                # as sent (the platform's cache) and never sends again. Skipped, it was lost:
                # not durable (the kill or cut came before it), never re-sent. It goes on in
                # the next group, whose id is above the position (the archive skips groups at
                # or below its tail). Held until then: one object's dependencies, unbounded.
                self._carried.append(ev)
                return
            if ev.synthetic:
                log.debug(
                    "Skipping a re-sent event at or below the position.",
                    extra={"event_id": id_text},
                )
                return
            self._quarantine(
                id_text,
                name,
                data,
                f"event id {id_text} goes backwards (at or below the completed {hwm})",
                out,
            )
            return
        elif ev.id < hwm and not ev.synthetic:
            self._quarantine(
                id_text, name, data, f"event id {id_text} goes backwards (after {hwm})", out
            )
            return
        ev.group = hwm
        out.append(ev)
        if ev.id == hwm and not ev.synthetic:
            # A live event is sent after its dependencies, which share its id, and a live id is
            # never reused: its group is complete now. (Recovery ids can repeat, and dependency
            # events precede their trigger, so those wait for a later id or a heartbeat.)
            self._complete = self._data_complete = hwm
            out.append(Complete(hwm))

    def _connected(self, data: bytes, out: list[Item]) -> None:
        try:
            info: dict[str, Any] = orjson.loads(data)
        except orjson.JSONDecodeError:
            info = {}
        if not isinstance(info, dict):
            info = {}
        first = _opt_id(info.get("firstEventId"))
        if first is None:
            return
        self._check_position(first, out)
        self._observe_retention(first, out)

    def _check_position(self, first: EventId, out: list[Item]) -> None:
        """On connecting: the position this connection starts from must still be retained."""
        position = self._complete
        recover_id = iso_to_id(self._recover_until) if self._recover_until else None
        if position is None or position == EventId(0, 0):
            # Nothing complete yet: a first run's recovery, whose live part starts at its
            # recover date. A date the stream no longer holds (a first run refused, started
            # again weeks later; a recover date given too old) would lose what changed between
            # it and the oldest retained event. Nothing is durable yet: recover as of now.
            start = _opt_id(self._start_from) or EventId(0, 0)
            if recover_id is None or recover_id <= start:
                return  # not a recovery: the stream replays its log from ``from``
            platform = self._platform_ms
            if recover_id < first:
                log.warning(
                    "The first recovery's date is older than the stream's retention: "
                    "recovering as of now instead.",
                    extra={"recover_until": self._recover_until, "first_event_id": str(first)},
                )
                now = iso_to_ms(iso_now()) if platform is None else platform
                # Past the oldest retained event: the platform's Date has whole seconds, and a
                # stream trimmed within one (a busy platform keeping few events) would be out of
                # it again, connection after connection.
                self._recover_until = _iso(max(now, first.ms + 1))
            elif platform is not None and recover_id.ms > platform + _DATE_SLACK_MS:
                # Read against the platform's clocks: its live part starts after that date,
                # and what it writes until the date comes is in neither part.
                log.warning(
                    "The first recovery's date is ahead of the platform's clock (this machine's "
                    "runs ahead of it): recovering as of the platform's date instead.",
                    extra={"recover_until": self._recover_until, "platform_date": _iso(platform)},
                )
                self._recover_until = _iso(platform)
            else:
                return
            out.append(RecoverMoved(self._recover_until))
            self._repairing(first, out)  # a look before compared with the older date
            raise _Reconnect("recover date out of the stream: recovering as of now", out)
        effective = max(position, recover_id) if recover_id is not None else position
        if effective >= first:
            return
        log.error(
            "Stream retention passed the checkpoint: events were lost on the platform side.",
            extra={"checkpoint_event_id": str(position), "first_event_id": str(first)},
        )
        if self.config.retention_gap == "fail":
            gap = StreamGoneError(
                0,
                f"checkpoint {position} is older than the platform's oldest retained event "
                f"{first}; set connector.retention_gap=repair to re-snapshot",
            )
            out.append(GapDetected(position, first, None))
            raise _GapFail(gap, out)
        # Repair: reconnect with from=<checkpoint>&recover=<now> so the database snapshot
        # re-sends everything that changed since the checkpoint.
        self._recover_until = iso_now()
        out.append(GapDetected(position, first, self._recover_until))
        self._repairing(first, out)
        raise _Reconnect("retention gap: reconnecting in recover mode", out)

    def _unknown(self, name: str, id_text: str, data: bytes, out: list[Item]) -> None:
        try:
            parsed = orjson.loads(data) if data else None
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("data"), dict):
            self._quarantine(id_text, name, data, f"unknown event name {name[:64]!r}", out)
            return
        if name not in self._unknown_logged:
            self._unknown_logged.add(name)
            log.warning("Skipping an unknown control event.", extra={"event": name[:64]})


_EMIT_ITEMS = 64  # items per hand-over to the pipeline, at most, when a recovery's hold lets go
_HOLD_BYTES = 8 * 1024 * 1024  # a recovery's data held back at most (see _RecoveryHold)


class _RecoveryHold:
    """Holds back a recovery's items until the position before them is safe to resume from.

    The platform lists its recovery snapshot by ``updated_at`` in pages of at most
    ``page_size`` objects (``connector.live_stream_recovery_page_size``: the platform's
    ``elasticsearch:default_pagination_result``, default 500), but sends each page in the order
    an unsorted search gives it (``storeLoadByIdsWithRefs``), each object with the id
    ``<updated_at ms>-0``: within a page the ids go back and forth. A later id then does not
    mean the earlier ones are all in; a position taken there and resumed from (``from=<it>``,
    recovering ``updated_at >= it``) would
    lose the objects of the page still to come below it.

    So a recovery's items (in their order, ``Complete`` markers included) are passed on only up
    to the last marker ``X`` below both every id received after it (a lower one voids it) and
    the lowest of the last ``page_size`` recovered ids (anything still to come is in this
    page or a later one, hence not below that). Past the recovery (an id beyond the recover
    point) everything is passed on. ``released`` is the position (complete, data complete) of
    what was passed on: the source goes back to it when the connection ends.

    Held data is bounded by ``max_bytes`` (a report of 100,000 objects is that many dependency
    events under one id): past it, the items held go on without their markers, which are not
    safe positions yet. The pipeline keeps such events pending (spilled to its work dir when
    large). The markers stay candidates: one found safe later goes on as ``Complete(id,
    behind)``, ``behind`` being the events passed on after it (a page larger than the bound
    would otherwise overflow again before any marker is found safe: no position for the
    whole recovery).
    """

    def __init__(
        self,
        recover_id: EventId,
        complete: EventId | None,
        data: EventId | None,
        page_size: int,
        max_bytes: int = _HOLD_BYTES,
    ) -> None:
        self.recover_id = recover_id
        self.page_size = page_size
        self.max_bytes = max_bytes
        self._bytes = 0  # data bytes of the events held (quarantined ones too)
        self.released: tuple[EventId | None, EventId | None] = (complete, data)
        self.done = False
        self._items: list[Item] = []
        self._passed = 0  # items passed on so far (mark positions count from the first item)
        self._events_in = 0  # events taken in so far
        self._events_passed = 0  # events passed on so far
        # Live markers, ids ascending: their id, the items up to and including them, and the
        # source's (complete, data complete) position right after them.
        self._mark_ids: list[EventId] = []
        self._mark_ends: list[int] = []
        self._mark_events: list[int] = []  # the events taken in up to them
        self._mark_positions: list[tuple[EventId | None, EventId | None]] = []
        self._window: deque[EventId] = deque()  # the last recovered (init-create) ids
        self._mins: deque[EventId] = deque()  # their sliding minimum (non-decreasing)

    def feed(self, items: list[Item], complete: EventId | None, data: EventId | None) -> list[Item]:
        """One message's items, and the source's position after it: returns what may go on."""
        marks = self._mark_ids
        for index, item in enumerate(items):
            position = item.id if isinstance(item, (StreamEvent, Complete)) else None
            if self.done or (position is not None and position > self.recover_id):
                # The live part (or no recovery after all): everything held is safe now.
                self.done = True
                out = self._items + items[index:]
                self._items, self._bytes = [], 0
                self._drop_marks(len(marks))
                self.released = (complete, data)
                return out
            if isinstance(item, StreamEvent):
                while marks and marks[-1] >= item.id:
                    # An id at or below it came after it: resuming there would skip this one.
                    # Its Complete item goes too, not only the candidate: left among the items
                    # held, it went on with them once a later marker was found safe (or the
                    # recovery ended), and the pipeline could checkpoint there (a flush between
                    # two hand-overs) with this event pending after it, then skipped as re-sent
                    # on resuming. Later markers were popped first, so no kept end moves.
                    held = self._mark_ends[-1] - 1 - self._passed
                    if held >= 0:  # else it went by in an overflow, without its marker
                        del self._items[held]
                    marks.pop()
                    self._mark_ends.pop()
                    self._mark_events.pop()
                    self._mark_positions.pop()
                if item.referer == "init-create":
                    self._window.append(item.id)
                    while self._mins and self._mins[-1] > item.id:
                        self._mins.pop()
                    self._mins.append(item.id)
                    if len(self._window) > self.page_size and (
                        self._window.popleft() == self._mins[0]
                    ):
                        self._mins.popleft()
            self._items.append(item)
            self._bytes += _weight([item])
            if isinstance(item, StreamEvent):
                self._events_in += 1
            if isinstance(item, Complete):
                marks.append(item.id)
                self._mark_ends.append(self._passed + len(self._items))
                self._mark_events.append(self._events_in)
                self._mark_positions.append((complete, data))
        if self._bytes > self.max_bytes:
            return self._overflow()
        if len(self._window) < self.page_size:
            return []  # the first page may still be under way: no id is safe yet
        safe = bisect_left(marks, self._mins[0])  # the marks below every id still to come
        if not safe:
            return []
        count = self._mark_ends[safe - 1] - self._passed
        self.released = self._mark_positions[safe - 1]
        if count <= 0:
            # Its marker went by in an overflow: the events passed on since are not covered.
            behind = self._events_passed - self._mark_events[safe - 1]
            gone: list[Item] = [Complete(marks[safe - 1], behind)]
            self._drop_marks(safe)
            return gone
        self._drop_marks(safe)
        out = self._items[:count]
        del self._items[:count]
        self._passed += count
        self._events_passed += sum(1 for i in out if isinstance(i, StreamEvent))
        self._bytes -= _weight(out)
        return out

    def _drop_marks(self, n: int) -> None:
        del self._mark_ids[:n], self._mark_ends[:n], self._mark_events[:n]
        del self._mark_positions[:n]

    def _overflow(self) -> list[Item]:
        """Everything held goes on, less its markers (none is safe yet: ``released`` stays);
        the markers stay candidates (see ``behind``)."""
        out: list[Item] = [i for i in self._items if not isinstance(i, Complete)]
        self._passed += len(self._items)
        self._events_passed += sum(1 for i in out if isinstance(i, StreamEvent))
        self._items, self._bytes = [], 0
        return out


class _Reconnect(Exception):
    """Internal: end this connection and reconnect at once (items already produced go first)."""

    def __init__(self, reason: str, pending: list[Item]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.pending = pending


class _GapFail(Exception):
    """Internal: a retention gap with ``retention_gap=fail``."""

    def __init__(self, error: StreamGoneError, pending: list[Item]) -> None:
        super().__init__(str(error))
        self.error = error
        self.pending = pending


def _first_message(response: httpx.Response) -> tuple[str, bytes]:
    """The name and data of a stream's first message; ``("", b"")`` when it ends before one."""
    decoder = SseBytesDecoder(_CHECK_BYTES)
    for chunk in response.iter_bytes():
        for name, _, data in decoder.feed(chunk):
            return name, data
    return "", b""


def _first_event_id(name: str, data: bytes) -> EventId | None:
    """``firstEventId`` of a ``connected`` message; None for any other message."""
    if name != "connected" or isinstance(data, Oversized):
        return None
    try:
        info = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return _opt_id(info.get("firstEventId")) if isinstance(info, dict) else None


def _opt_id(value: object) -> EventId | None:
    if isinstance(value, str):
        try:
            return EventId.parse(value)
        except ValueError:
            return None
    return None


def _date_ms(value: str | None) -> int | None:
    """An HTTP ``Date`` header in epoch milliseconds (None when absent or unreadable)."""
    if not value:
        return None
    try:
        return int(email.utils.parsedate_to_datetime(value).timestamp() * 1000)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _iso(ms: int) -> str:
    return (
        dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def _tls_verify_failed(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.ReadTimeout):
        return "silent stream: no message within the read timeout"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {exc}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"connection dropped: {exc}"
    return f"{type(exc).__name__}: {exc}"
