"""``NatsBus`` and ``open_nats_bus``; reaches nats-py only through the bridge, never imports it.

Publishes to subjects a configured stream covers go through JetStream with
``Nats-Msg-Id`` dedupe, others through core NATS plus a flush
(docs/transport.md, NATS, rules 7 and 10).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from fedtier.protocol.bus._base import (
    Bus,
    Flavor,
    PublishAck,
    Subscription,
    check_latest_only,
)
from fedtier.protocol.bus.nats._bridge import _aio, _boundary, _loop_is_open, open_nats_loop
from fedtier.protocol.bus.nats._config import NatsConfig
from fedtier.protocol.bus.nats._connection import (
    _connect,
    _Connection,
    _ConnectionEvents,
    _ensure_streams,
)
from fedtier.protocol.bus.nats._kv import KvBucket, _aio_kv_bucket, _kv_names
from fedtier.protocol.bus.nats._objects import ObjectStore, _aio_object_store, _object_names
from fedtier.protocol.bus.nats._refusals import _refusals
from fedtier.protocol.bus.nats._subjects import _check_durable_name, _check_subject, _wire_headers
from fedtier.protocol.bus.nats._subscriptions import (
    _aio_bind_pull,
    _aio_core_subscribe,
    _CoreReceiver,
    _Inbox,
    _InboxSubscription,
    _PullSubscription,
)
from fedtier.protocol.bus.nats._varz import _check_sync_always, _recheck_sync_always
from fedtier.protocol.errors import (
    BusClosed,
    BusError,
    ConfigError,
    LocalProtocolError,
    PublishError,
)
from fedtier.protocol.stream_parts import PART_HEADER, PART_MARGIN_BYTES, part_headers, split

logger = logging.getLogger("fedtier.protocol.bus.nats")


@asynccontextmanager
async def open_nats_bus(config: NatsConfig) -> AsyncIterator[NatsBus]:
    """Connect to NATS and yield a ``NatsBus``; close everything on exit.

    Connects with bounded retry (``connect_attempts``), then reconnects
    forever; creates or updates ``config.streams`` (and refuses one with fewer
    replicas than configured); with ``require_sync_always`` refuses a server
    without ``sync_interval: always`` (``ConfigError``), at start and again
    after every reconnect and every ``sync_recheck_s``: then the body is
    cancelled and that ``ConfigError`` comes out of the ``async with``. Reuses
    the trio-asyncio loop of ``open_nats_loop`` when one is open in this
    task's context, else opens one around the bus.

    Raises:
        BusUnavailable: no server answered within the attempts.
        ConfigError: credentials refused, streams rejected, sync check failed.
    """
    if _loop_is_open():
        async with _open_bus_on_loop(config) as bus:
            yield bus
    else:
        async with open_nats_loop(), _open_bus_on_loop(config) as bus:
            yield bus


@asynccontextmanager
async def _open_bus_on_loop(config: NatsConfig) -> AsyncIterator[NatsBus]:
    events = _ConnectionEvents(config.name)
    nc = await _connect(config, events)
    events.established = True
    conn = _Connection(nc, events, config)
    bus = NatsBus(conn)
    try:
        await _check_sync_always(config)
        await _ensure_streams(conn)
        # The fsync check again after every reconnect (and periodically): a
        # failure ends the body and comes out of this context alone, so the
        # daemon stops with that one sentence.
        failure: ConfigError | None = None
        body_error: BaseException | None = None

        async def recheck() -> None:
            nonlocal failure
            try:
                await _recheck_sync_always(
                    config, lambda: events.reconnects, lambda: events.changed
                )
            except ConfigError as exc:
                logger.error("nats %s: %s", config.name, exc)
                failure = exc
                nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(recheck)
            try:
                yield bus
            except BaseException as exc:
                body_error = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if body_error is not None:
            raise body_error
    finally:
        bus._closed = True
        events.closing = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(config.close_timeout_s):
                try:
                    # close(), not drain(): drain waits out drain_timeout when a
                    # pull subscription still holds an unread message.
                    await _aio(nc.close)
                except (Exception, asyncio.CancelledError) as exc:
                    logger.warning("nats %s: close failed: %s", config.name, exc)


class NatsBus(Bus):
    """One NATS connection behind the ``Bus`` interface; opened by ``open_nats_bus``."""

    flavor: Flavor = "nats"

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._config = conn.config
        self._closed = False

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise BusClosed(f"{action}: the NATS bus is closed")

    @property
    def max_message_bytes(self) -> int | None:
        """The largest payload a publish to a stream takes; see ``Bus``.

        The server's ``max_payload`` from its INFO (payload plus headers), or
        ``max_parted_bytes`` when that is larger: such payloads go as parts.
        """
        single = self.max_single_message_bytes
        if single is None:
            return None
        return max(single, self._config.max_parted_bytes)

    @property
    def max_single_message_bytes(self) -> int | None:
        """The server's ``max_payload``: the most one message (a KV value) carries."""
        nc = self._conn.nc
        # nats-py's max_payload is a 1 MiB default until a server's INFO arrived.
        if nc.connected_url is None:
            return None
        return int(nc.max_payload)

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
        retain: bool = False,
    ) -> PublishAck:
        """Publish; see ``Bus.publish``.

        Subjects covered by a configured stream go to JetStream with
        ``Nats-Msg-Id`` = ``msg_id`` and return its sequence and duplicate
        flag; others use core NATS plus a flush (``msg_id`` has no effect:
        core NATS does not dedupe). ``retain`` is refused: NATS has no
        retained messages (keep the model pointer in a KV bucket).

        A payload above the server's ``max_payload`` goes to its stream as
        numbered parts when ``max_parted_bytes`` allows it (``protocol.stream_parts``): the
        ack is then the last part's, duplicate only when every part was.

        Raises:
            LocalProtocolError: wildcard subject, ``retain=True``, a header
                named ``Nats-*``, a payload above the server's max_payload that
                cannot go as parts (no stream, no ``msg_id``, above
                ``max_parted_bytes``).
            BusUnavailable: not connected now; nothing was sent.
            PublishError: no PubAck (timeout, no responder, interrupted);
                retry with the same ``msg_id``. Or the server refused the
                subject (permissions): nothing was stored.
            BusClosed: the bus is closed.

        On cancellation the message may or may not have been stored.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if retain:
            raise LocalProtocolError(
                f"cannot retain {subject!r}: NATS has no retained messages; "
                "keep the latest value in a KV bucket (NatsBus.kv_bucket)"
            )
        _check_subject(subject, allow_wildcards=False)
        action = f"publish to {subject!r}"
        self._check_open(action)
        spec = self._config.stream_for_subject(subject)
        wire_headers = _wire_headers(headers, msg_id if spec is not None else None)
        data = payload if isinstance(payload, bytes) else bytes(payload)
        self._conn.check_connected(action)
        timeout_s = self._config.request_timeout_s
        single = self.max_single_message_bytes
        if (
            spec is not None
            and single is not None
            and len(data) > single - PART_MARGIN_BYTES
            and self._config.max_parted_bytes >= len(data)
        ):
            if msg_id is None:
                raise LocalProtocolError(
                    f"{action}: {len(data)} bytes need parts, and parts need a msg_id"
                )
            return await self._publish_parts(
                subject, data, headers, msg_id, spec.name, single - PART_MARGIN_BYTES
            )
        with (
            _refusals(self._conn.events, action, [subject], write=True),
            _boundary(action, outcome_unknown=True),
        ):
            if spec is not None:
                duplicate, sequence = await _aio(
                    _aio_js_publish,
                    self._conn.js,
                    subject,
                    data,
                    wire_headers,
                    spec.name,
                    timeout_s,
                )
                return PublishAck(duplicate=duplicate, sequence=sequence)
            await _aio(_aio_core_publish, self._conn.nc, subject, data, wire_headers, timeout_s)
        if not self._conn.nc.is_connected:
            # flush() returns at once while disconnected and proves nothing: the
            # message sits in nats-py's buffer and may go out after reconnect.
            raise PublishError(f"{action}: disconnected before the flush; outcome unknown")
        return PublishAck()

    async def _publish_parts(
        self,
        subject: str,
        data: bytes,
        headers: Mapping[str, str] | None,
        msg_id: str,
        stream: str,
        part_bytes: int,
    ) -> PublishAck:
        """Publish ``data`` as numbered parts, in order; see ``protocol.stream_parts``."""
        parts = split(data, part_bytes)
        digest = hashlib.sha256(data).hexdigest()
        timeout_s = self._config.request_timeout_s
        duplicate = True
        sequence = 0
        for index, chunk in enumerate(parts):
            part_id = f"{msg_id}#{index}/{len(parts)}"
            action = f"publish part {index + 1}/{len(parts)} of {msg_id!r} to {subject!r}"
            wire_headers = _wire_headers(headers, part_id) or {}
            wire_headers[PART_HEADER] = part_headers(index, len(parts), data, digest, msg_id)
            self._conn.check_connected(action)
            with (
                _refusals(self._conn.events, action, [subject], write=True),
                _boundary(action, outcome_unknown=True),
            ):
                part_duplicate, sequence = await _aio(
                    _aio_js_publish,
                    self._conn.js,
                    subject,
                    bytes(chunk),
                    wire_headers,
                    stream,
                    timeout_s,
                )
            duplicate = duplicate and part_duplicate
        return PublishAck(duplicate=duplicate, sequence=sequence)

    @asynccontextmanager
    async def subscribe(
        self,
        subject_filter: str,
        *,
        durable: str | None = None,
        capacity: int = 64,
        latest_only: bool = False,
    ) -> AsyncIterator[Subscription]:
        """Open a subscription; see ``Bus.subscribe``.

        Without ``durable``: a core NATS subscription (at most once; what
        arrives while this side is full waits in nats-py's pending queue, and
        past its limit the server marks this a slow consumer and drops).
        With ``durable``: a JetStream durable pull consumer, explicit ack, on
        the configured stream that covers ``subject_filter``; subscribers
        sharing the name share the work. On exit every delivery still held
        is given back (``-NAK``) and the subscription is removed, shielded
        and bounded by ``close_timeout_s``.

        Raises:
            LocalProtocolError: bad filter or durable name, no configured
                stream covers the filter, or the durable exists with another
                filter.
        """
        if capacity < 1:
            raise LocalProtocolError(f"subscription capacity must be >= 1, got {capacity}")
        check_latest_only(durable, latest_only)  # a core subscription keeps nothing away
        _check_subject(subject_filter, allow_wildcards=True)
        self._check_open(f"subscribe to {subject_filter!r}")
        if durable is None:
            async with self._open_core(subject_filter, capacity) as sub:
                yield sub
        else:
            _check_durable_name(durable)
            async with self._open_durable(subject_filter, durable, capacity) as sub:
                yield sub

    @asynccontextmanager
    async def _open_core(self, subject_filter: str, capacity: int) -> AsyncIterator[Subscription]:
        inbox = _Inbox(capacity, subject_filter)
        receiver = _CoreReceiver(inbox)
        action = f"subscribe to {subject_filter!r}"
        # The server answers a refused SUBSCRIBE with an -ERR before the PONG
        # of the flush: a subscription that would never deliver is an error.
        with (
            _refusals(self._conn.events, action, [subject_filter], write=False),
            _boundary(action),
        ):
            handle = await _aio(_aio_core_subscribe, self._conn.nc, subject_filter, receiver.on_msg)
        try:
            yield _InboxSubscription(inbox)
        finally:
            inbox.close()
            # Shielded: without the unsubscribe the callback keeps firing into
            # a closed inbox for as long as the connection lives.
            with trio.CancelScope(shield=True), trio.move_on_after(self._config.close_timeout_s):
                try:
                    with _boundary(f"unsubscribe from {subject_filter!r}"):
                        await _aio(handle.unsubscribe)
                except BusError as exc:
                    logger.warning("%s", exc)

    @asynccontextmanager
    async def _open_durable(
        self, subject_filter: str, durable: str, capacity: int
    ) -> AsyncIterator[Subscription]:
        spec = self._config.stream_covering(subject_filter)
        if spec is None:
            raise LocalProtocolError(
                f"no configured stream covers {subject_filter!r} for durable {durable!r}; "
                f"streams: {[(s.name, s.subjects) for s in self._config.streams]}"
            )
        action = f"bind durable {durable!r} on stream {spec.name!r}"
        with (
            _refusals(self._conn.events, action, [spec.name, durable], write=False),
            _boundary(action),
        ):
            psub, ack_wait_s = await _aio(
                _aio_bind_pull,
                self._conn.js,
                spec.name,
                durable,
                subject_filter,
                self._config.ack_wait_s,
                self._config.max_ack_pending,
                self._config.max_deliver,
            )
        sub = _PullSubscription(
            self._conn, psub, spec.name, durable, capacity, ack_wait_s=ack_wait_s
        )
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(sub.serve_fetches)
                nursery.start_soon(sub.serve_acks)
                nursery.start_soon(sub.serve_progress)
                try:
                    yield sub
                except BaseException as exc:
                    # Re-raised after the nursery, so the caller gets its own
                    # exception back rather than wrapped in an ExceptionGroup.
                    body_error = exc
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await sub.close()
        if body_error is not None:
            raise body_error

    async def kv_bucket(
        self,
        name: str,
        *,
        history: int = 1,
        max_age_s: float | None = None,
        leader_reads: bool = False,
    ) -> KvBucket:
        """Bind to the KV bucket ``name``, creating it (file storage, ``replicas`` copies).

        An existing bucket with fewer copies than the config's ``replicas`` is
        refused (``ConfigError``).

        Args:
            name: bucket name.
            history: values kept per key when the bucket is created (1-64).
            max_age_s: when the bucket is created, how long a value lives
                (None: forever); an existing bucket keeps its own.
            leader_reads: ``get`` asks the stream's leader
                (``$JS.API.STREAM.MSG.GET``) instead of any replica (a direct
                get, which a replica that restarted may answer before it
                caught up): for a value a decision is made on, such as an
                intent at a takeover.
        """
        self._check_open(f"KV bucket {name!r}")
        action = f"open KV bucket {name!r}"
        with (
            _refusals(self._conn.events, action, _kv_names(name), write=False),
            _boundary(action),
        ):
            kv = await _aio(
                _aio_kv_bucket, self._conn.js, name, history, max_age_s, self._config.replicas
            )
        return KvBucket(self, kv, name, leader_reads=leader_reads)

    async def object_store(self, name: str) -> ObjectStore:
        """Bind to the object store ``name``, creating it (file storage, ``replicas`` copies).

        An existing store with fewer copies than the config's ``replicas`` is
        refused (``ConfigError``).
        """
        self._check_open(f"object store {name!r}")
        action = f"open object store {name!r}"
        with (
            _refusals(self._conn.events, action, _object_names(name), write=False),
            _boundary(action),
        ):
            await _aio(_aio_object_store, self._conn.js, name, self._config.replicas)
        return ObjectStore(self, name)


async def _aio_js_publish(
    js: Any,
    subject: str,
    payload: bytes,
    headers: dict[str, str] | None,
    stream: str,
    timeout_s: float,
) -> tuple[bool, int]:
    ack = await js.publish(subject, payload, timeout=timeout_s, stream=stream, headers=headers)
    # The first PubAck says duplicate=None, a repeat says True.
    return bool(ack.duplicate), int(ack.seq)


async def _aio_core_publish(
    nc: Any, subject: str, payload: bytes, headers: dict[str, str] | None, timeout_s: float
) -> None:
    await nc.publish(subject, payload, headers=headers)
    await nc.flush(timeout=timeout_s)
