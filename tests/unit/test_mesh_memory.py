"""Two edges -> one regional -> one central, on in-memory buses, end to end through the daemons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from fedtier.protocol.bus import MemoryBroker, MemoryBus
from fedtier.protocol.codecs import CodecSpec, decode
from fedtier.protocol.envelope import open_envelope
from fedtier.protocol.identity import SigningIdentity, VerifyKey
from fedtier.protocol.messages import ModelAnnouncement, ModelBlob, Receipt, ReceiptStatus
from fedtier.protocol.names import MqttTopics
from fedtier.simulations.testing import SimDevice
from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.central import CentralDaemon
from fedtier.tiers.config import CentralConfig, EdgeConfig, RegionalConfig, load_initial_model
from fedtier.tiers.edge import EdgeDaemon
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.model_registry import MemoryModelRegistry
from fedtier.tiers.regional import RegionalDaemon
from fedtier.tiers.registry import KeyRegistry, TierKeys

FLEET, REGION = "acme", "eu"
SITES = ("north", "south")
CENTRAL = SigningIdentity.from_seed(b"\x01" * 32)
REGIONAL = SigningIdentity.from_seed(b"\x02" * 32)
EDGES = {site: SigningIdentity.from_seed(bytes([3 + i]) * 32) for i, site in enumerate(SITES)}
CENTRAL_HEX = CENTRAL.verify_key.raw.hex()
CENTRAL_KEYS = {CENTRAL.key_id: CENTRAL.verify_key}
NOW_MS = 1_764_288_000_000


def write_model(path: Path) -> None:
    rng = np.random.default_rng(7)
    arrays = {
        "encoder.weight": rng.standard_normal((4, 3)).astype(np.float32),
        "encoder.bias": np.zeros(4, np.float32),
        "head.weight": rng.standard_normal((2, 4)).astype(np.float32),
    }
    np.savez(path, **arrays)  # type: ignore[arg-type]


async def test_updates_flow_up_and_a_new_version_comes_down(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    model_file = tmp_path / "init.npz"
    write_model(model_file)
    layout, params0 = load_initial_model(model_file)
    nats = MemoryBroker("nats")
    registry = MemoryModelRegistry()
    mqtt = {site: MemoryBroker("mqtt") for site in SITES}
    devices = {
        site: [
            SimDevice(SigningIdentity.from_seed(bytes([20 + 5 * i + j]) * 32), FLEET, layout)
            for j in range(3)
        ]
        for i, site in enumerate(SITES)
    }
    codecs = [CodecSpec("f32"), CodecSpec("f16"), CodecSpec("i8", chunk=8)]

    central = CentralDaemon(
        CentralConfig(
            fleet=FLEET,
            identity_key=tmp_path / "unused.pem",
            state_dir=tmp_path / "central",
            central_key=CENTRAL_HEX,
            initial_model=model_file,
            flush=FlushPolicy(max_inputs=1, max_age_s=None),
            commit_window_s=0.001,
        ),
        nats=MemoryBus(nats),
        registry=registry,
        keys=TierKeys(
            CENTRAL,
            KeyRegistry.from_keys({"eu": REGIONAL.verify_key}, role="regional"),
            CENTRAL.verify_key,
        ),
        clock_ms=lambda: NOW_MS,
        store_in_thread=False,
    )
    regional = RegionalDaemon(
        RegionalConfig(
            fleet=FLEET,
            region=REGION,
            identity_key=tmp_path / "unused.pem",
            state_dir=tmp_path / "regional",
            central_key=CENTRAL_HEX,
            flush=FlushPolicy(max_inputs=2, max_age_s=None),
            commit_window_s=0.001,
        ),
        nats=MemoryBus(nats),
        registry_store=registry,
        keys=TierKeys(
            REGIONAL,
            KeyRegistry.from_keys({s: e.verify_key for s, e in EDGES.items()}, role="edge"),
            CENTRAL.verify_key,
        ),
        clock_ms=lambda: NOW_MS,
        store_in_thread=False,
    )
    edges = {
        site: EdgeDaemon(
            EdgeConfig(
                fleet=FLEET,
                site=site,
                region=REGION,
                identity_key=tmp_path / "unused.pem",
                state_dir=tmp_path / f"edge-{site}",
                central_key=CENTRAL_HEX,
                flush=FlushPolicy(max_inputs=3, max_age_s=None),
                commit_window_s=0.001,
            ),
            mqtt=MemoryBus(mqtt[site]),
            nats=MemoryBus(nats),
            registry_store=registry,
            keys=TierKeys(
                EDGES[site],
                KeyRegistry.from_keys(
                    {f"veh-{j}": d.identity.verify_key for j, d in enumerate(devices[site])},
                    role="device",
                ),
                CENTRAL.verify_key,
            ),
            clock_ms=lambda: NOW_MS,
            store_in_thread=False,
        )
        for site in SITES
    }

    sent = []
    async with trio.open_nursery() as nursery:
        await nursery.start(central.serve)
        await nursery.start(regional.serve)
        for edge in edges.values():
            await nursery.start(edge.serve)
        for i, site in enumerate(SITES):
            topics = MqttTopics(FLEET, site)
            bus = MemoryBus(mqtt[site])
            for j, device in enumerate(devices[site]):
                rng = np.random.default_rng(100 * i + j)
                values = rng.standard_normal(layout.num_params).astype(np.float32) * 0.1
                message, data = device.update(values, n_samples=5 + 3 * j, codec=codecs[j])
                sent.append((message, data))
                async with bus.subscribe(topics.receipt(device.key_id)) as receipts:
                    await bus.publish(topics.update(device.key_id), data)
                    delivery = await receipts.receive()
                receipt = open_envelope(
                    delivery.payload, {EDGES[site].key_id: EDGES[site].verify_key}
                )
                assert isinstance(receipt.message, Receipt)
                assert receipt.message.status is ReceiptStatus.ACCEPTED

        # Each site's devices find version 1, retained, signed by the central.
        for site in SITES:
            topics = MqttTopics(FLEET, site)
            bus = MemoryBus(mqtt[site])
            version = -1
            async with bus.subscribe(topics.model_pointer()) as pointers:
                while version < 1:
                    pointer = open_envelope((await pointers.receive()).payload, CENTRAL_KEYS)
                    assert isinstance(pointer.message, ModelAnnouncement)
                    version = pointer.message.version
            async with bus.subscribe(topics.model_blob()) as blobs:
                blob_delivery = await blobs.receive()
                assert blob_delivery.retained
                blob = open_envelope(blob_delivery.payload, CENTRAL_KEYS)
                assert isinstance(blob.message, ModelBlob)
                assert blob.message.version == 1
            assert edges[site].known_version == 1

        await wait_all_tasks_blocked()
        assert central.version == 1
        assert regional.known_version == 1
        lineage = central.lineage(1)
        assert central.params is not None
        params1 = central.params.copy()
        nursery.cancel_scope.cancel()

    # The lineage of version 1 is exactly the accepted updates.
    assert sorted(lineage) == sorted(m.update_id for m, _ in sent)
    assert len(lineage) == 6
    # Invariant (docs/architecture.md, aggregation): with no extra delay,
    # edge -> regional -> central equals one flat aggregation of every update.
    flat = Accumulator(layout.num_params)
    for message, data in sent:
        envelope = open_envelope(data, {message.sender: devices_key(devices, message.sender)})
        flat.fold_update(
            message.update_id,
            decode(envelope.payload, message.codec, message.num_params),
            n_samples=message.n_samples,
            tau=0,
            discount=1.0,
            base_version=0,
        )
    # FedAvg with lr = 1: model_1 - model_0 is the central's aggregate.
    np.testing.assert_allclose(params1 - params0, flat.result(), rtol=1e-5, atol=1e-7)
    for site in SITES:
        assert edges[site].counts[("accepted", "")] == 3
    assert regional.counts[("accepted", "")] == 2
    assert central.counts[("accepted", "")] == 1


def devices_key(devices: dict[str, list[SimDevice]], key_id: str) -> VerifyKey:
    for group in devices.values():
        for device in group:
            if device.key_id == key_id:
                return device.identity.verify_key
    raise KeyError(key_id)
