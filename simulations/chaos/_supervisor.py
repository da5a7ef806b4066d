"""A chaos run's daemons and fleets, restarted when they exit unasked; must not import the checker.

Crash points are armed here (``FEDTIER_CRASH_AT`` in a daemon's environment,
disarmed once the drain starts); the faults themselves are ``_inject``'s.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from fedtier.protocol.errors import ChildFailed
from fedtier.simulations.chaos._plan import TIERS, ChaosOptions
from fedtier.simulations.mesh import MeshPlan
from fedtier.simulations.processes import Child, ProcessGroup
from fedtier.tiers.faults import CRASH_ENV, CRASH_EXIT_STATUS, UNSAFE_ENV, UNSAFE_SWITCHES

# The daemons' log line once their input is open (tiers.tier.TierDaemon.serve).
_SERVING: Final = r"serving \(epoch \d+, model v\d+\)"
# With a lease, an instance is up once it serves or waits as a standby.
_SERVING_OR_STANDBY: Final = _SERVING + r"|is standby: waiting for lease"
_READY_TIMEOUT_S: Final = 60.0
_STOP_GRACE_S: Final = 15.0
_FAILED_RESTART_S: Final = 1.0
_CRASH_LINE: Final = re.compile(r"fedtier crash point (\S+):")


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
    # ``ha``: the lease its instances share, and its state directory, which a
    # machine loss (``wipe``) deletes before the replacement starts.
    lease_key: str = ""
    state_dir: Path | None = None
    wipe: bool = False


class _Supervisor:
    """The daemons and fleets of one chaos run, each restarted when it exits unasked."""

    def __init__(self, options: ChaosOptions, plan: MeshPlan, group: ProcessGroup) -> None:
        self.options = options
        self.plan = plan
        self.group = group
        # Restart pauses draw from a stream of their own (the fault schedule has
        # another), so restarts never shift the fault schedule.
        self.rng = random.Random(options.seed)  # noqa: S311 - a schedule, not crypto
        self.daemons: dict[str, list[_Supervised]] = {tier: [] for tier in TIERS}
        self.fleets: list[_Supervised] = []
        self.exits: Counter[str] = Counter()
        self.failures: list[str] = []
        self.crash_phase = bool(options.crash_at)
        self.stopping = trio.Event()
        # Cumulative per fleet incarnation: progress lines restart at 0 with the process.
        self._sent_now: dict[str, int] = {}
        self._sent_before: Counter[str] = Counter()
        self.target_reached = trio.Event()
        self.traffic = trio.Event()
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
            return [sys.executable, "-m", "fedtier", kind, "--config", str(config)]

        ready = _SERVING_OR_STANDBY if plan.standby_configs else _SERVING
        region_of = {site: region for region, sites in plan.spec.regions for site in sites}

        async def add(tier: str, name: str, config: Path, lease_key: str) -> _Supervised:
            process = await self._start_new(
                nursery, tier, name, argv(tier, config), ready_pattern=ready
            )
            process.lease_key = lease_key
            process.state_dir = plan.state_dirs.get(name)
            self.daemons[tier].append(process)
            return process

        def second(name: str) -> Path | None:
            entry = plan.standby_configs.get(f"{name}-b")
            return None if entry is None else entry[1]

        # The first instance of each starts first, so it is the first active one.
        central = await add("central", "central", plan.central_config, "central")
        await self._wait_all_up([central])
        if (config_b := second("central")) is not None:
            await add("central", "central-b", config_b, "central")
        for region, config in plan.regional_configs.items():
            await add("regional", f"regional-{region}", config, f"regional.{region}")
            if (config_b := second(f"regional-{region}")) is not None:
                await add("regional", f"regional-{region}-b", config_b, f"regional.{region}")
        for site, config in plan.edge_configs.items():
            key = f"edge.{region_of[site]}.{site}"
            await add("edge", f"edge-{site}", config, key)
            if (config_b := second(f"edge-{site}")) is not None:
                await add("edge", f"edge-{site}-b", config_b, key)

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
            if process.wipe and code == -signal.SIGKILL:
                # The machine is gone, disk included: the replacement starts empty.
                how = "lost"
                state_dir = process.state_dir
                if state_dir is not None:
                    await trio.to_thread.run_sync(_remove_tree, state_dir)
                pause_s = self.rng.uniform(*self.options.faults.restart_delay_s)
            elif process.expect_kill and code == -signal.SIGKILL:
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
            process.wipe = False
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

    async def stop_daemons(self) -> None:
        """Stop edges, then regionals, then the central (each flushes what it holds)."""
        self.stopping.set()
        for tier in TIERS:
            children = [p.child for p in self.daemons[tier]]
            await self.group.stop(children, grace_s=_STOP_GRACE_S)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _fired_point(child: Child) -> str | None:
    """The crash point named by the child's last words (``tiers.faults._crash``), if any."""
    for line in reversed(child.tail):
        match = _CRASH_LINE.search(line)
        if match is not None:
            return match.group(1)
    return None
