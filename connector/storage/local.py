"""A local directory as archive storage.

Writes go to a temporary file in the target directory, are fsynced, then linked into place:
``os.link`` never replaces an existing file, so a second write of the same key is a no-op, and a
crash leaves either no object or a whole one. A failed write removes its temporary file; the ones
a crash leaves (``.tmp-*``) are ignored by ``list`` and removed by ``check`` once they are older
than ``_TMP_STALE_SECS`` (a live writer of another process may still be filling a newer one), and
again when a write finds the disk full (a crash loop restarting within that time leaves one per
kill).

Durability: the file is fsynced before it is linked, then its directory; a directory created for
it is made one level at a time and each new directory's parent is fsynced too, so a power loss
cannot take away a new day directory (and the segments in it) that a later checkpoint relies on.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import NotFound, PermanentError, RetryableError
from . import Body, body_chunks, check_key

__all__ = ["LocalStorage", "fsync_dir"]

_TMP = ".tmp-"
# A temporary file untouched for this long belongs to a writer that died (or failed) mid-write.
_TMP_STALE_SECS = 600
_CAS_LOCK = ".replace-lock"  # flocked by replace_if; never listed, never a key

log = logging.getLogger(__name__)


def fsync_dir(directory: Path) -> None:
    """Make ``directory``'s entries durable: a file renamed or linked into it is there after a
    power loss only once its directory is fsynced too (fsyncing the file keeps its bytes, not
    its name)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """Objects are files below ``root``; keys are relative paths with ``/``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self._warned_no_flock = False
        self._swept_full_at = -float(_TMP_STALE_SECS)  # monotonic time of the last sweep on ENOSPC

    def describe(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_tmp(self, path: Path, body: Body) -> Path:
        """``body`` in a new fsynced temporary file beside ``path``; on any failure no
        temporary file is left behind."""
        try:
            self._make_dirs(path.parent)
            tmp = path.parent / f"{_TMP}{uuid.uuid4().hex}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        except OSError as exc:
            self._sweep_if_full(exc)
            raise _translate(exc, path) from exc
        try:
            try:
                for chunk in [body] if isinstance(body, bytes) else body_chunks(body):
                    view = memoryview(chunk)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                self._fsync_file(fd)
            finally:
                os.close(fd)
        except BaseException as exc:
            # ENOSPC / EFBIG / EIO halfway: the partial file would stay (it is never listed).
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                self._sweep_if_full(exc)
                raise _translate(exc, path) from exc
            raise
        return tmp

    def _sweep_if_full(self, exc: OSError) -> None:
        """A write failed on a full disk: what dead writers left may be the cause, and the
        retry that follows needs the room. At most once a minute (a walk of the whole tree)."""
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return
        now = time.monotonic()
        if now - self._swept_full_at < 60:
            return
        self._swept_full_at = now
        try:
            removed = self.remove_stale_tmp()
        except (PermanentError, RetryableError) as exc:
            log.warning("Could not sweep temporary files.", extra={"error": str(exc)})
            return
        if removed:
            log.warning(
                "The archive's disk is full: removed temporary files dead writers had left.",
                extra={"removed": removed},
            )

    def _make_dirs(self, directory: Path) -> list[Path]:
        """Create ``directory`` and its missing ancestors one level at a time, fsyncing each
        new directory's parent (``mkdir(parents=True)`` makes the entries, not their
        durability). Returns the directories this call created, outermost first."""
        missing: list[Path] = []
        current = directory
        while not current.is_dir():
            missing.append(current)
            if current.parent == current:
                break
            current = current.parent
        created: list[Path] = []
        for new in reversed(missing):
            try:
                os.mkdir(new)
                created.append(new)
            except FileExistsError:
                if not new.is_dir():
                    # A file where the archive needs a directory: say that, not "File exists".
                    raise NotADirectoryError(
                        errno.ENOTDIR, f"{new} is a file, not a directory", str(new)
                    ) from None
                # Made by a concurrent writer that may not have fsynced its parent yet: doing
                # it again costs one fsync and keeps our object's path durable either way.
            self._fsync_dir(new.parent)
        return created

    def _fsync_file(self, fd: int) -> None:
        os.fsync(fd)  # a method, as _fsync_dir: the tests record the files it syncs

    def _fsync_dir(self, directory: Path) -> None:
        fsync_dir(directory)  # a method: the tests record the directories it syncs

    def _sync_dir(self, directory: Path) -> None:
        try:
            self._fsync_dir(directory)
        except OSError as exc:
            raise _translate(exc, directory) from exc

    def check(self) -> None:
        self.remove_stale_tmp()
        probe = f".probe-{uuid.uuid4().hex}"
        self.put(probe, b"probe")
        self.delete(probe)

    def remove_stale_tmp(self, older_than_secs: float = _TMP_STALE_SECS) -> int:
        """Delete the temporary files dead writers left (untouched for ``older_than_secs``);
        returns how many. Walks the whole tree (names only; only ``.tmp-*`` entries are
        stat'ed)."""
        limit = time.time() - older_than_secs
        removed = 0
        pending = [self.root]
        while pending:
            directory = pending.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            except PermissionError as exc:
                if directory == self.root:
                    raise _translate(exc, directory) from exc
                # Not one of ours (``lost+found`` at the root of a dedicated volume): the
                # archive's own directories are written by this user.
                log.warning(
                    "A directory in the archive cannot be read: its temporary files are not swept.",
                    extra={"path": str(directory)},
                )
                continue
            except OSError as exc:
                raise _translate(exc, directory) from exc
            for entry in entries:
                if entry.name.startswith(_TMP):
                    try:
                        st = entry.stat(follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode) and st.st_mtime < limit:
                            os.unlink(entry.path)
                            removed += 1
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        raise _translate(exc, Path(entry.path)) from exc
                elif entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
        return removed

    def put_if_absent(self, key: str, body: Body) -> bool:
        path = self._path(key)
        if path.exists():
            self._sync_found(path)
            return False
        tmp = self._write_tmp(path, body)
        try:
            os.link(tmp, path)
        except FileExistsError:
            self._sync_found(path)
            return False
        except OSError as exc:
            raise _translate(exc, path) from exc
        finally:
            tmp.unlink(missing_ok=True)
        self._sync_dir(path.parent)
        return True

    def settle(self, key: str) -> None:
        self._sync_found(self._path(key))  # a killed writer may not have fsynced its directory

    def _sync_found(self, path: Path) -> None:
        """A file found in place may be a killed writer's, linked before it could fsync the
        directories: the caller takes it as stored (and moves the checkpoint past it), so its
        entry and its directories' are made durable now. A rare path: a few fsyncs."""
        directory = path.parent
        while True:
            self._sync_dir(directory)
            if directory == self.root or directory.parent == directory:
                return
            directory = directory.parent

    def put(self, key: str, body: bytes) -> None:
        path = self._path(key)
        tmp = self._write_tmp(path, body)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _translate(exc, path) from exc
        self._sync_dir(path.parent)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(key) from exc
        except OSError as exc:
            raise _translate(exc, self._path(key)) from exc

    def get_with_tag(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, hashlib.sha256(data).hexdigest()

    def replace_if(self, key: str, body: bytes, tag: str) -> bool:
        path = self._path(key)
        # Every replace_if in a directory holds the flock of its lock file there: the compare
        # and the replace are one step for the processes sharing the archive.
        try:
            fd = self._open_lock(path.parent / _CAS_LOCK)
        except FileNotFoundError:
            return False  # no directory, no object to replace
        try:
            if fd is not None:
                try:
                    self._lock_exclusive(fd)
                except OSError as exc:
                    self._unlocked(path.parent, exc)
            try:
                current = path.read_bytes()
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise _translate(exc, path) from exc
            if hashlib.sha256(current).hexdigest() != tag:
                return False
            self.put(key, body)
            return True
        finally:
            if fd is not None:
                os.close(fd)  # releases the flock

    def _open_lock(self, lock: Path) -> int | None:
        """The lock file, opened for writing (NFS turns flock into a byte-range lock of the
        server's, which needs it); None when it cannot be (another user's file)."""
        try:
            return os.open(lock, os.O_RDWR | os.O_CREAT, 0o660)
        except FileNotFoundError:
            raise
        except OSError as exc:
            self._unlocked(lock.parent, exc)
            return None

    def _unlocked(self, directory: Path, exc: OSError) -> None:
        """No file lock (NFS mounted nolock, a lock file nobody may open): compare, then
        replace, which the locks' re-read after a take-over still checks. Said once."""
        if not self._warned_no_flock:
            self._warned_no_flock = True
            log.warning(
                "Cannot lock a file in the archive: lock take-overs fall back to write-then-check.",
                extra={"path": str(directory), "error": str(exc)},
            )

    def _lock_exclusive(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")  # noqa: SIM115 - caller closes
        except FileNotFoundError as exc:
            raise NotFound(key) from exc
        except OSError as exc:
            raise _translate(exc, self._path(key)) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            st = path.stat()
        except FileNotFoundError as exc:
            raise NotFound(key) from exc
        except OSError as exc:
            raise _translate(exc, path) from exc
        if stat.S_ISDIR(st.st_mode):
            # stat() succeeds on a directory; answer as get() and open() do, not its size.
            raise _translate(IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)), path)
        return st.st_size

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[str]:
        # Walk directories in sorted order so keys come out lexicographically without ever
        # holding more than one directory listing.
        base = self.root
        yield from self._walk(base, "", prefix, start_after)

    def _walk(
        self, directory: Path, rel: str, prefix: str, start_after: str | None
    ) -> Iterator[str]:
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _translate(exc, directory) from exc
        # Sort as keys sort: a directory "a" contributes keys "a/...", which sort after "a" and
        # before "a0"; plain name sorting of "a" vs "a-b" already matches for our key shapes.
        entries = []
        for name in names:
            if name.startswith(_TMP) or name == _CAS_LOCK:
                continue
            full = directory / name
            key = f"{rel}{name}"
            if full.is_dir():
                entries.append((key + "/", full, True))
            else:
                entries.append((key, full, False))
        entries.sort(key=lambda e: e[0])
        for key, full, is_dir in entries:
            if is_dir:
                # Skip whole subtrees that cannot hold a matching key.
                if not (key.startswith(prefix) or prefix.startswith(key)):
                    continue
                if (
                    start_after is not None
                    and not start_after.startswith(key)
                    and key < start_after
                ):
                    continue
                yield from self._walk(full, key, prefix, start_after)
            else:
                if not key.startswith(prefix):
                    continue
                if start_after is not None and key <= start_after:
                    continue
                yield key

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise _translate(exc, self._path(key)) from exc


def _translate(exc: OSError, path: Path) -> Exception:
    """ENOSPC and friends may clear up; permission and path problems will not."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EBUSY):
        return RetryableError(f"local archive write failed at {path}: {os.strerror(exc.errno)}")
    return PermanentError(f"local archive failed at {path}: {exc.strerror or exc}")
