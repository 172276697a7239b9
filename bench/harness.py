"""Processes the benchmark drives: the simulator, moto, the connector; and how they are watched.

Everything measured runs in its own process so that the connector, the simulator and S3 never
share a GIL. Peak memory comes from ``os.wait4`` (the kernel's ``ru_maxrss`` of that one child),
and durable progress from the connector's own checkpoint (its ``saved_at`` stamp, taken in the
connector process just before the checkpoint write).
"""

from __future__ import annotations

import datetime as dt
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from connector.checkpoint import CheckpointStore
from connector.events import EventId
from connector.storage import Storage

__all__ = [
    "ROOT",
    "TOKEN",
    "Child",
    "CheckpointWatch",
    "MotoProcess",
    "SimProcess",
    "connector_env",
    "free_port",
    "iso_to_epoch",
    "log_time",
]

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "sim-token"
S3_KEY, S3_SECRET, S3_REGION = "bench-access-key", "bench-secret-key", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def iso_to_epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    prefixes = ("OPENCTI_", "CONNECTOR_", "ARCHIVE_", "S3_", "TARGET_", "SNAPSHOT_", "RETENTION_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


class Child:
    """A child process whose peak RSS we read from ``wait4`` when it ends."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in wait()
        self.started = time.time()
        self.proc = subprocess.Popen(
            argv, env=_clean_env(env), stdout=self._log, stderr=self._log, cwd=str(cwd)
        )
        self.rc: int | None = None
        self.maxrss_mb: float = 0.0

    def terminate(self, timeout: float = 120) -> int:
        if self.rc is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 600) -> int:
        if self.rc is not None:
            return self.rc
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                pid, status, usage = os.wait4(self.proc.pid, 0)
                break
            time.sleep(0.02)
        self.proc.returncode = self.rc = os.waitstatus_to_exitcode(status)
        self.maxrss_mb = usage.ru_maxrss / 1024  # Linux reports KiB
        self._log.close()
        return self.rc

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def log_time(log: Path, message: str) -> float | None:
    """Epoch seconds of the first JSON log line with ``message`` (the connector logs in ms)."""
    for line in log.read_text(errors="replace").splitlines():
        if message in line and line.startswith("{"):
            try:
                return iso_to_epoch(orjson.loads(line)["timestamp"])
            except (orjson.JSONDecodeError, KeyError, ValueError):
                continue
    return None


class SimProcess:
    """``python -m connector.sim`` in its own process; ``url`` once it listens."""

    def __init__(self, work: Path, *, bulk: int = 0, heartbeat: float = 0.2, name: str = "sim"):
        argv = [sys.executable, "-m", "connector.sim", "--port", "0", "--token", TOKEN]
        argv += ["--heartbeat", str(heartbeat)]
        if bulk:
            argv += ["--bulk", str(bulk)]
        self.proc = subprocess.Popen(
            argv,
            env=_clean_env({}),
            stdout=subprocess.PIPE,
            stderr=open(work / f"{name}.log", "ab"),  # noqa: SIM115 - lives with the process
            cwd=str(work),
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 600
        line = b""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            if ready:
                line = self.proc.stdout.readline()
                break
            if self.proc.poll() is not None:
                break
        if not line.startswith(b"sim listening on "):
            self.stop()
            raise RuntimeError(f"simulator did not start: {line!r}")
        self.url = line.decode().split(" on ", 1)[1].strip()
        self.headers = {"Authorization": f"Bearer {TOKEN}"}
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=600)

    def info(self) -> dict[str, Any]:
        body: dict[str, Any] = self.http.get("/control/info").json()
        return body

    def generate(self, count: int) -> dict[str, Any]:
        body: dict[str, Any] = self.http.post(
            "/control/generate", json={"count": count, "mix": "bulk"}
        ).json()
        return body

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class MotoProcess:
    """moto's S3 server (``moto_server``) in its own process on a free port."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        exe = Path(sys.executable).with_name("moto_server")
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen(
            [*argv, "-H", "127.0.0.1", "-p", str(self.port)],
            env=_clean_env(self.aws_env()),
            stdout=subprocess.DEVNULL,
            stderr=open(work / "moto.log", "ab"),  # noqa: SIM115 - lives with the process
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(self.url + "/moto-api/", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not start")

    @staticmethod
    def aws_env() -> dict[str, str]:
        # Dummy credentials only; nothing can reach a real AWS account.
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        }

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=S3_REGION,
            aws_access_key_id=S3_KEY,
            aws_secret_access_key=S3_SECRET,
        ).create_bucket(Bucket=name)

    def storage_env(self) -> dict[str, str]:
        return {
            "S3_ENDPOINT_URL": self.url,
            "S3_ACCESS_KEY_ID": S3_KEY,
            "S3_SECRET_ACCESS_KEY": S3_SECRET,
            "S3_REGION": S3_REGION,
            "S3_PATH_STYLE": "true",
            **self.aws_env(),
        }

    def storage(self, bucket: str, prefix: str) -> Storage:
        from connector.storage.s3 import S3Storage

        return S3Storage(
            bucket=bucket,
            prefix=prefix,
            endpoint_url=self.url,
            access_key_id=S3_KEY,
            secret_access_key=S3_SECRET,
            region=S3_REGION,
            path_style=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def connector_env(sim_url: str, archive: str, **extra: Any) -> dict[str, str]:
    env = {
        "OPENCTI_URL": sim_url,
        "OPENCTI_TOKEN": TOKEN,
        # The raw /stream: the same bytes the raw-read ceiling and pycti read (see PERFORMANCE.md).
        "CONNECTOR_LIVE_STREAM_ID": "raw",
        "ARCHIVE_URI": archive,
        "ARCHIVE_MAX_AGE_SECS": "1",
        "CONNECTOR_LOG_FORMAT": "json",
        "CONNECTOR_LOG_LEVEL": "info",
        "CONNECTOR_BACKOFF_INITIAL_SECS": "0.05",
        "CONNECTOR_BACKOFF_MAX_SECS": "0.5",
        "METRICS_ENABLED": "false",
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class CpRecord:
    saved_at: float
    last_event_id: EventId
    events_archived: int


@dataclass
class CheckpointWatch:
    """Polls the checkpoint object and keeps every distinct state seen (in a thread)."""

    storage: Storage
    interval: float = 0.01
    records: list[CpRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._store = CheckpointStore(self.storage)

    def start(self) -> CheckpointWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def poll(self) -> None:
        try:
            cp = self._store.load()
        except Exception:  # noqa: BLE001 - a checkpoint being replaced is read again next poll
            return
        if cp is None or not cp.last_event_id or not cp.saved_at:
            return
        rec = CpRecord(
            iso_to_epoch(cp.saved_at), EventId.parse(cp.last_event_id), cp.events_archived
        )
        if not self.records or self.records[-1].saved_at != rec.saved_at:
            self.records.append(rec)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def wait_for(self, target: EventId, timeout: float) -> CpRecord:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.records and self.records[-1].last_event_id >= target:
                return self.records[-1]
            time.sleep(self.interval)
        raise TimeoutError(f"checkpoint did not reach {target} in {timeout}s")
