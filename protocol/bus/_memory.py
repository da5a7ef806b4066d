"""An in-process bus with broker semantics, for fast tests of tier logic; no network, no threads.

``MemoryBroker`` plays the broker (retained messages, durable queues that
outlive their subscribers, redelivery of unacknowledged messages, ``msg_id``
dedupe); each ``MemoryBus`` is one client connection to it. It passes the same
conformance suite as the MQTT and NATS adapters, so tier logic tested on it
behaves the same on a real broker. It does not replace the broker tests.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from fedtier.protocol.bus._base import (
    Bus,
    Delivery,
    Flavor,
    PublishAck,
    Subscription,
    check_latest_only,
    subject_matches,
)
from fedtier.protocol.errors import BusClosed, LocalProtocolError

__all__ = ["MemoryBroker", "MemoryBus"]


@dataclass(frozen=True, slots=True)
class _Message:
    seq: int
    subject: str
    payload: bytes
    headers: tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _Queue:
    """Messages waiting for one durable name (shared by its subscribers)."""

    subject_filter: str
    pending: deque[tuple[_Message, bool, bool]] = field(default_factory=deque)
    lot: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)


class MemoryBroker:
    """The shared state that ``MemoryBus`` clients talk to.

    Args:
        flavor: subject syntax, ``"mqtt"`` or ``"nats"``.
        max_message_bytes: the largest payload it takes (None: no limit), as a
            real broker announces it; a larger publish fails as it would there.
    """

    def __init__(self, flavor: Flavor = "nats", *, max_message_bytes: int | None = None) -> None:
        self.flavor: Flavor = flavor
        self.max_message_bytes = max_message_bytes
        self._seq = itertools.count(1)
        self._retained: dict[str, _Message] = {}
        self._queues: dict[str, _Queue] = {}
        self._ephemeral: list[_Queue] = []
        self._seen_ids: dict[str, int] = {}
        self.published_count = 0

    def _route(self, msg: _Message) -> None:
        for queue in [*self._queues.values(), *self._ephemeral]:
            if subject_matches(queue.subject_filter, msg.subject, self.flavor):
                queue.pending.append((msg, False, False))
                queue.lot.unpark_all()


class _MemorySubscription(Subscription):
    def __init__(self, queue: _Queue, capacity: int) -> None:
        self._queue = queue
        self._capacity = capacity
        self._in_flight: dict[int, _Message] = {}
        self._space = trio.lowlevel.ParkingLot()
        self.closed = False

    async def receive(self) -> Delivery:
        while True:
            if self.closed:
                raise BusClosed("the in-memory subscription is closed")
            if self._queue.pending and len(self._in_flight) < self._capacity:
                break
            # Park until a publish, an ack or a close changes the picture.
            lot = self._queue.lot if len(self._in_flight) < self._capacity else self._space
            await lot.park()
        msg, redelivered, retained = self._queue.pending.popleft()
        await trio.lowlevel.checkpoint()
        self._in_flight[msg.seq] = msg

        async def ack() -> None:
            self._in_flight.pop(msg.seq, None)
            self._space.unpark_all()
            await trio.lowlevel.checkpoint()

        return Delivery(
            subject=msg.subject,
            payload=msg.payload,
            headers=dict(msg.headers),
            redelivered=redelivered,
            retained=retained,
            _ack=ack,
        )

    def close(self) -> None:
        """Give unacknowledged messages back to the queue, oldest first."""
        self.closed = True
        for msg in sorted(self._in_flight.values(), key=lambda m: m.seq, reverse=True):
            self._queue.pending.appendleft((msg, True, False))
        self._in_flight.clear()
        self._queue.lot.unpark_all()
        self._space.unpark_all()


class MemoryBus(Bus):
    """One client connection to a ``MemoryBroker``."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.flavor = broker.flavor
        self._broker = broker
        self._closed = False

    @property
    def max_message_bytes(self) -> int | None:
        """See ``Bus``: the broker's configured limit."""
        return self._broker.max_message_bytes

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
        retain: bool = False,
    ) -> PublishAck:
        """See ``Bus.publish``."""
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise BusClosed("the in-memory bus is closed")
        if any(c in subject for c in ("+", "#", "*", ">")):
            raise LocalProtocolError(f"cannot publish to wildcard subject {subject!r}")
        broker = self._broker
        if broker.max_message_bytes is not None and len(payload) > broker.max_message_bytes:
            raise LocalProtocolError(
                f"publish to {subject}: message of {len(payload)} bytes is larger than "
                f"the broker's limit of {broker.max_message_bytes}"
            )
        if msg_id is not None and msg_id in broker._seen_ids:
            return PublishAck(duplicate=True, sequence=broker._seen_ids[msg_id])
        msg = _Message(next(broker._seq), subject, bytes(payload), tuple((headers or {}).items()))
        if msg_id is not None:
            broker._seen_ids[msg_id] = msg.seq
        if retain:
            if payload:
                broker._retained[subject] = msg
            else:  # MQTT: an empty retained payload clears the retained value
                broker._retained.pop(subject, None)
        broker.published_count += 1
        broker._route(msg)
        return PublishAck(duplicate=False, sequence=msg.seq)

    @asynccontextmanager
    async def subscribe(
        self,
        subject_filter: str,
        *,
        durable: str | None = None,
        capacity: int = 64,
        latest_only: bool = False,
    ) -> AsyncIterator[Subscription]:
        """See ``Bus.subscribe``."""
        if capacity < 1:
            raise LocalProtocolError(f"subscription capacity must be >= 1, got {capacity}")
        check_latest_only(durable, latest_only)  # in memory, a plain subscription is one
        broker = self._broker
        if durable is not None:
            queue = broker._queues.get(durable)
            if queue is None:
                queue = broker._queues[durable] = _Queue(subject_filter)
            elif queue.subject_filter != subject_filter:
                raise LocalProtocolError(
                    f"durable {durable!r} already filters {queue.subject_filter!r}, "
                    f"not {subject_filter!r}"
                )
        else:
            queue = _Queue(subject_filter)
            broker._ephemeral.append(queue)
        for msg in broker._retained.values():
            if subject_matches(subject_filter, msg.subject, broker.flavor):
                queue.pending.append((msg, False, True))
        sub = _MemorySubscription(queue, capacity)
        try:
            yield sub
        finally:
            sub.close()
            if durable is None:
                broker._ephemeral.remove(queue)

    def close(self) -> None:
        """Refuse further publishes from this connection."""
        self._closed = True
