"""Retention and limits: a byte-capped stream on a real nats-server, a start while JetStream
is away, and 24 compressed hours of a mesh whose stores stay under their bounds."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import trio
from trio.testing import MockClock

from fedtier.protocol.bus import MemoryBroker, MemoryBus
from fedtier.protocol.bus.nats import NatsConfig, StreamSpec, open_nats_bus
from fedtier.protocol.envelope import open_envelope
from fedtier.protocol.errors import BusUnavailable
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.messages import Receipt, ReceiptStatus
from fedtier.protocol.names import MqttTopics
from fedtier.simulations.checker import DeviceHistory, check, load_lineage_counts
from fedtier.simulations.testing import NatsServerProcess, SimDevice, find_nats_server, free_port
from fedtier.tiers._health import stream_bytes
from fedtier.tiers._retention import Pruner
from fedtier.tiers.central import CentralDaemon
from fedtier.tiers.config import (
    CentralConfig,
    EdgeConfig,
    RegionalConfig,
    RetentionSettings,
    load_initial_model,
)
from fedtier.tiers.edge import EdgeDaemon
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.model_registry import MemoryModelRegistry
from fedtier.tiers.regional import RegionalDaemon
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.tiers.store import table_sizes

CAPPED = StreamSpec("CAPPED", ("capped.>",), 3600.0, 60.0, max_bytes=4096, discard="new")


def jsz_stream_bytes(server: NatsServerProcess, stream: str) -> int:
    with urllib.request.urlopen(f"{server.monitoring_url}/jsz?streams=true", timeout=5) as resp:
        size = stream_bytes(json.loads(resp.read()), stream)
    assert size is not None
    return size


@pytest.mark.brokers
async def test_a_full_stream_refuses_publishes_as_a_retryable_error(
    fresh_nats_server: NatsServerProcess, nats_loop: None
) -> None:
    server = fresh_nats_server
    config = NatsConfig(
        servers=(server.url,),
        name="capped",
        monitoring_url=server.monitoring_url,
        streams=(CAPPED,),
        request_timeout_s=2.0,
    )
    async with open_nats_bus(config) as bus:
        accepted = 0
        refusal: BusUnavailable | None = None
        with trio.fail_after(30):
            while refusal is None:
                try:
                    await bus.publish("capped.r1", b"p" * 200, msg_id=f"m{accepted}")
                except BusUnavailable as exc:  # what the upstream workers retry
                    refusal = exc
                else:
                    accepted += 1
        assert "maximum bytes exceeded" in str(refusal)
        # Nothing older was dropped to make room (discard new), and the cap held.
        assert 10 < accepted < 4096 // 200
        assert jsz_stream_bytes(server, "CAPPED") <= 4096
        with pytest.raises(BusUnavailable):
            await bus.publish("capped.r1", b"p" * 200, msg_id="again")


WORK = StreamSpec("WORK", ("work.>",), 3600.0, 60.0, retention="workqueue")


@pytest.mark.brokers
async def test_a_work_queue_stream_keeps_what_no_consumer_took_and_drops_what_one_acked(
    fresh_nats_server: NatsServerProcess, nats_loop: None
) -> None:
    server = fresh_nats_server
    config = NatsConfig(
        servers=(server.url,),
        name="work",
        monitoring_url=server.monitoring_url,
        streams=(WORK,),
        request_timeout_s=2.0,
    )
    with trio.fail_after(30):
        async with open_nats_bus(config) as bus:
            # Before any consumer exists (a region whose regional never ran): kept.
            await bus.publish("work.r1", b"early", msg_id="early")
            await bus.publish("work.r2", b"other", msg_id="other")
            assert jsz_stream_bytes(server, "WORK") > 0
            async with bus.subscribe("work.r1", durable="r1") as sub:
                delivery = await sub.receive()
                assert bytes(delivery.payload) == b"early"
                await delivery.ack()
            # Only r2's message is left: r1's went with its ack.
            with urllib.request.urlopen(
                f"{server.monitoring_url}/jsz?streams=true", timeout=5
            ) as resp:
                jsz = json.loads(resp.read())
            [detail] = [
                d for a in jsz["account_details"] for d in a["stream_detail"] if d["name"] == "WORK"
            ]
            assert detail["state"]["messages"] == 1


@pytest.mark.brokers
async def test_an_existing_limits_stream_keeps_its_retention_with_a_warning(
    fresh_nats_server: NatsServerProcess, nats_loop: None, caplog: pytest.LogCaptureFixture
) -> None:
    server = fresh_nats_server
    old = StreamSpec("WORK", ("work.>",), 3600.0, 60.0)  # what an older fedtier created
    config = NatsConfig(
        servers=(server.url,), name="work", monitoring_url=server.monitoring_url, streams=(old,)
    )
    caplog.set_level(logging.WARNING, logger="fedtier.protocol.bus.nats")
    with trio.fail_after(30):
        async with open_nats_bus(config):
            pass
        # The new spec cannot be applied in place: the stream stays, the daemon starts.
        async with open_nats_bus(dataclasses.replace(config, streams=(WORK,))) as bus:
            await bus.publish("work.r1", b"x", msg_id="x")
    assert "keeps limits retention" in caplog.text


@pytest.mark.brokers
async def test_a_start_while_jetstream_is_away_waits_for_it(
    tmp_path: Path, nats_loop: None, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    # A server without JetStream: the connect works, the stream check gets no answer.
    bare = subprocess.Popen(
        [str(find_nats_server()), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server: NatsServerProcess | None = None
    try:
        config = NatsConfig(
            servers=(f"nats://127.0.0.1:{port}",),
            name="early",
            require_sync_always=False,
            streams=(CAPPED,),
            request_timeout_s=0.5,
            reconnect_wait_s=0.1,
            connect_attempts=20,
            connect_backoff_s=0.1,
            startup_backoff_s=0.1,
            startup_max_backoff_s=0.2,
        )
        opened = trio.Event()
        caplog.set_level(logging.WARNING, logger="fedtier.protocol.bus.nats")

        async def open_and_publish() -> None:
            async with open_nats_bus(config) as bus:
                opened.set()
                await bus.publish("capped.r1", b"first", msg_id="first")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_and_publish)
            with trio.fail_after(30):
                while "stream check failed" not in caplog.text:
                    await trio.sleep(0.05)
            assert not opened.is_set()
            # JetStream comes (a restart with it on, same port): the open goes on.
            bare.terminate()
            bare.wait(10)
            os.makedirs(tmp_path / "nats", exist_ok=True)
            server = await trio.to_thread.run_sync(
                lambda: NatsServerProcess.start(tmp_path / "nats", port)
            )
            with trio.fail_after(30):
                await opened.wait()
        assert jsz_stream_bytes(server, "CAPPED") > 0
    finally:
        if bare.poll() is None:
            bare.kill()
            bare.wait(10)
        if server is not None:
            server.stop()


# -- 24 compressed hours of a mesh -----------------------------------------------------

FLEET, REGION, SITE = "acme", "eu", "north"
CENTRAL = SigningIdentity.from_seed(b"\x01" * 32)
REGIONAL = SigningIdentity.from_seed(b"\x02" * 32)
EDGE = SigningIdentity.from_seed(b"\x03" * 32)
START_MS = 1_764_288_000_000
HOUR_S = 3600.0
DEVICES = 6
UPDATES_PER_DEVICE_PER_HOUR = 4
# Compressed horizons: what a daemon keeps is bounded by them, not by the run's length.
RETENTION = RetentionSettings(
    interval_s=600.0,
    dedupe_horizon_s=2 * HOUR_S,
    outbox_horizon_s=0.0,
    up_stream_max_age_s=2 * HOUR_S,
)


def write_model(path: Path) -> None:
    rng = np.random.default_rng(7)
    np.savez(path, w=rng.standard_normal((8, 4)).astype(np.float32))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def test_a_day_of_traffic_keeps_every_store_under_its_bound(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    def clock_ms() -> int:
        return START_MS + int(trio.current_time() * 1000)

    model_file = tmp_path / "init.npz"
    write_model(model_file)
    layout, _ = load_initial_model(model_file)
    nats, mqtt = MemoryBroker("nats"), MemoryBroker("mqtt")
    registry = MemoryModelRegistry()
    devices = [
        SimDevice(SigningIdentity.from_seed(bytes([40 + j]) * 32), FLEET, layout)
        for j in range(DEVICES)
    ]
    common = {
        "identity_key": tmp_path / "unused.pem",
        "central_key": CENTRAL.verify_key.raw.hex(),
        "commit_window_s": 0.001,
        "retention": RETENTION,
    }
    central = CentralDaemon(
        CentralConfig(
            fleet=FLEET,
            state_dir=tmp_path / "central",
            initial_model=model_file,
            flush=FlushPolicy(max_inputs=1, max_age_s=None),
            keep_versions=4,
            **common,  # type: ignore[arg-type]
        ),
        nats=MemoryBus(nats),
        registry=registry,
        keys=TierKeys(
            CENTRAL,
            KeyRegistry.from_keys({REGION: REGIONAL.verify_key}, role="regional"),
            CENTRAL.verify_key,
        ),
        clock_ms=clock_ms,
        store_in_thread=False,
    )
    regional = RegionalDaemon(
        RegionalConfig(
            fleet=FLEET,
            region=REGION,
            state_dir=tmp_path / "regional",
            flush=FlushPolicy(max_inputs=4, max_age_s=300.0),
            **common,  # type: ignore[arg-type]
        ),
        nats=MemoryBus(nats),
        registry_store=registry,
        keys=TierKeys(
            REGIONAL,
            KeyRegistry.from_keys({SITE: EDGE.verify_key}, role="edge"),
            CENTRAL.verify_key,
        ),
        clock_ms=clock_ms,
        store_in_thread=False,
    )
    edge = EdgeDaemon(
        EdgeConfig(
            fleet=FLEET,
            site=SITE,
            region=REGION,
            state_dir=tmp_path / "edge",
            flush=FlushPolicy(max_inputs=8, max_age_s=300.0),
            **common,  # type: ignore[arg-type]
        ),
        mqtt=MemoryBus(mqtt),
        nats=MemoryBus(nats),
        registry_store=registry,
        keys=TierKeys(
            EDGE,
            KeyRegistry.from_keys(
                {f"dev-{j}": d.identity.verify_key for j, d in enumerate(devices)}, role="device"
            ),
            CENTRAL.verify_key,
        ),
        clock_ms=clock_ms,
        store_in_thread=False,
    )
    daemons = {"central": central, "regional": regional, "edge": edge}
    topics = MqttTopics(FLEET, SITE)
    device_bus = MemoryBus(mqtt)
    accepted: list[bytes] = []
    peaks: dict[str, int] = {}

    async def send(device: SimDevice, i: int) -> None:
        values = np.full(device.layout.num_params, 0.001 * (i % 7), np.float32)
        message, data = device.update(values, base_version=central.version, n_samples=3)
        async with device_bus.subscribe(topics.receipt(device.key_id)) as receipts:
            await device_bus.publish(topics.update(device.key_id), data)
            delivery = await receipts.receive()
        receipt = open_envelope(delivery.payload, {EDGE.key_id: EDGE.verify_key}).message
        assert isinstance(receipt, Receipt)
        if receipt.status is ReceiptStatus.ACCEPTED:
            accepted.append(message.update_id)

    def check_bounds() -> None:
        # Updates accepted within one dedupe horizon, plus the prune interval,
        # plus what is still in buffers: every table is bounded by the horizon.
        per_horizon = (
            DEVICES
            * UPDATES_PER_DEVICE_PER_HOUR
            * (RETENTION.dedupe_horizon_s + RETENTION.interval_s)
            / HOUR_S
        )
        for name, daemon in daemons.items():
            sizes = table_sizes(daemon.store._reader)  # type: ignore[arg-type]
            peaks[name] = max(peaks.get(name, 0), sizes.inputs)
            assert sizes.inputs <= per_horizon + 16, (name, sizes)
            assert sizes.leaves <= per_horizon + 16, (name, sizes)
            assert sizes.outbox <= 16, (name, sizes)
            assert folder_bytes(daemon.config.state_dir) < 8 << 20, name

    async with trio.open_nursery() as nursery:
        for daemon in daemons.values():
            await nursery.start(daemon.serve)
        pruners = [Pruner(d) for d in daemons.values()]
        for pruner in pruners:
            nursery.start_soon(pruner.serve)
        sent = 0
        gap_s = HOUR_S / UPDATES_PER_DEVICE_PER_HOUR
        for hour in range(24):
            for _ in range(UPDATES_PER_DEVICE_PER_HOUR):
                async with trio.open_nursery() as senders:
                    for device in devices:
                        senders.start_soon(send, device, sent)
                        sent += 1
                await trio.sleep(gap_s)
            if hour % 4 == 3:
                check_bounds()
        # Let the last buffers go up (deadline flushes) and the central fold them.
        await trio.sleep(2 * 300.0)
        check_bounds()
        assert all(p.passes >= 24 * HOUR_S / RETENTION.interval_s - 2 for p in pruners)
        assert sum(p.pruned.inputs for p in pruners) > 0
        lineage = [leaf for v in range(1, central.version + 1) for leaf in central.lineage(v)]
        nursery.cancel_scope.cancel()

    # Exactly once, after a day of pruning: every accepted update is in exactly one version,
    # as the chaos suite's checker reads it from the central's store.
    assert len(accepted) == DEVICES * UPDATES_PER_DEVICE_PER_HOUR * 24
    assert sorted(lineage) == sorted(accepted)
    counted, versions = load_lineage_counts(central.config.store_path)
    histories = {u.hex(): DeviceHistory(sent=True, accepted=True) for u in accepted}
    report = check(histories, counted, versions)
    assert not report.failed, report.to_json()
    assert report.counts["ok"] == len(accepted)
    # The tables were bounded by the horizon, far below a day's worth of inputs.
    assert peaks["edge"] < len(accepted) / 4
