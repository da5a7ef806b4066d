"""One chaos run: brokers, proxies, phases, drain, the checker's verdict; must not import argparse.

Arguments and printing are ``_cli``'s.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import trio

from fedtier.protocol.errors import StoreError
from fedtier.protocol.telemetry.tracing import otlp_requested
from fedtier.simulations.chaos._inject import _Injector
from fedtier.simulations.chaos._observer import open_observer
from fedtier.simulations.chaos._plan import ChaosOptions
from fedtier.simulations.chaos._result import ChaosResult
from fedtier.simulations.chaos._supervisor import _READY_TIMEOUT_S, _STOP_GRACE_S
from fedtier.simulations.checker import check, load_device_logs
from fedtier.simulations.mesh import (
    Brokers,
    MeshPlan,
    Routes,
    child_environment,
    prepare_mesh,
)
from fedtier.simulations.processes import ProcessGroup, open_process_group
from fedtier.simulations.testing import (
    FaultyProxy,
    MosquittoProcess,
    NatsClusterProcess,
    NatsServerProcess,
)
from fedtier.tiers.store import read_lineages

_POLL_S: Final = 0.5
_PROGRESS_EVERY_S: Final = 5.0


def _chaos_environment(trace_dir: Path) -> dict[str, str]:
    """The children's environment: tracing off, unless the user asked for OTLP export.

    Spans cost CPU in every process and the checker reads device logs, not
    spans, so by default no child traces. With an OTLP endpoint (or
    ``OTEL_TRACES_EXPORTER`` naming ``otlp``) the user wants to watch the run in
    their backend: every child then exports there and keeps the run's
    JSON-lines copy in ``<out>/traces`` for `fedtier trace`, at the CPU cost of
    tracing (sample device sends with ``OTEL_TRACES_SAMPLER=fedtier``).
    """
    if otlp_requested():
        return child_environment(trace_dir)
    return {**child_environment(None), "OTEL_SDK_DISABLED": "true"}


class _Run(_Injector):
    """One chaos run's processes, faults and counters (phases 2-4 of the package docstring)."""

    def __init__(
        self,
        options: ChaosOptions,
        plan: MeshPlan,
        group: ProcessGroup,
        brokers: Brokers,
        proxies: Sequence[FaultyProxy],
    ) -> None:
        super().__init__(options, plan, group, brokers, proxies)
        self.phase_s: dict[str, float] = {}
        self.final_counted: Counter[str] = Counter()
        self.final_versions = 0
        self.missing_records: set[int] = set()

    async def settle_lineage(self) -> None:
        """Read the lineage the checker uses, once every daemon has stopped."""
        if self.observer is not None:
            await self.observer.settle(self.options.drain_timeout_s)
            self.missing_records = set(self.observer.missing)
        else:
            # Nothing may hold the store open any more: a failure here is real.
            self.final_counted = await trio.to_thread.run_sync(_lineage_ids, self.plan)
            self.final_versions = await trio.to_thread.run_sync(self.lineage_versions)
            return
        self.final_counted = self.observer.counted()
        self.final_versions = self.lineage_versions()

    @asynccontextmanager
    async def observing(self) -> AsyncIterator[None]:
        """``ha``: follow the registry's versions and the leases while the block runs."""
        if not self.options.ha:
            yield
            return
        spec = self.plan.spec
        cluster = self.brokers.nats_cluster
        async with open_observer(
            self.brokers.nats_urls,
            spec.fleet,
            self.plan.central_key_file,
            spec.lease_ttl_s,
            1 if cluster is None else len(cluster.nodes),
        ) as observer:
            self.observer = observer
            async with trio.open_nursery() as nursery:
                nursery.start_soon(observer.follow)
                yield
                nursery.cancel_scope.cancel()

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
        # Something lost never arrives: then wait longer before giving up on it; in
        # ha long enough for a takeover per tier too (an instance that lost its
        # lease in the last fault restarts as a standby; one takes over a TTL later).
        missing_s = 2 * quiet_s + (3 * options.lease_ttl_s if options.topology == "ha" else 0.0)
        deadline = trio.current_time() + options.drain_timeout_s
        last_total, last_change = -1, trio.current_time()
        while trio.current_time() < deadline:
            counted = await self.counted()
            total = sum(counted.values())
            now = trio.current_time()
            if total != last_total:
                last_total, last_change = total, now
            complete = receipted <= counted.keys()
            if now - last_change >= (quiet_s if complete else missing_s):
                return complete
            await trio.sleep(_POLL_S)
        return False

    async def counted(self) -> Counter[str]:
        """Update ids by how often the published lineage counts them (see ``lineage``)."""
        if self.observer is not None:
            return self.observer.counted()
        try:
            return await trio.to_thread.run_sync(_lineage_ids, self.plan)
        except StoreError:
            return Counter()  # the central is between a crash and its restart

    def lineage_versions(self) -> int:
        """Versions whose lineage the checker reads."""
        if self.observer is not None:
            return len(self.observer.lineage)
        return len(read_lineages(central_store(self.plan)))


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
async def _open_brokers(workdir: Path, autosave_s: int, *, ha: bool) -> AsyncIterator[Brokers]:
    mosquitto = await trio.to_thread.run_sync(
        lambda: MosquittoProcess.start(workdir / "mosquitto", autosave_interval=autosave_s)
    )
    try:
        if ha:
            (workdir / "nats").mkdir(parents=True, exist_ok=True)
            cluster = await trio.to_thread.run_sync(NatsClusterProcess.start, workdir / "nats")
            try:
                yield Brokers(mosquitto, cluster.nodes[0], nats_cluster=cluster)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(cluster.stop)
            return
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
    """Run the five phases of the package docstring; return the checker's verdict and counts.

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
            _open_brokers(
                workdir / "brokers", options.mosquitto_autosave_s, ha=options.ha
            ) as brokers,
            trio.open_nursery() as proxy_nursery,
        ):
            proxies: list[FaultyProxy] = []
            routes = Routes()
            if options.proxies:
                # One proxy per NATS server (a cluster's three: the edges fail over).
                nodes = (
                    brokers.nats_cluster.nodes
                    if brokers.nats_cluster is not None
                    else [brokers.nats]
                )
                nats_proxies = [
                    FaultyProxy(f"edges-nats{i + 1 if len(nodes) > 1 else ''}", node.port)
                    for i, node in enumerate(nodes)
                ]
                mqtt_proxy = FaultyProxy("devices-mosquitto", brokers.mosquitto.port)
                for proxy in (*nats_proxies, mqtt_proxy):
                    await proxy_nursery.start(proxy.serve)
                    proxies.append(proxy)
                routes = Routes(
                    edge_nats_url=f"nats://127.0.0.1:{nats_proxies[0].port}",
                    device_mqtt_port=mqtt_proxy.port,
                    edge_nats_urls=tuple(f"nats://127.0.0.1:{p.port}" for p in nats_proxies),
                )
            plan = await trio.to_thread.run_sync(
                lambda: prepare_mesh(
                    options.mesh_spec(), workdir / "mesh", out_dir, brokers, routes=routes
                )
            )
            for stale in plan.device_log_dir.glob("*.jsonl"):
                stale.unlink()
            env = _chaos_environment(plan.trace_dir)
            async with open_process_group(
                plan.log_dir, env=env, stop_grace_s=_STOP_GRACE_S
            ) as group:
                run = _Run(options, plan, group, brokers, proxies)
                drained = await _run_phases(run, started)
            proxy_nursery.cancel_scope.cancel()
        histories = load_device_logs(sorted(plan.device_log_dir.glob("*.jsonl")))
        counted = run.final_counted
        report = check(histories, counted, run.final_versions)
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
            topology=options.topology,
            missing_records=sorted(run.missing_records),
        )
        (out_dir / "chaos.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
        if run.observer is not None:
            # What the checker counted, version by version: to follow a failure
            # back to the versions (and so the partials) that hold an update.
            lineage = {str(v): ids for v, ids in sorted(run.observer.lineage.items())}
            (out_dir / "lineage.json").write_text(json.dumps(lineage) + "\n")
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
        async with run.observing():
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
            await run.settle_lineage()
        nursery.cancel_scope.cancel()
    return drained
