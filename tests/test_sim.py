"""The stream simulator against the protocol doc: real HTTP (httpx) to a SimServer on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import orjson
import pytest

from connector.events import OCTI_EXT
from connector.sim.filters import match_filter_group
from connector.sim.generator import bulk_creates, generate
from connector.sim.server import SimServer, parse_position
from connector.sim.store import SimStore, iso_ms, parse_date_ms, split_key

SEED = Path(__file__).parent / "data" / "seed"
AUTH = {"Authorization": "Bearer sim-token"}
GREEN = "marking-definition--bab4a63c-aed9-4cf5-a766-dfca5abac2bb"
RED = "marking-definition--e828b405-8fb5-4a3a-9ab3-6a9a2c7e1f66"

Msg = tuple[str | None, str, Any]  # (id, event, parsed data)


def _seed(name: str) -> dict[str, Any]:
    raw = orjson.loads((SEED / name).read_bytes())
    return raw if isinstance(raw, dict) else {"type": "bundle", "objects": raw}


def _parse(block: bytes) -> Msg:
    fields: dict[str, str] = {}
    for line in block.split(b"\n"):
        name, _, value = line.partition(b": ")
        fields[name.decode()] = value.decode()
    return fields.get("id"), fields["event"], orjson.loads(fields["data"])


def read_stream(
    url: str,
    *,
    headers: dict[str, str] | None = None,
    until: Callable[[list[Msg]], bool] | None = None,
) -> list[Msg]:
    """Read SSE messages until ``until`` holds (default: the first heartbeat = caught up)."""
    stop = until or (lambda msgs: msgs[-1][1] == "heartbeat")
    msgs: list[Msg] = []
    buf = b""
    with httpx.stream("GET", url, headers=headers or AUTH, timeout=10) as resp:
        assert resp.status_code == 200, resp.reason_phrase
        for chunk in resp.iter_bytes():
            buf += chunk
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                msgs.append(_parse(block))
                if stop(msgs):
                    return msgs
    return msgs


def data_msgs(msgs: list[Msg]) -> list[Msg]:
    return [m for m in msgs if m[1] in ("create", "update", "merge", "delete")]


def obj(kind: str, n: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "id": f"{kind}--00000000-0000-4000-8000-{n:012d}",
        "name": f"{kind} {n}",
        **extra,
    }


def marking(mid: str, name: str) -> dict[str, Any]:
    return {"type": "marking-definition", "id": mid, "name": name, "definition_type": "TLP"}


@pytest.fixture
def sim() -> Iterator[SimServer]:
    server = SimServer(
        heartbeat_secs=0.2, restricted_token="restricted-token", restricted_markings=[GREEN]
    ).start()
    try:
        yield server
    finally:
        server.stop()


def test_connected_fields_headers_and_heartbeat(sim: SimServer) -> None:
    last = sim.store.create(obj("malware", 1))
    assert last is not None
    with httpx.stream("GET", f"{sim.url}/stream/live?from={last}", headers=AUTH) as resp:
        assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert resp.headers["cache-control"] == "no-cache, no-transform"
        assert resp.headers["access-control-allow-origin"] == "*"
    msgs = read_stream(f"{sim.url}/stream/live?from={last}")
    first_id, event, info = msgs[0]
    assert (first_id, event) == (None, "connected")
    assert info["lastEventId"] == last and info["firstEventId"] == last
    assert info["streamSize"] == 1 and len(info["connectionId"]) == 36
    assert info["firstEventDate"] == iso_ms(int(last.split("-")[0]))
    hb_id, hb_event, hb_data = msgs[1]
    assert hb_event == "heartbeat" and hb_id is not None
    ms, seq = (int(x) for x in hb_id.split("-"))
    assert (ms, seq) >= tuple(int(x) for x in last.split("-"))
    assert hb_data == iso_ms(ms)  # a JSON string holding the id's date


def test_replay_strictly_after_from_on_raw_and_live(sim: SimServer) -> None:
    ids = [sim.store.create(obj("malware", i)) for i in range(5)]
    for path in ("/stream", "/stream/live"):
        got = data_msgs(read_stream(f"{sim.url}{path}?from={ids[1]}"))
        assert [m[0] for m in got] == ids[2:]
    # Last-Event-ID is used when there is no from; query from wins over the header.
    for path in ("/stream", "/stream/live"):
        last = {**AUTH, "Last-Event-ID": ids[3]}
        got = data_msgs(read_stream(f"{sim.url}{path}", headers=last))
        assert [m[0] for m in got] == ids[4:]
        got = data_msgs(read_stream(f"{sim.url}{path}?from={ids[0]}", headers=last))
        assert [m[0] for m in got] == ids[1:]
    # Raw stream does not fill event_id; the live stream does, from updated_at.
    raw = data_msgs(read_stream(f"{sim.url}/stream?from=0"))
    live = data_msgs(read_stream(f"{sim.url}/stream/live?from=0-0"))
    assert "event_id" not in raw[0][2]
    updated = parse_date_ms(live[0][2]["data"]["extensions"][OCTI_EXT]["updated_at"])
    assert live[0][2]["event_id"] == f"{updated}-0"


def test_position_parsing_rules() -> None:
    assert parse_position("0") == (0, 0) and parse_position("0-0") == (0, 0)
    assert parse_position("1739355612345-3") == (1739355612345, 3)
    assert parse_position("2024-01") == (2024, 1)  # the platform's bogus-id pitfall
    assert parse_position("2025-02-12T10:20:12.000Z") == (1739355612000, 0)
    assert parse_position("2025-02-12") == (1739318400000, 0)
    assert parse_position("1739355612345") is None  # bare ms rejected
    assert parse_position("garbage") is None and parse_position("") is None


def test_recover_snapshot_then_live(sim: SimServer) -> None:
    store = sim.store
    store.load_bundle(_seed("DATA-TEST-STIX2_v2.json"))
    upd = store.create(obj("malware", 99))
    recover = iso_ms(store.now_ms() + 5000)
    url = f"{sim.url}/stream/live?from=2015-01-01T00:00:00.000Z&recover={recover}"
    msgs = data_msgs(read_stream(url))
    init = [m for m in msgs if m[2]["origin"].get("referer") == "init-create"]
    assert init and all(m[1] == "create" for m in init)
    sent: set[str] = set()
    order: list[tuple[int, str]] = []
    for msg_id, _, env in msgs:
        data = env["data"]
        octi = data["extensions"][OCTI_EXT]
        if env["origin"].get("referer") == "init-create":
            ms = parse_date_ms(octi["updated_at"])
            assert msg_id == f"{ms}-0"
            assert set(env) == {"data", "message", "origin", "version"}
            order.append((ms or 0, octi["id"]))
        for ref in (data.get("created_by_ref"), *(data.get("object_marking_refs") or [])):
            if ref and store.get(ref) is not None:
                assert ref in sent, f"{data['id']} sent before its ref {ref}"
        sent.add(data["id"])
    assert order == sorted(order)
    assert {o["id"] for o in store.objects()} <= sent
    # The live part starts after the recover id, so the malware comes once, from the snapshot.
    assert upd is not None
    assert all(m[2]["origin"].get("referer") for m in msgs)
    assert [m[2]["data"].get("name") for m in msgs].count("malware 99") == 1


def test_recover_needs_from_and_no_recover_fault(sim: SimServer) -> None:
    sim.store.create(obj("malware", 1))
    resp = httpx.get(f"{sim.url}/stream/live?recover=2030-01-01T00:00:00Z", headers=AUTH)
    assert resp.status_code == 500 and resp.content == b""
    assert resp.reason_phrase == (
        "Error in stream live: Recovery mode is only possible with a start date."
    )
    sim.set_fault(no_recover=True, consumer_metrics=True)
    msgs = read_stream(
        f"{sim.url}/stream/live?from=0&recover={iso_ms(sim.store.now_ms())}",
        until=lambda m: m[-1][1] == "consumer_metrics",
    )
    names = [m[1] for m in msgs]
    assert names[1] == "no-recover" and msgs[1][0] is not None
    assert "heartbeat" in names and msgs[-1][0] is not None


def test_dependencies_first_with_trigger_id(sim: SimServer) -> None:
    store = sim.store
    store.create(marking(GREEN, "TLP:GREEN"))
    org = {
        "type": "identity",
        "id": "identity--00000000-0000-4000-8000-000000000001",
        "name": "ACME",
        "identity_class": "organization",
    }
    before = store.create(org)
    trigger = store.create(obj("malware", 1, object_marking_refs=[GREEN], created_by_ref=org["id"]))
    msgs = data_msgs(read_stream(f"{sim.url}/stream/live?from={before}"))
    assert [m[0] for m in msgs] == [trigger] * 3
    deps, main = msgs[:2], msgs[2]
    assert {m[2]["data"]["id"] for m in deps} == {GREEN, org["id"]}
    for _, event, env in deps:
        assert event == "create" and env["origin"] == {"referer": "init-dependencies"}
        assert not {"type", "scope", "context", "event_id"} & set(env)
    assert main[2]["type"] == "create" and "event_id" in main[2]


def _two_and_their_relation(
    store: SimStore, **extra: Any
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], str]:
    """An intrusion set, a malware and a ``uses`` relationship between them (with ``extra``):
    the three objects and the relationship's event id."""
    a, b = obj("intrusion-set", 1), obj("malware", 2)
    store.create(a)
    store.create(b)
    rel = {
        "type": "relationship",
        "id": "relationship--00000000-0000-4000-8000-000000000009",
        "relationship_type": "uses",
        "source_ref": a["id"],
        "target_ref": b["id"],
        **extra,
    }
    return a, b, rel, store.create(rel)


def test_relations_expansion_and_no_dependencies(sim: SimServer) -> None:
    store = sim.store
    a, b, rel, before = _two_and_their_relation(store)
    store.update(a["id"], set={"description": "changed"})
    full = data_msgs(read_stream(f"{sim.url}/stream/live?from={before}"))
    # a is first sent as a dependency of the relation, then b, the relation, then the update.
    assert [(m[1], m[2]["data"]["id"]) for m in full] == [
        ("create", a["id"]),
        ("create", b["id"]),
        ("create", rel["id"]),
        ("update", a["id"]),
    ]
    assert len({m[0] for m in full}) == 1
    bare = data_msgs(read_stream(f"{sim.url}/stream/live?from={before}&no-dependencies=true"))
    assert [(m[1], m[2]["data"]["id"]) for m in bare] == [("update", a["id"])]
    # Precedence: query "false" beats header "true" (JS ||); "True" is not "true".
    hdr = {**AUTH, "no-dependencies": "true"}
    q = data_msgs(
        read_stream(f"{sim.url}/stream/live?from={before}&no-dependencies=false", headers=hdr)
    )
    assert len(q) == 4
    assert len(data_msgs(read_stream(f"{sim.url}/stream/live?from={before}", headers=hdr))) == 1


def test_listen_delete_false_and_inferences(sim: SimServer) -> None:
    store = sim.store
    inferred = obj("malware", 5, extensions={OCTI_EXT: {"is_inferred": True}})
    start = store.create(obj("malware", 1))
    store.create(inferred)
    store.delete(obj("malware", 1)["id"])
    default = data_msgs(read_stream(f"{sim.url}/stream/live?from={start}"))
    assert [m[1] for m in default] == ["delete"]
    assert data_msgs(read_stream(f"{sim.url}/stream/live?from={start}&listen-delete=false")) == []
    inf = data_msgs(read_stream(f"{sim.url}/stream/live?from={start}&with-inferences=true"))
    assert [m[1] for m in inf] == ["create", "delete"]
    assert [m[1] for m in data_msgs(read_stream(f"{sim.url}/stream?from={start}"))] == [
        "create",
        "delete",
    ]


def test_update_patch_round_trip_and_id_change() -> None:
    store = SimStore()
    store.load_bundle(_seed("poisonivy.json"))
    target = next(o for o in store.objects() if o["type"] == "malware")
    before = store.get(target["id"])
    new_id = "malware--11111111-2222-4333-8444-555555555555"
    eid = store.update(
        target["id"], set={"description": "x\u2028y", "labels": ["a"]}, new_id=new_id
    )
    assert eid is not None and store.get(new_id) is store.get(target["id"])
    frame = store.read(store.bounds()[1] - 1).frames[0]
    assert "\u2028".encode() in frame  # raw U+2028 kept in the single data line
    env = orjson.loads(frame.split(b"\ndata: ", 1)[1])
    ctx = env["context"]
    assert set(ctx) == {"patch", "reverse_patch", "related_restrictions", "pir_ids", "changes"}
    assert jsonpatch.apply_patch(env["data"], ctx["reverse_patch"]) == before
    assert jsonpatch.apply_patch(before, ctx["patch"]) == env["data"]
    assert {"op": "replace", "path": "/id", "value": target["id"]} in ctx["reverse_patch"]
    assert target["id"] in env["data"]["extensions"][OCTI_EXT]["stix_ids"]
    # Relationships pointing at the object follow the new id silently.
    assert all(
        r["source_ref"] != target["id"] and r["target_ref"] != target["id"]
        for r in store.objects()
        if r["type"] == "relationship"
    )
    # No-op upsert: no event (loop avoidance); stale event id: skipped.
    count = store.event_count
    assert store.upsert(store.get(new_id) or {}) is None
    assert store.upsert({**(store.get(new_id) or {}), "description": "old"}, event_id="1-0") is None
    assert store.event_count == count
    assert store.upsert({"id": target["id"], "type": "malware", "description": "z"}) is not None


def test_upsert_previous_standard_and_synchronized() -> None:
    store = SimStore()
    store.create(obj("malware", 1, labels=["a", "b"], description="d"))
    moved = {
        "type": "malware",
        "id": "malware--99999999-0000-4000-8000-000000000000",
        "name": "renamed",
        "labels": ["c"],
    }
    assert store.upsert(moved, previous_standard=obj("malware", 1)["id"]) is not None
    cur = store.get(moved["id"])
    assert cur is not None and cur["labels"] == ["a", "b", "c"] and cur["description"] == "d"
    assert obj("malware", 1)["id"] in cur["extensions"][OCTI_EXT]["stix_ids"]  # the old id kept
    assert store.upsert({**moved, "labels": ["c"]}, synchronized=True) is not None
    cur = store.get(moved["id"])
    assert cur is not None and cur["labels"] == ["c"] and "description" not in cur
    assert store.object_count == 1
    # isOutdatedUpdate: skipped only when the stored version is later than the event's time,
    # so a second event of the same millisecond applies.
    ms = 1_800_000_000_000
    assert store.upsert({**moved, "name": "v1"}, event_id=f"{ms}-0") is not None
    assert store.upsert({**moved, "name": "v2"}, event_id=f"{ms}-1") is not None
    assert store.upsert({**moved, "name": "v0"}, event_id=f"{ms - 1}-0") is None
    assert (store.get(moved["id"]) or {})["name"] == "v2"


def test_merge_and_delete_store_semantics() -> None:
    store = SimStore()
    t, s1, s2, ind = (
        obj("intrusion-set", 1),
        obj("intrusion-set", 2),
        obj("intrusion-set", 3),
        obj("indicator", 4, pattern="[ipv4-addr:value = '1.2.3.4']", pattern_type="stix"),
    )
    for o in (t, s1, s2, ind):
        store.create(o)
    rel = {
        "type": "relationship",
        "id": "relationship--00000000-0000-4000-8000-000000000077",
        "relationship_type": "indicates",
        "source_ref": ind["id"],
        "target_ref": s1["id"],
    }
    store.create(rel)
    report = {
        "type": "report",
        "id": "report--00000000-0000-4000-8000-000000000078",
        "name": "r",
        "object_refs": [s2["id"], ind["id"], rel["id"]],
    }
    store.create(report)
    count = store.event_count
    assert store.merge(t["id"], [s1["id"], s2["id"], "intrusion-set--unknown"]) is not None
    assert store.event_count == count + 1  # one merge event, no re-pointing events
    env = orjson.loads(store.read(store.bounds()[1] - 1).frames[0].split(b"\ndata: ", 1)[1])
    assert env["type"] == "merge"
    assert [s["id"] for s in env["context"]["sources"]] == [s1["id"], s2["id"]]
    assert jsonpatch.apply_patch(env["data"], env["context"]["reverse_patch"])["id"] == t["id"]
    merged = store.get(t["id"])
    assert merged is not None and store.get(s1["id"]) is merged
    assert {s1["id"], s2["id"]} <= set(merged["extensions"][OCTI_EXT]["stix_ids"])
    assert (store.get(rel["id"]) or {})["target_ref"] == t["id"]
    rel_ext = (store.get(rel["id"]) or {})["extensions"][OCTI_EXT]
    assert rel_ext["target_ref"] == merged["extensions"][OCTI_EXT]["id"]  # the target's own
    assert (store.get(report["id"]) or {})["object_refs"] == [t["id"], ind["id"], rel["id"]]
    assert store.object_count == 4
    # A merge whose sources name only the target (an id it absorbed) does nothing.
    count = store.event_count
    assert store.merge(t["id"], [s1["id"]]) is None and store.event_count == count
    assert store.get(t["id"]) is merged
    # delete: one event; the relationship goes, the report loses its refs, silently.
    count = store.event_count
    assert store.delete(ind["id"]) is not None
    assert store.event_count == count + 1
    assert store.get(rel["id"]) is None
    assert (store.get(report["id"]) or {})["object_refs"] == [t["id"]]
    assert store.delete("malware--nope") is None and store.merge("x--y", [t["id"]]) is None


def test_trim_moves_first_event_id(sim: SimServer) -> None:
    ids = [sim.store.create(obj("malware", i)) for i in range(6)]
    sim.store.trim(2)
    info = read_stream(f"{sim.url}/stream/live", until=lambda m: True)[0][2]
    assert info["firstEventId"] == ids[4] and info["streamSize"] == 2
    got = data_msgs(read_stream(f"{sim.url}/stream?from=0"))
    assert [m[0] for m in got] == ids[4:]
    small = SimStore(trim=3)
    for i in range(10):
        small.create(obj("malware", i))
    assert small.event_count == 3


def test_error_statuses_and_reasons(sim: SimServer) -> None:
    def get(path: str, token: str | None = "sim-token") -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(f"{sim.url}{path}", headers=headers)

    resp = get("/stream/live")
    assert (resp.status_code, resp.reason_phrase) == (500, "Error in stream live: ERR no such key")
    sim.store.create(obj("malware", 1))
    sim.add_stream("stopped", live=False)
    cases = [
        ("/stream", None, 401, "You are not authenticated, please check your credentials"),
        ("/stream", "wrong", 401, "You are not authenticated, please check your credentials"),
        (
            "/stream",
            "restricted-token",
            401,
            "Consume generic stream is only authorized for bypass user",
        ),
        (
            "/stream/live",
            "restricted-token",
            401,
            "You are not authorized, please check your credentials",
        ),
        ("/stream/live", None, 401, "You are not authenticated, please check your credentials"),
        (
            "/stream/unknown",
            "sim-token",
            401,
            "You are not authorized, please check your credentials",
        ),
        ("/stream/stopped", None, 410, "This live stream is stopped"),
    ]
    for path, token, status, reason in cases:
        resp = get(path, token)
        assert (resp.status_code, resp.reason_phrase, resp.content) == (status, reason, b"")
    sim.set_fault(fail_next={"status": 503, "count": 2})
    assert get("/stream/live").status_code == 503
    assert get("/stream").status_code == 503
    assert read_stream(f"{sim.url}/stream/live", until=lambda m: True)[0][1] == "connected"


def _marked(*markings: str) -> dict[str, Any]:
    return {
        "mode": "and",
        "filterGroups": [],
        "filters": [
            {"key": ["objectMarking"], "values": list(markings), "operator": "eq", "mode": "or"}
        ],
    }


def test_restricted_token_sees_only_allowed_markings(sim: SimServer) -> None:
    store = sim.store
    store.create(marking(GREEN, "TLP:GREEN"))
    store.create(marking(RED, "TLP:RED"))
    store.create(obj("malware", 1, object_marking_refs=[GREEN]))
    store.create(obj("malware", 2, object_marking_refs=[RED]))
    store.create(obj("malware", 3))
    store.create(obj("malware", 4, object_marking_refs=[GREEN, RED]))  # every marking needed
    sim.add_stream("all")
    headers = {"Authorization": "Bearer restricted-token"}
    got = data_msgs(read_stream(f"{sim.url}/stream/all?from=0", headers=headers))
    names = [m[2]["data"].get("name") for m in got]
    assert names == ["TLP:GREEN", "malware 1", "malware 3"]
    # A collection filtering on markings is readable with any one of them (§1.3: 401 only
    # when the user can access none of those markings).
    sim.add_stream("green-or-red", filters=_marked(GREEN, RED))
    assert read_stream(f"{sim.url}/stream/green-or-red", headers=headers, until=bool)[0][1] == (
        "connected"
    )
    sim.add_stream("red-only", filters=_marked(RED))
    resp = httpx.get(f"{sim.url}/stream/red-only", headers=headers)
    assert resp.reason_phrase == "You need to have access to specific markings for this live stream"


def test_collection_filters_and_translation(sim: SimServer) -> None:
    store = sim.store
    store.create(marking(GREEN, "TLP:GREEN"))
    store.create(marking(RED, "TLP:RED"))
    start = store.create(obj("intrusion-set", 1, object_marking_refs=[GREEN]))
    store.create(obj("malware", 1, object_marking_refs=[RED]))
    store.update(obj("malware", 1)["id"], set={"object_marking_refs": [GREEN]})  # now visible
    store.update(obj("malware", 1)["id"], set={"description": "still visible"})
    store.update(obj("malware", 1)["id"], set={"object_marking_refs": [RED]})  # leaves
    store.create(obj("malware", 2, object_marking_refs=[GREEN]))
    sim.add_stream(
        "green-malware",
        filters={
            "mode": "and",
            "filterGroups": [],
            "filters": [
                {"key": ["entity_type"], "values": ["Malware"], "operator": "eq", "mode": "or"},
                {"key": ["objectMarking"], "values": [GREEN], "operator": "eq", "mode": "or"},
            ],
        },
    )
    got = data_msgs(
        read_stream(f"{sim.url}/stream/green-malware?from={start}&no-dependencies=true")
    )
    main = [
        (m[1], m[2].get("type"), m[2]["data"]["name"])
        for m in got
        if m[2]["origin"].get("referer") != "init-dependencies"
    ]
    assert main == [
        ("create", "update", "malware 1"),  # became visible: create carrying the update JSON
        ("update", "update", "malware 1"),
        ("delete", "update", "malware 1"),  # left the filter: delete carrying the update JSON
        ("create", "create", "malware 2"),
    ]
    translated_delete = next(m for m in got if m[1] == "delete")
    assert translated_delete[2]["context"]["patch"]
    # listen-delete=false: leaving the filter sends nothing either.
    url = f"{sim.url}/stream/green-malware?from={start}&no-dependencies=true&listen-delete=false"
    quiet = [m for m in data_msgs(read_stream(url)) if m[2]["origin"].get("referer") is None]
    assert [m[1] for m in quiet] == ["create", "update", "create"]


def test_inject_raw_is_verbatim(sim: SimServer) -> None:
    sim.store.create(obj("malware", 1))
    raw = "id: 1-0\nevent: create\ndata: {not json \u2028}\n\n"
    sim.store.append_raw(raw)
    with httpx.stream("GET", f"{sim.url}/stream?from=0", headers=AUTH) as resp:
        buf = b""
        for chunk in resp.iter_bytes():
            buf += chunk
            if b"heartbeat" in buf:
                break
    assert raw.encode() in buf


def test_drop_connections_and_drop_fault(sim: SimServer) -> None:
    for i in range(5):
        sim.store.create(obj("malware", i))
    sim.set_fault(drop_after_events=2)
    got: list[bytes] = []
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("GET", f"{sim.url}/stream?from=0", headers=AUTH) as resp:
            for chunk in resp.iter_bytes():
                got.append(chunk)
    assert b"".join(got).count(b"event: create") == 2
    # mid_message: the cut comes inside the next message, half of it sent.
    sim.set_fault(drop_after_events=2, mid_message=True)
    got.clear()
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("GET", f"{sim.url}/stream?from=0", headers=AUTH) as resp:
            for chunk in resp.iter_bytes():
                got.append(chunk)
    body = b"".join(got)
    assert body.count(b"event: create") == 3 and not body.endswith(b"\n\n")
    # One-shot: the next connection is normal; drop_connections cuts it.
    with pytest.raises(httpx.HTTPError):
        with httpx.stream("GET", f"{sim.url}/stream/live?from=0", headers=AUTH) as resp:
            for chunk in resp.iter_bytes():
                if b"heartbeat" in chunk:
                    sim.drop_connections()
    # The server still serves after a drop and after a restart on the same port.
    port = sim.port
    sim.restart()
    assert sim.port == port
    assert len(data_msgs(read_stream(f"{sim.url}/stream?from=0"))) == 5


def test_connection_endpoint_and_control_api(sim: SimServer) -> None:
    c = httpx.Client(base_url=sim.url, headers=AUTH)
    assert c.post("/control/create", json={"object": obj("malware", 1)}).json()["event_id"]
    up = c.post("/control/update", json={"id": obj("malware", 1)["id"], "set": {"confidence": 5}})
    assert up.json()["event_id"]
    assert (
        c.post("/control/generate", json={"count": 30, "seed": 1, "mix": "mixed"}).status_code
        == 200
    )
    info = c.get("/control/info").json()
    assert info["event_count"] == 32 and info["object_count"] > 0
    assert c.get("/control/dump").json()["type"] == "bundle"
    assert c.post("/control/delete", json={"id": "malware--none"}).json() == {"event_id": None}
    assert c.post("/control/trim", json={"keep": 10}).json()["event_count"] == 10
    assert c.post("/control/streams", json={"id": "s1", "live": False}).status_code == 200
    assert httpx.get(f"{sim.url}/stream/s1").status_code == 410
    assert httpx.get(f"{sim.url}/control/info").status_code == 401
    assert c.post("/control/nope", json={}).status_code == 404
    assert c.post("/stream/connection/whatever").reason_phrase == "This is not your connection"
    c.close()


def test_generator_determinism_and_size() -> None:
    def run() -> SimStore:
        ticks = iter(range(1_800_000_000_000, 1_900_000_000_000, 3))
        store = SimStore(clock=lambda: next(ticks))
        generate(store, 300, seed=7)
        return store

    a, b = run(), run()
    assert a.event_count == 300
    assert a.dump_bundle() == b.dump_bundle()
    frames = a.read(0, max_bytes=1 << 30).frames
    assert frames == b.read(0, max_bytes=1 << 30).frames
    kinds = a.read(0, max_bytes=1 << 30).kinds
    assert {"create", "update", "merge", "delete"} <= set(kinds)
    sizes = sorted(len(f) for f in frames if b"event: create" in f[:40])
    assert 1000 < sizes[len(sizes) // 2] < 3000
    creates = SimStore()
    # Called again (the control API's generate, same seed): new objects, never the first
    # call's again (as updates, their refs drawn from a larger pool).
    generate(creates, 200, seed=0, mix="creates")
    generate(creates, 200, seed=0, mix="creates")
    assert set(creates.read(0, max_bytes=1 << 30).kinds) == {"create"}
    assert creates.object_count == creates.event_count == 400
    bulk = SimStore()
    bulk_creates(bulk, 5000, seed=3)
    assert bulk.event_count == 5000
    frames = bulk.read(4000, max_bytes=1 << 30).frames
    envs = [orjson.loads(f.split(b"\ndata: ", 1)[1]) for f in frames]
    assert len({e["data"]["id"] for e in envs}) == len(envs)
    assert all(1500 < len(f) < 3000 for f in frames)


def test_cli_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "connector.sim",
            "--port",
            "0",
            "--seed",
            str(SEED / "DATA-TEST-STIX2_v2.json"),
            "--generate",
            "20",
        ],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        assert line.startswith("sim listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        info = httpx.get(f"{url}/control/info", headers=AUTH).json()
        assert info["event_count"] == 67 + 20
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_client_resetting_its_connection_prints_no_traceback(
    sim: SimServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A connector killed while its keep-alive connection waits: the console of ``opencti-sync
    sim`` stays quiet, and the simulator serves on."""
    import socket
    import struct
    import threading
    import time

    def handlers() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if "process_request_thread" in t.name}

    before = handlers()
    host, port = sim.url.split("//")[1].rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"GET /control/info HTTP/1.1\r\nHost: sim\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 ")
        assert handlers() - before, "no handler thread serves the connection"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    # The connection's handler thread reads the reset and ends: only then is the console's
    # verdict in (a fixed sleep could look before it, and pass whatever it would print).
    deadline = time.monotonic() + 30
    while handlers() - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not handlers() - before, "the handler thread never ended"
    assert "Traceback" not in capsys.readouterr().err
    assert httpx.get(f"{sim.url}/control/info").status_code == 401  # answered (no token given)


def _clocked_sim(now: list[int]) -> SimServer:
    """A simulator whose event clock is ``now[0]`` (epoch ms), set by the test."""
    return SimServer(heartbeat_secs=0.2, store=SimStore(clock=lambda: now[0])).start()


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/stream", "from={ahead}"),
        ("/stream/live", "from={ahead}"),
        ("/stream/live", "from=0-0&recover={ahead_iso}"),
    ],
    ids=["raw", "live", "recover"],
)
def test_a_start_id_ahead_of_the_log_skips_what_sorts_below_it(path: str, query: str) -> None:
    """The platform reads strictly after the start id (XREAD), not after a place in the log: from
    an id (or a recover date) ahead of the event clock, what is appended while the clock is
    still below it is never sent (protocol doc §3.1, §5.1 "recover must not be in the future").
    The simulator sent it, hiding that loss from a connector resuming from such an id."""
    now = [1_800_000_000_000]
    sim = _clocked_sim(now)
    try:
        sim.store.create(obj("malware", 1))
        ahead = now[0] + 5_000
        url = sim.url + path + "?" + query.format(ahead=f"{ahead}-0", ahead_iso=iso_ms(ahead))
        appended: list[str | None] = []
        # The reader waits at its start id once connected, or once its recovery is sent (the
        # recovery's snapshot would rightly hold what is appended before it is taken).
        waiting = 2 if "recover" in query else 1

        def append_then_stop(msgs: list[Msg]) -> bool:
            if len(msgs) == waiting:
                now[0] += 1_000
                appended.append(sim.store.create(obj("malware", 2)))  # below the start id
                now[0] = ahead
                appended.append(sim.store.create(obj("malware", 4)))  # the start id itself
                now[0] = ahead + 1
                appended.append(sim.store.create(obj("malware", 3)))  # above it
            return bool(data_msgs(msgs)) and data_msgs(msgs)[-1][2]["origin"].get("referer") is None

        msgs = read_stream(url, until=append_then_stop)
        live = [m for m in data_msgs(msgs) if m[2]["origin"].get("referer") is None]
        assert appended[1] == f"{ahead}-0"
        assert [m[0] for m in live] == [appended[2]]
        names = [m[2]["data"]["name"] for m in data_msgs(msgs)]
        assert "malware 2" not in names and "malware 4" not in names
    finally:
        sim.stop()


def test_a_recover_id_is_used_as_given_for_the_live_part() -> None:
    """``recover=<ms>-<seq>`` starts the live part strictly after that id, as the platform
    passes it to its reader verbatim (``sseMiddleware.js:709``); the simulator started after
    ``<ms>-0``, sending again the same millisecond's events up to it."""
    now = [1_800_000_000_000]
    sim = _clocked_sim(now)
    try:
        ids = [sim.store.create(obj("malware", i)) for i in range(4)]  # <ms>-0 .. <ms>-3
        assert ids[1] == f"{now[0]}-1"
        msgs = data_msgs(read_stream(f"{sim.url}/stream/live?from=0-0&recover={ids[1]}"))
        live = [m[0] for m in msgs if m[2]["origin"].get("referer") != "init-create"]
        assert live == ids[2:]
    finally:
        sim.stop()


@pytest.mark.parametrize("inferences", ["false", "true"])
def test_an_inferred_relationship_is_no_dependency(sim: SimServer, inferences: str) -> None:
    """The relations sent ahead of an element are listed on the non-inferred indices only
    (protocol doc §5.2), with or without ``with-inferences``: a rule's relationship comes only
    as an event of its own. The simulator sent it as an ``init-dependencies`` create."""
    store = sim.store
    a, _, _, before = _two_and_their_relation(store, extensions={OCTI_EXT: {"is_inferred": True}})
    trigger = store.update(a["id"], set={"description": "changed"})
    url = f"{sim.url}/stream/live?from={before}&with-inferences={inferences}"
    assert [(m[0], m[1], m[2]["data"]["id"]) for m in data_msgs(read_stream(url))] == [
        (trigger, "update", a["id"])
    ]


def test_dependency_heartbeats_fault_carries_the_triggers_id(sim: SimServer) -> None:
    """The platform's heartbeat timer may fire between a trigger's dependencies, before the
    trigger itself: its id is the trigger's (protocol doc §2.3)."""
    store = sim.store
    store.create(marking(GREEN, "TLP:GREEN"))
    before = store.create(obj("intrusion-set", 1))
    trigger = store.create(
        obj("malware", 2, object_marking_refs=[GREEN], created_by_ref=obj("intrusion-set", 1)["id"])
    )
    sim.set_fault(dependency_heartbeats=True)
    msgs = read_stream(
        f"{sim.url}/stream/live?from={before}",
        until=lambda m: m[-1][1] == "create" and "event_id" in m[-1][2],
    )
    assert [(m[0], m[1]) for m in msgs[1:]] == [
        (trigger, "create"),
        (trigger, "heartbeat"),
        (trigger, "create"),
        (trigger, "heartbeat"),
        (trigger, "create"),
    ]


def test_live_stream_keeps_versions_from_4_up(sim: SimServer) -> None:
    """The live stream drops events whose ``version`` reads below 4 as a JavaScript
    ``parseInt`` (sseMiddleware.js:591-593): a newer "5" (or a number 4) reaches the client,
    where the simulator sent only the exact string "4". The raw stream sends them all."""
    start = sim.store.create(obj("malware", 0))
    versions: list[Any] = ["3", "5", None, 4, "4"]
    frames = []
    for n, version in enumerate(versions, start=1):
        env: dict[str, Any] = {"type": "create", "scope": "external", "data": obj("malware", n)}
        if version is not None:
            env["version"] = version
        frames.append(("create", orjson.dumps(env)))
    sim.store.append_frames(frames)
    live = data_msgs(read_stream(f"{sim.url}/stream/live?from={start}"))
    assert [m[2].get("version") for m in live] == ["5", 4, "4"]
    raw = data_msgs(read_stream(f"{sim.url}/stream?from={start}"))
    assert [m[2].get("version") for m in raw] == versions


def _labelled(label: str) -> dict[str, Any]:
    return {
        "mode": "and",
        "filterGroups": [],
        "filters": [{"key": ["objectLabel"], "values": [label], "operator": "eq", "mode": "or"}],
    }


def test_a_collection_changed_or_stopped_mid_stream(sim: SimServer) -> None:
    """The platform computes the collection again after every read (protocol doc §1.3): new
    filters apply from the next read, and a stop ends the response cleanly, with no error
    event; the next request gets 410. The simulator kept a connection's first settings."""
    store = sim.store
    start = store.create(obj("malware", 1, labels=["a"]))
    sim.add_stream("s1", filters=_labelled("a"))
    beats = {"seen": 0, "after_stop": 0}
    stopped = []

    def drive(msgs: list[Msg]) -> bool:
        event = msgs[-1][1]
        if stopped:
            beats["after_stop"] += event == "heartbeat"
            return beats["after_stop"] > 25  # still open seconds later: not ended
        if event == "heartbeat":
            beats["seen"] += 1
            if beats["seen"] == 1:
                sim.add_stream("s1", filters=_labelled("b"))
            elif beats["seen"] == 2:  # read again since: the new filters hold
                store.create(obj("malware", 2, labels=["a"]))
                store.create(obj("malware", 3, labels=["b"]))
        elif event == "create":
            sim.add_stream("s1", filters=_labelled("b"), live=False)
            stopped.append(True)
        return False

    msgs = read_stream(f"{sim.url}/stream/s1?from={start}", until=drive)
    assert [m[2]["data"]["name"] for m in data_msgs(msgs)] == ["malware 3"]
    assert stopped and beats["after_stop"] <= 25, "the stream did not end"
    resp = httpx.get(f"{sim.url}/stream/s1", headers=AUTH)
    assert (resp.status_code, resp.reason_phrase) == (410, "This live stream is stopped")


def _hb_ids(msgs: list[Msg]) -> list[str | None]:
    return [m[0] for m in msgs if m[1] == "heartbeat"]


def test_an_idle_heartbeat_is_now_less_a_millisecond_never_below_what_was_sent() -> None:
    """Caught up, a heartbeat carries ``<now - 1 ms>-0``, so an event appended in this very
    millisecond sorts after it, and never an id below the last one sent (three events of one
    millisecond sent: the heartbeat stays at the last of them)."""
    now = [1_800_000_000_000]
    sim = _clocked_sim(now)
    try:
        ids = [sim.store.create(obj("malware", i)) for i in range(3)]
        assert ids[-1] == f"{now[0]}-2"

        def move_the_clock(msgs: list[Msg]) -> bool:
            if len(_hb_ids(msgs)) == 1:
                now[0] += 1_000
            return len(_hb_ids(msgs)) == 2

        beats = _hb_ids(read_stream(f"{sim.url}/stream/live?from=0", until=move_the_clock))
        assert beats == [ids[-1], f"{now[0] - 1}-0"]
        assert sim.store.create(obj("malware", 9)) == f"{now[0]}-0"  # after the heartbeat
    finally:
        sim.stop()


def test_event_ids_never_go_back_with_the_clock() -> None:
    """Redis ids only grow: a clock set back keeps the last millisecond, the sequence goes on."""
    now = [1_800_000_000_000]
    store = SimStore(clock=lambda: now[0])
    first = store.create(obj("malware", 1))
    now[0] -= 60_000
    assert store.create(obj("malware", 2)) == f"{now[0] + 60_000}-1" and first.endswith("-0")


def test_a_reader_keeps_its_place_while_trimming_compacts_the_log() -> None:
    """Positions are absolute: a reader behind the tail reads on from where it was while
    trimming drops (and, past 4096 entries, compacts) the head, and a position trimmed
    meanwhile reads from the first entry retained."""
    small = SimStore(trim=2)
    ids = [small.create(obj("malware", i)) for i in range(5)]
    assert [split_key(k) for k in small.read(0).keys] == ids[3:]
    store = SimStore(trim=3000)
    frame = orjson.dumps({"type": "create", "data": obj("malware", 1)})
    ids = [store.append_frames([("create", frame)]) for _ in range(6000)]
    pos = store.bounds()[1]  # a reader that read the first 6000 entries
    more = [store.append_frames([("create", frame)]) for _ in range(1200)]  # compacts
    assert store.bounds()[0] > 4096
    assert split_key(store.read(pos).keys[0]) == more[0]
    assert split_key(store.read(0).keys[0]) == store.first_event_id
    assert ids[-1] is not None and store.position_after(*map(int, ids[-1].split("-"))) == pos


def test_one_connection_sends_a_dependency_once() -> None:
    """The platform caches what a connection sent: two objects with one marking bring it once,
    ahead of the first (a new connection sends it again)."""
    store = SimStore()
    store.create(marking(GREEN, "TLP:GREEN"))
    start = store.create(obj("malware", 0))
    first = store.create(obj("malware", 1, object_marking_refs=[GREEN]))
    second = store.create(obj("malware", 2, object_marking_refs=[GREEN]))
    with SimServer(store=store, heartbeat_secs=0.2) as sim:
        msgs = data_msgs(read_stream(f"{sim.url}/stream/live?from={start}"))
    assert [(m[0], m[2]["data"]["id"]) for m in msgs] == [
        (first, GREEN),
        (first, obj("malware", 1)["id"]),
        (second, obj("malware", 2)["id"]),
    ]


def test_a_replayed_relationship_whose_endpoint_was_sent_then_deleted_is_sent() -> None:
    """The platform looks in the connection's cache before it loads a ref: replaying history,
    a relationship whose endpoint this connection sent, deleted since, is sent."""
    store = SimStore()
    start = store.create(obj("malware", 0))
    _, b, rel, rel_event = _two_and_their_relation(store)
    store.delete(b["id"])  # the relationship goes with it, silently
    assert store.get(rel["id"]) is None
    with SimServer(store=store, heartbeat_secs=0.2) as sim:
        msgs = data_msgs(read_stream(f"{sim.url}/stream/live?from={start}"))
    assert (rel_event, "create", rel["id"]) in [(m[0], m[1], m[2]["data"]["id"]) for m in msgs]


def test_a_relationship_to_an_object_the_user_cannot_see_is_not_sent(sim: SimServer) -> None:
    """§5.2: a relationship whose endpoint cannot be resolved for the user is dropped."""
    store = sim.store
    store.create(marking(GREEN, "TLP:GREEN"))
    store.create(marking(RED, "TLP:RED"))
    store.create(obj("malware", 1, object_marking_refs=[GREEN]))
    store.create(obj("malware", 2, object_marking_refs=[RED]))
    start = store.create(obj("malware", 3, object_marking_refs=[GREEN]))
    hidden, shown = (
        {
            "type": "relationship",
            "id": f"relationship--00000000-0000-4000-8000-00000000001{n}",
            "relationship_type": "uses",
            "source_ref": obj("malware", 1)["id"],
            "target_ref": obj("malware", n)["id"],
            "object_marking_refs": [GREEN],
        }
        for n in (2, 3)
    )
    store.create(hidden)
    store.create(shown)
    sim.add_stream("all")
    headers = {"Authorization": "Bearer restricted-token"}
    msgs = data_msgs(read_stream(f"{sim.url}/stream/all?from={start}", headers=headers))
    sent = [m[2]["data"]["id"] for m in msgs]
    assert shown["id"] in sent and hidden["id"] not in sent


def test_recovery_keeps_to_its_dates_its_filter_and_inferences() -> None:
    """§5.1: recovery sends what the collection shows, updated in ``[from, recover]`` (the
    recover date included), inferred objects only with ``with-inferences``."""
    now = [1_800_000_000_000]
    sim = _clocked_sim(now)
    try:
        sim.store.create(obj("malware", 1, labels=["a"]))
        inferred = {"extensions": {OCTI_EXT: {"is_inferred": True}}}
        sim.store.create(obj("malware", 2, labels=["a"], **inferred))
        sim.store.create(obj("malware", 3, labels=["b"]))
        sim.add_stream("a", filters=_labelled("a"))
        url = f"{sim.url}/stream/a?from=0&recover={iso_ms(now[0])}"
        for query, names in (
            ("", {"malware 1"}),
            ("&with-inferences=true", {"malware 1", "malware 2"}),
        ):
            msgs = data_msgs(read_stream(url + query))
            init = {
                m[2]["data"]["name"] for m in msgs if m[2]["origin"].get("referer") == "init-create"
            }
            assert init == names
    finally:
        sim.stop()


def test_a_collection_sends_nothing_of_what_its_filter_keeps_out(sim: SimServer) -> None:
    """Out of the filter: an update of an object no visible container holds, a relationship
    none of whose endpoints is in the filter, a delete. Only what it keeps is sent."""
    store = sim.store
    for n in (1, 2, 5):
        store.create(obj("malware", n))
    start = store.create(obj("malware", 3, labels=["keep"]))
    store.update(obj("malware", 1)["id"], set={"description": "edited"})
    store.create(
        {
            "type": "relationship",
            "id": "relationship--00000000-0000-4000-8000-000000000021",
            "relationship_type": "uses",
            "source_ref": obj("malware", 1)["id"],
            "target_ref": obj("malware", 2)["id"],
        }
    )
    store.delete(obj("malware", 5)["id"])
    last = store.create(obj("malware", 4, labels=["keep"]))
    sim.add_stream("keep", filters=_labelled("keep"))
    msgs = data_msgs(read_stream(f"{sim.url}/stream/keep?from={start}"))
    assert [(m[0], m[1]) for m in msgs] == [(last, "create")]


def test_a_delete_clears_the_refs_that_name_the_object() -> None:
    """A delete is one event; what names the object loses the ref silently (§8.4): an author
    (``created_by_ref``) and a sharing (the extension's ``granted_refs``); a sighting where it
    was seen goes with it."""
    store = SimStore()
    org = {"type": "identity", "id": "identity--00000000-0000-4000-8000-000000000031", "name": "o"}
    store.create(org)
    store.create(obj("malware", 1, created_by_ref=org["id"]))
    store.create(obj("malware", 2, extensions={OCTI_EXT: {"granted_refs": [org["id"]]}}))
    sighting = {
        "type": "sighting",
        "id": "sighting--00000000-0000-4000-8000-000000000032",
        "sighting_of_ref": obj("malware", 1)["id"],
        "where_sighted_refs": [org["id"]],
    }
    store.create(sighting)
    store.delete(org["id"])
    assert store.get(sighting["id"]) is None  # where it was seen is gone: the sighting too
    assert "created_by_ref" not in (store.get(obj("malware", 1)["id"]) or {})
    octi = (store.get(obj("malware", 2)["id"]) or {})["extensions"][OCTI_EXT]
    assert org["id"] not in octi.get("granted_refs", [])


def test_an_object_created_again_after_its_delete_is_a_new_entity() -> None:
    """The platform gives every creation a fresh internal id: one deleted then created again
    is another entity (its files, its history), not the old one back."""
    store = SimStore()
    store.create(obj("malware", 1))
    before = (store.get(obj("malware", 1)["id"]) or {})["extensions"][OCTI_EXT]["id"]
    store.delete(obj("malware", 1)["id"])
    store.create(obj("malware", 1))
    after = (store.get(obj("malware", 1)["id"]) or {})["extensions"][OCTI_EXT]["id"]
    assert after != before


def test_a_seeded_relationship_with_an_unknown_endpoint_is_refused() -> None:
    """The platform refuses a relationship whose endpoint it does not hold (MISSING_REFERENCE):
    never part of the state, no event."""
    store = SimStore()
    rel = {
        "type": "relationship",
        "id": "relationship--00000000-0000-4000-8000-000000000041",
        "relationship_type": "uses",
        "source_ref": obj("malware", 1)["id"],
        "target_ref": obj("malware", 2)["id"],
    }
    assert store.load_bundle([obj("malware", 1), rel]) == 1
    assert store.skipped_on_load == 1 and store.get(rel["id"]) is None and store.event_count == 1


def test_filter_keys_operators_modes_and_groups() -> None:
    """The filter subset the collections use (§5.3), on stored objects: abstract entity types,
    markings named by internal id, negated operators, ``and`` values, ``or`` groups, nested
    groups."""
    store = SimStore()
    store.create(marking(GREEN, "TLP:GREEN"))
    store.create(obj("malware", 1, labels=["a"], object_marking_refs=[GREEN]))
    store.create(obj("malware", 2))
    store.create(
        {
            "type": "relationship",
            "id": "relationship--00000000-0000-4000-8000-000000000051",
            "relationship_type": "uses",
            "source_ref": obj("malware", 1)["id"],
            "target_ref": obj("malware", 2)["id"],
        }
    )

    def f(key: str, *values: str, operator: str = "eq", mode: str = "or") -> dict[str, Any]:
        return {"key": [key], "values": list(values), "operator": operator, "mode": mode}

    def group(*filters: dict[str, Any], mode: str = "and", groups: Any = ()) -> dict[str, Any]:
        return {"mode": mode, "filters": list(filters), "filterGroups": list(groups)}

    green_iid = store.resolve_internal(GREEN)
    assert green_iid is not None
    cases = [
        ("relationship", group(f("entity_type", "stix-core-relationship")), True),
        ("malware 1", group(f("objectMarking", green_iid)), True),
        ("malware 1", group(f("objectLabel", "a", operator="not_eq")), False),
        ("malware 1", group(f("objectLabel", "b", operator="not_eq")), True),
        ("malware 1", group(f("objectLabel", "a", "b", mode="and")), False),
        ("malware 1", group(f("objectLabel", "b"), f("objectLabel", "a"), mode="or"), True),
        ("malware 1", group(f("objectLabel", "a"), groups=[group(f("objectLabel", "z"))]), False),
    ]
    for name, flt, expected in cases:
        stix = next(o for o in store.objects() if o.get("name", o["type"]) == name)
        assert match_filter_group(flt, stix, store.resolve_internal) is expected, (name, flt)


def test_mixed_traffic_changes_standard_ids() -> None:
    """A mixed stream carries renames (an update replacing ``/id``), as the platform sends
    when a standard id changes: the connector's id-change path is exercised."""
    store = SimStore()
    generate(store, 300, seed=2)
    patches = [
        env["context"]["patch"]
        for env in (
            orjson.loads(f.split(b"\ndata: ", 1)[1])
            for f in store.read(0, max_bytes=1 << 30).frames
        )
        if env["type"] == "update"
    ]
    assert any(op["path"] == "/id" for patch in patches for op in patch)
