"""Storage backends of the archive: one small protocol, two implementations.

The archive code above this package never knows where bytes go. A backend only stores opaque
objects under ``/``-separated keys relative to its root:

* ``put_if_absent`` is the idempotent write used for segments and manifests: it never replaces
  an existing object and answers whether it wrote. Its body is bytes, or a seekable file (a huge
  dependency group's segment, spooled to disk rather than held in memory).
* ``put`` atomically replaces an object (checkpoint, lock). Readers see the old or the new
  version, never a mix.
* ``get_with_tag`` / ``replace_if`` are the locks' compare-and-swap: a replacement that only
  happens while the object is still the one read.
* ``list`` yields keys in lexicographic order, paginated, never loading the key space at once.

Errors are translated at the backend boundary: ``RetryableError`` (try again later),
``PermanentError`` (stop), ``NotFound`` (no such key).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO, Protocol, runtime_checkable

from ..errors import ConfigError, PermanentError

__all__ = ["Body", "Storage", "body_chunks", "body_size", "open_storage", "check_key"]

# What a write takes: the bytes, or a seekable binary file, read from its start.
Body = bytes | BinaryIO

_CHUNK = 1 << 20


def body_size(body: Body) -> int:
    if isinstance(body, bytes):
        return len(body)
    return body.seek(0, os.SEEK_END)


def body_chunks(body: BinaryIO) -> Iterator[bytes]:
    """A file body from its start, 1 MiB at a time."""
    body.seek(0)
    while chunk := body.read(_CHUNK):
        yield chunk


def check_key(key: str) -> str:
    """Refuse any key that could climb out of the archive root (same rules on every backend,
    so an archive moves between them unchanged). Keys are built from validated event ids; this
    is the second line of defence."""
    if (
        not key
        or key.startswith("/")
        or "\\" in key
        or any(part in ("", ".", "..") for part in key.split("/"))
    ):
        raise PermanentError(f"invalid storage key {key[:80]!r}")
    return key


@runtime_checkable
class Storage(Protocol):
    """Where the archive's objects live."""

    def describe(self) -> str:
        """A URI for logs and status: never contains credentials."""
        ...

    def check(self) -> None:
        """Exercise the real write path cheaply (write and remove a probe object).

        Raises ``PermanentError`` naming what is wrong, or ``RetryableError``.
        """
        ...

    def put_if_absent(self, key: str, body: Body) -> bool:
        """Durably store ``body`` at ``key`` unless an object is already there.

        Returns True when written, False when the key already existed (left untouched).
        Returns only once the object is durable.
        """
        ...

    def put(self, key: str, body: bytes) -> None:
        """Atomically create or replace the object at ``key``; durable on return."""
        ...

    def get(self, key: str) -> bytes:
        """The whole object. Raises ``NotFound``."""
        ...

    def get_with_tag(self, key: str) -> tuple[bytes, str]:
        """The whole object and a tag that changes with every write of it. Raises ``NotFound``."""
        ...

    def replace_if(self, key: str, body: bytes, tag: str) -> bool:
        """Atomically replace the object at ``key`` only if it still carries ``tag`` (from
        ``get_with_tag``); durable on return. False, and nothing written, when it was written
        or deleted since."""
        ...

    def open(self, key: str) -> BinaryIO:
        """A streaming reader of the object (caller closes it). Raises ``NotFound``."""
        ...

    def exists(self, key: str) -> bool: ...

    def settle(self, key: str) -> None:
        """Make an object found with ``exists`` as durable as ``put_if_absent`` leaves it, for
        a caller that takes it as stored (a killed writer may have left it half-settled)."""
        ...

    def size(self, key: str) -> int:
        """Size in bytes. Raises ``NotFound``."""
        ...

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[str]:
        """Keys under ``prefix``, in lexicographic order, after ``start_after`` if given."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; a missing key is not an error."""
        ...


def open_storage(uri: str, *, setting: str = "archive.uri", **options: object) -> Storage:
    """Build the backend for an archive URI: ``file:///path``, a plain path, or ``s3://bucket/prefix``.

    ``options`` are backend settings (for S3: region, endpoint_url, credentials, ...); ``setting``
    is the configuration key a bad URI is reported under (``checkpoint.uri`` for a checkpoint).
    """
    if uri.startswith("s3://"):
        from .s3 import S3Storage

        return S3Storage.from_uri(uri, setting=setting, **options)
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(setting, f"unsupported scheme in {uri.split('://')[0]!r}://")
    from .local import LocalStorage

    path = uri[len("file://") :] if uri.startswith("file://") else uri
    if not path:
        raise ConfigError(setting, "empty path")
    if uri.startswith("file://") and not path.startswith("/"):
        # file://var/lib/x names host "var": as a path it would silently be relative.
        raise ConfigError(setting, f"a file:// URI needs an absolute path (file:///...): {uri!r}")
    return LocalStorage(path)
