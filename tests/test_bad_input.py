"""Bad input: the corpus in tests/data/bad-input/ (one SSE fragment a file, README lists them).

Every case is injected into the simulator's stream between good events and followed by a
sentinel create. One connector run reads the whole stream; then each case is checked on its
own: quarantined with its reason (and counted), archived verbatim, or ignored, as its first
comment line says; in every case the sentinel after it is archived. Once for the run: no crash,
``verify`` passes, counters match, nothing written outside the archive root.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from connector.archive import ArchiveReader
from connector.checkpoint import CheckpointStore
from connector.errors import MalformedEvent
from connector.events import EventId, StreamEvent, archive_line_fields, parse_archive_line
from connector.sim.server import SimServer
from connector.sim.store import _SEQ_SPAN, SimStore
from connector.storage.local import LocalStorage
from connector.verify import format_report, verify_archive
from tests.support.connector import ROOT, ConnectorThread, base_env, caught_up, wait_until
from tests.test_faults import metric

CORPUS = Path(__file__).parent / "data" / "bad-input"
CASES = sorted(p.stem for p in CORPUS.glob("*.sse"))
TOKEN = "bad-input-token"


def expectation(name: str) -> tuple[str, str]:
    """(outcome, reason substring) from the case's first line ``: expect <outcome> [reason]``."""
    first = (CORPUS / f"{name}.sse").read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith(": expect "), name
    outcome, _, reason = first[len(": expect ") :].partition(" ")
    return outcome, reason


def next_id(store: SimStore) -> str:
    """The id an injected event takes: just after the stream's last one (unique per case)."""
    last = EventId.parse(store.last_event_id or "1-0")
    return f"{last.ms}-{last.seq + 1}"


class ByteStore(SimStore):
    """A SimStore that injects raw bytes as they are (``append_raw`` takes text, and invalid
    UTF-8 must reach the wire unchanged)."""

    def append_bytes(self, frame: bytes) -> None:
        with self._lock:
            key = self._last_ms * _SEQ_SPAN + max(self._last_seq, 0)
            self._append(key, "raw", frame)
            self.cond.notify_all()


def marker(name: str) -> str:
    return f"<<{name}>>"


def render(name: str, store: SimStore) -> bytes:
    """The case's SSE bytes with their placeholders filled for the current stream position."""
    text = (CORPUS / f"{name}.sse").read_bytes()
    last = EventId.parse(store.last_event_id or "1-0")
    refs = [f"indicator--{i:08d}-0000-4000-8000-000000000000" for i in range(100_000)]
    fills = {
        "@ID@": next_id(store),
        "@LOW@": f"{last.ms - 5000}-0",
        "<<@CASE@>>": marker(name),
        '"@DEEP2000@"': "[" * 2000 + "]" * 2000,
        '"@DEEP200@"': "[" * 200 + "]" * 200,
        '"@DEEP1000@"': "[" * 1000 + "]" * 1000,
        "@PAD40MB@": "A" * 40_000_000,
        '"@REFS100K@"': orjson.dumps(refs).decode(),
        "@PAD20MB@": "A" * 20_000_000,
    }
    for key, value in fills.items():
        if key.encode() in text:
            text = text.replace(key.encode(), value.encode())
    return text


def sentinel(index: int) -> str:
    return f"malware--{index:08d}-5e47-4000-8000-000000000000"


def store_with_an_identity() -> ByteStore:
    """A stream whose first event is a good identity: the malformed ones come after it."""
    store = ByteStore()
    store.create(
        {
            "type": "identity",
            "id": "identity--00000000-0000-4000-8000-00000000000b",
            "spec_version": "2.1",
            "name": "Before",
            "identity_class": "organization",
        }
    )
    return store


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("bad-input")
    store = store_with_an_identity()
    ids: dict[str, str] = {}
    for index, name in enumerate(CASES):
        ids[name] = next_id(store)
        store.append_bytes(render(name, store))
        store.create(
            {
                "type": "malware",
                "id": sentinel(index),
                "spec_version": "2.1",
                "name": f"sentinel {index}",
                "is_family": False,
            }
        )
    archive = root / "archive"
    quarantined_before = metric("opencti_sync_quarantined_events_total")
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        env = base_env(
            sim.url,
            TOKEN,
            str(archive),
            CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE="1970-01-01T00:00:00.000Z",
            CONNECTOR_MAX_EVENT_BYTES=str(32 * 1024 * 1024),
        )
        run = ConnectorThread(env).start()
        storage = LocalStorage(archive)
        wait_until(
            lambda: not run.alive or caught_up(storage, store.last_event_id or "0-0"),
            timeout=180,
            what="the whole corpus",
        )
        alive = run.alive
        run.stop()
    records = [orjson.loads(storage.get(k)) for k in storage.list("quarantine/")]
    events = list(ArchiveReader(storage).events())
    yield {
        "run": run,
        "alive": alive,
        "storage": storage,
        "root": root,
        "records": records,
        "ids": ids,
        "events": events,
        "quarantined_metric": metric("opencti_sync_quarantined_events_total") - quarantined_before,
    }


def _mentions(record: dict[str, Any], name: str, event_id: str) -> bool:
    """The record of this case: its marker in the data, or (no data to carry it) its id."""
    return marker(name) in str(record.get("data")) or record.get("id") == event_id


def test_corpus_has_at_least_30_cases() -> None:
    assert len(CASES) >= 30
    readme = (CORPUS / "README.md").read_text()
    assert all(f"`{name}.sse`" in readme for name in CASES)


def test_no_crash_and_counts(corpus_run: dict[str, Any]) -> None:
    r = corpus_run
    assert r["alive"] and r["run"].error is None and r["run"].rc == 0
    cp = CheckpointStore(r["storage"]).load()
    assert cp is not None and cp.quarantined == len(r["records"])
    assert r["quarantined_metric"] == len(r["records"])
    expected = sum(1 for name in CASES if expectation(name)[0] == "quarantine")
    assert len(r["records"]) == expected


def test_archive_verifies(corpus_run: dict[str, Any]) -> None:
    report = verify_archive(corpus_run["storage"], work_dir=corpus_run["root"] / "verify")
    assert report.ok, format_report(report)


def test_nothing_outside_the_archive_root(corpus_run: dict[str, Any]) -> None:
    root = corpus_run["root"].resolve()
    archive = (root / "archive").resolve()
    for path in root.rglob("*"):
        assert path.resolve().is_relative_to(root)
    # Keys come from validated event ids and digests only: no case name, no STIX id.
    for path in archive.rglob("*"):
        assert not any(name in str(path) for name in CASES), path
        assert "%2F" not in str(path) and ".." not in path.relative_to(archive).parts
    assert not Path("/tmp/stix-id-dotdot").exists()


@pytest.mark.parametrize("name", CASES)
def test_case(corpus_run: dict[str, Any], name: str) -> None:
    outcome, reason = expectation(name)
    records = [
        rec for rec in corpus_run["records"] if _mentions(rec, name, corpus_run["ids"][name])
    ]
    archived = [ev for ev in corpus_run["events"] if marker(name) in ev.raw]
    if outcome == "quarantine":
        assert len(records) == 1, f"{name}: {len(records)} quarantine records"
        assert reason in records[0]["reason"], records[0]["reason"]
        assert not archived
    elif outcome == "archive":
        assert not records and len(archived) == 1
    else:
        assert outcome == "ignore"
        assert not records and not archived
    index = CASES.index(name)
    assert any(ev.stix_id == sentinel(index) for ev in corpus_run["events"]), "stream stopped"


def test_undecodable_bytes_stay_visible_in_their_quarantine_record(
    corpus_run: dict[str, Any],
) -> None:
    """The record's data is text: bytes that are not UTF-8 are written as escapes, not lost."""
    name = "non-utf8-in-data"
    (record,) = [r for r in corpus_run["records"] if _mentions(r, name, corpus_run["ids"][name])]
    assert "\\xff\\xfe" in record["data"] and "\ufffd" not in record["data"]


def test_a_quarantine_record_follows_the_last_complete_group() -> None:
    """A malformed event inside a group still open (here its trigger, after a dependency under
    the same id) is placed after the last complete group, not after the open one: that
    position is only reached once the group completes."""
    from connector.events import Quarantined
    from connector.source import SourceConfig, SseSource
    from tests.support.handfed import at

    source = SseSource(SourceConfig(url="http://x", token="t"), resume=at(0))
    dependency = {
        "version": "4",
        "type": "create",
        "origin": {"referer": "init-dependencies"},
        "data": {"type": "identity", "id": "identity--00000000-0000-4000-8000-000000000001"},
    }
    out: list[object] = []
    source._handle("create", str(at(1)), orjson.dumps(dependency), out)
    source._handle("create", str(at(1)), b'{"broken"', out)
    quarantined = [i for i in out if isinstance(i, Quarantined)]
    assert [q.after for q in quarantined] == [at(0)]


# ---------------------------------------------------------------------- lone surrogates
# Node's JSON.stringify writes a lone UTF-16 surrogate (a string cut inside an emoji) as the
# escape "\ud83d": valid JSON that orjson refuses. Archived verbatim, never quarantined.
LONE_HIGH = "malware--00000000-d83d-4000-8000-000000000000"
LONE_LOW = "malware--00000000-de00-4000-8000-000000000000"
EPOCH = "1970-01-01T00:00:00.000Z"
SENTINEL = {"type": "malware", "spec_version": "2.1", "name": "after", "is_family": False}


def _lone_surrogate_frame(event_id: str, stix_id: str, name: str) -> str:
    return (
        f"id: {event_id}\nevent: create\n"
        'data: {"version":"4","type":"create","scope":"external","message":"creates a Malware",'
        f'"origin":{{"socket":"query"}},"data":{{"id":"{stix_id}","type":"malware",'
        f'"spec_version":"2.1","name":"{name}","is_family":true}}}}\n\n'
    )


def test_lone_surrogate_escapes_are_archived_and_restored(tmp_path: Path) -> None:
    from connector.restore import materialise

    store = SimStore()
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        store.create(
            {
                "type": "identity",
                "id": "identity--00000000-0000-4000-8000-00000000000c",
                "spec_version": "2.1",
                "name": "Before",
                "identity_class": "organization",
            }
        )
        last = EventId.parse(store.last_event_id or "1-0")
        high, low = f"{last.ms + 1}-0", f"{last.ms + 1}-1"
        # As received: "\ud83d" alone, and "\ude00" alone next to a well-formed pair.
        store.append_raw(_lone_surrogate_frame(high, LONE_HIGH, "Emotet \\ud83d"))
        store.append_raw(_lone_surrogate_frame(low, LONE_LOW, "\\ud83d\\ude00 cut \\ude00"))
        time.sleep(0.01)
        store.create({**SENTINEL, "id": sentinel(9999)})
        archive = tmp_path / "archive"
        env = base_env(sim.url, TOKEN, str(archive), CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE=EPOCH)
        run = ConnectorThread(env).start()
        storage = LocalStorage(archive)
        wait_until(
            lambda: not run.alive or caught_up(storage, store.last_event_id or "0-0"),
            timeout=60,
            what="the stream past the lone surrogates",
        )
        run.stop()
    assert run.error is None and run.rc == 0
    assert not list(storage.list("quarantine/"))
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.quarantined == 0
    by_id = {ev.id_text: ev for ev in ArchiveReader(storage).events()}
    assert b'"name":"Emotet \\ud83d"' in by_id[high].data  # the received bytes, verbatim
    assert b'"name":"\\ud83d\\ude00 cut \\ude00"' in by_id[low].data
    # The parsed view (state, restore, targets) holds U+FFFD for a lone surrogate.
    assert by_id[high].stix["name"] == "Emotet \ufffd"
    assert by_id[low].stix["name"] == "\U0001f600 cut \ufffd"
    with materialise(storage, until=None, work_dir=tmp_path / "state") as state:
        names = {obj["id"]: obj["name"] for _, _, _, obj in state.objects()}
    assert names[LONE_HIGH] == "Emotet \ufffd"
    assert names[LONE_LOW] == "\U0001f600 cut \ufffd"
    assert sentinel(9999) in names
    report = verify_archive(storage, work_dir=tmp_path / "verify")
    assert report.ok, format_report(report)


def test_archive_line_with_a_lone_surrogate_parses() -> None:
    data = (
        b'{"version":"4","type":"create","data":{"id":"malware--1","type":"malware",'
        b'"name":"Emotet \\ud83d"}}'
    )
    line = b'{"id":"5-0","event":"create","data":' + data + b"}\n"
    id_text, event, envelope = archive_line_fields(line)
    assert (id_text, event, envelope["data"]["name"]) == ("5-0", "create", "Emotet \ufffd")
    ev = parse_archive_line(line)
    assert ev.data == data and ev.stix["name"] == "Emotet \ufffd"
    assert StreamEvent.from_sse("5-0", "create", data).data == data


@pytest.mark.parametrize(
    "data",
    [
        b'{"data":{"id":"a--b","name":"\\ud83d"},"n":NaN}',
        b'{"data":{"id":"a--b","name":"\\ud83d"},"n":1' + b"0" * 400 + b"}",
        b'{"data":{"id":"a--b","name":"\\ud83d"}',
        b'{"data":{"id":"a--b","name":"\\ud83d \xff"}}',
        b'{"data":{"id":"a--b","name":"\\ud83d"},"n":-1e999}',
        b'{"data":{"id":"a--b","name":"\\ud83d"},"n":' + b"[" * 2000 + b"]" * 2000 + b"}",
    ],
    ids=["nan", "bigint", "truncated", "non-utf8", "infinite", "too-deep"],
)
def test_lone_surrogate_does_not_let_other_bad_json_in(data: bytes) -> None:
    """The fallback parser takes only what orjson refuses for the surrogate escape alone."""
    with pytest.raises(MalformedEvent, match="not valid JSON"):
        StreamEvent.from_sse("5-0", "create", data)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (b'"cut \\ude00"', "cut \ufffd"),  # a low surrogate alone
        (b'{"\\ud83d": 1}', {"\ufffd": 1}),  # in a key
        # In a list, with orjson's largest integer.
        (b'["\\udbff", 18446744073709551615]', ["\ufffd", 2**64 - 1]),
        (b'"cut \\uDE00"', "cut \ufffd"),  # a low surrogate escape in capitals
    ],
    ids=["low", "key", "list", "capitals"],
)
def test_lone_surrogates_anywhere_read_as_u_fffd(value: bytes, parsed: object) -> None:
    """Wherever the lone surrogate is, the parsed view can be written as UTF-8 again (state,
    targets); the data bytes stay as received."""
    data = b'{"version":"4","data":{"id":"malware--1","type":"malware","x":' + value + b"}}"
    ev = StreamEvent.from_sse("5-0", "create", data)
    assert ev.data == data
    assert ev.stix["x"] == parsed and type(ev.stix["x"]) is type(parsed)
    assert orjson.loads(orjson.dumps(ev.envelope)) == ev.envelope


def test_lone_surrogate_with_an_integer_beyond_64_bits_reads_as_without_one() -> None:
    """orjson reads an integer beyond 64 bits as a float (JavaScript writes 1e20 as 21 digits);
    the fallback refused it, and quarantined a valid event for its lone surrogate."""
    plain = b'{"version":"4","data":{"id":"malware--1","type":"malware","n":100000000000000000000'
    cut = plain + b',"name":"\\ud83d"}}'
    assert StreamEvent.from_sse("5-0", "create", plain + b"}}").stix["n"] == 1e20
    ev = StreamEvent.from_sse("5-0", "create", cut)
    assert ev.data == cut and ev.stix["n"] == 1e20 and isinstance(ev.stix["n"], float)


@pytest.mark.parametrize("text", ["\u0661\u0662-0", "12-\u0663", "\uff11\uff12-0", "1\u00b2-0"])
def test_an_id_of_other_digits_than_ascii_is_refused(text: str) -> None:
    """Arabic-Indic or fullwidth digits are digits to str.isdigit() and int(), not in an id."""
    with pytest.raises(ValueError, match="not a stream event id"):
        EventId.parse(text)


@pytest.mark.parametrize("text", ["1234567890123456-0", "1-12345678901"])
def test_an_id_longer_than_the_archives_keys_is_refused(text: str) -> None:
    """An id is at most 15 and 10 digits: the archive's keys are zero-padded to that, and one
    digit more no longer sorts in stream order."""
    with pytest.raises(ValueError, match="not a stream event id"):
        EventId.parse(text)


@pytest.mark.parametrize("brackets", ["[]", "{}"])
def test_data_nested_too_deep_to_be_written_back_is_refused(brackets: str) -> None:
    """300 levels parse but do not serialise again, whether arrays or objects."""
    opening, closing = brackets
    inner = '{"a":' if opening == "{" else "["
    nested = inner * 300 + "1" + closing * 300
    data = '{"version":"4","data":{"id":"malware--1","type":"malware","x":' + nested + "}}"
    with pytest.raises(MalformedEvent, match="nested too deep"):
        StreamEvent.from_sse("5-0", "create", data)


# ---------------------------------------------------------------------- configuration
# Kinds not covered by tests/test_consumer.py: each invalid value names its key, exit code 2.
BAD_ENV = [
    ({"CONNECTOR_READ_TIMEOUT_SECS": "soon"}, "connector.read_timeout_secs"),
    ({"CONNECTOR_READ_TIMEOUT_SECS": "5"}, "connector.read_timeout_secs"),
    ({"CONNECTOR_BACKOFF_INITIAL_SECS": "0"}, "connector.backoff_initial_secs"),
    ({"CONNECTOR_BACKOFF_INITIAL_SECS": "-1"}, "connector.backoff_initial_secs"),
    ({"CONNECTOR_BACKOFF_MAX_SECS": "0.5"}, "connector.backoff_max_secs"),
    ({"CONNECTOR_ID": "not-a-uuid"}, "connector.id"),
    ({"CONNECTOR_LOG_LEVEL": "loud"}, "connector.log_level"),
    ({"CONNECTOR_RETENTION_GAP": "ignore"}, "connector.retention_gap"),
    ({"ARCHIVE_MAX_BYTES": "10"}, "archive.max_bytes"),
    ({"ARCHIVE_MAX_AGE_SECS": "-1"}, "archive.max_age_secs"),
    ({"ARCHIVE_COMPRESSION_LEVEL": "42"}, "archive.compression_level"),
    ({"ARCHIVE_URI": "ftp://host/x"}, "archive.uri"),
    ({"CHECKPOINT_URI": "ftp://host/x"}, "checkpoint.uri"),
    ({"CHECKPOINT_URI": "s3://"}, "checkpoint.uri"),
    ({"METRICS_PORT": "70000"}, "metrics.port"),
    ({"METRICS_ENABLED": "perhaps"}, "metrics.enabled"),
    ({"TARGET_OPENCTI_URL": "http://127.0.0.1:9"}, "target.opencti_token"),
    ({"S3_SSE": "aws:kms"}, "s3.kms_key_id"),
    ({"OPENCTI_URL": "127.0.0.1:8080"}, "opencti.url"),
    ({"OPENCTI_TOKEN": ""}, "opencti.token"),
]


def _cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "OPENCTI_URL": "http://127.0.0.1:9",
        "OPENCTI_TOKEN": "t",
        "ARCHIVE_URI": str(tmp_path / "a"),
    }
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )


@pytest.mark.parametrize(("env", "key"), BAD_ENV, ids=[k for _, k in BAD_ENV])
def test_invalid_config_value_exits_2_naming_the_key(
    tmp_path: Path, env: dict[str, str], key: str
) -> None:
    done = _cli(tmp_path, env, "run")
    assert done.returncode == 2, done.stderr
    assert key in done.stderr


BAD_FILES: list[Any] = [
    ("missing", None, "--config"),
    ("directory", "DIR", "--config"),
    ("not-a-mapping", "- just\n- a list\n", "--config"),
    ("unknown-section", "nonsense:\n  a: 1\n", "nonsense"),
    ("unknown-key", "archive:\n  colour: blue\n", "archive.colour"),
    ("section-not-mapping", "archive: 3\n", "archive"),
    ("wrong-type", "archive:\n  max_events: [1, 2]\n", "archive.max_events"),
    pytest.param(
        "non-utf8",
        b"archive:\n  uri: \xff\xfe\n",
        "--config",
        id="non-utf8",
    ),
    ("tabs", "archive:\n\turi: x\n", "--config"),
]


@pytest.mark.parametrize(("kind", "content", "key"), BAD_FILES)
def test_unreadable_config_file_exits_2_naming_the_key(
    tmp_path: Path, kind: str, content: str | bytes | None, key: str
) -> None:
    path = tmp_path / "config.yml"
    if content == "DIR":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    done = _cli(tmp_path, {}, "run", "--config", str(path))
    assert done.returncode == 2, done.stderr
    assert key in done.stderr
    assert "Traceback" not in done.stderr


def test_a_parser_out_of_memory_is_not_taken_for_bad_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """orjson reports a failed allocation as a JSONDecodeError: a valid event was quarantined
    under memory pressure (then the process died), leaving the archive for good."""
    from connector import events

    def starved(data: str | bytes) -> Any:
        raise orjson.JSONDecodeError("Not enough memory to allocate buffer for parsing", "", 0)

    monkeypatch.setattr(events, "loads_json", starved)
    with pytest.raises(MemoryError):
        StreamEvent.from_sse("5-0", "create", b'{"data": {"id": "x--1"}}')


def test_the_settings_own_warnings_are_written_in_the_log_format(tmp_path: Path) -> None:
    """Warnings about the settings were written as bare text before the logs were set up,
    the one non-JSON line in a JSON log (what a log collector would drop or misparse)."""
    env = {
        "CONNECTOR_LOG_FORMAT": "json",
        "TARGET_OPENCTI_URL": "http://127.0.0.1:9",
        "TARGET_OPENCTI_TOKEN": "target-token-5678",
        "TARGET_TRANSPORT": "api",
        "TARGET_SYNCHRONIZED": "true",
        "TARGET_AMQP_PORT": "5673",
    }
    done = _cli(tmp_path, env, "status")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    records = [orjson.loads(line) for line in lines if line.startswith("{")]
    said = " ".join(str(r.get("message")) for r in records)
    assert "target.synchronized has no effect" in said
    assert "Ignored with target.transport api" in said
    bare = [line for line in lines if not line.startswith(("{", "opencti-sync:"))]
    assert not bare, bare
    assert "target-token-5678" not in done.stderr


def test_an_idle_position_waits_for_the_quarantine_records_before_it(tmp_path: Path) -> None:
    """A heartbeat with no event pending but a quarantined one not yet stored: the checkpoint
    stays where it is until the record is written with the next batch. Moved at the heartbeat,
    a stop before that batch lost the record (the platform does not send it again)."""
    from connector.events import Quarantined
    from connector.source import Complete
    from tests.support.handfed import at, hand_fed, saved_position

    storage = LocalStorage(tmp_path / "a")
    pipe = hand_fed(storage, resume=at(0))
    pipe._handle(Quarantined(at(0), str(at(1)), "create", '{"broken"', "not JSON"))
    pipe._handle(Complete(at(5)))  # an idle heartbeat past it
    assert saved_position(storage) == str(at(0))
    pipe._flush()
    assert sum(1 for _ in storage.list("quarantine/")) == 1


def test_an_idle_position_moves_the_checkpoint_once_the_quarantine_records_are_stored(
    tmp_path: Path,
) -> None:
    """The batch that stored a quarantine record is done with it: the next idle heartbeat
    moves the checkpoint (kept, the record held every later idle position back and was
    written again with each batch)."""
    from connector.events import Quarantined
    from connector.source import Complete
    from tests.support.handfed import at, hand_fed, saved_position

    storage = LocalStorage(tmp_path / "a")
    pipe = hand_fed(storage, resume=at(0))
    pipe._handle(Quarantined(at(0), str(at(1)), "create", '{"broken"', "not JSON"))
    pipe._flush()
    pipe._handle(Complete(at(5)))
    assert saved_position(storage) == str(at(5))
    assert pipe.checkpoint.quarantined == 1


def test_a_quarantined_event_alone_goes_out_at_the_max_age(tmp_path: Path) -> None:
    """A quarantined event starts the batch's age as an event does: a stream whose only
    events are quarantined stores their records within ARCHIVE_MAX_AGE_SECS, not only once
    enough of them come."""
    from connector.events import Quarantined
    from connector.pipeline import BatchPolicy
    from tests.support.handfed import at, hand_fed

    storage = LocalStorage(tmp_path / "a")
    pipe = hand_fed(storage, resume=at(0), policy=BatchPolicy(max_age_secs=0.05))
    pipe._handle(Quarantined(at(0), str(at(1)), "create", '{"broken"', "not JSON"))
    time.sleep(0.1)
    pipe._maybe_flush()
    assert sum(1 for _ in storage.list("quarantine/")) == 1
