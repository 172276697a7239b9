"""A restore into a platform cut at every call it makes, then run again with the same work dir.

Source platform A plays a history that the real connector (``run``) archives, files and all:
a handmade one (creates, updates, relationships, a standard-id change, a merge, deletes, two
attached files) or the simulator's generator on a sample. The target, platform double B,
starts stale: it holds A as it was half-way (the merge's source still an object of its own,
objects deleted later still there). A clean restore into such a B records every call the
restore makes at our own interfaces: each request of the real ``OpenCTITarget`` (push, delete,
id resolution) and each write of the progress file. Each case then restores into a fresh stale
B and cuts the run at one of those calls:

* ``kill``: the process dies just before the call; ``kill-after``: just after it returned.
  Nothing of that run happens after the cut (the restore has no ``finally`` that saves
  progress, and none would run on a SIGKILL), then a new run with the same work dir and the
  same B, its state materialised again, finishes the job;
* ``kill-twice``: as ``kill-after``, and the resumed run is killed too, after its first push
  or delete; a third run finishes.

Whatever the cut, B ends as the uncut restore leaves it (A at the archive's end, files
included), the progress shown ends at 100%, and the progress file is gone. The same sweep runs
in process over the random histories of ``test_restore_every_point``, restored at a few points
over a platform holding their end, with every pair of cuts behind ``CUT_TWICE=1``.

The cuts are made in subclasses of our own classes (the target, the progress file); pycti,
HTTP and the double are real. ``CUT_EVERYWHERE=1`` cuts at every call (about 5 min);
otherwise a few calls for each way of cutting (about 20 s).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from connector import restore
from connector.files import file_entries
from connector.restore import RestoreReport, materialise_plan, restore_to_target
from connector.sim import sample_bundle
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.storage.local import LocalStorage
from connector.target.opencti import OpenCTITarget, Push
from tests.support import cuts
from tests.support.compare import assert_same_state
from tests.support.connector import ConnectorThread, base_env, caught_up, wait_until
from tests.support.cuts import EVERYWHERE
from tests.support.target import malware

# The whole sweeps run longer than the suite's per-test timeout.
LONG = pytest.mark.timeout(0 if cuts.EVERYWHERE or os.environ.get("CUT_TWICE") else 300)
TOKEN_A = "restore-cut-token-a"
TOKEN_B = "restore-cut-token-b"
BATCH = 2  # small batches: many pushes and progress writes
REPORT = "report--6d1f3c2a-9b7e-4f0a-8c55-2e4d6a8b0c11"
SAMPLE = "DATA-TEST-STIX2_v2.json"
RENAMED = "malware--3f9e2d1c-7a6b-4c5d-8e9f-0a1b2c3d4e5f"


Killed = cuts.Uncaught


class Bar:
    """A progress display that keeps what it was last told."""

    def __init__(self) -> None:
        self.last, self.closed = (0, 0), False

    def update(self, done: int, total: int) -> None:
        self.last = (done, total)

    def close(self) -> None:
        self.closed = True


class Plan(cuts.UncaughtPlan):
    """Where one run is cut, and the calls it made (labels, in order); nothing of a run may
    happen after its death."""

    strict = True


class CutTarget(OpenCTITarget):
    """The real target; every request the restore makes to B goes through ``plan``."""

    def __init__(self, plan: Plan, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan = plan

    def _push(self, push: Push) -> None:
        with_data = any("data" in f for f in _files(push.objects))
        call = self.plan.before(f"push {push.kind}" + (" file" if with_data else ""))
        super()._push(push)
        self.plan.after(call)

    def resolve_ids(self, stix_ids: list[str]) -> dict[str, str]:
        call = self.plan.before("resolve")
        found = super().resolve_ids(stix_ids)
        self.plan.after(call)
        return found

    def close(self) -> None:
        if self.plan.dead:
            self._checked = False  # a killed process says nothing more to B
        super().close()


def _files(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for o in objects for f in file_entries(o)]


def _cut_resume(plan: Plan) -> type[Any]:
    """The restore's progress file, each write of it a call of ``plan``."""

    class CutResume(restore._Resume):  # noqa: SLF001
        def save(self, step: int, at: tuple[int, str], deleting: Collection[str] = ()) -> None:
            # A save before a delete request keeps the position and names the ids it deletes.
            call = plan.before(f"save {restore.STEPS[step]}" + (" deleting" if deleting else ""))
            super().save(step, at, deleting)
            plan.after(call)

    return CutResume


@dataclass
class Source:
    a: SimServer
    archive: LocalStorage
    stale: list[dict[str, Any]]  # what B holds before the restore
    files: dict[str, bytes]  # the report's files at the archive's end
    batch: int  # the restore's batch size


def _report(refs: list[str]) -> dict[str, Any]:
    return {
        "type": "report",
        "spec_version": "2.1",
        "id": REPORT,
        "name": "rcut report",
        "published": "2026-01-01T00:00:00.000Z",
        "object_refs": refs,
    }


def _history(a: SimStore) -> list[dict[str, Any]]:
    """Plays the history on A; returns A's objects half-way (the stale target's state)."""
    names = [f"rcut {n}" for n in range(7)]
    for name in names:
        a.create(malware(name))
    ids = [str(malware(name)["id"]) for name in names]

    def rel(n: int, src: str, dst: str) -> dict[str, Any]:
        return {
            "type": "relationship",
            "spec_version": "2.1",
            "id": f"relationship--{uuid.uuid5(uuid.NAMESPACE_URL, f'rcut rel {n}')}",
            "relationship_type": "related-to",
            "source_ref": src,
            "target_ref": dst,
        }

    a.create(rel(0, ids[0], ids[1]))
    a.create(rel(1, ids[2], ids[3]))  # goes with ids[2], deleted later
    a.create(rel(2, ids[4], ids[5]))  # moves to the merge target
    a.create(_report([ids[0], ids[1]]))
    a.update(ids[1], set={"description": "first edit"})
    stale = list(a.dump_bundle()["objects"])
    a.update(ids[1], set={"description": "second edit"})
    a.attach_file(REPORT, "analysis.pdf", b"%PDF-1.7 restore cut")
    a.merge(ids[3], [ids[4]])  # B still holds ids[4] as an object of its own
    a.delete(ids[2])  # B still holds it, and its relationship
    a.update(ids[6], set={"name": "rcut renamed"}, new_id=RENAMED)
    a.create(malware("rcut 7"))
    a.create(rel(3, str(malware("rcut 7")["id"]), ids[0]))
    a.delete(ids[5])  # deleted with its relationship to the merge target
    a.attach_file(REPORT, "iocs.csv", b"ip\n10.0.0.1\n", mime_type="text/csv")
    return stale


def _generated(a: SimStore) -> list[dict[str, Any]]:
    """The simulator's random edits (creates, updates, id changes, merges, deletes, with
    relationships, sightings and containers) on a sample; A half-way."""
    a.load_bundle(sample_bundle(SAMPLE))
    generate(a, 60, seed=3)
    stale = list(a.dump_bundle()["objects"])
    generate(a, 60, seed=4)
    a.attach_file(REPORT, "analysis.pdf", b"%PDF-1.7 restore cut")
    return stale


@pytest.fixture(scope="module", params=["handmade", "generated"])
def source(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Source]:
    root = tmp_path_factory.mktemp("restore-cut")
    handmade = request.param == "handmade"
    with SimServer(token=TOKEN_A, heartbeat_secs=0.2) as a:
        archive = str(root / "archive")
        storage = LocalStorage(archive)
        a.store.create(malware("rcut seed"))
        run = ConnectorThread(base_env(a.url, TOKEN_A, archive)).start()
        # Archived as it happens (not by a first recovery, which holds no deletes).
        wait_until(lambda: caught_up(storage, str(a.store.last_event_id)), what="the first event")
        if handmade:
            stale = _history(a.store)
        else:
            a.store.create(_report([str(malware("rcut seed")["id"])]))
            stale = _generated(a.store)
        wait_until(lambda: caught_up(storage, str(a.store.last_event_id)), what="the archive")
        run.stop()
        assert run.error is None
        files = _contents(a.store, REPORT)
        assert files and (len(files) == 2 or not handmade)
        yield Source(a, storage, stale, files, BATCH if handmade else 12)


def _contents(store: SimStore, ref: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for f in store.files_of(ref):
        body = store.file_content(unquote(f["uri"].removeprefix("/storage/get/")))
        assert body is not None, f["name"]
        out[f["name"]] = body
    return out


def _run(source: Source, b: SimServer, work: Path, plan: Plan) -> RestoreReport | None:
    """One restore run into B (materialised again, as a new process does); None if killed."""
    state, _ = materialise_plan(source.archive, until=None, work_dir=work)
    target = CutTarget(  # as restore_cli makes it
        plan,
        url=b.url,
        token=TOKEN_B,
        connector_id="7c1d2e3f-0000-4000-8000-00000000beef",
        connector_name="opencti-sync (restore)",
        source_url=source.a.url,
        replay_guard=False,
    )
    saved = restore._Resume  # noqa: SLF001
    restore._Resume = _cut_resume(plan)  # type: ignore[misc]  # noqa: SLF001
    bar = Bar()
    try:
        report = restore_to_target(
            state,
            target,
            batch_size=source.batch,
            resume_file=work / "restore-progress.json",
            target_name=b.url,
            progress=bar,
            files=source.archive,
        )
        # The progress shown (the metric a restore serves) ends at 100%, resumed or not.
        assert bar.closed and bar.last[0] == bar.last[1], f"progress ended at {bar.last}"
        return report
    except Killed:
        assert plan.dead
        return None
    finally:
        restore._Resume = saved  # type: ignore[misc]  # noqa: SLF001
        target.close()
        state.close()


def _stale_b() -> SimStore:
    store = SimStore()
    store.api_token = TOKEN_B  # type: ignore[attr-defined]
    return store


# What the summary of a restore resumed after a cut says as the uncut one does (``deleted``
# too: the ids a delete request asks for are saved before it is sent, so a request
# acknowledged just before the cut still counts what B held then).
SAME_IN_SUMMARY = (
    "pushed",
    "deleted",
    "deletes_by_type",
    "files",
    "files_lacking",
    "files_too_large",
    "skipped_deletes",
    "unchecked_merged",
    "upserts_by_type",
)


def _case(
    source: Source, tmp: Path, cut: int | None, how: str
) -> tuple[list[str], SimStore, RestoreReport]:
    """A restore into a stale B cut at call ``cut`` (None: not cut), then run again until it
    finished; the first run's calls, B and the last run's report."""
    store = _stale_b()
    work = tmp / "work"
    with SimServer(token=TOKEN_B, store=store) as b:
        store.load_bundle(source.stale)
        first = Plan(cut, "kill" if how == "kill" else "kill-after")
        report = _run(source, b, work, first)
        assert (report is None) == first.dead, "the cut was never reached"
        if first.dead:
            # kill-twice: the resumed run is killed after its first write to B.
            again = _WritesPlan() if how == "kill-twice" else Plan()
            report = _run(source, b, work, again)
            if again.dead:
                report = _run(source, b, work, Plan())
            assert report is not None
            saves = [c for c in first.calls[: first.cut or 0] if c.startswith("save")]
            if saves or (how == "kill-after" and first.calls[-1].startswith("save")):
                assert report.resumed_from is not None, "started over"
        assert not (work / "restore-progress.json").exists()
    return first.calls, store, report


class _WritesPlan(Plan):
    """Killed just after the first push or delete it makes."""

    def after(self, index: int) -> None:
        if not self.dead and self.calls[index].startswith("push"):
            self.dead = True
            raise Killed(f"killed after {self.calls[index]}")


def _check(source: Source, store: SimStore, reference: dict[str, Any], what: str) -> None:
    try:
        assert_same_state(reference, store.dump_bundle())
        assert _contents(store, REPORT) == source.files
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from exc


def test_an_uncut_restore_over_a_stale_platform_gives_the_source(
    source: Source, tmp_path: Path
) -> None:
    """B ends as A, files included (lists only merged with B's stale ones: the API push merges
    them, docs/OPENCTI-TARGET.md, so the generated history, which changes lists, compares ids)."""
    calls, store, _ = _case(source, tmp_path, None, "kill")
    want = source.a.store.dump_bundle()
    if source.batch == BATCH:
        _check(source, store, want, "uncut")
    else:
        ids = sorted(str(o["id"]) for o in store.dump_bundle()["objects"])
        assert ids == sorted(str(o["id"]) for o in want["objects"])
        assert _contents(store, REPORT) == source.files
    kinds = {" ".join(c.split(" ")[:2]) for c in calls}
    assert {"push upsert", "push delete", "save merged-away", "save deleted"} <= kinds, calls
    assert "push upsert file" in calls and "resolve" in calls, calls


@LONG
def test_restore_cut_at_every_call(source: Source, tmp_path: Path) -> None:
    """The whole sweep with CUT_EVERYWHERE=1; otherwise a few calls for each way of cutting."""
    calls, clean, summary = _case(source, tmp_path / "clean", None, "kill")
    reference = clean.dump_bundle()  # A at the archive's end (lists merged with B's)
    everywhere = EVERYWHERE
    failures: list[str] = []
    for n, how in enumerate(("kill", "kill-after", "kill-twice")):
        points = range(len(calls)) if everywhere else [(5 + 11 * n) % len(calls)]
        for i in points:
            try:
                _, store, report = _case(source, tmp_path / f"{how}-{i}", i, how)
                _check(source, store, reference, "cut")
                for key in SAME_IN_SUMMARY:
                    got, want = getattr(report, key), getattr(summary, key)
                    assert got == want, f"summary {key}: {got} after the cut, {want} uncut"
                assert sum(report.deletes_by_type.values()) == report.deleted
            except AssertionError as exc:
                failures.append(f"{i} {how} {calls[i]}: {str(exc)[:400]}")
    assert not failures, f"{len(failures)} of the cuts failed:\n" + "\n".join(failures)


# ---------------------------------------------------------------------- random histories
class CutPlatform:
    """A simulator platform as an in-process restore target (as in test_restore_every_point),
    every call the restore makes to it going through ``plan``."""

    def __init__(self, store: SimStore, plan: Plan) -> None:
        self.store, self.plan = store, plan

    def push_objects(self, objects: list[dict[str, Any]]) -> None:
        call = self.plan.before("push upsert")
        for stix in objects:
            self.store.upsert(stix)
        self.plan.after(call)

    def delete_ids(self, stix_ids: list[str]) -> None:
        call = self.plan.before("push delete")
        for sid in stix_ids:
            self.store.delete(sid)
        self.plan.after(call)

    def resolve_ids(self, stix_ids: list[str]) -> dict[str, str]:
        call = self.plan.before("resolve")
        found = {sid: self.store.get(sid) for sid in stix_ids}
        self.plan.after(call)
        return {sid: str(o["id"]) for sid, o in found.items() if o is not None}


def _restore_in_process(state: Any, store: SimStore, work: Path, plan: Plan) -> Bar | None:
    """One run into ``store``: what it last showed, None when it was killed."""
    saved = restore._Resume  # noqa: SLF001
    restore._Resume = _cut_resume(plan)  # type: ignore[misc]  # noqa: SLF001
    bar = Bar()
    try:
        restore_to_target(
            state,
            CutPlatform(store, plan),
            batch_size=3,
            resume_file=work / "restore-progress.json",
            target_name="b",
            progress=bar,
        )
        assert bar.closed
        return bar
    except Killed:
        return None
    finally:
        restore._Resume = saved  # type: ignore[misc]  # noqa: SLF001


def _finished(
    state: Any, store: SimStore, work: Path, plan: Plan, reference: dict[str, Any]
) -> str | None:
    """The run that resumes a cut one, with ``plan`` (which may cut it again: then one more
    run finishes): None when B ends as the uncut restore left it and the progress at 100%,
    else what differs."""
    bar = _restore_in_process(state, store, work, plan)
    bar = bar or _restore_in_process(state, store, work, Plan())
    assert bar is not None
    try:
        assert_same_state(reference, store.dump_bundle())
        # The progress shown ends at 100% (the metric a restore serves).
        assert bar.last[0] == bar.last[1], f"progress ended at {bar.last}"
    except AssertionError as exc:
        return str(exc)
    return None


Point = tuple[Any, list[dict[str, Any]]]


def _random_case(seed: int, tmp: Path) -> tuple[LocalStorage, list[Point], Any]:
    """A random history archived, a few of its points, and a maker of platforms holding its
    end."""
    from tests.test_restore_every_point import _history as random_history
    from tests.test_state import CLOCK0, archive_events, ticking_clock

    try:
        stream, points = random_history(seed)
    except AssertionError as exc:  # the generator's own checks (a seed with no merge)
        pytest.skip(f"history of seed {seed} unfit: {str(exc)[:80]}")
    archive = LocalStorage(tmp / "archive")
    archive_events(archive, stream, per_segment=7)

    def platform() -> SimStore:
        store = SimStore(clock=ticking_clock(start=CLOCK0 + 10**9, step=1))
        store.load_bundle(points[-1][1])
        return store

    return archive, points[:: max(1, len(points) // 4)], platform


RANDOM_SEEDS = range(int(os.environ.get("RESTORE_CUT_SEEDS", "1")))


@LONG
@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_restore_of_random_histories_cut_at_every_call(seed: int, tmp_path: Path) -> None:
    """Random histories of test_restore_every_point (merges, deletes, re-creations under old
    ids), each restored at a few points over a platform holding the history's end, cut at
    every call (CUT_EVERYWHERE=1) or at a few: B ends as the uncut restore leaves it."""
    archive, wanted, platform = _random_case(seed, tmp_path)
    everywhere = EVERYWHERE
    failures: list[str] = []
    for n, (until, _) in enumerate(wanted):
        state, _ = materialise_plan(archive, until=until, work_dir=tmp_path / "w")
        with state:
            clean, plan = platform(), Plan()
            bar = _restore_in_process(state, clean, tmp_path / "clean", plan)
            assert bar is not None and bar.last[0] == bar.last[1], bar and bar.last
            reference = clean.dump_bundle()
            calls = plan.calls
            for how in ("kill", "kill-after", "kill-twice"):
                cuts = range(len(calls)) if everywhere else [(3 + 7 * n) % len(calls)]
                for i in cuts:
                    work = tmp_path / f"{n}-{how}-{i}"
                    store = platform()
                    first = Plan(i, "kill" if how == "kill" else "kill-after")
                    assert _restore_in_process(state, store, work, first) is None
                    again = _WritesPlan() if how == "kill-twice" else Plan()
                    error = _finished(state, store, work, again, reference)
                    if error is not None:
                        failures.append(f"--until {until} {i} {how} {calls[i]}: {error}"[:500])
    assert not failures, f"{len(failures)} of the cuts failed:\n" + "\n".join(failures)


@LONG
def test_restore_of_a_random_history_cut_twice(tmp_path: Path) -> None:
    """Killed after call i, then the resumed run killed before or after each of its own calls
    j in turn, then run to the end (CUT_TWICE=1: every i and j; otherwise a few)."""
    archive, wanted, platform = _random_case(0, tmp_path)
    everywhere = bool(os.environ.get("CUT_TWICE"))
    failures: list[str] = []
    for n, (until, _) in enumerate(wanted):
        state, _ = materialise_plan(archive, until=until, work_dir=tmp_path / "w")
        with state:
            clean, plan = platform(), Plan()
            assert _restore_in_process(state, clean, tmp_path / "clean", plan) is not None
            reference = clean.dump_bundle()
            firsts = range(len(plan.calls)) if everywhere else [(2 + 5 * n) % len(plan.calls)]
            for i in firsts:
                for how in ("kill", "kill-after"):
                    j = 0 if everywhere else 1 + n
                    while True:
                        work, store = tmp_path / f"{n}-{i}-{how}-{j}", platform()
                        assert (
                            _restore_in_process(state, store, work, Plan(i, "kill-after")) is None
                        )
                        second = Plan(j, how)
                        error = _finished(state, store, work, second, reference)
                        if error is not None:
                            what = f"--until {until} {i} then {j} {how}"
                            failures.append(f"{what}: {error}"[:500])
                        if not second.dead or not everywhere:
                            break
                        j += 1
    assert not failures, f"{len(failures)} of the cuts failed:\n" + "\n".join(failures)
