"""Point-in-time restore: what ``--until`` includes, and points whose state the archive does not
know exactly (a retention gap's lost window). Real archive (the simulator, ``run``), real CLI."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import orjson
import pytest

from connector.__main__ import main
from connector.checkpoint import Checkpoint, CheckpointStore
from connector.errors import ConfigError
from connector.events import EventId
from connector.restore import parse_until
from connector.restore_cli import _gap_around
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.storage.local import LocalStorage
from tests.support.connector import ConnectorThread, base_env, caught_up, wait_until


@pytest.fixture(autouse=True)
def _work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENCTI_SYNC_WORK_DIR", str(tmp_path / "work"))


def _restore(archive: Path, tmp_path: Path, *args: str) -> int:
    return main(["restore", "--archive", str(archive), "--work-dir", str(tmp_path / "w"), *args])


def _bundle_ids(path: Path) -> set[str]:
    return {str(o["id"]) for o in orjson.loads(path.read_bytes())["objects"]}


def test_a_point_inside_a_retention_gap_needs_allow_partial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stream lost what happened while the connector was down; the repair recovers what
    is there at its end (under each object's updated_at) and reconciles the lost deletes at the
    repair's time. At a point inside that window the archive cannot tell what existed: an
    object deleted before the point is still live there. Refused unless --allow-partial, as a
    point inside the first recovery is."""
    token = "gap-token-0123456789"
    archive = tmp_path / "a"
    storage = LocalStorage(archive)
    with SimServer(token=token, heartbeat_secs=0.2) as sim:
        doomed = f"malware--{uuid.uuid4()}"
        sim.store.create({"type": "malware", "id": doomed, "name": "Doomed", "is_family": True})
        generate(sim.store, 20, seed=3, mix="creates")
        env = base_env(sim.url, token, str(archive))
        run = ConnectorThread(env).start()
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="first run")
        run.stop()
        time.sleep(0.05)
        sim.store.delete(doomed)  # while the connector is down
        time.sleep(0.05)
        point = EventId.parse(sim.store.last_event_id)  # inside the lost window: deleted
        time.sleep(0.05)
        generate(sim.store, 20, seed=11, mix="creates")
        sim.store.trim(5)  # the delete is no longer in the platform's stream
        run = ConnectorThread(env).start()
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="repair")
        run.stop()
    cp = CheckpointStore(storage).load()
    assert cp is not None and len(cp.retention_gaps) == 1
    out = tmp_path / "state.json"
    assert _restore(archive, tmp_path, "--to-bundle", str(out)) == 0
    assert doomed not in _bundle_ids(out)  # the latest state is exact
    out.unlink()
    capsys.readouterr()
    code = _restore(archive, tmp_path, "--to-bundle", str(out), "--until", str(point))
    held = _bundle_ids(out) if out.exists() else set()
    assert code == 1, f"restored (doomed object present: {doomed in held})"
    assert "retention gap" in capsys.readouterr().err and not out.exists()
    args = ("--to-bundle", str(out), "--until", str(point), "--allow-partial")
    assert _restore(archive, tmp_path, *args) == 0
    # The window's ends are known states: the last event archived before the loss, and the
    # point the repair wrote everything back to.
    window = _gap_around(cp, point)
    assert window is not None and window[0] < point < window[1]
    for end in window:
        out.unlink()
        assert _restore(archive, tmp_path, "--to-bundle", str(out), "--until", str(end)) == 0


def test_a_point_inside_a_gap_found_during_a_connection_is_unknown_below_the_archive_end() -> None:
    """A gap found at a look at the stream's retention: the events received after the last
    look's position may miss some anywhere, below the archive's end when it was found too, so
    a point there is inside the window. A gap found on connecting loses only what came after
    the archive's end."""
    cp = Checkpoint(stream_id="live", source_url="http://x")
    gap = {
        "checkpoint_event_id": "100-0",
        "first_retained_event_id": "200-0",
        "archive_last_event_id": "180-0",
        "repair_recover_until": "1970-01-01T00:00:00.300Z",
        "in_connection": True,
    }
    cp.retention_gaps.append(gap)
    assert _gap_around(cp, EventId(150, 0)) == (EventId(100, 0), EventId(300, 0))
    del gap["in_connection"]
    assert _gap_around(cp, EventId(150, 0)) is None
    assert _gap_around(cp, EventId(190, 0)) == (EventId(180, 0), EventId(300, 0))


def test_what_a_restore_does_with_objects_newer_than_the_point(tmp_path: Path) -> None:
    """Restoring a point over the platform as it is now (undoing a mistake): an object created
    after the point is left in place, but one that existed before the point, was deleted before
    it and was created again after it under the same id (a deterministic standard id, an
    import run again) is deleted, as the point's state holds its tombstone. README says so."""
    from connector.restore import materialise, restore_to_target
    from connector.sim.store import SimStore
    from tests.test_restore import TOKEN, _pycti_target
    from tests.test_state import archive_events, new_sim, sim_events

    src = new_sim()
    again = f"malware--{uuid.uuid4()}"
    later = f"malware--{uuid.uuid4()}"
    src.create({"type": "malware", "id": again, "name": "Again", "is_family": True})
    src.delete(again)
    point = EventId.parse(str(src.last_event_id))
    src.create({"type": "malware", "id": again, "name": "Again", "is_family": True})
    src.create({"type": "malware", "id": later, "name": "Later", "is_family": True})
    events, _ = sim_events(src)
    storage = LocalStorage(tmp_path / "a")
    archive_events(storage, events, per_segment=2)
    now = SimStore()
    now.api_token = TOKEN  # type: ignore[attr-defined]
    now.load_bundle(src.dump_bundle())
    with SimServer(token=TOKEN, store=now) as server:
        target = _pycti_target(server.url)
        try:
            with materialise(storage, until=point, work_dir=tmp_path / "w") as state:
                report = restore_to_target(state, target)
        finally:
            target.close()
    assert now.get(later) is not None  # created after the point: left in place
    assert now.get(again) is None and report.deleted == 1  # created again after it: deleted


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2038-06-04T14:17:18.107Z", 2159273838107),
        ("1974-05-05T04:25:41.744Z", 136959941744),
        ("2026-11-01T14:00:00.123+00:00", 1793541600123),
        ("2026-11-01T16:00:00.123+02:00", 1793541600123),
    ],
)
def test_an_until_date_keeps_its_millisecond(text: str, ms: int) -> None:
    """Events at the very instant are included: its millisecond is never rounded down."""
    from connector.progress import iso_to_ms

    assert parse_until(text) == EventId(ms, 10**10 - 1)
    assert iso_to_ms(text.replace("+00:00", "Z")) == ms


def test_an_until_date_without_an_offset_is_utc_whatever_the_host_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the help says (no offset: UTC): a host in New York restores the same point."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_until("2026-01-01T00:00:00") == EventId(1767225600000, 10**10 - 1)
        assert parse_until("2026-01-01") == EventId(1767225600000, 10**10 - 1)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_an_until_date_before_1970_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        parse_until("1969-12-31T23:59:59Z")
    assert err.value.key == "--until" and "1970" in str(err.value)
