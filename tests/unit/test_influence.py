"""Bounded influence per device, on the sans-IO core: weight cap, norm bound, share, rate."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import layout_of
from fedtier.protocol.limits import DEFAULT_LIMITS
from fedtier.tiers.core import (
    AdaptiveNorm,
    AdmissionRules,
    ContributionCounter,
    Decision,
    InfluenceRules,
    InfluenceState,
    ModelView,
    NormBound,
    NothingSeen,
    Outcome,
    TierBuffer,
    TokenBuckets,
    admit_update,
    capped_weight,
)
from fedtier.tiers.registry import KeyRegistry
from fedtier.tiers.staleness import StalenessPolicy
from fedtier.tiers.testing import SimDevice

FLEET = "acme"
LAYOUT = layout_of([("w", (6,)), ("b", (2,))])
HONEST = [
    SimDevice(SigningIdentity.from_seed(bytes([20 + i]) * 32), FLEET, LAYOUT) for i in range(4)
]
ATTACKER = SimDevice(SigningIdentity.from_seed(b"\x66" * 32), FLEET, LAYOUT)
SENDERS = KeyRegistry.from_keys(
    {f"d{i}": d.identity.verify_key for i, d in enumerate([*HONEST, ATTACKER])}, role="device"
)
MODEL = ModelView(version=3, layout=LAYOUT.fingerprint, num_params=LAYOUT.num_params)


def honest_delta(seed: int) -> npt.NDArray[np.float32]:
    # Norm about 0.9, as the honest deltas measured on the mesh.
    values = np.random.default_rng(seed).standard_normal(LAYOUT.num_params)
    return (values / np.linalg.norm(values) * 0.9).astype(np.float32)


def rules(**influence: object) -> AdmissionRules:
    return AdmissionRules(
        fleet=FLEET,
        limits=DEFAULT_LIMITS,
        staleness=StalenessPolicy(max_staleness=4),
        max_norm=100.0,
        influence=InfluenceRules(**influence),  # type: ignore[arg-type]
    )


def admit(
    data: bytes, admission: AdmissionRules, state: InfluenceState | None, now: float = 0.0
) -> Decision:
    return admit_update(
        data,
        rules=admission,
        senders=SENDERS,
        model=MODEL,
        seen=NothingSeen(),
        influence=state,
        now=now,
    )


def folded(decisions: list[Decision]) -> TierBuffer:
    buffer = TierBuffer(LAYOUT.num_params)
    for decision in decisions:
        assert decision.accepted is not None
        buffer.fold(decision.accepted, now=0.0, accepted_ms=0)
    return buffer


# -- the weight cap ----------------------------------------------------------------------


def test_a_huge_n_samples_is_folded_with_the_cap_only() -> None:
    admission = rules(max_samples=50)
    honest = [
        admit(d.update(honest_delta(i), base_version=3, n_samples=20)[1], admission, None)
        for i, d in enumerate(HONEST)
    ]
    evil = np.full(LAYOUT.num_params, 5.0 / math.sqrt(LAYOUT.num_params), np.float32)
    attack = admit(ATTACKER.update(evil, base_version=3, n_samples=2**63 - 1)[1], admission, None)
    assert attack.accepted is not None
    assert attack.accepted.weight_capped
    assert attack.accepted.n_samples == 50.0  # what the store keeps, so a refold agrees
    without = folded(honest).accumulator
    with_attack = folded([*honest, attack]).accumulator
    assert with_attack.sample_count == without.sample_count + 50
    moved = with_attack.numerator / with_attack.sample_count - without.numerator / (
        without.sample_count
    )
    # Its share is 50 / (80 + 50); uncapped it would have been all of it.
    bound = 50 / (80 + 50) * (5.0 + float(np.linalg.norm(without.numerator)) / 80)
    assert float(np.linalg.norm(moved)) <= bound * (1 + 1e-5)
    assert float(np.linalg.norm(with_attack.numerator / with_attack.sample_count)) < 2.5


def test_capped_weight() -> None:
    assert capped_weight(7, None) == 7
    assert capped_weight(7, 5) == 5
    assert capped_weight(2**63 - 1, 10_000) == 10_000


# -- the norm bound ----------------------------------------------------------------------


def test_adaptive_bound_warms_up_then_follows_the_quantile() -> None:
    bound = NormBound(100.0, AdaptiveNorm(quantile=0.5, factor=3.0, window=8, warmup=4))
    for _ in range(3):
        bound.observe(1.0)
    assert bound.bound() == 100.0  # still warming up
    bound.observe(1.0)
    assert bound.bound() == pytest.approx(3.0)
    # A huge norm is recorded as the bound in force, so it cannot drag the quantile.
    for _ in range(3):
        bound.observe(1e12)
    assert bound.bound() == pytest.approx(3.0)
    fixed = NormBound(100.0)
    fixed.observe(1.0)
    assert (fixed.mode, fixed.bound()) == ("fixed", 100.0)


def test_a_huge_delta_is_clipped_to_the_adaptive_bound_not_the_fixed_one() -> None:
    admission = rules(adaptive_norm=AdaptiveNorm(quantile=0.5, factor=3.0, window=64, warmup=8))
    state = InfluenceState(admission.influence, admission.max_norm)
    for i in range(16):
        device = HONEST[i % len(HONEST)]
        decision = admit(device.update(honest_delta(i), base_version=3)[1], admission, state)
        assert decision.outcome is Outcome.ACCEPTED
    assert state.norm_bound() == pytest.approx(2.7, rel=1e-3)
    evil = honest_delta(99) * np.float32(1e6)
    attack = admit(ATTACKER.update(evil, base_version=3)[1], admission, state)
    assert attack.accepted is not None
    assert attack.accepted.clipped
    clipped_norm = attack.accepted.norm * attack.accepted.clip_scale
    assert clipped_norm == pytest.approx(2.7, rel=1e-3)
    assert clipped_norm < 10.0  # far below the fixed 100 that let it through before


# -- the contribution cap and the rate limit ---------------------------------------------


def test_contribution_cap_per_version_then_free_again_at_the_next() -> None:
    admission = rules(max_updates_per_version=2)
    state = InfluenceState(admission.influence, admission.max_norm)
    device = HONEST[0]
    outcomes = [
        admit(device.update(honest_delta(i), base_version=3)[1], admission, state) for i in range(3)
    ]
    assert [d.outcome for d in outcomes] == [Outcome.ACCEPTED] * 2 + [Outcome.REJECTED]
    assert outcomes[2].reason == "contribution_capped"
    # Another device has its own share.
    other = admit(HONEST[1].update(honest_delta(5), base_version=3)[1], admission, state)
    assert other.outcome is Outcome.ACCEPTED
    counter = ContributionCounter(1)
    counter.add("a", 3)
    assert counter.full("a", 3)
    assert not counter.full("a", 4)  # the next version starts afresh


def test_rate_limit_is_per_device_and_says_when_to_retry() -> None:
    admission = rules(rate_per_s=2.0, burst=3.0)
    state = InfluenceState(admission.influence, admission.max_norm)
    decisions = [
        admit(HONEST[0].update(honest_delta(i), base_version=3)[1], admission, state, now=10.0)
        for i in range(5)
    ]
    assert [d.outcome for d in decisions] == [Outcome.ACCEPTED] * 3 + [Outcome.REJECTED] * 2
    assert {d.reason for d in decisions[3:]} == {"rate_limited"}
    assert all(d.retry_after_ms == 500 for d in decisions[3:])
    other = admit(HONEST[1].update(honest_delta(9), base_version=3)[1], admission, state, now=10.0)
    assert other.outcome is Outcome.ACCEPTED
    later = admit(HONEST[0].update(honest_delta(7), base_version=3)[1], admission, state, now=10.5)
    assert later.outcome is Outcome.ACCEPTED
    buckets = TokenBuckets(1.0, 1.0)
    assert buckets.take("x", 0.0) == 0.0
    assert buckets.take("x", 0.25) == pytest.approx(0.75)


def test_a_base_version_the_tier_never_saw_is_future_base() -> None:
    admission = rules(reject_future_base=True)
    decision = admit(HONEST[0].update(honest_delta(1), base_version=4)[1], admission, None)
    assert (decision.outcome, decision.reason) == (Outcome.REJECTED, "future_base")
    huge = admit(HONEST[0].update(honest_delta(1), base_version=2**63 - 1)[1], admission, None)
    assert huge.reason == "future_base"
    # Off (the simulator's default): staleness is clamped to 0 as before.
    assert admit(HONEST[0].update(honest_delta(1), base_version=4)[1], rules(), None).accepted


# -- the property ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n_samples=st.integers(min_value=1, max_value=2**63 - 1),
    scale=st.floats(min_value=1e-3, max_value=1e30),
    cap=st.integers(min_value=1, max_value=1000),
    max_norm=st.floats(min_value=0.1, max_value=100.0),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_no_single_device_moves_a_version_by_more_than_its_cap(
    n_samples: int, scale: float, cap: int, max_norm: float, seed: int
) -> None:
    admission = AdmissionRules(
        fleet=FLEET,
        limits=DEFAULT_LIMITS,
        staleness=StalenessPolicy(max_staleness=4),
        max_norm=max_norm,
        influence=InfluenceRules(max_samples=cap),
    )
    honest = [
        admit(d.update(honest_delta(seed + i), base_version=3, n_samples=10)[1], admission, None)
        for i, d in enumerate(HONEST)
    ]
    direction = np.random.default_rng(seed).standard_normal(LAYOUT.num_params)
    evil = (direction / np.linalg.norm(direction) * scale).astype(np.float32)
    attack = admit(ATTACKER.update(evil, base_version=3, n_samples=n_samples)[1], admission, None)
    assert attack.accepted is not None
    without = folded(honest).accumulator
    with_attack = folded([*honest, attack]).accumulator
    # Its weight is at most the cap and its vector at most the bound: the numerator
    # moves by at most cap * max_norm, the sample count by at most cap.
    added_weight = with_attack.sample_count - without.sample_count
    assert added_weight == min(n_samples, cap)
    moved = float(np.linalg.norm(with_attack.numerator - without.numerator))
    assert moved <= cap * max_norm * (1 + 1e-4)
