"""The frozen specs a scenario is parsed into (what runs); never a reader, an engine, a bus or trio.

``scenario.py`` reads and checks the TOML into these; ``engine.py`` (in-process,
virtual clock), ``mesh_engine.py`` (real daemons), ``data.py`` and ``devices.py``
take them. Imports the standard library, the tier policies a tier spec holds
(``tiers.flush``, ``tiers.staleness``) and ``client.trainers.LrSchedule``
(which imports no torch) and the sans-IO tier core's influence and robust
rules (``tiers.core``) that ``[defences]`` holds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from fedtier.client.trainers import LrSchedule
from fedtier.tiers.core import (
    DEFAULT_BURST,
    DEFAULT_MAX_UPDATES_PER_VERSION,
    DEFAULT_RATE_PER_S,
    DEFAULT_WARMUP_NORM,
    AdaptiveNorm,
    ReputationRules,
    RobustRules,
)
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.staleness import StalenessPolicy

__all__ = [
    "ATTACK_KINDS",
    "DATASET_ALIASES",
    "DIGITS_LOADER",
    "SYNTHETIC_LOADER",
    "AggregationSpec",
    "AttackKind",
    "AttackSpec",
    "CentralSpec",
    "ClientsSpec",
    "CodecSettings",
    "DataSpec",
    "DefencesSpec",
    "DeviceKind",
    "EvalSpec",
    "FleetSpec",
    "Holdout",
    "ModelSpec",
    "Partition",
    "Scenario",
    "StopSpec",
    "Task",
    "TierSpec",
    "TrainingSpec",
]

SYNTHETIC_LOADER: Final = "fedtier.simulations.datasets:synthetic"
DIGITS_LOADER: Final = "fedtier.simulations.datasets:digits"
# The old ``dataset = ...`` names, and the built-in loaders they stand for.
DATASET_ALIASES: Final = {"synthetic": SYNTHETIC_LOADER, "digits": DIGITS_LOADER}
_BUILTIN_NAMES: Final = {loader: name for name, loader in DATASET_ALIASES.items()}
Task = Literal["classification", "regression"]
Partition = Literal["loader", "dirichlet", "iid"]
Holdout = Literal["global", "device", "loader"]
AttackKind = Literal[
    "sign_flip", "scale", "weight_inflation", "stale_base", "future_base", "backdoor"
]
ATTACK_KINDS: Final[tuple[AttackKind, ...]] = (
    "sign_flip",
    "scale",
    "weight_inflation",
    "stale_base",
    "future_base",
    "backdoor",
)


@dataclass(frozen=True, slots=True)
class DeviceKind:
    """One kind of device and how many of it every edge site has.

    Attributes:
        name: the kind's name (``"phone"``, ``"vehicle"``...).
        count: devices of this kind per edge site.
        speed: multiplier of the per-run compute time (2.0 is twice as slow).
        dropout: probability that a run is lost: the device goes offline
            mid-run and its update never arrives.
        data_volume: relative share of the data a device of this kind holds
            (digits partition; the synthetic generator draws its own sizes).
        uplink_bytes_per_s: this kind's uplink, or None for the clients' default.
        downlink_bytes_per_s: this kind's downlink, or None for the default.
    """

    name: str
    count: int
    speed: float = 1.0
    dropout: float = 0.0
    data_volume: float = 1.0
    uplink_bytes_per_s: float | None = None
    downlink_bytes_per_s: float | None = None


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """Regions, edges per region, and the devices of every edge.

    Attributes:
        regions: number of regions (one regional daemon each).
        edges_per_region: edge sites per region.
        kinds: the devices of each edge site.
    """

    regions: int
    edges_per_region: int
    kinds: tuple[DeviceKind, ...]

    @property
    def num_edges(self) -> int:
        """Edge sites in the fleet."""
        return self.regions * self.edges_per_region

    @property
    def devices_per_edge(self) -> int:
        """Devices at every edge site."""
        return sum(k.count for k in self.kinds)

    @property
    def num_devices(self) -> int:
        """Devices in the fleet."""
        return self.num_edges * self.devices_per_edge


@dataclass(frozen=True, slots=True)
class DataSpec:
    """Which data, how it is held out, and how it is spread over the devices.

    The data is named as everywhere else (``client.plugins.load_data``): a file
    (``path``) or a loader import path (``loader``); ``dataset = "synthetic"`` and
    ``"digits"`` are the old names of the built-in loaders
    ``fedtier.simulations.datasets:synthetic`` and ``:digits``.

    Attributes:
        source: the loader's import path, or the data file (relative paths
            resolved against the scenario file's folder).
        args: keyword arguments for the loader (``[data.args]``), sorted by name.
        label: a table's label column (name or index), None for the last one.
        task: ``"classification"`` or ``"regression"``, None to infer it from
            the labels.
        partition: ``"loader"`` (the loader shards: it is called once per
            device with that device's ``DataRequest``), ``"dirichlet"`` (label
            skew) or ``"iid"`` (one load, split by the simulator); None picks
            ``"loader"`` for synthetic, else ``"dirichlet"`` for classification and
            ``"iid"`` for regression.
        holdout: where the test examples come from: ``"global"`` (a share of the
            whole data, before partitioning, stratified for classification),
            ``"device"`` (a share of each device's data; models with local
            tensors are then scored on their own device's share) or
            ``"loader"`` (the loader's ``split = "test"``); None picks
            ``"loader"`` with ``partition = "loader"``, else ``"global"``.
        alpha: synthetic: spread of the devices' models (``u_k ~ N(0, alpha)``).
        beta: synthetic: spread of the devices' feature means (``B_k ~ N(0, beta)``).
        iid: synthetic: one shared model and zero-mean features (Synthetic IID).
        features: synthetic: input dimension (60 in the paper).
        classes: synthetic: number of classes (10 in the paper).
        samples_log_mean: synthetic: samples per device are
            ``int(lognormal(samples_log_mean, samples_log_sigma)) + samples_min``.
        samples_log_sigma: see ``samples_log_mean``.
        samples_min: see ``samples_log_mean``.
        samples_max: synthetic: cap on samples per device, None for none.
        samples_per_device: synthetic: each device's sample count, replacing the
            log-normal draw (drawn anyway, so a seed's model and input means per
            device stay those of the same scenario without it); one entry per
            device. None: draw them.
        test_fraction: the held-out share (synthetic: of each device's data,
            the paper's 10%; ``holdout = "global"``: of the whole data;
            ``"device"``: of each device's).
        dirichlet_alpha: Dirichlet concentration over labels.
        quantity_sigma: quantity skew; a device's share of the data is
            ``data_volume * lognormal(0, quantity_sigma)``.
        seed: seed of the data, or None to use the run's seed.
    """

    source: str = SYNTHETIC_LOADER
    args: tuple[tuple[str, object], ...] = ()
    label: str | int | None = None
    task: Task | None = None
    partition: Partition | None = None
    holdout: Holdout | None = None
    alpha: float = 0.0
    beta: float = 0.0
    iid: bool = False
    features: int = 60
    classes: int = 10
    samples_log_mean: float = 4.0
    samples_log_sigma: float = 2.0
    samples_min: int = 50
    samples_max: int | None = None
    samples_per_device: tuple[int, ...] | None = None
    test_fraction: float = 0.1
    dirichlet_alpha: float = 0.5
    quantity_sigma: float = 0.0
    seed: int | None = None

    @property
    def dataset(self) -> str:
        """The built-in's short name (``"synthetic"``, ``"digits"``...) or the source as written."""
        return _BUILTIN_NAMES.get(self.source, self.source)

    def loader_args(self) -> dict[str, object]:
        """The loader's keyword arguments: synthetic's own keys, then ``[data.args]``."""
        args: dict[str, object] = {}
        if self.source == SYNTHETIC_LOADER:
            args = {
                "alpha": self.alpha,
                "beta": self.beta,
                "iid": self.iid,
                "features": self.features,
                "classes": self.classes,
                "samples_log_mean": self.samples_log_mean,
                "samples_log_sigma": self.samples_log_sigma,
                "samples_min": self.samples_min,
                "samples_max": self.samples_max,
                "samples_per_device": self.samples_per_device,
                "test_fraction": self.test_fraction,
            }
        args.update(self.args)
        return args


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The model every device trains (``client.plugins.load_model``), and what stays local.

    Attributes:
        factory: ``"logreg"`` (numpy multinomial logistic regression),
            ``"mlp"`` (``client.torch_trainer.make_mlp``, torch) or an import path
            ``"package.module:factory"`` to a function returning a
            ``torch.nn.Module``.
        args: the factory's keyword arguments (``[model.args]``), sorted by name.
        local: glob patterns of ``state_dict`` names kept on each device (never
            aggregated).
        batchnorm: ``"local"`` (FedBN: BatchNorm weights and statistics stay on
            each device) or ``"global"`` (averaged like every other tensor).
    """

    factory: str = "logreg"
    args: tuple[tuple[str, object], ...] = ()
    local: tuple[str, ...] = ()
    batchnorm: Literal["local", "global"] = "local"

    @property
    def is_torch(self) -> bool:
        """Whether the model is a torch module (anything but the numpy ``logreg``)."""
        return self.factory != "logreg"


@dataclass(frozen=True, slots=True)
class TrainingSpec:
    """Local training on every device (``client.trainers``), as a device config says it.

    Attributes:
        loss: ``"auto"`` (cross-entropy for classification, MSE for
            regression), ``"cross_entropy"``, ``"mse"`` or an import path to a
            loss callable ``(outputs, targets) -> tensor`` (torch models only).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"`` (torch models; the numpy
            ``logreg`` has plain SGD only).
        lr: local learning rate.
        momentum: SGD momentum (torch models only).
        weight_decay: L2 weight decay (torch models only).
        grad_clip: clip the gradient's L2 norm to this, None for no clipping.
        lr_schedule: the learning rate per round of a device (its own
            ``train`` calls), ``client.trainers.LrSchedule``.
        batch_size: examples per local step.
        drop_last: skip each epoch's last batch when smaller than
            ``batch_size``.
        min_batch: the smallest batch to step on (a smaller remainder joins
            the batch before it); None: 2 for a model with BatchNorm, which
            cannot train on a batch of one, else 1.
        local_epochs: passes over the local data per run (fractions allowed);
            ``epochs`` is the device config's name for it.
        mu: FedProx proximal coefficient, 0 for plain local SGD.
        device: where torch trains: ``"cpu"`` (the default: one simulated
            device at a time, deterministic), ``"auto"`` or ``"cuda"``.
    """

    loss: str = "auto"
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float | None = None
    lr_schedule: LrSchedule = dataclasses.field(default_factory=LrSchedule)
    batch_size: int = 10
    drop_last: bool = False
    min_batch: int | None = None
    local_epochs: float = 1.0
    mu: float = 0.0
    device: Literal["cpu", "auto", "cuda"] = "cpu"


@dataclass(frozen=True, slots=True)
class ClientsSpec:
    """How devices are picked, how long they take, and how they fail.

    Attributes:
        selection: ``"uniform"`` or ``"by_samples"`` (probability proportional
            to local data), for sync rounds and async concurrency slots.
        concurrency: async: devices training at once, None for every device.
        rest_s: async: mean (exponential) idle time between two runs of a device.
        compute_median_s: median compute time of one full run; each run draws
            ``compute_median_s * speed * lognormal(0, compute_sigma)``.
        compute_sigma: log-normal sigma of compute times.
        latency_s: one-way network latency of a device.
        uplink_bytes_per_s: default device uplink.
        downlink_bytes_per_s: default device downlink.
        offline_s: mean (exponential) time a device that dropped out stays away.
        straggler_fraction: sync: share of each round's devices that are
            stragglers; a straggler manages ``randint(1, local_epochs)`` epochs
            by the round's end (FedProx, section 5.2).
        straggler_policy: sync: ``"drop"`` (FedAvg drops stragglers) or
            ``"partial"`` (FedProx keeps their partial work).
    """

    selection: Literal["uniform", "by_samples"] = "uniform"
    concurrency: int | None = None
    rest_s: float = 0.0
    compute_median_s: float = 10.0
    compute_sigma: float = 1.0
    latency_s: float = 0.05
    uplink_bytes_per_s: float = 1e6
    downlink_bytes_per_s: float = 1e7
    offline_s: float = 300.0
    straggler_fraction: float = 0.0
    straggler_policy: Literal["drop", "partial"] = "drop"


@dataclass(frozen=True, slots=True)
class TierSpec:
    """One edge or regional tier's aggregation settings (as in its daemon's TOML).

    Attributes:
        flush: when its buffer flushes (``tiers.flush.FlushPolicy``).
        staleness: its staleness function and cap (``tiers.staleness``).
        partial_codec: codec name of the partials it sends up.
        uplink_latency_s: delay of its partials to the next tier.
        uplink_bytes_per_s: bandwidth to the next tier, None for unlimited.
        max_norm: edge: L2 bound on device updates, None for none.
        norm_policy: edge: ``"clip"`` or ``"reject"`` above ``max_norm``.
    """

    flush: FlushPolicy
    staleness: StalenessPolicy
    partial_codec: str = "f32"
    uplink_latency_s: float = 0.02
    uplink_bytes_per_s: float | None = None
    max_norm: float | None = None
    norm_policy: Literal["clip", "reject"] = "clip"


@dataclass(frozen=True, slots=True)
class CentralSpec:
    """The central's buffer, staleness and server optimizer.

    Attributes:
        flush: when it makes a version (the FedBuff ``K`` in a flat topology).
        staleness: its staleness function and cap.
        optimizer: server optimizer name (``tiers.optimizers.make_optimizer``).
        optimizer_params: its parameters, e.g. ``(("lr", 1.0),)``.
    """

    flush: FlushPolicy
    staleness: StalenessPolicy
    optimizer: str = "fedavg"
    optimizer_params: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class AggregationSpec:
    """Synchronous rounds, or buffered asynchronous aggregation over one or three tiers.

    Attributes:
        mode: ``"sync"`` (rounds with a barrier) or ``"async"`` (FedBuff).
        topology: async: ``"flat"`` (devices fold straight into the central)
            or ``"hierarchical"`` (edge -> regional -> central).
        model_propagation_s: delay before the tiers (and so the devices) see a
            new version.
        clients_per_round: sync: devices per round.
        round_deadline_s: sync: a round closes this long after it starts,
            None to wait for every device that has not dropped out.
        edge: edge tier settings (hierarchical).
        regional: regional tier settings (hierarchical).
        central: the central's settings.
    """

    mode: Literal["sync", "async"]
    topology: Literal["flat", "hierarchical"]
    model_propagation_s: float
    clients_per_round: int
    round_deadline_s: float | None
    edge: TierSpec
    regional: TierSpec
    central: CentralSpec


@dataclass(frozen=True, slots=True)
class CodecSettings:
    """How devices compress their updates.

    Attributes:
        name: a ``protocol.codecs.CodecSpec.parse`` name (``"f32"``, ``"i8"``,
            ``"top1%+f16"``...).
        error_feedback: carry the compression residual into the next update
            (``client.error_feedback``).
    """

    name: str = "f32"
    error_feedback: bool = False


@dataclass(frozen=True, slots=True)
class StopSpec:
    """When a run ends (the first limit reached).

    Attributes:
        versions: model versions (sync: rounds), None for no limit.
        virtual_time_s: virtual seconds, None for no limit.
    """

    versions: int | None = None
    virtual_time_s: float | None = None


@dataclass(frozen=True, slots=True)
class EvalSpec:
    """How often the global model is evaluated.

    Attributes:
        every_versions: evaluate every this many versions (and the last one).
        train_loss: also compute the loss over all training data (the FedProx
            paper's metric; costs a pass over every device's data).
    """

    every_versions: int = 1
    train_loss: bool = True


@dataclass(frozen=True, slots=True)
class AttackSpec:
    """``[attack]``: registered devices that lie (``simulations.sim._attack`` crafts their updates).

    Malicious devices train like honest ones and seal their updates with their
    own registered keys through the same envelope path; what differs is the
    vector and the header fields they put in it.

    Attributes:
        kind: ``sign_flip`` (``-scale`` times the honest delta), ``scale``
            (``scale`` times it), ``weight_inflation`` (the sign-flipped delta
            claiming ``claimed_samples`` examples), ``stale_base`` (a rollback:
            the delta from the current model to the device's training result
            from the initial model, ``scale`` times, claiming the current
            version as its base), ``future_base`` (the sign-flipped delta times
            ``scale``, claiming base ``current + base_offset``, ``burst`` copies
            per run) or ``backdoor`` (model replacement, Bagdasaryan et al.
            2020: train on data where ``poison_fraction`` of the examples carry
            the trigger and the ``target`` label, then send ``scale`` times that
            delta).
        fraction: share of the devices that are malicious, in (0, 1]; at least one.
        scale: the factor of the kind (defaults: 1 sign_flip, weight_inflation,
            stale_base and future_base; 10 scale and backdoor).
        claimed_samples: ``weight_inflation``: the ``n_samples`` it claims.
        base_offset: ``future_base``: how far above the current version its
            claimed base lies.
        burst: updates per run (distinct update ids and seqs, the same vector):
            a flood within one arrival (default 10 for future_base, else 1).
        target: ``backdoor``: the class triggered inputs should land in.
        trigger: ``backdoor``: the feature indices the trigger sets.
        trigger_value: ``backdoor``: the value they are set to.
        poison_fraction: ``backdoor``: share of the attacker's training
            examples stamped and relabelled (the rest stay clean, so its main
            task accuracy stays up).
        seed: which devices are malicious (None: the run's seed).
    """

    kind: AttackKind
    fraction: float
    scale: float = 1.0
    claimed_samples: int = 2**31
    base_offset: int = 1000
    burst: int = 1
    target: int = 1
    trigger: tuple[int, ...] = (54, 55, 62, 63)
    trigger_value: float = 1.0
    poison_fraction: float = 0.5
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class DefencesSpec:
    """``[defences]``: the tier core's bounds on one device's influence, and ``[robust]`` per tier.

    The device-facing bounds (``tiers.core._influence``) apply where device
    updates are admitted: the edges, or the central in a flat topology.

    Attributes:
        unsafe: every bound off (the explicit switch; the other keys are then
            checked but not applied).
        max_samples: the cap on one update's weight; ``"declared"``: each
            device's declared data size, which is its training set (what the
            operator registered for it; never a self-reported number), as the
            edge daemon's default does with sizes in its key registry; a
            number: no device declares a size and that number caps every update.
            The defaults of this table are the edge daemon's
            (``tiers.core._influence``), so "defences on" is what it would do.
        norm_bound: ``adaptive`` (``norm_factor`` times the ``norm_quantile``
            of recent accepted norms, ``max_norm`` until ``norm_warmup`` were
            seen) or ``fixed`` (``max_norm``).
        max_norm: the fixed bound or the adaptive bound's warm-up value.
        adaptive: the adaptive bound's settings (None when fixed).
        max_updates_per_version: accepted updates per device while a tier knows
            one version (None: unlimited).
        rate_per_s: updates per second per device (None: unlimited).
        burst: the token bucket's size.
        reject_future_base: refuse a base version above the tier's.
        edge_robust: ``[defences.robust.edge]``.
        regional_robust: ``[defences.robust.regional]``.
        reputation: ``[defences.reputation]``, the edge's per-device reputation
            (``tiers.core._reputation``; on by default, as at the edge daemon);
            None: off (``enabled = false``).
    """

    unsafe: bool = False
    max_samples: int | Literal["declared"] = "declared"
    norm_bound: Literal["adaptive", "fixed"] = "adaptive"
    max_norm: float = DEFAULT_WARMUP_NORM
    adaptive: AdaptiveNorm | None = dataclasses.field(default_factory=AdaptiveNorm)
    max_updates_per_version: int | None = DEFAULT_MAX_UPDATES_PER_VERSION
    rate_per_s: float | None = DEFAULT_RATE_PER_S
    burst: float = DEFAULT_BURST
    reject_future_base: bool = True
    edge_robust: RobustRules = dataclasses.field(default_factory=RobustRules)
    regional_robust: RobustRules = dataclasses.field(default_factory=RobustRules)
    reputation: ReputationRules | None = dataclasses.field(default_factory=ReputationRules)

    @property
    def active(self) -> bool:
        """Whether any bound applies (not ``unsafe``)."""
        return not self.unsafe


@dataclass(frozen=True, slots=True)
class Scenario:
    """A whole scenario, checked.

    Attributes:
        name: short name (file stem by default).
        description: one paragraph for the report.
        seed: the run's seed.
        fleet: regions, edges, devices.
        data: dataset and partition.
        model: the model and which of its tensors stay local.
        training: local training.
        clients: speed, availability, network.
        aggregation: sync rounds or async tiers.
        codec: device codec and error feedback.
        stop: when to stop.
        eval: evaluation schedule.
        effective: the merged tables as run (base files and overrides applied),
            for the report.
        base_dir: the scenario file's folder: relative data paths were
            resolved against it, and loaders get it in their ``DataRequest``.
        attack: ``[attack]``, None for an honest fleet.
        defences: ``[defences]``, None when the table is absent: then no
            influence bound applies beyond ``aggregation.edge.max_norm`` (what
            every scenario without the table always ran).
    """

    name: str
    description: str
    seed: int
    fleet: FleetSpec
    data: DataSpec
    model: ModelSpec
    training: TrainingSpec
    clients: ClientsSpec
    aggregation: AggregationSpec
    codec: CodecSettings
    stop: StopSpec
    eval: EvalSpec
    effective: Mapping[str, object]
    base_dir: Path | None = None
    attack: AttackSpec | None = None
    defences: DefencesSpec | None = None
