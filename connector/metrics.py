"""Prometheus metrics (prometheus-client), in one registry of our own.

Names follow Prometheus conventions: ``opencti_sync_`` prefix, ``_total`` counters, base units
(seconds, bytes). Nothing here carries a secret: labels are event names, sink names and error
kinds only. The endpoint is off by default (``metrics.enabled``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    disable_created_metrics,
    start_http_server,
)

from . import __version__

__all__ = [
    "REGISTRY",
    "BUILD_INFO",
    "RECOVER_PROGRESS",
    "CHECKPOINT_LAG",
    "CHECKPOINT_SAVED",
    "CHECKPOINT_TIMESTAMP",
    "ERRORS",
    "EVENTS_RECEIVED",
    "EVENTS_WRITTEN",
    "FILES",
    "QUARANTINED",
    "RECONNECTS",
    "RESTORE_PROGRESS",
    "RETENTION_GAPS",
    "RETRIES",
    "SEGMENT_BYTES",
    "SEGMENTS_WRITTEN",
    "TARGET_FILES",
    "DELETIONS",
    "serve",
]

# One ``*_created`` series per counter doubles the series count for no dashboard use.
disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)

EVENTS_RECEIVED = Counter(
    "opencti_sync_events_received",
    "Stream data events received, by SSE event name.",
    ["event"],
    registry=REGISTRY,
)
EVENTS_WRITTEN = Counter(
    "opencti_sync_events_written",
    "Events made durable, by sink and SSE event name.",
    ["sink", "event"],
    registry=REGISTRY,
)
SEGMENTS_WRITTEN = Counter(
    "opencti_sync_segments_written", "Archive segments written.", registry=REGISTRY
)
SEGMENT_BYTES = Counter(
    "opencti_sync_segment_bytes", "Compressed bytes of archive segments written.", registry=REGISTRY
)
CHECKPOINT_TIMESTAMP = Gauge(
    "opencti_sync_checkpoint_timestamp_seconds",
    "Time encoded in the checkpointed event id.",
    registry=REGISTRY,
)
CHECKPOINT_SAVED = Gauge(
    "opencti_sync_checkpoint_saved_timestamp_seconds",
    "When this run last saved its checkpoint (wall clock; when it started following the stream,"
    " before its first save). It stops moving when the connector is stuck, recovering or not.",
    registry=REGISTRY,
)
CHECKPOINT_LAG = Gauge(
    "opencti_sync_checkpoint_lag_seconds",
    "Now minus the time of the checkpointed event id (0 before the first checkpoint).",
    registry=REGISTRY,
)


def _lag_now() -> float:
    # Computed at scrape time: a value stored at the last save would freeze when the connector
    # stalls, which is exactly when an alert on this gauge must fire.
    ts = next(iter(CHECKPOINT_TIMESTAMP.collect())).samples[0].value
    return max(0.0, time.time() - ts) if ts > 0 else 0.0


CHECKPOINT_LAG.set_function(_lag_now)
RETRIES = Counter(
    "opencti_sync_retries",
    "Retried operations, by stage and error kind.",
    ["stage", "kind"],
    registry=REGISTRY,
)
ERRORS = Counter("opencti_sync_errors", "Errors, by kind.", ["kind"], registry=REGISTRY)
FILES = Counter(
    "opencti_sync_files",
    "Attached files archived: stored (bytes downloaded), missing (recorded as gone).",
    ["result"],
    registry=REGISTRY,
)

TARGET_FILES = Counter(
    "opencti_sync_target_files",
    "Attached files carried to the target platform: sent (inline, acknowledged), gone (the "
    "source no longer has them), too_large (above target.max_file_mb or the transport's limit: "
    "left out), refused (the target refused the object with it).",
    ["result"],
    registry=REGISTRY,
)
QUARANTINED = Counter(
    "opencti_sync_quarantined_events",
    "Malformed events archived under quarantine/ with their reason.",
    registry=REGISTRY,
)
RETENTION_GAPS = Counter(
    "opencti_sync_retention_gaps",
    "Times the checkpoint was found older than the platform's oldest retained event.",
    registry=REGISTRY,
)
RECONNECTS = Counter(
    "opencti_sync_reconnects", "Stream reconnections, by reason kind.", ["kind"], registry=REGISTRY
)
RESTORE_PROGRESS = Gauge(
    "opencti_sync_restore_progress_ratio", "Restore progress, 0 to 1.", registry=REGISTRY
)
RECOVER_PROGRESS = Gauge(
    "opencti_sync_recover_progress_ratio",
    "Recovery progress, 0 to 1 (share of the time span up to the recover date): the first"
    " run's, or a retention gap's repair; 1 when there is none.",
    registry=REGISTRY,
)
STANDBY = Gauge(
    "opencti_sync_standby",
    "1 while this run waits for another run on the same archive to stop (its run lease).",
    registry=REGISTRY,
)
BUILD_INFO = Info("opencti_sync_build", "Version of the running connector.", registry=REGISTRY)
BUILD_INFO.info({"version": __version__})
DELETIONS = Counter(
    "opencti_sync_retention_deleted_objects",
    "Archive objects deleted by retention, by kind.",
    ["kind"],
    registry=REGISTRY,
)


def serve(host: str, port: int) -> Callable[[], None]:
    """Expose the registry over HTTP in a daemon thread; returns a function that stops it."""
    server, thread = start_http_server(port, addr=host, registry=REGISTRY)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop
