"""The device loop against a fake edge on the in-memory MQTT broker: receipts, resends, restarts."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
import trio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from trio.testing import MockClock

import fedtier.client
from fedtier.client import runner
from fedtier.client.config import (
    DeviceSettings,
    TrainingSettings,
    build_trainer,
    load_datasets,
    load_device_settings,
    load_training_data,
)
from fedtier.client.device import DeviceConfig, DeviceReport, serve_device
from fedtier.client.model_store import ModelStore
from fedtier.client.outbox import Outbox
from fedtier.client.plugins import DataRequest, Dataset
from fedtier.client.torch_trainer import TorchTrainer, make_mlp
from fedtier.client.trainers import (
    LrSchedule,
    NumpyLogRegTrainer,
    Trainer,
    ValidatingTrainer,
)
from fedtier.protocol.bus import Bus, MemoryBroker, MemoryBus, PublishAck
from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import open_envelope, payload_digest, seal
from fedtier.protocol.errors import BusUnavailable, ConfigError
from fedtier.protocol.files import save_public_key, save_signing_identity
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.messages import (
    DeviceUpdate,
    ModelAnnouncement,
    ModelBlob,
    Receipt,
    ReceiptStatus,
)
from fedtier.protocol.model_parts import blob_parts
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


async def publish_model(bus: Bus, version: int, *, part_bytes: int | None = None) -> None:
    """Play the central: retained signed pointer and blob for ``version``.

    With ``part_bytes`` the blob goes as retained parts of that size, as an
    edge sends a blob above its broker's packet limit (``protocol.model_parts``).
    """
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
    sealed = seal(blob, payload, CENTRAL)
    if part_bytes is None:
        await bus.publish(TOPICS.model_blob(), sealed, retain=True)
        return
    for index, (properties, chunk) in enumerate(blob_parts(sealed, part_bytes)):
        await bus.publish(TOPICS.model_blob_part(index), chunk, headers=properties, retain=True)


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
    retry_after_ms: int = 0  # carried by the rejected receipts
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
                retry_after_ms=self.retry_after_ms if reason else 0,
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


async def test_a_blob_in_parts_is_joined_and_loaded_and_leftover_parts_are_ignored(
    broker: MemoryBroker, outbox: Outbox
) -> None:
    edge = FakeEdge(MemoryBus(broker))
    # Leftovers of an older, larger parted blob on indices the new one also uses
    # and beyond: another digest, never complete, never in the way.
    stale = b"s" * 4000
    for index, (properties, chunk) in enumerate(blob_parts(stale, 100)):
        if index >= 3:
            await edge.bus.publish(
                TOPICS.model_blob_part(index), chunk, headers=properties, retain=True
            )
    # A forged part (no property) on a part topic is dropped.
    await edge.bus.publish(TOPICS.model_blob_part(99), b"junk", retain=True)
    await publish_model(edge.bus, 2, part_bytes=100)
    report = await run_with_edge(edge, outbox, _config(rounds=1))
    assert report.last_model_version == 2
    assert report.accepted == 1
    assert edge.seen[0].update.base_version == 2


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


async def test_rate_limited_is_not_final_and_resent_after_retry_after(
    broker: MemoryBroker, outbox: Outbox, autojump_clock: MockClock
) -> None:
    # The edge says "not now, in 5 s": the device keeps the update and resends the
    # same bytes then, without waiting for its receipt timeout.
    edge = FakeEdge(MemoryBus(broker), reject=1, reject_reason="rate_limited", retry_after_ms=5_000)
    await publish_model(edge.bus, 1)
    start = trio.current_time()
    report = await run_with_edge(edge, outbox, _config(rounds=1, receipt_timeout_s=30.0))
    assert [s.raw for s in edge.seen] == [edge.seen[0].raw] * 2
    assert trio.current_time() - start == pytest.approx(5.0)
    assert report.deferred == {"rate_limited": 1}
    assert (report.rejected, report.accepted, report.resends) == (0, 1, 1)
    assert outbox.pending() == []


@pytest.mark.parametrize("reason", ["future_base", "contribution_capped"])
async def test_other_deferrals_are_not_final_either(
    broker: MemoryBroker, outbox: Outbox, autojump_clock: MockClock, reason: str
) -> None:
    # contribution_capped waits for a model newer than the receipt's v7; future_base
    # for a while. Either way the same update is resent and accepted, never dropped.
    edge = FakeEdge(MemoryBus(broker), reject=1, reject_reason=reason)
    await publish_model(edge.bus, 8)
    report = await run_with_edge(edge, outbox, _config(rounds=1, receipt_timeout_s=30.0))
    assert edge.seen[0].raw == edge.seen[1].raw
    assert report.deferred == {reason: 1}
    assert (report.rejected, report.accepted) == (0, 1)
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


OLD_TRAINING = """
[training]
model = "logreg"
num_classes = 2
"""


def _write_config(
    tmp_path: Path,
    extra_send: str = "",
    *,
    data: str = 'data = "data.npz"',
    tail: str = OLD_TRAINING,
) -> Path:
    save_public_key(EDGE.verify_key, tmp_path / "edge.pub")
    (tmp_path / "device.toml").write_text(
        f"""
[device]
fleet = "acme"
site = "site-1"
identity_key = "keys/device.key"
outbox = "state/outbox.sqlite"
{data}

[central]
public_key = "central.pub"

[edges]
public_keys = ["edge.pub"]
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
{tail}
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
    assert settings.identity_key == tmp_path / "keys/device.key"
    assert settings.mqtt.port == 1884
    assert settings.model_cache is None
    assert settings.training.num_classes == 2


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"send\.max_attempts is 'five'"):
        load_device_settings(_write_config(tmp_path, 'max_attempts = "five"'))
    with pytest.raises(ConfigError, match="unknown key 'max_atempts'"):
        load_device_settings(_write_config(tmp_path, "max_atempts = 3"))


def test_training_data_and_trainer_from_config(tmp_path: Path) -> None:
    # The old keys: [device] data (an .npz) and [training] model.
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", X=rng.normal(size=(10, 4)), y=np.arange(10) % 2)
    settings = load_device_settings(_write_config(tmp_path))
    assert settings.data is not None
    assert settings.data.source == str(tmp_path / "data.npz")
    assert (settings.model.factory, settings.training.model) == ("logreg", "logreg")
    X, y = load_training_data(Path(settings.data.source))
    assert (X.dtype, y.dtype) == (np.dtype(np.float32), np.dtype(np.int64))
    assert build_trainer(settings.training, X, y).layout == LAYOUT
    train, validation = load_datasets(settings.data, device=DEVICE.key_id)
    assert validation is None
    assert build_trainer(settings.training, train, model=settings.model).layout == LAYOUT
    np.savez(tmp_path / "bad.npz", X=np.array([{"a": 1}], dtype=object), y=np.arange(1))
    with pytest.raises(ConfigError):
        load_training_data(tmp_path / "bad.npz")


NEW_KEYS = """
[model]
factory = "{module}:make_model"
args = {{ width = 8 }}
batchnorm = "local"

[data]
path = "wine.csv"
label = "quality"
task = "regression"
validation = "wine-val.csv"

[training]
loss = "mse"
optimizer = "adamw"
lr = 0.01
weight_decay = 1e-4
grad_clip = 1.0
lr_schedule = {{ kind = "cosine", period_rounds = 5 }}
batch_size = 8
drop_last = true
epochs = 2
device = "auto"
metrics = ["mae"]
"""

FACTORY = """
import torch

def make_model(width, dataset=None):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(dataset.num_features, width),
        torch.nn.BatchNorm1d(width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 1),
    )
"""


def _wine(path: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    quality = X @ np.array([0.5, -1.0, 2.0]) + 5.0
    rows = [f"{a:.4f},{b:.4f},{c:.4f},{q:.4f}" for (a, b, c), q in zip(X, quality, strict=True)]
    path.write_text("acid,sugar,alcohol,quality\n" + "\n".join(rows) + "\n")


@pytest.fixture
def user_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A model factory in a module outside the repository, on ``sys.path``."""
    folder = tmp_path / "user"
    folder.mkdir()
    name = f"h10a_device_models_{abs(hash(tmp_path)) % 10**8}"
    (folder / f"{name}.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(folder))
    yield name
    sys.modules.pop(name, None)


def test_new_model_data_and_training_keys(tmp_path: Path, user_factory: str) -> None:
    _wine(tmp_path / "wine.csv", 61, seed=0)  # 61 = 7 batches of 8 + a remainder of 5
    _wine(tmp_path / "wine-val.csv", 20, seed=1)
    config = _write_config(tmp_path, data="", tail=NEW_KEYS.format(module=user_factory))
    settings = load_device_settings(config)
    assert settings.model.factory == f"{user_factory}:make_model"
    assert settings.model.args == {"width": 8}
    assert settings.data is not None
    assert settings.data.label == "quality"
    assert settings.data.validation == str(tmp_path / "wine-val.csv")
    training = settings.training
    assert (training.loss, training.optimizer, training.drop_last) == ("mse", "adamw", True)
    assert training.lr_schedule == LrSchedule("cosine", period_rounds=5)
    assert (training.grad_clip, training.metrics, training.device) == (1.0, ("mae",), "auto")

    train, validation = load_datasets(settings.data, device=DEVICE.key_id)
    assert (train.task, train.X.shape) == ("regression", (61, 3))
    assert validation is not None
    trainer = build_trainer(training, train, model=settings.model, validation=validation)
    assert isinstance(trainer, ValidatingTrainer)
    inner = trainer.inner
    assert isinstance(inner, TorchTrainer)
    # FedBN: the BatchNorm layer stays on the device.
    assert [t.name for t in inner.layout.tensors] == ["0.weight", "0.bias", "3.weight", "3.bias"]
    result = trainer.train(inner.initial_params())
    assert result.metrics["steps"] == 14  # drop_last: 7 full batches, twice
    assert {"loss", "r2", "mae", "lr", "val_loss", "val_r2", "val_mae"} <= set(result.metrics)


def test_a_csv_device_file_reads_without_numpys_pickle_message(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b,y\n1,2,0\n3,x,1\n")
    settings = load_device_settings(_write_config(tmp_path, data='data = "data.csv"'))
    assert settings.data is not None
    with pytest.raises(ConfigError, match=r"data\.csv, line 3, column 'b': 'x' is not a number"):
        load_datasets(settings.data, device="d")


@pytest.mark.parametrize(
    ("data", "tail", "message"),
    [
        ('data = "a.npz"', '[data]\npath = "b.npz"', "name the local data once"),
        ("", "", "name the local data once, as data.path"),
        ("", '[data]\nloader = "data/x.csv"', r"data\.loader is 'data/x\.csv'; expected an import"),
        ("", '[data]\npath = "x.csv"\nlabel = true', r"data\.label is true"),
        ("", '[data]\npath = "x.csv"\nargs = { a = 1 }', r"data\.args .* a loader's keyword"),
        (
            'data = "a.npz"',
            '[model]\nfactory = "mlp"\n[training]\nmodel = "logreg"',
            "both name the model",
        ),
        ('data = "a.npz"', '[model]\nfactory = "resnet"', r"model\.factory is 'resnet'"),
        ('data = "a.npz"', '[model]\nbatchnorm = "sometimes"', r"model\.batchnorm"),
        (
            'data = "a.npz"',
            '[training]\nlr_schedule = { kind = "cosine", period = 5 }',
            r"training\.lr_schedule has no key 'period'",
        ),
        (
            'data = "a.npz"',
            '[training]\nlr_schedule = { kind = "linear" }',
            r"training\.lr_schedule: lr schedule kind is 'linear'",
        ),
        ('data = "a.npz"', '[training]\ndevice = "tpu"', r"training\.device is 'tpu'"),
        ('data = "a.npz"', '[training]\nmetrics = ["f1"]', r"training\.metrics: metric 'f1'"),
        ('data = "a.npz"', '[training]\nloss = "hinge"', r"training\.loss is 'hinge'"),
        (
            'data = "a.npz"',
            '[training]\noptimizer = "adam"\nmomentum = 0.9',
            r"training\.momentum is 0\.9; expected 0 with optimizer 'adam'",
        ),
    ],
)
def test_bad_model_data_and_training_keys(
    tmp_path: Path, data: str, tail: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        load_device_settings(_write_config(tmp_path, data=data, tail=tail))
    assert "\n" not in str(exc.value)


def test_options_the_numpy_logreg_lacks_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", X=np.ones((4, 2)), y=np.array([0, 1, 0, 1]))
    tail = '[training]\nmodel = "logreg"\noptimizer = "adam"'
    settings = load_device_settings(_write_config(tmp_path, tail=tail))
    assert settings.data is not None
    train, _ = load_datasets(settings.data, device="d")
    with pytest.raises(ConfigError, match=r"training\.optimizer needs a torch model"):
        build_trainer(settings.training, train, model=settings.model)
    regression = Dataset(np.ones((4, 2), np.float32), np.array([0.5, 1, 2, 3]), task="regression")
    with pytest.raises(ConfigError, match="model logreg classifies"):
        build_trainer(TrainingSettings(), regression)


def test_the_old_mlp_keys_build_the_same_mlp(tmp_path: Path) -> None:
    np.savez(tmp_path / "data.npz", X=np.ones((6, 4)), y=np.arange(6) % 3)
    tail = '[training]\nmodel = "mlp"\nhidden = 5\nnum_classes = 4\nseed = 3'
    settings = load_device_settings(_write_config(tmp_path, tail=tail))
    assert settings.model.args == {"hidden": 5, "seed": 3}
    assert settings.data is not None
    train, _ = load_datasets(settings.data, device="d", num_classes=4)
    trainer = build_trainer(settings.training, train, model=settings.model)
    assert isinstance(trainer, TorchTrainer)
    assert [t.shape for t in trainer.layout.tensors] == [(5, 4), (5,), (4, 5), (4,)]
    expected = TorchTrainer(make_mlp(4, 5, 4, seed=3)).initial_params()
    assert np.array_equal(trainer.initial_params(), expected)


# -- the Python API ---------------------------------------------------------------


def test_run_device_takes_python_objects_and_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "keys").mkdir()
    save_signing_identity(DEVICE, tmp_path / "keys" / "device.key")
    config = _write_config(tmp_path, data="", tail="")  # no data: the API brings it
    seen: dict[str, Any] = {}

    async def fake_serve(
        settings: DeviceSettings, identity: SigningIdentity, trainer: Trainer, **kw: Any
    ) -> DeviceReport:
        seen.update(settings=settings, identity=identity, trainer=trainer, **kw)
        return DeviceReport(accepted=2, duplicates=1, rejected=4)

    monkeypatch.setattr(runner, "_serve", fake_serve)
    requests: list[DataRequest] = []

    def loader(request: DataRequest) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        requests.append(request)
        rng = np.random.default_rng(0)
        return rng.normal(size=(20, 3)).astype(np.float32), np.arange(20) % 2

    def factory() -> torch.nn.Module:
        return torch.nn.Linear(3, 2)

    def zero(pred: npt.NDArray[np.float32], y: npt.NDArray[Any]) -> float:
        return 0.0

    delivered = fedtier.client.run_device(
        config=config,
        model=factory,
        data=loader,
        validation=loader,
        rounds=2,
        optimizer="adam",
        lr=0.01,
        metrics={"zero": zero},
        batchnorm="global",
    )
    assert delivered == 3
    assert [(r.device, r.split) for r in requests] == [
        (DEVICE.key_id, "train"),
        (DEVICE.key_id, "validation"),
    ]
    settings = seen["settings"]
    assert settings.device.rounds == 2
    assert settings.training.optimizer == "adam"
    assert settings.model.batchnorm == "global"
    trainer = seen["trainer"]
    assert isinstance(trainer, ValidatingTrainer)
    assert isinstance(trainer.inner, TorchTrainer)
    metrics = trainer.train(trainer.inner.initial_params()).metrics
    assert {"zero", "val_zero", "val_accuracy"} <= set(metrics)
    with pytest.raises(ConfigError, match="run_device has no option 'learning_rate'"):
        fedtier.client.run_device(config=config, data=loader, learning_rate=0.1)
    with pytest.raises(ConfigError, match="name the local data once"):
        fedtier.client.run_device(config=config)
    with pytest.raises(ConfigError, match="its config names none and data= is not given"):
        fedtier.client.run_device(config=settings)


def test_importing_the_client_api_does_not_import_torch() -> None:
    code = (
        "import sys, fedtier.client as c\n"
        "c.run_device, c.Trainer, c.Dataset, c.load_data\n"
        "import fedtier.client.config, fedtier.client.plugins, fedtier.client.trainers\n"
        "import fedtier.client.torch_trainer\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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
