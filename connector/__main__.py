"""Command line and composition root: the only module that reads ``Settings``.

Exit codes: 0 done / clean stop, 1 runtime failure (permanent stream or sink error, verify found
damage), 2 invalid configuration or usage; a one-shot command stopped by Ctrl-C 130, by SIGTERM
143 (``run`` drains and exits 0).
"""

from __future__ import annotations

import argparse
import errno
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, logs
from .errors import (
    ConfigError,
    ConnectorError,
    LeaseLost,
    PermanentError,
    RetryableError,
    StreamGoneError,
)
from .settings import Settings, check_platform_url, load_settings, optional_bool

if TYPE_CHECKING:
    from .files import FileFetcher
    from .run_lease import RunLease

__all__ = ["main"]

log = logging.getLogger("connector")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config.yml path (env vars override it)")
    p.add_argument(
        "--archive", help="archive URI: path, file:///path or s3://bucket/prefix (= ARCHIVE_URI)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="opencti-sync",
        description=(
            "Back up an OpenCTI platform's live stream into an archive (S3 or a directory), "
            "synchronise it into a second platform, and restore either to any point in time."
        ),
        epilog=(
            "Exit codes: 0 done or clean stop, 1 runtime failure, 2 invalid configuration; "
            "a one-shot command stopped by Ctrl-C 130, by SIGTERM 143."
        ),
    )
    parser.add_argument("--version", action="version", version=f"opencti-sync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "run", help="follow the stream forever into the archive and/or a target platform"
    )
    _add_common(p)
    p.add_argument(
        "--source-moved",
        action="store_true",
        help="the platform this archive follows now answers at opencti.url (a new address)",
    )
    p.add_argument(
        "--resume-from-archive",
        action="store_true",
        help="the checkpoint is lost: go on after the archive's newest segment (same platform "
        "and stream only)",
    )

    p = sub.add_parser(
        "status", help="checkpoint, lag, archive size, snapshots and retention window"
    )
    _add_common(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("check", help="health checks of the source and every target, then exit")
    _add_common(p)

    sub.add_parser(
        "sim", help="run the local OpenCTI stream simulator (see docs/SIMULATOR.md)", add_help=False
    )

    p = sub.add_parser("demo", help="end-to-end demo on the embedded simulator and sample data")
    p.add_argument("--dir", default="./demo-archive", help="where the demo archive goes")

    p = sub.add_parser("config-doc", help="print the configuration reference")
    p.add_argument("--format", choices=("markdown", "yaml"), default="markdown")
    p.add_argument(
        "--update", action="store_true", help="rewrite config.yml.sample and the README table"
    )

    p = sub.add_parser("snapshot", help="write a compacted snapshot now")
    _add_common(p)

    p = sub.add_parser("prune", help="apply the retention policy now")
    _add_common(p)
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be deleted, delete nothing"
    )

    p = sub.add_parser(
        "verify", help="check the archive's integrity (and optionally a platform against it)"
    )
    _add_common(p)
    p.add_argument(
        "--against-opencti", metavar="URL", help="compare the archive's state with this platform"
    )
    p.add_argument("--token", help="API token for --against-opencti (or TARGET_OPENCTI_TOKEN)")
    p.add_argument("--until", help="event id or ISO date of the state to compare (default: latest)")

    p = sub.add_parser("restore", help="restore a platform (or a STIX bundle) from the archive")
    _add_common(p)
    p.add_argument(
        "--until",
        help="event id <ms>-<seq>, or ISO date/time (that instant included; no offset: UTC); "
        "default: latest",
    )
    p.add_argument("--opencti", metavar="URL", help="target platform URL")
    p.add_argument("--token", help="target platform token (or TARGET_OPENCTI_TOKEN)")
    p.add_argument("--to-bundle", metavar="FILE", help="write a STIX 2.1 bundle instead")
    p.add_argument(
        "--max-file-mb",
        type=float,
        default=None,
        help="--opencti only: attached files above this size are not pushed (default 35: the "
        "platform refuses requests above its max_payload_body_size, 50 MB by default; base64 "
        "adds a third)",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would change, write nothing")
    p.add_argument(
        "--apply-deletes",
        dest="apply_deletes",
        action="store_true",
        default=None,
        help="delete on the platform what the archive records as deleted or merged away "
        "(the default)",
    )
    p.add_argument(
        "--no-apply-deletes",
        dest="apply_deletes",
        action="store_false",
        help="upsert only: delete nothing",
    )
    p.add_argument(
        "--force", action="store_true", help="allow restoring into the archive's source platform"
    )
    p.add_argument("--work-dir", default="./.opencti-sync-restore", help="resumable restore state")
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="restore a state known to be partial or unknown: pruned history without a usable "
        "snapshot, lost newest segments, a hole in the segment chain, a point inside the first "
        "recovery or a retention gap",
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    archive = getattr(args, "archive", None)
    # ``--archive`` is ARCHIVE_URI, the top layer: set before the settings are checked (a
    # schedule needs an archive, and it is given here).
    env = {**os.environ, "ARCHIVE_URI": archive} if archive else None
    settings = load_settings(getattr(args, "config", None), env=env)
    token = getattr(args, "token", None)
    if token:
        # As for the configured token: stripped, checked, and known to the log redactor.
        token = token.strip()
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in token):
            raise ConfigError("--token", "contains control characters (value not shown)")
        if not token.isascii():
            raise ConfigError("--token", "contains non-ASCII characters (value not shown)")
    for flag in ("opencti", "against_opencti"):
        url = getattr(args, flag, None)
        if url:
            check_platform_url(f"--{flag.replace('_', '-')}", url)
    if token:
        args.token = settings.target.opencti_token = token
    return settings


def _configure_logs(settings: Settings) -> None:
    from .logs import configure

    configure(settings.connector.log_level, settings.connector.log_format, settings.secrets())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        from .sim.cli import main as sim_main

        return sim_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.hold()  # the settings' own warnings, written once the settings give the log format
    previous = _terminate_on_sigterm()  # `run` replaces it with its draining stop
    try:
        handler = _COMMANDS[args.command]
        return handler(args)
    except ConfigError as exc:
        print(f"opencti-sync: configuration error: {exc}", file=sys.stderr)
        return 2
    except StreamGoneError as exc:
        log.error(
            "The platform refused the stream.", extra={"status": exc.status, "reason": exc.reason}
        )
        print(f"opencti-sync: stream refused: {exc}", file=sys.stderr)
        return 1
    except LeaseLost as exc:
        # Not a failure of this run's data: another run writes the archive now. A restart makes
        # this one its standby.
        log.error("Stopped: another run took this archive over.", extra={"error": str(exc)})
        print(f"opencti-sync: {exc}", file=sys.stderr)
        return 1
    except (PermanentError, ConnectorError) as exc:
        # A transient error reaches here from a one-shot command (status, verify), which does
        # not retry, or from a stop that cut retries short: not a "permanent" one.
        what = "a transient" if isinstance(exc, RetryableError) else "a permanent"
        log.error(f"Stopped on {what} error.", extra={"error": str(exc)})
        print(f"opencti-sync: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        log.warning("Stopped by SIGTERM.")
        return 143
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `status | head`: the reader left; say nothing more (and not at exit either).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        # A local path the operator gave (work dir, bundle, archive) that cannot be used: one
        # line that names it, not a traceback.
        log.error("Stopped on a local file error.", extra={"error": str(exc)})
        where = f": {exc.filename}" if exc.filename else ""
        print(f"opencti-sync: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except Exception as exc:
        # The work dir's scratch database (restore, verify, snapshot): a full disk, mostly.
        # (sqlite3 is checked by name: `run` never imports it unless it must.)
        if type(exc).__module__ != "sqlite3":
            raise
        log.error("Stopped on a work dir database error.", extra={"error": str(exc)})
        print(
            f"opencti-sync: the work dir's database failed ({exc}): check free space and "
            "permissions of OPENCTI_SYNC_WORK_DIR / --work-dir",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        logs.release()


# -- run --------------------------------------------------------------------------------------


def _stored_nothing(cp: Any, archive: Any) -> bool:
    """Nothing was ever made durable under this checkpoint: no event, segment or quarantined
    event, in its counters or in the archive (a crash can store a segment before its
    checkpoint)."""
    if cp.last_event_id or cp.events_archived or cp.segments_written or cp.quarantined:
        return False
    if archive is None:
        return True
    from .archive.layout import EVENTS_PREFIX, QUARANTINE_PREFIX

    return not _holds_any(archive, EVENTS_PREFIX, QUARANTINE_PREFIX)


def _holds_any(storage: Any, *prefixes: str) -> bool:
    """Whether ``storage`` holds at least one key under any of ``prefixes`` (one listing call
    each, stopped at its first key)."""
    return any(next(iter(storage.list(prefix)), None) is not None for prefix in prefixes)


def build_runtime(settings: Settings) -> dict[str, Any]:
    """Wire storage, checkpoint store, sinks and source settings from ``settings``."""
    from .archive import ArchiveSink

    runtime = build_runtime_for_reading(settings)
    archive_storage = runtime["archive"]
    sinks: list[Any] = []
    archived_files = bool(archive_storage is not None and settings.archive.files)
    if archive_storage is not None:
        files = None
        if archived_files and settings.opencti.url:
            from .files import FileArchiver

            files = FileArchiver(
                archive_storage,
                _file_fetcher(settings),
                spool_dir=Path(settings.connector.work_dir),
                spool_bytes=settings.connector.spill_bytes,
            )
        sinks.append(
            ArchiveSink(
                archive_storage,
                codec=settings.archive.codec,
                level=settings.archive.compression_level,
                # A huge group's segment is built in a scratch file past the spill limit.
                spool_dir=Path(settings.connector.work_dir),
                spool_bytes=settings.connector.spill_bytes,
                files=files,
            )
        )
    if settings.target.opencti_url:
        from .target.opencti import OpenCTITarget

        t = settings.target
        carrier = None
        if t.files and settings.opencti.url:
            from .files import Downloads, FileCarrier

            # The archive sink writes each batch, its files first, before the target does.
            carrier = FileCarrier(
                archive=archive_storage if archived_files else None,
                downloads=Downloads(_file_fetcher(settings)),
                max_bytes=int(t.max_file_mb * 1024 * 1024),
                spool_dir=Path(settings.connector.work_dir),
                spool_bytes=settings.connector.spill_bytes,
            )
        sinks.append(
            OpenCTITarget(
                url=t.opencti_url,
                token=t.opencti_token,
                ssl_verify=t.ssl_verify,
                ca_bundle=t.ca_bundle or None,
                connector_id=settings.connector.id or _default_connector_id(settings),
                connector_name=settings.connector.name,
                synchronized=t.synchronized,
                source_url=settings.opencti.url or None,
                # With it, the target also tells the source by its platform id, not only by URL
                # (the same platform under a second address would otherwise loop).
                source_token=settings.opencti.token or None,
                allow_same_platform=t.allow_same_platform,
                transport=t.transport,
                amqp_host=t.amqp_host,
                amqp_port=t.amqp_port,
                amqp_use_ssl=optional_bool("target.amqp_use_ssl", t.amqp_use_ssl),
                amqp_max_message_bytes=t.amqp_max_message_bytes,
                files=carrier,
            )
        )
    if not sinks:
        raise ConfigError(
            "archive.uri", "nothing to do: set an archive URI and/or target.opencti_url"
        )
    return {**runtime, "sinks": sinks}


def _file_fetcher(settings: Settings) -> FileFetcher:
    """Downloads of attached files from the source platform, with the connector's token."""
    from .files import FileFetcher

    return FileFetcher(
        settings.opencti.url,
        settings.opencti.token,
        verify=settings.opencti.verify(),
    )


def _default_connector_id(settings: Settings) -> str:
    import uuid

    # Stable across restarts for one source + stream, so the platform shows one connector.
    return str(
        uuid.uuid5(
            uuid.NAMESPACE_URL,
            f"opencti-sync:{settings.opencti.url}:{settings.connector.live_stream_id}",
        )
    )


def _require_source(settings: Settings) -> None:
    if not settings.opencti.url:
        raise ConfigError("opencti.url", "required (env OPENCTI_URL)")
    if not settings.opencti.token:
        raise ConfigError("opencti.token", "required (env OPENCTI_TOKEN)")


def _check_sinks(sinks: Sequence[Any], stop: threading.Event, settings: Settings) -> None:
    for sink in sinks:
        _check_storage(sink, sink.name, stop, settings)


def _check_storage(what: Any, name: str, stop: threading.Event, settings: Settings) -> None:
    """``what.check()`` (a sink, a storage), retried while it fails for a transient reason."""
    _retrying(what.check, "checking", name, stop, settings)


def _retrying(
    fn: Callable[[], None], stage: str, what: str, stop: threading.Event, settings: Settings
) -> None:
    """``fn()``, retried with the run's backoff while it fails for a transient reason."""
    from .pipeline import retry_call

    retry_call(
        fn,
        stage=stage,
        stop=stop,
        initial=settings.connector.backoff_initial_secs,
        cap=settings.connector.backoff_max_secs,
        describe=what,
        shutdown_timeout=settings.connector.shutdown_timeout_secs,
    )


def cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _configure_logs(settings)
    from .pipeline import StopEvent

    stop = StopEvent()
    _install_signals(stop)
    return run_forever(
        settings,
        stop,
        source_moved=args.source_moved,
        resume_from_archive=args.resume_from_archive,
    )


def run_forever(
    settings: Settings,
    stop: threading.Event,
    *,
    source_moved: bool = False,
    resume_from_archive: bool = False,
) -> int:
    """``opencti-sync run`` without the process concerns (signals, logging): tests call this.

    ``source_moved``: the archive's platform is now at ``opencti.url`` (another address).
    ``resume_from_archive``: the checkpoint is lost; go on after the archive's newest segment.
    """
    _require_source(settings)
    c = settings.connector
    runtime = build_runtime(settings)
    _check_sinks(runtime["sinks"], stop, settings)
    if runtime["store"].storage is not runtime["archive"]:
        # The checkpoint kept apart (checkpoint.uri, or no archive): writable, and cleared of
        # what a killed save left there, as the archive is by its check.
        _check_storage(runtime["store"].storage, "checkpoint", stop, settings)
    # Everything built so far lives for the whole run: keep it out of the collector's scans,
    # and let the young generation grow (the hot path allocates many short-lived objects).
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    stop_metrics = None
    if settings.metrics.enabled:
        from .metrics import serve

        try:
            stop_metrics = serve(settings.metrics.host, settings.metrics.port)
        except OSError as exc:
            # A host that does not resolve, or a port taken: the settings name it (exit 2),
            # not "a local file error".
            unknown = isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
            raise ConfigError(
                "metrics.host" if unknown else "metrics.port",
                f"cannot serve /metrics on {settings.metrics.host}:{settings.metrics.port}: "
                f"{exc.strerror or exc}",
            ) from None
    from .run_lease import RunLease

    store = runtime["store"]
    archive = runtime["archive"]
    held = [archive] if archive is not None else []
    if archive is None or store.storage.describe() != archive.describe():
        held.append(store.storage)
    lease = RunLease(held, c.lease_secs, on_lost=stop.set)
    try:
        if not lease.wait(stop):
            log.info("Stopped while another run held the archive.")
            return 0
        return _follow(settings, stop, runtime, lease, source_moved, resume_from_archive)
    finally:
        lease.release()
        if stop_metrics is not None:
            stop_metrics()


def _follow(
    settings: Settings,
    stop: threading.Event,
    runtime: dict[str, Any],
    lease: RunLease,
    source_moved: bool,
    resume_from_archive: bool,
) -> int:
    """``run`` once it holds the archive (``lease``): check the checkpoint against the archive
    and follow the stream until stopped."""
    from .events import EventId
    from .pipeline import BatchPolicy, Pipeline
    from .source import SourceConfig, SseSource

    c = settings.connector
    store = runtime["store"]
    archive = runtime["archive"]
    source_url = settings.opencti.url.rstrip("/")
    started: list[tuple[Any, bool]] = []
    # Reads and writes of the archive and the checkpoint: a transient failure here (an S3
    # request that outlasts botocore's own tries) is retried with the run's backoff, as the
    # pipeline's writes are, instead of ending the run. Each try starts from what is stored.
    kept_at = f"{store.storage.describe()} ({store.key})"
    _retrying(
        lambda: started.append(
            _start_position(settings, runtime, source_moved, resume_from_archive)
        ),
        "starting",
        kept_at,
        stop,
        settings,
    )
    cp, tail_due = started[-1]
    verify: bool | str = settings.opencti.verify()
    source_config = SourceConfig(
        url=settings.opencti.url,
        token=settings.opencti.token,
        stream_id=c.live_stream_id,
        verify=verify,
        listen_delete=c.live_stream_listen_delete,
        no_dependencies=c.live_stream_no_dependencies,
        with_inferences=c.live_stream_with_inferences,
        recovery_page_size=c.live_stream_recovery_page_size,
        read_timeout=c.read_timeout_secs,
        max_event_bytes=c.max_event_bytes,
        backoff_initial=c.backoff_initial_secs,
        backoff_max=c.backoff_max_secs,
        retention_gap=c.retention_gap,
        retention_check=c.retention_check_secs,
        # Read ahead of the pipeline: about one batch more.
        queue_bytes=settings.archive.max_bytes,
    )
    source = SseSource(
        source_config,
        resume=EventId.parse(cp.last_event_id) if cp.last_event_id else None,
        resume_data=(EventId.parse(cp.last_segment_last_id) if cp.last_segment_last_id else None),
        start_from=f"{c.live_stream_start_timestamp}-0" if c.live_stream_start_timestamp else "0",
        recover_until=None if cp.recover_refused else cp.recover_until,
        retained_through=(
            EventId.parse(cp.retained_through)
            if cp.retained_through and EventId.is_valid(cp.retained_through)
            else None
        ),
    )
    jobs = _start_jobs(settings, runtime["archive"], stop)
    pipeline = Pipeline(
        source=source,
        sinks=runtime["sinks"],
        store=store,
        checkpoint=cp,
        policy=BatchPolicy(
            max_events=settings.archive.max_events,
            max_bytes=settings.archive.max_bytes,
            max_age_secs=settings.archive.max_age_secs,
        ),
        stop=stop,
        backoff_initial=c.backoff_initial_secs,
        backoff_max=c.backoff_max_secs,
        shutdown_timeout=c.shutdown_timeout_secs,
        reconciler=_reconciler(runtime["archive"], source_config, Path(c.work_dir)),
        spill_dir=Path(c.work_dir),
        spill_bytes=c.spill_bytes,
        on_position=_following_recovery(cp),
        guard=lease.check,
    )
    registration = None
    if c.register:
        from .registration import SourceRegistration

        registration = SourceRegistration(
            url=settings.opencti.url,
            token=settings.opencti.token,
            verify=verify,
            connector_id=c.id or _default_connector_id(settings),
            name=c.name,
            state=lambda: {
                "last_event_id": cp.last_event_id,
                "events_archived": cp.events_archived,
            },
        ).start()
    log.info(
        "Following the stream.",
        extra={
            "url": source_url,
            "stream_id": c.live_stream_id,
            "resume_event_id": cp.last_event_id,
            "sinks": [s.name for s in runtime["sinks"]],
        },
    )
    try:
        if tail_due:
            # Saved once the other sinks have the archive's newest segment: a run stopped
            # before finds no checkpoint again, and --resume-from-archive delivers it again.
            pipeline.deliver_archive_tail(archive)
            _retrying(lambda: store.save(cp), "checkpoint", kept_at, stop, settings)
        pipeline.run()
    finally:
        if jobs is not None:
            jobs.shutdown()
        for sink in runtime["sinks"]:
            sink.close()
        if registration is not None:
            registration.stop()
    if lease.lost:
        lease.check()  # raises LeaseLost: the stop came from a renewal that found it taken over
    log.info(
        "Stopped.", extra={"last_event_id": cp.last_event_id, "events_archived": cp.events_archived}
    )
    return 0


def _start_position(
    settings: Settings, runtime: dict[str, Any], source_moved: bool, resume_from_archive: bool
) -> tuple[Any, bool]:
    """Where ``run`` starts: the checkpoint, checked against the archive (or adopted from it,
    or a first run's), saved when it changed; and whether the archive's newest segment is due
    to the other sinks first (``Pipeline.deliver_archive_tail``)."""
    from .archive_position import adopt_archive, check_archive_end
    from .checkpoint import Checkpoint
    from .source import is_raw_stream, iso_now, same_url

    c = settings.connector
    store = runtime["store"]
    cp = store.load()
    source_url = settings.opencti.url.rstrip("/")
    if cp is not None and _stored_nothing(cp, runtime["archive"]):
        if cp.stream_id != c.live_stream_id or not same_url(cp.source_url, source_url):
            # A first run that never got an event (a mistyped stream id or URL) binds nothing.
            log.info(
                "The first run stored nothing: starting again with this stream.",
                extra={"previous_stream": cp.stream_id, "previous_url": cp.source_url},
            )
            cp = None
    archive = runtime["archive"]
    kept_at = f"{store.storage.describe()} ({store.key})"
    tail_due = False  # the archive's newest segment, for the other sinks (see below)
    if cp is None and archive is not None:
        cp = adopt_archive(
            archive,
            kept_at,
            stream_id=c.live_stream_id,
            source_url=source_url,
            adopt=resume_from_archive,
        )
        tail_due = cp is not None and any(s.name != "archive" for s in runtime["sinks"])
        if cp is not None and not tail_due:
            store.save(cp)
    elif cp is not None and archive is not None and check_archive_end(archive, cp, kept_at):
        store.save(cp)
    if cp is None:
        raw = is_raw_stream(c.live_stream_id)
        recover_until = None if raw else (c.live_stream_recover_iso_date or iso_now())
        cp = Checkpoint(
            stream_id=c.live_stream_id,
            source_url=source_url,
            recover_until=recover_until,
            first_recover_until=recover_until,
        )
        store.save(cp)  # the recover end date must survive a crash before the first batch
        log.info("First run: recovering.", extra={"recover_until": cp.recover_until})
    elif cp.stream_id != c.live_stream_id:
        raise ConfigError(
            "connector.live_stream_id",
            f"this archive follows stream {cp.stream_id!r}, not {c.live_stream_id!r}: use another archive",
        )
    elif not cp.source_url or not same_url(cp.source_url, source_url):
        # Another platform's stream in this archive would read as a retention gap, be
        # "repaired" into it, and its reconciliation would record this platform's objects as
        # deleted. A platform that only moved is acknowledged once, explicitly.
        if cp.source_url and not source_moved:
            raise ConfigError(
                "opencti.url",
                f"this archive follows {cp.source_url}, not {source_url}: use another archive, "
                "or, if the same platform moved to this address, run once with --source-moved",
            )
        log.warning(
            "The archive now follows this platform address.",
            extra={"previous": cp.source_url, "source_url": source_url},
        )
        cp.source_url = source_url
        store.save(cp)
    return cp, tail_due


def _following_recovery(cp: Any) -> Any:
    """The recover_progress callback for the checkpoint's recovery, made again when its end
    date changes while running (a retention gap's repair, a first recovery moved to a date the
    stream holds): the gauge then says "recovering" for it too, as after a restart."""
    until = None if cp.recover_refused else cp.recover_until
    current = [until, _recover_progress(until, cp.last_event_id)]

    def on_position(position: Any) -> None:
        now_until = None if cp.recover_refused else cp.recover_until
        if now_until != current[0]:
            current[0], current[1] = now_until, _recover_progress(now_until, None)
        if current[1] is not None:
            current[1](position)

    return on_position


def _recover_progress(recover_until: str | None, position: str | None) -> Any:
    """While recovering, the recover_progress gauge (and a bar on a terminal) follows batches;
    with no recovery to do (a raw stream, a refused or finished one), it says 1 from the start."""
    from . import metrics
    from .events import EventId
    from .source import iso_to_id

    end = iso_to_id(recover_until) if recover_until else None
    if not recover_until or end is None or (position and EventId.parse(position) >= end):
        metrics.RECOVER_PROGRESS.set(1.0)
        return None
    from .progress import RecoverProgress

    progress = RecoverProgress(recover_until)

    done = False

    def on_position(position: Any) -> None:
        # A heartbeat past the recovery's end finishes it too (its last batch carries the last
        # object's updated_at, always below that end).
        nonlocal done
        if done:
            return
        fraction = progress.update(position.ms)
        metrics.RECOVER_PROGRESS.set(fraction)
        if fraction >= 1.0:
            done = True
            progress.close()

    return on_position


def _reconciler(archive: Any, config: Any, work_dir: Path) -> Any:
    """Delete reconciliation needs the archive's state to compare with the platform."""
    if archive is None:
        return None
    from .reconcile import reconcile_deletes

    def run(at: Any, as_of: Any) -> Any:
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return reconcile_deletes(archive, config, at=at, as_of=as_of, work_dir=work_dir)

    return run


def _start_jobs(settings: Settings, archive: Any, stop: threading.Event) -> Any:
    if archive is None or not (settings.snapshot.schedule or settings.retention.schedule):
        return None
    from .jobs import JobRunner
    from .retention import RetentionPolicy

    runner = JobRunner(
        archive,
        snapshot_schedule=settings.snapshot.schedule,
        retention_schedule=settings.retention.schedule,
        retention=RetentionPolicy(
            keep_days=settings.retention.keep_days, keep_snapshots=settings.retention.keep_snapshots
        ),
        work_dir=Path(settings.connector.work_dir),
        shutdown_timeout_secs=settings.connector.shutdown_timeout_secs,
        state_image=settings.snapshot.state_image,
        codec=settings.archive.codec,
        level=settings.archive.compression_level,
    )
    # The run's own stop event: SIGTERM stops a running snapshot at once, while the stream
    # drains, rather than after the drain.
    runner.stop = stop
    runner.start()
    return runner


class Terminated(KeyboardInterrupt):
    """SIGTERM in a one-shot command (restore, snapshot, prune, verify...)."""


def _terminate_on_sigterm() -> Any:
    """SIGTERM stops a one-shot command the way Ctrl-C does: its ``finally`` blocks run (the job
    lock released, scratch files removed, a restore's progress kept). As a container's PID 1 a
    process has no default action for SIGTERM: without a handler, ``docker stop`` was ignored
    until its grace period ran out and SIGKILL left the job lock held for its whole lease.
    Returns the handler to put back (None: called off the main thread, nothing set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        return previous  # an embedding program's own handler

    def handler(_signum: int, _frame: object) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, handler)
    return previous


def _install_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        if not stop.is_set():
            log.info("Stop requested; draining.", extra={"signal": signal.Signals(signum).name})
        stop.set()  # a second signal during the drain changes nothing

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# -- status / check ---------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    import datetime as dt
    import time

    import orjson

    from .archive import ArchiveReader
    from .events import EventId
    from .source import iso_to_id

    settings = _settings(args)
    _configure_logs(settings)
    runtime = build_runtime_for_reading(settings)
    cp = runtime["store"].load()
    info: dict[str, Any] = {
        "archive": runtime["archive"].describe() if runtime["archive"] else None,
        "stream_id": cp.stream_id if cp else None,
        "source_url": cp.source_url if cp else None,
        "last_event_id": cp.last_event_id if cp else None,
        "events_archived": cp.events_archived if cp else 0,
        "segments_written": cp.segments_written if cp else 0,
        "quarantined": cp.quarantined if cp else 0,
        "recover_until": cp.recover_until if cp else None,
        "retention_gaps": len(cp.retention_gaps) if cp else 0,
        "reconcile_due": bool(cp and cp.reconcile and cp.reconcile.get("due")),
        "reconcile_failed": (cp.reconcile or {}).get("failed") if cp else None,
        "checkpoint_saved_at": cp.saved_at if cp else None,
    }
    from .run_lease import lease_holder

    # The run writing this archive now (a second one waits: its standby).
    info["run_held_by"] = lease_holder(runtime["archive"] or runtime["store"].storage)
    if cp and cp.last_event_id:
        info["lag_seconds"] = round(
            max(0.0, time.time() - EventId.parse(cp.last_event_id).ms / 1000), 3
        )
    if runtime["archive"] is not None:
        reader = ArchiveReader(runtime["archive"])
        size = raw = segments = 0
        first = last = None
        for ref in reader.manifests():
            segments += 1
            size += ref.manifest.size
            raw += ref.manifest.raw_size
            first = first or ref.manifest.first_event_id
            last = ref.manifest.last_event_id
        info.update(
            {
                "archive_segments": segments,
                "archive_bytes": size,
                "archive_raw_bytes": raw,
                "archive_first_event_id": first,
                "archive_last_event_id": last,
            }
        )
        from .retention import RetentionPolicy, trusted_now, window_start
        from .snapshot import list_snapshots

        snaps = list_snapshots(runtime["archive"])
        info["snapshots"] = len(snaps)
        info["last_snapshot"] = str(snaps[-1].as_of) if snaps else None
        r = settings.retention
        info["retention_keep_days"] = r.keep_days
        info["retention_keep_snapshots"] = r.keep_snapshots
        info["retention_window_start"] = (
            str(
                window_start(
                    RetentionPolicy(r.keep_days, r.keep_snapshots),
                    # The window prune uses: never more than a day past the archive's position.
                    trusted_now(runtime["archive"], dt.datetime.now(dt.UTC)),
                )
            )
            if r.keep_days > 0
            else None
        )
        oldest = [x for x in (first, str(snaps[0].as_of) if snaps else None) if x]
        restorable = min(oldest, key=EventId.parse) if oldest else None
        # The first run recovered each object as it was then, under its updated_at: a point
        # before that recovery's end would hold only the objects unchanged since.
        first_end = cp.first_recovery_end if cp else None
        recovered = iso_to_id(first_end) if first_end else None
        if restorable is not None and recovered is not None:
            restorable = str(max(EventId.parse(restorable), recovered))
        info["restorable_from"] = restorable
    nothing = cp is None and not info.get("archive_segments") and not info.get("snapshots")
    if args.json:  # a script reads the zeros as well as the exit code
        print(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode())
    elif not nothing:  # a table of zeros above the error would read as an empty archive found
        width = max(len(k) for k in info)
        for key, value in info.items():
            print(f"{key:<{width}}  {value if value is not None else '-'}")
    if nothing:
        if runtime["archive"] is None:  # a sync into a target only: its checkpoint
            where = runtime["store"].storage.describe()
            said = f"no archive configured (archive.uri is empty) and no checkpoint at {where}"
        else:
            said = f"no archive at {info['archive']}"
        print(f"opencti-sync: {said} (yet?)", file=sys.stderr)
        return 1
    return 0


def build_runtime_for_reading(settings: Settings) -> dict[str, Any]:
    """The archive storage (or None) and the checkpoint store, as configured."""
    from .checkpoint import configured_store
    from .storage import open_storage

    s3 = settings.s3_options()
    archive = open_storage(settings.archive.uri, **s3) if settings.archive.uri else None
    return {"archive": archive, "store": configured_store(settings, archive)}


def cmd_check(args: argparse.Namespace) -> int:
    import httpx

    from .source import is_raw_stream, tls_verify

    settings = _settings(args)
    _configure_logs(settings)
    _require_source(settings)
    ok = True
    url = settings.opencti.url.rstrip("/")
    stream = settings.connector.live_stream_id
    path = "/stream" if is_raw_stream(stream) else f"/stream/{stream}"
    verify: bool | str = settings.opencti.verify()
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(10.0), verify=tls_verify(verify)) as client,
            client.stream(
                "GET", url + path, headers={"Authorization": f"Bearer {settings.opencti.token}"}
            ) as resp,
        ):
            if resp.status_code == 200:
                print(f"source   OK    {url}{path}")
            else:
                ok = False
                print(f"source   FAIL  {url}{path}: HTTP {resp.status_code} {resp.reason_phrase}")
    except httpx.HTTPError as exc:
        ok = False
        print(f"source   FAIL  {url}{path}: {type(exc).__name__}: {exc}")
    try:
        runtime = build_runtime(settings)
    except ConfigError:
        raise
    for sink in runtime["sinks"]:
        try:
            sink.check()
            print(f"{sink.name:<8} OK")
        except (PermanentError, RetryableError) as exc:
            ok = False
            print(f"{sink.name:<8} FAIL  {exc}")
    return 0 if ok else 1


def cmd_config_doc(args: argparse.Namespace) -> int:
    from .configdoc import render, update_files

    if args.update:
        for path in update_files(Path.cwd()):
            print(f"updated {path}")
        return 0
    print(render(args.format), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.dir))


def _archive_command(args: argparse.Namespace) -> tuple[Settings, Any]:
    """Settings, logs and the archive storage of a command that needs an archive."""
    settings = _settings(args)
    _configure_logs(settings)
    archive = build_runtime_for_reading(settings)["archive"]
    if archive is None:
        raise ConfigError("archive.uri", "required (--archive or ARCHIVE_URI)")
    return settings, archive


def _require_archive(archive: Any) -> None:
    """Commands that work on an existing archive say so when there is none at the URI (a
    mistyped path or prefix would otherwise look like an empty, healthy archive)."""
    from .checkpoint import CHECKPOINT_KEY

    if archive.exists(CHECKPOINT_KEY) or _holds_any(archive, "manifests/", "snapshots/"):
        return
    raise ConnectorError(f"no archive at {archive.describe()} (no checkpoint, segment or snapshot)")


def cmd_snapshot(args: argparse.Namespace) -> int:
    from .jobs import describe_snapshot, run_snapshot_job

    settings, archive = _archive_command(args)
    _require_archive(archive)
    work_dir = Path(settings.connector.work_dir)
    info = run_snapshot_job(
        archive,
        work_dir,
        state_image=settings.snapshot.state_image,
        codec=settings.archive.codec,
        level=settings.archive.compression_level,
    )
    print(describe_snapshot(info))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from .jobs import run_retention_job
    from .retention import RetentionPolicy

    settings, archive = _archive_command(args)
    _require_archive(archive)
    policy = RetentionPolicy(
        keep_days=settings.retention.keep_days, keep_snapshots=settings.retention.keep_snapshots
    )
    report = run_retention_job(archive, policy, dry_run=args.dry_run)
    print(report)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .checkpoint import configured_store
    from .verify import format_report, verify_archive

    settings, archive = _archive_command(args)
    token = args.token or settings.target.opencti_token
    # Said now, not after the archive's verification, which may take minutes.
    if args.against_opencti:
        if not token:
            raise ConfigError(
                "--token", "required with --against-opencti (or TARGET_OPENCTI_TOKEN)"
            )
        if args.until:
            from .restore import parse_until

            parse_until(args.until)
    else:
        given = [
            flag for flag, value in (("--until", args.until), ("--token", args.token)) if value
        ]
        if given:
            raise ConfigError(given[0], "applies to --against-opencti only")
    work = Path(settings.connector.work_dir)
    work.mkdir(parents=True, exist_ok=True, mode=0o700)
    report = verify_archive(archive, work_dir=work, checkpoints=configured_store(settings, archive))
    print(format_report(report))
    ok = bool(report.ok)
    if args.against_opencti:
        from .restore_cli import verify_against_opencti

        diff_ok = verify_against_opencti(
            archive,
            url=args.against_opencti,
            token=token,
            until=args.until,
            work_dir=work,
            ssl_verify=settings.target.ssl_verify,
            ca_bundle=settings.target.ca_bundle or None,
        )
        ok = ok and diff_ok
    return 0 if ok else 1


def cmd_restore(args: argparse.Namespace) -> int:
    from .restore_cli import run_restore_cli

    settings = _settings(args)
    _configure_logs(settings)
    return run_restore_cli(settings, args)


_COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "check": cmd_check,
    "config-doc": cmd_config_doc,
    "demo": cmd_demo,
    "snapshot": cmd_snapshot,
    "prune": cmd_prune,
    "verify": cmd_verify,
    "restore": cmd_restore,
}


if __name__ == "__main__":
    sys.exit(main())
