"""The simulated platform's HTTP side: OpenCTI's SSE stream endpoints plus a control API.

Follows Appendix A of docs/opencti-stream-protocol.md: raw ``/stream``, live ``/stream/{id}``
with recover mode, dependency events, filter translation, heartbeats, empty-body errors carrying
the reason phrase. ``/storage/get/<file id>`` serves attached files, ``/graphql`` the platform
double (platform.py). Written for throughput: ready messages are coalesced into one chunk of up to
~256 KB and plain replayed frames are sent as stored, never re-serialised.
"""

from __future__ import annotations

import re
import socket
import ssl
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import jsonpatch
import orjson

from ..events import OCTI_EXT
from .filters import ENDPOINT_FIELDS, is_accessible, is_relation, match_filter_group, stix_refs
from .store import FILE_URI_PREFIX, LogSlice, SimStore, iso_ms, parse_date_ms, split_key

__all__ = ["SimServer", "parse_position"]

_SPAN = 10**10
_CHUNK = 256 * 1024
_CACHE_MAX = 5000
_RECOVERY_PAGE = 500  # the platform's elasticsearch:default_pagination_result
_CONTAINERS = {"report", "grouping", "note", "opinion", "observed-data"}
_LEADING_INT = re.compile(r"\s*([+-]?\d+)")  # what JavaScript's parseInt reads
_NOT_AUTHENTICATED = "You are not authenticated, please check your credentials"
_NOT_AUTHORIZED = "You are not authorized, please check your credentials"
_FAULT_KEYS = {
    "drop_after_events",
    "mid_message",
    "drop_times",
    "fail_next",
    "stall_secs",
    "stall_after_events",
    "no_recover",
    "consumer_metrics",
    "recovery_heartbeats",
    "dependency_heartbeats",
    "heartbeat_ahead_ms",
    "recovery_index_order",
}


def parse_position(value: str | None) -> tuple[int, int] | None:
    """§3.1: ``0``/``0-0``, a verbatim ``<a>-<b>`` id, or an ISO date; else None (start live)."""
    if not value:
        return None
    if value in ("0", "0-0"):
        return (0, 0)
    parts = value.split("-")
    if len(parts) == 2:
        # Used verbatim as a Redis id (so "2024-01" is the bogus id 2024-1, like the platform).
        if parts[0].isdigit() and parts[1].isdigit():
            return (int(parts[0]), int(parts[1]))
        return None
    ms = parse_date_ms(value)
    return (ms, 0) if ms is not None else None


def _ext(stix: dict[str, Any]) -> dict[str, Any]:
    ext = stix.get("extensions")
    octi = ext.get(OCTI_EXT) if isinstance(ext, dict) else None
    return octi if isinstance(octi, dict) else {}


def _compatible_version(value: Any) -> bool:
    """The live stream's version check, ``parseInt(version ?? '0') >= 4``
    (sseMiddleware.js:591-593): older events are dropped, a newer one ("5") is sent on."""
    found = _LEADING_INT.match("0" if value is None else str(value))
    return found is not None and int(found.group(1)) >= 4


def _frame(id_text: str | None, event: str, payload: bytes) -> bytes:
    head = b"id: " + id_text.encode() + b"\n" if id_text is not None else b""
    return head + b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"


class _Dropped(Exception):
    """The connection must end now (fault injection, drop, server stop, client gone)."""


class _Session:
    """One open SSE connection: position, already-sent cache, output buffer, faults."""

    def __init__(self, sim: SimServer, handler: _Handler, owner: str) -> None:
        self.sim = sim
        self.store = sim.store
        self.handler = handler
        self.owner = owner
        self.connection_id = str(uuid.uuid4())
        self.closed = False
        self.buf: list[bytes] = []
        self.buf_size = 0
        self.last_key: int | None = None
        self.data_sent = 0
        self.last_hb = time.monotonic()
        self.cache: OrderedDict[str, None] = OrderedDict()
        # The start id the reader reads strictly after (XREAD), while log entries may still
        # sort at or below it: a start ahead of the log's clock (see _above_floor).
        self.floor: int | None = None
        faults = sim._take_connection_faults()
        self.drop_after: int | None = faults.get("drop_after_events")
        self.mid_message = bool(faults.get("mid_message"))
        self.stall_secs: float | None = faults.get("stall_secs")
        self.stall_after = int(faults.get("stall_after_events") or 0)
        self.consumer_metrics = bool(faults.get("consumer_metrics"))
        self.dependency_heartbeats = sim._fault_flag("dependency_heartbeats")
        # Live-stream options (defaults = raw stream).
        self.stream_id: str | None = None  # a collection's, checked again after every read
        self.allowed: frozenset[str] | None = None
        self.filters: dict[str, Any] | None = None
        self.no_deps = False
        self.listen_delete = True
        self.with_inferences = False

    # ------------------------------------------------------------------ output
    def write(self, data: bytes) -> None:
        self.buf.append(data)
        self.buf_size += len(data)
        if self.buf_size >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.closed:
            raise _Dropped
        if not self.buf:
            return
        data = b"".join(self.buf)
        self.buf.clear()
        self.buf_size = 0
        try:
            self.handler.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
        except OSError as exc:
            raise _Dropped from exc

    def end(self) -> None:
        """End the body cleanly: what is buffered, then the chunked body's last chunk."""
        self.flush()
        self.closed = True
        try:
            self.handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass

    def cut(self) -> None:
        """Close the socket abruptly (no chunked terminator): the client sees a broken stream."""
        self.closed = True
        try:
            self.handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def send_data(self, id_text: str, event: str, payload: bytes, key: int) -> None:
        frame = _frame(id_text, event, payload)
        if self.drop_after is not None and self.data_sent >= self.drop_after:
            self.write(frame[: len(frame) // 2])
            self.flush()
            self.cut()
            raise _Dropped
        self.write(frame)
        self.data_sent += 1
        self.last_key = key
        if self.drop_after is not None and self.data_sent >= self.drop_after:
            if not self.mid_message:
                self.flush()
                self.cut()
                raise _Dropped
        if self.stall_secs and self.data_sent >= self.stall_after:
            self.flush()
            self._sleep(self.stall_secs)
            self.stall_secs = None

    def _sleep(self, secs: float) -> None:
        deadline = time.monotonic() + secs
        while not self.closed and time.monotonic() < deadline:
            time.sleep(min(0.05, deadline - time.monotonic()))
        if self.closed:
            raise _Dropped

    def send_connected(self) -> None:
        store = self.store
        first, last = store.first_event_id, store.last_event_id
        info = {
            "lastEventId": last,
            "firstEventId": first,
            "firstEventDate": iso_ms(int(str(first).split("-")[0])) if first else None,
            "lastEventDate": iso_ms(int(str(last).split("-")[0])) if last else None,
            "streamSize": store.event_count,
            "connectionId": self.connection_id,
        }
        self.write(_frame(None, "connected", orjson.dumps(info)))
        self.flush()

    def heartbeat(self, pos: int) -> None:
        """Idle heartbeat: last id sent, or "now" when caught up (never below what was sent).

        "Now" is taken one millisecond back so an event appended in this very millisecond can
        never sort at or below a checkpointed heartbeat (the platform has that race).
        """
        # The node's clock (heartbeat ids) may run ahead of Redis's (event ids).
        ahead = int(self.sim._fault_value("heartbeat_ahead_ms") or 0)
        with self.store.cond:
            caught_up = self.store.bounds()[1] <= pos
            key = self.last_key
            if caught_up:
                now_key = (self.store.now_ms() - 1 + ahead) * _SPAN
                key = now_key if key is None else max(key, now_key)
        if key is None:
            return
        id_text = split_key(key)
        self.last_key = key
        date = iso_ms(key // _SPAN)
        self.write(_frame(id_text, "heartbeat", orjson.dumps(date)))
        self._consumer_metrics(id_text)
        self.flush()
        self.last_hb = time.monotonic()

    # ------------------------------------------------------------------ main loop
    def pump(self, pos: int, process: Callable[[int, Any], int]) -> None:
        """Send everything from ``pos``, then follow the log; heartbeats when idle."""
        hb = self.sim.heartbeat_secs
        while not self.closed:
            sl = self.store.read(pos, max_bytes=_CHUNK)
            if sl.frames:
                pos = process(pos, sl)
                self.recheck()
                continue
            self.flush()
            gen = self.store.generation
            wait = max(0.0, hb - (time.monotonic() - self.last_hb))
            if self.store.wait_for(pos, wait, gen):
                continue
            if self.closed:
                break
            self.recheck()  # an empty read ends the same way on the platform
            if time.monotonic() - self.last_hb >= hb:
                self.heartbeat(pos)

    def recheck(self) -> None:
        """After every read the platform computes the user and the collection again
        (sseMiddleware.js:660-664): a collection stopped or deleted meanwhile ends the response
        as it is, a clean end of the body with no error event (the next request gets the
        status), and changed filters apply from the next read (protocol doc §1.3)."""
        if self.stream_id is None:
            return
        collection = self.sim._collection(self.stream_id)
        if collection is None or not collection["live"]:
            self.end()
            raise _Dropped
        self.filters = collection["filters"]

    def _above_floor(self, sl: Any) -> Any:
        """Only the entries that sort after the start id. The platform's reader asks Redis for
        entries strictly after an id (``XREAD ... <id>``), not after a place in the log: from a
        start id ahead of the log's clock (a node clock ahead, a ``recover`` date in the
        future) what is appended until the clock passes it is never sent (protocol doc §3.1,
        §5.1). Injected ``raw`` test frames are no Redis entries: always sent."""
        floor = self.floor
        if floor is None:
            return sl
        if sl.keys and sl.keys[-1] > floor:
            self.floor = None  # the log's keys only grow: every later entry is above it
        if sl.keys and sl.keys[0] > floor:
            return sl
        keep = [i for i, k in enumerate(sl.keys) if k > floor or sl.kinds[i] == "raw"]
        return LogSlice(
            sl.start,
            [sl.keys[i] for i in keep],
            [sl.kinds[i] for i in keep],
            [sl.frames[i] for i in keep],
        )

    def process_raw(self, pos: int, sl: Any) -> int:
        """Raw ``/stream``: frames verbatim, coalesced (the fast path)."""
        end = int(sl.start) + len(sl.frames)
        sl = self._above_floor(sl)
        if self.drop_after is None and not self.stall_secs:
            self.write(b"".join(sl.frames))
            last = [k for k, kind in zip(sl.keys, sl.kinds, strict=True) if kind != "raw"]
            if last:
                self.last_key = last[-1]
            self.data_sent += len(last)
            return end
        for offset, (key, kind, frame) in enumerate(zip(sl.keys, sl.kinds, sl.frames, strict=True)):
            if kind == "raw":
                self.write(frame)
                continue
            start = frame.index(b"\ndata: ") + 7
            self.send_data(split_key(key), kind, frame[start:-2], key)
            del offset
        return end

    # ------------------------------------------------------------------ live stream
    def visible(self, stix: dict[str, Any]) -> bool:
        return is_accessible(stix, self.allowed) and match_filter_group(
            self.filters, stix, self.store.resolve_internal
        )

    def _cached(self, stix_id: str) -> bool:
        if stix_id in self.cache:
            self.cache.move_to_end(stix_id)
            return True
        return False

    def _remember(self, stix_id: str) -> None:
        self.cache[stix_id] = None
        self.cache.move_to_end(stix_id)
        while len(self.cache) > _CACHE_MAX:
            self.cache.popitem(last=False)

    def _refs(self, obj: dict[str, Any], out: list[dict[str, Any]], seen: set[str]) -> bool:
        """Unsent refs of ``obj``, deepest first. False when a relation endpoint is missing."""
        endpoints: set[str] = set()
        if is_relation(obj):
            for field in ENDPOINT_FIELDS:
                value = obj.get(field)
                endpoints.update([value] if isinstance(value, str) else value or [])
        valid = True
        for ref in stix_refs(obj):
            if ref in seen or self._cached(ref):
                continue
            dep = self.store.get(ref)
            if dep is None or not is_accessible(dep, self.allowed):
                if ref in endpoints:
                    valid = False
                continue
            dep_id = str(dep.get("id"))
            if dep_id in seen or self._cached(dep_id):
                continue
            seen.update((ref, dep_id))
            if self._refs(dep, out, seen):
                out.append(dep)
            elif ref in endpoints:
                valid = False
        return valid

    def dependencies(self, obj: dict[str, Any]) -> tuple[bool, list[dict[str, Any]]]:
        """§5.2: refs always; relations unless no-dependencies. (valid, objects to send)."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        valid = self._refs(obj, out, seen)
        if not valid:
            return False, []
        if not self.no_deps:
            for rel in self.store.relations_of(obj):
                rel_id = str(rel.get("id"))
                if rel_id in seen or self._cached(rel_id) or not is_accessible(rel, self.allowed):
                    continue
                if _ext(rel).get("is_inferred"):
                    continue  # listed on the non-inferred indices only, whatever with-inferences
                sub: list[dict[str, Any]] = []
                seen.add(rel_id)
                if self._refs(rel, sub, seen):
                    out.extend(sub)
                    out.append(rel)
        return True, out

    def send_synthetic(
        self, id_text: str, key: int, event: str, obj: dict[str, Any], ref: str
    ) -> None:
        octi = _ext(obj)
        message = (
            f"creates a {octi.get('type', obj.get('type'))} `{obj.get('name', obj.get('id'))}`"
        )
        payload = orjson.dumps(
            {"data": obj, "message": message, "origin": {"referer": ref}, "version": "4"}
        )
        self.send_data(id_text, event, payload, key)
        self._remember(str(obj.get("id")))
        if self.dependency_heartbeats and ref == "init-dependencies":
            self.recovery_heartbeat()

    def send_with_deps(
        self, id_text: str, key: int, event: str, payload: bytes, data: dict[str, Any]
    ) -> None:
        valid, deps = self.dependencies(data)
        if not valid:
            return  # a relationship whose endpoint cannot be resolved is dropped (§5.2)
        for dep in deps:
            self.send_synthetic(id_text, key, "create", dep, "init-dependencies")
        self.send_data(id_text, event, payload, key)
        self._remember(str(data.get("id")))

    def recover(self, from_ms: int, recover_ms: int) -> None:
        """§5.1 snapshot of current objects updated in [from, recover]."""
        beat = self.sim._fault_flag("recovery_heartbeats")
        for obj in self._recovery_order(self.store.snapshot(from_ms, recover_ms)):
            if _ext(obj).get("is_inferred") and not self.with_inferences:
                continue
            if not self.visible(obj) or self._cached(str(obj.get("id"))):
                continue
            ms = parse_date_ms(str(_ext(obj).get("updated_at", ""))) or 0
            id_text, key = f"{ms}-0", ms * _SPAN
            valid, deps = self.dependencies(obj)
            if not valid:
                continue
            for dep in deps:
                self.send_synthetic(id_text, key, "create", dep, "init-dependencies")
                if beat:
                    self.recovery_heartbeat()
            if self._cached(str(obj.get("id"))):
                # Already sent as a dependency of one of its own relationships (just above):
                # the platform does not send it again as init-create (sseMiddleware.js:687).
                continue
            self.send_synthetic(id_text, key, "create", obj, "init-create")
            if beat:
                self.recovery_heartbeat()

    def _recovery_order(self, objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The order recovery sends its objects in. By default the snapshot's (updated_at, then
        internal id). With the ``recovery_index_order`` fault, the platform's: its ``elList``
        pages (500 by ``updated_at``, then internal id) are each loaded again by id
        (``storeLoadByIdsWithRefs``, an unsorted search), which answers index by index, so
        within a page the objects come before the relationships and sightings and the ids of
        ``<updated_at>-0`` go back and forth (the pages stay in order)."""
        page = self.sim._fault_value("recovery_index_order")
        if not page:
            return objs
        size = _RECOVERY_PAGE if page is True else int(page)
        out: list[dict[str, Any]] = []
        for start in range(0, len(objs), size):
            chunk = objs[start : start + size]
            out.extend(o for o in chunk if not is_relation(o))
            out.extend(o for o in chunk if is_relation(o))
        return out

    def recovery_heartbeat(self) -> None:
        """The platform's heartbeat timer firing while recovery or a dependency resolution
        awaits the database (§2.3): its id is the last id sent (in recovery, a recovery id well
        below the recover point; after a dependency, the id its trigger, still to come, shares)."""
        assert self.last_key is not None
        self.write(
            _frame(
                split_key(self.last_key), "heartbeat", orjson.dumps(iso_ms(self.last_key // _SPAN))
            )
        )
        self._consumer_metrics(split_key(self.last_key))

    def _consumer_metrics(self, id_text: str) -> None:
        """7.x: the metrics message after a heartbeat, carrying the same last id."""
        if self.consumer_metrics:
            metrics = {
                "connectionId": self.connection_id,
                "lastEventId": id_text,
                "deliveryRate": 0,
                "timeLag": 0,
            }
            self.write(_frame(id_text, "consumer_metrics", orjson.dumps(metrics)))

    def process_live(self, pos: int, sl: Any) -> int:
        end = int(sl.start) + len(sl.frames)
        sl = self._above_floor(sl)
        for offset, (key, kind, frame) in enumerate(zip(sl.keys, sl.kinds, sl.frames, strict=True)):
            if kind == "raw":
                self.write(frame)
                continue
            start = frame.index(b"\ndata: ") + 7
            self._live_event(key, kind, frame[start:-2], (sl.start + offset) % 100)
            if self.last_key is None or self.last_key < key:
                self.last_key = key  # filtered-out events still advance the heartbeat id
        return end

    def _live_event(self, key: int, kind: str, payload: bytes, index: int) -> None:
        try:
            env = orjson.loads(payload)
            data = env["data"]
            if not isinstance(data, dict):
                return
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if not _compatible_version(env.get("version")):
            return
        octi = _ext(data)
        if octi.get("is_inferred") and not self.with_inferences:
            return
        if "event_id" not in env:
            ms = parse_date_ms(str(octi.get("updated_at") or data.get("modified") or "")) or (
                key // _SPAN
            )
            payload = payload[:-1] + b',"event_id":"%d-%d"}' % (ms, index)
        id_text = split_key(key)
        stored = env.get("type", kind)
        trivial = self.allowed is None and not self.filters
        now_visible = trivial or self.visible(data)
        if stored == "update":
            before_visible = now_visible
            if not trivial:
                try:
                    reverse = env.get("context", {}).get("reverse_patch") or []
                    before_visible = self.visible(jsonpatch.apply_patch(data, reverse))
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException):
                    before_visible = now_visible
            if before_visible and not now_visible:
                if self.listen_delete:
                    self.send_data(id_text, "delete", payload, key)
                    # The platform caches it as sent (sseMiddleware.js:605): while cached, it is
                    # not sent again as another object's dependency on this connection.
                    self._remember(str(data.get("id")))
            elif now_visible:
                self.send_with_deps(
                    id_text, key, "create" if not before_visible else "update", payload, data
                )
            elif is_relation(data) and not self.no_deps:
                self._relation_dependency(id_text, key, stored, env, data)
            elif data.get("type") not in _CONTAINERS:
                self._container_path(id_text, key, payload, data)
        elif stored == "delete":
            if now_visible:
                if self.listen_delete:
                    self.send_data(id_text, "delete", payload, key)
                    self._remember(str(data.get("id")))  # as the platform does (line 642)
            elif is_relation(data) and not self.no_deps:
                self._relation_dependency(id_text, key, stored, env, data)
        elif now_visible:
            self.send_with_deps(id_text, key, kind, payload, data)
        elif is_relation(data) and not self.no_deps:
            self._relation_dependency(id_text, key, stored, env, data)

    def _relation_dependency(
        self, id_text: str, key: int, event: str, env: dict[str, Any], data: dict[str, Any]
    ) -> None:
        ends = [data.get(f) for f in ("source_ref", "target_ref", "sighting_of_ref")]
        ends += list(data.get("where_sighted_refs") or [])
        objs = [self.store.get(e) for e in ends if isinstance(e, str)]
        if not objs or any(o is None for o in objs):
            return
        if not any(self.visible(o) for o in objs if o is not None):
            return
        valid, deps = self.dependencies(data)
        if not valid:
            return
        for dep in deps:
            self.send_synthetic(id_text, key, "create", dep, "init-dependencies")
        rebuilt = {
            "data": data,
            "message": env.get("message", ""),
            "origin": {"referer": "init-dependencies"},
            "version": "4",
        }
        self.send_data(id_text, event, orjson.dumps(rebuilt), key)
        self._remember(str(data.get("id")))

    def _container_path(self, id_text: str, key: int, payload: bytes, data: dict[str, Any]) -> None:
        if not any(self.visible(c) for c in self.store.containers_of(data)):
            return
        out: list[dict[str, Any]] = []
        if self._refs(data, out, set()):
            for dep in out:
                self.send_synthetic(id_text, key, "create", dep, "init-dependencies")
        # else (a relationship, with no-dependencies, whose endpoint cannot be resolved): no
        # refs are sent, but the update is, as the platform ignores the resolution's result
        # on this path (sseMiddleware.js:633-634).
        self.send_data(id_text, "update", payload, key)
        self._remember(str(data.get("id")))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    sim: SimServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away (a connector killed, a reset keep-alive connection) is not
        # the simulator's error: no traceback on the console for it.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return  # quiet: tests and benchmarks drive thousands of requests

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The ``Date`` header from the platform's clock (the store's: a test may skew it)."""
        return super().date_time_string(
            self.sim.store.now_ms() / 1000 if timestamp is None else timestamp
        )

    # ------------------------------------------------------------------ helpers
    @property
    def sim(self) -> SimServer:
        return self.server.sim

    def _status(self, code: int, reason: str) -> None:
        """Platform error style: empty body, explanation only in the reason phrase (§1.3)."""
        self.send_response(code, reason)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _json(self, code: int, body: Any) -> None:
        data = orjson.dumps(body)
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        if not auth.startswith("Bearer "):
            return None
        token = auth[7:].strip()
        if token == self.sim.token:
            return "bypass"
        if self.sim.restricted_token and token == self.sim.restricted_token:
            return "restricted"
        return None

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # ------------------------------------------------------------------ routing
    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        path = url.path.rstrip("/") or "/"
        if url.path.startswith(FILE_URI_PREFIX):
            self._file(unquote(url.path[len(FILE_URI_PREFIX) :]))
        elif path == "/stream":
            self._raw_stream(query)
        elif path.startswith("/stream/"):
            self._live_stream(path[len("/stream/") :], query)
        elif path.startswith("/control/"):
            self._control("GET", path[len("/control/") :])
        else:
            self._status(404, "Not Found")

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        path = urlsplit(self.path).path.rstrip("/")
        if path.startswith("/stream/connection/"):
            self._body()
            self._connection(path[len("/stream/connection/") :])
        elif path.startswith("/control/"):
            self._control("POST", path[len("/control/") :])
        elif path == "/graphql":
            self._graphql()
        else:
            self._body()
            self._status(404, "Not Found")

    def _connection(self, conn_id: str) -> None:
        user = self._user()
        if user is None:
            self._status(401, _NOT_AUTHENTICATED)
            return
        session = self.sim._session_by_id(conn_id)
        if session is None:
            self._status(401, "This is not your connection")
        elif session.owner != user:
            self._status(401, "You cant access this resource")
        else:
            self._json(200, {"message": "ok"})

    def _file(self, file_id: str) -> None:
        """An attached file's bytes (``uri`` of its entry). The platform's route decodes the
        path, so the file id is accepted raw or URL-encoded."""
        self.sim.file_requests += 1
        user = self._user()
        if user is None:
            self._status(403, "Forbidden")  # the platform's storage routes answer 403 here
            return
        found = self.sim.store.file_download(file_id)
        allowed = None if user == "bypass" else frozenset(self.sim.restricted_markings)
        if found is None or not is_accessible(found[2], allowed):
            # Not a 404: the platform's storage route answers any failure of loadFile ("File
            # not found or restricted") with a 503 (older versions redirected to its root).
            self._json(503, {"status": "error", "error": "File not found or restricted"})
            return
        content, entry, _owner = found
        self.send_response(200)
        self.send_header("Content-Type", str(entry.get("mime_type") or "application/octet-stream"))
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def _graphql(self) -> None:
        limit = self.sim.max_body_bytes
        if limit is not None and int(self.headers.get("Content-Length") or 0) > limit:
            # The platform's express body parser above max_payload_body_size.
            self._body()
            self._status(413, "Payload Too Large")
            return
        body = self._body()
        api = self.sim._platform_api()
        if api is None:
            self._status(404, "Not Found")
            return
        status, data = api.handle(body, dict(self.headers.items()))
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # ------------------------------------------------------------------ streams
    def _param(self, query: dict[str, list[str]], *names: tuple[str, str]) -> str | None:
        """First truthy value over (where, name) sources: JS ``||`` precedence (§3)."""
        for where, name in names:
            if where == "q":
                values = query.get(name)
                value: str | list[str] | None = values[0] if values and len(values) == 1 else values
            else:
                value = self.headers.get(name)
            if value:
                return value if isinstance(value, str) else "[array]"
        return None

    def _position_param(self, query: dict[str, list[str]], *names: tuple[str, str]) -> str | None:
        for where, name in names:
            value = (query.get(name) or [""])[0] if where == "q" else self.headers.get(name)
            if value:
                return value
        return None

    def _fail_injected(self, stream_id: str | None) -> bool:
        fault = self.sim._take_fail()
        if fault is None:
            return False
        status = int(fault.get("status", 500))
        where = f"Error in stream {stream_id}" if stream_id else "Error in stream"
        self._status(status, str(fault.get("reason") or f"{where}: simulated failure"))
        return True

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Connection", "keep-alive")
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Cache-Control", "no-cache, no-transform")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True

    def _run(self, session: _Session, body: Callable[[], None]) -> None:
        self.sim._register(session)
        try:
            body()
        except _Dropped:
            pass
        except OSError:
            pass
        finally:
            self.sim._unregister(session)
            session.closed = True

    def _raw_stream(self, query: dict[str, list[str]]) -> None:
        if self._fail_injected(None):
            return
        user = self._user()
        if user is None:
            self._status(401, _NOT_AUTHENTICATED)
            return
        if user != "bypass":
            self._status(401, "Consume generic stream is only authorized for bypass user")
            return
        start = parse_position(
            self._position_param(query, ("q", "from"), ("h", "from"), ("h", "last-event-id"))
        )
        if self.sim.store.event_count == 0:
            self._status(500, "Error in stream: ERR no such key")
            return
        session = _Session(self.sim, self, user)
        store = self.sim.store

        def body() -> None:
            self._start_sse()
            session.send_connected()
            if start is None:
                pos = store.bounds()[1]
            else:
                pos = store.position_after(*start)
                session.last_key = session.floor = start[0] * _SPAN + start[1]
            session.pump(pos, session.process_raw)

        self._run(session, body)

    def _live_stream(self, stream_id: str, query: dict[str, list[str]]) -> None:
        if self._fail_injected(stream_id):
            return
        sim = self.sim
        user = self._user()
        filters: dict[str, Any] | None = None
        if stream_id == "live":
            if user is None:
                self._status(401, _NOT_AUTHENTICATED)
                return
            if user != "bypass":
                self._status(401, _NOT_AUTHORIZED)
                return
        else:
            collection = sim._streams.get(stream_id)
            if collection is None:
                self._status(401, _NOT_AUTHORIZED)
                return
            if not collection["live"]:
                self._status(410, "This live stream is stopped")
                return
            if user is None:
                self._status(401, _NOT_AUTHENTICATED)
                return
            filters = collection["filters"]
            if user != "bypass" and not self._markings_ok(filters):
                self._status(
                    401, "You need to have access to specific markings for this live stream"
                )
                return
        start_text = self._position_param(
            query, ("q", "from"), ("h", "from"), ("h", "last-event-id")
        )
        recover_text = self._position_param(
            query, ("q", "recover"), ("h", "recover"), ("h", "recover-date")
        )
        start = parse_position(start_text)
        recover = parse_position(recover_text)
        if recover is not None and start is None:
            self._status(
                500,
                f"Error in stream {stream_id}: Recovery mode is only possible with a start date.",
            )
            return
        if sim.store.event_count == 0:
            self._status(500, f"Error in stream {stream_id}: ERR no such key")
            return
        session = _Session(sim, self, user or "anonymous")
        session.allowed = None if user == "bypass" else frozenset(sim.restricted_markings)
        session.filters = filters
        session.stream_id = None if stream_id == "live" else stream_id
        session.no_deps = (
            self._param(
                query,
                ("q", "no-dependencies"),
                ("h", "no-dependencies"),
                ("q", "no-relationships"),
                ("h", "no-relationships"),
            )
            == "true"
        )
        session.listen_delete = (
            self._param(query, ("q", "listen-delete"), ("h", "listen-delete")) != "false"
        )
        session.with_inferences = (
            self._param(query, ("q", "with-inferences"), ("h", "with-inferences")) == "true"
        )
        store = sim.store

        def body() -> None:
            self._start_sse()
            session.send_connected()
            if start is None:
                pos = store.bounds()[1]
            else:
                session.last_key = session.floor = start[0] * _SPAN + start[1]
                pos = store.position_after(*start)
            if start is not None and recover is not None and recover[0] > start[0]:
                if sim._fault_flag("no_recover"):
                    payload = orjson.dumps({"message": "Recovery is not available for this stream"})
                    session.write(_frame(split_key(session.last_key or 0), "no-recover", payload))
                    session.flush()
                else:
                    session.recover(start[0], recover[0])
                    # The live part starts at the recover id as given: "<ms>-0" for a date,
                    # verbatim for an "<ms>-<seq>" id (sseMiddleware.js:709).
                    pos = store.position_after(*recover)
                    session.floor = recover[0] * _SPAN + recover[1]
                    session.last_key = max(session.last_key or 0, session.floor)
            session.pump(pos, session.process_live)

        self._run(session, body)

    def _markings_ok(self, filters: dict[str, Any] | None) -> bool:
        wanted: list[str] = []
        for flt in (filters or {}).get("filters") or []:
            keys = flt.get("key")
            key = keys[0] if isinstance(keys, list) and keys else keys
            if key == "objectMarking" and (flt.get("operator") or "eq") == "eq":
                wanted.extend(flt.get("values") or [])
        if not wanted:
            return True
        allowed = set(self.sim.restricted_markings)
        for m in self.sim.restricted_markings:
            iid = self.sim.store.resolve_internal(m)
            if iid:
                allowed.add(iid)
        return any(w in allowed for w in wanted)

    # ------------------------------------------------------------------ control API
    def _control(self, method: str, action: str) -> None:
        body = self._body() if method == "POST" else b""
        if self._user() != "bypass":
            self._status(401, _NOT_AUTHENTICATED)
            return
        try:
            args = orjson.loads(body) if body else {}
            if not isinstance(args, dict):
                raise ValueError("body must be a JSON object")
            result = self.sim._control(method, action, args)
        except (ValueError, TypeError, KeyError, orjson.JSONDecodeError) as exc:
            self._json(400, {"error": str(exc)[:500]})
            return
        if result is None:
            self._status(404, "Not Found")
        else:
            self._json(200, result)


class SimServer:
    """A local OpenCTI stream endpoint over a ``SimStore`` (see docs/SIMULATOR.md)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str = "sim-token",
        store: SimStore | None = None,
        heartbeat_secs: float = 5.0,
        restricted_token: str | None = None,
        restricted_markings: list[str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        amqp_url: str | None = None,
    ) -> None:
        self.host = host
        # Optional TLS on the listening socket (TLS-verification tests); None: plain HTTP.
        self.ssl_context = ssl_context
        self.port = port
        self.token = token
        self.store = store if store is not None else SimStore()
        if amqp_url:
            # The platform double's RabbitMQ (registration answers it, a worker consumes it).
            self.store.amqp_url = amqp_url  # type: ignore[attr-defined]
        self.heartbeat_secs = heartbeat_secs
        self.restricted_token = restricted_token
        self.restricted_markings = list(restricted_markings or [])
        self.url = ""
        self._streams: dict[str, dict[str, Any]] = {}
        self._faults: dict[str, Any] = {}
        self._sessions: set[_Session] = set()
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._platform: Any = None
        # The platform's max_payload_body_size: a larger /graphql request gets 413 (None: any).
        self.max_body_bytes: int | None = None
        self.file_requests = 0  # requests for attached files (``/storage/get/...``)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> SimServer:
        httpd = _HTTPServer((self.host, self.port), _Handler)
        httpd.sim = self
        if self.ssl_context is not None:
            httpd.socket = self.ssl_context.wrap_socket(httpd.socket, server_side=True)
        self.port = int(httpd.server_address[1])
        scheme = "https" if self.ssl_context is not None else "http"
        self.url = f"{scheme}://{self.host}:{self.port}"
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"sim-{self.port}",
        )
        self._thread.start()
        self._queue_workers("resume_workers")
        return self

    def _queue_workers(self, action: str) -> None:
        # The platform double's AMQP workers stop and resume with the server.
        if getattr(self.store, "platform_state", None) is not None:
            from . import platform  # type: ignore[attr-defined,unused-ignore]

            getattr(platform, action)(self.store)

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        self._queue_workers("stop_workers")
        self.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def restart(self) -> None:
        """A platform restart: same port, same store; open streams are cut."""
        self.stop()
        self.start()

    def __enter__(self) -> SimServer:
        if self._httpd is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def drop_connections(self) -> None:
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.cut()
        self.store.wake()

    # ------------------------------------------------------------------ configuration
    def add_stream(
        self, stream_id: str, *, filters: dict[str, Any] | None = None, live: bool = True
    ) -> None:
        """Declare (or replace) a stream collection readable at ``/stream/<stream_id>``."""
        with self._lock:
            self._streams[stream_id] = {"filters": filters or None, "live": live}

    def set_fault(self, **kwargs: Any) -> None:
        """Arm faults (docs/SIMULATOR.md); a value of None clears that fault."""
        unknown = set(kwargs) - _FAULT_KEYS
        if unknown:
            raise ValueError(f"unknown fault(s): {', '.join(sorted(unknown))}")
        with self._lock:
            for key, value in kwargs.items():
                if value is None:
                    self._faults.pop(key, None)
                else:
                    self._faults[key] = dict(value) if isinstance(value, dict) else value

    # ------------------------------------------------------------------ internals
    def _take_fail(self) -> dict[str, Any] | None:
        with self._lock:
            fail = self._faults.get("fail_next")
            if not fail:
                return None
            count = int(fail.get("count", 1))
            if count <= 1:
                self._faults.pop("fail_next", None)
            else:
                fail["count"] = count - 1
            return dict(fail)

    def _take_connection_faults(self) -> dict[str, Any]:
        """Per-connection faults; drop/stall apply to ``drop_times`` connections (default 1)."""
        with self._lock:
            out = {
                k: self._faults.get(k)
                for k in ("drop_after_events", "mid_message", "stall_secs", "stall_after_events")
            }
            out["consumer_metrics"] = self._faults.get("consumer_metrics")
            if out["drop_after_events"] is not None or out["stall_secs"]:
                times = int(self._faults.get("drop_times", 1))
                if times <= 1:
                    for k in (
                        "drop_after_events",
                        "mid_message",
                        "stall_secs",
                        "stall_after_events",
                        "drop_times",
                    ):
                        self._faults.pop(k, None)
                else:
                    self._faults["drop_times"] = times - 1
            return out

    def _collection(self, stream_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._streams.get(stream_id)
            return dict(found) if found is not None else None

    def _fault_flag(self, name: str) -> bool:
        with self._lock:
            return bool(self._faults.get(name))

    def _fault_value(self, name: str) -> Any:
        with self._lock:
            return self._faults.get(name)

    def _register(self, session: _Session) -> None:
        with self._lock:
            self._sessions.add(session)

    def _unregister(self, session: _Session) -> None:
        with self._lock:
            self._sessions.discard(session)

    def _session_by_id(self, conn_id: str) -> _Session | None:
        with self._lock:
            return next((s for s in self._sessions if s.connection_id == conn_id), None)

    def _platform_api(self) -> Any:
        if self._platform is None:
            try:
                from . import platform  # type: ignore[attr-defined,unused-ignore]
            except ImportError:
                return None
            # The double accepts the simulator's own BYPASS token unless a test set another one.
            if getattr(self.store, "api_token", None) is None:
                self.store.api_token = self.token  # type: ignore[attr-defined]
            self._platform = platform.PlatformApi(self.store)
        return self._platform

    def _control(self, method: str, action: str, args: Mapping[str, Any]) -> Any:
        store = self.store
        if method == "GET" and action == "dump":
            return store.dump_bundle()
        if method == "GET" and action == "info":
            return {
                "event_count": store.event_count,
                "first_event_id": store.first_event_id,
                "last_event_id": store.last_event_id,
                "object_count": store.object_count,
            }
        if method != "POST":
            return None
        if action == "create":
            return {"event_id": store.create(dict(args["object"]))}
        if action == "update":
            return {
                "event_id": store.update(
                    str(args["id"]),
                    set=args.get("set"),
                    unset=args.get("unset"),
                    new_id=args.get("new_id"),
                )
            }
        if action == "merge":
            return {"event_id": store.merge(str(args["target"]), list(args["sources"]))}
        if action == "delete":
            return {"event_id": store.delete(str(args["id"]))}
        if action == "generate":
            from .generator import bulk_creates, generate

            count, seed = int(args.get("count", 100)), int(args.get("seed", 0))
            mix = str(args.get("mix", "mixed"))
            if mix == "bulk":
                bulk_creates(store, count, seed=seed)
            elif mix in ("mixed", "creates"):
                generate(store, count, seed=seed, mix=mix)
            else:
                raise ValueError(f"unknown mix {mix!r}")
            return {"event_id": store.last_event_id, "event_count": store.event_count}
        if action == "trim":
            store.trim(int(args["keep"]))
            return {"event_id": store.first_event_id, "event_count": store.event_count}
        if action == "inject":
            store.append_raw(str(args["sse"]))
            return {"event_id": store.last_event_id}
        if action == "streams":
            self.add_stream(
                str(args["id"]), filters=args.get("filters"), live=bool(args.get("live", True))
            )
            return {"ok": True}
        if action == "drop":
            self.drop_connections()
            return {"ok": True}
        if action == "fault":
            self.set_fault(**dict(args))
            return {"ok": True}
        return None
