"""Each device's local data and the held-out test set of a scenario; numpy, no engine or tier.

Imports numpy, ``client.plugins`` (``load_data``: the one way data is named,
for devices and simulations alike) and ``simulations.datasets`` (the Dirichlet
split and the stratified hold-out); never an engine, a tier or a trainer.
Deterministic given the seed: the same scenario and seed give the same arrays,
whichever engine runs.

Two ways to get a fleet's data (``DataSpec.partition``):

* ``"loader"``: the data source shards. It is called once per device with that
  device's ``DataRequest`` (name ``device-<i>``, ``index`` i of ``count``), for
  ``split = "train"`` and, with ``holdout = "loader"``, ``split = "test"``.
  The built-in ``synthetic`` works this way.
* ``"dirichlet"`` / ``"iid"``: the data source is read once (a one-shard
  request, ``device = "fleet"``, ``index`` 0 of ``count`` 1) and the simulator
  holds out the test share and splits the rest over the devices, weighted by
  each kind's ``data_volume`` times the quantity skew. Files, ``digits`` and
  ``diabetes`` work this way.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, cast

import numpy as np
import numpy.typing as npt

from fedtier.client.plugins import DataRequest, Dataset, is_import_path, load_data, load_object
from fedtier.protocol.errors import ConfigError
from fedtier.simulations.datasets import dirichlet_partition, holdout_mask, split_sizes
from fedtier.simulations.sim.specs import DataSpec

__all__ = ["FederatedData", "Labels", "build_data", "device_name"]

Task = Literal["classification", "regression"]
Labels = npt.NDArray[np.int64] | npt.NDArray[np.float32]


def device_name(index: int) -> str:
    """The name a simulated device gives loaders (and its signing identity is made from)."""
    return f"device-{index}"


@dataclass(frozen=True)
class FederatedData:
    """Training data per device and one test set for the global model.

    Attributes:
        num_features: input dimension (features once flattened).
        num_classes: number of labels; None for regression.
        X_train: per device, training inputs (float32).
        y_train: per device, training labels (int64) or targets (float32).
        X_test: the held-out inputs (synthetic: the union of the devices' test
            splits, as the FedProx paper evaluates; digits: a stratified split).
        y_test: the held-out labels or targets.
        test_owner: the device each test example was held out from, or None
            when the test set was held out of the whole data. A model with
            local tensors is scored on each device's own examples when known.
        task: ``"classification"`` or ``"regression"``.
        name: what reports print (``Dataset.name`` of the data source).
        partition: how the data was spread (``"loader"``, ``"dirichlet"``, ``"iid"``).
        holdout: where the test set came from (``"global"``, ``"device"``, ``"loader"``).
    """

    num_features: int
    num_classes: int | None
    X_train: list[npt.NDArray[np.float32]]
    y_train: list[Labels]
    X_test: npt.NDArray[np.float32]
    y_test: Labels
    test_owner: npt.NDArray[np.int64] | None = None
    task: Task = "classification"
    name: str = "data"
    partition: str = "dirichlet"
    holdout: str = "global"

    @property
    def num_devices(self) -> int:
        """Devices holding data."""
        return len(self.X_train)

    @cached_property
    def samples(self) -> npt.NDArray[np.int64]:
        """Training examples per device."""
        return np.array([len(y) for y in self.y_train], dtype=np.int64)

    @cached_property
    def all_train(self) -> tuple[npt.NDArray[np.float32], Labels]:
        """Every device's training data in one array pair (for the training loss)."""
        return np.concatenate(self.X_train), _concat_labels(self.y_train)

    @cached_property
    def train_owner(self) -> npt.NDArray[np.int64]:
        """The device of each example of :attr:`all_train`."""
        return np.repeat(np.arange(self.num_devices, dtype=np.int64), self.samples)


def _concat_labels(parts: Sequence[Labels]) -> Labels:
    """One label array of the parts (all int64, or all float32: their dtype is kept)."""
    return cast("Labels", np.concatenate(parts))


def _read(spec: DataSpec, request: DataRequest, *, args: dict[str, object]) -> Dataset:
    return load_data(spec.source, request, label=spec.label, task=spec.task, args=args)


def _shard_reader(spec: DataSpec, args: dict[str, object]) -> Callable[[DataRequest], Dataset]:
    """Reads one device's shard per call, as :func:`_read` does, without its per-call checks.

    ``load_data`` imports the loader, checks its signature against the request
    and normalises what it returns, on every call: a 100,000-device fleet asks
    200,000 times, and the checks cost more than the built-in ``synthetic``
    loader itself. The first request goes through ``load_data`` (every check,
    every error message); later ones call the loader directly and take the
    ``Dataset`` it returns as ``load_data`` would. A loader that returns
    anything else (pairs, a torch dataset, another task) sends that request
    and every later one back through ``load_data``, as do files.
    """
    source = spec.source
    if not (isinstance(source, str) and is_import_path(source)):
        return lambda request: _read(spec, request, args=args)
    direct: Callable[..., object] | None = None
    first = True

    def read(request: DataRequest) -> Dataset:
        nonlocal direct, first
        if direct is not None:
            result = direct(request, **args)
            if isinstance(result, Dataset) and spec.task in (None, result.task):
                return result
            direct = None  # the full path from now on (this request is read again there)
        dataset = _read(spec, request, args=args)
        if first:
            first = False
            loader = load_object(source, what="data loader")  # imported by _read already
            if callable(loader):
                direct = loader
        return dataset

    return read


def build_data(
    spec: DataSpec,
    volumes: Sequence[float],
    *,
    seed: int,
    base_dir: Path | None = None,
) -> FederatedData:
    """Load, hold out and split the scenario's data over ``len(volumes)`` devices.

    Args:
        spec: the scenario's data section.
        volumes: each device's relative data volume (its kind's ``data_volume``);
            used when the simulator splits the data, where quantity skew
            multiplies it.
        seed: used when the spec names no seed of its own.
        base_dir: the scenario file's folder, passed to loaders.

    Raises:
        ConfigError: the data cannot be read or split as the spec asks.
    """
    data_seed = spec.seed if spec.seed is not None else seed
    args = spec.loader_args()
    if spec.partition == "loader" or (spec.partition is None and spec.dataset == "synthetic"):
        return _sharded_by_loader(spec, len(volumes), data_seed, base_dir, args)
    rng = np.random.default_rng(np.random.SeedSequence([data_seed, 1]))
    split_seed = int(rng.integers(2**31))
    whole = _read(spec, DataRequest(device="fleet", seed=data_seed, base_dir=base_dir), args=args)
    classification = whole.task == "classification"
    partition = spec.partition or ("dirichlet" if classification else "iid")
    if partition == "dirichlet" and not classification:
        raise ConfigError(
            f"data {whole.name!r} is a regression task; data.partition 'dirichlet' needs class "
            "labels (use 'iid')"
        )
    holdout = spec.holdout or "global"
    X, y = whole.X, whole.y
    X_test: npt.NDArray[np.float32] | None = None
    y_test: Labels | None = None
    if holdout == "global":
        mask = holdout_mask(y, spec.test_fraction, seed=split_seed, stratify=classification)
        X_test, y_test = X[mask], y[mask]
        X, y = X[~mask], y[~mask]
    elif holdout == "loader":
        test = _read(
            spec,
            DataRequest(device="fleet", seed=data_seed, split="test", base_dir=base_dir),
            args=args,
        )
        X_test, y_test = test.X, test.y
    weights = np.asarray(volumes, dtype=np.float64)
    if spec.quantity_sigma > 0:
        weights = weights * rng.lognormal(0.0, spec.quantity_sigma, len(volumes))
    if partition == "dirichlet":
        labels = np.asarray(y, dtype=np.int64)
        shards = dirichlet_partition(
            labels, list(weights), alpha=spec.dirichlet_alpha, seed=split_seed
        )
    else:
        sizes = split_sizes(len(y), list(weights))
        order = rng.permutation(len(y))
        bounds = np.cumsum([0, *sizes])
        shards = [np.sort(order[a:b]) for a, b in itertools.pairwise(bounds)]
    X_train = [X[idx] for idx in shards]
    y_train: list[Labels] = [y[idx] for idx in shards]
    owner = None
    if holdout == "device":
        X_train, y_train, X_test, y_test, owner = _hold_out_per_device(
            X_train, y_train, spec.test_fraction
        )
    assert X_test is not None
    assert y_test is not None
    return FederatedData(
        num_features=whole.num_features,
        num_classes=whole.num_classes,
        X_train=X_train,
        y_train=y_train,
        X_test=X_test,
        y_test=y_test,
        test_owner=owner,
        task=whole.task,
        name=whole.name,
        partition=partition,
        holdout=holdout,
    )


def _hold_out_per_device(
    X_train: list[npt.NDArray[np.float32]], y_train: list[Labels], test_fraction: float
) -> tuple[
    list[npt.NDArray[np.float32]],
    list[Labels],
    npt.NDArray[np.float32],
    Labels,
    npt.NDArray[np.int64],
]:
    """Each device keeps its first ``1 - test_fraction`` for training (at least one example each).

    A shard's order is already random (the partition draws it), so its tail
    is a fair sample of the device's own distribution.
    """
    trains_X: list[npt.NDArray[np.float32]] = []
    trains_y: list[Labels] = []
    tests_X: list[npt.NDArray[np.float32]] = []
    tests_y: list[Labels] = []
    owners: list[npt.NDArray[np.int64]] = []
    for device, (X, y) in enumerate(zip(X_train, y_train, strict=True)):
        n = len(y)
        if n < 2:
            raise ConfigError(
                f"device {device} holds {n} example(s); holdout = 'device' needs at least 2"
            )
        n_train = max(1, min(n - 1, int((1.0 - test_fraction) * n)))
        trains_X.append(X[:n_train])
        trains_y.append(y[:n_train])
        tests_X.append(X[n_train:])
        tests_y.append(y[n_train:])
        owners.append(np.full(n - n_train, device, dtype=np.int64))
    y_test = _concat_labels(tests_y)
    return trains_X, trains_y, np.concatenate(tests_X), y_test, np.concatenate(owners)


def _sharded_by_loader(
    spec: DataSpec,
    count: int,
    data_seed: int,
    base_dir: Path | None,
    args: dict[str, object],
) -> FederatedData:
    holdout = spec.holdout or "loader"
    read = _shard_reader(spec, args)
    shards: list[Dataset] = []
    tests: list[Dataset] = []
    for index in range(count):
        request = DataRequest(
            device=device_name(index), index=index, count=count, seed=data_seed, base_dir=base_dir
        )
        shards.append(read(request))
        if holdout == "loader":
            test_request = DataRequest(
                device=request.device,
                index=index,
                count=count,
                seed=data_seed,
                split="test",
                base_dir=base_dir,
            )
            tests.append(read(test_request))
    first = shards[0]
    for index, shard in enumerate([*shards, *tests]):
        if shard.task != first.task or shard.X.shape[1:] != first.X.shape[1:]:
            raise ConfigError(
                f"data loader {spec.source!r} gave device {index % count} {shard.task} data of "
                f"shape {shard.X.shape[1:]}, device 0 {first.task} data of {first.X.shape[1:]}"
            )
    num_classes = None
    if first.task == "classification":
        num_classes = max(int(s.num_classes or 0) for s in [*shards, *tests])
    X_train = [s.X for s in shards]
    y_train: list[Labels] = [s.y for s in shards]
    if holdout == "loader":
        X_test = np.concatenate([t.X for t in tests])
        y_test = _concat_labels([t.y for t in tests])
        owner = np.repeat(np.arange(count, dtype=np.int64), [len(t) for t in tests])
    else:
        X_train, y_train, X_test, y_test, owner = _hold_out_per_device(
            X_train, y_train, spec.test_fraction
        )
    return FederatedData(
        num_features=first.num_features,
        num_classes=num_classes,
        X_train=X_train,
        y_train=y_train,
        X_test=X_test,
        y_test=y_test,
        test_owner=owner,
        task=first.task,
        name=first.name,
        partition="loader",
        holdout=holdout,
    )
