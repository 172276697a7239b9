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

import gc
import logging
import re
import sqlite3
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import orjson

from .errors import ConnectorError, MalformedEvent, NotFound, PermanentError
from .events import (
    OCTI_EXT,
    EventId,
    StreamEvent,
    archive_line_fields,
    octi_ext,
    parse_archive_line,
    rewrite_granted_refs,
)

if TYPE_CHECKING:
    from .storage import Storage

log = logging.getLogger(__name__)

__all__ = [
    "SNAPSHOT_ROWS",
    "STATE_SCHEMA",
    "ObjectRecord",
    "StateStore",
    "TombstoneRecord",
    "PHASES",
    "push_phase",
    "remove_state_files",
    "stix_refs",
    "version_of",
]

# Restore push order, by type: what an object references is mostly pushed in an earlier phase
# (the rest is ranked by ``StateStore.push_records``).
PHASES = (
    "markings",
    "identities",
    "entities",
    "observed-data",  # refers to observables; relationships and sightings may refer to it
    "relationships",
    "sightings",  # of entities and observables, never of relationships
    "relationships-of-relationships",  # endpoints pushed before (see push_records)
    "containers",
    "notes",
    "relationships-of-containers",  # an endpoint is a container or a note, pushed just before
)
# An object referencing one of the same or a later phase (a relationship of a relationship, a
# report in a grouping, a sighting of a note, a note on a note) is pushed in the later of those
# phases, after what it references (``StateStore.push_records``).
_ENTITIES = PHASES.index("entities")
_OBSERVED = PHASES.index("observed-data")
_RELATIONSHIPS = PHASES.index("relationships")
# Whether a reference ``j.value`` names a type stored from the observed-data phase on, in SQL:
# one comparison of its type (a LIKE per type took twice the time of the whole scan).
_REF_TYPE = "substr(j.value, 1, instr(j.value, '--') - 1)"
# Rounds that order chains of references: one per link of the longest chain (a cycle, which the
# platform cannot hold, is cut there).
_ORDER_ROUNDS = 64
_CONTAINER_TYPES = {"report", "grouping", "x-opencti-feedback", "x-opencti-task"}
_NOTE_TYPES = {"note", "opinion"}
# (The types pushed from the observed-data phase on; case-* as in push_phase.)
_LATE_TYPES = ", ".join(
    f"'{t}'"
    for t in sorted({"observed-data", "relationship", "sighting"} | _CONTAINER_TYPES | _NOTE_TYPES)
)
_LATE_REF = f"({_REF_TYPE} IN ({_LATE_TYPES}) OR {_REF_TYPE} GLOB 'case-*')"
# Ref fields whose target disappearing makes a relationship or sighting meaningless.
_ENDPOINTS = ("source_ref", "target_ref", "sighting_of_ref", "where_sighted_refs")
_RELATION_EXT = (
    ("source_ref", "source"),
    ("target_ref", "target"),
    ("sighting_of_ref", "sighting_of"),
)

# Bumped when the layout changes; a state database is scratch, rebuilt from the archive at will.
# A snapshot's state image (connector/snapshot.py) is opened only by code of the same version.
_SCHEMA_VERSION = 5
STATE_SCHEMA = _SCHEMA_VERSION
# ``objects`` is a rowid table: rows are appended, and lookups by key walk the small ``key`` index
# instead of a B-tree whose leaves hold 2 KB blobs. Each object row carries its own references
# (``refs``, a JSON array). The reverse index (``refs`` table: who references an id) and the
# indexes used only by merges, deletes and the restore's phase order are built on first need,
# set-based from those columns (see _LAZY_INDEXES): a fold of creates and updates maintains none
# of them, which saved a row per reference per object.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    rid INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, stix_id TEXT NOT NULL, iid TEXT,
    type TEXT NOT NULL, phase INTEGER NOT NULL, event_id TEXT NOT NULL, event TEXT NOT NULL,
    version TEXT NOT NULL, data BLOB NOT NULL, refs TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS aliases (alias TEXT PRIMARY KEY, key TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refs (ref TEXT NOT NULL, key TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tombstones (
    key TEXT PRIMARY KEY, stix_id TEXT NOT NULL, event_id TEXT NOT NULL, reason TEXT NOT NULL,
    into_id TEXT
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tombstones_stix ON tombstones (stix_id);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL) WITHOUT ROWID;
"""
# name -> (the index whose presence says it is built, the statements that build it). While
# "by_key" is not built the ``refs`` table is empty, and writes leave it alone.
_LAZY_INDEXES: dict[str, tuple[str, tuple[str, ...]]] = {
    "by_key": (
        "refs_ref",
        (
            "INSERT INTO refs (ref, key) SELECT j.value, o.key FROM objects o, json_each(o.refs) j",
            "CREATE INDEX aliases_key ON aliases (key)",
            "CREATE INDEX refs_key ON refs (key)",
            "CREATE INDEX refs_ref ON refs (ref)",
        ),
    ),
    "phase": ("objects_phase", ("CREATE INDEX objects_phase ON objects (phase, key)",)),
}


def _index_names(sqls: tuple[str, ...]) -> list[str]:
    return [sql.split()[2] for sql in sqls if sql.startswith("CREATE INDEX ")]


_UPSERT_OBJECT = (
    "INSERT INTO objects (key, stix_id, iid, type, phase, event_id, event, version, data, refs)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET"
    " stix_id = excluded.stix_id, iid = excluded.iid, type = excluded.type,"
    " phase = excluded.phase, event_id = excluded.event_id, event = excluded.event,"
    " version = excluded.version, data = excluded.data, refs = excluded.refs"
)
# Never take an alias from another live object: the platform keeps both entities until a merge,
# which hands the sources' ids over explicitly (see _merge).
_ADD_ALIAS = (
    "INSERT INTO aliases (alias, key) VALUES (?, ?) ON CONFLICT (alias) DO UPDATE"
    " SET key = excluded.key"
    " WHERE NOT EXISTS (SELECT 1 FROM objects o WHERE o.key = aliases.key)"
)
# Where the platform does hand an id over (a merge, a standard-id change, a claim), it is taken
# whoever holds it.
_TAKE_ALIAS = "INSERT OR REPLACE INTO aliases VALUES (?, ?)"
# ``refs`` has no key of its own: rows are written from each object's de-duplicated refs, after
# its previous rows are removed, so they never repeat; until a merge or delete needs to look them
# up, they are plain appends.
_ADD_REF = "INSERT INTO refs (ref, key) VALUES (?, ?)"
# Upserts folded per batch (about 2.5 KB each): 4,096 was 10% faster and 10 MB larger.
_RUN_EVENTS = 2048
_LOOKUP_CHUNK = 900  # ids per lookup query: under SQLite's bound-parameter limit (999)
# Snapshot rows loaded per statement: no slower than 2,048, and a quarter of the memory in flight.
_LOAD_ROWS = 512
# Aliases of new objects wait in memory and are inserted sorted, this many at a time: the alias
# B-tree's leaves are then each visited once per flush instead of once per row, which is what
# the fold spent its system time on once the tree outgrew the page cache (about 15 MB here).
_NEW_ALIASES_MAX = 65_536
_CACHE_KIB = 8192  # page cache: see PRAGMA cache_size in StateStore.__init__
_REF_SUFFIXES = ("_ref", "_refs")
# An alias row "<prefix><standard id>" -> key: that live object has this standard id while
# another live object holds it (one of them sent ahead, in a version from after the other is
# gone). Once the holder is forgotten or renamed, the id is handed over (``_forget``,
# ``_renamed``). A row of the alias table, so snapshots carry it like any alias; no id starts so.
_CLAIM = "claim:"
_CANONICAL_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


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
    return _refs(stix, octi_ext(stix))


def _refs(stix: dict[str, Any], octi: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key in _ref_fields(stix):
        value = stix[key]
        if key[-1] == "f":
            if isinstance(value, str):
                out.append(value)
        elif isinstance(value, list):
            for v in value:
                if isinstance(v, str):
                    out.append(v)
    granted = octi.get("granted_refs")
    if isinstance(granted, list):
        out.extend(v for v in granted if isinstance(v, str))
    return out


# Objects of one type share their key layout, so the ref fields are found once per layout
# instead of testing every key of every object (that test was a sixth of the planning time).
_LAYOUTS: dict[tuple[str, ...], tuple[str, ...]] = {}
_LAYOUTS_MAX = 4096


def _ref_fields(stix: dict[str, Any]) -> tuple[str, ...]:
    layout = tuple(stix)
    fields = _LAYOUTS.get(layout)
    if fields is None:
        fields = tuple(k for k in layout if k.endswith(_REF_SUFFIXES))
        if len(_LAYOUTS) >= _LAYOUTS_MAX:
            _LAYOUTS.clear()  # many layouts: bounded memory beats the hit rate
        _LAYOUTS[layout] = fields
    return fields


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
        if any(_pushed_late(e) for e in ends):
            return 9
        return 6 if any(e.startswith(("relationship--", "sighting--")) for e in ends) else 4
    if stype == "sighting":
        return 5
    if stype in _NOTE_TYPES:
        return 8
    if stype in _CONTAINER_TYPES or "case-" in stype or isinstance(stix.get("object_refs"), list):
        return 7
    return 2


def _pushed_late(ref: str) -> bool:
    """Whether the object ``ref`` names is pushed in the containers' or notes' phase."""
    stype = ref.split("--", 1)[0]
    return stype in _CONTAINER_TYPES or stype in _NOTE_TYPES or stype.startswith("case-")


def _is_relation(stix: dict[str, Any]) -> bool:
    return stix.get("type") in ("relationship", "sighting")


def _ids_of(stix: dict[str, Any]) -> list[str]:
    ids = [str(stix.get("id"))]
    ids.extend(x for x in octi_ext(stix).get("stix_ids") or [] if isinstance(x, str))
    return ids


def remove_state_files(path: str | Path) -> None:
    """Delete a state database and its SQLite side files (a scratch state is rebuilt at will,
    and as large as the platform: never left behind)."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _names_any(value: Any, ids: set[str]) -> bool:
    """Whether a ref field's value (one id or a list) names any of ``ids``."""
    if isinstance(value, str):
        return value in ids
    return isinstance(value, list) and bool(ids.intersection(value))


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
    if _CANONICAL_MS.fullmatch(text):  # the platform's own form: skip the datetime round trip
        return text[:23] + "000Z"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return text
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def version_of(stix: dict[str, Any]) -> str:
    """The version the state compares: OpenCTI's ``updated_at`` (else ``modified``), fixed width."""
    value = octi_ext(stix).get("updated_at") or stix.get("modified") or ""
    return _norm_version(value) if isinstance(value, str) else ""


def _previous_standard(ev: StreamEvent) -> str | None:
    """The standard id before an id-changing update (the reverse patch's ``/id`` value)."""
    return _reverse_id(ev.envelope)


def _reverse_id(envelope: dict[str, Any]) -> str | None:
    context = envelope.get("context")
    ops = context.get("reverse_patch") if isinstance(context, dict) else None
    for op in ops if isinstance(ops, list) else []:
        if isinstance(op, dict) and op.get("path") == "/id" and isinstance(op.get("value"), str):
            return str(op["value"])
    return None


def _object_row(key: str, stix: dict[str, Any], event_id: str, event: str) -> tuple[Any, ...]:
    iid = _str_or_none(octi_ext(stix).get("id"))
    return (
        key,
        str(stix.get("id")),
        iid,
        str(stix.get("type", "")),
        push_phase(stix),
        event_id,
        event,
        version_of(stix),
        orjson.dumps(stix),
        _refs_json(set(stix_refs(stix))),
    )


def _refs_json(refs: set[str]) -> str:
    # Sorted: a set's order changes with each process's string hashing, and these bytes go
    # into snapshots, which must be the same for the same state.
    return orjson.dumps(sorted(refs)).decode()


def _aliases_of(key: str, stix: dict[str, Any]) -> list[str]:
    iid = _str_or_none(octi_ext(stix).get("id"))
    return list(dict.fromkeys((key, *_ids_of(stix), *([iid] if iid else []))))


def _loads(blob: bytes) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(blob)
    return data


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# One plain upsert, reduced to what the fold needs: (event id, event id text, event name,
# internal id, [STIX id, *extension stix_ids], version, refs and their JSON, the objects row's
# type, phase and data). The parsed event and its line are not kept: a batch holds about 2.5 KB
# an event.
_Item = tuple[
    tuple[int, int],
    str,
    str,
    str | None,
    list[str],
    str,
    set[str],
    str,
    str,
    int,
    bytes,
]
_NO_REFS: frozenset[str] = frozenset()


def _upsert_item(
    eid: tuple[int, int],
    id_text: str,
    event: str,
    envelope: dict[str, Any],
) -> _Item | None:
    """The item of a plain create/update; None when the event needs the per-event path."""
    if event != "create" and event != "update":
        return None
    stix = envelope.get("data")
    if not isinstance(stix, dict) or _reverse_id(envelope) is not None:
        return None
    octi = octi_ext(stix)
    iid = octi.get("id")
    iid = iid if isinstance(iid, str) and iid else None
    ids = [str(stix.get("id"))]
    extra = octi.get("stix_ids")
    if extra:
        ids.extend(x for x in extra if isinstance(x, str))
    stamp = octi.get("updated_at") or stix.get("modified") or ""
    version = _norm_version(stamp) if isinstance(stamp, str) else ""
    refs = set(_refs(stix, octi))
    stype = str(stix.get("type", ""))
    blob = orjson.dumps(stix)
    phase = push_phase(stix)
    return eid, id_text, event, iid, ids, version, refs, _refs_json(refs), stype, phase, blob


# A snapshot line carries its object's row and aliases before the object itself, so a restore
# parses only that header and takes the object's bytes from the line (see ``load_lines``).
_SNAPSHOT_HEADER = (
    "key",
    "stix_id",
    "event_id",
    "event",
    "iid",
    "type",
    "phase",
    "version",
    "refs",
    "aliases",
)
# The rules that derive a row's iid, type, phase, version, refs and aliases from the object.
# Bump when they change: snapshots written under other rules are loaded by deriving them again.
# 2: sightings before relationships of relationships (phases 5, 6); 3: relationships of
# containers and notes after them (phase 9).
SNAPSHOT_ROWS = 3
# A snapshot's aliases, sorted: each to the first key in key order that claims it. Aliases a
# snapshot lists come from the state's alias table, where each has one key; those derived from
# older snapshots' objects may be claimed twice, and a fold in key order keeps the first claim.
_SNAPSHOT_ALIASES = (
    "INSERT OR IGNORE INTO aliases (alias, key)"
    " SELECT j.value, s.key FROM temp.snapshot_aliases s, json_each(s.aliases) j"
    " WHERE j.type = 'text' ORDER BY 1, 2"
)


def _snapshot_header_row(line: bytes) -> tuple[tuple[Any, ...], list[str], str] | None:
    """Row, aliases and their JSON from the header of a line in the snapshot writer's layout,
    the object's bytes as they are; None for any other layout (the caller parses the line)."""
    cut = line.find(b',"data":')
    if cut < 0:
        return None
    try:
        # Cut anywhere but at the top level, the header would leave a bracket open.
        head = orjson.loads(line[:cut] + b"}")
    except orjson.JSONDecodeError:
        return None
    if type(head) is not dict or tuple(head) != _SNAPSHOT_HEADER:
        return None
    key, stix_id, event_id, event, iid, stype, phase, version, refs, aliases = head.values()
    blob = line[cut + 8 : line.rfind(b"}")]  # the last brace closes the line's object
    if not (
        type(key) is str
        and type(stix_id) is str
        and type(event_id) is str
        and type(event) is str
        and type(stype) is str
        and type(version) is str
        and (iid is None or type(iid) is str)
        and type(phase) is int
        and type(refs) is list
        and type(aliases) is list
        and blob[:1] == b"{"
        and blob[-1:] == b"}"
    ):
        return None
    # The two arrays as they are in the line: "refs" then "aliases", the header's last fields.
    at_aliases = line.rfind(b',"aliases":', 0, cut)
    at_refs = line.rfind(b',"refs":', 0, at_aliases)
    refs_json = line[at_refs + 8 : at_aliases].decode()
    aliases_json = line[at_aliases + 11 : cut].decode()
    row = (key, stix_id, iid, stype, phase, event_id, event, version, blob, refs_json)
    return row, aliases, aliases_json


def _snapshot_row(line: bytes) -> tuple[tuple[Any, ...], list[str]]:
    """The objects row of one snapshot line, derived from its object, and its aliases: those
    of the object plus any the line lists."""
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"snapshot line is not valid JSON: {exc}") from exc
    if not isinstance(rec, dict):
        raise MalformedEvent("snapshot line is not an object record")
    key, event_id, event, stix = (
        rec.get("key"),
        rec.get("event_id"),
        rec.get("event"),
        rec.get("data"),
    )
    if not (
        isinstance(key, str)
        and isinstance(event_id, str)
        and isinstance(event, str)
        and isinstance(stix, dict)
    ):
        raise MalformedEvent("snapshot line lacks key/event_id/event/data")
    listed = rec.get("aliases")
    extra = [a for a in listed if isinstance(a, str)] if isinstance(listed, list) else []
    return _object_row(key, stix, event_id, event), _aliases_of(key, stix) + extra


def _as_event(src: StreamEvent | bytes) -> StreamEvent:
    return src if isinstance(src, StreamEvent) else parse_archive_line(src)


class _Seen:
    """A Bloom filter over every alias this process wrote or loaded: no false negatives.

    Folding a large archive is mostly objects never seen before; asking SQLite about each of
    their ids cost as much as writing them. A fixed 4 MB of bits answers "certainly new" for
    nearly all of them (about 2% false positives at 2.5 M aliases), so memory stays flat.
    """

    __slots__ = ("bits",)
    _BITS = 1 << 25
    _MASK = _BITS - 1

    def __init__(self) -> None:
        self.bits = bytearray(self._BITS >> 3)

    def add_many(self, aliases: Iterable[str]) -> None:
        bits, mask = self.bits, self._MASK
        for alias in aliases:
            h = hash(alias)
            a, b = h & mask, (h >> 32) & mask
            bits[a >> 3] |= 1 << (a & 7)
            bits[b >> 3] |= 1 << (b & 7)

    def maybe(self, alias: str) -> bool:
        h = hash(alias)
        a, b = h & self._MASK, (h >> 32) & self._MASK
        bits = self.bits
        return bool(bits[a >> 3] & (1 << (a & 7))) and bool(bits[b >> 3] & (1 << (b & 7)))


class _Known:
    """What a batch knows of one stored (or just written) object: enough to resolve, guard and
    replace it without another query. One instance per key, shared by all its aliases."""

    __slots__ = ("key", "iid", "stix_id", "version", "refs", "refs_json")

    def __init__(
        self,
        key: str,
        iid: str | None,
        stix_id: str,
        version: str,
        refs: set[str] | None,
        refs_json: str | None,
    ) -> None:
        self.key, self.iid, self.stix_id, self.version = key, iid, stix_id, version
        self.refs, self.refs_json = refs, refs_json

    def stored_refs(self) -> set[str]:
        if self.refs is None:
            self.refs = set(orjson.loads(self.refs_json or "[]"))
        return self.refs


class _Pending:
    """One key's final row of a batch, and the refs its database row had before the batch."""

    __slots__ = ("row", "refs", "db_refs")

    def __init__(self, db_refs: AbstractSet[str]) -> None:
        self.row: tuple[Any, ...] = ()
        self.refs: set[str] = set()
        self.db_refs = db_refs


class _Discarded:
    """Stands in for the connection of a scratch store whose transaction failed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __getattr__(self, name: str) -> Any:
        raise ConnectorError(
            f"state {self.path.name} was discarded after a failed transaction (a scratch store "
            "keeps no journal to undo it); build a new one from the archive"
        )


class StateStore:
    """Objects, aliases, reference index and tombstones of one materialised state.

    ``scratch=True`` is for a store its caller builds for one job and deletes (restore,
    snapshot, verify all do): it keeps no rollback journal. At 1M events the journal's copies of
    the index pages were a quarter of the fold (57.8 -> 42.0 s, system time 24.2 -> 10.6 s).
    Without it a failed transaction cannot be undone, so the store is discarded instead: every
    later use raises ``ConnectorError``. Without ``scratch``, a failed fold rolls back and the
    store stays usable.
    """

    def __init__(self, path: str | Path, *, scratch: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.scratch = scratch
        self._discarded = False
        # Autocommit mode: transactions are opened explicitly, one per apply/apply_many.
        self._db = sqlite3.connect(str(self.path), isolation_level=None)
        # Rebuilt from the archive at will: durability is not needed. The rollback journal, when
        # kept, is on disk (a memory journal would grow with the segment); appended pages are
        # never journaled. The page cache is small: the working set of a fold is the key
        # indexes' right edges and the batch's lookups, and a large cache was most of the
        # restore's peak memory. Temporary B-trees (the sort that builds a lazy index) spill to
        # files instead of memory.
        for pragma in (
            "page_size=16384",  # before the first table: fewer, fuller pages for 2 KB rows
            f"journal_mode={'OFF' if scratch else 'TRUNCATE'}",
            "synchronous=OFF",
            f"cache_size=-{_CACHE_KIB}",
            "temp_store=FILE",
            "mmap_size=0",
        ):
            self._db.execute(f"PRAGMA {pragma}")
        if int(self._db.execute("PRAGMA user_version").fetchone()[0]) != _SCHEMA_VERSION:
            for table in ("objects", "aliases", "refs", "tombstones", "meta"):
                self._db.execute(f"DROP TABLE IF EXISTS {table}")
            self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        self._db.executescript(_SCHEMA)
        self._indexed: set[str] = set()
        self._ordered_at = -1  # total_changes when temp.push_order was built (-1: never)
        self._seen = _Seen()
        self._new_aliases: dict[str, str] = {}  # alias -> key, not yet in ``aliases``
        self._seen_loaded = self._db.execute("SELECT 1 FROM aliases LIMIT 1").fetchone() is None
        # After a snapshot load: ids a fold may look up in SQLite before the filter is filled
        # (filling it costs about as much as looking up an eighth of the aliases it holds).
        self._unfiltered_budget = 0
        self.as_of: EventId | None = None
        self._reload_as_of()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if not self._discarded:
            self.settle()  # the file holds the whole state, for whoever opens it next
            self._db.close()

    def _abort(self) -> None:
        """Undo the failed transaction; a scratch store, which cannot, is discarded."""
        self._new_aliases.clear()
        if self._discarded:
            return
        if self.scratch:
            self._discarded = True
            self._db.close()
            self._db = cast(sqlite3.Connection, _Discarded(self.path))
            return
        self._db.execute("ROLLBACK")
        self._reload_as_of()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction: committed, or undone on any failure (see ``_abort``)."""
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._abort()
            raise
        self._db.execute("COMMIT")

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

    def _index(self, name: str) -> None:
        """Build a lazy index (once; it is kept up to date from then on).

        In a savepoint: all of it or nothing, inside a fold's transaction or on its own (and
        one statement at a time: executescript() would commit the open transaction).
        """
        if name not in self._indexed:
            self._db.execute("SAVEPOINT lazy_index")
            try:
                for sql in _LAZY_INDEXES[name][1]:
                    self._db.execute(sql)
            except BaseException:
                if self.scratch:
                    self._abort()
                else:
                    self._db.execute("ROLLBACK TO lazy_index")
                    self._db.execute("RELEASE lazy_index")
                raise
            self._db.execute("RELEASE lazy_index")
            self._indexed.add(name)

    # ------------------------------------------------------------------ applying events
    def apply(self, ev: StreamEvent) -> None:
        """Fold one archived event into the state (its own transaction)."""
        self.apply_many([ev])

    def apply_many(self, events: Iterable[StreamEvent]) -> int:
        """Fold events in stream order, all in one transaction. Returns how many were applied."""
        return self._fold((ev.id, ev.id_text, ev.event, ev.envelope, ev) for ev in events)

    def fold_lines(
        self,
        lines: Iterable[bytes],
        *,
        first: EventId,
        done: EventId | None = None,
        until: EventId | None = None,
    ) -> int:
        """Fold one segment's archive lines whose group id is in ``(done, until]``.

        The group id is the running maximum of event ids from the segment's ``first``. Each line
        is parsed once, straight into the rows it produces; no ``StreamEvent`` is built except
        for the rare events that take the per-event path. One transaction; returns how many
        events were applied.
        """

        def entries() -> Iterator[tuple[tuple[int, int], str, str, dict[str, Any], bytes]]:
            hwm: tuple[int, int] = first
            for line in lines:
                id_text, event, envelope = archive_line_fields(line)
                eid = EventId.parse(id_text)
                if eid > hwm:
                    hwm = eid
                if done is not None and hwm <= done:
                    continue
                if until is not None and hwm > until:
                    return
                yield eid, id_text, event, envelope, line

        return self._fold(entries())

    def _fold(
        self,
        entries: Iterable[tuple[tuple[int, int], str, str, dict[str, Any], StreamEvent | bytes]],
    ) -> int:
        """Runs of plain creates and updates are reduced to rows as they are read and written in
        batches: one lookup query for the ids that may already be stored, then a few
        ``executemany`` writes. Merges, deletes and standard-id changes take the per-event path;
        they are rare, and what they touch is found through the indexes.
        """
        count = 0
        # Items are acyclic and freed by reference counting; the cyclic collector would only
        # rescan the batch's live containers, over and over.
        paused = gc.isenabled()
        gc.disable()
        try:
            with self._transaction():
                run: list[_Item] = []
                for eid, id_text, event, envelope, src in entries:
                    count += 1
                    item = _upsert_item(eid, id_text, event, envelope)
                    if item is not None:
                        run.append(item)
                        if len(run) >= _RUN_EVENTS:
                            self._fold_run(run)
                            run = []
                        continue
                    self._fold_run(run)
                    run = []
                    self._apply(_as_event(src))
                self._fold_run(run)
                if not self.scratch:
                    # A later fold's rollback must not take these with it. A scratch store
                    # keeps them waiting across folds (one per segment): flushed at every
                    # segment, they rewrote most of a large alias B-tree each time (settle).
                    self._flush_new_aliases()
        finally:
            if paused:
                gc.enable()
        return count

    def _reload_as_of(self) -> None:
        """Re-read what a rollback may have undone: the position and the lazy indexes."""
        row = self._db.execute("SELECT v FROM meta WHERE k='as_of'").fetchone()
        self.as_of = EventId.parse(row[0]) if row else None
        names = {str(r[0]) for r in self._db.execute("SELECT name FROM sqlite_master")}
        self._indexed = {name for name, (marker, _) in _LAZY_INDEXES.items() if marker in names}

    def _per_event(self) -> None:
        """Before the per-event path: every alias in SQL, and the by-key indexes built."""
        self._flush_new_aliases()
        self._index("by_key")

    def _apply(self, ev: StreamEvent) -> None:
        self._per_event()
        if ev.event in ("create", "update"):
            self._upsert(ev.stix, ev.id_text, ev.event, _previous_standard(ev), guard=True)
        elif ev.event == "merge":
            self._merge(ev)
        elif ev.event == "delete":
            # A delete carrying an update (protocol doc §5.3, §8.14) only means the object left
            # the stream's filters or rights; it was not deleted upstream. It stays as last seen:
            # nothing cascades, no tombstone makes a restore delete it, and what still refers to
            # it keeps a target a restore can push (the platform refuses a missing one).
            if ev.envelope.get("type") != "update":
                self._delete(ev)
        # The group id is the running maximum: a recovery event with a lower id stays in its group.
        self._set_as_of(ev.id)

    def _fold_run(self, run: list[_Item]) -> None:
        """Plain upserts (no standard-id change announced), with ``_upsert``'s exact rules."""
        while run:
            done = self._fold_batch(run)
            if done < len(run):
                # A standard-id change found on the way: that event takes the per-event path,
                # as ``_apply`` would (an item never announces a previous standard id).
                eid, id_text, event = run[done][:3]
                self._per_event()
                self._upsert(_loads(run[done][10]), id_text, event, None, guard=True)
                self._set_as_of(EventId(*eid))
                done += 1
            run = run[done:]

    def _fold_batch(self, items: list[_Item]) -> int:
        """Fold ``items`` up to the first one that needs ``_upsert``; returns how many."""
        wanted: set[str] = set()
        if not self._seen_loaded and self._unfiltered_budget > 0:
            # A few events after a snapshot: asking SQLite about each id is cheaper than
            # filling the filter with every alias the snapshot brought.
            for item in items:
                if item[3]:
                    wanted.add(item[3])
                wanted.update(item[4])
            self._unfiltered_budget -= len(wanted)
        else:
            self._load_seen()
            maybe = self._seen.maybe
            for item in items:
                iid = item[3]
                if iid and maybe(iid):
                    wanted.add(iid)
                wanted.update(i for i in item[4] if maybe(i))
        known = self._lookup(wanted) if wanted else {}
        # Re-creating a tombstoned object ends its tombstone; most folds have none to check.
        tombstones = self._db.execute("SELECT 1 FROM tombstones LIMIT 1").fetchone() is not None
        pending: dict[str, _Pending] = {}
        alias_rows: list[tuple[str, str]] = []  # may exist in SQL: the guarded insert
        claimed: list[tuple[str, str]] = []  # standard ids taken from another live object
        new_aliases = self._new_aliases  # certainly not in SQL (the filter said so)
        queued: list[str] = []
        written: list[tuple[str, str]] = []
        done = 0
        as_of: tuple[int, int] | None = self.as_of
        for eid, id_text, event, iid, ids, version, refs, refs_json, stype, phase, blob in items:
            old = known.get(iid) if iid else None
            if old is None or old.key != iid:
                # By any id, skipping an object that carries another internal id (_resolve).
                old = None
                for ref in (iid, *ids) if iid else ids:
                    k = known.get(ref)
                    if k is not None and (iid is None or k.key == iid or k.iid in (None, iid)):
                        old = k
                        break
            stix_id = ids[0]
            if old is not None and old.version and version and version < old.version:
                # A dependency re-send or recovery duplicate of an older version: not written,
                # but its ids that no live object holds are the object's (its later version,
                # sent ahead, could not take them from an earlier life deleted since).
                key, mine, stale = old.key, old, True
            elif old is not None and old.stix_id != stix_id:
                break  # standard-id change: re-point what referenced the old id (_upsert)
            else:
                stale = False
                key = old.key if old is not None else (iid or stix_id)
                pend = pending.get(key)
                if pend is None:
                    pend = pending[key] = _Pending(old.stored_refs() if old else _NO_REFS)
                pend.row = (
                    key,
                    stix_id,
                    iid,
                    stype,
                    phase,
                    id_text,
                    event,
                    version,
                    blob,
                    refs_json,
                )
                pend.refs = refs
                if old is not None:
                    old.iid, old.stix_id, old.version, old.refs = iid, stix_id, version, refs
                    mine = old
                else:
                    mine = _Known(key, iid, stix_id, version, refs, None)
                if tombstones:
                    written.append((key, stix_id))
            if len(ids) == 1 and (iid is None or iid == key):
                aliases: Iterable[str] = (key,) if stix_id == key else (key, stix_id)
            else:
                aliases = dict.fromkeys((key, *ids, *((iid,) if iid else ())))
            for alias in aliases:
                holder = known.get(alias)
                if holder is None or (holder.key == key and not stale):
                    known[alias] = mine
                    if alias in wanted:
                        alias_rows.append((alias, key))
                    else:
                        new_aliases[alias] = key
                        queued.append(alias)
                elif alias == stix_id and not stale and holder.stix_id != alias:
                    # Another live object lists this standard id as an old id: it lost it
                    # (see _claim_standard_id).
                    known[alias] = mine
                    claimed.append((alias, key))
                elif alias == stix_id and not stale:
                    claimed.append((_CLAIM + alias, key))  # its standard id too (_CLAIM)
            if as_of is None or eid > as_of:
                as_of = eid
            done += 1
        self._flush(pending, alias_rows, written)
        if claimed:
            self._add_aliases(_TAKE_ALIAS, claimed)
        # Queued aliases must be found by the next batches' lookups (this one uses ``known``).
        self._seen.add_many(queued)
        if len(new_aliases) >= _NEW_ALIASES_MAX:
            self._flush_new_aliases()
        if as_of is not None:
            self._set_as_of(EventId(*as_of))
        return done

    def _lookup(self, ids: set[str]) -> dict[str, _Known]:
        """Live objects known under any of ``ids``, by alias."""
        out: dict[str, _Known] = {}
        by_key: dict[str, _Known] = {}
        waiting = {a: self._new_aliases[a] for a in ids if a in self._new_aliases}
        if waiting:
            by_key.update(self._known_by_key(set(waiting.values())))
            for alias, key in waiting.items():
                if key in by_key:
                    out[alias] = by_key[key]
        wanted = [a for a in ids if a not in waiting]
        for start in range(0, len(wanted), _LOOKUP_CHUNK):
            part = wanted[start : start + _LOOKUP_CHUNK]
            rows = self._db.execute(
                "SELECT a.alias, o.key, o.iid, o.stix_id, o.version, o.refs FROM aliases a"
                " JOIN objects o ON o.key = a.key"
                f" WHERE a.alias IN ({','.join('?' * len(part))})",  # noqa: S608
                part,
            )
            for alias, key, iid, stix_id, version, refs_json in rows:
                known = by_key.get(key)
                if known is None:
                    known = by_key[key] = _Known(key, iid, stix_id, version, None, refs_json)
                out[alias] = known
        return out

    def _known_by_key(self, keys: set[str]) -> dict[str, _Known]:
        out: dict[str, _Known] = {}
        wanted = list(keys)
        for start in range(0, len(wanted), _LOOKUP_CHUNK):
            part = wanted[start : start + _LOOKUP_CHUNK]
            rows = self._db.execute(
                "SELECT key, iid, stix_id, version, refs FROM objects"
                f" WHERE key IN ({','.join('?' * len(part))})",  # noqa: S608
                part,
            )
            for key, iid, stix_id, version, refs_json in rows:
                out[key] = _Known(key, iid, stix_id, version, None, refs_json)
        return out

    def settle(self) -> None:
        """Write the aliases still waiting in memory (a scratch store keeps new objects' aliases
        across folds). Reads and ``close`` do it themselves; a caller done folding may call it to
        free that memory at once."""
        if not self._new_aliases:
            return
        if self._db.in_transaction:
            self._flush_new_aliases()
            return
        with self._transaction():
            self._flush_new_aliases()

    def _flush_new_aliases(self) -> None:
        """Insert the waiting aliases, sorted. A row already there has the same key: an object
        re-asserting its own alias (see _fold_batch), so it is ignored."""
        if self._new_aliases:
            waiting = self._new_aliases
            # Sorting the aliases alone (one key per alias) is about twice as fast as the pairs.
            rows = [(alias, waiting[alias]) for alias in sorted(waiting)]
            waiting.clear()
            # Already in the filter: it learnt them when they were queued.
            self._db.executemany("INSERT OR IGNORE INTO aliases VALUES (?, ?)", rows)

    def _flush(
        self,
        pending: dict[str, _Pending],
        alias_rows: list[tuple[str, str]],
        written: list[tuple[str, str]],
    ) -> None:
        db = self._db
        if "by_key" in self._indexed:  # the reverse index exists: keep it in step
            dropped = [(r, k) for k, p in pending.items() for r in p.db_refs - p.refs]
            db.executemany("DELETE FROM refs WHERE ref = ? AND key = ?", dropped)
            db.executemany(
                _ADD_REF, [(r, k) for k, p in pending.items() for r in p.refs - p.db_refs]
            )
        # Sorted: the key indexes' B-trees are then walked in order, one page after the other.
        db.executemany(_UPSERT_OBJECT, sorted(p.row for p in pending.values()))
        alias_rows.sort()  # each alias has one key per batch (see _fold_batch): order is free
        self._add_aliases(_ADD_ALIAS, alias_rows)
        # A new life for a deleted object (same identity, or same standard id re-created).
        if written:
            db.executemany("DELETE FROM tombstones WHERE key = ? OR stix_id = ?", written)

    def _add_aliases(self, sql: str, rows: list[tuple[str, str]]) -> None:
        """Alias rows written at once go through here (queued ones are added to the filter when
        queued): the Bloom filter must never miss an alias the store holds or waits to write."""
        self._seen.add_many(alias for alias, _ in rows)
        self._db.executemany(sql, rows)

    def _load_seen(self) -> None:
        """Fill the filter from a store opened with data in it (once per process)."""
        if self._seen_loaded:
            return
        self._seen_loaded = True
        self._seen.add_many(alias for (alias,) in self._db.execute("SELECT alias FROM aliases"))

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
                "SELECT o.key, o.iid FROM aliases a JOIN objects o ON o.key = a.key"
                " WHERE a.alias = ?",
                (ref,),
            ).fetchone()
            if row and (iid is None or row[0] == iid or row[1] in (None, iid)):
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
        row = _object_row(key, stix, event_id, event)
        db.execute(_UPSERT_OBJECT, row)
        self._add_aliases(_ADD_ALIAS, [(a, key) for a in _aliases_of(key, stix)])
        self._claim_standard_id(key, row[1])
        if "by_key" in self._indexed:
            db.execute("DELETE FROM refs WHERE key = ?", (key,))
            db.executemany(_ADD_REF, [(r, key) for r in orjson.loads(row[-1])])

    def _claim_standard_id(self, key: str, stix_id: str) -> None:
        """An object's standard id is its own, even when another live object still lists it
        as an old id: on the platform, an object created under an id another one lists is
        upserted into that one, so that one has lost it (deleted or renamed since, by events
        the archive holds later: a reconciliation's, written after the repair's recovery)."""
        holder = self._alias_holder(stix_id)
        if holder is not None and holder[0] != key:
            # Held as an old id: taken; held as the holder's standard id too: claimed (_CLAIM).
            alias = stix_id if holder[1] != stix_id else _CLAIM + stix_id
            self._add_aliases(_TAKE_ALIAS, [(alias, key)])

    def _standard_id_of_another(self, stix_id: str, key: str | None) -> bool:
        """Whether ``stix_id`` is the standard id of a live object other than ``key``."""
        holder = self._alias_holder(stix_id)
        return holder is not None and holder[0] != key and holder[1] == stix_id

    def _alias_holder(self, alias: str) -> tuple[str, str] | None:
        """``(key, standard id)`` of the live object ``alias`` leads to."""
        row = self._db.execute(
            "SELECT a.key, o.stix_id FROM aliases a JOIN objects o ON o.key = a.key"
            " WHERE a.alias = ?",
            (alias,),
        ).fetchone()
        return (str(row[0]), str(row[1])) if row else None

    def _forget(self, key: str) -> None:
        db = self._db
        # A standard id it holds that another live object claims (_CLAIM) is that object's now:
        # left to none, the id of a live object would be deleted by a restore (its tombstone).
        handed = [
            (str(claim)[len(_CLAIM) :], str(claimer))
            for claim, claimer in db.execute(
                "SELECT c.alias, c.key FROM aliases c JOIN objects o ON o.key = c.key"
                " WHERE c.key != ? AND c.alias IN (SELECT ? || alias FROM aliases WHERE key = ?)",
                (key, _CLAIM, key),
            )
        ]
        for table in ("objects", "aliases", "refs"):
            db.execute(f"DELETE FROM {table} WHERE key = ?", (key,))  # noqa: S608
        if handed:
            self._add_aliases(_ADD_ALIAS, handed)

    def _claimer(self, stix_id: str) -> str | None:
        """The key of the live object that claimed ``stix_id`` as its standard id (_CLAIM). One
        that changed its standard id since still has it as an old id, as the platform keeps it."""
        row = self._db.execute(
            "SELECT a.key FROM aliases a JOIN objects o ON o.key = a.key WHERE a.alias = ?",
            (_CLAIM + stix_id,),
        ).fetchone()
        return str(row[0]) if row is not None else None

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
            stored, incoming = self._version(old.key) or "", version_of(stix)
            if stored and incoming and incoming < stored:
                # A dependency re-send or recovery duplicate of an older version. Not written,
                # but its ids no live object holds are the object's (its later version, sent
                # ahead, could not take them from an earlier life deleted since), and when it is
                # an id change the stored version already has, what still names the old id
                # (folded since) follows it all the same.
                self._add_aliases(_ADD_ALIAS, [(a, old.key) for a in _aliases_of(old.key, stix)])
                self._renamed(old.key, [previous], old.stix_id)
                return None
        key = key or iid or stix_id
        self._write(key, stix, event_id, event)
        # A new life for a deleted object (same identity, or same standard id re-created).
        self._db.execute("DELETE FROM tombstones WHERE key = ? OR stix_id = ?", (key, stix_id))
        # Standard id change (the stored id differs, or the event's reverse patch names the id
        # before it): the old id stays an alias, and what referenced it follows.
        self._renamed(key, [old.stix_id if old else None, previous], stix_id)
        return key

    def _renamed(self, key: str, old_ids: list[str | None], new_id: str) -> None:
        """``old_ids`` were the standard ids of the object at ``key``, now ``new_id``; an id
        another live object holds is left alone."""
        olds = [i for i in dict.fromkeys(old_ids) if i and i != new_id]
        olds = [i for i in olds if self._resolve([i]) in (None, key)]
        if olds:
            # An old id another live object claims as its standard id (_CLAIM) is that one's
            # now; what named it at the change still follows this object (the platform's way).
            rows = [(i, self._claimer(i) or key) for i in olds]
            self._add_aliases(_TAKE_ALIAS, rows)
            self._repoint(olds, new_id, key)

    def _merge(self, ev: StreamEvent) -> None:
        target = ev.stix
        context = ev.envelope.get("context")
        sources = context.get("sources") if isinstance(context, dict) else None
        iid = _str_or_none(octi_ext(target).get("id"))
        # Resolve everything before the target is written: its stix_ids already name the sources.
        # By internal id: a live stream sends objects in their version at send time, so the
        # entity that absorbs this merge's target or sources *later* can be folded before this
        # merge, holding their ids. That entity is neither this merge's target nor a source.
        t_key = self._resolve([iid, ev.stix_id], iid=iid)
        absorbed: list[str] = []
        merged: list[tuple[str, str]] = []  # (tombstone key, stix id) of each source
        held: dict[str, list[str]] = {}  # key of a live object holding sources' ids -> the ids
        for src in sources if isinstance(sources, list) else []:
            if not isinstance(src, dict) or not isinstance(src.get("id"), str):
                continue
            s_iid = _str_or_none(octi_ext(src).get("id"))
            s_ids = _ids_of(src)
            s_key = self._resolve([s_iid, *s_ids], iid=s_iid)
            holder = s_key if s_key == t_key else None
            if s_key is None:
                holder = self._resolve(s_ids)
                if holder != t_key and s_iid is None:
                    holder = None
            if holder is not None:
                # The target, or an entity absorbing this source later, already holds its ids
                # (sent ahead in its current version): nothing to remove, but what still names
                # the source follows it, as on the platform.
                held.setdefault(holder, []).extend(s_ids)
                continue
            stored = self._load(s_key) if s_key else None
            ids = s_ids + (_ids_of(stored.data) if stored else [])
            if s_key is not None:
                self._forget(s_key)
            merged.append(
                (s_key or s_iid or str(src["id"]), stored.stix_id if stored else s_ids[0])
            )
            # A reconciliation's merge (archived late): not another live object's standard id
            # by then (see _cascade_users).
            absorbed.extend(
                i
                for i in ids
                if i not in absorbed
                and not (ev.reconciled and self._standard_id_of_another(i, t_key))
            )
        # Guarded: the state may already hold a later version of the target (sent ahead as a
        # dependency or by the recovery); the sources go all the same.
        key = self._upsert(target, ev.id_text, "merge", None, guard=True) or t_key
        into = (self._stix_id(key) if key is not None else None) or ev.stix_id
        for s_key, s_stix in merged:
            self._tombstone(s_key, s_stix, ev.id_text, "merged", into)
        if key is not None and absorbed:
            self._add_aliases(_TAKE_ALIAS, [(a, key) for a in absorbed])
        for holder, ids in held.items():
            if holder == key:
                absorbed.extend(i for i in ids if i not in absorbed)
            else:
                self._repoint(ids, self._stix_id(holder) or into, holder)
        if key is not None and absorbed:
            self._repoint(absorbed, into, key)

    def _stix_id(self, key: str) -> str | None:
        row = self._db.execute("SELECT stix_id FROM objects WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else None

    def _repoint(self, old_ids: list[str], new_id: str, new_key: str) -> None:
        """Rewrite refs to ``old_ids`` into ``new_id``, the object stored under ``new_key`` (the
        platform does it without events)."""
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
            rewrite_granted_refs(new, olds, new_id)
            if _is_relation(new):
                moved = {f for f, v in new.items() if v != obj.get(f)}
                self._fill_relation_ext(new, moved, new_key)
            self._write(key, new, rec.event_id, rec.event)

    def _fill_relation_ext(self, stix: dict[str, Any], moved: set[str], new_key: str) -> None:
        """Refresh the endpoint ids, types and names a relationship's extension repeats; those
        in ``moved`` are now the object under ``new_key``. An endpoint not moved whose standard
        id leads to another object than the extension's internal id keeps what the platform
        sent: a standard id can be held by two live objects here for a while (one sent ahead as
        a dependency), and that internal id is what tells them apart (see _names_another)."""
        octi = dict(octi_ext(stix))
        moved_to = self._load(new_key)
        for field, prefix in _RELATION_EXT:
            ref = stix.get(field)
            if not isinstance(ref, str):
                continue
            if field in moved and moved_to is not None:
                target: dict[str, Any] | None = moved_to.data
            else:
                target = self.get(ref)
                sent = octi.get(prefix + "_ref")
                if target is not None and sent and octi_ext(target).get("id") != sent:
                    continue
            for suffix in ("_ref", "_type", "_value"):
                octi.pop(prefix + suffix, None)
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
            users = self._cascade_users(_ids_of(ev.stix), None, ev.id_text, late=ev.reconciled)
            for user_key in users:
                self._cascade(user_key, ev.id_text)
            return
        self._cascade(key, ev.id_text, late=ev.reconciled)

    def _cascade(self, key: str, event_id: str, *, late: bool = False) -> None:
        """Delete ``key`` and what depended on it, as the platform's single delete does."""
        pending = [key]
        while pending:
            rec = self._load(pending.pop())
            if rec is None:
                continue
            self._forget(rec.key)
            self._tombstone(rec.key, rec.stix_id, event_id, "deleted", None)
            users = self._cascade_users(_ids_of(rec.data), rec.key, event_id, late=late)
            pending.extend(users)

    def _cascade_users(
        self, id_list: list[str], skip: str | None, event_id: str, *, late: bool = False
    ) -> list[str]:
        """Drop refs to ``id_list`` from referrers; return the relations that must go too.

        ``late``: a reconciliation's delete, archived after the repair's recovery though made
        before it; an id that is another live object's standard id by then is that object's (a
        deleted object's old standard id taken again), and what uses it is spared. (Not for a
        delete in stream order: an object sent ahead can hold a standard id it takes later.)"""
        ids = set(id_list)
        if late:
            ids = {i for i in ids if not self._standard_id_of_another(i, skip)}
        doomed: list[str] = []
        for user_key in self._referrers(ids):
            if user_key == skip:
                continue
            rec = self._load(user_key)
            if rec is None:
                continue
            user = rec.data
            spared: set[str] = set()
            if _is_relation(user):
                hit = [f for f in _ENDPOINTS if _names_any(user.get(f), ids)]
                spared = {f for f in hit if self._names_another(user, f, skip)}
                if len(spared) < len(hit):
                    doomed.append(user_key)
                    continue
            new = dict(user)
            for field, value in user.items():
                if field in spared:
                    continue
                if field.endswith("_ref") and value in ids:
                    del new[field]
                elif field.endswith("_refs") and isinstance(value, list) and ids & set(value):
                    new[field] = [v for v in value if v not in ids]
            rewrite_granted_refs(new, ids, None)
            self._write(user_key, new, rec.event_id, rec.event)
        return doomed

    def _names_another(self, relation: dict[str, Any], field: str, gone: str | None) -> bool:
        """Whether the endpoint in ``field`` is, by the internal id the relationship's extension
        gives for it, a live object other than ``gone``. A relationship sent ahead as a
        dependency can name, by standard id, an entity that takes that id later while a
        since-deleted one still holds it here; its extension says which entity it joins. Without
        that id, or when it leads nowhere live, the standard id decides (the delete wins)."""
        if not field.endswith("_ref"):
            return False  # where_sighted_refs: a list, whose extension ids may not line up
        iid = octi_ext(relation).get(field)
        if not isinstance(iid, str) or not iid or iid == gone:
            return False
        holder = self._resolve([iid])
        return holder is not None and holder != gone

    # ------------------------------------------------------------------ seeding from a snapshot
    def load_lines(
        self,
        object_lines: Iterable[bytes],
        tombstones: Iterable[TombstoneRecord],
        as_of: EventId,
        *,
        rows: int | None = SNAPSHOT_ROWS,
    ) -> None:
        """Replace the state with a snapshot's object lines and tombstones (one transaction).

        A snapshot is the fast way into a state, so this path does the least per object. Lines
        written under this version's ``SNAPSHOT_ROWS`` carry their row and their aliases: only
        that header is parsed, the object's bytes are stored as they are (the caller has checked
        the part's sha256), and the aliases are restored exactly as the state held them. Other
        lines (``rows`` differs, or another layout) are parsed whole and their rows derived
        again, each alias going to the first key that claims it, as a fold in key order would.
        Rows go in in the snapshot's key order; the aliases after them, in one sorted statement.
        Raises ``MalformedEvent`` on a damaged line.
        """
        db = self._db
        self._new_aliases.clear()
        trusted = rows == SNAPSHOT_ROWS
        with self._transaction():
            for table in ("objects", "aliases", "refs", "tombstones", "meta"):
                db.execute(f"DELETE FROM {table}")  # noqa: S608
            # The reverse index goes back to "not built": rebuilt from the rows on first need.
            for index in ("aliases_key", "refs_key", "refs_ref"):
                db.execute(f"DROP INDEX IF EXISTS {index}")
            self._indexed.discard("by_key")
            db.execute("CREATE TEMP TABLE IF NOT EXISTS snapshot_aliases (key TEXT, aliases TEXT)")
            db.execute("DELETE FROM temp.snapshot_aliases")
            batch: list[tuple[Any, ...]] = []
            staged: list[tuple[str, str]] = []  # (key, JSON array of its aliases)
            aliases_loaded = 0
            for line in object_lines:
                got = _snapshot_header_row(line) if trusted else None
                if got is None:
                    row, aliases = _snapshot_row(line)
                    got = row, aliases, orjson.dumps(aliases).decode()
                batch.append(got[0])
                aliases_loaded += len(got[1])
                staged.append((got[0][0], got[2]))
                if len(batch) >= _LOAD_ROWS:
                    db.executemany(_UPSERT_OBJECT, batch)
                    db.executemany("INSERT INTO temp.snapshot_aliases VALUES (?, ?)", staged)
                    batch, staged = [], []
            db.executemany(_UPSERT_OBJECT, batch)
            db.executemany("INSERT INTO temp.snapshot_aliases VALUES (?, ?)", staged)
            db.execute(_SNAPSHOT_ALIASES)
            db.execute("DELETE FROM temp.snapshot_aliases")
            db.executemany(
                "INSERT OR REPLACE INTO tombstones VALUES (?, ?, ?, ?, ?)",
                (tuple(t) for t in tombstones),
            )
            self.as_of = None
            self._set_as_of(as_of)
        # The filter does not know the loaded aliases: filled by the first fold that needs it
        # (a plan from a recent snapshot folds a few events, and never does).
        self._seen = _Seen()
        self._seen_loaded = False
        self._unfiltered_budget = aliases_loaded // 8

    def foreign_schema(self) -> list[str]:
        """What the database holds besides this store's own tables and indexes: a snapshot's
        state image holding a trigger or a view would run code of its own in a restore."""
        own = {"objects", "aliases", "refs", "tombstones", "meta", "tombstones_stix"}
        own |= {name for _, sqls in _LAZY_INDEXES.values() for name in _index_names(sqls)}
        return [
            f"{kind} {name}"
            for kind, name in self._db.execute("SELECT type, name FROM sqlite_master")
            if kind not in ("table", "index")
            or (name not in own and not str(name).startswith("sqlite_autoindex_"))
        ]

    def defer_filter(self, lookups: int) -> None:
        """Opened on a snapshot's state image: as after ``load_lines``, the filter is filled only
        once folds have asked SQLite about ``lookups`` ids (a plan from a recent snapshot folds
        a few events, and filling it costs about as much as an eighth of its aliases' lookups)."""
        self._seen = _Seen()
        self._seen_loaded = False
        self._unfiltered_budget = lookups

    def load_snapshot(self, storage: Storage, as_of_key: str) -> None:
        """Seed the state from the committed snapshot ``snapshots/<as_of_key>/``."""
        # Imported here: the snapshot module builds on this one.
        from .snapshot import (
            iter_snapshot_object_lines,
            iter_snapshot_tombstones,
            read_snapshot_manifest,
        )

        info = read_snapshot_manifest(storage, as_of_key)
        try:
            self.load_lines(
                iter_snapshot_object_lines(storage, info),
                iter_snapshot_tombstones(storage, info),
                info.as_of,
                rows=info.rows,
            )
        except MalformedEvent as exc:
            raise PermanentError(f"snapshot {as_of_key} is damaged: {exc.reason}") from exc
        except NotFound as exc:
            raise PermanentError(f"snapshot {as_of_key} is incomplete: {exc}") from exc

    def snapshot_rows(self) -> Iterator[tuple[tuple[Any, ...], list[str]]]:
        """Every live object's row and the aliases that lead to it, by key (for snapshots).

        Row: ``(key, stix_id, event_id, event, iid, type, phase, version, refs JSON, data)``.
        """
        self.settle()
        db = self._db
        aliases = db.execute("SELECT key, alias FROM aliases ORDER BY key, alias")
        nxt = aliases.fetchone()
        for row in db.execute(
            "SELECT key, stix_id, event_id, event, iid, type, phase, version, refs, data"
            " FROM objects ORDER BY key"
        ):
            key = row[0]
            own: list[str] = []
            while nxt is not None and nxt[0] <= key:
                if nxt[0] == key:
                    own.append(nxt[1])
                nxt = aliases.fetchone()
            yield row, own

    # ------------------------------------------------------------------ reading
    def get(self, ref: str) -> dict[str, Any] | None:
        """The live object known under ``ref`` (STIX id, internal id, or alias)."""
        self.settle()
        row = self._db.execute(
            "SELECT o.data FROM aliases a JOIN objects o ON o.key = a.key WHERE a.alias = ?", (ref,)
        ).fetchone()
        return _loads(row[0]) if row else None

    def records(
        self, *, phase: int | None = None, after: str | None = None
    ) -> Iterator[ObjectRecord]:
        """Live objects ordered by key (optionally those stored under one phase, the one
        derived from the object alone; keys after ``after``). A restore pushes in the order of
        ``push_records``."""
        if phase is not None:
            self._index("phase")
        sql = "SELECT key, stix_id, event_id, event, data FROM objects WHERE key > ?"
        args: list[Any] = [after or ""]
        if phase is not None:
            sql += " AND phase = ?"
            args.append(phase)
        cursor = self._db.execute(sql + " ORDER BY key", args)
        for row in cursor:
            yield ObjectRecord(row[0], row[1], row[2], row[3], _loads(row[4]))

    def push_records(
        self, phase: int, *, after: tuple[int, str] | None = None
    ) -> Iterator[tuple[int, ObjectRecord]]:
        """``(rank, record)`` of one push phase's objects, in the order a restore pushes them,
        after position ``(rank, key)`` when given.

        Rank 0: the objects stored under that phase and no later one, by key. Then the objects
        referencing one stored in the same or a later phase (a relationship of a relationship,
        a report in a grouping or holding a relationship to a note, a sighting of a report, a
        note on a note), that phase's last: each in the later of its own phase and theirs,
        ranked one above what it references there, so a chain goes link by link."""
        rank, key = after or (0, "")
        for depth, row in self._push_rows(phase, rank, key, "key, stix_id, event_id, event, data"):
            yield depth, ObjectRecord(row[0], row[1], row[2], row[3], _loads(row[4]))

    def blobs(self, *, phase: int) -> Iterator[bytes]:
        """The stored JSON of one push phase's objects, in push order, unparsed (bundles)."""
        for _, row in self._push_rows(phase, 0, "", "data"):
            yield row[0]

    def _push_rows(
        self, phase: int, rank: int, key: str, columns: str
    ) -> Iterator[tuple[int, tuple[Any, ...]]]:
        self._index("phase")
        self._order_references()
        db = self._db
        if rank == 0:
            cursor = db.execute(
                f"SELECT {columns} FROM objects o WHERE phase = ? AND key > ? AND NOT EXISTS"
                " (SELECT 1 FROM temp.push_order p WHERE p.key = o.key) ORDER BY key",
                (phase, key),
            )
            for row in cursor:
                yield 0, row
            key = ""
        cursor = db.execute(
            f"SELECT p.depth, {columns} FROM temp.push_order p JOIN objects o USING (key)"
            " WHERE p.phase = ? AND (p.depth, p.key) > (?, ?) ORDER BY p.depth, p.key",
            (phase, rank, key),
        )
        for row in cursor:
            yield int(row[0]), row[1:]

    def _order_references(self) -> None:
        """Rank the objects that reference one of the same or a later push phase
        (``temp.push_order``: key, phase, depth), in SQLite: built again once the state has
        changed since."""
        self.settle()
        db = self._db
        if self._ordered_at == db.total_changes:
            return
        for table in ("push_late", "push_ends", "push_order"):
            db.execute(f"DROP TABLE IF EXISTS temp.{table}")
        # Which references may name an object of the same or a later phase is told by their
        # id's type before any lookup: to what is stored from the observed-data phase on, or,
        # from a marking, an identity or an entity, to their own kind or later. A
        # relationship's entities, markings and authors are never looked up.
        db.execute(
            "CREATE TEMP TABLE push_ends AS SELECT DISTINCT o.key, o.phase AS own,"
            " x.key AS end_key, x.phase AS end_phase"
            " FROM objects o NOT INDEXED, json_each(o.refs) j JOIN aliases a ON a.alias = j.value"
            " JOIN objects x ON x.key = a.key"
            f" WHERE o.phase <= {_RELATIONSHIPS} AND x.key <> o.key AND ({_LATE_REF}"
            f" OR (o.phase <= {_ENTITIES} AND {_REF_TYPE} <> 'marking-definition'"
            f" AND (o.phase < {_ENTITIES} OR {_REF_TYPE} <> 'identity')))"
        )
        # After the relationships' phase, an object's references are looked up among the few
        # objects stored in the observed-data phase or after the relationships (from the phase
        # index), not among the relationships, which a container often holds by the thousand:
        # a relationship stays in its phase unless an endpoint of it moves past it, which none
        # of the platform's objects does.
        db.execute(
            "CREATE TEMP TABLE push_late (alias TEXT PRIMARY KEY, key TEXT NOT NULL,"
            " phase INTEGER NOT NULL) WITHOUT ROWID"
        )
        db.execute(
            "WITH o AS MATERIALIZED (SELECT key, phase FROM objects"
            f" WHERE phase = {_OBSERVED} OR phase > {_RELATIONSHIPS})"
            " INSERT INTO temp.push_late SELECT a.alias, a.key, o.phase FROM aliases a"
            " JOIN o ON o.key = a.key"
        )
        db.execute(
            "INSERT INTO temp.push_ends SELECT DISTINCT o.key, o.phase, x.key, x.phase"
            " FROM objects o NOT INDEXED, json_each(o.refs) j"
            " JOIN temp.push_late x ON x.alias = j.value"
            f" WHERE o.phase > {_RELATIONSHIPS} AND x.key <> o.key AND {_LATE_REF}"
        )
        db.execute("DROP TABLE temp.push_late")
        db.execute("CREATE INDEX temp.push_ends_key ON push_ends (key)")
        db.execute(
            "CREATE TEMP TABLE push_order (key TEXT PRIMARY KEY, phase INTEGER NOT NULL,"
            " depth INTEGER NOT NULL) WITHOUT ROWID"
        )
        # One round per link: each object takes the latest phase among its own and what it
        # references (as ranked so far), one rank above what it references in that phase; one
        # whose references are all in earlier phases stays out (rank 0). (phase, depth) only
        # grows, so positions only move later and the rounds end unless references cycle.
        step = (
            "WITH e AS (SELECT p.key, p.own, coalesce(q.phase, p.end_phase) AS phase,"
            " coalesce(q.depth, 0) AS depth FROM temp.push_ends p"
            " LEFT JOIN temp.push_order q ON q.key = p.end_key),"
            " t AS (SELECT key, max(max(own), max(phase)) AS phase FROM e GROUP BY key)"
            " INSERT INTO temp.push_order (key, phase, depth)"
            " SELECT t.key, t.phase, max(e.depth) + 1 FROM t JOIN e USING (key)"
            " WHERE e.phase = t.phase GROUP BY t.key"
            " ON CONFLICT (key) DO UPDATE SET phase = excluded.phase, depth = excluded.depth"
            " WHERE (excluded.phase, excluded.depth) > (push_order.phase, push_order.depth)"
        )
        for _ in range(_ORDER_ROUNDS):
            before = db.total_changes  # (a WITH statement's rowcount is -1)
            db.execute(step)
            if db.total_changes == before:
                break
        else:
            log.warning(
                "Objects reference each other in a cycle: their push order is cut after %d links.",
                _ORDER_ROUNDS,
            )
        db.execute("CREATE INDEX temp.push_order_rank ON push_order (phase, depth, key)")
        self._ordered_at = db.total_changes

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
        self._index("phase")
        row = self._db.execute(
            "SELECT count(*) FROM objects WHERE phase = ? AND key > ?", (phase, after or "")
        ).fetchone()
        return int(row[0])
