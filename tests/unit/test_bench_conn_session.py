"""The connections bench's device session counts a drop only when the broker dropped it."""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio

from fedtier.protocol.errors import BusUnavailable
from fedtier.simulations.bench._conn_mqtt import MqttSession


class _ClosedStream:
    """A stream already closed by its own side: every send says so."""

    async def send_all(self, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        raise trio.ClosedResourceError("this socket was already closed")


def _session() -> MqttSession:
    return MqttSession(cast(Any, _ClosedStream()), "dev", lambda topic, payload: None)


async def test_a_send_racing_the_devices_own_close_is_no_drop() -> None:
    session = _session()
    session._closing = True  # the device is disconnecting at the end of the run
    with pytest.raises(BusUnavailable):
        await session.ping()
    assert session.lost.is_set()
    assert session.lost_reason == ""  # the bench counts no drop


async def test_a_send_on_a_connection_that_went_away_is_a_drop() -> None:
    session = _session()
    with pytest.raises(BusUnavailable):
        await session.ping()
    assert session.lost_reason.startswith("send failed: ClosedResourceError")
