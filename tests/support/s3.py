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
import pytest
from moto.server import ThreadedMotoServer

from connector.storage.s3 import S3Storage

__all__ = [
    "moto_server",
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
