"""A chaos run's faults: kill -9, SIGSTOP, broker and proxy faults; must not import the checker.

It starts no process of its own: the supervisor restarts what it kills.
"""

from __future__ import annotations

import random
import signal
from collections import Counter
from collections.abc import Sequence

import trio

from fedtier.simulations.chaos._plan import TIERS, ChaosOptions, _Fault, _schedule
from fedtier.simulations.chaos._supervisor import _Supervised, _Supervisor
from fedtier.simulations.mesh import Brokers, MeshPlan
from fedtier.simulations.processes import Child, ProcessGroup
from fedtier.simulations.testing import FaultyProxy


class _Injector(_Supervisor):
    """The supervised processes of a run, and the faults injected into them and the brokers."""

    def __init__(
        self,
        options: ChaosOptions,
        plan: MeshPlan,
        group: ProcessGroup,
        brokers: Brokers,
        proxies: Sequence[FaultyProxy],
    ) -> None:
        super().__init__(options, plan, group)
        self.brokers = brokers
        self.proxies = list(proxies)
        # Its own stream, so restarts (their pauses) never shift the fault schedule.
        self.schedule_rng = random.Random(options.seed + 1)  # noqa: S311
        self.faults: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.broker_locks = {"mosquitto": trio.Lock(), "nats": trio.Lock()}

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


def _resume(child: Child) -> None:
    if child.returncode is None:
        child.process.send_signal(signal.SIGCONT)
