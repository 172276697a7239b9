"""Registration on the source platform, so operators see the connector in OpenCTI's UI.

OpenCTI lists connectors that registered themselves (type STREAM here) and shows the state they
ping. This runs in a background thread, best effort: a platform that refuses (a token without
the connector capability, an old version) gets one warning and the backup goes on, because the
checkpoint lives in the archive, not in the platform.

The two GraphQL mutations are sent with httpx, not through pycti, on purpose: importing pycti
takes about 0.7 s of CPU and 57 MB, and in this thread that import ran while the stream was being
read, holding the interpreter lock the reader needs. Measured with the bench's backup of 200k
events: 45-50k events/s and 138 MB with pycti, 64-67k events/s and 81 MB without
(docs/PERFORMANCE.md). The target platform, which needs pycti's bundle API, still uses pycti,
with the same description of this connector (``connector_input``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from . import __version__
from .source import tls_verify

__all__ = ["SourceRegistration", "PING_EVERY_SECS", "connector_input", "stream_connector"]

log = logging.getLogger(__name__)

PING_EVERY_SECS = 40.0
_RETRY_FIRST_SECS = 5.0  # registration retries while the platform is unreachable
_RETRY_MAX_SECS = 300.0

_REGISTER = """
mutation RegisterConnector($input: RegisterConnectorInput) {
  registerConnector(input: $input) { id connector_state }
}"""
_PING = """
mutation PingConnector($id: ID!, $state: String, $connectorInfo: ConnectorInfoInput) {
  pingConnector(id: $id, state: $state, connectorInfo: $connectorInfo) { id }
}"""
# What a long-running stream connector reports about itself on every ping.
_INFO = {
    "run_and_terminate": False,
    "buffering": False,
    "queue_threshold": 0.0,
    "queue_messages_size": 0.0,
    "next_run_datetime": None,
    "last_run_datetime": None,
}


def connector_input(connector_id: str, name: str) -> dict[str, Any]:
    """This connector as the platform registers it: type STREAM, like OpenCTI's stream
    connectors, never run automatically on entities."""
    return {
        "id": connector_id,
        "name": name,
        "type": "STREAM",
        "scope": [],
        "auto": False,
        "auto_update": False,
        "only_contextual": False,
        "playbook_compatible": False,
        "enrichment_resolution": "none",
    }


def stream_connector(connector_id: str, name: str) -> Any:
    """pycti's object for ``connector_input`` (the target platform registers through pycti)."""
    from pycti import OpenCTIConnector

    spec = connector_input(connector_id, name)
    return OpenCTIConnector(
        connector_id=spec["id"],
        connector_name=spec["name"],
        connector_type=spec["type"],
        scope=spec["scope"],
        auto=spec["auto"],
        only_contextual=spec["only_contextual"],
        playbook_compatible=spec["playbook_compatible"],
        auto_update=spec["auto_update"],
        enrichment_resolution=spec["enrichment_resolution"],
    )


class RegistrationRefused(Exception):
    """The platform answered with GraphQL errors or a non-2xx status."""


class SourceRegistration:
    def __init__(
        self,
        *,
        url: str,
        token: str,
        verify: bool | str,
        connector_id: str,
        name: str,
        state: Callable[[], dict[str, object]],
    ) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self.verify = verify
        self.connector_id = connector_id
        self.name = name
        self.state = state
        self.registered = False
        self.pings = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> SourceRegistration:
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name="registration", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """After the pipeline has drained: one last ping with the final state, then end."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _unregistered(self, exc: Exception) -> None:
        log.warning(
            "Could not register on the source platform; continuing without.",
            extra={"error": _scrub(str(exc), self._token)},
        )

    def _run(self, stop: threading.Event) -> None:
        headers = {
            "Authorization": f"Bearer {self._token}",
            "User-Agent": f"opencti-sync/{__version__}",
        }
        try:
            client = httpx.Client(
                base_url=self.url,
                headers=headers,
                timeout=httpx.Timeout(30.0),
                verify=tls_verify(self.verify),
                follow_redirects=False,
            )
        except Exception as exc:  # noqa: BLE001 - e.g. an unreadable CA bundle
            self._unregistered(exc)
            return
        with client:
            delay = _RETRY_FIRST_SECS
            while True:
                try:
                    _mutation(
                        client, _REGISTER, {"input": connector_input(self.connector_id, self.name)}
                    )
                    self.registered = True
                    log.info(
                        "Registered on the source platform.",
                        extra={"connector_id": self.connector_id},
                    )
                    break
                except httpx.TransportError as exc:
                    # The platform is not up yet (a compose stack starts the connector first):
                    # try again, until it answers or the run stops.
                    log.info(
                        "Source platform not reachable for registration; retrying.",
                        extra={"error": _scrub(str(exc), self._token), "retry_in_secs": delay},
                    )
                    if stop.wait(delay):
                        return
                    delay = min(delay * 2, _RETRY_MAX_SECS)
                except Exception as exc:  # noqa: BLE001 - best effort by design
                    self._unregistered(exc)
                    return
            stopping = False
            while True:
                variables = {
                    "id": self.connector_id,
                    "state": orjson.dumps(self.state()).decode(),
                    "connectorInfo": _INFO,
                }
                try:
                    _mutation(client, _PING, variables)
                    self.pings += 1
                except Exception as exc:  # noqa: BLE001 - a missed ping only delays the UI's view
                    log.warning(
                        "Ping to the source platform failed.",
                        extra={"error": _scrub(str(exc), self._token)},
                    )
                if stopping:
                    return
                # One last ping after the stop, so the UI shows the final checkpoint.
                stopping = stop.wait(PING_EVERY_SECS)


def _mutation(client: httpx.Client, query: str, variables: dict[str, Any]) -> None:
    response = client.post(
        "/graphql",
        content=orjson.dumps({"query": query, "variables": variables}),
        headers={"Content-Type": "application/json"},
    )
    body = response.content
    try:
        answer = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        answer = {}
    errors = answer.get("errors") if isinstance(answer, dict) else None
    if errors:
        first = errors[0] if isinstance(errors, list) and errors else {}
        message = first.get("message") if isinstance(first, dict) else None
        raise RegistrationRefused(str(message or errors)[:300])
    if response.status_code >= 300:
        raise RegistrationRefused(f"HTTP {response.status_code} from {response.url.path}")


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "<redacted>")[:300] if secret else text[:300]
