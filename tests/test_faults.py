"""Fault suite, fast subset: every fault of issue 5 once, small, against real servers.

Pass line of each test: 0 events lost (the archive's distinct event sequence equals the
simulator's log) and 0 duplicated objects in the restored state (``materialise`` of the archive
equals ``SimStore.dump_bundle()``). ``bench/soak.py`` runs the same faults at scale; the
figures are in docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import zstandard

from connector import metrics, reconcile, watchdog
from connector.archive import ArchiveReader, ArchiveSink
from connector.checkpoint import CHECKPOINT_KEY, Checkpoint, CheckpointStore
from connector.errors import RetryableError
from connector.events import EventId, StreamEvent
from connector.pipeline import BatchPolicy, Pipeline, ShutdownTimeout
from connector.restore import materialise
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.sink import Batch
from connector.source import SourceConfig, SseSource
from connector.state import StateStore
from connector.storage import Storage
from connector.storage import local as local_storage
from connector.storage.local import LocalStorage
from connector.storage.s3 import S3Storage
from connector.target.opencti import OpenCTITarget
from tests.support.compare import assert_same_state
from tests.support.connector import (
    ConnectorProcess,
    ConnectorThread,
    archived_events,
    base_env,
    batch_counted,
    caught_up,
    checkpoint_id,
    raw_log,
    start_pipeline,
    wait_until,
)
from tests.support.faultproxy import FaultProxy, fault_proxy  # noqa: F401 - fixture
from tests.support.s3 import (  # noqa: F401
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    make_bucket,
    moto_server,
    storage_settings,
)
from tests.support.scenes import merge_to_come
from tests.support.served import serving
from tests.support.simlog import copy_event
from tests.test_state import sim_events

TOKEN = "fault-suite-token"
SYNTHETIC = ("init-create", "init-dependencies")


# ---------------------------------------------------------------------- shared checks
def metric(name: str, labels: dict[str, str] | None = None) -> float:
    """A sample of the connector's registry (0 when never set)."""
    return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0


def distinct(seq: list[Any]) -> list[Any]:
    """Consecutive repeats removed: a re-delivered group is archived at most once more."""
    return [x for i, x in enumerate(seq) if i == 0 or x != seq[i - 1]]


def live_sequence(events: list[StreamEvent]) -> list[tuple[str, str, str]]:
    """(id, event, STIX id) of the archive's real events (recovery and dependencies aside)."""
    return [
        (ev.id_text, ev.event, ev.stix_id)
        for ev in events
        if (ev.envelope.get("origin") or {}).get("referer") not in SYNTHETIC
    ]


def expected_sequence(sim_url: str, after: EventId | None = None) -> list[tuple[str, str, str]]:
    return [
        (i, e, d["data"]["id"])
        for i, e, d in raw_log(sim_url, TOKEN)
        if after is None or EventId.parse(i) > after
    ]


def assert_nothing_lost(sim_url: str, storage: Storage) -> list[StreamEvent]:
    """The archive holds every event of the simulator's log, in order, none twice."""
    events = archived_events(storage)
    got = live_sequence(events)
    expected = expected_sequence(sim_url)
    assert distinct(got) == expected, _first_difference(distinct(got), expected)
    assert len(set(got)) == len(expected), "an event was archived twice"
    return events


def _first_difference(got: list[Any], expected: list[Any]) -> str:
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            return f"first difference at #{i}: archived {a}, expected {b}"
    return f"archived {len(got)} events, the simulator has {len(expected)}"


def restored_bundle(storage: Storage, work: Path) -> dict[str, Any]:
    """The archive's restored state as a bundle (what ``restore --to-bundle`` would write)."""
    state = materialise(storage, until=None, work_dir=work)
    try:
        objects = [obj for _, _, _, obj in state.objects()]
    finally:
        state.close()
    return {"type": "bundle", "objects": sorted(objects, key=lambda o: str(o["id"]))}


def assert_restore_equals_platform(storage: Storage, store: SimStore, work: Path) -> None:
    """0 objects lost, 0 duplicated: the restored state is the platform's state."""
    restored = restored_bundle(storage, work)
    ids = [o["id"] for o in restored["objects"]]
    assert len(ids) == len(set(ids)), "duplicated object in the restored state"
    # No object restored twice under an old id either (merge / id change aliases).
    aliases = [a for o in restored["objects"] for a in _aliases(o)]
    assert len(aliases) == len(set(aliases)), "an id is carried by two restored objects"
    assert_same_state(store.dump_bundle(), restored)


def _aliases(obj: dict[str, Any]) -> list[str]:
    ext = (obj.get("extensions") or {}).get(
        "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba"
    ) or {}
    return sorted({str(obj["id"]), *(str(i) for i in ext.get("stix_ids") or [])})


# The reconnect metric's label for a silent stream (the reason's text before its colon).
STALL_KIND = "silent stream"


def reconnects() -> float:
    """Every stream reconnection so far, whatever its reason."""
    total = 0.0
    for family in metrics.REGISTRY.collect():
        if family.name == "opencti_sync_reconnects":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def recover_point(storage: Storage) -> EventId:
    """The id where the first run's recovery snapshot ends and plain replay starts."""
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.recover_until
    when = dt.datetime.fromisoformat(cp.recover_until.replace("Z", "+00:00"))
    return EventId(int(when.timestamp() * 1000), 0)


def assert_live_part_exact(sim_url: str, store: SimStore, storage: Storage) -> None:
    """After the recovery snapshot: every event of the log archived, in order, none twice.

    One legitimate exception, as on the platform (protocol §5.2): a replayed relationship or
    sighting whose endpoint no longer exists is not sent. Those must be gone from the platform.
    """
    got = distinct(live_sequence(archived_events(storage)))
    expected = expected_sequence(sim_url, after=recover_point(storage))
    assert len(set(got)) == len(got), "an event was archived twice"
    archived = set(got)
    skipped = [x for x in expected if x not in archived]
    for _, _, stix_id in skipped:
        assert stix_id.split("--")[0] in ("relationship", "sighting"), f"lost {stix_id}"
        assert store.get(stix_id) is None, f"lost {stix_id}, which still exists"
    kept = [x for x in expected if x in archived]
    assert got == kept, _first_difference(got, kept)


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = SimServer(token=TOKEN, heartbeat_secs=0.2).start()
    yield server
    server.stop()


def follow(storage: Storage, store: SimStore, what: str, timeout: float = 90) -> None:
    wait_until(lambda: caught_up(storage, store.last_event_id or "0-0"), timeout, what=what)


# ---------------------------------------------------------------------- 1. process kills
def test_sigkill_during_backup_with_edits_restores_the_platform(tmp_path: Path) -> None:
    """SIGKILL at random points while creates/updates/merges/deletes go on; restore = dump."""
    rng = random.Random(51)
    store = SimStore()
    generate(store, 1500, seed=11)
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        archive = str(tmp_path / "a")
        storage = LocalStorage(archive)
        env = base_env(
            sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_ID="raw", ARCHIVE_MAX_EVENTS="300"
        )
        kills = 0
        for round_ in range(5):
            proc = ConnectorProcess(env, tmp_path / "run.log")
            stop = threading.Event()
            editor = threading.Thread(
                target=_edit_while, args=(store, stop, 200 + round_), daemon=True
            )
            editor.start()
            time.sleep(rng.uniform(0.4, 1.2))
            proc.kill()  # SIGKILL: no drain, no cleanup
            kills += 1
            stop.set()
            editor.join()
        proc = ConnectorProcess(env, tmp_path / "run.log")
        follow(storage, store, "final catch-up", timeout=120)
        assert proc.terminate() == 0
        assert_nothing_lost(sim.url, storage)
    assert kills == 5
    assert_restore_equals_platform(storage, store, tmp_path / "restore")


def _edit_while(store: SimStore, stop: threading.Event, seed: int) -> None:
    n = 0
    while not stop.is_set():
        generate(store, 25, seed=seed * 1000 + n)
        n += 1
        time.sleep(0.01)


# ---------------------------------------------------------------------- 2. stream faults
@pytest.fixture(scope="module")
def stream_faults_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Many drops (mid-event too), a stall past the read timeout, a restart, 500/429/502."""
    tmp_path = tmp_path_factory.mktemp("stream-faults")
    sim = SimServer(token=TOKEN, heartbeat_secs=0.2).start()
    generate(sim.store, 400, seed=21)
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    env = base_env(
        sim.url,
        TOKEN,
        archive,
        CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE="1970-01-01T00:00:00.000Z",
        CONNECTOR_READ_TIMEOUT_SECS="5.5",
    )
    before = reconnects()
    stalls_before = metric("opencti_sync_reconnects_total", {"kind": STALL_KIND})
    # 40 connections cut after a few messages, half of them in the middle of a message.
    sim.set_fault(drop_after_events=7, mid_message=True, drop_times=20)
    run = ConnectorThread(env).start()
    follow(storage, sim.store, "recovery through 20 mid-message drops")
    wait_until(lambda: reconnects() - before >= 20, what="the first 20 drops")
    sim.set_fault(drop_after_events=3, drop_times=20)
    sim.drop_connections()
    generate(sim.store, 200, seed=22)
    follow(storage, sim.store, "live edits through 20 clean drops")
    wait_until(lambda: reconnects() - before >= 40, what="the next 20 drops")
    # A stall longer than the read timeout: nothing at all, not even heartbeats.
    sim.set_fault(stall_secs=7, stall_after_events=2)
    sim.drop_connections()
    generate(sim.store, 30, seed=23)
    follow(storage, sim.store, "past the stall")
    # The platform restarts (same port, same data), then refuses the reconnects for a while.
    sim.set_fault(fail_next={"status": 502, "count": 2, "reason": "Bad Gateway"})
    sim.restart()
    generate(sim.store, 30, seed=24)
    follow(storage, sim.store, "after the restart and 502s")
    for status in (500, 429):
        sim.set_fault(fail_next={"status": status, "count": 3})
        sim.drop_connections()
        generate(sim.store, 30, seed=status)
        follow(storage, sim.store, f"after {status}s")
    run.stop()
    yield {
        "sim": sim,
        "storage": storage,
        "run": run,
        "reconnects": reconnects() - before,
        "stalls": metric("opencti_sync_reconnects_total", {"kind": STALL_KIND}) - stalls_before,
        "work": tmp_path / "restore",
    }
    sim.stop()


def test_stream_faults_lose_nothing(stream_faults_run: dict[str, Any]) -> None:
    r = stream_faults_run
    assert r["run"].error is None and r["run"].rc == 0
    assert r["reconnects"] >= 45  # 40 drops, a stall, a restart, retried refusals
    assert r["stalls"] >= 1
    assert_live_part_exact(r["sim"].url, r["sim"].store, r["storage"])
    assert not list(r["storage"].list("quarantine/"))


def test_stream_faults_restore_equals_platform(stream_faults_run: dict[str, Any]) -> None:
    r = stream_faults_run
    assert_restore_equals_platform(r["storage"], r["sim"].store, r["work"])


def test_state_merge_after_early_target_version(tmp_path: Path) -> None:
    """What the live stream does around a merge (found by the stream-fault run, fixed in
    StateStore 64001a8): the merged target arrives early, aliases included; the merge must
    still repoint references to the source."""
    store = SimStore()
    s_id, t_id = (f"malware--{n:08d}-0000-4000-8000-000000000000" for n in (1, 2))
    rel_id = "relationship--00000000-0000-4000-8000-00000000000a"
    malware = {"type": "malware", "spec_version": "2.1", "is_family": True}
    store.create({**malware, "id": s_id, "name": "Source"})
    store.create(
        {
            "type": "relationship",
            "id": rel_id,
            "spec_version": "2.1",
            "relationship_type": "uses",
            "source_ref": s_id,
            "target_ref": s_id,
        }
    )
    store.create({**malware, "id": t_id, "name": "Target"})
    store.merge(t_id, [s_id])
    events, _ = sim_events(store)
    merge = events[-1]
    assert merge.event == "merge"
    # The platform's live stream sends the target's *current* version (aliases include the
    # source) as a dependency of a later event, before the merge event itself is replayed.
    early = copy_event(merge.id_text, store.get(t_id))
    with StateStore(tmp_path / "s.sqlite") as state:
        # Archive order seen in the fault run: S, early T, the relationship, T, the merge.
        state.apply_many([events[0], early, events[1], events[2], merge])
        rel = state.get(rel_id)
    assert rel is not None and rel["target_ref"] == t_id, rel["target_ref"] if rel else None


# ---------------------------------------------------------------------- 3. storage faults
def _s3_behind(endpoint: str, proxy: FaultProxy) -> tuple[S3Storage, dict[str, str]]:
    """A fresh bucket's ``archive/`` prefix on the S3 ``endpoint`` (moto): read directly, and
    the connector's settings that reach it through ``proxy``."""
    bucket = make_bucket(endpoint)
    direct = S3Storage(**storage_settings(endpoint, bucket))
    settings = {
        "ARCHIVE_URI": f"s3://{bucket}/archive",
        "S3_ENDPOINT_URL": proxy.url,
        "S3_ACCESS_KEY_ID": ACCESS_KEY,
        "S3_SECRET_ACCESS_KEY": SECRET_KEY,
        "S3_REGION": REGION,
        "S3_PATH_STYLE": "true",
    }
    return direct, settings


def test_s3_faults_through_the_proxy_lose_nothing(
    moto_server: str,  # noqa: F811 - fixture
    fault_proxy: FaultProxy,  # noqa: F811 - fixture
    tmp_path: Path,
) -> None:
    """10% 5xx, 2% connection resets, 1% slow answers on every S3 request of the connector."""
    store = SimStore()
    generate(store, 300, seed=31)
    direct, s3 = _s3_behind(moto_server, fault_proxy)
    fault_proxy.configure(
        error_rate_5xx=0.10, reset_rate=0.02, slow_rate=0.01, slow_secs=0.3, seed=31
    )
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        env = base_env(
            sim.url,
            TOKEN,
            s3["ARCHIVE_URI"],
            CONNECTOR_LIVE_STREAM_ID="raw",
            ARCHIVE_MAX_EVENTS="40",
            **s3,
        )
        run = ConnectorThread(env).start()
        follow(direct, store, "backlog through S3 faults")
        # A write that lands while its answer is lost: the retry must find it, not duplicate it.
        fault_proxy.fail_next(3, "reset_after_forward", method="PUT")
        generate(store, 200, seed=32)
        follow(direct, store, "live edits through S3 faults")
        run.stop()
        assert run.error is None and run.rc == 0
        assert_nothing_lost(sim.url, direct)
    injected = sum(fault_proxy.stats[k] for k in ("500", "503", "reset", "reset_after_read"))
    assert injected >= 3 and fault_proxy.stats["reset_after_forward"] >= 3
    assert_restore_equals_platform(direct, store, tmp_path / "restore")


def test_a_transient_failure_reading_the_checkpoint_at_start_up_is_retried(
    moto_server: str,  # noqa: F811 - fixture
    fault_proxy: FaultProxy,  # noqa: F811 - fixture
) -> None:
    """The checkpoint's read at start-up failing for longer than botocore's own tries: `run`
    retries it with its backoff and goes on (it exited 1 on it before session 21)."""
    store = SimStore()
    generate(store, 40, seed=43)
    direct, s3 = _s3_behind(moto_server, fault_proxy)
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        env = base_env(
            sim.url,
            TOKEN,
            s3["ARCHIVE_URI"],
            CONNECTOR_LIVE_STREAM_ID="raw",
            CONNECTOR_BACKOFF_MAX_SECS="0.2",
            **s3,
        )
        run = ConnectorThread(env).start()
        follow(direct, store, "the first run")
        run.stop()
        assert run.error is None and run.rc == 0
        retried = metrics.REGISTRY.get_sample_value(
            "opencti_sync_retries_total", {"stage": "starting", "kind": "RetryableError"}
        )
        # Two start-up tries, each through botocore's three attempts.
        fault_proxy.fail_next(6, "503", method="GET", path=CHECKPOINT_KEY)
        generate(store, 20, seed=44)
        run = ConnectorThread(env).start()
        follow(direct, store, "the run started through the failed reads")
        run.stop()
        assert run.error is None and run.rc == 0
        assert fault_proxy.stats["503"] == 6
        after = metrics.REGISTRY.get_sample_value(
            "opencti_sync_retries_total", {"stage": "starting", "kind": "RetryableError"}
        )
        assert (after or 0) - (retried or 0) == 2
        assert_nothing_lost(sim.url, direct)


def test_a_frozen_s3_endpoint_is_reported_while_the_write_waits(
    moto_server: str,  # noqa: F811 - fixture
    fault_proxy: FaultProxy,  # noqa: F811 - fixture
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An endpoint that stops answering holds a write until the client's timeouts and retries
    give up (minutes for S3): the log says where the run waits meanwhile, not only after."""
    monkeypatch.setattr(watchdog, "SLOW_SECS", 0.5)  # 30 s in a real run
    caplog.set_level(logging.INFO, logger="connector")
    store = SimStore()
    generate(store, 60, seed=41)
    direct, s3 = _s3_behind(moto_server, fault_proxy)
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        env = base_env(sim.url, TOKEN, s3["ARCHIVE_URI"], **s3)
        run = ConnectorThread(env).start()
        follow(direct, store, "the backlog")
        # Every request now waits 4 s: frozen, as a 0.5 s watchdog sees it.
        fault_proxy.configure(slow_rate=1.0, slow_secs=4)
        generate(store, 20, seed=42)

        def waiting() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.getMessage() == "Still waiting for an answer."]

        wait_until(lambda: waiting(), timeout=30, what="the warning")
        record = waiting()[0]
        assert getattr(record, "stage", None) in ("sending", "checkpointing")
        assert getattr(record, "waiting_secs", -1) >= 0
        assert not any(r.getMessage() == "Write failed; retrying." for r in caplog.records)
        fault_proxy.clear()
        follow(direct, store, "after the freeze")
        run.stop()
        assert run.error is None and run.rc == 0


class FullDisk(LocalStorage):
    """A local archive whose disk can be made full: writes fail with ENOSPC, as the kernel's.

    The error goes through LocalStorage's own translation, so the connector sees exactly what a
    full disk gives it. Used where a tmpfs cannot be mounted (not root).
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.full = threading.Event()

    def _write_tmp(self, path: Path, body: bytes) -> Path:
        if self.full.is_set():
            from connector.storage import local

            err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            raise local._translate(err, path) from err
        return super()._write_tmp(path, body)


def test_full_disk_stops_cleanly_and_resumes(
    sim: SimServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """ENOSPC: a clear error, the checkpoint stays, the backup resumes when space is back."""
    generate(sim.store, 100, seed=41)
    storage = FullDisk(tmp_path / "a")
    stop = threading.Event()
    source = SseSource(
        SourceConfig(
            url=sim.url, token=TOKEN, stream_id="raw", backoff_initial=0.05, backoff_max=0.5
        ),
        resume=None,
    )
    pipeline = Pipeline(
        source=source,
        sinks=[ArchiveSink(storage)],
        store=CheckpointStore(storage),
        checkpoint=Checkpoint(stream_id="raw", source_url=sim.url),
        policy=BatchPolicy(max_age_secs=0.2),
        stop=stop,
        backoff_initial=0.05,
        backoff_max=0.3,
    )
    thread, errors = start_pipeline(pipeline)
    follow(storage, sim.store, "first backlog")
    retries = metric("opencti_sync_retries_total", {"stage": "sending", "kind": "RetryableError"})
    storage.full.set()
    generate(sim.store, 50, seed=42)

    def failed(n: int) -> bool:
        sending = {"stage": "sending", "kind": "RetryableError"}
        return metric("opencti_sync_retries_total", sending) >= retries + n

    # Read once a write failed: until then an idle heartbeat could still save a new position.
    wait_until(lambda: failed(1), what="a write on the full disk")
    before = checkpoint_id(storage)
    wait_until(lambda: failed(4), what="retries on the full disk")
    assert checkpoint_id(storage) == before, "the checkpoint moved although nothing was written"
    assert thread.is_alive() and not errors
    full = [r for r in caplog.records if r.getMessage() == "Write failed; retrying."]
    assert full and "No space left on device" in str(full[-1].__dict__.get("error"))
    storage.full.clear()
    follow(storage, sim.store, "resume once space is back")
    stop.set()
    thread.join(30)
    assert not errors
    assert_nothing_lost(sim.url, storage)


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def test_full_tmpfs_with_the_real_connector(sim: SimServer, tmp_path: Path) -> None:
    """The same on a real full filesystem (a 4 MB tmpfs; needs root to mount it)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("cannot mount a tmpfs here (not root); see the FullDisk variant")
    try:
        generate(sim.store, 100, seed=43)
        archive = str(disk / "a")
        storage = LocalStorage(archive)
        env = base_env(sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_ID="raw")
        run = ConnectorThread(env).start()
        follow(storage, sim.store, "first backlog")
        before = checkpoint_id(storage)
        filler = disk / "filler"
        with open(filler, "wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        retries = metric(
            "opencti_sync_retries_total", {"stage": "sending", "kind": "RetryableError"}
        )
        generate(sim.store, 200, seed=44)
        wait_until(
            lambda: (
                metric("opencti_sync_retries_total", {"stage": "sending", "kind": "RetryableError"})
                >= retries + 3
            ),
            what="retries on the full tmpfs",
        )
        assert checkpoint_id(storage) == before
        assert run.alive and run.error is None
        filler.unlink()
        follow(storage, sim.store, "resume once space is back")
        run.stop()
        assert run.error is None and run.rc == 0
        assert_nothing_lost(sim.url, storage)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ---------------------------------------------------------------------- 4. retention
def _reconciled(storage: Storage) -> bool:
    cp = CheckpointStore(storage).load()
    return cp is not None and bool(cp.reconcile) and not cp.reconcile.get("due")


@pytest.fixture(
    params=[("live", None), ("raw", None), ("live", 2)], ids=["live", "raw", "live-groups-of-2"]
)
def trimmed_while_down(
    sim: SimServer, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Backup, stop; edits (a delete and a merge among them), the platform trims its stream;
    backup again. The raw stream cannot recover: only the reconciliation repairs it. With a
    group size, the reconciliation's events are written that many at a time."""
    stream, group_events = request.param
    if group_events is not None:
        monkeypatch.setattr(reconcile, "GROUP_EVENTS", group_events)
    generate(sim.store, 150, seed=61)
    absorbed, kept, uses = merge_to_come(sim.store, "61")
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    work = tmp_path / "work"
    env = base_env(
        sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_ID=stream, OPENCTI_SYNC_WORK_DIR=str(work)
    )
    run = ConnectorThread(env).start()
    follow(storage, sim.store, "first run")
    run.stop()
    objects = list(sim.store.objects())
    victim = next(o for o in objects if o["type"] == "malware")
    deleted = next(o for o in objects if o["type"] == "indicator")
    sim.store.update(victim["id"], set={"description": "changed while down"})
    sim.store.delete(deleted["id"])
    # The relationship follows the merge silently: its only trace is the trimmed merge event.
    sim.store.merge(kept, [absorbed])
    generate(sim.store, 60, seed=62)
    sim.store.trim(5)
    run = ConnectorThread(env).start()
    follow(storage, sim.store, "repair")
    wait_until(lambda: _reconciled(storage), what="delete reconciliation")
    run.stop()
    assert run.error is None
    # The materialised state and the listing are gone with the reconciliation.
    assert not list(work.glob("reconcile-*"))
    return {
        "storage": storage,
        "store": sim.store,
        "deleted": deleted["id"],
        "merged": (absorbed, kept, uses),
        "work": tmp_path,
        "group_events": group_events,
    }


def test_retention_gap_detected_and_changes_recovered(trimmed_while_down: dict[str, Any]) -> None:
    t = trimmed_while_down
    cp = CheckpointStore(t["storage"]).load()
    assert cp is not None and len(cp.retention_gaps) == 1
    assert cp.reconcile is not None and cp.reconcile["deleted"] >= 1
    # Its events: groups of their own, just below the idle position it ran at, where the
    # checkpoint is; never more events in a group than the group size.
    done_at = EventId.parse(cp.reconcile["done_at_event_id"])
    groups: dict[str, int] = {}
    kinds: dict[str, int] = {"create": 0, "delete": 0, "merged": 0}
    for ev in ArchiveReader(t["storage"]).events():
        if (ev.envelope.get("origin") or {}).get("referer") == reconcile.REFERER:
            groups[ev.id_text] = groups.get(ev.id_text, 0) + 1
            if ev.event == "merge":
                kinds["merged"] += len(ev.envelope["context"]["sources"])
            else:
                kinds[ev.event] += 1
    rec = cp.reconcile
    assert kinds == {"create": rec["refreshed"], "delete": rec["deleted"], "merged": rec["merged"]}
    assert list(groups) == [str(reconcile.reconcile_group(done_at, i)) for i in range(len(groups))]
    assert EventId.parse(cp.last_event_id) >= done_at
    if t["group_events"] is not None:
        assert len(groups) >= 2 and max(groups.values()) <= t["group_events"]
    restored = restored_bundle(t["storage"], t["work"] / "r1")
    platform = t["store"].dump_bundle()
    # Everything that exists on the platform is restored, at its current version ...
    mine = {str(o["id"]): o for o in restored["objects"]}
    missing = [o["id"] for o in platform["objects"] if o["id"] not in mine]
    assert not missing
    assert_same_state(platform, {"objects": [mine[str(o["id"])] for o in platform["objects"]]})


def test_retention_gap_repairs_deletes_in_the_lost_window(
    trimmed_while_down: dict[str, Any],
) -> None:
    """The pass line: the restored state is the platform's, deletes of the lost window too."""
    t = trimmed_while_down
    restored = restored_bundle(t["storage"], t["work"] / "r2")
    by_id = {o["id"]: o for o in restored["objects"]}
    assert t["deleted"] not in by_id
    # Merged away in the lost window: gone, and what referred to it points at the merge target
    # (a delete would have taken the relationship with it).
    absorbed, kept, uses = t["merged"]
    assert absorbed not in by_id
    assert by_id[uses]["target_ref"] == kept
    cp = CheckpointStore(t["storage"]).load()
    assert cp is not None and cp.reconcile is not None and cp.reconcile["merged"] >= 1
    assert_restore_equals_platform(t["storage"], t["store"], t["work"] / "r3")


def test_stopped_between_reconciliation_groups_resumes_exactly(
    sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the disk refuses the reconciliation's second group: the checkpoint stays
    before it, and the next run reconciles again against the archive with the first group in
    it. Nothing is lost or stored twice, the restore equals the platform, verify is clean."""
    from connector.verify import format_report, verify_archive

    generate(sim.store, 150, seed=63)
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    work = tmp_path / "work"
    env = base_env(sim.url, TOKEN, archive, OPENCTI_SYNC_WORK_DIR=str(work))
    run = ConnectorThread(env).start()
    follow(storage, sim.store, "first run")
    run.stop()
    objects = list(sim.store.objects())
    for o in [o for o in objects if o["type"] == "malware"][:3]:
        sim.store.update(o["id"], set={"description": "changed while down"})
    for o in [o for o in objects if o["type"] == "indicator"][:3]:
        sim.store.delete(o["id"])
    generate(sim.store, 40, seed=64)
    sim.store.trim(5)
    monkeypatch.setattr(reconcile, "GROUP_EVENTS", 2)
    written: list[str] = []
    refused: list[str] = []
    put = LocalStorage.put_if_absent

    def full_after_one_group(self: LocalStorage, key: str, body: bytes) -> bool:
        # The disk fills up once one reconciliation group is stored: the next one is refused.
        if key.startswith("events/") and key.endswith(".zst"):
            if written:
                refused.append(key)
                err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), key)
                raise local_storage._translate(err, self.root / key) from err
            if reconcile.REFERER.encode() in _segment_bytes(body):
                written.append(key)
        return put(self, key, body)

    monkeypatch.setattr(LocalStorage, "put_if_absent", full_after_one_group)
    env = {**env, "CONNECTOR_SHUTDOWN_TIMEOUT_SECS": "1"}
    run = ConnectorThread(env).start()
    wait_until(lambda: len(refused) >= 3, timeout=90, what="the second group refused")
    run.stop()
    assert isinstance(run.error, ShutdownTimeout), run.error
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.reconcile is not None and cp.reconcile["due"] is True
    assert len(written) == 1
    monkeypatch.setattr(LocalStorage, "put_if_absent", put)  # disk space is back
    run = ConnectorThread(env).start()
    wait_until(lambda: _reconciled(storage), what="delete reconciliation")
    follow(storage, sim.store, "after the reconciliation")
    run.stop()
    assert run.error is None
    assert not list(work.glob("reconcile-*"))
    report = verify_archive(storage, work_dir=tmp_path / "verify")
    assert report.ok, format_report(report)
    assert_restore_equals_platform(storage, sim.store, tmp_path / "r")


def _segment_bytes(body: bytes) -> bytes:
    """A segment's lines (zstd frames, one per slice)."""
    with zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True) as reader:
        return reader.read()


# ---------------------------------------------------------------------- 5. target faults
TARGET_TOKEN = "fault-suite-target-token"
SENDING = {"stage": "sending", "kind": "RetryableError"}


def _target_env(sim_url: str, archive: str, target_url: str) -> dict[str, str]:
    return base_env(
        sim_url,
        TOKEN,
        archive,
        CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE="1970-01-01T00:00:00.000Z",
        TARGET_OPENCTI_URL=target_url,
        TARGET_OPENCTI_TOKEN=TARGET_TOKEN,
        TARGET_SYNCHRONIZED="true",
        # These faults are about the API push path; the AMQP path has its own in test_target_amqp.
        TARGET_TRANSPORT="api",
    )


def _target_platform() -> SimServer:
    b = SimServer(token=TARGET_TOKEN, heartbeat_secs=0.2).start()
    # A platform variant whose workers honour the synchronized-upsert header (perfect sync).
    b.store.platform_forward_headers = True  # type: ignore[attr-defined]
    return b


def test_target_down_slow_and_flaky_converges(sim: SimServer, tmp_path: Path) -> None:
    """The target goes away for a while, then answers slowly with 5xx and resets: every event
    is retried (visible in metrics), none skipped, and the target converges on the source."""
    generate(sim.store, 120, seed=71, mix="creates")
    b = _target_platform()
    proxy = FaultProxy(b.url, seed=71).start()
    try:
        storage = LocalStorage(tmp_path / "a")
        run = ConnectorThread(_target_env(sim.url, str(tmp_path / "a"), proxy.url)).start()
        follow(storage, sim.store, "first sync")
        # Down: the archive has the events, but the checkpoint waits for the target.
        b.stop()
        retries = metric("opencti_sync_retries_total", SENDING)
        for oid in [o["id"] for o in sim.store.objects() if o["type"] == "malware"][:5]:
            sim.store.update(oid, set={"description": "edited while the target is down"})
        # Read once a write failed: until the edits came, idle heartbeats could move it.
        wait_until(lambda: metric("opencti_sync_retries_total", SENDING) >= retries + 1)
        before = checkpoint_id(storage)
        wait_until(lambda: metric("opencti_sync_retries_total", SENDING) >= retries + 4)
        assert checkpoint_id(storage) == before
        b.start()  # same port, same data: the platform is back
        follow(storage, sim.store, "target back")
        # Slow acknowledgements and flaky answers.
        proxy.configure(error_rate_5xx=0.10, reset_rate=0.02, slow_rate=0.30, slow_secs=0.3)
        proxy.fail_next(2, "500", method="POST")
        proxy.fail_next(1, "reset_after_forward", method="POST")  # applied, answer lost
        # One slow answer for sure: what the random rates draw depends on how many requests a
        # batch makes (the few batches of 60 events can draw none).
        proxy.fail_next(1, "slow", method="POST")
        after_down = metric("opencti_sync_retries_total", SENDING)
        generate(sim.store, 60, seed=72, mix="creates")
        follow(storage, sim.store, "through a slow, flaky target")
        run.stop()
        assert run.error is None and run.rc == 0
        assert metric("opencti_sync_retries_total", SENDING) >= after_down + 3
        assert proxy.stats["slow"] > 0 and proxy.stats["500"] >= 2
        assert_same_state(sim.store.dump_bundle(), b.store.dump_bundle())
    finally:
        proxy.stop()
        b.stop()


def test_a_lost_checkpoint_resumed_from_the_archive_gives_the_target_its_last_batch(
    sim: SimServer, tmp_path: Path
) -> None:
    """The target went away after the archive stored a batch of edits; the run was stopped and
    its checkpoint lost. ``run --resume-from-archive`` goes on after the archive's end: the
    target, which never took that batch, gets it from the archive, and the checkpoint is saved
    only then."""
    generate(sim.store, 60, seed=73, mix="creates")
    b = _target_platform()
    proxy = FaultProxy(b.url, seed=73).start()
    try:
        storage = LocalStorage(tmp_path / "a")
        env = {
            **_target_env(sim.url, str(tmp_path / "a"), proxy.url),
            "CONNECTOR_SHUTDOWN_TIMEOUT_SECS": "1",
        }
        run = ConnectorThread(env).start()
        follow(storage, sim.store, "first sync")
        b.stop()
        for oid in [o["id"] for o in sim.store.objects() if o["type"] == "malware"][:5]:
            sim.store.update(oid, set={"description": "edited while the target is down"})
        last = EventId.parse(sim.store.last_event_id or "0-0")

        def archived() -> bool:
            newest = ArchiveReader(storage).newest()
            return newest is not None and newest.last >= last

        # In the archive, not on the target: the checkpoint waits for it.
        wait_until(archived, what="the edits archived")
        time.sleep(1)  # a few of the target's retries
        assert not caught_up(storage, str(last))
        run.stop()
        (tmp_path / "a" / CHECKPOINT_KEY).unlink()
        # Resumed while the target is still down: stopped before it took the segment, the run
        # leaves no checkpoint behind, so the next --resume-from-archive delivers it again.
        run = ConnectorThread(env, resume_from_archive=True).start()
        time.sleep(1.5)
        run.stop()
        assert CheckpointStore(storage).load() is None
        b.start()  # the platform is back, without the edits
        assert sim.store.dump_bundle() != b.store.dump_bundle()

        run = ConnectorThread(env, resume_from_archive=True).start()
        follow(storage, sim.store, "resumed from the archive")
        run.stop()
        assert run.error is None and run.rc == 0
        assert_same_state(sim.store.dump_bundle(), b.store.dump_bundle())
    finally:
        proxy.stop()
        b.stop()


@contextlib.contextmanager
def _rejecting_proxy(upstream: str, reject_id: str) -> Iterator[tuple[str, list[bytes]]]:
    """In front of the target: a push naming ``reject_id`` gets the platform's validation error
    (HTTP 200 + ``errors[]``, as the real platform answers); everything else is forwarded.
    Yields the proxy's URL and the list of the pushes it refused."""
    rejected: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            return

        def do_POST(self) -> None:  # noqa: N802 - stdlib naming
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if b"stixBundlePush" in body and reject_id.encode() in body:
                rejected.append(body)
                answer = orjson.dumps(
                    {
                        "errors": [
                            {
                                "message": "Validation error",
                                "name": "VALIDATION_ERROR",
                                "extensions": {
                                    "code": "VALIDATION_ERROR",
                                    "data": {"reason": "name is too long", "id": reject_id},
                                },
                            }
                        ],
                        "data": None,
                    }
                )
                status = 200
            else:
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                resp = httpx.post(upstream + self.path, content=body, headers=headers)
                answer, status = resp.content, resp.status_code
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

    with serving(Handler) as url:
        yield url, rejected


def test_target_rejecting_an_object_quarantines_it_and_goes_on(
    sim: SimServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connector")
    generate(sim.store, 30, seed=73, mix="creates")
    b = _target_platform()
    bad = "malware--0000dead-0000-4000-8000-000000000000"
    try:
        with _rejecting_proxy(b.url, bad) as (proxy_url, rejected):
            storage = LocalStorage(tmp_path / "a")
            run = ConnectorThread(_target_env(sim.url, str(tmp_path / "a"), proxy_url)).start()
            follow(storage, sim.store, "first sync")
            wait_until(
                lambda: batch_counted(storage, caplog.records), what="the first sync counted"
            )
            quarantined = metric("opencti_sync_quarantined_events_total")
            on_target = {"sink": "opencti", "event": "create"}
            written = metric("opencti_sync_events_written_total", on_target)
            cp0 = CheckpointStore(storage).load()
            assert cp0 is not None
            malware = {"type": "malware", "spec_version": "2.1", "is_family": True}
            sim.store.create({**malware, "id": bad, "name": "Rejected"})
            good = "malware--0000beef-0000-4000-8000-000000000000"
            sim.store.create({**malware, "id": good, "name": "After"})
            wait_until(
                lambda: not run.alive or caught_up(storage, sim.store.last_event_id or "0-0"),
                what="the sync to pass the rejected object or stop",
            )
            assert rejected
            assert run.alive and run.error is None, f"the sync stopped: {run.error}"
            assert b.store.get(good) is not None  # the stream went on
            wait_until(
                lambda: batch_counted(storage, caplog.records), what="the last batch counted"
            )
            assert metric("opencti_sync_quarantined_events_total") - quarantined == 1
            # What the target refused is not counted as written to it.
            assert metric("opencti_sync_events_written_total", on_target) - written == 1
            reasons = [orjson.loads(storage.get(k))["reason"] for k in storage.list("quarantine/")]
            assert any("name is too long" in r for r in reasons)
            run.stop()
            # The rejection records are a write of their own: the batch still counts as archived.
            refs = list(ArchiveReader(storage).manifests())
            cp = CheckpointStore(storage).load()
            assert cp is not None
            assert cp.quarantined - cp0.quarantined == 1
            assert cp.events_archived == sum(r.manifest.event_count for r in refs)
            assert cp.segments_written == len(refs)
            assert cp.last_segment == refs[-1].manifest.segment
    finally:
        b.stop()


_RENAMED = "malware--00000000-0000-4000-8000-0000000000f2"
_OLD_ID = "malware--00000000-0000-4000-8000-0000000000f1"
_USER = "intrusion-set--00000000-0000-4000-8000-0000000000f3"
_USES = "relationship--00000000-0000-4000-8000-0000000000f4"


def _renamed_then_reused(store: SimStore, *, before: bool) -> None:
    """Before: malware under _OLD_ID renamed to _RENAMED (the old id stays its alias). After
    (the lost window): it is deleted, a new malware takes the old id and is used."""
    if before:
        generate(store, 30, seed=3, mix="creates")
        store.create({"type": "malware", "id": _OLD_ID, "name": "Foo", "is_family": True})
        store.create({"type": "intrusion-set", "id": _USER, "name": "user"})
        store.update(_OLD_ID, new_id=_RENAMED)
        return
    store.delete(_RENAMED)
    store.create({"type": "malware", "id": _OLD_ID, "name": "Foo again", "is_family": True})
    store.create(
        {
            "type": "relationship",
            "id": _USES,
            "relationship_type": "uses",
            "source_ref": _USER,
            "target_ref": _OLD_ID,
        }
    )
    generate(store, 10, seed=4, mix="creates")
    store.trim(3)


@pytest.mark.parametrize("stream", ["live", "raw"])
def test_reconciled_delete_spares_what_took_its_old_id(
    sim: SimServer, tmp_path: Path, stream: str
) -> None:
    """The delete of an object renamed before the gap must not cascade over what took its old
    id in the lost window: the reconciliation writes its deletes before its refreshes."""
    _renamed_then_reused(sim.store, before=True)
    storage = LocalStorage(tmp_path / "a")
    env = base_env(
        sim.url,
        TOKEN,
        str(storage.root),
        CONNECTOR_LIVE_STREAM_ID=stream,
        OPENCTI_SYNC_WORK_DIR=str(tmp_path / "w"),
    )
    _synced_then_down(sim, env, storage)
    _renamed_then_reused(sim.store, before=False)
    _reconciled_run(sim, env, storage)
    assert_restore_equals_platform(storage, sim.store, tmp_path / "r")


# The reconciliation after a retention gap, through a target: a raw stream cannot recover, so
# the reconciliation alone brings the lost window to both sinks.
def _raw_target_env(sim_url: str, tmp_path: Path, target_url: str) -> dict[str, str]:
    env = _target_env(sim_url, str(tmp_path / "a"), target_url)
    env.pop("CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE")
    return {**env, "CONNECTOR_LIVE_STREAM_ID": "raw", "OPENCTI_SYNC_WORK_DIR": str(tmp_path / "w")}


def _work(tmp_path: Path) -> dict[str, str]:
    return {"OPENCTI_SYNC_WORK_DIR": str(tmp_path / "w")}


def _synced_then_down(sim: SimServer, env: dict[str, str], storage: Storage) -> None:
    run = ConnectorThread(env).start()
    follow(storage, sim.store, "first sync")
    run.stop()
    assert run.error is None


def _reconciled_run(sim: SimServer, env: dict[str, str], storage: Storage) -> None:
    run = ConnectorThread(env).start()
    follow(storage, sim.store, "repair")
    wait_until(lambda: _reconciled(storage), what="delete reconciliation")
    run.stop()
    assert run.error is None, run.error


@pytest.mark.parametrize("group_events", [None, 1])
def test_target_equals_the_platform_after_a_reconciliation_in_groups(
    sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group_events: int | None
) -> None:
    """A new entity absorbed an old one in the lost window: the reconciliation refreshes it
    (carrying the old one's id) and merges the old one into it. Cut into groups of one, the
    merge still comes in the same batch as the refresh, or the target would take the refreshed
    entity for the old one."""
    if group_events is not None:
        monkeypatch.setattr(reconcile, "GROUP_EVENTS", group_events)
    generate(sim.store, 60, seed=61, mix="creates")
    old = "malware--00000000-0000-4000-8000-000000000711"
    user = "intrusion-set--00000000-0000-4000-8000-000000000713"
    sim.store.create({"type": "malware", "id": old, "name": "old source", "is_family": True})
    sim.store.create({"type": "intrusion-set", "id": user, "name": "user"})
    sim.store.create(
        {
            "type": "relationship",
            "id": "relationship--00000000-0000-4000-8000-000000000714",
            "relationship_type": "uses",
            "source_ref": user,
            "target_ref": old,
        }
    )
    b = _target_platform()
    try:
        env = _raw_target_env(sim.url, tmp_path, b.url)
        storage = LocalStorage(tmp_path / "a")
        _synced_then_down(sim, env, storage)
        new = "malware--00000000-0000-4000-8000-000000000712"
        sim.store.create({"type": "malware", "id": new, "name": "new target", "is_family": True})
        sim.store.merge(new, [old])
        generate(sim.store, 10, seed=62, mix="creates")
        sim.store.trim(3)
        _reconciled_run(sim, env, storage)
        assert_same_state(sim.store.dump_bundle(), b.store.dump_bundle())
    finally:
        b.stop()


@pytest.mark.parametrize("stream", ["raw", "live"])
def test_target_gets_what_only_the_archive_got_before_a_gap(
    sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stream: str
) -> None:
    """A delete the archive stored while the target refused it (stopped before the checkpoint),
    then a retention gap: the stream no longer re-sends it, so the reconciliation compares the
    platform with what every sink had acknowledged too, and the target gets it."""
    generate(sim.store, 30, seed=5, mix="creates")
    b = _target_platform()
    try:
        env = _raw_target_env(sim.url, tmp_path, b.url)
        if stream == "live":
            env = {**_target_env(sim.url, str(tmp_path / "a"), b.url), **_work(tmp_path)}
        env["CONNECTOR_SHUTDOWN_TIMEOUT_SECS"] = "1"
        storage = LocalStorage(tmp_path / "a")
        _synced_then_down(sim, env, storage)
        doomed = next(o["id"] for o in sim.store.objects() if o["type"] == "malware")
        write = OpenCTITarget.write
        refused: list[EventId] = []

        def down(self: OpenCTITarget, batch: Batch) -> None:
            if batch.events:
                refused.append(batch.first_id)
                raise RetryableError("target unavailable")
            write(self, batch)

        monkeypatch.setattr(OpenCTITarget, "write", down)
        sim.store.delete(doomed)
        run = ConnectorThread(env).start()
        wait_until(lambda: len(refused) >= 1, what="the delete refused by the target")
        run.stop()
        assert isinstance(run.error, ShutdownTimeout), run.error
        monkeypatch.setattr(OpenCTITarget, "write", write)
        assert b.store.get(doomed) is not None
        generate(sim.store, 10, seed=6, mix="creates")
        sim.store.trim(3)
        _reconciled_run(sim, env, storage)
        assert_restore_equals_platform(storage, sim.store, tmp_path / "r")
        assert b.store.get(doomed) is None, "the delete never reached the target"
        assert_same_state(sim.store.dump_bundle(), b.store.dump_bundle())
    finally:
        b.stop()


def test_target_refusing_a_reconciled_object_quarantines_it(sim: SimServer, tmp_path: Path) -> None:
    """An object only the reconciliation sends, refused by the target: quarantined with the
    platform's reason, as a live one is."""
    generate(sim.store, 30, seed=73, mix="creates")
    b = _target_platform()
    bad = "malware--0000dead-0000-4000-8000-000000000000"
    try:
        with _rejecting_proxy(b.url, bad) as (proxy_url, rejected):
            env = _raw_target_env(sim.url, tmp_path, proxy_url)
            storage = LocalStorage(tmp_path / "a")
            _synced_then_down(sim, env, storage)
            quarantined = metric("opencti_sync_quarantined_events_total")
            malware = {"type": "malware", "spec_version": "2.1", "is_family": True}
            sim.store.create({**malware, "id": bad, "name": "Rejected"})
            generate(sim.store, 10, seed=74, mix="creates")
            sim.store.trim(3)  # its create is gone from the stream: only the reconciliation has it
            _reconciled_run(sim, env, storage)
            assert rejected
            assert metric("opencti_sync_quarantined_events_total") > quarantined
            reasons = [orjson.loads(storage.get(k))["reason"] for k in storage.list("quarantine/")]
            assert any("name is too long" in r for r in reasons)
    finally:
        b.stop()


def test_target_down_during_a_reconciliation_converges(
    sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the target refuses the reconciliation (the archive has stored it): the next
    run reconciles from the checkpoint's state again, so the target gets every change of the
    lost window, deletes included."""
    generate(sim.store, 40, seed=81, mix="creates")
    b = _target_platform()
    try:
        env = {**_raw_target_env(sim.url, tmp_path, b.url), "CONNECTOR_SHUTDOWN_TIMEOUT_SECS": "1"}
        storage = LocalStorage(tmp_path / "a")
        _synced_then_down(sim, env, storage)
        doomed = [o["id"] for o in sim.store.objects() if o["type"] == "indicator"][:3]
        for stix_id in doomed:
            sim.store.delete(stix_id)
        generate(sim.store, 5, seed=82, mix="creates")
        sim.store.trim(2)
        write = OpenCTITarget.write
        refused: list[EventId] = []

        def down_for_the_reconciliation(self: OpenCTITarget, batch: Batch) -> None:
            if any(
                (ev.envelope.get("origin") or {}).get("referer") == reconcile.REFERER
                for ev in batch.events
            ):
                refused.append(batch.first_id)
                raise RetryableError("target unavailable")
            write(self, batch)

        monkeypatch.setattr(OpenCTITarget, "write", down_for_the_reconciliation)
        run = ConnectorThread(env).start()
        wait_until(lambda: len(refused) >= 2, what="the reconciliation refused by the target")
        run.stop()
        assert isinstance(run.error, ShutdownTimeout), run.error
        monkeypatch.setattr(OpenCTITarget, "write", write)
        _reconciled_run(sim, env, storage)
        assert [d for d in doomed if b.store.get(d) is not None] == []
        assert_same_state(sim.store.dump_bundle(), b.store.dump_bundle())
        assert_restore_equals_platform(storage, sim.store, tmp_path / "r")
    finally:
        b.stop()


def test_target_only_sync_says_it_cannot_reconcile_a_gap(sim: SimServer, tmp_path: Path) -> None:
    """Without an archive there is nothing to compare the platform with (the target's own
    listing holds objects the source never sent): a retention gap is repaired by the recovery,
    and the checkpoint (``status``) says why its deletes cannot be reconciled."""
    generate(sim.store, 30, seed=91, mix="creates")
    b = _target_platform()
    try:
        state = LocalStorage(tmp_path / "state")
        env = {**_target_env(sim.url, "", b.url), "CHECKPOINT_URI": str(state.root)}
        _synced_then_down(sim, env, state)
        doomed = next(o["id"] for o in sim.store.objects() if o["type"] == "malware")
        sim.store.delete(doomed)
        generate(sim.store, 10, seed=92, mix="creates")
        sim.store.trim(3)
        run = ConnectorThread(env).start()
        follow(state, sim.store, "repair")
        run.stop()
        assert run.error is None
        cp = CheckpointStore(state).load()
        assert cp is not None and len(cp.retention_gaps) == 1 and cp.reconcile is not None
        assert cp.reconcile["due"] is False and "ARCHIVE_URI" in cp.reconcile["failed"]
        assert b.store.get(doomed) is not None  # as said: the delete did not reach the target
    finally:
        b.stop()


# ---------------------------------------------------------------------- 6. clean shutdown
def test_sigterm_under_load_drains_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM while events pour in and a batch is open: drain, checkpoint, exit 0."""
    store = SimStore()
    generate(store, 2000, seed=81)
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        archive = str(tmp_path / "a")
        storage = LocalStorage(archive)
        env = base_env(
            sim.url,
            TOKEN,
            archive,
            CONNECTOR_LIVE_STREAM_ID="raw",
            ARCHIVE_MAX_AGE_SECS="60",  # the open batch is flushed only by the drain
            ARCHIVE_MAX_EVENTS="100000",
            ARCHIVE_MAX_BYTES=str(1 << 30),
            CONNECTOR_SHUTDOWN_TIMEOUT_SECS="10",
        )
        log = tmp_path / "run.log"
        proc = ConnectorProcess(env, log)
        stop = threading.Event()
        editor = threading.Thread(target=_edit_while, args=(store, stop, 82), daemon=True)
        editor.start()
        wait_until(lambda: b"Following the stream." in log.read_bytes(), what="start")
        time.sleep(1.0)  # let it read a good part of the backlog into the open batch
        # Bounded by the configured shutdown timeout (10 s) plus process start-up margin.
        rc = proc.terminate(timeout=40)
        stop.set()
        editor.join()
        assert rc == 0, log.read_text()[-2000:]
        text = log.read_text()
        assert "Stop requested; draining." in text and "Stream drained." in text
        # The open batch was written by the drain itself, after the signal.
        assert "Batch written." in text[text.index("Stop requested; draining.") :]
        drained = checkpoint_id(storage)
        assert drained is not None  # the open batch was written by the drain
        got = live_sequence(archived_events(storage))
        expected = [x for x in expected_sequence(sim.url) if EventId.parse(x[0]) <= drained]
        assert got == expected
        # A restart continues exactly after it.
        proc = ConnectorProcess({**env, "ARCHIVE_MAX_AGE_SECS": "0.3"}, log)
        last = store.last_event_id or "0-0"
        wait_until(lambda: caught_up(storage, last), timeout=90, what="restart catch-up")
        assert proc.terminate() == 0
        assert_nothing_lost(sim.url, storage)


def test_crash_between_segment_and_manifest_keeps_the_chain(tmp_path: Path) -> None:
    from connector.archive.layout import manifest_key
    from connector.sink import Batch
    from connector.verify import format_report, verify_archive

    store = SimStore()
    generate(store, 40, seed=99, mix="creates")
    events, _ = sim_events(store)
    storage = LocalStorage(tmp_path / "a")
    sink = ArchiveSink(storage)
    first, second = events[:20], events[20:]
    sink.write(Batch(first_id=first[0].id, last_id=first[-1].id, events=first))
    batch = Batch(
        first_id=second[0].id, last_id=second[-1].id, events=second, after_id=first[-1].id
    )
    sink.write(batch)
    # The process died after the segment was durable and before its manifest was written.
    storage.delete(manifest_key(second[0].id))
    ArchiveSink(storage).write(batch)  # the restart re-delivers the same batch
    report = verify_archive(storage, work_dir=tmp_path / "verify")
    assert report.ok, format_report(report)
