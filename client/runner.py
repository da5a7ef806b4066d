"""One device as a process (``fedtier device --config FILE``); imports protocol and client only.

``run_device(config_path)`` reads the device file (``client.config``), loads
the device's key, the pinned central key and its data, builds the trainer,
opens the outbox and the model store (re-verifying a cached model), connects
to the site broker over MQTT v5 (client id: the key id unless the file names
one) and runs ``client.device.serve_device`` until its ``rounds`` are
delivered or SIGTERM/SIGINT arrives. A stop is clean whenever it comes: every
update was stored in the outbox before its first publish and leaves it only
with its receipt, so the next start resends whatever is pending.

A broker that cannot be reached at start is retried with backoff (each retry
logged): a device outlives its network. Spans go where the ``OTEL_*``
variables say (OTLP when an endpoint is set, else nowhere).
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Final

import trio

from fedtier.protocol.errors import BusUnavailable, ConfigError, FedtierError, KeyFileError

__all__ = ["run_device"]

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


async def _serve(config_path: Path) -> None:
    from fedtier.client.config import build_trainer, load_device_settings, load_training_data
    from fedtier.client.device import DeviceReport, serve_device
    from fedtier.client.model_store import ModelStore
    from fedtier.client.outbox import Outbox
    from fedtier.protocol.bus.mqtt import MqttConfig, open_mqtt_bus
    from fedtier.protocol.files import load_public_key, load_signing_identity
    from fedtier.protocol.telemetry.tracing import setup_tracing

    settings = load_device_settings(config_path)
    try:
        identity = load_signing_identity(settings.identity_key)
        central_key = load_public_key(settings.central_key)
    except KeyFileError as exc:
        raise ConfigError(str(exc)) from exc
    X, y = load_training_data(settings.data)
    trainer = build_trainer(settings.training, X, y)
    store = ModelStore(
        central_key,
        trainer.layout,
        settings.device.fleet,
        cache_path=settings.model_cache,
    )
    mqtt = settings.mqtt
    mqtt_config = MqttConfig(
        host=mqtt.host,
        port=mqtt.port,
        client_id=mqtt.client_id or identity.key_id,
        keepalive_s=mqtt.keepalive_s,
        session_expiry_s=mqtt.session_expiry_s,
        ca_file=mqtt.tls_ca_file,
        cert_file=mqtt.tls_cert_file,
        key_file=mqtt.tls_key_file,
        # One consumer per receipt topic: an exclusive durable subscription
        # has no loss window across a broker restart (docs/transport.md, MQTT).
        shared_durables=False,
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


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            _log.info(
                "%s: stopping (the outbox keeps what is pending)", signal.Signals(signum).name
            )
            scope.cancel()
            return


def _sole_error(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def run_device(config_path: Path | str) -> int:
    """Run one device from its TOML file until its rounds are done or a signal; exit status.

    Returns:
        0 after its rounds or a clean stop on SIGTERM/SIGINT, 2 for an unusable
        configuration, key or data file, 1 when the device failed (the reason
        is logged as one sentence).
    """
    _configure_logging()
    try:
        trio.run(_serve, Path(config_path))
    except BaseException as exc:  # mapped to an exit status below
        error = _sole_error(exc)
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
