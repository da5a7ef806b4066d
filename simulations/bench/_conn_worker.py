"""The processes of ``fedtier bench connections``; must not import simulations.testing or rich.

Two roles, each run by ``fedtier.simulations.bench.connections`` as
``python -m fedtier.simulations.bench._conn_worker SPEC`` (``SPEC`` is a
``ConnSpec`` as JSON):

* ``devices``: a slice of the device fleet, thousands of MQTT v5 persistent
  sessions in one trio process (``_conn_mqtt``). Each session subscribes to its
  receipt topic, then (with ``send_updates``) publishes a signed update at a
  jittered interval, closed loop: it waits for the edge's signed receipt
  (verified) before the next. A lost connection counts as a drop; the session
  reconnects (its persistent session resumes) and resends what was unanswered.
* ``edge``: the real ``EdgeDaemon`` for the site (real MQTT bus, in-memory
  NATS upstream, the edge bench's settings), every device key registered.

A child writes ``fedtier-bench-ready`` on stderr once set up, and JSON lines on
stdout: ``{"event": "connected", ...}`` once every session of a devices child
connected (or gave up), and one ``{"event": "result", ...}`` after SIGTERM
(devices stop sending, wait up to ``drain_s`` for the receipts they miss, and
disconnect; the edge samples its counters and shuts down). Times are
``time.monotonic_ns()`` (one clock for every process of the machine).

Every process derives the device, edge and central identities from fixed seeds,
so no key material travels between them; certificates (TLS) come from the
bench's throwaway PKI folder, one per device, named by its key id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import resource
import signal
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import trio

from fedtier.protocol.bus import MemoryBroker, MemoryBus
from fedtier.protocol.bus.mqtt import MqttConfig, open_mqtt_bus
from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import open_envelope, seal
from fedtier.protocol.errors import (
    BusUnavailable,
    ConfigError,
    RemoteProtocolError,
)
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import layout_of
from fedtier.protocol.messages import DeviceUpdate, Receipt
from fedtier.protocol.names import MqttTopics
from fedtier.simulations.bench._conn_mqtt import MqttSession, connect_session
from fedtier.simulations.bench._edge_worker import (
    READY_LINE,
    JsonSpec,
    announce_ready,
    bench_edge_config,
    bench_edge_keys_and_registry,
    bench_identity,
)
from fedtier.tiers.edge import EdgeDaemon

__all__ = [
    "EDGE_USER",
    "FLEET",
    "READY_LINE",
    "ConnSpec",
    "device_identity",
    "hist_percentile_ms",
    "main",
    "raise_nofile",
]

Role = Literal["devices", "edge"]

FLEET: Final = "bench"
REGION: Final = "bench"
EDGE_USER: Final = "edge-bench"
"""The edge's certificate CN: its user name in the ACL."""
# Distinct deltas cycled through the updates: the signed header makes every
# envelope unique anyway, and encoding is not what is measured.
_DISTINCT_DELTAS: Final = 4
_DELTA_SCALE: Final = 1e-3
_CONNECT_ATTEMPTS: Final = 5
# Long: a broker behind on TLS handshakes still completes the ones it accepted,
# and a client that gives up and retries only adds a handshake to its queue
# (with 30 s, 10,000 TLS connects on a loaded machine collapsed into retries).
_CONNECT_ATTEMPT_S: Final = 300.0
_RECONNECT_BACKOFF_S: Final = (0.5, 1.0, 2.0, 4.0)
_PING_SCAN_S: Final = 2.0
# Latency histogram: bucket i holds (1.02^(i-1), 1.02^i] microseconds, 2 % wide.
_HIST_BASE: Final = 1.02
_FD_MARGIN: Final = 256
_KEPT_REASONS: Final = 8
_PROGRESS_EVERY_S: Final = 5.0


@dataclass(frozen=True, slots=True)
class ConnSpec(JsonSpec):
    """What one child process does.

    Attributes:
        role: ``devices`` or ``edge``.
        host: the broker's address.
        port: the broker's port.
        site: the site token (topics, client ids derive from it).
        first_device: index of this child's first device (devices).
        devices: devices in this child (devices), or in the whole site (edge).
        num_params: model size.
        codec: the update format, a ``CodecSpec`` name.
        send_updates: devices only: publish updates (else connect and idle).
        interval_s: mean time between one device's updates.
        jitter: the interval is drawn in ``interval_s * [1 - jitter, 1 + jitter]``.
        keepalive_s: MQTT keepalive of the device sessions.
        session_expiry_s: session expiry the devices ask for.
        tls_dir: the PKI folder (certificates per device key id, ``ca.pem``);
            empty for plain TCP.
        connect_concurrency: devices only: connects in progress at once.
        drain_s: devices only: how long, after SIGTERM, to wait for receipts.
        state_dir: edge only: its state folder.
        seed: jitter and start offsets.
    """

    role: Role
    host: str
    port: int
    site: str
    first_device: int
    devices: int
    num_params: int
    codec: str
    send_updates: bool = True
    interval_s: float = 45.0
    jitter: float = 0.33
    keepalive_s: int = 60
    session_expiry_s: int = 3600
    tls_dir: str = ""
    connect_concurrency: int = 64
    drain_s: float = 30.0
    state_dir: str = ""
    seed: int = 0

    @property
    def topics(self) -> MqttTopics:
        """The site's topics."""
        return MqttTopics(FLEET, self.site)


# -- shared by every process -------------------------------------------------------------


def device_identity(index: int) -> SigningIdentity:
    """The signing identity of device ``index``, the same in every process."""
    return bench_identity(f"device-{index}")


def raise_nofile(needed: int, who: str) -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the hard limit.

    Children (Mosquitto too) inherit it.

    Raises:
        ConfigError: the hard limit is below ``needed``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise ConfigError(
            f"{who} needs {needed} open files but the hard RLIMIT_NOFILE is {hard}:"
            f" raise it (ulimit -Hn, limits.conf or the container's nofile) or use fewer sessions"
        )
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return -1 if hard == resource.RLIM_INFINITY else int(hard)


def _hist_bucket(latency_ns: int) -> int:
    micros = max(1.0, latency_ns / 1000)
    return math.ceil(math.log(micros, _HIST_BASE))


def hist_percentile_ms(hist: dict[int, int], pct: float) -> float | None:
    """The ``pct`` percentile of a latency histogram, as its bucket's upper edge in ms."""
    total = sum(hist.values())
    if not total:
        return None
    rank = math.ceil(total * pct / 100)
    seen = 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return round(_HIST_BASE**bucket / 1000, 3)
    raise AssertionError("unreachable: the ranks add up to total")


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


# -- devices -----------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Device:
    index: int
    identity: SigningIdentity
    client_id: str
    update_topic: str
    receipt_topic: str
    ssl_context: ssl.SSLContext | None
    session: MqttSession | None = None
    seq: int = 0
    pending: bytes = b""
    receipt_status: str = ""
    wake: trio.Event = dataclasses.field(default_factory=trio.Event)


class _Fleet:
    """The sessions of one devices child and what they counted."""

    def __init__(self, spec: ConnSpec, nursery: trio.Nursery) -> None:
        self.spec = spec
        self.nursery = nursery
        self.rng = np.random.default_rng([spec.seed, spec.first_device])
        self.edge_keys = {bench_identity("edge").key_id: bench_identity("edge").verify_key}
        self.limiter = trio.CapacityLimiter(spec.connect_concurrency)
        self.stop = trio.Event()
        self.drain_scopes: set[trio.CancelScope] = set()
        self.drain_deadline = math.inf
        codec = CodecSpec.parse(spec.codec, num_params=spec.num_params)
        self.codec = codec
        self.layout = layout_of([("delta", (spec.num_params,))])
        rng = np.random.Generator(np.random.PCG64(spec.seed))
        self.payloads = [
            encode(
                rng.standard_normal(spec.num_params, dtype=np.float32) * np.float32(_DELTA_SCALE),
                codec,
            )
            for _ in range(_DISTINCT_DELTAS)
        ]
        topics = spec.topics
        self.devices: list[_Device] = []
        for index in range(spec.first_device, spec.first_device + spec.devices):
            identity = device_identity(index)
            self.devices.append(
                _Device(
                    index=index,
                    identity=identity,
                    # As deployed: the device listener takes the certificate's
                    # CN (the key id) as the client id.
                    client_id=identity.key_id,
                    update_topic=topics.update(identity.key_id),
                    receipt_topic=topics.receipt(identity.key_id),
                    ssl_context=self._ssl_context(identity.key_id),
                )
            )
        # Counters.
        self.connected_once = 0
        self.gave_up = 0
        self.connect_failures = 0
        self.first_connect_ns: int | None = None
        self.last_connect_ns: int | None = None
        self.drops = 0
        self.drop_reasons: Counter[str] = Counter()
        self.reconnects = 0
        self.sent = 0
        self.resent = 0
        self.puback_errors = 0
        self.suback_refused = 0
        self.receipts: Counter[str] = Counter()
        self.extra_receipts = 0
        self.bad_receipts = 0
        self.missing = 0
        self.hist: Counter[int] = Counter()
        self.first_publish_ns: int | None = None
        self.last_receipt_ns: int | None = None
        self.all_connected = trio.Event()

    def _ssl_context(self, key_id: str) -> ssl.SSLContext | None:
        if not self.spec.tls_dir:
            return None
        folder = Path(self.spec.tls_dir)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            context.load_verify_locations(folder / "ca.pem")
            context.load_cert_chain(folder / f"{key_id}.pem", folder / f"{key_id}.key")
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS files of device {key_id}: {exc}") from exc
        return context

    def _on_message(self, device: _Device) -> Any:
        def take(topic: str, payload: bytes) -> None:
            try:
                message = open_envelope(payload, self.edge_keys).message
            except RemoteProtocolError:  # counted: a bench must not die of one bad receipt
                self.bad_receipts += 1
                return
            if not isinstance(message, Receipt) or message.update_id != device.pending:
                self.extra_receipts += 1
                return
            status = message.status.value
            device.receipt_status = f"{status}:{message.reason}" if message.reason else status
            device.pending = b""
            device.wake.set()

        return take

    async def _reader(self, device: _Device, session: MqttSession) -> None:
        await session.run()
        if session.lost_reason:
            self.drops += 1
            if len(self.drop_reasons) < _KEPT_REASONS or session.lost_reason in self.drop_reasons:
                self.drop_reasons[session.lost_reason] += 1
        device.wake.set()

    async def _connect(self, device: _Device, *, first: bool) -> bool:
        """Connect and subscribe; False once the attempts (or the drain time) ran out."""
        spec = self.spec
        for attempt in range(_CONNECT_ATTEMPTS):
            if trio.current_time() >= self.drain_deadline:
                return False
            try:
                async with self.limiter:
                    session = await connect_session(
                        spec.host,
                        spec.port,
                        device.client_id,
                        self._on_message(device),
                        ssl_context=device.ssl_context,
                        keepalive_s=spec.keepalive_s,
                        session_expiry_s=spec.session_expiry_s,
                        timeout_s=_CONNECT_ATTEMPT_S,
                    )
                device.session = session
                self.nursery.start_soon(self._reader, device, session)
                if await session.subscribe(device.receipt_topic) != 1:
                    self.suback_refused += 1
                if not first:
                    self.reconnects += 1
                return True
            except BusUnavailable as exc:
                self.connect_failures += 1
                if len(self.drop_reasons) < _KEPT_REASONS:
                    self.drop_reasons[f"connect: {exc}"] += 1
                if attempt < len(_RECONNECT_BACKOFF_S):
                    await trio.sleep(_RECONNECT_BACKOFF_S[attempt])
        return False

    def _next_update(self, device: _Device) -> bytes:
        device.seq += 1
        update_id = hashlib.blake2b(
            f"{self.spec.site}/{device.index}/{device.seq}".encode(), digest_size=16
        ).digest()
        message = DeviceUpdate(
            fleet=FLEET,
            sender=device.identity.key_id,
            seq=device.seq,
            created_ms=time.time_ns() // 1_000_000,
            update_id=update_id,
            base_version=0,
            layout=self.layout.fingerprint,
            num_params=self.spec.num_params,
            n_samples=10,
            codec=self.codec,
        )
        device.pending = update_id
        device.receipt_status = ""
        return seal(message, self.payloads[device.seq % _DISTINCT_DELTAS], device.identity)

    async def _send_update(self, device: _Device) -> None:
        """Publish one update and wait for its receipt, reconnecting as often as needed."""
        envelope = self._next_update(device)
        self.sent += 1
        sent_ns = time.monotonic_ns()
        if self.first_publish_ns is None:
            self.first_publish_ns = sent_ns
        dup = False
        with trio.CancelScope(deadline=self.drain_deadline) as scope:
            self.drain_scopes.add(scope)
            try:
                while device.pending:
                    session = device.session
                    if session is None or session.lost.is_set():
                        if not await self._connect(device, first=False):
                            break
                        continue
                    device.wake = trio.Event()
                    try:
                        code = await session.publish(device.update_topic, envelope, dup=dup)
                    except BusUnavailable:
                        dup = True
                        self.resent += 1
                        continue
                    if code >= 0x80:
                        self.puback_errors += 1
                    await device.wake.wait()
                    if device.pending:  # woken by the loss of the connection
                        dup = True
                        self.resent += 1
            finally:
                self.drain_scopes.discard(scope)
        if device.pending:
            self.missing += 1
            device.pending = b""
            return
        now = time.monotonic_ns()
        self.last_receipt_ns = now
        self.receipts[device.receipt_status] += 1
        self.hist[_hist_bucket(now - sent_ns)] += 1

    async def _life(self, device: _Device) -> None:
        spec = self.spec
        connected = await self._connect(device, first=True)
        now_ns = time.monotonic_ns()
        if connected:
            self.connected_once += 1
            self.first_connect_ns = self.first_connect_ns or now_ns
            self.last_connect_ns = now_ns
        else:
            self.gave_up += 1
        if self.connected_once + self.gave_up == len(self.devices):
            self.all_connected.set()
        if not connected or not spec.send_updates:
            return
        # The first update at a random moment of the first interval: a steady rate at once.
        next_at = trio.current_time() + self.rng.uniform(0, spec.interval_s)
        while True:
            with trio.move_on_at(next_at):
                await self.stop.wait()
            if self.stop.is_set():
                return
            next_at = trio.current_time() + spec.interval_s * self.rng.uniform(
                1 - spec.jitter, 1 + spec.jitter
            )
            await self._send_update(device)

    async def pinger(self) -> None:
        """PINGREQ on every session idle for half its keepalive (MQTT asks within 1.5x)."""
        idle_s = self.spec.keepalive_s / 2
        while True:
            await trio.sleep(_PING_SCAN_S)
            now = trio.current_time()
            for device in self.devices:
                session = device.session
                idle = session is not None and now - session.last_send > idle_s
                if idle and session is not None and not session.lost.is_set():
                    session.last_send = now  # one ping in flight per session
                    self.nursery.start_soon(_ping, session)

    async def log_progress(self) -> None:
        """A line on stderr (the child's log) every few seconds: what a stuck run did."""
        while True:
            await trio.sleep(_PROGRESS_EVERY_S)
            print(
                f"progress: connected {self.connected_once} gave_up {self.gave_up}"
                f" connect_failures {self.connect_failures} drops {self.drops}"
                f" sent {self.sent} receipted {sum(self.receipts.values())}"
                f" reasons {dict(self.drop_reasons)}",
                file=sys.stderr,
                flush=True,
            )

    def begin_drain(self) -> None:
        self.stop.set()
        self.drain_deadline = trio.current_time() + self.spec.drain_s
        for scope in self.drain_scopes:
            scope.deadline = self.drain_deadline

    async def run_lives(self) -> None:
        async with trio.open_nursery() as lives:
            for device in self.devices:
                lives.start_soon(self._life, device)

    async def disconnect_all(self) -> int:
        """DISCONNECT every live session; returns how many were still connected."""
        live = [d.session for d in self.devices if d.session and not d.session.lost.is_set()]
        limiter = trio.CapacityLimiter(256)

        async def close(session: MqttSession) -> None:
            async with limiter:
                await session.disconnect()

        async with trio.open_nursery() as nursery:
            for session in live:
                nursery.start_soon(close, session)
        return len(live)

    def result(self, connected_at_stop: int, cpu_s: float) -> dict[str, Any]:
        return {
            "devices": len(self.devices),
            "connected": self.connected_once,
            "gave_up": self.gave_up,
            "connected_at_stop": connected_at_stop,
            "connect_failures": self.connect_failures,
            "first_connect_ns": self.first_connect_ns,
            "last_connect_ns": self.last_connect_ns,
            "drops": self.drops,
            "drop_reasons": dict(self.drop_reasons),
            "reconnects": self.reconnects,
            "sent": self.sent,
            "resent": self.resent,
            "puback_errors": self.puback_errors,
            "suback_refused": self.suback_refused,
            "receipts": dict(self.receipts),
            "extra_receipts": self.extra_receipts,
            "bad_receipts": self.bad_receipts,
            "missing": self.missing,
            "latency_hist": {str(k): v for k, v in sorted(self.hist.items())},
            "first_publish_ns": self.first_publish_ns,
            "last_receipt_ns": self.last_receipt_ns,
            "cpu_s": round(cpu_s, 3),
        }


async def _ping(session: MqttSession) -> None:
    with contextlib.suppress(BusUnavailable):  # the reader notices the loss and counts it
        await session.ping()


async def _serve_devices(spec: ConnSpec) -> dict[str, Any]:
    raise_nofile(spec.devices + _FD_MARGIN, f"a devices process of {spec.devices} sessions")
    cpu_start = time.process_time()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as stop_signals:
        async with trio.open_nursery() as nursery:
            fleet = _Fleet(spec, nursery)
            announce_ready()
            nursery.start_soon(fleet.pinger)
            lives_done = trio.Event()

            async def lives() -> None:
                await fleet.run_lives()
                lives_done.set()

            nursery.start_soon(lives)

            async def report_connected() -> None:
                await fleet.all_connected.wait()
                _emit(
                    "connected",
                    connected=fleet.connected_once,
                    gave_up=fleet.gave_up,
                    first_connect_ns=fleet.first_connect_ns,
                    last_connect_ns=fleet.last_connect_ns,
                )

            nursery.start_soon(report_connected)
            nursery.start_soon(fleet.log_progress)
            async for _ in stop_signals:
                break
            fleet.begin_drain()
            await lives_done.wait()
            connected_at_stop = await fleet.disconnect_all()
            nursery.cancel_scope.cancel()
    return fleet.result(connected_at_stop, time.process_time() - cpu_start)


# -- edge --------------------------------------------------------------------------------


async def _serve_edge(spec: ConnSpec) -> None:
    raise_nofile(_FD_MARGIN, "the edge")
    config = bench_edge_config(Path(spec.state_dir), spec.site, spec.host, spec.port)
    keys, registry = await bench_edge_keys_and_registry(
        [device_identity(i) for i in range(spec.devices)], spec.num_params
    )
    tls: dict[str, Any] = {}
    if spec.tls_dir:
        folder = Path(spec.tls_dir)
        tls = {
            "ca_file": folder / "ca.pem",
            "cert_file": folder / f"{EDGE_USER}.pem",
            "key_file": folder / f"{EDGE_USER}.key",
        }
    mqtt_config = MqttConfig(
        host=spec.host,
        port=spec.port,
        client_id=f"{spec.site}-edge",
        receive_maximum=config.intake_capacity,
        shared_durables=False,
        **tls,
    )
    # Installed before "ready": a SIGTERM must never find the default handler.
    with trio.open_signal_receiver(signal.SIGTERM) as stop_signals:
        async with open_mqtt_bus(mqtt_config) as mqtt, trio.open_nursery() as nursery:
            daemon = EdgeDaemon(
                config,
                mqtt=mqtt,
                nats=MemoryBus(MemoryBroker("nats")),
                registry_store=registry,
                keys=keys,
            )
            await nursery.start(daemon.serve)
            commits_start = daemon.store.commits
            cpu_start = time.process_time()
            announce_ready()
            async for _ in stop_signals:
                break
            result = {
                "commits": daemon.store.commits - commits_start,
                "cpu_s": round(time.process_time() - cpu_start, 3),
                "outcomes": {
                    f"{outcome}:{reason}" if reason else outcome: count
                    for (outcome, reason), count in sorted(daemon.counts.items())
                },
                "receipts_sent": daemon.receipts_sent,
                "partials_published": daemon.upstream.published,
                "held_peak": mqtt.stats().held_peak,
            }
            # Before the shutdown, which waits for the intake in progress: a
            # backlog (an edge slower than the fleet) must not cost the figures.
            _emit("result", role=spec.role, **result)
            daemon.request_shutdown()


def main(argv: list[str] | None = None) -> int:
    """Run the role of ``argv[0]`` (a ``ConnSpec`` as JSON); print its result as a JSON line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fedtier.simulations.bench._conn_worker SPEC_JSON", file=sys.stderr)
        return 2
    spec = ConnSpec.from_json(args[0])
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    if spec.role == "devices":
        _emit("result", role=spec.role, **trio.run(_serve_devices, spec))
    else:
        trio.run(_serve_edge, spec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
