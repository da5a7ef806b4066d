"""The in-memory bus under the conformance suite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from fedtier.protocol.bus import Bus, MemoryBroker, MemoryBus

FACTORY_FIXTURE = "memory_bus_factory"


class MemoryFactory:
    flavor = "nats"
    supports_retain = True
    dedupes_msg_id = True

    def __init__(self) -> None:
        self.broker = MemoryBroker("nats")

    @asynccontextmanager
    async def connect(self, client_id: str) -> AsyncIterator[Bus]:
        bus = MemoryBus(self.broker)
        try:
            yield bus
        finally:
            bus.close()

    def subject(self, *tokens: str) -> str:
        return ".".join(("conf", *tokens))

    def wildcard_rest(self, *tokens: str) -> str:
        return ".".join(("conf", *tokens, ">"))

    def wildcard_one(self, *tokens: str) -> str:
        return ".".join(("conf", *tokens))


@pytest.fixture
def memory_bus_factory() -> MemoryFactory:
    return MemoryFactory()
