"""Event helpers shared by the OpenCTI target's transports (API bundle push and AMQP)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ..events import OCTI_EXT, StreamEvent, octi_ext

__all__ = [
    "live_aliases_of",
    "merge_lookahead",
    "merge_source_ids",
    "merge_sources",
    "previous_standard",
    "source_ids",
    "taken_earlier",
    "without_aliases",
]


def previous_standard(ev: StreamEvent) -> str | None:
    """The standard id before this update: the ``value`` of the reverse patch op on ``/id``."""
    context = ev.envelope.get("context")
    ops = context.get("reverse_patch") if isinstance(context, dict) else None
    if not isinstance(ops, list):
        return None
    for op in ops:
        if isinstance(op, dict) and op.get("path") == "/id":
            value = op.get("value")
            if isinstance(value, str) and value != ev.stix_id:
                return value
    return None


def merge_sources(ev: StreamEvent) -> list[dict[str, Any]]:
    context = ev.envelope.get("context")
    sources = context.get("sources") if isinstance(context, dict) else None
    return [s for s in sources if isinstance(s, dict)] if isinstance(sources, list) else []


def source_ids(sources: list[dict[str, Any]]) -> set[str]:
    """Every id the merge sources answer to (standard ids and their own aliases)."""
    ids: set[str] = set()
    for src in sources:
        ids.add(str(src.get("id")))
        ids.update(str(i) for i in octi_ext(src).get("stix_ids") or [])
    return ids


def merge_lookahead(events: list[StreamEvent]) -> list[set[str]]:
    """For each event, the ids of the sources of the merges that come after it in ``events``."""
    out: list[set[str]] = [set() for _ in events]
    pending: set[str] = set()
    for index in range(len(events) - 1, -1, -1):
        out[index] = pending
        if events[index].event == "merge":
            pending = pending | source_ids(merge_sources(events[index]))
    return out


def taken_earlier(events: list[StreamEvent]) -> list[set[str]]:
    """For each event, its object's aliases that an earlier create or update in ``events`` made
    the standard id of *another* entity (another internal id), still live at that point.

    The stream sends objects as they are when sent: an entity that absorbs another one later can
    come after that one's create, already holding its id. ``OpenCTITarget.live_aliases`` asks
    the target before the batch, when that entity is not there yet; upserting with its id would
    then resolve to it, or to both. The id comes back with the merge.
    """
    live: dict[str, str | None] = {}  # standard id -> internal id of its entity, so far
    out: list[set[str]] = []
    for ev in events:
        taken: set[str] = set()
        if ev.event in ("create", "update"):
            own = ev.internal_id or None
            aliases = octi_ext(ev.stix).get("stix_ids")
            for alias in aliases if isinstance(aliases, list) else []:
                other = live.get(alias)
                if own is not None and other is not None and other != own:
                    taken.add(alias)
            live[ev.stix_id] = own
        elif ev.event == "merge":
            for gone in merge_source_ids(ev):
                live.pop(gone, None)
            live[ev.stix_id] = ev.internal_id or None
        elif ev.event == "delete":
            live.pop(ev.stix_id, None)
        out.append(taken)
    return out


def without_aliases(stix: dict[str, Any], dropped: set[str]) -> dict[str, Any]:
    """``stix`` without the ``dropped`` ids among its aliases.

    The platform resolves an upsert by every input id, aliases included. A merge target carries
    its sources' ids as aliases, and the stream can deliver it that way *before* the merge event:
    the merge event's own data, and dependency re-sends, which are loaded at send time and so
    show the merged state. While a source still exists on the target platform, upserting with
    its id resolves to the source (renaming it into the target, after which the merge finds
    nothing to do) or to several entities at once. The ids come back with the merge itself.
    """
    aliases = octi_ext(stix).get("stix_ids")
    if not isinstance(aliases, list) or not dropped.intersection(aliases):
        return stix
    out = copy.deepcopy(stix)
    out["extensions"][OCTI_EXT]["stix_ids"] = [a for a in aliases if a not in dropped]
    return out


def merge_source_ids(ev: StreamEvent) -> set[str]:
    """Every id the sources of a merge event answer to."""
    return source_ids(merge_sources(ev))


def live_aliases_of(live_aliases: Mapping[str, set[str]] | None, ev: StreamEvent) -> set[str]:
    """The aliases of ``ev``'s object that name another live entity on the target (from
    ``OpenCTITarget.live_aliases``): left out of its upsert like later merges' sources."""
    return set(live_aliases.get(ev.stix_id, ())) if live_aliases else set()
