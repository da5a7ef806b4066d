"""A loopback TCP proxy that resets, partitions and delays connections; imports trio only.

The chaos suite (``fedtier.simulations.chaos``) puts one between the edges and
nats-server and one between the devices and Mosquitto, so a tier's link can
fail without the processes at either end knowing why::

    client --TCP--> FaultyProxy (127.0.0.1:port) --TCP--> upstream

Each accepted connection gets its own upstream connection and two pump tasks
that forward one chunk at a time, so TCP backpressure passes through the
proxy and it never holds more than a chunk per direction. When either side
closes, both are closed. The faults:

* ``reset()``: every connection open now is closed with a TCP RST at both
  ends (``SO_LINGER`` 0), as a NAT or firewall that lost its state does.
* ``partition(duration_s)``: nothing is forwarded for ``duration_s``; what
  the ends send meanwhile is dropped, new connections wait, and at the end the
  connections that lived through it are reset (TCP gives up on a link that
  long silent). Clients notice only through their own timeouts.
* ``delay(delay_s, duration_s)``: every chunk waits ``delay_s`` before it is
  forwarded, for ``duration_s``.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import Final

import trio

__all__ = ["LOOPBACK", "FaultyProxy"]

LOOPBACK: Final = "127.0.0.1"
_CHUNK_BYTES: Final = 65_536
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


@dataclass(eq=False)
class _Pair:
    """One proxied connection: the client's stream, the upstream one, and their scope."""

    client: trio.SocketStream
    upstream: trio.SocketStream | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    reset: bool = False


class FaultyProxy:
    """A proxy from a free loopback port to ``upstream_host:upstream_port``.

    Args:
        name: its label (fault summaries).
        upstream_port: the port it forwards to.
        upstream_host: the host it forwards to.

    Attributes:
        port: the port it listens on, once ``serve`` has started.
        connections_total: connections accepted so far.
        resets_total: connections ended by ``reset`` (partitions included).
    """

    def __init__(self, name: str, upstream_port: int, upstream_host: str = LOOPBACK) -> None:
        self.name = name
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.port = 0
        self.connections_total = 0
        self.resets_total = 0
        self._pairs: set[_Pair] = set()
        self._healed = trio.Event()
        self._healed.set()
        self._delay_s = 0.0

    @property
    def open_connections(self) -> int:
        """Connections forwarded now."""
        return len(self._pairs)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and forward until cancelled; reports the port through ``task_status``."""
        listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    # -- faults ----------------------------------------------------------------------

    def reset(self) -> int:
        """Close every open connection with an RST at both ends; returns how many."""
        pairs = list(self._pairs)
        for pair in pairs:
            pair.reset = True
            pair.scope.cancel()
        self.resets_total += len(pairs)
        return len(pairs)

    async def partition(self, duration_s: float) -> None:
        """Forward nothing for ``duration_s``, then reset the connections that lived through it."""
        self._healed = trio.Event()
        try:
            await trio.sleep(duration_s)
        finally:
            # Reset first: the bytes held during the partition must never arrive.
            self.reset()
            self._healed.set()

    async def delay(self, delay_s: float, duration_s: float) -> None:
        """Hold every chunk ``delay_s`` before forwarding it, for ``duration_s``."""
        self._delay_s = delay_s
        try:
            await trio.sleep(duration_s)
        finally:
            self._delay_s = 0.0

    # -- forwarding ------------------------------------------------------------------

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections_total += 1
        pair = _Pair(client)
        try:
            # A partition holds new connections as well.
            while not self._healed.is_set():
                await self._healed.wait()
            try:
                pair.upstream = await trio.open_tcp_stream(self.upstream_host, self.upstream_port)
            except OSError:
                return  # upstream is down: the client sees its connection close
            self._pairs.add(pair)
            with pair.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, pair.upstream, pair)
                    nursery.start_soon(self._pump, pair.upstream, client, pair)
        finally:
            self._pairs.discard(pair)
            # Shielded: under cancellation the first close would raise Cancelled
            # and leave the second socket open.
            with trio.CancelScope(shield=True):
                for stream in (client, pair.upstream):
                    if stream is None:
                        continue
                    if pair.reset:
                        # OSError: the other end closed it already.
                        with contextlib.suppress(OSError):
                            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    await trio.aclose_forcefully(stream)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream, pair: _Pair) -> None:
        while True:
            try:
                data = await source.receive_some(_CHUNK_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                pair.scope.cancel()  # one end is gone: close both
                return
            while not self._healed.is_set():
                await self._healed.wait()
            if self._delay_s > 0:
                await trio.sleep(self._delay_s)
            try:
                await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pair.scope.cancel()
                return
