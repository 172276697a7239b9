"""``run`` checks the checkpoint against where the archive really ends before it reads.

Accidents outside the connector: the checkpoint lost (kept apart on a volume that went, removed
by hand), the newest segments lost (a bucket restored from an older copy). Believing either
side alone loses data in silence: a first run over an archive recovers from scratch and never
records what was deleted since its end (a restore resurrects it); a checkpoint past lost
segments carries on after a hole. Real parts: the simulator over HTTP, a local archive, the
connector's own ``run`` in a thread, and the archive folded back into a state.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.archive.layout import MANIFESTS_PREFIX, manifest_key_for_segment
from connector.checkpoint import CHECKPOINT_KEY, CheckpointStore
from connector.errors import CheckpointError, ConfigError
from connector.jobs import run_snapshot_job
from connector.restore import materialise
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.storage.local import LocalStorage
from connector.verify import verify_archive
from tests.support.connector import ConnectorThread, base_env, caught_up, wait_until
from tests.test_state import assert_equal_objects, sim_objects, state_objects

TOKEN = "position-token-0123456789"


def _backup(env: dict[str, str], storage: LocalStorage, last_id: str | None, **kw: bool) -> None:
    run = ConnectorThread(env, **kw).start()
    wait_until(lambda: caught_up(storage, last_id or "0-0"), what="the backup")
    run.stop()
    assert run.error is None, run.error


def _delete_some(sim: SimServer, count: int) -> list[str]:
    victims = sorted(o["id"] for o in sim.store.objects() if o["type"] == "indicator")[:count]
    for sid in victims:
        sim.store.delete(sid)
    assert victims
    return victims


def _assert_archive_is_the_platform(storage: LocalStorage, sim: SimServer, work: Path) -> None:
    report = verify_archive(storage, work_dir=work / "verify")
    assert report.ok, report
    state = materialise(storage, until=None, work_dir=work / "plan")
    try:
        assert_equal_objects(state_objects(state), sim_objects(sim.store))
    finally:
        state.close()


def test_a_lost_checkpoint_is_refused_then_resumed_from_the_archive(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    storage = LocalStorage(archive)
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 300, seed=5)
        env = base_env(sim.url, TOKEN, str(archive), ARCHIVE_MAX_EVENTS="100")
        _backup(env, storage, sim.store.last_event_id)
        (archive / CHECKPOINT_KEY).unlink()
        gone = _delete_some(sim, 3)  # while the connector is down: never re-sent by a recovery
        generate(sim.store, 50, seed=6)

        refused = ConnectorThread(env).start()
        refused.join()
        assert isinstance(refused.error, ConfigError), refused.error
        assert refused.error.key == "checkpoint.uri"
        assert "--resume-from-archive" in str(refused.error)
        assert CheckpointStore(storage).load() is None  # nothing written by the refusal

        _backup(env, storage, sim.store.last_event_id, resume_from_archive=True)
        _assert_archive_is_the_platform(storage, sim, tmp_path)
        state = materialise(storage, until=None, work_dir=tmp_path / "again")
        try:
            assert all(state.get(sid) is None for sid in gone)  # not resurrected
        finally:
            state.close()


def test_lost_newest_segments_are_read_again_from_the_stream(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    storage = LocalStorage(archive)
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 400, seed=7)
        env = base_env(sim.url, TOKEN, str(archive), ARCHIVE_MAX_EVENTS="40")
        _backup(env, storage, sim.store.last_event_id)
        cp = CheckpointStore(storage).load()
        assert cp is not None and cp.last_segment is not None
        manifests = sorted(storage.list(MANIFESTS_PREFIX))
        assert len(manifests) >= 4
        # The two newest segments and their manifests go (an older copy of the bucket).
        segments = [k for k in sorted(storage.list("events/")) if not k.endswith(".json")]
        for key in segments[-2:]:
            storage.delete(key)
            storage.delete(manifest_key_for_segment(key))
        assert not storage.exists(manifest_key_for_segment(cp.last_segment))
        _delete_some(sim, 2)
        generate(sim.store, 30, seed=8)

        _backup(env, storage, sim.store.last_event_id)
        _assert_archive_is_the_platform(storage, sim, tmp_path)


def test_a_checkpoint_over_an_archive_that_lost_every_segment_is_refused(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "archive"
    storage = LocalStorage(archive)
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 100, seed=9)
        env = base_env(sim.url, TOKEN, str(archive))
        _backup(env, storage, sim.store.last_event_id)
        for key in list(storage.list("events/")) + list(storage.list(MANIFESTS_PREFIX)):
            storage.delete(key)
        run = ConnectorThread(env).start()
        run.join()
        assert isinstance(run.error, ConfigError), run.error
        assert run.error.key == "archive.uri"
        assert "delete that checkpoint" in str(run.error)


def test_the_refusal_names_where_a_checkpoint_kept_apart_was_looked_for(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    kept = tmp_path / "apart"
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 50, seed=10)
        env = base_env(sim.url, TOKEN, str(archive), CHECKPOINT_URI=str(kept))
        _backup(env, LocalStorage(kept), sim.store.last_event_id)
        (kept / CHECKPOINT_KEY).unlink()
        run = ConnectorThread(env).start()
        run.join()
        assert isinstance(run.error, ConfigError), run.error
        assert str(kept) in str(run.error)


def test_a_damaged_checkpoint_names_its_file_and_the_way_out(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "archive")
    storage.put(CHECKPOINT_KEY, b'{"version": 1, "stream_id": "live", ')  # cut short
    with pytest.raises(CheckpointError) as err:
        CheckpointStore(storage).load()
    text = str(err.value)
    assert str(tmp_path / "archive") in text and CHECKPOINT_KEY in text
    assert "not valid JSON" in text and "--resume-from-archive" in text


def test_segments_pruned_under_a_snapshot_covering_the_end_are_not_lost(tmp_path: Path) -> None:
    """Retention deletes every segment at or before its base snapshot, the newest one too on a
    quiet platform: the snapshot holds the archive's end, nothing is missing, and run goes on."""
    archive = tmp_path / "archive"
    storage = LocalStorage(archive)
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 100, seed=11)
        env = base_env(sim.url, TOKEN, str(archive), ARCHIVE_MAX_EVENTS="40")
        _backup(env, storage, sim.store.last_event_id)
        assert run_snapshot_job(storage, tmp_path / "snap") is not None
        for key in list(storage.list("events/")) + list(storage.list(MANIFESTS_PREFIX)):
            storage.delete(key)  # what retention does with that snapshot as its base
        generate(sim.store, 20, seed=12)
        _backup(env, storage, sim.store.last_event_id)
        _assert_archive_is_the_platform(storage, sim, tmp_path)
