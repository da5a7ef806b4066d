from __future__ import annotations

import math

import numpy as np
import pytest

from fedtier.protocol.errors import (
    LayoutMismatch,
    LocalProtocolError,
    RemoteProtocolError,
    UpdateRejected,
)
from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.validation import ValidationResult, check_update_vector, update_norm


def test_within_bound_passes_unscaled() -> None:
    result = check_update_vector(
        np.array([3.0, 4.0], dtype=np.float32), max_norm=5.0, norm_policy="reject"
    )
    assert result == ValidationResult(norm=5.0, scale=1.0)
    assert not result.clipped


def test_no_bound_passes_any_finite_norm() -> None:
    result = check_update_vector(
        np.full(4, 1e30, dtype=np.float32), max_norm=None, norm_policy="reject"
    )
    assert result.norm == pytest.approx(2e30, rel=1e-6)
    assert result.scale == 1.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("policy", ["clip", "reject"])
@pytest.mark.parametrize("max_norm", [None, 1.0])
def test_non_finite_is_rejected_whatever_the_policy(
    bad: float, policy: str, max_norm: float | None
) -> None:
    delta = np.zeros(10, dtype=np.float32)
    delta[7] = bad
    with pytest.raises(UpdateRejected, match="1 non-finite") as info:
        check_update_vector(delta, max_norm=max_norm, norm_policy=policy)  # type: ignore[arg-type]
    assert info.value.reason == "non_finite"
    assert isinstance(info.value, RemoteProtocolError)


def test_reject_policy_raises_norm_exceeded() -> None:
    with pytest.raises(UpdateRejected, match="above the bound") as info:
        check_update_vector(
            np.array([3.0, 4.0], dtype=np.float32), max_norm=4.0, norm_policy="reject"
        )
    assert info.value.reason == "norm_exceeded"


def test_clip_policy_returns_a_scale_that_folds_to_the_bound() -> None:
    delta = np.array([3.0, 4.0], dtype=np.float32)
    result = check_update_vector(delta, max_norm=1.0, norm_policy="clip")
    assert result.clipped
    assert result.scale == pytest.approx(0.2)
    agg = Accumulator(2)
    agg.fold_update(
        b"\x01" * 16,
        delta,
        n_samples=1,
        tau=0,
        discount=1.0,
        base_version=0,
        clip_scale=result.scale,
    )
    assert float(np.linalg.norm(agg.result())) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 1000, (1 << 16) * 3 + 17])
def test_update_norm_matches_float64_reference(dtype: type[np.floating], size: int) -> None:
    values = np.random.default_rng(size).standard_normal(size).astype(dtype)
    expected = float(np.linalg.norm(values.astype(np.float64)))
    assert update_norm(values) == pytest.approx(expected, rel=1e-6)


def test_update_norm_of_float16_payload_view() -> None:
    payload = np.array([3.0, 4.0], dtype="<f2").tobytes()
    assert update_norm(np.frombuffer(payload, dtype="<f2")) == 5.0


def test_float32_overflow_of_squares_is_not_mistaken_for_non_finite() -> None:
    delta = np.full(100, 1e20, dtype=np.float32)  # squares overflow float32
    assert update_norm(delta) == pytest.approx(1e21, rel=1e-6)
    result = check_update_vector(delta, max_norm=1.0, norm_policy="clip")
    assert result.scale == pytest.approx(1e-21, rel=1e-6)


def test_unclippable_float64_norm_is_rejected() -> None:
    delta = np.full(4, 1e300, dtype=np.float64)
    with pytest.raises(UpdateRejected) as info:
        check_update_vector(delta, max_norm=1.0, norm_policy="clip")
    assert info.value.reason == "norm_exceeded"


def test_layout_is_checked_when_given() -> None:
    with pytest.raises(LayoutMismatch, match=r"expects \(3,\)"):
        check_update_vector(
            np.zeros(2, dtype=np.float32), max_norm=None, norm_policy="clip", num_params=3
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm_policy": "scale"},
        {"max_norm": 0.0},
        {"max_norm": -1.0},
        {"max_norm": math.nan},
        {"max_norm": True},
        {"delta": np.zeros(3, dtype=np.int32)},
        {"delta": np.zeros((2, 2), dtype=np.float32)},
        {"delta": [1.0, 2.0]},
    ],
)
def test_bad_arguments_are_local_errors(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "delta": np.zeros(3, dtype=np.float32),
        "max_norm": 1.0,
        "norm_policy": "clip",
    } | kwargs
    delta = args.pop("delta")
    with pytest.raises(LocalProtocolError):
        check_update_vector(delta, **args)  # type: ignore[arg-type]
