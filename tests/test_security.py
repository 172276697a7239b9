"""Security: secrets never leak, TLS is verified by default, untrusted strings never become
paths, a restore never overwrites its own source platform unless forced."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import certifi
import httpx
import pytest

from connector.errors import PermanentError, StreamGoneError
from connector.sim.generator import generate
from connector.sim.server import SimServer
from connector.storage.local import LocalStorage
from connector.storage.s3 import S3Storage
from tests.support.connector import (
    ROOT,
    ConnectorProcess,
    ConnectorThread,
    archived_events,
    base_env,
    caught_up,
    wait_until,
)
from tests.support.faultproxy import FaultProxy
from tests.support.s3 import ACCESS_KEY, REGION, make_bucket, moto_server  # noqa: F401
from tests.support.served import free_port
from tests.support.tls import TlsRelay, make_certs, server_context

# Recognisable secrets: moto accepts any key pair, the simulator is given this token.
TOKEN = "tok-SECRET-3f9a1c77e2b84d0d9b6a"
S3_SECRET = "s3sec-SECRET-a61f0c29d4e7b813"


def _s3_env(bucket: str, endpoint: str) -> dict[str, str]:
    return {
        "S3_ENDPOINT_URL": endpoint,
        "S3_ACCESS_KEY_ID": ACCESS_KEY,
        "S3_SECRET_ACCESS_KEY": S3_SECRET,
        "S3_REGION": REGION,
        "S3_PATH_STYLE": "true",
    }


def _cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    full = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "AWS_EC2_METADATA_DISABLED": "true"}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        env=full,
        capture_output=True,
        timeout=120,
        cwd=cwd,
    )


def test_secrets_never_appear_in_any_output(
    moto_server: str,  # noqa: F811 - fixture
    tmp_path: Path,
) -> None:
    """Full backup (with retried failures on both sides) + status + verify + failing runs;
    every log line, stdout/stderr, archive object and metrics scrape is scanned."""
    bucket = make_bucket(moto_server)
    outputs: dict[str, bytes] = {}
    with (
        SimServer(token=TOKEN, heartbeat_secs=0.2) as sim,
        FaultProxy(moto_server, seed=9, error_rate_5xx=0.1, reset_rate=0.02) as proxy,
    ):
        generate(sim.store, 200, seed=91)
        sim.set_fault(fail_next={"status": 500, "count": 2})
        port = free_port()
        env = base_env(
            sim.url,
            TOKEN,
            f"s3://{bucket}/archive",
            METRICS_ENABLED="true",
            METRICS_HOST="127.0.0.1",
            METRICS_PORT=str(port),
            CONNECTOR_LOG_LEVEL="debug",
            **_s3_env(bucket, proxy.url),
        )
        log = tmp_path / "run.log"
        proc = ConnectorProcess(env, log)
        direct = S3Storage(
            bucket=bucket,
            prefix="archive",
            endpoint_url=moto_server,
            access_key_id=ACCESS_KEY,
            secret_access_key=S3_SECRET,
            region=REGION,
            path_style=True,
        )
        wait_until(lambda: caught_up(direct, sim.store.last_event_id or "0-0"), timeout=90)
        outputs["metrics"] = httpx.get(f"http://127.0.0.1:{port}/metrics").content
        sim.drop_connections()  # a reconnect, logged with its request parameters
        generate(sim.store, 10, seed=92)
        wait_until(lambda: caught_up(direct, sim.store.last_event_id or "0-0"), timeout=90)
        assert proc.terminate() == 0
        outputs["run log"] = log.read_bytes()
        s3 = _s3_env(bucket, moto_server)
        for args in (("status", "--json"), ("status",), ("verify",), ("check",)):
            done = _cli({**env, **s3}, tmp_path, *args)
            outputs[" ".join(args)] = done.stdout + done.stderr
        # Failures print exception messages: a refused token, S3 refusing the key.
        done = _cli({**env, **s3, "OPENCTI_TOKEN": TOKEN + "-wrong"}, tmp_path, "run")
        assert done.returncode == 1
        outputs["run with a refused token"] = done.stdout + done.stderr
        proxy.fail_next(50, "403")
        done = _cli({**env, "CONNECTOR_BACKOFF_MAX_SECS": "0.1"}, tmp_path, "run")
        assert done.returncode != 0
        outputs["run with S3 refusing"] = done.stdout + done.stderr
        for key in direct.list(""):
            outputs[f"archive object {key}"] = direct.get(key)
    assert any(k.startswith("archive object events/") for k in outputs)
    assert b"opencti_sync_events_written" in outputs["metrics"]
    for name, data in outputs.items():
        for secret in (TOKEN, S3_SECRET):
            assert secret.encode() not in data, f"{secret[:8]}... leaked into {name}"


def test_tls_verified_by_default_for_the_platform(tmp_path: Path) -> None:
    files = make_certs(tmp_path / "tls")
    with SimServer(token=TOKEN, heartbeat_secs=0.2, ssl_context=server_context(files)) as sim:
        assert sim.url.startswith("https://")
        generate(sim.store, 20, seed=93)
        archive = tmp_path / "a"
        run = ConnectorThread(base_env(sim.url, TOKEN, str(archive))).start()
        run.join(60)
        # An unverifiable certificate stops the run with a message naming the fix.
        assert isinstance(run.error, StreamGoneError) and "OPENCTI_CA_BUNDLE" in str(run.error)
        assert not archived_events(str(archive)), "data read over an unverified connection"
        env = base_env(sim.url, TOKEN, str(archive), OPENCTI_CA_BUNDLE=str(files.ca_pem))
        run = ConnectorThread(env).start()
        wait_until(lambda: caught_up(LocalStorage(archive), sim.store.last_event_id or "0-0"))
        run.stop()
        assert run.error is None and archived_events(str(archive))
        # `check` verifies it too: FAIL (exit 1) until the CA bundle is given.
        env = {"OPENCTI_URL": sim.url, "OPENCTI_TOKEN": TOKEN, "ARCHIVE_URI": str(archive)}
        done = _cli(env, tmp_path, "check")
        assert done.returncode == 1 and done.stdout.startswith(b"source   FAIL"), done.stdout
        done = _cli({**env, "OPENCTI_CA_BUNDLE": str(files.ca_pem)}, tmp_path, "check")
        assert done.returncode == 0 and done.stdout.startswith(b"source   OK"), done.stdout
        # Verification turned off wins over a bundle (the system's here, which does not
        # trust this server) left in the environment, as on the target.
        off = {**env, "OPENCTI_SSL_VERIFY": "false", "OPENCTI_CA_BUNDLE": certifi.where()}
        done = _cli(off, tmp_path, "check")
        assert done.returncode == 0 and done.stdout.startswith(b"source   OK"), done.stdout


def test_tls_verified_by_default_for_s3(
    moto_server: str,  # noqa: F811 - fixture
    tmp_path: Path,
) -> None:
    files = make_certs(tmp_path / "tls")
    bucket = make_bucket(moto_server)
    with (
        TlsRelay(moto_server, server_context(files)) as relay,
        SimServer(token=TOKEN, heartbeat_secs=0.2) as sim,
    ):
        generate(sim.store, 20, seed=94)
        env = base_env(sim.url, TOKEN, f"s3://{bucket}/archive", **_s3_env(bucket, relay.url))
        run = ConnectorThread(env).start()
        run.join(60)
        assert isinstance(run.error, PermanentError) and "TLS" in str(run.error)
        assert relay.handshake_failures >= 1
        run = ConnectorThread({**env, "S3_CA_BUNDLE": str(files.ca_pem)}).start()
        direct = S3Storage(
            bucket=bucket,
            prefix="archive",
            endpoint_url=moto_server,
            access_key_id=ACCESS_KEY,
            secret_access_key=S3_SECRET,
            region=REGION,
            path_style=True,
        )
        wait_until(lambda: caught_up(direct, sim.store.last_event_id or "0-0"))
        run.stop()
        assert run.error is None


def test_a_token_given_on_the_command_line_is_redacted_as_a_configured_one(
    tmp_path: Path,
) -> None:
    """``--token`` (restore, verify) reaches the log redactor with the configured secrets."""
    from connector.__main__ import _settings, build_parser

    argv = ["verify", "--archive", str(tmp_path / "a"), "--against-opencti", "http://b:8080"]
    args = build_parser().parse_args([*argv, "--token", f" {TOKEN}\n"])
    assert TOKEN in _settings(args).secrets() and args.token == TOKEN


@pytest.mark.parametrize(
    "key", ["../escape", "a/../../b", "/etc/passwd", "a//b", "./a", "a\\..\\b", ""]
)
def test_storage_refuses_keys_that_climb_out(tmp_path: Path, key: str) -> None:
    storage = LocalStorage(tmp_path / "root")
    with pytest.raises(PermanentError):
        storage.put(key, b"x")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "b").exists()


def test_restore_refuses_the_source_platform_unless_forced(tmp_path: Path) -> None:
    with SimServer(token=TOKEN, heartbeat_secs=0.2) as sim:
        generate(sim.store, 30, seed=95, mix="creates")
        archive = tmp_path / "a"
        run = ConnectorThread(base_env(sim.url, TOKEN, str(archive))).start()
        wait_until(lambda: caught_up(LocalStorage(archive), sim.store.last_event_id or "0-0"))
        run.stop()
        before = sim.store.event_count
        args = ("restore", "--archive", str(archive), "--opencti", sim.url, "--token", TOKEN)
        args += ("--work-dir", str(tmp_path / "w"))
        refused = _cli({}, tmp_path, *args)
        assert refused.returncode != 0
        assert b"source" in refused.stderr + refused.stdout
        assert TOKEN.encode() not in refused.stderr + refused.stdout
        assert sim.store.event_count == before  # nothing written
        forced = _cli({}, tmp_path, *args, "--force")
        assert forced.returncode == 0, forced.stderr[-2000:]
