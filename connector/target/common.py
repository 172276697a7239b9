"""Event helpers shared by the OpenCTI target's transports (API bundle push and AMQP)."""

from __future__ import annotations

import bisect
import copy
from collections.abc import Iterable, Mapping
from typing import Any

from ..events import OCTI_EXT, StreamEvent, octi_ext

__all__ = [
    "Absorbed",
    "LiveIds",
    "left_the_view",
    "MergeLookahead",
    "live_aliases_of",
    "merge_source_ids",
    "merge_sources",
    "previous_standard",
    "source_ids",
    "without_aliases",
]


def left_the_view(ev: StreamEvent) -> bool:
    """A ``delete`` carrying an update (protocol doc §5.3, §8.14): the object left the stream's
    filters or the user's rights; it was not deleted upstream. The target keeps it as last seen,
    as the archive's state does: deleting it there would take with it the relationships and
    the report contents still in the stream's view, which the stream never sends again."""
    return ev.event == "delete" and ev.envelope.get("type") == "update"


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


class MergeLookahead:
    """The ids of the sources of the merges that come after each event of ``events``, from one
    pass that keeps only the merges (a huge batch may wait on disk: it is read, not held)."""

    def __init__(self, events: Iterable[StreamEvent]) -> None:
        merges: list[tuple[int, set[str]]] = []
        for index, ev in enumerate(events):
            if ev.event == "merge":
                merges.append((index, source_ids(merge_sources(ev))))
        self._positions = [index for index, _ in merges]
        # _after[k]: the sources of merges k, k+1, ...; the last entry, no merge: empty.
        self._after: list[set[str]] = [set()]
        for _, ids in reversed(merges):
            self._after.append(self._after[-1] | ids)
        self._after.reverse()

    def after(self, index: int) -> set[str]:
        """The sources of the merges strictly after position ``index``."""
        return self._after[bisect.bisect_right(self._positions, index)]


class LiveIds:
    """Which entity each standard id names so far, event by event (``taken``)."""

    def __init__(self) -> None:
        self._live: dict[str, str | None] = {}  # standard id -> internal id of its entity

    def taken(self, ev: StreamEvent) -> set[str]:
        """``ev``'s aliases that an earlier create or update made the standard id of *another*
        entity (another internal id), still live at this point; then ``ev`` is applied.

        The stream sends objects as they are when sent: an entity that absorbs another one
        later can come after that one's create, already holding its id.
        ``OpenCTITarget.on_target`` asks the target before the batch, when that entity is not
        there yet; upserting with its id would then resolve to it, or to both. The id comes
        back with the merge.
        """
        live = self._live
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
        elif ev.event == "delete" and not left_the_view(ev):
            live.pop(ev.stix_id, None)
        return taken


class Absorbed:
    """The events of a batch that the target has already gone past: their object's own id names
    *another* entity there (``OpenCTITarget.on_target``: merged into it, or renamed to it).

    The target applies a batch before the checkpoint moves: a retry after a transient error in
    the middle of a batch, or a restart after a kill before the checkpoint, pushes again events
    whose later merge (or standard-id change) the target already applied. The merged-away
    source's id is then an alias of the merge target, and the platform resolves an upsert by
    every id: the replayed ``update`` of the source went into the merge target, which kept the
    source's fields (and a replayed ``delete`` of it deleted the merge target). The stream
    brings the entity to its state again with the merge it re-sends, so such events are left
    out. Only while nothing earlier in the batch deleted, merged away or renamed the entity the
    id names: then the id is free again (a re-created object) and is pushed as usual.
    """

    def __init__(self, into: Mapping[str, str] | None = None) -> None:
        self._into = dict(into or {})  # object id -> standard id of the entity it names there

    def skip(self, ev: StreamEvent) -> bool:
        """Whether to leave ``ev`` (the batch read in order) out; then ``ev`` is applied."""
        if not self._into:
            return False
        prev = previous_standard(ev) if ev.event == "update" else None
        into = self._into.get(ev.stix_id)
        # A rename back to an id the target keeps as an alias of the renamed entity resolves
        # to that entity: the event renames it (its previous id is that entity's), no replay.
        skip = into is not None and into != prev
        gone: set[str] = set()
        if ev.event == "delete" and not left_the_view(ev):
            gone.add(ev.stix_id)
        elif ev.event == "merge":
            gone |= merge_source_ids(ev)
        elif prev is not None:
            gone.add(prev)
        if gone:
            self._into = {k: v for k, v in self._into.items() if v not in gone}
        return skip


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
    ``OpenCTITarget.on_target``): left out of its upsert like later merges' sources."""
    return set(live_aliases.get(ev.stix_id, ())) if live_aliases else set()
