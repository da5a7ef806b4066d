"""Machinery shared by the edge, regional and central daemons; imports protocol, trio, tiers.

Never imports ``client`` or ``simulations``, and never a concrete bus adapter:
daemons talk to ``protocol.bus.Bus`` and to ``tiers.model_registry``.

Acceptance sequence of one delivery (docs/architecture.md, data guarantees), the same at every
tier::

    reader task (in delivery order, synchronous per delivery)
        parse -> sender registered -> signature + digest -> fleet -> layout
        -> dedupe by (sender, input id) -> replay (edge) -> staleness (an edge
           rejects a device update past max_staleness; a partial is never
           rejected for it, only discounted and counted late: its updates were
           acknowledged below)
        -> finite / norm -> fold into the open buffer -> submit the record to
        the store (grouped commit) -> hand the delivery to the settler
    settler task (same order)
        wait for the record's commit -> ack the delivery -> receipt (edge)

Admission is synchronous, so the buffer, the dedupe index and the high-water
marks never see two deliveries interleave, while the settler waits for commits;
meanwhile the reader keeps admitting, which is what lets commits group. Every
rejection is counted with its reason, leaves the buffer untouched, and is
acknowledged (it will never become valid); a duplicate is acknowledged once the
original's record is durable.

A flush ("cut") is synchronous too: the buffer's partial is built and sealed,
its flush is submitted to the store (after every accept folded into it, since
the committer is FIFO), and the buffer moves to the next epoch. The upstream
worker waits for that commit, publishes with retry (same ``msg_id`` each
time), and marks the partial acknowledged. While the upstream worker is full,
cuts wait and the open buffer keeps growing (constant memory): no tier stops
taking input because the next one is down.

Fault injection (``tiers.faults``, for the chaos suite) names the moments of
this sequence: ``<tier>.after_admit``, ``.before_commit`` and ``.after_commit``
(the committer), ``.after_ack``, ``.after_receipt`` (edge), and around the
upstream publish ``.before_publish`` and ``.after_publish``. Its unsafe
switches bend it at exactly one place each: the settler acknowledges before the
commit (``ack_before_commit``), admission forgets ids that left the open buffer
(``dedupe_open_buffer_only``), the uplink drops a partial after one failed
publish (``drop_unconfirmed_partials``), admission refuses a late partial
(``reject_late_partials``).
"""

from __future__ import annotations

import abc
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Final, Generic, TypeVar

import numpy as np
import trio
from opentelemetry import trace
from opentelemetry.context import Context

from fedtier.protocol.bus import Bus, Delivery, PublishAck, Subscription
from fedtier.protocol.codecs import CodecSpec, all_finite, decode, encode
from fedtier.protocol.envelope import parse_envelope, seal
from fedtier.protocol.errors import (
    BusError,
    BusUnavailable,
    DecodeError,
    LayoutMismatch,
    LocalProtocolError,
    PublishError,
    Reason,
    RemoteProtocolError,
    UnknownSender,
    UpdateRejected,
)
from fedtier.protocol.messages import ModelAnnouncement, PartialAggregate, Tier
from fedtier.protocol.models import open_model_pointer
from fedtier.protocol.telemetry import (
    ATTR_FLUSH_REASON,
    ATTR_INPUT_COUNT,
    ATTR_INPUT_IDS,
    ATTR_LATE,
    ATTR_LEAF_COUNT,
    ATTR_MODEL_VERSION,
    ATTR_OUTCOME,
    ATTR_PARTIAL_ID,
    ATTR_REASON,
    ATTR_SENDER,
    ATTR_STALENESS,
    span_name,
)
from fedtier.tiers._telemetry import (
    TierMetricsLike,
    context_of,
    default_tracer,
    extract_context,
    headers_with_context,
    links_to,
    quiet_metrics,
    traceparent_of,
)
from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.aggregate import partial_id as derive_partial_id
from fedtier.tiers.config import RetrySettings, TierConfig
from fedtier.tiers.faults import crash_point, unsafe
from fedtier.tiers.folding import fold_partial_message
from fedtier.tiers.model_registry import ModelRegistryReader
from fedtier.tiers.registry import TierKeys
from fedtier.tiers.store import (
    CommitTicket,
    InputRecord,
    InputState,
    OutboxEntry,
    Recovery,
    StateStore,
    open_state_store,
)
from fedtier.tiers.validation import NormPolicy, ValidationResult, check_update_vector

__all__ = [
    "Admission",
    "ModelView",
    "OpenBuffer",
    "Outcome",
    "TierDaemon",
    "check_payload",
    "retry_transient",
    "wall_clock_ms",
]

HIST_BUCKETS: Final = 32

J = TypeVar("J")
T = TypeVar("T")


class Outcome(StrEnum):
    """What a daemon decided about one input; metric labels."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch (``created_ms`` of signed messages)."""
    return time.time_ns() // 1_000_000


def rejection(reason: Reason, message: str) -> RemoteProtocolError:
    """A rejection with a reason token that has no dedicated error class."""
    return RemoteProtocolError(message, reason=reason)


# -- checks ---------------------------------------------------------------------------


def check_payload(
    payload: bytes,
    codec: CodecSpec,
    num_params: int,
    *,
    max_norm: float | None,
    norm_policy: NormPolicy,
) -> ValidationResult:
    """Check an encoded vector completely before it is folded: layout, finiteness, norm.

    Dense f32/f16 payloads are checked in place (zero-copy views); i8 and top-k
    payloads are scanned without a dense copy unless a norm bound needs one.

    Raises:
        DecodeError: the payload breaks its codec (``malformed``).
        UpdateRejected: ``non_finite``, or ``norm_exceeded`` under the reject policy.
    """
    if codec.k is None and codec.values in ("f32", "f16"):
        expected = codec.expected_payload_size(num_params)
        if len(payload) != expected:
            raise DecodeError(f"{codec} payload has {len(payload)} bytes; expected {expected}")
        values = np.frombuffer(payload, dtype="<f4" if codec.values == "f32" else "<f2")
        return check_update_vector(values, max_norm=max_norm, norm_policy=norm_policy)
    if max_norm is None:
        if not all_finite(payload, codec, num_params):
            raise UpdateRejected(
                f"{codec} payload decodes to a NaN or infinite value", reason=Reason.NON_FINITE
            )
        return ValidationResult(norm=math.nan)
    dense = decode(payload, codec, num_params)
    return check_update_vector(dense, max_norm=max_norm, norm_policy=norm_policy)


@dataclass(frozen=True, slots=True)
class ModelView:
    """The model version a daemon knows, from a verified pointer.

    Attributes:
        version: the model version.
        layout: its layout fingerprint.
        num_params: its number of parameters.
        pointer: the signed pointer envelope bytes.
    """

    version: int
    layout: bytes
    num_params: int
    pointer: bytes

    def check_layout(self, layout: bytes, num_params: int, what: str) -> None:
        """Raise ``LayoutMismatch`` unless ``layout``/``num_params`` are this model's."""
        if layout != self.layout or num_params != self.num_params:
            raise LayoutMismatch(
                f"{what} is for layout {layout.hex()} with {num_params} values; model "
                f"v{self.version} is {self.layout.hex()} with {self.num_params}"
            )


# -- retries --------------------------------------------------------------------------


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


# -- the open buffer ------------------------------------------------------------------


class OpenBuffer:
    """The open epoch: its accumulator plus what the flush needs to know about its inputs.

    Attributes:
        aggregate: the accumulator of the epoch.
        epoch: the epoch number (stored beside each input).
        oldest_at: trio time of the oldest input, None when empty (flush deadline).
        oldest_accepted_ms: wall time of the oldest input (aggregate latency).
        traces: traceparent of each input's process span, in fold order (links).
        senders: distinct senders (participation).
    """

    def __init__(self, num_params: int, epoch: int) -> None:
        self.aggregate = Accumulator(num_params, hist_buckets=HIST_BUCKETS)
        self.epoch = epoch
        self.oldest_at: float | None = None
        self.oldest_accepted_ms: int | None = None
        self.traces: list[str] = []
        self.senders: set[str] = set()
        self._changed = trio.Event()

    def note(self, *, sender: str, trace_parent: str, accepted_ms: int, at: float) -> None:
        """Record the bookkeeping of an input just folded."""
        if self.oldest_at is None:
            self.oldest_at = at
            self.oldest_accepted_ms = accepted_ms
        self.traces.append(trace_parent)
        self.senders.add(sender)
        self.poke()

    def advance(self) -> None:
        """Start the next epoch with an empty accumulator."""
        self.aggregate.reset()
        self.epoch += 1
        self.oldest_at = None
        self.oldest_accepted_ms = None
        self.traces = []
        self.senders = set()
        self.poke()

    def poke(self) -> None:
        """Wake whoever waits in :meth:`wait_changed` (new input, cut, room upstream)."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Wait until the buffer changes or the upstream has room again."""
        await self._changed.wait()


# -- intake ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Admission:
    """The decision about one delivery, carried from the reader to the settler.

    Attributes:
        delivery: the delivery to acknowledge.
        outcome: accepted, duplicate or rejected.
        reason: the rejection reason token (empty otherwise).
        ticket: the commit to wait for before acknowledging, if any.
        after_ack: what to do once acknowledged (the edge's receipt).
    """

    delivery: Delivery
    outcome: Outcome
    reason: str = ""
    ticket: CommitTicket | None = None
    after_ack: Callable[[], Awaitable[None]] | None = None


class Intake:
    """Reads one subscription: admits in order, settles (commit, ack, receipt) in order.

    Args:
        admit: synchronous decision about one delivery (never raises for bad input).
        after_admit: awaited after each admission (flush triggers).
        capacity: admissions waiting to be settled; the subscription's capacity
            bounds it already, so the reader never waits here in practice.
        log: where settle problems are logged.
        tier: names the crash points ``<tier>.after_admit``, ``.after_ack`` and
            ``.after_receipt`` (``tiers.faults``).
        ack_before_commit: the unsafe switch of that name: acknowledge (and
            send the receipt) first, wait for the commit after.
    """

    def __init__(
        self,
        admit: Callable[[Delivery], Admission],
        after_admit: Callable[[], Awaitable[None]],
        *,
        capacity: int,
        log: logging.Logger,
        tier: str = "",
        ack_before_commit: bool = False,
    ) -> None:
        self._admit = admit
        self._after_admit = after_admit
        self._capacity = capacity
        self._log = log
        self._ack_before_commit = ack_before_commit
        self._after_admit_point = f"{tier}.after_admit"
        self._after_ack_point = f"{tier}.after_ack"
        self._after_receipt_point = f"{tier}.after_receipt"
        self._stopping = False
        self._receive_scope: trio.CancelScope | None = None
        self.finished = trio.Event()

    def stop(self) -> None:
        """Stop taking deliveries; what was admitted is still settled."""
        self._stopping = True
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def serve(
        self, subscription: Subscription, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Run until :meth:`stop` (then settle what was admitted) or cancellation."""
        send, receive = trio.open_memory_channel[Admission](self._capacity)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._settle, receive)
                async with send:
                    task_status.started()
                    while not self._stopping:
                        # Only the wait for a delivery is interruptible by stop():
                        # an admitted delivery is always handed on and settled.
                        with trio.CancelScope() as scope:
                            self._receive_scope = scope
                            # BusError (the bus closed under us) propagates: a daemon
                            # without input must stop, not idle.
                            delivery = await subscription.receive()
                        self._receive_scope = None
                        if scope.cancelled_caught:
                            break
                        admission = self._admit(delivery)
                        crash_point(self._after_admit_point)
                        await send.send(admission)
                        await self._after_admit()
        finally:
            self.finished.set()

    async def _settle(self, receive: trio.MemoryReceiveChannel[Admission]) -> None:
        async with receive:
            async for admission in receive:
                if self._ack_before_commit:
                    # UNSAFE: what a broker's auto-ack does; a crash before the
                    # commit loses an input its sender was told is accepted.
                    await self._acknowledge(admission)
                if admission.ticket is not None:
                    # StoreError propagates: a daemon whose store fails must stop.
                    await admission.ticket.wait()
                if not self._ack_before_commit:
                    await self._acknowledge(admission)

    async def _acknowledge(self, admission: Admission) -> None:
        try:
            await admission.delivery.ack()
        except BusError as exc:
            # The broker redelivers; the copy is then a duplicate.
            self._log.warning("ack of a delivery on %s failed: %s", admission.delivery.subject, exc)
        crash_point(self._after_ack_point)
        if admission.after_ack is not None:
            await admission.after_ack()
            crash_point(self._after_receipt_point)


# -- upstream workers -----------------------------------------------------------------


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
        self._drained = trio.Event()
        self._drained.set()

    @property
    def outstanding(self) -> int:
        """Jobs queued or in progress."""
        return self._outstanding

    def has_room(self) -> bool:
        """Whether ``put`` would not wait."""
        return self._outstanding < self._capacity

    def _started_one(self) -> None:
        if self._outstanding == 0:
            self._drained = trio.Event()
        self._outstanding += 1

    def _finished_one(self) -> None:
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
            self._finished_one()
            raise

    async def drain(self) -> None:
        """Wait until every queued job is done."""
        while self._outstanding:
            await self._drained.wait()

    async def serve(self, initial: Sequence[J], *, task_status: trio.TaskStatus[None]) -> None:
        """Run ``initial`` jobs (recovered from the store), then queued ones, in order."""
        for _ in initial:
            self._started_one()
        task_status.started()
        for job in initial:
            await self.run(job)
            self._finished_one()
        async for job in self._receive:
            await self.run(job)
            self._finished_one()

    @abc.abstractmethod
    async def run(self, job: J) -> None:
        """Do one job, retrying transient failures until it is done."""


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
    ) -> None:
        super().__init__(capacity=capacity, on_room=on_room)
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
        crash_point(f"{self._tier}.before_publish")
        entry = job.entry
        pid = entry.partial_id.hex()
        with self._tracer.start_as_current_span(
            span_name(self._tier, "send"),
            context=context_of(entry.trace),
            attributes={ATTR_PARTIAL_ID: pid},
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
                    self._store.submit_acked(entry.partial_id)
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
        self._store.submit_acked(entry.partial_id)


# -- the daemon skeleton --------------------------------------------------------------


class SeqCounter:
    """Sequence numbers of this daemon's own messages, increasing across restarts.

    Starts above both the last persisted value and ``wall ms * 1000``, so a
    restart never reuses a number unless the clock went back.
    """

    def __init__(self, last: int, clock_ms: Callable[[], int]) -> None:
        self.last = max(last, clock_ms() * 1000)

    def next(self) -> int:
        """The next sequence number."""
        self.last += 1
        return self.last


class TierDaemon(abc.ABC):
    """What the three daemons share: store, buffer, intake, flush loop, clean shutdown.

    Subclasses provide the input subscription, the admission of one delivery,
    the cut of the open buffer and the upstream worker.

    Attributes:
        counts: inputs by (outcome, reason) since start.
        anomalies: accepted-but-anomalous inputs by detector.
    """

    tier: ClassVar[str]
    sender_role: ClassVar[str]
    """Whose inputs this tier takes: the role of its sender key registry."""

    @classmethod
    def load_keys(cls, config: TierConfig) -> TierKeys:
        """Its identity, the keys of the senders it accepts and the pinned central key."""
        return TierKeys.load(
            config.identity_key, config.sender_keys, config.central_key, role=cls.sender_role
        )

    def __init__(
        self,
        config: TierConfig,
        *,
        keys: TierKeys,
        metrics: TierMetricsLike | None,
        tracer: trace.Tracer | None,
        clock_ms: Callable[[], int] | None,
        store_in_thread: bool,
    ) -> None:
        self.config = config
        self.keys = keys
        self.metrics: TierMetricsLike = (
            metrics if metrics is not None else quiet_metrics(self.tier, keys.identity.key_id)
        )
        self.tracer = tracer if tracer is not None else default_tracer()
        self.clock_ms = clock_ms if clock_ms is not None else wall_clock_ms
        self._store_in_thread = store_in_thread
        self.log = logging.getLogger(f"fedtier.{self.tier}")
        self.key_id = keys.identity.key_id
        self.counts: Counter[tuple[str, str]] = Counter()
        self.anomalies: Counter[str] = Counter()
        self._store: StateStore | None = None
        self._buffer: OpenBuffer | None = None
        self._stashed: list[Any] = []
        self._seq = SeqCounter(0, self.clock_ms)
        self._shutdown = trio.Event()
        self._intake: Intake | None = None
        self.ready = trio.Event()
        # Read once: the unsafe switches of tiers.faults, off unless a chaos test sets them.
        self._unsafe_ack_before_commit = unsafe("ack_before_commit")
        self._unsafe_dedupe_open_buffer_only = unsafe("dedupe_open_buffer_only")
        self._unsafe_drop_unconfirmed = unsafe("drop_unconfirmed_partials")
        self._unsafe_reject_late = unsafe("reject_late_partials")

    # -- accessors ------------------------------------------------------------------

    @property
    def store(self) -> StateStore:
        """The open state store (while serving)."""
        if self._store is None:
            raise LocalProtocolError(f"the {self.tier} daemon is not serving")
        return self._store

    @property
    def buffer(self) -> OpenBuffer:
        """The open buffer (while serving)."""
        if self._buffer is None:
            raise LocalProtocolError(f"the {self.tier} daemon has no open buffer yet")
        return self._buffer

    @property
    @abc.abstractmethod
    def known_version(self) -> int:
        """The newest model version this daemon knows (for staleness)."""

    @property
    @abc.abstractmethod
    def upstream(self) -> UpstreamWorker[Any]:
        """Where cuts go."""

    def request_shutdown(self) -> None:
        """Ask for a clean shutdown: stop input, flush, wait for upstream acks, return."""
        self._shutdown.set()

    # -- hooks ------------------------------------------------------------------------

    @abc.abstractmethod
    async def _start(self, nursery: trio.Nursery, recovery: Recovery) -> None:
        """Recover state, create and refold the buffer, start background tasks."""

    @abc.abstractmethod
    def _open_input(self) -> AbstractAsyncContextManager[Subscription]:
        """The subscription inputs arrive on."""

    @abc.abstractmethod
    def _admit(self, delivery: Delivery) -> Admission:
        """Decide about one delivery (synchronous; never raises for bad input)."""

    @abc.abstractmethod
    def _cut(self, reason: str) -> Any:
        """Close the open epoch synchronously; return the upstream job, or None if empty."""

    # -- serving ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the daemon until cancelled or, after :meth:`request_shutdown`, shut down cleanly.

        Reports ready through ``task_status`` once inputs are being taken.
        Cancellation is a crash as far as the data is concerned: nothing
        acknowledged is lost (the store has it), nothing is folded twice.
        """
        async with open_state_store(
            self.config.store_path,
            commit_window_s=self.config.commit_window_s,
            in_thread=self._store_in_thread,
            crash_label=self.tier,
        ) as store:
            self._store = store
            try:
                recovery = await store.recover()
                self._seq = SeqCounter(recovery.out_seq, self.clock_ms)
                async with trio.open_nursery() as nursery:
                    await self._start(nursery, recovery)
                    nursery.start_soon(self._serve_deadlines)
                    self._intake = Intake(
                        self._admit,
                        self._maybe_flush,
                        capacity=self.config.intake_capacity,
                        log=self.log,
                        tier=self.tier,
                        ack_before_commit=self._unsafe_ack_before_commit,
                    )
                    async with self._open_input() as subscription:
                        await nursery.start(self._intake.serve, subscription)
                        self.log.info(
                            "%s %s serving (epoch %d, model v%d)",
                            self.tier,
                            self.key_id,
                            self.buffer.epoch,
                            self.known_version,
                        )
                        self.ready.set()
                        task_status.started()
                        await self._shutdown.wait()
                        # One deadline for the whole clean shutdown; past it the
                        # daemon just stops, which loses nothing acknowledged.
                        deadline = trio.current_time() + self.config.shutdown_timeout_s
                        self._intake.stop()
                        with trio.move_on_at(deadline):
                            await self._intake.finished.wait()
                        if not self._intake.finished.is_set():
                            self.log.warning(
                                "input still settling after %.0f s; stopping without a flush",
                                self.config.shutdown_timeout_s,
                            )
                            nursery.cancel_scope.cancel()
                            return
                    await self._shut_down_cleanly(deadline)
                    nursery.cancel_scope.cancel()
            finally:
                self._store = None

    async def _shut_down_cleanly(self, deadline: float) -> None:
        timeout_s = self.config.shutdown_timeout_s
        with trio.move_on_at(deadline) as scope:
            await self._send_stashed()
            job = self._cut("shutdown")
            if job is not None:
                await self.upstream.put(job)
            await self.upstream.drain()
        if scope.cancelled_caught:
            self.log.warning(
                "%d upstream jobs not confirmed within %.0f s; they are kept and resent at "
                "the next start",
                self.upstream.outstanding,
                timeout_s,
            )
        else:
            self.log.info("%s %s shut down cleanly", self.tier, self.key_id)

    async def _serve_deadlines(self) -> None:
        policy = self.config.flush
        while True:
            buffer = self.buffer
            deadline = policy.deadline_at(buffer.oldest_at)
            if deadline is None or not self.upstream.has_room():
                # A due flush waits for room upstream; the worker pokes the buffer.
                deadline = math.inf
            with trio.move_on_at(deadline):
                await buffer.wait_changed()
            await self._maybe_flush()

    async def _send_stashed(self) -> None:
        while self._stashed:
            await self.upstream.put(self._stashed.pop(0))

    async def _maybe_flush(self) -> None:
        """Flush when the policy says so and the upstream has room (else keep folding)."""
        await self._send_stashed()
        buffer = self.buffer
        aggregate = buffer.aggregate
        reason = self.config.flush.should_flush(
            aggregate.input_count, aggregate.sample_count, buffer.oldest_at, trio.current_time()
        )
        if reason is None or not self.upstream.has_room():
            return
        job = self._cut(str(reason))
        if job is not None:
            await self.upstream.put(job)

    def _make_room(self, inputs: int, leaves: int) -> None:
        """Cut first when folding would push the buffer past the id caps of one partial."""
        aggregate = self.buffer.aggregate
        cap = self.config.limits.max_ids
        if aggregate.input_count + inputs > cap or aggregate.update_count + leaves > cap:
            job = self._cut("ids")
            if job is not None:
                self._stashed.append(job)

    # -- shared pieces of admission ------------------------------------------------------

    def _count(self, span: trace.Span, outcome: Outcome, reason: str = "") -> None:
        self.counts[(outcome.value, reason)] += 1
        self.metrics.update_outcome(outcome.value, reason)
        span.set_attribute(ATTR_OUTCOME, outcome.value)
        if reason:
            span.set_attribute(ATTR_REASON, reason)

    def _note_accepted(
        self, span: trace.Span, sender: str, trace_parent: str, accepted_ms: int, tau: int
    ) -> None:
        """Book an input just folded into the open buffer: flush clock, counts, metrics."""
        buffer = self.buffer
        buffer.note(
            sender=sender,
            trace_parent=trace_parent,
            accepted_ms=accepted_ms,
            at=trio.current_time(),
        )
        self._count(span, Outcome.ACCEPTED)
        self.metrics.staleness(tau)
        self.metrics.buffer_depth(buffer.aggregate.input_count)

    def _note_anomaly(self, detector: str) -> None:
        self.anomalies[detector] += 1
        self.metrics.anomalous(detector)

    def _next_seq(self) -> int:
        return self._seq.next()

    def _forgotten(self, state: InputState | None, input_id: bytes) -> bool:
        """Whether a known input is treated as new: only under ``dedupe_open_buffer_only``.

        That unsafe switch remembers ids only while they are in the open
        buffer, like a broker's dedupe window: a copy of an input already cut
        into a partial is folded again and its record replaced.
        """
        return (
            self._unsafe_dedupe_open_buffer_only
            and state is not None
            and input_id not in self.buffer.aggregate.input_ids
        )

    def _admit_partial(
        self,
        delivery: Delivery,
        model: ModelView,
        expected_tiers: tuple[Tier, ...],
    ) -> Admission:
        """Admission of a child partial (regional and central)."""
        with self.tracer.start_as_current_span(
            span_name(self.tier, "process"), context=extract_context(delivery.headers)
        ) as span:
            self.metrics.update_bytes(len(delivery.payload))
            try:
                return self._check_and_fold_partial(delivery, model, expected_tiers, span)
            except RemoteProtocolError as exc:
                self._count(span, Outcome.REJECTED, exc.reason)
                self.log.warning("rejected a partial on %s: %s", delivery.subject, exc)
                return Admission(delivery, Outcome.REJECTED, exc.reason)

    def _check_and_fold_partial(
        self,
        delivery: Delivery,
        model: ModelView,
        expected_tiers: tuple[Tier, ...],
        span: trace.Span,
    ) -> Admission:
        limits = self.config.limits
        envelope = parse_envelope(delivery.payload, limits)
        message = envelope.message
        if not isinstance(message, PartialAggregate):
            raise DecodeError(f"expected a partial, got a {message.KIND.value} message")
        span.set_attribute(ATTR_PARTIAL_ID, message.partial_id.hex())
        span.set_attribute(ATTR_SENDER, message.sender)
        key = self.keys.senders.get(message.sender)
        if key is None:
            raise UnknownSender(
                f"partial {message.partial_id.hex()} from unregistered sender {message.sender}"
            )
        envelope.verify(key)
        who = self.keys.senders.describe(message.sender)
        if message.fleet != self.config.fleet:
            raise rejection(
                Reason.WRONG_FLEET,
                f"partial {message.partial_id.hex()} from {who} is for fleet {message.fleet!r}",
            )
        if message.tier not in expected_tiers:
            raise DecodeError(
                f"partial {message.partial_id.hex()} from {who} comes from tier "
                f"{message.tier.value}; this {self.tier} takes {[t.value for t in expected_tiers]}"
            )
        model.check_layout(message.layout, message.num_params, f"partial from {who}")
        if not message.inputs or (
            derive_partial_id(message.sender, message.inputs) != message.partial_id
        ):
            raise DecodeError(
                f"partial {message.partial_id.hex()} from {who} has an id that does not derive "
                "from its sender and inputs"
            )
        state = self.store.input_state(message.sender, message.partial_id)
        forgotten = self._forgotten(state, message.partial_id)
        if state is not None and not forgotten:
            self._count(span, Outcome.DUPLICATE)
            self.log.info("partial %s from %s is a duplicate", message.partial_id.hex(), who)
            return Admission(
                delivery,
                Outcome.DUPLICATE,
                ticket=self.store.pending_ticket(message.sender, message.partial_id),
            )
        # Never refused for lateness: its device updates were acknowledged below.
        assessment = self.config.staleness.assess_acknowledged(
            self.known_version, message.known_version
        )
        span.set_attribute(ATTR_STALENESS, assessment.tau)
        if assessment.late and self._unsafe_reject_late:
            raise rejection(
                Reason.STALE,
                f"UNSAFE reject_late_partials: partial {message.partial_id.hex()} from {who} "
                f"was made at model v{message.known_version}; this {self.tier} knows "
                f"v{self.known_version}",
            )
        check_payload(
            envelope.payload, message.codec, message.num_params, max_norm=None, norm_policy="clip"
        )
        self._make_room(1, message.update_count)
        buffer = self.buffer
        fold_partial_message(
            buffer.aggregate,
            message,
            envelope.payload,
            extra_tau=assessment.tau,
            discount=assessment.discount,
        )
        accepted_ms = self.clock_ms()
        trace_parent = traceparent_of(span)
        ticket = self.store.submit_accept(
            InputRecord(
                sender=message.sender,
                input_id=message.partial_id,
                seq=message.seq,
                epoch=buffer.epoch,
                envelope=bytes(delivery.payload),
                base_version=message.min_base_version,
                n_samples=message.sample_count,
                tau=assessment.tau,
                discount=assessment.discount,
                clip_scale=1.0,
                accepted_ms=accepted_ms,
                trace=trace_parent,
            ),
            replace=forgotten,
        )
        self._note_accepted(span, message.sender, trace_parent, accepted_ms, assessment.tau)
        if assessment.late:
            span.set_attribute(ATTR_LATE, True)
            self._note_anomaly("late_partial")
            self.log.warning(
                "partial %s from %s was made at model v%d; this %s knows v%d, past "
                "max_staleness %d: folded with discount %.3g (its %d updates were acknowledged)",
                message.partial_id.hex(),
                who,
                message.known_version,
                self.tier,
                self.known_version,
                self.config.staleness.max_staleness,
                assessment.discount,
                message.update_count,
            )
        self.log.debug(
            "accepted partial %s from %s (%d updates, extra tau %d)",
            message.partial_id.hex(),
            who,
            message.update_count,
            assessment.tau,
        )
        return Admission(delivery, Outcome.ACCEPTED, ticket=ticket)

    def _refold_partials(self, recovery: Recovery) -> None:
        """Rebuild the open buffer from stored child partials, with their stored weights."""
        buffer = self.buffer
        for record in recovery.open_inputs:
            envelope = parse_envelope(record.envelope, self.config.limits)
            message = envelope.message
            assert isinstance(message, PartialAggregate)
            fold_partial_message(
                buffer.aggregate,
                message,
                envelope.payload,
                extra_tau=record.tau,
                discount=record.discount,
            )
            self._note_recovered(record)

    def _note_recovered(self, record: InputRecord) -> None:
        # Keep the flush deadline of the crashed run: the input's age is wall-clock age.
        age_s = max(0.0, (self.clock_ms() - record.accepted_ms) / 1000.0)
        self.buffer.note(
            sender=record.sender,
            trace_parent=record.trace,
            accepted_ms=record.accepted_ms,
            at=trio.current_time() - age_s,
        )

    # -- cutting a partial (edge, regional) ------------------------------------------------

    def _cut_partial(
        self, reason: str, tier: Tier, subject: str, codec: CodecSpec
    ) -> UplinkJob | None:
        buffer = self.buffer
        aggregate = buffer.aggregate
        if aggregate.is_empty:
            return None
        started = time.perf_counter()
        input_ids = list(aggregate.input_ids)
        model = self._model_view()
        with self.tracer.start_as_current_span(
            span_name(self.tier, "aggregate"),
            context=Context(),
            links=links_to(buffer.traces),
            attributes={
                ATTR_INPUT_IDS: [i.hex() for i in input_ids],
                ATTR_INPUT_COUNT: len(input_ids),
                ATTR_LEAF_COUNT: aggregate.update_count,
                ATTR_FLUSH_REASON: reason,
                ATTR_MODEL_VERSION: model.version,
            },
        ) as span:
            pid = derive_partial_id(self.key_id, input_ids)
            span.set_attribute(ATTR_PARTIAL_ID, pid.hex())
            seq = self._next_seq()
            try:
                payload = encode(np.asarray(aggregate.numerator), codec)
            except LocalProtocolError as exc:
                # Only an overflowing sum gets here; refolding would fail the same
                # way after a restart, so the epoch is dropped, loudly.
                self.log.error(
                    "epoch %d cannot be encoded as %s (%s); dropping its %d inputs",
                    buffer.epoch,
                    codec,
                    exc,
                    len(input_ids),
                )
                self.store.submit_flush(buffer.epoch, None, len(input_ids), seq)
                buffer.advance()
                return None
            assert aggregate.min_base_version is not None
            assert aggregate.max_base_version is not None
            message = PartialAggregate(
                fleet=self.config.fleet,
                sender=self.key_id,
                seq=seq,
                created_ms=self.clock_ms(),
                partial_id=pid,
                tier=tier,
                known_version=self.known_version,
                layout=model.layout,
                num_params=model.num_params,
                codec=codec,
                sample_count=float(aggregate.sample_count),
                weight_sum=float(aggregate.weight_sum),
                update_count=aggregate.update_count,
                staleness_hist=tuple(aggregate.staleness_hist),
                min_base_version=aggregate.min_base_version,
                max_base_version=aggregate.max_base_version,
                inputs=tuple(input_ids),
                leaves=tuple(aggregate.leaf_ids),
            )
            envelope = seal(message, payload, self.keys.identity)
            entry = OutboxEntry(
                partial_id=pid,
                epoch=buffer.epoch,
                seq=seq,
                subject=subject,
                envelope=envelope,
                trace=traceparent_of(span),
            )
            ticket = self.store.submit_flush(
                buffer.epoch,
                entry,
                len(input_ids),
                seq,
                replace=self._unsafe_dedupe_open_buffer_only,
            )
        self._report_cut(reason, len(input_ids), started)
        self.log.info(
            "epoch %d flushed (%s) as partial %s: %d inputs, %d updates, %g samples",
            buffer.epoch,
            reason,
            pid.hex(),
            len(input_ids),
            aggregate.update_count,
            aggregate.sample_count,
        )
        buffer.advance()
        return UplinkJob(entry, ticket)

    def _report_cut(self, reason: str, inputs: int, started: float) -> None:
        buffer = self.buffer
        self.metrics.inputs_flushed(inputs, reason)
        self.metrics.participation(len(buffer.senders))
        self.metrics.aggregation_duration(time.perf_counter() - started)
        if buffer.oldest_accepted_ms is not None:
            self.metrics.aggregate_latency(
                max(0.0, (self.clock_ms() - buffer.oldest_accepted_ms) / 1000.0)
            )
        self.metrics.buffer_depth(0)

    @abc.abstractmethod
    def _model_view(self) -> ModelView:
        """The model this daemon works against (its layout; its version)."""


class FollowerDaemon(TierDaemon):
    """An edge or regional daemon: it follows the central's model versions and sends partials."""

    def __init__(
        self,
        config: TierConfig,
        *,
        nats: Bus,
        registry_store: ModelRegistryReader,
        keys: TierKeys,
        metrics: TierMetricsLike | None,
        tracer: trace.Tracer | None,
        clock_ms: Callable[[], int] | None,
        store_in_thread: bool,
    ) -> None:
        super().__init__(
            config,
            keys=keys,
            metrics=metrics,
            tracer=tracer,
            clock_ms=clock_ms,
            store_in_thread=store_in_thread,
        )
        self.nats = nats
        self.registry = registry_store
        self.model: ModelView | None = None
        self._uplink: Uplink | None = None

    @property
    def known_version(self) -> int:
        """The newest verified model version (0 before any)."""
        return 0 if self.model is None else self.model.version

    @property
    def upstream(self) -> Uplink:
        """The partial publisher."""
        assert self._uplink is not None
        return self._uplink

    def _model_view(self) -> ModelView:
        assert self.model is not None
        return self.model

    async def _start(self, nursery: trio.Nursery, recovery: Recovery) -> None:
        if recovery.model_pointer is not None:
            try:
                _, pointer = open_model_pointer(
                    recovery.model_pointer, self.keys.central, self.config.fleet, self.config.limits
                )
            except RemoteProtocolError as exc:
                self.log.warning("stored model pointer no longer verifies (%s); ignoring it", exc)
            else:
                self._set_model(pointer, recovery.model_pointer)
        # Returns once a model is known: without it there is no layout to check against.
        await nursery.start(self._follow_models)
        assert self.model is not None
        self._buffer = OpenBuffer(self.model.num_params, recovery.open_epoch)
        self._refold(recovery)
        self._uplink = Uplink(
            self.nats,
            self.store,
            tier=self.tier,
            tracer=self.tracer,
            metrics=self.metrics,
            retry=self.config.retry,
            log=self.log,
            capacity=4,
            on_room=self.buffer.poke,
            drop_unconfirmed=self._unsafe_drop_unconfirmed,
        )
        await nursery.start(
            self._uplink.serve, [UplinkJob(entry) for entry in recovery.pending_outbox]
        )
        if recovery.open_inputs or recovery.pending_outbox:
            self.log.info(
                "recovered epoch %d with %d inputs and %d partials to resend",
                recovery.open_epoch,
                len(recovery.open_inputs),
                len(recovery.pending_outbox),
            )

    @abc.abstractmethod
    def _refold(self, recovery: Recovery) -> None:
        """Fold the recovered open inputs into the fresh buffer."""

    def _set_model(self, pointer: ModelAnnouncement, data: bytes) -> None:
        self.model = ModelView(pointer.version, pointer.layout, pointer.num_params, data)
        self.metrics.model_version(pointer.version)

    async def _relay_model(self, pointer: ModelAnnouncement, data: bytes) -> bool:
        """Pass a newly verified version on (the edge relays it to devices); False to skip it."""
        await trio.lowlevel.checkpoint()
        return True

    async def _follow_models(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Track the central's model versions; started once any version is known."""
        started = False
        if self.model is not None:
            task_status.started()
            started = True
        backoff = self.config.retry.initial_backoff_s
        while True:
            try:
                async with self.registry.watch_pointers() as pointers:
                    async for data in pointers:
                        backoff = self.config.retry.initial_backoff_s
                        await self._consider_pointer(data)
                        if not started and self.model is not None:
                            task_status.started()
                            started = True
            except BusError as exc:
                self.metrics.retry("watch_models")
                self.log.warning(
                    "model registry watch failed: %s; retrying in %.2f s", exc, backoff
                )
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.config.retry.max_backoff_s)

    async def _consider_pointer(self, data: bytes) -> None:
        try:
            _, pointer = open_model_pointer(
                data, self.keys.central, self.config.fleet, self.config.limits
            )
        except RemoteProtocolError as exc:
            self.log.warning("ignored a model pointer that does not verify: %s", exc)
            return
        current = self.model
        if current is not None and pointer.version <= current.version:
            return
        if current is not None and (pointer.layout, pointer.num_params) != (
            current.layout,
            current.num_params,
        ):
            self.log.error(
                "model v%d changes the layout to %s (%d values); a layout change needs a "
                "restart of this %s with a fresh state directory",
                pointer.version,
                pointer.layout.hex(),
                pointer.num_params,
                self.tier,
            )
            return
        if not await self._relay_model(pointer, data):
            return
        self._set_model(pointer, data)
        # Not awaited: after a crash the registry tells us again.
        self.store.submit_model_pointer(pointer.version, data)
        self.log.info("now at model v%d", pointer.version)
