"""Shared pieces of the cut-everywhere sweeps: a plan that records the calls of a run and cuts it
at one of them, the reader's items handed over one at a time, and a short stream with every
kind of event.

A case reruns the same stream from scratch and cuts it at one recorded call:

* ``kill`` / ``kill-after``: the process dies just before the call / just after it returned
  (every later call of that run fails with ``Killed``);
* ``lost-answer``: the call is applied, then fails with ``RetryableError`` as if its answer was
  lost on the way back (the run goes on and retries);
* ``retry``: the call fails once with ``RetryableError`` before it is applied.
"""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pytest

from connector.errors import NotFound, PermanentError, RetryableError
from connector.sim.store import SimStore
from connector.source import Item, ItemQueue
from connector.storage import Body, Storage
from connector.storage.local import LocalStorage
from tests.support.target import malware

# ``CUT_EVERYWHERE=1``: a sweep cuts at every call, each way, instead of at its sample; its tests
# (``LONG``) then run past the suite's per-test timeout.
EVERYWHERE = bool(os.environ.get("CUT_EVERYWHERE"))
LONG = pytest.mark.timeout(0 if EVERYWHERE else 300)

__all__ = [
    "EVERYWHERE",
    "KINDS",
    "LONG",
    "CutStorage",
    "Killed",
    "OneByOne",
    "Plan",
    "Uncaught",
    "UncaughtPlan",
    "bury",
    "cut_history",
    "malware_id",
]

KINDS = ("kill", "kill-after", "lost-answer", "retry")


def _gone_pid() -> int:
    """The pid of a process that has ended (a child, reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


_GONE = _gone_pid()


def bury(storage: Storage, key: str) -> None:
    """The lock or lease at ``key`` that a killed run left names its process, which is gone
    now (as after a real kill): the next run may take it over at once."""
    try:
        record = orjson.loads(storage.get(key))
    except NotFound:
        return  # none left
    record["pid"] = _GONE
    storage.put(key, orjson.dumps(record))


class Killed(PermanentError):
    """The simulated death of the process: every later call of that run fails."""


def _retryable(label: str, applied: bool) -> BaseException:
    said = "answer lost" if applied else "failed once"
    return RetryableError(f"cut: {label}: {said}")


class Plan:
    """Where one run is cut, and what was recorded on the way (shared by the run's parts).

    ``failure(label, applied)`` builds what a ``retry`` (applied False) or ``lost-answer``
    (applied True) cut raises: ``RetryableError`` by default, or what the layer below the
    interface raises (a botocore error for calls cut at the S3 client).

    A sweep whose code under test catches ``PermanentError`` names its own ``killed`` (a
    ``BaseException`` nothing catches); ``strict`` makes a call after the death fail the test
    instead of raising ``killed`` (a run that must do nothing once dead)."""

    killed: type[BaseException] = Killed
    strict = False

    def __init__(
        self,
        cut: int | None = None,
        how: str = "kill",
        failure: Callable[[str, bool], BaseException] = _retryable,
    ) -> None:
        assert how in KINDS, how
        self.cut, self.how = cut, how
        self.failure = failure
        self.calls: list[str] = []
        self.dead = False
        self.lock = threading.Lock()
        # Called once when the run dies (before the cut call raises).
        self.on_death: Callable[[], None] = lambda: None

    def before(self, label: str) -> int:
        """A call at our interface is about to be made: its index in the run."""
        with self.lock:
            if self.dead:
                assert not self.strict, f"a call after the kill: {label}"
                raise self.killed(f"dead (cut at {self.cut})")
            index = len(self.calls)
            self.calls.append(label)
            if index == self.cut and self.how == "retry":
                raise self.failure(label, False)
            if index == self.cut and self.how == "kill":
                self._die()
                raise self.killed(f"killed before {label}")
            return index

    def after(self, index: int) -> None:
        """Call ``index`` returned (it was applied)."""
        with self.lock:
            if self.dead:
                raise self.killed(f"dead (cut at {self.cut})")
            if index == self.cut and self.how == "kill-after":
                self._die()
                raise self.killed(f"killed after {self.calls[index]}")
            if index == self.cut and self.how == "lost-answer":
                raise self.failure(self.calls[index], True)

    def _die(self) -> None:
        self.dead = True
        self.on_death()


class Uncaught(BaseException):
    """The simulated death of the process, for a sweep whose code under test catches
    ``PermanentError`` (a pipeline, a job, a restore): nothing catches it."""


class UncaughtPlan(Plan):
    """A plan whose death is ``Uncaught``."""

    killed = Uncaught


class CutStorage(LocalStorage):
    """A local archive whose every call goes through ``plan``, named by ``label``."""

    def __init__(self, root: Path, plan: Plan) -> None:
        super().__init__(root)
        self.plan = plan

    def label(self, method: str, key: str, body: Body | None = None) -> str:
        """How a call is named in the plan (by default its method and key)."""
        return f"{method} {key}"

    def _call(self, label: str, fn: Callable[..., Any], *args: Any) -> Any:
        call = self.plan.before(label)
        out = fn(*args)
        self.plan.after(call)
        return out

    def put_if_absent(self, key: str, body: Body) -> bool:
        label = self.label("put_if_absent", key, body)
        return bool(self._call(label, super().put_if_absent, key, body))

    def put(self, key: str, body: bytes) -> None:
        self._call(self.label("put", key, body), super().put, key, body)

    def get(self, key: str) -> bytes:
        return bytes(self._call(self.label("get", key), super().get, key))

    def get_with_tag(self, key: str) -> tuple[bytes, str]:
        found: tuple[bytes, str] = self._call(
            self.label("get_with_tag", key), super().get_with_tag, key
        )
        return found

    def replace_if(self, key: str, body: bytes, tag: str) -> bool:
        label = self.label("replace_if", key, body)
        return bool(self._call(label, super().replace_if, key, body, tag))

    def open(self, key: str) -> BinaryIO:
        fh: BinaryIO = self._call(self.label("open", key), super().open, key)
        return fh

    def exists(self, key: str) -> bool:
        return bool(self._call(self.label("exists", key), super().exists, key))

    def size(self, key: str) -> int:
        return int(self._call(self.label("size", key), super().size, key))

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[str]:
        self.plan.before(f"list {prefix}")  # a listing is read as it is consumed
        for key in super().list(prefix, start_after):
            if self.plan.dead:
                raise self.plan.killed("a listing read after the kill")
            yield key

    def delete(self, key: str) -> None:
        self._call(self.label("delete", key), super().delete, key)


class OneByOne(ItemQueue):
    """The reader's items handed over one at a time, so that batches are cut by count at the
    same places in every run (the simulator sends a preloaded log in a few large reads).

    The reader offers its list again when the queue was full; the items of it already taken are
    not handed over twice (a large event fills the queue's bytes)."""

    def __init__(self, count: int, max_bytes: int) -> None:
        super().__init__(count, max_bytes)
        self._partial: tuple[list[Item], int] | None = None

    def put(self, item: list[Item], block: bool = True, timeout: float | None = None) -> None:
        done = self._partial[1] if self._partial and self._partial[0] is item else 0
        for n in range(done, len(item)):
            try:
                super().put([item[n]], block, timeout)
            except queue.Full:
                self._partial = (item, n)
                raise
        self._partial = None


def malware_id(n: int) -> str:
    return str(malware(f"cut {n}")["id"])


def cut_history(a: SimStore) -> None:
    """Creates, updates, a merge and a delete: every kind of event (and of push on a target)."""
    for n in range(7):
        time.sleep(0.003)
        a.upsert(malware(f"cut {n}"))
    time.sleep(0.003)
    a.update(malware_id(1), set={"description": "changed"})
    # The merge's source changed just before the merge, in the same batch of two.
    time.sleep(0.003)
    a.update(malware_id(4), set={"description": "absorbed"})
    time.sleep(0.003)
    a.merge(malware_id(3), [malware_id(4)])
    time.sleep(0.003)
    a.delete(malware_id(2))
    time.sleep(0.003)
    a.upsert(malware("cut 7"))
