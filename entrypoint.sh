#!/bin/sh
# Container entrypoint: prepares the state directory, then replaces itself with opencti-sync so
# SIGTERM from 'docker stop' reaches the connector, which drains its open batch and exits 0.
#   /entrypoint.sh run | status --json | check | restore ... | any opencti-sync command
#   /entrypoint.sh healthcheck   (used by the image's HEALTHCHECK)
set -eu

if [ "${1:-}" = "healthcheck" ]; then
    # Healthy when the metrics endpoint answers; with HEALTHCHECK_MAX_LAG_SECS > 0, also when the
    # checkpoint lag is below it (off by default: a first-run recovery has a large lag).
    exec python - <<'PY'
import os, sys, urllib.request
port = os.environ.get("METRICS_PORT", "9095")
limit = float(os.environ.get("HEALTHCHECK_MAX_LAG_SECS", "0") or 0)
if os.environ.get("METRICS_ENABLED", "false").lower() not in ("1", "true", "yes", "on"):
    sys.exit("healthcheck needs METRICS_ENABLED=true")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
except OSError as exc:
    sys.exit(f"metrics endpoint unreachable: {exc}")
if limit > 0:
    for line in body.splitlines():
        if line.startswith("opencti_sync_checkpoint_lag_seconds "):
            lag = float(line.split()[1])
            if lag > limit:
                sys.exit(f"checkpoint lag {lag:.0f}s above {limit:.0f}s")
print("healthy")
PY
fi

if [ -n "${OPENCTI_SYNC_WORK_DIR:-}" ]; then
    mkdir -p "$OPENCTI_SYNC_WORK_DIR"
fi

exec opencti-sync "$@"
