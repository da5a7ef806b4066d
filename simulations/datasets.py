"""The demo's data: bundled digits, a held-out split and non-IID device shards; imports no trio.

Imports numpy and scikit-learn (lazily, inside ``load_digits_split``) and the
standard library; never a bus, a tier or the device client, so simulations and
tests can partition data without starting anything.

``load_digits`` ships inside scikit-learn (nothing is downloaded): 1,797 8x8
images, 64 features in 0..16, scaled here to [0, 1]. A fixed 20% held-out test
split, stratified by label, is what the demo evaluates every model version on;
devices never see it. The rest is split across N devices non-IID: each device
draws its label mix from Dirichlet(alpha) (0.5 by default: most devices see a
few digits mostly) and its share of examples from a per-device volume weight,
so vehicles can hold more data than IoT gateways. Every example goes to exactly
one device. Deterministic given the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import ConfigError

__all__ = [
    "DigitsSplit",
    "dirichlet_partition",
    "load_digits_split",
    "split_sizes",
    "write_shards",
]

NUM_FEATURES: Final = 64
NUM_CLASSES: Final = 10
_PIXEL_MAX: Final = 16.0
_MIN_PER_DEVICE: Final = 2


@dataclass(frozen=True, slots=True)
class DigitsSplit:
    """The training pool and the held-out test set.

    Attributes:
        X_train: training features, float32 in [0, 1], shape ``(n, 64)``.
        y_train: training labels, int64 in 0..9.
        X_test: held-out features (20%), never given to a device.
        y_test: held-out labels.
    """

    X_train: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    X_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]


def load_digits_split(*, test_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """Load the bundled digits, scale to [0, 1] and hold out a stratified test split.

    Raises:
        ConfigError: scikit-learn is missing or ``test_fraction`` is not in (0, 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction is {test_fraction!r}; expected a number in (0, 1)")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ConfigError(
            "scikit-learn is not installed; install fedtier[lab] for the demo data"
        ) from exc
    digits = load_digits()
    X = (np.asarray(digits.data, dtype=np.float32) / _PIXEL_MAX).astype(np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(y), dtype=bool)
    # Stratified by hand: the same fraction of every digit, so the test set
    # is balanced whatever the seed.
    for label in range(NUM_CLASSES):
        idx = np.flatnonzero(y == label)
        take = round(len(idx) * test_fraction)
        test_mask[rng.choice(idx, size=take, replace=False)] = True
    return DigitsSplit(X[~test_mask], y[~test_mask], X[test_mask], y[test_mask])


def split_sizes(total: int, weights: Sequence[float]) -> list[int]:
    """Sizes proportional to ``weights`` that sum to ``total`` (largest remainders).

    Every device gets at least 2 examples, so each can form a batch.

    Raises:
        ConfigError: no weights, a weight <= 0, or too few examples for everyone.
    """
    if not weights:
        raise ConfigError("cannot split data across zero devices")
    if any(not (w > 0) for w in weights):
        raise ConfigError("device volume weights must all be > 0")
    n = len(weights)
    if total < _MIN_PER_DEVICE * n:
        raise ConfigError(
            f"{total} training examples cannot give {n} devices {_MIN_PER_DEVICE} each; "
            "use fewer devices"
        )
    spare = total - _MIN_PER_DEVICE * n
    w = np.asarray(weights, dtype=np.float64)
    exact = spare * w / w.sum()
    sizes = np.floor(exact).astype(np.int64)
    short = spare - int(sizes.sum())
    # Ties go to the lower index, so the result is deterministic.
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[:short]] += 1
    return [int(s) + _MIN_PER_DEVICE for s in sizes]


def dirichlet_partition(
    labels: npt.NDArray[np.int64],
    weights: Sequence[float],
    *,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[npt.NDArray[np.int64]]:
    """Split example indices across devices, label-skewed by Dirichlet(``alpha``).

    Device ``d`` gets ``split_sizes(len(labels), weights)[d]`` examples; each is
    drawn from the labels still available with the device's Dirichlet label
    probabilities (renormalised over what is left), so the split is disjoint
    and complete.

    Returns:
        One sorted index array per device.

    Raises:
        ConfigError: ``alpha`` <= 0, or the sizes cannot be met (see ``split_sizes``).
    """
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha is {alpha!r}; expected a number > 0")
    rng = np.random.default_rng(seed)
    sizes = split_sizes(len(labels), weights)
    classes = int(labels.max()) + 1 if len(labels) else 0
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in range(classes)]
    remaining = np.array([len(p) for p in pools], dtype=np.float64)
    shards: list[npt.NDArray[np.int64]] = []
    for size in sizes:
        mix = rng.dirichlet(np.full(classes, alpha))
        taken: list[int] = []
        for _ in range(size):
            p = mix * (remaining > 0)
            total = p.sum()
            # A device whose favourite digits are used up takes what is left.
            p = p / total if total > 0 else remaining / remaining.sum()
            label = int(rng.choice(classes, p=p))
            taken.append(int(pools[label].pop()))
            remaining[label] -= 1
        shards.append(np.sort(np.asarray(taken, dtype=np.int64)))
    return shards


def write_shards(
    split: DigitsSplit,
    shards: Sequence[npt.NDArray[np.int64]],
    paths: Sequence[Path],
) -> None:
    """Write each device's examples as an ``.npz`` with arrays ``X`` and ``y`` (no pickle).

    Raises:
        ConfigError: the numbers of shards and paths differ.
    """
    if len(shards) != len(paths):
        raise ConfigError(f"{len(shards)} shards but {len(paths)} shard paths")
    for idx, path in zip(shards, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, X=split.X_train[idx], y=split.y_train[idx])
