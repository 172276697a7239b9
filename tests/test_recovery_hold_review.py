"""Review of the recovery hold (connector/source.py, _RecoveryHold): what it must not hold."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from connector.checkpoint import CheckpointStore
from connector.events import EventId, StreamEvent
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.source import Complete, _RecoveryHold
from connector.storage.local import LocalStorage
from tests.support.connector import (
    ConnectorThread,
    archived_events,
    base_env,
    caught_up,
    wait_until,
)

TOKEN = "hold-review-token"


def test_a_raw_stream_gap_repair_is_not_held_as_a_recovery(tmp_path: Path) -> None:
    """The raw stream has no recovery (the platform ignores ``recover`` there): after a
    retention gap its replay is real Redis ids in order, each group complete at once. Held as
    a recovery's (it has no init-create ids, so no position is ever found safe), nothing went
    to the archive, and the checkpoint did not move, until the replay passed the repair date."""
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 20, seed=5)
        env = base_env(sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_ID="raw")
        run = ConnectorThread(env).start()
        wait_until(lambda: caught_up(storage, str(sim.store.last_event_id)), what="first run")
        run.stop()
        assert run.error is None
        before = len(archived_events(archive))
        generate(sim.store, 200, seed=6)
        sim.store.trim(150)  # a retention gap: the connector's checkpoint is no longer held
        # The gap's connection, then the replay: it stalls half-way for 4 s (below the 6 s
        # read timeout), as a large backlog would take time.
        sim.set_fault(stall_after_events=75, stall_secs=4, drop_times=2)
        run = ConnectorThread(env).start()
        try:
            # The first events archived must be of the replay's first 75, sent before the stall
            # (held, they would come with the rest of it, after the stall). Not a fixed time from
            # the start: the run's start-up on a loaded machine does not count against the stall.
            wait_until(lambda: len(archived_events(archive)) > before, what="the replay archived")
            during = len(archived_events(archive)) - before
            cp = CheckpointStore(storage).load()
            assert cp is not None and cp.retention_gaps, "the gap was not seen"
            assert during <= 75, f"nothing of the replay archived while it was under way ({during})"
            wait_until(lambda: caught_up(storage, str(sim.store.last_event_id)), what="repair")
        finally:
            run.stop()
        assert run.error is None


def test_a_recovery_of_large_objects_still_takes_positions(tmp_path: Path) -> None:
    """Past its 8 MiB bound the hold passed its events on and dropped every marker it held,
    unsafe yet but safe a page later. When a page of the recovery (its objects with their
    dependencies) is larger than the bound, the hold overflows again before any marker can
    be found safe: no position was ever passed on, the checkpoint did not move for the whole
    recovery (the healthcheck's clock while recovering), every event stayed pending, and a
    cut or a restart began the recovery again from its start."""
    import os

    from connector.sim.store import SimStore, iso_ms

    base = 1_700_000_000_000
    objs = []
    for i in range(120):  # ~600 KB each: a page of 20 is ~12 MB of held data
        at = iso_ms(base + i)
        objs.append(
            {
                "type": "malware",
                "id": f"malware--{i:08d}-0000-4000-8000-000000000000",
                "spec_version": "2.1",
                "name": f"m{i}",
                "is_family": True,
                "description": os.urandom(300_000).hex(),
                "created": at,
                "modified": at,
            }
        )
    store = SimStore()
    store.load_bundle(objs)
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        sim.set_fault(recovery_index_order=20, stall_after_events=100, stall_secs=4)
        env = base_env(
            sim.url,
            TOKEN,
            archive,
            CONNECTOR_LIVE_STREAM_NO_DEPENDENCIES="true",
            CONNECTOR_LIVE_STREAM_RECOVERY_PAGE_SIZE="20",
        )
        run = ConnectorThread(env).start()
        try:
            saved = None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                cp = CheckpointStore(storage).load()
                saved = cp.last_event_id if cp is not None else None
                if saved is not None:
                    break
                time.sleep(0.1)
            assert saved is not None, "no position taken inside the recovery"
            from connector.events import EventId

            assert EventId.parse(saved) < EventId(base + 100, 0), "not inside the recovery"
            wait_until(lambda: caught_up(storage, str(store.last_event_id)), what="recovery")
        finally:
            run.stop()
        assert run.error is None
    assert {o["id"] for o in objs} - {ev.stix_id for ev in archived_events(archive)} == set()


def test_the_hold_finds_positions_past_its_bound() -> None:
    """The hold alone: pages (4 objects) larger than its bound (3 events' worth). Markers
    that went by in an overflow are still found safe later, and say how many of the events
    passed on after them they do not cover."""
    import json

    from connector.events import EventId, StreamEvent
    from connector.source import Complete, _RecoveryHold

    base = 1_700_000_000_000
    size = len(
        json.dumps({"data": {"id": "malware--0", "x": "x" * 1000}, "origin": {"referer": "r"}})
    )
    hold = _RecoveryHold(EventId(base + 10**6, 0), None, None, 4, max_bytes=3 * size)
    passed: list[object] = []
    for i in range(1, 41):
        body = json.dumps(
            {
                "data": {"type": "malware", "id": f"malware--{i}", "x": "x" * 1000},
                "origin": {"referer": "init-create"},
            }
        )
        items: list[object] = []
        if i > 1:
            items.append(Complete(EventId(base + i - 1, 0)))
        items.append(StreamEvent.from_sse(f"{base + i}-0", "create", body))
        passed += hold.feed(items, EventId(base + i - 1, 0), EventId(base + i - 1, 0))  # type: ignore[arg-type]
    marks = [p for p in passed if isinstance(p, Complete)]
    assert marks, "no position found safe past the bound"
    assert hold.released[0] is not None and hold.released[0] >= EventId(base + 30, 0)
    # Each marker covers exactly the events up to its id: what it leaves behind is above it.
    for index, item in enumerate(passed):
        if isinstance(item, Complete):
            before = [p for p in passed[:index] if isinstance(p, StreamEvent)]
            covered = before[: len(before) - item.behind]
            assert all(ev.id <= item.id for ev in covered)
            assert all(ev.id > item.id for ev in before[len(covered) :])
            assert len(covered) == item.id.ms - base


@pytest.mark.parametrize("metrics", [False, True], ids=["heartbeat", "consumer_metrics"])
def test_a_recovery_heartbeat_after_a_quarantined_event_loses_nothing(
    tmp_path: Path, metrics: bool
) -> None:
    """During a recovery the platform's heartbeat carries the last id it sent. When that event
    was quarantined (here: over CONNECTOR_MAX_EVENT_BYTES), the heartbeat's id is above every
    id the reader took in: it was taken for a position, complete, and the rest of the page,
    whose ids go back below it, was dropped as "re-sent at or below the position". The same
    for the 7.x ``consumer_metrics`` that follows it."""
    from tests.test_platform_fidelity import _interleaved, recovered_ids

    objs = _interleaved(10)  # malware at +0 .. +18 ms, relationships at +1 .. +17 ms
    objs[9]["description"] = "x" * 70_000  # the last malware sent, quarantined as oversized
    # One page: the malware first, then the relationships, whose ids go back down.
    faults = {
        "recovery_index_order": True,
        "recovery_heartbeats": True,
        "consumer_metrics": metrics,
    }
    archived = recovered_ids(tmp_path, objs, faults, CONNECTOR_MAX_EVENT_BYTES="65536")
    lost = sorted({str(o["id"]) for o in objs if o is not objs[9]} - archived)
    assert lost == []


def test_the_hold_bounds_quarantined_events_too() -> None:
    """The hold's bound counted only good events: malformed ones (each kept whole, up to
    CONNECTOR_MAX_EVENT_BYTES) inside a recovery were held without limit."""
    from connector.events import EventId, Quarantined
    from connector.source import _RecoveryHold

    base = 1_700_000_000_000
    hold = _RecoveryHold(EventId(base + 10**6, 0), None, None, 500, max_bytes=100_000)
    passed: list[object] = []
    for i in range(100):  # 100 malformed events of 10 KB: 1 MB, ten times the bound
        bad = Quarantined(EventId(0, 0), f"{base + i}-0", "create", "{" * 10_000, "not JSON")
        passed += hold.feed([bad], None, None)
    assert len(passed) >= 100 - 11, f"{100 - len(passed)} malformed events held"


def test_a_cut_after_positions_found_past_the_bound_loses_nothing(tmp_path: Path) -> None:
    """Pages larger than the hold's bound, ids back and forth within each, the connection cut
    twice: positions found safe after an overflow (``Complete.behind``) resume exactly."""
    import os

    from tests.test_platform_fidelity import _interleaved, recovered_ids

    objs = _interleaved(40)
    for o in objs:
        if o["type"] == "malware":
            o["description"] = os.urandom(300_000).hex()  # ~600 KB
    faults = {"recovery_index_order": 20, "drop_after_events": 50, "drop_times": 2}
    archived = recovered_ids(tmp_path, objs, faults, CONNECTOR_LIVE_STREAM_RECOVERY_PAGE_SIZE="20")
    assert {str(o["id"]) for o in objs} - archived == set()


def test_the_hold_never_passes_on_a_marker_a_later_id_voided() -> None:
    """A recovery page sends ids 1, 2, 3 then 2 again (an object of the page below the last
    ones): the reader's ``Complete(2)`` came before that second 2, so it is no position. The hold
    voided it as a candidate but kept it among its items: once a later marker was found safe,
    it went on with them, and the pipeline could checkpoint at 2 (one hand-over of 64 items, a
    flush) with the second 2 pending after it; resumed from 2, the platform's re-sent object
    at 2 is skipped as "at or below the position": lost."""
    import json
    from typing import Any

    from connector.events import EventId, StreamEvent
    from connector.source import Complete, _RecoveryHold

    base = 1_700_000_000_000

    def ev(ms: int, n: int) -> StreamEvent:
        body = {
            "data": {"type": "malware", "id": f"malware--{n:08d}-0000-4000-8000-000000000000"},
            "origin": {"referer": "init-create"},
        }
        return StreamEvent.from_sse(f"{base + ms}-0", "create", json.dumps(body))

    def at(ms: int) -> EventId:
        return EventId(base + ms, 0)

    hold = _RecoveryHold(at(10**6), None, None, 2)
    passed: list[Any] = []
    # As the reader gives them: a marker for the previous id before each higher one.
    passed += hold.feed([ev(1, 1)], None, None)
    passed += hold.feed([Complete(at(1)), ev(2, 2)], at(1), at(1))
    passed += hold.feed([Complete(at(2)), ev(3, 3)], at(2), at(2))
    passed += hold.feed([ev(2, 4)], at(2), at(2))  # voids Complete(2)
    for i in range(5, 9):  # later pages: every marker up to 3 is found safe
        passed += hold.feed([Complete(at(i - 2)), ev(i, i)], at(i - 2), at(i - 2))
    marks = [i for i in passed if isinstance(i, Complete)]
    assert marks, "no position found safe"
    for index, item in enumerate(passed):
        if isinstance(item, Complete):
            later = [p.id for p in passed[index + 1 :] if isinstance(p, StreamEvent)]
            assert all(i > item.id for i in later), f"{item} passed on, then ids {later}"


def test_the_events_behind_a_position_found_safe_late_stay_pending(tmp_path: Path) -> None:
    """``Complete(X, behind)``: the last ``behind`` events received went on past the hold's
    bound after X was taken in, and their groups are not known complete. The batch stops at X
    and the checkpoint with it; taken into the batch, they moved the checkpoint to their own
    group, and a cut then lost the rest of their page."""
    from connector.archive import ArchiveReader
    from connector.source import Complete
    from tests.support.handfed import at, hand_fed, malware, saved_position

    storage = LocalStorage(tmp_path / "a")
    pipe = hand_fed(storage)
    pipe._handle(malware(at(1), 1))
    pipe._handle(malware(at(2), 2))  # passed on in an overflow, after X = at(1)
    pipe._handle(Complete(at(1), 1))
    pipe._flush()
    assert saved_position(storage) == str(at(1))
    assert [ev.id for ev in ArchiveReader(storage).events()] == [at(1)]
    assert len(pipe._pending) == 1  # at(2) waits for a position above it


def _at(ms: int) -> EventId:
    return EventId(1_700_000_000_000 + ms, 0)


def _recovered(ms: int, n: int, referer: str = "init-create") -> StreamEvent:
    """A recovery's event at ``_at(ms)`` about malware ``n`` (``referer`` its origin)."""
    body = {
        "data": {"type": "malware", "id": f"malware--{n:08d}-0000-4000-8000-000000000000"},
        "origin": {"referer": referer},
    }
    return StreamEvent.from_sse(str(_at(ms)), "create", orjson.dumps(body))


def test_an_object_updated_at_the_recover_date_itself_is_still_the_recoverys() -> None:
    """The recovery sends what was updated up to its date, inclusive: an id at the recover
    point is no sign of the live part. Taken for one, the hold let go of the page, and a marker
    went on before an id below it (another object of the same page)."""
    hold = _RecoveryHold(_at(10), None, None, 2)
    passed = hold.feed([_recovered(10, 1)], None, None)
    passed += hold.feed([Complete(_at(10)), _recovered(3, 2)], _at(10), _at(10))
    assert not hold.done
    assert not [i for i in passed if isinstance(i, Complete)]


def test_no_position_is_safe_before_the_first_page_is_in() -> None:
    """Until ``page_size`` objects came, the rest of the first page may still come below any
    id. A group of dependencies alone (its object quarantined, here) gave a marker below every
    recovered id received: found safe at once, the objects of the page still to come below it
    were skipped on resuming there."""
    hold = _RecoveryHold(_at(100), None, None, 3)
    passed = hold.feed([_recovered(5, 1, "init-dependencies")], None, None)
    passed += hold.feed([Complete(_at(5)), _recovered(6, 2)], _at(5), _at(5))
    assert not [i for i in passed if isinstance(i, Complete)]
    passed += hold.feed([_recovered(2, 3)], _at(5), _at(5))
    assert not [i for i in passed if isinstance(i, Complete)]


def test_an_overflow_passes_the_events_on_without_their_markers() -> None:
    """Past the hold's bound its events go on, but a marker among them is no position yet:
    an id below it may still come in the same page (here at +3 ms, after the marker at +5)."""
    first = _recovered(5, 1)
    hold = _RecoveryHold(_at(100), None, None, 4, max_bytes=len(first.data) * 3 // 2)
    passed = hold.feed([first], None, None)
    passed += hold.feed([Complete(_at(5)), _recovered(6, 2)], _at(5), _at(5))
    assert len(passed) == 2, "past the bound, the events go on"
    assert not [i for i in passed if isinstance(i, Complete)]
    passed += hold.feed([_recovered(3, 3)], _at(5), _at(5))
    assert not [i for i in passed if isinstance(i, Complete)]
