#!/bin/sh
# Container entrypoint: creates OPENCTI_SYNC_WORK_DIR when the environment sets it, if it can
# (the connector also creates its directories when it needs them, the image's defaults
# included), then replaces itself with opencti-sync so SIGTERM from 'docker stop' reaches the
# connector, which drains its open batch and exits 0.
#   /entrypoint.sh run | status --json | check | restore ... | any opencti-sync command
#   /entrypoint.sh healthcheck   (used by the image's HEALTHCHECK)
set -eu

if [ "${1:-}" = "healthcheck" ]; then
    # Healthy when the metrics endpoint answers; with HEALTHCHECK_MAX_LAG_SECS > 0, also when the
    # checkpoint lag is below it. While a recovery runs (the first one, or the repair of a
    # retention gap: recover_progress below 1) the lag means nothing, as recovered events carry
    # the objects' old timestamps: the checkpoint must then have been saved within that many
    # seconds instead (a recovery that stopped moving). A standby run (waiting for the run that
    # holds the archive) is healthy. METRICS_ENABLED / METRICS_PORT come from the environment,
    # else from the image's OPENCTI_SYNC_DEFAULTS (an empty value counts as unset, as for the
    # connector); a config file's metrics keys are not read here.
    exec python - <<'PY'
import math, os, shlex, sys, time, urllib.request
defaults = {}
for word in shlex.split(os.environ.get("OPENCTI_SYNC_DEFAULTS", "")):
    name, _, value = word.partition("=")
    defaults[name] = value
def setting(name, fallback):
    return os.environ.get(name, "").strip() or defaults.get(name, "").strip() or fallback
port = setting("METRICS_PORT", "9095")
raw = setting("HEALTHCHECK_MAX_LAG_SECS", "0")
try:
    limit = float(raw)
except ValueError:
    limit = math.nan
if not math.isfinite(limit):  # "30s" was a traceback; nan compared false: always healthy
    sys.exit(f"HEALTHCHECK_MAX_LAG_SECS must be a number of seconds (e.g. 300), not {raw!r}")
if setting("METRICS_ENABLED", "false").lower() not in ("1", "true", "yes", "on"):
    sys.exit("healthcheck needs METRICS_ENABLED=true")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
except OSError as exc:
    sys.exit(f"metrics endpoint unreachable: {exc}")
WANTED = (
    "opencti_sync_checkpoint_lag_seconds",
    "opencti_sync_recover_progress_ratio",
    "opencti_sync_checkpoint_saved_timestamp_seconds",
    "opencti_sync_standby",
)
samples = {}
for line in body.splitlines():
    name, _, value = line.partition(" ")
    if name in WANTED:
        samples[name] = float(value)
if samples.get("opencti_sync_standby", 0.0) >= 1:
    print("healthy (standby: another run holds the archive)")
    sys.exit(0)
recovering = samples.get("opencti_sync_recover_progress_ratio", 1.0) < 1
if limit > 0 and recovering:
    saved = samples.get("opencti_sync_checkpoint_saved_timestamp_seconds", 0.0)
    if saved > 0 and time.time() - saved > limit:
        sys.exit(f"recovery stuck: no checkpoint saved for {time.time() - saved:.0f}s (above {limit:.0f}s)")
elif limit > 0:
    lag = samples.get("opencti_sync_checkpoint_lag_seconds", 0.0)
    if lag > limit:
        sys.exit(f"checkpoint lag {lag:.0f}s above {limit:.0f}s")
print("healthy (recovery under way: progress checked, not the lag)" if limit > 0 and recovering else "healthy")
PY
fi

if [ -n "${OPENCTI_SYNC_WORK_DIR:-}" ]; then
    # Not fatal (set -e): most commands never use the work dir, and one that does names the
    # directory in its own error.
    mkdir -p "$OPENCTI_SYNC_WORK_DIR" || true
fi

exec opencti-sync "$@"
