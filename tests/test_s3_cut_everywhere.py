"""An archive on S3 (moto's server, real boto3), cut at every request of a short run.

A clean run goes the way ``opencti-sync run`` does: the archive's check (its probe object), the
run lease (taken over from a dead run's, by compare-and-swap on its ETag), the checkpoint read,
the archive end's check, then the real pipeline (simulator over HTTP, the real ``SseSource``, an
``ArchiveSink`` on S3 that also holds the checkpoint, the lease checked before every write),
until it caught up; then the lease is released. Segments go up as multipart uploads (a small
``multipart_threshold``), and the lease is renewed at fixed points (every third guard call)
rather than by the clock, so that every run makes the same requests.

Every S3 request the storage makes (``S3Storage``'s own client, through botocore's event hooks:
each put-if-absent, replace-if, put, read, listing, delete, and each step of a multipart upload)
is recorded. Each case runs the same stream again from scratch, on a fresh bucket, and cuts it at
one request (``tests.support.cuts``): killed just before it or just after it returned (a fresh
run, with fresh storage, then goes on to the end), its answer lost after S3 applied it (a read
timeout: the run retries, and a retried conditional write finds its own object there), or
failing once before it was sent (cannot connect). As ``run`` does, the start-up reads (the
checkpoint, the archive's end) are retried while they fail for a transient reason.

Whatever the cut: every checkpoint saved was at or below what the archive held (read back from
S3), the archive ends holding every event of the stream once and in order, ``verify`` finds no
error, the lease is released (and a killed run's is taken over at once: its stand-in process is
gone), and a restore of the archive equals the simulator's state.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import random
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from connector.archive import ArchiveReader, ArchiveSink
from connector.archive.layout import EVENTS_PREFIX, manifest_key_for_segment
from connector.archive_position import check_archive_end
from connector.checkpoint import CHECKPOINT_KEY, Checkpoint, CheckpointStore
from connector.errors import ConnectorError
from connector.events import EventId
from connector.locks import LockHeld, LockRecord
from connector.pipeline import BatchPolicy, Pipeline, retry_call
from connector.run_lease import RUN_LEASE_KEY, RunLease, _Lease
from connector.sim.server import SimServer
from connector.source import SourceConfig, SseSource
from connector.storage.s3 import S3Storage
from connector.verify import verify_archive
from tests.support import s3
from tests.support.compare import assert_same_state
from tests.support.connector import start_pipeline, wait_until
from tests.support.cuts import (
    EVERYWHERE,
    KINDS,
    LONG,
    Killed,
    OneByOne,
    Plan,
    cut_history,
    malware_id,
)
from tests.support.s3 import make_bucket, moto_server, raw_client, storage_settings  # noqa: F401
from tests.support.simlog import sim_events
from tests.test_faults import restored_bundle

TOKEN = "s3-cut-token"
# The whole sweeps run longer than the suite's per-test timeout.
# Long enough for no renewal by the clock in a run; a standby's poll is a sixth of it (2 s).
LEASE_SECS = 12.0
# Segments (about 700 bytes and more) go up in a multipart upload; the records (lease,
# checkpoint) and most manifests in one PUT.
THRESHOLD = 600


def _label(operation: str, params: dict[str, Any]) -> str:
    """``<request> <what>``: the S3 operation (a PUT by its condition) and the kind of object."""
    key = str(params.get("Key") or params.get("Prefix") or "")
    key = key.removeprefix("archive/")
    if key == CHECKPOINT_KEY:
        what = "checkpoint"
    elif key == RUN_LEASE_KEY:
        what = "lease"
    elif key.startswith(".probe-"):
        what = "probe"
    elif "/" in key or operation == "ListObjectsV2":
        what = key.split("/")[0] or "all"
    else:
        what = key or "bucket"
    return f"{s3.s3_operation(operation, params)} {what}"


class Durable:
    """The checks made at every checkpoint save, across the runs of a case."""

    def __init__(self, settings: dict[str, Any], reference: list[tuple[str, str]]) -> None:
        self.settings = settings
        # The bucket as another client reads it (built once: a boto3 client takes a while).
        self.plain = S3Storage(**settings)
        self.reference = reference
        self.saved: list[str] = []

    def check_checkpoint(self, body: bytes, plan: Plan) -> None:
        """The checkpoint about to be saved is at or below what the archive holds on S3."""
        last = orjson.loads(body).get("last_event_id")
        if not last:
            return
        position = EventId.parse(last)
        archived = {e.id_text for e in ArchiveReader(self.plain).events()}
        covered = [i for i, _ in self.reference if EventId.parse(i) <= position]
        lacking = [i for i in covered if i not in archived]
        self.saved.append(last)
        assert not lacking, (
            f"checkpoint {last} saved past events not on S3: {lacking} (cut {plan.cut} {plan.how})"
        )


class CutS3Storage(s3.CutS3Storage):
    """Requests named by ``_label``; every checkpoint about to be saved checked (``Durable``)."""

    def __init__(self, plan: Plan, durable: Durable, **settings: Any) -> None:
        super().__init__(plan, **settings)
        self.durable = durable

    def label(self, operation: str, params: dict[str, Any]) -> str:
        return _label(operation, params)

    def _before_request(self, params: dict[str, Any], model: Any, context: Any, **_: Any) -> None:
        super()._before_request(params, model, context)
        if self.label(model.name, params) == "Put checkpoint":
            body = params["Body"]  # bytes, or botocore's BytesIO over them
            self.durable.check_checkpoint(
                body if isinstance(body, bytes) else body.getvalue(), self.plan
            )


class StandIn(_Lease):
    """The run lease as a run in process ``pid`` writes it: a stand-in child process that dies
    with the run, so that its record's holder is gone as a killed run's is."""

    def __init__(self, storage: S3Storage, pid: int) -> None:
        super().__init__(storage, LEASE_SECS, os.urandom(8).hex(), lambda: None)
        self.pid = pid

    def _record(self) -> LockRecord:
        return dataclasses.replace(super()._record(), pid=self.pid)

    def _renew_loop(self) -> None:
        """No renewal by the clock: ``CutLease.check`` renews at fixed points instead."""


class CutLease(RunLease):
    """The run's lease, renewed at every third guard call (not by the clock: the renewal
    thread's period is far beyond a run)."""

    def __init__(self, storage: S3Storage, pid: int) -> None:
        super().__init__([storage], LEASE_SECS)
        self._leases = [StandIn(storage, pid)]
        self.guards = 0

    def check(self) -> None:
        self.guards += 1
        if self.guards % 3 == 0:
            for lease in self._leases:
                try:
                    lease.renew()
                except LockHeld:
                    pass  # lost: said by the check below
        super().check()


def _dead_holder(storage: S3Storage) -> None:
    """A lease left by a run killed earlier (its process gone): the first run takes it over."""
    gone = subprocess.Popen(["sleep", "60"])
    gone.kill()
    gone.wait()
    assert storage.put_if_absent(RUN_LEASE_KEY, StandIn(storage, gone.pid)._record().to_json())


@pytest.fixture(scope="module")
def source() -> Iterator[SimServer]:
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        cut_history(sim.store)
        yield sim


@pytest.fixture(scope="module")
def big_source() -> Iterator[SimServer]:
    """The same stream with one more update, too large for one part: its segment goes up in
    two (S3's smallest part is 5 MiB; base64 of random bytes hardly compresses, and an update
    event carries the new value twice, in the object and in its patch)."""
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        cut_history(sim.store)
        noise = random.Random(21).randbytes(2_000_000)
        sim.store.update(malware_id(6), set={"description": base64.b64encode(noise).decode()})
        yield sim


class Run:
    """One process of the connector: ``run`` from the checkpoint on S3 until it caught up with
    the simulator, or died."""

    def __init__(self, settings: dict[str, Any], a: SimServer, plan: Plan, durable: Durable):
        self.settings, self.a, self.plan, self.durable = settings, a, plan, durable
        self.errors: list[BaseException] = []
        self.lease_wait = 0.0

    def go(self) -> None:
        stand_in = subprocess.Popen(["sleep", "600"])
        self.plan.on_death = lambda: (stand_in.kill(), stand_in.wait())
        stop = threading.Event()
        try:
            storage = CutS3Storage(
                self.plan, self.durable, **self.settings, multipart_threshold=THRESHOLD
            )
            lease = CutLease(storage, stand_in.pid)
            try:
                retry_call(storage.check, stage="checking", stop=stop, initial=0.01, cap=0.02)
                started = time.monotonic()
                assert lease.wait(stop)
                self.lease_wait = time.monotonic() - started
                self._follow(storage, lease, stop)
            finally:
                lease.release()
        except ConnectorError as exc:  # Killed, or what a real run stops on
            self.errors.append(exc)
        finally:
            stand_in.kill()
            stand_in.wait()

    def _follow(self, storage: CutS3Storage, lease: CutLease, stop: threading.Event) -> None:
        a = self.a
        store = CheckpointStore(storage)
        started: list[Checkpoint] = []

        def start() -> None:
            cp = store.load()
            if cp is None:
                cp = Checkpoint(stream_id="live", source_url=a.url)
            elif check_archive_end(storage, cp, "checkpoint.json"):
                store.save(cp)
            started.append(cp)

        # As ``run`` does: its start-up reads retried while they fail for a transient reason.
        retry_call(start, stage="starting", stop=stop, initial=0.01, cap=0.02)
        cp = started[-1]
        src = SseSource(
            SourceConfig(url=a.url, token=TOKEN, stream_id="live", backoff_initial=0.02),
            resume=EventId.parse(cp.last_event_id) if cp.last_event_id else None,
            resume_data=(
                EventId.parse(cp.last_segment_last_id) if cp.last_segment_last_id else None
            ),
        )
        src.queue = OneByOne(256, 16 * 1024 * 1024)
        pipeline = Pipeline(
            source=src,
            sinks=[ArchiveSink(storage)],
            store=store,
            checkpoint=cp,
            policy=BatchPolicy(max_events=2, max_age_secs=0.3),
            stop=stop,
            backoff_initial=0.01,
            backoff_max=0.02,
            shutdown_timeout=3,
            guard=lease.check,
        )
        thread, errors = start_pipeline(pipeline)
        last = EventId.parse(str(a.store.last_event_id))
        plain = CheckpointStore(self.durable.plain)

        def caught_up() -> bool:
            saved = plain.load()
            return saved is not None and EventId.parse(saved.last_event_id or "0-0") >= last

        wait_until(lambda: bool(errors) or caught_up(), timeout=30, what="the run's end")
        stop.set()
        thread.join(15)
        assert not thread.is_alive()
        self.errors.extend(errors)


def _case(
    endpoint: str, tmp: Path, a: SimServer, cut: int | None, how: str
) -> tuple[list[str], dict[str, Any], str]:
    """One run cut at request ``cut`` (None: not cut), then a fresh run when it died; the
    checks of the module docstring. Returns the cut run's requests, what was left over, and
    the bucket."""
    events = sim_events(a.store)[0]
    reference = [(e.id_text, e.event) for e in events]
    bucket = make_bucket(endpoint)
    settings = storage_settings(endpoint, bucket)
    durable = Durable(settings, reference)
    _dead_holder(durable.plain)
    plan = Plan(cut, how, s3.s3_failure)
    first = Run(settings, a, plan, durable)
    first.go()
    runs = [first]
    if plan.dead:
        # None when it died releasing the lease: the release says so in a warning only.
        assert all(isinstance(e, Killed) for e in first.errors), first.errors
    if plan.dead:
        # A new process after a kill.
        runs.append(Run(settings, a, Plan(), durable))
        runs[-1].go()
    last = runs[-1]
    assert not last.errors, last.errors
    reached = cut is not None and cut < len(plan.calls)
    where = f"after cut {cut} {how} ({plan.calls[cut] if reached else 'not reached'})"
    storage = S3Storage(**settings)
    stored = [(e.id_text, e.event) for e in ArchiveReader(storage).events()]
    assert stored == reference, f"archive differs {where}: {stored} != {reference}"
    for key in storage.list(EVENTS_PREFIX):
        assert storage.exists(manifest_key_for_segment(key)), f"{key} has no manifest {where}"
    report = verify_archive(storage, work_dir=tmp / "verify")
    assert report.ok, f"verify {where}: {report.errors}"
    assert not storage.exists(RUN_LEASE_KEY), f"the lease is left held {where}"
    for run in runs:
        # A dead holder's lease is taken over at once (put-if-absent, read, replace-if, the
        # settle delay, the confirming read; a failed request costs a standby's poll), not
        # waited out.
        assert run.lease_wait < LEASE_SECS / 2, f"waited {run.lease_wait:.1f} s {where}"
    assert_same_state(a.store.dump_bundle(), restored_bundle(storage, tmp / "restore"))
    assert durable.saved, "no checkpoint was saved"
    uploads = raw_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    left = {
        "warnings": report.warnings,
        "uploads": len(uploads),
        "probes": [k for k in storage.list() if k.startswith(".probe-")],
    }
    return plan.calls, left, bucket


@LONG
def test_an_s3_archive_cut_at_every_request(
    moto_server: str,  # noqa: F811
    source: SimServer,
    tmp_path: Path,
) -> None:
    """The whole sweep with CUT_EVERYWHERE=1; otherwise six cuts: the steps of a segment's
    multipart upload and the lease's compare-and-swap."""
    calls, left, _ = _case(moto_server, tmp_path / "clean", source, None, "kill")
    assert left == {"warnings": [], "uploads": 0, "probes": []}, left
    assert any(c.startswith("CreateMultipartUpload events") for c in calls), calls
    assert any(c.startswith("ReplaceIf lease") for c in calls), calls
    everywhere = EVERYWHERE
    failures: list[str] = []
    leftovers: list[str] = []
    for n, how in enumerate(KINDS):
        points = range(len(calls)) if everywhere else _sample(calls, n)
        for i in points:
            try:
                _, left, _ = _case(moto_server, tmp_path / f"{how}-{i}", source, i, how)
            except AssertionError as exc:
                failures.append(f"{i} {how} {calls[i]}: {str(exc)[:400]}")
                print(f"cut failed: {failures[-1]}", flush=True)
                continue
            if left != {"warnings": [], "uploads": 0, "probes": []}:
                leftovers.append(f"{i} {how} {calls[i]}: {left}")
    print("\n".join(["requests:", *[f"{i} {c}" for i, c in enumerate(calls)]]))
    print("\n".join(["leftovers:", *leftovers]))
    assert not failures, "\n".join(failures)


def _sample(calls: list[str], n: int) -> list[int]:
    """A step of the first multipart upload for the ``n``-th way of cutting, and for a kill and
    a lost answer the lease's take-over (compare-and-swap on its ETag) too."""
    create = next(i for i, c in enumerate(calls) if c.startswith("CreateMultipartUpload"))
    replace = next(i for i, c in enumerate(calls) if c.startswith("ReplaceIf lease"))
    return [create + n % 3, replace] if n % 2 == 0 else [create + n % 3]


@LONG
def test_a_segment_in_two_parts_cut_between_them(
    moto_server: str,  # noqa: F811
    big_source: SimServer,
    tmp_path: Path,
) -> None:
    """The requests of a segment uploaded in two parts (its existence check, the upload's
    creation, each part, the completion, then its manifest's), cut every way with
    CUT_EVERYWHERE=1, otherwise a few: killed between the parts, the second part's or the
    completion's answer lost."""
    calls, left, bucket = _case(moto_server, tmp_path / "clean", big_source, None, "kill")
    assert left == {"warnings": [], "uploads": 0, "probes": []}, left
    raw = raw_client(moto_server)
    tags = [
        raw.head_object(Bucket=bucket, Key=o["Key"])["ETag"]
        for o in raw.list_objects_v2(Bucket=bucket, Prefix="archive/events/")["Contents"]
    ]
    assert sum(t.strip('"').endswith("-2") for t in tags) == 1, tags  # one segment in two parts
    steps = ["CreateMultipartUpload events", "UploadPart events", "UploadPart events"]
    create = next(i for i in range(len(calls)) if calls[i : i + 3] == steps)
    assert calls[create + 3] == "CompleteMultipartUpload events", calls[create:]
    if EVERYWHERE:
        cuts = [(i, how) for how in KINDS for i in range(create - 2, create + 9)]
    else:
        cuts = [
            (create + 1, "kill-after"),
            (create + 2, "lost-answer"),
            (create + 3, "lost-answer"),
        ]
    failures: list[str] = []
    for i, how in cuts:
        try:
            _case(moto_server, tmp_path / f"{how}-{i}", big_source, i, how)
        except AssertionError as exc:
            failures.append(f"{i} {how} {calls[i]}: {str(exc)[:400]}")
            print(f"cut failed: {failures[-1]}", flush=True)
    assert not failures, "\n".join(failures)
