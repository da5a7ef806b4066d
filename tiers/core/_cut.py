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
from fedtier.tiers.optimizers import ServerOptimizer

__all__ = ["MODEL_CODEC", "SealedVersion", "build_partial", "seal_version", "step_model"]

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
) -> tuple[PartialAggregate, bytes]:
    """Seal the partial of a non-empty accumulator: (message, envelope bytes).

    The partial id derives from the sender and the input ids, so a retried cut
    of the same inputs is recognisably the same partial.

    Raises:
        LocalProtocolError: the accumulator is empty, or its numerator cannot be
            encoded with ``codec`` (a sum that overflowed).
    """
    if accumulator.is_empty:
        raise LocalProtocolError("cannot cut a partial from an empty accumulator")
    assert accumulator.min_base_version is not None
    assert accumulator.max_base_version is not None
    inputs = tuple(accumulator.input_ids)
    payload = encode(np.asarray(accumulator.numerator), codec)
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
