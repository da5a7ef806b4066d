"""``fedtier bench edge --model-rounds N``: last update of a buffer -> new model at the device.

Imports the mesh machinery (real Mosquitto, real nats-server with JetStream,
the real central, regional and edge daemons as processes, as ``fedtier demo``
runs them) and the MQTT bus; never a NATS client or a tier module: this
process is a device, it only talks to Mosquitto.

One site, one region. The edge cuts at ``devices`` inputs, the regional and the
central at one input each, so every round's last update closes a buffer at
every tier. Each round, every device publishes one update on the current
version; the clock starts when the last of them is published (before its
PUBACK) and stops when the signed pointer of the next version arrives on the
site's retained model topic. The figure is the whole path on loopback: edge
commit, cut and partial publish (JetStream, ``sync_interval: always``),
regional fold and cut, central fold, model step, registry write and
announcement, the edge's fetch, verification and retained relay.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
import trio

from fedtier.protocol.bus import Subscription
from fedtier.protocol.bus.mqtt import open_mqtt_bus
from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import parse_envelope, seal
from fedtier.protocol.errors import BenchError, LocalProtocolError
from fedtier.protocol.files import load_signing_identity
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.messages import DeviceUpdate, ModelAnnouncement
from fedtier.protocol.names import MqttTopics
from fedtier.simulations.mesh import (
    LAB_OBSERVER,
    FlushSpec,
    MeshSpec,
    open_brokers,
    open_mesh,
    prepare_mesh,
)

__all__ = ["MAX_ROUNDS", "measure_model_latency"]

MAX_ROUNDS: Final = 100
_FLEET: Final = "bench"
_REGION: Final = "r1"
_SITE: Final = "s1"
# Long enough that no flush is ever due by age: each cut is the count's.
_FLUSH_AGE_S: Final = 3600.0
_DEVICES: Final = 4
_DELTA_SCALE: Final = 1e-3


def _update(
    identity: SigningIdentity, layout: ModelLayout, seq: int, version: int, rng: np.random.Generator
) -> bytes:
    """One small, honest, signed dense update on ``version``."""
    delta = rng.standard_normal(layout.num_params, dtype=np.float32) * np.float32(_DELTA_SCALE)
    message = DeviceUpdate(
        fleet=_FLEET,
        sender=identity.key_id,
        seq=seq,
        created_ms=time.time_ns() // 1_000_000,
        update_id=rng.bytes(16),
        base_version=version,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        n_samples=10,
        codec=CodecSpec("f32"),
    )
    return seal(message, encode(delta, CodecSpec("f32")), identity)


async def _run(rounds: int, round_timeout_s: float, workdir: Path) -> dict[str, Any]:
    spec = MeshSpec(
        fleet=_FLEET,
        regions=((_REGION, (_SITE,)),),
        devices=_DEVICES,
        misbehaving=0,
        edge_flush=FlushSpec(_DEVICES, _FLUSH_AGE_S),
        regional_flush=FlushSpec(1, _FLUSH_AGE_S),
        central_flush=FlushSpec(1, _FLUSH_AGE_S),
    )
    async with open_brokers(workdir / "brokers") as brokers:
        plan = await trio.to_thread.run_sync(
            lambda: prepare_mesh(spec, workdir / "mesh", workdir / "out", brokers)
        )
        with np.load(plan.initial_model) as arrays:
            layout = ModelLayout.from_arrays({name: arrays[name] for name in arrays.files})
        devices = [
            load_signing_identity(plan.workdir / "keys" / "devices" / f"{entry.name}.key")
            for entry in plan.devices
        ]
        topics = MqttTopics(_FLEET, _SITE)
        rng = np.random.default_rng(0)
        samples_ms: list[float] = []
        async with (
            open_mesh(plan) as mesh,
            open_mqtt_bus(plan.mqtt_config("bench-model-latency", LAB_OBSERVER)) as bus,
            bus.subscribe(topics.model_pointer(), latest_only=True) as pointers,
        ):
            version = await _next_version(pointers, -1, round_timeout_s)
            for round_no in range(1, rounds + 1):
                last_sent_ns = 0
                for identity in devices:
                    envelope = _update(identity, layout, round_no, version, rng)
                    last_sent_ns = time.monotonic_ns()
                    await bus.publish(topics.update(identity.key_id), envelope)
                failed = mesh.failed()
                if failed is not None:
                    raise BenchError(f"{failed.describe_exit()} during model round {round_no}")
                version = await _next_version(pointers, version, round_timeout_s)
                samples_ms.append(round((time.monotonic_ns() - last_sent_ns) / 1e6, 3))
    return {
        "rounds": rounds,
        "devices": _DEVICES,
        "flush": {"edge_inputs": _DEVICES, "regional_inputs": 1, "central_inputs": 1},
        "commit_window_ms": spec.commit_window_ms,
        "model_params": layout.num_params,
        "path": (
            "device -> Mosquitto -> edge -> nats-server (JetStream) -> regional -> central"
            " -> registry and announcement -> edge -> Mosquitto (retained) -> device"
        ),
        "latency_ms": {
            "p50": round(statistics.median(samples_ms), 3),
            "max": max(samples_ms),
            "samples": samples_ms,
        },
    }


async def _next_version(pointers: Subscription, after: int, timeout_s: float) -> int:
    """Wait for a model pointer newer than ``after``; return its version."""
    with trio.move_on_after(timeout_s):
        while True:
            delivery = await pointers.receive()
            message = parse_envelope(delivery.payload).message
            await delivery.ack()
            if isinstance(message, ModelAnnouncement) and message.version > after:
                return message.version
    raise BenchError(f"no model version after v{after} reached the device within {timeout_s:g} s")


def measure_model_latency(rounds: int, *, round_timeout_s: float = 120.0) -> dict[str, Any]:
    """Run the mesh for ``rounds`` rounds; return the latencies (module docstring).

    Raises:
        LocalProtocolError: ``rounds`` out of bounds.
        ConfigError: a broker is missing or does not start.
        BenchError: a daemon failed, or a round's model did not arrive in time.
    """
    if not 1 <= rounds <= MAX_ROUNDS:
        raise LocalProtocolError(f"model rounds is {rounds}; expected 1..{MAX_ROUNDS}")
    with tempfile.TemporaryDirectory(prefix="fedtier-bench-model-") as tmp:
        return trio.run(_run, rounds, round_timeout_s, Path(tmp))
