"""A restore killed halfway (SIGKILL) and run again resumes: it does not start over.

Real processes and real HTTP: ``opencti-sync restore --opencti`` runs as a child process and
pushes through pycti into the simulator's platform double (a SimServer in this process). Once the
double has imported 1,500 objects, the test holds the double's import lock, so the next push is
stuck mid-request, and kills the child there: the worst moment, a push sent but never
acknowledged. The same command then finishes the job, pushing fewer objects than the state holds,
and the double ends equal to the source platform at the archive's last event.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from connector.sim import sample_bundle
from connector.sim.generator import generate
from connector.sim.platform import platform_state
from connector.sim.server import SimServer
from connector.storage.local import LocalStorage
from tests.support.compare import assert_same_state
from tests.support.connector import ROOT
from tests.support.served import free_port
from tests.test_state import archive_events, new_sim, sim_events

TOKEN = "kill-token-0123456789"
RUN_ID = "6c0b3f3e-2b1e-4a47-9d0e-7a5c2f1d8e90"
SAMPLE = "DATA-TEST-STIX2_v2.json"


def _command(archive: Path, url: str, work: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "connector",
        "restore",
        "--archive",
        str(archive),
        "--opencti",
        url,
        "--token",
        TOKEN,
        "--work-dir",
        str(work),
    ]


def _env() -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CONNECTOR_LOG_FORMAT": "json"}


def _pushed(state: Any, start: int = 0) -> int:
    """Objects in the bundles the double imported, from push number ``start`` on."""
    return sum(int(p["objects"]) for p in list(state.pushes)[start:])


def _gauge(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not served")


def _wait(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def _kill_after(
    command: list[str], env: dict[str, str], state: Any, objects: int, stuck: Any = None
) -> int:
    """Runs the restore until the double imported ``objects``, then SIGKILLs it with its next
    push stuck inside the double (after ``stuck()``, if given); returns the objects imported."""
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait(lambda: _pushed(state) >= objects or child.poll() is not None, f"{objects} objects")
        with state.lock:  # the child's next push now waits inside the double
            assert child.poll() is None, "the restore finished before it could be killed"
            imported = _pushed(state)
            if stuck is not None:
                stuck()
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    return imported


def test_killed_restore_resumes_where_it_stopped(tmp_path: Path) -> None:
    source = new_sim()
    source.load_bundle(sample_bundle(SAMPLE))
    generate(source, 6000, seed=11)  # creates, updates, id changes, merges and deletes
    expected = source.dump_bundle()
    total = len(expected["objects"])
    assert total > 5 * 500  # several of the restore's 500-object batches
    events, _ = sim_events(source)
    archive = tmp_path / "archive"
    archive_events(LocalStorage(archive), events, per_segment=400)

    work = tmp_path / "work"
    port = str(free_port())
    metrics_env = {"METRICS_ENABLED": "true", "METRICS_HOST": "127.0.0.1", "METRICS_PORT": port}
    with SimServer(token=TOKEN) as double:
        double.store.api_token = TOKEN  # type: ignore[attr-defined]
        state = platform_state(double.store)  # created now, shared with the double

        def watched() -> None:
            # A long restore is watched on /metrics, as `run` is.
            scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            ratio = _gauge(scraped, "opencti_sync_restore_progress_ratio")
            assert 0 < ratio < 1, ratio

        first_run = _kill_after(
            _command(archive, double.url, work), {**_env(), **metrics_env}, state, 1500, watched
        )
        # Saved after each acknowledged batch (the last ack may have come just before the kill).
        progress = orjson.loads((work / "restore-progress.json").read_bytes())
        assert first_run - 500 <= progress["pushed"] <= first_run < total

        killed_at = len(state.pushes)
        again = subprocess.run(
            _command(archive, double.url, work),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert again.returncode == 0, again.stderr[-2000:]
        summary = orjson.loads(again.stdout[again.stdout.index("{") :])
        assert summary["resumed_from"]["step"] != "merged-away"
        second = _pushed(state, killed_at)
        # Resumed after the last acknowledged batch: what follows it, plus at most the batch the
        # double received from the killed child (it may land after ``killed_at``) and one
        # unacknowledged batch pushed again.
        assert 0 < second <= total - progress["pushed"] + 2 * 500
        assert second < total
        assert not (work / "restore-progress.json").exists()
        assert_same_state(expected, double.store.dump_bundle())


def test_a_killed_restore_starts_over_on_a_platform_reinstalled_at_its_address(
    tmp_path: Path,
) -> None:
    """Killed halfway; the operator reinstalls the platform at the same URL and runs the same
    command. The progress file matched (same URL, state and flags): the run went on after the
    killed one's last batch, skipped what only the old platform had got, and said it pushed
    everything."""
    source = new_sim()
    generate(source, 2500, seed=5, mix="creates")
    expected = source.dump_bundle()
    events, _ = sim_events(source)
    archive = tmp_path / "archive"
    archive_events(LocalStorage(archive), events, per_segment=400)
    work = tmp_path / "work"
    with SimServer(token=TOKEN) as first:
        first.store.api_token = TOKEN  # type: ignore[attr-defined]
        state = platform_state(first.store)
        command = _command(archive, first.url, work)
        _kill_after(command, _env(), state, 1000)
        port = first.port
    assert (work / "restore-progress.json").exists()
    with SimServer(token=TOKEN, port=port) as reinstalled:
        reinstalled.store.api_token = TOKEN  # type: ignore[attr-defined]
        # As in the image, where CONNECTOR_ID is `run`'s: the restore registers apart from it.
        env = {**_env(), "CONNECTOR_ID": RUN_ID}
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert again.returncode == 0, again.stderr[-2000:]
        summary = orjson.loads(again.stdout[again.stdout.index("{") :])
        assert "resumed_from" not in summary and summary["pushed"] == len(expected["objects"])
        assert "reinstalled since?" in again.stderr
        assert_same_state(expected, reinstalled.store.dump_bundle())
        registered = platform_state(reinstalled.store).connectors
        assert registered and RUN_ID not in registered
