"""Scoring a model version's flat parameters on held-out data; imports protocol and client only.

Never imports tiers or simulations, and torch only when the model is a torch
module. The central's evaluator (``[evaluation]`` of its config, wired in by
``fedtier central``) and ``fedtier model`` use it; a device can too.

The model is named as everywhere else (``fedtier.client.plugins``): a built-in
or a factory returning a ``torch.nn.Module`` or a ``Trainer``. The version's
layout says which tensors it carries; they are loaded into the module and the
rest (tensors that stay on devices, such as FedBN's BatchNorm statistics) keep
the factory's initial values, since the central never sees the devices' own.

Metrics, from the model's outputs on the whole held-out set:

* classification: ``accuracy`` (argmax of the logits; one logit means a binary
  classifier, positive when > 0) and ``loss`` (mean cross-entropy);
* regression: ``r2`` (1 - SS_res / SS_tot; 1.0 for a perfect fit of constant
  targets, else 0.0 when the targets are constant), ``mse``, ``rmse``, ``mae``
  and ``loss`` (= ``mse``).

A ``Trainer`` that is not a torch module is asked through ``predict(params, X)``
when it has one, otherwise through ``evaluate(params, X, y)`` (whose keys must
then include every metric asked for).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TypeGuard

import numpy as np
import numpy.typing as npt

from fedtier.client.trainers import BUILTIN_METRICS
from fedtier.protocol.errors import ConfigError, LayoutMismatch
from fedtier.protocol.layout import ModelLayout

if TYPE_CHECKING:
    import torch

    from fedtier.client.plugins import Dataset

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "HeldOutEvaluator",
    "evaluate_params",
    "make_evaluator",
    "metrics_from_outputs",
    "predict",
]

Task = Literal["classification", "regression"]

METRICS: Final[Mapping[str, frozenset[Task]]] = {
    "accuracy": frozenset({"classification"}),
    "loss": frozenset({"classification", "regression"}),
    "r2": frozenset({"regression"}),
    "mse": frozenset({"regression"}),
    "rmse": frozenset({"regression"}),
    "mae": frozenset({"regression"}),
}
"""Every metric this module computes, and the tasks it applies to."""

DEFAULT_METRICS: Final[Mapping[Task, tuple[str, ...]]] = {
    "classification": ("accuracy", "loss"),
    "regression": ("r2", "mse"),
}

_BATCH: Final = 4096  # rows per forward pass: bounded memory on a large held-out set

F32Array = npt.NDArray[np.float32]


def _is_torch_module(obj: object) -> TypeGuard[torch.nn.Module]:
    # torch is imported already if a factory built a module: never import it here.
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def predict(
    model: object, params: F32Array, layout: ModelLayout, X: npt.NDArray[np.generic]
) -> npt.NDArray[np.float64]:
    """The outputs of ``model`` with the version's ``params`` loaded, for the rows of ``X``.

    Args:
        model: a ``torch.nn.Module`` (its layout tensors are overwritten) or a
            trainer with ``predict(params, X)``.
        params: the version's flat float32 vector.
        layout: the version's layout (which tensors ``params`` holds).
        X: inputs, shape ``(n, ...)``.

    Returns:
        float64 outputs, shape ``(n,)`` or ``(n, k)`` (logits for a classifier).

    Raises:
        LayoutMismatch: the model lacks a tensor of the layout or it has another shape.
        ConfigError: the model can neither run forward nor predict.
    """
    if _is_torch_module(model):
        return _predict_torch(model, params, layout, X)
    predict_fn = getattr(model, "predict", None)
    if callable(predict_fn):
        _check_trainer_layout(model, layout)
        return np.asarray(predict_fn(params, X), dtype=np.float64)
    raise ConfigError(
        f"model {type(model).__name__} is neither a torch module nor a trainer with predict()"
    )


def _predict_torch(
    module: torch.nn.Module, params: F32Array, layout: ModelLayout, X: npt.NDArray[np.generic]
) -> npt.NDArray[np.float64]:
    import torch

    from fedtier.client.torch_state import load_into_module

    load_into_module(module, layout, np.asarray(params, dtype=np.float32))
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    xs = np.ascontiguousarray(X, dtype=np.float32)
    outs: list[npt.NDArray[np.float64]] = []
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for start in range(0, xs.shape[0], _BATCH):
                batch = torch.from_numpy(xs[start : start + _BATCH]).to(device=device, dtype=dtype)
                out = module(batch)
                outs.append(out.detach().to(device="cpu", dtype=torch.float64).numpy())
    finally:
        module.train(was_training)
    return np.concatenate(outs, axis=0)


def _check_trainer_layout(trainer: object, layout: ModelLayout) -> None:
    own = getattr(trainer, "layout", None)
    if isinstance(own, ModelLayout) and own.fingerprint != layout.fingerprint:
        raise LayoutMismatch(
            f"the model's layout {own.fingerprint.hex()} ({own.num_params} values) is not the "
            f"version's {layout.fingerprint.hex()} ({layout.num_params} values)"
        )


def metrics_from_outputs(
    outputs: npt.NDArray[np.floating],
    y: npt.NDArray[np.generic],
    task: Task,
    names: Sequence[str],
) -> dict[str, float]:
    """The metrics ``names`` of model ``outputs`` against the targets ``y``.

    Raises:
        ConfigError: a metric does not apply to ``task``, or the outputs'
            shape does not fit the task.
    """
    _check_names(names, task)
    n = int(y.shape[0])
    out = np.asarray(outputs, dtype=np.float64)
    if out.shape[0] != n:
        raise ConfigError(f"the model returned {out.shape[0]} outputs for {n} examples")
    if task == "classification":
        return _classification(out, np.asarray(y).astype(np.int64), names)
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim != 1:
        raise ConfigError(
            f"a regression model must return one value per example; it returned {out.shape}"
        )
    return _regression(out, np.asarray(y, dtype=np.float64), names)


def _check_names(names: Sequence[str], task: Task) -> None:
    for name in names:
        tasks = METRICS.get(name)
        if tasks is None:
            raise ConfigError(f"metric {name!r} is not one of {', '.join(METRICS)}")
        if task not in tasks:
            raise ConfigError(f"metric {name!r} does not apply to {task}")


def _classification(
    out: npt.NDArray[np.float64], y: npt.NDArray[np.int64], names: Sequence[str]
) -> dict[str, float]:
    if out.ndim == 2 and out.shape[1] == 1:
        out = out[:, 0]
    if out.ndim == 1:  # one logit: a binary classifier
        predicted = (out > 0).astype(np.int64)
        # log(1 + e^-|z|) + max(z, 0) - y z: the stable binary cross-entropy of a logit.
        loss = np.logaddexp(0.0, -np.abs(out)) + np.maximum(out, 0.0) - y * out
    elif out.ndim == 2:
        if int(y.max()) >= out.shape[1]:
            raise ConfigError(
                f"the data has class {int(y.max())}; the model returns {out.shape[1]} logits"
            )
        predicted = out.argmax(axis=1)
        shifted = out - out.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1))
        loss = log_norm - shifted[np.arange(out.shape[0]), y]
    else:
        raise ConfigError(f"a classifier must return logits of shape (n, C); got {out.shape}")
    values = {"accuracy": float((predicted == y).mean()), "loss": float(loss.mean())}
    return {name: values[name] for name in names}


def _regression(
    pred: npt.NDArray[np.float64], y: npt.NDArray[np.float64], names: Sequence[str]
) -> dict[str, float]:
    # The trainers' metric functions: a device's val_r2 and the central's r2 are
    # one computation. The loss of a regression model is its MSE.
    # Model outputs are float32; the metric functions sum in float64.
    out = pred.astype(np.float32)
    values = {name: float(BUILTIN_METRICS[name](out, y)) for name in names if name != "loss"}
    if "loss" in names:
        values["loss"] = float(BUILTIN_METRICS["mse"](out, y))
    return {name: values[name] for name in names}


def evaluate_params(
    model: object,
    params: F32Array,
    layout: ModelLayout,
    dataset: Dataset,
    *,
    metrics: Sequence[str] | None = None,
    args: Mapping[str, object] | None = None,
) -> dict[str, float]:
    """Score a version's ``params`` on ``dataset``.

    Args:
        model: a model spec (``"mlp"``, ``"package.module:factory"``), or what a
            factory returned (a torch module or a trainer).
        params: the version's flat float32 vector.
        layout: the version's layout.
        dataset: the held-out data.
        metrics: what to compute; None means the task's defaults
            (``accuracy, loss`` or ``r2, mse``).
        args: the factory's keyword arguments, when ``model`` is a spec.

    Raises:
        ConfigError: the model or metrics do not fit the data.
        LayoutMismatch: the model does not fit the layout.
    """
    return HeldOutEvaluator(model, dataset, metrics=metrics, args=args, layout=layout).score(
        params, layout
    )


class HeldOutEvaluator:
    """A model and a held-out dataset, built once, scoring one version after another.

    Calling it as ``evaluator(version, params)`` is the central's evaluator
    protocol (``fedtier.tiers.central.ModelEvaluator``). It is not thread-safe:
    one call at a time (the central runs one evaluation at a time).

    Args:
        model: a model spec, or a torch module or trainer.
        dataset: the held-out data.
        metrics: what to compute; None or empty means the task's defaults.
        args: the factory's keyword arguments, when ``model`` is a spec.
        layout: the layout of the versions it will score; checked against the
            model now, so a model that does not fit is a start-up error
            rather than a failed evaluation per version.

    Raises:
        ConfigError: the model or metrics do not fit the data.
        LayoutMismatch: the model does not fit ``layout``.
    """

    def __init__(
        self,
        model: object,
        dataset: Dataset,
        *,
        metrics: Sequence[str] | None = None,
        args: Mapping[str, object] | None = None,
        layout: ModelLayout | None = None,
    ) -> None:
        if isinstance(model, str):
            from fedtier.client.plugins import load_model

            model = load_model(model, args=args, dataset=dataset)
        elif args:
            raise ConfigError("model args are for a model spec; the model is already built")
        self.model = model
        self.dataset = dataset
        self.metrics: tuple[str, ...] = tuple(metrics or DEFAULT_METRICS[dataset.task])
        _check_names(self.metrics, dataset.task)
        self.layout = layout
        if layout is not None:
            self._check_layout(layout)

    def _check_layout(self, layout: ModelLayout) -> None:
        if _is_torch_module(self.model):
            from fedtier.client.torch_state import flat_for_module

            flat_for_module(self.model, layout)  # raises LayoutMismatch naming the tensor
        else:
            _check_trainer_layout(self.model, layout)

    def __call__(self, version: int, params: F32Array) -> dict[str, float]:
        """Score model ``version`` (the layout given at construction)."""
        if self.layout is None:
            raise LayoutMismatch(f"no layout to read model v{version}'s parameters with")
        return self.score(params, self.layout)

    def score(self, params: F32Array, layout: ModelLayout) -> dict[str, float]:
        """The metrics of ``params`` (a vector of ``layout``) on the held-out data."""
        if not params.flags.writeable:
            # The central hands a read-only view; torch.from_numpy warns on those.
            params = params.copy()
        data = self.dataset
        model = self.model
        if _is_torch_module(model) or callable(getattr(model, "predict", None)):
            outputs = predict(model, params, layout, data.X)
            return metrics_from_outputs(outputs, data.y, data.task, self.metrics)
        evaluate = getattr(model, "evaluate", None)
        if not callable(evaluate):
            raise ConfigError(f"model {type(model).__name__} has neither predict() nor evaluate()")
        _check_trainer_layout(model, layout)
        result: Mapping[str, float] = evaluate(params, data.X, data.y)
        missing = [name for name in self.metrics if name not in result]
        if missing:
            raise ConfigError(
                f"model {type(model).__name__} reports {', '.join(sorted(result))}; it has no "
                f"{missing[0]!r} (give it predict(params, X), or use a torch model)"
            )
        return {name: float(result[name]) for name in self.metrics}


def make_evaluator(
    model: str,
    data: str | Path,
    *,
    args: Mapping[str, object] | None = None,
    data_args: Mapping[str, object] | None = None,
    label: str | int | None = None,
    task: Task | None = None,
    metrics: Sequence[str] = (),
    base_dir: Path | None = None,
    layout: ModelLayout | None = None,
    device: str = "central",
) -> HeldOutEvaluator:
    """Load the held-out data and build the model, as ``[evaluation]`` names them.

    A data loader is called with ``DataRequest(device=device, split="test",
    base_dir=base_dir)``, the whole data set being one shard.

    Raises:
        ConfigError: the data or model cannot be loaded, or they do not fit.
        LayoutMismatch: the model does not fit ``layout``.
    """
    from fedtier.client.plugins import DataRequest, load_data

    request = DataRequest(device=device, index=0, count=1, split="test", base_dir=base_dir)
    dataset = load_data(data, request, label=label, task=task, args=data_args)
    return HeldOutEvaluator(model, dataset, metrics=metrics, args=args, layout=layout)
