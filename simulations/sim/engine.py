"""The in-process engine: a scenario as discrete events on a virtual clock; no trio, bus or clock.

Imports numpy, protocol, tiers (through ``nodes``) and client (through
``devices``); never trio, a bus or a clock other than the virtual one (wall
time is measured only to report how long a run took). Deterministic given the
scenario's seed.

Events are ``(time, sequence, kind, a, b)`` tuples in one heap; the sequence
number breaks ties in insertion order, so equal times never depend on the
payloads. A device run is computed when it starts (it trains from the model
its edge relays at that moment) and lands at the first tier after download,
compute and upload time. In async mode a fixed number of concurrency slots
are refilled from idle devices as runs finish or are lost (FedBuff); in sync
mode each round picks devices, waits for them (or for the deadline), folds
what arrived and steps. Either way the folding, flushing and stepping are the
tiers' own code (``simulations.sim.nodes``).

A device is an index into compact per-device arrays (its edge, its kind); its
trainer and identity exist only once it trains. With ``workers`` the async
runs are computed in other processes (``simulations.sim._workers``): each run
reserves its event's sequence number when it starts and becomes its event
before anything that sorts after its end is popped, so the events, and every
byte the run writes, are those of the in-process run (docs/performance.md).

Sync rounds fold every update straight into the central: with no delay inside
a round, edge -> regional -> central gives the same aggregate as one flat fold
(docs/architecture.md, aggregation, ``tests/property/test_aggregation_invariants.py``), so
the hierarchy would change nothing but the bytes on the central link.

With ``[attack]`` some registered devices lie (``simulations.sim._attack``) and
with ``[defences]`` the first tier bounds each device's influence and the
edges and regionals may cut robustly (``tiers.core``); either table turns on
the attribution of every version's step to its devices
(``simulations.sim._attribution``), reported as :class:`AttackOutcome`.
"""

from __future__ import annotations

import heapq
import math
import resource
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Final

import numpy as np
import numpy.typing as npt

from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.envelope import parse_envelope
from fedtier.protocol.errors import ConfigError, LocalProtocolError
from fedtier.protocol.messages import PartialAggregate, Tier
from fedtier.simulations.datasets import DIGITS_NAME
from fedtier.simulations.sim._attack import AttackPlan
from fedtier.simulations.sim._attribution import Attribution, VersionInfluence
from fedtier.simulations.sim._workers import DeviceWorkers
from fedtier.simulations.sim.data import FederatedData, build_data
from fedtier.simulations.sim.devices import FLEET, DeviceRun, LocalTraining
from fedtier.simulations.sim.nodes import CentralNode, TierNode
from fedtier.simulations.sim.specs import DefencesSpec, DeviceKind, Scenario, TierSpec
from fedtier.tiers.core import DEFAULT_MAX_SAMPLES, InfluenceRules, RobustRules
from fedtier.tiers.optimizers import make_optimizer

__all__ = [
    "AttackOutcome",
    "DataInfo",
    "Lineage",
    "RunResult",
    "Simulation",
    "VersionRecord",
    "peak_rss_bytes",
    "run_scenario",
]

# Event kinds.
_UPDATE = 0  # a device's update reaches its first tier: (device, DeviceRun)
_LOST = 1  # a device vanished mid-run: (device, None)
_READY = 2  # a device is idle and online again: (device, None)
_SKIPPED = 3  # a run ended without an update (non-finite delta): (device, None)
_PARTIAL = 4  # a partial reaches a tier: (node index, envelope)
_DEADLINE = 5  # a buffer's deadline: (node index, epoch)
_VERSION = 6  # the tiers learn a new version: (version, None)

_STREAM_DATA = 1
_STREAM_SELECT = 11
_STREAM_DURATION = 12
_STREAM_DROPOUT = 13
_STREAM_REST = 14
_STREAM_ROUND = 20
# A sync run gives up after this many rounds in a row that made no version.
_MAX_EMPTY_ROUNDS = 1000


# The CSV columns that are one task's scores, and those that are the other's.
_TASK_COLUMNS: Final = {
    "classification": ("test_accuracy",),
    "regression": ("test_r2", "test_mse"),
}


@dataclass(slots=True)
class VersionRecord:
    """What the run looked like when the central made one version (a CSV row).

    Byte and update counts are cumulative since the start. ``uploaded_bytes``
    counts codec payloads (values and indices) of updates that reached their
    first tier; ``*_wire_bytes`` count whole signed envelopes. A classification
    records ``test_accuracy``; a regression ``test_r2`` and ``test_mse`` (its CSV
    has those columns where a classification's has ``test_accuracy``).
    ``test_loss`` is the training loss function on the test set.
    """

    version: int
    time_s: float
    test_accuracy: float
    test_loss: float
    train_loss: float
    uploaded_bytes: int
    uploaded_wire_bytes: int
    updates_uploaded: int
    central_bytes: int
    central_wire_bytes: int
    updates_in_version: int
    mean_staleness: float
    participants: int
    stale_rejections: int
    lost_runs: int
    test_r2: float = math.nan
    test_mse: float = math.nan

    @property
    def score(self) -> float:
        """The task's headline score: ``test_r2`` when set (regression), else ``test_accuracy``."""
        return self.test_accuracy if math.isnan(self.test_r2) else self.test_r2

    @property
    def evaluated(self) -> bool:
        """Whether this version's model was evaluated (else its scores are NaN)."""
        return not math.isnan(self.test_loss)

    @classmethod
    def columns(cls, task: str = "classification") -> list[str]:
        """CSV header for ``task``: the fields in order, the task's scores after ``time_s``."""
        other = {c for t, cols in _TASK_COLUMNS.items() if t != task for c in cols}
        names = [f.name for f in fields(cls) if f.name not in other]
        scores = [n for n in _TASK_COLUMNS[task] if n in names]
        rest = [n for n in names if n not in scores]
        at = rest.index("time_s") + 1
        return [*rest[:at], *scores, *rest[at:]]

    def row(self, task: str = "classification") -> list[str]:
        """CSV values, in :meth:`columns` order."""
        out: list[str] = []
        for name in self.columns(task):
            value = getattr(self, name)
            out.append(f"{value:.6g}" if isinstance(value, float) else str(value))
        return out


@dataclass(frozen=True, slots=True)
class DataInfo:
    """What data a run trained on, for reports.

    Attributes:
        name: the data source's own name (``Dataset.name``).
        task: ``"classification"`` or ``"regression"``.
        partition: how it was spread over the devices.
        holdout: where the test set came from.
    """

    name: str = DIGITS_NAME
    task: str = "classification"
    partition: str = "dirichlet"
    holdout: str = "global"


@dataclass(frozen=True, slots=True)
class AttackOutcome:
    """What an attacked (or defended) run measured beyond the main task.

    Attributes:
        kind: the attack's kind, None for a defended run with no attacker.
        malicious: the malicious devices' indices.
        defences: ``"on"``, ``"off"`` (``unsafe = true``) or ``"none"`` (no table).
        backdoor_success: ``(version, rate)`` at every evaluated version: the
            share of held-out non-target examples, stamped with the trigger,
            that the model puts in the target class (backdoor only).
        influence: per version, the largest single device's part of the step
            (``simulations.sim._attribution``).
        weight_cap: the weight cap of a device without a declared size (None: none).
        declared_caps: each device's updates are capped at its declared size.
    """

    kind: str | None
    malicious: tuple[int, ...]
    defences: str
    backdoor_success: tuple[tuple[int, float], ...]
    influence: tuple[VersionInfluence, ...]
    weight_cap: int | None
    declared_caps: bool = False

    @property
    def final_backdoor_success(self) -> float:
        """The rate at the last evaluated version (NaN without a backdoor)."""
        return self.backdoor_success[-1][1] if self.backdoor_success else math.nan


@dataclass
class RunResult:
    """Everything a run measured.

    Attributes:
        scenario: what ran.
        records: one per evaluated version, in order.
        staleness_hist: leaves folded into versions, by staleness at the central.
        updates_per_device: accepted updates per device.
        counts: outcomes by tier and reason (``"edge:stale"``...).
        wall_s: wall-clock seconds the run took, setup (data, trainers) included.
        virtual_time_s: virtual seconds simulated.
        num_params: model size.
        codec: the devices' codec.
        num_devices: devices in the fleet.
        engine: ``"sim"`` (in process, virtual clock) or ``"mesh"`` (real
            processes; times are wall-clock seconds of training).
        data: the data's name, task, partition and hold-out.
        local_tensors: the model's tensors that stayed on the devices (FedBN's
            BatchNorm, ``model.local``); when any did, each test example was
            scored by its own device's model.
        peak_rss_bytes: the process's resident-memory high-water mark when the
            run ended (``getrusage``; it covers whatever the process did before,
            so a run in a fresh process measures the run).
        events: events the engine processed (async: heap events; sync: rounds
            and arrivals); ``events / wall_s`` is the engine's rate.
        cpu_s: CPU seconds the process spent on the run, setup included (on a
            busy machine the run's own cost, where ``wall_s`` also counts waiting).
        workers: device worker processes the run used (0: in process).
        worker_cpu_s: CPU seconds the workers spent.
        worker_peak_rss_bytes: the largest worker's resident-memory high-water
            mark (pages it shares with the engine, forked, count in both).
        attack: attack and influence measurements (runs with ``[attack]`` or
            ``[defences]``), else None.
    """

    scenario: Scenario
    records: list[VersionRecord]
    staleness_hist: list[int]
    updates_per_device: npt.NDArray[np.int64]
    counts: dict[str, int]
    wall_s: float
    virtual_time_s: float
    num_params: int
    codec: str
    num_devices: int
    engine: str = "sim"
    data: DataInfo = DataInfo()
    local_tensors: tuple[str, ...] = ()
    peak_rss_bytes: int = 0
    events: int = 0
    cpu_s: float = 0.0
    workers: int = 0
    worker_cpu_s: float = 0.0
    worker_peak_rss_bytes: int = 0
    attack: AttackOutcome | None = None

    @property
    def events_per_s(self) -> float:
        """Events processed per wall-clock second (setup included in the seconds)."""
        return self.events / self.wall_s if self.wall_s > 0 else math.nan

    @property
    def final(self) -> VersionRecord:
        """The last record (the last version made)."""
        return self.records[-1]


@dataclass(frozen=True, slots=True)
class Lineage:
    """Which device updates went where, for checking that none is lost or counted twice.

    Kept only when a :class:`Simulation` is made with ``lineage=True`` (tests):
    the ids are those the production core folds (``DeviceUpdate.update_id``,
    and the ``leaves`` of every partial and version).

    Attributes:
        accepted: every update id a first tier (an edge, or the central when
            flat) accepted, in order.
        versions: each version's leaves, by version.
        pending: the leaves still on their way when the run stopped: in open
            buffers and in partials not yet delivered.
        dropped_epochs: buffers dropped at a cut (a sum the codec could not
            encode, a non-finite model); their leaves are in no version.
    """

    accepted: list[bytes]
    versions: dict[int, tuple[bytes, ...]]
    pending: list[bytes]
    dropped_epochs: int


def peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """This process's resident-memory high-water mark in bytes (``getrusage``).

    Args:
        who: ``RUSAGE_SELF``, or ``RUSAGE_CHILDREN`` for the largest child
            process that has ended (the device workers, once closed).
    """
    peak = resource.getrusage(who).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


ProgressCallback = Callable[[float], None]


class Simulation:
    """One scenario, ready to run once.

    Args:
        scenario: the scenario.
        progress: called with the fraction done (0..1) after each version.
        lineage: keep every update id's way into the versions (:meth:`lineage`);
            costs memory per update, so only tests ask for it.
        workers: processes that train the devices beside the engine (async
            mode, built-in numpy models); 0 trains them in this process. The
            results are the same bytes either way (``simulations.sim._workers``).

    Raises:
        ConfigError: ``workers`` asked for where they cannot run.
    """

    def __init__(
        self,
        scenario: Scenario,
        *,
        progress: ProgressCallback | None = None,
        lineage: bool = False,
        workers: int = 0,
    ) -> None:
        # Wall time counts the setup too (data, trainers): it is part of what a run costs.
        self._created = time.perf_counter()
        self._created_cpu = time.process_time()
        self.scenario = s = scenario
        self._progress = progress
        # A device is its index: its edge and kind live in two compact arrays (a
        # 100,000-device fleet holds no object per device until the device trains),
        # and every per-kind number an event needs is looked up by kind index.
        self._kinds: tuple[DeviceKind, ...] = tuple(s.fleet.kinds)
        per_edge = array("b")
        for index, kind in enumerate(self._kinds):
            per_edge.extend([index] * kind.count)
        self._device_kind = per_edge * s.fleet.num_edges
        self._device_edge = array("i")
        for edge in range(s.fleet.num_edges):
            self._device_edge.extend([edge] * len(per_edge))
        self.num_devices = len(self._device_kind)
        self.data: FederatedData = build_data(
            s.data,
            [self._kinds[k].data_volume for k in self._device_kind],
            seed=s.seed,
            base_dir=s.base_dir,
        )
        self.training = LocalTraining(
            s.model,
            s.training,
            self.data,
            codec=s.codec.name,
            error_feedback=s.codec.error_feedback,
            seed=s.seed,
        )
        layout = self.training.layout
        agg = s.aggregation
        central_spec = agg.central
        hierarchical = agg.mode == "async" and agg.topology == "hierarchical"
        self._plan: AttackPlan | None = None
        self._backdoor_test: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]] | None = None
        self._backdoor_success: list[tuple[int, float]] = []
        if s.attack is not None:
            self._plan = AttackPlan(
                s.attack,
                self.num_devices,
                seed=s.seed,
                num_features=self.data.num_features,
                num_classes=self.data.num_classes,
            )
            self.training.attack = self._plan
            if s.attack.kind == "backdoor":
                self._backdoor_test = self._plan.backdoor_test(self.data.X_test, self.data.y_test)
        self.attribution: Attribution | None = None
        if s.attack is not None or s.defences is not None:
            malicious = () if self._plan is None else sorted(self._plan.malicious)
            self.attribution = Attribution(
                [self.training.identity(device).key_id for device in malicious]
            )
        self._influence, self._max_norm = _influence(
            s.defences,
            self.data,
            lambda: [self.training.identity(d).key_id for d in range(self.num_devices)],
        )
        self._edge_max_norm = agg.edge.max_norm if self._influence is None else self._max_norm
        self.central = CentralNode(
            "central",
            params=self.training.initial_params,
            optimizer=make_optimizer(central_spec.optimizer, **dict(central_spec.optimizer_params)),
            fleet=FLEET,
            layout=layout,
            flush=central_spec.flush,
            staleness=central_spec.staleness,
            max_norm=agg.edge.max_norm if hierarchical else self._edge_max_norm,
            norm_policy=agg.edge.norm_policy,
            keys=self.training.keys,
            seed=s.seed,
            lineage=lineage,
            influence=None if hierarchical else self._influence,
            attribution=self.attribution,
        )
        self._lineage = lineage
        # nodes[i], its spec and its parent's index; the central is last.
        self.nodes: list[TierNode] = []
        self._node_spec: list[TierSpec | None] = []
        self._parent: list[int] = []
        self._edge_node: list[int] = []
        if hierarchical:
            regional_index: list[int] = []
            for region in range(s.fleet.regions):
                regional_index.append(
                    self._add_node(f"regional-{region}", Tier.REGIONAL, agg.regional)
                )
            for edge in range(s.fleet.num_edges):
                region = edge // s.fleet.edges_per_region
                index = self._add_node(f"edge-{edge}", Tier.EDGE, agg.edge)
                self._parent[index] = regional_index[region]
                self._edge_node.append(index)
        self.central_index = len(self.nodes)
        self.nodes.append(self.central)
        self._node_spec.append(None)
        self._parent.append(-1)
        for i, parent in enumerate(self._parent):
            if parent == -2:
                self._parent[i] = self.central_index
        self._hierarchical = hierarchical
        if workers < 0:
            raise ConfigError(f"workers is {workers}; it must be 0 or more")
        if workers and s.attack is not None:
            raise ConfigError("device workers run honest fleets; run an [attack] without them")
        if workers and (agg.mode != "async" or not self.training.forkable):
            raise ConfigError(
                "device workers run async scenarios with a built-in numpy model (logreg); "
                "run this one without them"
            )
        self._worker_count = workers
        self._worker_cpu_s = 0.0
        self._workers: DeviceWorkers | None = None
        # Runs handed to workers and not yet turned into events: (end of compute,
        # the event's reserved sequence number, device), earliest first.
        self._waiting: list[tuple[float, int, int]] = []

        n = self.num_devices
        self._heap: list[tuple[float, int, int, int, object]] = []
        self._seq = 0
        self.now = 0.0
        self._rng_select = self._rng(_STREAM_SELECT)
        self._rng_duration = self._rng(_STREAM_DURATION)
        self._rng_dropout = self._rng(_STREAM_DROPOUT)
        self._rng_rest = self._rng(_STREAM_REST)
        self._weights = self.data.samples.astype(np.float64)
        # The version the edges relay to devices, and the parameters of versions
        # not yet relayed (a version is relayed model_propagation_s after it is made).
        self._relayed = 0
        self._params: dict[int, npt.NDArray[np.float32]] = {0: self.central.params}
        for node in self.nodes:
            if node is not self.central:
                node.model(0, self.central.params)
        self._idle: list[int] = []
        self._active = 0
        self._events = 0
        self._offline_until = np.zeros(n)
        self.updates_per_device = np.zeros(n, dtype=np.int64)
        self.records: list[VersionRecord] = []
        self.staleness_hist = [0] * 32
        self._uploaded = 0
        self._uploaded_wire = 0
        self._updates_uploaded = 0
        self._central_bytes = 0
        self._central_wire = 0
        self._stale = 0
        self._lost = 0
        self._skipped = 0
        self._participants = 0

    # -- construction helpers ------------------------------------------------------

    def _rng(self, *stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.scenario.seed, *stream]))

    def _add_node(self, name: str, tier: Tier, spec: TierSpec) -> int:
        defences = self.scenario.defences
        robust: RobustRules | None = None
        if defences is not None and defences.active:
            robust = defences.edge_robust if tier is Tier.EDGE else defences.regional_robust
        node = TierNode(
            name,
            tier=tier,
            fleet=FLEET,
            layout=self.training.layout,
            flush=spec.flush,
            staleness=spec.staleness,
            partial_codec=CodecSpec.parse(
                spec.partial_codec, num_params=self.training.layout.num_params
            ),
            max_norm=self._edge_max_norm if tier is Tier.EDGE else None,
            norm_policy=self.scenario.aggregation.edge.norm_policy,
            keys=self.training.keys,
            seed=self.scenario.seed,
            lineage=self._lineage,
            influence=self._influence if tier is Tier.EDGE else None,
            robust=robust,
            attribution=self.attribution,
        )
        self.nodes.append(node)
        self._node_spec.append(spec)
        self._parent.append(-2)  # the central, fixed up once its index is known
        return len(self.nodes) - 1

    # -- running -------------------------------------------------------------------

    def run(self) -> RunResult:
        """Run to the stop condition and return what was measured."""
        self._record(evaluate=True)
        if self.scenario.aggregation.mode == "sync":
            self._run_sync()
        elif self._worker_count:
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            self._workers = DeviceWorkers(self.training, self._worker_count, self.central.params)
            try:
                self._run_async()
                # Runs started before the stop count as skipped when they skipped,
                # as they do in process.
                while self._waiting:
                    self._settle()
            finally:
                self._workers.close()
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                self._worker_cpu_s = (after.ru_utime + after.ru_stime) - (
                    before.ru_utime + before.ru_stime
                )
        else:
            self._run_async()
        if not self.records[-1].evaluated:
            self._record(evaluate=True)
        counts: dict[str, int] = {}
        for node in self.nodes:
            prefix = node.name.split("-")[0]
            for outcome, count in node.counts.items():
                key = f"{prefix}:{outcome}"
                counts[key] = counts.get(key, 0) + count
        counts["device:lost"] = self._lost
        counts["device:skipped"] = self._skipped
        return RunResult(
            scenario=self.scenario,
            records=self.records,
            staleness_hist=self.staleness_hist,
            updates_per_device=self.updates_per_device,
            counts=counts,
            wall_s=time.perf_counter() - self._created,
            virtual_time_s=self.now,
            num_params=self.training.layout.num_params,
            codec=str(self.training.codec),
            num_devices=self.num_devices,
            data=DataInfo(
                name=self.data.name,
                task=self.data.task,
                partition=self.data.partition,
                holdout=self.data.holdout,
            ),
            local_tensors=self.training.local_tensors,
            peak_rss_bytes=peak_rss_bytes(),
            events=self._events,
            cpu_s=time.process_time() - self._created_cpu,
            workers=self._worker_count,
            worker_cpu_s=self._worker_cpu_s,
            worker_peak_rss_bytes=peak_rss_bytes(resource.RUSAGE_CHILDREN)
            if self._worker_count
            else 0,
            attack=self._attack_outcome(),
        )

    def _attack_outcome(self) -> AttackOutcome | None:
        s = self.scenario
        if self.attribution is None:
            return None
        defences = "none" if s.defences is None else "on" if s.defences.active else "off"
        return AttackOutcome(
            kind=None if s.attack is None else s.attack.kind,
            malicious=() if self._plan is None else tuple(sorted(self._plan.malicious)),
            defences=defences,
            backdoor_success=tuple(self._backdoor_success),
            influence=tuple(self.attribution.versions),
            weight_cap=None if self._influence is None else self._influence.default_cap,
            declared_caps=self._influence is not None and bool(self._influence.declared),
        )

    def lineage(self) -> Lineage:
        """Where every accepted device update went (only with ``lineage=True``).

        Raises:
            LocalProtocolError: the simulation was made without ``lineage``.
        """
        versions = self.central.version_leaves
        if versions is None:
            raise LocalProtocolError("this simulation keeps no lineage; make it with lineage=True")
        accepted: list[bytes] = []
        pending: list[bytes] = []
        dropped = 0
        for node in self.nodes:
            accepted.extend(node.accepted_ids or ())
            pending.extend(node.buffer.accumulator.leaf_ids)
            dropped += node.counts["dropped_epoch"]
        for _at, _seq, kind, _a, b in self._heap:
            if kind == _PARTIAL:
                assert isinstance(b, bytes)
                message = parse_envelope(b).message
                assert isinstance(message, PartialAggregate)
                pending.extend(message.leaves)
        return Lineage(
            accepted=accepted, versions=dict(versions), pending=pending, dropped_epochs=dropped
        )

    def _push(self, at: float, kind: int, a: int, b: object = None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, a, b))

    def _done(self) -> bool:
        stop = self.scenario.stop
        if stop.versions is not None and self.central.version >= stop.versions:
            return True
        return stop.virtual_time_s is not None and self.now >= stop.virtual_time_s

    def _report_progress(self) -> None:
        if self._progress is None:
            return
        stop = self.scenario.stop
        fraction = 0.0
        if stop.versions is not None:
            fraction = self.central.version / stop.versions
        if stop.virtual_time_s is not None:
            fraction = max(fraction, self.now / stop.virtual_time_s)
        self._progress(min(1.0, fraction))

    # -- device timing -------------------------------------------------------------

    def _kind(self, device: int) -> DeviceKind:
        return self._kinds[self._device_kind[device]]

    def _compute_s(self, device: int, rng: np.random.Generator) -> float:
        clients = self.scenario.clients
        draw = rng.lognormal(0.0, clients.compute_sigma) if clients.compute_sigma else 1.0
        return clients.compute_median_s * self._kind(device).speed * float(draw)

    def _download_s(self, device: int) -> float:
        clients = self.scenario.clients
        rate = self._kind(device).downlink_bytes_per_s or clients.downlink_bytes_per_s
        return clients.latency_s + self.training.model_bytes / rate

    def _upload_s(self, device: int, size: int) -> float:
        clients = self.scenario.clients
        rate = self._kind(device).uplink_bytes_per_s or clients.uplink_bytes_per_s
        return clients.latency_s + size / rate

    # -- async ---------------------------------------------------------------------

    def _run_async(self) -> None:
        self._idle.extend(range(self.num_devices))
        self._fill()
        limit = self.scenario.stop.virtual_time_s
        heap, waiting = self._heap, self._waiting
        while True:
            # A run in a worker becomes its event before anything that sorts after
            # its end is popped: the order is the one the in-process run makes.
            if waiting and (not heap or waiting[0][:2] < heap[0][:2]):
                self._settle()
                continue
            if not heap or self._done():
                break
            at, _seq, kind, a, b = heapq.heappop(heap)
            if limit is not None and at > limit:
                self.now = limit
                break
            self._events += 1
            self.now = at
            if kind == _UPDATE:
                assert isinstance(b, DeviceRun)
                self._on_update(a, b)
            elif kind == _PARTIAL:
                assert isinstance(b, bytes)
                self._on_partial(a, b)
            elif kind == _DEADLINE:
                node = self.nodes[a]
                if node.buffer.epoch == b and node.due(self.now) is not None:
                    self._cut(a)
            elif kind == _VERSION:
                self._on_relay(a)
            elif kind == _LOST:
                self._active -= 1
                self._lost += 1
                back = self._rng_rest.exponential(self.scenario.clients.offline_s)
                self._push(self.now + float(back), _READY, a)
                self._fill()
            elif kind == _SKIPPED:
                self._active -= 1
                self._rest(a)
            elif kind == _READY:
                self._make_idle(a)
                self._fill()

    def _make_idle(self, device: int) -> None:
        self._idle.append(device)

    def _take_idle(self) -> int:
        clients = self.scenario.clients
        if clients.selection == "by_samples":
            weights = self._weights[self._idle]
            position = int(self._rng_select.choice(len(self._idle), p=weights / weights.sum()))
        else:
            position = int(self._rng_select.integers(len(self._idle)))
        device = self._idle[position]
        last = self._idle.pop()
        if last != device:
            self._idle[position] = last
        return device

    def _fill(self) -> None:
        slots = self.scenario.clients.concurrency or self.num_devices
        while self._active < slots and self._idle:
            self._start(self._take_idle())

    def _start(self, device: int) -> None:
        self._active += 1
        version = self._relayed
        download = self._download_s(device)
        compute = self._compute_s(device, self._rng_duration)
        if self._rng_dropout.random() < self._kind(device).dropout:
            vanish = self.now + float(self._rng_dropout.random()) * (download + compute)
            self._push(vanish, _LOST, device)
            return
        if self._workers is not None:
            self._seq += 1
            heapq.heappush(self._waiting, (self.now + download + compute, self._seq, device))
            self._workers.submit(self._seq, device, version, self.now)
            return
        run = self.training.run(device, self._params[version], version, now_s=self.now)
        if run is None:
            self._skipped += 1
            self._push(self.now + download + compute, _SKIPPED, device)
            return
        upload = self._upload_s(device, len(run.envelope))
        self._push(self.now + download + compute + upload, _UPDATE, device, run)

    def _settle(self) -> None:
        """Turn the earliest-ending worker run into its event, as :meth:`_start` would have."""
        assert self._workers is not None
        end, seq, device = heapq.heappop(self._waiting)
        run = self._workers.result(seq, device)
        if run is None:
            self._skipped += 1
            heapq.heappush(self._heap, (end, seq, _SKIPPED, device, None))
            return
        upload = self._upload_s(device, len(run.envelope))
        heapq.heappush(self._heap, (end + upload, seq, _UPDATE, device, run))

    def _key_id(self, device: int) -> str:
        """``device``'s key id: whom the tier caps (the edge daemon knows it from the topic)."""
        return self.training.identity(device).key_id

    def _rest(self, device: int) -> None:
        rest_s = self.scenario.clients.rest_s
        if rest_s > 0:
            self._push(self.now + float(self._rng_rest.exponential(rest_s)), _READY, device)
        else:
            self._make_idle(device)
        self._fill()

    def _on_update(self, device: int, run: DeviceRun) -> None:
        self._active -= 1
        self._count_upload(run)
        index = self._edge_node[self._device_edge[device]] if self._hierarchical else None
        node = self.central if index is None else self.nodes[index]
        at = self.central_index if index is None else index
        for number, envelope in enumerate((run.envelope, *run.extra)):
            if number:
                self._count_extra(run, envelope)
            if index is None:
                self._central_bytes += run.payload_bytes
                self._central_wire += len(envelope)
            self._count_outcome(device, node.admit_update(envelope, self.now, self._key_id(device)))
            self._after_input(at)
        self._rest(device)

    def _count_extra(self, run: DeviceRun, envelope: bytes) -> None:
        """Count a burst's further update as uploaded (it crossed the uplink too)."""
        self._uploaded += run.payload_bytes
        self._uploaded_wire += len(envelope)
        self._updates_uploaded += 1

    def _count_upload(self, run: DeviceRun) -> None:
        self._uploaded += run.payload_bytes
        self._uploaded_wire += len(run.envelope)
        self._updates_uploaded += 1

    def _count_outcome(self, device: int, outcome: str) -> None:
        if outcome == "accepted":
            if self.updates_per_device[device] == 0:
                self._participants += 1
            self.updates_per_device[device] += 1
        elif outcome == "stale":
            self._stale += 1

    def _on_partial(self, index: int, envelope: bytes) -> None:
        node = self.nodes[index]
        if node is self.central:
            self._central_bytes += len(parse_envelope(envelope).payload)
            self._central_wire += len(envelope)
        if node.admit_partial(envelope, self.now) == "stale":
            self._stale += 1
        self._after_input(index)

    def _after_input(self, index: int) -> None:
        node = self.nodes[index]
        if node.due(self.now) is not None:
            self._cut(index)
            return
        if node.buffer.accumulator.input_count == 1:
            deadline = node.deadline()
            if deadline is not None:
                self._push(deadline, _DEADLINE, index, node.buffer.epoch)

    def _cut(self, index: int) -> None:
        node = self.nodes[index]
        if node is self.central:
            if self.central.make_version():
                self._on_version()
            return
        envelope = node.cut_partial()
        if envelope is None:
            return
        spec = self._node_spec[index]
        assert spec is not None
        delay = spec.uplink_latency_s
        if spec.uplink_bytes_per_s is not None:
            delay += len(envelope) / spec.uplink_bytes_per_s
        self._push(self.now + delay, _PARTIAL, self._parent[index], envelope)

    def _on_version(self) -> None:
        version = self.central.version
        self._params[version] = self.central.params
        if self._workers is not None:
            self._workers.version(version, self.central.params)
        for bucket, count in enumerate(self.central.last_hist):
            self.staleness_hist[min(bucket, len(self.staleness_hist) - 1)] += count
        every = self.scenario.eval.every_versions
        self._record(evaluate=version % every == 0 or self._done())
        delay = self.scenario.aggregation.model_propagation_s
        if self.scenario.aggregation.mode == "sync":
            self._on_relay(version)
        else:
            self._push(self.now + delay, _VERSION, version)
        self._report_progress()

    def _on_relay(self, version: int) -> None:
        if version <= self._relayed:
            return
        for old in [v for v in self._params if v < version]:
            del self._params[old]
        if self._workers is not None:
            self._workers.forget_before(version)
        self._relayed = version
        params = self._params.get(version)
        for node in self.nodes:
            if node is not self.central:
                if params is None:
                    node.known_version = max(node.known_version, version)
                else:
                    node.model(version, params)

    # -- sync ----------------------------------------------------------------------

    def _run_sync(self) -> None:
        s = self.scenario
        agg, clients = s.aggregation, s.clients
        empty_rounds = 0
        round_number = 0
        while not self._done():
            round_number += 1
            self._events += 1
            rng = self._rng(_STREAM_ROUND, round_number)
            start = self.now
            eligible = np.flatnonzero(self._offline_until <= start)
            if eligible.size == 0:
                self.now = float(self._offline_until.min())
                continue
            k = min(agg.clients_per_round, int(eligible.size))
            p = None
            if clients.selection == "by_samples":
                weights = self._weights[eligible]
                p = weights / weights.sum()
            selected = [int(d) for d in rng.choice(eligible, size=k, replace=False, p=p)]
            stragglers = {
                int(d)
                for d in rng.choice(
                    selected, size=round(clients.straggler_fraction * k), replace=False
                )
            }
            version = self.central.version
            params = self.central.params
            # Draw every selected device's times and fate before the policy decides
            # who trains, so FedAvg and FedProx see the same round.
            plans = []
            for device in selected:
                download = self._download_s(device)
                compute = self._compute_s(device, rng)
                vanishes = rng.random() < self._kind(device).dropout
                vanish_at = float(rng.random())
                epochs_done = self._straggler_epochs(rng)
                plans.append((device, download, compute, vanishes, vanish_at, epochs_done))
            finishes: list[tuple[float, int, bool, DeviceRun]] = []
            ends: list[float] = []
            straggler_ends: list[float] = []
            for device, download, compute, vanishes, vanish_at, epochs_done in plans:
                straggler = device in stragglers
                if straggler and clients.straggler_policy == "drop":
                    continue
                if vanishes:
                    gone = start + vanish_at * (download + compute)
                    ends.append(gone)
                    self._lost += 1
                    back = float(rng.exponential(clients.offline_s))
                    self._offline_until[device] = gone + back
                    continue
                max_steps = None
                if straggler:
                    per_epoch = self.training.steps_per_epoch(device)
                    max_steps = max(1, int(epochs_done * per_epoch))
                run = self.training.run(device, params, version, max_steps=max_steps, now_s=start)
                if run is None:
                    self._skipped += 1
                    continue
                finish = start + download + compute + self._upload_s(device, len(run.envelope))
                (straggler_ends if straggler else ends).append(finish)
                finishes.append((finish, device, straggler, run))
            end = max(ends) if ends else (max(straggler_ends) if straggler_ends else start)
            if agg.round_deadline_s is not None:
                end = min(end, start + agg.round_deadline_s)
            # Stragglers work until the round closes and send what they have then.
            arrivals = sorted(
                (end if straggler else finish, device, run)
                for finish, device, straggler, run in finishes
            )
            for at, device, run in arrivals:
                if at > end:
                    self._lost += 1
                    continue
                self._events += 1
                self._count_upload(run)
                for number, envelope in enumerate((run.envelope, *run.extra)):
                    if number:
                        self._count_extra(run, envelope)
                    self._central_bytes += run.payload_bytes
                    self._central_wire += len(envelope)
                    self._count_outcome(
                        device, self.central.admit_update(envelope, at, self._key_id(device))
                    )
            self.now = end
            if self.central.make_version():
                empty_rounds = 0
                self._on_version()
            else:
                empty_rounds += 1
                if empty_rounds >= _MAX_EMPTY_ROUNDS:
                    break
            self.now += agg.model_propagation_s

    def _straggler_epochs(self, rng: np.random.Generator) -> float:
        # FedProx's stragglers run randint(1, E) epochs (1..E-1); with E < 2 there is
        # no whole epoch to cut, so a straggler manages a uniform fraction of one.
        epochs = self.scenario.training.local_epochs
        if epochs >= 2:
            return float(rng.integers(1, math.floor(epochs)))
        return float(rng.uniform(0.0, epochs))

    # -- measuring -----------------------------------------------------------------

    def _record(self, *, evaluate: bool) -> None:
        central = self.central
        data = self.data
        metrics: dict[str, float] = {}
        train_loss = math.nan
        if evaluate:
            metrics = self.training.evaluate(
                central.params, data.X_test, data.y_test, data.test_owner
            )
            if self.scenario.eval.train_loss:
                X, y = data.all_train
                train_loss = self.training.evaluate(central.params, X, y, data.train_owner)["loss"]
            if self._backdoor_test is not None:
                X_trig, y_target = self._backdoor_test
                rate = self.training.evaluate(central.params, X_trig, y_target)["accuracy"]
                if self._backdoor_success and self._backdoor_success[-1][0] == central.version:
                    self._backdoor_success[-1] = (central.version, rate)
                else:
                    self._backdoor_success.append((central.version, rate))
        accuracy = metrics.get("accuracy", math.nan)
        loss = metrics.get("loss", math.nan)
        r2 = metrics.get("r2", math.nan)
        mse = metrics.get("mse", math.nan)
        if self.records and self.records[-1].version == central.version:
            # The last version, evaluated after the fact: keep what it measured then.
            last = self.records[-1]
            last.test_accuracy, last.test_loss, last.train_loss = accuracy, loss, train_loss
            last.test_r2, last.test_mse = r2, mse
            return
        hist = central.last_hist
        leaves = sum(hist)
        mean_tau = sum(i * c for i, c in enumerate(hist)) / leaves if leaves else math.nan
        record = VersionRecord(
            version=central.version,
            time_s=self.now,
            test_accuracy=accuracy,
            test_loss=loss,
            train_loss=train_loss,
            uploaded_bytes=self._uploaded,
            uploaded_wire_bytes=self._uploaded_wire,
            updates_uploaded=self._updates_uploaded,
            central_bytes=self._central_bytes,
            central_wire_bytes=self._central_wire,
            updates_in_version=central.last_update_count,
            mean_staleness=mean_tau,
            participants=self._participants,
            stale_rejections=self._stale,
            lost_runs=self._lost,
            test_r2=r2,
            test_mse=mse,
        )
        self.records.append(record)


def run_scenario(
    scenario: Scenario, *, progress: ProgressCallback | None = None, workers: int = 0
) -> RunResult:
    """Build and run one scenario in process.

    Args:
        scenario: the scenario (its seed included).
        progress: called with the fraction done after each version.
        workers: processes that train the devices (see :class:`Simulation`).
    """
    threads = _one_torch_thread() if scenario.model.is_torch else None
    try:
        return Simulation(scenario, progress=progress, workers=workers).run()
    finally:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)


def _one_torch_thread() -> int | None:
    """Set torch to one thread and return the old count; None without torch (a user's Trainer)."""
    try:
        import torch
    except ImportError:
        return None
    # One simulated device at a time: torch's intra-op threads only add overhead
    # on models this small, and the CPUs are shared with other runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    return threads


def _influence(
    defences: DefencesSpec | None, data: FederatedData, key_ids: Callable[[], list[str]]
) -> tuple[InfluenceRules | None, float | None]:
    """The core's influence rules and norm bound of ``[defences]`` (None, None: none or unsafe).

    ``max_samples = "declared"``: every device is registered with its declared
    data size, its training set's (the operator registered each device, the
    attackers too, so theirs is what they really hold; never what an update
    claims), and each update is capped at its device's size, as the edge daemon
    does with a key registry whose entries carry ``max_samples``
    (``InfluenceRules.weight_cap``). A number: no device declares a size and
    that number caps every update.

    Args:
        defences: ``[defences]``.
        data: the fleet's data (its devices' training set sizes).
        key_ids: every device's key id, by device index (called only when needed).
    """
    if defences is None or not defences.active:
        return None, None
    declared: dict[str, int] = {}
    if defences.max_samples == "declared":
        declared = {
            key: max(1, int(size)) for key, size in zip(key_ids(), data.samples, strict=True)
        }
    rules = InfluenceRules(
        max_samples=DEFAULT_MAX_SAMPLES
        if defences.max_samples == "declared"
        else defences.max_samples,
        adaptive_norm=defences.adaptive if defences.norm_bound == "adaptive" else None,
        max_updates_per_version=defences.max_updates_per_version,
        rate_per_s=defences.rate_per_s,
        burst=defences.burst,
        reject_future_base=defences.reject_future_base,
        declared=declared,
        derive_cap=defences.max_samples == "declared",
        reputation=defences.reputation,
    )
    return rules, defences.max_norm
