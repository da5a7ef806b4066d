"""The demo's data: held-out split, non-IID Dirichlet shards, shard files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.datasets import (
    dirichlet_partition,
    load_digits_split,
    split_sizes,
    write_shards,
)


def test_split_is_scaled_stratified_and_deterministic() -> None:
    a = load_digits_split(seed=3)
    b = load_digits_split(seed=3)
    assert np.array_equal(a.X_test, b.X_test)
    assert a.X_train.dtype == np.float32
    assert 0.0 <= a.X_train.min() <= a.X_train.max() <= 1.0
    assert len(a.y_test) + len(a.y_train) == 1797
    assert abs(len(a.y_test) / 1797 - 0.2) < 0.01
    counts = np.bincount(a.y_test, minlength=10)
    assert counts.min() >= 34  # every digit is held out in proportion (~36 each)


def test_split_sizes_follow_weights_and_sum_to_total() -> None:
    sizes = split_sizes(100, [3.0, 1.0, 1.0])
    assert sum(sizes) == 100
    assert sizes[0] > sizes[1]
    assert min(sizes) >= 2
    with pytest.raises(ConfigError, match="cannot give 60 devices"):
        split_sizes(100, [1.0] * 60)


def test_dirichlet_partition_is_disjoint_complete_skewed_and_deterministic() -> None:
    split = load_digits_split(seed=0)
    weights = [3.0] * 10 + [0.5] * 30
    shards = dirichlet_partition(split.y_train, weights, alpha=0.5, seed=1)
    again = dirichlet_partition(split.y_train, weights, alpha=0.5, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(shards, again, strict=True))
    joined = np.concatenate(shards)
    assert len(joined) == len(split.y_train)
    assert len(np.unique(joined)) == len(joined)
    assert np.mean([len(s) for s in shards[:10]]) > 3 * np.mean([len(s) for s in shards[10:]])
    # Label skew: the typical device is dominated by a few digits.
    top_share = [np.bincount(split.y_train[s]).max() / len(s) for s in shards[:10]]
    assert np.median(top_share) > 0.3


def test_shards_are_plain_npz(tmp_path: Path) -> None:
    split = load_digits_split(seed=0)
    shards = dirichlet_partition(split.y_train, [1.0, 1.0], seed=0)
    paths = [tmp_path / "a.npz", tmp_path / "b.npz"]
    write_shards(split, shards, paths)
    with np.load(paths[0], allow_pickle=False) as data:
        assert set(data.files) == {"X", "y"}
        assert data["X"].shape == (len(shards[0]), 64)
