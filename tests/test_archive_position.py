"""``run`` checks the checkpoint against where the archive really ends before it reads.

Accidents outside the connector: the checkpoint lost (kept apart on a volume that went, removed
by hand), the newest segments lost (a bucket restored from an older copy). Believing either
side alone loses data in silence: a first run over an archive recovers from scratch and never
records what was deleted since its end (a restore resurrects it); a checkpoint past lost
segments carries on after a hole. Real parts: the simulator over HTTP, a local archive, the
connector's own ``run`` in a thread, and the archive folded back into a state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import orjson
import pytest

from connector.archive.layout import MANIFESTS_PREFIX, manifest_key_for_segment
from connector.checkpoint import CHECKPOINT_KEY, Checkpoint, CheckpointStore
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


@contextmanager
def _backed_up(
    tmp_path: Path, events: int, seed: int, **extra: str
) -> Iterator[tuple[SimServer, dict[str, str], LocalStorage]]:
    """A simulator with ``events`` generated, and ``run`` caught up with it into
    ``tmp_path/archive`` (its checkpoint where ``CHECKPOINT_URI`` says, if given)."""
    storage = LocalStorage(tmp_path / "archive")
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, events, seed=seed)
        env = base_env(sim.url, TOKEN, str(tmp_path / "archive"), **extra)
        kept = extra.get("CHECKPOINT_URI")
        _backup(env, LocalStorage(kept) if kept else storage, sim.store.last_event_id)
        yield sim, env, storage


def _refusal(env: dict[str, str]) -> ConfigError:
    run = ConnectorThread(env).start()
    run.join()
    assert isinstance(run.error, ConfigError), run.error
    return run.error


def _delete_some(sim: SimServer, count: int) -> list[str]:
    victims = sorted(o["id"] for o in sim.store.objects() if o["type"] == "indicator")[:count]
    for sid in victims:
        sim.store.delete(sid)
    assert victims
    return victims


def _assert_archive_is_the_platform(
    storage: LocalStorage, sim: SimServer, work: Path, gone: list[str] | None = None
) -> None:
    """verify passes and the archive's state equals the platform's; ``gone`` (deleted while
    the connector was down) is not brought back."""
    report = verify_archive(storage, work_dir=work / "verify")
    assert report.ok, report
    state = materialise(storage, until=None, work_dir=work / "plan")
    try:
        assert_equal_objects(state_objects(state), sim_objects(sim.store))
        assert all(state.get(sid) is None for sid in gone or [])
    finally:
        state.close()


def test_a_lost_checkpoint_is_refused_then_resumed_from_the_archive(tmp_path: Path) -> None:
    with _backed_up(tmp_path, 300, 5, ARCHIVE_MAX_EVENTS="100") as (sim, env, storage):
        (tmp_path / "archive" / CHECKPOINT_KEY).unlink()
        gone = _delete_some(sim, 3)  # while the connector is down: never re-sent by a recovery
        generate(sim.store, 50, seed=6)

        refused = _refusal(env)
        assert refused.key == "checkpoint.uri"
        assert "--resume-from-archive" in str(refused)
        assert CheckpointStore(storage).load() is None  # nothing written by the refusal

        _backup(env, storage, sim.store.last_event_id, resume_from_archive=True)
        _assert_archive_is_the_platform(storage, sim, tmp_path, gone)


def test_lost_newest_segments_are_read_again_from_the_stream(tmp_path: Path) -> None:
    with _backed_up(tmp_path, 400, 7, ARCHIVE_MAX_EVENTS="40") as (sim, env, storage):
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


def _delete_every_segment(storage: LocalStorage) -> None:
    for key in list(storage.list("events/")) + list(storage.list(MANIFESTS_PREFIX)):
        storage.delete(key)


def test_a_checkpoint_over_an_archive_that_lost_every_segment_is_refused(
    tmp_path: Path,
) -> None:
    with _backed_up(tmp_path, 100, 9) as (_sim, env, storage):
        _delete_every_segment(storage)
        refused = _refusal(env)
        assert refused.key == "archive.uri"
        assert "delete that checkpoint" in str(refused)


def test_the_refusal_names_where_a_checkpoint_kept_apart_was_looked_for(tmp_path: Path) -> None:
    kept = tmp_path / "apart"
    with _backed_up(tmp_path, 50, 10, CHECKPOINT_URI=str(kept)) as (_sim, env, _storage):
        (kept / CHECKPOINT_KEY).unlink()
        assert str(kept) in str(_refusal(env))


def test_a_damaged_checkpoint_names_its_file_and_the_way_out(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "archive")
    storage.put(CHECKPOINT_KEY, b'{"version": 1, "stream_id": "live", ')  # cut short
    with pytest.raises(CheckpointError) as err:
        CheckpointStore(storage).load()
    text = str(err.value)
    assert str(tmp_path / "archive") in text and CHECKPOINT_KEY in text
    assert "not valid JSON" in text and "--resume-from-archive" in text


def test_a_checkpoint_of_another_version_is_refused(tmp_path: Path) -> None:
    """A checkpoint written by a later version (its fields may mean something else) is not
    read as this one's."""
    storage = LocalStorage(tmp_path / "archive")
    body = Checkpoint(stream_id="live", source_url="http://x", last_event_id="1-0").to_json()
    storage.put(CHECKPOINT_KEY, body.replace(b'"version": 1', b'"version": 2'))
    with pytest.raises(CheckpointError, match="unsupported checkpoint version 2"):
        CheckpointStore(storage).load()


def test_every_field_of_the_checkpoint_is_read_back_and_one_added_later_is_left_aside(
    tmp_path: Path,
) -> None:
    """A restart reads back all a checkpoint holds (one left out is a recovery sent again, a
    reconciliation forgotten, a gap verify no longer explains); a field a later version of the
    same format adds (a downgrade) is left aside, not taken for damage."""
    storage = LocalStorage(tmp_path / "archive")
    store = CheckpointStore(storage)
    gap = {"checkpoint": "5-0", "first_retained": "9-0", "detected_at": "2026-01-03T00:00:00Z"}
    cp = Checkpoint(
        stream_id="live",
        source_url="http://x",
        last_event_id="12-0",
        recover_until="2026-01-02T00:00:00Z",
        first_recover_until="2026-01-01T00:00:00Z",
        recover_refused=True,
        events_archived=7,
        segments_written=2,
        quarantined=1,
        last_segment="events/1970/01/01/00000000000012-0000000000.jsonl.zst",
        last_segment_last_id="12-0",
        acked_event_id="11-0",
        reconcile={**gap, "due": True},
        retention_gaps=[gap],
        retained_through="10-0",
    )
    store.save(cp)
    assert cp.saved_at  # status shows when the backup last moved
    blank = Checkpoint(stream_id="live", source_url="http://x")
    assert all(getattr(cp, f.name) != getattr(blank, f.name) for f in fields(cp)[2:])
    assert store.load() == cp

    body = orjson.loads(storage.get(CHECKPOINT_KEY))
    body["added_later"] = {"by": "a later version"}
    storage.put(CHECKPOINT_KEY, orjson.dumps(body))
    assert store.load() == cp


def _two_segments(storage: LocalStorage) -> str:
    """Segments at ``at(1)`` and ``at(2)`` in ``storage``: returns the second's key."""
    from connector.archive import ArchiveSink
    from connector.sink import Batch
    from tests.support.handfed import at, malware

    sink = ArchiveSink(storage)
    sink.write(Batch(first_id=at(1), last_id=at(1), events=[malware(at(1), 1)]))
    sink.write(Batch(first_id=at(2), last_id=at(2), events=[malware(at(2), 2)], after_id=at(1)))
    return sink.last.segments[0]


def test_lost_newest_segments_move_the_checkpoint_back_out_of_its_recovery(
    tmp_path: Path,
) -> None:
    """The checkpoint goes back to the archive's end, and reads the platform's log from there,
    not the recovery it was in: a recovery resumed inside its window re-sends, at or below
    that point (taken as stored), dependencies it had sent with later events, lost with the
    segments."""
    from connector.archive_position import check_archive_end
    from tests.support.handfed import at

    storage = LocalStorage(tmp_path / "a")
    second = _two_segments(storage)
    cp = Checkpoint(stream_id="live", source_url="http://x", last_event_id=str(at(2)))
    cp.last_segment, cp.last_segment_last_id, cp.acked_event_id = second, str(at(2)), str(at(2))
    cp.recover_until = "2027-01-15T08:00:00.000Z"
    storage.delete(manifest_key_for_segment(second))
    storage.delete(second)
    assert check_archive_end(storage, cp, "here") is True
    assert (cp.last_event_id, cp.last_segment_last_id, cp.acked_event_id) == (str(at(1)),) * 3
    assert cp.recover_until is None
    # It names a segment the archive holds (verify checks it; the next one is chained after).
    assert cp.last_segment != second
    assert cp.last_segment and storage.exists(manifest_key_for_segment(cp.last_segment))


def test_a_lost_checkpoint_is_resumed_at_the_archives_end_a_newer_snapshot_too(
    tmp_path: Path,
) -> None:
    """The checkpoint made for an archive whose newest segment is gone but a snapshot holds its
    end starts after the snapshot, for the stream and the targets alike (the segment's end is
    older: all after it read and sent again), and chains the next segment after it."""
    from connector.archive_position import adopt_archive
    from tests.support.handfed import at

    storage = LocalStorage(tmp_path / "a")
    second = _two_segments(storage)
    assert run_snapshot_job(storage, tmp_path / "snap") is not None
    storage.delete(manifest_key_for_segment(second))
    storage.delete(second)
    cp = adopt_archive(storage, "here", stream_id="live", source_url="http://x", adopt=True)
    assert cp is not None
    assert (cp.last_event_id, cp.last_segment_last_id, cp.acked_event_id) == (str(at(2)),) * 3
    assert cp.last_segment is None


def test_a_snapshot_at_the_point_asked_for_is_the_archive_end_there(tmp_path: Path) -> None:
    """``archive_end(until)`` counts a snapshot taken at ``until`` itself: its segments pruned,
    a restore at that point was otherwise told the archive lost its newest segments."""
    from connector.archive_position import archive_end
    from tests.support.handfed import at

    storage = LocalStorage(tmp_path / "a")
    _two_segments(storage)
    assert run_snapshot_job(storage, tmp_path / "snap") is not None
    _delete_every_segment(storage)
    assert archive_end(storage, at(2)) == at(2)
    assert archive_end(storage, at(1)) is None


def test_segments_pruned_under_a_snapshot_covering_the_end_are_not_lost(tmp_path: Path) -> None:
    """Retention deletes every segment at or before its base snapshot, the newest one too on a
    quiet platform: the snapshot holds the archive's end, nothing is missing, and run goes on."""
    with _backed_up(tmp_path, 100, 11, ARCHIVE_MAX_EVENTS="40") as (sim, env, storage):
        assert run_snapshot_job(storage, tmp_path / "snap") is not None
        _delete_every_segment(storage)  # what retention does with that snapshot as its base
        generate(sim.store, 20, seed=12)
        _backup(env, storage, sim.store.last_event_id)
        _assert_archive_is_the_platform(storage, sim, tmp_path)


def test_a_lost_checkpoint_over_an_archive_pruned_to_its_snapshot_is_refused_then_resumed(
    tmp_path: Path,
) -> None:
    """Retention on a quiet platform deletes every segment, the snapshot holding the archive's
    end; the checkpoint is then lost. The history is in the snapshot: a first run from scratch
    was started all the same, and never recorded what the platform deleted meanwhile (a restore
    brought it back). Refused like an archive holding segments; resumed after the snapshot."""
    with _backed_up(tmp_path, 100, 11, ARCHIVE_MAX_EVENTS="40") as (sim, env, storage):
        assert run_snapshot_job(storage, tmp_path / "snap") is not None
        _delete_every_segment(storage)  # what retention does with that snapshot as its base
        (tmp_path / "archive" / CHECKPOINT_KEY).unlink()
        gone = _delete_some(sim, 3)  # while the connector is down
        generate(sim.store, 10, seed=13)

        refused = _refusal(env)
        assert refused.key == "checkpoint.uri" and "--resume-from-archive" in str(refused)
        assert CheckpointStore(storage).load() is None

        _backup(env, storage, sim.store.last_event_id, resume_from_archive=True)
        _assert_archive_is_the_platform(storage, sim, tmp_path, gone)
