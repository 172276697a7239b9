"""verify's patch-chain check against what the platform really sends (the simulator's store and
live-stream session, no mocks): silent changes (protocol §8.4 delete cascades, §8.5 merges,
standard-id changes) and the container path of filtered streams (§5.3) are no damage; a
missed update still is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from connector.events import StreamEvent
from connector.sim.server import SimServer, _Session
from connector.sim.store import SimStore
from connector.storage.local import LocalStorage
from connector.verify import VerifyReport, format_report, verify_archive
from tests.support.simlog import frame_events, sim_events
from tests.test_state import archive_events, new_sim

A = "identity--00000000-0000-4000-8000-0000000000c1"
B = "identity--00000000-0000-4000-8000-0000000000c2"
M = "malware--00000000-0000-4000-8000-0000000000c3"
RP = "report--00000000-0000-4000-8000-0000000000c4"
I = "intrusion-set--00000000-0000-4000-8000-0000000000c5"  # noqa: E741
REPORTS = {
    "mode": "and",
    "filterGroups": [],
    "filters": [{"key": ["entity_type"], "values": ["Report"], "operator": "eq", "mode": "or"}],
}


class _Capture(_Session):
    """The simulator's live-stream session logic (filters, dependencies, translation), its
    frames captured instead of written to a socket."""

    def __init__(self, store: SimStore, filters: dict[str, Any] | None) -> None:
        super().__init__(SimServer(store=store), None, "bypass")  # type: ignore[arg-type]
        self.filters = filters
        self.frames: list[bytes] = []
        self.pos = 0

    def write(self, data: bytes) -> None:
        self.frames.append(data)

    def flush(self) -> None:
        pass

    def pump(self) -> None:
        """Process what the log holds now (call after each edit, as a connected client)."""
        while True:
            chunk = self.store.read(self.pos)
            if not chunk.frames:
                return
            self.pos = self.process_live(self.pos, chunk)

    def events(self) -> list[StreamEvent]:
        return frame_events(self.frames)


def _verify(events: list[StreamEvent], tmp_path: Path) -> VerifyReport:
    storage = LocalStorage(tmp_path / "a")
    archive_events(storage, events, per_segment=100)
    report = verify_archive(storage, work_dir=tmp_path / "w")
    print(format_report(report))
    return report


def _base(sim: SimStore, *, in_report: bool) -> None:
    sim.create({"type": "identity", "id": A, "name": "a", "identity_class": "organization"})
    sim.create({"type": "identity", "id": B, "name": "b", "identity_class": "organization"})
    sim.create({"type": "malware", "id": M, "name": "m", "is_family": True, "created_by_ref": A})
    sim.create(
        {
            "type": "report",
            "id": RP,
            "name": "r",
            "published": "2025-01-01T00:00:00.000Z",
            "object_refs": [M, A] if in_report else [A],
        }
    )


@pytest.mark.parametrize("in_report", [True, False])
@pytest.mark.parametrize(
    "how", ["delete author", "delete report member", "merge author", "rename report member"]
)
def test_silent_platform_changes_are_no_damage(tmp_path: Path, how: str, in_report: bool) -> None:
    sim = new_sim()
    _base(sim, in_report=in_report)
    if how == "delete author":  # M's created_by_ref and RP's object_refs lose A silently
        sim.delete(A)
        sim.update(M, set={"description": "later edit"})
        sim.update(RP, set={"description": "later edit"})
    elif how == "delete report member":
        sim.delete(M if in_report else A)
        sim.update(RP, set={"description": "later edit"})
    elif how == "rename report member":  # a standard-id change: the report's refs follow
        sim.update(A, new_id="identity--00000000-0000-4000-8000-0000000000c9")
        sim.update(M, set={"description": "later edit"})
        sim.update(RP, set={"description": "later edit"})
    else:  # A merged into B: refs to A re-pointed to B silently
        sim.merge(B, [A])
        sim.update(M, set={"description": "later edit"})
        sim.update(RP, set={"description": "later edit"})
    events, _ = sim_events(sim)
    report = _verify(events, tmp_path)
    assert report.ok, report.errors
    assert report.warning_count == 0, report.warnings
    assert report.updates_checked >= 1


def _drop_update(events: list[StreamEvent], stix_id: str, nth: int = 0) -> list[StreamEvent]:
    """``events`` without the ``nth`` update of ``stix_id``: lost upstream."""
    seen = 0
    for i, ev in enumerate(events):
        if ev.event == "update" and ev.stix.get("id") == stix_id:
            if seen == nth:
                return events[:i] + events[i + 1 :]
            seen += 1
    raise AssertionError("no such update")


def _missed_update(tmp_path: Path, victim: str, *, in_report: bool, name: str) -> VerifyReport:
    """Verify an archive that lost the first of two updates of ``victim`` upstream."""
    sim = new_sim()
    _base(sim, in_report=in_report)
    sim.update(victim, set={"description": "lost"})
    sim.update(victim, set={"name": name})
    return _verify(_drop_update(sim_events(sim)[0], victim), tmp_path)


@pytest.mark.parametrize(
    ("victim", "in_report", "name"),
    [(M, False, "m2"), (RP, True, "r2")],
    ids=["an object with refs", "a container"],
)
def test_a_missed_update_is_still_an_error(
    tmp_path: Path, victim: str, in_report: bool, name: str
) -> None:
    report = _missed_update(tmp_path, victim, in_report=in_report, name=name)
    assert not report.ok
    assert any("missed upstream" in e for e in report.errors), report.errors


def test_missed_update_of_a_container_member_is_a_warning(tmp_path: Path) -> None:
    """On a filtered stream that is the container path; verify cannot tell: a warning."""
    report = _missed_update(tmp_path, M, in_report=True, name="m2")
    assert report.ok, report.errors
    assert any("missed upstream" in w and "filtered" in w for w in report.warnings)


def test_container_path_gap_is_not_damage(tmp_path: Path) -> None:
    """A Report-only stream: M's updates arrive only while a report holds it (§5.3)."""
    sim = new_sim()
    sim.create({"type": "malware", "id": M, "name": "m", "is_family": True})
    sim.create({"type": "intrusion-set", "id": I, "name": "i"})
    sim.create(
        {
            "type": "report",
            "id": RP,
            "name": "r",
            "published": "2025-01-01T00:00:00.000Z",
            "object_refs": [M, I],
        }
    )
    live = _Capture(sim, REPORTS)
    live.pump()
    sim.update(M, set={"description": "v1"})  # sent: RP (in the filter) holds M
    live.pump()
    sim.update(RP, set={"object_refs": [I]})  # M leaves the report
    live.pump()
    sim.update(M, set={"description": "v2"})  # not sent: no report holds M
    live.pump()
    sim.update(RP, set={"object_refs": [I, M]})  # M is back
    live.pump()
    sim.update(M, set={"description": "v3"})  # sent again, reverse_patch leads to v2
    live.pump()
    events = live.events()
    m_updates = [e for e in events if e.event == "update" and e.stix.get("id") == M]
    assert len(m_updates) == 2  # v2 was never sent
    report = _verify(events, tmp_path)
    assert report.ok, report.errors
    assert report.warning_count == 1, report.warnings


def test_an_update_in_the_recovery_copys_millisecond_is_no_damage(tmp_path: Path) -> None:
    """A first run's recovery sends objects as they are when sent, updated up to the recover
    point, each under ``<its updated_at ms>-0``; the live part starts after ``<recover>-0``
    (§5.1), so an update made in that millisecond arrives again after a copy that holds it.
    A live update that does not follow the one before it is still an error."""
    now = [1_700_000_000_000]
    sim = SimStore(clock=lambda: now[0])
    sim.create({"type": "malware", "id": M, "name": "m", "is_family": True})
    sim.create({"type": "intrusion-set", "id": I, "name": "i"})
    now[0] += 1000
    sim.update(M, set={"description": "first, in the recovery"})
    sim.update(M, set={"description": "second, in the copy and sent live"})
    recover_ms = now[0]
    for text in ("updated after the recovery: sent live only", "lost upstream", "after the loss"):
        now[0] += 1000
        sim.update(I, set={"description": text})
    live = _Capture(sim, None)
    live.recover(recover_ms - 10_000, recover_ms)
    live.pos = sim.position_after(recover_ms, 0)
    live.pump()
    events = live.events()
    seen = [(ev.id_text, ev.event, ev.stix["id"]) for ev in events]
    assert (f"{recover_ms}-0", "create", M) in seen  # the copy, already holding both updates
    assert (f"{recover_ms}-1", "update", M) in seen  # the second update, sent live again

    report = _verify(events, tmp_path / "all")
    assert report.ok, report.errors
    assert report.updates_checked == 2  # I's last two; M's repeat is no link of its chain

    report = _verify(_drop_update(events, I, nth=1), tmp_path / "lost")
    assert not report.ok
    assert any("missed upstream" in e for e in report.errors), report.errors
