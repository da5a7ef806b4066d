"""A device's TOML configuration file read into typed settings; imports protocol only, never trio.

The file (see ``deploy/device.example.toml``) has the sections ``[device]``,
``[central]``, ``[edges]``, ``[mqtt]``, ``[send]``, ``[schedule]`` and
``[training]``. Relative paths are relative to the file's directory. Unknown
sections and keys are errors, so a typo never silently falls back to a
default. Every problem is a ``ConfigError`` whose one sentence names the key,
e.g. ``device.toml: [send] max_attempts must be an integer >= 1, got 'five'``.

Loading reads the edges' public keys (``DeviceConfig`` holds them); the
device's private key, the central key, the outbox and the data file are
returned as paths and opened by the caller (``load_training_data`` reads the
data file without pickle).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from fedtier.client.device import DeviceConfig
from fedtier.client.trainers import Trainer
from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import ConfigError, FedtierError, KeyFileError, LocalProtocolError
from fedtier.protocol.identity import VerifyKey, load_public_key
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
_MISSING: Final = object()


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """Where and how the device reaches its site broker (map onto the MQTT adapter's config).

    Attributes:
        host: broker host name or address.
        port: broker port (1883 plain, 8883 TLS by convention).
        client_id: MQTT client id; None means the device's key id.
        ca_file: CA bundle for TLS; None for plain TCP.
        cert_file: the device's TLS client certificate.
        key_file: the TLS client certificate's private key.
        keepalive_s: MQTT keepalive.
    """

    host: str
    port: int = 1883
    client_id: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: float = 60.0


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


class _Table:
    """One TOML table, read key by key with typed checks; remembers what was read."""

    def __init__(self, source: str, section: str, raw: object, base: Path) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        self.source = source
        self.section = section
        self.raw: dict[str, Any] = raw
        self.base = base
        self.read: set[str] = set()

    def _bad(self, key: str, wants: str, value: object) -> ConfigError:
        return ConfigError(f"{self.source}: [{self.section}] {key} must be {wants}, got {value!r}")

    def _get(self, key: str, default: object) -> object:
        self.read.add(key)
        value = self.raw.get(key, default)
        if value is _MISSING:
            raise ConfigError(f"{self.source}: [{self.section}] {key} is required")
        return value

    def str_(self, key: str, default: object = _MISSING) -> str | None:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self._bad(key, "a non-empty string", value)
        return value

    def path(self, key: str, default: object = _MISSING) -> Path | None:
        text = self.str_(key, default)
        return None if text is None else self.base / Path(text).expanduser()

    def required_path(self, key: str) -> Path:
        path = self.path(key)
        assert path is not None
        return path

    def int_(self, key: str, default: object = _MISSING, *, minimum: int = 0) -> int | None:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self._bad(key, f"an integer >= {minimum}", value)
        return value

    def float_(
        self, key: str, default: object = _MISSING, *, positive: bool = False
    ) -> float | None:
        value = self._get(key, default)
        if value is None:
            return None
        wants = "a number > 0" if positive else "a number >= 0"
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self._bad(key, wants, value)
        number = float(value)
        if not (math.isfinite(number) and (number > 0 if positive else number >= 0)):
            raise self._bad(key, wants, value)
        return number

    def bool_(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def str_list(self, key: str) -> list[str]:
        value = self._get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self._bad(key, "a list of non-empty strings", value)
        return value

    def check_unknown(self) -> None:
        unknown = sorted(set(self.raw) - self.read)
        if unknown:
            raise ConfigError(
                f"{self.source}: [{self.section}] has unknown key {unknown[0]!r}; "
                f"known keys are {', '.join(sorted(self.read))}"
            )


def _num(value: float | None) -> float:
    assert value is not None
    return value


def _int(value: int | None) -> int:
    assert value is not None
    return value


def load_device_settings(path: Path) -> DeviceSettings:
    """Read and check a device configuration file.

    Raises:
        ConfigError: the file is missing, not TOML, or a key is missing,
            unknown or has a bad value (the message names the key).
    """
    path = Path(path)
    source = path.name
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read device configuration {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(doc) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown section [{unknown[0]}]; sections are {', '.join(_SECTIONS)}"
        )
    base = path.parent
    tables = {name: _Table(source, name, doc.get(name), base) for name in _SECTIONS}

    dev = tables["device"]
    fleet = _str(dev.str_("fleet"))
    site = _str(dev.str_("site"))
    for key, value in (("fleet", fleet), ("site", site)):
        try:
            check_token(key, value)
        except LocalProtocolError as exc:
            raise ConfigError(f"{source}: [device] {key}: {exc}") from exc
    identity_key = dev.required_path("identity_key")
    outbox = dev.required_path("outbox")
    model_cache = dev.path("model_cache", None)
    data = dev.required_path("data")

    central_key = tables["central"].required_path("public_key")

    edges = tables["edges"]
    trusted: list[VerifyKey] = []
    for i, name in enumerate(edges.str_list("public_keys")):
        key_path = base / Path(name).expanduser()
        try:
            trusted.append(load_public_key(key_path))
        except KeyFileError as exc:
            raise ConfigError(f"{source}: [edges] public_keys[{i}]: {exc}") from exc
    for i, text in enumerate(edges.str_list("public_keys_hex")):
        try:
            trusted.append(VerifyKey.from_hex(text))
        except LocalProtocolError as exc:
            raise ConfigError(f"{source}: [edges] public_keys_hex[{i}]: {exc}") from exc
    if not trusted:
        raise ConfigError(
            f"{source}: [edges] needs at least one trusted edge key in public_keys or "
            "public_keys_hex"
        )

    mq = tables["mqtt"]
    port = _int(mq.int_("port", 1883, minimum=1))
    if port > 65535:
        raise ConfigError(f"{source}: [mqtt] port must be at most 65535, got {port}")
    mqtt = MqttSettings(
        host=_str(mq.str_("host")),
        port=port,
        client_id=mq.str_("client_id", None),
        ca_file=mq.path("ca_file", None),
        cert_file=mq.path("cert_file", None),
        key_file=mq.path("key_file", None),
        keepalive_s=_num(mq.float_("keepalive_s", 60.0, positive=True)),
    )
    if (mqtt.cert_file is None) != (mqtt.key_file is None):
        raise ConfigError(f"{source}: [mqtt] cert_file and key_file must be given together")

    send = tables["send"]
    codec = _str(send.str_("codec", "f32"))
    try:
        # A percentage needs the model size; any size checks the name's syntax.
        CodecSpec.parse(codec, num_params=2**31 if "%" in codec else None)
    except LocalProtocolError as exc:
        raise ConfigError(f"{source}: [send] codec: {exc}") from exc
    schedule = tables["schedule"]
    wait_for_new = schedule.bool_("wait_for_new_model", False)
    model_wait_s = _num(schedule.float_("model_wait_s", 60.0))
    try:
        device = DeviceConfig(
            fleet=fleet,
            site=site,
            trusted_edges=tuple(trusted),
            codec=codec,
            byte_budget=send.int_("byte_budget", None, minimum=1),
            error_feedback=send.bool_("error_feedback", True),
            receipt_timeout_s=_num(send.float_("receipt_timeout_s", 30.0, positive=True)),
            max_attempts=_int(send.int_("max_attempts", 5, minimum=1)),
            backoff_factor=_num(send.float_("backoff_factor", 2.0, positive=True)),
            backoff_max_s=_num(send.float_("backoff_max_s", 300.0, positive=True)),
            retry_delay_s=_num(send.float_("retry_delay_s", 1.0, positive=True)),
            rounds=schedule.int_("rounds", None, minimum=1),
            min_interval_s=_num(schedule.float_("min_interval_s", 0.0)),
            model_wait_s=None if wait_for_new else model_wait_s,
        )
    except LocalProtocolError as exc:
        # Only cross-field checks are left here (backoff_factor >= 1).
        raise ConfigError(f"{source}: {exc}") from exc

    tr = tables["training"]
    model = _str(tr.str_("model", "logreg"))
    if model not in ("logreg", "mlp"):
        raise ConfigError(f"{source}: [training] model must be 'logreg' or 'mlp', got {model!r}")
    training = TrainingSettings(
        model="logreg" if model == "logreg" else "mlp",
        epochs=_num(tr.float_("epochs", 1.0, positive=True)),
        batch_size=_int(tr.int_("batch_size", 32, minimum=1)),
        lr=_num(tr.float_("lr", 0.1, positive=True)),
        momentum=_num(tr.float_("momentum", 0.0)),
        mu=_num(tr.float_("mu", 0.0)),
        seed=_int(tr.int_("seed", 0)),
        hidden=_int(tr.int_("hidden", 32, minimum=1)),
        max_local_steps=tr.int_("max_local_steps", None, minimum=1),
        num_classes=tr.int_("num_classes", None, minimum=2),
        torch_threads=tr.int_("torch_threads", None, minimum=1),
    )
    if training.momentum >= 1:
        raise ConfigError(f"{source}: [training] momentum must be below 1, got {training.momentum}")

    for table in tables.values():
        table.check_unknown()
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


def _str(value: str | None) -> str:
    assert value is not None
    return value


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
