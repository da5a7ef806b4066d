"""The edge daemon: device updates in over MQTT, partials out over NATS, models relayed down.

Imports protocol, trio and tiers only; never client or simulations, never a
concrete bus adapter (it is handed two ``Bus`` objects and a model registry).

Per delivery the core (``fedtier.tiers.core.admit_update``) decides, with one
reason per rejection, in the order its docstring gives; this shell folds and
records what it accepts, and answers the device with a signed receipt:
``accepted`` and ``duplicate`` once the record is durable, ``rejected`` with its
reason (acknowledged too: it will never become valid) when the device can be
told apart (from the message or its topic).

The edge is where one device's influence is bounded (``tiers.core._influence``):
it owns the ``InfluenceState`` (token buckets, contribution counts, the adaptive
norm bound) and passes the trio clock as ``now``. ``rate_limited`` receipts carry
``retry_after_ms``; ``rate_limited``, ``future_base`` and ``contribution_capped``
are not final for the device (docs/protocol.md, receipts). It also scores each
device's history against the models it relays (``tiers.core._reputation``) and
folds a low-reputation device's updates with ``[reputation] low_weight``,
counted as ``fedtier_anomalous_updates_total{detector="low_reputation"}`` and
traced as a ``low_reputation`` span event.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Final

import trio
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from fedtier.protocol.bus import Bus, Delivery, Subscription
from fedtier.protocol.codecs import CodecSpec, decode
from fedtier.protocol.envelope import parse_envelope, seal
from fedtier.protocol.errors import (
    BusError,
    ConfigError,
    Reason,
    RemoteProtocolError,
    UpdateRejected,
)
from fedtier.protocol.messages import (
    DeviceUpdate,
    ModelAnnouncement,
    Receipt,
    ReceiptStatus,
    Tier,
)
from fedtier.protocol.model_parts import MAX_BLOB_PARTS, blob_parts
from fedtier.protocol.models import open_model_blob
from fedtier.protocol.names import MqttTopics, NatsSubjects
from fedtier.protocol.telemetry import (
    ATTR_DEVICE,
    ATTR_UPDATE_ID,
    SYSTEM_MQTT,
    messaging_attributes,
    span_name,
)
from fedtier.tiers._follower import FollowerDaemon
from fedtier.tiers._intake import Admission
from fedtier.tiers._telemetry import TierMetricsLike, extract_context
from fedtier.tiers._upstream import UplinkJob, retry_transient
from fedtier.tiers.config import EdgeConfig
from fedtier.tiers.core import (
    MESSAGE_OVERHEAD,
    AcceptedInput,
    AdmissionRules,
    DeclaredCaps,
    InfluenceState,
    Outcome,
    admit_update,
)
from fedtier.tiers.model_registry import ModelRegistryReader
from fedtier.tiers.registry import TierKeys
from fedtier.tiers.store import Recovery

__all__ = ["GC_GEN0_THRESHOLD", "EdgeDaemon", "tune_gc"]

_NO_ID = bytes(16)
_ATTR_REPUTATION: Final = "fedtier.reputation.score"
"""The span event attribute of a down-weighted update: its device's reputation score."""

GC_GEN0_THRESHOLD: Final = 50_000
"""Allocations between young-generation collections in a tuned daemon (Python's default: 700).

Each update allocates dozens of container objects (envelope, message,
decision, span, receipt), so at the default the young generation was
collected every 15 updates or so, and each full collection walks every object
of the process; a ``perf`` profile of the edge once put the collector at
about a tenth of its CPU with small updates (docs/performance.md, edge
intake). Cycles are rare here: reference counting frees an update's objects."""


def tune_gc() -> None:
    """Tune the cyclic garbage collector for a long-running daemon process, once it started.

    Collects what start-up left, then freezes every surviving object (``gc.freeze``:
    they are never scanned again; they live as long as the process anyway) and
    raises the young generation's threshold to :data:`GC_GEN0_THRESHOLD`.
    Reference counting still frees almost everything an update allocates at
    once; the collector only finds cycles, later.

    Process-wide: for a process that runs one daemon (``fedtier edge``, the edge
    bench), not for a test process that runs many.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)


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
        gc_tuning: call :func:`tune_gc` once started (recovery done, model
            known): for a process that runs this daemon alone.
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
        gc_tuning: bool = False,
    ) -> None:
        self._gc_tuning = gc_tuning
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
        # With [lease] a device's update is acknowledged once a partial holding it
        # is upstream, and the intake holds at most intake_capacity of them.
        if (
            config.lease.enabled
            and config.flush.max_age_s is None
            and config.intake_capacity < config.flush.max_inputs
        ):
            raise ConfigError(
                f"[lease] enabled at an edge holds at most intake_capacity "
                f"({config.intake_capacity}) device updates, fewer than flush.max_inputs "
                f"({config.flush.max_inputs}), and flush.max_age_s is unset: a buffer "
                "would never be cut; set flush.max_age_s or raise intake_capacity"
            )
        # Per-device bounds whose state lives in memory (module docstring of
        # tiers.core._influence: a restart only restarts their warm-up).
        self.influence = InfluenceState(self._rules.influence, self._rules.max_norm)
        # Each device's weight cap: its declared size in the key registry, else the
        # fleet's default (tiers.core._influence); follows registry reloads.
        self._caps = DeclaredCaps(self._rules.influence)
        if self.influence.norm is None:
            self.log.warning(
                "UNSAFE: no norm bound on device updates (FEDTIER_UNSAFE=no_norm_bound); one "
                "registered device can move the model as far as it likes"
            )
        else:
            self.log.info(
                "norm bound: %s, %.6g; weight cap: %s samples; rate limit: %s; at most %s "
                "updates per device per version",
                self.influence.norm.mode,
                self.influence.norm.initial,
                self._caps.current(self.keys.senders.declared_samples()).default_cap,
                f"{self._rules.influence.rate_per_s:g}/s" if self.influence.buckets else "none",
                self._rules.influence.max_updates_per_version,
            )

    async def _start(self, nursery: trio.Nursery, recovery: Recovery) -> None:
        await super()._start(nursery, recovery)
        if self._gc_tuning:
            # Start-up's objects (keys, the refolded buffer) are all made by now.
            tune_gc()
            self.log.debug("garbage collector tuned: threshold %s", gc.get_threshold())

    # -- input ----------------------------------------------------------------------

    def _open_input(self) -> AbstractAsyncContextManager[Subscription]:
        # One durable name per site: edges of a site share its devices.
        return self.mqtt.subscribe(
            self.topics.updates_filter(),
            durable=f"fedtier-edge-{self.edge_config.site}",
            capacity=self.config.intake_capacity,
        )

    def _admission_rules(self) -> AdmissionRules:
        # Called by TierDaemon.__init__, before this class's own attributes exist.
        config = self.config
        assert isinstance(config, EdgeConfig)
        return dataclasses.replace(
            super()._admission_rules(),
            max_norm=config.max_norm,
            norm_policy=config.norm_policy,
            influence=config.influence,
        )

    def _admit(self, delivery: Delivery) -> Admission:
        empty_before = self.buffer.is_empty
        with self.tracer.start_as_current_span(
            span_name("edge", "process"),
            context=extract_context(delivery.headers),
            kind=SpanKind.CONSUMER,
            attributes=messaging_attributes(
                SYSTEM_MQTT,
                "process",
                delivery.subject,
                body_size=len(delivery.payload),
                client_id=self.key_id,
            ),
        ) as span:
            self.metrics.update_bytes(len(delivery.payload))
            topic_device = self.topics.device_of(delivery.subject)
            influence = self._caps.rules_for(self.keys.senders.declared_samples(), topic_device)
            # A device whose updates, summed, point against the model's movement is
            # folded with a small weight (tiers.core._reputation), never dropped.
            low = self.influence.down_weighted(influence, topic_device)
            if low is not None:
                influence = low
            decision = admit_update(
                delivery.payload,
                rules=dataclasses.replace(self._rules, influence=influence),
                senders=self.keys.senders,
                model=self._model_view(),
                seen=self._seen,
                topic_device=topic_device,
                influence=self.influence,
                now=trio.current_time(),
            )
            self._annotate(span, decision, ATTR_UPDATE_ID, ATTR_DEVICE)
            device = decision.sender
            update_id = decision.input_id if decision.input_id is not None else _NO_ID
            if decision.outcome is Outcome.REJECTED:
                reason = decision.reason
                assert reason is not None
                self._count(span, Outcome.REJECTED, reason)
                if reason in (Reason.NON_FINITE, Reason.NORM_EXCEEDED):
                    self._note_anomaly(reason)
                label = self.keys.senders.describe(device) if device else "an unknown device"
                # A flooding device must not flood the log too: its rejections are
                # counted per reason; the line itself is for debugging.
                self.log.log(
                    logging.DEBUG if reason is Reason.RATE_LIMITED else logging.WARNING,
                    "rejected an update from %s (%s): %s",
                    label,
                    reason,
                    decision.error,
                )
                return Admission(
                    delivery,
                    Outcome.REJECTED,
                    reason,
                    after_ack=self._receipt_sender(
                        device,
                        update_id,
                        decision.seq,
                        ReceiptStatus.REJECTED,
                        reason,
                        retry_after_ms=decision.retry_after_ms,
                    ),
                )
            assert device is not None
            who = self.keys.senders.describe(device)
            forwarding = self._forwarding
            if forwarding is not None and update_id in forwarding.foreign:
                # Inside a partial another instance of this site sealed and that a
                # takeover re-published: upstream has it, so it is answered at once.
                self._count(span, Outcome.DUPLICATE)
                self.log.info(
                    "update %s from %s went upstream in a taken-over partial",
                    update_id.hex(),
                    who,
                )
                return forwarding.forwarded(
                    Admission(
                        delivery,
                        Outcome.DUPLICATE,
                        after_ack=self._receipt_sender(
                            device, update_id, decision.seq, ReceiptStatus.DUPLICATE, ""
                        ),
                    ),
                    update_id,
                )
            if decision.outcome is Outcome.DUPLICATE:
                self._count(span, Outcome.DUPLICATE)
                self.log.info("update %s from %s is a duplicate", update_id.hex(), who)
                return self._held(
                    Admission(
                        delivery,
                        Outcome.DUPLICATE,
                        ticket=self.store.pending_ticket(device, update_id),
                        after_ack=self._receipt_sender(
                            device, update_id, decision.seq, ReceiptStatus.DUPLICATE, ""
                        ),
                    ),
                    empty_before=empty_before,
                )
            accepted = decision.accepted
            assert accepted is not None
            if accepted.clipped:
                self._note_anomaly("norm_clipped")
                self.log.info(
                    "update %s from %s has L2 norm %.6g; clipped to %.6g",
                    update_id.hex(),
                    who,
                    accepted.norm,
                    accepted.norm * accepted.clip_scale,
                )
            if accepted.weight_capped:
                self._note_anomaly("weight_capped")
                message = accepted.message
                self.log.info(
                    "update %s from %s claims %s samples; folded with the cap %d",
                    update_id.hex(),
                    who,
                    getattr(message, "n_samples", math.nan),
                    int(accepted.n_samples),
                )
            try:
                ticket = self._fold_and_record(delivery, accepted, span)
            except UpdateRejected as exc:
                # Alone it would overflow an empty epoch's sums: nothing was folded
                # or stored, and the device is told, finally, as for any non_finite.
                self._count(span, Outcome.REJECTED, exc.reason)
                self._note_anomaly(exc.reason)
                self.log.warning("rejected an update from %s (%s): %s", who, exc.reason, exc)
                return Admission(
                    delivery,
                    Outcome.REJECTED,
                    exc.reason,
                    after_ack=self._receipt_sender(
                        device, update_id, decision.seq, ReceiptStatus.REJECTED, exc.reason
                    ),
                )
            self._reputation(accepted, span, who, down_weighted=low is not None)
            self.log.debug(
                "accepted update %s from %s (tau %d)", update_id.hex(), who, accepted.tau
            )
            return self._held(
                Admission(
                    delivery,
                    Outcome.ACCEPTED,
                    ticket=ticket,
                    after_ack=self._receipt_sender(
                        device, update_id, decision.seq, ReceiptStatus.ACCEPTED, ""
                    ),
                ),
                empty_before=empty_before,
            )

    def _reputation(
        self, accepted: AcceptedInput, span: trace.Span, who: str, *, down_weighted: bool
    ) -> None:
        """Count and trace a down-weighted update, then add the update to its device's history."""
        reputation = self.influence.reputation
        if reputation is None:
            return
        if down_weighted:
            score = reputation.score(accepted.sender)
            self._note_anomaly("low_reputation")
            span.add_event(
                "low_reputation",
                {_ATTR_REPUTATION: math.nan if score is None else score},
            )
            self.log.info(
                "update %s from %s folded with weight %d: low reputation (score %.3f)",
                accepted.input_id.hex(),
                who,
                int(accepted.n_samples),
                math.nan if score is None else score,
            )
        message = accepted.message
        assert isinstance(message, DeviceUpdate)
        reputation.observe(
            accepted.sender,
            decode(accepted.payload, message.codec, message.num_params),
            accepted.clip_scale,
        )

    def _receipt_sender(
        self,
        device: str | None,
        update_id: bytes,
        update_seq: int,
        status: ReceiptStatus,
        reason: str,
        *,
        retry_after_ms: int = 0,
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
                retry_after_ms=retry_after_ms,
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

    @property
    def partial_codec(self) -> CodecSpec:
        """See ``FollowerDaemon``: ``[partial] codec``."""
        return self.edge_config.partial_codec

    def _intent_prefix(self) -> str:
        return f"edge.{self.edge_config.region}.{self.edge_config.site}."

    def _upstream_subject(self) -> str:
        return self.subjects.to_region(self.edge_config.region)

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
            envelope, opened = open_model_blob(blob, self.keys.models, pointer, self.config.limits)
        except RemoteProtocolError as exc:
            self.log.warning("model blob v%d does not verify (%s); not relaying it", version, exc)
            return False
        if self.influence.reputation is not None:
            # Devices are scored against the models this edge relays.
            self.influence.reputation.model(
                version, decode(envelope.payload, opened.codec, opened.num_params)
            )
        # Mosquitto drops the connection of a client that sends a packet above
        # its max_packet_size, on every retry: a larger blob goes as retained parts
        # (protocol.model_parts), and an empty retained blob clears the whole one.
        limit = self.mqtt.max_message_bytes
        blob_messages: Iterable[tuple[str, bytes, dict[str, str] | None]]
        if limit is not None and len(blob) + MESSAGE_OVERHEAD > limit:
            part_bytes = limit - MESSAGE_OVERHEAD
            if part_bytes < 1 or -(-len(blob) // part_bytes) > MAX_BLOB_PARTS:
                raise ConfigError(
                    f"the MQTT broker's maximum packet size of {limit:,} bytes cannot carry "
                    f"model v{version}'s {len(blob):,}-byte blob in at most {MAX_BLOB_PARTS:,} "
                    "parts: raise max_packet_size in mosquitto.conf"
                )
            # Lazily: a part's bytes are cut as it is published, so the relay holds
            # one part besides the blob, not a second copy of the whole model.
            parts = blob_parts(blob, part_bytes)
            blob_messages = itertools.chain(
                (
                    (self.topics.model_blob_part(i), chunk, properties)
                    for i, (properties, chunk) in enumerate(parts)
                ),
                [(self.topics.model_blob(), b"", None)],
            )
        else:
            blob_messages = [(self.topics.model_blob(), blob, None)]
        # Blob first: a device that sees the new pointer finds its blob already there;
        # the signer's certificate before both (devices that pin the fleet root need it).
        certificate = self.keys.models.document(parse_envelope(data, self.config.limits).sender)
        for topic, payload, properties in itertools.chain(
            [(self.topics.model_certificate(), certificate, None)] if certificate else [],
            blob_messages,
            [(self.topics.model_pointer(), data, None)],
        ):
            await retry_transient(
                f"retained publish of model v{version} on {topic}",
                "relay_model",
                functools.partial(
                    self.mqtt.publish, topic, payload, headers=properties, retain=True
                ),
                retry=self.config.retry,
                metrics=self.metrics,
                log=self.log,
            )
        self.log.info("relayed model v%d to the devices of site %s", version, self.edge_config.site)
        return True
