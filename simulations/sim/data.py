"""Each device's local data and the held-out test set of a scenario; numpy, no engine or tier.

Imports numpy, ``simulations.datasets`` (digits loading and the Dirichlet split,
owned by the demo) and ``simulations.sim.synthetic``. Deterministic given the
seed: the same scenario and seed give the same arrays, whichever engine runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

from fedtier.simulations.datasets import dirichlet_partition, load_digits_split, split_sizes
from fedtier.simulations.sim.scenario import DataSpec
from fedtier.simulations.sim.synthetic import generate_synthetic

__all__ = ["FederatedData", "build_data"]


@dataclass(frozen=True)
class FederatedData:
    """Training data per device and one test set for the global model.

    Attributes:
        num_features: input dimension.
        num_classes: number of labels.
        X_train: per device, training inputs (float32).
        y_train: per device, training labels (int64).
        X_test: the held-out inputs (synthetic: the union of the devices' test
            splits, as the FedProx paper evaluates; digits: a stratified split).
        y_test: the held-out labels.
    """

    num_features: int
    num_classes: int
    X_train: list[npt.NDArray[np.float32]]
    y_train: list[npt.NDArray[np.int64]]
    X_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]

    @property
    def num_devices(self) -> int:
        """Devices holding data."""
        return len(self.X_train)

    @cached_property
    def samples(self) -> npt.NDArray[np.int64]:
        """Training examples per device."""
        return np.array([len(y) for y in self.y_train], dtype=np.int64)

    @cached_property
    def all_train(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Every device's training data in one array pair (for the training loss)."""
        return np.concatenate(self.X_train), np.concatenate(self.y_train)


def build_data(spec: DataSpec, volumes: Sequence[float], *, seed: int) -> FederatedData:
    """Draw or split the scenario's data over ``len(volumes)`` devices.

    Args:
        spec: the scenario's data section.
        volumes: each device's relative data volume (its kind's ``data_volume``);
            used by the digits split, where quantity skew multiplies it.
        seed: used when the spec names no seed of its own.
    """
    rng = np.random.default_rng(
        np.random.SeedSequence([spec.seed if spec.seed is not None else seed, 1])
    )
    if spec.dataset == "synthetic":
        splits = generate_synthetic(
            len(volumes),
            alpha=spec.alpha,
            beta=spec.beta,
            iid=spec.iid,
            rng=rng,
            features=spec.features,
            classes=spec.classes,
            samples_log_mean=spec.samples_log_mean,
            samples_log_sigma=spec.samples_log_sigma,
            samples_min=spec.samples_min,
            samples_max=spec.samples_max,
            sizes=spec.samples_per_device,
            test_fraction=spec.test_fraction,
        )
        return FederatedData(
            num_features=spec.features,
            num_classes=spec.classes,
            X_train=[s.X_train for s in splits],
            y_train=[s.y_train for s in splits],
            X_test=np.concatenate([s.X_test for s in splits]),
            y_test=np.concatenate([s.y_test for s in splits]),
        )
    split_seed = int(rng.integers(2**31))
    digits = load_digits_split(test_fraction=spec.test_fraction, seed=split_seed)
    weights = np.asarray(volumes, dtype=np.float64)
    if spec.quantity_sigma > 0:
        weights = weights * rng.lognormal(0.0, spec.quantity_sigma, len(volumes))
    if spec.partition == "dirichlet":
        shards = dirichlet_partition(
            digits.y_train, list(weights), alpha=spec.dirichlet_alpha, seed=split_seed
        )
    else:
        sizes = split_sizes(len(digits.y_train), list(weights))
        order = rng.permutation(len(digits.y_train))
        bounds = np.cumsum([0, *sizes])
        shards = [np.sort(order[a:b]) for a, b in itertools.pairwise(bounds)]
    return FederatedData(
        num_features=digits.X_train.shape[1],
        num_classes=int(digits.y_train.max()) + 1,
        X_train=[digits.X_train[idx] for idx in shards],
        y_train=[digits.y_train[idx] for idx in shards],
        X_test=digits.X_test,
        y_test=digits.y_test,
    )
