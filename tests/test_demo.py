"""The README's demo command runs end to end and ends with a verified summary."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from connector.demo import _conclude
from tests.support.connector import ROOT, wait_until

MAL = "malware--00000000-0000-4000-8000-000000000001"
PASSED: dict[str, Any] = {
    "expected": {MAL: "2026-01-01T00:00:00.000Z"},
    "archived": {MAL: "2026-01-01T00:00:00.000Z"},
    "gone_ok": True,
    "id_change_ok": True,
    "file_ok": True,
    "verified": True,
    "rc": 0,
    "events": 10,
    "segments": 1,
}


@pytest.mark.parametrize(
    "failed",
    [
        {"archived": {}},  # missing
        {"archived": {**PASSED["archived"], "malware--x": "1"}},  # extra
        {"archived": {MAL: "2025-01-01T00:00:00.000Z"}},  # stale
        {"gone_ok": False},
        {"id_change_ok": False},
        {"file_ok": False},
        {"verified": False},
        {"rc": 1},
    ],
)
def test_a_failed_check_fails_the_demo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], failed: dict[str, Any]
) -> None:
    """Each of the demo's checks, failed alone, ends it with exit 1 and FAILED, never with
    the verified summary."""
    where = {"directory": tmp_path, "log_path": tmp_path / "connector.log"}
    assert _conclude(**PASSED, **where) == 0
    assert "Verified: nothing lost" in capsys.readouterr().out
    assert _conclude(**{**PASSED, **failed}, **where) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "Verified" not in out


def test_demo_ends_verified(tmp_path: Path) -> None:
    """Also where a real connector is configured (a container's environment): the demo's run
    leaves that configuration alone (it once wrote its checkpoint to the real CHECKPOINT_URI,
    and waited for it in its own archive until it gave up)."""
    elsewhere = tmp_path / "real-checkpoint"
    proc = subprocess.run(
        [sys.executable, "-m", "connector", "demo", "--dir", str(tmp_path / "demo-archive")],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "CHECKPOINT_URI": str(elsewhere)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Verified: nothing lost, nothing resurrected." in proc.stdout
    rows = {" ".join(line.split()) for line in proc.stdout.splitlines()}
    assert "missing / extra / stale versions 0 / 0 / 0" in rows
    assert "attached PDF archived, bytes equal yes" in rows
    assert (tmp_path / "demo-archive" / "checkpoint.json").is_file()
    assert not elsewhere.exists()
    # The logs it names stay; nothing else is left behind (the state it checked is megabytes).
    logs = Path(proc.stdout.rsplit("(logs: ", 1)[1].split(")", 1)[0])
    assert logs.is_file()
    assert sorted(p.name for p in logs.parent.iterdir()) == ["connector.log", "demo.log"]


def test_demo_never_wipes_a_directory_it_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "archive"
    precious.mkdir()
    (precious / "checkpoint.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-m", "connector", "demo", "--dir", str(precious)],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--dir" in proc.stderr
    assert sorted(p.name for p in precious.iterdir()) == ["checkpoint.json"]  # not marked
    assert (precious / "checkpoint.json").read_text() == "{}"


def _processes_archiving_to(directory: Path) -> list[int]:
    """Pids of live processes whose environment names ``directory`` as their archive."""
    wanted = f"ARCHIVE_URI={directory}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if wanted in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_a_demo_stopped_by_sigterm_stops_its_connector(tmp_path: Path) -> None:
    """`kill <demo>` exited 143 and left the connector it had started running, reparented to
    init, retrying a simulator that was gone."""
    directory = tmp_path / "demo-archive"
    demo = subprocess.Popen(
        [sys.executable, "-m", "connector", "demo", "--dir", str(directory)],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(
            lambda: bool(_processes_archiving_to(directory)) or demo.poll() is not None,
            timeout=120,
            what="the demo's connector",
        )
        assert demo.poll() is None
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
    assert demo.returncode != 0
    wait_until(lambda: not _processes_archiving_to(directory), timeout=5, what="no connector left")
