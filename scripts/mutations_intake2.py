"""Session 27's hand-made mutations of the intake, round 2 (docs/RELIABILITY.md).

The same kind of table as ``scripts/mutations.py`` (whose ``run`` this uses), for what the older
tables (``mutations.py``'s R* rows, ``mutations_intake.py``) leave of the stream intake:
``connector/source.py`` (the first run's recovery and its recover date, the hold of a
recovery's positions, dependencies sharing their trigger's id, resuming, reconnects and their
backoff, the stalled reader, HTTP and TLS errors told apart, the retention gap),
``connector/sse.py`` (line ends across chunks, ids, the per-message bound, a byte order
mark), ``connector/events.py`` (what is quarantined and why, ids, merges, lone surrogates) and
``connector/archive_position.py`` (the archive's end against the checkpoint). Each mutation is
a small bug put in on purpose, its test files are run (one process, ``-x``, cheapest first),
and the file is written back as it was. Equivalent ones (no behaviour changes) say why.

    .venv/bin/python scripts/mutations_intake2.py            # all 53 (about 20 min, one process)
    .venv/bin/python scripts/mutations_intake2.py IN3 IS2    # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

SRC, SSE = "connector/source.py", "connector/sse.py"
EVENTS, POS = "connector/events.py", "connector/archive_position.py"

T_SSE, T_BAD, T_CONS = "test_sse_decoder", "test_bad_input", "test_consumer"
T_HB, T_HOLD, T_POS = "test_heartbeat_race", "test_recovery_hold_review", "test_archive_position"
T_SEC, T_REDEL, T_FILES = "test_security", "test_sink_redelivery", "test_files"
T_REC_CUT = "test_recovery_cut_everywhere"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- source.py: the request and where it starts -------------------------------------------
    ("IN1", "the raw stream asked at /stream/raw (a collection of that name)", SRC,
     'if is_raw_stream(self.config.stream_id):\n            return f"{base}/stream"',
     'if self.config.stream_id == "":\n            return f"{base}/stream"',
     [T_HOLD], None),
    ("IN2", "a reconnect after an idle heartbeat starts before the newest data group", SRC,
     "return min(complete, max(back, data) if data is not None else back)",
     "return min(complete, back)",
     [T_HB, T_CONS], None),
    ("IN3", "a position inside a recovery moved back by the heartbeat slack", SRC,
     "        if complete is None or self._recovering(complete):\n            return complete",
     "        if complete is None:\n            return complete",
     [T_HB, T_HOLD, T_CONS], None),
    ("IN4", "a Last-Event-ID header of the first position sent besides from", SRC,
     '            "Cache-Control": "no-cache",\n        }',
     '            "Cache-Control": "no-cache",\n            "Last-Event-ID": self._start_from,\n'
     "        }",
     [T_HB],
     "the platform reads the position from the from parameter before the header (protocol doc "
     "section 3), and from is sent on every connection: the header is never read"),
    # -- HTTP and TLS errors told apart --------------------------------------------------------
    ("IN5", "a 429 taken as permanent (the run stops)", SRC,
     "if status == 429 or status >= 500:", "if status >= 500:",
     [T_CONS], None),
    ("IN6", "a 403 retried for ever", SRC,
     "if status == 429 or status >= 500:", "if status in (403, 429) or status >= 500:",
     [T_CONS], None),
    ("IN7", "a 404 (no such stream route) retried for ever", SRC,
     "if status == 429 or status >= 500:", "if status in (404, 429) or status >= 500:",
     [T_CONS], None),
    ("IN8", "a permanent answer (401, 410) retried for ever", SRC,
     "                except StreamGoneError as exc:\n"
     "                    self._emit([Fatal(exc)], final=True)\n                    return\n",
     "                except StreamGoneError as exc:\n                    reason = str(exc)\n",
     [T_CONS], None),
    ("IN9", "a certificate that does not verify retried for ever", SRC,
     "                    if _tls_verify_failed(exc):\n", "                    if False:\n",
     [T_SEC], None),
    # -- reconnects ----------------------------------------------------------------------------
    ("IN10", "a reconnect the source asked for (gap repair, recover moved) waits a backoff", SRC,
     "                    asked = True  # reconnect at once",
     "                    asked = False  # reconnect at once",
     [T_CONS], None),
    ("IN11", "a reader stalled up to twice the read timeout goes on reading", SRC,
     "if now - arrived > self.config.read_timeout:",
     "if now - arrived > 2 * self.config.read_timeout:",
     [T_CONS], None),
    ("IN12", "a cut inside a recovery resumes past what the hold passed on", SRC,
     "                    self._complete, self._data_complete = hold.released\n",
     "                    pass\n",
     [T_HOLD, T_CONS], None),
    ("IN13", "dependencies carried at the position kept across a reconnect", SRC,
     "self._carried = []  # re-sent again on the next connection",
     "pass  # re-sent again on the next connection",
     [T_HB, T_CONS], None),
    # -- the retention gap and the first run's recover date ------------------------------------
    ("IN14", "retention_gap=fail repairs instead of stopping", SRC,
     '        if self.config.retention_gap == "fail":\n', "        if False:\n",
     [T_CONS], None),
    ("IN15", "retention_gap=fail: the gap not recorded before the stop", SRC,
     "self._emit([*exc.pending, Fatal(exc.error)], final=True)",
     "self._emit([Fatal(exc.error)], final=True)",
     [T_CONS], None),
    ("IN16", "a recover date out of the retention moved to this machine's clock", SRC,
     "now = iso_to_ms(iso_now()) if platform is None else platform",
     "now = iso_to_ms(iso_now())",
     [T_CONS], None),
    ("IN17", "a resumed recovery whose recover date the stream holds taken for a gap", SRC,
     "effective = max(position, recover_id) if recover_id is not None else position",
     "effective = position",
     [T_CONS], None),
    ("IN18", "the repair's reconnect made without recover (the gap found again and again)", SRC,
     "        self._recover_until = iso_now()\n        out.append(GapDetected(",
     "        out.append(GapDetected(",
     [T_CONS], None),
    ("IN19", "a no-recover answer: the hold kept on the live events", SRC,
     "                        if self._recover_until is None:  # no-recover: nothing to hold\n"
     "                            hold.done = True\n", "",
     [T_CONS], None),
    # -- dependencies sharing their trigger's id -----------------------------------------------
    ("IN20", "a dependency a resumed recovery re-sends at the position skipped", SRC,
     'if ev.referer == "init-dependencies" and self._recovering(hwm):', "if False:",
     [T_HB, T_CONS, T_REC_CUT], None),
    ("IN21", "a recovery object re-sent at or below the position taken as a new one", SRC,
     "if (late is None or late < ev.id) and not self._recovering(ev.id):",
     "if late is None or late < ev.id:",
     [T_HB, T_HOLD, T_CONS], None),
    # -- the recovery's hold -------------------------------------------------------------------
    ("IN22", "an id at the recover point taken for the live part (the hold lets go)", SRC,
     "if self.done or (position is not None and position > self.recover_id):",
     "if self.done or (position is not None and position >= self.recover_id):",
     [T_HOLD, T_CONS], None),
    ("IN23", "a position found safe before the first page is all in", SRC,
     "        if len(self._window) < self.page_size:\n            return []",
     "        if not self._window:\n            return []",
     [T_HOLD], None),
    ("IN24", "a marker at the lowest id still to come taken as safe", SRC,
     "safe = bisect_left(marks, self._mins[0])",
     "safe = bisect_left(marks, EventId(self._mins[0].ms, self._mins[0].seq + 1))",
     [T_HOLD], None),
    ("IN25", "an overflow passes its markers on (positions not yet safe)", SRC,
     "out: list[Item] = [i for i in self._items if not isinstance(i, Complete)]",
     "out: list[Item] = list(self._items)",
     [T_HOLD], None),
    ("IN26", "the raw stream's gap-repair date taken for a recovery (no slack, late ids quarantined)",
     SRC, "        if is_raw_stream(self.config.stream_id):\n            # No recovery there",
     "        if False:\n            # No recovery there",
     [T_HB], None),
    # -- sse.py --------------------------------------------------------------------------------
    ("IS1", "a CR ending one chunk eats the first LF of every later chunk", SSE,
     "        if self._cr:\n            self._cr = False\n", "        if self._cr:\n",
     [T_SSE], None),
    ("IS2", "the platform's message form takes an id holding NUL", SSE,
     'rb"id: ([^\\n\\0]*+)\\nevent', 'rb"id: ([^\\n]*+)\\nevent',
     [T_SSE], None),
    ("IS3", "the platform's message form does not keep its id for the next message", SSE,
     '                    self._last_id = m.group(1).decode("latin-1")\n'
     '                    out.append((m.group(2).decode("latin-1"), self._last_id, m.group(3)))',
     '                    out.append((m.group(2).decode("latin-1"), m.group(1).decode("latin-1"),'
     " m.group(3)))",
     [T_SSE], None),
    ("IS4", "a held message at the limit read past when its blank line is cut in two", SSE,
     "if self._size > self._max + 1:", "if self._size > self._max:",
     [T_SSE], None),
    ("IS5", "reading past: a blank line cut between two chunks missed", SSE,
     "self._parts, self._size = [data[-1:]], 1", "self._parts, self._size = [], 0",
     [T_SSE], None),
    ("IS6", "an oversized message's name and id not read from its head", SSE,
     '        self._dispatch(head[: head.rfind(b"\\n") + 1], fields)\n', "",
     [T_SSE], None),
    ("IS7", "an id holding NUL taken (other message forms)", SSE,
     'elif name == b"id" and b"\\0" not in value:', 'elif name == b"id":',
     [T_SSE], None),
    ("IS8", "an oversized message that arrived whole: its size said as its head's", SSE,
     "        self._skipped.size = len(block)\n", "        self._skipped.size = _HEAD_BYTES\n",
     [T_SSE], None),
    ("IS9", "a byte order mark before the first line read as part of it", SSE,
     "            if chunk.startswith(_BOM):\n", "            if False:\n",
     [T_SSE], None),
    # -- events.py -----------------------------------------------------------------------------
    ("IE1", "an id of 11 sequence digits taken (its key no longer sorts)", EVENTS,
     "            and 0 < len(seq) <= 10\n", "            and 0 < len(seq) <= 11\n",
     [T_BAD], None),
    ("IE2", "an empty sequence part not refused by its length", EVENTS,
     "            and 0 < len(seq) <= 10\n", "            and len(seq) <= 10\n",
     [T_BAD], "''.isdigit() is False: an empty part is refused by the digit check"),
    ("IE3", "an event without data quarantined as not JSON (the reason lost)", EVENTS,
     '        if not raw:\n            raise MalformedEvent("event without data")\n', "",
     [T_BAD], None),
    ("IE4", "a STIX id without its '--' taken", EVENTS,
     'if not isinstance(stix_id, str) or "--" not in stix_id:',
     "if not isinstance(stix_id, str):",
     [T_BAD], None),
    ("IE5", "an envelope version given as the number 4 taken", EVENTS,
     'if version is not None and version != "4":',
     'if version is not None and str(version) != "4":',
     [T_BAD], None),
    ("IE6", "a merge whose sources are not a list taken", EVENTS,
     "            if not isinstance(sources, list):\n", "            if sources is None:\n",
     [T_BAD], None),
    ("IE7", "an event's attached files never noticed (never downloaded)", EVENTS,
     "        ev.files = bool(octi.get(\"files\"))\n        ev._envelope = None",
     "        ev.files = False\n        ev._envelope = None",
     [T_FILES], None),
    ("IE8", "a lone surrogate escape in capitals refused", EVENTS,
     'rb"\\\\u[dD][89abcdefABCDEF]"', 'rb"\\\\u[dD][89abcdef]"',
     [T_BAD], None),
    ("IE9", "the fallback parser takes NaN and Infinity", EVENTS,
     'json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)',
     'json.loads(raw.decode("utf-8"))',
     [T_BAD],
     "json reads them as floats that are not finite, which the surrogate pass refuses as out "
     "of range: the same refusal, orjson's reason"),
    ("IE10", "a quarantine record without the event's id", EVENTS,
     '                "id": self.id_text,\n', '                "id": "",\n',
     [T_BAD], None),
    ("IE11", "dependencies not synthetic (a trigger after them goes backwards)", EVENTS,
     'return self.referer in ("init-create", "init-dependencies")',
     'return self.referer == "init-create"',
     [T_CONS], None),
    # -- archive_position.py -------------------------------------------------------------------
    ("IP1", "a lost checkpoint resumed at the newest segment though a snapshot is newer", POS,
     "    if newest is None or newest.last < reached:\n", "    if newest is None:\n",
     [T_POS], None),
    ("IP2", "a lost checkpoint resumed at a snapshot: the targets' acked position left empty",
     POS, "            acked_event_id=end,\n        )\n    end = newest.last_event_id",
     "        )\n    end = newest.last_event_id",
     [T_POS, T_REDEL], None),
    ("IP3", "the archive's end looked for though the last segment's manifest is there", POS,
     "    if archive.exists(manifest_key_for_segment(cp.last_segment)):\n        return False\n",
     "",
     [T_POS],
     "with that manifest there, the newest segment ends at or past the checkpoint's recorded "
     "end, so the next check returns False as well (only a listing is spared)"),
    ("IP4", "segments pruned under a snapshot at exactly the recorded end taken as lost", POS,
     "if reached is not None and reached >= recorded:",
     "if reached is not None and reached > recorded:",
     [T_POS], None),
    ("IP5", "lost segments: the targets' acked position left past the archive's end", POS,
     "    if cp.acked_event_id and EventId.parse(cp.acked_event_id) > newest.last:\n"
     "        cp.acked_event_id = end\n", "",
     [T_POS, T_REDEL], None),
    ("IP6", "an archive holding only snapshots taken for no history (a first run)", POS,
     "for prefix in (EVENTS_PREFIX, MANIFESTS_PREFIX, SNAPSHOTS_PREFIX)",
     "for prefix in (EVENTS_PREFIX, MANIFESTS_PREFIX)",
     [T_POS], None),
    ("IP7", "lost segments: the checkpoint still names the lost last segment", POS,
     "    cp.last_segment = newest.segment\n", "",
     [T_POS], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
