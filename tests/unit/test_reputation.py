"""Per-device reputation (tiers.core._reputation): the core, the edge daemon, the configs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from fedtier.protocol.bus import MemoryBus
from fedtier.protocol.errors import ConfigError
from fedtier.protocol.messages import ReceiptStatus
from fedtier.simulations.sim.scenario import load_scenario
from fedtier.simulations.testing import SimDevice
from fedtier.tiers.config import EdgeConfig, load_config
from fedtier.tiers.core import (
    InfluenceRules,
    InfluenceState,
    Reputation,
    ReputationRules,
    sketch,
)
from fedtier.tiers.edge import EdgeDaemon
from tests.unit import test_edge as edge_tests

DIM = 64


def fleet_round(
    rng: np.random.Generator,
    pulls: npt.NDArray[np.float64],
    flippers: set[int],
    model: npt.NDArray[np.float64],
) -> tuple[list[npt.NDArray[np.float64]], npt.NDArray[np.float64]]:
    """One round of a non-IID fleet: each device's update and the model after their mean.

    An honest device's update is its own pull (near-orthogonal to the others'),
    a shared direction towards the optimum (the origin) and noise; a flipper
    sends the negative of what it would honestly send.
    """
    common = -model
    updates = []
    for i, pull in enumerate(pulls):
        honest = pull + 0.3 * common + 0.5 * rng.standard_normal(DIM)
        updates.append(-honest if i in flippers else honest)
    return updates, model + 0.2 * np.mean(updates, axis=0)


def run_fleet(reputation: Reputation, rounds: int, flippers: set[int], seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    names = [f"dev-{i}" for i in range(20)]
    pulls = rng.standard_normal((20, DIM))
    model = 3.0 * rng.standard_normal(DIM)
    reputation.model(0, model)
    for version in range(1, rounds + 1):
        updates, model = fleet_round(rng, pulls, flippers, model)
        for name, update in zip(names, updates, strict=True):
            reputation.observe(name, update)
        reputation.model(version, model)
    return names


def test_a_sign_flipper_is_down_weighted_and_honest_non_iid_devices_are_not() -> None:
    flippers = {3, 11, 17, 19}
    reputation = Reputation(ReputationRules(min_updates=4, low_weight=1))
    names = run_fleet(reputation, 12, flippers)
    # Per update, a flipped update's cosine to the others' mean overlaps the honest ones'
    # (each device pulls its own way); the summed history does not.
    low = {i for i, name in enumerate(names) if reputation.low(name)}
    assert low == flippers
    for i, name in enumerate(names):
        assert reputation.weight_cap(name, 12) == (1 if i in flippers else 12)
        assert reputation.weight_cap(name, None) == (1 if i in flippers else None)


def test_no_device_is_judged_before_min_updates_nor_an_exempt_one() -> None:
    rules = ReputationRules(min_updates=5, exempt=frozenset({"dev-3"}))
    reputation = Reputation(rules)
    names = run_fleet(reputation, 4, {3, 5})
    assert not any(reputation.low(name) for name in names)
    run_fleet(reputation, 8, {3, 5})
    assert reputation.low("dev-5")
    assert not reputation.low("dev-3")  # released by the operator, still scored
    score = reputation.score("dev-3")
    assert score is not None
    assert score < 0.0


def test_memory_is_bounded_per_device_whatever_the_model_size() -> None:
    reputation = Reputation(ReputationRules(sketch_dim=32))
    big = np.ones(5_000, np.float32)
    reputation.model(0, big)
    for _ in range(50):
        reputation.observe("dev-0", big)
    reputation.model(1, 2 * big)
    assert reputation.devices == 1
    assert reputation.memory_bytes == 2 * 32 * 8
    score = reputation.score("dev-0")
    assert score is not None
    assert score > 0.99
    reputation.forget(["dev-0"])
    assert reputation.devices == 0


def test_a_restart_starts_every_device_afresh() -> None:
    flippers = {2}
    before = Reputation(ReputationRules(min_updates=4))
    names = run_fleet(before, 10, flippers)
    assert before.low(names[2])
    # Nothing is persisted: the restarted edge judges nobody until min_updates more.
    after = Reputation(ReputationRules(min_updates=4))
    assert after.score(names[2]) is None
    assert not after.low(names[2])
    run_fleet(after, 3, flippers, seed=1)
    assert not after.low(names[2])
    run_fleet(after, 6, flippers, seed=1)
    assert after.low(names[2])


def test_updates_before_any_model_and_non_finite_ones_are_not_scored() -> None:
    reputation = Reputation(ReputationRules(min_updates=1))
    reputation.observe("dev-0", np.ones(8))
    assert reputation.devices == 0
    reputation.model(3, np.zeros(8))
    reputation.model(2, np.ones(8))  # older than known: ignored
    reputation.observe("dev-0", np.full(8, np.inf))
    assert reputation.devices == 0
    reputation.observe("dev-0", -np.ones(8))
    reputation.model(4, np.ones(8))
    assert reputation.score("dev-0") == pytest.approx(-1.0)


def test_the_sketch_is_exact_when_it_fits_and_keeps_cosines_when_it_does_not() -> None:
    small = np.arange(10, dtype=np.float32)
    assert np.array_equal(sketch(small, 16)[:10], small)
    assert not sketch(small, 16)[10:].any()
    rng = np.random.default_rng(4)
    a = rng.standard_normal(200_000)
    b = 0.6 * a + 0.8 * rng.standard_normal(200_000)  # cosine about 0.6
    sa, sb = sketch(a, 1024), sketch(b, 1024)
    cos = float(sa @ sb / np.linalg.norm(sa) / np.linalg.norm(sb))
    assert abs(cos - 0.6) < 0.1
    assert np.array_equal(sa, sketch(a, 1024))  # deterministic: every edge sketches alike


def test_a_model_longer_than_the_sign_period_plus_a_chunk_is_sketched() -> None:
    # The sign pattern must cover any chunk at any offset in its period: a
    # 100M-parameter edge once failed its first relay on a pattern too short.
    # Chunks of 2^20 start at offsets k * 2^20 mod 1,000,003 in the period; the
    # 21st (k = 20) starts at 971,460, past the period's end less a chunk.
    n = 21 * (1 << 20)
    ones = np.ones(n, dtype=np.float32)
    out = sketch(ones, 1024)
    assert out.shape == (1024,)
    assert np.isfinite(out).all()
    assert abs(float(out.sum())) <= n  # a sum of n signed ones


def test_influence_state_lowers_only_a_low_devices_cap() -> None:
    rules = InfluenceRules(max_samples=12, reputation=ReputationRules(min_updates=1, low_weight=2))
    state = InfluenceState(rules, 1.0)
    assert state.reputation is not None
    state.reputation.model(0, np.zeros(4))
    state.reputation.observe("bad", -np.ones(4))
    state.reputation.observe("good", np.ones(4))
    state.reputation.model(1, np.ones(4))
    low = state.down_weighted(rules, "bad")
    assert low is not None
    assert low.max_samples == 2
    assert state.down_weighted(rules, "good") is None
    assert state.down_weighted(rules, None) is None
    off = InfluenceState(InfluenceRules(reputation=ReputationRules(enabled=False)), 1.0)
    assert off.reputation is None
    # The registry's declared sizes keep the reputation rules.
    assert rules.with_declared({"x": 3}).reputation == rules.reputation


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("", ReputationRules()),
        ("[reputation]\nenabled = false\n", None),
        (
            '[reputation]\nmin_updates = 8\nthreshold = -0.1\nlow_weight = 2\nexempt = ["k1"]\n',
            ReputationRules(min_updates=8, threshold=-0.1, low_weight=2, exempt=frozenset({"k1"})),
        ),
    ],
)
def test_edge_config_reputation(
    tmp_path: Path, table: str, expected: ReputationRules | None
) -> None:
    path = tmp_path / "edge.toml"
    head = (
        'fleet = "acme"\nsite = "s1"\nregion = "r1"\nidentity_key = "k.pem"\n'
        'state_dir = "state"\n[keys]\nsenders = "devices.toml"\ncentral = "central.pub"\n'
    )
    path.write_text(head + table)
    config = load_config("edge", path)
    assert isinstance(config, EdgeConfig)
    assert config.influence.reputation == expected
    path.write_text(head + "[reputation]\nthreshold = 1.5\n")
    with pytest.raises(ConfigError, match=r"reputation\.threshold"):
        load_config("edge", path)
    path.write_text(head + "[reputation]\nmin_update = 3\n")
    with pytest.raises(ConfigError, match="min_update"):
        load_config("edge", path)


def test_the_examples_commented_reputation_block_is_the_default(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "edge.example.toml"
    text = example.read_text()
    start = text.index("# [reputation]")
    end = text.index("\n\n", start)
    block = "\n".join(line.removeprefix("# ") for line in text[start:end].splitlines())
    path = tmp_path / "edge.toml"
    path.write_text(text[:start] + block + text[end:])
    config = load_config("edge", path)
    assert isinstance(config, EdgeConfig)
    assert config.influence.reputation == ReputationRules()


def test_scenario_defences_reputation() -> None:
    base = Path("simulations/scenarios/poison-base.toml")
    assert load_scenario(base).defences is not None
    on = load_scenario(base).defences
    assert on is not None
    assert on.reputation == ReputationRules()
    off = load_scenario(base, overrides=["defences.reputation.enabled=false"]).defences
    assert off is not None
    assert off.reputation is None
    tuned = load_scenario(base, overrides=["defences.reputation.min_updates=6"]).defences
    assert tuned is not None
    assert tuned.reputation == ReputationRules(min_updates=6)


async def test_the_edge_down_weights_a_device_whose_history_points_against_the_model(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    rules = InfluenceRules(reputation=ReputationRules(min_updates=2, low_weight=1))
    site = edge_tests.Site(tmp_path, edge_tests.make_config(tmp_path, influence=rules))
    await site.publish_model(0)
    flipper, honest = edge_tests.DEVICES[0], edge_tests.DEVICES[1]
    # publish_model(v) makes every parameter v: the model moves along all-ones.
    ones = np.ones(edge_tests.LAYOUT.num_params, np.float32)
    async with trio.open_nursery() as nursery:
        edge = EdgeDaemon(
            site.config,
            mqtt=MemoryBus(site.mqtt),
            nats=MemoryBus(site.nats),
            registry_store=site.registry,
            keys=edge_tests.edge_keys(),
            metrics=site.metrics,
            clock_ms=lambda: 1_764_288_000_000,
            store_in_thread=False,
        )
        await nursery.start(edge.serve)

        async def send(device: SimDevice, vector: npt.NDArray[np.float32]) -> None:
            data = device.update(vector, n_samples=10, base_version=edge.known_version)[1]
            receipt = await edge_tests.send_and_receipt(edge_tests.Phone(site, device), data)
            assert receipt.status is ReceiptStatus.ACCEPTED

        for _ in range(2):
            await send(flipper, -0.5 * ones + 0.1 * edge_tests.delta(1))
            await send(honest, 0.5 * ones + 0.1 * edge_tests.delta(2))
        assert edge.buffer.accumulator.sample_count == 40
        await site.publish_model(1)
        await wait_all_tasks_blocked()
        assert edge.known_version == 1
        reputation = edge.influence.reputation
        assert reputation is not None
        score = reputation.score(flipper.identity.key_id)
        assert score is not None
        assert score < -0.9
        # Accepted and folded (never dropped), with weight 1 instead of 10.
        await send(flipper, -0.5 * ones)
        await send(honest, 0.5 * ones)
        assert edge.buffer.accumulator.sample_count == 40 + 1 + 10
        assert site.metrics.anomalies["low_reputation"] == 1
        assert edge.anomalies["low_reputation"] == 1
        nursery.cancel_scope.cancel()
    assert not math.isnan(score)
