"""Archive object names. They derive from event ids only, never from the clock.

    events/<yyyy>/<mm>/<dd>/<first-group-key>.jsonl.zst    segment (or .jsonl.gz)
    manifests/<yyyy>/<mm>/<dd>/<first-group-key>.json      its manifest, written after it
    quarantine/<after-key>/<sha256-prefix>.json            an unusable event with its reason
    checkpoint.json                                        the resume position (atomic)

``<first-group-key>`` is the zero-padded id ``%015d-%010d`` of the segment's first group, so the
lexicographic order of keys is stream order; the date folders come from that id's milliseconds.
"""

from __future__ import annotations

import datetime as dt

from ..events import EventId

__all__ = [
    "EVENTS_PREFIX",
    "MANIFESTS_PREFIX",
    "QUARANTINE_PREFIX",
    "SNAPSHOTS_PREFIX",
    "CODEC_SUFFIX",
    "segment_key",
    "manifest_key",
    "manifest_key_for_segment",
    "quarantine_key",
    "id_from_key",
]

EVENTS_PREFIX = "events/"
MANIFESTS_PREFIX = "manifests/"
QUARANTINE_PREFIX = "quarantine/"
SNAPSHOTS_PREFIX = "snapshots/"
CODEC_SUFFIX = {"zstd": ".jsonl.zst", "gzip": ".jsonl.gz"}


def _date_path(event_id: EventId) -> str:
    day = dt.datetime.fromtimestamp(event_id.ms / 1000, dt.UTC)
    return f"{day.year:04d}/{day.month:02d}/{day.day:02d}"


def segment_key(first: EventId, codec: str) -> str:
    return f"{EVENTS_PREFIX}{_date_path(first)}/{first.key}{CODEC_SUFFIX[codec]}"


def manifest_key(first: EventId) -> str:
    return f"{MANIFESTS_PREFIX}{_date_path(first)}/{first.key}.json"


def manifest_key_for_segment(segment: str) -> str:
    """The manifest name of a segment key (used by verify to find orphans)."""
    rest = segment[len(EVENTS_PREFIX) :]
    for suffix in CODEC_SUFFIX.values():
        if rest.endswith(suffix):
            return f"{MANIFESTS_PREFIX}{rest[: -len(suffix)]}.json"
    raise ValueError(f"not a segment key: {segment!r}")


def quarantine_key(after: EventId, digest: str) -> str:
    return f"{QUARANTINE_PREFIX}{after.key}/{digest[:32]}.json"


def id_from_key(key: str) -> EventId:
    """The first-group id encoded in a segment or manifest key."""
    name = key.rsplit("/", 1)[-1]
    return EventId.from_key(name.split(".", 1)[0])
