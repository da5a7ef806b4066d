from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from fedtier.cli import main
from fedtier.protocol.bus import MemoryBroker, MemoryBus
from fedtier.protocol.codecs import decode
from fedtier.protocol.envelope import open_envelope, payload_digest
from fedtier.protocol.errors import ConfigError, RegistryConflict
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.messages import ModelAnnouncement, ModelBlob, Tier
from fedtier.protocol.names import NatsSubjects
from fedtier.simulations.testing import RecordingMetrics, sign_partial
from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.central import CentralDaemon, ModelEvaluator
from fedtier.tiers.config import (
    CentralConfig,
    EvaluationSettings,
    EvaluationTarget,
    load_initial_model,
)
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.model_registry import MemoryModelRegistry
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.tiers.staleness import StalenessPolicy
from fedtier.tiers.store import open_state_store, read_stored_versions, read_target_reached

FLEET = "acme"
CENTRAL = SigningIdentity.from_seed(b"\x01" * 32)
REGIONALS = [SigningIdentity.from_seed(bytes([50 + i]) * 32) for i in range(2)]
SUBJECTS = NatsSubjects(FLEET)
KEYS = {CENTRAL.key_id: CENTRAL.verify_key}


def write_initial_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "fc1.weight": rng.standard_normal((3, 2)).astype(np.float32),
        "fc1.bias": np.zeros(3, np.float32),
        "out.weight": rng.standard_normal((1, 3)).astype(np.float32),
    }
    np.savez(path, **arrays)  # type: ignore[arg-type]


@dataclass
class Hub:
    tmp: Path
    config: CentralConfig
    nats: MemoryBroker = field(default_factory=lambda: MemoryBroker("nats"))
    registry: MemoryModelRegistry = field(default_factory=MemoryModelRegistry)
    metrics: RecordingMetrics = field(default_factory=RecordingMetrics)
    evaluator: ModelEvaluator | None = None

    def daemon(self) -> CentralDaemon:
        keys = TierKeys(
            CENTRAL,
            KeyRegistry.from_keys(
                {f"regional-{i}": r.verify_key for i, r in enumerate(REGIONALS)}, role="regional"
            ),
            CENTRAL.verify_key,
        )
        return CentralDaemon(
            self.config,
            nats=MemoryBus(self.nats),
            registry=self.registry,
            keys=keys,
            metrics=self.metrics,
            clock_ms=lambda: 1_764_288_000_000,
            store_in_thread=False,
            evaluator=self.evaluator,
        )

    async def send(self, data: bytes) -> None:
        await MemoryBus(self.nats).publish(SUBJECTS.to_central(), data)

    @property
    def layout(self) -> ModelLayout:
        return load_initial_model(self.config.initial_model)[0]


def make_config(tmp: Path, **overrides: Any) -> CentralConfig:
    model = tmp / "init.npz"
    if not model.exists():
        write_initial_model(model)
    base = CentralConfig(
        fleet=FLEET,
        identity_key=tmp / "unused.pem",
        state_dir=tmp / "central",
        central_key=CENTRAL.verify_key.raw.hex(),
        initial_model=model,
        flush=FlushPolicy(max_inputs=2, max_age_s=None),
        staleness=StalenessPolicy(max_staleness=4),
        commit_window_s=0.001,
    )
    return replace(base, **overrides)


@pytest.fixture
def hub(tmp_path: Path) -> Hub:
    return Hub(tmp_path, make_config(tmp_path))


def regional_buffer(seed: int, count: int, layout: ModelLayout) -> Accumulator:
    rng = np.random.default_rng(seed)
    acc = Accumulator(layout.num_params)
    for i in range(count):
        acc.fold_update(
            (seed * 1000 + i).to_bytes(16, "big"),
            rng.standard_normal(layout.num_params).astype(np.float32),
            n_samples=2 + i,
            tau=0,
            discount=1.0,
            base_version=0,
        )
    return acc


async def current_model(
    registry: MemoryModelRegistry,
) -> tuple[ModelAnnouncement, ModelBlob, np.ndarray]:
    pointer_bytes = await registry.current_pointer()
    assert pointer_bytes is not None
    pointer = open_envelope(pointer_bytes, KEYS).message
    assert isinstance(pointer, ModelAnnouncement)
    blob_bytes = await registry.blob(pointer.version)
    assert blob_bytes is not None
    envelope = open_envelope(blob_bytes, KEYS)
    blob = envelope.message
    assert isinstance(blob, ModelBlob)
    assert payload_digest(envelope.payload) == pointer.blob_blake3
    return pointer, blob, decode(envelope.payload, blob.codec, blob.num_params)


async def test_version_zero_is_published_once_from_the_initial_model(
    hub: Hub, autojump_clock: MockClock
) -> None:
    layout, params0 = load_initial_model(hub.config.initial_model)
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        await trio.sleep(0.1)  # past the commit window
        pointer, blob, params = await current_model(hub.registry)
        assert pointer.version == 0
        assert blob.tensors == layout
        np.testing.assert_array_equal(params, params0)
        assert central.lineage(0) == []
        nursery.cancel_scope.cancel()
    first_pointer = await hub.registry.current_pointer()
    file_bytes = (hub.config.state_dir / "models" / "v0.blob").read_bytes()
    assert open_envelope(file_bytes, KEYS).message.version == 0  # type: ignore[union-attr]
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        await wait_all_tasks_blocked()
        assert central.version == 0
        nursery.cancel_scope.cancel()
    assert await hub.registry.current_pointer() == first_pointer


async def test_two_partials_make_version_one_with_fedavg(
    hub: Hub, autojump_clock: MockClock
) -> None:
    layout, params0 = load_initial_model(hub.config.initial_model)
    a, b = regional_buffer(1, 3, layout), regional_buffer(2, 2, layout)
    pa, data_a = sign_partial(REGIONALS[0], FLEET, layout, a, tier=Tier.REGIONAL)
    pb, data_b = sign_partial(REGIONALS[1], FLEET, layout, b, tier=Tier.REGIONAL)
    announcements = MemoryBus(hub.nats)
    async with announcements.subscribe(SUBJECTS.model_announce()) as announced:
        async with trio.open_nursery() as nursery:
            central = hub.daemon()
            await nursery.start(central.serve)
            await hub.send(data_a)
            await hub.send(data_a)  # a resend is deduplicated
            await hub.send(data_b)
            for _ in range(2):
                delivery = await announced.receive()
            await wait_all_tasks_blocked()
            assert central.counts[("duplicate", "")] == 1
            pointer, _blob, params1 = await current_model(hub.registry)
            assert pointer.version == 1
            assert pointer.update_count == 5
            assert sorted(central.lineage(1)) == sorted([*a.leaf_ids, *b.leaf_ids])
            nursery.cancel_scope.cancel()
    # The announcement on NATS is the same signed pointer, verifiable with the central key.
    assert open_envelope(delivery.payload, KEYS).message == pointer
    flat = Accumulator(layout.num_params)
    flat.fold_child(pa.partial_id, a, extra_tau=0, discount=1.0)
    flat.fold_child(pb.partial_id, b, extra_tau=0, discount=1.0)
    # FedAvg with lr = 1: model_1 = model_0 + aggregate.
    np.testing.assert_allclose(params1, params0 + flat.result(), rtol=1e-6, atol=1e-7)
    assert (hub.config.state_dir / "models" / "v1.blob").exists()


async def test_partial_from_an_older_version_is_discounted(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    hub = Hub(tmp_path, make_config(tmp_path, flush=FlushPolicy(max_inputs=1, max_age_s=None)))
    layout, _params0 = load_initial_model(hub.config.initial_model)
    first, late = regional_buffer(3, 1, layout), regional_buffer(4, 1, layout)
    _, data_first = sign_partial(REGIONALS[0], FLEET, layout, first, tier=Tier.REGIONAL)
    _, data_late = sign_partial(REGIONALS[1], FLEET, layout, late, tier=Tier.REGIONAL)
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        await hub.send(data_first)
        await wait_all_tasks_blocked()
        await trio.sleep(0.1)
        assert central.version == 1
        _, _, params1 = await current_model(hub.registry)
        await hub.send(data_late)  # made at v0, arrives at v1: extra_tau = 1
        await trio.sleep(0.1)
        assert central.version == 2
        _, _, params2 = await current_model(hub.registry)
        nursery.cancel_scope.cancel()
    discount = np.float32(1 / math.sqrt(2))
    expected = params1 + (late.numerator * discount) / np.float32(late.sample_count)
    np.testing.assert_allclose(params2, expected, rtol=1e-6, atol=1e-7)


async def test_restart_resumes_version_and_adaptive_optimizer_state(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    config = make_config(
        tmp_path,
        flush=FlushPolicy(max_inputs=1, max_age_s=None),
        optimizer_name="fedadam",
        optimizer_params={"lr": 0.1},
    )
    layout, _ = load_initial_model(config.initial_model)
    buffers = [regional_buffer(10 + i, 1, layout) for i in range(2)]
    datas = [
        sign_partial(REGIONALS[i], FLEET, layout, buffers[i], tier=Tier.REGIONAL)[1]
        for i in range(2)
    ]

    straight = Hub(tmp_path / "a", replace(config, state_dir=tmp_path / "a"))
    async with trio.open_nursery() as nursery:
        await nursery.start(straight.daemon().serve)
        for data in datas:
            await straight.send(data)
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    params_straight = (await current_model(straight.registry))[2]

    restarted = Hub(tmp_path / "b", replace(config, state_dir=tmp_path / "b"))
    async with trio.open_nursery() as nursery:
        central = restarted.daemon()
        await nursery.start(central.serve)
        await restarted.send(datas[0])
        await trio.sleep(0.1)
        central.request_shutdown()
    async with trio.open_nursery() as nursery:
        central = restarted.daemon()
        await nursery.start(central.serve)
        assert central.version == 1
        assert central.optimizer.state_arrays()  # m and v came back from the store
        await restarted.send(datas[1])
        await trio.sleep(0.1)
        assert central.version == 2
        nursery.cancel_scope.cancel()
    params_restarted = (await current_model(restarted.registry))[2]
    np.testing.assert_array_equal(params_restarted, params_straight)


async def test_a_central_on_an_empty_store_refuses_to_start_behind_the_registry(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    config = make_config(tmp_path, flush=FlushPolicy(max_inputs=1, max_age_s=None))
    layout, _ = load_initial_model(config.initial_model)
    _, data = sign_partial(REGIONALS[0], FLEET, layout, regional_buffer(5, 1, layout))
    active = Hub(tmp_path, config)
    async with trio.open_nursery() as nursery:
        central = active.daemon()
        await nursery.start(central.serve)
        await active.send(data)
        await trio.sleep(0.1)
        assert central.version == 1
        nursery.cancel_scope.cancel()
    published = await active.registry.current_pointer()

    # A second central (same key, same fleet) on an empty state directory would
    # sign another v0 and v1; it must not start at all.
    second = Hub(tmp_path, replace(config, state_dir=tmp_path / "fresh"), registry=active.registry)
    with pytest.RaisesGroup(
        pytest.RaisesExc(RegistryConflict, match=r"v1\b.*holds no version"),
        flatten_subgroups=True,
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(second.daemon().serve)
    assert await active.registry.current_pointer() == published
    assert sorted(active.registry._blobs) == [0, 1]  # nothing of the second central's


async def test_a_pointer_moved_by_another_writer_stops_the_central(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    config = make_config(tmp_path, flush=FlushPolicy(max_inputs=1, max_age_s=None))
    layout, _ = load_initial_model(config.initial_model)
    _, data_a = sign_partial(REGIONALS[0], FLEET, layout, regional_buffer(6, 1, layout))
    _, data_b = sign_partial(REGIONALS[1], FLEET, layout, regional_buffer(7, 1, layout))
    # Another central of the fleet (the same key: a split brain, not a forgery)
    # made its own v1 from other inputs.
    other = Hub(tmp_path / "other", replace(config, state_dir=tmp_path / "other"))
    async with trio.open_nursery() as nursery:
        await nursery.start(other.daemon().serve)
        await other.send(data_b)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    foreign_v1 = await other.registry.current_pointer()
    assert foreign_v1 is not None

    hub = Hub(tmp_path, config)
    central = hub.daemon()
    with pytest.RaisesGroup(
        pytest.RaisesExc(
            RegistryConflict,
            match=r"cannot publish model v1: the registry holds v1 this central did not write",
        ),
        allow_unwrapped=True,
        flatten_subgroups=True,
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(central.serve)
            await trio.sleep(0.1)  # past the commit window: v0 is published
            pointer0 = await hub.registry.current_pointer()
            assert pointer0 is not None
            await central.move_pointer(0, pointer0)  # the same pointer again: a no-op
            await hub.registry.put_current(1, foreign_v1)
            await hub.send(data_a)
            await trio.sleep(10)
    # The central stored its own v1 but never overwrote the other's pointer.
    assert central.version == 1
    assert await hub.registry.current_pointer() == foreign_v1


def test_central_identity_must_be_the_pinned_key(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    keys = TierKeys(REGIONALS[0], KeyRegistry(), CENTRAL.verify_key)
    with pytest.raises(ConfigError, match="pins"):
        CentralDaemon(
            config, nats=MemoryBus(MemoryBroker()), registry=MemoryModelRegistry(), keys=keys
        )


# -- evaluation ---------------------------------------------------------------------------


class NormEvaluator:
    """Scores a version by its parameters' norm, and remembers what it was shown."""

    def __init__(self, fail_on: frozenset[int] = frozenset()) -> None:
        self.seen: dict[int, np.ndarray] = {}
        self.fail_on = fail_on

    def __call__(self, version: int, params: np.ndarray) -> dict[str, float]:
        assert not params.flags.writeable  # the central's model is not the evaluator's to change
        self.seen[version] = params.copy()
        if version in self.fail_on:
            raise RuntimeError(f"held-out data unreadable at v{version}")
        return {"accuracy": float(np.linalg.norm(params)), "loss": float(version)}


def evaluation(**overrides: Any) -> EvaluationSettings:
    base = EvaluationSettings(model="tests:unused", data="tests:unused")
    return replace(base, **overrides)


def partials(layout: ModelLayout, count: int, *, seed: int = 20) -> list[bytes]:
    out = []
    for i in range(count):
        acc = regional_buffer(seed + i, 1, layout)
        out.append(sign_partial(REGIONALS[i % 2], FLEET, layout, acc, tier=Tier.REGIONAL)[1])
    return out


async def test_the_evaluator_records_metrics_per_version(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    config = make_config(
        tmp_path,
        flush=FlushPolicy(max_inputs=1, max_age_s=None),
        evaluation=evaluation(every_versions=2),
    )
    evaluator = NormEvaluator()
    hub = Hub(tmp_path, config, evaluator=evaluator)
    datas = partials(hub.layout, 3)
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        for data in datas:
            await hub.send(data)
            await trio.sleep(0.1)
        assert central.version == 3
        _, _, params3 = await current_model(hub.registry)
        nursery.cancel_scope.cancel()
    # Every second version: v0 and v2, each with the parameters it was published with.
    assert sorted(evaluator.seen) == [0, 2]
    params0 = load_initial_model(config.initial_model)[1]
    np.testing.assert_array_equal(evaluator.seen[0], params0)
    stored = {v.version: dict(v.metrics) for v in read_stored_versions(config.store_path)}
    assert stored[0] == {"accuracy": pytest.approx(float(np.linalg.norm(params0))), "loss": 0.0}
    assert stored[1] == {}
    assert stored[3] == {}
    assert stored[2]["loss"] == 2.0
    assert hub.metrics.evaluations == {0: stored[0], 2: stored[2]}  # the gauge's feed
    assert central.evaluation_failures == 0
    # A restart evaluates the current version, which had no metrics (v3 is not due).
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    np.testing.assert_array_equal(evaluator.seen[3], params3)
    assert read_stored_versions(config.store_path)[3].metrics["loss"] == 3.0


async def test_a_failing_evaluator_never_loses_a_version(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    config = make_config(tmp_path, flush=FlushPolicy(max_inputs=1, max_age_s=None))

    def evaluator(version: int, params: np.ndarray) -> dict[str, float]:
        if version == 1:
            raise RuntimeError("out of memory")
        if version == 2:
            return {"accuracy": float("nan")}
        return {"accuracy": 0.5}

    hub = Hub(tmp_path, config, evaluator=evaluator)
    datas = partials(hub.layout, 3)
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        for data in datas:
            await hub.send(data)
            await trio.sleep(0.1)
        pointer, _, _ = await current_model(hub.registry)
        assert pointer.version == central.version == 3
        assert central.evaluation_failures == 2
        nursery.cancel_scope.cancel()
    assert hub.metrics.calls["evaluation_failed"] == 2
    versions = read_stored_versions(config.store_path)
    assert [v.version for v in versions] == [0, 1, 2, 3]
    assert all(v.record.published for v in versions)
    assert [dict(v.metrics) for v in versions] == [
        {"accuracy": 0.5},
        {},
        {},
        {"accuracy": 0.5},
    ]
    for version in range(4):
        assert (config.state_dir / "models" / f"v{version}.blob").exists()


async def test_a_reached_target_stops_new_versions_until_it_is_raised(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    target = EvaluationTarget("loss", 1.0)  # loss <= 1: met by v1 (loss = version)
    config = make_config(
        tmp_path,
        flush=FlushPolicy(max_inputs=1, max_age_s=1.0),
        evaluation=evaluation(target=target),
    )
    hub = Hub(tmp_path, config, evaluator=NormEvaluator())
    datas = partials(hub.layout, 4)
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        await trio.sleep(0.1)
        assert central.target_reached is not None  # v0 has loss 0
        nursery.cancel_scope.cancel()
    # Raise the bar past v0 (loss < 0 is never met): it makes versions again.
    hub = Hub(
        tmp_path,
        replace(config, evaluation=evaluation(target=EvaluationTarget("loss", -1.0))),
        evaluator=NormEvaluator(),
    )
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        await trio.sleep(0.1)
        assert central.target_reached is None
        await hub.send(datas[0])
        await trio.sleep(0.1)
        assert central.version == 1
        nursery.cancel_scope.cancel()
    assert read_target_reached(config.store_path) is None
    # Back to loss <= 1: v1 meets it, so the next partials are kept, not made into v2.
    hub = Hub(tmp_path, config, evaluator=NormEvaluator())
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        await trio.sleep(0.1)
        assert central.target_reached is not None
        assert central.target_reached.version == 1
        for data in datas[1:3]:
            await hub.send(data)
        await trio.sleep(10.0)  # past the flush deadline: it must not spin or cut
        assert central.version == 1
        assert central.counts[("accepted", "")] == 2
        central.request_shutdown()
    reached = read_target_reached(config.store_path)
    assert reached is not None
    assert (reached.version, reached.metric, reached.target) == (1, "loss", 1.0)
    async with open_state_store(config.store_path) as store:
        assert len((await store.recover()).open_inputs) == 2  # kept, acknowledged
    # A restart with the same target stays stopped.
    hub = Hub(tmp_path, config, evaluator=NormEvaluator())
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        await trio.sleep(5.0)
        assert central.version == 1
        nursery.cancel_scope.cancel()
    # Removing the target resumes: the kept inputs make v2.
    hub = Hub(tmp_path, replace(config, evaluation=evaluation()), evaluator=NormEvaluator())
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        await trio.sleep(5.0)
        assert central.version == 2
        assert central.lineage(2)  # the two kept partials
        nursery.cancel_scope.cancel()
    assert read_target_reached(config.store_path) is None


def test_model_metrics_are_a_gauge_on_the_metrics_endpoint() -> None:
    import urllib.request

    from fedtier.protocol.telemetry.metrics import TierMetrics, setup_metrics

    with setup_metrics(prometheus_port=0, set_global=False) as handle:
        assert handle.port is not None
        metrics = TierMetrics("central", "c1", handle.meter_provider)
        metrics.model_metrics(4, {"accuracy": 0.5, "loss": 1.25})
        metrics.model_metrics(6, {"accuracy": 0.75, "loss": 1.0})  # the newest evaluation wins
        metrics.evaluation_failed()
        url = f"http://127.0.0.1:{handle.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read().decode()
    labels = 'fedtier_instance="c1",metric="accuracy",tier="central"'
    assert f"fedtier_model_metric{{{labels}}} 0.75" in body
    assert 'fedtier_model_metric_version{fedtier_instance="c1",tier="central"} 6.0' in body
    assert 'fedtier_evaluation_failures_total{fedtier_instance="c1",tier="central"} 1.0' in body


async def test_hostile_partials_leave_the_central_running_and_lose_nothing(
    hub: Hub, autojump_clock: MockClock
) -> None:
    # Repeated inputs (malformed), sample counts that sum to inf, an unknown
    # regional: the central keeps serving, acknowledges each, quarantines what it
    # cannot fold and folds the rest; no version is dropped.
    from fedtier.protocol.codecs import encode
    from fedtier.protocol.envelope import seal
    from fedtier.tiers.store import read_quarantine

    layout = hub.layout
    a, b, c = (regional_buffer(seed, 2, layout) for seed in (60, 61, 62))
    ma, _ = sign_partial(REGIONALS[0], FLEET, layout, a, tier=Tier.REGIONAL)
    twice = replace(ma, inputs=(ma.inputs[0], ma.inputs[0]))
    huge = [
        replace(
            sign_partial(REGIONALS[i], FLEET, layout, acc, tier=Tier.REGIONAL)[0],
            sample_count=1e308,
        )
        for i, acc in enumerate((b, c))
    ]
    stranger = SigningIdentity.from_seed(b"\x99" * 32)
    _, data_unknown = sign_partial(stranger, FLEET, layout, a, tier=Tier.REGIONAL)
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        await hub.send(seal(twice, encode(np.asarray(a.numerator), twice.codec), REGIONALS[0]))
        await hub.send(data_unknown)
        for message, acc, signer in zip(huge, (b, c), REGIONALS, strict=True):
            await hub.send(seal(message, encode(np.asarray(acc.numerator), message.codec), signer))
        await wait_all_tasks_blocked()
        await trio.sleep(1)
        central.request_shutdown()  # the clean shutdown makes a version of what is open
    versions = read_stored_versions(hub.config.store_path)
    leaves = {leaf for v in versions for leaf in v.record.lineage}
    assert central.counts[("rejected", "malformed")] == 1
    assert central.counts[("rejected", "unknown_sender")] == 1
    assert central.counts[("accepted", "")] == 2
    # Each 1e308 partial made a version of its own (the second would have overflowed).
    assert [v.record.update_count for v in versions] == [0, 2, 2]
    assert leaves == {*b.leaf_ids, *c.leaf_ids}
    reasons = sorted(r.reason for r in read_quarantine(hub.config.store_path))
    assert reasons == ["malformed", "unknown_sender"]
    assert not hub.nats._queues[SUBJECTS.central_consumer()].pending


async def test_old_versions_lose_their_parameters_past_keep_versions_and_nothing_else(
    tmp_path: Path, autojump_clock: MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    config = make_config(tmp_path, flush=FlushPolicy(max_inputs=1, max_age_s=None), keep_versions=2)
    hub = Hub(tmp_path, config)
    layout, _ = load_initial_model(config.initial_model)
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        for seed in range(4):
            _, data = sign_partial(
                REGIONALS[seed % 2],
                FLEET,
                layout,
                regional_buffer(20 + seed, 1, layout),
                seq=seed + 1,
            )
            await hub.send(data)
            await trio.sleep(0.1)
        assert central.version == 4
        await trio.sleep(0.1)  # past the commit window of the last prune
        nursery.cancel_scope.cancel()
    # v4 published: the two newest (v3, v4) keep their parameters everywhere.
    assert sorted(hub.registry._blobs) == [3, 4]
    models = config.state_dir / "models"
    assert sorted(p.name for p in models.iterdir()) == ["v3.blob", "v4.blob"]
    stored = read_stored_versions(config.store_path)
    assert [(s.version, bool(s.record.blob)) for s in stored] == [
        (0, False),
        (1, False),
        (2, False),
        (3, True),
        (4, True),
    ]
    # Pointer and lineage stay: which updates made v2 is still answered.
    assert all(s.record.pointer for s in stored)
    assert len(stored[2].record.lineage) == 1
    # The central starts again on the pruned store and serves v4.
    async with trio.open_nursery() as nursery:
        central = hub.daemon()
        await nursery.start(central.serve)
        assert central.version == 4
        nursery.cancel_scope.cancel()
    # fedtier model says what happened, in one sentence.
    assert main(["model", "show", "1", "--state-dir", str(config.state_dir)]) == 2
    assert "parameters were pruned" in capsys.readouterr().err
