"""The NATS bus over a real 3-node JetStream cluster: R3 assets, a node lost, the fsync check."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import trio

from fedtier.protocol.bus.nats import NatsBus, NatsConfig, StreamSpec, open_nats_bus
from fedtier.protocol.errors import BusUnavailable, ConfigError, PublishError
from fedtier.protocol.names import NatsSubjects
from fedtier.simulations.testing import (
    EXAMPLE_FLEET,
    EXAMPLE_NKEYS,
    EXAMPLE_REGION,
    NATS_ACCOUNTS_TEMPLATE,
    NATS_CONF_TEMPLATE,
    CertFiles,
    NatsClusterProcess,
    NatsServerProcess,
    NatsTls,
    NkeyUser,
    TestPki,
    find_nats_server,
    inbox_prefix,
    nats_accounts,
)
from fedtier.simulations.testing._nats_cluster import LEAF_DEPLOY_FILE, SITE_EXAMPLE_NKEY
from fedtier.tiers.config import (
    RetentionSettings,
    RetrySettings,
    TierConfig,
    TierKind,
    load_nats_settings,
)
from fedtier.tiers.daemon import _nats_config

# What _nats_config reads of a daemon's config besides [nats] (a stand-in config).
DAEMON_DEFAULTS = {"retry": RetrySettings(), "retention": RetentionSettings()}

pytestmark = pytest.mark.brokers

DEADLINE_S = 30
FLEET = "clu"
EVENTS = StreamSpec("EVENTS", ("ev.>",), max_age_s=3600.0, duplicate_window_s=600.0, replicas=3)


def _start(workdir: Path) -> NatsClusterProcess:
    try:
        return NatsClusterProcess.start(workdir)
    except ConfigError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsClusterProcess]:
    """A 3-node cluster of this test's own, free to kill and restart nodes of."""
    nodes = _start(tmp_path / "cluster")
    try:
        yield nodes
    finally:
        nodes.stop()


def read_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def stream_configs(cluster: NatsClusterProcess) -> dict[str, dict[str, Any]]:
    """Stream name -> its config, as the running nodes that host it report it."""
    streams: dict[str, dict[str, Any]] = {}
    for node in cluster.nodes:
        if not node.running:
            continue
        jsz = read_json(f"{node.monitoring_url}/jsz?streams=true&config=true")
        for account in jsz.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                streams.setdefault(stream["name"], stream["config"])
    return streams


async def replicas_of(cluster: NatsClusterProcess, stream: str, want: int) -> int:
    """The stream's replicas once every node reports ``want`` (else what they say at the deadline).

    A stream update is applied by each node in turn: a node's report lags the
    API reply by a few milliseconds.
    """
    delay_s = 0.01
    with trio.move_on_after(5):
        while True:
            found = {
                stream_configs_of(node.monitoring_url).get(stream, {}).get("num_replicas")
                for node in cluster.nodes
            }
            if found == {want}:
                return want
            await trio.sleep(delay_s)  # polling the monitoring endpoint
            delay_s = min(delay_s * 2, 0.2)
    return int(stream_configs(cluster).get(stream, {}).get("num_replicas") or 0)


def stream_configs_of(monitoring_url: str) -> dict[str, dict[str, Any]]:
    jsz = read_json(f"{monitoring_url}/jsz?streams=true&config=true")
    return {
        stream["name"]: stream["config"]
        for account in jsz.get("account_details") or []
        for stream in account.get("stream_detail") or []
    }


def node_holding(cluster: NatsClusterProcess, connection_name: str) -> int:
    """The index of the node a client named ``connection_name`` is connected to now."""
    for index, node in enumerate(cluster.nodes):
        if not node.running:
            continue
        connz = read_json(f"{node.monitoring_url}/connz")
        if any(c.get("name") == connection_name for c in connz.get("connections") or []):
            return index
    raise AssertionError(f"no node holds a connection named {connection_name!r}")


def config_for(cluster: NatsClusterProcess, name: str, **overrides: object) -> NatsConfig:
    base = NatsConfig(
        servers=tuple(cluster.urls),
        name=name,
        monitoring_urls=tuple(cluster.monitoring_urls),
        streams=(EVENTS,),
        replicas=3,
        request_timeout_s=2.0,
        reconnect_wait_s=0.1,
        connect_backoff_s=0.05,
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def daemon_config(tmp_path: Path, cluster: NatsClusterProcess, kind: TierKind) -> NatsConfig:
    """What a daemon of ``kind`` builds from a ``[nats]`` table naming the whole cluster."""
    path = tmp_path / f"{kind}.toml"
    path.write_text(
        f'fleet = "{FLEET}"\n[nats]\n'
        f"servers = {json.dumps(cluster.urls)}\n"
        f"monitoring_urls = {json.dumps(cluster.monitoring_urls)}\n"
        "replicas = 3\n"
    )
    fleet, settings = load_nats_settings(path)
    config = cast(TierConfig, SimpleNamespace(fleet=fleet, nats=settings, **DAEMON_DEFAULTS))
    return cast(NatsConfig, _nats_config(kind, config, "k" * 16))


async def publish_until_acked(bus: NatsBus, subject: str, payload: bytes, msg_id: str) -> None:
    """Retry a publish with the same id until JetStream acks it, as a daemon's outbox does."""
    backoff_s = 0.05
    while True:
        try:
            await bus.publish(subject, payload, msg_id=msg_id)
        except (BusUnavailable, PublishError):
            await trio.sleep(backoff_s)  # retry backoff
            backoff_s = min(backoff_s * 2, 0.5)
        else:
            return


async def test_the_daemons_assets_are_created_with_three_replicas(
    tmp_path: Path, nats_loop: None, cluster: NatsClusterProcess
) -> None:
    subjects = NatsSubjects(FLEET)
    central = daemon_config(tmp_path, cluster, "central")
    regional = daemon_config(tmp_path, cluster, "regional")
    assert central.replicas == 3
    assert {s.replicas for s in central.streams} == {3}
    assert len(central.sync_check_urls) == 3
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(central) as bus:
            await bus.kv_bucket(subjects.model_bucket())
            await bus.object_store(subjects.blob_store())
        # A daemon that only checks the streams finds them as it wants them.
        async with open_nats_bus(regional) as bus:
            await bus.kv_bucket(subjects.model_bucket())
    configs = stream_configs(cluster)
    expected = {
        subjects.up_stream()[0],
        subjects.model_stream()[0],
        f"KV_{subjects.model_bucket()}",
        f"OBJ_{subjects.blob_store()}",
    }
    assert expected <= set(configs)
    for name in expected:
        assert (configs[name]["num_replicas"], configs[name]["storage"]) == (3, "file"), name


async def test_fewer_replicas_than_configured_are_refused(
    nats_loop: None, cluster: NatsClusterProcess
) -> None:
    r1 = dataclasses.replace(EVENTS, replicas=1)
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config_for(cluster, "r1", streams=(r1,), replicas=1)) as bus:
            await bus.kv_bucket("r1_kv")
            await bus.object_store("r1_obj")
        checker = config_for(cluster, "check-only", manage_streams=False)
        with pytest.raises(ConfigError, match=r"EVENTS.*keeps 1 copies, fewer than .* 3"):
            async with open_nats_bus(checker):
                pass
        async with open_nats_bus(config_for(cluster, "r3", streams=())) as bus:
            with pytest.raises(ConfigError, match=r"KV_r1_kv.*keeps 1 copies"):
                await bus.kv_bucket("r1_kv")
            with pytest.raises(ConfigError, match=r"OBJ_r1_obj.*keeps 1 copies"):
                await bus.object_store("r1_obj")
        # The central (manage_streams) scales the stream up to what it is told.
        async with open_nats_bus(config_for(cluster, "scaler")):
            pass
    assert await replicas_of(cluster, "EVENTS", 3) == 3


async def test_no_acknowledged_message_is_lost_when_a_node_dies(
    nats_loop: None, cluster: NatsClusterProcess
) -> None:
    total = 120
    config = config_for(cluster, "pubsub")
    received: list[str] = []
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(config) as bus:
            async with bus.subscribe("ev.>", durable="reader", capacity=16) as sub:
                for i in range(total):
                    if i == total // 2:
                        # The node this client talks to, mid-way: the client
                        # reconnects to another, the stream keeps a quorum.
                        victim = node_holding(cluster, "pubsub")
                        await trio.to_thread.run_sync(cluster.kill, victim)
                    await publish_until_acked(bus, f"ev.{i % 4}", str(i).encode(), f"m{i}")
                while len(set(received)) < total:
                    delivery = await sub.receive()
                    received.append(delivery.payload.decode())
                    await delivery.ack()
    # Every acknowledged publish is there once: retries with the same id were
    # deduplicated; a redelivery (an ack lost with the node) is the only repeat.
    assert sorted(set(received), key=int) == [str(i) for i in range(total)]
    node = cluster.nodes[(victim + 1) % 3]
    jsz = read_json(f"{node.monitoring_url}/jsz?streams=true")
    (events,) = [
        s
        for account in jsz["account_details"]
        for s in account["stream_detail"]
        if s["name"] == "EVENTS"
    ]
    assert events["state"]["messages"] == total


async def test_the_fsync_check_reads_every_node_and_fails_closed(
    nats_loop: None, cluster: NatsClusterProcess
) -> None:
    with pytest.raises(ConfigError, match="no monitoring URL is set"):
        config_for(cluster, "blind", monitoring_urls=())
    # One node restarted without `sync_interval: always`: whichever node the
    # client lands on, the check reads all three and refuses.
    await trio.to_thread.run_sync(lambda: cluster.restart(2, sync_always=False))
    with trio.fail_after(DEADLINE_S):
        await trio.to_thread.run_sync(cluster.wait_ready)
        with pytest.raises(ConfigError, match=r"n3.*acknowledges JetStream writes before"):
            async with open_nats_bus(config_for(cluster, "strict", streams=())):
                pass
        # A node that does not answer is a failure too, not a skip.
        await trio.to_thread.run_sync(cluster.kill, 2)
        with pytest.raises(ConfigError, match="after 2 attempts"):
            async with open_nats_bus(config_for(cluster, "strict", connect_attempts=2)):
                pass


async def test_the_fsync_check_runs_again_after_a_reconnect(
    tmp_path: Path, nats_loop: None, cluster: NatsClusterProcess
) -> None:
    config = dataclasses.replace(daemon_config(tmp_path, cluster, "central"), reconnect_wait_s=0.1)

    async def lose_the_node_and_bring_it_back_lax() -> None:
        async with open_nats_bus(config):
            victim = node_holding(cluster, config.name)
            await trio.to_thread.run_sync(cluster.kill, victim)
            # Back with the fsync switched off: the client, now on another
            # node, finds it when it answers again and ends the bus.
            await trio.to_thread.run_sync(lambda: cluster.restart(victim, sync_always=False))
            await trio.sleep_forever()

    with (
        trio.fail_after(DEADLINE_S),
        pytest.raises(ConfigError, match=r"^after a reconnect, nats-server .* acknowledges"),
    ):
        await lose_the_node_and_bring_it_back_lax()


def route_cert(pki: TestPki, tmp_path: Path) -> NatsTls:
    """A certificate for 127.0.0.1 usable both ways on a route (serverAuth and clientAuth)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key((pki.directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_file.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "route")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "route.pem", tmp_path / "route-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return NatsTls(pki.ca_file, cert_file, key_file)


NATS_DEPLOY_DIR = NATS_ACCOUNTS_TEMPLATE.parent
_INCLUDE_RE = re.compile(r"^\s*include\s+[\"']?([^\"'\s]+)[\"']?\s*$", re.MULTILINE)


def server_configs() -> list[Path]:
    """Every file of deploy/nats/ that an operator starts a nats-server with."""
    return sorted(
        path.resolve()
        for path in NATS_DEPLOY_DIR.rglob("*.conf")
        if re.search(r"^server_name:", path.read_text(), re.MULTILINE)
    )


def included(config: Path) -> list[Path]:
    """``config`` and every file it includes, transitively.

    Each path is taken as nats-server takes it: relative to the folder of the
    file that names it.
    """
    files = [config.resolve()]
    for name in _INCLUDE_RE.findall(config.read_text()):
        files += included(config.parent / name)
    return files


def test_every_deployed_server_takes_its_users_from_the_one_accounts_file() -> None:
    servers = server_configs()
    # The single server, the 3-node cluster, the 9 nodes of the supercluster, a site.
    assert len(servers) == 1 + 3 + 9 + 1
    assert {NATS_CONF_TEMPLATE.resolve(), LEAF_DEPLOY_FILE.resolve()} <= set(servers)
    for server in servers:
        # A site's leaf node has no users: its edges are bounded by the site's
        # user on the cluster it links to.
        want = 0 if server == LEAF_DEPLOY_FILE.resolve() else 1
        assert included(server).count(NATS_ACCOUNTS_TEMPLATE.resolve()) == want, server
    # No second copy of users anywhere that could drift from the one file.
    holders = {
        path.relative_to(NATS_DEPLOY_DIR).as_posix()
        for path in NATS_DEPLOY_DIR.rglob("*.conf")
        if re.search(
            r"^\s*(accounts\s*\{|system_account\s*:|authorization\s*\{)",
            path.read_text(),
            re.MULTILINE,
        )
    }
    assert holders == {"accounts.conf"}


def test_the_site_leaf_nodes_user_is_rendered_only_with_its_key() -> None:
    keys = {role: f"U{'A' * 55}" for role in EXAMPLE_NKEYS}
    site_key = f"U{'S' * 55}"
    lone = nats_accounts(keys)  # a test server without leaf nodes
    linked = nats_accounts({**keys, "site": site_key}, fleet="acme", region="south")
    assert (lone.count("nkey: "), linked.count("nkey: ")) == (5, 6)
    assert "$JS.core.API" not in lone
    assert SITE_EXAMPLE_NKEY not in lone + linked
    site_user = linked[linked.index(f"nkey: {site_key}") :]
    assert site_user.index('allowed_connection_types: ["LEAFNODE"]') < site_user.index("}")
    assert '"$JS.core.API.STREAM.INFO.FT_ACME_UP"' in site_user
    assert '"ft.acme.up.region.south"' in site_user


def test_a_site_user_whose_markers_are_gone_is_not_cut_blindly(tmp_path: Path) -> None:
    template = tmp_path / "accounts.conf"
    text = NATS_ACCOUNTS_TEMPLATE.read_text()
    template.write_text(re.sub(r".*# --- end of the site leaf node of .*\n", "", text))
    keys = {role: f"U{'A' * 55}" for role in EXAMPLE_NKEYS}
    with pytest.raises(ConfigError, match="no longer marks the site leaf node's user"):
        nats_accounts(keys, template=template)
    # Kept whole, the entry needs no markers.
    assert "nkey: U" + "S" * 55 in nats_accounts(
        {**keys, "site": f"U{'S' * 55}"}, template=template
    )


def test_nats_server_resolves_the_accounts_include_of_every_deployed_server(
    tmp_path: Path,
) -> None:
    # A copy of deploy/nats/ with only the certificate and store paths made
    # real, checked by nats-server itself (-t): the include paths resolve as
    # nats-server resolves them, and without accounts.conf no server starts.
    pki = TestPki.create(tmp_path / "pki")
    server = pki.issue_server("nats")
    copy = tmp_path / "nats"

    def real_path(match: re.Match[str]) -> str:
        name = match[1]
        path = (
            pki.ca_file
            if name == "ca"
            else server.key_file
            if name.endswith("-key")
            else server.cert_file
        )
        return json.dumps(str(path.resolve()))

    for source in NATS_DEPLOY_DIR.rglob("*.conf"):
        text = re.sub(r'"/etc/nats/tls/([\w-]+)\.pem"', real_path, source.read_text())
        text = text.replace('"/var/lib/nats/jetstream"', json.dumps(str(tmp_path / "store")))
        target = copy / source.relative_to(NATS_DEPLOY_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    binary = str(find_nats_server())

    def check(config: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [binary, "-t", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    with_users = [
        copy / path.relative_to(NATS_DEPLOY_DIR.resolve())
        for path in server_configs()
        if path != LEAF_DEPLOY_FILE.resolve()
    ]
    for config in with_users:
        result = check(config)
        assert result.returncode == 0, (config, result.stderr)
    (copy / "accounts.conf").unlink()
    for config in (
        copy / "nats-server.conf",
        copy / "cluster" / "node-1.conf",
        copy / "supercluster" / "us-east-3.conf",
    ):
        result = check(config)
        assert result.returncode != 0, config
        assert "accounts.conf: no such file" in result.stderr, (config, result.stderr)


async def test_the_deploy_cluster_and_leaf_files_run_with_r3_streams_and_their_users(
    tmp_path: Path, nats_loop: None
) -> None:
    pki = TestPki.create(tmp_path / "pki")
    users = {role: pki.issue_nkey_user(f"nats-{role}") for role in [*EXAMPLE_NKEYS, "site"]}
    certs = {role: pki.issue_client(f"nats-{role}") for role in ("central", "edge", "site")}
    keys = {role: user.public_key for role, user in users.items()}
    server = pki.issue_server("nats")
    cluster = await trio.to_thread.run_sync(
        lambda: NatsClusterProcess.start_deploy(
            tmp_path / "cluster",
            client_tls=NatsTls(pki.ca_file, server.cert_file, server.key_file),
            route_tls=route_cert(pki, tmp_path),
            public_keys=keys,
        )
    )
    try:
        leaf = await trio.to_thread.run_sync(
            lambda: cluster.start_deploy_leaf(
                tmp_path / "leaf",
                server_tls=NatsTls(pki.ca_file, server.cert_file, server.key_file),
                client_cert=NatsTls(pki.ca_file, certs["site"].cert_file, certs["site"].key_file),
                seed=users["site"].seed_file.read_text().strip(),
            )
        )
        try:
            await _through_the_deploy_files(tmp_path, pki, cluster, leaf, users, certs)
        finally:
            await trio.to_thread.run_sync(leaf.stop)
    finally:
        await trio.to_thread.run_sync(cluster.stop)


async def _through_the_deploy_files(
    tmp_path: Path,
    pki: TestPki,
    cluster: NatsClusterProcess,
    leaf: NatsServerProcess,
    users: dict[str, NkeyUser],
    certs: dict[str, CertFiles],
) -> None:
    assert all(url.startswith("tls://") for url in [*cluster.urls, leaf.url])

    def daemon(kind: TierKind) -> NatsConfig:
        path = tmp_path / f"{kind}.toml"
        lines = [f'fleet = "{EXAMPLE_FLEET}"', "[nats]", "replicas = 3"]
        lines += [f'inbox_prefix = "{inbox_prefix(kind)}"']
        lines += [
            f'tls_ca_file = "{pki.ca_file}"',
            f'tls_cert_file = "{certs[kind].cert_file}"',
            f'tls_key_file = "{certs[kind].key_file}"',
        ]
        if kind == "central":
            lines += [
                f"servers = {json.dumps(cluster.urls)}",
                f"monitoring_urls = {json.dumps(cluster.monitoring_urls)}",
                f'nkeys_seed_file = "{users[kind].seed_file}"',
            ]
        else:  # an edge at the site: the leaf node, the core's domain
            lines += [
                f'servers = ["{leaf.url}"]',
                f"monitoring_urls = {json.dumps([leaf.monitoring_url, *cluster.monitoring_urls])}",
                'jetstream_domain = "core"',
            ]
        path.write_text("\n".join(lines) + "\n")
        fleet, settings = load_nats_settings(path)
        config = cast(TierConfig, SimpleNamespace(fleet=fleet, nats=settings, **DAEMON_DEFAULTS))
        return cast(NatsConfig, _nats_config(kind, config, "k" * 16))

    subjects = NatsSubjects(EXAMPLE_FLEET)
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(daemon("central")) as bus:
            await bus.kv_bucket(subjects.model_bucket())
            await bus.object_store(subjects.blob_store())
        async with open_nats_bus(daemon("edge")) as bus:
            assert await (await bus.kv_bucket(subjects.model_bucket())).get("current") is None
            await publish_until_acked(bus, subjects.to_region(EXAMPLE_REGION), b"p", "p1")
            # The site's user on the core lets only this region's partials across.
            with pytest.raises(PublishError, match="no JetStream responder"):
                await bus.publish(subjects.to_region("us-east"), b"p", msg_id="p2")
        # The site's user serves leaf node links only: as a client it is refused.
        site_as_client = NatsConfig(
            servers=tuple(cluster.urls),
            name="site-as-client",
            tls_ca_file=pki.ca_file,
            tls_cert_file=certs["site"].cert_file,
            tls_key_file=certs["site"].key_file,
            nkeys_seed_file=users["site"].seed_file,
            monitoring_urls=tuple(cluster.monitoring_urls),
            connect_attempts=1,
        )
        with pytest.raises(ConfigError, match="refused the credentials"):
            async with open_nats_bus(site_as_client):
                pass
    configs = stream_configs(cluster)
    for name in (subjects.up_stream()[0], f"KV_{subjects.model_bucket()}"):
        assert configs[name]["num_replicas"] == 3, name
    # Stored once: the most any node holds (a follower may lag, never lead).
    held = [
        s["state"]["messages"]
        for node in cluster.nodes
        for account in read_json(f"{node.monitoring_url}/jsz?streams=true")["account_details"]
        for s in account["stream_detail"]
        if s["name"] == subjects.up_stream()[0]
    ]
    assert max(held) == 1


async def test_three_replicas_against_one_server_are_refused(
    nats_loop: None, fresh_nats_server: NatsServerProcess
) -> None:
    # A cluster config pointed at a lone server: the central stops at start
    # instead of running with one copy of everything.
    config = NatsConfig(
        servers=(fresh_nats_server.url,),
        monitoring_url=fresh_nats_server.monitoring_url,
        streams=(EVENTS,),
        replicas=3,
    )
    with (
        trio.fail_after(DEADLINE_S),
        pytest.raises(ConfigError, match="replicas > 1 not supported in non-clustered mode"),
    ):
        async with open_nats_bus(config):
            pass


async def test_an_edge_on_a_site_leaf_node_reaches_the_core_streams(
    tmp_path: Path, nats_loop: None
) -> None:
    core = await trio.to_thread.run_sync(
        lambda: NatsClusterProcess.start(tmp_path / "core", jetstream_domain="core", leafnodes=True)
    )
    try:
        leaf = await trio.to_thread.run_sync(
            lambda: NatsServerProcess.start(
                tmp_path / "leaf", jetstream_domain="site-1", extra_config=core.leaf_remotes()
            )
        )
        try:
            await _edge_through_the_leaf(tmp_path, core, leaf)
        finally:
            await trio.to_thread.run_sync(leaf.stop)
    finally:
        await trio.to_thread.run_sync(core.stop)


async def _edge_through_the_leaf(
    tmp_path: Path, core: NatsClusterProcess, leaf: NatsServerProcess
) -> None:
    subjects = NatsSubjects(FLEET)
    edge_toml = tmp_path / "edge.toml"
    edge_toml.write_text(
        f'fleet = "{FLEET}"\n[nats]\n'
        f'servers = ["{leaf.url}"]\n'
        # The leaf's own JetStream and every core node: each may hold a write.
        f"monitoring_urls = {json.dumps([leaf.monitoring_url, *core.monitoring_urls])}\n"
        'replicas = 3\njetstream_domain = "core"\n'
    )
    fleet, settings = load_nats_settings(edge_toml)
    edge = cast(
        NatsConfig,
        _nats_config(
            "edge",
            cast(TierConfig, SimpleNamespace(fleet=fleet, nats=settings, **DAEMON_DEFAULTS)),
            "e" * 16,
        ),
    )
    # Without the domain the edge asks the leaf's own JetStream, which has no such stream.
    local = dataclasses.replace(edge, jetstream_domain=None, wait_for_streams=False)
    with trio.fail_after(DEADLINE_S):
        async with open_nats_bus(daemon_config(tmp_path, core, "central")) as central:
            await central.kv_bucket(subjects.model_bucket())
            with pytest.raises(ConfigError, match="does not exist"):
                async with open_nats_bus(local):
                    pass
            async with open_nats_bus(edge) as bus:
                assert await (await bus.kv_bucket(subjects.model_bucket())).get("current") is None
                await publish_until_acked(bus, subjects.to_region("r1"), b"partial", "p1")
                again = await bus.publish(subjects.to_region("r1"), b"partial", msg_id="p1")
                assert again.duplicate  # the core's dedupe window, across the leaf
            # The regional, on the core, consumes what the edge published at the site.
            async with central.subscribe(subjects.to_region("r1"), durable="regional-r1") as sub:
                delivery = await sub.receive()
                assert delivery.payload == b"partial"
                await delivery.ack()


@pytest.mark.parametrize(
    ("nats_table", "complaint"),
    [
        ("replicas = 7", "nats.replicas is 7"),
        ("replicas = 0", "nats.replicas is 0"),
        ('monitoring_urls = "http://a:8222"', "nats.monitoring_urls is"),
        ('monitoring_urls = ["nats://a:4222"]', "nats.monitoring_urls is"),
    ],
)
def test_bad_cluster_settings_are_refused_when_the_config_is_read(
    tmp_path: Path, nats_table: str, complaint: str
) -> None:
    path = tmp_path / "edge.toml"
    path.write_text(f'fleet = "{FLEET}"\n[nats]\n{nats_table}\n')
    with pytest.raises(ConfigError, match=re.escape(complaint)):
        load_nats_settings(path)


def test_the_bus_config_refuses_a_bad_domain_and_repeats_no_monitoring_url() -> None:
    with pytest.raises(ConfigError, match="jetstream_domain"):
        NatsConfig(servers=("nats://a:4222",), require_sync_always=False, jetstream_domain="a.b")
    config = NatsConfig(
        servers=("nats://a:4222",),
        monitoring_url="http://a:8222",
        monitoring_urls=("http://a:8222", "http://b:8222"),
    )
    assert config.sync_check_urls == ("http://a:8222", "http://b:8222")
