"""Registration on the source platform, so operators see the connector in OpenCTI's UI.

OpenCTI lists connectors that registered themselves (type STREAM here) and shows the state they
ping. This runs in a background thread, best effort: a platform that refuses (a token without
the connector capability, an old version) gets one warning and the backup goes on, because the
checkpoint lives in the archive, not in the platform.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["SourceRegistration", "PING_EVERY_SECS", "stream_connector"]

log = logging.getLogger(__name__)

PING_EVERY_SECS = 40.0


def stream_connector(connector_id: str, name: str) -> Any:
    """pycti's description of this connector: type STREAM, as OpenCTI's stream connectors."""
    from pycti import OpenCTIConnector

    return OpenCTIConnector(
        connector_id=connector_id,
        connector_name=name,
        connector_type="STREAM",
        scope=[],
        auto=False,
        only_contextual=False,
        playbook_compatible=False,
        auto_update=False,
        enrichment_resolution="none",
    )


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

    def _run(self, stop: threading.Event) -> None:
        try:
            from pycti import OpenCTIApiClient

            api = OpenCTIApiClient(
                self.url,
                self._token,
                ssl_verify=self.verify,
                perform_health_check=False,
                log_level="error",
            )
            api.connector.register(stream_connector(self.connector_id, self.name))
            self.registered = True
            log.info(
                "Registered on the source platform.", extra={"connector_id": self.connector_id}
            )
        except Exception as exc:  # noqa: BLE001 - best effort by design (module docstring)
            log.warning(
                "Could not register on the source platform; continuing without.",
                extra={"error": _scrub(str(exc), self._token)},
            )
            return
        info = {
            "run_and_terminate": False,
            "buffering": False,
            "queue_threshold": 0.0,
            "queue_messages_size": 0.0,
            "next_run_datetime": None,
            "last_run_datetime": None,
        }
        stopping = False
        while True:
            try:
                api.connector.ping(self.connector_id, self.state(), info)
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


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "<redacted>")[:300] if secret else text[:300]
