"""A chaos run's faults: kills, stops, machine losses, broker and proxy faults; imports no checker.

It starts no process of its own: the supervisor restarts what it kills.
"""

from __future__ import annotations

import random
import signal
from collections import Counter
from collections.abc import Sequence

import trio

from fedtier.simulations.chaos._observer import _BusObserver
from fedtier.simulations.chaos._plan import TIERS, ChaosOptions, _Fault, _schedule
from fedtier.simulations.chaos._supervisor import _READY_TIMEOUT_S, _Supervised, _Supervisor
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
        # A link, not a socket, is what fails: in ``ha`` the edges reach each
        # NATS node through its own proxy (edges-nats1..3), and a fault of
        # their link hits all of them at once, as a site's WAN link would.
        links: dict[str, list[FaultyProxy]] = {}
        for proxy in self.proxies:
            links.setdefault(proxy.name.rstrip("0123456789"), []).append(proxy)
        self.links = list(links.values())
        # Its own stream, so restarts (their pauses) never shift the fault schedule.
        self.schedule_rng = random.Random(options.seed + 1)  # noqa: S311
        self.faults: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.broker_locks = {"mosquitto": trio.Lock(), "nats": trio.Lock()}
        # ``ha``: set once the central serves (it creates the buckets it reads).
        self.observer: _BusObserver | None = None

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
        elif kind == "kill_nats_node":
            await self._kill_nats_node(fault.target, fault.down_s)
        elif kind.startswith("lose_"):
            await self._lose(kind, fault.target)
        else:
            await self._proxy_fault(kind, self.links[fault.target % len(self.links)])

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

    async def _lose(self, kind: str, target_index: int) -> None:
        """Lose the machine of the active instance of the ``target_index``-th site, region..."""
        tier = kind.split("_", 1)[1]
        processes = self.daemons[tier]
        keys = sorted({p.lease_key for p in processes})
        key = keys[target_index % len(keys)]
        group = [p for p in processes if p.lease_key == key]
        target = await self._active(key, group)
        if target is None:
            self.skipped[kind] += 1
            return
        async with target.lock:
            if target.child.returncode is not None:
                self.skipped[kind] += 1
                return
            target.wipe = True
            target.child.process.send_signal(signal.SIGKILL)
            self.faults[kind] += 1
            await target.child.exited.wait()

    async def _active(self, key: str, group: Sequence[_Supervised]) -> _Supervised | None:
        """The instance that holds lease ``key`` and serves, waited for up to the ready timeout."""
        assert self.observer is not None
        with trio.move_on_after(_READY_TIMEOUT_S):
            while True:
                pid = await self.observer.holder_pid(key)
                for process in group:
                    child = process.child
                    if (
                        pid == child.process.pid
                        and child.returncode is None
                        and child.ready.is_set()
                    ):
                        return process
                await trio.sleep(0.2)
        return None

    async def _kill_nats_node(self, target_index: int, down_s: float) -> None:
        cluster = self.brokers.nats_cluster
        assert cluster is not None
        index = target_index % len(cluster.nodes)
        async with self.broker_locks["nats"]:
            await trio.to_thread.run_sync(cluster.kill, index)
            self.faults["kill_nats_node"] += 1
            try:
                await trio.sleep(down_s)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(cluster.restart, index)
                    await trio.to_thread.run_sync(cluster.wait_ready)

    async def _kill_nats(self, down_s: float) -> None:
        cluster = self.brokers.nats_cluster
        if cluster is not None:
            # The whole cluster at once: what one server's kill is in ``single``.
            async with self.broker_locks["nats"]:
                await trio.to_thread.run_sync(cluster.kill_all)
                self.faults["kill_nats"] += 1
                try:
                    await trio.sleep(down_s)
                finally:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(cluster.restart_all)
            return
        nats = self.brokers.nats
        async with self.broker_locks["nats"]:
            await trio.to_thread.run_sync(nats.kill)
            self.faults["kill_nats"] += 1
            try:
                await trio.sleep(down_s)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(nats.restart)

    async def _proxy_fault(self, kind: str, link: Sequence[FaultyProxy]) -> None:
        faults = self.options.faults
        async with trio.open_nursery() as nursery:
            for proxy in link:
                if kind == "proxy_reset":
                    proxy.reset()
                elif kind == "proxy_partition":
                    nursery.start_soon(proxy.partition, faults.partition_s)
                else:
                    nursery.start_soon(proxy.delay, faults.delay_s, faults.delay_for_s)
        self.faults[kind] += 1


def _resume(child: Child) -> None:
    if child.returncode is None:
        child.process.send_signal(signal.SIGCONT)
