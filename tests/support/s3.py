"""pytest fixtures for a real S3 API: moto's threaded server on 127.0.0.1 and fresh buckets.

Import them explicitly where needed::

    from tests.support.s3 import moto_server, s3_settings, s3_storage  # noqa: F401
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import botocore.exceptions as bce
import pytest
from moto.server import ThreadedMotoServer

from connector.storage.s3 import S3Storage
from tests.support.cuts import Plan

__all__ = [
    "CutS3Storage",
    "moto_server",
    "s3_failure",
    "s3_operation",
    "s3_settings",
    "s3_storage",
    "s3_uri_and_options",
    "make_bucket",
    "raw_client",
]

REGION = "us-east-1"
ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"

# Dummy credentials and no shared config for the whole session: nothing can reach a real AWS
# account or the developer's profile; restored when the session ends.
_ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS_KEY,
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Endpoint URL of an in-process moto S3 server bound to a free port on 127.0.0.1."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _ENV.items():
            patch.setenv(name, value)
        patch.delenv("AWS_SESSION_TOKEN", raising=False)
        patch.delenv("AWS_PROFILE", raising=False)
        # werkzeug logs every request at INFO; keep test output readable.
        werkzeug = logging.getLogger("werkzeug")
        level = werkzeug.level
        werkzeug.setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()
            werkzeug.setLevel(level)


def raw_client(endpoint_url: str) -> Any:
    """Plain boto3 on the test server: what another tool does to the bucket, beside the code
    under test."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


def make_bucket(endpoint_url: str, name: str | None = None) -> str:
    """Create a bucket on the server with plain boto3 and return its name."""
    bucket = name or f"test-{uuid.uuid4().hex}"
    raw_client(endpoint_url).create_bucket(Bucket=bucket)
    return bucket


def storage_settings(endpoint_url: str, bucket: str) -> dict[str, Any]:
    """S3Storage keyword arguments for ``bucket``'s ``archive/`` prefix on the test server."""
    return {
        "bucket": bucket,
        "prefix": "archive",
        "endpoint_url": endpoint_url,
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
        "region": REGION,
        "path_style": True,
    }


@pytest.fixture
def s3_settings(moto_server: str) -> dict[str, Any]:
    """S3Storage keyword arguments for a fresh, empty bucket."""
    return storage_settings(moto_server, make_bucket(moto_server))


@pytest.fixture
def s3_storage(s3_settings: dict[str, Any]) -> S3Storage:
    return S3Storage(**s3_settings)


def s3_uri_and_options(settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split S3Storage kwargs into what ``open_storage(uri, **options)`` takes."""
    options = {k: v for k, v in settings.items() if k not in ("bucket", "prefix")}
    return f"s3://{settings['bucket']}/{settings.get('prefix', '')}", options


def s3_operation(operation: str, params: dict[str, Any]) -> str:
    """An S3 request's operation, a PUT by its condition (``PutIfAbsent``, ``ReplaceIf``,
    ``Put``)."""
    if operation != "PutObject":
        return operation
    if "IfNoneMatch" in params:
        return "PutIfAbsent"
    return "ReplaceIf" if "IfMatch" in params else "Put"


def s3_failure(label: str, applied: bool) -> BaseException:
    """What botocore raises for a request cut (``cuts.Plan``'s ``failure``): a read timeout once
    the request went (its answer lost), or no connection before it."""
    if applied:
        return bce.ReadTimeoutError(endpoint_url=f"cut: {label}")
    return bce.EndpointConnectionError(endpoint_url=f"cut: {label}")


class CutS3Storage(S3Storage):
    """Our S3 storage, its real boto3 client hooked: every request is a call of ``plan``,
    named by ``label``. botocore's own retries of a request happen between the two hooks:
    a cut request is one call, however often it was sent."""

    def __init__(self, plan: Plan, **settings: Any) -> None:
        super().__init__(**settings)
        self.plan = plan
        events = self._client.meta.events
        events.register("before-parameter-build.s3", self._before_request)
        events.register("after-call.s3", self._after_request)

    def label(self, operation: str, params: dict[str, Any]) -> str:
        """How a request is named in the plan (by default its operation and key)."""
        return f"{s3_operation(operation, params)} {params.get('Key', '')}"

    def _before_request(self, params: dict[str, Any], model: Any, context: Any, **_: Any) -> None:
        context["cut_call"] = self.plan.before(self.label(model.name, params))

    def _after_request(self, parsed: dict[str, Any], context: Any, **_: Any) -> None:
        try:
            self.plan.after(context["cut_call"])
        except BaseException:
            body = parsed.get("Body")
            if body is not None:
                body.close()  # an answer not read: its connection back to the pool
            raise
