"""A resumable restore's progress file: what it is bound to, how it is written, what it counts.

* A restore resumed with other rules for attached files (``--max-file-mb``, or files pushed or
  not) starts over: the objects already pushed went with the files of the first rules, and
  skipping them would leave their files out. The archive is written by the real connector
  (``run``) from the platform double; the target is our own protocol's (a recording class).
* A restore stopped right after a delete request was acknowledged (before its position moved
  past it) counts those deletes when resumed: ``deleted`` and the deletes by type come out as
  in a restore never stopped, though the target no longer holds the ids when asked again.
* The rename that puts a new progress file in place, and the removal of a finished one, are
  made durable (the work dir fsynced after them), seen in the system calls of a real process
  traced by strace.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.errors import RetryableError
from connector.files import file_entries
from connector.restore import RestoreReport, materialise, restore_to_target
from connector.sim.server import SimServer
from connector.storage.local import LocalStorage
from tests.support.connector import ConnectorThread, base_env, caught_up, wait_until
from tests.support.target import malware
from tests.test_restore import SimTarget
from tests.test_state import archive_events, new_sim, run_scenario, sim_events

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


# ---------------------------------------------------------------------- rules for files
TOKEN_A = "leftovers-token-a"
REPORT = "report--2c4e6a8b-0d1f-4a3b-8c5d-7e9f1a2b3c4d"
PDF = b"%PDF-1.7 " + b"x" * 3000


@pytest.fixture(scope="module")
def with_a_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStorage]:
    """An archive written by ``run``: malware, a report with a 3 KB file, and a malware
    deleted (so that a restore deletes after its pushes)."""
    archive = LocalStorage(tmp_path_factory.mktemp("leftovers") / "archive")
    with SimServer(token=TOKEN_A, heartbeat_secs=0.2) as a:
        a.store.create(malware("leftover seed"))
        run = ConnectorThread(base_env(a.url, TOKEN_A, str(archive.root))).start()
        wait_until(lambda: caught_up(archive, str(a.store.last_event_id)), what="the seed")
        a.store.create(
            {
                "type": "report",
                "spec_version": "2.1",
                "id": REPORT,
                "name": "leftover report",
                "published": "2026-01-01T00:00:00.000Z",
                "object_refs": [malware("leftover seed")["id"]],
            }
        )
        a.store.attach_file(REPORT, "analysis.pdf", PDF)
        a.store.create(malware("leftover gone"))
        a.store.delete(str(malware("leftover gone")["id"]))
        wait_until(lambda: caught_up(archive, str(a.store.last_event_id)), what="the archive")
        run.stop()
        assert run.error is None
    yield archive


class _Recording:
    """A restore target (our own protocol) recording the files pushed with their bytes; with
    ``fail_deletes`` it goes away at the first delete, after every push."""

    def __init__(self, *, fail_deletes: bool = False) -> None:
        self.fail_deletes = fail_deletes
        self.with_data: list[tuple[str, bytes]] = []
        self.pushed: list[str] = []

    def push_objects(self, objects: list[dict[str, Any]]) -> None:
        for obj in objects:
            self.pushed.append(str(obj["id"]))
            for f in file_entries(obj):
                if "data" in f:
                    self.with_data.append((str(f["name"]), base64.b64decode(f["data"])))

    def delete_ids(self, stix_ids: list[str]) -> None:
        if self.fail_deletes:
            raise RetryableError("the platform went away")


@pytest.mark.parametrize(
    ("first", "words"),
    [
        ({"files": None}, "whether attached files are pushed"),
        ({"max_file_bytes": 1000}, "--max-file-mb"),
        ({}, None),  # the same rules: resumed
    ],
    ids=["files-then", "larger-max-file-mb", "same"],
)
def test_a_restore_resumed_with_other_rules_for_files_starts_over(
    with_a_file: LocalStorage,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    first: dict[str, Any],
    words: str | None,
) -> None:
    """First run without files, or with a --max-file-mb the file is above, stopped after the
    report was pushed; the run that follows pushes files up to 35 MB: the report's file must
    reach the target. Resumed, it never did (the report was behind the saved position)."""
    progress = tmp_path / "restore-progress.json"
    rules: dict[str, Any] = {"files": with_a_file, "resume_file": progress, "target_name": "b"}
    with materialise(with_a_file, until=None, work_dir=tmp_path / "w") as state:
        stopped = _Recording(fail_deletes=True)
        with pytest.raises(RetryableError):
            restore_to_target(state, stopped, **{**rules, **first})
        assert REPORT in stopped.pushed and progress.exists()
        if words is None:
            assert stopped.with_data == [("analysis.pdf", PDF)]
        else:
            assert stopped.with_data == []  # left out by the first run's rules
        caplog.clear()
        again = _Recording()
        report = restore_to_target(state, again, **rules)
    said = [r.getMessage() for r in caplog.records if "starting over" in r.getMessage()]
    if words is None:
        assert report.resumed_from is not None and not said
        assert again.with_data == [] and report.files == 1  # pushed once, by the first run
        return
    assert again.with_data == [("analysis.pdf", PDF)], "the report's file was never sent"
    assert report.resumed_from is None, "resumed under other rules for files"
    assert report.files == 1 and report.files_too_large == 0
    assert len(said) == 1 and words in said[0], said


# ---------------------------------------------------------------------- deletes counted
class Killed(BaseException):
    """The process dies: nothing catches it, nothing runs after it."""


class _Knows:
    """A SimStore target that can say which ids it holds, not which entity they name."""

    def __init__(self, store: Any) -> None:
        self.inner = SimTarget(store)

    def push_objects(self, objects: list[dict[str, Any]]) -> None:
        self.inner.push_objects(objects)

    def delete_ids(self, stix_ids: list[str]) -> None:
        self.inner.delete_ids(stix_ids)

    def known_ids(self, stix_ids: list[str]) -> set[str]:
        return self.inner.known_ids(stix_ids)


def _killed_after_delete(target: Any, n: int | None) -> Any:
    """``target`` whose process dies just after its ``n``-th delete request returned."""
    calls = [0]
    delete = target.delete_ids

    def delete_ids(stix_ids: list[str]) -> None:
        delete(stix_ids)
        calls[0] += 1
        if calls[0] == n:
            raise Killed(f"killed after delete request {n}")

    target.delete_ids = delete_ids
    return target


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStorage, list[Any]]:
    """tests/test_state's edit script archived (a merge, deletes, a re-creation)."""
    store = new_sim()
    marks = run_scenario(store)
    events, _ = sim_events(store)
    storage = LocalStorage(tmp_path_factory.mktemp("scenario") / "archive")
    archive_events(storage, events, per_segment=10)
    return storage, marks


@pytest.mark.parametrize("kind", ["resolves", "knows"])
def test_a_restore_stopped_right_after_a_delete_counts_it_when_resumed(
    scenario: tuple[LocalStorage, list[Any]], tmp_path: Path, kind: str
) -> None:
    """Over the scenario's first state (which holds what it deletes and merges away later),
    killed just after each delete request in turn, then run again: the summary's deleted and
    deletes_by_type are the uncut run's. They were up to one batch lower: the ids deleted
    were asked again, gone, and not counted."""
    storage, marks = scenario

    def platform() -> tuple[Any, Any]:
        store = new_sim()
        store.load_bundle(marks[0][1])
        return store, (SimTarget if kind == "resolves" else _Knows)

    def restore(work: Path, n: int | None) -> tuple[RestoreReport, bool]:
        """Killed after delete request ``n`` (None: not killed), then run again."""
        store, make = platform()
        args: dict[str, Any] = {"batch_size": 2, "resume_file": work / "restore-progress.json"}
        with materialise(storage, until=None, work_dir=work / "w") as state:
            try:
                return restore_to_target(state, _killed_after_delete(make(store), n), **args), False
            except Killed:
                return restore_to_target(state, make(store), **args), True

    uncut, _ = restore(tmp_path / "uncut", None)
    assert uncut.deleted >= 3 and sum(uncut.deletes_by_type.values()) == uncut.deleted
    wrong: list[str] = []
    n, killed = 1, True
    while killed:
        report, killed = restore(tmp_path / f"cut-{n}", n)
        got = (report.deleted, report.deletes_by_type)
        if got != (uncut.deleted, uncut.deletes_by_type):
            wrong.append(f"after delete {n}: {got}, uncut {uncut.deleted, uncut.deletes_by_type}")
        n += 1
    assert n > 3, "fewer delete requests than expected"
    assert not wrong, "\n".join(wrong)
