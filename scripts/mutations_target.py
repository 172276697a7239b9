"""Session 23's hand-made mutations of the target and the files (docs/RELIABILITY.md).

The same audit as ``scripts/mutations.py`` (whose ``run`` this uses), for the second platform
(``connector/target/``: the API push, the AMQP publisher, their shared rules) and the attached
files (``connector/files.py``): each mutation is a small bug put into the code on purpose, the
test files named with it are run (one process, ``-x``, cheapest first), and the file is written
back as it was. Equivalent mutations (no behaviour changes; why, with each) survive by design.

    .venv/bin/python scripts/mutations_target.py           # all of them
    .venv/bin/python scripts/mutations_target.py O8 F5     # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``). The AMQP tests
need ``rabbitmq-server`` (see ``.ci/run``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

OCTI, COMMON = "connector/target/opencti.py", "connector/target/common.py"
AMQP, FILES = "connector/target/amqp.py", "connector/files.py"

T_OCTI, T_FILES, T_ARCH = "test_target_opencti", "test_target_files", "test_files"
T_AMQP, T_SIZE = "test_target_amqp", "test_target_amqp_size"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- common.py: rules shared by both transports --------------------------------------------
    (
        "C2",
        "a merge's own sources counted among the later merges' sources",
        COMMON,
        "self._after[bisect.bisect_right(self._positions, index)]",
        "self._after[bisect.bisect_left(self._positions, index)]",
        [T_OCTI, T_AMQP],
        None,
    ),
    (
        "C4",
        "a merge does not free its sources' ids in LiveIds",
        COMMON,
        "            for gone in merge_source_ids(ev):\n                live.pop(gone, None)\n",
        "",
        [T_OCTI, T_AMQP],
        (
            "the ids a merge keeps in LiveIds name its target: they are only ever dropped "
            "from the merge target's later upserts, and the merge gave them to it already "
            "(an upsert adds aliases, never removes one: the platform, the double)"
        ),
    ),
    (
        "C5",
        "a rename back to an alias of the renamed entity taken for a replay",
        COMMON,
        "skip = into is not None and into != prev",
        "skip = into is not None",
        [T_OCTI],
        None,
    ),
    (
        "C6",
        "a delete in the batch does not free its id (Absorbed)",
        COMMON,
        '        if ev.event == "delete" and not left_the_view(ev):\n            gone.add(ev.stix_id)\n'
        '        elif ev.event == "merge":',
        '        if ev.event == "merge":',
        [T_OCTI],
        None,
    ),
    (
        "C7",
        "a merge in the batch does not free its sources' ids (Absorbed)",
        COMMON,
        "            gone |= merge_source_ids(ev)\n",
        "            pass\n",
        [T_OCTI],
        None,
    ),
    (
        "C8",
        "a rename in the batch does not free the previous id (Absorbed)",
        COMMON,
        "        elif prev is not None:\n            gone.add(prev)\n",
        "",
        [T_OCTI],
        None,
    ),
    # -- opencti.py: the API push and the replay guard -----------------------------------------
    (
        "O1",
        "the pushing_to mark not saved before the batch's first push",
        OCTI,
        "self._ping(force=True)  # before any push of the batch",
        "self._ping()  # before any push of the batch",
        [T_OCTI],
        None,
    ),
    (
        "O2",
        "a batch starting at the pushing_to mark not guarded",
        OCTI,
        "(until is not None and batch.first_id <= until)",
        "(until is not None and batch.first_id < until)",
        [T_OCTI],
        None,
    ),
    (
        "O3",
        "a batch retried after a failure not guarded",
        OCTI,
        "            self._after_failure = True  # what it pushed may be pushed again: a replay\n",
        "",
        [T_OCTI],
        None,
    ),
    (
        "O4",
        "a batch the pipeline marks as a replay not guarded",
        OCTI,
        "            or batch.replay\n",
        "",
        [T_OCTI, "test_sync_restore"],
        None,
    ),
    (
        "O6",
        "an object resolved to its own id taken as absorbed",
        OCTI,
        "if into is not None and into != sid:",
        "if into is not None:",
        [T_OCTI],
        None,
    ),
    (
        "O7",
        "an alias dropped when the target does not know the upsert's own id",
        OCTI,
        "            if own is None:\n                continue\n            other",
        "            other",
        [T_OCTI, T_AMQP],
        None,
    ),
    (
        "O8",
        "a push counted done without the platform's stixBundlePush answer",
        OCTI,
        'if not isinstance(result, dict) or not (result.get("data") or {}).get("stixBundlePush"):',
        "if not isinstance(result, dict):",
        [T_OCTI],
        None,
    ),
    (
        "O9",
        "a one-object push quarantined whatever the refusal",
        OCTI,
        "            if not isinstance(error, ObjectRefused):\n                raise error\n",
        "",
        [T_OCTI],
        None,
    ),
    (
        "O11",
        "a refused object's record named by the batch, not its event",
        OCTI,
        "own = EventId.parse(event) if event is not None and EventId.is_valid(event) else after",
        "own = after",
        [T_OCTI],
        None,
    ),
    (
        "O14",
        "an upsert push may hold one object more than max_bundle_objects",
        OCTI,
        "if ev.stix_id not in upserts and len(upserts) >= max_objects:",
        "if ev.stix_id not in upserts and len(upserts) > max_objects:",
        [T_OCTI],
        None,
    ),
    (
        "O16",
        "an id-changing update shares the push of the upserts before it",
        OCTI,
        "            if prev is not None:\n                flush_upserts()\n",
        "            if prev is not None:\n",
        [T_OCTI],
        None,
    ),
    (
        "O17",
        "a merge's last upsert (the target's final content) left out",
        OCTI,
        '                pushes.append(Push("upsert", [without_aliases(stix, later_sources)], ids, ids))\n',
        "",
        [T_OCTI],
        None,
    ),
    (
        "O19",
        "a delete push does not forget the objects' files",
        OCTI,
        "                for obj in push.objects:\n                    files.forget(obj)\n",
        "                pass\n",
        [T_FILES],
        None,
    ),
    (
        "O20",
        "files pushed for an object the platform refused",
        OCTI,
        "if index not in refused and files.pending(obj):",
        "if files.pending(obj):",
        [T_FILES, T_OCTI],
        None,
    ),
    (
        "O21",
        "a failed status ping after a durable batch fails the batch",
        OCTI,
        "        try:\n            self._ping()\n        except RetryableError as exc:",
        "        self._ping()\n        try:\n            pass\n        except RetryableError as exc:",
        [T_AMQP],
        None,
    ),
    (
        "O22",
        "amqp: files of a chunk counted carried though not committed",
        OCTI,
        "self._carried(sendable[: self.publisher.committed])",
        "self._carried(sendable)",
        [T_SIZE, T_FILES],
        None,
    ),
    (
        "O23",
        "amqp: committed messages published again after a size refusal",
        OCTI,
        "pending = sendable[self.publisher.committed :]",
        "pending = sendable",
        [T_SIZE],
        None,
    ),
    # -- amqp.py: the publisher -----------------------------------------------------------------
    (
        "Q1",
        "a chunk counted taken before the broker's commit-ok",
        AMQP,
        "                    self._commit(link, channel)\n                    taken[0] += len(chunk)\n",
        "                    taken[0] += len(chunk)\n                    self._commit(link, channel)\n",
        [T_AMQP, T_SIZE],
        None,
    ),
    (
        "Q2",
        "a message returned as unroutable not noticed at commit",
        AMQP,
        "        if link.returned:\n            returned, link.returned",
        "        if False:\n            returned, link.returned",
        [T_AMQP],
        None,
    ),
    (
        "Q4",
        "a queue's nack (partial tx) taken as permanent",
        AMQP,
        'if code == 406 and "partial tx" in str(exc.reply_text):',
        'if code == 406 and "partial tx" in str(exc.reply_text) and False:',
        [T_AMQP],
        None,
    ),
    (
        "Q5",
        "a merge not preceded by an upsert of its target",
        AMQP,
        '                _message(ev, pre, "update", applicant_id, synchronized),\n',
        "",
        [T_AMQP],
        None,
    ),
    # -- files.py: archive and carry of attached files -----------------------------------------
    (
        "F1",
        "a file's key ignores its version",
        FILES,
        "text = f\"{entry['uri']}\\n{version if isinstance(version, str) else ''}\"",
        "text = f\"{entry['uri']}\\n\"",
        [T_ARCH, T_FILES],
        None,
    ),
    (
        "F2",
        "a file recorded missing downloaded again at each restart",
        FILES,
        'if not (self.storage.exists(key) or self.storage.exists(key + ".missing")):',
        "if not self.storage.exists(key):",
        [T_ARCH],
        None,
    ),
    (
        "F5",
        "a download with a limit stops at exactly the limit",
        FILES,
        "if limit is not None and into.size > limit:",
        "if limit is not None and into.size >= limit:",
        [T_FILES],
        None,
    ),
    (
        "F7",
        "a file the archive recorded missing asked from the source again",
        FILES,
        '                if self.archive.exists(key + ".missing"):\n                    raise',
        "                if False:\n                    raise",
        [T_FILES],
        None,
    ),
    (
        "F8",
        "a retried batch does not free the files its failed attempt claimed",
        FILES,
        "        self._claimed.clear()\n        self._stale.clear()\n",
        "        self._stale.clear()\n",
        [T_FILES],
        None,
    ),
    (
        "F9",
        "a deleted object's files stay carried",
        FILES,
        "            self._done.pop(key, None)\n",
        "",
        [T_FILES],
        None,
    ),
    (
        "F10",
        "a file claimed in the batch claimed again by a later event",
        FILES,
        "if (key := file_key(e)) not in self._done and key not in self._claimed",
        "if (key := file_key(e)) not in self._done",
        [T_FILES],
        (
            "pending() only decides whether _push_files is called: one_by_one, which "
            "both transports use, skips a claimed key itself, so nothing more is sent"
        ),
    ),
    (
        "F12",
        "a file of exactly max_file_mb left out",
        FILES,
        "if self.archive.size(key) > self.max_bytes:",
        "if self.archive.size(key) >= self.max_bytes:",
        [T_FILES],
        None,
    ),
]


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
