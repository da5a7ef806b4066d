"""Aggregation invariants: hierarchical == flat, order independence, discounting, ids, optimizers.

Tolerance for comparing two float32 aggregates of the same updates folded in a
different order or tree shape. Both sides compute the identical float32 terms
``x_i = fl(w_i * delta_i)`` (same ``w_i``, one rounding; an upper fold with
discount 1 adds without multiplying), so they differ only in the order of
summation. Recursive summation of ``N`` terms in any order and any tree is within
``gamma_{N-1} * sum |x_i|`` of the exact sum (Higham, Accuracy and Stability of
Numerical Algorithms, 2nd ed., section 4.2; ``gamma_k = k u / (1 - k u)``,
``u = 2**-24``), so two orders are within twice that; the final division by the
same float64 ``sum n_i`` (rounded to float32) adds one rounding on each side.
Hence, per coordinate,

    |hier - flat| <= 2 * (N + 1) * u * sum_i |x_i| / sum n_i   (+ a subnormal floor)

which is what :func:`assert_same_aggregate` checks. It is tight enough to catch
any real mistake: a dropped, doubled or wrongly weighted update moves a coordinate
by ``|x_i| / sum n``, far above ``N u`` for the N <= 40 generated here.
"""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import numpy.typing as npt
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtier.tiers.aggregate import Accumulator, partial_id
from fedtier.tiers.optimizers import FedAdam, FedAvg, FedYogi
from fedtier.tiers.staleness import StalenessPolicy

SETTINGS = settings(max_examples=100, deadline=None)
U = 2.0**-24
TINY = float(np.finfo(np.float32).tiny)
POLICY = StalenessPolicy(kind="fedbuff", max_staleness=20)


class Update:
    def __init__(self, i: int, delta: npt.NDArray[np.float32], n: int, tau: int, base: int):
        self.id = i.to_bytes(16, "big")
        self.delta = delta
        self.n = n
        self.tau = tau
        self.base = base
        self.discount = POLICY.weight(tau)

    def fold_into(self, agg: Accumulator) -> None:
        agg.fold_update(
            self.id,
            self.delta,
            n_samples=self.n,
            tau=self.tau,
            discount=self.discount,
            base_version=self.base,
        )


floats32 = st.floats(
    min_value=-1e3, max_value=1e3, width=32, allow_nan=False, allow_subnormal=False
)


@st.composite
def update_sets(draw: st.DrawFn, max_updates: int = 40) -> tuple[int, list[Update]]:
    dim = draw(st.integers(1, 24))
    count = draw(st.integers(1, max_updates))
    updates = []
    for i in range(count):
        delta = draw(hnp.arrays(np.float32, dim, elements=floats32))
        n = draw(st.integers(1, 5000))
        tau = draw(st.integers(0, 20))
        base = draw(st.integers(0, 1000))
        updates.append(Update(i, delta, n, tau, base))
    return dim, updates


def flat_aggregate(dim: int, updates: list[Update]) -> Accumulator:
    agg = Accumulator(dim)
    for update in updates:
        update.fold_into(agg)
    return agg


def assert_same_aggregate(a: Accumulator, b: Accumulator, updates: list[Update]) -> None:
    terms = np.zeros(a.num_params, dtype=np.float64)
    for u in updates:
        terms += np.abs(np.float32(u.n * u.discount) * u.delta).astype(np.float64)
    n_total = sum(u.n for u in updates)
    bound = 2 * (len(updates) + 1) * U * terms / n_total + 2 * len(updates) * TINY
    diff = np.abs(a.result().astype(np.float64) - b.result().astype(np.float64))
    assert np.all(diff <= bound), f"max excess {np.max(diff - bound)}"
    assert a.sample_count == b.sample_count == n_total  # integers: exact in float64
    assert math.isclose(a.weight_sum, b.weight_sum, rel_tol=1e-12)
    assert a.update_count == b.update_count == len(updates)
    assert a.staleness_hist == b.staleness_hist
    assert sorted(a.leaf_ids) == sorted(b.leaf_ids)
    assert (a.min_base_version, a.max_base_version) == (b.min_base_version, b.max_base_version)


# Drawing an update set (up to 40 float32 vectors, element by element) is
# most of the cost of these two properties, so both are checked on each drawn
# set: each still sees 100 sets of the same strategy, with its own draws after.
@SETTINGS
@given(data=st.data(), case=update_sets())
def test_hierarchical_equals_flat_and_fold_order_does_not_matter(
    data: st.DataObject, case: tuple[int, list[Update]]
) -> None:
    _hierarchical_equals_flat_without_extra_delay(data, case)
    _fold_order_does_not_matter(data, case)


def _hierarchical_equals_flat_without_extra_delay(
    data: st.DataObject, case: tuple[int, list[Update]]
) -> None:
    dim, updates = case
    num_edges = data.draw(st.integers(1, len(updates)), label="edges")
    num_regionals = data.draw(st.integers(1, num_edges), label="regionals")
    # Every edge gets at least one update, every regional at least one edge.
    edge_of = list(range(num_edges)) + data.draw(
        st.lists(
            st.integers(0, num_edges - 1),
            min_size=len(updates) - num_edges,
            max_size=len(updates) - num_edges,
        ),
        label="edge_of",
    )
    edge_of = data.draw(st.permutations(edge_of), label="edge shuffle")
    regional_of = list(range(num_regionals)) + data.draw(
        st.lists(
            st.integers(0, num_regionals - 1),
            min_size=num_edges - num_regionals,
            max_size=num_edges - num_regionals,
        ),
        label="regional_of",
    )

    edges = [Accumulator(dim) for _ in range(num_edges)]
    for update, e in zip(updates, edge_of, strict=True):
        update.fold_into(edges[e])
    regionals = [Accumulator(dim) for _ in range(num_regionals)]
    for e, edge in enumerate(edges):
        pid = partial_id(f"edge-{e}", edge.input_ids)
        regionals[regional_of[e]].fold_child(pid, edge, extra_tau=0, discount=1.0)
    central = Accumulator(dim)
    for r, regional in enumerate(regionals):
        central.fold_child(
            partial_id(f"regional-{r}", regional.input_ids), regional, extra_tau=0, discount=1.0
        )

    assert central.input_count == num_regionals
    assert_same_aggregate(central, flat_aggregate(dim, updates), updates)


def _fold_order_does_not_matter(data: st.DataObject, case: tuple[int, list[Update]]) -> None:
    dim, updates = case
    shuffled = data.draw(st.permutations(updates), label="order")
    a, b = flat_aggregate(dim, updates), flat_aggregate(dim, shuffled)
    assert_same_aggregate(a, b, updates)
    assert partial_id("edge", a.input_ids) == partial_id("edge", b.input_ids)


@SETTINGS
@given(
    case=update_sets(max_updates=10),
    discount=st.floats(min_value=1e-3, max_value=1.0),
    extra_tau=st.integers(0, 40),
)
def test_folding_a_partial_discounts_numerator_and_weight_not_samples(
    case: tuple[int, list[Update]], discount: float, extra_tau: int
) -> None:
    dim, updates = case
    child = flat_aggregate(dim, updates)
    parent = Accumulator(dim)
    parent.fold_child(b"\xaa" * 16, child, extra_tau=extra_tau, discount=discount)
    # Into an empty parent the fold is one float32 product per value: exact to compare.
    np.testing.assert_array_equal(parent.numerator, np.float32(discount) * child.numerator)
    assert parent.sample_count == child.sample_count
    assert parent.weight_sum == discount * child.weight_sum
    assert parent.update_count == child.update_count
    assert sum(parent.staleness_hist) == child.update_count
    last = parent.hist_buckets - 1
    shifted = [0] * parent.hist_buckets
    for bucket, count in enumerate(child.staleness_hist):
        shifted[min(bucket + extra_tau, last)] += count
    assert parent.staleness_hist == shifted


ids16 = st.binary(min_size=16, max_size=16)


@SETTINGS
@given(
    ids=st.lists(ids16, min_size=1, max_size=30, unique=True),
    data=st.data(),
    sender=st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s),
)
def test_partial_id_is_order_independent_and_input_sensitive(
    ids: list[bytes], data: st.DataObject, sender: str
) -> None:
    pid = partial_id(sender, ids)
    assert len(pid) == 16
    assert partial_id(sender, data.draw(st.permutations(ids), label="order")) == pid
    # Change any single input: the id changes.
    index = data.draw(st.integers(0, len(ids) - 1), label="index")
    replacement = data.draw(ids16.filter(lambda r: r not in ids), label="replacement")
    changed = [*ids[:index], replacement, *ids[index + 1 :]]
    assert partial_id(sender, changed) != pid
    if len(ids) > 1:
        assert partial_id(sender, ids[:index] + ids[index + 1 :]) != pid
    assert partial_id(sender + "x", ids) != pid


vectors = st.integers(1, 32).flatmap(
    lambda n: st.tuples(
        hnp.arrays(np.float32, n, elements=floats32),
        hnp.arrays(
            np.float32,
            n,
            elements=st.floats(-1.0, 1.0, width=32, allow_nan=False, allow_subnormal=False),
        ),
    )
)


@SETTINGS
@given(pair=vectors)
def test_fedavg_with_lr_one_is_model_plus_aggregate(
    pair: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]],
) -> None:
    model, aggregate = pair
    np.testing.assert_array_equal(FedAvg(lr=1.0).step(model, aggregate), model + aggregate)


@SETTINGS
@given(
    pair=vectors,
    lr=st.floats(1e-4, 1.0),
    b1=st.floats(0.0, 0.99),
    b2=st.floats(0.5, 0.999),
    tau=st.floats(1e-4, 1e-1),
)
def test_adaptive_first_step_matches_hand_computation(
    pair: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]],
    lr: float,
    b1: float,
    b2: float,
    tau: float,
) -> None:
    model, aggregate = pair
    x, d = model.astype(np.float64), aggregate.astype(np.float64)
    m1 = (1 - b1) * d
    v_adam = b2 * tau**2 + (1 - b2) * d**2
    # sign() jumps where d^2 == tau^2; take it from the float32 values the optimizer
    # compares, so a tie rounded differently does not flip the reference.
    sign = np.sign(np.float32(tau**2) - np.square(aggregate)).astype(np.float64)
    v_yogi = tau**2 - (1 - b2) * d**2 * sign
    for cls, v1 in ((FedAdam, v_adam), (FedYogi, v_yogi)):
        expected = x + lr * m1 / (np.sqrt(v1) + tau)
        out = cls(lr=lr, beta1=b1, beta2=b2, tau=tau).step(model, aggregate)
        # float32 arithmetic: a few roundings relative to the step, one relative to x.
        step_size = np.abs(lr * m1 / (np.sqrt(v1) + tau))
        np.testing.assert_array_less(
            np.abs(out - expected), 1e-5 * step_size + 2e-7 * np.abs(x) + 1e-30
        )
