"""The scene of the reconciliation sweeps: a retention gap repaired and reconciled, its run cut
at a call to the archive's storage (or its stream dropped) and restarted until idle, then
checked against the uncut run. Shared by ``tests/test_reconcile_cut_everywhere.py`` (a local
directory, cut at each ``Storage`` call) and ``tests/test_reconcile_s3_cut_everywhere.py`` (a
bucket on moto's server, cut at each S3 request); see the first's docstring.

Where the archive lives is an ``Archive``: it copies the archive the first run left, opens it
plainly, or with every call going through a plan, and names the few calls the sweeps pick.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import zstandard

from connector import reconcile
from connector import storage as storage_mod
from connector.archive import ArchiveReader
from connector.checkpoint import CheckpointStore
from connector.run_lease import RUN_LEASE_KEY
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.storage import Body, Storage
from connector.storage.local import LocalStorage
from connector.verify import format_report, verify_archive
from tests.support import cuts
from tests.support.connector import (
    ConnectorThread,
    base_env,
    caught_up,
    saved_checkpoint,
    wait_until,
)
from tests.support.scenes import merge_to_come
from tests.test_faults import assert_restore_equals_platform

TOKEN = "reconcile-cut-token"
GROUP_EVENTS = 3
ALLOWED_WARNINGS = ("orphan segment ",)
COUNTS = ("refreshed", "deleted", "merged")

Killed = cuts.Uncaught


class Plan(cuts.UncaughtPlan):
    """Cuts the run at the ``at[1]``-th call named ``at[0]`` (0 for the first)."""

    def __init__(
        self,
        at: tuple[str, int] | None = None,
        how: str = "kill",
        failure: Callable[[str, bool], BaseException] | None = None,
    ) -> None:
        if failure is None:
            super().__init__(None, how)
        else:
            super().__init__(None, how, failure)
        self.at = at
        self.seen: Counter[str] = Counter()

    def before(self, label: str) -> int:
        with self.lock:
            n = self.seen[label]
            self.seen[label] += 1
            if self.at == (label, n) and self.cut is None:
                self.cut = len(self.calls)
        return super().before(label)


class ArmPlan(Plan):
    """No storage cut: ``arm`` is called once, just before the ``n``-th call named ``label``
    (``after``: just after it returned)."""

    def __init__(self, arm: Callable[[], None], label: str, n: int = 0, after: bool = False):
        super().__init__()
        self.arm: Callable[[], None] | None = arm
        self.label, self.n, self.on_return = label, n, after
        self.armed_at: int | None = None

    def before(self, label: str) -> int:
        if label == self.label and self.seen[label] == self.n and not self.on_return:
            self._fire()
        index = super().before(label)
        if label == self.label and self.seen[label] == self.n + 1 and self.on_return:
            self.armed_at = index
        return index

    def after(self, index: int) -> None:
        super().after(index)
        if index == self.armed_at:
            self._fire()

    def _fire(self) -> None:
        self.arm, arm = None, self.arm
        if arm is not None:
            arm()


def kind(key: str, body: bytes | None = None) -> str:
    """The kind of an archive key; an events segment with its ``body``: a reconciliation
    group's apart from the recovery's."""
    if key.startswith("events/") and body is not None:
        lines = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True).read()
        return "segment (reconcile)" if reconcile.REFERER.encode() in lines else "segment"
    for prefix, name in (
        ("events/", "segment"),
        ("manifests/", "manifest"),
        ("quarantine/", "quarantine"),
        (".probe-", "probe"),
    ):
        if key.startswith(prefix):
            return name
    return key


class CutStorage(cuts.CutStorage):
    """Calls named by their method and the kind of their key (a reconciliation's segment apart
    from the recovery's), not the key: the ids of a run's groups depend on the clock."""

    def label(self, method: str, key: str, body: Body | None = None) -> str:
        return f"{method} {kind(key, body if isinstance(body, bytes) else None)}"


@dataclass(frozen=True)
class Names:
    """The calls a sweep picks, as its archive names them."""

    first_read: str  # the reconciliation's first read (its materialise lists the snapshots)
    group: str  # the write of a reconciliation group's segment
    manifest: str  # the write of a manifest
    checkpoint: str  # a checkpoint save


class Archive(Protocol):
    names: Names

    def copy(self, before: Path, tmp: Path) -> str:
        """A fresh copy of the local archive ``before``; returns its URI."""

    def env(self, uri: str) -> dict[str, str]:
        """The connector's settings for it."""

    def plain(self, uri: str) -> Storage: ...

    def cut(self, uri: str, plan: Plan) -> Storage:
        """The archive with every call going through ``plan``."""


class LocalArchive:
    names = Names(
        "list snapshots/",
        "put_if_absent segment (reconcile)",
        "put_if_absent manifest",
        "put checkpoint.json",
    )

    def copy(self, before: Path, tmp: Path) -> str:
        shutil.copytree(before, tmp / "archive")
        return str(tmp / "archive")

    def env(self, uri: str) -> dict[str, str]:
        return {}

    def plain(self, uri: str) -> Storage:
        return LocalStorage(uri)

    def cut(self, uri: str, plan: Plan) -> Storage:
        return CutStorage(Path(uri), plan)


# ---------------------------------------------------------------------- the history
@dataclass
class World:
    sim: SimServer
    before: Path  # the archive the first run left (a local directory), before the gap
    tmp: Path


def make_world(tmp: Path) -> Iterator[World]:
    """The simulator, and the archive its first run left; then, while it was down, changes,
    deletes, a merge the relationship follows silently, creates, and a trim past the
    checkpoint (a fixture's body)."""
    with SimServer(token=TOKEN, heartbeat_secs=0.1) as sim:
        generate(sim.store, 60, seed=71)
        absorbed, kept, _ = merge_to_come(sim.store, "71")
        before = tmp / "before" / "archive"
        run = ConnectorThread(env(sim, str(before), tmp / "first-work")).start()
        storage = LocalStorage(before)
        wait_until(lambda: caught_up(storage, str(sim.store.last_event_id)), what="first run")
        run.stop()
        assert run.error is None
        objects = list(sim.store.objects())
        malware = [o for o in objects if o["type"] == "malware" and o["id"] not in (absorbed, kept)]
        for o in malware[:3]:
            sim.store.update(o["id"], set={"description": "changed while down"})
        for o in [o for o in objects if o["type"] == "indicator"][:4]:
            sim.store.delete(o["id"])
        sim.store.merge(kept, [absorbed])
        generate(sim.store, 15, seed=72, mix="creates")
        sim.store.trim(3)
        yield World(sim, before, tmp)


def env(sim: SimServer, archive: str, work: Path, **extra: str) -> dict[str, str]:
    return base_env(
        sim.url,
        TOKEN,
        archive,
        OPENCTI_SYNC_WORK_DIR=str(work),
        ARCHIVE_MAX_EVENTS="8",
        CONNECTOR_BACKOFF_INITIAL_SECS="0.01",
        CONNECTOR_BACKOFF_MAX_SECS="0.05",
        CONNECTOR_SHUTDOWN_TIMEOUT_SECS="3",
        CONNECTOR_LEASE_SECS="600",  # no renewal within a run: the same calls every time
        **extra,
    )


def done(storage: Storage, last: str) -> bool:
    cp = saved_checkpoint(storage)
    return (
        cp is not None
        and bool(cp.reconcile)
        and cp.reconcile.get("due") is False
        and caught_up(storage, last)
    )


def run_once(
    world: World,
    archive: Archive,
    uri: str,
    plan: Plan,
    monkeypatch: pytest.MonkeyPatch,
    until: Callable[[], bool] = lambda: True,
) -> Any:
    """One connector run on ``uri`` (every call through ``plan``) until it died, or caught up
    with the reconciliation done and ``until()``; returns it (``error``, ``rc``)."""

    def open_storage(opened: str, **_: Any) -> Storage:
        assert opened == uri, opened
        return archive.cut(uri, plan)

    monkeypatch.setattr(storage_mod, "open_storage", open_storage)
    work = Path(world.tmp / "work" / uri.replace("/", "_"))
    run = ConnectorThread(env(world.sim, uri, work, **archive.env(uri))).start()
    plain = archive.plain(uri)
    last = str(world.sim.store.last_event_id)
    try:
        wait_until(
            lambda: not run.alive or (done(plain, last) and until()),
            timeout=60,
            what="the run's end",
        )
    finally:
        if run.alive:
            run.stop()  # also when it timed out: the next case must not share the simulator
        run.join(15)
    return run


Stream = list[tuple[str, str, bytes]]


def events(storage: Storage) -> tuple[Stream, Counter[tuple[str, str, bytes]]]:
    """The archive's events: the stream's (id, event, data), the reconciliation's as a multiset
    of (event, STIX id, data): their ids depend on the heartbeat it ran at."""
    stream: Stream = []
    reconciled: Counter[tuple[str, str, bytes]] = Counter()
    for ev in ArchiveReader(storage).events():
        if (ev.envelope.get("origin") or {}).get("referer") == reconcile.REFERER:
            reconciled[ev.event, ev.stix_id, bytes(ev.data)] += 1
        else:
            stream.append((ev.id_text, ev.event, bytes(ev.data)))
    return stream, reconciled


def counts(storage: Storage) -> dict[str, int]:
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.reconcile is not None
    assert cp.reconcile.get("due") is False and "failed" not in cp.reconcile, cp.reconcile
    return {k: int(cp.reconcile[k]) for k in COUNTS}


@dataclass
class Reference:
    calls: list[str]
    stream: Stream
    reconciled: Counter[tuple[str, str, bytes]]
    counts: dict[str, int]
    warnings: list[str]
    uri: str


def make_reference(world: World, archive: Archive) -> Reference:
    """The uncut run's calls and what it left."""
    mp = pytest.MonkeyPatch()
    mp.setattr(reconcile, "GROUP_EVENTS", GROUP_EVENTS)
    uri = archive.copy(world.before, world.tmp / "uncut")
    plan = Plan()
    try:
        run = run_once(world, archive, uri, plan, mp)
    finally:
        mp.undo()
    assert run.error is None and run.rc in (0, None), (run.error, run.rc)
    storage = archive.plain(uri)
    stream, reconciled = events(storage)
    report = verify_archive(storage, work_dir=world.tmp / "uncut" / "verify")
    assert report.ok, format_report(report)
    return Reference(plan.calls, stream, reconciled, counts(storage), list(report.warnings), uri)


def case(
    world: World,
    archive: Archive,
    ref: Reference,
    tmp: Path,
    at: tuple[str, int],
    how: str,
    mp: pytest.MonkeyPatch,
    failure: Callable[[str, bool], BaseException] | None = None,
) -> bool:
    """One case; False when the run was done before the cut (see below)."""
    uri = archive.copy(world.before, tmp)
    plan = Plan(at, how, failure)
    run = run_once(world, archive, uri, plan, mp)
    if plan.cut is None:
        # Idle heartbeats' checkpoint saves come as the clock has them: this run was done
        # before that many (the uncut one made it). Every other call is always reached.
        assert at[0] == archive.names.checkpoint, f"the cut {at} was never reached"
        assert run.error is None and run.rc in (0, None), (run.error, run.rc)
        return False
    if plan.dead:
        assert isinstance(run.error, Killed), (run.error, run.rc)
        # The lease a killed run left names its process, which is gone now.
        cuts.bury(archive.plain(uri), RUN_LEASE_KEY)
    else:
        # A transient failure: the run goes on by itself.
        assert run.error is None and run.rc in (0, None), (run.error, run.rc)
    # Cut before the repair's recovery was over, the restart finds the gap again (its
    # checkpoint is still in that recovery); from the reconciliation on, it must not.
    repaired = named(ref.calls).index(at) >= ref.calls.index(archive.names.first_read)
    restart_and_check(world, archive, ref, uri, tmp, mp, gaps=1 if repaired else None)
    return True


def restart_and_check(
    world: World,
    archive: Archive,
    ref: Reference,
    uri: str,
    tmp: Path,
    mp: pytest.MonkeyPatch,
    gaps: int | None = 1,
) -> None:
    """The connector started again until it is idle (once more after a run that finished: it
    must not redo anything), then the checks of the sweeps; ``gaps``: the retention gaps the
    checkpoint should record."""
    again = run_once(world, archive, uri, Plan(), mp)
    assert again.error is None and again.rc in (0, None), (again.error, again.rc)
    storage = archive.plain(uri)
    cp = CheckpointStore(storage).load()
    assert cp is not None
    if gaps is not None:
        assert len(cp.retention_gaps) == gaps, f"{len(cp.retention_gaps)} retention gaps recorded"
    report = verify_archive(storage, work_dir=tmp / "verify")
    assert report.ok, format_report(report)
    odd = [
        w for w in report.warnings if w not in ref.warnings and not w.startswith(ALLOWED_WARNINGS)
    ]
    assert not odd, f"verify warns {odd}"
    assert counts(storage) == ref.counts, "the reconciliation's counts differ from the uncut run's"
    stream, reconciled = events(storage)
    assert stream == ref.stream, "the stream's events differ from the uncut run's"
    twice = {k[:2]: n for k, n in reconciled.items() if n > 1}
    assert not twice, f"reconciliation events stored twice: {twice}"
    missing = [k[:2] for k in ref.reconciled - reconciled]
    extra = [k[:2] for k in reconciled - ref.reconciled]
    assert not missing and not extra, f"reconciliation events: missing {missing}, extra {extra}"
    assert not list(storage.list("quarantine/")), "events quarantined"
    assert_restore_equals_platform(storage, world.sim.store, tmp / "restore")


def named(calls: list[str]) -> list[tuple[str, int]]:
    """Each call as (its name, its occurrence among the calls of that name)."""
    seen: Counter[str] = Counter()
    out = []
    for call in calls:
        out.append((call, seen[call]))
        seen[call] += 1
    return out


def sample(calls: list[str], names: Names, how: str) -> list[tuple[str, int]]:
    """The reconciliation's first read of the archive, a group's segment and its manifest, the
    checkpoint saved after the last group."""
    at = named(calls)
    groups = [i for i, c in enumerate(calls) if c == names.group]
    assert len(groups) >= 3, calls
    second = groups[1]
    manifest = next(i for i in range(second, len(calls)) if calls[i] == names.manifest)
    after_last = next(i for i in range(groups[-1], len(calls)) if calls[i] == names.checkpoint)
    first_read = calls.index(names.first_read)
    points = {
        "kill": [first_read, second],
        "kill-after": [second, manifest, after_last],
        "lost-answer": [manifest, after_last],
        "retry": [second, after_last],
    }[how]
    return [at[i] for i in points]


# Where the live stream is dropped while the groups are written: before the second group's
# segment (between two groups), after it before its manifest (inside one); and there with the
# next two connections refused (the stream still down while the last groups go).
DROPS: list[tuple[int, bool, dict[str, Any]]] = [
    (1, False, {}),
    (2, False, {}),
    (1, True, {}),
    (1, True, {"fail_next": {"status": 503, "count": 2}}),
]


def drop_id(drop: tuple[int, bool, dict[str, Any]]) -> str:
    group, after, fault = drop
    return f"group{group}" + ("-manifest" if after else "") + ("-refused" if fault else "")


def drop_case(
    world: World,
    archive: Archive,
    ref: Reference,
    tmp: Path,
    mp: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    drop: tuple[int, bool, dict[str, Any]],
) -> None:
    """The live stream's connection dropped by the simulator at a point of the groups' writes
    (``DROPS``): the run reconnects by itself (its next connection seen in the log) and ends as
    the uncut one."""
    caplog.set_level(logging.INFO, logger="connector.source")  # "Stream connecting." is INFO
    records = caplog.records
    group, after, fault = drop
    uri = archive.copy(world.before, tmp)
    seen: list[int] = []

    def arm() -> None:
        seen.append(len(records))
        if fault:
            world.sim.set_fault(**fault)
        world.sim.drop_connections()

    def reconnected() -> bool:
        said = [r.getMessage() for r in records[seen[0] :]] if seen else []
        return "Stream reconnecting." in said and "Stream connecting." in said

    plan = ArmPlan(arm, archive.names.group, group, after)
    try:
        run = run_once(world, archive, uri, plan, mp, until=reconnected)
    finally:
        world.sim.set_fault(**dict.fromkeys(fault))
    assert seen, "the groups' writes were not reached"
    assert run.error is None and run.rc in (0, None), (run.error, run.rc)
    assert reconnected(), "the stream did not reconnect"
    if fault:
        refused = [r for r in records[seen[0] :] if "503" in str(getattr(r, "reason", ""))]
        assert refused, "the reconnection was not refused"
    restart_and_check(world, archive, ref, uri, tmp, mp)
