"""The durable state store of one tier daemon (sqlite); imports protocol and trio, never a bus.

Acceptance is end to end (docs/architecture.md, data guarantees): a daemon acknowledges an input
to its sender (MQTT PUBACK, JetStream ack, receipt) only once the input is
recorded here and the record is on disk. Writes are grouped: callers submit
operations, one committer task gathers what arrives within ``commit_window_s``
and applies it in a single transaction (one fsync), in submission order, on a
worker thread. So an ``accept`` submitted before a ``flush`` is always durable
no later than that flush, and a flush never names an input that is not stored.

Schema (``PRAGMA user_version = 2``; WAL, ``synchronous=FULL``, ``secure_delete=FAST``)::

    meta(key PRIMARY KEY, value)          open_epoch, out_seq, known_version,
                                          model_pointer (signed envelope bytes)
    inputs(pos PRIMARY KEY AUTOINCREMENT  fold order: refolding in pos order
                                          rebuilds the numerator bit for bit
           sender, input_id UNIQUE(...),  device update id or child partial id:
                                          dedupe survives restarts (no window)
           seq, epoch, status,            status: open -> flushed -> done
           partial_id, version,           what the input left in (partial, or
                                          model version at the central)
           base_version, n_samples, tau,  weights used at the fold, so a refold
           discount, clip_scale,          never depends on the policy or the
                                          version known after a restart
           accepted_ms, trace)            traceparent of the input's process span
    input_envelopes(pos PRIMARY KEY,      an open input's signed bytes, to refold
           envelope)                      it after a restart; deleted when its
                                          epoch is flushed (the partial carries it)
    senders(sender PRIMARY KEY, hwm)      per-sender sequence high-water marks
    outbox(partial_id PRIMARY KEY, epoch, seq, subject, envelope, trace,
           state, created_ms, acked_ms)   flushed partials: pending until the
                                          upstream PubAck, then acked (bytes dropped)
    model_versions(version PRIMARY KEY, blob, pointer, lineage, update_count,
           created_ms, published)         central only: signed blob and pointer
                                          envelopes, lineage = concatenated
                                          16-byte leaf update ids
    optimizer_state(name PRIMARY KEY, version, dtype, shape, data)
                                          central only: raw array bytes, no pickle

A flush is one transaction: the partial enters the outbox, the inputs of the
flushed epoch become ``flushed``, their envelopes are deleted and the open epoch
moves on. When the partial is acknowledged upstream its inputs become ``done``
and the outbox drops its bytes.

Envelopes live in their own table so that nothing rewrites them: SQLite rewrites
a whole row, overflow pages included, on any update, so a status change on a row
that held a 400 KB envelope cost another 400 KB in the WAL and again at the
checkpoint (``fedtier bench edge`` measured 7.4x the wire bytes written per f32
update with envelopes inline). ``secure_delete=FAST`` keeps deletes from zeroing
freed pages, which Debian's SQLite (built with secure delete on) would otherwise
write once more. Version 1 stores (envelopes inline) are migrated when opened.

The committer passes the crash points ``<tier>.before_commit`` and
``<tier>.after_commit`` (``tiers.faults``) around every transaction.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt
import trio

from fedtier.protocol.errors import StoreError
from fedtier.tiers.faults import crash_point

__all__ = [
    "CommitTicket",
    "InputRecord",
    "InputState",
    "ModelVersionRecord",
    "OutboxEntry",
    "Recovery",
    "StateStore",
    "open_state_store",
    "read_lineage",
    "read_lineages",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 2
ID_BYTES: Final = 16

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value BLOB
);
CREATE TABLE IF NOT EXISTS inputs (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    sender TEXT NOT NULL,
    input_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    epoch INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'flushed', 'done')),
    partial_id BLOB,
    version INTEGER,
    base_version INTEGER NOT NULL,
    n_samples REAL NOT NULL,
    tau INTEGER NOT NULL,
    discount REAL NOT NULL,
    clip_scale REAL NOT NULL,
    accepted_ms INTEGER NOT NULL,
    trace TEXT NOT NULL DEFAULT '',
    UNIQUE (sender, input_id)
);
CREATE INDEX IF NOT EXISTS inputs_by_epoch ON inputs (epoch, status);
CREATE INDEX IF NOT EXISTS inputs_by_partial ON inputs (partial_id);
CREATE INDEX IF NOT EXISTS inputs_by_sender_seq ON inputs (sender, seq);
CREATE TABLE IF NOT EXISTS input_envelopes (
    pos INTEGER PRIMARY KEY,
    envelope BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS senders (
    sender TEXT PRIMARY KEY,
    hwm INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    partial_id BLOB PRIMARY KEY,
    epoch INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    subject TEXT NOT NULL,
    envelope BLOB,
    trace TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ('pending', 'acked')),
    created_ms INTEGER NOT NULL,
    acked_ms INTEGER
);
CREATE TABLE IF NOT EXISTS model_versions (
    version INTEGER PRIMARY KEY,
    blob BLOB NOT NULL,
    pointer BLOB NOT NULL,
    lineage BLOB NOT NULL,
    update_count INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    published INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS optimizer_state (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    data BLOB NOT NULL
);
"""

# Only plain numeric dtypes are persisted, so loading never needs pickle.
_ARRAY_DTYPES: Final = frozenset({"float16", "float32", "float64", "int32", "int64", "uint64"})

RunBlocking: TypeAlias = Callable[..., Awaitable[Any]]
"""How blocking sqlite work runs: ``trio.to_thread.run_sync`` by default."""


class InputState(StrEnum):
    """Where an accepted input is in its life."""

    PENDING = "pending"  # submitted, commit not yet durable (in memory only)
    OPEN = "open"
    FLUSHED = "flushed"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One accepted input: a device update (edge) or a child partial (regional, central).

    Attributes:
        sender: key id of the input's sender.
        input_id: its 16-byte update id or partial id.
        seq: the envelope's sequence number.
        epoch: the open buffer it was folded into.
        envelope: the signed envelope bytes, enough to refold it.
        base_version: the update's base version (a partial's min base version).
        n_samples: the update's n_samples (a partial's sample_count).
        tau: staleness used at the fold (``extra_tau`` for a partial).
        discount: the staleness discount applied.
        clip_scale: the norm clipping factor applied (1 when not clipped).
        accepted_ms: wall-clock acceptance time, ms since the epoch.
        trace: W3C traceparent of the input's process span, or empty.
    """

    sender: str
    input_id: bytes
    seq: int
    epoch: int
    envelope: bytes
    base_version: int
    n_samples: float
    tau: int
    discount: float
    clip_scale: float
    accepted_ms: int
    trace: str = ""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A flushed partial waiting for its upstream PubAck.

    Attributes:
        partial_id: 16-byte id (its hex is the ``Nats-Msg-Id``).
        epoch: the buffer epoch it closed.
        seq: the envelope's sequence number.
        subject: where it is published.
        envelope: the signed envelope bytes.
        trace: traceparent of the aggregate span, the parent of the send span.
    """

    partial_id: bytes
    epoch: int
    seq: int
    subject: str
    envelope: bytes
    trace: str = ""


@dataclass(frozen=True, slots=True)
class ModelVersionRecord:
    """A model version as the central stored it.

    Attributes:
        version: the model version.
        blob: signed ``model_blob`` envelope bytes.
        pointer: signed ``model`` (announcement) envelope bytes.
        lineage: ids of every device update folded into this version.
        update_count: number of those updates.
        created_ms: wall-clock creation time.
        published: whether the registry and the announcement are done.
    """

    version: int
    blob: bytes
    pointer: bytes
    lineage: tuple[bytes, ...]
    update_count: int
    created_ms: int
    published: bool = False


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a daemon needs to resume after a stop or a crash.

    Attributes:
        open_epoch: the epoch of the open buffer.
        open_inputs: its accepted inputs, in fold order (refold them).
        pending_outbox: flushed partials not yet acknowledged upstream (resend them).
        high_water: per-sender sequence high-water marks.
        out_seq: the last sequence number this daemon used on its own messages.
        known_version: the newest model version this daemon had verified.
        model_pointer: the signed pointer of that version, if any.
        latest_version: the central's newest stored model version, if any.
        unpublished_versions: the central's versions whose publication is not done.
        optimizer_state: the central optimizer's arrays, as of ``latest_version``.
    """

    open_epoch: int
    open_inputs: tuple[InputRecord, ...]
    pending_outbox: tuple[OutboxEntry, ...]
    high_water: Mapping[str, int]
    out_seq: int
    known_version: int | None
    model_pointer: bytes | None
    latest_version: ModelVersionRecord | None
    unpublished_versions: tuple[int, ...]
    optimizer_state: Mapping[str, npt.NDArray[Any]]


class _Op(Protocol):
    def __call__(self, conn: sqlite3.Connection, /) -> None: ...


@dataclass(eq=False, slots=True)
class CommitTicket:
    """A submitted write; ``await wait()`` returns once it is durable."""

    what: str
    seq: int | None = None  # the input's sequence number, for accepts
    _done: trio.Event = field(default_factory=trio.Event)
    _error: BaseException | None = None

    @property
    def durable(self) -> bool:
        """Whether the write has been committed."""
        return self._done.is_set() and self._error is None

    async def wait(self) -> None:
        """Wait until the write is on disk.

        Raises:
            StoreError: the transaction holding it failed (the daemon is stopping).

        On cancellation the write still happens or fails on its own; only the
        wait is abandoned.
        """
        await self._done.wait()
        if self._error is not None:
            raise StoreError(f"{self.what} was not stored: {self._error}") from self._error

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        self._done.set()


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT),
    # so a batch is exactly one transaction. check_same_thread=False: the writer
    # connection is used from worker threads, one at a time (the committer is serial).
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit that returned survives power loss (the acceptance contract).
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # FAST: deleting an envelope frees its pages without writing zeros over them
        # (see the module docstring); b-tree pages still lose deleted content.
        conn.execute("PRAGMA secure_delete=FAST")
    except BaseException:
        conn.close()
        raise
    return conn


class StateStore:
    """The state store of one daemon; open it with :func:`open_state_store`.

    Writes go through ``submit_*`` (synchronous, returns a :class:`CommitTicket`)
    or the awaitable wrappers. Lookups used on the hot path (dedupe, high-water
    marks) are answered from memory plus a read connection.
    """

    def __init__(
        self,
        path: Path,
        *,
        commit_window_s: float,
        run_blocking: RunBlocking,
        crash_label: str = "store",
    ) -> None:
        if not commit_window_s >= 0:
            raise StoreError(f"commit window must be >= 0 s, got {commit_window_s!r}")
        self.path = path
        self._before_commit_point = f"{crash_label}.before_commit"
        self._after_commit_point = f"{crash_label}.after_commit"
        self.commit_window_s = commit_window_s
        self._run_blocking = run_blocking
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        # (operation, its ticket, the (sender, input id) it makes durable, if any)
        self._queue: list[tuple[_Op, CommitTicket, tuple[str, bytes] | None]] = []
        self._wakeup = trio.Event()
        self._pending_inputs: dict[tuple[str, bytes], CommitTicket] = {}
        self._pending_seqs: set[tuple[str, int]] = set()
        self._high_water: dict[str, int] = {}
        self._closed = False
        self.commits = 0
        """Transactions committed so far (tests check the grouping)."""

    # -- opening -------------------------------------------------------------------

    def _open_sync(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = _connect(self.path)
            version = self._writer.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                raise StoreError(
                    f"state store {self.path} has schema version {version}; this fedtier "
                    f"reads versions 1 and {SCHEMA_VERSION}"
                )
            self._writer.executescript(_SCHEMA)
            if version == 1:
                _migrate_from_v1(self._writer)
            self._writer.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._reader = _connect(self.path)
            for sender, hwm in self._writer.execute("SELECT sender, hwm FROM senders"):
                self._high_water[sender] = int(hwm)
        except sqlite3.Error as exc:
            self._close_sync()
            raise StoreError(f"cannot open state store {self.path}: {exc}") from exc
        except BaseException:
            self._close_sync()
            raise

    def _close_sync(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                conn.close()
        self._reader = self._writer = None

    # -- the committer -------------------------------------------------------------

    async def _serve_commits(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            await self._wakeup.wait()
            # Let concurrent submitters join this transaction: one fsync for all.
            if self.commit_window_s > 0:
                await trio.sleep(self.commit_window_s)
            batch, self._queue = self._queue, []
            self._wakeup = trio.Event()
            if not batch:
                continue
            crash_point(self._before_commit_point)
            # Not cancellable once started (to_thread's default): the transaction
            # either commits or rolls back as a whole, never half-way.
            try:
                await self._run_blocking(self._apply, [op for op, _, _ in batch])
            except BaseException as exc:
                for _, ticket, _ in batch:
                    ticket._finish(exc)
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"state store {self.path}: commit failed: {exc}") from exc
                raise
            # On disk, and nobody has been told: the moment between commit and ack.
            crash_point(self._after_commit_point)
            self.commits += 1
            for _, ticket, key in batch:
                if key is not None and self._pending_inputs.get(key) is ticket:
                    # Now readable through the read connection: no gap in dedupe.
                    del self._pending_inputs[key]
                    if ticket.seq is not None:
                        self._pending_seqs.discard((key[0], ticket.seq))
                ticket._finish(None)

    def _apply(self, ops: Sequence[_Op]) -> None:
        conn = self._writer
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                op(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _submit(self, op: _Op, what: str, key: tuple[str, bytes] | None = None) -> CommitTicket:
        if self._closed:
            raise StoreError(f"state store {self.path} is closed; cannot store {what}")
        ticket = CommitTicket(what)
        self._queue.append((op, ticket, key))
        self._wakeup.set()
        return ticket

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking file work the way this store runs its commits (a worker thread)."""
        return await self._run_blocking(fn, *args)

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
        """Whether an input from ``sender`` with sequence ``seq`` was accepted (or is pending)."""
        if (sender, seq) in self._pending_seqs:
            return True
        assert self._reader is not None
        row = self._reader.execute(
            "SELECT 1 FROM inputs WHERE sender = ? AND seq = ? LIMIT 1", (sender, seq)
        ).fetchone()
        return row is not None

    def high_water(self, sender: str) -> int | None:
        """The highest ``seq`` accepted from ``sender`` (including pending accepts), or None."""
        return self._high_water.get(sender)

    def submit_accept(self, record: InputRecord, *, replace: bool = False) -> CommitTicket:
        """Record an accepted input and raise its sender's high-water mark; see ``accept``.

        Args:
            record: the input.
            replace: overwrite an earlier record of the same input (only the
                unsafe switch ``dedupe_open_buffer_only`` does that: the input is
                then folded a second time, which is what the switch is for).
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
                (cursor.lastrowid, record.envelope),
            )
            conn.execute(
                "INSERT INTO senders (sender, hwm) VALUES (?, ?)"
                " ON CONFLICT (sender) DO UPDATE SET hwm = max(hwm, excluded.hwm)",
                (record.sender, record.seq),
            )

        ticket = self._submit(op, f"input {record.input_id.hex()} from {record.sender}", key)
        ticket.seq = record.seq
        self._pending_inputs[key] = ticket
        self._pending_seqs.add((record.sender, record.seq))
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
            _drop_open_envelopes(conn, epoch)
            if entry is not None:
                conn.execute(
                    f"{insert} INTO outbox (partial_id, epoch, seq, subject, envelope, trace,"
                    " state, created_ms) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
                    (
                        entry.partial_id,
                        epoch,
                        entry.seq,
                        entry.subject,
                        entry.envelope,
                        entry.trace,
                        _now_ms(),
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
            _put_meta(conn, "open_epoch", epoch + 1)
            _put_meta(conn, "out_seq", out_seq)

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
                (_now_ms(), partial_id),
            )
            conn.execute("UPDATE inputs SET status = 'done' WHERE partial_id = ?", (partial_id,))

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
            _put_meta(conn, "known_version", version)
            _put_meta(conn, "model_pointer", pointer)

        return self._submit(op, f"model pointer v{version}")

    def submit_out_seq(self, out_seq: int) -> CommitTicket:
        """Persist the last sequence number this daemon used."""
        return self._submit(lambda conn: _put_meta(conn, "out_seq", out_seq), "out_seq")

    # -- central: model versions ------------------------------------------------------

    def submit_version(
        self,
        record: ModelVersionRecord,
        *,
        epoch: int | None,
        input_count: int,
        optimizer_state: Mapping[str, npt.NDArray[Any]],
        out_seq: int,
    ) -> CommitTicket:
        """Store a new model version; with ``epoch``, close that epoch into it (one transaction).

        Args:
            record: the version, its signed envelopes and lineage.
            epoch: the buffer epoch the version was made from (None for version 0).
            input_count: inputs in that epoch, checked against the stored rows.
            optimizer_state: the optimizer's arrays after the step (replaces older state).
            out_seq: the sequence number used on the envelopes, persisted.
        """
        arrays = {name: np.array(a, order="C", copy=True) for name, a in optimizer_state.items()}
        for name, array in arrays.items():
            if array.dtype.name not in _ARRAY_DTYPES:
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
                _drop_open_envelopes(conn, epoch)
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
                _put_meta(conn, "open_epoch", epoch + 1)
            conn.execute("DELETE FROM optimizer_state")
            for name, array in arrays.items():
                conn.execute(
                    "INSERT INTO optimizer_state (name, version, dtype, shape, data)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (
                        name,
                        record.version,
                        array.dtype.str,
                        json.dumps(list(array.shape)),
                        array.tobytes(),
                    ),
                )
            _put_meta(conn, "known_version", record.version)
            _put_meta(conn, "model_pointer", record.pointer)
            _put_meta(conn, "out_seq", out_seq)

        return self._submit(op, f"model v{record.version}")

    def submit_published(self, version: int) -> CommitTicket:
        """Mark a model version's registry writes and announcement done."""
        return self._submit(
            lambda conn: conn.execute(
                "UPDATE model_versions SET published = 1 WHERE version = ?", (version,)
            ),
            f"publication of model v{version}",
        )

    def model_version(self, version: int) -> ModelVersionRecord | None:
        """The stored model version ``version``, or None."""
        assert self._reader is not None
        row = self._reader.execute(
            "SELECT version, blob, pointer, lineage, update_count, created_ms, published"
            " FROM model_versions WHERE version = ?",
            (version,),
        ).fetchone()
        return None if row is None else _version_from_row(row)

    def lineage(self, version: int) -> list[bytes]:
        """Ids of the device updates folded into model ``version`` (empty for version 0).

        Raises:
            StoreError: no such version is stored.
        """
        record = self.model_version(version)
        if record is None:
            raise StoreError(f"model v{version} is not in state store {self.path}")
        return list(record.lineage)

    # -- recovery --------------------------------------------------------------------

    def _recover_sync(self) -> Recovery:
        conn = self._writer
        assert conn is not None
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        open_epoch = int(meta.get("open_epoch", 0))
        inputs = tuple(
            InputRecord(
                sender=row[0],
                input_id=bytes(row[1]),
                seq=int(row[2]),
                epoch=int(row[3]),
                envelope=bytes(row[4]),
                base_version=int(row[5]),
                n_samples=float(row[6]),
                tau=int(row[7]),
                discount=float(row[8]),
                clip_scale=float(row[9]),
                accepted_ms=int(row[10]),
                trace=str(row[11]),
            )
            for row in conn.execute(
                "SELECT sender, input_id, seq, epoch, e.envelope, base_version, n_samples,"
                " tau, discount, clip_scale, accepted_ms, trace"
                " FROM inputs JOIN input_envelopes AS e USING (pos)"
                " WHERE epoch = ? AND status = 'open' ORDER BY pos",
                (open_epoch,),
            )
        )
        (open_count,) = conn.execute(
            "SELECT count(*) FROM inputs WHERE epoch = ? AND status = 'open'", (open_epoch,)
        ).fetchone()
        if open_count != len(inputs):
            raise StoreError(
                f"state store {self.path} holds {open_count} open inputs in epoch "
                f"{open_epoch} but the envelopes of only {len(inputs)}; it is inconsistent"
            )
        stray = conn.execute(
            "SELECT count(*) FROM inputs WHERE status = 'open' AND epoch != ?", (open_epoch,)
        ).fetchone()[0]
        if stray:
            raise StoreError(
                f"state store {self.path} holds {stray} open inputs outside the open epoch "
                f"{open_epoch}; it is inconsistent"
            )
        outbox = tuple(
            OutboxEntry(
                partial_id=bytes(row[0]),
                epoch=int(row[1]),
                seq=int(row[2]),
                subject=str(row[3]),
                envelope=bytes(row[4]),
                trace=str(row[5]),
            )
            for row in conn.execute(
                "SELECT partial_id, epoch, seq, subject, envelope, trace FROM outbox"
                " WHERE state = 'pending' ORDER BY epoch"
            )
        )
        latest_row = conn.execute(
            "SELECT version, blob, pointer, lineage, update_count, created_ms, published"
            " FROM model_versions ORDER BY version DESC LIMIT 1"
        ).fetchone()
        unpublished = tuple(
            int(row[0])
            for row in conn.execute(
                "SELECT version FROM model_versions WHERE published = 0 ORDER BY version"
            )
        )
        optimizer: dict[str, npt.NDArray[Any]] = {}
        for name, dtype, shape, data in conn.execute(
            "SELECT name, dtype, shape, data FROM optimizer_state"
        ):
            array_dtype = np.dtype(dtype)
            if array_dtype.name not in _ARRAY_DTYPES:
                raise StoreError(f"optimizer array {name!r} has dtype {dtype}; not loadable")
            dims = tuple(int(d) for d in json.loads(shape))
            optimizer[name] = np.frombuffer(data, dtype=array_dtype).reshape(dims).copy()
        known = meta.get("known_version")
        pointer = meta.get("model_pointer")
        return Recovery(
            open_epoch=open_epoch,
            open_inputs=inputs,
            pending_outbox=outbox,
            high_water=dict(self._high_water),
            out_seq=int(meta.get("out_seq", 0)),
            known_version=None if known is None else int(known),
            model_pointer=None if pointer is None else bytes(pointer),
            latest_version=None if latest_row is None else _version_from_row(latest_row),
            unpublished_versions=unpublished,
            optimizer_state=optimizer,
        )

    async def recover(self) -> Recovery:
        """Read what a restarting daemon needs: open inputs, pending outbox, marks, versions."""
        try:
            result: Recovery = await self._run_blocking(self._recover_sync)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read state store {self.path}: {exc}") from exc
        return result


def _version_from_row(row: Sequence[Any]) -> ModelVersionRecord:
    lineage_bytes = bytes(row[3])
    lineage = tuple(lineage_bytes[i : i + ID_BYTES] for i in range(0, len(lineage_bytes), ID_BYTES))
    return ModelVersionRecord(
        version=int(row[0]),
        blob=bytes(row[1]),
        pointer=bytes(row[2]),
        lineage=lineage,
        update_count=int(row[4]),
        created_ms=int(row[5]),
        published=bool(row[6]),
    )


def _drop_open_envelopes(conn: sqlite3.Connection, epoch: int) -> None:
    """Delete the envelopes of ``epoch``'s open inputs (their fold is leaving the buffer)."""
    conn.execute(
        "DELETE FROM input_envelopes WHERE pos IN"
        " (SELECT pos FROM inputs WHERE epoch = ? AND status = 'open')",
        (epoch,),
    )


def _migrate_from_v1(conn: sqlite3.Connection) -> None:
    """Move a version 1 store's envelopes out of ``inputs`` (one transaction).

    Only open inputs keep theirs (a flushed input's partial is in the outbox); the
    old ``inputs.envelope`` column stays, always NULL, since dropping a column
    rewrites the table.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "INSERT INTO input_envelopes (pos, envelope) SELECT pos, envelope FROM inputs"
            " WHERE status = 'open' AND envelope IS NOT NULL"
        )
        conn.execute("UPDATE inputs SET envelope = NULL WHERE envelope IS NOT NULL")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    logger.info("migrated the state store to schema version %d", SCHEMA_VERSION)


def _put_meta(conn: sqlite3.Connection, key: str, value: int | bytes) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


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
    records = (_version_from_row(row) for row in rows)
    return {record.version: list(record.lineage) for record in records}


async def _run_inline(fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking work on the trio thread (tests with a fake clock; tiny stores)."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


@asynccontextmanager
async def open_state_store(
    path: Path,
    *,
    commit_window_s: float = 0.002,
    in_thread: bool = True,
    crash_label: str = "store",
) -> AsyncIterator[StateStore]:
    """Open (creating if needed) the state store at ``path`` and run its committer.

    Args:
        path: the sqlite file.
        commit_window_s: how long the committer waits after the first write of a
            batch for others to join it.
        in_thread: run sqlite commits on a worker thread (the default). False runs
            them on the trio thread: for tests under a fake clock, whose autojump
            would otherwise jump while a thread works.
        crash_label: the tier name of the crash points ``<label>.before_commit``
            and ``<label>.after_commit`` (``tiers.faults``).

    Raises:
        StoreError: the file cannot be opened or has another schema.

    On exit, writes not yet committed are dropped without acknowledging them
    (exactly what a crash would do); a commit in progress finishes first.
    """
    run_blocking: RunBlocking = trio.to_thread.run_sync if in_thread else _run_inline
    store = StateStore(
        Path(path),
        commit_window_s=commit_window_s,
        run_blocking=run_blocking,
        crash_label=crash_label,
    )
    await run_blocking(store._open_sync)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store._serve_commits)
            try:
                yield store
            finally:
                store._closed = True
                nursery.cancel_scope.cancel()
    finally:
        for _, ticket, _ in store._queue:
            ticket._finish(StoreError(f"state store {store.path} closed before the commit"))
        store._queue.clear()
        store._close_sync()
