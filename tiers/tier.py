"""The daemons' shell around the sans-IO tier core; imports protocol, trio and tiers.

Never imports ``client`` or ``simulations``, and never a concrete bus adapter:
daemons talk to ``protocol.bus.Bus`` and to ``tiers.model_registry``.

The core (``fedtier.tiers.core``) decides about each input and cuts partials;
this module adds the state store, the open buffer's wake-ups, the flush loop and
the clean shutdown, with the intake (``tiers._intake``: acks and receipts in
order) and the upstream workers (``tiers._upstream``: publish with retry).

Acceptance sequence of one delivery (docs/architecture.md, data guarantees),
the same at every tier::

    reader task (in delivery order, synchronous per delivery)
        the core's admission (parse -> sender -> signature -> fleet -> layout
           -> dedupe -> replay -> staleness -> finite / norm; see
           ``fedtier.tiers.core``) -> fold into the open buffer -> submit the
        record to the store (grouped commit) -> hand the delivery to the settler
    settler task (same order)
        wait for the record's commit -> ack the delivery -> receipt (edge)

Admission is synchronous, so the buffer, the dedupe index and the high-water
marks never see two deliveries interleave, while the settler waits for commits;
meanwhile the reader keeps admitting, which is what lets commits group. Every
rejection is counted with its reason and leaves the buffer untouched; a rejected
partial (its updates were receipted below) and any delivery whose admission
raised are quarantined in the commit their acknowledgement waits for, and
re-admitted through the core when the reason can go away (never ack-and-drop:
docs/operations.md, quarantine); the edge answers a rejected update with its
receipt. Before an input is folded, the running sums are checked to stay
finite (the open epoch is cut first when it would overflow), so a cut never
fails on them. A duplicate is acknowledged once the original's record is durable.

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
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, TypeVar

import trio
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from fedtier.protocol.bus import Delivery, Subscription
from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.envelope import parse_envelope
from fedtier.protocol.errors import (
    KvConflict,
    LocalProtocolError,
    Reason,
    StoreError,
    UpdateRejected,
)
from fedtier.protocol.messages import DeviceUpdate, PartialAggregate, Tier
from fedtier.protocol.telemetry import (
    ATTR_CLIP_SCALE,
    ATTR_FLUSH_REASON,
    ATTR_INPUT_COUNT,
    ATTR_INPUT_IDS,
    ATTR_LATE,
    ATTR_LEAF_COUNT,
    ATTR_MODEL_VERSION,
    ATTR_OUTCOME,
    ATTR_OUTLIER_SCORE,
    ATTR_OUTLIERS,
    ATTR_PARTIAL_ID,
    ATTR_REASON,
    ATTR_SENDER,
    ATTR_STALENESS,
    ATTR_WEIGHT,
    MESSAGING_MESSAGE_ID,
    SYSTEM_NATS,
    messaging_attributes,
    span_name,
)
from fedtier.tiers._intake import Admission, Intake
from fedtier.tiers._lease import Lease
from fedtier.tiers._quarantine import QuarantineLimits, retry_for
from fedtier.tiers._telemetry import (
    TierMetricsLike,
    default_tracer,
    extract_context,
    links_to,
    quiet_metrics,
    traceparent_of,
)
from fedtier.tiers._upstream import UplinkJob, UpstreamWorker
from fedtier.tiers.config import TierConfig
from fedtier.tiers.core import (
    F32_SAFE,
    AcceptedInput,
    AdmissionRules,
    Decision,
    ModelView,
    Outcome,
    RobustRules,
    TierBuffer,
    admit_partial,
    admit_update,
    build_partial,
    fold_bound,
    robust_cut,
)
from fedtier.tiers.faults import unsafe
from fedtier.tiers.registry import TierKeys
from fedtier.tiers.store import (
    CommitTicket,
    InputRecord,
    InputState,
    OutboxEntry,
    QuarantineRecord,
    Recovery,
    Retry,
    StateStore,
    open_state_store,
)

__all__ = [
    "OpenBuffer",
    "StoreLedger",
    "TierDaemon",
    "wall_clock_ms",
]

J = TypeVar("J")
T = TypeVar("T")


def _input_id(message: DeviceUpdate | PartialAggregate) -> bytes:
    return message.update_id if isinstance(message, DeviceUpdate) else message.partial_id


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch (``created_ms`` of signed messages)."""
    return time.time_ns() // 1_000_000


# -- the open buffer ------------------------------------------------------------------


class OpenBuffer(TierBuffer):
    """The core's open buffer, plus a trio event that wakes the flush loop when it changes."""

    def __init__(self, num_params: int, epoch: int) -> None:
        super().__init__(num_params, epoch)
        self._changed = trio.Event()
        self.abs_bound = 0.0
        """Upper bound of every absolute value of the numerator (sum of :func:`fold_bound`)."""
        self.envelope_sizes: dict[bytes, int] = {}
        """Envelope bytes per input id, while ``keep_inputs`` (the quarantine's byte count)."""

    def advance(self) -> None:
        """Start the next epoch with an empty accumulator."""
        super().advance()
        self.abs_bound = 0.0
        self.envelope_sizes = {}
        self.poke()

    def poke(self) -> None:
        """Wake whoever waits in :meth:`wait_changed` (new input, cut, room upstream)."""
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Wait until the buffer changes or the upstream has room again."""
        await self._changed.wait()


# -- the daemon skeleton --------------------------------------------------------------


class StoreLedger:
    """What a daemon has seen, for the core's admission: its state store's dedupe index.

    Under the unsafe switch ``dedupe_open_buffer_only`` it remembers ids only
    while they are in the open buffer, like a broker's dedupe window: a copy of
    an input already cut into a partial is taken as new, folded again and its
    record replaced (:meth:`forgot` tells the daemon to replace it).
    """

    def __init__(self, daemon: TierDaemon) -> None:
        self._daemon = daemon
        self._forgotten: tuple[str, bytes] | None = None

    def _state(self, sender: str, input_id: bytes) -> tuple[InputState | None, bool]:
        daemon = self._daemon
        state = daemon.store.input_state(sender, input_id)
        forgotten = (
            daemon._unsafe_dedupe_open_buffer_only
            and state is not None
            and input_id not in daemon.buffer.accumulator.input_ids
        )
        return state, forgotten

    def is_known(self, sender: str, input_id: bytes, /) -> bool:
        """Whether the store holds ``(sender, input_id)`` and the unsafe switch keeps it."""
        state, forgotten = self._state(sender, input_id)
        self._forgotten = (sender, input_id) if forgotten else None
        return state is not None and not forgotten

    def seq_used_elsewhere(self, sender: str, seq: int, input_id: bytes, /) -> bool:
        """Whether an accepted input of ``sender`` took ``seq`` (this one is new, so another).

        Also true at or below the sender's floor (the highest seq the retention
        prune deleted): the input that held it is forgotten, and may be this one.
        """
        if self._forgotten == (sender, input_id):
            return False  # a forgotten input took its own seq: it is no replay
        return self._daemon.store.seq_taken(sender, seq)

    def forgot(self, sender: str, input_id: bytes) -> bool:
        """Whether the last :meth:`is_known` forgot this input (its record must be replaced)."""
        return self._forgotten == (sender, input_id)

    def counted_leaves(self, leaves: Sequence[bytes], /) -> Sequence[bytes]:
        """The leaves an accepted child partial already carried (the store's ``leaves`` index).

        ``dedupe_open_buffer_only`` turns the index off with the rest of the
        store's dedupe: a windowed dedupe, which the switch stands for, keeps
        no leaf index either, and the switch's chaos run must then show the
        duplicates that the store's dedupe prevents.
        """
        if self._daemon._unsafe_dedupe_open_buffer_only:
            return ()
        return self._daemon.store.counted_leaves(leaves)


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
    accepts: ClassVar[tuple[Tier, ...]] = ()
    """Which tiers' partials it folds (none at the edge, which folds device updates)."""

    @classmethod
    def load_keys(cls, config: TierConfig) -> TierKeys:
        """Its identity, the keys of the senders it accepts and the pinned central key."""
        return TierKeys.load(
            config.identity_key,
            config.sender_keys,
            config.central_key,
            role=cls.sender_role,
            root=config.root_key,
            certificates=config.certificates,
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
        self._seen = StoreLedger(self)
        self._rules = self._admission_rules()
        self.quarantine_limits: QuarantineLimits = config.quarantine
        self.readmitted = 0
        """Quarantined inputs folded by a re-admission pass since start."""
        self._cut_retry_pending = False
        self._readmitting = False
        self._internal_errors_logged: set[str] = set()
        self._quarantine_reasons: set[str] = set()
        robust = getattr(config, "robust", None)
        self.robust = robust if isinstance(robust, RobustRules) else RobustRules()
        """``[robust]``: robust aggregation within each cut (edge and regional)."""
        self.outliers = 0
        """Inputs quarantined as outliers at a cut since start."""
        self.lease: Lease | None = None
        """``[lease]``: input is taken only while this is held (set by the daemon shell)."""
        self.standby = False
        """Waiting for the lease (``fedtier status`` says ``standby``)."""

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
                    # Inputs quarantined before a restart (or released by an operator)
                    # get their chance once the buffer and the model exist.
                    self.readmit_quarantined()
                    lease = self.lease
                    if lease is not None:
                        nursery.start_soon(lease.run)
                        # A standby is started as far as systemd is concerned: it
                        # serves its probes and status, and waits for the lease.
                        self.standby = True
                        task_status.started()
                        if not await self._wait_for_lease(lease):
                            deadline = trio.current_time() + self.config.shutdown_timeout_s
                            await self._shut_down_cleanly(deadline)
                            with trio.move_on_at(deadline):
                                await lease.release()  # taken just as the shutdown came
                            nursery.cancel_scope.cancel()
                            return
                        self.standby = False
                        await self._on_takeover()
                        # What the takeover put back into the quarantine is tried again.
                        self.readmit_quarantined()
                        self.buffer.poke()
                    self._intake = Intake(
                        self._admit_safely,
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
                        if lease is None:
                            task_status.started()
                        await self._until_shutdown_or_lost(lease)
                        # One deadline for the whole clean shutdown; past it the
                        # daemon just stops, which loses nothing acknowledged.
                        deadline = trio.current_time() + self.config.shutdown_timeout_s
                        self._intake.stop()
                        await self._before_settling(deadline)
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
                    if lease is not None:
                        with trio.move_on_at(deadline + self.config.shutdown_timeout_s):
                            await lease.release()
                    nursery.cancel_scope.cancel()
            finally:
                self._store = None

    # -- more than one instance: the lease (tiers._lease) -------------------------------

    async def _wait_for_lease(self, lease: Lease) -> bool:
        """Wait as a standby until ``lease`` is held (True) or a shutdown is asked for (False)."""
        self.log.info("%s %s is standby: waiting for lease %s", self.tier, self.key_id, lease.key)
        async with trio.open_nursery() as race:

            async def held() -> None:
                await lease.wait_held()
                race.cancel_scope.cancel()

            async def shutdown() -> None:
                await self._shutdown.wait()
                race.cancel_scope.cancel()

            race.start_soon(held)
            race.start_soon(shutdown)
        return lease.held.is_set() and not self._shutdown.is_set()

    async def _until_shutdown_or_lost(self, lease: Lease | None) -> None:
        """Return when a clean shutdown is asked for; raise when the lease is lost.

        Raises:
            KvConflict: the lease was lost. The daemon stops at once, without a
                flush or a wait for settling (which would take input it no
                longer owns); what it acknowledged is in its store and goes
                upstream when it next holds the lease. Under systemd the
                process is restarted and waits as a standby.
        """
        if lease is None:
            await self._shutdown.wait()
            return
        async with trio.open_nursery() as race:

            async def lost() -> None:
                await lease.wait_lost()
                race.cancel_scope.cancel()

            async def shutdown() -> None:
                await self._shutdown.wait()
                race.cancel_scope.cancel()

            race.start_soon(lost)
            race.start_soon(shutdown)
        if not self._shutdown.is_set():
            assert self._intake is not None
            self._intake.stop()
            raise KvConflict(
                f"lease {lease.key} lost: another instance may be active; this {self.tier} "
                "stops taking input (restart it to wait as a standby)"
            )

    @property
    def cuts_paused(self) -> bool:
        """Whether cuts wait for the lease (a regional that holds deliveries; see regional.py)."""
        return False

    async def _on_takeover(self) -> None:
        """Called once the lease is held, before the input opens (the regional re-sends intents)."""
        await trio.lowlevel.checkpoint()

    async def _before_settling(self, deadline: float) -> None:
        """Called after the input stopped, before waiting for what was admitted to settle."""
        await trio.lowlevel.checkpoint()

    async def _cut_until_settled(self, deadline: float) -> None:
        """Cut what was admitted until the intake has settled, by ``deadline``.

        For a tier that acknowledges a delivery only once a partial or version
        holding it is durable upstream (``[lease]`` at the regional and the
        central): its held deliveries settle only after such cuts, so at
        shutdown it keeps cutting while the intake still holds any.
        """
        intake = self._intake
        if self.cuts_paused or intake is None:
            await trio.lowlevel.checkpoint()
            return
        with trio.move_on_at(deadline):
            while not intake.finished.is_set():
                await self._send_stashed()
                job = self._cut("shutdown")
                if job is not None:
                    await self.upstream.put(job)
                async with trio.open_nursery() as race:

                    async def changed() -> None:
                        await self.buffer.wait_changed()
                        race.cancel_scope.cancel()

                    async def finished() -> None:
                        await intake.finished.wait()
                        race.cancel_scope.cancel()

                    race.start_soon(changed)
                    race.start_soon(finished)

    async def _shut_down_cleanly(self, deadline: float) -> None:
        timeout_s = self.config.shutdown_timeout_s
        if self.cuts_paused:
            # A standby that holds deliveries has nothing of its own to flush:
            # what it folded is unacknowledged and goes to the active instance.
            self.log.info("%s %s (standby) stopped", self.tier, self.key_id)
            return
        with trio.move_on_at(deadline) as scope:
            await self._send_stashed()
            job = None if self.cuts_paused else self._cut("shutdown")
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
            if deadline is None or not self.upstream.has_room() or self.cuts_paused:
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
        if self.cuts_paused:
            return
        reason = self.buffer.due(self.config.flush, trio.current_time())
        if reason is None or not self.upstream.has_room():
            return
        job = self._cut(str(reason))
        if job is not None:
            await self.upstream.put(job)
        if self._cut_retry_pending:
            # Inputs refused because this epoch would have overflowed fit the next one.
            self._cut_retry_pending = False
            self.readmit_quarantined(after_cut_only=True)

    def _make_room(self, inputs: int, leaves: int) -> None:
        """Cut first when folding would push the buffer past the id caps of one partial."""
        if not self.buffer.has_room(inputs, leaves, self.config.limits.max_ids):
            self._stash_cut("ids")

    def _stash_cut(self, reason: str) -> None:
        """Cut now, synchronously; the job goes upstream before the next flush's."""
        job = self._cut(reason)
        if job is not None:
            self._stashed.append(job)

    # -- the shell around the core's admission --------------------------------------------

    def _admission_rules(self) -> AdmissionRules:
        """What this tier checks inputs against (the edge adds its norm bound)."""
        return AdmissionRules(
            fleet=self.config.fleet,
            limits=self.config.limits,
            staleness=self.config.staleness,
            accepts=self.accepts,
            reject_late_partials=self._unsafe_reject_late,
            max_samples_per_update=self.config.max_samples_per_update,
        )

    def _count(self, span: trace.Span, outcome: Outcome, reason: str = "") -> None:
        self.counts[(outcome.value, reason)] += 1
        self.metrics.update_outcome(outcome.value, reason)
        span.set_attribute(ATTR_OUTCOME, outcome.value)
        if reason:
            span.set_attribute(ATTR_REASON, reason)

    def _annotate(
        self, span: trace.Span, decision: Decision, id_attr: str, sender_attr: str
    ) -> None:
        """Put what the input claims, and its staleness once known, on its process span."""
        if decision.input_id is not None:
            span.set_attribute(id_attr, decision.input_id.hex())
            span.set_attribute(MESSAGING_MESSAGE_ID, decision.input_id.hex())
        if decision.sender is not None:
            span.set_attribute(sender_attr, decision.sender)
        if decision.tau is not None:
            span.set_attribute(ATTR_STALENESS, decision.tau)
        if decision.accepted is not None:
            accepted = decision.accepted
            span.set_attribute(ATTR_WEIGHT, float(accepted.n_samples * accepted.discount))
            span.set_attribute(ATTR_CLIP_SCALE, float(accepted.clip_scale))

    def _overflow(self, accepted: AcceptedInput) -> tuple[float, str | None]:
        """What folding ``accepted`` adds to the numerator's bound, and why it must not fold.

        The running sums must stay finite through the commit of every accepted
        input, or the epoch could not be cut (docs/operations.md, quarantine):
        the scalars are checked exactly, the float32 numerator through a bound
        (the sum of weight times largest value of every input folded), which
        holds for any fold order and costs at most one pass over the payload.
        """
        acc = self.buffer.accumulator
        message = accepted.message
        if isinstance(message, PartialAggregate):
            samples = acc.sample_count + message.sample_count
            weight = acc.weight_sum + accepted.discount * message.weight_sum
        else:
            samples = acc.sample_count + accepted.n_samples
            weight = acc.weight_sum + accepted.n_samples * accepted.discount
        if not (math.isfinite(samples) and math.isfinite(weight)):
            return 0.0, (
                f"folding it would make the epoch's sample count or weight infinite "
                f"({acc.sample_count:g} + {accepted.n_samples:g})"
            )
        bound = fold_bound(
            message,
            accepted.payload,
            discount=accepted.discount,
            clip_scale=accepted.clip_scale,
            n_samples=accepted.n_samples,
            norm=accepted.norm,
        )
        if not self.buffer.abs_bound + bound <= F32_SAFE and math.isfinite(accepted.norm):
            # The L2 norm overstates the largest value by up to sqrt(n): look closer.
            bound = fold_bound(
                message,
                accepted.payload,
                discount=accepted.discount,
                clip_scale=accepted.clip_scale,
                n_samples=accepted.n_samples,
            )
        if not self.buffer.abs_bound + bound <= F32_SAFE:
            return bound, (
                f"folding it could overflow the float32 sum (a value up to {bound:.3g} onto "
                f"{self.buffer.abs_bound:.3g})"
            )
        return bound, None

    def _fold_and_record(
        self, delivery: Delivery, accepted: AcceptedInput, span: trace.Span
    ) -> CommitTicket:
        """Fold an admitted input into the open buffer and submit its record to the store.

        Both happen synchronously, in delivery order, so the buffer and the
        committer (FIFO) never disagree about what an epoch holds.

        Raises:
            UpdateRejected: ``non_finite``: folding would overflow the epoch's sums
                (checked before anything changes; the caller refuses the input).
        """
        return self._fold_record(bytes(delivery.payload), accepted, span)

    def _fold_record(
        self,
        envelope: bytes,
        accepted: AcceptedInput,
        span: trace.Span,
        *,
        quarantine_id: int | None = None,
        exempt: bool = False,
    ) -> CommitTicket:
        bound, overflow = self._overflow(accepted)
        if overflow is not None and not self.buffer.is_empty:
            # It may fit the next epoch: cut this one first.
            self._stash_cut("overflow")
            bound, overflow = self._overflow(accepted)
        if overflow is not None:
            raise UpdateRejected(
                f"input {accepted.input_id.hex()} from {accepted.sender}: {overflow}",
                reason=Reason.NON_FINITE,
            )
        self._make_room(1, accepted.update_count)
        buffer = self.buffer
        accepted_ms = self.clock_ms()
        trace_parent = traceparent_of(span)
        buffer.fold(
            accepted,
            now=trio.current_time(),
            accepted_ms=accepted_ms,
            tag=trace_parent,
            exempt=exempt,
        )
        buffer.abs_bound += bound
        if buffer.keep_inputs:
            buffer.envelope_sizes[accepted.input_id] = len(envelope)
        buffer.poke()
        ticket = self.store.submit_accept(
            InputRecord(
                sender=accepted.sender,
                input_id=accepted.input_id,
                seq=accepted.seq,
                epoch=buffer.epoch,
                envelope=envelope,
                base_version=accepted.base_version,
                n_samples=accepted.n_samples,
                tau=accepted.tau,
                discount=accepted.discount,
                clip_scale=accepted.clip_scale,
                accepted_ms=accepted_ms,
                trace=trace_parent,
                leaves=(
                    accepted.message.leaves
                    if isinstance(accepted.message, PartialAggregate)
                    else ()
                ),
            ),
            replace=self._seen.forgot(accepted.sender, accepted.input_id),
            quarantine_id=quarantine_id,
        )
        if exempt and buffer.keep_inputs:
            # Same transaction as the accept (synchronous submits): a refold keeps it exempt.
            self.store.submit_robust_exempt(accepted.sender, accepted.input_id, exempt=True)
        self._count(span, Outcome.ACCEPTED)
        self.metrics.staleness(accepted.tau)
        self.metrics.buffer_depth(buffer.accumulator.input_count)
        return ticket

    def _note_anomaly(self, detector: str) -> None:
        self.anomalies[detector] += 1
        self.metrics.anomalous(detector)

    def _next_seq(self) -> int:
        return self._seq.next()

    def _admit_partial(self, delivery: Delivery) -> Admission:
        """Admission of a child partial (regional and central), by the core."""
        with self.tracer.start_as_current_span(
            span_name(self.tier, "process"),
            context=extract_context(delivery.headers),
            kind=SpanKind.CONSUMER,
            attributes=messaging_attributes(
                SYSTEM_NATS,
                "process",
                delivery.subject,
                body_size=len(delivery.payload),
                client_id=self.key_id,
            ),
        ) as span:
            self.metrics.update_bytes(len(delivery.payload))
            decision = admit_partial(
                delivery.payload,
                rules=self._rules,
                senders=self.keys.senders,
                model=self._model_view(),
                seen=self._seen,
                tier=self.tier,
            )
            self._annotate(span, decision, ATTR_PARTIAL_ID, ATTR_SENDER)
            if decision.outcome is Outcome.REJECTED:
                assert decision.reason is not None
                self._count(span, Outcome.REJECTED, decision.reason)
                self.log.warning(
                    "rejected a partial on %s (%s), quarantined: %s",
                    delivery.subject,
                    decision.reason,
                    decision.error,
                )
                # Its device updates were receipted below: keep it, never drop it.
                return self._quarantine(
                    delivery,
                    decision.reason,
                    sender=decision.sender,
                    input_id=decision.input_id,
                    detail=str(decision.error),
                )
            assert decision.sender is not None
            assert decision.input_id is not None
            who = self.keys.senders.describe(decision.sender)
            pid = decision.input_id.hex()
            if decision.outcome is Outcome.DUPLICATE:
                self._count(span, Outcome.DUPLICATE)
                self.log.info("partial %s from %s is a duplicate", pid, who)
                return Admission(
                    delivery,
                    Outcome.DUPLICATE,
                    ticket=self.store.pending_ticket(decision.sender, decision.input_id),
                )
            accepted = decision.accepted
            assert accepted is not None
            try:
                ticket = self._fold_and_record(delivery, accepted, span)
            except UpdateRejected as exc:
                self._count(span, Outcome.REJECTED, exc.reason)
                self.log.warning("partial %s from %s quarantined: %s", pid, who, exc)
                return self._quarantine(
                    delivery,
                    exc.reason,
                    sender=decision.sender,
                    input_id=decision.input_id,
                    detail=str(exc),
                    # Alone in an empty buffer it can never fit; otherwise after the cut.
                    retry="never" if self.buffer.is_empty else "cut",
                )
            message = accepted.message
            if accepted.late:
                assert isinstance(message, PartialAggregate)
                span.set_attribute(ATTR_LATE, True)
                self._note_anomaly("late_partial")
                self.log.warning(
                    "partial %s from %s was made at model v%d; this %s knows v%d, past "
                    "max_staleness %d: folded with discount %.3g (its %d updates were "
                    "acknowledged)",
                    pid,
                    who,
                    message.known_version,
                    self.tier,
                    self.known_version,
                    self.config.staleness.max_staleness,
                    accepted.discount,
                    accepted.update_count,
                )
            self.log.debug(
                "accepted partial %s from %s (%d updates, extra tau %d)",
                pid,
                who,
                accepted.update_count,
                accepted.tau,
            )
            return Admission(delivery, Outcome.ACCEPTED, ticket=ticket)

    def _empty_buffer(self) -> None:
        """Replace the open buffer by an empty one of the same epoch (a takeover forgot its inputs).

        The store must have forgotten them in the same step; the deadline task,
        which waits on the old buffer, is woken.
        """
        old = self.buffer
        self._buffer = OpenBuffer(old.accumulator.num_params, old.epoch)
        self._buffer.keep_inputs = self.robust.enabled
        old.poke()

    def _refold(self, recovery: Recovery) -> None:
        """Rebuild the open buffer from the stored inputs, one at a time, with their stored weights.

        With ``[robust]`` on, the buffer keeps its inputs again (and which ones
        an operator released), so the cut decides as the crashed run would have.
        """
        buffer = self.buffer
        buffer.keep_inputs = self.robust.enabled
        exempt = self.store.robust_exempt() if buffer.keep_inputs else set()
        for record in recovery.open_inputs:
            envelope = parse_envelope(record.envelope, self.config.limits)
            message = envelope.message
            assert isinstance(message, (DeviceUpdate, PartialAggregate))
            # Keep the flush deadline of the crashed run: an input's age is wall-clock age.
            age_s = max(0.0, (self.clock_ms() - record.accepted_ms) / 1000.0)
            buffer.refold(
                message,
                envelope.payload,
                tau=record.tau,
                discount=record.discount,
                clip_scale=record.clip_scale,
                n_samples=record.n_samples,
                now=trio.current_time() - age_s,
                accepted_ms=record.accepted_ms,
                tag=record.trace,
                exempt=(record.sender, record.input_id) in exempt,
            )
            if buffer.keep_inputs:
                buffer.envelope_sizes[record.input_id] = len(record.envelope)
            buffer.abs_bound += fold_bound(
                message,
                envelope.payload,
                discount=record.discount,
                clip_scale=record.clip_scale,
                n_samples=record.n_samples,
            )
            # The store reads each envelope when it is taken: dropping this one
            # before the next is read keeps one envelope in memory, not the buffer's.
            del record, envelope, message
        buffer.poke()

    # -- quarantine: never acknowledge an input and drop it ---------------------------------

    def _admit_safely(self, delivery: Delivery) -> Admission:
        """:meth:`_admit`, with any exception turned into a typed rejection (quarantined).

        One delivery must never crash the daemon: the broker would redeliver it
        and crash it again. A failing store still stops it (``StoreError``).
        """
        try:
            return self._admit(delivery)
        except StoreError:
            raise
        except UpdateRejected as exc:
            reason: Reason = exc.reason
            detail = str(exc)
            self.log.warning("input on %s refused (%s): %s", delivery.subject, reason, exc)
        except Exception as exc:
            reason = Reason.INTERNAL_ERROR
            detail = f"{type(exc).__name__}: {exc}"
            kind = type(exc).__name__
            if kind not in self._internal_errors_logged:
                # The traceback once per kind of error; the count says how often.
                self._internal_errors_logged.add(kind)
                self.log.exception(
                    "admission of a delivery on %s failed; quarantined as %s",
                    delivery.subject,
                    reason,
                )
            else:
                self.log.error(
                    "admission of a delivery on %s failed (%s); quarantined as %s",
                    delivery.subject,
                    detail,
                    reason,
                )
        self.counts[(Outcome.REJECTED.value, reason.value)] += 1
        self.metrics.update_outcome(Outcome.REJECTED.value, reason.value)
        return self._quarantine(delivery, reason, sender=None, input_id=None, detail=detail)

    def _quarantine(
        self,
        delivery: Delivery,
        reason: Reason,
        *,
        sender: str | None,
        input_id: bytes | None,
        detail: str,
        retry: Retry | None = None,
    ) -> Admission:
        """Store a delivery the tier cannot use; acknowledged once that is durable.

        Past a bound it is left unacknowledged instead (the broker keeps it),
        counted in ``fedtier_quarantine_refusals`` and logged as an error.
        """
        store = self.store
        payload = bytes(delivery.payload)
        who = sender or ""
        usage = store.quarantine_usage
        limits = self.quarantine_limits
        rows, held = usage.by_sender.get(who, (0, 0))
        if (
            rows + 1 > limits.max_inputs_per_sender
            or held + len(payload) > limits.max_bytes_per_sender
            or usage.total_bytes + len(payload) > limits.max_bytes
        ):
            refused = getattr(self.metrics, "quarantine_refused", None)
            if refused is not None:
                refused()
            self.log.error(
                "quarantine full (%d inputs, %d bytes from %s; %d bytes in all): a %s input "
                "on %s is left unacknowledged for the broker to redeliver",
                rows,
                held,
                who or "unknown senders",
                usage.total_bytes,
                reason,
                delivery.subject,
            )
            return Admission(delivery, Outcome.REJECTED, reason, ack=False)
        retry = retry if retry is not None else retry_for(reason)
        _, ticket = store.submit_quarantine(
            sender=who,
            input_id=input_id,
            subject=delivery.subject,
            reason=reason.value,
            retry=retry,
            detail=detail,
            envelope=payload,
            received_ms=self.clock_ms(),
        )
        if retry == "cut":
            self._cut_retry_pending = True
        self._report_quarantine()
        return Admission(delivery, Outcome.REJECTED, reason, ticket=ticket)

    def _report_quarantine(self) -> None:
        report = getattr(self.metrics, "quarantine", None)
        if report is None or self._store is None:
            return
        usage = self.store.quarantine_usage
        self._quarantine_reasons.update(usage.by_reason)
        report({r: usage.by_reason.get(r, 0) for r in self._quarantine_reasons}, usage.total_bytes)

    def _readmission(self, row: QuarantineRecord) -> Decision | None:
        """The core's decision about a quarantined input now; None where it cannot be re-run."""
        if not self.accepts:
            if not row.released:
                return None  # the edge answers devices with receipts; its rows are for operators
            # An operator released it (an outlier, say): the device has its receipt
            # already, so only the stateless bounds apply (no rate limit, no quota).
            return admit_update(
                row.envelope,
                rules=self._rules,
                senders=self.keys.senders,
                model=self._model_view(),
                seen=self._seen,
                topic_device=row.sender or None,
            )
        return admit_partial(
            row.envelope,
            rules=self._rules,
            senders=self.keys.senders,
            model=self._model_view(),
            seen=self._seen,
            tier=self.tier,
        )

    def readmit_quarantined(self, *, after_cut_only: bool = False) -> int:
        """Run quarantined inputs through the core's admission again; returns how many folded.

        Called at start, after a key-registry reload (SIGHUP), after a model
        change and (``after_cut_only``) after a cut. Synchronous, like an
        admission, so no delivery interleaves. A row that becomes an input is
        deleted in the commit that records it; one that is now a duplicate is
        deleted (it was folded already); one refused again stays, with its new
        reason. So a quarantined input is folded at most once, whoever releases it.
        """
        if self._store is None or self._buffer is None or self._readmitting:
            return 0
        self._readmitting = True
        folded = 0
        try:
            for row in self.store.quarantined_for_readmission(after_cut_only=after_cut_only):
                if self._readmit_one(row):
                    folded += 1
        finally:
            self._readmitting = False
            self._report_quarantine()
        if folded:
            self.readmitted += folded
            self.log.info("re-admitted %d quarantined inputs", folded)
        return folded

    def _readmit_one(self, row: QuarantineRecord) -> bool:
        with self.tracer.start_as_current_span(span_name(self.tier, "process")) as span:
            try:
                decision = self._readmission(row)
                if decision is None:
                    return False
                if decision.outcome is Outcome.DUPLICATE:
                    self.store.submit_unquarantine(row.qid, counted_as="a duplicate")
                    return False
                if decision.outcome is Outcome.REJECTED:
                    assert decision.reason is not None
                    if decision.reason.value != row.reason or row.released:
                        self.store.submit_requarantine(
                            row.qid,
                            decision.reason.value,
                            retry_for(decision.reason),
                            str(decision.error),
                        )
                    return False
                accepted = decision.accepted
                assert accepted is not None
                try:
                    # Released by an operator: it is not scored as an outlier again.
                    self._fold_record(
                        row.envelope, accepted, span, quarantine_id=row.qid, exempt=row.released
                    )
                except UpdateRejected as exc:
                    retry: Retry = "never" if self.buffer.is_empty else "cut"
                    self.store.submit_requarantine(row.qid, exc.reason.value, retry, str(exc))
                    self._cut_retry_pending = self._cut_retry_pending or retry == "cut"
                    return False
            except StoreError:
                raise
            except Exception as exc:
                # Like a delivery: one bad row never stops the daemon; it stays quarantined.
                self.log.warning("re-admission of quarantined row %d failed: %s", row.qid, exc)
                return False
            self.store.unquarantine_op(row.qid)
            self._count(span, Outcome.ACCEPTED)
            self.log.info(
                "quarantined %s from %s (row %d, was %s) re-admitted",
                "input" if row.input_id is None else row.input_id.hex(),
                self.keys.senders.describe(row.sender) if row.sender else "an unknown sender",
                row.qid,
                row.reason,
            )
            return True

    # -- cutting a partial (edge, regional) ------------------------------------------------

    def _cut_partial(
        self, reason: str, tier: Tier, subject: str, codec: CodecSpec
    ) -> UplinkJob | None:
        buffer = self.buffer
        accumulator = buffer.accumulator
        if accumulator.is_empty:
            return None
        started = time.perf_counter()
        input_ids = list(accumulator.input_ids)
        model = self._model_view()
        with self.tracer.start_as_current_span(
            span_name(self.tier, "aggregate"),
            context=Context(),
            links=links_to(buffer.tags),
            attributes={
                ATTR_INPUT_IDS: [i.hex() for i in input_ids],
                ATTR_INPUT_COUNT: len(input_ids),
                ATTR_LEAF_COUNT: accumulator.update_count,
                ATTR_FLUSH_REASON: reason,
                ATTR_MODEL_VERSION: model.version,
            },
        ) as span:
            seq = self._next_seq()
            try:
                cut = robust_cut(buffer, self.robust) if buffer.keep_inputs else None
                if cut is not None:
                    accumulator = cut.accumulator
                message, envelope = build_partial(
                    accumulator,
                    identity=self.keys.identity,
                    fleet=self.config.fleet,
                    tier=tier,
                    known_version=self.known_version,
                    layout=model.layout,
                    num_params=model.num_params,
                    codec=codec,
                    seq=seq,
                    created_ms=self.clock_ms(),
                    numerator=None if cut is None else cut.numerator,
                )
            except (LocalProtocolError, ArithmeticError, ValueError) as exc:
                # The finite-sum check at admission keeps this from happening; if it
                # still does, the acknowledged inputs go to quarantine, never away.
                self._quarantine_epoch(f"epoch cannot be encoded as {codec}: {exc}", seq)
                return None
            if cut is not None and cut.outliers:
                # Submitted just before the flush, synchronously: one transaction.
                self._quarantine_outliers(span, cut.outliers, cut.distances, cut.scores)
            pid = message.partial_id
            span.set_attribute(ATTR_PARTIAL_ID, pid.hex())
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
                accumulator.input_count,
                seq,
                replace=self._unsafe_dedupe_open_buffer_only,
            )
            for kept in buffer.inputs:
                if kept.exempt:
                    self.store.submit_robust_exempt(
                        kept.message.sender, _input_id(kept.message), exempt=False
                    )
        self._report_cut(reason, accumulator.input_count, started)
        self.log.info(
            "epoch %d flushed (%s) as partial %s: %d inputs, %d updates, %g samples",
            buffer.epoch,
            reason,
            pid.hex(),
            accumulator.input_count,
            accumulator.update_count,
            accumulator.sample_count,
        )
        buffer.advance()
        return UplinkJob(entry, ticket)

    def _quarantine_outliers(
        self,
        span: trace.Span,
        outliers: Sequence[int],
        distances: Sequence[float],
        scores: Sequence[float],
    ) -> None:
        """Move a cut's outliers into the quarantine: counted, traced and logged, never folded.

        They were acknowledged (a device holds an ``accepted`` receipt for each of
        their updates), so they are kept with reason ``outlier`` until an operator
        releases (``fedtier quarantine release``) or drops them.
        """
        buffer = self.buffer
        rules = self.robust
        rows: list[tuple[str, bytes, str, int]] = []
        ids: list[str] = []
        for index in outliers:
            message = buffer.inputs[index].message
            input_id = _input_id(message)
            detail = (
                f"{rules.outlier_score} distance {distances[index]:.6g} to the buffer's "
                f"coordinate-wise median of {len(buffer.inputs)} inputs; robust z-score "
                f"{scores[index]:.3g} > threshold {rules.threshold:g}"
            )
            rows.append((message.sender, input_id, detail, buffer.envelope_sizes.get(input_id, 0)))
            ids.append(input_id.hex())
            span.add_event(
                "outlier",
                {
                    ATTR_SENDER: message.sender,
                    ATTR_INPUT_IDS: [input_id.hex()],
                    ATTR_OUTLIER_SCORE: scores[index],
                },
            )
            self._note_anomaly(Reason.OUTLIER.value)
            self.log.warning(
                "epoch %d: input %s from %s is an outlier (%s); quarantined, not folded",
                buffer.epoch,
                input_id.hex(),
                self.keys.senders.describe(message.sender),
                detail,
            )
        span.set_attribute(ATTR_OUTLIERS, ids)
        self.store.submit_quarantine_outliers(buffer.epoch, rows, reason=Reason.OUTLIER.value)
        self.outliers += len(rows)
        self._report_quarantine()

    def _quarantine_epoch(self, why: str, seq: int) -> None:
        """Close the open epoch by moving its acknowledged inputs into the quarantine.

        They come back through admission after the next cut (``retry = 'cut'``),
        each refused then only if it alone cannot be folded.
        """
        buffer = self.buffer
        count = buffer.accumulator.input_count
        self.log.error(
            "epoch %d: %s; its %d inputs are quarantined, to be re-admitted after this cut",
            buffer.epoch,
            why,
            count,
        )
        self.store.submit_quarantine_epoch(
            buffer.epoch,
            reason=Reason.NON_FINITE.value,
            detail=why,
            input_count=count,
            out_seq=seq,
        )
        self._cut_retry_pending = True
        self._closed_without_partial(buffer.epoch)
        buffer.advance()

    def _closed_without_partial(self, epoch: int) -> None:  # noqa: B027 - a hook, off by default
        """An epoch closed with no partial to send (its inputs went to the quarantine)."""

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
