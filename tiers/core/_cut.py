"""The cut of a partial and the sealing of a model version, sans-IO.

Imports ``fedtier.protocol`` and the tier math only: no trio, sqlite,
OpenTelemetry, logging or clock (``created_ms`` and sequence numbers are
arguments). The daemons, ``tiers.testing`` and the simulator build every
partial and every model version here, so a partial the simulator makes is the
partial a daemon would make from the same accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from fedtier.protocol.codecs import CodecSpec, encode
from fedtier.protocol.envelope import payload_digest, seal
from fedtier.protocol.errors import LocalProtocolError
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.messages import ModelAnnouncement, ModelBlob, PartialAggregate, Tier
from fedtier.tiers.aggregate import Accumulator, partial_id
from fedtier.tiers.core._buffer import HIST_BUCKETS, TierBuffer
from fedtier.tiers.core._robust import RobustRules, decide_outliers, robust_mean
from fedtier.tiers.optimizers import ServerOptimizer

__all__ = [
    "MODEL_CODEC",
    "RobustCut",
    "SealedVersion",
    "build_partial",
    "robust_cut",
    "seal_version",
    "step_model",
]

MODEL_CODEC: Final = CodecSpec("f32")
"""How model versions travel: dense float32, so every device loads them exactly."""


def build_partial(
    accumulator: Accumulator,
    *,
    identity: SigningIdentity,
    fleet: str,
    tier: Tier,
    known_version: int,
    layout: bytes,
    num_params: int,
    codec: CodecSpec,
    seq: int,
    created_ms: int,
    numerator: npt.NDArray[np.float32] | None = None,
) -> tuple[PartialAggregate, bytes]:
    """Seal the partial of a non-empty accumulator: (message, envelope bytes).

    The partial id derives from the sender and the input ids, so a retried cut
    of the same inputs is recognisably the same partial. ``numerator`` replaces
    the accumulator's (a robust rule's, :func:`robust_cut`); every other field
    is the accumulator's.

    Raises:
        LocalProtocolError: the accumulator is empty, or its numerator cannot be
            encoded with ``codec`` (a sum that overflowed).
    """
    if accumulator.is_empty:
        raise LocalProtocolError("cannot cut a partial from an empty accumulator")
    assert accumulator.min_base_version is not None
    assert accumulator.max_base_version is not None
    inputs = tuple(accumulator.input_ids)
    payload = encode(np.asarray(accumulator.numerator if numerator is None else numerator), codec)
    message = PartialAggregate(
        fleet=fleet,
        sender=identity.key_id,
        seq=seq,
        created_ms=created_ms,
        partial_id=partial_id(identity.key_id, inputs),
        tier=tier,
        known_version=known_version,
        layout=layout,
        num_params=num_params,
        codec=codec,
        sample_count=float(accumulator.sample_count),
        weight_sum=float(accumulator.weight_sum),
        update_count=accumulator.update_count,
        staleness_hist=tuple(accumulator.staleness_hist),
        min_base_version=accumulator.min_base_version,
        max_base_version=accumulator.max_base_version,
        inputs=inputs,
        leaves=tuple(accumulator.leaf_ids),
    )
    return message, seal(message, payload, identity)


@dataclass(frozen=True, slots=True)
class RobustCut:
    """What a robust cut makes of one buffer (docs/architecture.md, robust aggregation).

    Attributes:
        accumulator: the kept inputs, refolded in fold order with their stored
            weights (the buffer's own accumulator when nothing is left out):
            every field of the partial but the numerator comes from it.
        numerator: the robust rule's numerator (robust mean times the kept
            sample count), None under rule ``none`` (the accumulator's sum).
        outliers: indices (fold order) of the buffer's inputs to quarantine.
        distances: each input's distance to the centre (empty when not scored).
        scores: each input's robust z-score (empty when not scored).
    """

    accumulator: Accumulator
    numerator: npt.NDArray[np.float32] | None
    outliers: tuple[int, ...]
    distances: tuple[float, ...]
    scores: tuple[float, ...]


def robust_cut(buffer: TierBuffer, rules: RobustRules) -> RobustCut:
    """Score a buffer's inputs, leave out its outliers and apply the robust rule.

    A pure function of the buffer's inputs (fold order, stored weights, exempt
    flags) and ``rules``: a refold after a crash gives the same cut. Each input
    is decoded into its point (what it adds to the numerator over what it adds
    to the sample count), so the ``inputs x params`` float32 matrix exists only
    during the cut.

    Raises:
        LocalProtocolError: the buffer is empty or did not keep its inputs.
    """
    inputs = buffer.inputs
    accumulator = buffer.accumulator
    if accumulator.is_empty or len(inputs) != accumulator.input_count:
        raise LocalProtocolError(
            f"a robust cut needs the buffer's inputs: {len(inputs)} kept of "
            f"{accumulator.input_count} folded"
        )
    num_params = accumulator.num_params
    points = np.empty((len(inputs), num_params), dtype=np.float32)
    one = Accumulator(num_params, hist_buckets=1)
    for row, kept in enumerate(inputs):
        one.reset()
        kept.fold_into(one)
        np.divide(one.numerator, np.float32(one.sample_count), out=points[row])
    decision = decide_outliers(points, rules, exempt=[kept.exempt for kept in inputs])
    if decision.outliers:
        left_out = set(decision.outliers)
        keep = [i for i in range(len(inputs)) if i not in left_out]
        accumulator = Accumulator(num_params, hist_buckets=HIST_BUCKETS)
        for i in keep:
            inputs[i].fold_into(accumulator)
        points = points[keep]
    numerator: npt.NDArray[np.float32] | None = None
    if rules.rule != "none":
        numerator = np.multiply(
            robust_mean(points, rules), np.float32(accumulator.sample_count), dtype=np.float32
        )
    return RobustCut(accumulator, numerator, decision.outliers, decision.distances, decision.scores)


def step_model(
    params: npt.NDArray[np.float32], optimizer: ServerOptimizer, accumulator: Accumulator
) -> npt.NDArray[np.float32] | None:
    """``params + server_step(aggregate)``, or None (optimizer state untouched) if not finite."""
    saved = optimizer.state_arrays()
    new_params = optimizer.step(params, accumulator.result())
    if not bool(np.isfinite(new_params).all()):
        optimizer.load_state_arrays(saved)
        return None
    return new_params


@dataclass(frozen=True, slots=True)
class SealedVersion:
    """A signed model version.

    Attributes:
        version: the model version.
        blob: the signed blob envelope (the parameters).
        pointer: the signed pointer envelope (names the blob by size and digest).
        pointer_message: the pointer as a message.
    """

    version: int
    blob: bytes
    pointer: bytes
    pointer_message: ModelAnnouncement


def seal_version(
    version: int,
    params: npt.NDArray[np.float32],
    layout: ModelLayout,
    *,
    identity: SigningIdentity,
    fleet: str,
    created_ms: int,
    blob_seq: int,
    pointer_seq: int,
    update_count: int,
) -> SealedVersion:
    """Sign model ``version`` as the central does: a blob and the pointer that names it."""
    payload = encode(np.asarray(params, np.float32), MODEL_CODEC)
    blob = ModelBlob(
        fleet=fleet,
        sender=identity.key_id,
        seq=blob_seq,
        created_ms=created_ms,
        version=version,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        codec=MODEL_CODEC,
        tensors=layout,
    )
    pointer = ModelAnnouncement(
        fleet=fleet,
        sender=identity.key_id,
        seq=pointer_seq,
        created_ms=created_ms,
        version=version,
        layout=layout.fingerprint,
        num_params=layout.num_params,
        blob_blake3=payload_digest(payload),
        blob_size=len(payload),
        update_count=update_count,
    )
    return SealedVersion(
        version, seal(blob, payload, identity), seal(pointer, b"", identity), pointer
    )
