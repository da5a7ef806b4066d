"""A leased edge's or regional's held inputs and intents: surviving the loss of its machine.

Imports protocol, trio and tiers; never client or simulations, never a
concrete bus adapter (the daemon shell hands it the ``forwarded`` KV bucket).

With ``[lease] enabled`` an edge (two or more per site) or a regional (two
or more per region) acknowledges an input (a device update's PUBACK and
receipt, an edge partial's JetStream ack) only once a partial holding it is
durable upstream, and before publishing a partial it writes the sealed
envelope as an **intent** to the ``forwarded`` bucket (key ``<prefix><partial
id>``; the prefix is ``<region>.`` for a regional, ``edge.<region>.<site>.``
for an edge). A standby that takes the lease re-publishes every intent of its
prefix that another instance left (same bytes, same ``msg_id``: upstream
dedupes a copy that arrived already), rewrites it as a small **forwarded
record** once upstream has it, and treats a redelivery or a device's resend of
an input such a partial holds as a duplicate, never folded again
(docs/architecture.md, "More than one instance").
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Final

import trio

from fedtier.protocol.bus import Delivery, PublishAck
from fedtier.protocol.envelope import parse_envelope
from fedtier.protocol.errors import BusError, FedtierError, RemoteProtocolError
from fedtier.protocol.messages import PartialAggregate
from fedtier.tiers._intake import Admission
from fedtier.tiers._intents import (
    FORWARDED_MAGIC,
    IntentKv,
    PartedIntents,
    decode_forwarded,
    encode_forwarded,
)
from fedtier.tiers._lease import EpochWatermark, HeldTicket
from fedtier.tiers._upstream import UplinkGate, retry_transient
from fedtier.tiers.core import Outcome
from fedtier.tiers.store import CommitTicket, OutboxEntry

if TYPE_CHECKING:
    from fedtier.tiers._follower import FollowerDaemon

__all__ = [
    "FOREIGN_GRACE_ACK_WAITS",
    "FORWARDED_MAX_AGE_S",
    "ForwardedKv",
    "Forwarding",
    "partial_of",
]

ForwardedKv = IntentKv
"""The ``forwarded`` bucket's operations (``protocol.bus.nats.KvBucket`` has them)."""

FORWARDED_MAX_AGE_S: Final = 7 * 86_400.0
"""How long an intent or forwarded record outlives its last write.

An intent is deleted by its own instance once its partial is upstream, the
deliveries it holds are acknowledged and that is committed; one another
instance re-published becomes a forwarded record and stays until this age:
while it is there, an instance that sealed the partial and takes the lease
again knows its partial went upstream (its inputs stay known as done), and
every instance that takes the lease knows its inputs (a late resend is a
duplicate). A forwarded record is a few bytes per input.
"""

FOREIGN_GRACE_ACK_WAITS: Final = 3
"""Ack waits (plus one lease TTL) after a takeover's re-publish of a regional's intent.

The lost instance's unacknowledged deliveries come back one ack wait after
its last in-progress ack, which was before it lost the lease: by then every
input of the intent that will come back has. Past it the instance logs how
many never did (acknowledged before the loss). The record stays (see
``FORWARDED_MAX_AGE_S``), and so does what the process noted.
"""


def partial_of(payload: bytes, daemon: FollowerDaemon) -> PartialAggregate | None:
    """The partial in ``payload``, or None when it does not parse as one."""
    try:
        message = parse_envelope(payload, daemon.config.limits).message
    except FedtierError:
        return None
    return message if isinstance(message, PartialAggregate) else None


class Forwarding(EpochWatermark, UplinkGate):
    """A leased edge's or regional's state for surviving a lost machine: holds and intents.

    Its watermark (``EpochWatermark``) advances with each partial PubAcked by
    the stream upstream.

    Args:
        daemon: the edge or regional.
        kv: the ``forwarded`` bucket.
        prefix: this site's or region's key prefix, ending in ``.``.
        republish_subject: where a taken-over intent's partial goes (upstream).
    """

    def __init__(
        self, daemon: FollowerDaemon, kv: ForwardedKv, *, prefix: str, republish_subject: str
    ) -> None:
        super().__init__()
        self.daemon = daemon
        # An intent above the server's max_payload goes as parts (tiers._intents).
        self.intents = PartedIntents(kv, lambda: daemon.nats.max_single_message_bytes)
        self.prefix = prefix
        self.republish_subject = republish_subject
        self.foreign: dict[bytes, str] = {}
        """Input id -> key of the intent of another instance whose partial holds it."""
        self._foreign_left: dict[str, set[bytes]] = {}
        self._foreign_until: dict[str, float] = {}
        self._waiting: dict[int, int] = {}
        self._own: dict[int, tuple[OutboxEntry, CommitTicket | None]] = {}
        self._unconfirmed: set[int] = set()
        """Epochs with an input whose acknowledgement the bus did not confirm."""
        self._send_delete, self._receive_delete = trio.open_memory_channel[
            tuple[OutboxEntry, CommitTicket | None, bool]
        ](1024)
        self.republished = 0
        """Partials of other instances re-published at takeover since start."""

    def key_of(self, partial_id: bytes) -> str:
        """The intent's key: the prefix, then the partial id (a user may write only its own)."""
        return f"{self.prefix}{partial_id.hex()}"

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

    def published(self, entry: OutboxEntry, acked: CommitTicket | None = None) -> None:
        """The partial of ``entry.epoch`` is durable upstream: release the deliveries it holds.

        Args:
            entry: the partial.
            acked: the commit that marks it acknowledged in the store; its
                intent is deleted only after that commit, so that a restart
                never finds the partial pending with its intent gone.
        """
        self._own[entry.epoch] = (entry, acked)
        self.advance(entry.epoch)
        self._maybe_forget(entry.epoch)

    # -- deliveries -------------------------------------------------------------------

    def hold(self, admission: Admission, epoch: int) -> Admission:
        """The same admission, acknowledged only once ``epoch`` is durable upstream.

        What the admission does after its acknowledgement (an edge's receipt)
        runs after that, too.
        """
        self._waiting[epoch] = self._waiting.get(epoch, 0) + 1
        then = admission.after_ack
        delivery = admission.delivery
        confirmed = False

        async def ack() -> None:
            nonlocal confirmed
            await delivery.ack()
            confirmed = True

        async def acked() -> None:
            if not confirmed:
                # The bus may redeliver it, maybe to another instance after a
                # takeover: the intent must then tell it the input is upstream.
                self._unconfirmed.add(epoch)
            self._waiting[epoch] -= 1
            self._maybe_forget(epoch)
            if then is not None:
                await then()
            else:
                await trio.lowlevel.checkpoint()

        return Admission(
            dataclasses.replace(delivery, _ack=ack),
            admission.outcome,
            admission.reason,
            ticket=HeldTicket(admission.ticket, self, epoch),
            after_ack=acked,
            ack=admission.ack,
        )

    def _maybe_forget(self, epoch: int) -> None:
        """Delete an own intent once its partial is upstream and its deliveries acknowledged.

        If the bus did not confirm an acknowledgement, the intent is rewritten
        as a forwarded record instead: a redelivery that reaches another
        instance after a takeover is then known there as upstream already.
        """
        if (
            self._waiting.get(epoch, 0) == 0
            and epoch <= self.published_epoch
            and epoch in self._own
        ):
            self._waiting.pop(epoch, None)
            entry, acked = self._own.pop(epoch)
            unconfirmed = epoch in self._unconfirmed
            self._unconfirmed.discard(epoch)
            # When the queue is full it is left to the bucket's max_age.
            with contextlib.suppress(trio.WouldBlock):
                self._send_delete.send_nowait((entry, acked, unconfirmed))

    def forwarded(self, admission: Admission, input_id: bytes) -> Admission:
        """An input that another instance's re-published partial holds: a duplicate.

        ``admission`` is what the daemon answers for a duplicate (the edge's
        receipt, or none); its acknowledgement is not held: upstream has it.
        """
        key = self.foreign[input_id]
        then = admission.after_ack

        async def acked() -> None:
            left = self._foreign_left.get(key)
            if left is not None:
                left.discard(input_id)
                if not left:
                    del self._foreign_left[key]
                    self._foreign_until.pop(key, None)
            if then is not None:
                await then()
            else:
                await trio.lowlevel.checkpoint()

        return Admission(admission.delivery, Outcome.DUPLICATE, after_ack=acked, ack=admission.ack)

    def forwarded_delivery(self, delivery: Delivery, input_id: bytes) -> Admission:
        """As :meth:`forwarded` for a delivery answered by its acknowledgement alone."""
        return self.forwarded(Admission(delivery, Outcome.DUPLICATE), input_id)

    # -- takeover ---------------------------------------------------------------------

    async def republish(self) -> None:
        """Re-publish the intents other instances of this prefix left; note the inputs inside."""
        daemon = self.daemon
        retry = functools.partial(
            retry_transient, retry=daemon.config.retry, metrics=daemon.metrics, log=daemon.log
        )
        keys = await retry("list of intents", "read_intents", self.intents.keys)
        subject = self.republish_subject
        for key in sorted(k for k in keys if k.startswith(self.prefix)):
            try:
                envelope = await retry(
                    f"read of intent {key}",
                    "read_intents",
                    functools.partial(self.intents.get, key),
                )
            except RemoteProtocolError as exc:
                # Its inputs come back to this instance and are folded anew; if the
                # lost one's partial did reach upstream, the leaf index there
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
                self._note_foreign(key, inputs, grace=False)
                daemon.log.info(
                    "intent %s: its partial is upstream already (an earlier takeover "
                    "re-published it); %d inputs noted",
                    key,
                    len(inputs),
                )
                continue
            partial = partial_of(envelope, daemon)
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
            self._note_foreign(key, partial.inputs, grace=True)
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

    def _note_foreign(
        self, key: str, inputs: list[bytes] | tuple[bytes, ...], *, grace: bool
    ) -> None:
        """Recognise a redelivery of ``inputs`` as forwarded; ``grace``: report the rest later."""
        if grace:
            self._foreign_left[key] = set(inputs)
            self._foreign_until[key] = trio.current_time() + self._foreign_grace_s()
        for input_id in inputs:
            self.foreign[input_id] = key

    def _foreign_grace_s(self) -> float:
        config = self.daemon.config
        return FOREIGN_GRACE_ACK_WAITS * config.nats.ack_wait_s + config.lease.ttl_s

    async def serve_deletes(self) -> None:
        """Delete own intents no longer needed, retrying while the bus is away.

        An intent is deleted only once the store committed its partial as
        acknowledged. A delete that cannot reach the bus is retried with
        backoff (an intent left behind is re-published at every later
        takeover); another error leaves it to the bucket's max_age.
        """
        daemon = self.daemon
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_foreign_reports)
            async for entry, acked, unconfirmed in self._receive_delete:
                key = self.key_of(entry.partial_id)
                partial = partial_of(entry.envelope, daemon) if unconfirmed else None
                try:
                    if acked is not None:
                        await acked.wait()
                    if partial is not None:
                        record = encode_forwarded(partial.partial_id, partial.inputs)
                        await retry_transient(
                            f"forwarded record of intent {key}",
                            "put_intent",
                            functools.partial(self.intents.replace, key, record),
                            retry=daemon.config.retry,
                            metrics=daemon.metrics,
                            log=daemon.log,
                        )
                        daemon.log.warning(
                            "intent %s kept as a forwarded record: an acknowledgement of its "
                            "inputs was not confirmed by the bus",
                            key,
                        )
                        continue
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

    async def _serve_foreign_reports(self) -> None:
        """Say how many inputs of each taken-over intent never came back, once its grace is over."""
        while True:
            await trio.sleep(max(0.05, self._foreign_grace_s() / 4))
            now = trio.current_time()
            for key in [k for k, until in self._foreign_until.items() if until <= now]:
                del self._foreign_until[key]
                left = self._foreign_left.pop(key, set())
                self.daemon.log.info(
                    "intent %s taken over: %d of its inputs did not come back within %.0f s "
                    "(acknowledged before the takeover); its forwarded record ages out",
                    key,
                    len(left),
                    self._foreign_grace_s(),
                )
