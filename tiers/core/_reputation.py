"""Per-device reputation at the edge, sans-IO: does a device's history point where the model went?

Imports numpy and the standard library only: no trio, sqlite, OpenTelemetry,
logging or clock.

Why a history and not one update: on non-IID data one device's delta is close
to orthogonal to the fleet's, and so is its negative, so a sign-flipped update
cannot be told from an honest one by its cosine to any per-update reference
(docs/results.md, section 7). Summed over a device's updates, though, the noise
cancels and the device's own pull adds up: the sum of an honest device's
updates points along the model's movement over the same period (the fleet's
updates moved it there), the sum of a sign flipper's points against it. The
score of a device is ``cos(S, M_now - M_first)``: ``S`` the sum of its accepted
updates (as folded: after the norm clip), ``M_first`` the model the tier knew
when it accepted the device's first update, ``M_now`` the model it knows now.
Measured on the poisoning study's fleet (seed 0, 20 % sign flippers): after 4
updates every flipper scored below 0 and every honest device above 0.08.

A device whose score is below ``threshold`` after ``min_updates`` updates is
down-weighted: its next updates are folded with at most ``low_weight``
examples (admission's weight cap, so the stored weight is what a refold
folds). Its updates are still accepted, receipted and folded (never an
ack-and-drop), and it keeps being scored, so a device whose history turns
around regains its weight.

Memory is bounded: per device, two vectors of ``sketch_dim`` float64 and a
count, whatever the model's size. A model with more parameters than
``sketch_dim`` is compressed by a signed hashing sketch (:func:`sketch`), which
preserves inner products in expectation. Devices are bounded by the key
registry (only authenticated senders are scored). Nothing is persisted: after
a restart every device starts with no history and cannot be down-weighted
before ``min_updates`` more updates, which costs at most that many full-weight
updates per flipper and restart; scoring resumes from the next model the
tier learns.

Limits (measured or by construction, docs/results.md section 7): the score
needs the model's movement to follow an honest majority; while scaling
attackers lean that movement towards their data, some honest devices whose
data pulls the other way score below 0 for a while (down-weighted, at no
measured accuracy cost). The whole history counts, so an attacker honest for n
updates needs about as many flipped ones before it is down-weighted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_SKETCH_DIM",
    "Reputation",
    "ReputationRules",
    "sketch",
]

DEFAULT_SKETCH_DIM: Final = 1024
"""Sketch size: a model with at most this many parameters is scored exactly."""
_SIGN_PERIOD: Final = 1_000_003
"""Period of the sketch's sign pattern: a prime, so (i mod dim, i mod period) differ for
indices below dim x period (about a billion parameters at the default dim)."""
_CHUNK: Final = 1 << 20
_SIGNS: dict[int, npt.NDArray[np.float32]] = {}


@dataclass(frozen=True, slots=True)
class ReputationRules:
    """An edge's ``[reputation]`` table.

    Attributes:
        enabled: score devices and down-weight those below ``threshold``.
        min_updates: updates of a device scored before it can be down-weighted, >= 1.
        threshold: the score (a cosine, in [-1, 1)) below which a device is
            down-weighted. 0: its updates point, summed, against where the model went.
        low_weight: the weight cap (examples) of a down-weighted device's updates, >= 1.
        sketch_dim: the scored vectors' size (memory per device), in [16, 65536].
        exempt: key ids never down-weighted (an operator's release); still scored.
    """

    enabled: bool = True
    min_updates: int = 4
    threshold: float = 0.0
    low_weight: int = 1
    sketch_dim: int = DEFAULT_SKETCH_DIM
    exempt: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.min_updates < 1:
            raise ValueError(f"reputation min_updates {self.min_updates} is not >= 1")
        if not (math.isfinite(self.threshold) and -1.0 <= self.threshold < 1.0):
            raise ValueError(f"reputation threshold {self.threshold} is not in [-1, 1)")
        if self.low_weight < 1:
            raise ValueError(f"reputation low_weight {self.low_weight} is not >= 1")
        if not 16 <= self.sketch_dim <= 1 << 16:
            raise ValueError(f"reputation sketch_dim {self.sketch_dim} is not in [16, 65536]")
        object.__setattr__(self, "exempt", frozenset(self.exempt))


def _signs() -> npt.NDArray[np.float32]:
    """The sign pattern, one period plus a chunk, so any chunk's signs are one slice."""
    signs = _SIGNS.get(_SIGN_PERIOD)
    if signs is None:
        # A fixed seed: every edge (and a restarted one) sketches alike.
        rng = np.random.default_rng(0x5EED)
        period = rng.integers(0, 2, _SIGN_PERIOD).astype(np.float32) * 2.0 - 1.0
        # np.resize repeats the period: a chunk (2^20) is longer than the period.
        signs = np.resize(period, _SIGN_PERIOD + _CHUNK)
        _SIGNS[_SIGN_PERIOD] = signs
    return signs


def sketch(vector: npt.ArrayLike, dim: int) -> npt.NDArray[np.float64]:
    """``vector`` in ``dim`` values, in float64: itself (zero-padded) when it fits, else hashed.

    Index ``i`` adds ``sign(i) * x_i`` to bucket ``i mod dim``, ``sign`` a fixed
    pseudo-random pattern of prime period: two indices in one bucket have
    independent signs, so inner products (and so cosines) are preserved in
    expectation, with an error that shrinks as ``dim`` grows. One pass in
    chunks of whole rows of ``dim``: no second model-sized array.

    Raises:
        ValueError: ``dim`` is not in [1, 2**20].
    """
    if not 1 <= dim <= _CHUNK:
        raise ValueError(f"sketch dim {dim} is not in [1, {_CHUNK}]")
    x = np.asarray(vector).reshape(-1)
    out = np.zeros(dim, dtype=np.float64)
    n = x.size
    if n <= dim:
        out[:n] = x
        return out
    signs = _signs()
    step = dim * (_CHUNK // dim)
    for start in range(0, n, step):
        chunk = x[start : start + step].astype(np.float32, copy=False)
        rows = -(-chunk.size // dim)
        if chunk.size != rows * dim:
            chunk = np.concatenate([chunk, np.zeros(rows * dim - chunk.size, np.float32)])
        offset = start % _SIGN_PERIOD
        signed = chunk * signs[offset : offset + chunk.size]
        out += signed.reshape(rows, dim).sum(axis=0, dtype=np.float64)
    return out


def _cosine(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    na = math.sqrt(float(a @ a))
    nb = math.sqrt(float(b @ b))
    if na == 0.0 or nb == 0.0 or not (math.isfinite(na) and math.isfinite(nb)):
        return 0.0
    return float(a @ b) / (na * nb)


class _Device:
    __slots__ = ("count", "first", "total")

    def __init__(self, first: npt.NDArray[np.float64], dim: int) -> None:
        self.first = first
        self.total = np.zeros(dim, dtype=np.float64)
        self.count = 0


class Reputation:
    """Each device's score and whether it is down-weighted, owned by the edge (or a test).

    Call :meth:`model` with every model version the tier learns (the first
    before any :meth:`observe`), :meth:`weight_cap` before admitting a device's
    update and :meth:`observe` after accepting one.

    Args:
        rules: the ``[reputation]`` rules.
    """

    def __init__(self, rules: ReputationRules) -> None:
        self.rules = rules
        self._model: npt.NDArray[np.float64] | None = None
        self._version: int | None = None
        self._devices: dict[str, _Device] = {}

    @property
    def devices(self) -> int:
        """How many devices have a history (the memory is this times two sketches)."""
        return len(self._devices)

    @property
    def senders(self) -> tuple[str, ...]:
        """The devices with a history, in the order first seen."""
        return tuple(self._devices)

    @property
    def memory_bytes(self) -> int:
        """The bytes the histories hold: two sketches per device."""
        return sum(d.total.nbytes + d.first.nbytes for d in self._devices.values())

    def model(self, version: int, params: npt.ArrayLike) -> None:
        """The tier knows model ``version`` now (an older one than known is ignored)."""
        if self._version is not None and version <= self._version:
            return
        self._version = version
        self._model = sketch(params, self.rules.sketch_dim)

    def score(self, sender: str) -> float | None:
        """``sender``'s score: the cosine of its updates' sum to the model's move since its first.

        None before its first update or while no model is known.
        """
        device = self._devices.get(sender)
        if device is None or self._model is None or device.count == 0:
            return None
        return _cosine(device.total, self._model - device.first)

    def low(self, sender: str) -> bool:
        """Whether ``sender``'s next update is down-weighted."""
        rules = self.rules
        if not rules.enabled or sender in rules.exempt:
            return False
        device = self._devices.get(sender)
        if device is None or device.count < rules.min_updates:
            return False
        score = self.score(sender)
        return score is not None and score < rules.threshold

    def weight_cap(self, sender: str, cap: int | None) -> int | None:
        """The weight cap of ``sender``'s next update: ``cap``, or ``low_weight`` when it is low."""
        if not self.low(sender):
            return cap
        low = self.rules.low_weight
        return low if cap is None else min(cap, low)

    def observe(self, sender: str, vector: npt.ArrayLike, scale: float = 1.0) -> None:
        """Add an accepted update of ``sender`` (its decoded delta times the clip ``scale``).

        Ignored while no model is known (nothing to pair the update with) or
        when the vector is not finite.
        """
        if not self.rules.enabled or self._model is None:
            return
        sketched = sketch(vector, self.rules.sketch_dim) * scale
        if not np.all(np.isfinite(sketched)):
            return
        device = self._devices.get(sender)
        if device is None:
            device = self._devices[sender] = _Device(self._model.copy(), self.rules.sketch_dim)
        device.total += sketched
        device.count += 1

    def forget(self, senders: Iterable[str]) -> None:
        """Drop the history of ``senders`` (devices removed from the registry)."""
        for sender in senders:
            self._devices.pop(sender, None)
