"""Message transports behind one small trio interface; the only part of protocol that touches I/O.

Three implementations share the interface in ``_base``: MQTT v5 (paho-mqtt
driven from trio, no paho thread), NATS/JetStream (nats-py confined to one
module under trio-asyncio) and an in-memory bus for fast tests of tier logic.
One conformance suite (``tests/conformance``) runs against all three.

The adapters load lazily: importing ``trio_asyncio`` switches ``asyncio.run``
to a slower loop for the whole process, which a process that never talks to
NATS (a device, a test of tier math) should not pay for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedtier.protocol.bus._base import (
    Bus,
    Delivery,
    Flavor,
    PublishAck,
    Subscription,
    subject_matches,
)
from fedtier.protocol.bus._memory import MemoryBroker, MemoryBus
from fedtier.protocol.bus.settings import MqttSettings, parse_mqtt_settings
from fedtier.protocol.errors import KvConflict, ObjectNotFound

if TYPE_CHECKING:
    from fedtier.protocol.bus.mqtt import MqttBus, MqttConfig, open_mqtt_bus
    from fedtier.protocol.bus.nats import (
        KvBucket,
        KvEntry,
        NatsBus,
        NatsConfig,
        ObjectStore,
        StreamSpec,
        open_nats_bus,
        open_nats_loop,
    )

_LAZY = {name: "fedtier.protocol.bus.mqtt" for name in ("MqttBus", "MqttConfig", "open_mqtt_bus")}
_LAZY |= {
    name: "fedtier.protocol.bus.nats"
    for name in (
        "KvBucket",
        "KvEntry",
        "NatsBus",
        "NatsConfig",
        "ObjectStore",
        "StreamSpec",
        "open_nats_bus",
        "open_nats_loop",
    )
}

__all__ = [
    "Bus",
    "Delivery",
    "Flavor",
    "KvBucket",
    "KvConflict",
    "KvEntry",
    "MemoryBroker",
    "MemoryBus",
    "MqttBus",
    "MqttConfig",
    "MqttSettings",
    "NatsBus",
    "NatsConfig",
    "ObjectNotFound",
    "ObjectStore",
    "PublishAck",
    "StreamSpec",
    "Subscription",
    "open_mqtt_bus",
    "open_nats_bus",
    "open_nats_loop",
    "parse_mqtt_settings",
    "subject_matches",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedtier.protocol.bus' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
