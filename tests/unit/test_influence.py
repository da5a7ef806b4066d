"""Bounded influence per device, on the sans-IO core: weight cap, norm bound, share, rate."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from fedtier.protocol.bus import MemoryBus
from fedtier.protocol.errors import ConfigError
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import layout_of
from fedtier.protocol.limits import DEFAULT_LIMITS
from fedtier.protocol.messages import ReceiptStatus
from fedtier.tiers.config import EdgeConfig, load_config
from fedtier.tiers.core import (
    DEFAULT_MAX_SAMPLES,
    AdaptiveNorm,
    AdmissionRules,
    ContributionCounter,
    Decision,
    DeclaredCaps,
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
    declared_default,
)
from fedtier.tiers.edge import EdgeDaemon
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.tiers.staleness import StalenessPolicy
from fedtier.tiers.testing import SimDevice
from tests.unit import test_edge as edge_tests

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


# -- declared data sizes: each device's own cap ------------------------------------------


def test_declared_default_is_the_median_or_the_fallback() -> None:
    assert declared_default([], 10_000) == 10_000
    assert declared_default([], None) is None
    assert declared_default([5, 7, 40], 10_000) == 7
    assert declared_default([5, 8], 10_000) == 6  # 6.5, rounded down


def test_each_device_is_capped_at_its_declared_size_else_the_fleet_default() -> None:
    ids = [d.identity.key_id for d in (*HONEST, ATTACKER)]
    declared = {ids[0]: 30, ids[1]: 10, ids[2]: 50}
    derived = InfluenceRules(max_samples=10_000, declared=declared, derive_cap=True)
    # Median of 10, 30, 50: a declared size above it is capped there too.
    assert [derived.weight_cap(k) for k in ids] == [30, 10, 30, 30, 30]
    assert derived.weight_cap(None) == derived.default_cap == 30
    fixed = InfluenceRules(max_samples=20, declared=declared)
    assert [fixed.weight_cap(k) for k in ids] == [30, 10, 50, 20, 20]
    assert InfluenceRules(max_samples=20, derive_cap=True).default_cap == 20  # none declared
    caps = DeclaredCaps(derived.with_declared({}))
    admission = rules(max_samples=10_000, derive_cap=True)
    weights = []
    for sender, n_samples in ((HONEST[0], 2**31), (HONEST[1], 4), (ATTACKER, 2**63 - 1)):
        influence = caps.rules_for(declared, sender.identity.key_id)
        data = sender.update(honest_delta(1), base_version=3, n_samples=n_samples)[1]
        decision = admit(data, dataclasses.replace(admission, influence=influence), None)
        assert decision.accepted is not None
        weights.append(decision.accepted.n_samples)
    # Never the raw claim: the declared size, the claim when below it, the fleet's median.
    assert weights == [30.0, 4.0, 30.0]
    # A reloaded registry hands out a new mapping: the caps follow it.
    assert caps.rules_for({ids[4]: 3}, ids[4]).max_samples == 3
    assert caps.rules_for({ids[4]: 3}, ids[0]).max_samples == 3


def test_a_registry_entry_declares_its_device_size(tmp_path: Path) -> None:
    registry = tmp_path / "devices.toml"
    ids = [d.identity.key_id for d in HONEST]
    hexes = [d.identity.verify_key.raw.hex() for d in HONEST]
    registry.write_text(
        "[keys]\n"
        f'veh-0 = {{ public_key = "{hexes[0]}", max_samples = 480 }}\n'
        f'veh-1 = [{{ public_key = "{hexes[1]}", max_samples = 20 }}]\n'
        f'veh-2 = "{hexes[2]}"\n'
    )
    keys = KeyRegistry([registry], role="device")
    declared = keys.declared_samples()
    assert dict(declared) == {ids[0]: 480, ids[1]: 20}
    assert keys.declared_samples() is declared  # the same object until a reload
    caps = DeclaredCaps(InfluenceRules(max_samples=10_000, derive_cap=True))
    # The median of 480 and 20 is 250: the larger device is capped there.
    assert [caps.rules_for(declared, k).max_samples for k in ids[:3]] == [250, 20, 250]
    registry.write_text(f'[keys]\nveh-0 = {{ public_key = "{hexes[0]}", max_samples = 0 }}\n')
    with pytest.raises(ConfigError, match="max_samples must be an integer"):
        keys.reload()
    registry.write_text(f'[keys]\nveh-0 = {{ public_key = "{hexes[0]}", max_samples = 7 }}\n')
    keys.reload()
    assert keys.declared_samples() is not declared
    assert caps.rules_for(keys.declared_samples(), ids[0]).max_samples == 7


@pytest.mark.parametrize(
    ("line", "derive", "cap"),
    [
        ("", True, DEFAULT_MAX_SAMPLES),
        ('max_samples = "declared"', True, DEFAULT_MAX_SAMPLES),
        ("max_samples = 64", False, 64),
    ],
)
def test_edge_config_max_samples(tmp_path: Path, line: str, derive: bool, cap: int) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(
        'fleet = "acme"\nsite = "s1"\nregion = "r1"\nidentity_key = "k.pem"\n'
        'state_dir = "state"\n[keys]\nsenders = "devices.toml"\ncentral = "central.pub"\n'
        f"[validation]\n{line}\n"
    )
    config = load_config("edge", path)
    assert isinstance(config, EdgeConfig)
    assert (config.influence.derive_cap, config.influence.max_samples) == (derive, cap)
    # "declared" or a number of examples; nothing else.
    path.write_text(path.read_text().replace(line, "") + 'max_samples = "lots"\n')
    with pytest.raises(ConfigError, match=r"validation\.max_samples"):
        load_config("edge", path)


async def test_the_edge_caps_each_device_at_its_registry_size(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    registry = tmp_path / "devices.toml"
    hexes = [d.identity.verify_key.raw.hex() for d in edge_tests.DEVICES]
    registry.write_text(
        "[keys]\n"
        f'veh-0 = {{ public_key = "{hexes[0]}", max_samples = 30 }}\n'
        f'veh-1 = {{ public_key = "{hexes[1]}", max_samples = 50 }}\n'
        f'veh-2 = "{hexes[2]}"\n'
    )
    # The edge's defaults: max_samples = "declared", so veh-2 gets the median, 40.
    site = edge_tests.Site(
        tmp_path,
        edge_tests.make_config(
            tmp_path, influence=InfluenceRules(max_samples=DEFAULT_MAX_SAMPLES, derive_cap=True)
        ),
    )
    await site.publish_model(0)
    keys = TierKeys(
        edge_tests.EDGE, KeyRegistry([registry], role="device"), edge_tests.CENTRAL.verify_key
    )
    async with trio.open_nursery() as nursery:
        edge = EdgeDaemon(
            site.config,
            mqtt=MemoryBus(site.mqtt),
            nats=MemoryBus(site.nats),
            registry_store=site.registry,
            keys=keys,
            metrics=site.metrics,
            clock_ms=lambda: 1_764_288_000_000,
            store_in_thread=False,
        )
        await nursery.start(edge.serve)
        for device, claim in zip(edge_tests.DEVICES[:3], (2**63 - 1, 20, 10**9), strict=True):
            data = device.update(edge_tests.delta(7), n_samples=claim)[1]
            receipt = await edge_tests.send_and_receipt(edge_tests.Phone(site, device), data)
            assert receipt.status is ReceiptStatus.ACCEPTED
        assert edge.buffer.accumulator.sample_count == 30 + 20 + 40
        # A reload with new sizes applies to the next update.
        registry.write_text(
            f'[keys]\nveh-0 = {{ public_key = "{hexes[0]}", max_samples = 3 }}\n'
            f'veh-2 = "{hexes[2]}"\n'
        )
        keys.senders.reload()
        data = edge_tests.DEVICES[0].update(edge_tests.delta(8), n_samples=100)[1]
        receipt = await edge_tests.send_and_receipt(
            edge_tests.Phone(site, edge_tests.DEVICES[0]), data
        )
        assert receipt.status is ReceiptStatus.ACCEPTED
        assert edge.buffer.accumulator.sample_count == 90 + 3
        nursery.cancel_scope.cancel()
