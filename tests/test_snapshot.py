"""Compacted snapshots: incremental, idempotent, streamed in bounded parts, equal to a replay."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pytest

from connector.archive import ArchiveReader
from connector.archive.segment import compress
from connector.errors import MalformedEvent, PermanentError, RetryableError
from connector.events import OCTI_EXT, EventId, StreamEvent
from connector.sim import sample_bundle
from connector.snapshot import (
    fold_segments,
    iter_snapshot_object_lines,
    iter_snapshot_objects,
    iter_snapshot_tombstones,
    list_snapshots,
    open_state_image,
    read_snapshot_manifest,
    seed_state,
    state_sha256,
    write_snapshot,
)
from connector.state import SNAPSHOT_ROWS, STATE_SCHEMA, StateStore, push_phase, stix_refs
from connector.storage.local import LocalStorage
from tests.support.statedb import state_tables
from tests.test_state import (
    CLOCK0,
    SAMPLE,
    SPELEVO,
    _entity,
    _event,
    archive_events,
    assert_equal_objects,
    new_sim,
    replay,
    run_scenario,
    sim_events,
    sim_objects,
    state_objects,
)


def _split_archive(root: Path) -> tuple[LocalStorage, list[str], list, int]:
    """Scenario events; only those up to the third step are archived yet."""
    store = new_sim()
    marks = run_scenario(store)
    events, _ = sim_events(store)
    cut = next(i for i, ev in enumerate(events) if ev.id_text == marks[2][0]) + 1
    storage = LocalStorage(root)
    archive_events(storage, events[:cut], per_segment=9)
    return storage, [m[0] for m in marks], events, cut


def _keys(storage: LocalStorage) -> list[str]:
    return list(storage.list(""))


@pytest.mark.parametrize("unfiltered", [None, 0, 10**9], ids=["as-loaded", "filter", "sql"])
def test_incremental_snapshot_equals_full_replay(tmp_path: Path, unfiltered: int | None) -> None:
    """``unfiltered``: how many ids the fold after the snapshot may look up in SQLite before
    it fills its Bloom filter (None: what the load sets; 0: the filter at once; all of them)."""
    storage, marks, events, cut = _split_archive(tmp_path / "archive")
    first = write_snapshot(storage, work_dir=tmp_path / "work", part_objects=7)
    assert first is not None and first.as_of == EventId.parse(marks[2])
    assert first.based_on is None and len([p for p in first.parts if p.kind == "objects"]) > 1
    archive_events(storage, events[cut:], per_segment=9, after=first.as_of)
    second = write_snapshot(storage, work_dir=tmp_path / "work", part_objects=7)
    assert second is not None and second.based_on == str(first.as_of)
    assert second.as_of == EventId.parse(marks[-1])
    assert [s.as_of for s in list_snapshots(storage)] == [first.as_of, second.as_of]

    with replay(storage, tmp_path / "full.sqlite") as full:
        # The second snapshot, read back, is the full replay.
        with StateStore(tmp_path / "seeded.sqlite") as seeded:
            seeded.load_snapshot(storage, second.key)
            assert_equal_objects(state_objects(seeded), state_objects(full))
            assert list(seeded.tombstones()) == list(full.tombstones())
            assert seeded.as_of == full.as_of
            assert state_sha256(seeded) == state_sha256(full) == second.state_sha256
            assert second.object_count == full.counts()["objects"]
            assert second.tombstone_count == full.counts()["tombstones"] > 0
        # The first snapshot plus the segments after it is the full replay too.
        with StateStore(tmp_path / "folded.sqlite") as folded:
            folded.load_snapshot(storage, first.key)
            if unfiltered is not None:
                folded._unfiltered_budget = unfiltered
            segments, applied, last = fold_segments(
                folded, ArchiveReader(storage), start_after=first.last_segment_manifest
            )
            assert segments > 0 and applied == len(events) - cut
            assert last == second.last_segment_manifest
            assert_equal_objects(state_objects(folded), state_objects(full))
            assert list(folded.tombstones()) == list(full.tombstones())


@pytest.mark.parametrize("unfiltered", [None, 0], ids=["as-loaded", "filter"])
def test_a_stale_resend_after_a_snapshot_does_not_replace_the_newer_version(
    tmp_path: Path, unfiltered: int | None
) -> None:
    """Events folded after a snapshot load resolve against the snapshot's objects, whether the
    fold asks SQLite about each id (a few events: what the load sets) or fills its Bloom
    filter first: an older version re-sent does not replace the snapshot's newer one."""
    store = new_sim()
    store.load_bundle(sample_bundle(SAMPLE))
    first, pos = sim_events(store)
    store.update(SPELEVO, set={"description": "v2"})
    later, _ = sim_events(store, pos)
    storage = LocalStorage(tmp_path / "archive")
    archive_events(storage, first + later)
    info = write_snapshot(storage, work_dir=tmp_path / "work")
    assert info is not None
    stale = next(ev for ev in first if ev.stix_id == SPELEVO)
    resend = StreamEvent.from_sse(f"{later[-1].id.ms + 1}-0", "create", stale.raw)
    with StateStore(tmp_path / "s.sqlite", scratch=True) as state:
        state.load_snapshot(storage, info.key)
        if unfiltered is not None:
            state._unfiltered_budget = unfiltered
        state.apply_many([resend])
        obj = state.get(SPELEVO)
        assert obj is not None and obj["description"] == "v2"
        assert_equal_objects(state_objects(state), sim_objects(store))


def test_rerun_is_idempotent(tmp_path: Path) -> None:
    storage, marks, _, _ = _split_archive(tmp_path / "archive")
    info = write_snapshot(storage, work_dir=tmp_path / "work")
    assert info is not None
    before = _keys(storage)
    assert write_snapshot(storage, work_dir=tmp_path / "work") is None
    assert _keys(storage) == before
    assert list((tmp_path / "work").iterdir()) == []  # the scratch database is removed


def test_same_state_same_bytes_in_another_process(tmp_path: Path) -> None:
    """Parts are deterministic across processes (string hashing differs between them)."""
    storage, _, _, _ = _split_archive(tmp_path / "archive")
    digests = []
    for seed in ("1", "2"):
        copy = tmp_path / f"copy{seed}"
        shutil.copytree(tmp_path / "archive", copy)
        code = (
            "import sys; from pathlib import Path; from connector.storage.local import LocalStorage;"
            "from connector.snapshot import write_snapshot;"
            "info = write_snapshot(LocalStorage(Path(sys.argv[1])), work_dir=Path(sys.argv[2]));"
            "print(' '.join(p.sha256 for p in info.parts))"
        )
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", code, str(copy), str(tmp_path / f"w{seed}")],
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
            check=True,
        )
        digests.append(done.stdout.split())
    assert digests[0] and digests[0] == digests[1]


def test_a_committed_snapshot_its_listing_passes_over_is_left_as_it_is(tmp_path: Path) -> None:
    """A manifest of another format (a newer version's) is not read, so the next run folds to
    the same position: it finds that position committed and writes nothing, not parts and a
    state image over the ones that manifest names."""
    storage, _, _, _ = _split_archive(tmp_path / "archive")
    info = write_snapshot(storage, work_dir=tmp_path / "work")
    assert info is not None
    manifest = storage.get(info.manifest_key)
    assert manifest.count(b'"format": 1,') == 1
    storage.put(info.manifest_key, manifest.replace(b'"format": 1,', b'"format": 2,'))
    with pytest.raises(PermanentError, match="unsupported snapshot format 2"):
        read_snapshot_manifest(storage, info.key)
    assert list_snapshots(storage) == []
    stored = {k: storage.get(k) for k in storage.list("snapshots/")}
    assert write_snapshot(storage, work_dir=tmp_path / "work") is None
    assert {k: storage.get(k) for k in storage.list("snapshots/")} == stored


def test_nothing_to_snapshot(tmp_path: Path) -> None:
    assert write_snapshot(LocalStorage(tmp_path / "empty"), work_dir=tmp_path / "w") is None


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
def test_parts_are_bounded_and_checksummed(tmp_path: Path, codec: str) -> None:
    storage, _, _, _ = _split_archive(tmp_path / "archive")
    info = write_snapshot(storage, work_dir=tmp_path / "work", codec=codec, part_objects=5)
    assert info is not None
    manifest = read_snapshot_manifest(storage, info.key)
    assert manifest == info
    objects = [p for p in info.parts if p.kind == "objects"]
    assert all(p.count <= 5 for p in objects)
    assert sum(p.count for p in objects) == info.object_count
    assert len(objects) == -(-info.object_count // 5)  # memory per part is bounded by its size
    for part in info.parts:
        body = storage.get(part.key)
        assert len(body) == part.size and hashlib.sha256(body).hexdigest() == part.sha256
    keys = [r.key for r in iter_snapshot_objects(storage, info)]
    assert keys == sorted(keys) and len(keys) == info.object_count
    assert len(list(iter_snapshot_tombstones(storage, info))) == info.tombstone_count


def test_uncommitted_snapshot_is_rebuilt(tmp_path: Path) -> None:
    """A crash before manifest.json leaves parts only; the next run replaces what differs."""
    storage, _, _, _ = _split_archive(tmp_path / "archive")
    crashed = write_snapshot(storage, work_dir=tmp_path / "work", part_objects=4)
    assert crashed is not None
    storage.delete(crashed.manifest_key)
    assert list_snapshots(storage) == []
    # Its state image as another build of the database left it (an image's bytes depend on
    # how the database was built, and are not compared): the next run's replaces it.
    (image,) = [p for p in crashed.parts if p.kind == "state"]
    storage.put(image.key, storage.get(image.key) + b"another build")
    info = write_snapshot(storage, work_dir=tmp_path / "work", part_objects=50)
    assert info is not None and info.as_of == crashed.as_of
    for part in info.parts:
        assert hashlib.sha256(storage.get(part.key)).hexdigest() == part.sha256
    with replay(storage, tmp_path / "full.sqlite") as full:
        with StateStore(tmp_path / "seeded.sqlite") as seeded:
            seeded.load_snapshot(storage, info.key)
            assert_equal_objects(state_objects(seeded), state_objects(full))


def test_no_snapshot_is_folded_over_a_lost_segment(tmp_path: Path) -> None:
    """A segment after the base snapshot lost with its manifest: the next segment continues
    from a position no segment reaches, and no snapshot is written over the hole."""
    storage, _, events, cut = _split_archive(tmp_path / "archive")
    first = write_snapshot(storage, work_dir=tmp_path / "work")
    assert first is not None
    archive_events(storage, events[cut:], per_segment=2, after=first.as_of)
    later = [r for r in ArchiveReader(storage).manifests() if r.manifest.first > first.as_of]
    assert len(later) >= 2
    storage.delete(later[0].manifest.segment)
    storage.delete(later[0].manifest_key)
    with pytest.raises(PermanentError, match="archive gap before"):
        write_snapshot(storage, work_dir=tmp_path / "work")
    assert list_snapshots(storage) == [first]


def _aliases(db: Path) -> dict[str, str]:
    return dict(state_tables(db)["aliases"])


def test_snapshot_loads_back_the_exact_state(tmp_path: Path) -> None:
    """Rows, aliases and tombstones read back from the lines equal those of a full replay."""
    storage, _, events, _ = _split_archive(tmp_path / "archive")
    archive_events(storage, events, per_segment=9)  # the whole scenario: merges, id changes
    info = write_snapshot(storage, work_dir=tmp_path / "work", part_objects=7)
    assert info is not None and info.rows == SNAPSHOT_ROWS
    replay(storage, tmp_path / "full.sqlite").close()
    with StateStore(tmp_path / "seeded.sqlite", scratch=True) as seeded:
        seeded.load_snapshot(storage, info.key)
    full, seeded_tables = (
        state_tables(tmp_path / "full.sqlite"),
        state_tables(tmp_path / "seeded.sqlite"),
    )
    assert seeded_tables == full
    keys = {row[0] for row in full["objects"]}
    assert len(full["aliases"]) > len(keys) and len(full["tombstones"]) > 0


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
def test_the_state_image_opens_to_the_exact_state(tmp_path: Path, codec: str) -> None:
    """A snapshot's state image, incremental (built on the previous snapshot's image) and
    opened as a restore opens it, holds the rows, aliases and tombstones of a full replay;
    folding on from it works like folding on from the parts."""
    storage, _, events, cut = _split_archive(tmp_path / "archive")
    first = write_snapshot(storage, work_dir=tmp_path / "work", codec=codec)
    assert first is not None and first.state_image is not None
    archive_events(storage, events[cut:], per_segment=9, after=first.as_of)
    second = write_snapshot(storage, work_dir=tmp_path / "work", codec=codec)
    assert second is not None and second.based_on == str(first.as_of)
    image = second.state_image
    assert image is not None and image.key.endswith(
        "/state.sqlite" + (".zst" if codec == "zstd" else ".gz")
    )
    assert second.state_schema == STATE_SCHEMA and image.count == second.object_count
    replay(storage, tmp_path / "full.sqlite").close()
    db = tmp_path / "image.sqlite"
    db.touch()
    open_state_image(db, storage, second, image).close()
    assert state_tables(db) == state_tables(tmp_path / "full.sqlite")
    # The first image, then the segments after it: the same state again.
    db = tmp_path / "first.sqlite"
    db.touch()
    assert first.state_image is not None
    state = open_state_image(db, storage, first, first.state_image)
    with state:
        fold_segments(state, ArchiveReader(storage), start_after=first.last_segment_manifest)
        assert state_sha256(state) == second.state_sha256
    assert state_tables(db) == state_tables(tmp_path / "full.sqlite")


class _ImageUnreachable(LocalStorage):
    """The storage failing for a moment (S3 answering 503) while the state image is read."""

    def open(self, key: str) -> BinaryIO:
        if "/state.sqlite" in key:
            raise RetryableError(f"storage unavailable reading {key}")
        return super().open(key)


def test_a_transient_failure_reading_the_state_image_is_not_damage(tmp_path: Path) -> None:
    """A storage error that may pass is raised as it is (the caller retries): the snapshot is
    not passed over for its parts or an older one, and no store is left open."""
    storage, _, _, _ = _split_archive(tmp_path / "archive")
    info = write_snapshot(storage, work_dir=tmp_path / "work")
    assert info is not None
    flaky = _ImageUnreachable(storage.root)
    db = tmp_path / "seed.sqlite"
    with pytest.raises(RetryableError, match="storage unavailable"):
        seed_state(db, flaky, list_snapshots(flaky))
    state, seed = seed_state(db, storage, list_snapshots(storage))  # the file is usable again
    with state:
        assert seed == info and state.counts()["objects"] == info.object_count


def test_a_snapshot_without_its_state_image(tmp_path: Path) -> None:
    """``snapshot.state_image`` off: parts only, and a restore (or the next snapshot) loads
    them."""
    storage, _, events, cut = _split_archive(tmp_path / "archive")
    first = write_snapshot(storage, work_dir=tmp_path / "work", state_image=False)
    assert first is not None and first.state_image is None and first.state_schema is None
    assert {p.kind for p in first.parts} == {"objects"}  # (no tombstones yet)
    assert not [k for k in _keys(storage) if "/state." in k]
    archive_events(storage, events[cut:], per_segment=9, after=first.as_of)
    second = write_snapshot(storage, work_dir=tmp_path / "work", state_image=False)
    assert second is not None and second.based_on == str(first.as_of)
    with replay(storage, tmp_path / "full.sqlite") as full:
        assert second.state_sha256 == state_sha256(full)


def test_older_snapshot_rows_are_derived_again(tmp_path: Path) -> None:
    """A manifest without the writer's row rules (or other ones): rows come from the objects."""
    storage, _, _, _ = _split_archive(tmp_path / "archive")
    info = write_snapshot(storage, work_dir=tmp_path / "work", part_objects=7)
    assert info is not None
    manifest = orjson.loads(storage.get(info.manifest_key))
    del manifest["rows"]
    storage.put(info.manifest_key, orjson.dumps(manifest))
    assert read_snapshot_manifest(storage, info.key).rows is None
    replay(storage, tmp_path / "full.sqlite").close()
    with StateStore(tmp_path / "seeded.sqlite", scratch=True) as seeded:
        seeded.load_snapshot(storage, info.key)
    assert state_tables(tmp_path / "seeded.sqlite") == state_tables(tmp_path / "full.sqlite")


def _line(key: str, stix_id: str, extra: list[str], **fields: Any) -> bytes:
    data = {"id": stix_id, "type": stix_id.split("--")[0], "name": key, **fields}
    data["extensions"] = {OCTI_EXT: {"id": key, "stix_ids": extra}}
    record = {"key": key, "stix_id": stix_id, "event_id": "5-0", "event": "create", "data": data}
    return orjson.dumps(record) + b"\n"


def test_snapshot_lines_first_claim_wins_and_other_layouts_load(tmp_path: Path) -> None:
    a = _line("a", "malware--1", ["malware--9"])
    # An alias the line lists beyond the object's own ids (an old standard id) is the object's.
    a = a[:-2] + b', "aliases": ["malware--7"]}\n'
    b = _line("b", "malware--9", [])
    # Written by hand, not by us: other key order and spacing take the parse-and-dump path.
    c_data = {"type": "malware", "id": "malware--3", "name": 'c "data": x', "extensions": {}}
    c = b'{"data" : %s, "key": "c", "stix_id": "malware--3", "event_id": "5-0", "event": "create"}\n'
    c %= orjson.dumps(c_data)
    db = tmp_path / "s.sqlite"
    with StateStore(db, scratch=True) as state:
        state.load_lines([a, b, c], [], EventId(5, 0))
        # Two live objects claim malware--9: the first in key order keeps it, as in a fold.
        assert state.get("malware--9") == orjson.loads(a)["data"]
        assert state.get("b") == orjson.loads(b)["data"]
        assert state.get("malware--3") == c_data
        assert state.as_of == EventId(5, 0) and state.counts()["objects"] == 3
    assert _aliases(db) == {
        "a": "a",
        "malware--1": "a",
        "malware--7": "a",
        "malware--9": "a",
        "b": "b",
        "c": "c",
        "malware--3": "c",
    }


def _header_line(stix: dict[str, Any], phase: int, order: tuple[str, ...] = ()) -> bytes:
    """A line in the snapshot writer's layout (its row header first), fields in ``order``
    first when given."""
    octi = stix["extensions"][OCTI_EXT]
    head = {"key": octi["id"], "stix_id": stix["id"], "event_id": "5-0", "event": "create"}
    head |= {"iid": octi["id"], "type": stix["type"], "phase": phase, "version": ""}
    head |= {"refs": stix_refs(stix), "aliases": [octi["id"], stix["id"]]}
    head = {k: head[k] for k in order} | head
    return orjson.dumps({**head, "data": stix}) + b"\n"


def test_lines_under_older_row_rules_or_another_header_order_are_derived_again(
    tmp_path: Path,
) -> None:
    """Rows of lines written under other row rules (a relationship of a report was pushed with
    the relationships, rules 2) are derived from the object; so are those whose header fields
    come in another order: only the writer's own layout and rules are taken as they are."""
    rel = {"type": "relationship", "id": "relationship--1", "relationship_type": "related-to",
           "source_ref": "report--1", "target_ref": "malware--1",
           "extensions": {OCTI_EXT: {"id": "r1"}}}  # fmt: skip
    other = {"type": "malware", "id": "malware--2", "name": "m",
             "extensions": {OCTI_EXT: {"id": "m2"}}}  # fmt: skip
    assert push_phase(rel) == 9 and push_phase(other) == 2
    for rows, lines in (
        (2, [_header_line(rel, 4), _header_line(other, 2)]),
        (SNAPSHOT_ROWS, [_header_line(other, 2, order=("stix_id", "key"))]),
    ):
        with StateStore(tmp_path / f"{rows}.sqlite", scratch=True) as state:
            state.load_lines(lines, [], EventId(5, 0), rows=rows)
            assert state.get("malware--2") == other
            assert state.phase_count(2) == 1 and state.phase_count(4) == 0
            assert state.phase_count(9) == (rows == 2)
        assert _aliases(tmp_path / f"{rows}.sqlite")["m2"] == "m2"


def test_a_snapshot_loaded_over_a_used_state_replaces_it_whole(tmp_path: Path) -> None:
    """verify loads a snapshot over the state it was folding when that snapshot disagrees: no
    tombstone of the state before stays, and a delete folded after it still takes what
    depended on the deleted object (the reverse index is built again from the loaded rows)."""
    gone = "malware--00000000-0000-4000-8000-000000000009"
    rel = _line("r", "relationship--1", [], relationship_type="uses",
                source_ref="malware--1", target_ref="malware--2")  # fmt: skip
    with StateStore(tmp_path / "s.sqlite", scratch=True) as state:
        # A delete: the reverse index is built, and a tombstone written.
        state.apply_many(
            [_event(1, "create", _entity(gone, "g")), _event(2, "delete", _entity(gone, "g"))]
        )
        assert state.counts()["tombstones"] == 1
        lines = [_line("m1", "malware--1", []), _line("m2", "malware--2", []), rel]
        state.load_lines(lines, [], EventId(CLOCK0 + 5, 0))
        assert list(state.tombstones()) == [] and state.counts()["objects"] == 3
        deleted = {"type": "malware", "id": "malware--1", "extensions": {OCTI_EXT: {"id": "m1"}}}
        state.apply(_event(6, "delete", deleted))
        assert state.get("relationship--1") is None
        assert [t.stix_id for t in state.tombstones()] == ["malware--1", "relationship--1"]


def test_damaged_snapshot_line_is_a_clear_error(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s.sqlite") as state:
        with pytest.raises(MalformedEvent, match="lacks key"):
            state.load_lines([_line("a", "malware--1", []), b'{"key": "b"}\n'], [], EventId(5, 0))
        assert state.counts()["objects"] == 0  # rolled back: nothing half-loaded
    storage, _, _, _ = _split_archive(tmp_path / "archive")
    info = write_snapshot(storage, work_dir=tmp_path / "work")
    assert info is not None
    part = next(p for p in info.parts if p.kind == "objects")
    # The same lines compressed otherwise: not the bytes the manifest vouches for.
    lines = b"".join(iter_snapshot_object_lines(storage, info))
    storage.put(part.key, compress(lines, info.codec, 19))
    with StateStore(tmp_path / "t.sqlite", scratch=True) as state:
        with pytest.raises(PermanentError, match=f"part {part.key} is damaged: its sha256"):
            state.load_snapshot(storage, info.key)
    # A bad line in a part whose checksum matches (written so): the line is the error.
    body = compress(b"{not json\n", info.codec, 3)
    storage.put(part.key, body)
    manifest = orjson.loads(storage.get(info.manifest_key))
    manifest["parts"][0]["sha256"] = hashlib.sha256(body).hexdigest()
    storage.put(info.manifest_key, orjson.dumps(manifest))
    with StateStore(tmp_path / "u.sqlite", scratch=True) as state:
        with pytest.raises(
            PermanentError, match=f"snapshot {info.key} is damaged: .*not valid JSON"
        ):
            state.load_snapshot(storage, info.key)
