from __future__ import annotations

import gc
import math
import sqlite3
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt
import pytest
import trio
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import set_span_in_context
from trio.testing import MockClock, wait_all_tasks_blocked

from fedtier.protocol.bus import Bus, Delivery, MemoryBroker, MemoryBus, PublishAck, Subscription
from fedtier.protocol.codecs import CodecSpec, decode, encode
from fedtier.protocol.envelope import open_envelope, parse_envelope, seal
from fedtier.protocol.errors import BusUnavailable, ConfigError
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import layout_of
from fedtier.protocol.limits import Limits
from fedtier.protocol.messages import DeviceUpdate, PartialAggregate, Receipt, ReceiptStatus
from fedtier.protocol.names import MqttTopics, NatsSubjects
from fedtier.protocol.telemetry.tracing import extract_context, inject_headers
from fedtier.simulations.testing import RecordingMetrics, SimDevice, sign_model_version
from fedtier.tiers.aggregate import Accumulator, partial_id
from fedtier.tiers.config import EdgeConfig, load_config
from fedtier.tiers.core import (
    AdaptiveNorm,
    AdmissionRules,
    InfluenceRules,
    InfluenceState,
    ModelView,
    NothingSeen,
    TierBuffer,
    admit_update,
)
from fedtier.tiers.edge import GC_GEN0_THRESHOLD, EdgeDaemon
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.model_registry import MemoryModelRegistry
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.tiers.staleness import StalenessPolicy

FLEET, SITE, REGION = "acme", "depot-1", "eu"
LAYOUT = layout_of([("w", (4,)), ("b", (2,))])
OTHER_LAYOUT = layout_of([("w", (3,)), ("b", (3,))])
CENTRAL = SigningIdentity.from_seed(b"\x01" * 32)
EDGE = SigningIdentity.from_seed(b"\x02" * 32)
DEVICES = [
    SimDevice(SigningIdentity.from_seed(bytes([10 + i]) * 32), FLEET, LAYOUT) for i in range(4)
]
STRANGER = SimDevice(SigningIdentity.from_seed(b"\x63" * 32), FLEET, LAYOUT)
TOPICS = MqttTopics(FLEET, SITE)
SUBJECTS = NatsSubjects(FLEET)


def delta(seed: int, scale: float = 1.0) -> npt.NDArray[np.float32]:
    return (np.random.default_rng(seed).standard_normal(LAYOUT.num_params) * scale).astype(
        np.float32
    )


def edge_keys() -> TierKeys:
    registry = KeyRegistry.from_keys(
        {f"veh-{i}": d.identity.verify_key for i, d in enumerate(DEVICES)}, role="device"
    )
    return TierKeys(EDGE, registry, CENTRAL.verify_key)


@dataclass
class Site:
    tmp: Path
    config: EdgeConfig
    mqtt: MemoryBroker = field(default_factory=lambda: MemoryBroker("mqtt"))
    nats: MemoryBroker = field(default_factory=lambda: MemoryBroker("nats"))
    registry: MemoryModelRegistry = field(default_factory=MemoryModelRegistry)
    metrics: RecordingMetrics = field(default_factory=RecordingMetrics)

    async def publish_model(self, version: int) -> None:
        pointer, blob = sign_model_version(
            CENTRAL, FLEET, version, LAYOUT, np.full(LAYOUT.num_params, version, np.float32)
        )
        await self.registry.put_blob(version, blob)
        await self.registry.put_current(version, pointer)

    def daemon(self, mqtt: Bus | None = None) -> EdgeDaemon:
        return EdgeDaemon(
            self.config,
            mqtt=mqtt or MemoryBus(self.mqtt),
            nats=MemoryBus(self.nats),
            registry_store=self.registry,
            keys=edge_keys(),
            metrics=self.metrics,
            clock_ms=lambda: 1_764_288_000_000,
            store_in_thread=False,
        )


def make_config(tmp: Path, **overrides: Any) -> EdgeConfig:
    base = EdgeConfig(
        fleet=FLEET,
        site=SITE,
        region=REGION,
        identity_key=tmp / "unused.pem",
        state_dir=tmp / "edge",
        central_key=CENTRAL.verify_key.raw.hex(),
        flush=FlushPolicy(max_inputs=100, max_age_s=None),
        staleness=StalenessPolicy(max_staleness=2),
        commit_window_s=0.001,
    )
    return replace(base, **overrides)


@pytest.fixture
async def site(tmp_path: Path) -> Site:
    s = Site(tmp_path, make_config(tmp_path))
    await s.publish_model(0)
    return s


class Phone:
    """The device side: publish on its topic, read its receipts."""

    def __init__(self, site: Site, device: SimDevice) -> None:
        self.site = site
        self.device = device
        self.bus = MemoryBus(site.mqtt)

    @asynccontextmanager
    async def receipts(self) -> AsyncIterator[Subscription]:
        async with self.bus.subscribe(TOPICS.receipt(self.device.key_id)) as sub:
            yield sub

    async def send(self, data: bytes, topic_device: str | None = None) -> None:
        await self.bus.publish(TOPICS.update(topic_device or self.device.key_id), data)


async def next_receipt(sub: Subscription) -> Receipt:
    delivery = await sub.receive()
    await delivery.ack()
    envelope = open_envelope(delivery.payload, {EDGE.key_id: EDGE.verify_key})
    assert isinstance(envelope.message, Receipt)
    return envelope.message


async def send_and_receipt(phone: Phone, data: bytes, topic_device: str | None = None) -> Receipt:
    async with phone.receipts() as sub:
        await phone.send(data, topic_device)
        return await next_receipt(sub)


def expected_numerator(
    updates: Sequence[tuple[DeviceUpdate, npt.NDArray[np.float32]]],
    *,
    known: int = 0,
    policy: StalenessPolicy | None = None,
) -> Accumulator:
    policy = policy or StalenessPolicy(max_staleness=2)
    acc = Accumulator(LAYOUT.num_params, hist_buckets=32)
    for message, values in updates:
        a = policy.assess(known, message.base_version)
        acc.fold_update(
            message.update_id,
            values,
            n_samples=message.n_samples,
            tau=a.tau,
            discount=a.discount,
            base_version=message.base_version,
        )
    return acc


# -- rejections ----------------------------------------------------------------------


def _tamper_signature(data: bytes) -> bytes:
    version, header, payload, signature = msgpack.unpackb(data)
    return msgpack.packb([version, header, payload, bytes([signature[0] ^ 1]) + signature[1:]])


def _tamper_payload(data: bytes) -> bytes:
    version, header, payload, signature = msgpack.unpackb(data)
    return msgpack.packb([version, header, bytes([payload[0] ^ 1]) + payload[1:], signature])


def _with_version(data: bytes, version: int) -> bytes:
    _, header, payload, signature = msgpack.unpackb(data)
    return msgpack.packb([version, header, payload, signature])


def _raw_update(device: SimDevice, values: list[float], *, seq: int) -> bytes:
    message, _ = device.update(np.zeros(LAYOUT.num_params, np.float32), seq=seq)
    return seal(message, np.asarray(values, "<f4").tobytes(), device.identity)


@dataclass
class Case:
    reason: str
    # builds (bytes to send, topic device) from the device and its next seq
    build: Callable[[SimDevice, int], tuple[bytes, str | None]]
    receipt_device: str | None = None  # None: the device itself
    config: Mapping[str, object] = field(default_factory=dict)
    model_version: int = 0


CASES = [
    Case("malformed", lambda d, s: (b"\x94\x01garbage", None)),
    Case(
        "too_large",
        lambda d, s: (b"\x00" * 5000, None),
        config={"limits": Limits(max_envelope_bytes=4096)},
    ),
    Case(
        "unsupported_version", lambda d, s: (_with_version(d.update(delta(1), seq=s)[1], 2), None)
    ),
    Case(
        "unknown_sender",
        lambda d, s: (STRANGER.update(delta(1), seq=s)[1], STRANGER.key_id),
        receipt_device=STRANGER.key_id,
    ),
    Case("bad_signature", lambda d, s: (_tamper_signature(d.update(delta(1), seq=s)[1]), None)),
    Case("digest_mismatch", lambda d, s: (_tamper_payload(d.update(delta(1), seq=s)[1]), None)),
    Case(
        "layout_mismatch",
        lambda d, s: (SimDevice(d.identity, FLEET, OTHER_LAYOUT).update(delta(1), seq=s)[1], None),
    ),
    Case("wrong_fleet", lambda d, s: (d.update(delta(1), seq=s, fleet="other")[1], None)),
    # seq 1 is taken by the good update sent before; an unknown id reusing it is a replay.
    Case("replay", lambda d, s: (d.update(delta(1), seq=1)[1], None)),
    Case(
        "stale", lambda d, s: (d.update(delta(1), seq=s, base_version=0)[1], None), model_version=3
    ),
    Case(
        "non_finite",
        lambda d, s: (_raw_update(d, [1.0, math.nan, 0, 0, 0, 0], seq=s), None),
    ),
    Case(
        "norm_exceeded",
        lambda d, s: (d.update(np.full(6, 10.0, np.float32), seq=s)[1], None),
        config={"max_norm": 5.0, "norm_policy": "reject"},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.reason for c in CASES])
async def test_rejection_is_typed_counted_and_leaves_the_aggregate_untouched(
    case: Case, tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(tmp_path, make_config(tmp_path, **case.config))
    await site.publish_model(case.model_version)
    device = DEVICES[0]
    phone = Phone(site, device)
    base = case.model_version
    good1, good1_bytes = device.update(delta(1), seq=1, base_version=base, n_samples=5)
    good2, good2_bytes = device.update(delta(2), seq=3, base_version=base, n_samples=7)
    bad_bytes, topic_device = case.build(device, 2)
    receipt_device = case.receipt_device or device.key_id
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        assert (await send_and_receipt(phone, good1_bytes)).status is ReceiptStatus.ACCEPTED

        other = (
            Phone(site, SimDevice(STRANGER.identity, FLEET, LAYOUT))
            if (receipt_device != device.key_id)
            else phone
        )
        async with other.receipts() as sub:
            await phone.send(bad_bytes, topic_device)
            receipt = await next_receipt(sub)
        assert receipt.status is ReceiptStatus.REJECTED
        assert receipt.reason == case.reason
        assert receipt.device == receipt_device
        assert edge.counts[("rejected", case.reason)] == 1
        assert site.metrics.outcomes[("rejected", case.reason)] == 1

        assert (await send_and_receipt(phone, good2_bytes)).status is ReceiptStatus.ACCEPTED
        aggregate = edge.buffer.accumulator
        assert list(aggregate.input_ids) == [good1.update_id, good2.update_id]
        expected = expected_numerator(
            [(good1, delta(1)), (good2, delta(2))], known=case.model_version
        )
        np.testing.assert_array_equal(aggregate.numerator, expected.numerator)
        assert aggregate.sample_count == 12.0
        assert edge.counts[("accepted", "")] == 2
        nursery.cancel_scope.cancel()


async def test_updates_arriving_out_of_seq_order_are_accepted(
    site: Site, autojump_clock: MockClock
) -> None:
    # A device resends an unanswered update after newer ones were accepted: the lower
    # seq was never used, so it is not a replay.
    await site.publish_model(0)
    device = DEVICES[0]
    phone = Phone(site, device)
    _newer, newer_bytes = device.update(delta(1), seq=5)
    _older, older_bytes = device.update(delta(2), seq=4)
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        assert (await send_and_receipt(phone, newer_bytes)).status is ReceiptStatus.ACCEPTED
        assert (await send_and_receipt(phone, older_bytes)).status is ReceiptStatus.ACCEPTED
        assert edge.buffer.accumulator.input_count == 2
        nursery.cancel_scope.cancel()


async def test_clip_policy_accepts_scaled_and_counts_an_anomaly(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(tmp_path, make_config(tmp_path, max_norm=1.0, norm_policy="clip"))
    await site.publish_model(0)
    device = DEVICES[0]
    big = np.full(6, 2.0, np.float32)  # norm sqrt(24)
    _message, data = device.update(big, n_samples=3)
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        receipt = await send_and_receipt(Phone(site, device), data)
        assert receipt.status is ReceiptStatus.ACCEPTED
        assert edge.anomalies["norm_clipped"] == 1
        assert site.metrics.anomalies["norm_clipped"] == 1
        np.testing.assert_allclose(
            edge.buffer.accumulator.numerator, 3 * big / math.sqrt(24), rtol=1e-6
        )
        nursery.cancel_scope.cancel()


async def test_duplicate_is_acked_answered_and_not_folded_twice(
    site: Site, autojump_clock: MockClock
) -> None:
    device = DEVICES[1]
    phone = Phone(site, device)
    message, data = device.update(delta(3), n_samples=4)
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        assert (await send_and_receipt(phone, data)).status is ReceiptStatus.ACCEPTED
        again = await send_and_receipt(phone, data)
        assert again.status is ReceiptStatus.DUPLICATE
        assert again.update_id == message.update_id
        assert edge.counts[("duplicate", "")] == 1
        assert edge.buffer.accumulator.input_count == 1
        np.testing.assert_array_equal(edge.buffer.accumulator.numerator, 4 * delta(3))
        # Both deliveries were acknowledged: nothing is left in flight at the broker.
        await wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    queue = site.mqtt._queues[f"fedtier-edge-{SITE}"]
    assert not queue.pending


# -- acknowledgement only after the commit ------------------------------------------


class ProbeBus(Bus):
    """Wraps a bus so each delivery's ack first calls ``on_ack`` (or is dropped)."""

    flavor = "mqtt"

    def __init__(self, inner: Bus, on_ack: Callable[[Delivery], bool]) -> None:
        self.inner = inner
        self.on_ack = on_ack

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
        retain: bool = False,
    ) -> PublishAck:
        result: PublishAck = await self.inner.publish(
            subject, payload, headers=headers, msg_id=msg_id, retain=retain
        )
        return result

    @asynccontextmanager
    async def subscribe(
        self,
        subject_filter: str,
        *,
        durable: str | None = None,
        capacity: int = 64,
        latest_only: bool = False,
    ) -> AsyncIterator[Subscription]:
        async with self.inner.subscribe(
            subject_filter, durable=durable, capacity=capacity, latest_only=latest_only
        ) as sub:
            yield _ProbeSubscription(sub, self.on_ack)


class _ProbeSubscription(Subscription):
    def __init__(self, inner: Subscription, on_ack: Callable[[Delivery], bool]) -> None:
        self.inner = inner
        self.on_ack = on_ack

    async def receive(self) -> Delivery:
        delivery = await self.inner.receive()

        async def ack() -> None:
            if self.on_ack(delivery):
                await delivery.ack()
            else:
                await trio.lowlevel.checkpoint()

        return Delivery(
            delivery.subject,
            delivery.payload,
            delivery.headers,
            delivery.redelivered,
            delivery.retained,
            _ack=ack,
        )


def stored_update_ids(path: Path) -> set[bytes]:
    conn = sqlite3.connect(path)
    try:
        return {bytes(row[0]) for row in conn.execute("SELECT input_id FROM inputs")}
    finally:
        conn.close()


async def test_puback_happens_only_after_the_store_commit(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(tmp_path, make_config(tmp_path, commit_window_s=0.05))
    await site.publish_model(0)
    seen: list[tuple[bytes, bool]] = []

    def on_ack(delivery: Delivery) -> bool:
        message = parse_envelope(delivery.payload).message
        assert isinstance(message, DeviceUpdate)
        # A separate connection sees only committed rows.
        seen.append(
            (message.update_id, message.update_id in stored_update_ids(site.config.store_path))
        )
        return True

    updates = [DEVICES[i % 4].update(delta(i), seq=100 + i) for i in range(8)]
    async with trio.open_nursery() as nursery:
        edge = site.daemon(mqtt=ProbeBus(MemoryBus(site.mqtt), on_ack))
        await nursery.start(edge.serve)
        sender = MemoryBus(site.mqtt)
        for message, data in updates:
            await sender.publish(TOPICS.update(message.sender), data)
        await trio.sleep(1)
        await wait_all_tasks_blocked()
        commits = edge.store.commits
        nursery.cancel_scope.cancel()
    assert [uid for uid, _ in seen] == [m.update_id for m, _ in updates]
    assert all(durable for _, durable in seen)
    assert edge.counts[("accepted", "")] == 8
    assert commits < 8  # the accepts were grouped


# -- flushing ------------------------------------------------------------------------


async def receive_partial(sub: Subscription) -> tuple[PartialAggregate, bytes, Delivery]:
    delivery = await sub.receive()
    await delivery.ack()
    envelope = open_envelope(delivery.payload, {EDGE.key_id: EDGE.verify_key})
    assert isinstance(envelope.message, PartialAggregate)
    return envelope.message, envelope.payload, delivery


async def test_flush_on_k_inputs_publishes_one_exact_partial(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(tmp_path, make_config(tmp_path, flush=FlushPolicy(max_inputs=3, max_age_s=None)))
    await site.publish_model(2)
    sent = [
        DEVICES[0].update(delta(10), base_version=2, n_samples=5),
        DEVICES[1].update(delta(11), base_version=1, n_samples=8),  # tau 1: discounted
        DEVICES[2].update(delta(12), base_version=2, n_samples=2),
    ]
    upstream = MemoryBus(site.nats)
    async with upstream.subscribe(SUBJECTS.to_region(REGION), durable="probe") as partials:
        async with trio.open_nursery() as nursery:
            edge = site.daemon()
            await nursery.start(edge.serve)
            for i, (_, data) in enumerate(sent):
                await send_and_receipt(Phone(site, DEVICES[i]), data)
            partial, payload, _delivery = await receive_partial(partials)
            await wait_all_tasks_blocked()
            assert site.nats.published_count == 1
            assert edge.buffer.accumulator.is_empty
            nursery.cancel_scope.cancel()
    expected = expected_numerator([(m, delta(10 + i)) for i, (m, _) in enumerate(sent)], known=2)
    numerator = decode(payload, partial.codec, partial.num_params)
    np.testing.assert_array_equal(numerator, expected.numerator)
    assert partial.sample_count == expected.sample_count == 15.0
    assert partial.weight_sum == pytest.approx(expected.weight_sum)
    assert partial.update_count == 3
    assert partial.known_version == 2
    assert partial.staleness_hist[:2] == (2, 1)
    assert (partial.min_base_version, partial.max_base_version) == (1, 2)
    assert list(partial.inputs) == [m.update_id for m, _ in sent]
    assert partial.leaves == partial.inputs
    assert partial.partial_id == partial_id(EDGE.key_id, partial.inputs)
    assert partial.layout == LAYOUT.fingerprint
    assert site.metrics.flushed["count"] == 3


async def test_deadline_flushes_a_partial_buffer(tmp_path: Path, autojump_clock: MockClock) -> None:
    site = Site(tmp_path, make_config(tmp_path, flush=FlushPolicy(max_inputs=10, max_age_s=5.0)))
    await site.publish_model(0)
    upstream = MemoryBus(site.nats)
    async with upstream.subscribe(SUBJECTS.to_region(REGION), durable="probe") as partials:
        async with trio.open_nursery() as nursery:
            edge = site.daemon()
            await nursery.start(edge.serve)
            message, data = DEVICES[0].update(delta(1))
            start = trio.current_time()
            await send_and_receipt(Phone(site, DEVICES[0]), data)
            partial, _, _ = await receive_partial(partials)
            assert trio.current_time() - start == pytest.approx(5.0, abs=0.1)
            assert list(partial.inputs) == [message.update_id]
            nursery.cancel_scope.cancel()


async def test_clean_shutdown_flushes_what_it_holds(site: Site, autojump_clock: MockClock) -> None:
    upstream = MemoryBus(site.nats)
    async with upstream.subscribe(SUBJECTS.to_region(REGION), durable="probe") as partials:
        async with trio.open_nursery() as nursery:
            edge = site.daemon()
            await nursery.start(edge.serve)
            message, data = DEVICES[0].update(delta(1))
            await send_and_receipt(Phone(site, DEVICES[0]), data)
            edge.request_shutdown()
        partial, _, _ = await receive_partial(partials)
        assert list(partial.inputs) == [message.update_id]
    async with site.daemon()._open_input():  # nothing left unacknowledged
        pass
    assert not site.mqtt._queues[f"fedtier-edge-{SITE}"].pending


# -- crash and restart ---------------------------------------------------------------


async def test_crash_and_restart_loses_nothing_and_folds_nothing_twice(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(
        tmp_path,
        make_config(tmp_path, flush=FlushPolicy(max_inputs=5, max_age_s=None), commit_window_s=0.5),
    )
    await site.publish_model(0)
    updates = [DEVICES[i % 4].update(delta(20 + i), n_samples=1 + i) for i in range(5)]
    dropped = {updates[2][0].update_id}

    def drop_ack(delivery: Delivery) -> bool:
        # The commit of update 2 happens, its PUBACK never leaves (crash in between).
        message = parse_envelope(delivery.payload).message
        return message.update_id not in dropped  # type: ignore[union-attr]

    upstream = MemoryBus(site.nats)
    async with upstream.subscribe(SUBJECTS.to_region(REGION), durable="probe") as partials:
        async with trio.open_nursery() as nursery:
            edge = site.daemon(mqtt=ProbeBus(MemoryBus(site.mqtt), drop_ack))
            await nursery.start(edge.serve)
            for i, (_, data) in enumerate(updates[:3]):
                receipt = await send_and_receipt(Phone(site, DEVICES[i % 4]), data)
                assert receipt.status is ReceiptStatus.ACCEPTED
            # Update 3 is admitted and folded but its commit has not happened yet.
            await MemoryBus(site.mqtt).publish(TOPICS.update(updates[3][0].sender), updates[3][1])
            await wait_all_tasks_blocked()
            assert edge.counts[("accepted", "")] == 4
            nursery.cancel_scope.cancel()  # crash: no clean shutdown
        assert updates[3][0].update_id not in stored_update_ids(site.config.store_path)
        assert site.nats.published_count == 0

        async with trio.open_nursery() as nursery:
            dropped.clear()
            edge = site.daemon()
            await nursery.start(edge.serve)
            # Recovered: updates 0-2 refolded from the store.
            assert edge.buffer.accumulator.input_count >= 3
            await send_and_receipt(Phone(site, DEVICES[0]), updates[4][1])
            partial, payload, _ = await receive_partial(partials)
            assert edge.counts[("duplicate", "")] == 1  # update 2, redelivered
            assert edge.counts[("accepted", "")] == 2  # update 3 (redelivered) and 4
            nursery.cancel_scope.cancel()
    assert sorted(partial.inputs) == sorted(m.update_id for m, _ in updates)
    assert partial.update_count == 5
    assert partial.sample_count == sum(m.n_samples for m, _ in updates)
    numerator = decode(payload, partial.codec, partial.num_params)
    expected = sum(m.n_samples * delta(20 + i) for i, (m, _) in enumerate(updates))
    np.testing.assert_allclose(numerator, expected, rtol=1e-6)


class DownBus(Bus):
    """A NATS connection that is down: every publish raises BusUnavailable."""

    flavor = "nats"

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
        retain: bool = False,
    ) -> PublishAck:
        await trio.lowlevel.checkpoint()
        raise BusUnavailable("not connected to NATS")

    def subscribe(
        self,
        subject_filter: str,
        *,
        durable: str | None = None,
        capacity: int = 64,
        latest_only: bool = False,
    ) -> AbstractAsyncContextManager[Subscription]:
        raise AssertionError("the edge does not subscribe on NATS")


async def test_unacked_partial_is_resent_after_a_crash(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(tmp_path, make_config(tmp_path, flush=FlushPolicy(max_inputs=1, max_age_s=None)))
    await site.publish_model(0)
    message, data = DEVICES[0].update(delta(5))
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        edge.nats = DownBus()
        await nursery.start(edge.serve)
        # Upstream is down: the flushed partial stays in the outbox, retried with backoff.
        await send_and_receipt(Phone(site, DEVICES[0]), data)
        await trio.sleep(3)
        assert site.metrics.calls["retry:publish_partial"] >= 3
        # The edge keeps taking updates while upstream is down.
        other, other_data = DEVICES[1].update(delta(6))
        assert (await send_and_receipt(Phone(site, DEVICES[1]), other_data)).status == "accepted"
        nursery.cancel_scope.cancel()
    upstream = MemoryBus(site.nats)
    async with upstream.subscribe(SUBJECTS.to_region(REGION), durable="probe") as partials:
        async with trio.open_nursery() as nursery:
            edge = site.daemon()
            await nursery.start(edge.serve)
            first, _, _ = await receive_partial(partials)
            second, _, _ = await receive_partial(partials)
            assert list(first.inputs) == [message.update_id]
            assert list(second.inputs) == [other.update_id]
            await trio.sleep(0.1)  # the ack's commit window (fake clock)
            assert edge.store.outbox_state(first.partial_id) == "acked"
            nursery.cancel_scope.cancel()


# -- model relay ---------------------------------------------------------------------


async def test_new_model_is_relayed_retained_and_used_for_staleness(
    site: Site, autojump_clock: MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        assert edge.known_version == 0
        await site.publish_model(1)
        await wait_all_tasks_blocked()
        assert edge.known_version == 1
        # A device connecting later finds both, retained, and can verify them.
        late = MemoryBus(site.mqtt)
        async with late.subscribe(TOPICS.model_pointer()) as pointers:
            pointer = await pointers.receive()
        async with late.subscribe(TOPICS.model_blob()) as blobs:
            blob = await blobs.receive()
        assert pointer.retained
        assert blob.retained
        keys = {CENTRAL.key_id: CENTRAL.verify_key}
        assert open_envelope(pointer.payload, keys).message.version == 1  # type: ignore[union-attr]
        assert open_envelope(blob.payload, keys).message.version == 1  # type: ignore[union-attr]
        _message, data = DEVICES[0].update(delta(1), base_version=0)
        receipt = await send_and_receipt(Phone(site, DEVICES[0]), data)
        assert receipt.model_version == 1
        assert edge.buffer.accumulator.staleness_hist[1] == 1
        nursery.cancel_scope.cancel()
    assert site.metrics.versions == [0, 1]


async def test_forged_model_pointer_is_ignored(site: Site, autojump_clock: MockClock) -> None:
    impostor = SigningIdentity.from_seed(b"\x66" * 32)
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        pointer, blob = sign_model_version(
            impostor, FLEET, 9, LAYOUT, np.zeros(LAYOUT.num_params, np.float32)
        )
        await site.registry.put_blob(9, blob)
        await site.registry.put_current(9, pointer)
        await wait_all_tasks_blocked()
        assert edge.known_version == 0
        nursery.cancel_scope.cancel()


def test_codec_of_update_helpers_round_trip() -> None:
    message, data = DEVICES[0].update(delta(1), codec=CodecSpec("f16"))
    envelope = parse_envelope(data)
    assert envelope.message == message
    np.testing.assert_allclose(
        decode(envelope.payload, message.codec, LAYOUT.num_params),
        delta(1),
        rtol=1e-3,
        atol=1e-3,
    )
    assert encode(delta(1), CodecSpec("f32")) == np.asarray(delta(1), "<f4").tobytes()


# -- telemetry -----------------------------------------------------------------------


async def test_spans_chain_device_process_aggregate_send(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    site = Site(tmp_path, make_config(tmp_path, flush=FlushPolicy(max_inputs=1, max_age_s=None)))
    await site.publish_model(0)
    message, data = DEVICES[0].update(delta(1))
    upstream = MemoryBus(site.nats)
    async with upstream.subscribe(SUBJECTS.to_region(REGION), durable="probe") as partials:
        async with trio.open_nursery() as nursery:
            edge = site.daemon()
            edge.tracer = tracer
            await nursery.start(edge.serve)
            with tracer.start_as_current_span("device send") as device_span:
                headers: dict[str, str] = {}
                inject_headers(headers, set_span_in_context(device_span))
            bus = MemoryBus(site.mqtt)
            async with bus.subscribe(TOPICS.receipt(DEVICES[0].key_id)) as receipts:
                await bus.publish(TOPICS.update(DEVICES[0].key_id), data, headers=headers)
                await next_receipt(receipts)
            delivery = await partials.receive()
            await wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    provider.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    process, aggregate, send = spans["edge process"], spans["edge aggregate"], spans["edge send"]
    assert process.parent is not None
    assert process.parent.span_id == device_span.get_span_context().span_id
    assert process.attributes is not None
    assert process.attributes["fedtier.update_id"] == message.update_id.hex()
    assert process.attributes["fedtier.device"] == DEVICES[0].key_id
    assert process.attributes["fedtier.outcome"] == "accepted"
    assert aggregate.parent is None  # a new root per flush ...
    assert [link.context.span_id for link in aggregate.links] == [
        process.context.span_id  # ... linked to its inputs
    ]
    assert aggregate.attributes is not None
    assert list(aggregate.attributes["fedtier.input_ids"]) == [message.update_id.hex()]  # type: ignore[arg-type]
    assert send.parent is not None
    assert send.parent.span_id == aggregate.context.span_id
    # The regional's process span will be a child of this send span.
    remote = extract_context(delivery.headers)
    assert otel_trace.get_current_span(remote).get_span_context().span_id == send.context.span_id


async def test_clean_shutdown_with_upstream_down_keeps_the_partial(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(tmp_path, make_config(tmp_path, shutdown_timeout_s=5.0))
    await site.publish_model(0)
    _message, data = DEVICES[0].update(delta(1))
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        edge.nats = DownBus()
        await nursery.start(edge.serve)
        await send_and_receipt(Phone(site, DEVICES[0]), data)
        start = trio.current_time()
        edge.request_shutdown()
    assert trio.current_time() - start == pytest.approx(5.0, abs=0.5)
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        edge.nats = DownBus()
        await nursery.start(edge.serve)
        # Flushed at shutdown, not confirmed: pending in the outbox, the buffer is empty.
        assert edge.buffer.accumulator.is_empty
        assert edge.upstream.outstanding == 1
        nursery.cancel_scope.cancel()


# -- bounded influence per device -------------------------------------------------------


def _stored_weights(path: Path) -> dict[bytes, float]:
    conn = sqlite3.connect(path)
    try:
        return {
            bytes(row[0]): float(row[1])
            for row in conn.execute("SELECT input_id, n_samples FROM inputs")
        }
    finally:
        conn.close()


async def test_a_huge_n_samples_moves_the_aggregate_by_at_most_its_cap(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(tmp_path, make_config(tmp_path, influence=InfluenceRules(max_samples=40)))
    await site.publish_model(0)
    honest = [DEVICES[i].update(delta(30 + i), n_samples=10) for i in range(3)]
    evil = np.full(LAYOUT.num_params, 2.0, np.float32)
    attack, attack_bytes = DEVICES[3].update(evil, n_samples=2**63 - 1)
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        for i, (_, data) in enumerate(honest):
            assert (await send_and_receipt(Phone(site, DEVICES[i]), data)).status.value == (
                "accepted"
            )
        receipt = await send_and_receipt(Phone(site, DEVICES[3]), attack_bytes)
        assert receipt.status is ReceiptStatus.ACCEPTED
        acc = edge.buffer.accumulator
        assert acc.sample_count == 30 + 40  # the cap, not 2**63 - 1
        expected = sum(10 * delta(30 + i) for i in range(3)) + 40 * evil
        np.testing.assert_allclose(acc.numerator, expected, rtol=1e-6)
        # Its share of the aggregate is 40 / 70, its pull at most that times its vector.
        assert edge.anomalies["weight_capped"] == 1
        nursery.cancel_scope.cancel()
    # The store keeps the capped weight: a refold after a restart folds the same.
    assert _stored_weights(site.config.store_path)[attack.update_id] == 40.0
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        assert edge.buffer.accumulator.sample_count == 70
        nursery.cancel_scope.cancel()


async def test_a_huge_delta_is_clipped_to_the_adaptive_bound(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    adaptive = AdaptiveNorm(quantile=0.5, factor=3.0, window=32, warmup=8)
    site = Site(
        tmp_path,
        make_config(tmp_path, max_norm=100.0, influence=InfluenceRules(adaptive_norm=adaptive)),
    )
    await site.publish_model(0)
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        for i in range(8):
            honest = delta(40 + i)
            honest *= np.float32(0.9 / float(np.linalg.norm(honest)))
            _, data = DEVICES[i % 3].update(honest)
            assert (await send_and_receipt(Phone(site, DEVICES[i % 3]), data)).status.value == (
                "accepted"
            )
        before = edge.buffer.accumulator.numerator.copy()
        evil = delta(50) * np.float32(1e6)
        _, data = DEVICES[3].update(evil, n_samples=10)
        assert (await send_and_receipt(Phone(site, DEVICES[3]), data)).status is (
            ReceiptStatus.ACCEPTED
        )
        pulled = float(np.linalg.norm(edge.buffer.accumulator.numerator - before)) / 10
        assert pulled == pytest.approx(2.7, rel=1e-3)  # 3 x the median 0.9, not 100
        assert edge.anomalies["norm_clipped"] == 1
        nursery.cancel_scope.cancel()


async def test_one_device_flooding_is_rate_limited_and_another_is_not(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(
        tmp_path,
        make_config(
            tmp_path,
            flush=FlushPolicy(max_inputs=10_000, max_age_s=None),
            influence=InfluenceRules(rate_per_s=2.0, burst=10.0),
        ),
    )
    await site.publish_model(0)
    flooder = Phone(site, DEVICES[0])
    updates = [DEVICES[0].update(delta(1, 1e-3), n_samples=1)[1] for _ in range(1000)]
    receipts: list[Receipt] = []
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        start = trio.current_time()
        async with flooder.receipts() as sub:
            for data in updates:
                await flooder.send(data)
                receipts.append(await next_receipt(sub))
        elapsed = trio.current_time() - start
        other = await send_and_receipt(Phone(site, DEVICES[1]), DEVICES[1].update(delta(2))[1])
        nursery.cancel_scope.cancel()
    accepted = [r for r in receipts if r.status is ReceiptStatus.ACCEPTED]
    limited = [r for r in receipts if r.status is ReceiptStatus.REJECTED]
    assert len(accepted) + len(limited) == 1000
    assert len(accepted) <= 10 + 2.0 * elapsed + 1
    assert {r.reason for r in limited} == {"rate_limited"}
    assert all(r.retry_after_ms > 0 for r in limited)
    assert other.status is ReceiptStatus.ACCEPTED  # the other device is not affected


async def test_future_base_and_contribution_cap(tmp_path: Path, autojump_clock: MockClock) -> None:
    site = Site(
        tmp_path,
        make_config(
            tmp_path,
            influence=InfluenceRules(max_updates_per_version=2, reject_future_base=True),
        ),
    )
    await site.publish_model(0)
    phone = Phone(site, DEVICES[0])
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        future = await send_and_receipt(phone, DEVICES[0].update(delta(1), base_version=1000)[1])
        assert (future.status, future.reason) == (ReceiptStatus.REJECTED, "future_base")
        sent = [DEVICES[0].update(delta(2 + i)) for i in range(3)]
        statuses = [(await send_and_receipt(phone, data)).reason for _, data in sent]
        assert statuses == ["", "", "contribution_capped"]
        await site.publish_model(1)
        while edge.known_version < 1:
            await trio.sleep(0.01)
        # The same update, resent once the edge knows the next version, passes.
        again = await send_and_receipt(phone, sent[2][1])
        assert again.status is ReceiptStatus.ACCEPTED
        nursery.cancel_scope.cancel()


def test_edge_validation_keeps_a_bound_on_unless_unsafe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    minimal = (
        'fleet = "acme"\nsite = "s1"\nregion = "r1"\nidentity_key = "k.pem"\n'
        'state_dir = "state"\n[keys]\nsenders = "devices.toml"\ncentral = "central.pub"\n'
    )
    path = tmp_path / "edge.toml"
    path.write_text(minimal + "[validation]\nmax_norm = 100.0\n")
    config = load_config("edge", path)
    assert isinstance(config, EdgeConfig)
    assert (config.max_norm, config.influence.adaptive_norm) == (100.0, None)  # fixed, as before
    assert config.influence.max_samples == 10_000
    assert config.influence.reject_future_base
    monkeypatch.delenv("FEDTIER_UNSAFE", raising=False)
    path.write_text(minimal + "[validation]\nmax_norm = false\n")
    with pytest.raises(ConfigError, match="FEDTIER_UNSAFE=no_norm_bound"):
        load_config("edge", path)
    monkeypatch.setenv("FEDTIER_UNSAFE", "no_norm_bound")
    config = load_config("edge", path)
    assert isinstance(config, EdgeConfig)
    assert config.max_norm is None


async def test_updates_near_float32_max_are_all_folded_none_dropped(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # The overflow of the issue: no norm bound, finite f32 values of 3e38. Every
    # update that got an `accepted` receipt reaches a partial; the epoch that
    # would overflow is cut before the next update is folded, never dropped.
    site = Site(tmp_path, make_config(tmp_path, max_norm=None))
    await site.publish_model(0)
    sent = [
        DEVICES[i].update(np.full(LAYOUT.num_params, 3e38, np.float32), n_samples=1)
        for i in range(3)
    ]
    upstream = MemoryBus(site.nats)
    async with upstream.subscribe(SUBJECTS.to_region(REGION), durable="probe") as partials:
        async with trio.open_nursery() as nursery:
            edge = site.daemon()
            await nursery.start(edge.serve)
            for i, (_, data) in enumerate(sent):
                receipt = await send_and_receipt(Phone(site, DEVICES[i]), data)
                assert receipt.status is ReceiptStatus.ACCEPTED
            edge.request_shutdown()  # flushes the last one
            received = [await receive_partial(partials) for _ in range(3)]
    inputs = [list(partial.inputs) for partial, _, _ in received]
    assert inputs == [[m.update_id] for m, _ in sent]
    for partial, payload, _ in received:
        assert np.isfinite(decode(payload, partial.codec, partial.num_params)).all()


async def test_a_rejection_before_authentication_goes_to_the_topics_device_with_its_ids(
    site: Site, autojump_clock: MockClock
) -> None:
    # docs/protocol.md 4.2: the broker's ACL lets only the topic's device publish
    # there, so that device gets the receipt, never the sender the bytes claim,
    # and the receipt echoes the update id and seq so the device can match it.
    device = DEVICES[0]
    phone = Phone(site, device)
    forged, forged_bytes = STRANGER.update(delta(1), seq=9)  # claims another key id
    tampered, tampered_bytes = device.update(delta(2), seq=4)
    tampered_bytes = _tamper_signature(tampered_bytes)
    async with trio.open_nursery() as nursery:
        await nursery.start(site.daemon().serve)
        async with (
            phone.receipts() as mine,
            Phone(site, STRANGER).receipts() as theirs,
        ):
            await phone.send(forged_bytes)
            first = await next_receipt(mine)
            await phone.send(tampered_bytes)
            second = await next_receipt(mine)
            with trio.move_on_after(30):  # virtual seconds: nothing went to the claimed sender
                stray = await theirs.receive()
                pytest.fail(f"a receipt went to the claimed sender: {stray!r}")
        nursery.cancel_scope.cancel()
    assert (first.device, first.update_id, first.update_seq) == (
        device.key_id,
        forged.update_id,
        9,
    )
    assert (first.status, first.reason) == (ReceiptStatus.REJECTED, "malformed")
    assert (second.device, second.update_id, second.update_seq) == (
        device.key_id,
        tampered.update_id,
        4,
    )
    assert (second.status, second.reason) == (ReceiptStatus.REJECTED, "bad_signature")


# -- intake cost: decode once, a tuned collector ------------------------------------------


@pytest.mark.parametrize(
    "codec",
    [
        CodecSpec("f32"),
        CodecSpec("i8", chunk=4),
        CodecSpec("i8", chunk=4, k=3, index="u32"),
        CodecSpec("i8", chunk=2, k=2, index="varint"),
    ],
    ids=str,
)
def test_an_accepted_update_is_folded_from_its_admission_decode(
    codec: CodecSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Admission parses, checks and (i8) dequantizes the payload once; the fold reuses
    # that work instead of parsing the bytes again, and folds exactly the same sums.
    rules = AdmissionRules(
        fleet=FLEET,
        limits=Limits(),
        staleness=StalenessPolicy(max_staleness=2),
        max_norm=0.5,  # clips each of these: the scale comes from the carried norm
        norm_policy="clip",
    )
    model = ModelView(0, LAYOUT.fingerprint, LAYOUT.num_params)
    accepted = []
    for i, device in enumerate(DEVICES[:3]):
        _message, data = device.update(delta(i), codec=codec, n_samples=3 + i)
        decision = admit_update(
            data,
            rules=rules,
            senders=edge_keys().senders,
            model=model,
            seen=NothingSeen(),
            influence=InfluenceState(rules.influence, rules.max_norm),
        )
        assert decision.accepted is not None, decision
        assert decision.accepted.decoded is not None
        assert decision.accepted.clipped
        accepted.append(decision.accepted)
    reference = TierBuffer(LAYOUT.num_params)
    for a in accepted:
        # The refold after a restart: no decode carried, the payload bytes parsed anew.
        reference.refold(
            a.message,
            a.payload,
            tau=a.tau,
            discount=a.discount,
            clip_scale=a.clip_scale,
            now=0.0,
            accepted_ms=0,
            n_samples=a.n_samples,
        )

    def parse_again(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fold parsed the payload again")

    monkeypatch.setattr("fedtier.tiers.core._buffer.fold_into", parse_again)
    buffer = TierBuffer(LAYOUT.num_params)
    for a in accepted:
        buffer.fold(a, now=0.0, accepted_ms=0)
    assert buffer.accumulator.numerator.tobytes() == reference.accumulator.numerator.tobytes()
    assert buffer.accumulator.weight_sum == reference.accumulator.weight_sum


async def test_gc_tuning_is_applied_once_started_and_only_when_asked(
    site: Site, autojump_clock: MockClock
) -> None:
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(site.daemon().serve)  # a test process runs many: untouched
            assert gc.get_threshold() == before
            assert gc.get_freeze_count() == frozen
            nursery.cancel_scope.cancel()
        tuned = EdgeDaemon(
            replace(site.config, state_dir=site.tmp / "tuned"),
            mqtt=MemoryBus(site.mqtt),
            nats=MemoryBus(site.nats),
            registry_store=site.registry,
            keys=edge_keys(),
            store_in_thread=False,
            gc_tuning=True,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(tuned.serve)
            assert gc.get_threshold() == (max(before[0], GC_GEN0_THRESHOLD), *before[1:])
            assert gc.get_freeze_count() > frozen
            # Still admits and answers updates.
            _message, data = DEVICES[0].update(delta(1))
            receipt = await send_and_receipt(Phone(site, DEVICES[0]), data)
            assert receipt.status is ReceiptStatus.ACCEPTED
            nursery.cancel_scope.cancel()
    finally:
        if frozen == 0:
            gc.unfreeze()  # else what was frozen before cannot be told apart: left frozen
        gc.set_threshold(*before)
