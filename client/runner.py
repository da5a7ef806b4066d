"""One device as a process, and the Python API to run one; imports protocol and client only.

``fedtier device --config FILE`` calls ``run_command``; a program calls
``run_device`` (blocking) or ``run_device_async`` (trio), which take the
model and the data as plug-in specs or as Python objects::

    import fedtier.client

    delivered = fedtier.client.run_device(
        config="device.toml",                 # keys, broker, outbox: a device TOML
        model="mypkg.models:make_model",      # or "mlp", a factory, an nn.Module, a Trainer
        data="data/train.csv",                # or "mypkg.data:load", a Dataset, (X, y)
        label="quality",                      # the CSV's label column
        validation="data/val.csv",            # optional: val_* metrics in each update
        rounds=10,                            # stop after 10 delivered updates
        optimizer="adamw", lr=1e-3,           # any [training] key
    )

Either reads the device file (``client.config``), loads the device's key,
the pinned central key and its data, builds the trainer, opens the outbox and
the model store (re-verifying a cached model), connects to the site broker
over MQTT v5 (client id: the key id unless the file names one) and runs
``client.device.serve_device`` until its ``rounds`` are delivered or
SIGTERM/SIGINT arrives. A stop is clean whenever it comes: every update was
stored in the outbox before its first publish and leaves it only with its
receipt, so the next start resends whatever is pending.

A broker that cannot be reached at start is retried with backoff (each retry
logged): a device outlives its network. Spans go where the ``OTEL_*``
variables say (OTLP when an endpoint is set, else nowhere).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import trio

from fedtier.protocol.errors import (
    BusUnavailable,
    ConfigError,
    FedtierError,
    KeyFileError,
    sole_error,
)

if TYPE_CHECKING:
    from fedtier.client.config import DeviceSettings
    from fedtier.client.device import DeviceReport
    from fedtier.client.plugins import Dataset
    from fedtier.client.trainers import Trainer
    from fedtier.protocol.identity import SigningIdentity

__all__ = ["run_command", "run_device", "run_device_async"]

_log = logging.getLogger("fedtier.device")
_CONNECT_BACKOFF_MIN_S: Final = 0.5
_CONNECT_BACKOFF_MAX_S: Final = 30.0


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)r",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


async def _serve(
    settings: DeviceSettings,
    identity: SigningIdentity,
    trainer: Trainer,
    *,
    handle_signals: bool,
) -> DeviceReport:
    from fedtier.client.device import DeviceReport, serve_device
    from fedtier.client.model_store import ModelStore
    from fedtier.client.outbox import Outbox
    from fedtier.protocol.bus.mqtt import MqttConfig, open_mqtt_bus
    from fedtier.protocol.certificates import ModelSigners
    from fedtier.protocol.files import load_public_key
    from fedtier.protocol.limits import limits_for_model
    from fedtier.protocol.telemetry.tracing import setup_tracing

    try:
        pinned = () if settings.central_key is None else (load_public_key(settings.central_key),)
        root_key = None if settings.root_key is None else load_public_key(settings.root_key)
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from exc
    store = ModelStore(
        ModelSigners(pinned, root=root_key),
        trainer.layout,
        settings.device.fleet,
        cache_path=settings.model_cache,
        # A model of this device's own layout always fits, however large.
        limits=limits_for_model(trainer.layout.num_params),
    )
    mqtt = settings.mqtt
    mqtt_config = MqttConfig(
        host=mqtt.host,
        port=mqtt.port,
        client_id=mqtt.client_id or identity.key_id,
        keepalive_s=mqtt.keepalive_s,
        session_expiry_s=mqtt.session_expiry_s,
        connect_timeout_s=mqtt.connect_timeout_s,
        ca_file=mqtt.tls_ca_file,
        cert_file=mqtt.tls_cert_file,
        key_file=mqtt.tls_key_file,
        # One consumer per receipt topic: an exclusive durable subscription
        # has no loss window across a broker restart (docs/transport.md, MQTT).
        shared_durables=False,
        # One connection: the device listener replaces the client id by the
        # certificate's CN, and two connections would then share it and
        # disconnect each other (docs/operations.md, Transport security).
        single_connection=True,
    )
    if mqtt.client_id not in (None, identity.key_id) and mqtt.tls_cert_file is not None:
        # Not an error: a plain broker keeps it. The deployed device listener
        # replaces it by the certificate's CN (docs/operations.md).
        _log.warning(
            "[mqtt] client_id %r is not this device's key id %s; a broker that binds client"
            " ids to certificates uses the certificate's CN instead",
            mqtt.client_id,
            identity.key_id,
        )
    tracing = setup_tracing("fedtier-device", instance_id=identity.key_id, jsonl_dir=None)
    report = DeviceReport()
    settings.outbox.parent.mkdir(parents=True, exist_ok=True)
    try:
        with Outbox(settings.outbox) as outbox:
            pending = len(outbox.pending())
            _log.info(
                "device %s of fleet %s, site %s: model v%s cached, %d updates pending",
                identity.key_id,
                settings.device.fleet,
                settings.device.site,
                store.version,
                pending,
            )
            async with trio.open_nursery() as nursery:
                if handle_signals:
                    nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
                backoff = _CONNECT_BACKOFF_MIN_S
                while True:
                    unreachable: str | None = None
                    try:
                        async with open_mqtt_bus(mqtt_config) as bus:
                            await serve_device(
                                settings.device,
                                identity,
                                bus,
                                trainer,
                                store,
                                outbox,
                                limiter=trio.CapacityLimiter(1),
                                report=report,
                            )
                        break
                    except* BusUnavailable as group:
                        unreachable = str(group.exceptions[0])
                    _log.warning(
                        "broker %s:%d unreachable (%s); retrying in %.1f s",
                        mqtt.host,
                        mqtt.port,
                        unreachable,
                        backoff,
                    )
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, _CONNECT_BACKOFF_MAX_S)
                _log.info("delivered %d updates; done", report.delivered)
                nursery.cancel_scope.cancel()
            _log.info(
                "stopped: %d sent, %d accepted, %d rejected, %d pending in the outbox",
                report.sent,
                report.accepted,
                report.rejected,
                len(outbox.pending()),
            )
    finally:
        tracing.shutdown()
    return report


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            _log.info(
                "%s: stopping (the outbox keeps what is pending)", signal.Signals(signum).name
            )
            scope.cancel()
            return


def run_command(config_path: Path | str) -> int:
    """``fedtier device --config FILE``: run until the rounds are done or a signal; exit status.

    Returns:
        0 after its rounds or a clean stop on SIGTERM/SIGINT, 2 for an unusable
        configuration, key, model or data file, 1 when the device failed (the
        reason is logged as one sentence).
    """
    _configure_logging()
    try:
        run_device(config=config_path)
    except BaseException as exc:  # mapped to an exit status below
        error = sole_error(exc)
        if isinstance(error, ConfigError):
            _log.error("%s", error)
            return 2
        if isinstance(error, FedtierError):
            _log.error("device stopped: %s", error)
            return 1
        if isinstance(error, KeyboardInterrupt):
            return 130
        raise
    return 0


# Data: a spec (file or "pkg.mod:loader"), a loader callable, a Dataset or a pair (X, y).
DataArg = object
_DATA_OPTIONS: Final = ("label", "task")
_MODEL_OPTIONS: Final = ("local", "batchnorm")


def run_device(
    *,
    config: str | Path | DeviceSettings,
    model: object = None,
    data: DataArg = None,
    validation: DataArg = None,
    model_args: Mapping[str, object] | None = None,
    rounds: int | None = None,
    **options: object,
) -> int:
    """Run one device until its rounds are delivered or SIGINT/SIGTERM; updates delivered.

    Args:
        config: the device's TOML file (keys, broker, outbox, and by default
            its ``[model]``, ``[data]`` and ``[training]``), or its settings.
        model: None for the file's ``[model]``; else a spec (``"mlp"``,
            ``"logreg"``, ``"pkg.mod:factory"``), a factory callable, a
            ``torch.nn.Module`` or a ``fedtier.client.Trainer``.
        data: None for the file's ``[data]``; else a file path, a loader spec
            or callable (given a ``DataRequest``), a ``Dataset`` or ``(X, y)``.
        validation: held-out data in the same forms; ``val_*`` metrics then
            travel in each update. None keeps the file's ``[data] validation``.
        model_args: keyword arguments for the model factory.
        rounds: stop after this many delivered updates (overrides ``[schedule]``).
        **options: any ``[training]`` key (``lr``, ``optimizer``, ``loss``
            (also a callable), ``metrics`` (also ``{name: fn}``), ``device``...),
            ``local`` and ``batchnorm`` of ``[model]``, ``label`` and ``task``
            of ``[data]``.

    Returns:
        The updates delivered: the edges hold them (accepted or duplicate receipts).

    Raises:
        ConfigError: an unusable configuration, key, model, data or option.
        FedtierError: the device failed.
    """
    return trio.run(
        lambda: run_device_async(
            config=config,
            model=model,
            data=data,
            validation=validation,
            model_args=model_args,
            rounds=rounds,
            handle_signals=threading.current_thread() is threading.main_thread(),
            **options,
        )
    )


async def run_device_async(
    *,
    config: str | Path | DeviceSettings,
    model: object = None,
    data: DataArg = None,
    validation: DataArg = None,
    model_args: Mapping[str, object] | None = None,
    rounds: int | None = None,
    handle_signals: bool = False,
    **options: object,
) -> int:
    """``run_device`` inside a running trio loop; cancel its scope to stop it cleanly.

    ``handle_signals`` makes SIGINT/SIGTERM stop the device cleanly (main
    thread only). Local training runs in a worker thread.
    """
    from fedtier.client.config import DeviceSettings, load_device_settings
    from fedtier.protocol.files import load_signing_identity

    if isinstance(config, DeviceSettings):
        settings = config
    else:
        settings = load_device_settings(Path(config), require_data=data is None)
    settings = _with_options(settings, options, rounds=rounds)
    try:
        identity = load_signing_identity(settings.identity_key)
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from exc
    trainer = _trainer(settings, identity.key_id, model, model_args, data, validation)
    try:
        report = await _serve(settings, identity, trainer, handle_signals=handle_signals)
    except BaseExceptionGroup as group:
        error = sole_error(group)
        if error is group:
            raise
        raise error from None
    return report.delivered


def _with_options(
    settings: DeviceSettings, options: Mapping[str, object], *, rounds: int | None
) -> DeviceSettings:
    """``settings`` with the API's keyword options applied where they belong."""
    from fedtier.client.config import DataSettings, TrainingSettings

    training_keys = {f.name for f in dataclasses.fields(TrainingSettings)} - {"model"}
    routed: dict[str, dict[str, object]] = {"training": {}, "model": {}, "data": {}}
    for key, value in options.items():
        if key in training_keys:
            routed["training"][key] = value
        elif key == "local":
            routed["model"][key] = (value,) if isinstance(value, str) else tuple(value)  # type: ignore[arg-type]
        elif key in _MODEL_OPTIONS:
            routed["model"][key] = value
        elif key in _DATA_OPTIONS:
            routed["data"][key] = value
        else:
            known = ", ".join(sorted(training_keys | set(_MODEL_OPTIONS) | set(_DATA_OPTIONS)))
            raise ConfigError(f"run_device has no option {key!r}; it takes {known}")
    try:
        data = settings.data
        if routed["data"]:
            data = dataclasses.replace(data or DataSettings(source=""), **routed["data"])  # type: ignore[arg-type]
        settings = dataclasses.replace(
            settings,
            training=dataclasses.replace(settings.training, **routed["training"]),  # type: ignore[arg-type]
            model=dataclasses.replace(settings.model, **routed["model"]),  # type: ignore[arg-type]
            data=data,
        )
        if rounds is not None:
            settings = dataclasses.replace(
                settings, device=dataclasses.replace(settings.device, rounds=rounds)
            )
    except (TypeError, FedtierError) as exc:
        raise ConfigError(f"run_device options do not fit: {exc}") from exc
    return settings


def _trainer(
    settings: DeviceSettings,
    device: str,
    model: object,
    model_args: Mapping[str, object] | None,
    data: DataArg,
    validation: DataArg,
) -> Trainer:
    from fedtier.client.config import ModelSettings, build_trainer, load_datasets

    training = settings.training
    val_set: Dataset | None = None
    if data is None:
        if settings.data is None or not settings.data.source:
            raise ConfigError("run_device needs data: its config names none and data= is not given")
        train_set, val_set = load_datasets(
            settings.data, device=device, seed=training.seed, num_classes=training.num_classes
        )
    else:
        train_set = _dataset(data, settings, device, "train")
    if validation is not None:
        val_set = _dataset(validation, settings, device, "validation")
    elif data is not None and settings.data is not None and settings.data.validation:
        val_set = _dataset(settings.data.validation, settings, device, "validation")
    chosen = settings.model
    if model is not None:
        args = dict(model_args or {})
        if model == "mlp":
            args.setdefault("hidden", training.hidden)
            args.setdefault("seed", training.seed)
        chosen = ModelSettings(
            factory=model, args=args, local=chosen.local, batchnorm=chosen.batchnorm
        )
    elif model_args is not None:
        chosen = dataclasses.replace(chosen, args={**chosen.args, **model_args})
    return build_trainer(training, train_set, model=chosen, validation=val_set)


def _dataset(data: DataArg, settings: DeviceSettings, device: str, split: str) -> Dataset:
    from fedtier.client.config import DataSettings
    from fedtier.client.plugins import DataRequest, Dataset, is_import_path, load_data

    where = settings.data or DataSettings(source="")

    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        X, y = (np.asarray(part) for part in data)
        task = where.task or (
            "classification" if np.issubdtype(y.dtype, np.integer) else "regression"
        )
        return Dataset(X, y, task=task, name=f"arrays ({split})")
    if isinstance(data, str | Path) or callable(data):
        request = DataRequest(
            device=device, seed=settings.training.seed, split=split, base_dir=where.base_dir
        )
        loader = callable(data) or (isinstance(data, str) and is_import_path(data))
        return load_data(
            data,
            request,
            label=None if loader else where.label,
            task=where.task,
            args=where.args if loader and data == where.source else None,
        )
    raise ConfigError(
        f"run_device {split} data is a {type(data).__name__}; expected a path, a loader, "
        "a Dataset or a pair (X, y)"
    )
