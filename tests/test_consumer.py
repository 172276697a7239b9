"""The stream consumer end to end: simulator over HTTP → run → local archive (foundation issue)."""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import queue
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest

from connector import registration
from connector import source as source_module
from connector.archive import ArchiveReader
from connector.checkpoint import Checkpoint, CheckpointStore
from connector.errors import StreamGoneError
from connector.events import ControlEvent, EventId, Quarantined, StreamEvent
from connector.progress import iso_to_ms
from connector.reconcile import REFERER
from connector.registration import SourceRegistration
from connector.restore import materialise
from connector.sim import sample_bundle
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.source import (
    Complete,
    Disconnected,
    Fatal,
    GapDetected,
    Item,
    RecoverMoved,
    RetainedThrough,
    SourceConfig,
    SseSource,
)
from connector.storage.local import LocalStorage
from tests.support.connector import (
    ROOT,
    ConnectorProcess,
    ConnectorThread,
    archived_events,
    base_env,
    caught_up,
    raw_log,
    wait_until,
)
from tests.support.faultproxy import FaultProxy
from tests.support.handfed import at, malware
from tests.support.served import free_port, serving

TOKEN = "test-token"


@pytest.fixture
def sim() -> SimServer:
    server = SimServer(token=TOKEN, heartbeat_secs=0.2).start()
    yield server
    server.stop()


def _live_sequence(events: list) -> list[tuple[str, str]]:
    """(id, event) of the archive's real (non-synthetic) events, in order."""
    out = []
    for ev in events:
        origin = ev.envelope.get("origin") or {}
        if origin.get("referer") in ("init-create", "init-dependencies"):
            continue
        out.append((ev.id_text, ev.event))
    return out


def test_recover_then_live_with_real_samples(sim: SimServer, tmp_path: Path) -> None:
    bundle = sample_bundle("DATA-TEST-STIX2_v2.json")
    sim.store.load_bundle(bundle)
    archive = str(tmp_path / "archive")
    run = ConnectorThread(base_env(sim.url, TOKEN, archive)).start()
    storage = LocalStorage(archive)
    wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="recovery")
    # Live edits after recovery, as a user makes them.
    ids = sorted(
        o["id"] for o in bundle["objects"] if o["type"] in ("malware", "intrusion-set", "indicator")
    )
    sim.store.update(ids[0], set={"description": "edited live"})
    sim.store.delete(ids[1])
    sim.store.create(
        {
            "type": "malware",
            "id": "malware--11111111-2222-4333-8444-555555555555",
            "spec_version": "2.1",
            "name": "LiveMal",
            "is_family": True,
        }
    )
    wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="live edits")
    run.stop()
    assert run.error is None and run.rc == 0
    events = archived_events(archive)
    recovered = [
        ev for ev in events if (ev.envelope.get("origin") or {}).get("referer") == "init-create"
    ]
    # Every object of the platform arrives once through recovery (dependencies aside).
    counts = Counter(ev.stix_id for ev in recovered)
    seeded = {o["id"] for o in bundle["objects"]}
    assert seeded <= set(counts) | {ev.stix_id for ev in events}
    assert all(n == 1 for n in counts.values())
    # Live part: exactly the simulator's events after the recover point, in order, once each.
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.recover_until
    recover_id = EventId.parse(
        str(
            int(
                __import__("datetime")
                .datetime.fromisoformat(cp.recover_until.replace("Z", "+00:00"))
                .timestamp()
                * 1000
            )
        )
        + "-0"
    )
    expected = [(i, e) for i, e, _ in raw_log(sim.url, TOKEN) if EventId.parse(i) > recover_id]
    assert _live_sequence(events) == expected
    assert [e for _, e in expected] == ["update", "delete", "create"]
    # Group ids never go backwards across the archive.
    ids_seen = [ev.id for ev in events]
    assert max(ids_seen) == ids_seen[-1]


def test_dependency_group_cut_anywhere_is_redelivered_whole(tmp_path: Path) -> None:
    """The checkpoint hazard: a report's dependencies share its id; cut inside that group."""
    store = SimStore()
    objects = sample_bundle("poisonivy.json")["objects"]
    report_like = [o for o in objects if o["type"] not in ("report",)]
    store.load_bundle({"type": "bundle", "objects": report_like})
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        archive = str(tmp_path / "a")
        storage = LocalStorage(archive)
        env = base_env(
            sim.url,
            TOKEN,
            archive,
            CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE="1970-01-01T00:00:00.000Z",
        )
        run = ConnectorThread(env).start()
        wait_until(lambda: caught_up(storage, store.last_event_id), what="initial replay")
        # A report referencing many objects: the live stream sends missing refs first, same id.
        refs = [
            o["id"]
            for o in report_like
            if o["type"] in ("malware", "indicator", "attack-pattern", "identity")
        ][:40]
        for cut in (1, 3, 7):
            sim.set_fault(drop_after_events=cut, mid_message=True)
            sim.drop_connections()  # new connection: fresh dependency cache, the fault armed
            rid = f"report--{cut:08d}-0000-4000-8000-000000000000"
            store.create(
                {
                    "type": "report",
                    "id": rid,
                    "spec_version": "2.1",
                    "name": f"r{cut}",
                    "published": "2026-01-01T00:00:00.000Z",
                    "object_refs": refs,
                }
            )
            wait_until(lambda: caught_up(storage, store.last_event_id), what=f"cut {cut}")
        run.stop()
    events = archived_events(archive)
    mains = [
        ev
        for ev in events
        if ev.stix_id.startswith("report--")
        and ev.event == "create"
        and (ev.envelope.get("origin") or {}).get("referer") != "init-dependencies"
    ]
    assert sorted(ev.stix_id for ev in mains) == sorted(
        f"report--{c:08d}-0000-4000-8000-000000000000" for c in (1, 3, 7)
    )
    assert len(mains) == 3


def test_sigkill_at_random_points_loses_nothing(tmp_path: Path) -> None:
    """20k events with edits going on, the process SIGKILLed and restarted repeatedly."""
    rng = random.Random(7)
    store = SimStore()
    generate(store, 5000, seed=1)
    with SimServer(token=TOKEN, store=store, heartbeat_secs=0.2) as sim:
        archive = str(tmp_path / "a")
        storage = LocalStorage(archive)
        # The raw stream sends every event exactly (the live stream would legitimately drop a
        # relationship whose endpoint was deleted meanwhile), so the comparison is exact.
        env = base_env(
            sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_ID="raw", ARCHIVE_MAX_EVENTS="700"
        )
        produced = 5000
        for round_ in range(8):
            proc = ConnectorProcess(env, tmp_path / "run.log")
            generate(store, 1875, seed=100 + round_)
            produced += 1875
            # Let it run a random while, then kill it wherever it is.
            time.sleep(rng.uniform(0.3, 1.5))
            proc.kill()
        proc = ConnectorProcess(env, tmp_path / "run.log")
        wait_until(
            lambda: caught_up(storage, store.last_event_id), timeout=120, what="final catch-up"
        )
        # One more edit proves this last process is up and following before we stop it.
        generate(store, 1, seed=999)
        produced += 1
        wait_until(lambda: caught_up(storage, store.last_event_id), timeout=60, what="last edit")
        assert proc.terminate() == 0
        expected = [(i, e, d["data"]["id"]) for i, e, d in raw_log(sim.url, TOKEN)]
    assert produced == 20001
    archived = [
        (ev.id_text, ev.event, ev.stix_id)
        for ev in archived_events(archive)
        if (ev.envelope.get("origin") or {}).get("referer") != "init-dependencies"
    ]
    assert len(expected) == 20001
    # Distinct sequence: nothing missing, nothing out of order, duplicates only by re-delivery.
    assert [a for i, a in enumerate(archived) if i == 0 or a != archived[i - 1]] == expected
    assert len(archived) == len(set(archived)) == 20001


def test_dropped_connections_mid_event_and_u2028(sim: SimServer, tmp_path: Path) -> None:
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    env = base_env(
        sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE="1970-01-01T00:00:00.000Z"
    )
    text = "line\u2028separator\u2029para and \r\n escapes"
    sim.store.create(
        {
            "type": "malware",
            "id": "malware--00000000-0000-4000-8000-000000002028",
            "spec_version": "2.1",
            "name": "Sep",
            "is_family": False,
            "description": text,
        }
    )
    generate(sim.store, 300, seed=3)
    sim.set_fault(drop_after_events=25, mid_message=True, drop_times=6)
    run = ConnectorThread(env).start()
    wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="catch-up through drops")
    run.stop()
    events = archived_events(archive)
    sep = [ev for ev in events if ev.stix_id == "malware--00000000-0000-4000-8000-000000002028"]
    assert sep and sep[0].stix["description"] == text
    assert "\u2028" in sep[0].raw  # stored as received, not re-escaped
    live = _live_sequence(events)
    expected = [(i, e) for i, e, _ in raw_log(sim.url, TOKEN)]
    assert [x for i, x in enumerate(live) if i == 0 or x != live[i - 1]] == expected
    assert not list(storage.list("quarantine/"))


def test_heartbeats_advance_checkpoint_on_filtered_stream(sim: SimServer, tmp_path: Path) -> None:
    sim.add_stream(
        "reports-only",
        filters={
            "mode": "and",
            "filterGroups": [],
            "filters": [
                {"key": ["entity_type"], "values": ["Report"], "operator": "eq", "mode": "or"}
            ],
        },
    )
    generate(sim.store, 200, seed=5, mix="creates")
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    env = base_env(sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_ID="reports-only")
    run = ConnectorThread(env).start()
    before = EventId.parse(sim.store.last_event_id)
    sim.store.create(
        {
            "type": "malware",
            "id": "malware--00000000-0000-4000-8000-0000000000aa",
            "spec_version": "2.1",
            "name": "Invisible",
            "is_family": True,
        }
    )
    wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="heartbeat checkpoint")
    run.stop()
    cp = CheckpointStore(storage).load()
    assert cp is not None and EventId.parse(cp.last_event_id) > before
    assert all(
        ev.stix.get("type") == "report" or (ev.envelope.get("origin") or {}).get("referer")
        for ev in archived_events(archive)
    )


def test_trimmed_retention_is_detected_and_repaired(sim: SimServer, tmp_path: Path) -> None:
    generate(sim.store, 100, seed=9)
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    env = base_env(sim.url, TOKEN, archive)
    run = ConnectorThread(env).start()
    wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="first run")
    run.stop()
    # While the connector is down: edits, then the platform trims its stream past them.
    generate(sim.store, 50, seed=10)
    victim = next(o for o in sim.store.objects() if o["type"] == "malware")
    sim.store.update(victim["id"], set={"description": "changed while down"})
    doomed = sorted(o["id"] for o in sim.store.objects() if o["type"] == "indicator")[0]
    sim.store.delete(doomed)
    generate(sim.store, 10, seed=11, mix="creates")
    sim.store.trim(5)
    run = ConnectorThread(env).start()

    def repaired() -> bool:
        # The reconciliation runs at a heartbeat after the repair's recovery is archived: a
        # stop as soon as the checkpoint reaches the last event could come before it.
        cp = CheckpointStore(storage).load()  # replaced atomically: always whole
        return caught_up(storage, sim.store.last_event_id) and bool(
            cp and cp.reconcile and not cp.reconcile.get("due")
        )

    wait_until(repaired, what="repair")
    run.stop()
    cp = CheckpointStore(storage).load()
    assert cp is not None and len(cp.retention_gaps) == 1
    assert cp.reconcile
    latest = {}
    for ev in archived_events(archive):
        latest[ev.internal_id or ev.stix_id] = ev
    changed = [ev for ev in latest.values() if ev.stix.get("description") == "changed while down"]
    assert changed, "the recover re-snapshot must bring back what changed in the lost window"
    # The delete in the lost window was reconciled: the archive's state equals the platform's.
    assert cp.reconcile["due"] is False and cp.reconcile["deleted"] >= 1
    state = materialise(storage, until=None, work_dir=tmp_path / "w")
    archived = {sid for _k, sid, _e, _d in state.objects()}
    tombstoned = {t.stix_id for t in state.tombstones()}
    state.close()
    assert archived == {o["id"] for o in sim.store.objects()}
    assert doomed in tombstoned and doomed not in archived


def test_retention_gap_on_a_stream_refusing_recovery(
    sim: SimServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No repair is possible (7.x ``no-recover``): the connector says that deletes of the lost
    window are missing, once, and goes on live; it never reads the empty listing as deletes."""
    generate(sim.store, 60, seed=9)
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    env = base_env(sim.url, TOKEN, archive)
    run = ConnectorThread(env).start()
    wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="first run")
    run.stop()
    generate(sim.store, 30, seed=10)
    sim.store.trim(5)
    sim.set_fault(no_recover=True)
    run = ConnectorThread(env).start()

    def settled() -> bool:
        cp = CheckpointStore(storage).load()
        return cp is not None and bool(cp.reconcile) and not cp.reconcile["due"]

    wait_until(settled, what="reconciliation given up")
    generate(sim.store, 5, seed=11, mix="creates")
    wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="live after it")
    run.stop()
    assert run.error is None
    cp = CheckpointStore(storage).load()
    assert cp is not None and "refuses recovery" in cp.reconcile["failed"]
    reconciled = [
        ev
        for ev in archived_events(archive)
        if (ev.envelope.get("origin") or {}).get("referer") == REFERER
    ]
    assert not reconciled
    impossible = [r for r in caplog.records if "reconciliation impossible" in r.message]
    assert len(impossible) == 1 and impossible[0].levelname == "ERROR"


@pytest.mark.parametrize(
    ("setup", "status", "reason"),
    [
        ("bad-token", 401, "You are not authenticated, please check your credentials"),
        ("stopped", 410, "This live stream is stopped"),
    ],
)
def test_permanent_http_errors_stop_with_the_reason(
    sim: SimServer, tmp_path: Path, setup: str, status: int, reason: str
) -> None:
    generate(sim.store, 5, seed=1)
    env = base_env(sim.url, TOKEN, str(tmp_path / "a"))
    if setup == "bad-token":
        env["OPENCTI_TOKEN"] = "wrong"
    else:
        sim.add_stream("stopped-stream", live=False)
        env["CONNECTOR_LIVE_STREAM_ID"] = "stopped-stream"
    run = ConnectorThread(env).start()
    run.join(30)
    assert isinstance(run.error, StreamGoneError)
    assert run.error.status == status and run.error.reason == reason


def test_a_refused_stream_exits_1_saying_why(sim: SimServer, tmp_path: Path) -> None:
    """`opencti-sync run` stopped by the platform's refusal exits 1 (its supervisor sees a
    failure, not a clean stop), the platform's reason on stderr."""
    env = {
        **base_env(sim.url, "wrong-token", str(tmp_path / "a")),
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-m", "connector", "run"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "stream refused" in done.stderr and "401" in done.stderr


def test_a_collection_stopped_mid_stream_stops_the_run_with_its_reason(
    sim: SimServer, tmp_path: Path
) -> None:
    """A collection stopped while the connector follows it: the platform ends the response
    cleanly (no error event) and answers the reconnection 410. The run stops on that answer,
    with what it received before checkpointed."""
    generate(sim.store, 5, seed=1)
    sim.add_stream("s1")
    archive = str(tmp_path / "a")
    env = base_env(sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_ID="s1")
    run = ConnectorThread(env).start()
    wait_until(lambda: caught_up(LocalStorage(archive), sim.store.last_event_id), what="backup")
    sim.add_stream("s1", live=False)
    run.join(30)
    assert isinstance(run.error, StreamGoneError)
    assert (run.error.status, run.error.reason) == (410, "This live stream is stopped")
    assert caught_up(LocalStorage(archive), sim.store.last_event_id)


def test_server_errors_are_retried(sim: SimServer, tmp_path: Path) -> None:
    generate(sim.store, 20, seed=2)
    sim.set_fault(fail_next={"status": 500, "count": 2})
    archive = str(tmp_path / "a")
    run = ConnectorThread(base_env(sim.url, TOKEN, archive)).start()
    wait_until(lambda: caught_up(LocalStorage(archive), sim.store.last_event_id), what="after 500s")
    sim.set_fault(fail_next={"status": 429, "count": 2})
    sim.drop_connections()
    generate(sim.store, 5, seed=3)
    wait_until(lambda: caught_up(LocalStorage(archive), sim.store.last_event_id), what="after 429s")
    run.stop()
    assert run.error is None


def test_malformed_events_are_quarantined_and_the_stream_goes_on(
    sim: SimServer, tmp_path: Path
) -> None:
    generate(sim.store, 10, seed=4)
    last = EventId.parse(sim.store.last_event_id)
    nxt = f"{last.ms + 1}"
    sim.store.append_raw(f"id: {nxt}-0\nevent: create\ndata: {{not json\n\n")
    sim.store.append_raw(f'id: {nxt}-1\nevent: teleport\ndata: {{"data":{{"id":"x--1"}}}}\n\n')
    sim.store.append_raw(f'id: {nxt}-2\nevent: update\ndata: {{"version":"4"}}\n\n')
    sim.store.append_raw('id: ../../etc-3\nevent: create\ndata: {"data":{"id":"a--b"}}\n\n')
    generate(sim.store, 10, seed=5)
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    env = base_env(
        sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE="1970-01-01T00:00:00.000Z"
    )
    run = ConnectorThread(env).start()
    wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="past the bad events")
    run.stop()
    records = [orjson.loads(storage.get(k)) for k in storage.list("quarantine/")]
    reasons = sorted(r["reason"] for r in records)
    assert len(records) == 4, reasons
    assert any("not valid JSON" in r for r in reasons)
    assert any("unknown event name" in r for r in reasons)
    assert any("no 'data'" in r for r in reasons)
    assert any("malformed event id" in r for r in reasons)
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.quarantined == 4
    # Nothing escaped the archive root.
    assert all(
        p.resolve().is_relative_to(Path(archive).resolve()) for p in Path(archive).rglob("*")
    )


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"ARCHIVE_MAX_EVENTS": "lots"}, "archive.max_events"),
        (
            {"CONNECTOR_LIVE_STREAM_START_TIMESTAMP": "1700000000"},
            "connector.live_stream_start_timestamp",
        ),
        ({"OPENCTI_SSL_VERIFY": "maybe"}, "opencti.ssl_verify"),
        ({"ARCHIVE_CODEC": "lz4"}, "archive.codec"),
        ({"OPENCTI_URL": ""}, "opencti.url"),
    ],
)
def test_invalid_config_exits_2_naming_the_key(
    tmp_path: Path, env: dict[str, str], key: str
) -> None:
    full = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "OPENCTI_URL": "http://127.0.0.1:9",
        "OPENCTI_TOKEN": "t",
        "ARCHIVE_URI": str(tmp_path / "a"),
    }
    full.update(env)
    proc = subprocess.run(
        [sys.executable, "-m", "connector", "run"],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert key in proc.stderr


def test_unreadable_config_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "config.yml"
    bad.write_text("archive: [unclosed\n")
    proc = subprocess.run(
        [sys.executable, "-m", "connector", "status", "--config", str(bad)],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--config" in proc.stderr


def test_status_json_reports_the_checkpoint(sim: SimServer, tmp_path: Path) -> None:
    generate(sim.store, 30, seed=6)
    archive = str(tmp_path / "a")
    run = ConnectorThread(base_env(sim.url, TOKEN, archive)).start()
    wait_until(lambda: caught_up(LocalStorage(archive), sim.store.last_event_id), what="catch-up")
    run.stop()
    proc = subprocess.run(
        [sys.executable, "-m", "connector", "status", "--archive", archive, "--json"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    info = orjson.loads(proc.stdout)
    assert info["events_archived"] == sum(
        m.manifest.event_count for m in ArchiveReader(LocalStorage(archive)).manifests()
    )
    assert EventId.parse(info["last_event_id"]) >= EventId.parse(sim.store.last_event_id)


def test_registers_on_the_source_platform_with_its_state(sim: SimServer, tmp_path: Path) -> None:
    generate(sim.store, 20, seed=12)
    archive = str(tmp_path / "a")
    run = ConnectorThread(base_env(sim.url, TOKEN, archive)).start()
    wait_until(lambda: caught_up(LocalStorage(archive), sim.store.last_event_id), what="catch-up")
    wait_until(
        lambda: bool(
            getattr(sim.store, "platform_state", None) and sim.store.platform_state.connectors
        ),
        what="registration",
    )
    run.stop()
    connectors = list(sim.store.platform_state.connectors.values())
    assert [c["connector_type"] for c in connectors] == ["STREAM"]
    cp = CheckpointStore(LocalStorage(archive)).load()

    # The final ping carries the checkpoint, so the platform's UI shows where the backup stands.
    def state() -> str:
        return str(next(iter(sim.store.platform_state.connectors.values())).get("connector_state"))

    wait_until(lambda: cp.last_event_id in state(), timeout=10, what=f"final ping ({state()})")


def test_registration_pings_and_a_refusal_is_one_warning(
    sim: SimServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Registration speaks GraphQL itself (pycti's import would slow the backup, see the module):
    it registers, pings the state, and a platform that refuses costs one warning, no secret."""
    cid = "5a3f6c39-3a5e-4c1e-9d2b-3d3f0b9c7a11"
    state = {"last_event_id": "1-0", "events_archived": 3}
    reg = SourceRegistration(
        url=sim.url, token=TOKEN, verify=True, connector_id=cid, name="sync", state=lambda: state
    ).start()
    wait_until(lambda: reg.pings >= 1, what="first ping")
    state = {"last_event_id": "9-0", "events_archived": 7}
    reg.stop()
    assert reg.registered and reg.pings == 2
    record = sim.store.platform_state.connectors[cid]
    assert record["connector_type"] == "STREAM" and record["name"] == "sync"
    assert orjson.loads(record["connector_state"]) == state  # the last ping, after the stop

    sim.store.api_token = "another-token"  # the stream still accepts ours, GraphQL does not
    caplog.set_level("WARNING", logger="connector.registration")
    # Only what the refused registration logs (the one above logged "Registered" at INFO,
    # captured when an earlier test left the connector's loggers at INFO).
    caplog.clear()
    refused = SourceRegistration(
        url=sim.url, token=TOKEN, verify=True, connector_id=cid, name="sync", state=lambda: state
    ).start()
    refused.stop(timeout=30)
    assert not refused.registered and refused.pings == 0
    warnings = [
        r
        for r in caplog.records
        if r.name == "connector.registration" and r.levelno >= logging.WARNING
    ]
    assert len(warnings) == 1 and "logged in" in str(warnings[0].__dict__.get("error"))
    assert TOKEN not in caplog.text


def test_registration_waits_for_a_platform_that_is_not_up_yet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A compose stack starts the connector before OpenCTI answers: registration retries (the
    backup does not wait for it) and succeeds once the platform is up."""
    monkeypatch.setattr(registration, "_RETRY_FIRST_SECS", 0.2)
    port = free_port()
    cid = "5a3f6c39-3a5e-4c1e-9d2b-3d3f0b9c7a12"
    reg = SourceRegistration(
        url=f"http://127.0.0.1:{port}",
        token=TOKEN,
        verify=True,
        connector_id=cid,
        name="sync",
        state=dict,
    ).start()
    time.sleep(0.5)
    with SimServer(token=TOKEN, port=port) as late:
        wait_until(lambda: reg.registered, what="registration once the platform is up")
        reg.stop()
        assert cid in late.store.platform_state.connectors  # type: ignore[attr-defined]


def test_registration_refuses_a_non_graphql_error_and_outlives_a_failed_ping(
    sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Best effort both ways: an error page without GraphQL errors (a proxy's 403) is a
    refusal, not a registration; a ping the network loses is one warning, and the pings go on."""
    monkeypatch.setattr(registration, "PING_EVERY_SECS", 0.05)
    cid = "5a3f6c39-3a5e-4c1e-9d2b-3d3f0b9c7a13"
    with FaultProxy(sim.url) as proxy:

        def registering() -> SourceRegistration:
            return SourceRegistration(
                url=proxy.url, token=TOKEN, verify=True, connector_id=cid, name="sync", state=dict
            ).start()

        proxy.fail_next(1, "403", method="POST", path="/graphql")
        refused = registering()
        refused.stop(timeout=30)
        assert not refused.registered and refused.pings == 0
        assert proxy.stats["403"] == 1

        reg = registering()
        wait_until(lambda: reg.pings >= 1, what="first ping")
        proxy.fail_next(1, "reset", method="POST", path="/graphql")
        wait_until(lambda: proxy.stats["reset"] == 1, what="a ping lost")
        pings = reg.pings
        wait_until(lambda: reg.pings > pings, timeout=15, what="the pings after a lost one")
        reg.stop()
        assert reg.registered


class _EchoesTheToken(BaseHTTPRequestHandler):
    """A GraphQL endpoint that refuses with a message quoting the token it was sent."""

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        body = orjson.dumps({"errors": [{"message": f"Token {token} is not valid"}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


def test_registration_never_logs_the_token_a_refusal_quotes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The platform's error can name what it was sent: the warning keeps its words, not the
    token."""
    caplog.set_level("WARNING", logger="connector.registration")
    with serving(_EchoesTheToken) as url:
        reg = SourceRegistration(
            url=url, token=TOKEN, verify=True, connector_id="c", name="sync", state=dict
        ).start()
        reg.stop(timeout=30)
    assert not reg.registered
    (warning,) = [r for r in caplog.records if r.name == "connector.registration"]
    assert warning.__dict__["error"] == "Token <redacted> is not valid"
    assert TOKEN not in caplog.text


def test_a_stop_ends_registration_while_the_platform_is_not_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run stops before the platform ever answered: the retries end with it, instead of
    going on asking (without a pause once the stop is set) for the rest of the process."""
    monkeypatch.setattr(registration, "_RETRY_FIRST_SECS", 0.05)
    port = free_port()
    reg = SourceRegistration(
        url=f"http://127.0.0.1:{port}",
        token=TOKEN,
        verify=True,
        connector_id="5a3f6c39-3a5e-4c1e-9d2b-3d3f0b9c7a14",
        name="sync",
        state=dict,
    ).start()
    reg.stop(timeout=30)
    assert reg._thread is not None and not reg._thread.is_alive()
    assert not reg.registered


def test_no_recover_is_remembered_and_consumer_metrics_advance(
    sim: SimServer, tmp_path: Path
) -> None:
    """7.x control events: ``no-recover`` (carry on live, never ask again) and
    ``consumer_metrics`` (a position, like a heartbeat)."""
    generate(sim.store, 20, seed=13)
    sim.set_fault(no_recover=True, consumer_metrics=True)
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    run = ConnectorThread(base_env(sim.url, TOKEN, archive)).start()
    generate(sim.store, 5, seed=14)
    wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="live events")
    run.stop()
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.recover_refused is True and cp.recover_until is None
    live = [ev for ev in archived_events(archive) if not ev.synthetic]
    assert len(live) >= 5 and run.error is None
    # A restart does not ask for recovery again.
    sim.set_fault(no_recover=None, consumer_metrics=None)
    run = ConnectorThread(base_env(sim.url, TOKEN, archive)).start()
    generate(sim.store, 3, seed=15)
    wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="after restart")
    run.stop()
    assert not [ev for ev in archived_events(archive) if ev.referer == "init-create"]


def test_a_refused_recovery_is_not_asked_again_on_reconnecting() -> None:
    """Once the platform said ``no-recover``, the next connections carry on live: asking again
    held the live events below the recover date back as a recovery's, each time."""
    source = SseSource(
        SourceConfig(url="http://127.0.0.1:9", token=TOKEN),
        resume=EventId(1_000, 0),
        recover_until="2027-01-15T08:00:00.000Z",
    )
    assert source.request_params()["recover"] == "2027-01-15T08:00:00.000Z"
    out: list[Item] = []
    source._handle("no-recover", "1000-0", b'{"message":"Recovery is not available"}', out)
    assert out == [ControlEvent("no-recover", EventId(1_000, 0))]
    assert "recover" not in source.request_params()


def test_a_reader_stalled_past_a_trim_reconnects_and_sees_the_gap(sim: SimServer) -> None:
    """The pipeline stops taking events (a slow sink: the queue is full) for longer than the read
    timeout while the platform trims its stream past the reader's position. The platform's
    reader waited on us, and would go on from its oldest entry without a word; the source
    reconnects instead, and the connect-time check reports the gap."""
    generate(sim.store, 30, seed=3, mix="creates")
    config = SourceConfig(
        url=sim.url, token=TOKEN, read_timeout=1.0, backoff_initial=0.05, backoff_max=0.2
    )
    source = SseSource(replace(config, queue_size=1), resume=None, recover_until=None).start()
    try:
        first: list[object] = []
        wait_until(lambda: bool(first.extend(source.queue.get(timeout=5)) or first), what="read")
        time.sleep(0.5)  # the queue fills again: the reader blocks on it
        generate(sim.store, 50, seed=4, mix="creates")
        sim.store.trim(5)
        time.sleep(1.5)  # longer than the read timeout, without taking anything
        seen: list[object] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(isinstance(i, GapDetected) for i in seen):
            try:
                seen.extend(source.queue.get(timeout=0.5))
            except queue.Empty:
                pass
        assert any(isinstance(i, GapDetected) for i in seen), "the trim went unnoticed"
    finally:
        source.close()


@pytest.mark.parametrize("mode", ["repair", "fail"])
def test_a_reader_the_trim_overtakes_mid_connection_finds_the_gap(
    sim: SimServer, mode: str
) -> None:
    """A reader slower than the platform writes (a slow target), never held up long enough to
    reconnect: the platform trims its stream past the reader's position while the connection
    stays open, and its reader goes on from the oldest entry without a word. The retention
    check (a short second connection's ``connected``) finds the oldest retained event past the
    position of the check before: a gap, handled as ``retention_gap`` says."""
    generate(sim.store, 30, seed=3, mix="creates")
    config = SourceConfig(
        url=sim.url,
        token=TOKEN,
        retention_check=0.2,
        retention_gap=mode,
        backoff_initial=0.05,
        backoff_max=0.2,
        queue_size=1,
    )
    resume = EventId.parse(sim.store.first_event_id or "")
    source = SseSource(config, resume=resume, resume_data=resume).start()
    try:
        first: list[object] = []
        wait_until(lambda: bool(first.extend(source.queue.get(timeout=5)) or first), what="read")
        time.sleep(0.5)  # the queue fills again: the reader waits on it (within its timeout)
        generate(sim.store, 50, seed=4, mix="creates")
        sim.store.trim(5)
        seen = _items_until(source, lambda s: any(isinstance(i, GapDetected) for i in s), "a gap")
    finally:
        source.close()
    gap = next(i for i in seen if isinstance(i, GapDetected))
    assert gap.in_connection and resume <= gap.position < gap.first_event_id
    assert gap.first_event_id == EventId.parse(sim.store.first_event_id or "")
    assert (gap.repair_recover_until is None) == (mode == "fail")
    # The repair resumes from the position then, at or past the last look's.
    assert (gap.repair_from is None) if mode == "fail" else (gap.repair_from >= gap.position)


def _complete_at(items: list[Item], position: EventId) -> bool:
    return any(isinstance(i, Complete) and i.id >= position for i in items)


def test_the_retention_check_is_quiet_while_the_reader_keeps_up(sim: SimServer) -> None:
    """Trimmed only below what the reader already had at the check before (the stream keeps
    more than the platform writes between two checks), nothing can be lost: no gap, however
    often the check looks. (A floor left at the connection's start would see one.)"""
    generate(sim.store, 10, seed=3, mix="creates")
    checks: list[str] = []

    def client() -> httpx.Client:
        def count(request: httpx.Request) -> None:
            if "from" not in request.url.params:
                checks.append(str(request.url))  # a retention check's connection

        return httpx.Client(timeout=httpx.Timeout(10.0), event_hooks={"request": [count]})

    config = SourceConfig(url=sim.url, token=TOKEN, retention_check=0.1)
    resume = EventId.parse(sim.store.first_event_id or "")
    source = SseSource(config, resume=resume, resume_data=resume, client_factory=client).start()
    seen: list[Item] = []
    try:
        for seed in range(20):
            generate(sim.store, 5, seed=10 + seed, mix="creates")
            last = EventId.parse(sim.store.last_event_id or "")
            seen += _items_until(source, lambda s, n=last: _complete_at(s, n), "the events")
            time.sleep(0.05)
            sim.store.trim(25)  # five rounds: past the connection's start, not the last check
    finally:
        source.close()
    assert len(checks) >= 5, checks
    assert not any(isinstance(i, (GapDetected, Disconnected)) for i in seen), seen


def test_a_refused_retention_check_is_said_once_and_the_stream_read_on(
    sim: SimServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The check's extra connection refused (a proxy allowing one connection per client, a
    platform busy): said once in the log, the stream read on, no gap made up; the checks
    after it work again."""
    generate(sim.store, 10, seed=3, mix="creates")
    config = SourceConfig(url=sim.url, token=TOKEN, retention_check=0.1)
    resume = EventId.parse(sim.store.first_event_id or "")
    source = SseSource(config, resume=resume, resume_data=resume).start()
    seen: list[Item] = []
    try:
        last = EventId.parse(sim.store.last_event_id or "")
        seen += _items_until(source, lambda s: _complete_at(s, last), "the first events")
        sim.set_fault(fail_next={"status": 503, "count": 3})  # the main connection is up
        for seed in range(30):
            generate(sim.store, 2, seed=100 + seed, mix="creates")
            last = EventId.parse(sim.store.last_event_id or "")
            seen += _items_until(source, lambda s, n=last: _complete_at(s, n), "the events")
            time.sleep(0.05)
        taken = sim._take_fail() is None  # every refusal went to a check
    finally:
        source.close()
    said = [r for r in caplog.records if r.getMessage() == "Stream retention check failed."]
    assert taken and len(said) == 1 and "503" in str(said[0].__dict__.get("error"))
    assert not any(isinstance(i, (GapDetected, Disconnected)) for i in seen), seen
    assert any(isinstance(i, RetainedThrough) and i.id > resume for i in seen)


def test_the_last_look_at_the_retention_is_kept_for_the_next_run(
    sim: SimServer, tmp_path: Path
) -> None:
    """A run stops with events received since its last look at the stream's retention (looks
    come once a minute by default). The next run's first look compares with that look's
    position, kept in the checkpoint: a trim past it may have passed the platform's reader
    before the stop, so it is a gap, even though the checkpoint itself is still retained."""
    generate(sim.store, 20, seed=1, mix="creates")
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    env = base_env(sim.url, TOKEN, archive)
    run = ConnectorThread(env).start()
    wait_until(lambda: caught_up(storage, sim.store.last_event_id or "0-0"), what="first run")
    generate(sim.store, 20, seed=2, mix="creates")  # after its only look, on connecting
    wait_until(lambda: caught_up(storage, sim.store.last_event_id or "0-0"), what="live part")
    run.stop()
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.retained_through and cp.last_event_id
    looked, position = EventId.parse(cp.retained_through), EventId.parse(cp.last_event_id)
    assert looked < position
    sim.store.trim(5)  # past the last look's position, not the checkpoint's
    assert looked < EventId.parse(sim.store.first_event_id or "") <= position
    run = ConnectorThread(env).start()
    wait_until(lambda: bool(load_gaps(storage)), what="the gap")
    run.stop()
    (gap,) = load_gaps(storage)
    assert gap["in_connection"] is True and gap["checkpoint_event_id"] == str(looked)


def load_gaps(storage: LocalStorage) -> list[dict[str, Any]]:
    cp = CheckpointStore(storage).load()
    return cp.retention_gaps if cp is not None else []


def test_a_first_run_whose_recover_date_left_the_retention_recovers_as_of_now(
    sim: SimServer, tmp_path: Path
) -> None:
    """A first run refused (a wrong token) keeps its recover date in the checkpoint; started
    again once the platform's retention has passed that date, its live part would start at a
    date the stream no longer holds, and what changed between it and the oldest retained event
    was never archived, with no gap said. Nothing was durable yet: it recovers as of now."""
    generate(sim.store, 10, seed=1, mix="creates")
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)
    refused = ConnectorThread(base_env(sim.url, "wrong-token", archive)).start()
    refused.join(30)
    assert not refused.alive
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.recover_until and not cp.last_event_id
    old_date = cp.recover_until
    time.sleep(0.05)
    generate(sim.store, 30, seed=2, mix="creates")  # weeks of work later...
    sim.store.trim(5)  # ...and the stream's retention passed the recover date
    run = ConnectorThread(base_env(sim.url, TOKEN, archive)).start()
    wait_until(lambda: caught_up(storage, sim.store.last_event_id or "0-0"), what="backup")
    run.stop()
    assert run.error is None
    archived = {ev.stix_id for ev in archived_events(archive)}
    missing = sorted({o["id"] for o in sim.store.objects()} - archived)
    assert not missing, f"{len(missing)} live objects never archived: {missing[:3]}"
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.first_recover_until and cp.first_recover_until > old_date
    assert cp.retention_gaps == []  # nothing was lost: not a gap


def test_the_first_event_of_a_collection_below_an_idle_heartbeat_is_archived(
    sim: SimServer, tmp_path: Path
) -> None:
    """A new collection nothing matches yet: its recovery sends nothing and the connector
    follows idle heartbeats, no data group archived. With the platform node's clock ahead of
    Redis's, the first matching object's event sorts below the heartbeat already received: it
    was quarantined as "going backwards", never archived (a later data group was handled)."""
    keep = {
        "mode": "and",
        "filterGroups": [],
        "filters": [{"key": ["objectLabel"], "values": ["keep"], "operator": "eq", "mode": "or"}],
    }
    generate(sim.store, 10, seed=3, mix="creates")  # nothing labelled "keep"
    sim.add_stream("keep", filters=keep)
    sim.set_fault(heartbeat_ahead_ms=2_000)
    archive = str(tmp_path / "a")
    storage = LocalStorage(archive)

    def position() -> EventId:
        cp = CheckpointStore(storage).load()
        return EventId.parse(cp.last_event_id) if cp and cp.last_event_id else EventId(0, 0)

    run = ConnectorThread(base_env(sim.url, TOKEN, archive, CONNECTOR_LIVE_STREAM_ID="keep"))
    run.start()
    try:
        wait_until(lambda: position().ms > sim.store.now_ms() + 1_000, what="a heartbeat ahead")
        malware = "malware--00000000-0000-4000-8000-0000000000e1"
        event_id = sim.store.create(
            {"type": "malware", "id": malware, "name": "m", "labels": ["keep"], "is_family": True}
        )
        assert event_id is not None and EventId.parse(event_id) <= position()
        wait_until(
            lambda: malware in {e.stix_id for e in archived_events(archive)},
            timeout=15,
            what="the collection's first object archived",
        )
    finally:
        run.stop()
    assert run.error is None
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.quarantined == 0


def test_a_first_run_on_a_clock_ahead_of_the_platforms_loses_nothing(tmp_path: Path) -> None:
    """The first recovery's date came from this machine's clock; the platform reads it against
    its own: the snapshot holds what was updated up to it, the live part starts after it. With
    this clock 3 s ahead, what the platform wrote in those seconds after the connection was in
    neither part (7 of 10 objects quarantined as going backwards). The date is now taken no
    later than the platform's own (its answer's Date header)."""
    skew_ms = 3_000
    store = SimStore(clock=lambda: time.time_ns() // 1_000_000 - skew_ms)
    with SimServer(token=TOKEN, heartbeat_secs=0.2, store=store) as sim:
        generate(sim.store, 10, seed=7, mix="creates")
        archive = str(tmp_path / "a")
        storage = LocalStorage(archive)
        run = ConnectorThread(base_env(sim.url, TOKEN, archive)).start()
        try:
            wait_until(
                lambda: (CheckpointStore(storage).load() or Checkpoint("", "")).last_event_id,
                what="the first run connected",
            )
            created = []
            for n in range(10):  # the platform keeps working meanwhile
                created.append(f"malware--00000000-0000-4000-8000-0000000001{n:02d}")
                sim.store.create(
                    {"type": "malware", "id": created[-1], "name": f"m{n}", "is_family": True}
                )
                time.sleep(0.4)
            wait_until(
                lambda: set(created) <= {e.stix_id for e in archived_events(archive)},
                timeout=20,
                what="every object created after the first connection archived",
            )
        finally:
            run.stop()
        cp = CheckpointStore(storage).load()
        assert cp is not None and cp.quarantined == 0
        assert cp.first_recover_until is not None
        assert iso_to_ms(cp.first_recover_until) <= sim.store.now_ms()


def test_what_a_killed_checkpoint_save_left_apart_from_the_archive_is_removed(
    sim: SimServer, tmp_path: Path
) -> None:
    """The checkpoint kept apart (CHECKPOINT_URI): a run killed while saving it left a
    temporary file there, and nothing ever removed it (only the archive's are, at start)."""
    from connector.storage.local import _TMP, _TMP_STALE_SECS

    generate(sim.store, 5, seed=4, mix="creates")
    kept = tmp_path / "cp"
    kept.mkdir()
    left = kept / f"{_TMP}checkpoint.json.dead"
    left.write_bytes(b"{")
    old = time.time() - _TMP_STALE_SECS - 60
    os.utime(left, (old, old))
    archive = str(tmp_path / "a")
    run = ConnectorThread(base_env(sim.url, TOKEN, archive, CHECKPOINT_URI=str(kept))).start()
    try:
        wait_until(
            lambda: caught_up(LocalStorage(kept), sim.store.last_event_id or "0-0"),
            what="the backup",
        )
    finally:
        run.stop()
    assert run.error is None
    assert not left.exists()


# ---------------------------------------------------------------------- reconnects
def _items_until(source: SseSource, done: Callable[[list[Item]], bool], what: str) -> list[Item]:
    """The source's items, taken as the pipeline takes them, until ``done`` says enough."""
    seen: list[Item] = []
    deadline = time.monotonic() + 20
    while not done(seen):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        try:
            seen.extend(source.queue.get(timeout=0.2))
        except queue.Empty:
            pass
    return seen


def _until_cut(source: SseSource) -> list[Item]:
    """The source started: its items until its first cut (a ``Disconnected``), then closed."""
    try:
        return _items_until(
            source.start(), lambda s: any(isinstance(i, Disconnected) for i in s), "a cut"
        )
    finally:
        source.close()


class _Bounds:
    """The source's ``random``: records each backoff's upper bound, and waits that long (the
    longest the full jitter can draw)."""

    def __init__(self) -> None:
        self.highs: list[float] = []

    def uniform(self, low: float, high: float) -> float:
        self.highs.append(high)
        return high


def test_the_reconnect_backoff_grows_is_capped_and_starts_again_after_a_delivery(
    sim: SimServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused connections wait up to initial * 2^(attempt-1), at most the cap; a connection
    that delivered (moving the position) and then dropped is followed at once, and the failures
    after it start from the initial."""
    generate(sim.store, 3, seed=16, mix="creates")
    bounds = _Bounds()
    monkeypatch.setattr(source_module, "random", bounds)
    sim.set_fault(fail_next={"status": 503, "count": 6})
    config = SourceConfig(url=sim.url, token=TOKEN, backoff_initial=0.01, backoff_max=0.04)
    source = SseSource(config, resume=None, recover_until=None).start()
    try:
        _items_until(source, lambda s: any(isinstance(i, StreamEvent) for i in s), "events")
        assert bounds.highs == pytest.approx([0.01, 0.02, 0.04, 0.04, 0.04, 0.04])
        sim.set_fault(fail_next={"status": 503, "count": 2})
        sim.drop_connections()
        generate(sim.store, 1, seed=17, mix="creates")
        last = sim.store.last_event_id
        after = _items_until(
            source,
            lambda s: any(isinstance(i, StreamEvent) and i.id_text == last for i in s),
            "the event after the drop",
        )
    finally:
        source.close()
    assert bounds.highs == pytest.approx([0.01, 0.02, 0.04, 0.04, 0.04, 0.04, 0.01, 0.02])
    # Each reconnect started at the position: nothing before it came again.
    assert [i.id_text for i in after if isinstance(i, StreamEvent)] == [last]
    assert not [i for i in after if isinstance(i, Quarantined)]


class _Fixed(BaseHTTPRequestHandler):
    """Answers every GET 200 with ``body()`` as ``content_type``, and records its path."""

    content_type = "text/event-stream"
    requests: list[str] = []

    def body(self) -> bytes:
        raise NotImplementedError

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        return

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        type(self).requests.append(self.path)
        body = self.body()
        self.send_response(200)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def _serving(handler: type[_Fixed]) -> Iterator[str]:
    """``handler`` served on 127.0.0.1 (its requests cleared): yields its URL."""
    handler.requests = []
    with serving(handler) as url:
        yield url


class _CutInsideAGroup(_Fixed):
    """A stream cut each time inside the same group (a proxy's byte limit under a large
    dependency group): two of the group's dependencies, sharing its id, then the end (before
    the trigger that completes it), on every connection."""

    def body(self) -> bytes:
        group = at(1)
        return b"".join(
            b"id: %s\nevent: create\ndata: %s\n\n" % (str(group).encode(), ev.data)
            for ev in (malware(group, n, referer="init-dependencies") for n in (1, 2))
        )


def _four_cuts(
    handler: type[_Fixed], monkeypatch: pytest.MonkeyPatch, **start: Any
) -> tuple[list[Item], _Bounds]:
    """A source (``start``: where it resumes) reading ``handler`` until four connections have
    ended: what it gave, and each backoff's upper bound (initial 0.01 s, cap 0.04 s)."""
    bounds = _Bounds()
    monkeypatch.setattr(source_module, "random", bounds)
    with _serving(handler) as url:
        config = SourceConfig(url=url, token=TOKEN, backoff_initial=0.01, backoff_max=0.04)
        source = SseSource(config, **start).start()
        try:
            seen = _items_until(
                source, lambda s: sum(isinstance(i, Disconnected) for i in s) >= 4, "four cuts"
            )
        finally:
            source.close()
    return seen, bounds


def test_connections_cut_inside_one_group_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection delivers, but none completes a group: the position never moves, so the
    backoff grows as after refusals. Followed at once because it delivered, such a stream was
    asked again without a pause, forever, each time re-sending the whole group."""
    seen, bounds = _four_cuts(_CutInsideAGroup, monkeypatch, resume=at(0), resume_data=at(0))
    assert len([i for i in seen if isinstance(i, StreamEvent)]) >= 8, "each connection delivered"
    assert not [i for i in seen if isinstance(i, Complete)]
    assert bounds.highs[:3] == pytest.approx([0.01, 0.02, 0.04])
    # Every connection asked for the same position, the one before the group.
    assert len(set(_CutInsideAGroup.requests)) == 1
    assert f"from={at(0)}" in _CutInsideAGroup.requests[0]


class _CutAfterAHeartbeat(_Fixed):
    """An idle stream whose every connection is cut (a proxy's connection lifetime) after one
    heartbeat: nothing new to send, but the heartbeat's id, the platform's clock, is new."""

    def body(self) -> bytes:
        now = time.time_ns() // 1_000_000
        return b"id: %d-0\nevent: heartbeat\ndata: %d\n\n" % (now, now)


def test_an_idle_stream_cut_after_a_heartbeat_is_asked_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The heartbeat moves the position, so the cut is followed at once, every time: an idle
    platform behind a proxy that ends long connections is not read with growing pauses."""
    seen, bounds = _four_cuts(_CutAfterAHeartbeat, monkeypatch, resume=None, recover_until=None)
    assert len([i for i in seen if isinstance(i, Complete)]) >= 4, "each heartbeat moved it"
    assert bounds.highs == [], "no pause before any reconnect"


class _Refused(_Fixed):
    """A proxy in front of the platform refusing the stream, or a base URL with a wrong path:
    an empty answer of ``status`` (the platform itself answers 401 or 410, never these)."""

    status = 403

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        type(self).requests.append(self.path)
        self.send_response(self.status, "Refused by the proxy")
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.mark.parametrize("status", [403, 404])
def test_a_proxys_403_or_404_stops_the_source_with_its_status(status: int) -> None:
    """Asking again changes nothing: the source stops on the first answer, with its status and
    reason. Retried, the run waited for ever, saying only that it was reconnecting."""
    handler = type("_RefusedAs", (_Refused,), {"status": status})
    with _serving(handler) as url:
        config = SourceConfig(url=url, token=TOKEN, backoff_initial=0.01, backoff_max=0.04)
        source = SseSource(config, resume=None, recover_until=None).start()
        try:
            seen = _items_until(
                source, lambda s: any(isinstance(i, (Fatal, Disconnected)) for i in s), "an end"
            )
        finally:
            source.close()
    first = next(i for i in seen if isinstance(i, (Fatal, Disconnected)))
    assert isinstance(first, Fatal) and isinstance(first.error, StreamGoneError), first
    assert (first.error.status, first.error.reason) == (status, "Refused by the proxy")
    assert len(handler.requests) == 1


class _TrimmedPastThePosition(_Fixed):
    """A platform whose oldest retained event is past the position asked for (``connected``
    says so), then the end of the connection."""

    def body(self) -> bytes:
        info = {"firstEventId": str(at(10)), "lastEventId": str(at(20))}
        return b"event: connected\ndata: %s\n\n" % orjson.dumps(info)


def test_retention_gap_fail_records_the_gap_and_stops() -> None:
    """``connector.retention_gap=fail``: the gap is reported (the pipeline records it in the
    checkpoint) and the source stops, saying how to repair, instead of re-snapshotting."""
    with _serving(_TrimmedPastThePosition) as url:
        config = SourceConfig(url=url, token=TOKEN, retention_gap="fail", backoff_initial=0.01)
        source = SseSource(config, resume=at(0), resume_data=at(0)).start()
        try:
            seen = _items_until(
                source, lambda s: any(isinstance(i, (Fatal, Disconnected)) for i in s), "an end"
            )
        finally:
            source.close()
    gap, stop = seen
    assert gap == GapDetected(at(0), at(10), None)
    assert isinstance(stop, Fatal) and isinstance(stop.error, StreamGoneError)
    assert "set connector.retention_gap=repair" in str(stop.error)
    assert len(_TrimmedPastThePosition.requests) == 1


class _RecoveryCutAtThePosition(_Fixed):
    """A recovery resumed at our position (``at(1)``), cut each time after it re-sent there a
    dependency (the platform's cache is per connection); from the fourth connection on, a live
    event past the recover date follows it."""

    def body(self) -> bytes:
        frames = [(at(1), malware(at(1), 1, referer="init-dependencies"))]
        if len(self.requests) >= 4:
            frames.append((at(6), malware(at(6), 2)))
        return b"".join(
            b"id: %s\nevent: create\ndata: %s\n\n" % (str(i).encode(), ev.data) for i, ev in frames
        )


def test_dependencies_carried_at_the_position_are_not_carried_again_after_a_cut() -> None:
    """A dependency re-sent at the position waits for the next group; the connection cut
    before it, the next one re-sends it. Kept across the cut, it went out once per connection
    (and a stream cut there again and again grew the reader's memory without bound)."""
    with _serving(_RecoveryCutAtThePosition) as url:
        config = SourceConfig(url=url, token=TOKEN, backoff_initial=0.01, backoff_max=0.04)
        source = SseSource(
            config,
            resume=at(1),
            resume_data=at(1),
            recover_until=source_module._iso(at(5).ms),
        ).start()
        try:
            seen = _items_until(source, lambda s: Complete(at(6)) in s, "the live event")
        finally:
            source.close()
    assert len(_RecoveryCutAtThePosition.requests) >= 4
    events = [(i.id, i.stix_id) for i in seen if isinstance(i, StreamEvent)]
    assert events == [(at(6), malware(at(1), 1).stix_id), (at(6), malware(at(6), 2).stix_id)]


class _BehindAndTrimmed(_Fixed):
    """A platform whose clock runs an hour behind this machine's (its answers' Date), and whose
    oldest retained event is a minute before that date."""

    now_ms = 0

    def date_time_string(self, timestamp: float | None = None) -> str:
        return email.utils.formatdate(self.now_ms / 1000, usegmt=True)

    def body(self) -> bytes:
        info = {"firstEventId": f"{self.now_ms - 60_000}-0", "lastEventId": f"{self.now_ms}-0"}
        return b"event: connected\ndata: %s\n\n" % orjson.dumps(info)


def test_a_first_recovery_older_than_the_retention_moves_to_the_platforms_date_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A first run's recover date the stream no longer holds is moved to the platform's date
    (its answer's Date: the platform reads it against its own clock), and the connection that
    asks for it is made at once: only the connections after it back off."""
    platform_ms = (time.time_ns() // 1_000_000 // 1000 - 3600) * 1000
    _BehindAndTrimmed.now_ms = platform_ms
    drawn_after: list[int] = []  # the connections made when each backoff was drawn

    class _Random:
        def uniform(self, low: float, high: float) -> float:
            drawn_after.append(len(_BehindAndTrimmed.requests))
            return high

    monkeypatch.setattr(source_module, "random", _Random())
    with _serving(_BehindAndTrimmed) as url:
        config = SourceConfig(url=url, token=TOKEN, backoff_initial=0.01, backoff_max=0.04)
        old = source_module._iso(platform_ms - 120_000)
        source = SseSource(config, resume=None, recover_until=old).start()
        try:
            seen = _items_until(
                source, lambda s: sum(isinstance(i, Disconnected) for i in s) >= 3, "three ends"
            )
        finally:
            source.close()
    (moved,) = [i for i in seen if isinstance(i, RecoverMoved)]
    assert iso_to_ms(moved.recover_until) == platform_ms
    asked = [parse_qs(urlsplit(path).query)["recover"] for path in _BehindAndTrimmed.requests]
    assert asked[:2] == [[old], [moved.recover_until]]
    assert drawn_after[0] == 2, "the reconnection the source asked for waited a backoff"


class _NoRecover(_Fixed):
    """A platform refusing recovery (7.x ``no-recover``, at the position asked for), then its
    log from there: two live events below the recover date asked for, and the end."""

    def body(self) -> bytes:
        refusal = b'{"message":"Recovery is not available for this stream"}'
        frames = [b"id: %s\nevent: no-recover\ndata: %s\n\n" % (str(at(0)).encode(), refusal)]
        for n in (1, 2):
            frames.append(
                b"id: %s\nevent: create\ndata: %s\n\n"
                % (str(at(n)).encode(), malware(at(n), n).data)
            )
        return b"".join(frames)


def test_a_refused_recovery_holds_nothing_back() -> None:
    """After ``no-recover`` the log is read live: each event goes on with its position as it
    comes, though below the recover date. Held as a recovery's, nothing went on before an id
    past that date (on a quiet platform, the next idle heartbeat), and a cut lost it all."""
    with _serving(_NoRecover) as url:
        config = SourceConfig(url=url, token=TOKEN, backoff_initial=0.01, backoff_max=0.04)
        source = SseSource(
            config, resume=at(0), resume_data=at(0), recover_until=source_module._iso(at(5).ms)
        )
        seen = _until_cut(source)
    cut = next(i for i in seen if isinstance(i, Disconnected))
    assert cut.resume == at(2)
    before = seen[: seen.index(cut)]
    assert [i.id for i in before if isinstance(i, StreamEvent)] == [at(1), at(2)]
    assert Complete(at(2)) in before


class _LoginPage(_Fixed):
    """A proxy's sign-in page where the stream should be: 200, but HTML."""

    content_type = "text/html"

    def body(self) -> bytes:
        return b"<html><body>Sign in to continue</body></html>"


def test_a_page_that_is_not_an_event_stream_is_said_as_such() -> None:
    """Read as a stream, the page gave no message and an end: "stream ended (EOF)" said
    nothing of the proxy in the way."""
    with _serving(_LoginPage) as url:
        source = SseSource(
            SourceConfig(url=url, token=TOKEN, backoff_initial=0.05, backoff_max=0.2),
            resume=None,
            recover_until=None,
        )
        seen = _until_cut(source)
    first = next(i for i in seen if isinstance(i, Disconnected))
    assert "expected text/event-stream, got 'text/html'" in first.reason
    assert not [i for i in seen if isinstance(i, (StreamEvent, Complete))]


def test_a_stream_that_talks_is_kept_and_a_silent_one_is_left(sim: SimServer) -> None:
    """Heartbeats (every 0.2 s) keep a connection however much longer than the read timeout it
    lasts; one that says nothing for the read timeout is left, and the stream read again."""
    generate(sim.store, 3, seed=18, mix="creates")
    config = SourceConfig(
        url=sim.url, token=TOKEN, read_timeout=2.0, backoff_initial=0.05, backoff_max=0.2
    )
    source = SseSource(config, resume=None, recover_until=None).start()
    try:
        until = time.monotonic() + 4.5  # over twice the read timeout
        seen = _items_until(source, lambda _: time.monotonic() > until, "heartbeats")
        assert not [i for i in seen if isinstance(i, Disconnected)]
        assert sum(isinstance(i, Complete) for i in seen) > 5  # the heartbeats meanwhile
        sim.set_fault(stall_secs=30, stall_after_events=1)  # the next connection's
        sim.drop_connections()
        generate(sim.store, 1, seed=19, mix="creates")
        _items_until(
            source,
            lambda s: any(
                isinstance(i, Disconnected) and i.reason.startswith("silent stream") for i in s
            ),
            "the silent stream left",
        )
    finally:
        source.close()


def test_a_first_recovery_moved_out_of_the_trim_is_no_gap_at_the_next_look() -> None:
    """A first recovery's date is the position a look compares with; the stream trims past it
    before anything is complete (a recovery longer than the retention): the recovery moves to
    now, nothing durable is lost, and the next connection's look is no gap either."""
    day = 1_800_000_000_000
    config = SourceConfig(url="http://x", token=TOKEN)
    source = SseSource(config, resume=None, recover_until=source_module._iso(day))

    def connected(first_ms: int) -> list[Item]:
        out: list[Item] = []
        info = orjson.dumps({"firstEventId": f"{first_ms}-0"})
        with contextlib.suppress(source_module._Reconnect):
            source._handle("connected", "", info, out)
        return out

    assert connected(day - 1_000) == [RetainedThrough(EventId(day, 0))]
    moved = connected(day + 1_000)
    assert [type(i) for i in moved] == [RecoverMoved, RetainedThrough]
    assert not any(isinstance(i, GapDetected) for i in connected(day + 1_000))


def test_a_first_recovery_moved_goes_no_earlier_than_the_oldest_retained_event() -> None:
    """The platform's Date has whole seconds: a stream trimmed within one second (a busy
    platform keeping few events) holds nothing from the start of that second, and a recovery
    moved to the Date alone would be out of the stream again at once, connection after
    connection. It moves past the oldest retained event when that is later."""
    second = 1_800_000_000_000
    config = SourceConfig(url="http://x", token=TOKEN)
    source = SseSource(config, resume=None, recover_until=source_module._iso(second - 5_000))
    source._platform_ms = second  # "Date:" of the answer, whole seconds
    out: list[Item] = []
    info = orjson.dumps({"firstEventId": f"{second + 420}-3"})
    with pytest.raises(source_module._Reconnect):
        source._handle("connected", "", info, out)
    (moved,) = [i for i in out if isinstance(i, RecoverMoved)]
    assert iso_to_ms(moved.recover_until) == second + 421
    out = []
    source._handle("connected", "", info, out)  # the next connection's: no move again
    assert not any(isinstance(i, (RecoverMoved, GapDetected)) for i in out), out


def test_a_gap_found_at_a_look_resumes_from_the_position_then() -> None:
    """A look on connecting finds the oldest retained event past the last look's position: the
    gap spans from that position, and the repair resumes from the connection's (everything up
    to it was received), which verify needs to know."""
    config = SourceConfig(url="http://x", token=TOKEN)
    looked, position = EventId(1_700_000_000_000, 0), EventId(1_700_000_005_000, 2)
    source = SseSource(config, resume=position, resume_data=position, retained_through=looked)
    out: list[Item] = []
    first = EventId(1_700_000_001_000, 0)
    with pytest.raises(source_module._Reconnect):
        source._handle("connected", "", orjson.dumps({"firstEventId": str(first)}), out)
    (gap,) = [i for i in out if isinstance(i, GapDetected)]
    assert (gap.position, gap.first_event_id, gap.repair_from) == (looked, first, position)
    assert gap.in_connection and gap.repair_recover_until is not None
    (through,) = [i for i in out if isinstance(i, RetainedThrough)]
    assert through.id > position  # the repair's date: the next look compares with it


def test_a_client_that_cannot_be_built_stops_the_source(tmp_path: Path) -> None:
    """The reader built its HTTP client (reading the CA bundle) outside its guard: the thread
    died with a traceback, and `run` went on, reading nothing, healthy."""
    config = SourceConfig(
        url="https://127.0.0.1:9", token=TOKEN, verify=str(tmp_path / "missing-ca.pem")
    )
    source = SseSource(config, resume=None, recover_until=None).start()
    try:
        seen = _items_until(source, lambda s: any(isinstance(i, Fatal) for i in s), "a stop")
    finally:
        source.close()
    (fatal,) = [i for i in seen if isinstance(i, Fatal)]
    assert isinstance(fatal.error, FileNotFoundError)
