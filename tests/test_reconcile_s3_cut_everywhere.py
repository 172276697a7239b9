"""The run that repairs a retention gap and reconciles it, its archive on S3, cut at every request.

``tests/test_reconcile_cut_everywhere.py``'s scene (``tests/support/reconcile_cuts.py``) with
the archive in a bucket on moto's server, through real boto3: the archive the first run left in
a local directory is copied into a fresh bucket for each run, and the connector opens it as it
opens any ``s3://`` archive, the storage's own client hooked (``tests.support.s3.CutS3Storage``):
every S3 request (the archive's check and its probe, the lease's conditional writes, reads,
listings, the recovery's and the groups' segments and manifests, the checkpoint) is a call of the
plan, named by its operation (a PUT by its condition) and the kind of its key. Each is cut the
four ways of ``tests/support/cuts.py``: killed before it or just after it returned, its answer
lost after S3 applied it (botocore's read timeout), or failing once before it was sent (no
connection). Then the connector is started again until idle, with the same checks as the local
sweep. The live stream's connection is also dropped while the groups are written.

``CUT_EVERYWHERE=1`` cuts at every request, each way; otherwise at a few requests of the
reconciliation (its first read, a group's segment and manifest, the checkpoint after it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector import reconcile
from connector.storage import Storage
from connector.storage.local import LocalStorage
from connector.storage.s3 import S3Storage
from tests.support import cuts
from tests.support.reconcile_cuts import (
    COUNTS,
    DROPS,
    GROUP_EVENTS,
    Names,
    Plan,
    Reference,
    World,
    case,
    drop_case,
    drop_id,
    kind,
    make_reference,
    make_world,
    named,
    sample,
)
from tests.support.s3 import (  # noqa: F401
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    CutS3Storage,
    make_bucket,
    moto_server,
    s3_failure,
    s3_operation,
    storage_settings,
)
from tests.test_faults import assert_restore_equals_platform

EVERYWHERE, LONG = cuts.EVERYWHERE, cuts.LONG


class ReconcileS3Storage(CutS3Storage):
    """Requests named by their operation and the kind of their key (a reconciliation group's
    segment apart from the recovery's, by its body)."""

    def label(self, operation: str, params: dict[str, Any]) -> str:
        key = str(params.get("Key") or params.get("Prefix") or "").removeprefix(self.prefix)
        body = params.get("Body")
        data = body if isinstance(body, bytes) else getattr(body, "getvalue", lambda: None)()
        return f"{s3_operation(operation, params)} {kind(key, data) if key else '-'}"


class S3Archive:
    """A fresh bucket on the test server for each copy; ``archive/`` is the archive's prefix."""

    names = Names(
        "ListObjectsV2 snapshots/",
        "PutIfAbsent segment (reconcile)",
        "PutIfAbsent manifest",
        "Put checkpoint.json",
    )

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.plains: dict[str, S3Storage] = {}  # a boto3 client takes a while to build

    def copy(self, before: Path, tmp: Path) -> str:
        bucket = make_bucket(self.endpoint, f"reconcile-{uuid.uuid4().hex[:16]}")
        uri = f"s3://{bucket}/archive"
        source, plain = LocalStorage(before), self.plain(uri)
        for key in source.list():
            plain.put(key, source.get(key))
        return uri

    def _settings(self, uri: str) -> dict[str, Any]:
        return storage_settings(self.endpoint, uri.removeprefix("s3://").split("/")[0])

    def env(self, uri: str) -> dict[str, str]:
        return {
            "S3_ENDPOINT_URL": self.endpoint,
            "S3_ACCESS_KEY_ID": ACCESS_KEY,
            "S3_SECRET_ACCESS_KEY": SECRET_KEY,
            "S3_REGION": REGION,
            "S3_PATH_STYLE": "true",
        }

    def plain(self, uri: str) -> Storage:
        if uri not in self.plains:
            self.plains[uri] = S3Storage(**self._settings(uri))
        return self.plains[uri]

    def cut(self, uri: str, plan: Plan) -> Storage:
        return ReconcileS3Storage(plan, **self._settings(uri))


@pytest.fixture(scope="module")
def archive(moto_server: str) -> S3Archive:  # noqa: F811
    return S3Archive(moto_server)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    yield from make_world(tmp_path_factory.mktemp("reconcile-s3-cut"))


@pytest.fixture(scope="module")
def reference(world: World, archive: S3Archive) -> Reference:
    return make_reference(world, archive)


def test_the_uncut_repair_reconciles_in_groups_on_s3(
    world: World, archive: S3Archive, reference: Reference
) -> None:
    """The uncut run deletes, merges and refreshes, in several groups, each a conditional PUT
    of its segment then of its manifest, and restores right."""
    assert all(reference.counts[k] >= 1 for k in COUNTS), reference.counts
    assert sum(reference.reconciled.values()) > 2 * GROUP_EVENTS
    assert reference.calls.count(archive.names.group) >= 3, reference.calls
    storage = archive.plain(reference.uri)
    assert_restore_equals_platform(storage, world.sim.store, world.tmp / "uncut" / "r")
    print(f"{len(reference.calls)} requests:", *reference.calls, sep="\n")


@LONG
@pytest.mark.parametrize("how", cuts.KINDS)
def test_a_reconciling_run_on_s3_cut_at_every_request(
    world: World,
    archive: S3Archive,
    reference: Reference,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    monkeypatch.setattr(reconcile, "GROUP_EVENTS", GROUP_EVENTS)
    calls = reference.calls
    points = named(calls) if EVERYWHERE else sample(calls, archive.names, how)
    failures: list[str] = []
    started = time.monotonic()
    cut = 0
    for n, at in enumerate(points):
        try:
            cut += case(
                world, archive, reference, tmp_path / f"{n}", at, how, monkeypatch, s3_failure
            )
        except AssertionError as exc:
            failures.append(f"{how} {at}: {str(exc)[:600]}")
            print(f"cut failed: {failures[-1]}", flush=True)
    took = time.monotonic() - started
    print(f"{how}: {len(points)} cases ({cut} cut) in {took:.0f} s")
    assert not failures, f"{len(failures)} of {len(points)} cuts failed:\n" + "\n".join(failures)


@LONG
@pytest.mark.parametrize("drop", DROPS, ids=drop_id)
def test_the_stream_dropped_while_the_groups_are_written_on_s3(
    world: World,
    archive: S3Archive,
    reference: Reference,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    drop: tuple[int, bool, dict[str, Any]],
) -> None:
    """The live stream's connection dropped between two groups' PUTs, or after a group's
    segment was stored on S3 before its manifest (and its reconnection refused twice): the run
    reconnects and ends as the uncut one."""
    monkeypatch.setattr(reconcile, "GROUP_EVENTS", GROUP_EVENTS)
    drop_case(world, archive, reference, tmp_path, monkeypatch, caplog, drop)
