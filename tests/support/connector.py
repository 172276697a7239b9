"""Running the real connector against a simulator: in a thread, or as a process we can kill."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
from httpx_sse import connect_sse

from connector.__main__ import run_forever
from connector.archive import ArchiveReader
from connector.checkpoint import Checkpoint, CheckpointStore
from connector.events import EventId, StreamEvent
from connector.pipeline import Pipeline
from connector.settings import Settings, load_settings
from connector.storage import Storage
from connector.storage.local import LocalStorage

__all__ = [
    "ConnectorThread",
    "ConnectorProcess",
    "base_env",
    "archived_events",
    "raw_log",
    "wait_until",
    "settings_for",
]

ROOT = Path(__file__).resolve().parents[2]


def base_env(sim_url: str, token: str, archive: str, **extra: Any) -> dict[str, str]:
    env = {
        "OPENCTI_URL": sim_url,
        "OPENCTI_TOKEN": token,
        "CONNECTOR_LIVE_STREAM_ID": "live",
        "ARCHIVE_URI": archive,
        "ARCHIVE_MAX_AGE_SECS": "0.3",
        "CONNECTOR_BACKOFF_INITIAL_SECS": "0.05",
        "CONNECTOR_BACKOFF_MAX_SECS": "0.5",
        "CONNECTOR_READ_TIMEOUT_SECS": "6",
        "CONNECTOR_LOG_FORMAT": "json",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``python -m connector ARGS`` in a child with a bare environment (no settings of this
    machine's leak in), JSON logs, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CONNECTOR_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def settings_for(env: dict[str, str]) -> Settings:
    return load_settings(None, env=env)


def start_pipeline(pipeline: Pipeline) -> tuple[threading.Thread, list[BaseException]]:
    """``pipeline.run()`` in a daemon thread; what it raises is collected for the test."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pipeline.run()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


_GC_THRESHOLD = gc.get_threshold()


class ConnectorThread:
    """``run_forever`` in a background thread; ``stop()`` drains like SIGTERM does."""

    def __init__(
        self, env: dict[str, str], *, source_moved: bool = False, resume_from_archive: bool = False
    ) -> None:
        self.settings = settings_for(env)
        self.source_moved = source_moved
        self.resume_from_archive = resume_from_archive
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.rc: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.rc = run_forever(
                self.settings,
                self.stop_event,
                source_moved=self.source_moved,
                resume_from_archive=self.resume_from_archive,
            )
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
        finally:
            # ``run`` tunes the collector for its own process (frozen start-up objects, a young
            # generation of 50,000): in a test worker that would outlive the run and let the
            # next tests' cyclic garbage pile up (memory tests read it as growth).
            gc.unfreeze()
            gc.set_threshold(*_GC_THRESHOLD)

    def start(self) -> ConnectorThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 30) -> None:
        self.stop_event.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "connector did not drain in time"

    def join(self, timeout: float = 30) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class ConnectorProcess:
    """``python -m connector run`` as a child process (for SIGKILL / SIGTERM tests)."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        full = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("OPENCTI_", "CONNECTOR_", "ARCHIVE_", "S3_", "TARGET_"))
        }
        full.update(env)
        full["PYTHONPATH"] = str(ROOT)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connector", "run"],
            env=full,
            stdout=self._log,
            stderr=self._log,
            cwd=str(log_path.parent),
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc


def wait_until(
    predicate: Any, timeout: float = 60, interval: float = 0.05, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def saved_checkpoint(storage: Storage) -> Checkpoint | None:
    """The checkpoint as saved now (None: none yet, or being replaced: read again next poll)."""
    try:
        return CheckpointStore(storage).load()
    except Exception:  # noqa: BLE001 - a checkpoint being replaced is read again next poll
        return None


def checkpoint_id(storage: Storage) -> EventId | None:
    cp = saved_checkpoint(storage)
    return EventId.parse(cp.last_event_id) if cp and cp.last_event_id else None


def caught_up(storage: Storage, last_id: str) -> bool:
    cp = checkpoint_id(storage)
    return cp is not None and cp >= EventId.parse(last_id)


def batch_counted(storage: Storage, records: list[logging.LogRecord]) -> bool:
    """The batch the saved checkpoint ends with is in the metrics. The pipeline counts a batch's
    written events just after the checkpoint's save, on its own thread, then logs "Batch
    written." for it: seeing the checkpoint caught up says nothing yet about the counters.
    ``records``: the connector's INFO records (``caplog.records``)."""
    cp = saved_checkpoint(storage)
    logged = {
        getattr(r, "last_event_id", None) for r in records if r.getMessage() == "Batch written."
    }
    return cp is not None and cp.last_segment_last_id in logged


def archived_events(archive: str | Storage) -> list[StreamEvent]:
    storage = LocalStorage(archive) if isinstance(archive, str) else archive
    return list(ArchiveReader(storage).events())


def raw_log(sim_url: str, token: str) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Every event in the simulator's log, read over the raw ``/stream`` (no dependencies)."""
    headers = {"Authorization": f"Bearer {token}"}
    info = httpx.get(f"{sim_url}/control/info", headers=headers).json()
    last = info["last_event_id"]
    if last is None:
        return
    last_id = EventId.parse(last)
    with (
        httpx.Client(timeout=30) as client,
        connect_sse(
            client, "GET", f"{sim_url}/stream", params={"from": "0"}, headers=headers
        ) as source,
    ):
        for sse in source.iter_sse():
            if sse.event == "connected":
                continue
            if sse.event == "heartbeat":
                if EventId.parse(sse.id) >= last_id:
                    return
                continue
            yield sse.id, sse.event, orjson.loads(sse.data)
            if EventId.is_valid(sse.id) and EventId.parse(sse.id) >= last_id:
                return
