"""``MqttBus``, ``open_mqtt_bus``: ``Bus`` on two connections (a device: one); no nats, no tiers."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NoReturn

import trio
from paho.mqtt.packettypes import PacketTypes

from fedtier.protocol.bus._base import (
    Bus,
    Flavor,
    PublishAck,
    Subscription,
    check_latest_only,
)
from fedtier.protocol.bus.mqtt._config import MqttConfig, _tls_context
from fedtier.protocol.bus.mqtt._connection import _Link
from fedtier.protocol.bus.mqtt._publish import _PublishLink
from fedtier.protocol.bus.mqtt._single import _SingleLink
from fedtier.protocol.bus.mqtt._subscription import _SubscribeLink
from fedtier.protocol.bus.mqtt._wire import (
    _MAX_PAYLOAD_BYTES,
    MSG_ID_PROPERTY,
    _check_filter,
    _check_topic,
    _properties,
)
from fedtier.protocol.errors import BusClosed, BusUnavailable, LocalProtocolError

__all__ = ["MqttBus", "MqttBusStats", "open_mqtt_bus"]


@dataclass(frozen=True, slots=True)
class MqttBusStats:
    """Counters of one ``MqttBus``, for telemetry and tests.

    Attributes:
        held: messages read from the broker and not yet acknowledged, now.
        held_peak: the most ``held`` has been.
        received_total: messages read from the broker.
        acks_dropped_total: acks not sent because their connection had ended.
        reconnects_total: connections re-established after a loss.
    """

    held: int
    held_peak: int
    received_total: int
    acks_dropped_total: int
    reconnects_total: int


class MqttBus(Bus):
    """A bus over one MQTT v5 broker; open it with ``open_mqtt_bus``."""

    flavor: Flavor = "mqtt"

    def __init__(
        self,
        config: MqttConfig,
        nursery: trio.Nursery,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.config = config
        self._nursery = nursery
        self._tls_context = tls_context
        self._publisher: _PublishLink | _SingleLink
        self._subscriber: _SubscribeLink | None = None
        if config.single_connection:
            # One link does both; it is opened at once, like a publisher.
            self._publisher = self._subscriber = _SingleLink(config, tls_context)
        else:
            self._publisher = _PublishLink(config, tls_context)
        self._start_lock = trio.Lock()
        self._closed = False

    @property
    def max_message_bytes(self) -> int | None:
        """The broker's Maximum Packet Size from CONNACK, or None; see ``Bus``.

        It bounds a whole PUBLISH packet: topic and properties count too.
        """
        return self._publisher.max_packet_size

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
        retain: bool = False,
    ) -> PublishAck:
        """Publish at QoS 1 and wait for the PUBACK; see ``Bus.publish``.

        Headers become MQTT v5 user properties in order; ``msg_id`` is added
        as the user property ``ft-msg-id``. MQTT has no dedupe, so the ack
        never says ``duplicate``.

        Raises:
            BusUnavailable: the publishing connection is down now.
            PublishError: the connection was lost before the PUBACK, or the
                broker answered with a failure reason code.
            LocalProtocolError: ``subject`` holds a wildcard or is too long.
            BusClosed: the bus is closed.
        """
        if self._closed:
            raise BusClosed(f"the MQTT bus of client {self.config.client_id!r} is closed")
        _check_topic(subject)
        if len(payload) > _MAX_PAYLOAD_BYTES:
            raise LocalProtocolError(
                f"payload of {len(payload)} bytes for MQTT topic {subject!r} is over"
                f" {_MAX_PAYLOAD_BYTES}"
            )
        user_properties = list((headers or {}).items())
        if msg_id is not None:
            user_properties.append((MSG_ID_PROPERTY, msg_id))
        properties = _properties(PacketTypes.PUBLISH)
        if user_properties:
            properties.UserProperty = user_properties
        return await self._publisher.publish(subject, payload, properties, retain)

    @asynccontextmanager
    async def subscribe(
        self,
        subject_filter: str,
        *,
        durable: str | None = None,
        capacity: int = 64,
        latest_only: bool = False,
    ) -> AsyncIterator[Subscription]:
        """Subscribe at QoS 1 (QoS 0 when ``latest_only``); see ``Bus.subscribe``.

        ``durable`` makes it the shared subscription ``$share/<durable>/<filter>``
        kept in this client's session. Returns once the broker's SUBACK has
        arrived. The first subscription opens the subscribing connection.

        Raises:
            BusUnavailable: the subscribing connection cannot be opened or is
                down now.
            ConfigError: the broker's ACL refused the subscription.
            LocalProtocolError: bad filter, durable name or capacity, the same
                (durable, filter) already open on this bus, or the broker
                refused the filter.
        """
        if self._closed:
            raise BusClosed(f"the MQTT bus of client {self.config.client_id!r} is closed")
        _check_filter(subject_filter, durable)
        check_latest_only(durable, latest_only)
        if capacity < 1:
            raise LocalProtocolError(f"subscription capacity must be >= 1, got {capacity}")
        link = self._subscriber
        if link is None:
            link = self._subscriber = _SubscribeLink(self.config, self._tls_context)
        if link.started and not link.connected:
            raise BusUnavailable(
                f"MQTT client {link.client_id!r} is not connected to {link.where};"
                f" cannot subscribe to {subject_filter!r}"
            )
        # Registered before connecting, so that messages the session resends
        # right after CONNACK find their subscription.
        sub = link.open_subscription(subject_filter, durable, capacity, latest_only=latest_only)
        try:
            if not link.started:
                async with self._start_lock:
                    if not link.started:
                        await self._nursery.start(link.run)
            await sub.wait_confirmed()
            yield sub
        finally:
            link.close_subscription(sub, bus_closing=self._closed)

    async def wait_connected(self) -> None:
        """Wait until the bus is up: its connections, every subscription answered.

        Returns at once when it is. Lets a caller that got ``BusUnavailable``
        retry when it can succeed instead of after a guessed delay, and a
        test know that resubscriptions after a reconnect are in place.

        Raises:
            BusClosed: the bus is closed or closing.
        """
        if self._closed:
            raise BusClosed(f"the MQTT bus of client {self.config.client_id!r} is closed")
        await self._publisher.wait_connected()
        subscriber = self._subscriber
        if subscriber is not None and subscriber.started:
            await subscriber.wait_ready()

    def stats(self) -> MqttBusStats:
        """Return the bus counters now."""
        sub = self._subscriber
        return MqttBusStats(
            held=sub.held if sub is not None else 0,
            held_peak=sub.held_peak if sub is not None else 0,
            received_total=sub.received_total if sub is not None else 0,
            acks_dropped_total=sub.acks_dropped_total if sub is not None else 0,
            reconnects_total=self._publisher.reconnects_total
            + (sub.reconnects_total if sub is not None and sub is not self._publisher else 0),
        )

    async def _start(self) -> None:
        await self._nursery.start(self._publisher.run)

    async def _aclose(self) -> None:
        self._closed = True
        links: list[_Link] = [self._publisher]
        if self._subscriber is not None:
            self._subscriber.close_all()
            if self._subscriber is not self._publisher:
                links.append(self._subscriber)
        async with trio.open_nursery() as nursery:
            for link in links:
                nursery.start_soon(link.aclose)


@asynccontextmanager
async def open_mqtt_bus(config: MqttConfig) -> AsyncIterator[MqttBus]:
    """Connect to the broker and yield an ``MqttBus``; disconnect on exit.

    The publishing connection is opened here; the subscribing one (the
    persistent session named ``config.client_id``) by the first
    ``subscribe``. Both reconnect by themselves after a loss. With
    ``config.single_connection`` the session is opened here and carries both.

    Raises:
        BusUnavailable: the first connection attempt failed (refused, timed
            out, or the broker rejected the CONNECT).
        ConfigError: the TLS files cannot be loaded.

    On exit (cancellation included) it sends DISCONNECT, waiting at most a
    couple of seconds, then closes the sockets and ends its tasks.
    """
    tls_context = _tls_context(config)
    try:
        async with trio.open_nursery() as nursery:
            bus = MqttBus(config, nursery, tls_context)
            await bus._start()
            try:
                yield bus
            finally:
                with trio.CancelScope(shield=True):
                    await bus._aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps whatever the caller's block raised; give the
        # caller back its own exception when it is the only one. (except*
        # cannot re-raise a single leaf unwrapped.)
        if len(group.exceptions) == 1:
            _reraise_alone(group.exceptions[0])
        raise


def _reraise_alone(exc: BaseException) -> NoReturn:
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc
