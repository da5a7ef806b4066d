"""Never ack-and-drop: quarantine, re-admission, finite sums and crash-free admission.

Real state stores, in-memory buses, a fake clock (autojump).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

from fedtier.cli import main
from fedtier.protocol.bus import MemoryBus
from fedtier.protocol.codecs import encode
from fedtier.protocol.envelope import seal
from fedtier.protocol.errors import DigestMismatch
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.messages import PartialAggregate
from fedtier.simulations.testing import sign_partial
from fedtier.tiers import tier as tier_module
from fedtier.tiers._quarantine import QuarantineLimits
from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.core import admit_partial
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.model_registry import MemoryModelRegistry
from fedtier.tiers.regional import RegionalDaemon
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.tiers.store import read_quarantine
from tests.unit.test_regional import (
    CENTRAL,
    EDGES,
    FLEET,
    LAYOUT,
    REGIONAL,
    STRANGER,
    SUBJECTS,
    Region,
    edge_buffer,
    make_config,
    receive_partial,
)
from tests.unit.test_regional import REGION as REGION_NAME

NEVER = FlushPolicy(max_inputs=100, max_age_s=None)


@pytest.fixture
async def region(tmp_path: Path) -> Region:
    r = Region(tmp_path, make_config(tmp_path))
    await r.publish_model(0)
    return r


def file_keys(path: Path, edges: dict[str, SigningIdentity]) -> TierKeys:
    path.write_text(
        "[keys]\n" + "".join(f'{n} = "{e.verify_key.raw.hex()}"\n' for n, e in edges.items())
    )
    return TierKeys(REGIONAL, KeyRegistry([path], role="edge"), CENTRAL.verify_key)


def regional_with(region: Region, keys: TierKeys) -> RegionalDaemon:
    return RegionalDaemon(
        region.config,
        nats=MemoryBus(region.nats),
        registry_store=region.registry,
        keys=keys,
        metrics=region.metrics,
        clock_ms=lambda: 1_764_288_000_000,
        store_in_thread=False,
    )


def pending(region: Region) -> int:
    return len(region.nats._queues[SUBJECTS.regional_consumer(REGION_NAME)].pending)


def resealed(message: PartialAggregate, acc: Accumulator, signer: SigningIdentity) -> bytes:
    return seal(message, encode(np.asarray(acc.numerator), message.codec), signer)


async def settle() -> None:
    await wait_all_tasks_blocked()
    await trio.sleep(1)  # virtual: the commits the acks wait for


async def test_a_partial_from_an_unregistered_edge_is_folded_once_after_a_reload(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    region = Region(tmp_path, make_config(tmp_path, flush=FlushPolicy(max_inputs=2)))
    await region.publish_model(0)
    registry_file = tmp_path / "edges.toml"
    keys = file_keys(registry_file, {"edge-0": EDGES[0]})
    a, b = edge_buffer(1, 2), edge_buffer(2, 3)
    pa, data_a = sign_partial(STRANGER, FLEET, LAYOUT, a)
    pb, data_b = sign_partial(EDGES[0], FLEET, LAYOUT, b)
    up = MemoryBus(region.nats)
    async with up.subscribe(SUBJECTS.to_central(), durable="probe") as central:
        async with trio.open_nursery() as nursery:
            regional = regional_with(region, keys)
            await nursery.start(regional.serve)
            await region.send(data_a)
            await settle()
            # Acknowledged (its updates were receipted below) and kept, not folded.
            assert pending(region) == 0
            assert regional.counts[("rejected", "unknown_sender")] == 1
            assert regional.buffer.is_empty
            (row,) = read_quarantine(region.config.store_path)
            assert (row.reason, row.retry, row.input_id) == ("unknown_sender", "any", pa.partial_id)
            assert regional.readmit_quarantined() == 0  # still unknown: stays
            # The registry learns the edge (what SIGHUP does), then the re-admission pass.
            file_keys(registry_file, {"edge-0": EDGES[0], "edge-9": STRANGER})
            keys.senders.reload()
            assert regional.readmit_quarantined() == 1
            assert regional.readmit_quarantined() == 0  # never twice
            await region.send(data_b)
            partial, _ = await receive_partial(central)
            nursery.cancel_scope.cancel()
    assert list(partial.inputs) == [pa.partial_id, pb.partial_id]
    assert partial.update_count == 5
    assert read_quarantine(region.config.store_path) == []
    # A restart folds nothing again: the input is flushed, the quarantine empty.
    async with trio.open_nursery() as nursery:
        regional = regional_with(region, keys)
        await nursery.start(regional.serve)
        assert regional.buffer.is_empty
        assert regional.readmitted == 0
        nursery.cancel_scope.cancel()


async def test_a_partial_with_repeated_inputs_leaves_the_regional_running(
    region: Region, autojump_clock: MockClock
) -> None:
    a = edge_buffer(3, 2)
    message, _ = sign_partial(EDGES[0], FLEET, LAYOUT, a)
    twice = replace(message, inputs=(message.inputs[0], message.inputs[0]))
    good, data_good = sign_partial(EDGES[1], FLEET, LAYOUT, edge_buffer(4, 1))
    async with trio.open_nursery() as nursery:
        regional = region.daemon()
        await nursery.start(regional.serve)
        await region.send(resealed(twice, a, EDGES[0]))
        await settle()
        assert regional.counts[("rejected", "malformed")] == 1
        await region.send(data_good)
        await settle()
        assert regional.counts[("accepted", "")] == 1
        assert list(regional.buffer.accumulator.input_ids) == [good.partial_id]
        nursery.cancel_scope.cancel()
    (row,) = read_quarantine(region.config.store_path)
    assert (row.reason, row.retry) == ("malformed", "never")  # kept for forensics
    assert pending(region) == 0


async def test_a_partial_claiming_more_weight_than_its_updates_is_quarantined(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # edge_buffer(5, 2) holds updates of n_samples 3 and 4: at most 2 x 4 under a cap of 4.
    region = Region(tmp_path, make_config(tmp_path, max_samples_per_update=4))
    await region.publish_model(0)
    acc = edge_buffer(5, 2)
    message, data_honest = sign_partial(EDGES[0], FLEET, LAYOUT, acc)
    acc_lie = edge_buffer(6, 2)
    lie, _ = sign_partial(EDGES[1], FLEET, LAYOUT, acc_lie)
    lie = replace(lie, sample_count=1e12)
    async with trio.open_nursery() as nursery:
        regional = region.daemon()
        await nursery.start(regional.serve)
        await region.send(resealed(lie, acc_lie, EDGES[1]))
        await region.send(data_honest)
        await settle()
        assert regional.counts[("rejected", "inconsistent_partial")] == 1
        assert regional.counts[("accepted", "")] == 1
        assert list(regional.buffer.accumulator.input_ids) == [message.partial_id]
        nursery.cancel_scope.cancel()
    (row,) = read_quarantine(region.config.store_path)
    assert (row.reason, row.input_id) == ("inconsistent_partial", lie.partial_id)
    assert pending(region) == 0


async def test_partials_whose_sample_counts_sum_to_inf_are_all_folded(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    region = Region(tmp_path, make_config(tmp_path, flush=FlushPolicy(max_inputs=2)))
    await region.publish_model(0)
    huge = []
    for i in range(2):
        acc = edge_buffer(10 + i, 2)
        message, _ = sign_partial(EDGES[i], FLEET, LAYOUT, acc)
        huge.append(
            (
                replace(message, sample_count=1e308),
                resealed(replace(message, sample_count=1e308), acc, EDGES[i]),
            )
        )
    normal, data_normal = sign_partial(EDGES[2], FLEET, LAYOUT, edge_buffer(12, 1))
    up = MemoryBus(region.nats)
    async with up.subscribe(SUBJECTS.to_central(), durable="probe") as central:
        async with trio.open_nursery() as nursery:
            regional = region.daemon()
            await nursery.start(regional.serve)
            for _, data in huge:
                await region.send(data)
            # The second would make the epoch's sample count inf: the first is cut alone.
            first, _ = await receive_partial(central)
            await region.send(data_normal)
            second, _ = await receive_partial(central)
            nursery.cancel_scope.cancel()
    assert list(first.inputs) == [huge[0][0].partial_id]
    assert list(second.inputs) == [huge[1][0].partial_id, normal.partial_id]
    assert first.sample_count == 1e308
    assert regional.counts[("accepted", "")] == 3
    assert read_quarantine(region.config.store_path) == []
    # And it restarts: nothing non-finite is stored in an open batch.
    async with trio.open_nursery() as nursery:
        regional = region.daemon()
        await nursery.start(regional.serve)
        nursery.cancel_scope.cancel()


async def test_numerators_near_float32_max_are_cut_apart_not_dropped(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # The f32 overflow of the issue (values of 3e38, no norm bound): every
    # acknowledged input reaches a partial; none is dropped with its epoch.
    region = Region(tmp_path, make_config(tmp_path, flush=NEVER))
    await region.publish_model(0)
    sent = []
    for i in range(2):
        acc = Accumulator(LAYOUT.num_params)
        acc.fold_update(
            (500 + i).to_bytes(16, "big"),
            np.full(LAYOUT.num_params, 3e38, np.float32),
            n_samples=1,
            tau=0,
            discount=1.0,
            base_version=0,
        )
        sent.append(sign_partial(EDGES[i], FLEET, LAYOUT, acc))
    up = MemoryBus(region.nats)
    async with up.subscribe(SUBJECTS.to_central(), durable="probe") as central:
        async with trio.open_nursery() as nursery:
            regional = region.daemon()
            await nursery.start(regional.serve)
            for _, data in sent:
                await region.send(data)
            first, n1 = await receive_partial(central)
            regional.request_shutdown()  # the clean shutdown flushes the second
            second, n2 = await receive_partial(central)
    assert [list(first.inputs), list(second.inputs)] == [
        [sent[0][0].partial_id],
        [sent[1][0].partial_id],
    ]
    assert np.isfinite(n1).all()
    assert np.isfinite(n2).all()
    assert read_quarantine(region.config.store_path) == []


async def test_an_admission_that_raises_is_quarantined_never_a_crash(
    region: Region, autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("a bug in admission")

    pa, data = sign_partial(EDGES[0], FLEET, LAYOUT, edge_buffer(20, 2))
    async with trio.open_nursery() as nursery:
        regional = region.daemon()
        await nursery.start(regional.serve)
        monkeypatch.setattr(tier_module, "admit_partial", broken)
        await region.send(data)
        await settle()
        assert regional.counts[("rejected", "internal_error")] == 1
        assert pending(region) == 0
        (row,) = read_quarantine(region.config.store_path)
        assert (row.reason, row.retry) == ("internal_error", "any")
        # The bug fixed (here: undone), the next pass folds it, once.
        monkeypatch.setattr(tier_module, "admit_partial", admit_partial)
        assert regional.readmit_quarantined() == 1
        assert list(regional.buffer.accumulator.input_ids) == [pa.partial_id]
        await settle()
        nursery.cancel_scope.cancel()
    assert read_quarantine(region.config.store_path) == []


async def test_past_its_bound_the_quarantine_leaves_inputs_unacknowledged(
    region: Region, autojump_clock: MockClock
) -> None:
    first = sign_partial(STRANGER, FLEET, LAYOUT, edge_buffer(30, 1))[1]
    second = sign_partial(STRANGER, FLEET, LAYOUT, edge_buffer(31, 1))[1]
    async with trio.open_nursery() as nursery:
        regional = region.daemon()
        regional.quarantine_limits = QuarantineLimits(max_inputs_per_sender=1)
        await nursery.start(regional.serve)
        await region.send(first)
        await region.send(second)
        await settle()
        assert regional.counts[("rejected", "unknown_sender")] == 2
        assert regional.store.quarantine_usage.count == 1
        nursery.cancel_scope.cancel()
    # The second stays with the broker (redelivered, never lost); the first is kept.
    assert pending(region) == 1
    assert len(read_quarantine(region.config.store_path)) == 1


class FlakyRegistry(MemoryModelRegistry):
    """A registry whose object store fails the digest of model v1 (the issue's tampered object)."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    async def blob(self, version: int) -> bytes | None:
        if version == 1 and self.broken:
            raise DigestMismatch("model v1: the bytes read do not match the stored digest")
        return await super().blob(version)


async def test_a_model_blob_failing_its_digest_is_skipped_and_retried_at_the_edge(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    from tests.unit.test_edge import Site
    from tests.unit.test_edge import make_config as edge_config

    site = Site(tmp_path, edge_config(tmp_path), registry=FlakyRegistry())
    await site.publish_model(0)
    registry = site.registry
    assert isinstance(registry, FlakyRegistry)
    async with trio.open_nursery() as nursery:
        edge = site.daemon()
        await nursery.start(edge.serve)
        await site.publish_model(1)
        await trio.sleep(5)
        assert edge.known_version == 0  # skipped, the edge still serves
        registry.broken = False
        await trio.sleep(120)  # the retry's backoff
        assert edge.known_version == 1
        nursery.cancel_scope.cancel()


async def test_quarantine_commands_on_a_real_store(
    region: Region, autojump_clock: MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    pa, data = sign_partial(STRANGER, FLEET, LAYOUT, edge_buffer(40, 1))
    async with trio.open_nursery() as nursery:
        regional = region.daemon()
        await nursery.start(regional.serve)
        await region.send(data)
        await settle()
        nursery.cancel_scope.cancel()
    state = str(region.config.state_dir)
    assert main(["quarantine", "list", "--state-dir", state, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    (row,) = listed["inputs"]
    assert (row["reason"], row["input_id"], listed["dropped"]) == (
        "unknown_sender",
        pa.partial_id.hex(),
        0,
    )
    out = region.tmp / "row.bin"
    assert (
        main(["quarantine", "show", "--state-dir", state, str(row["qid"]), "--out", str(out)]) == 0
    )
    assert out.read_bytes() == data
    capsys.readouterr()
    assert main(["quarantine", "release", "--state-dir", state, str(row["qid"])]) == 0
    assert read_quarantine(region.config.store_path)[0].released
    assert main(["quarantine", "drop", "--state-dir", state, str(row["qid"])]) == 2  # no --yes
    assert len(read_quarantine(region.config.store_path)) == 1
    assert main(["quarantine", "drop", "--state-dir", state, str(row["qid"]), "--yes"]) == 0
    assert read_quarantine(region.config.store_path) == []
    capsys.readouterr()
    assert main(["quarantine", "list", "--state-dir", state]) == 0
    assert "1 dropped so far" in capsys.readouterr().out
