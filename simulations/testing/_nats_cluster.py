"""A real 3-node nats-server cluster on free loopback ports for tests; no asyncio, nats, trio.

``NatsClusterProcess.start(workdir)`` starts three ``NatsServerProcess`` nodes
joined by cluster routes (JetStream with ``sync_interval: always`` on each, as
``deploy/nats/cluster/`` configures them, minus TLS and users), and returns
once the JetStream meta group has a leader that every node knows and every
node's ``/healthz`` is ok, so streams at ``replicas = 3`` can be created at
once. ``kill(i)`` and ``restart(i)`` hurt one node; ``wait_ready`` waits for
the cluster to be whole again. ``start_deploy`` runs the very files of
``deploy/nats/cluster/`` instead (TLS on clients and routes, the users and
permissions of the ``deploy/nats/accounts.conf`` it includes), with only
addresses, file paths and example nkeys replaced.
Every method is synchronous and bounded by a deadline; call it from trio
through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import json
import re
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.testing._deploy_templates import (
    DEPLOY_DIR,
    EXAMPLE_NKEYS,
    SITE_EXAMPLE_NKEY,
    nats_accounts,
)
from fedtier.simulations.testing._nats_server import (
    NatsServerProcess,
    NatsTls,
    _read_json,
    find_nats_server,
)
from fedtier.simulations.testing._ports import free_port

__all__ = ["CLUSTER_DEPLOY_DIR", "LEAF_DEPLOY_FILE", "SITE_EXAMPLE_NKEY", "NatsClusterProcess"]

CLUSTER_DEPLOY_DIR: Final = DEPLOY_DIR / "nats" / "cluster"
LEAF_DEPLOY_FILE: Final = DEPLOY_DIR / "nats" / "leaf" / "site.conf"
_CLUSTER_NAME = "fedtier-core"
# common.conf's include of the users' file (deploy/nats/accounts.conf).
_ACCOUNTS_INCLUDE_RE: Final = re.compile(
    r"^include\s+[\"']?([^\"'\s]*accounts\.conf)[\"']?\s*$", re.MULTILINE
)

_RECENT_PORTS: deque[int] = deque(maxlen=4096)
"""Ports ``_free_ports`` handed out lately in this process."""


def _replace_once(text: str, old: str, new: str, source: Path) -> str:
    """``text`` with the one occurrence of ``old`` replaced; ConfigError when not exactly one."""
    count = text.count(old)
    if count != 1:
        raise ConfigError(
            f"{source} has {count} occurrences of {old!r}, expected 1; update "
            "its renderer in simulations/testing/ along with it"
        )
    return text.replace(old, new)


class _Common(NamedTuple):
    """``common.conf`` rendered, and the accounts file it includes, rendered."""

    text: str
    accounts_include: Path
    """Where ``text`` includes the accounts from, relative to the folder holding it."""
    accounts: str


def _render_common(template: Path, client_tls: NatsTls, public_keys: Mapping[str, str]) -> _Common:
    """Render ``common.conf`` and the accounts file its ``include`` names.

    The accounts file is found the way nats-server finds it (relative to
    ``template``), so the harness runs whatever file the deployed one includes;
    the caller writes it at the same relative place next to the rendered copy.
    Roles left out of ``public_keys`` keep their example keys.
    """
    text = template.read_text()
    for old, path in (
        ("/etc/nats/tls/server.pem", client_tls.cert_file),
        ("/etc/nats/tls/server-key.pem", client_tls.key_file),
        ("/etc/nats/tls/ca.pem", client_tls.ca_file),
    ):
        text = _replace_once(text, f'"{old}"', json.dumps(str(path.resolve())), template)
    includes = _ACCOUNTS_INCLUDE_RE.findall(text)
    if len(includes) != 1 or Path(includes[0]).is_absolute():
        raise ConfigError(
            f"{template} must include its accounts file exactly once, by a relative path;"
            f" found {includes}"
        )
    include = Path(includes[0])
    keys = {**EXAMPLE_NKEYS, "site": SITE_EXAMPLE_NKEY, **public_keys}
    return _Common(text, include, nats_accounts(keys, template=template.parent / include))


def _write_common(common: _Common, folder: Path) -> None:
    """Write ``common`` as ``folder/common.conf``, its accounts file where it includes it from."""
    (folder / "common.conf").write_text(common.text)
    accounts = folder / common.accounts_include
    accounts.parent.mkdir(parents=True, exist_ok=True)
    accounts.write_text(common.accounts)


def _replace_all(text: str, old: str, new: str, source: Path) -> str:
    """``text`` with every occurrence of ``old`` replaced; ConfigError when there is none."""
    if old not in text:
        raise ConfigError(
            f"{source} no longer has {old!r}; update its renderer in simulations/testing/"
        )
    return text.replace(old, new)


def _render_node(
    template: Path,
    index: int,
    node: NatsServerProcess,
    ports: tuple[list[int], list[int]],
    tls: tuple[NatsTls, NatsTls],
) -> str:
    route_ports, leafnode_ports = ports
    client_tls, route_tls = tls
    n = index + 1
    text = template.read_text()
    for old, new in (
        ("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{node.port}"),
        (f"http: nats-{n}.core.example:8222", f"http: 127.0.0.1:{node.monitoring_port}"),
        ("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{route_ports[index]}"),
        ("listen: 0.0.0.0:7422", f"listen: 127.0.0.1:{leafnode_ports[index]}"),
        ('"/etc/nats/tls/route.pem"', json.dumps(str(route_tls.cert_file.resolve()))),
        ('"/etc/nats/tls/route-key.pem"', json.dumps(str(route_tls.key_file.resolve()))),
        ('"/var/lib/nats/jetstream"', json.dumps(str(node.store_dir))),
    ):
        text = _replace_once(text, old, new, template)
    for old, path in (
        ('"/etc/nats/tls/server.pem"', client_tls.cert_file),
        ('"/etc/nats/tls/server-key.pem"', client_tls.key_file),
        ('"/etc/nats/tls/ca.pem"', client_tls.ca_file),
    ):
        text = _replace_all(text, old, json.dumps(str(path.resolve())), template)
    for k, port in enumerate(route_ports):
        if k != index:
            text = _replace_once(
                text, f"tls://nats-{k + 1}.core.example:6222", f"tls://127.0.0.1:{port}", template
            )
    setting_lines = (line for line in text.splitlines() if not line.lstrip().startswith("#"))
    if any(re.search(r"\.example\b", line) for line in setting_lines):
        raise ConfigError(f"{template} names a host the renderer does not replace")
    return text + f"\nports_file_dir: {json.dumps(str(node.workdir))}\n"


def _free_ports(count: int) -> list[int]:
    """Ports free on loopback now, distinct from each other and from recent calls.

    The route, gateway and leaf node ports must be known before any node
    starts (each node names the others), so the server cannot pick them itself
    as it does client ports. They come from below the kernel's ephemeral range
    (``free_port``): a port picked there by binding port 0 was taken, on a
    busy machine, by an outgoing connection of an already started node before
    its own node bound it ("address already in use"). A supercluster asks
    several times for its nine nodes, hence the memory of recent ports.
    """
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports and port not in _RECENT_PORTS:
            ports.append(port)
    _RECENT_PORTS.extend(ports)
    return ports


def _new_node(binary: Path, workdir: Path, startup_timeout_s: float) -> NatsServerProcess:
    """A node (not started) with JetStream fsyncing every write, as every deployed node does."""
    return NatsServerProcess(
        binary, workdir, port=None, sync_always=True, startup_timeout_s=startup_timeout_s
    )


def launch_together(nodes: Sequence[NatsServerProcess], wait_ready: Callable[[], object]) -> None:
    """Launch every node, then ``wait_ready()``; on any failure SIGKILL them all and re-raise.

    The nodes of a cluster only become ready together (a meta leader needs a
    majority): each launch waits for that node's own health only, then
    ``wait_ready`` for the whole; a half-started cluster never outlives the call.
    """
    try:
        for node in nodes:
            node._launch()
        wait_ready()
    except BaseException:
        for node in nodes:
            node.kill()
        raise


def start_deploy_leaf(
    workdir: Path,
    leafnode_ports: Sequence[int],
    *,
    server_tls: NatsTls,
    client_cert: NatsTls,
    seed: str,
    template: Path = LEAF_DEPLOY_FILE,
    startup_timeout_s: float = 15.0,
) -> NatsServerProcess:
    """Start ``deploy/nats/leaf/site.conf`` on loopback, its remote urls set to ``leafnode_ports``.

    The file names three hub nodes (the core's in deploy/nats/cluster/); in a
    supercluster an operator points them at the region's nodes instead, which
    is what ``leafnode_ports`` then are.

    Raises:
        ConfigError: not three ports, the file no longer has what the renderer
            replaces, or the server did not start.
    """
    if len(leafnode_ports) != 3:
        raise ConfigError(f"{template} names three hub nodes, got {len(leafnode_ports)} ports")
    node = _new_node(find_nats_server(), Path(workdir), startup_timeout_s)
    node.tls = server_tls
    node.server_name = "fedtier-site-eu-west-1"

    def render(node: NatsServerProcess) -> str:
        text = template.read_text()
        for old, new in (
            ("listen: 127.0.0.1:4222", f"listen: 127.0.0.1:{node.port}"),
            ("http: 127.0.0.1:8222", f"http: 127.0.0.1:{node.monitoring_port}"),
            ('"/etc/nats/tls/site.pem"', json.dumps(str(server_tls.cert_file.resolve()))),
            ('"/etc/nats/tls/site-key.pem"', json.dumps(str(server_tls.key_file.resolve()))),
            ('"/etc/nats/tls/site-client.pem"', json.dumps(str(client_cert.cert_file.resolve()))),
            (
                '"/etc/nats/tls/site-client-key.pem"',
                json.dumps(str(client_cert.key_file.resolve())),
            ),
            ('"/var/lib/nats/jetstream"', json.dumps(str(node.store_dir))),
            ('"SITE_NKEY_SEED"', json.dumps(seed)),
        ):
            text = _replace_once(text, old, new, template)
        text = _replace_all(
            text, '"/etc/nats/tls/ca.pem"', json.dumps(str(server_tls.ca_file.resolve())), template
        )
        for k, port in enumerate(leafnode_ports):
            text = _replace_once(
                text, f"tls://nats-{k + 1}.core.example:7422", f"tls://127.0.0.1:{port}", template
            )
        return text + f"\nports_file_dir: {json.dumps(str(node.workdir))}\n"

    node.render_config = render
    node._launch()
    return node


class NatsClusterProcess:
    """Three nats-server processes forming one JetStream cluster.

    Attributes:
        nodes: the three servers, each with its own workdir, ports and store.
        cluster_ports: each node's route port on 127.0.0.1.
    """

    def __init__(
        self,
        nodes: list[NatsServerProcess],
        cluster_ports: list[int],
        leafnode_ports: list[int] | None = None,
    ) -> None:
        self.nodes = nodes
        self.cluster_ports = cluster_ports
        self.leafnode_ports = leafnode_ports or []

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        size: int = 3,
        startup_timeout_s: float = 30.0,
        jetstream_domain: str | None = None,
        leafnodes: bool = False,
    ) -> NatsClusterProcess:
        """Start ``size`` clustered nodes under ``workdir`` and wait until JetStream is ready.

        Args:
            workdir: an existing directory the nodes may own.
            size: how many nodes.
            startup_timeout_s: how long to wait for a common meta leader.
            jetstream_domain: the cluster's JetStream ``domain`` (``core`` in
                deploy/nats/cluster/), which clients of a leaf node name.
            leafnodes: accept leaf node connections (``leaf_remotes``).

        Raises:
            ConfigError: the binary is missing or too old, or the cluster had
                no meta leader known to every node in time (quotes a log).
        """
        binary = find_nats_server()
        cluster_ports = _free_ports(size)
        leafnode_ports = _free_ports(size) if leafnodes else []
        nodes = [
            _new_node(binary, Path(workdir) / f"n{i + 1}", startup_timeout_s) for i in range(size)
        ]
        for index, node in enumerate(nodes):
            routes = ", ".join(
                f'"nats-route://127.0.0.1:{port}"'
                for i, port in enumerate(cluster_ports)
                if i != index
            )
            node.extra_config = (
                "cluster {\n"
                f"  name: {_CLUSTER_NAME}\n"
                f"  listen: 127.0.0.1:{cluster_ports[index]}\n"
                f"  routes: [{routes}]\n"
                "}\n"
            )
            if leafnodes:
                node.extra_config += (
                    f"leafnodes {{\n  listen: 127.0.0.1:{leafnode_ports[index]}\n}}\n"
                )
            node.jetstream_domain = jetstream_domain
        cluster = cls(nodes, cluster_ports, leafnode_ports)
        launch_together(nodes, lambda: cluster.wait_ready(startup_timeout_s))
        return cluster

    @classmethod
    def start_deploy(
        cls,
        workdir: Path,
        *,
        client_tls: NatsTls,
        route_tls: NatsTls,
        public_keys: Mapping[str, str],
        template_dir: Path = CLUSTER_DEPLOY_DIR,
        startup_timeout_s: float = 30.0,
    ) -> NatsClusterProcess:
        """Start ``deploy/nats/cluster/node-{1,2,3}.conf`` (and what they include) on loopback.

        Args:
            workdir: an existing directory the three nodes may own.
            client_tls: the CA and server certificate of the client port.
            route_tls: the CA and a certificate valid for 127.0.0.1 with the
                serverAuth and clientAuth key usages, for the routes.
            public_keys: role -> public user nkey replacing the example one
                (the roles of ``EXAMPLE_NKEYS``, and ``site`` for the site leaf
                node's user; a role left out keeps the example key).
            template_dir: the folder holding the files.
            startup_timeout_s: how long to wait for a common meta leader.

        Raises:
            ConfigError: a file no longer has what the renderer replaces, or
                the cluster did not come up (see ``start``).
        """
        binary = find_nats_server()
        route_ports = _free_ports(3)
        leafnode_ports = _free_ports(3)
        common = _render_common(template_dir / "common.conf", client_tls, public_keys)
        nodes = [
            _new_node(binary, Path(workdir) / f"n{i + 1}", startup_timeout_s) for i in range(3)
        ]
        for index, node in enumerate(nodes):
            template = template_dir / f"node-{index + 1}.conf"
            node.workdir.mkdir(parents=True, exist_ok=True)
            # Each node its own common.conf; they share the accounts file they
            # include (one folder up: the cluster's workdir).
            _write_common(common, node.workdir)
            node.tls = client_tls
            node.server_name = f"fedtier-core-{index + 1}"

            def render(
                node: NatsServerProcess, index: int = index, template: Path = template
            ) -> str:
                return _render_node(
                    template, index, node, (route_ports, leafnode_ports), (client_tls, route_tls)
                )

            node.render_config = render
        cluster = cls(nodes, route_ports, leafnode_ports)
        launch_together(nodes, lambda: cluster.wait_ready(startup_timeout_s))
        return cluster

    def start_deploy_leaf(
        self,
        workdir: Path,
        *,
        server_tls: NatsTls,
        client_cert: NatsTls,
        seed: str,
        template: Path = LEAF_DEPLOY_FILE,
        startup_timeout_s: float = 15.0,
    ) -> NatsServerProcess:
        """Start ``deploy/nats/leaf/site.conf`` on loopback, linked to this cluster's leaf ports.

        Args:
            workdir: an existing directory the leaf node may own.
            server_tls: the CA and the certificate its edges see.
            client_cert: the CA and the certificate it presents to the core.
            seed: the nkey seed of the site's user on the core.
            template: the file to run.
            startup_timeout_s: how long to wait for its ``/healthz``.

        Raises:
            ConfigError: the cluster was started without leaf ports, the file no
                longer has what the renderer replaces, or the server did not start.
        """
        if not self.leafnode_ports:
            raise ConfigError("this cluster was started without leafnode ports")
        return start_deploy_leaf(
            workdir,
            self.leafnode_ports,
            server_tls=server_tls,
            client_cert=client_cert,
            seed=seed,
            template=template,
            startup_timeout_s=startup_timeout_s,
        )

    @property
    def urls(self) -> list[str]:
        """Every node's client URL, for ``[nats] servers``."""
        return [node.url for node in self.nodes]

    def leaf_remotes(self) -> str:
        """A ``leafnodes`` block connecting a leaf node to every node of this cluster.

        Raises:
            ConfigError: the cluster was started without ``leafnodes``.
        """
        if not self.leafnode_ports:
            raise ConfigError("this cluster was started without leafnodes=True")
        urls = ", ".join(f'"nats-leaf://127.0.0.1:{port}"' for port in self.leafnode_ports)
        return f"leafnodes {{\n  remotes: [ {{ urls: [{urls}] }} ]\n}}\n"

    @property
    def monitoring_urls(self) -> list[str]:
        """Every node's monitoring base URL, for ``[nats] monitoring_urls``."""
        return [node.monitoring_url for node in self.nodes]

    def meta_leader(self) -> str | None:
        """The server name of the JetStream meta leader as a running node sees it, or None."""
        for node in self.nodes:
            if not node.running:
                continue
            try:
                jsz = _read_json(f"{node.monitoring_url}/jsz", 1.0)
            except (OSError, ValueError):
                continue
            if isinstance(jsz, dict):
                leader = (jsz.get("meta_cluster") or {}).get("leader")
                if leader:
                    return str(leader)
        return None

    def wait_ready(self, timeout_s: float = 30.0) -> float:
        """Wait until every running node names one running meta leader and is healthy.

        Returns:
            the seconds it took (after a leader's loss: the time to elect anew).

        Raises:
            ConfigError: not ready within ``timeout_s`` (quotes the first node's log).
        """
        started = time.monotonic()
        deadline = started + timeout_s
        delay_s = 0.01
        while not self._ready():
            if time.monotonic() > deadline:
                self.nodes[0]._fail(f"cluster had no common meta leader within {timeout_s} s")
            time.sleep(delay_s)  # the servers give no readiness signal to wait on
            delay_s = min(delay_s * 2, 0.2)
        return time.monotonic() - started

    def _ready(self) -> bool:
        leaders: set[str] = set()
        for node in self.nodes:
            if not node.running:
                continue
            try:
                jsz = _read_json(f"{node.monitoring_url}/jsz", 1.0)
                health = _read_json(f"{node.monitoring_url}/healthz", 1.0)
            except (OSError, ValueError):
                return False
            if not isinstance(jsz, dict) or not isinstance(health, dict):
                return False
            leader = (jsz.get("meta_cluster") or {}).get("leader")
            if not leader or health.get("status") != "ok":
                return False
            leaders.add(str(leader))
        # A killed leader is still named by the others until they elect anew.
        running = {node.server_name for node in self.nodes if node.running}
        return len(leaders) == 1 and leaders <= running

    def node_named(self, server_name: str) -> int:
        """The index of the node whose ``server_name`` this is.

        Raises:
            ConfigError: no node has that name.
        """
        for index, node in enumerate(self.nodes):
            if node.server_name == server_name:
                return index
        raise ConfigError(f"no node of this cluster is named {server_name!r}")

    def kill(self, index: int) -> None:
        """Kill node ``index`` with SIGKILL (a lost machine's process; its store stays)."""
        self.nodes[index].kill()

    def restart(self, index: int, *, sync_always: bool | None = None) -> None:
        """Start node ``index`` again on its ports and store (see ``NatsServerProcess.restart``)."""
        self.nodes[index].restart(sync_always=sync_always)

    def restart_all(self, timeout_s: float = 30.0) -> None:
        """Start every node again on its ports and store, together, and wait for the cluster.

        Together because a node restarted alone cannot become healthy without
        a majority (the meta group needs one); a cluster killed whole comes
        back only this way.
        """
        for node in self.nodes:
            node.stop()
            for stale in node.workdir.glob("nats-server_*.ports"):
                stale.unlink(missing_ok=True)
        launch_together(self.nodes, lambda: self.wait_ready(timeout_s))

    def kill_all(self) -> None:
        """Kill every node (SIGKILL) and reap it."""
        for node in self.nodes:
            node.kill()

    def stop(self) -> None:
        """Stop every node gracefully."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsClusterProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
