"""An archive follows one platform: pointed at another, ``run`` refuses (exit 2, naming the key)
instead of reading the other platform's stream as a retention gap and "repairing" it into the
archive, whose delete reconciliation would then record the first platform's objects as deleted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from connector.checkpoint import CheckpointStore
from connector.errors import ConfigError, PermanentError, StreamGoneError
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.storage.local import LocalStorage
from tests.support.connector import ROOT, ConnectorThread, base_env, caught_up, wait_until

TOKEN = "test-token"


def test_an_archive_refuses_another_platform_until_told_it_moved(tmp_path: Path) -> None:
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as first:
        generate(first.store, 20, seed=1)
        run = ConnectorThread(base_env(first.url, TOKEN, archive)).start()
        wait_until(lambda: caught_up(storage, first.store.last_event_id), what="backup")
        run.stop()
        assert run.error is None
        before = CheckpointStore(storage).load()
        assert before is not None and before.source_url == first.url
    with SimServer(token=TOKEN, heartbeat_secs=0.2, store=first.store) as other:
        env = base_env(other.url, TOKEN, archive)
        run = ConnectorThread(env).start()
        run.join()
        assert isinstance(run.error, ConfigError) and run.error.key == "opencti.url"
        assert first.url in str(run.error) and "--source-moved" in str(run.error)
        cli = subprocess.run(
            [sys.executable, "-m", "connector", "run"],
            env={**env, "PATH": "/usr/bin:/bin"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 2 and "opencti.url" in cli.stderr
        assert CheckpointStore(storage).load() == before  # untouched
        # The same platform at a new address: acknowledged once, then followed as before.
        moved = ConnectorThread(env, source_moved=True).start()
        generate(other.store, 5, seed=2, mix="creates")
        wait_until(lambda: caught_up(storage, other.store.last_event_id), what="after the move")
        moved.stop()
        assert moved.error is None
    after = CheckpointStore(storage).load()
    assert after is not None and after.source_url == other.url
    assert not after.retention_gaps


def test_a_first_run_that_stored_nothing_binds_nothing(tmp_path: Path) -> None:
    """A mistyped stream id on the very first run: the platform refuses the stream and nothing
    is stored. Corrected, the run starts afresh instead of refusing the archive for good; once
    it stored something, the archive follows that stream only."""
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 10, seed=1, mix="creates")
        typo = base_env(sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_ID="nosuchstream")
        first = ConnectorThread(typo).start()
        first.join()
        assert isinstance(first.error, StreamGoneError)  # the platform refused the stream
        kept = CheckpointStore(storage).load()
        assert kept is not None and kept.stream_id == "nosuchstream" and not kept.last_event_id
        run = ConnectorThread(base_env(sim.url, TOKEN, archive)).start()
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="backup")
        run.stop()
        assert run.error is None
        cp = CheckpointStore(storage).load()
        assert cp is not None and cp.stream_id == "live" and cp.events_archived > 0
        again = ConnectorThread(typo).start()
        again.join()
        assert isinstance(again.error, ConfigError)
        assert again.error.key == "connector.live_stream_id"


def test_a_target_that_is_the_source_under_another_address_is_refused(tmp_path: Path) -> None:
    """Two addresses of one platform (a second node, a proxy): the URLs differ, the platform id
    does not. ``run`` gives the target the source's token, so its check compares ids."""
    with (
        SimServer(token=TOKEN, heartbeat_secs=0.2) as node1,
        SimServer(token=TOKEN, heartbeat_secs=0.2, store=node1.store) as node2,
    ):
        env = base_env(
            node2.url,
            TOKEN,
            str(tmp_path / "a"),
            TARGET_OPENCTI_URL=node1.url,
            TARGET_OPENCTI_TOKEN=TOKEN,
            TARGET_TRANSPORT="api",
        )
        run = ConnectorThread(env).start()
        run.join(60)
        assert isinstance(run.error, PermanentError), run.error
        assert "source platform itself" in str(run.error)
