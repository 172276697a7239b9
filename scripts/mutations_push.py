"""Session 26's hand-made mutations of the restore and the OpenCTI target (docs/RELIABILITY.md).

The same kind of table as ``scripts/mutations.py`` (whose ``run`` this uses), for the modules the
older tables touched in a few places only: the API push to a second platform
(``connector/target/opencti.py``: bundles, merges, deletes, refusals stored, retries, files, the
replay mark) and its shared rules (``connector/target/common.py``), the restore
(``connector/restore.py``: the plan, the push order by phases, deletes, the progress file a
restore resumes from, the bundle) and its command (``connector/restore_cli.py``: options, checks,
exit codes, ``verify --against-opencti``). Each mutation is a small bug put in on purpose, the
test files named with it are run (one process, ``-x``, cheapest first), and the file is written
back as it was. Equivalent ones (no behaviour changes) say why.

    .venv/bin/python scripts/mutations_push.py            # all of them (about 15 min, 1 process)
    .venv/bin/python scripts/mutations_push.py PU1 PU30   # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

OCTI, COMMON = "connector/target/opencti.py", "connector/target/common.py"
REST, RCLI = "connector/restore.py", "connector/restore_cli.py"

T_OCTI, T_TFILES, T_FILES = "test_target_opencti", "test_target_files", "test_files"
T_REST, T_RCLI, T_SYNC = "test_restore", "test_restore_cli", "test_sync_restore"
T_KILL, T_LEFT, T_UNTIL = "test_restore_kill", "test_restore_leftovers", "test_restore_until"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- opencti.py: errors and what they mean (retry, stop, quarantine, secrets) ----------------
    ("PU1", "the target's token shown in an error", OCTI,
     "for secret in (self._token, self._source_token):", "for secret in (self._source_token,):",
     [T_OCTI], None),
    ("PU2", "a connection error not retried (permanent)", OCTI,
     'return RetryableError(f"{where}: {type(exc).__name__}: {self._scrub(str(exc))}")',
     'return PermanentError(f"{where}: {type(exc).__name__}: {self._scrub(str(exc))}")',
     [T_OCTI], None),
    ("PU3", "a 429 (too many requests) not retried", OCTI,
     "if status is None or status == 429 or status >= 500 or status == 200:",
     "if status is None or status >= 500 or status == 200:",
     [T_OCTI], None),
    ("PU4", "a 200 with an unreadable body (a proxy, a restarting platform) not retried", OCTI,
     "if status is None or status == 429 or status >= 500 or status == 200:",
     "if status is None or status == 429 or status >= 500:",
     [T_OCTI], None),
    ("PU5", "a transient GraphQL error known by its name only (DATABASE_ERROR, ...) not retried", OCTI,
     "if name in _TRANSIENT_ERRORS or any(w in lowered for w in _TRANSIENT_WORDS):",
     "if any(w in lowered for w in _TRANSIENT_WORDS):",
     [T_OCTI], None),
    ("PU6", "an unknown connector's refusal not an AccessRefused (no word of the registration)", OCTI,
     "if not obj and _CONNECTOR_REFUSAL.search(about):", "if False:",
     [T_OCTI], None),
    ("PU7", "an object-level error naming no object (MISSING_REFERENCE_ERROR) stops the sync", OCTI,
     "if obj or _OBJECT_WORD.search(about) or name in _OBJECT_ERRORS:",
     "if obj or _OBJECT_WORD.search(about):",
     [T_OCTI], None),
    ("PU8", "a request too large for the broker not told apart (files: the sync stops)", OCTI,
     'if _TOO_LARGE.search(f"{message} {reason or \'\'}"):', "if False:",
     [T_TFILES, T_OCTI], None),
    ("PU9", "an HTTP 413 not told apart (files: the sync stops)", OCTI,
     "        if status == 413:\n", "        if False:\n",
     [T_TFILES, T_FILES], None),
    # -- opencti.py: loop prevention, the replay mark --------------------------------------------
    ("PU10", "the source platform behind another address not refused (settings id)", OCTI,
     "if source_id and source_id == self.platform_id:", "if False:",
     [T_OCTI], None),
    ("PU11", "the pushing_to mark never saved on the target", OCTI,
     '            state["pushing_to"] = str(self._pushing_to)\n', "            pass\n",
     [T_OCTI], None),
    ("PU12", "the mark not moved forward by a later batch", OCTI,
     "if self.register and (marked is None or batch.last_id > marked):",
     "if self.register and marked is None:",
     [T_OCTI], None),
    ("PU13", "an unregistered connector's batches not guarded (no mark is kept)", OCTI,
     "        self._replay_always = not self.register\n",
     "        self._replay_always = False\n",
     [T_OCTI], None),
    # -- opencti.py: planning the pushes ---------------------------------------------------------
    ("PU14", "a bundle id without the content's digest (two bundles share an id)", OCTI,
     'seed = f"{self.kind}:{events}:{len(self.objects)}:{digest}"',
     'seed = f"{self.kind}:{events}:{len(self.objects)}"',
     [T_OCTI], None),
    ("PU15", "a re-create after a delete in the batch shares the push before the delete", OCTI,
     "            flush_deletes()\n            dropped = later_sources", "            dropped = later_sources",
     [T_OCTI], None),
    ("PU16", "a delete after an upsert of the batch pushed before it", OCTI,
     "            flush_upserts()\n            deletes[ev.stix_id]", "            deletes[ev.stix_id]",
     [T_OCTI], None),
    ("PU17", "an object leaving the stream's view deleted on the target", OCTI,
     "            if left_the_view(ev):\n                continue", "            if False:\n                continue",
     [T_OCTI], None),
    ("PU18", "a delete push may hold one object more than max_bundle_objects", OCTI,
     "            if len(deletes) >= max_objects:\n", "            if len(deletes) > max_objects:\n",
     [T_OCTI], None),
    ("PU19", "an id change pushed without the previous id as an alias (a duplicate)", OCTI,
     "                stix = _with_alias(stix, prev)\n", "                pass\n",
     [T_OCTI], None),
    ("PU20", "a merge's target not upserted before the merge", OCTI,
     '            pushes.append(Push("upsert", [without_aliases(stix, dropped)], ids, ids))\n', "",
     [T_OCTI], None),
    ("PU21", "the upsert before a merge carries its sources' ids as aliases", OCTI,
     "            dropped = source_ids(sources) | later_sources\n",
     "            dropped = later_sources\n",
     [T_OCTI], None),
    # -- opencti.py: refusals, files, restore's calls --------------------------------------------
    ("PU22", "objects of a push refused for any reason quarantined one by one", OCTI,
     "                except ObjectRefused as exc:\n                    refused.append",
     "                except PermanentError as exc:\n                    refused.append",
     [T_OCTI], None),
    ("PU23", "a file the platform refuses for its size stops the sync", OCTI,
     "            except PayloadTooLarge:\n                files.left_out(",
     "            except ValueError:\n                files.left_out(",
     [T_TFILES], None),
    ("PU24", "a carried file not recorded (sent again with each version)", OCTI,
     "            files.carried(done.keys)\n", "            pass\n",
     [T_TFILES], None),
    ("PU25", "restore's upserts: each request leaves out its last object", OCTI,
     "chunk = objects[start : start + self.max_bundle_objects]",
     "chunk = objects[start : start + self.max_bundle_objects - 1]",
     [T_OCTI, T_REST], None),
    ("PU26", "restore's deletes: each request leaves out its last id", OCTI,
     "chunk = stix_ids[start : start + self.max_bundle_objects]",
     "chunk = stix_ids[start : start + self.max_bundle_objects - 1]",
     [T_OCTI, T_REST], None),
    ("PU27", "known_ids counts ids the target does not hold (dry run: updates, deletes held)", OCTI,
     "for ref, sid in self._standard_ids(stix_ids).items() if sid is not None}",
     "for ref, sid in self._standard_ids(stix_ids).items()}",
     [T_REST, T_SYNC], None),
    # -- common.py -------------------------------------------------------------------------------
    ("PU28", "a merge source's own aliases not among the ids the merge frees", COMMON,
     '        ids.update(str(i) for i in octi_ext(src).get("stix_ids") or [])\n', "",
     [T_OCTI], None),
    ("PU29", "without_aliases drops nothing", COMMON,
     "[a for a in aliases if a not in dropped]", "list(aliases)",
     [T_OCTI], None),
    ("PU30", "only the next merge's sources held back, not those of every later merge", COMMON,
     "self._after.append(self._after[-1] | ids)", "self._after.append(ids)",
     [T_OCTI], None),
    ("PU31", "LiveIds never records who holds an id (an absorber sent ahead not seen)", COMMON,
     "            live[ev.stix_id] = own\n", "            pass\n",
     [T_OCTI], None),
    # -- restore.py: the push ---------------------------------------------------------------------
    ("PU32", "push phases in reverse order (relationships before their endpoints)", REST,
     "    for index in range(len(PHASES)):\n        step = index + 1",
     "    for index in reversed(range(len(PHASES))):\n        step = index + 1",
     [T_REST], None),
    ("PU33", "a dry run pushes", REST,
     "        if not self.dry_run:\n            self.target.push_objects(batch)",
     "        if True:\n            self.target.push_objects(batch)",
     [T_REST], None),
    ("PU34", "the objects batched before one with files pushed after it (resume skips them)", REST,
     "                if batch:\n                    run.push(batch, step, last)\n"
     "                    batch = []\n                run.push_with_files",
     "                run.push_with_files",
     [T_FILES, T_REST], None),
    ("PU35", "a file the platform refuses for its size stops the restore", REST,
     "            except PayloadTooLarge:\n                too_large.append(copy.name)",
     "            except ValueError:\n                too_large.append(copy.name)",
     [T_FILES], None),
    # -- restore.py: the progress file -------------------------------------------------------------
    ("PU36", "no position saved after a pushed batch (a resume starts over)", REST,
     "        if save and not self.dry_run:\n            self._save(step, at)",
     "        if False:\n            self._save(step, at)",
     [T_REST, T_KILL], None),
    ("PU37", "progress on one target taken for another's", REST,
     '        "target": target_name,\n', '        "target": None,\n',
     [T_REST], None),
    ("PU38", "progress made without deletes resumed with them (merged-away step skipped)", REST,
     '        "apply_deletes": apply_deletes,\n', "",
     [T_REST, T_LEFT], None),
    ("PU39", "progress from other steps (another version) resumed", REST,
     'or saved.get("step_name") != STEPS[step]:', ":",
     [T_REST], None),
    ("PU40", "a finished restore leaves its progress file (run again it pushes nothing)", REST,
     "        try:\n            self.path.unlink()\n        except FileNotFoundError:",
     "        try:\n            pass\n        except FileNotFoundError:",
     [T_REST, T_LEFT], None),
    ("PU41", "a resumed restore's summary without the stopped run's counts (files, types)", REST,
     "    _carry_on(report, resume.tallies)\n", "",
     [T_LEFT, T_REST, T_FILES], None),
    ("PU42", "the ids of a delete request not saved before it (a stop after it: not counted)", REST,
     "            self.resume.saving_deletes(present)\n", "            pass\n",
     [T_LEFT, T_REST], None),
    ("PU43", "no position saved after an object with files (a resume sends them again)", REST,
     "        self._save(step, at)\n\n    def delete(", "\n    def delete(",
     [T_FILES, T_REST], None),
    ("PU44", "progress made under another --max-file-mb resumed (files left out unsaid)", REST,
     '        "max_file_bytes": max_file_bytes if files is not None else None,\n', "",
     [T_LEFT, T_FILES], None),
    # -- restore.py: the plan and the bundle --------------------------------------------------------
    ("PU45", "a state missing pruned history not marked incomplete", REST,
     "incomplete = seed is None and _warn_if_pruned(reader)", "incomplete = False",
     [T_RCLI], None),
    ("PU46", "a bundle without its attached files' bytes", REST,
     "if files is not None and FILES_MARK in blob:", "if False:",
     [T_FILES, T_RCLI], None),
    # -- restore_cli.py ----------------------------------------------------------------------------
    ("PU47", "--opencti with --to-bundle accepted (the target ignored)", RCLI,
     "    if args.opencti and args.to_bundle:\n        raise", "    if False:\n        raise",
     [T_RCLI, T_SYNC], None),
    ("PU48", "a restore into the archive's own source platform not refused without --force", RCLI,
     "        allow_same_platform=force,\n", "        allow_same_platform=True,\n",
     [T_RCLI, T_SYNC], None),
    ("PU49", "an empty state (wrong archive, point before history) restored with exit 0", RCLI,
     "        if plan.as_of is None:\n", "        if False:\n",
     [T_RCLI], None),
    ("PU50", "a point at the first recovery's very end refused", RCLI,
     "until < recovered and not args.allow_partial:", "until <= recovered and not args.allow_partial:",
     [T_RCLI, T_UNTIL],
     "at the recovery's own point (its recover date's millisecond, seq 0) the count then runs "
     "and finds 0: the recovery lists only objects updated at or before its recover date (the "
     "platform's filter, the simulator's), so none was updated after that point; a dependency "
     "loaded later is the one exception, and it is as unknown at every point after the "
     "recovery's up to its own update, which the check never covered (a limit, not this "
     "boundary)"),
    ("PU51", "a point at the archive's end refused when newer segments are lost", RCLI,
     "(until is not None and until <= end)", "(until is not None and until < end)",
     [T_RCLI], None),
    ("PU52", "a failed bundle write leaves its partial file", RCLI,
     "        part.unlink(missing_ok=True)\n        raise ConnectorError", "        raise ConnectorError",
     [T_RCLI], None),
    ("PU53", "verify --against-opencti: an older version on the platform not found", RCLI,
     "        elif have and _version(data) and have < _version(data):", "        elif False:",
     [T_SYNC, T_REST], None),
    ("PU54", "verify --against-opencti reads the platform's first page only", RCLI,
     'if not info.get("hasNextPage") or not cursor or cursor == after:', "if True:",
     [T_SYNC, T_REST, T_RCLI], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
