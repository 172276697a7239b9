"""SIGTERM while a write or a checkpoint save is being retried: the connector still exits within
CONNECTOR_SHUTDOWN_TIMEOUT_SECS (ShutdownTimeout), the checkpoint has not moved, and the next
run loses nothing.

Real parts: the simulator over HTTP, the real source and pipeline, a local archive whose disk is
full (ENOSPC through LocalStorage's own error translation) for the objects a test names.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connector import pipeline
from connector.__main__ import _check_sinks, _install_signals
from connector.archive import ArchiveReader, ArchiveSink
from connector.checkpoint import CHECKPOINT_KEY, Checkpoint, CheckpointStore
from connector.errors import RetryableError
from connector.events import EventId
from connector.pipeline import BatchPolicy, Pipeline, ShutdownTimeout, StopEvent
from connector.settings import load_settings
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.source import SourceConfig, SseSource
from connector.storage import local
from connector.storage.local import LocalStorage
from connector.verify import format_report, verify_archive
from tests.support.connector import archived_events, checkpoint_id, start_pipeline, wait_until
from tests.support.simlog import sim_events

TOKEN = "pipeline-shutdown-token"
SHUTDOWN_TIMEOUT = 1.0


class FullFor(LocalStorage):
    """A local archive whose disk is full for the keys ``full(key)`` names."""

    def __init__(self, root: Path, full: Callable[[str], bool]) -> None:
        super().__init__(root)
        self.full = full
        self.refused = 0

    def _refuse(self, key: str) -> None:
        if self.full(key):
            self.refused += 1
            path = self.root / key
            err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            raise local._translate(err, path) from err

    def put(self, key: str, body: bytes) -> None:
        self._refuse(key)
        super().put(key, body)

    def put_if_absent(self, key: str, body: bytes) -> bool:
        self._refuse(key)
        return super().put_if_absent(key, body)


def first_write_under(prefix: str) -> Callable[[str], bool]:
    """A ``FullFor`` rule: the disk is full for the first write under ``prefix`` only."""
    hit: list[str] = []

    def full(key: str) -> bool:
        if key.startswith(prefix) and not hit:
            hit.append(key)
            return True
        return False

    return full


class SlowSegments(LocalStorage):
    """A local archive on which every segment write takes ``delay`` seconds (a slow target)."""

    def __init__(self, root: Path, delay: float) -> None:
        super().__init__(root)
        self.delay = delay
        self.writes = 0

    def put_if_absent(self, key: str, body: bytes) -> bool:
        if key.startswith("events/"):
            self.writes += 1
            time.sleep(self.delay)
        return super().put_if_absent(key, body)


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = SimServer(token=TOKEN, heartbeat_secs=0.2).start()
    yield server
    server.stop()


def start(
    storage: LocalStorage, sim: SimServer, policy: BatchPolicy | None = None
) -> tuple[threading.Thread, threading.Event, list[BaseException]]:
    store = CheckpointStore(storage)
    cp = store.load()
    assert cp is not None
    source = SseSource(
        SourceConfig(
            url=sim.url, token=TOKEN, stream_id="live", backoff_initial=0.05, backoff_max=0.3
        ),
        resume=EventId.parse(cp.last_event_id) if cp.last_event_id else None,
    )
    stop = StopEvent()  # as `run` makes it: it remembers when SIGTERM came
    pipeline = Pipeline(
        source=source,
        sinks=[ArchiveSink(storage)],
        store=store,
        checkpoint=cp,
        policy=policy or BatchPolicy(max_age_secs=0.2),
        stop=stop,
        backoff_initial=0.05,
        backoff_max=0.2,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    thread, errors = start_pipeline(pipeline)
    return thread, stop, errors


def catch_up(storage: LocalStorage, sim: SimServer) -> None:
    """A healthy run up to the simulator's last event, then a clean stop."""
    thread, stop, errors = start(storage, sim)
    last = EventId.parse(sim.store.last_event_id or "0-0")
    wait_until(
        lambda: (checkpoint_id(storage) or EventId(0, 0)) >= last, timeout=30, what="catch-up"
    )
    stop.set()
    thread.join(15)
    assert not errors


def sigterm_while_retrying(tmp_path: Path, sim: SimServer, full: Callable[[str], bool]) -> None:
    root = tmp_path / "archive"
    CheckpointStore(LocalStorage(root)).save(Checkpoint(stream_id="live", source_url=sim.url))
    generate(sim.store, 20, seed=5, mix="creates")
    storage = FullFor(root, full)
    thread, stop, errors = start(storage, sim)
    wait_until(lambda: storage.refused >= 3, timeout=30, what="retries on the full disk")
    stopped = time.monotonic()
    stop.set()  # SIGTERM
    thread.join(SHUTDOWN_TIMEOUT + 4)
    assert not thread.is_alive(), "still retrying after SIGTERM: the shutdown timeout is ignored"
    assert time.monotonic() - stopped < SHUTDOWN_TIMEOUT + 3
    assert len(errors) == 1 and isinstance(errors[0], ShutdownTimeout), errors
    assert checkpoint_id(LocalStorage(root)) is None, "the checkpoint moved"
    # Nothing was lost: the next run, disk back, archives every event once.
    healthy = LocalStorage(root)
    catch_up(healthy, sim)
    expected, _ = sim_events(sim.store)
    assert [e.id_text for e in archived_events(healthy)] == [e.id_text for e in expected]
    report = verify_archive(healthy, work_dir=tmp_path / "verify")
    assert report.ok, format_report(report)


def test_sigterm_while_a_write_is_retried(sim: SimServer, tmp_path: Path) -> None:
    sigterm_while_retrying(tmp_path, sim, lambda key: key.startswith("events/"))


def test_sigterm_while_the_checkpoint_save_is_retried(sim: SimServer, tmp_path: Path) -> None:
    sigterm_while_retrying(tmp_path, sim, lambda key: key == CHECKPOINT_KEY)


def test_sigterm_during_a_slow_write_ends_within_the_timeout(
    sim: SimServer, tmp_path: Path
) -> None:
    """A write that succeeds, slowly (a slow target), when SIGTERM comes: the timeout counts from
    the signal, so the run ends once that write is done instead of starting another batch for
    what is still pending; the checkpoint covers what was written, the next run the rest."""
    root = tmp_path / "archive"
    CheckpointStore(LocalStorage(root)).save(Checkpoint(stream_id="live", source_url=sim.url))
    generate(sim.store, 40, seed=5, mix="creates")
    delay = SHUTDOWN_TIMEOUT * 2
    storage = SlowSegments(root, delay)
    thread, stop, errors = start(storage, sim, BatchPolicy(max_events=10, max_age_secs=0.2))
    wait_until(lambda: storage.writes >= 1, timeout=30, what="the first slow write")
    stopped = time.monotonic()
    stop.set()  # SIGTERM, a write under way and more events pending
    thread.join(delay * 3)
    assert not thread.is_alive()
    assert time.monotonic() - stopped < delay + SHUTDOWN_TIMEOUT, "another batch was started"
    assert len(errors) == 1 and isinstance(errors[0], ShutdownTimeout), errors
    assert storage.writes == 1
    healthy = LocalStorage(root)
    written = checkpoint_id(healthy)
    assert written is not None and written < EventId.parse(sim.store.last_event_id or "0-0")
    catch_up(healthy, sim)
    # Nothing lost, nothing written twice: the second run's segments start after the first's.
    archived = {(e.id_text, e.stix_id) for e in archived_events(healthy)}
    manifests = [ref.manifest for ref in ArchiveReader(healthy).manifests()]
    assert len(manifests) >= 2
    assert all(a.last < b.first for a, b in zip(manifests, manifests[1:], strict=False))
    expected, _ = sim_events(sim.store)
    assert {(e.id_text, e.stix_id) for e in expected} <= archived
    report = verify_archive(healthy, work_dir=tmp_path / "verify")
    assert report.ok, format_report(report)


def test_sigterm_while_a_sink_check_is_retried(tmp_path: Path) -> None:
    """The startup check (``_check_sinks``) retries the same way, and a stop ends it within
    ``CONNECTOR_SHUTDOWN_TIMEOUT_SECS`` (here 1 s, not the 30 s default)."""
    storage = FullFor(tmp_path / "archive", lambda key: True)
    settings = load_settings(
        None,
        env={
            "CONNECTOR_SHUTDOWN_TIMEOUT_SECS": str(SHUTDOWN_TIMEOUT),
            "CONNECTOR_BACKOFF_INITIAL_SECS": "0.05",
            "CONNECTOR_BACKOFF_MAX_SECS": "0.2",
        },
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def check() -> None:
        try:
            _check_sinks([ArchiveSink(storage)], stop, settings)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    wait_until(lambda: storage.refused >= 3, timeout=10, what="check retries")
    stop.set()
    thread.join(SHUTDOWN_TIMEOUT + 3)
    assert not thread.is_alive(), "the check is still retried after SIGTERM"
    assert len(errors) == 1 and isinstance(errors[0], ShutdownTimeout), errors


class _Waits(threading.Event):
    """A stop event that records how long each backoff asked to wait, and does not wait."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        return False


def test_the_backoff_grows_and_is_capped() -> None:
    """Full jitter between 0 and min(cap, initial * 2^(attempt-1)): a throttled store is asked
    less and less often, but never less than once per cap."""
    stop = _Waits()
    for _ in range(200):
        pipeline._sleep_backoff(1, 1.0, 60.0, stop, None)
    first = list(stop.waits)
    stop.waits.clear()
    for _ in range(200):
        pipeline._sleep_backoff(5, 1.0, 60.0, stop, None)
    fifth = list(stop.waits)
    stop.waits.clear()
    for _ in range(200):
        pipeline._sleep_backoff(30, 1.0, 60.0, stop, None)
    thirtieth = list(stop.waits)
    assert max(first) <= 1.0
    assert 1.0 < max(fifth) <= 16.0  # 200 draws all below 1 of 16: (1/16)^200
    assert 16.0 < max(thirtieth) <= 60.0


def test_a_slow_call_is_said_while_it_waits_once_per_repeat_and_no_more_once_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The watchdog over every retried call (``watched``): nothing for a call under SLOW_SECS,
    one warning when it passes it, the next only REPEAT_SECS later, none once it returned."""
    from connector import watchdog

    monkeypatch.setattr(watchdog, "_TICK_SECS", 0.02)
    monkeypatch.setattr(watchdog, "SLOW_SECS", 0.2)
    monkeypatch.setattr(watchdog, "REPEAT_SECS", 60.0)
    caplog.set_level(logging.WARNING, logger="connector.watchdog")

    def said(target: str) -> int:
        return sum(
            r.getMessage() == "Still waiting for an answer." and getattr(r, "target", "") == target
            for r in caplog.records
        )

    with watchdog.watched("sending", "slow"):
        wait_until(lambda: said("slow") > 0, timeout=10, what="the warning")
        time.sleep(0.3)  # many ticks: the next warning is a minute away
    assert said("slow") == 1
    monkeypatch.setattr(watchdog, "SLOW_SECS", 30.0)  # the tick stays 0.02 s
    with watchdog.watched("sending", "quick"):
        time.sleep(0.3)
    assert said("quick") == 0
    monkeypatch.setattr(watchdog, "SLOW_SECS", 0.2)
    monkeypatch.setattr(watchdog, "REPEAT_SECS", 0.2)
    with watchdog.watched("checkpointing", "back"):
        wait_until(lambda: said("back") > 0, timeout=10, what="the warning")
    back = said("back")
    time.sleep(1.0)  # five repeats, were it still watched
    assert said("back") == back


def test_a_retry_at_a_stop_counts_the_shutdown_timeout_from_the_signal() -> None:
    """A call that was still waiting when SIGTERM came (a start-up check against a slow store)
    fails after the shutdown timeout has passed: it is not tried again. Counted from the
    retry instead, the stop waited a whole timeout more."""
    stop = StopEvent()
    stop.set()
    calls: list[float] = []

    def slow_failure() -> None:
        calls.append(time.monotonic())
        time.sleep(0.5)
        raise RetryableError("the store is slow, then busy")

    with pytest.raises(ShutdownTimeout):
        pipeline.retry_call(
            slow_failure, stage="checking", stop=stop, initial=0.01, shutdown_timeout=0.3
        )
    assert len(calls) == 1


def test_ctrl_c_drains_run_and_a_second_signal_changes_nothing() -> None:
    """`run`'s own handlers: Ctrl-C (SIGINT) drains like SIGTERM, and a second signal while
    the drain goes on neither ends it nor cuts it short."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = StopEvent()
    try:
        _install_signals(stop)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):
            try:
                os.kill(os.getpid(), sig)
                time.sleep(0.05)  # the handler runs here at the latest
            except KeyboardInterrupt:
                pytest.fail(f"{sig.name} ended run instead of draining it")
            assert stop.is_set()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
