"""The bus contract (protocol/bus/_base.py), checked against every implementation."""

from __future__ import annotations

import itertools
import uuid

import pytest
import trio

from fedtier.protocol.errors import BusClosed, LocalProtocolError
from tests.conformance.bus_factory import BusFactory

DEADLINE_S = 20

_ids = itertools.count()


def fresh(prefix: str) -> str:
    """A unique token so tests never see each other's messages or sessions."""
    return f"{prefix}{next(_ids)}x{uuid.uuid4().hex[:8]}"


async def test_publish_then_receive_keeps_payload_and_headers(bus_factory: BusFactory) -> None:
    topic = fresh("t")
    headers = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "z": "1",
        "a": "2",
    }
    payloads = [b"", b"\x00\xff" * 7, bytes(range(256)) * 4096]  # empty, binary, 1 MiB
    with trio.fail_after(DEADLINE_S):
        async with bus_factory.connect(fresh("c")) as bus:
            async with bus.subscribe(bus_factory.subject(topic, "x")) as sub:
                for p in payloads:
                    await bus.publish(bus_factory.subject(topic, "x"), p, headers=headers)
                got = [await sub.receive() for _ in payloads]
                for d in got:
                    await d.ack()
    assert [d.payload for d in got] == payloads
    for d in got:
        assert list(d.headers.items()) == list(headers.items())
        assert d.subject == bus_factory.subject(topic, "x")
        assert not d.redelivered


async def test_wildcards_match_only_their_subjects(bus_factory: BusFactory) -> None:
    topic = fresh("w")
    with trio.fail_after(DEADLINE_S):
        async with bus_factory.connect(fresh("c")) as bus:
            async with (
                bus.subscribe(bus_factory.wildcard_rest(topic)) as rest,
                bus.subscribe(bus_factory.wildcard_one(topic, "*", "leaf")) as one,
            ):
                await bus.publish(bus_factory.subject(topic, "a", "leaf"), b"1")
                await bus.publish(bus_factory.subject(topic, "b", "other"), b"2")
                await bus.publish(bus_factory.subject(topic, "c", "leaf"), b"3")
                got_rest = [(await rest.receive()).payload for _ in range(3)]
                got_one = [(await one.receive()).payload for _ in range(2)]
    assert got_rest == [b"1", b"2", b"3"]
    assert got_one == [b"1", b"3"]


async def test_durable_redelivers_unacked_after_reconnect(bus_factory: BusFactory) -> None:
    topic, client, durable = fresh("d"), fresh("c"), fresh("dur")
    subject = bus_factory.subject(topic, "u")
    with trio.fail_after(DEADLINE_S):
        async with bus_factory.connect(client) as bus:
            async with bus.subscribe(bus_factory.wildcard_rest(topic), durable=durable) as sub:
                for i in range(6):
                    await bus.publish(subject, b"m%d" % i)
                first = [await sub.receive() for _ in range(6)]
                for d in first[:3]:
                    await d.ack()
        # m3..m5 were delivered but never acknowledged: they must come back.
        async with bus_factory.connect(client) as bus:
            async with bus.subscribe(bus_factory.wildcard_rest(topic), durable=durable) as sub:
                again = [await sub.receive() for _ in range(3)]
                for d in again:
                    await d.ack()
    assert [d.payload for d in first] == [b"m%d" % i for i in range(6)]
    assert sorted(d.payload for d in again) == [b"m3", b"m4", b"m5"]
    assert all(d.redelivered for d in again)


async def test_durable_keeps_messages_published_while_offline(bus_factory: BusFactory) -> None:
    topic, client, durable = fresh("o"), fresh("c"), fresh("dur")
    subject = bus_factory.subject(topic, "u")
    with trio.fail_after(DEADLINE_S):
        async with bus_factory.connect(client) as bus:
            async with bus.subscribe(bus_factory.wildcard_rest(topic), durable=durable):
                pass
        async with bus_factory.connect(fresh("p")) as publisher:
            for i in range(5):
                await publisher.publish(subject, b"late%d" % i)
        async with bus_factory.connect(client) as bus:
            async with bus.subscribe(bus_factory.wildcard_rest(topic), durable=durable) as sub:
                got = [await sub.receive() for _ in range(5)]
                for d in got:
                    await d.ack()
    assert sorted(d.payload for d in got) == [b"late%d" % i for i in range(5)]


async def test_capacity_bounds_unacknowledged_deliveries(bus_factory: BusFactory) -> None:
    topic, durable = fresh("b"), fresh("dur")
    subject = bus_factory.subject(topic, "u")
    capacity = 4
    with trio.fail_after(DEADLINE_S):
        async with bus_factory.connect(fresh("c")) as bus:
            async with bus.subscribe(
                bus_factory.wildcard_rest(topic), durable=durable, capacity=capacity
            ) as sub:
                for i in range(12):
                    await bus.publish(subject, b"%d" % i)
                held = [await sub.receive() for _ in range(capacity)]
                # With `capacity` deliveries unacknowledged, the next receive must wait.
                with trio.move_on_after(0.3) as scope:
                    await sub.receive()
                assert scope.cancelled_caught, "a delivery arrived past the subscription's capacity"
                await held[0].ack()
                nxt = await sub.receive()
                await nxt.ack()
                for d in held[1:]:
                    await d.ack()
    assert nxt.payload not in {d.payload for d in held}


async def test_retained_value_reaches_late_subscribers(bus_factory: BusFactory) -> None:
    if not bus_factory.supports_retain:
        # A transport without retained messages must refuse, not silently drop the flag.
        async with bus_factory.connect(fresh("c")) as bus:
            with pytest.raises(LocalProtocolError):
                await bus.publish(bus_factory.subject(fresh("r")), b"v", retain=True)
        return
    topic = fresh("r")
    subject = bus_factory.subject(topic, "model")
    with trio.fail_after(DEADLINE_S):
        async with bus_factory.connect(fresh("c")) as bus:
            await bus.publish(subject, b"v1", retain=True)
            await bus.publish(subject, b"v2", retain=True)
            async with bus.subscribe(subject) as sub:
                got = await sub.receive()
                await got.ack()
    assert got.payload == b"v2"
    assert got.retained


async def test_msg_id_dedupe_is_reported(bus_factory: BusFactory) -> None:
    topic, durable = fresh("i"), fresh("dur")
    subject = bus_factory.subject(topic, "u")
    with trio.fail_after(DEADLINE_S):
        async with bus_factory.connect(fresh("c")) as bus:
            async with bus.subscribe(bus_factory.wildcard_rest(topic), durable=durable) as sub:
                a = await bus.publish(subject, b"x", msg_id="same-id")
                b = await bus.publish(subject, b"x", msg_id="same-id")
                await bus.publish(subject, b"end")
                got = [await sub.receive() for _ in range(2 if bus_factory.dedupes_msg_id else 3)]
                for d in got:
                    await d.ack()
    assert not a.duplicate
    if bus_factory.dedupes_msg_id:
        assert b.duplicate
        assert [d.payload for d in got] == [b"x", b"end"]
    else:
        assert not b.duplicate
        assert [d.payload for d in got] == [b"x", b"x", b"end"]


async def test_publish_to_wildcard_is_refused(bus_factory: BusFactory) -> None:
    with trio.fail_after(DEADLINE_S):
        async with bus_factory.connect(fresh("c")) as bus:
            with pytest.raises(LocalProtocolError):
                await bus.publish(bus_factory.wildcard_rest(fresh("x")), b"nope")


async def test_subscription_iteration_ends_when_closed(bus_factory: BusFactory) -> None:
    topic = fresh("e")
    seen: list[bytes] = []
    with trio.fail_after(DEADLINE_S):
        async with bus_factory.connect(fresh("c")) as bus:
            async with bus.subscribe(bus_factory.subject(topic)) as sub:
                await bus.publish(bus_factory.subject(topic), b"only")
                async for d in sub:
                    seen.append(d.payload)
                    await d.ack()
                    break
            with pytest.raises(BusClosed):
                await sub.receive()
    assert seen == [b"only"]
