"""In-process helpers for tests and simulations of the tiers: signed devices, models, metrics.

Imports protocol, numpy and tiers.aggregate (no trio, no bus), in the manner of
``trio.testing``: small tools that build real signed messages, so tier tests
exercise the same bytes as production.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import payload_digest, seal
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.messages import (
    DeviceUpdate,
    ModelAnnouncement,
    ModelBlob,
    PartialAggregate,
    Tier,
)
from fedtier.tiers.aggregate import Accumulator, partial_id

__all__ = ["RecordingMetrics", "SimDevice", "sign_model_version", "sign_partial"]

CREATED_MS = 1_764_288_000_000


@dataclass
class SimDevice:
    """A device identity that signs updates for one fleet and layout.

    Attributes:
        identity: its signing key.
        fleet: the fleet token.
        layout: the model layout its updates are for.
    """

    identity: SigningIdentity
    fleet: str
    layout: ModelLayout
    _seq: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def key_id(self) -> str:
        """The device id."""
        return self.identity.key_id

    def update(
        self,
        delta: npt.NDArray[np.float32],
        *,
        base_version: int = 0,
        n_samples: int = 10,
        codec: CodecSpec | None = None,
        update_id: bytes | None = None,
        seq: int | None = None,
        fleet: str | None = None,
    ) -> tuple[DeviceUpdate, bytes]:
        """Sign an update of ``delta``; returns the message and the envelope bytes."""
        spec = codec or CodecSpec("f32")
        message = DeviceUpdate(
            fleet=fleet or self.fleet,
            sender=self.key_id,
            seq=next(self._seq) if seq is None else seq,
            created_ms=CREATED_MS,
            update_id=update_id if update_id is not None else os.urandom(16),
            base_version=base_version,
            layout=self.layout.fingerprint,
            num_params=self.layout.num_params,
            n_samples=n_samples,
            codec=spec,
        )
        return message, seal(message, encode(np.asarray(delta, np.float32), spec), self.identity)


def sign_model_version(
    central: SigningIdentity,
    fleet: str,
    version: int,
    layout: ModelLayout,
    params: npt.NDArray[np.float32],
    *,
    update_count: int = 0,
    seq: int = 1,
) -> tuple[bytes, bytes]:
    """Sign model ``version`` as the central would: returns (pointer bytes, blob bytes)."""
    spec = CodecSpec("f32")
    payload = encode(np.asarray(params, np.float32), spec)
    blob = ModelBlob(
        fleet=fleet,
        sender=central.key_id,
        seq=seq,
        created_ms=CREATED_MS,
        version=version,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        codec=spec,
        tensors=layout,
    )
    pointer = ModelAnnouncement(
        fleet=fleet,
        sender=central.key_id,
        seq=seq + 1,
        created_ms=CREATED_MS,
        version=version,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        blob_blake3=payload_digest(payload),
        blob_size=len(payload),
        update_count=update_count,
    )
    return seal(pointer, b"", central), seal(blob, payload, central)


def sign_partial(
    sender: SigningIdentity,
    fleet: str,
    layout: ModelLayout,
    accumulator: Accumulator,
    *,
    tier: Tier = Tier.EDGE,
    known_version: int = 0,
    seq: int = 1,
    codec: CodecSpec | None = None,
) -> tuple[PartialAggregate, bytes]:
    """Sign the partial a tier would send for ``accumulator``: (message, envelope bytes)."""
    spec = codec or CodecSpec("f32")
    assert accumulator.min_base_version is not None
    assert accumulator.max_base_version is not None
    message = PartialAggregate(
        fleet=fleet,
        sender=sender.key_id,
        seq=seq,
        created_ms=CREATED_MS,
        partial_id=partial_id(sender.key_id, accumulator.input_ids),
        tier=tier,
        known_version=known_version,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        codec=spec,
        sample_count=float(accumulator.sample_count),
        weight_sum=float(accumulator.weight_sum),
        update_count=accumulator.update_count,
        staleness_hist=tuple(accumulator.staleness_hist),
        min_base_version=accumulator.min_base_version,
        max_base_version=accumulator.max_base_version,
        inputs=tuple(accumulator.input_ids),
        leaves=tuple(accumulator.leaf_ids),
    )
    payload = encode(np.asarray(accumulator.numerator), spec)
    return message, seal(message, payload, sender)


class RecordingMetrics:
    """A ``TierMetrics`` stand-in that counts every call.

    Attributes:
        outcomes: (outcome, reason) -> count.
        calls: method name -> count.
        anomalies: detector -> count.
        flushed: (reason) -> inputs flushed.
        versions: model versions reported, in order.
    """

    def __init__(self) -> None:
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.calls: Counter[str] = Counter()
        self.anomalies: Counter[str] = Counter()
        self.flushed: Counter[str] = Counter()
        self.versions: list[int] = []

    def update_outcome(self, outcome: str, reason: str) -> None:
        """Count an outcome."""
        self.outcomes[(outcome, reason)] += 1

    def update_bytes(self, n: int) -> None:
        """Count a call."""
        self.calls["update_bytes"] += 1

    def staleness(self, tau: int) -> None:
        """Count a call."""
        self.calls["staleness"] += 1

    def anomalous(self, detector: str) -> None:
        """Count an anomaly."""
        self.anomalies[detector] += 1

    def participation(self, n: int) -> None:
        """Count a call."""
        self.calls["participation"] += 1

    def aggregation_duration(self, s: float) -> None:
        """Count a call."""
        self.calls["aggregation_duration"] += 1

    def aggregate_latency(self, s: float) -> None:
        """Count a call."""
        self.calls["aggregate_latency"] += 1

    def buffer_depth(self, n: int) -> None:
        """Count a call."""
        self.calls["buffer_depth"] += 1

    def model_version(self, v: int) -> None:
        """Record a version."""
        self.versions.append(v)

    def retry(self, op: str) -> None:
        """Count a retry."""
        self.calls[f"retry:{op}"] += 1

    def inputs_flushed(self, count: int, reason: str) -> None:
        """Count flushed inputs."""
        self.flushed[reason] += count
