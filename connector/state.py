"""The state of every object as of one archived event, kept on disk in SQLite.

Folding archived events into a ``StateStore`` mirrors what the platform does to its own data
(protocol doc §8): objects are keyed on their internal id, an ``update`` is a full upsert, a merge
absorbs its sources and silently re-points what referenced them, and one ``delete`` event removes
the relationships and refs that depended on the object. The simulator's ``SimStore`` implements
the same rules on the platform side, and a store fed with its stream must end up equal to it.

Nothing is held in Python per object: every object, alias, reference and tombstone is a row, so
memory stays flat however large the platform is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from .events import OCTI_EXT, EventId, StreamEvent, octi_ext

if TYPE_CHECKING:
    from .storage import Storage

__all__ = [
    "ObjectRecord",
    "StateStore",
    "TombstoneRecord",
    "PHASES",
    "push_phase",
    "stix_refs",
]

# Restore push order: what an object may reference is pushed in an earlier phase.
PHASES = (
    "markings",
    "identities",
    "entities",
    "observed-data",  # refers to observables; relationships and sightings may refer to it
    "relationships",
    "relationships-of-relationships",  # endpoints pushed in the phase before
    "sightings",
    "containers",
    "notes",
)
_CONTAINER_TYPES = {"report", "grouping", "x-opencti-feedback", "x-opencti-task"}
_NOTE_TYPES = {"note", "opinion"}
# Ref fields whose target disappearing makes a relationship or sighting meaningless.
_ENDPOINTS = ("source_ref", "target_ref", "sighting_of_ref", "where_sighted_refs")
_RELATION_EXT = (
    ("source_ref", "source"),
    ("target_ref", "target"),
    ("sighting_of_ref", "sighting_of"),
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    key TEXT PRIMARY KEY, stix_id TEXT NOT NULL, type TEXT NOT NULL, phase INTEGER NOT NULL,
    event_id TEXT NOT NULL, event TEXT NOT NULL, version TEXT NOT NULL, data BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_phase ON objects (phase, key);
CREATE TABLE IF NOT EXISTS aliases (alias TEXT PRIMARY KEY, key TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS aliases_key ON aliases (key);
CREATE TABLE IF NOT EXISTS refs (ref TEXT NOT NULL, key TEXT NOT NULL, PRIMARY KEY (ref, key))
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_key ON refs (key);
CREATE TABLE IF NOT EXISTS tombstones (
    key TEXT PRIMARY KEY, stix_id TEXT NOT NULL, event_id TEXT NOT NULL, reason TEXT NOT NULL,
    into_id TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tombstones_stix ON tombstones (stix_id);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
"""


class ObjectRecord(NamedTuple):
    """One live object as stored: ``event_id``/``event`` name the last event that upserted it."""

    key: str
    stix_id: str
    event_id: str
    event: str
    data: dict[str, Any]


class TombstoneRecord(NamedTuple):
    key: str
    stix_id: str
    event_id: str
    reason: str  # "deleted" | "merged"
    into: str | None  # the merge target's STIX id


def stix_refs(stix: dict[str, Any]) -> list[str]:
    """Every id in top-level ``*_ref``/``*_refs`` fields plus the extension's ``granted_refs``."""
    out: list[str] = []
    for key, value in stix.items():
        if key.endswith("_ref") and isinstance(value, str):
            out.append(value)
        elif key.endswith("_refs") and isinstance(value, list):
            out.extend(v for v in value if isinstance(v, str))
    granted = octi_ext(stix).get("granted_refs")
    if isinstance(granted, list):
        out.extend(v for v in granted if isinstance(v, str))
    return out


def push_phase(stix: dict[str, Any]) -> int:
    """Index into ``PHASES``: the order a restore pushes objects in."""
    stype = str(stix.get("type", ""))
    if stype == "marking-definition":
        return 0
    if stype == "identity":
        return 1
    if stype == "observed-data":
        return 3
    if stype == "relationship":
        ends = (str(stix.get("source_ref", "")), str(stix.get("target_ref", "")))
        return 5 if any(e.startswith(("relationship--", "sighting--")) for e in ends) else 4
    if stype == "sighting":
        return 6
    if stype in _NOTE_TYPES:
        return 8
    if stype in _CONTAINER_TYPES or "case-" in stype or isinstance(stix.get("object_refs"), list):
        return 7
    return 2


def _is_relation(stix: dict[str, Any]) -> bool:
    return stix.get("type") in ("relationship", "sighting")


def _ids_of(stix: dict[str, Any]) -> list[str]:
    ids = [str(stix.get("id"))]
    ids.extend(x for x in octi_ext(stix).get("stix_ids") or [] if isinstance(x, str))
    return ids


def _name(stix: dict[str, Any]) -> str:
    # The platform's "representative" value shown in a relationship's extension.
    for key in ("name", "value", "pattern", "opinion", "abstract", "relationship_type"):
        value = stix.get(key)
        if isinstance(value, str) and value:
            return value
    return str(stix.get("id", ""))


def _norm_version(text: str) -> str:
    """A timestamp as a fixed-width UTC string, so versions compare as strings."""
    if not text:
        return ""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return text
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _version_of(stix: dict[str, Any]) -> str:
    value = octi_ext(stix).get("updated_at") or stix.get("modified") or ""
    return _norm_version(value) if isinstance(value, str) else ""


def _previous_standard(ev: StreamEvent) -> str | None:
    """The standard id before an id-changing update (the reverse patch's ``/id`` value)."""
    context = ev.envelope.get("context")
    ops = context.get("reverse_patch") if isinstance(context, dict) else None
    for op in ops if isinstance(ops, list) else []:
        if isinstance(op, dict) and op.get("path") == "/id" and isinstance(op.get("value"), str):
            return str(op["value"])
    return None


def _other_entity(blob: bytes, iid: str) -> bool:
    """Whether the stored object ``blob`` names an internal id other than ``iid``."""
    own = octi_ext(_loads(blob)).get("id")
    return isinstance(own, str) and bool(own) and own != iid


def _loads(blob: bytes) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(blob)
    return data


class StateStore:
    """Objects, aliases, reference index and tombstones of one materialised state."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly, one per apply/apply_many.
        self._db = sqlite3.connect(str(self.path), isolation_level=None)
        # A scratch database rebuilt from the archive at will: durability is not needed.
        self._db.execute("PRAGMA journal_mode=TRUNCATE")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("PRAGMA cache_size=-16384")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT v FROM meta WHERE k='as_of'").fetchone()
        self.as_of: EventId | None = EventId.parse(row[0]) if row else None

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, event_id: EventId) -> None:
        """Record that the state covers the stream up to ``event_id`` (a whole segment's end)."""
        self._set_as_of(event_id)

    def _set_as_of(self, event_id: EventId) -> None:
        if self.as_of is None or event_id > self.as_of:
            self.as_of = event_id
            self._db.execute(
                "INSERT OR REPLACE INTO meta (k, v) VALUES ('as_of', ?)", (str(event_id),)
            )

    # ------------------------------------------------------------------ applying events
    def apply(self, ev: StreamEvent) -> None:
        """Fold one archived event into the state (its own transaction)."""
        self.apply_many([ev])

    def apply_many(self, events: Iterable[StreamEvent]) -> int:
        """Fold events in stream order, all in one transaction. Returns how many were applied."""
        count = 0
        self._db.execute("BEGIN")
        try:
            for ev in events:
                self._apply(ev)
                count += 1
        except BaseException:
            self._db.execute("ROLLBACK")
            self._reload_as_of()
            raise
        self._db.execute("COMMIT")
        return count

    def _reload_as_of(self) -> None:
        row = self._db.execute("SELECT v FROM meta WHERE k='as_of'").fetchone()
        self.as_of = EventId.parse(row[0]) if row else None

    def _apply(self, ev: StreamEvent) -> None:
        if ev.event in ("create", "update"):
            self._upsert(ev.stix, ev.id_text, ev.event, _previous_standard(ev), guard=True)
        elif ev.event == "merge":
            self._merge(ev)
        elif ev.event == "delete":
            self._delete(ev)
        # The group id is the running maximum: a recovery event with a lower id stays in its group.
        self._set_as_of(ev.id)

    def _resolve(self, refs: Iterable[str | None], *, iid: str | None = None) -> str | None:
        """The key of the live object known under the first of ``refs`` that resolves.

        With ``iid``, an object that carries another internal id is skipped: it is a different
        entity on the platform, even when the incoming object already lists its ids (the merge
        target sent as a dependency just before its merge event).
        """
        for ref in refs:
            if not ref:
                continue
            row = self._db.execute(
                "SELECT o.key, o.data FROM aliases a JOIN objects o ON o.key = a.key"
                " WHERE a.alias = ?",
                (ref,),
            ).fetchone()
            if row and (iid is None or row[0] == iid or not _other_entity(row[1], iid)):
                return str(row[0])
        return None

    def _load(self, key: str) -> ObjectRecord | None:
        row = self._db.execute(
            "SELECT key, stix_id, event_id, event, data FROM objects WHERE key = ?", (key,)
        ).fetchone()
        return ObjectRecord(row[0], row[1], row[2], row[3], _loads(row[4])) if row else None

    def _version(self, key: str) -> str | None:
        row = self._db.execute("SELECT version FROM objects WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def _write(self, key: str, stix: dict[str, Any], event_id: str, event: str) -> None:
        """Store ``stix`` under ``key`` and (re)index its aliases and references."""
        db = self._db
        db.execute("DELETE FROM refs WHERE key = ?", (key,))
        db.execute(
            "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                str(stix.get("id")),
                str(stix.get("type", "")),
                push_phase(stix),
                event_id,
                event,
                _version_of(stix),
                orjson.dumps(stix),
            ),
        )
        iid = octi_ext(stix).get("id")
        aliases = {key, *_ids_of(stix), *([iid] if isinstance(iid, str) and iid else [])}
        # Never take an alias from another live object: the platform keeps both entities until
        # a merge, which hands the sources' ids over explicitly (see _merge).
        db.executemany(
            "INSERT INTO aliases (alias, key) VALUES (?, ?) ON CONFLICT (alias) DO UPDATE"
            " SET key = excluded.key"
            " WHERE NOT EXISTS (SELECT 1 FROM objects o WHERE o.key = aliases.key)",
            [(a, key) for a in aliases],
        )
        db.executemany(
            "INSERT OR IGNORE INTO refs (ref, key) VALUES (?, ?)",
            [(r, key) for r in set(stix_refs(stix))],
        )

    def _forget(self, key: str) -> None:
        for table in ("objects", "aliases", "refs"):
            self._db.execute(f"DELETE FROM {table} WHERE key = ?", (key,))  # noqa: S608

    def _tombstone(
        self, key: str, stix_id: str, event_id: str, reason: str, into: str | None
    ) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?, ?, ?)",
            (key, stix_id, event_id, reason, into),
        )

    def _referrers(self, ids: Iterable[str]) -> list[str]:
        keys: set[str] = set()
        for ref in set(ids):
            keys.update(
                str(r[0]) for r in self._db.execute("SELECT key FROM refs WHERE ref = ?", (ref,))
            )
        return sorted(keys)

    def _upsert(
        self,
        stix: dict[str, Any],
        event_id: str,
        event: str,
        previous: str | None,
        *,
        guard: bool,
    ) -> str | None:
        """Full upsert of ``stix``; returns its key, or None when a newer version is stored."""
        stix_id = str(stix.get("id"))
        iid = octi_ext(stix).get("id")
        iid = iid if isinstance(iid, str) and iid else None
        key = iid if iid and self._version(iid) is not None else None
        if key is None:
            key = self._resolve([iid, stix_id, previous, *_ids_of(stix)[1:]], iid=iid)
        old = self._load(key) if key else None
        if old is not None and guard:
            stored, incoming = self._version(old.key) or "", _version_of(stix)
            if stored and incoming and incoming < stored:
                return None  # a dependency re-send or recovery duplicate of an older version
        key = key or iid or stix_id
        self._write(key, stix, event_id, event)
        # A new life for a deleted object (same identity, or same standard id re-created).
        self._db.execute("DELETE FROM tombstones WHERE key = ? OR stix_id = ?", (key, stix_id))
        if old is not None and old.stix_id != stix_id:
            # Standard id change: the old id stays an alias, and what referenced it follows.
            self._db.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?)", (old.stix_id, key))
            self._repoint([old.stix_id], stix_id)
        return key

    def _merge(self, ev: StreamEvent) -> None:
        target = ev.stix
        context = ev.envelope.get("context")
        sources = context.get("sources") if isinstance(context, dict) else None
        iid = octi_ext(target).get("id")
        # Resolve everything before the target is written: its stix_ids already name the sources.
        t_key = self._resolve([iid if isinstance(iid, str) else None, ev.stix_id])
        absorbed: list[str] = []
        for src in sources if isinstance(sources, list) else []:
            if not isinstance(src, dict) or not isinstance(src.get("id"), str):
                continue
            s_iid = octi_ext(src).get("id")
            s_iid = s_iid if isinstance(s_iid, str) and s_iid else None
            s_key = self._resolve([s_iid, *_ids_of(src)])
            if s_key is not None and s_key == t_key:
                continue
            stored = self._load(s_key) if s_key else None
            ids = _ids_of(src) + (_ids_of(stored.data) if stored else [])
            if s_key is not None:
                self._forget(s_key)
            self._tombstone(
                s_key or s_iid or str(src["id"]),
                stored.stix_id if stored else str(src["id"]),
                ev.id_text,
                "merged",
                ev.stix_id,
            )
            absorbed.extend(i for i in ids if i not in absorbed)
        key = self._upsert(target, ev.id_text, "merge", None, guard=False)
        if key is not None and absorbed:
            self._db.executemany(
                "INSERT OR REPLACE INTO aliases VALUES (?, ?)", [(a, key) for a in absorbed]
            )
            self._repoint(absorbed, ev.stix_id)

    def _repoint(self, old_ids: list[str], new_id: str) -> None:
        """Rewrite refs to ``old_ids`` into ``new_id`` (the platform does it without events)."""
        olds = set(old_ids)
        for key in self._referrers(olds):
            rec = self._load(key)
            if rec is None:
                continue
            obj = rec.data
            new = dict(obj)
            for field, value in obj.items():
                if field.endswith("_ref") and value in olds:
                    new[field] = new_id
                elif field.endswith("_refs") and isinstance(value, list) and olds & set(value):
                    new[field] = list(dict.fromkeys(new_id if v in olds else v for v in value))
            if _is_relation(new):
                self._fill_relation_ext(new)
            self._write(key, new, rec.event_id, rec.event)

    def _fill_relation_ext(self, stix: dict[str, Any]) -> None:
        """Refresh the endpoint ids, types and names a relationship's extension repeats."""
        octi = dict(octi_ext(stix))
        for field, prefix in _RELATION_EXT:
            ref = stix.get(field)
            if not isinstance(ref, str):
                continue
            for suffix in ("_ref", "_type", "_value"):
                octi.pop(prefix + suffix, None)
            target = self.get(ref)
            if target is not None:
                t_ext = octi_ext(target)
                octi[prefix + "_ref"] = t_ext.get("id")
                octi[prefix + "_type"] = t_ext.get("type")
                octi[prefix + "_value"] = _name(target)
        where = stix.get("where_sighted_refs")
        if isinstance(where, list):
            found = [self.get(w) for w in where if isinstance(w, str)]
            targets = [t for t in found if t is not None]
            octi["where_sighted_refs"] = [octi_ext(t).get("id") for t in targets]
            octi["where_sighted_types"] = [octi_ext(t).get("type") for t in targets]
            octi["where_sighted_values"] = [_name(t) for t in targets]
        exts = dict(stix.get("extensions") or {})
        exts[OCTI_EXT] = octi
        stix["extensions"] = exts

    def _delete(self, ev: StreamEvent) -> None:
        iid = ev.internal_id or None
        key = self._resolve([iid, ev.stix_id])
        if key is None:
            # Unknown here (archive started later): tombstone it, and still clean its dependants.
            self._tombstone(iid or ev.stix_id, ev.stix_id, ev.id_text, "deleted", None)
            self._cascade_users(_ids_of(ev.stix), None, ev.id_text)
            return
        self._cascade(key, ev.id_text)

    def _cascade(self, key: str, event_id: str) -> None:
        """Delete ``key`` and what depended on it, as the platform's single delete does."""
        pending = [key]
        while pending:
            rec = self._load(pending.pop())
            if rec is None:
                continue
            self._forget(rec.key)
            self._tombstone(rec.key, rec.stix_id, event_id, "deleted", None)
            pending.extend(self._cascade_users(_ids_of(rec.data), rec.key, event_id))

    def _cascade_users(self, id_list: list[str], skip: str | None, event_id: str) -> list[str]:
        """Drop refs to ``id_list`` from referrers; return the relations that must go too."""
        ids = set(id_list)
        doomed: list[str] = []
        for user_key in self._referrers(ids):
            if user_key == skip:
                continue
            rec = self._load(user_key)
            if rec is None:
                continue
            user = rec.data
            if _is_relation(user) and any(
                (v in ids) if isinstance(v, str) else bool(ids.intersection(v))
                for v in (user.get(f) for f in _ENDPOINTS)
                if v
            ):
                doomed.append(user_key)
                continue
            new = dict(user)
            for field, value in user.items():
                if field.endswith("_ref") and value in ids:
                    del new[field]
                elif field.endswith("_refs") and isinstance(value, list) and ids & set(value):
                    new[field] = [v for v in value if v not in ids]
            self._write(user_key, new, rec.event_id, rec.event)
        return doomed

    # ------------------------------------------------------------------ seeding from a snapshot
    def load_records(
        self,
        objects: Iterable[ObjectRecord],
        tombstones: Iterable[TombstoneRecord],
        as_of: EventId,
    ) -> None:
        """Replace the state with the given records (one transaction)."""
        db = self._db
        db.execute("BEGIN")
        try:
            for table in ("objects", "aliases", "refs", "tombstones", "meta"):
                db.execute(f"DELETE FROM {table}")  # noqa: S608
            for rec in objects:
                self._write(rec.key, rec.data, rec.event_id, rec.event)
            db.executemany(
                "INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?, ?, ?)",
                (tuple(t) for t in tombstones),
            )
            self.as_of = None
            self._set_as_of(as_of)
        except BaseException:
            db.execute("ROLLBACK")
            self._reload_as_of()
            raise
        db.execute("COMMIT")

    def load_snapshot(self, storage: Storage, as_of_key: str) -> None:
        """Seed the state from the committed snapshot ``snapshots/<as_of_key>/``."""
        # Imported here: the snapshot module builds on this one.
        from .snapshot import (
            iter_snapshot_objects,
            iter_snapshot_tombstones,
            read_snapshot_manifest,
        )

        info = read_snapshot_manifest(storage, as_of_key)
        self.load_records(
            iter_snapshot_objects(storage, info),
            iter_snapshot_tombstones(storage, info),
            info.as_of,
        )

    # ------------------------------------------------------------------ reading
    def get(self, ref: str) -> dict[str, Any] | None:
        """The live object known under ``ref`` (STIX id, internal id, or alias)."""
        row = self._db.execute(
            "SELECT o.data FROM aliases a JOIN objects o ON o.key = a.key WHERE a.alias = ?", (ref,)
        ).fetchone()
        return _loads(row[0]) if row else None

    def records(
        self, *, phase: int | None = None, after: str | None = None
    ) -> Iterator[ObjectRecord]:
        """Live objects ordered by key (optionally one push phase, keys after ``after``)."""
        sql = "SELECT key, stix_id, event_id, event, data FROM objects WHERE key > ?"
        args: list[Any] = [after or ""]
        if phase is not None:
            sql += " AND phase = ?"
            args.append(phase)
        cursor = self._db.execute(sql + " ORDER BY key", args)
        for row in cursor:
            yield ObjectRecord(row[0], row[1], row[2], row[3], _loads(row[4]))

    def objects(self) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
        """``(key, stix_id, event_id, stix)`` of every live object, ordered by key."""
        for rec in self.records():
            yield rec.key, rec.stix_id, rec.event_id, rec.data

    def tombstones(self, *, after: str | None = None) -> Iterator[TombstoneRecord]:
        """``(key, stix_id, event_id, reason, into)`` ordered by key."""
        cursor = self._db.execute(
            "SELECT key, stix_id, event_id, reason, into_id FROM tombstones WHERE key > ?"
            " ORDER BY key",
            (after or "",),
        )
        for row in cursor:
            yield TombstoneRecord(row[0], row[1], row[2], row[3], row[4])

    def key_event_pairs(self) -> Iterator[tuple[str, str]]:
        """``(key, event_id)`` of every live object by key (for the state checksum)."""
        yield from self._db.execute("SELECT key, event_id FROM objects ORDER BY key")

    def counts(self) -> dict[str, int]:
        db = self._db
        out = {"objects": int(db.execute("SELECT count(*) FROM objects").fetchone()[0])}
        out["tombstones"] = 0
        for reason, n in db.execute("SELECT reason, count(*) FROM tombstones GROUP BY reason"):
            out[str(reason)] = int(n)
            out["tombstones"] += int(n)
        return out

    def type_counts(self) -> dict[str, int]:
        """Live objects per STIX type."""
        rows = self._db.execute("SELECT type, count(*) FROM objects GROUP BY type ORDER BY type")
        return {str(t): int(n) for t, n in rows}

    def phase_count(self, phase: int, *, after: str | None = None) -> int:
        row = self._db.execute(
            "SELECT count(*) FROM objects WHERE phase = ? AND key > ?", (phase, after or "")
        ).fetchone()
        return int(row[0])
