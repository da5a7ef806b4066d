"""Jobs that leave a tier daemon (partials, model versions): a bounded ordered queue, retried.

Imports trio, the bus interface and the state store; never a concrete bus adapter.
"""

from __future__ import annotations

import abc
import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import trio
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from fedtier.protocol.bus import Bus, PublishAck
from fedtier.protocol.errors import (
    BusUnavailable,
    PublishError,
)
from fedtier.protocol.telemetry import (
    ATTR_PARTIAL_ID,
    SYSTEM_NATS,
    messaging_attributes,
    span_name,
)
from fedtier.tiers._telemetry import (
    TierMetricsLike,
    context_of,
    headers_with_context,
)
from fedtier.tiers.config import RetrySettings
from fedtier.tiers.faults import crash_point
from fedtier.tiers.store import (
    CommitTicket,
    OutboxEntry,
    StateStore,
)

J = TypeVar("J")
T = TypeVar("T")

__all__ = ["Uplink", "UplinkGate", "UplinkJob", "UpstreamWorker", "retry_transient"]


async def retry_transient(
    what: str,
    op: str,
    fn: Callable[[], Awaitable[T]],
    *,
    retry: RetrySettings,
    metrics: TierMetricsLike,
    log: logging.Logger,
) -> T:
    """Call ``fn`` until it succeeds, retrying ``BusUnavailable`` and ``PublishError`` with backoff.

    Every retry is logged and counted (``metrics.retry(op)``). Other errors
    propagate. Cancellation stops the retries.
    """
    backoff = retry.initial_backoff_s
    attempt = 0
    while True:
        try:
            return await fn()
        except (BusUnavailable, PublishError) as exc:
            attempt += 1
            metrics.retry(op)
            log.warning(
                "%s failed (attempt %d): %s; retrying in %.2f s", what, attempt, exc, backoff
            )
        await trio.sleep(backoff)
        backoff = min(backoff * 2, retry.max_backoff_s)


class UpstreamWorker(abc.ABC, Generic[J]):
    """A bounded queue of jobs that leave the daemon (partials, model versions), run in order.

    ``has_room`` lets a daemon hold a cut back instead of blocking its intake;
    ``drain`` is the clean shutdown's wait.
    """

    def __init__(self, *, capacity: int, on_room: Callable[[], None]) -> None:
        self._capacity = capacity
        self._on_room = on_room
        self._send, self._receive = trio.open_memory_channel[J](capacity)
        self._outstanding = 0
        # When each outstanding job was queued, oldest first (jobs run in order):
        # the upstream lag a dashboard shows is the first one's age.
        self._queued_at: collections.deque[float] = collections.deque()
        self._drained = trio.Event()
        self._drained.set()

    @property
    def outstanding(self) -> int:
        """Jobs queued or in progress."""
        return self._outstanding

    def has_room(self) -> bool:
        """Whether ``put`` would not wait."""
        return self._outstanding < self._capacity

    def oldest_age_s(self) -> float:
        """Seconds since the oldest outstanding job was queued (0 when none is).

        A job recovered from the store at start counts from the start.
        """
        if not self._queued_at:
            return 0.0
        return max(0.0, trio.current_time() - self._queued_at[0])

    def _started_one(self) -> None:
        if self._outstanding == 0:
            self._drained = trio.Event()
        self._outstanding += 1
        self._queued_at.append(trio.current_time())

    def _finished_one(self, *, newest: bool = False) -> None:
        # Jobs finish in order; only a put that failed takes back the newest.
        if newest:
            self._queued_at.pop()
        else:
            self._queued_at.popleft()
        self._outstanding -= 1
        if self._outstanding == 0:
            self._drained.set()
        self._on_room()

    async def put(self, job: J) -> None:
        """Queue a job, waiting while the queue is full."""
        self._started_one()
        try:
            await self._send.send(job)
        except BaseException:
            self._finished_one(newest=True)
            raise

    async def drain(self) -> None:
        """Wait until every queued job is done."""
        while self._outstanding:
            await self._drained.wait()

    async def serve(self, initial: Sequence[J], *, task_status: trio.TaskStatus[None]) -> None:
        """Run ``initial`` jobs (recovered from the store), then queued ones, in order."""
        for _ in range(len(initial)):
            self._started_one()
        task_status.started()
        # A job holds a whole partial or model blob: each is let go once done,
        # never kept while the next is awaited (or while the rest of ``initial`` runs).
        pending = collections.deque(initial)
        del initial
        while pending:
            job = pending.popleft()
            await self.run(job)
            del job
            self._finished_one()
        async for job in self._receive:
            await self.run(job)
            del job
            self._finished_one()

    @abc.abstractmethod
    async def run(self, job: J) -> None:
        """Do one job, retrying transient failures until it is done."""


class UplinkGate(Protocol):
    """What a daemon does around each publish of a partial (a leased tier's intents)."""

    async def before_publish(self, entry: OutboxEntry) -> None:
        """Called before the first try; returns once the partial may be published."""

    def published(self, entry: OutboxEntry, acked: CommitTicket | None = None) -> None:
        """Called once the partial is durable upstream (its PubAck came).

        ``acked`` is the store's commit marking it so (not awaited here).
        """


@dataclass(frozen=True, slots=True)
class UplinkJob:
    """A partial to publish once its flush is durable."""

    entry: OutboxEntry
    ticket: CommitTicket | None = None


class Uplink(UpstreamWorker[UplinkJob]):
    """Publishes flushed partials upstream; each stays in the outbox until its PubAck."""

    def __init__(
        self,
        bus: Bus,
        store: StateStore,
        *,
        tier: str,
        tracer: trace.Tracer,
        metrics: TierMetricsLike,
        retry: RetrySettings,
        log: logging.Logger,
        capacity: int,
        on_room: Callable[[], None],
        drop_unconfirmed: bool = False,
        gate: UplinkGate | None = None,
    ) -> None:
        super().__init__(capacity=capacity, on_room=on_room)
        self._gate = gate
        self._bus = bus
        self._store = store
        self._tier = tier
        self._tracer = tracer
        self._metrics = metrics
        self._retry = retry
        self._log = log
        self._drop_unconfirmed = drop_unconfirmed
        self.published = 0
        self.dropped = 0

    async def run(self, job: UplinkJob) -> None:
        """Wait for the flush commit, publish with ``msg_id = partial id``, mark acked."""
        if job.ticket is not None:
            await job.ticket.wait()
        entry = job.entry
        if self._gate is not None:
            await self._gate.before_publish(entry)
        crash_point(f"{self._tier}.before_publish")
        pid = entry.partial_id.hex()
        with self._tracer.start_as_current_span(
            span_name(self._tier, "send"),
            context=context_of(entry.trace),
            kind=SpanKind.PRODUCER,
            attributes={
                ATTR_PARTIAL_ID: pid,
                **messaging_attributes(
                    SYSTEM_NATS,
                    "send",
                    entry.subject,
                    message_id=pid,
                    body_size=len(entry.envelope),
                ),
            },
        ) as span:
            # A fresh dict per try: some transports mutate the headers they are given.
            headers = headers_with_context(span)

            def publish() -> Awaitable[PublishAck]:
                return self._bus.publish(
                    entry.subject, entry.envelope, headers=dict(headers), msg_id=pid
                )

            if self._drop_unconfirmed:
                try:
                    ack = await publish()
                except (BusUnavailable, PublishError) as exc:
                    # UNSAFE: the inputs inside are gone although their senders
                    # were told they are accepted.
                    self.dropped += 1
                    self._log.warning(
                        "UNSAFE drop_unconfirmed_partials: partial %s dropped after one "
                        "failed publish: %s",
                        pid,
                        exc,
                    )
                    acked = self._store.submit_acked(entry.partial_id)
                    if self._gate is not None:
                        self._gate.published(entry, acked)
                    return
            else:
                ack = await retry_transient(
                    f"publish of partial {pid} to {entry.subject}",
                    "publish_partial",
                    publish,
                    retry=self._retry,
                    metrics=self._metrics,
                    log=self._log,
                )
        crash_point(f"{self._tier}.after_publish")
        self.published += 1
        self._log.info(
            "partial %s (epoch %d) stored upstream on %s%s",
            pid,
            entry.epoch,
            entry.subject,
            " as a duplicate" if ack.duplicate else "",
        )
        # Not awaited: if this commit is lost, the partial is resent at the next
        # start and the receiver dedupes it by id.
        acked = self._store.submit_acked(entry.partial_id)
        if self._gate is not None:
            self._gate.published(entry, acked)
