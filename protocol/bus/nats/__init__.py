"""The NATS/JetStream bus; the one package that may import ``asyncio``, ``nats``, ``trio_asyncio``.

nats-py is an asyncio library: it runs here on a trio-asyncio loop, every call
into it crosses that bridge once per coarse operation, and only plain data
leaves the package (``bytes``, ``dict[str, str]`` headers, small frozen
records), never nats-py objects or exceptions. docs/transport.md (NATS) holds
the measured behaviour of nats-py and nats-server behind each rule.

Public surface::

    open_nats_loop()            the trio-asyncio loop; a daemon opens it once,
                                directly under trio.run
    open_nats_bus(config)       connect (bounded retry), ensure streams (and
                                their replicas), check sync_always on every
                                server, again after each reconnect; yields a
                                NatsBus
    NatsBus.publish             JetStream publish (Nats-Msg-Id dedupe) on
                                subjects a configured stream covers, else core
                                publish + flush
    NatsBus.subscribe           core subscription, or a durable pull consumer
                                with ``durable=NAME``
    NatsBus.kv_bucket(name)     -> KvBucket: get / put / update / watch
    NatsBus.object_store(name)  -> ObjectStore: put / get

Import it lazily (``fedtier.protocol.bus`` does): importing ``trio_asyncio``
switches ``asyncio.run`` to a slower loop for the whole process.
"""

from __future__ import annotations

from fedtier.protocol.bus.nats._bridge import open_nats_loop
from fedtier.protocol.bus.nats._bus import NatsBus, open_nats_bus
from fedtier.protocol.bus.nats._config import NatsConfig, StreamSpec
from fedtier.protocol.bus.nats._kv import KvBucket, KvEntry, KvWatch
from fedtier.protocol.bus.nats._objects import ObjectStore, StoredObject

__all__ = [
    "KvBucket",
    "KvEntry",
    "KvWatch",
    "NatsBus",
    "NatsConfig",
    "ObjectStore",
    "StoredObject",
    "StreamSpec",
    "open_nats_bus",
    "open_nats_loop",
]
