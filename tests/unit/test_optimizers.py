from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from fedtier.protocol.errors import ConfigError, LocalProtocolError
from fedtier.tiers.optimizers import FedAdam, FedAvg, FedYogi, ServerOptimizer, make_optimizer


def f32(*values: float) -> npt.NDArray[np.float32]:
    return np.array(values, dtype=np.float32)


def reference_adaptive(
    kind: str,
    model: npt.NDArray[np.float64],
    deltas: list[npt.NDArray[np.float64]],
    lr: float,
    b1: float,
    b2: float,
    tau: float,
) -> npt.NDArray[np.float64]:
    """Reddi et al. 2021, Algorithm 2, in float64, one line per equation."""
    x = model.astype(np.float64)
    m = np.zeros_like(x)
    v = np.full_like(x, tau**2)
    for d in deltas:
        m = b1 * m + (1 - b1) * d
        if kind == "adam":
            v = b2 * v + (1 - b2) * d**2
        else:
            v = v - (1 - b2) * d**2 * np.sign(v - d**2)
        x = x + lr * m / (np.sqrt(v) + tau)
    return x


def test_fedavg_lr_one_is_model_plus_aggregate() -> None:
    model, agg = f32(1.0, 2.0, 3.0), f32(0.5, -1.0, 0.25)
    out = FedAvg().step(model, agg)
    np.testing.assert_array_equal(out, model + agg)
    assert out.dtype == np.float32


def test_fedavg_server_learning_rate() -> None:
    out = FedAvg(lr=0.5).step(f32(1.0, 2.0), f32(2.0, -4.0))
    np.testing.assert_array_equal(out, f32(2.0, 0.0))


@pytest.mark.parametrize("optimizer", [FedAvg(), FedAdam(), FedYogi()])
def test_step_does_not_write_its_inputs(optimizer: ServerOptimizer) -> None:
    model, agg = f32(1.0, 2.0), f32(0.1, -0.2)
    model_before, agg_before = model.copy(), agg.copy()
    out = optimizer.step(model, agg)
    np.testing.assert_array_equal(model, model_before)
    np.testing.assert_array_equal(agg, agg_before)
    assert not np.shares_memory(out, model)
    assert isinstance(optimizer, ServerOptimizer)


def test_fedadam_first_step_by_hand() -> None:
    lr, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    delta = 0.02
    m1 = (1 - b1) * delta  # 0.002
    v1 = b2 * tau**2 + (1 - b2) * delta**2  # 0.99e-6 + 4e-6
    expected = 1.0 + lr * m1 / (np.sqrt(v1) + tau)
    out = FedAdam(lr=lr, beta1=b1, beta2=b2, tau=tau).step(f32(1.0), f32(delta))
    assert out[0] == pytest.approx(expected, rel=1e-6)


def test_fedyogi_first_step_by_hand() -> None:
    lr, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    big, small = 0.02, 0.0005  # delta^2 above and below v0 = tau^2
    # Yogi: v1 = v0 - (1 - b2) d^2 sign(v0 - d^2)
    v_big = tau**2 + (1 - b2) * big**2
    v_small = tau**2 - (1 - b2) * small**2
    expected = [
        lr * (1 - b1) * big / (np.sqrt(v_big) + tau),
        lr * (1 - b1) * small / (np.sqrt(v_small) + tau),
    ]
    out = FedYogi(lr=lr, beta1=b1, beta2=b2, tau=tau).step(f32(0.0, 0.0), f32(big, small))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize(("kind", "cls"), [("adam", FedAdam), ("yogi", FedYogi)])
def test_adaptive_matches_reference_over_several_steps(kind: str, cls: type[FedAdam]) -> None:
    rng = np.random.default_rng(4)
    model = rng.standard_normal(64).astype(np.float32)
    deltas = [
        (rng.standard_normal(64) * 10.0 ** rng.uniform(-4, -1)).astype(np.float32) for _ in range(6)
    ]
    optimizer = cls(lr=0.05, beta1=0.8, beta2=0.95, tau=1e-2)
    x = model
    for d in deltas:
        x = optimizer.step(x, d)
    expected = reference_adaptive(
        kind,
        model.astype(np.float64),
        [d.astype(np.float64) for d in deltas],
        0.05,
        0.8,
        0.95,
        1e-2,
    )
    np.testing.assert_allclose(x, expected, rtol=2e-5, atol=1e-6)
    assert optimizer.steps == 6


def test_adam_and_yogi_differ_once_delta_squared_exceeds_v() -> None:
    model, big = f32(0.0), f32(1.0)
    assert FedAdam().step(model, big)[0] != FedYogi().step(model, big)[0]


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_state_round_trip_continues_identically(cls: type[FedAdam]) -> None:
    rng = np.random.default_rng(5)
    model = rng.standard_normal(10).astype(np.float32)
    deltas = [rng.standard_normal(10).astype(np.float32) * 0.01 for _ in range(3)]
    first = cls()
    assert first.state_arrays() == {}
    x = first.step(model, deltas[0])
    x = first.step(x, deltas[1])
    saved = first.state_arrays()
    assert set(saved) == {"m", "v", "steps"}
    assert saved["m"].dtype == np.float32
    assert int(saved["steps"]) == 2
    saved["m"][:] = 123.0  # a copy: the optimizer's own state is untouched

    second = cls()
    second.load_state_arrays(first.state_arrays())
    np.testing.assert_array_equal(first.step(x, deltas[2]), second.step(x, deltas[2]))
    second.load_state_arrays({})
    assert second.steps == 0
    assert second.state_arrays() == {}


@pytest.mark.parametrize(
    "arrays",
    [
        {"m": f32(0.0)},
        {"m": f32(0.0), "v": f32(0.0), "steps": np.array(1), "extra": f32(0.0)},
        {"m": f32(0.0, 1.0), "v": f32(0.0), "steps": np.array(1)},
        {"m": np.zeros(1), "v": f32(0.0), "steps": np.array(1)},
        {"m": f32(0.0), "v": f32(-1.0), "steps": np.array(1)},
        {"m": f32(0.0), "v": f32(np.nan), "steps": np.array(1)},
        {"m": f32(0.0), "v": f32(0.0), "steps": np.array([1])},
        {"m": f32(0.0), "v": f32(0.0), "steps": np.array(1.0)},
        {"m": f32(0.0), "v": f32(0.0), "steps": np.array(-1)},
    ],
)
def test_load_state_validates(arrays: dict[str, npt.NDArray[np.generic]]) -> None:
    with pytest.raises(LocalProtocolError):
        FedAdam().load_state_arrays(arrays)


def test_fedavg_state_is_empty() -> None:
    FedAvg().load_state_arrays({})
    with pytest.raises(LocalProtocolError):
        FedAvg().load_state_arrays({"m": f32(1.0)})


@pytest.mark.parametrize("optimizer", [FedAvg(), FedAdam()])
@pytest.mark.parametrize(
    ("model", "agg"),
    [
        (f32(1.0, 2.0), f32(1.0)),
        (np.zeros(2), np.zeros(2, dtype=np.float32)),
        (np.zeros((1, 2), dtype=np.float32), np.zeros((1, 2), dtype=np.float32)),
    ],
)
def test_step_rejects_bad_vectors(
    optimizer: ServerOptimizer, model: npt.NDArray[np.generic], agg: npt.NDArray[np.generic]
) -> None:
    with pytest.raises(LocalProtocolError):
        optimizer.step(model, agg)  # type: ignore[arg-type]  # float64 and 2-D on purpose


def test_adaptive_state_size_is_fixed_after_first_step() -> None:
    optimizer = FedYogi()
    optimizer.step(f32(0.0, 0.0), f32(0.1, 0.1))
    with pytest.raises(LocalProtocolError, match="optimizer state has 2"):
        optimizer.step(f32(0.0), f32(0.1))


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": 0.0}, {"lr": float("nan")}, {"beta1": 1.0}, {"beta2": -0.1}, {"tau": 0.0}],
)
def test_adaptive_parameters_validate(kwargs: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError):
        FedAdam(**kwargs)


def test_make_optimizer() -> None:
    assert isinstance(make_optimizer("fedavg"), FedAvg)
    assert make_optimizer("fedavg", lr=2).lr == 2.0  # type: ignore[attr-defined]
    adam = make_optimizer("fedadam", lr=0.1, beta1=0.5, beta2=0.9, tau=1e-4)
    assert isinstance(adam, FedAdam)
    assert (adam.lr, adam.beta1, adam.beta2, adam.tau) == (0.1, 0.5, 0.9, 1e-4)
    yogi = make_optimizer("fedyogi")
    assert isinstance(yogi, FedYogi)
    assert yogi.name == "fedyogi"
    assert (yogi.lr, yogi.beta1, yogi.beta2, yogi.tau) == (1e-2, 0.9, 0.99, 1e-3)


@pytest.mark.parametrize(
    ("name", "params", "needle"),
    [
        ("fedprox", {}, "'fedprox' is unknown"),
        ("FedAvg", {}, "'FedAvg' is unknown"),
        ("fedavg", {"beta1": 0.9}, "no parameter 'beta1'"),
        ("fedadam", {"eta": 0.1}, "no parameter 'eta'"),
        ("fedadam", {"lr": "0.1"}, "lr is '0.1'"),
        ("fedadam", {"lr": True}, "lr is True"),
        ("fedyogi", {"beta2": 1.5}, "beta2 must be in"),
    ],
)
def test_make_optimizer_config_errors(name: str, params: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        make_optimizer(name, **params)
