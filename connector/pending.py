"""The pipeline's pending events: in memory, and on disk past a limit.

The pipeline may checkpoint only after whole dependency groups (the platform sends a trigger's
dependencies under the trigger's own id), so it holds every event of the group under way. That
group can be huge: after a reconnect the platform's cache is empty, and a live change to a
popular entity brings every relationship the entity has, with their references, as dependencies
under one id (hundreds of thousands of events). Held in memory, such a group took the process
past any container limit, and the restart met the same group again. Past ``spill_bytes`` of
event data, ``PendingEvents`` therefore appends the events that follow to an unlinked scratch
file in the work dir, and the batches made of them read them back from it, one parse per read.
The spill is a suffix of the pending events: once it starts, every event goes there until a
flush leaves no more pending than memory may hold (mostly: the group after the huge one), which
is then read back into memory and the file closed. A work dir that cannot take the spill (full,
read-only) leaves the events in memory, with an error logged.
"""

from __future__ import annotations

import logging
import os
import tempfile
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, overload

from .events import EventId, StreamEvent, archive_line_parts, parse_archive_line

__all__ = ["PendingEvents"]

log = logging.getLogger(__name__)

_UNLIMITED = 1 << 62  # a memory limit no run reaches: no spill


class _SpillFile:
    """Events written as archive lines to an unlinked file, with their offsets and group ids.

    Unbuffered, by offset (``pwrite`` / ``pread``): a full disk fails the very write of the
    event that does not fit, and every event written before it still reads back."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._file: IO[bytes] = tempfile.TemporaryFile(
            dir=directory, prefix="pending-", buffering=0
        )
        self._fd = self._file.fileno()
        self._offsets = array("q", [0])
        self._sizes = array("q")  # each event's data bytes
        self._groups: list[EventId] = []
        self.start = 0  # events before it were taken by a flush
        self.bytes = 0  # data bytes of the events from ``start`` on

    def __len__(self) -> int:
        return len(self._groups) - self.start

    def append(self, ev: StreamEvent) -> None:
        line = b"".join(archive_line_parts(ev))
        end = self._offsets[-1]
        written = 0
        while written < len(line):  # a short write is not a failure
            written += os.pwrite(self._fd, memoryview(line)[written:], end + written)
        self._offsets.append(end + len(line))
        self._sizes.append(len(ev.data))
        self._groups.append(ev.group)
        self.bytes += len(ev.data)

    def size_of(self, count: int) -> int:
        """Data bytes of the next ``count`` events."""
        return sum(self._sizes[self.start : self.start + count])

    def consume(self, count: int) -> None:
        """The next ``count`` events were written: forget them."""
        self.bytes -= sum(self._sizes[self.start : self.start + count])
        self.start += count

    def truncate(self, keep: int) -> None:
        """Keep only the next ``keep`` events."""
        stop = self.start + keep
        self.bytes = sum(self._sizes[self.start : stop])
        del self._offsets[stop + 1 :], self._sizes[stop:], self._groups[stop:]
        self._file.truncate(self._offsets[stop])

    def read(self, first: int, stop: int) -> Iterator[StreamEvent]:
        """Events ``first`` to ``stop`` (absolute indexes), parsed back from their lines."""
        for index in range(first, stop):
            offset = self._offsets[index]
            line = os.pread(self._fd, self._offsets[index + 1] - offset, offset)
            ev = parse_archive_line(line)
            ev.group = self._groups[index]
            yield ev

    def close(self) -> None:
        self._file.close()


class _Spilled(Sequence[StreamEvent]):
    """A read-only view of spilled events ``[first, stop)`` (absolute indexes)."""

    def __init__(self, spill: _SpillFile, first: int, stop: int) -> None:
        self._spill, self._first, self._stop = spill, first, stop

    def __len__(self) -> int:
        return self._stop - self._first

    def __iter__(self) -> Iterator[StreamEvent]:
        return self._spill.read(self._first, self._stop)

    @overload
    def __getitem__(self, index: int) -> StreamEvent: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[StreamEvent]: ...

    def __getitem__(self, index: int | slice) -> StreamEvent | Sequence[StreamEvent]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("spilled events are sliced contiguously")
            return _Spilled(self._spill, self._first + start, self._first + max(start, stop))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return next(self._spill.read(self._first + index, self._first + index + 1))


class _Joined(Sequence[StreamEvent]):
    """Events held in memory followed by spilled ones."""

    def __init__(self, head: list[StreamEvent], tail: _Spilled) -> None:
        self._head, self._tail = head, tail

    def __len__(self) -> int:
        return len(self._head) + len(self._tail)

    def __iter__(self) -> Iterator[StreamEvent]:
        yield from self._head
        yield from self._tail

    @overload
    def __getitem__(self, index: int) -> StreamEvent: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[StreamEvent]: ...

    def __getitem__(self, index: int | slice) -> StreamEvent | Sequence[StreamEvent]:
        n = len(self._head)
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("spilled events are sliced contiguously")
            stop = max(start, stop)
            if stop <= n:
                return self._head[start:stop]
            tail = self._tail[max(0, start - n) : stop - n]
            return tail if start >= n else _Joined(self._head[start:], tail)  # type: ignore[arg-type]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._head[index] if index < n else self._tail[index - n]


class PendingEvents:
    """The pipeline's received, not yet written events, in stream order (see module docstring).

    ``head(n)`` is the batch of the first ``n``; ``drop_head(n)`` forgets them once written;
    ``drop_tail(n)`` keeps the first ``n`` (a partial group the platform will send again)."""

    def __init__(self, spill_dir: Path | None = None, spill_bytes: int = 0) -> None:
        """Without ``spill_dir`` (or with ``spill_bytes`` 0) everything stays in memory."""
        self._memory: list[StreamEvent] = []
        self._spill: _SpillFile | None = None
        self._spill_dir = spill_dir
        # Memory may hold this many data bytes (no limit without a spill dir).
        self._configured = spill_bytes if spill_dir is not None and spill_bytes > 0 else _UNLIMITED
        self._limit = self._configured
        self._memory_bytes = 0

    def __len__(self) -> int:
        return len(self._memory) + (len(self._spill) if self._spill is not None else 0)

    @property
    def bytes(self) -> int:
        """Data bytes of every pending event."""
        return self._memory_bytes + (self._spill.bytes if self._spill is not None else 0)

    @property
    def spilled(self) -> int:
        """How many pending events wait on disk."""
        return len(self._spill) if self._spill is not None else 0

    def append(self, ev: StreamEvent) -> None:
        # The hot path of every event: one comparison more than a list append.
        if self._spill is None:
            size = len(ev.data)
            if self._memory_bytes + size <= self._limit:
                self._memory.append(ev)
                self._memory_bytes += size
                return
            assert self._spill_dir is not None
            try:
                self._spill = _SpillFile(self._spill_dir)
            except OSError as exc:
                self._keep_in_memory(ev, exc)
                return
            log.warning(
                "A dependency group outgrew memory: its events wait on disk until it is whole.",
                extra={
                    "event_id": ev.id_text,
                    "pending_events": len(self._memory),
                    "pending_bytes": self._memory_bytes,
                    "spill_dir": str(self._spill_dir),
                },
            )
        try:
            self._spill.append(ev)
        except OSError as exc:
            self._keep_in_memory(ev, exc)

    def _keep_in_memory(self, ev: StreamEvent, exc: OSError) -> None:
        """The work dir cannot take the spill (full, read-only): hold everything in memory as
        before the spill existed, rather than stop and meet the same group at every restart."""
        log.error(
            "Cannot hold a large dependency group on disk: holding it in memory.",
            extra={"spill_dir": str(self._spill_dir), "error": str(exc)},
        )
        self._limit = _UNLIMITED
        if self._spill is not None:
            # Written before the failure: every event up to the failed one reads back whole.
            self._unspill()
        self.append(ev)

    def head(self, n: int) -> Sequence[StreamEvent]:
        """The first ``n`` events (a list while none of them is on disk)."""
        held = len(self._memory)
        if n <= held or self._spill is None:
            return self._memory[:n]
        first = self._spill.start
        return _Joined(self._memory[:], _Spilled(self._spill, first, first + n - held))

    def head_bytes(self, n: int) -> int:
        """Data bytes of the first ``n`` events."""
        held = min(n, len(self._memory))
        if n == len(self):
            return self.bytes
        total = sum(len(e.data) for e in self._memory[:held])
        if n > held and self._spill is not None:
            total += self._spill.size_of(n - held)
        return total

    def drop_head(self, n: int) -> None:
        held = min(n, len(self._memory))
        self._memory_bytes -= sum(len(e.data) for e in self._memory[:held])
        del self._memory[:held]
        if self._spill is not None:
            self._spill.consume(n - held)
            if self._memory_bytes + self._spill.bytes <= self._configured:
                # What is left fits in memory again (mostly: the group after a huge one). The
                # spill would otherwise last as long as something is pending, which in a
                # recovery is for ever: every event through the disk, the file ever larger.
                self._unspill()
        elif self._limit != self._configured and self._memory_bytes <= self._configured:
            self._limit = self._configured  # the disk may take the next spill again

    def _unspill(self) -> None:
        spill, self._spill = self._spill, None
        assert spill is not None
        try:
            events = list(spill.read(spill.start, spill.start + len(spill)))
        finally:
            spill.close()
        self._memory.extend(events)
        self._memory_bytes += sum(len(e.data) for e in events)

    def drop_tail(self, n: int) -> None:
        held = len(self._memory)
        if n < held:
            del self._memory[n:]
            self._memory_bytes = sum(len(e.data) for e in self._memory)
            self._drop_spill()
        elif self._spill is not None:
            if n == held:
                self._drop_spill()
            else:
                self._spill.truncate(n - held)

    def _drop_spill(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None

    def close(self) -> None:
        self._drop_spill()
