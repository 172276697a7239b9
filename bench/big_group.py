"""Peak RSS of ``run`` while it archives one huge dependency group, with and without the spill.

After a reconnect the platform's cache is empty, and a live change to a popular entity brings
every relationship it has, and each one's other endpoint, under the change's own id. The
connector must hold a group until it is whole (docs/RELIABILITY.md); past
``CONNECTOR_SPILL_BYTES`` it holds it on disk. This runs the real connector in a child process
against the simulator (in this process): a first run recovers a malware with N indicators that
indicate it and stops, a second connects afresh and archives the change to the malware (a group
of 2N + 2 events). Its peak RSS is the kernel's high-water mark (``VmHWM``), read until it
exits: ``wait4``'s would count the moment between fork and exec, when the child is a copy of
this process and its simulator.

    python -m bench.big_group [--relationships 50000] [--target]

``--target`` also syncs into a second simulator over the API transport (stixBundlePush): the
group is then planned into pushes as well, 500 objects at a time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from connector.archive import ArchiveReader
from connector.checkpoint import CheckpointStore
from connector.events import EventId
from connector.sim.generator import popular_entity
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.storage.local import LocalStorage

from .harness import TOKEN, Child, connector_env

OFF = 1 << 40  # a spill limit no group reaches: everything in memory, as before the spill


def _caught_up(archive: Path, store: SimStore, child: Child, timeout: float = 1800) -> None:
    want = EventId.parse(store.last_event_id or "0-0")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"the connector exited: {child.output()[-2000:]}")
        try:
            cp = CheckpointStore(LocalStorage(archive)).load()
        except Exception:  # noqa: BLE001 - a checkpoint being replaced is read again
            cp = None
        if cp is not None and cp.last_event_id and EventId.parse(cp.last_event_id) >= want:
            return
        time.sleep(0.2)
    raise RuntimeError("the connector did not catch up")


class _HighWater:
    """The largest ``VmHWM`` of a process, read every 20 ms until it is gone."""

    def __init__(self, pid: int) -> None:
        self.mb = 0.0
        self._pid = pid
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                with open(f"/proc/{self._pid}/status") as status:
                    for line in status:
                        if line.startswith("VmHWM:"):
                            self.mb = max(self.mb, int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.02)


def measure(
    relationships: int, spill_bytes: int, work: Path, target: bool = False
) -> dict[str, Any]:
    store = SimStore()
    malware = popular_entity(store, relationships)
    archive = work / "archive"
    with (
        SimServer(token=TOKEN, store=store, heartbeat_secs=0.5) as sim,
        SimServer(token=TOKEN) as other,
    ):
        sync = (
            {
                "TARGET_OPENCTI_URL": other.url,
                "TARGET_OPENCTI_TOKEN": TOKEN,
                "TARGET_TRANSPORT": "api",
            }
            if target
            else {}
        )
        env = connector_env(
            sim.url,
            str(archive),
            CONNECTOR_LIVE_STREAM_ID="live",
            CONNECTOR_SPILL_BYTES=str(spill_bytes),
            OPENCTI_SYNC_WORK_DIR=str(work / "work"),
            **sync,
        )
        argv = [sys.executable, "-m", "connector", "run"]
        first = Child(argv, env, work / "first.log", work)
        _caught_up(archive, store, first)
        # A change past the recovery's end: the next connection recovers nothing.
        store.update(malware, set={"name": "Popular (renamed)"})
        _caught_up(archive, store, first)
        first.terminate()
        second = Child(argv, env, work / "second.log", work)
        peak = _HighWater(second.proc.pid)
        time.sleep(3)  # connected, its cache empty
        change = store.update(malware, set={"description": "Seen again."})
        started = time.monotonic()
        _caught_up(archive, store, second)
        secs = time.monotonic() - started
        rc = second.terminate()
    group = sum(1 for e in ArchiveReader(LocalStorage(archive)).events() if e.id_text == change)
    return {
        "target": "api" if target else None,
        "spill_bytes": spill_bytes,
        "group_events": group,
        "peak_rss_mb": round(peak.mb, 1),
        "archive_secs": round(secs, 1),
        "exit_code": rc,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relationships", type=int, default=50_000)
    parser.add_argument("--target", action="store_true", help="sync into a second simulator too")
    args = parser.parse_args(argv)
    rows = []
    for spill in (32 * 1024 * 1024, OFF):
        with tempfile.TemporaryDirectory(prefix="big-group-") as tmp:
            rows.append(measure(args.relationships, spill, Path(tmp), args.target))
        print(orjson.dumps(rows[-1]).decode(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
