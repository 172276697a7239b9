"""The soak at a small size on the live stream, so bench/soak.py never rots.

The live stream is the one operators follow: its first recovery and its dependencies come in
their version at send time, so a connector behind the platform (here: SIGKILLed, restarted and
cut off while the platform keeps creating, updating, merging and deleting) folds objects sent
ahead of their history. The restored state must still equal the platform's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]


def _soak(tmp_path: Path, args: list[str]) -> dict[str, Any]:
    """Run bench/soak.py with ``args`` (work directory in ``tmp_path``); its figures."""
    figures = tmp_path / "figures.json"
    args = [*args, "--workdir", str(tmp_path / "work"), "--json", str(figures)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    result: dict[str, Any] = orjson.loads(figures.read_bytes())
    assert done.returncode == 0, done.stdout[-3000:]
    return result


def test_live_soak_small(tmp_path: Path) -> None:
    args = ["--stream", "live", "--storage", "local", "--events", "4000", "--kills", "3"]
    result = _soak(tmp_path, [*args, "--drops", "30", "--max-minutes", "3"])
    assert result["result"] == "PASS"
    assert result["sigkills"] == 3 and result["reconnects"] >= 30
    assert result["mix"].get("merge", 0) > 0 and result["mix"].get("delete", 0) > 0
    assert result["events_lost"] == 0 and result["events_archived_twice"] == 0
    assert result["state_differences"] == [] and result["verify_errors"] == 0
    assert result["objects_restored"] == result["objects_platform"] > 0


def test_live_soak_with_retention_gaps_and_snapshots_small(tmp_path: Path) -> None:
    """The platform keeps only its last 1,000 events and two restarts wait until it trimmed
    past the checkpoint: each repair, its reconciliation (deletes, merges, refreshed objects)
    and the snapshots written meanwhile must still restore the platform's state."""
    args = ["--stream", "live", "--storage", "local", "--events", "10000", "--kills", "4"]
    args += ["--outages", "2", "--trim", "1000", "--drops", "20", "--snapshots", "2"]
    result = _soak(tmp_path, [*args, "--max-minutes", "4"])
    assert result["result"] == "PASS", result
    assert result["retention_gaps"] >= 2 and result["reconcile"]["due"] is False
    assert result["events_lost"] == 0 and result["events_archived_twice"] == 0
    assert result["state_differences"] == [] and result["verify_errors"] == 0
    assert result["snapshot_vs_archive_only_differences"] == []
    assert result["objects_restored"] == result["objects_platform"] > 0
