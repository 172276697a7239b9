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
  reconciliation's the same (their ids depend on the heartbeat it ran at), and nothing is
  quarantined.

``CUT_EVERYWHERE=1`` cuts at every call, each way; otherwise at a few calls of the
reconciliation (its first reads, a group's segment and manifest, the checkpoint after it).
More tests cut its HTTP requests to the simulator (the platform's listing, the look-up), or
drop the live stream's connection while its groups are written. The scene and the checks are
``tests/support/reconcile_cuts.py``'s, shared with the S3 sweep
(``tests/test_reconcile_s3_cut_everywhere.py``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector import reconcile
from tests.support import cuts
from tests.support.reconcile_cuts import (
    COUNTS,
    DROPS,
    GROUP_EVENTS,
    ArmPlan,
    LocalArchive,
    Reference,
    World,
    case,
    drop_case,
    drop_id,
    make_reference,
    make_world,
    named,
    restart_and_check,
    run_once,
    sample,
)
from tests.test_faults import assert_restore_equals_platform

EVERYWHERE, LONG = cuts.EVERYWHERE, cuts.LONG
LOCAL = LocalArchive()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from make_world(tmp_path_factory.mktemp("reconcile-cut"))


@pytest.fixture(scope="module")
def reference(world: World) -> Reference:
    return make_reference(world, LOCAL)


def test_the_uncut_repair_reconciles_in_groups(world: World, reference: Reference) -> None:
    """The uncut run deletes, merges and refreshes, in several groups, and restores right."""
    assert all(reference.counts[k] >= 1 for k in COUNTS), reference.counts
    assert sum(reference.reconciled.values()) > 2 * GROUP_EVENTS
    storage = LOCAL.plain(reference.uri)
    assert_restore_equals_platform(storage, world.sim.store, world.tmp / "uncut" / "r")
    print(f"{len(reference.calls)} calls")


@LONG
@pytest.mark.parametrize("how", cuts.KINDS)
def test_a_reconciling_run_cut_at_every_call(
    world: World, reference: Reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setattr(reconcile, "GROUP_EVENTS", GROUP_EVENTS)
    points = named(reference.calls) if EVERYWHERE else sample(reference.calls, LOCAL.names, how)
    failures: list[str] = []
    started = time.monotonic()
    cut = 0
    for n, at in enumerate(points):
        try:
            cut += case(world, LOCAL, reference, tmp_path / f"{n}", at, how, monkeypatch)
        except AssertionError as exc:
            failures.append(f"{how} {at}: {str(exc)[:600]}")
    took = time.monotonic() - started
    print(f"{how}: {len(points)} cases ({cut} cut) in {took:.0f} s")
    assert not failures, f"{len(failures)} of {len(points)} cuts failed:\n" + "\n".join(failures)


def first_read(arm: Any) -> ArmPlan:
    """No storage cut: ``arm`` is called as the reconciliation starts to read the archive
    (its first listing of snapshots), just before it lists the platform."""
    return ArmPlan(arm, LOCAL.names.first_read)


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
    uri = LOCAL.copy(world.before, tmp_path)
    armed: list[bool] = []

    def arm() -> None:
        world.sim.set_fault(**fault)
        armed.append(True)

    try:
        run = run_once(world, LOCAL, uri, first_read(arm), monkeypatch)
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
    restart_and_check(world, LOCAL, reference, uri, tmp_path, monkeypatch)


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
    uri = LOCAL.copy(world.before, tmp_path)
    failing: list[FailingApi] = []

    def arm() -> None:
        failing.append(FailingApi(world.sim._platform_api(), how, times))
        monkeypatch.setattr(world.sim, "_platform_api", lambda: failing[0])

    try:
        run = run_once(world, LOCAL, uri, first_read(arm), monkeypatch)
    finally:
        monkeypatch.delattr(world.sim, "_platform_api", raising=False)
    assert run.error is None and run.rc in (0, None), (run.error, run.rc)
    assert failing and failing[0].failed == times, "the look-up was not cut"
    restart_and_check(world, LOCAL, reference, uri, tmp_path, monkeypatch)


@LONG
@pytest.mark.parametrize("drop", DROPS, ids=drop_id)
def test_the_stream_dropped_while_the_groups_are_written(
    world: World,
    reference: Reference,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    drop: tuple[int, bool, dict[str, Any]],
) -> None:
    """The live stream's connection dropped between two groups' writes, or after a group's
    segment before its manifest (and its reconnection refused twice): the run reconnects and
    ends as the uncut one."""
    monkeypatch.setattr(reconcile, "GROUP_EVENTS", GROUP_EVENTS)
    drop_case(world, LOCAL, reference, tmp_path, monkeypatch, caplog, drop)
