"""OpenCTITarget through real pycti over HTTP into a simulated platform (SimServer + PlatformApi).

Events come from simulator A's stream log (the exact SSE frames its stream serves); the target
writes them into simulator B; B's state must then equal A's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler
from typing import Any

import httpx
import orjson
import pytest
from httpx_sse import connect_sse

from connector.errors import PermanentError, RetryableError
from connector.events import OCTI_EXT, EventId, StreamEvent, octi_ext
from connector.sim import sample_bundle
from connector.sim.platform import platform_state
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.target.opencti import AccessRefused, OpenCTITarget, Push, plan_pushes
from tests.support.compare import assert_same_state, state_diff
from tests.support.faultproxy import FaultProxy
from tests.support.served import serving
from tests.support.simlog import copy_event
from tests.support.simlog import sim_events as events_since
from tests.support.target import Sync, batch_of, leaving_the_filter, malware, target_for

TOKEN = "target-token-0123456789"
SAMPLE = "DATA-TEST-STIX2_v2.json"  # real platform test data, packaged by the simulator


def make_target(url: str, **kwargs: Any) -> OpenCTITarget:
    return target_for(url, **{"token": TOKEN, **kwargs})


@pytest.fixture()
def platform_b() -> Iterator[SimServer]:
    store = SimStore()
    store.api_token = TOKEN  # type: ignore[attr-defined]
    with SimServer(token=TOKEN, store=store) as server:
        yield server


@pytest.fixture()
def sync(platform_b: SimServer) -> Iterator[Sync]:
    a = SimStore()
    a.load_bundle(sample_bundle(SAMPLE))
    target = make_target(platform_b.url)
    target.check()
    yield Sync(a, platform_b, target)
    target.close()


def test_creates_of_real_samples_converge(sync: Sync) -> None:
    events = sync.step()
    assert len(events) == 67
    sync.assert_converged()
    # B is a platform: what it applied shows up on its own stream.
    assert sync.b.store.event_count == 67


def test_same_batch_twice_changes_nothing(sync: Sync) -> None:
    events = sync.step()
    before = sync.b.store.event_count
    dump = sync.b.store.dump_bundle()
    sync.target.write(batch_of(events))
    assert sync.b.store.event_count == before
    assert sync.b.store.dump_bundle() == dump


def test_updates_including_standard_id_change(sync: Sync) -> None:
    sync.step()
    a = sync.a
    a.upsert(malware("Alpha", description="first", aliases=["a1"]))
    sync.step()
    alpha = malware("Alpha")["id"]
    a.update(alpha, set={"description": "second", "aliases": ["a1", "a2"]})
    new_id = f"malware--{uuid.uuid5(uuid.NAMESPACE_DNS, 'Alpha renamed')}"
    a.update(alpha, set={"name": "Alpha renamed"}, new_id=new_id)
    events = sync.step()
    assert [e.event for e in events] == ["update", "update"]
    assert any(op.get("path") == "/id" for op in events[-1].envelope["context"]["reverse_patch"])
    sync.assert_converged()
    moved = sync.b.store.get(new_id)
    assert moved is not None and moved["id"] == new_id
    # The old standard id now resolves to the same entity instead of a duplicate.
    assert sync.b.store.get(alpha) == moved


def test_merge_removes_sources_on_target(sync: Sync) -> None:
    sync.step()
    a = sync.a
    for name in ("Target", "Source one", "Source two"):
        a.upsert(malware(name))
    sync.step()
    target, s1, s2 = (malware(n)["id"] for n in ("Target", "Source one", "Source two"))
    a.merge(target, [s1, s2])
    events = sync.step()
    assert [e.event for e in events] == ["merge"]
    sync.assert_converged()
    merged = sync.b.store.get(s1)
    assert merged is not None and merged["id"] == target  # sources are aliases of the target
    assert all(o["id"] not in (s1, s2) for o in sync.b.store.objects())


def test_an_absorber_sent_ahead_after_its_source_in_a_batch_keeps_them_apart(
    sync: Sync,
) -> None:
    """A live stream read late sends an entity as it is now: after the create of a source it
    absorbs later, already holding the source's id. The target learnt neither before the batch
    (``live_aliases`` asks it then), so the batch's own order must keep the two apart until the
    merge, or the merge finds one entity under both ids and the source stays on the target."""
    sync.step()
    a = sync.a
    a.upsert(malware("Target"))
    sync.step()
    a.upsert(malware("Source"))
    target, source = malware("Target")["id"], malware("Source")["id"]
    created, pos = events_since(a, sync.pos)
    a.merge(target, [source])
    merged, _ = events_since(a, pos)
    now = orjson.dumps({"data": a.get(target), "origin": {"referer": "init-dependencies"}})
    ahead = StreamEvent.from_sse(created[-1].id_text, "create", now)
    assert source in octi_ext(ahead.stix)["stix_ids"]
    sync.target.write(batch_of([*created, ahead]))
    sync.target.write(batch_of(merged))
    sync.assert_converged()
    assert [o["id"] for o in sync.b.store.objects() if o["type"] == "malware"].count(source) == 0


def test_merge_with_sources_unknown_to_target_does_not_resurrect(platform_b: SimServer) -> None:
    a = SimStore()
    for name in ("Target", "Source one"):
        a.upsert(malware(name))
    target, s1 = malware("Target")["id"], malware("Source one")["id"]
    _, pos = events_since(a)  # B never saw the creates
    a.merge(target, [s1])
    events, _ = events_since(a, pos)
    sink = make_target(platform_b.url)
    sink.write(batch_of(events))
    sync_state = platform_b.store.dump_bundle()
    assert [o["id"] for o in sync_state["objects"]] == [target]
    assert_same_state(a.dump_bundle(), sync_state)


def _uses(source: str, target: str) -> dict[str, Any]:
    return {
        "type": "relationship",
        "spec_version": "2.1",
        "id": f"relationship--{uuid.uuid5(uuid.NAMESPACE_DNS, source + target)}",
        "created": "2024-01-01T00:00:00.000Z",
        "modified": "2024-01-01T00:00:00.000Z",
        "relationship_type": "uses",
        "source_ref": source,
        "target_ref": target,
    }


def live_events(sim: SimServer, after: str) -> list[StreamEvent]:
    """A's ``/stream/live`` from ``after`` to its last event, dependencies resolved by the server."""
    last = EventId.parse(str(sim.store.last_event_id))
    out: list[StreamEvent] = []
    headers = {"Authorization": f"Bearer {sim.token}"}
    with (
        httpx.Client(timeout=30) as client,
        connect_sse(
            client, "GET", f"{sim.url}/stream/live", params={"from": after}, headers=headers
        ) as source,
    ):
        for sse in source.iter_sse():
            if sse.event in ("create", "update", "merge", "delete"):
                out.append(StreamEvent.from_sse(sse.id, sse.event, sse.data))
            if sse.id and EventId.is_valid(sse.id) and EventId.parse(sse.id) >= last:
                if sse.event == "heartbeat" or out[-1].event == "merge":
                    return out
    return out


def test_merge_into_target_created_in_the_same_batch(platform_b: SimServer) -> None:
    """The target is new in the batch that merges an older source with relationships into it.

    The stream loads dependencies when it sends them (§5.2): read after the merge, an earlier
    event brings the target already merged, with the source's id among its aliases, while B
    still has the source. Upserting that must not turn B's source into the target.
    """
    with SimServer(token="source-token", heartbeat_secs=0.2) as sim_a:
        a = sim_a.store
        for name in ("Old source", "Tool one", "Doomed"):
            a.upsert(malware(name))
        source, tool1, tool2 = (malware(n)["id"] for n in ("Old source", "Tool one", "Tool two"))
        a.upsert(_uses(source, tool1))
        sync = Sync(a, platform_b, make_target(platform_b.url))
        sync.step()
        mark = str(a.last_event_id)
        a.upsert(malware("Tool two"))
        a.upsert(_uses(source, tool2))
        a.delete(malware("Doomed")["id"])
        a.upsert(malware("New target", created="2026-01-01T00:00:00.000Z"))
        target = malware("New target")["id"]
        a.merge(target, [source])
        events = live_events(sim_a, mark)
        # The pattern: the merged target (aliases include the source) arrives before the merge.
        early = next(e for e in events if e.stix_id == target)
        assert source in (octi_ext(early.stix).get("stix_ids") or [])
        assert events.index(early) < [e.event for e in events].index("merge")
        sync.target.write(batch_of(events))
        sync.assert_converged()
        on_b = sync.b.store.get(target)
        assert on_b is not None and on_b["created"] == "2026-01-01T00:00:00.000Z"
        assert sync.b.store.get(source) == on_b  # the source is an alias of the target
        for tool in (tool1, tool2):
            rel = sync.b.store.get(_uses(source, tool)["id"])
            assert rel is not None and rel["source_ref"] == target
        # Delivered again (at-least-once): nothing changes on B.
        before = sync.b.store.event_count
        sync.target.write(batch_of(events))
        assert sync.b.store.event_count == before
        sync.assert_converged()
        sync.target.close()


def test_deletes_and_unknown_deletes(sync: Sync) -> None:
    sync.step()
    a = sync.a
    a.upsert(malware("Doomed"))
    a.upsert(malware("Born and gone"))
    doomed = malware("Doomed")["id"]
    sync.step()
    a.delete(doomed)
    a.delete(malware("Born and gone")["id"])
    sync.step()
    assert sync.b.store.get(doomed) is None
    sync.assert_converged()
    sync.target.delete_ids([doomed, "malware--00000000-0000-4000-8000-000000000000"])
    sync.assert_converged()


def test_stream_order_kept_within_one_batch(sync: Sync) -> None:
    sync.step()
    a = sync.a
    a.upsert(malware("Short lived"))
    a.delete(malware("Short lived")["id"])
    a.upsert(malware("Short lived", description="reborn"))
    events = sync.step()
    assert [e.event for e in events] == ["create", "delete", "create"]
    assert [p.kind for p in plan_pushes(events)] == ["upsert", "delete", "upsert"]
    sync.assert_converged()
    reborn = sync.b.store.get(malware("Short lived")["id"])
    assert reborn is not None and reborn["description"] == "reborn"


def test_removals_need_perfect_sync(platform_b: SimServer) -> None:
    """Like the platform's push path, plain upserts merge: a removed value stays on B."""
    a = SimStore()
    a.upsert(malware("Kept", description="old text", aliases=["x", "y"]))
    sync = Sync(a, platform_b, make_target(platform_b.url))
    sync.step()
    a.update(malware("Kept")["id"], set={"aliases": ["x"]}, unset=["description"])
    sync.step()
    assert state_diff(a.dump_bundle(), platform_b.store.dump_bundle())  # not converged
    # A platform that forwards synchronized-upsert to its import (direct API / worker events).
    platform_b.store.platform_forward_headers = True  # type: ignore[attr-defined]
    perfect = Sync(a, platform_b, make_target(platform_b.url, synchronized=True))
    perfect.step()
    perfect.assert_converged()


def test_registration_and_ping_visible_on_platform(platform_b: SimServer) -> None:
    a = SimStore()
    a.upsert(malware("Pinged"))
    sink = make_target(platform_b.url, connector_name="sync from A")
    sink.check()
    connectors = platform_state(platform_b.store).connectors
    record = connectors[sink.connector_id]
    assert record["connector_type"] == "STREAM"
    assert record["name"] == "sync from A"
    events, _ = events_since(a)
    sink.write(batch_of(events))
    sink.close()
    assert f'"last_event_id": "{events[-1].id_text}"' in record["connector_state"]
    # pycti's own connector read works against the double too.
    reader = make_target(platform_b.url, register=False)
    assert reader.api.connector.read(sink.connector_id)["connector_type"] == "STREAM"


def test_the_platform_skips_inferred_objects_and_refuses_a_merge_into_nothing(
    platform_b: SimServer,
) -> None:
    """The double's import, as the platform's (pycti's import_item): a pushed object marked
    inferred is skipped (the target's rule engine makes its own), and a merge whose target the
    platform does not hold is refused, its sources left as they were."""
    sink = make_target(platform_b.url)
    sink.check()

    def push(*objects: dict[str, Any]) -> Any:
        bundle = {"type": "bundle", "id": f"bundle--{uuid.uuid4()}", "objects": list(objects)}
        return sink.api.send_bundle_to_api(
            connector_id=sink.connector_id, bundle=json.dumps(bundle), work_id=None
        )

    inferred = malware("Inferred", extensions={OCTI_EXT: {"is_inferred": True}})
    source = malware("Merge source")
    assert push(inferred, source)["data"]["stixBundlePush"]
    assert platform_b.store.get(inferred["id"]) is None
    assert platform_b.store.get(source["id"]) is not None
    nowhere = malware("Not on the platform")
    merge = {
        **nowhere,
        "opencti_operation": "merge",
        "merge_target_id": nowhere["id"],
        "merge_source_ids": [source["id"]],
    }
    with pytest.raises(ValueError, match="Cannot find the merge target"):
        push(merge)
    kept = platform_b.store.get(source["id"])
    assert kept is not None and kept["id"] == source["id"]
    sink.close()


def test_the_platform_lists_no_marking_among_its_core_objects(platform_b: SimServer) -> None:
    """As the platform's schema has it, marking definitions are meta objects, not core ones:
    its stixCoreObjects listing leaves them out (verify --against-opencti reads them by id, a
    path the double would leave untried if it listed them)."""
    green = "marking-definition--00000000-0000-4000-8000-00000000000a"
    platform_b.store.create({"type": "marking-definition", "id": green, "name": "TLP:GREEN"})
    platform_b.store.create(malware("Listed"))
    sink = make_target(platform_b.url, register=False)
    listed = sink.api.stix_core_object.list(customAttributes="id standard_id", first=50)
    assert {node["standard_id"] for node in listed} == {malware("Listed")["id"]}
    sink.close()


def test_the_default_connector_id_is_one_per_source_and_stream() -> None:
    """Without connector.id, the id registered is stable across restarts for one source and
    stream, and another stream of the same platform (a second sync) gets its own: on a shared
    id the two would overwrite each other's registration and replay mark on the target."""
    from connector.__main__ import _default_connector_id
    from connector.settings import load_settings

    def connector_id(stream: str) -> str:
        env = {"OPENCTI_URL": "http://a:8080", "CONNECTOR_LIVE_STREAM_ID": stream}
        return _default_connector_id(load_settings(None, env=env))

    assert connector_id("live") == connector_id("live") != connector_id("reports")
    uuid.UUID(connector_id("live"))


def test_same_platform_is_refused(platform_b: SimServer) -> None:
    with pytest.raises(PermanentError, match="source"):
        make_target(platform_b.url, source_url=platform_b.url + "/").check()
    # The same platform at another address (a second node on the same data) is caught by its
    # settings id when the source token is given.
    with SimServer(token=TOKEN, store=platform_b.store) as node2:
        with pytest.raises(PermanentError, match="settings id"):
            make_target(platform_b.url, source_url=node2.url, source_token=TOKEN).check()
        other = SimStore()
        other.api_token = TOKEN  # type: ignore[attr-defined]
        with SimServer(token=TOKEN, store=other) as elsewhere:
            make_target(platform_b.url, source_url=elsewhere.url, source_token=TOKEN).check()
    make_target(platform_b.url, source_url=platform_b.url, allow_same_platform=True).check()
    assert not platform_b.store.object_count


def test_bad_token_is_permanent_and_not_leaked(platform_b: SimServer) -> None:
    bad = "wrong-secret-token-value"
    with pytest.raises(PermanentError, match="AUTH_REQUIRED") as info:
        make_target(platform_b.url, token=bad).check()
    assert bad not in str(info.value)


def test_platform_down_is_retryable(platform_b: SimServer) -> None:
    sink = make_target(platform_b.url)
    sink.check()
    a = SimStore()
    a.upsert(malware("Lost in transit"))
    events, _ = events_since(a)
    platform_b.stop()
    # SimServer.stop() leaves established keep-alive connections served; drop pycti's pooled
    # connection as a real outage would.
    sink.api.session.close()
    with pytest.raises(RetryableError, match="ConnectionError"):
        sink.write(batch_of(events))
    with pytest.raises(RetryableError):
        make_target(platform_b.url).check()


def test_unregistered_connector_and_bad_object_are_permanent(platform_b: SimServer) -> None:
    ghost = make_target(platform_b.url, register=False)
    ghost.check()
    with pytest.raises(PermanentError, match="Invalid connector"):
        ghost.push_objects([malware("Orphan")])
    sink = make_target(platform_b.url)
    with pytest.raises(PermanentError, match="object #1"):
        sink.push_objects([malware("Fine"), {"type": "malware", "name": "no id"}])


class _Failing(BaseHTTPRequestHandler):
    """Every request answered ``status`` with ``body`` (a proxy's page, by default)."""

    status = 503
    body = b"<html>Service Unavailable</html>"
    content_type = "text/html"

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("status", [503, 429, 502])
def test_overloaded_platform_is_retryable(status: int) -> None:
    handler = type("Handler", (_Failing,), {"status": status})
    with serving(handler) as url:
        with pytest.raises(RetryableError, match=f"HTTP {status}"):
            make_target(url).check()


def test_a_200_answer_pycti_cannot_read_is_retryable() -> None:
    """A 200 whose JSON is no GraphQL answer pycti can read (a proxy, a platform restarting)."""
    garbled = {"status": 200, "body": b'{"errors": ["upstream is restarting"]}'}
    with serving(
        type("Handler", (_Failing,), {**garbled, "content_type": "application/json"})
    ) as url:
        with pytest.raises(RetryableError, match="HTTP 200"):
            make_target(url).check()


def test_listing_through_pycti(sync: Sync) -> None:
    sync.step()
    api = sync.target.api
    nodes = api.stix_core_object.list(
        customAttributes="id standard_id entity_type updated_at", getAll=True, first=10
    )
    rels = api.stix_core_relationship.list(
        customAttributes="id standard_id updated_at", getAll=True, first=10
    )
    ids = {n["standard_id"] for n in nodes} | {r["standard_id"] for r in rels}
    expected = {
        o["id"]
        for o in sync.a.objects()
        if o["type"] not in ("marking-definition", "sighting", "external-reference")
    }
    assert ids == expected
    one = sorted(expected)[0]
    assert api.get_stix_content(one)["id"] == one


# ------------------------------------------------------------------ refusals and quarantine


def _event(ms: int, stix: dict[str, Any], kind: str = "create") -> StreamEvent:
    envelope = {
        "version": "4",
        "type": kind,
        "scope": "external",
        "data": stix,
        "message": kind,
        "origin": {},
    }
    return StreamEvent.from_sse(f"{ms}-0", kind, json.dumps(envelope))


def _refused(name: str) -> dict[str, Any]:
    """An object the double refuses for itself (no type)."""
    bad = malware(name)
    del bad["type"]
    return bad


def test_connector_gone_stops_even_a_one_event_batch(platform_b: SimServer) -> None:
    """The connector deleted on the target after check(): a quiet stream's one-event batch must
    stop like a bigger one, not be quarantined with the checkpoint moving on."""
    sink = make_target(platform_b.url)
    sink.check()
    platform_state(platform_b.store).connectors.clear()
    a = SimStore()
    a.upsert(malware("one"))
    a.upsert(malware("two"))
    events, _ = events_since(a)
    try:
        for batch in (events, events[:1]):
            # (said by the push, or by the ping that marks the batch before it)
            with pytest.raises(AccessRefused, match="Invalid connector|Connector not found"):
                sink.write(batch_of(batch))
            assert sink.rejected == []
        assert platform_b.store.object_count == 0
    finally:
        sink.close()


class _RefusingPlatform(BaseHTTPRequestHandler):
    """A platform whose health check answers and whose stixBundlePush fails with ``error``."""

    error: dict[str, Any] = {}

    def push_answer(self) -> dict[str, Any]:
        return {"errors": [self.error], "data": None}

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        request = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        if "stixBundlePush" in request.get("query", ""):
            answer = self.push_answer()
        else:
            answer = {"data": {"about": {"version": "6.4.0"}, "settings": {"id": "b-platform"}}}
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _gql_error(name: str, message: str, **data: Any) -> dict[str, Any]:
    return {"message": message, "name": name, "extensions": {"code": name, "data": data}}


@pytest.mark.parametrize("size", [1, 2])
@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        # The token lost the capability: nothing will go through.
        (_gql_error("FORBIDDEN_ACCESS", "You are not allowed to do this."), "access"),
        (_gql_error("AUTH_REQUIRED", "You must be logged in to do this."), "access"),
        # A real platform's unknown connector: UnsupportedError('Invalid bundle', {cause}).
        (_gql_error("UNSUPPORTED_ERROR", "Invalid bundle", cause="Invalid connector"), "access"),
        # Not attributable to an object: the platform's own problem, never the object's.
        (_gql_error("FUNCTIONAL_ERROR", "Something unexpected happened"), "stops"),
        (
            _gql_error("UNKNOWN_ERROR", "Cannot read properties of undefined (reading 'objects')"),
            "stops",
        ),
        # The platform's database or its rate limit, named only: passes, retried.
        (_gql_error("DATABASE_ERROR", "Elasticsearch answered an error"), "retried"),
        (_gql_error("TOO_MANY_REQUESTS", "Too many requests"), "retried"),
        # About the object: quarantined, the sync goes on.
        (_gql_error("VALIDATION_ERROR", "Invalid value", id="malware--x"), "quarantined"),
        # An object named like a connector is still the object's fault.
        (
            _gql_error("VALIDATION_ERROR", "Name connector-x is not valid", id="tool--x"),
            "quarantined",
        ),
        (
            _gql_error("UNSUPPORTED_ERROR", "Invalid bundle", reason="object #0 has no type"),
            "quarantined",
        ),
        # The object's data, though the message names none.
        (_gql_error("MISSING_REFERENCE_ERROR", "Element(s) not found"), "quarantined"),
    ],
)
def test_a_push_is_quarantined_only_for_an_object_level_error_whatever_its_size(
    error: dict[str, Any], outcome: str, size: int
) -> None:
    """Which refusal is quarantined is decided by its kind, never by how many objects the push
    holds: a push of several objects is retried object by object, and an error of no object of
    its own stops the sync from any of them (or is retried) as it does from one."""
    handler = type("Handler", (_RefusingPlatform,), {"error": error})
    with serving(handler) as url:
        sink = make_target(url, register=False)
        try:
            batch = batch_of([_event(1000 + n, malware(f"Lonely {n}")) for n in range(size)])
            if outcome == "quarantined":
                sink.write(batch)
                assert [q.id_text for q in sink.rejected] == [f"{1000 + n}-0" for n in range(size)]
                assert sink.last_event_id == f"{999 + size}-0"
                return
            kind = {"access": AccessRefused, "stops": PermanentError, "retried": RetryableError}
            with pytest.raises(kind[outcome], match=error["name"]) as info:
                sink.write(batch)
            # Access refused says so (the token, the connector), whatever else says nothing.
            assert isinstance(info.value, AccessRefused) == (outcome == "access")
            assert sink.rejected == []
            assert sink.last_event_id is None
        finally:
            sink.close()


def test_a_token_the_platform_repeats_in_an_error_never_shows() -> None:
    """A platform (or a proxy before it) that quotes the request's credentials in its error:
    the target's token is replaced wherever it appears in what the connector says."""
    error = _gql_error("FUNCTIONAL_ERROR", f"Authorization: Bearer {TOKEN} is not accepted here")
    with serving(type("Handler", (_RefusingPlatform,), {"error": error})) as url:
        sink = make_target(url, register=False)
        try:
            with pytest.raises(PermanentError, match="FUNCTIONAL_ERROR") as info:
                sink.write(batch_of([_event(1000, malware("Quoted"))]))
        finally:
            sink.close()
    assert TOKEN not in str(info.value) and "Bearer ***" in str(info.value)


def test_quarantine_names_the_event_of_each_refused_object(platform_b: SimServer) -> None:
    """A push of several objects refused because of some: retried object by object, each refused
    object quarantined under the event its pushed version came from."""
    good1, good2 = malware("good one"), malware("good two")
    bad1, bad2 = _refused("refused one"), _refused("refused two")
    bad2_later = {**bad2, "description": "updated"}
    events = [
        _event(1000, good1),
        _event(2000, bad1),
        _event(3000, bad2),
        _event(4000, good2),
        _event(5000, bad2_later, "update"),  # same object: its pushed version is this event's
    ]
    sink = make_target(platform_b.url)
    try:
        sink.write(batch_of(events))
        assert platform_b.store.get(good1["id"]) is not None
        assert platform_b.store.get(good2["id"]) is not None
        assert [(q.id_text, json.loads(q.raw)["id"]) for q in sink.rejected] == [
            ("2000-0", bad1["id"]),
            ("5000-0", bad2["id"]),
        ]
        # Named after its own event, wherever the batch was cut (a restart cuts it otherwise).
        assert [str(q.after) for q in sink.rejected] == ["2000-0", "5000-0"]
    finally:
        sink.close()


def test_every_object_refused_for_itself_is_quarantined(platform_b: SimServer) -> None:
    """Decided by error kind, not by count: a batch whose objects are all refused for their own
    data is quarantined (stopping would block the stream on them for good)."""
    events = [_event(1000, _refused("bad one")), _event(2000, _refused("bad two"))]
    sink = make_target(platform_b.url)
    try:
        sink.write(batch_of(events))
        assert [q.id_text for q in sink.rejected] == ["1000-0", "2000-0"]
        assert sink.last_event_id == "2000-0"
    finally:
        sink.close()


def test_bundle_ids_differ_when_contents_differ() -> None:
    """A bundle id is deterministic (a replayed push is byte-identical) and names one content:
    the single pushes of a refused push, a merge's upserts before and after it."""
    one, two = malware("one"), malware("two")
    assert Push("upsert", [one], ["1-0"]).bundle() == Push("upsert", [one], ["1-0"]).bundle()
    ids = {json.loads(Push("upsert", [obj], ["1-0"]).bundle())["id"] for obj in (one, two)}
    assert len(ids) == 2
    whole = Push("upsert", [one, two], ["1-0", "2-0"], ["1-0", "2-0"])
    singles = [json.loads(whole.single(i).bundle()) for i in range(2)]
    assert len({b["id"] for b in singles}) == 2
    assert [b["objects"] for b in singles] == [[one], [two]]
    # A merge is upsert / merge / upsert of the same object for the same event.
    a = SimStore()
    target_ext = {OCTI_EXT: {"extension_type": "property-extension", "stix_ids": ["x--1"]}}
    a.upsert(malware("Target", extensions=target_ext))
    a.upsert(malware("Source"))
    _, pos = events_since(a)
    a.merge(malware("Target")["id"], [malware("Source")["id"]])
    events, _ = events_since(a, pos)
    pushes = list(plan_pushes(events))
    assert [p.kind for p in pushes] == ["upsert", "merge", "upsert"]
    before, after = (json.loads(pushes[i].bundle()) for i in (0, 2))
    assert before["objects"] != after["objects"]  # the sources' ids come back as aliases
    assert before["id"] != after["id"]


class _Watched(list[StreamEvent]):
    """A batch that records how far it has been read (a spilled group is read from disk)."""

    def __init__(self, events: list[StreamEvent]) -> None:
        super().__init__(events)
        self.read = -1

    def __iter__(self) -> Iterator[StreamEvent]:
        for index, ev in enumerate(super().__iter__()):
            self.read = index
            yield ev


def test_pushes_are_planned_as_they_fill_not_from_the_whole_batch() -> None:
    """A huge dependency group waits on disk; its pushes go 500 objects at a time, never all
    planned (every object parsed and copied) before the first one is sent."""
    a = SimStore()
    for n in range(50):
        a.upsert(malware(f"Member {n}"))
    a.merge(malware("Member 0")["id"], [malware("Member 1")["id"]])
    a.upsert(malware("Member 2", description="after the merge"))
    events, _ = events_since(a)
    batch = _Watched(events)
    pushes = plan_pushes(batch, max_objects=10)
    first = next(pushes)
    assert first.kind == "upsert" and len(first.objects) == 10
    assert batch.read < 20  # the second pass has reached the eleventh event, not the end
    rest = list(pushes)
    assert [p.kind for p in rest][-3:] == ["merge", "upsert", "upsert"]
    assert [p.kind for p in [first, *rest]] == [p.kind for p in plan_pushes(list(events), 10)]


def test_planning_a_batch_keeps_no_parse_on_its_events() -> None:
    """Events as received hold their bytes only; a target reading them (several times each)
    must not leave every parsed event on a batch that may be a huge group (found with
    ``python -m bench.big_group --target``: 380 MB against 187 MB)."""
    a = SimStore()
    for n in range(5):
        a.upsert(malware(f"Kept {n}"))
    a.merge(malware("Kept 0")["id"], [malware("Kept 1")["id"]])
    received = [StreamEvent.from_sse(e.id_text, e.event, e.data) for e in events_since(a)[0]]
    assert [p.kind for p in plan_pushes(received)] == ["upsert", "upsert", "merge", "upsert"]
    assert all(ev._envelope is None for ev in received)
    _ = received[0].stix
    assert received[0]._envelope is None
    once = received[0].parsed()
    assert once is not received[0] and once.stix is once.stix  # one parse for the pass


def test_an_object_leaving_the_filter_is_kept_with_what_holds_it(platform_b: SimServer) -> None:
    """The stream's delete for an object that only left its filter was pushed as a delete:
    the target platform took with it the relationship and the report contents still in the
    stream's view, for good (see tests.support.target.leaving_the_filter)."""
    target = make_target(platform_b.url)
    try:
        leaving_the_filter(target, platform_b)
    finally:
        target.close()


def _replayed(platform_b: SimServer, a: SimStore, mark: int, cuts: list[tuple[int, int]]) -> None:
    """The events of ``a`` after log position ``mark`` written whole, then the slices ``cuts``
    of them again by the connector started again (killed after the target's write, before the
    checkpoint; the restart may cut the batch otherwise): B must equal A."""
    events, _ = events_since(a, mark)
    cid = str(uuid.uuid4())
    sink = make_target(platform_b.url, connector_id=cid)
    try:
        sink.write(batch_of(events))
        # Killed: no final ping. The restart reads the mark its write left on B.
        again = make_target(platform_b.url, connector_id=cid)
        try:
            for start, stop in cuts:
                again.write(batch_of(events[start:stop]))
            assert_same_state(a.dump_bundle(), platform_b.store.dump_bundle())
        finally:
            again.close()
    finally:
        sink.close()


@pytest.mark.parametrize("cuts", [[(0, 4)], [(1, 4)], [(2, 4)], [(2, 3), (3, 4)]])
def test_a_replayed_update_of_a_merged_source_leaves_the_merge_target_alone(
    platform_b: SimServer, cuts: list[tuple[int, int]]
) -> None:
    """The target applied an update of a source and its merge, then the batch failed (or the
    process died) before the checkpoint: the update pushed again named the merge target on B
    (the source's id is its alias there) and gave it the source's description."""
    a, _, _ = _updated_then_merged()
    _replayed(platform_b, a, 0, cuts)


def test_a_replayed_delete_of_a_merged_source_keeps_the_merge_target(
    platform_b: SimServer,
) -> None:
    """Deleted, created again and merged: the delete pushed again named the merge target on B
    and deleted it with its relationships, which the stream never sends again."""
    a = SimStore()
    x, y, tool = malware("keeper"), malware("recycled"), malware("tool")
    for obj in (x, y, tool):
        a.upsert(obj)
    a.upsert(_uses(x["id"], tool["id"]))
    _, mark = events_since(a)
    a.delete(y["id"])
    a.upsert(y)
    a.merge(x["id"], [y["id"]])
    _replayed(platform_b, a, 0, [(0, 7), (mark, 7)])


def test_an_id_freed_by_a_delete_in_the_batch_is_pushed(platform_b: SimServer) -> None:
    """B holds the source's id as an alias of its merge target; the batch the restarted
    connector pushes again deletes the merge target, then creates an object under that id
    again: that create is no replay."""
    a = SimStore()
    x, y = malware("gone absorber"), malware("comes back")
    a.upsert(x)
    a.upsert(y)
    a.merge(x["id"], [y["id"]])
    cid = str(uuid.uuid4())
    sink = make_target(platform_b.url, connector_id=cid)
    try:
        sink.write(batch_of(events_since(a)[0]))
        a.delete(x["id"])
        a.upsert(y)
        assert a.get(y["id"]) is not None
        # Killed before its checkpoint; the restart pushes from the start: a replay.
        again = make_target(platform_b.url, connector_id=cid)
        try:
            again.write(batch_of(events_since(a)[0]))
            assert_same_state(a.dump_bundle(), platform_b.store.dump_bundle())
            assert platform_b.store.get(y["id"]) is not None
        finally:
            again.close()
    finally:
        sink.close()


def test_a_rename_back_to_an_id_the_target_keeps_as_an_alias_is_pushed(
    platform_b: SimServer,
) -> None:
    """Renamed, then renamed back in a batch that also pushes the rename again (the connector
    restarted before its checkpoint): B holds the first id as an alias of the renamed entity,
    so the target resolves the rename back's id to another entity. That event is the rename
    itself (its previous id is that entity's), not a replay of one the target went past."""
    a = SimStore()
    alpha = malware("Alpha")
    a.upsert(alpha)
    beta_id = f"malware--{uuid.uuid5(uuid.NAMESPACE_DNS, 'Beta')}"
    cid = str(uuid.uuid4())
    sink = make_target(platform_b.url, connector_id=cid)
    try:
        events, first = events_since(a)
        sink.write(batch_of(events))
        a.update(alpha["id"], set={"name": "Beta"}, new_id=beta_id)
        sink.write(batch_of(events_since(a, first)[0]))
        renamed = platform_b.store.get(alpha["id"])
        assert renamed is not None and renamed["id"] == beta_id  # the alias on B
        a.update(beta_id, set={"name": "Alpha"}, new_id=alpha["id"])
        again = make_target(platform_b.url, connector_id=cid)
        try:
            again.write(batch_of(events_since(a, first)[0]))  # the rename again, and back
            assert_same_state(a.dump_bundle(), platform_b.store.dump_bundle())
            back = platform_b.store.get(alpha["id"])
            assert back is not None and back["name"] == "Alpha"
        finally:
            again.close()
    finally:
        sink.close()


def test_a_mark_the_target_could_not_save_is_saved_before_the_retry_pushes(
    platform_b: SimServer,
) -> None:
    """The ping that saves a batch's mark fails: the retry saves it before it pushes (else a
    kill after the retry's pushes would leave the restart without it, unguarded)."""
    a = SimStore()
    a.upsert(malware("one"))
    events, _ = events_since(a)
    batch = batch_of(events)
    proxy = FaultProxy(platform_b.url, seed=3).start()
    cid = str(uuid.uuid4())
    sink = make_target(proxy.url, connector_id=cid)
    try:
        sink.check()
        proxy.fail_next(1, "500", method="POST")  # the mark's ping, before any push
        with pytest.raises(RetryableError):
            sink.write(batch)
        assert platform_b.store.object_count == 0
        sink.write(batch)
        state = platform_state(platform_b.store).connectors[cid]["connector_state"]
        assert orjson.loads(state)["pushing_to"] == str(batch.last_id)
    finally:
        sink.close()
        proxy.stop()


@pytest.mark.parametrize("goes", ["merged-away", "renamed"])
def test_an_id_freed_when_its_absorber_goes_then_is_deleted_is_pushed(
    platform_b: SimServer, goes: str
) -> None:
    """B holds k's id as an alias of x (merged there; the connector was killed after that
    push). The batch pushed again goes on: x is merged into z (or renamed), that entity is
    deleted, k is created again. The merge (or the rename) freed k's id: its create is no
    replay, though B still resolves k's id to x when the batch starts."""
    a = SimStore()
    x, k, z = malware("first absorber"), malware("absorbed twice"), malware("second absorber")
    for obj in (x, k, z):
        a.upsert(obj)
    a.merge(x["id"], [k["id"]])
    applied = len(events_since(a)[0])
    if goes == "merged-away":
        a.merge(z["id"], [x["id"]])
        a.delete(z["id"])
    else:
        renamed = f"malware--{uuid.uuid5(uuid.NAMESPACE_DNS, 'renamed absorber')}"
        a.update(x["id"], set={"name": "renamed absorber"}, new_id=renamed)
        a.delete(renamed)
    a.upsert(k)
    events, _ = events_since(a)
    cid = str(uuid.uuid4())
    sink = make_target(platform_b.url, connector_id=cid)
    try:
        sink.write(batch_of(events[:applied]))
        resolved = platform_b.store.get(k["id"])
        assert resolved is not None and resolved["id"] == x["id"]  # k's id: an alias on B
        # Killed before its checkpoint; the restart pushes the whole batch again: a replay.
        again = make_target(platform_b.url, connector_id=cid)
        try:
            again.write(batch_of(events))
            assert_same_state(a.dump_bundle(), platform_b.store.dump_bundle())
            back = platform_b.store.get(k["id"])
            assert back is not None and back["id"] == k["id"]
        finally:
            again.close()
    finally:
        sink.close()


def _updated_then_merged() -> tuple[SimStore, dict[str, Any], dict[str, Any]]:
    """A: an absorbed malware updated, then merged into another one (a replay of the update
    into B, where the absorbed id is an alias of the merge target, changes that target)."""
    a = SimStore()
    x, y = malware("absorber"), malware("absorbed", description="before")
    a.upsert(x)
    a.upsert(y)
    a.update(y["id"], set={"description": "changed before the merge"})
    a.merge(x["id"], [y["id"]])
    return a, x, y


def test_a_batch_the_pipeline_marks_as_a_replay_is_guarded(platform_b: SimServer) -> None:
    """A batch read back from the archive (``Batch.replay``) is guarded without any mark on B:
    here B got it whole through another connector id, so this one has no mark at all."""
    a, _, _ = _updated_then_merged()
    events, _ = events_since(a)
    first = make_target(platform_b.url)
    again = make_target(platform_b.url)
    try:
        first.write(batch_of(events))
        assert_same_state(a.dump_bundle(), platform_b.store.dump_bundle())
        again.write(replace(batch_of(events), replay=True))
        assert_same_state(a.dump_bundle(), platform_b.store.dump_bundle())
    finally:
        first.close()
        again.close()


def test_a_batch_starting_at_the_mark_is_guarded(platform_b: SimServer) -> None:
    """The killed run's batch ended with the merge (its mark); the restart's batch is that
    merge's group: a dependency re-send of the source, then the merge, all under the mark's id.
    The re-send is a replay too (B holds the source's id as the merge target's alias)."""
    a, _, y = _updated_then_merged()
    events, _ = events_since(a)
    merge = events[-1]
    assert merge.event == "merge"
    cid = str(uuid.uuid4())
    sink = make_target(platform_b.url, connector_id=cid)
    try:
        sink.write(batch_of(events))
        # Killed: no checkpoint. The stream sends the merge's group again, with a dependency.
        source = {**y, "description": "changed before the merge"}
        group = [copy_event(merge.id_text, source), merge]
        again = make_target(platform_b.url, connector_id=cid)
        try:
            again.write(batch_of(group))
            assert batch_of(group).first_id == EventId.parse(merge.id_text)  # the mark itself
            assert_same_state(a.dump_bundle(), platform_b.store.dump_bundle())
        finally:
            again.close()
    finally:
        sink.close()


class _AnswerLost(OpenCTITarget):
    """A target whose push number ``lose`` reaches the platform, which applies it, and whose
    answer is lost on the way back (a connection cut): the write fails after that push."""

    lose = 0
    pushed = 0

    def _push(self, push: Push) -> None:
        super()._push(push)
        self.pushed += 1
        if self.pushed == self.lose:
            raise RetryableError("the platform's answer was lost")


def test_a_batch_retried_after_a_failure_in_the_same_run_is_guarded(
    platform_b: SimServer,
) -> None:
    """A fresh connector (no mark on B): the batch's merge is applied, the answer of the push
    after it is lost, the write fails. Its retry pushes the source's update again: guarded, it
    leaves the merge target alone."""
    a, _, _ = _updated_then_merged()
    a.upsert(malware("after the merge"))
    events, _ = events_since(a)
    sink = _AnswerLost(
        url=platform_b.url,
        token=TOKEN,
        connector_id=str(uuid.uuid4()),
        source_url="http://source.example:4000",
    )
    # upsert [x, y], then the merge's upsert, merge, upsert; then the last create.
    sink.lose = 4
    try:
        with pytest.raises(RetryableError, match="answer was lost"):
            sink.write(batch_of(events))
        assert (
            platform_b.store.get(
                "malware--" + str(uuid.uuid5(uuid.NAMESPACE_DNS, "after the merge"))
            )
            is None
        )
        sink.write(batch_of(events))
        assert_same_state(a.dump_bundle(), platform_b.store.dump_bundle())
    finally:
        sink.close()


class _Unacknowledging(_RefusingPlatform):
    """A platform that answers every stixBundlePush with no data: nothing was queued."""

    def push_answer(self) -> dict[str, Any]:
        return {"data": {"stixBundlePush": None}}


def test_a_push_the_platform_does_not_acknowledge_is_not_written() -> None:
    """A 200 answer without ``stixBundlePush`` (a proxy, a platform restarting) is no proof the
    bundle was queued: the write fails, to be retried; the checkpoint stays."""
    with serving(_Unacknowledging) as url:
        sink = make_target(url, register=False)
        try:
            with pytest.raises(RetryableError, match="not acknowledged"):
                sink.write(batch_of([_event(1000, malware("Unacknowledged"))]))
            assert sink.last_event_id is None
        finally:
            sink.close()


def test_pushes_hold_at_most_max_objects_and_an_id_change_starts_one() -> None:
    """``max_bundle_objects`` bounds every push, upserts and deletes alike; an update that
    changes its object's standard id starts a new push, after the one holding the old id."""
    five = [malware(f"bounded {n}") for n in range(5)]
    creates = [_event(1000 + n, m) for n, m in enumerate(five)]
    assert [len(p.objects) for p in plan_pushes(creates, 2)] == [2, 2, 1]
    deletes = [_event(2000 + n, m, "delete") for n, m in enumerate(five)]
    assert [(p.kind, len(p.objects)) for p in plan_pushes(deletes, 2)] == [
        ("delete", 2),
        ("delete", 2),
        ("delete", 1),
    ]
    a = SimStore()
    one, two = malware("stays"), malware("renamed")
    a.upsert(one)
    a.upsert(two)
    new_id = f"malware--{uuid.uuid5(uuid.NAMESPACE_DNS, 'renamed twice')}"
    a.update(two["id"], set={"name": "renamed twice"}, new_id=new_id)
    pushes = list(plan_pushes(events_since(a)[0]))
    assert [[o["id"] for o in p.objects] for p in pushes] == [[one["id"], two["id"]], [new_id]]


def test_a_copy_of_a_renamed_object_finds_it_by_its_old_id(platform_b: SimServer) -> None:
    """B holds the object under its old standard id; the stream sends it renamed as a copy (a
    dependency re-send, a recovery copy: a create, no reverse patch), the old id among its
    aliases. B does not know the new id: the alias is how the upsert finds the entity, so it is
    kept (no duplicate under the new id)."""
    a = SimStore()
    x = malware("before the rename")
    a.upsert(x)
    events, pos = events_since(a)
    sink = make_target(platform_b.url)
    try:
        sink.write(batch_of(events))
        new_id = f"malware--{uuid.uuid5(uuid.NAMESPACE_DNS, 'after the rename')}"
        a.update(x["id"], set={"name": "after the rename"}, new_id=new_id)
        renamed = a.get(new_id)
        assert renamed is not None and x["id"] in octi_ext(renamed)["stix_ids"]
        (update,), _ = events_since(a, pos)
        sink.write(batch_of([copy_event(update.id_text, renamed)]))
        assert platform_b.store.object_count == 1
        assert_same_state(a.dump_bundle(), platform_b.store.dump_bundle())
    finally:
        sink.close()


def test_ids_past_a_hundred_are_all_looked_up(platform_b: SimServer) -> None:
    """Ids are asked ``stix_lookup.BATCH`` (100) per query: every one of 250 is asked and
    answered (one left out per query would read as an object the target does not hold)."""
    ids = [malware(f"looked up {n}")["id"] for n in range(250)]
    for n in range(250):
        platform_b.store.upsert(malware(f"looked up {n}"))
    sink = make_target(platform_b.url)
    try:
        assert sink.resolve_ids(ids) == {i: i for i in ids}
    finally:
        sink.close()


def test_a_later_batch_moves_the_mark_and_a_replay_of_it_is_guarded(platform_b: SimServer) -> None:
    """Each batch that goes further moves the mark saved on B: the restart after a kill during
    the second batch (killed after its pushes, before the checkpoint) guards that batch too."""
    a, _, _ = _updated_then_merged()
    events, _ = events_since(a)
    assert [e.event for e in events[2:]] == ["update", "merge"]
    cid = str(uuid.uuid4())
    sink = make_target(platform_b.url, connector_id=cid)
    try:
        sink.write(batch_of(events[:2]))
        sink.write(batch_of(events[2:]))
        state = platform_state(platform_b.store).connectors[cid]["connector_state"]
        assert orjson.loads(state)["pushing_to"] == events[-1].id_text
        again = make_target(platform_b.url, connector_id=cid)
        try:
            again.write(batch_of(events[2:]))
            assert_same_state(a.dump_bundle(), platform_b.store.dump_bundle())
        finally:
            again.close()
    finally:
        sink.close()


def test_an_unregistered_connectors_batches_are_all_guarded(platform_b: SimServer) -> None:
    """Without registration (the connector registered on B by other means) B keeps no mark
    for this connector: any batch may be a replay."""
    a, _, _ = _updated_then_merged()
    events, _ = events_since(a)
    cid = str(uuid.uuid4())
    registered = make_target(platform_b.url, connector_id=cid)
    registered.check()
    registered.close()
    first = make_target(platform_b.url, connector_id=cid, register=False)
    again = make_target(platform_b.url, connector_id=cid, register=False)
    try:
        first.write(batch_of(events))
        again.write(batch_of(events[2:]))  # the update of the merged source, and the merge
        assert_same_state(a.dump_bundle(), platform_b.store.dump_bundle())
    finally:
        first.close()
        again.close()


def test_an_id_change_finds_the_entity_by_its_previous_id_the_data_no_longer_names(
    platform_b: SimServer,
) -> None:
    """The update that changes a standard id, its data without the old id among its aliases:
    the push carries it (from the reverse patch), so B renames its entity, no duplicate."""
    old = malware("named before")
    new_id = f"malware--{uuid.uuid5(uuid.NAMESPACE_DNS, 'named after')}"
    envelope = {
        "version": "4",
        "type": "update",
        "scope": "external",
        "data": {**old, "id": new_id, "name": "named after"},
        "message": "update",
        "origin": {},
        "context": {"reverse_patch": [{"op": "replace", "path": "/id", "value": old["id"]}]},
    }
    update = StreamEvent.from_sse("2000-0", "update", json.dumps(envelope))
    sink = make_target(platform_b.url)
    try:
        sink.write(batch_of([_event(1000, old)]))
        sink.write(batch_of([update]))
    finally:
        sink.close()
    assert platform_b.store.object_count == 1
    moved = platform_b.store.get(new_id)
    assert moved is not None and platform_b.store.get(old["id"]) == moved


def test_restores_pushes_and_deletes_go_whole_in_bounded_requests(platform_b: SimServer) -> None:
    """``push_objects`` and ``delete_ids`` (a restore) cut their lists by max_bundle_objects and
    send every object of each piece."""
    five = [malware(f"restored {n}") for n in range(5)]
    sink = make_target(platform_b.url, max_bundle_objects=2)
    try:
        sink.push_objects(five)
        assert all(platform_b.store.get(m["id"]) is not None for m in five)
        sink.delete_ids([m["id"] for m in five])
        assert [m["id"] for m in five if platform_b.store.get(m["id"]) is not None] == []
    finally:
        sink.close()


def _merge_event(ms: int, into: dict[str, Any], sources: list[dict[str, Any]]) -> StreamEvent:
    envelope = {
        "version": "4",
        "type": "merge",
        "scope": "external",
        "data": into,
        "message": "merge",
        "origin": {},
        "context": {"sources": sources},
    }
    return StreamEvent.from_sse(f"{ms}-0", "merge", json.dumps(envelope))


def _with_aliases(stix: dict[str, Any], aliases: list[str]) -> dict[str, Any]:
    return {**stix, "extensions": {OCTI_EXT: {"stix_ids": aliases}}}


def test_no_upsert_before_merges_carries_any_id_of_their_sources() -> None:
    """An absorber sent ahead of two merges into it, with every id of their sources as aliases
    (a source's own alias too, left by an earlier rename): its upsert carries none of them, or
    B would find a source under it; each merge brings its ids back."""
    renamed_away = malware("first source, before its rename")["id"]
    one = _with_aliases(malware("first source"), [renamed_away])
    two = malware("second source")
    x = malware("absorber")
    ahead = _with_aliases(x, [one["id"], renamed_away, two["id"]])
    events = [
        _event(1000, ahead),
        _merge_event(2000, _with_aliases(x, [one["id"], renamed_away]), [one]),
        _merge_event(3000, ahead, [two]),
    ]
    first = next(iter(plan_pushes(events)))
    assert first.kind == "upsert" and [o["id"] for o in first.objects] == [x["id"]]
    assert not octi_ext(first.objects[0]).get("stix_ids")
