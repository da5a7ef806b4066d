"""The NATS bus against a real nats-server: crashes, restarts, dedupe, KV and Object Store."""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import os
import socket
import urllib.request
from pathlib import Path

import pytest
import trio

from fedtier.protocol.bus.nats import KvEntry, NatsBus, NatsConfig, StreamSpec, open_nats_bus
from fedtier.protocol.errors import (
    BusUnavailable,
    ConfigError,
    KvConflict,
    LimitExceeded,
    ObjectNotFound,
    PublishError,
    RegistryConflict,
)
from fedtier.simulations.testing import NatsServerProcess
from fedtier.tiers.model_registry import NatsModelRegistry

pytestmark = pytest.mark.brokers

# Most tests take the `nats_loop` fixture, opening the trio-asyncio loop once as
# a daemon does (as an argument: pytest-trio does not run async fixtures named
# only in usefixtures). Two let open_nats_bus open it, the path where errors
# must come out unwrapped.

DEADLINE_S = 30
PARTIALS = StreamSpec("PART", ("part.>",), max_age_s=3600.0, duplicate_window_s=600.0)


def config_for(server: NatsServerProcess, name: str, **overrides: object) -> NatsConfig:
    base = NatsConfig(
        servers=(server.url,),
        name=name,
        monitoring_url=server.monitoring_url,
        streams=(PARTIALS,),
        request_timeout_s=1.0,
        reconnect_wait_s=0.1,
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


async def publish_until_acked(bus: NatsBus, subject: str, payload: bytes, msg_id: str) -> bool:
    """Retry a publish with the same id until JetStream acks it; return its duplicate flag."""
    backoff_s = 0.05
    while True:
        try:
            ack = await bus.publish(subject, payload, msg_id=msg_id)
        except (BusUnavailable, PublishError):
            await trio.sleep(backoff_s)  # retry backoff, as a daemon does
            backoff_s = min(backoff_s * 2, 0.5)
        else:
            return ack.duplicate


def consumer_ack_floor_on_disk(server: NatsServerProcess, stream: str, durable: str) -> int:
    """Stream sequence of the ack floor the server has written for a consumer (0 if none yet).

    The file is the consumer state encoding of nats-server's filestore: two
    header bytes, then uvarints ack floor (consumer seq, stream seq), ...
    """
    (path,) = server.store_dir.rglob(f"streams/{stream}/obs/{durable}/o.dat") or (None,)
    if path is None or path.stat().st_size < 3:
        return 0
    data = path.read_bytes()
    pos = 2
    values = []
    for _ in range(2):
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        values.append(value)
    return values[1]


async def wait_for_ack_floor_on_disk(
    server: NatsServerProcess, stream: str, durable: str, sequence: int
) -> None:
    # JetStream writes consumer state about 10 ms after an ack, from a flusher
    # goroutine; a kill -9 inside that window loses confirmed acks, which the
    # design absorbs (receivers dedupe by id). The test checks the adapter,
    # so it waits for the server's write, with a deadline.
    delay_s = 0.005
    with trio.fail_after(5):
        while consumer_ack_floor_on_disk(server, stream, durable) < sequence:
            await trio.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.1)


async def test_publisher_retrying_one_msg_id_across_a_crash_stores_one_copy(
    fresh_nats_server: NatsServerProcess,
    nats_loop: None,
) -> None:
    server = fresh_nats_server
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config_for(server, "edge-pub")) as bus:
            assert not await publish_until_acked(bus, "part.e1", b"a", "p-1")

            await trio.to_thread.run_sync(server.kill)
            with pytest.raises((BusUnavailable, PublishError)):
                await bus.publish("part.e1", b"b", msg_id="p-2")

            await trio.to_thread.run_sync(server.restart)
            # The failed publish's outcome is unknown: nats-py may hold it in its
            # reconnect buffer and deliver it once the server is back (seen on a
            # loaded machine). So this retry may or may not be the first copy;
            # what must hold is that the stream keeps one copy (checked below).
            await publish_until_acked(bus, "part.e1", b"b", "p-2")
            # Retries after the PubAck (a lost ack looks the same to the sender).
            assert await publish_until_acked(bus, "part.e1", b"b", "p-2")
            assert await publish_until_acked(bus, "part.e1", b"a", "p-1")
            await bus.publish("part.e1", b"end")

            async with bus.subscribe("part.>", durable="reader") as sub:
                got: list[bytes] = []
                while not got or got[-1] != b"end":
                    delivery = await sub.receive()
                    await delivery.ack()
                    got.append(delivery.payload)
    assert got == [b"a", b"b", b"end"]


async def test_durable_consumer_resumes_after_a_crash_redelivering_only_unacked(
    fresh_nats_server: NatsServerProcess,
    nats_loop: None,
) -> None:
    server = fresh_nats_server
    # max_hold_s=0: no in-progress acks, the unacked messages time out as after a crash.
    config = config_for(server, "regional", ack_wait_s=1.0, max_hold_s=0.0)
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config) as bus:
            sequences = [(await bus.publish("part.r", b"m%d" % i)).sequence for i in range(10)]
            async with bus.subscribe("part.>", durable="regional", capacity=16) as sub:
                first = [await sub.receive() for _ in range(10)]
                for delivery in first[:6]:
                    await delivery.ack()
                seq_m5 = sequences[5]
                assert seq_m5 is not None
                await wait_for_ack_floor_on_disk(server, "PART", "regional", seq_m5)

                await trio.to_thread.run_sync(server.kill)
                await trio.to_thread.run_sync(server.restart)

                # m6..m9 were never acked: ack_wait after the restart, they come back.
                again = [await sub.receive() for _ in range(4)]
                for delivery in again:
                    await delivery.ack()
                # Anything acked before the crash would have come back with them,
                # ahead of a message published now.
                await publish_until_acked(bus, "part.r", b"end", "end-1")
                tail = await sub.receive()
                await tail.ack()
    assert [d.payload for d in first] == [b"m%d" % i for i in range(10)]
    assert not any(d.redelivered for d in first)
    assert sorted(d.payload for d in again) == [b"m6", b"m7", b"m8", b"m9"]
    assert all(d.redelivered for d in again)
    assert tail.payload == b"end"
    assert not tail.redelivered


async def test_subscribers_sharing_a_durable_share_the_work(
    nats_server: NatsServerProcess, nats_loop: None
) -> None:
    config = config_for(nats_server, "shared", streams=(PARTIALS,))
    topic = f"part.shared{os.getpid()}x{id(config) % 10_000}"
    with trio.fail_after(DEADLINE_S):
        async with (
            open_nats_bus(dataclasses.replace(config, name="regional-a")) as bus_a,
            open_nats_bus(dataclasses.replace(config, name="regional-b")) as bus_b,
        ):
            for i in range(8):
                await bus_a.publish(f"{topic}.u", b"%d" % i)
            durable = topic.replace(".", "-")
            async with (
                bus_a.subscribe(f"{topic}.>", durable=durable, capacity=4) as sub_a,
                bus_b.subscribe(f"{topic}.>", durable=durable, capacity=4) as sub_b,
            ):
                # a is full at 4 unacked, so the other 4 can only go to b.
                got_a = [await sub_a.receive() for _ in range(4)]
                got_b = [await sub_b.receive() for _ in range(4)]
                for delivery in got_a + got_b:
                    await delivery.ack()
    payloads = sorted(int(d.payload) for d in got_a + got_b)
    assert payloads == list(range(8))


async def test_a_delivery_held_past_ack_wait_is_not_redelivered_to_the_other_consumer(
    nats_server: NatsServerProcess, nats_loop: None
) -> None:
    # Two regionals share a durable; one holds a partial longer than ack_wait
    # (a slow cut, a full intake queue). Its in-progress acks keep the server
    # from handing the partial to the other one, which would fold it too.
    ack_wait_s = 4.0
    config = config_for(nats_server, "held", streams=(PARTIALS,), ack_wait_s=ack_wait_s)
    topic = f"part.held{os.getpid()}"
    durable = topic.replace(".", "-")
    with trio.fail_after(DEADLINE_S):
        async with (
            open_nats_bus(dataclasses.replace(config, name="regional-a")) as bus_a,
            open_nats_bus(dataclasses.replace(config, name="regional-b")) as bus_b,
        ):
            await bus_a.publish(f"{topic}.u", b"partial")
            async with bus_a.subscribe(f"{topic}.>", durable=durable, capacity=1) as sub_a:
                held = await sub_a.receive()
                async with bus_b.subscribe(f"{topic}.>", durable=durable, capacity=1) as sub_b:
                    # The scenario is the holding itself: more than twice ack_wait.
                    with trio.move_on_after(2.25 * ack_wait_s) as waited:
                        stolen = await sub_b.receive()
                    assert waited.cancelled_caught, f"redelivered to b: {stolen.payload!r}"
                    await held.ack()
    assert held.payload == b"partial"
    assert not held.redelivered


async def test_kv_update_with_a_stale_revision_conflicts(
    nats_server: NatsServerProcess, nats_loop: None
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config_for(nats_server, "central-kv")) as bus:
            bucket = await bus.kv_bucket(f"pointer{os.getpid()}")
            assert await bucket.get("model") is None
            rev1 = await bucket.update("model", b"v1", 0)  # create only
            with pytest.raises(KvConflict):
                await bucket.update("model", b"v1-again", 0)
            rev2 = await bucket.update("model", b"v2", rev1)
            with pytest.raises(KvConflict):
                await bucket.update("model", b"v2-stale", rev1)
            assert await bucket.get("model") == (b"v2", rev2)

            async with bucket.watch("model") as watch:
                seen = [await anext(watch)]
                rev3 = await bucket.put("model", b"v3")
                seen.append(await anext(watch))
    assert rev1 < rev2 < rev3
    assert seen == [KvEntry("model", b"v2", rev2), KvEntry("model", b"v3", rev3)]


async def test_the_bus_reports_the_servers_max_payload(
    nats_server: NatsServerProcess, nats_loop: None
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config_for(nats_server, "edge-size")) as bus:
            assert bus.max_message_bytes == 8 * 1024 * 1024  # max_payload: 8MB in its config


async def test_kv_entry_names_the_delete_marker_an_update_must_follow(
    nats_server: NatsServerProcess, nats_loop: None
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config_for(nats_server, "central-kv")) as bucket_bus:
            bucket = await bucket_bus.kv_bucket(f"deleted{os.getpid()}")
            assert await bucket.entry("model") is None
            rev1 = await bucket.update("model", b"v1", 0)
            assert await bucket.entry("model") == KvEntry("model", b"v1", rev1)
            await bucket.delete("model")
            marker = await bucket.entry("model")
            assert marker is not None
            assert marker.deleted
            assert marker.value == b""
            assert marker.revision > rev1
            with pytest.raises(KvConflict):  # "create only" is not enough after a delete
                await bucket.update("model", b"v2", 0)
            rev2 = await bucket.update("model", b"v2", marker.revision)
            assert await bucket.get("model") == (b"v2", rev2)


async def test_the_model_registry_moves_its_pointer_only_by_compare_and_set(
    nats_server: NatsServerProcess, nats_loop: None
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config_for(nats_server, "central-kv")) as bus:
            registry = NatsModelRegistry(
                await bus.kv_bucket(f"reg{os.getpid()}"),
                await bus.object_store(f"regblobs{os.getpid()}"),
            )
            assert await registry.current_entry() is None
            rev1 = await registry.replace_current(b"pointer-0", 0)
            with pytest.raises(KvConflict):  # a second writer that read "nothing yet"
                await registry.replace_current(b"other-0", 0)
            assert await registry.current_entry() == (b"pointer-0", rev1)
            await registry.replace_current(b"pointer-1", rev1)
            assert await registry.current_pointer() == b"pointer-1"
            await registry.put_blob(1, b"blob-1")
            await registry.put_blob(1, b"blob-1")  # the same bytes again: a retry
            with pytest.raises(RegistryConflict):
                await registry.put_blob(1, b"another blob-1")
            assert await registry.blob(1) == b"blob-1"
            # Retention: an old version's blob goes; deleting it again is no error.
            await registry.delete_blob(1)
            assert await registry.blob(1) is None
            await registry.delete_blob(1)


async def test_object_store_round_trips_4_mib_with_its_digest(
    nats_server: NatsServerProcess,
    nats_loop: None,
) -> None:
    blob = os.urandom(4 * 1024 * 1024)
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config_for(nats_server, "central-obj")) as bus:
            store = await bus.object_store(f"models{os.getpid()}")
            stored = await store.put("model-v1", blob)
            back = await store.get("model-v1")
            with pytest.raises(LimitExceeded):
                await store.get("model-v1", max_size_bytes=1024)
            with pytest.raises(ObjectNotFound):
                await store.get("model-v0")
            # A put is shielded: a cancellation arriving mid-put waits for it to
            # finish (it never leaves half an object), then takes effect.
            with trio.move_on_after(0.002):
                await store.put("model-v2", blob)
            assert await store.get("model-v2") == blob
    sha = hashlib.sha256(blob).digest()
    assert stored.size_bytes == len(blob)
    assert stored.digest == "SHA-256=" + base64.urlsafe_b64encode(sha).decode()
    assert back == blob


def stream_messages(server: NatsServerProcess, stream: str) -> int:
    """Messages a stream holds, from the monitoring endpoint."""
    url = f"{server.monitoring_url}/jsz?streams=true"
    with urllib.request.urlopen(url, timeout=5) as resp:
        jsz = json.load(resp)
    for account in jsz.get("account_details", []):
        for detail in account.get("stream_detail", []):
            if detail["name"] == stream:
                return int(detail["state"]["messages"])
    raise AssertionError(f"no stream {stream!r} in {url}")


async def test_a_put_past_its_deadline_leaves_no_chunks_behind(
    nats_server: NatsServerProcess,
    nats_loop: None,
) -> None:
    blob = os.urandom(8 * 1024 * 1024)  # 64 chunks of 128 KiB, each fsynced: ~50 ms here
    bucket = f"sweep{os.getpid()}"
    with trio.fail_after(DEADLINE_S):
        hasty = config_for(nats_server, "central-hasty", object_put_timeout_s=0.02)
        async with open_nats_bus(hasty) as bus:
            store = await bus.object_store(bucket)
            try:
                await store.put("model-v1", blob)
            except PublishError:
                completed = False
            else:
                # Python 3.11's asyncio.wait_for can swallow a cancellation that
                # meets a finished reply; nats-py's put then runs to the end.
                completed = True
        # Either the whole object (64 chunks and its meta) or nothing at all:
        # the chunks an interrupted put had written were purged.
        assert stream_messages(nats_server, f"OBJ_{bucket}") == (65 if completed else 0)
        async with open_nats_bus(config_for(nats_server, "central-retry")) as bus:
            store = await bus.object_store(bucket)
            await store.put("model-v1", blob)
            assert await store.get("model-v1") == blob


async def test_a_server_without_sync_always_is_refused(tmp_path: Path) -> None:
    server = await trio.to_thread.run_sync(
        lambda: NatsServerProcess.start(tmp_path / "lax", sync_always=False)
    )
    try:
        with trio.fail_after(DEADLINE_S):
            with pytest.raises(ConfigError, match="sync_interval: always"):
                async with open_nats_bus(config_for(server, "strict")):
                    pass
            # The check can be turned off explicitly (a dev box, a benchmark).
            lax = config_for(server, "lax", require_sync_always=False)
            async with open_nats_bus(lax) as bus:
                await bus.publish("part.x", b"ok")
    finally:
        await trio.to_thread.run_sync(server.stop)


async def _relay(a: trio.SocketStream, b: trio.SocketStream) -> None:
    try:
        while data := await a.receive_some(65536):
            await b.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the other direction finished first and closed both
    finally:
        with trio.CancelScope(shield=True):
            await b.aclose()


async def test_the_sync_check_retries_a_monitoring_port_that_drops_its_first_request(
    nats_server: NatsServerProcess, nursery: trio.Nursery
) -> None:
    # As when nats-server restarts between the client's connect and the check: the
    # first request is dropped, the next one reaches the server.
    connections = 0

    async def handle(client: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            await client.aclose()
            return
        upstream = await trio.open_tcp_stream("127.0.0.1", nats_server.monitoring_port)
        async with trio.open_nursery() as pipes:
            pipes.start_soon(_relay, client, upstream)
            pipes.start_soon(_relay, upstream, client)

    (listener,) = await nursery.start(
        functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1")
    )
    port = listener.socket.getsockname()[1]
    config = config_for(
        nats_server, "sync-retry", monitoring_url=f"http://127.0.0.1:{port}", connect_backoff_s=0.01
    )
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config) as bus:
            await bus.publish("part.x", b"ok")
    assert connections == 2


async def test_a_monitoring_url_nothing_answers_is_a_config_error_after_the_attempts(
    nats_server: NatsServerProcess,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = config_for(
        nats_server,
        "sync-wrong-url",
        monitoring_url=f"http://127.0.0.1:{port}",
        connect_attempts=3,
        connect_backoff_s=0.01,
    )
    with (
        trio.fail_after(DEADLINE_S),
        pytest.raises(ConfigError, match="sync_interval after 3 attempts"),
    ):
        async with open_nats_bus(config):
            pass


async def test_an_unreachable_server_fails_after_the_bounded_attempts() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = NatsConfig(
        servers=(f"nats://127.0.0.1:{port}",),
        connect_attempts=2,
        connect_backoff_s=0.01,
        reconnect_wait_s=0.01,
        require_sync_always=False,
    )
    with trio.fail_after(DEADLINE_S), pytest.raises(BusUnavailable, match="after 2 attempts"):
        async with open_nats_bus(config):
            pass


async def test_an_error_inside_a_durable_subscription_comes_out_unwrapped(
    nats_server: NatsServerProcess,
    nats_loop: None,
) -> None:
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config_for(nats_server, "unwrap")) as bus:
            with pytest.raises(KeyError, match="mine"):
                async with bus.subscribe(f"part.unwrap{os.getpid()}.>", durable="unwrap"):
                    raise KeyError("mine")


async def test_a_message_never_acked_stops_at_max_deliver_and_stays_in_the_stream(
    fresh_nats_server: NatsServerProcess,
    nats_loop: None,
) -> None:
    # Never redelivered forever (a message no consumer can settle), never
    # discarded silently: the stream keeps it for an operator to read.
    server = fresh_nats_server
    config = config_for(server, "regional", ack_wait_s=0.5, max_deliver=2, max_hold_s=0.0)
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config) as bus:
            await bus.publish("part.r", b"poison")
            async with bus.subscribe("part.>", durable="regional", capacity=16) as sub:
                first = await sub.receive()
                second = await sub.receive()  # after ack_wait
                with trio.move_on_after(2.0) as scope:
                    await sub.receive()
                assert scope.cancelled_caught  # no third delivery
    assert (first.payload, first.redelivered) == (b"poison", False)
    assert (second.payload, second.redelivered) == (b"poison", True)
    url = f"{server.monitoring_url}/jsz?streams=true&config=true"
    body = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(url, timeout=5).read())
    (stream,) = [
        detail
        for account in json.loads(body)["account_details"]
        for detail in account["stream_detail"]
        if detail["name"] == "PART"
    ]
    assert stream["state"]["messages"] == 1
