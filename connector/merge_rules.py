"""What a merge does to the absorbed entities' relationships, as the platform does it.

The platform re-points the sources' relationships to the merge target, except those that would
duplicate one (``filterTargetByExisting`` in OpenCTI's middleware): a source's relationship of the
same type, on the same side, to the same other end as one the target already has without dates,
or as one an earlier source brought. Those are deleted with the sources, without events (protocol
doc §4.2: "none for relationships that were re-pointed or removed during the merge"). The fold
(``state.StateStore``) and the simulator (``sim.store.SimStore``) both follow this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["duplicate_relationships"]

# The platform's stand-ins for "no date" (FROM_START_STR, UNTIL_END_STR).
_NO_DATE = {"", "1970-01-01T00:00:00.000Z", "5138-11-16T09:46:40.000Z"}
_DATES = ("start_time", "stop_time", "first_seen", "last_seen")


def _undated(rel: dict[str, Any]) -> bool:
    return all(rel.get(f) in (None, *_NO_DATE) for f in _DATES)


def _signature(rel: dict[str, Any], ends: set[str]) -> tuple[str, str, str] | None:
    """(type, side, other end) of a relationship touching ``ends``; None for anything else."""
    if rel.get("type") != "relationship":
        return None
    kind, src, dst = rel.get("relationship_type"), rel.get("source_ref"), rel.get("target_ref")
    if not isinstance(kind, str) or not isinstance(src, str) or not isinstance(dst, str):
        return None
    if src in ends and dst not in ends:
        return kind, "from", dst
    if dst in ends and src not in ends:
        return kind, "to", src
    return None


def duplicate_relationships(
    target_ids: set[str],
    target_rels: Iterable[dict[str, Any]],
    source_ids: set[str],
    source_rels: Iterable[tuple[str, dict[str, Any]]],
) -> list[str]:
    """Keys of the sources' relationships the merge deletes instead of re-pointing.

    ``target_rels``: the objects referring to the target; ``source_rels``: ``(key, object)`` of
    those referring to a source, in a stable order (the first of equal ones is kept).
    """
    taken: set[tuple[str, str, str]] = set()
    for rel in target_rels:
        sig = _signature(rel, target_ids)
        if sig is not None and _undated(rel):
            taken.add(sig)
    doomed: list[str] = []
    for key, rel in source_rels:
        sig = _signature(rel, source_ids)
        if sig is None:
            continue
        if sig in taken:
            doomed.append(key)
        else:
            taken.add(sig)
    return doomed
