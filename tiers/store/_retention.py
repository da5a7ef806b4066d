"""The state store's prune queries (done inputs, their leaves, acked outbox rows); sqlite3 only.

No trio, no protocol messages: each function runs on the writer connection
inside the store's ``BEGIN IMMEDIATE`` (``StateStore`` submits it like any other
write), so a prune is atomic with respect to accepts and flushes and never sees
half a flush.

What may go, and why only that (docs/operations.md, retention and limits):

* ``inputs`` rows with ``status = 'done'`` accepted before the dedupe horizon,
  with their ``leaves`` ids and any envelope row left behind. An open or
  flushed input is never touched: its fold is still in the buffer or in a
  partial not yet acknowledged upstream, and a restart needs it. A done input
  is kept for the horizon because its ``(sender, id)`` and its sequence number
  are the dedupe keys: a copy arriving later (a device resend, a partial
  redelivered from the UP stream) must still be recognised. The same
  transaction raises each sender's ``senders.pruned_seq`` (its floor) to the
  highest seq deleted, so a device update resent after its row went is still
  refused: unknown, at or below the floor, it is a replay (``seq_taken``),
  never counted a second time. Devices number updates strictly upward, so an
  honest device's new update is always above its floor.
* ``outbox`` rows in state ``acked`` acknowledged before the outbox horizon:
  their bytes went at the ack; the row is history only.

* the central's ``model_versions`` rows (pointer, lineage) and their metrics,
  made before the version history horizon, once ``keep_versions`` dropped
  their parameters.

The quarantine is bounded in bytes by its own limits (``[quarantine]``), model
parameters at the central by ``keep_versions``; neither is pruned here.

Each call deletes at most ``batch`` rows per table: the store has one writer,
and a delete of millions of rows in one transaction would hold every accept
behind it. The periodic task (``tiers._retention``) calls again while a pass
came back full.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Final

__all__ = [
    "PruneCounts",
    "TableSizes",
    "prune_acked_outbox",
    "prune_done_inputs",
    "prune_version_history",
    "table_sizes",
]

_CHUNK: Final = 500  # host parameters per statement, well under SQLite's limit


@dataclass(frozen=True, slots=True)
class PruneCounts:
    """Rows one prune pass deleted.

    Attributes:
        inputs: finished inputs (their dedupe keys) past the horizon.
        leaves: leaf update ids those inputs carried.
        envelopes: envelope rows of those inputs (normally none: a flush drops them).
        outbox: acknowledged outbox rows past the outbox horizon.
        versions: the central's model version rows (pointer, lineage, metrics)
            past the version history horizon whose parameters were pruned.
    """

    inputs: int = 0
    leaves: int = 0
    envelopes: int = 0
    outbox: int = 0
    versions: int = 0

    def __add__(self, other: PruneCounts) -> PruneCounts:
        return PruneCounts(
            self.inputs + other.inputs,
            self.leaves + other.leaves,
            self.envelopes + other.envelopes,
            self.outbox + other.outbox,
            self.versions + other.versions,
        )

    @property
    def total(self) -> int:
        """Rows deleted in all."""
        return self.inputs + self.leaves + self.envelopes + self.outbox + self.versions


@dataclass(frozen=True, slots=True)
class TableSizes:
    """Row counts of the tables that grow with traffic (for metrics and tests)."""

    inputs: int
    input_envelopes: int
    leaves: int
    outbox: int
    quarantine: int
    model_versions: int


def prune_done_inputs(
    conn: sqlite3.Connection, *, accepted_before_ms: int, batch: int
) -> PruneCounts:
    """Delete up to ``batch`` done inputs accepted before ``accepted_before_ms``, oldest first.

    Their ``leaves`` rows and any envelope row go in the same transaction, so a
    leaf id is never left pointing at an input that is gone, and so does the
    floor of their senders (``senders.pruned_seq``, only ever raised), so no
    deleted sequence number is ever free for a replay.
    """
    positions = [
        int(row[0])
        for row in conn.execute(
            "SELECT pos FROM inputs WHERE status = 'done' AND accepted_ms < ? ORDER BY pos LIMIT ?",
            (accepted_before_ms, batch),
        )
    ]
    leaves = envelopes = 0
    for start in range(0, len(positions), _CHUNK):
        chunk = positions[start : start + _CHUNK]
        marks = ", ".join("?" * len(chunk))  # values are bound, never spliced
        # Before the rows go, in their transaction. SQL's max() of a NULL is
        # NULL, hence the coalesce for a sender's first floor.
        conn.execute(
            "INSERT INTO senders (sender, hwm, pruned_seq)"  # noqa: S608
            f" SELECT sender, max(seq), max(seq) FROM inputs WHERE pos IN ({marks})"
            " GROUP BY sender"
            " ON CONFLICT (sender) DO UPDATE SET pruned_seq ="
            " max(coalesce(pruned_seq, excluded.pruned_seq), excluded.pruned_seq)",
            chunk,
        )
        leaves += conn.execute(f"DELETE FROM leaves WHERE pos IN ({marks})", chunk).rowcount  # noqa: S608
        conn.execute(f"DELETE FROM quarantine_folded WHERE pos IN ({marks})", chunk)  # noqa: S608
        envelopes += conn.execute(
            f"DELETE FROM input_envelopes WHERE pos IN ({marks})",  # noqa: S608
            chunk,
        ).rowcount
        conn.execute(f"DELETE FROM inputs WHERE pos IN ({marks})", chunk)  # noqa: S608
    return PruneCounts(inputs=len(positions), leaves=leaves, envelopes=envelopes)


def prune_acked_outbox(conn: sqlite3.Connection, *, acked_before_ms: int, batch: int) -> int:
    """Delete up to ``batch`` acknowledged outbox rows acked before ``acked_before_ms``."""
    return conn.execute(
        "DELETE FROM outbox WHERE rowid IN (SELECT rowid FROM outbox"
        " WHERE state = 'acked' AND acked_ms < ? ORDER BY acked_ms LIMIT ?)",
        (acked_before_ms, batch),
    ).rowcount


def prune_version_history(conn: sqlite3.Connection, *, created_before_ms: int, batch: int) -> int:
    """Delete up to ``batch`` of the central's oldest version rows made before the horizon.

    Only a published version whose parameters ``keep_versions`` already dropped
    (an empty ``blob``) goes, with its evaluation metrics: its pointer and
    lineage are history (``fedtier trace``, ``fedtier model list``), which the
    history horizon bounds. The newest ``keep_versions`` (a rollback's
    candidates) always stay, and nothing else in the store refers to a version
    row: the dedupe keys are the inputs' and the leaves', pruned by their own
    horizon, and a standby continues from the registry's records.
    """
    versions = [
        int(row[0])
        for row in conn.execute(
            "SELECT version FROM model_versions WHERE published = 1 AND length(blob) = 0"
            " AND created_ms < ? ORDER BY version LIMIT ?",
            (created_before_ms, batch),
        )
    ]
    for start in range(0, len(versions), _CHUNK):
        chunk = versions[start : start + _CHUNK]
        marks = ", ".join("?" * len(chunk))  # values are bound, never spliced
        conn.execute(f"DELETE FROM model_metrics WHERE version IN ({marks})", chunk)  # noqa: S608
        conn.execute(f"DELETE FROM model_versions WHERE version IN ({marks})", chunk)  # noqa: S608
    return len(versions)


def table_sizes(conn: sqlite3.Connection) -> TableSizes:
    """Row counts of the growing tables, read on any connection of the store."""

    def count(table: str) -> int:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608

    return TableSizes(
        inputs=count("inputs"),
        input_envelopes=count("input_envelopes"),
        leaves=count("leaves"),
        outbox=count("outbox"),
        quarantine=count("quarantine"),
        model_versions=count("model_versions"),
    )
