"""Offline writes to a central's store while no central runs (``fedtier model rollback``); no trio.

A new model version must get its number from the one writer that numbers
versions. Rather than a second writer racing the central, an offline write
takes the store for itself: the connection sets ``locking_mode=EXCLUSIVE`` and
starts with ``BEGIN EXCLUSIVE``, which sqlite refuses while any other
connection has the file open (a running central holds two), and which keeps
the central from opening the file until the write is done. Inside that lock
the next number is read and the version inserted in one transaction, so two
versions can never share a number, and the central, when it starts, finds the
version unpublished and publishes it like any version it made itself.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedtier.protocol.errors import StoreError
from fedtier.tiers.store._inputs import put_meta
from fedtier.tiers.store._records import ModelVersionRecord, version_from_row
from fedtier.tiers.store._schema import prepare_schema

__all__ = ["ExclusiveStore", "open_store_exclusively"]

_SELECT_VERSION = (
    "SELECT version, blob, pointer, lineage, update_count, created_ms, published"
    " FROM model_versions"
)


class ExclusiveStore:
    """A central's store held exclusively; see :func:`open_store_exclusively`."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    def latest_version(self) -> ModelVersionRecord | None:
        """The newest stored model version, or None for a store without one."""
        row = self._conn.execute(_SELECT_VERSION + " ORDER BY version DESC LIMIT 1").fetchone()
        return None if row is None else version_from_row(row)

    def model_version(self, version: int) -> ModelVersionRecord | None:
        """Stored model ``version``, or None."""
        row = self._conn.execute(_SELECT_VERSION + " WHERE version = ?", (version,)).fetchone()
        return None if row is None else version_from_row(row)

    def out_seq(self) -> int:
        """The last sequence number the central used on its own messages."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'out_seq'").fetchone()
        return 0 if row is None else int(row[0])

    def add_rollback_version(
        self, record: ModelVersionRecord, *, rollback_of: int, out_seq: int
    ) -> None:
        """Store ``record``, a new version republishing ``rollback_of``'s parameters (one commit).

        It becomes the current version, unpublished (the central publishes it at
        start). The server optimizer's state is cleared: its moments point along
        the path being rolled back. Inputs in the open epoch stay; they fold into
        the next version, discounted for their staleness as any input is. A
        recorded reached target is cleared: the central re-evaluates.

        Raises:
            StoreError: ``record`` does not follow the newest version.
        """
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            (latest,) = conn.execute("SELECT max(version) FROM model_versions").fetchone()
            if latest is None or record.version != int(latest) + 1:
                raise StoreError(
                    f"rollback version v{record.version} does not follow the newest stored "
                    f"version v{latest} of {self.path}"
                )
            conn.execute(
                "INSERT INTO model_versions (version, blob, pointer, lineage, update_count,"
                " created_ms, published, rollback_of) VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                (
                    record.version,
                    record.blob,
                    record.pointer,
                    b"".join(record.lineage),
                    record.update_count,
                    record.created_ms,
                    rollback_of,
                ),
            )
            conn.execute("DELETE FROM optimizer_state")
            conn.execute("DELETE FROM meta WHERE key = 'target_reached'")
            put_meta(conn, "known_version", record.version)
            put_meta(conn, "model_pointer", record.pointer)
            put_meta(conn, "out_seq", out_seq)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


@contextmanager
def open_store_exclusively(path: Path) -> Iterator[ExclusiveStore]:
    """Hold the central's store ``path`` for offline writes; no other process may open it.

    Raises:
        StoreError: the file does not exist, or another process (a running
            central) has it open.
    """
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"state store {path} does not exist")
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=0.0)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open state store {path}: {exc}") from exc
    try:
        try:
            # Before anything touches the file: an exclusive connection then never
            # uses the shared-memory index, which is how sqlite sees other users.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN EXCLUSIVE")
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            raise StoreError(
                f"state store {path} is in use ({exc}): stop the central first"
            ) from exc
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            prepare_schema(conn, path)
            yield ExclusiveStore(conn, path)
        except sqlite3.Error as exc:
            raise StoreError(f"state store {path}: {exc}") from exc
    finally:
        conn.close()
