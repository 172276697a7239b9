"""A crash between a segment write and the checkpoint, then a restart that re-delivers the same
groups cut otherwise (or, in recovery, with other ids): no group is stored twice, the manifests
chain, ``verify`` is clean.

Real parts only: the simulator over HTTP, the real ``SseSource`` and ``Pipeline``, a local
archive. The crash is a storage that dies at the first checkpoint save after a segment exists:
from then on nothing reaches it, as when the process is killed there.
"""

from __future__ import annotations

import datetime as dt
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.archive import ArchiveReader, ArchiveSink
from connector.archive.layout import EVENTS_PREFIX, manifest_key_for_segment
from connector.archive_position import check_archive_end
from connector.checkpoint import CHECKPOINT_KEY, Checkpoint, CheckpointStore
from connector.errors import PermanentError, RetryableError
from connector.events import OCTI_EXT, EventId
from connector.pipeline import BatchPolicy, Pipeline
from connector.restore import materialise
from connector.sim.server import SimServer
from connector.sim.store import SimStore, parse_date_ms
from connector.sink import Batch
from connector.source import SourceConfig, SseSource
from connector.storage.local import LocalStorage
from connector.verify import format_report, verify_archive
from tests.support.connector import checkpoint_id, start_pipeline, wait_until
from tests.test_pipeline_shutdown import FullFor, first_write_under

TOKEN = "sink-redelivery-token"


class DiesAtCheckpoint(LocalStorage):
    """Dies at the first checkpoint save made once ``segments`` segments exist: nothing after it
    lands."""

    def __init__(self, root: Path, segments: int = 1) -> None:
        super().__init__(root)
        self.segments = segments
        self.dead = threading.Event()

    def _die(self) -> None:
        self.dead.set()
        raise PermanentError("simulated crash before the checkpoint")

    def put(self, key: str, body: bytes) -> None:
        if self.dead.is_set() or (
            key == CHECKPOINT_KEY and len(list(self.list(EVENTS_PREFIX))) >= self.segments
        ):
            self._die()
        super().put(key, body)

    def put_if_absent(self, key: str, body: bytes) -> bool:
        if self.dead.is_set():
            self._die()
        return super().put_if_absent(key, body)


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = SimServer(token=TOKEN, heartbeat_secs=0.2).start()
    yield server
    server.stop()


RECOVERY_PAGE_SIZE = 500  # the platform's default (a test may set its own)


def at_least(storage: LocalStorage, event_id: str) -> Callable[[], bool]:
    def done() -> bool:
        position = checkpoint_id(storage)
        return position is not None and position >= EventId.parse(event_id)

    return done


def malware(store: SimStore, n: int) -> str:
    """A create with no dependencies: one event, one group, its own millisecond."""
    time.sleep(0.003)
    event_id = store.create(
        {
            "type": "malware",
            "id": f"malware--{n:08d}-7e1d-4000-8000-000000000000",
            "spec_version": "2.1",
            "name": f"malware {n}",
            "is_family": False,
        }
    )
    assert event_id is not None
    time.sleep(0.003)
    return event_id


def recovery_ms(store: SimStore, n: int) -> int:
    obj = store.get(f"malware--{n:08d}-7e1d-4000-8000-000000000000")
    assert obj is not None
    ms = parse_date_ms(str(obj["extensions"][OCTI_EXT]["updated_at"]))
    assert ms is not None
    return ms


def run_pipeline(
    storage: LocalStorage,
    sim: SimServer,
    *,
    max_events: int,
    until: Callable[[], bool],
    what: str,
) -> list[BaseException]:
    """One connector run (source → pipeline → archive) from the stored checkpoint until
    ``until()`` holds or the run dies; then SIGTERM-like stop. Returns what the run raised."""
    store = CheckpointStore(storage)
    cp = store.load()
    assert cp is not None
    source = SseSource(
        SourceConfig(
            url=sim.url,
            token=TOKEN,
            stream_id="live",
            backoff_initial=0.05,
            backoff_max=0.3,
            recovery_page_size=RECOVERY_PAGE_SIZE,
        ),
        resume=EventId.parse(cp.last_event_id) if cp.last_event_id else None,
        recover_until=cp.recover_until,
    )
    stop = threading.Event()
    pipeline = Pipeline(
        source=source,
        sinks=[ArchiveSink(storage)],
        store=store,
        checkpoint=cp,
        policy=BatchPolicy(max_events=max_events, max_age_secs=0.3),
        stop=stop,
        backoff_initial=0.05,
        backoff_max=0.3,
        shutdown_timeout=5,
    )
    thread, errors = start_pipeline(pipeline)
    wait_until(lambda: bool(errors) or not thread.is_alive() or until(), timeout=30, what=what)
    stop.set()
    thread.join(15)
    assert not thread.is_alive()
    return errors


def crash_after_first_segment(tmp_path: Path, sim: SimServer, groups: int) -> LocalStorage:
    """Run 1: the first batch (``groups`` events) reaches the archive, then the process dies."""
    dying = DiesAtCheckpoint(tmp_path / "archive")
    errors = run_pipeline(dying, sim, max_events=groups, until=dying.dead.is_set, what="the crash")
    assert errors and "simulated crash" in str(errors[0])
    return LocalStorage(tmp_path / "archive")


def manifests(storage: LocalStorage) -> list[tuple[str, str, str | None]]:
    return [
        (r.manifest.first_event_id, r.manifest.last_event_id, r.manifest.after_event_id)
        for r in ArchiveReader(storage).manifests()
    ]


def assert_each_group_once(storage: LocalStorage, tmp_path: Path) -> list[str]:
    """Every stored event once, segments chained, verify clean; the stored ids in order."""
    stored: list[str] = []
    for ref in ArchiveReader(storage).manifests(rows=True):
        stored += [row[0] for row in ref.manifest.objects]
    assert len(stored) == len(set(stored)), f"stored twice: {manifests(storage)}"
    assert stored == sorted(stored, key=EventId.parse)
    chain = manifests(storage)
    for (_, prev_last, _), (_, _, after) in zip(chain, chain[1:], strict=False):
        assert after == prev_last, chain
    # No segment without its manifest.
    for key in storage.list(EVENTS_PREFIX):
        assert storage.exists(manifest_key_for_segment(key)), key
    report = verify_archive(storage, work_dir=tmp_path / "verify")
    assert report.ok, format_report(report)
    return stored


def test_redelivered_batch_ending_inside_the_stored_segment(sim: SimServer, tmp_path: Path) -> None:
    """Stored: one segment of groups 1..3. Re-delivered as [1, 2] then [3, 4, 5]: the first
    batch is covered, the second holds group 3 again, which must not be stored a second time."""
    store = CheckpointStore(LocalStorage(tmp_path / "archive"))
    store.save(Checkpoint(stream_id="live", source_url=sim.url))
    ids = [malware(sim.store, n) for n in range(3)]
    storage = crash_after_first_segment(tmp_path, sim, groups=3)
    assert manifests(storage) == [(ids[0], ids[2], None)]
    ids += [malware(sim.store, n) for n in range(3, 5)]
    # The restart reads 2 events, then (a stall) the rest: batches [1, 2] and [3, 4, 5].
    sim.set_fault(stall_after_events=2, stall_secs=0.8)
    errors = run_pipeline(
        storage,
        sim,
        max_events=2,
        until=at_least(storage, ids[-1]),
        what="the re-delivery",
    )
    assert not errors
    assert assert_each_group_once(storage, tmp_path) == ids
    assert manifests(storage)[0] == (ids[0], ids[2], None)
    cp = store.load()
    assert cp is not None and cp.last_segment_last_id == ids[-1]


def test_restart_after_a_covered_batch_continues_after_the_segment(
    sim: SimServer, tmp_path: Path
) -> None:
    """The re-delivered batch [1, 2] is covered by the stored segment 1..3 and checkpointed;
    the process stops before group 3 comes. The next run resumes after 2: the checkpoint must
    say that the archive ends at 3, or that run writes group 3 again, after 2."""
    store = CheckpointStore(LocalStorage(tmp_path / "archive"))
    store.save(Checkpoint(stream_id="live", source_url=sim.url))
    ids = [malware(sim.store, n) for n in range(3)]
    storage = crash_after_first_segment(tmp_path, sim, groups=3)
    ids += [malware(sim.store, n) for n in range(3, 5)]
    sim.set_fault(stall_after_events=2, stall_secs=10)
    errors = run_pipeline(
        storage,
        sim,
        max_events=2,
        until=at_least(storage, ids[1]),
        what="the covered batch",
    )
    assert not errors
    cp = store.load()
    assert cp is not None and cp.last_event_id == ids[1]
    assert cp.last_segment_last_id == ids[2]
    # The crashed run's segment is the archive's newest, and its events are counted.
    assert cp.last_segment == next(iter(storage.list(EVENTS_PREFIX)))
    assert (cp.segments_written, cp.events_archived) == (1, 3)
    sim.set_fault(stall_secs=None, stall_after_events=None)
    errors = run_pipeline(
        storage,
        sim,
        max_events=100,
        until=at_least(storage, ids[-1]),
        what="the rest",
    )
    assert not errors
    assert assert_each_group_once(storage, tmp_path) == ids


def test_losing_the_segment_a_crashed_run_stored_is_found_at_the_next_start(
    sim: SimServer, tmp_path: Path
) -> None:
    """Run 1 stores segment 4..6 and dies before its checkpoint; its restart re-delivers 4..6,
    which writes nothing. The checkpoint must still name that segment as the archive's newest:
    when it is lost later (the directory put back from an older copy), the start-up check must
    see it and read the stream again from the archive's end, not resume after 6."""
    storage = LocalStorage(tmp_path / "archive")
    store = CheckpointStore(storage)
    store.save(Checkpoint(stream_id="live", source_url=sim.url))
    ids = [malware(sim.store, n) for n in range(3)]
    errors = run_pipeline(
        storage, sim, max_events=3, until=at_least(storage, ids[2]), what="the first segment"
    )
    assert not errors
    ids += [malware(sim.store, n) for n in range(3, 6)]
    dying = DiesAtCheckpoint(tmp_path / "archive", segments=2)
    errors = run_pipeline(dying, sim, max_events=3, until=dying.dead.is_set, what="the crash")
    assert errors and "simulated crash" in str(errors[0])
    errors = run_pipeline(
        storage, sim, max_events=3, until=at_least(storage, ids[5]), what="the re-delivery"
    )
    assert not errors
    newest = sorted(storage.list(EVENTS_PREFIX))[-1]
    cp = store.load()
    assert cp is not None and cp.last_segment_last_id == ids[5]
    assert cp.last_segment == newest
    assert (cp.segments_written, cp.events_archived) == (2, 6)
    storage.delete(newest)
    storage.delete(manifest_key_for_segment(newest))
    assert check_archive_end(storage, cp, "here") is True
    assert cp.last_event_id == cp.last_segment_last_id == ids[2]


def test_recovery_redelivery_with_other_ids(
    sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run 1 recovers A B C D and dies after the segment A..C. Before run 2, A is deleted: its
    recovery re-sends B C D (A's delete comes live, later). No key collides with the segment
    A..C; B and C must still not be stored again."""
    # The simulator sends its recovery sorted, as pages of one object would be: the connector
    # may then take positions inside it (with the platform's pages of 500, not before 500).
    monkeypatch.setattr(sys.modules[__name__], "RECOVERY_PAGE_SIZE", 1)
    for n in range(4):
        malware(sim.store, n)
    # Recovery ids are the objects' updated_at, "<ms>-0" (not their create events' ids).
    ids = [f"{recovery_ms(sim.store, n)}-0" for n in range(4)]
    recover_ms = max(EventId.parse(sim.store.last_event_id or "0-0").ms, recovery_ms(sim.store, 3))
    time.sleep(0.005)
    recover_until = dt.datetime.fromtimestamp(recover_ms / 1000, dt.UTC).isoformat(
        timespec="milliseconds"
    )
    store = CheckpointStore(LocalStorage(tmp_path / "archive"))
    store.save(Checkpoint(stream_id="live", source_url=sim.url, recover_until=recover_until))
    storage = crash_after_first_segment(tmp_path, sim, groups=3)
    [(first, last, _)] = manifests(storage)
    assert (first, last) == (ids[0], ids[2])
    deleted = sim.store.delete("malware--00000000-7e1d-4000-8000-000000000000")
    assert deleted is not None
    errors = run_pipeline(
        storage,
        sim,
        max_events=100,
        until=at_least(storage, deleted),
        what="the recovery re-delivery",
    )
    assert not errors
    assert assert_each_group_once(storage, tmp_path) == [*ids, deleted]
    with materialise(storage, until=None, work_dir=tmp_path / "state") as state:
        names: list[Any] = sorted(obj["name"] for _, _, _, obj in state.objects())
    assert names == ["malware 1", "malware 2", "malware 3"]


def test_segment_left_without_manifest_is_found_by_the_first_write(tmp_path: Path) -> None:
    """The crash came between the segment and its manifest, and the re-delivery starts at
    another group (no key collision): the first write still finds the segment, gives it its
    manifest (chained after the checkpoint's position) and continues after it."""
    from connector.archive.layout import manifest_key
    from connector.sim.generator import generate
    from connector.sink import Batch
    from tests.support.simlog import sim_events

    sim_store = SimStore()
    generate(sim_store, 30, seed=7, mix="creates")
    events, _ = sim_events(sim_store)
    storage = LocalStorage(tmp_path / "a")
    first, second = events[:10], events[10:20]
    ArchiveSink(storage).write(Batch(first_id=first[0].id, last_id=first[-1].id, events=first))
    ArchiveSink(storage).write(
        Batch(
            first_id=second[0].id,
            last_id=second[-1].id,
            events=second,
            after_id=first[-1].id,
        )
    )
    lost = storage.get(manifest_key(second[0].id))
    storage.delete(manifest_key(second[0].id))
    # The restart re-delivers from the middle of the second segment onwards.
    rest = events[15:]
    # Restarted with another compression level: the rebuilt manifest still describes the bytes
    # stored (their sha256), not this run's encoding of them.
    sink = ArchiveSink(storage, level=19)
    sink.write(Batch(first_id=rest[0].id, last_id=rest[-1].id, events=rest, after_id=first[-1].id))
    assert sink.last.skipped == 5 and sink.last.events == 10
    assert storage.get(manifest_key(second[0].id)) == lost  # rebuilt as it was written
    assert sink.tail == events[-1].id
    stored = assert_each_group_once(storage, tmp_path)
    assert stored == [e.id_text for e in events]


def test_a_write_reports_the_segment_holding_the_end_and_what_it_found_once(
    tmp_path: Path,
) -> None:
    """What the checkpoint takes from each write: the segment that holds the archive's end
    (found by the first read of the archive, or met at the write's own key), even when the
    write stores nothing; and the segments an earlier run stored, counted once."""
    from connector.sim.generator import generate
    from connector.sink import Batch
    from tests.support.simlog import sim_events

    sim_store = SimStore()
    generate(sim_store, 30, seed=4, mix="creates")
    events, _ = sim_events(sim_store)
    storage = LocalStorage(tmp_path / "a")

    def batch(part: list[Any], after: Any) -> Batch:
        return Batch(first_id=part[0].id, last_id=part[-1].id, events=part, after_id=after)

    first, second, third = events[:10], events[10:20], events[20:]
    ArchiveSink(storage).write(batch(first, None))
    ahead = ArchiveSink(storage)
    assert ahead.end(first[-1].id) == first[-1].id  # its read of the archive: nothing past it
    ArchiveSink(storage).write(batch(second, first[-1].id))  # a crashed run's segment
    stored = sorted(storage.list(EVENTS_PREFIX))[-1]

    # Met at its own key with other bytes (a re-delivery cut otherwise): covered, nothing new.
    ahead.write(batch(second[:5], first[-1].id))
    assert (ahead.last.segments, ahead.last.tail_segment) == ([], stored)

    # A restart: its first read finds that segment, counts it once, and goes on after it.
    sink = ArchiveSink(storage)
    sink.write(batch(second[:5], first[-1].id))
    got = sink.last
    assert (got.events, got.tail_segment) == (0, stored)
    assert (got.adopted_segments, got.adopted_events) == (1, 10)
    sink.write(batch(third, second[4].id))
    got = sink.last
    assert (got.events, got.adopted_segments, got.adopted_events) == (10, 0, 0)
    assert got.tail_segment == got.segments[-1] != stored


def test_an_object_under_events_that_is_not_a_segment_is_left_alone(tmp_path: Path) -> None:
    """A copy someone left beside the segments, named like one but not by an event id: each
    start's first write read it as a segment and died on its name, a crash loop, while verify
    reported the archive OK with a warning."""
    from connector.sim.generator import generate
    from connector.sink import Batch
    from tests.support.simlog import sim_events

    sim_store = SimStore()
    generate(sim_store, 20, seed=3, mix="creates")
    events, _ = sim_events(sim_store)
    storage = LocalStorage(tmp_path / "a")
    first, second = events[:10], events[10:]
    ArchiveSink(storage).write(Batch(first_id=first[0].id, last_id=first[-1].id, events=first))
    stray = f"events/2099/01/01/copy-of-{first[0].id.key}.jsonl.zst"
    storage.put(stray, b"not ours")
    sink = ArchiveSink(storage)
    sink.write(
        Batch(first_id=second[0].id, last_id=second[-1].id, events=second, after_id=first[-1].id)
    )
    assert sink.last.events == 10 and sink.tail == events[-1].id
    assert storage.get(stray) == b"not ours"
    stored = [
        row[0]
        for ref in ArchiveReader(storage).manifests(rows=True)
        for row in ref.manifest.objects
    ]
    assert stored == [e.id_text for e in events]


class WritesOnce(LocalStorage):
    """Refuses a second write to the same key: a sink that would write it for ever."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.written: set[str] = set()

    def put_if_absent(self, key: str, body: Any) -> bool:
        assert key not in self.written, f"{key} written again"
        self.written.add(key)
        return super().put_if_absent(key, body)


def test_a_manifest_ending_before_its_own_segment_is_refused(tmp_path: Path) -> None:
    """A damaged manifest at a write's key says its segment ends before the group it is named
    by: the write stops on it (an operator's matter), rather than meet the same key again and
    again."""
    from connector.archive.layout import manifest_key
    from connector.sink import Batch
    from tests.support.handfed import at
    from tests.support.handfed import malware as event

    storage = WritesOnce(tmp_path / "a")
    batch = Batch(first_id=at(2), last_id=at(2), events=[event(at(2), 2)], after_id=at(1))
    ArchiveSink(storage).write(batch)
    mkey = manifest_key(at(2))
    storage.put(mkey, storage.get(mkey).replace(str(at(2)).encode(), str(at(1, 5)).encode()))
    storage.written.clear()
    with pytest.raises(PermanentError, match="ends before its first group"):
        ArchiveSink(storage).write(batch)


def test_quarantine_records_are_counted_once_across_retries_and_deliveries(
    tmp_path: Path,
) -> None:
    """The archive counts the records it stores, which the quarantine counter and the
    checkpoint's count follow: a batch retried after its quarantine record was stored still
    counts it; the same event quarantined twice in a batch, or delivered again later, does not
    count again."""
    from connector.events import Quarantined, StreamEvent
    from connector.sink import Batch

    # The segment write fails once, after the batch's quarantine records were stored.
    storage = FullFor(tmp_path / "a", first_write_under(EVENTS_PREFIX))
    sink = ArchiveSink(storage)
    bad = Quarantined(EventId(1, 0), "2-0", "create", "{not json", "not valid JSON")
    good = StreamEvent.from_sse(
        "3-0", "create", b'{"data":{"id":"malware--1","type":"malware","name":"m"}}'
    )
    batch = Batch(
        first_id=good.id, last_id=good.id, events=[good], quarantined=[bad, bad], after_id=None
    )
    with pytest.raises(RetryableError):
        sink.write(batch)
    sink.write(batch)  # the retry
    assert sink.last.quarantined == 1
    sink.write(Batch(first_id=good.id, last_id=good.id, quarantined=[bad]))  # delivered again
    assert sink.last.quarantined == 0
    assert len(list(storage.list("quarantine/"))) == 1


def test_a_partial_group_cut_by_a_disconnect_is_stored_once(tmp_path: Path) -> None:
    """The connection ends inside a dependency group: the events of it already received are
    dropped, since the platform sends the whole group again after the complete position. Kept,
    the group's first dependency was stored twice."""
    from connector.source import Complete, Disconnected
    from tests.support.handfed import at, hand_fed, malware, saved_position

    storage = LocalStorage(tmp_path / "a")
    pipe = hand_fed(storage)
    pipe._handle(malware(at(1), 1))
    pipe._handle(Complete(at(1)))
    pipe._handle(malware(at(2), 2))  # a dependency of the group at(2); then the cut
    pipe._handle(Disconnected(at(1), "connection lost: test"))
    for n in (2, 3):  # the whole group again: its dependency, then its trigger
        pipe._handle(malware(at(2), n))
    pipe._handle(Complete(at(2)))
    pipe._flush()
    assert [ev.stix_id[-2:] for ev in ArchiveReader(storage).events()] == ["01", "02", "03"]
    assert saved_position(storage) == str(at(2))


def test_the_acknowledged_position_follows_every_batch(tmp_path: Path) -> None:
    """``acked_event_id`` is the last group of the last batch every sink acknowledged: a
    retention gap's reconciliation compares the platform with the state there. Left at the
    first batch, it compared with an older state than the target held."""
    from connector.source import Complete
    from tests.support.handfed import at, hand_fed, malware

    storage = LocalStorage(tmp_path / "a")
    pipe = hand_fed(storage)
    for n in (1, 2):
        pipe._handle(malware(at(n), n))
        pipe._handle(Complete(at(n)))
        pipe._flush()
        assert pipe.checkpoint.acked_event_id == str(at(n))
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.acked_event_id == str(at(2))


class _Killed(Exception):
    """The process dies here (nothing after the failing call happens)."""


class _DiesOnSegments(LocalStorage):
    """A local archive on which the process dies at the next segment write, while ``dying``."""

    dying = True

    def put_if_absent(self, key: str, body: bytes) -> bool:
        if self.dying and key.startswith(EVENTS_PREFIX):
            raise _Killed(key)
        return super().put_if_absent(key, body)


def test_a_kill_at_a_segment_write_leaves_no_manifest_for_it(tmp_path: Path) -> None:
    """The segment is stored before its manifest: a run killed at the segment leaves nothing,
    and the next run, whose batches are cut otherwise, chains its own segments. A manifest
    stored first would describe a segment never written, and stay (put-if-absent) over the
    segment the next run stores at that key: a damaged archive."""
    from tests.support.handfed import at, malware

    storage = _DiesOnSegments(tmp_path / "a")
    with pytest.raises(_Killed):
        ArchiveSink(storage).write(
            Batch(first_id=at(1), last_id=at(2), events=[malware(at(1), 1), malware(at(2), 2)])
        )
    storage.dying = False
    sink = ArchiveSink(storage)  # the next run: one group a batch
    sink.write(Batch(first_id=at(1), last_id=at(1), events=[malware(at(1), 1)]))
    sink.write(Batch(first_id=at(2), last_id=at(2), events=[malware(at(2), 2)], after_id=at(1)))
    report = verify_archive(storage, work_dir=tmp_path / "verify")
    assert report.ok, format_report(report)
    assert [ev.id for ev in ArchiveReader(storage).events()] == [at(1), at(2)]


def test_the_checkpoint_goes_on_to_the_position_that_completed_the_batch(tmp_path: Path) -> None:
    """The batch's last group was found complete at a later position (a heartbeat): everything
    up to it is durable with the batch, so the checkpoint goes there, while the archive's chain
    and the acknowledged position stay at the batch's last group. Left at that group, a restart
    read the stream again from there."""
    from connector.source import Complete
    from tests.support.handfed import at, hand_fed, malware, saved_position

    storage = LocalStorage(tmp_path / "a")
    pipe = hand_fed(storage)
    pipe._handle(malware(at(1), 1))
    pipe._handle(malware(at(2), 2))
    pipe._handle(Complete(at(9)))
    pipe._flush()
    assert saved_position(storage) == str(at(9))
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.last_segment_last_id == cp.acked_event_id == str(at(2))


def test_a_fatal_error_read_while_draining_does_not_cost_the_groups_before_it(
    tmp_path: Path,
) -> None:
    """At a stop, what the reader queued is still handled; a fatal error among it (the stream
    refused as it was closing) is left to the run, and the complete groups before it are
    written and checkpointed all the same."""
    from connector.source import Complete, Fatal
    from tests.support.handfed import at, hand_fed, malware, saved_position

    storage = LocalStorage(tmp_path / "a")
    pipe = hand_fed(storage)
    refused = Fatal(PermanentError("the stream was refused"))
    pipe.source.queue.put([malware(at(1), 1), Complete(at(1)), refused])
    pipe._drain()
    assert [ev.stix_id[-2:] for ev in ArchiveReader(storage).events()] == ["01"]
    assert saved_position(storage) == str(at(1))
