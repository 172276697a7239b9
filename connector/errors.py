"""Every exception opencti-sync raises, grouped by what the caller does about it.

    ConnectorError
    ├── ConfigError            bad configuration: exit code 2, the message names the key
    ├── SourceError            the stream source failed
    │   ├── SourceRetryable    silence, EOF, network error, 5xx, 429: reconnect with backoff
    │   └── StreamGoneError    401, 410 and other permanent answers: stop with the reason
    ├── SinkError              a sink (archive storage, OpenCTI target) failed
    │   ├── RetryableError     try the same batch again later (backoff, no attempt limit)
    │   └── PermanentError     stop; the checkpoint stays where it was
    │       └── MissingBucket  the configured S3 bucket does not exist (also a ConfigError)
    ├── NotFound               a storage key does not exist
    ├── CheckpointError        the checkpoint cannot be read or written
    └── MalformedEvent         one stream event is unusable: it is quarantined, never dropped

Each I/O module translates its library's exceptions into these at its own boundary
(``raise RetryableError(...) from exc``); no boto3, httpx or pycti exception escapes a module.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "ConnectorError",
    "LeaseLost",
    "MalformedEvent",
    "MissingBucket",
    "NotFound",
    "PermanentError",
    "RetryableError",
    "SinkError",
    "SourceError",
    "SourceRetryable",
    "StreamGoneError",
]


class ConnectorError(Exception):
    """Root of every error raised on purpose by opencti-sync."""


class ConfigError(ConnectorError):
    """Invalid configuration. ``key`` names the offending setting (yaml path)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class SourceError(ConnectorError):
    """The stream source failed."""


class SourceRetryable(SourceError):
    """A transient source failure: reconnect from the last safe position."""


class StreamGoneError(SourceError):
    """The platform refused the stream for good (401, 410, ...). Carries the reason phrase."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason}".strip())
        self.status = status
        self.reason = reason


class CannotReconcile(SourceError):
    """Delete reconciliation is impossible on this stream (it refuses recovery): not retried."""


class SinkError(ConnectorError):
    """A sink failed to make a batch durable."""


class RetryableError(SinkError):
    """Transient: the same batch will be written again after a backoff."""


class PermanentError(SinkError):
    """Not worth retrying: the run stops and the checkpoint does not move."""


class MissingBucket(ConfigError, PermanentError):
    """The configured S3 bucket does not exist (mistyped, or deleted). Permanent to whoever
    writes or reads, and a configuration error (exit 2) naming the setting of the bucket."""


class PayloadTooLarge(PermanentError):
    """The platform refused a request for its size (HTTP 413: its max_payload_body_size)."""


class LeaseLost(ConnectorError):
    """Another ``run`` took this archive over (``run_lease``): this one must not write more."""


class NotFound(ConnectorError):
    """A storage key does not exist."""


class CheckpointError(ConnectorError):
    """The checkpoint could not be read or written."""


class MalformedEvent(ConnectorError):
    """A stream event that cannot be archived as a normal event; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
