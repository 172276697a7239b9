"""Review of the recovery hold (connector/source.py, _RecoveryHold): what it must not hold."""

from __future__ import annotations

import time
from pathlib import Path

from connector.checkpoint import CheckpointStore
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.storage.local import LocalStorage
from tests.support.connector import (
    ConnectorThread,
    archived_events,
    base_env,
    caught_up,
    wait_until,
)

TOKEN = "hold-review-token"


def test_a_raw_stream_gap_repair_is_not_held_as_a_recovery(tmp_path: Path) -> None:
    """The raw stream has no recovery (the platform ignores ``recover`` there): after a
    retention gap its replay is real Redis ids in order, each group complete at once. Held as
    a recovery's (it has no init-create ids, so no position is ever found safe), nothing went
    to the archive, and the checkpoint did not move, until the replay passed the repair date."""
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 20, seed=5)
        env = base_env(sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_ID="raw")
        run = ConnectorThread(env).start()
        wait_until(lambda: caught_up(storage, str(sim.store.last_event_id)), what="first run")
        run.stop()
        assert run.error is None
        before = len(archived_events(archive))
        generate(sim.store, 200, seed=6)
        sim.store.trim(150)  # a retention gap: the connector's checkpoint is no longer held
        # The gap's connection, then the replay: it stalls half-way for 4 s (below the 6 s
        # read timeout), as a large backlog would take time.
        sim.set_fault(stall_after_events=75, stall_secs=4, drop_times=2)
        run = ConnectorThread(env).start()
        try:
            deadline = time.monotonic() + 3.5
            while time.monotonic() < deadline and len(archived_events(archive)) == before:
                time.sleep(0.1)
            during = len(archived_events(archive))
            cp = CheckpointStore(storage).load()
            assert cp is not None and cp.retention_gaps, "the gap was not seen"
            assert during > before, "nothing of the replay archived while it was under way"
            wait_until(lambda: caught_up(storage, str(sim.store.last_event_id)), what="repair")
        finally:
            run.stop()
        assert run.error is None
