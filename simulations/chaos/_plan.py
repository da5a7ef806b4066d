"""What a chaos run does: fault plan, options, seeded schedule; must not import trio or processes.

Pure data and arithmetic, so the schedule and the options are tested without a process.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from fedtier.protocol.errors import FedtierError
from fedtier.simulations.fleet import SendSpec, TrainingSpec
from fedtier.simulations.mesh import FlushSpec, MeshSpec
from fedtier.tiers.faults import UNSAFE_SWITCHES

DEVICE_UNSAFE_SWITCH: Final = "device_trust_puback"
ALL_UNSAFE: Final = frozenset(UNSAFE_SWITCHES | {DEVICE_UNSAFE_SWITCH})
TIERS: Final = ("edge", "regional", "central")


FAULT_KINDS: Final = (
    "kill_edge",
    "kill_regional",
    "kill_central",
    "kill_mosquitto",
    "kill_nats",
    "stop_edge",
    "stop_regional",
    "stop_central",
    "proxy_reset",
    "proxy_partition",
    "proxy_delay",
    "lose_edge",
    "lose_regional",
    "lose_central",
    "kill_nats_node",
)
HA_ONLY_KINDS: Final = frozenset({"lose_edge", "lose_regional", "lose_central", "kill_nats_node"})
TOPOLOGIES: Final = ("single", "ha")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """How many faults of each kind a run injects, and how hard each one is.

    Attributes:
        kill_edge, kill_regional, kill_central: kill -9 of a daemon of that tier.
        kill_mosquitto, kill_nats: kill -9 and restart of a broker.
        stop_edge, stop_regional, stop_central: SIGSTOP for ``stop_s``, then SIGCONT.
        proxy_reset, proxy_partition, proxy_delay: faults of a proxy.
        lose_edge, lose_regional, lose_central: (``ha`` only) the active
            instance's machine is lost: SIGKILL, its state directory deleted,
            and after a restart pause a replacement with an empty state
            directory joins as a standby.
        kill_nats_node: (``ha`` only) SIGKILL of one cluster node, restarted
            on its store after ``broker_down_s``.
        restart_delay_s: a killed daemon stays down a uniform draw from this range.
        broker_down_s: a killed broker stays down a uniform draw from this range.
        edge_stall_s: how long the edges are frozen before a Mosquitto kill.
        stop_s: SIGSTOP length; None: past the edge MQTT keepalive (1.5 x) and
            the JetStream ack wait, whichever is longer, plus a second.
        partition_s: length of a proxy partition.
        delay_s: per-chunk delay of a slow proxy, for ``delay_for_s``.
    """

    kill_edge: int = 0
    kill_regional: int = 0
    kill_central: int = 0
    kill_mosquitto: int = 0
    kill_nats: int = 0
    stop_edge: int = 0
    stop_regional: int = 0
    stop_central: int = 0
    proxy_reset: int = 0
    proxy_partition: int = 0
    proxy_delay: int = 0
    lose_edge: int = 0
    lose_regional: int = 0
    lose_central: int = 0
    kill_nats_node: int = 0
    restart_delay_s: tuple[float, float] = (0.2, 2.0)
    broker_down_s: tuple[float, float] = (0.5, 2.0)
    edge_stall_s: float = 2.0
    stop_s: float | None = None
    partition_s: float = 3.0
    delay_s: float = 0.2
    delay_for_s: float = 3.0

    @staticmethod
    def kinds() -> tuple[str, ...]:
        """The fault kinds, in the order summaries list them."""
        return FAULT_KINDS

    def count(self, kind: str) -> int:
        """How many faults of ``kind`` the plan holds."""
        value: int = getattr(self, kind)
        return value

    @property
    def total(self) -> int:
        """Faults in the plan."""
        return sum(self.count(kind) for kind in self.kinds())


@dataclass(frozen=True, slots=True)
class ChaosOptions:
    """A chaos run.

    Attributes:
        out_dir: artefacts: ``logs/``, ``devices/``, ``chaos.json``.
        devices: simulated devices, spread over the sites.
        regions: region -> its sites (one edge daemon per site).
        updates: the run phase lasts at least until devices sent this many updates.
        duration_s: the faults are spread over this long.
        max_run_s: bound on the run phase.
        drain_timeout_s: bound on the drain.
        seed: seeds keys, data, device behaviour and the fault schedule.
        faults: the fault plan.
        crash_at: ``FEDTIER_CRASH_AT`` for every daemon (``tiers.faults``).
        crash_once: each crash point fires at most once per daemon: a daemon
            restarted after one runs without that point.
        unsafe: safeties to turn off: ``tiers.faults`` switches and
            ``device_trust_puback`` (devices take the PUBACK for acceptance).
        updates_per_s: the rate the fleet aims at.
        flush: edge, regional and central flush policies.
        commit_window_ms: every daemon's grouped-commit window.
        ack_wait_s: JetStream redelivery delay of the regional and central consumers.
        edge_keepalive_s: the edges' MQTT keepalive.
        receipt_timeout_s: a device resends after this long without a receipt.
        mosquitto_autosave_s: seconds between Mosquitto's persistence saves.
        partial_max_staleness: the regionals' and the central's ``max_staleness``
            (partials later than it are folded as late); the edges keep 64.
        proxies: route edges -> NATS and devices -> Mosquitto through proxies.
        keep_workdir: keep keys, configs, stores and broker files.
        progress: called with a line every few seconds (None: quiet).
        topology: ``single`` (one instance per tier, one nats-server) or
            ``ha`` (leases on; two instances of every edge site, region and
            central; a 3-node NATS cluster with three copies of everything).
        lease_ttl_s: ``[lease] ttl_s`` in ``ha``: a takeover after a loss
            waits this long.
        edge_pairs: in ``ha``, two edges per site (False: one, with its
            lease). Edge pairs are not exactly-once yet: docs/chaos-results.md.
    """

    out_dir: Path
    devices: int = 12
    regions: tuple[tuple[str, tuple[str, ...]], ...] = (("r1", ("s1", "s2")),)
    updates: int = 150
    duration_s: float = 20.0
    max_run_s: float = 900.0
    drain_timeout_s: float = 90.0
    seed: int = 0
    faults: FaultPlan = field(default_factory=FaultPlan)
    crash_at: str = ""
    crash_once: bool = False
    unsafe: frozenset[str] = frozenset()
    updates_per_s: float = 8.0
    flush: tuple[FlushSpec, FlushSpec, FlushSpec] = (
        FlushSpec(4, 0.5),
        FlushSpec(2, 0.5),
        FlushSpec(2, 0.5),
    )
    commit_window_ms: float = 2.0
    ack_wait_s: float = 3.0
    edge_keepalive_s: int = 5
    receipt_timeout_s: float = 2.0
    mosquitto_autosave_s: int = 1
    partial_max_staleness: int = 64
    proxies: bool = True
    keep_workdir: bool = False
    progress: Callable[[str], None] | None = None
    topology: str = "single"
    lease_ttl_s: float = 6.0
    edge_pairs: bool = True

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise FedtierError(
                f"topology {self.topology!r} is unknown; the topologies are {', '.join(TOPOLOGIES)}"
            )
        if self.topology != "ha":
            ha_only = [kind for kind in sorted(HA_ONLY_KINDS) if self.faults.count(kind)]
            if ha_only:
                raise FedtierError(f"fault {ha_only[0]} needs --topology ha")
        unknown = sorted(self.unsafe - ALL_UNSAFE)
        if unknown:
            raise FedtierError(
                f"unsafe switch {unknown[0]!r} is unknown; the switches are "
                f"{', '.join(sorted(ALL_UNSAFE))}"
            )
        if self.devices < len([s for _, sites in self.regions for s in sites]):
            raise FedtierError(f"{self.devices} devices cannot cover every site")

    @property
    def stop_s(self) -> float:
        """SIGSTOP length: past the keepalive (the broker drops the edge) and the ack wait."""
        if self.faults.stop_s is not None:
            return self.faults.stop_s
        return max(1.5 * self.edge_keepalive_s, self.ack_wait_s) + 1.0

    def mesh_spec(self) -> MeshSpec:
        """The mesh this run builds."""
        edge, regional, central = self.flush
        return MeshSpec(
            fleet="chaos",
            regions=self.regions,
            devices=self.devices,
            seed=self.seed,
            updates_per_s=self.updates_per_s,
            misbehaving=0,
            edge_flush=edge,
            regional_flush=regional,
            central_flush=central,
            # Slow devices are part of the chaos; stale ones are rejected, not lost.
            max_staleness=64,
            partial_max_staleness=self.partial_max_staleness,
            training=TrainingSpec(epochs=1.0),
            send=SendSpec(
                codec="i8",
                receipt_timeout_s=self.receipt_timeout_s,
                max_attempts=1000,
                backoff_max_s=4 * self.receipt_timeout_s,
                unsafe_trust_puback=DEVICE_UNSAFE_SWITCH in self.unsafe,
            ),
            shutdown_timeout_s=3.0,
            commit_window_ms=self.commit_window_ms,
            edge_keepalive_s=self.edge_keepalive_s,
            ack_wait_s=self.ack_wait_s,
            standbys=self.ha,
            lease_ttl_s=self.lease_ttl_s,
            edge_standbys=self.edge_pairs,
        )

    @property
    def ha(self) -> bool:
        """Whether the run uses the ``ha`` topology."""
        return self.topology == "ha"


@dataclass(frozen=True, slots=True)
class _Fault:
    """One scheduled fault: when, what, which target (an index, taken mod n), how long down."""

    at_s: float
    kind: str
    target: int
    down_s: float


def _schedule(plan: FaultPlan, rng: random.Random, window_s: float) -> list[_Fault]:
    faults: list[_Fault] = []
    for kind in FaultPlan.kinds():
        broker = kind in ("kill_mosquitto", "kill_nats", "kill_nats_node")
        low, high = plan.broker_down_s if broker else plan.restart_delay_s
        # Targets in turn (the k-th fault of a kind hits candidate k mod n): every
        # edge, proxy... gets its share, whatever the seed.
        faults.extend(
            _Fault(rng.uniform(0.0, window_s), kind, k, rng.uniform(low, high))
            for k in range(plan.count(kind))
        )
    return sorted(faults, key=lambda f: f.at_s)
