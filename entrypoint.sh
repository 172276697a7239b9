#!/bin/sh
# Container entrypoint: prepares the state directory, then replaces itself with opencti-sync so
# SIGTERM from 'docker stop' reaches the connector, which drains its open batch and exits 0.
#   /entrypoint.sh run | status --json | check | restore ... | any opencti-sync command
#   /entrypoint.sh healthcheck   (used by the image's HEALTHCHECK)
set -eu

if [ "${1:-}" = "healthcheck" ]; then
    # Healthy when the metrics endpoint answers; with HEALTHCHECK_MAX_LAG_SECS > 0, also when the
    # checkpoint lag is below it, once the first recovery is done (recovered events carry the
    # objects' old timestamps, so the lag means nothing while recover_progress is below 1; the
    # connector sets it to 1 when there is no recovery to do). METRICS_ENABLED / METRICS_PORT come from the environment, else from the image's
    # OPENCTI_SYNC_DEFAULTS (an empty value counts as unset, as for the connector); a config
    # file's metrics keys are not read here.
    exec python - <<'PY'
import os, shlex, sys, urllib.request
defaults = {}
for word in shlex.split(os.environ.get("OPENCTI_SYNC_DEFAULTS", "")):
    name, _, value = word.partition("=")
    defaults[name] = value
def setting(name, fallback):
    return os.environ.get(name, "").strip() or defaults.get(name, "").strip() or fallback
port = setting("METRICS_PORT", "9095")
limit = float(setting("HEALTHCHECK_MAX_LAG_SECS", "0"))
if setting("METRICS_ENABLED", "false").lower() not in ("1", "true", "yes", "on"):
    sys.exit("healthcheck needs METRICS_ENABLED=true")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        body = resp.read().decode()
except OSError as exc:
    sys.exit(f"metrics endpoint unreachable: {exc}")
samples = {}
for line in body.splitlines():
    name, _, value = line.partition(" ")
    if name in ("opencti_sync_checkpoint_lag_seconds", "opencti_sync_recover_progress_ratio"):
        samples[name] = float(value)
recovering = samples.get("opencti_sync_recover_progress_ratio", 1.0) < 1
if limit > 0 and not recovering:
    lag = samples.get("opencti_sync_checkpoint_lag_seconds", 0.0)
    if lag > limit:
        sys.exit(f"checkpoint lag {lag:.0f}s above {limit:.0f}s")
print("healthy (first recovery under way: lag not checked)" if limit > 0 and recovering else "healthy")
PY
fi

if [ -n "${OPENCTI_SYNC_WORK_DIR:-}" ]; then
    mkdir -p "$OPENCTI_SYNC_WORK_DIR"
fi

exec opencti-sync "$@"
