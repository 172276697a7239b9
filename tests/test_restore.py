"""Point-in-time restore: materialise from snapshot + segments, bundle, push into a platform.

Targets are real stores: a SimStore behind a small RestoreTarget adapter (upsert/delete exactly
as the platform's import applies them), and once the real OpenCTITarget over pycti into the
platform double (SimServer answering POST /graphql).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import sqlite3
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard

from connector import restore_cli
from connector.archive.segment import compress
from connector.errors import RetryableError
from connector.events import OCTI_EXT, RECONCILE_REFERER, EventId
from connector.restore import (
    TextProgress,
    materialise,
    materialise_plan,
    parse_until,
    restore_to_target,
    to_bundle,
)
from connector.restore_cli import verify_against_opencti
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.snapshot import SnapshotInfo, list_snapshots, write_snapshot
from connector.state import STATE_SCHEMA, StateStore, push_phase, stix_refs
from connector.storage.local import LocalStorage
from connector.target.opencti import OpenCTITarget
from tests.support.compare import comparable
from tests.test_state import (
    AP_GONE,
    AP_KEEP,
    CAMPAIGN,
    PARADISE,
    REL_CAMPAIGN,
    Mark,
    _entity,
    _event,
    archive_events,
    assert_equal_objects,
    new_sim,
    run_scenario,
    sim_events,
    state_objects,
)

TOKEN = "restore-token-0123456789"
_EXT_INTERNAL_REFS = ("source_ref", "target_ref", "sighting_of_ref", "where_sighted_refs")


# ---------------------------------------------------------------------- helpers
class SimTarget:
    """A SimStore as restore target; ``fail_after`` calls, it raises like a lost platform."""

    def __init__(self, store: SimStore, fail_after: int | None = None) -> None:
        self.store = store
        self.fail_after = fail_after
        self.calls = 0
        self.pushed: list[str] = []
        self.deleted: list[str] = []

    def _call(self) -> None:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RetryableError("target connection lost")
        self.calls += 1

    def push_objects(self, objects: list[dict[str, Any]]) -> None:
        self._call()
        for obj in objects:
            # "Perfect synchronisation" upserts (what OpenCTITarget(synchronized=True) asks
            # for): values replace the target's, so refs removed upstream go away.
            self.store.upsert(obj, synchronized=True)
        self.pushed.extend(str(o["id"]) for o in objects)

    def delete_ids(self, stix_ids: list[str]) -> None:
        self._call()
        for sid in stix_ids:
            self.store.delete(sid)
        self.deleted.extend(stix_ids)

    def known_ids(self, stix_ids: list[str]) -> set[str]:
        return {sid for sid in stix_ids if self.store.get(sid) is not None}

    def resolve_ids(self, stix_ids: list[str]) -> dict[str, str]:
        out = {}
        for sid in stix_ids:
            obj = self.store.get(sid)
            if obj is not None:
                out[sid] = str(obj["id"])
        return out


def normal(obj: dict[str, Any]) -> dict[str, Any]:
    """What a restore must carry: no platform-local ids or times, no empty values."""
    out = comparable(obj)
    out = {k: v for k, v in out.items() if v not in (None, "", [], {}) or k == "object_refs"}
    octi = dict((out.get("extensions") or {}).get(OCTI_EXT) or {})
    for key in _EXT_INTERNAL_REFS:
        octi.pop(key, None)
    if octi:
        out["extensions"] = {**out["extensions"], OCTI_EXT: octi}
    return out


def assert_restored(target: SimStore, expected: list[dict[str, Any]]) -> None:
    got = {str(o["id"]): normal(o) for o in target.dump_bundle()["objects"]}
    want = {str(o["id"]): normal(o) for o in expected}
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    for sid, obj in want.items():
        assert got[sid] == obj, sid


@pytest.fixture()
def archived(tmp_path: Path) -> tuple[LocalStorage, list[Mark]]:
    """The scenario archived, with a snapshot committed after its third step."""
    store = new_sim()
    marks = run_scenario(store)
    events, _ = sim_events(store)
    cut = next(i for i, ev in enumerate(events) if ev.id_text == marks[2][0]) + 1
    storage = LocalStorage(tmp_path / "archive")
    last = archive_events(storage, events[:cut], per_segment=9)
    assert write_snapshot(storage, work_dir=tmp_path / "snap") is not None
    archive_events(storage, events[cut:], per_segment=9, after=last)
    return storage, marks


def _iso(event_id: str) -> str:
    ms = EventId.parse(event_id).ms
    when = datetime.fromtimestamp(ms / 1000, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


# ---------------------------------------------------------------------- materialise
def test_materialise_latest_from_snapshot(
    archived: tuple[LocalStorage, list[Mark]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage, marks = archived
    caplog.set_level(logging.INFO, logger="connector.restore")
    state, plan = materialise_plan(storage, until=None, work_dir=tmp_path / "w")
    with state:
        assert_equal_objects(state_objects(state), marks[-1][1])
        assert plan.snapshot == EventId.parse(marks[2][0]).key  # seeded, not a full replay
        assert plan.as_of == EventId.parse(marks[-1][0])
        assert 0 < plan.segments and plan.objects == len(marks[-1][1])
    # The log's fields keep their JSON types: counts are numbers, the position is its text.
    (done,) = [r.__dict__ for r in caplog.records if r.getMessage() == "State materialised."]
    assert done["objects"] == plan.objects and done["segments"] == plan.segments
    assert done["as_of"] == marks[-1][0] and done["incomplete"] is False


def test_materialise_without_a_snapshot_logs_none_as_null(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = new_sim()
    marks = run_scenario(store)
    storage = LocalStorage(tmp_path / "archive")
    archive_events(storage, sim_events(store)[0], per_segment=9)
    caplog.set_level(logging.INFO, logger="connector.restore")
    state, plan = materialise_plan(storage, until=None, work_dir=tmp_path / "w")
    state.close()
    assert plan.snapshot is None and plan.objects == len(marks[-1][1])
    (done,) = [r.__dict__ for r in caplog.records if r.getMessage() == "State materialised."]
    assert done["snapshot"] is None and done["tombstones"] == plan.tombstones


@pytest.mark.parametrize("damage", ["bytes", "checksum", "manifest", "missing", "record"])
def test_damaged_snapshot_is_skipped_for_an_older_one(
    archived: tuple[LocalStorage, list[Mark]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    """The newest snapshot is damaged (a part's bytes, a part re-written, a torn manifest, a
    part gone, a record missing a field): the restore says so and uses the one before it (the
    segments alone, or the older snapshot), reaching the same state; the next snapshot is still
    written."""
    storage, marks = archived
    (first,) = list_snapshots(storage)
    if damage == "record":  # a newer snapshot, at the end: it has tombstones
        assert write_snapshot(storage, work_dir=tmp_path / "snap2") is not None
    info = list_snapshots(storage)[-1]
    part = next(
        p for p in info.parts if p.kind == ("tombstones" if damage == "record" else "objects")
    )
    if damage != "manifest":  # else a restore would open the snapshot's state image
        _damage_image(storage, info, "missing" if damage == "record" else damage)
    body = storage.get(part.key)
    lines = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read()
    if damage == "bytes":  # not even decompressible
        storage.put(part.key, body[:10] + bytes(len(body) - 10))
    elif damage == "checksum":  # valid zstd with other bytes: only the checksum tells
        storage.put(part.key, compress(lines, info.codec, 19))
    elif damage == "manifest":
        manifest = storage.get(info.manifest_key)
        storage.put(info.manifest_key, manifest[: len(manifest) // 2])
    elif damage == "missing":
        storage.delete(part.key)
    else:  # valid JSON, valid zstd, a field gone: found before the checksum is
        recs = [orjson.loads(x) for x in lines.splitlines()]
        for rec in recs:
            del rec["into"]
        storage.put(part.key, compress(b"".join(orjson.dumps(r) + b"\n" for r in recs), "zstd", 3))
    state, plan = materialise_plan(storage, until=None, work_dir=tmp_path / "w")
    with state:
        assert plan.snapshot == (first.key if damage == "record" else None)
        assert_equal_objects(state_objects(state), marks[-1][1])
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and info.key in str(errors[0].__dict__["error"])
    if damage != "record":
        assert write_snapshot(storage, work_dir=tmp_path / "next") is not None


def _damage_image(storage: LocalStorage, info: SnapshotInfo, damage: str) -> None:
    image = info.state_image
    assert image is not None
    body = storage.get(image.key)
    if damage == "bytes":  # not even decompressible
        storage.put(image.key, body[:10] + bytes(len(body) - 10))
    elif damage == "checksum":  # a whole database, other bytes: only the checksum tells
        db = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)).read()
        storage.put(image.key, compress(db, info.codec, 19))
    elif damage == "missing":
        storage.delete(image.key)
    else:
        raise AssertionError(damage)


# An image rewritten whole, its sha256 and size put in the manifest: only its contents tell.
_REWRITES = {
    "other state": "DELETE FROM objects WHERE rid = (SELECT max(rid) FROM objects)",
    # Code of its own, run by the fold after the snapshot: every object gone again.
    "a trigger": "CREATE TRIGGER t AFTER INSERT ON objects BEGIN DELETE FROM objects; END",
}


@pytest.mark.parametrize(
    "damage", ["bytes", "checksum", "missing", "other state", "a trigger", "other schema"]
)
def test_a_state_image_that_cannot_serve_leaves_the_snapshot_to_its_parts(
    archived: tuple[LocalStorage, list[Mark]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    damage: str,
) -> None:
    """A restore opens the snapshot's state image instead of loading its parts. One it cannot
    trust (damaged, gone, a whole database of another state, or holding a trigger, that the
    manifest was made to name) is said and passed over for the same snapshot's parts; one of
    another version's layout is not read at all. The same state either way, and no error."""
    storage, marks = archived
    (info,) = list_snapshots(storage)
    image = info.state_image
    assert image is not None
    manifest = orjson.loads(storage.get(info.manifest_key))
    if damage in _REWRITES:
        db = tmp_path / "other.sqlite"
        db.write_bytes(
            zstandard.ZstdDecompressor().stream_reader(io.BytesIO(storage.get(image.key))).read()
        )
        with sqlite3.connect(db) as conn:
            conn.execute(_REWRITES[damage])
        body = compress(db.read_bytes(), "zstd", 3)
        storage.put(image.key, body)
        (entry,) = [p for p in manifest["parts"] if p["kind"] == "state"]
        entry["sha256"], entry["size"] = hashlib.sha256(body).hexdigest(), len(body)
        storage.put(info.manifest_key, orjson.dumps(manifest))
    elif damage == "other schema":
        manifest["state_schema"] = STATE_SCHEMA + 1
        storage.put(info.manifest_key, orjson.dumps(manifest))
        storage.put(image.key, b"not read")
    else:
        _damage_image(storage, info, damage)
    caplog.set_level("WARNING")
    state, plan = materialise_plan(storage, until=None, work_dir=tmp_path / "w")
    with state:
        assert plan.snapshot == info.key  # the snapshot still served, through its parts
        assert_equal_objects(state_objects(state), marks[-1][1])
    said = [r for r in caplog.records if "state image" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    if damage == "other schema":
        assert said == []
    else:
        assert len(said) == 1 and image.key in str(said[0].__dict__["error"])


@pytest.mark.parametrize("step", [0, 1, 3, 4])
def test_materialise_earlier_points(
    archived: tuple[LocalStorage, list[Mark]], tmp_path: Path, step: int
) -> None:
    storage, marks = archived
    until, expected = marks[step]
    by_id, plan = materialise_plan(storage, until=parse_until(until), work_dir=tmp_path / "a")
    with by_id:
        assert_equal_objects(state_objects(by_id), expected)
        assert plan.as_of == EventId.parse(until)
        # Before the snapshot: replayed from the start; after it: seeded from it.
        assert (plan.snapshot is not None) == (step >= 2)
    with materialise(storage, until=parse_until(_iso(until)), work_dir=tmp_path / "b") as by_date:
        assert_equal_objects(state_objects(by_date), expected)


def test_parse_until() -> None:
    assert parse_until("1767225600000-3") == EventId(1767225600000, 3)
    assert parse_until("2026-01-01T00:00:00Z") == EventId(1767225600000, 10**10 - 1)
    assert parse_until("2026-01-01") == EventId(1767225600000, 10**10 - 1)
    with pytest.raises(Exception, match="until"):
        parse_until("yesterday")


def test_push_phases_follow_references() -> None:
    """Each kind is pushed after what it may reference (a relationship to a sighting too)."""
    ent, ind = "malware--1", "indicator--2"
    rel = {"type": "relationship", "source_ref": ind, "target_ref": ent}
    sighting = {"type": "sighting", "sighting_of_ref": ind, "where_sighted_refs": ["identity--3"]}
    on_sighting = {"type": "relationship", "source_ref": ind, "target_ref": "sighting--4"}
    on_rel = {"type": "relationship", "source_ref": ind, "target_ref": "relationship--5"}
    report = {"type": "report", "object_refs": ["relationship--5", "sighting--4"]}
    phases = [
        push_phase(o)
        for o in ({"type": "identity"}, {"type": "malware"}, rel, sighting, on_sighting, report)
    ]
    assert phases == sorted(phases) and len(set(phases)) == len(phases)
    assert push_phase(on_rel) == push_phase(on_sighting)


# ---------------------------------------------------------------------- bundle
def test_bundle_is_valid_and_dependency_ordered(
    archived: tuple[LocalStorage, list[Mark]], tmp_path: Path
) -> None:
    storage, marks = archived
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        out = io.BytesIO()
        count = to_bundle(state, out)
    bundle = orjson.loads(out.getvalue())
    assert bundle["type"] == "bundle" and bundle["id"].startswith("bundle--")
    objects = bundle["objects"]
    assert count == len(objects) == len(marks[-1][1])
    phases = [push_phase(o) for o in objects]
    assert phases == sorted(phases)
    assert objects[0]["type"] == "marking-definition"
    seen: set[str] = set()
    for obj in objects:
        if obj["type"] in ("sighting", "report", "note", "opinion", "observed-data"):
            refs = [obj.get("sighting_of_ref"), *(obj.get("object_refs") or [])]
            assert all(r in seen for r in refs if r), obj["id"]
        seen.add(obj["id"])


# ---------------------------------------------------------------------- push
def test_restore_into_empty_platform(
    archived: tuple[LocalStorage, list[Mark]], tmp_path: Path
) -> None:
    storage, marks = archived
    target = SimTarget(SimStore())
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        report = restore_to_target(state, target, apply_deletes=True, batch_size=8)
    assert_restored(target.store, marks[-1][1])
    assert report.pushed == len(marks[-1][1]) and report.batches > 1
    # An empty platform holds none of the tombstoned ids: none is sent, nothing was deleted.
    assert target.deleted == []
    assert report.deleted == 0 and report.deletes_by_type == {}


def test_restore_over_old_state_deletes_and_does_not_resurrect(
    archived: tuple[LocalStorage, list[Mark]], tmp_path: Path
) -> None:
    """Target holds the state before the merge and deletes: the restore must remove them."""
    storage, marks = archived
    target = SimTarget(SimStore())
    target.store.load_bundle(marks[0][1])
    assert target.store.get(PARADISE) is not None and target.store.get(AP_GONE) is not None
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        report = restore_to_target(state, target, apply_deletes=True, batch_size=10)
    assert_restored(target.store, marks[-1][1])
    assert target.store.get(PARADISE) is None and target.store.get(REL_CAMPAIGN) is None
    merged = target.store.get(AP_GONE)  # only as an alias of the merge target now
    assert merged is not None and merged["id"] == AP_KEEP
    assert target.store.get(CAMPAIGN) is not None  # re-created upstream: kept
    assert report.deletes_by_type.get("malware") == 1


def test_dry_run_writes_nothing(archived: tuple[LocalStorage, list[Mark]], tmp_path: Path) -> None:
    storage, marks = archived
    target = SimTarget(SimStore())
    target.store.load_bundle(marks[0][1])
    before = target.store.dump_bundle()
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        report = restore_to_target(
            state, target, apply_deletes=True, dry_run=True, resume_file=tmp_path / "p.json"
        )
    assert target.store.dump_bundle() == before and target.calls == 0
    assert not (tmp_path / "p.json").exists()
    assert report.pushed == report.deleted == 0
    assert sum(report.upserts_by_type.values()) == len(marks[-1][1])
    assert report.created_by_type == {"intrusion-set": 1}  # APT41 under its new id
    assert sum(report.updated_by_type.values()) == len(marks[-1][1]) - 1
    assert report.deletes_by_type["malware"] == 1 and report.deletes_by_type["attack-pattern"] == 1
    assert PARADISE in report.samples["delete"]


def test_interrupted_restore_resumes(
    archived: tuple[LocalStorage, list[Mark]], tmp_path: Path
) -> None:
    storage, marks = archived
    store = SimStore()
    progress_file = tmp_path / "restore-progress.json"
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        first = SimTarget(store, fail_after=3)
        with pytest.raises(RetryableError):
            restore_to_target(state, first, batch_size=5, resume_file=progress_file)
        saved = orjson.loads(progress_file.read_bytes())
        assert saved["batches"] == 3 and saved["pushed"] == len(first.pushed) > 0
        second = SimTarget(store)
        report = restore_to_target(state, second, batch_size=5, resume_file=progress_file)
    assert report.resumed_from is not None
    assert_restored(store, marks[-1][1])
    pushed = first.pushed + second.pushed
    assert sorted(pushed) == sorted(o["id"] for o in marks[-1][1])  # nothing pushed twice
    assert not progress_file.exists()  # finished: a new run starts from the beginning


def test_restore_progress_belongs_to_one_target(
    archived: tuple[LocalStorage, list[Mark]], tmp_path: Path
) -> None:
    """Progress made on platform A is not taken up by a restore into platform B."""
    storage, marks = archived
    progress_file = tmp_path / "restore-progress.json"
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        a = SimTarget(SimStore(), fail_after=3)
        with pytest.raises(RetryableError):
            restore_to_target(
                state, a, batch_size=5, resume_file=progress_file, target_name="https://a"
            )
        b = SimTarget(SimStore())
        report = restore_to_target(
            state, b, batch_size=5, resume_file=progress_file, target_name="https://b"
        )
    assert report.resumed_from is None
    assert_restored(b.store, marks[-1][1])


def test_restore_progress_made_without_deletes_is_not_resumed_with_them(
    archived: tuple[LocalStorage, list[Mark]], tmp_path: Path
) -> None:
    """Progress of a restore with --no-apply-deletes is not taken up by one with deletes: it
    stopped in a push phase, and the merged-away sources are deleted before any push (after,
    the merge target answers to their ids too)."""
    storage, marks = archived
    store = SimStore()
    store.load_bundle(marks[0][1])
    progress_file = tmp_path / "restore-progress.json"
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        first = SimTarget(store, fail_after=3)
        with pytest.raises(RetryableError):
            restore_to_target(
                state, first, apply_deletes=False, batch_size=5, resume_file=progress_file
            )
        assert orjson.loads(progress_file.read_bytes())["step"] > 0  # in a push phase
        second = SimTarget(store)
        report = restore_to_target(
            state, second, apply_deletes=True, batch_size=5, resume_file=progress_file
        )
    assert report.resumed_from is None
    assert_restored(store, marks[-1][1])
    merged = store.get(AP_GONE)  # only as an alias of the merge target
    assert merged is not None and merged["id"] == AP_KEEP


def test_restore_progress_belongs_to_one_archived_state(tmp_path: Path) -> None:
    """Progress made restoring one state is not taken up by a restore of another at the same
    position with as many tombstones (another archive, or this one pruned since)."""
    progress_file = tmp_path / "restore-progress.json"

    def archive(name: str, n: int) -> LocalStorage:
        storage = LocalStorage(tmp_path / name)
        sids = [f"malware--00000000-0000-4000-8000-00000000000{n + i}" for i in (1, 2)]
        events = [_event(i, "create", _entity(sid, f"{name}{i}")) for i, sid in enumerate(sids)]
        archive_events(storage, events)
        return storage

    with materialise(archive("a", 0), until=None, work_dir=tmp_path / "wa") as state:
        with pytest.raises(RetryableError):
            target = SimTarget(SimStore(), fail_after=1)
            restore_to_target(state, target, batch_size=1, resume_file=progress_file)
    assert progress_file.exists()
    with materialise(archive("b", 2), until=None, work_dir=tmp_path / "wb") as state:
        report = restore_to_target(
            state, SimTarget(SimStore()), batch_size=1, resume_file=progress_file
        )
    assert report.resumed_from is None and report.pushed == 2


def test_restore_point_in_time_through_pycti(
    archived: tuple[LocalStorage, list[Mark]], tmp_path: Path
) -> None:
    """The real OpenCTI target sink (pycti over HTTP) into the platform double."""
    storage, marks = archived
    store = SimStore()
    store.api_token = TOKEN  # type: ignore[attr-defined]
    with SimServer(token=TOKEN, store=store) as server:
        target = OpenCTITarget(
            url=server.url,
            token=TOKEN,
            connector_id=str(uuid.uuid4()),
            source_url="http://source.example:4000",
        )
        try:
            until = parse_until(marks[3][0])
            with materialise(storage, until=until, work_dir=tmp_path / "w") as state:
                lines = io.StringIO()
                bar = TextProgress(stream=lines, tty=True)
                restore_to_target(state, target, batch_size=20, progress=bar)
        finally:
            target.close()
        assert_restored(store, marks[3][1])
        assert "100.0%" in lines.getvalue() and "ETA" in lines.getvalue()


def _pycti_target(url: str) -> OpenCTITarget:
    return OpenCTITarget(
        url=url, token=TOKEN, connector_id=str(uuid.uuid4()), source_url="http://src.example:4000"
    )


def _restore_into_a_strict_platform(state: StateStore) -> SimStore:
    """``state`` restored through pycti, 3 objects a batch, into an empty platform double that
    refuses an object referencing one it does not hold (as the platform does); that platform."""
    platform = SimStore()
    platform.api_token = TOKEN  # type: ignore[attr-defined]
    platform.platform_refuses_missing_references = True  # type: ignore[attr-defined]
    with SimServer(token=TOKEN, store=platform) as server:
        target = _pycti_target(server.url)
        try:
            restore_to_target(state, target, batch_size=3)
        finally:
            target.close()
    return platform


def test_restore_over_old_state_through_pycti(
    archived: tuple[LocalStorage, list[Mark]], tmp_path: Path
) -> None:
    """The real target resolves ids: a merged-away source it still holds is deleted (and not the
    merge target), a dry run tells creates from updates and counts only deletes it would do."""
    storage, marks = archived
    store = SimStore()
    store.api_token = TOKEN  # type: ignore[attr-defined]
    store.load_bundle(marks[0][1])  # the state before the merge and the deletes
    with SimServer(token=TOKEN, store=store) as server:
        target = _pycti_target(server.url)
        try:
            with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
                dry = restore_to_target(state, target, dry_run=True)
                report = restore_to_target(state, target, batch_size=10)
        finally:
            target.close()
    assert dry.created_by_type == {"intrusion-set": 1}  # APT41 under its new id
    assert sum(dry.updated_by_type.values()) == len(marks[-1][1]) - 1
    assert dry.deletes_by_type["malware"] == 1 and dry.deletes_by_type["attack-pattern"] == 1
    double = SimTarget(SimStore())
    double.store.load_bundle(marks[0][1])
    with materialise(storage, until=None, work_dir=tmp_path / "w2") as state:
        assert restore_to_target(state, double, dry_run=True) == dry
    assert report.unchecked_merged == 0
    # Counted as the platform held them when asked: a relationship its deleted endpoint took
    # with it is not counted again (the dry run, asked before any delete, counts it).
    assert report.deleted == sum(report.deletes_by_type.values())
    assert report.deletes_by_type["malware"] == 1 and report.deletes_by_type["attack-pattern"] == 1
    assert report.deleted < sum(dry.deletes_by_type.values())
    # Ids only: the API push merges lists, so a ref removed since stays (docs/OPENCTI-TARGET.md).
    assert {o["id"] for o in store.dump_bundle()["objects"]} == {o["id"] for o in marks[-1][1]}
    merged = store.get(AP_GONE)  # only as an alias of the merge target now
    assert merged is not None and merged["id"] == AP_KEEP


def test_state_store_is_reusable_after_restore(tmp_path: Path) -> None:
    """A state file can be reopened: materialise is not needed again to push it elsewhere."""
    path = tmp_path / "s.sqlite"
    with StateStore(path) as state:
        assert state.counts() == {"objects": 0, "tombstones": 0}
        out = io.BytesIO()
        assert to_bundle(state, out) == 0
        assert orjson.loads(out.getvalue())["objects"] == []


def test_text_progress_logs_periodically_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    bar = TextProgress("restore", tty=False, interval=10.0, clock=lambda: now[0])
    with caplog.at_level("INFO", logger="connector.restore"):
        for done in range(0, 101, 10):
            bar.update(done, 100)
            now[0] += 4.0  # 2.5 objects/s
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5  # t=0, 12, 24, 36 and the final line, not one per update
    assert lines[1] == "restore  30.0% 30/100 2.5/s ETA 0:00:28"
    assert lines[-1].startswith("restore 100.0% 100/100")


@contextlib.contextmanager
def _restored_platform(storage: LocalStorage, tmp_path: Path) -> Iterator[tuple[SimStore, Any]]:
    """A platform double the archive was restored into, found equal by verify: its store and
    verify's arguments against it."""
    store = SimStore()
    store.api_token = TOKEN  # type: ignore[attr-defined]
    with SimServer(token=TOKEN, store=store) as server:
        target = OpenCTITarget(url=server.url, token=TOKEN, connector_id=str(uuid.uuid4()))
        try:
            with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
                restore_to_target(state, target, batch_size=50)
        finally:
            target.close()
        check = {"url": server.url, "token": TOKEN, "until": None, "work_dir": tmp_path / "v"}
        assert verify_against_opencti(storage, **check)
        yield store, check


def test_verify_against_opencti_compares_marking_definitions(
    archived: tuple[LocalStorage, list[Mark]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Markings are not in the platform's core-object listing: they are read by id."""
    storage, marks = archived
    markings = [o["id"] for o in marks[-1][1] if o["type"] == "marking-definition"]
    assert markings
    with _restored_platform(storage, tmp_path) as (store, check):
        assert "marking definitions" in capsys.readouterr().out
        store.delete(markings[0])  # gone from the platform, still live in the archive
        assert not verify_against_opencti(storage, **check)
    out = capsys.readouterr().out
    missing = next(line for line in out.splitlines() if line.strip().startswith("missing"))
    assert markings[0] in missing and " 1 " in missing


def test_verify_against_opencti_reads_every_page_and_finds_older_versions(
    archived: tuple[LocalStorage, list[Mark]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The platform is listed a page at a time, every page read (pages of 2 here); an object it
    holds in a version older than the archive's is stale, a difference."""
    monkeypatch.setattr(restore_cli, "_PAGE", 2)
    storage, _ = archived
    with _restored_platform(storage, tmp_path) as (store, check):
        capsys.readouterr()
        old = next(o for o in store.objects() if o["type"] == "malware")
        old["extensions"][OCTI_EXT]["updated_at"] = "2001-01-01T00:00:00.000Z"
        assert not verify_against_opencti(storage, **check)
    out = capsys.readouterr().out
    stale = next(line for line in out.splitlines() if line.strip().startswith("stale"))
    assert old["id"] in stale and " 1 " in stale


def test_a_manifest_whose_last_id_is_damaged_is_never_restored_from(tmp_path: Path) -> None:
    """One flipped digit in the first manifest's last_event_id (still a valid id, still valid
    JSON; the segment's own bytes intact, its sha256 matching): the fold took the manifest's
    end for the state's position and skipped every later segment as done, and the restore
    said it succeeded, two thirds of the archive missing."""
    from connector.archive import ArchiveSink
    from connector.archive.layout import manifest_key
    from connector.errors import PermanentError
    from connector.sim.generator import generate
    from connector.sink import Batch
    from tests.support.simlog import sim_events

    source = SimStore()
    generate(source, 30, seed=7, mix="creates")
    events, _ = sim_events(source)
    storage = LocalStorage(tmp_path / "a")
    sink, after = ArchiveSink(storage), None
    for part in (events[:10], events[10:20], events[20:]):
        sink.write(Batch(first_id=part[0].id, last_id=part[-1].id, events=part, after_id=after))
        after = part[-1].id
    key = manifest_key(events[0].id)
    body = storage.get(key)
    damaged = body.replace(b'"last_event_id":"1', b'"last_event_id":"3', 1)
    assert damaged != body and len(damaged) == len(body)
    storage.delete(key)
    storage.put_if_absent(key, damaged)
    with pytest.raises(PermanentError, match="is damaged"):
        materialise(storage, until=None, work_dir=tmp_path / "w").close()


class _RefusesMissingEndpoints(SimTarget):
    """A platform that refuses an object referencing one it does not hold yet (its
    MISSING_REFERENCE_ERROR)."""

    def push_objects(self, objects: list[dict[str, Any]]) -> None:
        for obj in objects:
            assert self.store.references_known(obj), f"{obj['id']} pushed before its references"
            super().push_objects([obj])


def test_relationships_of_containers_and_notes_are_pushed_after_them(tmp_path: Path) -> None:
    """A relationship was pushed in the relationships' phase, before the containers and notes:
    one whose endpoint is a report, a case or a note was refused by an empty platform (its
    endpoint missing), and missing after the restore. ``--to-bundle`` wrote the same order."""
    from tests.support.target import malware

    src = new_sim()
    m = malware("Emotet")
    src.create(m)
    report = {
        "type": "report",
        "id": "report--5b0e1f7a-6c2d-4e8f-9a1b-2c3d4e5f6a7b",
        "name": "Q3 campaign",
        "published": "2026-01-01T00:00:00.000Z",
        "object_refs": [m["id"]],
    }
    note = {
        "type": "note",
        "id": "note--6c1f2a8b-7d3e-4f90-8a2b-3d4e5f6a7b8c",
        "content": "seen twice",
        "object_refs": [m["id"]],
    }
    src.create(report)
    src.create(note)
    rels = []
    for n, end in enumerate((report["id"], note["id"])):
        rels.append(f"relationship--7d2a3c1e-0c55-4a4e-9e0f-1a2b3c4d5e{n:02d}")
        src.create(
            {
                "type": "relationship",
                "id": rels[-1],
                "relationship_type": "related-to",
                "source_ref": end,
                "target_ref": m["id"],
            }
        )
    events, _ = sim_events(src)
    storage = LocalStorage(tmp_path / "archive")
    archive_events(storage, events, per_segment=4)
    target = _RefusesMissingEndpoints(SimStore())
    out = io.BytesIO()
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        restore_to_target(state, target, batch_size=10)
        to_bundle(state, out)
    assert all(target.store.get(r) is not None for r in rels)
    assert [o["id"] for o in orjson.loads(out.getvalue())["objects"]] == target.pushed


def test_a_restore_over_old_state_keeps_a_merge_target_created_again(tmp_path: Path) -> None:
    """S merged into T, T deleted, T created again (same standard id): the platform before the
    delete still finds T under S's id. The restore pushed T (updating that old T), then deleted
    S's id, which the platform resolved to T: T and its relationship, live in the archive's
    latest state, were deleted."""
    from tests.support.target import malware

    src = new_sim()
    t, s, other = malware("Tee"), malware("Ess"), malware("Other")
    for obj in (t, s, other):
        src.create(obj)
    rel = {
        "type": "relationship",
        "id": "relationship--7d2a3c1e-0c55-4a4e-9e0f-1a2b3c4d5e6f",
        "relationship_type": "related-to",
        "source_ref": t["id"],
        "target_ref": other["id"],
    }
    src.create(rel)
    src.merge(t["id"], [s["id"]])
    before = [o for o in src.dump_bundle()["objects"]]
    src.delete(t["id"])
    src.create(t)  # a new life under the same standard id
    src.create(rel)
    events, _ = sim_events(src)
    storage = LocalStorage(tmp_path / "archive")
    archive_events(storage, events, per_segment=4)
    platform = SimStore()
    platform.api_token = TOKEN  # type: ignore[attr-defined]
    platform.load_bundle(before)
    assert (platform.get(s["id"]) or {}).get("id") == t["id"]  # T answers to S's id there
    with SimServer(token=TOKEN, store=platform) as server:
        target = _pycti_target(server.url)
        try:
            with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
                report = restore_to_target(state, target, batch_size=10)
        finally:
            target.close()
    assert platform.get(t["id"]) is not None, "the live T was deleted by the restore"
    assert platform.get(rel["id"]) is not None
    assert report.skipped_deletes >= 1


def test_a_restore_keeps_an_object_sent_ahead_under_a_deleted_objects_id(
    tmp_path: Path,
) -> None:
    """A repair's recovery sent B under the standard id A still had here; the reconciliation
    then archived A's delete. The restore pushed B, then deleted that id (A's tombstone, no
    live object answering to it): B was gone from the restored platform."""
    sid = "malware--00000000-0000-4000-8000-000000000001"
    b = _entity(sid, "iid-b", description="B")
    events = [
        _event(1, "create", _entity(sid, "iid-a")),
        _event(2, "create", b, referer="init-create"),
        _event(3, "delete", _entity(sid, "iid-a"), referer=RECONCILE_REFERER),
    ]
    storage = LocalStorage(tmp_path / "archive")
    archive_events(storage, events)
    target = SimTarget(SimStore())
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        report = restore_to_target(state, target, batch_size=10)
    assert (target.store.get(sid) or {}).get("description") == "B"
    assert target.deleted == [] and report.skipped_deletes == 1


def test_restore_progress_from_another_versions_steps_starts_over(
    archived: tuple[LocalStorage, list[Mark]], tmp_path: Path
) -> None:
    """A progress file names its step by index and name: written by a version whose steps
    differ (a push phase added), its index means another step, and is not resumed from."""
    storage, marks = archived
    store = SimStore()
    progress_file = tmp_path / "restore-progress.json"
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        with pytest.raises(RetryableError):
            restore_to_target(
                state, SimTarget(store, fail_after=3), batch_size=5, resume_file=progress_file
            )
        saved = orjson.loads(progress_file.read_bytes())
        progress_file.write_bytes(orjson.dumps({**saved, "step_name": "a-step-of-old"}))
        again = SimTarget(store)
        report = restore_to_target(state, again, batch_size=5, resume_file=progress_file)
    assert report.resumed_from is None
    assert sorted(again.pushed) == sorted(o["id"] for o in marks[-1][1])  # all pushed again


def _relationship(n: int, source: str, target: str) -> dict[str, Any]:
    return {
        "type": "relationship",
        "id": f"relationship--3e8b1c2d-4f5a-4b6c-8d7e-9f0a1b2c3d{n:02d}",
        "relationship_type": "related-to",
        "source_ref": source,
        "target_ref": target,
    }


def _chains(tmp_path: Path, ends: str = "both") -> tuple[LocalStorage, SimStore, list[str]]:
    """An archive of chains of three relationships of relationships, from a relationship to a
    report and to a note (``ends`` "containers"), to two malware ("entities"), or all four;
    the source platform; the relationships' ids."""
    from tests.support.target import malware

    src = new_sim()
    ms = [malware(f"Chain {n}") for n in range(6)]
    for m in ms:
        src.create(m)
    report = {
        "type": "report",
        "id": "report--8a1b2c3d-4e5f-4a6b-9c7d-8e9f0a1b2c3d",
        "name": "Q4 campaign",
        "published": "2026-01-01T00:00:00.000Z",
        "object_refs": [ms[0]["id"]],
    }
    note = {
        "type": "note",
        "id": "note--9b2c3d4e-5f6a-4b7c-8d9e-0f1a2b3c4d5e",
        "content": "seen thrice",
        "object_refs": [ms[0]["id"]],
    }
    src.create(report)
    src.create(note)
    rels: list[str] = []
    firsts = {"containers": (report, note), "entities": (ms[1], ms[2])}
    for end in [o["id"] for kind, pair in firsts.items() if ends in (kind, "both") for o in pair]:
        first = _relationship(len(rels), ms[0]["id"], end)
        src.create(first)
        rels.append(first["id"])
        for depth in range(3):
            rel = _relationship(len(rels), ms[3 + depth]["id"], rels[-1])
            src.create(rel)
            rels.append(rel["id"])
    events, _ = sim_events(src)
    storage = LocalStorage(tmp_path / "archive")
    archive_events(storage, events, per_segment=7)
    return storage, src, rels


@pytest.mark.parametrize("ends", ["containers", "entities"])
def test_relationships_of_relationships_are_pushed_after_their_endpoints(
    tmp_path: Path, ends: str
) -> None:
    """A relationship whose endpoint is a relationship was pushed in its own phase (6), before
    that endpoint when the endpoint's other end is a container or a note (pushed last, phase
    9): the platform refused it (MISSING_REFERENCE_ERROR) and the restore stopped there
    (``ObjectRefused``, at the same batch on every restart). Within a phase, relationships were
    pushed by key: one of a chain (a relationship of a relationship of a relationship) went
    before the one it names. ``--to-bundle`` wrote the same order."""
    storage, src, rels = _chains(tmp_path, ends)
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        out = io.BytesIO()
        to_bundle(state, out)
        seen: set[str] = set()
        for obj in orjson.loads(out.getvalue())["objects"]:
            for ref in (obj.get("source_ref"), obj.get("target_ref")):
                assert ref is None or ref in seen, f"{obj['id']} written before {ref}"
            seen.add(obj["id"])
        platform = _restore_into_a_strict_platform(state)
    assert [r for r in rels if platform.get(r) is None] == []
    assert_restored(platform, src.dump_bundle()["objects"])


def _resumes_after_every_batch(storage: LocalStorage, tmp_path: Path, *, batch_size: int) -> None:
    """A restore into a platform refusing missing references, stopped after each batch in turn
    and resumed from its progress file: it ends with what an uninterrupted one pushed."""
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        whole = _RefusesMissingEndpoints(SimStore())
        restore_to_target(state, whole, batch_size=batch_size)
        for fail_after in range(1, whole.calls):
            progress_file = tmp_path / f"progress-{fail_after}.json"
            target = _RefusesMissingEndpoints(SimStore(), fail_after=fail_after)
            with pytest.raises(RetryableError):
                restore_to_target(state, target, batch_size=batch_size, resume_file=progress_file)
            target.fail_after = None
            report = restore_to_target(
                state, target, batch_size=batch_size, resume_file=progress_file
            )
            assert report.resumed_from is not None
            assert sorted(set(target.pushed)) == sorted(whole.pushed), fail_after
            # Pushed twice: at most the batch the stop cut (this platform takes it an object
            # at a time), never what an acknowledged one held.
            twice = Counter(target.pushed) - Counter(whole.pushed)
            assert sum(twice.values()) <= batch_size, (fail_after, twice)


def test_an_interrupted_restore_resumes_within_chains_of_relationships(tmp_path: Path) -> None:
    """The position of a push phase is its rank and key: a restore stopped anywhere among the
    chains' links resumes with none skipped and none pushed before its endpoint."""
    storage, src, rels = _chains(tmp_path)
    _resumes_after_every_batch(storage, tmp_path, batch_size=2)


def _sid(kind: str, name: str) -> str:
    return f"{kind}--{uuid.uuid5(uuid.NAMESPACE_DNS, name)}"


def _container(kind: str, name: str, refs: list[str]) -> dict[str, Any]:
    obj: dict[str, Any] = {"type": kind, "id": _sid(kind, name), "object_refs": refs}
    if kind in ("note", "opinion"):
        obj["content" if kind == "note" else "opinion"] = (
            name if kind == "note" else "strongly-agree"
        )
    else:
        obj["name"] = name
    if kind == "report":
        obj["published"] = "2026-01-01T00:00:00.000Z"
    return obj


def _sighting(name: str, of: str, where: list[str]) -> dict[str, Any]:
    return {
        "type": "sighting",
        "id": _sid("sighting", name),
        "sighting_of_ref": of,
        "where_sighted_refs": where,
        "count": 1,
    }


def _referencing(kind: str, m: str, ident: str) -> list[dict[str, Any]]:
    """Objects, in an order the source can create them, each referencing one of the same or a
    later push phase (``kind`` picks which), with the malware ``m`` and identity ``ident``
    at the bottom; ids drawn so that key order puts referencing ones first somewhere."""
    out: list[dict[str, Any]] = []

    def add(obj: dict[str, Any]) -> str:
        out.append(obj)
        return str(obj["id"])

    if kind in ("containers", "mixed"):
        # Chains of containers in containers, both ways round in key order.
        for n in range(3):
            r1 = add(_container("report", f"inner {n}", [m]))
            r2 = add(_container("report", f"outer {n}", [r1, m]))
            g = add(_container("grouping", f"group {n}", [r2]))
            add(_container("case-incident", f"case {n}", [g, r1]))
    if kind in ("relationships", "mixed"):
        # A container holding a relationship to a note (phase 9), and one of that relationship.
        for n in range(3):
            note = add(_container("note", f"about {n}", [m]))
            rel = add(_relationship(40 + 2 * n, m, note))
            rel2 = add(_relationship(41 + 2 * n, m, rel))
            add(_container("report", f"holds {n}", [rel, rel2]))
            add(_container("grouping", f"holds {n}", [rel]))
    if kind in ("sightings", "mixed"):
        # Sightings of a container or a note, or seen where a container stands.
        for n in range(3):
            r = add(_container("report", f"sighted {n}", [m]))
            note = add(_container("note", f"sighted {n}", [m]))
            add(_sighting(f"of report {n}", r, [ident]))
            add(_sighting(f"of note {n}", note, [ident]))
            add(_sighting(f"where report {n}", m, [ident, r]))
    if kind in ("notes", "mixed"):
        # Notes and opinions on notes and opinions, chains of three.
        for n in range(3):
            n1 = add(_container("note", f"first {n}", [m]))
            o1 = add(_container("opinion", f"on first {n}", [n1]))
            n2 = add(_container("note", f"on opinion {n}", [o1, n1]))
            add(_container("opinion", f"on note {n}", [n2]))
    if kind == "mixed":
        # Relationships of sightings of reports, held by reports noted by notes.
        for n in range(3):
            r = add(_container("report", f"mixed {n}", [m]))
            s = add(_sighting(f"mixed {n}", r, [ident]))
            rel = add(_relationship(60 + 2 * n, m, s))
            r2 = add(_container("report", f"mixed holds {n}", [rel, s]))
            note = add(_container("note", f"mixed on {n}", [r2]))
            add(_relationship(61 + 2 * n, m, note))
    return out


def _referencing_archive(
    tmp_path: Path, kind: str
) -> tuple[LocalStorage, SimStore, list[dict[str, Any]]]:
    from tests.support.target import malware

    src = new_sim()
    m = malware("Referenced")
    ident = {
        "type": "identity",
        "id": _sid("identity", "Seer"),
        "name": "Seer",
        "identity_class": "organization",
    }
    src.create(m)
    src.create(ident)
    objs = _referencing(kind, str(m["id"]), str(ident["id"]))
    for obj in objs:
        src.create(obj)
    events, _ = sim_events(src)
    storage = LocalStorage(tmp_path / "archive")
    archive_events(storage, events, per_segment=7)
    return storage, src, objs


def _assert_referenced_first(objects: list[dict[str, Any]]) -> None:
    ids = {str(o["id"]) for o in objects}
    seen: set[str] = set()
    for obj in objects:
        for ref in stix_refs(obj):
            assert ref not in ids or ref in seen, f"{obj['id']} written before {ref}"
        seen.add(str(obj["id"]))


@pytest.mark.parametrize("kind", ["containers", "relationships", "sightings", "notes", "mixed"])
def test_objects_are_pushed_after_what_they_reference(tmp_path: Path, kind: str) -> None:
    """An object referencing one of the same or a later push phase was pushed first when its
    phase was earlier (a container holding a relationship to a note; a sighting of a report or
    a note) or, in the same phase, by key (a report in a report, a grouping or a case; a note
    or opinion on a note or opinion): the platform refused it (MISSING_REFERENCE_ERROR) and the
    restore stopped there on every restart; ``--to-bundle`` wrote the same order."""
    storage, src, objs = _referencing_archive(tmp_path, kind)
    with materialise(storage, until=None, work_dir=tmp_path / "w") as state:
        out = io.BytesIO()
        to_bundle(state, out)
        _assert_referenced_first(orjson.loads(out.getvalue())["objects"])
        platform = _restore_into_a_strict_platform(state)
    assert [o["id"] for o in objs if platform.get(str(o["id"])) is None] == []
    assert_restored(platform, src.dump_bundle()["objects"])


def test_an_interrupted_restore_resumes_within_chains_of_references(tmp_path: Path) -> None:
    """A restore stopped anywhere among chains of containers, notes, sightings and
    relationships referencing each other resumes with none skipped and none pushed before what
    it references."""
    storage, _, _ = _referencing_archive(tmp_path, "mixed")
    _resumes_after_every_batch(storage, tmp_path, batch_size=4)


def test_objects_referencing_each_other_in_a_cycle_are_pushed_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two notes naming each other (which the platform cannot hold both ways): their ranking
    stops after its round cap with a warning, and each is still pushed once."""
    from connector.events import StreamEvent

    a, b = _container("note", "cycle a", []), _container("note", "cycle b", [])
    a["object_refs"], b["object_refs"] = [b["id"]], [a["id"]]
    events = [
        StreamEvent.from_sse(f"{n}-0", "create", orjson.dumps({"data": obj, "version": "4"}))
        for n, obj in enumerate((a, b), start=1)
    ]
    state = StateStore(tmp_path / "state.sqlite")
    try:
        state.apply_many(events)
        phase = push_phase(a)
        pushed = [rec.stix_id for _, rec in state.push_records(phase)]
    finally:
        state.close()
    assert sorted(pushed) == sorted([a["id"], b["id"]])
    assert "cycle" in caplog.text
