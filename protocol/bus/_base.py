"""The transport interface every bus implements; owns no I/O itself and imports only trio.

A bus moves opaque ``bytes`` plus string headers (trace context travels there)
between processes. Its contract, which ``tests/conformance`` checks against
every implementation:

* ``publish`` returns only once the broker has taken the message (MQTT QoS 1
  PUBACK, JetStream PubAck, core NATS flush). A broker's acknowledgement is not
  acceptance by the consumer: end-to-end acceptance is built above the bus
  (docs/architecture.md, data guarantees). If the outcome is unknown it raises ``PublishError``;
  the caller retries with the same ``msg_id``.
* A subscription yields ``Delivery`` objects; each must be acknowledged with
  ``await delivery.ack()`` once the consumer has durably accepted it. A durable
  subscription that is closed with unacknowledged deliveries and opened again
  gets them again, marked ``redelivered``. Consumers must be idempotent: every
  bus may deliver a message more than once.
* At most ``capacity`` deliveries wait unacknowledged in a subscription; past
  that the bus stops reading from the broker (backpressure reaches the
  broker, nothing is dropped on this side).
* Headers round-trip as ``str -> str`` in order.
* Subjects use the bus's ``flavor``: ``"mqtt"`` (``a/b/c``, wildcards ``+`` and
  ``#``) or ``"nats"`` (``a.b.c``, wildcards ``*`` and ``>``). Names are built
  in ``protocol.names`` only.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal

from fedtier.protocol.errors import LocalProtocolError

__all__ = [
    "Bus",
    "Delivery",
    "Flavor",
    "PublishAck",
    "Subscription",
    "check_latest_only",
    "subject_matches",
]

Flavor = Literal["mqtt", "nats"]


@dataclass(frozen=True, slots=True)
class PublishAck:
    """What the broker said about a publish.

    Attributes:
        duplicate: True when the broker recognised ``msg_id`` as already stored
            (JetStream dedupe window); False when it stored a new message or
            when the transport has no dedupe (MQTT).
        sequence: the stream sequence when the transport has one, else None.
    """

    duplicate: bool = False
    sequence: int | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Delivery:
    """One message handed to a subscriber.

    Attributes:
        subject: the concrete topic or subject it was published on.
        payload: the message bytes.
        headers: user properties (MQTT v5) or NATS headers, in order.
        redelivered: True when the broker says this may be a repeat.
        retained: True for an MQTT retained message delivered on subscribe.
    """

    subject: str
    payload: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    redelivered: bool = False
    retained: bool = False
    _ack: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

    async def ack(self) -> None:
        """Tell the broker this message is accepted; it will not come back.

        Acks are best effort on the wire: an ack lost to a disconnect makes the
        broker redeliver, which consumers handle by being idempotent.
        """
        if self._ack is not None:
            await self._ack()


class Subscription(abc.ABC):
    """An open subscription: an async iterator of deliveries."""

    @abc.abstractmethod
    async def receive(self) -> Delivery:
        """Wait for the next delivery.

        Raises:
            BusClosed: the subscription or its bus was closed.
        """

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Delivery:
        # A plain __anext__ rather than an async generator: breaking out of an
        # ``async for`` must not leave a generator for the GC to finalize.
        from fedtier.protocol.errors import BusClosed

        try:
            return await self.receive()
        except BusClosed:
            raise StopAsyncIteration from None


class Bus(abc.ABC):
    """A connected message transport.

    Implementations are opened with an ``open_*`` async context manager that
    connects, runs the transport's background tasks in a nursery it owns, and
    closes everything on exit.
    """

    flavor: Flavor

    @property
    def max_message_bytes(self) -> int | None:
        """The largest message the broker said it takes, or None when it set no limit.

        Known once connected (NATS: the server's ``max_payload``; MQTT: the
        Maximum Packet Size in CONNACK). Daemons compare it at start with the
        largest message they may have to send, and refuse a configuration that
        cannot carry it instead of failing on that message later.
        """
        return None

    @property
    def max_single_message_bytes(self) -> int | None:
        """The most one message carries whole (a KV value).

        ``max_message_bytes`` unless the bus sends larger payloads as parts
        (NATS: the server's ``max_payload``).
        """
        return self.max_message_bytes

    @abc.abstractmethod
    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
        retain: bool = False,
    ) -> PublishAck:
        """Publish one message and wait until the broker has taken it.

        Args:
            subject: concrete topic or subject (no wildcards).
            payload: message bytes.
            headers: string headers, kept in order.
            msg_id: idempotency key; brokers that dedupe (JetStream) store one
                copy per id within their window.
            retain: keep as the subject's last value for new subscribers
                (MQTT retained messages; the in-memory bus emulates it).

        Raises:
            BusUnavailable: not connected now (transient).
            PublishError: no confirmation; the outcome is unknown, retry with
                the same ``msg_id``.

        On cancellation the message may or may not have been stored.
        """

    @abc.abstractmethod
    def subscribe(
        self,
        subject_filter: str,
        *,
        durable: str | None = None,
        capacity: int = 64,
        latest_only: bool = False,
    ) -> AbstractAsyncContextManager[Subscription]:
        """Open a subscription.

        Args:
            subject_filter: subject pattern in this bus's flavor.
            durable: a durable name; the broker keeps unacknowledged and
                not-yet-delivered messages for it across disconnects and
                restarts of the subscriber. Subscribers sharing a durable name
                share the work (MQTT shared subscription, JetStream consumer).
            capacity: most deliveries held unacknowledged in this process.
            latest_only: deliver only what is published while this subscriber
                is connected, plus the subject's retained value at every
                (re)subscribe: the broker keeps nothing for it while it is away
                (MQTT: a QoS 0 subscription sent again on every connect; a
                plain NATS or in-memory subscription already behaves so). For
                state where only the newest value matters (the model topics),
                so a broker does not queue every version for every offline
                device. Not with ``durable``.
        """


def check_latest_only(durable: str | None, latest_only: bool) -> None:
    """Refuse ``latest_only`` with ``durable``: one keeps everything, the other nothing."""
    if latest_only and durable is not None:
        raise LocalProtocolError(
            f"a latest_only subscription keeps nothing while away; durable {durable!r} keeps all"
        )


def subject_matches(pattern: str, subject: str, flavor: Flavor) -> bool:
    """Return True when ``subject`` matches the wildcard ``pattern``.

    MQTT: levels split on ``/``, ``+`` matches one level, ``#`` (last) matches
    the rest including none. NATS: tokens split on ``.``, ``*`` matches one
    token, ``>`` (last) matches one or more.
    """
    sep, one, rest = ("/", "+", "#") if flavor == "mqtt" else (".", "*", ">")
    p_parts = pattern.split(sep)
    s_parts = subject.split(sep)
    for i, part in enumerate(p_parts):
        if part == rest:
            remaining = len(s_parts) - i
            return remaining >= (0 if flavor == "mqtt" else 1)
        if i >= len(s_parts):
            return False
        if part != one and part != s_parts[i]:
            return False
    return len(p_parts) == len(s_parts)
