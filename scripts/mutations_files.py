"""Session 26's hand-made mutations of attached files, segments and the archive reader
(docs/RELIABILITY.md).

The same kind of table as ``scripts/mutations.py`` (whose ``run`` this uses), for modules the
older tables touched in a few places only: attached files (``connector/files.py``: archived
beside the events, read back, carried to a target, recorded missing), segments
(``connector/archive/segment.py``: lines, compression in slices, manifests) and their reading
(``connector/archive/reader.py``), the source registration (``connector/registration.py``: two
GraphQL mutations, a token never logged) and ``connector/progress.py``. Each mutation is a small
bug put in on purpose, the test files named with it are run (one process, ``-x``, cheapest
first), and the file is written back as it was. Equivalent ones (no behaviour changes) say why.

    .venv/bin/python scripts/mutations_files.py            # all of them (about 12 min on 2 cores)
    .venv/bin/python scripts/mutations_files.py FA1 FA20   # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

FILES, SEG = "connector/files.py", "connector/archive/segment.py"
READER, REG = "connector/archive/reader.py", "connector/registration.py"
PROG = "connector/progress.py"

T_FILES, T_TFILES, T_SPOOL = "test_files", "test_target_files", "test_segment_spool"
T_CONS, T_PROG, T_VER = "test_consumer", "test_progress", "test_verify"
T_UNTIL, T_REDEL, T_REST = "test_restore_until", "test_sink_redelivery", "test_restore"
T_RET = "test_retention"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- files.py: what is downloaded, and what counts as gone ----------------------------------
    ("FA1", "a delete's files downloaded (gone upstream: recorded missing, an error logged)", FILES,
     '    return ev.files and ev.event != "delete"', "    return ev.files",
     [T_FILES], None),
    ("FA2", "a file whose uri is not the platform's /storage/get/ asked for all the same", FILES,
     '        and f["uri"].startswith(_URI_PREFIX)\n', "",
     [T_FILES, T_TFILES], None),
    ("FA3", "a file's key without its <hh>/ folder (the archived files of older runs not found)",
     FILES, 'return f"{FILES_PREFIX}{digest[:2]}/{digest}"', 'return f"{FILES_PREFIX}{digest}"',
     [T_FILES, T_VER], None),
    ("FA4", "a 404 or 410 (file deleted) retried forever instead of recorded missing", FILES,
     "                if status in (404, 410):\n                    return status\n", "",
     [T_FILES], None),
    ("FA5", "an older platform's redirect to its root not taken for a file it does not have",
     FILES, 'if location in ("", "/"):', 'if location == "":',
     [T_FILES], None),
    ("FA6", "a 403 retried forever (never recorded missing after ten minutes)", FILES,
     "if status >= 500 or status == 403 or response.is_redirect:",
     "if status >= 500 or response.is_redirect:",
     [T_FILES], None),
    ("FA7", "downloads follow redirects (a login page archived as the file)", FILES,
     "                follow_redirects=False,\n            )\n        return self._http",
     "                follow_redirects=True,\n            )\n        return self._http",
     [T_FILES], None),
    ("FA8", "the token left in a download error's text (a malformed answer quoting the request)", FILES,
     '            text = str(exc).replace(self._token, "***")\n', "            text = str(exc)\n",
     [T_FILES], None),
    ("FA9", "a refused file given up after 5 attempts or 10 minutes, not both", FILES,
     "if attempts < _GIVE_UP_ATTEMPTS or now - first < _GIVE_UP_SECS:",
     "if attempts < _GIVE_UP_ATTEMPTS and now - first < _GIVE_UP_SECS:",
     [T_FILES], None),
    ("FA10", "the ten minutes counted from the last refusal, not the first", FILES,
     "            self._failing[key] = (first, attempts)\n",
     "            self._failing[key] = (now, attempts)\n",
     [T_FILES], None),
    ("FA11", "a download that passed keeps its earlier refusals (a later one gives up at once)",
     FILES, "        self._failing.pop(key, None)\n        if refused is None:",
     "        if refused is None:",
     [T_FILES], None),
    ("FA12", "a file the archive holds downloaded and stored again", FILES,
     "        if not (self.storage.exists(key) or self.storage.exists(key + \".missing\")):\n",
     "        if not self.storage.exists(key + \".missing\"):\n",
     [T_FILES], None),
    # -- files.py: read back and carried -------------------------------------------------------
    ("FA13", "every file of the copy gets this file's bytes (files overwrite each other)", FILES,
     "        if f == entry:\n            f[\"data\"] = data", "        if True:\n            f[\"data\"] = data",
     [T_FILES, T_TFILES], None),
    ("FA14", "a file above 3 MiB base64-encoded in pieces that do not join", FILES,
     "iter(lambda: fh.read(3 << 20), b\"\")", "iter(lambda: fh.read((3 << 20) + 1), b\"\")",
     [T_FILES, T_TFILES], None),
    ("FA15", "a download cut at the target's limit carried as if whole", FILES,
     "            if spool.size > self.max_bytes:\n                raise _TooLarge\n", "",
     [T_TFILES], None),
    ("FA16", "a downloaded file spilled to disk read from its end (carried empty)", FILES,
     "            body.seek(0)\n            return _b64(body)", "            return _b64(body)",
     [T_TFILES], None),
    ("FA17", "a file claimed by a message built before its object's delete not marked stale",
     FILES, "                self._stale.add(key)\n", "                pass\n",
     [T_TFILES], None),
    ("FA18", "a file carried again counted again", FILES,
     "            if key not in self._done:\n                metrics.TARGET_FILES",
     "            if True:\n                metrics.TARGET_FILES",
     [T_TFILES],
     "_settle never meets a key already done: one_by_one hands out only keys neither done nor "
     "claimed, each copy it hands out is settled once (pushed, left out or refused; a message "
     "is left out or carried, never both), and forget takes a key out of the done ones before "
     "it can be handed out again"),
    ("FA19", "a restore copy of a file not in the archive pushed without saying so", FILES,
     "        except NotFound:\n            yield FileCopy(name, None, \"lacking\")\n            continue\n",
     "        except NotFound:\n            continue\n",
     [T_FILES], None),
    # -- segment.py: lines, slices, manifests ---------------------------------------------------
    ("SG1", "raw_size leaves out every full slice", SEG,
     "                compressed(comp.compress(b\"\".join(chunk)))\n                raw_size += chunk_size\n",
     "                compressed(comp.compress(b\"\".join(chunk)))\n",
     [T_SPOOL], None),
    ("SG2", "a slice's lines written again with the next slice", SEG,
     "                chunk, chunk_size = [], 0\n", "                chunk_size = 0\n",
     [T_SPOOL], None),
    ("SG3", "the compressor's last bytes never written (a truncated segment)", SEG,
     "        compressed(comp.flush())\n", "",
     [T_SPOOL, T_REDEL], None),
    ("SG4", "manifest rows of two serialisations joined without a comma", SEG,
     "            if rows.size:\n                rows.write(b\",\")\n", "",
     [T_SPOOL], None),
    ("SG5", "the manifest's last rows (under 4096) left out", SEG,
     "        if objects:\n            add_rows()\n", "",
     [T_SPOOL], None),
    ("SG6", "a manifest of another format read as this one", SEG,
     '            if obj.get("format") != FORMAT:\n', "            if False:\n",
     [T_SPOOL, T_VER], None),
    ("SG7", "a manifest with unreadable event ids accepted", SEG,
     "            m.first, m.last  # noqa: B018 - validates both ids\n", "",
     [T_SPOOL, T_VER], None),
    ("SG8", "a spilled manifest's end (after its rows) left out", SEG,
     "            out.write(header[at:])\n", "",
     [T_SPOOL], None),
    ("SG9", "HashingReader does not count what it reads", SEG,
     "        self.size += n\n", "",
     [T_SPOOL, T_VER], None),
    ("SG10", "HashingReader.drain reads nothing (the hash misses the bytes left)", SEG,
     "        while self.readinto(bytearray(1 << 20)):\n            pass",
     "        return",
     [T_SPOOL, T_VER, T_RET], None),
    # -- reader.py ------------------------------------------------------------------------------
    ("RD1", "a damaged manifest skipped (its segment's events left out of a restore)", READER,
     "            except MalformedEvent as exc:\n                raise PermanentError(",
     "            except MalformedEvent as exc:\n                continue\n                raise PermanentError(",
     [T_SPOOL, T_REST], None),
    ("RD2", "a torn newest manifest stops reading the archive's end", READER,
     "            except (NotFound, MalformedEvent):\n", "            except NotFound:\n",
     [T_SPOOL], None),
    ("RD3", "group ids not the running maximum of event ids", READER,
     "        if ev.id > hwm:\n            hwm = ev.id\n", "",
     [T_UNTIL, T_SPOOL], None),
    ("RD4", "group_filter: the group at done read again", READER,
     "        if done is not None and hwm <= done:\n            continue",
     "        if done is not None and hwm < done:\n            continue",
     [T_UNTIL, T_SPOOL, T_REST], None),
    ("RD5", "events(): what was read never moves on (an overlapping segment read again whole)",
     READER, "            done = m.last if done is None else max(done, m.last)\n", "",
     [T_SPOOL, T_UNTIL, T_REST], None),
    ("RD6", "manifests(): a key not ending in .json read as a manifest", READER,
     '            if not key.endswith(".json"):\n                continue\n', "",
     [T_SPOOL, T_REST],
     "nothing but manifests is ever stored under manifests/: the sink writes <id>.json only, "
     "and local storage's list leaves out its temporary files (.tmp-*)"),
    # -- registration.py -----------------------------------------------------------------------
    ("RG1", "the token not redacted from what registration logs", REG,
     'return text.replace(secret, "<redacted>")[:300] if secret else text[:300]',
     "return text[:300]",
     [T_CONS], None),
    ("RG2", "a stop while the platform is unreachable ignored (the thread retries on)", REG,
     "                    if stop.wait(delay):\n                        return\n",
     "                    stop.wait(delay)\n",
     [T_CONS], None),
    ("RG3", "no last ping after the stop (the UI never shows the final checkpoint)", REG,
     "                stopping = stop.wait(PING_EVERY_SECS)\n",
     "                if stop.wait(PING_EVERY_SECS):\n                    return\n",
     [T_CONS], None),
    ("RG4", "the state pinged is empty, never the checkpoint", REG,
     '                    "state": orjson.dumps(self.state()).decode(),\n',
     '                    "state": orjson.dumps({}).decode(),\n',
     [T_CONS], None),
    ("RG5", "a GraphQL error answer taken for a registration", REG,
     "    if errors:\n", "    if False:\n",
     [T_CONS], None),
    # -- progress.py ---------------------------------------------------------------------------
    ("PR1", "an empty total shows 0% instead of done", PROG,
     "        if self.total <= 0:\n            return 1.0\n",
     "        if self.total <= 0:\n            return 0.0\n",
     [T_PROG], None),
    ("PR2", "progress past its total shown above 100%", PROG,
     "return min(1.0, self.done / self.total)", "return self.done / self.total",
     [T_PROG], None),
    ("PR3", "close() twice logs 'finished' twice", PROG,
     "        if self._closed:\n            return\n", "",
     [T_PROG], None),
    ("PR4", "the recovery's span restarts at each event (always 0%)", PROG,
     "        if self._first_ms is None:\n            self._first_ms = event_ms\n",
     "        self._first_ms = event_ms\n",
     [T_PROG], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
