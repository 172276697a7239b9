"""Progress display for long runs (recover, restore): a bar on a terminal, log lines otherwise.

On a TTY the bar is redrawn in place (``\\r``) at most a few times a second; in a container or
under systemd, where stderr is a log, a bar would be noise, so an INFO line with the same fields
is logged every ``log_every_secs`` instead. Pure stdlib; the clock is injectable for tests.

Recover has no event count up front: the platform sends the current state ordered by
``updated_at`` with ids ``<updated_at ms>-0`` up to the recover date, so progress is the share
of that time span already covered (``recover_fraction``).
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Progress", "RecoverProgress", "recover_fraction", "iso_to_ms", "format_duration"]

log = logging.getLogger(__name__)

_REDRAW_SECS = 0.2
_BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    secs = max(0, round(seconds))
    hours, rest = divmod(secs, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Counts work done against an optional total; shows rate and ETA.

    ``total=None`` (unknown) shows the count and rate only. Call ``update(done)`` with an
    absolute count or ``advance(n)`` with an increment, then ``close()`` once.
    """

    def __init__(
        self,
        total: int | None,
        *,
        label: str,
        stream: TextIO | None = None,
        log_every_secs: float = 30.0,
        counts: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.label = label
        # False when ``done``/``total`` are not items (recover's time share): percent and ETA only.
        self.counts = counts
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.interval = _REDRAW_SECS if self.tty else log_every_secs
        self.done = 0
        self._start = clock()
        self._shown_at: float | None = None
        self._closed = False

    # -- counting ---------------------------------------------------------------------------

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if self._shown_at is None or now - self._shown_at >= self.interval:
            self._show(now)

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._show(self.clock(), final=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    # -- figures ----------------------------------------------------------------------------

    def rate(self, now: float | None = None) -> float:
        elapsed = (self.clock() if now is None else now) - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta_secs(self, now: float | None = None) -> float | None:
        rate = self.rate(now)
        if self.total is None or rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / rate)

    def fraction(self) -> float | None:
        if self.total is None:
            return None
        if self.total <= 0:
            return 1.0
        return min(1.0, self.done / self.total)

    def line(self, now: float | None = None) -> str:
        """``restore [#####......] 45.0% 450/1000 12.3/s ETA 0:00:44`` (no bar off a TTY)."""
        now = self.clock() if now is None else now
        parts = [self.label]
        frac = self.fraction()
        if frac is not None:
            if self.tty:
                filled = int(_BAR_WIDTH * frac)
                parts.append(f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}]")
            parts.append(f"{100 * frac:5.1f}%")
            if self.counts:
                parts.append(f"{self.done}/{self.total}")
        else:
            parts.append(str(self.done))
        if self.counts:
            parts.append(f"{self.rate(now):.1f}/s")
        eta = self.eta_secs(now)
        if frac is not None:
            parts.append(f"ETA {format_duration(eta) if eta is not None else '?'}")
        return " ".join(parts)

    def _show(self, now: float, *, final: bool = False) -> None:
        self._shown_at = now
        if self.tty:
            self.stream.write("\r" + self.line(now))
            self.stream.flush()
            return
        eta = self.eta_secs(now)
        fields: dict[str, object] = {"task": self.label}
        if self.counts:
            fields.update(done=self.done, total=self.total, rate_per_sec=round(self.rate(now), 2))
        else:
            # Not items (the recovery's share of its time span): "done 0 of 1000" read as events.
            frac = self.fraction()
            fields["percent"] = None if frac is None else round(100 * frac, 1)
        fields["eta_secs"] = None if eta is None else round(eta)
        log.info("Progress finished." if final else "Progress.", extra=fields)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def iso_to_ms(text: str) -> int:
    """Epoch milliseconds of an ISO 8601 date (``Z`` accepted; naive dates are UTC)."""
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    # Integer arithmetic: the float product is one millisecond short for some instants.
    return (parsed - _EPOCH) // dt.timedelta(milliseconds=1)


def recover_fraction(recover_until: str, current_ms: int, first_ms: int) -> float:
    """Share of the recovery done: how far ``current_ms`` is from ``first_ms`` to the end date.

    ``first_ms`` is the time of the first recovered event (where the span starts); a recover
    event past the end date (the live part) means done.
    """
    end = iso_to_ms(recover_until)
    if current_ms >= end:
        return 1.0
    span = end - first_ms
    if span <= 0:
        return 1.0
    return max(0.0, min(1.0, (current_ms - first_ms) / span))


class RecoverProgress:
    """Recover progress in per-mille of the time span, fed with event id milliseconds."""

    SCALE = 1000

    def __init__(
        self,
        recover_until: str,
        *,
        stream: TextIO | None = None,
        log_every_secs: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.recover_until = recover_until
        self._first_ms: int | None = None
        self.progress = Progress(
            self.SCALE,
            label="recover",
            stream=stream,
            log_every_secs=log_every_secs,
            counts=False,
            clock=clock,
        )

    def update(self, event_ms: int) -> float:
        if self._first_ms is None:
            self._first_ms = event_ms
        frac = recover_fraction(self.recover_until, event_ms, self._first_ms)
        self.progress.update(round(frac * self.SCALE))
        return frac

    def close(self) -> None:
        self.progress.close()
