"""Fleet scenarios: reading the TOML both engines run, with its checks and overrides; no engine.

Imports the standard library, ``protocol`` (errors, codec names, the typed
TOML reader), the tier policies whose own config readers it reuses
(``tiers.flush``, ``tiers.staleness``, ``tiers.optimizers``) and the client's
plug-in syntax (``client.plugins.is_import_path``,
``client.trainers.LrSchedule``; neither imports torch); never a bus, trio, a
model or an engine. A scenario says *what* runs (fleet, data, model, local
training, client behaviour, aggregation, codec, when to stop); ``engine.py``
(in-process, virtual clock) and ``mesh.py`` (real daemons) say *how*.

The frozen specs a scenario is parsed into live in ``specs.py`` and the TOML
writer of the report (``dump_toml``) in ``_toml_out.py``; this module
re-exports both, so ``scenario`` stays the one address of the format.

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
import tomllib
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Final, Literal

from fedtier.client.plugins import is_import_path
from fedtier.client.trainers import LrSchedule
from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import ConfigError, LocalProtocolError
from fedtier.protocol.files import ConfigTable, read_toml
from fedtier.simulations.sim._toml_out import dump_toml
from fedtier.simulations.sim.specs import (
    ATTACK_KINDS,
    DATASET_ALIASES,
    SYNTHETIC_LOADER,
    AggregationSpec,
    AttackSpec,
    CentralSpec,
    ClientsSpec,
    CodecSettings,
    DataSpec,
    DefencesSpec,
    DeviceKind,
    EvalSpec,
    FleetSpec,
    Holdout,
    ModelSpec,
    Partition,
    Scenario,
    StopSpec,
    Task,
    TierSpec,
    TrainingSpec,
)
from fedtier.tiers.config import parse_reputation
from fedtier.tiers.core import (
    OUTLIER_SCORES,
    ROBUST_RULES,
    AdaptiveNorm,
    RobustRules,
)
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.optimizers import make_optimizer
from fedtier.tiers.staleness import StalenessPolicy

__all__ = [
    "AggregationSpec",
    "AttackSpec",
    "CentralSpec",
    "ClientsSpec",
    "CodecSettings",
    "DataSpec",
    "DefencesSpec",
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
_TASKS: Final[tuple[Task, ...]] = ("classification", "regression")
_PARTITIONS: Final[tuple[Partition, ...]] = ("loader", "dirichlet", "iid")
_HOLDOUTS: Final[tuple[Holdout, ...]] = ("global", "device", "loader")
# A codec name with "%" needs a model size to resolve; any size >= 100 checks the syntax.
_CODEC_CHECK_PARAMS: Final = 1_000_000


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
    attack = _attack(root.table("attack")) if root.has("attack") else None
    defences = _defences(root.table("defences")) if root.has("defences") else None
    root.finish()
    _check_attack_and_defences(name, attack, defences, aggregation, fleet, data)
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
        attack=attack,
        defences=defences,
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


# -- attackers and defences ---------------------------------------------------------

# The scale each kind uses unless the file says otherwise (specs.AttackSpec).
_DEFAULT_SCALE: Final = {"scale": 10.0, "backdoor": 10.0}
_DEFAULT_BURST: Final = {"future_base": 10}
# A claimed n_samples travels as a u64; float32 sums stay finite far beyond it.
_MAX_CLAIMED_SAMPLES: Final = 2**63 - 1


def _attack(t: ConfigTable) -> AttackSpec:
    kind = t.choice("kind", ATTACK_KINDS)
    default = AttackSpec(kind=kind, fraction=0.1)
    seed_raw = t.raw("seed")
    trigger = t.integers("trigger", low=0)
    spec = AttackSpec(
        kind=kind,
        fraction=t.number("fraction", low=0.0, high=1.0, low_open=True),
        scale=t.number("scale", _DEFAULT_SCALE.get(kind, 1.0), low=0.0, high=1e12, low_open=True),
        claimed_samples=t.integer(
            "claimed_samples", default.claimed_samples, low=1, high=_MAX_CLAIMED_SAMPLES
        ),
        base_offset=t.integer("base_offset", default.base_offset, low=1, high=2**62),
        burst=t.integer("burst", _DEFAULT_BURST.get(kind, 1), low=1, high=1000),
        target=t.integer("target", default.target, low=0),
        trigger=default.trigger if trigger is None else trigger,
        trigger_value=t.number("trigger_value", default.trigger_value),
        poison_fraction=t.number(
            "poison_fraction", default.poison_fraction, low=0.0, high=1.0, low_open=True
        ),
        seed=None if seed_raw is None else t.integer("seed", 0),
    )
    if not spec.trigger:
        raise t.fail("trigger", "a non-empty list of feature indices")
    t.finish()
    return spec


def _robust(t: ConfigTable) -> RobustRules:
    """``[defences.robust.<tier>]``: the keys of a daemon's ``[robust]``, with its checks."""
    default = RobustRules()
    try:
        rules = RobustRules(
            rule=t.choice("rule", ROBUST_RULES, default.rule),
            trim=t.number("trim", default.trim, low=0.0, high=0.5),
            outlier_score=t.choice("outlier_score", OUTLIER_SCORES, default.outlier_score),
            threshold=t.number("threshold", default.threshold, low=1.0, high=1e6),
            min_ratio=t.number("min_ratio", default.min_ratio, low=1.0, high=1e6),
            min_inputs=t.integer("min_inputs", default.min_inputs, low=3),
        )
    except LocalProtocolError as exc:
        raise ConfigError(f"{t.where}: {exc}") from exc
    t.finish()
    return rules


def _defences(t: ConfigTable) -> DefencesSpec:
    default = DefencesSpec()
    unsafe = t.boolean("unsafe", False)
    raw_samples = t.raw("max_samples", default.max_samples)
    max_samples: int | Literal["declared"] = "declared"
    if raw_samples != "declared":
        max_samples = t.integer("max_samples", 1, low=1)
    mode: Literal["adaptive", "fixed"] = t.choice(
        "norm_bound", ("adaptive", "fixed"), default.norm_bound
    )
    max_norm = t.number("max_norm", default.max_norm, low=0.0, low_open=True)
    adaptive: AdaptiveNorm | None = None
    if mode == "adaptive":
        base = AdaptiveNorm()
        window = t.integer("norm_window", base.window, low=1, high=1_000_000)
        warmup = t.integer("norm_warmup", base.warmup, low=1, high=1_000_000)
        if warmup > window:
            raise t.fail("norm_warmup", f"an integer <= norm_window ({window})")
        adaptive = AdaptiveNorm(
            quantile=t.number("norm_quantile", base.quantile, low=0.0, high=1.0, low_open=True),
            factor=t.number("norm_factor", base.factor, low=0.0, low_open=True),
            window=window,
            warmup=warmup,
        )
    per_version = t.raw("max_updates_per_version", default.max_updates_per_version)
    rate = t.raw("rate_per_s", default.rate_per_s)
    robust = t.table("robust")
    spec = DefencesSpec(
        unsafe=unsafe,
        max_samples=max_samples,
        norm_bound=mode,
        max_norm=max_norm,
        adaptive=adaptive,
        max_updates_per_version=(
            None
            if per_version is False
            else t.integer("max_updates_per_version", default.max_updates_per_version, low=1)
        ),
        rate_per_s=(
            None
            if rate is False or default.rate_per_s is None
            else t.number("rate_per_s", default.rate_per_s, low=0.0, low_open=True)
        ),
        burst=t.number("burst", default.burst, low=1.0),
        reject_future_base=t.boolean("reject_future_base", default.reject_future_base),
        edge_robust=_robust(robust.table("edge")),
        regional_robust=_robust(robust.table("regional")),
        # The edge daemon's own parser: one home for the [reputation] keys.
        reputation=parse_reputation(t.table("reputation")),
    )
    robust.finish()
    t.finish()
    return spec


def _check_attack_and_defences(
    name: str,
    attack: AttackSpec | None,
    defences: DefencesSpec | None,
    aggregation: AggregationSpec,
    fleet: FleetSpec,
    data: DataSpec,
) -> None:
    """The combinations a run cannot honour, refused by name."""
    if attack is not None and defences is None:
        # An attacked run must say what it defends with: no silent "off".
        raise ConfigError(
            f"{name}: [attack] needs a [defences] table (the tier core's bounds, or "
            "unsafe = true to run with every bound off)"
        )
    if defences is not None and defences.active and aggregation.edge.max_norm is not None:
        raise ConfigError(
            f"{name}: aggregation.edge.max_norm and [defences] both set a norm bound; keep "
            "defences.max_norm"
        )
    hierarchical = aggregation.mode == "async" and aggregation.topology == "hierarchical"
    if (
        defences is not None
        and not hierarchical
        and (defences.edge_robust.enabled or defences.regional_robust.enabled)
    ):
        raise ConfigError(
            f"{name}: [defences.robust] applies to edges and regionals; it needs "
            "aggregation.mode = 'async' and topology = 'hierarchical'"
        )
    if attack is None:
        return
    if attack.kind == "backdoor" and data.task == "regression":
        raise ConfigError(
            f"{name}: attack.kind 'backdoor' relabels examples; it needs a classification task"
        )
    if aggregation.mode == "sync" and attack.kind in ("stale_base", "future_base"):
        raise ConfigError(
            f"{name}: attack.kind {attack.kind!r} abuses base versions, which sync rounds "
            "never compare; use aggregation.mode = 'async'"
        )
    if fleet.num_devices < 2:
        raise ConfigError(f"{name}: an attack needs at least two devices (one honest)")
