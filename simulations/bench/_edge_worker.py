"""The measured processes of ``fedtier bench edge``; must not import simulations.testing or rich.

A publisher, a bare subscriber (the baseline) and an edge host, each run by
``simulations.bench.edge`` as ``python -m simulations.bench._edge_worker SPEC``
(``SPEC`` is a ``WorkerSpec`` as JSON). Each starts with the malloc environment
it is measured under, which glibc reads at process start: that is why the
measured work runs in child processes and not in the bench's own.

A child writes ``fedtier-bench-ready`` on stderr once it takes input, logs
(warnings and above) on stderr, and prints exactly one JSON line on stdout: its
result. Times are ``time.monotonic_ns()`` values (``CLOCK_MONOTONIC`` is one
clock for every process of the machine, so the bench subtracts them across
processes); CPU is ``time.process_time()`` (every thread of the process).

Every process derives the same device, edge and central identities and the same
model layout from fixed seeds, so no key material travels between them.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, Literal, Self

import numpy as np
import numpy.typing as npt
import trio

from fedtier.protocol.bus import MemoryBroker, MemoryBus, Subscription
from fedtier.protocol.bus.mqtt import MqttBus, MqttConfig, open_mqtt_bus
from fedtier.protocol.codecs import CodecSpec, encode, fold_into
from fedtier.protocol.envelope import open_envelope, parse_envelope, seal
from fedtier.protocol.errors import LocalProtocolError
from fedtier.protocol.identity import SigningIdentity, VerifyKey
from fedtier.protocol.layout import ModelLayout, layout_of
from fedtier.protocol.messages import DeviceUpdate, Receipt
from fedtier.protocol.names import MqttTopics
from fedtier.simulations.bench.codec import _median_ms
from fedtier.tiers.config import EdgeConfig, MqttSettings
from fedtier.tiers.edge import EdgeDaemon
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.model_registry import MemoryModelRegistry
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.tiers.staleness import StalenessPolicy
from fedtier.tiers.testing import sign_model_version
from fedtier.tiers.validation import NormPolicy

__all__ = [
    "EDGE_SETTINGS",
    "READY_LINE",
    "EdgeBenchSettings",
    "JsonSpec",
    "Role",
    "WorkerSpec",
    "announce_ready",
    "bench_edge_config",
    "bench_edge_keys_and_registry",
    "bench_identity",
    "main",
]

Role = Literal["publisher", "baseline", "edge"]

READY_LINE: Final = "fedtier-bench-ready"
FLEET: Final = "bench"
REGION: Final = "bench"
# Published to by the publisher's warm-up pass; nobody subscribes, so the broker
# only takes the message in and drops it: the publisher's own rate.
SINK_TOPIC: Final = "bench/sink"
# Publishes awaiting their PUBACK at once in the open-loop publisher: enough that
# the PUBACK round trip never idles it (alone it publishes several times faster
# than the bare subscriber consumes), few enough to bound what paho holds.
OPEN_LOOP_WINDOW: Final = 64
# Distinct deltas cycled through the updates: encoding is not what is measured,
# and the signed header (update id, seq) makes every envelope unique anyway.
_DISTINCT_DELTAS: Final = 4
_DELTA_SCALE: Final = 1e-3
_SEED_TAG: Final = b"fedtier-bench-edge\x00"
# Old sessions must not collect the next run's messages on the shared broker.
_SESSION_EXPIRY_S: Final = 5


@dataclass(frozen=True, slots=True)
class EdgeBenchSettings:
    """The measured edge's settings: those of ``deploy/edge.example.toml``."""

    intake_capacity: int = 64
    commit_window_ms: float = 2.0
    flush_max_inputs: int = 50
    flush_max_age_s: float = 30.0
    max_staleness: int = 16
    max_norm: float = 100.0
    norm_policy: NormPolicy = "clip"
    partial_codec: str = "f32"


EDGE_SETTINGS: Final = EdgeBenchSettings()


class JsonSpec:
    """A bench worker's spec handed to its child process as one JSON argument.

    For frozen dataclasses of JSON-able fields (``WorkerSpec``, the connections
    bench's ``ConnSpec``).
    """

    __slots__ = ()

    def to_json(self) -> str:
        """The spec as one JSON object (the child's argument)."""
        return json.dumps(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, text: str) -> Self:
        """Parse ``to_json`` output.

        Raises:
            LocalProtocolError: not a JSON object of the spec's fields.
        """
        try:
            return cls(**json.loads(text))
        except (ValueError, TypeError) as exc:
            raise LocalProtocolError(f"bad bench worker spec {text[:80]!r}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class WorkerSpec(JsonSpec):
    """What one child process does.

    Attributes:
        role: ``publisher``, ``baseline`` (bare subscriber) or ``edge``.
        host: the broker's address.
        port: the broker's port.
        run: a name token unique per run on this broker: the site, client ids
            and update ids derive from it.
        codec: the update format, a ``CodecSpec`` name.
        num_params: model size.
        updates: updates published (and expected) in this run.
        devices: signed device identities; updates go round-robin.
        state_dir: the edge's state store folder (edge only).
        closed_loop: publisher only: each device keeps one update unanswered
            and sends the next on its receipt (else a fixed PUBACK window).
        receipts: publisher only: collect the edge's receipts (publish ->
            receipt latency; the run ends at the last one); implied by
            ``closed_loop``.
        sink_first: publisher only: first publish everything to a topic nobody
            reads, to measure the publisher alone.
        repeats: baseline only: timed runs of the in-process ceiling.
        profile_dir: when set, the child runs under ``cProfile`` (trio thread
            only; worker threads show as waits) and writes ``<run>-<role>.pstats``
            and a text summary there.
    """

    role: Role
    host: str
    port: int
    run: str
    codec: str
    num_params: int
    updates: int
    devices: int
    state_dir: str = ""
    closed_loop: bool = False
    receipts: bool = False
    sink_first: bool = False
    repeats: int = 5
    profile_dir: str = ""

    @property
    def topics(self) -> MqttTopics:
        """The run's topics (its own site)."""
        return MqttTopics(FLEET, self.run)

    def mqtt_config(self, client_id: str, *, receive_maximum: int = 64) -> MqttConfig:
        """A connection of this run to the broker."""
        return MqttConfig(
            host=self.host,
            port=self.port,
            client_id=f"{self.run}-{client_id}",
            session_expiry_s=_SESSION_EXPIRY_S,
            receive_maximum=receive_maximum,
            shared_durables=False,
        )


# -- fixtures every process derives alike ---------------------------------------------


def _identity(label: str) -> SigningIdentity:
    return SigningIdentity.from_seed(
        hashlib.blake2b(_SEED_TAG + label.encode(), digest_size=32).digest()
    )


def bench_identity(label: str) -> SigningIdentity:
    """A bench identity (``central``, ``edge``, ``device-<i>``), the same in every process."""
    return _identity(label)


def device_identities(count: int) -> list[SigningIdentity]:
    """The bench's device identities, the same in every process."""
    return [_identity(f"device-{i}") for i in range(count)]


def model_layout(num_params: int) -> ModelLayout:
    """The bench model: one float32 tensor of ``num_params`` values."""
    return layout_of([("delta", (num_params,))])


@dataclass(frozen=True, slots=True)
class _Outgoing:
    topic: str
    envelope: bytes
    update_id: bytes
    device: int


def build_updates(spec: WorkerSpec) -> list[_Outgoing]:
    """Sign every update of the run: round-robin over devices, per-device seq from 1."""
    codec = CodecSpec.parse(spec.codec, num_params=spec.num_params)
    layout = model_layout(spec.num_params)
    rng = np.random.Generator(np.random.PCG64(0))
    payloads = [
        encode(
            rng.standard_normal(spec.num_params, dtype=np.float32) * np.float32(_DELTA_SCALE), codec
        )
        for _ in range(_DISTINCT_DELTAS)
    ]
    devices = device_identities(spec.devices)
    topics = spec.topics
    device_topics = [topics.update(d.key_id) for d in devices]
    created_ms = time.time_ns() // 1_000_000
    out = []
    for i in range(spec.updates):
        device = i % spec.devices
        identity = devices[device]
        update_id = hashlib.blake2b(f"{spec.run}/{i}".encode(), digest_size=16).digest()
        message = DeviceUpdate(
            fleet=FLEET,
            sender=identity.key_id,
            seq=i // spec.devices + 1,
            created_ms=created_ms,
            update_id=update_id,
            base_version=0,
            layout=layout.fingerprint,
            num_params=spec.num_params,
            n_samples=10,
            codec=codec,
        )
        envelope = seal(message, payloads[i % _DISTINCT_DELTAS], identity)
        out.append(_Outgoing(device_topics[device], envelope, update_id, device))
    return out


def _storage_write_bytes() -> int | None:
    """Bytes this process has sent to storage so far (Linux ``/proc/self/io``), else None."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "write_bytes":
            return int(value)
    return None


def _gc_collections() -> list[int]:
    """Collections of each generation of the cyclic garbage collector so far."""
    return [int(generation["collections"]) for generation in gc.get_stats()]


def announce_ready() -> None:
    """Tell the parent this worker is ready (``READY_LINE`` on stderr)."""
    print(READY_LINE, file=sys.stderr, flush=True)


def _percentile_ms(samples_ns: list[int], pct: int) -> float:
    if len(samples_ns) == 1:
        return round(samples_ns[0] / 1e6, 3)
    cuts = statistics.quantiles(samples_ns, n=100, method="inclusive")
    return round(cuts[pct - 1] / 1e6, 3)


# -- publisher --------------------------------------------------------------------------


async def _open_loop(bus: MqttBus, items: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Publish everything with ``OPEN_LOOP_WINDOW`` publishes awaiting their PUBACK."""
    # One iterator shared by the tasks: each takes the next item when its PUBACK is in.
    pending = iter(items)

    async def sender() -> None:
        for topic, envelope in pending:
            await bus.publish(topic, envelope)

    cpu_start = time.process_time()
    first_ns = time.monotonic_ns()
    async with trio.open_nursery() as nursery:
        for _ in range(min(OPEN_LOOP_WINDOW, len(items))):
            nursery.start_soon(sender)
    last_ns = time.monotonic_ns()
    return {
        "first_publish_ns": first_ns,
        "last_puback_ns": last_ns,
        "updates_per_s": round(len(items) * 1e9 / max(1, last_ns - first_ns), 1),
        "cpu_s": round(time.process_time() - cpu_start, 3),
    }


async def _read_receipts(
    sub: Subscription,
    expected: int,
    arrived: dict[bytes, trio.Event],
    arrived_ns: dict[bytes, int],
    statuses: Counter[str],
) -> None:
    # Until every update is answered: a redelivered receipt must not end it early.
    while len(arrived_ns) < expected:
        delivery = await sub.receive()
        now = time.monotonic_ns()
        # Parsed, not verified: checking the edge's signature is device work
        # (65 us each) that would only slow the publisher down.
        message = parse_envelope(delivery.payload).message
        await delivery.ack()
        if not isinstance(message, Receipt):
            statuses[f"unexpected {message.KIND.value}"] += 1
            continue
        event = arrived.get(message.update_id)
        if event is None or event.is_set():
            statuses[f"extra {message.status.value}"] += 1
            continue
        statuses[message.status.value] += 1
        arrived_ns[message.update_id] = now
        event.set()


async def _with_receipts(
    bus: MqttBus, spec: WorkerSpec, outgoing: list[_Outgoing]
) -> dict[str, Any]:
    """Publish and collect every receipt: closed loop per device, or the open-loop window.

    Closed loop: each device sends its next update once the receipt of the
    previous one arrived, as devices do. Open loop: ``OPEN_LOOP_WINDOW``
    publishes awaiting their PUBACK, as the baseline is fed (the edge sends its
    PUBACK only once the update is durable), receipts read as they come.
    """
    arrived = {o.update_id: trio.Event() for o in outgoing}
    arrived_ns: dict[bytes, int] = {}
    sent_ns: dict[bytes, int] = {}
    puback_ns: list[int] = []
    statuses: Counter[str] = Counter()
    per_device: list[list[_Outgoing]] = [[] for _ in range(spec.devices)]
    for o in outgoing:
        per_device[o.device].append(o)

    async def device(items: list[_Outgoing]) -> None:
        for o in items:
            sent_ns[o.update_id] = time.monotonic_ns()
            await bus.publish(o.topic, o.envelope)
            puback_ns.append(time.monotonic_ns())
            await arrived[o.update_id].wait()

    pending = iter(outgoing)

    async def sender() -> None:
        # One iterator shared by the window's tasks, as in _open_loop.
        for o in pending:
            sent_ns[o.update_id] = time.monotonic_ns()
            await bus.publish(o.topic, o.envelope)
            puback_ns.append(time.monotonic_ns())

    receipts_filter = f"{spec.topics.prefix}/receipt/+"
    capacity = max(64, 2 * spec.devices)
    async with bus.subscribe(receipts_filter, capacity=capacity) as sub:
        cpu_start = time.process_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_receipts, sub, len(outgoing), arrived, arrived_ns, statuses)
            if spec.closed_loop:
                for items in per_device:
                    if items:
                        nursery.start_soon(device, items)
            else:
                for _ in range(min(OPEN_LOOP_WINDOW, len(outgoing))):
                    nursery.start_soon(sender)
        cpu_s = time.process_time() - cpu_start
    first_ns = min(sent_ns.values())
    last_receipt_ns = max(arrived_ns.values())
    latencies = [arrived_ns[u] - sent_ns[u] for u in sent_ns if u in arrived_ns]
    return {
        "first_publish_ns": first_ns,
        "last_puback_ns": max(puback_ns),
        "last_receipt_ns": last_receipt_ns,
        "updates_per_s": round(len(outgoing) * 1e9 / max(1, max(puback_ns) - first_ns), 1),
        "receipts": dict(statuses),
        "latency_ms": {
            "p50": _percentile_ms(latencies, 50),
            "p99": _percentile_ms(latencies, 99),
            "max": round(max(latencies) / 1e6, 3),
        },
        "cpu_s": round(cpu_s, 3),
    }


async def _serve_publisher(spec: WorkerSpec) -> dict[str, Any]:
    outgoing = build_updates(spec)  # signed before any timing starts
    result: dict[str, Any] = {
        "wire_bytes": round(statistics.fmean(len(o.envelope) for o in outgoing))
    }
    # Receipts are bounded by the devices' one outstanding update each.
    config = spec.mqtt_config("publisher", receive_maximum=max(64, 2 * spec.devices))
    async with open_mqtt_bus(config) as bus:
        announce_ready()
        if spec.sink_first:
            result["alone"] = await _open_loop(bus, [(SINK_TOPIC, o.envelope) for o in outgoing])
        if spec.closed_loop or spec.receipts:
            result["run"] = await _with_receipts(bus, spec, outgoing)
        else:
            result["run"] = await _open_loop(bus, [(o.topic, o.envelope) for o in outgoing])
    return result


# -- bare subscriber ----------------------------------------------------------------------


def _open_and_fold(
    acc: npt.NDArray[np.float32], data: bytes, keys: Mapping[str, VerifyKey]
) -> None:
    """The bare pipeline's work per message: parse, verify, digest, fold."""
    envelope = open_envelope(data, keys)
    message = envelope.message
    assert isinstance(message, DeviceUpdate)
    fold_into(acc, envelope.payload, message.codec, float(message.n_samples))


async def _serve_baseline(spec: WorkerSpec) -> dict[str, Any]:
    keys = {d.key_id: d.verify_key for d in device_identities(spec.devices)}
    acc = np.zeros(spec.num_params, np.float32)
    # The CPU ceiling of the same work without MQTT, in this (malloc-tuned or not) process.
    sample = build_updates(dataclasses.replace(spec, updates=1, devices=1))[0].envelope
    ceiling_ms = _median_ms(partial(_open_and_fold, acc, sample, keys), spec.repeats)
    acc[:] = 0
    async with (
        open_mqtt_bus(spec.mqtt_config("baseline")) as bus,
        bus.subscribe(spec.topics.updates_filter(), capacity=64) as sub,
    ):
        announce_ready()
        first_ns: int | None = None
        cpu_start = time.process_time()
        for _ in range(spec.updates):
            delivery = await sub.receive()
            if first_ns is None:
                first_ns = time.monotonic_ns()
                cpu_start = time.process_time()
            _open_and_fold(acc, delivery.payload, keys)
            await delivery.ack()
        done_ns = time.monotonic_ns()
        cpu_s = time.process_time() - cpu_start
    return {
        "ceiling_ms": ceiling_ms,
        "folded": spec.updates,
        "first_receive_ns": first_ns,
        "done_ns": done_ns,
        "cpu_s": round(cpu_s, 3),
        "accumulator_finite": bool(np.isfinite(acc).all()),
    }


# -- edge host ----------------------------------------------------------------------------


def bench_edge_config(state_dir: Path, site: str, host: str, port: int) -> EdgeConfig:
    """The edge of the benches (``EDGE_SETTINGS``); the connections bench runs it too."""
    settings = EDGE_SETTINGS
    return EdgeConfig(
        fleet=FLEET,
        site=site,
        region=REGION,
        identity_key=state_dir / "unused.key",  # keys are handed over in memory
        state_dir=state_dir,
        central_key=_identity("central").verify_key.raw.hex(),
        flush=FlushPolicy(max_inputs=settings.flush_max_inputs, max_age_s=settings.flush_max_age_s),
        staleness=StalenessPolicy(max_staleness=settings.max_staleness),
        commit_window_s=settings.commit_window_ms / 1000.0,
        intake_capacity=settings.intake_capacity,
        mqtt=MqttSettings(host=host, port=port, client_id=f"{site}-edge"),
        max_norm=settings.max_norm,
        norm_policy=settings.norm_policy,
        partial_codec=CodecSpec.parse(settings.partial_codec),
    )


async def bench_edge_keys_and_registry(
    devices: Sequence[SigningIdentity], num_params: int
) -> tuple[TierKeys, MemoryModelRegistry]:
    """The bench edge's keys (``devices`` registered) and a registry holding version 0."""
    central = _identity("central")
    keys = TierKeys(
        _identity("edge"),
        KeyRegistry.from_keys(
            {f"dev-{i}": d.verify_key for i, d in enumerate(devices)}, role="device"
        ),
        central.verify_key,
    )
    registry = MemoryModelRegistry()
    pointer, blob = sign_model_version(
        central, FLEET, 0, model_layout(num_params), np.zeros(num_params, np.float32)
    )
    await registry.put_blob(0, blob)
    await registry.put_current(0, pointer)
    return keys, registry


async def _serve_edge(spec: WorkerSpec) -> dict[str, Any]:
    config = bench_edge_config(Path(spec.state_dir), spec.run, spec.host, spec.port)
    keys, registry = await bench_edge_keys_and_registry(
        device_identities(spec.devices), spec.num_params
    )
    # As tiers.daemon builds it: the bus bounds itself to the intake's capacity.
    mqtt_config = spec.mqtt_config("edge", receive_maximum=config.intake_capacity)
    # Installed before "ready": a SIGTERM must never find the default handler.
    with trio.open_signal_receiver(signal.SIGTERM) as stop_signals:
        async with open_mqtt_bus(mqtt_config) as mqtt, trio.open_nursery() as nursery:
            daemon = EdgeDaemon(
                config,
                mqtt=mqtt,
                nats=MemoryBus(MemoryBroker("nats")),
                registry_store=registry,
                keys=keys,
                # As ``fedtier edge`` runs it (tiers.daemon): one daemon per process.
                gc_tuning=True,
            )
            await nursery.start(daemon.serve)
            commits_start = daemon.store.commits
            partial_bytes_start = daemon.store.partial_bytes_stored
            cpu_start = time.process_time()
            # trio runs on this thread; the commits (and their writes) on worker threads.
            trio_cpu_start = time.thread_time()
            gc_start = _gc_collections()
            written_start = _storage_write_bytes()
            announce_ready()
            async for _ in stop_signals:
                break
            # Sampled before the shutdown flush, which is not intake work.
            written_end = _storage_write_bytes()
            result = {
                "storage_write_bytes": None
                if written_start is None or written_end is None
                else written_end - written_start,
                "commits": daemon.store.commits - commits_start,
                # Appended to the segment log by cuts (partials), not by intake.
                "partial_bytes": daemon.store.partial_bytes_stored - partial_bytes_start,
                "cpu_s": round(time.process_time() - cpu_start, 3),
                "trio_thread_cpu_s": round(time.thread_time() - trio_cpu_start, 3),
                "gc_collections": [
                    end - start for start, end in zip(gc_start, _gc_collections(), strict=True)
                ],
                "outcomes": {
                    f"{outcome}:{reason}" if reason else outcome: count
                    for (outcome, reason), count in sorted(daemon.counts.items())
                },
                "receipts_sent": daemon.receipts_sent,
                "partials_published": daemon.upstream.published,
                "held_peak": mqtt.stats().held_peak,
            }
            daemon.request_shutdown()
    return result


_ROLES: Final[Mapping[str, Callable[[WorkerSpec], Awaitable[dict[str, Any]]]]] = {
    "publisher": _serve_publisher,
    "baseline": _serve_baseline,
    "edge": _serve_edge,
}


def _profiled(spec: WorkerSpec) -> dict[str, Any]:
    """Run the role under ``cProfile``; write its stats and their top entries to the folder."""
    import cProfile
    import io
    import pstats

    folder = Path(spec.profile_dir)
    folder.mkdir(parents=True, exist_ok=True)
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        result = trio.run(_ROLES[spec.role], spec)
    finally:
        profiler.disable()
        stem = folder / f"{spec.run}-{spec.role}"
        profiler.dump_stats(stem.with_suffix(".pstats"))
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(40)
        stem.with_suffix(".txt").write_text(text.getvalue())
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the role of ``argv[0]`` (a ``WorkerSpec`` as JSON); print its result as one JSON line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m simulations.bench._edge_worker SPEC_JSON", file=sys.stderr)
        return 2
    spec = WorkerSpec.from_json(args[0])
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    result = _profiled(spec) if spec.profile_dir else trio.run(_ROLES[spec.role], spec)
    print(json.dumps({"role": spec.role, **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
