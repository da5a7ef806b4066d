"""The fault-injecting TCP proxy of the chaos suite, against a loopback echo server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from fedtier.simulations.testing import LOOPBACK, FaultyProxy


class Echo:
    """An upstream that echoes and remembers everything it received."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    self.received += data
                    await stream.send_all(data)
            except trio.BrokenResourceError:
                pass  # reset by the proxy: what the tests do


@asynccontextmanager
async def proxied() -> AsyncIterator[tuple[Echo, FaultyProxy, trio.SocketStream]]:
    async with trio.open_nursery() as nursery:
        echo = Echo()
        await nursery.start(echo.serve)
        proxy = FaultyProxy("test", echo.port)
        await nursery.start(proxy.serve)
        client = await trio.open_tcp_stream(LOOPBACK, proxy.port)
        try:
            yield echo, proxy, client
        finally:
            await trio.aclose_forcefully(client)
            nursery.cancel_scope.cancel()


async def drain(stream: trio.SocketStream) -> None:
    """Read until the connection ends; an orderly end of stream is a test failure."""
    while True:
        assert await stream.receive_some(100) != b"", "closed without a reset"


async def test_bytes_go_through_both_ways() -> None:
    with trio.fail_after(10):
        async with proxied() as (echo, proxy, client):
            await client.send_all(b"hello")
            assert await client.receive_some(100) == b"hello"
            assert proxy.open_connections == 1
            assert bytes(echo.received) == b"hello"


async def test_reset_ends_the_connection_with_an_error() -> None:
    with trio.fail_after(10):
        async with proxied() as (_echo, proxy, client):
            await client.send_all(b"ping")
            assert await client.receive_some(100) == b"ping"
            assert proxy.reset() == 1
            with pytest.raises(trio.BrokenResourceError):
                await drain(client)  # an RST, not an orderly end of stream
            assert proxy.resets_total == 1


async def test_partition_drops_what_is_sent_then_resets() -> None:
    with trio.fail_after(10):
        async with proxied() as (echo, proxy, client):
            await client.send_all(b"before")
            assert await client.receive_some(100) == b"before"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(proxy.partition, 0.3)
                await wait_all_tasks_blocked()
                await client.send_all(b"lost")
            with pytest.raises(trio.BrokenResourceError):
                await drain(client)
            assert bytes(echo.received) == b"before"
            # The link is back for new connections.
            again = await trio.open_tcp_stream(LOOPBACK, proxy.port)
            await again.send_all(b"after")
            assert await again.receive_some(100) == b"after"
            await again.aclose()


async def test_upstream_down_closes_the_client() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            with trio.socket.socket() as probe:
                await probe.bind((LOOPBACK, 0))
                dead_port = probe.getsockname()[1]
            proxy = FaultyProxy("test", dead_port)
            await nursery.start(proxy.serve)
            client = await trio.open_tcp_stream(LOOPBACK, proxy.port)
            assert await client.receive_some(100) == b""
            await client.aclose()
            nursery.cancel_scope.cancel()
