"""Session 23's hand-made mutations of the core path (docs/RELIABILITY.md).

Each mutation is a small bug put into the code on purpose: the script writes it, runs the test
files named with it (one process, ``-x``, cheapest first, stopping at the first that fails),
writes the file back as it was, and prints whether the tests caught it ("killed"). Three are
equivalent (no behaviour changes; why, with each): they survive by design.

    .venv/bin/python scripts/mutations.py            # all of them (about 10 min on 2 cores)
    .venv/bin/python scripts/mutations.py P5 ST4     # some

Run it from a clean work tree: a mutated file is restored from the text read before the change,
also when the run is interrupted, but never run two at once.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST_ARGS = ["-x", "-q", "-p", "no:cacheprovider"]  # one process, first failure ends it

PIPE, CKPT, PEND = "connector/pipeline.py", "connector/checkpoint.py", "connector/pending.py"
SINK, SEG, SRC = "connector/archive/sink.py", "connector/archive/segment.py", "connector/source.py"
POS, REST, STATE = "connector/archive_position.py", "connector/restore.py", "connector/state.py"
SNAP, RET, LOCAL = "connector/snapshot.py", "connector/retention.py", "connector/storage/local.py"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[tuple[str, str, str, str, str, list[str], str | None]] = [
    ("P1", "only the first sink is written", PIPE,
     "    for sink in sinks:\n        retry_call(", "    for sink in sinks[:1]:\n        retry_call(",
     ["test_two_sinks_cut_everywhere"], None),
    ("P2", "a write given up at the shutdown deadline counts as done", PIPE,
     "time.monotonic() >= limit:\n                raise ShutdownTimeout(",
     "time.monotonic() >= limit:\n                return\n                raise ShutdownTimeout(",
     ["test_pipeline_shutdown"], None),
    ("P3", "a batch leaves out its last event", PIPE,
     "events = self._pending.head(n)\n", "events = self._pending.head(n - 1)\n",
     ["test_sink_redelivery"], None),
    ("P4", "max_events reached: >= becomes >", PIPE,
     "len(self._quarantined) >= self.policy.max_events",
     "len(self._quarantined) > self.policy.max_events",
     ["test_sink_redelivery"], None),
    ("P5", "Complete.behind ignored", PIPE,
     "self._complete_n = len(self._pending) - item.behind",
     "self._complete_n = len(self._pending)",
     ["test_recovery_hold_review"], None),
    ("P6", "a disconnect keeps the partial group", PIPE,
     "            self._pending.drop_tail(self._complete_n)\n"
     "            del self._groups[self._complete_n :]\n", "",
     ["test_sink_redelivery"], None),
    ("P7", "an idle heartbeat moves the checkpoint past unstored quarantine records", PIPE,
     "if not self._pending and not self._quarantined:\n                if not self._maybe",
     "if not self._pending:\n                if not self._maybe",
     ["test_bad_input"], None),
    ("P8", "the archive's own tail left out of last_segment_last_id", PIPE,
     "tail = last if archived.tail is None else max(last, archived.tail)", "tail = last",
     ["test_sink_redelivery"], None),
    ("P9", "acked_event_id set once, never moved", PIPE,
     "if acked is None or last > EventId.parse(acked):", "if acked is None:",
     ["test_sink_redelivery"], None),
    ("P10", "an event at the reconciliation's group is not quarantined", PIPE,
     "if at is None or ev.group > at:", "if at is None or ev.group >= at:",
     ["test_reconcile"], None),
    ("P11", "the group left pending by a flush has no age", PIPE,
     "self._oldest = time.monotonic() if len(self._pending) else None", "self._oldest = None",
     ["test_pending"], None),
    ("C1", "the checkpoint's version not checked", CKPT,
     'if not isinstance(obj, dict) or obj.get("version") != VERSION:',
     "if not isinstance(obj, dict):",
     ["test_archive_position"], None),
    ("C2", "a damaged checkpoint read as none", CKPT,
     "        except CheckpointError as exc:\n            # Name",
     "        except CheckpointError as exc:\n            return None\n            # Name",
     ["test_archive_position"], None),
    ("C3", "first_recovery_end takes a repair's recover_until", CKPT,
     "return None if self.retention_gaps else self.recover_until", "return self.recover_until",
     ["test_verify"], None),
    ("N1", "drop_tail keeps one event of the partial group", PEND,
     "            del self._memory[n:]\n", "            del self._memory[n + 1 :]\n",
     ["test_pending"], None),
    ("N2", "head() one spilled event short", PEND,
     "first, first + n - held))", "first, first + n - held - 1))",
     ["test_pending"], None),
    ("N3", "the spill ends at < instead of <= the limit", PEND,
     "if self._memory_bytes + self._spill.bytes <= self._configured:",
     "if self._memory_bytes + self._spill.bytes < self._configured:",
     ["test_pending"],
     "only where the pending events wait changes (disk or memory), at exactly the limit; "
     "every read gives the same events"),
    ("S1", "quarantine records overwritten (put, counted each time)", SINK,
     "            stored = self.storage.put_if_absent(key, record)\n",
     "            self.storage.put(key, record)\n            stored = True\n",
     ["test_sink_redelivery"], None),
    ("S2", "the group at the archive's tail is stored again", SINK,
     "groups[start] <= after:", "groups[start] < after:",
     ["test_sink_redelivery"], None),
    ("S3", "the sink's own tail ignored", SINK,
     "        after = _max(batch.after_id, self._tail)\n", "        after = batch.after_id\n",
     ["test_sink_redelivery"], None),
    ("S4", "the manifest written before its segment", SINK,
     "                if self.storage.put_if_absent(key, encoded.body()):\n"
     "                    self.storage.put_if_absent(manifest_key(first), encoded.manifest_body())\n",
     "                if self.storage.put_if_absent(manifest_key(first), encoded.manifest_body())"
     " or True:\n                    self.storage.put_if_absent(key, encoded.body())\n",
     ["test_sink_redelivery"], None),
    ("S5", "a segment found at the write's key counted as its own without the sha256", SINK,
     "stored.sha256 == manifest.sha256 and stored.last == batch.last_id",
     "stored.last == batch.last_id",
     ["test_sink_redelivery", "test_s3_cut_everywhere"],
     "a key taken by other bytes is unreachable with one writer (the run lease): the first "
     "write's scan finds every segment an earlier run stored and skips their groups, and a "
     "retry in the same run writes the same batch, hence the same bytes"),
    ("S6", "no scan of what an earlier run stored", SINK,
     "            if not self._scanned:\n                self._scan(batch.after_id)\n"
     "            self._write_events", "            self._write_events",
     ["test_sink_redelivery"], None),
    ("G1", "a manifest's merged rows without their sources", SEG,
     '[ev.id_text, ev.stix_id, [s.get("id") for s in sources if isinstance(s, dict)]]',
     "[ev.id_text, ev.stix_id, []]",
     ["test_segment_spool"], None),
    ("G2", "manifests no longer chained (after_event_id)", SEG,
     "after_event_id=str(after) if after is not None else None,", "after_event_id=None,",
     ["test_restore", "test_verify"], None),
    ("R1", "no heartbeat slack on resume", SRC,
     "back = EventId(max(complete.ms - _HEARTBEAT_SLACK_MS, 0), 0)", "back = complete",
     ["test_heartbeat_race"], None),
    ("R2", "a recovery event completes its group", SRC,
     "        if ev.id == hwm and not ev.synthetic:\n", "        if ev.id == hwm:\n",
     ["test_recovery_hold_review"], None),
    ("R3", "a heartbeat at the position is a new position", SRC,
     "if self._hwm is None or hb > self._hwm:", "if self._hwm is None or hb >= self._hwm:",
     ["test_heartbeat_race"], None),
    ("R4", "a checkpoint at the oldest retained event taken for a gap", SRC,
     "        if effective >= first:\n", "        if effective > first:\n",
     ["test_reconcile"], None),
    ("A1", "lost segments: the checkpoint stays in its recovery", POS,
     "    cp.recover_until = None\n", "",
     ["test_archive_position"], None),
    ("A2", "an archive adopted without --resume-from-archive", POS,
     "    if not adopt:\n        raise", "    if False:\n        raise",
     ["test_archive_position"], None),
    ("A3", "archive_end(until) leaves out a snapshot at until", POS,
     "if until is None or s.as_of <= until]", "if until is None or s.as_of < until]",
     ["test_archive_position"], None),
    ("T1", "an --until date stops at seq 0 of its millisecond", REST,
     "    return EventId(ms, _MAX_SEQ)", "    return EventId(ms, 0)",
     ["test_restore_until"], None),
    ("T2", "a snapshot at --until not used as the seed", REST,
     "if until is None or s.as_of <= until]\n    try:", "if until is None or s.as_of < until]\n    try:",
     ["test_restore_until", "test_restore_every_point"], None),
    ("T3", "merged-away sources not deleted on the target", REST,
     "    if apply_deletes and resume.step <= _MERGED_STEP:\n        _merged_away(run, batch_size)\n",
     "", ["test_restore"], None),
    ("T4", "the last batch of deletes never sent", REST,
     '    if ids or (last_key != (after or "")):\n        flush()', "    pass",
     ["test_restore"], None),
    ("ST1", "fold_lines: the group at until left out", STATE,
     "if until is not None and hwm > until:\n                    return",
     "if until is not None and hwm >= until:\n                    return",
     ["test_state", "test_restore_until"], None),
    ("ST2", "a merge's sources not tombstoned", STATE,
     '            self._tombstone(s_key, s_stix, ev.id_text, "merged", into)\n', "            pass\n",
     ["test_state"], None),
    ("ST3", "a delete carrying an update taken for a delete", STATE,
     '            if ev.envelope.get("type") != "update":\n                self._delete(ev)',
     "            self._delete(ev)",
     ["test_state", "test_filtered_stream"], None),
    ("ST4", "a delete of an object never archived leaves no tombstone", STATE,
     '            self._tombstone(iid or ev.stix_id, ev.stix_id, ev.id_text, "deleted", None)\n', "",
     ["test_state"], None),
    ("ST5", "a re-creation on the per-event path keeps its tombstone", STATE,
     '        self._db.execute("DELETE FROM tombstones WHERE key = ? OR stix_id = ?", '
     "(key, stix_id))", "        pass",
     ["test_state"], None),
    ("SN1", "fold_segments: a segment starting at until left out", SNAP,
     "if until is not None and m.first > until:", "if until is not None and m.first >= until:",
     ["test_restore_until", "test_restore_every_point"], None),
    ("RT1", "retention: a segment planned by its first id instead of its last", RET,
     "if base is None or manifest.last > base:", "if base is None or manifest.first > base:",
     ["test_retention", "test_restore_every_point"],
     "no segment straddles a snapshot: a snapshot's as_of is the last group of the newest "
     "segment it folded, and each segment starts after the one before it ends"),
    ("RT2", "retention: a base whose parts are damaged", RET,
     "next((s for s in reversed(older) if _parts_intact(storage, s)), None)",
     "next((s for s in reversed(older)), None)",
     ["test_retention"], None),
    ("RT3", "retention: a quarantine record at the base position deleted", RET,
     "        if after >= base:\n            break", "        if after > base:\n            break",
     ["test_retention"], None),
    ("L1", "a written file not fsynced before it is linked", LOCAL,
     "                self._fsync_file(fd)\n", "                pass\n",
     ["test_local_storage_durability"], None),
]  # fmt: skip


Mutation = tuple[str, str, str, str, str, list[str], str | None]


def run(selected: set[str], mutations: list[Mutation] = MUTATIONS) -> int:
    """Apply each selected mutation (all when ``selected`` is empty) and run its tests; 1 when
    one that is not equivalent survived. Other tables (``scripts/mutations_*.py``) call this."""
    python = sys.executable
    survivors = []
    for mid, what, name, text, new, tests, equivalent in mutations:
        if selected and mid not in selected:
            continue
        path = ROOT / name
        original = path.read_text()
        if original.count(text) != 1:
            print(f"{mid:4} not applicable: its text is not found once in {name}")
            survivors.append(mid)
            continue
        started = time.monotonic()
        caught = None
        try:
            path.write_text(original.replace(text, new))
            for test in tests:
                cmd = [python, "-m", "pytest", f"tests/{test}.py", *PYTEST_ARGS]
                if subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode != 0:
                    caught = test
                    break
        finally:
            path.write_text(original)
        took = time.monotonic() - started
        if caught:
            print(f"{mid:4} killed by {caught} ({took:.0f} s): {what}")
        elif equivalent:
            print(f"{mid:4} survived, equivalent ({took:.0f} s): {what}: {equivalent}")
        else:
            print(f"{mid:4} SURVIVED ({took:.0f} s): {what}")
            survivors.append(mid)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:])))
