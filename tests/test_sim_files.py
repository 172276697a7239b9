"""Attached files on the platform double: the stream names them, ``/storage/get/...`` serves
them over real HTTP, and a pushed object's inline ``data`` is uploaded as the platform's worker
does (through real pycti). No mocks: a SimServer on 127.0.0.1."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from connector.errors import PermanentError
from connector.events import OCTI_EXT
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from tests.support.compare import assert_same_state, state_diff
from tests.support.target import target_for
from tests.test_sim import AUTH, read_stream

TOKEN = "files-token-0123456789"
REPORT = "report--6d3c1f0e-8b1a-4f7e-9a52-1c2b3d4e5f60"
PDF = b"%PDF-1.7\n\x00\xffbinary body\n%%EOF"


def _assert_gone(sim: SimServer, uri: str) -> None:
    """The platform answers a file it does not have with a 503 saying so, not a 404."""
    answer = httpx.get(sim.url + uri, headers=AUTH)
    assert answer.status_code == 503 and "File not found or restricted" in answer.text


def _report(**extra: Any) -> dict[str, Any]:
    return {
        "type": "report",
        "spec_version": "2.1",
        "id": REPORT,
        "name": "Files report",
        "published": "2026-01-01T00:00:00.000Z",
        # Fixed: two stores stamp a missing one with their own clocks (a millisecond apart).
        "created": "2026-01-01T00:00:00.000Z",
        "modified": "2026-01-01T00:00:00.000Z",
        **extra,
    }


def _with_files(stix: dict[str, Any], *entries: dict[str, Any]) -> dict[str, Any]:
    return {**stix, "extensions": {OCTI_EXT: {"files": list(entries)}}}


def _internal_id(store: SimStore) -> str:
    obj = store.get(REPORT)
    assert obj is not None
    return str(obj["extensions"][OCTI_EXT]["id"])


@pytest.fixture
def sim() -> Iterator[SimServer]:
    with SimServer(heartbeat_secs=0.2) as server:
        yield server


@pytest.fixture
def platform() -> Iterator[SimServer]:
    with SimServer(token=TOKEN) as server:
        yield server


def test_an_attached_file_is_an_update_on_the_stream_and_served_with_the_token(
    sim: SimServer,
) -> None:
    created = sim.store.create(_report())
    event_id = sim.store.attach_file(REPORT, "analysis report.pdf", PDF)
    assert event_id is not None

    msgs = read_stream(f"{sim.url}/stream?from={created}")
    updates = [m for m in msgs if m[1] == "update"]
    assert [m[0] for m in updates] == [event_id]
    envelope = updates[0][2]
    (entry,) = envelope["data"]["extensions"][OCTI_EXT]["files"]
    iid = _internal_id(sim.store)
    # The platform's converter: `/storage/get/${file.id}`, the file id not URL-encoded.
    assert entry["uri"] == f"/storage/get/import/Report/{iid}/analysis report.pdf"
    assert entry["name"] == "analysis report.pdf" and entry["mime_type"] == "application/pdf"
    assert entry["version"] == envelope["data"]["modified"]
    assert "data" not in entry
    assert any("/files" in op["path"] for op in envelope["context"]["patch"])
    assert sim.store.files_of(REPORT) == [entry]

    # httpx percent-encodes the space; the platform's route decodes it.
    got = httpx.get(sim.url + entry["uri"], headers=AUTH)
    assert got.status_code == 200 and got.content == PDF
    assert got.headers["content-type"] == "application/pdf"
    assert int(got.headers["content-length"]) == len(PDF)
    # The platform's storage routes answer 403 without a valid token.
    assert httpx.get(sim.url + entry["uri"]).status_code == 403
    wrong = {"Authorization": "Bearer not-the-token"}
    assert httpx.get(sim.url + entry["uri"], headers=wrong).status_code == 403

    sim.store.forget_file_content(entry["uri"].removeprefix("/storage/get/"))
    _assert_gone(sim, entry["uri"])
    assert sim.store.files_of(REPORT) == [entry]  # the entry stays, only the bytes went
    unknown = f"/storage/get/import/Report/{iid}/never.pdf"
    _assert_gone(sim, unknown)


def test_a_reupload_is_a_new_version_and_a_removal_or_delete_drops_the_bytes(
    sim: SimServer,
) -> None:
    sim.store.create(_report())
    sim.store.attach_file(REPORT, "a.csv", b"one", mime_type="text/csv")
    sim.store.attach_file(REPORT, "a.csv", b"two", mime_type="text/csv")
    (entry,) = sim.store.files_of(REPORT)
    file_id = entry["uri"].removeprefix("/storage/get/")
    assert sim.store.file_content(file_id) == b"two"
    versions = [
        e["data"]["extensions"][OCTI_EXT]["files"][0]["version"]
        for e in (orjson.loads(f.split(b"\ndata: ", 1)[1]) for f in sim.store.read(0).frames)
        if e["type"] == "update"
    ]
    assert len(versions) == 2 and versions[0] < versions[1]  # even within one millisecond

    removed = sim.store.remove_file(REPORT, "a.csv")
    assert removed is not None and sim.store.remove_file(REPORT, "a.csv") is None
    assert sim.store.files_of(REPORT) == [] and sim.store.file_content(file_id) is None
    obj = sim.store.get(REPORT)
    assert obj is not None and "files" not in obj["extensions"][OCTI_EXT]

    sim.store.attach_file(REPORT, "b.pdf", PDF)
    (entry,) = sim.store.files_of(REPORT)
    sim.store.delete(REPORT)
    _assert_gone(sim, entry["uri"])
    assert sim.store.file_content(entry["uri"].removeprefix("/storage/get/")) is None


def test_a_file_is_served_only_to_a_user_holding_its_entitys_markings() -> None:
    """The platform loads a file with the user's rights: an entity marked beyond them gives
    the same 503 as a file it does not have."""
    green = "marking-definition--00000000-0000-4000-8000-0000000000a1"
    red = "marking-definition--00000000-0000-4000-8000-0000000000a2"
    with SimServer(restricted_token="r", restricted_markings=[green]) as sim:
        uris = {}
        for mark in (green, red):
            sim.store.create({"type": "marking-definition", "id": mark, "name": mark[-2:]})
            report = _report(id=f"report--00000000-0000-4000-8000-0000000000{mark[-2:]}")
            sim.store.create({**report, "object_marking_refs": [mark]})
            sim.store.attach_file(report["id"], "a.pdf", PDF)
            uris[mark] = sim.store.files_of(report["id"])[0]["uri"]
        restricted = {"Authorization": "Bearer r"}
        assert httpx.get(sim.url + uris[green], headers=restricted).content == PDF
        refused = httpx.get(sim.url + uris[red], headers=restricted)
        assert refused.status_code == 503 and "File not found or restricted" in refused.text
        assert httpx.get(sim.url + uris[red], headers=AUTH).content == PDF


def test_a_pushed_file_is_uploaded_under_the_targets_own_uri(platform: SimServer) -> None:
    target = target_for(platform.url, token=TOKEN)
    foreign_uri = "/storage/get/import/Report/source-internal-id/notes.pdf"
    version = "2026-02-03T04:05:06.789Z"
    pushed = {
        "name": "notes.pdf",
        "uri": foreign_uri,
        "version": version,
        "mime_type": "application/pdf",
        "data": base64.b64encode(PDF).decode(),
    }
    try:
        target.push_objects([_with_files(_report(), pushed)])
        iid = _internal_id(platform.store)
        expected = {
            "name": "notes.pdf",
            "uri": f"/storage/get/import/Report/{iid}/notes.pdf",
            "version": version,
            "mime_type": "application/pdf",
        }
        assert platform.store.files_of(REPORT) == [expected]
        got = httpx.get(
            platform.url + expected["uri"], headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert got.status_code == 200 and got.content == PDF
        # The bytes never travel in the stream.
        assert pushed["data"].encode() not in b"".join(platform.store.read(0).frames)

        # A later push naming the file without data (as a sync does) keeps it as it is.
        events = platform.store.event_count
        bare = {k: v for k, v in pushed.items() if k != "data"}
        target.push_objects([_with_files(_report(description="edited"), bare)])
        assert platform.store.event_count == events + 1
        assert platform.store.files_of(REPORT) == [expected]
        assert platform.store.file_content(expected["uri"].removeprefix("/storage/get/")) == PDF
        target.push_objects([_report(description="edited again")])
        assert platform.store.files_of(REPORT) == [expected]

        # Data under the same name replaces the file; another name adds one.
        second = {**pushed, "version": "2026-03-01T00:00:00.000Z", "data": "dHdv"}
        other = {"name": "iocs.txt", "mime_type": "text/plain", "data": "aW9j"}
        target.push_objects([_with_files(_report(description="edited again"), second, other)])
        files = {f["name"]: f for f in platform.store.files_of(REPORT)}
        assert files["notes.pdf"]["version"] == "2026-03-01T00:00:00.000Z"
        assert files["iocs.txt"]["mime_type"] == "text/plain"
        assert files["iocs.txt"]["version"]  # none given: the upload's time
        contents = {
            n: platform.store.file_content(f["uri"].removeprefix("/storage/get/"))
            for n, f in files.items()
        }
        assert contents == {"notes.pdf": b"two", "iocs.txt": b"ioc"}

        # Data the worker cannot decode refuses the object, and changes nothing.
        fine = {"name": "new.txt", "data": "bmV3"}
        broken = {**pushed, "data": "not base64!"}
        with pytest.raises(PermanentError, match="base64"):
            target.push_objects([_with_files(_report(name="broken"), fine, broken)])
        assert platform.store.files_of(REPORT) == list(files.values())
        assert platform.store.file_content(f"import/Report/{iid}/new.txt") is None
    finally:
        target.close()


def test_seeded_files_without_data_are_dropped_and_states_compare_by_version() -> None:
    a = SimStore()
    a.create(_report())
    a.attach_file(REPORT, "analysis.pdf", PDF)
    (entry,) = a.files_of(REPORT)

    # What a restore pushes: the archived bytes inline, the source's uri and version.
    b = SimStore()
    b.create(_report())
    b.delete(REPORT)  # the re-created report gets another internal id than on A
    b.load_bundle([_with_files(_report(), {**entry, "data": base64.b64encode(PDF).decode()})])
    (copied,) = b.files_of(REPORT)
    assert copied["uri"] == f"/storage/get/import/Report/{_internal_id(b)}/analysis.pdf"
    assert copied["uri"] != entry["uri"] and copied["version"] == entry["version"]
    assert "data" not in copied and "data" not in orjson.dumps(b.dump_bundle()).decode()
    assert_same_state(a.dump_bundle(), b.dump_bundle())

    # A file entry without its bytes is no upload: the copy lacks the file, and that shows.
    c = SimStore()
    c.load_bundle([_with_files(_report(), entry)])
    assert c.files_of(REPORT) == []
    assert state_diff(a.dump_bundle(), c.dump_bundle())
    b.attach_file(REPORT, "analysis.pdf", PDF)  # same bytes, a new version
    assert state_diff(a.dump_bundle(), b.dump_bundle())


def test_an_uploads_version_is_the_entitys_modified_whatever_the_clock_does() -> None:
    """The file's version and the entity's `modified` were two clock reads: a millisecond
    apart now and then (a flaky CI run). A clock that moves at every read shows it each time."""
    ticks = iter(range(1_800_000_000_000, 1_800_000_001_000))
    store = SimStore(clock=lambda: next(ticks))
    store.create(_report())
    assert store.attach_file(REPORT, "analysis report.pdf", PDF) is not None
    (obj,) = [o for o in store.objects() if o["id"] == REPORT]
    (entry,) = obj["extensions"][OCTI_EXT]["files"]
    assert entry["version"] == obj["modified"] == obj["extensions"][OCTI_EXT]["updated_at"]
