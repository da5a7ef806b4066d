"""The MQTT v5 bus (paho-mqtt driven from trio, no paho thread); must not import nats or tiers.

``open_mqtt_bus(MqttConfig(...))`` yields an ``MqttBus``. It speaks MQTT v5 at
QoS 1 through paho's external-loop hooks: one trio task reads (``loop_read``
many times per wakeup, honouring ``sock.pending()`` under TLS), one writes
(``loop_write`` while ``want_write()``), one ticks ``loop_misc`` for keepalive,
and one drives connect and reconnect with backoff (blocking ``reconnect()``
in ``trio.to_thread``), woken by ``on_socket_close``. Paho callbacks only
record into plain state; trio tasks do everything else
(``docs/transport.md`` (MQTT)).

Two connections per bus
    A subscription at capacity must stop the socket being read (backpressure
    that reaches the broker), and on one MQTT connection that would also stop
    the PUBACKs of this bus's own publishes: Mosquitto writes a delivery to a
    subscriber before the PUBACK to the publisher, so a bus that publishes
    into its own full subscription deadlocks (the conformance test
    ``test_capacity_bounds_unacknowledged_deliveries`` does exactly that). So
    publishes go over ``<client_id>.pub`` (clean start, no session, opened
    with the bus) and subscriptions over ``<client_id>`` (persistent session:
    ``clean_start=False``, ``SessionExpiryInterval``, ``ReceiveMaximum``,
    ``manual_ack``; opened by the first ``subscribe``).

Subscriptions
    ``durable=None`` is a plain subscription, unsubscribed when its context
    exits. ``durable="name"`` is the shared subscription
    ``$share/<name>/<filter>``, kept in the session across disconnects and
    process restarts, so several daemons (distinct client ids, same durable
    name) share the load; it is subscribed again at every reconnect (see the
    restart fact below). ``MqttConfig(shared_durables=False)`` makes a durable
    an exclusive subscription of this client's session instead: one consumer
    per filter, but nothing lost across a broker restart. Each subscription
    carries an MQTT v5 subscription
    identifier derived from (durable, filter), so a message (including one
    redelivered into a new process before it has subscribed) is routed to
    exactly one subscription even when filters overlap: Mosquitto sends one
    copy per matching subscription, each with its own identifier. Odd
    identifiers are durable; a message for a durable subscription that is not
    open is held (bounded by ``receive_maximum``) until it is; a message for a
    closed plain subscription is acknowledged and dropped. One bus cannot open
    the same broker subscription twice at once.

Acknowledgement and backpressure
    Each message read from the broker holds a slot until ``Delivery.ack()``.
    The reader reads only while every open subscription has a free slot
    (``capacity``) and the connection holds fewer than ``receive_maximum``;
    otherwise it parks and TCP pushes back to the broker (needed because
    Mosquitto stops honouring Receive Maximum once acks arrive in order). A
    full subscription therefore also delays the other subscriptions of the
    same bus and their SUBACKs. A parked reader answers no keepalive ping:
    keep ``keepalive_s`` above the longest consumer stall. Deliveries are
    tagged with the connection generation; an ack from an older generation is
    dropped (paho would queue it on a dead socket, and mids are reused after a
    resume) and the broker redelivers the message with DUP=1, seen as
    ``redelivered=True``. ``publish`` waits for the PUBACK of its own mid; a
    connection lost first raises ``PublishError`` and the message is not
    resent by paho (the caller retries with the same ``msg_id``, which travels
    in the user property ``ft-msg-id``; MQTT has no dedupe).

What Mosquitto 2.0.11 does (measured here, loopback)
    * Shared subscriptions and persistent sessions: an offline member of a
      share group keeps its round-robin share. With members A (online) and B
      (offline, persistent), 10 messages went 5 to A and 5 queued for B, which
      got them on reconnect. Unacknowledged in-flight messages of a member that
      disconnects stay in its session and come back to it with DUP=1; they are
      not handed to the other members. A lone offline member gets everything.
      So sharing is static round-robin without failover: a daemon must come
      back with the same client id, or its share waits until its session
      expires and is then dropped (end-to-end resends from devices cover it).
    * After a broker restart (kill -9 or SIGTERM, ``persistence true``) the
      session resumes (``session_present``) and its queued and in-flight
      messages come back, but its shared subscriptions route nothing new
      until subscribed again; plain subscriptions work at once. A SUBSCRIBE
      after the reconnect fixes it (one copy, no duplicates), so what is
      published between the restart and the resubscription (about 0.1 s
      when the daemon is up) reaches no member and is lost at the broker,
      although its publisher got a PUBACK. End-to-end resends (no receipt)
      must cover it, or use exclusive durables.
    * Retained messages are never sent to shared subscriptions.
    * Subscription identifiers survive a resume and a kill -9 + restart (with
      ``persistence true``), on in-flight (DUP) and queued messages alike.
    * Only sessions whose last CONNECT had ``clean_start=0`` are written to
      the persistence file; a session created with clean start and an expiry
      lives in memory only. This module always connects its session with
      ``clean_start=False``.
    * Receive Maximum is honoured until the first in-order ack, then released
      in bursts (acking the oldest of 3 released 3 more).
    * Messages are written to the persistence file only on the autosave
      timer or at shutdown: ``autosave_on_changes`` counts subscription
      changes, persistent connects and acknowledgements, not new messages.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import logging
import os
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NoReturn

import trio
from paho.mqtt.client import (
    MQTT_LOG_ERR,
    Client,
    ConnectFlags,
    DisconnectFlags,
    MQTTMessage,
    MQTTv5,
)
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedtier.protocol.bus._base import (
    Bus,
    Delivery,
    Flavor,
    PublishAck,
    Subscription,
    subject_matches,
)
from fedtier.protocol.errors import (
    BusClosed,
    BusUnavailable,
    ConfigError,
    LocalProtocolError,
    PublishError,
)

if TYPE_CHECKING:
    # Defined only for type checkers in paho.
    from paho.mqtt.client import SocketLike

__all__ = ["MSG_ID_PROPERTY", "MqttBus", "MqttBusStats", "MqttConfig", "open_mqtt_bus"]

logger = logging.getLogger(__name__)

MSG_ID_PROPERTY: Final = "ft-msg-id"
"""User property that carries ``publish(msg_id=...)``."""

_PUBLISHER_SUFFIX: Final = ".pub"
# loop_read() handles about one packet per call: loop it per wakeup, the
# measured sweet spot (notes: 12.6k msg/s against 9.1k with paho's thread).
_READS_PER_WAKEUP: Final = 32
# Bound on the graceful DISCONNECT at close; the socket is closed anyway after.
_DISCONNECT_TIMEOUT_S: Final = 2.0
_MAX_SUBSCRIPTION_ID: Final = 268_435_455
_MAX_TOPIC_BYTES: Final = 65_535
_MAX_PAYLOAD_BYTES: Final = 268_435_455
_NOT_AUTHORIZED: Final = 0x87


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """How to reach one MQTT v5 broker.

    Attributes:
        host: broker host name or address.
        port: broker TCP port.
        client_id: names the persistent session; the same id resumes it. The
            publishing connection uses ``<client_id>.pub``.
        keepalive_s: MQTT keepalive; keep it above the longest consumer stall.
        session_expiry_s: how long the broker keeps the session (subscriptions,
            unacknowledged and queued messages) after a disconnect.
        receive_maximum: most unacknowledged deliveries this process holds on
            the subscribing connection (also sent as Receive Maximum).
        connect_timeout_s: TCP/TLS connect and CONNACK deadline per attempt.
        reconnect_backoff_min_s: first delay between reconnect attempts.
        reconnect_backoff_max_s: cap of the doubling delay.
        ca_file: CA bundle that signs the broker certificate; enables TLS.
        cert_file: client certificate (PEM); enables TLS.
        key_file: client private key, when not inside ``cert_file``.
        username: optional user name.
        password: optional password (needs ``username``).
        shared_durables: True (the default): ``durable=name`` subscribes
            ``$share/<name>/<filter>`` so several clients share the load.
            False: an exclusive subscription in this client's session (one
            consumer, but no loss window when the broker restarts; see the
            module docstring).
    """

    host: str
    port: int
    client_id: str
    keepalive_s: int = 60
    session_expiry_s: int = 3600
    receive_maximum: int = 64
    connect_timeout_s: float = 5.0
    reconnect_backoff_min_s: float = 0.1
    reconnect_backoff_max_s: float = 10.0
    ca_file: str | os.PathLike[str] | None = None
    cert_file: str | os.PathLike[str] | None = None
    key_file: str | os.PathLike[str] | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    shared_durables: bool = True

    def __post_init__(self) -> None:
        where = f"MQTT client {self.client_id!r} for {self.host}:{self.port}"
        checks = [
            (bool(self.host), "host is empty"),
            (1 <= self.port <= 65_535, f"port {self.port} is outside 1..65535"),
            (bool(self.client_id), "client_id is empty"),
            (0 <= self.keepalive_s <= 65_535, f"keepalive_s {self.keepalive_s} not in 0..65535"),
            (
                1 <= self.session_expiry_s <= 0xFFFF_FFFF,
                f"session_expiry_s {self.session_expiry_s} is outside 1..4294967295",
            ),
            (
                1 <= self.receive_maximum <= 65_535,
                f"receive_maximum {self.receive_maximum} is outside 1..65535",
            ),
            (self.connect_timeout_s > 0, f"connect_timeout_s {self.connect_timeout_s} is not > 0"),
            (
                0 < self.reconnect_backoff_min_s <= self.reconnect_backoff_max_s,
                f"reconnect backoff {self.reconnect_backoff_min_s}"
                f"..{self.reconnect_backoff_max_s} s is not 0 < min <= max",
            ),
            (
                self.key_file is None or self.cert_file is not None,
                "key_file is set without cert_file",
            ),
            (
                self.password is None or self.username is not None,
                "password is set without username",
            ),
        ]
        for ok, problem in checks:
            if not ok:
                raise ConfigError(f"{where}: {problem}")

    @property
    def uses_tls(self) -> bool:
        """True when a CA bundle or a client certificate is configured."""
        return self.ca_file is not None or self.cert_file is not None


@dataclass(frozen=True, slots=True)
class MqttBusStats:
    """Counters of one ``MqttBus``, for telemetry and tests.

    Attributes:
        held: messages read from the broker and not yet acknowledged, now.
        held_peak: the most ``held`` has been.
        received_total: messages read from the broker.
        acks_dropped_total: acks not sent because their connection had ended.
        reconnects_total: connections re-established after a loss.
    """

    held: int
    held_peak: int
    received_total: int
    acks_dropped_total: int
    reconnects_total: int


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
            clean_start=not persistent,
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


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves it untyped


def _tls_pending(sock: SocketLike) -> bool:
    # Decrypted bytes can wait in the SSL object while the fd is not readable.
    pending = getattr(sock, "pending", None)
    return pending is not None and bool(pending())


@dataclass(slots=True)
class _PendingPublish:
    done: trio.Event = field(default_factory=trio.Event)
    reason: ReasonCode | None = None
    lost: bool = False


class _PublishLink(_Link):
    """The publishing connection: clean start, no session, one event per mid."""

    def __init__(self, config: MqttConfig, tls_context: ssl.SSLContext | None) -> None:
        super().__init__(
            config,
            client_id=config.client_id + _PUBLISHER_SUFFIX,
            persistent=False,
            tls_context=tls_context,
        )
        self._pending: dict[int, _PendingPublish] = {}
        self.client.on_publish = self._on_publish

    def _on_publish(
        self,
        client: Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        self._progress += 1
        pending = self._pending.pop(mid, None)
        if pending is not None:
            pending.reason = reason
            pending.done.set()

    def _before_connect(self) -> None:
        # Their callers were told the outcome is unknown and retry themselves;
        # paho resending them as well would only add duplicates.
        self.client.drop_out_messages()

    def _on_lost(self) -> None:
        for pending in self._pending.values():
            pending.lost = True
            pending.done.set()
        self._pending.clear()

    async def publish(
        self, subject: str, payload: bytes, properties: Properties, retain: bool
    ) -> PublishAck:
        if not self.connected:
            raise BusUnavailable(
                f"MQTT client {self.client_id!r} is not connected to {self.where};"
                f" cannot publish to {subject!r}"
            )
        try:
            info = self.client.publish(
                subject, payload, qos=1, retain=retain, properties=properties
            )
        except ValueError as exc:
            raise LocalProtocolError(f"cannot publish to MQTT topic {subject!r}: {exc}") from exc
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise BusUnavailable(
                f"MQTT client {self.client_id!r} lost {self.where}; cannot publish to {subject!r}"
            )
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise PublishError(
                f"MQTT client {self.client_id!r} could not queue a publish to {subject!r}:"
                f" paho error {info.rc}"
            )
        pending = self._pending[info.mid] = _PendingPublish()
        try:
            await pending.done.wait()
        finally:
            self._pending.pop(info.mid, None)
        if pending.lost:
            raise PublishError(
                f"connection of MQTT client {self.client_id!r} to {self.where} was lost before"
                f" the broker confirmed a publish to {subject!r}; retry with the same msg_id"
            )
        if pending.reason is not None and pending.reason.is_failure:
            raise PublishError(
                f"MQTT broker {self.where} refused a publish to {subject!r} from client"
                f" {self.client_id!r}: {pending.reason}"
            )
        return PublishAck(duplicate=False)


@dataclass(slots=True, eq=False)
class _Held:
    """One message read from the broker and not yet acknowledged."""

    seq: int
    mid: int
    qos: int
    generation: int
    sub_id: int | None
    subject: str
    payload: bytes
    headers: dict[str, str]
    redelivered: bool
    retained: bool
    owner: _MqttSubscription | None = None
    live: bool = True


class _MqttSubscription(Subscription):
    """One open subscription on the subscribing connection."""

    def __init__(
        self,
        link: _SubscribeLink,
        sub_id: int,
        subject_filter: str,
        durable: str | None,
        capacity: int,
    ) -> None:
        self.link = link
        self.sub_id = sub_id
        self.subject_filter = subject_filter
        self.durable = durable
        self.capacity = capacity
        self.shared = durable is not None and link.config.shared_durables
        self.wire_filter = f"$share/{durable}/{subject_filter}" if self.shared else subject_filter
        self.queue: deque[_Held] = deque()
        self.outstanding: set[_Held] = set()
        self.closed = False
        self.confirmed = trio.Event()
        self.refused: ReasonCode | None = None
        self.subscribe_sent = False
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def held(self) -> int:
        return len(self.queue) + len(self.outstanding)

    def push(self, held: _Held) -> None:
        held.owner = self
        self.queue.append(held)
        self._lot.unpark_all()

    def wake(self) -> None:
        self._lot.unpark_all()

    async def receive(self) -> Delivery:
        """Wait for the next delivery; see ``Subscription.receive``.

        Cancellation loses nothing: a delivery is taken only when returned.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        parked = False
        while True:
            if self.closed:
                raise BusClosed(
                    f"subscription {self.wire_filter!r} of MQTT client"
                    f" {self.link.client_id!r} is closed"
                )
            if self.queue:
                break
            await self._lot.park()
            parked = True
        held = self.queue.popleft()
        self.outstanding.add(held)
        if not parked:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return Delivery(
            subject=held.subject,
            payload=held.payload,
            headers=held.headers,
            redelivered=held.redelivered,
            retained=held.retained,
            _ack=functools.partial(self.link.ack, held),
        )

    async def wait_confirmed(self) -> None:
        await self.confirmed.wait()
        reason = self.refused
        if reason is None:
            return
        what = (
            f"MQTT broker {self.link.where} refused subscription {self.wire_filter!r}"
            f" of client {self.link.client_id!r}: {reason}"
        )
        if reason.value == _NOT_AUTHORIZED:
            raise ConfigError(what + "; check the broker ACL")
        raise LocalProtocolError(what)


class _SubscribeLink(_Link):
    """The subscribing connection: persistent session, manual acks, backpressure."""

    def __init__(self, config: MqttConfig, tls_context: ssl.SSLContext | None) -> None:
        super().__init__(
            config, client_id=config.client_id, persistent=True, tls_context=tls_context
        )
        self.subs: dict[int, _MqttSubscription] = {}
        self.orphans: deque[_Held] = deque()
        self.held = 0
        self.held_peak = 0
        self.received_total = 0
        self.acks_dropped_total = 0
        self._inbox: deque[MQTTMessage] = deque()
        self._suback_waiters: dict[int, _MqttSubscription] = {}
        self._gate = trio.lowlevel.ParkingLot()
        self._ready = trio.lowlevel.ParkingLot()
        self._seq = itertools.count()
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = self._on_unsubscribe

    # -- paho callbacks (inside loop_read: record only)

    def _on_message(self, client: Client, userdata: Any, message: MQTTMessage) -> None:
        # Never route or send here: an exception escaping a callback makes
        # paho handle the same packet again on the next loop_read().
        self._progress += 1
        self._inbox.append(message)

    def _on_subscribe(
        self,
        client: Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._progress += 1
        sub = self._suback_waiters.pop(mid, None)
        if sub is not None:
            if reason_codes and reason_codes[0].is_failure:
                sub.refused = reason_codes[0]
            sub.confirmed.set()
        if not self._suback_waiters:
            self._ready.unpark_all()

    def _on_unsubscribe(
        self,
        client: Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        self._progress += 1

    # -- link hooks

    def _on_connected(self, session_present: bool) -> None:
        for sub in self.subs.values():
            # A resumed session still has every confirmed subscription; a new
            # one (broker restarted without it, or expired) has none. Shared
            # ones are sent every time: Mosquitto 2.0.11 resumes the session
            # after a restart but routes nothing to its shared subscriptions
            # until they are subscribed again.
            if not session_present or sub.shared or not sub.confirmed.is_set():
                self._send_subscribe(sub)
        self._ready.unpark_all()

    def _on_lost(self) -> None:
        # Their mids meant something on the old connection only; unconfirmed
        # subscriptions are sent again by _on_connected.
        self._suback_waiters.clear()

    async def wait_ready(self) -> None:
        """Wait until connected with every SUBSCRIBE of this connection answered."""
        await trio.lowlevel.checkpoint()
        while not (self.connected and not self._suback_waiters):
            if self._closing:
                raise BusClosed(f"MQTT client {self.client_id!r} is closed")
            await self._ready.park()

    def _read_allowed(self) -> bool:
        if self._connack is None:
            # Until CONNACK is read nothing else can be: never park before it.
            return True
        if self.held >= self.config.receive_maximum:
            return False
        return all(sub.held < sub.capacity for sub in self.subs.values())

    async def _wait_read_allowed(self) -> None:
        await trio.lowlevel.checkpoint()
        while not self._read_allowed():
            await self._gate.park()

    def _after_read(self) -> None:
        while self._inbox:
            self._route(self._inbox.popleft())

    # -- routing and acknowledgement

    def _route(self, message: MQTTMessage) -> None:
        props = message.properties
        ids = getattr(props, "SubscriptionIdentifier", None) or []
        sub_id: int | None = ids[0] if ids else None
        self.received_total += 1
        held = _Held(
            seq=next(self._seq),
            mid=message.mid,
            qos=message.qos,
            generation=self.generation,
            sub_id=sub_id,
            subject=message.topic,
            payload=bytes(message.payload),
            headers=dict(getattr(props, "UserProperty", None) or []),
            redelivered=bool(message.dup),
            retained=bool(message.retain),
        )
        sub = self.subs.get(sub_id) if sub_id is not None else self._match_by_topic(held.subject)
        if sub is None and sub_id is not None and not _is_durable_id(sub_id):
            # A plain subscription closed already (or left in the session by a
            # process that crashed): nobody here wants it.
            self._ack_on_wire(held)
            return
        self.held += 1
        self.held_peak = max(self.held_peak, self.held)
        if sub is None:
            self.orphans.append(held)
        else:
            sub.push(held)

    def _match_by_topic(self, subject: str) -> _MqttSubscription | None:
        # Only for a broker that drops subscription identifiers.
        for sub in self.subs.values():
            if subject_matches(sub.subject_filter, subject, "mqtt"):
                return sub
        return None

    def _ack_on_wire(self, held: _Held) -> None:
        if held.qos == 0:
            return
        if self.connected and held.generation == self.generation:
            self.client.ack(held.mid, held.qos)
        else:
            # The broker will redeliver it on this connection with DUP=1;
            # sending the old mid now could ack another message.
            self.acks_dropped_total += 1
            logger.debug(
                "mqtt ack dropped: client_id=%s mid=%d generation=%d current_generation=%d",
                self.client_id,
                held.mid,
                held.generation,
                self.generation,
            )

    def _release(self, count: int) -> None:
        self.held -= count
        self._gate.unpark_all()

    async def ack(self, held: _Held) -> None:
        """Acknowledge one delivery (``Delivery.ack``); later calls do nothing."""
        if held.live:
            held.live = False
            if held.owner is not None:
                held.owner.outstanding.discard(held)
            self._release(1)
            self._ack_on_wire(held)
        await trio.lowlevel.checkpoint()

    # -- subscriptions

    def open_subscription(
        self, subject_filter: str, durable: str | None, capacity: int
    ) -> _MqttSubscription:
        sub_id = _subscription_id(subject_filter, durable)
        sub = _MqttSubscription(self, sub_id, subject_filter, durable, capacity)
        for other in self.subs.values():
            if other.sub_id == sub_id or other.wire_filter == sub.wire_filter:
                # The broker keeps one subscription per filter and client.
                raise LocalProtocolError(
                    f"MQTT client {self.client_id!r} already has subscription"
                    f" {other.wire_filter!r} open; a bus opens each broker subscription once"
                )
        self.subs[sub_id] = sub
        kept: deque[_Held] = deque()
        for held in self.orphans:
            if held.sub_id == sub_id or (
                held.sub_id is None and subject_matches(subject_filter, held.subject, "mqtt")
            ):
                sub.push(held)
            else:
                kept.append(held)
        self.orphans = kept
        if self.connected:
            self._send_subscribe(sub)
        return sub

    def _send_subscribe(self, sub: _MqttSubscription) -> None:
        # Retained messages on the first SUBSCRIBE only: a resubscription
        # after a reconnect must not replay them.
        options = SubscribeOptions(
            qos=1,
            retainHandling=(
                SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
                if sub.subscribe_sent
                else SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
            ),
        )
        properties = _properties(PacketTypes.SUBSCRIBE)
        properties.SubscriptionIdentifier = sub.sub_id
        rc, mid = self.client.subscribe(sub.wire_filter, options=options, properties=properties)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            sub.subscribe_sent = True
            self._suback_waiters[mid] = sub

    def close_subscription(self, sub: _MqttSubscription, *, bus_closing: bool = False) -> None:
        """Close ``sub`` now (no await: it runs in ``finally`` blocks).

        A durable subscription's unacknowledged messages stay in this process,
        marked redelivered, for the next open of the same durable; a plain one
        acknowledges and drops them and unsubscribes.
        """
        if sub.closed:
            return
        sub.closed = True
        sub.wake()
        self.subs.pop(sub.sub_id, None)
        for mid in [m for m, s in self._suback_waiters.items() if s is sub]:
            del self._suback_waiters[mid]
        self._ready.unpark_all()
        items = sorted([*sub.outstanding, *sub.queue], key=lambda h: h.seq)
        sub.outstanding.clear()
        sub.queue.clear()
        for held in items:
            held.live = False
        if sub.durable is not None:
            if bus_closing:
                self._release(len(items))
            else:
                self.orphans.extend(
                    dataclasses.replace(held, owner=None, live=True, redelivered=True)
                    for held in items
                )
        else:
            for held in items:
                self._ack_on_wire(held)
            self._release(len(items))
            if self.connected:
                self.client.unsubscribe(sub.wire_filter)
        self._gate.unpark_all()

    def close_all(self) -> None:
        self._closing = True
        self._ready.unpark_all()
        for sub in list(self.subs.values()):
            self.close_subscription(sub, bus_closing=True)
        self._release(len(self.orphans))
        self.orphans.clear()


def _subscription_id(subject_filter: str, durable: str | None) -> int:
    """A stable MQTT subscription identifier for (durable, filter); odd when durable.

    Stable so that messages a broker stored under it (in-flight or queued)
    reach the same subscription in a later process.
    """
    key = f"d\0{durable}\0{subject_filter}" if durable is not None else f"p\0{subject_filter}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    n = int.from_bytes(digest, "big") % (_MAX_SUBSCRIPTION_ID // 2)
    return 2 * n + (1 if durable is not None else 2)


def _is_durable_id(sub_id: int) -> bool:
    return sub_id % 2 == 1


def _check_topic(subject: str) -> None:
    if not subject or "+" in subject or "#" in subject or "\0" in subject:
        raise LocalProtocolError(
            f"cannot publish to MQTT topic {subject!r}: it must be non-empty, without wildcards"
        )
    if len(subject.encode()) > _MAX_TOPIC_BYTES:
        raise LocalProtocolError(f"MQTT topic {subject[:40]!r}... is over {_MAX_TOPIC_BYTES} bytes")


def _check_filter(subject_filter: str, durable: str | None) -> None:
    problem = None
    levels = subject_filter.split("/")
    if not subject_filter or "\0" in subject_filter:
        problem = "it is empty or holds NUL"
    elif subject_filter.startswith("$share/"):
        problem = "pass durable=<group> instead of a $share/ prefix"
    elif len(subject_filter.encode()) > _MAX_TOPIC_BYTES:
        problem = f"it is over {_MAX_TOPIC_BYTES} bytes"
    elif any("+" in level and level != "+" for level in levels):
        problem = "'+' must fill a whole level"
    elif any("#" in level for level in levels[:-1]) or ("#" in levels[-1] and levels[-1] != "#"):
        problem = "'#' must be the whole last level"
    elif durable is not None and (not durable or any(c in durable for c in "/+#\0")):
        problem = f"durable name {durable!r} must be non-empty without '/', '+', '#'"
    if problem is not None:
        raise LocalProtocolError(f"cannot subscribe to MQTT filter {subject_filter!r}: {problem}")


def _tls_context(config: MqttConfig) -> ssl.SSLContext | None:
    if not config.uses_tls:
        return None
    try:
        context = ssl.create_default_context(cafile=config.ca_file)
        if config.cert_file is not None:
            context.load_cert_chain(config.cert_file, config.key_file)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the TLS files of MQTT client {config.client_id!r}"
            f" for {config.host}:{config.port}: {exc}"
        ) from exc
    return context


class MqttBus(Bus):
    """A bus over one MQTT v5 broker; open it with ``open_mqtt_bus``."""

    flavor: Flavor = "mqtt"

    def __init__(
        self,
        config: MqttConfig,
        nursery: trio.Nursery,
        tls_context: ssl.SSLContext | None,
    ) -> None:
        self.config = config
        self._nursery = nursery
        self._tls_context = tls_context
        self._publisher = _PublishLink(config, tls_context)
        self._subscriber: _SubscribeLink | None = None
        self._start_lock = trio.Lock()
        self._closed = False

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
        retain: bool = False,
    ) -> PublishAck:
        """Publish at QoS 1 and wait for the PUBACK; see ``Bus.publish``.

        Headers become MQTT v5 user properties in order; ``msg_id`` is added
        as the user property ``ft-msg-id``. MQTT has no dedupe, so the ack
        never says ``duplicate``.

        Raises:
            BusUnavailable: the publishing connection is down now.
            PublishError: the connection was lost before the PUBACK, or the
                broker answered with a failure reason code.
            LocalProtocolError: ``subject`` holds a wildcard or is too long.
            BusClosed: the bus is closed.
        """
        if self._closed:
            raise BusClosed(f"the MQTT bus of client {self.config.client_id!r} is closed")
        _check_topic(subject)
        if len(payload) > _MAX_PAYLOAD_BYTES:
            raise LocalProtocolError(
                f"payload of {len(payload)} bytes for MQTT topic {subject!r} is over"
                f" {_MAX_PAYLOAD_BYTES}"
            )
        user_properties = list((headers or {}).items())
        if msg_id is not None:
            user_properties.append((MSG_ID_PROPERTY, msg_id))
        properties = _properties(PacketTypes.PUBLISH)
        if user_properties:
            properties.UserProperty = user_properties
        return await self._publisher.publish(subject, payload, properties, retain)

    @asynccontextmanager
    async def subscribe(
        self,
        subject_filter: str,
        *,
        durable: str | None = None,
        capacity: int = 64,
    ) -> AsyncIterator[Subscription]:
        """Subscribe at QoS 1; see ``Bus.subscribe``.

        ``durable`` makes it the shared subscription ``$share/<durable>/<filter>``
        kept in this client's session. Returns once the broker's SUBACK has
        arrived. The first subscription opens the subscribing connection.

        Raises:
            BusUnavailable: the subscribing connection cannot be opened or is
                down now.
            ConfigError: the broker's ACL refused the subscription.
            LocalProtocolError: bad filter, durable name or capacity, the same
                (durable, filter) already open on this bus, or the broker
                refused the filter.
        """
        if self._closed:
            raise BusClosed(f"the MQTT bus of client {self.config.client_id!r} is closed")
        _check_filter(subject_filter, durable)
        if capacity < 1:
            raise LocalProtocolError(f"subscription capacity must be >= 1, got {capacity}")
        link = self._subscriber
        if link is None:
            link = self._subscriber = _SubscribeLink(self.config, self._tls_context)
        if link.started and not link.connected:
            raise BusUnavailable(
                f"MQTT client {link.client_id!r} is not connected to {link.where};"
                f" cannot subscribe to {subject_filter!r}"
            )
        # Registered before connecting, so that messages the session resends
        # right after CONNACK find their subscription.
        sub = link.open_subscription(subject_filter, durable, capacity)
        try:
            if not link.started:
                async with self._start_lock:
                    if not link.started:
                        await self._nursery.start(link.run)
            await sub.wait_confirmed()
            yield sub
        finally:
            link.close_subscription(sub, bus_closing=self._closed)

    async def wait_connected(self) -> None:
        """Wait until the bus is up: both connections, every subscription answered.

        Returns at once when it is. Lets a caller that got ``BusUnavailable``
        retry when it can succeed instead of after a guessed delay, and a
        test know that resubscriptions after a reconnect are in place.

        Raises:
            BusClosed: the bus is closed or closing.
        """
        if self._closed:
            raise BusClosed(f"the MQTT bus of client {self.config.client_id!r} is closed")
        await self._publisher.wait_connected()
        subscriber = self._subscriber
        if subscriber is not None and subscriber.started:
            await subscriber.wait_ready()

    def stats(self) -> MqttBusStats:
        """Return the bus counters now."""
        sub = self._subscriber
        return MqttBusStats(
            held=sub.held if sub is not None else 0,
            held_peak=sub.held_peak if sub is not None else 0,
            received_total=sub.received_total if sub is not None else 0,
            acks_dropped_total=sub.acks_dropped_total if sub is not None else 0,
            reconnects_total=self._publisher.reconnects_total
            + (sub.reconnects_total if sub is not None else 0),
        )

    async def _start(self) -> None:
        await self._nursery.start(self._publisher.run)

    async def _aclose(self) -> None:
        self._closed = True
        links: list[_Link] = [self._publisher]
        if self._subscriber is not None:
            self._subscriber.close_all()
            links.append(self._subscriber)
        async with trio.open_nursery() as nursery:
            for link in links:
                nursery.start_soon(link.aclose)


@asynccontextmanager
async def open_mqtt_bus(config: MqttConfig) -> AsyncIterator[MqttBus]:
    """Connect to the broker and yield an ``MqttBus``; disconnect on exit.

    The publishing connection is opened here; the subscribing one (the
    persistent session named ``config.client_id``) by the first
    ``subscribe``. Both reconnect by themselves after a loss.

    Raises:
        BusUnavailable: the first connection attempt failed (refused, timed
            out, or the broker rejected the CONNECT).
        ConfigError: the TLS files cannot be loaded.

    On exit (cancellation included) it sends DISCONNECT, waiting at most a
    couple of seconds, then closes the sockets and ends its tasks.
    """
    tls_context = _tls_context(config)
    try:
        async with trio.open_nursery() as nursery:
            bus = MqttBus(config, nursery, tls_context)
            await bus._start()
            try:
                yield bus
            finally:
                with trio.CancelScope(shield=True):
                    await bus._aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery wraps whatever the caller's block raised; give the
        # caller back its own exception when it is the only one. (except*
        # cannot re-raise a single leaf unwrapped.)
        if len(group.exceptions) == 1:
            _reraise_alone(group.exceptions[0])
        raise


def _reraise_alone(exc: BaseException) -> NoReturn:
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc
