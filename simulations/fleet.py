"""A simulated fleet of real devices in one trio process; never imports tiers or a NATS bus.

``fedtier sim fleet --config FLEET.toml`` (or ``python -m simulations.fleet
--config FLEET.toml``) runs every device the file lists, each a real device:
its own Ed25519 identity, its own MQTT v5 connection (client id = its key id),
durable outbox, verified model store, data shard and torch trainer, all
driven by ``client.device.serve_device``. Trainings share one
``trio.CapacityLimiter`` (threads) and torch runs single-threaded, so a fleet
takes about one core at most.

Three kinds of device behave differently, simulated with trio sleeps on the
real clock (this simulates a fleet; it is not a test):

* vehicles: more local data, fast compute, intermittent. Online and offline
  periods are exponential; going offline closes the MQTT connection, coming
  back reopens it, and the durable outbox resends what no receipt answered.
* factory machines: medium data, slow compute (a log-normal extra delay
  between taking a model and training on it, so their updates arrive stale),
  always online.
* IoT gateways: little data, fast, mostly online.

A device marked ``misbehave_every_s`` also publishes, now and then, a
malformed envelope or an update signed by the wrong key on its own topic; the
edge rejects those and counts them.

Stdout carries one JSON object per line, for a parent process to show:
``{"type": "ready", ...}`` once every device is built and starting,
``{"type": "progress", ...}`` every ``progress_interval_s`` with cumulative
counters (sent, resent, accepted, duplicates, rejected, injected, bytes_sent,
trainings, online, participants) and the newest model version a device
loaded, and ``{"type": "done", ...}`` at the end.
The run stops after ``duration_s`` or on SIGTERM/SIGINT; then every
connection is closed, each device's log (``Outbox.export_log``) is written to
``log_dir/<device>.jsonl``, outboxes are closed and spans flushed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast

import numpy as np
import trio

from fedtier.protocol.bus import Bus, PublishAck, Subscription
from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import seal
from fedtier.protocol.errors import (
    BusClosed,
    BusUnavailable,
    ConfigError,
    FedtierError,
    KeyFileError,
    LocalProtocolError,
    PublishError,
    sole_error,
)
from fedtier.protocol.files import ConfigTable, load_public_key, load_signing_identity
from fedtier.protocol.identity import VerifyKey
from fedtier.protocol.messages import DeviceUpdate
from fedtier.protocol.names import MqttTopics, check_token

__all__ = [
    "DeviceKind",
    "DeviceSpec",
    "FleetConfig",
    "FleetCounters",
    "load_fleet_config",
    "main",
    "run_fleet",
    "serve_fleet",
]

_log = logging.getLogger("fedtier.fleet")

KindName = Literal["vehicle", "factory", "iot"]
KIND_NAMES: Final[tuple[KindName, ...]] = ("vehicle", "factory", "iot")
# After a failed connect (broker not up yet, or restarting) a device retries.
_RECONNECT_MIN_S: Final = 0.2
_RECONNECT_MAX_S: Final = 5.0


# -- configuration -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceKind:
    """How one kind of device behaves.

    Attributes:
        name: ``vehicle``, ``factory`` or ``iot``.
        min_interval_s: least time between the starts of two trainings (each
            device draws its own within +-20%, so a fleet does not beat in step).
        model_wait_s: train again on the current model after this long without
            a newer one.
        delay_median_s: median of the log-normal extra training delay, 0 for none.
        delay_sigma: log-space sigma of that delay.
        online_mean_s: mean online period (exponential); None: always online.
        offline_mean_s: mean offline period (exponential).
    """

    name: KindName
    min_interval_s: float
    model_wait_s: float = 30.0
    delay_median_s: float = 0.0
    delay_sigma: float = 0.0
    online_mean_s: float | None = None
    offline_mean_s: float = 0.0

    def extra_delay_s(self, rng: random.Random) -> float:
        """One draw of the simulated extra compute time."""
        if self.delay_median_s <= 0:
            return 0.0
        return rng.lognormvariate(math.log(self.delay_median_s), self.delay_sigma)

    def online_period_s(self, rng: random.Random) -> float:
        """How long the next online period lasts (``inf`` when always online)."""
        if self.online_mean_s is None:
            return math.inf
        return rng.expovariate(1.0 / self.online_mean_s)

    def offline_period_s(self, rng: random.Random) -> float:
        """How long the next offline period lasts."""
        if self.offline_mean_s <= 0:
            return 0.0
        return rng.expovariate(1.0 / self.offline_mean_s)


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device of the fleet file.

    Attributes:
        name: a file-name-safe label (``veh-0001``), for its log file.
        kind: its kind's name.
        site: the site token whose topics it uses.
        identity_key: its private key (PEM, 0600).
        data: its shard, an ``.npz`` with ``X`` and ``y``.
        misbehave_every_s: mean time between injected bad updates; None for never.
        cert_file, key_file: its TLS client certificate (CN = its key id) and
            key, when the broker requires one.
    """

    name: str
    kind: KindName
    site: str
    identity_key: Path
    data: Path
    misbehave_every_s: float | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class TrainingSpec:
    """The local model (``make_mlp(features, hidden, num_classes)``) and its SGD settings."""

    epochs: float = 5.0
    batch_size: int = 8
    lr: float = 0.2
    hidden: int = 32
    num_classes: int = 10


@dataclass(frozen=True, slots=True)
class SendSpec:
    """How devices encode and deliver updates (see ``client.device.DeviceConfig``)."""

    codec: str = "i8"
    error_feedback: bool = True
    receipt_timeout_s: float = 10.0
    max_attempts: int = 5
    backoff_max_s: float = 60.0
    # UNSAFE, chaos suite only: see client.device.DeviceConfig.unsafe_trust_puback.
    unsafe_trust_puback: bool = False


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """A fleet file read into typed settings.

    Attributes:
        fleet: the fleet token.
        name: this fleet process's name (a token): progress lines and the
            trace file name carry it.
        duration_s: stop after this long; None runs until a signal.
        seed: seeds each device's behaviour (online periods, delays).
        state_dir: one outbox sqlite file per device lives here.
        log_dir: device logs are written here at the end.
        trace_dir: JSON-lines span file folder, None for none (``OTEL_*`` rules).
        mqtt_host: the broker's host.
        mqtt_port: the broker's port.
        keepalive_s: MQTT keepalive.
        ca_file: the CA bundle that signs the broker's TLS certificate; None
            for a plain listener.
        central_key: the pinned central public key.
        edge_keys: per site, the edge keys whose receipts count.
        send: encoding and delivery.
        training: the local model.
        kinds: behaviour per kind.
        devices: the devices.
        train_threads: trainings running at once in this process.
        progress_interval_s: time between two progress lines.
        start_spread_s: devices start at uniform random times within this.
    """

    fleet: str
    name: str
    duration_s: float | None
    seed: int
    state_dir: Path
    log_dir: Path
    trace_dir: Path | None
    mqtt_host: str
    mqtt_port: int
    keepalive_s: int
    central_key: VerifyKey
    edge_keys: Mapping[str, tuple[VerifyKey, ...]]
    send: SendSpec
    training: TrainingSpec
    kinds: Mapping[str, DeviceKind]
    devices: tuple[DeviceSpec, ...]
    train_threads: int = 1
    progress_interval_s: float = 1.0
    start_spread_s: float = 5.0
    ca_file: Path | None = None


def _load_key(table: ConfigTable, key: str, path: Path) -> VerifyKey:
    try:
        return load_public_key(path)
    except KeyFileError as exc:
        raise ConfigError(f"{table.locate(key)}: {exc}") from exc


def _kind(name: KindName, table: ConfigTable) -> DeviceKind:
    online = table.optional_number("online_mean_s")
    kind = DeviceKind(
        name=name,
        min_interval_s=table.number("min_interval_s", low=0.0),
        model_wait_s=table.number("model_wait_s", 30.0, low=0.0),
        delay_median_s=table.number("delay_median_s", 0.0, low=0.0),
        delay_sigma=table.number("delay_sigma", 0.0, low=0.0),
        online_mean_s=online,
        offline_mean_s=table.number("offline_mean_s", 0.0, low=0.0),
    )
    table.finish()
    return kind


def load_fleet_config(path: Path) -> FleetConfig:
    """Read and check a fleet file (relative paths are relative to its folder).

    Raises:
        ConfigError: unreadable, not TOML, or a key is missing, unknown or bad
            (one sentence naming it).
    """
    root = ConfigTable.load(path, what="fleet file")
    duration = root.optional_number("duration_s")
    trace_dir = root.path("trace_dir", None)

    mqtt = root.table("mqtt")
    port = mqtt.port("port")
    host = mqtt.string("host", "127.0.0.1")
    keepalive = mqtt.integer("keepalive_s", 60, low=5)
    ca_file = mqtt.path("ca_file", None)
    mqtt.finish()

    central = root.table("central")
    central_key = _load_key(central, "public_key", central.path("public_key"))
    central.finish()

    send_table = root.table("send")
    send = SendSpec(
        codec=send_table.string("codec", "i8"),
        error_feedback=send_table.boolean("error_feedback", True),
        receipt_timeout_s=send_table.number("receipt_timeout_s", 10.0, low=0.01),
        max_attempts=send_table.integer("max_attempts", 5, low=1),
        backoff_max_s=send_table.number("backoff_max_s", 60.0, low=0.01),
        unsafe_trust_puback=send_table.boolean("unsafe_trust_puback", False),
    )
    send_table.finish()
    try:
        # A percentage needs the model size; any size checks the name's syntax.
        CodecSpec.parse(send.codec, num_params=2**31 if "%" in send.codec else None)
    except LocalProtocolError as exc:
        raise ConfigError(f"{send_table.locate('codec')}: {exc}") from exc

    tr = root.table("training")
    training = TrainingSpec(
        epochs=tr.number("epochs", 5.0, low=0.0, low_open=True),
        batch_size=tr.integer("batch_size", 8, low=1),
        lr=tr.number("lr", 0.2, low=0.0, low_open=True),
        hidden=tr.integer("hidden", 32, low=1),
        num_classes=tr.integer("num_classes", 10, low=2),
    )
    tr.finish()

    kinds_table = root.table("kinds")
    kinds: dict[str, DeviceKind] = {}
    for kind_name in KIND_NAMES:
        if kinds_table.has(kind_name):
            kinds[kind_name] = _kind(kind_name, kinds_table.table(kind_name))
    kinds_table.finish()

    # Site names are the keys of [sites], each checked as a token here.
    sites_table = root.table("sites")
    edge_keys: dict[str, tuple[VerifyKey, ...]] = {}
    for site in sites_table.remaining():
        try:
            check_token("site", site)
        except LocalProtocolError as exc:
            raise ConfigError(f"{sites_table.where}: {exc}") from exc
        table = sites_table.table(site)
        edge_keys[site] = tuple(
            _load_key(table, f"edge_keys[{i}]", key_file)
            for i, key_file in enumerate(table.paths("edge_keys", required=True))
        )
        table.finish()
    sites_table.finish()

    devices: list[DeviceSpec] = []
    names: set[str] = set()
    for table in root.tables("devices", required=True):
        name = table.token("name", kind="device")
        kind = table.choice("kind", KIND_NAMES)
        site = table.token("site")
        if kind not in kinds:
            raise ConfigError(f"{table.where}: kind {kind!r} has no [kinds.{kind}] table")
        if site not in edge_keys:
            raise ConfigError(f"{table.where}: site {site!r} has no [sites.{site}] table")
        if name in names:
            raise ConfigError(f"{table.where}: device name {name!r} is listed twice")
        names.add(name)
        devices.append(
            DeviceSpec(
                name=name,
                kind=kind,
                site=site,
                identity_key=table.path("identity_key"),
                data=table.path("data"),
                misbehave_every_s=table.optional_number("misbehave_every_s"),
                cert_file=table.path("cert_file", None),
                key_file=table.path("key_file", None),
            )
        )
        if (devices[-1].cert_file is None) != (devices[-1].key_file is None):
            raise ConfigError(f"{table.where}: a client certificate needs its key; set both")
        table.finish()

    config = FleetConfig(
        fleet=root.token("fleet"),
        name=root.token("name", kind="fleet process"),
        duration_s=duration,
        seed=root.integer("seed", 0),
        state_dir=root.path("state_dir"),
        log_dir=root.path("log_dir"),
        trace_dir=trace_dir,
        mqtt_host=host,
        mqtt_port=port,
        keepalive_s=keepalive,
        ca_file=ca_file,
        central_key=central_key,
        edge_keys=edge_keys,
        send=send,
        training=training,
        kinds=kinds,
        devices=tuple(devices),
        train_threads=root.integer("train_threads", 1, low=1),
        progress_interval_s=root.number("progress_interval_s", 1.0, low=0.05),
        start_spread_s=root.number("start_spread_s", 5.0, low=0.0),
    )
    root.finish()
    return config


# -- counters and the metered bus -----------------------------------------------------


@dataclass(slots=True)
class FleetCounters:
    """What the fleet did so far (cumulative), summed over devices.

    Attributes:
        online: devices connected now.
        bytes_sent: payload bytes published on update topics (resends included).
        injected: bad updates published on purpose, by kind.
    """

    online: int = 0
    bytes_sent: int = 0
    injected: dict[str, int] = field(default_factory=dict)


class _MeteredBus(Bus):
    """A device's bus that counts the bytes it publishes on its update topic."""

    def __init__(self, inner: Bus, update_topic: str, counters: FleetCounters) -> None:
        self.flavor = inner.flavor
        self._inner = inner
        self._topic = update_topic
        self._counters = counters

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
        retain: bool = False,
    ) -> PublishAck:
        ack = await self._inner.publish(
            subject, payload, headers=headers, msg_id=msg_id, retain=retain
        )
        if subject == self._topic:
            self._counters.bytes_sent += len(payload)
        return ack

    def subscribe(
        self,
        subject_filter: str,
        *,
        durable: str | None = None,
        capacity: int = 64,
        latest_only: bool = False,
    ) -> AbstractAsyncContextManager[Subscription]:
        return self._inner.subscribe(
            subject_filter, durable=durable, capacity=capacity, latest_only=latest_only
        )


class _ComputeDelayLimiter:
    """A per-device thread limiter that first sleeps the device's simulated extra compute time.

    trio documents ``to_thread.run_sync``'s limiter as any object with
    ``acquire_on_behalf_of``/``release_on_behalf_of``. The device loop reads
    its model before asking for a thread, so sleeping here (not holding the
    shared limiter) makes the update arrive later on the same base version:
    exactly what slow hardware does to staleness.
    """

    def __init__(self, shared: trio.CapacityLimiter, delay_s: Callable[[], float]) -> None:
        self._shared = shared
        self._delay_s = delay_s

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await trio.sleep(self._delay_s())
        await self._shared.acquire_on_behalf_of(borrower)

    def release_on_behalf_of(self, borrower: object) -> None:
        self._shared.release_on_behalf_of(borrower)


# -- the fleet -------------------------------------------------------------------------


class _FleetDevice:
    """One simulated device: its long-lived state across online periods."""

    def __init__(
        self,
        spec: DeviceSpec,
        config: FleetConfig,
        shared_limiter: trio.CapacityLimiter,
        counters: FleetCounters,
        rng: random.Random,
        stack: ExitStack,
    ) -> None:
        from fedtier.client.device import DeviceConfig, DeviceReport
        from fedtier.client.model_store import ModelStore
        from fedtier.client.outbox import Outbox
        from fedtier.client.torch_trainer import TorchTrainer, make_mlp

        kind = config.kinds[spec.kind]
        try:
            self.identity = load_signing_identity(spec.identity_key)
        except KeyFileError as exc:
            raise ConfigError(f"device {spec.name}: {exc}") from exc
        X, y = _load_shard(spec.data)
        training = config.training
        model = make_mlp(X.shape[1], training.hidden, training.num_classes, seed=0)
        self.trainer = TorchTrainer(
            model,
            X,
            y,
            epochs=training.epochs,
            batch_size=training.batch_size,
            lr=training.lr,
            seed=rng.randrange(2**31),
        )
        self.spec = spec
        self.kind = kind
        self.rng = rng
        self.counters = counters
        self.mqtt_host = config.mqtt_host
        self.mqtt_port = config.mqtt_port
        self.keepalive_s = config.keepalive_s
        self.ca_file = config.ca_file
        self.store = ModelStore(config.central_key, self.trainer.layout, config.fleet)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = stack.enter_context(Outbox(config.state_dir / f"{spec.name}.outbox.sqlite"))
        self.report = DeviceReport()
        send = config.send
        self.device_config = DeviceConfig(
            fleet=config.fleet,
            site=spec.site,
            trusted_edges=config.edge_keys[spec.site],
            codec=send.codec,
            error_feedback=send.error_feedback,
            receipt_timeout_s=send.receipt_timeout_s,
            max_attempts=send.max_attempts,
            backoff_max_s=send.backoff_max_s,
            retry_delay_s=0.5,
            # +-20%: devices of one kind must not all train in the same instant.
            min_interval_s=kind.min_interval_s * rng.uniform(0.8, 1.2),
            model_wait_s=kind.model_wait_s,
            unsafe_trust_puback=send.unsafe_trust_puback,
        )
        self.topics = MqttTopics(config.fleet, spec.site)
        self.limiter: trio.CapacityLimiter = (
            shared_limiter
            if kind.delay_median_s <= 0
            else cast(
                trio.CapacityLimiter,
                _ComputeDelayLimiter(shared_limiter, lambda: kind.extra_delay_s(rng)),
            )
        )

    @property
    def key_id(self) -> str:
        return self.identity.key_id

    async def run(self, start_delay_s: float) -> None:
        """Alternate online and offline periods until cancelled."""
        await trio.sleep(start_delay_s)
        backoff = _RECONNECT_MIN_S
        while True:
            online_s = self.kind.online_period_s(self.rng)
            lost = False
            try:
                with trio.move_on_after(online_s):
                    await self._online()
            except* (BusUnavailable, BusClosed) as group:
                lost = True
                _log.info("device %s lost its broker (%s); retrying", self.spec.name, group)
            if lost:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, _RECONNECT_MAX_S)
                continue
            backoff = _RECONNECT_MIN_S
            await trio.sleep(self.kind.offline_period_s(self.rng))

    async def _online(self) -> None:
        from fedtier.client.device import serve_device
        from fedtier.protocol.bus.mqtt import MqttConfig, open_mqtt_bus

        config = MqttConfig(
            host=self.mqtt_host,
            port=self.mqtt_port,
            client_id=self.key_id,
            keepalive_s=self.keepalive_s,
            ca_file=self.ca_file,
            cert_file=self.spec.cert_file,
            key_file=self.spec.key_file,
            # A device is the only consumer of its receipts: an exclusive
            # durable subscription has no loss window across a broker restart.
            shared_durables=False,
            # The device listener binds the client id to the certificate.
            single_connection=True,
        )
        async with open_mqtt_bus(config) as raw_bus:
            bus = _MeteredBus(raw_bus, self.topics.update(self.key_id), self.counters)
            self.counters.online += 1
            try:
                async with trio.open_nursery() as nursery:
                    if self.spec.misbehave_every_s is not None:
                        nursery.start_soon(self._misbehave, bus, self.spec.misbehave_every_s)
                    await serve_device(
                        self.device_config,
                        self.identity,
                        bus,
                        self.trainer,
                        self.store,
                        self.outbox,
                        limiter=self.limiter,
                        report=self.report,
                    )
                    # rounds is None: serve_device returns only if that changes.
                    nursery.cancel_scope.cancel()
            finally:
                self.counters.online -= 1

    async def _misbehave(self, bus: Bus, every_s: float) -> None:
        """Now and then publish garbage or a badly signed update on this device's own topic."""
        topic = self.topics.update(self.key_id)
        layout = self.trainer.layout
        zeros = encode(np.zeros(layout.num_params, dtype=np.float32), CodecSpec("f32"))
        while True:
            await trio.sleep(self.rng.expovariate(1.0 / every_s))
            if self.rng.random() < 0.5:
                what = "malformed"
                payload = os.urandom(self.rng.randint(16, 256))
            else:
                what = "bad_signature"
                message = DeviceUpdate(
                    fleet=self.device_config.fleet,
                    sender=self.key_id,
                    seq=self.rng.randrange(1, 2**40),
                    created_ms=int(time.time() * 1000),
                    update_id=os.urandom(16),
                    base_version=self.store.version or 0,
                    layout=layout.fingerprint,
                    num_params=layout.num_params,
                    n_samples=1,
                    codec=CodecSpec("f32"),
                )
                sealed = seal(message, zeros, self.identity)
                # The envelope is a msgpack array ending with the 64-byte
                # signature: flipping its last bit breaks only the signature.
                payload = sealed[:-1] + bytes([sealed[-1] ^ 0x01])
            try:
                await bus.publish(topic, payload)
            except (BusUnavailable, PublishError):
                continue
            self.counters.injected[what] = self.counters.injected.get(what, 0) + 1

    def export_log(self, log_dir: Path) -> None:
        """Write this device's log; the outbox must still be open."""
        self.outbox.export_log(log_dir / f"{self.spec.name}.jsonl")


def _load_shard(path: Path) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    from fedtier.client.config import load_training_data

    return load_training_data(path)


def _snapshot(
    config: FleetConfig, devices: Sequence[_FleetDevice], counters: FleetCounters, started: float
) -> dict[str, object]:
    reports = [d.report for d in devices]
    return {
        "fleet": config.name,
        "t": round(time.monotonic() - started, 3),
        "devices": len(devices),
        "online": counters.online,
        "trainings": sum(r.trainings for r in reports),
        "sent": sum(r.sent for r in reports),
        "resent": sum(r.resends for r in reports),
        "accepted": sum(r.accepted for r in reports),
        "duplicates": sum(r.duplicates for r in reports),
        "rejected": sum(r.rejected for r in reports),
        "injected": dict(counters.injected),
        "bytes_sent": counters.bytes_sent,
        "participants": sum(1 for r in reports if r.accepted > 0),
        # The newest model version a device of this fleet verified and loaded.
        "newest_model": max(
            (r.last_model_version for r in reports if r.last_model_version is not None),
            default=None,
        ),
    }


def _emit(kind: str, body: Mapping[str, object]) -> None:
    sys.stdout.write(json.dumps({"type": kind, **body}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def serve_fleet(
    config: FleetConfig,
    *,
    emit: Callable[[str, Mapping[str, object]], None] = _emit,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> FleetCounters:
    """Run every device of ``config`` until ``duration_s`` passes or the caller cancels.

    Reports started once every device is built (keys, data, outboxes loaded).
    On the way out (cancellation included) each device's MQTT connection is
    closed, its log exported to ``config.log_dir`` and its outbox closed, so
    nothing acknowledged by a device is lost and nothing pending is dropped.

    Raises:
        ConfigError: a key, data or outbox file is unusable.
    """
    import torch

    # Many devices share this process; one thread each would fight for cores.
    torch.set_num_threads(1)
    master = random.Random(config.seed)  # noqa: S311 - a simulation, not crypto
    counters = FleetCounters()
    limiter = trio.CapacityLimiter(config.train_threads)
    started = time.monotonic()
    config.log_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        devices = [
            _FleetDevice(
                spec,
                config,
                limiter,
                counters,
                random.Random(master.randrange(2**63)),  # noqa: S311
                stack,
            )
            for spec in config.devices
        ]
        try:
            with trio.move_on_after(math.inf if config.duration_s is None else config.duration_s):
                async with trio.open_nursery() as nursery:
                    for device in devices:
                        nursery.start_soon(device.run, master.uniform(0.0, config.start_spread_s))
                    nursery.start_soon(_report_progress, config, devices, counters, started, emit)
                    emit("ready", _snapshot(config, devices, counters, started))
                    task_status.started()
        finally:
            for device in devices:
                try:
                    device.export_log(config.log_dir)
                except OSError as exc:
                    _log.error("cannot write the log of device %s: %s", device.spec.name, exc)
            emit("done", _snapshot(config, devices, counters, started))
    return counters


async def _report_progress(
    config: FleetConfig,
    devices: Sequence[_FleetDevice],
    counters: FleetCounters,
    started: float,
    emit: Callable[[str, Mapping[str, object]], None],
) -> None:
    while True:
        await trio.sleep(config.progress_interval_s)
        emit("progress", _snapshot(config, devices, counters, started))


async def _serve_until_signal(config: FleetConfig) -> None:
    from fedtier.protocol.telemetry.tracing import setup_tracing

    tracing = setup_tracing(
        "fedtier-device", instance_id=config.name, jsonl_dir=config.trace_dir, tier="device"
    )
    try:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        _log.info("%s: stopping the fleet", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            await serve_fleet(config)
            nursery.cancel_scope.cancel()
    finally:
        tracing.shutdown()


def run_fleet(config_path: Path) -> int:
    """Run a fleet file until its duration passes or SIGTERM/SIGINT; return the exit status.

    Returns:
        0 after a clean stop, 2 for an unusable fleet file, 1 when the fleet
        failed (one sentence on stderr).
    """
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)r",
    )
    try:
        config = load_fleet_config(config_path)
    except ConfigError as exc:
        print(f"fedtier sim fleet: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(_serve_until_signal, config)
    except BaseException as exc:  # mapped to an exit status below
        error = sole_error(exc)
        if isinstance(error, ConfigError):
            print(f"fedtier sim fleet: {error}", file=sys.stderr)
            return 2
        if isinstance(error, FedtierError):
            print(f"fedtier sim fleet: the fleet stopped: {error}", file=sys.stderr)
            return 1
        if isinstance(error, KeyboardInterrupt):
            return 130
        raise
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulations.fleet --config FLEET.toml``."""
    parser = argparse.ArgumentParser(
        prog="fedtier sim fleet", description="Run a simulated fleet of devices."
    )
    parser.add_argument("--config", type=Path, required=True, help="the fleet's TOML file")
    args = parser.parse_args(argv)
    return run_fleet(args.config)


if __name__ == "__main__":
    raise SystemExit(main())
