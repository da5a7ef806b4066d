"""Bounds that keep a tier's running sums finite, sans-IO: what one fold can add at most.

Imports numpy and ``fedtier.protocol`` only. The daemons check, before they
fold and acknowledge an input, that the open buffer's float32 numerator stays
below ``F32_SAFE``; an input that would overflow it is never acknowledged and
then dropped.
"""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np

from fedtier.protocol.codecs import CodecSpec, decode
from fedtier.protocol.messages import DeviceUpdate, PartialAggregate

__all__ = ["F32_SAFE", "fold_bound", "max_abs"]

# Just under float32's largest value: the open buffer's numerator is float32. The
# 1% spare covers the rounding of every fold (relative 6e-8 each, so 1e5 folds
# of one epoch stay far inside it); a value of 3e38 still fits alone.
F32_SAFE: Final = float(np.finfo(np.float32).max) * 0.99


def max_abs(payload: memoryview | bytes, codec: CodecSpec, num_params: int) -> float:
    """The largest absolute value a (finite, checked) encoded vector holds.

    Dense f32/f16 payloads are read in place (two passes, no copy); the others
    are decoded first.
    """
    if codec.k is None and codec.values in ("f32", "f16"):
        values: Any = np.frombuffer(payload, dtype="<f4" if codec.values == "f32" else "<f2")
    else:
        values = decode(payload, codec, num_params)
    if values.size == 0:
        return 0.0
    return max(abs(float(values.max())), abs(float(values.min())))


def fold_bound(
    message: DeviceUpdate | PartialAggregate,
    payload: memoryview | bytes,
    *,
    discount: float,
    clip_scale: float,
    n_samples: float | None = None,
    norm: float = math.nan,
) -> float:
    """An upper bound of what folding ``message`` adds to any value of the numerator.

    An update adds ``n * discount * clip_scale * delta`` (``n``: the weight it
    is folded with, ``n_samples`` when given, which may be capped below the
    message's), a partial ``discount * numerator``; the L2 norm, when admission
    computed it, bounds the largest value and saves a pass.
    """
    if isinstance(message, DeviceUpdate):
        n = float(message.n_samples) if n_samples is None else float(n_samples)
        weight = n * discount * clip_scale
    else:
        weight = discount
    largest = norm if math.isfinite(norm) else max_abs(payload, message.codec, message.num_params)
    return weight * largest
