"""The sink contract: where batches of stream events go (the archive, an OpenCTI target).

Contract (every sink, word for word): ``write(batch)`` returns only once every event of the batch
is durable in the sink. It raises ``RetryableError`` when the same batch may succeed later and
``PermanentError`` when it will not. It must accept the same batch twice without harm (at-least-
once delivery into an idempotent sink). Sinks never touch the checkpoint: the pipeline moves it
after every sink has returned.

A sink whose write waits on a remote answer may be ``Bounded``: the pipeline sets its
``deadline`` to the run's shutdown deadline, and a write still waiting then gives up with
``RetryableError`` instead of holding the stop (the checkpoint has not moved: nothing is lost).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from .events import EventId, Quarantined, StreamEvent

__all__ = ["Batch", "Bounded", "Sink"]


@dataclass(slots=True)
class Batch:
    """Consecutive whole dependency groups of the stream, in stream order.

    ``events`` never ends in the middle of a group of events sharing one id, so ``last_id`` is
    complete: the stream resumes strictly after it without losing anything. ``first_id`` and
    ``last_id`` are group ids: the stream's high-water mark when the first / last group began
    (equal to the events' own ids except for rare recovery events that arrive with a lower id).
    """

    first_id: EventId
    last_id: EventId
    # A list, or a sequence read back from disk for a group too large for memory (pending.py).
    events: Sequence[StreamEvent] = field(default_factory=list)
    quarantined: list[Quarantined] = field(default_factory=list)
    size_bytes: int = 0
    # The archive position this batch continues from (the previous segment's last group id).
    after_id: EventId | None = None
    # Events a sink may have applied already (read back from the archive, the record of what
    # the sink acknowledged lost): a sink that guards against replays guards this batch.
    replay: bool = False

    def __len__(self) -> int:
        return len(self.events)


class Sink(Protocol):
    """A destination of the stream. See the module docstring for the delivery contract."""

    name: str

    def check(self) -> None:
        """Exercise the real write path cheaply; raise ``PermanentError`` saying what is wrong."""
        ...

    def write(self, batch: Batch) -> None:
        """Make every event of ``batch`` durable, idempotently. Returns only when durable."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Bounded(Protocol):
    """A sink told the run's shutdown deadline: ``deadline()`` is None while running, then the
    monotonic time its writes must end by (``Pipeline`` sets it)."""

    deadline: Callable[[], float | None]
