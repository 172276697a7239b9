"""``opencti-sync restore`` / ``verify`` refuse what would silently do nothing or too little:
flags that would be ignored, an archive that is not there, a point before its history, and a
state that pruned history makes partial. In-process through ``main`` (exit codes as the CLI's)."""

from __future__ import annotations

import errno
import io
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from connector import restore_cli
from connector.__main__ import main
from connector.archive import ArchiveReader
from connector.checkpoint import CHECKPOINT_KEY, CheckpointStore
from connector.errors import PermanentError
from connector.events import EventId
from connector.retention import RetentionPolicy, apply_retention, plan_retention
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.snapshot import list_snapshots, write_snapshot
from connector.source import iso_to_id
from connector.storage.local import LocalStorage
from tests.support.connector import ROOT, ConnectorThread, base_env, caught_up, wait_until
from tests.support.snapshots import and_its_image
from tests.support.tls import make_certs, server_context
from tests.test_retention import at_day, build_days, follow_until


@pytest.fixture(autouse=True)
def _work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENCTI_SYNC_WORK_DIR", str(tmp_path / "work"))


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    storage = LocalStorage(tmp_path / "a")
    build_days(storage, tmp_path, days=6, snapshot_days={2})
    return tmp_path / "a"


def _restore(archive: Path, tmp_path: Path, *args: str) -> int:
    return main(["restore", "--archive", str(archive), "--work-dir", str(tmp_path / "w"), *args])


@pytest.mark.parametrize(
    "flags",
    [
        ["--opencti", "http://127.0.0.1:9"],
        ["--dry-run"],
        ["--no-apply-deletes"],
        ["--force"],
        ["--token", "secret-token-1234"],
        ["--max-file-mb", "35"],  # a bundle holds every file: even the default is not applied
    ],
)
def test_flags_a_bundle_would_ignore_are_refused(
    archive: Path, tmp_path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "state.json"
    assert _restore(archive, tmp_path, "--to-bundle", str(out), *flags) == 2
    assert not out.exists()
    assert flags[0].split()[0] in capsys.readouterr().err


def test_no_archive_there_is_an_error(tmp_path: Path) -> None:
    out = tmp_path / "state.json"
    missing = tmp_path / "no-such-archive"
    assert _restore(missing, tmp_path, "--to-bundle", str(out)) == 1
    assert not out.exists()
    assert main(["verify", "--archive", str(missing)]) == 1


def test_a_point_before_the_history_is_an_error(archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "state.json"
    assert _restore(archive, tmp_path, "--to-bundle", str(out), "--until", "2001-01-01") == 1
    assert not out.exists()
    assert _restore(archive, tmp_path, "--to-bundle", str(out)) == 0 and out.exists()
    assert not list((tmp_path / "w").glob("restore-state.sqlite*"))  # rebuilt by every run


def test_a_partial_state_needs_allow_partial(archive: Path, tmp_path: Path) -> None:
    """Pruned history, then its base snapshot damaged: the segments alone miss objects."""
    storage = LocalStorage(archive)
    follow_until(storage, at_day(8))
    policy = RetentionPolicy(keep_days=1, keep_snapshots=0)
    report = apply_retention(storage, plan_retention(storage, policy, at_day(8)))
    assert report.counts().get("segment")
    info = list_snapshots(storage)[0]
    for part in and_its_image(info, info.parts[0]):
        storage.put(part.key, b"damaged")
    out = tmp_path / "state.json"
    assert _restore(archive, tmp_path, "--to-bundle", str(out)) == 1
    assert not out.exists()
    assert _restore(archive, tmp_path, "--to-bundle", str(out), "--allow-partial") == 0
    assert out.exists()


def test_a_point_before_pruned_history_says_so(
    archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "check --archive": the archive is right, retention pruned that point."""
    storage = LocalStorage(archive)
    follow_until(storage, at_day(8))
    policy = RetentionPolicy(keep_days=1, keep_snapshots=0)
    assert apply_retention(storage, plan_retention(storage, policy, at_day(8))).counts()
    out = tmp_path / "state.json"
    until = str(EventId(int(at_day(0.5).timestamp() * 1000), 0))
    assert _restore(archive, tmp_path, "--to-bundle", str(out), "--until", until) == 1
    err = capsys.readouterr().err
    assert "pruned" in err and "oldest restorable point" in err and not out.exists()


def test_a_token_given_with_a_newline_works_and_never_shows(
    archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--token "$(cat token-file)"`` keeps the file's newline: stripped like a configured token
    (an HTTP library would refuse the header and print it), and redacted from every log line."""
    token = "cli-token-0123456789abcdef"
    with SimServer(token=token, heartbeat_secs=0.2) as sim:
        assert _restore(archive, tmp_path, "--opencti", sim.url, "--token", token + "\n") == 0
        assert sim.store.object_count > 0
    out = capsys.readouterr()
    assert token not in out.out + out.err


def test_verify_against_a_platform_behind_a_private_ca(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``verify --against-opencti`` trusts TARGET_CA_BUNDLE, like every other target call."""
    token = "verify-token-0123456789"
    files = make_certs(tmp_path / "tls")
    with SimServer(token=token, heartbeat_secs=0.2, ssl_context=server_context(files)) as sim:
        monkeypatch.setenv("TARGET_CA_BUNDLE", str(files.ca_pem))
        url = sim.url
        assert _restore(archive, tmp_path, "--opencti", url, "--token", token) == 0
        args = ["verify", "--archive", str(archive), "--against-opencti", url, "--token", token]
        assert main(args) == 0
        monkeypatch.delenv("TARGET_CA_BUNDLE")
        assert main(args) != 0  # the same platform, its certificate unverifiable


@pytest.mark.parametrize("damage", ["flipped byte", "lost manifest", "lost segment"])
def test_a_damaged_archive_is_never_restored_or_snapshotted_silently(
    archive: Path, tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A segment whose bytes changed (bit rot) or whose manifest is gone (a hole in the chain):
    restore and the snapshot job stop and say so instead of building a wrong or partial state
    (which retention would then take for a base)."""
    storage = LocalStorage(archive)
    manifests = [r for r in ArchiveReader(storage).manifests()]
    victim = manifests[len(manifests) // 2]
    if damage == "flipped byte":
        body = bytearray(storage.get(victim.manifest.segment))
        body[len(body) // 2] ^= 0x01
        storage.put(victim.manifest.segment, bytes(body))
    elif damage == "lost manifest":
        storage.delete(victim.manifest_key)
    else:
        storage.delete(victim.manifest.segment)
    for snap in list_snapshots(storage):  # restore from the segments alone
        storage.delete(snap.manifest_key)
    out = tmp_path / "state.json"
    assert _restore(archive, tmp_path, "--to-bundle", str(out)) == 1
    err = capsys.readouterr().err
    assert not out.exists()
    if damage == "lost segment":  # named as such, not as a bare storage key
        assert f"archive segment {victim.manifest.segment} is missing" in err
    with pytest.raises(PermanentError, match="damaged|gap|missing"):
        write_snapshot(storage, work_dir=tmp_path / "snap")
    assert list_snapshots(storage) == []
    if damage == "lost manifest":  # the operator may accept the hole knowingly
        assert _restore(archive, tmp_path, "--to-bundle", str(out), "--allow-partial") == 0


def test_a_point_inside_the_first_recovery_needs_allow_partial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first run recovered each object as it was then, under its updated_at: at a point
    before that, an object created earlier but updated since has no known version. Such a
    point is refused unless --allow-partial; one where nothing changed since is fine."""
    token = "recover-token-0123456789"
    with SimServer(token=token, heartbeat_secs=0.2) as sim:
        generate(sim.store, 30, seed=3, mix="creates")
        quiet = EventId.parse(sim.store.last_event_id)  # nothing changes between here and...
        time.sleep(0.05)
        changed = next(o["id"] for o in sim.store.objects() if o["type"] == "malware")
        sim.store.update(changed, set={"description": "changed before the first backup"})
        archive = tmp_path / "a"
        storage = LocalStorage(archive)
        run = ConnectorThread(base_env(sim.url, token, str(archive))).start()
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="first run")
        run.stop()
    out = tmp_path / "state.json"
    assert _restore(archive, tmp_path, "--to-bundle", str(out), "--until", str(quiet)) == 1
    assert "first recovery" in capsys.readouterr().err and not out.exists()
    assert (
        _restore(
            archive, tmp_path, "--to-bundle", str(out), "--until", str(quiet), "--allow-partial"
        )
        == 0
    )
    capsys.readouterr()
    assert main(["status", "--archive", str(archive), "--json"]) == 0
    status = orjson.loads(capsys.readouterr().out)
    cp = CheckpointStore(storage).load()
    assert cp is not None and cp.recover_until
    assert EventId.parse(status["restorable_from"]) >= iso_to_id(cp.recover_until)  # type: ignore[operator]


def test_a_retention_gap_repair_does_not_move_the_first_recovery(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A repair recovers again and moves ``recover_until``; points between the first recovery
    and the repair are archived as they were, and restore takes them (status too)."""
    token = "repair-token-0123456789"
    with SimServer(token=token, heartbeat_secs=0.2) as sim:
        generate(sim.store, 40, seed=3, mix="creates")
        archive = tmp_path / "a"
        storage = LocalStorage(archive)
        env = base_env(sim.url, token, str(archive))
        run = ConnectorThread(env).start()
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="first run")
        time.sleep(0.05)
        generate(sim.store, 10, seed=4, mix="creates")
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="live")
        mid = EventId.parse(sim.store.last_event_id)
        run.stop()
        time.sleep(0.05)
        victim = next(o["id"] for o in sim.store.objects() if o["type"] == "malware")
        sim.store.update(victim, set={"description": "changed while down"})
        generate(sim.store, 10, seed=11, mix="creates")
        sim.store.trim(5)  # the platform's stream passes the checkpoint: a repair
        run = ConnectorThread(env).start()
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="repair")
        run.stop()
    cp = CheckpointStore(storage).load()
    assert cp is not None and len(cp.retention_gaps) == 1
    assert cp.first_recover_until and cp.recover_until != cp.first_recover_until
    out = tmp_path / "state.json"
    assert _restore(archive, tmp_path, "--to-bundle", str(out), "--until", str(mid)) == 0
    capsys.readouterr()
    assert main(["status", "--archive", str(archive), "--json"]) == 0
    status = orjson.loads(capsys.readouterr().out)
    assert EventId.parse(status["restorable_from"]) <= mid


@pytest.mark.parametrize("where", ["in the archive", "apart", "under a damaged snapshot"])
def test_lost_newest_segments_are_never_restored_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """No chain link can show that the newest segments are gone: only the checkpoint knows how
    far the archive reaches. A restore past the archive's end is refused (a point before it is
    fine), and verify says so, also when the checkpoint is kept apart (``CHECKPOINT_URI``)."""
    token = "tail-token-0123456789"
    archive = tmp_path / "a"
    storage = LocalStorage(archive)
    kept = tmp_path / "cp" if where == "apart" else archive
    extra = {"CHECKPOINT_URI": str(kept)} if where == "apart" else {}
    with SimServer(token=token, heartbeat_secs=0.2) as sim:
        generate(sim.store, 20, seed=3, mix="creates")
        run = ConnectorThread(base_env(sim.url, token, str(archive), **extra)).start()
        wait_until(lambda: caught_up(LocalStorage(kept), sim.store.last_event_id), what="recovery")
        time.sleep(0.05)
        generate(sim.store, 5, seed=4, mix="creates")
        wait_until(lambda: caught_up(LocalStorage(kept), sim.store.last_event_id), what="live")
        run.stop()
    assert storage.exists(CHECKPOINT_KEY) == (where != "apart")
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    refs = list(ArchiveReader(storage).manifests())
    assert len(refs) >= 2
    if where == "under a damaged snapshot":  # it would cover the loss, but cannot be used
        info = write_snapshot(storage, work_dir=tmp_path / "snap")
        assert info is not None
        for part in and_its_image(info, info.parts[0]):
            storage.put(part.key, b"damaged")
    storage.delete(refs[-1].manifest_key)  # its segment is no longer part of the archive
    out = tmp_path / "state.json"
    assert _restore(archive, tmp_path, "--to-bundle", str(out)) == 1
    assert "newest segments" in capsys.readouterr().err and not out.exists()
    assert main(["verify", "--archive", str(archive)]) == 1
    assert "newest segments are missing" in capsys.readouterr().out
    end = str(refs[-2].manifest.last)
    assert _restore(archive, tmp_path, "--to-bundle", str(out), "--until", end) == 0
    assert _restore(archive, tmp_path, "--to-bundle", str(out), "--allow-partial") == 0


def test_a_point_before_what_the_recovery_sent_early_needs_allow_partial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first recovery sends an entity with its relationships, under the entity's id: a
    relationship created later, and its other endpoint, would appear at a point where they did
    not exist yet. Such a point inside the first recovery is refused unless --allow-partial."""
    token = "early-token-0123456789"
    with SimServer(token=token, heartbeat_secs=0.2) as sim:
        malware, actor = f"malware--{uuid.uuid4()}", f"intrusion-set--{uuid.uuid4()}"
        sim.store.create({"type": "malware", "id": malware, "name": "Early", "is_family": True})
        point = EventId.parse(sim.store.last_event_id)
        time.sleep(0.05)
        sim.store.create({"type": "intrusion-set", "id": actor, "name": "Later"})
        sim.store.create(
            {
                "type": "relationship",
                "id": f"relationship--{uuid.uuid4()}",
                "relationship_type": "uses",
                "source_ref": actor,
                "target_ref": malware,
            }
        )
        archive = tmp_path / "a"
        storage = LocalStorage(archive)
        run = ConnectorThread(base_env(sim.url, token, str(archive))).start()
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="first run")
        run.stop()
    early = [ev for ev in ArchiveReader(storage).events(until=point) if ev.stix_id == actor]
    assert early  # sent with the malware, at or below the point
    out = tmp_path / "state.json"
    assert _restore(archive, tmp_path, "--to-bundle", str(out), "--until", str(point)) == 1
    assert "first recovery" in capsys.readouterr().err and not out.exists()
    args = ("--to-bundle", str(out), "--until", str(point), "--allow-partial")
    assert _restore(archive, tmp_path, *args) == 0


def test_bundle_and_work_paths_are_checked_and_a_failed_bundle_leaves_nothing(
    archive: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bundle path in a missing directory or naming a directory, or a work dir that is a
    file, is refused before any work (exit 2, naming the flag); a bundle that cannot be
    written leaves no partial file."""
    missing = tmp_path / "no-such-dir" / "state.json"
    assert _restore(archive, tmp_path, "--to-bundle", str(missing)) == 2
    assert "--to-bundle" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    assert _restore(archive, tmp_path, "--to-bundle", str(taken)) == 2
    said = capsys.readouterr()
    assert "--to-bundle" in said.err and "is a directory" in said.err
    assert "state as of" not in said.out  # said before the state was built
    a_file = tmp_path / "file"
    a_file.write_text("x")
    args = ["restore", "--archive", str(archive), "--work-dir", str(a_file)]
    assert main([*args, "--to-bundle", str(tmp_path / "state.json")]) == 2
    assert "--work-dir" in capsys.readouterr().err

    def disk_full_halfway(state: object, out: Any, **kwargs: object) -> int:
        out.write(b'{"type": "bundle", "objects": [')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(restore_cli, "to_bundle", disk_full_halfway)  # our own writer
    assert _restore(archive, tmp_path, "--to-bundle", str(tmp_path / "b.json")) == 1
    assert "cannot write the bundle" in capsys.readouterr().err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("b.json")]


def test_a_work_dir_that_cannot_be_made_is_named(
    archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A local path that cannot be used ends the command with one line naming it (exit 1),
    not a traceback nor a bare "Not a directory" (the log line before it is JSON in a
    container)."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    monkeypatch.setenv("OPENCTI_SYNC_WORK_DIR", str(a_file / "work"))
    assert main(["verify", "--archive", str(archive)]) == 1
    said = capsys.readouterr().err.strip().splitlines()[-1]  # the line after the log's
    assert said == f"opencti-sync: Not a directory: {a_file / 'work'}", said


@pytest.mark.parametrize("command", ["restore", "verify"])
def test_a_missing_token_is_said_before_any_work(
    archive: Path, tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A restore into a platform, or a verify against one, without a token failed only once
    the whole state was built (or the whole archive verified): minutes on a large archive."""
    flag = "--opencti" if command == "restore" else "--against-opencti"
    argv = [command, "--archive", str(archive), flag, "http://127.0.0.1:9"]
    if command == "restore":
        argv += ["--work-dir", str(tmp_path / "w")]
    assert main(argv) == 2
    said = capsys.readouterr()
    assert "--token" in said.err and "TARGET_OPENCTI_TOKEN" in said.err
    assert "state as of" not in said.out and "result" not in said.out


def test_a_bad_until_is_said_before_any_work(
    archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    restore = ["restore", "--archive", str(archive), "--to-bundle", str(tmp_path / "b.json")]
    verify = ["verify", "--archive", str(archive), "--against-opencti", "http://127.0.0.1:9"]
    for argv in (restore, [*verify, "--token", "t"]):
        assert main([*argv, "--until", "last tuesday"]) == 2
        said = capsys.readouterr()
        assert "--until" in said.err and "not an event id or ISO 8601 date" in said.err
        assert "state as of" not in said.out and "result" not in said.out


@pytest.mark.parametrize("flags", [["--until", "2026-01-01"], ["--token", "secret-token-1234"]])
def test_verify_refuses_flags_it_would_ignore(
    archive: Path, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", "--archive", str(archive), *flags]) == 2
    said = capsys.readouterr()
    assert flags[0] in said.err and "--against-opencti" in said.err
    assert "result" not in said.out


def test_an_unusable_work_dir_is_one_line_not_a_traceback(
    archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    monkeypatch.setenv("OPENCTI_SYNC_WORK_DIR", str(a_file / "work"))
    assert main(["verify", "--archive", str(archive)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{a_file / 'work'}" in err


def test_a_point_inside_lost_newest_segments_is_refused_under_a_later_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A good snapshot past the lost segments does not vouch for a point before it: the plan
    for that point cannot use the snapshot, so the lost events would be missing from it."""
    token = "inside-token-0123456789"
    archive = tmp_path / "a"
    storage = LocalStorage(archive)
    with SimServer(token=token, heartbeat_secs=0.2) as sim:
        generate(sim.store, 20, seed=3, mix="creates")
        run = ConnectorThread(base_env(sim.url, token, str(archive))).start()
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="recovery")
        time.sleep(0.05)
        generate(sim.store, 5, seed=4, mix="creates")
        wait_until(lambda: caught_up(storage, sim.store.last_event_id), what="live")
        run.stop()
    assert write_snapshot(storage, work_dir=tmp_path / "snap") is not None
    refs = list(ArchiveReader(storage).manifests())
    lost = refs[-1]
    storage.delete(lost.manifest_key)
    out = tmp_path / "state.json"
    assert _restore(archive, tmp_path, "--to-bundle", str(out)) == 0  # the snapshot covers latest
    inside = str(lost.manifest.first)
    assert _restore(archive, tmp_path, "--to-bundle", str(out), "--until", inside) == 1
    assert "newest segments" in capsys.readouterr().err


def test_what_a_restore_writes_is_not_world_readable(archive: Path, tmp_path: Path) -> None:
    """The bundle and the work dir's state are a copy of the CTI: owner and group only, like
    the archive's files, whatever the umask lets through (they were 0644 under 022)."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "state.json"
        assert _restore(archive, tmp_path, "--to-bundle", str(out)) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    work = tmp_path / "w"
    assert work.is_dir() and stat.S_IMODE(work.stat().st_mode) == 0o700


def _full_disk() -> None:
    """In the child: files may not grow past 64 KiB (EFBIG, what SQLite reports as a full
    disk), without the signal that would kill the process instead."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))


@pytest.mark.parametrize("command", ["verify", "restore"])
def test_a_full_work_dir_is_one_line_and_not_archive_damage(
    archive: Path, tmp_path: Path, command: str
) -> None:
    """verify reported every segment as damaged ("cannot be decoded ... database or disk is
    full") and restore ended in a traceback, leaving its partial state on the full disk."""
    work = tmp_path / "work"
    args = [sys.executable, "-m", "connector", command, "--archive", str(archive)]
    if command == "restore":
        args += ["--to-bundle", str(tmp_path / "b.json"), "--work-dir", str(work)]
    done = subprocess.run(
        args,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "OPENCTI_SYNC_WORK_DIR": str(work),
            # Under the file size limit a bytecode cache written here would be cut short, and
            # break every later import of that module (a run of this file alone, after an edit).
            "PYTHONDONTWRITEBYTECODE": "1",
        },
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_full_disk,  # noqa: PLW1509 - a resource limit for the child alone
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "the work dir's database failed" in done.stderr
    assert "damaged" not in (done.stdout + done.stderr).lower()
    assert not list(work.rglob("*.sqlite"))


DELETED = "malware--00000000-0000-4000-8000-000000001000"  # deleted on day 4, back on day 5


@pytest.mark.parametrize("flags", [[], ["--apply-deletes"], ["--no-apply-deletes"]])
def test_deletes_are_applied_unless_told_not_to_and_the_configured_token_serves(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str]
) -> None:
    """What the archive records as deleted is deleted on the platform by default; with
    ``--no-apply-deletes`` it is left in place. No ``--token``: TARGET_OPENCTI_TOKEN serves."""
    token = "deletes-token-0123456789"
    monkeypatch.setenv("TARGET_OPENCTI_TOKEN", token)
    (gone,) = [
        ev.id for ev in ArchiveReader(LocalStorage(archive)).events() if ev.event == "delete"
    ]
    with SimServer(token=token) as sim:
        sim.store.create({"type": "malware", "id": DELETED, "name": "malware 1000"})
        args = ("--opencti", sim.url, "--until", str(gone), *flags)
        assert _restore(archive, tmp_path, *args) == 0
        assert sim.store.object_count > 1
        kept = sim.store.get(DELETED) is not None
    assert kept == (flags == ["--no-apply-deletes"])


@pytest.mark.parametrize("mb", ["0", "-1", "nan", "inf"])
def test_a_max_file_mb_of_zero_or_no_number_is_refused(
    archive: Path, tmp_path: Path, mb: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Said before any work: 0 would carry no file, and ``inf`` (for "no limit") passed this
    check and then failed as a bare OverflowError once the whole state was built."""
    args = ("--opencti", "http://127.0.0.1:9", "--token", "t", "--max-file-mb", mb)
    assert _restore(archive, tmp_path, *args) == 2
    assert "--max-file-mb" in capsys.readouterr().err


def test_a_restore_without_a_target_is_refused_before_any_work(
    archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A configured token (TARGET_OPENCTI_TOKEN) is no target: neither --opencti nor
    --to-bundle is refused, not found out after the whole state is built."""
    monkeypatch.setenv("TARGET_OPENCTI_TOKEN", "configured-token-0123")
    assert _restore(archive, tmp_path) == 2
    said = capsys.readouterr()
    assert "--opencti" in said.err and "--to-bundle" in said.err
    assert "state as of" not in said.out


@pytest.mark.parametrize("bad", ["tok\x7fabcd", "tok\x00abcd", "tok\nabcd", "tok-€-abcd"])
def test_a_token_flag_with_control_or_non_ascii_characters_is_refused(
    archive: Path, tmp_path: Path, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """As for the configured token: it goes into an HTTP header."""
    assert _restore(archive, tmp_path, "--opencti", "http://127.0.0.1:9", "--token", bad) == 2
    err = capsys.readouterr().err
    assert "--token" in err and "abcd" not in err


def test_a_metrics_port_already_taken_costs_the_metrics_not_the_restore(
    archive: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    token = "metrics-token-0123456789"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for name, value in (("ENABLED", "true"), ("HOST", "127.0.0.1"), ("PORT", str(port))):
            monkeypatch.setenv(f"METRICS_{name}", value)
        with SimServer(token=token) as sim:
            assert _restore(archive, tmp_path, "--opencti", sim.url, "--token", token) == 0
            assert sim.store.object_count > 0
    assert "Restore metrics not served" in capsys.readouterr().err


def test_the_progress_gauge_of_an_empty_restore_says_done() -> None:
    """A restore with nothing to push (a state where everything was deleted, deletes off)
    reports 0 of 0: the gauge says 1, as for a finished restore, not "stuck at 0"."""
    from connector import metrics
    from connector.restore import TextProgress

    progress = restore_cli._MeteredProgress(TextProgress("restore", stream=io.StringIO()))
    progress.update(0, 0)
    progress.close()
    assert metrics.REGISTRY.get_sample_value("opencti_sync_restore_progress_ratio") == 1.0
