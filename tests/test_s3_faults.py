"""S3Storage against a misbehaving network and misconfiguration: errors are classified right and
retried writes never duplicate or lose an object."""

# Fixtures are imported by name and then requested as parameters.
# ruff: noqa: F811

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from connector.checkpoint import CheckpointStore
from connector.errors import ConfigError, MissingBucket, NotFound, PermanentError, RetryableError
from connector.jobs import run_retention_job
from connector.retention import RetentionPolicy
from connector.snapshot import list_snapshots
from connector.storage.s3 import S3Storage
from tests.support.connector import ROOT
from tests.support.faultproxy import FaultProxy, fault_proxy  # noqa: F401
from tests.support.s3 import moto_server, raw_client, s3_settings  # noqa: F401
from tests.support.served import free_port, serving
from tests.test_retention import at_day, build_days

T = TypeVar("T")
# retries={"max_attempts": 2} means two retries after the first try.
BOTO_ATTEMPTS = 3


def _through(proxy: FaultProxy, settings: dict[str, Any], **extra: Any) -> S3Storage:
    return S3Storage(**{**settings, "endpoint_url": proxy.url, **extra})


def _retry(action: Callable[[], T], attempts: int = 30) -> T:
    """The pipeline's policy in miniature: retry RetryableError, let everything else out."""
    for _ in range(attempts - 1):
        try:
            return action()
        except RetryableError:
            continue
    return action()


def test_transparent_proxy_round_trip(fault_proxy: FaultProxy, s3_settings: dict) -> None:
    storage = _through(fault_proxy, s3_settings, multipart_threshold=1024 * 1024)
    big = os.urandom(6 * 1024 * 1024)
    assert storage.put_if_absent("a", b"1") and storage.put_if_absent("big", big)
    assert storage.get("a") == b"1" and storage.get("big") == big
    assert list(storage.list()) == ["a", "big"]
    assert fault_proxy.stats["forwarded"] == fault_proxy.stats["requests"] > 0


def test_single_fault_absorbed_by_boto_retry(fault_proxy: FaultProxy, s3_settings: dict) -> None:
    storage = _through(fault_proxy, s3_settings)
    fault_proxy.fail_next(1, "500")
    assert storage.put_if_absent("k", b"v") is True
    assert fault_proxy.stats["500"] == 1
    assert storage.get("k") == b"v"


@pytest.mark.parametrize(
    "kind", ["500", "503", "slowdown", "429", "reset", "reset_after_read", "reset_after_forward"]
)
def test_transient_faults_are_retryable(
    fault_proxy: FaultProxy, s3_settings: dict, kind: str
) -> None:
    storage = _through(fault_proxy, s3_settings)
    fault_proxy.fail_next(BOTO_ATTEMPTS, kind)
    with pytest.raises(RetryableError) as caught:
        storage.put_if_absent("k", b"v")
    assert "transient" in str(caught.value)
    assert fault_proxy.stats[kind] == BOTO_ATTEMPTS
    # The pipeline's next attempt: a write whose answer was lost shows up as already there.
    expect_written = kind != "reset_after_forward"
    assert storage.put_if_absent("k", b"v") is expect_written
    assert storage.get("k") == b"v"


def test_reads_and_lists_fail_retryably(fault_proxy: FaultProxy, s3_settings: dict) -> None:
    storage = _through(fault_proxy, s3_settings)
    body = os.urandom(200_000)
    storage.put("obj", body)
    for call in (
        lambda: storage.get("obj"),
        lambda: list(storage.list()),
        lambda: storage.size("obj"),
    ):
        fault_proxy.fail_next(BOTO_ATTEMPTS, "503")
        with pytest.raises(RetryableError):
            call()
    # A body cut off mid-stream surfaces as RetryableError from read(), not a botocore error.
    reader = storage.open("obj")
    reader.close()
    fault_proxy.fail_next(1, "truncate", method="GET")
    with pytest.raises(RetryableError):
        with storage.open("obj") as reader:
            reader.read()
    assert storage.get("obj") == body


def test_three_hundred_writes_through_a_flaky_network(
    fault_proxy: FaultProxy, s3_settings: dict
) -> None:
    storage = _through(fault_proxy, s3_settings)
    fault_proxy.configure(error_rate_5xx=0.10, reset_rate=0.02, slow_rate=0.01, slow_secs=0.05)
    keys = [f"events/{i:04d}.jsonl" for i in range(300)]
    # Threads only to keep boto's backoff sleeps from adding up; each key is still one loop.
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(
            pool.map(lambda k: _retry(lambda: storage.put_if_absent(k, k.encode())), keys)
        )
        listed = _retry(lambda: list(storage.list("events/")))
        bodies = list(pool.map(lambda k: _retry(lambda: storage.get(k)), keys))
    assert bodies == [key.encode() for key in keys]
    fault_proxy.clear()
    assert listed == keys  # every key exactly once, in order
    # Faults really happened, and a False only ever follows a write whose answer was lost.
    assert fault_proxy.stats["500"] + fault_proxy.stats["503"] > 10
    assert outcomes.count(False) <= fault_proxy.stats["reset_after_forward"]


def test_missing_bucket_is_permanent(s3_settings: dict) -> None:
    name = f"missing-{uuid.uuid4().hex}"
    storage = S3Storage(**{**s3_settings, "bucket": name})
    with pytest.raises(PermanentError, match=f"bucket '{name}' does not exist"):
        storage.check()
    with pytest.raises(PermanentError, match="does not exist"):
        storage.put_if_absent("k", b"v")
    with pytest.raises(PermanentError, match="does not exist"):
        list(storage.list())


def test_a_missing_bucket_is_not_a_missing_key(s3_settings: dict) -> None:
    """HEAD answers a missing bucket with a bare 404, as for a missing key: read as "nothing
    there", a mistyped or deleted bucket would look like an archive with no checkpoint, or a
    free lock."""
    name = f"missing-{uuid.uuid4().hex}"
    storage = S3Storage.from_uri(f"s3://{name}/archive", **_options(s3_settings))
    for call in (lambda: storage.exists("checkpoint.json"), lambda: storage.size("k")):
        with pytest.raises(MissingBucket, match=f"archive.uri: bucket '{name}' does not exist"):
            call()
    # The same error from the calls whose answer says NoSuchBucket: permanent, and a
    # configuration error (exit 2) naming the setting.
    with pytest.raises(MissingBucket) as caught:
        CheckpointStore(storage).load()
    assert isinstance(caught.value, PermanentError) and caught.value.key == "archive.uri"


def test_a_missing_key_in_an_existing_bucket_is_still_missing(
    fault_proxy: FaultProxy, s3_settings: dict
) -> None:
    storage = _through(fault_proxy, s3_settings)
    assert not storage.exists("nothing-here")
    with pytest.raises(NotFound):
        storage.size("nothing-here")
    # Credentials without s3:ListBucket: HeadBucket is refused (403). That says nothing about
    # the bucket, and a working setup must go on: the key is missing.
    fault_proxy.fail_next(1, "pass", method="HEAD")  # the object's HEAD: a real 404
    fault_proxy.fail_next(1, "access_denied", method="HEAD")  # the bucket's
    assert not storage.exists("nothing-here")
    assert fault_proxy.stats["access_denied"] == 1
    # A bucket HEAD failing for a transient reason: unknown now, so retryable, never "missing".
    fault_proxy.fail_next(1, "pass", method="HEAD")
    fault_proxy.fail_next(BOTO_ATTEMPTS, "503", method="HEAD")
    with pytest.raises(RetryableError):
        storage.size("nothing-here")
    storage.put("there", b"1")
    assert storage.exists("there") and storage.size("there") == 1


def _options(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in ("bucket", "prefix")}


def _cli_env(settings: dict[str, Any], tmp_path: Path, **env: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "OPENCTI_SYNC_WORK_DIR": str(tmp_path / "work"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "OPENCTI_URL": "http://127.0.0.1:9",
        "OPENCTI_TOKEN": "tok-missing-bucket",
        "CONNECTOR_LIVE_STREAM_ID": "live",
        "S3_ENDPOINT_URL": settings["endpoint_url"],
        "S3_ACCESS_KEY_ID": settings["access_key_id"],
        "S3_SECRET_ACCESS_KEY": settings["secret_access_key"],
        "S3_REGION": settings["region"],
        "S3_PATH_STYLE": "true",
        **env,
    }


@pytest.mark.parametrize("command", ["run", "status"])
@pytest.mark.parametrize("place", ["archive", "checkpoint"])
def test_run_and_status_on_a_missing_bucket_exit_2_naming_the_setting(
    s3_settings: dict, tmp_path: Path, command: str, place: str
) -> None:
    name = f"missing-{uuid.uuid4().hex}"
    if place == "archive":
        env = _cli_env(s3_settings, tmp_path, ARCHIVE_URI=f"s3://{name}/archive")
    else:  # the checkpoint kept apart in the missing bucket, beside a local archive
        env = _cli_env(
            s3_settings,
            tmp_path,
            ARCHIVE_URI=str(tmp_path / "archive"),
            CHECKPOINT_URI=f"s3://{name}/state",
        )
    out = subprocess.run(
        [sys.executable, "-m", "connector", command],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert f"configuration error: {place}.uri: bucket '{name}' does not exist" in out.stderr


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("403", "credentials rejected"),
        ("signature", "credentials rejected"),
        ("access_denied", "access denied"),
    ],
)
def test_rejected_credentials_are_permanent(
    fault_proxy: FaultProxy, s3_settings: dict, kind: str, expected: str
) -> None:
    storage = _through(fault_proxy, s3_settings)
    fault_proxy.fail_next(1, kind)
    with pytest.raises(PermanentError, match="access denied to bucket .*bad credentials"):
        storage.check()  # HeadBucket: S3 sends no body, only the 403
    fault_proxy.fail_next(1, kind)
    with pytest.raises(PermanentError, match=expected) as caught:
        storage.put_if_absent("k", b"v")
    assert fault_proxy.stats[kind] == 2  # not retried by boto either
    message = str(caught.value)
    assert s3_settings["secret_access_key"] not in message
    assert s3_settings["access_key_id"] not in message


def test_check_refuses_store_ignoring_conditional_writes(
    fault_proxy: FaultProxy, s3_settings: dict
) -> None:
    fault_proxy.drop_headers = {"if-none-match"}
    storage = _through(fault_proxy, s3_settings)
    with pytest.raises(PermanentError, match="ignores conditional writes"):
        storage.check()
    assert list(_through(fault_proxy, s3_settings).list()) == []  # probe removed


def test_a_store_without_if_match_is_said_and_lock_writes_still_happen(
    fault_proxy: FaultProxy, s3_settings: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """If-Match ignored (the header dropped) or refused (501): the locks' compare-and-swap
    becomes a plain write, confirmed by their re-read; ``check`` says so, and never fails."""
    fault_proxy.drop_headers = {"if-match"}
    storage = _through(fault_proxy, s3_settings)
    storage.check()
    assert "ignores If-Match" in caplog.text
    fault_proxy.drop_headers = set()
    storage.put("locks/run.json", b"old")
    _, tag = storage.get_with_tag("locks/run.json")
    storage.put("locks/run.json", b"renewed")
    assert storage.replace_if("locks/run.json", b"mine", tag) is False  # honoured: refused
    fault_proxy.fail_next(1, "501", method="PUT")
    assert storage.replace_if("locks/run.json", b"mine", tag) is True  # refused with 501
    assert storage.get("locks/run.json") == b"mine"
    assert "does not support If-Match" in caplog.text
    assert storage.replace_if("locks/run.json", b"again", tag) is True  # no longer asked
    assert fault_proxy.stats["501"] == 1


def test_a_lock_write_applied_but_unanswered_is_still_ours(
    fault_proxy: FaultProxy, s3_settings: dict
) -> None:
    """The answer to a lock's compare-and-swap is lost after S3 applied it: boto's retry of the
    same If-Match write is refused (412), and the lock must read its own record back rather
    than believe another process took it."""
    from connector.locks import JobLock

    storage = _through(fault_proxy, s3_settings)
    expired = b'{"owner": "dead", "job": "run", "expires_at": "2001-01-01T00:00:00+00:00"}'
    storage.put("locks/run.json", expired)
    lock = JobLock(storage, "run", ttl_secs=3600, key="locks/run.json")
    fault_proxy.fail_next(1, "slow", method="PUT")  # its put-if-absent, refused: forwarded
    fault_proxy.fail_next(1, "reset_after_forward", method="PUT")  # the take-over's write
    lock.acquire()
    try:
        assert lock.held
        fault_proxy.fail_next(1, "reset_after_forward", method="PUT")  # a renewal's write
        lock.renew()
        assert not lock.lost
        assert fault_proxy.stats["reset_after_forward"] == 2
    finally:
        lock.release()
    assert not storage.exists("locks/run.json")


def test_a_compare_and_swap_failing_for_a_moment_is_never_forced(
    fault_proxy: FaultProxy, s3_settings: dict
) -> None:
    """A lock's conditional replace failing for a moment (503 past boto's retries) is a
    RetryableError: only a 501 (no If-Match at all) makes it a plain write, which here would
    overwrite the record another process wrote since it was read."""
    storage = _through(fault_proxy, s3_settings)
    storage.put("locks/run.json", b"old")
    _, tag = storage.get_with_tag("locks/run.json")
    storage.put("locks/run.json", b"theirs")
    fault_proxy.fail_next(BOTO_ATTEMPTS, "503", method="PUT")
    with pytest.raises(RetryableError):
        storage.replace_if("locks/run.json", b"mine", tag)
    assert storage.get("locks/run.json") == b"theirs"
    assert storage.replace_if("locks/run.json", b"mine", tag) is False  # still compared


def test_no_credentials_anywhere_is_permanent(
    s3_settings: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No keys given and none in boto3's chain (env, files, instance role): a setup error to
    fix, not a failure to retry for ever."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    keyless = {
        k: v for k, v in s3_settings.items() if k not in ("access_key_id", "secret_access_key")
    }
    with pytest.raises(PermanentError, match="no usable AWS credentials"):
        S3Storage(**keyless).put_if_absent("k", b"v")


S3_TOKEN = "tok-SECRET-5e1d0a"


class _Echoing(http.server.BaseHTTPRequestHandler):
    """A store (or a proxy in front of it) whose error message quotes the request's
    credentials back: its session token and the access key id of its signature."""

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        quoted = f"{self.headers.get('X-Amz-Security-Token')} {self.headers.get('Authorization')}"
        body = (
            f"<Error><Code>InvalidArgument</Code><Message>bad request: {quoted}</Message></Error>"
        ).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        return None


def test_credentials_a_store_quotes_back_are_never_shown(s3_settings: dict) -> None:
    """The service's message is quoted in a rejection (it says what was wrong): the store's
    own access key id and session token are scrubbed out of it."""
    with serving(_Echoing) as url:
        storage = S3Storage(**{**s3_settings, "endpoint_url": url}, session_token=S3_TOKEN)
        with pytest.raises(PermanentError, match="rejected: HTTP 400 InvalidArgument") as caught:
            storage.put_if_absent("k", b"v")
    text = str(caught.value)
    assert "bad request: ***" in text
    assert S3_TOKEN not in text and s3_settings["access_key_id"] not in text


def test_a_probe_write_whose_answer_was_lost_is_still_a_working_store(
    fault_proxy: FaultProxy, s3_settings: dict
) -> None:
    """S3 stored the probe and the answer was lost: boto's retry of the same put-if-absent got
    412. The check called the store broken ("probe object unexpectedly exists") and `run`
    stopped."""
    storage = _through(fault_proxy, s3_settings)
    fault_proxy.fail_next(1, "reset_after_forward", method="PUT")
    storage.check()
    assert fault_proxy.stats["reset_after_forward"] == 1
    assert not [k for k in storage.list("") if k.startswith(".probe-")]


def test_a_proxy_that_is_down_is_transient(
    s3_settings: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a corporate proxy that restarts: botocore's ProxyConnectionError stopped the run
    as a permanent error, where a store that cannot be reached directly is waited for."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{free_port()}")
    storage = S3Storage(**s3_settings)
    with pytest.raises(RetryableError, match="ProxyConnectionError"):
        storage.check()


def test_https_to_a_plain_http_store_is_said_not_waited_for(s3_settings: dict) -> None:
    """A TLS handshake cut is transient now; one answered in plain HTTP is a wrong scheme."""
    url = s3_settings["endpoint_url"].replace("http://", "https://")
    storage = S3Storage(**{**s3_settings, "endpoint_url": url})
    with pytest.raises(PermanentError, match="does not answer in TLS"):
        storage.check()


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"bucket": "127.0.0.1:9000"}, "archive.uri"),
        ({"bucket": "my_bucket!"}, "archive.uri"),
        ({"prefix": "a/../b"}, "archive.uri"),
        ({"endpoint_url": "http://127.0.0.1:9000x"}, "s3.endpoint_url"),
        ({"endpoint_url": "127.0.0.1:9000"}, "s3.endpoint_url"),
        ({"endpoint_url": "ftp://minio:9000"}, "s3.endpoint_url"),
    ],
)
def test_bad_s3_settings_name_their_key(s3_settings: dict, options: dict, key: str) -> None:
    """botocore takes these when the client is built and fails on the first request (exit 1,
    or a traceback from `verify`): they are configuration errors, named as such."""
    with pytest.raises(ConfigError) as caught:
        S3Storage(**{**s3_settings, **options})
    assert caught.value.key == key


def test_check_unreachable_endpoint_is_retryable(s3_settings: dict) -> None:
    port = free_port()
    storage = S3Storage(**{**s3_settings, "endpoint_url": f"http://127.0.0.1:{port}"})
    with pytest.raises(RetryableError, match="cannot connect"):
        storage.check()
    assert "127.0.0.1" in storage.describe()


class _Redirecting(http.server.BaseHTTPRequestHandler):
    """An endpoint that sends every request elsewhere (nginx redirecting http to https)."""

    def _answer(self) -> None:
        self.send_response(301)
        self.send_header("Location", f"https://127.0.0.1:9{self.path}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _answer

    def log_message(self, *args: Any) -> None:
        return None


def test_an_endpoint_redirecting_every_request_is_one_clear_error(s3_settings: dict) -> None:
    """botocore asked again after each redirect until Python's recursion limit: a RecursionError
    and a 3,000-line traceback from check, run and status."""
    with serving(_Redirecting) as url:
        storage = S3Storage(**{**s3_settings, "endpoint_url": url})
        with pytest.raises(PermanentError, match="redirect"):
            storage.check()


def _client_error(status: int, code: str, message: str = "") -> Exception:
    from botocore.exceptions import ClientError

    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "PutObject")


@pytest.mark.parametrize(
    ("status", "code", "kind", "words"),
    [
        (403, "RequestTimeTooSkewed", RetryableError, "transient"),
        (400, "RequestTimeout", RetryableError, "transient"),
        (409, "ConditionalRequestConflict", RetryableError, "transient"),
        (400, "KMS.ThrottlingException", RetryableError, "transient"),
        (400, "KMS.NotFoundException", PermanentError, "KMS refused"),
        (403, "AccessDenied", PermanentError, "KMS refused"),  # message names kms:
        (403, "ExpiredToken", PermanentError, "credentials rejected"),
        (400, "InvalidStorageClass", PermanentError, "InvalidStorageClass: bad class ***"),
        (403, "InvalidObjectState", PermanentError, "archive storage class"),
        (501, "NotImplemented", PermanentError, "does not implement"),
        # A HEAD's answer has no body: its code is the status only.
        (501, "501", PermanentError, "does not implement"),
        (502, "502", RetryableError, "transient"),  # a proxy in front of the store
        (429, "TooManyRequests", RetryableError, "transient"),
        (400, "Throttled", RetryableError, "transient"),  # unlisted codes naming throttling
        (503, "ServiceUnavailable", RetryableError, "transient"),
    ],
)
def test_error_codes_moto_cannot_produce(
    status: int, code: str, kind: type[Exception], words: str
) -> None:
    # Real S3 answers that neither moto nor the proxy can provoke, classified directly.
    from connector.storage.s3 import classify_s3_error

    message = "not authorized to perform kms:GenerateDataKey" if code == "AccessDenied" else ""
    if code == "InvalidStorageClass":
        message = "bad class AKIASECRET"
    error = classify_s3_error(
        _client_error(status, code, message),
        action="write",
        target="s3://b/k",
        bucket="b",
        key="k",
        secrets=("AKIASECRET",),
    )
    assert isinstance(error, kind)
    assert words in str(error)
    assert "AKIASECRET" not in str(error)


def test_check_names_a_denied_write(fault_proxy: FaultProxy, s3_settings: dict) -> None:
    storage = _through(fault_proxy, s3_settings)
    fault_proxy.fail_next(1, "access_denied", method="PUT")  # HeadBucket passes, the probe not
    with pytest.raises(PermanentError, match=r"S3 write .*\.probe-.*access denied"):
        storage.check()
    assert fault_proxy.stats["access_denied"] == 1
    assert list(storage.list()) == []


def test_a_request_the_store_does_not_implement_is_permanent(
    fault_proxy: FaultProxy, s3_settings: dict
) -> None:
    """A store lacking a feature (If-None-Match, SSE-KMS on a MinIO without a KMS, a checksum
    algorithm) answers 501 every time: taken for a transient error, the pipeline retried the
    write for ever and `check` called it transient."""
    storage = S3Storage(**{**s3_settings, "endpoint_url": fault_proxy.url})
    fault_proxy.fail_next(1, "501", method="PUT")
    with pytest.raises(PermanentError, match="does not implement"):
        storage.put_if_absent("events/k", b"v")
    fault_proxy.fail_next(1, "501", method="PUT")  # the probe's If-None-Match write
    with pytest.raises(PermanentError, match="does not implement"):
        storage.check()


def test_folder_markers_are_not_listed_and_retention_goes_on(
    s3_settings: dict, tmp_path: Path
) -> None:
    """A zero-byte "folder" object (the AWS console's Create folder, s3fs, rclone) was listed as
    'snapshots/<id>/', a key the backend itself refuses: retention planned it, died on it after
    deleting the snapshot's manifest, and died the same way at every later run."""
    storage = S3Storage(**s3_settings)
    build_days(storage, tmp_path, days=4, snapshot_days={1, 2})
    oldest = list_snapshots(storage)[0]
    marker = f"{s3_settings['prefix'].strip('/')}/snapshots/{oldest.key}/"
    raw_client(s3_settings["endpoint_url"]).put_object(
        Bucket=s3_settings["bucket"], Key=marker, Body=b""
    )
    assert not [k for k in storage.list("snapshots/") if k.endswith("/")]
    report = run_retention_job(
        storage, RetentionPolicy(keep_days=1, keep_snapshots=0), now=at_day(5)
    )
    assert report.deleted > 0
    assert oldest.key not in {s.key for s in list_snapshots(storage)}


def test_storage_class_keeps_the_archive_readable(s3_settings: dict) -> None:
    """S3_STORAGE_CLASS applied to every write, the checkpoint and the locks included: with
    GLACIER the connector could not read its own lease or checkpoint back (and said "access
    denied"); with an infrequent-access class each checkpoint save and lease renewal was billed
    a minimum duration."""
    for unreadable in ("GLACIER", "DEEP_ARCHIVE"):
        with pytest.raises(ConfigError, match="s3.storage_class"):
            S3Storage(**s3_settings, storage_class=unreadable)
    storage = S3Storage(**s3_settings, storage_class="STANDARD_IA")
    storage.put("checkpoint.json", b"{}")
    assert storage.put_if_absent("locks/run.json", b"{}")
    assert storage.put_if_absent("events/2026/01/01/seg.jsonl.zst", b"x")
    client, prefix = raw_client(s3_settings["endpoint_url"]), s3_settings["prefix"].strip("/")

    def storage_class(key: str) -> str:
        head = client.head_object(Bucket=s3_settings["bucket"], Key=f"{prefix}/{key}")
        return str(head.get("StorageClass", "STANDARD"))

    assert storage_class("events/2026/01/01/seg.jsonl.zst") == "STANDARD_IA"
    assert storage_class("checkpoint.json") == "STANDARD"
    assert storage_class("locks/run.json") == "STANDARD"
