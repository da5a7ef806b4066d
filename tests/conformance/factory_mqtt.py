"""The MQTT adapter under the conformance suite, against a real Mosquitto."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from fedtier.protocol.bus import Bus
from fedtier.protocol.bus.mqtt import MqttConfig, open_mqtt_bus
from fedtier.simulations.testing import MosquittoProcess

FACTORY_FIXTURE = "mqtt_bus_factory"


class MqttFactory:
    flavor = "mqtt"
    supports_retain = True
    dedupes_msg_id = False

    def __init__(self, broker: MosquittoProcess) -> None:
        self.broker = broker

    @asynccontextmanager
    async def connect(self, client_id: str) -> AsyncIterator[Bus]:
        config = MqttConfig(host=self.broker.host, port=self.broker.port, client_id=client_id)
        async with open_mqtt_bus(config) as bus:
            yield bus

    def subject(self, *tokens: str) -> str:
        return "/".join(("conf", *tokens))

    def wildcard_rest(self, *tokens: str) -> str:
        return "/".join(("conf", *tokens, "#"))

    def wildcard_one(self, *tokens: str) -> str:
        return "/".join(("conf", *("+" if t == "*" else t for t in tokens)))


@pytest.fixture
def mqtt_bus_factory(mosquitto: MosquittoProcess) -> MqttFactory:
    return MqttFactory(mosquitto)
