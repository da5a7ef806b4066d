"""The MQTT bus against a real Mosquitto that is killed, restarted and flooded."""

from __future__ import annotations

import dataclasses
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from fedtier.protocol.bus import Subscription
from fedtier.protocol.bus.mqtt import MqttBus, MqttConfig, open_mqtt_bus
from fedtier.protocol.errors import BusUnavailable, ConfigError, PublishError
from fedtier.simulations.testing import LOOPBACK, FaultyProxy, MosquittoProcess
from fedtier.simulations.testing import _mosquitto as mosquitto_module

DEADLINE_S = 60


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def config_for(broker: MosquittoProcess, client_id: str, *, shared: bool = True) -> MqttConfig:
    return MqttConfig(
        host=broker.host,
        port=broker.port,
        client_id=client_id,
        reconnect_backoff_min_s=0.02,
        reconnect_backoff_max_s=0.5,
        shared_durables=shared,
    )


async def publish_retained(bus: MqttBus, subject: str, payload: bytes) -> None:
    """A retained publish, confirmed by the broker, as an edge relays a model version."""
    while True:
        try:
            await bus.publish(subject, payload, retain=True)
        except BusUnavailable:
            await bus.wait_connected()
        except PublishError:
            continue
        else:
            return


async def publish_with_retries(bus: MqttBus, subject: str, payload: bytes) -> None:
    """Publish until the broker confirms: what a device outbox does."""
    while True:
        try:
            await bus.publish(subject, payload)
        except BusUnavailable:
            await bus.wait_connected()
        except PublishError:
            continue  # outcome unknown: send it again (at least once)
        else:
            return


async def kill_and_restart(broker: MosquittoProcess) -> None:
    broker.kill()
    await trio.to_thread.run_sync(broker.restart)


async def restart_gracefully(broker: MosquittoProcess) -> None:
    # SIGTERM: Mosquitto 2.0.11 saves unacknowledged messages only at
    # shutdown or on its autosave, never on a kill -9 in between.
    await trio.to_thread.run_sync(broker.restart)


async def test_every_acknowledged_message_arrives_across_kill9(
    fresh_mosquitto: MosquittoProcess,
) -> None:
    """An exclusive durable subscription loses nothing the broker acknowledged.

    A message is written to an online subscriber before its PUBACK goes to
    the publisher, and the session (saved on every subscribe and ack) comes
    back after the restart. Exclusive, because a shared subscription misses
    what is published between the restart and its resubscription (see the
    next test).
    """
    broker = fresh_mosquitto
    topic = unique("k9")
    total, kill_after = 200, 80
    acked: list[bytes] = []
    received: set[bytes] = set()
    kill_point, publishing_done, all_in = trio.Event(), trio.Event(), trio.Event()

    def check_all_in() -> None:
        if publishing_done.is_set() and set(acked) <= received:
            all_in.set()

    async def consume(sub: Subscription) -> None:
        async for delivery in sub:
            received.add(delivery.payload)
            await delivery.ack()
            check_all_in()

    async def produce(bus: MqttBus) -> None:
        for i in range(total):
            payload = b"m%04d" % i
            await publish_with_retries(bus, f"it/{topic}/u", payload)
            acked.append(payload)
            if len(acked) == kill_after:
                kill_point.set()
        publishing_done.set()
        check_all_in()

    async def killer() -> None:
        # Runs while the publisher already waits for the next PUBACK.
        await kill_point.wait()
        await kill_and_restart(broker)

    with trio.fail_after(DEADLINE_S):
        async with (
            open_mqtt_bus(config_for(broker, unique("sub"), shared=False)) as sub_bus,
            open_mqtt_bus(config_for(broker, unique("pub"))) as pub_bus,
            sub_bus.subscribe(f"it/{topic}/#", durable="edge") as sub,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(consume, sub)
            nursery.start_soon(killer)
            nursery.start_soon(produce, pub_bus)
            await all_in.wait()
            nursery.cancel_scope.cancel()
            sub_stats, pub_stats = sub_bus.stats(), pub_bus.stats()

    assert len(acked) == total
    assert set(acked) <= received
    assert sub_stats.reconnects_total >= 1
    assert pub_stats.reconnects_total >= 1


async def test_unacked_deliveries_come_back_redelivered_after_restart(
    fresh_mosquitto: MosquittoProcess,
) -> None:
    broker = fresh_mosquitto
    topic = unique("rd")
    payloads = [b"r%d" % i for i in range(5)]
    with trio.fail_after(DEADLINE_S):
        async with (
            open_mqtt_bus(config_for(broker, unique("sub"))) as sub_bus,
            open_mqtt_bus(config_for(broker, unique("pub"))) as pub_bus,
            sub_bus.subscribe(f"it/{topic}/#", durable="edge", capacity=16) as sub,
        ):
            for p in payloads:
                await pub_bus.publish(f"it/{topic}/u", p)
            first = [await sub.receive() for _ in payloads]
            await restart_gracefully(broker)
            again = [await sub.receive() for _ in payloads]
            for d in first:
                await d.ack()  # from the old connection: dropped
            for d in again:
                await d.ack()
            stats = sub_bus.stats()

    assert [d.payload for d in first] == payloads
    assert not any(d.redelivered for d in first)
    assert sorted(d.payload for d in again) == payloads
    assert all(d.redelivered for d in again)
    assert stats.acks_dropped_total == len(payloads)
    assert stats.held == 0


async def test_ack_from_an_old_connection_is_dropped_and_redelivered(
    fresh_mosquitto: MosquittoProcess,
) -> None:
    broker = fresh_mosquitto
    topic, client = unique("og"), unique("sub")
    subject, pattern = f"it/{topic}/u", f"it/{topic}/#"

    with trio.fail_after(DEADLINE_S):
        async with open_mqtt_bus(config_for(broker, unique("pub"))) as pub_bus:
            async with open_mqtt_bus(config_for(broker, client)) as bus:
                async with bus.subscribe(pattern, durable="edge", capacity=4) as sub:
                    await pub_bus.publish(subject, b"a")
                    old = await sub.receive()
                    await restart_gracefully(broker)
                    copy = await sub.receive()  # proves the new connection is up
                    await old.ack()
                    assert bus.stats().acks_dropped_total == 1
                    # `copy` is left unacknowledged: the broker must still hold it.
            # Had the old ack gone out with its mid on the new connection, it
            # would have acknowledged `copy` (same message, same mid).
            async with open_mqtt_bus(config_for(broker, client)) as bus:
                async with bus.subscribe(pattern, durable="edge", capacity=4) as sub:
                    third = await sub.receive()
                    await third.ack()
            async with open_mqtt_bus(config_for(broker, client)) as bus:
                async with bus.subscribe(pattern, durable="edge", capacity=4) as sub:
                    await pub_bus.wait_connected()
                    await pub_bus.publish(subject, b"end")
                    after = await sub.receive()
                    await after.ack()

    assert (old.payload, copy.payload, third.payload) == (b"a", b"a", b"a")
    assert copy.redelivered
    assert third.redelivered
    assert after.payload == b"end"


async def test_shared_durable_splits_load_and_resumes_after_kill9(
    fresh_mosquitto: MosquittoProcess,
) -> None:
    broker = fresh_mosquitto
    topic = unique("sh")
    got: dict[str, list[bytes]] = {"a": [], "b": []}
    wanted: set[bytes] = set()
    all_in = trio.Event()

    def distinct() -> set[bytes]:
        return set(got["a"]) | set(got["b"])

    async def consume(sub: Subscription, member: str) -> None:
        async for delivery in sub:
            got[member].append(delivery.payload)
            await delivery.ack()
            if wanted <= distinct():
                all_in.set()

    async def wait_for(payloads: set[bytes]) -> None:
        nonlocal all_in
        wanted.update(payloads)
        all_in = trio.Event()
        if not wanted <= distinct():
            await all_in.wait()

    with trio.fail_after(DEADLINE_S):
        async with (
            open_mqtt_bus(config_for(broker, unique("a"))) as bus_a,
            open_mqtt_bus(config_for(broker, unique("b"))) as bus_b,
            bus_a.subscribe(f"it/{topic}/#", durable="edge") as sub_a,
            bus_b.subscribe(f"it/{topic}/#", durable="edge") as sub_b,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(consume, sub_a, "a")
            nursery.start_soon(consume, sub_b, "b")
            for i in range(10):
                await bus_a.publish(f"it/{topic}/u", b"x%d" % i)
            await wait_for({b"x%d" % i for i in range(10)})
            await kill_and_restart(broker)
            # Both members resubscribe by themselves once reconnected.
            await bus_a.wait_connected()
            await bus_b.wait_connected()
            for i in range(10):
                await publish_with_retries(bus_a, f"it/{topic}/u", b"y%d" % i)
            await wait_for({b"y%d" % i for i in range(10)})
            nursery.cancel_scope.cancel()

    # At least once: an ack in flight at the kill may bring a message back.
    assert distinct() == {b"x%d" % i for i in range(10)} | {b"y%d" % i for i in range(10)}
    assert got["a"]
    assert got["b"]


async def test_capacity_bounds_what_the_process_holds_unacknowledged(
    fresh_mosquitto: MosquittoProcess,
) -> None:
    broker = fresh_mosquitto
    topic = unique("bp")
    capacity, total = 5, 300
    outstanding = outstanding_peak = 0
    got: list[bytes] = []
    with trio.fail_after(DEADLINE_S):
        async with (
            open_mqtt_bus(config_for(broker, unique("sub"))) as sub_bus,
            open_mqtt_bus(config_for(broker, unique("pub"))) as pub_bus,
            sub_bus.subscribe(f"it/{topic}/#", durable="edge", capacity=capacity) as sub,
        ):
            # The subscriber reads `capacity` messages and parks; publishing
            # (its own connection) is not held up by it.
            for i in range(total):
                await pub_bus.publish(f"it/{topic}/u", b"%04d" % i)
            # A slow consumer: it holds a batch unacknowledged, then acks it.
            while len(got) < total:
                batch = []
                for _ in range(min(capacity, total - len(got))):
                    batch.append(await sub.receive())
                    outstanding += 1
                    outstanding_peak = max(outstanding_peak, outstanding)
                    assert sub_bus.stats().held <= capacity
                for d in batch:
                    got.append(d.payload)
                    await d.ack()
                    outstanding -= 1
            stats = sub_bus.stats()

    assert got == [b"%04d" % i for i in range(total)]
    assert outstanding_peak == capacity
    assert stats.held_peak == capacity
    assert stats.received_total == total
    assert stats.held == 0


async def test_open_fails_clearly_when_no_broker_listens() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = MqttConfig(host="127.0.0.1", port=port, client_id=unique("c"))
    with trio.fail_after(DEADLINE_S), pytest.raises(BusUnavailable, match=f"127.0.0.1:{port}"):
        async with open_mqtt_bus(config):
            pass


async def test_the_bus_reports_the_brokers_maximum_packet_size(
    mosquitto: MosquittoProcess,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_mqtt_bus(config_for(mosquitto, unique("size"))) as bus:
            await publish_with_retries(bus, "fedtier/size-probe", b"x")
            # What the test broker's config says (max_packet_size), read from CONNACK.
            assert bus.max_message_bytes == mosquitto_module._MAX_PACKET_BYTES


async def _partition(proxy: FaultyProxy, duration_s: float, *, task_status: Any) -> None:
    """Run ``proxy.partition`` and report started once it holds every byte."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(proxy.partition, duration_s)
        # Two checkpoints: the partition task has run up to its first await
        # (trio may run it before or after us in the next batch).
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        task_status.started()


async def test_a_latest_only_subscriber_gets_the_newest_retained_value_and_no_backlog(
    mosquitto: MosquittoProcess,
) -> None:
    # A device whose link drops keeps its session: at QoS 1 the broker would
    # queue every model version for it. latest_only (QoS 0, subscribed again
    # at every connect) gets the newest retained one and nothing queued.
    topic = f"fedtier/{unique('fleet')}/model/current"
    with trio.fail_after(DEADLINE_S):
        async with trio.open_nursery() as nursery:
            proxy = FaultyProxy("device-link", mosquitto.port)
            port = await nursery.start(proxy.serve)
            device_config = dataclasses.replace(
                config_for(mosquitto, unique("device")), host=LOOPBACK, port=port
            )
            async with (
                open_mqtt_bus(config_for(mosquitto, unique("edge"))) as edge,
                open_mqtt_bus(device_config) as device,
            ):
                await publish_retained(edge, topic, b"v0")
                async with device.subscribe(topic, latest_only=True) as sub:
                    first = await sub.receive()
                    await first.ack()
                    await nursery.start(_partition, proxy, 1.5)
                    for version in range(1, 6):  # the device's link is down meanwhile
                        await publish_retained(edge, topic, b"v%d" % version)
                    again = await sub.receive()  # after the reset and the reconnect
                    await again.ack()
                    await publish_retained(edge, topic, b"v6")
                    live = await sub.receive()
                    await live.ack()
            nursery.cancel_scope.cancel()
    assert [first.payload, again.payload, live.payload] == [b"v0", b"v5", b"v6"]
    assert proxy.resets_total >= 1  # the link really went down


def test_missing_mosquitto_is_a_clear_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(mosquitto_module, "_FALLBACK_BINARY", tmp_path / "mosquitto")
    with pytest.raises(ConfigError, match="apt-get install -y mosquitto"):
        MosquittoProcess.start(tmp_path / "broker")


async def test_a_fresh_session_is_not_handed_what_the_broker_kept_for_its_client_id(
    fresh_mosquitto: MosquittoProcess,
) -> None:
    # A leased edge starts on a fresh session: what the broker kept for its client
    # id while another instance of the site was active went to that one.
    broker = fresh_mosquitto
    topic = unique("fresh")
    client = unique("edge")
    payloads = [b"f%d" % i for i in range(3)]
    with trio.fail_after(DEADLINE_S):
        async with open_mqtt_bus(config_for(broker, unique("pub"))) as pub_bus:
            async with (
                open_mqtt_bus(config_for(broker, client, shared=False)) as first,
                first.subscribe(f"it/{topic}/#", durable="edge", capacity=16) as sub,
            ):
                for p in payloads:
                    await pub_bus.publish(f"it/{topic}/u", p)
                for _ in payloads:
                    await sub.receive()  # never acknowledged: the session keeps them
            async with (
                open_mqtt_bus(config_for(broker, client, shared=False)) as resumed,
                resumed.subscribe(f"it/{topic}/#", durable="edge", capacity=16) as sub,
            ):
                again = [await sub.receive() for _ in payloads]  # handed back, not acked
            fresh_config = dataclasses.replace(
                config_for(broker, client, shared=False), fresh_session=True
            )
            async with (
                open_mqtt_bus(fresh_config) as fresh,
                fresh.subscribe(f"it/{topic}/#", durable="edge", capacity=16) as sub,
            ):
                await pub_bus.publish(f"it/{topic}/u", b"after")
                first_delivery = await sub.receive()
                await first_delivery.ack()
    assert sorted(d.payload for d in again) == payloads
    assert all(d.redelivered for d in again)
    assert first_delivery.payload == b"after"  # the kept ones were not handed over
