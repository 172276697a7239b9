"""Damaging a snapshot for a test: a restore opens its state image when it can, and loads its
parts only otherwise, so a snapshot is unusable only when both are damaged."""

from __future__ import annotations

from connector.snapshot import STATE_KIND, PartInfo, SnapshotInfo

__all__ = ["and_its_image"]


def and_its_image(info: SnapshotInfo, part: PartInfo) -> list[PartInfo]:
    """``part`` and the snapshot's state image (none: ``part`` alone)."""
    return [part, *(p for p in info.parts if p.kind == STATE_KIND and p is not part)]
