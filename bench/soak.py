"""Soak test: a long backup under every fault at once, then restore and compare (issue 5).

    python bench/soak.py                        # 200k events, 50 SIGKILLs, 1000 drops, S3 faults
    python bench/soak.py --events 20000 --kills 5 --drops 100 --storage local   # a quick one

What it does, all on 127.0.0.1:

* an OpenCTI stream simulator whose store keeps producing creates, updates, merges and deletes
  (``connector.sim.generator.generate``) until ``--events`` events exist;
* the real connector (``python -m connector run``) following the raw stream, or with ``--stream
  live`` the live stream (first-run recovery, dependencies sent in their version at send time,
  heartbeats), into an S3 archive (moto) through a fault-injecting proxy (10% 5xx, 2% connection
  resets, 1% slow answers), or a local directory with ``--storage local``;
* ``--kills`` times: the connector is SIGKILLed after a random 0.5-6 s and restarted;
* the simulator cuts connections (half of them in the middle of a message) until the connector
  has reconnected ``--drops`` times;
* at the end: the last connector catches up and gets SIGTERM (must exit 0), the archive is
  verified, compared with the simulator's log, restored (``materialise``) and the restored state
  compared with the simulator's own dump. Raw stream: the archive must hold the log event by
  event, in order. Live stream: every event after the first recovery must be archived (except a
  relationship or sighting the stream drops because an endpoint was gone when it was sent, and
  that is gone at the end too: counted apart), each of the platform's own events once.
  ``--snapshots SECS`` also has the connector write a snapshot and apply retention (keeping
  two snapshots) every SECS seconds, between the kills: the restore then starts from the newest
  snapshot, and the archive alone (snapshots hidden) must give the same state.
  ``--trim N --outages K`` (live stream): the platform's stream keeps only its last N events, and
  K of the kills are followed by an outage long enough for it to trim past the checkpoint: each
  restart then finds a retention gap (an outage after production ended produces its own events,
  past ``--events``), repairs it with a new recovery and reconciles the deletes
  of the lost window. Events lost are then counted after the last repair's recover point, and
  the restore must still equal the platform.
  ``--target`` also syncs into a second simulator (API transport) and compares it with the
  platform (other STIX ids as a set); see docs/OPENCTI-TARGET.md §5 for what a sync that lags
  behind a live stream leaves.

Pass line: 0 events lost, 0 events archived twice, 0 duplicated / missing / differing objects in
the restored state, verify OK. It prints a figures table (and ``--json`` writes them); on a
failure it writes the platform's log to ``platform-log.jsonl`` in the work directory, to trace a
difference back to its events. Bounded: ``--max-minutes`` stops the fault phase early (the
figures say so).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.restore_child import WithoutSnapshots  # noqa: E402
from connector.archive import ArchiveReader  # noqa: E402
from connector.checkpoint import CheckpointStore  # noqa: E402
from connector.events import OCTI_EXT, EventId  # noqa: E402
from connector.jobs import LOCK_KEY  # noqa: E402
from connector.progress import iso_to_ms  # noqa: E402
from connector.restore import materialise_plan  # noqa: E402
from connector.sim.generator import generate  # noqa: E402
from connector.sim.server import SimServer  # noqa: E402
from connector.sim.store import SimStore  # noqa: E402
from connector.snapshot import list_snapshots  # noqa: E402
from connector.storage import Storage  # noqa: E402
from connector.storage.local import LocalStorage  # noqa: E402
from connector.verify import verify_archive  # noqa: E402
from tests.support.compare import state_diff  # noqa: E402
from tests.support.connector import (  # noqa: E402
    ConnectorProcess,
    base_env,
    caught_up,
    checkpoint_id,
    raw_log,
)

TOKEN = "soak-token"
TARGET_TOKEN = "soak-target-token"
__all__ = ["main"]


def _ids_sorted(bundle: dict[str, Any]) -> dict[str, Any]:
    objects = []
    for obj in bundle.get("objects") or []:
        octi = (obj.get("extensions") or {}).get(OCTI_EXT)
        if isinstance(octi, dict) and isinstance(octi.get("stix_ids"), list):
            octi = {**octi, "stix_ids": sorted(octi["stix_ids"])}
            obj = {**obj, "extensions": {**obj["extensions"], OCTI_EXT: octi}}
        objects.append(obj)
    return {"objects": objects}


def _s3(workdir: Path) -> tuple[Any, Any, dict[str, str], Storage]:
    """moto + the fault proxy; returns (server, proxy, connector env, direct storage)."""
    from moto.server import ThreadedMotoServer

    from connector.storage.s3 import S3Storage
    from tests.support.faultproxy import FaultProxy
    from tests.support.s3 import ACCESS_KEY, REGION, SECRET_KEY, make_bucket, storage_settings

    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        }
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    bucket = make_bucket(endpoint, "soak")
    proxy = FaultProxy(
        endpoint, seed=5, error_rate_5xx=0.10, reset_rate=0.02, slow_rate=0.01, slow_secs=0.5
    ).start()
    env = {
        "ARCHIVE_URI": f"s3://{bucket}/archive",
        "S3_ENDPOINT_URL": proxy.url,
        "S3_ACCESS_KEY_ID": ACCESS_KEY,
        "S3_SECRET_ACCESS_KEY": SECRET_KEY,
        "S3_REGION": REGION,
        "S3_PATH_STYLE": "true",
    }
    direct = S3Storage(**storage_settings(endpoint, bucket))
    return moto, proxy, env, direct


class LogWatch:
    """Counts the connectors' reconnects (by reason) in their shared JSON log, incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.reasons: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()

    def poll(self) -> int:
        if not self.path.exists():
            return 0
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        for line in data[:end].splitlines():
            if not line.startswith(b"{"):
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            msg = str(rec.get("message"))
            self.messages[msg] += 1
            if msg == "Stream reconnecting.":
                self.reasons[str(rec.get("reason", "")).split(":")[0][:40]] += 1
            elif msg == "Write failed; retrying.":
                self.retries[str(rec.get("stage"))] += 1
        return self.reconnects

    @property
    def reconnects(self) -> int:
        return sum(self.reasons.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--drops", type=int, default=1000)
    p.add_argument("--storage", choices=("s3", "local"), default="s3")
    p.add_argument(
        "--stream",
        choices=("raw", "live"),
        default="raw",
        help="raw: the archive must equal the simulator's log event by event; live: every event"
        " after the first recovery must be archived, and the restore must equal the platform",
    )
    p.add_argument(
        "--target",
        action="store_true",
        help="also sync into a second simulator (API transport, perfect sync) and compare it",
    )
    p.add_argument(
        "--snapshots",
        type=int,
        default=0,
        metavar="SECS",
        help="the connector writes a snapshot and applies retention (2 kept) every SECS seconds",
    )
    p.add_argument(
        "--trim", type=int, default=0, metavar="N", help="the stream keeps its last N events"
    )
    p.add_argument(
        "--outages",
        type=int,
        default=0,
        metavar="K",
        help="K kills (of --kills) wait until the stream trimmed past the checkpoint (--trim)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-minutes", type=float, default=25.0)
    p.add_argument("--workdir", help="keep the archive and logs here (default: a temp dir)")
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    if args.outages and (not args.trim or args.stream != "live"):
        p.error("--outages needs --trim and --stream live (a raw stream cannot repair a gap)")
    rng = random.Random(args.seed)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="opencti-sync-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "connector.log"
    log_path.unlink(missing_ok=True)
    started = time.monotonic()
    deadline = started + args.max_minutes * 60

    store = SimStore(trim=args.trim or None)
    initial = min(20_000, args.events // 10)
    generate(store, initial, seed=args.seed)
    sim = SimServer(token=TOKEN, store=store, heartbeat_secs=1.0).start()
    moto = proxy = None
    if args.storage == "s3":
        moto, proxy, extra, storage = _s3(workdir)
        env = base_env(sim.url, TOKEN, extra.pop("ARCHIVE_URI"), **extra)
    else:
        archive = workdir / "archive"
        storage = LocalStorage(archive)
        env = base_env(sim.url, TOKEN, str(archive))
    target = None
    if args.target:
        target = SimServer(token=TARGET_TOKEN, heartbeat_secs=1.0).start()
        # As in tests/test_sync_restore.py: the double honours perfect sync on the API path.
        target.store.platform_forward_headers = True  # type: ignore[attr-defined]
        env.update(
            {
                "TARGET_OPENCTI_URL": target.url,
                "TARGET_OPENCTI_TOKEN": TARGET_TOKEN,
                "TARGET_TRANSPORT": "api",
                "TARGET_SYNCHRONIZED": "true",
            }
        )
    env.update(
        {
            "CONNECTOR_LIVE_STREAM_ID": args.stream,
            "ARCHIVE_MAX_EVENTS": "5000",
            "ARCHIVE_MAX_AGE_SECS": "1",
            "CONNECTOR_BACKOFF_MAX_SECS": "2",
            "CONNECTOR_LOG_LEVEL": "info",
        }
    )
    if args.trim:
        # A stream this short is trimmed within a fraction of a second: a reader falling that
        # far behind mid-connection (catching up after a restart) is overtaken by the trim, as
        # a slow target's reader is on a platform keeping millions. Checked often, it is found.
        env["CONNECTOR_RETENTION_CHECK_SECS"] = "0.5"
    if args.snapshots:
        env.update(
            {
                "SNAPSHOT_SCHEDULE": f"every {args.snapshots}s",
                "RETENTION_SCHEDULE": f"every {args.snapshots}s",
                "RETENTION_KEEP_SNAPSHOTS": "2",
            }
        )
    watch = LogWatch(log_path)
    stop = threading.Event()

    def appended() -> int:
        # event_count is what the stream still holds; with --trim it stops growing.
        return store.bounds()[1]

    produced = [appended()]

    def producer() -> None:
        chunk = 0
        while appended() < args.events and not stop.is_set():
            n = min(2000, args.events - appended())
            generate(store, n, seed=args.seed * 100_000 + chunk)
            chunk += 1
            produced[0] = appended()
            # Spread production over the fault phase (about 1,000 events/s).
            stop.wait(max(0.0, n / 1000 - 0.5))

    armed = [0, 0]  # drop faults armed, of which mid-message

    def dropper() -> None:
        while not stop.is_set() and watch.poll() < args.drops:
            mid = rng.random() < 0.5
            # Arm a cut for the next connection, then cut the current one: two drops a round
            # when the stream has enough to send (the armed one in the middle of a message
            # half of the time).
            sim.set_fault(drop_after_events=rng.randint(1, 400), mid_message=mid, drop_times=1)
            sim.drop_connections()
            armed[0] += 1
            armed[1] += int(mid)
            stop.wait(rng.uniform(0.1, 0.5))
        sim.set_fault(drop_after_events=None, mid_message=None, drop_times=None)

    threads = [threading.Thread(target=f, daemon=True) for f in (producer, dropper)]
    for t in threads:
        t.start()
    kills = stale_locks = 0
    # In the first half, while the platform is still producing (an outage needs new events).
    early = range(1, max(args.outages, args.kills // 2) + 1)
    outage_kills = set(rng.sample(early, min(args.outages, args.kills)))
    proc, spawned = ConnectorProcess(env, log_path), time.monotonic()
    while kills < args.kills and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.5, 6.0))
        if kills + 1 in outage_kills:
            # A retention gap is a trim past a position the run made durable: a first run killed
            # before its first checkpoint (its start-up slow on a loaded machine) restarts with
            # nothing durable and recovers as of now, by design no gap. Kill it once it has one.
            while checkpoint_id(storage) is None and time.monotonic() < deadline:
                time.sleep(0.1)
        proc.kill()
        kills += 1
        if kills in outage_kills:
            # Down until the stream has trimmed past where the connector stopped.
            target_count = appended() + args.trim + 1000
            while appended() < target_count and time.monotonic() < deadline:
                if not threads[0].is_alive():
                    # Production ended before the outage did (a late kill): the platform goes
                    # on creating while the connector is down, or the outage would leave no gap.
                    generate(
                        store, target_count - appended(), seed=args.seed * 100_000 + 90_000 + kills
                    )
                    produced[0] = appended()
                    break
                time.sleep(0.2)
        if args.snapshots and storage.exists(LOCK_KEY):
            # The killed process's job lock would hold for its 10-minute lease, longer than the
            # whole fault phase: expire it now (no other process runs archive jobs here).
            storage.delete(LOCK_KEY)
            stale_locks += 1
        proc, spawned = ConnectorProcess(env, log_path), time.monotonic()
        print(
            f"[{time.monotonic() - started:6.0f}s] kills {kills}/{args.kills}  events "
            f"{produced[0]}/{args.events}  reconnects {watch.poll()}/{args.drops}",
            flush=True,
        )
    # Let production and the drops finish (bounded by the deadline).
    while time.monotonic() < deadline and (appended() < args.events or watch.poll() < args.drops):
        time.sleep(1)
    stop.set()
    for t in threads:
        t.join()
    sim.set_fault(drop_after_events=None, mid_message=None, drop_times=None)
    fault_phase = time.monotonic() - started
    if proxy is not None:
        proxy_stats = dict(proxy.stats)
        proxy.clear()  # the final catch-up and the checks run without storage faults
    else:
        proxy_stats = {}
    last = store.last_event_id or "0-0"
    t0 = time.monotonic()
    while not caught_up(storage, last):
        if time.monotonic() - t0 > 900:
            print("final catch-up timed out", flush=True)
            break
        time.sleep(0.5)
    while args.trim and time.monotonic() - t0 < 900:
        # A repair's delete reconciliation runs once the connector is idle after catching up.
        cp_now = CheckpointStore(storage).load()
        if cp_now is None or not (cp_now.reconcile or {}).get("due"):
            break
        time.sleep(0.5)
    catch_up = time.monotonic() - t0
    while args.snapshots and not list_snapshots(storage) and time.monotonic() - t0 < 900:
        # Every process may have been killed (or, now, stopped) in the middle of its snapshot
        # on a slow machine: the restore from a snapshot is part of the pass line, so the last
        # process gets the time to write one.
        time.sleep(0.5)
    # A SIGTERM during interpreter start-up, before the handler exists, ends the process at once
    # (nothing to flush yet, but no exit 0): the last restart gets its start-up first.
    time.sleep(max(0.0, spawned + 3 - time.monotonic()))
    rc = proc.terminate(timeout=120)
    watch.poll()

    # -- checks ------------------------------------------------------------------------------
    log = list(raw_log(sim.url, TOKEN))
    expected = [(i, e) for i, e, _ in log]
    events = list(ArchiveReader(storage).events())
    sim.stop()
    lost_kinds: Counter[str] = Counter()  # live: events missing, by kind
    not_sent: Counter[str] = Counter()  # live: relations dropped for a missing endpoint
    cp = CheckpointStore(storage).load()
    if args.stream == "raw":
        archived = [(ev.id_text, ev.event) for ev in events]
        distinct = [a for i, a in enumerate(archived) if i == 0 or a != archived[i - 1]]
        exp_set, got_set = set(expected), set(archived)
        lost = len(exp_set - got_set)
        twice = len(archived) - len(got_set)
        order_ok = distinct == expected
    else:
        # A live stream re-sends dependencies under their trigger's id (an object can come as
        # a dependency and as itself) and replaces the history before its first recovery with
        # the objects as they were: every event after that recovery must be there, each of the
        # platform's own events (not a dependency or recovery re-send) once, groups in order.
        end = cp.first_recovery_end if cp is not None else None
        floor = iso_to_ms(end) if end else None
        # A retention-gap repair is a recovery too: what it covers is no event.
        for gap in cp.retention_gaps if cp is not None else []:
            repaired = gap.get("repair_recover_until")
            if repaired and (floor is None or iso_to_ms(repaired) > floor):
                floor = iso_to_ms(repaired)
        archived = [(ev.id_text, ev.event, ev.stix_id) for ev in events]
        got_ids = {i for i, _, _ in archived}
        after = [i for i, _ in expected if floor is None or EventId.parse(i).ms > floor]
        # The stream drops a relationship or sighting whose endpoint is gone when it is sent
        # (§5.2; the relation went with it): not sent, not lost, as long as it is gone too.
        final_ids = {str(o.get("id")) for o in store.objects()}
        missing = set(after) - got_ids
        for i, e, d in log:
            if i in missing:
                obj = d.get("data") or {}
                relation = obj.get("type") in ("relationship", "sighting")
                if relation and obj.get("id") not in final_ids:
                    not_sent[f"{e} {obj.get('type')}"] += 1
                else:
                    lost_kinds[f"{e} {obj.get('type')}"] += 1
        lost = sum(lost_kinds.values())
        own = [a for a, ev in zip(archived, events, strict=True) if not ev.synthetic]
        twice = len(own) - len(set(own))
        order_ok = all(a.id <= b.id for a, b in itertools.pairwise(events))
    report = verify_archive(storage, work_dir=workdir / "verify")
    snapshots = len(list_snapshots(storage))
    t0 = time.monotonic()
    state, plan = materialise_plan(storage, until=None, work_dir=workdir / "restore")
    objects = [obj for _, _, _, obj in state.objects()]
    state.close()
    restore_secs = time.monotonic() - t0
    dump = store.dump_bundle()
    diff = state_diff(dump, {"objects": objects}, limit=10)
    ids = [o["id"] for o in objects]
    duplicated = len(ids) - len(set(ids))
    diff_archive_only: list[str] = []
    if plan.snapshot is not None:
        # The same state from the segments alone: a snapshot must change nothing but the time.
        state, _ = materialise_plan(
            WithoutSnapshots(storage), until=None, work_dir=workdir / "restore"
        )
        alone = [obj for _, _, _, obj in state.objects()]
        state.close()
        diff_archive_only = state_diff({"objects": objects}, {"objects": alone}, limit=10)
    target_diff: list[str] = []
    if target is not None:
        # An object's other STIX ids are a set on the platform; their order is not compared.
        target_diff = state_diff(_ids_sorted(dump), _ids_sorted(target.store.dump_bundle()), 10)
        target.stop()
    if moto is not None:
        moto.stop()
    if proxy is not None:
        proxy.stop()
    ok = lost == 0 and twice == 0 and order_ok and report.ok and not diff and duplicated == 0
    ok = ok and not target_diff and not diff_archive_only
    ok = ok and (not args.snapshots or plan.snapshot is not None)
    if args.outages:  # the repairs happened and their reconciliations ran
        ok = ok and cp is not None and bool(cp.retention_gaps)
        ok = ok and not (cp.reconcile or {}).get("due")
    ok = ok and rc == 0
    figures: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpu, "
        f"Python {platform.python_version()}",
        "command": " ".join(["python", "bench/soak.py", *(argv or sys.argv[1:])]),
        "storage": args.storage,
        "events_produced": appended(),
        "events_still_in_the_stream": len(expected),
        "mix": dict(Counter(e for _, e in expected)),
        "sigkills": kills,
        "outages": len(outage_kills),
        "retention_gaps": len(cp.retention_gaps) if cp is not None else 0,
        # Of those, found by a look during a connection (the trim overtook the reader there).
        "retention_gaps_in_connection": sum(
            1 for g in (cp.retention_gaps if cp is not None else []) if g.get("in_connection")
        ),
        "reconcile": cp.reconcile if cp is not None else None,
        "reconnects": watch.reconnects,
        "reconnect_reasons": dict(watch.reasons),
        "drop_faults_armed": armed[0],
        "drop_faults_mid_message": armed[1],
        "storage_faults_injected": {k: v for k, v in proxy_stats.items() if k != "forwarded"},
        "storage_retries_logged": dict(watch.retries),
        "fault_phase_secs": round(fault_phase, 1),
        "final_catch_up_secs": round(catch_up, 1),
        "sigterm_exit_code": rc,
        "events_archived": len(archived),
        "events_lost": lost,
        "events_lost_kinds": dict(lost_kinds),
        "relations_not_sent_endpoint_gone": dict(not_sent),
        "events_archived_twice": twice,
        "order_exact": order_ok,
        "segments": report.segments,
        "verify_errors": report.error_count,
        "verify_messages": report.errors[:5],
        "job_locks_of_killed_processes": stale_locks,
        "snapshots_kept": snapshots,
        "restored_from_snapshot": plan.snapshot,
        "snapshot_vs_archive_only_differences": diff_archive_only,
        "restore_secs": round(restore_secs, 1),
        "objects_platform": len(dump["objects"]),
        "objects_restored": len(objects),
        "objects_duplicated": duplicated,
        "state_differences": diff,
        "target_objects": None if target is None else len(target_diff) == 0,
        "target_differences": target_diff,
        "result": "PASS" if ok else "FAIL",
        "workdir": str(workdir),
    }
    if not ok:  # the platform's whole history, to trace a difference back to its events
        with (workdir / "platform-log.jsonl").open("wb") as fh:
            for i, e, data in log:
                fh.write(orjson.dumps({"id": i, "event": e, "data": data}) + b"\n")
        figures["platform_log"] = str(workdir / "platform-log.jsonl")
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
