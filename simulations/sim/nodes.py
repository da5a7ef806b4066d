"""The simulator's tiers: the daemons' fold, cut and server step; no bus, store or event loop.

Imports protocol and tiers, never a bus or a state store, and runs nothing on
trio (``tiers.tier``, for ``check_payload``, brings it along); the engine owns
time and passes it in as ``now``. Each node runs, on the same signed bytes, the
functions its daemon runs (``tiers.edge``, ``tiers.tier``, ``tiers.central``):

    update in:   parse_envelope -> layout -> StalenessPolicy.assess -> check_payload
                 -> PartialAggregate.fold_update(fold_into folder)
    partial in:  parse_envelope -> layout -> StalenessPolicy.assess_acknowledged -> check_payload
                 -> PartialAggregate.fold_partial(fold_into folder, extra_tau, discount)
    cut:         FlushPolicy.should_flush -> tiers.testing.sign_partial (encode the
                 numerator with the partial codec, derive the partial id, seal)
    version:     ServerOptimizer.step(params, aggregate.result())

What the simulator leaves out is what cannot change an aggregate: signature
checks (it signs, and trusts itself), the state store and acknowledgements,
duplicates and replays (its devices send each update once), and telemetry.
``tests/unit/test_sim_matches_daemons.py`` feeds the same updates
through these nodes and through the real daemons on in-memory buses and checks
that the model versions are equal bit for bit.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import numpy.typing as npt

from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.envelope import parse_envelope
from fedtier.protocol.errors import LocalProtocolError, RemoteProtocolError
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.limits import DEFAULT_LIMITS
from fedtier.protocol.messages import DeviceUpdate, PartialAggregate, Tier
from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.flush import FlushPolicy, FlushReason
from fedtier.tiers.folding import fold_partial_message, fold_update_message
from fedtier.tiers.optimizers import ServerOptimizer
from fedtier.tiers.staleness import StalenessPolicy
from fedtier.tiers.testing import sign_partial
from fedtier.tiers.tier import HIST_BUCKETS, check_payload
from fedtier.tiers.validation import NormPolicy

__all__ = ["CentralNode", "Outcome", "TierNode", "identity_for"]

Outcome = str
"""``"accepted"`` or a rejection reason token (``"stale"``, ``"non_finite"``...)."""


def identity_for(name: str, seed: int) -> SigningIdentity:
    """A reproducible Ed25519 identity for a simulated device or tier."""
    digest = hashlib.blake2b(f"fedtier-sim/{seed}/{name}".encode(), digest_size=32).digest()
    return SigningIdentity.from_seed(digest)


class TierNode:
    """One aggregation tier (an edge or a regional, or the central's buffer).

    Args:
        name: the node's name; its identity (and so its partial ids) derive from it.
        tier: which tier its partials come from (edge or regional).
        fleet: the fleet token signed messages carry.
        layout: the model layout.
        flush: its flush policy.
        staleness: its staleness policy.
        partial_codec: how its partials are encoded (None for the central).
        max_norm: L2 bound on device updates folded here, None for none.
        norm_policy: ``"clip"`` or ``"reject"`` above ``max_norm``.
        seed: seed of its identity.
    """

    def __init__(
        self,
        name: str,
        *,
        tier: Tier,
        fleet: str,
        layout: ModelLayout,
        flush: FlushPolicy,
        staleness: StalenessPolicy,
        partial_codec: CodecSpec | None,
        max_norm: float | None = None,
        norm_policy: NormPolicy = "clip",
        seed: int = 0,
        identity: SigningIdentity | None = None,
    ) -> None:
        self.name = name
        self.tier = tier
        self.fleet = fleet
        self.layout = layout
        self.flush = flush
        self.staleness = staleness
        self.partial_codec = partial_codec
        self.max_norm = max_norm
        self.norm_policy: NormPolicy = norm_policy
        self.identity = identity if identity is not None else identity_for(name, seed)
        self.aggregate = Accumulator(layout.num_params, hist_buckets=HIST_BUCKETS)
        self.known_version = 0
        self.epoch = 0
        self.oldest_at: float | None = None
        self.counts: Counter[str] = Counter()
        self._seq = 0

    # -- admission ----------------------------------------------------------------

    def admit_update(self, envelope: bytes, now: float) -> Outcome:
        """Fold a device update as the edge daemon does; returns the outcome.

        Raises:
            DecodeError: the envelope does not parse (a simulator bug, not an outcome).
        """
        parsed = parse_envelope(envelope, DEFAULT_LIMITS)
        message = parsed.message
        if not isinstance(message, DeviceUpdate):
            raise LocalProtocolError(f"{self.name} expected a device update, got {message.KIND}")
        self._check_layout(message.layout, message.num_params)
        assessment = self.staleness.assess(self.known_version, message.base_version)
        if not assessment.accepted:
            return self._count("stale")
        try:
            result = check_payload(
                parsed.payload,
                message.codec,
                message.num_params,
                max_norm=self.max_norm,
                norm_policy=self.norm_policy,
            )
        except RemoteProtocolError as exc:
            return self._count(exc.reason)
        self._check_room(1, 1)
        fold_update_message(
            self.aggregate,
            message,
            parsed.payload,
            tau=assessment.tau,
            discount=assessment.discount,
            clip_scale=result.scale,
        )
        if result.clipped:
            self.counts["norm_clipped"] += 1
        self._note(now)
        return self._count("accepted")

    def admit_partial(self, envelope: bytes, now: float) -> Outcome:
        """Fold a child partial as the regional and central daemons do; returns the outcome.

        Raises:
            DecodeError: the envelope does not parse (a simulator bug, not an outcome).
        """
        parsed = parse_envelope(envelope, DEFAULT_LIMITS)
        message = parsed.message
        if not isinstance(message, PartialAggregate):
            raise LocalProtocolError(f"{self.name} expected a partial, got {message.KIND}")
        self._check_layout(message.layout, message.num_params)
        # As the daemons: a partial is never refused for lateness (see staleness.py).
        assessment = self.staleness.assess_acknowledged(self.known_version, message.known_version)
        check_payload(
            parsed.payload, message.codec, message.num_params, max_norm=None, norm_policy="clip"
        )
        self._check_room(1, message.update_count)
        if assessment.late:
            self.counts["late_partial"] += 1
        fold_partial_message(
            self.aggregate,
            message,
            parsed.payload,
            extra_tau=assessment.tau,
            discount=assessment.discount,
        )
        self._note(now)
        return self._count("accepted")

    # -- flushing -----------------------------------------------------------------

    def due(self, now: float) -> FlushReason | None:
        """Whether the open buffer flushes at ``now`` (``FlushPolicy.should_flush``)."""
        return self.flush.should_flush(
            self.aggregate.input_count, self.aggregate.sample_count, self.oldest_at, now
        )

    def deadline(self) -> float | None:
        """When the open buffer's deadline falls, None when empty or without one."""
        return self.flush.deadline_at(self.oldest_at)

    def cut_partial(self) -> bytes | None:
        """Seal the open buffer as a signed partial and start the next epoch.

        Returns:
            The envelope, or None when the buffer is empty or its sum cannot be
            encoded (the daemon drops such an epoch too).
        """
        if self.aggregate.is_empty:
            return None
        assert self.partial_codec is not None
        self._seq += 1
        try:
            _message, envelope = sign_partial(
                self.identity,
                self.fleet,
                self.layout,
                self.aggregate,
                tier=self.tier,
                known_version=self.known_version,
                seq=self._seq,
                codec=self.partial_codec,
            )
        except LocalProtocolError:
            self.counts["dropped_epoch"] += 1
            self._advance()
            return None
        self._advance()
        return envelope

    # -- internals ----------------------------------------------------------------

    def _count(self, outcome: Outcome) -> Outcome:
        self.counts[outcome] += 1
        return outcome

    def _check_layout(self, fingerprint: bytes, num_params: int) -> None:
        if fingerprint != self.layout.fingerprint or num_params != self.layout.num_params:
            raise LocalProtocolError(f"{self.name} got an input for another layout")

    def _check_room(self, inputs: int, leaves: int) -> None:
        # The daemons cut early at max_ids; no scenario here comes near 65,536 ids
        # in one buffer, so reaching it means a scenario the simulator does not model.
        cap = DEFAULT_LIMITS.max_ids
        if self.aggregate.input_count + inputs > cap or self.aggregate.update_count + leaves > cap:
            raise LocalProtocolError(
                f"{self.name} would hold more than {cap} ids in one buffer; lower its flush "
                "max_inputs"
            )

    def _note(self, now: float) -> None:
        if self.oldest_at is None:
            self.oldest_at = now

    def _advance(self) -> None:
        self.aggregate.reset()
        self.epoch += 1
        self.oldest_at = None


class CentralNode(TierNode):
    """The central: folds inputs like any tier, and makes versions with the server optimizer.

    Args:
        params: model version 0.
        optimizer: the server optimizer (``tiers.optimizers``).
        **kwargs: as :class:`TierNode` (``partial_codec`` is None).
    """

    def __init__(
        self,
        name: str,
        *,
        params: npt.NDArray[np.float32],
        optimizer: ServerOptimizer,
        fleet: str,
        layout: ModelLayout,
        flush: FlushPolicy,
        staleness: StalenessPolicy,
        max_norm: float | None = None,
        norm_policy: NormPolicy = "clip",
        seed: int = 0,
    ) -> None:
        super().__init__(
            name,
            tier=Tier.REGIONAL,
            fleet=fleet,
            layout=layout,
            flush=flush,
            staleness=staleness,
            partial_codec=None,
            max_norm=max_norm,
            norm_policy=norm_policy,
            seed=seed,
        )
        self.params = np.asarray(params, dtype=np.float32).copy()
        self.optimizer = optimizer
        self.version = 0
        self.last_hist: list[int] = []
        self.last_update_count = 0

    def make_version(self) -> bool:
        """Apply ``model + server_step(aggregate)`` as the central daemon's cut does.

        Returns:
            True when a new version was made; False when the buffer was empty or
            the result was not finite (the epoch is dropped, as the daemon drops it).
        """
        aggregate = self.aggregate
        if aggregate.is_empty:
            return False
        saved = self.optimizer.state_arrays()
        new_params = self.optimizer.step(self.params, aggregate.result())
        if not bool(np.isfinite(new_params).all()):
            self.optimizer.load_state_arrays(saved)
            self.counts["dropped_epoch"] += 1
            self._advance()
            return False
        self.params = new_params
        self.version += 1
        self.known_version = self.version
        self.last_hist = aggregate.staleness_hist
        self.last_update_count = aggregate.update_count
        self._advance()
        return True
