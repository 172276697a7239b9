"""Session 24's hand-made mutations of the stream intake (docs/RELIABILITY.md).

The same audit as ``scripts/mutations.py`` (whose ``run`` this uses), for the path every event
takes before the pipeline: the bytes-level SSE decoder (``connector/sse.py``: line ends, fields,
ids, the per-message bound), the event's validation (``connector/events.py``: ``EventId``,
``StreamEvent.from_sse``, the lone-surrogate fallback of ``loads_json``), the slow-call watchdog
(``connector/watchdog.py``) and the parts of ``connector/source.py`` the core table leaves out
(reconnects and their backoff, the position and ``recover`` sent, heartbeats and
``consumer_metrics``, quarantine, the silent or stalled stream). Each mutation is a small bug put
in on purpose, the test files named with it are run (one process, ``-x``, cheapest first), and
the file is written back as it was. Equivalent ones (no behaviour changes) say why.

    .venv/bin/python scripts/mutations_intake.py           # all of them (about 12 min on 2 cores)
    .venv/bin/python scripts/mutations_intake.py D5 I7     # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

SSE, EVENTS = "connector/sse.py", "connector/events.py"
WATCH, SRC = "connector/watchdog.py", "connector/source.py"

T_SSE, T_BAD, T_CONS = "test_sse_decoder", "test_bad_input", "test_consumer"
T_HB, T_HOLD, T_SHUT = "test_heartbeat_race", "test_recovery_hold_review", "test_pipeline_shutdown"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- sse.py: framing, fields, ids, the per-message bound -----------------------------------
    ("D1", "a lone CR is not a line end", SSE,
     'chunk = chunk.replace(b"\\r\\n", b"\\n").replace(b"\\r", b"\\n")',
     'chunk = chunk.replace(b"\\r\\n", b"\\n")',
     [T_SSE], None),
    ("D2", "a CRLF cut between two chunks read as two line ends", SSE,
     '            if chunk.endswith(b"\\r"):\n                self._cr = True\n',
     '            if chunk.endswith(b"\\r"):\n                pass\n',
     [T_SSE], None),
    ("D3", "a comment line not skipped", SSE,
     'if not line or line[:1] == b":":', "if not line:",
     [T_SSE],
     "a comment line's field name is empty (the text before its colon), which is no field: "
     "it is skipped as an unknown field, and sets nothing"),
    ("D4", "every space after the colon removed, not only the first", SSE,
     '            if value[:1] == b" ":\n                value = value[1:]\n',
     '            if value[:1] == b" ":\n                value = value.lstrip(b" ")\n',
     [T_SSE], None),
    ("D5", "the space after the colon kept", SSE,
     '            if value[:1] == b" ":\n                value = value[1:]\n', "",
     [T_SSE], None),
    ("D6", "data lines joined without their newline", SSE,
     'b"\\n".join(data)', 'b"".join(data)',
     [T_SSE], None),
    ("D7", "a whole message at exactly the limit refused (fast path)", SSE,
     "if m.end() - start - 2 > self._max:", "if m.end() - start - 2 >= self._max:",
     [T_SSE], None),
    ("D8", "a whole message at exactly the limit refused (other fields)", SSE,
     "            if end - start > self._max:", "            if end - start >= self._max:",
     [T_SSE], None),
    ("D9", "an oversized message's size counts the kept byte twice", SSE,
     "self._skipped.size += (end if end >= 0 else len(buf)) - 1",
     "self._skipped.size += end if end >= 0 else len(buf)",
     [T_SSE], None),
    ("D10", "an oversized message is held whole", SSE,
     "            self._skipped = Oversized(head[:_HEAD_BYTES])\n",
     "            self._skipped = Oversized(head)\n",
     [T_SSE], None),
    ("D11", "a long message's end cut between two chunks missed", SSE,
     'joined = self._parts[-1][-1:] == b"\\n" and chunk[:1] == b"\\n"', "joined = False",
     [T_SSE], None),
    ("D12", "a block without data or event dispatched", SSE,
     "        if seen:\n            name_text", "        if True:\n            name_text",
     [T_SSE], None),
    # -- events.py: ids and the event's validation ---------------------------------------------
    ("E1", "non-ASCII digits taken in an id", EVENTS,
     "            and text.isascii()\n", "",
     [T_BAD], None),
    ("E2", "a data event without an id: the reason lost", EVENTS,
     '        if not id_text:\n            raise MalformedEvent("data event without an id")\n', "",
     [T_BAD], None),
    ("E3", "from_sse takes any event name", EVENTS,
     "        if event not in DATA_EVENTS:\n"
     '            raise MalformedEvent(f"unknown event name {event[:64]!r}")\n', "",
     [T_BAD],
     "the source calls from_sse only for the four data names; any other name goes to "
     "_unknown, which quarantines a data event under the same reason"),
    ("E4", "nesting never checked", EVENTS,
     "    if opens <= _DUMPS_DEPTH:\n        return False\n", "    return False\n",
     [T_BAD], None),
    ("E5", "nesting: only arrays counted", EVENTS,
     'raw.count("[") + raw.count("{")\n        if isinstance(raw, str)\n'
     '        else raw.count(b"[") + raw.count(b"{")',
     'raw.count("[")\n        if isinstance(raw, str)\n        else raw.count(b"[")',
     [T_BAD], None),
    ("E6", "nesting: the serialise tried from 254 brackets instead of 255", EVENTS,
     "    if opens <= _DUMPS_DEPTH:\n", "    if opens < _DUMPS_DEPTH:\n",
     [T_BAD],
     "254 brackets nest at most 254 deep, which serialises: the extra try answers False, "
     "as the count did"),
    ("E7", "multi-line data not serialised again (a line break in the archive)", EVENTS,
     'if b"\\n" in data or b"\\r" in data:', 'if b"\\r" in data:',
     [T_BAD], None),
    ("E8", "data holding a CR not serialised again", EVENTS,
     'if b"\\n" in data or b"\\r" in data:', 'if b"\\n" in data:',
     [T_BAD],
     "the decoder turns every CR into a line end, so data from the stream never holds one "
     "(the source is from_sse's only caller)"),
    ("E9", "low surrogate escapes refused", EVENTS,
     'rb"\\\\u[dD][89abcdefABCDEF]"', 'rb"\\\\u[dD][89abAB]"',
     [T_BAD], None),
    ("E10", "lone surrogates kept in keys", EVENTS,
     "{_without_lone_surrogates(k): _without_lone_surrogates(v)",
     "{k: _without_lone_surrogates(v)",
     [T_BAD], None),
    ("E11", "lone surrogates kept in lists", EVENTS,
     "return [_without_lone_surrogates(v) for v in value]", "return value",
     [T_BAD], None),
    ("E12", "the fallback refuses 64-bit unsigned integers", EVENTS,
     "_INT_RANGE = range(-(2**63), 2**64)", "_INT_RANGE = range(-(2**63), 2**63)",
     [T_BAD], None),
    ("E13", "the fallback takes an infinite number", EVENTS,
     "if isinstance(value, float) and not math.isfinite(value):", "if False:",
     [T_BAD], None),
    ("E14", "the fallback's RecursionError escapes", EVENTS,
     "except (ValueError, RecursionError):", "except ValueError:",
     [T_BAD], None),
    # -- watchdog.py: a slow write said while it waits -----------------------------------------
    ("W1", "a finished call is still watched", WATCH,
     "            del _calls[key]\n", "            pass\n",
     [T_SHUT], None),
    ("W2", "a slow call warned at every tick, not every REPEAT_SECS", WATCH,
     "                call.warn_at = now + REPEAT_SECS\n", "                pass\n",
     [T_SHUT], None),
    ("W3", "a call warned from its start", WATCH,
     "if now >= c.warn_at]", "if now >= c.started]",
     [T_SHUT], None),
    # -- source.py: reconnects, position, recover, heartbeats, quarantine, silence --------------
    ("I1", "the backoff not reset after a connection that moved the position", SRC,
     "attempt = 0 if asked or self._complete != at_start else attempt + 1",
     "attempt = 0 if asked else attempt + 1",
     [T_CONS], None),
    ("I20", "the backoff reset after a connection that moved nothing (cut inside a group)", SRC,
     "attempt = 0 if asked or self._complete != at_start else attempt + 1",
     "attempt = 0 if asked or self._complete is not None else attempt + 1",
     [T_CONS], None),
    ("I2", "the backoff's first bound twice the initial", SRC,
     "self.config.backoff_initial * 2 ** (attempt - 1),",
     "self.config.backoff_initial * 2**attempt,",
     [T_CONS], None),
    ("I3", "the backoff not capped", SRC,
     "                        min(\n                            self.config.backoff_max,\n"
     "                            self.config.backoff_initial * 2 ** (attempt - 1),\n"
     "                        ),\n",
     "                        self.config.backoff_initial * 2 ** (attempt - 1),\n",
     [T_CONS], None),
    ("I4", "a 200 that is not an event stream read as one", SRC,
     '            if "text/event-stream" not in ctype:\n                raise',
     "            if False:\n                raise",
     [T_CONS], None),
    ("I5", "a reconnect starts from the first run's position", SRC,
     'params["from"] = str(point) if point is not None else self._start_from',
     'params["from"] = self._start_from',
     [T_CONS], None),
    ("I6", "a partial group kept at a reconnect", SRC,
     "                self._hwm = self._complete\n", "",
     [T_HB, T_CONS],
     "the next connection re-sends everything after the resume point in Redis order (ids "
     "only grow): the open group's events come again under its own id, taken in it as before, "
     "and no unseen id below it can follow them; in a recovery, the hold passes on nothing "
     "until a marker is below every id still to come, and restores the released position"),
    ("I7", "recover never sent", SRC,
     '                params["recover"] = self._recover_until\n', "                pass\n",
     [T_CONS], None),
    ("I8", "a refused recovery asked again at each reconnect", SRC,
     "                self._recover_until = None\n            elif (",
     "                pass\n            elif (",
     [T_CONS], None),
    ("I9", "a heartbeat inside a recovery completes its group", SRC,
     "            if hb is None or self._in_recovery(hb):", "            if hb is None:",
     [T_HOLD, T_CONS], None),
    ("I10", "consumer_metrics at the position taken for a new one", SRC,
     "and (self._hwm is None or pos > self._hwm)", "and (self._hwm is None or pos >= self._hwm)",
     [T_HB, T_CONS], None),
    ("I11", "consumer_metrics inside a recovery completes its group", SRC,
     "                and not self._in_recovery(pos)\n", "",
     [T_HOLD, T_CONS], None),
    ("I12", "a heartbeat's pending data group not recorded as data", SRC,
     "        if self._hwm is not None and self._hwm != self._complete:\n"
     "            self._data_complete = self._hwm\n        if self._carried:",
     "        if self._carried:",
     [T_HB, T_CONS], None),
    ("I13", "a quarantine record placed after the last received id", SRC,
     "after = self._complete or self._hwm or EventId(0, 0)", "after = self._hwm or EventId(0, 0)",
     [T_BAD, T_CONS], None),
    ("I14", "the quarantine reason lost", SRC,
     "self._quarantine(id_text, name, data, exc.reason, out)",
     'self._quarantine(id_text, name, data, "malformed event", out)',
     [T_BAD], None),
    ("I15", "undecodable bytes replaced in the quarantine record", SRC,
     'data.decode("utf-8", "backslashreplace")', 'data.decode("utf-8", "replace")',
     [T_BAD], None),
    ("I16", "an oversized message parsed as an event", SRC,
     "        if isinstance(data, Oversized):\n            reason",
     "        if False:\n            reason",
     [T_BAD], None),
    ("I17", "CONNECTOR_MAX_EVENT_BYTES not applied", SRC,
     "decoder = SseBytesDecoder(self.config.max_event_bytes)", "decoder = SseBytesDecoder()",
     [T_BAD], None),
    ("I18", "the reader's last read never moved: every read past the timeout reconnects", SRC,
     "                    arrived = now\n", "",
     [T_CONS], None),
    ("I19", "a silent stream is waited on for ever", SRC,
     "timeout = httpx.Timeout(10.0, read=self.config.read_timeout)\n        return httpx.Client(",
     "timeout = httpx.Timeout(10.0, read=None)\n        return httpx.Client(",
     [T_CONS], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
