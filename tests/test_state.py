"""StateStore: folding archived events gives the simulated platform's own state.

A SimStore plays a user editing a platform (creates, updates, a standard-id change, a merge,
deletes with cascades, a re-creation); its stream log is parsed like SSE, archived with the real
ArchiveSink into a LocalStorage, read back, and folded. The result must equal the simulator's
``dump_bundle()`` exactly, with the tombstones the platform never sends.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from connector.archive import ArchiveReader, ArchiveSink
from connector.errors import ConnectorError
from connector.events import OCTI_EXT, RECONCILE_REFERER, EventId, StreamEvent, octi_ext
from connector.restore import materialise_plan
from connector.sim import sample_bundle
from connector.sim.store import SimStore
from connector.sink import Batch
from connector.snapshot import fold_segments, write_snapshot
from connector.state import PHASES, StateStore
from connector.storage.local import LocalStorage
from tests.support.simlog import copy_event, sim_events

SAMPLE = "DATA-TEST-STIX2_v2.json"  # real platform test data, packaged by the simulator
CLOCK0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
STEP_MS = 1_000

MARKING_WHITE = "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9"
SPELEVO = "malware--c6006dd5-31ca-45c2-8ae0-4e428e712f88"
PARADISE = "malware--faa5b705-cf44-4e50-8472-29e5fec43c3c"
APT41 = "intrusion-set--18854f55-ac7c-4634-bd9a-352dd07613b7"
APT41_NEW = "intrusion-set--0f0e0d0c-0b0a-4090-8070-605040302010"
AP_KEEP = "attack-pattern--2fc04aa5-48c1-49ec-919a-b88241ef1d17"
AP_GONE = "attack-pattern--489a7797-01c3-4706-8cd1-ec56a9db3adc"
CIRCL = "identity--72de07e8-e6ed-4dfe-b906-1e82fae1d132"
CAMPAIGN = "campaign--92d46985-17a6-4610-8be8-cc70c82ed214"
REPORT = "report--a445d22a-db0c-4b5d-9ec8-e9ad0b6dbdd7"
REL_USES_PARADISE = "relationship--1fc9b5f8-3822-44c5-85d9-ee3476ca26de"
REL_ON_REL = "relationship--8d2200a8-f9ef-4345-95d1-ba3ed49606f9"  # indicates REL_USES_PARADISE
REL_TO_AP_GONE = "relationship--e35b3fc1-47f3-4ccb-a8fe-65a0864edd02"
REL_APT41_USES = "relationship--9f999fc5-5c74-4964-ab87-ee4c7cdc37a3"
REL_APT41_TARGETS = "relationship--2326c8b3-ef45-4978-98d0-0059728275c4"
SIGHTING_AT_CIRCL = "sighting--ee20065d-2555-424f-ad9e-0f8428623c75"
REL_CAMPAIGN = "relationship--6d59077d-a2fb-4217-846f-c7cf038672fa"


# ---------------------------------------------------------------------- helpers (shared)
def ticking_clock(start: int = CLOCK0, step: int = STEP_MS) -> Callable[[], int]:
    counter = itertools.count()
    return lambda: start + next(counter) * step


def new_sim() -> SimStore:
    return SimStore(clock=ticking_clock())


def _groups(events: list[StreamEvent]) -> Iterator[tuple[EventId, list[StreamEvent]]]:
    """(group id, events) runs: the group id is the running maximum of the event ids."""
    hwm: EventId | None = None
    run: list[StreamEvent] = []
    for ev in events:
        if hwm is not None and ev.id > hwm and run:
            yield hwm, run
            run = []
        hwm = ev.id if hwm is None or ev.id > hwm else hwm
        run.append(ev)
    if run and hwm is not None:
        yield hwm, run


def archive_events(
    storage: LocalStorage,
    events: list[StreamEvent],
    *,
    per_segment: int = 10,
    after: EventId | None = None,
) -> EventId | None:
    """Write ``events`` through the real ArchiveSink, about ``per_segment`` events a segment."""
    sink = ArchiveSink(storage)
    batch: list[StreamEvent] = []
    first: EventId | None = None
    last: EventId | None = after
    for gid, run in _groups(events):
        if first is None:
            first = gid
        batch.extend(run)
        last = gid
        if len(batch) >= per_segment:
            sink.write(Batch(first_id=first, last_id=gid, events=batch, after_id=after))
            after, batch, first = gid, [], None
    if batch and first is not None and last is not None:
        sink.write(Batch(first_id=first, last_id=last, events=batch, after_id=after))
    return last


def state_objects(state: StateStore) -> list[dict[str, Any]]:
    return sorted((o for _, _, _, o in state.objects()), key=lambda o: str(o["id"]))


def sim_objects(store: SimStore) -> list[dict[str, Any]]:
    return list(store.dump_bundle()["objects"])


def assert_equal_objects(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    ida, idb = [o["id"] for o in a], [o["id"] for o in b]
    assert ida == idb, f"only in A: {set(ida) - set(idb)}, only in B: {set(idb) - set(ida)}"
    for x, y in zip(a, b, strict=True):
        assert x == y, f"{x['id']} differs"


Mark = tuple[str, list[dict[str, Any]]]  # (last event id, simulator objects at that point)


def run_scenario(store: SimStore) -> list[Mark]:
    """The edit script; returns the simulator's state after each step."""
    marks: list[Mark] = []

    def mark() -> None:
        assert store.last_event_id is not None
        marks.append((store.last_event_id, sim_objects(store)))

    bundle = sample_bundle(SAMPLE)
    store.load_bundle(bundle)
    mark()
    store.update(SPELEVO, set={"description": "Exploit kit, edited"})
    store.update(REPORT, set={"labels": ["report", "restored"]})
    mark()
    store.update(APT41, new_id=APT41_NEW)  # standard id change: referrers follow silently
    mark()
    store.merge(AP_KEEP, [AP_GONE])
    mark()
    store.delete(PARADISE)  # one event; relationships (and one on a relationship) go with it
    store.delete(CIRCL)  # a sighting's where_sighted target, and others' created_by_ref
    store.delete(MARKING_WHITE)  # object_marking_refs everywhere lose it
    mark()
    store.delete(CAMPAIGN)
    campaign = next(o for o in bundle["objects"] if o["id"] == CAMPAIGN)
    store.create(campaign)  # re-created: a legitimate resurrection
    store.update(CAMPAIGN, set={"description": "back again"})
    mark()
    return marks


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStorage, list[Mark]]:
    """An archive of the whole scenario (module-scoped: read-only for the tests)."""
    root = tmp_path_factory.mktemp("archive")
    store = new_sim()
    marks = run_scenario(store)
    events, _ = sim_events(store)
    storage = LocalStorage(root)
    archive_events(storage, events, per_segment=10)
    return storage, marks


def replay(storage: LocalStorage, path: Path, until: EventId | None = None) -> StateStore:
    state = StateStore(path)
    state.apply_many(ArchiveReader(storage).events(until=until))
    return state


# ---------------------------------------------------------------------- tests
def test_replay_equals_simulator(scenario: tuple[LocalStorage, list[Mark]], tmp_path: Path) -> None:
    storage, marks = scenario
    with replay(storage, tmp_path / "s.sqlite") as state:
        assert_equal_objects(state_objects(state), marks[-1][1])
        assert state.as_of == EventId.parse(marks[-1][0])


@pytest.mark.parametrize("step", [0, 1, 2, 3, 4])
def test_replay_until_each_step(
    scenario: tuple[LocalStorage, list[Mark]], tmp_path: Path, step: int
) -> None:
    storage, marks = scenario
    until, expected = marks[step]
    with replay(storage, tmp_path / "s.sqlite", EventId.parse(until)) as state:
        assert_equal_objects(state_objects(state), expected)


def test_id_change_keeps_identity_and_alias(
    scenario: tuple[LocalStorage, list[Mark]], tmp_path: Path
) -> None:
    storage, marks = scenario
    with replay(storage, tmp_path / "s.sqlite", EventId.parse(marks[2][0])) as state:
        by_old, by_new = state.get(APT41), state.get(APT41_NEW)
        assert by_new is not None and by_old == by_new and by_new["id"] == APT41_NEW
        assert [t for t in state.tombstones() if t.stix_id == APT41] == []
        rel = state.get(REL_APT41_USES)
        assert rel is not None and rel["source_ref"] == APT41_NEW
        assert state.counts()["objects"] == len(marks[0][1])


def test_merge_tombstones_sources_and_repoints(
    scenario: tuple[LocalStorage, list[Mark]], tmp_path: Path
) -> None:
    storage, marks = scenario
    with replay(storage, tmp_path / "s.sqlite", EventId.parse(marks[3][0])) as state:
        merged = [t for t in state.tombstones() if t.reason == "merged"]
        assert [(t.stix_id, t.into) for t in merged] == [(AP_GONE, AP_KEEP)]
        target = state.get(AP_GONE)  # the absorbed id now resolves to the target
        assert target is not None and target["id"] == AP_KEEP
        rel = state.get(REL_TO_AP_GONE)
        assert rel is not None and rel["target_ref"] == AP_KEEP


def test_delete_cascades_like_the_platform(
    scenario: tuple[LocalStorage, list[Mark]], tmp_path: Path
) -> None:
    storage, marks = scenario
    with replay(storage, tmp_path / "s.sqlite", EventId.parse(marks[4][0])) as state:
        gone = {t.stix_id: t.reason for t in state.tombstones()}
        for sid in (PARADISE, REL_USES_PARADISE, REL_ON_REL, SIGHTING_AT_CIRCL, CIRCL):
            assert gone.get(sid) == "deleted", sid
            assert state.get(sid) is None
        report = state.get(REPORT)
        assert report is not None and PARADISE not in report["object_refs"]
        assert all(
            MARKING_WHITE not in (o.get("object_marking_refs") or []) for o in state_objects(state)
        )
        assert all(o.get("created_by_ref") != CIRCL for o in state_objects(state))


def test_delete_of_an_object_never_archived_still_cascades(tmp_path: Path) -> None:
    """The archive started after PARADISE was created (or the stream filtered it out): its one
    delete event still takes the relationships on it, as the platform's delete does."""
    store = new_sim()
    store.load_bundle(sample_bundle(SAMPLE))
    first, pos = sim_events(store)
    store.delete(PARADISE)
    later, _ = sim_events(store, pos)
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many([ev for ev in first if ev.stix_id != PARADISE] + later)
        assert state.get(REL_USES_PARADISE) is None and state.get(REL_ON_REL) is None
        assert_equal_objects(state_objects(state), sim_objects(store))


def test_recreate_resurrects(scenario: tuple[LocalStorage, list[Mark]], tmp_path: Path) -> None:
    storage, marks = scenario
    with replay(storage, tmp_path / "s.sqlite") as state:
        campaign = state.get(CAMPAIGN)
        assert campaign is not None and campaign["description"] == "back again"
        tombs = {t.stix_id for t in state.tombstones()}
        assert CAMPAIGN not in tombs
        assert REL_CAMPAIGN in tombs  # its relationships stayed deleted
        counts = state.counts()
        assert (
            counts["merged"] == 1 and counts["tombstones"] == counts["merged"] + counts["deleted"]
        )


def test_version_guard_and_update_first(tmp_path: Path) -> None:
    store = new_sim()
    store.load_bundle(sample_bundle(SAMPLE))
    first, pos = sim_events(store)
    store.update(SPELEVO, set={"description": "v2"})
    store.update(SPELEVO, set={"description": "v3"})
    later, _ = sim_events(store, pos)
    stale_create = next(ev for ev in first if ev.stix_id == SPELEVO)
    stale_update = later[0]
    # Re-sends of older versions under later ids (dependency re-send, recovery duplicate).
    next_ms = later[-1].id.ms + 1
    resend = [
        StreamEvent.from_sse(f"{next_ms}-0", "create", stale_create.raw),
        StreamEvent.from_sse(f"{next_ms}-1", "update", stale_update.raw),
    ]
    with StateStore(tmp_path / "a.sqlite") as state:
        state.apply_many(first + later + resend)
        assert_equal_objects(state_objects(state), sim_objects(store))
        assert state.as_of == EventId(next_ms, 1)
    # An update may come before any create: it is a full upsert.
    with StateStore(tmp_path / "b.sqlite") as state:
        state.apply(later[-1])
        obj = state.get(SPELEVO)
        assert obj is not None and obj["description"] == "v3"
        assert state.counts() == {"objects": 1, "tombstones": 0}


def test_version_guard_holds_across_batches(tmp_path: Path) -> None:
    """A stale re-send folded a few thousand events after the object's newer version (a later
    batch, its ids still waiting to be written to the alias table) must not replace it."""
    store = new_sim()
    store.load_bundle(sample_bundle(SAMPLE))
    first, pos = sim_events(store)
    store.update(SPELEVO, set={"description": "v2"})
    for i in range(2500):  # more than one fold batch of other objects
        store.create({"type": "malware", "id": f"malware--{uuid.UUID(int=i)}", "name": f"m{i}"})
    later, _ = sim_events(store, pos)
    stale = next(ev for ev in first if ev.stix_id == SPELEVO)
    resend = StreamEvent.from_sse(f"{later[-1].id.ms + 1}-0", "create", stale.raw)
    with StateStore(tmp_path / "s.sqlite", scratch=True) as state:
        state.apply_many([*first, *later, resend])
        obj = state.get(SPELEVO)
        assert obj is not None and obj["description"] == "v2"
        assert_equal_objects(state_objects(state), sim_objects(store))


def test_merge_target_sent_early_keeps_the_sources_apart(tmp_path: Path) -> None:
    """The live stream sends the merged target (its stix_ids naming the sources) as a
    dependency before the merge event: until the merge, the sources stay separate objects."""
    store = new_sim()
    store.load_bundle(sample_bundle(SAMPLE))
    events, pos = sim_events(store)
    store.merge(SPELEVO, [PARADISE])
    merge = sim_events(store, pos)[0][-1]
    assert merge.event == "merge"
    early = copy_event(f"{merge.id.ms}-{merge.id.seq}", store.get(SPELEVO))
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many([*events, early])
        source = state.get(PARADISE)
        assert source is not None and source["id"] == PARADISE  # not stolen by the target
        assert state.get(SPELEVO) is not None
        state.apply(merge)
        target = state.get(PARADISE)
        assert target is not None and target["id"] == SPELEVO
        assert_equal_objects(state_objects(state), sim_objects(store))


def test_a_later_absorber_sent_ahead_is_not_taken_for_a_merge_source(tmp_path: Path) -> None:
    """A live stream read late sends objects as they are *now*: the entity that absorbs a merge's
    target later (and with it the sources' ids) can come before that merge, and a source the
    archive never held (replaced by the first recovery) is then found under its ids. The merge
    must not remove that entity as its source, and what named the source must follow it."""
    store = new_sim()
    store.load_bundle(sample_bundle(SAMPLE))
    events, pos = sim_events(store)
    third = "malware--00000000-0000-4000-8000-00000000000a"
    store.create({"type": "malware", "id": third, "name": "Third"})
    report = "report--00000000-0000-4000-8000-00000000000b"
    store.create(
        {
            "type": "report",
            "id": report,
            "name": "R",
            "published": "2026-01-01T00:00:00.000Z",
            "object_refs": [third],
        }
    )
    store.merge(PARADISE, [third])  # Paradise absorbs Third ...
    store.merge(SPELEVO, [PARADISE])  # ... and is absorbed by Spelevo
    later, _ = sim_events(store, pos)
    created_third, created_report, first, second = later
    assert (first.event, second.event) == ("merge", "merge")
    ahead = copy_event(first.id_text, store.get(SPELEVO))
    with StateStore(tmp_path / "s.sqlite") as state:
        # The archive starts after Third's creation; the report comes in its version of then.
        state.apply_many([*events, created_report, ahead, first])
        spelevo = state.get(SPELEVO)
        assert spelevo is not None and spelevo["id"] == SPELEVO  # not removed as "Third"
        # The report named Third: it names the entity holding Third's ids from this merge on.
        assert (state.get(report) or {}).get("object_refs") == [SPELEVO]
        state.apply(second)
        assert_equal_objects(state_objects(state), sim_objects(store))
        assert (state.get(report) or {}).get("object_refs") == [SPELEVO]


def test_state_persists_and_rolls_back(tmp_path: Path) -> None:
    store = new_sim()
    store.load_bundle(sample_bundle(SAMPLE))
    events, _ = sim_events(store)
    path = tmp_path / "s.sqlite"
    with StateStore(path) as state:
        state.apply_many(events[:10])
        before = state.counts()

        def broken() -> Iterator[StreamEvent]:
            yield from events[10:20]
            raise RuntimeError("reader failed")

        with pytest.raises(RuntimeError):
            state.apply_many(broken())
        assert state.counts() == before and state.as_of == events[9].id
        # What the first fold committed is still found by its ids: its aliases were committed
        # with it, not left waiting for the fold that was undone.
        assert all(state.get(ev.stix_id) is not None for ev in events[:10])
    with StateStore(path) as state:  # reopened: same state and position
        assert state.counts() == before and state.as_of == events[9].id
        assert all(state.get(ev.stix_id) is not None for ev in events[:10])


def test_scratch_store_folds_alike_and_refuses_use_after_a_failure(
    scenario: tuple[LocalStorage, list[Mark]], tmp_path: Path
) -> None:
    """Restore, snapshot and verify build scratch stores: no rollback journal (a quarter of a
    1M fold), the same state; a failed fold cannot be undone, so the store refuses any further use
    with a clear error instead of answering from half a transaction."""
    storage, marks = scenario
    with StateStore(tmp_path / "journaled.sqlite") as state:
        fold_segments(state, ArchiveReader(storage), start_after=None)
    assert (tmp_path / "journaled.sqlite-journal").exists()
    with StateStore(tmp_path / "scratch.sqlite", scratch=True) as state:
        fold_segments(state, ArchiveReader(storage), start_after=None)
        assert_equal_objects(state_objects(state), marks[-1][1])
        assert state.as_of == EventId.parse(marks[-1][0])
    assert not (tmp_path / "scratch.sqlite-journal").exists()

    events = list(ArchiveReader(storage).events())
    state = StateStore(tmp_path / "broken.sqlite", scratch=True)
    state.apply_many(events[:10])

    def broken() -> Iterator[StreamEvent]:
        yield from events[10:20]
        raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError):
        state.apply_many(broken())
    with pytest.raises(ConnectorError, match="discarded after a failed transaction"):
        state.counts()
    with pytest.raises(ConnectorError, match="discarded after a failed transaction"):
        state.apply_many(events[20:])
    state.close()  # closing it is still fine


def test_reopened_store_still_finds_what_it_holds(tmp_path: Path) -> None:
    """Lookups skip ids never stored in this process; a reopened store must still find its own
    objects (updated in place, not created twice), folded from events and from archive lines."""
    store = new_sim()
    store.load_bundle(sample_bundle(SAMPLE))
    created, pos = sim_events(store)
    store.update(SPELEVO, set={"description": "edited after a restart"})
    store.update(AP_KEEP, set={"description": "edited in a segment"})
    updates, _ = sim_events(store, pos)
    assert len(updates) == 2
    path = tmp_path / "s.sqlite"
    with StateStore(path) as state:
        state.apply_many(created)
        before = state.counts()
    with StateStore(path) as state:
        state.apply_many(updates[:1])
        assert state.counts() == before
    stale = next(ev for ev in created if ev.stix_id == SPELEVO)  # a re-sent older version
    with StateStore(path) as state:
        state.apply_many([stale])
        assert (state.get(SPELEVO) or {}).get("description") == "edited after a restart"
    storage = LocalStorage(tmp_path / "archive")
    archive_events(storage, updates[1:])
    with StateStore(path) as state:
        fold_segments(state, ArchiveReader(storage), start_after=None)
        assert state.counts() == before
        assert_equal_objects(state_objects(state), sim_objects(store))


def test_scratch_store_reads_aliases_still_waiting(tmp_path: Path) -> None:
    """A scratch store keeps new objects' aliases in memory across folds (a flush per segment
    rewrote most of a large alias table); every read, and the file it leaves, must see them."""
    store = new_sim()
    store.load_bundle(sample_bundle(SAMPLE))
    events, _ = sim_events(store)
    expected = sim_objects(store)
    half = len(events) // 2
    with StateStore(tmp_path / "read.sqlite", scratch=True) as state:
        state.apply_many(events[:half])  # two folds of creates: nothing written to aliases yet
        state.apply_many(events[half:])
        for obj in expected:
            assert (state.get(obj["id"]) or {}).get("id") == obj["id"]
    path = tmp_path / "closed.sqlite"
    with StateStore(path, scratch=True) as state:
        state.apply_many(events[:half])
        state.apply_many(events[half:])
    with StateStore(path) as reopened:
        assert_equal_objects(state_objects(reopened), expected)
        for obj in expected:
            iid = obj["extensions"][OCTI_EXT]["id"]
            assert (reopened.get(iid) or {}).get("id") == obj["id"]


@pytest.mark.parametrize("edit", ["delete", "merge"])
def test_granted_refs_follow_deletes_and_merges(tmp_path: Path, edit: str) -> None:
    """The extension's ``granted_refs`` are refs like the top-level ones (protocol doc §5.2): a
    deleted organisation leaves them, a merged one is renamed to the merge target; the fold and
    the simulator both do so."""
    org1, org2 = (
        "identity--00000000-0000-4000-8000-0000000000a1",
        "identity--00000000-0000-4000-8000-0000000000a2",
    )
    mal = "malware--00000000-0000-4000-8000-0000000000a3"
    store = new_sim()
    for sid, name in ((org1, "o1"), (org2, "o2")):
        store.create(
            {"type": "identity", "id": sid, "name": name, "identity_class": "organization"}
        )
    store.create(
        {
            "type": "malware",
            "id": mal,
            "name": "m",
            "is_family": True,
            "extensions": {OCTI_EXT: {"granted_refs": [org1, org2]}},
        }
    )
    if edit == "delete":
        store.delete(org2)
    else:
        store.merge(org1, [org2])
    events, _ = sim_events(store)
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many(events)
        folded = state.get(mal)
        assert folded is not None
        assert octi_ext(folded).get("granted_refs") == [org1]
        assert_equal_objects(state_objects(state), sim_objects(store))


def _uses(rel: str, source: str, target: str) -> dict[str, Any]:
    return {
        "type": "relationship",
        "id": rel,
        "relationship_type": "uses",
        "source_ref": source,
        "target_ref": target,
    }


def test_a_relationship_sent_ahead_follows_its_endpoint_not_an_older_holder_of_its_id(
    tmp_path: Path,
) -> None:
    """A live stream read late sends a relationship as it is *now*: its source named by the
    standard id an entity takes later, while a malware deleted in between still holds that id
    here. The delete must not take the relationship with it: the extension's internal id says
    which entity it joins (found by the random histories, seed 80 of 120 x 200)."""
    store = new_sim()
    store.load_bundle(sample_bundle(SAMPLE))
    events, pos = sim_events(store)
    old = "malware--00000000-0000-4000-8000-0000000000a1"
    other = "malware--00000000-0000-4000-8000-0000000000a2"
    rel = "relationship--00000000-0000-4000-8000-0000000000a3"
    report = "report--00000000-0000-4000-8000-0000000000a4"
    store.create({"type": "malware", "id": old, "name": "Old"})
    store.create({"type": "malware", "id": other, "name": "Other"})
    store.create(_uses(rel, other, AP_KEEP))
    store.create(
        {
            "type": "report",
            "id": report,
            "name": "R",
            "published": "2026-01-01T00:00:00.000Z",
            "object_refs": [rel],
        }
    )
    store.delete(old)
    store.update(other, new_id=old)  # the standard id the deleted malware held
    later, _ = sim_events(store, pos)
    created_report = next(ev for ev in later if ev.stix_id == report)
    now = store.get(rel)
    assert now is not None and now["source_ref"] == old  # sent ahead, naming the id
    ahead = copy_event(created_report.id_text, now)
    stream = []
    for ev in later:
        if ev is created_report:
            stream.append(ahead)
        stream.append(ev)
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many([*events, *stream])
        kept = state.get(rel)
        assert kept is not None and kept["source_ref"] == old
        assert octi_ext(kept)["source_ref"] == octi_ext(now)["source_ref"]
        assert_equal_objects(state_objects(state), sim_objects(store))


def test_a_merge_repoints_one_endpoint_and_leaves_the_other_as_the_platform_sent_it(
    tmp_path: Path,
) -> None:
    """A tool sent ahead holds here the standard id another tool has until it is deleted. A
    merge that re-points a relationship's source must not re-resolve its target by that id
    (that would name the tool sent ahead): the relationship goes with the deleted tool, as on
    the platform (found with the previous test's rule, seed 62 of 120 x 200)."""
    store = new_sim()
    store.load_bundle(sample_bundle(SAMPLE))
    events, pos = sim_events(store)
    ids = [
        f"{t}--00000000-0000-4000-8000-0000000000b{n}"
        for n, t in enumerate(("tool", "tool", "intrusion-set", "intrusion-set", "relationship"))
    ]
    later_tool, doomed_tool, absorbed, absorber, rel = ids
    store.create({"type": "tool", "id": later_tool, "name": "Later"})
    store.create({"type": "tool", "id": doomed_tool, "name": "Doomed"})
    store.create({"type": "intrusion-set", "id": absorbed, "name": "A"})
    store.create({"type": "intrusion-set", "id": absorber, "name": "B"})
    store.create(_uses(rel, absorbed, doomed_tool))
    store.merge(absorber, [absorbed])
    store.delete(doomed_tool)
    store.update(later_tool, new_id=doomed_tool)
    later, _ = sim_events(store, pos)
    assert store.get(rel) is None
    first = later[0]
    assert first.stix_id == later_tool
    ahead = copy_event(first.id_text, store.get(doomed_tool))  # the later tool, as it is now
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many([*events, ahead, *later])
        assert state.get(rel) is None
        assert_equal_objects(state_objects(state), sim_objects(store))


def _malware_event(
    ms: int,
    kind: str,
    stix_id: str,
    *,
    fields: dict[str, Any] | None = None,
    updated_at: str | None = None,
    **context: Any,
) -> StreamEvent:
    """An event about the malware of internal id ``iid-1``, under ``stix_id``, with ``fields``
    and the extension's ``updated_at`` when given."""
    at = EventId(CLOCK0 + ms, 0)
    octi = {"id": "iid-1", "type": "Malware"}
    if updated_at is not None:
        octi["updated_at"] = updated_at
    stix = {
        "type": "malware",
        "id": stix_id,
        "name": "m1",
        "is_family": True,
        **(fields or {}),
        "extensions": {OCTI_EXT: octi},
    }
    env: dict[str, Any] = {"version": "4", "type": kind, "origin": {}, "data": stix}
    if context:
        env["context"] = context
    return StreamEvent(at, str(at), kind, orjson.dumps(env).decode(), env)


def test_a_delete_of_an_object_never_archived_leaves_its_tombstone(tmp_path: Path) -> None:
    """The archive never held the object (started later, or filtered): its delete is still
    recorded, so a restore over a target that holds it deletes it there."""
    gone = "malware--00000000-0000-4000-8000-000000000001"
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many([_malware_event(1, "delete", gone)])
        assert [(t.stix_id, t.reason) for t in state.tombstones()] == [(gone, "deleted")]


def test_a_re_creation_with_a_new_standard_id_ends_the_tombstone(tmp_path: Path) -> None:
    """A deleted object comes back in an event that also changes its standard id (the
    per-event path): it is live again, and no longer a tombstone a restore would act on."""
    old, new = (f"malware--00000000-0000-4000-8000-00000000000{n}" for n in (1, 2))
    patch = [{"op": "replace", "path": "/id", "value": old}]
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many([_malware_event(1, "create", old), _malware_event(2, "delete", old)])
        assert [t.stix_id for t in state.tombstones()] == [old]
        state.apply_many([_malware_event(3, "update", new, reverse_patch=patch)])
        assert state.get(new) is not None
        assert list(state.tombstones()) == []


MALWARE_1 = "malware--00000000-0000-4000-8000-000000000001"


def _description(state: StateStore) -> Any:
    obj = state.get(MALWARE_1)
    return obj["description"] if obj is not None else None


def _version_events(*versions: tuple[str, dict[str, Any]]) -> list[StreamEvent]:
    """A create then updates of one malware, each with ``updated_at`` and ``fields``; the
    description says which event it is."""
    return [
        _malware_event(
            n + 1,
            "create" if n == 0 else "update",
            MALWARE_1,
            updated_at=stamp,
            fields={"description": f"v{n + 1}", **fields},
        )
        for n, (stamp, fields) in enumerate(versions)
    ]


@pytest.mark.parametrize("batches", ["one", "each"])
def test_an_update_stamped_in_the_same_millisecond_replaces_the_version_stored(
    tmp_path: Path, batches: str
) -> None:
    """A create and its update within one millisecond carry the same ``updated_at``: the
    later in the stream is the object as it is, in one fold batch or in two."""
    events = _version_events(("2026-01-01T00:00:00.123Z", {}), ("2026-01-01T00:00:00.123Z", {}))
    with StateStore(tmp_path / "s.sqlite") as state:
        for part in [events] if batches == "one" else [[ev] for ev in events]:
            state.apply_many(part)
        assert _description(state) == "v2"


def test_versions_compare_by_instant_whatever_their_precision(tmp_path: Path) -> None:
    """The platform stamps milliseconds; a stamp with microseconds (STIX allows any precision)
    just after one of them is the newer version, and one just before it the older."""
    events = _version_events(
        ("2026-01-01T00:00:00.123Z", {}),
        ("2026-01-01T00:00:00.123456Z", {}),  # newer: written
        ("2026-01-01T00:00:00.123400+00:00", {}),  # older than that: not written
    )
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many(events)
        assert _description(state) == "v2"


def test_versions_compare_by_updated_at_before_modified(tmp_path: Path) -> None:
    """``modified`` is the STIX author's (an import keeps the source's); the platform's
    ``updated_at`` is what orders its versions: a newer one wins even when its ``modified``
    is older (a re-import of an older copy)."""
    events = _version_events(
        ("2026-01-01T00:00:01.000Z", {"modified": "2026-01-01T00:00:09.000Z"}),
        ("2026-01-01T00:00:02.000Z", {"modified": "2026-01-01T00:00:05.000Z"}),
    )
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many(events)
        assert _description(state) == "v2"


def _event(
    ms: int, kind: str, stix: dict[str, Any], *, referer: str | None = None, **context: Any
) -> StreamEvent:
    at = EventId(CLOCK0 + ms, 0)
    origin = {"referer": referer} if referer else {}
    env: dict[str, Any] = {"version": "4", "type": kind, "origin": origin, "data": stix}
    if context:
        env["context"] = context
    return StreamEvent(at, str(at), kind, orjson.dumps(env).decode(), env)


def _entity(stix_id: str, iid: str, *stix_ids: str, **fields: Any) -> dict[str, Any]:
    octi: dict[str, Any] = {"id": iid, "type": "Malware"}
    if stix_ids:
        octi["stix_ids"] = list(stix_ids)
    return {"type": "malware", "id": stix_id, "name": iid, "is_family": True, **fields,
            "extensions": {OCTI_EXT: octi}}  # fmt: skip


def _report(refs: list[str]) -> dict[str, Any]:
    return {
        "type": "report",
        "id": REPORT,
        "name": "R",
        "published": "2026-01-01T00:00:00.000Z",
        "object_refs": refs,
        "extensions": {OCTI_EXT: {"id": "iid-report", "type": "Report"}},
    }


def test_a_merge_hands_its_sources_ids_to_the_target_whatever_the_target_lists(
    tmp_path: Path,
) -> None:
    """The live stream sends a merge's target as it is when sent, which need not list the
    sources' ids any more (removed from its stix ids since): as of the merge, the target
    answers to them, so a restore takes them for its aliases (never deleting them on their
    own), and what named a source names the target."""
    source, target = (f"malware--00000000-0000-4000-8000-00000000000{n}" for n in (1, 2))
    events = [
        _event(1, "create", _entity(source, "iid-s")),
        _event(2, "create", _entity(target, "iid-t")),
        _event(3, "create", _report([source])),
        _event(4, "merge", _entity(target, "iid-t"), sources=[_entity(source, "iid-s")]),
    ]
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many(events)
        assert (state.get(source) or {}).get("id") == target
        assert (state.get(REPORT) or {}).get("object_refs") == [target]
        assert [(t.stix_id, t.reason, t.into) for t in state.tombstones()] == [
            (source, "merged", target)
        ]


def test_a_reconciliations_delete_spares_an_old_id_another_object_took(tmp_path: Path) -> None:
    """A reconciliation archives, after the repair's recovery, the delete of an object whose
    old standard id another object holds by then: what names that id names the other object
    and keeps it. A delete in stream order is not spared so (an object sent ahead can hold an
    id it takes only later)."""
    old, new = (f"malware--00000000-0000-4000-8000-00000000000{n}" for n in (1, 2))
    gone = _entity(new, "iid-a", old)  # renamed from ``old`` before the gap
    events = [
        _event(1, "create", gone),
        _event(2, "create", _entity(old, "iid-b")),  # a new object under the old id
        _event(3, "create", _report([old])),
    ]
    for referer, kept in ((RECONCILE_REFERER, [old]), (None, [])):
        with StateStore(tmp_path / f"{kept}.sqlite") as state:
            state.apply_many([*events, _event(4, "delete", gone, referer=referer)])
            assert octi_ext(state.get(old) or {}).get("id") == "iid-b"
            assert state.get(new) is None
            assert (state.get(REPORT) or {}).get("object_refs") == kept, referer


def test_a_standard_id_change_not_announced_repoints_what_named_the_old_id(
    tmp_path: Path,
) -> None:
    """A copy of an object under its new standard id without the reverse patch that announces
    the change (a recovery's or a dependency's): the object is the same (same internal id), and
    what named its old id names the new one, as on the platform."""
    old, new = (f"malware--00000000-0000-4000-8000-00000000000{n}" for n in (1, 2))
    events = [
        _event(1, "create", _entity(old, "iid-a")),
        _event(2, "create", _report([old])),
        _event(3, "create", _entity(new, "iid-a", old), referer="init-dependencies"),
    ]
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many(events)
        assert (state.get(old) or {}).get("id") == new
        assert (state.get(REPORT) or {}).get("object_refs") == [new]
        assert state.counts()["objects"] == 2


def test_an_object_first_seen_listing_a_live_objects_id_stays_apart_from_it(
    tmp_path: Path,
) -> None:
    """A merge's target the archive never held, sent as a dependency just before the merge in
    its version after it (its stix ids naming the source): another entity (another internal id)
    than the source, which stays live until the merge event."""
    source, target = (f"malware--00000000-0000-4000-8000-00000000000{n}" for n in (1, 2))
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many([_event(1, "create", _entity(source, "iid-s"))])
        early = _entity(target, "iid-t", source)
        state.apply_many([_event(2, "create", early, referer="init-dependencies")])
        assert (state.get(source) or {}).get("id") == source
        assert (state.get(target) or {}).get("id") == target
        state.apply(_event(3, "merge", early, sources=[_entity(source, "iid-s")]))
        assert (state.get(source) or {}).get("id") == target
        assert state.counts() == {"objects": 1, "tombstones": 1, "merged": 1}


@pytest.mark.parametrize("referer", [RECONCILE_REFERER, None])
@pytest.mark.parametrize("renamed", [False, True])
def test_a_standard_id_two_live_objects_hold_goes_to_the_one_left(
    tmp_path: Path, referer: str | None, renamed: bool
) -> None:
    """An object sent ahead (a repair's recovery, a dependency) under the standard id another
    live object still has here, until that one's delete: the id is then the one left's. Left
    to none, its tombstone made a restore delete the live object it had just pushed. The
    claim survives a snapshot's parts. (``renamed``: it comes as a standard-id change, the
    per-event path.)"""
    sid = "malware--00000000-0000-4000-8000-000000000001"
    ahead = _entity(sid, "iid-b", description="ahead")
    patch = [{"op": "replace", "path": "/id", "value": sid[:-1] + "9"}]
    first = [
        _event(1, "create", _entity(sid, "iid-a")),
        _event(2, "update", ahead, reverse_patch=patch)
        if renamed
        else _event(2, "create", ahead, referer="init-create"),
    ]
    delete = _event(3, "delete", _entity(sid, "iid-a"), referer=referer)
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many([*first, delete])
        assert (state.get(sid) or {}).get("description") == "ahead"
    storage = LocalStorage(tmp_path / "archive")
    after = archive_events(storage, first)
    info = write_snapshot(storage, work_dir=tmp_path / "w", state_image=False)
    assert info is not None and info.state_image is None
    archive_events(storage, [delete], after=after)
    seeded, plan = materialise_plan(storage, until=None, work_dir=tmp_path / "r")
    with seeded:
        assert plan.snapshot == info.key and plan.events == 1
        assert (seeded.get(sid) or {}).get("description") == "ahead"


def test_a_standard_id_two_live_objects_hold_goes_to_the_one_left_by_a_rename(
    tmp_path: Path,
) -> None:
    """The same two objects, the holder's standard id then changed instead of deleted: the
    old id is the claimer's, not an old id of the renamed one (which kept it, so the id led a
    restore's readers to the renamed object and B answered to nothing but its internal id)."""
    sid = "malware--00000000-0000-4000-8000-000000000001"
    renamed = "malware--00000000-0000-4000-8000-000000000009"
    events = [
        _event(1, "create", _entity(sid, "iid-a")),
        _event(2, "create", _entity(sid, "iid-b", description="ahead"), referer="init-create"),
        _event(3, "update", _entity(renamed, "iid-a", description="renamed")),
    ]
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many(events)
        assert (state.get(sid) or {}).get("description") == "ahead"
        assert (state.get(renamed) or {}).get("description") == "renamed"
        assert state.counts()["objects"] == 2


def test_a_claimed_standard_id_goes_to_its_claimer_renamed_since(tmp_path: Path) -> None:
    """The claimer's own standard id changed before the holder's delete: the claimed id is
    still its old id (the platform keeps one), not an id left to none, which a restore would
    delete with the holder's tombstone while the platform resolves it to the claimer."""
    sid = "malware--00000000-0000-4000-8000-000000000001"
    later = "malware--00000000-0000-4000-8000-000000000009"
    events = [
        _event(1, "create", _entity(sid, "iid-a")),
        _event(2, "create", _entity(sid, "iid-b", description="ahead"), referer="init-create"),
        _event(3, "update", _entity(later, "iid-b", sid, description="renamed")),
        _event(4, "delete", _entity(sid, "iid-a"), referer=RECONCILE_REFERER),
    ]
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many(events)
        assert (state.get(sid) or {}).get("description") == "renamed"
        assert (state.get(later) or {}).get("description") == "renamed"


def test_lines_before_a_segments_first_group_id_are_in_its_first_group(tmp_path: Path) -> None:
    """Recovery events arrive below the position (their ids are their ``updated_at``): those
    that open a segment are in its first group, above what the state already holds, and are
    folded, whatever their own ids."""
    old, new = (f"malware--00000000-0000-4000-8000-00000000000{n}" for n in (1, 2))
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many([_event(5, "create", _entity(old, "iid-a"))])
        done = state.as_of
        assert done is not None
        below = _event(1, "create", _entity(new, "iid-b"), referer="init-create")
        first = EventId(done.ms + 5, 0)
        line = orjson.dumps({"id": below.id_text, "event": "create", "data": below.envelope})
        assert state.fold_lines([line], first=first, done=done) == 1
        assert state.get(new) is not None and state.as_of == done


def _stamped(stix: dict[str, Any], updated_at: str) -> dict[str, Any]:
    stix["extensions"][OCTI_EXT]["updated_at"] = updated_at
    return stix


def test_a_recovery_event_below_the_position_leaves_it_on_the_per_event_path(
    tmp_path: Path,
) -> None:
    """A recovery event's id is its ``updated_at``, below the position; one that changes a
    standard id unannounced takes the per-event path. It is folded, and the position stays the
    group's (fold_segments checks it against the segment's last id)."""
    old, new = (f"malware--00000000-0000-4000-8000-00000000000{n}" for n in (1, 2))
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many([_event(5, "create", _entity(old, "iid-a"))])
        done = state.as_of
        below = _event(1, "create", _entity(new, "iid-a", old), referer="init-create")
        state.apply_many([below])
        assert (state.get(old) or {}).get("id") == new
        assert state.as_of == done


def test_an_object_first_written_by_a_merge_keeps_its_version_guard(tmp_path: Path) -> None:
    """The merge event is the first the archive holds of its target (written on the per-event
    path): a later re-send of an older version of the target still finds it (the lookups skip
    ids never stored) and does not replace it."""
    source, target = (f"malware--00000000-0000-4000-8000-00000000000{n}" for n in (1, 2))
    merged = _stamped(_entity(target, "iid-t", description="merged"), "2026-01-01T00:00:09.000Z")
    stale = _stamped(_entity(target, "iid-t", description="stale"), "2026-01-01T00:00:01.000Z")
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many(
            [
                _event(1, "create", _entity(source, "iid-s")),
                _event(2, "merge", merged, sources=[_entity(source, "iid-s")]),
                _event(3, "update", stale, referer="init-dependencies"),
            ]
        )
        assert (state.get(target) or {}).get("description") == "merged"
        assert state.counts()["objects"] == 1


def test_a_stale_copy_under_an_id_no_live_object_holds_gives_it_to_the_object(
    tmp_path: Path,
) -> None:
    """The object's later version, sent ahead, comes first; an older update, announcing the
    change to an earlier standard id (the per-event path), is not written, but its ids that no
    live object holds are the object's from then on, as on the platform (which keeps an
    object's old ids)."""
    first, old, new = (f"malware--00000000-0000-4000-8000-00000000000{n}" for n in (1, 2, 3))
    ahead = _stamped(_entity(new, "iid-a", description="ahead"), "2026-01-01T00:00:09.000Z")
    older = _stamped(_entity(old, "iid-a", description="older"), "2026-01-01T00:00:01.000Z")
    patch = [{"op": "replace", "path": "/id", "value": first}]
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many(
            [_event(1, "create", ahead), _event(2, "update", older, reverse_patch=patch)]
        )
        for sid in (new, old, first):
            assert (state.get(sid) or {}).get("description") == "ahead", sid
        assert state.counts()["objects"] == 1


def test_a_reconciliations_merge_leaves_an_old_id_another_object_took(tmp_path: Path) -> None:
    """A reconciliation archives, after the repair's recovery, the merge of a source whose old
    standard id another object holds by then: the target does not take that id, and what
    names it still names the other object."""
    old, renamed, target = (f"malware--00000000-0000-4000-8000-00000000000{n}" for n in (1, 2, 3))
    source = _entity(renamed, "iid-s", old)  # renamed from ``old`` before the gap
    events = [
        _event(1, "create", source),
        _event(2, "create", _entity(old, "iid-b")),  # a new object under the old id
        _event(3, "create", _entity(target, "iid-t")),
        _event(4, "create", _report([old])),
        _event(5, "merge", _entity(target, "iid-t"), sources=[source], referer=RECONCILE_REFERER),
    ]
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many(events)
        assert octi_ext(state.get(old) or {}).get("id") == "iid-b"
        assert (state.get(renamed) or {}).get("id") == target
        assert (state.get(REPORT) or {}).get("object_refs") == [old]


def _container(stix_id: str, iid: str, refs: list[str]) -> dict[str, Any]:
    return {"type": "report", "id": stix_id, "name": iid, "published": "2026-01-01T00:00:00.000Z",
            "object_refs": refs, "extensions": {OCTI_EXT: {"id": iid, "type": "Report"}}}  # fmt: skip


def test_the_push_order_follows_the_state_as_it_changes(tmp_path: Path) -> None:
    """A state read in push order, then folded on: a report put in another report since is
    ranked after it (the order is built again), and the keys after a given one are those
    after it."""
    outer, inner = (f"report--00000000-0000-4000-8000-00000000000{n}" for n in (1, 2))
    malware = "malware--00000000-0000-4000-8000-000000000003"
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many(
            [
                _event(1, "create", _entity(malware, "iid-m")),
                _event(2, "create", _container(inner, "iid-b", [malware])),
            ]
        )
        containers = PHASES.index("containers")
        assert [(r, rec.key) for r, rec in state.push_records(containers)] == [(0, "iid-b")]
        state.apply_many([_event(3, "create", _container(outer, "iid-a", [inner]))])
        assert [(r, rec.key) for r, rec in state.push_records(containers)] == [
            (0, "iid-b"),
            (1, "iid-a"),
        ]
        assert [rec.key for rec in state.records(after="iid-b")] == ["iid-m"]


def test_a_late_copy_of_a_rename_leaves_the_old_id_to_the_object_that_took_it(
    tmp_path: Path,
) -> None:
    """A renamed from ``old`` to ``new`` (its later version sent ahead), then B created under
    ``old``: a late copy of A's rename (a recovery's duplicate, older than what is stored)
    announces ``old`` again. The id is B's now: it stays B's, and what names it names B."""
    old, new = (f"malware--00000000-0000-4000-8000-00000000000{n}" for n in (1, 2))
    patch = [{"op": "replace", "path": "/id", "value": old}]
    events = [
        _event(1, "create", _stamped(_entity(old, "iid-a"), "2026-01-01T00:00:01.000Z")),
        _event(2, "update", _stamped(_entity(new, "iid-a", old), "2026-01-01T00:00:03.000Z")),
        _event(3, "create", _stamped(_entity(old, "iid-b"), "2026-01-01T00:00:04.000Z")),
        _event(4, "create", _report([old])),
        _event(5, "update", _stamped(_entity(new, "iid-a", old), "2026-01-01T00:00:02.000Z"),
               reverse_patch=patch),
    ]  # fmt: skip
    with StateStore(tmp_path / "s.sqlite") as state:
        state.apply_many(events)
        assert octi_ext(state.get(old) or {}).get("id") == "iid-b"
        assert octi_ext(state.get(new) or {}).get("id") == "iid-a"
        assert (state.get(REPORT) or {}).get("object_refs") == [old]
