"""The event model that crosses every boundary: ids, stream events, control messages.

No I/O here. A ``StreamEvent`` keeps the ``data:`` JSON text exactly as the platform sent it, so
the archive stores what was received (nothing dropped, unknown keys kept) and nothing is
re-serialised on the hot path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from .errors import MalformedEvent

__all__ = [
    "DATA_EVENTS",
    "EventId",
    "Connected",
    "ControlEvent",
    "Heartbeat",
    "Quarantined",
    "StreamEvent",
    "archive_line",
    "parse_archive_line",
    "octi_ext",
    "OCTI_EXT",
]

EventKind = Literal["create", "update", "merge", "delete"]
DATA_EVENTS: frozenset[str] = frozenset({"create", "update", "merge", "delete"})
OCTI_EXT = "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba"

_ID_RE = re.compile(r"^(\d{1,15})-(\d{1,10})$")


@dataclass(frozen=True, slots=True, order=True)
class EventId:
    """A stream position ``<ms>-<seq>``. Ordered like the platform's Redis stream ids."""

    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str) -> EventId:
        """Parse and validate ``<digits>-<digits>``; anything else raises ``ValueError``."""
        m = _ID_RE.match(text)
        if m is None:
            raise ValueError(f"not a stream event id: {text[:64]!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    @classmethod
    def is_valid(cls, text: str) -> bool:
        return _ID_RE.match(text) is not None

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"

    @property
    def key(self) -> str:
        """Zero-padded form: lexicographic order of keys equals stream order."""
        return f"{self.ms:015d}-{self.seq:010d}"

    @classmethod
    def from_key(cls, key: str) -> EventId:
        ms, _, seq = key.partition("-")
        return cls(int(ms), int(seq))


ZERO = EventId(0, 0)


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One data event (create / update / merge / delete) exactly as received.

    ``raw`` is the ``data:`` line's JSON text, verbatim. ``envelope`` is its parsed form.
    """

    id: EventId
    id_text: str
    event: str
    raw: str
    envelope: dict[str, Any] = field(compare=False, repr=False)

    @property
    def stix(self) -> dict[str, Any]:
        data = self.envelope.get("data")
        return data if isinstance(data, dict) else {}

    @property
    def stix_id(self) -> str:
        value = self.stix.get("id")
        return value if isinstance(value, str) else ""

    @property
    def internal_id(self) -> str:
        value = octi_ext(self.stix).get("id")
        return value if isinstance(value, str) else ""

    @property
    def version_time(self) -> str:
        """The object's version stamp: OpenCTI ``updated_at``, else STIX ``modified``."""
        value = octi_ext(self.stix).get("updated_at") or self.stix.get("modified") or ""
        return value if isinstance(value, str) else ""

    @classmethod
    def from_sse(cls, id_text: str, event: str, raw: str) -> StreamEvent:
        """Validate one SSE data message; raise ``MalformedEvent`` with the reason otherwise."""
        if not id_text:
            raise MalformedEvent("data event without an id")
        try:
            event_id = EventId.parse(id_text)
        except ValueError as exc:
            raise MalformedEvent(f"malformed event id {id_text[:64]!r}") from exc
        if event not in DATA_EVENTS:
            raise MalformedEvent(f"unknown event name {event[:64]!r}")
        if not raw:
            raise MalformedEvent("event without data")
        try:
            envelope = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise MalformedEvent(f"data is not valid JSON: {exc}") from exc
        if not isinstance(envelope, dict):
            raise MalformedEvent("data is not a JSON object")
        stix = envelope.get("data")
        if not isinstance(stix, dict):
            raise MalformedEvent("envelope has no 'data' object")
        stix_id = stix.get("id")
        if not isinstance(stix_id, str) or "--" not in stix_id:
            raise MalformedEvent("STIX object has no valid 'id'")
        version = envelope.get("version")
        if version is not None and version != "4":
            raise MalformedEvent(f"unsupported event version {str(version)[:16]!r}")
        if "\n" in raw or "\r" in raw:
            # Several data: lines were joined with newlines; keep JSON Lines one event a line.
            raw = orjson.dumps(envelope).decode()
        if event == "merge":
            context = envelope.get("context")
            sources = context.get("sources") if isinstance(context, dict) else None
            if not isinstance(sources, list):
                raise MalformedEvent("merge event without context.sources")
        return cls(event_id, id_text, event, raw, envelope)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """``event: heartbeat``: the server's position; completes every group below it."""

    id: EventId


@dataclass(frozen=True, slots=True)
class Connected:
    """``event: connected``: the server's retention window for this connection."""

    first_event_id: EventId | None
    last_event_id: EventId | None
    stream_size: int
    connection_id: str


@dataclass(frozen=True, slots=True)
class ControlEvent:
    """A known control event that carries a position (``consumer_metrics``, ``no-recover``)."""

    name: str
    id: EventId | None


@dataclass(frozen=True, slots=True)
class Quarantined:
    """An event that could not be used, kept with its reason. ``after`` is the last good id."""

    after: EventId
    id_text: str
    event: str
    raw: str
    reason: str

    def record(self) -> bytes:
        return orjson.dumps(
            {
                "reason": self.reason,
                "after_event_id": str(self.after),
                "id": self.id_text,
                "event": self.event,
                "data": self.raw,
            }
        )


def octi_ext(stix: dict[str, Any]) -> dict[str, Any]:
    """The OpenCTI property extension of a STIX object, or an empty dict."""
    ext = stix.get("extensions")
    if isinstance(ext, dict):
        octi = ext.get(OCTI_EXT)
        if isinstance(octi, dict):
            return octi
    return {}


def archive_line(ev: StreamEvent) -> bytes:
    """One archive JSON Lines record: SSE id, SSE event name, the data object verbatim.

    Built by concatenation so the received bytes are stored as they came (the id and name are
    validated, so they need no escaping).
    """
    return (
        b'{"id":"'
        + ev.id_text.encode()
        + b'","event":"'
        + ev.event.encode()
        + b'","data":'
        + ev.raw.encode("utf-8", "surrogatepass")
        + b"}\n"
    )


def parse_archive_line(line: bytes) -> StreamEvent:
    """Inverse of ``archive_line``. Raises ``MalformedEvent`` on a damaged line."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"archive line is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), dict):
        raise MalformedEvent("archive line lacks id/event/data")
    id_text = obj.get("id")
    event = obj.get("event")
    if not isinstance(id_text, str) or not isinstance(event, str):
        raise MalformedEvent("archive line lacks id/event/data")
    # The verbatim data text sits between the '"data":' prefix and the closing brace.
    start = line.find(b'"data":')
    raw = line[start + 7 : line.rstrip().rfind(b"}")].decode("utf-8", "surrogatepass")
    return StreamEvent(EventId.parse(id_text), id_text, event, raw, obj["data"])
