"""Prometheus endpoint of the real connector, scraped over HTTP while it archives into S3 (moto)."""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from connector import metrics
from connector.archive import ArchiveReader, ArchiveSink
from connector.checkpoint import Checkpoint, CheckpointStore
from connector.events import EventId
from connector.pipeline import BatchPolicy, Pipeline, StopEvent
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.source import SourceConfig, SseSource
from connector.storage.local import LocalStorage
from connector.storage.s3 import S3Storage
from tests.support.connector import (
    ConnectorThread,
    base_env,
    batch_counted,
    caught_up,
    start_pipeline,
    wait_until,
)
from tests.support.s3 import REGION, make_bucket, moto_server  # noqa: F401
from tests.support.served import free_port

TOKEN = "tok-METRICS-0f1e2d3c4b5a"
S3_KEY_ID = "AKIAMETRICSKEYID0001"
S3_SECRET = "s3secret-METRICS-9a8b7c6d5e4f"
NAME = re.compile(r"^opencti_sync_[a-z0-9_]+$")


def scrape(port: int) -> str:
    resp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return resp.text


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(name: str, **labels: str) -> float:
    """In-process value before the run (the registry is shared by every test in the session)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def sim() -> Iterator[SimServer]:
    store = SimStore()
    generate(store, 60, seed=7, mix="creates")
    server = SimServer(token=TOKEN, heartbeat_secs=0.2, store=store).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(moto_server: str) -> dict[str, str]:  # noqa: F811
    bucket = make_bucket(moto_server)
    return {
        "ARCHIVE_URI": f"s3://{bucket}/backup",
        "S3_ENDPOINT_URL": moto_server,
        "S3_REGION": REGION,
        "S3_PATH_STYLE": "true",
        "S3_ACCESS_KEY_ID": S3_KEY_ID,
        "S3_SECRET_ACCESS_KEY": S3_SECRET,
    }


def _storage(env: dict[str, str]) -> S3Storage:
    bucket, prefix = env["ARCHIVE_URI"][len("s3://") :].split("/", 1)
    return S3Storage(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=env["S3_ENDPOINT_URL"],
        region=REGION,
        path_style=True,
        access_key_id=S3_KEY_ID,
        secret_access_key=S3_SECRET,
    )


def test_scrape_while_running(
    sim: SimServer, s3_env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="connector")
    port = free_port()
    env = base_env(
        sim.url,
        TOKEN,
        "unused",
        METRICS_ENABLED="true",
        METRICS_HOST="127.0.0.1",
        METRICS_PORT=str(port),
        **s3_env,
    )
    storage = _storage(env)
    kinds = ("create", "update", "delete", "merge")
    before_written = {
        k: value("opencti_sync_events_written_total", sink="archive", event=k) for k in kinds
    }
    # Deltas: the registry is shared by every test of this process, some of which write what
    # was never received (a reconciliation's events), so totals need not compare.
    before_received = {k: value("opencti_sync_events_received_total", event=k) for k in kinds}
    before_segments = value("opencti_sync_segments_written_total")
    before_quarantined = value("opencti_sync_quarantined_events_total")
    before_reconnects = sum(
        s.value
        for fam in metrics.RECONNECTS.collect()
        for s in fam.samples
        if s.name.endswith("_total")
    )

    run = ConnectorThread(env).start()
    try:
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="recovery")
        ids = sorted(
            o["id"] for o in sim.store.objects() if o["type"] in ("malware", "indicator", "tool")
        )
        sim.store.update(ids[0], set={"description": "edited"})
        sim.store.delete(ids[1])
        # A malformed event goes to quarantine and is counted.
        httpx.post(
            f"{sim.url}/control/inject",
            json={"sse": "id: 9999999999999-0\nevent: update\ndata: {not json\n\n"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ).raise_for_status()
        sim.store.update(ids[2], set={"description": "after the bad one"})
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="live edits")
        httpx.post(
            f"{sim.url}/control/drop", headers={"Authorization": f"Bearer {TOKEN}"}
        ).raise_for_status()
        sim.store.update(ids[3], set={"description": "after the reconnect"})
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="reconnect")
        wait_until(lambda: batch_counted(storage, caplog.records), what="the last batch counted")
        text = scrape(port)
    finally:
        run.stop()
    assert run.error is None, run.error

    got = samples(text)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    ours = {n: f for n, f in families.items() if n.startswith("opencti_sync_")}
    for name, fam in ours.items():
        assert NAME.match(name), name
        assert fam.documentation, f"{name} has no HELP"
        if fam.type == "counter":
            assert not name.endswith("_total"), "the client library appends _total itself"
        if "seconds" in name or "bytes" in name:
            assert name.endswith(("_seconds", "_bytes")), f"{name}: unit is a suffix"
    expected = {
        "opencti_sync_events_received",
        "opencti_sync_events_written",
        "opencti_sync_segments_written",
        "opencti_sync_segment_bytes",
        "opencti_sync_checkpoint_lag_seconds",
        "opencti_sync_checkpoint_timestamp_seconds",
        "opencti_sync_quarantined_events",
        "opencti_sync_retention_gaps",
        "opencti_sync_reconnects",
        "opencti_sync_retries",
        "opencti_sync_errors",
        "opencti_sync_restore_progress_ratio",
        "opencti_sync_recover_progress_ratio",
        "opencti_sync_build_info",
    }
    assert expected <= set(ours), expected - set(ours)

    # Events written, by type, equal what the archive holds (deltas: the registry is shared).
    archived = Counter(ev.event for ev in ArchiveReader(storage).events())
    assert archived["update"] >= 3 and archived["delete"] == 1 and archived["create"] >= 40
    for kind in kinds:
        written = got.get(
            ("opencti_sync_events_written_total", (("event", kind), ("sink", "archive"))), 0.0
        )
        assert written - before_written[kind] == archived[kind], kind
        received = got.get(("opencti_sync_events_received_total", (("event", kind),)), 0.0)
        assert received - before_received[kind] >= written - before_written[kind], kind
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.last_event_id
    segments = got[("opencti_sync_segments_written_total", ())] - before_segments
    assert segments == cp.segments_written >= 2
    assert got[("opencti_sync_quarantined_events_total", ())] - before_quarantined == 1
    assert ("opencti_sync_retention_gaps_total", ()) in got
    reconnects = sum(v for (n, _), v in got.items() if n == "opencti_sync_reconnects_total")
    assert reconnects - before_reconnects >= 1
    ts = got[("opencti_sync_checkpoint_timestamp_seconds", ())]
    assert ts >= int(cp.last_event_id.split("-")[0]) / 1000 - 60
    assert got[("opencti_sync_checkpoint_lag_seconds", ())] >= 0
    assert got[("opencti_sync_build_info", (("version", metrics.__version__),))] == 1

    # Nothing secret is exposed, not even a fragment of it.
    for secret in (TOKEN, S3_KEY_ID, S3_SECRET):
        assert secret not in text and secret[-10:] not in text


def test_segment_bytes_counted(sim: SimServer, s3_env: dict[str, str]) -> None:
    port = free_port()
    env = base_env(
        sim.url, TOKEN, "unused", METRICS_ENABLED="true", METRICS_HOST="127.0.0.1",
        METRICS_PORT=str(port), **s3_env,
    )  # fmt: skip
    storage = _storage(env)
    before = value("opencti_sync_segment_bytes_total")
    run = ConnectorThread(env).start()
    try:
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="recovery")
        text = scrape(port)
    finally:
        run.stop()
    stored = sum(storage.size(key) for key in storage.list("events/") if not key.endswith("/"))
    assert samples(text)[("opencti_sync_segment_bytes_total", ())] - before == stored > 0


def test_lag_follows_the_clock_between_saves() -> None:
    old = value("opencti_sync_checkpoint_timestamp_seconds")
    try:
        metrics.CHECKPOINT_TIMESTAMP.set(1_000_000.0)  # an event id from 1970: a huge lag
        lag = value("opencti_sync_checkpoint_lag_seconds")
        assert lag > 1_700_000_000
        metrics.CHECKPOINT_TIMESTAMP.set(0)
        assert value("opencti_sync_checkpoint_lag_seconds") == 0.0  # no checkpoint yet
        # The platform's clock ahead of this host's: no negative lag (an alert's `< 0` branch).
        metrics.CHECKPOINT_TIMESTAMP.set(time.time() + 3600)
        assert value("opencti_sync_checkpoint_lag_seconds") == 0.0
    finally:
        metrics.CHECKPOINT_TIMESTAMP.set(old)


def test_recover_progress_is_one_without_a_recovery(sim: SimServer, tmp_path: Path) -> None:
    """A raw stream has nothing to recover: the gauge says done from the start (dashboards and
    the image's healthcheck read "recovering" from it)."""
    metrics.RECOVER_PROGRESS.set(0.25)  # whatever an earlier run in this process left
    generate(sim.store, 5, seed=2)
    archive = str(tmp_path / "a")
    run = ConnectorThread(base_env(sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_ID="raw"))
    run.start()
    try:
        wait_until(lambda: value("opencti_sync_recover_progress_ratio") == 1.0, what="done")
    finally:
        run.stop()
    assert run.error is None


def test_lag_counts_from_the_checkpoint_found_at_start(tmp_path: Path) -> None:
    """Restarted while the platform is unreachable: the lag is the checkpoint's age, not 0."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    archive = tmp_path / "a"
    hour_ago = EventId(int(time.time() * 1000) - 3_600_000, 0)
    CheckpointStore(LocalStorage(archive)).save(Checkpoint("live", url, str(hour_ago)))
    metrics.CHECKPOINT_TIMESTAMP.set(0)
    run = ConnectorThread(base_env(url, TOKEN, str(archive))).start()
    try:
        wait_until(lambda: value("opencti_sync_checkpoint_lag_seconds") > 0, what="a lag")
        assert 3_590 < value("opencti_sync_checkpoint_lag_seconds") < 3_700
    finally:
        run.stop()


def test_recover_progress_reaches_one_on_an_idle_stream(sim: SimServer, tmp_path: Path) -> None:
    """A first recovery that fits in one batch: its last object's updated_at is below the
    recovery's end, so the idle stream's heartbeats are what finish it. Each checkpoint save is
    stamped (the healthcheck's clock while a recovery makes the lag moot)."""
    metrics.RECOVER_PROGRESS.set(0.0)
    metrics.CHECKPOINT_SAVED.set(0)
    archive = str(tmp_path / "a")
    started = time.time()
    run = ConnectorThread(base_env(sim.url, TOKEN, archive)).start()
    try:
        wait_until(lambda: value("opencti_sync_recover_progress_ratio") == 1.0, what="recovered")
        saved = value("opencti_sync_checkpoint_saved_timestamp_seconds")
        assert started <= saved <= time.time()
        assert CheckpointStore(LocalStorage(archive)).load() is not None
    finally:
        run.stop()
    assert run.error is None


class _SlowSegments(LocalStorage):
    """A local archive whose segment writes take ``delays`` seconds in turn (a slow disk/S3)."""

    def __init__(self, root: Path, delays: list[float]) -> None:
        super().__init__(root)
        self.delays = delays
        self.writes = 0

    def put_if_absent(self, key: str, body: Any) -> bool:
        if key.startswith("events/"):
            time.sleep(self.delays[min(self.writes, len(self.delays) - 1)])
            self.writes += 1
        return super().put_if_absent(key, body)


def _reconnect_kinds() -> set[str]:
    return {
        s.labels["kind"]
        for fam in metrics.RECONNECTS.collect()
        for s in fam.samples
        if s.name.endswith("_total")
    }


def test_the_reconnect_kind_of_a_stalled_reader_is_one_label(tmp_path: Path) -> None:
    """A slow archive holds the pipeline longer than the read timeout: the source reconnects.
    Its reason, "reader stalled for N s", was the metric's label: one more series for each
    distinct duration, never grouped under one kind."""
    with SimServer(token=TOKEN, heartbeat_secs=0.1) as sim:
        root = tmp_path / "archive"
        CheckpointStore(LocalStorage(root)).save(Checkpoint(stream_id="live", source_url=sim.url))
        storage = _SlowSegments(root, [1.6, 2.7, 3.8, 0.0])
        before = _reconnect_kinds()
        source = SseSource(
            replace(
                SourceConfig(url=sim.url, token=TOKEN, backoff_initial=0.05, backoff_max=0.2),
                read_timeout=1.0,
                queue_size=1,
            ),
            resume=None,
        )
        stop = StopEvent()
        pipeline = Pipeline(
            source=source,
            sinks=[ArchiveSink(storage)],
            store=CheckpointStore(storage),
            checkpoint=CheckpointStore(storage).load() or Checkpoint("live", sim.url),
            policy=BatchPolicy(max_events=5, max_age_secs=0.1),
            stop=stop,
            backoff_initial=0.05,
            backoff_max=0.2,
        )
        thread, errors = start_pipeline(pipeline)
        try:
            for seed in range(4):
                generate(sim.store, 10, seed=seed, mix="creates")
                wait_until(lambda s=seed: storage.writes > s, timeout=30, what="a slow write")
            wait_until(lambda: len(_reconnect_kinds() - before) > 0, timeout=30, what="a stall")
            time.sleep(1.0)
        finally:
            stop.set()
            thread.join(20)
        assert not errors, errors
    new = _reconnect_kinds() - before
    assert new == {"reader stalled"}, new


def test_a_quarantined_event_delivered_again_after_a_drop_is_counted_once(
    tmp_path: Path,
) -> None:
    """An oversized event is quarantined, then the connection drops before any later position
    completes past it: the stream sends it again after the reconnect. The archive holds one
    record for it (the same bytes, the same key); the quarantine counter and the checkpoint's
    count (`status`) said one per delivery."""
    with SimServer(token=TOKEN, heartbeat_secs=1.0) as server:
        generate(server.store, 5, seed=1, mix="creates")
        archive = tmp_path / "a"
        storage = LocalStorage(archive)
        env = base_env(
            server.url,
            TOKEN,
            str(archive),
            CONNECTOR_LIVE_STREAM_ID="raw",
            CONNECTOR_MAX_EVENT_BYTES="65536",
        )
        run = ConnectorThread(env).start()
        try:
            wait_until(lambda: caught_up(storage, server.store.last_event_id), what="catch-up")
            time.sleep(0.3)
            before = value("opencti_sync_quarantined_events_total")
            cp0 = CheckpointStore(storage).load()
            assert cp0 is not None
            server.set_fault(drop_after_events=1)  # the next connection is cut after one event
            server.drop_connections()
            time.sleep(1.5)  # reconnected, with the fault armed
            big = {"type": "malware", "id": "malware--0000b16b-0000-4000-8000-000000000000"}
            server.store.create({**big, "name": "big", "is_family": True, "x": "x" * 200_000})
            wait_until(
                lambda: len(list(storage.list("quarantine/"))) == 1, what="the quarantine record"
            )
            time.sleep(3.0)  # cut, reconnected, delivered again; heartbeats complete past it
            wait_until(lambda: caught_up(storage, server.store.last_event_id), what="the end")
            time.sleep(0.3)
        finally:
            run.stop()
        assert run.error is None, run.error
        assert len(list(storage.list("quarantine/"))) == 1
        assert value("opencti_sync_quarantined_events_total") - before == 1
        cp = CheckpointStore(storage).load()
        assert cp is not None and cp.quarantined - cp0.quarantined == 1


def test_recover_progress_follows_a_repair_started_while_running() -> None:
    """A retention gap's repair moves the checkpoint's recover date while `run` runs: the gauge
    stayed at 1 (built once at start), so the healthcheck read the repair's old timestamps as a
    stale checkpoint; after a restart mid-repair it said "recovering". Now the same both ways."""
    from connector.__main__ import _following_recovery
    from connector.source import iso_now

    now_ms = int(time.time() * 1000)
    cp = Checkpoint("live", "http://x", str(EventId(now_ms - 7_200_000, 0)))
    on_position = _following_recovery(cp)
    assert value("opencti_sync_recover_progress_ratio") == 1.0  # nothing to recover
    on_position(EventId(now_ms - 7_100_000, 0))
    assert value("opencti_sync_recover_progress_ratio") == 1.0
    cp.recover_until = iso_now()  # the repair (pipeline, GapDetected)
    on_position(EventId(now_ms - 3_600_000, 0))
    on_position(EventId(now_ms - 1_800_000, 0))
    assert 0.0 < value("opencti_sync_recover_progress_ratio") < 1.0
    on_position(EventId(now_ms + 1_000, 0))  # past its end
    assert value("opencti_sync_recover_progress_ratio") == 1.0


def test_the_endpoint_listens_on_metrics_host_only_and_has_no_created_series() -> None:
    """``METRICS_HOST=127.0.0.1`` keeps the endpoint off other interfaces (here: 127.0.0.2 is
    one, 127.0.0.1 another); counters have no ``*_created`` twin series."""
    port = free_port()
    stop = metrics.serve("127.0.0.2", port)
    try:
        text = httpx.get(f"http://127.0.0.2:{port}/metrics", timeout=10).text
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    finally:
        stop()
    assert "opencti_sync_events_written_total" in text
    assert "_created" not in text
