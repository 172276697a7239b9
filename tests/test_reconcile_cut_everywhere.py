"""The run that repairs a retention gap and reconciles it, cut at every storage call.

A first run of the real connector (``run_forever``, in a thread) archives the simulator's
history over HTTP into a local directory and stops. While it is down the platform changes
objects, deletes some, merges one into another (a relationship follows the merge silently),
creates more, and trims its stream: a retention gap. The run that repairs it (the recovery from
the checkpoint, then the delete reconciliation, in groups of ``GROUP_EVENTS`` = 3 events) makes
every call to the archive's storage through ``CutStorage`` (a ``LocalStorage`` subclass:
listings, reads, the lease's writes, puts, deletes): an uncut run records them, and each case
runs it again on a fresh copy of the archive and cuts it at one of them, each of the four ways
of ``tests/support/cuts.py`` (``kill``, ``kill-after``: nothing of that run reaches the archive
from the cut on; ``lost-answer``, ``retry``: the run goes on). A call is named by its method and
the kind of its key (a reconciliation group's segment apart from the recovery's) and cut at the
same occurrence of that name as in the uncut run: heartbeats' checkpoint saves come as the clock
has them, the other calls in the same order every time.

After the cut the connector is started again, as an operator would (the lease of a killed run
names a process that is gone), until it has caught up and no reconciliation is due; then:

* ``verify`` reports no error, and no warning but the uncut run's and an orphan segment;
* the restored state equals the simulator's (``assert_restore_equals_platform``);
* the checkpoint's ``reconcile`` is done (``due: False``), with the uncut run's counts;
* the archive holds the uncut run's events once each: the recovery's under the same ids, the
  reconciliation's the same (their ids depend on the heartbeat it ran at).

``CUT_EVERYWHERE=1`` cuts at every call, each way; otherwise at a few calls of the
reconciliation (its first reads, a group's segment and manifest, the checkpoint after it).
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from connector import reconcile
from connector import storage as storage_mod
from connector.archive import ArchiveReader
from connector.checkpoint import CheckpointStore
from connector.run_lease import RUN_LEASE_KEY
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.storage import Body
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
EVERYWHERE = bool(os.environ.get("CUT_EVERYWHERE"))
LONG = pytest.mark.timeout(0 if EVERYWHERE else 300)
GROUP_EVENTS = 3
ALLOWED_WARNINGS = ("orphan segment ",)


Killed = cuts.Uncaught


class Plan(cuts.UncaughtPlan):
    """Cuts the run at the ``at[1]``-th call named ``at[0]`` (0 for the first)."""

    def __init__(self, at: tuple[str, int] | None = None, how: str = "kill") -> None:
        super().__init__(None, how)
        self.at = at
        self.seen: Counter[str] = Counter()

    def before(self, label: str) -> int:
        with self.lock:
            n = self.seen[label]
            self.seen[label] += 1
            if self.at == (label, n) and self.cut is None:
                self.cut = len(self.calls)
        return super().before(label)


def _kind(key: str, body: bytes | None = None) -> str:
    if key.startswith("events/") and body is not None:
        lines = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True).read()
        return "segment (reconcile)" if reconcile.REFERER.encode() in lines else "segment"
    for prefix, kind in (
        ("events/", "segment"),
        ("manifests/", "manifest"),
        ("quarantine/", "quarantine"),
        (".probe-", "probe"),
    ):
        if key.startswith(prefix):
            return kind
    return key


class CutStorage(cuts.CutStorage):
    """Calls named by their method and the kind of their key (a reconciliation's segment apart
    from the recovery's), not the key: the ids of a run's groups depend on the clock."""

    def label(self, method: str, key: str, body: Body | None = None) -> str:
        return f"{method} {_kind(key, body if isinstance(body, bytes) else None)}"


def _bury(root: Path) -> None:
    """The lease a killed run left names its process, which is gone now."""
    cuts.bury(LocalStorage(root), RUN_LEASE_KEY)


# ---------------------------------------------------------------------- the history
@dataclass
class World:
    sim: SimServer
    before: Path  # the archive the first run left, before the gap
    tmp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("reconcile-cut")
    with SimServer(token=TOKEN, heartbeat_secs=0.1) as sim:
        generate(sim.store, 60, seed=71)
        absorbed, kept, _ = merge_to_come(sim.store, "71")
        before = tmp / "before" / "archive"
        run = ConnectorThread(_env(sim, before, tmp / "first-work")).start()
        storage = LocalStorage(before)
        wait_until(lambda: caught_up(storage, str(sim.store.last_event_id)), what="first run")
        run.stop()
        assert run.error is None
        # While it is down: changes, deletes, a merge the relationship follows silently, and
        # creates; then the platform trims its stream past the checkpoint.
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


def _env(sim: SimServer, archive: Path, work: Path) -> dict[str, str]:
    return base_env(
        sim.url,
        TOKEN,
        str(archive),
        OPENCTI_SYNC_WORK_DIR=str(work),
        ARCHIVE_MAX_EVENTS="8",
        CONNECTOR_BACKOFF_INITIAL_SECS="0.01",
        CONNECTOR_BACKOFF_MAX_SECS="0.05",
        CONNECTOR_SHUTDOWN_TIMEOUT_SECS="3",
        CONNECTOR_LEASE_SECS="600",  # no renewal within a run: the same calls every time
    )


def _done(storage: LocalStorage, last: str) -> bool:
    cp = saved_checkpoint(storage)
    return (
        cp is not None
        and bool(cp.reconcile)
        and cp.reconcile.get("due") is False
        and caught_up(storage, last)
    )


def _run(world: World, root: Path, plan: Plan, monkeypatch: pytest.MonkeyPatch) -> Any:
    """One connector run on ``root`` (its archive through ``CutStorage(root, plan)``) until it
    died, or caught up with the reconciliation done; returns it (``error``, ``rc``)."""
    opened: list[CutStorage] = []

    def open_storage(uri: str, **_: Any) -> CutStorage:
        assert uri == str(root), uri
        opened.append(CutStorage(root, plan))
        return opened[-1]

    monkeypatch.setattr(storage_mod, "open_storage", open_storage)
    run = ConnectorThread(_env(world.sim, root, root.parent / "work")).start()
    plain = LocalStorage(root)
    last = str(world.sim.store.last_event_id)
    wait_until(lambda: not run.alive or _done(plain, last), timeout=60, what="the run's end")
    if run.alive:
        run.stop()
    run.join(15)
    return run


def _events(root: Path) -> tuple[list[tuple[str, str, bytes]], Counter[tuple[str, str, bytes]]]:
    """The archive's events: the stream's (id, event, data), the reconciliation's as a multiset
    of (event, STIX id, data): their ids depend on the heartbeat it ran at."""
    stream: list[tuple[str, str, bytes]] = []
    reconciled: Counter[tuple[str, str, bytes]] = Counter()
    for ev in ArchiveReader(LocalStorage(root)).events():
        if (ev.envelope.get("origin") or {}).get("referer") == reconcile.REFERER:
            reconciled[ev.event, ev.stix_id, bytes(ev.data)] += 1
        else:
            stream.append((ev.id_text, ev.event, bytes(ev.data)))
    return stream, reconciled


@dataclass
class Reference:
    calls: list[str]
    stream: list[tuple[str, str, bytes]]
    reconciled: Counter[tuple[str, str, bytes]]
    counts: dict[str, int]
    warnings: list[str]


COUNTS = ("refreshed", "deleted", "merged")


def _counts(root: Path) -> dict[str, int]:
    cp = CheckpointStore(LocalStorage(root)).load()
    assert cp is not None and cp.reconcile is not None
    assert cp.reconcile.get("due") is False and "failed" not in cp.reconcile, cp.reconcile
    return {k: int(cp.reconcile[k]) for k in COUNTS}


@pytest.fixture(scope="module")
def reference(world: World) -> Iterator[Reference]:
    mp = pytest.MonkeyPatch()
    mp.setattr(reconcile, "GROUP_EVENTS", GROUP_EVENTS)
    root = world.tmp / "uncut" / "archive"
    shutil.copytree(world.before, root)
    plan = Plan()
    run = _run(world, root, plan, mp)
    mp.undo()
    assert run.error is None and run.rc in (0, None), (run.error, run.rc)
    stream, reconciled = _events(root)
    report = verify_archive(LocalStorage(root), work_dir=world.tmp / "uncut" / "verify")
    assert report.ok, format_report(report)
    yield Reference(plan.calls, stream, reconciled, _counts(root), list(report.warnings))


def _case(
    world: World, ref: Reference, tmp: Path, at: tuple[str, int], how: str, mp: pytest.MonkeyPatch
) -> bool:
    """One case; False when the run was done before the cut (see below)."""
    root = tmp / "archive"
    shutil.copytree(world.before, root)
    plan = Plan(at, how)
    run = _run(world, root, plan, mp)
    if plan.cut is None:
        # Idle heartbeats' checkpoint saves come as the clock has them: this run was done
        # before that many (the uncut one made it). Every other call is always reached.
        assert at[0] == "put checkpoint.json", f"the cut {at} was never reached"
        assert run.error is None and run.rc in (0, None), (run.error, run.rc)
        return False
    if plan.dead:
        assert isinstance(run.error, Killed), (run.error, run.rc)
        _bury(root)
    else:
        # A transient failure: the run goes on by itself.
        assert run.error is None and run.rc in (0, None), (run.error, run.rc)
    # Cut before the repair's recovery was over, the restart finds the gap again (its
    # checkpoint is still in that recovery); from the reconciliation on, it must not.
    repaired = _named(ref.calls).index(at) >= ref.calls.index("list snapshots/")
    _restart_and_check(world, ref, root, tmp, mp, gaps=1 if repaired else None)
    return True


def _restart_and_check(
    world: World,
    ref: Reference,
    root: Path,
    tmp: Path,
    mp: pytest.MonkeyPatch,
    gaps: int | None = 1,
) -> None:
    """The connector started again until it is idle (once more after a run that finished: it
    must not redo anything), then the checks of the module docstring; ``gaps``: the retention
    gaps the checkpoint should record."""
    again = _run(world, root, Plan(), mp)
    assert again.error is None and again.rc in (0, None), (again.error, again.rc)
    cp = CheckpointStore(LocalStorage(root)).load()
    assert cp is not None
    if gaps is not None:
        assert len(cp.retention_gaps) == gaps, f"{len(cp.retention_gaps)} retention gaps recorded"
    storage = LocalStorage(root)
    report = verify_archive(storage, work_dir=tmp / "verify")
    assert report.ok, format_report(report)
    odd = [
        w for w in report.warnings if w not in ref.warnings and not w.startswith(ALLOWED_WARNINGS)
    ]
    assert not odd, f"verify warns {odd}"
    assert _counts(root) == ref.counts, "the reconciliation's counts differ from the uncut run's"
    stream, reconciled = _events(root)
    assert stream == ref.stream, "the stream's events differ from the uncut run's"
    twice = {k[:2]: n for k, n in reconciled.items() if n > 1}
    assert not twice, f"reconciliation events stored twice: {twice}"
    missing = [k[:2] for k in ref.reconciled - reconciled]
    extra = [k[:2] for k in reconciled - ref.reconciled]
    assert not missing and not extra, f"reconciliation events: missing {missing}, extra {extra}"
    assert_restore_equals_platform(storage, world.sim.store, tmp / "restore")


def _named(calls: list[str]) -> list[tuple[str, int]]:
    """Each call as (its name, its occurrence among the calls of that name)."""
    seen: Counter[str] = Counter()
    out = []
    for call in calls:
        out.append((call, seen[call]))
        seen[call] += 1
    return out


def _sample(calls: list[str], how: str) -> list[tuple[str, int]]:
    """The reconciliation's first read of the archive, a group's segment and its manifest, the
    checkpoint saved after the last group."""
    named = _named(calls)
    groups = [i for i, c in enumerate(calls) if c == "put_if_absent segment (reconcile)"]
    assert len(groups) >= 3, calls
    second = groups[1]
    manifest = next(i for i in range(second, len(calls)) if calls[i] == "put_if_absent manifest")
    after_last = next(i for i in range(groups[-1], len(calls)) if calls[i] == "put checkpoint.json")
    first_read = calls.index("list snapshots/")  # the reconciliation's materialise
    points = {
        "kill": [first_read, second],
        "kill-after": [second, manifest, after_last],
        "lost-answer": [manifest, after_last],
        "retry": [second, after_last],
    }[how]
    return [named[i] for i in points]


def test_the_uncut_repair_reconciles_in_groups(world: World, reference: Reference) -> None:
    """The uncut run deletes, merges and refreshes, in several groups, and restores right."""
    assert all(reference.counts[k] >= 1 for k in COUNTS), reference.counts
    assert sum(reference.reconciled.values()) > 2 * GROUP_EVENTS
    root = world.tmp / "uncut" / "archive"
    assert_restore_equals_platform(LocalStorage(root), world.sim.store, world.tmp / "uncut" / "r")
    print(f"{len(reference.calls)} calls")


@LONG
@pytest.mark.parametrize("how", cuts.KINDS)
def test_a_reconciling_run_cut_at_every_call(
    world: World, reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setattr(reconcile, "GROUP_EVENTS", GROUP_EVENTS)
    points = _named(reference.calls) if EVERYWHERE else _sample(reference.calls, how)
    failures: list[str] = []
    started = time.monotonic()
    cut = 0
    for n, at in enumerate(points):
        try:
            cut += _case(world, reference, tmp_path / f"{n}", at, how, monkeypatch)
        except AssertionError as exc:
            failures.append(f"{how} {at}: {str(exc)[:600]}")
    took = time.monotonic() - started
    print(f"{how}: {len(points)} cases ({cut} cut) in {took:.0f} s")
    assert not failures, f"{len(failures)} of {len(points)} cuts failed:\n" + "\n".join(failures)


class ArmPlan(Plan):
    """No storage cut: ``arm`` is called as the reconciliation starts to read the archive
    (its first listing of snapshots), just before it lists the platform."""

    def __init__(self, arm: Any) -> None:
        super().__init__()
        self.arm = arm

    def before(self, label: str) -> int:
        if label == "list snapshots/" and self.arm is not None:
            self.arm, arm = None, self.arm
            arm()
        return super().before(label)


# Faults of the next stream connection: the platform listing's (docs/SIMULATOR.md).
LISTING_FAULTS: list[dict[str, Any]] = [
    {"fail_next": {"status": 503, "count": 2}},
    {"fail_next": {"status": 429}},
    {"drop_after_events": 0},
    {"drop_after_events": 1, "mid_message": True},
    {"drop_after_events": 30},
    {"drop_after_events": 30, "drop_times": 2},
    {"drop_after_events": 40, "mid_message": True},
    {"stall_secs": 8, "stall_after_events": 10},
]


@LONG
@pytest.mark.parametrize("fault", LISTING_FAULTS, ids=lambda f: ",".join(map(str, f.values())))
def test_the_platform_listing_cut(
    world: World,
    reference: Reference,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fault: dict[str, Any],
) -> None:
    """The reconciliation's listing of the platform (one more recover-mode connection) refused,
    cut after some of its events (mid-message too), or stalled past the read timeout: never
    taken for a short list; the run retries and ends as the uncut one."""
    monkeypatch.setattr(reconcile, "GROUP_EVENTS", GROUP_EVENTS)
    root = tmp_path / "archive"
    shutil.copytree(world.before, root)
    armed: list[bool] = []

    def arm() -> None:
        world.sim.set_fault(**fault)
        armed.append(True)

    try:
        run = _run(world, root, ArmPlan(arm), monkeypatch)
    finally:
        world.sim.set_fault(**dict.fromkeys(fault))
    assert armed and run.error is None and run.rc in (0, None), (run.error, run.rc)
    failed = [
        r
        for r in caplog.records
        if r.getMessage() == "Delete reconciliation failed; retrying later."
        and "reconcile listing" in str(getattr(r, "error", ""))
    ]
    assert failed, "the fault did not reach the listing"
    _restart_and_check(world, reference, root, tmp_path, monkeypatch)


class FailingApi:
    """The simulator's GraphQL API failing its next ``times`` queries, one way: a 502 or a 429
    (not applied), the connection closed after the query was answered (the answer lost), or a
    page that is no GraphQL answer (a proxy's)."""

    def __init__(self, api: Any, how: str, times: int) -> None:
        self.api, self.how, self.times = api, how, times
        self.failed = 0

    def handle(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.times <= 0:
            status, data = self.api.handle(body, headers)
            return int(status), bytes(data)
        self.times -= 1
        self.failed += 1
        if self.how == "lost":
            self.api.handle(body, headers)
            raise ConnectionResetError("the answer is lost")  # the server closes the socket
        if self.how == "html":
            return 200, b"<html><body>502 Bad Gateway</body></html>"
        return int(self.how), b'{"errors": [{"message": "try again"}]}'

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)


@LONG
@pytest.mark.parametrize(("how", "times"), [("502", 1), ("429", 3), ("lost", 1), ("html", 2)])
def test_the_platform_lookup_cut(
    world: World,
    reference: Reference,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
    times: int,
) -> None:
    """The reconciliation's look-up of the archived objects missing from the listing
    (``stix(id)`` on the platform's API) failing for a transient reason: retried, never taken
    for "gone" or for a refusal; the run ends as the uncut one."""
    monkeypatch.setattr(reconcile, "GROUP_EVENTS", GROUP_EVENTS)
    root = tmp_path / "archive"
    shutil.copytree(world.before, root)
    failing: list[FailingApi] = []

    def arm() -> None:
        failing.append(FailingApi(world.sim._platform_api(), how, times))
        monkeypatch.setattr(world.sim, "_platform_api", lambda: failing[0])

    try:
        run = _run(world, root, ArmPlan(arm), monkeypatch)
    finally:
        monkeypatch.delattr(world.sim, "_platform_api", raising=False)
    assert run.error is None and run.rc in (0, None), (run.error, run.rc)
    assert failing and failing[0].failed == times, "the look-up was not cut"
    _restart_and_check(world, reference, root, tmp_path, monkeypatch)
