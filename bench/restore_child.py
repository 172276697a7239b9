"""Restore-side measurements, run as a child process so its peak RSS is its own.

``python -m bench.restore_child snapshot ARCHIVE WORK``
    writes a snapshot of the archive's latest position; prints ``{"secs": s}``.
``python -m bench.restore_child restore ARCHIVE WORK PLATFORM_URL TOKEN PUSH_EVENTS``
    plans (materialises) the latest state without, then with, the snapshot (its state image, then
    its parts alone); then materialises
    the state after the first PUSH_EVENTS events and pushes it with ``restore_to_target`` through
    the real ``OpenCTITarget`` into the platform double at PLATFORM_URL; prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from connector.archive import ArchiveReader
from connector.events import EventId
from connector.restore import materialise_plan, restore_to_target
from connector.snapshot import SNAPSHOTS_PREFIX, write_snapshot
from connector.storage import Storage
from connector.storage.local import LocalStorage

__all__ = ["WithoutSnapshots", "WithoutStateImages", "main"]


class WithoutSnapshots:
    """A read view of an archive that hides its snapshots (the "no snapshot" restore plan)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner

    def describe(self) -> str:
        return self.inner.describe()

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[str]:
        for key in self.inner.list(prefix, start_after):
            if not key.startswith(SNAPSHOTS_PREFIX):
                yield key

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def open(self, key: str) -> BinaryIO:
        return self.inner.open(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)


class WithoutStateImages(WithoutSnapshots):
    """A read view in which snapshots name no state image (as with ``snapshot.state_image``
    off): a restore loads their parts."""

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[str]:
        return self.inner.list(prefix, start_after)

    def get(self, key: str) -> bytes:
        body = self.inner.get(key)
        if key.startswith(SNAPSHOTS_PREFIX) and key.endswith("/manifest.json"):
            manifest = json.loads(body)
            manifest["state_schema"] = None
            body = json.dumps(manifest).encode()
        return body


def _nth_event_id(storage: LocalStorage, n: int) -> EventId | None:
    """The last group id among the first ``n`` events, from the manifests alone."""
    seen = 0
    for ref in ArchiveReader(storage).manifests(rows=True):
        rows = ref.manifest.objects
        if seen + len(rows) >= n:
            return EventId.parse(rows[n - seen - 1][0])
        seen += len(rows)
    return None


def _plan(storage: Any, work: Path) -> dict[str, Any]:
    start = time.perf_counter()
    state, plan = materialise_plan(storage, until=None, work_dir=work)
    secs = time.perf_counter() - start
    state.close()
    # Deleted before the next measurement: at 1M the file is 2.5 GB, and the kernel writing it
    # back would run during the next plan (a deleted file's dirty pages are dropped instead).
    state.path.unlink()
    return {
        "secs": secs,
        "events": plan.events,
        "objects": plan.objects,
        "segments": plan.segments,
        "snapshot": plan.snapshot,
    }


def _push(storage: LocalStorage, work: Path, url: str, token: str, n: int) -> dict[str, Any]:
    until = _nth_event_id(storage, n)
    state, plan = materialise_plan(storage, until=until, work_dir=work)
    # Imported after planning, as `opencti-sync restore` does (pycti only for a platform push).
    from connector.target.opencti import OpenCTITarget

    target = OpenCTITarget(url=url, token=token, connector_id=str(uuid.uuid4()))
    try:
        target.check()  # registration is not part of the push rate
        start = time.perf_counter()
        report = restore_to_target(state, target, batch_size=500)
        secs = time.perf_counter() - start
    finally:
        target.close()
        state.close()
    return {"secs": secs, "objects": report.pushed, "events": plan.events}


def main(argv: list[str]) -> int:
    mode, archive, work = argv[0], Path(argv[1]), Path(argv[2])
    storage = LocalStorage(archive)
    if mode == "snapshot":
        start = time.perf_counter()
        info = write_snapshot(storage, work_dir=work / "snap")
        out: dict[str, Any] = {
            "secs": time.perf_counter() - start,
            "objects": info.object_count if info else 0,
        }
    else:
        url, token, push_events = argv[3], argv[4], int(argv[5])
        out = {
            "plan_no_snapshot": _plan(WithoutSnapshots(storage), work / "plan1"),
            "plan_snapshot": _plan(storage, work / "plan2"),
            "plan_snapshot_parts": _plan(WithoutStateImages(storage), work / "plan3"),
            "push": _push(storage, work / "push", url, token, push_events),
        }
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
