"""A durable MQTT subscription resumed with a backlog larger than its capacity (real Mosquitto).

An edge whose lease went to another instance for a while, or that was down
longer than ``capacity`` deliveries take to arrive, reconnects to a session
the broker kept filling: the backlog arrives ahead of the SUBACK. The
subscription must still open and deliver everything, not park the reader at
its capacity with the SUBACK unread (the edge then served nothing and was
dropped at every keepalive; found by ``fedtier sim chaos --topology ha``).
"""

from __future__ import annotations

import uuid

import pytest
import trio

from fedtier.protocol.bus.mqtt import open_mqtt_bus
from fedtier.simulations.testing import MosquittoProcess
from tests.integration.test_mqtt_bus import config_for

pytestmark = pytest.mark.brokers


async def test_a_backlog_beyond_capacity_does_not_block_the_resumed_subscription(
    fresh_mosquitto: MosquittoProcess,
) -> None:
    broker = fresh_mosquitto
    topic, client = f"bk-{uuid.uuid4().hex[:8]}", f"edge-{uuid.uuid4().hex[:8]}"
    pattern = f"it/{topic}/#"
    payloads = [b"m%d" % i for i in range(40)]
    with trio.fail_after(60):
        # The session and its subscription stay on the broker after this closes.
        async with open_mqtt_bus(config_for(broker, client, shared=False)) as bus:
            async with bus.subscribe(pattern, durable="edge", capacity=4):
                pass
        async with open_mqtt_bus(config_for(broker, f"pub-{client}", shared=False)) as publisher:
            for payload in payloads:
                await publisher.publish(f"it/{topic}/u", payload)
        async with (
            open_mqtt_bus(config_for(broker, client, shared=False)) as bus,
            bus.subscribe(pattern, durable="edge", capacity=4) as sub,
        ):
            received = []
            for _ in payloads:
                delivery = await sub.receive()
                received.append(delivery.payload)
                await delivery.ack()
    assert sorted(received) == sorted(payloads)
