"""Admission of one input, sans-IO: bytes + what the tier knows -> accepted / duplicate / rejected.

Imports ``fedtier.protocol`` and the tier math only: no trio, sqlite, OpenTelemetry,
logging or clock. Time and state come in as arguments, so the daemons (which
wrap a decision with the store, acknowledgements, receipts and spans) and the
simulator run exactly this code on the same signed bytes.

The checks run cheapest first, and each rejection has exactly one reason:

    update:  parse (malformed / too_large / unsupported_version) -> a device update
             -> topic matches the sender -> unknown_sender -> bad_signature /
             digest_mismatch -> wrong_fleet -> layout_mismatch -> duplicate
             -> replay (a seq another update id already took) -> future_base (a base
             version above the tier's) -> stale (tau above max_staleness) ->
             rate_limited (the device's token bucket; with retry_after_ms) ->
             contribution_capped (its share of the tier's current version) ->
             non_finite / norm_exceeded (reject policy; the clip policy scales the
             update down and says so) -> accepted, its weight capped at max_samples
             (``fedtier.tiers.core._influence`` says why each bound exists)
    partial: parse -> a partial from an accepted tier -> unknown_sender ->
             bad_signature -> wrong_fleet -> layout_mismatch -> its id derives
             from its sender and inputs -> duplicate -> never stale (its updates
             were acknowledged below: it is folded with the discount s(tau) and
             marked late) -> non_finite

Replays are "a seq reused by another update id", not "a seq at or below the
high-water mark": a device resends an unanswered update after newer ones were
accepted, and the strict rule would lose it. Only below the floor of what the
retention prune deleted does the ledger count every seq as used (its inputs'
ids are forgotten there), which ``SeenInputs.seq_used_elsewhere`` answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from fedtier.protocol.codecs import CodecSpec, DecodedPayload, parse_payload
from fedtier.protocol.envelope import Envelope, parse_envelope
from fedtier.protocol.errors import (
    DecodeError,
    InconsistentPartial,
    LayoutMismatch,
    LocalProtocolError,
    Reason,
    RemoteProtocolError,
    UnknownSender,
    UpdateRejected,
)
from fedtier.protocol.identity import VerifyKey
from fedtier.protocol.limits import Limits
from fedtier.protocol.messages import DeviceUpdate, Kind, PartialAggregate, Tier
from fedtier.tiers.aggregate import partial_id
from fedtier.tiers.core._influence import InfluenceRules, InfluenceState, capped_weight
from fedtier.tiers.staleness import StalenessPolicy
from fedtier.tiers.validation import NormPolicy, ValidationResult, check_update_vector

__all__ = [
    "AcceptedInput",
    "AdmissionRules",
    "Decision",
    "ModelView",
    "NothingSeen",
    "Outcome",
    "SeenInputs",
    "SenderKeys",
    "admit_partial",
    "admit_update",
    "check_payload",
]


class Outcome(StrEnum):
    """What a tier decided about one input; metric labels."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class SenderKeys(Protocol):
    """The keys of the senders a tier accepts (``fedtier.tiers.registry.KeyRegistry`` is one)."""

    def get(self, key_id: str, /) -> VerifyKey | None:
        """The sender's key, None when it is not registered."""

    def describe(self, key_id: str, /) -> str:
        """A name for logs: the registered name and the key id."""


class SeenInputs(Protocol):
    """What the tier has accepted before: its dedupe index and its seq ledger."""

    def is_known(self, sender: str, input_id: bytes, /) -> bool:
        """Whether ``(sender, input_id)`` was accepted before (a resend is a duplicate)."""

    def seq_used_elsewhere(self, sender: str, seq: int, input_id: bytes, /) -> bool:
        """Whether another input of ``sender`` already took ``seq`` (a replay).

        A ledger that forgets inputs answers True for every seq it forgot too.
        """

    def counted_leaves(self, leaves: Sequence[bytes], /) -> Sequence[bytes]:
        """The device update ids among ``leaves`` that an accepted input already carried."""


class NothingSeen:
    """A ledger that has seen nothing: for callers whose senders send each input once."""

    def is_known(self, sender: str, input_id: bytes, /) -> bool:
        """Never."""
        return False

    def seq_used_elsewhere(self, sender: str, seq: int, input_id: bytes, /) -> bool:
        """Never."""
        return False

    def counted_leaves(self, leaves: Sequence[bytes], /) -> Sequence[bytes]:
        """None of them."""
        return ()


@dataclass(frozen=True, slots=True)
class ModelView:
    """The model version a tier knows, from a verified pointer.

    Attributes:
        version: the model version.
        layout: its layout fingerprint.
        num_params: its number of parameters.
        pointer: the signed pointer envelope bytes (empty where none is kept).
    """

    version: int
    layout: bytes
    num_params: int
    pointer: bytes = b""

    def check_layout(self, layout: bytes, num_params: int, what: str) -> None:
        """Raise ``LayoutMismatch`` unless ``layout``/``num_params`` are this model's."""
        if layout != self.layout or num_params != self.num_params:
            raise LayoutMismatch(
                f"{what} is for layout {layout.hex()} with {num_params} values; model "
                f"v{self.version} is {self.layout.hex()} with {self.num_params}"
            )


@dataclass(frozen=True, slots=True)
class AdmissionRules:
    """What a tier checks inputs against, besides its keys, model and ledger.

    Attributes:
        fleet: the fleet token inputs must carry.
        limits: the decoding caps.
        staleness: the staleness policy (rejection of stale updates, discount).
        max_norm: L2 bound on device updates, None for none.
        norm_policy: ``"clip"`` or ``"reject"`` above ``max_norm``.
        accepts: which tiers' partials are taken (regional: edges; central: both).
        reject_late_partials: the unsafe switch of that name (``tiers.faults``):
            refuse a partial past ``max_staleness``, losing acknowledged updates.
        influence: the bounds on one device's influence (device updates only); the
            stateful ones (adaptive norm, contribution cap, rate limit) need an
            ``InfluenceState`` passed to ``admit_update``.
        max_samples_per_update: the fleet's cap on one device update's weight, as
            the edges apply it; a child partial whose ``sample_count`` exceeds
            ``update_count`` times it claims more weight than its updates can
            carry, and is refused (``inconsistent_partial``). None: unchecked.
    """

    fleet: str
    limits: Limits
    staleness: StalenessPolicy
    max_norm: float | None = None
    norm_policy: NormPolicy = "clip"
    accepts: tuple[Tier, ...] = (Tier.EDGE,)
    reject_late_partials: bool = False
    influence: InfluenceRules = field(default_factory=InfluenceRules)
    max_samples_per_update: int | None = None


@dataclass(frozen=True, slots=True)
class AcceptedInput:
    """An input that passed every check, with the weights to fold it with.

    Attributes:
        message: the verified message (a device update or a partial).
        payload: its encoded vector (a view into the delivered bytes).
        sender: the sender's key id.
        input_id: the update id or partial id.
        seq: the sender's sequence number.
        base_version: the update's base version (a partial's oldest).
        n_samples: the weight it is folded with: an update's ``n_samples`` capped at
            ``max_samples`` (stored as such, so a refold folds the same), a partial's
            sample count.
        update_count: device updates inside (1 for an update).
        tau: staleness at this tier.
        discount: ``s(tau)``.
        clip_scale: the factor the vector is folded with (below 1 when clipped).
        norm: the L2 norm as received (NaN when not computed).
        late: a partial past ``max_staleness``, folded anyway.
        weight_capped: the update's ``n_samples`` was above ``max_samples``.
        decoded: the payload as admission validated and decoded it, so the fold
            neither parses nor dequantizes it again (None: the fold decodes
            ``payload`` itself).
    """

    message: DeviceUpdate | PartialAggregate
    payload: memoryview | bytes
    sender: str
    input_id: bytes
    seq: int
    base_version: int
    n_samples: float
    update_count: int
    tau: int
    discount: float
    clip_scale: float = 1.0
    norm: float = math.nan
    late: bool = False
    weight_capped: bool = False
    decoded: DecodedPayload | None = None

    @property
    def clipped(self) -> bool:
        """Whether the vector is scaled down to the norm bound."""
        return self.clip_scale < 1.0


@dataclass(frozen=True, slots=True)
class Decision:
    """The decision about one input.

    Attributes:
        outcome: accepted, duplicate or rejected.
        reason: the rejection reason (None unless rejected).
        error: the rejection, whose message names what was wrong (for the log).
        sender: the sender the input claims (None when it did not parse).
        input_id: the update or partial id it claims (None when it did not parse).
        seq: the sequence number it claims (0 when it did not parse).
        tau: staleness at this tier, once assessed (None before).
        accepted: what to fold, when accepted.
        retry_after_ms: for ``rate_limited``, when the device may resend (else 0).
    """

    outcome: Outcome
    reason: Reason | None = None
    error: RemoteProtocolError | None = None
    sender: str | None = None
    input_id: bytes | None = None
    seq: int = 0
    tau: int | None = None
    accepted: AcceptedInput | None = None
    retry_after_ms: int = 0


def check_payload(
    payload: memoryview | bytes,
    codec: CodecSpec,
    num_params: int,
    *,
    max_norm: float | None,
    norm_policy: NormPolicy,
) -> ValidationResult:
    """Check an encoded vector completely before it is folded: layout, finiteness, norm.

    Dense f32/f16 payloads are checked in place (zero-copy views); i8 payloads are
    scanned without a float32 decode unless a norm bound needs one, and a top-k
    payload's norm is taken over its ``k`` values (the others are zero).

    Raises:
        DecodeError: the payload breaks its codec (``malformed``).
        UpdateRejected: ``non_finite``, or ``norm_exceeded`` under the reject policy.
    """
    result, _ = _checked_payload(
        payload, codec, num_params, max_norm=max_norm, norm_policy=norm_policy
    )
    return result


def _checked_payload(
    payload: memoryview | bytes,
    codec: CodecSpec,
    num_params: int,
    *,
    max_norm: float | None,
    norm_policy: NormPolicy,
) -> tuple[ValidationResult, DecodedPayload]:
    """``check_payload``, also returning the decoded payload for the fold (decoded once)."""
    dense_float = codec.k is None and codec.values in ("f32", "f16")
    if dense_float:
        expected = codec.expected_payload_size(num_params)
        if len(payload) != expected:
            raise DecodeError(f"{codec} payload has {len(payload)} bytes; expected {expected}")
    decoded = parse_payload(payload, codec, num_params)
    if max_norm is None and not dense_float:
        # Finiteness alone needs no float32 decode of an i8 payload (its scales tell).
        if not decoded.all_finite():
            raise UpdateRejected(
                f"{codec} payload decodes to a NaN or infinite value", reason=Reason.NON_FINITE
            )
        return ValidationResult(norm=math.nan), decoded
    result = check_update_vector(decoded.norm_values(), max_norm=max_norm, norm_policy=norm_policy)
    return result, decoded


class _Claim:
    """What an input claims about itself, filled in as parsing gets further."""

    __slots__ = ("input_id", "sender", "seq", "tau")

    def __init__(self) -> None:
        self.sender: str | None = None
        self.input_id: bytes | None = None
        self.seq = 0
        self.tau: int | None = None

    def rejected(self, exc: RemoteProtocolError, retry_after_ms: int = 0) -> Decision:
        return Decision(
            Outcome.REJECTED,
            reason=exc.reason,
            error=exc,
            sender=self.sender,
            input_id=self.input_id,
            seq=self.seq,
            tau=self.tau,
            retry_after_ms=retry_after_ms,
        )

    def duplicate(self) -> Decision:
        return Decision(
            Outcome.DUPLICATE,
            sender=self.sender,
            input_id=self.input_id,
            seq=self.seq,
            tau=self.tau,
        )


def _accepted(accepted: AcceptedInput) -> Decision:
    return Decision(
        Outcome.ACCEPTED,
        sender=accepted.sender,
        input_id=accepted.input_id,
        seq=accepted.seq,
        tau=accepted.tau,
        accepted=accepted,
    )


def _verified(envelope: Envelope, sender: str, senders: SenderKeys, what: str) -> str:
    key = senders.get(sender)
    if key is None:
        raise UnknownSender(f"{what} from unregistered sender {sender}")
    envelope.verify(key)
    return senders.describe(sender)


def admit_update(
    data: bytes | bytearray | memoryview,
    *,
    rules: AdmissionRules,
    senders: SenderKeys,
    model: ModelView,
    seen: SeenInputs,
    topic_device: str | None = None,
    influence: InfluenceState | None = None,
    now: float = 0.0,
) -> Decision:
    """Decide about one device update; never raises for bad input.

    With ``influence``, an accepted update is booked there (its share of the
    version, its norm), so the caller must fold every accepted decision.

    Args:
        data: the envelope bytes as delivered.
        rules: fleet, limits, staleness and norm policies.
        senders: the registered device keys.
        model: the model version the tier knows (staleness, layout).
        seen: the tier's dedupe index and seq ledger.
        topic_device: the device whose topic it arrived on, when known: an update
            naming another sender is malformed. The decision's ``sender`` is then
            this device whatever the bytes claim (the broker's ACL lets only it
            publish there), so a receipt for bytes that fail authentication goes
            to the device that sent them (docs/protocol.md, section 4.2).
        influence: the state of the per-device bounds (adaptive norm, contribution
            cap, rate limit); None applies only the stateless ones of ``rules``.
        now: seconds on the caller's monotonic clock (the rate limit).
    """
    bounds = rules.influence
    claim = _Claim()
    claim.sender = topic_device
    try:
        # kinds: an update's structure caps, so no hostile header costs the loop.
        envelope = parse_envelope(data, rules.limits, kinds=(Kind.UPDATE,))
        message = envelope.message
        if not isinstance(message, DeviceUpdate):
            raise DecodeError(f"a {message.KIND.value} message arrived as a device update")
        # Echoed in the receipt even when authentication fails below, so the
        # device can match it; the addressee stays the topic's device.
        claim.input_id, claim.seq = message.update_id, message.seq
        if topic_device is None:
            claim.sender = message.sender
        uid = message.update_id.hex()
        if topic_device is not None and message.sender != topic_device:
            raise DecodeError(
                f"update {uid} names device {message.sender} but arrived on the topic of "
                f"device {topic_device}"
            )
        who = _verified(envelope, message.sender, senders, f"update {uid}")
        if message.fleet != rules.fleet:
            raise UpdateRejected(
                f"update {uid} from {who} is for fleet {message.fleet!r}; this tier serves "
                f"{rules.fleet!r}",
                reason=Reason.WRONG_FLEET,
            )
        model.check_layout(message.layout, message.num_params, f"update {uid} from {who}")
        if seen.is_known(message.sender, message.update_id):
            return claim.duplicate()
        if seen.seq_used_elsewhere(message.sender, message.seq, message.update_id):
            raise UpdateRejected(
                f"update {uid} from {who} reuses seq {message.seq}, already taken by another "
                "update from the same device",
                reason=Reason.REPLAY,
            )
        if bounds.reject_future_base and message.base_version > model.version:
            raise UpdateRejected(
                f"update {uid} from {who} was trained from model v{message.base_version}; "
                f"this tier knows only v{model.version}",
                reason=Reason.FUTURE_BASE,
            )
        assessment = rules.staleness.assess(model.version, message.base_version)
        claim.tau = assessment.tau
        if not assessment.accepted:
            raise UpdateRejected(
                f"update {uid} from {who} was trained from model v{message.base_version}; "
                f"this tier knows v{model.version} and accepts at most "
                f"{rules.staleness.max_staleness} versions of staleness",
                reason=Reason.STALE,
            )
        if influence is not None and influence.buckets is not None:
            wait_s = influence.buckets.take(message.sender, now)
            if wait_s > 0.0:
                retry_after_ms = max(1, math.ceil(wait_s * 1000.0))
                return claim.rejected(
                    UpdateRejected(
                        f"update {uid} from {who} is over the device's rate limit of "
                        f"{influence.buckets.rate:g}/s; retry after {retry_after_ms} ms",
                        reason=Reason.RATE_LIMITED,
                    ),
                    retry_after_ms,
                )
        if (
            influence is not None
            and influence.contributions is not None
            and influence.contributions.full(message.sender, model.version)
        ):
            raise UpdateRejected(
                f"update {uid} from {who}: the device already gave "
                f"{influence.contributions.limit} updates while this tier knows "
                f"v{model.version}; resend after the next version",
                reason=Reason.CONTRIBUTION_CAPPED,
            )
        max_norm = rules.max_norm if influence is None else influence.norm_bound()
        result, decoded = _checked_payload(
            envelope.payload,
            message.codec,
            message.num_params,
            max_norm=max_norm,
            norm_policy=rules.norm_policy,
        )
    except RemoteProtocolError as exc:
        return claim.rejected(exc)
    weight = capped_weight(message.n_samples, bounds.max_samples)
    if influence is not None:
        influence.accepted(message.sender, model.version, result.norm)
    return _accepted(
        AcceptedInput(
            message=message,
            payload=envelope.payload,
            sender=message.sender,
            input_id=message.update_id,
            seq=message.seq,
            base_version=message.base_version,
            n_samples=float(weight),
            update_count=1,
            tau=assessment.tau,
            discount=assessment.discount,
            clip_scale=result.scale,
            norm=result.norm,
            weight_capped=weight < message.n_samples,
            decoded=decoded,
        ),
    )


def _derived_id(message: PartialAggregate, inputs: Sequence[bytes], who: str) -> None:
    try:
        derived = partial_id(message.sender, inputs) if inputs else None
    except LocalProtocolError as exc:
        # Repeated or malformed input ids: the sender's fault, not ours.
        raise DecodeError(f"partial {message.partial_id.hex()} from {who}: {exc}") from exc
    if derived != message.partial_id:
        raise DecodeError(
            f"partial {message.partial_id.hex()} from {who} has an id that does not derive "
            "from its sender and inputs"
        )


def admit_partial(
    data: bytes | bytearray | memoryview,
    *,
    rules: AdmissionRules,
    senders: SenderKeys,
    model: ModelView,
    seen: SeenInputs,
    tier: str = "tier",
) -> Decision:
    """Decide about one child partial (regional, central); never raises for bad input.

    A partial is never refused for lateness: the device updates inside were
    acknowledged below, so one made more than ``max_staleness`` versions ago is
    folded with the discount ``s(tau)`` (never 0) and marked ``late``.

    Args:
        data: the envelope bytes as delivered.
        rules: fleet, limits, staleness policy and the tiers whose partials are taken.
        senders: the registered keys of the child tiers.
        model: the model version the tier knows.
        seen: the tier's dedupe index.
        tier: this tier's name, for messages.
    """
    claim = _Claim()
    try:
        envelope = parse_envelope(data, rules.limits, kinds=(Kind.PARTIAL,))
        message = envelope.message
        if not isinstance(message, PartialAggregate):
            raise DecodeError(f"expected a partial, got a {message.KIND.value} message")
        claim.sender, claim.input_id, claim.seq = message.sender, message.partial_id, message.seq
        pid = message.partial_id.hex()
        who = _verified(envelope, message.sender, senders, f"partial {pid}")
        if message.fleet != rules.fleet:
            raise UpdateRejected(
                f"partial {pid} from {who} is for fleet {message.fleet!r}",
                reason=Reason.WRONG_FLEET,
            )
        if message.tier not in rules.accepts:
            raise DecodeError(
                f"partial {pid} from {who} comes from tier {message.tier.value}; this {tier} "
                f"takes {[t.value for t in rules.accepts]}"
            )
        model.check_layout(message.layout, message.num_params, f"partial from {who}")
        _derived_id(message, message.inputs, who)
        if seen.is_known(message.sender, message.partial_id):
            return claim.duplicate()
        if len(set(message.leaves)) != len(message.leaves):
            raise InconsistentPartial(
                f"partial {pid} from {who} lists one device update twice among its leaves"
            )
        cap = rules.max_samples_per_update
        if cap is not None and not message.sample_count <= message.update_count * cap:
            # A registered child tier that lies about weight would otherwise own
            # the version, as a device did before the edges capped n_samples.
            raise InconsistentPartial(
                f"partial {pid} from {who} claims sample_count {message.sample_count:g} for "
                f"{message.update_count} device update(s); the fleet caps one update's weight "
                f"at {cap}"
            )
        counted = seen.counted_leaves(message.leaves)
        if counted:
            # Folding it would count those updates twice, and a sum cannot be
            # taken apart: refuse the whole partial (the daemon quarantines it).
            raise UpdateRejected(
                f"partial {pid} from {who} carries {len(set(counted))} device update(s) "
                f"already counted through another input, e.g. {counted[0].hex()}",
                reason=Reason.LEAF_COUNTED_TWICE,
            )
        assessment = rules.staleness.assess_acknowledged(model.version, message.known_version)
        claim.tau = assessment.tau
        if assessment.late and rules.reject_late_partials:
            raise UpdateRejected(
                f"UNSAFE reject_late_partials: partial {pid} from {who} was made at model "
                f"v{message.known_version}; this {tier} knows v{model.version}",
                reason=Reason.STALE,
            )
        _, decoded = _checked_payload(
            envelope.payload, message.codec, message.num_params, max_norm=None, norm_policy="clip"
        )
    except RemoteProtocolError as exc:
        return claim.rejected(exc)
    return _accepted(
        AcceptedInput(
            message=message,
            payload=envelope.payload,
            sender=message.sender,
            input_id=message.partial_id,
            seq=message.seq,
            base_version=message.min_base_version,
            n_samples=message.sample_count,
            update_count=message.update_count,
            tau=assessment.tau,
            discount=assessment.discount,
            late=assessment.late,
            decoded=decoded,
        ),
    )
