"""LocalStorage on a real filesystem: failed writes leave no temporary file, crash leftovers are
cleaned, and every directory a write creates is made durable in its parent."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from connector.errors import PermanentError, RetryableError
from connector.storage import local
from connector.storage.local import _TMP_STALE_SECS, LocalStorage

ROOT = Path(__file__).resolve().parents[1]

# A child process: RLIMIT_FSIZE makes every write past 64 KiB fail with EFBIG (a full disk).
_FULL_DISK_CHILD = textwrap.dedent(
    """
    import resource, signal, sys
    from connector.errors import ConnectorError
    from connector.storage.local import LocalStorage
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    s = LocalStorage(sys.argv[1])
    s.put("seed", b"x")
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    failed = 0
    for put in (s.put_if_absent, s.put, s.put_if_absent):
        try:
            put("events/2024/01/01/seg.jsonl.zst", b"y" * (1024 * 1024))
        except ConnectorError:
            failed += 1
    print(failed)
    """
)


def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHILD, str(root)],
        env=env,
        text=True,
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == "3", out.stderr
    assert [p.name for p in root.rglob(".tmp-*")] == []
    assert not (root / "events/2024/01/01/seg.jsonl.zst").exists()


def test_check_removes_stale_temporary_files_only(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "archive")
    storage.put("events/2024/01/01/a.jsonl.zst", b"a")
    day = tmp_path / "archive/events/2024/01/01"
    stale = [day / ".tmp-deadbeef", tmp_path / "archive/.tmp-cafe"]
    fresh = day / ".tmp-live-writer"
    old = time.time() - _TMP_STALE_SECS - 60
    for p in (*stale, fresh):
        p.write_bytes(b"partial")
    for p in stale:
        os.utime(p, (old, old))
    assert list(storage.list()) == ["events/2024/01/01/a.jsonl.zst"]
    storage.check()
    assert [p.exists() for p in stale] == [False, False]
    assert fresh.exists()  # another process may be writing it right now
    assert storage.get("events/2024/01/01/a.jsonl.zst") == b"a"


class FullOnce(LocalStorage):
    """The disk is full at the first file write's fsync (as a real ENOSPC there), then not."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.full = True

    def _fsync_file(self, fd: int) -> None:
        if self.full:
            self.full = False
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super()._fsync_file(fd)


def test_a_full_disk_sweeps_what_dead_writers_left(tmp_path: Path) -> None:
    """A crash loop restarting within minutes leaves one partial file per kill, which the
    start-up sweep is too young to remove; when they fill the disk, the write that fails sweeps
    the stale ones, and its retry has the room."""
    storage = FullOnce(tmp_path / "archive")
    day = tmp_path / "archive/events/2024/01/01"
    day.mkdir(parents=True)
    stale, fresh = day / ".tmp-killed-writer", day / ".tmp-live-writer"
    old = time.time() - _TMP_STALE_SECS - 60
    for p in (stale, fresh):
        p.write_bytes(b"partial")
    os.utime(stale, (old, old))
    with pytest.raises(RetryableError, match="No space left"):
        storage.put_if_absent("events/2024/01/01/seg.jsonl.zst", b"s")
    assert not stale.exists()
    assert fresh.exists()
    assert storage.put_if_absent("events/2024/01/01/seg.jsonl.zst", b"s")


# A child process as an unprivileged user (the image's runs as uid 10001): the archive is the
# root of a volume whose ``lost+found`` only root may read.
_FOREIGN_DIR_CHILD = textwrap.dedent(
    """
    import os, sys
    from connector.storage.local import LocalStorage  # before: root's interpreter files
    if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
    s = LocalStorage(sys.argv[1])
    s.check()
    s.put_if_absent("events/2024/01/01/seg.jsonl.zst", b"s")
    print(sorted(s.list("events/")))
    """
)


def test_a_directory_the_connector_may_not_read_does_not_stop_its_start() -> None:
    root = Path(tempfile.mkdtemp(prefix="archive-", dir="/tmp"))
    try:
        (root / "lost+found").mkdir()
        os.chmod(root / "lost+found", 0o700 if os.geteuid() == 0 else 0)
        os.chmod(root, 0o755)
        if os.geteuid() == 0:
            os.chown(root, 65534, 65534)
        out = subprocess.run(
            [sys.executable, "-c", _FOREIGN_DIR_CHILD, str(root)],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            text=True,
            capture_output=True,
            timeout=60,
            cwd="/",
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "['events/2024/01/01/seg.jsonl.zst']"
        assert "cannot be read" in out.stderr
    finally:
        os.chmod(root / "lost+found", 0o700)
        shutil.rmtree(root)


class RecordingStorage(LocalStorage):
    """Records every directory fsync, and the size of every file fsynced (our own hooks, the
    real fsync still runs)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.synced: list[Path] = []
        self.files: list[int] = []

    def _fsync_dir(self, directory: Path) -> None:
        self.synced.append(Path(directory))
        super()._fsync_dir(directory)

    def _fsync_file(self, fd: int) -> None:
        self.files.append(os.fstat(fd).st_size)
        super()._fsync_file(fd)


def test_every_object_is_fsynced_whole_before_it_is_in_place(tmp_path: Path) -> None:
    """The directory fsync keeps the object's name; its bytes need the file's own fsync, once
    all are written and before the name is linked: without it a power loss could leave a
    segment or the checkpoint in place, empty or cut short."""
    storage = RecordingStorage(tmp_path / "archive")
    for put, key, body in (
        (storage.put_if_absent, "events/2026/11/28/000001-0.jsonl.zst", b"segment"),
        (storage.put, "checkpoint.json", b'{"version": 1}'),
        (storage.put, "checkpoint.json", b'{"version": 1, "saved": 2}'),
    ):
        storage.files.clear()
        put(key, body)
        assert storage.files == [len(body)], key
        assert storage.get(key) == body


def _dirs(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_dir()} | ({root} if root.is_dir() else set())


def test_every_new_directory_is_fsynced_in_its_parent(tmp_path: Path) -> None:
    storage = RecordingStorage(tmp_path / "archive")  # the root itself does not exist yet
    for put, key in (
        (storage.put_if_absent, "events/2026/11/28/000001-0.jsonl.zst"),
        (storage.put, "checkpoints/live.json"),
        (storage.put_if_absent, "events/2026/11/29/000002-0.jsonl.zst"),
    ):
        before = _dirs(storage.root)
        storage.synced.clear()
        put(key, b"body")
        created = _dirs(storage.root) - before
        assert created, key
        # Each created directory's entry is durable in its parent, and so is the object's own.
        for new in created:
            assert new.parent in storage.synced, (key, new, storage.synced)
        assert (storage.root / key).parent in storage.synced
    # A write into existing directories fsyncs only the object's directory.
    storage.synced.clear()
    storage.put_if_absent("events/2026/11/29/000003-0.jsonl.zst", b"body")
    assert storage.synced == [storage.root / "events/2026/11/29"]


def test_created_directories_are_reported_outermost_first(tmp_path: Path) -> None:
    storage = RecordingStorage(tmp_path / "archive")
    (tmp_path / "archive/events").mkdir(parents=True)
    target = tmp_path / "archive/events/2026/11"
    created = storage._make_dirs(target)
    assert created == [tmp_path / "archive/events/2026", target]
    assert storage.synced == [tmp_path / "archive/events", tmp_path / "archive/events/2026"]
    assert storage._make_dirs(target) == []


def test_an_archive_path_through_a_file_says_so(tmp_path: Path) -> None:
    """A file where the archive needs a directory (a mistyped path): the error names it as such
    and stops for good, instead of a retry loop or a bare "File exists" on a probe object."""
    (tmp_path / "file").write_text("x")
    storage = LocalStorage(tmp_path / "file" / "archive")
    with pytest.raises(PermanentError, match="is a file, not a directory"):
        storage.put("events/k", b"v")


def test_an_object_found_in_place_is_made_durable_before_it_counts_as_stored(
    tmp_path: Path,
) -> None:
    """A writer killed between its link and its directory fsync leaves the object in place,
    not yet durable: put_if_absent found it, said "already there" without an fsync, and the
    sink moved the checkpoint past it; a power loss could still take the entry away."""
    key = "events/2026/11/28/001795813193712-0000000000.jsonl.zst"
    LocalStorage(tmp_path / "archive").put_if_absent(key, b"segment")  # the killed writer's
    storage = RecordingStorage(tmp_path / "archive")
    assert storage.put_if_absent(key, b"segment") is False
    chain = [storage.root / "events/2026/11/28", storage.root / "events/2026/11"]
    chain += [storage.root / "events/2026", storage.root / "events", storage.root]
    assert storage.synced == chain


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (errno.ENOSPC, RetryableError),  # a full disk may be cleaned up: retried
        (errno.EDQUOT, RetryableError),
        (errno.EIO, RetryableError),
        (errno.EACCES, PermanentError),  # permissions and paths will not mend themselves
        (errno.EROFS, PermanentError),
        (errno.ENAMETOOLONG, PermanentError),
    ],
)
def test_os_errors_are_retried_only_when_they_may_clear_up(
    tmp_path: Path, code: int, kind: type[Exception]
) -> None:
    # Root ignores permissions and no test fills a disk: the translation is checked directly.
    error = local._translate(OSError(code, os.strerror(code)), tmp_path / "k")
    assert type(error) is kind
    assert str(tmp_path / "k") in str(error)


def test_a_key_that_is_a_directory_fails_as_a_storage_error(tmp_path: Path) -> None:
    """Every read translates its OSError (here EISDIR): a raw OSError would escape the error
    taxonomy, and the retry policy, of every caller."""
    storage = LocalStorage(tmp_path / "a")
    storage.put("snapshots/x/part-0.jsonl", b"1")
    for read in (storage.get, storage.open, storage.size):
        with pytest.raises(PermanentError, match="local archive failed at"):
            read("snapshots/x")
    (tmp_path / "file").write_bytes(b"")  # an archive path naming a file
    with pytest.raises(PermanentError, match="local archive failed at"):
        list(LocalStorage(tmp_path / "file").list())


def test_writes_leave_no_temporary_file(tmp_path: Path) -> None:
    """A write's temporary file is gone once it returns, stored or found already there: they
    are never listed, but would pile up until a check (every segment write makes one)."""
    storage = LocalStorage(tmp_path / "archive")
    assert storage.put_if_absent("events/2026/11/28/a.jsonl.zst", b"a")
    assert not storage.put_if_absent("events/2026/11/28/a.jsonl.zst", b"a")
    storage.put("checkpoint.json", b"c")
    storage.put("checkpoint.json", b"d")
    assert [p.name for p in storage.root.rglob(".tmp-*")] == []
