"""One paho client driven from trio, connect to keepalive; must not import nats or tiers.

``_Link`` owns the paho external-loop hooks, the reader, writer and keepalive
tasks, connect and reconnect with jittered backoff, and the connection
generation that acks are checked against.

The rules it follows (callbacks only record, the writer asks ``want_write()``,
``notify_closing`` only inside our trio run, the lifecycle follows
``on_socket_close``, ``reconnect()`` in a worker thread, ``sock.pending()``
under TLS) are the paho facts in ``docs/transport.md`` (MQTT).
"""

from __future__ import annotations

import logging
import random
import ssl
from typing import TYPE_CHECKING, Any, Final

import trio
from paho.mqtt.client import (
    MQTT_CLEAN_START_FIRST_ONLY,
    MQTT_LOG_ERR,
    Client,
    ConnectFlags,
    DisconnectFlags,
    MQTTv5,
)
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fedtier.protocol.bus.mqtt._config import MqttConfig
from fedtier.protocol.bus.mqtt._wire import _properties
from fedtier.protocol.errors import BusClosed, BusUnavailable

if TYPE_CHECKING:
    # Defined only for type checkers in paho.
    from paho.mqtt.client import SocketLike

# One logger for the whole MQTT transport, whichever private module logs.
logger = logging.getLogger("fedtier.protocol.bus.mqtt")

# loop_read() handles about one packet per call: loop it per wakeup, the
# measured sweet spot (docs/transport.md: 12.6k msg/s against 9.1k with paho's thread).
_READS_PER_WAKEUP: Final = 32
# Bound on the graceful DISCONNECT at close; the socket is closed anyway after.
_DISCONNECT_TIMEOUT_S: Final = 2.0


class _ConnectFailed(Exception):
    """One connect attempt failed; carries the sentence to log or raise."""


class _Link:
    """One paho client driven from trio: connect, reconnect with backoff, read, write, keepalive.

    Subclasses add what the connection is for (publishing or subscribing)
    through the ``_on_*`` and ``_read_*`` hooks.
    """

    def __init__(
        self,
        config: MqttConfig,
        *,
        client_id: str,
        persistent: bool,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.where = f"{config.host}:{config.port}"
        # The broker's Maximum Packet Size from the last CONNACK (MQTT v5,
        # section 3.2.2.3.6); None when it announced none (the protocol's cap).
        self.max_packet_size: int | None = None
        client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTv5,
            manual_ack=persistent,
        )
        client.connect_timeout = config.connect_timeout_s
        if config.username is not None:
            client.username_pw_set(config.username, config.password)
        if tls_context is not None:
            client.tls_set_context(tls_context)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        properties = _properties(PacketTypes.CONNECT)
        if persistent:
            properties.SessionExpiryInterval = config.session_expiry_s
            properties.ReceiveMaximum = config.receive_maximum
        # connect_async() only records where to go; every attempt, the first
        # included, is a reconnect() in a worker thread. clean_start=False is
        # explicit: paho's default wipes the session at each process start.
        client.connect_async(
            config.host,
            config.port,
            keepalive=config.keepalive_s,
            clean_start=(
                MQTT_CLEAN_START_FIRST_ONLY
                if persistent and config.fresh_session
                else not persistent
            ),
            properties=properties,
        )
        self.client = client
        self.generation = 0
        self.connected = False
        self.started = False
        self.reconnects_total = 0
        self._closing = False
        self._token: trio.lowlevel.TrioToken | None = None
        self._connected_event = trio.Event()
        self._stopped = trio.Event()
        self._session_over = trio.Event()
        self._write_wanted = trio.Event()
        self._connack: tuple[ReasonCode, bool] | None = None
        self._connack_seen = trio.Event()
        self._disconnect_reason: str = "socket closed"
        # The first error paho logged while connecting (a TLS alert such as
        # "certificate required" is only ever logged: paho's loop_read()
        # turns it into a plain connection loss).
        self._connect_error: str | None = None
        # Bumped by every callback; a loop_read() that bumps nothing read no
        # whole packet, so the reader stops looping and waits for the socket.
        self._progress = 0

    # -- paho callbacks: they run inside loop_*() or in the reconnect worker
    # thread, so they only touch plain state and never call loop_*().

    def _in_our_run(self) -> bool:
        # on_socket_* may fire in the reconnect worker thread, or from
        # Client.__del__ after trio has exited (maybe inside a later run).
        return (
            self._token is not None
            and trio.lowlevel.in_trio_run()
            and trio.lowlevel.current_trio_token() is self._token
        )

    def _on_socket_open(self, client: Client, userdata: Any, sock: SocketLike) -> None:
        # The session tasks read client.socket() after reconnect() returns.
        pass

    def _on_socket_close(self, client: Client, userdata: Any, sock: SocketLike) -> None:
        if self._in_our_run():
            # Wake any task waiting on this socket before paho closes it, or
            # it would wait forever on a dead file descriptor.
            trio.lowlevel.notify_closing(sock)
            self._session_over.set()
            self._connack_seen.set()

    def _on_socket_register_write(self, client: Client, userdata: Any, sock: SocketLike) -> None:
        if self._in_our_run():
            self._write_wanted.set()

    def _on_socket_unregister_write(self, client: Client, userdata: Any, sock: SocketLike) -> None:
        # The writer asks want_write() itself.
        pass

    def _on_connect(
        self,
        client: Client,
        userdata: Any,
        flags: ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._progress += 1
        self._connack = (reason, flags.session_present)
        announced = getattr(properties, "MaximumPacketSize", None)
        self.max_packet_size = announced if isinstance(announced, int) else None
        self._connack_seen.set()

    def _on_disconnect(
        self,
        client: Client,
        userdata: Any,
        flags: DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._progress += 1
        origin = "broker" if flags.is_disconnect_packet_from_server else "client"
        self._disconnect_reason = f"{reason} ({origin})"

    def _on_connect_log(self, client: Client, userdata: Any, level: int, message: str) -> None:
        # Installed only until CONNACK: paho formats every log line for an
        # on_log callback, too costly on the message path.
        if level == MQTT_LOG_ERR and self._connect_error is None:
            self._connect_error = message

    # -- hooks for subclasses

    def _before_connect(self) -> None:
        """Run in the trio thread just before each connect attempt."""

    def _on_connected(self, session_present: bool) -> None:
        """Run once CONNACK accepted a connection."""

    def _on_lost(self) -> None:
        """Run once a connection that was up has gone."""

    def _read_allowed(self) -> bool:
        return True

    async def _wait_read_allowed(self) -> None:
        await trio.lowlevel.checkpoint()

    def _after_read(self) -> None:
        """Handle what the last loop_read() recorded."""

    # -- lifecycle

    async def wait_connected(self) -> None:
        """Wait until the connection is up (returns at once when it is).

        Raises:
            BusClosed: the connection is being closed.
        """
        while not self.connected:
            if self._closing:
                raise BusClosed(f"MQTT client {self.client_id!r} is closed")
            await self._connected_event.wait()
        await trio.lowlevel.checkpoint()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, then keep the connection up until cancelled or closed.

        ``task_status.started()`` is called once the first CONNACK accepted
        the connection; a failure before that raises ``BusUnavailable``.
        Later losses are retried with jittered exponential backoff, each retry
        logged.
        """
        self._token = trio.lowlevel.current_trio_token()
        self._stopped = trio.Event()
        delay_s = self.config.reconnect_backoff_min_s
        attempt = 0
        try:
            while not self._closing:
                attempt += 1
                try:
                    await self._serve_connection(None if self.started else task_status)
                except _ConnectFailed as exc:
                    if not self.started:
                        raise BusUnavailable(str(exc)) from exc.__cause__
                    retry_in_s = delay_s * (0.5 + random.random() / 2)  # noqa: S311 (jitter)
                    logger.warning(
                        "mqtt reconnect failed: broker=%s client_id=%s attempt=%d retry_in_s=%.2f"
                        " error=%s",
                        self.where,
                        self.client_id,
                        attempt,
                        retry_in_s,
                        exc,
                    )
                    await trio.sleep(retry_in_s)
                    delay_s = min(delay_s * 2, self.config.reconnect_backoff_max_s)
                    continue
                # The connection was up and has gone: try again at once, the
                # broker is usually back within milliseconds of a restart.
                attempt = 0
                delay_s = self.config.reconnect_backoff_min_s
                if not self._closing:
                    self.reconnects_total += 1
                    logger.warning(
                        "mqtt connection lost: broker=%s client_id=%s generation=%d reason=%s",
                        self.where,
                        self.client_id,
                        self.generation,
                        self._disconnect_reason,
                    )
        finally:
            self.connected = False
            self._force_close()
            # Idempotent; a cancelled session skipped it, and waiting
            # publishers must not outlive the connection.
            self._on_lost()
            # Wake wait_connected() callers; they see _closing and raise.
            self._connected_event.set()
            self._connected_event = trio.Event()
            self._stopped.set()

    async def _serve_connection(self, task_status: trio.TaskStatus[None] | None) -> None:
        """One connection: connect, serve until the socket closes.

        Raises:
            _ConnectFailed: no accepted CONNACK; nothing was served.
        """
        self._before_connect()
        self._connack = None
        self._connack_seen = trio.Event()
        self._session_over = trio.Event()
        self._disconnect_reason = "socket closed"
        self._connect_error = None
        self.client.on_log = self._on_connect_log
        try:
            # reconnect() blocks up to connect_timeout and cannot be
            # interrupted; cancellation waits for it, then cleans up.
            await trio.to_thread.run_sync(self.client.reconnect)
        except (OSError, ValueError) as exc:
            raise _ConnectFailed(
                f"cannot connect MQTT client {self.client_id!r} to {self.where}: {exc}"
            ) from exc
        sock = self.client.socket()
        if sock is None:
            raise _ConnectFailed(f"MQTT client {self.client_id!r} got no socket to {self.where}")
        self.generation += 1
        refused: str | None = None
        async with trio.open_nursery() as session:
            session.start_soon(self._reader, sock)
            session.start_soon(self._writer, sock)
            with trio.move_on_after(self.config.connect_timeout_s):
                await self._connack_seen.wait()
            connack = self._connack_result()
            self.client.on_log = None
            if connack is None or connack[0].is_failure or self._session_over.is_set():
                reason = self._refusal_reason(connack)
                refused = (
                    f"MQTT broker {self.where} did not accept client {self.client_id!r}: {reason}"
                )
                session.cancel_scope.cancel()
            else:
                self.connected = True
                self._connected_event.set()
                logger.info(
                    "mqtt connected: broker=%s client_id=%s generation=%d session_present=%s",
                    self.where,
                    self.client_id,
                    self.generation,
                    connack[1],
                )
                self._on_connected(connack[1])
                session.start_soon(self._keepalive)
                if task_status is not None:
                    self.started = True
                    task_status.started()
                await self._session_over.wait()
                session.cancel_scope.cancel()
        if refused is not None:
            self._force_close()
            raise _ConnectFailed(refused)
        self.connected = False
        self._connected_event = trio.Event()
        self._on_lost()

    def _refusal_reason(self, connack: tuple[ReasonCode, bool] | None) -> str:
        if connack is not None:
            return f"CONNACK {connack[0]}"
        if not self._session_over.is_set():
            return "no CONNACK in time"
        # Under TLS 1.3 a broker that rejects the client certificate does so
        # after the handshake, so it looks like a connection closed early.
        detail = self._connect_error or self._disconnect_reason
        return f"connection closed before CONNACK ({detail})"

    def _connack_result(self) -> tuple[ReasonCode, bool] | None:
        # A method call, so the type checker does not assume the None set
        # before the await still holds: on_connect set it meanwhile.
        return self._connack

    def _force_close(self) -> None:
        """Close the socket now, in the trio thread, with no task left waiting on it."""
        if self.client.socket() is not None:
            # paho has no public close for an external loop; connect_async()
            # and reconnect() call this same method. Its on_socket_close
            # callback runs notify_closing first.
            self.client._sock_close()

    async def aclose(self) -> None:
        """Disconnect politely when connected; bounded by ``_DISCONNECT_TIMEOUT_S``.

        The caller cancels ``run`` afterwards, which closes whatever is left.
        """
        self._closing = True
        if self.connected and self.client.socket() is not None:
            # DISCONNECT is queued behind any PUBACKs; paho closes the socket
            # once it is written, which ends the session and run().
            self.client.disconnect()
            with trio.move_on_after(_DISCONNECT_TIMEOUT_S):
                await self._stopped.wait()

    # -- session tasks

    async def _reader(self, sock: SocketLike) -> None:
        client = self.client
        try:
            while client.socket() is sock:
                await self._wait_read_allowed()
                if client.socket() is not sock:
                    # Closed while parked (no waiter for notify_closing to wake).
                    return
                if not _tls_pending(sock):
                    await trio.lowlevel.wait_readable(sock)
                for _ in range(_READS_PER_WAKEUP):
                    if not self._read_allowed():
                        break
                    before = self._progress
                    rc = client.loop_read()
                    self._after_read()
                    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        # paho has closed the socket; on_socket_close woke run().
                        return
                    if self._progress == before and not _tls_pending(sock):
                        break
        except trio.ClosedResourceError:
            return

    async def _writer(self, sock: SocketLike) -> None:
        client = self.client
        try:
            while client.socket() is sock:
                if client.want_write():
                    await trio.lowlevel.wait_writable(sock)
                    if client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        return
                else:
                    # publish()/ack()/subscribe() fire on_socket_register_write
                    # only on the False->True edge, so the loop asks
                    # want_write() itself and the event is just a wake-up.
                    self._write_wanted = trio.Event()
                    await self._write_wanted.wait()
        except trio.ClosedResourceError:
            return

    async def _keepalive(self) -> None:
        # MQTT keepalive is time-driven: paho sends PINGREQ and detects a
        # missing PINGRESP in loop_misc(), which must therefore tick.
        interval_s = max(0.5, min(self.config.keepalive_s / 4, 5.0))
        while True:
            await trio.sleep(interval_s)
            self.client.loop_misc()


def _tls_pending(sock: SocketLike) -> bool:
    # Decrypted bytes can wait in the SSL object while the fd is not readable.
    pending = getattr(sock, "pending", None)
    return pending is not None and bool(pending())
