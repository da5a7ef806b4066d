"""Message transports behind one small trio interface; the only part of protocol that touches I/O.

Three implementations share the interface in ``_base``: MQTT v5 (paho-mqtt
driven from trio, no paho thread), NATS/JetStream (nats-py confined to one
module under trio-asyncio) and an in-memory bus for fast tests of tier logic.
One conformance suite (``tests/conformance``) runs against all three.
"""

from __future__ import annotations

from protocol.bus._base import (
    Bus,
    Delivery,
    Flavor,
    PublishAck,
    Subscription,
    subject_matches,
)
from protocol.bus._memory import MemoryBroker, MemoryBus

__all__ = [
    "Bus",
    "Delivery",
    "Flavor",
    "MemoryBroker",
    "MemoryBus",
    "PublishAck",
    "Subscription",
    "subject_matches",
]
