"""Session 25's hand-made mutations of what keeps the archive (docs/RELIABILITY.md).

The same kind of table as ``scripts/mutations.py`` (whose ``run`` this uses), for the modules
older tables touched in a few places only: retention (``connector/retention.py``: what it
deletes, in which order, and what it keeps), snapshots (``connector/snapshot.py``: parts, the
state image, the manifest, scratch files), the job lock and the run lease (``connector/locks.py``,
``connector/run_lease.py``: one writer per archive, the compare-and-swap, expiry) and local
storage (``connector/storage/local.py``, ``connector/storage/__init__.py``,
``connector/archive/spool.py``, ``connector/archive/layout.py``: durable and atomic writes,
``put_if_absent``, listing order, the key layout). Each mutation is a small bug put in on purpose,
the test files named with it are run (one process, ``-x``, cheapest first), and the file is
written back as it was. Equivalent ones (no behaviour changes) say why.

    .venv/bin/python scripts/mutations_keep.py            # all of them (about 7 min on 2 cores)
    .venv/bin/python scripts/mutations_keep.py K1 K20     # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

RET, SNAP = "connector/retention.py", "connector/snapshot.py"
LOCKS, LEASE = "connector/locks.py", "connector/run_lease.py"
LOCAL, STORE = "connector/storage/local.py", "connector/storage/__init__.py"
SPOOL, LAYOUT = "connector/archive/spool.py", "connector/archive/layout.py"

T_RET, T_SNAP, T_LEASE, T_JOBS = "test_retention", "test_snapshot", "test_run_lease", "test_jobs"
T_DUR, T_CONTRACT = "test_local_storage_durability", "test_storage_contract"
T_SPOOL, T_STOP = "test_segment_spool", "test_jobs_stop"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- retention.py: what goes, in which order, what stays -------------------------------------
    ("K1", "the window one day shorter than keep_days", RET,
     "ms = int(now.timestamp() * 1000) - policy.keep_days * _DAY_MS",
     "ms = int(now.timestamp() * 1000) - (policy.keep_days - 1) * _DAY_MS",
     [T_RET], None),
    ("K2", "the checkpoint's position not used to bound the clock (newest segment only)", RET,
     "    if cp is not None and cp.last_event_id:\n", "    if False:\n",
     [T_RET], None),
    ("K3", "a snapshot's parts deleted before its manifest (the commit marker)", RET,
     '    report.deletions.append(Deletion(manifest, "snapshot", reason))\n'
     "    for key in storage.list(prefix):\n        if key != manifest:\n"
     '            report.deletions.append(Deletion(key, "snapshot", reason))\n',
     "    for key in storage.list(prefix):\n        if key != manifest:\n"
     '            report.deletions.append(Deletion(key, "snapshot", reason))\n'
     '    report.deletions.append(Deletion(manifest, "snapshot", reason))\n',
     [T_RET], None),
    ("K4", "an orphan segment starting at the base kept", RET,
     "        if first > base:\n            break  # keys are in stream order\n",
     "        if first >= base:\n            break  # keys are in stream order\n",
     [T_RET], None),
    ("K5", "keep_snapshots keeps one snapshot too many", RET,
     "{s.as_of for s in snapshots[-policy.keep_snapshots :]}",
     "{s.as_of for s in snapshots[-policy.keep_snapshots - 1 :]}",
     [T_RET], None),
    ("K6", "unfinished snapshots measured against the oldest committed one", RET,
     "_plan_unfinished_snapshots(storage, report, snapshots[-1].as_of,",
     "_plan_unfinished_snapshots(storage, report, snapshots[0].as_of,",
     [T_RET], None),
    ("K7", "apply_retention does not count what it deleted", RET,
     "        report.deleted += 1\n", "",
     [T_RET, T_JOBS], None),
    ("K8", "a base's state image checked as its parts are (a damaged image refuses the base)", RET,
     "            if part.kind == STATE_KIND:\n                continue\n", "",
     [T_RET], None),
    ("K9", "no base: a damaged oldest manifest's segment loses the snapshot it follows", RET,
     "            if before:\n                floor.add(before[-1])\n", "",
     [T_RET], None),
    ("K10", "no base: the snapshot at the oldest segment's predecessor not the floor", RET,
     "standing = [s.as_of for s in snapshots if s.as_of >= after]",
     "standing = [s.as_of for s in snapshots if s.as_of > after]",
     [T_RET], None),
    ("K11", "quarantine records planned without a base", RET,
     "    if base is not None:\n        _plan_quarantine(storage, report, base.as_of)\n",
     "    _plan_quarantine(storage, report, base.as_of if base is not None else EventId(2**62, 0))\n",
     [T_RET], None),
    # -- snapshot.py: parts, the state image, the manifest, scratch files ------------------------
    ("K12", "a part holds one object more than part_objects", SNAP,
     "if self._count >= self.limit or self._raw >= _PART_RAW_BYTES:",
     "if self._count > self.limit or self._raw >= _PART_RAW_BYTES:",
     [T_SNAP], None),
    ("K13", "a crashed attempt's part of other bytes kept under the new manifest", SNAP,
     "            if hashlib.sha256(self.storage.get(key)).hexdigest() != digest:\n"
     "                self.storage.put(key, body)\n",
     "            pass\n",
     [T_SNAP, T_JOBS], None),
    ("K14", "a snapshot already committed at the position exported again", SNAP,
     "        if storage.exists(snapshot_manifest_key(state.as_of.key)):\n"
     "            return None  # committed by a concurrent run\n", "",
     [T_SNAP], None),
    ("K15", "a damaged state image's bytes left in the scratch file the parts load into", SNAP,
     "                state = _emptied(db_path)\n            try:\n",
     "                state = StateStore(db_path, scratch=True)\n            try:\n",
     [T_SNAP, "test_restore"], None),
    ("K16", "one damaged snapshot manifest makes every snapshot unlistable", SNAP,
     "        except PermanentError as exc:\n            # Skipped, loudly",
     "        except PermanentError as exc:\n            raise\n            # Skipped, loudly",
     [T_SNAP, T_RET], None),
    ("K17", "a snapshot manifest of another format read", SNAP,
     '            if obj.get("format") != FORMAT:\n                raise MalformedEvent(',
     '            if False:\n                raise MalformedEvent(',
     [T_SNAP, T_RET], None),
    ("K18", "a snapshot part's sha256 not checked once its lines are read", SNAP,
     "            raise PermanentError(f\"snapshot part {part.key} is damaged: {exc}\") from exc\n"
     "        body.check()\n",
     "            raise PermanentError(f\"snapshot part {part.key} is damaged: {exc}\") from exc\n",
     [T_SNAP, T_RET], None),
    ("K19", "the manifest does not record its state schema (the image never used)", SNAP,
     '                "state_schema": self.state_schema,\n', "",
     [T_SNAP], None),
    ("K20", "a live run's scratch database removed as stale", SNAP,
     "                except BlockingIOError:\n                    continue  # a live run's\n",
     "                except BlockingIOError:\n                    pass\n",
     [T_STOP], None),
    ("K21", "a stop while the state image is stored commits the snapshot", SNAP,
     '    _check_stop(stop, "before its manifest")\n', "",
     [T_STOP], None),
    # -- locks.py and run_lease.py: one writer, compare-and-swap, expiry -------------------------
    ("K22", "a lock released between put-if-absent and the read not tried again", LOCKS,
     "        for _ in range(2):\n            started = elapsed_clock()",
     "        for _ in range(1):\n            started = elapsed_clock()",
     [T_JOBS, T_LEASE], None),
    ("K23", "our own live record taken for another holder's", LOCKS,
     "if current is not None and current.owner != self.owner and not self.expired(current):",
     "if current is not None and not self.expired(current):",
     [T_LEASE, T_JOBS], None),
    ("K24", "a holder's renewals not told apart (owner only): a live holder taken over", LOCKS,
     "seen = (record.owner, record.expires_at)", "seen = (record.owner,)",
     [T_JOBS, T_LEASE], None),
    ("K25", "a renewal does not note when it wrote", LOCKS,
     "            return False\n        self._renewed_at = started\n        return True\n",
     "            return False\n        return True\n",
     [T_JOBS, T_LEASE], None),
    ("K26", "a renewal whose answer was lost taken as a lost lock (no second read)", LOCKS,
     "            for _ in range(3):\n", "            for _ in range(1):\n",
     [T_JOBS, T_LEASE], None),
    ("K27", "the lock renewed every lease instead of every third of one", LOCKS,
     "interval = max(self.ttl.total_seconds() / 3, 0.05)",
     "interval = max(self.ttl.total_seconds(), 0.05)",
     [T_JOBS, T_LEASE], None),
    ("K28", "a holder in another pid namespace of this host taken for gone", LOCKS,
     "        if self.pidns != _pid_namespace():\n            return False\n", "",
     [T_LEASE, T_JOBS], None),
    ("K29", "the renewal thread not stopped at release", LOCKS,
     "        self._stop.set()\n        if self._renewer is not None:",
     "        if self._renewer is not None:",
     [T_JOBS, T_LEASE], None),
    ("K30", "status shows an expired run lease as held", LEASE,
     "if record is None or record.expires_at <= dt.datetime.now(dt.UTC) or record.holder_is_gone():",
     "if record is None or record.holder_is_gone():",
     [T_LEASE], None),
    ("K31", "the standby gauge stays 1 once the lease is taken", LEASE,
     "                metrics.STANDBY.set(0)\n", "",
     [T_LEASE], None),
    ("K32", "a run's leases each with their own owner", LEASE,
     "self._leases = [_Lease(s, ttl_secs, owner, on_lost) for s in storages]",
     "self._leases = [_Lease(s, ttl_secs, uuid.uuid4().hex, on_lost) for s in storages]",
     [T_LEASE], None),
    ("K33", "lost only when every lease is lost", LEASE,
     "return any(lease.lost for lease in self._leases)",
     "return all(lease.lost for lease in self._leases)",
     [T_LEASE], None),
    # -- storage/local.py, storage/__init__.py, spool.py, layout.py ------------------------------
    ("K34", "put replaces in place (not atomic: a reader may see a mix)", LOCAL,
     "            os.replace(tmp, path)\n",
     "            path.write_bytes(tmp.read_bytes())\n            tmp.unlink()\n",
     [T_DUR, T_CONTRACT], None),
    ("K35", "put's new directory entry not fsynced", LOCAL,
     "            raise _translate(exc, path) from exc\n        self._sync_dir(path.parent)\n\n"
     "    def get(",
     "            raise _translate(exc, path) from exc\n\n    def get(",
     [T_DUR, T_CONTRACT], None),
    ("K36", "put_if_absent leaves its temporary file", LOCAL,
     "        finally:\n            tmp.unlink(missing_ok=True)\n        self._sync_dir",
     "        finally:\n            pass\n        self._sync_dir",
     [T_DUR, T_CONTRACT], None),
    ("K37", "check removes a live writer's fresh temporary file", LOCAL,
     "if stat.S_ISREG(st.st_mode) and st.st_mtime < limit:", "if stat.S_ISREG(st.st_mode):",
     [T_DUR], None),
    ("K38", "the compare-and-swap lock file listed as a key", LOCAL,
     "if name.startswith(_TMP) or name == _CAS_LOCK:", "if name.startswith(_TMP):",
     [T_CONTRACT, T_DUR], None),
    ("K39", "list after a key yields that key too", LOCAL,
     "if start_after is not None and key <= start_after:",
     "if start_after is not None and key < start_after:",
     [T_CONTRACT], None),
    ("K40", "list after a key skips the rest of that key's directory", LOCAL,
     "                    and not start_after.startswith(key)\n", "",
     [T_CONTRACT], None),
    ("K41", "replace_if does not wait for the directory's lock", LOCAL,
     "                    self._lock_exclusive(fd)\n", "                    pass\n",
     [T_CONTRACT], None),
    ("K42", "a found object's directories not made durable", LOCAL,
     "        if path.exists():\n            self._sync_found(path)\n            return False\n",
     "        if path.exists():\n            return False\n",
     [T_DUR], None),
    ("K43", "the month folder not zero-padded: keys of October sort before September's", LAYOUT,
     'return f"{day.year:04d}/{day.month:02d}/{day.day:02d}"',
     'return f"{day.year:04d}/{day.month}/{day.day:02d}"',
     [T_SPOOL, T_CONTRACT], None),
    ("K44", "a key with an empty part (a//b) accepted", STORE,
     'any(part in ("", ".", "..") for part in key.split("/"))',
     'any(part in (".", "..") for part in key.split("/"))',
     [T_CONTRACT], None),
    ("K45", "a file body stored from where it was left, not its start", STORE,
     "    body.seek(0)\n    while chunk", "    while chunk",
     [T_CONTRACT, T_SPOOL], None),
    ("K46", "a spool's memory already at the fallback bound grows on without a scratch file", SPOOL,
     "            if self.limit >= _MEMORY_FALLBACK:\n", "            if False:\n",
     [T_SPOOL], None),
    ("K47", "a spilled spool loses what it held in memory", SPOOL,
     "            scratch.write(self._mem)\n", "            pass\n",
     [T_SPOOL], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
