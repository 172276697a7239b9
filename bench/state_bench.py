"""Restore-planning micro-benchmark: fold an archive of simulator bulk creates into StateStores.

    python -m bench.state_bench --events 100000 [--work DIR] [--compare OLD_STATE_PY] [--rounds N]

The archive is built once per size under ``--work`` (simulator ``bulk_creates``, written through
the real ``ArchiveSink``) and reused. The script times a read-only pass over the archive (the
ceiling), then ``fold_segments`` into a fresh ``StateStore`` for each implementation given: the
current one, and optionally an older ``state.py`` loaded from a file, in the same run, so the
ratio holds on a noisy machine (an older ``state.py`` without ``fold_lines`` folds each segment
with ``apply_many``, as it did). Peak RSS is printed for the whole process: run once to build
the archive, then again for a figure that covers the folds only.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from connector.archive import ArchiveReader, ArchiveSink
from connector.events import EventId, StreamEvent
from connector.sim.generator import bulk_creates
from connector.sim.store import SimStore
from connector.sink import Batch
from connector.snapshot import fold_segments
from connector.storage.local import LocalStorage

__all__ = ["main"]


def build_archive(root: Path, count: int, per_segment: int) -> LocalStorage:
    done = root / "done"
    storage = LocalStorage(root / "archive")
    if done.exists():
        return storage
    shutil.rmtree(root / "archive", ignore_errors=True)
    store = SimStore()
    bulk_creates(store, count, seed=1)
    sink = ArchiveSink(storage)
    pos, after, batch = 0, None, []
    while True:
        chunk = store.read(pos)
        if not chunk.frames:
            break
        for frame in chunk.frames:
            fields = dict(
                line.partition(": ")[::2] for line in frame.decode().split("\n") if ": " in line
            )
            if fields.get("event") in ("create", "update", "merge", "delete"):
                batch.append(StreamEvent.from_sse(fields["id"], fields["event"], fields["data"]))
            if len(batch) >= per_segment:
                after = _flush(sink, batch, after)
                batch = []
        pos = chunk.start + len(chunk.frames)
    if batch:
        _flush(sink, batch, after)
    done.write_text(str(count))
    return storage


def _flush(sink: ArchiveSink, batch: list[StreamEvent], after: EventId | None) -> EventId:
    sink.write(Batch(first_id=batch[0].id, last_id=batch[-1].id, events=batch, after_id=after))
    return batch[-1].id


def load_state_module(path: str) -> ModuleType:
    # Loaded as a sibling of connector.state, so its relative imports resolve.
    spec = importlib.util.spec_from_file_location("connector._bench_state", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def time_fold(cls: Any, storage: LocalStorage, db: Path) -> tuple[float, int, dict[str, int]]:
    db.unlink(missing_ok=True)
    state = cls(db)
    reader = ArchiveReader(storage)
    t0 = time.perf_counter()
    if hasattr(state, "fold_lines"):
        _, events, _ = fold_segments(state, reader, start_after=None)
    else:
        # A StateStore from before fold_lines: one apply_many per segment, as its fold did.
        events = 0
        for ref in reader.manifests():
            events += state.apply_many(reader.segment_events(ref.manifest))
            state.advance(ref.manifest.last)
    elapsed = time.perf_counter() - t0
    counts = state.counts()
    state.close()
    db.unlink(missing_ok=True)
    return elapsed, events, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--per-segment", type=int, default=50_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/state-bench"))
    parser.add_argument("--compare", help="path of another state.py to time in the same run")
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternate the implementations; keep each best"
    )
    args = parser.parse_args()
    root = args.work / f"n{args.events}"
    storage = build_archive(root, args.events, args.per_segment)
    reader = ArchiveReader(storage)
    t0 = time.perf_counter()
    n = sum(1 for ref in reader.manifests() for _ in reader.segment_events(ref.manifest))
    read_s = time.perf_counter() - t0
    print(f"read only     : {n} events in {read_s:.2f} s = {n / read_s:,.0f} events/s")
    from connector.state import StateStore

    impls: list[tuple[str, Any]] = [("current", StateStore)]
    if args.compare:
        impls.append(("compare", load_state_module(args.compare).StateStore))
    # Alternating rounds, best of each: on a shared machine the load moves between runs.
    best: dict[str, tuple[float, int, dict[str, int]]] = {}
    for _ in range(max(1, args.rounds)):
        for name, cls in impls:
            result = time_fold(cls, storage, root / f"{name}.sqlite")
            if name not in best or result[0] < best[name][0]:
                best[name] = result
    for name, (elapsed, events, counts) in best.items():
        print(
            f"fold {name:9}: {events} events in {elapsed:.2f} s = {events / elapsed:,.0f} events/s"
            f"  {counts}"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS      : {rss:.0f} MB")


if __name__ == "__main__":
    main()
