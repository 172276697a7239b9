"""Session 25's hand-made mutations of verify, the reconciliation and the jobs (docs/RELIABILITY.md).

The same audit as ``scripts/mutations.py`` (whose ``run`` this uses), for three modules the older
tables touch in a few places only (``scripts/mutations_archive.py``: V1-V10, RC1-RC7, J1-J3):
``connector/verify.py`` (what it reports as damaged or missing: a segment's size, count, rows and
ends, the chain and the retention gaps that explain a break, the head and the tail, the snapshots'
parts and replay, the attached files, the patch chains), ``connector/reconcile.py`` (the
platform's listing and when it counts as whole, what is refreshed, what is deleted or merged, the
groups' ids and sizes) and ``connector/jobs.py`` (the schedule, when a snapshot is due, the
failures, skips and retries, the shutdown). The ids take an ``A`` (AV, AC, AJ): V, RC, R, J and
AR are used by older tables. Each mutation is a small bug put in on purpose, the test files named
with it are run (one process, ``-x``, cheapest first), and the file is written back as it was.
Equivalent ones (no behaviour changes) say why.

    .venv/bin/python scripts/mutations_verify.py            # all of them (about 7 min on 2 cores)
    .venv/bin/python scripts/mutations_verify.py AV1 AC4    # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

VER, REC, JOBS = "connector/verify.py", "connector/reconcile.py", "connector/jobs.py"

T_VER, T_ENDS, T_FILES = "test_verify", "test_verify_ends", "test_files"
T_REC, T_JOBS, T_STOP, T_RET = "test_reconcile", "test_jobs", "test_jobs_stop", "test_retention"

_DELETES = (
    '    for (data,) in db.execute("SELECT data FROM deletes ORDER BY rowid"):\n'
    '        yield [("delete", orjson.loads(data), None)]\n'
)
# _units' body, from its deletes to the merges of targets not refreshed
_UNITS = (
    _DELETES + "    merged: set[str] = set()\n"
    "    refreshed = db.execute(\n"
    '        "SELECT r.data, t.stix_id FROM refresh r LEFT JOIN targets t ON t.stix_id = r.stix_id"\n'
    '        " ORDER BY r.phase, r.key"\n'
    "    )\n"
    "    for data, target_id in refreshed:\n"
    '        unit: list[_Spec] = [("create", orjson.loads(data), None)]\n'
    "        if target_id is not None and target_id not in merged:\n"
    "            merged.add(target_id)\n"
    "            unit.append(_merge(db, target_id, unit[0][1]))\n"
    "        yield unit\n"
    '    for target_id, target in db.execute("SELECT stix_id, data FROM targets ORDER BY n"):\n'
    "        if target_id not in merged:\n"
    "            yield [_merge(db, target_id, orjson.loads(target))]\n"
)

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- verify.py: a segment against its manifest ---------------------------------------------
    ("AV1", "a segment missing under its manifest reported as a warning", VER,
     "            self.report.error(f\"segment {m.segment} is missing",
     "            self.report.warning(f\"segment {m.segment} is missing",
     [T_VER], None),
    ("AV2", "a segment's size not compared with its manifest's", VER,
     "        if tee.size != m.size:\n", "        if False:\n",
     [T_VER, T_ENDS], None),
    ("AV3", "a segment's event count not compared", VER,
     "        if count != m.event_count:\n", "        if False:\n",
     [T_VER], None),
    ("AV4", "a segment's last group id not compared", VER,
     "if hwm is not None and str(max(hwm, m.first)) != m.last_event_id:", "if False:",
     [T_VER], None),
    ("AV5", "a segment starting at the previous one's last id taken for no overlap", VER,
     "        if m.first <= prev.last:\n", "        if m.first < prev.last:\n",
     [T_VER, T_ENDS], None),
    ("AV6", "a damaged gzip (an OSError without errno) raised instead of reported", VER,
     "    return isinstance(exc, OSError) and exc.errno is not None",
     "    return isinstance(exc, OSError)",
     [T_VER], None),
    # -- verify.py: chain, retention gaps, head and tail ----------------------------------------
    ("AV7", "a retention gap found at the previous segment's end explains no break", VER,
     "return any(prev_last <= low < first for low, _ in self.gaps)",
     "return any(prev_last < low < first for low, _ in self.gaps)",
     [T_VER, T_ENDS], None),
    ("AV8", "a chain break at the previous segment's end does not restart the patch chains", VER,
     "if any(prev.last <= at < m.first for at in self.chain_breaks):",
     "if any(prev.last < at < m.first for at in self.chain_breaks):",
     [T_VER], None),
    ("AV9", "a snapshot at the oldest kept segment's after_event_id cannot start a restore", VER,
     "if any(snap.as_of >= after for snap in snapshots):",
     "if any(snap.as_of > after for snap in snapshots):",
     [T_ENDS, T_VER, T_RET], None),
    ("AV10", "any snapshot stands in for the newest segments, however old", VER,
     "if any(as_of >= want for as_of in self.snapshot_ids):", "if self.snapshot_ids:",
     [T_ENDS, T_VER], None),
    ("AV11", "the archive ending before the checkpoint's last id not reported", VER,
     "if end is None or EventId.parse(end) < want:", "if end is None:",
     [T_ENDS, T_VER], None),
    ("AV12", "the checkpoint's last segment without a manifest not reported", VER,
     "            if not found:\n                problems.append", "            if False:\n"
     "                problems.append",
     [T_ENDS, T_VER], None),
    ("AV13", "a place holding no segment, snapshot or checkpoint verified as OK", VER,
     "        if storage.exists(CHECKPOINT_KEY):\n", "        if True:\n",
     [T_VER, T_ENDS], None),
    ("AV14", "a damaged pass verified again though retention pruned nothing", VER,
     "if report.ok or head is None or storage.exists(head) or pruned + 1 >= _PASSES:",
     "if report.ok or head is None or pruned + 1 >= _PASSES:",
     [T_VER, T_RET], None),
    # -- verify.py: snapshots, orphans, files, patch chains -------------------------------------
    ("AV15", "an attached file neither archived nor recorded as gone reported as a warning", VER,
     "                self.report.error(\n                    f\"attached file",
     "                self.report.warning(\n                    f\"attached file",
     [T_FILES, T_VER], None),
    ("AV16", "a quarantine record right after the previous version not seen as a hole", VER,
     "\"SELECT 1 FROM quar WHERE after >= ? AND after < ? LIMIT 1\"",
     "\"SELECT 1 FROM quar WHERE after > ? AND after < ? LIMIT 1\"",
     [T_VER, "test_bad_input"], None),
    ("AV17", "a version from before a chain break compared with the next one", VER,
     "        if gen != self.gen or self.index.quarantined_between(",
     "        if self.index.quarantined_between(",
     [T_VER], None),
    ("AV18", "a container whose update does not follow its previous version only a warning", VER,
     "if not any(\"object_refs\" in v for v in versions) and self.index.any_member(",
     "if self.index.any_member(",
     [T_VER], None),
    # -- reconcile.py: the listing ------------------------------------------------------------
    ("AC1", "a listing answered 429 (rate limit) taken for a stream gone", REC,
     "                if status == 429 or status >= 500:\n"
     "                    raise SourceRetryable(f\"reconcile listing",
     "                if status >= 500:\n                    raise SourceRetryable(f\"reconcile listing",
     [T_REC], None),
    ("AC2", "merge events of the listing not taken as listed objects", REC,
     "if sse.event not in (\"create\", \"update\", \"merge\"):",
     "if sse.event not in (\"create\", \"update\"):",
     [T_REC], None),
    ("AC3", "an archive ahead of the listing (a dependency sent ahead) set back", REC,
     "    if version_of(stix) < version_of(held):\n        return False", "    if False:\n        pass",
     [T_REC], None),
    ("AC4", "an object the archive holds otherwise not refreshed", REC,
     "    return _canonical(held) != _canonical(stix)", "    return False",
     [T_REC], None),
    ("AC5", "an object the archive lacks not refreshed", REC,
     "    if held is None:\n        return True", "    if held is None:\n        return False",
     [T_REC], None),
    ("AC6", "an object only the acknowledged state holds otherwise not compared", REC,
     "if as_of is not None and (end is None or as_of < end):", "if False:",
     [T_REC], None),
    # -- reconcile.py: the lookup and what is deleted or merged --------------------------------
    ("AC7", "a lookup answered 4xx with no GraphQL errors taken as no entity (all deleted)", REC,
     "    if errors or status >= 300:\n", "    if errors:\n",
     [T_REC], None),
    ("AC8", "a lookup failing to connect raised as an httpx error, not retried", REC,
     "    except httpx.HTTPError as exc:\n        raise SourceRetryable(f\"reconcile lookup failed",
     "    except ValueError as exc:\n        raise SourceRetryable(f\"reconcile lookup failed",
     [T_REC], None),
    ("AC9", "a stream refusing recovery (no-recover) taken for a listing cut short", REC,
     "                if sse.event == \"no-recover\":\n", "                if False:\n",
     [T_REC], None),
    ("AC10", "an object the platform no longer knows not deleted", REC,
     "    if found is None:\n        db.execute(\"INSERT INTO deletes VALUES (?)\", (data,))\n"
     "        return\n",
     "    if found is None:\n        return\n",
     [T_REC], None),
    ("AC11", "an object merged into itself (same internal id, outside the listing)", REC,
     "    if target is None or _key_of(target) == key:", "    if target is None:",
     [T_REC], None),
    ("AC12", "a merge target taken as archived though the listing refreshes it", REC,
     "target = orjson.loads(listed[0]) if listed else next((t for t in held if t), None)",
     "target = next((t for t in held if t), None) or (orjson.loads(listed[0]) if listed else None)",
     [T_REC], None),
    # -- reconcile.py: the events and their groups ---------------------------------------------
    ("AC13", "the deletes sent after the refreshed objects and merges, not first", REC,
     _UNITS, _UNITS.replace(_DELETES, "") + _DELETES,
     [T_REC], None),
    ("AC14", "a group holds one unit more than max_events", REC,
     "        if len(group) >= max_events or size >= max_bytes:\n",
     "        if len(group) > max_events or size >= max_bytes:\n",
     [T_REC], None),
    ("AC15", "a reconciliation group's id at the idle position itself, not below it", REC,
     "    return EventId(at.ms - 1, index)", "    return EventId(at.ms, index)",
     [T_REC], None),
    # -- jobs.py ------------------------------------------------------------------------------
    ("AJ1", "'every 0s' accepted as a schedule", JOBS,
     "        if secs <= 0:\n", "        if secs < 0:\n",
     [T_JOBS], None),
    ("AJ2", "an interval job's first run one whole interval after start", JOBS,
     "min(interval, dt.timedelta(seconds=_FIRST_RUN_SECS))", "interval",
     [T_JOBS], None),
    ("AJ3", "an interval snapshot taken at its first run however recent the newest one", JOBS,
     "        if name == \"snapshot\":\n            self._snapshot_interval = interval\n", "",
     [T_JOBS], None),
    ("AJ4", "a snapshot stamped by a clock running ahead holds the schedule until its date", JOBS,
     "        due = min(last + interval, now + interval)\n", "        due = last + interval\n",
     [T_JOBS], None),
    ("AJ5", "a job waiting for its turn started after the shutdown", JOBS,
     "                if self.stop.is_set():\n                    log.info(\"Archive job not started",
     "                if False:\n                    log.info(\"Archive job not started",
     [T_STOP, T_JOBS], None),
    ("AJ6", "a job skipped for the lock not retried", JOBS,
     "            self._retry_later(name)\n", "",
     [T_JOBS], None),
    ("AJ7", "a failed job not counted", JOBS,
     "            self.failures[name] += 1\n", "",
     [T_JOBS], None),
    ("AJ8", "a snapshot stopped for the shutdown counted as failed", JOBS,
     "        except SnapshotStopped as exc:\n"
     "            log.info(\"Archive job stopped for shutdown.\", extra={\"job\": name, \"reason\": str(exc)})\n",
     "",
     [T_STOP, T_JOBS], None),
    ("AJ9", "a finished job does not wake the shutdown waiting for it", JOBS,
     "                self._idle.notify_all()\n", "",
     [T_STOP, T_JOBS], None),
    ("AJ10", "a killed run's scratch files not removed by the next snapshot job", JOBS,
     "        remove_stale_scratch(work_dir)\n", "",
     [T_STOP, T_JOBS], None),
    ("AJ11", "a newest snapshot's time without an offset compared as it is (fixed: it raised)", JOBS,
     "    return created if created.tzinfo is not None else created.replace(tzinfo=dt.UTC)",
     "    return created",
     [T_JOBS], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
