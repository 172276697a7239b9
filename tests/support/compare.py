"""Compare two platforms' states (``SimStore.dump_bundle()`` shapes) on what a sync must carry."""

from __future__ import annotations

from typing import Any

__all__ = ["VOLATILE_EXT", "VOLATILE_TOP", "assert_same_state", "comparable", "state_diff"]

OCTI_EXT = "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba"
# Set by the platform that stores the object, not carried by the stream: write times, the
# platform's internal id and the user who wrote it.
VOLATILE_TOP = frozenset({"modified"})
# The extension's endpoint fields of relationships and sightings hold the *internal* ids of the
# endpoints, which each platform assigns itself (the STIX-level refs are compared).
VOLATILE_EXT = frozenset(
    {
        "id",
        "created_at",
        "updated_at",
        "creator_ids",
        "source_ref",
        "target_ref",
        "sighting_of_ref",
        "where_sighted_refs",
    }
)


def comparable(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without platform-local volatile fields."""
    out = {k: v for k, v in obj.items() if k not in VOLATILE_TOP}
    exts = dict(out.get("extensions") or {})
    octi = exts.get(OCTI_EXT)
    if isinstance(octi, dict):
        exts[OCTI_EXT] = {k: v for k, v in octi.items() if k not in VOLATILE_EXT}
        files = octi.get("files")
        if isinstance(files, list):
            # A file's uri holds the platform's internal id: name, type and version compare.
            entries = [f for f in files if isinstance(f, dict)]
            exts[OCTI_EXT]["files"] = sorted(
                ((f.get("name"), f.get("mime_type"), f.get("version")) for f in entries), key=str
            )
    if exts:
        out["extensions"] = exts
    return out


def _by_id(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(o["id"]): comparable(o) for o in bundle.get("objects") or []}


def state_diff(a_bundle: dict[str, Any], b_bundle: dict[str, Any], limit: int = 5) -> list[str]:
    """Human-readable differences (empty when the states match)."""
    a, b = _by_id(a_bundle), _by_id(b_bundle)
    lines = []
    missing = sorted(set(a) - set(b))
    extra = sorted(set(b) - set(a))
    if missing:
        lines.append(f"{len(missing)} object(s) only in A: {missing[:limit]}")
    if extra:
        lines.append(f"{len(extra)} object(s) only in B: {extra[:limit]}")
    differing = [i for i in sorted(set(a) & set(b)) if a[i] != b[i]]
    for oid in differing[:limit]:
        keys = sorted(k for k in set(a[oid]) | set(b[oid]) if a[oid].get(k) != b[oid].get(k))
        detail = "; ".join(f"{k}: A={a[oid].get(k)!r:.120} B={b[oid].get(k)!r:.120}" for k in keys)
        lines.append(f"{oid} differs: {detail}")
    if len(differing) > limit:
        lines.append(f"... and {len(differing) - limit} more differing object(s)")
    return lines


def assert_same_state(a_bundle: dict[str, Any], b_bundle: dict[str, Any]) -> None:
    """Same object ids, and same content apart from volatile fields; the diff on failure."""
    diff = state_diff(a_bundle, b_bundle)
    assert not diff, "states differ:\n" + "\n".join(diff)
