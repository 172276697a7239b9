"""Session 23's hand-made mutations of the archive's jobs, verify and storage (docs/RELIABILITY.md).

The same kind of table as ``scripts/mutations.py`` (each a small bug put in on purpose, its test
files run against it, the file written back as it was), for ``verify.py``, ``snapshot.py`` (with
its state image), ``retention.py``'s base, ``reconcile.py``, ``locks.py``, ``run_lease.py``,
``jobs.py`` and ``storage/s3.py``. Equivalent ones say why.

    .venv/bin/python scripts/mutations_archive.py            # all of them
    .venv/bin/python scripts/mutations_archive.py V3 S3-1    # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

VER, SNAP, RET = "connector/verify.py", "connector/snapshot.py", "connector/retention.py"
REC, LOCKS, LEASE = "connector/reconcile.py", "connector/locks.py", "connector/run_lease.py"
JOBS, S3 = "connector/jobs.py", "connector/storage/s3.py"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    ("V1", "a chain break taken as explained by any recorded retention gap", VER,
     "return any(prev_last <= low < first for low, _ in self.gaps)", "return bool(self.gaps)",
     ["test_verify", "test_verify_ends"], None),
    ("V2", "segments missing between two others reported as a note", VER,
     "        else:\n            self.report.error(\n                f\"segment(s) missing before",
     "        else:\n            self.report.notes.append(\n                f\"segment(s) missing before",
     ["test_verify", "test_verify_ends"], None),
    ("V3", "a segment's sha256 not compared", VER,
     "        if tee.sha.hexdigest() != m.sha256:\n            problems.append(",
     "        if False:\n            problems.append(",
     ["test_verify", "test_verify_ends"], None),
    ("V7", "a snapshot part's line count not compared", VER,
     "if count is not None and lines != count:", "if False:",
     ["test_verify"], None),
    ("V9", "the recomputed state_sha256 not compared with the snapshot's", VER,
     "if state_sha256(state) != snap.state_sha256:\n                problems",
     "if False:\n                problems",
     ["test_verify", "test_snapshot"], None),
    ("V10", "a state image giving another state not reported", VER,
     "            if not same:\n", "            if False:\n",
     ["test_verify", "test_snapshot"], None),
    ("SS1", "a state image's sha256 not checked when it is opened", SNAP,
     "                _write_scratch(out, chunk, db_path)\n            body.check()\n",
     "                _write_scratch(out, chunk, db_path)\n",
     ["test_snapshot", "test_verify"], None),
    ("SS2", "a state image holding more than a state (a foreign schema) accepted", SNAP,
     "        if foreign:\n", "        if False:\n",
     ["test_snapshot", "test_verify", "test_restore"], None),
    ("SS3", "a state image's counts not compared with the manifest's", SNAP,
     "            or counts[\"objects\"] != info.object_count\n"
     "            or counts[\"tombstones\"] != info.tombstone_count\n", "",
     ["test_snapshot", "test_verify"], None),
    ("SS4", "a state image written under another state schema opened", SNAP,
     "if self.state_schema != STATE_SCHEMA or self.rows != SNAPSHOT_ROWS:",
     "if self.rows != SNAPSHOT_ROWS:",
     ["test_snapshot", "test_verify", "test_restore"], None),
    ("SS5", "a snapshot folded over a gap in the segments", SNAP,
     "            if not allow_gaps:\n                raise PermanentError(",
     "            if False:\n                raise PermanentError(",
     ["test_snapshot", "test_verify", "test_restore"], None),
    ("SS7", "the snapshot committed without its lock checked (before_commit not called)", SNAP,
     "    if before_commit is not None:\n        before_commit()\n", "",
     ["test_snapshot", "test_jobs"], None),
    ("SS9", "a killed attempt's state image kept under the new manifest", SNAP,
     "            storage.delete(key)\n            if not storage.put_if_absent(key, spool):\n"
     "                raise RetryableError(f\"snapshot state image {key} was written meanwhile\")\n",
     "            pass\n",
     ["test_snapshot", "test_jobs"], None),
    ("RR1", "retention: the base not protected from keep_snapshots", RET,
     "        report.base = str(base.as_of)\n        protected.add(base.as_of)\n",
     "        report.base = str(base.as_of)\n",
     ["test_retention"], None),
    ("RC1", "every reconciliation group under the same id", REC,
     "group, size, index = [], 0, index + 1", "group, size = [], 0",
     ["test_reconcile"], None),
    ("RC2", "a refreshed merge target's merge written a second time", REC,
     "            merged.add(target_id)\n", "",
     ["test_reconcile"], None),
    ("RC3", "archived_counts counts the group at after again", REC,
     "if (after is None or ev.group > after) and ev.reconciled:",
     "if (after is None or ev.group >= after) and ev.reconciled:",
     ["test_reconcile"],
     "a reconciliation group is written alone (a segment whose first id is its last) and its "
     "manifest is named by that id; the listing starts after manifest_key(after), so no segment "
     "it reads holds a group at after"),
    ("RC5", "an empty listing while the archive holds objects taken as mass delete", REC,
     "if listed == 0 and archived:", "if False:",
     ["test_reconcile"], None),
    ("RC6", "a listing cut before its recovery ended taken as complete", REC,
     "    if not complete:\n        raise SourceRetryable", "    if False:\n        raise SourceRetryable",
     ["test_reconcile"], None),
    ("RC7", "an object renamed (same internal id) outside the listing deleted", REC,
     "if holder == stix_id or holder_iid == key:", "if holder == stix_id:",
     ["test_reconcile"], None),
    ("LK1", "another clock's record taken over at its date, no slack", LOCKS,
     "if record.expires_at + max(self.ttl, _CLOCK_SLACK) <= now:",
     "if record.expires_at <= now:",
     ["test_jobs", "test_run_lease"], None),
    ("LK2", "a record seen unchanged for half a lease taken over", LOCKS,
     "return self._watch.unchanged_secs(record) >= self.ttl.total_seconds()",
     "return self._watch.unchanged_secs(record) >= self.ttl.total_seconds() / 2",
     ["test_jobs", "test_run_lease"], None),
    ("LK4", "a lost take-over (compare-and-swap refused) taken as won", LOCKS,
     "            self._still_ours()\n            self._renewed_at = started\n",
     "            self._renewed_at = started\n",
     ["test_run_lease", "test_jobs"],
     "the confirmation after the settle pause (_confirm) reads the record again and raises the "
     "same LockHeld when it is not ours: the refusal only comes _SETTLE_SECS (0.2 s) later"),
    ("LK5", "a renewal writes over another owner's record", LOCKS,
     "                if found is None or current is None or current.owner != self.owner:\n"
     "                    break\n",
     "                if found is None or current is None:\n                    break\n",
     ["test_run_lease", "test_jobs"], None),
    ("LK6", "release deletes another owner's lock", LOCKS,
     "if current is not None and current.owner == self.owner:\n                    self.storage",
     "if current is not None:\n                    self.storage",
     ["test_jobs", "test_run_lease"], None),
    ("LL1", "the run lease's lost flag not checked before a write", LEASE,
     "            if lease.lost:\n                self._lost(lease)\n", "",
     ["test_run_lease"], None),
    ("LL2", "a renewal refused before a write ignored", LEASE,
     "                except LockHeld:\n                    self._lost(lease)\n",
     "                except LockHeld:\n                    pass\n",
     ["test_run_lease"], None),
    ("J1", "the snapshot job commits without checking its lock", JOBS,
     "            before_commit=lock.renew,\n", "            before_commit=None,\n",
     ["test_jobs", "test_jobs_stop"], None),
    ("J2", "retention runs without the job lock", JOBS,
     "    with JobLock(storage, \"retention\", ttl_secs, watch=watch):\n", "    if True:\n",
     ["test_jobs", "test_jobs_stop"], None),
    ("J3", "the snapshot job's lock never released", JOBS,
     "    with JobLock(storage, \"snapshot\", ttl_secs, watch=watch) as lock:\n",
     "    lock = JobLock(storage, \"snapshot\", ttl_secs, watch=watch)\n    lock.acquire()\n"
     "    if True:\n",
     ["test_jobs", "test_jobs_stop"], None),
    ("S3-1", "a put-if-absent refused (412) taken as written", S3,
     "            if _is_precondition(exc):\n                return False\n"
     "            raise self._error(exc, \"write\", key) from exc\n        return True\n\n    def put(",
     "            if _is_precondition(exc):\n                return True\n"
     "            raise self._error(exc, \"write\", key) from exc\n        return True\n\n    def put(",
     ["test_storage_contract", "test_s3_faults"], None),
    ("S3-2", "a replace-if refused (412) taken as written", S3,
     "isinstance(self._error(exc, \"write\", key), NotFound):\n                    return False",
     "isinstance(self._error(exc, \"write\", key), NotFound):\n                    return True",
     ["test_storage_contract", "test_s3_faults"], None),
    ("S3-3", "a multipart completion without If-None-Match", S3,
     "                MultipartUpload={\"Parts\": parts},\n                IfNoneMatch=\"*\",\n",
     "                MultipartUpload={\"Parts\": parts},\n",
     ["test_storage_contract"], None),
    ("S3-4", "a 409 ConditionalRequestConflict taken as permanent", S3,
     "        \"ConditionalRequestConflict\",\n", "",
     ["test_s3_faults", "test_storage_contract"], None),
    ("S3-8", "check() no longer refuses a store ignoring If-None-Match", S3,
     "            if self.put_if_absent(probe, b\"probe\"):\n                raise PermanentError(",
     "            if False:\n                raise PermanentError(",
     ["test_s3_faults", "test_storage_contract"], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
