"""Trainers: logistic regression learns, FedProx pulls toward the global, torch is deterministic.

The general torch trainer: persistent optimizer state, Adam/AdamW, schedules,
weight decay, clipping, batches that BatchNorm can train on, custom losses and
metrics, regression, the device choice, validation and the FedBN tensor policy.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch
from sklearn.datasets import make_classification

from fedtier.client.torch_state import (
    flat_for_module,
    layout_for_module,
    layout_from_state_dict,
    load_into_module,
    local_tensor_names,
)
from fedtier.client.torch_trainer import TorchTrainer, make_mlp, resolve_device
from fedtier.client.trainers import (
    BUILTIN_METRICS,
    LrSchedule,
    NumpyLogRegTrainer,
    Trainer,
    TrainResult,
    ValidatingTrainer,
    resolve_metrics,
)
from fedtier.protocol.errors import ConfigError, LayoutMismatch, LocalProtocolError


def _data(
    n: int = 300, features: int = 8, classes: int = 3, seed: int = 0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    X, y = make_classification(
        n_samples=n,
        n_features=features,
        n_informative=6,
        n_redundant=0,
        n_classes=classes,
        class_sep=2.0,
        random_state=seed,
    )
    return X.astype(np.float32), y.astype(np.int64)


def test_logreg_learns_a_separable_problem() -> None:
    X, y = _data()
    trainer = NumpyLogRegTrainer(8, 3, X, y, epochs=5, batch_size=16, lr=0.2, seed=1)
    assert isinstance(trainer, Trainer)
    start = trainer.initial_params()
    before = trainer.evaluate(start, X, y)
    result = trainer.train(start)
    after = trainer.evaluate(result.params, X, y)
    assert isinstance(result, TrainResult)
    assert result.params.dtype == np.float32
    assert result.params.shape == (trainer.layout.num_params,)
    assert result.n_samples == 300
    assert after["accuracy"] > 0.8  # chance is 1/3
    assert after["loss"] < before["loss"]
    assert set(result.metrics) == {"loss", "accuracy", "steps"}
    assert result.metrics["steps"] == 5 * 19
    assert np.array_equal(start, np.zeros_like(start))  # input untouched


def test_logreg_layout_names_weight_then_bias() -> None:
    X, y = _data()
    trainer = NumpyLogRegTrainer(8, 3, X, y, seed=0)
    assert [(t.name, t.shape) for t in trainer.layout.tensors] == [
        ("weight", (3, 8)),
        ("bias", (3,)),
    ]


def test_logreg_is_deterministic_given_the_seed() -> None:
    X, y = _data()
    a = NumpyLogRegTrainer(8, 3, X, y, seed=7)
    b = NumpyLogRegTrainer(8, 3, X, y, seed=7)
    start = a.initial_params()
    assert np.array_equal(a.train(start).params, b.train(start).params)
    assert np.array_equal(a.train(start).params, b.train(start).params)


def test_fedprox_mu_pulls_toward_the_global_model() -> None:
    X, y = _data()
    rng = np.random.default_rng(3)
    global_params = rng.normal(0, 1, 3 * 8 + 3).astype(np.float32)
    distances = []
    for mu in (0.0, 1.0, 10.0):
        trainer = NumpyLogRegTrainer(8, 3, X, y, epochs=3, lr=0.05, mu=mu, seed=0)
        params = trainer.train(global_params).params
        distances.append(float(np.linalg.norm(params - global_params)))
    assert distances[0] > distances[1] > distances[2]


def test_partial_work_caps_the_steps() -> None:
    X, y = _data()
    trainer = NumpyLogRegTrainer(8, 3, X, y, epochs=2, batch_size=10, max_local_steps=7, seed=0)
    start = trainer.initial_params()
    assert trainer.train(start).metrics["steps"] == 7
    assert trainer.train(start, max_steps=3).metrics["steps"] == 3
    fraction = NumpyLogRegTrainer(8, 3, X, y, epochs=0.5, batch_size=10, seed=0)
    assert fraction.train(start).metrics["steps"] == 15


def test_logreg_rejects_bad_arguments() -> None:
    X, y = _data()
    with pytest.raises(LocalProtocolError):
        NumpyLogRegTrainer(8, 3, X, y + 5)
    with pytest.raises(LocalProtocolError):
        NumpyLogRegTrainer(9, 3, X, y)
    trainer = NumpyLogRegTrainer(8, 3, X, y)
    with pytest.raises(LayoutMismatch):
        trainer.train(np.zeros(5, np.float32))


def _torch_trainer(model: torch.nn.Module, seed: int, mu: float = 0.0) -> TorchTrainer:
    X, y = _data(n=120)
    return TorchTrainer(model, X, y, epochs=1, batch_size=16, lr=0.05, seed=seed, mu=mu)


def test_torch_trainer_changes_params_and_is_deterministic() -> None:
    a = _torch_trainer(make_mlp(8, 16, 3, seed=0), seed=5)
    b = _torch_trainer(make_mlp(8, 16, 3, seed=0), seed=5)
    start = a.initial_params()
    assert np.array_equal(start, b.initial_params())
    ra, rb = a.train(start), b.train(start)
    assert not np.array_equal(ra.params, start)
    assert np.array_equal(ra.params, rb.params)
    assert ra.n_samples == 120
    assert ra.metrics["loss"] > 0
    other = _torch_trainer(make_mlp(8, 16, 3, seed=0), seed=6).train(start)
    assert not np.array_equal(other.params, ra.params)


def test_torch_trainer_learns() -> None:
    X, y = _data(n=200)
    trainer = TorchTrainer(
        make_mlp(8, 16, 3, seed=1), X, y, epochs=10, batch_size=16, lr=0.1, momentum=0.5, seed=0
    )
    start = trainer.initial_params()
    params = trainer.train(start).params
    assert trainer.evaluate(params, X, y)["accuracy"] > 0.8


def test_torch_fedprox_pulls_toward_the_global_model() -> None:
    start = make_mlp(8, 16, 3, seed=0)
    global_params = _torch_trainer(start, seed=0).initial_params()
    free = _torch_trainer(make_mlp(8, 16, 3), seed=0, mu=0.0).train(global_params).params
    prox = _torch_trainer(make_mlp(8, 16, 3), seed=0, mu=5.0).train(global_params).params
    assert np.linalg.norm(prox - global_params) < np.linalg.norm(free - global_params)


def _bn_model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3)
    )


def test_torch_trainer_keeps_integer_buffers() -> None:
    model = _bn_model()
    X, y = _data(n=120)
    trainer = TorchTrainer(model, X, y, batch_size=16, lr=0.05, batchnorm="global")
    names = [t.name for t in trainer.layout.tensors]
    assert "1.num_batches_tracked" not in names
    assert "1.running_mean" in names
    assert trainer.layout == layout_from_state_dict(model.state_dict())
    start = trainer.initial_params()
    trainer.train(start)
    counter = model.state_dict()["1.num_batches_tracked"]
    assert counter.dtype == torch.int64
    assert int(counter) == 8  # one per SGD step: ceil(120 / 16)
    trainer.train(start)
    assert int(model.state_dict()["1.num_batches_tracked"]) == 16


# -- the per-tensor policy (FedBN) ---------------------------------------------------


def test_fedbn_keeps_batchnorm_out_of_the_layout_and_unchanged_by_a_load() -> None:
    model = _bn_model()
    layout = layout_for_module(model)  # batchnorm="local" is the default
    names = [t.name for t in layout.tensors]
    assert names == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert local_tensor_names(model) == {
        "1.weight",
        "1.bias",
        "1.running_mean",
        "1.running_var",
    }
    with torch.no_grad():  # state_dict tensors share the module's storage
        model.state_dict()["1.weight"].fill_(3.0)
        model.state_dict()["1.running_mean"].fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.all(before["1.weight"] == 3.0)
    load_into_module(model, layout, np.full(layout.num_params, 0.25, np.float32))
    after = model.state_dict()
    for name in ("1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert torch.equal(after[name], before[name]), name
    assert torch.all(after["0.weight"] == 0.25)
    assert np.all(flat_for_module(model, layout) == 0.25)


def test_fedbn_training_keeps_local_batchnorm_across_rounds() -> None:
    X, y = _data(n=64)
    trainer = TorchTrainer(_bn_model(), X, y, batch_size=16, lr=0.05)
    start = trainer.initial_params()
    trainer.train(start)
    trained_mean = trainer.model.state_dict()["1.running_mean"].clone()
    assert not torch.all(trained_mean == 0)
    # The next global model does not carry BatchNorm: the device's own stays.
    trainer.evaluate(start, X, y)
    assert torch.equal(trainer.model.state_dict()["1.running_mean"], trained_mean)


def test_local_patterns_keep_tensors_and_a_typo_is_an_error() -> None:
    model = make_mlp(8, 16, 3, seed=0)
    layout = layout_for_module(model, local=["2.*"])
    assert [t.name for t in layout.tensors] == ["0.weight", "0.bias"]
    with pytest.raises(ConfigError, match=r"pattern 'head\.\*' matches none"):
        layout_for_module(model, local=["head.*"])
    with pytest.raises(ConfigError, match="nothing would be aggregated"):
        layout_for_module(model, local=["*"])
    with pytest.raises(ConfigError, match="batchnorm"):
        layout_for_module(model, batchnorm="sometimes")  # type: ignore[arg-type]


# -- optimizer state, optimizers, schedules ------------------------------------------


def _pair(**options: Any) -> tuple[TorchTrainer, TorchTrainer]:
    X, y = _data(n=96)

    def make(keep: bool) -> TorchTrainer:
        return TorchTrainer(
            make_mlp(8, 16, 3, seed=0), X, y, batch_size=16, lr=0.05, seed=3,
            keep_optimizer_state=keep, **options,
        )  # fmt: skip

    return make(True), make(False)


@pytest.mark.parametrize("options", [{"momentum": 0.9}, {"optimizer": "adam"}])
def test_optimizer_state_persists_across_rounds(options: dict[str, Any]) -> None:
    kept, reset = _pair(**options)
    start = kept.initial_params()
    first_kept, first_reset = kept.train(start), reset.train(start)
    assert np.array_equal(first_kept.params, first_reset.params)  # same first round
    # Round 2 starts from the same global model; only the optimizer state differs.
    second_kept, second_reset = kept.train(start), reset.train(start)
    assert not np.allclose(second_kept.params, second_reset.params)
    # A reset optimizer repeats round 1 exactly when the data order repeats it.
    fresh = _pair(**options)[1]
    fresh.train(start)
    assert np.array_equal(fresh.train(start).params, second_reset.params)


def test_plain_sgd_without_momentum_has_no_state_to_keep() -> None:
    kept, reset = _pair()
    start = kept.initial_params()
    kept.train(start), reset.train(start)
    assert np.array_equal(kept.train(start).params, reset.train(start).params)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_adam_and_adamw_learn(optimizer: str) -> None:
    X, y = _data(n=200)
    trainer = TorchTrainer(
        make_mlp(8, 16, 3, seed=1), X, y, epochs=5, batch_size=16, lr=0.01,
        optimizer=optimizer, weight_decay=1e-4,  # type: ignore[arg-type]
    )  # fmt: skip
    params = trainer.train(trainer.initial_params()).params
    assert trainer.evaluate(params, X, y)["accuracy"] > 0.8


def test_weight_decay_shrinks_the_weights() -> None:
    X, y = _data(n=96)
    norms = []
    for decay in (0.0, 0.5):
        trainer = TorchTrainer(
            make_mlp(8, 16, 3, seed=0), X, y, epochs=3, lr=0.05, weight_decay=decay
        )
        norms.append(float(np.linalg.norm(trainer.train(trainer.initial_params()).params)))
    assert norms[1] < 0.9 * norms[0]


def test_gradient_clipping_bounds_each_step() -> None:
    X, y = _data(n=64)
    clip, lr = 1e-3, 0.1
    clipped = TorchTrainer(make_mlp(8, 16, 3, seed=0), X, y, batch_size=16, lr=lr, grad_clip=clip)
    free = TorchTrainer(make_mlp(8, 16, 3, seed=0), X, y, batch_size=16, lr=lr)
    start = clipped.initial_params()
    result = clipped.train(start)
    moved = float(np.linalg.norm(result.params - start))
    assert 0 < moved <= result.metrics["steps"] * lr * clip * 1.001
    assert float(np.linalg.norm(free.train(start).params - start)) > 10 * moved


def test_lr_schedules() -> None:
    assert LrSchedule().lr_at(0.1, 99) == 0.1
    step = LrSchedule("step", step_rounds=2, gamma=0.5)
    assert [step.lr_at(1.0, r) for r in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    cosine = LrSchedule("cosine", period_rounds=4, min_lr=0.1)
    values = [cosine.lr_at(1.0, r) for r in range(5)]
    assert values[0] == 1.0
    assert values[4] == 1.0
    assert values[2] == pytest.approx(0.55)
    assert values[0] > values[1] > values[2] > values[3] > 0.1
    with pytest.raises(LocalProtocolError, match="kind"):
        LrSchedule("linear")  # type: ignore[arg-type]


def test_the_schedule_advances_once_per_round() -> None:
    X, y = _data(n=32)
    trainer = TorchTrainer(
        make_mlp(8, 16, 3, seed=0), X, y, lr=0.2,
        lr_schedule=LrSchedule("step", step_rounds=1, gamma=0.5),
    )  # fmt: skip
    start = trainer.initial_params()
    assert [trainer.train(start).metrics["lr"] for _ in range(3)] == [0.2, 0.1, 0.05]
    assert trainer.rounds_trained == 3


# -- batches -------------------------------------------------------------------------


def test_batchnorm_trains_when_the_last_batch_has_one_example() -> None:
    X, y = _data(n=17)  # 16 + 1
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        # The old behaviour: a batch of one crashes BatchNorm's training pass.
        TorchTrainer(_bn_model(), X, y, batch_size=16, min_batch=1).train(
            TorchTrainer(_bn_model(), X, y).initial_params()
        )
    merged = TorchTrainer(_bn_model(), X, y, batch_size=16)  # min_batch 2 for BatchNorm
    assert merged.min_batch == 2
    result = merged.train(merged.initial_params())
    assert result.metrics["steps"] == 1  # the one-example remainder joined the batch before it
    assert math.isfinite(result.metrics["loss"])
    dropped = TorchTrainer(_bn_model(), X, y, batch_size=16, drop_last=True, epochs=3)
    assert dropped.train(dropped.initial_params()).metrics["steps"] == 3
    with pytest.raises(LocalProtocolError, match="a batch of 1, below min_batch 2"):
        TorchTrainer(_bn_model(), X[:1], y[:1])


def test_without_batchnorm_the_batches_are_as_before() -> None:
    X, y = _data(n=17)
    trainer = TorchTrainer(make_mlp(8, 4, 3, seed=0), X, y, batch_size=16)
    assert trainer.min_batch == 1
    assert trainer.train(trainer.initial_params()).metrics["steps"] == 2


# -- losses, metrics, regression -----------------------------------------------------


def _regression(n: int = 400, seed: int = 0) -> tuple[npt.NDArray[np.float32], ...]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)).astype(np.float32)
    w = np.array([1.5, -2.0, 0.5, 0.0, 3.0], np.float32)
    y = (X @ w + 0.05 * rng.normal(size=n)).astype(np.float32)
    return X, y


def test_regression_learns_a_linear_target() -> None:
    X, y = _regression()
    torch.manual_seed(0)
    trainer = TorchTrainer(
        torch.nn.Linear(5, 1), X, y, epochs=20, batch_size=32, lr=0.05, optimizer="sgd"
    )
    assert trainer.task == "regression"  # float targets
    result = trainer.train(trainer.initial_params())
    assert set(result.metrics) == {"loss", "steps", "r2"}
    scores = trainer.evaluate(result.params, *_regression(seed=1))
    assert scores["r2"] > 0.9
    assert scores["loss"] < 0.1 * float(np.var(y))


def test_a_custom_loss_and_custom_metrics_flow_into_the_result() -> None:
    X, y = _regression(n=64)
    seen: list[tuple[int, ...]] = []

    def l1(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out.squeeze(-1) - target).abs().mean()

    def mean_pred(pred: npt.NDArray[np.float32], truth: npt.NDArray[Any]) -> float:
        seen.append(pred.shape)
        return float(pred.mean())

    trainer = TorchTrainer(
        torch.nn.Linear(5, 1), X, y, batch_size=16, lr=0.01, task="regression", loss=l1,
        metrics={"mean_pred": mean_pred},
    )  # fmt: skip
    result = trainer.train(trainer.initial_params())
    assert seen == [(64,)]  # every prediction of the call, one-output squeezed
    assert set(result.metrics) == {"loss", "steps", "r2", "mean_pred"}
    scores = trainer.evaluate(result.params, X, y)
    weight, bias = result.params[:5], result.params[5]  # layout: weight (1, 5), bias (1,)
    assert scores["loss"] == pytest.approx(float(np.abs(X @ weight + bias - y).mean()), rel=1e-4)
    assert scores["mean_pred"] == pytest.approx(float((X @ weight + bias).mean()), rel=1e-4)


def test_metrics_by_name_and_by_import_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "h10a_metrics_mod.py").write_text("def half(pred, y):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    resolved = resolve_metrics(["mae", "h10a_metrics_mod:half"])
    assert resolved["mae"] is BUILTIN_METRICS["mae"]
    assert resolved["half"](np.zeros(1, np.float32), np.zeros(1)) == 0.5
    with pytest.raises(ConfigError, match="'f1' is neither a built-in"):
        resolve_metrics(["f1"])
    sys.modules.pop("h10a_metrics_mod", None)


def test_builtin_metric_values() -> None:
    pred = np.array([1.0, 2.0, 3.0], np.float32)
    truth = np.array([1.0, 2.0, 5.0], np.float32)
    assert BUILTIN_METRICS["mse"](pred, truth) == pytest.approx(4 / 3)
    assert BUILTIN_METRICS["mae"](pred, truth) == pytest.approx(2 / 3)
    assert BUILTIN_METRICS["r2"](truth, truth) == 1.0
    logits = np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    assert BUILTIN_METRICS["accuracy"](logits, np.array([1, 1])) == 0.5


def test_the_loss_must_fit_the_task() -> None:
    X, y = _regression(n=8)
    with pytest.raises(LocalProtocolError, match="cross_entropy does not fit a regression"):
        TorchTrainer(torch.nn.Linear(5, 1), X, y, task="regression", loss="cross_entropy")
    with pytest.raises(LocalProtocolError, match="fractional"):
        TorchTrainer(torch.nn.Linear(5, 2), X, y, task="classification")
    with pytest.raises(LocalProtocolError, match="momentum is for sgd"):
        TorchTrainer(torch.nn.Linear(5, 1), X, y, optimizer="adam", momentum=0.9)


# -- device --------------------------------------------------------------------------


def test_auto_picks_the_cpu_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    X, y = _data(n=32)
    trainer = TorchTrainer(make_mlp(8, 4, 3, seed=0), X, y, device="auto")
    assert trainer.device == torch.device("cpu")
    result = trainer.train(trainer.initial_params())
    assert result.params.dtype == np.float32
    with pytest.raises(LocalProtocolError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(LocalProtocolError, match="expected 'auto'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.gpu
def test_the_gpu_gives_the_same_update_format() -> None:
    # Deselected by default (pyproject: -m "not gpu"); on a machine with a GPU:
    # pytest -m gpu tests/unit/test_trainers.py. Asked for without one, it fails.
    assert torch.cuda.is_available(), "pytest -m gpu was asked for, but torch sees no CUDA GPU"
    X, y = _data(n=64)
    gpu = TorchTrainer(make_mlp(8, 16, 3, seed=0), X, y, device="cuda", momentum=0.9)
    cpu = TorchTrainer(make_mlp(8, 16, 3, seed=0), X, y, device="cpu", momentum=0.9)
    start = cpu.initial_params()
    assert np.array_equal(gpu.initial_params(), start)
    assert gpu.layout == cpu.layout
    on_gpu, on_cpu = gpu.train(start), cpu.train(start)
    assert on_gpu.params.dtype == np.float32
    assert on_gpu.params.shape == on_cpu.params.shape
    assert np.allclose(on_gpu.params, on_cpu.params, atol=1e-4)
    assert next(gpu.model.parameters()).is_cuda


# -- validation, evaluate-only trainers ----------------------------------------------


def test_validation_metrics_join_the_training_metrics() -> None:
    X, y = _data(n=200)
    inner = NumpyLogRegTrainer(8, 3, X[:150], y[:150], epochs=3, lr=0.2)
    trainer = ValidatingTrainer(inner, X[150:], y[150:])
    assert isinstance(trainer, Trainer)
    result = trainer.train(inner.initial_params())
    assert {"val_loss", "val_accuracy", "loss", "accuracy"} <= set(result.metrics)
    direct = inner.evaluate(result.params, X[150:], y[150:])
    assert result.metrics["val_accuracy"] == direct["accuracy"]
    assert trainer.train(inner.initial_params(), max_steps=1).metrics["steps"] == 1


def test_a_trainer_without_data_evaluates_but_does_not_train() -> None:
    X, y = _data(n=32)
    for trainer in (NumpyLogRegTrainer(8, 3), TorchTrainer(make_mlp(8, 4, 3, seed=0))):
        params = np.zeros(trainer.layout.num_params, np.float32)
        assert set(trainer.evaluate(params, X, y)) >= {"loss", "accuracy"}
        with pytest.raises(LocalProtocolError, match="can only evaluate"):
            trainer.train(params)


def test_the_torch_names_still_resolve_from_client_trainers() -> None:
    # Code written before TorchTrainer moved to client.torch_trainer keeps working.
    from fedtier.client import torch_trainer, trainers

    assert trainers.TorchTrainer is torch_trainer.TorchTrainer
    assert trainers.make_mlp is torch_trainer.make_mlp
    assert trainers.resolve_device is torch_trainer.resolve_device
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        trainers.nothing_here  # noqa: B018
