"""Reading the archive back, in stream order, one segment at a time (never all in memory)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import MalformedEvent, NotFound, PermanentError
from ..events import EventId, StreamEvent
from ..storage import Storage
from .layout import MANIFESTS_PREFIX
from .segment import Manifest, iter_segment_events, iter_segment_lines, read_manifest

__all__ = ["ArchiveReader", "SegmentRef", "group_filter"]


def group_filter(
    events: Iterator[StreamEvent], first: EventId, done: EventId | None, until: EventId | None
) -> Iterator[StreamEvent]:
    """The events of one segment whose group id is in ``(done, until]``.

    The group id is the running maximum of event ids from the segment's first group id.
    """
    hwm = first
    for ev in events:
        if ev.id > hwm:
            hwm = ev.id
        if done is not None and hwm <= done:
            continue
        if until is not None and hwm > until:
            return
        yield ev


@dataclass(frozen=True, slots=True)
class SegmentRef:
    manifest_key: str
    manifest: Manifest


class ArchiveReader:
    """Iterates manifests and events of an archive in stream order."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def manifests(
        self, *, start_after: str | None = None, rows: bool = False
    ) -> Iterator[SegmentRef]:
        """Every committed segment's manifest, in key (= stream) order; with its per-event
        rows (``objects``) only if ``rows`` (a huge group's are tens of MB)."""
        for key in self.storage.list(MANIFESTS_PREFIX, start_after=start_after):
            if not key.endswith(".json"):
                continue
            try:
                manifest = (
                    Manifest.from_json(self.storage.get(key))
                    if rows
                    else read_manifest(self.storage, key)
                )
            except NotFound:
                continue  # removed by retention while we listed
            except MalformedEvent as exc:
                raise PermanentError(f"archive manifest {key} is damaged: {exc.reason}") from exc
            yield SegmentRef(key, manifest)

    def newest(self) -> Manifest | None:
        """The newest readable manifest (the archive's end), or None for an empty archive."""
        keys = [k for k in self.storage.list(MANIFESTS_PREFIX) if k.endswith(".json")]
        for key in reversed(keys):
            try:
                return read_manifest(self.storage, key)
            except (NotFound, MalformedEvent):
                continue  # pruned while we listed, or torn: the one before is the end we can read
        return None

    def segment_events(self, manifest: Manifest) -> Iterator[StreamEvent]:
        with self.storage.open(manifest.segment) as fh:
            yield from iter_segment_events(iter_segment_lines(fh, manifest.codec))

    def events(
        self, *, after: EventId | None = None, until: EventId | None = None
    ) -> Iterator[StreamEvent]:
        """Events with group id in ``(after, until]``, each segment read as a stream.

        Segments hold whole, disjoint groups; a segment that overlaps the one before (possible
        only after manual copying) contributes only its groups above what was already read.
        """
        done = after
        for ref in self.manifests():
            m = ref.manifest
            if done is not None and m.last <= done:
                continue
            if until is not None and m.first > until:
                return
            yield from group_filter(self.segment_events(m), m.first, done, until)
            if until is not None and m.last > until:
                return
            done = m.last if done is None else max(done, m.last)
