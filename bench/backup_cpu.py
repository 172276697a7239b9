"""CPU cost and peak memory of one backup: `python -m bench.backup_cpu [N]`.

Starts the simulator with N `--bulk` events (a separate process), runs `opencti-sync run` on the
raw stream into a temporary local archive until the checkpoint reaches the last event, stops it
with SIGTERM, and prints the connector's CPU seconds (getrusage of the waited child, so the
figure does not depend on the machine's load) and peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import TOKEN, SimProcess


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    work = Path(tempfile.mkdtemp(prefix="opencti-sync-bench-"))
    archive = str(work / "archive")
    sim = None
    try:
        # On a free port (SimProcess): a fixed one met another server on a busy machine.
        sim = SimProcess(work, bulk=n, heartbeat=1)
        last = tuple(int(x) for x in sim.info()["last_event_id"].split("-"))
        env = dict(
            os.environ,
            OPENCTI_URL=sim.url,
            OPENCTI_TOKEN=TOKEN,
            CONNECTOR_LIVE_STREAM_ID="raw",
            ARCHIVE_URI=archive,
            ARCHIVE_MAX_AGE_SECS="1",
            CONNECTOR_LOG_FORMAT="json",
        )
        start = time.time()
        run = subprocess.Popen(
            [sys.executable, "-m", "connector", "run"], env=env, stderr=subprocess.DEVNULL
        )
        while True:
            try:
                cp = json.load(open(os.path.join(archive, "checkpoint.json")))["last_event_id"]
                if cp and tuple(int(x) for x in cp.split("-")) >= last:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        wall = time.time() - start
        run.terminate()
        run.wait()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = usage.ru_utime + usage.ru_stime
        stored = sum(f.stat().st_size for f in Path(archive, "events").rglob("*") if f.is_file())
        print(
            f"{n} events: wall {wall:.2f} s (with start-up and the last 1 s rotation age), "
            f"connector CPU {cpu:.2f} s = {n / cpu:,.0f} events per CPU-second, "
            f"peak RSS {usage.ru_maxrss / 1024:.0f} MB, segments {stored / 2**20:.1f} MiB"
        )
    finally:
        if sim is not None:
            sim.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
