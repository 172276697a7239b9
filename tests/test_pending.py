"""A dependency group too large for memory waits on disk, and is archived whole all the same.

After a reconnect the platform's cache is empty, and a live change to a popular entity brings
every relationship it has, with their references, as dependencies under the change's own id.
The pipeline holds a group until it is whole; past ``CONNECTOR_SPILL_BYTES`` the rest of it goes
to a scratch file. Real parts: the simulator's dependency expansion over HTTP, the connector's
own ``run``, a local archive read back and folded.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from connector.archive import ArchiveReader
from connector.events import EventId, StreamEvent
from connector.pending import PendingEvents
from connector.restore import materialise
from connector.sim.generator import popular_entity
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.storage.local import LocalStorage
from connector.verify import verify_archive
from tests.support.connector import ConnectorThread, base_env, caught_up, wait_until
from tests.test_state import assert_equal_objects, sim_objects, state_objects

TOKEN = "pending-token-0123456789"
ROOT = Path(__file__).resolve().parents[1]


def _event(ms: int, seq: int, size: int, group: EventId | None = None) -> StreamEvent:
    text = f"{ms}-{seq}"
    body = (
        b'{"data":{"id":"indicator--%s","type":"indicator","spec_version":"2.1","name":"%s"},'
        b'"message":"m","origin":{"referer":"init-dependencies"},"version":"4"}'
        % (str(uuid.uuid4()).encode(), b"x" * size)
    )
    ev = StreamEvent(EventId(ms, seq), text, "create", body)
    ev.group = group or ev.id
    return ev


def _same(got: list[StreamEvent], want: list[StreamEvent]) -> None:
    assert [(e.id_text, e.event, e.data, e.group) for e in got] == [
        (e.id_text, e.event, e.data, e.group) for e in want
    ]


def test_pending_events_spill_past_the_limit_and_read_back_as_received(tmp_path: Path) -> None:
    pending = PendingEvents(tmp_path, spill_bytes=10_000)
    small = [_event(1, i, 500) for i in range(8)]  # about 5 KB: held in memory
    group = EventId(2, 0)
    big = [_event(2, 0, 900, group) for _ in range(40)]  # one group of 40 KB
    for ev in small + big:
        pending.append(ev)
    everything = small + big
    assert len(pending) == 48 and 0 < pending.spilled < 40
    assert pending.bytes == sum(len(e.data) for e in everything)
    assert list(tmp_path.iterdir()) == []  # the scratch file is unlinked: nothing to clean up

    head = pending.head(48)
    _same(list(head), everything)
    _same(list(head[10:20]), everything[10:20])
    _same(list(head[30:]), everything[30:])
    assert head[-1].data == everything[-1].data and head[3].data == everything[3].data
    assert pending.head_bytes(20) == sum(len(e.data) for e in everything[:20])

    # A disconnect drops the partial group: kept, the first 30 (some in memory, some on disk).
    pending.drop_tail(30)
    assert len(pending) == 30 and pending.bytes == sum(len(e.data) for e in everything[:30])
    _same(list(pending.head(30)), everything[:30])
    pending.append(big[0])  # appended after the truncation, read back in its place
    _same(list(pending.head(31)), [*everything[:30], big[0]])

    # A flush takes the first 25: what is left reads back in order.
    pending.drop_head(25)
    _same(list(pending.head(len(pending))), [*everything[25:30], big[0]])
    pending.drop_head(len(pending))
    assert len(pending) == 0 and pending.bytes == 0 and pending.spilled == 0
    pending.append(small[0])  # memory again once the spill is gone
    assert pending.spilled == 0
    pending.close()


def test_a_work_dir_that_cannot_take_the_spill_keeps_the_group_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopping instead would meet the same group at every restart: a crash loop."""
    blocked = tmp_path / "work"
    blocked.write_text("a file where the work dir should be")
    pending = PendingEvents(blocked, spill_bytes=10_000)
    events = [_event(3, 0, 900, EventId(3, 0)) for _ in range(30)]
    for ev in events:
        pending.append(ev)
    assert pending.spilled == 0 and len(pending) == 30
    _same(list(pending.head(30)), events)
    assert any("holding it in memory" in r.getMessage() for r in caplog.records)
    # Once the group is written, the next one that outgrows memory tries the disk again (room
    # made meanwhile): memory is not left without a limit for the rest of the run.
    blocked.unlink()
    pending.drop_head(30)
    for _ in range(30):
        pending.append(_event(4, 0, 900, EventId(4, 0)))
    assert pending.spilled > 0 and len(pending) == 30
    pending.close()


def _key(ev: StreamEvent) -> tuple[str, str, bytes, EventId]:
    return (ev.id_text, ev.event, ev.data, ev.group)


@pytest.mark.parametrize("seed", range(100))
def test_pending_events_behave_as_a_list_whatever_the_spill_does(tmp_path: Path, seed: int) -> None:
    """Random appends, batches, flushes and dropped partial groups against a plain list: the
    spill starts, is partly and wholly taken, cut, read back into memory and starts again."""
    rnd = random.Random(seed)
    pending = PendingEvents(tmp_path, spill_bytes=rnd.choice([1, 500, 3000, 10_000]))
    model: list[StreamEvent] = []
    ms = 1
    for _ in range(300):
        op = rnd.random()
        if op < 0.55:
            ms += 1
            ev = _event(ms, rnd.randrange(3), rnd.randrange(800), EventId(ms // 3, 0))
            pending.append(ev)
            model.append(ev)
        elif op < 0.70:
            n = rnd.randrange(len(model) + 1)
            pending.drop_head(n)
            del model[:n]
        elif op < 0.80:
            n = rnd.randrange(len(model) + 1)
            pending.drop_tail(n)
            del model[n:]
        else:
            n = rnd.randrange(len(model) + 1)
            head, want = pending.head(n), model[:n]
            assert [_key(e) for e in head] == [_key(e) for e in want]
            assert [_key(e) for e in head] == [_key(e) for e in want]  # read twice
            assert pending.head_bytes(n) == sum(len(e.data) for e in want)
            for _ in range(5):
                if n:
                    i = rnd.randrange(-n, n)
                    assert _key(head[i]) == _key(want[i])
                a, b = rnd.randrange(-n - 2, n + 3), rnd.randrange(-n - 2, n + 3)
                assert [_key(e) for e in head[a:b]] == [_key(e) for e in want[a:b]]
            with pytest.raises(IndexError):
                head[n]
            with pytest.raises(IndexError):
                head[-n - 1]
        assert len(pending) == len(model)
        assert pending.bytes == sum(len(e.data) for e in model)
    pending.close()


def test_the_spill_ends_once_what_is_pending_fits_in_memory_again(tmp_path: Path) -> None:
    """In a recovery the newest group stays pending until the next id arrives: a spill kept
    until nothing is pending would take every later event through the disk, for ever."""
    pending = PendingEvents(tmp_path, spill_bytes=65536)
    for _ in range(100):
        pending.append(_event(1, 0, 1000, EventId(1, 0)))  # a big group
    assert pending.spilled > 0
    for ms in range(2, 2002):
        complete = len(pending)
        pending.append(_event(ms, 0, 1000))
        if ms % 50 == 0:
            pending.drop_head(complete)  # a batch: all but the newest group
    assert pending.spilled == 0 and len(pending) <= 50


def _spill_files(work: Path) -> list[int]:
    """Sizes of the files in ``work`` this process holds open: the spill files (unlinked, only
    their descriptors keep them and the disk space they take)."""
    sizes = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the descriptor listdir itself used
        if target.startswith(f"{work}/"):
            sizes.append(os.stat(f"/proc/self/fd/{fd}").st_size)
    return sizes


def test_the_spill_file_gives_back_what_is_dropped_and_goes_when_the_spill_ends(
    tmp_path: Path,
) -> None:
    """A spill file is the disk a huge group takes: a dropped partial group (a disconnect) gives
    its part back, and the file goes once the spill ends (read back into memory, dropped
    whole, or the pending events closed at the end of the run)."""
    work = tmp_path / "work"
    pending = PendingEvents(work, spill_bytes=10_000)
    for _ in range(60):
        pending.append(_event(2, 0, 900, EventId(2, 0)))
    held = len(pending) - pending.spilled
    (size,) = _spill_files(work)
    pending.drop_tail(held + 5)  # the platform sends the partial group again
    (cut,) = _spill_files(work)
    assert pending.spilled == 5 and cut * 5 < size
    batch = pending.head(held + 1)  # its last event read back from disk
    assert len(batch) == held + 1 and len(list(batch)) == held + 1
    pending.drop_head(held + 1)  # written; the rest fits in memory again: read back
    # Closed now, not once the batch made of it is let go (the flush still holds it).
    assert pending.spilled == 0 and len(pending) == 4 and _spill_files(work) == []
    for _ in range(60):
        pending.append(_event(3, 0, 900, EventId(3, 0)))
    assert pending.spilled > 0 and len(_spill_files(work)) == 1
    pending.drop_tail(len(pending) - pending.spilled)  # the spilled part dropped whole
    assert pending.spilled == 0 and _spill_files(work) == []
    for _ in range(60):
        pending.append(_event(4, 0, 900, EventId(4, 0)))
    assert len(_spill_files(work)) == 1
    pending.close()
    assert _spill_files(work) == []


_FULL_DISK = """
import resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from connector.events import EventId
from connector.pending import PendingEvents
from tests.test_pending import _event
pending = PendingEvents(Path(sys.argv[1]), spill_bytes=65536)
events = [_event(5, 0, 1000, EventId(5, 0)) for _ in range(300)]
for ev in events:
    pending.append(ev)
assert len(pending) == 300 and pending.spilled == 0, (len(pending), pending.spilled)
assert [e.data for e in pending.head(300)] == [e.data for e in events]
print("held in memory")
"""


def test_a_work_dir_filling_up_during_the_spill_keeps_the_group_in_memory(tmp_path: Path) -> None:
    """The kernel refuses the spill file's growth (RLIMIT_FSIZE, as a full disk): the events
    written before read back, the rest stays in memory, nothing stops."""
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        # No bytecode cache written under the size limit: it would be cut short.
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held in memory" in done.stdout
    assert "Cannot hold a large dependency group on disk" in done.stderr


def test_a_dependency_group_larger_than_memory_allows_is_archived_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connector")
    storage = LocalStorage(tmp_path / "archive")
    store = SimStore()
    malware = popular_entity(store, 600)
    assert store.object_count == 1 + 2 * 600  # every object loaded
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        env = base_env(
            sim.url,
            TOKEN,
            str(tmp_path / "archive"),
            CONNECTOR_SPILL_BYTES="65536",
            OPENCTI_SYNC_WORK_DIR=str(tmp_path / "work"),
        )
        run = ConnectorThread(env).start()
        wait_until(lambda: caught_up(storage, sim.store.last_event_id or "0-0"), what="recovery")
        # A change past the recovery's end date: the next connection has no recovery to do.
        sim.store.update(malware, set={"name": "Popular (renamed)"})
        wait_until(lambda: caught_up(storage, sim.store.last_event_id or "0-0"), what="a change")
        run.stop()
        assert run.error is None

        # A new connection: the platform's cache is empty, so the change brings every
        # relationship of the malware and every indicator with it, under its own id.
        before = len(caplog.records)
        run = ConnectorThread(env).start()
        change = sim.store.update(malware, set={"description": "Seen again."})
        assert change is not None
        wait_until(lambda: caught_up(storage, sim.store.last_event_id or "0-0"), what="the change")
        run.stop()
        assert run.error is None and run.rc == 0

    spilled = [r for r in caplog.records[before:] if "outgrew memory" in r.getMessage()]
    assert spilled, "the group never left memory: the test did not test the spill"
    spooled = [r for r in caplog.records[before:] if "built in scratch files" in r.getMessage()]
    assert spooled, "the segment never left memory: the test did not test the segment's spool"
    group = [e for e in ArchiveReader(storage).events() if e.id_text == change]
    # The update after the malware, every relationship and every indicator (each sent once).
    assert len(group) == 1 + 1 + 2 * 600
    assert group[-1].event == "update" and group[-1].stix_id == malware
    assert list((tmp_path / "work").iterdir()) == []  # nothing left behind
    report = verify_archive(storage, work_dir=tmp_path / "verify")
    assert report.ok, report
    state = materialise(storage, until=None, work_dir=tmp_path / "plan")
    try:
        assert_equal_objects(state_objects(state), sim_objects(store))
    finally:
        state.close()


def test_a_group_left_pending_by_a_flush_still_goes_out_by_age(tmp_path: Path) -> None:
    """A batch goes out while the next group is still arriving: that group's age counts from
    the flush, so a quiet stream writes it at ``max_age_secs`` once a heartbeat completes it.
    Without an age, it waited for more events, or for the stop."""
    from connector.pipeline import BatchPolicy
    from connector.source import Complete
    from tests.support.handfed import at, hand_fed, malware, saved_position

    storage = LocalStorage(tmp_path / "a")
    pipe = hand_fed(storage, policy=BatchPolicy(max_age_secs=0.0))
    pipe._handle(malware(at(1), 1))
    pipe._handle(Complete(at(1)))
    pipe._handle(malware(at(2), 2))  # a dependency of the next group: not complete yet
    pipe._maybe_flush()
    assert saved_position(storage) == str(at(1)) and len(pipe._pending) == 1
    pipe._handle(Complete(at(3)))  # a quiet stream's heartbeat completes it
    pipe._maybe_flush()
    assert saved_position(storage) == str(at(3))
    assert [ev.id for ev in ArchiveReader(storage).events()] == [at(1), at(2)]
