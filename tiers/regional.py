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
folding them again.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Final

import trio
from opentelemetry import trace

from fedtier.protocol.bus import Bus, Delivery, PublishAck, Subscription
from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.envelope import parse_envelope
from fedtier.protocol.errors import (
    BusError,
    FedtierError,
    LocalProtocolError,
    RemoteProtocolError,
)
from fedtier.protocol.messages import PartialAggregate, Tier
from fedtier.protocol.names import NatsSubjects
from fedtier.tiers._follower import FollowerDaemon
from fedtier.tiers._intake import Admission
from fedtier.tiers._intents import (
    FORWARDED_MAGIC,
    PartedIntents,
    decode_forwarded,
    encode_forwarded,
)
from fedtier.tiers._intents import IntentKv as ForwardedKv
from fedtier.tiers._lease import EpochWatermark, HeldTicket
from fedtier.tiers._lease import check_hold_config as _check_hold_config
from fedtier.tiers._telemetry import TierMetricsLike
from fedtier.tiers._upstream import UplinkGate, UplinkJob, retry_transient
from fedtier.tiers.config import RegionalConfig
from fedtier.tiers.core import Outcome
from fedtier.tiers.model_registry import ModelRegistryReader
from fedtier.tiers.registry import TierKeys
from fedtier.tiers.store import OutboxEntry, Recovery

__all__ = ["FORWARDED_MAX_AGE_S", "ForwardedKv", "RegionalDaemon", "check_hold_config"]

FORWARDED_MAX_AGE_S: Final = 7 * 86_400.0
"""How long an intent outlives its last write: far above any ``max_hold_s`` (at most hours).

Only a backstop: an intent left behind is re-published at every takeover of
its region, and once neither the UP stream (its dedupe window, lost whole
when the stream restarts) nor the central (a central that took over knows
its last 64 versions) remembers the partial, that re-publish is folded a
second time. So deletes are retried until done, and a taken-over intent goes
``FOREIGN_GRACE_ACK_WAITS`` ack waits after its re-publish at the latest.
"""

FOREIGN_GRACE_ACK_WAITS: Final = 3
"""Ack waits (plus one lease TTL) after a takeover's re-publish before a foreign intent goes.

The lost instance's unacknowledged deliveries come back one ack wait after
its last in-progress ack, which was before it lost the lease; an input of the
intent that has not come back by then was acknowledged before the loss and
never will. Until this instance stops, a later redelivery is still known
(``_Forwarding.foreign`` lives as long as the process).
"""


def check_hold_config(config: RegionalConfig) -> None:
    """Refuse a config whose held deliveries would come back or never be cut (``tiers._lease``).

    Raises:
        ConfigError: the combination cannot hold a buffer window.
    """
    _check_hold_config(config, who="a regional", held="edge partial", until="upstream has it")


def _partial_of(payload: bytes, daemon: RegionalDaemon) -> PartialAggregate | None:
    try:
        message = parse_envelope(payload, daemon.config.limits).message
    except FedtierError:
        return None
    return message if isinstance(message, PartialAggregate) else None


class _Forwarding(EpochWatermark, UplinkGate):
    """The regional's state for surviving a lost machine: held deliveries and intents.

    Its watermark (``EpochWatermark``) advances with each partial PubAcked by
    the UP stream.
    """

    def __init__(self, daemon: RegionalDaemon, kv: ForwardedKv) -> None:
        super().__init__()
        self.daemon = daemon
        # An intent above the server's max_payload goes as parts (tiers._intents).
        self.intents = PartedIntents(kv, lambda: daemon.nats.max_single_message_bytes)
        self.region = daemon.regional_config.region
        self.foreign: dict[bytes, str] = {}
        """Input id -> key of the intent of another instance whose partial holds it."""
        self._foreign_left: dict[str, set[bytes]] = {}
        self._foreign_until: dict[str, float] = {}
        self._waiting: dict[int, int] = {}
        self._own: dict[int, str] = {}
        self._send_delete, self._receive_delete = trio.open_memory_channel[str](1024)
        self.republished = 0
        """Partials of other instances re-published at takeover since start."""

    def key_of(self, partial_id: bytes) -> str:
        """The intent's key: region, then partial id (a region's user may write only its own)."""
        return f"{self.region}.{partial_id.hex()}"

    # -- the uplink gate ------------------------------------------------------------

    async def before_publish(self, entry: OutboxEntry) -> None:
        """Wait for the lease, then write the intent; a partial is never published without one."""
        lease = self.daemon.lease
        while lease is not None and not lease.is_held:
            await lease.wait_held()
        key = self.key_of(entry.partial_id)
        daemon = self.daemon

        async def put() -> int:
            return await self.intents.put(key, entry.envelope)

        parts = await retry_transient(
            f"intent {key}",
            "put_intent",
            put,
            retry=daemon.config.retry,
            metrics=daemon.metrics,
            log=daemon.log,
        )
        if parts:
            daemon.log.info(
                "intent %s written as %d parts (%d bytes)", key, parts, len(entry.envelope)
            )

    def published(self, entry: OutboxEntry) -> None:
        """The partial of ``entry.epoch`` is durable upstream: release the deliveries it holds."""
        self._own[entry.epoch] = self.key_of(entry.partial_id)
        self.advance(entry.epoch)
        self._maybe_forget(entry.epoch)

    # -- deliveries -------------------------------------------------------------------

    def hold(self, admission: Admission, epoch: int) -> Admission:
        """The same admission, acknowledged only once ``epoch`` is durable upstream."""
        self._waiting[epoch] = self._waiting.get(epoch, 0) + 1
        return Admission(
            admission.delivery,
            admission.outcome,
            admission.reason,
            ticket=HeldTicket(admission.ticket, self, epoch),
            after_ack=functools.partial(self._acked, epoch),
            ack=admission.ack,
        )

    async def _acked(self, epoch: int) -> None:
        self._waiting[epoch] -= 1
        self._maybe_forget(epoch)
        await trio.lowlevel.checkpoint()

    def _maybe_forget(self, epoch: int) -> None:
        """Delete an own intent once its partial is upstream and its deliveries acknowledged."""
        if (
            self._waiting.get(epoch, 0) == 0
            and epoch <= self.published_epoch
            and epoch in self._own
        ):
            self._waiting.pop(epoch, None)
            self._forget(self._own.pop(epoch))

    def _forget(self, key: str) -> None:
        # When the queue is full it is left to the bucket's max_age (a backstop only).
        with contextlib.suppress(trio.WouldBlock):
            self._send_delete.send_nowait(key)

    def forwarded(self, delivery: Delivery, partial_id: bytes) -> Admission:
        """A redelivery of an input that another instance's re-published partial holds."""
        key = self.foreign[partial_id]

        async def acked() -> None:
            left = self._foreign_left.get(key)
            if left is not None:
                left.discard(partial_id)
                if not left:
                    del self._foreign_left[key]
                    self._foreign_until.pop(key, None)
                    self._forget(key)
            self.foreign.pop(partial_id, None)
            await trio.lowlevel.checkpoint()

        return Admission(delivery, Outcome.DUPLICATE, after_ack=acked)

    # -- takeover ---------------------------------------------------------------------

    async def republish(self) -> None:
        """Re-publish the intents other instances of this region left; note the inputs inside."""
        daemon = self.daemon
        retry = functools.partial(
            retry_transient, retry=daemon.config.retry, metrics=daemon.metrics, log=daemon.log
        )
        keys = await retry("list of intents", "read_intents", self.intents.keys)
        subject = daemon.subjects.to_central()
        for key in sorted(k for k in keys if k.startswith(f"{self.region}.")):
            try:
                envelope = await retry(
                    f"read of intent {key}",
                    "read_intents",
                    functools.partial(self.intents.get, key),
                )
            except RemoteProtocolError as exc:
                # Its inputs come back to this instance and are folded anew; if the
                # lost one's partial did reach the central, its leaf index
                # quarantines the second copy whole (leaf_counted_twice).
                daemon.log.error("intent %s cannot be read (%s); left alone", key, exc)
                continue
            if envelope is None:
                continue
            if envelope.startswith(FORWARDED_MAGIC):
                # Re-published by an earlier takeover, PubAck seen: note its inputs only.
                try:
                    _, inputs = decode_forwarded(key, envelope)
                except RemoteProtocolError as exc:
                    daemon.log.error("intent %s cannot be read (%s); left alone", key, exc)
                    continue
                self._note_foreign(key, inputs)
                daemon.log.info(
                    "intent %s: its partial is upstream already (an earlier takeover "
                    "re-published it); %d inputs noted",
                    key,
                    len(inputs),
                )
                continue
            partial = _partial_of(envelope, daemon)
            if partial is None:
                daemon.log.error("intent %s is not a partial; left alone", key)
                continue
            if daemon.store.outbox_state(partial.partial_id) is not None:
                continue  # this instance's own: its outbox publishes (or published) it
            pid = partial.partial_id.hex()

            def publish(envelope: bytes = envelope, pid: str = pid) -> Awaitable[PublishAck]:
                return daemon.nats.publish(subject, envelope, msg_id=pid)

            ack = await retry(f"re-publish of partial {pid}", "republish_partial", publish)
            self.republished += 1
            self._note_foreign(key, partial.inputs)
            # Upstream has it now: a later takeover must not publish it again.
            recorded = await retry(
                f"forwarded record of intent {key}",
                "put_intent",
                functools.partial(
                    self.intents.replace, key, encode_forwarded(partial.partial_id, partial.inputs)
                ),
            )
            if not recorded:
                daemon.log.warning(
                    "intent %s: its %d input ids do not fit in one KV value; left as it is "
                    "(a later takeover re-publishes it again)",
                    key,
                    len(partial.inputs),
                )
            daemon.log.warning(
                "took over partial %s of %s from intent %s (%d inputs)%s",
                pid,
                daemon.keys.senders.describe(partial.sender)
                if partial.sender in daemon.keys.senders
                else partial.sender,
                key,
                len(partial.inputs),
                ": upstream had it already" if ack.duplicate else "",
            )

    def _note_foreign(self, key: str, inputs: list[bytes] | tuple[bytes, ...]) -> None:
        """Recognise a redelivery of ``inputs`` as forwarded; forget ``key`` after the grace."""
        self._foreign_left[key] = set(inputs)
        self._foreign_until[key] = trio.current_time() + self._foreign_grace_s()
        for input_id in inputs:
            self.foreign[input_id] = key

    def _foreign_grace_s(self) -> float:
        config = self.daemon.config
        return FOREIGN_GRACE_ACK_WAITS * config.nats.ack_wait_s + config.lease.ttl_s

    async def serve_deletes(self) -> None:
        """Delete intents no longer needed, retrying while the bus is away; forget old foreign ones.

        A delete that cannot reach the bus is retried with backoff (a left-behind
        intent is re-published at every later takeover, see
        ``FORWARDED_MAX_AGE_S``); another error leaves it to the bucket's max_age.
        """
        daemon = self.daemon
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_foreign_expiry)
            async for key in self._receive_delete:
                try:
                    await retry_transient(
                        f"delete of intent {key}",
                        "delete_intent",
                        functools.partial(self.intents.delete, key),
                        retry=daemon.config.retry,
                        metrics=daemon.metrics,
                        log=daemon.log,
                    )
                except BusError as exc:
                    daemon.log.warning("intent %s not deleted (%s); it ages out", key, exc)

    async def _serve_foreign_expiry(self) -> None:
        """Forget foreign intents whose grace after the takeover's re-publish is over."""
        while True:
            await trio.sleep(max(0.05, self._foreign_grace_s() / 4))
            now = trio.current_time()
            for key in [k for k, until in self._foreign_until.items() if until <= now]:
                del self._foreign_until[key]
                left = self._foreign_left.pop(key, set())
                self.daemon.log.info(
                    "intent %s taken over: %d of its inputs never came back (acknowledged "
                    "before the takeover); deleting it",
                    key,
                    len(left),
                )
                self._forget(key)


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
        self.forwarded: ForwardedKv | None = None
        """The ``forwarded`` KV bucket (set by the daemon shell with ``[lease] enabled``)."""
        self._forwarding: _Forwarding | None = None
        self._earlier_outbox: list[OutboxEntry] = []
        self.forgotten_at_takeover = 0
        """Open inputs and pending partials of earlier tenures forgotten at takeovers."""
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
            partial = _partial_of(delivery.payload, self)
            if partial is not None and partial.partial_id in forwarding.foreign:
                self.counts[(Outcome.DUPLICATE.value, "")] += 1
                self.metrics.update_outcome(Outcome.DUPLICATE.value, "")
                return forwarding.forwarded(delivery, partial.partial_id)
        buffer = self.buffer
        empty_before = buffer.is_empty
        admission = self._admit_partial(delivery)
        if admission.outcome is Outcome.ACCEPTED:
            return forwarding.hold(admission, buffer.epoch)
        if admission.outcome is Outcome.DUPLICATE:
            # The original is in the open epoch or an earlier one; epochs go
            # upstream in order, so waiting for the open one (when it holds
            # anything) covers both.
            return forwarding.hold(admission, buffer.epoch - 1 if empty_before else buffer.epoch)
        return admission

    # -- surviving a lost machine ([lease] enabled) -------------------------------------

    def uplink_gate(self) -> UplinkGate | None:
        """The intents around each publish, with ``[lease] enabled``."""
        if not self.config.lease.enabled:
            return None
        if self.forwarded is None:
            raise LocalProtocolError("[lease] enabled needs the forwarded bucket; none was given")
        self._forwarding = _Forwarding(self, self.forwarded)
        return self._forwarding

    async def _start(self, nursery: trio.Nursery, recovery: Recovery) -> None:
        await super()._start(nursery, recovery)
        forwarding = self._forwarding
        if forwarding is None:
            return
        pending = [entry.epoch for entry in recovery.pending_outbox]
        done = min(pending) - 1 if pending else recovery.open_epoch - 1
        forwarding.published_epoch = max(forwarding.published_epoch, done)
        nursery.start_soon(forwarding.serve_deletes)

    def _closed_without_partial(self, epoch: int) -> None:
        if self._forwarding is not None:
            self._forwarding.closed_without_partial(epoch)

    @property
    def cuts_paused(self) -> bool:
        """With ``[lease]``, cuts wait for the lease: a standby's inputs are not its own."""
        lease = self.lease
        return self._forwarding is not None and (lease is None or not lease.is_held)

    def _recovered_jobs(self, recovery: Recovery) -> list[UplinkJob]:
        """With ``[lease]``, the partials to resend are chosen at takeover (``_on_takeover``)."""
        if self._forwarding is None:
            return super()._recovered_jobs(recovery)
        self._earlier_outbox = list(recovery.pending_outbox)
        return []

    async def _on_takeover(self) -> None:
        forwarding = self._forwarding
        if forwarding is None:
            await trio.lowlevel.checkpoint()
            return
        await self._forget_unforwarded(forwarding)
        await forwarding.republish()

    async def _forget_unforwarded(self, forwarding: _Forwarding) -> None:
        """Forget what an earlier tenure folded or sealed and made known to no other instance.

        Between losing the lease and taking it again, another instance may
        have been redelivered those inputs (never acknowledged: this regional
        acknowledges an input once a partial holding it is upstream) and
        counted them. Published now, either copy could reach the central
        second and be quarantined whole (``leaf_counted_twice``) with the
        honest inputs folded beside it. So the open buffer and every pending
        partial without an intent are forgotten, and a redelivery of their
        inputs is folded anew. A pending partial whose intent is there was
        known to every instance that took over since (it re-published it, or
        will): it is resent, and upstream dedupes a copy. One whose intent is
        a forwarded record, or gone, is upstream already. Inputs re-admitted
        from the quarantine go back to it (``submit_forget_unforwarded``).
        """
        earlier, self._earlier_outbox = self._earlier_outbox, []
        daemon_retry = functools.partial(
            retry_transient, retry=self.config.retry, metrics=self.metrics, log=self.log
        )
        kept: list[OutboxEntry] = []
        forgotten: list[OutboxEntry] = []
        for entry in earlier:
            key = forwarding.key_of(entry.partial_id)
            state = await daemon_retry(
                f"read of intent {key}",
                "read_intents",
                functools.partial(forwarding.intents.state, key),
            )
            (kept if state == "intent" else forgotten).append(entry)
        buffer = self.buffer
        open_inputs = buffer.accumulator.input_count
        if forgotten or open_inputs:
            await self.store.submit_forget_unforwarded(
                buffer.epoch, [entry.partial_id for entry in forgotten]
            ).wait()
            self._empty_buffer()
            for entry in forgotten:
                forwarding.closed_without_partial(entry.epoch)
            self.forgotten_at_takeover += open_inputs + len(forgotten)
            self.log.warning(
                "took the lease: forgot %d open inputs and %d pending partials (%s) of an "
                "earlier tenure that no intent made known; their inputs were never "
                "acknowledged and are folded anew when redelivered",
                open_inputs,
                len(forgotten),
                ", ".join(entry.partial_id.hex() for entry in forgotten) or "none",
            )
        for entry in kept:
            await self.upstream.put(UplinkJob(entry))

    async def _before_settling(self, deadline: float) -> None:
        """Cut what was admitted, so its held deliveries can be acknowledged and the intake end."""
        if self._forwarding is None:
            await trio.lowlevel.checkpoint()
            return
        await self._cut_until_settled(deadline)

    @property
    def partial_codec(self) -> CodecSpec:
        """See ``FollowerDaemon``: ``[partial] codec``."""
        return self.regional_config.partial_codec

    def _cut(self, reason: str) -> UplinkJob | None:
        return self._cut_partial(
            reason, Tier.REGIONAL, self.subjects.to_central(), self.regional_config.partial_codec
        )
