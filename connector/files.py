"""Attached files: an entity's uploaded documents (a report's PDF, an artifact's sample).

The stream carries only their description, in ``extensions[octi].files``: ``{name, uri, version,
mime_type}`` with ``uri = /storage/get/<file id>`` on the source platform. The archive sink
downloads each file an archived event names, once per ``(uri, version)`` (an update of a report
names all its files again), and stores the bytes under a key derived from that pair, before the
batch's segments: the checkpoint then only moves past an event once its files are durable too.
A file the platform no longer has (deleted since the event, or not readable by the connector's
user) gets a small ``.missing`` record instead, with the reason, so that ``verify`` and a restore
can tell "gone upstream" from "lost in the archive". A restore puts the bytes back inline
(``data``, base64), the way the platform's own synchronizer pushes them, and the platform's
worker uploads them.

    files/<hh>/<sha256 of "uri\\nversion">            the file's bytes
    files/<hh>/<sha256 of "uri\\nversion">.missing    why there are none (JSON)
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote, urlsplit

import httpx
import orjson

from . import __version__, metrics
from .archive.spool import Spool
from .errors import NotFound, RetryableError
from .events import StreamEvent, octi_ext
from .source import tls_verify
from .storage import Storage

__all__ = [
    "FILES_MARK",
    "FILES_PREFIX",
    "Downloads",
    "FileArchiver",
    "FileCarrier",
    "FileFetcher",
    "Gone",
    "Inlined",
    "file_entries",
    "file_key",
    "missing_key",
    "names_files",
    "each_file_inline",
    "with_file_data",
]

log = logging.getLogger(__name__)

FILES_PREFIX = "files/"
_URI_PREFIX = "/storage/get/"
# Cheap test on raw JSON before any parse: a non-empty files list.
FILES_MARK = b'"files":[{'
_REMEMBERED = 100_000  # (uri, version) pairs known stored, so an update does not ask again
# A file the platform keeps refusing (5xx, 403, a redirect) this often, over this long, is
# recorded as missing.
_GIVE_UP_ATTEMPTS = 5
_GIVE_UP_SECS = 600.0


_REASONS = {
    0: "its uri cannot be requested (too long for a URL)",
    503: "gone from the platform, or not readable by the connector's user",
}


def names_files(ev: StreamEvent) -> bool:
    """Whether the event names attached files (read when it was parsed: no parse here)."""
    return ev.files and ev.event != "delete"


def file_entries(stix: dict[str, Any]) -> list[dict[str, Any]]:
    """The object's attached files that the platform serves (``/storage/get/...``)."""
    files = octi_ext(stix).get("files")
    if not isinstance(files, list):
        return []
    return [
        f
        for f in files
        if isinstance(f, dict)
        and isinstance(f.get("uri"), str)
        and f["uri"].startswith(_URI_PREFIX)
        and isinstance(f.get("name"), str)
    ]


def _digest(entry: dict[str, Any]) -> str:
    version = entry.get("version")
    text = f"{entry['uri']}\n{version if isinstance(version, str) else ''}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def file_key(entry: dict[str, Any]) -> str:
    """Where the bytes of this version of the file are archived (from the event, never the
    clock: the same entry always names the same object)."""
    digest = _digest(entry)
    return f"{FILES_PREFIX}{digest[:2]}/{digest}"


def missing_key(entry: dict[str, Any]) -> str:
    return file_key(entry) + ".missing"


def _not_found(response: httpx.Response) -> bool:
    """The platform's answer for a file it does not have (or that this user may not read):
    503 with "File not found or restricted" (its storage route's catch-all)."""
    body = b""
    for chunk in response.iter_bytes(4096):
        body += chunk
        if len(body) >= 4096:
            break
    return b"not found or restricted" in body.lower()


class PlatformRefused(RetryableError):
    """The platform answered a download, but not with the file (5xx, 403, a redirect): retried,
    and recorded as missing once it has lasted (``FileArchiver``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class FileFetcher:
    """Downloads files from the source platform with the connector's token."""

    def __init__(self, url: str, token: str, *, verify: bool | str = True, timeout: float = 60.0):
        self._url = url.rstrip("/")
        self._token = token
        self._verify = verify
        self._timeout = timeout
        self._http: httpx.Client | None = None

    @property
    def _client(self) -> httpx.Client:
        # Made at the first download: a TLS context costs CPU at start-up, and most batches
        # name no file.
        if self._http is None:
            self._http = httpx.Client(
                base_url=self._url,
                headers={
                    "Authorization": f"Bearer {self._token}",
                    "User-Agent": f"opencti-sync/{__version__}",
                },
                timeout=httpx.Timeout(self._timeout),
                verify=tls_verify(self._verify),
                follow_redirects=False,
            )
        return self._http

    def download(self, uri: str, into: Spool, *, limit: int | None = None) -> int | None:
        """Stream the file at ``uri`` into ``into``: None when done, else the HTTP status of an
        answer meaning the file is gone (404, 410; the platform's 503 "File not found or
        restricted", or its redirect to its root in older versions), or 0 for a uri no request
        can carry. Raises ``PlatformRefused`` for answers that may or may not pass (5xx, 403: a
        token refused or a file not readable by this user, another redirect) and
        ``RetryableError`` for the rest (network, 401, 429). With ``limit``, reading stops once
        ``into`` holds more than that (the caller sees ``into.size > limit``)."""
        # The uri holds the file id as is (spaces, '#', '?', '%' and all): each character is
        # sent encoded, and the platform's route decodes the path back into the id.
        path = quote(uri, safe="/")
        try:
            request = self._client.build_request("GET", path)
        except httpx.InvalidURL:
            return 0  # a control character, or longer than any URL: no platform serves it
        try:
            with closing(self._client.send(request, stream=True)) as response:
                status = response.status_code
                if status in (404, 410):
                    return status
                if status == 503 and _not_found(response):
                    return status
                if response.is_redirect:
                    location = urlsplit(response.headers.get("location", "")).path
                    if location in ("", "/"):
                        return status
                if status >= 500 or status == 403 or response.is_redirect:
                    raise PlatformRefused(status, f"file download {uri!r}: HTTP {status}")
                if status != 200:
                    raise RetryableError(f"file download {uri!r}: HTTP {status}")
                for chunk in response.iter_bytes(1 << 20):
                    into.write(chunk)
                    if limit is not None and into.size > limit:
                        break
        except httpx.HTTPError as exc:
            text = str(exc).replace(self._token, "***")
            raise RetryableError(f"file download {uri!r}: {type(exc).__name__}: {text}") from exc
        return None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None


class Gone(NamedTuple):
    """Why a download brought no file: the platform's answer (0: no request could carry the
    uri) and the reason in words."""

    status: int
    reason: str


class Downloads:
    """``FileFetcher`` downloads with patience for a platform that answers, but not with the
    file (5xx, 403, a redirect): the error is raised, so the batch (and the checkpoint) waits and
    retries, until the same file has failed long enough to be this file's problem (broken in the
    platform's storage, not readable by this user) rather than a restart or a token being
    replaced. Then it counts as gone, so that one file cannot stop the sync."""

    def __init__(self, fetcher: FileFetcher, *, clock: Callable[[], float] = time.monotonic):
        self.fetcher = fetcher
        # Files the platform keeps refusing: first refusal time, attempts.
        self._failing: dict[str, tuple[float, int]] = {}
        self._clock = clock

    def fetch(self, key: str, uri: str, into: Spool, *, limit: int | None = None) -> Gone | None:
        """Download ``uri`` (archived as ``key``) into ``into``; None when done."""
        try:
            refused = self.fetcher.download(uri, into, limit=limit)
        except PlatformRefused as exc:
            now = self._clock()
            first, attempts = self._failing.get(key, (now, 0))
            attempts += 1
            self._failing[key] = (first, attempts)
            if attempts < _GIVE_UP_ATTEMPTS or now - first < _GIVE_UP_SECS:
                raise
            self._failing.pop(key, None)
            return Gone(exc.status, f"the platform failed to serve it {attempts} times")
        self._failing.pop(key, None)
        if refused is None:
            return None
        return Gone(refused, _REASONS.get(refused, "gone from the platform"))

    def close(self) -> None:
        self.fetcher.close()


class FileArchiver:
    """Stores the files a batch's events name, before the batch itself."""

    def __init__(
        self,
        storage: Storage,
        fetcher: FileFetcher,
        *,
        spool_dir: Path | None = None,
        spool_bytes: int = 32 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage = storage
        self.downloads = Downloads(fetcher, clock=clock)
        self.spool_dir = spool_dir
        self.spool_bytes = spool_bytes
        self._known: OrderedDict[str, None] = OrderedDict()

    def store(self, events: Iterable[StreamEvent]) -> None:
        for _ev in self.passing(events):
            pass

    def passing(self, events: Iterable[StreamEvent]) -> Iterator[StreamEvent]:
        """``events``, each yielded once its files are stored: the segment encoder reads the
        batch through this, so a group spilled to disk is read once, not once more for files."""
        for ev in events:
            if names_files(ev):
                for entry in file_entries(ev.stix):
                    self._store(entry, ev)
            yield ev

    def _store(self, entry: dict[str, Any], ev: StreamEvent) -> None:
        key = file_key(entry)
        if key in self._known:
            self._known.move_to_end(key)
            return
        found = next((k for k in (key, key + ".missing") if self.storage.exists(k)), None)
        if found is None:
            self._download(key, entry, ev)
        else:
            # A killed run may have left it in place half-settled: the segment naming it is
            # about to be called durable.
            self.storage.settle(found)
        self._known[key] = None
        if len(self._known) > _REMEMBERED:
            self._known.popitem(last=False)

    def _download(self, key: str, entry: dict[str, Any], ev: StreamEvent) -> None:
        spool = Spool(self.spool_dir, self.spool_bytes, "file-")
        try:
            gone = self.downloads.fetch(key, entry["uri"], spool)
            if gone is None:
                if self.storage.put_if_absent(key, spool.body()):
                    metrics.FILES.labels(result="stored").inc()
                return
        finally:
            spool.close()
        name = _short(entry["name"])
        record = {
            "uri": _short(entry["uri"]),
            "version": entry.get("version"),
            "name": name,
            "object": ev.stix_id,
            "event_id": ev.id_text,
            "status": gone.status,
            "reason": gone.reason,
        }
        if self.storage.put_if_absent(key + ".missing", orjson.dumps(record)):
            metrics.FILES.labels(result="missing").inc()
        log.error(
            f"An attached file could not be archived: {gone.reason}.",
            extra={"file": name, "object": ev.stix_id, "status": gone.status},
        )

    def close(self) -> None:
        self.downloads.close()


class Inlined(NamedTuple):
    stix: dict[str, Any]  # the object, each file's bytes inline
    inline: int
    lacking: list[str]  # names with no bytes to send (gone from the platform)
    too_large: list[str]  # names left out for their size
    keys: tuple[str, ...] = ()  # ``file_key`` of each file sent inline


class _TooLarge(Exception):
    pass


def with_file_data(
    stix: dict[str, Any], storage: Storage, *, max_bytes: int | None = None
) -> Inlined:
    """The object with each archived file's bytes inline (``data``, base64), as the platform's
    worker imports them. A file above ``max_bytes`` is left out: the platform refuses a request
    above its ``max_payload_body_size`` (50 MB by default, base64 adds a third), and the object
    goes through without it. The object and its files are held in memory, base64 included
    (about 2.5 times the files' size)."""
    entries = file_entries(stix)
    if not entries:
        return Inlined(stix, 0, [], [])
    out = orjson.loads(orjson.dumps(stix))
    done = Inlined(out, 0, [], [])
    inline = 0
    for f in octi_ext(out)["files"]:
        if f not in entries:
            continue
        key = file_key(f)
        try:
            if max_bytes is not None and storage.size(key) > max_bytes:
                done.too_large.append(str(f["name"]))
                continue
            with storage.open(key) as fh:
                f["data"] = _b64(fh)
            inline += 1
        except NotFound:
            done.lacking.append(str(f["name"]))
    return done._replace(inline=inline)


class FileCopy(NamedTuple):
    name: str  # the file's name on its object
    stix: dict[str, Any] | None  # the object with this one file's bytes inline; None: not sent
    why: str = ""  # when not sent: "lacking" (not in the archive) or "too_large"


def _with_one_file(stix: dict[str, Any], entry: dict[str, Any], data: str) -> dict[str, Any]:
    """A copy of ``stix`` with ``data`` (base64) inline in its file ``entry``, and no other."""
    out: dict[str, Any] = orjson.loads(orjson.dumps(stix))
    for f in octi_ext(out)["files"]:
        if f == entry:
            f["data"] = data
            break
    return out


def each_file_inline(
    stix: dict[str, Any], storage: Storage, *, max_bytes: int | None = None
) -> Iterator[FileCopy]:
    """The object once per archived file, with that one file's bytes inline (read as the copy
    is asked for), for a restore to push after the object itself: a request and the memory
    then hold one file (about 2.5 times its size), and files that each fit the platform's
    request limit all go, however many the object has. A file not in the archive, or above
    ``max_bytes``, comes as a copy without an object, saying why."""
    for entry in file_entries(stix):
        key, name = file_key(entry), str(entry["name"])
        try:
            if max_bytes is not None and storage.size(key) > max_bytes:
                yield FileCopy(name, None, "too_large")
                continue
            with storage.open(key) as fh:
                data = _b64(fh)
        except NotFound:
            yield FileCopy(name, None, "lacking")
            continue
        out = _with_one_file(stix, entry, data)
        del data  # held by ``out`` alone: let go with it, before the next file is read
        yield FileCopy(name, out)


class FileCarrier:
    """The attached files of objects synced live into a second platform, as the platform's own
    Synchronizer sends them: inline (``data``, base64), the worker's import uploads them. The
    bytes are read from the archive when its sink stored them (the pipeline writes each batch
    to the archive before the target), else downloaded from the source.

    The target sends each object as before, without bytes, then the object once more per file
    to carry, that file's bytes inline (``one_by_one``): memory and request size are bounded by
    one file, not by an object's files together, and a bundle is never cut around an object
    (its references still arrive with it). A (uri, version) the target acknowledged, or found
    gone or too large, is not sent again this run (an update of a report names all its files
    again, and the import leaves a file named without ``data`` as it is); within a batch the
    first event naming it claims it. A delete forgets the object's files, so that an object
    that comes back gets them again. A restart sends each once more (the same bytes)."""

    def __init__(
        self,
        *,
        archive: Storage | None,
        downloads: Downloads | None,
        max_bytes: int,
        spool_dir: Path | None = None,
        spool_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self.archive = archive
        self.downloads = downloads
        self.max_bytes = max_bytes
        self.spool_dir = spool_dir
        self.spool_bytes = spool_bytes
        self._done: OrderedDict[str, None] = OrderedDict()
        self._claimed: set[str] = set()  # by a message or push of the batch being written
        # Claimed by a message built before its object's delete: that message's acknowledgement
        # does not carry the file for the object that comes back.
        self._stale: set[str] = set()

    def begin(self) -> None:
        """A batch is written (again): what the last attempt claimed is free again."""
        self._claimed.clear()
        self._stale.clear()

    def _todo(self, stix: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            e
            for e in file_entries(stix)
            if (key := file_key(e)) not in self._done and key not in self._claimed
        ]

    def pending(self, stix: dict[str, Any]) -> bool:
        """Whether ``stix`` names a file not carried or claimed yet."""
        return bool(self._todo(stix))

    def one_by_one(self, stix: dict[str, Any]) -> Iterator[Inlined]:
        """``stix`` once per file to carry, with that file's bytes inline (``keys`` names it),
        read as the copy is asked for. Each is claimed until ``carried``, ``left_out`` or
        ``release``. Files gone from the source or too large are counted and said here."""
        for entry in self._todo(stix):
            key = file_key(entry)
            if key in self._claimed or key in self._done:
                continue  # named twice by the object
            self._claimed.add(key)
            name, obj = str(entry["name"]), stix.get("id")
            try:
                data = self._read(entry)
            except NotFound:
                log.warning(
                    "An attached file the source no longer has: the target gets the object "
                    "without it.",
                    extra={"object": obj, "file": name},
                )
                self._settle([key], "gone", claimed_now=True)
                continue
            except _TooLarge:
                self.left_out([key], obj, [name], "above target.max_file_mb", claimed_now=True)
                continue
            out = _with_one_file(stix, entry, data)
            del data  # held by ``out`` alone: let go with it, before the next file is read
            yield Inlined(out, 1, [], [], (key,))

    def carried(self, keys: Iterable[str]) -> None:
        """The files ``keys`` reached the target (the push or message was acknowledged)."""
        self._settle(list(keys), "sent")

    def left_out(
        self,
        keys: Iterable[str],
        obj: Any,
        names: list[str],
        why: str,
        *,
        claimed_now: bool = False,
    ) -> None:
        """Files not sent for their size (``why``): counted, said, not tried again."""
        log.warning(
            f"Attached files too large to carry to the target ({why}) were left out: upload "
            "them by hand, or raise the limit.",
            extra={"object": obj, "files": names},
        )
        self._settle(list(keys), "too_large", claimed_now=claimed_now)

    def refused(self, keys: Iterable[str], obj: Any, names: list[str], reason: str) -> None:
        """Files the target refused (its error names the object): counted, said."""
        log.warning(
            "The target refused an object with an attached file inline; the object is there, "
            "the file is not.",
            extra={"object": obj, "files": names, "reason": reason[:300]},
        )
        self._settle(list(keys), "refused")

    def release(self, keys: Iterable[str]) -> None:
        """Files claimed by a message that was not sent (its event was quarantined)."""
        for key in keys:
            if key in self._stale:
                self._stale.discard(key)  # a later event's claim of it stands
            else:
                self._claimed.discard(key)

    def forget(self, stix: dict[str, Any]) -> None:
        """The object was deleted: its files go with it on the target, and the object coming
        back, in this batch too, carries them again."""
        for entry in file_entries(stix):
            key = file_key(entry)
            self._done.pop(key, None)
            if key in self._claimed:  # its message is not acknowledged yet (amqp)
                self._claimed.discard(key)
                self._stale.add(key)

    def _settle(self, keys: list[str], result: str, *, claimed_now: bool = False) -> None:
        """``claimed_now``: settled as it is claimed (``one_by_one``), so not a stale claim."""
        for key in keys:
            if key in self._stale and not claimed_now:
                self._stale.discard(key)  # carried to the object since deleted: not done
                continue
            self._claimed.discard(key)
            if key not in self._done:
                metrics.TARGET_FILES.labels(result=result).inc()
            self._done[key] = None
            self._done.move_to_end(key)
        while len(self._done) > _REMEMBERED:
            self._done.popitem(last=False)

    def _read(self, entry: dict[str, Any]) -> str:
        key = file_key(entry)
        if self.archive is not None:
            try:
                if self.archive.size(key) > self.max_bytes:
                    raise _TooLarge
                with self.archive.open(key) as fh:
                    return _b64(fh)
            except NotFound:
                if self.archive.exists(key + ".missing"):
                    raise  # the archive's run found it gone: not asked again
        if self.downloads is None:
            raise NotFound(key)
        spool = Spool(self.spool_dir, self.spool_bytes, "file-")
        try:
            gone = self.downloads.fetch(key, entry["uri"], spool, limit=self.max_bytes)
            if gone is not None:
                raise NotFound(f"{key}: {gone.reason}")
            if spool.size > self.max_bytes:
                raise _TooLarge
            body = spool.body()
            if isinstance(body, bytes):
                return base64.b64encode(body).decode("ascii")
            body.seek(0)
            return _b64(body)
        finally:
            spool.close()

    def close(self) -> None:
        if self.downloads is not None:
            self.downloads.close()


def _short(text: str, limit: int = 1024) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _b64(fh: Any) -> str:
    # Encoded 3 MiB at a time (a multiple of 3: the pieces join into one valid encoding).
    parts: Iterator[bytes] = iter(lambda: fh.read(3 << 20), b"")
    return "".join(base64.b64encode(p).decode("ascii") for p in parts)
