"""What the edge and the regional share: they follow the central's model versions and send partials.

Imports protocol, trio and tiers; never client or simulations, never a concrete
bus adapter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import trio
from opentelemetry import trace

from fedtier.protocol.bus import Bus
from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.envelope import parse_envelope
from fedtier.protocol.errors import (
    BusError,
    ConfigError,
    FedtierError,
    LocalProtocolError,
    RemoteProtocolError,
)
from fedtier.protocol.messages import Kind, ModelAnnouncement, Tier
from fedtier.protocol.models import open_model_pointer
from fedtier.tiers._forwarding import ForwardedKv, Forwarding
from fedtier.tiers._intake import Admission
from fedtier.tiers._telemetry import (
    TierMetricsLike,
)
from fedtier.tiers._upstream import Uplink, UplinkGate, UplinkJob, retry_transient
from fedtier.tiers.config import TierConfig
from fedtier.tiers.core import (
    MESSAGE_OVERHEAD,
    ModelView,
    Outcome,
    check_fits,
    partial_envelope_bound,
)
from fedtier.tiers.faults import unsafe
from fedtier.tiers.model_registry import ModelRegistryReader, RevocationFollower
from fedtier.tiers.registry import TierKeys
from fedtier.tiers.store import (
    OutboxEntry,
    Recovery,
)
from fedtier.tiers.tier import OpenBuffer, TierDaemon

__all__ = ["FollowerDaemon"]


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
        self.revocations: RevocationFollower | None = None
        self.forwarded: ForwardedKv | None = None
        """The ``forwarded`` KV bucket (set by the daemon shell with ``[lease] enabled``)."""
        self._forwarding: Forwarding | None = None
        self._earlier_outbox: list[OutboxEntry] = []
        self.forgotten_at_takeover = 0
        """Open inputs and pending partials of earlier tenures forgotten at takeovers."""
        # The unsafe switches of tiers.faults for [lease] (chaos runs show what they cost).
        self._unsafe_answer_before_upstream = unsafe("answer_before_upstream")
        self._unsafe_resend_earlier_tenure = unsafe("resend_earlier_tenure")
        self._leftovers_answered = False
        """The store's leftovers were answered at their commit (written without ``[lease]``)."""

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

    # -- surviving a lost machine ([lease] enabled; tiers._forwarding) -------------------

    def _intent_prefix(self) -> str:
        """The keys of this site's or region's intents start with this (ends in ``.``)."""
        raise NotImplementedError

    def _upstream_subject(self) -> str:
        """Where this tier's partials go."""
        raise NotImplementedError

    def uplink_gate(self) -> UplinkGate | None:
        """The intents around each publish, with ``[lease] enabled``; none without."""
        if not self.config.lease.enabled:
            return None
        if self.forwarded is None:
            raise LocalProtocolError("[lease] enabled needs the forwarded bucket; none was given")
        self._forwarding = Forwarding(
            self,
            self.forwarded,
            prefix=self._intent_prefix(),
            republish_subject=self._upstream_subject(),
        )
        return self._forwarding

    def _recovered_jobs(self, recovery: Recovery) -> list[UplinkJob]:
        """The partials to resend at start (with ``[lease]``, chosen at takeover instead)."""
        if self._forwarding is not None:
            self._earlier_outbox = list(recovery.pending_outbox)
            return []
        return [UplinkJob(entry) for entry in recovery.pending_outbox]

    def _held(self, admission: Admission, *, empty_before: bool) -> Admission:
        """With ``[lease]``, ``admission`` acknowledged only once upstream holds its input.

        ``empty_before``: whether the open buffer was empty before this
        admission. A duplicate's original is in the open epoch or an earlier
        one; epochs go upstream in order, so waiting for the open one (when it
        holds anything) covers both.
        """
        forwarding = self._forwarding
        if forwarding is None or self._unsafe_answer_before_upstream:
            # UNSAFE answer_before_upstream: acknowledged at the commit, so what a
            # lost machine had folded and not forwarded is gone.
            return admission
        epoch = self.buffer.epoch
        if admission.outcome is Outcome.ACCEPTED:
            return forwarding.hold(admission, epoch)
        if admission.outcome is Outcome.DUPLICATE:
            return forwarding.hold(admission, epoch - 1 if empty_before else epoch)
        return admission

    def _closed_without_partial(self, epoch: int) -> None:
        if self._forwarding is not None:
            self._forwarding.closed_without_partial(epoch)

    @property
    def cuts_paused(self) -> bool:
        """With ``[lease]``, cuts wait for the lease: a standby's inputs are not its own."""
        lease = self.lease
        return self._forwarding is not None and (lease is None or not lease.is_held)

    async def _on_takeover(self) -> None:
        forwarding = self._forwarding
        if forwarding is None:
            await trio.lowlevel.checkpoint()
            return
        await self._forget_unforwarded(forwarding)
        await forwarding.republish()

    async def _forget_unforwarded(self, forwarding: Forwarding) -> None:
        """Forget what an earlier tenure folded or sealed and made known to no other instance.

        Between losing the lease and taking it again, another instance may
        have been given those inputs (never acknowledged: with ``[lease]`` an
        input is acknowledged once a partial holding it is upstream; a
        regional's come back from JetStream, an edge's devices resend) and
        counted them. Published now, either copy could reach upstream second
        and be quarantined whole (``leaf_counted_twice``) with the honest
        inputs folded beside it. So the open buffer and every pending partial
        whose intent is not there are forgotten, and their inputs are folded
        anew when they come back. A pending partial whose intent is there was
        known to every instance that took over since (it re-published it, or
        will): it is resent, and upstream dedupes a copy. One whose intent is a
        forwarded record went upstream by another instance: it is marked
        acknowledged, so its inputs stay known. Inputs re-admitted from the
        quarantine go back to it (``submit_forget_unforwarded``).
        """
        earlier, self._earlier_outbox = self._earlier_outbox, []
        if self._leftovers_answered or self._unsafe_resend_earlier_tenure:
            # Written before [lease] was enabled: those inputs were answered at their
            # commit, so they go upstream as they would have. UNSAFE
            # resend_earlier_tenure: what another instance may have counted
            # meanwhile goes upstream again (the rule before the forgetting).
            self.log.warning(
                "sending what the store holds from before this tenure (%s)",
                "answered at commit: written without [lease]"
                if self._leftovers_answered
                else "UNSAFE resend_earlier_tenure",
            )
            self._stash_cut("takeover")
            await self._send_stashed()
            for entry in earlier:
                await self.upstream.put(UplinkJob(entry))
            return
        retry = functools.partial(
            retry_transient, retry=self.config.retry, metrics=self.metrics, log=self.log
        )
        kept: list[OutboxEntry] = []
        upstream: list[OutboxEntry] = []
        forgotten: list[OutboxEntry] = []
        for entry in earlier:
            key = forwarding.key_of(entry.partial_id)
            state = await retry(
                f"read of intent {key}",
                "read_intents",
                functools.partial(forwarding.intents.state, key),
            )
            {"intent": kept, "forwarded": upstream, "none": forgotten}[state].append(entry)
        for entry in upstream:
            await self.store.submit_acked(entry.partial_id).wait()
            forwarding.closed_without_partial(entry.epoch)
            self.log.info(
                "partial %s of an earlier tenure went upstream by another instance's takeover",
                entry.partial_id.hex(),
            )
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
                "acknowledged and are folded anew when they come back",
                open_inputs,
                len(forgotten),
                ", ".join(entry.partial_id.hex() for entry in forgotten) or "none",
            )
        for entry in kept:
            await self.upstream.put(UplinkJob(entry))

    async def _before_settling(self, deadline: float) -> None:
        """With ``[lease]``: cut what was admitted, so its held inputs can be acknowledged."""
        if self._forwarding is None:
            await trio.lowlevel.checkpoint()
            return
        await self._cut_until_settled(deadline)

    @property
    def partial_codec(self) -> CodecSpec:
        """How this tier encodes the numerators of its partials."""
        raise NotImplementedError

    def _check_partials_fit(self, pointer: ModelAnnouncement) -> None:
        """Refuse to run when a partial of this model can be above the NATS server's max_payload.

        JetStream refuses such a publish on every retry: the partial, and every
        acknowledged update inside it, would wait in the outbox forever.
        """
        codec = self.partial_codec
        size = partial_envelope_bound(
            fleet=self.config.fleet,
            sender=self.key_id,
            tier=Tier(self.tier),
            layout=pointer.layout,
            num_params=pointer.num_params,
            codec=codec,
            limits=self.config.limits,
        )
        what = f"a partial of model v{pointer.version} ({pointer.num_params:,} values as {codec})"
        check_fits(
            what,
            size + MESSAGE_OVERHEAD,
            self.nats.max_message_bytes,
            broker="the largest partial this daemon may send (nats-server's max_payload, or "
            "[nats] max_parted_bytes above it)",
            fix=(
                "raise [nats] max_parted_bytes, or encode partials with fewer bytes per "
                'value ([partial] codec = "f16" or "i8")'
            ),
        )

    async def _start(self, nursery: trio.Nursery, recovery: Recovery) -> None:
        # Revocations first: nothing from a revoked key is admitted, even at start.
        self.revocations = RevocationFollower(
            self.keys,
            fleet=self.config.fleet,
            registry=self.registry,
            path=self.config.revocations,
            poll_s=self.config.revocation_poll_s,
            log=self.log,
        )
        await nursery.start(self.revocations.serve)
        if recovery.model_pointer is not None:
            await self._learn_central_key(recovery.model_pointer)
            try:
                _, pointer = open_model_pointer(
                    recovery.model_pointer, self.keys.models, self.config.fleet, self.config.limits
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
            gate=self.uplink_gate(),
        )
        # With [lease], leftovers are forgotten at takeover only if they were never
        # answered. A store written without [lease] answered them at their commit:
        # they are sent, and the store is marked as answering upstream only at a
        # start with nothing left over (a clean stop drains it), so a crash before
        # they are upstream never turns them into leftovers to forget.
        answers_upstream = self.store.answers_upstream()
        leftovers = bool(recovery.open_inputs or recovery.pending_outbox)
        if self.config.lease.enabled:
            self._leftovers_answered = leftovers and not answers_upstream
            if not answers_upstream and not leftovers:
                await self.store.submit_answers_upstream(True).wait()
        elif answers_upstream:
            await self.store.submit_answers_upstream(False).wait()
        await nursery.start(self._uplink.serve, self._recovered_jobs(recovery))
        forwarding = self._forwarding
        if forwarding is not None:
            pending = [entry.epoch for entry in recovery.pending_outbox]
            done = min(pending) - 1 if pending else recovery.open_epoch - 1
            forwarding.published_epoch = max(forwarding.published_epoch, done)
            nursery.start_soon(forwarding.serve_deletes)
        if recovery.open_inputs or recovery.pending_outbox:
            self.log.info(
                "recovered epoch %d with %d inputs and %d partials to resend",
                recovery.open_epoch,
                len(recovery.open_inputs),
                len(recovery.pending_outbox),
            )

    def _set_model(self, pointer: ModelAnnouncement, data: bytes) -> None:
        if self.model is None:  # the layout never changes afterwards (see _consider_pointer)
            self._check_partials_fit(pointer)
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
        async with trio.open_nursery() as retries:
            while True:
                try:
                    async with self.registry.watch_pointers() as pointers:
                        async for data in pointers:
                            backoff = self.config.retry.initial_backoff_s
                            if not await self._consider_pointer(data):
                                retries.start_soon(self._retry_pointer, data)
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

    async def _retry_pointer(self, data: bytes) -> None:
        """Try a version whose fetch failed again, with backoff, until it or a newer one holds.

        A newer pointer makes this one moot (``_consider_pointer`` skips what is
        not newer than the model it has), so the retries end by themselves.
        """
        backoff = self.config.retry.initial_backoff_s
        while True:
            await trio.sleep(backoff)
            if await self._consider_pointer(data):
                return
            backoff = min(backoff * 2, self.config.retry.max_backoff_s)

    async def _learn_central_key(self, data: bytes) -> None:
        """Fetch and verify the certificate of the central key that signed ``data``, if new.

        Only with a pinned fleet root: the central publishes each key's
        certificate in the registry before its first model, so a rotated central
        key is accepted without a config change. A missing or bad certificate
        leaves the key unknown and the pointer is refused as usual.
        """
        models = self.keys.models
        if models.root is None:
            return
        try:
            sender = parse_envelope(data, self.config.limits, kinds=(Kind.MODEL,)).sender
        except RemoteProtocolError:
            return  # refused with its reason by open_model_pointer
        if models.document(sender) is not None:
            return  # also fetched for a pinned key: the edge relays it to devices
        try:
            certificate = await self.registry.certificate(sender)
        except BusError as exc:
            self.log.warning("cannot fetch the certificate of central key %s: %s", sender, exc)
            return
        if certificate is None:
            return
        try:
            cert = models.add_certificate(certificate)
        except RemoteProtocolError as exc:
            self.log.warning("refused the certificate of central key %s: %s", sender, exc)
            return
        self.log.info(
            "central key %s certified by the fleet root as %r (serial %d)",
            cert.key_id,
            cert.name,
            cert.serial,
        )

    async def _consider_pointer(self, data: bytes) -> bool:
        """Take a pointer from the registry; False when its version should be tried again.

        A failure to fetch or relay a version (a blob that fails its digest, an
        object store error) skips that version, never stops the daemon.
        """
        await self._learn_central_key(data)
        try:
            _, pointer = open_model_pointer(
                data, self.keys.models, self.config.fleet, self.config.limits
            )
        except RemoteProtocolError as exc:
            self.log.warning("ignored a model pointer that does not verify: %s", exc)
            return True
        current = self.model
        if current is not None and pointer.version <= current.version:
            return True
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
            return True
        try:
            relayed = await self._relay_model(pointer, data)
        except ConfigError:
            raise  # a configuration that cannot carry this model: stop, say why
        except Exception as exc:
            # One bad version (a blob failing its digest, an object store error) must
            # not crash-loop every follower: skip it, retry it with backoff.
            self.metrics.retry("fetch_model")
            self.log.warning(
                "model v%d could not be fetched or relayed (%s); skipping it for now, will retry",
                pointer.version,
                exc,
                exc_info=not isinstance(exc, FedtierError),
            )
            return False
        if not relayed:
            return False
        if self.model is not None and pointer.version <= self.model.version:
            return True  # a retry and the watch raced; the newer one stands
        self._set_model(pointer, data)
        if self._store is not None:
            # Not awaited: after a crash the registry tells us again.
            self.store.submit_model_pointer(pointer.version, data)
        self.log.info("now at model v%d", pointer.version)
        # A quarantined input may fit the new model (its layout, its version).
        self.readmit_quarantined()
        return True
