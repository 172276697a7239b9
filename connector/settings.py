"""Configuration: one typed tree, read from defaults, then ``config.yml``, then the environment.

Layers, lowest first: the built-in defaults; ``OPENCTI_SYNC_DEFAULTS`` (``NAME=value`` words, set
by the Docker image for its volume paths, JSON logs and metrics); the yaml file given with
``--config``; environment variables. An empty value of a bool, int or float key counts as not
set (the layer below applies), so ``S3_VERIFY=`` from an unset compose variable keeps TLS
verification on. Secret values lose surrounding whitespace (a secret file's final newline).

Every key is declared once, here, with its yaml path, environment name, type, default and
description; ``opencti-sync config-doc`` renders the reference from these declarations, so the
docs cannot drift. The OpenCTI keys keep the names OpenCTI connectors use (``OPENCTI_URL``,
``CONNECTOR_LIVE_STREAM_ID``, ...). Invalid values raise ``ConfigError`` naming the key; the CLI
exits with code 2.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shlex
import ssl
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError
from .progress import iso_to_ms

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULTS_ENV",
    "KeyDoc",
    "SECRET_KEYS",
    "Settings",
    "image_defaults",
    "iter_keys",
    "check_platform_url",
    "load_settings",
    "optional_bool",
]


def _key(
    env: str, doc: str, default: Any = None, *, secret: bool = False, choices: tuple[str, ...] = ()
) -> Any:
    return field(
        default=default,
        metadata={"env": env, "doc": doc, "secret": secret, "choices": choices},
    )


@dataclass
class OpenCTISection:
    url: str = _key(
        "OPENCTI_URL", "Base URL of the source OpenCTI platform (no trailing /stream).", ""
    )
    token: str = _key(
        "OPENCTI_TOKEN",
        "API token of the source platform user (BYPASS or stream access).",
        "",
        secret=True,
    )
    ssl_verify: bool = _key(
        "OPENCTI_SSL_VERIFY",
        "Verify the source platform's TLS certificate (false wins over opencti.ca_bundle).",
        True,
    )
    ca_bundle: str = _key(
        "OPENCTI_CA_BUNDLE", "Path to a CA bundle for the source platform (empty: system CAs).", ""
    )

    def verify(self) -> bool | str:
        """The source's ``verify`` (``source.tls_verify`` makes httpx's of it): ``ssl_verify``
        false wins over a CA bundle, as on the target (an operator turning verification off
        must not be overruled by a bundle left in the environment)."""
        return False if not self.ssl_verify else (self.ca_bundle or True)


@dataclass
class ConnectorSection:
    id: str = _key(
        "CONNECTOR_ID",
        "Connector UUID used when registering on the source and target platforms (empty: derived "
        "from the source URL and the stream id); a restore registers under one derived from it.",
        "",
    )
    name: str = _key("CONNECTOR_NAME", "Connector name shown in the platform UI.", "opencti-sync")
    log_level: str = _key(
        "CONNECTOR_LOG_LEVEL", "Log level.", "info", choices=("debug", "info", "warning", "error")
    )
    log_format: str = _key(
        "CONNECTOR_LOG_FORMAT",
        "Log format: json, text, or auto (text on a terminal).",
        "auto",
        choices=("auto", "json", "text"),
    )
    register: bool = _key(
        "CONNECTOR_REGISTER",
        "Register on the source platform as a STREAM connector (shown in its UI with the checkpoint).",
        True,
    )
    live_stream_id: str = _key(
        "CONNECTOR_LIVE_STREAM_ID",
        "Stream collection id, 'live' for the global live stream, or 'raw' for /stream (empty "
        "is refused; no "
        "recovery: a raw-stream backup starts from what the platform's stream still retains, and "
        "after a retention gap only the reconciliation, which lists the global live stream, "
        "repairs it).",
        "live",
    )
    live_stream_listen_delete: bool = _key(
        "CONNECTOR_LIVE_STREAM_LISTEN_DELETE", "Receive delete events.", True
    )
    live_stream_no_dependencies: bool = _key(
        "CONNECTOR_LIVE_STREAM_NO_DEPENDENCIES",
        "Ask the platform not to expand relationships around each object.",
        False,
    )
    live_stream_with_inferences: bool = _key(
        "CONNECTOR_LIVE_STREAM_WITH_INFERENCES", "Include inferred (rule engine) objects.", False
    )
    live_stream_recovery_page_size: int = _key(
        "CONNECTOR_LIVE_STREAM_RECOVERY_PAGE_SIZE",
        "The source platform's elasticsearch:default_pagination_result (its recovery sends its "
        "snapshot in pages of that size, unsorted within a page): a recovery position is taken "
        "only below the lowest of the last that many recovered ids. Never set it below the "
        "platform's value.",
        500,
    )
    live_stream_recover_iso_date: str = _key(
        "CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE",
        "First run only: recover the database state up to this ISO date (default: the first start time).",
        "",
    )
    live_stream_start_timestamp: int = _key(
        "CONNECTOR_LIVE_STREAM_START_TIMESTAMP",
        "First run only: start position as epoch MILLISECONDS (0: from the oldest retained "
        "event). The first recovery then sends only objects updated since: a partial backup.",
        0,
    )
    retention_gap: str = _key(
        "CONNECTOR_RETENTION_GAP",
        "When the checkpoint fell out of the platform's stream retention: 'repair' (re-snapshot with recover, reconcile deletes) or 'fail'.",
        "repair",
        choices=("repair", "fail"),
    )
    retention_check_secs: float = _key(
        "CONNECTOR_RETENTION_CHECK_SECS",
        "While connected, ask the stream this often for its oldest retained event (one short extra "
        "connection): when the platform's trimming overtook its reader mid-connection (a sink "
        "slower than the platform writes), the gap is handled as connector.retention_gap says. "
        "0: off.",
        60.0,
    )
    read_timeout_secs: float = _key(
        "CONNECTOR_READ_TIMEOUT_SECS",
        "Reconnect when the stream is silent this long (heartbeats arrive every 5 s).",
        45.0,
    )
    max_event_bytes: int = _key(
        "CONNECTOR_MAX_EVENT_BYTES",
        "A stream message larger than this is quarantined (its first 4 KiB kept) instead of held "
        "in memory whole.",
        64 * 1024 * 1024,
    )
    spill_bytes: int = _key(
        "CONNECTOR_SPILL_BYTES",
        "Pending events past this many bytes wait in a scratch file in OPENCTI_SYNC_WORK_DIR "
        "instead of memory, until what is pending fits again: a dependency group not yet whole "
        "(a popular entity's relationships, sent whole after a reconnect), since batches are "
        "written at ARCHIVE_MAX_BYTES (keep this above it). A segment or manifest past this size "
        "(such a group's, never split) is built in a scratch file there too.",
        32 * 1024 * 1024,
    )
    backoff_initial_secs: float = _key(
        "CONNECTOR_BACKOFF_INITIAL_SECS",
        "First reconnect / retry delay (exponential, full jitter).",
        1.0,
    )
    backoff_max_secs: float = _key(
        "CONNECTOR_BACKOFF_MAX_SECS", "Longest reconnect / retry delay.", 60.0
    )
    work_dir: str = _key(
        "OPENCTI_SYNC_WORK_DIR",
        "Scratch directory: the on-disk state stores of snapshots, verify and reconciliation, "
        "and the pending events, segments and attached files past connector.spill_bytes.",
        "./.opencti-sync-work",
    )
    shutdown_timeout_secs: float = _key(
        "CONNECTOR_SHUTDOWN_TIMEOUT_SECS",
        "How long SIGTERM may spend flushing the open batch.",
        30.0,
    )
    lease_secs: float = _key(
        "CONNECTOR_LEASE_SECS",
        "One run per archive: a second run waits (standby) until the first stops, or until this "
        "long after the first's last renewal of its lease (renewed every third of it) if it died.",
        60.0,
    )


@dataclass
class ArchiveSection:
    uri: str = _key(
        "ARCHIVE_URI",
        "Archive location: a path, file:///path or s3://bucket/prefix. Empty: no archive.",
        "./archive",
    )
    codec: str = _key(
        "ARCHIVE_CODEC",
        "Compression of the segments and snapshots (a snapshot keeps the codec it was written "
        "with; readers follow each manifest).",
        "zstd",
        choices=("zstd", "gzip"),
    )
    compression_level: int = _key(
        "ARCHIVE_COMPRESSION_LEVEL", "Compression level (zstd 1-19, gzip 1-9).", 3
    )
    max_events: int = _key("ARCHIVE_MAX_EVENTS", "Rotate a segment after this many events.", 20000)
    max_bytes: int = _key(
        "ARCHIVE_MAX_BYTES",
        "Rotate a segment after this many uncompressed bytes (pending events are held in "
        "memory: the run's memory grows by about 3x this value; the stream reader reads up to "
        "this much more ahead of them).",
        16 * 1024 * 1024,
    )
    max_age_secs: float = _key(
        "ARCHIVE_MAX_AGE_SECS",
        "Rotate a segment when its oldest event is this old (a quiet stream still flushes).",
        10.0,
    )
    files: bool = _key(
        "ARCHIVE_FILES",
        "Download the attached files (a report's PDF, an artifact's sample) that archived events "
        "name, once per version, and archive them before those events; a restore uploads them "
        "again.",
        True,
    )


@dataclass
class S3Section:
    region: str = _key("S3_REGION", "S3 region.", "")
    endpoint_url: str = _key(
        "S3_ENDPOINT_URL", "S3 endpoint for MinIO, Ceph and other S3-compatible stores.", ""
    )
    path_style: bool = _key("S3_PATH_STYLE", "Use path-style addressing (MinIO).", False)
    access_key_id: str = _key(
        "S3_ACCESS_KEY_ID", "Access key (empty: standard AWS credential chain).", "", secret=True
    )
    secret_access_key: str = _key(
        "S3_SECRET_ACCESS_KEY",
        "Secret key (empty: standard AWS credential chain).",
        "",
        secret=True,
    )
    session_token: str = _key(
        "S3_SESSION_TOKEN", "Session token for temporary credentials.", "", secret=True
    )
    profile: str = _key("S3_PROFILE", "AWS profile name.", "")
    verify: bool = _key("S3_VERIFY", "Verify the S3 endpoint's TLS certificate.", True)
    ca_bundle: str = _key("S3_CA_BUNDLE", "CA bundle path for the S3 endpoint.", "")
    sse: str = _key(
        "S3_SSE",
        "Server-side encryption (empty: none).",
        "",
        choices=("", "AES256", "aws:kms"),
    )
    kms_key_id: str = _key("S3_KMS_KEY_ID", "KMS key id for aws:kms encryption.", "")
    storage_class: str = _key(
        "S3_STORAGE_CLASS",
        "Storage class of the archive's objects (segments, manifests, snapshots, files; the "
        "checkpoint and the locks, rewritten in place, keep the bucket default). GLACIER and "
        "DEEP_ARCHIVE are refused: unreadable without a restore (empty: bucket default).",
        "",
    )


@dataclass
class TargetSection:
    opencti_url: str = _key(
        "TARGET_OPENCTI_URL",
        "URL of a second OpenCTI platform to mirror the stream into (empty: none).",
        "",
    )
    opencti_token: str = _key(
        "TARGET_OPENCTI_TOKEN", "API token on the target platform.", "", secret=True
    )
    ssl_verify: bool = _key(
        "TARGET_SSL_VERIFY", "Verify the target platform's TLS certificate.", True
    )
    ca_bundle: str = _key("TARGET_CA_BUNDLE", "CA bundle for the target platform.", "")
    synchronized: bool = _key(
        "TARGET_SYNCHRONIZED",
        "Perfect synchronisation: upserts replace values so removals propagate.",
        False,
    )
    allow_same_platform: bool = _key(
        "TARGET_ALLOW_SAME_PLATFORM",
        "Allow the target to be the source platform itself (loops!).",
        False,
    )
    transport: str = _key(
        "TARGET_TRANSPORT",
        "How events reach the target's workers: 'amqp' (one message per event on the connector's "
        "RabbitMQ push queue, as the platform's own synchroniser; carries event_id, synchronized "
        "and previous_standard) or 'api' (stixBundlePush; when the broker is unreachable).",
        "amqp",
        choices=("amqp", "api"),
    )
    amqp_host: str = _key(
        "TARGET_AMQP_HOST",
        "RabbitMQ host to use instead of the one the target's registration announces (empty: "
        "announced).",
        "",
    )
    amqp_port: int = _key("TARGET_AMQP_PORT", "RabbitMQ port override (0: the announced one).", 0)
    amqp_use_ssl: str = _key(
        "TARGET_AMQP_USE_SSL",
        "TLS to RabbitMQ: 'true' or 'false' (also yes/no, on/off, 1/0; empty or 'auto': as "
        "announced). Uses the target's ssl_verify and ca_bundle.",
        "",
    )
    amqp_max_message_bytes: int = _key(
        "TARGET_AMQP_MAX_MESSAGE_BYTES",
        "Largest message published on the amqp transport (the broker's max_message_size; "
        "RabbitMQ 4.x default 16 MiB). A larger event is quarantined instead of stopping the sync.",
        16 * 1024 * 1024 - 64 * 1024,
    )
    files: bool = _key(
        "TARGET_FILES",
        "Carry the attached files' bytes (a report's PDF, an artifact's sample) to the target, "
        "inline, as the platform's own synchroniser does: read from the archive when it archives "
        "them, else downloaded from the source; each version once per run. Off: their names only.",
        True,
    )
    max_file_mb: float = _key(
        "TARGET_MAX_FILE_MB",
        "Larger attached files are not carried to the target (counted and logged). A file is "
        "sent alone, held in memory about 6 times its size while it is. The target's limits "
        "apply too, and a file they refuse is left out the same way: its max_payload_body_size "
        "(50 MB) and, on either transport, its broker's message size (base64 twice: about 9 MB "
        "at RabbitMQ 4's default of 16 MiB).",
        16.0,
    )


@dataclass
class CheckpointSection:
    uri: str = _key(
        "CHECKPOINT_URI",
        "Where the checkpoint lives. Empty: inside the archive, or ./opencti-sync-state without one.",
        "",
    )


@dataclass
class SnapshotSection:
    schedule: str = _key(
        "SNAPSHOT_SCHEDULE",
        "When 'run' writes a compacted snapshot: a 5-field cron expression evaluated in UTC "
        "('0 3 * * *' is 03:00 UTC), 'every <N>s|m|h|d' (at most a year), or '' (never).",
        "",
    )
    state_image: bool = _key(
        "SNAPSHOT_STATE_IMAGE",
        "Store the restore's state database beside each snapshot's parts (compressed, about "
        "twice their size): a restore from the snapshot then opens it instead of loading the "
        "parts object by object, several times faster. Off: parts only.",
        True,
    )


@dataclass
class RetentionSection:
    schedule: str = _key(
        "RETENTION_SCHEDULE",
        "When 'run' applies retention (same syntax as the snapshot schedule; cron times are UTC).",
        "",
    )
    keep_days: int = _key(
        "RETENTION_KEEP_DAYS", "Keep event segments this many days (0: forever).", 0
    )
    keep_snapshots: int = _key(
        "RETENTION_KEEP_SNAPSHOTS",
        "Besides the base snapshot (the newest one at least keep_days old, where a restore of "
        "the window starts; always kept), keep only the newest this many snapshots (0: no "
        "count limit).",
        0,
    )


@dataclass
class MetricsSection:
    enabled: bool = _key("METRICS_ENABLED", "Serve Prometheus metrics.", False)
    host: str = _key("METRICS_HOST", "Metrics listen address.", "0.0.0.0")
    port: int = _key("METRICS_PORT", "Metrics port.", 9095)


@dataclass
class Settings:
    opencti: OpenCTISection = field(default_factory=OpenCTISection)
    connector: ConnectorSection = field(default_factory=ConnectorSection)
    archive: ArchiveSection = field(default_factory=ArchiveSection)
    s3: S3Section = field(default_factory=S3Section)
    target: TargetSection = field(default_factory=TargetSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    snapshot: SnapshotSection = field(default_factory=SnapshotSection)
    retention: RetentionSection = field(default_factory=RetentionSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)

    def s3_options(self) -> dict[str, Any]:
        """Keyword arguments for the S3 storage backend (only the ones that are set)."""
        s = self.s3
        opts: dict[str, Any] = {"path_style": s.path_style, "verify": s.verify}
        for name in (
            "region",
            "endpoint_url",
            "access_key_id",
            "secret_access_key",
            "session_token",
            "profile",
            "ca_bundle",
            "sse",
            "kms_key_id",
            "storage_class",
        ):
            value = getattr(s, name)
            if value:
                opts[name] = value
        return opts

    def secrets(self) -> list[str]:
        """Every configured secret value, for redaction."""
        out = []
        for section, key in SECRET_KEYS:
            value = getattr(getattr(self, section), key)
            if value:
                out.append(str(value))
        return out


@dataclass(frozen=True)
class KeyDoc:
    path: str
    env: str
    type: str
    default: Any
    description: str
    secret: bool
    choices: tuple[str, ...]


def iter_keys() -> list[KeyDoc]:
    """Every configuration key, in declaration order (for config-doc and validation)."""
    out: list[KeyDoc] = []
    for sec in dataclasses.fields(Settings):
        section_cls = sec.default_factory
        for f in dataclasses.fields(section_cls):  # type: ignore[arg-type]
            out.append(
                KeyDoc(
                    path=f"{sec.name}.{f.name}",
                    env=f.metadata["env"],
                    type=f.type if isinstance(f.type, str) else f.type.__name__,
                    default=f.default,
                    description=f.metadata["doc"],
                    secret=f.metadata["secret"],
                    choices=f.metadata["choices"],
                )
            )
    return out


SECRET_KEYS: list[tuple[str, str]] = [
    (k.path.split(".", 1)[0], k.path.split(".", 1)[1]) for k in iter_keys() if k.secret
]

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_TYPED = ("bool", "int", "float")

DEFAULTS_ENV = "OPENCTI_SYNC_DEFAULTS"
"""Environment variable holding defaults below ``config.yml``: ``NAME=value`` words, shell quoted."""


def optional_bool(path: str, text: str) -> bool | None:
    """A tri-state key: the bool words above, or empty / 'auto' for "not set" (None)."""
    value = text.strip().lower()
    if value in ("", "auto"):
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(path, f"expected true, false or empty, got {text[:20]!r}")


def _unset(key: KeyDoc, value: Any) -> bool:
    """An empty value of a typed key (``S3_VERIFY=``, yaml ``verify:``) is "not set"."""
    return key.type in _TYPED and (value is None or (isinstance(value, str) and not value.strip()))


def _blanks_the_file(key: KeyDoc, env_value: str | None, file_value: Any) -> bool:
    """An empty environment variable over a value in config.yml (a compose file's ``${VAR}``
    left unset): it wins, as any variable does, but an empty ``ARCHIVE_URI`` means "no archive",
    which nobody should learn from a missing backup."""
    return (
        env_value is not None
        and not env_value.strip()
        and not _unset(key, env_value)
        and file_value is not None
        and str(file_value).strip() != ""
    )


def _coerce(key: KeyDoc, value: Any) -> Any:
    kind = key.type
    shown = "<redacted>" if key.secret else repr(value)[:60]
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(str(value).strip())
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            number = float(str(value).strip())
            if not math.isfinite(number):
                raise ConfigError(key.path, f"must be a finite number, got {shown} (env {key.env})")
            return number
        if value is None:
            return ""
        if isinstance(value, dict | list):
            raise ValueError
        if isinstance(value, bool):
            # YAML reads an unquoted on/off/yes/no/true/false as a boolean: `uri: off` became
            # the text "False" (a directory ./False).
            raise ConfigError(
                key.path,
                f"expected text, got a YAML boolean (on/off, yes/no, true/false unquoted): "
                f'quote it, e.g. "off" (env {key.env})',
            )
        text = str(value)
        if key.secret:
            # A token read from a secret file keeps its final newline; inside, a control
            # character can only be a mistake (and would end up in an HTTP header).
            text = text.strip()
            if any(unicodedata.category(ch) == "Cc" for ch in text):
                raise ConfigError(
                    key.path, f"contains control characters (env {key.env}; value not shown)"
                )
            if not text.isascii():
                # It goes into an HTTP header or a signature: a typo, not a token.
                raise ConfigError(
                    key.path, f"contains non-ASCII characters (env {key.env}; value not shown)"
                )
        return text
    except ValueError:
        raise ConfigError(key.path, f"expected {kind}, got {shown} (env {key.env})") from None


def image_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """The ``OPENCTI_SYNC_DEFAULTS`` layer, by environment variable name.

    The Docker image sets its defaults (volume paths, JSON logs, metrics) here rather than as
    plain environment variables, which would override the operator's ``config.yml``.
    """
    text = env.get(DEFAULTS_ENV, "")
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(DEFAULTS_ENV, f"cannot be split into words: {exc}") from None
    known = {k.env: k for k in iter_keys()}
    out: dict[str, str] = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not sep:
            raise ConfigError(DEFAULTS_ENV, "expected NAME=value words")
        if name not in known:
            raise ConfigError(DEFAULTS_ENV, f"unknown variable {name[:40]!r}")
        if known[name].secret:
            raise ConfigError(DEFAULTS_ENV, f"{name} is a secret: it has no default")
        out[name] = value
    return out


def load_settings(
    path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Defaults, then ``OPENCTI_SYNC_DEFAULTS``, then the yaml file (if any), then the environment."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("--config", f"cannot read {path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError("--config", f"{path} is not UTF-8 text: {exc.reason}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(
                "--config", f"{path} is not valid YAML: {_yaml_problem(exc)}"
            ) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("--config", f"{path} must hold a mapping of sections")
        raw = loaded
    known = {k.path: k for k in iter_keys()}
    sections = {k.path.split(".")[0] for k in known.values()}
    for sec_name, sec_val in raw.items():
        if sec_name not in sections:
            raise ConfigError(str(sec_name), "unknown section")
        if sec_val is None:
            continue
        if not isinstance(sec_val, dict):
            raise ConfigError(str(sec_name), "must be a mapping")
        for k in sec_val:
            if f"{sec_name}.{k}" not in known:
                raise ConfigError(f"{sec_name}.{k}", "unknown key")
    image = image_defaults(env)
    settings = Settings()
    for key in known.values():
        sec_name, name = key.path.split(".", 1)
        value: Any = key.default
        sec_val = raw.get(sec_name) or {}
        layers = (
            (key.env in image, image.get(key.env)),
            (name in sec_val, sec_val.get(name)),
            (key.env in env, env.get(key.env)),
        )
        for present, layer_value in layers:
            if present and not _unset(key, layer_value):
                value = layer_value
        if _blanks_the_file(key, env.get(key.env), sec_val.get(name)):
            log.warning(
                "%s is set but empty: it overrides %s from the config file, so %s is empty. "
                "Unset the variable to use the file's value.",
                key.env,
                key.path,
                key.path,
            )
        value = _coerce(key, value)
        if key.choices and value not in key.choices:
            raise ConfigError(
                key.path,
                f"must be one of {', '.join(repr(c) for c in key.choices)} (env {key.env})",
            )
        setattr(getattr(settings, sec_name), name, value)
    _validate(settings)
    return settings


def _check_iso_date(key: str, env: str, text: str) -> None:
    """An ISO 8601 date the consumer can turn into an event id (naive dates are UTC)."""
    try:
        ms = iso_to_ms(text)
    except ValueError:
        raise ConfigError(
            key,
            f"expected an ISO 8601 date like 2025-12-31T00:00:00Z, got {text[:40]!r} (env {env})",
        ) from None
    if ms < 0:
        raise ConfigError(key, f"must be after 1970-01-01, got {text[:40]!r} (env {env})")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where, without PyYAML's snippet of the line (it can be a token's)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        parts = [p for p in (exc.context, exc.problem) if p]
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return "; ".join(parts) + where
    return type(exc).__name__


def check_platform_url(key: str, url: str) -> None:
    """A platform URL: http(s), and no credentials (it is stored in the checkpoint or a restore's
    progress file, shown by status and logged; the token authenticates)."""
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(key, "must start with http:// or https://")
    if "@" in urlsplit(url).netloc:
        raise ConfigError(
            key, "must not carry credentials (user:password@); the token authenticates"
        )
    try:
        host = urlsplit(url).hostname
        if url and not host:
            raise ConfigError(key, "has no host name")
        if host:
            host.encode("idna")  # an empty label (a..b) fails here, not in the first request
    except (UnicodeError, ValueError) as exc:
        raise ConfigError(key, f"invalid host name: {exc}") from None


def _is_uuid(text: str) -> bool:
    """In its usual written form: 8-4-4-4-12 hex digits."""
    try:
        return str(uuid.UUID(text)) == text.lower()
    except ValueError:
        return False


# Above these a value is a typo, and it failed deep inside a library (an OverflowError from a
# timer, a socket timeout or a date; an integer too large for the JSON of `status --json`).
_MAX_SECS = 10**8  # about three years
_MAX_INT = 2**53


def _check_magnitudes(s: Settings) -> None:
    for key in iter_keys():
        section, name = key.path.split(".", 1)
        value = getattr(getattr(s, section), name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if name.endswith("_secs") and value > _MAX_SECS:
            raise ConfigError(key.path, f"must be at most {_MAX_SECS} seconds")
        if abs(value) > _MAX_INT:
            raise ConfigError(key.path, f"must be at most {_MAX_INT}")


def _check_ca_bundle(key: str, path: str) -> None:
    """A CA bundle is read when a connection is made, in the stream's reader thread: a missing
    or unreadable one left `run` running with no reader. Said at start-up instead."""
    if not path:
        return
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise ConfigError(key, f"cannot be read as a CA bundle ({path[:200]}): {reason}") from None


def _validate(s: Settings) -> None:
    c, a = s.connector, s.archive
    _check_magnitudes(s)
    if not c.live_stream_id.strip():
        # An unset ${VAR} in a compose file: it would silently mean the raw stream, with no
        # recovery (a partial backup).
        raise ConfigError(
            "connector.live_stream_id", "must be a stream collection id, 'live' or 'raw'"
        )
    _check_ca_bundle("opencti.ca_bundle", s.opencti.ca_bundle)
    _check_ca_bundle("target.ca_bundle", s.target.ca_bundle)
    if c.id and not _is_uuid(c.id):
        raise ConfigError(
            "connector.id", "must be a UUID (e.g. from uuidgen), as the platform registers it"
        )
    if c.max_event_bytes < 65536:
        raise ConfigError("connector.max_event_bytes", "must be at least 65536")
    if c.retention_check_secs < 0:
        raise ConfigError("connector.retention_check_secs", "must be >= 0 (0: off)")
    if c.read_timeout_secs <= 5:
        raise ConfigError("connector.read_timeout_secs", "must be above the 5 s heartbeat period")
    if c.live_stream_recovery_page_size < 1:
        raise ConfigError("connector.live_stream_recovery_page_size", "must be at least 1")
    if c.backoff_initial_secs <= 0:
        raise ConfigError("connector.backoff_initial_secs", "must be > 0")
    if c.backoff_max_secs < c.backoff_initial_secs:
        raise ConfigError(
            "connector.backoff_max_secs", "must be at least connector.backoff_initial_secs"
        )
    if c.live_stream_start_timestamp < 0:
        raise ConfigError(
            "connector.live_stream_start_timestamp", "must be epoch milliseconds >= 0"
        )
    if c.shutdown_timeout_secs <= 0:
        raise ConfigError("connector.shutdown_timeout_secs", "must be > 0")
    if c.spill_bytes < 65536:
        raise ConfigError("connector.spill_bytes", "must be at least 65536")
    if c.lease_secs < 1:
        raise ConfigError("connector.lease_secs", "must be at least 1 (second)")
    if 0 < c.live_stream_start_timestamp < 100_000_000_000:
        # Seconds instead of milliseconds silently mean 1970 (a classic pycti pitfall).
        raise ConfigError(
            "connector.live_stream_start_timestamp", "looks like seconds; give epoch milliseconds"
        )
    if a.max_events < 1:
        raise ConfigError("archive.max_events", "must be >= 1")
    if a.max_bytes < 1024:
        raise ConfigError("archive.max_bytes", "must be >= 1024")
    if a.max_age_secs <= 0:
        raise ConfigError("archive.max_age_secs", "must be > 0")
    if a.codec == "zstd" and not 1 <= a.compression_level <= 19:
        raise ConfigError("archive.compression_level", "zstd levels are 1-19")
    if a.codec == "gzip" and not 1 <= a.compression_level <= 9:
        raise ConfigError("archive.compression_level", "gzip levels are 1-9")
    if c.live_stream_recover_iso_date:
        _check_iso_date(
            "connector.live_stream_recover_iso_date",
            "CONNECTOR_LIVE_STREAM_RECOVER_ISO_DATE",
            c.live_stream_recover_iso_date,
        )
    if s.retention.keep_days < 0:
        raise ConfigError("retention.keep_days", "must be >= 0 (env RETENTION_KEEP_DAYS)")
    if s.retention.keep_snapshots < 0:
        raise ConfigError("retention.keep_snapshots", "must be >= 0 (env RETENTION_KEEP_SNAPSHOTS)")
    if s.snapshot.schedule.strip() or s.retention.schedule.strip():
        # Imported here: the scheduler (apscheduler) is only needed when a schedule is set.
        # connector.jobs does not import this module, so there is no cycle.
        from .jobs import parse_schedule

        parse_schedule(s.snapshot.schedule, "snapshot.schedule")
        parse_schedule(s.retention.schedule, "retention.schedule")
        if not s.archive.uri:
            which = "snapshot.schedule" if s.snapshot.schedule.strip() else "retention.schedule"
            raise ConfigError(which, "snapshots and retention work on an archive: set archive.uri")
    if s.metrics.port < 0 or s.metrics.port > 65535:
        raise ConfigError("metrics.port", "must be a TCP port")
    optional_bool("target.amqp_use_ssl", s.target.amqp_use_ssl)  # a bad word fails at load
    t = s.target
    if not 0 <= t.amqp_port <= 65535:
        raise ConfigError("target.amqp_port", "must be a TCP port 0..65535 (0: the announced one)")
    if t.amqp_max_message_bytes < 1024:
        raise ConfigError("target.amqp_max_message_bytes", "must be >= 1024")
    if not t.max_file_mb > 0:
        raise ConfigError(
            "target.max_file_mb", "must be > 0 (to carry no file bytes: TARGET_FILES=false)"
        )
    if t.opencti_url and t.transport == "api":
        unused = [
            name
            for name, value in (
                ("amqp_host", t.amqp_host),
                ("amqp_port", t.amqp_port),
                ("amqp_use_ssl", t.amqp_use_ssl),
            )
            if value
        ]
        if unused:
            log.warning(
                "Ignored with target.transport api: %s (used by the amqp transport only).",
                ", ".join(f"target.{name}" for name in unused),
            )
        if t.synchronized:
            log.warning(
                "target.synchronized has no effect with target.transport api (stixBundlePush "
                "does not carry it to the platform's workers); use transport amqp."
            )
    if s.target.opencti_url and not s.target.opencti_token:
        raise ConfigError("target.opencti_token", "required when target.opencti_url is set")
    if s.s3.sse == "aws:kms" and not s.s3.kms_key_id:
        raise ConfigError("s3.kms_key_id", "required when s3.sse is aws:kms")
    for url_key, url in (
        ("opencti.url", s.opencti.url),
        ("target.opencti_url", s.target.opencti_url),
    ):
        check_platform_url(url_key, url)
