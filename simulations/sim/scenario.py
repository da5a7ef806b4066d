"""Fleet scenarios: the TOML format both engines read, parsed into frozen specs; no engine imports.

Imports the standard library, ``protocol`` (errors, codec names), the tier
policies whose own config readers it reuses (``tiers.flush``,
``tiers.staleness``, ``tiers.optimizers``) and the client's plug-in syntax
(``client.plugins.is_import_path``, ``client.trainers.LrSchedule``; neither
imports torch); never a bus, trio, a model or an engine. A scenario says *what*
runs (fleet, data, model, local training, client behaviour, aggregation, codec,
when to stop); ``engine.py`` (in-process, virtual clock) and ``mesh.py`` (real
daemons) say *how*.

``[model]`` and ``[data]`` take the keys a device config takes (``factory``,
``args``, ``local``, ``batchnorm``; ``path`` or ``loader``, ``label``, ``task``),
with the same meaning; the old ``dataset = "synthetic" | "digits"`` and
``training.model`` / ``training.hidden`` are read as their aliases.

A file may start with ``base = "other.toml"``: it is read first and this file's
tables are merged over it key by key (arrays of tables are replaced whole), so
variants of one experiment share one description of the fleet and the data.
``--set a.b=value`` overrides (TOML values) are applied to the merged tables
before anything is checked. The format, with every key and its default, is in
``simulations/scenarios/README.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from fedtier.client.plugins import is_import_path
from fedtier.client.trainers import LrSchedule
from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import ConfigError, LocalProtocolError
from fedtier.protocol.files import ConfigTable, read_toml
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.optimizers import make_optimizer
from fedtier.tiers.staleness import StalenessPolicy

__all__ = [
    "AggregationSpec",
    "CentralSpec",
    "ClientsSpec",
    "CodecSettings",
    "DataSpec",
    "DeviceKind",
    "EvalSpec",
    "FleetSpec",
    "Scenario",
    "StopSpec",
    "TierSpec",
    "TrainingSpec",
    "apply_override",
    "dump_toml",
    "load_scenario",
    "parse_scenario",
]

_MAX_BASE_DEPTH: Final = 8
SYNTHETIC_LOADER: Final = "fedtier.simulations.datasets:synthetic"
DIGITS_LOADER: Final = "fedtier.simulations.datasets:digits"
# The old ``dataset = ...`` names, and the built-in loaders they stand for.
DATASET_ALIASES: Final = {"synthetic": SYNTHETIC_LOADER, "digits": DIGITS_LOADER}
_BUILTIN_NAMES: Final = {loader: name for name, loader in DATASET_ALIASES.items()}
Task = Literal["classification", "regression"]
Partition = Literal["loader", "dirichlet", "iid"]
Holdout = Literal["global", "device", "loader"]
_TASKS: Final[tuple[Task, ...]] = ("classification", "regression")
_PARTITIONS: Final[tuple[Partition, ...]] = ("loader", "dirichlet", "iid")
_HOLDOUTS: Final[tuple[Holdout, ...]] = ("global", "device", "loader")
# A codec name with "%" needs a model size to resolve; any size >= 100 checks the syntax.
_CODEC_CHECK_PARAMS: Final = 1_000_000


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
            ``"mlp"`` (``client.trainers.make_mlp``, torch) or an import path
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


# -- reading files ------------------------------------------------------------------


def _merge(base: MutableMapping[str, object], over: Mapping[str, object]) -> None:
    for key, value in over.items():
        current = base.get(key)
        if isinstance(current, MutableMapping) and isinstance(value, Mapping):
            _merge(current, value)
        else:
            base[key] = copy.deepcopy(value)


def _read_with_bases(path: Path, depth: int = 0) -> dict[str, object]:
    if depth > _MAX_BASE_DEPTH:
        raise ConfigError(f"scenario {path} has more than {_MAX_BASE_DEPTH} levels of base files")
    raw = read_toml(path, what="scenario file")
    base_name = raw.pop("base", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str) or not base_name:
        raise ConfigError(f"{path.name}: base is {base_name!r}; expected a file name")
    merged = _read_with_bases(path.parent / base_name, depth + 1)
    _merge(merged, raw)
    return merged


def apply_override(tables: MutableMapping[str, object], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is TOML, else a bare string.

    Raises:
        ConfigError: no ``=``, an empty key, or a key that crosses a non-table.
    """
    key, sep, text = assignment.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    try:
        value: object = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    node = tables
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, MutableMapping):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a table")
        node = child
    node[path[-1]] = value


def load_scenario(
    path: Path, *, overrides: Sequence[str] = (), seed: int | None = None
) -> Scenario:
    """Read, merge, override and check a scenario file.

    Args:
        path: the TOML file.
        overrides: ``section.key=value`` assignments applied after merging.
        seed: replaces ``scenario.seed`` when given.

    Raises:
        ConfigError: one sentence naming the file, key and bad value.
    """
    tables = _read_with_bases(path)
    for assignment in overrides:
        apply_override(tables, assignment)
    if seed is not None:
        apply_override(tables, f"scenario.seed={seed}")
    return parse_scenario(tables, name=path.stem, base_dir=path.parent)


# -- checking -----------------------------------------------------------------------


def parse_scenario(
    tables: Mapping[str, object], *, name: str = "scenario", base_dir: Path | None = None
) -> Scenario:
    """Check merged scenario tables and build the :class:`Scenario`.

    Args:
        tables: the merged tables.
        name: the default scenario name (the file stem), also the source in errors.
        base_dir: the folder relative data paths are relative to (the
            scenario file's); None leaves them relative to the working directory.

    Raises:
        ConfigError: one sentence naming the key and bad value.
    """
    root = ConfigTable(tables, source=name, base=base_dir)
    meta = root.table("scenario")
    scenario_name = meta.string("name", name)
    description = meta.string("description", "")
    seed = meta.integer("seed", 0)
    meta.finish()
    fleet = _fleet(root.table("fleet"))
    data = _data(root.table("data"))
    training_table = root.table("training")
    model = _model(root.table("model"), training_table)
    training = _training(training_table)
    clients = _clients(root.table("clients"))
    aggregation = _aggregation(root.table("aggregation"))
    codec = _codec(root.table("codec"))
    stop = _stop(root.table("stop"))
    evaluation = _eval(root.table("eval"))
    root.finish()
    if aggregation.mode == "sync" and aggregation.clients_per_round > fleet.num_devices:
        raise ConfigError(
            f"{name}: aggregation.clients_per_round is {aggregation.clients_per_round} but the "
            f"fleet has only {fleet.num_devices} devices"
        )
    if stop.versions is None and stop.virtual_time_s is None:
        raise ConfigError(f"{name}: set stop.versions or stop.virtual_time_s (or both)")
    _check_model_and_training(name, model, training, data)
    if data.samples_per_device is not None and (
        data.dataset != "synthetic" or len(data.samples_per_device) != fleet.num_devices
    ):
        raise ConfigError(
            f"{name}: data.samples_per_device names {len(data.samples_per_device)} sample "
            f"counts; it needs dataset = 'synthetic' and one per device ({fleet.num_devices})"
        )
    if data.dataset == "digits" and fleet.num_devices * 2 > 1437:
        raise ConfigError(
            f"{name}: digits has 1,437 training examples, too few for {fleet.num_devices} "
            "devices; use dataset = 'synthetic'"
        )
    return Scenario(
        name=scenario_name,
        description=description,
        seed=seed,
        fleet=fleet,
        data=data,
        model=model,
        training=training,
        clients=clients,
        aggregation=aggregation,
        codec=codec,
        stop=stop,
        eval=evaluation,
        effective=copy.deepcopy(dict(tables)),
        base_dir=base_dir,
    )


def _optional_number(t: ConfigTable, key: str) -> float | None:
    """A number > 0, or None when absent, ``false`` or 0 (scenarios write 0 for "no limit")."""
    if t.raw(key) == 0:  # also ``false``
        return None
    return t.optional_number(key)


def _fleet(t: ConfigTable) -> FleetSpec:
    regions = t.integer("regions", 1, low=1)
    edges = t.integer("edges_per_region", 1, low=1)
    kinds: list[DeviceKind] = []
    for d in t.tables("devices"):
        kinds.append(
            DeviceKind(
                name=d.string("kind", f"kind{len(kinds)}"),
                count=d.integer("count", 1, low=1),
                speed=d.number("speed", 1.0, low=0.0, low_open=True),
                dropout=d.number("dropout", 0.0, low=0.0, high=1.0),
                data_volume=d.number("data_volume", 1.0, low=0.0, low_open=True),
                uplink_bytes_per_s=_optional_number(d, "uplink_bytes_per_s"),
                downlink_bytes_per_s=_optional_number(d, "downlink_bytes_per_s"),
            )
        )
        d.finish()
    if not kinds:
        raise ConfigError(f"{t.where} needs at least one [[fleet.devices]] table")
    t.finish()
    return FleetSpec(regions, edges, tuple(kinds))


def _check_model_and_training(
    name: str, model: ModelSpec, training: TrainingSpec, data: DataSpec
) -> None:
    """The settings only torch models have, refused by name for the numpy ``logreg``."""
    if model.is_torch:
        if data.task == "regression" and training.loss == "cross_entropy":
            raise ConfigError(
                f"{name}: training.loss 'cross_entropy' cannot fit data.task regression"
            )
        return
    torch_only = {
        "training.momentum": training.momentum != 0,
        "training.weight_decay": training.weight_decay != 0,
        "training.grad_clip": training.grad_clip is not None,
        "training.drop_last": training.drop_last,
        "training.min_batch": training.min_batch is not None,
        "training.lr_schedule": training.lr_schedule != LrSchedule(),
        "training.device": training.device != "cpu",
        "model.args": bool(model.args),
        "model.local": bool(model.local),
    }
    for key, used in torch_only.items():
        if used:
            raise ConfigError(
                f"{name}: {key} needs a torch model (model.factory = 'mlp' or a factory); "
                "the numpy logreg has none"
            )
    if training.optimizer != "sgd":
        raise ConfigError(
            f"{name}: training.optimizer {training.optimizer!r} needs a torch model; the numpy "
            "logreg trains with plain SGD"
        )
    if training.loss not in ("auto", "cross_entropy"):
        raise ConfigError(
            f"{name}: training.loss {training.loss!r} needs a torch model; the numpy logreg "
            "minimises cross-entropy"
        )
    if data.task == "regression":
        raise ConfigError(
            f"{name}: model logreg classifies; data.task is regression (use model.factory = "
            "'mlp' or a torch factory)"
        )


def _args(t: ConfigTable, key: str) -> tuple[tuple[str, object], ...]:
    """A free-form ``args`` table (its values are the callee's to check), sorted by name."""
    return tuple(sorted(t.mapping(key).items()))


def _data(t: ConfigTable) -> DataSpec:
    given = [key for key in ("dataset", "loader", "path") if t.has(key)]
    if len(given) > 1:
        raise ConfigError(
            f"{t.where} sets {' and '.join(given)}; name the data once: path (a file), "
            "loader (an import path) or dataset (a built-in)"
        )
    source = SYNTHETIC_LOADER
    if t.has("dataset"):
        source = DATASET_ALIASES[t.choice("dataset", tuple(DATASET_ALIASES), "synthetic")]
    elif t.has("loader"):
        source = t.string("loader")
        if not is_import_path(source):
            raise t.fail("loader", "an import path 'package.module:function'")
    elif t.has("path"):
        source = str(t.path("path"))
    label = t.raw("label")
    if label is not None and (
        not isinstance(label, str | int) or isinstance(label, bool) or label == ""
    ):
        raise t.fail("label", "a column name or index")
    if label is not None and not t.has("path"):
        raise ConfigError(f"{t.locate('label')} names a table column; it needs data.path")
    task = t.choice("task", _TASKS) if t.has("task") else None
    partition = t.choice("partition", _PARTITIONS) if t.has("partition") else None
    holdout = t.choice("holdout", _HOLDOUTS) if t.has("holdout") else None
    args = _args(t, "args")
    if args and t.has("path"):
        raise ConfigError(f"{t.locate('args')} are a loader's arguments; data.path names a file")
    samples_max = t.integer("samples_max", 0, low=0)
    seed_raw = t.raw("seed")
    spec = DataSpec(
        source=source,
        args=args,
        label=label,
        task=task,
        partition=partition,
        holdout=holdout,
        alpha=t.number("alpha", 0.0, low=0.0),
        beta=t.number("beta", 0.0, low=0.0),
        iid=t.boolean("iid", False),
        features=t.integer("features", 60, low=1),
        classes=t.integer("classes", 10, low=2),
        samples_log_mean=t.number("samples_log_mean", 4.0),
        samples_log_sigma=t.number("samples_log_sigma", 2.0, low=0.0),
        samples_min=t.integer("samples_min", 50, low=2),
        samples_max=samples_max or None,
        samples_per_device=t.integers("samples_per_device", low=2),
        test_fraction=t.number("test_fraction", 0.1, low=0.0, high=0.9, low_open=True),
        dirichlet_alpha=t.number("dirichlet_alpha", 0.5, low=0.0, low_open=True),
        quantity_sigma=t.number("quantity_sigma", 0.0, low=0.0),
        seed=None if seed_raw is None else t.integer("seed", 0),
    )
    t.finish()
    if spec.samples_max is not None and spec.samples_max < spec.samples_min:
        raise ConfigError(
            f"{t.locate('samples_max')} is {spec.samples_max}; it must be >= samples_min "
            f"({spec.samples_min})"
        )
    if spec.partition == "loader" and spec.holdout == "global":
        raise ConfigError(
            f"{t.locate('holdout')} is 'global', which needs the whole data in one load; "
            "with partition = 'loader' use 'loader' or 'device'"
        )
    if spec.holdout == "loader" and t.has("path"):
        raise ConfigError(
            f"{t.locate('holdout')} is 'loader' but data.path names a file, which has no test "
            "split; use 'global' or 'device'"
        )
    if spec.partition == "dirichlet" and spec.task == "regression":
        raise ConfigError(
            f"{t.locate('partition')} is 'dirichlet', a label skew, but data.task is "
            "regression; use 'iid'"
        )
    return spec


def _model(t: ConfigTable, training: ConfigTable) -> ModelSpec:
    """``[model]``, with ``training.model`` and ``training.hidden`` as its old names."""
    if t.has("factory") and training.has("model"):
        raise ConfigError(
            f"{t.where} sets factory and training.model sets it too; keep model.factory "
            "(training.model is its old name)"
        )
    factory = "logreg"
    if t.has("factory"):
        factory = t.string("factory")
        if factory not in ("logreg", "mlp") and not is_import_path(factory):
            raise t.fail("factory", "'logreg', 'mlp' or an import path 'package.module:factory'")
    elif training.has("model"):
        factory = training.choice("model", ("logreg", "mlp"), "logreg")
    args = dict(_args(t, "args"))
    if training.has("hidden"):
        hidden = training.integer("hidden", 32, low=1)
        if "hidden" in args:
            raise ConfigError(
                f"{training.locate('hidden')} and model.args.hidden are the same setting; "
                "keep model.args.hidden"
            )
        if factory == "mlp":
            args["hidden"] = hidden
    spec = ModelSpec(
        factory=factory,
        args=tuple(sorted(args.items())),
        local=t.strings("local"),
        batchnorm=t.choice("batchnorm", ("local", "global"), "local"),
    )
    t.finish()
    return spec


def _lr_schedule(t: ConfigTable) -> LrSchedule:
    table = dict(t.mapping("lr_schedule"))
    try:
        return LrSchedule(**table)  # type: ignore[arg-type]  # its own checks name bad values
    except TypeError:
        known = ", ".join(f.name for f in dataclasses.fields(LrSchedule))
        raise ConfigError(f"{t.locate('lr_schedule')} is {table!r}; it takes {known}") from None
    except LocalProtocolError as exc:
        raise ConfigError(f"{t.locate('lr_schedule')}: {exc}") from exc


def _training(t: ConfigTable) -> TrainingSpec:
    if t.has("epochs") and t.has("local_epochs"):
        raise ConfigError(
            f"{t.where} sets epochs and local_epochs, which are the same setting; keep one"
        )
    epochs_key = "epochs" if t.has("epochs") else "local_epochs"
    loss = t.string("loss", "auto")
    if loss not in ("auto", "cross_entropy", "mse") and not is_import_path(loss):
        raise t.fail("loss", "'auto', 'cross_entropy', 'mse' or an import path to a loss")
    spec = TrainingSpec(
        loss=loss,
        optimizer=t.choice("optimizer", ("sgd", "adam", "adamw"), "sgd"),
        lr=t.number("lr", 0.01, low=0.0, low_open=True),
        momentum=t.number("momentum", 0.0, low=0.0, high=0.99),
        weight_decay=t.number("weight_decay", 0.0, low=0.0),
        grad_clip=_optional_number(t, "grad_clip"),
        lr_schedule=_lr_schedule(t),
        batch_size=t.integer("batch_size", 10, low=1),
        drop_last=t.boolean("drop_last", False),
        min_batch=t.integer("min_batch", 0, low=0) or None,
        local_epochs=t.number(epochs_key, 1.0, low=0.0, low_open=True),
        mu=t.number("mu", 0.0, low=0.0),
        device=t.choice("device", ("cpu", "auto", "cuda"), "cpu"),
    )
    t.finish()
    return spec


def _clients(t: ConfigTable) -> ClientsSpec:
    concurrency = t.integer("concurrency", 0, low=0)
    spec = ClientsSpec(
        selection=t.choice("selection", ("uniform", "by_samples"), "uniform"),
        concurrency=concurrency or None,
        rest_s=t.number("rest_s", 0.0, low=0.0),
        compute_median_s=t.number("compute_median_s", 10.0, low=0.0, low_open=True),
        compute_sigma=t.number("compute_sigma", 1.0, low=0.0),
        latency_s=t.number("latency_s", 0.05, low=0.0),
        uplink_bytes_per_s=t.number("uplink_bytes_per_s", 1e6, low=0.0, low_open=True),
        downlink_bytes_per_s=t.number("downlink_bytes_per_s", 1e7, low=0.0, low_open=True),
        offline_s=t.number("offline_s", 300.0, low=0.0),
        straggler_fraction=t.number("straggler_fraction", 0.0, low=0.0, high=1.0),
        straggler_policy=t.choice("straggler_policy", ("drop", "partial"), "drop"),
    )
    t.finish()
    return spec


def _policies(t: ConfigTable, default_k: int) -> tuple[FlushPolicy, StalenessPolicy]:
    flush_table = dict(t.mapping("flush"))
    flush_table.setdefault("max_inputs", default_k)
    flush = FlushPolicy.from_config(flush_table, section=t.locate("flush"))
    staleness = StalenessPolicy.from_config(t.mapping("staleness"), section=t.locate("staleness"))
    return flush, staleness


def _check_codec_name(t: ConfigTable, key: str, default: str) -> str:
    name = t.string(key, default)
    try:
        CodecSpec.parse(name, num_params=_CODEC_CHECK_PARAMS)
    except LocalProtocolError as exc:
        raise ConfigError(f"{t.locate(key)}: {exc}") from exc
    return name


def _tier(t: ConfigTable, default_k: int) -> TierSpec:
    flush, staleness = _policies(t, default_k)
    spec = TierSpec(
        flush=flush,
        staleness=staleness,
        partial_codec=_check_codec_name(t, "partial_codec", "f32"),
        uplink_latency_s=t.number("uplink_latency_s", 0.02, low=0.0),
        uplink_bytes_per_s=_optional_number(t, "uplink_bytes_per_s"),
        max_norm=_optional_number(t, "max_norm"),
        norm_policy=t.choice("norm_policy", ("clip", "reject"), "clip"),
    )
    t.finish()
    return spec


def _central(t: ConfigTable) -> CentralSpec:
    flush, staleness = _policies(t, 10)
    optimizer = t.table("optimizer")
    name = optimizer.string("name", "fedavg")
    # Parameter names are the optimizer's to check; here they only have to be numbers.
    params = tuple((key, optimizer.number(key)) for key in optimizer.remaining())
    make_optimizer(name, **dict(params))  # ConfigError names a bad name or parameter
    t.finish()
    return CentralSpec(flush, staleness, name, params)


def _aggregation(t: ConfigTable) -> AggregationSpec:
    spec = AggregationSpec(
        mode=t.choice("mode", ("sync", "async"), "async"),
        topology=t.choice("topology", ("flat", "hierarchical"), "hierarchical"),
        model_propagation_s=t.number("model_propagation_s", 0.1, low=0.0),
        clients_per_round=t.integer("clients_per_round", 10, low=1),
        round_deadline_s=_optional_number(t, "round_deadline_s"),
        edge=_tier(t.table("edge"), 10),
        regional=_tier(t.table("regional"), 10),
        central=_central(t.table("central")),
    )
    t.finish()
    return spec


def _codec(t: ConfigTable) -> CodecSettings:
    spec = CodecSettings(
        name=_check_codec_name(t, "name", "f32"),
        error_feedback=t.boolean("error_feedback", False),
    )
    t.finish()
    return spec


def _stop(t: ConfigTable) -> StopSpec:
    versions = t.integer("versions", 0, low=0)
    spec = StopSpec(
        versions=versions or None,
        virtual_time_s=_optional_number(t, "virtual_time_s"),
    )
    t.finish()
    return spec


def _eval(t: ConfigTable) -> EvalSpec:
    spec = EvalSpec(
        every_versions=t.integer("every_versions", 1, low=1),
        train_loss=t.boolean("train_loss", True),
    )
    t.finish()
    return spec


# -- writing ------------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} as TOML")


def dump_toml(tables: Mapping[str, object]) -> str:
    """Write nested tables back as TOML (scalars first, then sub-tables); for reports."""
    lines: list[str] = []

    def emit(prefix: str, table: Mapping[str, object]) -> None:
        top = not prefix
        scalars = {k: v for k, v in table.items() if not _is_table_like(v, top)}
        nested = {k: v for k, v in table.items() if _is_table_like(v, top)}
        if prefix and (scalars or not nested):
            lines.append(f"[{prefix}]")
        for key, value in scalars.items():
            lines.append(f"{key} = {_toml_value(value)}")
        if scalars:
            lines.append("")
        for key, value in nested.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, list):
                for item in value:
                    lines.append(f"[[{name}]]")
                    lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
                    lines.append("")
            else:
                assert isinstance(value, Mapping)
                emit(name, value)

    emit("", tables)
    return "\n".join(lines).rstrip() + "\n"


def _is_table_like(value: object, top: bool) -> bool:
    if isinstance(value, Mapping):
        # Small leaf tables (flush = {...}) stay inline, as they are written in scenarios.
        return top or any(isinstance(v, Mapping) for v in value.values()) or len(value) > 4
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)
