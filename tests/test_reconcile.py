"""Delete reconciliation's platform listing (connector/reconcile.py) against the simulator.

Every archived object missing from the listing becomes a delete event, in the archive and on a
target platform: the listing must be whole, or fail. The retention-gap repair that runs it end to
end is tested in test_consumer.py and test_faults.py.
"""

from __future__ import annotations

import copy
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import orjson
import pytest

from connector.archive import ArchiveReader, ArchiveSink
from connector.checkpoint import Checkpoint, CheckpointStore
from connector.errors import CannotReconcile, RetryableError, SourceRetryable
from connector.events import OCTI_EXT, EventId, StreamEvent
from connector.pipeline import BatchPolicy, Pipeline
from connector.reconcile import (
    REFERER,
    platform_ids,
    reconcile_deletes,
    reconcile_group,
)
from connector.restore import materialise
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.sink import Batch
from connector.source import RetainedThrough, SourceConfig, SseSource
from connector.state import push_phase
from connector.storage.local import LocalStorage
from tests.support.connector import ConnectorThread, base_env, caught_up, wait_until
from tests.support.handfed import malware
from tests.support.served import serving
from tests.test_verify import ArchiveBuilder

TOKEN = "test-token"
MALWARE_ONLY = {
    "mode": "and",
    "filters": [{"key": ["entity_type"], "values": ["Malware"], "operator": "eq", "mode": "or"}],
    "filterGroups": [],
}


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = SimServer(token=TOKEN, heartbeat_secs=0.2).start()
    generate(server.store, 120, seed=5)
    server.add_stream("malware", filters=MALWARE_ONLY)
    yield server
    server.stop()


def _backup(sim: SimServer, tmp_path: Path, stream: str) -> LocalStorage:
    storage = LocalStorage(tmp_path / "archive")
    env = base_env(sim.url, TOKEN, str(storage.root), CONNECTOR_LIVE_STREAM_ID=stream)
    run = ConnectorThread(env).start()
    wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="backup")
    run.stop()
    assert run.error is None
    return storage


def _reconcile_events(
    sim: SimServer, storage: LocalStorage, tmp_path: Path, stream: str
) -> list[StreamEvent]:
    config = SourceConfig(url=sim.url, token=TOKEN, stream_id=stream, read_timeout=5)
    at = EventId(int(time.time() * 1000), 0)
    return [
        ev for group in reconcile_deletes(storage, config, at=at, work_dir=tmp_path) for ev in group
    ]


def _reconcile(sim: SimServer, storage: LocalStorage, tmp_path: Path, stream: str) -> set[str]:
    """The ids reconciled as deleted."""
    events = _reconcile_events(sim, storage, tmp_path, stream)
    return {ev.stix_id for ev in events if ev.event == "delete"}


def _archived(storage: LocalStorage, tmp_path: Path) -> set[str]:
    with materialise(storage, until=None, work_dir=tmp_path / "state") as state:
        return {stix_id for _key, stix_id, _event, _data in state.objects()}


@pytest.mark.parametrize("stream", ["live", "malware"])
def test_listing_is_whole_despite_heartbeats_during_recovery(
    sim: SimServer, tmp_path: Path, stream: str
) -> None:
    """Heartbeats between recovered messages (the platform's timer, §2.3) do not end the listing,
    and on a filtered stream the objects archived as dependencies are listed too: only what the
    platform really lost comes back as a delete."""
    storage = _backup(sim, tmp_path, stream)
    archived = _archived(storage, tmp_path)
    doomed = next(o["id"] for o in sim.store.objects() if o["type"] == "malware")
    assert doomed in archived
    sim.store.delete(doomed)  # unseen by the archive: as if lost with the stream's retention
    platform = {str(o["id"]) for o in sim.store.objects()}
    sim.set_fault(recovery_heartbeats=True)
    deletes = _reconcile(sim, storage, tmp_path, stream)
    assert doomed in deletes
    assert deletes == archived - platform


def test_changes_the_archive_missed_are_refreshed(sim: SimServer, tmp_path: Path) -> None:
    """A change the repair sent where the archive took it for one it held (the archive past the
    checkpoint) is in no segment: the listing finds what the archive lacks or holds otherwise
    (a later version, references re-pointed silently), and only those."""
    storage = _backup(sim, tmp_path, "live")
    objects = list(sim.store.objects())
    changed = next(o["id"] for o in objects if o["type"] == "malware")
    sim.store.update(changed, set={"description": "changed where the archive did not look"})
    added = "malware--00000000-0000-4000-8000-000000000777"
    sim.store.create({"type": "malware", "id": added, "name": "never archived", "is_family": True})
    # A new standard id: the platform re-points what refers to it silently (same version).
    uses = next(o for o in objects if o["type"] == "relationship" and o["target_ref"] != changed)
    renamed = "malware--00000000-0000-4000-8000-000000000779"
    sim.store.update(uses["target_ref"], new_id=renamed)
    referrers = {
        str(o["id"]) for o in sim.store.objects() if o["id"] != renamed and renamed in str(o)
    }
    assert uses["id"] in referrers
    events = _reconcile_events(sim, storage, tmp_path, "live")
    created = {ev.stix_id: ev.stix for ev in events if ev.event == "create"}
    assert set(created) == {changed, added, renamed} | referrers
    assert created[changed]["description"] == "changed where the archive did not look"
    assert created[uses["id"]]["target_ref"] == renamed
    # In push order: a target pushes them in bundles, referenced objects first.
    phases = [push_phase(ev.stix) for ev in events if ev.event == "create"]
    assert phases == sorted(phases) and len(set(phases)) > 1
    assert all(ev.envelope["origin"] == {"referer": "opencti-sync-reconcile"} for ev in events)
    assert not [ev for ev in events if ev.event != "create"]  # nothing deleted or merged


def test_merged_into_an_entity_the_archive_never_saw(sim: SimServer, tmp_path: Path) -> None:
    """Merged away in the lost window into an entity created there: a merge into the refreshed
    entity (what referred to the source follows it), not a delete."""
    storage = _backup(sim, tmp_path, "live")
    source = next(o["id"] for o in sim.store.objects() if o["type"] == "malware")
    target = "malware--00000000-0000-4000-8000-000000000778"
    sim.store.create(
        {"type": "malware", "id": target, "name": "created while down", "is_family": True}
    )
    sim.store.merge(target, [source])
    events = _reconcile_events(sim, storage, tmp_path, "live")
    kinds = [
        (ev.event, ev.stix_id) for ev in events if target in (ev.stix_id,) or ev.event != "create"
    ]
    assert kinds == [("create", target), ("merge", target)], kinds
    merge = events[[ev.event for ev in events].index("merge")]
    assert [s["id"] for s in merge.envelope["context"]["sources"]] == [source]


def test_an_object_renamed_outside_a_filtered_listing_is_kept(
    sim: SimServer, tmp_path: Path
) -> None:
    """On a Malware-only stream, an author is archived as a malware's dependency. Renamed in the
    lost window and no longer the dependency of anything, the listing leaves it out, and the
    platform answers its old id with its new standard id, same entity: not deleted."""
    author = "identity--00000000-0000-4000-8000-000000000781"
    authored = "malware--00000000-0000-4000-8000-000000000782"
    sim.store.create({"type": "identity", "id": author, "name": "a", "identity_class": "group"})
    sim.store.create(
        {
            "type": "malware",
            "id": authored,
            "name": "m",
            "is_family": True,
            "created_by_ref": author,
        }
    )
    storage = _backup(sim, tmp_path, "malware")
    assert author in _archived(storage, tmp_path)
    sim.store.update(author, new_id="identity--00000000-0000-4000-8000-000000000783")
    sim.store.update(authored, unset=["created_by_ref"])
    events = _reconcile_events(sim, storage, tmp_path, "malware")
    assert author not in {ev.stix_id for ev in events if ev.event != "create"}


def test_groups_are_bounded_and_the_work_files_removed(sim: SimServer, tmp_path: Path) -> None:
    """The events come in groups (here of one event each, by bytes) under consecutive ids just
    below the position, the same events as in one group; the work files go with the last."""
    storage = _backup(sim, tmp_path, "live")
    objects = list(sim.store.objects())
    for o in [o for o in objects if o["type"] == "malware"][:2]:
        sim.store.update(o["id"], set={"description": "changed while unseen"})
    for o in [o for o in objects if o["type"] == "indicator"][:2]:
        sim.store.delete(o["id"])
    config = SourceConfig(url=sim.url, token=TOKEN, stream_id="live", read_timeout=5)
    at = EventId(int(time.time() * 1000), 0)
    whole = list(reconcile_deletes(storage, config, at=at, work_dir=tmp_path))
    groups = list(reconcile_deletes(storage, config, at=at, work_dir=tmp_path, max_bytes=1))
    assert len(whole) == 1 and len(whole[0]) >= 4
    assert [len(g) for g in groups] == [1] * len(whole[0])
    assert [g[0].id for g in groups] == [reconcile_group(at, i) for i in range(len(groups))]
    assert all(g[0].id < at for g in groups)
    assert [(g[0].event, g[0].data) for g in groups] == [(ev.event, ev.data) for ev in whole[0]]
    assert not list(tmp_path.glob("reconcile-*"))


def test_what_the_archive_holds_past_the_acknowledged_state_is_compared_too(
    sim: SimServer, tmp_path: Path
) -> None:
    """With ``as_of`` (what every sink acknowledged) before the archive's end: an object created
    after it and gone from the platform is deleted (the archive, what a restore replays, holds
    it), and one changed after it is written again (a target may lack the change)."""
    storage = _backup(sim, tmp_path, "live")
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.last_segment_last_id is not None
    as_of = EventId.parse(cp.last_segment_last_id)
    created = "malware--00000000-0000-4000-8000-0000000000aa"
    sim.store.create({"type": "malware", "id": created, "name": "past as_of", "is_family": True})
    changed = next(o["id"] for o in sim.store.objects() if o["type"] == "indicator")
    sim.store.update(changed, set={"description": "changed past as_of"})
    storage = _backup(sim, tmp_path, "live")
    sim.store.delete(created)
    config = SourceConfig(url=sim.url, token=TOKEN, stream_id="live", read_timeout=5)
    at = EventId(int(time.time() * 1000), 0)
    events = [
        ev
        for group in reconcile_deletes(storage, config, at=at, as_of=as_of, work_dir=tmp_path)
        for ev in group
    ]
    assert {ev.stix_id for ev in events if ev.event == "delete"} == {created}
    assert {ev.stix_id for ev in events if ev.event == "create"} == {changed}
    archive_only = [
        ev for group in reconcile_deletes(storage, config, at=at, work_dir=tmp_path) for ev in group
    ]
    assert [(ev.event, ev.stix_id) for ev in archive_only] == [("delete", created)]


def test_a_stream_refusing_recovery_cannot_be_reconciled(sim: SimServer, tmp_path: Path) -> None:
    storage = _backup(sim, tmp_path, "live")
    sim.set_fault(no_recover=True)
    with pytest.raises(CannotReconcile):
        _reconcile(sim, storage, tmp_path, "live")


def test_a_listing_cut_short_is_an_error(sim: SimServer, tmp_path: Path) -> None:
    storage = _backup(sim, tmp_path, "live")
    sim.set_fault(drop_after_events=10)
    with pytest.raises(SourceRetryable, match="reconcile listing"):
        _reconcile(sim, storage, tmp_path, "live")
    assert not list(tmp_path.glob("reconcile-*"))  # its work files are gone with it


def test_an_empty_listing_is_not_taken_for_mass_deletion(sim: SimServer, tmp_path: Path) -> None:
    storage = _backup(sim, tmp_path, "live")
    store = SimStore()  # a platform whose stream exists but which holds nothing (yet)
    generate(store, 1, seed=1, mix="creates")
    store.delete(next(iter(store.objects()))["id"])
    with SimServer(token=TOKEN, heartbeat_secs=0.2, store=store) as empty:
        with pytest.raises(SourceRetryable, match="listed no objects"):
            _reconcile(empty, storage, tmp_path, "live")


def test_an_event_arriving_below_the_reconciliation_is_quarantined(tmp_path: Path) -> None:
    """The reconciliation runs at an idle heartbeat's position H and archives its events just
    below it; an event the platform appends at or below those groups afterwards (its clock
    behind the heartbeat's) cannot be stored in order any more: it is quarantined with its
    reason, never dropped as one already stored. One between them and H is stored."""
    storage = LocalStorage(tmp_path / "a")
    calls: list[EventId] = []

    def reconciler(at: EventId, as_of: EventId | None) -> list[list[StreamEvent]]:
        calls.append(at)
        return [[_malware(reconcile_group(at, 0), 99, "delete")]]

    source, pipe = _reconciling(storage, reconciler)
    cp = pipe.checkpoint
    d = EventId(1_800_000_000_000, 0)
    h, late = EventId(d.ms + 10_000, 0), EventId(d.ms + 5_000, 0)

    def live(n: int) -> bytes:
        return _malware(d, n, "create", referer=None).data

    _feed(source, pipe, "create", str(d), live(1))
    # Idle, but its groups would go at d's millisecond, where the archive ends: it waits.
    _feed(source, pipe, "heartbeat", str(EventId(d.ms + 1, 0)), b'"x"')
    assert cp.reconcile["due"] is True and not calls
    _feed(source, pipe, "heartbeat", str(h), b'"x"')  # idle: it runs and writes just below h
    assert cp.reconcile["due"] is False
    _feed(source, pipe, "create", str(late), live(2))
    # Below h but above the reconciliation's groups: stored in order, like any event below an
    # idle heartbeat.
    between = EventId(h.ms - 1, 5)
    _feed(source, pipe, "create", str(between), live(3))
    pipe._flush()
    archived = [ev.id_text for ev in ArchiveReader(storage).events()]
    assert calls == [h]
    assert archived == [str(d), str(reconcile_group(h, 0)), str(between)]
    assert cp.last_event_id == str(h)
    quarantined = list(storage.list("quarantine/"))
    assert len(quarantined) == 1 and str(late) in storage.get(quarantined[0]).decode()


def _malware(at: EventId, n: int, kind: str, referer: str | None = REFERER) -> StreamEvent:
    """An event about malware ``n``, at ``at``: by default one a reconciliation made."""
    return malware(at, n, kind, referer)


def _reconciling(
    storage: LocalStorage, reconciler: Any, *, resume: EventId | None = None, **options: Any
) -> tuple[SseSource, Pipeline]:
    """A source and a pipeline into ``storage`` whose checkpoint (at ``resume``) has a
    reconciliation due; their items are fed by hand (``_feed``)."""
    cp = Checkpoint(stream_id="live", source_url="http://x")
    cp.reconcile = {"due": True}
    if resume is not None:
        cp.last_event_id = cp.last_segment_last_id = str(resume)
    store = CheckpointStore(storage)
    store.save(cp)
    source = SseSource(SourceConfig(url="http://x", token="t", stream_id="live"), resume=resume)
    pipe = Pipeline(
        source=source,
        sinks=[ArchiveSink(storage)],
        store=store,
        checkpoint=cp,
        policy=BatchPolicy(max_events=1),
        stop=threading.Event(),
        reconciler=reconciler,
        **options,
    )
    return source, pipe


def _feed(source: SseSource, pipe: Pipeline, name: str, id_text: str, data: bytes) -> None:
    """One SSE message through the source's handling into the pipeline."""
    out: list[Any] = []
    source._handle(name, id_text, data, out)
    for item in out:
        pipe._handle(item)
    pipe._maybe_flush()


_D = EventId(1_800_000_000_000, 0)  # the archive's end when the reconciliation became due
_T = EventId(_D.ms + 10_000, 0)  # run 1's idle position, where it reconciled


def _run_1_stored_a_group(
    storage: LocalStorage, creates: list[StreamEvent]
) -> tuple[SseSource, Pipeline]:
    """``creates`` archived at ``_D``; above them the first group of run 1's reconciliation at
    ``_T`` (malware 1 deleted), stored before it stopped without its checkpoint. Run 2's
    source and pipeline, from ``_D``, whose reconciliation deletes malware 2."""
    sink = ArchiveSink(storage)
    sink.write(Batch(first_id=_D, last_id=_D, events=creates))
    g0 = reconcile_group(_T, 0)
    sink.write(Batch(first_id=g0, last_id=g0, events=[_malware(g0, 1, "delete")], after_id=_D))
    return _reconciling(
        storage,
        lambda at, as_of: [[_malware(reconcile_group(at, 0), 2, "delete")]],
        resume=_D,
    )


def test_a_restart_reconciles_above_the_groups_an_earlier_run_stored(tmp_path: Path) -> None:
    """Run 1 stored a reconciliation group below its idle position T and stopped before its
    checkpoint; run 2's idle position is T again (another platform node's clock): its groups
    would get the same ids and be skipped as stored. It waits for a later position instead."""

    storage = LocalStorage(tmp_path / "a")
    d, t = _D, _T
    source, pipe = _run_1_stored_a_group(
        storage, [_malware(d, 1, "create"), _malware(d, 2, "create")]
    )
    cp = pipe.checkpoint
    _feed(source, pipe, "heartbeat", str(t), b'"x"')
    assert cp.reconcile["due"] is True  # no room below t: it waits
    _feed(source, pipe, "heartbeat", str(EventId(t.ms + 5_000, 0)), b'"x"')
    assert cp.reconcile["due"] is False
    deleted = [ev.stix_id for ev in ArchiveReader(storage).events() if ev.event == "delete"]
    assert deleted == [_malware(d, 1, "delete").stix_id, _malware(d, 2, "delete").stix_id]


class _ManifestTimesOut(LocalStorage):
    """The next manifest write times out after the segment was stored (an S3 timeout)."""

    fail_next_manifest = False

    def put_if_absent(self, key: str, body: bytes) -> bool:
        if self.fail_next_manifest and key.startswith("manifests/"):
            self.fail_next_manifest = False
            raise RetryableError("storage timed out")
        return super().put_if_absent(key, body)


def test_a_group_retried_after_its_manifest_failed_counts_as_written(tmp_path: Path) -> None:
    """The retry finds the segment its first attempt stored: the same bytes, so this write's,
    not a group an earlier run stored (which would stop the run)."""
    storage = _ManifestTimesOut(tmp_path / "a")
    d = EventId(1_800_000_000_000, 0)
    ArchiveSink(storage).write(Batch(first_id=d, last_id=d, events=[_malware(d, 1, "create")]))

    def reconciler(at: EventId, as_of: EventId | None) -> list[list[StreamEvent]]:
        storage.fail_next_manifest = True
        return [[_malware(reconcile_group(at, 0), 1, "delete")]]

    source, pipe = _reconciling(
        storage, reconciler, resume=d, backoff_initial=0.01, backoff_max=0.02
    )
    cp = pipe.checkpoint
    _feed(source, pipe, "heartbeat", str(EventId(d.ms + 10_000, 0)), b'"x"')
    assert cp.reconcile["due"] is False and cp.reconcile["deleted"] == 1
    assert [ev.event for ev in ArchiveReader(storage).events()] == ["create", "delete"]
    assert cp.events_archived == 1 and cp.segments_written == 1


def test_a_restart_counts_the_groups_an_earlier_run_stored(tmp_path: Path) -> None:
    """Run 1 stored the first of two groups, then was killed before its checkpoint. Run 2 finds
    a gap again (the platform trimmed its stream past the checkpoint once more), compares the
    archive with that group in it and writes the other: the checkpoint counts both, as an uncut
    run would."""
    from connector.source import GapDetected

    storage = LocalStorage(tmp_path / "a")
    d, t = _D, _T
    source, pipe = _run_1_stored_a_group(
        storage, [_malware(d, n, "create", referer=None) for n in (1, 2, 3)]
    )
    cp = pipe.checkpoint
    cp.reconcile = {"due": True, "archive_last_event_id": str(d), "groups_after": str(d)}
    pipe._handle(GapDetected(d, EventId(d.ms + 1, 0), "2027-01-15T08:00:00.000Z"))
    assert cp.reconcile["groups_after"] == str(d)  # not g0, the archive's end now
    cp.reconcile["repair_recover_until"] = None  # the repair's recovery is over
    _feed(source, pipe, "heartbeat", str(EventId(t.ms + 5_000, 0)), b'"x"')
    assert cp.reconcile["due"] is False
    assert (cp.reconcile["deleted"], cp.reconcile["refreshed"]) == (2, 0)


def test_an_event_at_the_reconciliation_group_itself_is_quarantined(tmp_path: Path) -> None:
    """An event the platform appends with the very id of a group a reconciliation archived
    (its clock behind the heartbeat's) cannot be stored in order either: quarantined, not
    skipped by the archive as a group it already holds."""
    storage = LocalStorage(tmp_path / "a")

    def reconciler(at: EventId, as_of: EventId | None) -> list[list[StreamEvent]]:
        return [[_malware(reconcile_group(at, 0), 99, "delete")]]

    source, pipe = _reconciling(storage, reconciler)
    d = EventId(1_800_000_000_000, 0)
    h = EventId(d.ms + 10_000, 0)
    _feed(source, pipe, "create", str(d), _malware(d, 1, "create", referer=None).data)
    _feed(source, pipe, "heartbeat", str(h), b'"x"')  # the reconciliation runs below h
    assert pipe.checkpoint.reconcile["due"] is False
    same = reconcile_group(h, 0)
    _feed(source, pipe, "create", str(same), _malware(same, 2, "create", referer=None).data)
    pipe._flush()
    assert [ev.id for ev in ArchiveReader(storage).events()] == [d, same]
    quarantined = list(storage.list("quarantine/"))
    assert len(quarantined) == 1 and "malware--00000000-0000-4000-8000-000000000002" in (
        storage.get(quarantined[0]).decode()
    )


def test_a_checkpoint_at_the_oldest_retained_event_is_no_retention_gap() -> None:
    """The stream reads strictly after ``from``: a checkpoint at its oldest retained event
    misses nothing. Taken for a gap, every restart at that point started a repair's recovery
    and recorded a gap that never was."""
    from connector.source import SourceConfig

    position = EventId(1_800_000_000_000, 3)
    config = SourceConfig(url="http://x", token="t", stream_id="live", retention_gap="repair")
    out: list[Any] = []
    SseSource(config, resume=position)._handle(
        "connected", "", orjson.dumps({"firstEventId": str(position)}), out
    )
    assert out == [RetainedThrough(position)]  # no gap: all it received from there is whole


# -- a hand-made platform: a listing and a stix(id) lookup answered as each test says ------------

_FAR = "4000000000000-0"  # an id past any recover point: the live part has begun


class _Platform(BaseHTTPRequestHandler):
    """The listing sends ``listing`` (event name, STIX) then a heartbeat past the recover point
    (unless ``live_part`` is false: the response ends properly inside the recovery);
    ``stix(id)`` answers from ``known`` (a standard id: the entity's STIX, absent: unknown)."""

    listing: list[tuple[str, dict[str, Any]]] = []
    live_part = True
    known: dict[str, dict[str, Any]] = {}
    stream_status = 200
    lookup: str = "answer"  # or "403" (no GraphQL errors), "close" (no answer at all)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.stream_status != 200:
            self.send_response(self.stream_status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = "".join(
            f"id: 1000-{n}\nevent: {name}\ndata: "
            f"{orjson.dumps({'version': '4', 'type': name, 'data': stix}).decode()}\n\n"
            for n, (name, stix) in enumerate(self.listing)
        )
        if self.live_part:
            body += f'id: {_FAR}\nevent: heartbeat\ndata: "x"\n\n'
        raw = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_POST(self) -> None:  # noqa: N802
        asked = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))["variables"]
        if self.lookup == "close":
            self.close_connection = True  # the connection drops before any answer
            return
        data = {
            f"a{n}": orjson.dumps(self.known[ref]).decode() if ref in self.known else None
            for n, ref in enumerate(asked[f"i{i}"] for i in range(len(asked)))
        }
        raw = orjson.dumps({} if self.lookup == "403" else {"data": data})
        self.send_response(403 if self.lookup == "403" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: Any) -> None:
        pass


def _platform_events(
    storage: LocalStorage, tmp_path: Path, *, max_events: int | None = None, **answers: Any
) -> list[list[StreamEvent]]:
    """The groups a reconciliation of ``storage`` writes against a ``_Platform`` set up with
    ``answers`` (its class attributes, for this call only)."""
    with serving(type("_ThisPlatform", (_Platform,), answers)) as url:
        config = SourceConfig(url=url, token=TOKEN, stream_id="live", read_timeout=5)
        at = EventId(int(time.time() * 1000), 0)
        groups = reconcile_deletes(storage, config, at=at, work_dir=tmp_path, max_events=max_events)
        return list(groups)


def test_a_listing_that_ends_cleanly_before_the_live_part_is_an_error(tmp_path: Path) -> None:
    """One recovered object, then the response ends properly (a proxy closing a long response,
    a platform node shutting down): no transport error, and no id past the recover point."""
    stix = {"id": "malware--00000000-0000-4000-8000-000000000001", "type": "malware"}
    answers = {"listing": [("create", stix)], "live_part": False}
    db = sqlite3.connect(tmp_path / "ids.sqlite")
    try:
        with serving(type("_EndsInRecovery", (_Platform,), answers)) as url:
            config = SourceConfig(url=url, token=TOKEN, stream_id="live", read_timeout=5)
            with pytest.raises(SourceRetryable, match="ended before its recovery"):
                platform_ids(config, db)
    finally:
        db.close()


def _archive(tmp_path: Path, *numbers: int) -> tuple[LocalStorage, ArchiveBuilder]:
    storage = LocalStorage(tmp_path / "archive")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    for n in numbers:
        b.create(n)
    b.flush()
    return storage, b


def _sid(n: int) -> str:
    return f"malware--00000000-0000-4000-8000-{n:012d}"


def test_a_listing_or_lookup_failing_for_now_is_retried_and_a_refused_one_is_no_delete(
    tmp_path: Path,
) -> None:
    """A rate-limited listing (429) and a lookup whose connection drops are tried again later;
    a lookup answered 4xx without GraphQL errors is a refusal, not "no such entity": taken for
    the latter, every archived object outside the listing would be deleted."""
    storage, b = _archive(tmp_path, 1, 2)
    with pytest.raises(SourceRetryable, match="HTTP 429"):
        _platform_events(storage, tmp_path, stream_status=429)
    listing = [("create", b.objects["iid-2"])]  # 1 is not listed: the lookup is asked
    with pytest.raises(SourceRetryable, match="lookup failed"):
        _platform_events(storage, tmp_path, listing=listing, lookup="close")
    with pytest.raises(CannotReconcile, match="refuses the lookup"):
        _platform_events(storage, tmp_path, listing=listing, lookup="403")
    assert not list(tmp_path.glob("reconcile-*"))


def test_an_object_listed_by_a_merge_event_is_no_delete(tmp_path: Path) -> None:
    """A listing may send an object as a merge (into it) as well as a create or an update: it
    is there, so it is neither looked up nor deleted."""
    storage, b = _archive(tmp_path, 1, 2)
    listing = [("create", b.objects["iid-1"]), ("merge", b.objects["iid-2"])]
    assert _platform_events(storage, tmp_path, listing=listing) == []


def test_an_archive_ahead_of_the_listing_is_not_set_back(tmp_path: Path) -> None:
    """The archive holds a later version than the listing sends (a dependency sent ahead of
    its place): no create of the older one, which would set a target back."""
    storage, b = _archive(tmp_path, 1)
    older = copy.deepcopy(b.objects["iid-1"])
    b.update(1, description="later")
    b.flush()
    assert _platform_events(storage, tmp_path, listing=[("create", older)]) == []


def test_an_object_merged_under_its_own_alias_outside_the_listing_is_deleted(
    tmp_path: Path,
) -> None:
    """The platform answers 1's id with another standard id that the archive knows as 1's own
    alias, without an internal id: the entity that holds it now is none the archive holds
    (merged outside the listing). A delete, never a merge of 1 into itself."""
    storage = LocalStorage(tmp_path / "archive")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    b.create(1, extensions={OCTI_EXT: {"id": "iid-1", "stix_ids": [_sid(9)]}})
    b.create(2)
    b.flush()
    known = {_sid(1): {"id": _sid(9), "type": "malware"}}
    groups = _platform_events(
        storage, tmp_path, listing=[("create", b.objects["iid-2"])], known=known
    )
    assert [(ev.event, ev.stix_id) for g in groups for ev in g] == [("delete", _sid(1))]


def test_deletes_come_first_and_a_merge_follows_its_refreshed_target(tmp_path: Path) -> None:
    """1 deleted, 2 changed, 3 merged into 4, itself changed and now under its alias 8 as its
    standard id: the delete first, then the creates in push order with 4's merge right after
    its refresh, carrying the listed 4 (the archived one, found under the alias, would set a
    target back and name the old id) and 3 as its source. With one event a group, the create
    and the merge stay together (a group never splits a unit, nor takes one more)."""
    storage = LocalStorage(tmp_path / "archive")
    b = ArchiveBuilder(storage, 1_700_000_000_000)
    for n in (1, 2, 3):
        b.create(n)
    b.create(4, extensions={OCTI_EXT: {"id": "iid-4", "stix_ids": [_sid(8)]}})
    b.flush()
    listed = {n: copy.deepcopy(b.objects[f"iid-{n}"]) for n in (2, 4)}
    for n in (2, 4):
        listed[n]["description"] = "changed while the stream's retention was lost"
    listed[4]["id"] = _sid(8)
    four = {"id": _sid(8), "type": "malware", "extensions": {OCTI_EXT: {"id": "iid-4"}}}
    answers: dict[str, Any] = {
        "listing": [("update", listed[2]), ("update", listed[4])],
        "known": {_sid(3): four},
    }
    groups = _platform_events(storage, tmp_path, **answers)
    events = [ev for g in groups for ev in g]
    assert [(ev.event, ev.stix_id) for ev in events] == [
        ("delete", _sid(1)),
        ("create", _sid(2)),
        ("create", _sid(8)),
        ("merge", _sid(8)),
    ]
    merge = events[-1]
    assert merge.stix == listed[4]
    assert [s["id"] for s in merge.envelope["context"]["sources"]] == [_sid(3)]
    bounded = _platform_events(storage, tmp_path, max_events=1, **answers)
    assert [[ev.event for ev in g] for g in bounded] == [
        ["delete"],
        ["create"],
        ["create", "merge"],
    ]


class _Acknowledging:
    """A sink beside the archive that takes every batch (a target, for the pipeline's rules)."""

    name = "target"

    def check(self) -> None:
        pass

    def write(self, batch: Batch) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_gap_found_again_while_its_reconciliation_is_due_keeps_the_older_state(
    tmp_path: Path,
) -> None:
    """With a sink beside the archive, the reconciliation compares the platform with what every
    sink acknowledged before the gap. A second gap while the first one's is still due (the
    stream trimmed again during the repair) keeps the first state: what was acknowledged since
    came from the repair's recovery, which never sent the deletes lost in the first gap."""
    from connector.source import Complete, GapDetected
    from tests.support.handfed import at, hand_fed

    storage = LocalStorage(tmp_path / "a")
    pipe = hand_fed(storage, resume=at(1))
    pipe.sinks.append(_Acknowledging())
    pipe.reconciler = lambda at, as_of: []  # never reached: no idle position comes
    cp = pipe.checkpoint
    cp.acked_event_id = str(at(1))
    repair = "2030-01-01T00:00:00.000Z"
    pipe._handle(GapDetected(at(1), at(50), repair))
    assert cp.reconcile is not None and cp.reconcile["as_of"] == str(at(1))
    pipe._handle(malware(at(60), 1))
    pipe._handle(Complete(at(60)))
    pipe._flush()
    assert cp.acked_event_id == str(at(60))
    pipe._handle(GapDetected(at(60), at(70), repair))
    assert cp.reconcile["due"] is True and cp.reconcile["as_of"] == str(at(1))


def test_a_gap_found_during_a_connection_is_recorded_as_such(tmp_path: Path) -> None:
    """The retention check's gap (the trim overtook the platform's reader mid-connection) is
    saved with ``in_connection`` (verify leaves its span unchecked) and falls due for a
    reconciliation like a gap found on connecting."""
    from connector.source import GapDetected
    from tests.support.handfed import at, hand_fed

    storage = LocalStorage(tmp_path / "a")
    pipe = hand_fed(storage, resume=at(1))
    pipe.reconciler = lambda at, as_of: []  # never reached: no idle position comes
    repair = "2030-01-01T00:00:00.000Z"
    pipe._handle(GapDetected(at(1), at(50), repair, in_connection=True, repair_from=at(55)))
    pipe._handle(GapDetected(at(60), at(70), repair))
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.reconcile is not None and cp.reconcile["due"] is True
    assert [g.get("in_connection") for g in cp.retention_gaps] == [True, None]
    first = cp.retention_gaps[0]
    assert first["checkpoint_event_id"] == str(at(1))
    assert first["repair_from_event_id"] == str(at(55))  # verify restarts chains there
