"""The shipped NATS supercluster (clusters joined by gateways) on loopback; no asyncio, nats, trio.

``NatsSuperclusterProcess.start_deploy(workdir, ...)`` runs the very files of
``deploy/nats/supercluster/`` (and the ``deploy/nats/cluster/common.conf`` they
include, with the ``deploy/nats/accounts.conf`` that one includes) as nine
nats-server processes: the core cluster and one cluster per region, three
nodes each, with TLS on clients, routes and gateways and the deployed users,
only addresses, file paths and example nkeys replaced. It
returns once every node is healthy, every node has a gateway to every other
cluster (``/gatewayz``), and the JetStream meta group has one leader that every
node names and counts every node as current, so R3 assets can be created at
once. ``start_deploy_leaf`` links ``deploy/nats/leaf/site.conf`` to a region.
``kill`` and ``restart`` hurt one node; ``wait_ready`` waits for the whole
again. Every method is synchronous and bounded by a deadline; call it from
trio through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Final

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.testing._deploy_templates import DEPLOY_DIR
from fedtier.simulations.testing._nats_cluster import (
    LEAF_DEPLOY_FILE,
    _free_ports,
    _new_node,
    _render_common,
    _replace_all,
    _replace_once,
    _write_common,
    launch_together,
    start_deploy_leaf,
)
from fedtier.simulations.testing._nats_server import (
    NatsServerProcess,
    NatsTls,
    _read_json,
    find_nats_server,
)

__all__ = [
    "CORE_CLUSTER",
    "SUPERCLUSTER_CLUSTERS",
    "SUPERCLUSTER_DEPLOY_DIR",
    "NatsSuperclusterProcess",
]

SUPERCLUSTER_DEPLOY_DIR: Final = DEPLOY_DIR / "nats" / "supercluster"
CORE_CLUSTER: Final = "fedtier-core"
# Cluster (gateway) name -> the label of its hosts (nats-<k>.<label>.example) and node files
# (<label>-<k>.conf) in deploy/nats/supercluster/.
SUPERCLUSTER_CLUSTERS: Final[Mapping[str, str]] = {
    CORE_CLUSTER: "core",
    "region-eu-west": "eu-west",
    "region-us-east": "us-east",
}
_NODES_PER_CLUSTER = 3


def _cluster_file(label: str) -> str:
    return "core.conf" if label == "core" else f"region-{label}.conf"


def _no_example_hosts(text: str, source: Path) -> str:
    setting_lines = (line for line in text.splitlines() if not line.lstrip().startswith("#"))
    if any(re.search(r"\.example\b", line) for line in setting_lines):
        raise ConfigError(f"{source} names a host the renderer does not replace")
    return text


class _Ports:
    """Every node's server-to-server ports, chosen before any starts (each names the others)."""

    def __init__(self) -> None:
        count = _NODES_PER_CLUSTER
        self.route = {label: _free_ports(count) for label in SUPERCLUSTER_CLUSTERS.values()}
        self.gateway = {label: _free_ports(count) for label in SUPERCLUSTER_CLUSTERS.values()}
        self.leafnode = {label: _free_ports(count) for label in SUPERCLUSTER_CLUSTERS.values()}


def _render_gateways(template: Path, ports: _Ports) -> str:
    text = template.read_text()
    for label, gateway_ports in ports.gateway.items():
        for k, port in enumerate(gateway_ports):
            text = _replace_once(
                text,
                f"tls://nats-{k + 1}.{label}.example:7222",
                f"tls://127.0.0.1:{port}",
                template,
            )
    return _no_example_hosts(text, template)


def _render_cluster_file(
    template: Path,
    label: str,
    index: int,
    node: NatsServerProcess,
    ports: _Ports,
    tls: tuple[NatsTls, NatsTls],
) -> str:
    """The cluster file as node ``index`` of ``label`` includes it (its own listen ports)."""
    client_tls, route_tls = tls
    text = template.read_text()
    for old, new in (
        ("listen: 0.0.0.0:6222", f"listen: 127.0.0.1:{ports.route[label][index]}"),
        ("listen: 0.0.0.0:7222", f"listen: 127.0.0.1:{ports.gateway[label][index]}"),
        ('"/var/lib/nats/jetstream"', json.dumps(str(node.store_dir))),
    ):
        text = _replace_once(text, old, new, template)
    if "listen: 0.0.0.0:7422" in text:
        text = _replace_once(
            text,
            "listen: 0.0.0.0:7422",
            f"listen: 127.0.0.1:{ports.leafnode[label][index]}",
            template,
        )
        for old, path in (
            ('"/etc/nats/tls/server.pem"', client_tls.cert_file),
            ('"/etc/nats/tls/server-key.pem"', client_tls.key_file),
        ):
            text = _replace_once(text, old, json.dumps(str(path.resolve())), template)
    for old, path in (
        ('"/etc/nats/tls/route.pem"', route_tls.cert_file),
        ('"/etc/nats/tls/route-key.pem"', route_tls.key_file),
        ('"/etc/nats/tls/ca.pem"', route_tls.ca_file),
    ):
        text = _replace_all(text, old, json.dumps(str(path.resolve())), template)
    for k, port in enumerate(ports.route[label]):
        text = _replace_once(
            text, f"tls://nats-{k + 1}.{label}.example:6222", f"tls://127.0.0.1:{port}", template
        )
    return _no_example_hosts(text, template)


def _render_node_file(template: Path, label: str, index: int, node: NatsServerProcess) -> str:
    text = template.read_text()
    for old, new in (
        ("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{node.port}"),
        (
            f"http: nats-{index + 1}.{label}.example:8222",
            f"http: 127.0.0.1:{node.monitoring_port}",
        ),
    ):
        text = _replace_once(text, old, new, template)
    text = _no_example_hosts(text, template)
    return text + f"\nports_file_dir: {json.dumps(str(node.workdir))}\n"


class NatsSuperclusterProcess:
    """Nine nats-server processes: three clusters of three joined by gateways, one JetStream.

    Attributes:
        clusters: cluster (gateway) name -> its three nodes.
        leafnode_ports: cluster name -> each node's leaf node port (regions only
            accept leaf nodes; the core's ports are unused).
    """

    def __init__(
        self, clusters: dict[str, list[NatsServerProcess]], leafnode_ports: dict[str, list[int]]
    ) -> None:
        self.clusters = clusters
        self.leafnode_ports = leafnode_ports

    @classmethod
    def start_deploy(
        cls,
        workdir: Path,
        *,
        client_tls: NatsTls,
        route_tls: NatsTls,
        public_keys: Mapping[str, str],
        template_dir: Path = SUPERCLUSTER_DEPLOY_DIR,
        startup_timeout_s: float = 60.0,
    ) -> NatsSuperclusterProcess:
        """Start every node file of ``deploy/nats/supercluster/`` on loopback and wait for it whole.

        Args:
            workdir: an existing directory the nodes may own (``<node>/`` each,
                ``cluster/common.conf``, which the cluster files include as
                ``../cluster/common.conf``, and ``accounts.conf``, which that one
                includes as ``../accounts.conf``).
            client_tls: the CA and server certificate of the client and leaf node ports.
            route_tls: the CA and a certificate valid for 127.0.0.1 with the
                serverAuth and clientAuth key usages, for routes and gateways.
            public_keys: role -> public user nkey replacing the example one
                (as ``NatsClusterProcess.start_deploy``).
            template_dir: the folder holding the files.
            startup_timeout_s: how long to wait for the whole supercluster.

        Raises:
            ConfigError: a file no longer has what the renderer replaces, or
                the supercluster was not whole in time (quotes a node's log).
        """
        workdir = Path(workdir)
        binary = find_nats_server()
        ports = _Ports()
        common_dir = workdir / "cluster"
        common_dir.mkdir(parents=True, exist_ok=True)
        _write_common(
            _render_common(
                template_dir.parent / "cluster" / "common.conf", client_tls, public_keys
            ),
            common_dir,
        )
        gateways = _render_gateways(template_dir / "gateways.conf", ports)
        clusters: dict[str, list[NatsServerProcess]] = {}
        for name, label in SUPERCLUSTER_CLUSTERS.items():
            clusters[name] = []
            for index in range(_NODES_PER_CLUSTER):
                node = _new_node(binary, workdir / f"{label}-{index + 1}", startup_timeout_s)
                node.workdir.mkdir(parents=True, exist_ok=True)
                (node.workdir / "gateways.conf").write_text(gateways)
                node.tls = client_tls
                node.server_name = f"fedtier-{label}-{index + 1}"

                def render(node: NatsServerProcess, label: str = label, index: int = index) -> str:
                    # The cluster file too: it holds this node's listen ports and store.
                    (node.workdir / _cluster_file(label)).write_text(
                        _render_cluster_file(
                            template_dir / _cluster_file(label),
                            label,
                            index,
                            node,
                            ports,
                            (client_tls, route_tls),
                        )
                    )
                    return _render_node_file(
                        template_dir / f"{label}-{index + 1}.conf", label, index, node
                    )

                node.render_config = render
                clusters[name].append(node)
        leafnode_ports = {
            name: ports.leafnode[label] for name, label in SUPERCLUSTER_CLUSTERS.items()
        }
        supercluster = cls(clusters, leafnode_ports)
        launch_together(supercluster.nodes, lambda: supercluster.wait_ready(startup_timeout_s))
        return supercluster

    def start_deploy_leaf(
        self,
        workdir: Path,
        *,
        cluster: str,
        server_tls: NatsTls,
        client_cert: NatsTls,
        seed: str,
        template: Path = LEAF_DEPLOY_FILE,
        startup_timeout_s: float = 15.0,
    ) -> NatsServerProcess:
        """Start ``deploy/nats/leaf/site.conf`` on loopback, its link to ``cluster``'s nodes.

        Args:
            workdir: an existing directory the leaf node may own.
            cluster: the region's cluster name (``region-eu-west``).
            server_tls: the CA and the certificate its edges see.
            client_cert: the CA and the certificate it presents to the region.
            seed: the nkey seed of the site's user.
            template: the file to run.
            startup_timeout_s: how long to wait for its ``/healthz``.

        Raises:
            ConfigError: no such cluster, the file no longer has what the
                renderer replaces, or the server did not start.
        """
        if cluster not in self.clusters or cluster == CORE_CLUSTER:
            raise ConfigError(f"sites attach to a region's cluster, not {cluster!r}")
        return start_deploy_leaf(
            workdir,
            self.leafnode_ports[cluster],
            server_tls=server_tls,
            client_cert=client_cert,
            seed=seed,
            template=template,
            startup_timeout_s=startup_timeout_s,
        )

    @property
    def nodes(self) -> list[NatsServerProcess]:
        """Every node, cluster by cluster."""
        return [node for nodes in self.clusters.values() for node in nodes]

    def urls(self, cluster: str) -> list[str]:
        """The client URLs of ``cluster``'s nodes, for a daemon's ``[nats] servers``."""
        return [node.url for node in self.clusters[cluster]]

    def monitoring_urls(self, cluster: str | None = None) -> list[str]:
        """The monitoring base URLs of ``cluster``'s nodes (every node's when None)."""
        nodes = self.nodes if cluster is None else self.clusters[cluster]
        return [node.monitoring_url for node in nodes]

    def node_named(self, server_name: str) -> NatsServerProcess:
        """The node whose ``server_name`` this is.

        Raises:
            ConfigError: no node has that name.
        """
        for node in self.nodes:
            if node.server_name == server_name:
                return node
        raise ConfigError(f"no node of this supercluster is named {server_name!r}")

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Wait until the running nodes form one whole supercluster (see the module docstring).

        Returns:
            the seconds it took.

        Raises:
            ConfigError: not whole within ``timeout_s`` (quotes the first node's
                log and what was missing).
        """
        started = time.monotonic()
        deadline = started + timeout_s
        delay_s = 0.01
        while (missing := self._missing()) is not None:
            if time.monotonic() > deadline:
                self.nodes[0]._fail(f"supercluster not whole within {timeout_s} s: {missing}")
            time.sleep(delay_s)  # the servers give no readiness signal to wait on
            delay_s = min(delay_s * 2, 0.2)
        return time.monotonic() - started

    def _missing(self) -> str | None:
        """What keeps the running nodes from being one whole supercluster now, or None."""
        running = {
            name: [node for node in nodes if node.running] for name, nodes in self.clusters.items()
        }
        live_clusters = {name for name, nodes in running.items() if nodes}
        leaders: set[str] = set()
        for name, nodes in running.items():
            for node in nodes:
                try:
                    health = _read_json(f"{node.monitoring_url}/healthz", 1.0)
                    jsz = _read_json(f"{node.monitoring_url}/jsz", 1.0)
                    gatewayz = _read_json(f"{node.monitoring_url}/gatewayz", 1.0)
                except (OSError, ValueError) as exc:
                    return f"{node.server_name} does not answer ({exc})"
                if not (
                    isinstance(health, dict)
                    and isinstance(jsz, dict)
                    and isinstance(gatewayz, dict)
                ):
                    return f"{node.server_name} answers no JSON object"
                if health.get("status") != "ok":
                    return f"{node.server_name} is not healthy ({health})"
                outbound = set(gatewayz.get("outbound_gateways") or {})
                if not live_clusters - {name} <= outbound:
                    return f"{node.server_name} has gateways to {sorted(outbound)} only"
                leader = (jsz.get("meta_cluster") or {}).get("leader")
                if not leader:
                    return f"{node.server_name} knows no meta leader"
                leaders.add(str(leader))
        names = {node.server_name for nodes in running.values() for node in nodes}
        if len(leaders) != 1 or not leaders <= names:
            # A killed leader is still named by the others until they elect anew.
            return f"the nodes name the meta leaders {sorted(leaders)}"
        return self._meta_group_missing(leaders.pop(), names)

    def _meta_group_missing(self, leader: str, running: set[str]) -> str | None:
        node = self.node_named(leader)
        try:
            jsz = _read_json(f"{node.monitoring_url}/jsz", 1.0)
        except (OSError, ValueError) as exc:
            return f"the meta leader {leader} does not answer ({exc})"
        meta = (jsz.get("meta_cluster") or {}) if isinstance(jsz, dict) else {}
        current = {leader} | {
            str(peer.get("name")) for peer in meta.get("replicas") or [] if peer.get("current")
        }
        if not running <= current:
            return f"the meta group counts {sorted(current)} as current, not {sorted(running)}"
        return None

    def kill(self, server_name: str) -> None:
        """Kill the node named ``server_name`` with SIGKILL (a lost machine's process)."""
        self.node_named(server_name).kill()

    def restart(self, server_name: str) -> None:
        """Start the node named ``server_name`` again on its ports and store."""
        self.node_named(server_name).restart()

    def kill_all(self) -> None:
        """Kill every node (SIGKILL) and reap it."""
        for node in self.nodes:
            node.kill()

    def stop(self) -> None:
        """Stop every node gracefully."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsSuperclusterProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
