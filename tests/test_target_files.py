"""Attached files carried live into a second platform (``TARGET_FILES``): inline, as the
platform's own Synchronizer sends them, one file per push or message after the object itself,
read from the archive when it archives them, else downloaded from the source; each version once;
left out, counted and said, when too large for the target's requests or its broker's messages,
or gone from the source. Real parts: the simulator serves files over HTTP, pycti pushes into the
platform double, a private RabbitMQ carries the amqp transport to the double's worker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tracemalloc
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from connector import metrics
from connector.errors import RetryableError
from connector.files import Downloads, FileArchiver, FileCarrier, FileFetcher, file_entries
from connector.sim.platform import platform_state
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.storage.local import LocalStorage
from connector.target.opencti import OpenCTITarget
from tests.support.compare import assert_same_state, state_diff
from tests.support.connector import ConnectorThread, base_env, caught_up, wait_until
from tests.support.rabbitmq import RabbitNode, private_broker, rabbitmq  # noqa: F401
from tests.support.simlog import copy_event, sim_events
from tests.support.target import Sync, batch_of, target_for

TOKEN_A = "token-target-files-a"
TOKEN_B = "token-target-files-b"
REPORT = "report--3c5e1f4a-8d2b-4f6e-9a1c-7b0d2e4f6a81"
MALWARE = "malware--7e2a9c4d-1b3f-4e5a-8c6d-0f1e2d3c4b5a"


def _seed(store: SimStore) -> None:
    store.create(
        {
            "id": MALWARE,
            "type": "malware",
            "spec_version": "2.1",
            "name": "Carried Malware",
            "is_family": True,
        }
    )
    store.create(
        {
            "id": REPORT,
            "type": "report",
            "spec_version": "2.1",
            "name": "Carried Report",
            "published": "2026-01-01T00:00:00.000Z",
            "object_refs": [MALWARE],
        }
    )


def _contents(sim: SimServer, ref: str) -> dict[str, bytes | None]:
    return {
        f["name"]: sim.store.file_content(unquote(f["uri"].removeprefix("/storage/get/")))
        for f in sim.store.files_of(ref)
    }


def _sent(result: str) -> float:
    labels = {"result": result}
    return metrics.REGISTRY.get_sample_value("opencti_sync_target_files_total", labels) or 0.0


def _counts() -> dict[str, float]:
    return {r: _sent(r) for r in ("sent", "gone", "too_large", "refused")}


def _since(before: dict[str, float]) -> dict[str, float]:
    return {r: n - before[r] for r, n in _counts().items()}


@pytest.fixture
def source() -> Iterator[SimServer]:
    with SimServer(token=TOKEN_A, heartbeat_secs=0.2) as sim:
        yield sim


def test_run_carries_files_to_the_target_from_the_archive_once_per_version(
    source: SimServer, tmp_path: Path
) -> None:
    """``run`` into an archive and a second platform (api transport): the target gets each
    file's bytes, read from the archive (the source serves each version once, to the archive);
    an update naming the same version does not send it again; a new version is sent."""
    before = _counts()
    _seed(source.store)
    pdf_v1, pdf_v2, csv = os.urandom(200_000), os.urandom(150_000), b"ip\n10.0.0.1\n" * 500
    source.store.attach_file(REPORT, "analysis.pdf", pdf_v1)
    source.store.attach_file(MALWARE, "iocs.csv", csv, mime_type="text/csv")
    archive = str(tmp_path / "archive")
    storage = LocalStorage(archive)
    env = base_env(
        source.url,
        TOKEN_A,
        archive,
        TARGET_OPENCTI_URL="",  # set below, once B runs
        TARGET_OPENCTI_TOKEN=TOKEN_B,
        TARGET_TRANSPORT="api",
    )
    with SimServer(token=TOKEN_B) as b:
        env["TARGET_OPENCTI_URL"] = b.url
        run = ConnectorThread(env).start()
        try:
            wait_until(lambda: caught_up(storage, source.store.last_event_id), what="sync")
            assert _contents(b, REPORT) == {"analysis.pdf": pdf_v1}
            assert _contents(b, MALWARE) == {"iocs.csv": csv}
            assert source.file_requests == 2  # the archive's downloads only
            assert _since(before) == {"sent": 2, "gone": 0, "too_large": 0, "refused": 0}
            assert b.store.file_uploads == 2

            # The report changes, its file does not: not sent again, still there.
            source.store.update(REPORT, set={"description": "reviewed"})
            wait_until(lambda: caught_up(storage, source.store.last_event_id), what="update")
            assert b.store.get(REPORT)["description"] == "reviewed"  # type: ignore[index]
            assert _contents(b, REPORT) == {"analysis.pdf": pdf_v1}
            assert _since(before)["sent"] == 2 and source.file_requests == 2
            assert b.store.file_uploads == 2

            # A new version of the file is.
            source.store.attach_file(REPORT, "analysis.pdf", pdf_v2)
            wait_until(lambda: caught_up(storage, source.store.last_event_id), what="version 2")
            assert _contents(b, REPORT) == {"analysis.pdf": pdf_v2}
            assert _since(before)["sent"] == 3 and source.file_requests == 3
            assert b.store.file_uploads == 3
        finally:
            run.stop()
        assert run.error is None
        assert_same_state(source.store.dump_bundle(), b.store.dump_bundle())


def test_run_over_amqp_downloads_files_the_archive_does_not_keep(
    source: SimServer,
    tmp_path: Path,
    rabbitmq: RabbitNode,  # noqa: F811
) -> None:
    """amqp transport, ``ARCHIVE_FILES=false``: the target downloads the files itself. One too
    large for ``TARGET_MAX_FILE_MB`` and one gone from the source are left out and counted; the
    objects are synced all the same, and the sync goes on."""
    before = _counts()
    _seed(source.store)
    csv, pdf = b"ip\n10.0.0.2\n" * 400, os.urandom(300_000)
    source.store.attach_file(MALWARE, "iocs.csv", csv, mime_type="text/csv")
    source.store.attach_file(REPORT, "big.pdf", pdf)
    source.store.attach_file(REPORT, "gone.pdf", b"gone")
    (gone,) = [f for f in source.store.files_of(REPORT) if f["name"] == "gone.pdf"]
    source.store.forget_file_content(unquote(gone["uri"].removeprefix("/storage/get/")))
    archive = str(tmp_path / "archive")
    storage = LocalStorage(archive)
    with SimServer(token=TOKEN_B, amqp_url=rabbitmq.url) as b:
        env = base_env(
            source.url,
            TOKEN_A,
            archive,
            ARCHIVE_FILES="false",
            TARGET_OPENCTI_URL=b.url,
            TARGET_OPENCTI_TOKEN=TOKEN_B,
            TARGET_TRANSPORT="amqp",
            TARGET_MAX_FILE_MB="0.2",
        )
        run = ConnectorThread(env).start()
        try:
            wait_until(lambda: caught_up(storage, source.store.last_event_id), what="sync")
            wait_until(
                lambda: (
                    _contents(b, MALWARE) == {"iocs.csv": csv} and b.store.get(REPORT) is not None
                ),
                timeout=60,
                what="B applied the messages",
            )
        finally:
            run.stop()
        assert run.error is None
        assert list(storage.list("files/")) == []  # the archive kept none
        (worker,) = platform_state(b.store).workers.values()
        assert not worker.failures, worker.failures[:3]
        assert _contents(b, REPORT) == {}
        assert _since(before) == {"sent": 1, "gone": 1, "too_large": 1, "refused": 0}
        # Everything but the two files' bytes is there.
        diff = state_diff(source.store.dump_bundle(), b.store.dump_bundle())
        assert diff and all(d.startswith(f"{REPORT} differs: extensions") for d in diff), diff


def _carrier(source: SimServer, **kwargs: Any) -> FileCarrier:
    downloads = Downloads(FileFetcher(source.url, TOKEN_A))
    options: dict[str, Any] = {"archive": None, "downloads": downloads, "max_bytes": 1 << 30}
    return FileCarrier(**{**options, **kwargs})


def _settle(b: SimServer, target: OpenCTITarget) -> None:
    """Wait until B applied what the target sent (amqp: its worker; api: already applied)."""
    if target.publisher is not None:
        worker = platform_state(b.store).workers[target.connector_id]
        assert worker.wait_handled(target.publisher.published, timeout=60)
        assert not worker.failures, worker.failures[:1]


@contextmanager
def _archived_sync(
    source: SimServer, b: SimServer, tmp_path: Path, **options: Any
) -> Iterator[tuple[FileArchiver, Sync]]:
    """The archive's file archiver and a sync into B whose target carries files read from that
    archive, as ``run`` has them (``options`` override ``target_for``'s); both closed after."""
    storage = LocalStorage(str(tmp_path / "archive"))
    archiver = FileArchiver(storage, FileFetcher(source.url, TOKEN_A))
    carrier = FileCarrier(archive=storage, downloads=None, max_bytes=1 << 30)
    target = target_for(b.url, **{"token": TOKEN_B, "files": carrier, **options})
    try:
        target.check()
        yield archiver, Sync(source.store, b, target)
    finally:
        target.close()
        archiver.close()


def _sync_once(source: SimServer, b: SimServer, **options: Any) -> OpenCTITarget:
    """The source's stream so far written to B in one batch by a target carrying files
    (``options`` override ``target_for``'s), applied by B, the target closed; returns it."""
    target = target_for(b.url, **{"token": TOKEN_B, "files": _carrier(source), **options})
    try:
        target.check()
        Sync(source.store, b, target).step()
        _settle(b, target)
    finally:
        target.close()
    return target


def test_an_object_the_target_refuses_for_its_size_goes_without_its_files(
    source: SimServer,
) -> None:
    """api transport: the object goes first without its file, then with it; a push above the
    target's max_payload_body_size (413) leaves the file out, counted; the other object's file is
    carried."""
    before = _counts()
    _seed(source.store)
    source.store.attach_file(REPORT, "huge.pdf", os.urandom(120_000))
    source.store.attach_file(MALWARE, "small.txt", b"small", mime_type="text/plain")
    with SimServer(token=TOKEN_B) as b:
        b.max_body_bytes = 100_000
        target = _sync_once(source, b)
        assert target.rejected == []
        assert b.store.get(REPORT) is not None and _contents(b, REPORT) == {}
        assert _contents(b, MALWARE) == {"small.txt": b"small"}
        assert _since(before) == {"sent": 1, "gone": 0, "too_large": 1, "refused": 0}


def test_a_message_the_broker_would_refuse_goes_without_its_files(
    source: SimServer,
    rabbitmq: RabbitNode,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """amqp transport: the message carrying a file that would pass the broker's maximum size is
    not sent; the event's own message is, nothing is quarantined."""
    before = _counts()
    _seed(source.store)
    source.store.attach_file(REPORT, "big.pdf", os.urandom(60_000))
    with SimServer(token=TOKEN_B, amqp_url=rabbitmq.url) as b:
        target = _sync_once(source, b, transport="amqp", amqp_max_message_bytes=50_000)
        assert target.rejected == []  # and B's worker refused nothing (_settle)
        assert b.store.get(REPORT) is not None and _contents(b, REPORT) == {}
        assert _since(before) == {"sent": 0, "gone": 0, "too_large": 1, "refused": 0}
        # The operator is told which file of which object to upload by hand.
        (said,) = [r for r in caplog.records if "too large to carry" in r.getMessage()]
        assert said.__dict__["files"] == ["big.pdf"] and said.__dict__["object"] == REPORT


@pytest.mark.parametrize(
    ("env", "carried", "from_archive"),
    [
        ({}, True, True),
        ({"ARCHIVE_FILES": "false"}, True, False),
        ({"TARGET_FILES": "false"}, False, False),
    ],
)
def test_where_run_takes_the_files_it_carries(
    tmp_path: Path, env: dict[str, str], carried: bool, from_archive: bool
) -> None:
    """The target reads files from the archive when the archive keeps them, downloads them
    otherwise, and carries none with ``TARGET_FILES=false``."""
    from connector.__main__ import build_runtime
    from connector.settings import load_settings

    settings = load_settings(
        None,
        env={
            "OPENCTI_URL": "http://127.0.0.1:9",
            "OPENCTI_TOKEN": TOKEN_A,
            "ARCHIVE_URI": str(tmp_path / "archive"),
            "TARGET_OPENCTI_URL": "http://127.0.0.1:10",
            "TARGET_OPENCTI_TOKEN": TOKEN_B,
            "TARGET_MAX_FILE_MB": "2.5",
            **env,
        },
    )
    (target,) = [s for s in build_runtime(settings)["sinks"] if s.name == "opencti"]
    assert (target.files is not None) is carried
    if target.files is not None:
        assert (target.files.archive is not None) is from_archive
        assert target.files.downloads is not None
        assert target.files.max_bytes == int(2.5 * 1024 * 1024)


@pytest.mark.parametrize("transport", ["api", "amqp"])
def test_a_version_named_by_every_event_of_a_batch_is_read_and_sent_once(
    source: SimServer,
    transport: str,
    rabbitmq: RabbitNode,  # noqa: F811
) -> None:
    """A report edited five times after its PDF was attached: six events of one batch name the
    same version. Both transports download it once and upload it once."""
    _seed(source.store)
    pdf = os.urandom(100_000)
    source.store.attach_file(REPORT, "analysis.pdf", pdf)
    for n in range(5):
        source.store.update(REPORT, set={"description": f"edit {n}"})
    with SimServer(token=TOKEN_B, amqp_url=rabbitmq.url) as b:
        _sync_once(source, b, transport=transport)
        assert _contents(b, REPORT) == {"analysis.pdf": pdf}
        assert (source.file_requests, b.store.file_uploads) == (1, 1)


@pytest.mark.parametrize("transport", ["api", "amqp"])
def test_files_that_fit_one_by_one_are_all_carried(
    source: SimServer,
    transport: str,
    rabbitmq: RabbitNode,  # noqa: F811
) -> None:
    """Two 40 KB files on one report, a target taking about 100 KB per request (api: its
    max_payload_body_size) or per message (amqp): together they would not pass, one by one
    they do."""
    before = _counts()
    _seed(source.store)
    one, two = os.urandom(40_000), os.urandom(40_000)
    source.store.attach_file(REPORT, "one.pdf", one)
    source.store.attach_file(REPORT, "two.pdf", two)
    with SimServer(token=TOKEN_B, amqp_url=rabbitmq.url) as b:
        options: dict[str, Any] = {"transport": transport}
        if transport == "api":
            b.max_body_bytes = 100_000
        else:
            options["amqp_max_message_bytes"] = 100_000
        _sync_once(source, b, **options)
        assert _contents(b, REPORT) == {"one.pdf": one, "two.pdf": two}
        assert _since(before) == {"sent": 2, "gone": 0, "too_large": 0, "refused": 0}


def test_the_file_of_an_event_quarantined_for_its_own_size_is_carried_by_a_later_one(
    source: SimServer,
    rabbitmq: RabbitNode,  # noqa: F811
) -> None:
    """amqp: a report too large for the broker even without its 2 KB file is quarantined; the
    file is not counted too large, and reaches the target with the report's next event."""
    before = _counts()
    _seed(source.store)
    txt = os.urandom(2_000)
    source.store.update(REPORT, set={"description": "x" * 80_000})
    source.store.attach_file(REPORT, "notes.bin", txt)
    with SimServer(token=TOKEN_B, amqp_url=rabbitmq.url) as b:
        target = target_for(
            b.url,
            token=TOKEN_B,
            transport="amqp",
            amqp_max_message_bytes=50_000,
            files=_carrier(source),
        )
        try:
            target.check()
            sync = Sync(source.store, b, target)
            sync.step()
            _settle(b, target)
            assert len(target.rejected) >= 1  # the oversized report: quarantined
            source.store.update(REPORT, set={"description": "short"})  # its patch is 80 KB
            source.store.update(REPORT, set={"description": "final"})  # a small message
            sync.step()
            _settle(b, target)
        finally:
            target.close()
        assert b.store.get(REPORT)["description"] == "final"  # type: ignore[index]
        assert _contents(b, REPORT) == {"notes.bin": txt}
        assert _since(before) == {"sent": 1, "gone": 0, "too_large": 0, "refused": 0}


def test_a_file_sent_with_one_event_is_counted_sent_once_not_too_large(
    source: SimServer,
    rabbitmq: RabbitNode,  # noqa: F811
) -> None:
    """amqp: the report's attach event carries the file; a later update of the same batch, whose
    message would pass the broker's limit with the file, names it again: it is not sent twice,
    and it is counted sent, not too large."""
    before = _counts()
    _seed(source.store)
    pdf = os.urandom(20_000)
    source.store.attach_file(REPORT, "analysis.pdf", pdf)
    source.store.update(REPORT, set={"description": "y" * 6_000})
    with SimServer(token=TOKEN_B, amqp_url=rabbitmq.url) as b:
        target = _sync_once(source, b, transport="amqp", amqp_max_message_bytes=50_000)
        assert target.rejected == []
        assert _contents(b, REPORT) == {"analysis.pdf": pdf}
        assert _since(before) == {"sent": 1, "gone": 0, "too_large": 0, "refused": 0}


def test_a_platform_that_cannot_queue_a_request_for_its_size_is_told_apart() -> None:
    """The broker behind the platform refuses a bundle above its max_message_size; the platform
    answers with the broker's words. That is a push too large (the file is left out), not a
    refusal that stops the sync."""
    from connector.errors import PayloadTooLarge

    target = target_for("http://127.0.0.1:9", token=TOKEN_B)
    error = ValueError(
        {
            "name": "UNKNOWN_ERROR",
            "error_message": "message size 20971600 is larger than configured max size 16777216",
        }
    )
    assert isinstance(target._translate("push upsert", error), PayloadTooLarge)
    other = ValueError({"name": "UNKNOWN_ERROR", "error_message": "something else"})
    assert not isinstance(target._translate("push upsert", other), PayloadTooLarge)


def _tracked_peak(source: SimServer, files: int, size: int) -> int:
    """Peak of the bytes this process allocates while the target carries ``files`` files of
    ``size`` bytes on one report (the target platform runs in another process)."""
    source.store.attach_file(MALWARE, "x.txt", b"x")  # a first event that names a file
    for i in range(files):
        source.store.attach_file(REPORT, f"part{i}.bin", os.urandom(size))
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector.sim", "--port", "0", "--token", TOKEN_B],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        found = re.search(r"(http://\S+)", proc.stdout.readline())
        assert found is not None
        target = target_for(found.group(1), token=TOKEN_B, files=_carrier(source))
        try:
            target.check()
            tracemalloc.start()
            Sync(source.store, None, target).step()  # type: ignore[arg-type]
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            target.close()
    finally:
        proc.terminate()
        proc.wait()


def test_memory_while_carrying_files_is_bounded_by_one_file_not_by_an_objects_files() -> None:
    """One report with six 4 MB files needs about the memory of one: each goes alone."""
    peaks = []
    for files in (1, 6):
        with SimServer(token=TOKEN_A) as source:
            _seed(source.store)
            peaks.append(_tracked_peak(source, files, 4_000_000))
    one, six = peaks
    assert one > 4_000_000  # the measure sees the file at all
    assert six < 1.5 * one, f"one file: {one / 1e6:.1f} MB, six files: {six / 1e6:.1f} MB"


LIMIT = 1024 * 1024  # the small broker's max_message_size


@pytest.fixture(scope="module")
def small_broker() -> Iterator[RabbitNode]:
    yield from private_broker("octisync-rabbit-files-", f"max_message_size = {LIMIT}\n")


@pytest.mark.parametrize("learned", [False, True], ids=["limit-configured", "limit-learned"])
def test_a_later_event_of_the_batch_carries_the_file_of_an_event_quarantined_for_size(
    source: SimServer, small_broker: RabbitNode, learned: bool
) -> None:
    """A report too large for the broker names a 2 KB file; its last event of the same batch is
    small and names it too: that event carries it, whether the broker's limit was configured or
    is learned from its refusal in the middle of the batch."""
    before = _counts()
    _seed(source.store)
    txt = os.urandom(2_000)
    source.store.update(REPORT, set={"description": "x" * (LIMIT + 100_000)})
    source.store.attach_file(REPORT, "notes.bin", txt)
    source.store.update(REPORT, set={"description": "short"})  # its reverse patch is big
    source.store.update(REPORT, set={"description": "final"})  # small, names the file
    options = {} if learned else {"amqp_max_message_bytes": LIMIT}
    with SimServer(token=TOKEN_B, amqp_url=small_broker.url) as b:
        target = _sync_once(source, b, transport="amqp", **options)
        assert target.amqp_max_message_bytes <= LIMIT
        assert len(target.rejected) == 3  # the big update, the attach, "short"
        assert b.store.get(REPORT)["description"] == "final"  # type: ignore[index]
        assert _contents(b, REPORT) == {"notes.bin": txt}
        assert _since(before) == {"sent": 1, "gone": 0, "too_large": 0, "refused": 0}


def _archive_then_target(archiver: FileArchiver, sync: Sync) -> None:
    """What the pipeline does with one batch: the archive (files first), then the target."""
    events, pos = sim_events(sync.a, sync.pos)
    archiver.store(events)
    sync.target.write(batch_of(events))
    sync.pos = pos


def test_a_file_carried_before_is_not_sent_again_to_an_object_deleted_in_the_batch(
    source: SimServer, tmp_path: Path
) -> None:
    """The report's PDF reached the target in batch 1. Batch 2 edits the report (naming the PDF
    again), then deletes it: the PDF is not read nor sent again."""
    before = _counts()
    _seed(source.store)
    pdf = os.urandom(200_000)
    source.store.attach_file(REPORT, "analysis.pdf", pdf)
    with SimServer(token=TOKEN_B) as b:
        with _archived_sync(source, b, tmp_path) as (archiver, sync):
            _archive_then_target(archiver, sync)
            assert _contents(b, REPORT) == {"analysis.pdf": pdf}
            source.store.update(REPORT, set={"description": "about to go"})
            source.store.delete(REPORT)
            _archive_then_target(archiver, sync)
        assert b.store.get(REPORT) is None
        assert b.store.file_uploads == 1
        assert _since(before) == {"sent": 1, "gone": 0, "too_large": 0, "refused": 0}


@pytest.mark.parametrize("together", [False, True], ids=["delete-in-next-batch", "same-batch"])
def test_an_object_that_comes_back_after_a_delete_gets_its_file_again(
    source: SimServer, tmp_path: Path, together: bool
) -> None:
    """A delete takes the object's files with it on the target; the object that comes back
    (the same entity and file: a restore from the platform's trash, sent here the way the stream
    re-sends an object) gets its file again, also when the file was carried in the delete's own
    batch."""
    _seed(source.store)
    pdf = os.urandom(100_000)
    source.store.attach_file(REPORT, "analysis.pdf", pdf)
    report = source.store.get(REPORT)
    assert report is not None
    with SimServer(token=TOKEN_B) as b:
        with _archived_sync(source, b, tmp_path) as (archiver, sync):
            target = sync.target
            if together:
                events, pos = sim_events(source.store)
                archiver.store(events)  # the archive has the PDF (downloaded before the delete)
                source.store.delete(REPORT)
                more, sync.pos = sim_events(source.store, pos)
                target.write(batch_of(events + more))
            else:
                _archive_then_target(archiver, sync)
                source.store.delete(REPORT)
                _archive_then_target(archiver, sync)
            assert b.store.get(REPORT) is None
            last = sync.a.last_event_id
            assert last is not None
            back = copy_event(f"{int(last.split('-')[0]) + 1}-0", report)
            target.write(batch_of([back]))
        assert _contents(b, REPORT) == {"analysis.pdf": pdf}


@pytest.mark.parametrize("transport", ["api", "amqp"])
@pytest.mark.parametrize("carried", ["in-an-earlier-batch", "in-the-same-batch"])
def test_an_object_deleted_and_back_in_one_batch_gets_its_file_again(
    source: SimServer,
    tmp_path: Path,
    transport: str,
    carried: str,
    rabbitmq: RabbitNode,  # noqa: F811
) -> None:
    """One batch deletes the report and brings it back (same entity, same file), after the PDF
    reached the target in an earlier batch or earlier in the same one: the delete took the PDF
    on the target, so the report that comes back gets it again, on both transports."""
    _seed(source.store)
    pdf = os.urandom(100_000)
    source.store.attach_file(REPORT, "analysis.pdf", pdf)
    report = source.store.get(REPORT)
    assert report is not None
    with SimServer(token=TOKEN_B, amqp_url=rabbitmq.url) as b:
        with _archived_sync(source, b, tmp_path, transport=transport) as (archiver, sync):
            earlier: list[Any] = []
            if carried == "in-an-earlier-batch":
                _archive_then_target(archiver, sync)
                _settle(b, sync.target)
                assert _contents(b, REPORT) == {"analysis.pdf": pdf}
            else:
                earlier, sync.pos = sim_events(source.store, sync.pos)
                archiver.store(earlier)  # the archive has the PDF (downloaded before the delete)
            source.store.delete(REPORT)
            gone, sync.pos = sim_events(source.store, sync.pos)
            back = copy_event(f"{int(gone[-1].id_text.split('-')[0]) + 1}-0", report)
            sync.target.write(batch_of([*earlier, *gone, back]))
            _settle(b, sync.target)
        assert _contents(b, REPORT) == {"analysis.pdf": pdf}


MIB = 1 << 20  # the size of the pieces a download is read in


@pytest.mark.parametrize("read_from", ["archive", "source"])
def test_a_file_of_exactly_the_limit_is_carried_and_one_byte_more_is_not(
    source: SimServer, tmp_path: Path, read_from: str
) -> None:
    """``max_file_mb`` is the largest file carried: a file of exactly that size goes whole; one
    byte more is left out, counted too large, never sent cut at the limit (a download stops
    reading once it holds more than the limit)."""
    before = _counts()
    _seed(source.store)
    exact, over = os.urandom(MIB), os.urandom(MIB + 1)
    source.store.attach_file(REPORT, "exact.bin", exact)
    source.store.attach_file(MALWARE, "over.bin", over)
    storage = LocalStorage(str(tmp_path / "archive"))
    if read_from == "archive":
        archiver = FileArchiver(storage, FileFetcher(source.url, TOKEN_A))
        archiver.store(sim_events(source.store)[0])
        archiver.close()
        carrier = FileCarrier(archive=storage, downloads=None, max_bytes=MIB)
    else:
        carrier = _carrier(source, max_bytes=MIB)
    with SimServer(token=TOKEN_B) as b:
        _sync_once(source, b, files=carrier)
        assert _contents(b, REPORT) == {"exact.bin": exact}
        assert _contents(b, MALWARE) == {}
    assert _since(before) == {"sent": 1, "gone": 0, "too_large": 1, "refused": 0}


def test_a_file_downloaded_to_a_scratch_file_is_carried_whole(
    source: SimServer, tmp_path: Path
) -> None:
    """A download larger than the spool's memory goes to a scratch file, read back from its
    start; a file above 3 MiB is encoded in pieces that must join into one encoding."""
    _seed(source.store)
    pdf = os.urandom((3 << 20) + 1000)
    source.store.attach_file(REPORT, "large.pdf", pdf)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    carrier = _carrier(source, spool_dir=scratch, spool_bytes=64 * 1024)
    with SimServer(token=TOKEN_B) as b:
        _sync_once(source, b, files=carrier)
        assert _contents(b, REPORT) == {"large.pdf": pdf}
    assert list(scratch.iterdir()) == []  # the scratch file is gone with the download


def test_a_file_the_archive_recorded_missing_is_not_asked_of_the_source_again(
    source: SimServer, tmp_path: Path
) -> None:
    """The archive's run found the file gone and recorded it so: the target reading from that
    archive takes its word, counts it gone and does not ask the source once more."""
    before = _counts()
    _seed(source.store)
    source.store.attach_file(REPORT, "gone.pdf", b"gone soon")
    (gone,) = source.store.files_of(REPORT)
    source.store.forget_file_content(unquote(gone["uri"].removeprefix("/storage/get/")))
    storage = LocalStorage(str(tmp_path / "archive"))
    archiver = FileArchiver(storage, FileFetcher(source.url, TOKEN_A))
    archiver.store(sim_events(source.store)[0])
    archiver.close()
    assert [k for k in storage.list("files/") if k.endswith(".missing")]
    asked = source.file_requests
    carrier = FileCarrier(
        archive=storage, downloads=Downloads(FileFetcher(source.url, TOKEN_A)), max_bytes=MIB
    )
    with SimServer(token=TOKEN_B) as b:
        _sync_once(source, b, files=carrier)
        assert b.store.get(REPORT) is not None and _contents(b, REPORT) == {}
    assert source.file_requests == asked
    assert _since(before) == {"sent": 0, "gone": 1, "too_large": 0, "refused": 0}


class _FileAnswerLost(OpenCTITarget):
    """A target whose first push carrying a file's bytes fails (the answer lost on the way)."""

    failed = False

    def _push(self, push: Any) -> None:
        carries = any("data" in f for o in push.objects for f in file_entries(o))
        if carries and not self.failed:
            self.failed = True
            raise RetryableError("the platform's answer was lost")
        super()._push(push)


def test_a_batch_retried_after_a_failed_file_push_carries_the_file(source: SimServer) -> None:
    """The push of the report with its PDF inline fails: the write fails, the batch is written
    again, and the PDF its first attempt claimed goes with the retry."""
    _seed(source.store)
    pdf = os.urandom(50_000)
    source.store.attach_file(REPORT, "analysis.pdf", pdf)
    with SimServer(token=TOKEN_B) as b:
        target = _FileAnswerLost(
            url=b.url,
            token=TOKEN_B,
            connector_id=str(uuid.uuid4()),
            source_url="http://source.example:4000",
            files=_carrier(source),
        )
        try:
            target.check()
            batch = batch_of(sim_events(source.store)[0])
            with pytest.raises(RetryableError, match="answer was lost"):
                target.write(batch)
            target.write(batch)
        finally:
            target.close()
        assert target.failed
        assert _contents(b, REPORT) == {"analysis.pdf": pdf}


def test_the_file_of_an_object_the_target_refused_is_carried_when_it_is_taken(
    source: SimServer,
) -> None:
    """api: the target refuses the malware for its own data (quarantined): its file is not
    pushed with it, nor counted; the malware's next event, taken, carries the file."""
    before = _counts()
    _seed(source.store)
    csv = b"ip\n10.0.0.3\n" * 100
    source.store.attach_file(MALWARE, "iocs.csv", csv, mime_type="text/csv")
    good = source.store.get(MALWARE)
    assert good is not None
    bad = {k: v for k, v in good.items() if k != "type"}  # the double refuses it
    with SimServer(token=TOKEN_B) as b:
        target = target_for(b.url, token=TOKEN_B, files=_carrier(source))
        try:
            target.check()
            target.write(batch_of([copy_event("1000-0", bad)]))
            assert [q.id_text for q in target.rejected] == ["1000-0"]
            assert _since(before) == {"sent": 0, "gone": 0, "too_large": 0, "refused": 0}
            target.write(batch_of([copy_event("2000-0", good)]))
            assert target.rejected == []
        finally:
            target.close()
        assert _contents(b, MALWARE) == {"iocs.csv": csv}
    assert _since(before) == {"sent": 1, "gone": 0, "too_large": 0, "refused": 0}


def test_the_files_of_an_event_quarantined_for_its_own_size_are_not_read_for_it(
    source: SimServer,
    rabbitmq: RabbitNode,  # noqa: F811
) -> None:
    """amqp: every event naming the file is too large for the broker even without it: they are
    quarantined and the file is left to a later event, not read for them (here it would be
    counted too large for a message never sent)."""
    before = _counts()
    _seed(source.store)
    source.store.update(REPORT, set={"description": "x" * 80_000})
    source.store.attach_file(REPORT, "over.bin", os.urandom(MIB + 1))
    with SimServer(token=TOKEN_B, amqp_url=rabbitmq.url) as b:
        options = {"transport": "amqp", "amqp_max_message_bytes": 50_000}
        target = _sync_once(source, b, files=_carrier(source, max_bytes=MIB), **options)
    assert len(target.rejected) == 2  # the update and the attach event
    assert _since(before) == {"sent": 0, "gone": 0, "too_large": 0, "refused": 0}
