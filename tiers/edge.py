"""The edge daemon: device updates in over MQTT, partials out over NATS, models relayed down.

Imports protocol, trio and tiers only; never client or simulations, never a
concrete bus adapter (it is handed two ``Bus`` objects and a model registry).

Per delivery (see ``tiers.tier`` for the shared sequence) the edge checks, in
this order, so each rejection has exactly one reason: ``malformed`` /
``too_large`` / ``unsupported_version`` (parsing), ``unknown_sender`` (device not
registered here), ``bad_signature``, ``digest_mismatch``, ``wrong_fleet``,
``layout_mismatch``; then a known ``(device, update id)`` is a *duplicate*
(acknowledged, receipt ``duplicate``, not folded); then ``replay`` (the seq
was already used by another update id of that device), ``stale`` (tau > max_staleness),
``non_finite``, ``norm_exceeded`` (reject policy; the clip policy scales the
update down and counts it as anomalous ``norm_clipped``). Rejected updates are
acknowledged too (they never become valid) and answered with a rejected receipt
when the device can be told apart (from the message or its topic).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from opentelemetry import trace

from fedtier.protocol.bus import Bus, Delivery, Subscription
from fedtier.protocol.envelope import Envelope, parse_envelope, seal
from fedtier.protocol.errors import (
    BusError,
    DecodeError,
    Reason,
    RemoteProtocolError,
    UnknownSender,
)
from fedtier.protocol.messages import DeviceUpdate, ModelAnnouncement, Receipt, ReceiptStatus, Tier
from fedtier.protocol.models import open_model_blob
from fedtier.protocol.names import MqttTopics, NatsSubjects
from fedtier.protocol.telemetry import ATTR_DEVICE, ATTR_STALENESS, ATTR_UPDATE_ID, span_name
from fedtier.tiers._telemetry import TierMetricsLike, extract_context, traceparent_of
from fedtier.tiers.config import EdgeConfig
from fedtier.tiers.folding import fold_update_message
from fedtier.tiers.model_registry import ModelRegistryReader
from fedtier.tiers.registry import TierKeys
from fedtier.tiers.store import InputRecord, Recovery
from fedtier.tiers.tier import (
    Admission,
    FollowerDaemon,
    Outcome,
    UplinkJob,
    check_payload,
    rejection,
    retry_transient,
)

__all__ = ["EdgeDaemon"]

_NO_ID = bytes(16)


class EdgeDaemon(FollowerDaemon):
    """One edge daemon of a site.

    Args:
        config: the edge's configuration.
        mqtt: the site broker's bus (device updates in, receipts and models out).
        nats: the NATS bus (partials out).
        registry_store: where the central's signed model versions are read.
        keys: identity, device registry and pinned central key; loaded from
            the config's files when None.
        metrics: duck-typed ``TierMetrics``; a no-op when None.
        tracer: OpenTelemetry tracer; the global fedtier tracer when None.
        clock_ms: wall clock for ``created_ms`` (tests pin it).
        store_in_thread: run sqlite commits on a worker thread (False for
            fake-clock tests).
    """

    tier = "edge"
    sender_role = "device"

    def __init__(
        self,
        config: EdgeConfig,
        *,
        mqtt: Bus,
        nats: Bus,
        registry_store: ModelRegistryReader,
        keys: TierKeys | None = None,
        metrics: TierMetricsLike | None = None,
        tracer: trace.Tracer | None = None,
        clock_ms: Callable[[], int] | None = None,
        store_in_thread: bool = True,
    ) -> None:
        super().__init__(
            config,
            nats=nats,
            registry_store=registry_store,
            keys=keys if keys is not None else self.load_keys(config),
            metrics=metrics,
            tracer=tracer,
            clock_ms=clock_ms,
            store_in_thread=store_in_thread,
        )
        self.edge_config = config
        self.mqtt = mqtt
        self.topics = MqttTopics(config.fleet, config.site)
        self.subjects = NatsSubjects(config.fleet)
        self.receipts_sent = 0

    # -- input ----------------------------------------------------------------------

    def _open_input(self) -> AbstractAsyncContextManager[Subscription]:
        # One durable name per site: edges of a site share its devices.
        return self.mqtt.subscribe(
            self.topics.updates_filter(),
            durable=f"fedtier-edge-{self.edge_config.site}",
            capacity=self.config.intake_capacity,
        )

    def _admit(self, delivery: Delivery) -> Admission:
        with self.tracer.start_as_current_span(
            span_name("edge", "process"), context=extract_context(delivery.headers)
        ) as span:
            self.metrics.update_bytes(len(delivery.payload))
            topic_device = self.topics.device_of(delivery.subject)
            claimed: DeviceUpdate | None = None
            try:
                envelope = parse_envelope(delivery.payload, self.config.limits)
                message = envelope.message
                if not isinstance(message, DeviceUpdate):
                    raise DecodeError(
                        f"a {message.KIND.value} message arrived on update topic {delivery.subject}"
                    )
                claimed = message
                span.set_attribute(ATTR_UPDATE_ID, message.update_id.hex())
                span.set_attribute(ATTR_DEVICE, message.sender)
                if topic_device is not None and message.sender != topic_device:
                    raise DecodeError(
                        f"update {message.update_id.hex()} names device {message.sender} but "
                        f"arrived on the topic of device {topic_device}"
                    )
                return self._check_and_fold(delivery, envelope, message, span)
            except RemoteProtocolError as exc:
                self._count(span, Outcome.REJECTED, exc.reason)
                if exc.reason in ("non_finite", "norm_exceeded"):
                    self._note_anomaly(exc.reason)
                device = claimed.sender if claimed is not None else topic_device
                label = self.keys.senders.describe(device) if device else "an unknown device"
                self.log.warning("rejected an update from %s (%s): %s", label, exc.reason, exc)
                return Admission(
                    delivery,
                    Outcome.REJECTED,
                    exc.reason,
                    after_ack=self._receipt_sender(
                        device,
                        claimed.update_id if claimed is not None else _NO_ID,
                        claimed.seq if claimed is not None else 0,
                        ReceiptStatus.REJECTED,
                        exc.reason,
                    ),
                )

    def _check_and_fold(
        self, delivery: Delivery, envelope: Envelope, message: DeviceUpdate, span: trace.Span
    ) -> Admission:
        config = self.edge_config
        key = self.keys.senders.get(message.sender)
        if key is None:
            raise UnknownSender(
                f"update {message.update_id.hex()} from device {message.sender}, which is not "
                f"registered at edge site {config.site!r}"
            )
        envelope.verify(key)
        payload = envelope.payload
        who = self.keys.senders.describe(message.sender)
        uid = message.update_id.hex()
        if message.fleet != config.fleet:
            raise rejection(
                Reason.WRONG_FLEET,
                f"update {uid} from {who} is for fleet {message.fleet!r}; this edge serves "
                f"{config.fleet!r}",
            )
        model = self._model_view()
        model.check_layout(message.layout, message.num_params, f"update {uid} from {who}")
        store = self.store
        state = store.input_state(message.sender, message.update_id)
        forgotten = self._forgotten(state, message.update_id)
        if state is not None and not forgotten:
            self._count(span, Outcome.DUPLICATE)
            self.log.info("update %s from %s is a duplicate", uid, who)
            return Admission(
                delivery,
                Outcome.DUPLICATE,
                ticket=store.pending_ticket(message.sender, message.update_id),
                after_ack=self._receipt_sender(
                    message.sender, message.update_id, message.seq, ReceiptStatus.DUPLICATE, ""
                ),
            )
        # Retries reorder a device's updates (an unanswered one is resent after newer
        # ones were accepted), so the rule is not "above the high-water mark" but
        # "a seq is never used by two update ids": replaying an accepted envelope is a
        # duplicate, and a forged one cannot carry a valid signature. (A forgotten
        # input, under an unsafe switch, took its own seq: it is no replay.)
        if not forgotten and store.seq_taken(message.sender, message.seq):
            raise rejection(
                Reason.REPLAY,
                f"update {uid} from {who} reuses seq {message.seq}, already taken by "
                "another update from the same device",
            )
        assessment = self.config.staleness.assess(model.version, message.base_version)
        span.set_attribute(ATTR_STALENESS, assessment.tau)
        if not assessment.accepted:
            raise rejection(
                Reason.STALE,
                f"update {uid} from {who} was trained from model v{message.base_version}; "
                f"this edge knows v{model.version} and accepts at most "
                f"{self.config.staleness.max_staleness} versions of staleness",
            )
        result = check_payload(
            payload,
            message.codec,
            message.num_params,
            max_norm=config.max_norm,
            norm_policy=config.norm_policy,
        )
        if result.clipped:
            self._note_anomaly("norm_clipped")
            self.log.info(
                "update %s from %s has L2 norm %.6g; clipped to %.6g",
                uid,
                who,
                result.norm,
                config.max_norm,
            )
        self._make_room(1, 1)
        buffer = self.buffer
        fold_update_message(
            buffer.aggregate,
            message,
            payload,
            tau=assessment.tau,
            discount=assessment.discount,
            clip_scale=result.scale,
        )
        accepted_ms = self.clock_ms()
        trace_parent = traceparent_of(span)
        ticket = store.submit_accept(
            InputRecord(
                sender=message.sender,
                input_id=message.update_id,
                seq=message.seq,
                epoch=buffer.epoch,
                envelope=bytes(delivery.payload),
                base_version=message.base_version,
                n_samples=float(message.n_samples),
                tau=assessment.tau,
                discount=assessment.discount,
                clip_scale=result.scale,
                accepted_ms=accepted_ms,
                trace=trace_parent,
            ),
            replace=forgotten,
        )
        self._note_accepted(span, message.sender, trace_parent, accepted_ms, assessment.tau)
        self.log.debug("accepted update %s from %s (tau %d)", uid, who, assessment.tau)
        return Admission(
            delivery,
            Outcome.ACCEPTED,
            ticket=ticket,
            after_ack=self._receipt_sender(
                message.sender, message.update_id, message.seq, ReceiptStatus.ACCEPTED, ""
            ),
        )

    def _receipt_sender(
        self,
        device: str | None,
        update_id: bytes,
        update_seq: int,
        status: ReceiptStatus,
        reason: str,
    ) -> Callable[[], Awaitable[None]] | None:
        if device is None:
            return None

        async def send_receipt() -> None:
            receipt = Receipt(
                fleet=self.config.fleet,
                sender=self.key_id,
                seq=self._next_seq(),
                created_ms=self.clock_ms(),
                update_id=update_id,
                device=device,
                update_seq=update_seq,
                status=status,
                reason=reason,
                model_version=self.known_version,
            )
            try:
                await self.mqtt.publish(
                    self.topics.receipt(device), seal(receipt, b"", self.keys.identity)
                )
            except BusError as exc:
                # The device resends without a receipt and then gets "duplicate".
                self.log.warning(
                    "receipt for update %s to %s not sent: %s",
                    update_id.hex(),
                    self.keys.senders.describe(device),
                    exc,
                )
                return
            self.receipts_sent += 1

        return send_receipt

    # -- buffer -----------------------------------------------------------------------

    def _refold(self, recovery: Recovery) -> None:
        buffer = self.buffer
        for record in recovery.open_inputs:
            envelope = parse_envelope(record.envelope, self.config.limits)
            message = envelope.message
            assert isinstance(message, DeviceUpdate)
            fold_update_message(
                buffer.aggregate,
                message,
                envelope.payload,
                tau=record.tau,
                discount=record.discount,
                clip_scale=record.clip_scale,
            )
            self._note_recovered(record)

    def _cut(self, reason: str) -> UplinkJob | None:
        return self._cut_partial(
            reason,
            Tier.EDGE,
            self.subjects.to_region(self.edge_config.region),
            self.edge_config.partial_codec,
        )

    # -- models -----------------------------------------------------------------------

    async def _relay_model(self, pointer: ModelAnnouncement, data: bytes) -> bool:
        """Fetch and verify the blob, then publish blob and pointer retained to devices."""
        version = pointer.version
        blob = await retry_transient(
            f"fetch of model blob v{version}",
            "fetch_model",
            lambda: self.registry.blob(version),
            retry=self.config.retry,
            metrics=self.metrics,
            log=self.log,
        )
        if blob is None:
            self.log.warning("model registry has no blob for v%d yet; skipping it", version)
            return False
        try:
            open_model_blob(blob, self.keys.central, pointer, self.config.limits)
        except RemoteProtocolError as exc:
            self.log.warning("model blob v%d does not verify (%s); not relaying it", version, exc)
            return False
        # Blob first: a device that sees the new pointer finds its blob already there.
        for topic, payload in (
            (self.topics.model_blob(), blob),
            (self.topics.model_pointer(), data),
        ):
            await retry_transient(
                f"retained publish of model v{version} on {topic}",
                "relay_model",
                functools.partial(self.mqtt.publish, topic, payload, retain=True),
                retry=self.config.retry,
                metrics=self.metrics,
                log=self.log,
            )
        self.log.info("relayed model v%d to the devices of site %s", version, self.edge_config.site)
        return True
