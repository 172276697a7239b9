"""A restore point inside the first recovery: counting the objects whose version then is unknown
does not hold their ids in memory (a recovery sends the whole platform)."""

from __future__ import annotations

import tracemalloc
import uuid
from pathlib import Path

import orjson

from connector.archive import ArchiveSink
from connector.events import OCTI_EXT, EventId, StreamEvent
from connector.progress import iso_to_ms
from connector.restore_cli import _versions_unknown
from connector.sink import Batch
from connector.storage.local import LocalStorage

T0 = iso_to_ms("2025-01-01T00:00:00.000Z")
PER_SEGMENT = 500


def _iso(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _recovery(root: Path, count: int) -> LocalStorage:
    """``count`` objects, all created at T0, each updated later (its recovery event's id)."""
    storage = LocalStorage(str(root))
    sink = ArchiveSink(storage)
    after: EventId | None = None
    batch: list[StreamEvent] = []
    for i in range(count):
        ms = T0 + 1000 + i
        stix = {
            "id": f"indicator--{uuid.UUID(int=i + 1)}",
            "type": "indicator",
            "pattern": "[x:y = 'z']",
            "extensions": {
                OCTI_EXT: {
                    "id": str(uuid.UUID(int=i + 1)),
                    "created_at": _iso(T0),
                    "updated_at": _iso(ms),
                }
            },
        }
        raw = orjson.dumps(
            {"data": stix, "message": "", "origin": {"referer": "init-create"}, "version": "4"}
        )
        batch.append(StreamEvent.from_sse(f"{ms}-0", "create", raw))
        if len(batch) == PER_SEGMENT:
            sink.write(Batch(batch[0].id, batch[-1].id, batch, after_id=after))
            after, batch = batch[-1].id, []
    return storage


def _peak(storage: LocalStorage, count: int, work: Path) -> int:
    until, recovered = EventId(T0 + 500, 0), EventId(T0 + 1000 + count, 0)
    _versions_unknown(storage, until, recovered, work)  # warm: imports, first-use caches
    tracemalloc.start()
    try:
        assert _versions_unknown(storage, until, recovered, work) == count
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        assert not list(work.iterdir()), "scratch database left in the work dir"


def test_unknown_versions_are_counted_without_holding_their_ids(tmp_path: Path) -> None:
    small = _peak(_recovery(tmp_path / "small", 2_000), 2_000, tmp_path / "w")
    large = _peak(_recovery(tmp_path / "large", 20_000), 20_000, tmp_path / "w")
    # A set of the ids: about 2.5 MB more for 18,000 more objects.
    assert large - small < 500_000, f"peak grew by {(large - small) / 1e6:.2f} MB"
