"""The device loop as a trio service: train, sign, send, await the receipt; never imports tiers.

One ``serve_device`` call runs one device against its site's MQTT broker
(through the ``protocol.bus.Bus`` interface)::

    model/current, model/blob (retained) --> ModelStore (verified against the central key)
    train in a worker thread --> delta --> error feedback + codec --> DeviceUpdate --> seal
    Outbox.put  (durable BEFORE the first publish)
    publish up/<device>, QoS 1, span "device send" with W3C traceparent in the headers
    receipt/<device> (durable subscription) --> verify (trusted edge key) --> Outbox.resolve

Acceptance is end to end (docs/architecture.md, data guarantees): an update stays in the outbox
until a signed receipt for it arrives. Accepted and duplicate receipts
resolve it; a rejected one resolves it too (resending cannot change the
verdict) and its reason is logged, except the edge's non-final rejections:
``rate_limited`` (resent after the receipt's ``retry_after_ms``), ``future_base``
(resent later, once the edge has caught up) and ``contribution_capped`` (resent
once the device holds a model newer than the one the receipt names); the update
stays in the outbox for them. Without a receipt the same envelope bytes
(same update id, seq and signature) are resent with growing waits, at most
``max_attempts`` times per run; after that the update waits in the outbox for
the next start or the next reconnect. Every start resends the whole outbox
before training anything new.

The device does not wait for rounds (FedBuff): it trains on every newer
model it sees, and when none arrives within ``model_wait_s`` it trains again
on the current one.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt
import trio
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fedtier.client.error_feedback import ErrorFeedback
from fedtier.client.model_store import ModelOffer, ModelStore, OfferStatus
from fedtier.client.outbox import Outbox, PendingUpdate
from fedtier.client.trainers import Trainer, TrainResult
from fedtier.protocol.bus import Bus, Delivery, Subscription
from fedtier.protocol.codecs import CodecSpec, encode, pick_codec
from fedtier.protocol.envelope import open_envelope, parse_envelope, seal
from fedtier.protocol.errors import (
    BusUnavailable,
    FedtierError,
    LocalProtocolError,
    PublishError,
    Reason,
    RemoteProtocolError,
)
from fedtier.protocol.identity import SigningIdentity, VerifyKey
from fedtier.protocol.limits import limits_for_model
from fedtier.protocol.messages import (
    UNAUTHENTICATED_REJECTIONS,
    DeviceUpdate,
    Receipt,
    ReceiptStatus,
)
from fedtier.protocol.model_parts import BlobAssembler
from fedtier.protocol.names import MqttTopics, check_token
from fedtier.protocol.telemetry import (
    ATTR_DEVICE,
    ATTR_MODEL_VERSION,
    ATTR_TIER,
    ATTR_UPDATE_ID,
    SYSTEM_MQTT,
    messaging_attributes,
    span_name,
)

__all__ = ["DeviceConfig", "DeviceReport", "serve_device"]

_log = logging.getLogger("fedtier.device")
_MAX_METRICS: Final = 16
_MAX_METRIC_NAME: Final = 64
# Rejections the edge gives after authenticating the update that say "not now",
# not "never" (docs/protocol.md, receipts): the device keeps the update.
NOT_FINAL_REJECTIONS: Final = frozenset(
    {Reason.RATE_LIMITED.value, Reason.FUTURE_BASE.value, Reason.CONTRIBUTION_CAPPED.value}
)


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """How a device trains, encodes and delivers its updates.

    Attributes:
        fleet: the fleet token.
        site: the site token (which broker and topic prefix).
        trusted_edges: public keys of the edge daemons whose receipts count;
            a receipt signed by any other key is ignored.
        codec: a ``CodecSpec`` or a codec name (``"f32"``, ``"i8"``,
            ``"top1%+i8"``...); ignored when ``byte_budget`` is set.
        byte_budget: when set, the codec is ``protocol.codecs.pick_codec``'s
            choice for this many payload bytes.
        error_feedback: carry the compression residual into the next update.
        receipt_timeout_s: wait for a receipt after the first send; each
            further send waits ``backoff_factor`` times longer, at most
            ``backoff_max_s``.
        max_attempts: sends of one update per run before it is left in the
            outbox for the next start or reconnect.
        backoff_factor: growth of waits between tries.
        backoff_max_s: cap of every wait between tries.
        retry_delay_s: first wait (jittered) before retrying a publish the bus
            refused (``BusUnavailable``, ``PublishError``); it grows by
            ``backoff_factor`` up to ``backoff_max_s`` and retries go on until
            the publish succeeds or the device is cancelled.
        rounds: stop after this many delivered updates (accepted or
            duplicate receipts) in this run; None runs until cancelled.
        min_interval_s: least time between the starts of two trainings.
        model_wait_s: how long to wait for a model newer than the last one
            trained on before training again on the current one; None waits
            for a newer model every time (round-by-round behaviour).
        unsafe_trust_puback: UNSAFE, for the chaos suite only: take the
            broker's PUBACK for acceptance (resolve the outbox entry as
            ``accepted`` then) instead of waiting for the edge's receipt. A
            broker that loses a message it acknowledged then loses an update
            the device believes delivered.
    """

    fleet: str
    site: str
    trusted_edges: tuple[VerifyKey, ...]
    codec: CodecSpec | str = "f32"
    byte_budget: int | None = None
    error_feedback: bool = True
    receipt_timeout_s: float = 30.0
    max_attempts: int = 5
    backoff_factor: float = 2.0
    backoff_max_s: float = 300.0
    retry_delay_s: float = 1.0
    rounds: int | None = None
    min_interval_s: float = 0.0
    model_wait_s: float | None = 60.0
    unsafe_trust_puback: bool = False

    def __post_init__(self) -> None:
        check_token("fleet", self.fleet)
        check_token("site", self.site)
        edges = tuple(self.trusted_edges)
        if not edges or not all(isinstance(k, VerifyKey) for k in edges):
            raise LocalProtocolError("trusted_edges must hold at least one edge VerifyKey")
        object.__setattr__(self, "trusted_edges", edges)
        if not isinstance(self.codec, CodecSpec | str):
            raise LocalProtocolError(f"codec is {self.codec!r}; give a CodecSpec or a codec name")
        if self.byte_budget is not None and self.byte_budget < 1:
            raise LocalProtocolError(f"byte_budget is {self.byte_budget}; it must be >= 1")
        if self.max_attempts < 1:
            raise LocalProtocolError(f"max_attempts is {self.max_attempts}; it must be >= 1")
        if self.rounds is not None and self.rounds < 1:
            raise LocalProtocolError(f"rounds is {self.rounds}; it must be >= 1 or None")
        if not self.backoff_factor >= 1:
            raise LocalProtocolError(f"backoff_factor is {self.backoff_factor}; it must be >= 1")
        for name in ("receipt_timeout_s", "backoff_max_s", "retry_delay_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise LocalProtocolError(f"{name} is {value!r}; it must be > 0")
        for name in ("min_interval_s", "model_wait_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise LocalProtocolError(f"{name} is {value!r}; it must be >= 0")

    def resolve_codec(self, num_params: int) -> CodecSpec:
        """The codec for a model of ``num_params`` values.

        Raises:
            LocalProtocolError: the name does not parse, does not fit the model,
                or no codec fits the byte budget.
        """
        if self.byte_budget is not None:
            return pick_codec(num_params, self.byte_budget)
        if isinstance(self.codec, str):
            return CodecSpec.parse(self.codec, num_params=num_params)
        self.codec.expected_payload_size(num_params)  # raises if k > num_params
        return self.codec

    def receipt_wait_s(self, attempt: int) -> float:
        """How long to wait for a receipt after send number ``attempt`` (0-based)."""
        return min(self.receipt_timeout_s * self.backoff_factor**attempt, self.backoff_max_s)


@dataclass(slots=True)
class DeviceReport:
    """What one ``serve_device`` run did; updated live while it runs.

    Attributes:
        sent: first sends of new updates (trained in this run or earlier).
        accepted: accepted receipts.
        duplicates: duplicate receipts (the edge had accepted it already).
        rejected: rejected receipts; ``rejections`` counts their reasons.
        resends: sends of an update that had been sent before.
        gave_up: times an update was left in the outbox after ``max_attempts``.
        skipped: trainings whose delta could not be encoded (non-finite,
            out of the codec's range); ``skip_reasons`` says why.
        unconfirmed_rejections: rejections the edge gave before it could
            authenticate the update (not final: the update is resent), by reason.
        deferred: non-final rejections (``rate_limited``, ``future_base``,
            ``contribution_capped``): the update was kept and resent later, by reason.
        bad_receipts: receipts ignored, by reason (bad signature, untrusted
            edge, another device, unknown update...).
        trainings: completed local trainings.
        last_model_version: the current model version when last updated.
        edge_model_version: the newest model version a receipt reported.
    """

    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    resends: int = 0
    gave_up: int = 0
    skipped: int = 0
    trainings: int = 0
    last_model_version: int | None = None
    edge_model_version: int | None = None
    rejections: Counter[str] = field(default_factory=Counter)
    skip_reasons: Counter[str] = field(default_factory=Counter)
    bad_receipts: Counter[str] = field(default_factory=Counter)
    unconfirmed_rejections: Counter[str] = field(default_factory=Counter)
    deferred: Counter[str] = field(default_factory=Counter)

    @property
    def delivered(self) -> int:
        """Updates the edge holds: accepted plus duplicate receipts."""
        return self.accepted + self.duplicates


async def serve_device(
    config: DeviceConfig,
    identity: SigningIdentity,
    bus: Bus,
    trainer: Trainer,
    store: ModelStore,
    outbox: Outbox,
    *,
    limiter: trio.CapacityLimiter,
    wall_clock: Callable[[], float] = time.time,
    report: DeviceReport | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> DeviceReport:
    """Run one device until ``config.rounds`` updates are delivered (or forever).

    Subscribes to its receipt topic (durable, so receipts published while it
    was offline arrive) and to the two retained model topics, calls
    ``task_status.started()``, resends everything in the outbox, then trains
    and sends. Deadlines use trio's clock; ``wall_clock`` (Unix seconds) only
    stamps ``created_ms`` and the outbox log.

    Args:
        config: the device's settings.
        identity: the device's signing key; its key id is the device id.
        bus: a connected MQTT-flavoured bus to the site broker.
        trainer: local training; its layout must be the store's.
        store: the verified model; offers from the model topics go here.
        outbox: durable pending updates and the device log (not closed here).
        limiter: bounds concurrent trainings across devices of one process.
        wall_clock: Unix time in seconds.
        report: an object to update live (a fresh one by default).
        task_status: started once the subscriptions are open.

    Returns:
        The report, when ``config.rounds`` updates were delivered.

    Raises:
        LocalProtocolError: the trainer's layout is not the store's, or the
            codec does not fit the model.
        BusClosed: the bus or a subscription closed under the device.

    On cancellation the outbox is intact: every update was stored before its
    first publish and leaves only with its receipt, so the next start resends
    whatever is pending. A training already running in a worker thread is
    waited for (threads cannot be interrupted); its result is dropped.
    """
    if config.unsafe_trust_puback:
        _log.warning(
            "UNSAFE unsafe_trust_puback is on: device %s takes the broker's PUBACK for the "
            "edge's acceptance; updates can be lost",
            identity.key_id,
        )
    if trainer.layout.fingerprint != store.layout.fingerprint:
        raise LocalProtocolError(
            f"trainer layout {trainer.layout.fingerprint.hex()} is not the model store's "
            f"{store.layout.fingerprint.hex()}"
        )
    device = _Device(
        config,
        identity,
        bus,
        trainer,
        store,
        outbox,
        limiter,
        wall_clock,
        DeviceReport() if report is None else report,
    )
    return await device.serve(task_status)


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """A pending update plus what its send span names."""

    update_id: bytes
    seq: int
    envelope: bytes
    base_version: int | None


@dataclass(frozen=True, slots=True)
class _Hold:
    """When a deferred update may be sent again.

    Attributes:
        resume_at: trio time before which it is not resent.
        after_version: it waits for a model newer than this (None: no wait).
    """

    resume_at: float
    after_version: int | None = None


class _Device:
    def __init__(
        self,
        config: DeviceConfig,
        identity: SigningIdentity,
        bus: Bus,
        trainer: Trainer,
        store: ModelStore,
        outbox: Outbox,
        limiter: trio.CapacityLimiter,
        wall_clock: Callable[[], float],
        report: DeviceReport,
    ) -> None:
        self.config = config
        self.identity = identity
        self.me = identity.key_id
        self.bus = bus
        self.trainer = trainer
        self.store = store
        self.outbox = outbox
        self.limiter = limiter
        self.wall_clock = wall_clock
        self.report = report
        self.topics = MqttTopics(config.fleet, config.site)
        self.layout = trainer.layout
        self.codec = config.resolve_codec(self.layout.num_params)
        self.feedback = ErrorFeedback(self.layout.num_params) if config.error_feedback else None
        self.edge_keys: Mapping[str, VerifyKey] = {k.key_id: k for k in config.trusted_edges}
        # One event per update being delivered; set when its receipt resolves it.
        self.waiting: dict[bytes, trio.Event] = {}
        # Updates the edge deferred (non-final rejections), until they may be resent.
        self.held: dict[bytes, _Hold] = {}
        self.model_changed = trio.lowlevel.ParkingLot()
        self.flush_needed = False
        self.tracer = trace.get_tracer("fedtier.device")
        self.propagator = TraceContextTextMapPropagator()
        report.last_model_version = store.version

    # -- the service -------------------------------------------------------------

    async def serve(self, task_status: trio.TaskStatus[None]) -> DeviceReport:
        async with (
            self.bus.subscribe(
                self.topics.receipt(self.me), durable=f"receipts-{self.me}"
            ) as receipts,
            # Model topics are not durable (MQTT gives no retained messages
            # to shared subscriptions) and latest_only: only the newest
            # version matters, so the broker queues nothing for an offline
            # device and sends the retained newest one at every reconnect.
            self.bus.subscribe(self.topics.model_pointer(), latest_only=True) as pointers,
            self.bus.subscribe(self.topics.model_blob(), latest_only=True) as blobs,
            self.bus.subscribe(self.topics.model_blob_parts(), latest_only=True) as blob_parts,
            self.bus.subscribe(self.topics.model_certificate(), latest_only=True) as certs,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._pump_receipts, receipts)
            nursery.start_soon(self._pump_models, pointers, "pointer")
            nursery.start_soon(self._pump_models, blobs, "blob")
            nursery.start_soon(self._pump_blob_parts, blob_parts)
            nursery.start_soon(self._pump_models, certs, "certificate")
            task_status.started()
            await self._run()
            nursery.cancel_scope.cancel()
        return self.report

    def _done(self) -> bool:
        rounds = self.config.rounds
        return rounds is not None and self.report.delivered >= rounds

    async def _run(self) -> None:
        await self._deliver(self._claim_pending())
        last_trained: int | None = None
        last_start: float | None = None
        while not self._done():
            if self.flush_needed:
                # The bus went away and came back: whatever waited for a
                # receipt may have been lost with the connection.
                self.flush_needed = False
                await self._deliver(self._claim_pending())
                continue
            if last_start is not None and self.config.min_interval_s:
                await trio.sleep_until(last_start + self.config.min_interval_s)
            version, params = await self._next_model(last_trained)
            last_trained = version
            last_start = trio.current_time()
            # Taken before training so that all the heavy work (train, encode,
            # hash, sign) happens in the worker thread; a seq may be skipped,
            # never reused.
            seq = self.outbox.next_seq()
            outcome = await trio.to_thread.run_sync(
                self._build_update, version, params, seq, limiter=self.limiter
            )
            self.report.trainings += 1
            if isinstance(outcome, str):
                self.report.skipped += 1
                self.report.skip_reasons[outcome] += 1
                _log.warning("skipped the update trained from model v%d: %s", version, outcome)
                continue
            update_id, envelope = outcome
            self.outbox.put(update_id, seq, envelope, now_s=self.wall_clock())
            outgoing = _Outgoing(update_id, seq, envelope, version)
            self.waiting[update_id] = trio.Event()
            await self._deliver([outgoing])

    # -- models ------------------------------------------------------------------

    async def _pump_models(self, sub: Subscription, what: str) -> None:
        offer = {
            "pointer": self.store.offer_pointer,
            "blob": self.store.offer_blob,
            "certificate": self.store.offer_certificate,
        }[what]
        while True:
            delivery = await sub.receive()
            await delivery.ack()
            if not delivery.payload:
                # An edge cleared the retained whole blob: the current one goes as parts.
                continue
            self._model_offered(offer(delivery.payload))

    async def _pump_blob_parts(self, sub: Subscription) -> None:
        """Join the retained parts of a blob above the broker's packet limit, then offer it."""
        # The widest blob of this device's layout: float32 values, the largest header.
        assembler = BlobAssembler(limits_for_model(self.layout.num_params).max_envelope_bytes)
        while True:
            delivery = await sub.receive()
            await delivery.ack()
            index = self.topics.blob_part_index(delivery.subject)
            if index is None or not delivery.payload:
                continue
            try:
                blob = assembler.offer(index, delivery.headers, delivery.payload)
            except RemoteProtocolError as exc:
                _log.warning("model blob part on %s dropped: %s", delivery.subject, exc)
                continue
            if blob is not None:
                self._model_offered(self.store.offer_blob(blob))

    def _model_offered(self, result: ModelOffer) -> None:
        if result.status is OfferStatus.LOADED:
            self.report.last_model_version = result.version
            _log.info("model v%s loaded", result.version)
            if any(h.after_version is not None for h in self.held.values()):
                self.flush_needed = True  # a capped update may go now
            self.model_changed.unpark_all()

    def _newer_than(self, last_trained: int | None) -> bool:
        version = self.store.version
        return version is not None and (last_trained is None or version > last_trained)

    async def _next_model(self, last_trained: int | None) -> tuple[int, npt.NDArray[np.float32]]:
        """The model to train on next: a newer one, or after ``model_wait_s`` the current one."""
        wait = self.config.model_wait_s
        if self.store.version is None or wait is None:
            while not self._newer_than(last_trained):
                await self.model_changed.park()
        else:
            with trio.move_on_after(wait):
                while not self._newer_than(last_trained):
                    await self.model_changed.park()
        current = self.store.current
        assert current is not None
        return current

    # -- building an update (worker thread) ------------------------------------------

    def _build_update(
        self, version: int, params: npt.NDArray[np.float32], seq: int
    ) -> tuple[bytes, bytes] | str:
        """Train, encode, seal; returns ``(update_id, envelope)`` or why it was skipped.

        Runs in a worker thread: touches only the trainer, the error-feedback
        state and pure protocol functions, never the outbox or trio.
        """
        # The store's array is read-only and shared; the trainer gets its own.
        result: TrainResult = self.trainer.train(params.copy())
        delta = np.subtract(result.params, params, dtype=np.float32)
        if not bool(np.isfinite(delta).all()):
            return "non_finite"
        try:
            if self.feedback is not None:
                payload = self.feedback.encode(delta, self.codec)
            else:
                payload = encode(delta, self.codec)
        except LocalProtocolError:
            # f16 cannot hold values above 65504; the residual is unchanged.
            return "codec_range"
        update_id = secrets.token_bytes(16)
        message = DeviceUpdate(
            fleet=self.config.fleet,
            sender=self.me,
            seq=seq,
            created_ms=int(self.wall_clock() * 1000),
            update_id=update_id,
            base_version=version,
            layout=self.layout.fingerprint,
            num_params=self.layout.num_params,
            n_samples=result.n_samples,
            codec=self.codec,
            metrics=_wire_metrics(result.metrics),
        )
        return update_id, seal(message, payload, self.identity)

    # -- delivery ------------------------------------------------------------------

    def _claim_pending(self) -> list[_Outgoing]:
        """Everything in the outbox not being delivered already, registered for receipts.

        Synchronous on purpose: no receipt can resolve an update between
        reading the outbox and registering its event.
        """
        claimed = []
        version = self.store.version
        for p in self.outbox.pending():
            if p.update_id in self.waiting:
                continue
            hold = self.held.get(p.update_id)
            waits_for = None if hold is None else hold.after_version
            if waits_for is not None and (version is None or version <= waits_for):
                continue  # waits for a newer model (contribution_capped)
            self.waiting[p.update_id] = trio.Event()
            claimed.append(_Outgoing(p.update_id, p.seq, p.envelope, _base_version(p)))
        return claimed

    async def _deliver(self, items: list[_Outgoing]) -> None:
        """Send ``items`` and wait for their receipts, resending with growing waits."""
        try:
            for attempt in range(self.config.max_attempts):
                live = [o for o in items if not self.waiting[o.update_id].is_set()]
                if not live:
                    return
                for o in live:
                    if not self.waiting[o.update_id].is_set():
                        await self._publish(o)
                with trio.move_on_after(self.config.receipt_wait_s(attempt)):
                    for o in live:
                        await self.waiting[o.update_id].wait()
            left = [o for o in items if not self.waiting[o.update_id].is_set()]
            self.report.gave_up += len(left)
            for o in left:
                _log.warning(
                    "no receipt for update %s (seq %d) after %d sends; it stays in the outbox",
                    o.update_id.hex(),
                    o.seq,
                    self.config.max_attempts,
                )
        finally:
            for o in items:
                self.waiting.pop(o.update_id, None)

    async def _publish(self, o: _Outgoing) -> None:
        """Publish one envelope, retrying while the bus is unavailable."""
        hold = self.held.pop(o.update_id, None)
        if hold is not None:
            await trio.sleep_until(hold.resume_at)
        sends = self.outbox.mark_sent(o.update_id, self.wall_clock())
        if sends is None:
            return  # its receipt arrived meanwhile
        if sends == 1:
            self.report.sent += 1
        else:
            self.report.resends += 1
        topic = self.topics.update(self.me)
        attributes: dict[str, str | int] = {
            ATTR_UPDATE_ID: o.update_id.hex(),
            ATTR_DEVICE: self.me,
            ATTR_TIER: "device",
        }
        if o.base_version is not None:
            attributes[ATTR_MODEL_VERSION] = o.base_version
        attributes.update(
            messaging_attributes(
                SYSTEM_MQTT,
                "send",
                topic,
                message_id=o.update_id.hex(),
                body_size=len(o.envelope),
                client_id=self.me,
            )
        )
        delay = self.config.retry_delay_s
        while True:
            with self.tracer.start_as_current_span(
                span_name("device", "send"), kind=SpanKind.PRODUCER, attributes=attributes
            ) as span:
                headers: dict[str, str] = {}
                self.propagator.inject(headers)
                try:
                    # No msg_id: a broker that dedupes by id would swallow the
                    # resend, and the resend exists to make the edge answer again.
                    await self.bus.publish(topic, o.envelope, headers=headers)
                    if self.config.unsafe_trust_puback:
                        self._trust_puback(o)
                    return
                except (BusUnavailable, PublishError) as exc:
                    span.set_status(Status(StatusCode.ERROR, str(exc)))
                    self.flush_needed = True
                    _log.warning(
                        "publishing update %s failed (%s); retrying in about %.1f s",
                        o.update_id.hex(),
                        exc,
                        delay,
                    )
            # Jitter spreads a fleet that lost its broker at once.
            await trio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - not crypto
            delay = min(delay * self.config.backoff_factor, self.config.backoff_max_s)

    def _trust_puback(self, o: _Outgoing) -> None:
        """UNSAFE: resolve an update on its PUBACK, as if the edge had accepted it."""
        if self.outbox.resolve(o.update_id, "accepted", now_s=self.wall_clock()):
            self.report.accepted += 1
        event = self.waiting.get(o.update_id)
        if event is not None:
            event.set()

    # -- receipts ------------------------------------------------------------------

    async def _pump_receipts(self, sub: Subscription) -> None:
        while True:
            delivery = await sub.receive()
            self._on_receipt(delivery)
            # Acked after the outbox commit: a crash in between redelivers the
            # receipt, and a second copy is recognised as already resolved.
            await delivery.ack()

    def _bad_receipt(self, reason: str, detail: str) -> None:
        self.report.bad_receipts[reason] += 1
        _log.warning("ignored a receipt: %s", detail)

    def _on_receipt(self, delivery: Delivery) -> None:
        try:
            envelope = open_envelope(delivery.payload, self.edge_keys)
        except RemoteProtocolError as exc:
            self._bad_receipt(exc.reason, str(exc))
            return
        msg = envelope.message
        if not isinstance(msg, Receipt):
            self._bad_receipt("wrong_kind", f"a {msg.KIND.value} on the receipt topic")
            return
        if msg.fleet != self.config.fleet or msg.device != self.me:
            self._bad_receipt(
                "wrong_device", f"receipt is for device {msg.device} of fleet {msg.fleet!r}"
            )
            return
        pending = self.outbox.get(msg.update_id)
        if pending is None:
            if self.outbox.resolved_status(msg.update_id) is None:
                self._bad_receipt(
                    "unknown_update", f"receipt for unknown update {msg.update_id.hex()}"
                )
            # Else a second receipt for an update already resolved: harmless.
            return
        if pending.seq != msg.update_seq:
            self._bad_receipt(
                "seq_mismatch",
                f"receipt for update {msg.update_id.hex()} names seq {msg.update_seq}; "
                f"it was sent with seq {pending.seq}",
            )
            return
        if msg.status is ReceiptStatus.REJECTED and msg.reason in UNAUTHENTICATED_REJECTIONS:
            # The edge rejected bytes it could not authenticate: perhaps ours corrupted,
            # perhaps a forgery carrying our update id. Not final: keep it, resend.
            self.report.unconfirmed_rejections[msg.reason] += 1
            _log.warning(
                "edge %s could not authenticate update %s (seq %d): %s; it stays in the "
                "outbox and will be resent",
                msg.sender,
                msg.update_id.hex(),
                msg.update_seq,
                msg.reason,
            )
            return
        if msg.status is ReceiptStatus.REJECTED and msg.reason in NOT_FINAL_REJECTIONS:
            self._defer(msg)
            return
        self.held.pop(msg.update_id, None)
        self.outbox.resolve(msg.update_id, msg.status.value, msg.reason, now_s=self.wall_clock())
        if msg.status is ReceiptStatus.ACCEPTED:
            self.report.accepted += 1
        elif msg.status is ReceiptStatus.DUPLICATE:
            self.report.duplicates += 1
        else:
            self.report.rejected += 1
            self.report.rejections[msg.reason or "unspecified"] += 1
            _log.warning(
                "update %s (seq %d) rejected by edge %s: %s",
                msg.update_id.hex(),
                msg.update_seq,
                msg.sender,
                msg.reason or "no reason given",
            )
        previous = self.report.edge_model_version
        if previous is None or msg.model_version > previous:
            self.report.edge_model_version = msg.model_version
        event = self.waiting.get(msg.update_id)
        if event is not None:
            event.set()

    def _defer(self, msg: Receipt) -> None:
        """Keep an update the edge said "not now" to, and resend it when it may pass."""
        self.report.deferred[msg.reason] += 1
        now = trio.current_time()
        if msg.reason == Reason.RATE_LIMITED.value:
            wait_s = (
                msg.retry_after_ms / 1000.0 if msg.retry_after_ms else self.config.retry_delay_s
            )
            hold = _Hold(now + wait_s)
        elif msg.reason == Reason.CONTRIBUTION_CAPPED.value:
            hold = _Hold(now, after_version=msg.model_version)
        else:
            # future_base: the edge has not seen our model yet; it will soon.
            wait_s = msg.retry_after_ms / 1000.0 or self.config.receipt_wait_s(0)
            hold = _Hold(now + wait_s)
        self.held[msg.update_id] = hold
        _log.info(
            "edge %s deferred update %s (seq %d): %s; it stays in the outbox and will be resent",
            msg.sender,
            msg.update_id.hex(),
            msg.update_seq,
            msg.reason,
        )
        self.flush_needed = True
        event = self.waiting.get(msg.update_id)
        if event is not None:
            event.set()


def _base_version(p: PendingUpdate) -> int | None:
    """The base version inside a stored envelope (our own bytes; None if unreadable)."""
    try:
        msg = parse_envelope(p.envelope).message
    except FedtierError:
        return None
    return msg.base_version if isinstance(msg, DeviceUpdate) else None


def _wire_metrics(metrics: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """The metrics an update may carry: finite floats, short names, at most 16."""
    out: list[tuple[str, float]] = []
    for name, value in metrics.items():
        if not (isinstance(name, str) and 1 <= len(name) <= _MAX_METRIC_NAME):
            continue
        number = float(value)
        if math.isfinite(number):
            out.append((name, number))
        if len(out) == _MAX_METRICS:
            break
    return tuple(out)
