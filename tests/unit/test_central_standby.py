"""A standby central continues from the registry: lineage, optimizer state, held deliveries.

In-memory bus, registry and lease bucket under a fake clock; the real-broker
version (a process killed at ``central.after_publish``) is in
``tests/integration/test_ha.py``.
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import trio
from trio.testing import MockClock

from fedtier.protocol.errors import ConfigError, RegistryConflict
from fedtier.protocol.messages import Tier
from fedtier.protocol.names import NatsSubjects
from fedtier.simulations.testing import sign_partial
from fedtier.tiers._lease import Lease
from fedtier.tiers.central import CentralDaemon
from fedtier.tiers.config import CentralConfig, LeaseSettings, NatsSettings, load_initial_model
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.store import read_stored_versions
from tests.unit.test_central import (
    FLEET,
    REGIONALS,
    Hub,
    current_model,
    make_config,
    regional_buffer,
)
from tests.unit.test_lease import MemoryKv

TTL_S = 2.0


def leaves(group: BaseExceptionGroup[RegistryConflict]) -> list[RegistryConflict]:
    """The exceptions inside ``group``, however deeply trio's nurseries nested it."""
    found: list[RegistryConflict] = []
    for each in group.exceptions:
        if isinstance(each, BaseExceptionGroup):
            found.extend(leaves(each))
        else:
            found.append(each)
    return found


KEY = NatsSubjects.lease_key("central", None, None)


def lease_config(tmp: Path, name: str) -> CentralConfig:
    return replace(
        make_config(
            tmp,
            flush=FlushPolicy(max_inputs=2, max_age_s=None),
            optimizer_name="fedadam",
            optimizer_params={"lr": 0.1},
        ),
        state_dir=tmp / name,
        lease=LeaseSettings(enabled=True, ttl_s=TTL_S, instance=name),
    )


def with_lease(daemon: CentralDaemon, kv: MemoryKv, name: str) -> CentralDaemon:
    daemon.lease = Lease(kv, KEY, ttl_s=TTL_S, instance=name)
    return daemon


async def test_a_standby_central_continues_from_the_registry_after_the_active_one_is_lost(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    layout = load_initial_model(make_config(tmp_path).initial_model)[0]
    buffers = [regional_buffer(20 + i, 2, layout) for i in range(6)]
    partials = [
        sign_partial(REGIONALS[i % 2], FLEET, layout, buffers[i], seq=1 + i, tier=Tier.REGIONAL)[1]
        for i in range(6)
    ]

    # The same six partials through one central, no lease: the reference.
    straight = Hub(tmp_path, replace(lease_config(tmp_path, "straight"), lease=LeaseSettings()))
    async with trio.open_nursery() as nursery:
        await nursery.start(straight.daemon().serve)
        for data in partials:
            await straight.send(data)
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    reference = await current_model(straight.registry)
    assert reference[0].version == 3

    kv = MemoryKv(TTL_S)
    hub = Hub(tmp_path, lease_config(tmp_path, "a"))
    active = with_lease(hub.daemon(), kv, "a")
    standby_hub = Hub(tmp_path, lease_config(tmp_path, "b"), nats=hub.nats, registry=hub.registry)
    standby = with_lease(standby_hub.daemon(), kv, "b")
    async with trio.open_nursery() as nursery:
        active_scope = trio.CancelScope()

        async def serve_active(task_status: trio.TaskStatus[None]) -> None:
            with active_scope:
                await active.serve(task_status=task_status)

        await nursery.start(serve_active)
        await active.ready.wait()
        await nursery.start(standby.serve)
        assert standby.standby
        for data in partials[:2]:
            await hub.send(data)
        with trio.fail_after(30):
            while active.upstream.published[-1:] != [1]:
                await trio.sleep(0.05)
        # v2 is published, but the machine is lost before its inputs are acknowledged.
        assert active.held is not None
        active.held.published = lambda epoch: None  # type: ignore[method-assign]
        for data in partials[2:4]:
            await hub.send(data)
        with trio.fail_after(30):
            while (await current_model(hub.registry))[0].version != 2:
                await trio.sleep(0.05)
        active_scope.cancel()
        shutil.rmtree(tmp_path / "a")
        with trio.fail_after(10 * TTL_S):
            await standby.ready.wait()
        assert standby.took_over_at == 2
        for data in partials[4:]:
            await hub.send(data)
        with trio.fail_after(30):
            while standby.upstream.published[-1:] != [3]:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()

    # The redelivered v2 inputs were acknowledged as duplicates, never folded again.
    assert standby.counts[("duplicate", "")] == 2
    assert standby.counts[("accepted", "")] == 2
    pointer, _, params = await current_model(hub.registry)
    assert pointer.version == 3
    # The server optimizer continued (FedAdam's moments and step count from v2's
    # record): the model is the one a single central makes, not a reset's.
    np.testing.assert_allclose(params, reference[2], rtol=1e-6, atol=1e-7)
    assert standby.optimizer.steps == 3  # type: ignore[attr-defined]
    versions = [v.record for v in read_stored_versions(standby_hub.config.store_path)]
    counted = Counter(leaf for v in versions for leaf in v.lineage)
    assert set(counted) == {leaf for b in buffers for leaf in b.leaf_ids}
    assert set(counted.values()) == {1}
    assert [v.version for v in versions] == [0, 1, 2, 3]


async def test_a_standby_refuses_a_registry_whose_record_does_not_verify(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    kv = MemoryKv(TTL_S)
    hub = Hub(tmp_path, lease_config(tmp_path, "a"))
    layout = load_initial_model(hub.config.initial_model)[0]
    active = with_lease(hub.daemon(), kv, "a")
    async with trio.open_nursery() as nursery:
        await nursery.start(active.serve)
        await active.ready.wait()
        for i in range(2):
            data = sign_partial(
                REGIONALS[i], FLEET, layout, regional_buffer(40 + i, 1, layout),
                tier=Tier.REGIONAL,
            )[1]  # fmt: skip
            await hub.send(data)
        with trio.fail_after(30):
            while active.upstream.published[-1:] != [1]:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    record = await hub.registry.record(1)
    assert record is not None
    await hub.registry.put_record(1, record[:-1] + bytes([record[-1] ^ 1]))
    await trio.sleep(2 * TTL_S)  # the lease ages out
    standby = with_lease(
        Hub(tmp_path, lease_config(tmp_path, "b"), registry=hub.registry).daemon(), kv, "b"
    )
    refused: list[RegistryConflict] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(standby.serve)
            await trio.sleep(10 * TTL_S)
    except* RegistryConflict as group:
        refused.extend(leaves(group))
    assert len(refused) == 1
    assert "version record of v1 is refused" in str(refused[0])
    assert not standby.ready.is_set()


def test_a_central_with_a_lease_refuses_a_hold_shorter_than_a_buffer_window(
    tmp_path: Path,
) -> None:
    config = lease_config(tmp_path, "a")
    hub = Hub(tmp_path, replace(config, flush=FlushPolicy(max_inputs=2, max_age_s=60.0)))
    hub.config = replace(hub.config, nats=NatsSettings(max_hold_s=30.0))
    with pytest.raises(ConfigError, match="max_hold_s"):
        hub.daemon()
    hub.config = replace(hub.config, nats=NatsSettings(max_hold_s=0.0))
    with pytest.raises(ConfigError, match="in-progress acks"):
        hub.daemon()
    # Without a lease nothing is held, and nothing is refused.
    hub.config = replace(hub.config, lease=LeaseSettings())
    assert hub.daemon().held is None
