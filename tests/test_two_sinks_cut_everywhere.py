"""Two sinks (a local archive and an OpenCTI target), cut at every sink call of a short run.

A clean run of the real pipeline (simulator A over HTTP, the real ``SseSource``, an
``ArchiveSink`` on a local directory that also holds the checkpoint, an ``OpenCTITarget``
pushing through real pycti into platform double B) records every call it makes at our own
interfaces: each storage write of the archive (segment, manifest, quarantine record, the
checkpoint) and each sink write and target push, before and after. Each case then runs the same
stream again from scratch and cuts it at one of those calls:

* ``kill`` / ``kill-after``: the process dies before the call / just after it returned (from
  then on nothing of that run reaches the archive, the checkpoint or the target), and a fresh
  pipeline, with fresh sinks on the same archive, checkpoint and target platform, runs to the
  end;
* ``retry``: the call fails once with ``RetryableError`` and the run goes on.

Whatever the cut: every checkpoint saved was at or below what both sinks had made durable
(the archive read back from disk, the target's acknowledged writes), and at the end the archive
holds every event of the stream exactly once and in order, and B equals A.

The cuts are made at our own interfaces (a storage subclass, sink subclasses); pycti, httpx and
the HTTP servers are real.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from connector.archive import ArchiveReader, ArchiveSink
from connector.archive.layout import EVENTS_PREFIX, QUARANTINE_PREFIX, manifest_key_for_segment
from connector.checkpoint import CHECKPOINT_KEY, Checkpoint, CheckpointStore
from connector.events import EventId
from connector.pipeline import BatchPolicy, Pipeline
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.sink import Batch
from connector.source import SourceConfig, SseSource
from connector.storage.local import LocalStorage
from connector.target.opencti import ObjectRefused, OpenCTITarget, Push
from tests.support.compare import assert_same_state
from tests.support.connector import start_pipeline, wait_until
from tests.support.cuts import EVERYWHERE, Killed, OneByOne, Plan, cut_history, malware_id
from tests.support.simlog import sim_events

TOKEN = "two-sinks-cut-token"
B_TOKEN = "two-sinks-target-token"


class Durable:
    """What each sink had acknowledged, across runs, and the checks made at every save."""

    def __init__(self, reference: list[tuple[str, str]], refused: str | None = None) -> None:
        self.reference = reference
        # The event whose object B refuses (quarantined instead), or None.
        self.refused = refused
        self.target: set[str] = set()
        self.saved: list[str] = []


class CutStorage(LocalStorage):
    def __init__(self, root: Path, plan: Plan, durable: Durable) -> None:
        super().__init__(root)
        self.plan, self.durable = plan, durable

    def put(self, key: str, body: bytes) -> None:
        label = "checkpoint" if key == CHECKPOINT_KEY else f"put {key.split('/')[0]}"
        call = self.plan.before(label)
        if key == CHECKPOINT_KEY:
            self._check_checkpoint(body)
        super().put(key, body)
        self.plan.after(call)

    def put_if_absent(self, key: str, body: bytes) -> bool:
        kind = key.split("/")[0]
        kind = "manifest" if kind == "events" and key.endswith(".json") else kind
        call = self.plan.before(f"put {kind}")
        stored = super().put_if_absent(key, body)
        self.plan.after(call)
        return stored

    def _check_checkpoint(self, body: bytes) -> None:
        """The checkpoint about to be saved is at or below what both sinks made durable."""
        last = orjson.loads(body).get("last_event_id")
        if not last:
            return
        position = EventId.parse(last)
        archived = {e.id_text for e in ArchiveReader(LocalStorage(self.root)).events()}
        covered = [i for i, _ in self.durable.reference if EventId.parse(i) <= position]
        not_archived = [i for i in covered if i not in archived]
        not_targeted = [i for i in covered if i not in self.durable.target]
        self.durable.saved.append(last)
        assert not not_archived and not not_targeted, (
            f"checkpoint {last} saved past events not durable: archive lacks {not_archived}, "
            f"target lacks {not_targeted} (cut {self.plan.cut} {self.plan.how})"
        )
        refused = self.durable.refused
        if refused is not None and EventId.parse(refused) <= position:
            assert refused in quarantined(LocalStorage(self.root)), (
                f"checkpoint {last} saved past the refused event {refused}, not quarantined"
            )


def quarantined(storage: LocalStorage) -> list[str]:
    """The event ids of the quarantine records in the archive."""
    return [
        orjson.loads(storage.get(key))["id"]
        for key in storage.list(QUARANTINE_PREFIX)
        if key.endswith(".json")
    ]


class CutArchive(ArchiveSink):
    def __init__(self, storage: CutStorage) -> None:
        super().__init__(storage)
        self.plan = storage.plan

    def write(self, batch: Batch) -> None:
        call = self.plan.before("archive write")
        super().write(batch)
        self.plan.after(call)


class CutTarget(OpenCTITarget):
    def __init__(self, plan: Plan, durable: Durable, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan, self.durable = plan, durable

    def write(self, batch: Batch) -> None:
        call = self.plan.before("target write")
        super().write(batch)
        self.plan.after(call)
        # Acknowledged: every event of the batch is on B (or quarantined, see ``rejected``).
        self.durable.target.update(e.id_text for e in batch.events)

    def _push(self, push: Push) -> None:
        call = self.plan.before(f"push {push.kind}")
        refused = REFUSED if self.durable.refused else None
        if any(o.get("id") == refused for o in push.objects):
            # B refuses this object for its own data, every time (as a validation error).
            raise ObjectRefused(f"VALIDATION_ERROR: object {refused} refused")
        super()._push(push)
        self.plan.after(call)


REFUSED = malware_id(5)  # created once, never changed after


@pytest.fixture(scope="module")
def source() -> Iterator[SimServer]:
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        cut_history(sim.store)
        yield sim


def _run(
    root: Path,
    a: SimServer,
    b: SimServer,
    plan: Plan,
    durable: Durable,
    connector_id: str,
    max_events: int = 2,
) -> list[BaseException]:
    """One connector run from the saved checkpoint until it caught up with A, or died."""
    storage = CutStorage(root, plan, durable)
    store = CheckpointStore(storage)
    cp = store.load() or Checkpoint(stream_id="live", source_url=a.url)
    src = SseSource(
        SourceConfig(url=a.url, token=TOKEN, stream_id="live", backoff_initial=0.02),
        resume=EventId.parse(cp.last_event_id) if cp.last_event_id else None,
        resume_data=EventId.parse(cp.last_segment_last_id) if cp.last_segment_last_id else None,
    )
    src.queue = OneByOne(256, 16 * 1024 * 1024)
    target = CutTarget(
        plan,
        durable,
        url=b.url,
        token=B_TOKEN,
        connector_id=connector_id,
        source_url=a.url,
        register=True,
    )
    stop = threading.Event()
    pipeline = Pipeline(
        source=src,
        sinks=[CutArchive(storage), target],
        store=store,
        checkpoint=cp,
        policy=BatchPolicy(max_events=max_events, max_age_secs=0.3),
        stop=stop,
        backoff_initial=0.01,
        backoff_max=0.02,
        shutdown_timeout=3,
    )
    thread, errors = start_pipeline(pipeline)
    last = EventId.parse(str(a.store.last_event_id))

    def caught_up() -> bool:
        saved = CheckpointStore(LocalStorage(root)).load()
        return saved is not None and EventId.parse(saved.last_event_id or "0-0") >= last

    wait_until(lambda: bool(errors) or caught_up(), timeout=30, what="the run's end")
    stop.set()
    thread.join(15)
    assert not thread.is_alive()
    target.close()
    return errors


def _case(
    tmp: Path, a: SimServer, cut: int | None, how: str, *, refuse: bool = False, recut: int = 2
) -> list[str]:
    """One run cut at call ``cut`` (None: not cut); a killed run is followed by a restart that
    batches ``recut`` events at a time. ``refuse``: B refuses the object ``REFUSED``."""
    events = sim_events(a.store)[0]
    reference = [(e.id_text, e.event) for e in events]
    refused = next((e.id_text for e in events if refuse and e.stix_id == REFUSED), None)
    durable = Durable(reference, refused)
    store = SimStore()
    store.api_token = B_TOKEN  # type: ignore[attr-defined]
    root = tmp / "archive"
    with SimServer(token=B_TOKEN, store=store) as b:
        connector_id = "2f0f1d7c-0000-4000-8000-00000000c0de"
        plan = Plan(cut, how)
        errors = _run(root, a, b, plan, durable, connector_id)
        if how.startswith("kill") and plan.dead:
            assert errors and all(isinstance(e, Killed) for e in errors), errors
            # The restart: a new process on the same archive, checkpoint and target.
            errors = _run(root, a, b, Plan(), durable, connector_id, recut)
        assert not errors, errors
        stored = [(e.id_text, e.event) for e in ArchiveReader(LocalStorage(root)).events()]
        assert stored == reference, f"archive differs after cut {cut} {how}"
        for key in LocalStorage(root).list(EVENTS_PREFIX):
            assert LocalStorage(root).exists(manifest_key_for_segment(key)), key
        expected = a.store.dump_bundle()
        if refused is not None:
            expected["objects"] = [o for o in expected["objects"] if o["id"] != REFUSED]
            # Once: a restart that cuts its batches otherwise stores the same record again.
            records = quarantined(LocalStorage(root))
            assert records.count(refused) == 1, f"refusal stored {records.count(refused)} times"
        assert_same_state(expected, b.store.dump_bundle())
    assert durable.saved, "no checkpoint was saved"
    return plan.calls


def _merge_batch(calls: list[str]) -> range:
    """The calls of the batch holding the merge (and its source's update before it): from its
    target write to its checkpoint."""
    merge = calls.index("push merge")
    first = max(i for i in range(merge) if calls[i] == "target write")
    return range(first, calls.index("checkpoint", merge) + 1)


def test_a_batch_cut_around_its_merge_converges(source: SimServer, tmp_path: Path) -> None:
    """Every call of the batch holding an update of a merge's source and the merge, failing
    once or killing the process just after it returned: the target pushes the batch again
    after it applied the merge, and must not give the merge target the source's fields."""
    calls = _case(tmp_path / "clean", source, None, "kill")
    assert calls.count("archive write") >= 4 and calls.count("target write") >= 4, calls
    for i in _merge_batch(calls):
        for how in ("kill-after", "retry"):
            _case(tmp_path / f"{how}-{i}", source, i, how)


def test_a_refused_object_cut_after_the_target_write(source: SimServer, tmp_path: Path) -> None:
    """B refuses one object: killed after the target's write, before or after the quarantine
    record, or before the checkpoint; the restart (batches cut otherwise) quarantines it once
    and moves on."""
    calls = _case(tmp_path / "clean", source, None, "kill", refuse=True)
    # The target's write of the batch whose push B refused (retried object by object).
    put = calls.index("put quarantine")
    write = max(i for i in range(put) if calls[i] == "target write")
    saved = calls.index("checkpoint", put)
    for i, how in ((write, "kill-after"), (put, "kill"), (put, "kill-after"), (saved, "kill")):
        _case(tmp_path / f"{how}-{i}", source, i, how, refuse=True, recut=3)


@pytest.mark.parametrize(("refuse", "recut"), [(False, 2), (True, 3)])
def test_two_sinks_cut_at_every_call(
    source: SimServer, tmp_path: Path, refuse: bool, recut: int
) -> None:
    """The whole sweep with CUT_EVERYWHERE=1 (about 10 min); otherwise one call for each way
    of cutting, spread over the run (a few seconds a case)."""
    calls = _case(tmp_path / "clean", source, None, "kill", refuse=refuse)
    everywhere = EVERYWHERE
    failures: list[str] = []
    for n, how in enumerate(("kill", "kill-after", "retry")):
        points = range(len(calls)) if everywhere else [(7 + 15 * n + recut) % len(calls)]
        for i in points:
            try:
                _case(tmp_path / f"{how}-{i}", source, i, how, refuse=refuse, recut=recut)
            except AssertionError as exc:
                failures.append(f"{i} {how} {calls[i]}: {str(exc)[:300]}")
    assert not failures, "\n".join(failures)
