"""The NATS/JetStream bus under the conformance suite, against the session's nats-server."""

from __future__ import annotations

import dataclasses
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import pytest

from fedtier.simulations.testing import NatsServerProcess

if TYPE_CHECKING:
    from fedtier.protocol.bus import Bus

FACTORY_FIXTURE = "nats_bus_factory"


class NatsFactory:
    flavor = "nats"
    supports_retain = False
    dedupes_msg_id = True

    def __init__(self, server: NatsServerProcess) -> None:
        # Imported here, not at plugin load: importing trio_asyncio changes
        # asyncio.run for the whole process, so only NATS runs should do it.
        from fedtier.protocol.bus.nats import NatsConfig, StreamSpec

        self.config = NatsConfig(
            servers=(server.url,),
            monitoring_url=server.monitoring_url,
            # The bus naks what it delivered but never acked when a subscription
            # closes; that nak is best effort, and on a loaded machine it can be
            # lost. Then JetStream's contract is redelivery after ack_wait, which
            # must fall inside the suite's 20 s deadline (the default is 30 s).
            ack_wait_s=5.0,
            streams=(StreamSpec("CONF", ("conf.>",), max_age_s=3600.0, duplicate_window_s=120.0),),
        )

    def connect(self, client_id: str) -> AbstractAsyncContextManager[Bus]:
        from fedtier.protocol.bus.nats import open_nats_bus

        # open_nats_bus opens the trio-asyncio loop itself when none is open.
        return open_nats_bus(dataclasses.replace(self.config, name=client_id))

    def subject(self, *tokens: str) -> str:
        return ".".join(("conf", *tokens))

    def wildcard_rest(self, *tokens: str) -> str:
        return ".".join(("conf", *tokens, ">"))

    def wildcard_one(self, *tokens: str) -> str:
        return ".".join(("conf", *tokens))


@pytest.fixture
def nats_bus_factory(nats_server: NatsServerProcess) -> NatsFactory:
    return NatsFactory(nats_server)
