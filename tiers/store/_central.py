"""The central's tables (model versions, lineage, optimizer state, metrics); no protocol messages.

A new version is one transaction with the epoch it closes, the optimizer's
arrays after the step and the model pointer, so a restart never sees a version
without the state that made it. A version's evaluation metrics come later, in
a transaction of their own, once the evaluator has run: a version never waits
for them and may have none.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import StoreError
from fedtier.tiers.store._engine import CommitTicket
from fedtier.tiers.store._inputs import QUARANTINE_COLUMNS, drop_open_envelopes, put_meta
from fedtier.tiers.store._quarantine import QuarantineTables
from fedtier.tiers.store._records import (
    ModelVersionRecord,
    TargetRecord,
    target_from_bytes,
    target_to_bytes,
    version_from_row,
)

__all__ = ["ARRAY_DTYPES", "CentralTables", "RebasedVersion"]

# Only plain numeric dtypes are persisted, so loading never needs pickle.
ARRAY_DTYPES: Final = frozenset({"float16", "float32", "float64", "int32", "int64", "uint64"})


def _record_state_key(version: int) -> str:
    return f"record_state.{version}"


@dataclass(frozen=True, slots=True)
class RebasedVersion:
    """A published version as a standby central takes it from the registry's version records.

    Attributes:
        version: the model version.
        pointer: its signed pointer envelope.
        update_count: device updates inside it.
        created_ms: when it was made.
        inputs: ``(sender, partial id, seq)`` of the partials folded into it.
        leaves: the device update ids inside it.
    """

    version: int
    pointer: bytes
    update_count: int
    created_ms: int
    inputs: tuple[tuple[str, bytes, int], ...]
    leaves: tuple[bytes, ...]


class CentralTables(QuarantineTables):
    """The central's model versions and optimizer state, on top of the tables every tier has."""

    def submit_version(
        self,
        record: ModelVersionRecord,
        *,
        epoch: int | None,
        input_count: int,
        optimizer_state: Mapping[str, npt.NDArray[Any]],
        out_seq: int,
        record_state: bytes | None = None,
    ) -> CommitTicket:
        """Store a new model version; with ``epoch``, close that epoch into it (one transaction).

        Args:
            record: the version, its signed envelopes and lineage.
            epoch: the buffer epoch the version was made from (None for version 0).
            input_count: inputs in that epoch, checked against the stored rows.
            optimizer_state: the optimizer's arrays after the step (replaces older state).
            out_seq: the sequence number used on the envelopes, persisted.
            record_state: the optimizer's arrays after this version's step, encoded
                for its version record (``[lease] enabled``): kept in ``meta``
                until the version is published, since ``optimizer_state`` holds
                only the newest version's and the record of an older one may
                still be on its way to the registry.
        """
        arrays = {name: np.array(a, order="C", copy=True) for name, a in optimizer_state.items()}
        for name, array in arrays.items():
            if array.dtype.name not in ARRAY_DTYPES:
                raise StoreError(f"optimizer array {name!r} has dtype {array.dtype}; not storable")

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO model_versions (version, blob, pointer, lineage, update_count,"
                " created_ms, published) VALUES (?, ?, ?, ?, ?, ?, 0)",
                (
                    record.version,
                    record.blob,
                    record.pointer,
                    b"".join(record.lineage),
                    record.update_count,
                    record.created_ms,
                ),
            )
            if epoch is not None:
                drop_open_envelopes(conn, epoch)
                cursor = conn.execute(
                    "UPDATE inputs SET status = 'done', version = ?"
                    " WHERE epoch = ? AND status = 'open'",
                    (record.version, epoch),
                )
                if cursor.rowcount != input_count:
                    raise StoreError(
                        f"model v{record.version} names {input_count} inputs of epoch {epoch}; "
                        f"the store holds {cursor.rowcount} open ones"
                    )
                put_meta(conn, "open_epoch", epoch + 1)
            conn.execute("DELETE FROM optimizer_state")
            _put_optimizer_state(conn, record.version, arrays)
            put_meta(conn, "known_version", record.version)
            put_meta(conn, "model_pointer", record.pointer)
            put_meta(conn, "out_seq", out_seq)
            if record_state is not None:
                put_meta(conn, _record_state_key(record.version), record_state)

        return self._submit(op, f"model v{record.version}")

    def submit_published(self, version: int) -> CommitTicket:
        """Mark a model version's registry writes and announcement done."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE model_versions SET published = 1 WHERE version = ?", (version,))
            conn.execute(
                "DELETE FROM quarantine_folded WHERE pos IN"
                " (SELECT pos FROM inputs WHERE version = ?)",
                (version,),
            )
            # The version record is in the registry now: its state copy is done with.
            conn.execute("DELETE FROM meta WHERE key = ?", (_record_state_key(version),))

        return self._submit(op, f"publication of model v{version}")

    # -- what a successor central needs (tiers._version_record) --------------------

    def record_state(self, version: int) -> bytes | None:
        """The encoded optimizer state stored with unpublished ``version``, or None."""
        assert self._reader is not None
        row = self._reader.execute(
            "SELECT value FROM meta WHERE key = ?", (_record_state_key(version),)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def version_inputs(self, version: int) -> list[tuple[str, bytes, int]]:
        """``(sender, input id, seq)`` of every input folded into ``version``, in fold order."""
        assert self._reader is not None
        rows = self._reader.execute(
            "SELECT sender, input_id, seq FROM inputs WHERE version = ? ORDER BY pos",
            (version,),
        ).fetchall()
        return [(str(sender), bytes(input_id), int(seq)) for sender, input_id, seq in rows]

    def version_epoch(self, version: int) -> int | None:
        """The buffer epoch ``version`` was made from, or None (version 0, a rollback)."""
        assert self._reader is not None
        row = self._reader.execute(
            "SELECT max(epoch) FROM inputs WHERE version = ?", (version,)
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def submit_rebase(
        self,
        versions: Sequence[RebasedVersion],
        *,
        blob: bytes,
        optimizer_state: Mapping[str, npt.NDArray[Any]],
        out_seq: int,
    ) -> CommitTicket:
        """Replace this central's history by the registry's (a standby central's takeover).

        One transaction: every input, leaf, envelope, version, metric and the
        optimizer state go; ``versions`` (oldest first, the newest last, with
        ``blob`` its parameters) come in as published versions whose inputs
        are ``done`` and whose leaves are indexed, so that a partial or a
        device update they hold is a duplicate from now on. Nothing removed
        was ever acknowledged by this central with ``[lease] enabled`` (it
        acknowledges an input only once a version holding it is published,
        and the registry holds every published version), so what it held
        comes back from JetStream and is judged against the registry's
        history instead, except inputs re-admitted from the quarantine (they
        were acknowledged when quarantined): they go back to the quarantine.
        The quarantine, each sender's seq floor and the open epoch's number
        stay.
        """
        if not versions:
            raise StoreError("a rebase needs at least the registry's current version")
        arrays = {name: np.array(a, order="C", copy=True) for name, a in optimizer_state.items()}
        for name, array in arrays.items():
            if array.dtype.name not in ARRAY_DTYPES:
                raise StoreError(f"optimizer array {name!r} has dtype {array.dtype}; not storable")
        newest = versions[-1]

        def op(conn: sqlite3.Connection) -> None:
            # Re-admitted quarantine rows were acknowledged: back to the quarantine
            # (one the registry's versions hold is a duplicate there and goes).
            conn.execute(
                f"INSERT INTO quarantine ({QUARANTINE_COLUMNS})"  # noqa: S608
                f" SELECT {QUARANTINE_COLUMNS} FROM quarantine_folded"
            )
            for table in (
                "quarantine_folded", "input_envelopes", "leaves", "inputs", "model_metrics",
                "model_versions",
                "optimizer_state",
            ):  # fmt: skip
                conn.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names
            conn.execute(
                "DELETE FROM meta WHERE key LIKE 'record_state.%' OR key = ?", ("target_reached",)
            )
            for each in versions:
                conn.execute(
                    "INSERT INTO model_versions (version, blob, pointer, lineage, update_count,"
                    " created_ms, published) VALUES (?, ?, ?, ?, ?, ?, 1)",
                    (
                        each.version,
                        blob if each is newest else b"",
                        each.pointer,
                        b"".join(each.leaves),
                        each.update_count,
                        each.created_ms,
                    ),
                )
                for sender, input_id, seq in each.inputs:
                    conn.execute(
                        "INSERT OR IGNORE INTO inputs (sender, input_id, seq, epoch, status,"
                        " version, base_version, n_samples, tau, discount, clip_scale,"
                        " accepted_ms) VALUES (?, ?, ?, -1, 'done', ?, 0, 0, 0, 0, 1, ?)",
                        (sender, input_id, seq, each.version, each.created_ms),
                    )
                    conn.execute(
                        "INSERT INTO senders (sender, hwm) VALUES (?, ?)"
                        " ON CONFLICT (sender) DO UPDATE SET hwm = max(hwm, excluded.hwm)",
                        (sender, seq),
                    )
                conn.executemany(
                    "INSERT OR IGNORE INTO leaves (update_id, pos) VALUES (?, NULL)",
                    ((leaf,) for leaf in each.leaves),
                )
            _put_optimizer_state(conn, newest.version, arrays)
            put_meta(conn, "known_version", newest.version)
            put_meta(conn, "model_pointer", newest.pointer)
            row = conn.execute("SELECT value FROM meta WHERE key = 'out_seq'").fetchone()
            put_meta(conn, "out_seq", max(out_seq, 0 if row is None else int(row[0])))

        for each in versions:
            for sender, _, seq in each.inputs:
                if seq > self._high_water.get(sender, -1):
                    self._high_water[sender] = seq
        # The open inputs' segments are unreferenced now: delete them after the commit.
        self._prune_wanted = True
        return self._submit(op, f"rebase onto the registry's v{newest.version}")

    def prunable_versions(self, below: int) -> list[int]:
        """Published versions under ``below`` whose parameters are still stored."""
        assert self._reader is not None
        rows = self._reader.execute(
            "SELECT version FROM model_versions"
            " WHERE version < ? AND published = 1 AND length(blob) > 0 ORDER BY version",
            (below,),
        ).fetchall()
        return [int(row[0]) for row in rows]

    def submit_prune(self, versions: list[int]) -> CommitTicket:
        """Drop the parameters (the blob envelope) of ``versions``, keeping the rest.

        Their pointer, lineage and metrics stay; an empty blob marks a pruned
        version, which ``fedtier model`` reports as such.
        """

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE model_versions SET blob = x'' WHERE version = ? AND published = 1",
                ((v,) for v in versions),
            )

        return self._submit(op, f"prune of model versions {versions[:3]}...")

    def model_version(self, version: int) -> ModelVersionRecord | None:
        """The stored model version ``version``, or None."""
        assert self._reader is not None
        row = self._reader.execute(
            "SELECT version, blob, pointer, lineage, update_count, created_ms, published"
            " FROM model_versions WHERE version = ?",
            (version,),
        ).fetchone()
        return None if row is None else version_from_row(row)

    def lineage(self, version: int) -> list[bytes]:
        """Ids of the device updates folded into model ``version`` (empty for version 0).

        Raises:
            StoreError: no such version is stored.
        """
        record = self.model_version(version)
        if record is None:
            raise StoreError(f"model v{version} is not in state store {self.path}")
        return list(record.lineage)

    # -- evaluation ----------------------------------------------------------------

    def submit_metrics(
        self, version: int, metrics: Mapping[str, float], *, evaluated_ms: int
    ) -> CommitTicket:
        """Record what the evaluator measured on model ``version`` (replacing an earlier run).

        Raises:
            StoreError: a value is not a finite number (now, or at the commit:
                ``version`` is not a stored version).
        """
        values = {str(name): float(value) for name, value in metrics.items()}
        for name, value in values.items():
            if not math.isfinite(value):
                raise StoreError(f"metric {name!r} of model v{version} is {value}; not storable")

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM model_metrics WHERE version = ?", (version,))
            conn.executemany(
                "INSERT INTO model_metrics (version, metric, value, evaluated_ms)"
                " VALUES (?, ?, ?, ?)",
                [(version, name, value, evaluated_ms) for name, value in values.items()],
            )

        return self._submit(op, f"metrics of model v{version}")

    def model_metrics(self, version: int) -> dict[str, float]:
        """The metrics recorded for model ``version`` (empty when it was not evaluated)."""
        assert self._reader is not None
        rows = self._reader.execute(
            "SELECT metric, value FROM model_metrics WHERE version = ? ORDER BY metric",
            (version,),
        ).fetchall()
        return {str(name): float(value) for name, value in rows}

    def submit_target_reached(self, record: TargetRecord | None) -> CommitTicket:
        """Record that the evaluation target was reached, or (None) that it no longer holds."""

        def op(conn: sqlite3.Connection) -> None:
            if record is None:
                conn.execute("DELETE FROM meta WHERE key = 'target_reached'")
            else:
                put_meta(conn, "target_reached", target_to_bytes(record))

        return self._submit(op, "evaluation target")

    def target_reached(self) -> TargetRecord | None:
        """The recorded reached target, if the central stopped at one."""
        assert self._reader is not None
        row = self._reader.execute("SELECT value FROM meta WHERE key = 'target_reached'").fetchone()
        if row is None:
            return None
        try:
            return target_from_bytes(bytes(row[0]))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"state store {self.path} holds an unreadable target: {exc}") from exc


def _put_optimizer_state(
    conn: sqlite3.Connection, version: int, arrays: Mapping[str, npt.NDArray[Any]]
) -> None:
    """Write the server optimizer's arrays as the state after ``version`` (rows only, no delete)."""
    for name, array in arrays.items():
        conn.execute(
            "INSERT INTO optimizer_state (name, version, dtype, shape, data)"
            " VALUES (?, ?, ?, ?, ?)",
            (name, version, array.dtype.str, json.dumps(list(array.shape)), array.tobytes()),
        )
