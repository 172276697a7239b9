"""The fold, checked against the simulated platform on random edit histories.

The batched fold has many fast paths (a Bloom filter, aliases waiting in memory, rows reduced per
batch, snapshot lines loaded from their headers). Each seed plays a random history on a SimStore
(creates, relationships, updates of attributes and of references, standard-id changes,
merges, deletes with cascades, re-creations), adds the re-sends a real stream carries (older versions of live objects under
later ids), and folds it four ways: in one transaction with tiny batches, one event per
transaction, through the archive from a snapshot taken half-way, and through the archive alone,
all of it and up to half-way. Each must equal the simulator's own state at that point.
"""

from __future__ import annotations

import os
import random
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from connector import state as state_module
from connector.events import EventId, StreamEvent, octi_ext
from connector.restore import materialise_plan
from connector.sim import sample_bundle
from connector.sim.store import SimStore
from connector.snapshot import write_snapshot
from connector.state import StateStore, TombstoneRecord
from connector.storage.local import LocalStorage
from tests.support.simlog import sim_events
from tests.support.statedb import state_tables
from tests.test_state import (
    SAMPLE,
    archive_events,
    assert_equal_objects,
    new_sim,
    sim_objects,
    state_objects,
)

# More and longer histories, by hand: STATE_FUZZ_SEEDS=300 STATE_FUZZ_OPS=400 pytest <this file>
SEEDS = range(int(os.environ.get("STATE_FUZZ_SEEDS", "12")))
OPS = int(os.environ.get("STATE_FUZZ_OPS", "90"))
_ENTITY_TYPES = ("malware", "intrusion-set", "attack-pattern", "tool", "campaign")


def _live(store: SimStore, *types: str) -> list[str]:
    return sorted(str(o["id"]) for o in store.objects() if not types or o["type"] in types)


class _History:
    """A random history on ``store``, and the stale re-sends a real stream would add to it."""

    def __init__(self, store: SimStore, rng: random.Random) -> None:
        self.store, self.rng = store, rng
        self.events: list[StreamEvent] = []
        self.pos = 0
        self.versions: dict[str, list[StreamEvent]] = {}  # internal id -> create/update events
        self.resends: list[tuple[int, StreamEvent]] = []  # (after how many events, the event)
        self.deleted: list[dict[str, Any]] = []  # deleted on purpose (not by a cascade)

    def play(self, ops: int) -> None:
        for _ in range(ops):
            self._edit()
            self._read()
            if self.rng.random() < 0.3:
                self._resend()

    def _edit(self) -> None:
        store, rng = self.store, self.rng
        roll = rng.random()
        entities = _live(store, *_ENTITY_TYPES)
        if roll < 0.25 or len(entities) < 4:
            stype = rng.choice(_ENTITY_TYPES)
            store.create(
                {
                    "type": stype,
                    "id": f"{stype}--{uuid.UUID(int=rng.getrandbits(128))}",
                    "name": f"n{rng.getrandbits(32)}",
                }
            )
        elif roll < 0.4:
            src, dst = rng.sample(entities, 2)
            store.create(
                {
                    "type": "relationship",
                    "id": f"relationship--{uuid.UUID(int=rng.getrandbits(128))}",
                    "relationship_type": "related-to",
                    "source_ref": src,
                    "target_ref": dst,
                }
            )
        elif roll < 0.55:
            store.update(rng.choice(_live(store)), set={"description": f"d{rng.getrandbits(32)}"})
        elif roll < 0.65:
            self._repoint(rng.choice(_live(store)))
        elif roll < 0.72:
            sid = rng.choice(entities)
            stype = sid.split("--")[0]
            store.update(sid, new_id=f"{stype}--{uuid.UUID(int=rng.getrandbits(128))}")
        elif roll < 0.82:
            stype = rng.choice(_ENTITY_TYPES)
            same = _live(store, stype)
            if len(same) >= 2:
                target, *sources = rng.sample(same, min(len(same), rng.choice((2, 3))))
                store.merge(target, sources)
        elif roll < 0.9 or not self.deleted:
            sid = rng.choice(_live(store))
            self.deleted.append(store.get(sid) or {})
            store.delete(sid)
        else:  # the same object created again, after its delete
            old = self.deleted.pop(rng.randrange(len(self.deleted)))
            ends = [old.get(f) for f in ("source_ref", "target_ref") if old.get(f)]
            if all(store.get(str(e)) is not None for e in ends):  # the platform refuses others
                store.create({k: v for k, v in old.items() if k != "extensions"})

    def _repoint(self, sid: str) -> None:
        """An update that changes references: author, markings, or a container's contents."""
        store, rng = self.store, self.rng
        obj = store.get(sid) or {}
        refs: dict[str, object] = {}
        authors = _live(store, "identity")
        markings = _live(store, "marking-definition")
        if authors and rng.random() < 0.5:
            refs["created_by_ref"] = rng.choice(authors)
        if markings:
            refs["object_marking_refs"] = rng.sample(markings, min(len(markings), 2))
        if isinstance(obj.get("object_refs"), list):
            others = [i for i in _live(store) if i != sid]
            refs["object_refs"] = rng.sample(others, min(len(others), rng.randint(1, 5)))
        store.update(sid, set=refs)

    def _read(self) -> None:
        new, self.pos = sim_events(self.store, self.pos)
        for ev in new:
            self.events.append(ev)
            if ev.event in ("create", "update") and ev.internal_id:
                self.versions.setdefault(ev.internal_id, []).append(ev)

    def _resend(self) -> None:
        """An earlier version of an object that is live now and has a newer one (a dependency
        re-send, a recovery duplicate). A deleted object's would rightly bring it back."""
        live = {str(octi_ext(o).get("id")) for o in self.store.objects()}
        stale = [
            ev
            for iid, evs in sorted(self.versions.items())
            if iid in live and len(evs) > 1
            for ev in evs[:-1]
        ]
        if stale:
            self.resends.append((len(self.events), self.rng.choice(stale)))

    def stream(self, ahead_after: EventId) -> tuple[list[StreamEvent], list[StreamEvent]]:
        """The events with the re-sends, each under the id after the event it follows, and,
        before a third of the events after ``ahead_after``, what a live stream read late sends
        ahead of them: the objects they refer to as they are *now*, as dependencies under the
        event's id. Those can already hold the ids of objects they absorb later, or a standard
        id taken later. (Before ``ahead_after`` the fold must equal the simulator's state at
        that point, which a version from later would not.)"""
        out: list[StreamEvent] = []
        sent: list[StreamEvent] = []
        waiting = iter(self.resends)
        nxt = next(waiting, None)
        for n, ev in enumerate(self.events, start=1):
            if ev.id > ahead_after and self.rng.random() < 0.3:
                for dep in self._now(ev):
                    payload = {"data": dep, "origin": {"referer": "init-dependencies"}}
                    out.append(StreamEvent.from_sse(ev.id_text, "create", orjson.dumps(payload)))
            out.append(ev)
            while nxt is not None and nxt[0] == n:
                sent.append(
                    StreamEvent.from_sse(f"{ev.id.ms}-{ev.id.seq + 1}", nxt[1].event, nxt[1].raw)
                )
                out.append(sent[-1])
                nxt = next(waiting, None)
        return out, sent

    def _now(self, ev: StreamEvent) -> list[dict[str, Any]]:
        """The current version of each object ``ev``'s object refers to (the platform resolves
        an absorbed or renamed id to the object that holds it now)."""
        refs: list[str] = []
        for field, value in ev.stix.items():
            if field.endswith("_ref") and isinstance(value, str):
                refs.append(value)
            elif field.endswith("_refs") and isinstance(value, list):
                refs.extend(v for v in value if isinstance(v, str))
        found = (self.store.get(r) for r in dict.fromkeys(refs))
        return list({str(o["id"]): o for o in found if o is not None}.values())


def _tombstones(state: StateStore) -> list[TombstoneRecord]:
    return list(state.tombstones())


def _fold_all(path: Path, events: list[StreamEvent]) -> StateStore:
    state = StateStore(path, scratch=True)
    state.apply_many(events)
    return state


@pytest.fixture(params=["filter", "saturated filter"])
def tiny_batches(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of 3 and 4 waiting aliases: every batch boundary the fold has, many times over.
    With a 64-bit Bloom filter every id looks known: the lookups and guarded inserts instead of
    the "certainly new" path."""
    monkeypatch.setattr(state_module, "_RUN_EVENTS", 3)
    monkeypatch.setattr(state_module, "_NEW_ALIASES_MAX", 4)
    monkeypatch.setattr(state_module, "_LOAD_ROWS", 5)
    if request.param == "saturated filter":
        monkeypatch.setattr(state_module._Seen, "_BITS", 64)  # noqa: SLF001
        monkeypatch.setattr(state_module._Seen, "_MASK", 63)  # noqa: SLF001


@pytest.mark.usefixtures("tiny_batches")
@pytest.mark.parametrize("seed", SEEDS)
def test_random_history_folds_to_the_simulator_state(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    store = new_sim()
    store.load_bundle(sample_bundle(SAMPLE))
    history = _History(store, rng)
    history.play(OPS // 2)
    half_id = store.last_event_id
    half = sim_objects(store)
    history.play(OPS - OPS // 2)
    events = history.events
    expected = sim_objects(store)
    kinds = {ev.event for ev in events}
    assert {"create", "update", "merge", "delete"} <= kinds, kinds
    created = [ev.stix_id for ev in events if ev.event == "create"]
    assert len(created) > len(set(created)), "nothing was created twice"
    assert half_id is not None
    stream, resends = history.stream(ahead_after=EventId.parse(half_id))
    # The re-sends are real stale versions: taken as the newest, they would change the state.
    final = {octi_ext(o).get("id"): o for o in expected}
    assert any(ev.stix != final[ev.internal_id] for ev in resends if ev.internal_id in final)

    # One transaction, batches of 3.
    with _fold_all(tmp_path / "batched.sqlite", stream) as batched:
        assert_equal_objects(state_objects(batched), expected)
        tombs = _tombstones(batched)
        assert batched.as_of == stream[-1].id
    # One event per transaction: the per-event boundaries instead of the batch ones.
    with StateStore(tmp_path / "single.sqlite") as single:
        for ev in stream:
            single.apply(ev)
        assert_equal_objects(state_objects(single), expected)
        assert _tombstones(single) == tombs
    aliases = state_tables(tmp_path / "batched.sqlite")["aliases"]
    assert aliases == state_tables(tmp_path / "single.sqlite")["aliases"]
    # Through the archive, from a snapshot taken half-way (its aliases and filter), then the tail.
    storage = LocalStorage(tmp_path / "archive")
    assert half_id is not None
    cut = next(i for i, ev in enumerate(stream) if ev.id > EventId.parse(half_id))
    last = archive_events(storage, stream[:cut], per_segment=rng.randint(3, 30))
    assert write_snapshot(storage, work_dir=tmp_path / "work", part_objects=7) is not None
    archive_events(storage, stream[cut:], per_segment=rng.randint(3, 30), after=last)
    restored, plan = materialise_plan(storage, until=None, work_dir=tmp_path / "plan")
    with restored:
        assert plan.snapshot is not None and plan.events == len(stream) - cut
        assert_equal_objects(state_objects(restored), expected)
        assert _tombstones(restored) == tombs
    assert state_tables(tmp_path / "plan" / "restore-state.sqlite")["aliases"] == aliases
    # The archive alone (no snapshot), segments of another size: all of it, and up to half-way
    # (a cut that usually falls inside a segment).
    plain = LocalStorage(tmp_path / "plain")
    archive_events(plain, stream, per_segment=rng.randint(3, 30))
    for until, want, work in ((None, expected, "all"), (EventId.parse(half_id), half, "half")):
        folded, plan = materialise_plan(plain, until=until, work_dir=tmp_path / work)
        with folded:
            assert plan.snapshot is None
            assert_equal_objects(state_objects(folded), want)
