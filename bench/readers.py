"""Reference readers of the same stream: the raw-read ceiling and the SSE-parse ceiling.

Both read ``/stream`` from the start and stop after ``count`` data messages. The simulator sends
heartbeats only when idle, i.e. after the last stored event, so counting ``id:`` frames is exact.
"""

from __future__ import annotations

import time

import httpx
import orjson
from httpx_sse._decoders import SSEDecoder, SSELineDecoder

__all__ = ["raw_read", "parse_read"]

_FRAME = b"\n\nid: "  # every id-carrying frame follows the blank line of the one before


def _stream(client: httpx.Client, url: str, token: str) -> httpx.Response:
    request = client.build_request(
        "GET",
        f"{url}/stream",
        params={"from": "0"},
        headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"},
    )
    return client.send(request, stream=True)


def raw_read(url: str, token: str, count: int) -> tuple[int, float]:
    """Bytes read and seconds to receive ``count`` events with httpx, discarding them."""
    seen = total = 0
    tail = b""
    with httpx.Client(timeout=httpx.Timeout(10.0, read=60.0)) as client:
        start = time.perf_counter()
        response = _stream(client, url, token)
        try:
            for chunk in response.iter_raw():
                total += len(chunk)
                seen += (tail + chunk[:5]).count(_FRAME) + chunk.count(_FRAME)
                tail = chunk[-5:]
                if seen >= count:
                    break
            elapsed = time.perf_counter() - start
        finally:
            response.close()
    if seen < count:
        raise RuntimeError(f"raw read saw {seen} of {count} events")
    return total, elapsed


def parse_read(url: str, token: str, count: int) -> float:
    """Seconds to receive ``count`` events with httpx-sse's decoders and orjson (no storage)."""
    seen = 0
    with httpx.Client(timeout=httpx.Timeout(10.0, read=60.0)) as client:
        start = time.perf_counter()
        response = _stream(client, url, token)
        try:
            lines, decoder = SSELineDecoder(), SSEDecoder()
            for text in response.iter_text():
                for line in lines.decode(text):
                    sse = decoder.decode(line)
                    if sse is not None and sse.id:
                        orjson.loads(sse.data)
                        seen += 1
                if seen >= count:
                    break
            elapsed = time.perf_counter() - start
        finally:
            response.close()
    if seen < count:
        raise RuntimeError(f"parse read saw {seen} of {count} events")
    return elapsed
