"""Session 27's hand-made mutations of the stream simulator (docs/RELIABILITY.md).

The same kind of table as ``scripts/mutations.py`` (whose ``run`` this uses), for the test double
every stream test trusts, which no older table mutates: ``connector/sim/server.py`` (positions
and their precedence, heartbeats and their ids, recovery and its live part, dependencies with
their trigger's id, filter translations, deletes, the container and relation paths, errors and
access, faults), ``connector/sim/store.py`` (event ids, trimming, reads, the recovery snapshot,
upserts, updates and their patches, merges, deletes and their cascade, re-creations, seeding),
``connector/sim/filters.py`` (refs, access, entity types, filter keys, operators and groups) and
``connector/sim/generator.py`` (the mixes, id changes, the bulk mode). A mutation that survives
there means the simulator could misstate the platform's protocol and no test would notice. Each
is a small bug put in on purpose, its test files are run (one process, ``-x``, cheapest first),
and the file is written back as it was. Equivalent ones (no behaviour changes) say why.

    .venv/bin/python scripts/mutations_sim.py            # all of them (about 7 min on 2 cores)
    .venv/bin/python scripts/mutations_sim.py SV1 SO3    # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

SRV, STORE = "connector/sim/server.py", "connector/sim/store.py"
FLT, GEN = "connector/sim/filters.py", "connector/sim/generator.py"

T_SIM, T_FILES, T_FID = "test_sim", "test_sim_files", "test_platform_fidelity"
T_FILTERED, T_CONSUMER, T_RACE = "test_filtered_stream", "test_consumer", "test_heartbeat_race"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- server.py: positions ------------------------------------------------------------------
    ("SV1", "the live stream takes Last-Event-ID over the from query", SRV,
     "            query, (\"q\", \"from\"), (\"h\", \"from\"), (\"h\", \"last-event-id\")\n        )\n"
     "        recover_text",
     "            query, (\"h\", \"last-event-id\"), (\"q\", \"from\"), (\"h\", \"from\")\n        )\n"
     "        recover_text",
     [T_SIM], None),
    ("SV2", "an entry at exactly a start id ahead of the log sent", SRV,
     "if k > floor or sl.kinds[i] == \"raw\"]", "if k >= floor or sl.kinds[i] == \"raw\"]",
     [T_SIM], None),
    # -- heartbeats ----------------------------------------------------------------------------
    ("SV3", "an idle heartbeat's 'now' not taken one millisecond back", SRV,
     "now_key = (self.store.now_ms() - 1 + ahead) * _SPAN",
     "now_key = (self.store.now_ms() + ahead) * _SPAN",
     [T_SIM, T_RACE], None),
    ("SV4", "an idle heartbeat below the last id sent (events of the current millisecond)", SRV,
     "key = now_key if key is None else max(key, now_key)", "key = now_key",
     [T_SIM, T_RACE], None),
    ("SV5", "an idle heartbeat never moves to now (stays at the last id sent)", SRV,
     "caught_up = self.store.bounds()[1] <= pos", "caught_up = self.store.bounds()[1] < pos",
     [T_SIM, T_CONSUMER], None),
    # -- dependencies --------------------------------------------------------------------------
    ("SV6", "a dependency sent again on the same connection (no cache)", SRV,
     "            if ref in seen or self._cached(ref):\n", "            if ref in seen:\n",
     [T_SIM, T_FID], None),
    ("SV7", "a relationship whose endpoint the user cannot see sent anyway", SRV,
     "        if not valid:\n            return  # a relationship", "        if False:\n            return  # a relationship",
     [T_SIM, T_FID], None),
    # -- recovery ------------------------------------------------------------------------------
    ("SV8", "recovery sends inferred objects without with-inferences", SRV,
     "            if _ext(obj).get(\"is_inferred\") and not self.with_inferences:\n                continue\n"
     "            if not self.visible(obj)",
     "            if not self.visible(obj)",
     [T_SIM, T_FID], None),
    ("SV9", "recovery sends objects outside the collection's filter", SRV,
     "            if not self.visible(obj) or self._cached(str(obj.get(\"id\"))):",
     "            if self._cached(str(obj.get(\"id\"))):",
     [T_SIM, T_FID, T_FILTERED], None),
    ("SV10", "the live part after a recover date starts at the recover ms, seq 0", SRV,
     "                    pos = store.position_after(*recover)",
     "                    pos = store.position_after(recover[0], 0)",
     [T_SIM],
     "the floor set with it (the recover id as given) drops every entry at or below that id "
     "wherever the read starts; only injected raw test frames, no platform entries, pass it"),
    # -- the live stream's events ----------------------------------------------------------------
    ("SV11", "listen-delete=false ignored for an object leaving the filter", SRV,
     "                if self.listen_delete:\n                    self.send_data(id_text, \"delete\", payload, key)\n"
     "                    # The platform caches",
     "                if True:\n                    self.send_data(id_text, \"delete\", payload, key)\n"
     "                    # The platform caches",
     [T_SIM, T_FILTERED], None),
    ("SV12", "a delete of an object outside the filter sent", SRV,
     "        elif stored == \"delete\":\n            if now_visible:",
     "        elif stored == \"delete\":\n            if True:",
     [T_SIM, T_FILTERED, T_FID], None),
    ("SV13", "an update outside the filter sent when no visible container holds it", SRV,
     "        if not any(self.visible(c) for c in self.store.containers_of(data)):\n            return\n",
     "", [T_SIM, T_FID], None),
    ("SV14", "a relationship outside the filter sent when none of its endpoints is in it", SRV,
     "        if not any(self.visible(o) for o in objs if o is not None):\n            return\n",
     "", [T_SIM, T_FID], None),
    # -- errors and access ---------------------------------------------------------------------
    ("SV15", "a collection's marking filter: refused unless the user has every marking", SRV,
     "        return any(w in allowed for w in wanted)", "        return all(w in allowed for w in wanted)",
     [T_SIM], None),
    ("SV16", "an attached file served to a user without its entity's markings", SRV,
     "        if found is None or not is_accessible(found[2], allowed):", "        if found is None:",
     [T_FILES, T_SIM, "test_files"], None),
    # -- faults --------------------------------------------------------------------------------
    ("SV17", "a mid_message drop cuts between messages", SRV,
     "            if not self.mid_message:\n", "            if True:\n",
     [T_SIM, T_CONSUMER], None),
    # -- store.py: ids, the log, reads ----------------------------------------------------------
    ("SO1", "two events in one millisecond get the same id", STORE,
     "        if ms > self._last_ms:\n", "        if ms >= self._last_ms:\n",
     [T_SIM], None),
    ("SO2", "a clock going back makes event ids go back", STORE,
     "        return self._last_ms * _SEQ_SPAN + self._last_seq\n",
     "        return (ms if ms < self._last_ms else self._last_ms) * _SEQ_SPAN + self._last_seq\n",
     [T_SIM], None),
    ("SO3", "compacting the trimmed log loses the absolute positions", STORE,
     "            self._base += self._head\n", "",
     [T_SIM], None),
    ("SO4", "a read from a trimmed position returns trimmed entries", STORE,
     "            li = max(pos - self._base, self._head)\n", "            li = pos - self._base\n",
     [T_SIM], None),
    ("SO5", "replay from an id includes that id", STORE,
     "li = bisect_right(self._keys, ms * _SEQ_SPAN + seq, lo=self._head)",
     "li = bisect_left(self._keys, ms * _SEQ_SPAN + seq, lo=self._head)",
     [T_SIM], None),
    # -- the recovery snapshot -----------------------------------------------------------------
    ("SO6", "an object updated at the recover date left out of recovery", STORE,
     "                if from_ms <= ms <= to_ms:", "                if from_ms <= ms < to_ms:",
     [T_SIM, T_FID], None),
    ("SO7", "recovery not ordered by internal id within a millisecond", STORE,
     "        items.sort(key=lambda t: (t[0], t[1]))", "        items.sort(key=lambda t: t[0])",
     [T_SIM, T_FID], None),
    # -- upserts, updates ----------------------------------------------------------------------
    ("SO8", "an upsert at the same millisecond as the stored version taken for stale", STORE,
     "                if stored > event_ms:", "                if stored >= event_ms:",
     [T_SIM, "test_target_opencti"], None),
    ("SO9", "an upsert moving the standard id forgets the old id", STORE,
     "        if new[\"id\"] != old[\"id\"]:\n            ids.append(old[\"id\"])\n", "",
     [T_SIM, "test_target_opencti"], None),
    # -- merges --------------------------------------------------------------------------------
    ("SO10", "a merge whose sources name the target forgets the target", STORE,
     "for s in sources) if i and i != t_iid)", "for s in sources) if i)",
     [T_SIM], None),
    ("SO11", "a merge leaves relationships' extensions naming the source", STORE,
     "            if is_relation(new):\n                octi = dict(_ext(new))\n                self._fill_relation_ext(new, octi)\n"
     "                _with_ext(new, octi)\n            self._replace(iid, obj, new)",
     "            self._replace(iid, obj, new)",
     [T_SIM], None),
    # -- deletes -------------------------------------------------------------------------------
    ("SO12", "a deleted object's id kept in a referrer's *_ref field", STORE,
     "                if key.endswith(\"_ref\") and value in ids:\n                    del new[key]",
     "                if key.endswith(\"_ref\") and value in ids:\n                    pass",
     [T_SIM], None),
    ("SO13", "a sighting whose where_sighted object is deleted kept", STORE,
     "            if is_relation(user) and any(\n"
     "                (v in ids) if isinstance(v, str) else bool(ids.intersection(v))",
     "            if is_relation(user) and any(\n                (v in ids) if isinstance(v, str) else False",
     [T_SIM], None),
    ("SO14", "a deleted object's id kept in granted_refs", STORE,
     "            rewrite_granted_refs(new, ids, None)\n", "",
     [T_SIM], None),
    ("SO15", "a delete leaves the object's attached files' bytes", STORE,
     "        for entry in _files(obj):\n            self._file_bytes.pop(file_id_of(entry) or \"\", None)\n"
     "        self._unindex_refs",
     "        self._unindex_refs",
     [T_FILES], None),
    # -- re-creation, seeding --------------------------------------------------------------------
    ("SO16", "an object created again after its delete keeps its old internal id", STORE,
     'iid = internal_id_for(sid if lives == 1 else f"{sid}#{lives}")', "iid = internal_id_for(sid)",
     [T_SIM, "test_state"], None),
    ("SO17", "a seeded relationship whose endpoint is unknown kept", STORE,
     "                if not self._endpoints_known(stix):\n", "                if False:\n",
     [T_SIM, "test_restore"], None),
    # -- filters.py ----------------------------------------------------------------------------
    ("SF1", "granted_refs not among an object's refs (no dependency, no cascade)", FLT,
     "    if isinstance(granted, list):\n        out.extend", "    if False:\n        out.extend",
     [T_SIM, T_FILTERED], None),
    ("SF2", "an object carrying an allowed and a refused marking visible", FLT,
     "    return all(m in allowed_markings for m in markings)",
     "    return any(m in allowed_markings for m in markings) or not markings",
     [T_SIM], None),
    ("SF3", "a relationship not a stix-core-relationship for entity_type filters", FLT,
     "        types |= {\"stix-core-relationship\", \"basic-relationship\"}",
     "        types |= {\"basic-relationship\"}",
     [T_SIM, T_FID], None),
    ("SF4", "an objectMarking filter by the marking's internal id matches nothing", FLT,
     "        return with_internal(as_list(stix.get(\"object_marking_refs\")))",
     "        return as_list(stix.get(\"object_marking_refs\"))",
     [T_SIM], None),
    ("SF5", "not_eq filters not negated", FLT,
     "    return not result if negate else result", "    return result",
     [T_SIM], None),
    ("SF6", "a filter's values in mode and: any of them matches", FLT,
     "    result = all(hits) if mode == \"and\" else any(hits)", "    result = any(hits)",
     [T_SIM], None),
    ("SF7", "a filter group in mode or: every filter must match", FLT,
     "    return any(results) if group.get(\"mode\") == \"or\" else all(results)",
     "    return all(results)",
     [T_SIM], None),
    ("SF8", "nested filter groups ignored", FLT,
     "    results += [match_filter_group(g, stix, resolve) for g in group.get(\"filterGroups\") or []]\n",
     "", [T_SIM], None),
    # -- generator.py --------------------------------------------------------------------------
    ("SGN1", "the generator never changes a standard id", GEN,
     "            if rng.random() < 0.05 and target.startswith(\"malware--\"):",
     "            if rng.random() < 0.0 and target.startswith(\"malware--\"):",
     [T_SIM], None),
    ("SGN2", "generate called again repeats the same objects", GEN,
     '    rng = random.Random(f"{seed}:{store.event_count}")', '    rng = random.Random(f"{seed}")',
     [T_SIM], None),
    ("SGN3", "bulk mode writes the base objects on top of its count", GEN,
     "    remaining = count - done\n", "    remaining = count\n",
     [T_SIM], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
