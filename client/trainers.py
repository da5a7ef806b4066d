"""The Trainer protocol, metrics, lr schedules, numpy and validating trainers; never torch or trio.

A trainer turns the global model's flat float32 vector into a locally trained
one. It is synchronous and CPU- or GPU-bound: the device loop runs ``train``
in ``trio.to_thread.run_sync`` under a ``trio.CapacityLimiter``, so several
simulated devices in one process share the CPUs without blocking the event
loop. One trainer serves one call at a time (it owns its model, its optimizer
state and its RNG).

* ``NumpyLogRegTrainer`` is multinomial logistic regression in numpy alone
  (classification only), for devices without torch.
* ``client.torch_trainer.TorchTrainer`` trains any ``torch.nn.Module``. It
  lives in its own module with its torch helpers (``make_mlp``,
  ``resolve_device``) and shares the metrics, ``LrSchedule`` and the option
  checks defined here. Those three names also resolve from this module, for
  code written before the split; they load on first use, because
  ``client.torch_trainer`` imports this module.
* ``ValidatingTrainer`` wraps either (or a user's own ``Trainer``) to report
  held-out ``val_*`` metrics in each update.

This module imports numpy and ``protocol`` only: never torch, trio or tiers.

FedProx (Li et al. 2020) is the ``mu`` option: the local objective adds
``mu/2 * ||w - w_global||^2``, which keeps heterogeneous or partial local work
close to the global model. ``max_local_steps`` caps the steps of one call so
a straggler can do partial work, as in the FedProx paper's experiments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import ConfigError, LayoutMismatch, LocalProtocolError
from fedtier.protocol.layout import ModelLayout, layout_of

if TYPE_CHECKING:
    # Their home is client.torch_trainer; ``__getattr__`` below serves the old address.
    from fedtier.client.torch_trainer import TorchTrainer as TorchTrainer
    from fedtier.client.torch_trainer import make_mlp as make_mlp
    from fedtier.client.torch_trainer import resolve_device as resolve_device

__all__ = [
    "BUILTIN_METRICS",
    "LrSchedule",
    "MetricFn",
    "NumpyLogRegTrainer",
    "TorchTrainer",
    "TrainResult",
    "Trainer",
    "ValidatingTrainer",
    "make_mlp",
    "resolve_device",
    "resolve_metrics",
]

F32Array = npt.NDArray[np.float32]
Task = Literal["classification", "regression"]
MetricFn = Callable[[npt.NDArray[np.float32], npt.NDArray[Any]], float]
"""``(pred, y) -> float`` on numpy arrays (see ``TorchTrainer``)."""
MetricsSpec = Mapping[str, MetricFn] | Sequence[str] | None

_SCHEDULES: Final = ("constant", "step", "cosine")
_TORCH_NAMES: Final = frozenset({"TorchTrainer", "make_mlp", "resolve_device"})


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What one local training call produced.

    Attributes:
        params: the locally trained flat float32 vector (a new array).
        n_samples: local examples behind it (the update's weight): the size of
            the local dataset, also when the call did partial work.
        metrics: training metrics (``loss``, ``accuracy``, ``steps``...), finite floats.
    """

    params: F32Array
    n_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Trainer(Protocol):
    """Trains a model given as a flat float32 vector of ``layout``.

    Implement it for anything that is not torch (a model factory may return
    one). ``train`` and ``evaluate`` block: they are called from a worker
    thread, one call at a time per trainer.
    """

    @property
    def layout(self) -> ModelLayout:
        """The layout of the vectors ``train`` takes and returns."""
        ...

    def train(self, params: F32Array) -> TrainResult:
        """Train locally starting from ``params``; never modifies ``params``."""
        ...

    def evaluate(
        self, params: F32Array, X: npt.NDArray[np.generic], y: npt.NDArray[np.generic]
    ) -> dict[str, float]:
        """Return ``loss`` and the metrics (``accuracy``, ``r2``...) of ``params`` on ``(X, y)``."""
        ...


# -- metrics ------------------------------------------------------------------------------


def _accuracy(pred: npt.NDArray[np.float32], y: npt.NDArray[Any]) -> float:
    if pred.ndim != 2:
        raise LocalProtocolError(f"accuracy needs (n, classes) outputs, got shape {pred.shape}")
    return float((pred.argmax(axis=1) == y).mean())


def _mse(pred: npt.NDArray[np.float32], y: npt.NDArray[Any]) -> float:
    diff = pred.reshape(len(y), -1)[:, 0] - y if pred.ndim > 1 else pred - y
    return float(np.mean(np.square(diff, dtype=np.float64)))


def _mae(pred: npt.NDArray[np.float32], y: npt.NDArray[Any]) -> float:
    diff = pred.reshape(len(y), -1)[:, 0] - y if pred.ndim > 1 else pred - y
    return float(np.mean(np.abs(diff, dtype=np.float64)))


def _rmse(pred: npt.NDArray[np.float32], y: npt.NDArray[Any]) -> float:
    return math.sqrt(_mse(pred, y))


def _r2(pred: npt.NDArray[np.float32], y: npt.NDArray[Any]) -> float:
    """Coefficient of determination; 1.0 for a perfect fit of constant targets, else 0.0 there."""
    truth = np.asarray(y, dtype=np.float64)
    residual = _mse(pred, y) * len(truth)
    total = float(np.sum(np.square(truth - truth.mean())))
    if total == 0.0:
        return 1.0 if residual == 0.0 else 0.0
    return 1.0 - residual / total


BUILTIN_METRICS: Final[Mapping[str, MetricFn]] = {
    "accuracy": _accuracy,
    "mse": _mse,
    "mae": _mae,
    "rmse": _rmse,
    "r2": _r2,
}
"""Metrics by name, ``(pred, y) -> float``: for ``metrics = [...]`` and evaluators."""
_DEFAULT_METRICS: Final[Mapping[Task, tuple[str, ...]]] = {
    "classification": ("accuracy",),
    "regression": ("r2",),
}


def resolve_metrics(metrics: MetricsSpec) -> dict[str, MetricFn]:
    """Name -> callable for a mapping, or for names of built-ins and import paths.

    An import path ``"package.module:f1"`` is reported under its last name, ``f1``.

    Raises:
        ConfigError: a name is neither a built-in nor a loadable callable.
    """
    if metrics is None:
        return {}
    if isinstance(metrics, Mapping):
        out = dict(metrics)
    else:
        if isinstance(metrics, str):
            metrics = (metrics,)
        out = {}
        for name in metrics:
            if name in BUILTIN_METRICS:
                out[name] = BUILTIN_METRICS[name]
                continue
            from fedtier.client.plugins import is_import_path, load_object

            if not is_import_path(name):
                raise ConfigError(
                    f"metric {name!r} is neither a built-in ({', '.join(BUILTIN_METRICS)}) nor "
                    "an import path 'package.module:function'"
                )
            fn = load_object(name, what="metric")
            if not callable(fn):
                raise ConfigError(f"metric {name!r} is a {type(fn).__name__}, not callable")
            out[name.rpartition(":")[2].rpartition(".")[2]] = fn
    for name, fn in out.items():
        if not (isinstance(name, str) and 1 <= len(name) <= 60) or not callable(fn):
            raise ConfigError(f"metric {name!r} needs a name of 1-60 characters and a callable")
    return out


# -- learning-rate schedules --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LrSchedule:
    """The learning rate of each round (one ``train`` call of a device), from the base ``lr``.

    * ``constant``: ``lr`` every round.
    * ``step``: ``lr * gamma ** (round // step_rounds)``.
    * ``cosine``: from ``lr`` down to ``min_lr`` over ``period_rounds``
      rounds along half a cosine, then again from ``lr`` (warm restarts).

    Attributes:
        kind: ``"constant"``, ``"step"`` or ``"cosine"``.
        step_rounds: rounds per step (``step``).
        gamma: the factor per step (``step``).
        period_rounds: rounds per cosine cycle (``cosine``).
        min_lr: the cosine's floor.

    Raises:
        LocalProtocolError: a value out of range.
    """

    kind: Literal["constant", "step", "cosine"] = "constant"
    step_rounds: int = 10
    gamma: float = 0.1
    period_rounds: int = 50
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _SCHEDULES:
            raise LocalProtocolError(
                f"lr schedule kind is {self.kind!r}; expected one of {', '.join(_SCHEDULES)}"
            )
        if self.step_rounds < 1 or self.period_rounds < 1:
            raise LocalProtocolError("lr schedule step_rounds and period_rounds must be >= 1")
        if not (math.isfinite(self.gamma) and 0 < self.gamma <= 1):
            raise LocalProtocolError(f"lr schedule gamma is {self.gamma!r}; it must be in (0, 1]")
        if not (math.isfinite(self.min_lr) and self.min_lr >= 0):
            raise LocalProtocolError(f"lr schedule min_lr is {self.min_lr!r}; it must be >= 0")

    def lr_at(self, lr: float, round_index: int) -> float:
        """The learning rate of round ``round_index`` (0-based) from base ``lr``."""
        if self.kind == "step":
            return lr * self.gamma ** (round_index // self.step_rounds)
        if self.kind == "cosine":
            phase = (round_index % self.period_rounds) / self.period_rounds
            return self.min_lr + (lr - self.min_lr) * (1 + math.cos(math.pi * phase)) / 2
        return lr


# -- checks -------------------------------------------------------------------------------


def _check_options(
    *,
    epochs: float,
    batch_size: int,
    lr: float,
    mu: float,
    max_local_steps: int | None,
) -> None:
    if not (math.isfinite(epochs) and epochs > 0):
        raise LocalProtocolError(f"epochs is {epochs!r}; it must be > 0")
    if batch_size < 1:
        raise LocalProtocolError(f"batch_size is {batch_size}; it must be >= 1")
    if not (math.isfinite(lr) and lr > 0):
        raise LocalProtocolError(f"lr is {lr!r}; it must be > 0")
    if not (math.isfinite(mu) and mu >= 0):
        raise LocalProtocolError(f"mu is {mu!r}; it must be >= 0")
    if max_local_steps is not None and max_local_steps < 1:
        raise LocalProtocolError(f"max_local_steps is {max_local_steps}; it must be >= 1")


def _check_data(X: npt.NDArray[np.generic], y: npt.NDArray[np.generic]) -> None:
    if X.ndim < 2 or y.ndim != 1 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise LocalProtocolError(
            f"data must be X of shape (n, ...) and y of shape (n,) with n >= 1; "
            f"got X {X.shape} and y {y.shape}"
        )


def _planned_steps(n: int, batch_size: int, epochs: float, cap: int | None) -> int:
    """SGD steps of one call: ``epochs`` passes (fractions allowed), capped, at least one."""
    per_epoch = -(-n // batch_size)
    steps = max(1, math.ceil(per_epoch * epochs))
    return steps if cap is None else min(steps, cap)


def _check_params(params: F32Array, layout: ModelLayout) -> None:
    if not isinstance(params, np.ndarray) or params.shape != (layout.num_params,):
        shape = getattr(params, "shape", None)
        raise LayoutMismatch(
            f"params have shape {shape}; layout {layout.fingerprint.hex()} expects "
            f"({layout.num_params},)"
        )


class NumpyLogRegTrainer:
    """Multinomial logistic regression (softmax cross-entropy, minibatch SGD) in pure numpy.

    Classification only: a regression task needs a torch model (``"mlp"`` with
    ``loss = "mse"``, or the user's own).

    Layout: ``weight`` of shape ``(num_classes, num_features)``, then ``bias``
    of shape ``(num_classes,)``. Deterministic given ``seed``: the shuffling
    RNG is created once, so successive calls see successive shuffles.

    Args:
        num_features: input dimension F.
        num_classes: number of classes C (labels are ``0..C-1``).
        X: local features, shape ``(n, F)``; kept as float32. None (with
            ``y``) for a trainer that only evaluates.
        y: local integer labels, shape ``(n,)``.
        epochs: passes over the local data per call; fractions allowed.
        batch_size: examples per SGD step.
        lr: SGD learning rate.
        mu: FedProx proximal coefficient (0 disables it).
        seed: seed of the shuffling RNG.
        max_local_steps: cap on SGD steps per call (partial work), None for none.
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        X: npt.NDArray[np.generic] | None = None,
        y: npt.NDArray[np.generic] | None = None,
        *,
        epochs: float = 1.0,
        batch_size: int = 32,
        lr: float = 0.1,
        mu: float = 0.0,
        seed: int = 0,
        max_local_steps: int | None = None,
    ) -> None:
        _check_options(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            mu=mu,
            max_local_steps=max_local_steps,
        )
        if num_classes < 2:
            raise LocalProtocolError(f"num_classes is {num_classes}; it must be >= 2")
        if (X is None) != (y is None):
            raise LocalProtocolError("give both X and y, or neither (an evaluate-only trainer)")
        self._X: F32Array | None = None
        self._y: npt.NDArray[np.intp] | None = None
        if X is not None and y is not None:
            X = np.asarray(X)
            y = np.asarray(y)
            _check_data(X, y)
            if X.shape[1:] != (num_features,):
                raise LocalProtocolError(f"X has shape {X.shape}; expected (n, {num_features})")
            if (
                not np.issubdtype(y.dtype, np.integer)
                or int(y.min()) < 0
                or int(y.max()) >= num_classes
            ):
                raise LocalProtocolError(
                    f"labels must be integers in 0..{num_classes - 1} (logreg classifies only)"
                )
            self._X = np.ascontiguousarray(X, dtype=np.float32)
            self._y = y.astype(np.intp)
        self._num_features = num_features
        self._num_classes = num_classes
        self._layout = layout_of(
            [("weight", (num_classes, num_features)), ("bias", (num_classes,))]
        )
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.mu = mu
        self.max_local_steps = max_local_steps
        self._rng = np.random.default_rng(seed)

    @property
    def layout(self) -> ModelLayout:
        """``weight (C, F)``, ``bias (C,)``."""
        return self._layout

    def initial_params(self) -> F32Array:
        """All-zero parameters (the convex problem needs no random start)."""
        return np.zeros(self._layout.num_params, np.float32)

    def _split(self, params: F32Array) -> tuple[F32Array, F32Array]:
        c, f = self._num_classes, self._num_features
        return params[: c * f].reshape(c, f), params[c * f :]

    def train(self, params: F32Array, *, max_steps: int | None = None) -> TrainResult:
        """Run minibatch SGD from ``params``.

        Args:
            params: the global model's flat vector (not modified).
            max_steps: cap for this call only (a straggler's partial work);
                the smaller of it and ``max_local_steps`` applies.
        """
        _check_params(params, self._layout)
        if self._X is None or self._y is None:
            raise LocalProtocolError("this trainer has no local data; it can only evaluate")
        global_w, global_b = self._split(np.asarray(params, np.float32))
        w = global_w.copy()
        b = global_b.copy()
        cap = self.max_local_steps
        if max_steps is not None:
            cap = max_steps if cap is None else min(cap, max_steps)
        n = self._X.shape[0]
        steps = _planned_steps(n, self.batch_size, self.epochs, cap)
        lr = np.float32(self.lr)
        mu = np.float32(self.mu)
        loss_sum = 0.0
        correct = 0
        seen = 0
        order = self._rng.permutation(n)
        pos = 0
        for _ in range(steps):
            if pos >= n:
                order = self._rng.permutation(n)
                pos = 0
            idx = order[pos : pos + self.batch_size]
            pos += self.batch_size
            xb, yb = self._X[idx], self._y[idx]
            logits = xb @ w.T + b
            probs, log_probs = _softmax(logits)
            rows = np.arange(idx.shape[0])
            loss_sum += float(-log_probs[rows, yb].sum())
            correct += int((logits.argmax(axis=1) == yb).sum())
            seen += idx.shape[0]
            grad = probs
            grad[rows, yb] -= 1
            grad /= np.float32(idx.shape[0])
            grad_w = grad.T @ xb
            grad_b = grad.sum(axis=0)
            if mu:
                grad_w += mu * (w - global_w)
                grad_b += mu * (b - global_b)
            w -= lr * grad_w
            b -= lr * grad_b
        out = np.concatenate([w.reshape(-1), b]).astype(np.float32, copy=False)
        return TrainResult(
            params=out,
            n_samples=n,
            metrics={
                "loss": loss_sum / seen,
                "accuracy": correct / seen,
                "steps": float(steps),
            },
        )

    def evaluate(
        self, params: F32Array, X: npt.NDArray[np.generic], y: npt.NDArray[np.generic]
    ) -> dict[str, float]:
        """Mean cross-entropy ``loss`` and ``accuracy`` of ``params`` on ``(X, y)``."""
        _check_params(params, self._layout)
        w, b = self._split(np.asarray(params, np.float32))
        xs = np.asarray(X, np.float32)
        ys = np.asarray(y).astype(np.intp)
        logits = xs @ w.T + b
        _probs, log_probs = _softmax(logits)
        rows = np.arange(xs.shape[0])
        return {
            "loss": float(-log_probs[rows, ys].mean()),
            "accuracy": float((logits.argmax(axis=1) == ys).mean()),
        }


def _softmax(logits: F32Array) -> tuple[F32Array, F32Array]:
    """Probabilities and log-probabilities, stabilised by subtracting the row max."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_norm
    return np.exp(log_probs), log_probs


class ValidatingTrainer:
    """Any ``Trainer``, with its trained parameters evaluated on held-out data after each call.

    The validation ``loss`` and metrics join the training metrics as
    ``val_loss``, ``val_accuracy``, ... so they travel in the update.

    Args:
        trainer: the trainer to wrap.
        X: validation inputs.
        y: validation targets.
    """

    def __init__(
        self, trainer: Trainer, X: npt.NDArray[np.generic], y: npt.NDArray[np.generic]
    ) -> None:
        self.inner = trainer
        self._X = X
        self._y = y

    @property
    def layout(self) -> ModelLayout:
        """The wrapped trainer's layout."""
        return self.inner.layout

    def train(self, params: F32Array, **options: Any) -> TrainResult:
        """Train with the wrapped trainer (``options`` pass through), then validate."""
        result = self.inner.train(params, **options) if options else self.inner.train(params)
        scores = self.inner.evaluate(result.params, self._X, self._y)
        metrics = dict(result.metrics)
        metrics.update({f"val_{name}": float(value) for name, value in scores.items()})
        return TrainResult(params=result.params, n_samples=result.n_samples, metrics=metrics)

    def evaluate(
        self, params: F32Array, X: npt.NDArray[np.generic], y: npt.NDArray[np.generic]
    ) -> dict[str, float]:
        """The wrapped trainer's evaluation."""
        return self.inner.evaluate(params, X, y)


def __getattr__(name: str) -> object:
    """``TorchTrainer``, ``make_mlp`` and ``resolve_device`` at their old address, on first use.

    ``client.torch_trainer`` imports this module, so it cannot be imported here
    eagerly; loading it lazily also keeps this module's import free of it.
    """
    if name in _TORCH_NAMES:
        from fedtier.client import torch_trainer

        value = getattr(torch_trainer, name)
        globals()[name] = value  # the next access is a plain lookup
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
