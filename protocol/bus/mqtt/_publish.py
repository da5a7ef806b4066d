"""QoS 1 publishes, one PUBACK event per mid, and the ``<client_id>.pub`` link; no nats or tiers."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from paho.mqtt.client import Client
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedtier.protocol.bus._base import PublishAck
from fedtier.protocol.bus.mqtt._config import MqttConfig
from fedtier.protocol.bus.mqtt._connection import _Link
from fedtier.protocol.errors import BusUnavailable, LocalProtocolError, PublishError

_PUBLISHER_SUFFIX: Final = ".pub"


@dataclass(slots=True)
class _PendingPublish:
    done: trio.Event = field(default_factory=trio.Event)
    reason: ReasonCode | None = None
    lost: bool = False


class _Publisher:
    """The publishes of one link waiting for their PUBACK, one event per mid.

    Shared by the dedicated publishing link and the single link of a device
    (``MqttConfig(single_connection=True)``), which reads PUBACKs on the same
    connection as its deliveries.
    """

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.pending: dict[int, _PendingPublish] = {}

    def on_puback(self, mid: int, reason: ReasonCode) -> None:
        pending = self.pending.pop(mid, None)
        if pending is not None:
            pending.reason = reason
            pending.done.set()

    def drop_unsent(self) -> None:
        # Their callers were told the outcome is unknown and retry themselves;
        # paho resending them as well would only add duplicates.
        self.link.client.drop_out_messages()

    def lost(self) -> None:
        for pending in self.pending.values():
            pending.lost = True
            pending.done.set()
        self.pending.clear()

    async def publish(
        self,
        subject: str,
        payload: bytes,
        properties: Properties,
        retain: bool,
        *,
        on_queued: Callable[[], None] | None = None,
    ) -> PublishAck:
        link = self.link
        if not link.connected:
            raise BusUnavailable(
                f"MQTT client {link.client_id!r} is not connected to {link.where};"
                f" cannot publish to {subject!r}"
            )
        try:
            info = link.client.publish(
                subject, payload, qos=1, retain=retain, properties=properties
            )
        except ValueError as exc:
            raise LocalProtocolError(f"cannot publish to MQTT topic {subject!r}: {exc}") from exc
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise BusUnavailable(
                f"MQTT client {link.client_id!r} lost {link.where}; cannot publish to {subject!r}"
            )
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise PublishError(
                f"MQTT client {link.client_id!r} could not queue a publish to {subject!r}:"
                f" paho error {info.rc}"
            )
        pending = self.pending[info.mid] = _PendingPublish()
        if on_queued is not None:
            on_queued()
        try:
            await pending.done.wait()
        finally:
            self.pending.pop(info.mid, None)
        if pending.lost:
            raise PublishError(
                f"connection of MQTT client {link.client_id!r} to {link.where} was lost before"
                f" the broker confirmed a publish to {subject!r}; retry with the same msg_id"
            )
        if pending.reason is not None and pending.reason.is_failure:
            raise PublishError(
                f"MQTT broker {link.where} refused a publish to {subject!r} from client"
                f" {link.client_id!r}: {pending.reason}"
            )
        return PublishAck(duplicate=False)


class _PubackHook(_Link):
    """A link that publishes: each PUBACK counts as progress and settles its publish."""

    _publisher: _Publisher

    def _on_publish(
        self,
        client: Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        self._progress += 1
        self._publisher.on_puback(mid, reason)


class _PublishLink(_PubackHook):
    """The publishing connection: clean start, no session, one event per mid."""

    def __init__(self, config: MqttConfig, tls_context: ssl.SSLContext | None) -> None:
        super().__init__(
            config,
            client_id=config.client_id + _PUBLISHER_SUFFIX,
            persistent=False,
            tls_context=tls_context,
        )
        self._publisher = _Publisher(self)
        self.client.on_publish = self._on_publish

    def _before_connect(self) -> None:
        self._publisher.drop_unsent()

    def _on_lost(self) -> None:
        self._publisher.lost()

    async def publish(
        self, subject: str, payload: bytes, properties: Properties, retain: bool
    ) -> PublishAck:
        return await self._publisher.publish(subject, payload, properties, retain)
