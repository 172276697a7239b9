"""Logs: JSON lines off a terminal, text on one, constant messages, one line per batch, redaction."""

from __future__ import annotations

import datetime as dt
import io
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from connector import logs
from connector.archive import ArchiveReader
from connector.checkpoint import CheckpointStore
from connector.logs import JsonFormatter, configure
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.storage.s3 import S3Storage
from tests.support.connector import ConnectorProcess, base_env, caught_up, wait_until
from tests.support.s3 import REGION, make_bucket, moto_server  # noqa: F401

TOKEN = "tok-LOGS-5e6f7a8b9c0d"
S3_KEY_ID = "AKIALOGSKEYID0000002"
S3_SECRET = "s3secret-LOGS-1a2b3c4d5e6f"


@pytest.fixture
def sim() -> Iterator[SimServer]:
    store = SimStore()
    generate(store, 150, seed=11, mix="creates")
    server = SimServer(token=TOKEN, heartbeat_secs=0.2, store=store).start()
    yield server
    server.stop()


class TtyIO(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_process_logs_are_json_one_line_per_batch_and_redacted(
    sim: SimServer,
    moto_server: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    bucket = make_bucket(moto_server)
    env = base_env(
        sim.url,
        TOKEN,
        f"s3://{bucket}/backup",
        S3_ENDPOINT_URL=moto_server,
        S3_REGION=REGION,
        S3_PATH_STYLE="true",
        S3_ACCESS_KEY_ID=S3_KEY_ID,
        S3_SECRET_ACCESS_KEY=S3_SECRET,
    )
    del env["CONNECTOR_LOG_FORMAT"]  # the default: stderr is a file here, so JSON
    storage = S3Storage(
        bucket=bucket,
        prefix="backup",
        endpoint_url=moto_server,
        region=REGION,
        path_style=True,
        access_key_id=S3_KEY_ID,
        secret_access_key=S3_SECRET,
    )
    log_path = tmp_path / "connector.log"
    proc = ConnectorProcess(env, log_path)
    try:
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="recovery")
        ids = sorted(o["id"] for o in sim.store.objects() if o["type"] in ("malware", "tool"))
        for n, stix_id in enumerate(ids[:3]):
            sim.store.update(stix_id, set={"description": f"edit {n}"})
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="live edits")
    finally:
        rc = proc.terminate()
    assert rc == 0

    text = log_path.read_text(encoding="utf-8")
    for secret in (TOKEN, S3_KEY_ID, S3_SECRET):
        assert secret not in text
    lines = [orjson.loads(line) for line in text.splitlines() if line.strip()]
    assert lines, "the connector logged nothing"
    for rec in lines:
        assert {"timestamp", "level", "logger", "message"} <= set(rec), rec
        assert rec["level"] in ("debug", "info", "warning", "error", "critical")

    events = list(ArchiveReader(storage).events())
    cp = CheckpointStore(storage).load()
    assert cp is not None
    batches = [r for r in lines if r["message"] == "Batch written."]
    # One INFO line per durable batch, carrying the counts; far fewer lines than events.
    assert all(r["level"] == "info" for r in batches)
    assert len(batches) == cp.segments_written
    assert sum(r["event_count"] for r in batches) == cp.events_archived == len(events)
    assert len(batches) < len(events) / 4
    assert batches[-1]["last_event_id"] == cp.last_segment_last_id  # heartbeats move cp further
    assert batches[-1]["sinks"] == ["archive"]
    # Messages are constant sentences: variables (event ids, counts, URLs) live in fields.
    ids_seen = {ev.id_text for ev in events}
    for rec in lines:
        assert not any(i in rec["message"] for i in ids_seen), rec["message"]
        assert sim.url not in rec["message"], rec["message"]
    messages = Counter(r["message"] for r in lines)
    assert len(messages) <= 12, messages
    assert {"Following the stream.", "Stop requested; draining.", "Stopped."} <= set(messages)


def test_terminal_gets_text_and_a_file_gets_json(restore_logging: None) -> None:
    tty, plain = TtyIO(), io.StringIO()
    log = logging.getLogger("connector.test")
    configure("info", "auto", [], stream=tty)
    log.info("Batch written.", extra={"event_count": 3})
    assert " INFO    Batch written.  event_count=3" in tty.getvalue()
    configure("info", "auto", [], stream=plain)
    log.info("Batch written.", extra={"event_count": 3})
    rec = orjson.loads(plain.getvalue())
    assert (rec["message"], rec["event_count"], rec["level"]) == ("Batch written.", 3, "info")
    configure("warning", "json", [], stream=plain)
    log.info("Not shown.")
    assert "Not shown." not in plain.getvalue()


def test_stream_data_cannot_forge_a_text_line_or_drive_the_terminal(
    restore_logging: None,
) -> None:
    """Event names, ids and reasons come from the stream and reach the log: a newline in them
    made a second, forged line; an ANSI escape reached the terminal. Shown escaped instead."""
    out = TtyIO()
    configure("info", "text", [], stream=out)
    forged = "evil\n08:00:00 ERROR   FORGED line\x1b[31m"
    logging.getLogger("connector.test").warning(
        "Event quarantined: %s", forged, extra={"event": forged, "id": "\x1b[2Jbad\r"}
    )
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line
    assert "\x1b" not in text and "\r" not in text
    assert "evil\\n08:00:00 ERROR   FORGED line\\x1b[31m" in text
    assert "id=\\x1b[2Jbad\\r" in text


def test_secrets_redacted_everywhere(restore_logging: None) -> None:
    out = io.StringIO()
    configure("info", "json", [TOKEN, S3_SECRET], stream=out)
    log = logging.getLogger("connector.test")
    log.info("Request failed: %s", f"Bearer {TOKEN}", extra={"url": f"http://x/?t={TOKEN}"})
    log.warning(
        "Storage error.",
        extra={"detail": {"auth": [S3_SECRET, "ok"]}, "headers": (f"Authorization: {TOKEN}",)},
    )
    try:
        raise RuntimeError(f"signature mismatch for {S3_SECRET}")
    except RuntimeError:
        log.exception("Unexpected error.")
    text = out.getvalue()
    assert TOKEN not in text and S3_SECRET not in text
    recs = [orjson.loads(line) for line in text.splitlines()]
    assert recs[0]["message"] == "Request failed: Bearer <redacted>"
    assert recs[0]["url"] == "http://x/?t=<redacted>"
    assert recs[1]["detail"] == {"auth": ["<redacted>", "ok"]}
    assert "signature mismatch for <redacted>" in recs[2]["exception"]


def test_escaped_forms_of_secrets_are_redacted(restore_logging: None) -> None:
    """httpx refuses a token with a newline with "Illegal header value b'Bearer <token>\\n'": the
    message holds the token repr-escaped, which the raw value never matched."""
    raw = TOKEN + "\n"
    quoted = 'tok-"LOGS"-\\x-9f8e'  # JSON and repr escape the quotes and the backslash
    out = io.StringIO()
    configure("info", "json", [raw, quoted], stream=out)
    log = logging.getLogger("connector.test")
    header = f"Bearer {raw}".encode()
    log.warning("Stream connection failed.", extra={"error": f"Illegal header value {header!r}"})
    log.warning("Reconnecting: %r", raw)
    log.warning("Token %s.", TOKEN)  # the stripped value, as a cleaned setting holds it
    log.warning("Payload.", extra={"body": orjson.dumps({"token": quoted}).decode()})
    log.warning("Quoted %r and %a.", quoted, quoted.encode())
    text = out.getvalue()
    assert "LOGS" not in text, text
    recs = [orjson.loads(line) for line in text.splitlines()]
    assert recs[0]["error"] == "Illegal header value b'Bearer <redacted>'"
    assert recs[2]["message"] == "Token <redacted>."


def test_a_short_secret_is_redacted_too(restore_logging: None) -> None:
    """Only forms shorter than 4 characters are spared (they would blank common words)."""
    out = io.StringIO()
    configure("info", "json", ["Zq9!"], stream=out)
    logging.getLogger("connector.test").warning("Refused: %s", "Bearer Zq9!")
    assert orjson.loads(out.getvalue())["message"] == "Refused: Bearer <redacted>"


def test_json_fields_timestamp_in_utc_and_the_traceback(restore_logging: None) -> None:
    """The timestamp carries its offset (UTC, whatever the host's zone); a traceback is kept
    when no secret is configured (nothing to redact: the record goes out as logged)."""
    out = io.StringIO()
    configure("info", "json", [], stream=out)
    log = logging.getLogger("connector.test")
    try:
        raise RuntimeError("the archive is gone")
    except RuntimeError:
        log.exception("Unexpected error.")
    rec = orjson.loads(out.getvalue())
    assert "RuntimeError: the archive is gone" in rec["exception"]
    stamp = dt.datetime.fromisoformat(rec["timestamp"])
    assert stamp.utcoffset() == dt.timedelta(0)
    record = logging.LogRecord("connector.test", logging.INFO, "", 0, "At.", (), None)
    record.created = 1767225600.123  # 2026-01-01T00:00:00.123Z
    assert orjson.loads(JsonFormatter().format(record))["timestamp"] == (
        "2026-01-01T00:00:00.123+00:00"
    )


def test_c1_control_characters_are_escaped_in_text(restore_logging: None) -> None:
    """\\x9b is a one-byte CSI for some terminals, as \\x1b[ is; \\x85 a line break for some."""
    out = TtyIO()
    configure("info", "text", [], stream=out)
    logging.getLogger("connector.test").warning("Bad event %s", "a\x9b2Jb\x85c\x7f")
    text = out.getvalue()
    assert not any(ch in text for ch in "\x9b\x85\x7f"), repr(text)
    assert "a\\x9b2Jb\\x85c\\x7f" in text


def test_records_held_before_the_logs_are_set_up_are_written(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The settings' own warnings come before the log level and format are known: held, then
    written once configured, at the configured level itself too; or as plain lines by
    ``release`` when the command never configures its logs (it failed first)."""
    root = logging.getLogger()
    log = logging.getLogger("connector.settings")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    logs.hold()
    log.warning("Held warning.")
    log.info("Held info.")
    out = io.StringIO()
    configure("warning", "json", [], stream=out)
    assert [orjson.loads(line)["message"] for line in out.getvalue().splitlines()] == [
        "Held warning."
    ]
    for handler in list(root.handlers):
        root.removeHandler(handler)
    logs.hold()
    log.warning("Held, never configured.")
    logs.release()
    assert "Held, never configured." in capsys.readouterr().err
    assert not root.handlers
