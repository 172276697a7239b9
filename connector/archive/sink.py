"""The archive as a sink: batches become segments + manifests, written put-if-absent.

Writing the same batch twice leaves one copy. After a crash between a write and the checkpoint,
the re-delivered events meet the existing segment: its manifest says which groups it holds, those
are skipped, and the rest is written as a new segment named by its own first group id.
"""

from __future__ import annotations

import hashlib
import logging

from ..errors import MalformedEvent, NotFound, PermanentError
from ..events import EventId
from ..sink import Batch
from ..storage import Storage
from .layout import manifest_key, quarantine_key, segment_key
from .segment import Manifest, encode_segment, iter_segment_events, iter_segment_lines

__all__ = ["ArchiveSink", "WriteResult"]

log = logging.getLogger(__name__)


class WriteResult:
    """What the last ``write`` added (for the checkpoint counters and logs)."""

    def __init__(self) -> None:
        self.events = 0
        self.bytes = 0
        self.segments: list[str] = []
        self.quarantined = 0
        self.skipped = 0


class ArchiveSink:
    name = "archive"

    def __init__(self, storage: Storage, *, codec: str = "zstd", level: int = 3) -> None:
        self.storage = storage
        self.codec = codec
        self.level = level
        self.last = WriteResult()

    def check(self) -> None:
        self.storage.check()

    def close(self) -> None:
        return None

    def write(self, batch: Batch) -> None:
        result = WriteResult()
        for q in batch.quarantined:
            digest = hashlib.sha256(q.record()).hexdigest()
            if self.storage.put_if_absent(quarantine_key(q.after, digest), q.record()):
                result.quarantined += 1
        groups = _group_ids(batch)
        after = batch.after_id
        start = 0
        while start < len(batch.events):
            first = groups[start]
            events = batch.events[start:]
            key = segment_key(first, self.codec)
            body, manifest = encode_segment(
                key,
                events,
                first=first,
                last=batch.last_id,
                codec=self.codec,
                level=self.level,
                after=after,
            )
            written = self.storage.put_if_absent(key, body)
            if written:
                self.storage.put_if_absent(manifest_key(first), manifest.to_json())
                result.events += len(events)
                result.bytes += len(body)
                result.segments.append(key)
                break
            # The key exists: an earlier run wrote these groups before it could checkpoint.
            existing = self._committed_manifest(key, first, after)
            covered = existing.last
            if covered >= batch.last_id:
                result.skipped += len(events)
                break
            skip = start
            while skip < len(batch.events) and groups[skip] <= covered:
                skip += 1
            result.skipped += skip - start
            start = skip
            after = covered
        self.last = result
        if result.segments or result.skipped:
            log.debug(
                "Archive batch stored.",
                extra={"segments": result.segments, "skipped": result.skipped},
            )

    def _committed_manifest(self, key: str, first: EventId, after: EventId | None) -> Manifest:
        """The manifest of an existing segment; rebuilt when a crash left the segment alone."""
        mkey = manifest_key(first)
        try:
            return Manifest.from_json(self.storage.get(mkey))
        except NotFound:
            pass
        except MalformedEvent as exc:
            raise PermanentError(f"archive manifest {mkey} is damaged: {exc.reason}") from exc
        with self.storage.open(key) as fh:
            events = list(iter_segment_events(iter_segment_lines(fh, self.codec)))
        if not events:
            raise PermanentError(f"archive segment {key} exists but holds no events")
        last = max(ev.id for ev in events)
        body = self.storage.get(key)
        _, manifest = encode_segment(
            key,
            events,
            first=first,
            last=max(last, first),
            codec=self.codec,
            level=self.level,
            after=after,
        )
        # Describe the bytes actually stored, not a re-encoding of them.
        manifest.size = len(body)
        manifest.sha256 = hashlib.sha256(body).hexdigest()
        self.storage.put_if_absent(mkey, manifest.to_json())
        log.warning("Rebuilt the manifest of a segment left without one.", extra={"segment": key})
        return manifest


def _group_ids(batch: Batch) -> list[EventId]:
    """The group id (stream high-water mark) of each event of the batch."""
    out: list[EventId] = []
    hwm = batch.first_id
    for ev in batch.events:
        if ev.id > hwm:
            hwm = ev.id
        out.append(hwm)
    return out
