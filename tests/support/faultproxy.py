"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto), for resilience tests.

It forwards each request to the upstream verbatim (Host header included, so signatures stay
valid) and streams bodies both ways. Per request it may instead inject a fault, drawn from
seeded random rates or queued deterministically with ``fail_next``:

=====================  ===================================================================
kind                   what the client sees
=====================  ===================================================================
``500`` / ``503``      InternalError / ServiceUnavailable with an S3 XML error body
``slowdown``           503 SlowDown;  ``429``: 429 SlowDown
``reset``              the socket is reset before the request body is read
``reset_after_read``   the request is read, never forwarded, and the socket is reset
``reset_after_forward``  the request reaches S3 (the write happens), the answer is lost
``slow``               the request is forwarded after ``slow_secs``
``truncate``           the answer's headers and half its body arrive, then a reset
``403``                403 InvalidAccessKeyId;  ``signature``: 403 SignatureDoesNotMatch
``access_denied``      403 AccessDenied;  ``no_such_bucket``: 404 NoSuchBucket
``501``                501 NotImplemented (a store without some feature, e.g. If-Match)
``pass``               forwarded untouched (queued before a fault to aim it at a later request)
=====================  ===================================================================

``proxy.stats`` counts requests, forwards and each injected kind. ``drop_headers`` (lower-case
names) are removed from forwarded requests, e.g. ``{"if-none-match"}`` to play an S3-compatible
store that ignores conditional writes.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

__all__ = ["FaultProxy", "fault_proxy", "KINDS"]

_ERRORS: dict[str, tuple[int, str, str]] = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Please reduce your request rate."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "429": (429, "SlowDown", "Please reduce your request rate."),
    "403": (403, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist."),
    "signature": (403, "SignatureDoesNotMatch", "The request signature does not match."),
    "access_denied": (403, "AccessDenied", "Access Denied"),
    "no_such_bucket": (404, "NoSuchBucket", "The specified bucket does not exist"),
    "501": (501, "NotImplemented", "A header you provided implies unimplemented functionality."),
}
KINDS = frozenset(_ERRORS) | {
    "reset",
    "reset_after_read",
    "reset_after_forward",
    "slow",
    "truncate",
    "pass",
}
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_CHUNK = 64 * 1024


class FaultProxy:
    """Threaded proxy on 127.0.0.1:0; ``url`` is its endpoint once started."""

    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        error_rate_5xx: float = 0.0,
        slowdown_rate: float = 0.0,
        reset_rate: float = 0.0,
        slow_rate: float = 0.0,
        slow_secs: float = 0.2,
    ) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.stats: Counter[str] = Counter()
        self.drop_headers: set[str] = set()
        self._lock = threading.Lock()
        self._queue: deque[tuple[str, str | None, str | None]] = deque()
        self._rng = random.Random(seed)
        self.configure(
            error_rate_5xx=error_rate_5xx,
            slowdown_rate=slowdown_rate,
            reset_rate=reset_rate,
            slow_rate=slow_rate,
            slow_secs=slow_secs,
        )
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def configure(
        self,
        *,
        error_rate_5xx: float = 0.0,
        slowdown_rate: float = 0.0,
        reset_rate: float = 0.0,
        slow_rate: float = 0.0,
        slow_secs: float = 0.2,
        seed: int | None = None,
    ) -> None:
        """Set the random fault rates (probabilities per request; all 0 = transparent)."""
        if error_rate_5xx + slowdown_rate + reset_rate + slow_rate > 1:
            raise ValueError("fault rates add up to more than 1")
        with self._lock:
            self.rates = {
                "5xx": error_rate_5xx,
                "slowdown": slowdown_rate,
                "reset": reset_rate,
                "slow": slow_rate,
            }
            self.slow_secs = slow_secs
            if seed is not None:
                self._rng = random.Random(seed)

    def fail_next(
        self, n: int, kind: str, *, method: str | None = None, path: str | None = None
    ) -> None:
        """Inject ``kind`` into the next ``n`` requests (only those with ``method``, and whose
        path contains ``path``, if given)."""
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; one of {sorted(KINDS)}")
        with self._lock:
            self._queue.extend([(kind, method, path)] * n)

    def clear(self) -> None:
        """Drop queued faults and random rates."""
        with self._lock:
            self._queue.clear()
        self.configure()

    def _draw(self, method: str, path: str) -> str | None:
        """The fault for one request, or None to forward it untouched."""
        with self._lock:
            self.stats["requests"] += 1
            for index, (kind, only, part) in enumerate(self._queue):
                if (only is None or only == method) and (part is None or part in path):
                    del self._queue[index]
                    self.stats[kind] += 1
                    return kind
            roll = self._rng.random()
            variant = self._rng.random()
            kind = None
            for name, rate in self.rates.items():
                if roll < rate:
                    kind = name
                    break
                roll -= rate
            if kind == "5xx":
                kind = "500" if variant < 0.5 else "503"
            elif kind == "slowdown":
                kind = "429" if variant < 0.5 else "slowdown"
            elif kind == "reset":
                kind = ("reset", "reset_after_read", "reset_after_forward")[int(variant * 3)]
            if kind is not None:
                self.stats[kind] += 1
            return kind

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like a real S3 endpoint
    timeout = 30  # idle keep-alive connections do not pin threads forever
    owner: FaultProxy

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        self._handle()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _handle(self) -> None:
        try:
            self._inject_or_forward(self.owner._draw(self.command, self.path))
        except (OSError, http.client.HTTPException):
            # Upstream or client went away mid-request: drop the connection, as S3 would.
            self._reset()

    def _inject_or_forward(self, kind: str | None) -> None:
        if kind == "reset":
            self._reset()
            return
        if kind == "slow":
            time.sleep(self.owner.slow_secs)
        if kind is None or kind in ("pass", "slow", "reset_after_forward", "truncate"):
            self._forward(lose_answer=kind == "reset_after_forward", truncate=kind == "truncate")
            return
        self._drain_body()
        if kind == "reset_after_read":
            self._reset()
            return
        self._send_error(*_ERRORS[kind])

    # -- request body -----------------------------------------------------------------------

    def _body_chunks(self) -> Iterator[bytes]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield self.rfile.read(size)
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(_CHUNK, remaining))
            if not chunk:
                raise ConnectionError("client closed mid-body")
            remaining -= len(chunk)
            yield chunk

    def _drain_body(self) -> None:
        for _ in self._body_chunks():
            pass

    # -- forwarding --------------------------------------------------------------------------

    def _forward(self, *, lose_answer: bool, truncate: bool) -> None:
        chunked_in = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        # A chunked request is buffered so upstream gets a plain Content-Length body.
        buffered = b"".join(self._body_chunks()) if chunked_in else None
        upstream = http.client.HTTPConnection(
            self.owner.upstream_host, self.owner.upstream_port, timeout=60
        )
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() in self.owner.drop_headers:
                    continue
                if name.lower() not in _HOP_BY_HOP and not (
                    buffered is not None and name.lower() == "content-length"
                ):
                    upstream.putheader(name, value)
            if buffered is not None:
                upstream.putheader("Content-Length", str(len(buffered)))
            upstream.putheader("Connection", "close")
            upstream.endheaders()
            if buffered is not None:
                upstream.send(buffered)
            else:
                for chunk in self._body_chunks():
                    upstream.send(chunk)
            response = upstream.getresponse()
            if lose_answer:
                response.read()
                self._reset()
                return
            with self.owner._lock:
                # Counted before the answer is relayed: a client that has its answer may
                # read the stats at once.
                self.owner.stats["forwarded"] += 1
            self._relay(response, truncate=truncate)
        finally:
            upstream.close()

    def _relay(self, response: http.client.HTTPResponse, *, truncate: bool = False) -> None:
        self.send_response_only(response.status, response.reason)
        length = response.getheader("Content-Length")
        no_body = self.command == "HEAD" or response.status in (204, 304)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        rechunk = length is None and not no_body
        if rechunk:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            return
        if truncate:
            body = response.read()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self._reset()
            return
        while chunk := response.read(_CHUNK):
            if rechunk:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                self.wfile.write(chunk)
        if rechunk:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # -- faults ------------------------------------------------------------------------------

    def _send_error(self, status: int, code: str, message: str) -> None:
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{request_id}</RequestId></Error>"
        ).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _reset(self) -> None:
        # SO_LINGER 0 makes close() send a TCP RST: the client sees a reset, not a clean EOF.
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the socket was reset on purpose


@pytest.fixture
def fault_proxy(moto_server: str) -> Iterator[FaultProxy]:
    """A transparent proxy to moto (set rates or ``fail_next`` in the test); seed 1234."""
    with FaultProxy(moto_server, seed=1234) as proxy:
        yield proxy
