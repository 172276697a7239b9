"""Attached files (a report's PDF): downloaded by `run`, archived before the events that name
them, checked by `verify`, and put back by a restore, inline, the way the platform's worker
imports them. Real parts: the simulator serves `/storage/get/...` over HTTP, the connector runs
as it does in production, the restore pushes through pycti into the platform double."""

from __future__ import annotations

import base64
import http.server
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from connector import metrics
from connector.archive import ArchiveSink
from connector.archive.layout import MANIFESTS_PREFIX, manifest_key
from connector.archive.spool import Spool
from connector.errors import PayloadTooLarge, RetryableError
from connector.events import OCTI_EXT, EventId, StreamEvent
from connector.files import (
    Downloads,
    FileArchiver,
    FileFetcher,
    file_entries,
    file_key,
    missing_key,
)
from connector.restore import materialise, restore_to_target
from connector.sim.server import SimServer
from connector.sink import Batch
from connector.state import PHASES
from connector.storage.local import LocalStorage
from connector.verify import verify_archive
from tests.support.compare import assert_same_state
from tests.support.connector import ConnectorThread, base_env, caught_up, cli, wait_until
from tests.support.served import serving
from tests.support.simlog import sim_events
from tests.test_local_storage_durability import RecordingStorage
from tests.test_pipeline_shutdown import FullFor, first_write_under

TOKEN_A = "token-files-a"
TOKEN_B = "token-files-b"
REPORT = "report--0b1f9a5e-7c7e-4d2b-9d55-3c1f2e8a4b61"
MALWARE = "malware--5a0c3e0f-2f6a-4a43-8f62-6a3b7d0e9c21"


def _seed(sim: SimServer) -> None:
    sim.store.create(
        {
            "id": MALWARE,
            "type": "malware",
            "spec_version": "2.1",
            "name": "Files Malware",
            "is_family": True,
        }
    )
    sim.store.create(
        {
            "id": REPORT,
            "type": "report",
            "spec_version": "2.1",
            "name": "Files Report",
            "published": "2026-01-01T00:00:00.000Z",
            "object_refs": [MALWARE],
        }
    )


def _backup(source: SimServer, archive: str, **env: str) -> LocalStorage:
    """`run` from the source into ``archive`` until it caught up, then stopped cleanly."""
    storage = LocalStorage(archive)
    run = ConnectorThread(base_env(source.url, TOKEN_A, archive, **env)).start()
    wait_until(lambda: caught_up(storage, source.store.last_event_id), what="recovery")
    run.stop()
    assert run.error is None
    return storage


def _restore(archive: str, url: str, work: Path, *extra: str) -> dict[str, Any]:
    proc = cli(
        "restore",
        "--archive",
        archive,
        "--opencti",
        url,
        "--token",
        TOKEN_B,
        "--work-dir",
        str(work),
        *extra,
        cwd=work.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = orjson.loads(proc.stdout[proc.stdout.index("{") :])  # after a line
    return out


def _contents(sim: SimServer, ref: str) -> dict[str, bytes | None]:
    return {f["name"]: sim.store.file_content(_file_id(f)) for f in sim.store.files_of(ref)}


def _file_id(entry: dict[str, Any]) -> str:
    from urllib.parse import unquote

    return unquote(entry["uri"].removeprefix("/storage/get/"))


def metric(name: str, labels: dict[str, str]) -> float:
    """A sample of the connector's registry (the connector runs in this process here)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def source() -> Iterator[SimServer]:
    with SimServer(token=TOKEN_A, heartbeat_secs=0.2) as sim:
        yield sim


def test_files_are_archived_verified_and_restored(source: SimServer, tmp_path: Path) -> None:
    stored_before = metric("opencti_sync_files_total", {"result": "stored"})
    _seed(source)
    pdf_v1, pdf_v2 = os.urandom(300_000), os.urandom(250_000)
    csv = b"ip,seen\n10.0.0.1,2026\n" * 1000
    source.store.attach_file(REPORT, "analysis.pdf", pdf_v1)
    source.store.attach_file(MALWARE, "iocs.csv", csv, mime_type="text/csv")
    archive = str(tmp_path / "archive")
    storage = LocalStorage(archive)
    run = ConnectorThread(base_env(source.url, TOKEN_A, archive)).start()
    wait_until(lambda: caught_up(storage, source.store.last_event_id), what="recovery")
    before_v2 = source.store.last_event_id
    state_v1 = source.store.dump_bundle()
    # A new version of the PDF: one more update event, one more archived file.
    source.store.attach_file(REPORT, "analysis.pdf", pdf_v2)
    wait_until(lambda: caught_up(storage, source.store.last_event_id), what="the new version")
    run.stop()
    assert run.error is None

    # Each version is archived under its (uri, version), with the bytes served.
    entries = [e for ref in (REPORT, MALWARE) for e in source.store.files_of(ref)]
    for entry in entries:
        assert storage.get(file_key(entry)) == source.store.file_content(_file_id(entry))
    archived = sorted(k for k in storage.list("files/"))
    assert len(archived) == 3, archived  # pdf v1, pdf v2, csv: each once, though named again
    assert metric("opencti_sync_files_total", {"result": "stored"}) - stored_before == 3
    report = verify_archive(storage, work_dir=tmp_path / "v")
    assert report.ok, report.errors
    assert report.files == 3 and report.files_gone == 0

    # A restore puts them back: the latest state, and the point before the new version.
    with SimServer(token=TOKEN_B) as b:
        summary = _restore(archive, b.url, tmp_path / "w1")
        assert summary["files"] == 2 and summary.get("files_lacking", 0) == 0
        assert_same_state(source.store.dump_bundle(), b.store.dump_bundle())
        assert _contents(b, REPORT) == {"analysis.pdf": pdf_v2}
        assert _contents(b, MALWARE) == {"iocs.csv": csv}
    with SimServer(token=TOKEN_B) as b:
        _restore(archive, b.url, tmp_path / "w2", "--until", before_v2)
        assert_same_state(state_v1, b.store.dump_bundle())
        assert _contents(b, REPORT) == {"analysis.pdf": pdf_v1}

    # A file above --max-file-mb is left out, said, and the object restored all the same.
    with SimServer(token=TOKEN_B) as b:
        summary = _restore(archive, b.url, tmp_path / "w3", "--max-file-mb", "0.1")
        assert summary["files"] == 1 and summary["files_too_large"] == 1
        assert _contents(b, REPORT) == {} and _contents(b, MALWARE) == {"iocs.csv": csv}
        assert b.store.get(REPORT) is not None

    # The bundle carries them inline, as OpenCTI's restore-files connector reads them.
    bundle = tmp_path / "state.json"
    proc = cli("restore", "--archive", archive, "--to-bundle", str(bundle), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    objects = {o["id"]: o for o in orjson.loads(bundle.read_bytes())["objects"]}
    (pdf,) = file_entries(objects[REPORT])
    assert base64.b64decode(pdf["data"]) == pdf_v2


def test_a_file_gone_before_its_download_is_recorded_not_waited_for(
    source: SimServer, tmp_path: Path
) -> None:
    _seed(source)
    source.store.attach_file(REPORT, "kept.pdf", b"kept")
    source.store.attach_file(REPORT, "gone.pdf", b"gone")
    (gone,) = [f for f in source.store.files_of(REPORT) if f["name"] == "gone.pdf"]
    source.store.forget_file_content(_file_id(gone))  # deleted before the connector read it
    archive = str(tmp_path / "archive")
    storage = _backup(source, archive)

    assert metric("opencti_sync_files_total", {"result": "missing"}) >= 1
    record = orjson.loads(storage.get(missing_key(gone)))
    assert record["status"] == 503 and record["object"] == REPORT  # the platform's answer
    assert record["name"] == "gone.pdf" and "gone" in record["reason"]
    report = verify_archive(storage, work_dir=tmp_path / "v")
    assert report.ok and report.files == 1 and report.files_gone == 1
    assert any("gone from the platform" in w for w in report.warnings)
    with SimServer(token=TOKEN_B) as b:
        summary = _restore(archive, b.url, tmp_path / "w")
        assert summary["files"] == 1 and summary["files_lacking"] == 1
        assert _contents(b, REPORT) == {"kept.pdf": b"kept"}


def test_a_lost_file_is_an_error_and_files_off_archives_none(
    source: SimServer, tmp_path: Path
) -> None:
    _seed(source)
    source.store.attach_file(REPORT, "analysis.pdf", b"%PDF-1.7 ...")
    archive = str(tmp_path / "archive")
    storage = _backup(source, archive)
    (entry,) = source.store.files_of(REPORT)
    storage.delete(file_key(entry))
    report = verify_archive(storage, work_dir=tmp_path / "v")
    assert not report.ok
    assert any("attached file 'analysis.pdf'" in e for e in report.errors), report.errors

    off = str(tmp_path / "off")
    without = _backup(source, off, ARCHIVE_FILES="false")
    assert list(without.list("files/")) == []
    report = verify_archive(without, work_dir=tmp_path / "v2")
    assert report.ok and report.files_not_archived == 1
    assert any("without file backup" in n for n in report.notes)


class _Failing(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.mark.parametrize("status", [500, 503, 403, 429, 401])
def test_a_download_that_may_pass_is_retried_not_recorded(tmp_path: Path, status: int) -> None:
    """A platform error holds the batch (and so the checkpoint) for a retry; only "gone" and
    "not readable" are recorded as missing."""
    handler = type("H", (_Failing,), {"status": status})
    with serving(handler) as url:
        fetcher = FileFetcher(url, "secret-token")
        spool = Spool(tmp_path, 1 << 20, "file-")
        with pytest.raises(RetryableError) as caught:
            fetcher.download("/storage/get/import/Report/x/a.pdf", spool)
        assert str(status) in str(caught.value) and "secret-token" not in str(caught.value)
        fetcher.close()


class _EchoesTheRequest(http.server.BaseHTTPRequestHandler):
    """A broken proxy: its status line repeats the request's Authorization header."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        auth = self.headers.get("Authorization", "")
        self.wfile.write(b"HTTP/1.1 OK " + auth.encode() + b"\r\n\r\n")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


def test_an_answer_that_quotes_the_token_leaves_it_out_of_the_error(tmp_path: Path) -> None:
    """httpx's error for a malformed answer quotes the bytes it got: the retry's error, logged
    with each attempt, says what went wrong without the token."""
    with serving(_EchoesTheRequest) as url:
        fetcher = FileFetcher(url, "secret-token")
        try:
            with pytest.raises(RetryableError) as caught:
                fetcher.download("/storage/get/import/Report/x/a.pdf", Spool(tmp_path, 1024, "f-"))
        finally:
            fetcher.close()
    assert "illegal status line" in str(caught.value)
    assert "secret-token" not in str(caught.value) and "Bearer ***" in str(caught.value)


def _naming_a_file(uri: str, event: str = "update") -> StreamEvent:
    stix = {
        "id": REPORT,
        "type": "report",
        "spec_version": "2.1",
        "extensions": {
            OCTI_EXT: {"files": [{"name": "a.pdf", "uri": uri, "version": "2026-01-01"}]}
        },
    }
    body = orjson.dumps({"data": stix, "message": "m", "version": "4"})
    return StreamEvent(EventId(1_800_000_000_000, 0), "1800000000000-0", event, body)


def test_a_files_key_is_the_archives_layout() -> None:
    """``files/<hh>/<sha256 of "uri\\nversion">``: the keys of files archived by earlier runs
    (and by earlier versions) must still be where a restore and verify look for them."""
    (entry,) = file_entries(_naming_a_file("/storage/get/import/Report/x/a.pdf").stix)
    digest = "e00fc962800fc8d83635931a83318f08e54192df0e8a8232af6199e16d63eb34"
    assert file_key(entry) == f"files/e0/{digest}"
    assert missing_key(entry) == f"files/e0/{digest}.missing"


def test_no_file_is_asked_for_a_delete_nor_outside_the_platforms_storage(
    tmp_path: Path,
) -> None:
    """A delete names the object's files, which the platform deletes with it: asking for them
    records each as missing, with an error, at every delete. A file whose uri is not the
    platform's ``/storage/get/`` is no file the platform serves. Neither is requested (nothing
    listens on port 9: a request would fail the store)."""
    storage = LocalStorage(tmp_path / "a")
    archiver = FileArchiver(storage, FileFetcher("http://127.0.0.1:9", TOKEN_A))
    deleted = _naming_a_file("/storage/get/import/Report/x/a.pdf", "delete")
    elsewhere = _naming_a_file("https://files.example/a.pdf")
    assert file_entries(elsewhere.stix) == []
    archiver.store([deleted, elsewhere])
    archiver.close()
    assert list(storage.list("")) == []


class _Switching(_Failing):
    """Fails with ``status`` while it is not 200, then serves the file's bytes."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        if self.status != 200:
            super().do_GET()
            return
        self.send_response(200)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"%PDF")


def test_a_download_that_passed_starts_the_ten_minutes_again(tmp_path: Path) -> None:
    """Refusals counted before a download that passed are over: a file refused again later (a
    new version at the same key after a restart of the platform) is retried, not given up on
    because of refusals from long ago."""
    handler = type("H", (_Switching,), {"status": 503})
    now = [1000.0]
    uri = "/storage/get/import/Report/x/a.pdf"
    with serving(handler) as url:
        downloads = Downloads(FileFetcher(url, TOKEN_A), clock=lambda: now[0])
        try:
            for minute in range(5):  # refused 5 times, for 4 minutes
                now[0] = 1000.0 + 60 * minute
                with pytest.raises(RetryableError):
                    downloads.fetch("k", uri, Spool(tmp_path, 1 << 20, "file-"))
            handler.status = 200
            now[0] = 1000.0 + 60 * 5
            assert downloads.fetch("k", uri, Spool(tmp_path, 1 << 20, "file-")) is None
            handler.status = 503
            now[0] = 1000.0 + 60 * 20  # 20 minutes after the first refusal: the sixth
            with pytest.raises(RetryableError):
                downloads.fetch("k", uri, Spool(tmp_path, 1 << 20, "file-"))
        finally:
            downloads.close()


@pytest.mark.parametrize("status", [503, 403])
def test_a_file_the_platform_keeps_failing_to_serve_is_recorded_after_ten_minutes(
    tmp_path: Path, status: int
) -> None:
    """A 5xx is retried with the batch (a restarting platform), a 403 too (a token being
    replaced), but one broken or unreadable file must not hold the backup forever: after 5
    attempts over 10 minutes it is recorded as missing."""
    handler = type("H", (_Failing,), {"status": status})
    now = [1000.0]
    storage = LocalStorage(tmp_path / "a")
    event = _naming_a_file("/storage/get/import/Report/x/a.pdf")
    (entry,) = file_entries(event.stix)
    with serving(handler) as url:
        archiver = FileArchiver(storage, FileFetcher(url, "secret-token"), clock=lambda: now[0])
        try:
            for minute in (0, 1, 2, 3, 4, 5, 9):  # 7 attempts, but not yet 10 minutes
                now[0] = 1000.0 + 60 * minute
                with pytest.raises(RetryableError):
                    archiver.store([event])
            assert not storage.exists(missing_key(entry))
            now[0] = 1000.0 + 601
            archiver.store([event])
            record = orjson.loads(storage.get(missing_key(entry)))
            assert record["status"] == status and "8 times" in record["reason"]
            archiver.store([event])  # known now: no download, no error
        finally:
            archiver.close()


class _Recording(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[str] = []

    def put_if_absent(self, key: str, body: Any) -> bool:
        self.writes.append(key)
        return super().put_if_absent(key, body)


def test_files_are_durable_before_the_segment_that_names_them(
    source: SimServer, tmp_path: Path
) -> None:
    _seed(source)
    source.store.attach_file(REPORT, "analysis.pdf", b"%PDF")
    (entry,) = source.store.files_of(REPORT)
    event = _naming_a_file(entry["uri"])
    batch = Batch(first_id=event.id, last_id=event.id, events=[event])
    storage = _Recording(tmp_path / "a")
    sink = ArchiveSink(storage, files=FileArchiver(storage, FileFetcher(source.url, TOKEN_A)))
    sink.write(batch)
    assert [k.split("/")[0] for k in storage.writes] == ["files", "events", "manifests"]

    # A file that cannot be fetched yet holds the whole batch: no segment without its files.
    with serving(_Failing) as url:
        failing = _Recording(tmp_path / "b")
        sink = ArchiveSink(failing, files=FileArchiver(failing, FileFetcher(url, TOKEN_A)))
        with pytest.raises(RetryableError):
            sink.write(batch)
        assert failing.writes == [] and list(failing.list("")) == []
        sink.close()


@pytest.mark.parametrize("gone", [False, True])
def test_a_file_a_killed_run_left_in_place_is_made_durable_before_its_segment(
    tmp_path: Path, gone: bool
) -> None:
    """A killed run linked the file (or its ``.missing`` record) into ``files/<hh>/`` before it
    could fsync that directory. The restart takes the file as stored, without downloading it:
    the segment that names it is called durable only once the file's directories are."""
    event = _naming_a_file("/storage/get/import/Report/analysis.pdf")
    (entry,) = file_entries(event.stix)
    killed = tmp_path / "a" / (missing_key(entry) if gone else file_key(entry))
    killed.parent.mkdir(parents=True)
    killed.write_bytes(b"{}" if gone else b"%PDF")
    storage = RecordingStorage(tmp_path / "a")
    # Nothing listens there: a download would fail the write.
    sink = ArchiveSink(storage, files=FileArchiver(storage, FileFetcher("http://127.0.0.1:9", "t")))
    try:
        sink.write(Batch(first_id=event.id, last_id=event.id, events=[event]))
    finally:
        sink.close()
    assert sink.last.segments
    hh = Path(file_key(entry)).parent.as_posix()
    synced = [p.relative_to(storage.root).as_posix() for p in storage.synced[:3]]
    assert synced == [hh, "files", "."]


ODD_NAMES = [
    "Report #12.pdf",
    "what?.pdf",
    "a%41b.pdf",
    "100% sure.pdf",
    "naïve ü+.pdf",
    "t\tab.pdf",
]


def test_file_names_with_url_characters_reach_their_own_file(
    source: SimServer, tmp_path: Path
) -> None:
    """The uri holds the file id unencoded: '#', '?', '%' and the rest must be sent encoded,
    or the platform serves another path (or nothing) and the file is recorded as gone."""
    _seed(source)
    for i, name in enumerate(ODD_NAMES):
        source.store.attach_file(REPORT, name, f"content {i}".encode())
    archive = str(tmp_path / "archive")
    storage = _backup(source, archive)
    for i, entry in enumerate(source.store.files_of(REPORT)):
        assert storage.get(file_key(entry)) == f"content {i}".encode(), entry["name"]
    report = verify_archive(storage, work_dir=tmp_path / "v")
    assert report.ok and report.files == len(ODD_NAMES) and report.files_gone == 0


class _Answer(http.server.BaseHTTPRequestHandler):
    """One canned answer for every download."""

    status = 302
    headers_out: dict[str, str] = {}
    body = b""

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self.send_response(self.status)
        for name, value in self.headers_out.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.mark.parametrize(
    ("status", "headers", "body", "gone"),
    [
        (302, {"Location": "/"}, b"", True),  # older platforms: a file they do not have
        (404, {}, b"", True),
        (410, {}, b"", True),
        (503, {}, b'{"status":"error","error":"File not found or restricted"}', True),
        (503, {}, b"<html>Service Unavailable</html>", False),  # a proxy: the platform is down
        (302, {"Location": "https://sso.example/login"}, b"", False),
    ],
)
def test_what_the_platform_answers_for_a_file_it_does_not_have(
    tmp_path: Path, status: int, headers: dict[str, str], body: bytes, gone: bool
) -> None:
    handler = type("H", (_Answer,), {"status": status, "headers_out": headers, "body": body})
    storage = LocalStorage(tmp_path / "a")
    event = _naming_a_file("/storage/get/import/Report/x/a.pdf")
    (entry,) = file_entries(event.stix)
    with serving(handler) as url:
        archiver = FileArchiver(storage, FileFetcher(url, TOKEN_A))
        try:
            if gone:
                archiver.store([event])
                assert orjson.loads(storage.get(missing_key(entry)))["status"] == status
            else:
                with pytest.raises(RetryableError):
                    archiver.store([event])
                assert list(storage.list("")) == []
        finally:
            archiver.close()


def test_a_uri_no_request_can_carry_is_recorded_not_a_crash_loop(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "a")
    archiver = FileArchiver(storage, FileFetcher("http://127.0.0.1:9", TOKEN_A))
    event = _naming_a_file("/storage/get/import/Report/x/" + "n" * 70_000 + ".pdf")
    (entry,) = file_entries(event.stix)
    archiver.store([event])  # never reaches the network: nothing listens on port 9
    record = orjson.loads(storage.get(missing_key(entry)))
    assert record["status"] == 0 and "cannot be requested" in record["reason"]
    assert len(record["uri"]) < 1100 and len(record["name"]) < 1100
    archiver.close()


class _RefusesLargeBodies:
    """A restore target (our own protocol, connector.restore.RestoreTarget) that refuses a push
    carrying file data as the platform does past its max_payload_body_size (HTTP 413)."""

    def __init__(self) -> None:
        self.pushed: list[dict[str, Any]] = []

    def push_objects(self, objects: list[dict[str, Any]]) -> None:
        if any("data" in f for o in objects for f in file_entries(o)):
            raise PayloadTooLarge("HTTP 413: request entity too large")
        self.pushed += objects

    def delete_ids(self, stix_ids: list[str]) -> None:
        pass


def test_an_object_refused_for_its_files_size_is_restored_without_them(
    source: SimServer, tmp_path: Path
) -> None:
    _seed(source)
    source.store.attach_file(REPORT, "huge.pdf", b"%PDF" * 1000)
    archive = str(tmp_path / "archive")
    storage = _backup(source, archive)
    state = materialise(storage, until=None, work_dir=tmp_path / "plan")
    target = _RefusesLargeBodies()
    try:
        report = restore_to_target(state, target, files=storage)
    finally:
        state.close()
    assert sorted(o["id"] for o in target.pushed) == sorted([MALWARE, REPORT])
    assert report.files == 0 and report.files_too_large == 1


def test_files_that_fit_one_by_one_are_restored_though_together_they_do_not(
    source: SimServer, tmp_path: Path
) -> None:
    """The platform refuses a request above its max_payload_body_size (413). A report's files
    that each fit are all restored, though no request could carry them together; one that does
    not fit alone is left out, said and counted, and the others still go."""
    _seed(source)
    one, two, big = os.urandom(60_000), os.urandom(60_000), os.urandom(200_000)
    source.store.attach_file(REPORT, "one.pdf", one)
    source.store.attach_file(REPORT, "two.pdf", two)
    source.store.attach_file(REPORT, "big.pdf", big)
    archive = str(tmp_path / "archive")
    _backup(source, archive)
    with SimServer(token=TOKEN_B) as b:
        b.max_body_bytes = 130_000  # one 60 KB file in base64 (80 KB) fits, two do not
        summary = _restore(archive, b.url, tmp_path / "w")
        assert _contents(b, REPORT) == {"one.pdf": one, "two.pdf": two}
        assert summary["files"] == 2 and summary["files_too_large"] == 1
        assert b.store.get(REPORT) is not None and b.store.get(MALWARE) is not None


def test_max_file_mb_is_in_mib_and_a_file_of_exactly_that_size_is_restored(
    source: SimServer, tmp_path: Path
) -> None:
    """``--max-file-mb 0.01`` is 10485 bytes (0.01 MiB, rounded down): a file of exactly that
    size is restored, one byte more is left out and counted."""
    _seed(source)
    fits, over = os.urandom(10_485), os.urandom(10_486)
    source.store.attach_file(REPORT, "fits.pdf", fits)
    source.store.attach_file(MALWARE, "over.bin", over)
    archive = str(tmp_path / "archive")
    _backup(source, archive)
    with SimServer(token=TOKEN_B) as b:
        summary = _restore(archive, b.url, tmp_path / "w", "--max-file-mb", "0.01")
        assert _contents(b, REPORT) == {"fits.pdf": fits} and _contents(b, MALWARE) == {}
        assert summary["files"] == 1 and summary["files_too_large"] == 1


class _FailsOnFile:
    """A restore target that fails (a platform gone away) at the ``fail_at``-th push carrying
    file data, and records what it took."""

    def __init__(self, fail_at: int | None) -> None:
        self.fail_at = fail_at
        self.with_data: list[str] = []
        self.pushed: list[str] = []

    def push_objects(self, objects: list[dict[str, Any]]) -> None:
        names = [f["name"] for o in objects for f in file_entries(o) if "data" in f]
        if names and self.fail_at is not None and len(self.with_data) + 1 == self.fail_at:
            raise RetryableError("the platform went away")
        self.with_data += names
        self.pushed += [o["id"] for o in objects]

    def delete_ids(self, stix_ids: list[str]) -> None:
        pass


def test_a_restore_stopped_between_an_objects_files_pushes_them_when_resumed(
    source: SimServer, tmp_path: Path
) -> None:
    """The resume position moves past an object only once its last file is acknowledged."""
    _seed(source)
    source.store.attach_file(REPORT, "one.pdf", b"1" * 1000)
    source.store.attach_file(REPORT, "two.pdf", b"2" * 1000)
    storage = _backup(source, str(tmp_path / "archive"))
    state = materialise(storage, until=None, work_dir=tmp_path / "plan")
    resume = tmp_path / "restore-progress.json"
    try:
        first = _FailsOnFile(fail_at=2)
        with pytest.raises(RetryableError):
            restore_to_target(state, first, files=storage, resume_file=resume, target_name="b")
        assert first.with_data == ["one.pdf"]
        again = _FailsOnFile(fail_at=None)
        report = restore_to_target(state, again, files=storage, resume_file=resume, target_name="b")
    finally:
        state.close()
    assert sorted(again.with_data) == ["one.pdf", "two.pdf"]
    assert REPORT in again.pushed and report.files == 2


class _FailsOn(_FailsOnFile):
    """A restore target that fails (a platform gone away) at the push holding ``fail_on``."""

    def __init__(self, fail_on: str | None) -> None:
        super().__init__(fail_at=None)
        self.fail_on = fail_on

    def push_objects(self, objects: list[dict[str, Any]]) -> None:
        if any(o["id"] == self.fail_on for o in objects):
            raise RetryableError("the platform went away")
        super().push_objects(objects)


def test_a_restore_stopped_after_an_objects_files_does_not_send_them_again(
    source: SimServer, tmp_path: Path
) -> None:
    """The resume position moves past an object once its last file is acknowledged: stopped
    at the next push, the restore resumes after it, its files (megabytes) not sent twice."""
    _seed(source)
    source.store.attach_file(MALWARE, "one.pdf", b"1" * 1000)
    storage = _backup(source, str(tmp_path / "archive"))
    state = materialise(storage, until=None, work_dir=tmp_path / "plan")
    resume = tmp_path / "restore-progress.json"
    try:
        first = _FailsOn(REPORT)
        with pytest.raises(RetryableError):
            restore_to_target(state, first, files=storage, resume_file=resume, target_name="b")
        assert first.with_data == ["one.pdf"]
        again = _FailsOn(None)
        report = restore_to_target(state, again, files=storage, resume_file=resume, target_name="b")
    finally:
        state.close()
    assert again.with_data == [] and MALWARE not in again.pushed and REPORT in again.pushed
    assert report.files == 1


def test_objects_batched_before_one_with_files_are_pushed_before_it(
    source: SimServer, tmp_path: Path
) -> None:
    """A phase's objects go in push order: those batched before an object with files are sent
    before it (its position, saved once its last file is acknowledged, is past them: a stop
    then would leave them out of the resumed restore)."""
    _seed(source)
    for n in range(4):
        source.store.create(
            {
                "id": f"malware--{uuid.uuid5(uuid.NAMESPACE_DNS, f'plain {n}')}",
                "type": "malware",
                "spec_version": "2.1",
                "name": f"Plain {n}",
                "is_family": True,
            }
        )
    source.store.attach_file(MALWARE, "one.pdf", b"1" * 1000)
    storage = _backup(source, str(tmp_path / "archive"))
    state = materialise(storage, until=None, work_dir=tmp_path / "plan")
    target = _FailsOnFile(fail_at=None)
    try:
        order = [rec.stix_id for p in range(len(PHASES)) for _, rec in state.push_records(p)]
        restore_to_target(state, target, files=storage)
    finally:
        state.close()
    assert target.with_data == ["one.pdf"]
    assert list(dict.fromkeys(target.pushed)) == order  # the object with its file: twice
    assert order.index(MALWARE) > 0 and order[order.index(MALWARE) - 1].startswith("malware--")


def test_a_manifest_rebuilt_after_a_failed_write_still_says_its_files_are_archived(
    source: SimServer, tmp_path: Path
) -> None:
    """Segment stored, manifest write failed (a full disk; a kill there does the same), the
    batch retried: the rebuilt manifest lacked `"files": true`, so verify took the segment for
    one written without file backup and never checked its files again (one lost passed)."""
    _seed(source)
    source.store.attach_file(REPORT, "analysis.pdf", b"%PDF-1.7")
    (entry,) = source.store.files_of(REPORT)
    stix = {
        "id": REPORT,
        "type": "report",
        "spec_version": "2.1",
        "extensions": {OCTI_EXT: {"files": [entry]}},
    }
    body = orjson.dumps({"data": stix, "message": "m", "version": "4"})
    event = StreamEvent(EventId(1_800_000_000_000, 0), "1800000000000-0", "update", body)
    batch = Batch(first_id=event.id, last_id=event.id, events=[event])
    ref = LocalStorage(tmp_path / "ref")
    ArchiveSink(ref, files=FileArchiver(ref, FileFetcher(source.url, TOKEN_A))).write(batch)
    storage = FullFor(tmp_path / "a", first_write_under(MANIFESTS_PREFIX))  # after the segment
    sink = ArchiveSink(storage, files=FileArchiver(storage, FileFetcher(source.url, TOKEN_A)))
    with pytest.raises(RetryableError):
        sink.write(batch)
    sink.write(batch)  # the pipeline's retry
    assert storage.get(manifest_key(event.id)) == ref.get(manifest_key(event.id))
    storage.delete(file_key(entry))
    assert not verify_archive(storage, work_dir=tmp_path / "v").ok  # a lost file is found


def test_a_file_recorded_missing_is_not_asked_for_again_after_a_restart(
    source: SimServer, tmp_path: Path
) -> None:
    """A file the archive recorded gone (``.missing``), or holds, is taken as such by the next
    run: its events are archived again after a restart without asking the source once more."""
    _seed(source)
    source.store.attach_file(REPORT, "gone.pdf", b"gone")
    (gone,) = source.store.files_of(REPORT)
    source.store.forget_file_content(_file_id(gone))
    source.store.attach_file(MALWARE, "kept.pdf", b"kept")
    (kept,) = source.store.files_of(MALWARE)
    storage = LocalStorage(str(tmp_path / "archive"))
    events = sim_events(source.store)[0]
    first = FileArchiver(storage, FileFetcher(source.url, TOKEN_A))
    first.store(events)
    first.close()
    assert storage.exists(missing_key(gone)) and storage.get(file_key(kept)) == b"kept"
    asked = source.file_requests
    again = FileArchiver(storage, FileFetcher(source.url, TOKEN_A))  # the restart's
    again.store(events)
    again.close()
    assert source.file_requests == asked
