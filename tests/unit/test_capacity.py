"""The worst-case message sizes, and daemons that refuse a broker too small to carry them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from fedtier.protocol.bus import MemoryBroker, MemoryBus
from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import ConfigError
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import layout_of
from fedtier.protocol.limits import Limits
from fedtier.protocol.messages import Tier
from fedtier.protocol.model_parts import BlobAssembler
from fedtier.protocol.names import MqttTopics
from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.core import (
    MESSAGE_OVERHEAD,
    build_partial,
    check_fits,
    partial_envelope_bound,
)
from tests.unit.test_edge import Site
from tests.unit.test_edge import make_config as edge_config

SENDER = SigningIdentity.from_seed(b"\x07" * 32)
LAYOUT = layout_of([("w", (300,)), ("b", (7,))])
CODECS = [CodecSpec("f32"), CodecSpec("f16"), CodecSpec("i8", 64)]


def fullest_partial(limits: Limits, codec: CodecSpec) -> bytes:
    """A real partial listing ``limits.max_ids`` inputs (and as many leaves)."""
    rng = np.random.default_rng(0)
    acc = Accumulator(LAYOUT.num_params, hist_buckets=limits.max_hist_buckets)
    for i in range(limits.max_ids):
        acc.fold_update(
            (2**127 + i).to_bytes(16, "big"),
            rng.standard_normal(LAYOUT.num_params).astype(np.float32),
            n_samples=1,
            tau=i % limits.max_hist_buckets,
            discount=1.0,
            base_version=2**40 + i,
        )
    _, data = build_partial(
        acc,
        identity=SENDER,
        fleet="acme",
        tier=Tier.EDGE,
        known_version=2**40 + limits.max_ids,
        layout=LAYOUT.fingerprint,
        num_params=LAYOUT.num_params,
        codec=codec,
        seq=2**62,
        created_ms=1_764_288_000_000,
    )
    return data


@pytest.mark.parametrize("codec", CODECS, ids=str)
def test_the_bound_holds_the_fullest_real_partial_and_is_tight(codec: CodecSpec) -> None:
    limits = Limits(max_ids=300, max_hist_buckets=32)
    actual = len(fullest_partial(limits, codec))
    bound = partial_envelope_bound(
        fleet="acme",
        sender=SENDER.key_id,
        tier=Tier.EDGE,
        layout=LAYOUT.fingerprint,
        num_params=LAYOUT.num_params,
        codec=codec,
        limits=limits,
    )
    assert actual <= bound
    # Slack comes from counters at their widest encoding only (9 bytes each).
    assert bound - actual < 9 * (limits.max_hist_buckets + 16)


def test_ids_dominate_the_header_of_the_default_limits() -> None:
    bound = partial_envelope_bound(
        fleet="acme",
        sender=SENDER.key_id,
        tier=Tier.REGIONAL,
        layout=LAYOUT.fingerprint,
        num_params=1_000_000,
        codec=CodecSpec("f32"),
        limits=Limits(),
    )
    ids = 2 * Limits().max_ids * (16 + 2)  # inputs and leaves, bin8 each
    assert 4_000_000 + ids < bound < 4_000_000 + ids + 4096


def test_check_fits_names_the_sizes_the_broker_and_the_fix() -> None:
    check_fits("a partial", 100, 100, broker="max_payload", fix="raise it")
    check_fits("a partial", 10**9, None, broker="max_payload", fix="raise it")
    with pytest.raises(ConfigError, match=r"a partial can take up to 101 bytes, above max_payload"):
        check_fits("a partial", 101, 100, broker="max_payload", fix="raise it")


async def test_an_edge_whose_partials_cannot_fit_max_payload_does_not_start(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # A NATS server with max_payload just below what one partial of this model
    # can take: JetStream would refuse that partial on every retry.
    site = Site(tmp_path, edge_config(tmp_path))
    need = (
        partial_envelope_bound(
            fleet=site.config.fleet,
            sender=site.daemon().key_id,
            tier=Tier.EDGE,
            layout=layout_of([("w", (4,)), ("b", (2,))]).fingerprint,
            num_params=6,
            codec=CodecSpec("f32"),
            limits=site.config.limits,
        )
        + MESSAGE_OVERHEAD
    )
    site.nats = MemoryBroker("nats", max_message_bytes=need - 1)
    await site.publish_model(0)
    with pytest.RaisesGroup(
        pytest.RaisesExc(ConfigError, match=r"partial of model v0 .* above the largest partial"),
        flatten_subgroups=True,
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(site.daemon().serve)

    # Exactly enough: it starts.
    site.nats = MemoryBroker("nats", max_message_bytes=need)
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        assert edge.known_version == 0
        nursery.cancel_scope.cancel()


async def test_an_edge_relays_a_blob_above_the_packet_limit_as_parts_a_device_joins(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(tmp_path, edge_config(tmp_path))
    await site.publish_model(0)
    blob = await site.registry.blob(0)
    assert blob is not None
    # Room for parts of a quarter of the blob: four or five of them.
    site.mqtt = MemoryBroker("mqtt", max_message_bytes=MESSAGE_OVERHEAD + len(blob) // 4)
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        await wait_all_tasks_blocked()
        device = MemoryBus(site.mqtt)
        topics = MqttTopics(site.config.fleet, edge_config(tmp_path).site)
        assembler = BlobAssembler(len(blob))
        joined: bytes | None = None
        parts = 0
        async with device.subscribe(topics.model_blob_parts()) as sub:
            while joined is None:
                delivery = await sub.receive()
                index = topics.blob_part_index(delivery.subject)
                assert index is not None
                assert delivery.retained
                assert len(delivery.payload) + MESSAGE_OVERHEAD <= len(blob) // 4 + MESSAGE_OVERHEAD
                joined = assembler.offer(index, delivery.headers, delivery.payload)
                parts += 1
        assert joined == blob
        assert parts in (4, 5)
        # The whole-blob topic holds nothing: a device never sees a stale whole blob.
        async with device.subscribe(topics.model_blob()) as whole:
            with trio.move_on_after(1):
                await whole.receive()
                raise AssertionError("a retained whole blob is left")
        nursery.cancel_scope.cancel()


async def test_an_edge_whose_broker_cannot_carry_even_blob_parts_stops_saying_why(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    site = Site(tmp_path, edge_config(tmp_path))
    site.mqtt = MemoryBroker("mqtt", max_message_bytes=MESSAGE_OVERHEAD)
    await site.publish_model(0)
    with pytest.RaisesGroup(
        pytest.RaisesExc(ConfigError, match=r"cannot carry model v0's .* blob in at most"),
        flatten_subgroups=True,
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(site.daemon().serve)
