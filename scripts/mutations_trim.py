"""Session 28's hand-made mutations of the retention check (docs/RELIABILITY.md).

The same kind of table as ``scripts/mutations.py`` (whose ``run`` this uses), for what session
28 added: the looks at the stream's oldest retained event (on connecting, and every
``connector.retention_check_secs`` through a short extra connection) that find a trim which may
have overtaken the platform's reader mid-connection (``connector/source.py``), the position of
the last look kept in the checkpoint (``connector/pipeline.py``, ``connector/__main__.py``), the
gap's span that verify leaves unchecked (``connector/verify.py``), the window a restore refuses
(``connector/restore_cli.py``), and a first recovery moved past the oldest retained event. Each mutation is a small bug put in on purpose, its test files
are run (one process, ``-x``), and the file is written back as it was. Equivalent ones (no
behaviour changes) say why.

    .venv/bin/python scripts/mutations_trim.py            # all
    .venv/bin/python scripts/mutations_trim.py TR3 TR7    # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

SRC, PIPE, MAIN = "connector/source.py", "connector/pipeline.py", "connector/__main__.py"
VERIFY, SETTINGS = "connector/verify.py", "connector/settings.py"

T_CONS, T_REC, T_VER = "test_consumer", "test_reconcile", "test_verify"
T_SET = "test_settings_validation"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- source.py: when it looks, what it compares --------------------------------------------
    ("TR1", "the retention check never runs while connected", SRC,
     "if check > 0 and now >= due:",
     "if check < 0 and now >= due:",
     [T_CONS], None),
    ("TR2", "no look on connecting (only the checks)", SRC,
     "        self._check_position(first, out)\n        self._observe_retention(first, out)\n",
     "        self._check_position(first, out)\n",
     [T_REC, T_CONS], None),
    ("TR3", "the position of the last look never moves (every trim past the first is a gap)", SRC,
     "            self._retained_through = through\n            out.append(RetainedThrough(through))",
     "            out.append(RetainedThrough(through))",
     [T_CONS], None),
    ("TR4", "the oldest retained event compared with the current position, not the last look's",
     SRC,
     "        floor = self._retained_through\n        if floor is not None and first > floor:",
     "        floor = self._retained_through\n        if floor is not None and first > "
     "(self._retained_floor() or floor):",
     [T_CONS], None),
    ("TR5", "a gap's repair leaves the last look where it was (the next look: a second gap)", SRC,
     "        self._retained_through = repaired = self._retained_floor() or first\n",
     "        repaired = self._retained_floor() or first\n",
     [T_CONS], None),
    ("TR6", "a first recovery moved leaves the last look at the older date", SRC,
     "            self._repairing(first, out)  # a look before compared with the older date\n",
     "",
     [T_CONS], None),
    ("TR7", "the gap found in a connection not marked so", SRC,
     "floor, first, self._recover_until, in_connection=True, repair_from=self._complete",
     "floor, first, self._recover_until, repair_from=self._complete",
     [T_CONS], None),
    ("TR8", "retention_gap=fail ignored for a gap found in a connection", SRC,
     '            if self.config.retention_gap != "repair":',
     "            if False:",
     [T_CONS], None),
    ("TR9", "a replay from `from` taken for a recovery (a recover date at or before it)", SRC,
     "            recover_id = None  # no recovery: the stream replays its log from ``from``",
     "            pass",
     [T_CONS], None),
    ("TR10", "a refused check said every time", SRC,
     "        if not self._check_failed_logged:\n            self._check_failed_logged = True\n",
     "        if True:\n",
     [T_CONS], None),
    ("TR11", "a refused check's answer read as the stream's oldest event", SRC,
     "                if r.status_code != 200:\n",
     "                if r.status_code == 599:\n",
     [T_CONS], None),
    ("TR12", "a first recovery moved to the platform's Date alone (whole seconds)", SRC,
     "self._recover_until = _iso(max(now, first.ms + 1))",
     "self._recover_until = _iso(now)",
     [T_CONS], None),
    # -- the pipeline, the run, settings ------------------------------------------------------
    ("TR13", "the last look's position not kept in the checkpoint", PIPE,
     "            self.checkpoint.retained_through = str(item.id)\n",
     "            pass\n",
     [T_CONS], None),
    ("TR14", "the gap found in a connection saved without its mark", PIPE,
     '                gap["in_connection"] = True\n',
     "                pass\n",
     [T_REC], None),
    ("TR15", "the run starts without the last look's position", MAIN,
     "            EventId.parse(cp.retained_through)\n",
     "            None\n",
     [T_CONS], None),
    ("TR16", "a negative retention check period accepted", SETTINGS,
     "    if c.retention_check_secs < 0:",
     "    if c.retention_check_secs < -1:",
     [T_SET], None),
    # -- verify ---------------------------------------------------------------------------------
    ("TR17", "verify checks the chains inside a gap found in a connection", VERIFY,
     "                self.unchecked.append((low, high))\n",
     "",
     [T_VER], None),
    ("TR18", "verify's chains do not restart past a gap found in a connection", VERIFY,
     "                self.chain_breaks.append(high)\n                at = max(at, high)\n",
     "",
     [T_VER], None),
    ("TR19", "verify's chains do not restart where the repair resumed", VERIFY,
     "                    at = max(at, EventId.parse(resumed))\n",
     "                    pass\n",
     [T_VER], None),
    ("TR20", "the position the repair resumed from not saved with the gap", PIPE,
     '                    gap["repair_from_event_id"] = str(item.repair_from)\n',
     "                    pass\n",
     [T_REC], None),
    ("TR22", "restore --until inside a gap found in a connection, below the archive's end, "
     "accepted", "connector/restore_cli.py",
     'if EventId.is_valid(archived) and not gap.get("in_connection"):',
     "if EventId.is_valid(archived):",
     ["test_restore_until"], None),
    ("TR21", "the gap says the last look's position as where the repair resumed", SRC,
     "floor, first, self._recover_until, in_connection=True, repair_from=self._complete",
     "floor, first, self._recover_until, in_connection=True, repair_from=floor",
     [T_CONS], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
