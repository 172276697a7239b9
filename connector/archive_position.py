"""Where the archive really ends, checked against the checkpoint when ``run`` starts.

The checkpoint says how far the archive is durable; the archive can disagree after an accident
outside the connector: the checkpoint lost (a volume kept apart, a file removed by hand), or the
newest segments lost (a restore of the bucket from an older copy, a deleted folder). Believing
either side alone loses data in silence. Without a checkpoint a first run would recover from
scratch, and what the platform deleted since the archive's end would never be recorded: a
restore brings it back. With segments gone, the checkpoint would carry on after a hole.
"""

from __future__ import annotations

import logging

from .archive.layout import (
    EVENTS_PREFIX,
    MANIFESTS_PREFIX,
    SNAPSHOTS_PREFIX,
    manifest_key_for_segment,
)
from .archive.reader import ArchiveReader
from .checkpoint import Checkpoint
from .errors import ConfigError
from .events import EventId
from .storage import Storage

__all__ = ["adopt_archive", "archive_end", "check_archive_end"]

log = logging.getLogger(__name__)


def adopt_archive(
    archive: Storage, kept_at: str, *, stream_id: str, source_url: str, adopt: bool
) -> Checkpoint | None:
    """A checkpoint for an archive that holds history (segments, or a snapshot: retention
    deletes the segments a snapshot covers, the newest one too on a quiet platform) but has
    none, when the operator says it is this platform's stream (``adopt``: ``run
    --resume-from-archive``); None for an archive with no history (a first run). Refuses
    otherwise, naming both places."""
    if not _holds_history(archive):
        return None
    newest = ArchiveReader(archive).newest()
    reached = archive_end(archive)
    end = str(reached) if reached is not None else None
    if not adopt:
        raise ConfigError(
            "checkpoint.uri",
            f"no checkpoint at {kept_at}, but the archive at {archive.describe()} holds history "
            f"(up to {end or 'an unreadable manifest'}): a first run would recover from "
            "scratch and never record what was deleted since. Put the checkpoint back "
            "(CHECKPOINT_URI names where it is kept), or, if it is lost and the archive holds "
            f"this platform's stream {stream_id!r}, run once with --resume-from-archive",
        )
    if reached is None:
        raise ConfigError(
            "checkpoint.uri",
            f"the archive at {archive.describe()} holds segments but no readable manifest or "
            "snapshot: nothing says where it ends (`opencti-sync verify` shows the damage)",
        )
    if newest is None or newest.last < reached:
        # Only a snapshot holds the end: its segments were pruned.
        log.warning(
            "No checkpoint: resuming after the archive's newest snapshot. Counters start at 0, "
            "and a restore cannot tell a point inside the first recovery.",
            extra={"last_event_id": end},
        )
        # The next segment is chained after the snapshot's position, as after the segments
        # it replaced (verify then knows the history before it was pruned, not absent).
        return Checkpoint(
            stream_id=stream_id,
            source_url=source_url,
            last_event_id=end,
            last_segment_last_id=end,
            acked_event_id=end,
        )
    end = newest.last_event_id
    log.warning(
        "No checkpoint: resuming after the archive's newest segment. Counters start at 0, and a "
        "restore cannot tell a point inside the first recovery.",
        extra={"last_event_id": end, "segment": newest.segment},
    )
    return Checkpoint(
        stream_id=stream_id,
        source_url=source_url,
        last_event_id=end,
        last_segment=newest.segment,
        last_segment_last_id=end,
        acked_event_id=end,
    )


def archive_end(archive: Storage, until: EventId | None = None) -> EventId | None:
    """The newest point the archive can restore to (at or before ``until``): its newest
    segment's last group, or a newer snapshot (retention deletes the segments it covers, the
    newest one too on a quiet platform)."""
    from .snapshot import list_snapshots  # not at import: `run` starts without the state store

    newest = ArchiveReader(archive).newest()
    ends = [newest.last] if newest is not None else []
    ends += [s.as_of for s in list_snapshots(archive) if until is None or s.as_of <= until]
    return max(ends, default=None)


def check_archive_end(archive: Storage, cp: Checkpoint, kept_at: str) -> bool:
    """Move ``cp`` back to the archive's newest segment when the segments it counts as durable
    are gone, so that the stream is read again from there (or a retention gap is found and
    repaired). Returns whether ``cp`` changed. Refuses an archive that lost every segment."""
    recorded = cp.recorded_end
    if not cp.last_segment or recorded is None:
        return False  # nothing archived yet (or a checkpoint from before these fields)
    if archive.exists(manifest_key_for_segment(cp.last_segment)):
        return False
    reached = archive_end(archive)
    if reached is not None and reached >= recorded:
        return False  # a snapshot holds the end, or one manifest is missing (verify reports it)
    newest = ArchiveReader(archive).newest()
    if newest is None:
        raise ConfigError(
            "archive.uri",
            f"the checkpoint at {kept_at} says {cp.events_archived} events were archived up to "
            f"{cp.last_segment_last_id}, but the archive at {archive.describe()} holds no "
            "segment: it was lost, or the archive and the checkpoint are not the same one. To "
            "start a new archive here, delete that checkpoint",
        )
    end = newest.last_event_id
    log.error(
        "The archive's newest segments are gone: reading the stream again from where it ends.",
        extra={"checkpoint_segment_last_id": cp.last_segment_last_id, "archive_end": end},
    )
    cp.last_event_id = end
    cp.last_segment = newest.segment
    cp.last_segment_last_id = end
    # Read the platform's log from there, not its recovery: a recovery resumed inside its
    # window sends again, under ids at or below that point (taken as already stored), the
    # dependencies it had sent with later events, which were lost with those segments. The log
    # holds every change since; had it been trimmed past that point, the connect-time
    # retention check finds the gap and repairs it.
    cp.recover_until = None
    if cp.acked_event_id and EventId.parse(cp.acked_event_id) > newest.last:
        cp.acked_event_id = end
    return True


def _holds_history(archive: Storage) -> bool:
    return any(
        next(iter(archive.list(prefix)), None) is not None
        for prefix in (EVENTS_PREFIX, MANIFESTS_PREFIX, SNAPSHOTS_PREFIX)
    )
