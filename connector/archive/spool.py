"""Bytes written in order, in memory up to a limit and in a scratch file past it.

A segment and its manifest are built before they are written, and both grow with the segment's
events. Segments rotate at ``ARCHIVE_MAX_BYTES``, except for a dependency group, which is never
split: a popular entity's relationships, sent whole after a reconnect, make one segment of
hundreds of thousands of events. Its compressed body and its manifest's per-event rows then go
to an unlinked file in the work dir, and the storage reads them from there, so memory does not
grow with the group. Ordinary segments never leave memory. A downloaded attached file is
spooled the same way (connector/files.py).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import BinaryIO

from ..errors import RetryableError
from ..storage import Body

__all__ = ["Spool"]

log = logging.getLogger(__name__)

# What a spool keeps in memory when the work dir cannot take its scratch file.
_MEMORY_FALLBACK = 256 * 1024 * 1024


class Spool:
    def __init__(self, directory: Path | None, limit: int, prefix: str) -> None:
        self.directory = directory
        self.limit = limit
        self._prefix = prefix
        self._mem = bytearray()
        self._file: BinaryIO | None = None
        self._done: bytes | None = None  # the bytes, once asked for (nothing written after)
        self.size = 0

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is None:
            self._mem += data
            if len(self._mem) > self.limit:
                self._roll()
            return
        try:
            self._file.write(data)
        except OSError as exc:
            raise _scratch_error(exc) from exc

    def body(self) -> Body:
        """What was written: the bytes, or the scratch file (the storage reads it from its start;
        it stays open until ``close``)."""
        if self._file is None:
            if self._done is None:
                # Copied once, and the buffer let go: a segment is not held twice while written.
                self._done, self._mem = bytes(self._mem), bytearray()
            return self._done
        try:
            self._file.flush()
        except OSError as exc:
            raise _scratch_error(exc) from exc
        return self._file

    def close(self) -> None:
        self._mem = bytearray()
        self._done = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _roll(self) -> None:
        scratch: BinaryIO | None = None
        try:
            if self.directory is not None:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            scratch = tempfile.TemporaryFile(  # noqa: SIM115 - closed by close()
                dir=self.directory, prefix=self._prefix
            )
            scratch.write(self._mem)
        except OSError as exc:
            if scratch is not None:
                scratch.close()
            if self.limit >= _MEMORY_FALLBACK:
                # Not without bound: a multi-GB attached file or group would get the process
                # killed for its memory, again at every restart. Retried (and said) instead,
                # until the work dir can take it.
                raise _scratch_error(exc) from exc
            # No room for the scratch file: memory, as before there was one, up to a bound.
            log.error(
                "Cannot use a scratch file in the work dir; kept in memory up to 256 MiB.",
                extra={"dir": str(self.directory), "what": self._prefix, "error": str(exc)},
            )
            self.limit = _MEMORY_FALLBACK
            return
        self._file = scratch
        self._mem = bytearray()


def _scratch_error(exc: OSError) -> RetryableError:
    return RetryableError(f"cannot write a scratch file in the work dir: {exc}")
