"""Backpressure at the edge, on real processes: a flood keeps its memory bounded, and a
stuck or flapping device does not hold the healthy ones back.

Each test starts Mosquitto, nats-server and a central, a regional and one edge
daemon (``simulations.mesh``); the test process plays the devices with real
signed updates over MQTT. Nothing waits on a fixed sleep: every wait is for
an event (receipts) under a generous deadline.
"""

from __future__ import annotations

import os
import signal
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import trio

from fedtier.protocol.bus import Bus, Subscription
from fedtier.protocol.bus.mqtt import MqttConfig, open_mqtt_bus
from fedtier.protocol.envelope import open_envelope
from fedtier.protocol.files import load_public_key, load_signing_identity
from fedtier.protocol.identity import VerifyKey
from fedtier.protocol.messages import Receipt, ReceiptStatus
from fedtier.protocol.names import MqttTopics
from fedtier.simulations.fleet import TrainingSpec
from fedtier.simulations.mesh import (
    FlushSpec,
    MeshPlan,
    MeshSpec,
    open_brokers,
    open_mesh,
    prepare_mesh,
)
from fedtier.simulations.processes import Child
from fedtier.simulations.testing import SimDevice
from fedtier.tiers.config import load_initial_model

pytestmark = pytest.mark.brokers

SITE = "s1"
# A 64-256-10 MLP: 19 210 float32 values, a 77 KB update.
HIDDEN = 256
INTAKE_CAPACITY = 64  # simulations.mesh writes it into every daemon config


@dataclass
class Site:
    plan: MeshPlan
    edge: Child
    devices: list[SimDevice]
    topics: MqttTopics

    def mqtt(self, client_id: str) -> MqttConfig:
        return MqttConfig(
            host=self.plan.mqtt_host, port=self.plan.mqtt_port, client_id=client_id,
            shared_durables=False,
        )  # fmt: skip

    def update(self, device: SimDevice, seed: int) -> bytes:
        values = np.random.default_rng(seed).standard_normal(device.layout.num_params)
        return device.update(values.astype(np.float32) * 0.01, base_version=0)[1]


@asynccontextmanager
async def open_site(tmp_path: Path, devices: int) -> AsyncIterator[Site]:
    spec = MeshSpec(
        fleet="bp",
        regions=(("r1", (SITE,)),),
        devices=devices,
        misbehaving=0,
        training=TrainingSpec(hidden=HIDDEN),
        # Every update stays valid however many versions the flood makes.
        max_staleness=1_000_000,
        edge_flush=FlushSpec(32, 1.0),
        shutdown_timeout_s=3.0,
        # A few devices flood on purpose: what is under test is the edge's
        # memory when everything it is sent must be admitted, so the per-device
        # rate limit and contribution cap (which would refuse most of it) are off.
        edge_validation={"rate_per_s": False, "max_updates_per_version": False},
    )
    async with open_brokers(tmp_path / "brokers") as brokers:
        out = tmp_path / "out"
        plan = await trio.to_thread.run_sync(prepare_mesh, spec, tmp_path, out, brokers)
        layout, _ = load_initial_model(plan.initial_model)
        sims = [
            SimDevice(
                load_signing_identity(tmp_path / "keys" / "devices" / f"{d.name}.key"),
                spec.fleet,
                layout,
            )
            for d in plan.devices
        ]
        async with open_mesh(plan, ready_timeout_s=60, stop_grace_s=10) as mesh:
            (edge,) = mesh.edges
            yield Site(plan, edge, sims, MqttTopics(spec.fleet, SITE))


def memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


async def count_receipts(
    sub: Subscription, edge_key: VerifyKey, wanted: int, statuses: list[str]
) -> None:
    while len(statuses) < wanted:
        delivery = await sub.receive()
        await delivery.ack()
        receipt = open_envelope(delivery.payload, {edge_key.key_id: edge_key}).message
        assert isinstance(receipt, Receipt)
        statuses.append(receipt.status.value)


async def test_a_flood_keeps_the_edge_memory_bounded(tmp_path: Path) -> None:
    """The edge reads at most its intake capacity ahead; the backlog waits in the broker.

    The edge is frozen while 1200 updates of 77 KB (92 MB) are published, so the
    whole flood is waiting for it when it wakes. It holds at most
    ``INTAKE_CAPACITY`` deliveries (MQTT subscription capacity and Receive
    Maximum), each alive in up to three copies (the delivery, the stored
    record, the commit queue): 64 x 77 KB x 3 = 15 MB. The bound asserted, 40 MB
    of peak RSS growth, leaves room for sqlite's cache and the allocator, and
    is less than half of what an edge that read the backlog would hold.
    """
    count = 1200
    async with open_site(tmp_path, devices=4) as site:
        pid = site.edge.process.pid
        baseline = memory_kb(pid)["VmRSS"]
        edge_key = load_public_key(tmp_path / "keys" / f"edge-{SITE}.pub")
        statuses: list[str] = []
        with trio.fail_after(240):
            async with open_mqtt_bus(site.mqtt("flooder")) as bus:
                async with bus.subscribe(
                    f"{site.topics.prefix}/receipt/+", durable="flood-receipts", capacity=256
                ) as receipts:
                    os.kill(pid, signal.SIGSTOP)
                    try:
                        await flood(bus, site, count)
                    finally:
                        os.kill(pid, signal.SIGCONT)
                    await count_receipts(receipts, edge_key, count, statuses)
        peak = memory_kb(pid)["VmHWM"]
    assert statuses == [ReceiptStatus.ACCEPTED.value] * count
    growth_mb = (peak - baseline) / 1024
    flood_mb = count * len(site.update(site.devices[0], 0)) / 2**20
    assert flood_mb > 2 * 40
    assert growth_mb < 40, f"edge peak RSS grew {growth_mb:.1f} MB during a {flood_mb:.0f} MB flood"


async def flood(bus: Bus, site: Site, count: int) -> None:
    """Publish ``count`` updates round-robin over the devices, 32 built and in flight at most."""
    limiter = trio.CapacityLimiter(32)

    async def one(i: int) -> None:
        async with limiter:
            device = site.devices[i % len(site.devices)]
            await bus.publish(site.topics.update(device.key_id), site.update(device, i))

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)


async def test_stuck_and_flapping_devices_do_not_hold_back_healthy_ones(tmp_path: Path) -> None:
    """A device that stops reading its receipts, and one that reconnects for every
    update, while three healthy devices each send 20 updates and wait for every
    receipt: the healthy ones all get theirs, and the edge accepted everything
    the stuck device sent although its receipts pile up unread in the broker."""
    async with open_site(tmp_path, devices=5) as site:
        stuck, flapper, *healthy = site.devices
        edge_key = load_public_key(tmp_path / "keys" / f"edge-{SITE}.pub")
        stuck_sent, flaps, per_healthy = 100, 20, 20
        with trio.fail_after(180):
            async with open_mqtt_bus(site.mqtt(f"stuck-{stuck.key_id}")) as stuck_bus:
                # Capacity 1, never received: the bus stops reading the socket, so
                # the broker keeps this device's receipts.
                async with stuck_bus.subscribe(
                    site.topics.receipt(stuck.key_id), durable="stuck", capacity=1
                ):
                    for i in range(stuck_sent):
                        await stuck_bus.publish(
                            site.topics.update(stuck.key_id), site.update(stuck, i)
                        )
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(flap, site, flapper, flaps)
                        for device in healthy:
                            nursery.start_soon(send_and_wait, site, device, per_healthy, edge_key)
            accepted = await trio.to_thread.run_sync(edge_accepted, site.plan)
        assert accepted >= stuck_sent + flaps + len(healthy) * per_healthy


async def send_and_wait(site: Site, device: SimDevice, count: int, edge_key: VerifyKey) -> None:
    async with open_mqtt_bus(site.mqtt(device.key_id)) as bus:
        async with bus.subscribe(site.topics.receipt(device.key_id), durable="r") as receipts:
            for i in range(count):
                await bus.publish(site.topics.update(device.key_id), site.update(device, i))
                statuses: list[str] = []
                await count_receipts(receipts, edge_key, 1, statuses)
                assert statuses == [ReceiptStatus.ACCEPTED.value]


async def flap(site: Site, device: SimDevice, count: int) -> None:
    """Connect, publish one update, disconnect before any receipt; again and again."""
    for i in range(count):
        async with open_mqtt_bus(site.mqtt(device.key_id)) as bus:
            await bus.publish(site.topics.update(device.key_id), site.update(device, i))


def edge_accepted(plan: MeshPlan) -> float:
    url = plan.edge_metrics_urls[f"edge-{SITE}"]
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("fedtier_updates_total{") and 'outcome="accepted"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
