"""The pycti baseline: pycti's own ``ListenStream`` thread with a backup-files style callback.

Run as a child process: ``python -m bench.pycti_baseline URL TOKEN COUNT OUT_DIR``; prints one
JSON line ``{"events": n, "secs": s}`` and exits.

``OpenCTIConnectorHelper.__init__`` registers a connector on a real platform (GraphQL + RabbitMQ),
which the simulator does not offer. ``ListenStream`` itself only needs from its helper a logger,
``get_state`` / ``set_state`` and ``date_now_z``; we hand it a small object whose three methods
*are* pycti's own helper methods (taken from the class, not re-implemented), so the read loop,
the SSE client (filigran-sseclient over requests) and the per-event state round-trip (json
dumps/loads of the state dict after every event) are exactly what a stream connector runs.

The callback does what the backup-files connector does per event (our own code, same work):
parse the event, pick ``<out>/opencti_data/<created_at rounded to the minute>/``, and write the
object as a pretty-printed single-object bundle to ``<stix id>.json`` (no fsync, like it).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pycti.connector.opencti_connector_helper import ListenStream, OpenCTIConnectorHelper
from pycti.utils.opencti_logger import logger as pycti_logger

__all__ = ["MinimalHelper", "BackupFilesCallback", "main"]


class MinimalHelper:
    """What ``ListenStream.run`` touches on its helper; the methods are pycti's."""

    get_state = OpenCTIConnectorHelper.get_state
    set_state = OpenCTIConnectorHelper.set_state
    date_now_z = OpenCTIConnectorHelper.date_now_z

    def __init__(self) -> None:
        self.connector_state: str | None = None
        self.connector_logger = pycti_logger("ERROR")("bench-pycti")


def _minute_dir(created_at: str) -> str:
    when = dt.datetime.fromisoformat(created_at.replace("Z", "+00:00"))
    if when.second >= 30:
        when += dt.timedelta(minutes=1)
    return when.replace(second=0, microsecond=0).strftime("%Y%m%dT%H%M%SZ")


class BackupFilesCallback:
    """One JSON file per create/update event, like the backup-files connector."""

    def __init__(self, out: Path, count: int) -> None:
        self.root = out / "opencti_data"
        self.root.mkdir(parents=True, exist_ok=True)
        self.count = count
        self.seen = 0
        self.done = threading.Event()
        self.finished = 0.0

    def __call__(self, msg: Any) -> None:
        payload = json.loads(msg.data)
        stix = payload["data"]
        if msg.event in ("create", "update"):
            ext = stix.get("extensions", {}).get(
                "extension-definition--ea279b3e-5c71-4632-ac08-831c66a786ba", {}
            )
            folder = self.root / _minute_dir(ext.get("created_at") or stix["created"])
            if not folder.exists():
                folder.mkdir()
            bundle = {"type": "bundle", "id": f"bundle--{stix['id'].split('--')[1]}"}
            bundle["objects"] = [stix]
            with open(folder / f"{stix['id']}.json", "w") as fh:
                fh.write(json.dumps(bundle, indent=4))
        self.seen += 1
        if self.seen == self.count:
            # The stream thread keeps going after this; the measurement is these first events.
            self.finished = time.perf_counter()
            self.done.set()


def main(argv: list[str]) -> int:
    url, token, count, out = argv[0], argv[1], int(argv[2]), Path(argv[3])
    callback = BackupFilesCallback(out, count)
    stream = ListenStream(
        MinimalHelper(),
        callback,
        f"{url}/stream",
        token,
        False,
        None,  # start_from: first run -> "0-0"
        None,
        True,
        False,
        "false",  # recover: off (the raw stream has no recover mode)
        False,
    )
    stream.daemon = True
    start = time.perf_counter()
    stream.start()
    if not callback.done.wait(3600):
        print(json.dumps({"error": f"only {callback.seen} events"}), flush=True)
        os._exit(1)
    print(json.dumps({"events": callback.count, "secs": callback.finished - start}), flush=True)
    # ListenStream has no way to interrupt a blocked read; the process ends instead.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
