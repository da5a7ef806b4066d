"""The intake of a tier daemon: admit deliveries in order, settle (commit, ack) in order.

Imports trio, the bus interface and the state store's tickets; the decision
about each delivery is the caller's (the daemons call the sans-IO core).

Receipts (``after_ack``) are sent concurrently, up to ``capacity`` at once,
each after its delivery's commit and ack: waiting for one receipt's PUBACK
before settling the next delivery capped the edge at one broker round trip per
update (``fedtier bench edge``, docs/performance.md, edge intake). Nothing
depends on receipt order: each names its update.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from fedtier.protocol.bus import Delivery, Subscription
from fedtier.protocol.errors import (
    BusError,
)
from fedtier.tiers.core import (
    Outcome,
)
from fedtier.tiers.faults import crash_point
from fedtier.tiers.store import (
    CommitTicket,
)

__all__ = ["Admission", "Intake"]


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision about one delivery, carried from the reader to the settler.

    Attributes:
        delivery: the delivery to acknowledge.
        outcome: accepted, duplicate or rejected.
        reason: the rejection reason token (empty otherwise).
        ticket: the commit to wait for before acknowledging, if any.
        after_ack: what to do once acknowledged (the edge's receipt).
        ack: False to leave the delivery unacknowledged (the broker redelivers
            it): an input the tier can neither use nor quarantine, because the
            quarantine is full, is refused this way rather than lost.
    """

    delivery: Delivery
    outcome: Outcome
    reason: str = ""
    ticket: CommitTicket | None = None
    after_ack: Callable[[], Awaitable[None]] | None = None
    ack: bool = True


class Intake:
    """Reads one subscription: admits in order, settles (commit, ack, receipt) in order.

    Args:
        admit: synchronous decision about one delivery (never raises for bad input).
        after_admit: awaited after each admission (flush triggers).
        capacity: admissions waiting to be settled; the subscription's capacity
            bounds it already, so the reader never waits here in practice.
        log: where settle problems are logged.
        tier: names the crash points ``<tier>.after_admit``, ``.after_ack`` and
            ``.after_receipt`` (``tiers.faults``).
        ack_before_commit: the unsafe switch of that name: acknowledge (and
            send the receipt) first, wait for the commit after.
    """

    def __init__(
        self,
        admit: Callable[[Delivery], Admission],
        after_admit: Callable[[], Awaitable[None]],
        *,
        capacity: int,
        log: logging.Logger,
        tier: str = "",
        ack_before_commit: bool = False,
    ) -> None:
        self._admit = admit
        self._after_admit = after_admit
        self._capacity = capacity
        self._log = log
        self._ack_before_commit = ack_before_commit
        self._after_admit_point = f"{tier}.after_admit"
        self._after_ack_point = f"{tier}.after_ack"
        self._after_receipt_point = f"{tier}.after_receipt"
        self._stopping = False
        self._receive_scope: trio.CancelScope | None = None
        self.finished = trio.Event()

    def stop(self) -> None:
        """Stop taking deliveries; what was admitted is still settled."""
        self._stopping = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def serve(
        self, subscription: Subscription, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Run until :meth:`stop` (then settle what was admitted) or cancellation."""
        send, receive = trio.open_memory_channel[Admission](self._capacity)
        try:
            async with trio.open_nursery() as nursery:
                # The receipts' nursery is this one: serve() returns (and ``finished``
                # is set) only once every receipt has been sent or has failed.
                nursery.start_soon(self._settle, receive, nursery)
                async with send:
                    task_status.started()
                    while not self._stopping:
                        # Only the wait for a delivery is interruptible by stop():
                        # an admitted delivery is always handed on and settled.
                        with trio.CancelScope() as scope:
                            self._receive_scope = scope
                            # BusError (the bus closed under us) propagates: a daemon
                            # without input must stop, not idle.
                            delivery = await subscription.receive()
                        self._receive_scope = None
                        if scope.cancelled_caught:
                            break
                        admission = self._admit(delivery)
                        crash_point(self._after_admit_point)
                        await send.send(admission)
                        await self._after_admit()
        finally:
            self.finished.set()

    async def _settle(
        self, receive: trio.MemoryReceiveChannel[Admission], nursery: trio.Nursery
    ) -> None:
        receipts = trio.Semaphore(self._capacity)
        async with receive:
            async for admission in receive:
                if self._ack_before_commit:
                    # UNSAFE: what a broker's auto-ack does; a crash before the
                    # commit loses an input its sender was told is accepted.
                    await self._acknowledge(admission, nursery, receipts)
                if admission.ticket is not None:
                    # StoreError propagates: a daemon whose store fails must stop.
                    await admission.ticket.wait()
                if not self._ack_before_commit:
                    await self._acknowledge(admission, nursery, receipts)

    async def _acknowledge(
        self, admission: Admission, nursery: trio.Nursery, receipts: trio.Semaphore
    ) -> None:
        if not admission.ack:
            # Left for the broker to redeliver (after ack_wait, up to max_deliver).
            return
        try:
            await admission.delivery.ack()
        except BusError as exc:
            # The broker redelivers; the copy is then a duplicate.
            self._log.warning("ack of a delivery on %s failed: %s", admission.delivery.subject, exc)
        crash_point(self._after_ack_point)
        if admission.after_ack is not None:
            await receipts.acquire()
            nursery.start_soon(self._send_receipt, admission.after_ack, receipts)

    async def _send_receipt(
        self, after_ack: Callable[[], Awaitable[None]], receipts: trio.Semaphore
    ) -> None:
        try:
            await after_ack()
            crash_point(self._after_receipt_point)
        finally:
            receipts.release()
