"""The device loop against a fake edge on the in-memory MQTT broker: receipts, resends, restarts."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from trio.testing import MockClock

from fedtier.client.config import build_trainer, load_device_settings, load_training_data
from fedtier.client.device import DeviceConfig, DeviceReport, serve_device
from fedtier.client.model_store import ModelStore
from fedtier.client.outbox import Outbox
from fedtier.client.trainers import NumpyLogRegTrainer
from fedtier.protocol.bus import Bus, MemoryBroker, MemoryBus, PublishAck
from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import open_envelope, payload_digest, seal
from fedtier.protocol.errors import BusUnavailable, ConfigError
from fedtier.protocol.files import save_public_key
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.messages import (
    DeviceUpdate,
    ModelAnnouncement,
    ModelBlob,
    Receipt,
    ReceiptStatus,
)
from fedtier.protocol.names import MqttTopics
from fedtier.protocol.telemetry import ATTR_DEVICE, ATTR_MODEL_VERSION, ATTR_UPDATE_ID
from tests.samples import CENTRAL, CREATED_MS, DEVICE, EDGE

FLEET, SITE = "acme", "site-1"
TOPICS = MqttTopics(FLEET, SITE)


def _trainer() -> NumpyLogRegTrainer:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(24, 4)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    return NumpyLogRegTrainer(4, 2, X, y, epochs=1, batch_size=8, lr=0.1, seed=0)


LAYOUT = _trainer().layout


async def publish_model(bus: Bus, version: int) -> None:
    """Play the central: retained signed pointer and blob for ``version``."""
    params = np.full(LAYOUT.num_params, 0.01 * version, np.float32)
    spec = CodecSpec("f32")
    payload = encode(params, spec)
    blob = ModelBlob(
        fleet=FLEET,
        sender=CENTRAL.key_id,
        seq=version,
        created_ms=CREATED_MS,
        version=version,
        layout=LAYOUT.fingerprint,
        num_params=LAYOUT.num_params,
        codec=spec,
        tensors=LAYOUT,
    )
    pointer = ModelAnnouncement(
        fleet=FLEET,
        sender=CENTRAL.key_id,
        seq=version,
        created_ms=CREATED_MS,
        version=version,
        layout=LAYOUT.fingerprint,
        num_params=LAYOUT.num_params,
        blob_blake3=payload_digest(payload),
        blob_size=len(payload),
        update_count=0,
    )
    await bus.publish(TOPICS.model_pointer(), seal(pointer, b"", CENTRAL), retain=True)
    await bus.publish(TOPICS.model_blob(), seal(blob, payload, CENTRAL), retain=True)


@dataclass
class Seen:
    update: DeviceUpdate
    raw: bytes
    headers: dict[str, str]


@dataclass
class FakeEdge:
    """Verifies updates, dedupes by update id and answers with signed receipts."""

    bus: MemoryBus
    drop_receipts: int = 0  # receipts to lose (the edge still accepts the update)
    reject: int = 0  # updates to reject
    reject_reason: str = "stale"
    forge_first: bool = False  # send a receipt signed by an untrusted key first
    answer: bool = True
    after_receipt: Callable[[int], Awaitable[None]] | None = None
    seen: list[Seen] = field(default_factory=list)
    accepted: set[bytes] = field(default_factory=set)
    got_update: trio.Event = field(default_factory=trio.Event)
    _seq: int = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.bus.subscribe(TOPICS.updates_filter(), durable="edge") as sub:
            task_status.started()
            while True:
                delivery = await sub.receive()
                env = open_envelope(delivery.payload, {DEVICE.key_id: DEVICE.verify_key})
                update = env.message
                assert isinstance(update, DeviceUpdate)
                self.seen.append(Seen(update, delivery.payload, dict(delivery.headers)))
                self.got_update.set()
                if self.answer:
                    await self._answer(update)
                await delivery.ack()

    async def _answer(self, update: DeviceUpdate) -> None:
        reason = ""
        if update.update_id in self.accepted:
            status = ReceiptStatus.DUPLICATE
        elif self.reject:
            self.reject -= 1
            status, reason = ReceiptStatus.REJECTED, self.reject_reason
        else:
            status = ReceiptStatus.ACCEPTED
            self.accepted.add(update.update_id)
        if self.drop_receipts:
            self.drop_receipts -= 1
            return
        signers = [IMPOSTOR, EDGE] if self.forge_first else [EDGE]
        self.forge_first = False
        for signer in signers:
            self._seq += 1
            receipt = Receipt(
                fleet=FLEET,
                sender=signer.key_id,
                seq=self._seq,
                created_ms=CREATED_MS,
                update_id=update.update_id,
                device=update.sender,
                update_seq=update.seq,
                status=status,
                reason=reason,
                model_version=7,
            )
            await self.bus.publish(TOPICS.receipt(update.sender), seal(receipt, b"", signer))
        if self.after_receipt is not None:
            await self.after_receipt(len(self.seen))


IMPOSTOR = SigningIdentity.from_seed(b"\x42" * 32)


def _config(**overrides: Any) -> DeviceConfig:
    overrides.setdefault("model_wait_s", 0.0)
    return DeviceConfig(fleet=FLEET, site=SITE, trusted_edges=(EDGE.verify_key,), **overrides)


async def run_device(
    broker: MemoryBroker, outbox: Outbox, config: DeviceConfig, *, bus: Bus | None = None
) -> DeviceReport:
    bus = bus or MemoryBus(broker)
    store = ModelStore(CENTRAL.verify_key, LAYOUT, FLEET)
    return await serve_device(
        config, DEVICE, bus, _trainer(), store, outbox, limiter=trio.CapacityLimiter(1)
    )


async def run_with_edge(
    edge: FakeEdge, outbox: Outbox, config: DeviceConfig, *, bus: Bus | None = None
) -> DeviceReport:
    async with trio.open_nursery() as nursery:
        await nursery.start(edge.serve)
        report = await run_device(edge.bus._broker, outbox, config, bus=bus)
        nursery.cancel_scope.cancel()
    return report


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker("mqtt")


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.sqlite", first_seq=100) as box:
        yield box


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer", lambda name, *a, **k: provider.get_tracer(name))
    yield exporter
    provider.shutdown()


async def test_updates_are_accepted_once_and_leave_the_outbox(
    broker: MemoryBroker, outbox: Outbox, spans: InMemorySpanExporter
) -> None:
    edge = FakeEdge(MemoryBus(broker))
    await publish_model(edge.bus, 1)
    report = await run_with_edge(edge, outbox, _config(rounds=3, codec="i8"))
    ids = [s.update.update_id for s in edge.seen]
    assert len(ids) == 3 == len(set(ids))
    assert [s.update.seq for s in edge.seen] == [100, 101, 102]
    assert all(s.update.base_version == 1 for s in edge.seen)
    assert all(s.update.codec == CodecSpec("i8", chunk=512) for s in edge.seen)
    assert all(s.update.n_samples == 24 for s in edge.seen)
    assert dict(edge.seen[0].update.metrics).keys() >= {"loss", "accuracy"}
    assert (report.sent, report.accepted, report.resends, report.rejected) == (3, 3, 0, 0)
    assert report.last_model_version == 1
    assert report.edge_model_version == 7
    assert outbox.pending() == []
    assert [e.event.value for e in outbox.log()] == ["sent", "receipt_accepted"] * 3
    # The send span's context travels in the MQTT headers.
    finished = spans.get_finished_spans()
    assert [s.name for s in finished] == ["device send"] * 3
    first = finished[0]
    assert first.attributes is not None
    assert first.attributes[ATTR_UPDATE_ID] == ids[0].hex()
    assert first.attributes[ATTR_DEVICE] == DEVICE.key_id
    assert first.attributes[ATTR_MODEL_VERSION] == 1
    traceparent = edge.seen[0].headers["traceparent"]
    assert traceparent.split("-")[1] == f"{first.context.trace_id:032x}"


async def test_lost_receipt_means_same_bytes_resent_and_duplicate(
    broker: MemoryBroker, outbox: Outbox, autojump_clock: MockClock
) -> None:
    edge = FakeEdge(MemoryBus(broker), drop_receipts=1)
    await publish_model(edge.bus, 1)
    start = trio.current_time()
    report = await run_with_edge(edge, outbox, _config(rounds=1, receipt_timeout_s=30.0))
    assert len(edge.seen) == 2
    assert edge.seen[0].raw == edge.seen[1].raw  # same id, seq and signature
    assert (report.sent, report.resends, report.duplicates, report.delivered) == (1, 1, 1, 1)
    assert trio.current_time() - start == pytest.approx(30.0)
    assert outbox.pending() == []
    assert [e.event.value for e in outbox.log()] == ["sent", "resent", "receipt_duplicate"]


async def test_rejected_update_is_not_resent(
    broker: MemoryBroker, outbox: Outbox, autojump_clock: MockClock
) -> None:
    edge = FakeEdge(MemoryBus(broker), reject=1)
    await publish_model(edge.bus, 1)
    report = await run_with_edge(edge, outbox, _config(rounds=1))
    ids = [s.update.update_id for s in edge.seen]
    assert len(ids) == 2 == len(set(ids))  # the rejected one once, then a new one
    assert (report.rejected, report.accepted, report.resends) == (1, 1, 0)
    assert report.rejections == {"stale": 1}
    assert outbox.pending() == []
    rejected = [e for e in outbox.log() if e.event.value == "receipt_rejected"]
    assert [(e.update_id, e.reason) for e in rejected] == [(ids[0].hex(), "stale")]


async def test_unauthenticated_rejection_is_not_final(
    broker: MemoryBroker, outbox: Outbox, autojump_clock: MockClock
) -> None:
    # "bad_signature" is what an edge says of bytes it could not verify: a forger who
    # copies our update id could provoke it, so the device keeps the update and resends.
    edge = FakeEdge(MemoryBus(broker), reject=1, reject_reason="bad_signature")
    await publish_model(edge.bus, 1)
    report = await run_with_edge(edge, outbox, _config(rounds=1, receipt_timeout_s=30.0))
    assert [s.raw for s in edge.seen] == [edge.seen[0].raw] * 2  # the same update, resent
    assert report.unconfirmed_rejections == {"bad_signature": 1}
    assert (report.rejected, report.accepted, report.resends) == (0, 1, 1)
    assert outbox.pending() == []


async def test_restarted_device_resends_its_outbox_first(
    broker: MemoryBroker, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.sqlite"
    silent = FakeEdge(MemoryBus(broker), answer=False)
    await publish_model(silent.bus, 1)
    with Outbox(path, first_seq=100) as box:
        async with trio.open_nursery() as nursery:
            await nursery.start(silent.serve)
            nursery.start_soon(run_device, broker, box, _config())
            await silent.got_update.wait()
            nursery.cancel_scope.cancel()  # the device "crashes" waiting for its receipt
        assert [p.update_id for p in box.pending()] == [silent.seen[0].update.update_id]
    with Outbox(path) as box:
        edge = FakeEdge(MemoryBus(broker))
        report = await run_with_edge(edge, box, _config(rounds=2))
        assert edge.seen[0].raw == silent.seen[0].raw
        assert edge.seen[1].update.seq > edge.seen[0].update.seq
        assert (report.sent, report.resends, report.accepted) == (1, 1, 2)
        assert box.pending() == []


async def test_untrusted_receipt_is_ignored(
    broker: MemoryBroker, outbox: Outbox, autojump_clock: MockClock
) -> None:
    edge = FakeEdge(MemoryBus(broker), forge_first=True)
    await publish_model(edge.bus, 1)
    report = await run_with_edge(edge, outbox, _config(rounds=1))
    assert report.bad_receipts == {"unknown_sender": 1}
    assert (report.accepted, report.resends) == (1, 0)


async def test_waits_for_a_newer_model_when_told_to(
    broker: MemoryBroker, outbox: Outbox, autojump_clock: MockClock
) -> None:
    edge = FakeEdge(MemoryBus(broker))

    async def next_version(count: int) -> None:
        await publish_model(edge.bus, count + 1)

    edge.after_receipt = next_version
    await publish_model(edge.bus, 1)
    await run_with_edge(edge, outbox, _config(rounds=3, model_wait_s=None))
    assert [s.update.base_version for s in edge.seen] == [1, 2, 3]


async def test_publish_retried_while_the_bus_is_unavailable(
    broker: MemoryBroker, outbox: Outbox, autojump_clock: MockClock
) -> None:
    class FlakyBus(MemoryBus):
        failures = 2

        async def publish(self, subject: str, payload: bytes, **kwargs: Any) -> PublishAck:
            if "/up/" in subject and self.failures:
                self.failures -= 1
                raise BusUnavailable("broker connection lost")
            return await super().publish(subject, payload, **kwargs)

    edge = FakeEdge(MemoryBus(broker))
    await publish_model(edge.bus, 1)
    flaky = FlakyBus(broker)
    report = await run_with_edge(edge, outbox, _config(rounds=1), bus=flaky)
    assert len(edge.seen) == 1
    assert (report.sent, report.resends, report.accepted) == (1, 0, 1)
    assert flaky.failures == 0


# -- the device configuration file ----------------------------------------------


def _write_config(tmp_path: Path, extra_send: str = "") -> Path:
    save_public_key(EDGE.verify_key, tmp_path / "edge.pub.pem")
    (tmp_path / "device.toml").write_text(
        f"""
[device]
fleet = "acme"
site = "site-1"
identity_key = "keys/device.pem"
outbox = "state/outbox.sqlite"
data = "data.npz"

[central]
public_key = "central.pub.pem"

[edges]
public_keys = ["edge.pub.pem"]
public_keys_hex = ["{IMPOSTOR.verify_key.raw.hex()}"]

[mqtt]
host = "localhost"
port = 1884

[send]
codec = "top1%+i8"
{extra_send}

[schedule]
rounds = 4
wait_for_new_model = true

[training]
model = "logreg"
num_classes = 2
"""
    )
    return tmp_path / "device.toml"


def test_config_file_loads(tmp_path: Path) -> None:
    settings = load_device_settings(_write_config(tmp_path))
    assert settings.device.fleet == "acme"
    assert settings.device.trusted_edges == (EDGE.verify_key, IMPOSTOR.verify_key)
    assert settings.device.rounds == 4
    assert settings.device.model_wait_s is None
    assert settings.device.resolve_codec(1000) == CodecSpec("i8", 512, 10, "u32")
    assert settings.identity_key == tmp_path / "keys/device.pem"
    assert settings.mqtt.port == 1884
    assert settings.model_cache is None
    assert settings.training.num_classes == 2


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"send\.max_attempts is 'five'"):
        load_device_settings(_write_config(tmp_path, 'max_attempts = "five"'))
    with pytest.raises(ConfigError, match="unknown key 'max_atempts'"):
        load_device_settings(_write_config(tmp_path, "max_atempts = 3"))


def test_training_data_and_trainer_from_config(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", X=rng.normal(size=(10, 4)), y=np.arange(10) % 2)
    settings = load_device_settings(_write_config(tmp_path))
    X, y = load_training_data(settings.data)
    assert (X.dtype, y.dtype) == (np.dtype(np.float32), np.dtype(np.int64))
    assert build_trainer(settings.training, X, y).layout == LAYOUT
    np.savez(tmp_path / "bad.npz", X=np.array([{"a": 1}], dtype=object), y=np.arange(1))
    with pytest.raises(ConfigError):
        load_training_data(tmp_path / "bad.npz")


async def test_unsafe_trust_puback_resolves_on_the_broker_ack(
    broker: MemoryBroker, outbox: Outbox, autojump_clock: MockClock
) -> None:
    # UNSAFE (chaos suite): an edge that never answers still leaves the device
    # believing its updates were accepted.
    silent = FakeEdge(MemoryBus(broker), answer=False)
    await publish_model(silent.bus, 1)
    report = await run_with_edge(silent, outbox, _config(rounds=2, unsafe_trust_puback=True))
    assert (report.sent, report.accepted, report.resends) == (2, 2, 0)
    assert len(silent.seen) == 2
    assert outbox.pending() == []
    assert [e.event.value for e in outbox.log()] == ["sent", "receipt_accepted"] * 2
