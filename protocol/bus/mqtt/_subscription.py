"""The subscribing connection: subscriptions, deliveries, acks, backpressure; no nats, no tiers.

Routing by subscription identifier, held messages for durables not yet open,
generation-tagged acks and the parked reader follow the rules in
``docs/transport.md`` (MQTT).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import trio
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedtier.protocol.bus._base import Delivery, Subscription, subject_matches
from fedtier.protocol.bus.mqtt._config import MqttConfig
from fedtier.protocol.bus.mqtt._connection import _Link
from fedtier.protocol.bus.mqtt._wire import _is_durable_id, _properties, _subscription_id
from fedtier.protocol.errors import BusClosed, ConfigError, LocalProtocolError

# One logger for the whole MQTT transport, whichever private module logs.
logger = logging.getLogger("fedtier.protocol.bus.mqtt")

_NOT_AUTHORIZED: Final = 0x87


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
        latest_only: bool = False,
    ) -> None:
        self.link = link
        self.sub_id = sub_id
        self.latest_only = latest_only
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
        if self.latest_only and held.qos == 0 and len(self.queue) >= self.capacity:
            # Only reachable on a single connection, whose reader reads on past
            # capacity while it awaits a PUBACK (``_single``): only the newest
            # value of a topic matters, so the oldest queued one of this topic
            # (else the oldest of all) makes room. QoS 0: nothing to ack.
            unacked = [old for old in self.queue if old.qos == 0]
            same = [old for old in unacked if old.subject == held.subject]
            dropped = same[0] if same else (unacked[0] if unacked else None)
            if dropped is not None:
                self.queue.remove(dropped)
                dropped.live = False
                self.link.dropped_latest_total += 1
                self.link._release(1)
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
            # The outstanding check matters on a single connection only, whose
            # queue may outgrow the capacity while a PUBACK is awaited.
            if self.queue and len(self.outstanding) < self.capacity:
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
        # latest_only messages replaced by a newer one before being read.
        self.dropped_latest_total = 0
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
            # until they are subscribed again. A latest_only one is sent every
            # time too: at QoS 0 the broker kept nothing while we were away,
            # and the SUBSCRIBE brings the topic's retained (newest) value.
            if not session_present or sub.shared or sub.latest_only or not sub.confirmed.is_set():
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
        if self._suback_waiters:
            # A resumed session's backlog arrives ahead of the SUBACK: parking at
            # a full subscription would never read the SUBACK that lets its
            # consumer start. The broker's flow control (receive_maximum) still
            # bounds the PUBLISHes read meanwhile.
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
                held.owner.wake()
            self._release(1)
            self._ack_on_wire(held)
        await trio.lowlevel.checkpoint()

    # -- subscriptions

    def open_subscription(
        self, subject_filter: str, durable: str | None, capacity: int, *, latest_only: bool = False
    ) -> _MqttSubscription:
        sub_id = _subscription_id(subject_filter, durable)
        sub = _MqttSubscription(self, sub_id, subject_filter, durable, capacity, latest_only)
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
        # after a reconnect must not replay them. A latest_only subscription
        # wants them every time: they are the newest value it missed.
        options = SubscribeOptions(
            qos=0 if sub.latest_only else 1,
            retainHandling=(
                SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
                if sub.subscribe_sent and not sub.latest_only
                else SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE
            ),
        )
        properties = _properties(PacketTypes.SUBSCRIBE)
        properties.SubscriptionIdentifier = sub.sub_id
        rc, mid = self.client.subscribe(sub.wire_filter, options=options, properties=properties)
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            sub.subscribe_sent = True
            self._suback_waiters[mid] = sub
            self._gate.unpark_all()  # a reader parked at a full subscription reads its SUBACK

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
