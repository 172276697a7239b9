"""Quarantined events count toward a batch's size: a stream whose events are all quarantined
(malformed, or ids going backwards after the platform's clock was set back) is written out at
``ARCHIVE_MAX_BYTES`` like any other, not held in memory until ``ARCHIVE_MAX_AGE_SECS``."""

from __future__ import annotations

from pathlib import Path

from connector.events import EventId
from connector.sim.server import SimServer
from connector.storage.local import LocalStorage
from tests.support.connector import ConnectorThread, base_env, wait_until
from tests.test_bad_input import next_id, store_with_an_identity

TOKEN = "quarantine-memory-token"
SIZE = 400_000  # characters of each malformed event


def test_quarantined_events_are_written_at_the_batch_size(tmp_path: Path) -> None:
    store = store_with_an_identity()
    last = EventId.parse(next_id(store))
    for i in range(12):  # 4.8 MB of malformed JSON, no good event after it
        data = '{"broken": "' + "A" * SIZE
        frame = f"id: {last.ms}-{last.seq + i}\nevent: create\ndata: {data}\n\n"
        store.append_bytes(frame.encode())
    storage = LocalStorage(tmp_path / "archive")
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        env = base_env(
            sim.url,
            TOKEN,
            str(tmp_path / "archive"),
            CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE="1970-01-01T00:00:00.000Z",
            CONNECTOR_REGISTER="false",
            OPENCTI_SYNC_WORK_DIR=str(tmp_path / "work"),
            ARCHIVE_MAX_BYTES=str(1 << 20),
            ARCHIVE_MAX_AGE_SECS="600",  # only the size can make the batch go out
        )
        run = ConnectorThread(env).start()
        try:
            wait_until(
                lambda: sum(1 for _ in storage.list("quarantine/")) == 12 or not run.alive,
                timeout=30,
                what="quarantine records written at ARCHIVE_MAX_BYTES, before the max age",
            )
            assert run.alive, run.error
        finally:
            run.stop()
    assert sum(1 for _ in storage.list("quarantine/")) == 12
