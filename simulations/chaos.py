"""``fedtier sim chaos``: a mesh under scheduled faults, then the exactly-once checker; imports any.

A run (``run_chaos(ChaosOptions(...))``, or the command) goes through five phases:

1. **Brokers and proxies.** Mosquitto (persistence on, autosave every
   ``mosquitto_autosave_s``) and nats-server (``sync_interval: always``) on
   loopback, and two ``simulations.proxy.FaultyProxy``: edges -> nats-server
   and devices -> Mosquitto.
2. **Mesh.** ``simulations.mesh.prepare_mesh`` writes keys, data and configs
   routed through the proxies; the central, the regionals, the edges and one
   fleet process per site start. Every process is supervised: when one exits
   without being asked to (our kill -9, a crash point, an error) it is started
   again on the same state store after a short, random pause. Daemons get
   ``FEDTIER_UNSAFE`` and ``FEDTIER_CRASH_AT`` (``tiers.faults``) as asked.
3. **Faults.** Once devices send, ``FaultPlan`` counts are spread at random
   (seeded) over ``duration_s``; the faults of one kind take their targets in
   turn. Each fault waits until its target is up, so every counted kill hits a
   serving process:

   ================  =========================================================
   fault             what happens
   ================  =========================================================
   kill_<tier>       SIGKILL of a daemon of the tier; the supervisor
                     restarts it
   stop_<tier>       SIGSTOP of a daemon, SIGCONT ``stop_s`` later
                     (longer than the MQTT keepalive and the JetStream ack wait)
   kill_mosquitto    the edges are frozen (SIGSTOP) for ``edge_stall_s`` so
                     acknowledged updates queue in the broker, then the broker
                     is SIGKILLed, restarted on its port and store after
                     ``broker_down_s``, and the edges resumed
   kill_nats         SIGKILL of nats-server, restart after ``broker_down_s``
   proxy_reset       every connection through a proxy is reset
   proxy_partition   a proxy forwards nothing for ``partition_s``
   proxy_delay       a proxy delays every chunk ``delay_s``
   ================  =========================================================

   The run phase ends when every fault is done and the devices have sent
   ``updates`` updates (or after ``max_run_s``).
4. **Drain.** The fleets stop (their device logs are exported again from the
   durable outboxes, which a killed fleet would otherwise lose); crash points
   are disarmed for later restarts; the daemons keep running until every
   update the devices hold a receipt for is in the central's lineage and the
   lineage has been quiet for a while, or until ``drain_timeout_s``. Then the
   daemons stop, tier by tier.
5. **Check.** ``simulations.checker`` classifies every update: device logs
   against the central's lineage manifests.

Everything runs on loopback, in a temporary directory (kept with
``keep_workdir``); artefacts (process logs, device logs, ``chaos.json``) go to
``out_dir``. The command prints the checker's verdict and a fault summary and
exits 1 when anything was lost, duplicated or unexpected.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from fedtier.protocol.errors import ChildFailed, FedtierError, StoreError
from fedtier.simulations.brokers.mosquitto import MosquittoProcess
from fedtier.simulations.brokers.nats_server import NatsServerProcess
from fedtier.simulations.checker import CheckReport, check, load_device_logs, render_report
from fedtier.simulations.fleet import SendSpec, TrainingSpec
from fedtier.simulations.mesh import (
    Brokers,
    FlushSpec,
    MeshPlan,
    MeshSpec,
    Routes,
    child_environment,
    prepare_mesh,
)
from fedtier.simulations.processes import Child, ProcessGroup, open_process_group
from fedtier.simulations.proxy import FaultyProxy
from fedtier.tiers.faults import CRASH_ENV, CRASH_EXIT_STATUS, UNSAFE_ENV, UNSAFE_SWITCHES
from fedtier.tiers.store import read_lineages

__all__ = [
    "DEVICE_UNSAFE_SWITCH",
    "FAULT_KINDS",
    "ChaosOptions",
    "ChaosResult",
    "FaultPlan",
    "main",
    "run_chaos",
]

DEVICE_UNSAFE_SWITCH: Final = "device_trust_puback"
ALL_UNSAFE: Final = frozenset(UNSAFE_SWITCHES | {DEVICE_UNSAFE_SWITCH})
TIERS: Final = ("edge", "regional", "central")
# The daemons' log line once their input is open (tiers.tier.TierDaemon.serve).
_SERVING: Final = r"serving \(epoch \d+, model v\d+\)"
_READY_TIMEOUT_S: Final = 60.0
_STOP_GRACE_S: Final = 15.0
_FAILED_RESTART_S: Final = 1.0
_POLL_S: Final = 0.5
_PROGRESS_EVERY_S: Final = 5.0
_CRASH_LINE: Final = re.compile(r"fedtier crash point (\S+):")


# -- what to do ------------------------------------------------------------------------

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
)


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """How many faults of each kind a run injects, and how hard each one is.

    Attributes:
        kill_edge, kill_regional, kill_central: kill -9 of a daemon of that tier.
        kill_mosquitto, kill_nats: kill -9 and restart of a broker.
        stop_edge, stop_regional, stop_central: SIGSTOP for ``stop_s``, then SIGCONT.
        proxy_reset, proxy_partition, proxy_delay: faults of a proxy.
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

    def __post_init__(self) -> None:
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
        )


@dataclass(slots=True)
class ChaosResult:
    """What a chaos run did and what the checker found.

    Attributes:
        report: the checker's verdict.
        updates_in_logs: distinct update ids in the device logs.
        faults: faults injected, by kind.
        skipped: faults not injected (their target never came up), by kind.
        exits: daemon and fleet exits, ``<tier>:<killed|crash_point|failed>``.
        failures: how the ``failed`` exits ended (last log lines).
        sent: updates the devices sent (first sends).
        receipted: updates the devices hold an accepted or duplicate receipt for.
        drained: every receipted update was counted before the daemons stopped.
        elapsed_s: wall time of the run.
        phase_s: wall time of each phase (setup, start, faults, drain, stop).
        unsafe: the safeties that were off.
        crash_at: the crash points armed.
    """

    report: CheckReport
    updates_in_logs: int
    faults: Counter[str]
    skipped: Counter[str]
    exits: Counter[str]
    failures: list[str]
    sent: int
    receipted: int
    drained: bool
    elapsed_s: float
    phase_s: dict[str, float]
    unsafe: frozenset[str]
    crash_at: str

    @property
    def failed(self) -> bool:
        """True when the checker found an update lost, duplicated or unexpected."""
        return self.report.failed

    def summary_lines(self) -> list[str]:
        """The fault summary as printed lines."""
        lines = [
            f"chaos run: {self.elapsed_s:.0f} s, {self.sent} updates sent, "
            f"{self.receipted} receipted, drained: {'yes' if self.drained else 'no'}",
            "  phases: " + ", ".join(f"{name} {s:g} s" for name, s in self.phase_s.items()),
            "  safeties off: " + (", ".join(sorted(self.unsafe)) or "none"),
            "  crash points: " + (self.crash_at or "none"),
            "  faults injected:",
        ]
        for kind in FaultPlan.kinds():
            if self.faults[kind] or self.skipped[kind]:
                skipped = f" ({self.skipped[kind]} skipped)" if self.skipped[kind] else ""
                lines.append(f"    {kind:17} {self.faults[kind]:5d}{skipped}")
        lines.append("  exits (each followed by a restart):")
        for name, count in sorted(self.exits.items()):
            lines.append(f"    {name:24} {count:5d}")
        for failure in self.failures[:5]:
            lines.append(f"    e.g. {failure}")
        return lines

    def to_json(self) -> dict[str, object]:
        """The result as JSON-ready data."""
        return {
            "check": self.report.to_json(),
            "updates_in_logs": self.updates_in_logs,
            "faults": dict(self.faults),
            "skipped": dict(self.skipped),
            "exits": dict(self.exits),
            "failures": self.failures,
            "sent": self.sent,
            "receipted": self.receipted,
            "drained": self.drained,
            "elapsed_s": round(self.elapsed_s, 1),
            "phase_s": self.phase_s,
            "unsafe": sorted(self.unsafe),
            "crash_at": self.crash_at,
        }


# -- supervision ------------------------------------------------------------------------


@dataclass(eq=False)
class _Supervised:
    """A daemon or fleet process that is restarted whenever it exits unasked."""

    name: str
    tier: str
    argv: list[str]
    ready_pattern: str | None
    child: Child
    on_stdout_line: Callable[[str], None] | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)
    expect_kill: bool = False
    fired: set[str] = field(default_factory=set)


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
        broker = kind in ("kill_mosquitto", "kill_nats")
        low, high = plan.broker_down_s if broker else plan.restart_delay_s
        # Targets in turn (the k-th fault of a kind hits candidate k mod n): every
        # edge, proxy... gets its share, whatever the seed.
        faults.extend(
            _Fault(rng.uniform(0.0, window_s), kind, k, rng.uniform(low, high))
            for k in range(plan.count(kind))
        )
    return sorted(faults, key=lambda f: f.at_s)


class _Run:
    """One chaos run's processes, faults and counters (phases 2-4 of the module docstring)."""

    def __init__(
        self,
        options: ChaosOptions,
        plan: MeshPlan,
        group: ProcessGroup,
        brokers: Brokers,
        proxies: Sequence[FaultyProxy],
    ) -> None:
        self.options = options
        self.plan = plan
        self.group = group
        self.brokers = brokers
        self.proxies = list(proxies)
        # Two streams, so restarts (their pauses) never shift the fault schedule.
        self.rng = random.Random(options.seed)  # noqa: S311 - a schedule, not crypto
        self.schedule_rng = random.Random(options.seed + 1)  # noqa: S311
        self.daemons: dict[str, list[_Supervised]] = {tier: [] for tier in TIERS}
        self.fleets: list[_Supervised] = []
        self.faults: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.exits: Counter[str] = Counter()
        self.failures: list[str] = []
        self.crash_phase = bool(options.crash_at)
        self.stopping = trio.Event()
        self.broker_locks = {"mosquitto": trio.Lock(), "nats": trio.Lock()}
        # Cumulative per fleet incarnation: progress lines restart at 0 with the process.
        self._sent_now: dict[str, int] = {}
        self._sent_before: Counter[str] = Counter()
        self.target_reached = trio.Event()
        self.traffic = trio.Event()
        self.phase_s: dict[str, float] = {}
        daemon_unsafe = sorted(options.unsafe & UNSAFE_SWITCHES)
        self._daemon_env: dict[str, str | None] = {UNSAFE_ENV: ",".join(daemon_unsafe) or None}

    # -- processes ------------------------------------------------------------------

    @property
    def sent(self) -> int:
        return sum(self._sent_now.values()) + sum(self._sent_before.values())

    def _env(self, tier: str, fired: set[str]) -> dict[str, str | None]:
        env = dict(self._daemon_env)
        points = [
            item.strip()
            for item in self.options.crash_at.split(",")
            if item.strip() and item.split(":")[0].strip() not in fired
        ]
        armed = tier in TIERS and self.crash_phase and points
        env[CRASH_ENV] = ",".join(points) if armed else None
        return env

    async def _restart(self, process: _Supervised) -> None:
        process.child = await self.group.start(
            process.name,
            process.argv,
            ready_pattern=process.ready_pattern,
            on_stdout_line=process.on_stdout_line,
            env=self._env(process.tier, process.fired),
        )

    async def _start_new(
        self,
        nursery: trio.Nursery,
        tier: str,
        name: str,
        argv: list[str],
        *,
        ready_pattern: str | None,
        on_stdout_line: Callable[[str], None] | None = None,
    ) -> _Supervised:
        child = await self.group.start(
            name,
            argv,
            ready_pattern=ready_pattern,
            on_stdout_line=on_stdout_line,
            env=self._env(tier, set()),
        )
        process = _Supervised(name, tier, argv, ready_pattern, child, on_stdout_line)
        nursery.start_soon(self._supervise, process)
        return process

    async def start_mesh(self, nursery: trio.Nursery) -> None:
        """Start the central, then (once it serves) regionals and edges, supervised."""
        plan = self.plan

        def argv(kind: str, config: Path) -> list[str]:
            return [sys.executable, "-m", "fedtier.simulations.cli", kind, "--config", str(config)]

        async def add(tier: str, name: str, config: Path) -> _Supervised:
            process = await self._start_new(
                nursery, tier, name, argv(tier, config), ready_pattern=_SERVING
            )
            self.daemons[tier].append(process)
            return process

        central = await add("central", "central", plan.central_config)
        await self._wait_all_up([central])
        for region, config in plan.regional_configs.items():
            await add("regional", f"regional-{region}", config)
        for site, config in plan.edge_configs.items():
            await add("edge", f"edge-{site}", config)

    async def wait_mesh_ready(self) -> None:
        """Wait until every daemon serves (restarts included: a crash point may fire early)."""
        await self._wait_all_up([p for tier in TIERS for p in self.daemons[tier]])

    async def _wait_all_up(self, processes: Sequence[_Supervised]) -> None:
        for process in processes:
            if not await self._wait_up(process):
                raise ChildFailed(
                    f"{process.name} was not serving within {_READY_TIMEOUT_S:g} s: "
                    f"{process.child.describe_exit()}"
                )

    async def start_fleets(self, nursery: trio.Nursery) -> None:
        """Start one fleet process per site, supervised."""
        for site, config in self.plan.fleet_configs.items():
            name = f"fleet-{site}"
            process = await self._start_new(
                nursery,
                "fleet",
                name,
                [sys.executable, "-m", "fedtier.simulations.fleet", "--config", str(config)],
                ready_pattern=None,
                on_stdout_line=self._fleet_line_handler(name),
            )
            self.fleets.append(process)

    def _fleet_line_handler(self, name: str) -> Callable[[str], None]:
        def on_line(line: str) -> None:
            try:
                data = json.loads(line)
            except ValueError:
                return
            if isinstance(data, dict) and isinstance(data.get("sent"), int):
                self._sent_now[name] = data["sent"]
                if self.sent > 0:
                    self.traffic.set()
                if self.sent >= self.options.updates:
                    self.target_reached.set()

        return on_line

    async def _supervise(self, process: _Supervised) -> None:
        while True:
            await process.child.exited.wait()
            if self.stopping.is_set() or process.child.stopping:
                return
            code = process.child.returncode
            if process.expect_kill and code == -signal.SIGKILL:
                how = "killed"
                pause_s = self.rng.uniform(*self.options.faults.restart_delay_s)
            elif code == CRASH_EXIT_STATUS:
                how = "crash_point"
                # Its last stderr line names the point; the pipe may still hold it.
                with trio.move_on_after(2.0):
                    await process.child.stderr_done.wait()
                pause_s = self.rng.uniform(*self.options.faults.restart_delay_s)
                point = _fired_point(process.child)
                if self.options.crash_once and point is not None:
                    process.fired.add(point)
            else:
                # Expected now and then: a daemon started while a broker is down
                # gives up its first connect after a few tries.
                how = "failed"
                pause_s = _FAILED_RESTART_S
                self.failures.append(process.child.describe_exit())
            process.expect_kill = False
            self.exits[f"{process.tier}:{how}"] += 1
            if process.tier == "fleet":
                self._sent_before[process.name] += self._sent_now.pop(process.name, 0)
            await trio.sleep(pause_s)
            if self.stopping.is_set():
                return
            await self._restart(process)

    async def _wait_up(self, process: _Supervised) -> bool:
        with trio.move_on_after(_READY_TIMEOUT_S):
            while not (process.child.ready.is_set() and not process.child.exited.is_set()):
                await self.group.changed()
            return True
        return False

    # -- faults ---------------------------------------------------------------------

    async def run_faults(self) -> None:
        """Inject the planned faults at their times; return once all are done."""
        schedule = _schedule(self.options.faults, self.schedule_rng, self.options.duration_s)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for fault in schedule:
                await trio.sleep_until(start + fault.at_s)
                nursery.start_soon(self._inject, fault)

    async def _inject(self, fault: _Fault) -> None:
        kind = fault.kind
        if kind.startswith(("kill_", "stop_")) and kind.split("_", 1)[1] in TIERS:
            candidates = self.daemons[kind.split("_", 1)[1]]
            target = candidates[fault.target % len(candidates)]
            if kind.startswith("kill_"):
                await self._kill(kind, target)
            else:
                await self._stop(kind, target)
        elif kind == "kill_mosquitto":
            await self._kill_mosquitto(fault.down_s)
        elif kind == "kill_nats":
            await self._kill_nats(fault.down_s)
        else:
            await self._proxy_fault(kind, self.proxies[fault.target % len(self.proxies)])

    async def _kill(self, kind: str, target: _Supervised) -> None:
        async with target.lock:
            if not await self._wait_up(target):
                self.skipped[kind] += 1
                return
            target.expect_kill = True
            target.child.process.send_signal(signal.SIGKILL)
            self.faults[kind] += 1
            await target.child.exited.wait()

    async def _stop(self, kind: str, target: _Supervised) -> None:
        async with target.lock:
            if not await self._wait_up(target):
                self.skipped[kind] += 1
                return
            child = target.child
            child.process.send_signal(signal.SIGSTOP)
            self.faults[kind] += 1
            try:
                await trio.sleep(self.options.stop_s)
            finally:
                _resume(child)

    async def _kill_mosquitto(self, down_s: float) -> None:
        mosquitto = self.brokers.mosquitto
        async with self.broker_locks["mosquitto"]:
            # Frozen edges take nothing: acknowledged updates wait in the broker,
            # which is exactly what its kill -9 can lose (since the last autosave).
            frozen = [p.child for p in self.daemons["edge"] if p.child.returncode is None]
            for child in frozen:
                child.process.send_signal(signal.SIGSTOP)
            try:
                await trio.sleep(self.options.faults.edge_stall_s)
                await trio.to_thread.run_sync(mosquitto.kill)
                self.faults["kill_mosquitto"] += 1
                try:
                    await trio.sleep(down_s)
                finally:
                    # Even when the run is cut short: the drain needs its broker.
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(mosquitto.restart)
            finally:
                for child in frozen:
                    _resume(child)

    async def _kill_nats(self, down_s: float) -> None:
        nats = self.brokers.nats
        async with self.broker_locks["nats"]:
            await trio.to_thread.run_sync(nats.kill)
            self.faults["kill_nats"] += 1
            try:
                await trio.sleep(down_s)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(nats.restart)

    async def _proxy_fault(self, kind: str, proxy: FaultyProxy) -> None:
        faults = self.options.faults
        if kind == "proxy_reset":
            proxy.reset()
        elif kind == "proxy_partition":
            await proxy.partition(faults.partition_s)
        else:
            await proxy.delay(faults.delay_s, faults.delay_for_s)
        self.faults[kind] += 1

    # -- progress -------------------------------------------------------------------

    async def report_progress(self, started: float) -> None:
        """Call the progress callback every few seconds until cancelled."""
        progress = self.options.progress
        if progress is None:
            return
        while True:
            await trio.sleep(_PROGRESS_EVERY_S)
            done = sum(self.faults.values())
            exits = sum(self.exits.values())
            progress(
                f"chaos: {time.monotonic() - started:5.0f} s  {self.sent} updates sent  "
                f"{done}/{self.options.faults.total} faults  {exits} exits"
            )

    # -- drain ----------------------------------------------------------------------

    async def drain(self) -> bool:
        """Stop the fleets, export their logs, wait until the lineage holds every receipt.

        Returns:
            True when every receipted update was counted and the lineage was
            quiet before ``drain_timeout_s``.
        """
        self.crash_phase = False
        for fleet in self.fleets:
            fleet.child.stopping = True
        await self.group.stop([f.child for f in self.fleets], grace_s=_STOP_GRACE_S)
        await trio.to_thread.run_sync(export_device_logs, self.plan)
        receipted = _receipted(self.plan)
        options = self.options
        slowest_flush_s = max(spec.max_age_s for spec in options.flush)
        # Quiet long enough for a redelivery after the ack wait and a flush per tier.
        quiet_s = options.ack_wait_s + 3 * slowest_flush_s + 1.0
        deadline = trio.current_time() + options.drain_timeout_s
        last_total, last_change = -1, trio.current_time()
        while trio.current_time() < deadline:
            try:
                counted = await trio.to_thread.run_sync(_lineage_ids, self.plan)
            except StoreError:
                counted = Counter()  # the central is between a crash and its restart
            total = sum(counted.values())
            now = trio.current_time()
            if total != last_total:
                last_total, last_change = total, now
            complete = receipted <= counted.keys()
            # Something lost never arrives: then wait longer before giving up on it.
            if now - last_change >= (quiet_s if complete else 2 * quiet_s):
                return complete
            await trio.sleep(_POLL_S)
        return False

    async def stop_daemons(self) -> None:
        """Stop edges, then regionals, then the central (each flushes what it holds)."""
        self.stopping.set()
        for tier in TIERS:
            children = [p.child for p in self.daemons[tier]]
            await self.group.stop(children, grace_s=_STOP_GRACE_S)


def _fired_point(child: Child) -> str | None:
    """The crash point named by the child's last words (``tiers.faults._crash``), if any."""
    for line in reversed(child.tail):
        match = _CRASH_LINE.search(line)
        if match is not None:
            return match.group(1)
    return None


def _resume(child: Child) -> None:
    if child.returncode is None:
        child.process.send_signal(signal.SIGCONT)


def _outboxes(plan: MeshPlan) -> list[tuple[str, Path]]:
    state = plan.workdir / "state"
    return [(d.name, state / f"fleet-{d.site}" / f"{d.name}.outbox.sqlite") for d in plan.devices]


def export_device_logs(plan: MeshPlan) -> int:
    """Write every device's log from its outbox file (durable, unlike a killed fleet's export)."""
    from fedtier.client.outbox import Outbox

    plan.device_log_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for name, path in _outboxes(plan):
        if path.exists():
            with Outbox(path) as outbox:
                outbox.export_log(plan.device_log_dir / f"{name}.jsonl")
            written += 1
    return written


def _receipted(plan: MeshPlan) -> set[str]:
    histories = load_device_logs(sorted(plan.device_log_dir.glob("*.jsonl")))
    return {uid for uid, history in histories.items() if history.accepted}


def central_store(plan: MeshPlan) -> Path:
    """The central's state store file."""
    return plan.workdir / "state" / "central" / "state.sqlite"


def _lineage_ids(plan: MeshPlan) -> Counter[str]:
    counted: Counter[str] = Counter()
    for ids in read_lineages(central_store(plan)).values():
        counted.update(i.hex() for i in ids)
    return counted


# -- the run ----------------------------------------------------------------------------


@asynccontextmanager
async def _open_brokers(workdir: Path, autosave_s: int) -> AsyncIterator[Brokers]:
    mosquitto = await trio.to_thread.run_sync(
        lambda: MosquittoProcess.start(workdir / "mosquitto", autosave_interval=autosave_s)
    )
    try:
        nats = await trio.to_thread.run_sync(NatsServerProcess.start, workdir / "nats")
        try:
            yield Brokers(mosquitto, nats)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(nats.stop)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(mosquitto.stop)


async def run_chaos(options: ChaosOptions) -> ChaosResult:
    """Run the five phases of the module docstring; return the checker's verdict and counts.

    Raises:
        FedtierError: a broker or daemon could not start at all.

    On cancellation every process is stopped (SIGTERM, then SIGKILL) before it returns.
    """
    started = time.monotonic()
    out_dir = options.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fedtier-chaos-"))
    try:
        async with (
            _open_brokers(workdir / "brokers", options.mosquitto_autosave_s) as brokers,
            trio.open_nursery() as proxy_nursery,
        ):
            proxies: list[FaultyProxy] = []
            routes = Routes()
            if options.proxies:
                nats_proxy = FaultyProxy("edges-nats", brokers.nats.port)
                mqtt_proxy = FaultyProxy("devices-mosquitto", brokers.mosquitto.port)
                for proxy in (nats_proxy, mqtt_proxy):
                    await proxy_nursery.start(proxy.serve)
                    proxies.append(proxy)
                routes = Routes(
                    edge_nats_url=f"nats://127.0.0.1:{nats_proxy.port}",
                    device_mqtt_port=mqtt_proxy.port,
                )
            plan = await trio.to_thread.run_sync(
                lambda: prepare_mesh(
                    options.mesh_spec(), workdir / "mesh", out_dir, brokers, routes=routes
                )
            )
            for stale in plan.device_log_dir.glob("*.jsonl"):
                stale.unlink()
            # Spans cost CPU in every process and the checker does not need them.
            env = {**child_environment(None), "OTEL_SDK_DISABLED": "true"}
            async with open_process_group(
                plan.log_dir, env=env, stop_grace_s=_STOP_GRACE_S
            ) as group:
                run = _Run(options, plan, group, brokers, proxies)
                drained = await _run_phases(run, started)
            proxy_nursery.cancel_scope.cancel()
        histories = load_device_logs(sorted(plan.device_log_dir.glob("*.jsonl")))
        counted = _lineage_ids(plan)
        report = check(histories, counted, len(read_lineages(central_store(plan))))
        result = ChaosResult(
            report=report,
            updates_in_logs=len(histories),
            faults=run.faults,
            skipped=run.skipped,
            exits=run.exits,
            failures=run.failures,
            sent=run.sent,
            receipted=sum(1 for h in histories.values() if h.accepted),
            drained=drained,
            elapsed_s=time.monotonic() - started,
            phase_s=run.phase_s,
            unsafe=options.unsafe,
            crash_at=options.crash_at,
        )
        (out_dir / "chaos.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        return result
    finally:
        if options.keep_workdir:
            if options.progress is not None:
                options.progress(f"chaos: work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def _run_phases(run: _Run, started: float) -> bool:
    options = run.options
    phases = run.phase_s
    mark = time.monotonic()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = round(now - mark, 1)
        mark = now

    phases["setup"] = round(mark - started, 1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run.report_progress, started)
        await run.start_mesh(nursery)
        # Devices start while the edges do (their imports take seconds); until
        # an edge serves, they wait for a model and resend what got no receipt.
        await run.start_fleets(nursery)
        await run.wait_mesh_ready()
        # Faults start once updates flow: a broker killed before any device sent
        # would test nothing.
        with trio.move_on_after(_READY_TIMEOUT_S):
            await run.traffic.wait()
        lap("start")
        with trio.move_on_after(options.max_run_s):
            await run.run_faults()
            await run.target_reached.wait()
        lap("faults")
        drained = await run.drain()
        lap("drain")
        await run.stop_daemons()
        lap("stop")
        nursery.cancel_scope.cancel()
    return drained


# -- the command ------------------------------------------------------------------------


def _parse_regions(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``r1:s1+s2,r2:s3+s4`` -> ``(("r1", ("s1", "s2")), ("r2", ("s3", "s4")))``."""
    regions = []
    for part in text.split(","):
        region, _, sites = part.partition(":")
        if not region or not sites:
            raise FedtierError(f"--regions part {part!r} is not REGION:SITE+SITE")
        regions.append((region, tuple(sites.split("+"))))
    return tuple(regions)


def _parse_unsafe(text: str | None) -> frozenset[str]:
    if text is None:
        return frozenset()
    if text == "all":
        return ALL_UNSAFE
    return frozenset(part.strip() for part in text.split(",") if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtier sim chaos [options]``: see the module docstring.

    Returns:
        0 when nothing was lost, duplicated or unexpected; 1 otherwise; 2 for
        unusable arguments or a mesh that cannot start.
    """
    parser = argparse.ArgumentParser(
        prog="fedtier sim chaos",
        description="Run a mesh under kill -9s, broker crashes, stalls and link faults; "
        "then check that nothing was lost or counted twice.",
    )
    add = parser.add_argument
    add("--devices", type=int, default=12, help="simulated devices (default 12)")
    add("--regions", default="r1:s1+s2", help="REGION:SITE+SITE,... (default r1:s1+s2)")
    add("--updates", type=int, default=150, help="updates the devices send at least")
    add("--duration-s", type=float, default=20.0, help="the faults are spread over this")
    add("--max-run-s", type=float, default=900.0, help="bound on the run phase")
    add("--drain-timeout-s", type=float, default=90.0, help="bound on the drain")
    add("--rate", type=float, default=8.0, help="updates per second the fleet aims at")
    add("--seed", type=int, default=0, help="seeds the mesh and the fault schedule")
    for kind in FaultPlan.kinds():
        add(f"--{kind.replace('_', '-')}", type=int, default=0, metavar="N", help=f"{kind} faults")
    add("--crash-at", default="", help="FEDTIER_CRASH_AT for the daemons (tiers.faults)")
    add("--crash-once", action="store_true", help="restart crashed daemons without crash points")
    add(
        "--unsafe",
        nargs="?",
        const="all",
        default=None,
        metavar="SWITCHES",
        help=f"turn safeties off: 'all' (the default) or some of {', '.join(sorted(ALL_UNSAFE))}",
    )
    add("--commit-window-ms", type=float, default=2.0, help="daemons' grouped-commit window")
    add("--mosquitto-autosave-s", type=int, default=1, help="Mosquitto autosave interval")
    add(
        "--partial-max-staleness",
        type=int,
        default=64,
        metavar="N",
        help="regionals' and central's max_staleness; later partials are folded as late",
    )
    add("--no-proxies", action="store_true", help="connect edges and devices directly")
    add("--out", type=Path, default=Path("fedtier-chaos-out"), help="artefact directory")
    add("--keep-workdir", action="store_true", help="keep keys, configs and stores")
    add("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        plan = FaultPlan(**{kind: getattr(args, kind) for kind in FaultPlan.kinds()})
        options = ChaosOptions(
            out_dir=args.out,
            devices=args.devices,
            regions=_parse_regions(args.regions),
            updates=args.updates,
            duration_s=args.duration_s,
            max_run_s=args.max_run_s,
            drain_timeout_s=args.drain_timeout_s,
            seed=args.seed,
            faults=plan,
            crash_at=args.crash_at,
            crash_once=args.crash_once,
            unsafe=_parse_unsafe(args.unsafe),
            updates_per_s=args.rate,
            commit_window_ms=args.commit_window_ms,
            mosquitto_autosave_s=args.mosquitto_autosave_s,
            partial_max_staleness=args.partial_max_staleness,
            proxies=not args.no_proxies,
            keep_workdir=args.keep_workdir,
            progress=None if args.json else _print_err,
        )
        if args.crash_at:
            from fedtier.tiers.faults import configure

            configure(crash_at=args.crash_at)  # checks the syntax before anything starts
            configure()
        result = trio.run(run_chaos, options)
    except BaseException as exc:  # mapped to an exit status below
        error = exc
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        if isinstance(error, FedtierError):
            print(f"fedtier sim chaos: {error}", file=sys.stderr)
            return 2
        if isinstance(error, KeyboardInterrupt):
            return 130
        raise
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print("\n".join(render_report(result.report, result.updates_in_logs)))
        print("\n".join(result.summary_lines()))
    return 1 if result.failed else 0


def _print_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
