"""Session 26's hand-made mutations of the state store and S3 storage (docs/RELIABILITY.md).

The same kind of table as ``scripts/mutations.py`` (whose ``run`` this uses), for what the older
tables leave of ``connector/state.py`` (merges and their tombstones, deletes and their cascade,
standard-id changes and aliases, the reverse reference index and the by-key indexes, versions,
the push phases and ``to_bundle``, the scratch store discarded after a failed transaction, the
Bloom filter, loading a snapshot) and of ``connector/storage/s3.py`` (put, put-if-absent and
compare-and-swap, multipart, listing with start_after and pages, retries, errors said clearly,
secrets never shown). Each mutation is a small bug put in on purpose, its test files are run
(one process, ``-x``, cheapest first), and the file is written back as it was. Equivalent ones
(no behaviour changes) say why.

    .venv/bin/python scripts/mutations_state.py            # all of them (about 9 min on 2 cores)
    .venv/bin/python scripts/mutations_state.py SQ1 SS3    # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

STATE, REST, S3 = "connector/state.py", "connector/restore.py", "connector/storage/s3.py"

T_STATE, T_RANDOM, T_SNAP = "test_state", "test_state_random", "test_snapshot"
T_REST, T_CLI = "test_restore", "test_restore_cli"
T_CONTRACT, T_FAULTS, T_SEC = "test_storage_contract", "test_s3_faults", "test_security"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- state.py: merges ----------------------------------------------------------------------
    ("SQ1", "what named a merge's sources not re-pointed to the target", STATE,
     "        if key is not None and absorbed:\n            self._repoint(absorbed, into, key)",
     "        if False:\n            self._repoint(absorbed, into, key)",
     [T_STATE, T_RANDOM], None),
    ("SQ2", "a source whose ids another live object holds: what named it not re-pointed", STATE,
     "                self._repoint(ids, self._stix_id(holder) or into, holder)",
     "                pass",
     [T_STATE, T_RANDOM], None),
    ("SQ3", "a reconciliation's merge takes another live object's standard id", STATE,
     "                and not (ev.reconciled and self._standard_id_of_another(i, t_key))\n", "",
     [T_STATE, "test_reconcile"], None),
    # -- deletes -------------------------------------------------------------------------------
    ("SQ4", "a delete of an object never archived: its relationships kept", STATE,
     "            for user_key in users:\n                self._cascade(user_key, ev.id_text)",
     "            for user_key in users:\n                pass",
     [T_STATE, T_RANDOM], None),
    ("SQ5", "a cascade stops at the first object (its relationships kept)", STATE,
     "            pending.extend(users)\n", "",
     [T_STATE, T_RANDOM], None),
    ("SQ6", "a deleted object's id kept in a referrer's *_ref field", STATE,
     "                if field.endswith(\"_ref\") and value in ids:\n                    del new[field]",
     "                if field.endswith(\"_ref\") and value in ids:\n                    pass",
     [T_STATE, T_RANDOM], None),
    ("SQ7", "a deleted object's id kept in a referrer's *_refs list", STATE,
     "                    new[field] = [v for v in value if v not in ids]",
     "                    new[field] = value",
     [T_STATE, T_RANDOM], None),
    ("SQ8", "a deleted object's id kept in granted_refs", STATE,
     "            rewrite_granted_refs(new, ids, None)\n", "",
     [T_STATE, T_RANDOM], None),
    # -- standard-id changes and aliases -------------------------------------------------------
    ("SQ9", "a re-pointed *_ref field keeps the old id", STATE,
     "                if field.endswith(\"_ref\") and value in olds:\n                    new[field] = new_id",
     "                if field.endswith(\"_ref\") and value in olds:\n                    pass",
     [T_STATE, T_RANDOM], None),
    ("SQ10", "a re-pointed relationship's extension not refreshed", STATE,
     "                self._fill_relation_ext(new, moved, new_key)\n",
     "                pass\n",
     [T_STATE, T_RANDOM], None),
    ("SQ11", "a rename takes an old id another live object holds", STATE,
     "        olds = [i for i in olds if self._resolve([i]) in (None, key)]\n", "",
     [T_STATE, T_RANDOM], None),
    ("SQ12", "a stale re-send announcing an id change: what names the old id not moved", STATE,
     "                self._renamed(old.key, [previous], old.stix_id)\n", "",
     [T_STATE, T_RANDOM, T_SNAP], None),
    ("SQ13", "a stale re-send's ids not given to the object", STATE,
     "                self._add_aliases(_ADD_ALIAS, [(a, old.key) for a in _aliases_of(old.key, stix)])\n",
     "", [T_STATE, T_RANDOM, T_SNAP], None),
    # -- the reverse index and the by-key indexes ------------------------------------------------
    ("SQ14", "the reverse index built empty (objects folded before it unseen)", STATE,
     "            \"INSERT INTO refs (ref, key) SELECT j.value, o.key FROM objects o, json_each(o.refs) j\",\n",
     "", [T_STATE, T_RANDOM], None),
    ("SQ15", "a snapshot load keeps the reverse index marked as built (its rows gone)", STATE,
     "            self._indexed.discard(\"by_key\")\n", "",
     [T_SNAP, T_STATE, T_REST], None),
    ("SQ16", "the lazy indexes not re-read on open or after a rollback", STATE,
     "        self._indexed = {name for name, (marker, _) in _LAZY_INDEXES.items() if marker in names}",
     "        names.clear()",
     [T_STATE, T_SNAP], None),
    # -- versions and position -----------------------------------------------------------------
    ("SQ17", "the state's position moved back by a recovery event of a lower id", STATE,
     "        if self.as_of is None or event_id > self.as_of:\n            self.as_of = event_id",
     "        if True:\n            self.as_of = event_id",
     [T_STATE, T_RANDOM, "test_restore_until"], None),
    # -- the scratch store, the transaction, the waiting aliases --------------------------------
    ("SQ18", "a failed scratch store rolled back (without a journal) instead of discarded", STATE,
     "        if self.scratch:\n            self._discarded = True", "        if False:\n            self._discarded = True",
     [T_STATE], None),
    ("SQ19", "a kept store leaves its new aliases waiting after a commit", STATE,
     "                if not self.scratch:\n", "                if False:\n",
     [T_STATE, T_RANDOM], None),
    # -- the Bloom filter ----------------------------------------------------------------------
    ("SQ20", "a reopened store's filter not filled from its aliases", STATE,
     "        self._seen.add_many(alias for (alias,) in self._db.execute(\"SELECT alias FROM aliases\"))\n",
     "", [T_STATE, T_SNAP, T_RANDOM], None),
    ("SQ21", "aliases written at once (merges, renames, claims) not added to the filter", STATE,
     "        self._seen.add_many(alias for alias, _ in rows)\n        self._db.executemany(sql, rows)",
     "        self._db.executemany(sql, rows)",
     [T_STATE, T_RANDOM, T_SNAP], None),
    # -- loading a snapshot --------------------------------------------------------------------
    ("SQ22", "a snapshot load keeps the store's earlier tombstones", STATE,
     "            for table in (\"objects\", \"aliases\", \"refs\", \"tombstones\", \"meta\"):\n"
     "                db.execute(f\"DELETE FROM {table}\")",
     "            for table in (\"objects\", \"aliases\", \"refs\", \"meta\"):\n"
     "                db.execute(f\"DELETE FROM {table}\")",
     [T_SNAP, T_REST], None),
    ("SQ23", "a snapshot's missing part read as NotFound, not as an incomplete snapshot", STATE,
     "        except NotFound as exc:\n            raise PermanentError(f\"snapshot {as_of_key} is incomplete",
     "        except KeyError as exc:\n            raise PermanentError(f\"snapshot {as_of_key} is incomplete",
     [T_SNAP, T_REST, "test_restore_leftovers"], None),
    ("SQ24", "snapshot rows: each object's aliases one short (<= becomes <)", STATE,
     "            while nxt is not None and nxt[0] <= key:", "            while nxt is not None and nxt[0] < key:",
     [T_SNAP, T_REST], None),
    # -- push phases and to_bundle --------------------------------------------------------------
    ("SQ25", "rank 0 also yields the objects ranked later (pushed twice)", STATE,
     " AND NOT EXISTS\"\n                \" (SELECT 1 FROM temp.push_order p WHERE p.key = o.key) ORDER BY key\",",
     "\"\n                \" ORDER BY key\",",
     [T_STATE, T_REST], None),
    ("SQ26", "the push order not built again after the state changed", STATE,
     "        if self._ordered_at == db.total_changes:\n            return",
     "        if self._ordered_at >= 0:\n            return",
     [T_STATE, T_REST], None),
    ("SQ27", "a relationship of a relationship pushed with the plain relationships", STATE,
     "        return 6 if any(e.startswith((\"relationship--\", \"sighting--\")) for e in ends) else 4",
     "        return 4",
     [T_STATE, T_REST], None),
    ("SQ28", "records(after=key) repeats that key (a resumed restore pushes it again)", STATE,
     "        sql = \"SELECT key, stix_id, event_id, event, data FROM objects WHERE key > ?\"",
     "        sql = \"SELECT key, stix_id, event_id, event, data FROM objects WHERE key >= ?\"",
     [T_STATE, T_REST, "test_restore_kill"], None),
    ("SQ29", "to_bundle: a comma before the first object (not JSON)", REST,
     "            if count:\n                out.write(b\",\\n\")",
     "            if True:\n                out.write(b\",\\n\")",
     [T_CLI, T_REST], None),
    # -- s3.py: writes -------------------------------------------------------------------------
    ("SS1", "put_if_absent without If-None-Match (replaces)", S3,
     "Bucket=self.bucket, Key=full, Body=body, IfNoneMatch=\"*\", **self._args(key)",
     "Bucket=self.bucket, Key=full, Body=body, **self._args(key)",
     [T_CONTRACT], None),
    ("SS2", "a file body sent from where it was left", S3,
     "            body.seek(0)  # botocore", "            pass  # botocore",
     [T_CONTRACT], None),
    ("SS3", "a multipart part of a file body read from where the last one ended", S3,
     "    body.seek(start)\n", "",
     [T_CONTRACT], None),
    ("SS4", "a refused multipart upload not aborted (parts billed for ever)", S3,
     "            self._abort(full, upload_id)\n            if _is_precondition",
     "            if _is_precondition",
     [T_CONTRACT], None),
    ("SS5", "a large body uploaded even when its key exists", S3,
     "        if self.exists(key):\n            return False\n        part_size",
     "        part_size",
     [T_CONTRACT, T_FAULTS],
     "the completion carries If-None-Match: the store refuses it and the upload is aborted, "
     "so the same False comes back (the check only spares the upload)"),
    ("SS6", "the checkpoint and the locks written with the archive's storage class", S3,
     "        return self._record_args if key.startswith(_REWRITTEN) else self._write_args",
     "        return self._write_args",
     [T_FAULTS], None),
    # -- compare-and-swap ----------------------------------------------------------------------
    ("SS7", "an empty tag sent as If-Match", S3,
     "        if not tag:\n            return False  # an empty", "        if False:\n            return False  # an empty",
     [T_CONTRACT, T_FAULTS, "test_run_lease"], None),
    ("SS8", "any failure of a conditional replace falls back to a plain put (CAS lost)", S3,
     "                if _status_code(exc)[0] != 501:\n", "                if False:\n",
     [T_CONTRACT, T_FAULTS, "test_run_lease"], None),
    # -- listing -------------------------------------------------------------------------------
    ("SS9", "start_after not under the prefix (listing starts over)", S3,
     "            params[\"StartAfter\"] = self.prefix + start_after",
     "            params[\"StartAfter\"] = start_after",
     [T_CONTRACT], None),
    ("SS10", "a listing reads one page only (1,000 keys)", S3,
     "            for page in self._client.get_paginator(\"list_objects_v2\").paginate(**params):",
     "            for page in [self._client.list_objects_v2(**params)]:",
     [T_CONTRACT], None),
    ("SS11", "keys not under the prefix", S3,
     "        return self.prefix + check_key(key)", "        return check_key(key)",
     [T_CONTRACT], None),
    # -- retries and errors ----------------------------------------------------------------------
    ("SS12", "boto3's own retries off (one network fault fails a write)", S3,
     "retries={\"max_attempts\": 2, \"mode\": \"standard\"}",
     "retries={\"max_attempts\": 0, \"mode\": \"standard\"}",
     [T_FAULTS], None),
    ("SS13", "an unreachable endpoint taken as permanent", S3,
     "    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError):\n        return RetryableError(",
     "    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError):\n        return PermanentError(",
     [T_FAULTS], None),
    ("SS14", "no credentials at all taken as transient (retried for ever)", S3,
     "        return PermanentError(\n            f\"S3 {action} {target}: no usable AWS credentials",
     "        return RetryableError(\n            f\"S3 {action} {target}: no usable AWS credentials",
     [T_FAULTS, T_SEC], None),
    ("SS15", "a TLS verification failure taken as transient (retried for ever)", S3,
     "    if isinstance(exc, bce.SSLError) and \"CERTIFICATE_VERIFY_FAILED\" in str(exc):",
     "    if False:",
     [T_SEC, T_FAULTS], None),
    # -- secrets -------------------------------------------------------------------------------
    ("SS16", "the store's credentials not scrubbed from the service's messages", S3,
     "        self._secrets = tuple(s for s in (access_key_id, secret_access_key, session_token) if s)",
     "        self._secrets: tuple[str, ...] = ()",
     [T_FAULTS, T_SEC], None),
    ("SS17", "describe() shows the endpoint URL as given (user:password@ included)", S3,
     "            uri += f\" (endpoint {host}{f':{port}' if port else ''})\"",
     "            uri += f\" (endpoint {self.endpoint_url})\"",
     [T_CONTRACT, T_SEC], None),
    ("SS18", "an s3:// URI carrying credentials (user:secret@bucket) accepted", S3,
     "        if \"@\" in parts.netloc or parts.query or parts.fragment:",
     "        if parts.query or parts.fragment:",
     [T_CONTRACT, T_SEC, "test_settings_validation"], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
