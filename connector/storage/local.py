"""A local directory as archive storage.

Writes go to a temporary file in the target directory, are fsynced, then linked into place:
``os.link`` never replaces an existing file, so a second write of the same key is a no-op, and a
crash leaves either no object or a whole one (stray ``.tmp-*`` files are ignored and cleaned).
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import NotFound, PermanentError, RetryableError
from . import check_key

__all__ = ["LocalStorage"]

_TMP = ".tmp-"


class LocalStorage:
    """Objects are files below ``root``; keys are relative paths with ``/``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    def describe(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _write_tmp(self, path: Path, body: bytes) -> Path:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f"{_TMP}{uuid.uuid4().hex}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(body)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            return tmp
        except OSError as exc:
            raise _translate(exc, path) from exc

    def _fsync_dir(self, directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def check(self) -> None:
        probe = f".probe-{uuid.uuid4().hex}"
        self.put(probe, b"probe")
        self.delete(probe)

    def put_if_absent(self, key: str, body: bytes) -> bool:
        path = self._path(key)
        if path.exists():
            return False
        tmp = self._write_tmp(path, body)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as exc:
            raise _translate(exc, path) from exc
        finally:
            tmp.unlink(missing_ok=True)
        self._fsync_dir(path.parent)
        return True

    def put(self, key: str, body: bytes) -> None:
        path = self._path(key)
        tmp = self._write_tmp(path, body)
        try:
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _translate(exc, path) from exc
        self._fsync_dir(path.parent)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(key) from exc
        except OSError as exc:
            raise _translate(exc, self._path(key)) from exc

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")  # noqa: SIM115 - caller closes
        except FileNotFoundError as exc:
            raise NotFound(key) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as exc:
            raise NotFound(key) from exc

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
        # Sort as keys sort: a directory "a" contributes keys "a/...", which sort after "a" and
        # before "a0"; plain name sorting of "a" vs "a-b" already matches for our key shapes.
        entries = []
        for name in names:
            if name.startswith(_TMP):
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
