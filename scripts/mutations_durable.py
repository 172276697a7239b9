"""Session 24's hand-made mutations of what makes a run durable (docs/RELIABILITY.md).

The same audit as ``scripts/mutations.py`` (whose ``run`` this uses), for the parts the core
table touches only in a few places: the checkpoint (``connector/checkpoint.py``: save and load,
the atomic replace, the version, the fields a restart reads back), the pending buffer and its
spill to disk (``connector/pending.py``: head, drop, drop_tail, the byte accounting, the spill
file's cleanup), the archive sink and its segments (``connector/archive/sink.py`` and
``segment.py``: names from event ids, a re-delivered batch stored once, the manifest's fields, a
manifest rebuilt after a crash) and the source registration (``connector/registration.py``:
best effort, never in the backup's way). Each mutation is a small bug put in on purpose, the test
files named with it are run (one process, ``-x``, cheapest first), and the file is written back
as it was. Equivalent ones (no behaviour changes) say why.

    .venv/bin/python scripts/mutations_durable.py            # all of them (about 5 min on 2 cores)
    .venv/bin/python scripts/mutations_durable.py DK1 DB4    # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

CKPT, PEND = "connector/checkpoint.py", "connector/pending.py"
SINK, SEG = "connector/archive/sink.py", "connector/archive/segment.py"
REG = "connector/registration.py"

T_PEND, T_REDEL, T_POS = "test_pending", "test_sink_redelivery", "test_archive_position"
T_SPOOL, T_CONS, T_VER = "test_segment_spool", "test_consumer", "test_verify"
T_STATUS = "test_status"

_LOAD = "return cls(**{k: v for k, v in obj.items() if k in known})"


def _dropped(name: str) -> str:
    """``Checkpoint.from_json`` with one field left out: a restart reads back its default."""
    return _LOAD.replace("if k in known", f'if k in known and k != "{name}"')


# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- checkpoint.py: save, load, version, the fields a restart reads back ---------------------
    ("DK1", "the checkpoint written put-if-absent: it never moves past the first save", CKPT,
     "        self.storage.put(self.key, checkpoint.to_json())",
     "        self.storage.put_if_absent(self.key, checkpoint.to_json())",
     [T_POS, T_REDEL], None),
    ("DK3", "a field a later version adds makes the checkpoint unreadable", CKPT,
     _LOAD, "return cls(**obj)",
     [T_POS, T_STATUS], None),
    ("DK5", "saved_at never set", CKPT,
     '        checkpoint.saved_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")\n',
     "", [T_POS, T_STATUS], None),
    ("DK7", "recover_refused not read back: a restart sends recover again", CKPT,
     _LOAD, _dropped("recover_refused"), [T_POS, T_CONS], None),
    ("DK8", "first_recover_until not read back", CKPT,
     _LOAD, _dropped("first_recover_until"), [T_POS, T_VER], None),
    ("DK9", "retention_gaps not read back", CKPT,
     _LOAD, _dropped("retention_gaps"), [T_POS, T_VER], None),
    ("DK10", "a pending reconciliation not read back", CKPT,
     _LOAD, _dropped("reconcile"), [T_POS, "test_reconcile"], None),
    ("DK11", "acked_event_id not read back", CKPT,
     _LOAD, _dropped("acked_event_id"), [T_REDEL, T_POS, "test_reconcile"], None),
    # -- pending.py: head / drop / drop_tail, bytes, the spill file ------------------------------
    ("DB1", "head_bytes one spilled event short", PEND,
     "total += self._spill.size_of(n - held)", "total += self._spill.size_of(n - held - 1)",
     [T_PEND], None),
    ("DB2", "drop_head does not take the dropped bytes off memory's count", PEND,
     "        self._memory_bytes -= sum(len(e.data) for e in self._memory[:held])\n", "",
     [T_PEND], None),
    ("DB4", "truncate keeps the spill's byte count of the dropped events", PEND,
     "        self.bytes = sum(self._sizes[self.start : stop])\n", "",
     [T_PEND], None),
    ("DB5", "truncate leaves the dropped events' lines in the spill file", PEND,
     "        self._file.truncate(self._offsets[stop])\n", "",
     [T_PEND], None),
    ("DB6", "drop_tail inside memory keeps the byte count of the dropped events", PEND,
     "            self._memory_bytes = sum(len(e.data) for e in self._memory)\n", "",
     [T_PEND], None),
    ("DB7", "the spill file not closed when what is pending fits in memory again", PEND,
     "        finally:\n            spill.close()\n", "        finally:\n            pass\n",
     [T_PEND], None),
    ("DB8", "close() leaves the spill file open", PEND,
     "    def close(self) -> None:\n        self._drop_spill()", "    def close(self) -> None:\n"
     "        pass",
     [T_PEND, "test_pipeline_shutdown"], None),
    ("DB9", "after a failed spill the disk is never tried again", PEND,
     "            self._limit = self._configured  # the disk may take the next spill again\n",
     "            pass\n",
     [T_PEND], None),
    # -- archive/sink.py and segment.py --------------------------------------------------------
    ("DW1", "a segment named by the batch's first group, not its first group stored", SINK,
     "            key = segment_key(first, self.codec)", "            key = segment_key("
     "batch.first_id, self.codec)",
     [T_REDEL], None),
    ("DW2", "a manifest chained after the batch's position, not the archive's tail", SINK,
     "                after=after,\n                spool_dir=self.spool_dir,\n"
     "                spool_bytes=self.spool_bytes,\n                files=self.files is not None,\n"
     "            )\n            try:",
     "                after=batch.after_id,\n                spool_dir=self.spool_dir,\n"
     "                spool_bytes=self.spool_bytes,\n                files=self.files is not None,\n"
     "            )\n            try:",
     [T_REDEL, T_VER], None),
    ("DW3", "a sink's own writes do not move its tail", SINK,
     "                self._tail = _max(self._tail, batch.last_id)\n", "",
     [T_REDEL, "test_two_sinks_cut_everywhere"], None),
    ("DW5", "a stored manifest ending before its key: written again for ever", SINK,
     "            if covered < first:\n", "            if False:\n",
     [T_REDEL], None),
    ("DW6", "a rebuilt manifest keeps the sha256 of its re-encoding, not of the stored bytes", SINK,
     "            manifest.sha256 = tee.sha.hexdigest()\n", "",
     [T_REDEL, T_VER], None),
    ("DW7", "quarantine records stored by a failed attempt counted again by the next batch", SINK,
     "        self._stored_unreported.clear()  # counted in this result\n", "",
     [T_REDEL, "test_bad_input"], None),
    ("DW8", "the first write's scan lists the whole archive, not past its position", SINK,
     "start = segment_key(after_id, self.codec) if after_id is not None else None",
     "start = None",
     [T_REDEL, T_POS],
     "the scan skips every segment at or before the position (``first <= after_id``) and "
     "chains the first one past it after the position as before: only the listing is longer"),
    ("DM1", "raw_size leaves out the last slice of the segment", SEG,
     "        compressed(comp.compress(b\"\".join(chunk)))\n        raw_size += chunk_size\n",
     "        compressed(comp.compress(b\"\".join(chunk)))\n",
     [T_SPOOL, T_VER], None),
    ("DM2", "a manifest without files written with files: false (old archives' bytes change)",
     SEG, "        if self.files:\n            return orjson.dumps(self.__dict__)",
     "        if True:\n            return orjson.dumps(self.__dict__)",
     [T_SPOOL, T_REDEL, "test_files"], None),
    # -- registration.py: best effort ----------------------------------------------------------
    ("DR1", "a failed ping (platform down) ends the pings for the rest of the run", REG,
     "                except Exception as exc:  # noqa: BLE001 - a missed ping",
     "                except RegistrationRefused as exc:  # noqa: BLE001 - a missed ping",
     [T_CONS], None),
    ("DR2", "a non-2xx answer without GraphQL errors taken for a registration", REG,
     "    if response.status_code >= 300:\n", "    if False:\n",
     [T_CONS], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
