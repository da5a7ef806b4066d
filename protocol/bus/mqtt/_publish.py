"""The publishing connection ``<client_id>.pub``, one PUBACK event per mid; no nats, no tiers."""

from __future__ import annotations

import ssl
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


class _PublishLink(_Link):
    """The publishing connection: clean start, no session, one event per mid."""

    def __init__(self, config: MqttConfig, tls_context: ssl.SSLContext | None) -> None:
        super().__init__(
            config,
            client_id=config.client_id + _PUBLISHER_SUFFIX,
            persistent=False,
            tls_context=tls_context,
        )
        self._pending: dict[int, _PendingPublish] = {}
        self.client.on_publish = self._on_publish

    def _on_publish(
        self,
        client: Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        self._progress += 1
        pending = self._pending.pop(mid, None)
        if pending is not None:
            pending.reason = reason
            pending.done.set()

    def _before_connect(self) -> None:
        # Their callers were told the outcome is unknown and retry themselves;
        # paho resending them as well would only add duplicates.
        self.client.drop_out_messages()

    def _on_lost(self) -> None:
        for pending in self._pending.values():
            pending.lost = True
            pending.done.set()
        self._pending.clear()

    async def publish(
        self, subject: str, payload: bytes, properties: Properties, retain: bool
    ) -> PublishAck:
        if not self.connected:
            raise BusUnavailable(
                f"MQTT client {self.client_id!r} is not connected to {self.where};"
                f" cannot publish to {subject!r}"
            )
        try:
            info = self.client.publish(
                subject, payload, qos=1, retain=retain, properties=properties
            )
        except ValueError as exc:
            raise LocalProtocolError(f"cannot publish to MQTT topic {subject!r}: {exc}") from exc
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise BusUnavailable(
                f"MQTT client {self.client_id!r} lost {self.where}; cannot publish to {subject!r}"
            )
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise PublishError(
                f"MQTT client {self.client_id!r} could not queue a publish to {subject!r}:"
                f" paho error {info.rc}"
            )
        pending = self._pending[info.mid] = _PendingPublish()
        try:
            await pending.done.wait()
        finally:
            self._pending.pop(info.mid, None)
        if pending.lost:
            raise PublishError(
                f"connection of MQTT client {self.client_id!r} to {self.where} was lost before"
                f" the broker confirmed a publish to {subject!r}; retry with the same msg_id"
            )
        if pending.reason is not None and pending.reason.is_failure:
            raise PublishError(
                f"MQTT broker {self.where} refused a publish to {subject!r} from client"
                f" {self.client_id!r}: {pending.reason}"
            )
        return PublishAck(duplicate=False)
