"""A minimal asynchronous MQTT v5 client for the connections bench; must not import tiers or paho.

Ten thousand paho clients need ten thousand threads; this client is a few
objects and two trio tasks' worth of state per session, so one process holds
thousands. It speaks only what a device of the bench needs: CONNECT/CONNACK
(persistent session: clean start off, a session expiry), SUBSCRIBE/SUBACK at
QoS 1, PUBLISH QoS 1 both ways with PUBACK, PINGREQ/PINGRESP and DISCONNECT.
No QoS 2, no topic aliases, no authentication packets, no will. It is a load
generator, not a product client: the devices of the product use paho through
``fedtier.protocol.bus.mqtt``.

The caller runs ``MqttSession.run`` (the reader) in a task next to the work
that calls ``publish``; a session whose connection ends, for any reason other
than its own ``disconnect``, sets ``lost`` and wakes every waiter with
``BusUnavailable``, the one error of this client: the connection is gone,
or never came up.
"""

from __future__ import annotations

import contextlib
import ssl
import struct
from collections.abc import Callable
from typing import Final

import trio

from fedtier.protocol.errors import BusUnavailable

__all__ = ["MqttSession", "connect_session"]

_CONNECT: Final = 0x10
_CONNACK: Final = 0x20
_PUBLISH: Final = 0x30
_PUBACK: Final = 0x40
_SUBSCRIBE: Final = 0x82  # the reserved flags of SUBSCRIBE are 0b0010
_SUBACK: Final = 0x90
_PINGREQ: Final = b"\xc0\x00"
_PINGRESP: Final = 0xD0
_DISCONNECT: Final = 0xE0
_PROP_SESSION_EXPIRY: Final = 0x11
_PROP_RECEIVE_MAXIMUM: Final = 0x21
_RECEIVE_BYTES: Final = 65_536
_MAX_PACKET_BYTES: Final = 16 * 1024 * 1024
# What closing an already broken connection may raise.
_CLOSE_ERRORS: Final = (BusUnavailable, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _read_varint(data: bytes | bytearray, at: int) -> tuple[int, int] | None:
    """(value, next offset) of the variable byte integer at ``at``; None while incomplete."""
    value = shift = 0
    for i in range(4):
        if at + i >= len(data):
            return None
        byte = data[at + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at + i + 1
        shift += 7
    raise BusUnavailable("malformed remaining length from the broker")


class MqttSession:
    """One connected MQTT v5 session; made by ``connect_session``.

    Attributes:
        client_id: the session's client id.
        session_present: the CONNACK's flag (a resumed persistent session).
        lost: set once the connection ended, or ``disconnect`` closed it.
        lost_reason: why it ended (empty after a clean ``disconnect``).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        client_id: str,
        on_message: Callable[[str, bytes], None],
    ) -> None:
        self.client_id = client_id
        self.session_present = False
        self.lost = trio.Event()
        self.lost_reason = ""
        self._stream = stream
        self._on_message = on_message
        self._buffer = bytearray()
        self._send_lock = trio.Lock()
        self._next_id = 0
        # Packet id -> (event, reason code), for PUBACK and SUBACK.
        self._waiting: dict[int, tuple[trio.Event, list[int]]] = {}
        self._closing = False
        self.last_send = trio.current_time()

    def _packet_id(self) -> int:
        for _ in range(65_535):
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id not in self._waiting:
                return self._next_id
        raise BusUnavailable("no free packet id")  # 65,535 in flight: cannot happen here

    async def _send(self, data: bytes) -> None:
        if self.lost.is_set():
            raise BusUnavailable(self.lost_reason or "disconnected")
        try:
            async with self._send_lock:
                await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # A send racing this client's own close (a keepalive ping as the
            # device disconnects at the end) is no drop, as on the receive side.
            self._lose("" if self._closing else f"send failed: {exc!r}")
            raise BusUnavailable(self.lost_reason or "closed") from exc
        self.last_send = trio.current_time()

    async def _read_packet(self) -> tuple[int, bytes]:
        buffer = self._buffer
        while True:
            if len(buffer) >= 2:
                parsed = _read_varint(buffer, 1)
                if parsed is not None:
                    length, start = parsed
                    if length > _MAX_PACKET_BYTES:
                        raise BusUnavailable(f"packet of {length} bytes from the broker")
                    if len(buffer) >= start + length:
                        first = buffer[0]
                        body = bytes(buffer[start : start + length])
                        del buffer[: start + length]
                        return first, body
            data = await self._stream.receive_some(_RECEIVE_BYTES)
            if not data:
                raise BusUnavailable("the broker closed the connection")
            buffer += data

    async def _await_ack(self, packet_id: int, data: bytes) -> int:
        event, code = trio.Event(), [-1]
        self._waiting[packet_id] = (event, code)
        try:
            await self._send(data)
            await event.wait()
        finally:
            self._waiting.pop(packet_id, None)
        if self.lost.is_set() and code[0] < 0:
            raise BusUnavailable(self.lost_reason or "disconnected")
        return code[0]

    async def subscribe(self, topic_filter: str) -> int:
        """Subscribe at QoS 1; returns the SUBACK reason code (1: granted QoS 1).

        Raises:
            BusUnavailable: the connection ended first.
        """
        packet_id = self._packet_id()
        body = struct.pack("!H", packet_id) + b"\x00" + _string(topic_filter) + b"\x01"
        return await self._await_ack(packet_id, _packet(_SUBSCRIBE, body))

    async def publish(self, topic: str, payload: bytes, *, dup: bool = False) -> int:
        """Publish at QoS 1 and wait for the PUBACK; returns its reason code (0: success).

        Raises:
            BusUnavailable: the connection ended first.
        """
        packet_id = self._packet_id()
        body = _string(topic) + struct.pack("!H", packet_id) + b"\x00" + payload
        return await self._await_ack(packet_id, _packet(_PUBLISH | 0x02 | (8 if dup else 0), body))

    async def ping(self) -> None:
        """Send a PINGREQ (the PINGRESP is read, and ignored, by ``run``)."""
        await self._send(_PINGREQ)

    async def disconnect(self) -> None:
        """Send DISCONNECT (normal) and close; the broker keeps the session."""
        self._closing = True
        if not self.lost.is_set():
            with trio.move_on_after(5), contextlib.suppress(*_CLOSE_ERRORS):
                await self._send(_packet(_DISCONNECT, b"\x00\x00"))
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection at once (no DISCONNECT)."""
        self._closing = True
        with contextlib.suppress(*_CLOSE_ERRORS):
            await trio.aclose_forcefully(self._stream)
        self._lose("")

    def _lose(self, reason: str) -> None:
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        for event, _ in self._waiting.values():
            event.set()

    async def run(self) -> None:
        """Read until the connection ends: deliveries to ``on_message`` (acknowledged), acks."""
        try:
            while True:
                first, body = await self._read_packet()
                kind = first & 0xF0
                if kind == _PUBLISH:
                    await self._take_publish(first, body)
                elif kind in (_PUBACK, _SUBACK & 0xF0):
                    packet_id = struct.unpack_from("!H", body)[0]
                    waiter = self._waiting.get(packet_id)
                    if waiter is not None:
                        # PUBACK: no reason code when the length is 2 (success).
                        # SUBACK: packet id, properties, then one reason code.
                        if kind == _PUBACK:
                            waiter[1][0] = body[2] if len(body) > 2 else 0
                        else:
                            props = _read_varint(body, 2)
                            waiter[1][0] = body[props[1] + props[0]] if props else 0x80
                        waiter[0].set()
                elif kind == _DISCONNECT:
                    code = body[0] if body else 0
                    raise BusUnavailable(f"the broker sent DISCONNECT with reason 0x{code:02x}")
                elif kind != _PINGRESP:
                    raise BusUnavailable(f"unexpected packet type 0x{first:02x} from the broker")
        except BusUnavailable as exc:
            self._lose("" if self._closing else str(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._lose("" if self._closing else f"receive failed: {exc!r}")

    async def _take_publish(self, first: int, body: bytes) -> None:
        topic_length = struct.unpack_from("!H", body)[0]
        topic = body[2 : 2 + topic_length].decode()
        at = 2 + topic_length
        qos = (first >> 1) & 0x03
        packet_id = None
        if qos:
            packet_id = struct.unpack_from("!H", body, at)[0]
            at += 2
        props = _read_varint(body, at)
        if props is None:
            raise BusUnavailable("malformed PUBLISH from the broker")
        self._on_message(topic, body[props[1] + props[0] :])
        if packet_id is not None:
            await self._send(_packet(_PUBACK, struct.pack("!H", packet_id)))


async def connect_session(
    host: str,
    port: int,
    client_id: str,
    on_message: Callable[[str, bytes], None],
    *,
    ssl_context: ssl.SSLContext | None,
    keepalive_s: int,
    session_expiry_s: int,
    receive_maximum: int = 16,
    timeout_s: float = 30.0,
) -> MqttSession:
    """Open TCP (and TLS), send CONNECT with clean start off, and wait for a successful CONNACK.

    Raises:
        BusUnavailable: the connection failed, timed out, or the broker refused it.
    """
    stream: trio.abc.Stream | None = None
    try:
        with trio.fail_after(timeout_s):
            tcp = await trio.open_tcp_stream(host, port)
            stream = tcp
            if ssl_context is not None:
                tls = trio.SSLStream(tcp, ssl_context, server_hostname=host)
                stream = tls
                await tls.do_handshake()
            session = MqttSession(stream, client_id, on_message)
            props = (
                bytes([_PROP_SESSION_EXPIRY])
                + struct.pack("!I", session_expiry_s)
                + bytes([_PROP_RECEIVE_MAXIMUM])
                + struct.pack("!H", receive_maximum)
            )
            # Protocol name, level 5, flags 0 (clean start off, no will, no user), keepalive.
            variable = _string("MQTT") + b"\x05\x00" + struct.pack("!H", keepalive_s)
            body = variable + _varint(len(props)) + props + _string(client_id)
            await session._send(_packet(_CONNECT, body))
            first, reply = await session._read_packet()
    except (trio.TooSlowError, OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise BusUnavailable(f"connect failed: {exc!r}") from exc
    except BusUnavailable:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise
    if first & 0xF0 != _CONNACK or len(reply) < 2 or reply[1] != 0:
        await trio.aclose_forcefully(stream)
        code = reply[1] if first & 0xF0 == _CONNACK and len(reply) >= 2 else None
        raise BusUnavailable(
            f"the broker refused the connection (packet 0x{first:02x}, code {code})"
        )
    session.session_present = bool(reply[0] & 1)
    return session
