"""The ``StateStore`` a daemon opens: schema, every table, recovery; no protocol messages, no bus.

It assembles the engine and the table modules into one object and adds what
needs them all: reading back, after a stop or a crash, what a daemon resumes
from (``recover``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import trio

from fedtier.protocol.errors import StoreError
from fedtier.tiers.store._central import ARRAY_DTYPES, CentralTables
from fedtier.tiers.store._engine import RunBlocking, run_inline
from fedtier.tiers.store._records import (
    InputRecord,
    OpenInputs,
    OutboxEntry,
    Recovery,
    version_from_row,
)
from fedtier.tiers.store._schema import prepare_schema
from fedtier.tiers.store._segments import DEFAULT_SEGMENT_BYTES, is_ref

__all__ = ["StateStore", "open_state_store"]


class StateStore(CentralTables):
    """The state store of one daemon; open it with :func:`open_state_store`.

    Writes go through ``submit_*`` (synchronous, returns a :class:`CommitTicket`)
    or the awaitable wrappers. Lookups used on the hot path (dedupe, high-water
    marks) are answered from memory plus a read connection.
    """

    def _prepare_sync(self, conn: sqlite3.Connection) -> None:
        prepare_schema(conn, self.path)

    # -- recovery --------------------------------------------------------------------

    def _recover_sync(self) -> Recovery:
        conn = self._writer
        assert conn is not None
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        open_epoch = int(meta.get("open_epoch", 0))
        records: list[InputRecord] = []
        stored: list[bytes | str] = []
        for row in conn.execute(
            "SELECT sender, input_id, seq, epoch, e.envelope, base_version, n_samples,"
            " tau, discount, clip_scale, accepted_ms, trace"
            " FROM inputs JOIN input_envelopes AS e USING (pos)"
            " WHERE epoch = ? AND status = 'open' ORDER BY pos",
            (open_epoch,),
        ):
            value = row[4] if isinstance(row[4], str) else bytes(row[4])
            # Checked now, so that a missing or overwritten segment fails the
            # recovery with its reason (as reading it would), but read only when
            # the refold takes it: the open buffer's envelopes never all at once.
            self._check_envelope(value)
            stored.append(value)
            records.append(
                InputRecord(
                    sender=row[0],
                    input_id=bytes(row[1]),
                    seq=int(row[2]),
                    epoch=int(row[3]),
                    envelope=b"",
                    base_version=int(row[5]),
                    n_samples=float(row[6]),
                    tau=int(row[7]),
                    discount=float(row[8]),
                    clip_scale=float(row[9]),
                    accepted_ms=int(row[10]),
                    trace=str(row[11]),
                )
            )
        inputs = OpenInputs(records, stored, self.envelope_bytes)
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
                envelope=self.envelope_bytes(row[4]),
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
            if array_dtype.name not in ARRAY_DTYPES:
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
            latest_version=None if latest_row is None else version_from_row(latest_row),
            unpublished_versions=unpublished,
            optimizer_state=optimizer,
        )

    def _check_envelope(self, value: bytes | str) -> None:
        """Raise ``StoreError`` unless ``value`` (a reference or inline bytes) can be read."""
        if is_ref(value):
            assert isinstance(value, str)
            self.segments.check(value)
        else:
            self.envelope_bytes(value)  # inline bytes pass; any other text raises

    async def recover(self) -> Recovery:
        """Read what a restarting daemon needs: open inputs, pending outbox, marks, versions."""
        try:
            result: Recovery = await self._run_blocking(self._recover_sync)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read state store {self.path}: {exc}") from exc
        return result


@asynccontextmanager
async def open_state_store(
    path: Path,
    *,
    commit_window_s: float = 0.002,
    in_thread: bool = True,
    crash_label: str = "store",
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
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
        segment_bytes: size past which the segment log starts a new file
            (tests make it small to see segments come and go).

    Raises:
        StoreError: the file cannot be opened or has another schema.

    On exit, writes not yet committed are dropped without acknowledging them
    (exactly what a crash would do); a commit in progress finishes first.
    """
    run_blocking: RunBlocking = trio.to_thread.run_sync if in_thread else run_inline
    store = StateStore(
        Path(path),
        commit_window_s=commit_window_s,
        run_blocking=run_blocking,
        crash_label=crash_label,
        segment_bytes=segment_bytes,
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
