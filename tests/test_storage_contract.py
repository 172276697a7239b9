"""One contract, every storage backend: LocalStorage on tmp_path and S3Storage on moto."""

# Fixtures are imported by name and then requested as parameters.
# ruff: noqa: F811

from __future__ import annotations

import errno
import os
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from connector.errors import ConfigError, NotFound, PermanentError
from connector.storage import Storage, open_storage
from connector.storage.local import LocalStorage
from connector.storage.s3 import S3Storage
from tests.support.s3 import moto_server, raw_client, s3_settings, s3_uri_and_options  # noqa: F401

Factory = Callable[..., Storage]


@pytest.fixture(params=["local", "s3"])
def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """Builds the backend under test; S3 options (e.g. multipart_threshold) are ignored locally."""
    if request.param == "local":
        return lambda **_: LocalStorage(tmp_path / "archive")
    settings: dict[str, Any] = request.getfixturevalue("s3_settings")
    return lambda **overrides: S3Storage(**{**settings, **overrides})


@pytest.fixture
def storage(make_storage: Factory) -> Storage:
    return make_storage()


def test_satisfies_protocol(storage: Storage) -> None:
    assert isinstance(storage, Storage)
    assert "secret" not in storage.describe() and "secret" not in repr(storage)


def test_round_trip(storage: Storage) -> None:
    body = os.urandom(3000) + b"\n{}\n"
    assert storage.put_if_absent("events/a/1.jsonl", body) is True
    assert storage.get("events/a/1.jsonl") == body
    with storage.open("events/a/1.jsonl") as reader:
        chunks = []
        while chunk := reader.read(1000):
            chunks.append(chunk)
    assert b"".join(chunks) == body
    assert storage.exists("events/a/1.jsonl")
    assert storage.size("events/a/1.jsonl") == len(body)


def test_put_if_absent_never_replaces(storage: Storage) -> None:
    assert storage.put_if_absent("m/manifest.json", b"first") is True
    assert storage.put_if_absent("m/manifest.json", b"second") is False
    assert storage.get("m/manifest.json") == b"first"


def test_replace_if_replaces_only_what_was_read(storage: Storage) -> None:
    storage.put("locks/run.json", b"first")
    data, tag = storage.get_with_tag("locks/run.json")
    assert data == b"first"
    assert storage.replace_if("locks/run.json", b"second", tag) is True
    assert storage.replace_if("locks/run.json", b"third", tag) is False  # written since
    data, newer = storage.get_with_tag("locks/run.json")
    assert data == b"second" and newer != tag
    storage.delete("locks/run.json")
    assert storage.replace_if("locks/run.json", b"fourth", newer) is False  # deleted since
    assert not storage.exists("locks/run.json")
    assert list(storage.list()) == []  # whatever the compare-and-swap needs is no object
    with pytest.raises(NotFound):
        storage.get_with_tag("locks/run.json")
    assert storage.replace_if("missing-dir/x.json", b"x", newer) is False
    storage.put("locks/run.json", b"again")
    assert storage.replace_if("locks/run.json", b"untagged", "") is False  # no tag, no write


def test_replace_if_racers_of_one_read_have_one_winner(tmp_path: Path) -> None:
    """Locally the compare and the replace are one step under the directory's flock, whatever
    the threads or processes racing (each opens its own lock)."""
    storage = LocalStorage(tmp_path)
    storage.put("locks/run.json", b"expired")
    _, tag = storage.get_with_tag("locks/run.json")
    barrier = threading.Barrier(8)

    def take(n: int) -> bool:
        barrier.wait()
        return storage.replace_if("locks/run.json", f"taker {n}".encode(), tag)

    with ThreadPoolExecutor(8) as pool:
        won = [n for n, ok in enumerate(pool.map(take, range(8))) if ok]
    assert len(won) == 1
    assert storage.get("locks/run.json") == f"taker {won[0]}".encode()


class _NoLocks(LocalStorage):
    """A file system mounted without locks (NFS ``nolock``): flock fails."""

    def _lock_exclusive(self, fd: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")


def test_replace_if_without_file_locks_still_compares(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage = _NoLocks(tmp_path)
    storage.put("locks/run.json", b"first")
    _, tag = storage.get_with_tag("locks/run.json")
    assert storage.replace_if("locks/run.json", b"second", tag) is True
    assert storage.replace_if("locks/run.json", b"third", tag) is False
    assert storage.get("locks/run.json") == b"second"
    assert caplog.text.count("Cannot lock a file") == 1  # said once, not at every renewal


def test_replace_if_with_a_lock_file_it_cannot_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The lock file cannot be opened for writing (here a directory in its place; another
    user's file does the same): still the right answers, and a warning."""
    storage = LocalStorage(tmp_path)
    storage.put("locks/run.json", b"first")
    (tmp_path / "locks" / ".replace-lock").mkdir()
    _, tag = storage.get_with_tag("locks/run.json")
    assert storage.replace_if("locks/run.json", b"second", tag) is True
    assert storage.replace_if("locks/run.json", b"third", tag) is False
    assert storage.get("locks/run.json") == b"second"
    assert caplog.text.count("Cannot lock a file") == 1


def test_put_replaces_and_readers_see_whole_versions(storage: Storage) -> None:
    storage.put("checkpoint.json", b"v0")
    assert storage.get("checkpoint.json") == b"v0"
    versions = {b"A" * 20000, b"B" * 30000}
    storage.put("state", b"A" * 20000)
    seen: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(storage.get("state"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(30):
            storage.put("state", b"A" * 20000 if i % 2 else b"B" * 30000)
    finally:
        stop.set()
        reader.join()
    assert seen and set(seen) <= versions
    assert storage.get("state") == b"A" * 20000


NESTED = [
    "events/2026/11/27/000001764200000000-0000000000.jsonl.zst",
    "events/2026/11/27/000001764200000500-0000000003.jsonl.zst",
    "events/2026/11/28/000001764300000000-0000000000.jsonl.zst",
    "events/2026/11/3/000001764000000000-0000000000.jsonl.zst",
    "events/2026/11-x",
    "events/2026/110",
    "manifests/000001764200000000-0000000000.json",
    "manifests/000001764300000000-0000000000.json",
    "checkpoint.json",
]


def test_list_is_lexicographic_with_prefix_and_start_after(storage: Storage) -> None:
    for key in NESTED:
        assert storage.put_if_absent(key, key.encode())
    ordered = sorted(NESTED)
    assert list(storage.list()) == ordered
    assert list(storage.list("events/2026/11/")) == [
        k for k in ordered if k.startswith("events/2026/11/")
    ]
    assert list(storage.list("manifests/")) == [k for k in ordered if k.startswith("manifests/")]
    assert list(storage.list("nothing/")) == []
    after = "events/2026/11/27/000001764200000000-0000000000.jsonl.zst"
    assert list(storage.list(start_after=after)) == [k for k in ordered if k > after]
    assert list(storage.list("events/", start_after=after)) == [
        k for k in ordered if k > after and k.startswith("events/")
    ]
    # start_after need not exist and may fall between "folders".
    assert list(storage.list("events/", start_after="events/2026/11/27/z")) == [
        k for k in ordered if k > "events/2026/11/27/z" and k.startswith("events/")
    ]
    assert list(storage.list(start_after=ordered[-1])) == []


def test_list_many_keys_is_complete_and_ordered(storage: Storage) -> None:
    keys = [f"events/{i % 3}/{i:06d}.jsonl" for i in range(1010)]
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(lambda k: storage.put_if_absent(k, b"x"), keys))
    listed = list(storage.list("events/"))
    assert listed == sorted(keys)
    # Resume from the middle of what is a second S3 page.
    middle = sorted(keys)[1004]
    assert list(storage.list("events/", start_after=middle)) == sorted(keys)[1005:]


def test_missing_keys(storage: Storage) -> None:
    with pytest.raises(NotFound):
        storage.get("no/such.key")
    with pytest.raises(NotFound):
        storage.open("no/such.key")
    with pytest.raises(NotFound):
        storage.size("no/such.key")
    assert storage.exists("no/such.key") is False
    storage.delete("no/such.key")  # not an error


def test_delete(storage: Storage) -> None:
    storage.put_if_absent("a/b", b"1")
    storage.delete("a/b")
    assert not storage.exists("a/b")
    assert list(storage.list()) == []
    assert storage.put_if_absent("a/b", b"2") is True  # the key is free again


def test_check_passes_and_leaves_nothing(storage: Storage) -> None:
    storage.check()
    assert list(storage.list()) == []


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "..", "a//b", "./a", "a/", "a\\b"])
def test_invalid_keys_rejected(storage: Storage, key: str) -> None:
    for call in (
        lambda: storage.put_if_absent(key, b"x"),
        lambda: storage.put(key, b"x"),
        lambda: storage.get(key),
        lambda: storage.delete(key),
    ):
        with pytest.raises(PermanentError):
            call()


def test_big_body_round_trips_and_refuses_second_write(make_storage: Factory) -> None:
    storage = make_storage(multipart_threshold=1024 * 1024)
    body = os.urandom(6 * 1024 * 1024 + 123)  # two parts of S3's 5 MiB minimum
    assert storage.put_if_absent("big/segment.zst", body) is True
    assert storage.put_if_absent("big/segment.zst", b"other") is False
    assert storage.put_if_absent("big/segment.zst", os.urandom(2 * 1024 * 1024)) is False
    assert storage.get("big/segment.zst") == body
    assert storage.size("big/segment.zst") == len(body)


@pytest.mark.parametrize("size", [3000, 6 * 1024 * 1024 + 123])
def test_a_file_body_is_stored_from_its_start(make_storage: Factory, size: int) -> None:
    """A huge group's segment comes from a scratch file, whatever its read position: the
    object is the whole file, in one put or in parts (S3 multipart past 1 MiB here)."""
    storage = make_storage(multipart_threshold=1024 * 1024)
    body = os.urandom(size)
    with tempfile.TemporaryFile() as fh:
        fh.write(body)  # left at its end, as a spool hands it over
        assert storage.put_if_absent("big/spooled.zst", fh) is True
        assert storage.put_if_absent("big/spooled.zst", fh) is False
    assert storage.get("big/spooled.zst") == body
    assert storage.size("big/spooled.zst") == size


# -- S3 specifics -------------------------------------------------------------------------------


def test_s3_multipart_is_used_and_aborted_on_refusal(s3_settings: dict[str, Any]) -> None:
    storage = S3Storage(**{**s3_settings, "multipart_threshold": 1024 * 1024})
    body = os.urandom(6 * 1024 * 1024)
    assert storage.put_if_absent("big", body)
    raw = raw_client(s3_settings["endpoint_url"])
    head = raw.head_object(Bucket=s3_settings["bucket"], Key="archive/big")
    assert head["ETag"].strip('"').endswith("-2")  # a multipart object of two parts
    # Sneak an object in between the existence check and the completion: the conditional
    # completion must refuse it and the upload must not be left behind.
    other = S3Storage(**{**s3_settings, "multipart_threshold": 1024 * 1024})
    other.exists = lambda key: False  # type: ignore[method-assign]
    assert other.put_if_absent("big", os.urandom(6 * 1024 * 1024)) is False
    assert storage.get("big") == body
    uploads = raw.list_multipart_uploads(Bucket=s3_settings["bucket"])
    assert uploads.get("Uploads", []) == []


def test_s3_keys_live_under_prefix(s3_settings: dict[str, Any]) -> None:
    storage = S3Storage(**s3_settings)
    raw = raw_client(s3_settings["endpoint_url"])
    raw.put_object(Bucket=s3_settings["bucket"], Key="outside/x", Body=b"x")
    raw.put_object(Bucket=s3_settings["bucket"], Key="archive-sibling/y", Body=b"y")
    storage.put_if_absent("events/1", b"1")
    listed = raw.list_objects_v2(Bucket=s3_settings["bucket"])["Contents"]
    assert sorted(o["Key"] for o in listed) == [
        "archive-sibling/y",
        "archive/events/1",
        "outside/x",
    ]
    assert list(storage.list()) == ["events/1"]
    sibling = S3Storage(**{**s3_settings, "prefix": "/archive-sibling/"})
    assert list(sibling.list()) == ["y"] and sibling.get("y") == b"y"
    with pytest.raises(NotFound):
        storage.get("y")


def test_s3_encryption_and_storage_class_on_every_write(s3_settings: dict[str, Any]) -> None:
    storage = S3Storage(
        **{**s3_settings, "multipart_threshold": 1024 * 1024},
        sse="AES256",
        storage_class="STANDARD_IA",
    )
    storage.put("p", b"1")
    storage.put_if_absent("pia", b"2")
    storage.put_if_absent("mp", os.urandom(6 * 1024 * 1024))
    raw = raw_client(s3_settings["endpoint_url"])
    for key in ("p", "pia", "mp"):
        head = raw.head_object(Bucket=s3_settings["bucket"], Key=f"archive/{key}")
        assert head.get("ServerSideEncryption") == "AES256", key
        assert head.get("StorageClass") == "STANDARD_IA", key


def test_s3_open_storage_uri_and_secret_free_description(s3_settings: dict[str, Any]) -> None:
    uri, options = s3_uri_and_options(s3_settings)
    storage = open_storage(uri, **options)
    assert isinstance(storage, S3Storage)
    text = f"{storage.describe()} {storage!r}"
    assert s3_settings["secret_access_key"] not in text
    assert s3_settings["access_key_id"] not in text
    assert text.startswith(f"s3://{s3_settings['bucket']}/archive/")
    assert "(endpoint 127.0.0.1:" in text
    assert storage.put_if_absent("k", b"v") and storage.get("k") == b"v"
    # Credentials belong in the s3 options, never in the URI (logged, shown by status).
    with_keys = uri.replace(
        "s3://", f"s3://{options['access_key_id']}:{options['secret_access_key']}@"
    )
    with pytest.raises(ConfigError, match="carry no credentials") as refused:
        open_storage(with_keys, **options)
    assert options["secret_access_key"] not in str(refused.value)
