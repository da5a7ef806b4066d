"""Two regionals, then two centrals, with leases: the active one's machine is lost, nothing is.

Real nats-server; the regionals are child processes (so the loss is a process
death, not a cancellation that gives deliveries back politely). The test is
the edges (it publishes signed edge partials) and the central's intake (a
durable consumer of the UP stream that dedupes regional partials by id, as
the central's store does, and counts every device update inside). In the
second test the centrals are the child processes and the test is the
regionals; the exactly-once checker reads the standby's lineage.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import trio

from fedtier.protocol.bus.nats import NatsConfig, open_nats_bus
from fedtier.protocol.envelope import parse_envelope
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout, layout_of
from fedtier.protocol.limits import DEFAULT_LIMITS
from fedtier.protocol.messages import PartialAggregate, Tier
from fedtier.protocol.names import NatsSubjects
from fedtier.simulations.checker import DeviceHistory, check, load_lineage_counts
from fedtier.simulations.processes import open_process_group
from fedtier.simulations.testing import (
    NatsServerProcess,
    RecordingMetrics,
    sign_model_version,
    sign_partial,
)
from fedtier.tiers._version_record import VersionRecord, decode_version_record
from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.config import NatsSettings, RetrySettings, TierConfig
from fedtier.tiers.daemon import _nats_config, open_registry
from fedtier.tiers.faults import CRASH_ENV, CRASH_EXIT_STATUS
from fedtier.tiers.store import read_stored_versions

FLEET, REGION = "hafleet", "eu"
LAYOUT = layout_of([("w", (3, 2)), ("b", (2,))])
BIG_LAYOUT = layout_of([("w", (160_000,))])
CENTRAL_SEED = b"\x01" * 32
CENTRAL = SigningIdentity.from_seed(CENTRAL_SEED)
REGIONAL_SEEDS = {"ra": b"\x03" * 32, "rb": b"\x04" * 32}
EDGE_SEEDS = [bytes([40 + i]) * 32 for i in range(4)]
EDGES = [SigningIdentity.from_seed(seed) for seed in EDGE_SEEDS]
SUBJECTS = NatsSubjects(FLEET)

# One regional daemon in its own process: the config comes as JSON on argv.
_DRIVER = """
import json, logging, signal, sys
from pathlib import Path
import trio
from fedtier.protocol.bus.nats import open_nats_bus, open_nats_loop
from fedtier.protocol.identity import SigningIdentity
from fedtier.tiers import faults
from fedtier.tiers.config import LeaseSettings, NatsSettings, RegionalConfig, StatusSettings
from fedtier.tiers.daemon import _attach_lease, _nats_config, open_registry
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.regional import RegionalDaemon
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.simulations.testing import RecordingMetrics

args = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
faults.configure_from_environment()
identity = SigningIdentity.from_seed(bytes.fromhex(args["seed"]))
config = RegionalConfig(
    fleet=args["fleet"], region=args["region"], identity_key=Path(args["state"]) / "unused.key",
    state_dir=Path(args["state"]), central_key=args["central"],
    nats=NatsSettings(servers=(args["url"],), monitoring_url=args["monitoring"],
                      ack_wait_s=2.0, max_hold_s=60.0, manage_streams=False),
    flush=FlushPolicy(max_inputs=3, max_age_s=1.0),
    lease=LeaseSettings(enabled=True, ttl_s=2.0, instance=args["instance"]),
    status=StatusSettings(enabled=False), commit_window_s=0.001,
)
keys = TierKeys(identity, KeyRegistry.from_keys(
    {f"edge-{i}": SigningIdentity.from_seed(bytes.fromhex(s)).verify_key
     for i, s in enumerate(args["edges"])}, role="edge"),
    SigningIdentity.from_seed(bytes.fromhex(args["central_seed"])).verify_key)

async def main():
    metrics = RecordingMetrics()
    async with open_nats_loop(), open_nats_bus(
        _nats_config("regional", config, identity.key_id)
    ) as nats:
        registry = await open_registry(nats, config, metrics)
        daemon = RegionalDaemon(config, nats=nats, registry_store=registry, keys=keys,
                                metrics=metrics)
        await _attach_lease(daemon, nats, config, metrics)
        async with trio.open_nursery() as nursery:
            async def stop_on_term():
                with trio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        daemon.request_shutdown()
            nursery.start_soon(stop_on_term)
            await daemon.serve()
            nursery.cancel_scope.cancel()

trio.run(main)
"""


def _edge_partial(
    edge: int, seq: int, layout: ModelLayout = LAYOUT
) -> tuple[PartialAggregate, bytes]:
    acc = Accumulator(layout.num_params, hist_buckets=32)
    for i in range(2):
        seed = edge * 10_000 + seq * 10 + i
        acc.fold_update(
            seed.to_bytes(16, "big"),
            np.random.default_rng(seed).standard_normal(layout.num_params).astype(np.float32),
            n_samples=3,
            tau=0,
            discount=1.0,
            base_version=0,
        )
    return sign_partial(EDGES[edge], FLEET, layout, acc, seq=seq)


def _test_config(server: NatsServerProcess, fleet: str = FLEET) -> TierConfig:
    """What the test's own bus and registry need of a config (it creates the streams)."""
    settings = NatsSettings(
        servers=(server.url,), monitoring_url=server.monitoring_url, manage_streams=True
    )
    return cast(
        TierConfig,
        SimpleNamespace(
            fleet=fleet,
            nats=settings,
            retry=RetrySettings(),
            limits=DEFAULT_LIMITS,
            # Read only where it exists (another part of the daemon shell may add it).
            **({"retention": _retention()} if _retention is not None else {}),
        ),
    )


def _retention_factory() -> Any:
    import fedtier.tiers.config as tier_config

    return getattr(tier_config, "RetentionSettings", None)


_retention = _retention_factory()


async def test_standby_regional_takes_over_a_lost_machine_and_counts_each_update_once(
    tmp_path: Path, nats_server: NatsServerProcess, nats_loop: None
) -> None:
    await _regional_takeover(tmp_path, nats_server, LAYOUT)


async def test_a_standby_regional_takes_over_intents_written_as_parts(
    tmp_path: Path, nats_loop: None
) -> None:
    # Partials of 640 KB on a server whose max_payload is 256 KiB: every partial,
    # in and out, goes as stream parts, and every intent as KV parts.
    server = await trio.to_thread.run_sync(
        lambda: NatsServerProcess.start(tmp_path / "nats", extra_config="max_payload: 262144")
    )
    try:
        await _regional_takeover(tmp_path, server, BIG_LAYOUT)
    finally:
        await trio.to_thread.run_sync(server.stop)
    log = (tmp_path / "logs" / "ra.log").read_text()
    assert re.search(r"intent \S+ written as [3-9] parts", log), log[-2000:]


async def _regional_takeover(
    tmp_path: Path, nats_server: NatsServerProcess, layout: ModelLayout
) -> None:
    """The active regional dies after publishing a partial; its standby counts each update once."""
    config = _test_config(nats_server)
    async with open_nats_bus(cast(NatsConfig, _nats_config("central", config, "c" * 16))) as bus:
        registry = await open_registry(bus, config, RecordingMetrics())
        pointer, blob = sign_model_version(
            CENTRAL, FLEET, 0, layout, np.zeros(layout.num_params, np.float32)
        )
        await registry.put_blob(0, blob)
        await registry.replace_current(pointer, 0)

        def argv(name: str) -> list[str]:
            args = {
                "fleet": FLEET,
                "region": REGION,
                "state": str(tmp_path / name),
                "seed": REGIONAL_SEEDS[name].hex(),
                "central": CENTRAL.verify_key.raw.hex(),
                "central_seed": CENTRAL_SEED.hex(),
                "edges": [seed.hex() for seed in EDGE_SEEDS],
                "url": nats_server.url,
                "monitoring": nats_server.monitoring_url,
                "instance": name,
            }
            return [sys.executable, "-c", _DRIVER, json.dumps(args)]

        published: set[bytes] = set()
        counted: Counter[bytes] = Counter()
        seen_partials: set[bytes] = set()
        all_counted = trio.Event()
        sentinel = b"sentinel"
        drained = trio.Event()

        async def central_intake() -> None:
            async with bus.subscribe(
                SUBJECTS.to_central(), durable=SUBJECTS.central_consumer(), capacity=64
            ) as sub:
                async for delivery in sub:
                    await delivery.ack()
                    if delivery.payload == sentinel:
                        drained.set()
                        return
                    message = parse_envelope(delivery.payload).message
                    assert isinstance(message, PartialAggregate)
                    if message.partial_id in seen_partials:
                        continue  # the central's store dedupes a partial by id
                    seen_partials.add(message.partial_id)
                    counted.update(message.leaves)
                    if published and set(counted) >= published:
                        all_counted.set()

        async def publish_edges(first_seq: int) -> None:
            for edge in range(len(EDGES)):
                for seq in (first_seq, first_seq + 1):
                    message, envelope = _edge_partial(edge, seq, layout)
                    published.update(message.leaves)
                    await bus.publish(
                        SUBJECTS.to_region(REGION), envelope, msg_id=message.partial_id.hex()
                    )

        with trio.fail_after(90):
            async with (
                trio.open_nursery() as nursery,
                open_process_group(tmp_path / "logs", stop_grace_s=20) as group,
            ):
                nursery.start_soon(central_intake)
                # The active one dies right after its second partial is durable
                # upstream: its intent is written, the inputs inside unacknowledged.
                active = await group.start(
                    "ra",
                    argv("ra"),
                    ready_pattern="serving",
                    env={CRASH_ENV: "regional.after_publish:1:1"},
                )
                await group.wait_ready([active], timeout_s=30)
                standby = await group.start("rb", argv("rb"), ready_pattern="standby")
                await group.wait_ready([standby], timeout_s=30)
                await publish_edges(1)
                await active.exited.wait()
                assert active.returncode == CRASH_EXIT_STATUS
                shutil.rmtree(tmp_path / "ra")  # its machine, disk included, is gone
                await publish_edges(3)
                await all_counted.wait()
                await group.stop([standby], grace_s=20)
                assert standby.returncode == 0
                await bus.publish(SUBJECTS.to_central(), sentinel, msg_id="sentinel")
                await drained.wait()
                nursery.cancel_scope.cancel()
    assert set(counted) == published
    assert [leaf for leaf, n in counted.items() if n != 1] == []
    # The window this test aims at was hit: a partial the dead one had published.
    assert "took over partial" in (tmp_path / "logs" / "rb.log").read_text()


# One central daemon in its own process: the config comes as JSON on argv.
_CENTRAL_DRIVER = """
import json, logging, signal, sys
from pathlib import Path
import trio
from fedtier.protocol.bus.nats import open_nats_bus, open_nats_loop
from fedtier.protocol.identity import SigningIdentity
from fedtier.tiers import faults
from fedtier.tiers.central import CentralDaemon
from fedtier.tiers.config import CentralConfig, LeaseSettings, NatsSettings, StatusSettings
from fedtier.tiers.daemon import _attach_lease, _nats_config, open_registry
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.simulations.testing import RecordingMetrics

args = json.loads(sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
faults.configure_from_environment()
# The test counts the duplicates it waits for on stdout.
duplicates = logging.StreamHandler(sys.stdout)
duplicates.addFilter(lambda record: "is a duplicate" in record.getMessage())
logging.getLogger().addHandler(duplicates)
identity = SigningIdentity.from_seed(bytes.fromhex(args["seed"]))
config = CentralConfig(
    fleet=args["fleet"], identity_key=Path(args["state"]) / "unused.key",
    state_dir=Path(args["state"]), central_key=identity.verify_key.raw.hex(),
    initial_model=Path(args["model"]), optimizer_name="fedadam", optimizer_params={"lr": 0.1},
    nats=NatsSettings(servers=(args["url"],), monitoring_url=args["monitoring"],
                      ack_wait_s=2.0, max_hold_s=60.0, manage_streams=False),
    flush=FlushPolicy(max_inputs=2, max_age_s=5.0),
    lease=LeaseSettings(enabled=True, ttl_s=2.0, instance=args["instance"]),
    status=StatusSettings(enabled=False), commit_window_s=0.001,
)
keys = TierKeys(identity, KeyRegistry.from_keys(
    {f"regional-{i}": SigningIdentity.from_seed(bytes.fromhex(s)).verify_key
     for i, s in enumerate(args["regionals"])}, role="regional"), identity.verify_key)

async def main():
    metrics = RecordingMetrics()
    async with open_nats_loop(), open_nats_bus(
        _nats_config("central", config, identity.key_id)
    ) as nats:
        registry = await open_registry(nats, config, metrics)
        daemon = CentralDaemon(config, nats=nats, registry=registry, keys=keys, metrics=metrics)
        await _attach_lease(daemon, nats, config, metrics)
        async with trio.open_nursery() as nursery:
            async def stop_on_term():
                with trio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        daemon.request_shutdown()
            nursery.start_soon(stop_on_term)
            await daemon.serve()
            nursery.cancel_scope.cancel()

trio.run(main)
"""


# The central test's own fleet: the server outlives a test, and the regional test's
# registry holds a version published without a record.
CENTRAL_FLEET = "hacentral"
CENTRAL_SUBJECTS = NatsSubjects(CENTRAL_FLEET)


def _regional_partial(index: int) -> tuple[PartialAggregate, bytes]:
    acc = Accumulator(LAYOUT.num_params, hist_buckets=32)
    for i in range(2):
        seed = 50_000 + index * 10 + i
        acc.fold_update(
            seed.to_bytes(16, "big"),
            np.random.default_rng(seed).standard_normal(LAYOUT.num_params).astype(np.float32),
            n_samples=3,
            tau=0,
            discount=1.0,
            base_version=0,
        )
    regional = SigningIdentity.from_seed(REGIONAL_SEEDS["ra" if index % 2 else "rb"])
    return sign_partial(regional, CENTRAL_FLEET, LAYOUT, acc, seq=1 + index, tier=Tier.REGIONAL)


async def test_standby_central_continues_from_the_registry_when_the_active_machine_is_lost(
    tmp_path: Path, nats_server: NatsServerProcess, nats_loop: None
) -> None:
    config = _test_config(nats_server, CENTRAL_FLEET)
    model = tmp_path / "init.npz"
    np.savez(model, w=np.zeros((3, 2), np.float32), b=np.zeros(2, np.float32))
    partials = [_regional_partial(i) for i in range(6)]
    leaves = {leaf for message, _ in partials for leaf in message.leaves}

    def argv(name: str) -> list[str]:
        args = {
            "fleet": CENTRAL_FLEET,
            "state": str(tmp_path / name),
            "model": str(model),
            "seed": CENTRAL_SEED.hex(),
            "regionals": [REGIONAL_SEEDS["rb"].hex(), REGIONAL_SEEDS["ra"].hex()],
            "url": nats_server.url,
            "monitoring": nats_server.monitoring_url,
            "instance": name,
        }
        return [sys.executable, "-c", _CENTRAL_DRIVER, json.dumps(args)]

    async with open_nats_bus(cast(NatsConfig, _nats_config("central", config, "c" * 16))) as bus:
        registry = await open_registry(bus, config, RecordingMetrics())

        async def publish(indices: range) -> None:
            for i in indices:
                message, envelope = partials[i]
                await bus.publish(
                    CENTRAL_SUBJECTS.to_central(), envelope, msg_id=message.partial_id.hex()
                )

        def record_of(data: bytes | None) -> VersionRecord:
            assert data is not None
            return decode_version_record(
                data,
                {CENTRAL.key_id: CENTRAL.verify_key}.get,
                fleet=CENTRAL_FLEET,
                max_bytes=1 << 20,
                max_params=1 << 10,
            )

        with trio.fail_after(60):
            async with open_process_group(tmp_path / "logs", stop_grace_s=20) as group:
                # The active one dies right after v1 is published (pointer moved,
                # announced), before it acknowledges the two partials inside.
                active = await group.start(
                    "ca",
                    argv("ca"),
                    ready_pattern="serving",
                    env={CRASH_ENV: "central.after_publish:1:1"},
                )
                await group.wait_ready([active], timeout_s=30)
                duplicates = 0
                both_duplicates = trio.Event()

                def on_line(line: str) -> None:
                    nonlocal duplicates
                    duplicates += "is a duplicate" in line
                    if duplicates >= 2:
                        both_duplicates.set()

                standby = await group.start(
                    "cb", argv("cb"), ready_pattern="standby", on_stdout_line=on_line
                )
                await group.wait_ready([standby], timeout_s=30)
                await publish(range(2))
                await active.exited.wait()
                assert active.returncode == CRASH_EXIT_STATUS
                shutil.rmtree(tmp_path / "ca")  # its machine, disk included, is gone
                await publish(range(2, 6))
                counted: set[bytes] = set()
                async with registry.watch_pointers() as pointers:
                    async for pointer in pointers:
                        version = parse_envelope(pointer).message.version  # type: ignore[union-attr]
                        counted = {
                            leaf
                            for v in range(1, version + 1)
                            for leaf in record_of(await registry.record(v)).leaves
                        }
                        if counted >= leaves:
                            break
                # The two partials of v1 came back (never acknowledged) and were
                # answered as duplicates, not folded again.
                await both_duplicates.wait()
                await group.stop([standby], grace_s=20)
                assert standby.returncode == 0
        first_own = record_of(await registry.record(2))

    log = (tmp_path / "logs" / "cb.log").read_text()
    assert "took over from the registry at model v1" in log
    # Every device update once across the versions the standby holds (v1 from
    # the dead one's record, the rest its own), by the lab's checker.
    counts, versions = load_lineage_counts(tmp_path / "cb" / "state.sqlite")
    histories = {leaf.hex(): DeviceHistory(sent=True, accepted=True) for leaf in leaves}
    report = check(histories, counts, versions)
    assert not report.failed, report.to_json()
    assert report.counts["ok"] == len(leaves)
    # Versions are contiguous, and the standby's first version (v2) continued
    # FedAdam from v1's record: two steps, not a fresh optimizer's one.
    stored = [v.record.version for v in read_stored_versions(tmp_path / "cb" / "state.sqlite")]
    assert stored == list(range(len(stored)))
    assert len(stored) >= 4
    assert int(first_own.optimizer["steps"]) == 2
