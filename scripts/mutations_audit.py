"""Session 29's hand-made mutations of the audit's fixes (docs/RELIABILITY.md).

The same kind of table as ``scripts/mutations.py`` (whose ``run`` this uses), for what session
29 changed after reading the less-tested modules again: the segment the checkpoint names as the
archive's newest when a re-delivered batch writes nothing (``connector/archive/sink.py``,
``connector/pipeline.py``), an object under ``events/`` that is not a segment, a snapshot whose
manifest was damaged after its commit (``connector/retention.py``), the local archive's sweep
(``connector/storage/local.py``) and attached files found in place (``connector/files.py``),
S3's transient connection errors, probe and settings (``connector/storage/s3.py``), and the
restore's resume and connector id (``connector/restore.py``, ``connector/restore_cli.py``).
Each mutation is a small bug put in on purpose, its test files are run (one process, ``-x``),
and the file is written back as it was. Equivalent ones (no behaviour changes) say why.

    .venv/bin/python scripts/mutations_audit.py            # all
    .venv/bin/python scripts/mutations_audit.py AU3 AU7    # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

SINK, PIPE, RET = "connector/archive/sink.py", "connector/pipeline.py", "connector/retention.py"
LOCAL, FILES, S3 = "connector/storage/local.py", "connector/files.py", "connector/storage/s3.py"
REST, CLI = "connector/restore.py", "connector/restore_cli.py"
LOCKS, SNAP, JOBS = "connector/locks.py", "connector/snapshot.py", "connector/jobs.py"
DEMO, SET, MAIN = "connector/demo.py", "connector/settings.py", "connector/__main__.py"
SRC = "connector/source.py"

T_RED, T_RET, T_LOC = "test_sink_redelivery", "test_retention", "test_local_storage_durability"
T_FILES, T_S3, T_KILL = "test_files", "test_s3_faults", "test_restore_kill"
T_JOBS, T_DEMO, T_SET = "test_jobs", "test_demo", "test_settings_validation"
T_SEC, T_CONS = "test_security", "test_consumer"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- the archive's newest segment, counted ---------------------------------------------------
    ("AU1", "the checkpoint names the last segment this batch wrote, not the one holding the end",
     PIPE,
     "        if archived.tail_segment is not None:\n",
     "        if False:\n",
     [T_RED], None),
    ("AU2", "a segment found by the first read of the archive does not hold the end", SINK,
     "            self._raise_tail(manifest.last, key)\n",
     "            self._tail = _max(self._tail, manifest.last)\n",
     [T_RED], None),
    ("AU3", "a segment met at a write's own key does not hold the end", SINK,
     "            self._raise_tail(covered, key)\n",
     "            self._tail = _max(self._tail, covered)\n",
     [T_RED], None),
    ("AU4", "the segments a crashed run stored are never counted", SINK,
     "        result.adopted_segments, result.adopted_events = self._adopted\n",
     "",
     [T_RED], None),
    ("AU5", "the crashed run's segments counted at every write", SINK,
     "        self._adopted = (0, 0)\n        self._stored_unreported.clear()",
     "        self._stored_unreported.clear()",
     [T_RED], None),
    ("AU6", "an object under events/ not named by an event id stops the write", SINK,
     "            except ValueError:\n                # Not a name",
     "            except KeyError:\n                # Not a name",
     [T_RED], None),
    # -- retention ----------------------------------------------------------------------------
    ("AU7", "a snapshot whose manifest was damaged deleted as a killed job's leftovers", RET,
     '        if f"{prefix}manifest.json" in keys:\n',
     "        if False:\n",
     [T_RET], None),
    # -- local storage and files ----------------------------------------------------------------
    ("AU8", "a directory the connector may not read stops the sweep (and the start)", LOCAL,
     "                if directory == self.root:\n",
     "                if True:\n",
     [T_LOC], None),
    ("AU9", "a full disk sweeps nothing", LOCAL,
     "        if now - self._swept_full_at < 60:\n",
     "        if True:\n",
     [T_LOC], None),
    ("AU10", "a write failing on a full disk mid-file sweeps nothing", LOCAL,
     "                if exc.errno in (errno.ENOSPC, errno.EDQUOT):\n"
     "                    self._sweep_when_full()\n",
     "",
     [T_LOC], None),
    ("AU11", "a file a killed run left in place is taken as stored without being made durable",
     FILES,
     "            self.storage.settle(found)\n",
     "            pass\n",
     [T_FILES], None),
    # -- S3 ---------------------------------------------------------------------------------------
    ("AU12", "a proxy that is down stops the run", S3,
     "    bce.ConnectionError,  # a proxy restarting",
     "    bce.HTTPClientError,  # a proxy restarting",
     [T_S3], None),
    ("AU13", "a probe write whose answer was lost fails the check", S3,
     ' and self.get(probe) != b"probe":',
     ":",
     [T_S3], None),
    ("AU14", "https to a plain-http store waited for as a transient failure", S3,
     '    if isinstance(exc, bce.SSLError) and "WRONG_VERSION_NUMBER" in str(exc):\n',
     "    if False:\n",
     [T_S3], None),
    ("AU15", "a bucket name botocore refuses accepted until the first request", S3,
     "        if not _BUCKET.fullmatch(bucket):\n",
     '        if not bucket or "/" in bucket:\n',
     [T_S3], None),
    ("AU16", "an endpoint botocore fails on accepted until the first request", S3,
     "        if endpoint_url is not None:\n            _check_endpoint(endpoint_url)\n",
     "",
     [T_S3], None),
    ("AU17", "an invalid prefix named under a key that does not exist", S3,
     "        raise ConfigError(setting, f\"invalid prefix",
     "        raise ConfigError(\"s3.prefix\", f\"invalid prefix",
     [T_S3], None),
    # -- restore -----------------------------------------------------------------------------------
    ("AU18", "a killed restore resumes into a platform reinstalled at the same URL", REST,
     '        "target_id": target_id,\n',
     "",
     [T_KILL], None),
    ("AU19", "the platform's id not given to the restore", CLI,
     "                target_id=target.platform_id,\n",
     "",
     [T_KILL], None),
    ("AU20", "the restore registers under run's own connector id", CLI,
     '            uuid.uuid5(uuid.NAMESPACE_URL, f"opencti-sync-restore:{settings.connector.id}:{url}")\n'
     "            if settings.connector.id\n",
     "            uuid.UUID(settings.connector.id)\n"
     "            if settings.connector.id\n",
     [T_KILL], None),
    ("AU21", "the platform's id read only when the first push checks the target", CLI,
     "            target.check()\n            report = restore_to_target(",
     "            report = restore_to_target(",
     [T_KILL], None),
    # -- the job lock and the jobs ----------------------------------------------------------------
    ("AU22", "a snapshot part written without checking the lock", SNAP,
     "        if self.guard is not None:\n            self.guard()\n",
     "",
     [T_JOBS], None),
    ("AU23", "the state image written without checking the lock", SNAP,
     "        if guard is not None:\n            guard()\n        if not storage.put_if_absent(key, spool):",
     "        if not storage.put_if_absent(key, spool):",
     [T_JOBS], None),
    ("AU24", "the lock's check never reads the record again, however old its renewal", LOCKS,
     "        if elapsed_clock() - self._renewed_at > self.ttl.total_seconds() / 2:\n            self.renew()",
     "        if False:\n            self.renew()",
     [T_JOBS], None),
    ("AU25", "the snapshot job passes no lock check", JOBS,
     "            guard=lock.guard,\n",
     "",
     [T_JOBS], None),
    ("AU26", "a committed snapshot's part replaced", SNAP,
     "                _uncommitted(self.storage, self.prefix)\n",
     "",
     [T_JOBS], None),
    ("AU27", "a lock of this machine judged by the wall clock", LOCKS,
     "            if record.boot_expires > 0:\n",
     "            if False:\n",
     [T_JOBS], None),
    ("AU28", "the boot-clock expiry never written", LOCKS,
     "            elapsed_clock() + self.ttl.total_seconds(),\n",
     "            0.0,\n",
     [T_JOBS], None),
    ("AU29", "a record written before a signal left behind", LOCKS,
     "                    self.storage.delete(self.key)\n            raise\n",
     "                    pass\n            raise\n",
     [T_JOBS], None),
    ("AU30", "retention deletes on after a stop", RET,
     "    for d in report.deletions:\n        _check_stop(stop)\n",
     "    for d in report.deletions:\n",
     [T_JOBS], None),
    ("AU31", "retention's planning reads every manifest after a stop", RET,
     "            continue\n        _check_stop(stop)\n",
     "            continue\n",
     [T_JOBS], None),
    ("AU32", "retention's base check reads every part after a stop", RET,
     "                continue\n            _check_stop(stop)\n",
     "                continue\n",
     [T_JOBS], None),
    ("AU33", "the runner's retention gets no stop", JOBS,
     "                stop=self.stop,\n            ),\n        )\n\n    def _guarded",
     "            ),\n        )\n\n    def _guarded",
     [T_JOBS], None),
    # -- the command line and its settings ----------------------------------------------------
    ("AU34", "the demo's connector outlives a demo stopped by SIGTERM", DEMO,
     "        if proc is not None and proc.poll() is None:\n            proc.terminate()",
     "        if False:\n            proc.terminate()",
     [T_DEMO], None),
    ("AU35", "the demo writes into a directory it did not make", DEMO,
     "    if directory.exists():\n",
     "    if False:\n",
     [T_DEMO], None),
    ("AU36", "an unreadable source CA bundle accepted at load", SET,
     '    _check_ca_bundle("opencti.ca_bundle", s.opencti.ca_bundle)\n',
     "",
     [T_SET], None),
    ("AU37", "an unreadable target CA bundle accepted at load", SET,
     '    _check_ca_bundle("target.ca_bundle", s.target.ca_bundle)\n',
     "",
     [T_SET], None),
    ("AU38", "an empty stream id taken for the raw stream", SET,
     "    if not c.live_stream_id.strip():\n",
     "    if False:\n",
     [T_SET], None),
    ("AU39", "durations libraries overflow on accepted", SET,
     '        if name.endswith("_secs") and value > _MAX_SECS:\n',
     '        if name.endswith("_secs") and value > 1e30:\n',
     [T_SET], None),
    ("AU40", "integers too large for status --json accepted", SET,
     "        if abs(value) > _MAX_INT:\n",
     "        if False:\n",
     [T_SET], None),
    ("AU41", "a host name that cannot be encoded accepted", SET,
     '            host.encode("idna")',
     "            pass",
     [T_SET], None),
    ("AU42", "a CA bundle wins over ssl_verify=false on the source", SET,
     "        return False if not self.ssl_verify else (self.ca_bundle or True)",
     "        return self.ca_bundle or self.ssl_verify",
     [T_SEC], None),
    ("AU43", "the reader's client built outside its guard", SRC,
     "        try:\n            client = self._client_factory()\n        except Exception as exc:",
     "        client = self._client_factory()\n        try:\n            pass\n        except Exception as exc:",
     [T_CONS], None),
    ("AU44", "metrics that cannot be served: a local file error, exit 1", MAIN,
     "        except OSError as exc:\n            # A host that does not resolve",
     "        except KeyError as exc:\n            # A host that does not resolve",
     [T_SET], None),
    ("AU45", "--archive set after the settings are checked", MAIN,
     '    env = {**os.environ, "ARCHIVE_URI": archive} if archive else None\n',
     "    env = None\n",
     [T_SET], None),
    ("AU46", "an interval of a billion days passed to the scheduler", JOBS,
     "        if secs > 366 * 86400:\n",
     "        if secs > 10**30:\n",
     [T_SET], None),
    ("AU47", "a YAML boolean given for a text key taken as the text True/False", SET,
     "        if isinstance(value, bool):\n            # YAML reads",
     "        if False:\n            # YAML reads",
     [T_SET], None),
    ("AU48", "a work dir the entrypoint cannot create fails every command", "entrypoint.sh",
     '    mkdir -p "$OPENCTI_SYNC_WORK_DIR" || true\n',
     '    mkdir -p "$OPENCTI_SYNC_WORK_DIR"\n',
     ["test_packaging"], None),
    ("AU49", "a lag limit that is not a number of seconds: a traceback, or always healthy",
     "entrypoint.sh",
     "if not math.isfinite(limit):",
     "if False:",
     ["test_packaging"], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
