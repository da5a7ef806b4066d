"""Read-only catalog of a central's model versions (``fedtier model``); no trio, no writes.

Like ``_lineage`` it opens the file read-only with plain sqlite3, so an
operator can list, show and export versions while the central runs. Stores of
schema versions 1 and 2 are read as they are (they have no metrics and no
rollbacks yet); only the central migrates a store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from fedtier.protocol.errors import StoreError
from fedtier.tiers.store._records import (
    ModelVersionRecord,
    TargetRecord,
    target_from_bytes,
    version_from_row,
)
from fedtier.tiers.store._schema import READABLE_VERSIONS

__all__ = [
    "StoredVersion",
    "read_latest_version",
    "read_stored_version",
    "read_stored_versions",
    "read_target_reached",
]

# Schema 3 added rollback_of; older stores read it as NULL.
_SELECT_V3: Final = (
    "SELECT version, blob, pointer, lineage, update_count, created_ms, published, rollback_of"
    " FROM model_versions"
)
_SELECT_V2: Final = (
    "SELECT version, blob, pointer, lineage, update_count, created_ms, published, NULL"
    " FROM model_versions"
)


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """A stored model version with what was recorded about it afterwards.

    Attributes:
        record: the version as the central stored it (signed envelopes, lineage).
        metrics: what the central's evaluator measured on it (empty: not evaluated).
        evaluated_ms: when it was evaluated, or None.
        rollback_of: the version whose parameters it republished, or None.
    """

    record: ModelVersionRecord
    metrics: Mapping[str, float] = field(default_factory=dict)
    evaluated_ms: int | None = None
    rollback_of: int | None = None

    @property
    def version(self) -> int:
        """The model version."""
        return self.record.version


def read_stored_versions(path: Path) -> list[StoredVersion]:
    """Every model version in a central's store file, oldest first.

    Raises:
        StoreError: unreadable file or a schema this fedtier does not read.
    """
    with _read_only(path) as (conn, schema):
        return _versions(conn, schema, None)


def read_stored_version(path: Path, version: int) -> StoredVersion:
    """Model ``version`` of a central's store file.

    Raises:
        StoreError: unreadable file or unknown version.
    """
    with _read_only(path) as (conn, schema):
        found = _versions(conn, schema, version)
    if not found:
        raise StoreError(f"model v{version} is not in state store {path}")
    return found[0]


def read_latest_version(path: Path) -> StoredVersion | None:
    """The newest model version of a central's store file, or None when it holds none.

    Raises:
        StoreError: unreadable file.
    """
    with _read_only(path) as (conn, schema):
        row = conn.execute("SELECT max(version) FROM model_versions").fetchone()
        if row is None or row[0] is None:
            return None
        return _versions(conn, schema, int(row[0]))[0]


def read_target_reached(path: Path) -> TargetRecord | None:
    """The evaluation target the central stopped at, if any.

    Raises:
        StoreError: unreadable file.
    """
    with _read_only(path) as (conn, _schema):
        row = conn.execute("SELECT value FROM meta WHERE key = 'target_reached'").fetchone()
    if row is None:
        return None
    try:
        return target_from_bytes(bytes(row[0]))
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"state store {path} holds an unreadable target: {exc}") from exc


@contextmanager
def _read_only(path: Path) -> Iterator[tuple[sqlite3.Connection, int]]:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"state store {path} does not exist")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open state store {path} read-only: {exc}") from exc
    try:
        schema = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if schema not in READABLE_VERSIONS:
            raise StoreError(
                f"state store {path} has schema version {schema}; this fedtier reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        yield conn, schema
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read state store {path}: {exc}") from exc
    finally:
        conn.close()


def _versions(conn: sqlite3.Connection, schema: int, version: int | None) -> list[StoredVersion]:
    query = _SELECT_V3 if schema >= 3 else _SELECT_V2
    if version is None:
        rows = conn.execute(query + " ORDER BY version").fetchall()
    else:
        rows = conn.execute(query + " WHERE version = ?", (version,)).fetchall()
    metrics: dict[int, dict[str, float]] = {}
    evaluated: dict[int, int] = {}
    if schema >= 3:
        metric_query = "SELECT version, metric, value, evaluated_ms FROM model_metrics"
        metric_rows = (
            conn.execute(metric_query + " ORDER BY version, metric").fetchall()
            if version is None
            else conn.execute(
                metric_query + " WHERE version = ? ORDER BY metric", (version,)
            ).fetchall()
        )
        for v, name, value, at_ms in metric_rows:
            metrics.setdefault(int(v), {})[str(name)] = float(value)
            evaluated[int(v)] = max(evaluated.get(int(v), 0), int(at_ms))
    out: list[StoredVersion] = []
    for row in rows:
        record = version_from_row(row[:7])
        out.append(
            StoredVersion(
                record=record,
                metrics=metrics.get(record.version, {}),
                evaluated_ms=evaluated.get(record.version),
                rollback_of=None if row[7] is None else int(row[7]),
            )
        )
    return out
