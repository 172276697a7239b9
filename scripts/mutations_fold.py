"""Session 24's hand-made mutations of the fold and the archive reader (docs/RELIABILITY.md).

The same kind of table as ``scripts/mutations.py`` (whose ``run`` this uses), for what its core
table leaves of ``connector/state.py`` (versions, merges, deletes and their tombstones,
standard-id changes, alias resolution, the Bloom filter, the waiting aliases, the reverse index,
the push order, the snapshot load and export, the state image's schema check),
``connector/restore.py`` (the plan, the push phases and their resume, the deletes) and the
archive's reading (``connector/archive/reader.py``, ``segment.py``'s manifests and codecs, and
``snapshot.py``'s ``fold_segments``: chain, sha256, first and last ids). Each mutation is a small
bug put in on purpose, its test files are run (one process, ``-x``, cheapest first), and the file
is written back as it was. Equivalent ones (no behaviour changes) say why.

    .venv/bin/python scripts/mutations_fold.py             # all of them (about 4 min on 2 cores)
    .venv/bin/python scripts/mutations_fold.py FD4 RS6     # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

STATE, REST = "connector/state.py", "connector/restore.py"
READER, SEG = "connector/archive/reader.py", "connector/archive/segment.py"
SNAP = "connector/snapshot.py"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- state.py: versions ------------------------------------------------------------------
    ("FD1", "the batch path compares versions by modified before updated_at", STATE,
     '    stamp = octi.get("updated_at") or stix.get("modified") or ""\n',
     '    stamp = stix.get("modified") or octi.get("updated_at") or ""\n',
     ["test_state", "test_snapshot", "test_state_random"], None),
    ("FD2", "the batch path: a re-send of the stored version not written (< becomes <=)", STATE,
     "if old is not None and old.version and version and version < old.version:",
     "if old is not None and old.version and version and version <= old.version:",
     ["test_state", "test_snapshot", "test_state_random"], None),
    ("FD3", "the platform's millisecond stamps not padded to the fixed width", STATE,
     '        return text[:23] + "000Z"\n', '        return text[:23] + "Z"\n',
     ["test_state", "test_snapshot", "test_state_random"], None),
    # -- merges ------------------------------------------------------------------------------
    ("FD4", "a merge leaves its sources live", STATE,
     "            if s_key is not None:\n                self._forget(s_key)\n", "",
     ["test_state", "test_state_random"], None),
    ("FD5", "a merge's sources' ids not moved to its target", STATE,
     "        if key is not None and absorbed:\n            self._add_aliases(",
     "        if False:\n            self._add_aliases(",
     ["test_state", "test_state_random", "test_restore"], None),
    ("FD6", "a merge's tombstones do not name the merge target", STATE,
     '            self._tombstone(s_key, s_stix, ev.id_text, "merged", into)\n',
     '            self._tombstone(s_key, s_stix, ev.id_text, "merged", None)\n',
     ["test_state", "test_state_random", "test_snapshot", "test_restore"], None),
    # -- deletes -----------------------------------------------------------------------------
    ("FD7", "a cascade removes objects without tombstones", STATE,
     '            self._tombstone(rec.key, rec.stix_id, event_id, "deleted", None)\n', "",
     ["test_state", "test_state_random"], None),
    ("FD8", "a relationship that only refers to a deleted object (not by an endpoint) deleted",
     STATE, "if len(spared) < len(hit):", "if len(spared) <= len(hit):",
     ["test_state", "test_state_random"], None),
    ("FD9", "an endpoint naming the deleted object itself by internal id taken as another", STATE,
     "        return holder is not None and holder != gone\n",
     "        return holder is not None\n",
     ["test_state", "test_state_random"],
     "the deleted object's aliases are forgotten before its users are looked at (_cascade), "
     "and a delete of an object never archived has no key (gone is None): the internal id "
     "never resolves to gone"),
    ("FD10", "a reconciliation's delete spares no id taken again by a live object", STATE,
     "        if late:\n            ids = {", "        if False:\n            ids = {",
     ["test_state", "test_reconcile"], None),
    # -- standard-id changes -----------------------------------------------------------------
    ("FD11", "the batch path folds an unannounced standard-id change as a plain upsert", STATE,
     "            elif old is not None and old.stix_id != stix_id:\n                break",
     "            elif False:\n                break",
     ["test_state", "test_state_random"], None),
    # -- alias resolution --------------------------------------------------------------------
    ("FD12", "batch resolution ignores the internal id", STATE,
     "if k is not None and (iid is None or k.key == iid or k.iid in (None, iid)):",
     "if k is not None:",
     ["test_state", "test_state_random"], None),
    # -- the Bloom filter and the waiting aliases --------------------------------------------
    ("FD13", "the filter asks another second probe than it sets (a seen id never seen)", STATE,
     "        a, b = h & self._MASK, (h >> 32) & self._MASK\n",
     "        a, b = h & self._MASK, (h >> 31) & self._MASK\n",
     ["test_state", "test_snapshot", "test_state_random"], None),
    ("FD14", "the filter asks one probe of its two", STATE,
     "return bool(bits[a >> 3] & (1 << (a & 7))) and bool(bits[b >> 3] & (1 << (b & 7)))",
     "return bool(bits[a >> 3] & (1 << (a & 7)))",
     ["test_state", "test_state_random"],
     "a Bloom filter asked fewer probes answers 'maybe' more often, never 'certainly new' for "
     "an alias it was given: every answer the fold acts on is the same, looked up in SQLite"),
    ("FD15", "a batch's new aliases not added to the filter", STATE,
     "        self._seen.add_many(queued)\n", "",
     ["test_state", "test_snapshot", "test_state_random"], None),
    ("FD16", "after a snapshot, the direct lookups ask internal ids only", STATE,
     "                wanted.update(item[4])\n            self._unfiltered_budget",
     "            self._unfiltered_budget",
     ["test_snapshot", "test_state", "test_restore_every_point"], None),
    ("FD17", "lookups miss the aliases still waiting in memory", STATE,
     "        waiting = {a: self._new_aliases[a] for a in ids if a in self._new_aliases}\n",
     "        waiting: dict[str, str] = {}\n",
     ["test_state", "test_snapshot", "test_state_random"], None),
    ("FD18", "the per-event path resolves before the waiting aliases are written", STATE,
     '        self._flush_new_aliases()\n        self._index("by_key")\n',
     '        self._index("by_key")\n',
     ["test_state", "test_state_random"], None),
    # -- the reverse index -------------------------------------------------------------------
    ("FD19", "a batch update's new refs not indexed once the reverse index exists", STATE,
     "            db.executemany(\n                _ADD_REF, [(r, k) for k, p in pending.items()"
     " for r in p.refs - p.db_refs]\n            )\n", "",
     ["test_state", "test_state_random"], None),
    # -- snapshot load and export, the state image -------------------------------------------
    ("FD20", "snapshot load: the headers of lines under older row rules trusted", STATE,
     "        trusted = rows == SNAPSHOT_ROWS\n", "        trusted = True\n",
     ["test_snapshot", "test_restore"], None),
    ("FD21", "snapshot load: the tombstones left out", STATE,
     "            db.executemany(\n                \"INSERT OR REPLACE INTO tombstones VALUES"
     " (?, ?, ?, ?, ?)\",\n                (tuple(t) for t in tombstones),\n            )\n",
     "            list(tombstones)\n",
     ["test_snapshot", "test_restore"], None),
    ("FD22", "snapshot load: a derived line's listed aliases left out", STATE,
     "_aliases_of(key, stix) + extra", "_aliases_of(key, stix)",
     ["test_snapshot", "test_restore"], None),
    ("FD23", "header-only load: a header with its fields in another order taken", STATE,
     "    if type(head) is not dict or tuple(head) != _SNAPSHOT_HEADER:",
     "    if type(head) is not dict or set(head) != set(_SNAPSHOT_HEADER):",
     ["test_snapshot", "test_restore"], None),
    ("FD24", "the state image's own lazy indexes taken for a foreign schema", STATE,
     "        own |= {name for _, sqls in _LAZY_INDEXES.values() for name in _index_names(sqls)}\n",
     "", ["test_snapshot", "test_restore", "test_verify"], None),
    ("FD25", "fold_lines: the group id starts from zero, not the segment's first group", STATE,
     "            hwm: tuple[int, int] = first\n", "            hwm: tuple[int, int] = (0, 0)\n",
     ["test_state", "test_restore_until", "test_restore_every_point",
      "test_restore_recovery_memory"], None),
    ("FD26", "a standard id refused in a fold batch not claimed", STATE,
     "                    claimed.append((_CLAIM + alias, key))", "                    pass",
     ["test_state"], None),
    ("FD27", "a standard id refused on the per-event path not claimed", STATE,
     "            alias = stix_id if holder[1] != stix_id else _CLAIM + stix_id\n",
     "            alias = stix_id\n            if holder[1] == stix_id:\n                return\n",
     ["test_state"], None),
    ("FD28", "a forgotten object's claimed ids not handed over", STATE,
     "        if handed:\n            self._add_aliases(_ADD_ALIAS, handed)",
     "        if False:\n            self._add_aliases(_ADD_ALIAS, handed)",
     ["test_state"], None),
    ("FD29", "a renamed object keeps an old id another live object claims", STATE,
     "rows = [(i, self._claimer(i) or key) for i in olds]", "rows = [(i, key) for i in olds]",
     ["test_state"], None),
    ("FD30", "a claim dropped once the claimer's own standard id changed", STATE,
     "\" WHERE c.key != ? AND c.alias IN",
     "\" WHERE o.stix_id = substr(c.alias, 7) AND c.key != ? AND c.alias IN",
     ["test_state"], None),
    # -- push order --------------------------------------------------------------------------
    ("RS1", "a chain of references not ranked link by link (the depth never grows)", STATE,
     " SELECT t.key, t.phase, max(e.depth) + 1 FROM t JOIN e USING (key)",
     " SELECT t.key, t.phase, max(e.depth) FROM t JOIN e USING (key)",
     ["test_state", "test_restore"], None),
    # -- restore.py --------------------------------------------------------------------------
    ("RS2", "to_bundle leaves out the last push phase", REST,
     "    for phase in range(len(PHASES)):\n        # The stored bytes",
     "    for phase in range(len(PHASES) - 1):\n        # The stored bytes",
     ["test_restore", "test_restore_until", "test_restore_cli"], None),
    ("RS3", "a resumed restore skips the phase it stopped in", REST,
     "        if step < resume.step:\n            continue", "        if step <= resume.step:\n"
     "            continue", ["test_restore", "test_restore_kill"], None),
    ("RS4", "a resumed push phase restarts at rank 0 after its last key", REST,
     "        return self.last_rank, self.last_key", "        return 0, self.last_key",
     ["test_restore", "test_restore_kill"], None),
    ("RS5", "a later step resumes after the key an earlier one stopped at", REST,
     "        return (self.last_key or None) if step == self.step else None",
     "        return self.last_key or None",
     ["test_restore", "test_restore_kill"], None),
    ("RS6", "a tombstoned id a live object answers to deleted on the target", REST,
     "        if state.get(tomb.stix_id) is not None:\n            if tomb.reason != \"merged\":",
     "        if False:\n            if tomb.reason != \"merged\":",
     ["test_restore", "test_restore_every_point"], None),
    ("RS7", "merged-away sources deleted without asking what the target holds under them", REST,
     "        doomed = [sid for sid in pending if held.get(sid) == sid]",
     "        doomed = list(pending)", ["test_restore", "test_restore_every_point"], None),
    ("RS8", "tombstoned ids the target holds as another entity's aliases deleted", REST,
     "            doomed = [sid for sid in ids if held.get(sid) == sid]",
     "            doomed = list(ids)", ["test_restore", "test_restore_every_point"], None),
    ("RS9", "the progress fingerprint leaves out the archived state", REST,
     '        "state_sha256": state_sha256(state),\n', "",
     ["test_restore", "test_restore_kill"], None),
    # -- archive reader, manifests, codecs ---------------------------------------------------
    ("AR1", "ArchiveReader.events: the group at until left out", READER,
     "        if until is not None and hwm > until:\n            return\n        yield ev",
     "        if until is not None and hwm >= until:\n            return\n        yield ev",
     ["test_restore_until", "test_restore_cli"], None),
    ("AR2", "ArchiveReader.events: a segment ending at the position read again", READER,
     "            if done is not None and m.last <= done:\n                continue",
     "            if done is not None and m.last < done:\n                continue",
     ["test_restore_until", "test_restore_cli"],
     "group_filter skips all of its events: their group ids are at most its last, which is done"),
    ("AR3", "newest(): the oldest manifest taken for the archive's end", READER,
     "        for key in reversed(keys):", "        for key in keys:",
     ["test_segment_spool", "test_archive_position", "test_sink_redelivery"], None),
    ("AR4", "segment_events decodes every segment as zstd, whatever its manifest's codec", READER,
     "iter_segment_lines(fh, manifest.codec)", 'iter_segment_lines(fh, "zstd")',
     ["test_segment_spool", "test_reconcile", "test_sink_redelivery", "test_restore_cli"], None),
    ("AR5", "read_manifest: the end of the rows cut between two reads missed", SEG,
     "            rest = rest[-(len(_ROWS_END) - 1) :] + chunk", "            rest = chunk",
     ["test_segment_spool"], None),
    ("AR6", "a zstd body of several frames read up to its first frame", SEG,
     "read_across_frames=True", "read_across_frames=False",
     ["test_segment_spool"],
     "zstandard (0.25) ends a read() at a frame's end without it, and the next read goes on into "
     "the next frame; every reader here reads to the end (test: a segment of several frames)"),
    ("AR7", "a restore's fold decodes every segment as zstd, whatever its manifest's codec",
     SNAP, "iter_segment_lines(body, m.codec),  # type: ignore[arg-type]",
     'iter_segment_lines(body, "zstd"),  # type: ignore[arg-type]',
     ["test_segment_spool", "test_restore", "test_snapshot", "test_restore_until"], None),
    ("AR8", "a restore folds a segment whose sha256 differs from its manifest", SNAP,
     "            body.check()\n        segments += 1", "        segments += 1",
     ["test_segment_spool", "test_restore", "test_snapshot", "test_verify"], None),
    ("AR9", "a manifest whose last id is not its events' end folded", SNAP,
     "        if state.as_of != m.last:\n            # The segment's",
     "        if False:\n            # The segment's",
     ["test_restore", "test_snapshot", "test_verify"], None),
    ("AR10", "fold_segments does not advance the state to the segment's last id", SNAP,
     "        state.advance(m.last)\n        last_key = ref.manifest_key",
     "        last_key = ref.manifest_key",
     ["test_restore", "test_snapshot"],
     "the check just before raised unless the state's position is already the segment's last id"),
    ("AR11", "a segment naming no predecessor (after_event_id null) after others: the fold fails", SNAP,
     "            and m.after_event_id is not None\n", "",
     ["test_segment_spool", "test_restore", "test_snapshot", "test_verify"], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
