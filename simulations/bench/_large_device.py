"""The devices of ``fedtier bench large-model``, one child process; imports protocol, client, tiers.

Run as ``python -m fedtier.simulations.bench._large_device SPEC_JSON``. One
device is the real client (``client.device.serve_device`` with a synthetic
trainer): it loads version 0 from the edge's retained topics, sends one
update and then waits until it has joined, verified and loaded version 1,
which is the end-to-end proof the bench asks for. The other ``updates - 1``
devices only sign and publish one update each (``tiers.testing.SimDevice``)
and wait for its receipt: a real client would also download every model, which
costs the machine a model's bytes per device without telling anything more
about the daemons. Senders go one after the other, so that the process holds
one update's delta at a time.

Prints one JSON line at the end: the wall times (Unix seconds) of the first
publish, the last receipt and the load of version 1, the update bytes sent and
this process's peak RSS.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import trio

from fedtier.client.device import DeviceConfig, DeviceReport, serve_device
from fedtier.client.model_store import ModelOffer, ModelStore
from fedtier.client.outbox import Outbox
from fedtier.client.trainers import F32Array, TrainResult
from fedtier.protocol.bus.mqtt import MqttConfig, open_mqtt_bus
from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.envelope import open_envelope
from fedtier.protocol.errors import BenchError, RemoteProtocolError
from fedtier.protocol.files import load_public_key, load_signing_identity
from fedtier.protocol.identity import SigningIdentity, VerifyKey
from fedtier.protocol.layout import ModelLayout, layout_of
from fedtier.protocol.limits import limits_for_model
from fedtier.protocol.messages import Receipt, ReceiptStatus
from fedtier.protocol.names import MqttTopics
from fedtier.tiers.testing import SimDevice

__all__ = ["DeviceSpec", "main"]

_log = logging.getLogger("fedtier.bench.large")
# Small enough that no clip or norm check of the edge touches it.
_DELTA_SCALE: Final = 1e-4
_CHUNK: Final = 1 << 24
_CONNECT_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """What the parent tells the device process (one JSON argument)."""

    fleet: str
    site: str
    host: str
    port: int
    tensors: list[tuple[str, list[int]]]
    codec: str
    device_keys: list[str]
    edge_key: str
    central_key: str
    state_dir: str
    deadline_s: float
    seed: int = 0

    def to_json(self) -> str:
        """The argument of the child."""
        return json.dumps({name: getattr(self, name) for name in self.__slots__})

    @classmethod
    def from_json(cls, text: str) -> DeviceSpec:
        """Parse the child's argument."""
        raw: dict[str, Any] = json.loads(text)
        raw["tensors"] = [(str(n), [int(d) for d in s]) for n, s in raw["tensors"]]
        return cls(**raw)


def synthetic_delta(num_params: int, seed: int) -> F32Array:
    """A small random delta, drawn in chunks so that no float64 copy of the model exists."""
    rng = np.random.default_rng(seed)
    out = np.empty(num_params, np.float32)
    for start in range(0, num_params, _CHUNK):
        stop = min(num_params, start + _CHUNK)
        rng.standard_normal(stop - start, dtype=np.float32, out=out[start:stop])
    out *= np.float32(_DELTA_SCALE)
    return out


class SyntheticTrainer:
    """A ``client.trainers.Trainer`` whose "training" adds a random delta: no data, no torch."""

    def __init__(self, layout: ModelLayout, seed: int) -> None:
        self._layout = layout
        self._seed = seed
        self._calls = 0

    @property
    def layout(self) -> ModelLayout:
        """The model layout."""
        return self._layout

    def train(self, params: F32Array) -> TrainResult:
        """``params`` plus a random delta (in place: the device hands over its own copy)."""
        self._calls += 1
        params += synthetic_delta(params.size, self._seed + self._calls)
        return TrainResult(params=params, n_samples=10, metrics={"loss": 0.0})

    def evaluate(self, params: F32Array, X: Any, y: Any) -> dict[str, float]:
        """Not used by the bench."""
        return {"loss": 0.0}


class _WatchedStore(ModelStore):
    """A ``ModelStore`` that wakes the bench whenever a version loads (no polling)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loaded = trio.lowlevel.ParkingLot()

    def offer_blob(self, data: bytes | bytearray | memoryview) -> ModelOffer:
        """See ``ModelStore.offer_blob``; then wake whoever waits for a version."""
        offer = super().offer_blob(data)
        self.loaded.unpark_all()
        return offer

    def offer_pointer(self, data: bytes | bytearray | memoryview) -> ModelOffer:
        """See ``ModelStore.offer_pointer`` (a pointer may complete a held blob)."""
        offer = super().offer_pointer(data)
        self.loaded.unpark_all()
        return offer

    async def wait_newer(self, than: int | None) -> int:
        """Wait until the store holds a version newer than ``than`` (any, when None)."""
        while self.version is None or (than is not None and self.version <= than):
            await self.loaded.park()
        return self.version


class _WatchedOutbox(Outbox):
    """The real device's outbox, noting its update's envelope size and its receipt's time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sizes: list[int] = []
        self.resolved_at: list[float] = []
        self.receipt = trio.Event()

    def put(
        self, update_id: bytes, seq: int, envelope: bytes, *, now_s: float | None = None
    ) -> None:
        """See ``Outbox.put``."""
        super().put(update_id, seq, envelope, now_s=now_s)
        self.sizes.append(len(envelope))

    def resolve(
        self, update_id: bytes, status: str, reason: str = "", *, now_s: float | None = None
    ) -> bool:
        """See ``Outbox.resolve``."""
        self.resolved_at.append(time.time())
        self.receipt.set()
        return super().resolve(update_id, status, reason, now_s=now_s)


def _mqtt(spec: DeviceSpec, client_id: str) -> MqttConfig:
    return MqttConfig(
        host=spec.host,
        port=spec.port,
        client_id=client_id,
        keepalive_s=120,
        # Mosquitto may be busy for seconds storing a large retained blob's parts
        # (two cores, every process of the mesh on them): wait for the CONNACK.
        connect_timeout_s=_CONNECT_TIMEOUT_S,
        shared_durables=False,
        single_connection=True,
    )


async def _send_one(
    spec: DeviceSpec,
    identity: SigningIdentity,
    layout: ModelLayout,
    edge_key: VerifyKey,
    codec: CodecSpec,
    base_version: int,
    seed: int,
) -> int:
    """Sign, publish and await the receipt of one update; returns its envelope bytes."""
    device = SimDevice(identity, spec.fleet, layout)
    _, envelope = device.update(
        synthetic_delta(layout.num_params, seed), base_version=base_version, codec=codec
    )
    topics = MqttTopics(spec.fleet, spec.site)
    async with (
        open_mqtt_bus(_mqtt(spec, identity.key_id)) as bus,
        bus.subscribe(topics.receipt(identity.key_id)) as receipts,
    ):
        await bus.publish(topics.update(identity.key_id), envelope)
        while True:
            delivery = await receipts.receive()
            await delivery.ack()
            try:
                message = open_envelope(delivery.payload, {edge_key.key_id: edge_key}).message
            except RemoteProtocolError:
                continue
            if isinstance(message, Receipt) and message.device == identity.key_id:
                if message.status is not ReceiptStatus.ACCEPTED:
                    raise BenchError(
                        f"update of {identity.key_id} {message.status}: {message.reason}"
                    )
                return len(envelope)


async def run_devices(spec: DeviceSpec) -> dict[str, Any]:
    """The whole device side; returns the result line."""
    layout = layout_of([(name, tuple(shape)) for name, shape in spec.tensors])
    identities = [load_signing_identity(Path(p)) for p in spec.device_keys]
    edge_key = load_public_key(Path(spec.edge_key))
    central_key = load_public_key(Path(spec.central_key))
    codec = CodecSpec.parse(spec.codec, num_params=layout.num_params)
    store = _WatchedStore(
        central_key, layout, spec.fleet, limits=limits_for_model(layout.num_params)
    )
    config = DeviceConfig(
        fleet=spec.fleet,
        site=spec.site,
        trusted_edges=(edge_key,),
        codec=codec,
        error_feedback=False,
        receipt_timeout_s=spec.deadline_s,
        model_wait_s=None,
    )
    report = DeviceReport()
    times: dict[str, float] = {}
    sizes: list[int] = []
    state = Path(spec.state_dir)
    outbox = _WatchedOutbox(state / "outbox.sqlite")
    with trio.fail_after(spec.deadline_s), outbox:
        async with (
            open_mqtt_bus(_mqtt(spec, identities[0].key_id)) as bus,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(
                lambda: serve_device(
                    config,
                    identities[0],
                    bus,
                    SyntheticTrainer(layout, spec.seed),
                    store,
                    outbox,
                    limiter=trio.CapacityLimiter(1),
                    report=report,
                )
            )
            base = await store.wait_newer(None)
            times["model_v0_loaded"] = time.time()
            times["first_publish"] = time.time()
            for n, identity in enumerate(identities[1:], start=1):
                sent = await _send_one(
                    spec, identity, layout, edge_key, codec, base, spec.seed + 1000 * n
                )
                sizes.append(sent)
                times["last_receipt"] = time.time()
            # Version base + 1 exists only once the edge accepted every update
            # (its buffer is cut at exactly that many inputs).
            await store.wait_newer(base)
            times["model_new_loaded"] = time.time()
            await outbox.receipt.wait()  # its receipt and the new model race
            nursery.cancel_scope.cancel()
        pending = outbox.pending()
    # The real device's first update (it may have trained again on the new version).
    own = outbox.sizes[:1]
    if outbox.resolved_at:
        times["last_receipt"] = max(times.get("last_receipt", 0.0), outbox.resolved_at[0])
    return {
        "times": times,
        "updates": len(identities),
        "real_device_delivered": report.delivered,
        "rejected": report.rejected,
        "pending_after": len(pending),
        "model_version_before": base,
        "model_version_after": store.version,
        "update_envelope_bytes": max(sizes + own),
        "update_bytes_on_wire": sum(sizes + own),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    spec = DeviceSpec.from_json(args[0])
    result = trio.run(run_devices, spec)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
