"""One ``run`` per archive: a second one waits (standby) and takes over when the first stops.

Two runs writing one archive cut their segments at different places (overlapping segments,
which verify reports) and move one checkpoint back and forth. Real parts: the simulator over
HTTP, a local archive, the connector's own ``run`` in threads, the archive verified and folded.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from connector.checkpoint import CheckpointStore
from connector.errors import PermanentError, RetryableError
from connector.locks import JobLock, LockHeld, LockRecord
from connector.metrics import REGISTRY
from connector.restore import materialise
from connector.run_lease import RUN_LEASE_KEY, LeaseLost, RunLease, lease_holder
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.storage.local import LocalStorage
from connector.verify import verify_archive
from tests.support.connector import ConnectorThread, base_env, caught_up, wait_until
from tests.test_state import assert_equal_objects, sim_objects, state_objects

TOKEN = "lease-token-0123456789"


def _standby() -> float | None:
    return REGISTRY.get_sample_value("opencti_sync_standby")


def _holder(storage: LocalStorage) -> str:
    record = LockRecord.from_json(storage.get(RUN_LEASE_KEY))
    assert record is not None
    return record.owner


def _foreign(expires_in: float = 600, **kw: object) -> bytes:
    """A lease record of another run (another host, unless told otherwise)."""
    fields: dict[str, object] = {"host": "another-host", "pid": 4242, "pidns": ""}
    fields.update(kw)
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expires_in)
    return LockRecord("another-run", "run", expires, **fields).to_json()  # type: ignore[arg-type]


def _batches_by(run: ConnectorThread, caplog: pytest.LogCaptureFixture) -> int:
    """How many batches ``run`` wrote (its pipeline runs in its own thread)."""
    name = run._thread.name
    return sum(r.getMessage() == "Batch written." and r.threadName == name for r in caplog.records)


def test_a_second_run_waits_and_takes_over_when_the_first_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connector")
    storage = LocalStorage(tmp_path / "archive")
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 200, seed=11)
        env = base_env(sim.url, TOKEN, str(tmp_path / "archive"), ARCHIVE_MAX_EVENTS="50")
        first = ConnectorThread(env).start()
        wait_until(lambda: caught_up(storage, sim.store.last_event_id or "0-0"), what="backup")
        first_owner = _holder(storage)

        # The second cuts its segments elsewhere: had it written beside the first, its segments
        # would overlap the first's.
        second = ConnectorThread({**env, "ARCHIVE_MAX_EVENTS": "7"}).start()
        wait_until(lambda: _standby() == 1, what="the second run's standby")
        generate(sim.store, 150, seed=12)
        wait_until(lambda: caught_up(storage, sim.store.last_event_id or "0-0"), what="more")
        assert second.alive and _holder(storage) == first_owner
        assert f"pid {os.getpid()} until" in (lease_holder(storage) or "")  # as status says
        assert _batches_by(first, caplog) > 0 and _batches_by(second, caplog) == 0

        # A third one is stopped while it waits: it leaves as it came, writing nothing.
        third = ConnectorThread(env).start()
        third.stop()
        assert third.rc == 0 and third.error is None
        assert _holder(storage) == first_owner

        first.stop()
        assert first.error is None and first.rc == 0
        # The lease (60 s) is released by the stop, not waited out.
        wait_until(lambda: _standby() == 0, timeout=30, what="the take-over")
        generate(sim.store, 150, seed=13)
        wait_until(lambda: caught_up(storage, sim.store.last_event_id or "0-0"), what="the rest")
        assert _holder(storage) not in (first_owner, "")
        assert _batches_by(second, caplog) > 0
        second.stop()
        assert second.error is None and second.rc == 0
        assert not storage.exists(RUN_LEASE_KEY)  # released at the stop

        report = verify_archive(storage, work_dir=tmp_path / "verify")
        assert report.ok, report
        state = materialise(storage, until=None, work_dir=tmp_path / "plan")
        try:
            assert_equal_objects(state_objects(state), sim_objects(sim.store))
        finally:
            state.close()


def test_a_paused_run_whose_lease_was_taken_over_stops_without_writing(tmp_path: Path) -> None:
    """The real case: a run paused (SIGSTOP) past its lease, another run took the lease over,
    then the paused one wakes with events to write. (A takeover of a lease still being renewed
    cannot happen, since only an expired lease is taken over: a thread cannot be paused, so
    the run is a process of its own.)"""
    storage = LocalStorage(tmp_path / "archive")
    log_path = tmp_path / "run.log"
    with SimServer(token=TOKEN, heartbeat_secs=2) as sim:
        generate(sim.store, 100, seed=21)
        env = {
            **os.environ,
            **base_env(sim.url, TOKEN, str(tmp_path / "archive"), CONNECTOR_LEASE_SECS="1.5"),
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        }
        with log_path.open("wb") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "connector", "run"], env=env, stdout=out, stderr=out
            )
        try:
            wait_until(lambda: caught_up(storage, sim.store.last_event_id or "0-0"), what="backup")
            # Paused just after a heartbeat's checkpoint save, so no write is under way.
            last = CheckpointStore(storage).load()
            wait_until(lambda: CheckpointStore(storage).load() != last, what="a heartbeat save")
            child.send_signal(signal.SIGSTOP)
            saved = CheckpointStore(storage).load()
            written = sorted(k for k in storage.list("") if not k.startswith("locks/"))
            time.sleep(2.0)  # past the 1.5 s lease
            storage.put(RUN_LEASE_KEY, _foreign())
            generate(sim.store, 50, seed=22)
            child.send_signal(signal.SIGCONT)
            rc = child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        log = log_path.read_text()
        assert rc == 1, log
        assert "took this archive over" in log
        assert _holder(storage) == "another-run"  # not deleted by the stopping run
        assert CheckpointStore(storage).load() == saved
        assert sorted(k for k in storage.list("") if not k.startswith("locks/")) == written


def test_a_lost_lease_is_found_before_the_next_write(tmp_path: Path) -> None:
    """The guard the pipeline calls before each write: it reads the lease again once its last
    renewal is half a lease old (another run may take over an expired one)."""
    storage = LocalStorage(tmp_path)
    lease = RunLease([storage], ttl_secs=3600)  # the renewal thread stays asleep
    assert lease.wait(threading.Event())
    try:
        lease.check()  # renewed just now: no read
        storage.put(RUN_LEASE_KEY, _foreign())
        lease.check()  # still within half a lease of its renewal
        lease._leases[0]._renewed_at -= 1801  # half an hour without a renewal
        with pytest.raises(LeaseLost):
            lease.check()
        assert lease.lost
    finally:
        lease.release()
    assert _holder(storage) == "another-run"


def test_a_lease_its_renewal_found_taken_over_stops_the_next_write(tmp_path: Path) -> None:
    """The renewal thread found the lease taken over (``lost``): the next check says so at once,
    though the last renewal is recent and no read of the lease is due."""
    storage = LocalStorage(tmp_path)
    lease = RunLease([storage], ttl_secs=3600)  # the renewal thread stays asleep
    assert lease.wait(threading.Event())
    try:
        storage.put(RUN_LEASE_KEY, _foreign())
        with pytest.raises(LockHeld):
            lease._leases[0].renew()  # what the renewal thread does every third of a lease
        assert lease.lost
        with pytest.raises(LeaseLost):
            lease.check()
    finally:
        lease.release()
    assert _holder(storage) == "another-run"


def test_a_dead_holder_on_this_host_is_not_waited_out(tmp_path: Path) -> None:
    """A run killed and restarted on the same host (systemd) takes over at once; a lease of a
    live process, or of another host, is waited out."""
    storage = LocalStorage(tmp_path)
    me = JobLock(storage, "probe")._record()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    storage.put(RUN_LEASE_KEY, _foreign(host=me.host, pid=int(dead.stdout), pidns=me.pidns))
    if me.pidns:  # where /proc says nothing, every lease is waited out
        with JobLock(storage, "run", key=RUN_LEASE_KEY) as lock:
            assert _holder(storage) == lock.owner

    storage.put(RUN_LEASE_KEY, _foreign(host=me.host, pid=me.pid, pidns=me.pidns))
    with pytest.raises(LockHeld, match=f"pid {me.pid}"):
        JobLock(storage, "run", key=RUN_LEASE_KEY).acquire()
    storage.put(RUN_LEASE_KEY, _foreign(pid=int(dead.stdout), pidns=me.pidns))
    with pytest.raises(LockHeld):
        JobLock(storage, "run", key=RUN_LEASE_KEY).acquire()


def test_a_dead_holder_elsewhere_is_waited_out_though_its_host_and_pid_look_the_same(
    tmp_path: Path,
) -> None:
    """Another machine with this host name has the same host pid namespace number: only its
    boot id tells it apart, and its pid says nothing here."""
    storage = LocalStorage(tmp_path)
    me = JobLock(storage, "probe")._record()
    if not me.pidns:
        pytest.skip("/proc does not tell the pid namespace here")
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert me.pidns.endswith(f" boot {boot}")  # what tells this machine apart
    elsewhere = me.pidns.split(" boot ")[0] + " boot 00000000-0000-0000-0000-000000000000"
    storage.put(RUN_LEASE_KEY, _foreign(host=me.host, pid=4_000_000, pidns=elsewhere))
    with pytest.raises(LockHeld):
        JobLock(storage, "run", key=RUN_LEASE_KEY).acquire()


class _Racing(LocalStorage):
    """One standby's view of the archive while, between its requests (a slow S3 PUT), the
    holder stops and releases the lease and another standby takes it."""

    def __init__(self, root: Path, other: JobLock) -> None:
        super().__init__(root)
        self.other = other
        self.released = False
        self.other_took = False

    def get_with_tag(self, key: str) -> tuple[bytes, str]:
        if key == RUN_LEASE_KEY and not self.released:
            self.released = True
            LocalStorage(self.root).delete(key)  # the holder stops
        return super().get_with_tag(key)

    def put(self, key: str, body: bytes) -> None:
        self._other_first(key)
        super().put(key, body)

    def replace_if(self, key: str, body: bytes, tag: str) -> bool:
        self._other_first(key)
        return super().replace_if(key, body, tag)

    def put_if_absent(self, key: str, body: bytes) -> bool:
        if self.released:
            self._other_first(key)
        return super().put_if_absent(key, body)

    def _other_first(self, key: str) -> None:
        if key == RUN_LEASE_KEY and not self.other_took:
            self.other_took = True
            self.other.acquire()


def test_two_standbys_never_both_take_a_released_lease(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.put(RUN_LEASE_KEY, _foreign())  # the holder, alive
    other = JobLock(storage, "run", key=RUN_LEASE_KEY)
    mine = JobLock(_Racing(tmp_path, other), "run", key=RUN_LEASE_KEY)
    try:
        with pytest.raises(LockHeld):
            mine.acquire()
        assert other.held and not mine.held
        assert _holder(storage) == other.owner
    finally:
        other.release()
        mine.release()


def test_two_takers_of_one_expired_lease_never_both_hold_it(tmp_path: Path) -> None:
    """Both read the dead holder's record before either wrote (a slow S3 round trip): the
    take-over replaces that record or nothing, so the second one learns it lost."""
    storage = LocalStorage(tmp_path)
    storage.put(RUN_LEASE_KEY, _foreign(expires_in=-3600, host="gone-host"))
    _, tag = storage.get_with_tag(RUN_LEASE_KEY)
    first = JobLock(storage, "run", key=RUN_LEASE_KEY)
    second = JobLock(storage, "run", key=RUN_LEASE_KEY)
    try:
        first.take_over(tag)
        with pytest.raises(LockHeld) as lost:
            second.take_over(tag)  # its write came after the first's confirming re-read
        assert first.held and not second.held
        assert _holder(storage) == first.owner
        assert lost.value.record is not None and lost.value.record.owner == first.owner
    finally:
        second.release()
        first.release()


def test_a_renewing_holder_is_not_displaced_by_a_stale_take_over(tmp_path: Path) -> None:
    """A standby decided on a record the holder has renewed since (the holder was paused, then
    resumed): its take-over writes nothing, and the holder keeps its lease."""
    storage = LocalStorage(tmp_path)
    holder = JobLock(storage, "run", ttl_secs=3600, key=RUN_LEASE_KEY)
    holder.acquire()
    standby = JobLock(storage, "run", key=RUN_LEASE_KEY)
    try:
        _, stale = storage.get_with_tag(RUN_LEASE_KEY)
        holder.renew()
        with pytest.raises(LockHeld):
            standby.take_over(stale)
        assert _holder(storage) == holder.owner
        holder.renew()  # still ours: not lost
        assert not holder.lost and not standby.held
    finally:
        standby.release()
        holder.release()


def test_a_holders_renewals_from_two_threads_do_not_lose_its_lease(tmp_path: Path) -> None:
    """The renewal thread and the pipeline's guard both renew: each compares with what it
    read, so one renewing between the other's read and write must not look like a take-over."""
    storage = LocalStorage(tmp_path)
    lease = JobLock(storage, "run", ttl_secs=3600, key=RUN_LEASE_KEY)
    lease.acquire()
    errors: list[BaseException] = []

    def renew_many() -> None:
        try:
            for _ in range(100):
                lease.renew()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=renew_many) for _ in range(3)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == [] and not lease.lost
        assert _holder(storage) == lease.owner
    finally:
        lease.release()


class _Outage(LocalStorage):
    """The holder's view of the archive: renewals fail during an outage; a standby takes the
    lease over right after the holder's release has read it (between that read and its delete)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.outage = False
        self.standby: JobLock | None = None

    def replace_if(self, key: str, body: bytes, tag: str) -> bool:
        if self.outage:
            raise RetryableError("the archive is unreachable")
        return super().replace_if(key, body, tag)

    def get(self, key: str) -> bytes:
        data = super().get(key)
        if self.standby is not None and not self.standby.held:
            self.standby.acquire()
        return data


def test_a_holder_released_after_its_lease_ran_out_never_deletes_its_successors(
    tmp_path: Path,
) -> None:
    """A holder whose renewals failed past its lease stops: a standby may take the lease over
    between the release's read and its delete, which must not remove the standby's lease."""
    storage = _Outage(tmp_path)
    holder = JobLock(storage, "run", ttl_secs=0.6, key=RUN_LEASE_KEY)
    holder.acquire()
    storage.outage = True
    time.sleep(1.0)  # renewals fail; the lease runs out
    standby = JobLock(LocalStorage(tmp_path), "run", ttl_secs=3600, key=RUN_LEASE_KEY)
    storage.standby = standby
    try:
        holder.release()  # reads the lease at most: left to expire, not deleted
        storage.standby = None
        if not standby.held:
            standby.acquire()  # the expired lease, taken over after the release then
        assert _holder(storage) == standby.owner
        standby.renew()  # still its own
        assert not standby.lost
    finally:
        standby.release()


def test_a_standby_times_the_holder_by_its_own_clock(tmp_path: Path) -> None:
    """Another machine's clock may run ahead or behind: a standby takes over a record that stays
    unchanged for a whole lease, and never one that is renewed, whatever its dates say."""
    storage = LocalStorage(tmp_path)
    # A dead holder whose clock ran a day ahead: its record says it holds until tomorrow.
    storage.put(RUN_LEASE_KEY, _foreign(expires_in=86_400))
    stop = threading.Event()
    lease = RunLease([storage], ttl_secs=1.0)
    timer = threading.Timer(30, stop.set)
    timer.start()
    try:
        assert lease.wait(stop) and not stop.is_set()
    finally:
        timer.cancel()
        lease.release()

    # A live holder whose clock runs 5 minutes behind: each renewal writes a date already past.
    renewing = threading.Event()

    def renew() -> None:
        while not renewing.wait(0.2):
            storage.put(RUN_LEASE_KEY, _foreign(expires_in=-300, pid=4242 + int(time.time() * 5)))

    storage.put(RUN_LEASE_KEY, _foreign(expires_in=-300))
    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    stop = threading.Event()
    standby = RunLease([storage], ttl_secs=1.0)
    timer = threading.Timer(4, stop.set)  # four leases
    timer.start()
    try:
        assert not standby.wait(stop)
        assert _holder(storage) == "another-run"
    finally:
        renewing.set()
        thread.join()
        timer.cancel()
        standby.release()


def test_two_names_of_one_place_are_one_lease(tmp_path: Path) -> None:
    """A checkpoint kept "apart" in a symlink to the archive: the run must not wait on itself."""
    (tmp_path / "archive").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "archive")
    lease = RunLease([LocalStorage(tmp_path / "archive"), LocalStorage(tmp_path / "link")], 60)
    stop = threading.Event()
    timer = threading.Timer(20, stop.set)
    timer.start()
    try:
        assert lease.wait(stop) and not stop.is_set()
        lease.check()
    finally:
        timer.cancel()
        lease.release()
    assert not (tmp_path / "archive" / RUN_LEASE_KEY).exists()


class _NoDelete(LocalStorage):
    """A bucket policy without s3:DeleteObject."""

    def delete(self, key: str) -> None:
        raise PermanentError(f"AccessDenied: delete {key}")


def test_a_lease_that_cannot_be_deleted_does_not_change_the_outcome(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lease = RunLease([_NoDelete(tmp_path)], 60)
    assert lease.wait(threading.Event())
    lease.release()  # no exception: the run's own outcome stands
    assert any("Could not release" in r.getMessage() for r in caplog.records)


def test_a_transient_failure_while_waiting_for_the_lease_is_retried(tmp_path: Path) -> None:
    """A storage blip (RetryableError) on the first try to take the lease: the run waits on,
    it does not end."""

    class Blip(LocalStorage):
        failures = 0

        def put_if_absent(self, key: str, body: object) -> bool:  # type: ignore[override]
            if key == RUN_LEASE_KEY and self.failures == 0:
                self.failures += 1
                raise RetryableError("S3 write locks/run.json failed (transient): HTTP 503")
            return super().put_if_absent(key, body)  # type: ignore[arg-type]

    storage = Blip(tmp_path / "a")
    lease = RunLease([storage], ttl_secs=60)
    try:
        assert lease.wait(threading.Event()) is True
        assert storage.failures == 1 and storage.exists(RUN_LEASE_KEY)
    finally:
        lease.release()
    assert not storage.exists(RUN_LEASE_KEY)


def test_a_stop_while_waiting_for_the_second_lease_releases_the_first(tmp_path: Path) -> None:
    """Leases are taken in order (archive, then the checkpoint's storage): a stop that comes
    while another run holds the second leaves nothing held, the first included."""
    first = LocalStorage(tmp_path / "archive")
    other = RunLease([LocalStorage(tmp_path / "state")], ttl_secs=600)
    assert other.wait(threading.Event())
    stop = threading.Event()

    class StopsWhenAsked(LocalStorage):
        def put_if_absent(self, key: str, body: object) -> bool:  # type: ignore[override]
            stop.set()  # the stop comes while this lease is held by the other run
            return super().put_if_absent(key, body)  # type: ignore[arg-type]

    lease = RunLease([first, StopsWhenAsked(tmp_path / "state")], ttl_secs=600)
    try:
        assert lease.wait(stop) is False
        assert not first.exists(RUN_LEASE_KEY)  # the first lease went with the stop
        assert not lease.lost
    finally:
        lease.release()
        other.release()


def test_status_names_the_holder_of_a_live_lease_only(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    storage.put(RUN_LEASE_KEY, _foreign(expires_in=-5))  # its holder died: nobody holds it
    assert lease_holder(storage) is None
    storage.put(RUN_LEASE_KEY, _foreign(expires_in=600))
    assert (lease_holder(storage) or "").startswith("another-host pid 4242 until ")


def test_a_run_that_lost_one_of_its_two_leases_has_lost(tmp_path: Path) -> None:
    """The checkpoint kept apart: another run took the lease next to it over. The run is
    stopped by the renewal that finds it, and its end says so (exit 1), though it still
    holds the archive's lease."""
    archive, kept = LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "c")
    found = threading.Event()
    lease = RunLease([archive, kept], 0.3, on_lost=found.set)  # renewed every 0.1 s
    assert lease.wait(threading.Event())
    try:
        kept.put(RUN_LEASE_KEY, _foreign())
        assert found.wait(20), "the renewal never found the lease taken over"
        assert lease.lost
        with pytest.raises(LeaseLost):
            lease.check()
    finally:
        lease.release()
    assert _holder(kept) == "another-run"  # its lease, not deleted by our release


def test_an_idle_run_whose_renewal_finds_the_lease_taken_over_ends_as_lost(
    tmp_path: Path,
) -> None:
    """The renewal finds the lease taken over while the run has nothing to write: the run
    stops, and ends with LeaseLost (exit 1, the operator told why), not as a clean stop."""
    storage = LocalStorage(tmp_path / "archive")
    with SimServer(token=TOKEN, heartbeat_secs=2) as sim:
        generate(sim.store, 20, seed=23)
        env = base_env(sim.url, TOKEN, str(tmp_path / "archive"), CONNECTOR_LEASE_SECS="1.5")
        run = ConnectorThread(env).start()
        try:
            wait_until(lambda: caught_up(storage, sim.store.last_event_id or "0-0"), what="backup")
            # Just after a heartbeat's save: the next one is 2 s away, the renewal 0.5 s.
            last = CheckpointStore(storage).load()
            wait_until(lambda: CheckpointStore(storage).load() != last, what="a heartbeat save")
            storage.put(RUN_LEASE_KEY, _foreign())
            run.join(timeout=30)
        finally:
            run.stop()
    assert isinstance(run.error, LeaseLost), (run.error, run.rc)
    assert _holder(storage) == "another-run"
