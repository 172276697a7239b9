"""The stream reader reads ahead of the pipeline by a number of bytes, not only a number of
messages: 256 messages of large events (a report with a long description, up to
CONNECTOR_MAX_EVENT_BYTES each) held while a sink was slow were 256 times that size."""

from __future__ import annotations

import os
import time

from connector.events import StreamEvent
from connector.sim.server import SimServer
from connector.sim.store import SimStore
from connector.source import SourceConfig, SseSource

TOKEN = "queue-bytes-token-0123"
SIZE = 200_000  # bytes of each event's description


def _queued_bytes(source: SseSource) -> tuple[int, int]:
    events = [i for items in list(source.queue.queue) for i in items if isinstance(i, StreamEvent)]
    return len(events), sum(len(ev.data) for ev in events)


def test_the_reader_holds_a_bounded_number_of_bytes_for_a_stalled_pipeline() -> None:
    store = SimStore()
    with SimServer(token=TOKEN, store=store, heartbeat_secs=1) as sim:
        config = SourceConfig(url=sim.url, token=TOKEN, queue_bytes=1 << 20)
        source = SseSource(config, resume=None, recover_until=None).start()
        try:
            for i in range(40):  # 8 MB of live events, each its own group; nobody takes them
                store.create(
                    {
                        "type": "report",
                        "id": f"report--00000000-0000-4000-8000-{i:012d}",
                        "spec_version": "2.1",
                        "name": f"r{i}",
                        "published": "2024-01-01T00:00:00.000Z",
                        "description": os.urandom(SIZE // 2).hex(),
                        "object_refs": ["identity--00000000-0000-4000-8000-00000000000b"],
                    }
                )
            time.sleep(3)  # the reader runs ahead until the queue is full
            events, held = _queued_bytes(source)
            # 1 MiB, and the message that crossed it: about 6 events, not 40 (the 256 messages).
            assert 0 < events <= 7, f"{events} events, {held / 1e6:.1f} MB read ahead"
            assert held <= (1 << 20) + SIZE + 10_000
            taken = 0
            deadline = time.monotonic() + 20
            while taken < 40 and time.monotonic() < deadline:  # a pipeline taking them again
                taken += sum(isinstance(i, StreamEvent) for i in source.queue.get(timeout=5))
            assert taken == 40
        finally:
            source.close()
