"""Saying that a write is taking long, while it still runs.

A storage endpoint that accepts connections and never answers (a frozen MinIO, a black-holed
route) makes a write wait for the client's own timeouts and retries: about three minutes of
silence for S3 before the first "Write failed; retrying.", longer for a slow platform. An
operator watching the log must see at once where the run is stuck, so every retried call
(``pipeline.retry_call``) is watched: one that runs ``SLOW_SECS`` gets a warning naming its stage
and target, repeated every ``REPEAT_SECS`` until it returns. One daemon thread watches every
call; a call costs a dictionary insert and delete.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["REPEAT_SECS", "SLOW_SECS", "watched"]

log = logging.getLogger(__name__)

SLOW_SECS = 30.0
REPEAT_SECS = 60.0
_TICK_SECS = 1.0


@dataclass
class _Call:
    stage: str
    target: str
    started: float
    warn_at: float


_calls: dict[int, _Call] = {}
_lock = threading.Lock()
_ids = itertools.count()
_thread: threading.Thread | None = None


@contextmanager
def watched(stage: str, target: str) -> Iterator[None]:
    """Warn while the body runs past ``SLOW_SECS`` (then every ``REPEAT_SECS``)."""
    global _thread
    now = time.monotonic()
    key = next(_ids)
    with _lock:
        _calls[key] = _Call(stage, target, now, now + SLOW_SECS)
        if _thread is None:
            _thread = threading.Thread(target=_watch, name="slow-call-watchdog", daemon=True)
            _thread.start()
    try:
        yield
    finally:
        with _lock:
            del _calls[key]


def _watch() -> None:
    while True:
        time.sleep(min(_TICK_SECS, SLOW_SECS))
        now = time.monotonic()
        with _lock:
            late = [c for c in _calls.values() if now >= c.warn_at]
            for call in late:
                call.warn_at = now + REPEAT_SECS
        for call in late:
            log.warning(
                "Still waiting for an answer.",
                extra={
                    "stage": call.stage,
                    "target": call.target,
                    "waiting_secs": round(now - call.started),
                },
            )
