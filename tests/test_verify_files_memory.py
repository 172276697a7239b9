"""verify remembers the attached files it already checked on disk (its scratch index), not in
memory: an archive can hold millions of file versions."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import orjson

from connector.events import OCTI_EXT, EventId, StreamEvent
from connector.files import file_key, missing_key
from connector.storage.local import LocalStorage
from connector.verify import VerifyReport, _Index, _Verifier

FILES = 20_000


def _entry(i: int) -> dict[str, str]:
    return {"name": f"r{i}.pdf", "uri": f"/storage/get/import/Report/r{i}.pdf", "version": "1"}


def _event(i: int) -> StreamEvent:
    stix = {
        "id": f"report--00000000-0000-4000-8000-{i:012d}",
        "type": "report",
        "extensions": {OCTI_EXT: {"files": [_entry(i)]}},
    }
    raw = orjson.dumps({"data": stix, "message": "", "origin": {}, "version": "4"})
    return StreamEvent(
        EventId(1_700_000_000_000 + i, 0), f"{1_700_000_000_000 + i}-0", "create", raw
    )


def test_files_already_checked_are_not_held_in_memory(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    events = [_event(i) for i in range(FILES)]
    for i in range(FILES):  # half archived, half recorded as gone
        key = file_key(_entry(i)) if i < FILES // 2 else missing_key(_entry(i))
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(b"%PDF")
    report = VerifyReport()
    index = _Index(tmp_path / "verify-index.sqlite")
    try:
        verifier = _Verifier(LocalStorage(str(root)), report, index)
        for ev in events[: FILES // 2]:  # first-use caches and tables at their working size
            verifier.check_files(ev, True)
        # Only what verify's code allocates (a thread another test left running in this worker
        # must not count), and not the table of interned strings that pathlib fills: it grows
        # by a resize of a megabyte or two whenever the process's earlier work filled it.
        mine = [
            tracemalloc.Filter(True, "*/connector/verify.py", all_frames=True),
            tracemalloc.Filter(False, "*/pathlib.py"),
        ]
        tracemalloc.start(8)
        try:
            gc.collect()  # held, not garbage awaiting the collector
            before = tracemalloc.take_snapshot().filter_traces(mine)
            for ev in events[FILES // 2 :]:
                verifier.check_files(ev, True)
            for ev in events[:100]:  # met again: checked once
                verifier.check_files(ev, True)
            gc.collect()
            after = tracemalloc.take_snapshot().filter_traces(mine)
        finally:
            tracemalloc.stop()
        grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    finally:
        index.close()
    assert report.files == FILES // 2 and report.files_gone == FILES // 2
    assert report.error_count == 0
    # A set of every key checked grew by about 3 MB for these 10,000 more file versions.
    assert grown < 500_000, f"grew by {grown / 1e6:.2f} MB for {FILES // 2} file versions"
