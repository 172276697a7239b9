"""Progress: a redrawn bar with rate and ETA on a terminal, INFO lines otherwise."""

from __future__ import annotations

import io
import logging
import os

import pytest

from connector.progress import Progress, RecoverProgress, iso_to_ms, recover_fraction


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class TtyIO(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tty_bar_rate_and_eta() -> None:
    clock, out = Clock(), TtyIO()
    bar = Progress(1000, label="restore", stream=out, clock=clock)
    clock.now += 10
    bar.update(250)  # 25 items/s, 750 left -> 30 s
    assert out.getvalue().endswith(
        "\rrestore [######..................]  25.0% 250/1000 25.0/s ETA 0:00:30"
    )
    clock.now += 0.05
    bar.advance(10)  # within the redraw interval: no redraw
    assert out.getvalue().count("\r") == 1
    clock.now += 30
    bar.update(1000)
    bar.close()
    text = out.getvalue()
    assert text.endswith("100.0% 1000/1000 25.0/s ETA 0:00:00\n")
    assert "\n" not in text[:-1], "a bar stays on one line"


def test_real_pty_is_a_terminal() -> None:
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=True) as stream:
            bar = Progress(4, label="restore", stream=stream, clock=Clock())
            assert bar.tty
            bar.update(2)
            bar.close()
        written = os.read(master, 4096).decode()
    finally:
        os.close(master)
    assert written.startswith("\rrestore [") and "50.0% 2/4" in written


def test_not_a_tty_logs_periodically(caplog: pytest.LogCaptureFixture) -> None:
    clock, out = Clock(), io.StringIO()
    caplog.set_level(logging.INFO, logger="connector.progress")
    bar = Progress(100, label="restore", stream=out, log_every_secs=30, clock=clock)
    for _ in range(100):
        clock.now += 1
        bar.advance(1)
    bar.close()
    assert out.getvalue() == "", "no bar drawn into a log"
    records = [r for r in caplog.records if r.name == "connector.progress"]
    # First update, then one line per 30 s of the 100 s run, then the final line.
    assert [r.getMessage() for r in records] == ["Progress."] * 4 + ["Progress finished."]
    assert [r.done for r in records] == [1, 31, 61, 91, 100]  # type: ignore[attr-defined]
    last = records[-1]
    assert (last.task, last.total, last.rate_per_sec, last.eta_secs) == ("restore", 100, 1.0, 0)  # type: ignore[attr-defined]


def test_unknown_total_shows_count_and_rate() -> None:
    clock, out = Clock(), TtyIO()
    bar = Progress(None, label="recover", stream=out, clock=clock)
    clock.now += 4
    bar.update(8)
    assert bar.line() == "recover 8 2.0/s"
    assert bar.eta_secs() is None and bar.fraction() is None


def test_recover_fraction() -> None:
    end = "2026-01-01T00:00:00Z"
    end_ms = iso_to_ms(end)
    assert end_ms == 1767225600000
    assert iso_to_ms("2026-01-01T00:00:00") == end_ms  # naive means UTC
    first = end_ms - 100_000
    assert recover_fraction(end, first, first) == 0.0
    assert recover_fraction(end, first + 25_000, first) == 0.25
    assert recover_fraction(end, end_ms + 5, first) == 1.0  # live ids are past the end
    assert recover_fraction(end, first, end_ms) == 1.0  # empty span


def test_recover_progress_shows_percent_and_eta() -> None:
    clock, out = Clock(), TtyIO()
    end_ms = iso_to_ms("2026-01-01T00:00:00Z")
    rec = RecoverProgress("2026-01-01T00:00:00Z", stream=out, clock=clock)
    rec.update(end_ms - 1000)
    clock.now += 60
    assert rec.update(end_ms - 500) == 0.5
    assert out.getvalue().endswith("recover [############............]  50.0% ETA 0:01:00")
    rec.close()


def test_recover_progress_off_a_tty_logs_a_percent_not_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The recovery's progress is a share of its time span: its log gives that percent, never
    "done 0 of 1000" that an operator reads as events."""
    clock = Clock()
    caplog.set_level(logging.INFO, logger="connector.progress")
    end_ms = iso_to_ms("2026-01-01T00:00:00Z")
    rec = RecoverProgress("2026-01-01T00:00:00Z", stream=io.StringIO(), clock=clock)
    rec.update(end_ms - 1000)
    clock.now += 60
    rec.update(end_ms - 250)
    rec.close()
    records = [r.__dict__ for r in caplog.records if r.name == "connector.progress"]
    assert [r["percent"] for r in records] == [0.0, 75.0, 75.0]  # the last: finished
    assert records[-1]["eta_secs"] == 20 and records[-1]["task"] == "recover"
    assert not any("done" in r or "total" in r or "rate_per_sec" in r for r in records)


def test_nothing_to_do_is_done_and_more_than_the_total_is_not_above_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A restore with nothing to push shows 100%, not 0%; a count past its total (objects found
    after the count was taken) stays at 100%; a second ``close`` says nothing more."""
    clock = Clock()
    empty = Progress(0, label="restore", stream=TtyIO(), clock=clock)
    assert empty.fraction() == 1.0
    caplog.set_level(logging.INFO, logger="connector.progress")
    bar = Progress(10, label="restore", stream=io.StringIO(), clock=clock)
    clock.now += 1
    bar.update(12)
    assert bar.fraction() == 1.0 and bar.eta_secs() == 0.0
    bar.close()
    bar.close()
    records = [r.getMessage() for r in caplog.records if r.name == "connector.progress"]
    assert records == ["Progress.", "Progress finished."]
