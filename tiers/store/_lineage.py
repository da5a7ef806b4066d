"""Read-only lineage readers of a central's store file (checkers, CLI); no trio, no writes.

They open the file read-only with plain sqlite3, so a checker can read a store
that a running (or crashed) central owns, without the commit engine.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fedtier.protocol.errors import StoreError
from fedtier.tiers.store._records import version_from_row

__all__ = ["read_lineage", "read_lineages"]


def read_lineage(path: Path, version: int) -> list[bytes]:
    """Ids of the device updates in model ``version``, read from a central's store file.

    Opens the file read-only; no trio needed (checkers, ``fedtier model``).

    Raises:
        StoreError: unreadable file or unknown version.
    """
    lineages = _read_versions(path, version)
    if version not in lineages:
        raise StoreError(f"model v{version} is not in state store {path}")
    return lineages[version]


def read_lineages(path: Path) -> dict[int, list[bytes]]:
    """Every model version in a central's store file and the device update ids inside it.

    Raises:
        StoreError: unreadable file.
    """
    return _read_versions(path, None)


def _read_versions(path: Path, version: int | None) -> dict[int, list[bytes]]:
    try:
        conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open state store {path} read-only: {exc}") from exc
    query = (
        "SELECT version, blob, pointer, lineage, update_count, created_ms, published"
        " FROM model_versions"
    )
    try:
        if version is None:
            rows = conn.execute(query + " ORDER BY version").fetchall()
        else:
            rows = conn.execute(query + " WHERE version = ?", (version,)).fetchall()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read state store {path}: {exc}") from exc
    finally:
        conn.close()
    records = (version_from_row(row) for row in rows)
    return {record.version: list(record.lineage) for record in records}
