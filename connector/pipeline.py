"""The one loop: stream items → batch of whole groups → every sink durable → checkpoint.

Data flows one way. ``Pipeline.run`` takes items from the source's queue, keeps pending events
until their dependency group is complete, cuts batches by count, bytes and age (age is checked
on every wake-up, so a quiet stream still flushes), writes each batch to every sink with
retries, and only then saves the checkpoint. This module is the only caller of
``CheckpointStore.save``.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import metrics
from .checkpoint import Checkpoint, CheckpointStore
from .errors import CannotReconcile, ConnectorError, PermanentError, RetryableError
from .events import ControlEvent, EventId, Quarantined, StreamEvent
from .pending import PendingEvents
from .reconcile import archived_counts, count_event, reconcile_group
from .sink import Batch, Bounded, Sink
from .source import (
    Complete,
    Disconnected,
    Fatal,
    GapDetected,
    Item,
    RecoverMoved,
    RetainedThrough,
    SseSource,
    iso_to_id,
)
from .storage import Storage
from .watchdog import watched

__all__ = [
    "BatchPolicy",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "Pipeline",
    "ShutdownTimeout",
    "StopEvent",
    "write_with_retry",
    "retry_call",
]

log = logging.getLogger(__name__)

# CONNECTOR_SHUTDOWN_TIMEOUT_SECS's default: how long retries go on once ``stop`` is set.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0


class StopEvent(threading.Event):
    """The run's stop signal (SIGTERM), remembering when it came: the shutdown timeout counts
    from the signal, not from the end of the write under way then (a slow target can spend
    minutes on one batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.set_at: float | None = None

    def set(self) -> None:
        if self.set_at is None:
            self.set_at = time.monotonic()
        super().set()


def _stopped_at(stop: threading.Event) -> float:
    """When ``stop`` was set: its own record (``StopEvent``), else now."""
    at = getattr(stop, "set_at", None)
    return at if isinstance(at, float) else time.monotonic()


@dataclass(frozen=True)
class BatchPolicy:
    max_events: int = 20_000
    max_bytes: int = 16 * 1024 * 1024
    max_age_secs: float = 10.0


@dataclass(frozen=True)
class _Archived:
    """What the archive sink stored for one batch, and the highest group it holds after it."""

    events: int
    segments: list[str]
    tail: EventId | None
    quarantined: int | None = None  # records it stored (None: no archive sink)
    tail_segment: str | None = None  # the segment holding ``tail``
    # Segments (and their events) an earlier run stored past the checkpoint, first seen now.
    adopted_segments: int = 0
    adopted_events: int = 0


class ShutdownTimeout(ConnectorError):
    """The drain did not finish within the shutdown timeout; the checkpoint was not moved."""


def _sleep_backoff(
    attempt: int, initial: float, cap: float, stop: threading.Event, deadline: float | None
) -> None:
    delay = random.uniform(0, min(cap, initial * 2 ** max(0, attempt - 1)))
    if deadline is not None:
        delay = min(delay, max(0.0, deadline - time.monotonic()))
    # While stopping we still wait (bounded by the deadline) instead of spinning.
    if stop.is_set():
        time.sleep(delay)
    else:
        stop.wait(delay)


def retry_call(
    fn: Callable[[], None],
    *,
    stage: str,
    stop: threading.Event,
    initial: float = 1.0,
    cap: float = 60.0,
    deadline: Callable[[], float | None] = lambda: None,
    describe: str = "",
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
) -> None:
    """Call ``fn`` until it succeeds; ``RetryableError`` is retried with full-jitter backoff
    and no attempt limit, anything else propagates. Past the shutdown deadline it gives up.

    The deadline is ``deadline()`` or, once ``stop`` is set, ``shutdown_timeout`` after this
    call first saw it set, whichever comes first: a stop never waits on an unbounded retry."""
    attempt = 0
    stopping: float | None = None
    while True:
        try:
            with watched(stage, describe):
                fn()
            return
        except RetryableError as exc:
            attempt += 1
            metrics.RETRIES.labels(stage, type(exc).__name__).inc()
            limit = deadline()
            if stop.is_set():
                if stopping is None:
                    stopping = _stopped_at(stop)
                grace = stopping + shutdown_timeout
                limit = grace if limit is None else min(limit, grace)
            if limit is not None and time.monotonic() >= limit:
                raise ShutdownTimeout(
                    f"{stage}: gave up at shutdown after {attempt} attempts: {exc}"
                ) from exc
            log.warning(
                "Write failed; retrying.",
                extra={"stage": stage, "target": describe, "attempt": attempt, "error": str(exc)},
            )
            _sleep_backoff(attempt, initial, cap, stop, limit)


def write_with_retry(
    sinks: Sequence[Sink],
    batch: Batch,
    *,
    stop: threading.Event,
    initial: float = 1.0,
    cap: float = 60.0,
    deadline: Callable[[], float | None] = lambda: None,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    guard: Callable[[], None] = lambda: None,
) -> None:
    """Every sink makes the batch durable; a failing sink is retried alone (the others already
    hold the batch, and writing it again would be harmless anyway). ``guard`` runs before each
    attempt (see ``Pipeline.guard``)."""

    def attempt(sink: Sink) -> None:
        guard()
        sink.write(batch)

    for sink in sinks:
        retry_call(
            lambda sink=sink: attempt(sink),  # type: ignore[misc]
            stage="sending",
            stop=stop,
            initial=initial,
            cap=cap,
            deadline=deadline,
            describe=sink.name,
            shutdown_timeout=shutdown_timeout,
        )


class Pipeline:
    """Runs the stream into the sinks until stopped. See the module docstring."""

    def __init__(
        self,
        *,
        source: SseSource,
        sinks: Sequence[Sink],
        store: CheckpointStore,
        checkpoint: Checkpoint,
        policy: BatchPolicy,
        stop: threading.Event,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        shutdown_timeout: float = 30.0,
        on_position: Callable[[EventId], None] | None = None,
        reconciler: Callable[[EventId, EventId | None], Iterable[list[StreamEvent]]] | None = None,
        guard: Callable[[], None] = lambda: None,
        spill_dir: Path | None = None,
        spill_bytes: int = 0,
    ) -> None:
        self.source = source
        self.sinks = list(sinks)
        self.store = store
        self.checkpoint = checkpoint
        self.policy = policy
        self.stop = stop
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.shutdown_timeout = shutdown_timeout
        # Told every durable position: a batch's last group, or a heartbeat's when idle.
        self.on_position = on_position
        self.reconciler = reconciler
        # Called before every sink write and checkpoint save; raises when this run may no
        # longer write (``run_lease.RunLease.check``: another run took the archive over).
        self.guard = guard
        for sink in self.sinks:
            if isinstance(sink, Bounded):
                # A write waiting on its target (a broker gone silent) ends by the deadline,
                # where the retries end: the stop is not held past it.
                sink.deadline = self._shutdown_deadline
        # Past ``spill_bytes`` of pending data, on disk in ``spill_dir`` (a huge dependency group).
        self._pending = PendingEvents(spill_dir, spill_bytes)
        self._spill = (spill_dir, spill_bytes)
        self._received: Counter[str] = Counter()
        self._groups: list[EventId] = []
        self._quarantined: list[Quarantined] = []
        # Their data's length: a batch goes out at max_bytes with them too, so a stream whose
        # events are all quarantined is not held until max_age_secs.
        self._quarantined_bytes = 0
        self._complete_n = 0
        self._complete_id: EventId | None = None
        self._oldest: float | None = None
        self._deadline: float | None = None
        self._reconcile_at = 0.0  # monotonic time before which a failed reconcile is not retried
        self._reconciled_at: EventId | None = None  # the last group a reconciliation wrote
        last = checkpoint.last_event_id
        self._saved_id: EventId | None = EventId.parse(last) if last else None
        if self._saved_id is not None:
            # The lag counts from the checkpoint found at start-up: a connector that restarts and
            # cannot reach the platform must not report a lag of 0.
            metrics.CHECKPOINT_TIMESTAMP.set(self._saved_id.ms / 1000)
        # Progress counts from here: the healthcheck's clock while a recovery makes the lag moot.
        metrics.CHECKPOINT_SAVED.set_to_current_time()
        self._segment_last: EventId | None = (
            EventId.parse(checkpoint.last_segment_last_id)
            if checkpoint.last_segment_last_id
            else None
        )

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Until ``stop`` is set or the source fails for good. Always drains before returning."""
        self.source.start()
        try:
            while not self.stop.is_set():
                try:
                    items = self.source.queue.get(timeout=0.25)
                except queue.Empty:
                    items = []
                for item in items:
                    self._handle(item)
                self._count_received()
                self._maybe_flush()
        finally:
            try:
                self._drain()
            finally:
                self._pending.close()  # a spill file of an incomplete group

    def _shutdown_deadline(self) -> float | None:
        """None while running; once ``stop`` is set (SIGTERM), the time retries must end by.

        Asked after every failed attempt, so a stop that comes while a write or a checkpoint
        save is being retried in the run loop bounds it too (the checkpoint has not moved:
        nothing is lost by giving up)."""
        if self._deadline is None and self.stop.is_set():
            self._deadline = _stopped_at(self.stop) + self.shutdown_timeout
        return self._deadline

    def _drain(self) -> None:
        # One shutdown timeout in all: a retry cut short by it does not start a new one here.
        if self._deadline is None:
            start = _stopped_at(self.stop) if self.stop.is_set() else time.monotonic()
            self._deadline = start + self.shutdown_timeout
        self.source.close()
        # Items already read are still worth keeping.
        while True:
            try:
                items = self.source.queue.get_nowait()
            except queue.Empty:
                break
            for item in items:
                if not isinstance(item, Fatal):
                    self._handle(item)
        self._count_received()
        if (self._complete_n or self._quarantined) and time.monotonic() >= self._deadline:
            # The write under way when the stop came used the whole timeout (a slow target):
            # another batch now would hold the stop as long again. The checkpoint has not moved.
            raise ShutdownTimeout(
                f"draining: the shutdown timeout ({self.shutdown_timeout:g} s) passed before "
                f"{self._complete_n} event(s) could be written; the next run reads them again"
            )
        self._flush()
        log.info("Stream drained.", extra={"last_event_id": self.checkpoint.last_event_id})

    def _handle(self, item: Item) -> None:
        if isinstance(item, StreamEvent) and self._below_reconcile(item):
            return
        if isinstance(item, StreamEvent):
            self._received[item.event] += 1
            if self._oldest is None:
                self._oldest = time.monotonic()
            self._pending.append(item)
            self._groups.append(item.group)
        elif isinstance(item, Complete):
            # The last ``behind`` events went on past a recovery's hold bound before this
            # position was found safe: they are not complete yet.
            self._complete_n = len(self._pending) - item.behind
            self._complete_id = item.id
            if not self._pending and not self._quarantined:
                if not self._maybe_reconcile(item.id):
                    self._advance_idle(item.id)
        elif isinstance(item, Quarantined):
            if self._oldest is None:
                self._oldest = time.monotonic()
            self._quarantined.append(item)  # counted once stored (_count_quarantined)
            self._quarantined_bytes += len(item.raw)
            log.warning(
                "Event quarantined.",
                extra={
                    "event_id": item.id_text[:64],
                    "event": item.event[:64],
                    "reason": item.reason,
                },
            )
        elif isinstance(item, Disconnected):
            dropped = len(self._pending) - self._complete_n
            self._pending.drop_tail(self._complete_n)
            del self._groups[self._complete_n :]
            # The phrase before the colon (Disconnected); cut, should an error name be long.
            metrics.RECONNECTS.labels(item.reason.split(":")[0][:40]).inc()
            if dropped:
                log.info(
                    "Partial group dropped; it will be re-delivered.",
                    extra={"event_count": dropped},
                )
        elif isinstance(item, GapDetected):
            metrics.RETENTION_GAPS.inc()
            end = self._archive_end()
            gap: dict[str, object] = {
                "checkpoint_event_id": str(item.position),
                "first_retained_event_id": str(item.first_event_id),
                "repair_recover_until": item.repair_recover_until,
                # Past the checkpoint when an earlier run archived more (a target lagging): the
                # archive goes on after the gap from there (verify restarts patch chains there).
                "archive_last_event_id": str(end) if end is not None else None,
            }
            if item.in_connection:
                # Found during a connection: what was received between the two ids may miss
                # events anywhere, not only past the archive's end (verify skips the span), and
                # the repair resumes from where the connector was, past them.
                gap["in_connection"] = True
                if item.repair_from is not None:
                    gap["repair_from_event_id"] = str(item.repair_from)
            self.checkpoint.retention_gaps.append(gap)
            if item.repair_recover_until:
                # Recovery re-sends what changed; deletes in the lost window need reconciling.
                self.checkpoint.recover_until = item.repair_recover_until
                due = self.checkpoint.reconcile or {}
                # Its groups go above the archive's end now; a gap found again while it is due
                # (trimmed again during it) keeps the first end: a killed run's groups are above.
                first = due.get("groups_after", due.get("archive_last_event_id"))
                self.checkpoint.reconcile = {
                    "due": True,
                    **gap,
                    "groups_after": first if due.get("due") else gap["archive_last_event_id"],
                    **self._reconcile_from(),
                }
            if self.reconciler is None:
                # Without an archive there is nothing to compare the platform with: the target's
                # own listing would hold objects the source never sent (deleting those is no
                # repair). Said once, and kept in the checkpoint for `status`.
                why = (
                    "no archive to compare the platform with: deletes and merges made while the "
                    "stream's retention was lost (and, on the raw stream, every change) do not "
                    "reach the target; keep an archive (ARCHIVE_URI), or re-sync the target"
                )
                log.error("Delete reconciliation impossible.", extra={"error": why})
                self.checkpoint.reconcile = {**gap, "due": False, "failed": why}
            self._save()
        elif isinstance(item, RetainedThrough):
            # Saved with the next checkpoint: a run killed before it looks again from older.
            self.checkpoint.retained_through = str(item.id)
        elif isinstance(item, RecoverMoved):
            # Still the first recovery, as of a date the stream holds: kept for a restart.
            self.checkpoint.recover_until = item.recover_until
            self.checkpoint.first_recover_until = item.recover_until
            self._save()
        elif isinstance(item, ControlEvent):
            if item.name == "no-recover" and not self.checkpoint.recover_refused:
                self.checkpoint.recover_refused = True
                self.checkpoint.recover_until = None
                self._save()
        elif isinstance(item, Fatal):
            metrics.ERRORS.labels(type(item.error).__name__).inc()
            self.stop.set()
            raise item.error

    def _reconcile_from(self) -> dict[str, str]:
        """``{"as_of": ...}``: with a sink other than the archive, the state the reconciliation
        compares with is what every sink acknowledged before the gap (the archive may hold
        more, stored by an earlier run, that the target never got, and no stream re-sends it
        now); a reconciliation still due keeps the earlier one. Archive only: its whole state."""
        if all(s.name == "archive" for s in self.sinks):
            return {}
        due = self.checkpoint.reconcile or {}
        held = self.checkpoint.acked_event_id or self.checkpoint.last_segment_last_id
        earlier = due.get("as_of") if due.get("due") else None
        points = [EventId.parse(p) for p in (held, earlier) if p]
        return {"as_of": str(min(points))} if points else {"as_of": str(EventId(0, 0))}

    def _below_reconcile(self, ev: StreamEvent) -> bool:
        """An event sorting at or below the group a delete reconciliation archived (it arrived
        late, below an idle heartbeat): it cannot be stored in order any more, so it is
        quarantined with its reason rather than taken for one the archive already holds."""
        at = self._reconciled_at
        if at is None or ev.group > at:
            return False
        self._handle(
            Quarantined(
                at,
                ev.id_text,
                ev.event,
                ev.data.decode("utf-8", "backslashreplace"),
                f"event {ev.id_text} arrived after the delete reconciliation archived {at}",
            )
        )
        return True

    def _maybe_reconcile(self, at: EventId) -> bool:
        """After a retention-gap repair has caught up, archive the deletes it could not see.

        Runs at an idle position ``at`` (nothing pending, above every archived group). The
        synthetic events come in groups of their own, with ids just below ``at``
        (``reconcile_group``), so it waits for a position at least 2 ms past the archive's end.
        Returns whether it wrote them.
        """
        rec = self.checkpoint.reconcile
        if self.reconciler is None or not rec or not rec.get("due"):
            return False
        until = rec.get("repair_recover_until")
        repair = iso_to_id(str(until)) if until else None
        if repair is not None and at < repair:
            return False  # the repair's recovery is still under way
        if time.monotonic() < self._reconcile_at:
            return False
        # The archive's end, with what an earlier run stored past the checkpoint.
        end = max((e for e in (self._segment_last, self._archive_end()) if e), default=None)
        if end is not None and end >= reconcile_group(at, 0):
            return False  # no room below ``at``: the next idle heartbeat will have it
        # With a target: also compared with the state every sink held at the gap (see
        # _reconcile_from); the archive's own whole state in any case.
        as_of = EventId.parse(rec["as_of"]) if rec.get("as_of") else None
        # Archive only: groups an earlier run stored before it was stopped are in the archive's
        # state, not written again, but counted. (With as_of they are compared, written again.)
        earlier = self._archived_reconciliation(rec) if as_of is None else Counter[str]()
        groups: Iterator[list[StreamEvent]] = iter(())
        try:
            try:
                # Lists the platform and compares: errors until the first group are the
                # reconciliation's own; those of the writes after it stop the run as any write's.
                groups = iter(self.reconciler(at, as_of))
                first = next(groups, None)
            except CannotReconcile as exc:
                log.error(
                    "Delete reconciliation impossible: deletes made while the stream's "
                    "retention was lost are not in the archive.",
                    extra={"error": str(exc)},
                )
                self.checkpoint.reconcile = {**rec, "due": False, "failed": str(exc)}
                self._save()
                return False
            except ConnectorError as exc:
                # Each try lists the whole platform: not again at every heartbeat.
                self._reconcile_at = time.monotonic() + self.backoff_max
                log.warning(
                    "Delete reconciliation failed; retrying later.",
                    extra={"error": str(exc), "retry_in_secs": self.backoff_max},
                )
                return False
            counts = self._write_reconciliation(first, groups) + earlier
        finally:
            close = getattr(groups, "close", None)
            if close is not None:
                close()  # a generator's work files go now, also when a write failed
        self.checkpoint.reconcile = {
            **rec,
            "due": False,
            "done_at_event_id": str(at),
            "refreshed": counts["create"],
            "deleted": counts["delete"],
            "merged": counts["merged"],
        }
        self.checkpoint.last_event_id = str(at)
        self._save()
        return True

    def _archived_reconciliation(self, rec: dict[str, object]) -> Counter[str]:
        """The events of this reconciliation's groups already in the archive (see
        ``reconcile.archived_counts``), above the archive's end when it became due."""
        archives = (getattr(s, "storage", None) for s in self.sinks if s.name == "archive")
        storage: Storage | None = next(archives, None)
        if storage is None:
            return Counter()
        since = rec.get("groups_after", rec.get("archive_last_event_id"))
        after = EventId.parse(str(since)) if since else None
        found: list[Counter[str]] = []
        self._retry(
            lambda: found.append(archived_counts(storage, after)),
            "reading the archive",
            storage.describe(),
        )
        return found[-1]

    def _write_reconciliation(
        self, group: list[StreamEvent] | None, rest: Iterator[list[StreamEvent]]
    ) -> Counter[str]:
        """Write ``group`` and the ``rest``; returns the events written by name, and the merged
        sources under "merged"."""
        counts = Counter[str]()
        while group is not None:
            self._write_reconciled(group)
            # An event the platform appends at or below a group written here (its clock behind
            # the heartbeat's) can no longer be stored in order; see _handle.
            self._reconciled_at = group[0].id
            for ev in group:
                count_event(counts, ev)
            group = next(rest, None)
        log.warning(
            "Delete reconciliation written.",
            extra={k: counts[k] for k in ("create", "merge", "delete", "merged")},
        )
        return counts

    def _write_reconciled(self, events: list[StreamEvent]) -> None:
        """One group of a reconciliation, written like a batch; the checkpoint waits for the last."""
        group = events[0].id
        batch = Batch(
            first_id=group,
            last_id=group,
            events=events,
            after_id=self._segment_last,
            size_bytes=sum(e.size for e in events),
        )
        self._write(self.sinks, batch)
        archived = self._archived(batch)
        if archived.events != len(events):
            # The room check makes this impossible unless another writer shares the archive.
            raise PermanentError(
                f"reconciliation group {group} was not archived: the archive already holds it"
            )
        self._record_archived(archived)
        self._quarantine_rejections(batch)
        self._archived_through(group, archived)

    def _archived_through(self, last: EventId, archived: _Archived) -> None:
        """Every sink acknowledged the groups up to ``last``. The archive may end past them: an
        earlier run stored groups of the next batches before it could checkpoint, and the next
        segment chains after them."""
        tail = last if archived.tail is None else max(last, archived.tail)
        self.checkpoint.last_segment_last_id = str(tail)
        self._segment_last = tail
        acked = self.checkpoint.acked_event_id
        if acked is None or last > EventId.parse(acked):
            self.checkpoint.acked_event_id = str(last)

    def _count_received(self) -> None:
        # Per wake-up, not per event: a labelled counter increment costs a lock each time.
        if self._received:
            for name, count in self._received.items():
                metrics.EVENTS_RECEIVED.labels(name).inc(count)
            self._received.clear()

    def _advance_idle(self, event_id: EventId) -> None:
        """A heartbeat with nothing pending: the checkpoint may follow the server's position."""
        if self._saved_id is None or event_id > self._saved_id:
            self.checkpoint.last_event_id = str(event_id)
            self._save()
            if self.on_position is not None:
                self.on_position(event_id)

    # -- flushing --------------------------------------------------------------------------

    def _should_flush(self) -> bool:
        if self._complete_n == 0 and not self._quarantined:
            return False
        if (
            self._complete_n + len(self._quarantined) >= self.policy.max_events
            or self._pending.bytes + self._quarantined_bytes >= self.policy.max_bytes
        ):
            return True
        return (
            self._oldest is not None and time.monotonic() - self._oldest >= self.policy.max_age_secs
        )

    def _maybe_flush(self) -> None:
        if self._should_flush():
            self._flush()

    def _flush(self) -> None:
        n = self._complete_n
        if n == 0 and not self._quarantined:
            return
        events = self._pending.head(n)
        if events:
            assert self._complete_id is not None
            batch = Batch(
                first_id=self._groups[0],
                last_id=self._groups[n - 1],
                events=events,
                quarantined=self._quarantined,
                size_bytes=self._pending.head_bytes(n),
                after_id=self._segment_last,
            )
        else:
            anchor = self._saved_id or EventId(0, 0)
            batch = Batch(first_id=anchor, last_id=anchor, quarantined=self._quarantined)
        self._write(self.sinks, batch)
        # Read before the rejection records are written: that write has a result of its own.
        archived = self._archived(batch)
        self._quarantine_rejections(batch)
        # Every sink said durable: now, and only now, the checkpoint may move.
        cp = self.checkpoint
        if events:
            # Everything up to the completing id (a later event or a heartbeat) was received
            # and is now durable, so the checkpoint may go past the batch's own last group.
            done = max(batch.last_id, self._complete_id or batch.last_id)
            if self._saved_id is None or done > self._saved_id:
                cp.last_event_id = str(done)
            self._archived_through(batch.last_id, archived)
        self._record_archived(archived)
        self._count_quarantined(batch.quarantined, archived.quarantined)
        self._save()
        counts = Counter(e.event for e in events)
        # The events whose objects a target refused went to quarantine, not to it (looked up
        # only then: a huge group's events are read back from disk).
        rejected = {q.id_text for s in self.sinks for q in getattr(s, "rejected", None) or ()}
        names = {e.id_text: e.event for e in events if e.id_text in rejected} if rejected else {}
        for sink in self.sinks:
            ids = {q.id_text for q in getattr(sink, "rejected", None) or ()} & names.keys()
            refused = Counter(names[i] for i in ids)
            for name, count in counts.items():
                if count > refused[name]:
                    metrics.EVENTS_WRITTEN.labels(sink.name, name).inc(count - refused[name])
        log.info(
            "Batch written.",
            extra={
                "first_event_id": str(batch.first_id),
                "last_event_id": str(batch.last_id),
                "event_count": len(events),
                "quarantined": len(batch.quarantined),
                "sinks": [s.name for s in self.sinks],
            },
        )
        if self.on_position is not None and events:
            self.on_position(batch.last_id)
        self._pending.drop_head(n)
        del self._groups[:n]
        self._quarantined = []
        self._quarantined_bytes = 0
        self._complete_n = 0
        self._oldest = time.monotonic() if len(self._pending) else None

    def _quarantine_rejections(self, batch: Batch) -> None:
        """Objects a target refused are kept, with the target's reason, under quarantine/."""
        rejected: list[Quarantined] = []
        for sink in self.sinks:
            rejected.extend(getattr(sink, "rejected", None) or [])
        if not rejected:
            return
        archives = [s for s in self.sinks if s.name == "archive"]
        stored = None
        if archives:
            record = Batch(first_id=batch.first_id, last_id=batch.first_id, quarantined=rejected)
            self._write(archives, record)
            stored = self._archived(record).quarantined
        for q in rejected:
            metrics.ERRORS.labels("target_rejected").inc()
            log.warning(
                "Event quarantined.", extra={"event_id": q.id_text, "reason": q.reason[:300]}
            )
        self._count_quarantined(rejected, stored)

    def _count_quarantined(self, items: Sequence[Quarantined], stored: int | None) -> None:
        """The quarantine counter and the checkpoint's count (``status``): the records the
        archive stored, once each (an event delivered again after a reconnect has the same
        record); without an archive, every delivery."""
        count = len(items) if stored is None else stored
        if count:
            metrics.QUARANTINED.inc(count)
            self.checkpoint.quarantined += count

    def deliver_archive_tail(self, archive: Storage) -> bool:
        """``run --resume-from-archive`` with another sink: the checkpoint, which said what
        every sink acknowledged, is lost, and the stream goes on after the archive's end. A
        batch is stored in the archive before the other sinks take it, so they can lack the
        newest segment: it is written to them again from the archive (idempotent; a sink that
        guards against replays guards it, ``Batch.replay``). Returns whether it wrote one."""
        from .archive.reader import ArchiveReader  # (`run` imports the archive package anyway)

        others = [s for s in self.sinks if s.name != "archive"]
        reader = ArchiveReader(archive)
        newest = reader.newest()
        if not others or newest is None or newest.last_event_id != self.checkpoint.last_event_id:
            return False  # (a snapshot holds the end: its segments were pruned long since)
        events = PendingEvents(*self._spill)  # a huge group's segment: on disk past the bound
        try:
            for ev in reader.segment_events(newest):
                events.append(ev)
            batch = Batch(
                first_id=newest.first,
                last_id=newest.last,
                events=events.head(len(events)),
                size_bytes=events.bytes,
                after_id=EventId.parse(newest.after_event_id) if newest.after_event_id else None,
                replay=True,
            )
            log.warning(
                "No checkpoint: the archive's newest segment is written to the other sinks "
                "again, which may not have taken it.",
                extra={"segment": newest.segment, "events": len(batch.events)},
            )
            self._write(others, batch)
            self._quarantine_rejections(batch)
        finally:
            events.close()
        return True

    def _write(self, sinks: Sequence[Sink], batch: Batch) -> None:
        write_with_retry(
            sinks,
            batch,
            stop=self.stop,
            initial=self.backoff_initial,
            cap=self.backoff_max,
            deadline=self._shutdown_deadline,
            shutdown_timeout=self.shutdown_timeout,
            guard=self.guard,
        )

    def _record_archived(self, archived: _Archived) -> None:
        """Fold what the archive sink wrote for a batch into the checkpoint's counters."""
        self.checkpoint.events_archived += archived.events + archived.adopted_events
        self.checkpoint.segments_written += len(archived.segments) + archived.adopted_segments
        # The segment holding the archive's end (the last one written, or one a crashed run
        # stored when this batch wrote none): the start-up check looks for its manifest.
        if archived.tail_segment is not None:
            self.checkpoint.last_segment = archived.tail_segment

    def _archive_end(self) -> EventId | None:
        """The archive's highest stored group (None without an archive sink)."""
        ends = [getattr(s, "end", None) for s in self.sinks if s.name == "archive"]
        end = ends[0] if ends else None
        if end is None:
            return None
        found: list[EventId | None] = []
        self._retry(lambda: found.append(end(self._segment_last)), "reading the archive", "archive")
        return found[-1]

    def _retry(self, fn: Callable[[], None], stage: str, describe: str) -> None:
        """``retry_call`` with this pipeline's backoff, stop and shutdown deadline."""
        retry_call(
            fn,
            stage=stage,
            stop=self.stop,
            initial=self.backoff_initial,
            cap=self.backoff_max,
            deadline=self._shutdown_deadline,
            shutdown_timeout=self.shutdown_timeout,
            describe=describe,
        )

    def _archived(self, batch: Batch) -> _Archived:
        """What the archive sink's last write (the batch just written) stored."""
        for sink in self.sinks:
            result = getattr(sink, "last", None)
            if result is not None and sink.name == "archive":
                metrics.SEGMENTS_WRITTEN.inc(len(result.segments))
                metrics.SEGMENT_BYTES.inc(result.bytes)
                return _Archived(
                    result.events,
                    list(result.segments),
                    result.tail,
                    result.quarantined,
                    result.tail_segment,
                    result.adopted_segments,
                    result.adopted_events,
                )
        return _Archived(len(batch.events), [], None)

    def _save(self) -> None:
        def save() -> None:
            self.guard()
            self.store.save(self.checkpoint)

        self._retry(save, "checkpointing", self.store.storage.describe())
        metrics.CHECKPOINT_SAVED.set_to_current_time()
        last = self.checkpoint.last_event_id
        if last:
            self._saved_id = EventId.parse(last)
            ts = self._saved_id.ms / 1000
            metrics.CHECKPOINT_TIMESTAMP.set(ts)
            metrics.CHECKPOINT_LAG.set(max(0.0, time.time() - ts))
