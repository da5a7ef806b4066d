"""The single connection of a device (``MqttConfig(single_connection=True)``); no nats, no tiers.

A broker that binds the client id to the certificate (Mosquitto's
``use_username_as_clientid``) gives both connections of a two-connection bus
the same id, and each CONNECT then disconnects the other. So a device speaks
over one connection: its persistent session, which also carries its
publishes.

Why this cannot deadlock. On one connection the broker writes deliveries and
PUBACKs into the same stream, and the reader is the only thing that takes them
out. The two-connection bus separates them because its reader parks while a
subscription is full, and a consumer that waits for its own PUBACK before
draining would then wait forever (``docs/transport.md``). This link never
parks its reader while a PUBACK or a SUBACK is awaited, so every PUBACK is
read as soon as it arrives, whatever the subscriptions hold; ``receive()``
still hands out at most ``capacity`` unacknowledged deliveries per
subscription. What the reader takes meanwhile is what the broker has in
flight to this client: QoS 1 deliveries up to the Receive Maximum it
announced (``MqttConfig.receive_maximum``; Mosquitto 2.0.11 releases more in
bursts only as acks go out, ``docs/transport.md``), and QoS 0 ones
(``latest_only`` subscriptions, the model topics), of which a subscription
past its capacity keeps the newest per topic: only the newest value matters.
For a device the QoS 1 traffic is its receipts, one per update it sent, so
what can pile up is bounded by its own sends. Its consumers never wait on a
publish anyway (they record and ack), so their backpressure only ever delays
reading, as on the subscribing connection of a tier.
"""

from __future__ import annotations

import ssl

from paho.mqtt.properties import Properties

from fedtier.protocol.bus._base import PublishAck
from fedtier.protocol.bus.mqtt._config import MqttConfig
from fedtier.protocol.bus.mqtt._publish import _PubackHook, _Publisher
from fedtier.protocol.bus.mqtt._subscription import _MqttSubscription, _SubscribeLink


class _SingleLink(_SubscribeLink, _PubackHook):
    """The persistent session ``<client_id>``, subscribing and publishing."""

    def __init__(self, config: MqttConfig, tls_context: ssl.SSLContext | None) -> None:
        super().__init__(config, tls_context)
        self._publisher = _Publisher(self)
        self.client.on_publish = self._on_publish

    def _before_connect(self) -> None:
        super()._before_connect()
        self._publisher.drop_unsent()

    def _on_lost(self) -> None:
        super()._on_lost()
        self._publisher.lost()

    def _read_allowed(self) -> bool:
        # An awaited PUBACK or SUBACK is always read (see the module docstring).
        if self._publisher.pending or self._suback_waiters:
            return True
        return super()._read_allowed()

    def _send_subscribe(self, sub: _MqttSubscription) -> None:
        super()._send_subscribe(sub)
        self._gate.unpark_all()

    async def publish(
        self, subject: str, payload: bytes, properties: Properties, retain: bool
    ) -> PublishAck:
        return await self._publisher.publish(
            subject, payload, properties, retain, on_queued=self._wake_reader
        )

    def _wake_reader(self) -> None:
        # A reader parked on a full subscription must now read the PUBACK.
        self._gate.unpark_all()
