"""A device's TOML file read into typed settings; imports protocol and client, never torch.

The file (see ``deploy/device.example.toml``) has the sections ``[device]``,
``[central]``, ``[edges]``, ``[mqtt]``, ``[send]``, ``[schedule]``,
``[model]``, ``[data]`` and ``[training]``, read through
``protocol.files.ConfigTable`` (``[mqtt]`` through ``protocol.bus.settings``,
shared with the edges). Relative paths are relative to the file's directory.
Unknown sections and keys are errors, so a typo never silently falls back to a
default. Every problem is a ``ConfigError`` whose one sentence names the key,
e.g. ``device.toml: send.max_attempts is 'five'; expected an integer >= 1``.

The model, data and training keys are the plug-in syntax of
``client.plugins``, the same as a scenario's::

    [model]
    factory = "mypkg.models:make_model"   # or "logreg" (numpy) / "mlp" (torch)
    args = { hidden = 64 }
    local = ["head.*"]                     # state_dict globs kept on the device
    batchnorm = "local"                    # FedBN (the default) or "global"
    [data]
    path = "data/train.csv"                # .csv / .npz / .parquet, or loader = "pkg.mod:load"
    label = "quality"
    task = "regression"
    validation = "data/val.csv"
    [training]
    loss = "mse"                           # "auto", "cross_entropy", or "pkg.mod:loss"
    optimizer = "adamw"                    # "sgd" (momentum kept across rounds), "adam"
    lr = 1e-3
    weight_decay = 1e-4
    grad_clip = 1.0                        # global gradient norm
    lr_schedule = { kind = "cosine", period_rounds = 50 }   # or "step", "constant"
    batch_size = 32
    drop_last = true                       # or min_batch = 2 (the default with BatchNorm)
    epochs = 1
    device = "auto"                        # CUDA when there is one, else the CPU
    metrics = ["mae"]                      # or "pkg.mod:metric"; val_* with data.validation

The old keys keep working as aliases: ``[training] model = "logreg" | "mlp"``
for ``[model] factory`` (with ``[training] hidden``), and ``[device] data``
(any data file, no longer only an ``.npz``) for ``[data] path``.

Loading reads the edges' public keys (``DeviceConfig`` holds them); the
device's private key, the central key, the outbox and the data are returned
as paths and specs and opened by the caller (``load_datasets`` reads the data
without pickle; ``build_trainer`` builds the trainer).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from fedtier.client.device import DeviceConfig
from fedtier.client.plugins import DataRequest, Dataset, is_import_path, load_data, load_model
from fedtier.client.trainers import LrSchedule, MetricFn, Trainer, resolve_metrics
from fedtier.protocol.bus.settings import MqttSettings, parse_mqtt_settings
from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import ConfigError, FedtierError, KeyFileError, LocalProtocolError
from fedtier.protocol.files import ConfigTable, load_public_key
from fedtier.protocol.identity import VerifyKey
from fedtier.protocol.names import check_token

__all__ = [
    "DataSettings",
    "DeviceSettings",
    "ModelSettings",
    "MqttSettings",
    "TrainingSettings",
    "build_trainer",
    "load_datasets",
    "load_device_settings",
    "load_training_data",
    "read_data_table",
    "read_model_table",
    "read_training_table",
]

_SECTIONS: Final = (
    "device",
    "central",
    "edges",
    "mqtt",
    "send",
    "schedule",
    "model",
    "data",
    "training",
)
# A device keeps the adapter's own session expiry; an edge keeps its session longer.
_MQTT_DEFAULTS: Final = MqttSettings(session_expiry_s=3600)
_BUILTINS: Final = ("logreg", "mlp")
_TASKS: Final = ("classification", "regression")
_LOSSES: Final = ("auto", "cross_entropy", "mse")
_OPTIMIZERS: Final[tuple[Literal["sgd", "adam", "adamw"], ...]] = ("sgd", "adam", "adamw")
_BATCHNORM: Final[tuple[Literal["local", "global"], ...]] = ("local", "global")
_DEVICE_NAME: Final = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """Which model a device trains, and which of its tensors stay on the device.

    Attributes:
        factory: ``"logreg"`` (numpy multinomial logistic regression),
            ``"mlp"`` (torch Linear-ReLU-Linear) or an import path
            ``"package.module:factory"`` returning a ``torch.nn.Module`` or a
            ``Trainer``. The Python API also takes the factory itself, or a
            ready module or trainer.
        args: keyword arguments for the factory.
        local: ``state_dict`` name globs of tensors kept local (never sent).
        batchnorm: ``"local"`` (FedBN: BatchNorm weights and statistics stay
            on the device, the default) or ``"global"`` (aggregated).
    """

    factory: object = "logreg"
    args: Mapping[str, object] = field(default_factory=dict)
    local: tuple[str, ...] = ()
    batchnorm: Literal["local", "global"] = "local"


@dataclass(frozen=True, slots=True)
class DataSettings:
    """Where a device's local data comes from.

    Attributes:
        source: a data file (``.csv``, ``.npz``, ``.parquet``; relative to
            ``base_dir``) or a loader import path ``"package.module:loader"``.
        label: a table's label column (header name or 0-based index), None
            for the last column.
        task: ``"classification"`` or ``"regression"``, None to infer it
            from the labels (integers classify).
        validation: held-out data in the same syntax, evaluated after each
            training (``val_*`` metrics in the update), None for none.
        args: keyword arguments for a loader.
        base_dir: the configuration file's folder (a loader's ``DataRequest.base_dir``).
    """

    source: str
    label: str | int | None = None
    task: Literal["classification", "regression"] | None = None
    validation: str | None = None
    args: Mapping[str, object] = field(default_factory=dict)
    base_dir: Path | None = None


@dataclass(frozen=True, slots=True)
class TrainingSettings:
    """How the local model trains (``client.torch_trainer.TorchTrainer`` documents each option).

    Attributes:
        model: the model factory (mirrors ``ModelSettings.factory``; its old
            ``[training] model`` key).
        epochs: passes over the local data per update.
        batch_size: examples per optimizer step.
        lr: the base learning rate.
        momentum: SGD momentum (torch only), kept across rounds.
        mu: FedProx proximal coefficient.
        seed: shuffling (and built-in mlp initialisation) seed.
        hidden: hidden units of the built-in mlp (old key; ``[model] args.hidden``).
        max_local_steps: cap on optimizer steps per update, None for none.
        num_classes: classes; None means ``max(y) + 1`` of the local data,
            which every device of the fleet must agree on, so set it.
        torch_threads: ``torch.set_num_threads``, None leaves it.
        loss: ``"auto"``, ``"cross_entropy"``, ``"mse"``, an import path to a
            loss callable, or (Python API) the callable.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"`` (torch only).
        weight_decay: L2 (SGD, Adam) or decoupled (AdamW) weight decay.
        grad_clip: global gradient-norm clip, None for none.
        lr_schedule: the learning rate per round.
        drop_last: drop each epoch's last partial batch.
        min_batch: the smallest batch to step on; None: 2 with BatchNorm, else 1.
        metrics: extra metrics: built-in names or import paths, or (Python
            API) a mapping of name to ``(pred, y) -> float``.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        keep_optimizer_state: keep optimizer state (momentum, Adam moments)
            across rounds.
    """

    model: object = "logreg"
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    mu: float = 0.0
    seed: int = 0
    hidden: int = 32
    max_local_steps: int | None = None
    num_classes: int | None = None
    torch_threads: int | None = None
    loss: str | Callable[..., Any] = "auto"
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    weight_decay: float = 0.0
    grad_clip: float | None = None
    lr_schedule: LrSchedule = field(default_factory=LrSchedule)
    drop_last: bool = False
    min_batch: int | None = None
    metrics: tuple[str, ...] | Mapping[str, MetricFn] = ()
    device: str = "auto"
    keep_optimizer_state: bool = True


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    """Everything a device's configuration file says.

    Attributes:
        device: the device loop's settings (with the trusted edge keys loaded).
        identity_key: the device's private key file (PKCS#8 PEM, mode 0600).
        central_key: the central's public key file (PEM), pinned; None when only
            the fleet root is pinned.
        root_key: ``[central] root_key``: the fleet root's public key file, or
            None. With it the device also accepts models signed by any central
            key the root certified (a rotated central needs no change here).
        outbox: the outbox sqlite file.
        model_cache: where to keep the last good model, None for nowhere.
        data: the local data (and validation data); None only when loaded
            with ``require_data=False`` from a file that names none.
        mqtt: the broker connection.
        training: how the local model trains.
        model: the local model and its per-tensor policy.
    """

    device: DeviceConfig
    identity_key: Path
    central_key: Path | None
    outbox: Path
    model_cache: Path | None
    data: DataSettings | None
    mqtt: MqttSettings
    training: TrainingSettings
    model: ModelSettings = field(default_factory=ModelSettings)
    root_key: Path | None = None


def load_device_settings(path: Path, *, require_data: bool = True) -> DeviceSettings:
    """Read and check a device configuration file.

    Args:
        path: the TOML file.
        require_data: refuse a file that names no data; False (the Python
            API, given its data) leaves ``data`` None then.

    Raises:
        ConfigError: the file is missing, not TOML, or a key is missing,
            unknown or has a bad value (the message names the key).
    """
    path = Path(path)
    source = path.name
    root = ConfigTable.load(path, what="device configuration")
    tables = {name: root.table(name) for name in _SECTIONS}
    root.finish()

    dev = tables["device"]
    fleet = dev.string("fleet")
    site = dev.string("site")
    for key, value in (("fleet", fleet), ("site", site)):
        try:
            check_token(key, value)
        except LocalProtocolError as exc:
            raise ConfigError(f"{dev.locate(key)}: {exc}") from exc
    identity_key = dev.path("identity_key")
    outbox = dev.path("outbox")
    model_cache = dev.path("model_cache", None)
    legacy_data = dev.path("data", None)

    root_key = tables["central"].path("root_key", None)
    # With the fleet root pinned, a bare central key is optional (rotations need none).
    central_table = tables["central"]
    central_key = (
        central_table.path("public_key", None) if root_key else central_table.path("public_key")
    )

    edges = tables["edges"]
    trusted: list[VerifyKey] = []
    for i, key_path in enumerate(edges.paths("public_keys")):
        try:
            trusted.append(load_public_key(key_path))
        except KeyFileError as exc:
            raise ConfigError(f"{edges.locate('public_keys')}[{i}]: {exc}") from exc
    for i, text in enumerate(edges.strings("public_keys_hex")):
        try:
            trusted.append(VerifyKey.from_hex(text))
        except LocalProtocolError as exc:
            raise ConfigError(f"{edges.locate('public_keys_hex')}[{i}]: {exc}") from exc
    if not trusted:
        raise ConfigError(
            f"{edges.where} needs at least one trusted edge key in public_keys or public_keys_hex"
        )

    mq = tables["mqtt"]
    mqtt = parse_mqtt_settings(mq, _MQTT_DEFAULTS, host_required=True)
    if mqtt.shared_subscription:
        # Receipts come to one device only: an exclusive subscription has no
        # loss window across a broker restart (docs/transport.md, MQTT).
        raise mq.fail("shared_subscription", "false: a device subscribes alone")

    send = tables["send"]
    codec = send.string("codec", "f32")
    try:
        # A percentage needs the model size; any size checks the name's syntax.
        CodecSpec.parse(codec, num_params=2**31 if "%" in codec else None)
    except LocalProtocolError as exc:
        raise ConfigError(f"{send.locate('codec')}: {exc}") from exc
    schedule = tables["schedule"]
    wait_for_new = schedule.boolean("wait_for_new_model", False)
    model_wait_s = schedule.number("model_wait_s", 60.0, low=0.0)
    try:
        device = DeviceConfig(
            fleet=fleet,
            site=site,
            trusted_edges=tuple(trusted),
            codec=codec,
            byte_budget=send.integer("byte_budget", None, low=1),
            error_feedback=send.boolean("error_feedback", True),
            receipt_timeout_s=send.number("receipt_timeout_s", 30.0, low=0.0, low_open=True),
            max_attempts=send.integer("max_attempts", 5, low=1),
            backoff_factor=send.number("backoff_factor", 2.0, low=0.0, low_open=True),
            backoff_max_s=send.number("backoff_max_s", 300.0, low=0.0, low_open=True),
            retry_delay_s=send.number("retry_delay_s", 1.0, low=0.0, low_open=True),
            rounds=schedule.integer("rounds", None, low=1),
            min_interval_s=schedule.number("min_interval_s", 0.0, low=0.0),
            model_wait_s=None if wait_for_new else model_wait_s,
        )
    except LocalProtocolError as exc:
        # Only cross-field checks are left here (backoff_factor >= 1).
        raise ConfigError(f"{source}: {exc}") from exc

    training = read_training_table(tables["training"])
    model = read_model_table(tables["model"], legacy=tables["training"], training=training)
    training = dataclasses.replace(training, model=model.factory)
    data_table = tables["data"]
    data: DataSettings | None = None
    if (
        require_data
        or legacy_data is not None
        or data_table.has("path")
        or data_table.has("loader")
    ):
        data = read_data_table(
            data_table, legacy=legacy_data, where=dev.locate("data"), base_dir=path.parent
        )

    for table in tables.values():
        table.finish()
    return DeviceSettings(
        device=device,
        identity_key=identity_key,
        central_key=central_key,
        outbox=outbox,
        model_cache=model_cache,
        data=data,
        mqtt=mqtt,
        training=training,
        model=model,
        root_key=root_key,
    )


def read_training_table(tr: ConfigTable) -> TrainingSettings:
    """The ``[training]`` keys (the old ``model`` alias is read by ``read_model_table``).

    Raises:
        ConfigError: a bad value, naming its key.
    """
    optimizer = tr.choice("optimizer", _OPTIMIZERS, "sgd")
    momentum = tr.number("momentum", 0.0, low=0.0)
    if momentum >= 1:
        raise tr.fail("momentum", "a number below 1")
    if momentum and optimizer != "sgd":
        raise tr.fail("momentum", f"0 with optimizer {optimizer!r} (momentum is for sgd)")
    loss = tr.string("loss", "auto")
    if loss not in _LOSSES and not is_import_path(loss):
        raise tr.fail("loss", "'auto', 'cross_entropy', 'mse' or an import path 'pkg.mod:fn'")
    metrics = tr.strings("metrics")
    try:
        resolve_metrics(metrics)
    except ConfigError as exc:
        raise ConfigError(f"{tr.locate('metrics')}: {exc}") from exc
    device = tr.string("device", "auto")
    if not _DEVICE_NAME.fullmatch(device):
        raise tr.fail("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    return TrainingSettings(
        epochs=tr.number("epochs", 1.0, low=0.0, low_open=True),
        batch_size=tr.integer("batch_size", 32, low=1),
        lr=tr.number("lr", 0.1, low=0.0, low_open=True),
        momentum=momentum,
        mu=tr.number("mu", 0.0, low=0.0),
        seed=tr.integer("seed", 0),
        hidden=tr.integer("hidden", 32, low=1),
        max_local_steps=tr.integer("max_local_steps", None, low=1),
        num_classes=tr.integer("num_classes", None, low=2),
        torch_threads=tr.integer("torch_threads", None, low=1),
        loss=loss,
        optimizer=optimizer,
        weight_decay=tr.number("weight_decay", 0.0, low=0.0),
        grad_clip=tr.optional_number("grad_clip"),
        lr_schedule=_lr_schedule(tr),
        drop_last=tr.boolean("drop_last", False),
        min_batch=tr.integer("min_batch", None, low=1),
        metrics=metrics,
        device=device,
        keep_optimizer_state=tr.boolean("keep_optimizer_state", True),
    )


def _lr_schedule(tr: ConfigTable) -> LrSchedule:
    value = tr.raw("lr_schedule", None)
    if value is None:
        return LrSchedule()
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, Mapping):
        raise tr.fail("lr_schedule", "a table such as { kind = 'cosine', period_rounds = 50 }")
    known = {f.name for f in dataclasses.fields(LrSchedule)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(
            f"{tr.locate('lr_schedule')} has no key {unknown[0]!r}; it takes "
            f"{', '.join(sorted(known))}"
        )
    try:
        return LrSchedule(**value)
    except (LocalProtocolError, TypeError) as exc:
        raise ConfigError(f"{tr.locate('lr_schedule')}: {exc}") from exc


def read_model_table(
    t: ConfigTable,
    *,
    legacy: ConfigTable | None = None,
    training: TrainingSettings | None = None,
) -> ModelSettings:
    """The ``[model]`` keys; ``legacy`` is ``[training]``, whose old ``model`` key is an alias.

    The built-in ``mlp`` takes ``hidden``, ``seed`` and ``num_classes`` from
    ``training`` unless ``args`` names them.

    Raises:
        ConfigError: a bad value, or the model named twice.
    """
    factory = t.string("factory", None)
    old = legacy.choice("model", _BUILTINS, "logreg") if legacy and legacy.has("model") else None
    if factory is not None and old is not None and legacy is not None:
        raise ConfigError(
            f"{legacy.locate('model')} and {t.locate('factory')} both name the model; "
            "keep model.factory"
        )
    factory = factory or old or "logreg"
    if factory not in _BUILTINS and not is_import_path(factory):
        raise t.fail("factory", "'logreg', 'mlp' or an import path 'package.module:factory'")
    args = dict(t.mapping("args"))
    if factory == "mlp" and training is not None:
        args.setdefault("hidden", training.hidden)
        args.setdefault("seed", training.seed)
    batchnorm = t.choice("batchnorm", _BATCHNORM, "local")
    return ModelSettings(factory=factory, args=args, local=t.strings("local"), batchnorm=batchnorm)


def read_data_table(
    t: ConfigTable,
    *,
    legacy: Path | None = None,
    where: str = "device.data",
    base_dir: Path | None = None,
) -> DataSettings:
    """The ``[data]`` keys; ``legacy`` is the old ``[device] data`` path, an alias of ``path``.

    ``base_dir`` (the configuration file's folder) is what a loader gets as
    ``DataRequest.base_dir``; ``t`` resolves relative paths itself.

    Raises:
        ConfigError: no data, data named twice, or a bad value.
    """
    path = t.path("path", None)
    loader = t.string("loader", None)
    given = [name for name, v in (("path", path), ("loader", loader)) if v is not None]
    if legacy is not None:
        given.append(where)
    if len(given) != 1:
        raise ConfigError(
            f"{t.where or 'data'}: name the local data once, as data.path (a file) or "
            f"data.loader (an import path); {'none' if not given else ' and '.join(given)} given"
        )
    if loader is not None and not is_import_path(loader):
        raise t.fail("loader", "an import path 'package.module:function'")
    source = loader if loader is not None else str(path if path is not None else legacy)
    label = t.raw("label", None)
    if label is not None and (
        isinstance(label, bool) or not isinstance(label, str | int) or label == ""
    ):
        raise t.fail("label", "a column name or a 0-based column index")
    task = t.string("task", None)
    if task is not None and task not in _TASKS:
        raise t.fail("task", "'classification' or 'regression'")
    validation = t.string("validation", None)
    if validation is not None and not is_import_path(validation):
        validation = str(t.resolve(validation))
    args = dict(t.mapping("args"))
    if args and loader is None:
        raise t.fail("args", "no args: they are a loader's keyword arguments")
    return DataSettings(
        source=source,
        label=label if isinstance(label, str | int) else None,
        task=task,  # type: ignore[arg-type]  # checked against _TASKS above
        validation=validation,
        args=args,
        base_dir=base_dir,
    )


def load_datasets(
    data: DataSettings, *, device: str, seed: int = 0, num_classes: int | None = None
) -> tuple[Dataset, Dataset | None]:
    """Read the local training data and the validation data (None when there is none).

    Args:
        data: where the data is.
        device: the participant's key id (a loader's ``DataRequest.device``).
        seed: the run's seed (``DataRequest.seed``).
        num_classes: the fleet's class count, checked against the labels.

    Raises:
        ConfigError: the data cannot be read or does not fit.
    """

    def read(spec: str, split: str) -> Dataset:
        request = DataRequest(device=device, seed=seed, split=split, base_dir=data.base_dir)
        loaded = load_data(
            spec,
            request,
            label=data.label if not is_import_path(spec) else None,
            task=data.task,
            args=data.args if is_import_path(spec) else None,
        )
        if num_classes is not None and loaded.task == "classification":
            loaded = Dataset(
                loaded.X,
                loaded.y,
                task="classification",
                name=loaded.name,
                num_classes=max(num_classes, loaded.num_classes or 0),
            )
            if loaded.num_classes != num_classes:
                raise ConfigError(
                    f"data {loaded.name!r} has labels up to {(loaded.num_classes or 0) - 1}; "
                    f"training.num_classes is {num_classes}"
                )
        return loaded

    train = read(data.source, "train")
    validation = read(data.validation, "validation") if data.validation is not None else None
    return train, validation


def load_training_data(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Read ``X`` (float32, shape ``(n, ...)``) and ``y`` (int64, shape ``(n,)``) from an ``.npz``.

    The old reader of ``[device] data``, kept for callers that want bare
    arrays of a classification ``.npz``; ``load_datasets`` reads every format.
    Pickled object arrays are refused (``allow_pickle=False``).

    Raises:
        ConfigError: the file is missing, not an npz, lacks ``X`` or ``y``, or
            their shapes or dtypes do not fit.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ConfigError(f"data file {path} is a single array; it must be an .npz")
            missing = [name for name in ("X", "y") if name not in archive.files]
            if missing:
                raise ConfigError(f"data file {path} lacks array {missing[0]!r}")
            X = np.asarray(archive["X"])
            y = np.asarray(archive["y"])
    except OSError as exc:
        raise ConfigError(f"cannot read data file {path}: {exc}") from exc
    except ValueError as exc:  # object arrays (pickle) and corrupt archives
        raise ConfigError(f"data file {path} is not a plain npz archive: {exc}") from exc
    if X.ndim < 2 or y.ndim != 1 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ConfigError(
            f"data file {path} holds X {X.shape} and y {y.shape}; "
            "expected (n, ...) and (n,) with n >= 1"
        )
    if not np.issubdtype(X.dtype, np.number) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(
            f"data file {path} holds X of {X.dtype} and y of {y.dtype}; expected numbers and "
            "integer labels"
        )
    return X.astype(np.float32, copy=False), y.astype(np.int64, copy=False)


def build_trainer(
    training: TrainingSettings,
    data: Dataset | npt.NDArray[np.generic],
    y: npt.NDArray[np.generic] | None = None,
    *,
    model: ModelSettings | None = None,
    validation: Dataset | None = None,
) -> Trainer:
    """Build the trainer for the local ``data`` (a ``Dataset``, or ``X`` and ``y`` arrays).

    Args:
        training: how to train.
        data: the local data, or its features with ``y``.
        y: the labels when ``data`` is an array.
        model: the model and its tensor policy; None means the built-in
            ``training.model`` (the old form).
        validation: held-out data: the trainer is wrapped in a
            ``ValidatingTrainer`` reporting ``val_*`` metrics.

    Raises:
        ConfigError: the model or the options do not fit the data.
    """
    if isinstance(data, Dataset):
        dataset = data
    else:
        if y is None:
            raise ConfigError("build_trainer needs y with an X array")
        labels = np.asarray(y)
        dataset = Dataset(
            np.asarray(data),
            labels,
            task="classification" if np.issubdtype(labels.dtype, np.integer) else "regression",
            name="data",
        )
    if model is None:
        factory = training.model
        args: dict[str, object] = {}
        if factory == "mlp":
            args = {"hidden": training.hidden, "seed": training.seed}
        model = ModelSettings(factory=factory, args=args)
    try:
        trainer = _build(training, dataset, model)
        if validation is not None:
            from fedtier.client.trainers import ValidatingTrainer

            X_val = validation.X
            if model.factory == "mlp":
                X_val = X_val.reshape(X_val.shape[0], -1)
            trainer = ValidatingTrainer(trainer, X_val, validation.y)
        return trainer
    except ConfigError:
        raise
    except FedtierError as exc:
        raise ConfigError(f"[training] does not fit the data: {exc}") from exc


def _build(training: TrainingSettings, dataset: Dataset, model: ModelSettings) -> Trainer:
    num_classes = training.num_classes
    if dataset.task == "classification":
        num_classes = max(num_classes or 0, dataset.num_classes or 0) or None
        if training.num_classes is not None and num_classes != training.num_classes:
            raise ConfigError(
                f"data {dataset.name!r} has labels up to {(num_classes or 0) - 1}; "
                f"training.num_classes is {training.num_classes}"
            )
    factory = model.factory
    if factory == "logreg":
        return _logreg(training, dataset, model, num_classes)
    obj: object
    if isinstance(factory, Trainer) or _is_module(factory):
        obj = factory
    else:
        args = dict(model.args)
        if factory == "mlp" and num_classes is not None:
            args.setdefault("num_classes", num_classes)
        flat = factory == "mlp"
        target = dataset
        if flat and dataset.X.ndim > 2:
            target = Dataset(
                dataset.X.reshape(len(dataset), -1),
                dataset.y,
                task=dataset.task,
                name=dataset.name,
                num_classes=dataset.num_classes,
            )
        obj = load_model(factory, args=args, dataset=target)  # type: ignore[arg-type]
        dataset = target
    if isinstance(obj, Trainer) and not _is_module(obj):
        return obj
    return _torch(training, dataset, model, obj)


def _is_module(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _logreg(
    training: TrainingSettings, dataset: Dataset, model: ModelSettings, num_classes: int | None
) -> Trainer:
    from fedtier.client.trainers import NumpyLogRegTrainer

    torch_only = {
        "optimizer": training.optimizer != "sgd",
        "momentum": training.momentum != 0,
        "weight_decay": training.weight_decay != 0,
        "grad_clip": training.grad_clip is not None,
        "lr_schedule": training.lr_schedule != LrSchedule(),
        "loss": training.loss not in ("auto", "cross_entropy"),
        "drop_last": training.drop_last,
        "min_batch": training.min_batch is not None,
        "metrics": bool(training.metrics),
        "device": training.device not in ("auto", "cpu"),
    }
    used = [key for key, set_ in torch_only.items() if set_]
    if used:
        raise ConfigError(
            f"training.{used[0]} needs a torch model; the numpy logreg trains with plain SGD "
            "(use model.factory = 'mlp' or your own factory)"
        )
    if model.local:
        raise ConfigError(
            "model.local needs a torch model; the numpy logreg's weight and bias always travel"
        )
    if dataset.task != "classification" or num_classes is None:
        raise ConfigError(
            f"model logreg classifies; data {dataset.name!r} is a regression task "
            "(use model.factory = 'mlp' or a torch factory with loss 'mse')"
        )
    if dataset.X.ndim != 2:
        raise ConfigError(f"logreg needs 2-D features; the data has shape {dataset.X.shape}")
    return NumpyLogRegTrainer(
        dataset.X.shape[1],
        max(num_classes, 2),
        dataset.X,
        dataset.y,
        epochs=training.epochs,
        batch_size=training.batch_size,
        lr=training.lr,
        mu=training.mu,
        seed=training.seed,
        max_local_steps=training.max_local_steps,
    )


def _torch(
    training: TrainingSettings, dataset: Dataset, model: ModelSettings, module: object
) -> Trainer:
    import torch

    from fedtier.client.torch_trainer import TorchTrainer

    assert isinstance(module, torch.nn.Module)
    if training.torch_threads is not None:
        torch.set_num_threads(training.torch_threads)
    metrics = training.metrics
    return TorchTrainer(
        module,
        dataset.X,
        dataset.y,
        epochs=training.epochs,
        batch_size=training.batch_size,
        lr=training.lr,
        momentum=training.momentum,
        mu=training.mu,
        seed=training.seed,
        max_local_steps=training.max_local_steps,
        task=dataset.task,
        loss=training.loss,
        optimizer=training.optimizer,
        weight_decay=training.weight_decay,
        lr_schedule=training.lr_schedule,
        grad_clip=training.grad_clip,
        drop_last=training.drop_last,
        min_batch=training.min_batch,
        metrics=metrics if isinstance(metrics, Mapping) else list(metrics),
        device=training.device,
        local=model.local,
        batchnorm=model.batchnorm,
        keep_optimizer_state=training.keep_optimizer_state,
    )
