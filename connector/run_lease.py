"""One ``run`` per archive: the run lease.

Two ``run`` processes on one archive (a copied compose file, a second replica, a new container
started while the old one drains) would both follow the stream, cut their segments at different
places (overlapping segments) and move the one checkpoint back and forth. So ``run`` holds a
lease, ``locks/run.json``, in the archive and, when the checkpoint is kept apart, next to the
checkpoint as well, before it reads the checkpoint. A second ``run`` waits for it (a standby:
``opencti_sync_standby`` is 1) until the holder stops (it deletes the lease) or dies: once the
standby has seen the lease unrenewed for ``CONNECTOR_LEASE_SECS`` by its own clock (another
machine's clock may be off), at once when the holder was a process of this machine and pid
namespace that no longer exists, or when the lease's own date is past (written by this machine's
clock) or long past (a holder dead before this start): the job lock's expiry, ``JobLock.expired``. It then starts from the checkpoint like any restart. A run's leases share one owner,
so two names of one place (a symlink) are one lease.

The lease is the archive job lock's mechanism (``locks.JobLock``: put-if-absent, renewal every
third of the lease, take-over of an expired one), with a guard: before each write to the sinks
and each checkpoint save, the holder makes sure it still holds the lease, reading it again when
its last renewal is older than half the lease. One that lost it (a storage outage or a pause
longer than the lease, during which a standby took over) stops there with ``LeaseLost`` (exit
1), without writing; restarted, it becomes the standby.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence

from . import metrics
from .errors import LeaseLost, RetryableError
from .locks import JobLock, LockHeld, elapsed_clock, read_record
from .storage import Storage

__all__ = ["RUN_LEASE_KEY", "LeaseLost", "RunLease", "lease_holder"]

log = logging.getLogger(__name__)

RUN_LEASE_KEY = "locks/run.json"
_ANNOUNCE_EVERY_SECS = 300.0  # a standby says again that it waits


class _Lease(JobLock):
    def __init__(
        self, storage: Storage, ttl_secs: float, owner: str, on_lost: Callable[[], None]
    ) -> None:
        super().__init__(storage, "run", ttl_secs, key=RUN_LEASE_KEY, owner=owner)
        self._on_lost = on_lost

    def on_lost(self) -> None:
        self._on_lost()


class RunLease:
    """The run lease in each of ``storages`` (the archive, the checkpoint's storage when apart),
    always taken in that order so two runs never each hold one."""

    def __init__(
        self,
        storages: Sequence[Storage],
        ttl_secs: float,
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_lost`` is called (from a renewal thread) when a lease is found taken over: the
        run stops on it, and its last flush meets ``check``."""
        self.ttl = ttl_secs
        # One owner for all: two names of one place (a symlink) are then one lease, not a wait
        # on ourselves.
        owner = uuid.uuid4().hex
        self._leases = [_Lease(s, ttl_secs, owner, on_lost) for s in storages]

    @property
    def lost(self) -> bool:
        return any(lease.lost for lease in self._leases)

    def wait(self, stop: threading.Event) -> bool:
        """Hold every lease, waiting as long as another run holds one; False if ``stop`` came
        first (then nothing is held)."""
        for lease in self._leases:
            if not self._wait_one(lease, stop):
                self.release()
                return False
        return True

    def _wait_one(self, lease: _Lease, stop: threading.Event) -> bool:
        where = f"{lease.storage.describe()} ({lease.key})"
        poll = min(max(self.ttl / 6, 0.05), 5.0)
        announced: float | None = None
        while not stop.is_set():
            try:
                # The lease's own watch times a holder's unchanged record across these polls.
                lease.acquire()
            except LockHeld as exc:
                record = exc.record
                now = time.monotonic()
                if announced is None or now - announced >= _ANNOUNCE_EVERY_SECS:
                    log.warning(
                        "Another run holds this archive: waiting until it stops, or until its "
                        "lease expires if it died (standby).",
                        extra={
                            "lease": where,
                            "holder": record.holder if record else "?",
                            "expires_at": (
                                record.expires_at.isoformat(timespec="seconds") if record else "?"
                            ),
                        },
                    )
                    announced = now
                metrics.STANDBY.set(1)
            except RetryableError as exc:
                log.warning(
                    "Could not read the run lease; retrying.",
                    extra={"lease": where, "error": str(exc)},
                )
            else:
                if announced is not None:
                    log.info("The other run is gone: taking over.", extra={"lease": where})
                metrics.STANDBY.set(0)
                return True
            stop.wait(poll)
        return False

    def check(self) -> None:
        """Raise ``LeaseLost`` unless this run still holds every lease: read again (and renew)
        any whose last renewal is older than half the lease, since another run may take it over
        once it has run out."""
        for lease in self._leases:
            if lease.lost:
                self._lost(lease)
            if elapsed_clock() - lease.renewed_at > self.ttl / 2:
                try:
                    lease.renew()
                except LockHeld:
                    self._lost(lease)

    def _lost(self, lease: _Lease) -> None:
        raise LeaseLost(
            f"another run took this archive over ({lease.storage.describe()}, {lease.key}) "
            "while this one could not renew its lease: stopping before writing more"
        )

    def release(self) -> None:
        for lease in reversed(self._leases):
            lease.release()


def lease_holder(storage: Storage) -> str | None:
    """Who holds the run lease in ``storage`` and until when (``status``); None when nobody
    does (no lease, or an expired one)."""
    record = read_record(storage, RUN_LEASE_KEY)
    if record is None or record.expires_at <= dt.datetime.now(dt.UTC) or record.holder_is_gone():
        return None
    return f"{record.holder} until {record.expires_at.isoformat(timespec='seconds')}"
