"""Session 24's hand-made mutations of the operator surface (docs/RELIABILITY.md).

The same kind of table as ``scripts/mutations.py`` (each a small bug put in on purpose, its test
files run against it, cheapest first, the file written back as it was), for what operators
touch directly: the settings (``settings.py``: bounds, defaults, secrets, the layers), the logs
and metrics (``logs.py``, ``metrics.py``: redaction, JSON fields, names and labels), the CLI
(``__main__.py``, ``restore_cli.py``, and ``--until``'s parsing in ``restore.py``: refused
flags, exit codes, ``status``, ``verify``, ``check``) and ``progress.py``. Equivalent ones
say why.

    .venv/bin/python scripts/mutations_operator.py            # all of them (about 8 min)
    .venv/bin/python scripts/mutations_operator.py CF3 RC5    # some

Run it from a clean work tree, never two at once (see ``scripts/mutations.py``).
"""

from __future__ import annotations

import sys

from mutations import Mutation, run

SET, LOGS, MET = "connector/settings.py", "connector/logs.py", "connector/metrics.py"
MAIN, RCLI, REST = "connector/__main__.py", "connector/restore_cli.py", "connector/restore.py"
PROG = "connector/progress.py"

T_SET, T_BAD, T_DOC = "test_settings_validation", "test_bad_input", "test_config_doc"
T_LOGS, T_MET, T_SEC = "test_logs", "test_metrics", "test_security"
T_RCLI, T_UNTIL, T_STATUS = "test_restore_cli", "test_restore_until", "test_status"

# (id, what it breaks, file, text, replacement, test files, equivalent: why or None)
MUTATIONS: list[Mutation] = [
    # -- settings.py: bounds, secrets, layers ----------------------------------------------------
    ("CF1", "connector.max_event_bytes: 64 KiB itself refused", SET,
     "if c.max_event_bytes < 65536:", "if c.max_event_bytes <= 65536:",
     [T_SET, T_BAD], None),
    ("CF2", "connector.backoff_max_secs equal to the initial delay refused", SET,
     "if c.backoff_max_secs < c.backoff_initial_secs:",
     "if c.backoff_max_secs <= c.backoff_initial_secs:",
     [T_SET, T_BAD], None),
    ("CF3", "a start timestamp in seconds of today accepted (bound 1e9)", SET,
     "if 0 < c.live_stream_start_timestamp < 100_000_000_000:",
     "if 0 < c.live_stream_start_timestamp < 1_000_000_000:",
     [T_SET, T_BAD], None),
    ("CF4", "gzip levels checked against zstd's range", SET,
     'a.codec == "gzip" and not 1 <= a.compression_level <= 9:',
     'a.codec == "gzip" and not 1 <= a.compression_level <= 19:',
     [T_SET, T_BAD], None),
    ("CF5", "a secret of the wrong type shown in its error", SET,
     'shown = "<redacted>" if key.secret else repr(value)[:60]', "shown = repr(value)[:60]",
     [T_SET, T_BAD], None),
    ("CF6", "the int branch's own check for a yaml boolean left out", SET,
     '        if kind == "int":\n            if isinstance(value, bool):\n'
     "                raise ValueError\n",
     '        if kind == "int":\n',
     [T_SET, T_BAD],
     "str(True) is 'True', which int() refuses all the same: the check only makes the case "
     "explicit (CF14 is the bug it guards against)"),
    ("CF7", "config.yml beats the environment", SET,
     "            (name in sec_val, sec_val.get(name)),\n"
     "            (key.env in env, env.get(key.env)),\n",
     "            (key.env in env, env.get(key.env)),\n"
     "            (name in sec_val, sec_val.get(name)),\n",
     [T_SET, "test_packaging"], None),
    ("CF8", "a platform URL of another scheme (ftp://) accepted", SET,
     'if url and not url.startswith(("http://", "https://")):', 'if url and "://" not in url:',
     [T_SET, T_BAD], None),
    ("CF9", "connector.id without dashes or in braces accepted", SET,
     "return str(uuid.UUID(text)) == text.lower()", "return bool(uuid.UUID(text))",
     [T_SET, T_BAD], None),
    ("CF10", "a bad target.amqp_use_ssl word accepted at load", SET,
     'optional_bool("target.amqp_use_ssl", s.target.amqp_use_ssl)  # a bad word fails at load',
     "pass",
     [T_SET, T_BAD], None),
    ("CF11", "metrics.port 65536 accepted", SET,
     "s.metrics.port > 65535:", "s.metrics.port > 65536:",
     [T_SET, T_BAD], None),
    ("CF12", "S3_SESSION_TOKEN not a secret (not redacted)", SET,
     '"S3_SESSION_TOKEN", "Session token for temporary credentials.", "", secret=True',
     '"S3_SESSION_TOKEN", "Session token for temporary credentials.", ""',
     [T_SET, T_DOC], None),
    ("CF13", "the warning about a blanked config value shows that value", SET,
     "                key.env,\n                key.path,\n                key.path,\n",
     "                key.env,\n                sec_val.get(name),\n                key.path,\n",
     [T_SET], None),
    ("CF14", "an int or float key converted directly: yaml true is 1, 5.7 is 5", SET,
     "            return int(str(value).strip())", "            return int(value)",
     [T_SET, T_BAD], None),
    # -- logs.py: redaction, JSON fields, held records ------------------------------------------
    ("LG1", "a secret of 4 characters not redacted", LOGS,
     "if len(f) >= 4)", "if len(f) > 4)",
     [T_LOGS], None),
    ("LG2", "a traceback's secrets not redacted", LOGS,
     "record.exc_text = self._clean(logging.Formatter().formatException(record.exc_info))",
     "record.exc_text = logging.Formatter().formatException(record.exc_info)",
     [T_LOGS], None),
    ("LG3", "JSON timestamps in local time, without an offset", LOGS,
     "dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(",
     "dt.datetime.fromtimestamp(record.created).isoformat(",
     [T_LOGS], None),
    ("LG4", "JSON: a traceback dropped when no secret is configured", LOGS,
     '        if record.exc_info:\n            body["exception"] = self.formatException(',
     '        if False:\n            body["exception"] = self.formatException(',
     [T_LOGS], None),
    ("LG5", "C1 control characters (\\x9b CSI) reach the terminal", LOGS,
     r're.compile(r"[\x00-\x1f\x7f-\x9f]")', r're.compile(r"[\x00-\x1f]")',
     [T_LOGS], None),
    ("LG6", "held records at exactly the configured level dropped", LOGS,
     "if record.levelno >= root.level:", "if record.levelno > root.level:",
     [T_LOGS, T_BAD], None),
    ("LG7", "held records dropped when the logs are never configured", LOGS,
     "logging.lastResort.handle(record)  # type: ignore[union-attr]", "pass",
     [T_LOGS, T_BAD, T_SET], None),
    ("LG8", "httpx request lines logged at INFO", LOGS,
     '        "httpx",\n        "httpcore",\n', '        "httpcore",\n',
     [T_LOGS], None),
    # -- metrics.py: names, labels, the endpoint ------------------------------------------------
    ("MT1", "events_written renamed", MET,
     '"opencti_sync_events_written",', '"opencti_sync_events_archived",',
     [T_MET], None),
    ("MT2", "metrics served on every interface whatever metrics.host", MET,
     "start_http_server(port, addr=host, registry=REGISTRY)",
     "start_http_server(port, registry=REGISTRY)",
     [T_MET], None),
    ("MT3", "a negative lag when the checkpoint's time is ahead of the clock", MET,
     "return max(0.0, time.time() - ts) if ts > 0 else 0.0",
     "return time.time() - ts if ts > 0 else 0.0",
     [T_MET], None),
    ("MT4", "a *_created series for every counter", MET,
     "disable_created_metrics()  # type: ignore[no-untyped-call]", "pass",
     [T_MET], None),
    # -- restore_cli.py: flags, points, exit codes ----------------------------------------------
    ("RC1", "--max-file-mb with --to-bundle accepted", RCLI,
     '                ("--max-file-mb", args.max_file_mb is not None),'
     "  # a bundle holds every file\n",
     "", [T_RCLI], None),
    ("RC2", "--max-file-mb 0 accepted", RCLI,
     "not 0 < args.max_file_mb < math.inf:", "not 0 <= args.max_file_mb < math.inf:",
     [T_RCLI], None),
    ("RC3", "--max-file-mb counted in 10^6 bytes", RCLI,
     "args.max_file_mb) * 1024 * 1024", "args.max_file_mb) * 1000 * 1000",
     [T_RCLI, "test_files"], None),
    ("RC4", "restore's deletes off by default", RCLI,
     "apply_deletes = True if args.apply_deletes is None else bool(args.apply_deletes)",
     "apply_deletes = False if args.apply_deletes is None else bool(args.apply_deletes)",
     [T_RCLI, "test_sync_restore"], None),
    ("RC5", "--no-apply-deletes ignored", RCLI,
     "apply_deletes = True if args.apply_deletes is None else bool(args.apply_deletes)",
     "apply_deletes = True",
     [T_RCLI, "test_sync_restore"], None),
    ("RC6", "--dry-run ignored", RCLI,
     "                dry_run=args.dry_run,\n", "                dry_run=False,\n",
     [T_RCLI, "test_sync_restore"], None),
    ("RC7", "neither --opencti nor --to-bundle: not refused", RCLI,
     "    if not args.opencti and not args.to_bundle:\n        raise",
     "    if False:\n        raise",
     [T_RCLI], None),
    ("RC8", "a retention gap's window counts its start (the last archived event)", RCLI,
     "if lo < until < hi:", "if lo <= until < hi:",
     [T_UNTIL, T_RCLI], None),
    ("RC9", "a retention gap's window counts its end (the repair's point)", RCLI,
     "if lo < until < hi:", "if lo < until <= hi:",
     [T_UNTIL, T_RCLI], None),
    ("RC10", "TARGET_OPENCTI_TOKEN not used by a restore without --token", RCLI,
     "token = args.token or settings.target.opencti_token  # checked by _check_flags",
     "token = args.token",
     [T_RCLI, "test_sync_restore"], None),
    ("RC11", "a metrics port already taken ends the restore", RCLI,
     "        return serve(settings.metrics.host, settings.metrics.port)\n    except OSError",
     "        return serve(settings.metrics.host, settings.metrics.port)\n    except ValueError",
     [T_RCLI], None),
    ("RC12", "an empty restore's progress gauge stays at 0", RCLI,
     "metrics.RESTORE_PROGRESS.set(done / total if total else 1.0)",
     "metrics.RESTORE_PROGRESS.set(done / total if total else 0.0)",
     [T_RCLI, T_MET], None),
    ("RC13", "--max-file-mb inf accepted (fixed: it crashed once the state was built)", RCLI,
     "not 0 < args.max_file_mb < math.inf:", "not args.max_file_mb > 0:",
     [T_RCLI], None),
    # -- __main__.py: exit codes, verify, check, status, --token --------------------------------
    ("CL1", "verify --against-opencti: differences exit 0", MAIN,
     "ok = ok and diff_ok", "ok = ok",
     [T_RCLI, "test_sync_restore"], None),
    ("CL2", "check exits 0 when the source refuses", MAIN,
     '            print(f"{sink.name:<8} FAIL  {exc}")\n    return 0 if ok else 1',
     '            print(f"{sink.name:<8} FAIL  {exc}")\n    return 0',
     [T_SET, T_SEC], None),
    ("CL3", "status shows a retention window with keep_days 0 (forever)", MAIN,
     "            if r.keep_days > 0\n", "            if r.keep_days >= 0\n",
     [T_STATUS], None),
    ("CL4", "--token with a DEL character accepted", MAIN,
     "if any(ord(ch) < 32 or ord(ch) == 127 for ch in token):",
     "if any(ord(ch) < 32 for ch in token):",
     [T_RCLI, T_SET], None),
    ("CL5", "a one-shot command stopped by SIGTERM exits 130", MAIN,
     '        log.warning("Stopped by SIGTERM.")\n        return 143',
     '        log.warning("Stopped by SIGTERM.")\n        return 130',
     ["test_jobs_stop"], None),
    ("CL6", "verify --token without --against-opencti accepted", MAIN,
     '(("--until", args.until), ("--token", args.token))', '(("--until", args.until),)',
     [T_RCLI], None),
    # -- restore.py: --until parsing ------------------------------------------------------------
    ("UT1", "an --until date without offset read in local time", REST,
     "        when = when.replace(tzinfo=UTC)\n", "        when = when.astimezone(UTC)\n",
     [T_UNTIL, T_RCLI], None),
    ("UT2", "an --until date before 1970 accepted", REST,
     '    if ms < 0:\n        raise ConfigError("--until", "date before 1970")\n', "",
     [T_UNTIL, T_RCLI], None),
    # -- progress.py ----------------------------------------------------------------------------
    ("PG1", "progress lines at > instead of >= their interval", PROG,
     "now - self._shown_at >= self.interval:", "now - self._shown_at > self.interval:",
     ["test_progress"], None),
    ("PG2", "recover_fraction: an event at exactly the end date not taken as done", PROG,
     "    if current_ms >= end:\n        return 1.0",
     "    if current_ms > end:\n        return 1.0",
     ["test_progress"],
     "at current_ms == end the span's share is (end - first) / (end - first), 1.0 exactly (and "
     "1.0 too when the span is empty): the same value the early return gives"),
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(set(sys.argv[1:]), MUTATIONS))
