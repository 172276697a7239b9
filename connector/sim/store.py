"""The simulated platform's state: current STIX objects plus the append-only stream log.

Edits behave like a user working on an OpenCTI platform (protocol doc §4, §6.5, §8): each one
updates the objects and appends the stream event(s) the platform would publish. The log keeps
each event as the bytes of its SSE frame, never as a dict, so a million events fit in memory and
replay is a memory copy. Stored objects are never mutated in place (every edit builds a new dict),
so readers may hold references outside the lock.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
import time
import uuid
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonpatch
import orjson

from ..events import OCTI_EXT, rewrite_granted_refs
from .filters import ENDPOINT_FIELDS, is_relation, stix_refs

__all__ = [
    "FILE_URI_PREFIX",
    "SimStore",
    "LogSlice",
    "entity_type_of",
    "file_id_of",
    "internal_id_for",
    "iso_ms",
    "parse_date_ms",
    "split_key",
]

_NS = uuid.UUID("8b3f6c9e-5d0a-4f1e-9c2b-7a6d5e4f3c21")
SIM_USER_ID = "88ec0c6a-13ce-5e39-b486-354fe4a7084f"
_SEQ_SPAN = 10**10  # log keys are ms * _SEQ_SPAN + seq, so bisect works on plain ints
_DEFAULT_ORIGIN: dict[str, Any] = {
    "socket": "query",
    "ip": "::ffff:127.0.0.1",
    "user_id": SIM_USER_ID,
    "group_ids": [],
    "organization_ids": [],
    "user_metadata": {},
}
_SPECIAL_TYPES = {
    "threat-actor": "Threat-Actor-Group",
    "sighting": "stix-sighting-relationship",
    "file": "StixFile",
    "ipv4-addr": "IPv4-Addr",
    "ipv6-addr": "IPv6-Addr",
    "url": "Url",
    "x-mitre-data-component": "Data-Component",
    "x-mitre-data-source": "Data-Source",
}
_IDENTITY_CLASSES = {
    "organization": "Organization",
    "individual": "Individual",
    "class": "Sector",
    "system": "System",
}
_ALIAS_TYPES = {"intrusion-set", "malware", "threat-actor", "campaign", "tool", "infrastructure"}
_LOAD_RANK = {
    "marking-definition": 0,
    "identity": 1,
    "location": 1,
    "relationship": 3,
    "sighting": 4,
}
_BARE_DIGITS = re.compile(r"^\d+$")
# An attached file's uri on its platform: the file id appended as is (the platform's STIX
# converter writes `/storage/get/${file.id}`, not URL-encoded).
FILE_URI_PREFIX = "/storage/get/"
_DEFAULT_MIME = "application/octet-stream"


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def iso_ms(ms: int) -> str:
    """Epoch ms → ``2026-11-27T21:00:00.123Z`` (the platform's date format)."""
    secs, milli = divmod(ms, 1000)
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=secs)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{milli:03d}Z"


def parse_date_ms(text: str) -> int | None:
    """ISO-8601 date → epoch ms, or ``None``. Bare numbers are rejected, as moment does."""
    text = text.strip()
    if not text or (_BARE_DIGITS.match(text) and len(text) != 8):
        return None
    try:
        dt = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _event_ms(event_id: str | None) -> int | None:
    """The ms part of an ``opencti-event-id`` (``<ms>-<seq>``), None when absent or unreadable."""
    head = event_id.split("-", 1)[0] if event_id else ""
    return int(head) if head.isdigit() else None


def split_key(key: int) -> str:
    """Log key → id text ``<ms>-<seq>``."""
    ms, seq = divmod(key, _SEQ_SPAN)
    return f"{ms}-{seq}"


def internal_id_for(stix_id: str) -> str:
    """The deterministic internal UUID the simulator gives an object first created with
    ``stix_id`` (``<stix_id>#<n>`` for its n-th creation, after deletes)."""
    return str(uuid.uuid5(_NS, stix_id))


def entity_type_of(stix: dict[str, Any]) -> str:
    """The OpenCTI entity type of a STIX object (relationship type for relationships)."""
    stype = str(stix.get("type", ""))
    if stype == "relationship":
        return str(stix.get("relationship_type") or "related-to")
    if stype == "identity":
        return _IDENTITY_CLASSES.get(str(stix.get("identity_class")), "Organization")
    if stype == "location":
        for key, name in (("country", "Country"), ("city", "City"), ("region", "Region")):
            if key in stix:
                return name
        return str(stix.get("x_opencti_location_type") or "Position")
    if stype in _SPECIAL_TYPES:
        return _SPECIAL_TYPES[stype]
    base = stype.removeprefix("x-opencti-").removeprefix("x-")
    return "-".join(p[:1].upper() + p[1:] for p in base.split("-"))


def _ext(stix: dict[str, Any]) -> dict[str, Any]:
    ext = stix.get("extensions")
    octi = ext.get(OCTI_EXT) if isinstance(ext, dict) else None
    return octi if isinstance(octi, dict) else {}


def _copy(obj: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = orjson.loads(orjson.dumps(obj))
    return out


def _with_ext(stix: dict[str, Any], octi: dict[str, Any]) -> None:
    exts = dict(stix.get("extensions") or {})
    exts[OCTI_EXT] = octi
    stix["extensions"] = exts


def _clean(stix: dict[str, Any]) -> None:
    """Drop empty top-level values as the platform's converter does (``object_refs`` kept)."""
    for key in [k for k, v in stix.items() if v in (None, "", [], {}) and k != "object_refs"]:
        del stix[key]


def _name(stix: dict[str, Any]) -> str:
    for key in ("name", "value", "pattern", "opinion", "abstract", "relationship_type"):
        value = stix.get(key)
        if isinstance(value, str) and value:
            return value
    return str(stix.get("id", ""))


def _comparable(stix: dict[str, Any]) -> dict[str, Any]:
    out = dict(stix)
    out.pop("modified", None)
    octi = dict(_ext(out))
    octi.pop("updated_at", None)
    if octi:
        _with_ext(out, octi)
    return out


def _files(stix: dict[str, Any]) -> list[dict[str, Any]]:
    files = _ext(stix).get("files")
    return [f for f in files if isinstance(f, dict)] if isinstance(files, list) else []


def _set_files(octi: dict[str, Any], files: list[dict[str, Any]]) -> None:
    # An empty list is dropped, as the platform's converter drops empty values.
    if files:
        octi["files"] = files
    else:
        octi.pop("files", None)


def file_id_of(entry: dict[str, Any]) -> str | None:
    """The platform's file id in an attached-file entry's ``uri`` (None for another form)."""
    uri = entry.get("uri")
    return (
        uri.removeprefix(FILE_URI_PREFIX)
        if isinstance(uri, str) and uri.startswith(FILE_URI_PREFIX)
        else None
    )


class LogSlice:
    """A batch of consecutive log entries returned to a reader."""

    __slots__ = ("start", "keys", "kinds", "frames")

    def __init__(self, start: int, keys: list[int], kinds: list[str], frames: list[bytes]) -> None:
        self.start = start
        self.keys = keys
        self.kinds = kinds
        self.frames = frames


class SimStore:
    """Objects + stream log of one simulated platform. Thread-safe behind one lock."""

    def __init__(self, *, trim: int | None = None, clock: Callable[[], int] | None = None) -> None:
        self._lock = threading.RLock()
        self.cond = threading.Condition(self._lock)
        self._clock = clock or _wall_ms
        self._trim = trim if trim and trim > 0 else None
        # Stream log: parallel lists; entries before _head are trimmed but not yet compacted.
        self._keys: list[int] = []
        self._kinds: list[str] = []
        self._frames: list[bytes] = []
        self._head = 0
        self.skipped_on_load = 0  # relationships/sightings refused by load_bundle (no endpoint)
        self._base = 0  # absolute index of list index 0
        self._last_ms = 0
        self._last_seq = -1
        # Objects by internal id; every known STIX id and internal id maps to the internal id.
        self._objects: dict[str, dict[str, Any]] = {}
        self._alias: dict[str, str] = {}
        self._referrers: dict[str, set[str]] = {}  # referenced STIX id -> internal ids
        # Source version time (ms of the ``opencti-event-id``) of objects last written by a
        # synchronised event: the platform records it per attribute (i_attributes.updated_at)
        # and isOutdatedUpdate compares against it, not against the local write time.
        self._version_ms: dict[str, int] = {}
        # Objects created so far under each first STIX id: a re-creation after a delete is a new
        # entity, with a new internal id, as on the platform (a fresh UUID at every creation).
        self._lives: dict[str, int] = {}
        # Attached files' bytes by file id (``import/<entity type>/<internal id>/<name>``).
        self._file_bytes: dict[str, bytes] = {}
        self.file_uploads = 0  # files imported from pushed data (the worker's uploads)
        self.generation = 0  # bumped by wake() so waiting readers re-check their stop flags

    # ------------------------------------------------------------------ time and ids
    def now_ms(self) -> int:
        return self._clock()

    def _next_key(self) -> int:
        ms = self._clock()
        if ms > self._last_ms:
            self._last_ms, self._last_seq = ms, 0
        else:
            self._last_seq += 1
        return self._last_ms * _SEQ_SPAN + self._last_seq

    # ------------------------------------------------------------------ log
    def _append(self, key: int, kind: str, frame: bytes) -> None:
        self._keys.append(key)
        self._kinds.append(kind)
        self._frames.append(frame)
        if self._trim is not None and len(self._keys) - self._head > self._trim:
            self._trim_to(self._trim)

    def _trim_to(self, keep: int) -> None:
        live = len(self._keys) - self._head
        if live > keep:
            self._head += live - keep
        if self._head > 4096 and self._head * 2 > len(self._keys):
            # Compact rarely so trimming stays amortised O(1) per event.
            del self._keys[: self._head], self._kinds[: self._head], self._frames[: self._head]
            self._base += self._head
            self._head = 0

    def _emit(self, kind: str, envelope: dict[str, Any]) -> str:
        key = self._next_key()
        id_text = split_key(key)
        payload = orjson.dumps(envelope)
        frame = b"".join(
            (b"id: ", id_text.encode(), b"\nevent: ", kind.encode(), b"\ndata: ", payload, b"\n\n")
        )
        self._append(key, kind, frame)
        self.cond.notify_all()
        return id_text

    def append_frames(self, items: Iterable[tuple[str, bytes]]) -> str | None:
        """Fast path for bulk generation: ``(kind, payload bytes)`` pairs appended as events."""
        last: str | None = None
        with self._lock:
            for kind, payload in items:
                key = self._next_key()
                last = split_key(key)
                self._append(
                    key,
                    kind,
                    b"id: "
                    + last.encode()
                    + b"\nevent: "
                    + kind.encode()
                    + b"\ndata: "
                    + payload
                    + b"\n\n",
                )
            self.cond.notify_all()
        return last

    def append_raw(self, sse_text: str) -> None:
        """Inject verbatim SSE text (malformed-event tests). It sits at the current position."""
        with self._lock:
            key = self._last_ms * _SEQ_SPAN + max(self._last_seq, 0)
            self._append(key, "raw", sse_text.encode("utf-8", "surrogatepass"))
            self.cond.notify_all()

    def trim(self, keep: int) -> None:
        with self._lock:
            self._trim_to(max(keep, 0))

    @property
    def event_count(self) -> int:
        with self._lock:
            return len(self._keys) - self._head

    @property
    def first_event_id(self) -> str | None:
        with self._lock:
            return split_key(self._keys[self._head]) if len(self._keys) > self._head else None

    @property
    def last_event_id(self) -> str | None:
        with self._lock:
            return split_key(self._keys[-1]) if len(self._keys) > self._head else None

    # Reader API (used by the server) ---------------------------------------------------------
    def bounds(self) -> tuple[int, int]:
        """Absolute positions ``[first retained, end)``."""
        with self._lock:
            return self._base + self._head, self._base + len(self._keys)

    def position_after(self, ms: int, seq: int) -> int:
        """Absolute position of the first entry strictly after ``<ms>-<seq>`` (XREAD semantics)."""
        with self._lock:
            li = bisect_right(self._keys, ms * _SEQ_SPAN + seq, lo=self._head)
            return self._base + li

    def read(self, pos: int, max_bytes: int = 256 * 1024, max_count: int = 100_000) -> LogSlice:
        """Entries from absolute ``pos`` (moved up to the first retained one if trimmed)."""
        with self._lock:
            li = max(pos - self._base, self._head)
            end = min(len(self._keys), li + max_count)
            size = 0
            stop = li
            frames = self._frames
            while stop < end and size < max_bytes:
                size += len(frames[stop])
                stop += 1
            return LogSlice(
                self._base + li, self._keys[li:stop], self._kinds[li:stop], frames[li:stop]
            )

    def wait_for(self, pos: int, timeout: float, generation: int) -> bool:
        """Block until an entry exists at ``pos`` (True) or timeout / wake() (False)."""
        with self._lock:
            return (
                self.cond.wait_for(
                    lambda: self._base + len(self._keys) > pos or self.generation != generation,
                    timeout,
                )
                and self._base + len(self._keys) > pos
            )

    def wake(self) -> None:
        """Wake every waiting reader (server stop / dropped connections)."""
        with self._lock:
            self.generation += 1
            self.cond.notify_all()

    # ------------------------------------------------------------------ object queries
    def get(self, ref: str) -> dict[str, Any] | None:
        with self._lock:
            iid = self._alias.get(ref)
            return self._objects.get(iid) if iid else None

    def resolve_internal(self, ref: str) -> str | None:
        return self._alias.get(ref)

    def objects(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            current = list(self._objects.values())
        return iter(current)

    @property
    def object_count(self) -> int:
        return len(self._objects)

    def dump_bundle(self) -> dict[str, Any]:
        with self._lock:
            objs = sorted(self._objects.values(), key=lambda o: str(o.get("id")))
            marker = self.last_event_id or "empty"
        return {
            "type": "bundle",
            "id": f"bundle--{uuid.uuid5(_NS, 'dump:' + marker)}",
            "objects": [_copy(o) for o in objs],
        }

    def snapshot(self, from_ms: int, to_ms: int) -> list[dict[str, Any]]:
        """Objects with ``updated_at`` in [from, to], by updated_at then internal id (§5.1)."""
        with self._lock:
            items = []
            for iid, obj in self._objects.items():
                ms = parse_date_ms(str(_ext(obj).get("updated_at", ""))) or 0
                if from_ms <= ms <= to_ms:
                    items.append((ms, iid, obj))
        items.sort(key=lambda t: (t[0], t[1]))
        return [o for _, _, o in items]

    def referrers(self, stix: dict[str, Any]) -> list[dict[str, Any]]:
        """Current objects that reference any id of ``stix``."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for sid in self._ids_of(stix):
                for iid in self._referrers.get(sid, ()):
                    obj = self._objects.get(iid)
                    if obj is not None:
                        out[iid] = obj
            return list(out.values())

    def relations_of(self, stix: dict[str, Any]) -> list[dict[str, Any]]:
        """Relationships and sightings that have ``stix`` as an endpoint."""
        ids = set(self._ids_of(stix))
        out = []
        for obj in self.referrers(stix):
            if is_relation(obj) and any(
                (v in ids) if isinstance(v, str) else bool(ids.intersection(v))
                for v in (obj.get(f) for f in ENDPOINT_FIELDS)
                if v
            ):
                out.append(obj)
        return out

    def containers_of(self, stix: dict[str, Any]) -> list[dict[str, Any]]:
        ids = set(self._ids_of(stix))
        return [o for o in self.referrers(stix) if ids.intersection(o.get("object_refs") or [])]

    @staticmethod
    def _ids_of(stix: dict[str, Any]) -> list[str]:
        ids = [str(stix.get("id"))]
        ids.extend(x for x in _ext(stix).get("stix_ids") or [] if isinstance(x, str))
        return ids

    # ------------------------------------------------------------------ indexes
    def _index(self, iid: str, obj: dict[str, Any]) -> None:
        self._objects[iid] = obj
        self._alias[iid] = iid
        for sid in self._ids_of(obj):
            self._alias[sid] = iid
        for ref in stix_refs(obj):
            self._referrers.setdefault(ref, set()).add(iid)

    def _unindex_refs(self, iid: str, obj: dict[str, Any]) -> None:
        for ref in stix_refs(obj):
            users = self._referrers.get(ref)
            if users is not None:
                users.discard(iid)
                if not users:
                    del self._referrers[ref]

    def _replace(self, iid: str, old: dict[str, Any], new: dict[str, Any]) -> None:
        self._unindex_refs(iid, old)
        self._index(iid, new)

    def _forget(self, iid: str, obj: dict[str, Any]) -> None:
        # The platform deletes an entity's files with it (a merge's sources included).
        for entry in _files(obj):
            self._file_bytes.pop(file_id_of(entry) or "", None)
        self._unindex_refs(iid, obj)
        self._objects.pop(iid, None)
        self._version_ms.pop(iid, None)
        for key in [iid, *self._ids_of(obj)]:
            if self._alias.get(key) == iid:
                del self._alias[key]

    # ------------------------------------------------------------------ envelope helpers
    def _envelope(
        self,
        kind: str,
        stix: dict[str, Any],
        message: str,
        origin: dict[str, Any] | None,
        context: dict[str, Any] | None = None,
        event_id: str | None = None,
    ) -> dict[str, Any]:
        env: dict[str, Any] = {
            "version": "4",
            "type": kind,
            "scope": "external",
            "message": message,
            "origin": origin if origin is not None else _DEFAULT_ORIGIN,
            "data": stix,
        }
        if context is not None:
            env["context"] = context
        if event_id:
            env["event_id"] = event_id
        return env

    def _describe(self, verb: str, stix: dict[str, Any]) -> str:
        etype = _ext(stix).get("type") or entity_type_of(stix)
        if stix.get("type") == "relationship":
            src = self.get(str(stix.get("source_ref")))
            dst = self.get(str(stix.get("target_ref")))
            return (
                f"{verb} the relation {etype} from `{_name(src) if src else '?'}` "
                f"to `{_name(dst) if dst else '?'}`"
            )
        return f"{verb} a {etype} `{_name(stix)}`"

    def _fill_relation_ext(self, stix: dict[str, Any], octi: dict[str, Any]) -> None:
        pairs = (
            ("source_ref", "source"),
            ("target_ref", "target"),
            ("sighting_of_ref", "sighting_of"),
        )
        for field, prefix in pairs:
            ref = stix.get(field)
            if not isinstance(ref, str):
                continue
            target = self.get(ref)
            for suffix in ("_ref", "_type", "_value"):
                octi.pop(prefix + suffix, None)
            if target is not None:
                t_ext = _ext(target)
                octi[prefix + "_ref"] = t_ext.get("id")
                octi[prefix + "_type"] = t_ext.get("type")
                octi[prefix + "_value"] = _name(target)
        where = stix.get("where_sighted_refs")
        if isinstance(where, list):
            found = [self.get(w) for w in where if isinstance(w, str)]
            targets = [t for t in found if t is not None]
            octi["where_sighted_refs"] = [_ext(t).get("id") for t in targets]
            octi["where_sighted_types"] = [_ext(t).get("type") for t in targets]
            octi["where_sighted_values"] = [_name(t) for t in targets]

    def _prepare_new(
        self, stix: dict[str, Any], now: str, keep_times: bool
    ) -> tuple[str, dict[str, Any]]:
        sid = str(stix["id"])
        lives = self._lives[sid] = self._lives.get(sid, 0) + 1
        iid = internal_id_for(sid if lives == 1 else f"{sid}#{lives}")
        incoming = _ext(stix)
        stix.setdefault("spec_version", "2.1")
        created = str(stix.get("created") or now)
        stix["created"] = created
        if keep_times:
            stix["modified"] = stix.get("modified") or created
            created_at = incoming.get("created_at") or created
            updated_at = incoming.get("updated_at") or stix["modified"]
        else:
            stix["modified"] = created_at = updated_at = now
        octi: dict[str, Any] = dict(incoming)
        octi.update(
            extension_type=incoming.get("extension_type", "property-extension"),
            id=iid,
            type=entity_type_of(stix),
            created_at=created_at,
            updated_at=updated_at,
            is_inferred=bool(incoming.get("is_inferred", False)),
        )
        octi.pop("stix_ids", None)
        stix_ids = [s for s in incoming.get("stix_ids") or [] if isinstance(s, str) and s != sid]
        if stix_ids:
            octi["stix_ids"] = stix_ids
        _set_files(octi, self._uploaded(octi, [], incoming.get("files")))
        if is_relation(stix):
            self._fill_relation_ext(stix, octi)
        _with_ext(stix, octi)
        _clean(stix)
        return iid, stix

    # ------------------------------------------------------------------ edits
    def create(self, stix: dict[str, Any], *, origin: dict[str, Any] | None = None) -> str | None:
        """Create an object (upsert when it already exists). Returns the new event id."""
        return self.upsert(stix, origin=origin)

    def upsert(
        self,
        stix: dict[str, Any],
        *,
        previous_standard: str | None = None,
        event_id: str | None = None,
        synchronized: bool = False,
        origin: dict[str, Any] | None = None,
    ) -> str | None:
        """The platform's upsert (§6.5): no effective change → no event; stale events skipped."""
        incoming = _copy(stix)
        sid = incoming.get("id")
        if not isinstance(sid, str) or "--" not in sid:
            raise ValueError("STIX object without a valid id")
        with self._lock:
            self._canonical_refs(incoming)
            iid = self._alias.get(previous_standard) if previous_standard else None
            candidates = [sid, *(_ext(incoming).get("stix_ids") or [])]
            for ref in candidates:
                if iid is None and isinstance(ref, str):
                    iid = self._alias.get(ref)
            if iid is None:
                iid, new = self._prepare_new(incoming, iso_ms(self._clock()), keep_times=False)
                self._index(iid, new)
                self._set_version(iid, event_id)
                env = self._envelope(
                    "create", new, self._describe("creates", new), origin, event_id=event_id
                )
                return self._emit("create", env)
            old = self._objects[iid]
            event_ms = _event_ms(event_id)
            if event_ms is not None:
                stored = self._version_ms.get(iid)
                if stored is None:
                    stored = parse_date_ms(str(_ext(old).get("updated_at", ""))) or 0
                if stored > event_ms:
                    return None  # stale-update protection (isOutdatedUpdate)
            new = self._merged(old, incoming, synchronized)
            return self._commit_update(iid, old, new, origin, event_id)

    def _canonical_refs(self, stix: dict[str, Any]) -> None:
        """Refs name entities: one given by an alias (a merged source, an old standard id) is
        stored as the entity itself, as the platform stores refs as relations to internal ids
        and exports them with the entity's current standard id."""

        def current(ref: Any) -> Any:
            iid = self._alias.get(ref) if isinstance(ref, str) else None
            obj = self._objects.get(iid) if iid else None
            return obj["id"] if obj is not None else ref

        for key, value in list(stix.items()):
            if key.endswith("_ref"):
                stix[key] = current(value)
            elif key.endswith("_refs") and isinstance(value, list):
                refs = [current(v) for v in value]
                # Deduplicated only when re-pointed, like the merge's own re-pointing.
                stix[key] = list(dict.fromkeys(refs)) if refs != value else refs

    def _merged(
        self, old: dict[str, Any], inc: dict[str, Any], synchronized: bool
    ) -> dict[str, Any]:
        old_ext = _ext(old)
        new: dict[str, Any] = {} if synchronized else _copy(old)
        for key, value in inc.items():
            if key == "extensions":
                continue
            prev = new.get(key)
            if (
                not synchronized
                and isinstance(prev, list)
                and isinstance(value, list)
                and all(isinstance(v, str) for v in prev + value)
            ):
                value = prev + [v for v in value if v not in prev]  # multi-valued: union
            new[key] = value
        new["created"] = old.get("created", new.get("created"))
        new["modified"] = old.get("modified")
        exts = dict(old.get("extensions") or {})
        for key, value in (inc.get("extensions") or {}).items():
            if key != OCTI_EXT:
                exts[key] = value
        octi = dict(old_ext)
        protected = {"id", "type", "created_at", "updated_at", "stix_ids", "is_inferred", "files"}
        octi.update({k: v for k, v in _ext(inc).items() if k not in protected})
        # Files are no attribute an upsert sets: only entries carrying data upload (or replace).
        _set_files(octi, self._uploaded(old_ext, _files(old), _ext(inc).get("files")))
        ids = [*(old_ext.get("stix_ids") or []), *(_ext(inc).get("stix_ids") or [])]
        if new["id"] != old["id"]:
            ids.append(old["id"])
        stix_ids = list(dict.fromkeys(i for i in ids if i != new["id"]))
        octi.pop("stix_ids", None)
        if stix_ids:
            octi["stix_ids"] = stix_ids
        exts[OCTI_EXT] = octi
        new["extensions"] = exts
        if is_relation(new):
            self._fill_relation_ext(new, octi)
        _clean(new)
        return new

    def _stamp(self, new: dict[str, Any], at_ms: int | None = None) -> None:
        now = iso_ms(self._clock() if at_ms is None else at_ms)
        new["modified"] = now
        octi = dict(_ext(new))
        octi["updated_at"] = now
        _with_ext(new, octi)

    def _commit_update(
        self,
        iid: str,
        old: dict[str, Any],
        new: dict[str, Any],
        origin: dict[str, Any] | None,
        event_id: str | None = None,
        at_ms: int | None = None,
    ) -> str | None:
        """``at_ms``: the time the change is stamped with (default: the clock now)."""
        if _comparable(old) == _comparable(new):
            return None  # loop avoidance: an upsert that changes nothing publishes nothing
        self._stamp(new, at_ms)
        patch = jsonpatch.make_patch(old, new).patch
        reverse = jsonpatch.make_patch(new, old).patch
        self._replace(iid, old, new)
        self._set_version(iid, event_id)
        if new["id"] != old["id"]:
            self._repoint([old["id"]], new["id"])
        changes = []
        for key in sorted(set(old) | set(new)):
            if key in ("modified", "extensions") or old.get(key) == new.get(key):
                continue
            before, after = old.get(key), new.get(key)
            change: dict[str, Any] = {
                "field": key.replace("_", " ").capitalize(),
                "previous": before
                if isinstance(before, list)
                else ([] if before is None else [before]),
                "new": after if isinstance(after, list) else ([] if after is None else [after]),
            }
            if isinstance(before, list) and isinstance(after, list):
                change["added"] = [v for v in after if v not in before]
                change["removed"] = [v for v in before if v not in after]
            changes.append(change)
        old_files, new_files = _files(old), _files(new)
        if old_files != new_files:
            change = {"field": "Files", "previous": [f.get("name") for f in old_files]}
            change["new"] = [f.get("name") for f in new_files]
            changes.append(change)
        markings: list[str] = []
        if old.get("object_refs") != new.get("object_refs"):
            markings = [self._alias.get(m, m) for m in new.get("object_marking_refs") or []]
        context = {
            "patch": patch,
            "reverse_patch": reverse,
            "related_restrictions": {"markings": markings},
            "pir_ids": [],
            "changes": changes,
        }
        fields = ", ".join(c["field"] for c in changes) or "Id"
        message = f"updates `{fields}` in {self._describe('', new).removeprefix(' a ')}"
        env = self._envelope("update", new, message, origin, context, event_id)
        return self._emit("update", env)

    def update(
        self,
        ref: str,
        *,
        set: dict[str, Any] | None = None,  # noqa: A002 - the public API's name
        unset: list[str] | None = None,
        new_id: str | None = None,
    ) -> str | None:
        """Edit top-level attributes (and/or the standard id) of an existing object."""
        with self._lock:
            iid = self._alias.get(ref)
            if iid is None:
                return None
            old = self._objects[iid]
            new = _copy(old)
            for key, value in (set or {}).items():
                if key in ("id", "extensions"):
                    continue
                new[key] = value
            for key in unset or []:
                if key not in ("id", "type", "spec_version", "extensions"):
                    new.pop(key, None)
            if new_id and new_id != old["id"]:
                new["id"] = new_id
                octi = dict(_ext(new))
                ids = [i for i in [*(octi.get("stix_ids") or []), old["id"]] if i != new_id]
                octi["stix_ids"] = list(dict.fromkeys(ids))
                _with_ext(new, octi)
            if is_relation(new):
                octi = dict(_ext(new))
                self._fill_relation_ext(new, octi)
                _with_ext(new, octi)
            _clean(new)
            return self._commit_update(iid, old, new, None)

    def _set_version(self, iid: str, event_id: str | None) -> None:
        event_ms = _event_ms(event_id)
        if event_ms is None:
            self._version_ms.pop(iid, None)  # a local write: its own time is the version
        else:
            self._version_ms[iid] = event_ms

    def merge(self, target: str, sources: list[str], *, event_id: str | None = None) -> str | None:
        """Absorb ``sources`` into ``target`` (one ``merge`` event, silent re-pointing).

        ``event_id`` is the source platform's event id when a synchroniser applies the merge.
        """
        with self._lock:
            t_iid = self._alias.get(target)
            if t_iid is None:
                return None
            s_iids = list(
                dict.fromkeys(i for i in (self._alias.get(s) for s in sources) if i and i != t_iid)
            )
            if not s_iids:
                return None
            old = self._objects[t_iid]
            new = _copy(old)
            src_objs = [self._objects[i] for i in s_iids]
            octi = dict(_ext(new))
            ids = list(octi.get("stix_ids") or [])
            for src in src_objs:
                ids.extend(self._ids_of(src))
            octi["stix_ids"] = list(dict.fromkeys(i for i in ids if i != new["id"]))
            _with_ext(new, octi)
            if new.get("type") in _ALIAS_TYPES:
                aliases = list(new.get("aliases") or [])
                for src in src_objs:
                    for alias in [src.get("name"), *(src.get("aliases") or [])]:
                        if (
                            isinstance(alias, str)
                            and alias not in aliases
                            and alias != new.get("name")
                        ):
                            aliases.append(alias)
                if aliases:
                    new["aliases"] = aliases
            self._stamp(new)
            patch = jsonpatch.make_patch(old, new).patch
            reverse = jsonpatch.make_patch(new, old).patch
            for s_iid, src in zip(s_iids, src_objs, strict=True):
                self._forget(s_iid, src)
            self._replace(t_iid, old, new)
            for src in src_objs:
                for sid in self._ids_of(src):
                    self._alias[sid] = t_iid
                self._repoint(self._ids_of(src), new["id"])
            names = ", ".join(_name(s) for s in src_objs)
            etype = _ext(new).get("type")
            message = f"merges {etype} `{names}` in `{_name(new)}`"
            self._set_version(t_iid, event_id)
            context = {"patch": patch, "reverse_patch": reverse, "sources": src_objs}
            env = self._envelope("merge", new, message, None, context, event_id)
            return self._emit("merge", env)

    def _repoint(self, old_ids: list[str], new_id: str) -> None:
        """Rewrite refs to ``old_ids`` into ``new_id`` everywhere, silently (no events)."""
        olds = set(old_ids)
        users: set[str] = set()
        for sid in olds:
            users |= self._referrers.get(sid, set())
        for iid in users:
            obj = self._objects.get(iid)
            if obj is None:
                continue
            new = dict(obj)
            for key, value in obj.items():
                if key.endswith("_ref") and value in olds:
                    new[key] = new_id
                elif key.endswith("_refs") and isinstance(value, list) and olds.intersection(value):
                    new[key] = list(dict.fromkeys(new_id if v in olds else v for v in value))
            rewrite_granted_refs(new, olds, new_id)
            if is_relation(new):
                octi = dict(_ext(new))
                self._fill_relation_ext(new, octi)
                _with_ext(new, octi)
            self._replace(iid, obj, new)

    def delete(self, ref: str, *, event_id: str | None = None) -> str | None:
        """Delete an object: one ``delete`` event; dependants cleaned silently (§8.4)."""
        with self._lock:
            iid = self._alias.get(ref)
            if iid is None:
                return None
            obj = self._objects[iid]
            self._cascade(iid, obj)
            message = self._describe("deletes", obj)
            env = self._envelope("delete", obj, message, None, event_id=event_id)
            return self._emit("delete", env)

    def _cascade(self, iid: str, obj: dict[str, Any]) -> None:
        ids = set(self._ids_of(obj))
        users = set()
        for sid in ids:
            users |= self._referrers.get(sid, set())
        self._forget(iid, obj)
        for u_iid in users - {iid}:
            user = self._objects.get(u_iid)
            if user is None:
                continue
            if is_relation(user) and any(
                (v in ids) if isinstance(v, str) else bool(ids.intersection(v))
                for v in (user.get(f) for f in ENDPOINT_FIELDS)
                if v
            ):
                self._cascade(u_iid, user)
                continue
            new = dict(user)
            for key, value in user.items():
                if key.endswith("_ref") and value in ids:
                    del new[key]
                elif key.endswith("_refs") and isinstance(value, list) and ids.intersection(value):
                    new[key] = [v for v in value if v not in ids]
            rewrite_granted_refs(new, ids, None)
            self._replace(u_iid, user, new)

    # ------------------------------------------------------------------ attached files
    def _put_file(
        self,
        octi: dict[str, Any],
        files: list[dict[str, Any]],
        name: str,
        content: bytes,
        mime_type: str,
        version: str,
    ) -> dict[str, Any]:
        """Store ``content`` as the entity's file ``name`` (replacing one of that name in
        ``files``, in place, else appended); returns the new entry."""
        file_id = f"import/{octi.get('type')}/{octi.get('id')}/{name}"
        self._file_bytes[file_id] = content
        entry = {
            "name": name,
            "uri": FILE_URI_PREFIX + file_id,
            "version": version,
            "mime_type": mime_type,
        }
        for i, current in enumerate(files):
            if current.get("name") == name:
                files[i] = entry
                return entry
        files.append(entry)
        return entry

    def _uploaded(
        self, octi: dict[str, Any], current: list[dict[str, Any]], incoming: Any
    ) -> list[dict[str, Any]]:
        """The worker's import of a files list: each entry carrying ``data`` (base64) is
        uploaded (name, mime type and version kept when given), the others are ignored."""
        uploads: list[tuple[str, bytes, dict[str, Any]]] = []
        for item in incoming if isinstance(incoming, list) else []:
            if not isinstance(item, dict) or not isinstance(item.get("data"), str):
                continue
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError("attached file without a name")
            try:
                content = base64.b64decode("".join(item["data"].split()), validate=True)
            except binascii.Error:
                raise ValueError(f"attached file {name!r}: data is not base64") from None
            uploads.append((name, content, item))
        # Stored only once every entry decoded: a refused import leaves no bytes behind.
        files = [dict(f) for f in current]
        now = iso_ms(self._clock())
        for name, content, item in uploads:
            mime, version = item.get("mime_type"), item.get("version")
            entry = self._put_file(
                octi,
                files,
                name,
                content,
                mime if isinstance(mime, str) and mime else _DEFAULT_MIME,
                version if isinstance(version, str) and version else now,
            )
            markings = item.get("object_marking_refs")
            if isinstance(markings, list) and markings:
                entry["object_marking_refs"] = list(markings)
            self.file_uploads += 1
        return files

    def _commit_files(
        self, iid: str, old: dict[str, Any], files: list[dict[str, Any]], at_ms: int | None = None
    ) -> str | None:
        new = _copy(old)
        octi = dict(_ext(new))
        _set_files(octi, files)
        _with_ext(new, octi)
        return self._commit_update(iid, old, new, None, at_ms=at_ms)

    def attach_file(
        self, ref: str, name: str, content: bytes, mime_type: str = "application/pdf"
    ) -> str | None:
        """Upload ``content`` as the entity's file ``name`` (a new version replacing one of
        that name): one ``update`` event. None when ``ref`` is unknown."""
        with self._lock:
            iid = self._alias.get(ref)
            if iid is None:
                return None
            old = self._objects[iid]
            files = _files(old)
            ms = now = self._clock()
            for entry in files:
                last = (
                    parse_date_ms(str(entry.get("version", "")))
                    if entry.get("name") == name
                    else None
                )
                if last is not None:
                    # Strictly later than the version it replaces, so (uri, version) always
                    # names one content, even for two uploads within a millisecond.
                    ms = max(ms, last + 1)
            self._put_file(_ext(old), files, name, bytes(content), mime_type, iso_ms(ms))
            # The upload's moment is the entity's update too: one clock read, not two a
            # millisecond apart (the file's version and the object's modified differed).
            return self._commit_files(iid, old, files, at_ms=now)

    def remove_file(self, ref: str, name: str) -> str | None:
        """Delete the entity's file ``name`` (entry and bytes): one ``update`` event."""
        with self._lock:
            iid = self._alias.get(ref)
            if iid is None:
                return None
            old = self._objects[iid]
            files = _files(old)
            kept = [f for f in files if f.get("name") != name]
            if len(kept) == len(files):
                return None
            for entry in files:
                if entry.get("name") == name:
                    self._file_bytes.pop(file_id_of(entry) or "", None)
            return self._commit_files(iid, old, kept)

    def forget_file_content(self, file_id: str) -> None:
        """Drop a file's bytes only (its entry stays): as if deleted before its download."""
        with self._lock:
            self._file_bytes.pop(file_id, None)

    def file_content(self, file_id: str) -> bytes | None:
        with self._lock:
            return self._file_bytes.get(file_id)

    def files_of(self, ref: str) -> list[dict[str, Any]]:
        """The entity's attached-file entries (copies), in upload order."""
        obj = self.get(ref)
        return [dict(f) for f in _files(obj)] if obj is not None else []

    def file_download(self, file_id: str) -> tuple[bytes, dict[str, Any], dict[str, Any]] | None:
        """``(bytes, entry, owning object)`` of a file the platform serves, else None."""
        parts = file_id.split("/", 3)
        with self._lock:
            content = self._file_bytes.get(file_id)
            obj = self._objects.get(parts[2]) if len(parts) == 4 else None
            if content is None or obj is None:
                return None
            for entry in _files(obj):
                if file_id_of(entry) == file_id:
                    return content, entry, obj
            return None

    # ------------------------------------------------------------------ seeding
    def references_known(self, stix: dict[str, Any]) -> bool:
        """Whether the platform holds every object ``stix`` references (its endpoints, a
        container's contents, its author, markings, ...)."""
        with self._lock:
            return all(r in self._alias for r in stix_refs(stix))

    def _endpoints_known(self, stix: dict[str, Any]) -> bool:
        kind = stix.get("type")
        if kind == "relationship":
            refs = [stix.get("source_ref"), stix.get("target_ref")]
        elif kind == "sighting":
            refs = [stix.get("sighting_of_ref"), *(stix.get("where_sighted_refs") or [])]
        else:
            return True
        return all(isinstance(r, str) and r in self._alias for r in refs)

    def load_bundle(self, bundle: dict[str, Any] | list[dict[str, Any]]) -> int:
        """Seed objects as they are (timestamps kept), one ``create`` event each."""
        objs = bundle if isinstance(bundle, list) else list(bundle.get("objects") or [])
        ordered = sorted(
            (o for o in objs if isinstance(o, dict) and isinstance(o.get("id"), str)),
            key=lambda o: _LOAD_RANK.get(str(o.get("type")), 2),
        )
        count = 0
        with self._lock:
            for raw in ordered:
                stix = _copy(raw)
                if not self._endpoints_known(stix):
                    # The platform refuses a relationship or sighting whose endpoint does not
                    # exist (MISSING_REFERENCE), so it never becomes part of the state.
                    self.skipped_on_load += 1
                    continue
                if stix["id"] in self._alias:
                    self.upsert(stix)
                    count += 1
                    continue
                iid, new = self._prepare_new(stix, iso_ms(self._clock()), keep_times=True)
                self._index(iid, new)
                self._emit(
                    "create", self._envelope("create", new, self._describe("creates", new), None)
                )
                count += 1
        return count
