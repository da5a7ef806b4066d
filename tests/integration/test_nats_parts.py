"""A payload above nats-server's max_payload (8 MB here) travels as parts and arrives whole."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
import trio

from fedtier.protocol.bus.nats import NatsConfig, StreamSpec, open_nats_bus
from fedtier.protocol.errors import LocalProtocolError
from fedtier.simulations.testing import NatsServerProcess

pytestmark = pytest.mark.brokers

DEADLINE_S = 60
MiB = 1024 * 1024


def config_for(server: NatsServerProcess, stream: StreamSpec, **overrides: object) -> NatsConfig:
    return NatsConfig(
        servers=(server.url,),
        name="parts",
        monitoring_url=server.monitoring_url,
        streams=(stream,),
        request_timeout_s=10.0,
        **overrides,  # type: ignore[arg-type]
    )


def stream_messages(server: NatsServerProcess, stream: str) -> int:
    """How many messages the stream holds now, from the server's monitoring endpoint."""
    url = f"{server.monitoring_url}/jsz?streams=true"
    with urllib.request.urlopen(url, timeout=10) as response:
        report = json.load(response)
    for account in report.get("account_details", []):
        for detail in account.get("stream_detail", []):
            if detail["name"] == stream:
                return int(detail["state"]["messages"])
    raise AssertionError(f"stream {stream} not in {url}")


async def test_a_large_payload_goes_as_parts_and_is_delivered_and_acked_whole(
    nats_server: NatsServerProcess, nats_loop: None
) -> None:
    stream = StreamSpec(
        "PARTS1", ("parts1.>",), 3600.0, 600.0, retention="workqueue", discard="new"
    )
    payload = os.urandom(20 * MiB)  # three parts under an 8 MB max_payload
    config = config_for(nats_server, stream, max_parted_bytes=64 * MiB)
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config) as bus:
            assert bus.max_message_bytes == 64 * MiB
            assert bus.max_single_message_bytes == 8 * MiB
            ack = await bus.publish(
                "parts1.up", payload, headers={"traceparent": "00-ab-cd-01"}, msg_id="e1:p1"
            )
            assert not ack.duplicate
            # A retried publish (a lost PubAck looks the same) stores nothing new.
            again = await bus.publish("parts1.up", payload, msg_id="e1:p1")
            assert again.duplicate
            assert stream_messages(nats_server, "PARTS1") == 3
            await bus.publish("parts1.up", b"small", msg_id="e1:p2")

            async with bus.subscribe("parts1.>", durable="reader") as sub:
                first = await sub.receive()
                # Closing before the ack gives every part back (as a crash does,
                # after ack_wait): the whole comes again to the next reader.
            async with bus.subscribe("parts1.>", durable="reader") as sub:
                # Given back messages come again in no promised order.
                got = {}
                for _ in range(2):
                    delivery = await sub.receive()
                    got[len(delivery.payload)] = delivery
                    await delivery.ack()
            assert got[len(payload)].payload == payload
            assert got[len(payload)].headers == {"traceparent": "00-ab-cd-01"}
            assert got[5].payload == b"small"
            # Work-queue retention: acknowledging the whole removed every part.
            assert stream_messages(nats_server, "PARTS1") == 0
    assert first.payload == payload  # a fresh consumer delivers in stream order


async def test_without_parts_a_payload_above_max_payload_is_refused(
    nats_server: NatsServerProcess, nats_loop: None
) -> None:
    stream = StreamSpec("PARTS2", ("parts2.>",), 3600.0, 600.0)
    big = bytes(9 * MiB)
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config_for(nats_server, stream)) as bus:
            assert bus.max_message_bytes == 8 * MiB
            with pytest.raises(LocalProtocolError, match="max_payload"):
                await bus.publish("parts2.up", big, msg_id="x")
        parted = config_for(nats_server, stream, max_parted_bytes=16 * MiB)
        async with open_nats_bus(parted) as bus:
            with pytest.raises(LocalProtocolError, match="msg_id"):
                await bus.publish("parts2.up", big)
            with pytest.raises(LocalProtocolError, match="max_payload"):
                await bus.publish("parts2.up", bytes(17 * MiB), msg_id="y")


async def test_an_object_store_works_on_a_server_with_a_small_max_payload(
    tmp_path: Path, nats_loop: None
) -> None:
    # nats-py's default object chunk is one 128 KiB message: on a 64 KiB
    # max_payload every put failed; chunks now fit the server's bound.
    server = await trio.to_thread.run_sync(
        lambda: NatsServerProcess.start(tmp_path / "nats", extra_config="max_payload: 65536")
    )
    try:
        stream = StreamSpec("PARTS3", ("parts3.>",), 3600.0, 600.0)
        data = os.urandom(300_000)
        with trio.fail_after(DEADLINE_S):
            async with open_nats_bus(config_for(server, stream)) as bus:
                store = await bus.object_store("small_chunks")
                stored = await store.put("blob", data)
                assert stored.size_bytes == len(data)
                assert await store.get("blob") == data
    finally:
        await trio.to_thread.run_sync(server.stop)
