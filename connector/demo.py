"""``opencti-sync demo``: the whole story on one machine, with nothing but Python.

1. start the OpenCTI stream simulator, seeded with real OpenCTI sample data;
2. run the connector as a child process: it recovers the platform into the archive;
3. edit the platform live (update, standard-id change, merge, delete, create, a file attached,
   a burst);
4. SIGKILL the connector in the middle of the burst, restart it;
5. check the archive: its materialised state equals the simulator's, deleted and merged-away
   objects are tombstoned, the attached file's bytes are archived, ``verify`` finds no damage;
   print the summary.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointStore
from .errors import ConfigError, NotFound
from .events import EventId, octi_ext
from .files import file_key
from .settings import DEFAULTS_ENV, iter_keys
from .sim import SAMPLE_BUNDLES, sample_bundle
from .sim.generator import generate
from .sim.server import SimServer
from .storage.local import LocalStorage

__all__ = ["run_demo"]


def _say(text: str) -> None:
    print(text, flush=True)


def _start(
    env: dict[str, str], log_path: Path, started: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """A connector, recorded in ``started`` (the demo stops those at its end). Ctrl-C or
    SIGTERM meanwhile waits until it is recorded: raised inside ``Popen``, after the fork, it
    left a connector nobody stopped."""
    held: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: held.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it until it exits
        proc = subprocess.Popen(
            [sys.executable, "-m", "connector", "run"], env=env, stdout=log, stderr=log
        )
        started.append(proc)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for signum in held:
        signal.raise_signal(signum)
    return proc


def _checkpoint(storage: LocalStorage) -> EventId | None:
    try:
        cp = CheckpointStore(storage).load()
    except Exception:  # noqa: BLE001 - being replaced right now; read again
        return None
    return EventId.parse(cp.last_event_id) if cp and cp.last_event_id else None


def _caught_up(
    storage: LocalStorage, last: str, proc: subprocess.Popen[bytes], log_path: Path
) -> bool:
    """Waits for the connector's checkpoint to reach ``last``; False, said, when the connector
    died or did not catch up in time."""
    target = EventId.parse(last)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        cp = _checkpoint(storage)
        if cp is not None and cp >= target:
            return True
        if proc.poll() is not None:
            _say(f"FAILED: the connector exited with code {proc.returncode}; see {log_path}")
            return False
        time.sleep(0.1)
    _say(f"FAILED: the connector did not catch up in time; see {log_path}")
    return False


def _version(stix: dict[str, Any]) -> str:
    return str(octi_ext(stix).get("updated_at") or stix.get("modified") or "")


_MARKER = ".opencti-sync-demo"


def _conclude(
    *,
    expected: dict[str, str],
    archived: dict[str, str],
    gone_ok: bool,
    id_change_ok: bool,
    file_ok: bool,
    verified: bool,
    rc: int,
    events: int,
    segments: int,
    directory: Path,
    log_path: Path,
) -> int:
    """Print the demo's checks (``expected`` and ``archived``: each object's version, by STIX
    id, on the simulator and in the archive's state) and its verdict: 0 when every check
    passed, else 1, said "FAILED" with what differs."""
    missing = sorted(set(expected) - set(archived))
    extra = sorted(set(archived) - set(expected))
    stale = sorted(k for k in set(expected) & set(archived) if expected[k] != archived[k])
    ok = (
        not missing
        and not extra
        and not stale
        and gone_ok
        and id_change_ok
        and file_ok
        and verified
        and rc == 0
    )
    rows = [
        ("objects on the platform", len(expected)),
        ("objects in the archive's state", len(archived)),
        ("missing / extra / stale versions", f"{len(missing)} / {len(extra)} / {len(stale)}"),
        ("deleted + merged-away tombstoned", "yes" if gone_ok else "NO"),
        ("standard-id change followed", "yes" if id_change_ok else "NO"),
        ("attached PDF archived, bytes equal", "yes" if file_ok else "NO"),
        ("events archived", events),
        ("segments", segments),
        ("verify", "OK" if verified else "DAMAGED"),
        ("clean SIGTERM exit code", rc),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        _say(f"   {name:<{width}}  {value}")
    if ok:
        _say(
            f"Verified: nothing lost, nothing resurrected. Archive: {directory}  (logs: {log_path})"
        )
        return 0
    _say(f"FAILED: see {log_path}; missing={missing[:5]} extra={extra[:5]} stale={stale[:5]}")
    return 1


def run_demo(directory: Path) -> int:
    import logging

    from .restore import materialise
    from .state import remove_state_files
    from .verify import verify_archive

    directory = directory.absolute()
    if directory.exists():
        # Only a directory this demo made (its marker) or an empty one: ``--dir`` pointed at a
        # real archive must never be wiped, nor marked as the demo's.
        if any(directory.iterdir()) and not (directory / _MARKER).is_file():
            raise ConfigError(
                "--dir",
                f"{directory} exists and was not made by the demo; give a new or empty directory",
            )
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _MARKER).write_text("made by `opencti-sync demo`: removed by the next demo run\n")
    work = Path(tempfile.mkdtemp(prefix="opencti-sync-demo-"))
    log_path = work / "connector.log"
    handler = logging.FileHandler(work / "demo.log")
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    token = secrets.token_hex(16)
    sim = SimServer(token=token, heartbeat_secs=1.0).start()
    started: list[subprocess.Popen[bytes]] = []
    try:
        # One load, so relationships can point at objects of another sample file.
        objects = [o for name in SAMPLE_BUNDLES for o in sample_bundle(name)["objects"]]
        seeded = sim.store.load_bundle(objects)
        _say(f"1. Simulator at {sim.url}, seeded with {seeded} real OpenCTI sample objects.")
        # None of the operator's own configuration: a CHECKPOINT_URI (or METRICS_*, SNAPSHOT_*)
        # from the shell or a container's environment would have the demo's run write its
        # checkpoint over a real one, or take a real run's metrics port.
        configured = {k.env for k in iter_keys()} | {DEFAULTS_ENV}
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in configured
            and not k.startswith(("OPENCTI_", "CONNECTOR_", "ARCHIVE_", "S3_", "TARGET_"))
        }
        env.update(
            {
                "OPENCTI_URL": sim.url,
                "OPENCTI_TOKEN": token,
                "CONNECTOR_LIVE_STREAM_ID": "live",
                "ARCHIVE_URI": str(directory),
                "ARCHIVE_MAX_AGE_SECS": "1",
                "ARCHIVE_MAX_EVENTS": "500",
                "CONNECTOR_LOG_FORMAT": "json",
                "OPENCTI_SYNC_WORK_DIR": str(work),
            }
        )
        storage = LocalStorage(directory)
        proc = _start(env, log_path, started)
        if not _caught_up(storage, sim.store.last_event_id or "0-0", proc, log_path):
            return 1
        _say(f"2. Recovered the platform into {directory}.")

        store = sim.store
        objs = list(store.objects())
        malware = sorted(o["id"] for o in objs if o["type"] == "malware")
        sets = sorted(o["id"] for o in objs if o["type"] == "intrusion-set")
        indicators = sorted(o["id"] for o in objs if o["type"] == "indicator")
        store.update(malware[0], set={"description": "Updated live during the demo."})
        renamed = store.update(
            malware[1],
            set={"name": "Renamed during the demo"},
            new_id="malware--0d3a5f1e-2c4b-4d6e-8f90-1a2b3c4d5e6f",
        )
        merged_away = sets[1:3]
        store.merge(sets[0], merged_away)
        store.delete(indicators[0])
        report_id = "report--5a1c3e7b-9d2f-4b6a-8c0e-1f3a5b7d9e2c"
        store.create(
            {
                "type": "report",
                "id": report_id,
                "spec_version": "2.1",
                "name": "Demo live report",
                "published": "2026-11-27T00:00:00.000Z",
                "object_refs": [malware[0], sets[0]],
            }
        )
        # An analyst attaches a document: the stream carries its name and uri, not its bytes.
        pdf = b"%PDF-1.7\n% opencti-sync demo attachment\n" + secrets.token_bytes(200_000)
        store.attach_file(report_id, "demo-analysis.pdf", pdf)
        (attached,) = store.files_of(report_id)
        _say(
            "3. Live edits: an update, a standard-id change, a merge of 2 intrusion sets, a delete, "
            "a new report with a PDF attached."
        )

        generate(store, 3000, seed=42)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        cp = _checkpoint(storage)
        _say(f"4. SIGKILL in the middle of a 3,000-event burst (checkpoint was {cp}); restarting.")
        generate(store, 500, seed=43)
        proc = _start(env, log_path, started)
        if not _caught_up(storage, store.last_event_id or "0-0", proc, log_path):
            return 1
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)

        state = materialise(storage, until=None, work_dir=work)
        archived = {sid: _version(data) for _key, sid, _ev, data in state.objects()}
        expected = {o["id"]: _version(o) for o in store.objects()}
        tombstoned = {t.stix_id for t in state.tombstones()}
        gone_ok = set(merged_away) <= tombstoned and indicators[0] in tombstoned
        # The burst may later merge or delete the renamed object: compare with the platform.
        new_id = "malware--0d3a5f1e-2c4b-4d6e-8f90-1a2b3c4d5e6f"
        id_change_ok = (
            bool(renamed)
            and (new_id in archived) == (new_id in expected)
            and malware[1] not in archived
        )
        report = verify_archive(storage, work_dir=work)
        checkpoint = CheckpointStore(storage).load()
        try:
            file_ok = storage.get(file_key(attached)) == pdf
        except NotFound:
            file_ok = False
        state.close()
        # The logs stay for the reader; the state (as large as the platform) is rebuilt at will.
        remove_state_files(state.path)
        _say("5. Checked the archive against the simulator:")
        return _conclude(
            expected=expected,
            archived=archived,
            gone_ok=gone_ok,
            id_change_ok=id_change_ok,
            file_ok=file_ok,
            verified=bool(report.ok),
            rc=rc,
            events=checkpoint.events_archived if checkpoint else 0,
            segments=report.segments,
            directory=directory,
            log_path=log_path,
        )
    finally:
        # Also on Ctrl-C or SIGTERM: no connector it started may outlive the demo.
        for proc in started:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        sim.stop()
