"""A device's TOML configuration file read into typed settings; imports protocol only, never trio.

The file (see ``deploy/device.example.toml``) has the sections ``[device]``,
``[central]``, ``[edges]``, ``[mqtt]``, ``[send]``, ``[schedule]`` and
``[training]``, read through ``protocol.files.ConfigTable`` (``[mqtt]`` through
``protocol.bus.settings``, shared with the edges). Relative paths are relative
to the file's directory. Unknown sections and keys are errors, so a typo never
silently falls back to a default. Every problem is a ``ConfigError`` whose one
sentence names the key, e.g. ``device.toml: send.max_attempts is 'five';
expected an integer >= 1``.

Loading reads the edges' public keys (``DeviceConfig`` holds them); the
device's private key, the central key, the outbox and the data file are
returned as paths and opened by the caller (``load_training_data`` reads the
data file without pickle).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from fedtier.client.device import DeviceConfig
from fedtier.client.trainers import Trainer
from fedtier.protocol.bus.settings import MqttSettings, parse_mqtt_settings
from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import ConfigError, FedtierError, KeyFileError, LocalProtocolError
from fedtier.protocol.files import ConfigTable, load_public_key
from fedtier.protocol.identity import VerifyKey
from fedtier.protocol.names import check_token

__all__ = [
    "DeviceSettings",
    "MqttSettings",
    "TrainingSettings",
    "build_trainer",
    "load_device_settings",
    "load_training_data",
]

_SECTIONS: Final = ("device", "central", "edges", "mqtt", "send", "schedule", "training")
# A device keeps the adapter's own session expiry; an edge keeps its session longer.
_MQTT_DEFAULTS: Final = MqttSettings(session_expiry_s=3600)
_MODELS: Final[tuple[Literal["logreg", "mlp"], ...]] = ("logreg", "mlp")


@dataclass(frozen=True, slots=True)
class TrainingSettings:
    """Which local model to train and how.

    Attributes:
        model: ``"logreg"`` (numpy multinomial logistic regression) or
            ``"mlp"`` (torch Linear-ReLU-Linear).
        epochs: passes over the local data per update.
        batch_size: examples per SGD step.
        lr: SGD learning rate.
        momentum: SGD momentum (mlp only).
        mu: FedProx proximal coefficient.
        seed: shuffling (and mlp initialisation) seed.
        hidden: hidden units (mlp only).
        max_local_steps: cap on SGD steps per update, None for none.
        num_classes: classes; None means ``max(y) + 1`` of the local data,
            which every device of the fleet must agree on, so set it.
        torch_threads: ``torch.set_num_threads`` for the mlp, None leaves it.
    """

    model: Literal["logreg", "mlp"] = "logreg"
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


@dataclass(frozen=True, slots=True)
class DeviceSettings:
    """Everything a device's configuration file says.

    Attributes:
        device: the device loop's settings (with the trusted edge keys loaded).
        identity_key: the device's private key file (PKCS#8 PEM, mode 0600).
        central_key: the central's public key file (PEM), pinned.
        outbox: the outbox sqlite file.
        model_cache: where to keep the last good model, None for nowhere.
        data: the local training data, an ``.npz`` with arrays ``X`` and ``y``.
        mqtt: the broker connection.
        training: the local model and optimiser.
    """

    device: DeviceConfig
    identity_key: Path
    central_key: Path
    outbox: Path
    model_cache: Path | None
    data: Path
    mqtt: MqttSettings
    training: TrainingSettings


def load_device_settings(path: Path) -> DeviceSettings:
    """Read and check a device configuration file.

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
    data = dev.path("data")

    central_key = tables["central"].path("public_key")

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

    tr = tables["training"]
    training = TrainingSettings(
        model=tr.choice("model", _MODELS, "logreg"),
        epochs=tr.number("epochs", 1.0, low=0.0, low_open=True),
        batch_size=tr.integer("batch_size", 32, low=1),
        lr=tr.number("lr", 0.1, low=0.0, low_open=True),
        momentum=tr.number("momentum", 0.0, low=0.0),
        mu=tr.number("mu", 0.0, low=0.0),
        seed=tr.integer("seed", 0),
        hidden=tr.integer("hidden", 32, low=1),
        max_local_steps=tr.integer("max_local_steps", None, low=1),
        num_classes=tr.integer("num_classes", None, low=2),
        torch_threads=tr.integer("torch_threads", None, low=1),
    )
    if training.momentum >= 1:
        raise tr.fail("momentum", "a number below 1")

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
    )


def load_training_data(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Read ``X`` (float32, shape ``(n, ...)``) and ``y`` (int64, shape ``(n,)``) from an ``.npz``.

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
    training: TrainingSettings, X: npt.NDArray[np.float32], y: npt.NDArray[np.int64]
) -> Trainer:
    """Build the trainer the settings name for the local data ``(X, y)``.

    Raises:
        ConfigError: the data does not fit the model (feature or class counts).
    """
    num_classes = training.num_classes or int(y.max()) + 1
    try:
        if training.model == "logreg":
            from fedtier.client.trainers import NumpyLogRegTrainer

            if X.ndim != 2:
                raise ConfigError(f"logreg needs 2-D features; the data has shape {X.shape}")
            return NumpyLogRegTrainer(
                X.shape[1],
                num_classes,
                X,
                y,
                epochs=training.epochs,
                batch_size=training.batch_size,
                lr=training.lr,
                mu=training.mu,
                seed=training.seed,
                max_local_steps=training.max_local_steps,
            )
        from fedtier.client.trainers import TorchTrainer, make_mlp

        if training.torch_threads is not None:
            import torch

            torch.set_num_threads(training.torch_threads)
        features = int(np.prod(X.shape[1:]))
        model = make_mlp(features, training.hidden, num_classes, seed=training.seed)
        return TorchTrainer(
            model,
            X.reshape(X.shape[0], features),
            y,
            epochs=training.epochs,
            batch_size=training.batch_size,
            lr=training.lr,
            momentum=training.momentum,
            mu=training.mu,
            seed=training.seed,
            max_local_steps=training.max_local_steps,
        )
    except ConfigError:
        raise
    except FedtierError as exc:
        raise ConfigError(f"[training] does not fit the data: {exc}") from exc
