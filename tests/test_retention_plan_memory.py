"""Retention's plan has a row per object deleted (a Deletion: key, kind, reason), all planned
before the first is deleted. Quarantine records are one object per quarantined event, so a
stream that quarantined a million events made a plan of a million rows in memory (about 300 MB);
the rows wait in a spooled temporary file past 1 MiB now."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

from connector.archive.layout import quarantine_key
from connector.events import EventId
from connector.retention import RetentionPolicy, RetentionReport, _plan_quarantine
from connector.storage.local import LocalStorage


def _archive(root: Path, records: int) -> LocalStorage:
    for i in range(records):
        key = quarantine_key(EventId(1_700_000_000_000 + i, 0), f"{i:064x}")
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(b"{}")
    return LocalStorage(str(root))


def _held(storage: LocalStorage) -> int:
    """Memory the plan still holds once made (the local backend's directory listing, a
    transient of its own, is not counted)."""
    base = EventId(1_800_000_000_000, 0)
    tracemalloc.start()
    try:
        report = RetentionReport(RetentionPolicy(1, 0), base)
        _plan_quarantine(storage, report, base)
        gc.collect()  # held, not garbage awaiting the collector
        # Not the table of interned strings pathlib fills: a resize of it (a megabyte or two,
        # whenever the process's earlier work filled it) is not the plan's.
        held = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, "*/pathlib.py")]
        )
        return sum(stat.size for stat in held.statistics("filename"))
    finally:
        tracemalloc.stop()


def test_the_plan_does_not_grow_with_the_quarantine(tmp_path: Path) -> None:
    small = _held(_archive(tmp_path / "small", 1_000))
    large = _held(_archive(tmp_path / "large", 11_000))
    assert large - small < 500_000, f"the plan grew by {(large - small) / 1e6:.2f} MB"
