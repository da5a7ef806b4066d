"""The MQTT adapter on one connection (a device's bus) under the conformance suite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from fedtier.protocol.bus import Bus
from fedtier.protocol.bus.mqtt import MqttConfig, open_mqtt_bus
from fedtier.simulations.testing import MosquittoProcess
from tests.conformance.factory_mqtt import MqttFactory

FACTORY_FIXTURE = "mqtt_single_bus_factory"


class MqttSingleFactory(MqttFactory):
    @asynccontextmanager
    async def connect(self, client_id: str) -> AsyncIterator[Bus]:
        config = MqttConfig(
            host=self.broker.host,
            port=self.broker.port,
            client_id=client_id,
            single_connection=True,
        )
        async with open_mqtt_bus(config) as bus:
            yield bus


@pytest.fixture
def mqtt_single_bus_factory(mosquitto: MosquittoProcess) -> MqttSingleFactory:
    return MqttSingleFactory(mosquitto)
