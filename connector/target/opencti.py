"""The OpenCTI target: applies stream events to another platform through pycti.

Two transports (docs/OPENCTI-TARGET.md §2):

* ``amqp``: one ``type: "event"`` message per event on the connector's push queue, as the
  platform's own Synchronizer does (``connector.target.amqp``); the only path that carries the
  source ``event_id``, ``synchronized`` and ``previous_standard``. Acknowledged = the broker
  confirmed every message.
* ``api``: the platform's ``stixBundlePush`` mutation (``api.send_bundle_to_api``); the platform
  builds the worker message itself. Acknowledged = the mutation returned without error.

Either way the platform's workers apply the data later: "acknowledged" is "durably queued".
Registration, ping, restore's ``push_objects`` / ``delete_ids`` always use the API.

Event semantics follow the platform's own synchroniser (opencti-stream-protocol.md §6.5):
create/update upsert the whole object, merge becomes an ``opencti_operation: merge`` object,
delete an ``opencti_operation: delete`` object. Stream order is kept by pushing consecutive runs
one after another: a merge or delete never shares a bundle with the upserts before it, because
the platform's workers split multi-object bundles and import the pieces in dependency order.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import requests  # type: ignore[import-untyped]  # pycti's HTTP client; no stubs installed
from pycti import OpenCTIApiClient

from ..errors import PayloadTooLarge, PermanentError, RetryableError, SinkError
from ..events import OCTI_EXT, EventId, Quarantined, StreamEvent, octi_ext
from ..files import FileCarrier, file_entries, file_key
from ..registration import stream_connector
from ..sink import Batch
from ..source import same_url
from ..stix_lookup import standard_ids, stix_queries
from .amqp import (
    DEFAULT_MAX_MESSAGE_BYTES,
    OPENCTI_SYSTEM_UUID,
    AmqpEndpoint,
    AmqpPublisher,
    Message,
    MessageTooLarge,
    event_messages,
)
from .common import (
    Absorbed,
    LiveIds,
    MergeLookahead,
    left_the_view,
    live_aliases_of,
    merge_sources,
    previous_standard,
    source_ids,
    without_aliases,
)

__all__ = [
    "TRANSPORTS",
    "AccessRefused",
    "ObjectRefused",
    "OpenCTITarget",
    "Push",
    "plan_pushes",
    "previous_standard",
    "same_url",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSPORTS = ("amqp", "api")
PING_EVERY_S = 40.0  # pycti's own PingAlive period: the UI shows connectors as alive on it
_BUNDLE_NS = uuid.UUID("6f0f3c3e-9a4e-4c1e-8f5d-2f8f3b8a7c11")

# GraphQL error names (top-level "name", or extensions.code) pycti puts into its ValueError.
_AUTH_ERRORS = {"AUTH_REQUIRED", "AUTH_FAILURE", "FORBIDDEN_ACCESS", "UNAUTHENTICATED"}
_TRANSIENT_ERRORS = {
    "LOCK_ERROR",
    "DATABASE_ERROR",
    "ENGINE_ERROR",
    "TIMEOUT_ERROR",
    "RESOURCE_ERROR",
    "TOO_MANY_REQUESTS",
}
_TRANSIENT_WORDS = ("lock", "timeout", "timed out", "bad gateway", "unavailable", "try again")
# Errors about the data of one object even when they do not name it.
_OBJECT_ERRORS = {"VALIDATION_ERROR", "MISSING_REFERENCE_ERROR"}
_OBJECT_WORD = re.compile(r"\bobject\b")  # "object #3 has no type", not "reading 'objects'"
# A request the platform could not queue for its size: its broker's refusal ("message size N is
# larger than configured max size M") or its body parser's ("request entity too large").
_TOO_LARGE = re.compile(
    r"larger than (the )?(configured )?max(imum)? (message )?size|entity too large", re.IGNORECASE
)


class AccessRefused(PermanentError):
    """Nothing will go through: authentication, a lost capability, an unknown or invalid
    connector. Never quarantines anything: the run stops, the checkpoint stays."""


class ObjectRefused(PermanentError):
    """The platform refused the data of an object (validation, a value it will not take, a
    missing reference): the error names an object or is an object-level validation error.
    The only refusal ``write`` quarantines."""


_IDENTITY_QUERY = """
    query SyncTargetIdentity {
        about { version }
        settings { id }
    }
"""


@dataclass(slots=True)
class Push:
    """One ``stixBundlePush``: objects applied together, after every earlier push."""

    kind: str  # "upsert" | "delete" | "merge"
    objects: list[dict[str, Any]] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    # The event each object comes from (same order as ``objects``; the last event that set it
    # when several did). Empty for pushes not made of stream events (restore).
    object_events: list[str] = field(default_factory=list)

    def event_of(self, index: int) -> str | None:
        return self.object_events[index] if index < len(self.object_events) else None

    def single(self, index: int) -> Push:
        """The push of object ``index`` alone (retrying a refused push object by object)."""
        event = self.event_of(index)
        events = [event] if event is not None else list(self.event_ids)
        return Push(self.kind, [self.objects[index]], events, [event] if event else [])

    def bundle(self) -> str:
        # Deterministic bundle id: a replayed batch pushes byte-identical bundles, and two
        # different bundles never share an id (the content's digest is part of the seed: the
        # single pushes of a refused push, a merge's upserts before and after it).
        objects = json.dumps(self.objects, ensure_ascii=False)
        digest = hashlib.sha256(objects.encode("utf-8", "surrogatepass")).hexdigest()
        events = f"{self.event_ids[0]}:{self.event_ids[-1]}" if self.event_ids else ""
        seed = f"{self.kind}:{events}:{len(self.objects)}:{digest}"
        bundle_id = f"bundle--{uuid.uuid5(_BUNDLE_NS, seed)}"
        # Same text as json.dumps({"type", "id", "objects"}) without serialising twice.
        return f'{{"type": "bundle", "id": "{bundle_id}", "objects": {objects}}}'


def _with_alias(stix: dict[str, Any], alias: str) -> dict[str, Any]:
    """Carry the previous standard id as a STIX id alias.

    The push path has no ``previous-standard`` header (the platform builds the worker message
    itself), but the platform resolves an upsert's existing entity by every input id, aliases
    included, so the entity whose standard id changed is updated instead of duplicated.
    """
    out = copy.deepcopy(stix)
    ext = out.setdefault("extensions", {}).setdefault(
        OCTI_EXT, {"extension_type": "property-extension"}
    )
    aliases = ext.get("stix_ids")
    aliases = list(aliases) if isinstance(aliases, list) else []
    if alias not in aliases:
        aliases.append(alias)
    ext["stix_ids"] = aliases
    return out


def _operation(stix: dict[str, Any], operation: str, **extra: Any) -> dict[str, Any]:
    # Same shape the platform's worker builds from a stream event (push_handler.py): the data
    # object plus top-level ``opencti_operation`` and the operation's arguments.
    out = copy.deepcopy(stix)
    out["opencti_operation"] = operation
    out.update(extra)
    return out


def _pushing_to(answer: Any) -> EventId | None:
    """The ``pushing_to`` mark of a registration's answer (the connector's saved state)."""
    raw = answer.get("connector_state") if isinstance(answer, dict) else None
    try:
        state = json.loads(raw) if isinstance(raw, str) and raw else None
        mark = state.get("pushing_to") if isinstance(state, dict) else None
        return EventId.parse(mark) if isinstance(mark, str) else None
    except ValueError:  # not JSON, or not an event id
        return None


def plan_pushes(
    events: Sequence[StreamEvent],
    max_objects: int = 500,
    live_aliases: Mapping[str, set[str]] | None = None,
    absorbed: Mapping[str, str] | None = None,
) -> Iterator[Push]:
    """Turn stream events into pushes that, applied in order, reproduce the stream's effect.

    Consecutive creates/updates share a push (the last version of an object wins, at the
    position of its first appearance so references still come after their targets). Deletes
    share a push with adjacent deletes only. A merge is three pushes: upsert the target (it may
    be unknown here), merge the sources into it, upsert it again so its content is the source's
    final one. Until a merge is applied, no upsert carries its sources' ids as aliases (see
    ``common.without_aliases``); ``live_aliases`` (object id -> aliases that name another live
    entity on the target, see ``OpenCTITarget.on_target``) extends that to merges in later
    batches. An id-changing update starts a new push so the old id is there to be found.
    Events of objects the target already merged away or renamed (``absorbed``, object id ->
    the entity it names there, see ``OpenCTITarget.on_target``) are left out
    (``common.Absorbed``).

    Pushes are yielded as they fill, and ``events`` is read twice, never held: a huge
    dependency group that waits on disk (``connector.pending``) is pushed 500 objects at a time.
    """
    lookahead = MergeLookahead(events)
    live = LiveIds()
    past = Absorbed(absorbed)
    pushes: list[Push] = []  # filled by the step of one event, yielded after it
    upserts: dict[str, dict[str, Any]] = {}
    upsert_ids: list[str] = []
    upsert_from: dict[str, str] = {}  # object id -> the event its pushed version comes from
    deletes: dict[str, dict[str, Any]] = {}
    delete_ids: list[str] = []
    delete_from: dict[str, str] = {}

    def flush_upserts() -> None:
        if upserts:
            origin = [upsert_from[sid] for sid in upserts]
            pushes.append(Push("upsert", list(upserts.values()), list(upsert_ids), origin))
            upserts.clear()
            upsert_ids.clear()
            upsert_from.clear()

    def flush_deletes() -> None:
        if deletes:
            origin = [delete_from[sid] for sid in deletes]
            pushes.append(Push("delete", list(deletes.values()), list(delete_ids), origin))
            deletes.clear()
            delete_ids.clear()
            delete_from.clear()

    for index, event in enumerate(events):
        yield from pushes
        pushes.clear()
        ev = event.parsed()
        later_sources, others = lookahead.after(index), live.taken(ev)
        if past.skip(ev):
            continue  # a replay of what the target already went past (common.Absorbed)
        stix = ev.stix
        if ev.event in ("create", "update"):
            flush_deletes()
            dropped = later_sources | others | live_aliases_of(live_aliases, ev)
            stix = without_aliases(stix, dropped)
            prev = previous_standard(ev) if ev.event == "update" else None
            if prev is not None:
                flush_upserts()
                stix = _with_alias(stix, prev)
            if ev.stix_id not in upserts and len(upserts) >= max_objects:
                flush_upserts()
            upserts[ev.stix_id] = stix
            upsert_ids.append(ev.id_text)
            upsert_from[ev.stix_id] = ev.id_text
        elif ev.event == "delete":
            if left_the_view(ev):
                continue  # kept as last seen (common.left_the_view)
            flush_upserts()
            deletes[ev.stix_id] = _operation(stix, "delete")
            delete_ids.append(ev.id_text)
            delete_from[ev.stix_id] = ev.id_text
            if len(deletes) >= max_objects:
                flush_deletes()
        elif ev.event == "merge":
            flush_upserts()
            flush_deletes()
            sources = merge_sources(ev)
            src_ids = [s["id"] for s in sources if isinstance(s.get("id"), str)]
            ids = [ev.id_text]
            dropped = source_ids(sources) | later_sources
            pushes.append(Push("upsert", [without_aliases(stix, dropped)], ids, ids))
            if src_ids:
                merge = _operation(
                    stix, "merge", merge_target_id=ev.stix_id, merge_source_ids=src_ids
                )
                pushes.append(Push("merge", [merge], ids, ids))
                pushes.append(Push("upsert", [without_aliases(stix, later_sources)], ids, ids))
    flush_upserts()
    flush_deletes()
    yield from pushes


_PUBLISH_MESSAGES = 4000  # per publish call: four of the publisher's 1,000-message transactions
# ... and about this many bytes at most: a message carrying an attached file is megabytes.
_PUBLISH_BYTES = 32 * 1024 * 1024


def _whole_events(
    messages: Iterator[Message], size: int, max_bytes: int = _PUBLISH_BYTES
) -> Iterator[list[Message]]:
    """``messages`` in lists of about ``size`` messages or ``max_bytes`` bytes, never splitting
    an event's own messages (a merge is an upsert and the merge: both go, or neither); the
    extra messages carrying its files may go in the next list.

    A list also ends after an event's extra messages: the next event is built only once they
    are published, so that when the broker refuses that event (a size limit learned now), the
    files it claimed are free for the events after it."""
    chunk: list[Message] = []
    held = 0
    for message in messages:
        full = len(chunk) >= size or held >= max_bytes
        files_done = chunk and chunk[-1].extra and not message.extra
        if chunk and (files_done or (full and (message.at != chunk[-1].at or message.extra))):
            yield chunk
            chunk, held = [], 0
        chunk.append(message)
        held += len(message.body)
    if chunk:
        yield chunk


_CONNECTOR_REFUSAL = re.compile(
    r"\b(invalid|unknown) connector\b|\bconnector (not found|does not exist|is not registered)"
)
_OVERRIDE = (
    "To do it anyway: target.allow_same_platform (TARGET_ALLOW_SAME_PLATFORM) for run, "
    "--force for restore."
)


class OpenCTITarget:
    """A ``connector.sink.Sink`` writing into an OpenCTI platform through real pycti."""

    name = "opencti"

    def __init__(
        self,
        *,
        url: str,
        token: str,
        ssl_verify: bool = True,
        ca_bundle: str | None = None,
        connector_id: str,
        connector_name: str = "opencti-sync",
        synchronized: bool = False,
        source_url: str | None = None,
        source_token: str | None = None,
        allow_same_platform: bool = False,
        register: bool = True,
        max_bundle_objects: int = 500,
        requests_timeout: int = 60,
        transport: str = "api",
        amqp_host: str = "",
        amqp_port: int = 0,
        amqp_use_ssl: bool | None = None,
        amqp_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        resolve_aliases: bool = True,
        replay_guard: bool = True,
        files: FileCarrier | None = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {transport!r}")
        if amqp_max_message_bytes < 1:
            raise ValueError("amqp_max_message_bytes must be >= 1")
        self.url = url.rstrip("/")
        self._token = token
        self._verify: bool | str = ca_bundle if (ssl_verify and ca_bundle) else ssl_verify
        self.connector_id = connector_id
        self.connector_name = connector_name
        self.synchronized = synchronized
        self.source_url = source_url
        self._source_token = source_token
        self.allow_same_platform = allow_same_platform
        self.register = register
        self.max_bundle_objects = max(1, max_bundle_objects)
        self.requests_timeout = requests_timeout
        self.platform_id: str | None = None
        self.platform_version: str | None = None
        self.last_event_id: str | None = None
        self._api: OpenCTIApiClient | None = None
        self._status: int | None = None
        self._checked = False
        self.rejected: list[Quarantined] = []
        self._last_ping = 0.0
        # AMQP transport: broker overrides, and what registration told us.
        self.transport = transport
        self.amqp_host, self.amqp_port, self.amqp_use_ssl = amqp_host, amqp_port, amqp_use_ssl
        # Largest message body published; lowered when the broker closes the channel on a
        # bigger one (its max_message_size is not announced anywhere).
        self.amqp_max_message_bytes = amqp_max_message_bytes
        self.resolve_aliases = resolve_aliases
        # Leave out the events of objects the target already merged away or renamed (a batch
        # of the stream pushed again, common.Absorbed). Off for a restore: it pushes the
        # archive's state, not stream events, so there is no merge of a batch to replay.
        self.replay_guard = replay_guard
        # Where a batch may be a replay (api transport): the last id of the batch a write was
        # pushing when it stopped, kept on the target as this connector's state ("pushing_to",
        # written before each batch's pushes, read back at registration; any id when the
        # connector is not registered), and every write after a failed one.
        self._pushing_to: EventId | None = None
        self._replay_until: EventId | None = None
        self._replay_always = False
        self._after_failure = False
        self._ssl_verify = ssl_verify
        self._ca_bundle = ca_bundle
        self.publisher: AmqpPublisher | None = None
        # Set by the pipeline (``sink.Bounded``): once the run is stopping, when a publish still
        # waiting on the broker gives up (amqp; a broker gone silent would hold it ~70 s).
        self.deadline: Callable[[], float | None] = lambda: None
        self.applicant_id = OPENCTI_SYSTEM_UUID
        # Attached files' bytes for the live sync (None: their descriptions only, no bytes).
        self.files = files

    # -- pycti plumbing -------------------------------------------------------------------

    def _client(self, url: str, token: str) -> OpenCTIApiClient:
        try:
            # Health check done by us (same query) so the real error is not swallowed.
            api = OpenCTIApiClient(
                url,
                token,
                log_level="error",
                ssl_verify=self._verify,
                perform_health_check=False,
                requests_timeout=self.requests_timeout,
            )
        except ValueError as exc:
            raise PermanentError(f"OpenCTI target {url}: {self._scrub(str(exc))}") from exc
        # pycti turns every non-200 answer into ValueError(body): remember the status so the
        # error can be classified (429/5xx retryable, 401/403 permanent).
        api.session.hooks["response"].append(self._remember_status)
        return api

    def _remember_status(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._status = response.status_code

    @property
    def api(self) -> OpenCTIApiClient:
        if self._api is None:
            self._api = self._client(self.url, self._token)
        return self._api

    def _scrub(self, text: str) -> str:
        for secret in (self._token, self._source_token):
            if secret:
                text = text.replace(secret, "***")
        return text[:500]

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one pycti call, translating whatever it raises into our taxonomy."""
        self._status = None
        try:
            return fn()
        except SinkError:
            raise
        except Exception as exc:  # pycti raises ValueError/requests/JSON errors for everything
            raise self._translate(what, exc) from exc

    def _translate(self, what: str, exc: Exception) -> SinkError:
        where = f"OpenCTI target {self.url}: {what}"
        if isinstance(exc, requests.exceptions.SSLError):
            return PermanentError(f"{where}: TLS verification failed ({type(exc).__name__})")
        if isinstance(exc, requests.RequestException):
            return RetryableError(f"{where}: {type(exc).__name__}: {self._scrub(str(exc))}")
        detail = exc.args[0] if exc.args else exc
        if isinstance(detail, dict):
            name = str(detail.get("name") or "")
            message = str(detail.get("error_message") or detail.get("message") or "")
            reason = detail.get("reason") or detail.get("cause")
            obj = detail.get("id") or detail.get("stix_id")
            text = f"{where}: {name}: {message}"
            text += (f": {reason}" if reason else "") + (f" (object {obj})" if obj else "")
            text = self._scrub(text)
            if _TOO_LARGE.search(f"{message} {reason or ''}"):
                return PayloadTooLarge(text)
            if name in _AUTH_ERRORS:
                return AccessRefused(text + " - check the target token and its capabilities")
            lowered = message.lower()
            if name in _TRANSIENT_ERRORS or any(w in lowered for w in _TRANSIENT_WORDS):
                return RetryableError(text)
            about = f"{message} {reason or ''}".lower()
            # "Invalid connector", "Connector not found", ... - not an object that names one.
            if not obj and _CONNECTOR_REFUSAL.search(about):
                return AccessRefused(
                    text + " - is the connector registered on the target platform?"
                )
            if obj or _OBJECT_WORD.search(about) or name in _OBJECT_ERRORS:
                return ObjectRefused(text)
            return PermanentError(text)
        status = self._status
        text = self._scrub(f"{where}: HTTP {status}: {detail}")
        if status in (401, 403):
            return AccessRefused(text + " - check the target token")
        if status == 413:
            return PayloadTooLarge(text + " - larger than the platform's max_payload_body_size")
        if status is None or status == 429 or status >= 500 or status == 200:
            # 200 with an unreadable body is a proxy or a restarting platform, not our data.
            return RetryableError(text)
        return PermanentError(text)

    # -- Sink -----------------------------------------------------------------------------

    def check(self) -> None:
        """Health check, loop prevention, registration as a STREAM connector, first ping."""
        about = self._call("health check", lambda: self.api.query(_IDENTITY_QUERY))
        data = about.get("data") or {}
        self.platform_version = (data.get("about") or {}).get("version")
        self.platform_id = (data.get("settings") or {}).get("id")
        self._check_not_source()
        answer: Any = None
        if self.register:
            connector = stream_connector(self.connector_id, self.connector_name)
            answer = self._call(
                "register connector", lambda: self.api.connector.register(connector)
            )
        if self.transport == "amqp":
            self._open_publisher(answer)
        self._replay_until = _pushing_to(answer)
        self._pushing_to = self._replay_until
        self._replay_always = not self.register
        self._checked = True
        self._ping(force=True)
        log.info(
            "OpenCTI target ready",
            extra={
                "target": self.url,
                "version": self.platform_version,
                "sync": self.synchronized,
                "transport": self.transport,
                "broker": self.publisher.endpoint.describe() if self.publisher else None,
            },
        )

    def _open_publisher(self, answer: Any) -> None:
        if not self.register:
            raise PermanentError(
                "OpenCTI target: the amqp transport needs registration (the broker and its "
                "credentials come from the registerConnector answer); enable it or use "
                "target.transport: api"
            )
        if not isinstance(answer, dict):
            raise PermanentError(f"OpenCTI target {self.url}: registration answered nothing")
        endpoint = AmqpEndpoint.from_registration(
            answer, host=self.amqp_host, port=self.amqp_port, use_ssl=self.amqp_use_ssl
        )
        self.applicant_id = str(answer.get("connector_user_id") or OPENCTI_SYSTEM_UUID)
        if self.publisher is not None:
            self.publisher.close()
        self.publisher = AmqpPublisher(
            endpoint,
            ssl_verify=self._ssl_verify,
            ca_bundle=self._ca_bundle,
            timeout=float(self.requests_timeout),
            deadline=lambda: self.deadline(),
        )
        self.publisher.check()

    def _check_not_source(self) -> None:
        if self.allow_same_platform or not self.source_url:
            return
        if self._source_token and self.platform_id:
            src = self._client(self.source_url, self._source_token)
            try:
                answer = src.query(_IDENTITY_QUERY)
                source_id = ((answer.get("data") or {}).get("settings") or {}).get("id")
            except Exception:  # the source is read by another component; fall back to URLs
                source_id = None
            if source_id and source_id == self.platform_id:
                raise PermanentError(
                    f"OpenCTI target {self.url} is the source platform itself (same settings id "
                    f"{source_id}); syncing a platform into itself loops. {_OVERRIDE}"
                )
        if same_url(self.source_url, self.url):
            raise PermanentError(
                f"OpenCTI target {self.url} is the source URL; syncing a platform into itself "
                f"loops. {_OVERRIDE}"
            )

    def _ping(self, *, force: bool = False) -> None:
        if not self.register:
            return
        now = time.monotonic()
        if not force and now - self._last_ping < PING_EVERY_S:
            return
        state: dict[str, Any] = {"last_event_id": self.last_event_id}
        if self._pushing_to is not None:
            state["pushing_to"] = str(self._pushing_to)
        info = {
            "run_and_terminate": False,
            "buffering": False,
            "queue_threshold": 500.0,
            "queue_messages_size": 0.0,
            "next_run_datetime": None,
            "last_run_datetime": None,
        }
        self._call(
            "ping connector", lambda: self.api.connector.ping(self.connector_id, state, info)
        )
        self._last_ping = now

    def _push(self, push: Push) -> None:
        bundle = push.bundle()
        api = self.api
        # Informational on the push path (the platform does not forward request headers to its
        # workers); they take effect on any direct API call pycti makes with this client.
        api.set_synchronized_upsert_header(self.synchronized)
        if push.event_ids:
            api.set_event_id(push.event_ids[-1])
        what = f"push {push.kind} of {len(push.objects)} object(s)"
        if len(push.objects) == 1:
            what += f" {push.objects[0].get('id')}"
        if push.event_ids:
            what += f" (events {push.event_ids[0]}..{push.event_ids[-1]})"
        result = self._call(
            what,
            lambda: api.send_bundle_to_api(
                connector_id=self.connector_id, bundle=bundle, work_id=None
            ),
        )
        if not isinstance(result, dict) or not (result.get("data") or {}).get("stixBundlePush"):
            raise RetryableError(f"OpenCTI target {self.url}: {what}: not acknowledged")

    def write(self, batch: Batch) -> None:
        """Push the batch's events in stream order; returns once every push is acknowledged.

        An object the platform refuses for itself (``ObjectRefused``: validation, a value it
        will not take) does not stop the sync: it is reported in ``rejected`` (the pipeline
        quarantines it, under the event it came from, with the platform's reason). Which
        refusals those are is decided by the kind of error, never by how many objects a push
        or a batch holds: authentication, a lost capability, an unknown connector
        (``AccessRefused``) and any error that names no object raise, and nothing of the batch
        is quarantined. On ``amqp`` an event too large for the broker is reported the same way.
        """
        if not self._checked:
            self.check()
        self.rejected = []
        try:
            self._write(batch)
        except BaseException:
            self.rejected = []  # the batch is not done: nothing of it is quarantined
            self._after_failure = True  # what it pushed may be pushed again: a replay
            raise
        self._after_failure = False
        if batch.events:
            self.last_event_id = str(batch.last_id)
        try:
            self._ping()
        except RetryableError as exc:
            # The batch is on the target already: a status ping that fails for a transient
            # reason (the platform's API restarting while its broker takes messages) must not
            # make it count as not written, or each retry would send the batch once more. Due
            # again with the next batch.
            log.warning("Status ping to the target failed.", extra={"error": str(exc)[:300]})

    def _write(self, batch: Batch) -> None:
        live: dict[str, set[str]] = {}
        absorbed: dict[str, str] = {}
        if self.resolve_aliases:
            # amqp: not its own ids. Its messages are applied later by the platform's workers,
            # so what the API says now is no proof of a replay, and a batch must still reach
            # the broker while the API is down (a platform restart).
            live, absorbed = self.on_target(batch.events, own_ids=self._may_replay(batch))
        files = self.files
        if files is not None:
            files.begin()
        if self.publisher is not None:
            self._publish(batch, live)
        else:
            self._push_batch(batch, live, absorbed)

    def _may_replay(self, batch: Batch) -> bool:
        """Whether ``batch`` may hold events the target has applied already (then the replay
        guard asks the target for the objects' own ids, ``common.Absorbed``). On ``api``, the
        batch's last id is first kept on the target as this connector's state: a write that
        stops after a push (a kill, a failure) leaves the mark behind it, and the next run's
        batches up to it are guarded. Elsewhere a batch is new and costs no look-up."""
        if not self.replay_guard or self.publisher is not None or not batch.events:
            return False
        marked = self._pushing_to
        if self.register and (marked is None or batch.last_id > marked):
            self._pushing_to = batch.last_id
            try:
                self._ping(force=True)  # before any push of the batch
            except ObjectRefused as exc:
                self._pushing_to = marked
                # The one object a ping names is this connector: gone from the target.
                raise AccessRefused(
                    f"{exc} - is the connector registered on the target platform?"
                ) from exc
            except BaseException:
                self._pushing_to = marked  # not saved: the retry marks again before pushing
                raise
        until = self._replay_until
        return (
            self._replay_always
            or batch.replay
            or self._after_failure
            or (until is not None and batch.first_id <= until)
        )

    def _push_batch(
        self, batch: Batch, live: Mapping[str, set[str]], absorbed: Mapping[str, str]
    ) -> None:
        files = self.files
        for push in plan_pushes(batch.events, self.max_bundle_objects, live, absorbed):
            refused: set[int] = set()
            try:
                self._push(push)
            except AccessRefused:
                raise
            except PermanentError as exc:
                refused = self._push_apart(push, exc, batch.last_id)
            if files is not None and push.kind == "upsert":
                for index, obj in enumerate(push.objects):
                    if index not in refused and files.pending(obj):
                        self._push_files(push.single(index), files)
            elif files is not None and push.kind == "delete":
                # The target deleted them with their files: an object that comes back, later
                # in this batch too, gets its files again.
                for obj in push.objects:
                    files.forget(obj)

    def _push_files(self, push: Push, files: FileCarrier) -> None:
        """After ``push`` of one object went through: the object again once per attached file
        to carry, that file inline. Refused for its size (413, the broker behind the platform)
        or for its data, the file is left out, counted and said; the object is already there."""
        obj = push.objects[0]
        for done in files.one_by_one(obj):
            names = [f["name"] for f in file_entries(done.stix) if "data" in f]
            try:
                self._push(Push(push.kind, [done.stix], push.event_ids, push.object_events))
            except PayloadTooLarge:
                files.left_out(
                    done.keys, obj.get("id"), names, "refused by the target for its size"
                )
                continue
            except ObjectRefused as exc:
                files.refused(done.keys, obj.get("id"), names, str(exc))
                continue
            files.carried(done.keys)

    def on_target(
        self, events: Sequence[StreamEvent], *, own_ids: bool = True
    ) -> tuple[dict[str, set[str]], dict[str, str]]:
        """What the target holds for the batch's objects: ``(live_aliases, absorbed)``.

        ``live_aliases``: aliases of upserts that name *another* live entity on the target, by
        object id.

        The stream can carry a merge target with its sources' ids as aliases before the merge
        (dependency re-sends are loaded at send time); the batch's own look-ahead covers a merge
        in the same batch, this covers one in a later batch. An alias is dropped when the target
        knows the upsert's own id *and* resolves the alias to a different entity (a source not
        merged yet); it comes back with the merge. It is kept when the target does not know the
        upsert's id: the alias may be how the entity is found (a standard-id change).

        ``absorbed``: the objects of the batch's events whose own id the target resolves to
        another entity (the standard id of that entity, by object id): a replay of events the
        target already went past (``common.Absorbed``); only with ``own_ids``. Relationships
        and sightings are never merged nor renamed: not asked.

        Asked with ``stix(id)`` calls, up to 100 per GraphQL query.
        """
        wanted: dict[str, list[str]] = {}
        mine: set[str] = set()  # the objects' own ids
        for event in events:
            if event.event not in ("create", "update", "merge", "delete"):
                continue
            ev = event.parsed()
            if own_ids and not ev.stix_id.startswith(("relationship--", "sighting--")):
                mine.add(ev.stix_id)
            if event.event not in ("create", "update"):
                continue
            aliases = octi_ext(ev.stix).get("stix_ids")
            prev = previous_standard(ev)
            aliases = [a for a in aliases or [] if isinstance(a, str) and a != prev]
            if aliases:
                wanted.setdefault(ev.stix_id, []).extend(aliases)
        if not wanted and not mine:
            return {}, {}
        ids = list(dict.fromkeys([*mine, *wanted, *(a for al in wanted.values() for a in al)]))
        resolved = self._standard_ids(ids)
        absorbed: dict[str, str] = {}
        for sid in mine:
            into = resolved.get(sid)
            if into is not None and into != sid:
                absorbed[sid] = into
        if absorbed:
            log.warning(
                "Events of objects the target already merged away or renamed are left out "
                "(a batch pushed again after a retry or a restart).",
                extra={"target": self.url, "objects": len(absorbed)},
            )
        out: dict[str, set[str]] = {}
        for sid, aliases in wanted.items():
            own = resolved.get(sid)
            if own is None:
                continue
            other = {a for a in aliases if resolved.get(a) not in (None, own)}
            if other:
                out[sid] = other
        if out:
            log.info(
                "Aliases naming other live entities on the target left out of upserts",
                extra={"target": self.url, "objects": len(out)},
            )
        return out, absorbed

    def _standard_ids(self, ids: list[str]) -> dict[str, str | None]:
        """The standard id of the entity each id names on the target (None: unknown)."""
        out: dict[str, str | None] = {}
        for chunk, query, variables in stix_queries(ids, "SyncAliases"):
            answer = self._call(
                "resolve aliases", functools.partial(self.api.query, query, variables)
            )
            out.update(standard_ids(chunk, answer.get("data") or {}))
        return out

    def _publish(self, batch: Batch, live: Mapping[str, set[str]]) -> None:
        """AMQP: one message per event, committed in order. The broker takes any well-formed
        message up to its ``max_message_size``; an event whose message is larger is reported in
        ``rejected`` instead of stopping the sync (other refusals happen on the platform's
        workers, recorded in its works). The broker does not announce its limit: a body over
        ``amqp_max_message_bytes`` is never sent, and when the broker closes the channel on a
        smaller one ("message size ... is larger than configured max size N") the limit is
        lowered and only what was not committed yet is published again."""
        assert self.publisher is not None
        messages = event_messages(
            batch.events,
            applicant_id=self.applicant_id,
            synchronized=self.synchronized,
            live_aliases=live,
            carry=self.files.one_by_one if self.files is not None else None,
            forget=self.files.forget if self.files is not None else None,
            limit=lambda: self.amqp_max_message_bytes,
        )
        refused: set[int] = set()  # events quarantined: their extra messages are not sent
        # A few transactions' worth at a time: a huge group waiting on disk is never held
        # whole as messages.
        for chunk in _whole_events(messages, _PUBLISH_MESSAGES):
            self._publish_chunk(batch, chunk, refused)

    def _publish_chunk(self, batch: Batch, pending: list[Message], refused: set[int]) -> None:
        assert self.publisher is not None
        while True:
            limit = self.amqp_max_message_bytes
            # Every message of an event goes, or none (a merge is an upsert plus the merge).
            too_big: dict[int, int] = {}  # by the event's index in the batch
            for m in pending:
                if not m.extra and len(m.body) > limit:
                    too_big[m.at] = max(too_big.get(m.at, 0), len(m.body))
            for index, size in too_big.items():
                self._reject_oversized(batch.events[index], size, limit)
            refused.update(too_big)
            sendable = [m for m in pending if self._sendable(m, limit, batch, refused)]
            try:
                self.publisher.publish([m.body for m in sendable])
            except MessageTooLarge as exc:
                # Committed chunks are on the queue: never send them again.
                self._carried(sendable[: self.publisher.committed])
                pending = sendable[self.publisher.committed :]
                biggest = max((len(m.body) for m in pending), default=0)
                if biggest == 0:
                    raise
                # The refused message is among the uncommitted ones, so the biggest of them is
                # too large as well: the new limit is below it, and every round removes one.
                known = exc.limit if exc.limit is not None and exc.limit < biggest else None
                self.amqp_max_message_bytes = min(limit, known or biggest - 1)
                log.warning(
                    "The target's broker refused a message as too large; limit lowered.",
                    extra={
                        "target": self.url,
                        "max_message_bytes": self.amqp_max_message_bytes,
                        "reason": str(exc)[:300],
                    },
                )
                continue
            self._carried(sendable)
            return

    def _sendable(self, m: Message, limit: int, batch: Batch, refused: set[int]) -> bool:
        """Whether ``m`` goes: not when its event was quarantined (its files are claimed no
        more: a later event naming them carries them), nor a file's message above the broker's
        limit (that file is left out; the object went without it)."""
        if m.at in refused:
            if self.files is not None:
                self.files.release(m.keys)
            return False
        if m.extra and len(m.body) > limit:
            assert self.files is not None
            ev = batch.events[m.at]
            names = [f["name"] for f in file_entries(ev.parsed().stix) if file_key(f) in m.keys]
            why = f"its message would pass the broker's maximum size, {limit} bytes"
            self.files.left_out(m.keys, ev.stix_id, names, why)
            return False
        return True

    def _carried(self, sent: list[Message]) -> None:
        if self.files is not None:
            self.files.carried(k for m in sent for k in m.keys)

    def _reject_oversized(self, ev: StreamEvent, size: int, limit: int) -> None:
        reason = (
            f"refused by {self.url}: its message ({size} bytes) is larger than the broker's "
            f"maximum message size ({limit} bytes; target.amqp_max_message_bytes or the "
            "broker's max_message_size)"
        )
        log.warning(
            "Event too large for the target's broker; quarantined.",
            extra={"target": self.url, "stix_id": ev.stix_id, "event_id": ev.id_text},
        )
        self.rejected.append(
            Quarantined(
                ev.id,  # named by the event, not the batch: see _push_apart
                ev.id_text,
                f"{ev.event}-refused-by-target",
                json.dumps(ev.stix, ensure_ascii=False),
                reason,
            )
        )

    def _push_apart(self, push: Push, error: PermanentError, after: EventId) -> set[int]:
        """A push was refused: quarantine the objects the platform refuses for themselves, and
        return their indexes in the push.

        Only ``ObjectRefused`` is quarantined, whatever the number of objects: a one-object push
        refused otherwise raises its error; a bigger one is retried object by object, and a
        single push failing with anything but ``ObjectRefused`` raises that error.
        """
        # Is the platform itself fine (reachable, the token accepted)? Else this raises.
        self._call("health check", lambda: self.api.query(_IDENTITY_QUERY))
        refused: list[tuple[int, str]] = []
        if len(push.objects) == 1:
            if not isinstance(error, ObjectRefused):
                raise error
            refused.append((0, str(error)))
        else:
            for index in range(len(push.objects)):
                try:
                    self._push(push.single(index))
                except ObjectRefused as exc:
                    refused.append((index, str(exc)))
        for index, reason in refused:
            obj = push.objects[index]
            event = push.event_of(index)
            # The record is named after the refused event, not the batch: a restart that cuts
            # its batches otherwise stores the same refusal under the same name, once.
            own = EventId.parse(event) if event is not None and EventId.is_valid(event) else after
            event = event or str(after)
            log.warning(
                "Target refused an object; quarantined.",
                extra={
                    "target": self.url,
                    "stix_id": obj.get("id"),
                    "event_id": event,
                    "reason": reason[:300],
                },
            )
            self.rejected.append(
                Quarantined(
                    own,
                    event,
                    f"{push.kind}-refused-by-target",
                    json.dumps(obj, ensure_ascii=False),
                    f"refused by {self.url}: {reason}",
                )
            )
        return {index for index, _ in refused}

    def push_objects(self, objects: list[dict[str, Any]]) -> None:
        """Plain upserts of STIX objects, in the given order (used by restore)."""
        if not self._checked:
            self.check()
        for start in range(0, len(objects), self.max_bundle_objects):
            chunk = objects[start : start + self.max_bundle_objects]
            self._push(Push("upsert", chunk))

    def delete_ids(self, stix_ids: list[str]) -> None:
        """Delete objects by id (used by restore). Unknown ids are not an error."""
        if not self._checked:
            self.check()
        for start in range(0, len(stix_ids), self.max_bundle_objects):
            chunk = stix_ids[start : start + self.max_bundle_objects]
            objects = [
                {"id": i, "type": i.split("--", 1)[0], "opencti_operation": "delete"} for i in chunk
            ]
            self._push(Push("delete", objects))

    def resolve_ids(self, stix_ids: list[str]) -> dict[str, str]:
        """The standard id of the entity each id names on the target; unknown ids are left out.

        Restore uses it to delete merged-away sources the target still holds as objects of
        their own, and never the merge target that answers to their ids as aliases.
        """
        if not self._checked:
            self.check()
        return {ref: sid for ref, sid in self._standard_ids(stix_ids).items() if sid is not None}

    def known_ids(self, stix_ids: list[str]) -> set[str]:
        """The ids the target answers to (a dry run's create / update / delete counts)."""
        return set(self.resolve_ids(stix_ids))

    def close(self) -> None:
        if self.files is not None:
            self.files.close()  # its download client; made again at the next download
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None
        if self._api is not None:
            if self._checked:
                # A courtesy to the UI, at shutdown: a hung platform must not hold the exit
                # for the full request timeout.
                self._api.session_requests_timeout = min(self.requests_timeout, 5)
                try:
                    self._ping(force=True)  # let the UI show the final position
                except SinkError as exc:
                    log.warning("final ping failed: %s", exc)
            self._api.session.close()
            self._api = None
        self._checked = False
