"""The platform's GraphQL API, as far as pycti needs it to use the simulator as a sync target.

``PlatformApi(store).handle(body, headers)`` answers ``POST /graphql`` with the operations pycti
7.261026.0 really sends (docs/OPENCTI-TARGET.md lists them): the health check, connector
registration and ping, ``stixBundlePush``, ``stix(id)`` and the three core listings. Answers and
errors have the platform's shapes (HTTP 200 with ``errors[].name`` / ``extensions.code``), so
pycti raises exactly what it raises against a real platform.

One deliberate difference: a real platform only queues a pushed bundle for its workers, this
double imports it synchronously before answering, so "acknowledged" means "applied" here.

With a broker (``store.amqp_url``, e.g. ``SimServer(amqp_url=...)``), ``registerConnector``
declares the connector's push exchange and queue on it as the platform does (exchange
``amqp.worker.exchange``, queue ``push_<id>``, routing key ``push_routing_<id>``), answers with
that broker's coordinates, and starts a ``PlatformWorker`` consuming the queue (sim/worker.py). The
import follows the worker (push_handler.py + pycti ``import_item``): upsert by every input id,
``opencti_operation`` delete / merge, inferred objects skipped, attached files uploaded from
their inline ``data`` (entries without it ignored, see ``SimStore._uploaded``). Like the
platform's push path it does not forward the ``synchronized-upsert`` / ``opencti-event-id``
request headers to the import, unless ``store.platform_forward_headers`` is set (a platform
variant for experiments). With ``store.platform_refuses_missing_references`` set, a pushed
object referencing one the platform does not hold (an endpoint, a container's contents, its
author or markings) is refused with the platform's ``MISSING_REFERENCE_ERROR``, as its import
does (by default the double takes it).
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
import pika  # type: ignore[import-untyped]  # no stubs published
import pika.exceptions  # type: ignore[import-untyped]

from ..events import OCTI_EXT
from .store import SimStore, entity_type_of, iso_ms
from .worker import PlatformWorker

__all__ = [
    "WORKER_EXCHANGE",
    "PlatformApi",
    "PlatformError",
    "PlatformState",
    "platform_state",
    "resume_workers",
    "stop_workers",
]

WORKER_EXCHANGE = "amqp.worker.exchange"
CONNECTOR_EXCHANGE = "amqp.connector.exchange"

PLATFORM_VERSION = "6.9.17"
_META_TYPES = {
    "marking-definition",
    "label",
    "external-reference",
    "kill-chain-phase",
    "vocabulary",
}
_LISTINGS: dict[str, Callable[[str], bool]] = {
    "stixCoreObjects": lambda t: t not in _META_TYPES and t not in ("relationship", "sighting"),
    "stixCoreRelationships": lambda t: t == "relationship",
    "stixSightingRelationships": lambda t: t == "sighting",
}
_STATE_GUARD = threading.Lock()


class PlatformError(Exception):
    """A GraphQL error answered with HTTP 200, as the platform does."""

    def __init__(self, name: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.message = message
        self.data = data or {}

    def payload(self) -> dict[str, Any]:
        return {
            "errors": [
                {
                    "message": self.message,
                    "name": self.name,
                    "extensions": {"code": self.name, "data": self.data},
                }
            ],
            "data": None,
        }


@dataclass
class PlatformState:
    """What the platform remembers between requests: identity, connectors, pushes."""

    settings_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    version: str = PLATFORM_VERSION
    connectors: dict[str, dict[str, Any]] = field(default_factory=dict)
    pushes: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)
    # AMQP mode: one worker per registered connector's push queue (by connector id).
    workers: dict[str, PlatformWorker] = field(default_factory=dict)


def stop_workers(store: SimStore) -> None:
    """Stop the double's queue workers (they resume with ``resume_workers``)."""
    state = getattr(store, "platform_state", None)
    if isinstance(state, PlatformState):
        for worker in list(state.workers.values()):
            worker.stop()


def resume_workers(store: SimStore) -> None:
    """Restart the workers of connectors registered earlier (a platform coming back)."""
    state = getattr(store, "platform_state", None)
    if isinstance(state, PlatformState):
        for worker in list(state.workers.values()):
            worker.start()


def platform_state(store: SimStore) -> PlatformState:
    """The state attached to ``store`` (created on first use, shared by every request)."""
    with _STATE_GUARD:
        state = getattr(store, "platform_state", None)
        if not isinstance(state, PlatformState):
            state = PlatformState()
            store.platform_state = state  # type: ignore[attr-defined]
        return state


# -- a just-enough GraphQL reader -----------------------------------------------------------

_NAME = re.compile(r"[_A-Za-z][_0-9A-Za-z]*")


def _skip(text: str, i: int, open_c: str, close_c: str) -> int:
    """Index just after the bracket group starting at ``text[i] == open_c``."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            i = text.index('"', i + 1)
        elif c == open_c:
            depth += 1
        elif c == close_c:
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise PlatformError("GRAPHQL_PARSE_FAILED", "Syntax Error: unbalanced brackets")


def _calls(selection: str) -> Iterator[tuple[str, str, str, str]]:
    """Top-level ``(response key, field name, arguments text, sub-selection)`` of a selection
    set's inner text; the key is the alias when the query gives one (``a0: stix(id: $i0)``)."""
    i = 0
    alias: str | None = None
    while i < len(selection):
        m = _NAME.match(selection, i)
        if m is None:
            i += 1
            continue
        name = m.group(0)
        i = m.end()
        while i < len(selection) and selection[i] in " \t\r\n,":
            i += 1
        if selection.startswith(":", i):  # "alias: field"
            alias = name
            i += 1
            continue
        args = ""
        if selection.startswith("(", i):
            end = _skip(selection, i, "(", ")")
            args = selection[i + 1 : end - 1]
            i = end
            while i < len(selection) and selection[i] in " \t\r\n":
                i += 1
        sub = ""
        if selection.startswith("{", i):
            end = _skip(selection, i, "{", "}")
            sub = selection[i + 1 : end - 1]
            i = end
        key, alias = alias or name, None
        if name not in ("on", "fragment") and not name.startswith("__"):
            yield key, name, args, sub


def _fields(selection: str) -> Iterator[tuple[str, str]]:
    """Top-level ``(name, sub-selection)`` pairs of a selection set's inner text."""
    for _key, name, _args, sub in _calls(selection):
        yield name, sub


_ARG = re.compile(r'([_A-Za-z][_0-9A-Za-z]*)\s*:\s*(\$[_A-Za-z][_0-9A-Za-z]*|"(?:[^"\\]|\\.)*")')


def _arguments(args: str, variables: Mapping[str, Any]) -> dict[str, Any]:
    """A field's arguments: ``$variables`` resolved, string literals decoded (what pycti and
    our target send; nested literal objects are not needed)."""
    out: dict[str, Any] = {}
    for name, value in _ARG.findall(args):
        out[name] = variables.get(value[1:]) if value.startswith("$") else orjson.loads(value)
    return out


def _root_calls(query: str) -> list[tuple[str, str, str, str]]:
    start = query.find("{")
    if start < 0:
        raise PlatformError("GRAPHQL_PARSE_FAILED", "Syntax Error: no selection set")
    end = _skip(query, start, "{", "}")
    return list(_calls(query[start + 1 : end - 1]))


def _pick(value: dict[str, Any], selection: str) -> dict[str, Any]:
    """Project a result dict onto the requested fields (nested dicts projected too)."""
    if not selection.strip():
        return value
    out: dict[str, Any] = {}
    for name, sub in _fields(selection):
        item = value.get(name)
        if sub and isinstance(item, dict):
            item = _pick(item, sub)
        elif sub and isinstance(item, list):
            item = [_pick(x, sub) if isinstance(x, dict) else x for x in item]
        out[name] = item
    return out


# -- the API --------------------------------------------------------------------------------


def _ext(stix: dict[str, Any]) -> dict[str, Any]:
    ext = stix.get("extensions")
    octi = ext.get(OCTI_EXT) if isinstance(ext, dict) else None
    return octi if isinstance(octi, dict) else {}


def _attr(stix: dict[str, Any], key: str) -> Any:
    # pycti's get_attribute_in_extension: the OpenCTI extension first, then top level.
    octi = _ext(stix)
    return octi[key] if key in octi else stix.get(key)


def _node(obj: dict[str, Any]) -> dict[str, Any]:
    octi = _ext(obj)
    node: dict[str, Any] = {k: v for k, v in obj.items() if k != "extensions"}
    node.update(
        id=octi.get("id"),
        standard_id=obj.get("id"),
        entity_type=octi.get("type") or entity_type_of(obj),
        created_at=octi.get("created_at"),
        updated_at=octi.get("updated_at") or obj.get("modified"),
        x_opencti_stix_ids=octi.get("stix_ids") or [],
        parent_types=[],
    )
    return node


class PlatformApi:
    """GraphQL endpoint of one simulated platform (state lives on the store)."""

    def __init__(self, store: SimStore) -> None:
        self.store = store
        self.state = platform_state(store)

    # -- transport ------------------------------------------------------------------------

    def handle(self, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        lowered = {k.lower(): v for k, v in headers.items()}
        try:
            request = orjson.loads(body)
            query = request.get("query") if isinstance(request, dict) else None
            if not isinstance(query, str):
                return 400, orjson.dumps({"errors": [{"message": "Must provide query string."}]})
            variables = request.get("variables") or {}
            self._authenticate(lowered)
            data: dict[str, Any] = {}
            for key, name, args, sub in _root_calls(query):
                # Each field reads its own arguments (several aliased calls in one query).
                local = {**variables, **_arguments(args, variables)}
                data[key] = self._resolve(name, sub, local, lowered)
            return 200, orjson.dumps({"data": data})
        except orjson.JSONDecodeError:
            return 400, orjson.dumps({"errors": [{"message": "POST body is not JSON"}]})
        except _Unknown as exc:
            message = f'Cannot query field "{exc}" on type "Query".'
            payload = {
                "errors": [
                    {"message": message, "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"}}
                ]
            }
            return 400, orjson.dumps(payload)
        except PlatformError as exc:
            return 200, orjson.dumps(exc.payload())

    def _authenticate(self, headers: Mapping[str, str]) -> None:
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        expected = getattr(self.store, "api_token", None)
        if not token or (expected is not None and token != expected):
            raise PlatformError("AUTH_REQUIRED", "You must be logged in to do this.")

    def _resolve(
        self, name: str, sub: str, variables: dict[str, Any], headers: Mapping[str, str]
    ) -> Any:
        if name == "about":
            return _pick({"version": self.state.version, "dependencies": []}, sub)
        if name == "settings":
            settings = {"id": self.state.settings_id, "platform_title": "OpenCTI simulator"}
            return _pick(settings, sub)
        if name == "registerConnector":
            return _pick(self._register(variables.get("input") or {}), sub)
        if name == "pingConnector":
            return _pick(self._ping(variables), sub)
        if name == "connector":
            record = self._connector(str(variables.get("id", "")))
            return _pick(record, sub) if record is not None else None
        if name == "stixBundlePush":
            return self._push(variables, headers)
        if name == "stix":
            obj = self.store.get(str(variables.get("id", "")))
            return orjson.dumps(obj).decode() if obj is not None else None
        if name in _LISTINGS:
            return self._listing(name, sub, variables)
        raise _Unknown(name)

    # -- connectors -----------------------------------------------------------------------

    def _register(self, spec: dict[str, Any]) -> dict[str, Any]:
        cid, name, ctype = spec.get("id"), spec.get("name"), spec.get("type")
        if not isinstance(cid, str) or not cid or not isinstance(name, str) or not name:
            raise PlatformError("FUNCTIONAL_ERROR", "Connector id and name are required")
        try:
            uuid.UUID(cid)
        except ValueError:
            raise PlatformError("FUNCTIONAL_ERROR", "Connector id must be a valid UUID") from None
        with self.state.lock:
            now = iso_ms(self.store.now_ms())
            current = self.state.connectors.get(cid)
            record: dict[str, Any] = (
                dict(current) if current else {"created_at": now, "connector_state": None}
            )
            record.update(
                id=cid,
                name=name,
                connector_type=ctype,
                connector_scope=spec.get("scope") or [],
                auto=bool(spec.get("auto")),
                only_contextual=bool(spec.get("only_contextual")),
                active=True,
                updated_at=now,
                connector_user_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"connector-user:{cid}")),
            )
            self.state.connectors[cid] = record
            amqp_url = self._amqp_url()
            if amqp_url:
                self._declare_queues(amqp_url, cid, name)
                worker = self.state.workers.get(cid)
                if worker is None:
                    worker = PlatformWorker(self.store, amqp_url, f"push_{cid}")
                    self.state.workers[cid] = worker
                worker.start()
            return {**record, **self._queue_config(cid), "jwks": None}

    def _amqp_url(self) -> str | None:
        url = getattr(self.store, "amqp_url", None)
        return url if isinstance(url, str) and url else None

    @staticmethod
    def _declare_queues(amqp_url: str, cid: str, name: str) -> None:
        """The platform's registerConnectorQueues: durable direct exchanges, the connector's
        listen and push queues bound to their routing keys."""
        try:
            params = pika.URLParameters(amqp_url)
            params.connection_attempts = 1
            params.socket_timeout = 5
            conn = pika.BlockingConnection(params)
            try:
                channel = conn.channel()
                for exchange in (CONNECTOR_EXCHANGE, WORKER_EXCHANGE):
                    channel.exchange_declare(exchange, exchange_type="direct", durable=True)
                for kind, exchange in (("listen", CONNECTOR_EXCHANGE), ("push", WORKER_EXCHANGE)):
                    queue = f"{kind}_{cid}"
                    args = {"name": name}
                    channel.queue_declare(queue, durable=True, arguments=args)
                    channel.queue_bind(queue, exchange, routing_key=f"{kind}_routing_{cid}")
            finally:
                conn.close()
        except (pika.exceptions.AMQPError, OSError) as exc:
            # The platform fails the registration when RabbitMQ is down.
            raise PlatformError(
                "DATABASE_ERROR", f"RabbitMQ seems down ({type(exc).__name__})"
            ) from None

    def _queue_config(self, cid: str) -> dict[str, Any]:
        # The platform hands out its RabbitMQ coordinates here (the broker's, in AMQP mode).
        connection: dict[str, Any] = {
            "host": "127.0.0.1",
            "vhost": "/",
            "use_ssl": False,
            "port": 0,
            "user": "none",
            "pass": "none",
        }
        amqp_url = self._amqp_url()
        if amqp_url:
            parts = urlsplit(amqp_url)
            vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
            connection = {
                "host": parts.hostname or "127.0.0.1",
                "vhost": vhost,
                "use_ssl": parts.scheme == "amqps",
                "port": parts.port or (5671 if parts.scheme == "amqps" else 5672),
                "user": unquote(parts.username or "guest"),
                "pass": unquote(parts.password or "guest"),
            }
        return {
            "config": {
                "connection": connection,
                "s3": None,
                "listen": f"listen_{cid}",
                "listen_routing": f"listen_routing_{cid}",
                "listen_exchange": "amqp.connector.exchange",
                "push": f"push_{cid}",
                "push_routing": f"push_routing_{cid}",
                "push_exchange": "amqp.worker.exchange",
            }
        }

    def _ping(self, variables: dict[str, Any]) -> dict[str, Any]:
        cid = str(variables.get("id", ""))
        with self.state.lock:
            record = self.state.connectors.get(cid)
            if record is None:
                raise PlatformError("FUNCTIONAL_ERROR", "Connector not found", {"id": cid})
            state = variables.get("state")
            if isinstance(state, str):
                record["connector_state"] = state
            record["connector_info"] = variables.get("connectorInfo") or {}
            record["updated_at"] = iso_ms(self.store.now_ms())
            record["pings"] = int(record.get("pings", 0)) + 1
            return dict(record)

    def _connector(self, cid: str) -> dict[str, Any] | None:
        with self.state.lock:
            record = self.state.connectors.get(cid)
            return {**record, **self._queue_config(cid)} if record else None

    # -- bundle push ----------------------------------------------------------------------

    def _push(self, variables: dict[str, Any], headers: Mapping[str, str]) -> bool:
        cid = variables.get("connectorId")
        raw = variables.get("bundle")
        invalid = "Invalid bundle"
        if not isinstance(raw, str):
            raise PlatformError("UNSUPPORTED_ERROR", invalid, {"reason": "bundle is not a string"})
        try:
            bundle = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise PlatformError(
                "UNSUPPORTED_ERROR", invalid, {"reason": "bundle is not JSON"}
            ) from None
        objects = bundle.get("objects") if isinstance(bundle, dict) else None
        if bundle.get("type") != "bundle" or not isinstance(objects, list) or not objects:
            raise PlatformError("UNSUPPORTED_ERROR", invalid, {"reason": "Invalid stix bundle"})
        with self.state.lock:
            if not isinstance(cid, str) or cid not in self.state.connectors:
                raise PlatformError("UNSUPPORTED_ERROR", invalid, {"reason": "Invalid connector"})
        for index, obj in enumerate(objects):
            if not (
                isinstance(obj, dict)
                and isinstance(obj.get("id"), str)
                and "--" in obj["id"]
                and isinstance(obj.get("type"), str)
            ):
                ident = obj.get("id") if isinstance(obj, dict) else None
                reason = f"object #{index} has no valid id/type"
                raise PlatformError("UNSUPPORTED_ERROR", invalid, {"reason": reason, "id": ident})
        forward = bool(getattr(self.store, "platform_forward_headers", False))
        synchronized = forward and headers.get("synchronized-upsert") == "true"
        with self.state.lock:  # one import at a time: a single worker, in bundle order
            for obj in objects:
                self._import(obj, synchronized)
            self.state.pushes.append(
                {"connector_id": cid, "work_id": variables.get("work_id"), "objects": len(objects)}
            )
        return True

    def _import(self, obj: dict[str, Any], synchronized: bool) -> None:
        refuses_missing = bool(getattr(self.store, "platform_refuses_missing_references", False))
        if _ext(obj).get("is_inferred"):
            return  # pycti ignores inferred items on import
        operation = _attr(obj, "opencti_operation")
        if operation is None:
            if refuses_missing and not self.store.references_known(obj):
                # The platform's import: an object referencing one it does not hold is refused
                # (a missing endpoint at once; any other reference after a few retries of its
                # queue, which then imports it without that reference).
                raise PlatformError(
                    "MISSING_REFERENCE_ERROR", "Element(s) not found", {"id": obj["id"]}
                )
            try:
                self.store.upsert(obj, synchronized=synchronized)
            except ValueError as exc:  # an attached file's data the worker cannot upload
                raise PlatformError("VALIDATION_ERROR", str(exc), {"id": obj["id"]}) from None
        elif operation in ("delete", "delete_force"):
            self.store.delete(obj["id"])
        elif operation == "merge":
            target = _attr(obj, "merge_target_id")
            sources = _attr(obj, "merge_source_ids")
            if not isinstance(target, str) or not isinstance(sources, list):
                raise PlatformError(
                    "FUNCTIONAL_ERROR", "Merge needs merge_target_id and merge_source_ids"
                )
            if self.store.get(target) is None:
                raise PlatformError(
                    "FUNCTIONAL_ERROR", "Cannot find the merge target", {"id": target}
                )
            self.store.merge(target, [s for s in sources if isinstance(s, str)])
        else:
            raise PlatformError(
                "UNSUPPORTED_ERROR", "Not supported opencti_operation", {"id": obj["id"]}
            )

    # -- listings -------------------------------------------------------------------------

    def _listing(self, name: str, sub: str, variables: dict[str, Any]) -> dict[str, Any]:
        accept = _LISTINGS[name]
        wanted = variables.get("types") or []
        rows = [
            _node(o)
            for o in self.store.objects()
            if accept(str(o.get("type")))
            and (not wanted or _node(o)["entity_type"] in wanted or o.get("type") in wanted)
        ]
        rows.sort(key=lambda n: str(n["id"]))
        first = int(variables.get("first") or 100)
        after = variables.get("after")
        start = int(after) if isinstance(after, str) and after.isdigit() else 0
        page = rows[start : start + first]
        end = start + len(page)
        result = {
            "edges": [{"node": node, "cursor": str(start + i + 1)} for i, node in enumerate(page)],
            "pageInfo": {
                "startCursor": str(start),
                "endCursor": str(end),
                "hasNextPage": end < len(rows),
                "hasPreviousPage": start > 0,
                "globalCount": len(rows),
            },
        }
        return _pick(result, sub)


class _Unknown(Exception):
    """A root field the double does not implement (answered like a schema validation error)."""
