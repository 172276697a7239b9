"""The archive as a sink: batches become segments + manifests, written put-if-absent.

Writing the same batch twice leaves one copy. After a crash between a write and the checkpoint,
the re-delivered events meet what the crashed run stored: on its first write a sink lists the
segments after the batch's ``after_id`` (keys sort in stream order), rebuilds a manifest a crash
left missing, and remembers the highest group stored. Every write then skips the leading groups
at or below that tail and chains the rest after it, as a new segment named by its own first group
id. So however the re-delivered stream is cut into batches (and even when a recovery re-delivers
other ids), no group is stored twice and the manifests chain. A segment found at a write's own
key with the very bytes that write makes (a retry after a failed manifest write or a lost
answer) is counted as that write's.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MalformedEvent, NotFound, PermanentError
from ..events import EventId, StreamEvent
from ..sink import Batch
from ..storage import Storage
from .layout import (
    CODEC_SUFFIX,
    EVENTS_PREFIX,
    id_from_key,
    manifest_key,
    quarantine_key,
    segment_key,
)
from .segment import (
    HashingReader,
    Manifest,
    encode_segment,
    iter_segment_events,
    iter_segment_lines,
    read_manifest,
)

if TYPE_CHECKING:
    from ..files import FileArchiver

__all__ = ["ArchiveSink", "WriteResult"]

log = logging.getLogger(__name__)


class WriteResult:
    """What one ``write`` added (for the checkpoint counters and logs)."""

    def __init__(self) -> None:
        self.events = 0
        self.bytes = 0
        self.segments: list[str] = []
        self.quarantined = 0
        self.skipped = 0
        # The highest group the archive holds after this write (None: no segment known), and
        # the segment that holds it: a batch an earlier run already stored writes nothing, yet
        # the checkpoint must name that run's segment as the archive's newest.
        self.tail: EventId | None = None
        self.tail_segment: str | None = None
        # Segments an earlier run stored past the checkpoint, found by this sink's first read of
        # the archive and not reported before: the checkpoint never counted them.
        self.adopted_segments = 0
        self.adopted_events = 0


class ArchiveSink:
    name = "archive"

    def __init__(
        self,
        storage: Storage,
        *,
        codec: str = "zstd",
        level: int = 3,
        spool_dir: Path | None = None,
        spool_bytes: int = 32 * 1024 * 1024,
        files: FileArchiver | None = None,
    ) -> None:
        self.storage = storage
        self.codec = codec
        self.level = level
        # A segment (and its manifest) past this many bytes is built in a scratch file here.
        self.spool_dir = spool_dir
        self.spool_bytes = spool_bytes
        # Stores the attached files a batch names before its segments (None: not archived).
        self.files = files
        self.last = WriteResult()
        # The highest group stored, once the archive past the first batch's position was read,
        # and the key of the segment holding it.
        self._tail: EventId | None = None
        self._tail_key: str | None = None
        # What ``_scan`` found that no write reported yet: (segments, events).
        self._adopted = (0, 0)
        self._scanned = False
        # Quarantine records stored by an attempt whose write failed after them (see write).
        self._stored_unreported: set[str] = set()

    @property
    def tail(self) -> EventId | None:
        """The highest group id this sink knows to be stored (None before any segment)."""
        return self._tail

    def end(self, after_id: EventId | None) -> EventId | None:
        """The highest group stored, reading once what an earlier run stored past ``after_id``
        (the checkpoint's archive position): where the archive goes on after a retention gap."""
        if not self._scanned:
            self._scan(after_id)
        return _max(self._tail, after_id)

    def check(self) -> None:
        self.storage.check()

    def close(self) -> None:
        if self.files is not None:
            self.files.close()

    def write(self, batch: Batch) -> None:
        result = WriteResult()
        counted: set[str] = set()
        for q in batch.quarantined:
            record = q.record()
            key = quarantine_key(q.after, hashlib.sha256(record).hexdigest())
            # Counted once: a record already there is the same event delivered again (in this
            # batch too), unless an attempt of this batch that failed afterwards stored it.
            stored = self.storage.put_if_absent(key, record)
            if (stored or key in self._stored_unreported) and key not in counted:
                self._stored_unreported.add(key)
                counted.add(key)
                result.quarantined += 1
        if batch.events:
            if not self._scanned:
                self._scan(batch.after_id)
            self._write_events(batch, result)
        result.tail = self._tail
        result.tail_segment = self._tail_key
        result.adopted_segments, result.adopted_events = self._adopted
        self._adopted = (0, 0)
        self._stored_unreported.clear()  # counted in this result
        self.last = result
        if result.segments or result.skipped:
            log.debug(
                "Archive batch stored.",
                extra={"segments": result.segments, "skipped": result.skipped},
            )

    def _scan(self, after_id: EventId | None) -> None:
        """Read what an earlier run stored past ``after_id`` (the checkpoint's archive position):
        segments it wrote before it could move the checkpoint. A segment a crash left without its
        manifest gets one, chained after the segment before it."""
        start = segment_key(after_id, self.codec) if after_id is not None else None
        prev = after_id
        found: list[str] = []
        for key in self.storage.list(EVENTS_PREFIX, start_after=start):
            codec = _codec_of(key)
            if codec is None:
                continue
            try:
                first = id_from_key(key)
            except ValueError:
                # Not a name this connector writes (a copy someone left): verify lists it.
                log.warning("An object that is not a segment was left alone.", extra={"key": key})
                continue
            if after_id is not None and first <= after_id:
                continue  # the same position under the other codec's suffix
            manifest = self._committed_manifest(key, first, prev, codec)
            prev = _max(prev, manifest.last)
            self._raise_tail(manifest.last, key)
            found.append(key)
            segments, events = self._adopted
            self._adopted = (segments + 1, events + manifest.event_count)
        self._scanned = True
        if found:
            log.warning(
                "Segments stored after the checkpoint by an earlier run: their groups are not "
                "stored again.",
                extra={"segments": found, "last_event_id": str(self._tail)},
            )

    def _write_events(self, batch: Batch, result: WriteResult) -> None:
        groups = _group_ids(batch)
        n = len(batch.events)
        after = _max(batch.after_id, self._tail)
        start = 0
        while True:
            # Groups the archive already holds (an earlier run stored them) are not stored again.
            skip_from = start
            while start < n and after is not None and groups[start] <= after:
                start += 1
            result.skipped += start - skip_from
            if start >= n:
                return
            first = groups[start]
            events = batch.events[start:]
            key = segment_key(first, self.codec)
            encoded = encode_segment(
                key,
                # Each event's attached files are stored as it is encoded: durable before the
                # segment that names them is written.
                events if self.files is None else self.files.passing(events),
                first=first,
                last=batch.last_id,
                codec=self.codec,
                level=self.level,
                after=after,
                spool_dir=self.spool_dir,
                spool_bytes=self.spool_bytes,
                files=self.files is not None,
            )
            try:
                manifest = encoded.manifest
                if encoded.spooled:
                    log.info(
                        "A segment too large for memory (a huge dependency group) was built in "
                        "scratch files in the work dir.",
                        extra={"segment": key, "events": manifest.event_count},
                    )
                if self.storage.put_if_absent(key, encoded.body()):
                    self.storage.put_if_absent(manifest_key(first), encoded.manifest_body())
                    stored = None
                else:
                    # The key exists: an earlier attempt wrote these groups before it could
                    # checkpoint.
                    stored = self._committed_manifest(key, first, after, self.codec)
            finally:
                encoded.close()
            if stored is None or (
                # The very segment this write makes (a retry after a failed manifest write, an
                # answer lost, a crashed run's identical batch): this write's, counted as such.
                stored.sha256 == manifest.sha256 and stored.last == batch.last_id
            ):
                # Only now: a retry after a failed manifest write must meet the segment again.
                self._raise_tail(batch.last_id, key)
                result.events += manifest.event_count
                result.bytes += manifest.size
                result.segments.append(key)
                return
            covered = stored.last
            if covered < first:
                raise PermanentError(f"archive manifest of {key} ends before its first group")
            self._raise_tail(covered, key)
            after = _max(after, covered)

    def _raise_tail(self, last: EventId, key: str) -> None:
        if self._tail is None or last > self._tail:
            self._tail, self._tail_key = last, key

    def _committed_manifest(
        self, key: str, first: EventId, after: EventId | None, codec: str
    ) -> Manifest:
        """The manifest of an existing segment; rebuilt when a crash left the segment alone."""
        mkey = manifest_key(first)
        try:
            return read_manifest(self.storage, mkey)
        except NotFound:
            pass
        except MalformedEvent as exc:
            raise PermanentError(f"archive manifest {mkey} is damaged: {exc.reason}") from exc
        # Streamed once (the segment may hold a huge group): its highest event id is found as
        # the rows are encoded, and set in the manifest before it is written.
        last: EventId | None = None

        def tracked(events: Iterator[StreamEvent]) -> Iterator[StreamEvent]:
            nonlocal last
            for ev in events:
                if last is None or ev.id > last:
                    last = ev.id
                yield ev

        with self.storage.open(key) as fh:
            # Hashed as read: the manifest describes the bytes stored, not a re-encoding of them.
            tee = HashingReader(fh)
            encoded = encode_segment(
                key,
                tracked(
                    iter_segment_events(iter_segment_lines(io.BufferedReader(tee, 1 << 20), codec))
                ),
                first=first,
                last=first,
                codec=codec,
                level=self.level,
                after=after,
                spool_dir=self.spool_dir,
                spool_bytes=self.spool_bytes,
                # As the run that wrote it (files are written before their segment): a manifest
                # without it tells verify the segment's files were never archived.
                files=self.files is not None,
            )
            tee.drain()
        try:
            if last is None:
                raise PermanentError(f"archive segment {key} exists but holds no events")
            manifest = encoded.manifest
            manifest.last_event_id = str(max(last, first))
            manifest.size = tee.size
            manifest.sha256 = tee.sha.hexdigest()
            self.storage.put_if_absent(mkey, encoded.manifest_body())
        finally:
            encoded.close()
        log.warning("Rebuilt the manifest of a segment left without one.", extra={"segment": key})
        return manifest


def _max(a: EventId | None, b: EventId | None) -> EventId | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _codec_of(key: str) -> str | None:
    for codec, suffix in CODEC_SUFFIX.items():
        if key.endswith(suffix):
            return codec
    return None


def _group_ids(batch: Batch) -> list[EventId]:
    """The group id (stream high-water mark) of each event of the batch."""
    out: list[EventId] = []
    hwm = batch.first_id
    for ev in batch.events:
        if ev.id > hwm:
            hwm = ev.id
        out.append(hwm)
    return out
