"""The event model that crosses every boundary: ids, stream events, control messages.

No I/O here. A ``StreamEvent`` keeps the ``data:`` JSON text exactly as the platform sent it, so
the archive stores what was received (nothing dropped, unknown keys kept) and nothing is
re-serialised on the hot path.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import orjson

from .errors import MalformedEvent

__all__ = [
    "DATA_EVENTS",
    "EventId",
    "ControlEvent",
    "Quarantined",
    "StreamEvent",
    "archive_line_fields",
    "archive_line_parts",
    "loads_json",
    "parse_archive_line",
    "octi_ext",
    "rewrite_granted_refs",
    "OCTI_EXT",
]

EventKind = Literal["create", "update", "merge", "delete"]
DATA_EVENTS: frozenset[str] = frozenset({"create", "update", "merge", "delete"})
OCTI_EXT = "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba"


# ``origin.referer`` of the events a retention-gap reconciliation writes.
RECONCILE_REFERER = "opencti-sync-reconcile"


class EventId(NamedTuple):
    """A stream position ``<ms>-<seq>``. Ordered like the platform's Redis stream ids.

    A named tuple: created and compared for every event on the hot path, so it must be cheap.
    """

    ms: int
    seq: int

    @classmethod
    def parse(cls, text: str) -> EventId:
        """Parse and validate ``<digits>-<digits>`` (ASCII digits, at most 15 and 10 of them);
        anything else raises ``ValueError``. Called for every event: no regex."""
        ms, sep, seq = text.partition("-")
        if (
            sep
            and 0 < len(ms) <= 15
            and 0 < len(seq) <= 10
            and ms.isdigit()
            and seq.isdigit()
            and text.isascii()
        ):
            return cls(int(ms), int(seq))
        raise ValueError(f"not a stream event id: {text[:64]!r}")

    @classmethod
    def is_valid(cls, text: str) -> bool:
        try:
            cls.parse(text)
        except ValueError:
            return False
        return True

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


class StreamEvent:
    """One data event (create / update / merge / delete) exactly as received.

    ``data`` holds the ``data:`` JSON bytes verbatim; the few fields the pipeline and the
    manifests need are extracted when the event is parsed, and the parsed ``envelope`` is not
    kept (re-parsed on demand): holding tens of thousands of parsed 2 KB events costs memory and
    garbage-collector time that the backup path does not need.
    """

    __slots__ = (
        "id",
        "id_text",
        "event",
        "data",
        "stix_id",
        "internal_id",
        "version_time",
        "referer",
        "group",
        "files",
        "_envelope",
    )

    def __init__(
        self,
        id: EventId,  # noqa: A002 - the SSE field's name
        id_text: str,
        event: str,
        raw: str | bytes,
        envelope: dict[str, Any] | None = None,
    ) -> None:
        self.id = id
        self.id_text = id_text
        self.event = event
        # The group id (stream high-water mark when it arrived); the source sets it.
        self.group: EventId = id
        self.data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
        env = envelope if envelope is not None else _loads_object(self.data)
        stix = env.get("data")
        stix = stix if isinstance(stix, dict) else {}
        octi = octi_ext(stix)
        stix_id = stix.get("id")
        self.stix_id: str = stix_id if isinstance(stix_id, str) else ""
        internal = octi.get("id")
        self.internal_id: str = internal if isinstance(internal, str) else ""
        version = octi.get("updated_at") or stix.get("modified") or ""
        self.version_time: str = version if isinstance(version, str) else ""
        origin = env.get("origin")
        referer = origin.get("referer") if isinstance(origin, dict) else None
        self.referer: str | None = referer if isinstance(referer, str) else None
        # Names attached files (``extensions[octi].files`` not empty): see connector/files.py.
        self.files: bool = bool(octi.get("files"))
        # Keep a parsed envelope only when the caller handed one over (it already paid for it).
        self._envelope = envelope

    def __repr__(self) -> str:
        return f"StreamEvent({self.id_text!r}, {self.event!r}, {self.stix_id!r})"

    @property
    def raw(self) -> str:
        """The ``data:`` JSON text as received."""
        return self.data.decode("utf-8", "surrogatepass")

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def envelope(self) -> dict[str, Any]:
        """The parsed ``data``: the one handed over at construction, else parsed again at each
        call and not kept (a batch of pending events would otherwise end up holding every
        parsed event once a target has read them)."""
        env = self._envelope
        return env if env is not None else _loads_object(self.data)

    def parsed(self) -> StreamEvent:
        """This event with its envelope parsed once and kept, for a pass that reads it several
        times (a target's planning); dropped after it, the parse goes with it."""
        if self._envelope is not None:
            return self
        ev = copy.copy(self)
        ev._envelope = _loads_object(self.data)
        return ev

    @property
    def stix(self) -> dict[str, Any]:
        data = self.envelope.get("data")
        return data if isinstance(data, dict) else {}

    @property
    def reconciled(self) -> bool:
        """Written by a retention-gap reconciliation (``connector.reconcile``): archived after
        the repair's recovery, about changes made before it."""
        return self.referer == RECONCILE_REFERER

    @property
    def synthetic(self) -> bool:
        """Recovery (``init-create``) and dependency (``init-dependencies``) events."""
        return self.referer in ("init-create", "init-dependencies")

    @classmethod
    def from_sse(cls, id_text: str, event: str, raw: str | bytes) -> StreamEvent:
        """Validate one SSE data message; raise ``MalformedEvent`` with the reason otherwise.

        Runs for every event on the reader thread: one parse, the fields read straight into
        the slots.
        """
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
            envelope = loads_json(raw)
        except orjson.JSONDecodeError as exc:
            if "Not enough memory" in str(exc):
                # The machine's fault, not the event's: never quarantine good data for it.
                raise MemoryError(f"parsing event {id_text[:64]}: {exc}") from exc
            raise MalformedEvent(f"data is not valid JSON (or not UTF-8): {exc}") from exc
        if not isinstance(envelope, dict):
            raise MalformedEvent("data is not a JSON object")
        if _too_deep(raw, envelope):
            raise MalformedEvent(
                "data is nested too deep to be written back (JSON parses 1024 levels, "
                "serialises 254): a restore or snapshot could not hold it"
            )
        stix = envelope.get("data")
        if not isinstance(stix, dict):
            raise MalformedEvent("envelope has no 'data' object")
        stix_id = stix.get("id")
        if not isinstance(stix_id, str) or "--" not in stix_id:
            raise MalformedEvent("STIX object has no valid 'id'")
        version = envelope.get("version")
        if version is not None and version != "4":
            raise MalformedEvent(f"unsupported event version {str(version)[:16]!r}")
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
        if b"\n" in data or b"\r" in data:
            # Several data: lines were joined with newlines; keep JSON Lines one event a line.
            data = orjson.dumps(envelope)
        if event == "merge":
            context = envelope.get("context")
            sources = context.get("sources") if isinstance(context, dict) else None
            if not isinstance(sources, list):
                raise MalformedEvent("merge event without context.sources")
        octi = octi_ext(stix)
        internal = octi.get("id")
        version_time = octi.get("updated_at") or stix.get("modified") or ""
        origin = envelope.get("origin")
        referer = origin.get("referer") if isinstance(origin, dict) else None
        ev = cls.__new__(cls)
        ev.id = ev.group = event_id
        ev.id_text = id_text
        ev.event = event
        ev.data = data
        ev.stix_id = stix_id
        ev.internal_id = internal if isinstance(internal, str) else ""
        ev.version_time = version_time if isinstance(version_time, str) else ""
        ev.referer = referer if isinstance(referer, str) else None
        ev.files = bool(octi.get("files"))
        ev._envelope = None  # see the class docstring: do not hold the parsed form
        return ev


def _loads_object(data: bytes) -> dict[str, Any]:
    value = loads_json(data)
    return value if isinstance(value, dict) else {}


# A \uD800-\uDFFF escape: the only valid JSON that orjson refuses and the platform sends.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_INT_RANGE = range(-(2**63), 2**64)


_DUMPS_DEPTH = 254  # orjson parses 1024 levels of nesting, but serialises only this many


def _too_deep(raw: str | bytes, envelope: dict[str, Any]) -> bool:
    """Whether ``envelope`` is nested deeper than it can be serialised again. Counting brackets
    (in C) rules out nearly every event; only one with that many opening brackets is tried."""
    opens = (
        raw.count("[") + raw.count("{")
        if isinstance(raw, str)
        else raw.count(b"[") + raw.count(b"{")
    )
    if opens <= _DUMPS_DEPTH:
        return False
    try:
        orjson.dumps(envelope)
    except TypeError:
        return True
    return False


def loads_json(data: str | bytes) -> Any:
    """``orjson.loads``, and valid JSON it refuses: a lone UTF-16 surrogate escape.

    Node's ``JSON.stringify`` writes a lone surrogate (a string cut inside an emoji) as the
    escape ``"\\ud83d"``: valid JSON, refused by orjson. Such data is parsed by the standard
    ``json`` module instead, each lone surrogate in the parsed value becoming U+FFFD, so the
    value can be written as UTF-8 again (state, targets); the received bytes themselves are
    kept verbatim by the callers. Anything else orjson refuses still raises its error.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
        if not _SURROGATE_ESCAPE.search(raw):
            raise
        try:
            # Decoded here: json.loads would guess UTF-16/32 for bytes; the stream is UTF-8.
            value = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
            return _without_lone_surrogates(value)
        except (ValueError, RecursionError):
            # Not valid for json either (or beyond what orjson accepts): orjson's reason.
            raise exc from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _without_lone_surrogates(value: Any) -> Any:
    """The parsed value with lone surrogates replaced, numbers as orjson reads them; those it
    would refuse raise."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_lone_surrogates(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if value in _INT_RANGE:
            return value
        # As orjson reads it: a float (JavaScript writes 1e20 as 21 digits), refused only past
        # a float's range; refusing it quarantined a valid event for its lone surrogate.
        try:
            return float(value)
        except OverflowError:
            raise ValueError("number out of range") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("number out of range")
    return value


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


def rewrite_granted_refs(stix: dict[str, Any], ids: set[str], new_id: str | None) -> None:
    """In place: ``ids`` in the extension's ``granted_refs`` renamed to ``new_id`` (a merge, a
    standard-id change) or dropped (``None``: a delete). The platform treats them like any other
    ref; the extension dicts are replaced, not edited, so a shallow copy of ``stix`` is enough."""
    granted = octi_ext(stix).get("granted_refs")
    if not isinstance(granted, list) or not ids.intersection(granted):
        return
    kept = (
        [new_id if v in ids else v for v in granted]
        if new_id
        else [v for v in granted if v not in ids]
    )
    octi = {**octi_ext(stix), "granted_refs": list(dict.fromkeys(kept))}
    stix["extensions"] = {**stix["extensions"], OCTI_EXT: octi}


def archive_line_parts(ev: StreamEvent) -> tuple[bytes, bytes, bytes]:
    """One archive JSON Lines record (SSE id, SSE event name, the data object verbatim), in three
    pieces for the writer to join: the received data bytes are stored as they came and copied
    once (the id and name are validated, so they need no escaping)."""
    head = b'{"id":"%s","event":"%s","data":' % (ev.id_text.encode(), ev.event.encode())
    return head, ev.data, b"}\n"


def archive_line_fields(line: bytes) -> tuple[str, str, dict[str, Any]]:
    """``(SSE id, SSE event name, parsed data object)`` of one archive line; raises
    ``MalformedEvent`` on a damaged line. One parse, no ``StreamEvent`` (the restore fold's path)."""
    try:
        obj = loads_json(line)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"archive line is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise MalformedEvent("archive line lacks id/event/data")
    id_text, event, envelope = obj.get("id"), obj.get("event"), obj.get("data")
    if not isinstance(id_text, str) or not isinstance(event, str) or not isinstance(envelope, dict):
        raise MalformedEvent("archive line lacks id/event/data")
    return id_text, event, envelope


def parse_archive_line(line: bytes) -> StreamEvent:
    """Inverse of ``archive_line_parts`` (joined). Raises ``MalformedEvent`` on a damaged line."""
    id_text, event, envelope = archive_line_fields(line)
    # The verbatim data bytes sit between the '"data":' prefix and the closing brace.
    start = line.find(b'"data":')
    raw = line[start + 7 : line.rstrip().rfind(b"}")]
    return StreamEvent(EventId.parse(id_text), id_text, event, raw, envelope)
