"""Attached files carried live into a second platform (``TARGET_FILES``): inline, as the
platform's own Synchronizer sends them, read from the archive when it archives them, else
downloaded from the source; each version once; left out, counted and said, when too large for
the target's requests or its broker's messages, or gone from the source. Real parts: the
simulator serves files over HTTP, pycti pushes into the platform double, a private RabbitMQ
carries the amqp transport to the double's worker."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from connector import metrics
from connector.files import Downloads, FileCarrier, FileFetcher
from connector.sim.platform import platform_state
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.storage.local import LocalStorage
from connector.target.opencti import OpenCTITarget
from tests.support.compare import assert_same_state, state_diff
from tests.support.connector import ConnectorThread, base_env, caught_up, wait_until
from tests.support.rabbitmq import RabbitNode, rabbitmq  # noqa: F401
from tests.support.target import Sync, target_for

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
    return {r: _sent(r) for r in ("sent", "gone", "too_large")}


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
            assert _since(before) == {"sent": 2, "gone": 0, "too_large": 0}
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
        assert _since(before) == {"sent": 1, "gone": 1, "too_large": 1}
        # Everything but the two files' bytes is there.
        diff = state_diff(source.store.dump_bundle(), b.store.dump_bundle())
        assert diff and all(d.startswith(f"{REPORT} differs: extensions") for d in diff), diff


def _carrier(source: SimServer, **kwargs: Any) -> FileCarrier:
    downloads = Downloads(FileFetcher(source.url, TOKEN_A))
    options: dict[str, Any] = {"archive": None, "downloads": downloads, "max_bytes": 1 << 30}
    return FileCarrier(**{**options, **kwargs})


def _one_sync(source: SimServer, b: SimServer, target: OpenCTITarget) -> Sync:
    target.check()
    sync = Sync(source.store, b, target)
    sync.step()
    return sync


def test_an_object_the_target_refuses_for_its_size_goes_without_its_files(
    source: SimServer,
) -> None:
    """api transport: a push above the target's max_payload_body_size (413) is sent again
    without the file, which is counted as left out; the other object's file is carried."""
    before = _counts()
    _seed(source.store)
    source.store.attach_file(REPORT, "huge.pdf", os.urandom(120_000))
    source.store.attach_file(MALWARE, "small.txt", b"small", mime_type="text/plain")
    with SimServer(token=TOKEN_B) as b:
        b.max_body_bytes = 100_000
        target = target_for(b.url, token=TOKEN_B, files=_carrier(source))
        try:
            _one_sync(source, b, target)
        finally:
            target.close()
        assert target.rejected == []
        assert b.store.get(REPORT) is not None and _contents(b, REPORT) == {}
        assert _contents(b, MALWARE) == {"small.txt": b"small"}
        assert _since(before) == {"sent": 1, "gone": 0, "too_large": 1}


def test_a_message_the_broker_would_refuse_goes_without_its_files(
    source: SimServer,
    rabbitmq: RabbitNode,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """amqp transport: an event whose message would pass the broker's maximum size only with
    its files inline is published without them, not quarantined."""
    before = _counts()
    _seed(source.store)
    source.store.attach_file(REPORT, "big.pdf", os.urandom(60_000))
    with SimServer(token=TOKEN_B, amqp_url=rabbitmq.url) as b:
        target = target_for(
            b.url,
            token=TOKEN_B,
            transport="amqp",
            amqp_max_message_bytes=50_000,
            files=_carrier(source),
        )
        try:
            _one_sync(source, b, target)
            worker = platform_state(b.store).workers[target.connector_id]
            assert target.publisher is not None
            assert worker.wait_handled(target.publisher.published, timeout=60)
        finally:
            target.close()
        assert target.rejected == [] and not worker.failures
        assert b.store.get(REPORT) is not None and _contents(b, REPORT) == {}
        assert _since(before) == {"sent": 0, "gone": 0, "too_large": 1}
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
