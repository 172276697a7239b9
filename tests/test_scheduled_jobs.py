"""Snapshots and retention run on their schedules inside ``opencti-sync run`` (S3 archive on moto)."""

from __future__ import annotations

# ruff: noqa: F811 - fixtures imported by name
from pathlib import Path

from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.snapshot import list_snapshots
from connector.storage.s3 import S3Storage
from tests.support.connector import ConnectorThread, base_env, caught_up, wait_until
from tests.support.s3 import moto_server, s3_settings  # noqa: F401

TOKEN = "jobs-token"


def test_run_writes_snapshots_on_schedule_into_s3(
    moto_server: str, s3_settings: dict, tmp_path: Path
) -> None:
    storage = S3Storage(**s3_settings)
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 200, seed=21)
        env = base_env(
            sim.url,
            TOKEN,
            f"s3://{s3_settings['bucket']}/{s3_settings['prefix']}",
            S3_ENDPOINT_URL=s3_settings["endpoint_url"],
            S3_ACCESS_KEY_ID=s3_settings["access_key_id"],
            S3_SECRET_ACCESS_KEY=s3_settings["secret_access_key"],
            S3_REGION=s3_settings.get("region") or "us-east-1",
            S3_PATH_STYLE="true",
            SNAPSHOT_SCHEDULE="every 1s",
            RETENTION_SCHEDULE="every 1s",
            RETENTION_KEEP_DAYS="3650",
            OPENCTI_SYNC_WORK_DIR=str(tmp_path / "work"),
        )
        run = ConnectorThread(env).start()
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="backup")
        wait_until(lambda: bool(list_snapshots(storage)), timeout=60, what="a scheduled snapshot")
        generate(sim.store, 50, seed=22)
        first = list_snapshots(storage)[-1]
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="more events")
        wait_until(
            lambda: list_snapshots(storage)[-1].as_of > first.as_of,
            timeout=60,
            what="an incremental snapshot after new events",
        )
        run.stop()
    assert run.error is None
    latest = list_snapshots(storage)[-1]
    assert latest.based_on is not None  # built from the previous snapshot plus segments
    assert latest.object_count == sum(1 for _ in sim.store.objects())
