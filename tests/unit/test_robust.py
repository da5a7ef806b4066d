"""Robust aggregation within a buffer: the core's rules and scores, and the edge and regional cuts.

The core cases are computed by hand or against numpy; the daemon cases run a
real state store, in-memory buses and a fake clock (autojump), with a
sign-flipped x100 attacker among honest inputs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import trio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from trio.testing import MockClock, wait_all_tasks_blocked

from fedtier.cli import main
from fedtier.protocol.bus import MemoryBus, Subscription
from fedtier.protocol.codecs import CodecSpec, decode, encode
from fedtier.protocol.envelope import open_envelope
from fedtier.protocol.errors import ConfigError, LocalProtocolError, Reason
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.messages import PartialAggregate, ReceiptStatus, Tier
from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.config import EdgeConfig, RegionalConfig, load_config
from fedtier.tiers.core import (
    AcceptedInput,
    RobustRules,
    TierBuffer,
    build_partial,
    decide_outliers,
    robust_cut,
    robust_mean,
)
from fedtier.tiers.core._robust import outlier_distances, robust_z
from fedtier.tiers.edge import EdgeDaemon
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.regional import RegionalDaemon
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.tiers.store import read_quarantine, release_quarantined
from fedtier.tiers.testing import SimDevice, sign_partial
from tests.unit import test_edge as edge_harness
from tests.unit import test_regional as regional_harness

# -- the core, pure numpy ------------------------------------------------------------------


def test_median_and_trimmed_mean_match_numpy() -> None:
    points = np.random.default_rng(0).standard_normal((7, 40)).astype(np.float32)
    np.testing.assert_array_equal(
        robust_mean(points, RobustRules(rule="median")),
        np.median(points, axis=0).astype(np.float32),
    )
    # trim 0.3 of 7: floor(2.1) = 2 values cut from each end of every coordinate.
    expected = np.sort(points, axis=0)[2:5].mean(axis=0, dtype=np.float64).astype(np.float32)
    np.testing.assert_array_equal(
        robust_mean(points, RobustRules(rule="trimmed_mean", trim=0.3)), expected
    )
    with pytest.raises(LocalProtocolError):
        robust_mean(points, RobustRules())


def test_an_obvious_outlier_scores_as_computed_by_hand() -> None:
    points = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]], dtype=np.float32)
    # centre 3; distances 2 1 0 1 97; their median 1; deviations 1 0 1 0 96: MAD 1.
    distances = outlier_distances(points, np.array([3.0], np.float32), "norm")
    np.testing.assert_array_equal(distances, [2.0, 1.0, 0.0, 1.0, 97.0])
    np.testing.assert_allclose(robust_z(distances), np.array([1, 0, -1, 0, 96]) / 1.4826)
    decision = decide_outliers(points, RobustRules(outlier_score="norm"))
    assert decision.outliers == (4,)
    assert decision.scores[4] == pytest.approx(96 / 1.4826)
    # An operator released it: it stays in, the centre is the same.
    assert decide_outliers(
        points, RobustRules(outlier_score="norm"), exempt=[False] * 4 + [True]
    ) == (replace(decision, outliers=()))
    # Too few inputs to speak of a centre: nothing is scored.
    assert decide_outliers(points[3:], RobustRules(outlier_score="norm")).outliers == ()


def honest_points(n: int, seed: int = 1) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(64)
    return (base + 0.3 * rng.standard_normal((n, 64))).astype(np.float32)


@pytest.mark.parametrize("score", ["norm", "cosine"])
def test_honest_inputs_are_never_outliers_and_a_sign_flip_always_is(score: str) -> None:
    rules = RobustRules(outlier_score=score)  # type: ignore[arg-type]
    for seed in range(20):
        honest = honest_points(12, seed)
        assert decide_outliers(honest, rules).outliers == ()
        attacked = np.vstack([honest, -100 * honest[:1]])
        assert decide_outliers(attacked, rules).outliers == (12,)


def test_identical_inputs_leave_nothing_out_but_a_different_one() -> None:
    same = np.ones((5, 8), np.float32)
    assert decide_outliers(same, RobustRules(outlier_score="norm")).outliers == ()
    same[2] *= -1
    assert decide_outliers(same, RobustRules(outlier_score="cosine")).outliers == (2,)


def test_rules_refuse_values_that_cannot_work() -> None:
    assert not RobustRules().enabled
    assert RobustRules(rule="median").enabled
    assert RobustRules(outlier_score="norm").enabled
    for bad in (
        {"trim": 0.5},
        {"threshold": 0.5},
        {"min_ratio": 0.9},
        {"min_inputs": 2},
        {"rule": "mean"},
    ):
        with pytest.raises(LocalProtocolError):
            RobustRules(**bad)


def _buffer_of(devices: list[SimDevice], deltas: list[npt.NDArray[np.float32]]) -> TierBuffer:
    buffer = TierBuffer(deltas[0].shape[0], keep_inputs=True)
    for i, (device, values) in enumerate(zip(devices, deltas, strict=True)):
        message, _ = device.update(values, n_samples=2 + i, update_id=bytes([i + 1]) * 16, seq=1)
        accepted = AcceptedInput(
            message=message,
            payload=encode(values, message.codec),
            sender=message.sender,
            input_id=message.update_id,
            seq=message.seq,
            tau=0,
            discount=1.0,
            n_samples=float(message.n_samples),
            update_count=1,
            base_version=0,
        )
        buffer.fold(accepted, now=0.0, accepted_ms=0)
    return buffer


def test_robust_cut_is_deterministic_and_exact_where_it_can_be() -> None:
    layout = edge_harness.LAYOUT
    devices = [
        SimDevice(SigningIdentity.from_seed(bytes([90 + i]) * 32), "acme", layout) for i in range(6)
    ]
    base = edge_harness.delta(5)
    deltas = [base + 0.1 * edge_harness.delta(100 + i) for i in range(5)] + [-100 * base]
    rules = RobustRules(rule="median", outlier_score="norm")
    first = robust_cut(_buffer_of(devices, deltas), rules)
    again = robust_cut(_buffer_of(devices, deltas), rules)
    assert first.outliers == again.outliers == (5,)
    assert first.numerator is not None
    assert again.numerator is not None
    np.testing.assert_array_equal(first.numerator, again.numerator)
    # The kept inputs' fields are exact: as if the outlier had never been folded.
    honest = _buffer_of(devices[:5], deltas[:5])
    assert first.accumulator.sample_count == honest.accumulator.sample_count == 2 + 3 + 4 + 5 + 6
    assert list(first.accumulator.input_ids) == list(honest.accumulator.input_ids)
    # Rule none with scoring on: the FedBuff sum of the kept inputs, bit for bit.
    plain = robust_cut(_buffer_of(devices, deltas), RobustRules(outlier_score="norm"))
    assert plain.numerator is None
    np.testing.assert_array_equal(plain.accumulator.numerator, honest.accumulator.numerator)
    # The partial carries the robust numerator and the kept inputs' fields.
    message, _ = build_partial(
        first.accumulator,
        identity=edge_harness.EDGE,
        fleet="acme",
        tier=Tier.EDGE,
        known_version=0,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        codec=CodecSpec("f32"),
        seq=1,
        created_ms=0,
        numerator=first.numerator,
    )
    assert message.inputs == tuple(honest.accumulator.input_ids)
    # Nothing is kept while the rules are off (the simulator's and the default path).
    assert TierBuffer(layout.num_params).keep_inputs is False


# -- the edge: device updates ----------------------------------------------------------------

EDGE_DEVICES = [
    SimDevice(SigningIdentity.from_seed(bytes([120 + i]) * 32), "acme", edge_harness.LAYOUT)
    for i in range(8)
]
ATTACKER_ID = b"\xee" * 16


def robust_edge(site: edge_harness.Site) -> EdgeDaemon:
    registry = KeyRegistry.from_keys(
        {f"veh-{i}": d.identity.verify_key for i, d in enumerate(EDGE_DEVICES)}, role="device"
    )
    return EdgeDaemon(
        site.config,
        mqtt=MemoryBus(site.mqtt),
        nats=MemoryBus(site.nats),
        registry_store=site.registry,
        keys=TierKeys(edge_harness.EDGE, registry, edge_harness.CENTRAL.verify_key),
        metrics=site.metrics,
        clock_ms=lambda: 1_764_288_000_000,
        store_in_thread=False,
    )


def point_of_update(values: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.float32]:
    """An update's point as the edge folds it: ``n * delta / n`` in float32."""
    acc = Accumulator(values.shape[0])
    acc.fold_update(b"\x01" * 16, values, n_samples=n, tau=0, discount=1.0, base_version=0)
    return acc.numerator / np.float32(acc.sample_count)


async def test_edge_median_quarantines_a_sign_flipped_attacker_and_loses_nothing(
    tmp_path: Path, autojump_clock: MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = edge_harness.make_config(
        tmp_path,
        flush=FlushPolicy(max_inputs=8, max_age_s=None),
        robust=RobustRules(rule="median", outlier_score="norm"),
    )
    site = edge_harness.Site(tmp_path, config)
    await site.publish_model(0)
    base = edge_harness.delta(7)
    honest = [base + 0.1 * edge_harness.delta(200 + i) for i in range(7)]
    updates = [
        (
            EDGE_DEVICES[i],
            *EDGE_DEVICES[i].update(v, n_samples=3 + i, update_id=bytes([i + 1]) * 16),
        )
        for i, v in enumerate(honest)
    ]
    attack = EDGE_DEVICES[7].update(-100 * base, n_samples=5, update_id=ATTACKER_ID)
    order = [*updates[:4], (EDGE_DEVICES[7], *attack), *updates[4:]]
    upstream = MemoryBus(site.nats)
    async with upstream.subscribe(
        edge_harness.SUBJECTS.to_region(edge_harness.REGION), durable="probe"
    ) as partials:
        async with trio.open_nursery() as nursery:
            edge = robust_edge(site)
            await nursery.start(edge.serve)
            for device, _, data in order[:5]:  # the attacker's among them
                receipt = await edge_harness.send_and_receipt(
                    edge_harness.Phone(site, device), data
                )
                assert receipt.status is ReceiptStatus.ACCEPTED
            nursery.cancel_scope.cancel()  # crash: the cut must come out of a refold
        async with trio.open_nursery() as nursery:
            edge = robust_edge(site)
            edge.tracer = provider.get_tracer("test")
            await nursery.start(edge.serve)
            assert len(edge.buffer.inputs) == 5
            for device, _, data in order[5:]:
                await edge_harness.send_and_receipt(edge_harness.Phone(site, device), data)
            partial, payload, _ = await edge_harness.receive_partial(partials)
            await wait_all_tasks_blocked()
            await trio.sleep(1)  # virtual: the cut's commit
            (row,) = read_quarantine(config.store_path)
            assert (row.reason, row.retry, row.input_id) == ("outlier", "never", ATTACKER_ID)
            assert row.envelope == attack[1]
            assert edge.store.quarantine_usage.by_reason == {"outlier": 1}
            # Nothing acknowledged is lost: every update is in the partial or the quarantine.
            assert set(partial.inputs) | {row.input_id} == {m.update_id for _, m, _ in order}
            assert edge_harness.stored_update_ids(config.store_path).isdisjoint({ATTACKER_ID})
            # The operator looks, releases it (docs/operations.md), and the pass that
            # SIGHUP runs folds it again; it is never scored as an outlier again.
            state = str(config.state_dir)
            assert main(["quarantine", "list", "--state-dir", state, "--json"]) == 0
            (listed,) = json.loads(capsys.readouterr().out)["inputs"]
            assert (listed["reason"], listed["input_id"]) == ("outlier", ATTACKER_ID.hex())
            assert main(["quarantine", "release", "--state-dir", state, str(row.qid)]) == 0
            assert edge.readmit_quarantined() == 1
            assert [kept.exempt for kept in edge.buffer.inputs] == [True]
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            edge = robust_edge(site)
            await nursery.start(edge.serve)
            # Its release survives a crash: the refold keeps it exempt.
            assert [kept.exempt for kept in edge.buffer.inputs] == [True]
            assert read_quarantine(config.store_path) == []
            nursery.cancel_scope.cancel()
    provider.shutdown()
    assert list(partial.inputs) == [m.update_id for _, m, _ in updates]
    assert partial.sample_count == sum(range(3, 10))
    assert partial.update_count == 7
    points = np.stack([point_of_update(v, 3 + i) for i, v in enumerate(honest)])
    expected = np.median(points, axis=0).astype(np.float32) * np.float32(partial.sample_count)
    numerator = decode(payload, partial.codec, partial.num_params)
    np.testing.assert_allclose(numerator, expected, rtol=1e-6)
    assert site.metrics.anomalies["outlier"] == 1
    aggregate = next(s for s in exporter.get_finished_spans() if s.name == "edge aggregate")
    assert aggregate.attributes is not None
    assert list(aggregate.attributes["fedtier.robust.outliers"]) == [ATTACKER_ID.hex()]  # type: ignore[arg-type]
    assert [event.name for event in aggregate.events] == ["outlier"]


# -- the regional: child partials --------------------------------------------------------------

EDGE_KEYS = [SigningIdentity.from_seed(bytes([150 + i]) * 32) for i in range(5)]


def robust_regional(region: regional_harness.Region) -> RegionalDaemon:
    registry = KeyRegistry.from_keys(
        {f"edge-{i}": e.verify_key for i, e in enumerate(EDGE_KEYS)}, role="edge"
    )
    return RegionalDaemon(
        region.config,
        nats=MemoryBus(region.nats),
        registry_store=region.registry,
        keys=TierKeys(regional_harness.REGIONAL, registry, regional_harness.CENTRAL.verify_key),
        metrics=region.metrics,
        clock_ms=lambda: 1_764_288_000_000,
        store_in_thread=False,
    )


def child(first: int, values: list[npt.NDArray[np.float32]]) -> Accumulator:
    acc = Accumulator(regional_harness.LAYOUT.num_params)
    for i, v in enumerate(values):
        acc.fold_update(
            (first * 100 + i).to_bytes(16, "big"),
            v,
            n_samples=2 + i,
            tau=0,
            discount=1.0,
            base_version=0,
        )
    return acc


async def receive_regional(sub: Subscription) -> tuple[PartialAggregate, npt.NDArray[np.float32]]:
    delivery = await sub.receive()
    await delivery.ack()
    keys = {regional_harness.REGIONAL.key_id: regional_harness.REGIONAL.verify_key}
    envelope = open_envelope(delivery.payload, keys)
    assert isinstance(envelope.message, PartialAggregate)
    message = envelope.message
    return message, decode(envelope.payload, message.codec, message.num_params)


async def test_regional_trimmed_mean_quarantines_a_hostile_partial_until_released(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    config = regional_harness.make_config(
        tmp_path,
        flush=FlushPolicy(max_inputs=5, max_age_s=None),
        robust=RobustRules(rule="trimmed_mean", trim=0.25, outlier_score="cosine"),
    )
    region = regional_harness.Region(tmp_path, config)
    await region.publish_model(0)
    base = regional_harness.delta(3)

    def near(seed: int) -> npt.NDArray[np.float32]:
        return (base + 0.1 * regional_harness.delta(seed)).astype(np.float32)

    children = [child(i + 1, [near(10 * i + j) for j in range(2)]) for i in range(4)]
    hostile = child(9, [-100 * base, -100 * base])
    signed = [
        sign_partial(EDGE_KEYS[i], "acme", regional_harness.LAYOUT, acc, seq=1)
        for i, acc in enumerate([*children, hostile])
    ]
    up = MemoryBus(region.nats)
    async with up.subscribe(regional_harness.SUBJECTS.to_central(), durable="probe") as central:
        async with trio.open_nursery() as nursery:
            regional = robust_regional(region)
            await nursery.start(regional.serve)
            for _, data in [signed[0], signed[4], *signed[1:4]]:
                await region.send(data)
            first, numerator = await receive_regional(central)
            await trio.sleep(1)  # virtual: the cut's commit
            (row,) = read_quarantine(config.store_path)
            assert (row.reason, row.input_id) == (Reason.OUTLIER.value, signed[4][0].partial_id)
            # Released: re-admitted through the core, exempt from then on, even after a crash.
            release_quarantined(config.store_path, [row.qid])
            assert regional.readmit_quarantined() == 1
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            regional = robust_regional(region)
            await nursery.start(regional.serve)
            assert [kept.exempt for kept in regional.buffer.inputs] == [True]
            again = [
                sign_partial(
                    EDGE_KEYS[i], "acme", regional_harness.LAYOUT, child(20 + i, [base]), seq=2
                )
                for i in range(4)
            ]
            for _, data in again:
                await region.send(data)
            second, _ = await receive_regional(central)
            await trio.sleep(1)
            assert regional.store.robust_exempt() == set()
            nursery.cancel_scope.cancel()
    assert list(first.inputs) == [signed[i][0].partial_id for i in range(4)]
    assert first.sample_count == sum(c.sample_count for c in children)
    assert list(first.leaves) == [leaf for c in children for leaf in c.leaf_ids]
    points = np.stack([c.numerator / np.float32(c.sample_count) for c in children])
    # 4 kept, trim 0.25: the largest and smallest value of each coordinate are cut.
    expected = np.sort(points, axis=0)[1:3].mean(axis=0, dtype=np.float64).astype(np.float32)
    np.testing.assert_allclose(numerator, expected * np.float32(first.sample_count), rtol=1e-6)
    assert second.inputs[0] == signed[4][0].partial_id
    assert second.update_count == 2 + 4
    assert read_quarantine(config.store_path) == []
    assert region.metrics.anomalies["outlier"] == 1


# -- configuration ------------------------------------------------------------------------------

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_robust_table_is_read_checked_and_refused_at_the_central(tmp_path: Path) -> None:
    edge_text = (DEPLOY / "edge.example.toml").read_text()
    path = tmp_path / "edge.toml"
    # The example's commented lines, uncommented, are a working table.
    path.write_text(
        edge_text.replace("# [robust]", "[robust]")
        .replace("# rule =", "rule =")
        .replace("# outlier_score =", "outlier_score =")
        .replace("# threshold =", "threshold =", 1)
    )
    config = load_config("edge", path)
    assert isinstance(config, EdgeConfig)
    assert config.robust == RobustRules(rule="median", outlier_score="norm", threshold=3.5)
    example = load_config("edge", DEPLOY / "edge.example.toml")
    assert isinstance(example, EdgeConfig)
    assert example.robust == RobustRules()
    regional = tmp_path / "regional.toml"
    regional.write_text(
        (DEPLOY / "regional.example.toml").read_text()
        + '\n[robust]\nrule = "trimmed_mean"\ntrim = 0.2\noutlier_score = "cosine"\n'
    )
    loaded = load_config("regional", regional)
    assert isinstance(loaded, RegionalConfig)
    assert loaded.robust == RobustRules(rule="trimmed_mean", trim=0.2, outlier_score="cosine")
    for bad, message in (
        ('rule = "mean"', "robust.rule is 'mean'"),
        ("trim = 0.5", "robust.trim is 0.5"),
        ("threshold = 0.5", "robust.threshold is 0.5"),
        ("min_inputs = 2", "robust.min_inputs is 2"),
    ):
        regional.write_text((DEPLOY / "regional.example.toml").read_text() + f"\n[robust]\n{bad}\n")
        with pytest.raises(ConfigError, match=message):
            load_config("regional", regional)
    central = tmp_path / "central.toml"
    central.write_text(
        (DEPLOY / "central.example.toml").read_text() + '\n[robust]\nrule = "median"\n'
    )
    with pytest.raises(ConfigError, match="robust"):
        load_config("central", central)
