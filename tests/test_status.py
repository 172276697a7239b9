"""``opencti-sync status``: table and ``--json`` over an archive the real connector wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from connector.checkpoint import CheckpointStore
from connector.events import EventId
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.source import iso_to_id
from connector.storage.local import LocalStorage
from tests.support.connector import ROOT, ConnectorThread, base_env, caught_up, wait_until
from tests.test_retention import T0, at_day, build_days, follow_until
from tests.test_verify import DAY_MS

TOKEN = "tok-STATUS-77aa88bb99cc"


def cli(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("OPENCTI_", "CONNECTOR_", "ARCHIVE_", "S3_", "TARGET_", "RETENTION_"))
    }
    full.update(env, PYTHONPATH=str(ROOT), OPENCTI_SYNC_WORK_DIR=str(cwd / "work"))
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An archive with events and one snapshot, written by the connector and the CLI."""
    tmp = tmp_path_factory.mktemp("status")
    store = SimStore()
    generate(store, 80, seed=21, mix="creates")
    sim = SimServer(token=TOKEN, heartbeat_secs=0.2, store=store).start()
    try:
        path = tmp / "archive"
        run = ConnectorThread(base_env(sim.url, TOKEN, str(path))).start()
        wait_until(lambda: caught_up(LocalStorage(path), store.last_event_id), what="recovery")
        run.stop()
        assert run.error is None
    finally:
        sim.stop()
    out = cli("snapshot", "--archive", str(path), cwd=tmp)
    assert out.returncode == 0, out.stderr
    return path


def status_json(archive: Path, **env: str) -> dict[str, Any]:
    out = cli("status", "--archive", str(archive), "--json", cwd=archive.parent, **env)
    assert out.returncode == 0, out.stderr
    info = orjson.loads(out.stdout)
    assert isinstance(info, dict)
    return info


def test_status_json(archive: Path) -> None:
    before = time.time()
    info = status_json(archive)
    cp = CheckpointStore(LocalStorage(archive)).load()
    assert cp is not None and cp.last_event_id
    assert info["last_event_id"] == cp.last_event_id
    assert info["events_archived"] == cp.events_archived >= 80
    assert info["segments_written"] == info["archive_segments"] == cp.segments_written >= 1
    assert info["stream_id"] == "live"
    assert info["run_held_by"] is None  # the run stopped: its lease went with it
    assert info["quarantined"] == 0 and info["retention_gaps"] == 0
    # Lag derives from the checkpointed event id's milliseconds.
    lag = before - EventId.parse(cp.last_event_id).ms / 1000
    assert lag - 1 <= info["lag_seconds"] <= lag + 120
    # Archive size is what the segments really weigh.
    on_disk = sum(p.stat().st_size for p in (archive / "events").rglob("*") if p.is_file())
    assert info["archive_bytes"] == on_disk > 0
    assert info["archive_raw_bytes"] > info["archive_bytes"]  # compressed
    assert info["archive_last_event_id"] == cp.last_segment_last_id
    assert info["snapshots"] == 1
    assert info["last_snapshot"] is not None
    # keep_days 0 (the default) keeps everything: no window start, not one of today's date.
    assert info["retention_keep_days"] == 0 and info["retention_window_start"] is None
    assert EventId.parse(info["last_snapshot"]) == EventId.parse(cp.last_segment_last_id)


def test_status_shows_the_retention_window_prune_uses(tmp_path: Path) -> None:
    """Retention never measures its window from more than a day past the archive's position (a
    host clock ahead, a connector stopped for long): status shows that window, not one from
    the host's clock."""
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=3, snapshot_days={1})
    follow_until(storage, at_day(3))  # the archive's position: 2023, long before now
    info = status_json(tmp_path / "a", RETENTION_KEEP_DAYS="1")
    assert EventId.parse(info["retention_window_start"]) == EventId(T0 + 3 * DAY_MS, 0)


def test_status_table(archive: Path) -> None:
    out = cli("status", "--archive", str(archive), cwd=archive.parent)
    assert out.returncode == 0, out.stderr
    rows = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip())
    info = status_json(archive)
    assert set(rows) == set(info)
    assert rows["last_event_id"].strip() == info["last_event_id"]
    assert rows["events_archived"].strip() == str(info["events_archived"])
    assert rows["last_snapshot"].strip() == info["last_snapshot"]
    widths = {line.index(line.split(None, 1)[1]) for line in out.stdout.splitlines() if line}
    assert len(widths) == 1, "values line up in one column"


def test_status_of_an_empty_archive(tmp_path: Path) -> None:
    """Nothing there (a mistyped path, or before the first run): said, and exit 1."""
    out = cli("status", "--archive", str(tmp_path / "nothing-yet"), "--json", cwd=tmp_path)
    assert out.returncode == 1 and "no archive at" in out.stderr
    info = orjson.loads(out.stdout)
    assert info["last_event_id"] is None and info["events_archived"] == 0
    assert "lag_seconds" not in info or info["lag_seconds"] is None
    assert info["archive_segments"] == 0
    # The table says nothing but the error: a table of zeros would read as an archive found.
    out = cli("status", "--archive", str(tmp_path / "nothing-yet"), cwd=tmp_path)
    assert out.returncode == 1 and "no archive at" in out.stderr
    assert out.stdout == ""
    for command in ("snapshot", "prune"):
        out = cli(command, "--archive", str(tmp_path / "nothing-yet"), cwd=tmp_path)
        assert out.returncode == 1 and "no archive at" in out.stderr, command


def test_status_reports_the_retention_window(archive: Path) -> None:
    info = status_json(archive, RETENTION_KEEP_DAYS="30", RETENTION_KEEP_SNAPSHOTS="2")
    assert info["retention_keep_days"] == 30
    assert info["retention_keep_snapshots"] == 2
    start = EventId.parse(info["retention_window_start"])
    assert abs(start.ms / 1000 - (time.time() - 30 * 86400)) < 600
    # The oldest point a restore can reach whole: the end of the first run's recovery (before
    # it, the archive holds only the objects unchanged since); no retention ran.
    recovered = iso_to_id(info["recover_until"])
    assert recovered is not None
    first = EventId.parse(info["archive_first_event_id"])
    assert info["restorable_from"] == str(max(first, recovered))


def test_status_without_an_archive_names_the_checkpoint_it_looked_for(tmp_path: Path) -> None:
    """A sync into a target only (archive.uri empty): not "no archive at None"."""
    config = tmp_path / "c.yml"
    config.write_text("archive:\n  uri: ''\n")
    out = cli("status", "--config", str(config), cwd=tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    assert "None" not in out.stderr
    assert "no archive configured" in out.stderr and "opencti-sync-state" in out.stderr
