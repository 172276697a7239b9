"""Reading a closed StateStore's file directly, table by table (what it left on disk)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

__all__ = ["state_tables"]


def state_tables(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Objects, aliases and tombstones rows, each table in key order."""
    with sqlite3.connect(db) as conn:
        return {
            "objects": conn.execute(
                "SELECT key, stix_id, iid, type, phase, event_id, event, version, data, refs"
                " FROM objects ORDER BY key"
            ).fetchall(),
            "aliases": conn.execute("SELECT alias, key FROM aliases ORDER BY alias").fetchall(),
            "tombstones": conn.execute("SELECT * FROM tombstones ORDER BY key").fetchall(),
        }
