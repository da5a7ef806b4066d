"""A leased central past its evaluation target closes its input: partials wait in the UP stream.

In-memory bus, registry and lease bucket under a fake clock. Without the
close, every partial such a central took would be held until ``max_hold_s``,
come back, be taken again, and end on the dead-letter path after
``max_deliver``, since no version that could acknowledge it is ever published.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import trio
from trio.testing import MockClock

from fedtier.protocol.bus import MemoryBroker
from fedtier.protocol.messages import Tier
from fedtier.protocol.names import NatsSubjects
from fedtier.simulations.testing import sign_partial
from fedtier.tiers._status import StatusPublisher, encode_snapshot
from fedtier.tiers.central import CentralDaemon
from fedtier.tiers.config import CentralConfig, EvaluationTarget
from fedtier.tiers.statuscmd import row_cells, rows_from_entries, to_json
from fedtier.tiers.store import open_state_store, read_stored_versions
from tests.unit.test_central import (
    FLEET,
    REGIONALS,
    Hub,
    current_model,
    evaluation,
    regional_buffer,
)
from tests.unit.test_central_standby import TTL_S, lease_config, with_lease
from tests.unit.test_lease import MemoryKv

TARGET = EvaluationTarget("loss", 9.0)
"""Met by v1 and later, never by v0 (see ``countdown``)."""


def countdown(version: int, params: np.ndarray) -> dict[str, float]:
    """A loss that falls by one per version: v0 scores 10, v1 scores 9."""
    return {"loss": 10.0 - version}


def target_config(tmp: Path, name: str, target: EvaluationTarget | None) -> CentralConfig:
    return replace(lease_config(tmp, name), evaluation=evaluation(target=target))


def make_partials(hub: Hub, count: int) -> tuple[list[bytes], list[set[bytes]]]:
    """Signed partials from the two regionals, and the device update ids inside each."""
    datas: list[bytes] = []
    leaf_sets: list[set[bytes]] = []
    for i in range(count):
        acc = regional_buffer(60 + i, 2, hub.layout)
        datas.append(
            sign_partial(REGIONALS[i % 2], FLEET, hub.layout, acc, seq=1 + i, tier=Tier.REGIONAL)[1]
        )
        leaf_sets.append(set(acc.leaf_ids))
    return datas, leaf_sets


def waiting(broker: MemoryBroker) -> list[bytes]:
    """The partials the UP stream keeps undelivered for the central's consumer."""
    queue = broker._queues[NatsSubjects(FLEET).central_consumer()]
    return [message.payload for message, _, _ in queue.pending]


async def run_until_stopped(
    central: CentralDaemon, body: Callable[[], Awaitable[None]], *, stop_cleanly: bool = True
) -> None:
    """Serve ``central`` until it is ready, run ``body()``, then stop it."""
    async with trio.open_nursery() as nursery:
        await nursery.start(central.serve)
        with trio.fail_after(10 * TTL_S):
            await central.ready.wait()
        await body()
        if stop_cleanly:
            central.request_shutdown()
        else:
            nursery.cancel_scope.cancel()


async def test_a_leased_central_past_its_target_leaves_partials_in_the_stream(
    tmp_path: Path, autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fedtier")
    kv = MemoryKv(TTL_S)
    hub = Hub(tmp_path, target_config(tmp_path, "a", TARGET), evaluator=countdown)
    datas, leaf_sets = make_partials(hub, 4)
    central = with_lease(hub.daemon(), kv, "a")

    async def reach_the_target() -> None:
        # Two partials make v1, which meets the target; the third is in the open
        # buffer, held (unacknowledged) for v2, when v1's score comes in.
        for data in datas[:3]:
            await hub.send(data)
        with trio.fail_after(30):
            while not central.input_closed:
                await trio.sleep(0.05)
        await hub.send(datas[3])
        await trio.sleep(10.0)  # time for a delivery, had the input been open
        assert central.target_reached is not None
        assert central.target_reached.version == 1
        assert central.version == 1
        assert (await current_model(hub.registry))[0].version == 1
        assert central.counts[("accepted", "")] == 3  # the third was taken, then given back
        # Given back unacknowledged, and the fourth never delivered: both wait in the stream.
        assert sorted(waiting(hub.nats)) == sorted(datas[2:])
        assert central.buffer.accumulator.input_count == 0
        # Still the active central: a standby must not take over and consume.
        assert central.lease is not None
        assert central.lease.is_held
        snapshot = StatusPublisher(central, cast(Any, None)).snapshot()
        assert (snapshot.state, snapshot.target_reached_version) == ("serving", 1)
        assert snapshot.input_closed
        (row,) = rows_from_entries([("central", encode_snapshot(snapshot))], snapshot.at_ms)
        assert "target reached at v1, input closed" in row_cells(row)[2]
        (shown,) = json.loads(to_json([row], FLEET, snapshot.at_ms))["daemons"]
        assert (shown["health"], shown["target_reached_version"], shown["input_closed"]) == (
            "ok",
            1,
            True,
        )

    await run_until_stopped(central, reach_the_target)
    assert "input closed at the evaluation target: 1 partials of the open epoch" in caplog.text
    assert "input still settling" not in caplog.text  # the clean stop did not hang
    async with open_state_store(hub.config.store_path) as store:
        assert (await store.recover()).open_inputs == []  # forgotten: never acknowledged

    # A restart with the target still met takes no input at all.
    central = with_lease(hub.daemon(), kv, "a")

    async def stay_closed() -> None:
        await trio.sleep(10.0)
        assert central.input_closed
        assert central.counts[("accepted", "")] == 0
        assert sorted(waiting(hub.nats)) == sorted(datas[2:])

    await run_until_stopped(central, stay_closed)

    # The target removed: the kept partials make v2, each counted once.
    hub.config = target_config(tmp_path, "a", None)
    central = with_lease(hub.daemon(), kv, "a")

    async def resume() -> None:
        with trio.fail_after(30):
            while central.upstream.published[-1:] != [2]:
                await trio.sleep(0.05)
        assert not central.input_closed
        assert central.counts[("accepted", "")] == 2
        await trio.sleep(1.0)
        assert waiting(hub.nats) == []

    await run_until_stopped(central, resume)
    versions = {v.version: v.record for v in read_stored_versions(hub.config.store_path)}
    assert set(versions[2].lineage) == leaf_sets[2] | leaf_sets[3]
    counted = Counter(leaf for record in versions.values() for leaf in record.lineage)
    assert set(counted) == set().union(*leaf_sets)
    assert set(counted.values()) == {1}


async def test_a_standby_taking_over_past_the_target_takes_no_input(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    kv = MemoryKv(TTL_S)
    hub = Hub(tmp_path, target_config(tmp_path, "a", TARGET), evaluator=countdown)
    datas, _ = make_partials(hub, 3)
    active = with_lease(hub.daemon(), kv, "a")

    async def reach_the_target() -> None:
        for data in datas[:2]:
            await hub.send(data)
        with trio.fail_after(30):
            while not active.input_closed or active.upstream.published[-1:] != [1]:
                await trio.sleep(0.05)

    # The active central's machine is lost (no clean stop, no lease release).
    await run_until_stopped(active, reach_the_target, stop_cleanly=False)
    await hub.send(datas[2])
    # A standby with an empty store of its own: its store knows of no target.
    standby_hub = Hub(
        tmp_path,
        target_config(tmp_path, "b", TARGET),
        nats=hub.nats,
        registry=hub.registry,
        evaluator=countdown,
    )
    standby = with_lease(standby_hub.daemon(), kv, "b")

    async def took_over() -> None:
        assert standby.took_over_at == 1
        await trio.sleep(10.0)
        assert standby.target_reached is not None
        assert standby.target_reached.version == 1
        assert standby.input_closed
        assert standby.counts[("accepted", "")] == 0
        assert waiting(hub.nats) == [datas[2]]

    await run_until_stopped(standby, took_over)
