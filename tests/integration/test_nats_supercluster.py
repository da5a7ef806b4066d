"""The supercluster of deploy/nats/supercluster/: a region's partials reach the core and back.

The shipped files run as nine nats-server processes (the core cluster and two
regions, joined by gateways; TLS and the deployed users), with a site's leaf
node (deploy/nats/leaf/site.conf) linked to region eu-west. Real daemons run in
this process on the daemons' NATS bus: the edge at the site through the leaf
node, the regional on its region's cluster, the central on the core; only the
devices' MQTT side is in memory. Then a core node is killed and the same path
goes on at R3.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio_asyncio

from fedtier.protocol.bus import MemoryBroker, MemoryBus
from fedtier.protocol.bus.nats import NatsBus, NatsConfig, open_nats_bus, open_nats_loop
from fedtier.protocol.envelope import open_envelope
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.messages import ModelAnnouncement, Receipt, ReceiptStatus
from fedtier.protocol.names import MqttTopics, NatsSubjects
from fedtier.simulations.testing import (
    EXAMPLE_FLEET,
    EXAMPLE_NKEYS,
    EXAMPLE_REGION,
    CertFiles,
    NatsServerProcess,
    NatsSuperclusterProcess,
    NatsTls,
    NkeyUser,
    SimDevice,
    TestPki,
    inbox_prefix,
)
from fedtier.simulations.testing._nats_supercluster import CORE_CLUSTER, SUPERCLUSTER_DEPLOY_DIR
from fedtier.tiers.central import CentralDaemon
from fedtier.tiers.config import (
    CentralConfig,
    EdgeConfig,
    RegionalConfig,
    TierConfig,
    TierKind,
    load_initial_model,
    load_nats_settings,
)
from fedtier.tiers.daemon import _nats_config
from fedtier.tiers.edge import EdgeDaemon
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.model_registry import NatsModelRegistry
from fedtier.tiers.regional import RegionalDaemon
from fedtier.tiers.registry import KeyRegistry, TierKeys

from .test_nats_cluster import route_cert

pytestmark = pytest.mark.brokers

# The deployed users allow exactly this fleet and region (deploy/nats/cluster/common.conf).
FLEET, REGION, SITE = EXAMPLE_FLEET, EXAMPLE_REGION, "plant-3"
REGION_CLUSTER = f"region-{REGION}"
MIRRORS_FILE = SUPERCLUSTER_DEPLOY_DIR / f"{REGION_CLUSTER}-mirrors.json"
DEADLINE_S = 60
CENTRAL = SigningIdentity.from_seed(b"\x01" * 32)
REGIONAL = SigningIdentity.from_seed(b"\x02" * 32)
EDGE = SigningIdentity.from_seed(b"\x03" * 32)
IDENTITIES: dict[TierKind, SigningIdentity] = {
    "central": CENTRAL,
    "regional": REGIONAL,
    "edge": EDGE,
}
NOW_MS = 1_764_288_000_000


def read_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def placements(supercluster: NatsSuperclusterProcess) -> dict[str, tuple[str, int]]:
    """Stream name -> (the cluster holding it, its replicas), as the running nodes report it."""
    found: dict[str, tuple[str, int]] = {}
    for node in supercluster.nodes:
        if not node.running:
            continue
        jsz = read_json(f"{node.monitoring_url}/jsz?streams=true&config=true")
        for account in jsz.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                where = (stream["cluster"]["name"], stream["config"]["num_replicas"])
                found.setdefault(stream["name"], where)
    return found


def connected_to(supercluster: NatsSuperclusterProcess, connection_name: str) -> str:
    """The cluster of the node a client named ``connection_name`` is connected to now."""
    for cluster, nodes in supercluster.clusters.items():
        for node in nodes:
            if not node.running:
                continue
            connz = read_json(f"{node.monitoring_url}/connz")
            if any(c.get("name") == connection_name for c in connz.get("connections") or []):
                return cluster
    raise AssertionError(f"no node holds a connection named {connection_name!r}")


async def create_mirrors(mesh: Mesh, path: Path) -> set[str]:
    """Create each stream of ``path`` as the central's user, as ``nats stream add --config`` does.

    Runs on asyncio (nats-py): the daemons' bus creates no mirrors.
    """
    import nats

    tls = ssl.create_default_context(cafile=str(mesh.pki.ca_file))
    tls.load_cert_chain(mesh.certs["central"].cert_file, mesh.certs["central"].key_file)
    nc = await nats.connect(
        servers=mesh.supercluster.urls(CORE_CLUSTER),
        tls=tls,
        nkeys_seed=str(mesh.users["central"].seed_file),
        inbox_prefix=inbox_prefix("central"),
    )
    created = set()
    try:
        for config in json.loads(path.read_text()):
            reply = await nc.request(
                f"$JS.API.STREAM.CREATE.{config['name']}", json.dumps(config).encode(), timeout=10
            )
            answer = json.loads(reply.data)
            assert "error" not in answer, answer
            created.add(str(answer["config"]["name"]))
    finally:
        await nc.close()
    return created


def write_model(path: Path) -> None:
    rng = np.random.default_rng(7)
    np.savez(path, w=rng.standard_normal((4, 3)).astype(np.float32), b=np.zeros(4, np.float32))


class Mesh:
    """What the deployment gives the daemons: the PKI, the users, the servers."""

    def __init__(
        self,
        tmp_path: Path,
        pki: TestPki,
        users: Mapping[str, NkeyUser],
        certs: Mapping[str, CertFiles],
        supercluster: NatsSuperclusterProcess,
        leaf: NatsServerProcess,
    ) -> None:
        self.tmp_path = tmp_path
        self.pki = pki
        self.users = users
        self.certs = certs
        self.supercluster = supercluster
        self.leaf = leaf

    def nats_table(self, kind: TierKind) -> str:
        """The ``[nats]`` table of docs/operations.md, Supercluster, for a daemon of ``kind``."""
        sc = self.supercluster
        core_monitoring = sc.monitoring_urls(CORE_CLUSTER)
        if kind == "central":
            servers, monitoring = sc.urls(CORE_CLUSTER), core_monitoring
        elif kind == "regional":
            # Its region's nodes; the fsync check reads them and the core's,
            # which store what it publishes.
            servers = sc.urls(REGION_CLUSTER)
            monitoring = [*sc.monitoring_urls(REGION_CLUSTER), *core_monitoring]
        else:  # an edge at the site: the leaf node, the supercluster's domain
            servers, monitoring = [self.leaf.url], [self.leaf.monitoring_url, *core_monitoring]
        lines = [
            "[nats]",
            f"servers = {json.dumps(servers)}",
            f"monitoring_urls = {json.dumps(monitoring)}",
            "replicas = 3",
            f'inbox_prefix = "{inbox_prefix(kind)}"',
            f'tls_ca_file = "{self.pki.ca_file}"',
            f'tls_cert_file = "{self.certs[kind].cert_file}"',
            f'tls_key_file = "{self.certs[kind].key_file}"',
        ]
        if kind == "edge":
            lines.append('jetstream_domain = "core"')
        else:  # the edges' leaf node has no users: the site's user on the region bounds them
            lines.append(f'nkeys_seed_file = "{self.users[kind].seed_file}"')
        return "\n".join(lines) + "\n"

    def daemon_config(self, kind: TierKind) -> TierConfig:
        path = self.tmp_path / f"{kind}.toml"
        path.write_text(f'fleet = "{FLEET}"\n' + self.nats_table(kind))
        _, settings = load_nats_settings(path)
        common: dict[str, Any] = {
            "fleet": FLEET,
            "identity_key": self.tmp_path / "unused.pem",
            "state_dir": self.tmp_path / kind,
            "central_key": CENTRAL.verify_key.raw.hex(),
            "commit_window_s": 0.001,
            "nats": settings,
        }
        if kind == "central":
            model = self.tmp_path / "init.npz"
            write_model(model)
            flush = FlushPolicy(max_inputs=1, max_age_s=None)
            return CentralConfig(**common, initial_model=model, flush=flush)
        if kind == "regional":
            flush = FlushPolicy(max_inputs=1, max_age_s=None)
            return RegionalConfig(**common, region=REGION, flush=flush)
        flush = FlushPolicy(max_inputs=2, max_age_s=None)
        return EdgeConfig(**common, site=SITE, region=REGION, flush=flush)


@asynccontextmanager
async def open_bus(config: TierConfig, kind: TierKind, key_id: str) -> AsyncIterator[NatsBus]:
    nats_config: NatsConfig = _nats_config(kind, config, key_id)
    async with open_nats_bus(nats_config) as bus:
        yield bus


async def open_registry(bus: NatsBus, config: TierConfig) -> NatsModelRegistry:
    subjects = NatsSubjects(FLEET)
    kv = await bus.kv_bucket(subjects.model_bucket())
    blobs = await bus.object_store(subjects.blob_store())
    return NatsModelRegistry(kv, blobs, max_blob_bytes=config.limits.max_envelope_bytes)


async def test_a_regions_partials_reach_the_core_and_the_model_comes_back_also_without_a_core_node(
    tmp_path: Path,
) -> None:
    pki = TestPki.create(tmp_path / "pki")
    users = {role: pki.issue_nkey_user(f"nats-{role}") for role in [*EXAMPLE_NKEYS, "site"]}
    certs = {role: pki.issue_client(f"nats-{role}") for role in ("central", "regional", "edge")}
    certs["site"] = pki.issue_client("nats-site")
    server = pki.issue_server("nats")
    server_tls = NatsTls(pki.ca_file, server.cert_file, server.key_file)
    supercluster = await trio.to_thread.run_sync(
        lambda: NatsSuperclusterProcess.start_deploy(
            tmp_path / "supercluster",
            client_tls=server_tls,
            route_tls=route_cert(pki, tmp_path),
            public_keys={role: user.public_key for role, user in users.items()},
        )
    )
    try:
        leaf = await trio.to_thread.run_sync(
            lambda: supercluster.start_deploy_leaf(
                tmp_path / "leaf",
                cluster=REGION_CLUSTER,
                server_tls=server_tls,
                client_cert=NatsTls(pki.ca_file, certs["site"].cert_file, certs["site"].key_file),
                seed=users["site"].seed_file.read_text().strip(),
            )
        )
        try:
            mesh = Mesh(tmp_path, pki, users, certs, supercluster, leaf)
            with trio.fail_after(DEADLINE_S):
                await _across_the_supercluster(mesh)
        finally:
            await trio.to_thread.run_sync(leaf.stop)
    finally:
        await trio.to_thread.run_sync(supercluster.stop)


async def _across_the_supercluster(mesh: Mesh) -> None:
    sc = mesh.supercluster
    configs = {kind: mesh.daemon_config(kind) for kind in ("central", "regional", "edge")}
    assert isinstance(configs["central"], CentralConfig)
    assert isinstance(configs["regional"], RegionalConfig)
    assert isinstance(configs["edge"], EdgeConfig)
    layout, _ = load_initial_model(configs["central"].initial_model)
    devices = [
        SimDevice(SigningIdentity.from_seed(bytes([20 + j]) * 32), FLEET, layout) for j in range(2)
    ]
    mqtt = MemoryBroker("mqtt")
    async with open_nats_loop(), AsyncExitStack() as stack:
        buses = {
            "central": await stack.enter_async_context(
                open_bus(configs["central"], "central", CENTRAL.key_id)
            )
        }
        # The central creates the registry in the core; the region's mirrors of
        # it are made once by hand from the shipped file (docs/operations.md).
        central_registry = await open_registry(buses["central"], configs["central"])
        created = await trio_asyncio.aio_as_trio(create_mirrors)(mesh, MIRRORS_FILE)
        assert created == {
            f"KV_{NatsSubjects(FLEET).model_bucket()}_{REGION}",
            f"OBJ_{NatsSubjects(FLEET).blob_store()}_{REGION}",
        }
        followers: tuple[TierKind, ...] = ("regional", "edge")
        for kind in followers:
            buses[kind] = await stack.enter_async_context(
                open_bus(configs[kind], kind, IDENTITIES[kind].key_id)
            )
        central = CentralDaemon(
            configs["central"],
            nats=buses["central"],
            registry=central_registry,
            keys=TierKeys(
                CENTRAL,
                KeyRegistry.from_keys({REGION: REGIONAL.verify_key}, role="regional"),
                CENTRAL.verify_key,
            ),
            clock_ms=lambda: NOW_MS,
            store_in_thread=False,
        )
        regional = RegionalDaemon(
            configs["regional"],
            nats=buses["regional"],
            registry_store=await open_registry(buses["regional"], configs["regional"]),
            keys=TierKeys(
                REGIONAL,
                KeyRegistry.from_keys({SITE: EDGE.verify_key}, role="edge"),
                CENTRAL.verify_key,
            ),
            clock_ms=lambda: NOW_MS,
            store_in_thread=False,
        )
        edge = EdgeDaemon(
            configs["edge"],
            mqtt=MemoryBus(mqtt),
            nats=buses["edge"],
            registry_store=await open_registry(buses["edge"], configs["edge"]),
            keys=TierKeys(
                EDGE,
                KeyRegistry.from_keys(
                    {f"veh-{j}": d.identity.verify_key for j, d in enumerate(devices)},
                    role="device",
                ),
                CENTRAL.verify_key,
            ),
            clock_ms=lambda: NOW_MS,
            store_in_thread=False,
        )
        async with trio.open_nursery() as nursery:
            for daemon in (central, regional, edge):
                await nursery.start(daemon.serve)
            # Every fedtier asset lives in the core, three times; the regional
            # and the central talk to it from their own clusters, so the
            # regional's partials cross a gateway.
            subjects = NatsSubjects(FLEET)
            assets = {
                subjects.up_stream()[0],
                subjects.model_stream()[0],
                f"KV_{subjects.model_bucket()}",
                f"OBJ_{subjects.blob_store()}",
            }
            placed = placements(sc)
            assert {name: placed.get(name) for name in assets} == {
                name: (CORE_CLUSTER, 3) for name in assets
            }
            # The registry's read replicas, next to the region's leaf nodes.
            mirrors = {
                f"KV_{subjects.model_bucket()}_{REGION}",
                f"OBJ_{subjects.blob_store()}_{REGION}",
            }
            assert {name: placed.get(name) for name in mirrors} == {
                name: (REGION_CLUSTER, 3) for name in mirrors
            }
            homes: dict[TierKind, str] = {"regional": REGION_CLUSTER, "central": CORE_CLUSTER}
            for kind, cluster in homes.items():
                name = _nats_config(kind, configs[kind], IDENTITIES[kind].key_id).name
                assert connected_to(sc, name) == cluster, kind

            await _a_round(mqtt, devices, version=1)
            assert central.version == 1

            # Lose the core node that leads the UP stream (the partials' home).
            up_leader = _stream_leader(sc, subjects.up_stream()[0])
            await trio.to_thread.run_sync(sc.kill, up_leader)
            await _a_round(mqtt, devices, version=2)
            assert central.version == 2
            # The edge relayed v2, but the regional follows the registry on its
            # own watch (through the region's mirror): wait for it, with a deadline.
            await _until(lambda: regional.known_version == 2, "the regional learns v2")
            assert edge.known_version == 2
            nursery.cancel_scope.cancel()


def _stream_leader(sc: NatsSuperclusterProcess, stream: str) -> str:
    for node in sc.clusters[CORE_CLUSTER]:
        jsz = read_json(f"{node.monitoring_url}/jsz?streams=true")
        for account in jsz.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail["name"] == stream and detail["cluster"].get("leader"):
                    return str(detail["cluster"]["leader"])
    raise AssertionError(f"no core node names a leader of {stream}")


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Return once ``condition()`` holds; fail naming ``what`` after ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        while not condition():
            await trio.sleep(0.05)
    assert condition(), f"{what}: not within {timeout_s:.0f} s"


async def _a_round(mqtt: MemoryBroker, devices: list[SimDevice], *, version: int) -> None:
    """Each device sends one update (the edge cuts a partial of both); wait for ``version``."""
    topics = MqttTopics(FLEET, SITE)
    bus = MemoryBus(mqtt)
    for device in devices:
        values = np.full(device.layout.num_params, 0.1 * version, np.float32)
        _, data = device.update(values, base_version=version - 1)
        async with bus.subscribe(topics.receipt(device.key_id)) as receipts:
            await bus.publish(topics.update(device.key_id), data)
            delivery = await receipts.receive()
        receipt = open_envelope(delivery.payload, {EDGE.key_id: EDGE.verify_key})
        assert isinstance(receipt.message, Receipt)
        assert receipt.message.status is ReceiptStatus.ACCEPTED
    # The site's devices get the version the central signed, from their edge.
    async with bus.subscribe(topics.model_pointer()) as pointers:
        seen = -1
        while seen < version:
            pointer = open_envelope(
                (await pointers.receive()).payload, {CENTRAL.key_id: CENTRAL.verify_key}
            )
            assert isinstance(pointer.message, ModelAnnouncement)
            seen = pointer.message.version
    assert seen == version
