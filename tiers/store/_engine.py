"""A generic grouped-commit sqlite engine (pragmas, one committer, tickets); knows no fedtier table.

It may import sqlite3, trio and threading (through ``trio.to_thread``), plus
``StoreError`` and the crash points; never protocol messages nor the store's
table modules. Subclasses add the tables: they submit operations through
``_submit`` and hook ``_prepare_sync`` (schema), ``_load_sync`` (in-memory
state) and ``_committed`` (bookkeeping once a keyed write is durable).

Writes are grouped: callers submit operations, one committer task gathers what
arrives within ``commit_window_s`` and applies it in a single transaction (one
fsync), in submission order, on a worker thread. So an operation submitted
before another is always durable no later than it.

The committer passes the crash points ``<tier>.before_commit`` and
``<tier>.after_commit`` (``tiers.faults``) around every transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeAlias, TypeVar

import trio

from fedtier.protocol.errors import StoreError
from fedtier.tiers.faults import crash_point

__all__ = ["CommitEngine", "CommitTicket", "Op", "RunBlocking", "connect", "run_inline"]

K = TypeVar("K")

RunBlocking: TypeAlias = Callable[..., Awaitable[Any]]
"""How blocking sqlite work runs: ``trio.to_thread.run_sync`` by default."""


class Op(Protocol):
    """One write of a transaction, run on the writer connection inside ``BEGIN IMMEDIATE``."""

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


def connect(path: Path) -> sqlite3.Connection:
    """Open a connection to ``path`` with the pragmas every connection of the store needs."""
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
        # (see ``_schema``); b-tree pages still lose deleted content.
        conn.execute("PRAGMA secure_delete=FAST")
    except BaseException:
        conn.close()
        raise
    return conn


async def run_inline(fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking work on the trio thread (tests with a fake clock; tiny stores)."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


class CommitEngine(Generic[K]):
    """A writer and a reader connection on one sqlite file, and the committer that groups writes.

    ``K`` is the key a write may carry (see ``_submit``); the engine only hands it
    back to ``_committed`` once that write is durable.
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
        # (operation, its ticket, the key it makes durable, if any)
        self._queue: list[tuple[Op, CommitTicket, K | None]] = []
        self._wakeup = trio.Event()
        self._closed = False
        self.commits = 0
        """Transactions committed so far (tests check the grouping)."""

    # -- hooks -----------------------------------------------------------------------

    def _prepare_sync(self, conn: sqlite3.Connection) -> None:
        """Bring the file's schema up to date, on the writer, before the reader opens."""

    def _load_sync(self, conn: sqlite3.Connection) -> None:
        """Load in-memory state from the opened file, on the writer."""

    def _committed(self, key: K, ticket: CommitTicket) -> None:
        """Bookkeeping for a keyed write that is now durable, before its ticket is finished."""

    def _before_commit_sync(self) -> None:
        """Make what the batch's operations wrote outside sqlite durable, before ``COMMIT``.

        Runs on the committer's thread inside the transaction: a failure here
        rolls the whole batch back, so no row ever names bytes that are not on disk.
        """

    def _after_commit_sync(self) -> None:
        """Work that needs the batch committed (deleting files no row names), same thread."""

    # -- opening -------------------------------------------------------------------

    def _open_sync(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = connect(self.path)
            self._prepare_sync(self._writer)
            self._reader = connect(self.path)
            self._load_sync(self._writer)
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
                if key is not None:
                    self._committed(key, ticket)
                ticket._finish(None)

    def _apply(self, ops: Sequence[Op]) -> None:
        conn = self._writer
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                op(conn)
            self._before_commit_sync()
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self._after_commit_sync()

    def _submit(self, op: Op, what: str, key: K | None = None) -> CommitTicket:
        if self._closed:
            raise StoreError(f"state store {self.path} is closed; cannot store {what}")
        ticket = CommitTicket(what)
        self._queue.append((op, ticket, key))
        self._wakeup.set()
        return ticket

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking file work the way this store runs its commits (a worker thread)."""
        return await self._run_blocking(fn, *args)
