"""The device's durable outbox, sequence counter and event log in one sqlite file; imports no trio.

An update leaves the outbox only when the edge's signed receipt for it has
arrived (docs/architecture.md, data guarantees): a broker's PUBACK is not acceptance. The file
holds four tables:

* ``meta``: the next sequence number. ``next_seq`` commits the increment before
  it returns, so sequence numbers strictly increase across restarts and
  crashes (a number may be skipped, never reused).
* ``pending``: updates sent or about to be sent, with their exact envelope
  bytes, so a resend carries the same update id, seq and signature.
* ``resolved``: the most recent resolved update ids and their outcome (a small
  table, pruned to ``RESOLVED_KEEP`` rows), so a late second receipt is
  recognised.
* ``log``: the device's own append-only history (sent, resent,
  receipt_accepted, receipt_duplicate, receipt_rejected). It is the
  independent record an external checker compares with what the edges say
  they accepted; ``export_log`` writes it as JSON lines. It is kept whole
  unless the outbox is opened with ``log_horizon_s``: then rows older than
  that are deleted (``prune_log``, also every ``LOG_PRUNE_EVERY`` receipts), so
  a device that runs for years keeps a bounded file.

The database runs in WAL mode with ``synchronous=FULL``: every commit is on
disk before the call returns. Each call is one small transaction costing a
millisecond or so (one fsync), so a trio task may call these methods
directly; a device writes a few rows per update, and grouping commits is the
edge's concern, not a device's. The connection belongs to the thread that
opened it; use one ``Outbox`` from one thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Final

from fedtier.protocol.errors import ConfigError, LocalProtocolError

__all__ = ["LOG_PRUNE_EVERY", "RESOLVED_KEEP", "LogEntry", "LogEvent", "Outbox", "PendingUpdate"]

RESOLVED_KEEP: Final = 4096
LOG_PRUNE_EVERY: Final = 256
"""Receipts between two prunes of the log, when the outbox has a ``log_horizon_s``."""
_SCHEMA_VERSION: Final = 1

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS pending (
    update_id   BLOB PRIMARY KEY,
    seq         INTEGER NOT NULL UNIQUE,
    envelope    BLOB NOT NULL,
    created_s   REAL NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_sent_s REAL
) STRICT;
CREATE TABLE IF NOT EXISTS resolved (
    update_id   BLOB PRIMARY KEY,
    seq         INTEGER NOT NULL,
    status      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    resolved_s  REAL NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS log (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    update_id TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    event     TEXT NOT NULL,
    reason    TEXT NOT NULL,
    time_s    REAL NOT NULL
) STRICT;
"""


class LogEvent(StrEnum):
    """What the device log records about an update."""

    SENT = "sent"
    RESENT = "resent"
    RECEIPT_ACCEPTED = "receipt_accepted"
    RECEIPT_DUPLICATE = "receipt_duplicate"
    RECEIPT_REJECTED = "receipt_rejected"


_RECEIPT_EVENTS: Final = {
    "accepted": LogEvent.RECEIPT_ACCEPTED,
    "duplicate": LogEvent.RECEIPT_DUPLICATE,
    "rejected": LogEvent.RECEIPT_REJECTED,
}


@dataclass(frozen=True, slots=True)
class PendingUpdate:
    """An update waiting for its receipt.

    Attributes:
        update_id: the 16-byte update id.
        seq: the envelope's sequence number.
        envelope: the exact signed bytes to (re)send.
        created_s: Unix time it was stored.
        attempts: how many times it was published so far (all runs).
        last_sent_s: Unix time of the last publish, None before the first.
    """

    update_id: bytes
    seq: int
    envelope: bytes
    created_s: float
    attempts: int
    last_sent_s: float | None


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One row of the device log."""

    update_id: str
    seq: int
    event: LogEvent
    reason: str
    time_s: float


class Outbox:
    """Durable pending updates, the sequence counter and the device log.

    Args:
        path: the sqlite file (created with its tables when missing).
        first_seq: the first sequence number of a new database. The default is
            the current Unix time in milliseconds, so a device whose outbox
            file was lost still numbers its updates above the high-water mark
            edges remember for it (unless it sent more than one update per
            millisecond on average). Ignored when the database exists.
        log_horizon_s: keep log rows this many seconds; None keeps the whole log
            (what a checker comparing device logs with the edges needs).

    Raises:
        ConfigError: the file cannot be opened as an outbox database.
    """

    def __init__(
        self, path: Path, *, first_seq: int | None = None, log_horizon_s: float | None = None
    ) -> None:
        if log_horizon_s is not None and not log_horizon_s >= 0:
            raise LocalProtocolError(f"log_horizon_s is {log_horizon_s!r}; it must be >= 0")
        self.path = Path(path)
        self.log_horizon_s = log_horizon_s
        self._resolved_since_prune = 0
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so every
            # transaction boundary is explicit.
            conn = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise ConfigError(f"cannot open outbox database {self.path}: {exc}") from exc
        self._conn: sqlite3.Connection | None = conn
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            start = int(time.time() * 1000) if first_seq is None else first_seq
            if start < 0:
                raise LocalProtocolError(f"first_seq is {start}; it must be >= 0")
            with self._transaction() as cur:
                cur.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', ?)", (start,)
                )
                cur.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)",
                    (_SCHEMA_VERSION,),
                )
                row = cur.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row[0] != _SCHEMA_VERSION:
                raise ConfigError(
                    f"outbox database {self.path} has schema {row[0]}; this code reads "
                    f"{_SCHEMA_VERSION}"
                )
        except sqlite3.Error as exc:
            conn.close()
            self._conn = None
            raise ConfigError(f"{self.path} is not a usable outbox database: {exc}") from exc
        except BaseException:
            conn.close()
            self._conn = None
            raise

    # -- plumbing -------------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise LocalProtocolError(f"outbox {self.path} is closed")
        return self._conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        db = self._db
        cur = db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            cur.close()
            raise
        cur.execute("COMMIT")
        cur.close()

    def close(self) -> None:
        """Close the database; further calls raise ``LocalProtocolError``. Idempotent."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sequence numbers -----------------------------------------------------

    def next_seq(self) -> int:
        """Return a sequence number never returned before; committed before it returns."""
        with self._transaction() as cur:
            row = cur.execute(
                "UPDATE meta SET value = value + 1 WHERE key = 'next_seq' RETURNING value - 1"
            ).fetchone()
        return int(row[0])

    # -- pending updates --------------------------------------------------------

    def put(
        self, update_id: bytes, seq: int, envelope: bytes, *, now_s: float | None = None
    ) -> None:
        """Store an update before its first publish.

        Raises:
            LocalProtocolError: the update id or seq is already pending.
        """
        if len(update_id) != 16:
            raise LocalProtocolError(f"update id must be 16 bytes, got {len(update_id)}")
        created = time.time() if now_s is None else now_s
        try:
            with self._transaction() as cur:
                cur.execute(
                    "INSERT INTO pending (update_id, seq, envelope, created_s) VALUES (?, ?, ?, ?)",
                    (update_id, seq, envelope, created),
                )
        except sqlite3.IntegrityError as exc:
            raise LocalProtocolError(
                f"update {update_id.hex()} (seq {seq}) is already in the outbox"
            ) from exc

    def pending(self) -> list[PendingUpdate]:
        """Every update still waiting for its receipt, oldest (lowest seq) first."""
        rows = self._db.execute(
            "SELECT update_id, seq, envelope, created_s, attempts, last_sent_s "
            "FROM pending ORDER BY seq"
        ).fetchall()
        return [PendingUpdate(*row) for row in rows]

    def get(self, update_id: bytes) -> PendingUpdate | None:
        """The pending update with this id, or None."""
        row = self._db.execute(
            "SELECT update_id, seq, envelope, created_s, attempts, last_sent_s "
            "FROM pending WHERE update_id = ?",
            (update_id,),
        ).fetchone()
        return None if row is None else PendingUpdate(*row)

    def mark_sent(self, update_id: bytes, now_s: float | None = None) -> int | None:
        """Record that the update is being handed to the bus; log ``sent`` or ``resent``.

        Call it just before publishing, so the log shows the send before any
        receipt for it (a receipt can overtake the broker's PUBACK).

        Returns:
            The number of sends of this update so far (1 for the first), or
            None when it is no longer pending (nothing is logged then).
        """
        now = time.time() if now_s is None else now_s
        with self._transaction() as cur:
            row = cur.execute(
                "UPDATE pending SET attempts = attempts + 1, last_sent_s = ? "
                "WHERE update_id = ? RETURNING seq, attempts",
                (now, update_id),
            ).fetchone()
            if row is None:
                return None
            seq, attempts = int(row[0]), int(row[1])
            event = LogEvent.SENT if attempts == 1 else LogEvent.RESENT
            self._append_log(cur, update_id, seq, event, "", now)
        return attempts

    def resolve(
        self, update_id: bytes, status: str, reason: str = "", *, now_s: float | None = None
    ) -> bool:
        """Remove a pending update because its receipt arrived, and log the outcome.

        Args:
            update_id: the update the receipt answers.
            status: ``"accepted"``, ``"duplicate"`` or ``"rejected"``.
            reason: the edge's rejection reason, else empty.
            now_s: Unix time to log; now by default.

        Returns:
            True when it was pending; False (nothing changes, nothing is
            logged) when it was not, e.g. a second receipt for it.
        """
        event = _RECEIPT_EVENTS.get(status)
        if event is None:
            raise LocalProtocolError(
                f"receipt status {status!r} is not one of {', '.join(_RECEIPT_EVENTS)}"
            )
        now = time.time() if now_s is None else now_s
        with self._transaction() as cur:
            row = cur.execute(
                "DELETE FROM pending WHERE update_id = ? RETURNING seq", (update_id,)
            ).fetchone()
            if row is None:
                return False
            seq = int(row[0])
            cur.execute(
                "INSERT OR REPLACE INTO resolved (update_id, seq, status, reason, resolved_s) "
                "VALUES (?, ?, ?, ?, ?)",
                (update_id, seq, status, reason, now),
            )
            # rowid grows with every insert, so this keeps the newest rows.
            cur.execute(
                "DELETE FROM resolved WHERE rowid <= (SELECT max(rowid) FROM resolved) - ?",
                (RESOLVED_KEEP,),
            )
            self._append_log(cur, update_id, seq, event, reason, now)
        self._resolved_since_prune += 1
        if self.log_horizon_s is not None and self._resolved_since_prune >= LOG_PRUNE_EVERY:
            self.prune_log(now - self.log_horizon_s)
        return True

    def prune_log(self, before_s: float) -> int:
        """Delete the log rows written before Unix time ``before_s``; return how many.

        Log ids grow with time, so the rows go by id: the newest row older than
        the bound is found once, and everything up to it is deleted.
        """
        self._resolved_since_prune = 0
        with self._transaction() as cur:
            row = cur.execute(
                "SELECT max(id) FROM log WHERE time_s < ?",
                (before_s,),
            ).fetchone()
            if row[0] is None:
                return 0
            return int(cur.execute("DELETE FROM log WHERE id <= ?", (row[0],)).rowcount)

    def resolved_status(self, update_id: bytes) -> str | None:
        """The status an update was resolved with, if it is among the recent ones."""
        row = self._db.execute(
            "SELECT status FROM resolved WHERE update_id = ?", (update_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    # -- the device log ---------------------------------------------------------

    @staticmethod
    def _append_log(
        cur: sqlite3.Cursor, update_id: bytes, seq: int, event: LogEvent, reason: str, now: float
    ) -> None:
        cur.execute(
            "INSERT INTO log (update_id, seq, event, reason, time_s) VALUES (?, ?, ?, ?, ?)",
            (update_id.hex(), seq, event.value, reason, now),
        )

    def log(self) -> list[LogEntry]:
        """The whole device log, in the order it was written."""
        rows = self._db.execute(
            "SELECT update_id, seq, event, reason, time_s FROM log ORDER BY id"
        ).fetchall()
        return [LogEntry(u, s, LogEvent(e), r, t) for u, s, e, r, t in rows]

    def export_log(self, path: Path) -> int:
        """Write the device log to ``path`` as JSON lines; returns the number of rows.

        Each line is ``{"update_id": hex, "seq": int, "event": str, "reason": str,
        "time_s": float}``, in the order the events happened.
        """
        entries = self.log()
        with Path(path).open("w", encoding="utf-8") as f:
            for e in entries:
                line = {
                    "update_id": e.update_id,
                    "seq": e.seq,
                    "event": e.event.value,
                    "reason": e.reason,
                    "time_s": e.time_s,
                }
                f.write(json.dumps(line, separators=(",", ":")) + "\n")
        return len(entries)
