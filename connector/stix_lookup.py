"""Which entity a platform holds under each id, asked through GraphQL ``stix(id)``.

The target uses it for aliases and for restore's merged-away sources, delete reconciliation for
the source platform; each sends the queries with its own client.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .events import loads_json, octi_ext

__all__ = ["BATCH", "entities", "standard_ids", "stix_queries"]

BATCH = 100  # ids per GraphQL query


def stix_queries(ids: list[str], name: str) -> Iterator[tuple[list[str], str, dict[str, str]]]:
    """``(ids, query, variables)`` per ``BATCH`` ids: one aliased ``stix(id)`` call each."""
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        names = ", ".join(f"$i{n}: String!" for n in range(len(chunk)))
        calls = " ".join(f"a{n}: stix(id: $i{n})" for n in range(len(chunk)))
        yield (
            chunk,
            f"query {name}({names}) {{ {calls} }}",
            {f"i{n}": ref for n, ref in enumerate(chunk)},
        )


def entities(chunk: list[str], data: Mapping[str, Any]) -> dict[str, tuple[str, str | None] | None]:
    """From a ``stix_queries`` answer's ``data``: the standard id and the internal id (None when
    the answer lacks it) of the entity each id of ``chunk`` names; None: the platform does not
    know the id."""
    out: dict[str, tuple[str, str | None] | None] = {}
    for n, ref in enumerate(chunk):
        text = data.get(f"a{n}")
        try:
            obj = loads_json(text) if isinstance(text, str) else None
        except ValueError:
            obj = None
        sid = obj.get("id") if isinstance(obj, dict) else None
        if not isinstance(obj, dict) or not isinstance(sid, str):
            out[ref] = None
            continue
        iid = octi_ext(obj).get("id")
        out[ref] = (sid, iid if isinstance(iid, str) and iid else None)
    return out


def standard_ids(chunk: list[str], data: Mapping[str, Any]) -> dict[str, str | None]:
    """From a ``stix_queries`` answer's ``data``: the standard id of the entity each id of
    ``chunk`` names (None: the platform does not know it)."""
    return {ref: (found[0] if found else None) for ref, found in entities(chunk, data).items()}
