"""Stopping the archive jobs: a bounded shutdown, a snapshot that aborts cleanly (nothing
committed, lock released, scratch file deleted) and the scratch files of killed runs removed.
Real scheduler, real filesystem, real child processes."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from connector.jobs import LOCK_KEY, JobRunner, run_snapshot_job
from connector.retention import RetentionPolicy
from connector.snapshot import SnapshotStopped, list_snapshots, write_snapshot
from connector.storage.local import LocalStorage
from tests.test_verify import build_good

ROOT = Path(__file__).resolve().parents[1]


class SlowSegments(LocalStorage):
    """Opening a segment takes ``delay`` seconds (a big segment over a slow link)."""

    delay = float(os.environ.get("SLOW_SEGMENT_SECS", "1.5"))

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        self.folding = threading.Event()

    def open(self, key: str) -> BinaryIO:
        if key.startswith("events/"):
            self.folding.set()
            time.sleep(self.delay)
        return super().open(key)


def _runner(storage: LocalStorage, work: Path, **kw: object) -> JobRunner:
    return JobRunner(
        storage,
        snapshot_schedule="every 1h",
        retention_schedule="every 1h",
        retention=RetentionPolicy(keep_days=1, keep_snapshots=0),
        work_dir=work,
        **kw,  # type: ignore[arg-type]
    )


def _fire(runner: JobRunner, name: str) -> None:
    runner.scheduler.modify_job(name, next_run_time=dt.datetime.now(dt.UTC))


def test_shutdown_stops_a_running_snapshot_without_committing(tmp_path: Path) -> None:
    storage = SlowSegments(tmp_path / "a")
    build_good(storage)  # 3 segments: the whole snapshot takes 3 x delay
    work = tmp_path / "w"
    runner = _runner(storage, work)
    runner.start()
    try:
        _fire(runner, "snapshot")
        assert storage.folding.wait(20), "snapshot did not start"
        assert list(work.glob("snapshot-*.sqlite"))  # its scratch database
    finally:
        t0 = time.monotonic()
        idle = runner.shutdown()
        took = time.monotonic() - t0
    assert idle
    # Only the segment being read finishes; the two after it are not folded.
    assert took < 2 * SlowSegments.delay, took
    assert list_snapshots(storage) == []
    assert not list(storage.list("snapshots/"))  # not even a part
    assert not storage.exists(LOCK_KEY)
    assert list(work.glob("snapshot-*")) == []
    assert runner.runs["snapshot"] == 1 and runner.failures["snapshot"] == 0
    # A job firing after the shutdown does not start.
    runner.run_snapshot()
    assert runner.runs["snapshot"] == 1


class StopAfterFirstPart(LocalStorage):
    def __init__(self, root: Path, stop: threading.Event) -> None:
        super().__init__(root)
        self.stop = stop

    def put_if_absent(self, key: str, body: bytes) -> bool:
        written = super().put_if_absent(key, body)
        if key.startswith("snapshots/") and "/part-" in key:
            self.stop.set()
        return written


def test_write_snapshot_stops_between_parts(tmp_path: Path) -> None:
    stop = threading.Event()
    storage = StopAfterFirstPart(tmp_path / "a", stop)
    build_good(storage)
    with pytest.raises(SnapshotStopped):
        write_snapshot(storage, work_dir=tmp_path / "w", part_objects=1, stop=stop)
    parts = list(storage.list("snapshots/"))
    assert len(parts) == 1 and "/part-00000" in parts[0]  # the second part was never written
    assert list_snapshots(storage) == []  # no manifest: nothing committed
    assert list((tmp_path / "w").glob("snapshot-*")) == []
    # Run again without a stop: the leftover part is reused and the snapshot commits.
    stop.clear()
    storage.stop = threading.Event()
    info = write_snapshot(storage, work_dir=tmp_path / "w", part_objects=1)
    assert info is not None and list_snapshots(storage) == [info]


class StopAtStateImage(StopAfterFirstPart):
    def put_if_absent(self, key: str, body: bytes) -> bool:
        written = LocalStorage.put_if_absent(self, key, body)
        if "/state.sqlite" in key:
            self.stop.set()
        return written


def test_a_stop_while_the_state_image_is_stored_commits_nothing(tmp_path: Path) -> None:
    """The state image is the last thing stored before the manifest: a stop that comes while
    it is written still ends the run uncommitted (a shutdown does not wait for a commit)."""
    stop = threading.Event()
    storage = StopAtStateImage(tmp_path / "a", stop)
    build_good(storage)
    with pytest.raises(SnapshotStopped, match="before its manifest"):
        write_snapshot(storage, work_dir=tmp_path / "w", stop=stop)
    assert any("/state.sqlite" in k for k in storage.list("snapshots/"))
    assert list_snapshots(storage) == []


class BlockingList(LocalStorage):
    """``list`` hangs until released: a storage call stuck on a dead connection."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = threading.Event()
        self.release = threading.Event()

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[str]:
        self.entered.set()
        self.release.wait(60)
        return super().list(prefix, start_after)


def test_shutdown_waits_a_bounded_time_for_a_stuck_job(tmp_path: Path) -> None:
    storage = BlockingList(tmp_path / "a")
    runner = _runner(storage, tmp_path / "w", shutdown_timeout_secs=0.5)
    runner.start()
    result: list[bool] = []
    try:
        _fire(runner, "retention")
        assert storage.entered.wait(20)
        closer = threading.Thread(target=lambda: result.append(runner.shutdown()))
        t0 = time.monotonic()
        closer.start()
        closer.join(10)
        took = time.monotonic() - t0
        assert not closer.is_alive(), "shutdown waited for the stuck job without a limit"
        assert result == [False] and 0.4 < took < 5
    finally:
        storage.release.set()
    deadline = time.monotonic() + 20
    while runner._active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner._active == 0


_KILLED_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from connector.jobs import run_snapshot_job
    from tests.test_jobs_stop import SlowSegments
    run_snapshot_job(SlowSegments(sys.argv[1]), Path(sys.argv[2]))
    """
)


def test_a_killed_runs_scratch_file_is_removed_by_the_next_job(tmp_path: Path) -> None:
    archive, work = tmp_path / "a", tmp_path / "w"
    build_good(LocalStorage(archive))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLOW_SEGMENT_SECS": "30"}
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CHILD, str(archive), str(work)], env=env
    )
    try:
        deadline = time.monotonic() + 30
        while not list(work.glob("snapshot-*.sqlite")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # into the fold
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    (leftover,) = work.glob("snapshot-*.sqlite")
    LocalStorage(archive).delete(LOCK_KEY)  # as if its ttl ran out
    # Another process's run is live in the same work dir: its file (flocked) must stay.
    live = work / "snapshot-live.sqlite"
    fd = os.open(live, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    side = work / "snapshot-gone.sqlite-journal"  # a side file whose database is gone
    side.write_bytes(b"x")
    try:
        info = run_snapshot_job(LocalStorage(archive), work)
        assert info is not None
        assert not leftover.exists() and not side.exists()
        assert sorted(p.name for p in work.glob("snapshot-*")) == ["snapshot-live.sqlite"]
    finally:
        os.close(fd)


def test_a_fallback_from_a_damaged_snapshot_keeps_the_scratch_claim(tmp_path: Path) -> None:
    """seed_state falls back from a damaged newest snapshot by emptying its scratch file in
    place: the run's flock on it still holds, so another process's cleanup spares it."""
    from connector.snapshot import claim_scratch, list_snapshots, remove_stale_scratch, seed_state
    from connector.storage.local import LocalStorage
    from tests.support.snapshots import and_its_image
    from tests.test_retention import build_days

    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=4, snapshot_days={1, 2})
    snaps = list_snapshots(storage)
    for damaged in and_its_image(snaps[-1], snaps[-1].parts[0]):
        part = storage.root / damaged.key
        part.write_bytes(b"damaged" + part.read_bytes()[7:])  # same size, another sha256
    work = tmp_path / "work"
    work.mkdir()
    db = work / "snapshot-live.sqlite"
    claim = claim_scratch(db)
    try:
        state, base = seed_state(db, storage, snaps)
        state.close()
        assert base is not None and base.as_of == snaps[-2].as_of  # fell back
        assert remove_stale_scratch(work) == []
    finally:
        os.close(claim)


_TERMINATED_CHILD = textwrap.dedent(
    """
    import signal
    import sys
    import time
    from connector import __main__ as cli

    # A terminal's Ctrl-C, whether or not this child was started with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from connector.storage import local

    plain_open = local.LocalStorage.open

    def slow_open(self, key):  # a segment over a slow link: 30 s to open
        if key.startswith("events/"):
            time.sleep(30)
        return plain_open(self, key)

    local.LocalStorage.open = slow_open
    sys.exit(cli.main(["snapshot", "--archive", sys.argv[1]]))
    """
)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_stops_a_one_shot_command_cleanly(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    """`docker stop` of `opencti-sync snapshot`: without a handler SIGTERM killed it with no
    cleanup (the job lock held for its lease, the scratch state left) and, as a container's
    PID 1, which has no default action for it, was ignored until SIGKILL. Now SIGTERM stops it
    like Ctrl-C: exit 143 (Ctrl-C's own 130), the lock released, the scratch state removed,
    nothing committed."""
    archive, work = tmp_path / "a", tmp_path / "w"
    build_good(LocalStorage(archive))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENCTI_SYNC_WORK_DIR": str(work)}
    child = subprocess.Popen(
        [sys.executable, "-c", _TERMINATED_CHILD, str(archive)],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not list(work.glob("snapshot-*.sqlite")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # into the fold, inside a 30 s segment read
        assert child.poll() is None
        child.send_signal(sig)
        _, err = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == code, err.decode()
    assert b"Traceback" not in err
    storage = LocalStorage(archive)
    assert not storage.exists(LOCK_KEY)
    assert list_snapshots(storage) == []
    assert list(work.glob("snapshot-*")) == []


def test_a_one_shot_command_puts_back_the_sigterm_action_it_found(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``main()`` inside a program (a test, a script calling it twice): once the command has
    returned, SIGTERM has its default action again, not a handler raising into what runs next."""
    from connector.__main__ import main

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert main(["config-doc", "--format", "yaml"]) == 0
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)
    capsys.readouterr()
