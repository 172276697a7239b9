"""``verify --against-opencti`` holds neither the platform's listing nor the archive's state in
memory: both are as large as the platform. Measured with tracemalloc against the platform double
run in its own process (so only this process's memory is counted)."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from connector.restore_cli import verify_against_opencti
from connector.storage.local import LocalStorage

TOKEN = "against-token-0123456789"


@contextlib.contextmanager
def _platform(objects: int) -> Iterator[str]:
    """The platform double, in a child process, holding about ``objects`` objects."""
    argv = [sys.executable, "-m", "connector", "sim", "--token", TOKEN, "--heartbeat", "1"]
    argv += ["--generate", str(objects), "--generate-mix", "creates"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        found = re.search(r"(http://\S+)", proc.stdout.readline())
        assert found, "the platform double did not start"
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(10)


def _peak(url: str, tmp_path: Path, name: str) -> tuple[int, str]:
    archive = tmp_path / f"{name}-archive"
    archive.mkdir()
    out = io.StringIO()
    tracemalloc.start()
    try:
        with contextlib.redirect_stdout(out):
            verify_against_opencti(
                LocalStorage(str(archive)),
                url=url,
                token=TOKEN,
                until=None,
                work_dir=tmp_path / f"{name}-work",
            )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not list((tmp_path / f"{name}-work").glob("against-*")), "scratch database left"
    return peak, out.getvalue()


def test_memory_does_not_grow_with_the_platform(tmp_path: Path) -> None:
    with _platform(500) as small_url, _platform(4500) as large_url:
        _peak(small_url, tmp_path, "warm")  # imports and first-use caches, not counted
        small, small_out = _peak(small_url, tmp_path, "small")
        large, large_out = _peak(large_url, tmp_path, "large")
    # Every platform object is "extra" to an empty archive: counted, five of them named.
    extra = re.search(r"extra\s+(\d+)\s+(.*)", large_out)
    assert extra and int(extra.group(1)) >= 4400, large_out
    assert extra.group(2).endswith(" ...") and extra.group(2).count("--") == 5
    assert "DIFFERENCES found" in small_out
    # 4,000 more objects: the whole listing in memory grew the peak by about 1.7 MB.
    assert large - small < 500_000, f"peak grew by {(large - small) / 1e6:.2f} MB"
    print(f"peak {small / 1e6:.2f} MB at 500 objects, {large / 1e6:.2f} MB at 4,500")


@pytest.mark.parametrize("objects", [1200])
def test_differences_are_counted_past_a_page(tmp_path: Path, objects: int) -> None:
    """The listing is read page by page; every page counts."""
    with _platform(objects) as url:
        _, out = _peak(url, tmp_path, "one")
    extra = re.search(r"extra\s+(\d+)", out)
    assert extra and int(extra.group(1)) >= objects - 10, out
