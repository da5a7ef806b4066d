"""The regional daemon: edge partials of one region in, regional partials out to the central.

Imports protocol, trio and tiers only; never client or simulations, never a
concrete bus adapter.

Each edge partial is verified against the registry of edge keys, checked
(fleet, tier, layout, id derived from its inputs, finite numerator),
deduplicated by partial id in the state store (beyond JetStream's dedupe
window) and folded with ``extra_tau = known version - partial.known_version``
and ``discount = s(extra_tau)``, however large ``extra_tau`` is (past
``max_staleness`` it is counted as ``late_partial``, never refused). The
JetStream message is acknowledged only after the store commit (``tiers.tier``).

With ``[lease] enabled`` (two or more regionals per region, one active) the
regional survives the loss of its machine (docs/architecture.md, "More than
one instance"): it acknowledges an edge partial only once a partial holding it
is durable upstream (PubAck of the UP stream), holding the delivery meanwhile
with in-progress acks; and before publishing a partial it writes the sealed
envelope as an intent to the ``forwarded`` KV bucket. A standby that takes the
region's lease re-publishes every intent it finds (same bytes, same
``msg_id``: the UP stream or the central's store dedupes a copy that arrived
already) and acknowledges the redelivered inputs those intents hold without
folding them again (``tiers._forwarding``, shared with a leased edge).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from opentelemetry import trace

from fedtier.protocol.bus import Bus, Delivery, Subscription
from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.messages import Tier
from fedtier.protocol.names import NatsSubjects
from fedtier.tiers._follower import FollowerDaemon
from fedtier.tiers._forwarding import FORWARDED_MAX_AGE_S, ForwardedKv, partial_of
from fedtier.tiers._intake import Admission
from fedtier.tiers._lease import check_hold_config as _check_hold_config
from fedtier.tiers._telemetry import TierMetricsLike
from fedtier.tiers._upstream import UplinkJob
from fedtier.tiers.config import RegionalConfig
from fedtier.tiers.core import Outcome
from fedtier.tiers.model_registry import ModelRegistryReader
from fedtier.tiers.registry import TierKeys

__all__ = ["FORWARDED_MAX_AGE_S", "ForwardedKv", "RegionalDaemon", "check_hold_config"]


def check_hold_config(config: RegionalConfig) -> None:
    """Refuse a config whose held deliveries would come back or never be cut (``tiers._lease``).

    Raises:
        ConfigError: the combination cannot hold a buffer window.
    """
    _check_hold_config(config, who="a regional", held="edge partial", until="upstream has it")


class RegionalDaemon(FollowerDaemon):
    """One regional daemon (several may share a region's durable consumer).

    Args:
        config: the regional configuration.
        nats: the NATS bus (partials in and out).
        registry_store: where the central's signed model versions are read.
        keys: identity, edge key registry and pinned central key; loaded from
            the config's files when None.
        metrics: duck-typed ``TierMetrics``; a no-op when None.
        tracer: OpenTelemetry tracer; the global fedtier tracer when None.
        clock_ms: wall clock for ``created_ms``.
        store_in_thread: run sqlite commits on a worker thread.
    """

    tier = "regional"
    sender_role = "edge"
    accepts = (Tier.EDGE,)

    def __init__(
        self,
        config: RegionalConfig,
        *,
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
        self.regional_config = config
        self.subjects = NatsSubjects(config.fleet)
        if config.lease.enabled:
            check_hold_config(config)

    def _open_input(self) -> AbstractAsyncContextManager[Subscription]:
        region = self.regional_config.region
        return self.nats.subscribe(
            self.subjects.to_region(region),
            durable=self.subjects.regional_consumer(region),
            capacity=self.config.intake_capacity,
        )

    def _admit(self, delivery: Delivery) -> Admission:
        forwarding = self._forwarding
        if forwarding is None:
            return self._admit_partial(delivery)
        if forwarding.foreign:
            partial = partial_of(delivery.payload, self)
            if partial is not None and partial.partial_id in forwarding.foreign:
                self.counts[(Outcome.DUPLICATE.value, "")] += 1
                self.metrics.update_outcome(Outcome.DUPLICATE.value, "")
                return forwarding.forwarded_delivery(delivery, partial.partial_id)
        empty_before = self.buffer.is_empty
        return self._held(self._admit_partial(delivery), empty_before=empty_before)

    # -- surviving a lost machine ([lease] enabled; tiers._forwarding) -------------------

    def _intent_prefix(self) -> str:
        return f"{self.regional_config.region}."

    def _upstream_subject(self) -> str:
        return self.subjects.to_central()

    @property
    def partial_codec(self) -> CodecSpec:
        """See ``FollowerDaemon``: ``[partial] codec``."""
        return self.regional_config.partial_codec

    def _cut(self, reason: str) -> UplinkJob | None:
        return self._cut_partial(
            reason, Tier.REGIONAL, self.subjects.to_central(), self.regional_config.partial_codec
        )
