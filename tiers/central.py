"""The central daemon: partials in, signed model versions out; imports protocol, trio, tiers.

Never imports client or simulations or a concrete bus adapter.

Partials are admitted as at the regional tier (``tiers.tier``), with
``extra_tau = current version - partial.known_version``. A flush makes the next
version::

    aggregate   = numerator / sample_count
    model_{v+1} = model_v + optimizer.step(model_v, aggregate)

and, in one store transaction, records the version (signed blob and pointer
envelopes), its lineage (every device update id inside), the optimizer state
(raw arrays) and closes the epoch. Then, in order and retried until done: the
blob is written to ``<state_dir>/models/v<N>.blob`` (the signed envelope
bytes), put in the registry's object store, the pointer is made current in the
registry, and announced on ``model_announce()``. Version 0 comes from the
initial model file the first time the store holds no version; later starts
republish whatever was not confirmed, so startup is idempotent (a version that
``fedtier model rollback`` stored while the central was stopped is published
the same way).

Evaluation (optional): an injected :class:`ModelEvaluator` (the composition
root builds it from ``[evaluation]``; tiers never import the client) scores
every ``every_versions``-th version once it is stored, on a worker thread, one
at a time; if versions come faster, a pending one is skipped for the newer.
The metrics go to the store (``model_metrics``), the metrics endpoint
(``fedtier_model_metric{metric}``) and the span ``central evaluate model``,
a child of the version's ``central aggregate`` span. An evaluator that raises
or returns a non-finite number is logged and counted
(``fedtier_evaluation_failures_total``); the version stands, published as
always. At start the current version is evaluated if it has no metrics.

Early stopping: once a version meets ``[evaluation] target`` the central
records it (``target_reached`` in the store) and makes no new version: inputs
are still accepted, stored and acknowledged, and stay in the open buffer. A
restart keeps it stopped while the recorded score still meets the configured
target; raising the target past it, or removing the target, and restarting
resumes, and the kept inputs make the next version. With ``[lease]`` an input
is acknowledged only once a published version holds it, which will not happen
now, so the central closes its input instead (and never opens it at a start or
takeover past the target) and gives back the open buffer's partials
unacknowledged: they wait in the UP stream, not in its store, where holding
them would only see them redelivered until ``max_deliver`` dead-letters them.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
import trio
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from fedtier.protocol.bus import Bus, Delivery, Subscription
from fedtier.protocol.codecs import decode
from fedtier.protocol.envelope import open_envelope
from fedtier.protocol.errors import (
    BusError,
    KvConflict,
    LocalProtocolError,
    RegistryConflict,
    RemoteProtocolError,
    StoreError,
)
from fedtier.protocol.files import atomic_write
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.messages import ModelAnnouncement, ModelBlob, Tier
from fedtier.protocol.models import check_blob_against_pointer
from fedtier.protocol.names import NatsSubjects
from fedtier.protocol.telemetry import (
    ATTR_FLUSH_REASON,
    ATTR_INPUT_COUNT,
    ATTR_INPUT_IDS,
    ATTR_LEAF_COUNT,
    ATTR_METRIC_PREFIX,
    ATTR_MODEL_VERSION,
    SYSTEM_NATS,
    messaging_attributes,
    span_name,
)
from fedtier.tiers._identity import IdentityReload
from fedtier.tiers._intake import Admission
from fedtier.tiers._lease import EpochWatermark, HeldTicket
from fedtier.tiers._lease import check_hold_config as _check_hold_config
from fedtier.tiers._telemetry import (
    TierMetricsLike,
    context_of,
    headers_with_context,
    links_to,
    traceparent_of,
)
from fedtier.tiers._upstream import UpstreamWorker, retry_transient
from fedtier.tiers._version_record import (
    RecordInput,
    VersionRecord,
    decode_optimizer_state,
    decode_version_record,
    encode_optimizer_state,
    encode_version_record,
)
from fedtier.tiers.config import CentralConfig, EvaluationTarget, load_initial_model
from fedtier.tiers.core import ModelView, Outcome, seal_version, step_model
from fedtier.tiers.faults import crash_point
from fedtier.tiers.model_registry import ModelRegistryWriter, RevocationFollower
from fedtier.tiers.registry import TierKeys
from fedtier.tiers.store import (
    CommitTicket,
    ModelVersionRecord,
    RebasedVersion,
    Recovery,
    TargetRecord,
)
from fedtier.tiers.tier import OpenBuffer, TierDaemon

__all__ = [
    "LINEAGE_HORIZON_VERSIONS",
    "CentralDaemon",
    "ModelEvaluator",
    "ModelPublisher",
    "check_central_hold_config",
]

LINEAGE_HORIZON_VERSIONS: Final = 64
"""How many of the newest versions' records a standby central reads back at takeover.

What can come back to a successor is (a) what the dead central held
unacknowledged: the open buffer and the versions in its publisher's queue (at
most 4), and (b) a partial a regional re-publishes at its own takeover, a
lease TTL plus a hold after the first copy, or a copy inside the UP stream's
dedupe window, which JetStream drops by ``msg_id``. Both lie a handful of
versions back; 64 leaves room for a fleet that makes a version every few
seconds. A record older than that is deleted after each publication (it
holds the optimizer's state: FedAdam's is twice the model), and with its blob
when ``keep_versions`` is smaller.
"""


_STOPPED_INPUT: Final = "inputs are still accepted and kept"
_STOPPED_INPUT_LEASED: Final = "with [lease] the input closes and partials stay in the UP stream"


def check_central_hold_config(config: CentralConfig) -> None:
    """Refuse a config whose held deliveries would come back or never be cut (``tiers._lease``).

    Raises:
        ConfigError: the combination cannot hold a buffer window.
    """
    _check_hold_config(
        config, who="the central", held="partial", until="a model version holding it is published"
    )


class ModelEvaluator(Protocol):
    """Scores a model version on held-out data: ``(version, params) -> {"accuracy": 0.93}``.

    Called on a worker thread, one call at a time; ``params`` is read-only.
    Raising, or returning a value that is not a finite number, fails only the
    evaluation: the version stands.
    """

    def __call__(self, version: int, params: npt.NDArray[np.float32], /) -> Mapping[str, float]:
        """The metrics of model ``version``, whose flat parameters are ``params``."""
        ...


@dataclass(frozen=True, slots=True)
class _EvaluationJob:
    """A stored (or about to be stored) version to evaluate."""

    version: int
    params: npt.NDArray[np.float32]
    ticket: CommitTicket | None = None
    trace: str = ""


def _checked_metrics(raw: object) -> dict[str, float]:
    """An evaluator's result as finite floats by name.

    Raises:
        TypeError: not a mapping of names to real numbers.
        ValueError: empty, or a value is not finite.
    """
    if not isinstance(raw, Mapping):
        raise TypeError(f"the evaluator returned a {type(raw).__name__}, not a mapping")
    if not raw:
        raise ValueError("the evaluator returned no metric")
    out: dict[str, float] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"metric name {name!r} is not a non-empty string")
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"metric {name!r} is a {type(value).__name__}, not a number")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"metric {name!r} is {number}")
        out[name] = number
    return out


@dataclass(frozen=True, slots=True)
class PublishJob:
    """A stored model version to publish.

    Attributes:
        version: the model version.
        blob: signed blob envelope bytes.
        pointer: signed pointer envelope bytes.
        ticket: the version's commit, waited for before anything leaves.
        trace: traceparent of the aggregate span (parent of the publish span).
        epoch: the buffer epoch the version closed (None: version 0, a rollback);
            with ``[lease]`` its held deliveries are acknowledged once published.
    """

    version: int
    blob: bytes
    pointer: bytes
    ticket: CommitTicket | None = None
    trace: str = ""
    epoch: int | None = None


class _HeldEpochs(EpochWatermark):
    """With ``[lease]``: partials are acknowledged once a published version holds them.

    The regional's mechanism (``tiers._lease.EpochWatermark``, held
    deliveries), with the registry's pointer compare-and-set in place of the
    UP stream's PubAck (versions are published in epoch order). Meanwhile the
    bus keeps the delivery with in-progress acks (``nats.max_hold_s``), and a
    central that dies leaves it to JetStream, which redelivers it to the
    successor.
    """

    def __init__(self) -> None:
        super().__init__()
        self.given_back_from: int | None = None
        """Epochs from this one on are never published (a reached target): never acknowledged."""
        self.on_given_back: Callable[[Delivery], None] = _ignore
        """Told of each delivery let go unacknowledged (the input gate stops waiting for it)."""

    def published(self, epoch: int | None) -> None:
        """The version of ``epoch`` is published: release the deliveries it holds."""
        if epoch is not None:
            self.advance(epoch)

    def given_back(self, epoch: int) -> bool:
        """Whether the deliveries held for ``epoch`` go back to the stream unacknowledged."""
        return self.given_back_from is not None and epoch >= self.given_back_from

    def give_back(self, epoch: int) -> None:
        """No version will hold ``epoch`` or a later one: let their deliveries go, unacknowledged.

        Their settling continues (the intake settles in order, and the
        deliveries of earlier epochs still wait for their versions), but the
        acknowledgement is skipped: the bus gives them back to the stream when
        the subscription closes, for a central that makes versions again.
        """
        self.given_back_from = (
            epoch if self.given_back_from is None else min(epoch, self.given_back_from)
        )
        self._changed.set()
        self._changed = trio.Event()

    async def wait_published(self, epoch: int) -> None:
        """Wait until ``epoch`` is durable upstream, or is given back."""
        while self.published_epoch < epoch and not self.given_back(epoch):
            await self._changed.wait()

    def hold(self, admission: Admission, epoch: int) -> Admission:
        """The admission, acknowledged once ``epoch`` is published (never if it is given back)."""
        delivery = admission.delivery

        async def ack() -> None:
            if self.given_back(epoch):
                self.on_given_back(delivery)
                await trio.lowlevel.checkpoint()
            else:
                await delivery.ack()

        return Admission(
            replace(delivery, _ack=ack),
            admission.outcome,
            admission.reason,
            ticket=HeldTicket(admission.ticket, self, epoch),
            after_ack=admission.after_ack,
            ack=admission.ack,
        )


def _ignore(delivery: Delivery) -> None:
    """No one to tell (no input gate yet)."""


class _InputGate(Subscription):
    """With ``[lease]``: the central's input, which a reached evaluation target closes for good.

    The real subscription is opened and closed by a task of its own
    (:meth:`CentralDaemon._hold_input`), the task that entered it, so that the
    central can close it while the daemon keeps serving: a subscription that
    stayed open unread would keep fetching up to its capacity and hold those
    deliveries until ``max_hold_s``, the churn that closing it ends.

    It counts the deliveries it handed out that are neither acknowledged nor
    let go (:meth:`release`): a closed subscription gives back what it holds
    and drops a later acknowledgement, so it closes only once they are
    settled, or else a partial of a version published just before would come
    back (as a duplicate, but a needless one).
    """

    def __init__(self) -> None:
        self._inner: Subscription | None = None
        self._receiving: trio.CancelScope | None = None
        self.closing = trio.Event()
        """Set once the input is to close (a reached target, or the daemon stopping)."""
        self._unsettled: set[int] = set()
        self._settled = trio.Event()

    def release(self, delivery: Delivery) -> None:
        """``delivery`` will not be acknowledged: stop waiting for it."""
        self._settle(id(delivery))

    def _settle(self, key: int) -> None:
        self._unsettled.discard(key)
        if not self._unsettled:
            self._settled.set()

    async def wait_settled(self) -> None:
        """Wait until every delivery handed out is acknowledged or released."""
        while self._unsettled:
            self._settled = trio.Event()
            await self._settled.wait()

    def _tracked(self, delivery: Delivery) -> Delivery:
        async def ack() -> None:
            try:
                await delivery.ack()
            finally:
                self._settle(id(tracked))

        tracked = replace(delivery, _ack=ack)
        self._unsettled.add(id(tracked))
        return tracked

    def attach(self, inner: Subscription) -> None:
        """Read from ``inner`` until :meth:`close`."""
        self._inner = inner

    def close(self) -> None:
        """Take nothing more; a receive waiting now waits for good (the intake's stop ends it)."""
        self.closing.set()
        if self._receiving is not None:
            self._receiving.cancel()

    async def receive(self) -> Delivery:
        """The next delivery while open; once closed, never returns (the intake stops it)."""
        inner = self._inner
        if inner is not None and not self.closing.is_set():
            delivery: Delivery | None = None
            with trio.CancelScope() as scope:
                self._receiving = scope
                delivery = await inner.receive()
            self._receiving = None
            if delivery is not None and not self.closing.is_set():
                return self._tracked(delivery)
            # One taken as the gate closed is still the subscription's: it gives it back.
        await trio.sleep_forever()


def _write_model_file(path: Path, data: bytes) -> None:
    """Keep a version's signed blob on disk: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


class ModelPublisher(UpstreamWorker[PublishJob]):
    """Publishes stored model versions: file, registry blob, registry pointer, announcement."""

    def __init__(
        self,
        daemon: CentralDaemon,
        *,
        capacity: int,
        on_room: Callable[[], None],
    ) -> None:
        super().__init__(capacity=capacity, on_room=on_room)
        self._daemon = daemon
        self.published: list[int] = []

    async def run(self, job: PublishJob) -> None:
        """Publish one version, retrying transient failures; mark it published in the store."""
        daemon = self._daemon
        if job.ticket is not None:
            await job.ticket.wait()
        crash_point("central.before_publish")
        store = daemon.store
        retry = functools.partial(
            retry_transient, retry=daemon.config.retry, metrics=daemon.metrics, log=daemon.log
        )
        version = job.version
        # The stream dedupes a resent announcement by this id.
        announcement_id = f"{daemon.config.fleet}-model-v{version}"
        record = None
        if daemon.held is not None:
            # Never a registry write without the lease (a deposed central waits, then exits).
            lease = daemon.lease
            while lease is not None and not lease.is_held:
                await lease.wait_held()
            record = await daemon.version_record(job)
        with daemon.tracer.start_as_current_span(
            span_name("central", "publish model"),
            context=context_of(job.trace),
            kind=SpanKind.PRODUCER,
            attributes={
                ATTR_MODEL_VERSION: version,
                **messaging_attributes(
                    SYSTEM_NATS,
                    "send",
                    daemon.subjects.model_announce(),
                    message_id=announcement_id,
                    body_size=len(job.pointer),
                    client_id=daemon.key_id,
                ),
            },
        ) as span:
            await store.run_blocking(_write_model_file, daemon.model_file(version), job.blob)
            if record is not None:
                # Before the pointer moves: a successor that reads the pointer finds it.
                await retry(
                    f"registry put of version record v{version}",
                    "registry_put_record",
                    lambda: daemon.registry.put_record(version, record),
                )
            await retry(
                f"registry put of model blob v{version}",
                "registry_put_blob",
                lambda: daemon.registry.put_blob(version, job.blob),
            )
            await retry(
                f"registry put of model pointer v{version}",
                "registry_put_current",
                lambda: daemon.move_pointer(version, job.pointer),
            )
            headers = headers_with_context(span)
            await retry(
                f"announcement of model v{version}",
                "announce_model",
                lambda: daemon.nats.publish(
                    daemon.subjects.model_announce(),
                    job.pointer,
                    headers=dict(headers),
                    msg_id=announcement_id,
                ),
            )
        crash_point("central.after_publish")
        store.submit_published(version)
        if daemon.held is not None:
            # The pointer's compare-and-set is confirmed: the inputs may go.
            daemon.held.published(job.epoch)
        self.published.append(version)
        daemon.log.info("model v%d published", version)
        await daemon.prune_models(version)

    def has_room(self) -> bool:
        """Whether a new version may be cut: room in the queue, and no evaluation target reached.

        A reached target holds cuts back exactly as a full queue does, so the
        flush loop waits for input instead of spinning on a due flush.
        """
        return super().has_room() and self._daemon.target_reached is None


class CentralDaemon(TierDaemon):
    """The central daemon of a fleet.

    Args:
        config: the central configuration.
        nats: the NATS bus (partials in, announcements out).
        registry: the model registry it writes (and reads).
        keys: identity (must be the pinned central key), regional key registry;
            loaded from the config's files when None.
        metrics: duck-typed ``TierMetrics``; a no-op when None.
        tracer: OpenTelemetry tracer; the global fedtier tracer when None.
        clock_ms: wall clock for ``created_ms``.
        store_in_thread: run sqlite commits, file writes and evaluations on
            worker threads (False runs them on the trio thread, for tests under
            a fake clock).
        evaluator: scores each stored version (see the module docstring); its
            cadence and target come from ``config.evaluation`` (every version,
            no target, when that is None).

    Attributes:
        evaluation_failures: evaluations that failed since start.
        target_reached: the evaluation target this central stopped at, or None.
    """

    tier = "central"
    # Small deployments may send edge partials straight here: a sum is a sum.
    accepts = (Tier.REGIONAL, Tier.EDGE)
    sender_role = "regional"

    def __init__(
        self,
        config: CentralConfig,
        *,
        nats: Bus,
        registry: ModelRegistryWriter,
        keys: TierKeys | None = None,
        metrics: TierMetricsLike | None = None,
        tracer: trace.Tracer | None = None,
        clock_ms: Callable[[], int] | None = None,
        store_in_thread: bool = True,
        evaluator: ModelEvaluator | None = None,
    ) -> None:
        keys = keys if keys is not None else self.load_keys(config)
        # The pinned central key, or a key the root certified for now (ConfigError if not).
        keys.check_central_identity(None if clock_ms is None else clock_ms())
        super().__init__(
            config,
            keys=keys,
            metrics=metrics,
            tracer=tracer,
            clock_ms=clock_ms,
            store_in_thread=store_in_thread,
        )
        self.central_config = config
        self.nats = nats
        self.registry = registry
        self.subjects = NatsSubjects(config.fleet)
        self.optimizer = config.make_optimizer()
        self.version = 0
        self.params: npt.NDArray[np.float32] | None = None
        self.layout: ModelLayout | None = None
        self._view: ModelView | None = None
        self._publisher: ModelPublisher | None = None
        self.evaluator = evaluator
        settings = config.evaluation
        self._evaluate_every = 1 if settings is None else settings.every_versions
        self._target: EvaluationTarget | None = None if settings is None else settings.target
        self.evaluation_failures = 0
        self.target_reached: TargetRecord | None = None
        self._evaluation_pending: _EvaluationJob | None = None
        self._evaluation_wakeup = trio.Event()
        self._evaluation_limiter = trio.CapacityLimiter(1)
        self.held: _HeldEpochs | None = None
        """With ``[lease] enabled``: deliveries held until a version holding them is published."""
        self.took_over_at: int | None = None
        """The registry's version this central caught up to at its last takeover, if it did."""
        self._gate: _InputGate | None = None
        self.input_closed = False
        """With ``[lease]``: the input is closed (or never opened) because the target is reached."""
        if config.lease.enabled:
            check_central_hold_config(config)
            self.held = _HeldEpochs()
        self._unpublished: list[PublishJob] = []
        # SIGHUP: a new key in identity_key signs once its certificate is published.
        self.identity_reload = IdentityReload(
            keys,
            identity_key=config.identity_key,
            certificates=config.certificates,
            registry=registry,
            clock_ms=self.clock_ms,
            retry=config.retry,
            metrics=self.metrics,
            log=self.log,
        )

    # -- state --------------------------------------------------------------------------

    @property
    def known_version(self) -> int:
        """The current model version."""
        return self.version

    @property
    def upstream(self) -> ModelPublisher:
        """The model publisher."""
        assert self._publisher is not None
        return self._publisher

    def _model_view(self) -> ModelView:
        assert self._view is not None
        return self._view

    def model_file(self, version: int) -> Path:
        """Where the signed blob envelope of ``version`` is kept on disk."""
        return self.config.state_dir / "models" / f"v{version}.blob"

    def lineage(self, version: int) -> list[bytes]:
        """Ids of the device updates folded into model ``version`` (from the state store).

        Raises:
            StoreError: the version is unknown or the daemon is not serving.
        """
        return self.store.lineage(version)

    # -- start --------------------------------------------------------------------------

    async def _start(self, nursery: trio.Nursery, recovery: Recovery) -> None:
        initial: list[PublishJob] = []
        latest = recovery.latest_version
        # Key lifecycle: certificates beside the models before any model they sign;
        # the fleet's revocation list (file and registry) in force before any input.
        for key_id, certificate in self.keys.certificates.items():
            await self.registry.put_certificate(key_id, certificate)
        revocations = RevocationFollower(
            self.keys,
            fleet=self.config.fleet,
            registry=self.registry,
            path=self.config.revocations,
            poll_s=self.config.revocation_poll_s,
            log=self.log,
            publish=self.registry,
        )
        await nursery.start(revocations.serve)
        await nursery.start(self.identity_reload.serve)
        if self.held is None:
            # Without a lease, a registry ahead of this store means another central.
            await self._check_not_behind_registry(None if latest is None else latest.version)
        if latest is None:
            initial.append(self._make_version_zero())
        else:
            self._load_version(latest.version, latest.blob, latest.pointer)
            self.optimizer.load_state_arrays(dict(recovery.optimizer_state))
            for version in recovery.unpublished_versions:
                record = self.store.model_version(version)
                assert record is not None
                initial.append(
                    PublishJob(
                        version,
                        record.blob,
                        record.pointer,
                        epoch=self.store.version_epoch(version),
                    )
                )
        assert self._view is not None
        self._buffer = OpenBuffer(self._view.num_params, recovery.open_epoch)
        self._refold(recovery)
        self._resume_evaluation()
        self._publisher = ModelPublisher(self, capacity=4, on_room=self.buffer.poke)
        if self.held is not None:
            # With a lease, what this store holds is published only once the lease is
            # held and the registry read (_on_takeover): it may be behind by then.
            self._unpublished = initial
            initial = []
        await nursery.start(self._publisher.serve, initial)
        self.metrics.model_version(self.version)
        if self.evaluator is not None:
            await nursery.start(self._serve_evaluations)

    # -- more than one central ([lease] enabled) ------------------------------------------

    @property
    def cuts_paused(self) -> bool:
        """With ``[lease]``, cuts wait for the lease: a standby's inputs are not its own."""
        lease = self.lease
        return self.held is not None and (lease is None or not lease.is_held)

    async def _on_takeover(self) -> None:
        """Catch up with the registry, then publish what this store holds beyond it.

        A central without a lease refuses to start behind the registry; with
        one, being behind at takeover is the normal case of a standby whose
        store is empty or stale: it continues from the registry's version
        records (:meth:`_catch_up`).
        """
        held = self.held
        if held is None:
            await trio.lowlevel.checkpoint()
            return
        entry = await self._read_current_entry()
        pointer = entry[0] if entry is not None and entry[0] else None
        pending, self._unpublished = self._unpublished, []
        current = -1 if pointer is None else self._registry_version(pointer)
        if pointer is not None and current is None:
            await self._catch_up(pointer)
            pending = []
            current = self.version
        assert current is not None
        await self._drop_orphan(current + 1)
        epochs = [job.epoch for job in pending if job.epoch is not None]
        held.reset(min(epochs) - 1 if epochs else self.buffer.epoch - 1)
        for job in pending:
            await self.upstream.put(job)
        await self._target_at_takeover()

    async def _target_at_takeover(self) -> None:
        """After a catch-up: decide the target on the registry's version before the input opens.

        The rebase replaced this store's history, metrics and target record
        with the registry's, which carries no metrics: with a target, the
        version is evaluated before the input opens, so a standby taking over
        a fleet past its target takes no partial it could not publish.
        """
        held = self.held
        if held is None or self.took_over_at is None:
            await trio.lowlevel.checkpoint()
            return
        self.target_reached = None
        self.input_closed = False
        held.given_back_from = None
        if self.evaluator is None or self.params is None:
            await trio.lowlevel.checkpoint()
            return
        params = self.params.view()
        params.flags.writeable = False
        job = _EvaluationJob(self.version, params)
        if self._target is None:
            self._queue_evaluation(job)
            await trio.lowlevel.checkpoint()
            return
        self._evaluation_pending = None  # a version of the old history: not this fleet's now
        await self._evaluate(job)

    async def _catch_up(self, pointer: bytes) -> None:
        """Continue from the registry's current version: params, optimizer state, lineage.

        Reads the version records of the newest ``LINEAGE_HORIZON_VERSIONS``
        versions (the newest must exist and verify; an older one missing ends
        the walk), checks them against the pointer and the blob, and rebases
        the store onto them in one commit: every partial and device update
        they hold is a duplicate from then on, so a redelivery is acknowledged
        and never folded again.

        Raises:
            RegistryConflict: the pointer, the newest record, the blob or an
                older record does not verify or does not agree; a successor
                that cannot see what was counted must not count again.
        """
        version = self._pointer_version(pointer)
        if version is None:
            raise RegistryConflict(
                "the model registry's current pointer does not verify with this central's "
                f"keys ({self.key_id!r}); refusing to take over another fleet's history"
            )
        newest = await self._read_record(version, required=True)
        assert newest is not None
        if newest.pointer != pointer:
            raise RegistryConflict(
                f"the version record of v{version} names another pointer than the registry's"
            )
        blob = await self._read_registry(
            f"blob v{version}", functools.partial(self.registry.blob, version)
        )
        if blob is None:
            raise RegistryConflict(f"the model registry holds no blob for its current v{version}")
        try:
            envelope = open_envelope(blob, self.keys.models.known_key, self.config.limits)
            announcement = open_envelope(
                pointer, self.keys.models.known_key, self.config.limits
            ).message
            if not isinstance(envelope.message, ModelBlob) or not isinstance(
                announcement, ModelAnnouncement
            ):
                raise RegistryConflict(f"the registry's v{version} is not a blob and a pointer")
            check_blob_against_pointer(envelope, envelope.message, announcement)
            layout = envelope.message.tensors
            if self.layout is not None and layout.fingerprint != self.layout.fingerprint:
                raise RegistryConflict(
                    f"the registry's v{version} has another model layout than this central's"
                )
        except RemoteProtocolError as exc:
            raise RegistryConflict(
                f"the registry's blob v{version} does not verify: {exc}"
            ) from exc
        probe = self.central_config.make_optimizer()
        try:
            probe.load_state_arrays(dict(newest.optimizer))
        except LocalProtocolError as exc:
            raise RegistryConflict(
                f"the optimizer state in the version record of v{version} does not fit this "
                f"central's optimizer ({self.central_config.optimizer_name}): {exc}"
            ) from exc
        records = [newest]
        for older in range(version - 1, max(-1, version - LINEAGE_HORIZON_VERSIONS), -1):
            record = await self._read_record(older, required=False)
            if record is None:
                break
            records.append(record)
        records.reverse()
        await self.store.submit_rebase(
            [
                RebasedVersion(
                    r.version,
                    r.pointer,
                    r.update_count,
                    r.created_ms,
                    tuple((i.sender, i.input_id, i.seq) for i in r.inputs),
                    r.leaves,
                )
                for r in records
            ],
            blob=blob,
            optimizer_state=newest.optimizer,
            out_seq=announcement.seq,
        ).wait()
        self._load_version(version, blob, pointer)
        self.optimizer.load_state_arrays(dict(newest.optimizer))
        self._seq.last = max(self._seq.last, announcement.seq)
        self._empty_buffer()
        self.metrics.model_version(version)
        self.took_over_at = version
        self.log.warning(
            "took over from the registry at model v%d: %d versions of lineage (v%d..v%d), "
            "%d partials and %d device updates known as counted, optimizer state of v%d; "
            "what this store held unpublished is dropped (never acknowledged: JetStream "
            "redelivers it)",
            version,
            len(records),
            records[0].version,
            version,
            sum(len(r.inputs) for r in records),
            sum(len(r.leaves) for r in records),
            version,
        )

    async def _drop_orphan(self, version: int) -> None:
        """Delete a blob and record of ``version`` that the pointer never reached.

        A predecessor that died between its blob and its pointer left them; the
        blob store refuses other bytes under a version it holds, so this
        central could not publish its own ``version``. Versions are published
        one at a time, so only the one after the pointer can be such an orphan
        (this central's own, when it is, is written again from its store).
        """
        for what, delete in (
            ("blob", self.registry.delete_blob),
            ("version record", self.registry.delete_record),
        ):
            await retry_transient(
                f"registry delete of the unpublished {what} v{version}",
                "registry_delete_orphan",
                functools.partial(delete, version),
                retry=self.config.retry,
                metrics=self.metrics,
                log=self.log,
            )

    async def _read_registry(
        self, what: str, read: Callable[[], Awaitable[bytes | None]]
    ) -> bytes | None:
        return await retry_transient(
            f"registry read of {what}",
            "registry_read",
            read,
            retry=self.config.retry,
            metrics=self.metrics,
            log=self.log,
        )

    async def _read_record(self, version: int, *, required: bool) -> VersionRecord | None:
        """The registry's verified version record of ``version``, or None when it has none.

        Raises:
            RegistryConflict: it does not verify, or names another version; or
                it is missing and ``required``.
        """
        data = await self._read_registry(
            f"version record v{version}", functools.partial(self.registry.record, version)
        )
        if data is None:
            if required:
                raise RegistryConflict(
                    f"the model registry holds no version record for its current v{version} "
                    "(published by a central without [lease]?): a standby cannot know what "
                    "it counted; start the central that holds its state directory instead"
                )
            return None
        try:
            record = decode_version_record(
                data,
                self.keys.models.known_key,
                fleet=self.config.fleet,
                max_bytes=self.config.limits.max_envelope_bytes * 4,
                max_params=self.config.limits.max_params,
            )
        except RemoteProtocolError as exc:
            raise RegistryConflict(f"the version record of v{version} is refused: {exc}") from exc
        if record.version != version:
            raise RegistryConflict(
                f"the registry's version record v{version} names v{record.version}"
            )
        return record

    async def version_record(self, job: PublishJob) -> bytes:
        """The signed version record of a stored version (``[lease] enabled``), from the store."""
        version = job.version
        stored = self.store.model_version(version)
        assert stored is not None
        state = self.store.record_state(version)
        if state is not None:
            optimizer = decode_optimizer_state(state, max_params=self.config.limits.max_params)
        elif version == self.version:
            optimizer = self.optimizer.state_arrays()
        else:
            # Stored before [lease] was enabled: the state after it is gone.
            self.log.warning(
                "model v%d's optimizer state is not kept; its record has none", version
            )
            optimizer = {}
        record = VersionRecord(
            fleet=self.config.fleet,
            version=version,
            pointer=job.pointer,
            update_count=stored.update_count,
            created_ms=stored.created_ms,
            inputs=tuple(RecordInput(*row) for row in self.store.version_inputs(version)),
            leaves=tuple(stored.lineage),
            optimizer=optimizer,
        )
        await trio.lowlevel.checkpoint()
        return encode_version_record(record, self.keys.identity)

    def _closed_without_partial(self, epoch: int) -> None:
        if self.held is not None:
            self.held.closed_without_partial(epoch)

    async def _before_settling(self, deadline: float) -> None:
        """Cut what was admitted, so its held deliveries can be acknowledged and the intake end."""
        if self.held is None:
            await trio.lowlevel.checkpoint()
            return
        await self._cut_until_settled(deadline)

    # -- retention ---------------------------------------------------------------------

    async def prune_models(self, newest: int) -> None:
        """Drop the parameters of published versions older than the newest ``keep_versions``.

        Registry object and file go first, the store's blob last: a crash in
        between leaves the version listed as still stored, and the next prune
        deletes again (both deletes are idempotent). Pointer, lineage and
        metrics stay; a registry that cannot be reached now is tried again
        after the next version.
        """
        if self.held is not None and newest >= LINEAGE_HORIZON_VERSIONS:
            # A successor reads no record older than the horizon; each is the size
            # of the optimizer's state (FedAdam: twice the model), so it goes.
            try:
                await self.registry.delete_record(newest - LINEAGE_HORIZON_VERSIONS)
            except BusError as exc:
                self.log.warning(
                    "version record v%d not deleted: %s", newest - LINEAGE_HORIZON_VERSIONS, exc
                )
        keep = self.central_config.keep_versions
        if keep <= 0:
            return
        victims = self.store.prunable_versions(newest - keep + 1)
        if not victims:
            return
        done: list[int] = []
        for version in victims:
            try:
                await self.registry.delete_blob(version)
                if self.held is not None:
                    await self.registry.delete_record(version)
            except BusError as exc:
                self.log.warning("pruning model v%d: %s; tried again later", version, exc)
                break
            await self.store.run_blocking(
                functools.partial(self.model_file(version).unlink, missing_ok=True)
            )
            done.append(version)
        if done:
            await self.store.submit_prune(done).wait()
            self.log.info(
                "pruned the parameters of %d old model versions (v%d..v%d; keep_versions %d)",
                len(done),
                done[0],
                done[-1],
                keep,
            )

    # -- one writer per registry ---------------------------------------------------------

    async def _read_current_entry(self) -> tuple[bytes, int] | None:
        """The registry's current pointer entry, read with the transient-error retry."""
        return await retry_transient(
            "registry read of the current model pointer",
            "registry_get_current",
            self.registry.current_entry,
            retry=self.config.retry,
            metrics=self.metrics,
            log=self.log,
        )

    async def _check_not_behind_registry(self, latest: int | None) -> None:
        """Refuse to start when the registry holds a version this central's store did not write.

        A central restarted on an empty or restored-from-old store, or a second
        central of the same fleet, would otherwise sign and publish other
        models under version numbers the fleet already knows.
        """
        entry = await self._read_current_entry()
        if entry is None or not entry[0]:
            return
        if self._registry_version(entry[0]) is not None:
            return
        signed = self._pointer_version(entry[0])
        found = (
            f"a pointer that does not verify with this central's key {self.key_id!r}"
            if signed is None
            else f"v{signed}, which this central's store does not hold with those bytes"
        )
        newest = "holds no version" if latest is None else f"is at v{latest}"
        raise RegistryConflict(
            f"the model registry's current pointer is {found} (this store {newest}): "
            "another central is active for this fleet, or this store is empty or older "
            "than the registry; refusing to start so as not to publish conflicting "
            "versions (docs/operations.md, 'The central refuses to start')"
        )

    def _pointer_version(self, pointer: bytes) -> int | None:
        """The version a pointer names if it verifies with this central's key, else None."""
        try:
            message = open_envelope(pointer, self.keys.models.known_key, self.config.limits).message
        except RemoteProtocolError:
            return None
        return message.version if isinstance(message, ModelAnnouncement) else None

    def _registry_version(self, pointer: bytes) -> int | None:
        """The version of a registry pointer if this central's store wrote exactly it, else None."""
        version = self._pointer_version(pointer)
        if version is None:
            return None
        record = self.store.model_version(version)
        return version if record is not None and record.pointer == pointer else None

    async def move_pointer(self, version: int, pointer: bytes) -> None:
        """Make ``pointer`` (of ``version``) current by compare-and-set, or stop the central.

        The registry's pointer may only move from a pointer this central wrote
        for an older version (or from nothing) to the next one. Anything else
        means a second writer: raise ``RegistryConflict`` rather than
        overwrite, so the daemon stops and the fleet keeps one history.
        Writing the same pointer again (a retry after an unconfirmed write, a
        restart) is a no-op.
        """
        while True:
            entry = await self.registry.current_entry()
            revision = 0
            if entry is not None:
                held, revision = entry
                if held == pointer:
                    return
                if held:
                    held_version = self._registry_version(held)
                    if held_version is None or held_version >= version:
                        signed = self._pointer_version(held)
                        found = "a pointer that does not verify with this central's key"
                        if signed is not None:
                            written = (
                                "" if held_version is not None else " this central did not write"
                            )
                            found = f"v{signed}{written}"
                        raise RegistryConflict(
                            f"cannot publish model v{version}: the registry holds {found}; "
                            "another central writes to this fleet's registry"
                        )
            try:
                await self.registry.replace_current(pointer, revision)
            except KvConflict:
                # Someone moved the pointer between our read and our write:
                # read again; the check above decides whether it was us.
                continue
            return

    def _make_version_zero(self) -> PublishJob:
        layout, params = load_initial_model(self.central_config.initial_model)
        self.log.info(
            "creating model v0 from %s: %d tensors, %d values",
            self.central_config.initial_model,
            len(layout.tensors),
            layout.num_params,
        )
        self.layout = layout
        job = self._seal_version(0, params, update_count=0, lineage=(), epoch=None, trace_parent="")
        self.params = params
        return job

    def _load_version(self, version: int, blob_bytes: bytes, pointer_bytes: bytes) -> None:
        keys = self.keys.models.known_key  # own key, and own older keys the root certified
        envelope = open_envelope(blob_bytes, keys, self.config.limits)
        blob = envelope.message
        pointer = open_envelope(pointer_bytes, keys, self.config.limits).message
        if not isinstance(blob, ModelBlob) or not isinstance(pointer, ModelAnnouncement):
            raise StoreError(f"stored model v{version} does not hold a blob and a pointer")
        self.layout = blob.tensors
        self.params = decode(envelope.payload, blob.codec, blob.num_params)
        self.version = version
        self._view = ModelView(version, blob.layout, blob.num_params, pointer_bytes)

    # -- input --------------------------------------------------------------------------

    def _open_input(self) -> AbstractAsyncContextManager[Subscription]:
        if self.held is not None:
            return self._gated_input()
        return self._subscribe()

    def _subscribe(self) -> AbstractAsyncContextManager[Subscription]:
        return self.nats.subscribe(
            self.subjects.to_central(),
            durable=self.subjects.central_consumer(),
            capacity=self.config.intake_capacity,
        )

    @asynccontextmanager
    async def _gated_input(self) -> AsyncIterator[Subscription]:
        """With ``[lease]``: the input, closed at a reached target; never opened past one.

        Past the target no version is published, so a partial it took could
        never be acknowledged: it would be held until ``max_hold_s``, come
        back, be taken again, and end on the dead-letter path after
        ``max_deliver``. Left in the UP stream instead, it waits there for a
        central that makes versions again.
        """
        gate = self._gate = _InputGate()
        if self.held is not None:
            self.held.on_given_back = gate.release
        if self.target_reached is not None:
            gate.close()
            self.input_closed = True
            yield gate
            return
        async with trio.open_nursery() as nursery:
            await nursery.start(self._hold_input, gate)
            try:
                yield gate
            finally:
                gate.close()

    async def _hold_input(self, gate: _InputGate, *, task_status: trio.TaskStatus[None]) -> None:
        """Enter the subscription, serve it through ``gate`` until it closes, then leave it.

        The versions cut before the gate closed are published first, so their
        partials are acknowledged while the subscription still holds them (a
        closed subscription gives back what it holds, and an acknowledgement
        after that is lost: the partial would come back as a duplicate).
        """
        async with self._subscribe() as subscription:
            gate.attach(subscription)
            task_status.started()
            await gate.closing.wait()
            held = self.held
            if held is not None and held.given_back_from is not None:
                await held.wait_published(held.given_back_from - 1)
                # Bounded: an input refused unacknowledged (a full quarantine) never settles.
                with trio.move_on_after(self.config.nats.ack_wait_s):
                    await gate.wait_settled()

    def _admit(self, delivery: Delivery) -> Admission:
        held = self.held
        if held is None:
            return self._admit_partial(delivery)
        empty_before = self.buffer.is_empty
        admission = self._admit_partial(delivery)
        if admission.outcome is Outcome.ACCEPTED:
            return held.hold(admission, self.buffer.epoch)
        if admission.outcome is Outcome.DUPLICATE:
            # The original is in the open epoch or an earlier one; versions are
            # published in epoch order, so waiting for the open one (when it
            # holds anything) covers both. One from the registry's history
            # (a takeover) is published already and goes at once.
            return held.hold(
                admission, self.buffer.epoch - 1 if empty_before else self.buffer.epoch
            )
        return admission

    # -- versions -----------------------------------------------------------------------

    def _seal_version(
        self,
        version: int,
        params: npt.NDArray[np.float32],
        *,
        update_count: int,
        lineage: tuple[bytes, ...],
        epoch: int | None,
        trace_parent: str,
        input_count: int = 0,
    ) -> PublishJob:
        layout = self.layout
        assert layout is not None
        created_ms = self.clock_ms()
        blob_seq = self._next_seq()
        sealed = seal_version(
            version,
            params,
            layout,
            identity=self.keys.identity,
            fleet=self.config.fleet,
            created_ms=created_ms,
            blob_seq=blob_seq,
            pointer_seq=self._next_seq(),
            update_count=update_count,
        )
        blob_bytes, pointer_bytes = sealed.blob, sealed.pointer
        ticket = self.store.submit_version(
            ModelVersionRecord(
                version=version,
                blob=blob_bytes,
                pointer=pointer_bytes,
                lineage=lineage,
                update_count=update_count,
                created_ms=created_ms,
            ),
            epoch=epoch,
            input_count=input_count,
            optimizer_state=self.optimizer.state_arrays(),
            out_seq=sealed.pointer_message.seq,
            record_state=(
                None if self.held is None else encode_optimizer_state(self.optimizer.state_arrays())
            ),
        )
        self.version = version
        self._view = ModelView(version, layout.fingerprint, layout.num_params, pointer_bytes)
        self.metrics.model_version(version)
        if version % self._evaluate_every == 0:
            self._queue_evaluation(_EvaluationJob(version, params, ticket, trace_parent))
        return PublishJob(version, blob_bytes, pointer_bytes, ticket, trace_parent, epoch)

    def _cut(self, reason: str) -> PublishJob | None:
        if self.target_reached is not None:
            return None  # early stopping: the inputs stay in the open buffer (and the store)
        buffer = self.buffer
        aggregate = buffer.accumulator
        if aggregate.is_empty:
            return None
        assert self.params is not None
        started = time.perf_counter()
        input_ids = list(aggregate.input_ids)
        version = self.version + 1
        with self.tracer.start_as_current_span(
            span_name("central", "aggregate"),
            context=Context(),
            links=links_to(buffer.tags),
            attributes={
                ATTR_INPUT_IDS: [i.hex() for i in input_ids],
                ATTR_INPUT_COUNT: len(input_ids),
                ATTR_LEAF_COUNT: aggregate.update_count,
                ATTR_FLUSH_REASON: reason,
                ATTR_MODEL_VERSION: version,
            },
        ) as span:
            saved_state = self.optimizer.state_arrays()
            try:
                # A huge (finite, float64) sample count rounds to inf in float32 and
                # divides the step to 0: harmless, so not a warning; a non-finite
                # step is caught below by its result.
                with np.errstate(over="ignore", under="ignore"):
                    new_params = step_model(self.params, self.optimizer, aggregate)
            except (ArithmeticError, ValueError, LocalProtocolError) as exc:
                self.optimizer.load_state_arrays(saved_state)
                self.log.error("the server step of epoch %d failed: %s", buffer.epoch, exc)
                new_params = None
            if new_params is None:
                # Refolding after a restart would give the same result, and dropping
                # would lose acknowledged updates: quarantine the epoch's inputs.
                self._quarantine_epoch(
                    f"it would make model v{version} non-finite", self._next_seq()
                )
                return None
            try:
                job = self._seal_version(
                    version,
                    new_params,
                    update_count=aggregate.update_count,
                    lineage=tuple(aggregate.leaf_ids),
                    epoch=buffer.epoch,
                    input_count=len(input_ids),
                    trace_parent=traceparent_of(span),
                )
            except LocalProtocolError:
                self.optimizer.load_state_arrays(saved_state)
                raise
        self.params = new_params
        self._report_cut(reason, len(input_ids), started)
        self.log.info(
            "model v%d made from epoch %d (%s): %d inputs, %d updates, %g samples",
            version,
            buffer.epoch,
            reason,
            len(input_ids),
            aggregate.update_count,
            aggregate.sample_count,
        )
        buffer.advance()
        return job

    # -- evaluation ---------------------------------------------------------------------

    def _resume_evaluation(self) -> None:
        """At start: report the current version's metrics, or evaluate it; keep a met target.

        The central stays stopped while the score recorded when the target was
        met still meets the configured target (same metric).
        """
        if self.central_config.evaluation is not None and self.evaluator is None:
            self.log.warning(
                "the config has an [evaluation] table but no evaluator was given; "
                "versions are not evaluated"
            )
        metrics = self.store.model_metrics(self.version)
        if metrics:
            self.metrics.model_metrics(self.version, metrics)
        elif self.evaluator is not None and self._evaluation_pending is None:
            assert self.params is not None
            self._queue_evaluation(_EvaluationJob(self.version, self.params))
        recorded = self.store.target_reached()
        target = self._target
        stop: TargetRecord | None = None
        if target is not None:
            if (
                recorded is not None
                and recorded.metric == target.metric
                and target.reached_by({recorded.metric: recorded.value})
            ):
                stop = recorded
            elif target.reached_by(metrics):
                stop = TargetRecord(
                    self.version, target.metric, metrics[target.metric], target.value,
                    self.clock_ms(),
                )  # fmt: skip
                self.store.submit_target_reached(stop)
        if stop is not None:
            self.target_reached = stop
            self.log.warning(
                "model v%d met the evaluation target %s (%s = %.6g): no new version is made "
                "until the target is raised or removed and the central restarted; %s",
                stop.version,
                target.describe() if target is not None else stop.metric,
                stop.metric,
                stop.value,
                _STOPPED_INPUT if self.held is None else _STOPPED_INPUT_LEASED,
            )
            self._close_input_at_target()
        elif recorded is not None:
            self.store.submit_target_reached(None)
            self.log.info(
                "the evaluation target met at model v%d (%s = %.6g) no longer applies; "
                "making versions again",
                recorded.version,
                recorded.metric,
                recorded.value,
            )

    def _queue_evaluation(self, job: _EvaluationJob) -> None:
        """Hand ``job`` to the evaluation task; a version still waiting is skipped for it."""
        if self.evaluator is None:
            return
        skipped = self._evaluation_pending
        if skipped is not None:
            self.log.info(
                "model v%d is not evaluated: v%d came before its evaluation started",
                skipped.version,
                job.version,
            )
        # Read-only: the evaluator must never change the model the central steps from.
        params = job.params.view()
        params.flags.writeable = False
        self._evaluation_pending = _EvaluationJob(job.version, params, job.ticket, job.trace)
        self._evaluation_wakeup.set()

    async def _serve_evaluations(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            await self._evaluation_wakeup.wait()
            self._evaluation_wakeup = trio.Event()
            job, self._evaluation_pending = self._evaluation_pending, None
            if job is not None:
                await self._evaluate(job)

    async def _run_evaluator(self, job: _EvaluationJob) -> object:
        evaluator = self.evaluator
        assert evaluator is not None
        call = functools.partial(evaluator, job.version, job.params)
        if not self._store_in_thread:
            await trio.lowlevel.checkpoint()
            return call()
        # Abandoned on cancellation: a stopping central does not wait for a long evaluation.
        return await trio.to_thread.run_sync(
            call, limiter=self._evaluation_limiter, abandon_on_cancel=True
        )

    async def _evaluate(self, job: _EvaluationJob) -> None:
        """Score one version once it is stored; a failure is logged and counted, never raised."""
        version = job.version
        if job.ticket is not None:
            await job.ticket.wait()  # a failed commit stops the daemon anyway
        started = time.perf_counter()
        with self.tracer.start_as_current_span(
            span_name("central", "evaluate model"),
            context=context_of(job.trace),
            attributes={ATTR_MODEL_VERSION: version},
        ) as span:
            try:
                metrics = _checked_metrics(await self._run_evaluator(job))
            except Exception as exc:  # the evaluator is user code: anything may fail
                self.evaluation_failures += 1
                self.metrics.evaluation_failed()
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                self.log.error(
                    "evaluation of model v%d failed (the version stands): %s: %s",
                    version,
                    type(exc).__name__,
                    exc,
                )
                self.log.debug("evaluation of model v%d failed", version, exc_info=exc)
                return
            for name, value in metrics.items():
                span.set_attribute(ATTR_METRIC_PREFIX + name, value)
        await self.store.submit_metrics(version, metrics, evaluated_ms=self.clock_ms()).wait()
        self.metrics.model_metrics(version, metrics)
        self.log.info(
            "model v%d evaluated in %.2f s: %s",
            version,
            time.perf_counter() - started,
            ", ".join(f"{name} {value:.6g}" for name, value in metrics.items()),
        )
        self._check_target(version, metrics)

    def _check_target(self, version: int, metrics: Mapping[str, float]) -> None:
        target = self._target
        if target is None or self.target_reached is not None or not target.reached_by(metrics):
            return
        record = TargetRecord(
            version, target.metric, metrics[target.metric], target.value, self.clock_ms()
        )
        self.target_reached = record
        self.store.submit_target_reached(record)
        self.log.warning(
            "model v%d met the evaluation target %s (%s = %.6g): no new version is made until "
            "the target is raised or removed and the central restarted; %s",
            version,
            target.describe(),
            target.metric,
            record.value,
            _STOPPED_INPUT if self.held is None else _STOPPED_INPUT_LEASED,
        )
        self._close_input_at_target()

    def _close_input_at_target(self) -> None:
        """With ``[lease]``: stop taking partials and give back the open buffer's, unacknowledged.

        They were held until a version holding them is published, which will
        not happen now. So the open epoch's inputs are forgotten, as a
        takeover forgets unpublished work (one re-admitted from the
        quarantine, acknowledged when quarantined, goes back there), their
        deliveries are let go without an ack, and the input closes, which
        gives them back to the UP stream. Versions cut before this still
        publish, and their partials are acknowledged first. The daemon keeps
        serving (lease, probes, status), so a standby does not take over and
        consume.
        """
        held = self.held
        if held is None or self.input_closed:
            return
        buffer = self.buffer
        epoch = buffer.epoch
        forgotten = buffer.accumulator.input_count
        if forgotten:
            self.store.submit_forget_unforwarded(epoch, ())
            self._empty_buffer()
            self.metrics.buffer_depth(0)
        held.give_back(epoch)
        if self._gate is not None:
            self._gate.close()
        self.input_closed = True
        self.log.warning(
            "input closed at the evaluation target: %d partials of the open epoch %d given "
            "back unacknowledged; partials wait in the UP stream until the target is raised "
            "or removed and the central restarted",
            forgotten,
            epoch,
        )
