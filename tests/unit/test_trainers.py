"""Trainers: logistic regression learns, FedProx pulls toward the global, torch is deterministic."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch
from sklearn.datasets import make_classification

from fedtier.client.torch_state import layout_from_state_dict
from fedtier.client.trainers import NumpyLogRegTrainer, TorchTrainer, Trainer, TrainResult, make_mlp
from fedtier.protocol.errors import LayoutMismatch, LocalProtocolError


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


def test_torch_trainer_keeps_integer_buffers() -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3)
    )
    trainer = _torch_trainer(model, seed=0)
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
