"""Reading a simulator's stream log directly (no HTTP), parsed like SSE."""

from __future__ import annotations

from connector.events import StreamEvent
from connector.sim.store import SimStore

__all__ = ["sim_events"]


def sim_events(store: SimStore, pos: int = 0) -> tuple[list[StreamEvent], int]:
    """Data events of ``store``'s stream log from absolute position ``pos``, and the next pos."""
    out: list[StreamEvent] = []
    while True:
        chunk = store.read(pos)
        if not chunk.frames:
            return out, pos
        for frame in chunk.frames:
            fields: dict[str, str] = {}
            for line in frame.decode().split("\n"):
                name, sep, value = line.partition(": ")
                if sep:
                    fields[name] = value
            if fields.get("event") in ("create", "update", "merge", "delete"):
                out.append(StreamEvent.from_sse(fields["id"], fields["event"], fields["data"]))
        pos = chunk.start + len(chunk.frames)
