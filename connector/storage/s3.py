"""An S3 bucket (or any S3-compatible endpoint) as archive storage.

``put_if_absent`` relies on S3 conditional writes (``If-None-Match: *``): the service itself
refuses to replace an existing object, so two writers of the same key cannot both win and a
retried write of a batch is harmless. Bodies above ``multipart_threshold`` go through a multipart
upload whose *completion* carries the same condition.

Every botocore/urllib3 failure is translated here into ``RetryableError`` / ``PermanentError`` /
``NotFound``. This module never sleeps or loops: boto3 keeps a small built-in retry and the
pipeline owns the retry policy. Credentials are handed to boto3 only; they never appear in
``repr``, ``describe()`` or error messages.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, NoReturn, cast
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bce
import urllib3.exceptions as u3e
from botocore.config import Config

from ..errors import (
    ConfigError,
    ConnectorError,
    MissingBucket,
    NotFound,
    PermanentError,
    RetryableError,
)
from . import Body, body_size, check_key

__all__ = ["S3Storage", "classify_s3_error"]

_MIN_PART = 5 * 1024 * 1024  # S3's smallest allowed part (all but the last)
_MAX_PARTS = 10_000
_SSE_MODES = ("AES256", "aws:kms", "aws:kms:dsse")

# Codes worth another try whatever their HTTP status (RequestTimeout is a 400,
# RequestTimeTooSkewed a 403). ConditionalRequestConflict (409) means a concurrent conditional
# write of the same key is in flight: the other writer may still fail, so "already there" would
# be a guess; a retry gets a definite 412 or a success.
# Storage classes whose objects cannot be read without a restore request first.
_UNREADABLE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})
# Keys rewritten in place (see ``S3Storage._args``).
_REWRITTEN = ("checkpoint.json", "locks/")
_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "PriorRequestNotComplete",
        "OperationAborted",
        "ConditionalRequestConflict",
        "KMS.KMSThrottlingException",
        "KMS.ThrottlingException",
    }
)
_BAD_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
    }
)
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412"})

# Transport failures below botocore that may surface while streaming a body.
_TRANSIENT_TRANSPORT = (
    bce.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError, ...
    bce.EndpointConnectionError,
    bce.ConnectTimeoutError,
    bce.IncompleteReadError,
    bce.CredentialRetrievalError,  # instance-metadata hiccups
    bce.ConnectionError,  # a proxy restarting (ProxyConnectionError), a TLS handshake cut
    u3e.ProtocolError,
    u3e.TimeoutError,
    u3e.NewConnectionError,
    ConnectionError,  # builtin: resets, broken pipes
    TimeoutError,
)

log = logging.getLogger(__name__)


class S3Storage:
    """Objects live at ``s3://bucket/prefix/<key>``; keys use ``/`` like LocalStorage keys."""

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        region: str | None = None,
        endpoint_url: str | None = None,
        path_style: bool = False,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        verify: bool = True,
        ca_bundle: str | None = None,
        sse: str | None = None,
        kms_key_id: str | None = None,
        storage_class: str | None = None,
        multipart_threshold: int = 64 * 1024 * 1024,
        connect_timeout: float = 10,
        read_timeout: float = 60,
        setting: str = "archive.uri",
    ) -> None:
        """``setting``: the configuration key that names the bucket (and the prefix)."""
        if not _BUCKET.fullmatch(bucket):
            hint = ": an endpoint goes in s3.endpoint_url" if ":" in bucket else ""
            raise ConfigError(setting, f"invalid bucket name {bucket[:80]!r}{hint}")
        if endpoint_url is not None:
            _check_endpoint(endpoint_url)
        if (access_key_id is None) != (secret_access_key is None):
            raise ConfigError(
                "s3.access_key_id", "access_key_id and secret_access_key must be given together"
            )
        if sse is not None and sse not in _SSE_MODES:
            raise ConfigError("s3.sse", f"must be one of {', '.join(_SSE_MODES)} (got {sse!r})")
        if kms_key_id and not (sse or "").startswith("aws:kms"):
            raise ConfigError("s3.kms_key_id", "only meaningful with sse: aws:kms")
        if ca_bundle is not None and not os.path.isfile(ca_bundle):
            raise ConfigError("s3.ca_bundle", f"no such file {ca_bundle!r}")
        if multipart_threshold < 1:
            raise ConfigError("s3.multipart_threshold", "must be positive")
        if storage_class in _UNREADABLE_CLASSES:
            raise ConfigError(
                "s3.storage_class",
                f"{storage_class} objects cannot be read until restored one by one: the archive "
                "would be unreadable to verify, restore and retention (GLACIER_IR or "
                "STANDARD_IA keep it readable)",
            )
        self.bucket = bucket
        self.setting = setting
        self.prefix = _normalise_prefix(prefix, setting)
        self.endpoint_url = endpoint_url
        self.multipart_threshold = multipart_threshold
        # Only used to scrub them out of any service message we quote.
        self._secrets = tuple(s for s in (access_key_id, secret_access_key, session_token) if s)
        self._write_args: dict[str, str] = {}
        self._conditional_replace = True  # If-Match on writes, until the store says 501
        if sse:
            self._write_args["ServerSideEncryption"] = sse
        if kms_key_id:
            self._write_args["SSEKMSKeyId"] = kms_key_id
        # Records rewritten in place (the checkpoint, the locks) keep the bucket's default
        # class: each start reads them back, and an infrequent-access class bills every
        # overwrite a minimum duration.
        self._record_args = dict(self._write_args)
        if storage_class:
            self._write_args["StorageClass"] = storage_class
        try:
            # Explicit keys when given, otherwise boto3's chain (env, profile, instance role).
            session = boto3.session.Session(
                aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                aws_session_token=session_token,
                profile_name=profile,
                region_name=region,
            )
            config = Config(
                retries={"max_attempts": 2, "mode": "standard"},
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                s3={"addressing_style": "path" if path_style else "auto"},
            )
            self._client: Any = session.client(
                "s3",
                endpoint_url=endpoint_url,
                config=config,
                verify=ca_bundle if ca_bundle is not None else verify,
            )
        except bce.ProfileNotFound as exc:
            raise ConfigError("s3.profile", f"AWS profile {profile!r} not found") from exc
        except (bce.BotoCoreError, ValueError) as exc:
            raise ConfigError("s3", f"cannot build the S3 client: {type(exc).__name__}") from exc

    @classmethod
    def from_uri(cls, uri: str, *, setting: str = "archive.uri", **options: object) -> S3Storage:
        """``s3://bucket/prefix`` plus S3 options (as in ``__init__``, strings accepted);
        ``setting`` is the key a bad URI is reported under."""
        parts = urlsplit(uri)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(setting, "expected s3://bucket/prefix")
        if "@" in parts.netloc or parts.query or parts.fragment:
            raise ConfigError(
                setting, "s3:// URIs carry no credentials or query; use the s3 options"
            )
        kwargs: dict[str, Any] = {}
        for name, value in options.items():
            if value is None:
                continue
            kind = _OPTION_TYPES.get(name)
            if kind is None:
                raise ConfigError(f"s3.{name}", "unknown S3 option")
            kwargs[name] = _coerce(name, value, kind)
        return cls(bucket=parts.netloc, prefix=parts.path, setting=setting, **kwargs)

    def __repr__(self) -> str:
        return f"S3Storage({self.describe()!r})"

    def describe(self) -> str:
        uri = f"s3://{self.bucket}/{self.prefix}"
        if self.endpoint_url:
            host = urlsplit(self.endpoint_url).hostname or "?"
            port = urlsplit(self.endpoint_url).port
            uri += f" (endpoint {host}{f':{port}' if port else ''})"
        return uri

    # -- keys -------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    # -- protocol -----------------------------------------------------------------------------

    def check(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._bucket_error(exc) from exc
        probe = f".probe-{uuid.uuid4().hex}"
        # A fresh name: found there means this very write, whose answer was lost and which
        # botocore's retry then met (412).
        if not self.put_if_absent(probe, b"probe") and self.get(probe) != b"probe":
            raise PermanentError(f"{self.describe()}: probe object unexpectedly exists")
        try:
            # A store that ignores If-None-Match would silently allow overwrites: catch it now.
            if self.put_if_absent(probe, b"probe"):
                raise PermanentError(
                    f"{self.describe()}: the endpoint ignores conditional writes (If-None-Match);"
                    " the archive needs them to stay duplicate-free"
                )
            if self.replace_if(probe, b"probe", '"not-the-probe"'):
                # Not fatal: a lock take-over is then confirmed by a re-read only.
                log.warning(
                    "This S3 store ignores If-Match on writes: two standby runs taking over "
                    "the same expired lease at the same moment could both start.",
                    extra={"bucket": self.bucket},
                )
        finally:
            self.delete(probe)

    def _args(self, key: str) -> dict[str, str]:
        return self._record_args if key.startswith(_REWRITTEN) else self._write_args

    def put_if_absent(self, key: str, body: Body) -> bool:
        full = self._key(key)
        size = body_size(body)
        if size > self.multipart_threshold:
            return self._multipart_if_absent(key, full, body, size)
        if not isinstance(body, bytes):
            body.seek(0)  # botocore reads a file body from here (and seeks back to retry)
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=full, Body=body, IfNoneMatch="*", **self._args(key)
            )
        except Exception as exc:
            if _is_precondition(exc):
                return False
            raise self._error(exc, "write", key) from exc
        return True

    def put(self, key: str, body: bytes) -> None:
        full = self._key(key)
        try:
            self._client.put_object(Bucket=self.bucket, Key=full, Body=body, **self._args(key))
        except Exception as exc:
            raise self._error(exc, "write", key) from exc

    def get(self, key: str) -> bytes:
        with self.open(key) as reader:
            return reader.read()

    def get_with_tag(self, key: str) -> tuple[bytes, str]:
        reader, etag = self._get_object(key)
        with reader:
            return reader.read(), etag

    def replace_if(self, key: str, body: bytes, tag: str) -> bool:
        full = self._key(key)
        if not tag:
            return False  # an empty If-Match would be no condition at all
        if self._conditional_replace:
            try:
                self._client.put_object(
                    Bucket=self.bucket, Key=full, Body=body, IfMatch=tag, **self._args(key)
                )
            except Exception as exc:
                if _is_precondition(exc) or isinstance(self._error(exc, "write", key), NotFound):
                    return False
                if _status_code(exc)[0] != 501:
                    raise self._error(exc, "write", key) from exc
                # A store without conditional replacement (If-Match): a plain put, the locks'
                # re-read after it is then all that tells two takers apart.
                log.warning(
                    "This S3 store does not support If-Match on writes: lock take-overs fall "
                    "back to write-then-check.",
                    extra={"bucket": self.bucket},
                )
                self._conditional_replace = False
            else:
                return True
        self.put(key, body)
        return True

    def open(self, key: str) -> BinaryIO:
        return self._get_object(key)[0]

    def _get_object(self, key: str) -> tuple[BinaryIO, str]:
        """A streaming reader of the object (caller closes it) and its ETag."""
        full = self._key(key)
        try:
            response = cast(dict[str, Any], self._client.get_object(Bucket=self.bucket, Key=full))
        except Exception as exc:
            raise self._error(exc, "read", key) from exc
        reader = io.BufferedReader(_BodyReader(response["Body"], self, key), 1024 * 1024)
        return reader, str(response["ETag"])

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except NotFound:
            return False
        return True

    def settle(self, key: str) -> None:
        """Nothing to do: an object S3 lists or answers for is durable."""

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def list(self, prefix: str = "", start_after: str | None = None) -> Iterator[str]:
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        if start_after is not None:
            params["StartAfter"] = self.prefix + start_after
        strip = len(self.prefix)
        try:
            # One page (<= 1000 keys) at a time; S3 returns keys in UTF-8 byte order, which is
            # code point order, the same order LocalStorage yields.
            for page in self._client.get_paginator("list_objects_v2").paginate(**params):
                for item in page.get("Contents", ()):
                    key = cast(str, item["Key"])[strip:]
                    # A "folder" (the console's Create folder, s3fs, rclone): not an object
                    # the archive wrote, and not a key it can name, as a directory is not one
                    # for the local backend.
                    if not key.endswith("/"):
                        yield key
        except Exception as exc:
            raise self._error(exc, "list", prefix) from exc

    def delete(self, key: str) -> None:
        full = self._key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=full)
        except Exception as exc:
            err = self._error(exc, "delete", key)
            if not isinstance(err, NotFound):
                raise err from exc

    # -- helpers ------------------------------------------------------------------------------

    def _head(self, key: str) -> dict[str, Any]:
        full = self._key(key)
        try:
            return cast(dict[str, Any], self._client.head_object(Bucket=self.bucket, Key=full))
        except Exception as exc:
            error = self._error(exc, "read", key)
            if isinstance(error, NotFound):
                self._confirm_bucket(key)
            raise error from exc

    def _confirm_bucket(self, key: str) -> None:
        """After a HEAD's 404, raise ``MissingBucket`` if the bucket is what is missing.

        A HEAD answer has no body, so a missing bucket reads as a missing key: a mistyped
        bucket would look like an archive without a checkpoint, or a free lock. Only asked on a
        404, so a present key costs nothing more."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            error = self._bucket_error(exc)
            if isinstance(error, MissingBucket | RetryableError):
                raise error from exc
            # Refused (403: credentials without s3:ListBucket) or not understood: that says
            # nothing about the bucket, and the key's own answer stands.

    def _multipart_if_absent(self, key: str, full: str, body: Body, size: int) -> bool:
        # Skip uploading a large body that would be refused at completion anyway.
        if self.exists(key):
            return False
        part_size = max(_MIN_PART, self.multipart_threshold, math.ceil(size / _MAX_PARTS))
        try:
            created = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full, ChecksumAlgorithm="CRC32", **self._args(key)
            )
        except Exception as exc:
            raise self._error(exc, "write", key) from exc
        upload_id = cast(str, created["UploadId"])
        try:
            parts = []
            for number, start in enumerate(range(0, size, part_size), start=1):
                # One part in memory at a time, however large a spooled body is.
                answer = self._client.upload_part(
                    Bucket=self.bucket,
                    Key=full,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=_part(body, start, part_size),
                    ChecksumAlgorithm="CRC32",
                )
                part = {"PartNumber": number, "ETag": answer["ETag"]}
                if "ChecksumCRC32" in answer:
                    part["ChecksumCRC32"] = answer["ChecksumCRC32"]
                parts.append(part)
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except Exception as exc:
            self._abort(full, upload_id)
            if _is_precondition(exc):
                return False
            raise self._error(exc, "write", key) from exc
        return True

    def _abort(self, full: str, upload_id: str) -> None:
        # Best effort: an upload we cannot abort only costs storage until a lifecycle rule
        # cleans it; the original failure is what the caller needs to see.
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except (bce.BotoCoreError, bce.ClientError, *_TRANSIENT_TRANSPORT):
            pass

    def _bucket_error(self, exc: BaseException) -> ConnectorError:
        status, _code = _status_code(exc)
        if status == 404:
            return MissingBucket(
                self.setting, f"bucket {self.bucket!r} does not exist ({self.describe()})"
            )
        if status == 403:
            return PermanentError(
                f"{self.describe()}: access denied to bucket {self.bucket!r}:"
                " bad credentials or the policy lacks s3:ListBucket"
            )
        return self._error(exc, "check", "")

    def _error(self, exc: BaseException, action: str, key: str) -> ConnectorError:
        return classify_s3_error(
            exc,
            action=action,
            target=f"s3://{self.bucket}/{self.prefix}{key}",
            bucket=self.bucket,
            key=key,
            secrets=self._secrets,
            setting=self.setting,
        )


class _BodyReader(io.RawIOBase):
    """A raw stream over botocore's body that translates read failures."""

    def __init__(self, body: Any, storage: S3Storage, key: str) -> None:
        self._body = body
        self._storage = storage
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = cast(bytes, self._body.read(len(view)))
        except Exception as exc:
            raise self._storage._error(exc, "read", self._key) from exc
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


def classify_s3_error(
    exc: BaseException,
    *,
    action: str,
    target: str,
    bucket: str,
    key: str = "",
    secrets: tuple[str, ...] = (),
    setting: str = "archive.uri",
) -> ConnectorError:
    """Map a botocore/urllib3 exception to the error taxonomy with a message naming the cause;
    ``setting`` is the configuration key a missing bucket is reported under."""
    if isinstance(exc, ConnectorError):
        return exc
    if isinstance(exc, bce.ClientError):
        status, code = _status_code(exc)
        if status == 501 or code == "NotImplemented":
            # Every try gets the same answer: a feature this store lacks.
            detail = _scrub(_message(exc), secrets)
            return PermanentError(
                f"S3 {action} {target}: the store does not implement this request (HTTP {status}"
                f" {code}{f': {detail}' if detail else ''}); it needs conditional writes "
                "(If-None-Match), and the sse / storage_class asked for, if any"
            )
        if code == "InvalidObjectState":
            return PermanentError(
                f"S3 {action} {target}: the object is in an archive storage class (Glacier, "
                "Deep Archive) and must be restored in S3 before it can be read: check the "
                "bucket's lifecycle rules"
            )
        if code in _RETRYABLE_CODES or "Throttl" in code or status >= 500 or status in (408, 429):
            return RetryableError(f"S3 {action} {target} failed (transient): HTTP {status} {code}")
        if code in _MISSING_KEY_CODES and key:
            return NotFound(key)
        if code == "NoSuchBucket" or (status == 404 and not key):
            return MissingBucket(
                setting, f"bucket {bucket!r} does not exist (S3 {action} {target})"
            )
        if code in _BAD_CREDENTIAL_CODES:
            return PermanentError(
                f"S3 {action} {target}: credentials rejected ({code}): check the access key id,"
                " secret and session token"
            )
        if code.startswith("KMS.") or "kms" in _message(exc).lower():
            return PermanentError(
                f"S3 {action} {target}: KMS refused ({code}): check kms_key_id and that these"
                " credentials may use the key"
            )
        if status == 403:
            return PermanentError(
                f"S3 {action} {target}: access denied ({code}): check the access key and the"
                " bucket/IAM policy (S3 also answers 403 for missing keys without s3:ListBucket)"
            )
        detail = _scrub(_message(exc), secrets)
        return PermanentError(
            f"S3 {action} {target} rejected: HTTP {status} {code}{f': {detail}' if detail else ''}"
        )
    if isinstance(exc, bce.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return PermanentError(
            f"S3 {action} {target}: TLS certificate verification failed: set ca_bundle"
        )
    if isinstance(exc, bce.SSLError) and "WRONG_VERSION_NUMBER" in str(exc):
        return PermanentError(
            f"S3 {action} {target}: the endpoint does not answer in TLS: check the scheme of "
            "endpoint_url (http or https)"
        )
    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError):
        return RetryableError(f"S3 {action} {target}: cannot connect to the endpoint (transient)")
    if isinstance(exc, _TRANSIENT_TRANSPORT):
        return RetryableError(
            f"S3 {action} {target}: connection failed (transient, {type(exc).__name__})"
        )
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return PermanentError(
            f"S3 {action} {target}: no usable AWS credentials (env, profile, instance role)"
        )
    if isinstance(exc, bce.BotoCoreError):
        return PermanentError(f"S3 {action} {target} failed: {type(exc).__name__}")
    if isinstance(exc, RecursionError):
        # botocore follows a bucket-region redirect by asking again, for ever when every answer
        # is a redirect (a proxy sending http to https, a website endpoint).
        return PermanentError(
            f"S3 {action} {target}: the endpoint answers every request with a redirect: check "
            "endpoint_url (http or https, a proxy in front of the store) and the region"
        )
    _reraise(exc)


def _reraise(exc: BaseException) -> NoReturn:
    # Not an S3 failure (a bug, KeyboardInterrupt, ...): let it through unchanged.
    raise exc


def _status_code(exc: BaseException) -> tuple[int, str]:
    if not isinstance(exc, bce.ClientError):
        return 0, ""
    response = cast(Mapping[str, Any], exc.response)
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    code = str(response.get("Error", {}).get("Code") or status)
    if status == 0 and code.isdigit():
        status = int(code)
    return status, code


def _message(exc: BaseException) -> str:
    if not isinstance(exc, bce.ClientError):
        return ""
    return str(cast(Mapping[str, Any], exc.response).get("Error", {}).get("Message") or "")[:200]


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _part(body: Body, start: int, size: int) -> bytes:
    if isinstance(body, bytes):
        return body[start : start + size]
    body.seek(start)
    return body.read(size)


def _is_precondition(exc: BaseException) -> bool:
    status, code = _status_code(exc)
    return status == 412 or code in _PRECONDITION_CODES


def _normalise_prefix(prefix: str, setting: str) -> str:
    prefix = prefix.strip("/")
    if not prefix:
        return ""
    if "\\" in prefix or any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ConfigError(setting, f"invalid prefix {prefix[:80]!r}")
    return prefix + "/"


# What botocore accepts as a bucket name (S3-compatible stores allow more than AWS does).
_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")


def _check_endpoint(url: str) -> None:
    """An endpoint botocore would accept and fail on at the first request, said at start-up."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError(
            "s3.endpoint_url", f"invalid port in {_without_userinfo(url)!r}"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "s3.endpoint_url",
            f"expected http(s)://host[:port], got {_without_userinfo(url)!r}",
        )


def _without_userinfo(url: str) -> str:
    return url.rpartition("@")[2][:120] if "@" in url else url[:120]


_OPTION_TYPES: dict[str, type] = {
    "region": str,
    "endpoint_url": str,
    "path_style": bool,
    "access_key_id": str,
    "secret_access_key": str,
    "session_token": str,
    "profile": str,
    "verify": bool,
    "ca_bundle": str,
    "sse": str,
    "kms_key_id": str,
    "storage_class": str,
    "multipart_threshold": int,
    "connect_timeout": float,
    "read_timeout": float,
}


def _coerce(name: str, value: object, kind: type) -> object:
    """Accept native values and the strings env/config files produce; never echo secrets."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    raise ConfigError(f"s3.{name}", f"expected {kind.__name__}, got {type(value).__name__}")
