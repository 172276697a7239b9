"""Events that sort at or below an idle heartbeat (protocol doc §2.3-2.4).

A heartbeat's id is the platform node's clock ("now-0"), an event's id Redis's. An event
appended in the heartbeat's millisecond, or by a Redis whose clock runs behind the node's, sorts
at or below a heartbeat already received, and perhaps already checkpointed. The simulator plays
a node clock ``heartbeat_ahead_ms`` ahead of its event clock. Such an event is archived as a new
one (not quarantined as going backwards), and a restart or reconnection from a heartbeat position
starts a few seconds before it, so it is not skipped either.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.checkpoint import CheckpointStore
from connector.events import EventId
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.storage.local import LocalStorage
from tests.support.connector import (
    ConnectorThread,
    archived_events,
    base_env,
    caught_up,
    raw_log,
    wait_until,
)

TOKEN = "test-token"
# Below source._HEARTBEAT_SLACK_MS (5 s), which a restart rewinds; as far ahead as that allows:
# the late events must be appended before the event clock reaches the checkpointed heartbeat,
# after the test has read it (and, in the restart test, stopped the run, ~0.35 s, more if loaded).
AHEAD_MS = 4_000


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = SimServer(token=TOKEN, heartbeat_secs=0.2).start()
    generate(server.store, 20, seed=3, mix="creates")
    server.set_fault(heartbeat_ahead_ms=AHEAD_MS)
    yield server
    server.stop()


def _checkpoint(storage: LocalStorage) -> EventId:
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.last_event_id
    return EventId.parse(cp.last_event_id)


def _idle_past_last_event(sim: SimServer, storage: LocalStorage) -> EventId:
    """Wait until the checkpoint sits on a heartbeat ahead of the platform's event clock."""
    last = EventId.parse(sim.store.last_event_id)
    wait_until(
        lambda: _checkpoint(storage).ms > sim.store.now_ms() + AHEAD_MS // 2,
        what="a checkpoint on a heartbeat ahead of the event clock",
    )
    position = _checkpoint(storage)
    assert position > last
    return position


def _ids_after(sim: SimServer, after: EventId) -> set[str]:
    """The platform's event ids above ``after`` (its stream log)."""
    return {i for i, _event, _env in raw_log(sim.url, TOKEN) if EventId.parse(i) > after}


def test_an_event_below_a_received_heartbeat_is_archived(sim: SimServer, tmp_path: Path) -> None:
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    run = ConnectorThread(base_env(sim.url, TOKEN, archive)).start()
    wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="backup")
    before = EventId.parse(sim.store.last_event_id)
    position = _idle_past_last_event(sim, storage)
    generate(sim.store, 3, seed=4, mix="creates")
    late = _ids_after(sim, before)
    assert len(late) == 3 and all(EventId.parse(i) <= position for i in late)  # the point
    wait_until(
        lambda: {e.id_text for e in archived_events(archive)} >= late,
        what="the late events archived",
    )
    run.stop()
    assert run.error is None
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.quarantined == 0


def test_a_restart_from_a_heartbeat_does_not_skip_them(sim: SimServer, tmp_path: Path) -> None:
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    env = base_env(sim.url, TOKEN, archive)
    run = ConnectorThread(env).start()
    wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="backup")
    before = EventId.parse(sim.store.last_event_id)
    position = _idle_past_last_event(sim, storage)
    run.stop()
    generate(sim.store, 3, seed=5, mix="creates")  # while down, below the checkpoint
    late = _ids_after(sim, before)
    assert len(late) == 3 and all(EventId.parse(i) <= position for i in late)
    assert _checkpoint(storage) >= position
    run = ConnectorThread(env).start()
    wait_until(
        lambda: {e.id_text for e in archived_events(archive)} >= late,
        what="the events appended below the checkpoint archived",
    )
    run.stop()
    assert run.error is None
    seen = [(e.id_text, e.stix_id) for e in archived_events(archive)]
    assert len(seen) == len(set(seen))  # and nothing archived twice


@pytest.mark.parametrize("name", ["heartbeat", "consumer_metrics"])
def test_a_heartbeat_at_the_position_does_not_take_the_dependencies_carried_there(
    name: str,
) -> None:
    """A recovery resumed at our position re-sends there dependencies of objects it sends
    later; they are carried into the next group, above the position (the archive skips groups
    at or below its tail). A heartbeat at the position itself completes nothing: taken as a
    new position, it put them in a group at the position, where the archive skipped them. The
    same for ``consumer_metrics``, which carries a position as a heartbeat does."""
    import orjson

    from connector.events import OCTI_EXT, ControlEvent, StreamEvent
    from connector.source import Complete, SourceConfig, SseSource
    from tests.support.handfed import at

    position = at(0)
    source = SseSource(
        SourceConfig(url="http://x", token="t", stream_id="live"),
        resume=position,
        recover_until="2027-01-15T08:00:00.000Z",  # after the position: still recovering
    )
    stix = {"type": "malware", "id": "malware--00000000-0000-4000-8000-000000000001"}
    stix["extensions"] = {OCTI_EXT: {"id": "iid-1", "type": "Malware"}}
    env = {"version": "4", "type": "create", "origin": {"referer": "init-dependencies"}}
    out: list[object] = []
    source._handle("create", str(position), orjson.dumps({**env, "data": stix}), out)
    assert out == []  # carried
    source._handle(name, str(position), b'"x"', out)
    assert [i for i in out if not isinstance(i, ControlEvent)] == []
    out.clear()
    source._handle(name, str(at(1)), b'"x"', out)
    carried, complete = (i for i in out if not isinstance(i, ControlEvent))
    assert isinstance(carried, StreamEvent) and carried.group == at(1)
    assert complete == Complete(at(1))


def test_a_reconnect_after_a_heartbeat_completed_a_group_starts_at_that_group() -> None:
    """A heartbeat completing a group of dependency events records it as the newest data group:
    the next connection starts there, not the heartbeat slack before it, where the group's
    events came again and, above the older data group, were taken for new ones."""
    import orjson

    from connector.events import OCTI_EXT
    from connector.source import Complete, SourceConfig, SseSource
    from tests.support.handfed import at

    source = SseSource(SourceConfig(url="http://x", token="t"), resume=at(0), resume_data=at(0))
    stix = {"type": "malware", "id": "malware--00000000-0000-4000-8000-000000000002"}
    stix["extensions"] = {OCTI_EXT: {"id": "iid-2", "type": "Malware"}}
    env = {"version": "4", "type": "create", "origin": {"referer": "init-dependencies"}}
    out: list[object] = []
    source._handle("create", str(at(100)), orjson.dumps({**env, "data": stix}), out)
    source._handle("heartbeat", str(at(200)), b'"x"', out)
    assert out[-1] == Complete(at(200))
    assert source.request_params()["from"] == str(at(100))


def test_a_position_inside_a_recovery_is_resumed_exactly() -> None:
    """No heartbeat slack inside a recovery: its positions are its own data groups (a heartbeat
    completes nothing there). A sync with no archive knows no data group: it went back 5 s into
    the recovery, whose objects of those seconds were all sent again, and skipped."""
    from connector.source import SourceConfig, SseSource
    from tests.support.handfed import at

    source = SseSource(
        SourceConfig(url="http://x", token="t"),
        resume=at(0),
        recover_until="2027-01-15T08:00:00.000Z",  # at(0) itself: still recovering
    )
    assert source.request_params()["from"] == str(at(0))


def test_on_the_raw_stream_a_gap_repairs_date_is_no_recovery() -> None:
    """The raw stream has no recovery (``recover`` is not sent): a retention-gap repair's date
    there only tells the retention check what was seen. Taken for a recovery's, it made an event
    below an idle heartbeat (the platform's clock behind this machine's) a re-send going
    backwards, quarantined, and a reconnect from the heartbeat lost its slack."""
    import orjson

    from connector.events import OCTI_EXT, StreamEvent
    from connector.source import Complete, SourceConfig, SseSource, _iso
    from tests.support.handfed import at

    source = SseSource(
        SourceConfig(url="http://x", token="t", stream_id="raw"),
        resume=at(0),
        resume_data=at(0),
        recover_until=_iso(at(10_000).ms),  # the repair's date, ahead of the platform's clock
    )
    out: list[object] = []
    source._handle("heartbeat", str(at(6_000)), b'"x"', out)
    assert out[-1] == Complete(at(6_000))
    assert source.request_params()["from"] == str(at(1_000))  # the heartbeat slack
    stix = {"type": "malware", "id": "malware--00000000-0000-4000-8000-000000000003"}
    stix["extensions"] = {OCTI_EXT: {"id": "iid-3", "type": "Malware"}}
    out.clear()
    env = {"version": "4", "type": "create", "origin": {}, "data": stix}
    source._handle("create", str(at(5_500)), orjson.dumps(env), out)
    new, complete = out
    assert isinstance(new, StreamEvent) and new.group == at(5_500)  # new, not quarantined
    assert complete == Complete(at(5_500))
