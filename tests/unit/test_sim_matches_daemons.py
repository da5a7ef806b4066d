"""Same signed updates through the real daemons (in-memory buses) and the simulator's tiers.

Two edges -> one regional -> one central, two versions, mixed codecs and a
stale update in the second round: the simulator's nodes must make the same
model versions as the daemons, bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from fedtier.protocol.bus import MemoryBroker, MemoryBus
from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.envelope import open_envelope
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout, layout_of
from fedtier.protocol.messages import ModelAnnouncement, Receipt, ReceiptStatus, Tier
from fedtier.protocol.names import MqttTopics
from fedtier.simulations.sim.nodes import CentralNode, SimKeys, TierNode
from fedtier.simulations.testing import SimDevice, sign_partial
from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.central import CentralDaemon
from fedtier.tiers.config import CentralConfig, EdgeConfig, RegionalConfig, load_initial_model
from fedtier.tiers.edge import EdgeDaemon
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.model_registry import MemoryModelRegistry
from fedtier.tiers.optimizers import make_optimizer
from fedtier.tiers.regional import RegionalDaemon
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.tiers.staleness import StalenessPolicy

FLEET, REGION = "acme", "eu"
SITES = ("north", "south")
CENTRAL = SigningIdentity.from_seed(b"\x11" * 32)
REGIONAL = SigningIdentity.from_seed(b"\x12" * 32)
EDGES = {site: SigningIdentity.from_seed(bytes([0x13 + i]) * 32) for i, site in enumerate(SITES)}
NOW_MS = 1_764_288_000_000
STALENESS = StalenessPolicy(kind="fedbuff", max_staleness=8)
EDGE_FLUSH = FlushPolicy(max_inputs=3, max_age_s=None)
REGIONAL_FLUSH = FlushPolicy(max_inputs=2, max_age_s=None)
CENTRAL_FLUSH = FlushPolicy(max_inputs=1, max_age_s=None)
CODECS = (CodecSpec("f32"), CodecSpec("f16"), CodecSpec("i8", chunk=8))
# Round 2 mixes fresh and stale (trained from v0 while the edges know v1) updates.
BASES = {1: (0, 0, 0), 2: (1, 0, 1)}

Devices = Mapping[str, Sequence[SimDevice]]  # per site, in sending order
Rounds = Mapping[int, Mapping[str, Sequence[bytes]]]  # round -> site -> signed updates
Optimizer = tuple[str, Mapping[str, float]]  # config name and parameters
Versions = dict[int, npt.NDArray[np.float32]]  # version number -> model


def write_model(path: Path) -> None:
    rng = np.random.default_rng(3)
    np.savez(
        path,
        **{  # type: ignore[arg-type]
            "weight": rng.standard_normal((3, 5)).astype(np.float32),
            "bias": np.zeros(3, np.float32),
        },
    )


def signed_updates(
    layout: ModelLayout, devices: Devices, round_number: int
) -> dict[str, list[bytes]]:
    """Each site's three signed updates of one round, in sending order."""
    out: dict[str, list[bytes]] = {}
    for i, site in enumerate(SITES):
        out[site] = []
        for j, device in enumerate(devices[site]):
            rng = np.random.default_rng(1000 * round_number + 10 * i + j)
            delta = (rng.standard_normal(layout.num_params) * 0.1).astype(np.float32)
            _message, envelope = device.update(
                delta,
                base_version=BASES[round_number][j],
                n_samples=4 + 5 * j + i,
                codec=CODECS[j],
                update_id=bytes([round_number, i, j]) * 5 + b"\x00",
                seq=round_number,
            )
            out[site].append(envelope)
    return out


async def run_daemons(
    tmp_path: Path,
    layout: ModelLayout,
    model_file: Path,
    devices: Devices,
    rounds: Rounds,
    optimizer: Optimizer,
) -> Versions:
    nats = MemoryBroker("nats")
    registry = MemoryModelRegistry()
    mqtt = {site: MemoryBroker("mqtt") for site in SITES}
    central_hex = CENTRAL.verify_key.raw.hex()
    name, params = optimizer
    central = CentralDaemon(
        CentralConfig(
            fleet=FLEET,
            identity_key=tmp_path / "unused.pem",
            state_dir=tmp_path / "central",
            central_key=central_hex,
            initial_model=model_file,
            flush=CENTRAL_FLUSH,
            staleness=STALENESS,
            optimizer_name=name,
            optimizer_params=params,
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
            central_key=central_hex,
            flush=REGIONAL_FLUSH,
            staleness=STALENESS,
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
                central_key=central_hex,
                flush=EDGE_FLUSH,
                staleness=STALENESS,
                commit_window_s=0.001,
            ),
            mqtt=MemoryBus(mqtt[site]),
            nats=MemoryBus(nats),
            registry_store=registry,
            keys=TierKeys(
                EDGES[site],
                KeyRegistry.from_keys(
                    {f"dev-{j}": d.identity.verify_key for j, d in enumerate(devices[site])},
                    role="device",
                ),
                CENTRAL.verify_key,
            ),
            clock_ms=lambda: NOW_MS,
            store_in_thread=False,
        )
        for site in SITES
    }
    versions: Versions = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(central.serve)
        await nursery.start(regional.serve)
        for edge in edges.values():
            await nursery.start(edge.serve)
        for round_number, updates in rounds.items():
            for site in SITES:
                topics = MqttTopics(FLEET, site)
                bus = MemoryBus(mqtt[site])
                for device, envelope in zip(devices[site], updates[site], strict=True):
                    async with bus.subscribe(topics.receipt(device.key_id)) as receipts:
                        await bus.publish(topics.update(device.key_id), envelope)
                        receipt = open_envelope(
                            (await receipts.receive()).payload,
                            {EDGES[site].key_id: EDGES[site].verify_key},
                        )
                    assert isinstance(receipt.message, Receipt)
                    assert receipt.message.status is ReceiptStatus.ACCEPTED
            # Every site relays the new version before the next round is sent.
            for site in SITES:
                bus = MemoryBus(mqtt[site])
                version = -1
                async with bus.subscribe(MqttTopics(FLEET, site).model_pointer()) as pointers:
                    while version < round_number:
                        pointer = open_envelope(
                            (await pointers.receive()).payload,
                            {CENTRAL.key_id: CENTRAL.verify_key},
                        )
                        assert isinstance(pointer.message, ModelAnnouncement)
                        version = pointer.message.version
            await wait_all_tasks_blocked()
            assert central.version == round_number
            assert regional.known_version == round_number
            assert central.params is not None
            versions[round_number] = central.params.copy()
        nursery.cancel_scope.cancel()
    return versions


def fleet_keys(devices: Devices | None = None) -> SimKeys:
    """The key registry the nodes verify with: the test's devices and edges."""
    keys = SimKeys()
    for identity in EDGES.values():
        keys.register(identity)
    for site_devices in (devices or {}).values():
        for device in site_devices:
            keys.register(device.identity)
    return keys


def regional_node(layout: ModelLayout, keys: SimKeys) -> TierNode:
    return TierNode(
        "regional",
        tier=Tier.REGIONAL,
        fleet=FLEET,
        layout=layout,
        flush=REGIONAL_FLUSH,
        staleness=STALENESS,
        partial_codec=CodecSpec("f32"),
        keys=keys,
        identity=REGIONAL,
    )


def run_simulator_nodes(
    layout: ModelLayout,
    params0: npt.NDArray[np.float32],
    rounds: Rounds,
    optimizer: Optimizer,
    devices: Devices,
) -> Versions:
    name, params = optimizer
    keys = fleet_keys(devices)
    edges = {
        site: TierNode(
            f"edge-{site}",
            tier=Tier.EDGE,
            fleet=FLEET,
            layout=layout,
            flush=EDGE_FLUSH,
            staleness=STALENESS,
            partial_codec=CodecSpec("f32"),
            keys=keys,
            identity=EDGES[site],
        )
        for site in SITES
    }
    regional = regional_node(layout, keys)
    central = CentralNode(
        "central",
        params=params0,
        optimizer=make_optimizer(name, **params),
        fleet=FLEET,
        layout=layout,
        flush=CENTRAL_FLUSH,
        staleness=STALENESS,
        keys=keys,
    )
    versions: Versions = {}
    for round_number, updates in rounds.items():
        for site in SITES:
            for envelope in updates[site]:
                assert edges[site].admit_update(envelope, now=0.0) == "accepted"
                if edges[site].due(0.0) is not None:
                    partial = edges[site].cut_partial()
                    assert partial is not None
                    assert regional.admit_partial(partial, now=0.0) == "accepted"
                    if regional.due(0.0) is not None:
                        up = regional.cut_partial()
                        assert up is not None
                        assert central.admit_partial(up, now=0.0) == "accepted"
                        assert central.due(0.0) is not None
                        assert central.make_version()
        assert central.version == round_number
        for node in (*edges.values(), regional):
            node.known_version = central.version
        versions[round_number] = central.params.copy()
    return versions


@pytest.mark.parametrize(
    "optimizer",
    [("fedavg", {"lr": 1.0}), ("fedadam", {"lr": 0.05})],
    ids=["fedavg", "fedadam"],
)
async def test_simulator_tiers_make_the_daemons_model_versions(
    tmp_path: Path, autojump_clock: MockClock, optimizer: Optimizer
) -> None:
    model_file = tmp_path / "init.npz"
    write_model(model_file)
    layout, params0 = load_initial_model(model_file)
    devices = {
        site: [
            SimDevice(SigningIdentity.from_seed(bytes([0x40 + 3 * i + j]) * 32), FLEET, layout)
            for j in range(3)
        ]
        for i, site in enumerate(SITES)
    }
    rounds = {r: signed_updates(layout, devices, r) for r in BASES}

    daemon_versions = await run_daemons(tmp_path, layout, model_file, devices, rounds, optimizer)
    sim_versions = run_simulator_nodes(layout, params0, rounds, optimizer, devices)

    assert sorted(daemon_versions) == sorted(sim_versions) == [1, 2]
    for version in (1, 2):
        np.testing.assert_array_equal(sim_versions[version], daemon_versions[version])
    # The stale updates of round 2 were discounted, not dropped: v2 moved.
    assert not np.array_equal(daemon_versions[2], daemon_versions[1])


def test_the_simulators_regional_folds_a_late_partial_as_the_daemon_does() -> None:
    # tests/unit/test_regional.py checks the daemon; the node must not refuse it either.
    layout = layout_of([("w", (4,))])
    child = Accumulator(layout.num_params)
    child.fold_update(
        b"\x01" * 16, np.ones(4, np.float32), n_samples=2, tau=0, discount=1.0, base_version=0
    )
    _message, data = sign_partial(EDGES["north"], FLEET, layout, child, known_version=0)
    node = regional_node(layout, fleet_keys())
    node.known_version = 20  # max_staleness is 8
    assert node.admit_partial(data, now=0.0) == "accepted"
    assert node.counts["late_partial"] == 1
    discount = STALENESS.weight(20)
    np.testing.assert_allclose(
        node.buffer.accumulator.numerator, 2 * discount * np.ones(4), rtol=1e-6
    )
    assert list(node.buffer.accumulator.leaf_ids) == [b"\x01" * 16]
