"""The tables every tier writes (inputs, envelopes, senders, outbox, meta); no protocol messages.

An input is accepted once its record is durable here: a daemon acknowledges it
to its sender (MQTT PUBACK, JetStream ack, receipt) only then. Dedupe and the
high-water marks are answered from memory (accepts still waiting for their
commit) plus the read connection, so there is no gap between the two.

An open input's envelope bytes, and a pending partial's, go to the segment log
(``_segments``), synced before the transaction that references them commits;
``input_envelopes`` and ``outbox`` keep the reference. A segment is deleted once
no open input and no pending partial names it, so at the latest when the last
partial holding its inputs is acknowledged upstream. Every connection of the
store has the SQL function ``fedtier_envelope(value)``, which turns a stored
value (reference or, in a store from before schema version 6, the bytes
themselves) into the bytes.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from fedtier.protocol.errors import StoreError
from fedtier.tiers.store._engine import CommitEngine, CommitTicket, RunBlocking
from fedtier.tiers.store._records import InputKey, InputRecord, InputState, OutboxEntry
from fedtier.tiers.store._segments import (
    DEFAULT_SEGMENT_BYTES,
    SegmentLog,
    is_ref,
    referenced_segments,
    segment_folder,
)

__all__ = [
    "ENVELOPE_FUNCTION",
    "QUARANTINE_COLUMNS",
    "InputTables",
    "drop_open_envelopes",
    "now_ms",
    "prune_segments",
    "put_meta",
]

# The package's name: store problems have always logged as the store.
logger = logging.getLogger("fedtier.tiers.store")

ENVELOPE_FUNCTION: Final = "fedtier_envelope"
"""SQL function on every store connection: a stored envelope value to its bytes."""

# Host parameters per lookup: well under SQLite's 32,766 default limit.
_LOOKUP_CHUNK: Final = 500

QUARANTINE_COLUMNS: Final = (
    "qid, sender, input_id, subject, reason, retry, detail, received_ms, released, envelope"
)
"""The columns ``quarantine`` and ``quarantine_folded`` share."""


class InputTables(CommitEngine[InputKey]):
    """Accepting inputs, flushing epochs into the outbox, acks and the small ``meta`` state."""

    def __init__(
        self,
        path: Path,
        *,
        commit_window_s: float,
        run_blocking: RunBlocking,
        crash_label: str = "store",
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        super().__init__(
            path,
            commit_window_s=commit_window_s,
            run_blocking=run_blocking,
            crash_label=crash_label,
        )
        self.segments = SegmentLog(segment_folder(path), segment_bytes=segment_bytes)
        self._prune_wanted = False
        self.segments_pruned = 0
        """Segment files deleted since opening."""
        self.partial_bytes_stored = 0
        """Bytes of outbox partials appended since opening (the rest are inputs')."""
        self._pending_inputs: dict[InputKey, CommitTicket] = {}
        self._pending_seqs: set[tuple[str, int]] = set()
        self._pending_leaves: dict[InputKey, tuple[bytes, ...]] = {}
        self._pending_leaf_ids: set[bytes] = set()
        self._high_water: dict[str, int] = {}

    def _load_sync(self, conn: sqlite3.Connection) -> None:
        self.segments.open_sync()
        for each in (self._writer, self._reader):
            assert each is not None
            each.create_function(ENVELOPE_FUNCTION, 1, self.envelope_bytes, deterministic=True)
        for sender, hwm in conn.execute("SELECT sender, hwm FROM senders"):
            self._high_water[sender] = int(hwm)
        # Segments left by a crash (or a prune that failed) go at the first commit.
        self._prune_wanted = True

    def _close_sync(self) -> None:
        super()._close_sync()
        self.segments.close()

    def envelope_bytes(self, value: bytes | str) -> bytes:
        """A stored ``input_envelopes.envelope`` value as the envelope's bytes.

        Raises:
            StoreError: a reference whose segment is gone or holds other bytes.
        """
        if isinstance(value, str):
            if not is_ref(value):
                raise StoreError(f"stored envelope {value[:40]!r} is no segment reference")
            return self.segments.read(value)
        return bytes(value)

    def _before_commit_sync(self) -> None:
        super()._before_commit_sync()
        self.segments.sync()

    def _after_commit_sync(self) -> None:
        super()._after_commit_sync()
        # Only a segment below the active one can ever be deleted.
        if not (self._prune_wanted or self.segments.oldest < self.segments.active):
            return
        self._prune_wanted = False
        conn = self._writer
        assert conn is not None
        try:
            refs = [
                str(row[0])
                for row in conn.execute(
                    "SELECT envelope FROM input_envelopes WHERE typeof(envelope) = 'text'"
                    " UNION ALL"
                    " SELECT envelope FROM outbox WHERE typeof(envelope) = 'text'"
                )
            ]
            self.segments_pruned += self.segments.prune(referenced_segments(refs))
        except (StoreError, sqlite3.Error, OSError) as exc:
            # The commit stands; the files stay until the next prune.
            logger.warning("cannot delete unreferenced segments: %s", exc)

    def _committed(self, key: InputKey, ticket: CommitTicket) -> None:
        if self._pending_inputs.get(key) is ticket:
            # Now readable through the read connection: no gap in dedupe.
            del self._pending_inputs[key]
            if ticket.seq is not None:
                self._pending_seqs.discard((key[0], ticket.seq))
            self._pending_leaf_ids.difference_update(self._pending_leaves.pop(key, ()))

    # -- accepting inputs ------------------------------------------------------------

    def input_state(self, sender: str, input_id: bytes) -> InputState | None:
        """Whether ``(sender, input_id)`` was accepted, and where it is now; None if never."""
        if (sender, input_id) in self._pending_inputs:
            return InputState.PENDING
        assert self._reader is not None
        row = self._reader.execute(
            "SELECT status FROM inputs WHERE sender = ? AND input_id = ?", (sender, input_id)
        ).fetchone()
        return None if row is None else InputState(row[0])

    def pending_ticket(self, sender: str, input_id: bytes) -> CommitTicket | None:
        """The ticket of an accept still waiting for its commit, if any."""
        return self._pending_inputs.get((sender, input_id))

    def seq_taken(self, sender: str, seq: int) -> bool:
        """Whether ``sender``'s sequence ``seq`` is used: accepted, pending, or pruned.

        A seq at or below the sender's floor (``senders.pruned_seq``, the highest
        seq a prune deleted) counts as used whatever input held it: its row is
        gone, so an update carrying it may be a resend of one already counted.
        One statement, so one snapshot: a prune committing between two reads
        cannot hide the seq from both.
        """
        if (sender, seq) in self._pending_seqs:
            return True
        assert self._reader is not None
        row = self._reader.execute(
            "SELECT EXISTS (SELECT 1 FROM inputs WHERE sender = ? AND seq = ?)"
            " OR EXISTS (SELECT 1 FROM senders WHERE sender = ? AND pruned_seq >= ?)",
            (sender, seq, sender, seq),
        ).fetchone()
        return bool(row[0])

    def seq_floor(self, sender: str) -> int | None:
        """The highest seq of ``sender`` a prune deleted (its floor), or None if none."""
        assert self._reader is not None
        row = self._reader.execute(
            "SELECT pruned_seq FROM senders WHERE sender = ?", (sender,)
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def counted_leaves(self, leaves: Sequence[bytes]) -> list[bytes]:
        """The ids among ``leaves`` that an accepted input (pending ones too) already carried."""
        found = [leaf for leaf in leaves if leaf in self._pending_leaf_ids]
        assert self._reader is not None
        for start in range(0, len(leaves), _LOOKUP_CHUNK):
            chunk = leaves[start : start + _LOOKUP_CHUNK]
            placeholders = ", ".join("?" * len(chunk))  # values are bound, never spliced
            query = f"SELECT update_id FROM leaves WHERE update_id IN ({placeholders})"  # noqa: S608
            found.extend(bytes(row[0]) for row in self._reader.execute(query, tuple(chunk)))
        return found

    def high_water(self, sender: str) -> int | None:
        """The highest ``seq`` accepted from ``sender`` (including pending accepts), or None."""
        return self._high_water.get(sender)

    def submit_accept(
        self, record: InputRecord, *, replace: bool = False, quarantine_id: int | None = None
    ) -> CommitTicket:
        """Record an accepted input and raise its sender's high-water mark; see ``accept``.

        Args:
            record: the input.
            replace: overwrite an earlier record of the same input (only the
                unsafe switch ``dedupe_open_buffer_only`` does that: the input is
                then folded a second time, which is what the switch is for).
            quarantine_id: the quarantine row this input is re-admitted from; it
                is deleted in the same commit, so it can never be folded twice.
        """
        key = (record.sender, record.input_id)
        if key in self._pending_inputs and not replace:
            raise StoreError(
                f"input {record.input_id.hex()} from {record.sender} is already pending"
            )
        insert = "INSERT OR REPLACE" if replace else "INSERT"

        def op(conn: sqlite3.Connection) -> None:
            if replace:
                conn.execute(
                    "DELETE FROM input_envelopes WHERE pos IN"
                    " (SELECT pos FROM inputs WHERE sender = ? AND input_id = ?)",
                    (record.sender, record.input_id),
                )
            cursor = conn.execute(
                f"{insert} INTO inputs (sender, input_id, seq, epoch, status,"
                " base_version, n_samples, tau, discount, clip_scale, accepted_ms, trace)"
                " VALUES (?, ?, ?, ?, 'open', ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.sender,
                    record.input_id,
                    record.seq,
                    record.epoch,
                    record.base_version,
                    record.n_samples,
                    record.tau,
                    record.discount,
                    record.clip_scale,
                    record.accepted_ms,
                    record.trace,
                ),
            )
            conn.execute(
                "INSERT INTO input_envelopes (pos, envelope) VALUES (?, ?)",
                (cursor.lastrowid, self.segments.append(record.envelope)),
            )
            if record.leaves:
                # OR REPLACE: only the unsafe dedupe_open_buffer_only folds a
                # partial twice, and then it is the same partial's leaves.
                conn.executemany(
                    "INSERT OR REPLACE INTO leaves (update_id, pos) VALUES (?, ?)",
                    ((leaf, cursor.lastrowid) for leaf in record.leaves),
                )
            conn.execute(
                "INSERT INTO senders (sender, hwm) VALUES (?, ?)"
                " ON CONFLICT (sender) DO UPDATE SET hwm = max(hwm, excluded.hwm)",
                (record.sender, record.seq),
            )
            if quarantine_id is not None:
                # Kept beside the input until it is done: a takeover that forgets
                # the input puts it back (forget_unforwarded).
                conn.execute(
                    f"INSERT INTO quarantine_folded (pos, {QUARANTINE_COLUMNS})"  # noqa: S608
                    f" SELECT ?, {QUARANTINE_COLUMNS} FROM quarantine WHERE qid = ?",
                    (cursor.lastrowid, quarantine_id),
                )
                conn.execute("DELETE FROM quarantine WHERE qid = ?", (quarantine_id,))

        ticket = self._submit(op, f"input {record.input_id.hex()} from {record.sender}", key)
        ticket.seq = record.seq
        self._pending_inputs[key] = ticket
        self._pending_seqs.add((record.sender, record.seq))
        if record.leaves:
            self._pending_leaves[key] = record.leaves
            self._pending_leaf_ids.update(record.leaves)
        previous = self._high_water.get(record.sender)
        if previous is None or record.seq > previous:
            self._high_water[record.sender] = record.seq
        return ticket

    async def accept(self, record: InputRecord) -> None:
        """Record an accepted input; returns once it is durable.

        Raises:
            StoreError: the store is closed or the commit failed.
        """
        ticket = self.submit_accept(record)
        await ticket.wait()

    # -- flushing ------------------------------------------------------------------

    def submit_flush(
        self,
        epoch: int,
        entry: OutboxEntry | None,
        input_count: int,
        out_seq: int,
        *,
        replace: bool = False,
    ) -> CommitTicket:
        """Close ``epoch``: record its partial in the outbox and mark its inputs flushed.

        Args:
            epoch: the epoch being closed; the open epoch becomes ``epoch + 1``.
            entry: the partial to send upstream, or None to drop the epoch's inputs
                (``done`` with nothing sent).
            input_count: how many inputs the partial holds; a mismatch with the
                stored rows is a bug and fails the commit.
            out_seq: the sequence number used on the partial, persisted.
            replace: overwrite an earlier outbox entry with the same partial id
                (only under the unsafe ``dedupe_open_buffer_only``, which can fold
                the same inputs into a second partial).
        """
        insert = "INSERT OR REPLACE" if replace else "INSERT"

        def op(conn: sqlite3.Connection) -> None:
            drop_open_envelopes(conn, epoch)
            if entry is not None:
                # In the segment log too: a dense partial is the largest write of a
                # cut, and as a row it would be written twice (WAL, checkpoint).
                ref = self.segments.append(entry.envelope)
                self.partial_bytes_stored += len(entry.envelope)
                conn.execute(
                    f"{insert} INTO outbox (partial_id, epoch, seq, subject, envelope, trace,"
                    " state, created_ms) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
                    (
                        entry.partial_id,
                        epoch,
                        entry.seq,
                        entry.subject,
                        ref,
                        entry.trace,
                        now_ms(),
                    ),
                )
                cursor = conn.execute(
                    "UPDATE inputs SET status = 'flushed', partial_id = ?"
                    " WHERE epoch = ? AND status = 'open'",
                    (entry.partial_id, epoch),
                )
            else:
                cursor = conn.execute(
                    "UPDATE inputs SET status = 'done' WHERE epoch = ? AND status = 'open'",
                    (epoch,),
                )
            if cursor.rowcount != input_count:
                raise StoreError(
                    f"flush of epoch {epoch} names {input_count} inputs; the store holds "
                    f"{cursor.rowcount} open ones"
                )
            put_meta(conn, "open_epoch", epoch + 1)
            put_meta(conn, "out_seq", out_seq)

        what = f"flush of epoch {epoch}"
        if entry is not None:
            what += f" as partial {entry.partial_id.hex()}"
        return self._submit(op, what)

    async def flush(
        self, epoch: int, entry: OutboxEntry | None, input_count: int, out_seq: int
    ) -> None:
        """As :meth:`submit_flush`, returning once it is durable."""
        await self.submit_flush(epoch, entry, input_count, out_seq).wait()

    def submit_acked(self, partial_id: bytes) -> CommitTicket:
        """Mark an outbox partial acknowledged upstream (its inputs ``done``) and drop its bytes."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE outbox SET state = 'acked', envelope = NULL, acked_ms = ?"
                " WHERE partial_id = ?",
                (now_ms(), partial_id),
            )
            conn.execute("UPDATE inputs SET status = 'done' WHERE partial_id = ?", (partial_id,))
            conn.execute(
                "DELETE FROM quarantine_folded WHERE pos IN"
                " (SELECT pos FROM inputs WHERE partial_id = ?)",
                (partial_id,),
            )

        return self._submit(op, f"ack of partial {partial_id.hex()}")

    async def mark_acked(self, partial_id: bytes) -> None:
        """As :meth:`submit_acked`, returning once it is durable."""
        await self.submit_acked(partial_id).wait()

    def outbox_state(self, partial_id: bytes) -> str | None:
        """``"pending"``, ``"acked"`` or None for a partial id this daemon never flushed."""
        assert self._reader is not None
        row = self._reader.execute(
            "SELECT state FROM outbox WHERE partial_id = ?", (partial_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    # -- small state -----------------------------------------------------------------

    def submit_model_pointer(self, version: int, pointer: bytes) -> CommitTicket:
        """Persist the newest verified model version and its signed pointer."""

        def op(conn: sqlite3.Connection) -> None:
            put_meta(conn, "known_version", version)
            put_meta(conn, "model_pointer", pointer)

        return self._submit(op, f"model pointer v{version}")

    def submit_forget_unforwarded(
        self, open_epoch: int, partial_ids: Sequence[bytes]
    ) -> CommitTicket:
        """Forget the open epoch's inputs and the pending partials ``partial_ids`` (one commit).

        For a leased regional at takeover (``tiers.regional``): what an earlier
        tenure folded but never made known to the other instances (no intent)
        may have been counted by another instance meanwhile, and was never
        acknowledged. So its input rows, their leaves and envelopes, and the
        outbox rows go, and a redelivery is folded anew. An input that came
        from the quarantine was acknowledged (nothing redelivers it): its row
        goes back to the quarantine instead, to be re-admitted.
        """
        ids = list(partial_ids)

        def op(conn: sqlite3.Connection) -> None:
            for start in range(0, max(1, len(ids)), _LOOKUP_CHUNK):
                chunk = ids[start : start + _LOOKUP_CHUNK]
                marks = ", ".join("?" * len(chunk))  # values are bound, never spliced
                flushed = f" OR (status = 'flushed' AND partial_id IN ({marks}))" if chunk else ""
                chosen = f"SELECT pos FROM inputs WHERE (epoch = ? AND status = 'open'){flushed}"  # noqa: S608
                params = (open_epoch, *chunk)
                conn.execute(
                    f"INSERT INTO quarantine ({QUARANTINE_COLUMNS})"  # noqa: S608
                    f" SELECT {QUARANTINE_COLUMNS} FROM quarantine_folded WHERE pos IN ({chosen})",
                    params,
                )
                # The input rows last: the others are chosen through them.
                for table in ("quarantine_folded", "leaves", "input_envelopes", "inputs"):
                    conn.execute(f"DELETE FROM {table} WHERE pos IN ({chosen})", params)  # noqa: S608
                if chunk:
                    conn.execute(
                        f"DELETE FROM outbox WHERE state = 'pending' AND partial_id IN ({marks})",  # noqa: S608
                        chunk,
                    )

        # Their envelopes' segments are unreferenced now: deleted after the commit.
        self._prune_wanted = True
        return self._submit(op, f"forgetting epoch {open_epoch} and {len(ids)} pending partials")

    def answers_upstream(self) -> bool:
        """Whether this store's inputs were answered only once upstream had them (``[lease]``).

        False for a store written without ``[lease]`` (inputs answered at their
        commit), and for one that predates the mark.
        """
        assert self._reader is not None
        row = self._reader.execute(
            "SELECT value FROM meta WHERE key = 'answers_upstream'"
        ).fetchone()
        return row is not None and int(row[0]) == 1

    def submit_answers_upstream(self, value: bool) -> CommitTicket:
        """Record how the inputs stored from now on are answered (see :meth:`answers_upstream`)."""
        return self._submit(
            lambda conn: put_meta(conn, "answers_upstream", int(value)), "answers_upstream mark"
        )

    def submit_out_seq(self, out_seq: int) -> CommitTicket:
        """Persist the last sequence number this daemon used."""
        return self._submit(lambda conn: put_meta(conn, "out_seq", out_seq), "out_seq")


async def prune_segments(store: InputTables) -> int:
    """Delete the segment files no committed row references any more; return how many.

    Runs on the store's committer (an empty write), so it never races a
    transaction that is adding references. The committer already checks after
    every commit while a segment older than the active one exists; this forces
    a check now (retention calls it after deleting rows).

    Raises:
        StoreError: the store is closed or the commit failed.
    """
    before = store.segments_pruned
    store._prune_wanted = True
    await store._submit(lambda conn: None, "segment prune").wait()
    return store.segments_pruned - before


def drop_open_envelopes(conn: sqlite3.Connection, epoch: int) -> None:
    """Delete the envelopes of ``epoch``'s open inputs (their fold is leaving the buffer)."""
    conn.execute(
        "DELETE FROM input_envelopes WHERE pos IN"
        " (SELECT pos FROM inputs WHERE epoch = ? AND status = 'open')",
        (epoch,),
    )


def put_meta(conn: sqlite3.Connection, key: str, value: int | bytes) -> None:
    """Set ``meta[key]`` (open_epoch, out_seq, known_version, model_pointer)."""
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch, as the tables record them."""
    return time.time_ns() // 1_000_000
