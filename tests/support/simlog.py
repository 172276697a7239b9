"""Reading a simulator's stream log directly (no HTTP), parsed like SSE."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from connector.events import StreamEvent
from connector.sim.store import SimStore

__all__ = ["copy_event", "frame_events", "sim_events"]


def frame_events(frames: Iterable[bytes]) -> list[StreamEvent]:
    """The data events among SSE ``frames`` (heartbeats and other frames left out)."""
    out: list[StreamEvent] = []
    for frame in frames:
        fields: dict[str, str] = {}
        for line in frame.decode().split("\n"):
            name, sep, value = line.partition(": ")
            if sep:
                fields[name] = value
        if fields.get("event") in ("create", "update", "merge", "delete"):
            out.append(StreamEvent.from_sse(fields["id"], fields["event"], fields["data"]))
    return out


def sim_events(store: SimStore, pos: int = 0) -> tuple[list[StreamEvent], int]:
    """Data events of ``store``'s stream log from absolute position ``pos``, and the next pos."""
    out: list[StreamEvent] = []
    while True:
        chunk = store.read(pos)
        if not chunk.frames:
            return out, pos
        out.extend(frame_events(chunk.frames))
        pos = chunk.start + len(chunk.frames)


def copy_event(id_text: str, stix: Any, referer: str = "init-dependencies") -> StreamEvent:
    """A ``create`` carrying ``stix`` as it is when sent, the way the live stream sends a
    dependency (or, with another ``referer``, a recovery or reconciliation copy)."""
    envelope = {"data": stix, "origin": {"referer": referer}, "version": "4"}
    return StreamEvent.from_sse(id_text, "create", orjson.dumps(envelope).decode())
