"""The lease (tiers._lease) on an in-memory KV with a TTL: take, expiry, CAS loss, lost refresh."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import trio
from trio.testing import MockClock

from fedtier.protocol.bus import Delivery, MemoryBroker, MemoryBus, Subscription
from fedtier.protocol.envelope import open_envelope, parse_envelope
from fedtier.protocol.errors import BusUnavailable, ConfigError, KvConflict, PublishError
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import layout_of
from fedtier.protocol.messages import PartialAggregate, Receipt, ReceiptStatus, Tier
from fedtier.protocol.names import NatsSubjects
from fedtier.simulations.testing import sign_model_version, sign_partial
from fedtier.tiers._forwarding import Forwarding
from fedtier.tiers._intents import FORWARDED_MAGIC, decode_forwarded, encode_forwarded
from fedtier.tiers._lease import LOSS_FRACTION, Lease, LeaseHolder
from fedtier.tiers._status import StatusPublisher, encode_snapshot
from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.config import (
    LeaseSettings,
    NatsSettings,
    RegionalConfig,
    StatusSettings,
    load_config,
)
from fedtier.tiers.edge import EdgeDaemon
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.model_registry import MemoryModelRegistry
from fedtier.tiers.regional import RegionalDaemon, check_hold_config
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.tiers.statuscmd import health_of, rows_from_entries
from fedtier.tiers.store import OutboxEntry
from fedtier.tiers.tier import TierDaemon
from tests.unit import test_edge as edge_tests

TTL_S = 9.0
FLEET = "acme"
LAYOUT = layout_of([("w", (3, 2)), ("b", (2,))])
CENTRAL = SigningIdentity.from_seed(b"\x01" * 32)
REGIONAL = SigningIdentity.from_seed(b"\x03" * 32)
OTHER_REGIONAL = SigningIdentity.from_seed(b"\x04" * 32)
EDGE = SigningIdentity.from_seed(b"\x40" * 32)


@dataclass(frozen=True, slots=True)
class Entry:
    value: bytes
    revision: int
    deleted: bool = False


class MemoryKv:
    """A KV bucket with a ``max_age``, like JetStream's: a value unwritten for ``ttl_s`` is gone.

    ``down`` makes every call fail as an unreachable server does;
    ``lose_replies`` makes writes land but their reply fail (outcome unknown).
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self.revision = 0
        self.values: dict[str, tuple[Entry, float]] = {}
        self.down = False
        self.lose_replies = False

    def _current(self, key: str) -> Entry | None:
        got = self.values.get(key)
        if got is None:
            return None
        entry, written = got
        if trio.current_time() - written >= self.ttl_s:
            del self.values[key]
            return None
        return entry

    async def entry(self, key: str) -> Entry | None:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise BusUnavailable("no server")
        return self._current(key)

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise BusUnavailable("no server")
        current = self._current(key)
        if (0 if current is None else current.revision) != last_revision:
            raise KvConflict(f"{key} is not at {last_revision}")
        self.revision += 1
        self.values[key] = (Entry(value, self.revision), trio.current_time())
        if self.lose_replies:
            raise PublishError("no reply")
        return self.revision

    def holder(self, key: str) -> LeaseHolder | None:
        entry = self._current(key)
        return None if entry is None else LeaseHolder.decode(entry.value)


KEY = NatsSubjects.lease_key("regional", "eu", None)


async def test_one_holder_and_the_standby_takes_over_after_the_ttl(
    autojump_clock: MockClock,
) -> None:
    kv = MemoryKv(TTL_S)
    first = Lease(kv, KEY, ttl_s=TTL_S, instance="one")
    second = Lease(kv, KEY, ttl_s=TTL_S, instance="two")
    async with trio.open_nursery() as nursery:
        first_scope = trio.CancelScope()

        async def run_first() -> None:
            with first_scope:
                await first.run()

        nursery.start_soon(run_first)
        await first.wait_held()
        nursery.start_soon(second.run)
        # Many refreshes later the first still holds it; the second stays standby.
        await trio.sleep(10 * TTL_S)
        assert first.is_held
        assert not second.held.is_set()
        assert second.holder is not None
        assert second.holder.instance == "one"
        epoch = first.epoch
        assert epoch is not None
        assert first.tenures == 1
        # The first dies (no release): the second takes over once the key aged out.
        last_write = kv.values[KEY][1]
        first_scope.cancel()
        await second.wait_held()
        waited = trio.current_time() - last_write
        assert TTL_S <= waited <= TTL_S + second.refresh_interval_s + 1
        holder = kv.holder(KEY)
        assert holder is not None
        assert holder.instance == "two"
        assert second.epoch is not None
        assert second.epoch > epoch
        nursery.cancel_scope.cancel()


async def test_release_hands_over_at_once(autojump_clock: MockClock) -> None:
    kv = MemoryKv(TTL_S)
    first = Lease(kv, KEY, ttl_s=TTL_S, instance="one")
    second = Lease(kv, KEY, ttl_s=TTL_S, instance="two")
    assert await first.try_acquire()
    assert not await second.try_acquire()
    await first.release()
    assert not first.held.is_set()
    assert await second.try_acquire()
    holder = kv.holder(KEY)
    assert holder is not None
    assert holder.instance == "two"
    assert not holder.released


async def test_a_lost_compare_and_set_ends_the_tenure_at_once(autojump_clock: MockClock) -> None:
    kv = MemoryKv(TTL_S)
    lease = Lease(kv, KEY, ttl_s=TTL_S, instance="one")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lease.run)
        await lease.wait_held()
        # Someone overwrites the key (a split brain's other side, an operator).
        entry = await kv.entry(KEY)
        assert entry is not None
        intruder = LeaseHolder(instance="other", host="h", pid=1, since_ms=1)
        await kv.update(KEY, intruder.encode(), entry.revision)
        written = trio.current_time()
        await lease.wait_lost()
        assert trio.current_time() - written <= lease.refresh_interval_s + 0.5
        assert not lease.is_held
        assert lease.losses == 1
        # It stays standby while the intruder's value lives, then takes it again.
        await lease.wait_held()
        assert trio.current_time() - written >= TTL_S
        assert lease.tenures == 2
        nursery.cancel_scope.cancel()


async def test_a_refresh_that_cannot_reach_the_bus_loses_before_the_ttl(
    autojump_clock: MockClock,
) -> None:
    kv = MemoryKv(TTL_S)
    lease = Lease(kv, KEY, ttl_s=TTL_S, instance="one")
    other = Lease(kv, KEY, ttl_s=TTL_S, instance="two")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lease.run)
        await lease.wait_held()
        await trio.sleep(lease.refresh_interval_s * 1.5)  # just after a refresh
        last_write = kv.values[KEY][1]
        kv.down = True
        await lease.wait_lost()
        lost_at = trio.current_time()
        # Given up before the key could age out on the server, so before anyone else can take it.
        assert lost_at < last_write + TTL_S
        assert lost_at <= last_write + TTL_S * LOSS_FRACTION + 0.01
        kv.down = False
        assert not await other.try_acquire()  # the dead tenure's value still lives
        await trio.sleep_until(last_write + TTL_S)
        assert await other.try_acquire()
        nursery.cancel_scope.cancel()


async def test_a_refresh_whose_reply_was_lost_keeps_the_lease(autojump_clock: MockClock) -> None:
    kv = MemoryKv(TTL_S)
    lease = Lease(kv, KEY, ttl_s=TTL_S, instance="one")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lease.run)
        await lease.wait_held()
        kv.lose_replies = True
        await trio.sleep(lease.refresh_interval_s * 1.5)
        kv.lose_replies = False
        # The write landed, so the next one conflicts; reading back shows our own tenure.
        await trio.sleep(TTL_S * 3)
        assert lease.is_held
        assert lease.losses == 0
        nursery.cancel_scope.cancel()


def test_holder_round_trips_and_refuses_garbage() -> None:
    holder = LeaseHolder(instance="a:1", host="a", pid=1, since_ms=5, epoch=7)
    assert LeaseHolder.decode(holder.encode()) == holder
    with pytest.raises(Exception, match="not a lease holder"):
        LeaseHolder.decode(b"\x01")


def test_lease_key_names_the_owner() -> None:
    assert NatsSubjects.lease_key("edge", "eu", "s1") == "edge.eu.s1"
    assert NatsSubjects.lease_key("regional", "eu", None) == "regional.eu"
    assert NatsSubjects.lease_key("central", None, None) == "central"


def test_lease_table_is_off_by_default_and_checked(tmp_path: Path) -> None:
    base = (
        'fleet = "f"\nidentity_key = "k"\nstate_dir = "s"\nregion = "eu"\n'
        '[keys]\nsenders = ["e"]\ncentral = "' + "a" * 64 + '"\nroot = "' + "b" * 64 + '"\n'
    )
    path = tmp_path / "regional.toml"
    path.write_text(base)
    assert load_config("regional", path).lease == LeaseSettings()
    assert not LeaseSettings().enabled
    path.write_text(base + '[lease]\nenabled = true\nttl_s = 4\ninstance = "r1"\n')
    assert load_config("regional", path).lease == LeaseSettings(True, 4.0, "r1")
    path.write_text(base + "[lease]\nttl_s = 0.5\n")
    with pytest.raises(ConfigError, match="ttl_s"):
        load_config("regional", path)


async def test_status_shows_the_standby_and_counts_it_healthy() -> None:
    config = SimpleNamespace(
        fleet="f1",
        region="eu",
        flush=FlushPolicy(max_inputs=10),
        status=StatusSettings(interval_s=0.5, rate_window_s=10.0),
    )
    daemon = SimpleNamespace(
        tier="regional",
        key_id="a" * 24,
        config=config,
        clock_ms=lambda: 1_800_000_000_000,
        counts=Counter(),
        ready=trio.Event(),
        known_version=3,
        standby=True,
    )
    publisher = StatusPublisher(cast(Any, daemon), cast(Any, None))
    snapshot = publisher.snapshot()
    assert snapshot.state == "standby"
    daemon.standby = False
    daemon.ready.set()
    assert publisher.snapshot().state == "serving"
    now = snapshot.at_ms
    assert health_of(snapshot, now) == "standby"
    rows = rows_from_entries([(publisher.key, encode_snapshot(snapshot))], now)
    assert rows[0].ok


def test_a_regional_that_holds_deliveries_refuses_a_config_that_cannot(tmp_path: Path) -> None:
    base = RegionalConfig(
        fleet="f",
        region="eu",
        identity_key=tmp_path / "k",
        state_dir=tmp_path / "s",
        central_key="a" * 64,
        lease=LeaseSettings(enabled=True),
        flush=FlushPolicy(max_inputs=10, max_age_s=30.0),
    )
    check_hold_config(base)
    with pytest.raises(ConfigError, match="max_hold_s > 0"):
        check_hold_config(replace(base, nats=NatsSettings(max_hold_s=0.0)))
    with pytest.raises(ConfigError, match=r"shorter than flush\.max_age_s"):
        check_hold_config(replace(base, nats=NatsSettings(max_hold_s=10.0)))
    with pytest.raises(ConfigError, match="never be cut"):
        check_hold_config(
            replace(base, flush=FlushPolicy(max_inputs=100, max_age_s=None), intake_capacity=64)
        )


def is_standby(daemon: RegionalDaemon) -> bool:
    """Read anew each time (a plain attribute check would be narrowed by the type checker)."""
    return daemon.standby


class MemoryForwarded:
    """The ``forwarded`` bucket, in memory."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.written: list[str] = []

    async def keys(self) -> list[str]:
        await trio.lowlevel.checkpoint()
        return list(self.values)

    async def get(self, key: str) -> tuple[bytes, int] | None:
        await trio.lowlevel.checkpoint()
        value = self.values.get(key)
        return None if value is None else (value, 1)

    async def put(self, key: str, value: bytes) -> int:
        await trio.lowlevel.checkpoint()
        self.values[key] = value
        self.written.append(key)
        return 1

    async def delete(self, key: str) -> None:
        await trio.lowlevel.checkpoint()
        self.values.pop(key, None)


async def test_a_regional_takes_input_only_while_it_holds_its_lease(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    broker = MemoryBroker("nats")
    registry = MemoryModelRegistry()
    pointer, blob = sign_model_version(
        CENTRAL, FLEET, 0, LAYOUT, np.zeros(LAYOUT.num_params, np.float32)
    )
    await registry.put_blob(0, blob)
    await registry.put_current(0, pointer)
    kv, forwarded = MemoryKv(TTL_S), MemoryForwarded()
    subjects = NatsSubjects(FLEET)
    key = NatsSubjects.lease_key("regional", "eu", None)

    def regional(name: str) -> RegionalDaemon:
        return _leased_regional(tmp_path, broker, registry, forwarded, name, kv)

    def edge_partial(seq: int) -> bytes:
        acc = Accumulator(LAYOUT.num_params)
        acc.fold_update(
            seq.to_bytes(16, "big"),
            np.full(LAYOUT.num_params, 0.5, np.float32),
            n_samples=2,
            tau=0,
            discount=1.0,
            base_version=0,
        )
        return sign_partial(EDGE, FLEET, LAYOUT, acc, seq=seq)[1]

    async def send(*seqs: int) -> None:
        for seq in seqs:
            await MemoryBus(broker).publish(subjects.to_region("eu"), edge_partial(seq))

    first, second = regional("a"), regional("b")
    lost = trio.Event()

    async def serve_first(task_status: trio.TaskStatus[None]) -> None:
        try:
            await first.serve(task_status=task_status)
        except* KvConflict:
            lost.set()

    up = MemoryBus(broker)
    async with (
        up.subscribe(subjects.to_central(), durable="probe") as central,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(serve_first)
        await first.ready.wait()
        await nursery.start(second.serve)
        assert is_standby(second)
        assert not second.ready.is_set()
        await send(1, 2)
        with trio.fail_after(60):
            got = await central.receive()
        await got.ack()
        assert forwarded.written  # an intent was written before the publish
        # Another instance writes the lease: the first stops at once, the second
        # waits for that value to age out, then takes input.
        entry = await kv.entry(key)
        assert entry is not None
        intruder = LeaseHolder(instance="other", host="h", pid=1, since_ms=1)
        await kv.update(key, intruder.encode(), entry.revision)
        with trio.fail_after(TTL_S):
            await lost.wait()
        with trio.fail_after(3 * TTL_S):
            await second.ready.wait()
        assert not is_standby(second)
        await send(3, 4)
        with trio.fail_after(60):
            got = await central.receive()
        await got.ack()
        nursery.cancel_scope.cancel()
    assert second.counts[("accepted", "")] == 2


async def test_held_deliveries_are_released_in_epoch_order_past_quarantined_epochs() -> None:
    daemon = SimpleNamespace(nats=SimpleNamespace(max_single_message_bytes=None))
    forwarding = Forwarding(
        cast(Any, daemon), MemoryForwarded(), prefix="eu.", republish_subject="up"
    )

    def entry(epoch: int) -> OutboxEntry:
        return OutboxEntry(
            partial_id=bytes([epoch]) * 16, epoch=epoch, seq=epoch, subject="s", envelope=b"e"
        )

    forwarding.closed_without_partial(1)  # its inputs went to the quarantine
    assert forwarding.published_epoch == -1  # epoch 0 is not upstream yet
    forwarding.published(entry(0))
    assert forwarding.published_epoch == 1
    forwarding.published(entry(2))
    with trio.fail_after(1):
        await forwarding.wait_published(2)
    assert forwarding.key_of(bytes(16)) == "eu." + "00" * 16


async def test_a_take_whose_reply_was_lost_is_recognised_as_ours(autojump_clock: MockClock) -> None:
    kv = MemoryKv(TTL_S)
    lease = Lease(kv, KEY, ttl_s=TTL_S, instance="one")
    kv.lose_replies = True
    assert not await lease.try_acquire()
    kv.lose_replies = False
    assert await lease.try_acquire()  # at once, not after the TTL
    assert lease.is_held
    holder = kv.holder(KEY)
    assert holder is not None
    assert holder.instance == "one"


class FlakyForwarded(MemoryForwarded):
    """A ``forwarded`` bucket whose first delete finds the bus away."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_deletes = 0

    async def delete(self, key: str) -> None:
        if self.failed_deletes == 0:
            self.failed_deletes += 1
            raise BusUnavailable("the NATS server is away")
        await super().delete(key)


async def _registry_at_v0() -> MemoryModelRegistry:
    registry = MemoryModelRegistry()
    pointer, blob = sign_model_version(
        CENTRAL, FLEET, 0, LAYOUT, np.zeros(LAYOUT.num_params, np.float32)
    )
    await registry.put_blob(0, blob)
    await registry.put_current(0, pointer)
    return registry


def _one_update() -> Accumulator:
    acc = Accumulator(LAYOUT.num_params)
    acc.fold_update(
        bytes(16),
        np.ones(LAYOUT.num_params, np.float32),
        n_samples=2,
        tau=0,
        discount=1.0,
        base_version=0,
    )
    return acc


def _leased_regional(
    tmp_path: Path,
    broker: MemoryBroker,
    registry: MemoryModelRegistry,
    forwarded: MemoryForwarded,
    name: str,
    kv: MemoryKv | None = None,
    identity: SigningIdentity = REGIONAL,
) -> RegionalDaemon:
    """A regional of region "eu" with ``forwarded``; its lease in ``kv`` (its own by default)."""
    config = RegionalConfig(
        fleet=FLEET,
        region="eu",
        identity_key=tmp_path / "unused.key",
        state_dir=tmp_path / name,
        central_key=CENTRAL.verify_key.raw.hex(),
        flush=FlushPolicy(max_inputs=2, max_age_s=None),
        lease=LeaseSettings(enabled=True, ttl_s=TTL_S, instance=name),
        commit_window_s=0.001,
    )
    keys = TierKeys(
        identity,
        KeyRegistry.from_keys({"edge-0": EDGE.verify_key}, role="edge"),
        CENTRAL.verify_key,
    )
    daemon = RegionalDaemon(
        config, nats=MemoryBus(broker), registry_store=registry, keys=keys, store_in_thread=False
    )
    daemon.lease = Lease(
        MemoryKv(TTL_S) if kv is None else kv,
        NatsSubjects.lease_key("regional", "eu", None),
        ttl_s=TTL_S,
        instance=name,
    )
    daemon.forwarded = forwarded
    return daemon


async def test_a_taken_over_intent_stays_as_a_forwarded_record_past_its_grace(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # The lost instance had acknowledged every input of its partial but its
    # delete of the intent never reached the bus: a standby re-publishes it at
    # takeover and rewrites it as a forwarded record, which later takeovers note
    # but never publish, and which tells the instance that sealed the partial,
    # should it take the lease again, that its partial went upstream.
    broker = MemoryBroker("nats")
    registry = await _registry_at_v0()
    message, envelope = sign_partial(
        REGIONAL, FLEET, LAYOUT, _one_update(), seq=1, tier=Tier.REGIONAL
    )
    forwarded = MemoryForwarded()
    key = f"eu.{message.partial_id.hex()}"
    forwarded.values[key] = envelope
    daemon = _leased_regional(tmp_path, broker, registry, forwarded, "b")
    config = daemon.regional_config
    subjects = NatsSubjects(FLEET)
    async with (
        MemoryBus(broker).subscribe(subjects.to_central(), durable="probe") as central,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(daemon.serve)
        with trio.fail_after(60):
            got = await central.receive()
        assert got.payload == envelope  # re-published at takeover, same bytes
        with trio.fail_after(60):
            while not forwarded.values[key].startswith(FORWARDED_MAGIC):
                await trio.sleep(0.1)
        assert decode_forwarded(key, forwarded.values[key]) == (
            message.partial_id,
            list(message.inputs),
        )
        await trio.sleep(2 * (3 * config.nats.ack_wait_s + TTL_S))
        assert forwarded.values[key].startswith(FORWARDED_MAGIC)
        nursery.cancel_scope.cancel()


async def test_an_own_intent_is_deleted_once_upstream_even_when_the_bus_was_away(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # An intent left behind would be re-published at every later takeover, until
    # neither the UP stream nor the central remembers the partial: a delete that
    # finds the bus away is retried.
    broker = MemoryBroker("nats")
    registry = await _registry_at_v0()
    forwarded = FlakyForwarded()
    daemon = _leased_regional(tmp_path, broker, registry, forwarded, "a")
    subjects = NatsSubjects(FLEET)
    async with (
        MemoryBus(broker).subscribe(subjects.to_central(), durable="probe") as central,
        trio.open_nursery() as nursery,
    ):
        _, key = await _one_partial_through(nursery, daemon, broker, central)
        assert key in forwarded.written  # written before the publish
        with trio.fail_after(60):
            while key in forwarded.values:
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert forwarded.failed_deletes == 1  # the first delete found the bus away: retried


async def test_an_intent_an_earlier_takeover_re_published_is_not_published_again(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    broker = MemoryBroker("nats")
    registry = await _registry_at_v0()
    edge_message, edge_envelope = sign_partial(EDGE, FLEET, LAYOUT, _one_update(), seq=7)
    forwarded = MemoryForwarded()
    key = "eu." + "ab" * 16
    forwarded.values[key] = encode_forwarded(bytes.fromhex("ab" * 16), [edge_message.partial_id])
    daemon = _leased_regional(tmp_path, broker, registry, forwarded, "c")
    subjects = NatsSubjects(FLEET)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        with trio.fail_after(60):
            await daemon.ready.wait()  # the takeover (and its re-publishing) is done
        forwarding = daemon._forwarding
        assert forwarding is not None
        assert forwarding.republished == 0
        # A redelivery of the edge partial it names is a duplicate, never folded again.
        await MemoryBus(broker).publish(subjects.to_region("eu"), edge_envelope)
        with trio.fail_after(60):
            while daemon.counts[("duplicate", "")] == 0:
                await trio.sleep(0.1)
        assert daemon.counts[("accepted", "")] == 0
        nursery.cancel_scope.cancel()


async def _serve_until_lost(nursery: trio.Nursery, daemon: TierDaemon) -> trio.CancelScope:
    """Serve ``daemon`` until it is active; cancelling the scope is its machine stopping."""
    scope = trio.CancelScope()

    async def serve(*, task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await daemon.serve(task_status=task_status)

    await nursery.start(serve)
    with trio.fail_after(60):
        await daemon.ready.wait()
    return scope


class StalledForwarded(MemoryForwarded):
    """A ``forwarded`` bucket whose puts wait while ``stalled`` (the bus away, the lease going)."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = True
        self.waiting = trio.Event()
        self._resume = trio.Event()

    async def put(self, key: str, value: bytes) -> int:
        while self.stalled:
            self.waiting.set()
            await self._resume.wait()
        return await super().put(key, value)

    def resume(self) -> None:
        self.stalled = False
        self._resume.set()


def _edge_partial(index: int) -> tuple[bytes, bytes]:
    """An edge partial holding one device update whose id is ``index`` repeated."""
    acc = Accumulator(LAYOUT.num_params)
    acc.fold_update(
        bytes([index]) * 16,
        np.full(LAYOUT.num_params, index, np.float32),
        n_samples=2,
        tau=0,
        discount=1.0,
        base_version=0,
    )
    _, envelope = sign_partial(EDGE, FLEET, LAYOUT, acc, seq=index)
    return bytes([index]) * 16, envelope


async def test_a_regional_back_from_a_lost_lease_forgets_what_no_intent_made_known(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Regional "a" seals a partial of edge partials 1 and 2 and folds 3, then
    # dies before the partial's intent is written. "b" takes the lease, is
    # redelivered all three (never acknowledged), counts them and stops. When
    # "a" takes the lease back on its own store, its sealed partial and its open
    # buffer must not go upstream: either copy could reach the central second
    # and be quarantined whole with the honest inputs beside it.
    broker = MemoryBroker("nats")
    registry = await _registry_at_v0()
    kv, forwarded = MemoryKv(TTL_S), StalledForwarded()
    subjects = NatsSubjects(FLEET)
    edge_bus = MemoryBus(broker)
    partials = [_edge_partial(i) for i in (1, 2, 3, 4)]
    counted: Counter[bytes] = Counter()
    async with MemoryBus(broker).subscribe(subjects.to_central(), durable="central") as central:

        async def take_upstream(until: bytes) -> None:
            while True:
                got = await central.receive()
                await got.ack()
                if got.payload == until:
                    return
                message = parse_envelope(got.payload).message
                assert isinstance(message, PartialAggregate)
                counted.update(message.leaves)

        async with trio.open_nursery() as nursery:
            first = _leased_regional(tmp_path, broker, registry, forwarded, "a", kv)
            first_scope = await _serve_until_lost(nursery, first)
            for _, envelope in partials[:3]:
                await edge_bus.publish(subjects.to_region("eu"), envelope)
            with trio.fail_after(60):
                await forwarded.waiting.wait()  # sealed; its intent not written
                while first.counts[("accepted", "")] < 3:
                    await trio.sleep(0.1)
            first_scope.cancel()  # its machine stops; its disk stays
        forwarded.resume()
        assert forwarded.values == {}

        # Another machine, another key: its partials have other ids than "a"'s.
        second = _leased_regional(tmp_path, broker, registry, forwarded, "b", kv, OTHER_REGIONAL)
        async with trio.open_nursery() as nursery:
            await nursery.start(second.serve)
            with trio.fail_after(60):
                await second.ready.wait()
                while second.counts[("accepted", "")] < 3:
                    await trio.sleep(0.1)
            second.request_shutdown()  # cuts what it holds, sends it, gives the lease back
        await edge_bus.publish(subjects.to_central(), b"b done")
        with trio.fail_after(60):
            await take_upstream(b"b done")
        assert counted == Counter(leaf for leaf, _ in partials[:3])

        again = _leased_regional(tmp_path, broker, registry, forwarded, "a", kv)
        async with trio.open_nursery() as nursery:
            await nursery.start(again.serve)
            with trio.fail_after(60):
                await again.ready.wait()
            assert again.forgotten_at_takeover == 2  # the sealed partial and the open input
            await edge_bus.publish(subjects.to_region("eu"), partials[3][1])
            with trio.fail_after(60):
                while again.counts[("accepted", "")] < 1:
                    await trio.sleep(0.1)
            again.request_shutdown()
        await edge_bus.publish(subjects.to_central(), b"a done")
        with trio.fail_after(60):
            await take_upstream(b"a done")
    assert counted == Counter(leaf for leaf, _ in partials)  # each once


async def test_an_edge_pair_counts_each_update_once_across_a_lost_lease(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Edge "a" of a site folds updates 0 and 1 and seals them, then dies before
    # the partial's intent is written: their receipts were never sent (a leased
    # edge answers a device once upstream has its update). The broker gives the
    # updates to "b", which counts them; when "a" takes the lease back it must
    # not send its sealed partial too.
    site = edge_tests.Site(
        tmp_path,
        edge_tests.make_config(
            tmp_path,
            flush=FlushPolicy(max_inputs=2, max_age_s=None),
            lease=LeaseSettings(enabled=True, ttl_s=TTL_S),
        ),
    )
    await site.publish_model(0)
    kv, forwarded = MemoryKv(TTL_S), StalledForwarded()
    updates = [edge_tests.DEVICES[i].update(edge_tests.delta(i), n_samples=2) for i in range(4)]
    phone = edge_tests.Phone(site, edge_tests.DEVICES[0])  # sends on any device's topic

    def edge(name: str, identity: SigningIdentity) -> EdgeDaemon:
        config = replace(
            site.config,
            state_dir=tmp_path / name,
            lease=LeaseSettings(enabled=True, ttl_s=TTL_S, instance=name),
        )
        keys = edge_tests.edge_keys()
        daemon = EdgeDaemon(
            config,
            mqtt=MemoryBus(site.mqtt),
            nats=MemoryBus(site.nats),
            registry_store=site.registry,
            keys=TierKeys(identity, keys.senders, keys.central),
            store_in_thread=False,
        )
        daemon.lease = Lease(kv, "edge.eu.depot-1", ttl_s=TTL_S, instance=name)
        daemon.forwarded = forwarded
        return daemon

    async def receipt_status(receipts: Subscription) -> ReceiptStatus:
        delivery = await receipts.receive()
        await delivery.ack()
        signers = {e.key_id: e.verify_key for e in (edge_tests.EDGE, OTHER_REGIONAL)}
        receipt = open_envelope(delivery.payload, signers).message
        assert isinstance(receipt, Receipt)
        return receipt.status

    counted: Counter[bytes] = Counter()
    subjects = NatsSubjects(edge_tests.FLEET)
    async with (
        MemoryBus(site.nats).subscribe(subjects.to_region("eu"), durable="regional") as up,
        MemoryBus(site.mqtt).subscribe(f"{edge_tests.TOPICS.prefix}/receipt/+") as receipts,
    ):

        async def take_upstream(until: bytes) -> None:
            while (got := await up.receive()).payload != until:
                await got.ack()
                message = parse_envelope(got.payload).message
                assert isinstance(message, PartialAggregate)
                counted.update(message.leaves)
            await got.ack()

        async with trio.open_nursery() as nursery:
            first = edge("a", edge_tests.EDGE)
            scope = await _serve_until_lost(nursery, first)
            for message, data in updates[:2]:
                await phone.send(data, message.sender)
            with trio.fail_after(60):
                await forwarded.waiting.wait()  # sealed; its intent not written
            assert first.receipts_sent == 0  # held until upstream has them
            scope.cancel()  # its machine stops; its disk stays
        forwarded.resume()

        async with trio.open_nursery() as nursery:
            second = edge("b", OTHER_REGIONAL)  # another machine, another key
            await nursery.start(second.serve)
            with trio.fail_after(60):
                for _ in range(2):
                    assert await receipt_status(receipts) is ReceiptStatus.ACCEPTED
            second.request_shutdown()
        await MemoryBus(site.nats).publish(subjects.to_region("eu"), b"b done")
        with trio.fail_after(60):
            await take_upstream(b"b done")

        async with trio.open_nursery() as nursery:
            again = edge("a", edge_tests.EDGE)
            await nursery.start(again.serve)
            with trio.fail_after(60):
                await again.ready.wait()
            assert again.forgotten_at_takeover == 1  # the sealed partial
            for message, data in updates[2:]:
                await phone.send(data, message.sender)
            with trio.fail_after(60):
                for _ in range(2):
                    assert await receipt_status(receipts) is ReceiptStatus.ACCEPTED
            again.request_shutdown()
        await MemoryBus(site.nats).publish(subjects.to_region("eu"), b"a done")
        with trio.fail_after(60):
            await take_upstream(b"a done")
    assert counted == Counter(message.update_id for message, _ in updates)  # each once


async def test_what_a_regional_answered_before_lease_was_enabled_is_sent_not_forgotten(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # Without [lease] an input is acknowledged at its commit: turning [lease] on
    # must not make the first takeover forget what the store holds.
    broker = MemoryBroker("nats")
    registry = await _registry_at_v0()
    leased = _leased_regional(tmp_path, broker, registry, MemoryForwarded(), "a")
    plain = RegionalDaemon(
        replace(leased.regional_config, lease=LeaseSettings()),
        nats=MemoryBus(broker),
        registry_store=registry,
        keys=leased.keys,
        store_in_thread=False,
    )
    subjects = NatsSubjects(FLEET)
    leaf, envelope = _edge_partial(1)
    async with MemoryBus(broker).subscribe(subjects.to_central(), durable="probe") as central:
        async with trio.open_nursery() as nursery:
            await nursery.start(plain.serve)
            await MemoryBus(broker).publish(subjects.to_region("eu"), envelope)
            partial = parse_envelope(envelope).message
            assert isinstance(partial, PartialAggregate)
            with trio.fail_after(60):
                while plain.store.input_state(partial.sender, partial.partial_id) is None or (
                    plain.store.pending_ticket(partial.sender, partial.partial_id) is not None
                ):
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()  # a crash: one input open, committed
        async with trio.open_nursery() as nursery:
            await nursery.start(leased.serve)
            with trio.fail_after(60):
                got = await central.receive()
            nursery.cancel_scope.cancel()
    message = parse_envelope(got.payload).message
    assert isinstance(message, PartialAggregate)
    assert list(message.leaves) == [leaf]
    assert leased.forgotten_at_takeover == 0


async def _one_partial_through(
    nursery: trio.Nursery, daemon: RegionalDaemon, broker: MemoryBroker, central: Subscription
) -> tuple[PartialAggregate, str]:
    """Serve ``daemon``, send it two edge partials, take its one partial; and its intent's key."""
    await nursery.start(daemon.serve)
    with trio.fail_after(60):
        await daemon.ready.wait()
    for index in (1, 2):  # max_inputs = 2: one partial
        await MemoryBus(broker).publish(
            NatsSubjects(FLEET).to_region("eu"), _edge_partial(index)[1]
        )
    with trio.fail_after(60):
        got = await central.receive()
    await got.ack()
    message = parse_envelope(got.payload).message
    assert isinstance(message, PartialAggregate)
    return message, f"eu.{message.partial_id.hex()}"


class _NatsProbeBus(edge_tests.ProbeBus):
    flavor = "nats"  # type: ignore[assignment]  # the same wrapper, on the NATS side

    @property
    def max_single_message_bytes(self) -> int | None:
        return None


async def test_an_intent_whose_inputs_ack_was_not_confirmed_stays_as_a_forwarded_record(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    # A lost acknowledgement means JetStream may redeliver the input, maybe to
    # another instance after a takeover: the intent must then say "upstream has
    # it" there, so it is kept as a forwarded record instead of deleted.
    broker = MemoryBroker("nats")
    registry = await _registry_at_v0()
    forwarded = MemoryForwarded()
    daemon = _leased_regional(tmp_path, broker, registry, forwarded, "a")
    failed: list[Delivery] = []

    def on_ack(delivery: Delivery) -> bool:
        if not failed:
            failed.append(delivery)
            raise BusUnavailable("the ack found the server away")
        return True

    daemon.nats = _NatsProbeBus(MemoryBus(broker), on_ack)
    subjects = NatsSubjects(FLEET)
    async with (
        MemoryBus(broker).subscribe(subjects.to_central(), durable="probe") as central,
        trio.open_nursery() as nursery,
    ):
        message, key = await _one_partial_through(nursery, daemon, broker, central)
        with trio.fail_after(60):
            while not forwarded.values.get(key, b"").startswith(FORWARDED_MAGIC):
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert len(failed) == 1
    assert decode_forwarded(key, forwarded.values[key]) == (
        message.partial_id,
        list(message.inputs),
    )
