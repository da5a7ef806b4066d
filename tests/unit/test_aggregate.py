from __future__ import annotations

import ast
import functools
import math
from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np
import numpy.typing as npt
import pytest

from fedtier.protocol.errors import (
    InconsistentPartial,
    LayoutMismatch,
    LocalProtocolError,
    Reason,
    RemoteProtocolError,
)
from fedtier.tiers.aggregate import (
    Accumulator,
    DeltaSource,
    coordinate_median,
    multi_krum,
    partial_id,
    trimmed_mean,
)


def uid(i: int) -> bytes:
    return i.to_bytes(16, "big")


def vec(*values: float) -> npt.NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


def fold(
    agg: Accumulator,
    i: int,
    delta: DeltaSource,
    n: int = 1,
    tau: int = 0,
    d: float = 1.0,
    v: int = 0,
) -> None:
    agg.fold_update(uid(i), delta, n_samples=n, tau=tau, discount=d, base_version=v)


def snapshot(agg: Accumulator) -> tuple[object, ...]:
    return (
        agg.numerator.tobytes(),
        agg.sample_count,
        agg.weight_sum,
        agg.update_count,
        agg.input_count,
        agg.staleness_hist,
        list(agg.input_ids),
        list(agg.leaf_ids),
        agg.min_base_version,
        agg.max_base_version,
    )


# -- fold_update ---------------------------------------------------------------------


def test_new_aggregate_is_empty() -> None:
    agg = Accumulator(3)
    assert agg.is_empty
    assert agg.numerator.dtype == np.float32
    assert agg.numerator.shape == (3,)
    assert agg.staleness_hist == [0] * 32
    assert agg.min_base_version is None
    with pytest.raises(LocalProtocolError, match="empty"):
        agg.result()


def test_single_fresh_update_is_its_own_aggregate() -> None:
    agg = Accumulator(3)
    fold(agg, 1, vec(1.0, -2.0, 0.5), n=7)
    np.testing.assert_array_equal(agg.result(), vec(1.0, -2.0, 0.5))
    assert agg.sample_count == 7.0
    assert agg.weight_sum == 7.0
    assert (agg.update_count, agg.input_count) == (1, 1)
    assert agg.input_ids == [uid(1)]
    assert agg.leaf_ids == [uid(1)]


def test_weighted_mean_by_sample_count() -> None:
    agg = Accumulator(2)
    fold(agg, 1, vec(1.0, 0.0), n=1)
    fold(agg, 2, vec(0.0, 1.0), n=3)
    np.testing.assert_allclose(agg.result(), [0.25, 0.75], rtol=1e-7)


def test_discount_shrinks_numerator_and_weight_but_not_denominator() -> None:
    agg = Accumulator(2)
    fold(agg, 1, vec(2.0, 4.0), n=10, tau=3, d=0.5, v=4)
    fold(agg, 2, vec(2.0, 4.0), n=10, tau=0, d=1.0, v=7)
    np.testing.assert_allclose(agg.numerator, [30.0, 60.0])
    assert agg.sample_count == 20.0
    assert agg.weight_sum == 15.0
    # Discount, do not renormalize: stale work shortens the step.
    np.testing.assert_allclose(agg.result(), [1.5, 3.0])
    assert (agg.min_base_version, agg.max_base_version) == (4, 7)
    assert agg.staleness_hist[0] == 1
    assert agg.staleness_hist[3] == 1


def test_clip_scale_scales_delta_not_weight() -> None:
    agg = Accumulator(2)
    agg.fold_update(
        uid(1), vec(3.0, 4.0), n_samples=2, tau=0, discount=1.0, base_version=0, clip_scale=0.2
    )
    np.testing.assert_allclose(agg.numerator, [1.2, 1.6], rtol=1e-6)
    assert agg.sample_count == 2.0
    assert agg.weight_sum == 2.0


def test_large_staleness_lands_in_last_bucket() -> None:
    agg = Accumulator(1, hist_buckets=4)
    for i, tau in enumerate([0, 2, 3, 4, 40]):
        fold(agg, i, vec(1.0), tau=tau, d=0.5)
    assert agg.staleness_hist == [1, 0, 1, 3]


def test_multi_block_fold_matches_float64_reference() -> None:
    # Larger than one fold block (2**17), with a ragged tail.
    rng = np.random.default_rng(7)
    size = (1 << 17) * 2 + 12345
    agg = Accumulator(size)
    reference = np.zeros(size, dtype=np.float64)
    for i in range(5):
        delta = rng.standard_normal(size, dtype=np.float32)
        n, d = int(rng.integers(1, 100)), float(rng.uniform(0.1, 1.0))
        fold(agg, i, delta, n=n, d=d)
        reference += float(np.float32(n * d)) * delta.astype(np.float64)
    np.testing.assert_allclose(agg.numerator, reference, rtol=1e-5, atol=1e-3)


def test_float16_and_float64_deltas_fold_as_float32() -> None:
    agg16 = Accumulator(3)
    fold(agg16, 1, np.array([0.5, -1.0, 2.0], dtype=np.float16), n=2, d=0.5)
    agg64 = Accumulator(3)
    fold(agg64, 1, np.array([0.5, -1.0, 2.0], dtype=np.float64), n=2, d=0.5)
    np.testing.assert_array_equal(agg16.numerator, vec(0.5, -1.0, 2.0))
    np.testing.assert_array_equal(agg64.numerator, agg16.numerator)


def test_folder_callable_equals_dense_fold() -> None:
    rng = np.random.default_rng(1)
    delta = rng.standard_normal(1000, dtype=np.float32)
    dense = Accumulator(1000)
    fold(dense, 1, delta, n=13, d=0.7)

    seen: list[float] = []

    def folder(acc: npt.NDArray[np.float32], *, weight: float) -> None:
        seen.append(weight)
        acc += np.float32(weight) * delta

    via_folder = Accumulator(1000)
    fold(via_folder, 1, folder, n=13, d=0.7)
    assert seen == [13 * 0.7]
    np.testing.assert_array_equal(via_folder.numerator, dense.numerator)
    assert via_folder.weight_sum == dense.weight_sum


def test_folder_built_with_functools_partial_of_a_codec_signature() -> None:
    # protocol.codecs.fold_into(acc, payload, spec, weight) bound by keyword.
    def fold_into(acc: npt.NDArray[np.float32], payload: bytes, spec: str, weight: float) -> None:
        assert spec == "f32"
        acc += np.float32(weight) * np.frombuffer(payload, dtype="<f4")

    agg = Accumulator(2)
    payload = vec(1.0, 2.0).tobytes()
    fold(agg, 1, functools.partial(fold_into, payload=payload, spec="f32"), n=4)
    np.testing.assert_array_equal(agg.result(), vec(1.0, 2.0))


def test_folder_that_raises_breaks_the_aggregate_until_reset() -> None:
    agg = Accumulator(2)
    fold(agg, 1, vec(1.0, 1.0))

    def half_written(acc: npt.NDArray[np.float32], *, weight: float) -> None:
        acc[0] += 99.0
        raise RemoteProtocolError("truncated payload", reason=Reason.MALFORMED)

    with pytest.raises(RemoteProtocolError):
        fold(agg, 2, half_written)
    assert "BROKEN" in repr(agg)  # is_broken, without narrowing the property for mypy
    with pytest.raises(LocalProtocolError, match="broken"):
        agg.result()
    with pytest.raises(LocalProtocolError, match="broken"):
        fold(agg, 3, vec(1.0, 1.0))
    agg.reset()
    assert not agg.is_broken
    assert agg.is_empty
    fold(agg, 3, vec(1.0, 1.0))
    np.testing.assert_array_equal(agg.result(), vec(1.0, 1.0))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"update_id": b"short"}, LocalProtocolError),
        ({"update_id": "0" * 16}, LocalProtocolError),
        ({"delta": vec(1.0, 2.0, 3.0)}, LayoutMismatch),
        ({"delta": np.zeros((1, 2), dtype=np.float32)}, LayoutMismatch),
        ({"delta": np.array([1, 2])}, LocalProtocolError),
        ({"delta": [1.0, 2.0]}, LocalProtocolError),
        ({"n_samples": 0}, LocalProtocolError),
        ({"n_samples": 2.0}, LocalProtocolError),
        ({"n_samples": True}, LocalProtocolError),
        ({"tau": -1}, LocalProtocolError),
        ({"base_version": -1}, LocalProtocolError),
        ({"discount": 0.0}, LocalProtocolError),
        ({"discount": 1.5}, LocalProtocolError),
        ({"discount": math.nan}, LocalProtocolError),
        ({"clip_scale": 0.0}, LocalProtocolError),
        ({"clip_scale": 2.0}, LocalProtocolError),
    ],
)
def test_rejected_fold_leaves_the_aggregate_unchanged(
    kwargs: dict[str, object], error: type[Exception]
) -> None:
    agg = Accumulator(2)
    fold(agg, 1, vec(1.0, 2.0), n=3, tau=1, d=0.5, v=2)
    before = snapshot(agg)
    args: dict[str, object] = {
        "update_id": uid(2),
        "delta": vec(5.0, 6.0),
        "n_samples": 1,
        "tau": 0,
        "discount": 1.0,
        "base_version": 3,
    } | kwargs
    with pytest.raises(error):
        agg.fold_update(**args)  # type: ignore[arg-type]
    assert snapshot(agg) == before


def test_layout_mismatch_is_a_remote_error() -> None:
    agg = Accumulator(2)
    with pytest.raises(RemoteProtocolError) as info:
        fold(agg, 1, vec(1.0))
    assert info.value.reason == "layout_mismatch"


def test_same_input_cannot_be_folded_twice() -> None:
    agg = Accumulator(1)
    fold(agg, 1, vec(1.0))
    with pytest.raises(LocalProtocolError, match="already folded"):
        fold(agg, 1, vec(1.0))
    child = Accumulator(1)
    fold(child, 2, vec(1.0))
    with pytest.raises(LocalProtocolError, match="already folded"):
        agg.fold_child(uid(1), child, extra_tau=0, discount=1.0)


def test_numerator_is_read_only_for_callers() -> None:
    agg = Accumulator(2)
    with pytest.raises(ValueError, match="read-only"):
        agg.numerator[0] = 1.0


def test_reset_zeroes_in_place_and_forgets_everything() -> None:
    agg = Accumulator(2)
    fold(agg, 1, vec(1.0, 2.0), n=2, tau=5, d=0.5, v=3)
    view = agg.numerator
    agg.reset()
    assert agg.is_empty
    assert snapshot(agg) == snapshot(Accumulator(2))
    assert np.shares_memory(view, agg.numerator)
    fold(agg, 1, vec(3.0, 4.0))  # the same id is new again in the next buffer
    np.testing.assert_array_equal(agg.result(), vec(3.0, 4.0))


def test_replaying_the_same_folds_is_bit_identical() -> None:
    rng = np.random.default_rng(3)
    inputs = [
        (rng.standard_normal(50, dtype=np.float32), int(rng.integers(1, 9))) for _ in range(20)
    ]
    runs = []
    for _ in range(2):
        agg = Accumulator(50)
        for i, (delta, tau) in enumerate(inputs):
            fold(agg, i, delta, n=i + 1, tau=tau, d=1.0 / math.sqrt(1 + tau))
        runs.append(snapshot(agg))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("kwargs", [{"num_params": 0}, {"num_params": 2.0}, {"hist_buckets": 0}])
def test_constructor_validates(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"num_params": 2} | kwargs
    num_params = args.pop("num_params")
    with pytest.raises(LocalProtocolError):
        Accumulator(num_params, **args)  # type: ignore[arg-type]


# -- fold_partial --------------------------------------------------------------------


def make_child(*updates: tuple[int, list[float], int, int, float, int]) -> Accumulator:
    child = Accumulator(len(updates[0][1]), hist_buckets=8)
    for i, values, n, tau, d, v in updates:
        fold(child, i, vec(*values), n=n, tau=tau, d=d, v=v)
    return child


def test_fold_partial_discounts_numerator_and_weight_not_samples() -> None:
    child = make_child((1, [2.0, 4.0], 10, 0, 1.0, 5), (2, [4.0, 0.0], 30, 2, 0.5, 3))
    parent = Accumulator(2, hist_buckets=8)
    parent.fold_child(uid(100), child, extra_tau=2, discount=0.25)
    np.testing.assert_allclose(parent.numerator, 0.25 * child.numerator)
    assert parent.sample_count == child.sample_count == 40.0
    assert parent.weight_sum == 0.25 * child.weight_sum
    assert parent.update_count == 2
    assert parent.input_count == 1
    assert parent.input_ids == [uid(100)]
    assert parent.leaf_ids == [uid(1), uid(2)]
    assert (parent.min_base_version, parent.max_base_version) == (3, 5)
    # Histograms shift by the extra delay: leaves were 0 and 2 behind, now 2 and 4.
    assert parent.staleness_hist == [0, 0, 1, 0, 1, 0, 0, 0]


def test_fold_partial_shift_overflows_into_last_bucket_and_accepts_other_bucket_counts() -> None:
    parent = Accumulator(1, hist_buckets=4)
    parent.fold_partial(
        uid(9),
        vec(1.0),
        sample_count=6.0,
        weight_sum=3.0,
        update_count=6,
        staleness_hist=[1, 1, 1, 1, 1, 1],
        leaf_ids=[uid(i) for i in range(6)],
        extra_tau=1,
        discount=0.5,
        min_base_version=0,
        max_base_version=0,
    )
    assert parent.staleness_hist == [0, 1, 1, 4]


def test_partial_with_no_extra_delay_is_a_plain_sum() -> None:
    a = make_child((1, [1.0, 2.0], 3, 1, 0.7, 1))
    b = make_child((2, [5.0, -1.0], 4, 0, 1.0, 2))
    parent = Accumulator(2, hist_buckets=8)
    parent.fold_child(uid(50), a, extra_tau=0, discount=1.0)
    parent.fold_child(uid(51), b, extra_tau=0, discount=1.0)
    flat = make_child((1, [1.0, 2.0], 3, 1, 0.7, 1), (2, [5.0, -1.0], 4, 0, 1.0, 2))
    np.testing.assert_array_equal(parent.result(), flat.result())
    assert parent.staleness_hist == flat.staleness_hist
    assert parent.weight_sum == flat.weight_sum


def partial_args(**overrides: object) -> dict[str, object]:
    args: dict[str, object] = {
        "partial_id": uid(77),
        "numerator": vec(1.0, 2.0),
        "sample_count": 10.0,
        "weight_sum": 8.0,
        "update_count": 2,
        "staleness_hist": [1, 1],
        "leaf_ids": [uid(1), uid(2)],
        "extra_tau": 0,
        "discount": 1.0,
        "min_base_version": 1,
        "max_base_version": 2,
    }
    return args | overrides


@pytest.mark.parametrize(
    "overrides",
    [
        {"sample_count": 0.0},
        {"sample_count": math.nan},
        {"sample_count": math.inf},
        {"weight_sum": 0.0},
        {"weight_sum": 10.5},
        {"weight_sum": math.nan},
        {"update_count": 3},
        {"update_count": 0, "leaf_ids": [], "staleness_hist": [0]},
        {"staleness_hist": [2, 1]},
        {"staleness_hist": [3, -1]},
        {"staleness_hist": []},
        {"leaf_ids": [uid(1), b"x"]},
        {"min_base_version": 3},
        {"min_base_version": -1},
    ],
)
def test_inconsistent_partial_is_rejected_unchanged(overrides: dict[str, object]) -> None:
    agg = Accumulator(2)
    fold(agg, 1, vec(1.0, 1.0))
    before = snapshot(agg)
    with pytest.raises(InconsistentPartial) as info:
        agg.fold_partial(**partial_args(**overrides))  # type: ignore[arg-type]
    assert info.value.reason == "inconsistent_partial"
    assert isinstance(info.value, RemoteProtocolError)
    assert snapshot(agg) == before


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"numerator": vec(1.0)}, LayoutMismatch),
        ({"extra_tau": -1}, LocalProtocolError),
        ({"discount": 0.0}, LocalProtocolError),
        ({"partial_id": b"\x00" * 15}, LocalProtocolError),
    ],
)
def test_fold_partial_argument_errors(overrides: dict[str, object], error: type[Exception]) -> None:
    agg = Accumulator(2)
    with pytest.raises(error):
        agg.fold_partial(**partial_args(**overrides))  # type: ignore[arg-type]
    assert agg.is_empty


def test_fold_child_refuses_empty_child() -> None:
    with pytest.raises(LocalProtocolError, match="empty"):
        Accumulator(1).fold_child(uid(1), Accumulator(1), extra_tau=0, discount=1.0)


# -- partial_id ----------------------------------------------------------------------


def test_partial_id_matches_its_definition() -> None:
    ids = [uid(3), uid(1), uid(2)]
    expected = blake3.blake3(
        b"fedtier partial id v1\x00" + b"edge-7\x00" + uid(1) + uid(2) + uid(3)
    ).digest()[:16]
    assert partial_id("edge-7", ids) == expected
    assert len(expected) == 16


def test_partial_id_is_order_independent_and_sender_bound() -> None:
    ids = [uid(i) for i in range(5)]
    assert partial_id("edge-1", ids) == partial_id("edge-1", list(reversed(ids)))
    assert partial_id("edge-1", ids) != partial_id("edge-2", ids)
    assert partial_id("edge-1", ids) != partial_id("edge-1", ids[:-1])


@pytest.mark.parametrize(
    ("sender", "ids"),
    [
        ("", [uid(1)]),
        ("a\x00b", [uid(1)]),
        ("edge", []),
        ("edge", [b"\x00" * 15]),
        ("edge", [uid(1), uid(2), uid(1)]),
    ],
)
def test_partial_id_validates(sender: str, ids: list[bytes]) -> None:
    with pytest.raises(LocalProtocolError):
        partial_id(sender, ids)


# -- robust rules --------------------------------------------------------------------


def test_trimmed_mean() -> None:
    updates = [vec(1.0, 10.0), vec(2.0, 20.0), vec(3.0, 30.0), vec(1000.0, -1000.0)]
    np.testing.assert_allclose(trimmed_mean(updates, 0.0), [251.5, -235.0])
    np.testing.assert_allclose(trimmed_mean(updates, 0.25), [2.5, 15.0])
    np.testing.assert_allclose(trimmed_mean(np.stack(updates), 0.49), [2.5, 15.0])
    assert trimmed_mean(updates, 0.25).dtype == np.float32


def test_coordinate_median() -> None:
    odd = [vec(1.0, 5.0), vec(2.0, -7.0), vec(300.0, 6.0)]
    np.testing.assert_array_equal(coordinate_median(odd), vec(2.0, 5.0))
    even = [*odd, vec(3.0, 0.0)]
    np.testing.assert_array_equal(coordinate_median(even), vec(2.5, 2.5))
    assert coordinate_median(even).dtype == np.float32


def test_multi_krum_selects_the_honest_cluster() -> None:
    rng = np.random.default_rng(0)
    honest = [rng.normal(0.0, 0.1, 20).astype(np.float32) for _ in range(7)]
    byzantine = [np.full(20, 50.0, dtype=np.float32), np.full(20, -30.0, dtype=np.float32)]
    updates = [honest[0], byzantine[0], *honest[1:4], byzantine[1], *honest[4:]]
    selected = multi_krum(updates, num_byzantine=2, m=5)
    assert len(selected) == 5
    assert not {1, 5} & set(selected)
    assert set(multi_krum(updates, num_byzantine=2, m=7)) == {0, 2, 3, 4, 6, 7, 8}
    assert multi_krum(updates, num_byzantine=2, m=1) == selected[:1]


def test_multi_krum_ties_go_to_lower_index() -> None:
    updates = [vec(0.0)] * 5
    assert multi_krum(updates, num_byzantine=1, m=3) == [0, 1, 2]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: trimmed_mean([vec(1.0)], 0.5), "beta"),
        (lambda: trimmed_mean([], 0.1), "at least one"),
        (lambda: coordinate_median([vec(1.0), vec(1.0, 2.0)]), "one shape"),
        (lambda: coordinate_median(np.zeros((0, 3), dtype=np.float32)), "non-empty"),
        (lambda: multi_krum([vec(0.0)] * 4, num_byzantine=1, m=1), "2f \\+ 3"),
        (lambda: multi_krum([vec(0.0)] * 5, num_byzantine=1, m=5), "m must be"),
        (lambda: multi_krum([vec(0.0)] * 5, num_byzantine=1, m=0), "m must be"),
    ],
)
def test_robust_rules_validate(call: Callable[[], object], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        call()


# -- rooms ---------------------------------------------------------------------------

MATH_MODULES = ["staleness", "aggregate", "flush", "optimizers", "validation"]
FORBIDDEN = {"trio", "time", "logging", "socket", "asyncio", "datetime", "client", "simulations"}
FORBIDDEN_PROTOCOL = {"fedtier.protocol.bus", "fedtier.protocol.codecs"}


@pytest.mark.parametrize("module", MATH_MODULES)
def test_math_modules_import_no_io_clock_logging_or_codec(module: str) -> None:
    path = Path(__file__).resolve().parents[2] / "tiers" / f"{module}.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    roots = {name.split(".")[0] for name in imported}
    assert not roots & FORBIDDEN, f"tiers/{module}.py imports {sorted(roots & FORBIDDEN)}"
    bad = {n for n in imported if any(n == p or n.startswith(p + ".") for p in FORBIDDEN_PROTOCOL)}
    assert not bad, f"tiers/{module}.py imports {sorted(bad)}"
