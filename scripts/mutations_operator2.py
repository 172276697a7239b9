"""Session 27's hand-made mutations of the operator surface, round 2 (docs/RELIABILITY.md).

The same kind of table as ``scripts/mutations.py`` (whose ``run`` this uses), for what session
24's ``scripts/mutations_operator.py`` left of the operator surface (none repeats it, nor
``mutations_flow.py``'s exit codes): the settings (``settings.py``: each key's bounds, the
layers and ``OPENCTI_SYNC_DEFAULTS``, the bool words, secrets and their redaction), the commands
(``__main__.py``: ``--archive`` and ``--token``, exit codes, signals, ``status``, ``check``,
``prune`` on a missing archive and its ``--dry-run``, ``verify``'s refusals, the default
connector id), the demo's own checks and what its run is given (``demo.py``), the
configuration reference (``configdoc.py``)
and the platform double pycti talks to (``sim/platform.py``: authentication, the bundle push
and its refusals, imports, merges and deletes, registration and its state, the listings and
their pages). Each mutation is a small bug put in on purpose, its test files are run (one
process, ``-x``, cheapest first), and the file is written back as it was. Equivalent ones (no
behaviour changes) say why.

    .venv/bin/python scripts/mutations_operator2.py            # all of them (about 9 min)
    .venv/bin/python scripts/mutations_operator2.py OS3 OP1    # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

SET, MAIN, DEMO = "connector/settings.py", "connector/__main__.py", "connector/demo.py"
DOC, PLAT = "connector/configdoc.py", "connector/sim/platform.py"

T_SET, T_DOC, T_PACK = "test_settings_validation", "test_config_doc", "test_packaging"
T_STATUS, T_SEC, T_RCLI = "test_status", "test_security", "test_restore_cli"
T_OCTI, T_SYNC = "test_target_opencti", "test_sync_restore"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- settings.py: bounds -----------------------------------------------------------------
    ("OS1", "connector.read_timeout_secs of 5 (the heartbeat period) accepted", SET,
     "if c.read_timeout_secs <= 5:", "if c.read_timeout_secs < 5:",
     [T_SET], None),
    ("OS2", "connector.spill_bytes of 64 KiB itself refused", SET,
     "if c.spill_bytes < 65536:", "if c.spill_bytes <= 65536:",
     [T_SET], None),
    ("OS3", "connector.lease_secs of 1 s itself refused", SET,
     "if c.lease_secs < 1:", "if c.lease_secs <= 1:",
     [T_SET], None),
    ("OS4", "zstd level 0 accepted", SET,
     'a.codec == "zstd" and not 1 <= a.compression_level <= 19:',
     'a.codec == "zstd" and not 0 <= a.compression_level <= 19:',
     [T_SET], None),
    ("OS5", "a recover date before 1970 accepted", SET,
     '    if ms < 0:\n        raise ConfigError(key, f"must be after 1970-01-01',
     '    if False:\n        raise ConfigError(key, f"must be after 1970-01-01',
     [T_SET], None),
    ("OS6", "a target URL without its token accepted at load", SET,
     "if s.target.opencti_url and not s.target.opencti_token:", "if False:",
     [T_SET, T_RCLI], None),
    ("OS7", "s3.sse aws:kms without a key id accepted", SET,
     'if s.s3.sse == "aws:kms" and not s.s3.kms_key_id:', "if False:",
     [T_SET], None),
    ("OS8", "target.opencti_url not checked (credentials, scheme)", SET,
     '        ("target.opencti_url", s.target.opencti_url),\n', "",
     [T_SET], None),
    ("OS9", "a key's choices not checked (log level 'verbose' accepted)", SET,
     "if key.choices and value not in key.choices:", "if False:",
     [T_SET], None),
    # -- settings.py: layers, words, secrets -------------------------------------------------
    ("OS10", "OPENCTI_SYNC_DEFAULTS above config.yml", SET,
     "            (key.env in image, image.get(key.env)),\n"
     "            (name in sec_val, sec_val.get(name)),\n",
     "            (name in sec_val, sec_val.get(name)),\n"
     "            (key.env in image, image.get(key.env)),\n",
     [T_SET, T_PACK], None),
    ("OS11", "a secret given a default in OPENCTI_SYNC_DEFAULTS", SET,
     '        if known[name].secret:\n            raise ConfigError(DEFAULTS_ENV',
     '        if False:\n            raise ConfigError(DEFAULTS_ENV',
     [T_SET, T_PACK], None),
    ("OS12", "an unknown key in config.yml ignored", SET,
     '                raise ConfigError(f"{sec_name}.{k}", "unknown key")', "                pass",
     [T_SET, T_DOC], None),
    ("OS13", "'on' not a true word (S3_PATH_STYLE=on refused)", SET,
     '_TRUE = {"true", "yes", "1", "on"}', '_TRUE = {"true", "yes", "1"}',
     [T_SET], None),
    ("OS14", "TARGET_AMQP_USE_SSL=auto refused (not 'as announced')", SET,
     'if value in ("", "auto"):', 'if value == "":',
     [T_SET], None),
    ("OS15", "the target token left out of the redacted secrets", SET,
     "        for section, key in SECRET_KEYS:\n", "        for section, key in SECRET_KEYS[:-1]:\n",
     [T_SET, T_SEC], None),
    ("OS16", "S3_SESSION_TOKEN never given to the S3 client", SET,
     '            "session_token",\n', "",
     [T_SET, "test_s3_faults"], None),
    ("OS17", "a secret with a control character inside accepted", SET,
     'if any(unicodedata.category(ch) == "Cc" for ch in text):', "if False:",
     [T_SET], None),
    # -- __main__.py: flags, exit codes, signals ---------------------------------------------
    ("OM1", "--archive ignored (ARCHIVE_URI used)", MAIN,
     "        settings.archive.uri = args.archive\n", "        pass\n",
     [T_STATUS, T_SET], None),
    ("OM2", "--token not stripped (a pasted token's newline sent)", MAIN,
     "        token = token.strip()\n", "        token = token\n",
     [T_SET, T_RCLI], None),
    ("OM3", "--token not known to the log redactor", MAIN,
     "        args.token = settings.target.opencti_token = token", "        args.token = token",
     [T_SEC, T_RCLI], None),
    ("OM4", "a refused stream exits 0", MAIN,
     '        print(f"opencti-sync: stream refused: {exc}", file=sys.stderr)\n        return 1',
     '        print(f"opencti-sync: stream refused: {exc}", file=sys.stderr)\n        return 0',
     ["test_consumer"], None),
    ("OM5", "a one-shot command stopped by Ctrl-C exits 1", MAIN,
     "    except KeyboardInterrupt:\n        return 130", "    except KeyboardInterrupt:\n        return 1",
     ["test_jobs_stop", T_RCLI], None),
    ("OM6", "a local file error does not name the file", MAIN,
     'where = f": {exc.filename}" if exc.filename else ""', 'where = ""',
     [T_RCLI, T_STATUS], None),
    ("OM7", "a one-shot command's SIGTERM handler left installed after it", MAIN,
     "        if previous is not None:\n            signal.signal(signal.SIGTERM, previous)\n", "",
     ["test_jobs_stop", T_RCLI], None),
    ("OM8", "run: Ctrl-C not a draining stop", MAIN,
     "    signal.signal(signal.SIGINT, handler)\n", "",
     ["test_pipeline_shutdown"], None),
    ("OM9", "run: a second signal during the drain ends it at once", MAIN,
     "        stop.set()  # a second signal during the drain changes nothing",
     "        if stop.is_set():\n            raise KeyboardInterrupt\n        stop.set()",
     ["test_pipeline_shutdown"], None),
    ("OM10", "status: restorable_from inside the first recovery", MAIN,
     "            restorable = str(max(EventId.parse(restorable), recovered))\n",
     "            pass\n",
     [T_STATUS, "test_restore_until"], None),
    ("OM11", "check: the raw stream checked at /stream/raw", MAIN,
     'path = "/stream" if is_raw_stream(stream) else f"/stream/{stream}"',
     'path = f"/stream/{stream}"',
     [T_SET, T_SEC], None),
    ("OM12", "check: the source's TLS certificate not verified", MAIN,
     "httpx.Client(timeout=httpx.Timeout(10.0), verify=tls_verify(verify))",
     "httpx.Client(timeout=httpx.Timeout(10.0), verify=False)",
     [T_SEC, T_SET], None),
    ("OM13", "check: an unreachable source exits 0", MAIN,
     '        ok = False\n        print(f"source   FAIL  {url}{path}: {type(exc).__name__}',
     '        print(f"source   FAIL  {url}{path}: {type(exc).__name__}',
     [T_SET, T_SEC], None),
    ("OM14", "prune on a missing archive (a mistyped prefix) runs as on an empty one", MAIN,
     "    _require_archive(archive)\n    policy = RetentionPolicy(",
     "    policy = RetentionPolicy(",
     ["test_retention", T_STATUS], None),
    ("OM15", "prune --dry-run deletes", MAIN,
     "report = run_retention_job(archive, policy, dry_run=args.dry_run)",
     "report = run_retention_job(archive, policy, dry_run=False)",
     ["test_retention"], None),
    ("OM16", "verify --against-opencti without a token not refused at once", MAIN,
     "        if not token:\n            raise ConfigError(\n                \"--token\"",
     "        if False:\n            raise ConfigError(\n                \"--token\"",
     [T_RCLI, T_SYNC], None),
    ("OM17", "the default connector id leaves out the stream (two streams: one connector)", MAIN,
     'f"opencti-sync:{settings.opencti.url}:{settings.connector.live_stream_id}"',
     'f"opencti-sync:{settings.opencti.url}"',
     [T_OCTI], None),
    # -- demo.py -----------------------------------------------------------------------------
    ("OD1", "the demo wipes a directory it did not make", DEMO,
     "if any(directory.iterdir()) and not (directory / _MARKER).is_file():",
     "if False:",
     ["test_demo"], None),
    ("OD2", "the demo's verdict ignores the connector's exit code", DEMO,
     "        and rc == 0\n", "",
     ["test_demo"], None),
    ("OD3", "the demo's verdict ignores objects missing from the archive", DEMO,
     "        not missing\n        and not extra", "        not extra",
     ["test_demo"], None),
    ("OD4", "a failed demo exits 0", DEMO,
     "stale={stale[:5]}\")\n    return 1", "stale={stale[:5]}\")\n    return 0",
     ["test_demo"], None),
    ("OD5", "the demo's run given the operator's CHECKPOINT_URI (fixed: it wrote there)", DEMO,
     "            if k not in configured\n            and not k.startswith(",
     "            if not k.startswith(",
     ["test_demo"], None),
    # -- configdoc.py ------------------------------------------------------------------------
    ("OC1", "the sample shows a secret's default value", DOC,
     "            if k.secret:\n                shown = \"''  # secret: prefer the environment variable\"\n",
     "", [T_DOC], None),
    ("OC2", "config-doc --update drops the README after its block", DOC,
     '    return readme[:start] + "\\n" + render("markdown") + readme[end:]',
     '    return readme[:start] + "\\n" + render("markdown") + README_END + "\\n"',
     [T_DOC], None),
    # -- sim/platform.py ---------------------------------------------------------------------
    ("OP1", "the double takes any token", PLAT,
     "if not token or (expected is not None and token != expected):", "if not token:",
     [T_OCTI], None),
    ("OP2", "the double takes a push from an unregistered connector", PLAT,
     "if not isinstance(cid, str) or cid not in self.state.connectors:",
     "if not isinstance(cid, str):",
     [T_OCTI], None),
    ("OP3", "the double imports inferred objects", PLAT,
     '        if _ext(obj).get("is_inferred"):\n            return', "        pass",
     [T_OCTI, T_SYNC], None),
    ("OP4", "the double's merge into an unknown target merges", PLAT,
     "            if self.store.get(target) is None:\n                raise",
     "            if False:\n                raise",
     [T_OCTI, T_SYNC], None),
    ("OP5", "the double's delete operation ignored", PLAT,
     '        elif operation in ("delete", "delete_force"):\n            self.store.delete(obj["id"])',
     '        elif operation in ("delete", "delete_force"):\n            pass',
     [T_OCTI], None),
    ("OP6", "the double's errors without their name (only extensions.code)", PLAT,
     '                    "name": self.name,\n', "",
     [T_OCTI],
     "pycti takes an error's name from errors[].name or, without it, from extensions.code "
     "(opencti_api_client.py, for older platforms), which the double still gives; the "
     "connector's own GraphQL readers (registration, the reconciliation's look-up) read only "
     "the message"),
    ("OP7", "a re-registration forgets the connector's state (the replay mark)", PLAT,
     "dict(current) if current else {", "{} if current else {",
     [T_OCTI], None),
    ("OP8", "the double's listing pages skip one object each", PLAT,
     "start = int(after) if isinstance(after, str) and after.isdigit() else 0",
     "start = int(after) + 1 if isinstance(after, str) and after.isdigit() else 0",
     ["test_restore"], None),
    ("OP9", "the double's listing of core objects holds markings and labels", PLAT,
     '    "stixCoreObjects": lambda t: t not in _META_TYPES and t not in',
     '    "stixCoreObjects": lambda t: t not in',
     [T_OCTI, "test_restore"], None),
    ("OP10", "each aliased call given the query's first arguments", PLAT,
     "                local = {**variables, **_arguments(args, variables)}",
     "                local = variables",
     [T_OCTI], None),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
