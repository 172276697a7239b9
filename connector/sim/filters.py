"""What the simulated platform needs to decide visibility: refs, access and collection filters.

A small subset of OpenCTI's STIX filtering (protocol doc §5.3/§5.4): enough keys to exercise
filter transitions and marking-restricted users, evaluated on the STIX object as streamed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..events import OCTI_EXT

__all__ = [
    "ENDPOINT_FIELDS",
    "entity_types",
    "is_accessible",
    "is_relation",
    "match_filter_group",
    "stix_refs",
]

# Ref fields that make a relationship/sighting meaningless when their target disappears.
ENDPOINT_FIELDS = ("source_ref", "target_ref", "sighting_of_ref", "where_sighted_refs")
_CONTAINERS = {"report", "grouping", "note", "opinion", "observed-data"}
_OBSERVABLE_HINT = {
    "ipv4-addr",
    "ipv6-addr",
    "domain-name",
    "url",
    "file",
    "email-addr",
    "artifact",
}

Resolver = Callable[[str], "str | None"]


def _ext(stix: dict[str, Any]) -> dict[str, Any]:
    ext = stix.get("extensions")
    octi = ext.get(OCTI_EXT) if isinstance(ext, dict) else None
    return octi if isinstance(octi, dict) else {}


def is_relation(stix: dict[str, Any]) -> bool:
    return stix.get("type") in ("relationship", "sighting")


def stix_refs(stix: dict[str, Any]) -> list[str]:
    """Every id in ``*_ref``/``*_refs`` fields plus the extension's ``granted_refs`` (§5.2)."""
    out: list[str] = []
    for key, value in stix.items():
        if key.endswith("_ref") and isinstance(value, str):
            out.append(value)
        elif key.endswith("_refs") and isinstance(value, list):
            out.extend(v for v in value if isinstance(v, str))
    granted = _ext(stix).get("granted_refs")
    if isinstance(granted, list):
        out.extend(v for v in granted if isinstance(v, str))
    return out


def entity_types(stix: dict[str, Any]) -> set[str]:
    """The object's entity type and the abstract parents a filter may name (lower-cased)."""
    stype = str(stix.get("type", ""))
    own = str(_ext(stix).get("type") or stype)
    types = {own.lower(), stype.lower(), "stix-object"}
    if stype == "relationship":
        types |= {"stix-core-relationship", "basic-relationship"}
    elif stype == "sighting":
        types |= {"stix-sighting-relationship", "basic-relationship"}
    elif stype == "marking-definition":
        types.add("stix-meta-object")
    else:
        types.add("stix-core-object")
        if stype in _OBSERVABLE_HINT or "x_opencti_score" in stix and "value" in stix:
            types.add("stix-cyber-observable")
        else:
            types.add("stix-domain-object")
        if stype in _CONTAINERS:
            types.add("container")
    return types


def is_accessible(stix: dict[str, Any], allowed_markings: frozenset[str] | None) -> bool:
    """§5.4: BYPASS (``None``) sees everything; otherwise every marking must be allowed."""
    if allowed_markings is None:
        return True
    if stix.get("type") == "marking-definition":
        return stix.get("id") in allowed_markings  # a marking the user lacks is invisible too
    markings = stix.get("object_marking_refs") or []
    return all(m in allowed_markings for m in markings)


def _values_for(key: str, stix: dict[str, Any], resolve: Resolver) -> list[Any] | None:
    """The object's values for one filter key, or None when the key is unsupported."""
    ext = _ext(stix)

    def with_internal(ids: Iterable[Any]) -> list[Any]:
        out: list[Any] = []
        for v in ids:
            if isinstance(v, str):
                out.append(v)
                iid = resolve(v)
                if iid:
                    out.append(iid)
        return out

    def as_list(v: Any) -> list[Any]:
        return v if isinstance(v, list) else ([] if v is None else [v])

    if key == "entity_type":
        return sorted(entity_types(stix))
    if key == "objectMarking":
        return with_internal(as_list(stix.get("object_marking_refs")))
    if key == "objectLabel":
        return as_list(stix.get("labels"))
    if key == "createdBy":
        return with_internal(as_list(stix.get("created_by_ref")))
    if key == "ids":
        return [stix.get("id"), ext.get("id"), *as_list(ext.get("stix_ids"))]
    if key == "objects":
        return with_internal(as_list(stix.get("object_refs")))
    if key in ("fromId", "toId"):
        field = "source_ref" if key == "fromId" else "target_ref"
        return with_internal(as_list(stix.get(field)))
    if key in ("fromTypes", "toTypes"):
        field = "source_type" if key == "fromTypes" else "target_type"
        return [str(t).lower() for t in as_list(ext.get(field))]
    if key in ("x_opencti_score", "x_opencti_detection", "x_opencti_main_observable_type"):
        return as_list(ext.get(key.removeprefix("x_opencti_"), stix.get(key)))
    if key in ("confidence", "revoked", "pattern_type", "pattern", "severity", "priority"):
        return as_list(stix.get(key))
    if key in ("indicator_types", "report_types"):
        return as_list(stix.get(key))
    return None


def _compare(op: str, actual: Any, wanted: Any) -> bool:
    try:
        if op == "gt":
            return bool(actual > wanted)
        if op == "gte":
            return bool(actual >= wanted)
        if op == "lt":
            return bool(actual < wanted)
        if op == "lte":
            return bool(actual <= wanted)
    except TypeError:
        return False
    if isinstance(actual, str) and isinstance(wanted, str):
        return actual.lower() == wanted.lower()
    return bool(actual == wanted) or str(actual).lower() == str(wanted).lower()


def _match_filter(flt: dict[str, Any], stix: dict[str, Any], resolve: Resolver) -> bool:
    keys = flt.get("key")
    key = keys[0] if isinstance(keys, list) and keys else keys
    if not isinstance(key, str):
        return True
    actual = _values_for(key, stix, resolve)
    if actual is None:
        return True  # unsupported key: do not hide data the test did not mean to hide
    op = str(flt.get("operator") or "eq")
    if op == "nil":
        return not actual
    if op == "not_nil":
        return bool(actual)
    wanted = flt.get("values") or []
    if not isinstance(wanted, list):
        wanted = [wanted]
    negate = op.startswith("not_")
    base_op = op.removeprefix("not_")
    hits = [any(_compare(base_op, a, w) for a in actual) for w in wanted]
    mode = flt.get("mode") or "or"
    result = all(hits) if mode == "and" else any(hits)
    return not result if negate else result


def match_filter_group(
    group: dict[str, Any] | None, stix: dict[str, Any], resolve: Resolver
) -> bool:
    """Evaluate an OpenCTI FilterGroup on a STIX object. ``None`` or empty matches everything."""
    if not group:
        return True
    results = [_match_filter(f, stix, resolve) for f in group.get("filters") or []]
    results += [match_filter_group(g, stix, resolve) for g in group.get("filterGroups") or []]
    if not results:
        return True
    return any(results) if group.get("mode") == "or" else all(results)
