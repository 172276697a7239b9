"""Session 25's hand-made mutations of the AMQP transport, the pipeline and the commands
(docs/RELIABILITY.md).

The same audit as ``scripts/mutations.py`` (whose ``run`` this uses), for code the earlier tables
touch only in a few places: the AMQP publisher (``connector/target/amqp.py``: the message's
fields, the merge's pre-upsert and the aliases left out, the transaction chunks, returned
messages, a too large message, the links given up), the pipeline's loop around the core
(``connector/pipeline.py``: the batching limits, the checkpoint moving only once every sink is
durable, quarantine, the drain at shutdown), the commands (``connector/__main__.py``: exit codes,
the checks at start-up), and the small shared pieces (``connector/sink.py``,
``connector/stix_lookup.py``). Each mutation is a small bug put in on purpose, the test files
named with it are run (one process, ``-x``, cheapest first), and the file is written back as it
was. Equivalent ones (no behaviour changes) say why.

    .venv/bin/python scripts/mutations_flow.py            # all of them
    .venv/bin/python scripts/mutations_flow.py FL1 FL20   # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``). The AMQP tests
need ``rabbitmq-server`` (see ``.ci/run``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

AMQP, PIPE, MAIN = "connector/target/amqp.py", "connector/pipeline.py", "connector/__main__.py"
SINK, LOOKUP = "connector/sink.py", "connector/stix_lookup.py"

T_AMQP, T_SIZE, T_SILENT = "test_target_amqp", "test_target_amqp_size", "test_target_amqp_silent"
T_OCTI, T_FILES = "test_target_opencti", "test_target_files"
T_REDEL, T_SHUT, T_BAD = "test_sink_redelivery", "test_pipeline_shutdown", "test_bad_input"
T_POS, T_REC, T_LEASE = "test_archive_position", "test_reconcile", "test_run_lease"
T_SET, T_SEC, T_IDENT = "test_settings_validation", "test_security", "test_source_identity"
T_QMEM, T_FAULTS = "test_quarantine_memory", "test_faults"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- amqp.py: the messages ------------------------------------------------------------------
    ("FL1", "amqp: the source's event_id replaced by the stream id", AMQP,
     '"event_id": str(ev.envelope.get("event_id") or ev.id_text),',
     '"event_id": str(ev.id_text),',
     [T_AMQP], None),
    ("FL2", "amqp: every message says synchronized (removals propagate without perfect sync)",
     AMQP, '        "synchronized": synchronized,\n', '        "synchronized": True,\n',
     [T_AMQP], None),
    ("FL3", "amqp: previous_standard never sent", AMQP,
     'prev = previous_standard(ev) if event_type == "update" else None', "prev = None",
     [T_AMQP], None),
    ("FL4", "amqp: the event's context left out of the message", AMQP,
     '    if context is not None:\n        payload["context"] = context\n', "",
     [T_AMQP], None),
    ("FL5", "amqp: a merge's pre-upsert keeps its own sources' ids among the aliases", AMQP,
     "pre = without_aliases(data, later_sources | merge_source_ids(ev))",
     "pre = without_aliases(data, later_sources)",
     [T_AMQP], None),
    ("FL6", "amqp: a merge sent before the upsert of its target", AMQP,
     '                _message(ev, pre, "update", applicant_id, synchronized),\n'
     '                _message(ev, data, kind, applicant_id, synchronized),\n',
     '                _message(ev, data, kind, applicant_id, synchronized),\n'
     '                _message(ev, pre, "update", applicant_id, synchronized),\n',
     [T_AMQP], None),
    ("FL7", "amqp: an upsert keeps ids a merge of a later batch takes (live aliases)", AMQP,
     "later_sources | others | live_aliases_of(live_aliases, ev)", "later_sources | others",
     [T_AMQP], None),
    ("FL8", "amqp: a delete not told to the file carrier (a re-created object lacks its files)",
     AMQP, "            forget(data)  # (a file", "            pass  # (a file",
     [T_FILES, T_AMQP], None),
    ("FL9", "amqp: files carried for an event whose own message is over the limit", AMQP,
     "if limit is None or max(len(body) for body in own) <= limit():", "if True:",
     [T_FILES, T_SIZE], None),
    # -- amqp.py: the publisher ------------------------------------------------------------------
    ("FL10", "amqp: each transaction leaves out its chunk's last message", AMQP,
     "chunk = bodies[start : start + _TX_CHUNK]", "chunk = bodies[start : start + _TX_CHUNK - 1]",
     [T_AMQP], None),
    ("FL11", "amqp: a link given up goes on publishing the next chunks", AMQP,
     "                if link.retired:  # the caller gave up: its retry sends the batch again\n"
     "                    raise _NoAnswer()\n", "",
     [T_SILENT], None),
    ("FL12", "amqp: a return not dispatched before the commit's check", AMQP,
     "        link.conn.process_data_events(time_limit=0)\n        if link.returned:",
     "        if link.returned:",
     [T_AMQP], None),
    ("FL13", "amqp: the broker's max_message_size not learned from its refusal", AMQP,
     "int(found.group(1)) if found else None,", "None,",
     [T_SIZE], None),
    ("FL14", "amqp: a broker shutting down (320) taken as permanent", AMQP,
     "if code in (320, 541):", "if code in (541,):",
     [T_AMQP, T_SILENT], None),
    ("FL15", "amqp: the broker password not scrubbed from an error", AMQP,
     'return (text.replace(password, "***") if password else text)[:400]', "return text[:400]",
     [T_AMQP, T_SEC], None),
    ("FL16", "amqp: links given up that ended never forgotten (no new connection after two)", AMQP,
     "            self._retired = [old for old in self._retired if old.alive]\n", "",
     [T_SILENT, T_AMQP], None),
    ("FL17", "amqp: a publish making progress given up after the timeout all the same", AMQP,
     "            if (now := progress()) != seen:\n", "            if False and (now := progress()):\n",
     [T_SILENT], None),
    ("FL18", "amqp: the amqp_use_ssl override ignored", AMQP,
     'use_ssl=bool(conn.get("use_ssl")) if use_ssl is None else use_ssl,',
     'use_ssl=bool(conn.get("use_ssl")),',
     [T_AMQP], None),
    # -- pipeline.py: batching, the checkpoint, quarantine, shutdown -----------------------------
    ("FL19", "a sink written without the lease's guard (a run taken over writes on)", PIPE,
     "        guard()\n        sink.write(batch)\n", "        sink.write(batch)\n",
     [T_LEASE], None),
    ("FL20", "the checkpoint saved without the lease's guard", PIPE,
     "            self.guard()\n            self.store.save(self.checkpoint)\n",
     "            self.store.save(self.checkpoint)\n",
     [T_LEASE], None),
    ("FL21", "the checkpoint may move back (a batch below the saved position)", PIPE,
     "            if self._saved_id is None or done > self._saved_id:\n", "            if True:\n",
     [T_REDEL, "test_recovery_hold_review", T_REC], None),
    ("FL22", "the checkpoint stops at the batch's last group, not at its completing id", PIPE,
     "done = max(batch.last_id, self._complete_id or batch.last_id)", "done = batch.last_id",
     [T_REDEL, "test_heartbeat_race"], None),
    ("FL23", "a Fatal item read while draining raised instead of the drain's flush", PIPE,
     "                if not isinstance(item, Fatal):\n", "                if True:\n",
     [T_SHUT, T_REDEL], None),
    ("FL24", "a drain past the shutdown timeout writes one more batch", PIPE,
     "if (self._complete_n or self._quarantined) and time.monotonic() >= self._deadline:",
     "if False:",
     [T_SHUT], None),
    ("FL25", "quarantined bytes left out of the max_bytes limit", PIPE,
     "self._pending.bytes + self._quarantined_bytes >= self.policy.max_bytes",
     "self._pending.bytes >= self.policy.max_bytes",
     [T_BAD, T_QMEM], None),
    ("FL26", "a quarantined event starts no age: a quarantine-only batch waits for more", PIPE,
     "            if self._oldest is None:\n                self._oldest = time.monotonic()\n"
     "            self._quarantined.append(item)",
     "            self._quarantined.append(item)",
     [T_BAD], None),
    ("FL27", "quarantine records not cleared after their batch (written again with the next)",
     PIPE, "        self._quarantined = []\n        self._quarantined_bytes = 0\n",
     "        self._quarantined_bytes = 0\n",
     [T_BAD, T_REDEL], None),
    ("FL28", "events a target refused not stored in the archive's quarantine", PIPE,
     "        if archives:\n            record = Batch(", "        if False:\n            record = Batch(",
     [T_FAULTS], None),
    ("FL29", "a stop's shutdown timeout counts from the retry, not from the signal", PIPE,
     "                    stopping = _stopped_at(stop)\n",
     "                    stopping = time.monotonic()\n",
     [T_SHUT], None),
    ("FL30", "a Bounded sink not told the shutdown deadline", PIPE,
     "                sink.deadline = self._shutdown_deadline\n", "                pass\n",
     [T_SILENT], None),
    ("FL31", "a reconciliation compares with the newest acknowledged state, not the oldest", PIPE,
     '{"as_of": str(min(points))}', '{"as_of": str(max(points))}',
     [T_REC], None),
    # -- __main__.py: exit codes and start-up checks ---------------------------------------------
    ("FL32", "a configuration error exits 1, not 2", MAIN,
     '        print(f"opencti-sync: configuration error: {exc}", file=sys.stderr)\n        return 2',
     '        print(f"opencti-sync: configuration error: {exc}", file=sys.stderr)\n        return 1',
     [T_SET], None),
    ("FL33", "a run stopped on a permanent error exits 0", MAIN,
     '        print(f"opencti-sync: {exc}", file=sys.stderr)\n        return 1\n    except Terminated:',
     '        print(f"opencti-sync: {exc}", file=sys.stderr)\n        return 0\n    except Terminated:',
     ["test_status"], None),
    ("FL34", "a run whose archive another run took over exits 0", MAIN,
     "        lease.check()  # raises LeaseLost", "        pass  # raises LeaseLost",
     [T_LEASE], None),
    ("FL35", "a missing source token not refused at start", MAIN,
     "    if not settings.opencti.token:\n        raise", "    if False:\n        raise",
     [T_SET], None),
    ("FL36", "an archive of another stream followed on", MAIN,
     "    elif cp.stream_id != c.live_stream_id:\n", "    elif False:\n",
     [T_IDENT], None),
    ("FL37", "--resume-from-archive: the archive's newest segment not delivered to the target",
     MAIN, 'tail_due = cp is not None and any(s.name != "archive" for s in runtime["sinks"])',
     "tail_due = False",
     [T_FAULTS], None),
    ("FL38", "a first run's checkpoint not saved before its first batch (recover date lost)",
     MAIN, "        store.save(cp)  # the recover end date must survive a crash", "        pass  #",
     [T_POS, "test_consumer"], None),
    ("FL39", "check: a source answering non-200 still exits 0", MAIN,
     "                ok = False\n                print(f\"source   FAIL  {url}{path}: HTTP",
     "                print(f\"source   FAIL  {url}{path}: HTTP",
     [T_SET, T_SEC], None),
    ("FL40", "a work dir database error shown as a traceback", MAIN,
     'if type(exc).__module__ != "sqlite3":', "if True:",
     [T_SET, "test_restore_cli"], None),
    # -- sink.py and stix_lookup.py ---------------------------------------------------------------
    ("FL41", "every batch taken for a replay (a look-up of the target per batch)", SINK,
     "    replay: bool = False\n", "    replay: bool = True\n",
     [T_OCTI],
     "the guard (common.Absorbed) leaves out an event only when the target resolves its "
     "object's id to another entity and nothing earlier in the batch freed the id; a batch the "
     "target never took starts from the source's own state, where the same id resolves the same "
     "way, so the source sends no such event: only a look-up per batch is added (api only)"),
    ("FL42", "stix_lookup: each query of 100 ids leaves out its last id", LOOKUP,
     "chunk = ids[start : start + BATCH]", "chunk = ids[start : start + BATCH - 1]",
     [T_OCTI, T_REC], None),
    ("FL43", "stix_lookup: the answer's entities read one place off", LOOKUP,
     'text = data.get(f"a{n}")', 'text = data.get(f"a{n + 1}")',
     [T_OCTI, T_REC], None),
    ("FL44", "stix_lookup: the entity's internal id dropped", LOOKUP,
     "out[ref] = (sid, iid if isinstance(iid, str) and iid else None)", "out[ref] = (sid, None)",
     [T_REC], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
