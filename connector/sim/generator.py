"""Deterministic synthetic STIX 2.1 traffic for the simulator (tests, demo, benchmarks).

``generate`` drives the store's edit methods, so events carry real patches, merges and deletes.
``bulk_creates`` is the benchmark path: it fills byte templates instead of building dicts, so
a million ~2 KB create events are generated quickly and kept as bytes only (log-only objects,
see docs/SIMULATOR.md).
"""

from __future__ import annotations

import random
import re
import uuid
from typing import Any

import orjson

from ..events import OCTI_EXT
from .store import SimStore, entity_type_of, iso_ms

__all__ = ["TLP_MARKINGS", "bulk_creates", "generate", "make_object", "popular_entity"]

# Fixed TLP marking ids chosen for the simulator (not the platform's own ids), so runs compare.
TLP_MARKINGS = {
    "TLP:CLEAR": ("marking-definition--94868c89-83c2-464b-929b-a1a8aa3c8487", "#ffffff", 1),
    "TLP:GREEN": ("marking-definition--bab4a63c-aed9-4cf5-a766-dfca5abac2bb", "#2e7d32", 2),
    "TLP:AMBER": ("marking-definition--55d920b0-5e8b-4f79-9f62-3e8b2e0d4c6c", "#d84315", 3),
    "TLP:RED": ("marking-definition--e828b405-8fb5-4a3a-9ab3-6a9a2c7e1f66", "#c62828", 4),
}
_WORDS = (
    "actor campaign loader dropper beacon implant credential phishing lateral movement "
    "exfiltration persistence ransomware wiper botnet infrastructure command control server "
    "spearphishing attachment payload obfuscation downloader backdoor espionage financial "
    "sector energy telecom government defense healthcare supply chain vulnerability exploit "
    "zero day privilege escalation reconnaissance scanning brute force stealer keylogger"
).split()
_SECTORS = ("Energy", "Finance", "Healthcare", "Government", "Telecom", "Defense", "Retail")
_KINDS = ("malware", "intrusion-set", "indicator", "ipv4-addr", "domain-name", "report")
_KIND_WEIGHTS = (3, 2, 4, 2, 2, 1)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + "."


def _refs_block(rng: random.Random, name: str) -> list[dict[str, Any]]:
    return [
        {
            "source_name": rng.choice(("mitre-attack", "vendor-blog", "cert-advisory")),
            "description": _text(rng, 12),
            "url": f"https://intel.example.org/{name.lower().replace(' ', '-')}",
            "external_id": f"S{rng.randrange(1000, 9999)}",
        }
        for _ in range(2)
    ]


def _octi(extra: dict[str, Any]) -> dict[str, Any]:
    return {OCTI_EXT: {"extension_type": "property-extension", **extra}}


def make_object(
    rng: random.Random, kind: str, markings: list[str], orgs: list[str], pool: dict[str, list[str]]
) -> dict[str, Any]:
    """One realistic STIX object of ``kind`` (relationship/sighting endpoints from ``pool``)."""
    marking = [rng.choice(markings)] if markings else []
    author = rng.choice(orgs) if orgs else None
    base: dict[str, Any] = {
        "spec_version": "2.1",
        "confidence": rng.choice((50, 75, 90, 100)),
        "lang": "en",
        "revoked": False,
        "labels": sorted(rng.sample(_WORDS, 2)),
        "object_marking_refs": marking,
    }
    if author:
        base["created_by_ref"] = author
    tag = rng.randrange(10**6)
    if kind == "malware":
        name = f"{rng.choice(_WORDS).capitalize()}{rng.choice(_WORDS).capitalize()}-{tag}"
        obj = {
            "type": "malware",
            "id": f"malware--{_uuid(rng)}",
            "name": name,
            "is_family": True,
            "malware_types": [rng.choice(("trojan", "ransomware", "backdoor", "worm"))],
            "description": _text(rng, 45),
            "external_references": _refs_block(rng, name),
            **base,
        }
    elif kind == "intrusion-set":
        name = f"APT-{tag}"
        obj = {
            "type": "intrusion-set",
            "id": f"intrusion-set--{_uuid(rng)}",
            "name": name,
            "aliases": [f"{rng.choice(_WORDS).capitalize()} Bear {tag}"],
            "primary_motivation": rng.choice(("espionage", "financial-gain")),
            "description": _text(rng, 45),
            "external_references": _refs_block(rng, name),
            **base,
        }
    elif kind == "indicator":
        octets = (rng.randrange(1, 224), rng.randrange(256), rng.randrange(256), rng.randrange(256))
        ip = ".".join(str(o) for o in octets)
        obj = {
            "type": "indicator",
            "id": f"indicator--{_uuid(rng)}",
            "name": ip,
            "pattern": f"[ipv4-addr:value = '{ip}']",
            "pattern_type": "stix",
            "valid_from": "2026-01-01T00:00:00.000Z",
            "indicator_types": ["malicious-activity"],
            "description": _text(rng, 40),
            "external_references": _refs_block(rng, ip),
            **base,
            "extensions": _octi(
                {
                    "score": rng.randrange(30, 100),
                    "detection": False,
                    "main_observable_type": "IPv4-Addr",
                }
            ),
        }
    elif kind in ("ipv4-addr", "domain-name"):
        value = (
            f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
            if kind == "ipv4-addr"
            else f"{rng.choice(_WORDS)}-{tag}.example.net"
        )
        obj = {
            "type": kind,
            "id": f"{kind}--{_uuid(rng)}",
            "spec_version": "2.1",
            "value": value,
            "object_marking_refs": marking,
            "extensions": {
                "extension-definition--f93e2c80-4231-4f9a-af8b-95c9bd566a82": {
                    "extension_type": "property-extension",
                    "score": rng.randrange(0, 100),
                    "description": _text(rng, 50),
                    "labels": sorted(rng.sample(_WORDS, 2)),
                    "created_by_ref": author,
                }
            },
        }
    elif kind == "report":
        refs = [rng.choice(v) for v in pool.values() if v][:4]
        name = f"Threat report {tag}"
        obj = {
            "type": "report",
            "id": f"report--{_uuid(rng)}",
            "name": name,
            "report_types": ["threat-report"],
            "published": "2026-02-01T00:00:00.000Z",
            "description": _text(rng, 40),
            "object_refs": list(dict.fromkeys(refs)),
            "external_references": _refs_block(rng, name),
            **base,
        }
    elif kind == "relationship":
        src = rng.choice(pool.get("intrusion-set") or pool["malware"])
        dst = rng.choice(pool.get("malware") or pool["indicator"])
        obj = {
            "type": "relationship",
            "id": f"relationship--{_uuid(rng)}",
            "relationship_type": "uses",
            "source_ref": src,
            "target_ref": dst,
            "description": _text(rng, 40),
            "start_time": "2025-06-01T00:00:00.000Z",
            **base,
        }
    elif kind == "sighting":
        obj = {
            "type": "sighting",
            "id": f"sighting--{_uuid(rng)}",
            "sighting_of_ref": rng.choice(pool["indicator"]),
            "where_sighted_refs": [rng.choice(orgs)],
            "first_seen": "2026-01-02T00:00:00.000Z",
            "last_seen": "2026-01-03T00:00:00.000Z",
            "count": rng.randrange(1, 50),
            "description": _text(rng, 40),
            **base,
        }
    else:
        raise ValueError(f"unsupported kind {kind!r}")
    return obj


def _base_objects(rng: random.Random) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for name, (mid, color, order) in TLP_MARKINGS.items():
        out.append(
            {
                "type": "marking-definition",
                "id": mid,
                "spec_version": "2.1",
                "name": name,
                "definition_type": "TLP",
                "definition": {"tlp": name.split(":")[1].lower()},
                "created": "2026-01-01T00:00:00.000Z",
                "extensions": _octi({"order": order, "color": color}),
            }
        )
    for i in range(8):
        out.append(
            {
                "type": "identity",
                "id": f"identity--{_uuid(rng)}",
                "spec_version": "2.1",
                "identity_class": "organization",
                "name": f"{rng.choice(_SECTORS)} CERT {i}",
                "sectors": [rng.choice(_SECTORS).lower()],
                "description": _text(rng, 20),
                "confidence": 90,
            }
        )
    return out


def generate(store: SimStore, count: int, *, seed: int = 0, mix: str = "mixed") -> None:
    """Append exactly ``count`` events through the store's edit methods.

    ``mixed``: ~60% creates, 30% updates, 5% merges, 5% deletes; ``creates``: creates only.
    The random stream depends on ``seed`` and on the store's event count, so the same store
    state and seed always produce the same objects.
    """
    if mix not in ("mixed", "creates"):
        raise ValueError(f"unknown mix {mix!r}")
    rng = random.Random(f"{seed}:{store.event_count}")
    pool: dict[str, list[str]] = {k: [] for k in (*_KINDS, "relationship", "sighting")}
    markings: list[str] = []
    orgs: list[str] = []
    for obj in store.objects():
        otype = str(obj.get("type"))
        if otype == "marking-definition":
            markings.append(str(obj["id"]))
        elif otype == "identity":
            orgs.append(str(obj["id"]))
        elif otype in pool:
            pool[otype].append(str(obj["id"]))
    done = 0
    pending_base = [o for o in _base_objects(rng) if store.get(str(o["id"])) is None]
    guard = 0
    while done < count and guard < count * 20 + 100:
        guard += 1
        if pending_base:
            obj = pending_base.pop(0)
            if store.create(obj) is not None:
                done += 1
                (markings if obj["type"] == "marking-definition" else orgs).append(str(obj["id"]))
            continue
        roll = rng.random() if mix == "mixed" else 0.0
        entities = pool["malware"] + pool["intrusion-set"] + pool["indicator"]
        if roll < 0.60 or len(entities) < 4:
            kind = rng.choices(_KINDS, _KIND_WEIGHTS)[0]
            if mix == "mixed" or rng.random() < 0.3:
                if pool["indicator"] and rng.random() < 0.15:
                    kind = "sighting"
                elif pool["malware"] and rng.random() < 0.25:
                    kind = "relationship"
            obj = make_object(rng, kind, markings, orgs, pool)
            if store.create(obj) is not None:
                done += 1
                pool[kind].append(str(obj["id"]))
        elif roll < 0.90:
            target = rng.choice(entities)
            changes: dict[str, Any] = rng.choice(
                (
                    {"description": _text(rng, 45)},
                    {"confidence": rng.choice((15, 35, 55, 80))},
                    {"labels": sorted(rng.sample(_WORDS, 3))},
                    {"object_marking_refs": [rng.choice(markings)]},
                )
            )
            new_id = None
            if rng.random() < 0.05 and target.startswith("malware--"):
                new_id = f"malware--{_uuid(rng)}"
            if store.update(target, set=changes, new_id=new_id) is not None:
                done += 1
                if new_id:
                    pool["malware"][pool["malware"].index(target)] = new_id
        elif roll < 0.95:
            kind = rng.choice(("malware", "intrusion-set"))
            if len(pool[kind]) < 3:
                continue
            a, b = rng.sample(pool[kind], 2)
            if store.merge(a, [b]) is not None:
                done += 1
                pool[kind].remove(b)
        else:
            kind = rng.choice(("indicator", "ipv4-addr", "domain-name", "relationship"))
            if not pool[kind]:
                continue
            victim = pool[kind].pop(rng.randrange(len(pool[kind])))
            if store.delete(victim) is not None:
                done += 1


def bulk_creates(store: SimStore, count: int, *, seed: int = 0) -> None:
    """Append ``count`` create events (~2 KB each) from byte templates, fast.

    The objects exist only in the log (not in ``objects()``/recover snapshots), so a million of
    them cost ~2 GB of bytes and no dicts. Markings and organisations they reference are created
    normally first (counted in ``count``) so dependency resolution on ``/stream/live`` works.
    """
    rng = random.Random(f"bulk:{seed}:{store.event_count}")
    base = [o for o in _base_objects(rng) if store.get(str(o["id"])) is None]
    done = 0
    for obj in base:
        if done >= count:
            return
        if store.create(obj) is not None:
            done += 1
    markings = [m for m, _, _ in TLP_MARKINGS.values()]
    orgs = [str(o["id"]) for o in store.objects() if o.get("type") == "identity"] or [""]
    templates: list[tuple[list[bytes], list[int]]] = []
    pool: dict[str, list[str]] = {"malware": [], "indicator": [], "intrusion-set": []}
    for i, kind in enumerate(("malware", "indicator", "intrusion-set", "malware")):
        obj = make_object(rng, kind, markings[i % 3 : i % 3 + 1], orgs[i % len(orgs) :][:1], pool)
        templates.append(_template(obj))
    remaining = count - done
    batch: list[tuple[str, bytes]] = []
    getbits = rng.getrandbits
    while remaining > 0:
        n = min(remaining, 2000)
        now = iso_ms(store.now_ms()).encode()
        for _ in range(n):
            parts, slots = templates[getbits(2)]
            h = f"{getbits(128):032x}"
            values = (
                f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}".encode(),
                h[:12].encode(),
                now,
                f"{h[16:24]}-{h[24:28]}-5{h[29:32]}-8{h[1:4]}-{h[4:16]}".encode(),
            )
            out = [parts[0]]
            for slot, part in zip(slots, parts[1:], strict=True):
                out.append(values[slot])
                out.append(part)
            batch.append(("create", b"".join(out)))
        store.append_frames(batch)
        batch.clear()
        remaining -= n


_MARK = "\x00SIMMARK{}\x00"


def _template(obj: dict[str, Any]) -> tuple[list[bytes], list[int]]:
    """Serialise a create envelope with placeholders; return constant parts and slot numbers.

    Slots: 0 STIX uuid, 1 name suffix, 2 timestamp, 3 internal id.
    """
    stype = obj["type"]
    tmpl = dict(obj)
    tmpl["id"] = f"{stype}--{_MARK.format(0)}"
    label = "name" if "name" in tmpl else "value"
    tmpl[label] = f"{obj[label]}-{_MARK.format(1)}"
    tmpl["created"] = tmpl["modified"] = _MARK.format(2)
    exts = dict(tmpl.get("extensions") or {})
    octi = dict(exts.get(OCTI_EXT) or {})
    octi.update(
        extension_type="property-extension",
        id=_MARK.format(3),
        type=entity_type_of(obj),
        created_at=_MARK.format(2),
        updated_at=_MARK.format(2),
        is_inferred=False,
        creator_ids=["88ec0c6a-13ce-5e39-b486-354fe4a7084f"],
    )
    exts[OCTI_EXT] = octi
    tmpl["extensions"] = exts
    env = {
        "version": "4",
        "type": "create",
        "scope": "external",
        "message": f"creates a {entity_type_of(obj)} `{tmpl[label]}`",
        "origin": {
            "socket": "query",
            "ip": "::ffff:127.0.0.1",
            "user_id": "88ec0c6a-13ce-5e39-b486-354fe4a7084f",
        },
        "data": tmpl,
    }
    text = orjson.dumps(env).decode()
    marks = {orjson.dumps(_MARK.format(i)).decode()[1:-1]: i for i in range(4)}
    pattern = re.compile("|".join(re.escape(m) for m in marks))
    parts: list[bytes] = []
    slots: list[int] = []
    last = 0
    for m in pattern.finditer(text):
        parts.append(text[last : m.start()].encode())
        slots.append(marks[m.group(0)])
        last = m.end()
    parts.append(text[last:].encode())
    return parts, slots


def popular_entity(store: SimStore, relationships: int) -> str:
    """Load a malware that ``relationships`` indicators (1 KB descriptions) indicate; its id.

    A change to it, read on a fresh connection (the platform's cache empty), brings every
    relationship and every indicator as dependencies under the change's id: a group of
    ``2 * relationships + 2`` events (tests/test_pending.py, bench/big_group.py)."""
    malware = f"malware--{uuid.uuid4()}"
    objects: list[dict[str, Any]] = [
        {"type": "malware", "spec_version": "2.1", "id": malware, "name": "Popular"}
    ]
    for i in range(relationships):
        indicator = f"indicator--{uuid.uuid4()}"
        objects.append(
            {
                "type": "indicator",
                "spec_version": "2.1",
                "id": indicator,
                "name": f"indicator {i}",
                "description": "d" * 1024,
                "pattern": f"[ipv4-addr:value = '10.{i // 62500}.{i // 250 % 250}.{i % 250}']",
                "pattern_type": "stix",
            }
        )
        objects.append(
            {
                "type": "relationship",
                "spec_version": "2.1",
                "id": f"relationship--{uuid.uuid4()}",
                "relationship_type": "indicates",
                "source_ref": indicator,
                "target_ref": malware,
            }
        )
    store.load_bundle(objects)
    return malware
