"""In-process helpers for tests and simulations of the tiers: signed devices, models, metrics.

Imports protocol, numpy and the tier core (no trio, no bus), in the manner of
``trio.testing``: small tools that build real signed messages with the core's
own builders, so tier tests exercise the same bytes as production.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import seal
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.messages import (
    DeviceUpdate,
    PartialAggregate,
    Tier,
)
from fedtier.tiers.core import Accumulator, build_partial, seal_version

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
    """Sign model ``version`` as the central does (``seal_version``): (pointer, blob) bytes."""
    sealed = seal_version(
        version,
        params,
        layout,
        identity=central,
        fleet=fleet,
        created_ms=CREATED_MS,
        blob_seq=seq,
        pointer_seq=seq + 1,
        update_count=update_count,
    )
    return sealed.pointer, sealed.blob


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
    """Sign the partial a tier would cut from ``accumulator`` (``build_partial``)."""
    return build_partial(
        accumulator,
        identity=sender,
        fleet=fleet,
        tier=tier,
        known_version=known_version,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        codec=codec or CodecSpec("f32"),
        seq=seq,
        created_ms=CREATED_MS,
    )


class RecordingMetrics:
    """A ``TierMetrics`` stand-in that counts every call.

    Attributes:
        outcomes: (outcome, reason) -> count.
        calls: method name -> count.
        anomalies: detector -> count.
        flushed: (reason) -> inputs flushed.
        versions: model versions reported, in order.
        evaluations: version -> the held-out metrics reported for it.
    """

    def __init__(self) -> None:
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.calls: Counter[str] = Counter()
        self.anomalies: Counter[str] = Counter()
        self.flushed: Counter[str] = Counter()
        self.versions: list[int] = []
        self.evaluations: dict[int, dict[str, float]] = {}

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

    def model_metrics(self, version: int, metrics: Mapping[str, float]) -> None:
        """Keep the metrics of ``version``."""
        self.evaluations[version] = dict(metrics)

    def evaluation_failed(self) -> None:
        """Count a failed evaluation."""
        self.calls["evaluation_failed"] += 1
