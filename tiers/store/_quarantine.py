"""The quarantine table: inputs a tier acknowledged but could not use; no protocol messages, no bus.

A tier never acknowledges an input and then drops it (docs/operations.md,
quarantine). An input it must acknowledge but cannot fold (a partial from an
edge the registry does not know yet, a layout it does not have, bytes that
crashed its admission) is stored here in the same commit its acknowledgement
waits for, with its reason, sender, time and bytes. Re-admission runs it
through the core's admission again; a row that becomes an input leaves the
table in the very commit that records the input, so it can never be folded
twice. It waits in ``quarantine_folded`` beside its input until the input is
done (upstream, or in a published version): a leased tier that forgets the
input at a takeover puts the row back (``submit_forget_unforwarded``).

The daemon keeps what the bounds need in memory (:class:`QuarantineUsage`),
re-read from the table at every re-admission pass: ``fedtier quarantine``
writes the same file while the daemon runs (WAL), and a row it dropped only
makes the cached usage too high for a while, which errs on the safe side.

The offline readers and writers at the bottom (``read_quarantine``,
``release_quarantined``, ``drop_quarantined``) are what ``fedtier
quarantine`` uses; they open the file with plain sqlite3 and need no trio.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from fedtier.protocol.errors import StoreError
from fedtier.tiers.store._engine import CommitTicket
from fedtier.tiers.store._inputs import InputTables, now_ms, put_meta
from fedtier.tiers.store._schema import READABLE_VERSIONS

__all__ = [
    "QuarantineRecord",
    "QuarantineTables",
    "QuarantineUsage",
    "Retry",
    "drop_quarantined",
    "read_quarantine",
    "read_quarantine_dropped",
    "release_quarantined",
]

Retry = Literal["any", "cut", "never"]
"""When re-admission is tried: at every pass, after the next cut (an overflow), or never."""

_SELECT: Final = (
    "SELECT qid, sender, input_id, subject, reason, retry, detail, received_ms, released,"
    " envelope FROM quarantine"
)
_INSERT: Final = (
    "INSERT INTO quarantine (qid, sender, input_id, subject, reason, retry, detail,"
    " received_ms, released, envelope) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)"
)
_DROPPED_KEY: Final = "quarantine_dropped"
# meta keys ``robust_exempt:<sender>:<input id hex>``: inputs an operator released from
# the quarantine, never scored as outliers again while they wait in the open epoch.
_EXEMPT_PREFIX: Final = "robust_exempt:"


def _exempt_key(sender: str, input_id: bytes) -> str:
    return f"{_EXEMPT_PREFIX}{sender}:{input_id.hex()}"


@dataclass(frozen=True, slots=True)
class QuarantineRecord:
    """One quarantined input.

    Attributes:
        qid: its row id (stable; ``fedtier quarantine show|release|drop`` take it).
        sender: the sender it claims ("" when the bytes did not parse that far).
        input_id: the update or partial id it claims, None when unknown.
        subject: the subject or topic it arrived on.
        reason: the ``Reason`` token it was refused with.
        retry: when re-admission is tried (``any``, ``cut`` or ``never``).
        detail: the rejection's message, for the operator.
        received_ms: wall milliseconds when it was quarantined.
        released: an operator asked for its re-admission (``fedtier quarantine release``).
        envelope: the bytes as delivered.
    """

    qid: int
    sender: str
    input_id: bytes | None
    subject: str
    reason: str
    retry: Retry
    detail: str
    received_ms: int
    released: bool
    envelope: bytes

    @property
    def size(self) -> int:
        """Bytes held (the envelope)."""
        return len(self.envelope)


def _record(row: tuple[Any, ...]) -> QuarantineRecord:
    qid, sender, input_id, subject, reason, retry, detail, received_ms, released, envelope = row
    assert isinstance(envelope, bytes)
    assert retry in ("any", "cut", "never")
    return QuarantineRecord(
        qid=int(qid),
        sender=str(sender),
        input_id=None if input_id is None else bytes(input_id),
        subject=str(subject),
        reason=str(reason),
        retry=retry,
        detail=str(detail),
        received_ms=int(received_ms),
        released=bool(released),
        envelope=bytes(envelope),
    )


@dataclass(slots=True)
class QuarantineUsage:
    """What the quarantine holds, for bounds and metrics.

    Attributes:
        by_sender: rows and bytes per sender.
        by_reason: rows per reason.
        total_bytes: bytes in all.
    """

    by_sender: dict[str, tuple[int, int]] = field(default_factory=dict)
    by_reason: Counter[str] = field(default_factory=Counter)
    total_bytes: int = 0

    @property
    def count(self) -> int:
        """Rows in all."""
        return sum(self.by_reason.values())

    def add(self, sender: str, reason: str, size: int, sign: int = 1) -> None:
        """Count one row in (``sign`` 1) or out (-1)."""
        rows, held = self.by_sender.get(sender, (0, 0))
        rows, held = rows + sign, held + sign * size
        if rows <= 0:
            self.by_sender.pop(sender, None)
        else:
            self.by_sender[sender] = (rows, held)
        self.by_reason[reason] += sign
        if self.by_reason[reason] <= 0:
            del self.by_reason[reason]
        self.total_bytes = max(0, self.total_bytes + sign * size)


class QuarantineTables(InputTables):
    """Quarantining inputs, listing them for re-admission, and taking them out."""

    def _load_sync(self, conn: sqlite3.Connection) -> None:
        super()._load_sync(conn)
        self._quarantine = QuarantineUsage()
        self._quarantine_rows: dict[int, tuple[str, str, int]] = {}
        self._next_qid = 1
        self._reload_quarantine_sync(conn)

    def _reload_quarantine_sync(self, conn: sqlite3.Connection) -> None:
        usage = QuarantineUsage()
        rows: dict[int, tuple[str, str, int]] = {}
        for qid, sender, reason, size in conn.execute(
            "SELECT qid, sender, reason, length(envelope) FROM quarantine"
        ):
            rows[int(qid)] = (str(sender), str(reason), int(size))
            usage.add(str(sender), str(reason), int(size))
        (top,) = conn.execute("SELECT max(qid) FROM quarantine").fetchone()
        self._quarantine = usage
        self._quarantine_rows = rows
        self._next_qid = max(self._next_qid, 1 if top is None else int(top) + 1)

    @property
    def quarantine_usage(self) -> QuarantineUsage:
        """Rows and bytes held (including quarantines not yet committed)."""
        return self._quarantine

    def submit_quarantine(
        self,
        *,
        sender: str,
        input_id: bytes | None,
        subject: str,
        reason: str,
        retry: Retry,
        detail: str,
        envelope: bytes,
        received_ms: int,
    ) -> tuple[int, CommitTicket]:
        """Quarantine one input; its acknowledgement waits for the returned ticket.

        Returns:
            The row's id and the commit to wait for.
        """
        qid = self._next_qid
        self._next_qid += 1

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                _INSERT,
                (qid, sender, input_id, subject, reason, retry, detail, received_ms, envelope),
            )

        self._quarantine_rows[qid] = (sender, reason, len(envelope))
        self._quarantine.add(sender, reason, len(envelope))
        return qid, self._submit(op, f"quarantine of an input from {sender or 'unknown'}")

    def submit_requarantine(self, qid: int, reason: str, retry: Retry, detail: str) -> None:
        """Record that re-admitting row ``qid`` was refused again (perhaps for another reason)."""
        known = self._quarantine_rows.get(qid)
        if known is not None:
            sender, old_reason, size = known
            self._quarantine.add(sender, old_reason, size, -1)
            self._quarantine.add(sender, reason, size)
            self._quarantine_rows[qid] = (sender, reason, size)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE quarantine SET reason = ?, retry = ?, detail = ?, released = 0"
                " WHERE qid = ?",
                (reason, retry, detail, qid),
            )

        self._submit(op, f"re-quarantine of row {qid}")

    def submit_unquarantine(self, qid: int, *, counted_as: str) -> CommitTicket:
        """Delete row ``qid`` because it is already an input (a duplicate of one); see ``accept``.

        ``counted_as`` names why, for the log of the commit.
        """
        self._forget_row(qid)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM quarantine WHERE qid = ?", (qid,))

        return self._submit(op, f"removal of quarantined row {qid} ({counted_as})")

    def unquarantine_op(self, qid: int) -> None:
        """Forget row ``qid`` in memory; the caller deletes it in its own commit."""
        self._forget_row(qid)

    def _forget_row(self, qid: int) -> None:
        known = self._quarantine_rows.pop(qid, None)
        if known is not None:
            sender, reason, size = known
            self._quarantine.add(sender, reason, size, -1)

    def quarantined_for_readmission(self, *, after_cut_only: bool) -> list[QuarantineRecord]:
        """Rows to run through admission again, oldest first; refreshes the usage from the file.

        Args:
            after_cut_only: only rows refused because the buffer would overflow
                (tried after each cut); otherwise every row whose reason can go
                away, plus rows an operator released.
        """
        assert self._reader is not None
        self._reload_quarantine_sync(self._reader)
        query = (
            _SELECT + " WHERE retry = 'cut' ORDER BY qid"
            if after_cut_only
            else _SELECT + " WHERE retry IN ('any', 'cut') OR released = 1 ORDER BY qid"
        )
        rows = self._reader.execute(query).fetchall()
        return [_record(tuple(row)) for row in rows if int(row[0]) in self._quarantine_rows]

    def submit_quarantine_epoch(
        self, epoch: int, *, reason: str, detail: str, input_count: int, out_seq: int
    ) -> CommitTicket:
        """Close ``epoch`` by moving its open inputs into the quarantine (nothing is sent).

        The last resort of a cut that cannot be encoded or stepped: the inputs
        stay acknowledged and come back through admission (``retry = 'cut'``)
        instead of being dropped. Their input rows are deleted so that the
        dedupe index does not refuse them then.
        """
        first_qid = self._next_qid
        # Reserve ids for the rows the statement below creates.
        self._next_qid += input_count

        def op(conn: sqlite3.Connection) -> None:
            rows = conn.execute(
                "SELECT i.pos, i.sender, i.input_id, fedtier_envelope(e.envelope) FROM inputs AS i"
                " JOIN input_envelopes AS e USING (pos)"
                " WHERE i.epoch = ? AND i.status = 'open' ORDER BY i.pos",
                (epoch,),
            ).fetchall()
            if len(rows) != input_count:
                raise StoreError(
                    f"quarantine of epoch {epoch} names {input_count} inputs; the store holds "
                    f"{len(rows)} open ones"
                )
            at = now_ms()
            for offset, (pos, sender, input_id, envelope) in enumerate(rows):
                conn.execute(
                    _INSERT,
                    (first_qid + offset, sender, input_id, "", reason, "cut", detail, at, envelope),
                )
                conn.execute("DELETE FROM input_envelopes WHERE pos = ?", (pos,))
                # Its leaves were never counted: re-admitted, they must not look counted.
                conn.execute("DELETE FROM leaves WHERE pos = ?", (pos,))
                # Its row from an earlier quarantine, if any: this one replaces it.
                conn.execute("DELETE FROM quarantine_folded WHERE pos = ?", (pos,))
                conn.execute("DELETE FROM inputs WHERE pos = ?", (pos,))
            put_meta(conn, "open_epoch", epoch + 1)
            put_meta(conn, "out_seq", out_seq)

        return self._submit(op, f"quarantine of epoch {epoch}")

    def submit_quarantine_outliers(
        self,
        epoch: int,
        outliers: list[tuple[str, bytes, str, int]],
        *,
        reason: str,
    ) -> CommitTicket:
        """Move single open inputs of ``epoch`` into the quarantine (robust aggregation).

        Submitted just before the cut's ``submit_flush``, synchronously, so both
        land in one transaction: the partial and the outliers it leaves out are
        durable together or not at all. Each row keeps the input's envelope with
        ``retry = 'never'``: only an operator's release brings it back. Its input
        row, envelope and leaves are deleted, as for a quarantined epoch, so that
        re-admission finds it new.

        Args:
            epoch: the open epoch being cut.
            outliers: ``(sender, input_id, detail, envelope size)`` per input.
            reason: the ``Reason`` token (``outlier``).
        """
        first_qid = self._next_qid
        self._next_qid += len(outliers)
        for offset, (sender, _, _, size) in enumerate(outliers):
            self._quarantine_rows[first_qid + offset] = (sender, reason, size)
            self._quarantine.add(sender, reason, size)

        def op(conn: sqlite3.Connection) -> None:
            at = now_ms()
            for offset, (sender, input_id, detail, _) in enumerate(outliers):
                row = conn.execute(
                    "SELECT i.pos, fedtier_envelope(e.envelope) FROM inputs AS i"
                    " JOIN input_envelopes AS e USING (pos)"
                    " WHERE i.sender = ? AND i.input_id = ? AND i.epoch = ? AND i.status = 'open'",
                    (sender, input_id, epoch),
                ).fetchone()
                if row is None:
                    raise StoreError(
                        f"outlier {input_id.hex()} from {sender} is no open input of epoch {epoch}"
                    )
                pos, envelope = row
                conn.execute(
                    _INSERT,
                    (
                        first_qid + offset,
                        sender,
                        input_id,
                        "",
                        reason,
                        "never",
                        detail,
                        at,
                        envelope,
                    ),
                )
                conn.execute("DELETE FROM input_envelopes WHERE pos = ?", (pos,))
                conn.execute("DELETE FROM leaves WHERE pos = ?", (pos,))
                conn.execute("DELETE FROM quarantine_folded WHERE pos = ?", (pos,))
                conn.execute("DELETE FROM inputs WHERE pos = ?", (pos,))

        return self._submit(op, f"quarantine of {len(outliers)} outliers of epoch {epoch}")

    def submit_robust_exempt(self, sender: str, input_id: bytes, *, exempt: bool) -> None:
        """Mark (or, once it is cut, unmark) an input released by an operator as no outlier.

        Submitted right after the input's accept (or the cut's flush), so it is
        durable in the same transaction.
        """
        key = _exempt_key(sender, input_id)

        def op(conn: sqlite3.Connection) -> None:
            if exempt:
                put_meta(conn, key, 1)
            else:
                conn.execute("DELETE FROM meta WHERE key = ?", (key,))

        self._submit(op, f"robust exemption of {input_id.hex()} from {sender}")

    def robust_exempt(self) -> set[tuple[str, bytes]]:
        """``(sender, input_id)`` of every released input still exempt from outlier scoring."""
        assert self._reader is not None
        found: set[tuple[str, bytes]] = set()
        for (key,) in self._reader.execute(
            "SELECT key FROM meta WHERE key LIKE ?", (_EXEMPT_PREFIX + "%",)
        ):
            sender, _, hexid = str(key)[len(_EXEMPT_PREFIX) :].rpartition(":")
            found.add((sender, bytes.fromhex(hexid)))
        return found


# -- offline access (``fedtier quarantine``) -------------------------------------------------


@contextmanager
def _connect(path: Path, *, write: bool) -> Iterator[sqlite3.Connection]:
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"state store {path} does not exist")
    try:
        uri = f"file:{path}" + ("" if write else "?mode=ro")
        conn = sqlite3.connect(uri, uri=True, timeout=10.0, isolation_level=None)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open state store {path}: {exc}") from exc
    try:
        schema = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if schema not in READABLE_VERSIONS:
            raise StoreError(
                f"state store {path} has schema version {schema}; this fedtier reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}"
            )
        if schema < 4:
            raise StoreError(
                f"state store {path} has schema version {schema}, from before the quarantine; "
                "start its daemon once to migrate it"
            )
        yield conn
    except sqlite3.Error as exc:
        raise StoreError(f"cannot use state store {path}: {exc}") from exc
    finally:
        conn.close()


def read_quarantine(path: Path, qid: int | None = None) -> list[QuarantineRecord]:
    """Every quarantined input of the store at ``path`` (or row ``qid`` only), oldest first.

    Raises:
        StoreError: the file is missing, unreadable or older than schema 4.
    """
    with _connect(path, write=False) as conn:
        if qid is None:
            rows = conn.execute(_SELECT + " ORDER BY qid").fetchall()
        else:
            rows = conn.execute(_SELECT + " WHERE qid = ?", (qid,)).fetchall()
    return [_record(tuple(row)) for row in rows]


def read_quarantine_dropped(path: Path) -> int:
    """How many quarantined inputs an operator dropped from the store at ``path``."""
    with _connect(path, write=False) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (_DROPPED_KEY,)).fetchone()
    return 0 if row is None else int(row[0])


def release_quarantined(path: Path, qids: list[int]) -> int:
    """Mark rows for re-admission through the core at the daemon's next pass; returns rows marked.

    The daemon runs its pass at start and on SIGHUP; a released row that the
    core refuses again stays, with the new reason.
    """
    with _connect(path, write=True) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            marked = 0
            for qid in qids:
                marked += conn.execute(
                    "UPDATE quarantine SET released = 1 WHERE qid = ?", (qid,)
                ).rowcount
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return marked


def drop_quarantined(path: Path, qids: list[int]) -> int:
    """Delete rows for good, counting them in ``meta``; returns rows deleted."""
    with _connect(path, write=True) as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            dropped = 0
            for qid in qids:
                dropped += conn.execute("DELETE FROM quarantine WHERE qid = ?", (qid,)).rowcount
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (_DROPPED_KEY,)).fetchone()
            put_meta(conn, _DROPPED_KEY, (0 if row is None else int(row[0])) + dropped)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return dropped
