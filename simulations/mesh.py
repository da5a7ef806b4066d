"""A whole fedtier mesh on one machine as real processes: plan, files, start, ordered stop.

Imports protocol, client (the model, to write version 0), tiers (nothing at
run time: daemons are separate processes) and the simulations helpers; the
demo and the integration tests build on it. Never imports a NATS client: the
parent process talks only to Mosquitto, through the MQTT bus.

``prepare_mesh(spec, workdir, out_dir, brokers)`` writes everything a run
needs under ``workdir``: every Ed25519 key (``SigningIdentity.generate()``,
saved 0600), the key registries each tier reads, version 0 of the model
(``make_mlp`` weights as ``.npz`` in state-dict order), the digits shards of
every device, and the TOML configs of the central, regional and edge daemons
and of one fleet process per site. Run artefacts (span files, device logs,
process logs) go under ``out_dir``.

``open_brokers(workdir)`` runs one Mosquitto and one nats-server on free
loopback ports. One Mosquitto serves every site (topics carry the site,
``ft/<fleet>/<site>/...``): a broker per site would be the deployment shape,
but on two cores each extra broker only costs CPU and start time, and
nothing in the daemons or devices depends on sharing it.

``open_mesh(plan, brokers)`` starts the central, waits until it serves
version 0, starts regionals and edges together and waits until they serve;
``RunningMesh.start_fleets`` starts the fleet processes. Leaving the block
stops everything in order: fleets, edges (they flush their open buffers
upstream), regionals, central, each with SIGTERM and a SIGKILL deadline.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import trio

from fedtier.protocol.errors import ConfigError, FedtierError
from fedtier.protocol.files import save_public_key, save_signing_identity
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.telemetry.tracing import requested_exporters
from fedtier.simulations.datasets import (
    NUM_CLASSES,
    NUM_FEATURES,
    DigitsSplit,
    dirichlet_partition,
    load_digits_split,
    write_shards,
)
from fedtier.simulations.fleet import KIND_NAMES, KindName, SendSpec, TrainingSpec
from fedtier.simulations.processes import Child, ProcessGroup, open_process_group
from fedtier.simulations.testing import (
    MALLOC_ENV,
    CertFiles,
    MosquittoProcess,
    MosquittoTls,
    NatsClusterProcess,
    NatsServerProcess,
    NatsTls,
    TestPki,
    mosquitto_acl,
)
from fedtier.simulations.testing._ports import free_port

if TYPE_CHECKING:
    from fedtier.protocol.bus.mqtt import MqttConfig

__all__ = [
    "Brokers",
    "FlushSpec",
    "KindProfile",
    "MeshPlan",
    "MeshSpec",
    "Routes",
    "RunningMesh",
    "new_identity",
    "open_brokers",
    "open_mesh",
    "prepare_mesh",
    "toml_value",
    "write_registry",
    "write_toml",
]

# The daemons' log line once their input is open (tiers.tier.TierDaemon.serve).
_SERVING: Final = r"serving \(epoch \d+, model v\d+\)"
_LOOPBACK: Final = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class FlushSpec:
    """One tier's flush policy: at ``max_inputs`` inputs or when the oldest is ``max_age_s`` old."""

    max_inputs: int
    max_age_s: float


@dataclass(frozen=True, slots=True)
class KindProfile:
    """How one kind of device is simulated, relative to the fleet's base interval ``T``.

    Attributes:
        share: fraction of the fleet of this kind.
        volume: relative amount of local data (the Dirichlet split's weight).
        interval: time between two trainings, in units of ``T``.
        delay_median: median extra compute delay (log-normal), in units of ``T``.
        delay_sigma: log-space sigma of that delay.
        online_mean: mean online period in units of ``T``; None: always online.
        offline_mean: mean offline period in units of ``T``.
    """

    share: float
    volume: float
    interval: float
    delay_median: float = 0.0
    delay_sigma: float = 0.0
    online_mean: float | None = None
    offline_mean: float = 0.0

    @property
    def availability(self) -> float:
        """Expected fraction of time online."""
        if self.online_mean is None:
            return 1.0
        return self.online_mean / (self.online_mean + self.offline_mean)


DEFAULT_KINDS: Final[Mapping[KindName, KindProfile]] = {
    # Vehicles: most data, fast, away a quarter of the time.
    "vehicle": KindProfile(share=0.35, volume=3.0, interval=0.8, online_mean=3.0, offline_mean=1.0),
    # Factory machines: medium data, slow hardware (a log-normal extra delay), always on.
    "factory": KindProfile(
        share=0.30, volume=1.5, interval=1.0, delay_median=0.25, delay_sigma=0.6
    ),
    # IoT gateways: little data, fast, almost always online.
    "iot": KindProfile(share=0.35, volume=0.5, interval=1.2, online_mean=10.0, offline_mean=0.3),
}


@dataclass(frozen=True, slots=True)
class MeshSpec:
    """The shape and tuning of a simulated mesh.

    Attributes:
        fleet: the fleet token.
        regions: region token -> its site tokens (one edge daemon per site).
        devices: devices in total, spread over the sites.
        seed: seeds keys' order, data split, device behaviour.
        updates_per_s: the device update rate the whole fleet aims at; it sets
            the base interval ``T`` of every device.
        misbehaving: devices that now and then publish a malformed or badly
            signed update.
        misbehave_every_s: mean time between two such updates of one device.
        edge_flush: edge flush policy.
        regional_flush: regional flush policy.
        central_flush: central flush policy (inputs per model version).
        max_staleness: staleness bound at every tier.
        partial_max_staleness: the regionals' and the central's bound, when it
            differs (partials past it are folded as late, never refused).
        server_lr: the central's FedAvg server learning rate.
        max_norm: edge L2 clip bound of an update.
        training: device model and SGD settings.
        send: device encoding and delivery.
        kinds: device kind profiles.
        dirichlet_alpha: label skew of the data split.
        shutdown_timeout_s: daemons' clean-shutdown budget.
        model_seed: seed of version 0's weights.
        standalone_devices: this many devices (the first ones of the plan)
            get their own ``fedtier device`` config instead of a fleet slot.
        standalone_rounds: updates each standalone device delivers before it
            exits; each waits for a newer model than the last it trained on.
        fleet_duration_s: fleets stop by themselves after this long, a bound
            in case their parent cannot stop them; None: only when told.
        commit_window_ms: every daemon's grouped-commit window.
        edge_keepalive_s: the edges' MQTT keepalive.
        ack_wait_s: JetStream redelivery delay of the regional and central
            consumers; None keeps the daemons' default.
        edge_validation: more ``[validation]`` keys for every edge (its bounds
            on one device's influence: ``rate_per_s``, ``max_updates_per_version``,
            ...); empty keeps the edges' defaults.
        standbys: two instances of every edge site, region and central, with
            ``[lease]`` on: the plan's ``standby_configs`` hold the second ones
            (each with its own state directory and, edges and regionals, its
            own identity key in the registry its readers use).
        lease_ttl_s: ``[lease] ttl_s`` of every instance, with ``standbys``.
        edge_standbys: with ``standbys``, a second edge per site too; False
            keeps one edge per site (still with ``[lease]``).
    """

    fleet: str = "demo"
    regions: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("north", ("harbour", "plant")),
        ("south", ("depot", "farm")),
    )
    devices: int = 240
    seed: int = 0
    updates_per_s: float = 15.0
    misbehaving: int = 4
    misbehave_every_s: float = 20.0
    edge_flush: FlushSpec = FlushSpec(8, 1.0)
    regional_flush: FlushSpec = FlushSpec(2, 1.0)
    central_flush: FlushSpec = FlushSpec(2, 1.0)
    max_staleness: int = 16
    partial_max_staleness: int | None = None
    server_lr: float = 1.0
    max_norm: float = 100.0
    training: TrainingSpec = field(default_factory=TrainingSpec)
    send: SendSpec = field(default_factory=SendSpec)
    kinds: Mapping[KindName, KindProfile] = field(default_factory=lambda: dict(DEFAULT_KINDS))
    dirichlet_alpha: float = 0.5
    shutdown_timeout_s: float = 5.0
    model_seed: int = 0
    standalone_devices: int = 0
    standalone_rounds: int = 2
    fleet_duration_s: float | None = None
    commit_window_ms: float = 2.0
    edge_keepalive_s: int = 60
    ack_wait_s: float | None = None
    edge_validation: Mapping[str, object] = field(default_factory=dict)
    standbys: bool = False
    lease_ttl_s: float = 6.0
    edge_standbys: bool = True

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site, region by region."""
        return tuple(site for _, sites in self.regions for site in sites)

    def base_interval_s(self) -> float:
        """``T``: the interval unit that makes the fleet send ``updates_per_s``."""
        rate_per_t = sum(
            self.devices * p.share * p.availability / (p.interval + p.delay_median)
            for p in self.kinds.values()
        )
        return rate_per_t / self.updates_per_s


@dataclass(frozen=True, slots=True)
class Routes:
    """Where edges and devices reach the brokers when something (a proxy) sits in between.

    Attributes:
        edge_nats_url: the NATS URL of the edges; None: the server's own.
        device_mqtt_port: the port devices connect to on the Mosquitto host;
            None: the broker's own.
        edge_nats_urls: every NATS URL of the edges when there are several
            (a proxy per cluster node); takes precedence over ``edge_nats_url``.
    """

    edge_nats_url: str | None = None
    device_mqtt_port: int | None = None
    edge_nats_urls: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Brokers:
    """The running Mosquitto and nats-server of a run.

    Attributes:
        mosquitto: the MQTT broker; devices connect to its ``port``, edges
            and lab observers to its ``tier_port`` (the same port without TLS).
        nats: the NATS server.
        pki: with TLS, the run's throwaway CA that signed the brokers'
            certificates and signs every device's and every NATS client's
            (None: plain listeners).
        tier_pki: with TLS, the CA of the MQTT tier listener: it signs the
            edges' and lab observers' MQTT certificates, so a device
            certificate cannot connect there (None: ``pki`` signs them too).
        nats_cluster: a NATS cluster the daemons use instead of one server
            (``nats`` is then its first node): every node's URL and
            monitoring URL go into the configs, and streams, KV buckets and
            object stores get one copy per node.
    """

    mosquitto: MosquittoProcess
    nats: NatsServerProcess
    pki: TestPki | None = None
    tier_pki: TestPki | None = None
    nats_cluster: NatsClusterProcess | None = None

    @property
    def nats_urls(self) -> tuple[str, ...]:
        """Every NATS server's client URL."""
        if self.nats_cluster is not None:
            return tuple(self.nats_cluster.urls)
        return (self.nats.url,)

    def client_cert(self, common_name: str) -> CertFiles:
        """Issue a client certificate for ``common_name`` (a device's key id, a daemon's name).

        Raises:
            ConfigError: the brokers run without TLS.
        """
        if self.pki is None:
            raise ConfigError("the brokers of this run have no TLS; there is no CA to issue from")
        return self.pki.issue_client(common_name)

    def tier_cert(self, common_name: str) -> CertFiles:
        """Issue a certificate for the MQTT tier listener (an edge, a lab observer).

        Raises:
            ConfigError: the brokers run without TLS.
        """
        if self.tier_pki is None:
            return self.client_cert(common_name)
        return self.tier_pki.issue_client(common_name)

    def tls_files(
        self, common_name: str, *, device_spelling: bool = False, mqtt_tier: bool = False
    ) -> dict[str, object]:
        """The ``[mqtt]``/``[nats]`` TLS keys of a client named ``common_name``; empty without TLS.

        Daemons spell them ``tls_ca_file``...; device and fleet files
        ``ca_file``... (``device_spelling``). ``mqtt_tier``: a certificate for
        the MQTT tier listener (an edge's ``[mqtt]``); the CA that verifies the
        broker stays ``pki``'s.
        """
        if self.pki is None:
            return {}
        cert = self.tier_cert(common_name) if mqtt_tier else self.client_cert(common_name)
        prefix = "" if device_spelling else "tls_"
        return {
            f"{prefix}ca_file": self.pki.ca_file,
            f"{prefix}cert_file": cert.cert_file,
            f"{prefix}key_file": cert.key_file,
        }


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    """One planned device."""

    name: str
    kind: KindName
    site: str
    key_id: str
    n_examples: int


@dataclass(frozen=True, slots=True)
class MeshPlan:
    """Everything ``prepare_mesh`` wrote and what a run needs to know about it.

    Attributes:
        spec: the mesh spec.
        workdir: keys, configs, data, state (temporary).
        out_dir: run artefacts.
        trace_dir: span files of every process.
        device_log_dir: device logs (written when fleets stop).
        log_dir: process logs.
        central_key_file: the central's public key (PEM).
        central_key_id: its key id.
        central_config, regional_configs, edge_configs, fleet_configs: config
            files, by region / site for the middle tiers and fleets.
        standby_configs: with ``MeshSpec.standbys``, the second instance of
            each: process name (``central-b``, ``regional-<region>-b``,
            ``edge-<site>-b``) -> (tier, config file); empty otherwise.
        state_dirs: daemon process name -> its state directory.
        device_configs: ``fedtier device`` config per standalone device name.
        prometheus_ports: daemon name -> its /metrics port.
        mqtt_host, mqtt_port: the (single) Mosquitto, its device listener.
        mqtt_tier_port: its tier listener (edges, lab observers).
        brokers: the brokers (their CA, when they run TLS).
        devices: the planned devices.
        split: the data; ``X_test``/``y_test`` are the held-out set.
        initial_model: version 0's ``.npz``.
        base_interval_s: ``T`` of the fleet.
    """

    spec: MeshSpec
    workdir: Path
    out_dir: Path
    trace_dir: Path
    device_log_dir: Path
    log_dir: Path
    central_key_file: Path
    central_key_id: str
    central_config: Path
    regional_configs: Mapping[str, Path]
    edge_configs: Mapping[str, Path]
    fleet_configs: Mapping[str, Path]
    device_configs: Mapping[str, Path]
    prometheus_ports: Mapping[str, int]
    mqtt_host: str
    mqtt_port: int
    mqtt_tier_port: int
    brokers: Brokers
    devices: tuple[DeviceEntry, ...]
    split: DigitsSplit
    initial_model: Path
    base_interval_s: float
    standby_configs: Mapping[str, tuple[str, Path]] = field(default_factory=dict)
    state_dirs: Mapping[str, Path] = field(default_factory=dict)

    def mqtt_config(self, client_id: str, common_name: str) -> MqttConfig:
        """An MQTT client of the run; with TLS, with a certificate whose CN is ``common_name``.

        The CN is the user name the broker's ACL applies: a device's key id,
        or :data:`LAB_OBSERVER` for a lab process that watches receipts and models.
        A device gets one connection on the device listener, where the broker
        replaces ``client_id`` by its key id; the observer two on the tier
        listener, with a certificate of the tier CA.
        """
        from fedtier.protocol.bus.mqtt import MqttConfig

        pki = self.brokers.pki
        tier = common_name == LAB_OBSERVER
        cert = None
        if pki is not None:
            issue = self.brokers.tier_cert if tier else self.brokers.client_cert
            cert = issue(common_name)
        return MqttConfig(
            host=self.mqtt_host,
            port=self.mqtt_tier_port if tier else self.mqtt_port,
            client_id=client_id,
            keepalive_s=60,
            ca_file=None if pki is None else pki.ca_file,
            cert_file=None if cert is None else cert.cert_file,
            key_file=None if cert is None else cert.key_file,
            single_connection=not tier,
        )

    @property
    def edge_metrics_urls(self) -> dict[str, str]:
        """Edge name -> its Prometheus ``/metrics`` URL."""
        return {
            name: f"http://{_LOOPBACK}:{port}/metrics"
            for name, port in self.prometheus_ports.items()
            if name.startswith("edge-")
        }


# -- files ----------------------------------------------------------------------------


def parse_regions(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``r1:s1+s2,r2:s3`` -> ``(("r1", ("s1", "s2")), ("r2", ("s3",)))``: a mesh's regions.

    The ``--regions`` option of the lab's commands (``sim chaos``, ``sim attack``).

    Raises:
        FedtierError: a part that is not ``REGION:SITE+SITE``.
    """
    regions = []
    for part in text.split(","):
        region, _, sites = part.partition(":")
        if not region or not sites:
            raise FedtierError(f"--regions part {part!r} is not REGION:SITE+SITE")
        regions.append((region, tuple(sites.split("+"))))
    return tuple(regions)


def _free_port() -> int:
    # Still racy (free now, bound later by a child), but below the ephemeral
    # range, where no outgoing connection can take it meanwhile.
    return free_port(_LOOPBACK)


def toml_value(value: object) -> str:
    """``value`` (bool, number, string, path or a list of them) as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def write_toml(path: Path, header: str, body: Mapping[str, object]) -> Path:
    """Write a TOML file from a dict of scalars and one level of tables (and arrays of tables)."""
    lines = [f"# {header}"]
    tables: list[tuple[str, object]] = []
    for key, value in body.items():
        if isinstance(value, Mapping) or (
            isinstance(value, list) and value and isinstance(value[0], Mapping)
        ):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {toml_value(value)}")
    for key, value in tables:
        if isinstance(value, Mapping):
            nested = [(k, v) for k, v in value.items() if isinstance(v, Mapping)]
            lines.append(f"\n[{key}]")
            lines.extend(
                f"{k} = {toml_value(v)}" for k, v in value.items() if not isinstance(v, Mapping)
            )
            for sub, sub_value in nested:
                assert isinstance(sub_value, Mapping)
                lines.append(f"\n[{key}.{sub}]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in sub_value.items())
        else:
            assert isinstance(value, list)
            for item in value:
                lines.append(f"\n[[{key}]]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def new_identity(keys_dir: Path, name: str) -> SigningIdentity:
    """A fresh signing identity, saved as ``name.key`` (0600) and ``name.pub`` in ``keys_dir``."""
    identity = SigningIdentity.generate()
    save_signing_identity(identity, keys_dir / f"{name}.key")
    save_public_key(identity.verify_key, keys_dir / f"{name}.pub")
    return identity


def write_registry(path: Path, members: Mapping[str, SigningIdentity]) -> Path:
    """A key registry file (``[keys]``: name = public key hex) of ``members``; returns ``path``."""
    lines = ["# Written by simulations.mesh: name = public key (hex).", "[keys]"]
    lines.extend(
        f"{json.dumps(name)} = {json.dumps(i.verify_key.raw.hex())}" for name, i in members.items()
    )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_initial_model(path: Path, hidden: int, seed: int) -> None:
    from fedtier.client.torch_trainer import make_mlp

    model = make_mlp(NUM_FEATURES, hidden, NUM_CLASSES, seed=seed)
    arrays = {name: t.detach().numpy().astype(np.float32) for name, t in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keyword order is the archive order, which is the layout order.
    np.savez(path, **arrays)


def _device_cert(brokers: Brokers, key_id: str) -> dict[str, object]:
    """A fleet file's per-device ``cert_file``/``key_file`` (CN = the key id); empty without TLS."""
    if brokers.pki is None:
        return {}
    cert = brokers.client_cert(key_id)
    return {"cert_file": cert.cert_file, "key_file": cert.key_file}


def _assign_kinds(spec: MeshSpec) -> list[KindName]:
    """Kinds of devices 0..N-1: shares rounded by largest remainder, interleaved."""
    names = [k for k in KIND_NAMES if k in spec.kinds]
    exact = [spec.devices * spec.kinds[k].share for k in names]
    total_share = sum(spec.kinds[k].share for k in names)
    exact = [e / total_share for e in exact]
    counts = [int(e) for e in exact]
    for i in sorted(range(len(names)), key=lambda i: counts[i] - exact[i])[
        : spec.devices - sum(counts)
    ]:
        counts[i] += 1
    # Interleave so that round-robin site assignment gives every site a mix.
    kinds: list[KindName] = []
    left = dict(zip(names, counts, strict=True))
    while len(kinds) < spec.devices:
        for name in names:
            if left[name] > 0:
                kinds.append(name)
                left[name] -= 1
    return kinds


_PREFIX: Final[Mapping[str, str]] = {"vehicle": "veh", "factory": "fac", "iot": "iot"}


def prepare_mesh(
    spec: MeshSpec,
    workdir: Path,
    out_dir: Path,
    brokers: Brokers,
    *,
    routes: Routes | None = None,
) -> MeshPlan:
    """Write keys, registries, model, data and configs for ``spec``; returns the plan.

    Synchronous and CPU-light (a second or so for 240 devices); call it from
    trio through ``trio.to_thread.run_sync``. ``routes`` sends edges and
    devices through other addresses (the chaos suite's proxies).

    Raises:
        ConfigError: the spec cannot be met (too many devices for the data,
            an invalid name).
    """
    if spec.devices - spec.standalone_devices < len(spec.sites):
        raise ConfigError(
            f"{spec.devices - spec.standalone_devices} fleet devices cannot cover "
            f"{len(spec.sites)} sites"
        )
    workdir = workdir.resolve()
    out_dir = out_dir.resolve()
    keys_dir = workdir / "keys"
    (keys_dir / "devices").mkdir(parents=True, exist_ok=True)
    config_dir = workdir / "config"
    state_dir = workdir / "state"
    trace_dir = out_dir / "traces"
    device_log_dir = out_dir / "devices"
    log_dir = out_dir / "logs"
    base_t = spec.base_interval_s()

    central = new_identity(keys_dir, "central")
    regionals = {region: new_identity(keys_dir, f"regional-{region}") for region, _ in spec.regions}
    edges = {site: new_identity(keys_dir, f"edge-{site}") for site in spec.sites}
    # A standby instance has an identity of its own (docs/operations.md, "Run a
    # standby"), listed beside the first one's; the central's is the fleet's one key.
    second = "-b"
    edge_pairs = spec.standbys and spec.edge_standbys
    standby_edges = (
        {site: new_identity(keys_dir, f"edge-{site}{second}") for site in spec.sites}
        if edge_pairs
        else {}
    )
    standby_regionals = (
        {r: new_identity(keys_dir, f"regional-{r}{second}") for r, _ in spec.regions}
        if spec.standbys
        else {}
    )

    kinds = _assign_kinds(spec)
    names: list[str] = []
    counters: dict[str, int] = {}
    for kind in kinds:
        counters[kind] = counters.get(kind, 0) + 1
        names.append(f"{_PREFIX[kind]}-{counters[kind]:04d}")
    device_ids = {name: new_identity(keys_dir / "devices", name) for name in names}
    sites = [spec.sites[i % len(spec.sites)] for i in range(spec.devices)]

    split = load_digits_split(seed=spec.seed)
    shards = dirichlet_partition(
        split.y_train,
        [spec.kinds[k].volume for k in kinds],
        alpha=spec.dirichlet_alpha,
        seed=spec.seed,
    )
    data_paths = [workdir / "data" / f"{name}.npz" for name in names]
    write_shards(split, shards, data_paths)
    initial_model = workdir / "model" / "initial.npz"
    _write_initial_model(initial_model, spec.training.hidden, spec.model_seed)

    registries = {
        site: write_registry(
            keys_dir / f"devices-{site}.toml",
            {n: device_ids[n] for n, s in zip(names, sites, strict=True) if s == site},
        )
        for site in spec.sites
    }
    edge_registries = {
        region: write_registry(
            keys_dir / f"edges-{region}.toml",
            {f"edge-{s}": edges[s] for s in region_sites}
            | {f"edge-{s}{second}": standby_edges[s] for s in region_sites if standby_edges},
        )
        for region, region_sites in spec.regions
    }
    regional_registry = write_registry(
        keys_dir / "regionals.toml",
        {f"regional-{r}": i for r, i in regionals.items()}
        | {f"regional-{r}{second}": i for r, i in standby_regionals.items()},
    )
    central_pub = keys_dir / "central.pub"

    mosquitto, nats = brokers.mosquitto, brokers.nats
    routes = routes or Routes()
    device_mqtt_port = routes.device_mqtt_port or mosquitto.port
    daemon_names = (
        ["central"] + [f"regional-{r}" for r, _ in spec.regions] + [f"edge-{s}" for s in spec.sites]
    )
    instance_names = daemon_names + [
        f"{n}{second}"
        for n in daemon_names
        if spec.standbys and (edge_pairs or not n.startswith("edge-"))
    ]
    ports = {name: _free_port() for name in instance_names}
    cluster = brokers.nats_cluster

    def common(
        name: str,
        flush: FlushSpec,
        senders: Sequence[Path],
        nats_urls: Sequence[str] = brokers.nats_urls,
        *,
        instance: str = "",
    ) -> dict[str, object]:
        # ``instance``: the second instance's suffix; the key of the central is one.
        process = name + instance
        key = name if name == "central" else process
        monitoring = (
            {"monitoring_urls": cluster.monitoring_urls}
            if cluster is not None
            else {"monitoring_url": nats.monitoring_url}
        )
        return {
            "fleet": spec.fleet,
            "identity_key": keys_dir / f"{key}.key",
            "state_dir": state_dir / process,
            "intake_capacity": 64,
            "shutdown_timeout_s": spec.shutdown_timeout_s,
            "keys": {"senders": [str(p) for p in senders], "central": central_pub},
            "nats": {
                "servers": list(nats_urls),
                **brokers.tls_files(f"nats-{process}"),
                **monitoring,
                "require_sync_always": True,
                **({} if cluster is None else {"replicas": len(cluster.nodes)}),
                **({} if spec.ack_wait_s is None else {"ack_wait_s": spec.ack_wait_s}),
            },
            **(
                {"lease": {"enabled": True, "ttl_s": spec.lease_ttl_s, "instance": process}}
                if spec.standbys
                else {}
            ),
            "flush": {"max_inputs": flush.max_inputs, "max_age_s": flush.max_age_s},
            "staleness": {
                "kind": "fedbuff",
                "max_staleness": (
                    spec.max_staleness
                    if name.startswith("edge-") or spec.partial_max_staleness is None
                    else spec.partial_max_staleness
                ),
            },
            "store": {"commit_window_ms": spec.commit_window_ms},
            "retry": {"initial_backoff_s": 0.1, "max_backoff_s": 2.0},
            "telemetry": {"jsonl_dir": trace_dir, "prometheus_port": ports[process]},
        }

    header = "Written by simulations.mesh for one run; see deploy/*.example.toml."
    region_of = {site: region for region, region_sites in spec.regions for site in region_sites}
    edge_urls = routes.edge_nats_urls or (
        (routes.edge_nats_url,) if routes.edge_nats_url else brokers.nats_urls
    )

    def central_file(instance: str) -> Path:
        return write_toml(
            config_dir / f"central{instance}.toml",
            header,
            {
                **common("central", spec.central_flush, [regional_registry], instance=instance),
                "model": {"initial": initial_model},
                "optimizer": {"name": "fedavg", "lr": spec.server_lr},
            },
        )

    def regional_file(region: str, instance: str) -> Path:
        return write_toml(
            config_dir / f"regional-{region}{instance}.toml",
            header,
            {
                "region": region,
                **common(
                    f"regional-{region}",
                    spec.regional_flush,
                    [edge_registries[region]],
                    instance=instance,
                ),
                "partial": {"codec": "f32"},
            },
        )

    def edge_file(site: str, instance: str) -> Path:
        return write_toml(
            config_dir / f"edge-{site}{instance}.toml",
            header,
            {
                "site": site,
                "region": region_of[site],
                **common(
                    f"edge-{site}",
                    spec.edge_flush,
                    [registries[site]],
                    edge_urls,
                    instance=instance,
                ),
                "mqtt": {
                    "host": mosquitto.host,
                    "port": mosquitto.tier_port,
                    "client_id": f"edge-{site}{instance}",
                    "keepalive_s": spec.edge_keepalive_s,
                    "session_expiry_s": 600,
                    **brokers.tls_files(f"edge-{site}{instance}", mqtt_tier=True),
                },
                "validation": {
                    "max_norm": spec.max_norm,
                    "norm_policy": "clip",
                    **spec.edge_validation,
                },
                "partial": {"codec": "f32"},
            },
        )

    central_config = central_file("")
    regional_configs = {region: regional_file(region, "") for region, _ in spec.regions}
    edge_configs = {site: edge_file(site, "") for site in spec.sites}
    standby_configs: dict[str, tuple[str, Path]] = {}
    if spec.standbys:
        standby_configs[f"central{second}"] = ("central", central_file(second))
        for region, _ in spec.regions:
            standby_configs[f"regional-{region}{second}"] = (
                "regional",
                regional_file(region, second),
            )
        for site in spec.sites if edge_pairs else ():
            standby_configs[f"edge-{site}{second}"] = ("edge", edge_file(site, second))
    edge_keys = {
        site: [keys_dir / f"edge-{site}.pub"]
        + ([keys_dir / f"edge-{site}{second}.pub"] if edge_pairs else [])
        for site in spec.sites
    }

    rogue = _pick_rogues(spec, kinds, sites)
    standalone = range(spec.standalone_devices)
    device_configs = {
        names[i]: write_toml(
            config_dir / f"device-{names[i]}.toml",
            header,
            {
                "device": {
                    "fleet": spec.fleet,
                    "site": sites[i],
                    "identity_key": keys_dir / "devices" / f"{names[i]}.key",
                    "outbox": state_dir / names[i] / "outbox.sqlite",
                    "model_cache": state_dir / names[i] / "model.blob",
                    "data": data_paths[i],
                },
                "central": {"public_key": central_pub},
                "edges": {"public_keys": edge_keys[sites[i]]},
                "mqtt": {
                    "host": mosquitto.host,
                    "port": device_mqtt_port,
                    "keepalive_s": 60,
                    **brokers.tls_files(device_ids[names[i]].key_id, device_spelling=True),
                },
                "send": {
                    "codec": spec.send.codec,
                    "receipt_timeout_s": spec.send.receipt_timeout_s,
                    "max_attempts": spec.send.max_attempts,
                },
                "schedule": {"rounds": spec.standalone_rounds, "wait_for_new_model": True},
                "training": {
                    "model": "mlp",
                    "num_classes": spec.training.num_classes,
                    "hidden": spec.training.hidden,
                    "epochs": spec.training.epochs,
                    "batch_size": spec.training.batch_size,
                    "lr": spec.training.lr,
                    "torch_threads": 1,
                },
            },
        )
        for i in standalone
    }
    fleet_configs: dict[str, Path] = {}
    for site in spec.sites:
        members = [i for i in range(spec.devices) if sites[i] == site and i not in standalone]
        fleet_configs[site] = write_toml(
            config_dir / f"fleet-{site}.toml",
            header,
            {
                "fleet": spec.fleet,
                "name": f"fleet-{site}",
                "seed": spec.seed * 1000 + spec.sites.index(site),
                "state_dir": state_dir / f"fleet-{site}",
                "log_dir": device_log_dir,
                "trace_dir": trace_dir,
                "start_spread_s": round(base_t, 3),
                **({} if spec.fleet_duration_s is None else {"duration_s": spec.fleet_duration_s}),
                "mqtt": {
                    "host": mosquitto.host,
                    "port": device_mqtt_port,
                    "keepalive_s": 60,
                    **({} if brokers.pki is None else {"ca_file": brokers.pki.ca_file}),
                },
                "central": {"public_key": central_pub},
                "send": {
                    "codec": spec.send.codec,
                    "error_feedback": spec.send.error_feedback,
                    "receipt_timeout_s": spec.send.receipt_timeout_s,
                    "max_attempts": spec.send.max_attempts,
                    "backoff_max_s": spec.send.backoff_max_s,
                    **({"unsafe_trust_puback": True} if spec.send.unsafe_trust_puback else {}),
                },
                "training": {
                    "epochs": spec.training.epochs,
                    "batch_size": spec.training.batch_size,
                    "lr": spec.training.lr,
                    "hidden": spec.training.hidden,
                    "num_classes": spec.training.num_classes,
                },
                "kinds": {
                    name: _kind_table(profile, base_t) for name, profile in spec.kinds.items()
                },
                "sites": {site: {"edge_keys": edge_keys[site]}},
                "devices": [
                    {
                        "name": names[i],
                        "kind": kinds[i],
                        "site": site,
                        "identity_key": keys_dir / "devices" / f"{names[i]}.key",
                        "data": data_paths[i],
                        **({"misbehave_every_s": spec.misbehave_every_s} if i in rogue else {}),
                        **_device_cert(brokers, device_ids[names[i]].key_id),
                    }
                    for i in members
                ],
            },
        )

    return MeshPlan(
        spec=spec,
        workdir=workdir,
        out_dir=out_dir,
        trace_dir=trace_dir,
        device_log_dir=device_log_dir,
        log_dir=log_dir,
        central_key_file=central_pub,
        central_key_id=central.key_id,
        central_config=central_config,
        regional_configs=regional_configs,
        edge_configs=edge_configs,
        fleet_configs=fleet_configs,
        device_configs=device_configs,
        prometheus_ports=ports,
        standby_configs=standby_configs,
        state_dirs={name: state_dir / name for name in instance_names},
        mqtt_host=mosquitto.host,
        mqtt_port=mosquitto.port,
        mqtt_tier_port=mosquitto.tier_port,
        brokers=brokers,
        devices=tuple(
            DeviceEntry(names[i], kinds[i], sites[i], device_ids[names[i]].key_id, len(shards[i]))
            for i in range(spec.devices)
        ),
        split=split,
        initial_model=initial_model,
        base_interval_s=base_t,
    )


def _pick_rogues(spec: MeshSpec, kinds: Sequence[KindName], sites: Sequence[str]) -> set[int]:
    """Indices of the misbehaving devices: IoT gateways first, spread over the sites."""
    order = sorted(range(spec.devices), key=lambda i: (kinds[i] != "iot", i))
    chosen: list[int] = []
    used_sites: set[str] = set()
    for i in order:  # one per site first
        if len(chosen) < spec.misbehaving and sites[i] not in used_sites:
            chosen.append(i)
            used_sites.add(sites[i])
    for i in order:
        if len(chosen) < spec.misbehaving and i not in chosen:
            chosen.append(i)
    return set(chosen)


def _kind_table(profile: KindProfile, base_t: float) -> dict[str, object]:
    interval = profile.interval * base_t
    table: dict[str, object] = {
        "min_interval_s": round(interval, 3),
        # Without a newer model for this long a device trains on the current one.
        "model_wait_s": round(2 * interval, 3),
    }
    if profile.delay_median > 0:
        table["delay_median_s"] = round(profile.delay_median * base_t, 3)
        table["delay_sigma"] = profile.delay_sigma
    if profile.online_mean is not None:
        table["online_mean_s"] = round(profile.online_mean * base_t, 3)
        table["offline_mean_s"] = round(profile.offline_mean * base_t, 3)
    return table


# -- running ------------------------------------------------------------------------


LAB_OBSERVER: Final = "lab-observer"
"""The MQTT user (certificate CN) of a lab process that watches receipts, with TLS.

The deployed ACL has no such user: a device reads only its own receipts. The
lab's observers (the attack suite's) get their own ``user`` block that may read
every receipt and model topic and write nothing, and connect on the tier
listener with a certificate of the tier CA (``MeshPlan.mqtt_config``).
"""


def _lab_acl(spec: MeshSpec) -> str:
    """``deploy/mosquitto/acl`` with a user block per edge of ``spec`` and the lab observer."""
    acl = mosquitto_acl([f"edge-{site}" for site in spec.sites])
    return (
        f"{acl}\n# Lab only (simulations.mesh): reads receipts and models, writes nothing.\n"
        f"user {LAB_OBSERVER}\ntopic read ft/+/+/receipt/+\ntopic read ft/+/+/model/#\n"
    )


def _start_tls_mosquitto(
    workdir: Path, pki: TestPki, tier_pki: TestPki, spec: MeshSpec
) -> MosquittoProcess:
    acl_file = workdir / "acl"
    workdir.mkdir(parents=True, exist_ok=True)
    acl_file.write_text(_lab_acl(spec))
    server = pki.issue_server("mosquitto")
    tls = MosquittoTls(
        pki.ca_file, server.cert_file, server.key_file, acl_file, tier_ca_file=tier_pki.ca_file
    )
    return MosquittoProcess.start(workdir / "broker", tls=tls)


def _start_tls_nats(workdir: Path, pki: TestPki) -> NatsServerProcess:
    server = pki.issue_server("nats")
    return NatsServerProcess.start(
        workdir, tls=NatsTls(pki.ca_file, server.cert_file, server.key_file)
    )


@asynccontextmanager
async def open_brokers(workdir: Path, *, tls_for: MeshSpec | None = None) -> AsyncIterator[Brokers]:
    """Run Mosquitto and nats-server (JetStream, ``sync_interval: always``) under ``workdir``.

    With ``tls_for``, both run TLS listeners that require a client certificate
    from a CA made for the run (``Brokers.pki``): Mosquitto with the deployed
    listeners and ACL (``deploy/mosquitto/``: a device listener that binds
    the client id to the certificate, a tier listener for certificates of
    ``Brokers.tier_pki``; a user block per edge of that spec, plus the lab
    observer), nats-server with ``verify: true``. nats-server then
    runs without the deployed accounts and nkeys users: the per-role NATS
    permissions are exercised by ``tests/integration/test_transport_security.py``.
    Both are stopped (SIGTERM, then SIGKILL) when the block exits, cancellation
    included.

    Raises:
        ConfigError: a broker is missing or does not start.
    """
    pki = tier_pki = None
    if tls_for is not None:
        pki = await trio.to_thread.run_sync(TestPki.create, workdir / "pki")
        tier_pki = await trio.to_thread.run_sync(TestPki.create, workdir / "tier-pki")
    tls_pki, tls_tier_pki = pki, tier_pki
    spec = tls_for

    def start_mosquitto() -> MosquittoProcess:
        if tls_pki is None or tls_tier_pki is None or spec is None:
            return MosquittoProcess.start(workdir / "mosquitto")
        return _start_tls_mosquitto(workdir / "mosquitto", tls_pki, tls_tier_pki, spec)

    def start_nats() -> NatsServerProcess:
        if tls_pki is None:
            return NatsServerProcess.start(workdir / "nats")
        return _start_tls_nats(workdir / "nats", tls_pki)

    # to_thread without abandon: a start that is cancelled still returns its
    # handle, so the finally below always knows what to stop.
    mosquitto = await trio.to_thread.run_sync(start_mosquitto)
    try:
        nats = await trio.to_thread.run_sync(start_nats)
        try:
            yield Brokers(mosquitto, nats, pki, tier_pki)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(nats.stop)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(mosquitto.stop)


def lab_exporters(*, keep_jsonl: bool) -> str | None:
    """The ``OTEL_TRACES_EXPORTER`` of a lab child: what the user asked for, plus our copy.

    The user's ``OTEL_TRACES_EXPORTER``, or ``otlp`` when only an OTLP endpoint
    is set (Jaeger, Tempo, a collector), with ``jsonl`` added when
    ``keep_jsonl``: the run's own span files are what `fedtier trace` and the
    demo read, so they are written whatever else spans go to. ``None`` when
    that leaves nothing (the variable is then removed).

    Raises:
        ConfigError: the user's ``OTEL_TRACES_EXPORTER`` names an unknown exporter.
    """
    names = [name for name in requested_exporters() if name != "jsonl"]
    if keep_jsonl:
        names.append("jsonl")
    return ",".join(names) or None


def child_environment(trace_dir: Path | None = None) -> dict[str, str]:
    """The environment of daemons and fleets: ours plus the malloc tuning and span exporters.

    With a ``trace_dir`` every child writes its JSON-lines span file there and
    also exports to the user's OTLP endpoint when one is set (see
    :func:`lab_exporters`). ``OTEL_SDK_DISABLED`` is removed: the lab wants its
    spans even when the caller's shell turned tracing off.
    """
    env = {**os.environ, **MALLOC_ENV}
    if trace_dir is not None:
        exporters = lab_exporters(keep_jsonl=True)
        assert exporters is not None
        env["OTEL_TRACES_EXPORTER"] = exporters
    env.pop("OTEL_SDK_DISABLED", None)
    return env


@dataclass(eq=False)
class RunningMesh:
    """The daemons (and, once started, the fleets) of a run."""

    plan: MeshPlan
    group: ProcessGroup
    central: Child
    regionals: list[Child]
    edges: list[Child]
    fleets: list[Child] = field(default_factory=list)
    devices: list[Child] = field(default_factory=list)

    async def start_fleets(self, on_line: Callable[[str], None]) -> list[Child]:
        """Start one fleet process per site; ``on_line`` gets their stdout JSON lines."""
        for site, config in self.plan.fleet_configs.items():
            self.fleets.append(
                await self.group.start(
                    f"fleet-{site}",
                    [sys.executable, "-m", "fedtier.simulations.fleet", "--config", str(config)],
                    on_stdout_line=on_line,
                )
            )
        return self.fleets

    async def start_devices(self) -> list[Child]:
        """Start each standalone device as a ``fedtier device`` process.

        They exit by themselves after their rounds; that is not a failure.
        """
        for name, config in self.plan.device_configs.items():
            child = await self.group.start(
                f"device-{name}",
                [
                    sys.executable,
                    "-m",
                    "fedtier",
                    "device",
                    "--config",
                    str(config),
                ],
                # A single device has no trace directory of its own, so it
                # exports only where the user asked (OTLP) and keeps no copy:
                # jsonl without a directory would refuse to start.
                env={"OTEL_TRACES_EXPORTER": lab_exporters(keep_jsonl=False)},
            )
            child.stopping = True  # exiting after its rounds is its job
            self.devices.append(child)
        return self.devices

    def failed(self) -> Child | None:
        """A child that exited although nobody asked it to stop, if any."""
        for child in self.group.children:
            if child.exited.is_set() and not child.stopping:
                return child
        return None

    async def wait_failed(self) -> Child:
        """Wait until some child exits on its own; return it."""
        while True:
            child = self.failed()
            if child is not None:
                return child
            await self.group.changed()

    async def stop(self, *, grace_s: float) -> None:
        """Stop fleets, then edges, regionals and central, each tier after the one below."""
        for tier in (self.fleets + self.devices, self.edges, self.regionals, [self.central]):
            await self.group.stop(tier, grace_s=grace_s)


@asynccontextmanager
async def open_mesh(
    plan: MeshPlan, *, ready_timeout_s: float = 60.0, stop_grace_s: float = 15.0
) -> AsyncIterator[RunningMesh]:
    """Start the central, then regionals and edges; yield once all serve; stop them in order.

    Raises:
        ChildFailed: a daemon exited or was not serving within ``ready_timeout_s``.
    """
    env = child_environment(plan.trace_dir)

    def daemon(kind: str, config: Path) -> list[str]:
        return [sys.executable, "-m", "fedtier", kind, "--config", str(config)]

    async with open_process_group(plan.log_dir, env=env, stop_grace_s=stop_grace_s) as group:
        central = await group.start(
            "central", daemon("central", plan.central_config), ready_pattern=_SERVING
        )
        # Followers wait for version 0 in the registry anyway; starting them
        # after the central serves keeps their logs free of retries.
        await group.wait_ready([central], timeout_s=ready_timeout_s)
        regionals = [
            await group.start(f"regional-{r}", daemon("regional", p), ready_pattern=_SERVING)
            for r, p in plan.regional_configs.items()
        ]
        edges = [
            await group.start(f"edge-{s}", daemon("edge", p), ready_pattern=_SERVING)
            for s, p in plan.edge_configs.items()
        ]
        await group.wait_ready([*regionals, *edges], timeout_s=ready_timeout_s)
        mesh = RunningMesh(plan, group, central, regionals, edges)
        try:
            yield mesh
        finally:
            await mesh.stop(grace_s=stop_grace_s)
