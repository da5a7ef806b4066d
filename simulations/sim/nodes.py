"""The simulator's tiers: the production tier core with no bus, store or event loop.

Imports protocol and tiers (the sans-IO core, never a daemon, bus or state
store); the engine owns time and passes it in as ``now``. Each node runs, on the
same signed bytes, the functions the daemons run (``fedtier.tiers.core``):

    update in:   admit_update  (parse, signature, fleet, layout, future_base,
                 staleness, rate limit, contribution cap, norm, weight cap)
                 -> TierBuffer.fold
    partial in:  admit_partial (parse, signature, id, staleness: never refused)
                 -> TierBuffer.fold
    cut:         TierBuffer.due -> robust_cut (with ``[robust]``: outliers
                 left out and counted, the robust rule's numerator)
                 -> build_partial (encode the numerator with the partial
                 codec, derive the partial id, seal)
    version:     step_model (the server optimizer), then seal_version's math

What the simulator leaves out is what cannot change an aggregate: the state
store and acknowledgements, duplicates and replays (its devices send each update
once, so nodes use ``NothingSeen``), telemetry, and resends: an update refused
for a reason that is not final (``rate_limited``, ``contribution_capped``,
``future_base``) is counted and dropped, where a real device would retry it, and
an outlier a robust cut leaves out is counted where a daemon quarantines it.
``tests/unit/test_sim_matches_daemons.py`` feeds the same updates through these
nodes and through the real daemons on in-memory buses and checks that the model
versions are equal bit for bit: it proves the daemons' shell, not a copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter

import numpy as np
import numpy.typing as npt

from fedtier.protocol.codecs import CodecSpec, decode
from fedtier.protocol.errors import LocalProtocolError, Reason
from fedtier.protocol.identity import SigningIdentity, VerifyKey
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.limits import DEFAULT_LIMITS
from fedtier.protocol.messages import DeviceUpdate, Tier
from fedtier.simulations.sim._attribution import Attribution, Contributions
from fedtier.tiers.core import (
    AdmissionRules,
    Decision,
    InfluenceRules,
    InfluenceState,
    ModelView,
    NothingSeen,
    Outcome,
    RobustRules,
    TierBuffer,
    admit_partial,
    admit_update,
    build_partial,
    robust_cut,
    step_model,
)
from fedtier.tiers.flush import FlushPolicy, FlushReason
from fedtier.tiers.optimizers import ServerOptimizer
from fedtier.tiers.staleness import StalenessPolicy
from fedtier.tiers.testing import CREATED_MS
from fedtier.tiers.validation import NormPolicy

__all__ = ["CentralNode", "NodeOutcome", "SimKeys", "TierNode", "identity_for"]

NodeOutcome = str
"""``"accepted"`` or a rejection reason token (``"stale"``, ``"non_finite"``...)."""

_CREATED_MS = CREATED_MS
"""``created_ms`` of simulated partials: virtual time has no wall clock, and no check reads it."""

# Rejections the simulator's own fleet can earn; any other is a simulator bug.
_EXPECTED_REJECTIONS = frozenset(
    {
        Reason.STALE,
        Reason.NON_FINITE,
        Reason.NORM_EXCEEDED,
        Reason.FUTURE_BASE,
        Reason.RATE_LIMITED,
        Reason.CONTRIBUTION_CAPPED,
    }
)


def identity_for(name: str, seed: int) -> SigningIdentity:
    """A reproducible Ed25519 identity for a simulated device or tier."""
    digest = hashlib.blake2b(f"fedtier-sim/{seed}/{name}".encode(), digest_size=32).digest()
    return SigningIdentity.from_seed(digest)


class SimKeys:
    """The key registry of a simulated fleet: every device's and every node's key.

    One registry serves every node (each only ever sees its own children's
    messages), so the core verifies each signature as a daemon would.
    """

    def __init__(self) -> None:
        self._keys: dict[str, VerifyKey] = {}

    def register(self, identity: SigningIdentity) -> SigningIdentity:
        """Add ``identity``'s public key; returns the identity."""
        self._keys[identity.key_id] = identity.verify_key
        return identity

    def enrol(self, key: VerifyKey) -> None:
        """Add a key made elsewhere (a device identity made in a worker process)."""
        self._keys[key.key_id] = key

    def get(self, key_id: str, /) -> VerifyKey | None:
        """The key of ``key_id``, None when unknown."""
        return self._keys.get(key_id)

    def describe(self, key_id: str, /) -> str:
        """The key id (simulated participants have no other name)."""
        return key_id


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
        keys: the fleet's key registry; the node registers its own key there.
        max_norm: L2 bound on device updates folded here, None for none.
        norm_policy: ``"clip"`` or ``"reject"`` above ``max_norm``.
        accepts: which tiers' partials it folds.
        seed: seed of its identity.
        identity: its identity, instead of one derived from ``name`` and ``seed``.
        lineage: record the id of every device update it accepts
            (:attr:`accepted_ids`), for checking that each lands in one version.
        influence: the per-device bounds (``[defences]``) applied to device
            updates here, with their state; None: none beyond ``max_norm``.
        robust: ``[robust]`` of this tier (default: FedBuff's streaming fold).
        attribution: follow each device's contribution into the versions.
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
        keys: SimKeys,
        max_norm: float | None = None,
        norm_policy: NormPolicy = "clip",
        accepts: tuple[Tier, ...] = (Tier.EDGE,),
        seed: int = 0,
        identity: SigningIdentity | None = None,
        lineage: bool = False,
        influence: InfluenceRules | None = None,
        robust: RobustRules | None = None,
        attribution: Attribution | None = None,
    ) -> None:
        self.name = name
        self.tier = tier
        self.fleet = fleet
        self.layout = layout
        self.flush = flush
        self.partial_codec = partial_codec
        self.keys = keys
        self.identity = keys.register(
            identity if identity is not None else identity_for(name, seed)
        )
        self.rules = AdmissionRules(
            fleet=fleet,
            limits=DEFAULT_LIMITS,
            staleness=staleness,
            max_norm=max_norm,
            norm_policy=norm_policy,
            accepts=accepts,
            influence=influence if influence is not None else InfluenceRules(),
        )
        self.influence = None if influence is None else InfluenceState(influence, max_norm)
        self.robust = robust if robust is not None else RobustRules()
        self.buffer = TierBuffer(layout.num_params, keep_inputs=self.robust.enabled)
        self.attribution = attribution
        # Per folded input, in fold order: what each device added (with attribution).
        self._parts: list[Contributions] = []
        self.known_version = 0
        self.counts: Counter[str] = Counter()
        self._seen = NothingSeen()
        self._seq = 0
        self.accepted_ids: list[bytes] | None = [] if lineage else None
        """Ids of the device updates accepted here, in order (None unless ``lineage``)."""

    def _model(self) -> ModelView:
        return ModelView(self.known_version, self.layout.fingerprint, self.layout.num_params)

    # -- admission ----------------------------------------------------------------

    def admit_update(self, envelope: bytes, now: float, sender: str | None = None) -> NodeOutcome:
        """Admit a device update as the edge daemon does; returns the outcome.

        Args:
            envelope: the update's envelope.
            now: the virtual time.
            sender: the device's key id (the daemon's topic device): its weight
                cap is its declared size (``InfluenceRules.weight_cap``).
        """
        rules = self.rules
        if rules.influence.declared or rules.influence.derive_cap:
            rules = dataclasses.replace(rules, influence=rules.influence.for_sender(sender))
        low = (
            None
            if self.influence is None
            else self.influence.down_weighted(rules.influence, sender)
        )
        if low is not None:
            rules = dataclasses.replace(rules, influence=low)
        decision = admit_update(
            envelope,
            rules=rules,
            senders=self.keys,
            model=self._model(),
            seen=self._seen,
            topic_device=sender,
            influence=self.influence,
            now=now,
        )
        outcome = self._take(decision, now)
        accepted = decision.accepted
        reputation = None if self.influence is None else self.influence.reputation
        if reputation is not None and accepted is not None and outcome == Outcome.ACCEPTED:
            message = accepted.message
            assert isinstance(message, DeviceUpdate)
            if low is not None:
                # A daemon counts and traces it (fedtier_low_reputation_total).
                self.counts["low_reputation"] += 1
            reputation.observe(
                accepted.sender,
                decode(accepted.payload, message.codec, message.num_params),
                accepted.clip_scale,
            )
        return outcome

    def model(self, version: int, params: npt.NDArray[np.float32]) -> None:
        """The node knows model ``version`` now: its reputation scores against it."""
        self.known_version = max(self.known_version, version)
        if self.influence is not None and self.influence.reputation is not None:
            self.influence.reputation.model(version, params)

    def admit_partial(self, envelope: bytes, now: float) -> NodeOutcome:
        """Admit a child partial as the regional and central daemons do; returns the outcome."""
        decision = admit_partial(
            envelope,
            rules=self.rules,
            senders=self.keys,
            model=self._model(),
            seen=self._seen,
            tier=self.name,
        )
        return self._take(decision, now)

    def _take(self, decision: Decision, now: float) -> NodeOutcome:
        if decision.outcome is Outcome.REJECTED:
            assert decision.reason is not None
            if decision.reason not in _EXPECTED_REJECTIONS:
                # Anything else (a bad signature, a foreign layout...) is a simulator bug.
                raise LocalProtocolError(
                    f"{self.name} refused its own fleet's input: {decision.error}"
                )
            return self._count(decision.reason)
        accepted = decision.accepted
        assert accepted is not None
        if not self.buffer.has_room(1, accepted.update_count, DEFAULT_LIMITS.max_ids):
            # The daemons cut early at max_ids; no scenario comes near 65,536 ids in
            # one buffer, so reaching it means a scenario the simulator does not model.
            raise LocalProtocolError(
                f"{self.name} would hold more than {DEFAULT_LIMITS.max_ids} ids in one "
                "buffer; lower its flush max_inputs"
            )
        if accepted.clipped:
            self.counts["norm_clipped"] += 1
        if accepted.late:
            self.counts["late_partial"] += 1
        if accepted.weight_capped:
            self.counts["weight_capped"] += 1
        self.buffer.fold(accepted, now=now, accepted_ms=_CREATED_MS)
        if self.attribution is not None:
            if isinstance(accepted.message, DeviceUpdate):
                self._parts.append(Attribution.of_input(accepted, self.layout.num_params))
            else:
                self._parts.append(
                    self.attribution.of_partial(accepted.input_id, accepted.discount)
                )
        if self.accepted_ids is not None and isinstance(accepted.message, DeviceUpdate):
            self.accepted_ids.append(accepted.input_id)
        return self._count(Outcome.ACCEPTED)

    # -- flushing -----------------------------------------------------------------

    def due(self, now: float) -> FlushReason | None:
        """Whether the open buffer flushes at ``now`` (``FlushPolicy.should_flush``)."""
        return self.buffer.due(self.flush, now)

    def deadline(self) -> float | None:
        """When the open buffer's deadline falls, None when empty or without one."""
        return self.buffer.deadline(self.flush)

    def cut_partial(self) -> bytes | None:
        """Seal the open buffer as a signed partial and start the next epoch.

        Returns:
            The envelope, or None when the buffer is empty or its sum cannot be
            encoded (the daemon drops such an epoch too).
        """
        if self.buffer.is_empty:
            return None
        assert self.partial_codec is not None
        self._seq += 1
        accumulator = self.buffer.accumulator
        numerator = None
        parts = self._take_parts()
        if self.buffer.keep_inputs:
            cut = robust_cut(self.buffer, self.robust)
            accumulator, numerator = cut.accumulator, cut.numerator
            if cut.outliers:
                # A daemon quarantines them (reason "outlier"); the simulator counts them.
                self.counts[Reason.OUTLIER.value] += len(cut.outliers)
                left_out = set(cut.outliers)
                parts = [p for i, p in enumerate(parts) if i not in left_out]
        try:
            message, envelope = build_partial(
                accumulator,
                identity=self.identity,
                fleet=self.fleet,
                tier=self.tier,
                known_version=self.known_version,
                layout=self.layout.fingerprint,
                num_params=self.layout.num_params,
                codec=self.partial_codec,
                seq=self._seq,
                created_ms=_CREATED_MS,
                numerator=numerator,
            )
        except LocalProtocolError:
            self.counts["dropped_epoch"] += 1
            self.buffer.advance()
            return None
        if self.attribution is not None:
            self.attribution.sealed(message.partial_id, parts)
        self.buffer.advance()
        return envelope

    def _take_parts(self) -> list[Contributions]:
        """The open buffer's per-input contributions, and a fresh list for the next epoch."""
        parts, self._parts = self._parts, []
        return parts

    def _count(self, outcome: NodeOutcome) -> NodeOutcome:
        self.counts[outcome] += 1
        return outcome


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
        keys: SimKeys,
        max_norm: float | None = None,
        norm_policy: NormPolicy = "clip",
        seed: int = 0,
        lineage: bool = False,
        influence: InfluenceRules | None = None,
        attribution: Attribution | None = None,
    ) -> None:
        super().__init__(
            name,
            tier=Tier.REGIONAL,
            fleet=fleet,
            layout=layout,
            flush=flush,
            staleness=staleness,
            partial_codec=None,
            keys=keys,
            max_norm=max_norm,
            norm_policy=norm_policy,
            accepts=(Tier.REGIONAL, Tier.EDGE),
            seed=seed,
            lineage=lineage,
            influence=influence,
            attribution=attribution,
        )
        self.params = np.asarray(params, dtype=np.float32).copy()
        self.optimizer = optimizer
        self.version = 0
        # In a flat topology the central admits device updates and scores them.
        self.model(0, self.params)
        self.last_hist: list[int] = []
        self.last_update_count = 0
        self.version_leaves: dict[int, tuple[bytes, ...]] | None = {} if lineage else None
        """Each version's leaves (device update ids), by version (None unless ``lineage``)."""

    def make_version(self) -> bool:
        """Apply ``model + server_step(aggregate)`` as the central daemon's cut does.

        Returns:
            True when a new version was made; False when the buffer was empty or
            the result was not finite (the epoch is dropped, as the daemon drops it).
        """
        accumulator = self.buffer.accumulator
        if accumulator.is_empty:
            return False
        new_params = step_model(self.params, self.optimizer, accumulator)
        parts = self._take_parts()
        if new_params is None:
            self.counts["dropped_epoch"] += 1
            self.buffer.advance()
            return False
        self.params = new_params
        self.version += 1
        self.model(self.version, new_params)
        self.last_hist = accumulator.staleness_hist
        self.last_update_count = accumulator.update_count
        if self.version_leaves is not None:
            # What the central daemon records as the version's lineage.
            self.version_leaves[self.version] = tuple(accumulator.leaf_ids)
        if self.attribution is not None:
            self.attribution.version(self.version, accumulator.sample_count, parts)
        self.buffer.advance()
        return True
