"""The built-in data: bundled digits, diabetes, synthetic, held-out splits, non-IID shards; no trio.

Imports numpy, scikit-learn (lazily, inside the loaders), ``client.plugins``
(the loader protocol's ``DataRequest`` and ``Dataset``) and the standard
library; never a bus, a tier or a daemon, so simulations and tests can
partition data without starting anything.

``digits``, ``diabetes`` and ``synthetic`` are data loaders like any user's
(``loader = "fedtier.simulations.datasets:digits"`` in a scenario or a device
config): called with a ``DataRequest``, they return a ``Dataset``. ``digits`` and
``diabetes`` return the whole set when the request is for one shard (the
simulator then holds out and partitions it by the scenario's settings) and a
seeded IID share otherwise; ``synthetic`` draws one distribution per device, so
it always answers for the requested device and split.

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

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from fedtier.client.plugins import DataRequest, Dataset
from fedtier.protocol.errors import ConfigError

if TYPE_CHECKING:
    from fedtier.simulations.sim.synthetic import DeviceSplit

__all__ = [
    "DIGITS_NAME",
    "DigitsSplit",
    "diabetes",
    "digits",
    "dirichlet_partition",
    "holdout_mask",
    "load_digits_split",
    "split_sizes",
    "synthetic",
    "write_shards",
]

DIGITS_NAME: Final = "digits (scikit-learn, 8x8)"

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
    X, y = _digits_arrays()
    test_mask = holdout_mask(y, test_fraction, seed=seed)
    return DigitsSplit(X[~test_mask], y[~test_mask], X[test_mask], y[test_mask])


def _sklearn_datasets() -> object:
    try:
        import sklearn.datasets
    except ImportError as exc:
        raise ConfigError(
            "scikit-learn is not installed; install fedtier[lab] for the demo data"
        ) from exc
    return sklearn.datasets


@functools.cache
def _digits_arrays() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """All 1,797 digits, scaled to [0, 1], in scikit-learn's order (read once per process)."""
    loaded = _sklearn_datasets().load_digits()  # type: ignore[attr-defined]
    X = (np.asarray(loaded.data, dtype=np.float32) / _PIXEL_MAX).astype(np.float32)
    y = np.asarray(loaded.target, dtype=np.int64)
    X.flags.writeable = False
    y.flags.writeable = False
    return X, y


def holdout_mask(
    y: npt.NDArray[np.generic], test_fraction: float, *, seed: int, stratify: bool = True
) -> npt.NDArray[np.bool_]:
    """Which examples are held out: ``test_fraction`` of them, of every class when stratified.

    Args:
        y: the labels (classes when ``stratify``, any targets otherwise).
        test_fraction: the held-out share, in (0, 1).
        seed: seed of the draw.
        stratify: hold out the same share of every class (``y`` are int
            labels), so the test set is balanced whatever the seed; else a
            plain random share (regression targets).

    Raises:
        ConfigError: ``test_fraction`` is not in (0, 1).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction is {test_fraction!r}; expected a number in (0, 1)")
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), dtype=bool)
    if not stratify:
        mask[rng.choice(len(y), size=round(len(y) * test_fraction), replace=False)] = True
        return mask
    labels = np.asarray(y, dtype=np.int64)
    for label in range(int(labels.max()) + 1 if len(labels) else 0):
        idx = np.flatnonzero(labels == label)
        take = round(len(idx) * test_fraction)
        mask[rng.choice(idx, size=take, replace=False)] = True
    return mask


def _iid_share(n: int, request: DataRequest) -> npt.NDArray[np.int64]:
    """Example indices of ``request.index``'s share of a seeded IID split into ``request.count``."""
    if request.count == 1:
        return np.arange(n, dtype=np.int64)
    if n < _MIN_PER_DEVICE * request.count:
        raise ConfigError(
            f"{n} examples cannot give {request.count} devices {_MIN_PER_DEVICE} each"
        )
    order = np.random.default_rng(np.random.SeedSequence([request.seed, 2])).permutation(n)
    return np.sort(np.array_split(order, request.count)[request.index])


def digits(request: DataRequest) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, 64 features in [0, 1], 10 classes).

    The whole set for a one-shard request (the simulator holds out and splits
    it); otherwise ``request.index``'s share of a seeded IID split. Ignores
    ``request.split``: hold a test set out by the scenario's ``test_fraction``.
    """
    X, y = _digits_arrays()
    idx = _iid_share(len(y), request)
    return Dataset(X[idx], y[idx], task="classification", name=DIGITS_NAME, num_classes=10)


@functools.cache
def _diabetes_arrays() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    loaded = _sklearn_datasets().load_diabetes()  # type: ignore[attr-defined]
    X = np.asarray(loaded.data, dtype=np.float64)
    y = np.asarray(loaded.target, dtype=np.float64)
    # Unit-variance features and a standardised target: plain SGD on the raw
    # target (25..346) needs a tiny learning rate; R^2 does not change.
    X = (X - X.mean(axis=0)) / X.std(axis=0)
    y = (y - y.mean()) / y.std()
    return X.astype(np.float32), y.astype(np.float32)


def diabetes(request: DataRequest) -> Dataset:
    """scikit-learn's bundled diabetes regression (442 patients, 10 features, standardised).

    The target (disease progression after a year) is standardised to mean 0
    and variance 1, the features to unit variance. Whole set or an IID share,
    as :func:`digits`.
    """
    X, y = _diabetes_arrays()
    idx = _iid_share(len(y), request)
    return Dataset(
        X[idx],
        y[idx],
        task="regression",
        name="diabetes (scikit-learn, 10 features, standardised target)",
    )


def synthetic(
    request: DataRequest,
    *,
    alpha: float = 0.0,
    beta: float = 0.0,
    iid: bool = False,
    features: int = 60,
    classes: int = 10,
    samples_log_mean: float = 4.0,
    samples_log_sigma: float = 2.0,
    samples_min: int = 50,
    samples_max: int | None = None,
    samples_per_device: Sequence[int] | None = None,
    test_fraction: float = 0.1,
) -> Dataset:
    """FedProx's Synthetic(alpha, beta): device ``request.index``'s own distribution.

    The whole fleet's data is drawn at once from ``request.seed`` (and kept for
    the next device's request), so device ``k`` of ``count`` gets the same
    arrays whoever asks first. ``"train"`` is its first ``1 - test_fraction``,
    ``"test"`` and ``"validation"`` the rest. Arguments as
    ``simulations.sim.synthetic.generate_synthetic``.
    """
    sizes = None if samples_per_device is None else tuple(int(n) for n in samples_per_device)
    splits = _synthetic_fleet(
        request.count,
        request.seed,
        float(alpha),
        float(beta),
        bool(iid),
        int(features),
        int(classes),
        float(samples_log_mean),
        float(samples_log_sigma),
        int(samples_min),
        None if samples_max is None else int(samples_max),
        sizes,
        float(test_fraction),
    )
    split = splits[request.index]
    train = request.split == "train"
    name = "Synthetic IID" if iid else f"Synthetic({alpha:g},{beta:g})"
    return Dataset(
        split.X_train if train else split.X_test,
        split.y_train if train else split.y_test,
        task="classification",
        name=f"{name}, {features} features, {classes} classes",
        num_classes=int(classes),
    )


@functools.lru_cache(maxsize=2)
def _synthetic_fleet(
    count: int,
    seed: int,
    alpha: float,
    beta: float,
    iid: bool,
    features: int,
    classes: int,
    samples_log_mean: float,
    samples_log_sigma: float,
    samples_min: int,
    samples_max: int | None,
    sizes: tuple[int, ...] | None,
    test_fraction: float,
) -> list[DeviceSplit]:
    # Imported here: the sim package imports this module.
    from fedtier.simulations.sim.synthetic import generate_synthetic

    return generate_synthetic(
        count,
        alpha=alpha,
        beta=beta,
        iid=iid,
        rng=np.random.default_rng(np.random.SeedSequence([seed, 1])),
        features=features,
        classes=classes,
        samples_log_mean=samples_log_mean,
        samples_log_sigma=samples_log_sigma,
        samples_min=samples_min,
        samples_max=samples_max,
        sizes=sizes,
        test_fraction=test_fraction,
    )


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
