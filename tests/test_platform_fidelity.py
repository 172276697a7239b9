"""Behaviours of the real platform that the simulator reproduces only on request (faults)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from connector.sim.server import SimServer
from connector.sim.store import SimStore, iso_ms
from connector.storage.local import LocalStorage
from tests.support.connector import (
    ConnectorThread,
    archived_events,
    base_env,
    caught_up,
    wait_until,
)
from tests.test_sim import data_msgs, read_stream

TOKEN = "test-token"
BASE_MS = 1_700_000_000_000


def _interleaved(n: int) -> list[dict[str, Any]]:
    """``n`` malware and the ``n - 1`` relationships chaining them, their ``updated_at``
    alternating (malware i at +2i ms, relationship i at +2i+1 ms)."""
    mal = [f"malware--{i:08d}-0000-4000-8000-000000000000" for i in range(n)]
    objs: list[dict[str, Any]] = []
    for i, sid in enumerate(mal):
        at = iso_ms(BASE_MS + 2 * i)
        objs.append(
            {
                "type": "malware",
                "id": sid,
                "spec_version": "2.1",
                "name": f"m{i}",
                "is_family": True,
                "created": at,
                "modified": at,
            }
        )
    for i in range(n - 1):
        at = iso_ms(BASE_MS + 2 * i + 1)
        objs.append(
            {
                "type": "relationship",
                "id": f"relationship--{i:08d}-0000-4000-8000-000000000000",
                "spec_version": "2.1",
                "relationship_type": "uses",
                "source_ref": mal[i],
                "target_ref": mal[i + 1],
                "created": at,
                "modified": at,
            }
        )
    return objs


def test_recovery_index_order_sends_ids_back_and_forth_and_skips_dependencies() -> None:
    """The platform's recovery (sseMiddleware.js:673-707): each page of its updated_at-sorted
    listing is loaded again by an unsorted search (storeLoadByIdsWithRefs), so ids within a page
    are not sorted; and an object already sent as a dependency has no init-create."""
    store = SimStore()
    store.load_bundle(_interleaved(4))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        url = f"{sim.url}/stream/live?from=0&recover={iso_ms(store.now_ms() + 1000)}"
        # With dependencies, a malware's relationships go with it, carrying its id; each
        # object is sent once (not again as init-create after going as a dependency).
        msgs = data_msgs(read_stream(url, headers=auth))
        sent = [m[2]["data"]["id"] for m in msgs]
        assert len(sent) == len(set(sent)) == 7
        sim.set_fault(recovery_index_order=True)
        msgs = data_msgs(read_stream(url + "&no-dependencies=true", headers=auth))
    ids = [m[0] for m in msgs]
    assert ids == [f"{BASE_MS + ms}-0" for ms in (0, 2, 4, 6, 1, 3, 5)]


def recovered_ids(
    tmp_path: Path, objs: list[dict[str, Any]], faults: dict[str, Any], **env: str
) -> set[str]:
    """A first run's recovery of ``objs`` (no dependencies) under the simulator ``faults``,
    followed to its end: the STIX ids it archived."""
    store = SimStore()
    store.load_bundle(objs)
    archive = str(tmp_path / "a")
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        sim.set_fault(**faults)
        run_env = base_env(
            sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_NO_DEPENDENCIES="true", **env
        )
        run = ConnectorThread(run_env).start()
        storage = LocalStorage(archive)
        wait_until(lambda: caught_up(storage, str(store.last_event_id)), what="recovery")
        run.stop()
    assert run.error is None
    return {ev.stix_id for ev in archived_events(archive)}


def test_a_recovery_cut_while_its_ids_go_back_and_forth_loses_nothing(tmp_path: Path) -> None:
    """A first run's recovery cut in a page whose ids go back and forth: nothing is lost."""
    objs = _interleaved(10)
    # One page: the 10 malware (ids +0 .. +18 ms), then the 9 relationships (+1 .. +17); the
    # connection is cut after the malware and two relationships.
    archived = recovered_ids(
        tmp_path, objs, {"recovery_index_order": True, "drop_after_events": 12}
    )
    assert {o["id"] for o in objs} - archived == set()


@pytest.mark.parametrize("cut", [3, 6, 11, 17, 30])
def test_recovery_pages_cut_anywhere_lose_nothing(tmp_path: Path, cut: int) -> None:
    """Small pages (4 objects; the connector told so): positions are taken inside the recovery,
    and a cut anywhere still loses nothing."""
    objs = _interleaved(20)
    faults = {"recovery_index_order": 4, "drop_after_events": cut, "drop_times": 2}
    archived = recovered_ids(tmp_path, objs, faults, CONNECTOR_LIVE_STREAM_RECOVERY_PAGE_SIZE="4")
    assert {o["id"] for o in objs} - archived == set()


def test_an_object_that_left_the_filter_is_not_resent_as_a_dependency() -> None:
    """The platform caches what it sent as a delete (sseMiddleware.js:605,642): a report that
    then references the object, on the same connection, comes without it."""
    store = SimStore()
    mal = "malware--00000000-0000-4000-8000-000000000001"
    start = store.create({"type": "malware", "id": mal, "name": "m", "labels": ["keep"]})
    store.update(mal, unset=["labels"])  # leaves the filter: a delete
    rep = "report--00000000-0000-4000-8000-000000000001"
    report = {"type": "report", "id": rep, "name": "r", "labels": ["keep"], "object_refs": [mal]}
    store.create(report)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        sim.add_stream(
            "kept",
            filters={
                "mode": "and",
                "filterGroups": [],
                "filters": [{"key": ["objectLabel"], "values": ["keep"], "operator": "eq"}],
            },
        )
        # From after the create: the delete is the first this connection sends of the malware.
        msgs = data_msgs(read_stream(f"{sim.url}/stream/kept?from={start}", headers=auth))
    assert [(m[1], m[2]["data"]["id"]) for m in msgs] == [
        ("delete", mal),
        ("create", rep),  # the malware it holds is not sent again
    ]


def test_container_path_sends_a_relationship_whose_endpoint_cannot_be_resolved() -> None:
    """With no-dependencies, an update of a relationship in a matching container goes by the
    container path, which sends it even when an endpoint is invisible to the user (the platform
    ignores the resolution's result there, sseMiddleware.js:633-634), without its refs."""
    green = "marking-definition--00000000-0000-4000-8000-00000000000a"
    red = "marking-definition--00000000-0000-4000-8000-00000000000b"
    store = SimStore()
    for mid, name in ((green, "TLP:GREEN"), (red, "TLP:RED")):
        store.create({"type": "marking-definition", "id": mid, "name": name})
    mal_a = "malware--00000000-0000-4000-8000-00000000000a"
    mal_b = "malware--00000000-0000-4000-8000-00000000000b"
    store.create({"type": "malware", "id": mal_a, "name": "a", "object_marking_refs": [green]})
    store.create({"type": "malware", "id": mal_b, "name": "b", "object_marking_refs": [red]})
    rel = "relationship--00000000-0000-4000-8000-00000000000a"
    store.create(
        {
            "type": "relationship",
            "id": rel,
            "relationship_type": "uses",
            "source_ref": mal_a,
            "target_ref": mal_b,
            "object_marking_refs": [green],
        }
    )
    rep = {
        "type": "report",
        "id": "report--00000000-0000-4000-8000-00000000000a",
        "name": "r",
        "object_refs": [rel],
        "object_marking_refs": [green],
    }
    start = store.create(rep)
    store.update(rel, set={"description": "edited"})
    with SimServer(
        token=TOKEN,
        store=store,
        heartbeat_secs=0.2,
        restricted_token="r",
        restricted_markings=[green],
    ) as sim:
        sim.add_stream(
            "reports",
            filters={
                "mode": "and",
                "filterGroups": [],
                "filters": [{"key": ["entity_type"], "values": ["Report"], "operator": "eq"}],
            },
        )
        url = f"{sim.url}/stream/reports?from={start}&no-dependencies=true"
        msgs = data_msgs(read_stream(url, headers={"Authorization": "Bearer r"}))
    assert [(m[1], m[2]["data"]["id"]) for m in msgs] == [("update", rel)]


def test_a_recovery_hold_is_bounded_and_keeps_its_unsafe_markers_back() -> None:
    """A recovery's first page held whole would hold a large report's dependencies (one id,
    as many events as the report has objects) in memory. Past its bound the hold passes its
    events on without their markers (none is a safe position yet): the pipeline keeps them
    pending, spilled when large, and the resume position stays where it was."""
    from connector.events import EventId, StreamEvent
    from connector.source import Complete, _RecoveryHold

    hold = _RecoveryHold(EventId(BASE_MS + 10**6, 0), None, None, 500, max_bytes=20_000)
    report_id = f"{BASE_MS}-0"
    passed: list[Any] = []
    for i in range(200):  # the report's dependencies, ~1 KB each, under the report's id
        data = {
            "data": {"type": "malware", "id": f"malware--{i:08d}-0000-4000-8000-000000000000"},
            "origin": {"referer": "init-create"},
        }
        data["data"]["name"] = "x" * 1000
        body = json.dumps(data)
        passed += hold.feed([StreamEvent.from_sse(report_id, "create", body)], None, None)
    passed += hold.feed([Complete(EventId(BASE_MS, 0))], None, None)
    events = [i for i in passed if isinstance(i, StreamEvent)]
    assert len(events) >= 200 - 25  # at most the bound's worth held back
    assert not [i for i in passed if isinstance(i, Complete)]  # no unsafe position
    assert hold.released == (None, None)


def test_a_heartbeat_between_a_triggers_dependencies_then_a_cut_loses_nothing(
    tmp_path: Path,
) -> None:
    """The platform's heartbeat timer may fire between a trigger's dependencies, with the
    trigger's id, before the trigger is written (protocol doc §2.3, the simulator's
    ``dependency_heartbeats``); the connection is then cut. Taken as a position passed, that
    heartbeat made the reconnection start after the trigger, which was never sent again."""
    store = SimStore()
    green = "marking-definition--00000000-0000-4000-8000-00000000000a"
    org = "identity--00000000-0000-4000-8000-00000000000a"
    store.create({"type": "marking-definition", "id": green, "name": "TLP:GREEN"})
    store.create({"type": "identity", "id": org, "name": "o", "identity_class": "organization"})
    mal = "malware--00000000-0000-4000-8000-00000000000a"
    other = "malware--00000000-0000-4000-8000-00000000000b"
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        archive = str(tmp_path / "a")
        storage = LocalStorage(archive)
        run = ConnectorThread(base_env(sim.url, TOKEN, archive)).start()
        try:
            wait_until(lambda: caught_up(storage, str(store.last_event_id)), what="backup")
            # An event past the first run's recover date: the reconnection below starts after
            # it, with no recovery to re-send the refs first.
            store.create({"type": "malware", "id": other, "name": "x", "is_family": True})
            wait_until(lambda: caught_up(storage, str(store.last_event_id)), what="caught up")
            # The next connection (its cache empty: both refs are sent again as dependencies)
            # is cut after the second one: dependency, heartbeat, dependency, cut.
            sim.set_fault(dependency_heartbeats=True, drop_after_events=2)
            sim.drop_connections()
            store.create(
                {
                    "type": "malware",
                    "id": mal,
                    "name": "m",
                    "is_family": True,
                    "object_marking_refs": [green],
                    "created_by_ref": org,
                }
            )
            wait_until(
                lambda: mal in {e.stix_id for e in archived_events(archive)},
                timeout=20,
                what="the trigger archived",
            )
            assert sim._fault_value("drop_after_events") is None  # the cut did happen
        finally:
            run.stop()
    assert run.error is None
