"""``opencti-sync restore`` / ``verify`` refuse what would silently do nothing or too little:
flags that would be ignored, an archive that is not there, a point before its history, and a
state that pruned history makes partial. In-process through ``main`` (exit codes as the CLI's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.__main__ import main
from connector.retention import RetentionPolicy, apply_retention, plan_retention
from connector.snapshot import list_snapshots
from connector.storage.local import LocalStorage
from tests.test_retention import at_day, build_days, follow_until


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


def test_a_partial_state_needs_allow_partial(archive: Path, tmp_path: Path) -> None:
    """Pruned history, then its base snapshot damaged: the segments alone miss objects."""
    storage = LocalStorage(archive)
    follow_until(storage, at_day(8))
    policy = RetentionPolicy(keep_days=1, keep_snapshots=0)
    report = apply_retention(storage, plan_retention(storage, policy, at_day(8)))
    assert report.counts().get("segment")
    part = list_snapshots(storage)[0].parts[0]
    storage.put(part.key, b"damaged")
    out = tmp_path / "state.json"
    assert _restore(archive, tmp_path, "--to-bundle", str(out)) == 1
    assert not out.exists()
    assert _restore(archive, tmp_path, "--to-bundle", str(out), "--allow-partial") == 0
    assert out.exists()
