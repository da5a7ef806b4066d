"""Local training behind the ``Trainer`` protocol (torch, numpy); must not import trio or tiers.

A trainer turns the global model's flat float32 vector into a locally trained
one. It is synchronous and CPU- or GPU-bound: the device loop runs ``train``
in ``trio.to_thread.run_sync`` under a ``trio.CapacityLimiter``, so several
simulated devices in one process share the CPUs without blocking the event
loop. One trainer serves one call at a time (it owns its model, its optimizer
state and its RNG).

* ``TorchTrainer`` trains any ``torch.nn.Module``: classification or
  regression or a custom loss; SGD (with momentum that persists across
  rounds), Adam or AdamW; a per-round learning-rate schedule; weight decay;
  gradient clipping; drop-last and a minimum batch; custom metrics; on CUDA
  when there is one; and the per-tensor policy of what travels (FedBN).
* ``NumpyLogRegTrainer`` is multinomial logistic regression in numpy alone
  (classification only), for devices without torch.
* ``ValidatingTrainer`` wraps either (or a user's own ``Trainer``) to report
  held-out ``val_*`` metrics in each update.

torch is an optional dependency: it is imported only when a ``TorchTrainer``
or ``make_mlp`` is used, so numpy-only devices never pay for it. How many
threads torch uses (``torch.set_num_threads``) is the caller's business: a
simulator running many devices wants 1, a single real device may want more.

FedProx (Li et al. 2020) is the ``mu`` option: the local objective adds
``mu/2 * ||w - w_global||^2``, which keeps heterogeneous or partial local work
close to the global model. ``max_local_steps`` caps the steps of one call so
a straggler can do partial work, as in the FedProx paper's experiments.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, cast, runtime_checkable

import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import ConfigError, LayoutMismatch, LocalProtocolError
from fedtier.protocol.layout import ModelLayout, layout_of

if TYPE_CHECKING:
    import torch

    from fedtier.client.torch_state import BatchNormPolicy

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
OptimizerName = Literal["sgd", "adam", "adamw"]
MetricFn = Callable[[npt.NDArray[np.float32], npt.NDArray[Any]], float]
"""``(pred, y) -> float`` on numpy arrays (see ``TorchTrainer``)."""
LossFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
MetricsSpec = Mapping[str, MetricFn] | Sequence[str] | None

_TASKS: Final[tuple[Task, ...]] = ("classification", "regression")
_LOSSES: Final = ("cross_entropy", "mse")
_OPTIMIZERS: Final[tuple[OptimizerName, ...]] = ("sgd", "adam", "adamw")
_SCHEDULES: Final = ("constant", "step", "cosine")
_EVAL_BATCH: Final = 1024


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


class TorchTrainer:
    """Trains a torch ``nn.Module`` on local data: any loss, optimizer, schedule and device.

    **What travels.** The layout is the module's tensors that are aggregated,
    per ``client.torch_state.layout_for_module``: with ``batchnorm="local"``
    (the default, FedBN) BatchNorm weights and statistics stay on the device,
    tensors matching a ``local`` glob too, integer buffers always. ``train``
    loads only the travelling tensors of the global model, so local ones keep
    the values this device trained.

    **Optimizer state persists across rounds.** The optimizer is built once;
    each ``train`` reloads the global parameters into the module in place and
    keeps the optimizer's state (SGD momentum buffers, Adam moments and step
    count), as the device's own view of its loss surface: consecutive global
    models are close, so the old momentum still points somewhere useful, and
    Adam's bias correction is paid once instead of every round. The state is
    per-parameter, so local tensors keep theirs too. ``keep_optimizer_state=False``
    starts every round afresh (the behaviour before this option).

    **Batches.** Each epoch shuffles the data and cuts it into ``batch_size``
    batches. A remainder smaller than ``min_batch`` joins the batch before it
    (every example is still seen); ``drop_last`` drops any remainder instead.
    ``min_batch`` defaults to 2 for a module with BatchNorm (whose training
    forward pass cannot normalise a single example) and 1 otherwise.

    **Metrics.** ``TrainResult.metrics`` holds ``loss`` (mean over the
    call's batches), ``steps``, ``lr`` when a schedule is set, ``accuracy``
    (classification) or ``r2`` (regression), and each of ``metrics``, computed
    over the predictions made during the call. A metric is ``(pred, y) -> float``
    on numpy arrays: ``pred`` is the module's output as float32 (``(n, C)``
    logits for classification, ``(n,)`` for a one-output regression) and ``y``
    the targets.

    **Device.** ``device="auto"`` trains on CUDA when torch sees a GPU and on
    the CPU otherwise; the local data moves to the device once, and the
    trained parameters come back to the CPU as float32, so the update is the
    same bytes on either. Deterministic given ``seed`` on the CPU: shuffling
    uses a CPU generator created once; dropout and other randomness inside the
    module use torch's global RNG, which is the caller's to seed, and
    ``torch.set_num_threads`` is the caller's business too.

    Args:
        model: the module; its travelling tensors are overwritten by ``train``
            and ``evaluate``. Moved to ``device``.
        X: local inputs, shape ``(n, ...)``, converted to float32; None for a
            trainer that only evaluates (the central's evaluator).
        y: local targets, shape ``(n,)``: integer labels (classification) or
            floats (regression).
        epochs: passes over the local data per call; fractions allowed.
        batch_size: examples per optimizer step.
        lr: the base learning rate (round 0 of ``lr_schedule``).
        momentum: SGD momentum.
        mu: FedProx proximal coefficient on the travelling parameters (0 disables it).
        seed: seed of the shuffling generator.
        max_local_steps: cap on optimizer steps per call (partial work), None for none.
        task: ``"classification"`` or ``"regression"``; by default what
            ``loss`` implies, else integer ``y`` classifies and float ``y`` regresses.
        loss: ``"cross_entropy"``, ``"mse"``, a callable ``(output, target) ->
            scalar tensor`` or an import path to one; None or ``"auto"`` means
            cross-entropy for classification and MSE for regression.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        weight_decay: L2 penalty (SGD, Adam) or decoupled decay (AdamW).
        lr_schedule: the learning rate per round, None for constant.
        grad_clip: clip the global gradient norm to this before each step, None for no clipping.
        drop_last: drop each epoch's last partial batch.
        min_batch: the smallest batch to step on, None for the default above.
        metrics: extra metrics: a mapping of name to callable, or names of
            built-ins (``accuracy``, ``mse``, ``mae``, ``rmse``, ``r2``) or
            import paths ``"package.module:function"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        local: ``state_dict`` name globs of tensors kept local.
        batchnorm: ``"local"`` (FedBN) or ``"global"``.
        keep_optimizer_state: keep the optimizer's state across calls (see above).

    Raises:
        LocalProtocolError: an option or the data is unusable.
        ConfigError: a ``local`` pattern matches nothing, or a metric name is unknown.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        X: npt.NDArray[np.generic] | None = None,
        y: npt.NDArray[np.generic] | None = None,
        *,
        epochs: float = 1.0,
        batch_size: int = 32,
        lr: float = 0.01,
        momentum: float = 0.0,
        mu: float = 0.0,
        seed: int = 0,
        max_local_steps: int | None = None,
        task: Task | None = None,
        loss: str | LossFn | None = None,
        optimizer: OptimizerName = "sgd",
        weight_decay: float = 0.0,
        lr_schedule: LrSchedule | None = None,
        grad_clip: float | None = None,
        drop_last: bool = False,
        min_batch: int | None = None,
        metrics: MetricsSpec = None,
        device: str = "cpu",
        local: Sequence[str] = (),
        batchnorm: BatchNormPolicy = "local",
        keep_optimizer_state: bool = True,
    ) -> None:
        import torch

        from fedtier.client.torch_state import layout_for_module

        _check_options(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            mu=mu,
            max_local_steps=max_local_steps,
        )
        if not (math.isfinite(momentum) and 0 <= momentum < 1):
            raise LocalProtocolError(f"momentum is {momentum!r}; it must be in [0, 1)")
        if optimizer not in _OPTIMIZERS:
            raise LocalProtocolError(
                f"optimizer is {optimizer!r}; expected one of {', '.join(_OPTIMIZERS)}"
            )
        if momentum and optimizer != "sgd":
            raise LocalProtocolError(f"momentum is for sgd; {optimizer} keeps its own moments")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise LocalProtocolError(f"weight_decay is {weight_decay!r}; it must be >= 0")
        if grad_clip is not None and not (math.isfinite(grad_clip) and grad_clip > 0):
            raise LocalProtocolError(f"grad_clip is {grad_clip!r}; it must be > 0")
        if min_batch is not None and not 1 <= min_batch <= batch_size:
            raise LocalProtocolError(
                f"min_batch is {min_batch}; it must be in 1..batch_size ({batch_size})"
            )
        if (X is None) != (y is None):
            raise LocalProtocolError("give both X and y, or neither (an evaluate-only trainer)")
        if isinstance(loss, str) and loss not in (*_LOSSES, "auto"):
            loss = _load_loss(loss)
        self._task, self._loss_name = _task_and_loss(task, loss, y)
        self._loss_fn: LossFn | None = None if isinstance(loss, str | None) else loss
        self._device = resolve_device(device)
        self._model = model.to(self._device)
        self._local = tuple(local)
        self._batchnorm: BatchNormPolicy = batchnorm
        self._layout = layout_for_module(model, local=self._local, batchnorm=batchnorm)
        has_batchnorm = any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()
        )
        default_min = min(2, batch_size) if has_batchnorm else 1
        self.min_batch = min_batch if min_batch is not None else default_min
        self._metrics = resolve_metrics(metrics)
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.mu = mu
        self.max_local_steps = max_local_steps
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule or LrSchedule()
        self.grad_clip = grad_clip
        self.drop_last = drop_last
        self.keep_optimizer_state = keep_optimizer_state
        self.optimizer_name: OptimizerName = optimizer
        self.rounds_trained = 0
        """Completed ``train`` calls: the lr schedule's round (settable, e.g. after a restart)."""
        self._X: torch.Tensor | None = None
        self._y: torch.Tensor | None = None
        self._n = 0
        if X is not None and y is not None:
            X = np.asarray(X)
            y = np.asarray(y)
            _check_data(X, y)
            self._X, self._y = self._tensors(X, y)
            self._n = int(X.shape[0])
            smallest = min(stop - start for start, stop in self._batches())
            if smallest < self.min_batch:
                why = " (BatchNorm cannot train on one example)" if has_batchnorm else ""
                raise LocalProtocolError(
                    f"{self._n} local examples leave a batch of {smallest}, below min_batch "
                    f"{self.min_batch}{why}"
                )
        self._optimizer: torch.optim.Optimizer | None = None
        self._generator = torch.Generator().manual_seed(seed)

    # -- properties ------------------------------------------------------------------

    @property
    def layout(self) -> ModelLayout:
        """The module's travelling tensors (see the class docstring)."""
        return self._layout

    @property
    def model(self) -> torch.nn.Module:
        """The module being trained (holds the last trained or evaluated parameters)."""
        return self._model

    @property
    def task(self) -> Task:
        """``"classification"`` or ``"regression"``."""
        return self._task

    @property
    def device(self) -> torch.device:
        """Where the module and the local data live."""
        return self._device

    def initial_params(self) -> F32Array:
        """The module's current travelling tensors as a flat vector (its initialisation)."""
        from fedtier.client.torch_state import flat_for_module

        return flat_for_module(self._model, self._layout)

    # -- training --------------------------------------------------------------------

    def _tensors(
        self, X: npt.NDArray[np.generic], y: npt.NDArray[np.generic]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        xs = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        if self._task == "classification":
            if not np.issubdtype(y.dtype, np.integer) and not _integral(y):
                raise LocalProtocolError(
                    f"classification needs integer labels, got fractional {y.dtype} values"
                )
            ys = torch.from_numpy(np.asarray(y).astype(np.int64))
        else:
            ys = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
        return xs.to(self._device), ys.to(self._device)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        import torch

        params = [p for p in self._model.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    def _objective(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch

        if self._loss_fn is not None:
            return self._loss_fn(out, target)
        if self._loss_name == "mse":
            return torch.nn.functional.mse_loss(_squeeze(out, target), target)
        return torch.nn.functional.cross_entropy(out, target)

    def _batches(self) -> list[tuple[int, int]]:
        """The ``(start, stop)`` of each batch of one epoch (see the class docstring)."""
        n, size = self._n, self.batch_size
        cuts = [(start, min(start + size, n)) for start in range(0, n, size)]
        remainder = cuts[-1][1] - cuts[-1][0]
        if remainder < size and len(cuts) > 1:
            if self.drop_last:
                cuts.pop()
            elif remainder < self.min_batch:
                cuts[-2:] = [(cuts[-2][0], n)]
        return cuts

    def train(self, params: F32Array, *, max_steps: int | None = None) -> TrainResult:
        """Load ``params`` into the module, train, return the new flat vector.

        Args:
            params: the global model's flat vector (not modified).
            max_steps: cap for this call only (a straggler's partial work);
                the smaller of it and ``max_local_steps`` applies.

        Raises:
            LayoutMismatch: ``params`` do not fit the layout.
            LocalProtocolError: the trainer has no local data.
        """
        import torch

        from fedtier.client.torch_state import flat_for_module, load_into_module

        _check_params(params, self._layout)
        if self._X is None or self._y is None:
            raise LocalProtocolError("this trainer has no local data; it can only evaluate")
        model = self._model
        load_into_module(model, self._layout, params)
        travelling = {spec.name for spec in self._layout.tensors}
        anchors = (
            [
                (p, p.detach().clone())
                for name, p in model.named_parameters()
                if name in travelling and p.requires_grad
            ]
            if self.mu
            else []
        )
        if self._optimizer is None or not self.keep_optimizer_state:
            self._optimizer = self._make_optimizer()
        optimizer = self._optimizer
        lr = self.lr_schedule.lr_at(self.lr, self.rounds_trained)
        for group in optimizer.param_groups:
            group["lr"] = lr
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        cap = self.max_local_steps
        if max_steps is not None:
            cap = max_steps if cap is None else min(cap, max_steps)
        batches = self._batches()
        steps = max(1, math.ceil(len(batches) * self.epochs))
        steps = steps if cap is None else min(steps, cap)
        loss_sum = torch.zeros((), device=self._device)
        seen = 0
        outputs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        order = torch.randperm(self._n, generator=self._generator)
        model.train()
        for step in range(steps):
            k = step % len(batches)
            if k == 0 and step:
                order = torch.randperm(self._n, generator=self._generator)
            start, stop = batches[k]
            idx = order[start:stop].to(self._device)
            xb, yb = self._X[idx], self._y[idx]
            optimizer.zero_grad(set_to_none=True)
            out = model(xb)
            loss = self._objective(out, yb)
            objective = loss
            if anchors:
                prox = torch.stack([((p - a) ** 2).sum() for p, a in anchors]).sum()
                objective = loss + (self.mu / 2) * prox
            torch.autograd.backward(objective)
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable, self.grad_clip)
            optimizer.step()
            batch = stop - start
            loss_sum += loss.detach() * batch
            seen += batch
            outputs.append(out.detach())
            targets.append(yb)
        self.rounds_trained += 1
        new_params = flat_for_module(model, self._layout)
        metrics = {"loss": float(loss_sum) / seen, "steps": float(steps)}
        if self.lr_schedule.kind != "constant":
            metrics["lr"] = lr
        metrics.update(self._score(torch.cat(outputs), torch.cat(targets)))
        return TrainResult(params=new_params, n_samples=self._n, metrics=metrics)

    def _score(self, out: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        import torch

        pred = _squeeze(out, target).to(device="cpu", dtype=torch.float32).numpy()
        truth = target.cpu().numpy()
        scores: dict[str, float] = {}
        for name in _DEFAULT_METRICS[self._task]:
            try:
                scores[name] = BUILTIN_METRICS[name](pred, truth)
            except LocalProtocolError:
                # A default that does not fit the outputs (accuracy of a
                # one-logit binary model under a custom loss) is left out.
                continue
        for name, fn in self._metrics.items():
            scores[name] = float(fn(pred, truth))
        return scores

    def evaluate(
        self, params: F32Array, X: npt.NDArray[np.generic], y: npt.NDArray[np.generic]
    ) -> dict[str, float]:
        """``loss`` and the metrics of ``params`` on ``(X, y)``, the module in eval mode.

        Local tensors (FedBN's BatchNorm) keep the device's values. The data
        goes through in batches of at most 1024 examples.
        """
        import torch

        from fedtier.client.torch_state import load_into_module

        _check_params(params, self._layout)
        X = np.asarray(X)
        y = np.asarray(y)
        _check_data(X, y)
        xs, ys = self._tensors(X, y)
        model = self._model
        load_into_module(model, self._layout, params)
        model.eval()
        outputs: list[torch.Tensor] = []
        loss_sum = 0.0
        with torch.no_grad():
            for start in range(0, xs.shape[0], _EVAL_BATCH):
                xb, yb = xs[start : start + _EVAL_BATCH], ys[start : start + _EVAL_BATCH]
                out = model(xb)
                loss_sum += float(self._objective(out, yb)) * int(xb.shape[0])
                outputs.append(out)
        return {"loss": loss_sum / int(xs.shape[0])} | self._score(torch.cat(outputs), ys)


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


def resolve_device(device: str) -> torch.device:
    """The torch device ``"auto"`` (CUDA if any, else CPU), ``"cpu"`` or ``"cuda[:N]"`` means.

    Raises:
        LocalProtocolError: an unknown name, or CUDA asked for where torch sees none.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise LocalProtocolError(
                f"device is {device!r} but torch sees no CUDA GPU ('auto' falls back to the CPU)"
            )
        return torch.device(device)
    raise LocalProtocolError(f"device is {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _task_and_loss(
    task: Task | None, loss: str | LossFn | None, y: npt.NDArray[np.generic] | None
) -> tuple[Task, str]:
    if task is not None and task not in _TASKS:
        raise LocalProtocolError(f"task is {task!r}; expected one of {', '.join(_TASKS)}")
    if loss == "auto":
        loss = None
    if isinstance(loss, str) and loss not in _LOSSES:
        raise LocalProtocolError(
            f"loss is {loss!r}; expected 'auto', {', '.join(map(repr, _LOSSES))} or an import "
            "path 'package.module:function'"
        )
    if task is None:
        if loss in _LOSSES:
            task = "classification" if loss == "cross_entropy" else "regression"
        elif y is not None and not np.issubdtype(np.asarray(y).dtype, np.integer):
            task = "regression"
        else:
            task = "classification"
    if loss is None:
        return task, "cross_entropy" if task == "classification" else "mse"
    if isinstance(loss, str):
        implied = "classification" if loss == "cross_entropy" else "regression"
        if implied != task:
            raise LocalProtocolError(f"loss {loss} does not fit a {task} task")
        return task, loss
    if not callable(loss):
        raise LocalProtocolError(f"loss is a {type(loss).__name__}; expected a name or a callable")
    return task, "custom"


def _integral(y: npt.NDArray[np.generic]) -> bool:
    """Whether float labels are all whole numbers (``2.0`` is class 2)."""
    values = np.asarray(y, dtype=np.float64)
    return bool(np.isfinite(values).all() and (values == np.round(values)).all())


def _load_loss(spec: str) -> LossFn:
    from fedtier.client.plugins import is_import_path, load_object

    if not is_import_path(spec):
        raise LocalProtocolError(
            f"loss is {spec!r}; expected 'auto', {', '.join(map(repr, _LOSSES))} or an import "
            "path 'package.module:function'"
        )
    fn = load_object(spec, what="loss")
    if not callable(fn):
        raise ConfigError(f"loss {spec!r} is a {type(fn).__name__}, not callable")
    return cast("LossFn", fn)


def _squeeze(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A one-output regression's ``(n, 1)`` output as ``(n,)``, to match its targets."""
    if out.ndim == target.ndim + 1 and out.shape[-1] == 1:
        return out.squeeze(-1)
    return out


def make_mlp(
    in_features: int, hidden: int, num_classes: int, *, seed: int | None = None
) -> torch.nn.Module:
    """A Linear-ReLU-Linear classifier (the demo's model).

    Args:
        in_features: input dimension.
        hidden: hidden units.
        num_classes: output logits.
        seed: when given, initialise from this seed without touching the
            global RNG (every device of a fleet can build the same start).
    """
    import torch

    def build() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(in_features, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, num_classes),
        )

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
