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

import httpx


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "connector.sim",
            "--port",
            "0",  # a free one, printed: a fixed port met another server on a busy machine
            "--token",
            "t",
            "--bulk",
            str(n),
            "--heartbeat",
            "1",
        ],
        stdout=subprocess.PIPE,
    )
    assert sim.stdout is not None
    listening = sim.stdout.readline().decode().split()
    if not listening or not listening[-1].startswith("http://"):
        sim.terminate()
        print(f"the simulator did not start: {' '.join(listening)!r}", file=sys.stderr)
        return 1
    url = listening[-1]
    archive = tempfile.mkdtemp(prefix="opencti-sync-bench-")
    try:
        info = httpx.get(f"{url}/control/info", headers={"Authorization": "Bearer t"}).json()
        last = tuple(int(x) for x in info["last_event_id"].split("-"))
        env = dict(
            os.environ,
            OPENCTI_URL=url,
            OPENCTI_TOKEN="t",
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
        sim.terminate()
        shutil.rmtree(archive, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
