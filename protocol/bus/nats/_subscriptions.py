"""Core and durable pull subscriptions feeding a bounded inbox; imports no bus or store module.

A durable subscription runs two trio tasks: a fetcher that asks for at most
the free capacity per fetch and is cancelled when the connection drops, and
an acker that sends queued acks in one crossing per batch, the last with
``ack_sync``. Closing gives back (``-NAK``) every delivery still held.
docs/transport.md (NATS, rules 5, 6 and 17) says why.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from contextlib import suppress
from typing import Any

import nats.errors
import nats.js.api
import nats.js.errors
import trio
import trio_asyncio

from fedtier.protocol.bus._base import Delivery, Subscription
from fedtier.protocol.bus.nats._bridge import _aio, _boundary
from fedtier.protocol.bus.nats._connection import _Connection
from fedtier.protocol.bus.nats._subjects import _user_headers
from fedtier.protocol.errors import BusClosed, BusError, BusUnavailable, LocalProtocolError
from fedtier.protocol.stream_parts import PART_HEADER, Completed, PartsAssembly, parse_part

logger = logging.getLogger("fedtier.protocol.bus.nats")


class _Inbox:
    """Deliveries waiting for ``receive`` plus the count handed out and not yet acknowledged.

    Both counts together never pass ``capacity`` by this side's doing: the
    fetcher asks only for the room left, a core callback waits for room.
    """

    def __init__(self, capacity: int, label: str) -> None:
        self.capacity = capacity
        self.label = label
        self.waiting: deque[Delivery] = deque()
        self.unacked = 0
        self.closed = False
        self.error: BusError | None = None
        self.changed = trio.lowlevel.ParkingLot()

    def outstanding(self) -> int:
        return len(self.waiting) + self.unacked

    def put(self, delivery: Delivery) -> None:
        self.waiting.append(delivery)
        self.changed.unpark_all()

    def settle(self) -> None:
        self.unacked -= 1
        self.changed.unpark_all()

    def close(self) -> None:
        self.closed = True
        self.waiting.clear()
        self.changed.unpark_all()

    def fail(self, error: BusError) -> None:
        self.error = error
        self.changed.unpark_all()

    async def receive(self) -> Delivery:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self.closed:
                raise BusClosed(f"subscription {self.label} is closed")
            if self.error is not None:
                error = self.error
                raise type(error)(f"subscription {self.label} stopped: {error}") from error
            if self.waiting and self.unacked < self.capacity:
                break
            await self.changed.park()
        delivery = self.waiting.popleft()
        self.unacked += 1
        # A schedule point that cannot be cancelled, so a delivery once popped
        # always reaches the caller.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return delivery

    async def wait_for_room(self) -> int:
        while self.outstanding() >= self.capacity:
            await self.changed.park()
        return self.capacity - self.outstanding()


class _InboxSubscription(Subscription):
    def __init__(self, inbox: _Inbox) -> None:
        self._inbox = inbox

    async def receive(self) -> Delivery:
        """See ``Subscription.receive``."""
        return await self._inbox.receive()


class _CoreReceiver:
    """Moves core NATS messages into an ``_Inbox``; its callback runs on the asyncio side."""

    def __init__(self, inbox: _Inbox) -> None:
        self.inbox = inbox

    def _delivery(self, msg: Any) -> Delivery:
        settled = False

        async def ack() -> None:
            nonlocal settled
            if not settled and not self.inbox.closed:
                settled = True
                self.inbox.settle()
            await trio.lowlevel.checkpoint()

        return Delivery(
            subject=msg.subject,
            payload=msg.data,
            headers=_user_headers(msg.headers),
            _ack=ack,
        )

    async def on_msg(self, msg: Any) -> None:
        inbox = self.inbox
        if inbox.closed:
            return
        delivery = self._delivery(msg)
        if inbox.outstanding() < inbox.capacity:
            inbox.put(delivery)
            return
        # Full: wait on the trio side. nats-py runs a subscription's callbacks
        # one at a time, so its own pending queue absorbs what comes meanwhile.
        await trio_asyncio.trio_as_aio(self._put_when_room)(delivery)

    async def _put_when_room(self, delivery: Delivery) -> None:
        inbox = self.inbox
        while not inbox.closed and inbox.outstanding() >= inbox.capacity:
            await inbox.changed.park()
        if not inbox.closed:
            inbox.put(delivery)


async def _aio_core_subscribe(nc: Any, subject_filter: str, cb: Any) -> Any:
    sub = await nc.subscribe(subject_filter, cb=cb)
    # One round trip so the server has the interest before publish() returns
    # anywhere else; a second because nats-server was seen to send the -ERR of
    # a refused SUB after the first PONG, and the bus turns that -ERR into an
    # error of this subscribe (ConfigError) only while it waits here.
    await nc.flush()
    await nc.flush()
    return sub


async def _aio_bind_pull(
    js: Any,
    stream: str,
    durable: str,
    subject_filter: str,
    ack_wait_s: float,
    max_ack_pending: int,
    max_deliver: int,
) -> tuple[Any, float]:
    try:
        info = await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        info = await js.add_consumer(
            stream,
            nats.js.api.ConsumerConfig(
                # With a name, nats-py uses $JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>,
                # which a server permission can grant per durable and filter.
                name=durable,
                durable_name=durable,
                filter_subject=subject_filter,
                ack_policy=nats.js.api.AckPolicy.EXPLICIT,
                deliver_policy=nats.js.api.DeliverPolicy.ALL,
                ack_wait=ack_wait_s,
                max_ack_pending=max_ack_pending,
                # Never unbounded: a message no consumer can settle stops being
                # redelivered (it stays in the stream, and the server says so).
                max_deliver=max_deliver,
            ),
        )
    else:
        existing = info.config.filter_subject
        if existing != subject_filter:
            raise LocalProtocolError(
                f"durable {durable!r} already filters {existing!r}, not {subject_filter!r}"
            )
    # The consumer's own ack wait (an existing one keeps whatever it was made with):
    # what the in-progress acks have to beat.
    ack_wait = info.config.ack_wait
    psub = await js.pull_subscribe_bind(durable=durable, stream=stream)
    return psub, float(ack_wait) if ack_wait else ack_wait_s


async def _aio_in_progress(msgs: list[Any]) -> None:
    for msg in msgs:
        with suppress(nats.errors.MsgAlreadyAckdError):
            await msg.in_progress()


async def _aio_nak_later(msgs: list[tuple[Any, float]]) -> None:
    for msg, delay_s in msgs:
        await msg.nak(delay=delay_s)


async def _aio_fetch(psub: Any, batch: int, wait_s: float) -> list[Any]:
    msgs: list[Any] = await psub.fetch(batch, timeout=wait_s)
    return msgs


async def _aio_ack_batch(msgs: list[Any], timeout_s: float) -> None:
    for msg in msgs[:-1]:
        await msg.ack()
    # The reply to the last ack means the server has handled all of them: a
    # connection's acks are processed in order.
    await msgs[-1].ack_sync(timeout=timeout_s)


async def _aio_settle_and_unsubscribe(
    nc: Any, psub: Any, acks: list[Any], naks: list[Any], timeout_s: float
) -> None:
    for msg in acks:
        with suppress(nats.errors.MsgAlreadyAckdError):
            await msg.ack()
    for msg in naks:
        with suppress(nats.errors.MsgAlreadyAckdError):
            await msg.nak()
    # Unsubscribing removes the interest, which makes the server drop any pull
    # request still waiting, so nothing more is delivered to this inbox.
    await psub.unsubscribe()
    if nc.is_connected:
        await nc.flush(timeout=timeout_s)


class _PullSubscription(_InboxSubscription):
    """A JetStream durable pull consumer: a fetch task and an ack task, both trio."""

    def __init__(
        self,
        conn: _Connection,
        psub: Any,
        stream: str,
        durable: str,
        capacity: int,
        *,
        ack_wait_s: float = 30.0,
    ) -> None:
        super().__init__(_Inbox(capacity, f"{stream}/{durable}"))
        self._conn = conn
        self._psub = psub
        self._ack_wait_s = ack_wait_s
        # When each held delivery was fetched: in-progress acks stop at max_hold_s.
        self._held_since: dict[int, float] = {}
        self._stream = stream
        self._durable = durable
        self._tokens = itertools.count()
        # Fetched and not yet acknowledged, buffered or handed out; naked on close.
        self._held: dict[int, Any] = {}
        self._queued_acks: list[Any] = []
        self._queued_done = trio.Event()
        self._sending_acks: list[Any] = []
        self._sending_done = trio.Event()
        self._ack_lot = trio.lowlevel.ParkingLot()
        self._closing = False
        parted = conn.config.max_parted_bytes
        self._parts = PartsAssembly(parted, 2 * parted)

    def _hold(self, msg: Any) -> int:
        token = next(self._tokens)
        self._held[token] = msg
        self._held_since[token] = trio.current_time()
        return token

    def _delivery(self, msg: Any) -> Delivery:
        token = self._hold(msg)

        async def ack() -> None:
            await self._ack((token,))

        return Delivery(
            subject=msg.subject,
            payload=msg.data,
            headers=_user_headers(msg.headers),
            redelivered=msg.metadata.num_delivered > 1,
            _ack=ack,
        )

    def _take(self, msg: Any, give_back: list[tuple[Any, float]]) -> None:
        """Hand a fetched message on, or file it as a part of a whole (``stream_parts``)."""
        try:
            part = parse_part(msg.headers)
        except LocalProtocolError as exc:
            # Not this bus's framing: the subscriber sees the message as it is
            # (and refuses it as it refuses any malformed input).
            logger.warning("%s on %s; handed on as a whole message", exc, self._inbox.label)
            part = None
        if part is None:
            self._inbox.put(self._delivery(msg))
            return
        token = self._hold(msg)
        headers = {k: v for k, v in _user_headers(msg.headers).items() if k != PART_HEADER}
        verdict, replaced = self._parts.offer(
            part,
            token,
            int(msg.metadata.sequence.stream),
            msg.data,
            subject=msg.subject,
            headers=headers,
            redelivered=msg.metadata.num_delivered > 1,
            now=trio.current_time(),
        )
        if verdict == "held":
            if replaced is not None:  # the server redelivered the copy held: keep the newer
                self._held.pop(replaced, None)
                self._held_since.pop(replaced, None)
            whole = self._parts.take_completed(part)
            if whole is not None:
                self._inbox.put(self._whole_delivery(whole))
            return
        self._held.pop(token, None)
        self._held_since.pop(token, None)
        if verdict == "repeat":
            self._queued_acks.append(msg)
            self._ack_lot.unpark_all()
        elif verdict == "later":
            give_back.append((msg, 1.0))
        else:
            logger.error(
                "%s: a %d-byte whole (msg id %r) is above max_parted_bytes %d: its parts are "
                "given back, never acknowledged, and end on the dead-letter path",
                self._inbox.label,
                part.whole_size,
                part.msg_id,
                self._parts.max_whole_bytes,
            )
            give_back.append((msg, self._ack_wait_s))

    def _whole_delivery(self, whole: Completed) -> Delivery:
        if not whole.intact:
            logger.warning(
                "%s: the parts of a whole on %s do not match its size and digest; "
                "handed on for the subscriber to refuse",
                self._inbox.label,
                whole.subject,
            )
        tokens = whole.tokens

        async def ack() -> None:
            await self._ack(tokens)

        return Delivery(
            subject=whole.subject,
            payload=whole.payload,
            headers=whole.headers,
            redelivered=whole.redelivered,
            _ack=ack,
        )

    def _expire_parts(self) -> None:
        """Stop holding parts of wholes that did not complete within the hold time."""
        hold_s = self._conn.config.max_hold_s or self._ack_wait_s
        for token in self._parts.expire(trio.current_time() - hold_s):
            self._held.pop(token, None)
            self._held_since.pop(token, None)

    async def _ack(self, tokens: tuple[int, ...]) -> None:
        msgs = []
        for token in tokens:
            self._held_since.pop(token, None)
            msg = self._held.pop(token, None)
            if msg is not None:
                msgs.append(msg)
        if not msgs or self._closing:
            # Already acknowledged, or the subscription closed and gave it back.
            await trio.lowlevel.checkpoint()
            return
        self._inbox.settle()
        self._queued_acks.extend(msgs)
        done = self._queued_done
        self._ack_lot.unpark_all()
        if not self._conn.config.confirm_acks:
            await trio.lowlevel.checkpoint()
            return
        # Cancelling this wait does not cancel the ack: the ack task sends it.
        await done.wait()

    async def serve_acks(self) -> None:
        """Send queued acks in batches, one bridge crossing per batch."""
        timeout_s = self._conn.config.request_timeout_s
        while True:
            while not self._queued_acks:
                await self._ack_lot.park()
            self._sending_acks, self._queued_acks = self._queued_acks, []
            self._sending_done, self._queued_done = self._queued_done, trio.Event()
            try:
                with _boundary(f"ack {len(self._sending_acks)} on {self._inbox.label}"):
                    await _aio(_aio_ack_batch, self._sending_acks, timeout_s)
            except BusError as exc:
                logger.warning("%s; the server will redeliver those messages", exc)
            self._sending_acks = []
            self._sending_done.set()

    async def serve_progress(self) -> None:
        """Tell the server, every third of its ack wait, that held deliveries are still in work.

        A delivery waits in the inbox and in the daemon (intake queue, a cut,
        a slow commit) before its ack; without this, one held past
        ``ack_wait`` is redelivered, and a second consumer of the same durable
        (a second regional) would fold it too. A stopped process sends
        nothing, so what it held still comes back after ``ack_wait``; a
        delivery held past ``max_hold_s`` (one the daemon chose not to
        acknowledge, such as a refusal of a full quarantine) is left to come
        back too.
        """
        max_hold_s = self._conn.config.max_hold_s
        if max_hold_s <= 0:
            return
        interval_s = max(self._ack_wait_s / 3, 0.05)
        while True:
            await trio.sleep(interval_s)
            oldest = trio.current_time() - max_hold_s
            held = [
                msg
                for token, msg in self._held.items()
                if self._held_since.get(token, oldest) > oldest
            ]
            if not held or not self._conn.nc.is_connected:
                continue
            try:
                with _boundary(f"in-progress ack of {len(held)} on {self._inbox.label}"):
                    await _aio(_aio_in_progress, held)
            except BusError as exc:
                logger.warning("%s; the server may redeliver them after ack_wait", exc)

    async def serve_fetches(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Fetch into the inbox, never holding more than ``capacity`` unacked."""
        config = self._conn.config
        task_status.started()
        backoff_s = 0.1
        while True:
            room = await self._inbox.wait_for_room()
            events = self._conn.events
            try:
                await self._conn.wait_connected()
                with (
                    trio.CancelScope() as fetch_scope,
                    _boundary(f"fetch from {self._inbox.label}"),
                ):
                    events.until_disconnect.add(fetch_scope)
                    try:
                        msgs = await _aio(
                            _aio_fetch,
                            self._psub,
                            min(room, config.fetch_batch),
                            config.fetch_wait_s,
                        )
                    finally:
                        events.until_disconnect.discard(fetch_scope)
                if fetch_scope.cancelled_caught:
                    # The server this pull request went to is gone; a message a
                    # cancelled fetch had already taken comes back after ack_wait.
                    continue
            except BusUnavailable as exc:
                if isinstance(exc.__cause__, TimeoutError):
                    continue  # the pull request expired with nothing to deliver
                logger.warning("%s; retrying in %.1f s", exc, backoff_s)
                await trio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            except BusError as exc:
                if isinstance(exc, BusClosed) or isinstance(
                    exc.__cause__, nats.js.errors.NotFoundError
                ):
                    self._inbox.fail(exc)
                    return
                logger.warning("%s; retrying in %.1f s", exc, backoff_s)
                await trio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            backoff_s = 0.1
            give_back: list[tuple[Any, float]] = []
            for msg in msgs:
                self._take(msg, give_back)
            self._expire_parts()
            if give_back:
                try:
                    with _boundary(f"give back {len(give_back)} parts on {self._inbox.label}"):
                        await _aio(_aio_nak_later, give_back)
                except BusError as exc:
                    logger.warning("%s; the server redelivers them after ack_wait", exc)

    async def close(self) -> None:
        """Give back what this subscription holds and unsubscribe; call shielded."""
        self._closing = True
        self._inbox.close()
        acks = self._sending_acks + self._queued_acks
        naks = list(self._held.values())
        self._parts.clear()
        self._held.clear()
        self._held_since.clear()
        self._queued_acks = []
        config = self._conn.config
        with trio.move_on_after(config.close_timeout_s):
            try:
                with _boundary(f"close {self._inbox.label}"):
                    await _aio(
                        _aio_settle_and_unsubscribe,
                        self._conn.nc,
                        self._psub,
                        acks,
                        naks,
                        config.request_timeout_s,
                    )
            except BusError as exc:
                logger.warning("%s; the server redelivers after ack_wait", exc)
        self._sending_done.set()
        self._queued_done.set()
