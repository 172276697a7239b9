"""The checkpoint: where the stream resumes after a restart.

One small versioned JSON object (``checkpoint.json``) in a storage backend, replaced atomically
(local: tmp + fsync + rename; S3: a single PUT). It records the last *complete* event id whose
events every sink has made durable, plus what a restart needs to continue exactly: the recover
end date of the first run (so a restart during recovery neither skips nor restarts it) and any
pending delete reconciliation after a retention gap. Only the pipeline saves it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .errors import CheckpointError, NotFound
from .events import EventId
from .storage import Storage, open_storage

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["CHECKPOINT_KEY", "Checkpoint", "CheckpointStore", "configured_store"]

CHECKPOINT_KEY = "checkpoint.json"
VERSION = 1


@dataclass
class Checkpoint:
    stream_id: str
    source_url: str
    last_event_id: str | None = None
    # ISO date the first run recovers up to; None: no recover; "" never used.
    recover_until: str | None = None
    # The first run's recovery end, never changed after (a retention-gap repair moves
    # ``recover_until``): before it the archive holds objects only as they were at its end.
    first_recover_until: str | None = None
    # The platform refused recovery for this stream (7.x ``no-recover``): never send it again.
    recover_refused: bool = False
    events_archived: int = 0
    segments_written: int = 0
    quarantined: int = 0
    last_segment: str | None = None
    # Last group id of the last segment written (the next segment continues from it).
    last_segment_last_id: str | None = None
    # Last group of the last batch every sink acknowledged. The archive can end past it (an
    # earlier run stored more before it could checkpoint) where a target may not: a retention
    # gap's reconciliation brings the target from here.
    acked_event_id: str | None = None
    # Set when the stream's retention passed the checkpoint: the ids and dates of the repair.
    reconcile: dict[str, Any] | None = None
    retention_gaps: list[dict[str, Any]] = field(default_factory=list)
    # Everything the stream delivered up to this id was whole (no trim overtook the platform's
    # reader below it): the next run's first look at the stream's retention compares with it.
    retained_through: str | None = None
    saved_at: str | None = None

    @property
    def first_recovery_end(self) -> str | None:
        """``first_recover_until``; for a checkpoint written before that field, ``recover_until``
        when no retention-gap repair can have moved it."""
        if self.first_recover_until:
            return self.first_recover_until
        return None if self.retention_gaps else self.recover_until

    @property
    def recorded_end(self) -> EventId | None:
        """Where this checkpoint says the archive's segments end: the last group id of the last
        segment written (None before any, or when malformed)."""
        end = self.last_segment_last_id
        return EventId.parse(end) if end and EventId.is_valid(end) else None

    def to_json(self) -> bytes:
        body = {"version": VERSION, **asdict(self)}
        return orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes) -> Checkpoint:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise CheckpointError(f"checkpoint is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict) or obj.get("version") != VERSION:
            raise CheckpointError(
                f"unsupported checkpoint version {obj.get('version') if isinstance(obj, dict) else None!r}"
            )
        obj.pop("version")
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in obj.items() if k in known})
        except TypeError as exc:
            raise CheckpointError(f"checkpoint is missing fields: {exc}") from exc


class CheckpointStore:
    """Loads and atomically saves the checkpoint object in a storage backend."""

    def __init__(self, storage: Storage, key: str = CHECKPOINT_KEY) -> None:
        self.storage = storage
        self.key = key

    def load(self) -> Checkpoint | None:
        try:
            data = self.storage.get(self.key)
        except NotFound:
            return None
        try:
            return Checkpoint.from_json(data)
        except CheckpointError as exc:
            # Name the file and the way out: an operator edits or replaces it by hand.
            raise CheckpointError(
                f"{self.storage.describe()} ({self.key}): {exc}. Put back a good copy; if none "
                "is left, move it aside and run once with --resume-from-archive"
            ) from exc

    def save(self, checkpoint: Checkpoint) -> None:
        checkpoint.saved_at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        self.storage.put(self.key, checkpoint.to_json())


def configured_store(settings: Settings, archive: Storage | None) -> CheckpointStore:
    """Where ``run`` keeps its checkpoint: ``checkpoint.uri`` when set, else the archive, else
    ``./opencti-sync-state``. Every command that reads it (status, restore, verify) looks there,
    so a checkpoint kept apart from the archive still guards a restore and a verify."""
    if settings.checkpoint.uri:
        return CheckpointStore(
            open_storage(settings.checkpoint.uri, setting="checkpoint.uri", **settings.s3_options())
        )
    return CheckpointStore(archive if archive is not None else open_storage("./opencti-sync-state"))
