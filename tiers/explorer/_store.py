"""The explorer's span database (sqlite, indexed); imports sqlite3 and tracequery, never a bus.

Every view reads spans through ``SpanStore``: the JSON-lines files of a run are
loaded into one (in memory, or a file), and ``fedtier trace collect`` writes
OTLP spans into one, so both sources give the same views. The columns the views
filter on (update or partial id, device, version, outcome) are pulled out of
the attributes at insert time and indexed; the rest stays as JSON.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar, cast

from fedtier.protocol.telemetry import (
    ATTR_DEVICE,
    ATTR_INPUT_IDS,
    ATTR_LATE,
    ATTR_MODEL_VERSION,
    ATTR_OUTCOME,
    ATTR_PARTIAL_ID,
    ATTR_REASON,
    ATTR_UPDATE_ID,
)
from fedtier.tiers.tracequery import LinkRecord, SpanRecord, int_value, iter_span_file

__all__ = ["SpanStore"]

T = TypeVar("T")

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS resources (
    id INTEGER PRIMARY KEY,
    body TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS spans (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    parent_span_id TEXT,
    name TEXT NOT NULL,
    service TEXT NOT NULL,
    instance TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    status TEXT NOT NULL,
    item_id TEXT,
    device TEXT,
    version INTEGER,
    outcome TEXT,
    reason TEXT,
    late INTEGER,
    attributes TEXT NOT NULL,
    links TEXT NOT NULL,
    resource_id INTEGER NOT NULL REFERENCES resources(id),
    PRIMARY KEY (trace_id, span_id)
);
CREATE TABLE IF NOT EXISTS span_inputs (
    item_id TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS span_links (
    linked_trace_id TEXT NOT NULL,
    linked_span_id TEXT NOT NULL,
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS spans_item ON spans(item_id);
CREATE INDEX IF NOT EXISTS spans_parent ON spans(trace_id, parent_span_id);
CREATE INDEX IF NOT EXISTS spans_device ON spans(device, start_ns);
CREATE INDEX IF NOT EXISTS spans_name_version ON spans(name, version);
CREATE INDEX IF NOT EXISTS spans_instance ON spans(instance, start_ns);
CREATE INDEX IF NOT EXISTS spans_start ON spans(start_ns);
CREATE INDEX IF NOT EXISTS spans_refused ON spans(outcome, start_ns)
    WHERE outcome IN ('rejected', 'duplicate');
CREATE INDEX IF NOT EXISTS spans_late ON spans(late, start_ns) WHERE late = 1;
CREATE INDEX IF NOT EXISTS span_inputs_item ON span_inputs(item_id);
CREATE INDEX IF NOT EXISTS span_links_linked ON span_links(linked_trace_id, linked_span_id);
"""

_COLUMNS: Final = (
    "s.trace_id, s.span_id, s.parent_span_id, s.name, s.start_ns, s.end_ns, s.status,"
    " s.attributes, s.links, r.body"
)
_FROM: Final = "spans s JOIN resources r ON r.id = s.resource_id"
# A unary ``+`` on ``s.name`` keeps sqlite from picking the (name, version)
# index, which it would without statistics, over the far narrower id indexes.
_BATCH: Final = 500  # ids per IN (...): far below sqlite's 32766 host parameters


def _lower(value: object) -> str | None:
    return value.lower() if isinstance(value, str) and value else None


def _record(row: Sequence[Any]) -> SpanRecord:
    links = tuple(
        LinkRecord(str(link[0]), str(link[1]), dict(link[2]) if len(link) > 2 else {})
        for link in json.loads(row[8])
    )
    return SpanRecord(
        trace_id=row[0],
        span_id=row[1],
        parent_span_id=row[2],
        name=row[3],
        start_unix_ns=row[4],
        end_unix_ns=row[5],
        status=row[6],
        attributes=json.loads(row[7]),
        links=links,
        resource=json.loads(row[9]),
    )


class SpanStore:
    """Spans in sqlite, indexed for the explorer's views and for ``follow_update``.

    One connection, shared by the HTTP server's threads under a lock: sqlite
    serialises writers anyway, and a local explorer's reads are short.
    """

    def __init__(self, path: Path | str = ":memory:") -> None:
        self.path = str(path)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._resources: dict[str, int] = {}
        self._cache: dict[str, tuple[int, object]] = {}
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
            for rid, body in self._conn.execute("SELECT id, body FROM resources"):
                self._resources[body] = rid

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SpanStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------

    def _resource_id(self, resource: dict[str, Any]) -> int:
        body = json.dumps(resource, sort_keys=True, separators=(",", ":"))
        rid = self._resources.get(body)
        if rid is None:
            self._conn.execute("INSERT OR IGNORE INTO resources (body) VALUES (?)", (body,))
            (rid,) = self._conn.execute(
                "SELECT id FROM resources WHERE body = ?", (body,)
            ).fetchone()
            self._resources[body] = rid
        return rid

    def add(self, spans: Iterable[SpanRecord]) -> int:
        """Insert ``spans`` in one transaction; a span already stored is skipped.

        Returns:
            How many spans were new.
        """
        added = 0
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                for span in spans:
                    added += self._insert(span)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
        return added

    def _insert(self, span: SpanRecord) -> int:
        attrs = dict(span.attributes)
        item = _lower(attrs.get(ATTR_UPDATE_ID)) or _lower(attrs.get(ATTR_PARTIAL_ID))
        links = [
            [link.trace_id, link.span_id, dict(link.attributes)]
            if link.attributes
            else [link.trace_id, link.span_id]
            for link in span.links
        ]
        cursor = self._conn.execute(
            "INSERT OR IGNORE INTO spans (trace_id, span_id, parent_span_id, name, service,"
            " instance, start_ns, end_ns, status, item_id, device, version, outcome, reason,"
            " late, attributes, links, resource_id)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                span.trace_id,
                span.span_id,
                span.parent_span_id,
                span.name,
                span.service,
                span.instance,
                span.start_unix_ns,
                span.end_unix_ns,
                span.status,
                item,
                _lower(attrs.get(ATTR_DEVICE)),
                int_value(attrs.get(ATTR_MODEL_VERSION)),
                _lower(attrs.get(ATTR_OUTCOME)),
                _lower(attrs.get(ATTR_REASON)),
                1 if attrs.get(ATTR_LATE) is True else None,
                json.dumps(attrs, separators=(",", ":")),
                json.dumps(links, separators=(",", ":")),
                self._resource_id(dict(span.resource)),
            ),
        )
        if cursor.rowcount != 1:
            return 0  # the same span twice (a retried export batch)
        inputs = attrs.get(ATTR_INPUT_IDS)
        if isinstance(inputs, list):
            self._conn.executemany(
                "INSERT INTO span_inputs (item_id, trace_id, span_id) VALUES (?,?,?)",
                [(i.lower(), span.trace_id, span.span_id) for i in inputs if isinstance(i, str)],
            )
        if span.links:
            self._conn.executemany(
                "INSERT INTO span_links (linked_trace_id, linked_span_id, trace_id, span_id)"
                " VALUES (?,?,?,?)",
                [(lk.trace_id, lk.span_id, span.trace_id, span.span_id) for lk in span.links],
            )
        return 1

    def load_dir(self, run_dir: Path) -> tuple[int, int, int]:
        """Load every ``*.jsonl`` span file under ``run_dir`` (recursively).

        Returns:
            ``(files, spans added, unreadable lines skipped)``.

        Raises:
            FileNotFoundError: ``run_dir`` is not a directory.
        """
        if not run_dir.is_dir():
            raise FileNotFoundError(f"trace directory {str(run_dir)!r} does not exist")
        paths = sorted(run_dir.rglob("*.jsonl"))
        torn = 0
        added = 0
        for path in paths:
            good: list[SpanRecord] = []
            for record in iter_span_file(path):
                if record is None:
                    torn += 1
                else:
                    good.append(record)
            added += self.add(good)
        return len(paths), added, torn

    # -- reading ----------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of a read-only ``sql`` (the views' aggregate queries)."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def spans_where(
        self, where: str, params: Sequence[Any] = (), tail: str = ""
    ) -> list[SpanRecord]:
        """Spans matching the SQL condition ``where`` on ``spans s``."""
        # ``where`` and ``tail`` come from this package's code, never from a request.
        sql = f"SELECT {_COLUMNS} FROM {_FROM} WHERE {where} {tail}"  # noqa: S608
        rows = self.query(sql, params)
        return [_record(row) for row in rows]

    def _via(self, table: str, where: str, params: Sequence[Any]) -> list[SpanRecord]:
        """Spans found through ``table`` (aliased ``x``, with trace_id and span_id columns)."""
        rows = self.query(
            f"SELECT {_COLUMNS} FROM {table} JOIN spans s"  # noqa: S608 - our own SQL
            " ON s.trace_id = x.trace_id AND s.span_id = x.span_id"
            f" JOIN resources r ON r.id = s.resource_id WHERE {where}",
            params,
        )
        return [_record(row) for row in rows]

    def folding_any(self, item_ids: Sequence[str], name: str) -> list[SpanRecord]:
        """Aggregate spans named ``name`` that list any of ``item_ids`` as an input."""
        out: list[SpanRecord] = []
        unique = list(dict.fromkeys(i.lower() for i in item_ids))
        for start in range(0, len(unique), _BATCH):
            batch = unique[start : start + _BATCH]
            marks = ",".join("?" * len(batch))
            out += self._via(
                "span_inputs x", f"x.item_id IN ({marks}) AND +s.name = ?", [*batch, name]
            )
        return out

    def _batched(
        self, where: str, ids: Sequence[str], extra: Sequence[Any] = ()
    ) -> Iterator[SpanRecord]:
        """``spans_where`` for a condition with one ``IN ({})`` over ``ids``, in batches."""
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), _BATCH):
            batch = unique[start : start + _BATCH]
            marks = ",".join("?" * len(batch))
            yield from self.spans_where(where.format(marks), [*batch, *extra])

    def get(self, trace_id: str, span_id: str) -> SpanRecord | None:
        """The span with this key, if stored."""
        found = self.spans_where("s.trace_id = ? AND s.span_id = ?", (trace_id, span_id))
        return found[0] if found else None

    def parent(self, span: SpanRecord) -> SpanRecord | None:
        """The parent of ``span``, if stored."""
        if span.parent_span_id is None:
            return None
        return self.get(span.trace_id, span.parent_span_id)

    def parents(self, spans: Sequence[SpanRecord]) -> dict[tuple[str, str], SpanRecord]:
        """The stored parents of ``spans``, by the child's key."""
        out: dict[tuple[str, str], SpanRecord] = {}
        by_trace: dict[str, list[SpanRecord]] = {}
        for span in spans:
            if span.parent_span_id:
                by_trace.setdefault(span.trace_id, []).append(span)
        wanted = {(s.trace_id, s.parent_span_id): s.key for s in spans if s.parent_span_id}
        pairs = list(wanted)
        for start in range(0, len(pairs), _BATCH):
            batch = pairs[start : start + _BATCH]
            where = " OR ".join("(s.trace_id = ? AND s.span_id = ?)" for _ in batch)
            params = [x for pair in batch for x in pair]
            for found in self.spans_where(where, params):
                out[wanted[(found.trace_id, found.span_id)]] = found
        return out

    def naming_any(self, item_ids: Sequence[str], name: str) -> list[SpanRecord]:
        """Spans named ``name`` whose update or partial id is one of ``item_ids``."""
        lowered = [i.lower() for i in item_ids]
        return list(self._batched("s.item_id IN ({}) AND +s.name = ?", lowered, (name,)))

    # -- the SpanLookup of tracequery.follow_update -----------------------------------

    def children(self, span: SpanRecord, name: str) -> list[SpanRecord]:
        """Spans named ``name`` whose parent is ``span``."""
        return self.spans_where(
            "s.trace_id = ? AND s.parent_span_id = ? AND +s.name = ?",
            (span.trace_id, span.span_id, name),
        )

    def naming(self, item_id: str, name: str) -> list[SpanRecord]:
        """Spans named ``name`` whose update or partial id is ``item_id``."""
        return self.spans_where("s.item_id = ? AND +s.name = ?", (item_id.lower(), name))

    def folding(self, item_id: str, process: SpanRecord | None, name: str) -> list[SpanRecord]:
        """Aggregate spans named ``name`` that list ``item_id`` or link to ``process``."""
        found = self._via(
            "span_inputs x",
            "x.item_id = ? AND +s.name = ?",
            (item_id.lower(), name),
        )
        if process is not None:
            found += self._via(
                "span_links x",
                "x.linked_trace_id = ? AND x.linked_span_id = ? AND +s.name = ?",
                (process.trace_id, process.span_id, name),
            )
        seen: set[tuple[str, str]] = set()
        unique = []
        for span in found:
            if span.key not in seen:
                seen.add(span.key)
                unique.append(span)
        return unique

    def resolve(self, update_id: str) -> str:
        """The full update id that ``update_id`` (a full id or a unique prefix) names.

        Raises:
            ValueError: not hex, or a prefix shared by several updates.
        """
        wanted = update_id.strip().lower()
        if not wanted or any(c not in "0123456789abcdef" for c in wanted):
            raise ValueError(f"update id {update_id!r} is not hexadecimal")
        if self.query("SELECT 1 FROM spans WHERE item_id = ? LIMIT 1", (wanted,)):
            return wanted
        if len(wanted) < 4:  # tracequery's shortest prefix
            return wanted
        rows = self.query(
            "SELECT DISTINCT item_id FROM spans WHERE item_id >= ? AND item_id < ?"
            " AND name IN ('device send', 'edge process') LIMIT 4",
            (wanted, wanted + "g"),
        )
        matches = sorted(row[0] for row in rows)
        if len(matches) > 1:
            raise ValueError(
                f"update id prefix {update_id!r} matches several updates; give more digits"
            )
        return matches[0] if matches else wanted

    def services(self) -> dict[str, str]:
        """``service.instance.id`` -> ``service.name`` of every process that sent spans."""
        out: dict[str, str] = {}
        for (body,) in self.query("SELECT body FROM resources"):
            resource = json.loads(body)
            out[str(resource.get("service.instance.id", ""))] = str(
                resource.get("service.name", "")
            )
        return out

    def generation(self) -> int:
        """A number that grows whenever spans are added (the newest rowid)."""
        return int(self.query("SELECT COALESCE(MAX(rowid), 0) FROM spans")[0][0])

    def cached(self, key: str, build: Callable[[], T]) -> T:
        """``build()``, kept until spans are added: the views that scan every span."""
        generation = self.generation()
        with self._lock:
            held = self._cache.get(key)
            if held is not None and held[0] == generation:
                return cast("T", held[1])
        value = build()
        with self._lock:
            self._cache[key] = (generation, value)
        return value

    def count(self) -> int:
        """How many spans are stored."""
        return int(self.query("SELECT COUNT(*) FROM spans")[0][0])
