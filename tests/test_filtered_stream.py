"""A filtered stream (a collection): an update that takes an object out of the filter arrives as a
``delete`` carrying the update (protocol doc §5.3, §8.14). It was not deleted upstream: the
archived state keeps it as last seen, its relationships still in the filter and the containers
holding it are untouched, and a restore deletes nothing for it."""

from __future__ import annotations

from pathlib import Path

from connector.restore import materialise
from connector.sim.server import SimServer
from connector.storage.local import LocalStorage
from tests.support.connector import (
    ConnectorThread,
    archived_events,
    base_env,
    caught_up,
    wait_until,
)

TOKEN = "test-token"
KEEP = {
    "mode": "and",
    "filterGroups": [],
    "filters": [{"key": ["objectLabel"], "values": ["keep"], "operator": "eq", "mode": "or"}],
}
M = "malware--00000000-0000-4000-8000-00000000000a"
I = "intrusion-set--00000000-0000-4000-8000-00000000000b"  # noqa: E741
R = "relationship--00000000-0000-4000-8000-00000000000c"
RP = "report--00000000-0000-4000-8000-00000000000d"


def test_leaving_the_filter_is_not_an_upstream_delete(tmp_path: Path) -> None:
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        store = sim.store
        store.create(
            {"type": "malware", "id": M, "name": "m", "labels": ["keep"], "is_family": True}
        )
        store.create({"type": "intrusion-set", "id": I, "name": "i", "labels": ["keep"]})
        store.create(
            {
                "type": "relationship",
                "id": R,
                "relationship_type": "uses",
                "source_ref": I,
                "target_ref": M,
                "labels": ["keep"],
            }
        )
        store.create(
            {
                "type": "report",
                "id": RP,
                "name": "r",
                "labels": ["keep"],
                "published": "2025-01-01T00:00:00.000Z",
                "object_refs": [M, I],
            }
        )
        sim.add_stream("keep", filters=KEEP)
        archive = str(tmp_path / "a")
        storage = LocalStorage(archive)
        run = ConnectorThread(base_env(sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_ID="keep"))
        run.start()
        wait_until(lambda: caught_up(storage, store.last_event_id), what="recovery")
        store.update(M, set={"labels": ["other"]})  # M leaves the filter; nothing is deleted
        wait_until(
            lambda: any(e.event == "delete" and e.stix_id == M for e in archived_events(archive)),
            what="the translated delete",
        )
        run.stop()
        assert run.error is None
        assert store.get(R) is not None and M in store.get(RP)["object_refs"]
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        kept = state.get(M)  # out of the collection, but it exists: kept as last seen, so
        assert kept is not None and kept["labels"] == ["keep"]  # what refers to it restores
        assert state.get(R) is not None  # still in the filter, never deleted upstream
        report = state.get(RP)
        assert report is not None and M in report["object_refs"]
        assert not list(state.tombstones())  # so a restore deletes nothing for them
