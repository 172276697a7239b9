"""A resumable restore's progress file: what it is bound to, how it is written, what it counts.

* The rename that puts a new progress file in place, and the removal of a finished one, are
  made durable (the work dir fsynced after them), seen in the system calls of a real process
  traced by strace.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A child process that saves a progress file twice, then finishes (the file removed).
_SAVE_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from connector.restore import _Resume
    resume = _Resume(Path(sys.argv[1]), {"as_of": None})
    resume.save(1, (0, "first"))
    resume.save(1, (0, "second"))
    resume.done()
    """
)


def _traced(tmp_path: Path, child: str, *args: str) -> list[str]:
    """The file system calls of ``child`` (python -c), one line each, in order."""
    trace = tmp_path / "trace.txt"
    calls = "trace=open,openat,close,fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat"
    proc = subprocess.run(
        ["strace", "-f", "-s", "4096", "-o", str(trace), "-e", calls]
        + [sys.executable, "-c", child, *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True,
        capture_output=True,
        timeout=120,
    )
    if proc.returncode != 0 and "ptrace" in proc.stderr.lower():
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return trace.read_text().splitlines()


def _dir_synced_after(lines: list[str], start: int, directory: Path, until: str) -> bool:
    """Whether ``directory`` is opened and fsynced (before that descriptor is closed) after
    line ``start`` and before the next line naming ``until``."""
    opened = re.compile(
        rf'open(at)?\((AT_FDCWD, )?"{re.escape(str(directory))}", [^)]*\)\s+=\s+(\d+)'
    )
    for n in range(start + 1, len(lines)):
        if until in lines[n]:
            return False
        found = opened.search(lines[n])
        if found is None:
            continue
        fd = found.group(3)
        for later in lines[n + 1 :]:
            if re.search(rf"\bfsync\({fd}\)\s+=\s+0", later):
                return True
            if re.search(rf"\bclose\({fd}\)", later):
                break
    return False


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_the_progress_files_rename_and_removal_are_made_durable(tmp_path: Path) -> None:
    """Without the work dir fsynced, a power cut could undo a save (the next run goes on from
    an older position, with older counts) or bring back a finished restore's file (the same
    restore run again later would take itself for finished and push nothing)."""
    work = tmp_path / "work"
    work.mkdir()
    progress = work / "restore-progress.json"
    lines = _traced(tmp_path, _SAVE_CHILD, str(progress))
    name = re.escape(str(progress))
    renamed = re.compile(rf'rename\w*\(.*"{name}\.tmp", .*"{name}"\)\s+=\s+0')
    renames = [n for n, line in enumerate(lines) if renamed.search(line)]
    assert len(renames) == 2, "\n".join(lines[-40:])
    for n in renames:
        synced = _dir_synced_after(lines, n, work, until=str(progress))
        assert synced, f"no fsync of {work} after line {n}"
    removed = [n for n, line in enumerate(lines) if "unlink" in line and str(progress) in line]
    assert removed and re.search(r"\s=\s+0$", lines[removed[-1]]), lines[-20:]
    synced = _dir_synced_after(lines, removed[-1], work, until=str(progress))
    assert synced, "no fsync of the work dir after the unlink"
    assert not progress.exists()
