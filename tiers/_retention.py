"""The periodic prune of a daemon's state store by the ``[retention]`` horizons; no bus, no client.

It owns *when* rows go (a pass every ``interval_s``, in batches, from the
moment the daemon serves); ``tiers.store._retention`` owns *which* rows (the
SQL). It must not import a bus adapter, ``client`` or ``simulations``: the
daemon shell hands it the daemon.

Why a task of its own: pruning is never on the path of an input. A pass
submits its deletes through the store's committer like any other write, one
batch per transaction, so accepts keep grouping between two batches and a
crash in the middle of a pass leaves a store that simply has more rows.

The clocks: inputs record ``accepted_ms`` and the central's versions
``created_ms`` with the daemon's clock (``daemon.clock_ms``, virtual in
tests), acknowledged outbox rows their
``acked_ms`` with the wall clock (``tiers.store``): each horizon is measured on
the clock that wrote its column.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from fedtier.protocol.errors import LocalProtocolError, StoreError
from fedtier.tiers.config import RetentionSettings
from fedtier.tiers.store import (
    PruneCounts,
    StateStore,
    now_ms,
    prune_acked_outbox,
    prune_done_inputs,
    prune_version_history,
)
from fedtier.tiers.store._inputs import prune_segments

if TYPE_CHECKING:
    from fedtier.tiers.tier import TierDaemon

__all__ = ["Pruner", "prune_once", "run_pruner"]

logger = logging.getLogger("fedtier.retention")

# A pass stops after this many full batches even when more rows are due: the
# next pass carries on, and a store far behind never monopolises its committer.
_MAX_BATCHES_PER_PASS = 100


async def prune_once(
    store: StateStore,
    settings: RetentionSettings,
    *,
    clock_ms: Callable[[], int],
    wall_ms: Callable[[], int] = now_ms,
) -> PruneCounts:
    """One prune pass over ``store``: batches until nothing more is due (or the pass bound).

    Args:
        store: the open state store.
        settings: the horizons and the batch size.
        clock_ms: the clock that wrote ``inputs.accepted_ms`` (the daemon's).
        wall_ms: the clock that wrote ``outbox.acked_ms`` (wall-clock milliseconds).

    Raises:
        StoreError: a prune transaction failed (the store is closing).
    """
    total = PruneCounts()
    batch = settings.prune_batch
    for _ in range(_MAX_BATCHES_PER_PASS):
        accepted_before = clock_ms() - int(settings.dedupe_horizon_s * 1000)
        acked_before = wall_ms() - int(settings.outbox_horizon_s * 1000)
        made_before = clock_ms() - int(settings.version_history_s * 1000)
        result: list[PruneCounts] = []

        def op(
            conn: sqlite3.Connection,
            accepted_before: int = accepted_before,
            acked_before: int = acked_before,
            made_before: int = made_before,
            result: list[PruneCounts] = result,
        ) -> None:
            counts = prune_done_inputs(conn, accepted_before_ms=accepted_before, batch=batch)
            outbox = prune_acked_outbox(conn, acked_before_ms=acked_before, batch=batch)
            # Version rows exist at the central only; elsewhere this deletes nothing.
            versions = prune_version_history(conn, created_before_ms=made_before, batch=batch)
            result.append(counts + PruneCounts(outbox=outbox, versions=versions))

        # The committer's own path: one writer, FIFO with every accept and flush.
        await store._submit(op, "retention prune").wait()
        counts = result[0]
        total += counts
        if counts.inputs < batch and counts.outbox < batch and counts.versions < batch:
            break
    if total.envelopes:
        # Envelope bytes live in segment files; a file no row names any more goes now.
        await prune_segments(store)
    return total


class Pruner:
    """Prunes one daemon's store every ``settings.interval_s`` while it serves.

    Args:
        daemon: the daemon whose store is pruned (read once it is ready).
        settings: ``[retention]``; the daemon's own by default.

    Attributes:
        passes: prune passes finished since start.
        pruned: rows deleted since start, by table.
    """

    def __init__(self, daemon: TierDaemon, settings: RetentionSettings | None = None) -> None:
        self.daemon = daemon
        self.settings = settings if settings is not None else daemon.config.retention
        self.passes = 0
        self.pruned = PruneCounts()
        self.passed = trio.Event()
        """Set after each pass (and replaced): tests wait for the next pass with it."""

    async def prune_now(self) -> PruneCounts:
        """One pass now; the counts it deleted."""
        counts = await prune_once(self.daemon.store, self.settings, clock_ms=self.daemon.clock_ms)
        self.passes += 1
        self.pruned += counts
        if counts.total:
            logger.info(
                "pruned %d inputs, %d leaf ids, %d envelopes, %d acked outbox rows, "
                "%d model version rows",
                counts.inputs,
                counts.leaves,
                counts.envelopes,
                counts.outbox,
                counts.versions,
            )
        fired, self.passed = self.passed, trio.Event()
        fired.set()
        return counts

    async def serve(self) -> None:
        """Prune every ``interval_s`` from the moment the daemon serves, until cancelled.

        A failed pass (the store closing under it) is logged and tried again at
        the next interval: pruning is housekeeping, never a reason to stop.
        """
        await self.daemon.ready.wait()
        while True:
            try:
                await self.prune_now()
            except (StoreError, LocalProtocolError) as exc:  # the store closing under it
                logger.warning("retention prune failed: %s; tried again later", exc)
            await trio.sleep(self.settings.interval_s)


@asynccontextmanager
async def run_pruner(daemon: TierDaemon) -> AsyncIterator[Pruner]:
    """Prune ``daemon``'s store for the duration of the block (cancelled at its end)."""
    pruner = Pruner(daemon)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pruner.serve)
        try:
            yield pruner
        finally:
            nursery.cancel_scope.cancel()
