"""Point-in-time restore planning, checked at every point of random histories.

``test_state_random`` folds each history to its end and to half-way. Here each seed plays a
smaller random history on a SimStore whose stream ids share milliseconds (creates,
relationships, updates, standard-id changes, merges, deletes with cascades, re-creations under
any id an object ever had, stale re-sends, dependency groups under one id, recovery events under a lower id than the
one before), records the
simulator's state after every event, and restores to every point, by event id and by date (a
millisecond several events share):

* from the archive alone, from snapshots written every few segments (the newest at or before
  the point, never one after it), and from the same pruned by retention (a point before its
  base is said to be incomplete) with a damaged snapshot (the one before it serves): each
  equals the simulator's state, and every object there was by then is live or tombstoned;
* with objects sent ahead all along (the state is then the stream's, not the simulator's):
  from snapshots, from segments and one event at a time, the same rows;
* over a platform holding the history's end: every object of the point is there, and nothing
  deleted or merged away by then is left under its own id.
"""

from __future__ import annotations

import os
import random
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from connector.events import EventId, StreamEvent, octi_ext
from connector.restore import materialise_plan, parse_until, restore_to_target
from connector.retention import RetentionPolicy, apply_retention, plan_retention
from connector.sim import sample_bundle
from connector.sim.store import SimStore
from connector.snapshot import list_snapshots, write_snapshot
from connector.state import StateStore, stix_refs
from connector.storage.local import LocalStorage
from tests.support.simlog import copy_event
from tests.support.snapshots import and_its_image
from tests.support.statedb import state_tables
from tests.test_state import (
    CLOCK0,
    SAMPLE,
    archive_events,
    assert_equal_objects,
    sim_objects,
    state_objects,
    ticking_clock,
)
from tests.test_state_random import _History

# More and longer histories, by hand: RESTORE_POINT_SEEDS=50 RESTORE_POINT_OPS=150 pytest <this file>
SEEDS = range(int(os.environ.get("RESTORE_POINT_SEEDS", "3")))
OPS = int(os.environ.get("RESTORE_POINT_OPS", "60"))


class _BusySim(SimStore):
    """A platform whose stream ids share milliseconds: each event's id takes the millisecond
    rounded down to a multiple of ``_MS_SHARED``, so a few events in a row share one (their
    sequence numbers tell them apart). The clock itself ticks one millisecond a call, so every
    version of an object has its own ``updated_at`` (two versions in one millisecond, which the
    fold cannot order, are another matter)."""

    _MS_SHARED = 9

    def create(self, stix: dict[str, Any], *, origin: dict[str, Any] | None = None) -> str | None:
        """Refused, as the platform refuses it, when it names an object not held (an object
        created again from an old version: a sighting of an indicator deleted since)."""
        if any(self.get(ref) is None for ref in stix_refs(stix)):
            return None
        return super().create(stix, origin=origin)

    def _next_key(self) -> int:
        clock = self._clock
        self._clock = lambda: clock() // self._MS_SHARED * self._MS_SHARED
        try:
            return super()._next_key()
        finally:
            self._clock = clock


class _Revivals(_History):
    """The random history, and now and then an object created again from an earlier version
    of one under any id it ever had: a deleted object, a merged-away source (its target
    deleted since, or still there: then the platform upserts into the entity answering to it),
    an old standard id (upserted into the entity, whose id it becomes again)."""

    def __init__(self, store: SimStore, rng: random.Random) -> None:
        super().__init__(store, rng)
        self.seen: dict[str, dict[str, Any]] = {}  # stix id -> its last version under that id

    def _edit(self) -> None:
        if not self.seen or self.rng.random() >= 0.12:
            super()._edit()
            return
        old = self.seen[self.rng.choice(sorted(self.seen))]
        self.store.create({k: v for k, v in old.items() if k != "extensions"})

    def _read(self) -> None:
        first = len(self.events)
        super()._read()
        for ev in self.events[first:]:
            if ev.event in ("create", "update", "merge"):
                self.seen[ev.stix_id] = ev.stix
            if ev.event == "merge":
                sources = (ev.envelope.get("context") or {}).get("sources") or []
                self.seen.update((str(src["id"]), src) for src in sources)


Point = tuple[EventId, list[dict[str, Any]]]  # an event id, the simulator's state after it


def _history(seed: int) -> tuple[list[StreamEvent], list[Point]]:
    """The stream and the simulator's state after each of its events. The stream has the stale
    re-sends, and before some creates and updates what the platform sends with them under the
    same id: the objects they refer to as they are then (a dependency group)."""
    rng = random.Random(seed)
    store = _BusySim(clock=ticking_clock(step=1))
    store.load_bundle(sample_bundle(SAMPLE))
    history = _Revivals(store, rng)
    history._read()  # noqa: SLF001
    points: list[Point] = []
    before_each: dict[int, dict[str, dict[str, Any]]] = {}  # id(event) -> objects before it
    for _ in range(OPS):
        before = len(history.events)
        objects = {str(o["id"]): o for o in sim_objects(store)}
        history._edit()  # noqa: SLF001
        history._read()  # noqa: SLF001
        assert len(history.events) - before <= 1  # one event an edit: a state for each
        if len(history.events) > before:
            points.append((history.events[-1].id, sim_objects(store)))
            before_each[id(history.events[-1])] = objects
        if rng.random() < 0.3:
            history._resend()  # noqa: SLF001
    stream: list[StreamEvent] = []
    for ev in history.stream(ahead_after=history.events[-1].id)[0]:  # nothing sent ahead
        then = before_each.get(id(ev))
        if then is not None and ev.event in ("create", "update") and rng.random() < 0.5:
            for ref in dict.fromkeys(stix_refs(ev.stix)):
                if ref in then:
                    stream.append(copy_event(ev.id_text, then[ref]))
        prev = stream[-1].id if stream else None
        stream.append(ev)
        low = EventId(prev.ms, prev.seq + 1) if prev is not None else None
        if then is not None and ev.event in ("create", "update") and low is not None:
            if low < ev.id:
                # A recovery event under a lower id than the one before it, the object as this
                # event made it: in this event's group, so not in a restore up to its own id.
                stream.append(copy_event(str(low), ev.stix, referer="init-create"))
    kinds = {ev.event for ev in history.events}
    assert {"create", "update", "merge", "delete"} <= kinds, kinds
    assert len(stream) > len({ev.id for ev in stream}) + 10, "few dependency groups"
    lower = sum(a.id > b.id for a, b in zip(stream, stream[1:], strict=False))
    assert lower > 3, "few recovery events under a lower id"
    return stream, points


def _at(points: list[Point], until: EventId) -> list[dict[str, Any]] | None:
    """The simulator's state after every event at or before ``until`` (None: before the
    first recorded point)."""
    want = None
    for eid, objects in points:
        if eid > until:
            break
        want = objects
    return want


def _iso(ms: int) -> str:
    """The instant ``ms`` as an ISO 8601 date (integer arithmetic: exactly that millisecond)."""
    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    return when.isoformat(timespec="milliseconds")


def _snapshotted(stream: list[StreamEvent], root: Path, rng: random.Random) -> LocalStorage:
    """The archive of ``stream`` written a few segments at a time, with a snapshot (each based
    on the one before) after every write but the last."""
    storage = LocalStorage(root / "archive")
    last: EventId | None = None
    start = 0
    while start < len(stream):
        cut = min(len(stream), start + rng.randint(4, 30))
        # Never between the events of one group (one id): a write holds whole groups.
        while cut < len(stream) and stream[cut].id <= stream[cut - 1].id:
            cut += 1
        last = archive_events(
            storage, stream[start:cut], per_segment=rng.randint(3, 12), after=last
        )
        start = cut
        if start < len(stream):
            assert write_snapshot(storage, work_dir=root / "work", part_objects=11) is not None
    return storage


def _ever(points: list[Point]) -> dict[EventId, set[str]]:
    """At each point, the last id of every object (internal id) there was up to it. One
    deleted after a standard-id change is deleted by its last id only (README): left out is
    an id any object changed from (another life of it, deleted before under that id, too)."""
    ever: dict[EventId, set[str]] = {}
    last_ids: dict[str, str] = {}
    changed: set[str] = set()
    for eid, objects in points:
        for o in objects:
            iid, sid = str(octi_ext(o).get("id")), str(o["id"])
            if last_ids.get(iid, sid) != sid:
                changed.add(last_ids[iid])
            last_ids[iid] = sid
        ever[eid] = set(last_ids.values()) - changed
    return ever


def _check_tombstones(state: StateStore, ever: set[str], text: str) -> None:
    """The last id of every object there was at or before the point is answered by a live
    object or tombstoned: a restore over a platform holding it deletes it."""
    tombs = {t.stix_id for t in state.tombstones()}
    missing = sorted(i for i in ever if i not in tombs and state.get(i) is None)
    assert not missing, f"--until {text}: neither live nor tombstoned: {missing[:5]}"


@pytest.mark.parametrize("seed", SEEDS)
def test_restore_at_every_point(seed: int, tmp_path: Path) -> None:
    stream, points = _history(seed)
    rng = random.Random(seed)
    plain = LocalStorage(tmp_path / "plain")  # the archive alone, segments of another size
    archive_events(plain, stream, per_segment=rng.randint(3, 12))
    snapped = _snapshotted(stream, tmp_path / "snapped", rng)
    snapshots = [s.as_of for s in list_snapshots(snapped)]
    assert len(snapshots) >= 3
    # The same, pruned by retention with its window starting half-way: the base snapshot and
    # the segments after it stay.
    shutil.copytree(tmp_path / "snapped", tmp_path / "pruned")
    pruned = LocalStorage(tmp_path / "pruned" / "archive")
    window = points[len(points) // 2][0]
    now = datetime.fromtimestamp(window.ms / 1000, tz=UTC) + timedelta(days=1)
    apply_retention(
        pruned, plan_retention(pruned, RetentionPolicy(keep_days=1, keep_snapshots=2), now)
    )
    kept = [s.as_of for s in list_snapshots(pruned)]
    base = kept[0]
    assert snapshots[0] < base <= window and len(kept) == 3  # the base and the newest two
    # A damaged snapshot after the base: a restore at or after it starts from the one before.
    damaged = list_snapshots(pruned)[1]
    for gone in and_its_image(damaged, damaged.parts[0]):
        part = tmp_path / "pruned" / "archive" / gone.key
        part.write_bytes(part.read_bytes()[:-1] + b"x")
    kept.remove(damaged.as_of)

    ids = sorted({ev.id for ev in stream if ev.id >= points[0][0]})
    millis = sorted({eid.ms for eid in ids})
    shared = [ms for ms in millis if sum(1 for eid in ids if eid.ms == ms) > 1]
    assert len(shared) > 10, "few milliseconds hold several events"
    tries: list[tuple[str, EventId]] = [(str(eid), eid) for eid in ids]
    dates = [(_iso(ms), parse_until(_iso(ms))) for ms in shared]
    assert [until for _, until in dates] == [EventId(ms, 10**10 - 1) for ms in shared]
    tries += dates
    ever = _ever(points)
    for text, until in tries:
        want = _at(points, until)
        assert want is not None
        had = ever[max(eid for eid, _ in points if eid <= until)]
        for name, storage in (("plain", plain), ("snapped", snapped), ("pruned", pruned)):
            state, plan = materialise_plan(storage, until=until, work_dir=tmp_path / "w")
            with state:
                held = kept if name == "pruned" else snapshots
                newest = max((s for s in held if s <= until), default=None)
                if name == "plain":
                    assert plan.snapshot is None
                elif name == "pruned" and until < base:
                    # History retention took: said, never restored as if whole.
                    assert plan.snapshot is None and plan.incomplete, text
                    continue
                else:
                    # The newest snapshot at or before the point, never one after it.
                    assert plan.snapshot == (newest.key if newest else None), text
                try:
                    assert_equal_objects(state_objects(state), want)
                    _check_tombstones(state, had, text)
                except AssertionError as exc:
                    raise AssertionError(f"{name} restore --until {text}: {exc}") from exc


@pytest.mark.parametrize("seed", SEEDS)
def test_snapshots_change_nothing_at_any_point(seed: int, tmp_path: Path) -> None:
    """With what a live stream read late adds (the objects an event refers to, as they are
    *now*, sent ahead under its id, all along), the state at a point is the stream's, not the
    simulator's: but the same from any snapshot as from the segments alone, and as folding the
    events one at a time, row for row (objects, aliases, tombstones), at every point."""
    rng = random.Random(seed + 100)
    store = _BusySim(clock=ticking_clock(step=1))
    store.load_bundle(sample_bundle(SAMPLE))
    history = _Revivals(store, rng)
    history.play(OPS)
    stream, _ = history.stream(ahead_after=EventId(0, 0))
    plain = LocalStorage(tmp_path / "plain")
    archive_events(plain, stream, per_segment=rng.randint(3, 12))
    snapped = _snapshotted(stream, tmp_path / "snapped", rng)
    # And the same as folding the events one at a time up to that point.
    ids = sorted({ev.id for ev in stream})
    points = set(ids[:: max(1, len(ids) // 60)] + [ids[-1]])
    with StateStore(tmp_path / "single.sqlite") as single:
        for n, ev in enumerate(stream):
            single.apply(ev)
            until = ev.id
            if until not in points or (n + 1 < len(stream) and stream[n + 1].id <= until):
                continue  # not a point, or the group goes on
            tables = [state_tables(tmp_path / "single.sqlite")]
            for name, storage in (("plain", plain), ("snapped", snapped)):
                state, _ = materialise_plan(storage, until=until, work_dir=tmp_path / name)
                state.close()
                tables.append(state_tables(tmp_path / name / "restore-state.sqlite"))
            for table in ("objects", "aliases", "tombstones"):
                assert tables[0][table] == tables[1][table], f"--until {until}: {table} differ"
                assert tables[1][table] == tables[2][table], f"--until {until}: {table} differ"


class _Platform:
    """The simulator's platform as a restore target, in process: upserts, deletes by id (with
    what the platform deletes along), and which entity answers to an id."""

    def __init__(self, store: SimStore) -> None:
        self.store = store

    def push_objects(self, objects: list[dict[str, Any]]) -> None:
        for stix in objects:
            self.store.upsert(stix)

    def delete_ids(self, stix_ids: list[str]) -> None:
        for sid in stix_ids:
            self.store.delete(sid)

    def resolve_ids(self, stix_ids: list[str]) -> dict[str, str]:
        found = {sid: self.store.get(sid) for sid in stix_ids}
        return {sid: str(o["id"]) for sid, o in found.items() if o is not None}


@pytest.mark.parametrize("seed", SEEDS)
def test_restore_over_the_latest_state_at_every_point(seed: int, tmp_path: Path) -> None:
    """Restored at each point over a platform that holds the history's end: every object of
    that point is there, and no object deleted or merged away by then is left under its own
    id (one only another entity answers to, absorbed after the point, is that entity's)."""
    stream, points = _history(seed)
    plain = LocalStorage(tmp_path / "plain")
    archive_events(plain, stream, per_segment=random.Random(seed).randint(3, 12))
    ever = _ever(points)
    for until, want in points:
        state, _ = materialise_plan(plain, until=until, work_dir=tmp_path / "w")
        platform = SimStore(clock=ticking_clock(start=CLOCK0 + 10**9, step=1))
        platform.load_bundle(points[-1][1])
        with state:
            restore_to_target(state, _Platform(platform), batch_size=7)
            gone = [i for i in ever[until] if state.get(i) is None]
        live = [str(o["id"]) for o in want]
        assert not [i for i in live if platform.get(i) is None], f"--until {until}: missing"
        left = [i for i in gone if (platform.get(i) or {}).get("id") == i]
        assert not left, f"--until {until}: deleted before it, still there: {left[:5]}"
