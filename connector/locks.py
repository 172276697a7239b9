"""Advisory locks with a lease in an archive: the snapshot / retention job lock, and the run lease.

The job lock (``locks/archive-jobs.json``) keeps snapshot and retention from running at the same
time on one archive, whichever process starts them; ``run_lease`` builds ``run``'s lease on the
same mechanism. It is advisory and best effort:

* a free lock is taken with ``put_if_absent`` (atomic on both backends: ``os.link`` locally,
  ``If-None-Match: *`` on S3), so two takers of a free lock cannot both win;
* an *expired* lock is taken over, and a held one renewed, by a compare-and-swap
  (``Storage.replace_if``: ``If-Match`` on S3, a file flock locally) against the record
  as it was read: of two processes taking over the same expired lock, or a holder renewing
  while another takes its lock over, one write wins and the other learns it lost. A re-read
  after a short settle delay still follows a take-over, for S3-compatible stores that ignore
  ``If-Match``. Expiry only happens when a holder died or paused (a live holder renews its lock
  every ``ttl/3``). A holder that was a process of this host and pid namespace, and is gone,
  need not be waited out;
* another machine's clock may run ahead of or behind ours, so the date in its record decides
  nothing until long past (a holder dead well before this start): a reader takes such a record
  over once it has seen it unchanged for a whole lease by its own clock (``LockWatch``), as a
  live holder rewrites it every third of one.

(Kept apart from ``jobs`` so that ``run`` takes its lease without importing the scheduler.)
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import orjson

from .errors import ConnectorError, NotFound, RetryableError
from .storage import Storage

__all__ = [
    "LOCK_KEY",
    "JobLock",
    "LockHeld",
    "LockRecord",
    "LockWatch",
    "elapsed_clock",
    "read_record",
]

log = logging.getLogger(__name__)

LOCK_KEY = "locks/archive-jobs.json"
# Time between our write of a taken-over lock and the re-read that confirms it.
_SETTLE_SECS = 0.2
# How far behind ours another machine's clock may run before its live holder's date looks past.
_CLOCK_SLACK = dt.timedelta(minutes=10)


class LockHeld(ConnectorError):
    """Another live job holds the archive's job lock."""

    def __init__(
        self, message: str, record: LockRecord | None = None, tag: str | None = None
    ) -> None:
        """``record`` as read, with its storage ``tag`` (what a take-over must replace)."""
        super().__init__(message)
        self.record = record
        self.tag = tag


def _boot_id() -> str:
    """This machine's kernel boot ('' where /proc does not say)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    """This process's pid namespace and the kernel's boot ('' where /proc does not say): a pid
    names a process only inside its namespace (each container has its own), and the host's own
    namespace has the same number on every machine, so the boot id tells machines apart."""
    boot = _boot_id()
    try:
        return f"{os.readlink('/proc/self/ns/pid')} boot {boot}" if boot else ""
    except OSError:
        return ""


def elapsed_clock() -> float:
    """Seconds on a clock that goes on while the machine is suspended (Linux ``CLOCK_BOOTTIME``;
    elsewhere ``time.monotonic``): a lease's age must count a suspend."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


@dataclass(frozen=True, slots=True)
class LockRecord:
    owner: str
    job: str
    expires_at: dt.datetime
    # Who holds it, for the messages and to see at once that a holder on this host is gone.
    host: str = ""
    pid: int = 0
    pidns: str = ""
    # The expiry on the kernel's boot clock (``elapsed_clock``), which every process and
    # container of the machine shares and no wall-clock step moves: how a reader of the same
    # boot judges it (0: not given, an older version's record).
    boot_expires: float = 0.0

    @property
    def holder(self) -> str:
        return f"{self.host or '?'} pid {self.pid or '?'}"

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "owner": self.owner,
                "job": self.job,
                "expires_at": self.expires_at.isoformat(),
                "host": self.host,
                "pid": self.pid,
                "pidns": self.pidns,
                "boot_expires": self.boot_expires,
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> LockRecord | None:
        """The record, or None when the object is unreadable (treated as expired)."""
        try:
            obj = orjson.loads(data)
            expires = dt.datetime.fromisoformat(obj["expires_at"])
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=dt.UTC)
            pid = obj.get("pid", 0)
            boot_expires = obj.get("boot_expires", 0.0)
            return cls(
                str(obj["owner"]),
                str(obj.get("job", "")),
                expires,
                str(obj.get("host", "")),
                pid if isinstance(pid, int) else 0,
                str(obj.get("pidns", "")),
                float(boot_expires) if isinstance(boot_expires, int | float) else 0.0,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def dated_here(self) -> bool:
        """Written on this machine since its boot (any container of it): its date is on our
        clock."""
        boot = _boot_id()
        return bool(boot) and self.pidns.rpartition(" boot ")[2] == boot

    def holder_is_gone(self) -> bool:
        """The holder was a process of this host and pid namespace that no longer exists (a
        killed run restarted by systemd): its lease need not be waited out."""
        if not self.pid or not self.pidns or self.host != socket.gethostname():
            return False
        if self.pidns != _pid_namespace():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # it exists (another user's): alive
        return False


def read_record(storage: Storage, key: str) -> LockRecord | None:
    """The lock record at ``key``; None when there is none or it is unreadable."""
    try:
        return LockRecord.from_json(storage.get(key))
    except NotFound:
        return None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class LockWatch:
    """A reader's sighting of another holder's record and since when, by the reader's own
    clock: a record left unchanged for a whole lease has no live holder, whatever date another
    machine's clock wrote in it. Kept across the tries of one waiter (a standby's polls, a
    scheduled job's retries)."""

    def __init__(self) -> None:
        self._seen: tuple[str, dt.datetime] | None = None
        self._since = 0.0
        self._guard = threading.Lock()

    def unchanged_secs(self, record: LockRecord) -> float:
        """Seconds ``record`` has been seen unchanged (0 when it is new to us: noted now)."""
        seen = (record.owner, record.expires_at)  # a renewal writes a new expiry
        now = elapsed_clock()
        with self._guard:
            if seen != self._seen:
                self._seen, self._since = seen, now
            return now - self._since


_RELEASE_PAUSES = (0.5, 1.0, 2.0)  # between the tries to release the lock (s)


class JobLock:
    """The archive-wide job lock (see the module docstring for its guarantees).

    Use as a context manager; while held, a daemon thread renews the expiry every ``ttl/3`` so
    long snapshots keep it.
    """

    def __init__(
        self,
        storage: Storage,
        job: str,
        ttl_secs: float = 600,
        *,
        key: str = LOCK_KEY,
        owner: str | None = None,
        watch: LockWatch | None = None,
    ) -> None:
        """``owner``: locks of one holder share it (two names of one place are one lock).
        ``watch``: what earlier tries saw of another holder's record (``LockWatch``)."""
        self.storage = storage
        self.job = job
        self.ttl = dt.timedelta(seconds=ttl_secs)
        self.key = key
        self.owner = owner or uuid.uuid4().hex
        self._watch = watch or LockWatch()
        self._held = False
        self._lost = False
        self._renewed_at = 0.0  # elapsed_clock() of the last write of our record
        self._renewing = threading.Lock()  # the renewal thread and a guard's check
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self) -> LockRecord:
        return LockRecord(
            self.owner,
            self.job,
            _now() + self.ttl,
            socket.gethostname(),
            os.getpid(),
            _pid_namespace(),
            elapsed_clock() + self.ttl.total_seconds(),
        )

    def _replace_record(self, tag: str) -> bool:
        """Write our record over the one read with ``tag``; False if it changed since."""
        started = elapsed_clock()
        if not self.storage.replace_if(self.key, self._record().to_json(), tag):
            return False
        self._renewed_at = started
        return True

    def read(self) -> LockRecord | None:
        return read_record(self.storage, self.key)

    def _read_tagged(self) -> tuple[LockRecord | None, str] | None:
        """The record (None when unreadable) and its tag; None when there is no lock."""
        try:
            data, tag = self.storage.get_with_tag(self.key)
        except NotFound:
            return None
        return LockRecord.from_json(data), tag

    def acquire(self) -> None:
        """Take the lock or raise ``LockHeld`` naming the holder's job and expiry."""
        for _ in range(2):
            started = elapsed_clock()
            if self.storage.put_if_absent(self.key, self._record().to_json()):
                self._renewed_at = started
                with self._undone_if_interrupted():
                    self._confirm()
                return
            found = self._read_tagged()
            if found is None:
                # Released between our two requests: free again, and only put-if-absent may
                # take a free lock (another taker may be at it too).
                continue
            current, tag = found
            if current is not None and current.owner != self.owner and not self.expired(current):
                raise LockHeld(
                    f"archive lock held by job {current.job!r} ({current.holder}) until "
                    f"{current.expires_at.isoformat(timespec='seconds')}",
                    current,
                    tag,
                )
            if current is not None and current.owner != self.owner:
                log.warning(
                    "Taking over an archive lock whose holder is gone.",
                    extra={"job": self.job, "previous_job": current.job, "holder": current.holder},
                )
            with self._undone_if_interrupted():
                self.take_over(tag)
            return
        raise LockHeld("archive lock taken by another process meanwhile")

    @contextlib.contextmanager
    def _undone_if_interrupted(self) -> Iterator[None]:
        """Our record may be written and the lock not yet confirmed ours: a signal (SIGTERM,
        Ctrl-C) or a storage error there left it behind for a whole lease, as no ``with``
        block was entered to release it. Deleted if it is ours, then the error goes on."""
        try:
            yield
        except LockHeld:
            raise  # someone else's record: nothing of ours to undo
        except BaseException:
            with contextlib.suppress(Exception):
                current = self.read()
                if current is not None and current.owner == self.owner:
                    self.storage.delete(self.key)
            raise

    def expired(self, record: LockRecord) -> bool:
        """Whether another holder's ``record`` may be taken over: its holder, a process of this
        machine, is gone; or its lease ran out, by the record's date when our clock wrote it
        or that date is long past, otherwise once we have seen it unchanged for a whole lease."""
        if record.holder_is_gone():
            return True
        now = _now()
        if record.dated_here():
            if record.boot_expires > 0:
                # Not the wall clock: an NTP step or a resumed VM moves it for both processes,
                # and a step forward would hand a live holder's lock to a standby beside it.
                return record.boot_expires <= elapsed_clock()
            return record.expires_at <= now
        if record.expires_at + max(self.ttl, _CLOCK_SLACK) <= now:
            return True
        return self._watch.unchanged_secs(record) >= self.ttl.total_seconds()

    def take_over(self, tag: str) -> None:
        """Replace the record read with ``tag`` (another holder's, found expired; or ours) with
        ours, only if it is still that one, and confirm it."""
        started = elapsed_clock()
        if not self._replace_record(tag):
            # Replaced since: by another taker, or by this very write, applied but its answer
            # lost (the client's retry of it is then refused). Only the second is ours.
            self._still_ours()
            self._renewed_at = started
        time.sleep(_SETTLE_SECS)
        self._confirm()

    def _still_ours(self) -> None:
        """Raise ``LockHeld`` (with the record and its tag) unless the lock is our record."""
        found = self._read_tagged()
        current = found[0] if found else None
        if found is None or current is None or current.owner != self.owner:
            raise LockHeld(
                f"archive lock taken by job {current.job if current else '?'!r} meanwhile",
                current,
                found[1] if found else None,
            )

    def _confirm(self) -> None:
        self._still_ours()
        self._held = True
        self._lost = False
        self._stop.clear()
        self._renewer = threading.Thread(
            target=self._renew_loop, name=f"lock-renew-{self.job}", daemon=True
        )
        self._renewer.start()

    def renew(self) -> None:
        """Push the expiry on; raise ``LockHeld`` (and remember it: ``lost``) when another
        process took the lock over meanwhile, which it may once our lease ran out."""
        with self._renewing:
            current: LockRecord | None = None
            for _ in range(3):
                found = self._read_tagged()
                current = found[0] if found else None
                if found is None or current is None or current.owner != self.owner:
                    break
                if self._replace_record(found[1]):
                    return
                # Replaced between our read and our write: by another taker, or by this very
                # write, applied but its answer lost. Read again to tell.
            self._lost = True
            raise LockHeld(
                f"archive lock taken over by {current.holder if current else 'nobody'}",
                current,
            )

    def guard(self) -> None:
        """Before a write of the job: raise ``LockHeld`` unless the lock is still ours. Read
        again (and renewed) when the last renewal is older than half the lease: a process
        paused past its lease (a frozen VM) resumes here before its renewal thread notices."""
        if self._lost:
            raise LockHeld("archive lock taken over by another process")
        if elapsed_clock() - self._renewed_at > self.ttl.total_seconds() / 2:
            self.renew()

    @property
    def lost(self) -> bool:
        """Another process took the lock over while we held it."""
        return self._lost

    @property
    def renewed_at(self) -> float:
        """``time.monotonic()`` of the last write of our record."""
        return self._renewed_at

    def _renew_loop(self) -> None:
        interval = max(self.ttl.total_seconds() / 3, 0.05)
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LockHeld:
                log.error("Archive lock lost to another process.", extra={"job": self.job})
                self.on_lost()
                return
            except ConnectorError as exc:
                log.warning(
                    "Could not renew the archive lock.",
                    extra={"job": self.job, "error": str(exc)},
                )

    def on_lost(self) -> None:
        """Called from the renewal thread when the lock was found taken over."""

    def release(self) -> None:
        """Delete the lock if we still own it (a taken-over lock belongs to its new owner)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
            self._renewer = None
        if not self._held:
            return
        self._held = False
        if elapsed_clock() - self._renewed_at > self.ttl.total_seconds() / 2:
            # Not renewed for half a lease (a pause, a storage outage): another process may be
            # taking it over right now, and a delete between our read and its write would remove
            # *its* lock. Left to expire (a live holder renews every third of a lease).
            log.info("Archive lock left to expire: not renewed lately.", extra={"job": self.job})
            return
        # A blip of the archive's storage here would hold every job off for the whole lease,
        # and its error would replace the job's own outcome: a few quick tries, then a warning.
        for pause in (*_RELEASE_PAUSES, None):
            try:
                current = self.read()
                if current is not None and current.owner == self.owner:
                    self.storage.delete(self.key)
                return
            except RetryableError as exc:
                if pause is None:
                    self._not_released(exc)
                    return
                time.sleep(pause)
            except ConnectorError as exc:
                # Refused for good (a bucket policy without s3:DeleteObject): said, not raised.
                self._not_released(exc)
                return

    def _not_released(self, exc: ConnectorError) -> None:
        log.warning(
            "Could not release the archive lock: it is held until its lease expires.",
            extra={"job": self.job, "error": str(exc)},
        )

    @property
    def held(self) -> bool:
        return self._held

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
