from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from fedtier.protocol.bus import MemoryBroker, MemoryBus, Subscription
from fedtier.protocol.codecs import decode
from fedtier.protocol.envelope import open_envelope
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import layout_of
from fedtier.protocol.messages import PartialAggregate, Tier
from fedtier.protocol.names import NatsSubjects
from fedtier.simulations.testing import RecordingMetrics, sign_model_version, sign_partial
from fedtier.tiers.aggregate import Accumulator, partial_id
from fedtier.tiers.config import RegionalConfig
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.model_registry import MemoryModelRegistry
from fedtier.tiers.regional import RegionalDaemon
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.tiers.staleness import StalenessPolicy
from fedtier.tiers.store import read_quarantine

FLEET, REGION = "acme", "eu"
LAYOUT = layout_of([("w", (3, 2)), ("b", (2,))])
CENTRAL = SigningIdentity.from_seed(b"\x01" * 32)
REGIONAL = SigningIdentity.from_seed(b"\x03" * 32)
EDGES = [SigningIdentity.from_seed(bytes([40 + i]) * 32) for i in range(3)]
STRANGER = SigningIdentity.from_seed(b"\x77" * 32)
SUBJECTS = NatsSubjects(FLEET)


def delta(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(LAYOUT.num_params).astype(np.float32)


def edge_buffer(first_seed: int, count: int, *, base_version: int = 0) -> Accumulator:
    acc = Accumulator(LAYOUT.num_params, hist_buckets=32)
    for i in range(count):
        acc.fold_update(
            (first_seed * 100 + i).to_bytes(16, "big"),
            delta(first_seed * 100 + i),
            n_samples=3 + i,
            tau=0,
            discount=1.0,
            base_version=base_version,
        )
    return acc


@dataclass
class Region:
    tmp: Path
    config: RegionalConfig
    nats: MemoryBroker = field(default_factory=lambda: MemoryBroker("nats"))
    registry: MemoryModelRegistry = field(default_factory=MemoryModelRegistry)
    metrics: RecordingMetrics = field(default_factory=RecordingMetrics)

    async def publish_model(self, version: int) -> None:
        pointer, blob = sign_model_version(
            CENTRAL, FLEET, version, LAYOUT, np.zeros(LAYOUT.num_params, np.float32)
        )
        await self.registry.put_blob(version, blob)
        await self.registry.put_current(version, pointer)

    def daemon(self) -> RegionalDaemon:
        keys = TierKeys(
            REGIONAL,
            KeyRegistry.from_keys(
                {f"edge-{i}": e.verify_key for i, e in enumerate(EDGES)}, role="edge"
            ),
            CENTRAL.verify_key,
        )
        return RegionalDaemon(
            self.config,
            nats=MemoryBus(self.nats),
            registry_store=self.registry,
            keys=keys,
            metrics=self.metrics,
            clock_ms=lambda: 1_764_288_000_000,
            store_in_thread=False,
        )

    async def send(self, data: bytes, msg_id: str | None = None) -> None:
        await MemoryBus(self.nats).publish(SUBJECTS.to_region(REGION), data, msg_id=msg_id)


def make_config(tmp: Path, **overrides: Any) -> RegionalConfig:
    base = RegionalConfig(
        fleet=FLEET,
        region=REGION,
        identity_key=tmp / "unused.pem",
        state_dir=tmp / "regional",
        central_key=CENTRAL.verify_key.raw.hex(),
        flush=FlushPolicy(max_inputs=2, max_age_s=None),
        staleness=StalenessPolicy(max_staleness=3),
        commit_window_s=0.001,
    )
    return replace(base, **overrides)


@pytest.fixture
async def region(tmp_path: Path) -> Region:
    r = Region(tmp_path, make_config(tmp_path))
    await r.publish_model(0)
    return r


async def receive_partial(sub: Subscription) -> tuple[PartialAggregate, np.ndarray]:
    delivery = await sub.receive()
    await delivery.ack()
    envelope = open_envelope(delivery.payload, {REGIONAL.key_id: REGIONAL.verify_key})
    message = envelope.message
    assert isinstance(message, PartialAggregate)
    return message, decode(envelope.payload, message.codec, message.num_params)


async def through_regional(
    region: Region, *partials: bytes
) -> tuple[RegionalDaemon, PartialAggregate, np.ndarray]:
    """Run a regional, send it ``partials`` and return the first partial it sends up."""
    up = MemoryBus(region.nats)
    async with up.subscribe(SUBJECTS.to_central(), durable="probe") as central:
        async with trio.open_nursery() as nursery:
            regional = region.daemon()
            await nursery.start(regional.serve)
            for data in partials:
                await region.send(data)
            with trio.fail_after(60):  # virtual seconds (autojump clock)
                partial, numerator = await receive_partial(central)
            nursery.cancel_scope.cancel()
    return regional, partial, numerator


async def test_two_edge_partials_become_one_regional_partial(
    region: Region, autojump_clock: MockClock
) -> None:
    a, b = edge_buffer(1, 3), edge_buffer(2, 2)
    pa, data_a = sign_partial(EDGES[0], FLEET, LAYOUT, a)
    pb, data_b = sign_partial(EDGES[1], FLEET, LAYOUT, b, seq=5)
    up = MemoryBus(region.nats)
    async with up.subscribe(SUBJECTS.to_central(), durable="probe") as central:
        async with trio.open_nursery() as nursery:
            regional = region.daemon()
            await nursery.start(regional.serve)
            await region.send(data_a, pa.partial_id.hex())
            await region.send(data_b, pb.partial_id.hex())
            partial, numerator = await receive_partial(central)
            nursery.cancel_scope.cancel()
    flat = Accumulator(LAYOUT.num_params)
    flat.fold_child(pa.partial_id, a, extra_tau=0, discount=1.0)
    flat.fold_child(pb.partial_id, b, extra_tau=0, discount=1.0)
    np.testing.assert_array_equal(numerator, flat.numerator)
    assert partial.tier is Tier.REGIONAL
    assert partial.sample_count == a.sample_count + b.sample_count
    assert partial.weight_sum == flat.weight_sum
    assert partial.update_count == 5
    assert list(partial.inputs) == [pa.partial_id, pb.partial_id]
    assert list(partial.leaves) == [*a.leaf_ids, *b.leaf_ids]
    assert partial.partial_id == partial_id(REGIONAL.key_id, partial.inputs)


async def test_resent_partial_is_deduplicated_beyond_the_broker_window(
    region: Region, autojump_clock: MockClock
) -> None:
    a = edge_buffer(3, 2)
    pa, data_a = sign_partial(EDGES[0], FLEET, LAYOUT, a)
    async with trio.open_nursery() as nursery:
        regional = region.daemon()
        await nursery.start(regional.serve)
        await region.send(data_a)  # no msg id: the broker does not dedupe
        await region.send(data_a)
        await trio.sleep(0.1)  # past the commit window: both are acknowledged
        assert regional.counts[("accepted", "")] == 1
        assert regional.counts[("duplicate", "")] == 1
        assert regional.buffer.accumulator.input_count == 1
        nursery.cancel_scope.cancel()
    # After a restart the store still knows it (and it stays in the open buffer once).
    async with trio.open_nursery() as nursery:
        regional = region.daemon()
        await nursery.start(regional.serve)
        await region.send(data_a)
        await wait_all_tasks_blocked()
        assert regional.counts[("duplicate", "")] == 1
        assert list(regional.buffer.accumulator.input_ids) == [pa.partial_id]
        np.testing.assert_array_equal(regional.buffer.accumulator.numerator, a.numerator)
        nursery.cancel_scope.cancel()
    assert not region.nats._queues[SUBJECTS.regional_consumer(REGION)].pending


async def test_extra_delay_is_discounted_not_renormalized(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    region = Region(tmp_path, make_config(tmp_path, flush=FlushPolicy(max_inputs=1)))
    await region.publish_model(2)
    a = edge_buffer(4, 2, base_version=1)
    _pa, data = sign_partial(EDGES[2], FLEET, LAYOUT, a, known_version=1)
    _regional, partial, numerator = await through_regional(region, data)
    discount = 1 / math.sqrt(2)  # fedbuff s(1): the regional knows v2, the edge flushed at v1
    np.testing.assert_allclose(numerator, a.numerator * np.float32(discount), rtol=1e-6)
    assert partial.sample_count == a.sample_count  # the denominator is never discounted
    assert partial.weight_sum == pytest.approx(a.weight_sum * discount)
    assert partial.staleness_hist[1] == 2  # each leaf is one more version behind
    assert partial.known_version == 2


def _tamper_signature(data: bytes) -> bytes:
    version, header, payload, signature = msgpack.unpackb(data)
    return msgpack.packb([version, header, payload, bytes([signature[0] ^ 1]) + signature[1:]])


async def test_a_partial_later_than_max_staleness_is_folded_not_lost(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # An edge cut off from NATS while the central moved on: the updates inside its
    # partial were acknowledged to their devices, so refusing it would lose them.
    region = Region(tmp_path, make_config(tmp_path))  # max_staleness 3, flush at 2 inputs
    await region.publish_model(9)
    late, fresh = edge_buffer(6, 3), edge_buffer(7, 2, base_version=9)
    p_late, data_late = sign_partial(EDGES[0], FLEET, LAYOUT, late, known_version=0)
    p_fresh, data_fresh = sign_partial(EDGES[1], FLEET, LAYOUT, fresh, known_version=9)
    regional, partial, numerator = await through_regional(region, data_late, data_fresh)
    discount = 1 / math.sqrt(10)  # fedbuff s(9), past max_staleness but never 0
    assert regional.counts[("accepted", "")] == 2
    assert region.metrics.anomalies["late_partial"] == 1
    assert list(partial.leaves) == [*late.leaf_ids, *fresh.leaf_ids]
    assert partial.update_count == 5
    np.testing.assert_allclose(
        numerator, late.numerator * np.float32(discount) + fresh.numerator, rtol=1e-6
    )
    assert partial.weight_sum == pytest.approx(late.weight_sum * discount + fresh.weight_sum)
    assert partial.sample_count == late.sample_count + fresh.sample_count
    assert partial.staleness_hist[9] == 3  # the late leaves, nine versions behind
    assert list(partial.inputs) == [p_late.partial_id, p_fresh.partial_id]


@pytest.mark.parametrize(
    "reason", ["unknown_sender", "bad_signature", "malformed", "layout_mismatch"]
)
async def test_bad_partials_are_rejected_with_a_reason(
    region: Region, autojump_clock: MockClock, reason: str
) -> None:
    a = edge_buffer(5, 2)
    if reason == "unknown_sender":
        _, data = sign_partial(STRANGER, FLEET, LAYOUT, a)
    elif reason == "bad_signature":
        data = _tamper_signature(sign_partial(EDGES[0], FLEET, LAYOUT, a)[1])
    elif reason == "malformed":  # a partial id that does not derive from its inputs
        message, _ = sign_partial(EDGES[0], FLEET, LAYOUT, a)
        forged = replace(message, partial_id=b"\x00" * 16)
        from fedtier.protocol.codecs import encode
        from fedtier.protocol.envelope import seal

        data = seal(forged, encode(np.asarray(a.numerator), forged.codec), EDGES[0])
    else:
        assert reason == "layout_mismatch"
        other = layout_of([("w", (8,))])
        _, data = sign_partial(EDGES[0], FLEET, other, a)
    async with trio.open_nursery() as nursery:
        regional = region.daemon()
        await nursery.start(regional.serve)
        await region.send(data)
        await wait_all_tasks_blocked()
        await trio.sleep(1)  # the quarantine's commit, which the ack waits for
        assert regional.counts[("rejected", reason)] == 1
        assert region.metrics.outcomes[("rejected", reason)] == 1
        assert regional.buffer.accumulator.is_empty
        assert regional.store.quarantine_usage.by_reason == {reason: 1}
        nursery.cancel_scope.cancel()
    # Rejected partials are acknowledged once quarantined: their updates were
    # receipted below, so the bytes are kept (tests/unit/test_quarantine.py).
    assert not region.nats._queues[SUBJECTS.regional_consumer(REGION)].pending


async def test_a_device_update_inside_two_edge_partials_is_counted_once(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Two edges of one site both took update 100 (both subscribed, or a device
    # resent it at another site): their partials overlap in one leaf.
    region = Region(
        tmp_path, make_config(tmp_path, flush=FlushPolicy(max_inputs=2, max_age_s=None))
    )
    await region.publish_model(0)
    first = edge_buffer(1, 2)  # leaves 100, 101
    overlapping = Accumulator(LAYOUT.num_params, hist_buckets=32)
    for update_id in (100, 300):
        overlapping.fold_update(
            update_id.to_bytes(16, "big"),
            delta(update_id),
            n_samples=3,
            tau=0,
            discount=1.0,
            base_version=0,
        )
    other = edge_buffer(2, 1)  # leaf 200
    pa, data_a = sign_partial(EDGES[0], FLEET, LAYOUT, first)
    pb, data_b = sign_partial(EDGES[1], FLEET, LAYOUT, overlapping)
    _, data_c = sign_partial(EDGES[2], FLEET, LAYOUT, other)
    regional, partial, numerator = await through_regional(region, data_a, data_b, data_c)
    # The overlapping partial was refused and kept, the next one made the cut.
    assert regional.counts[("rejected", "leaf_counted_twice")] == 1
    assert sorted(partial.leaves) == sorted([*first.leaf_ids, *other.leaf_ids])
    flat = Accumulator(LAYOUT.num_params)
    flat.fold_child(pa.partial_id, first, extra_tau=0, discount=1.0)
    flat.fold_child(partial_id(EDGES[2].key_id, other.input_ids), other, extra_tau=0, discount=1.0)
    np.testing.assert_array_equal(numerator, flat.numerator)
    (kept,) = read_quarantine(region.config.store_path)
    assert (kept.reason, kept.input_id, kept.retry) == (
        "leaf_counted_twice",
        pb.partial_id,
        "never",
    )
