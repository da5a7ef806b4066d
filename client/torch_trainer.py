"""``TorchTrainer`` and its torch helpers; imports torch only inside functions, never trio or tiers.

``TorchTrainer`` trains any ``torch.nn.Module``: classification or regression
or a custom loss; SGD (with momentum that persists across rounds), Adam or
AdamW; a per-round learning-rate schedule; weight decay; gradient clipping;
drop-last and a minimum batch; custom metrics; on CUDA when there is one; and
the per-tensor policy of what travels (FedBN, ``client.torch_state``). The
``Trainer`` protocol, the metrics, ``LrSchedule`` and the option checks it
shares with the numpy trainer live in ``client.trainers``.

torch is an optional dependency: this module imports it only inside the
functions that need it, so importing the module (the simulator does, for
numpy-only scenarios too) costs nothing, and ``import fedtier.client`` never
loads it. How many threads torch uses (``torch.set_num_threads``) is the
caller's business: a simulator running many devices wants 1, a single real
device may want more.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Literal, cast

import numpy as np
import numpy.typing as npt

from fedtier.client.trainers import (
    _DEFAULT_METRICS,
    BUILTIN_METRICS,
    F32Array,
    LrSchedule,
    MetricsSpec,
    Task,
    TrainResult,
    _check_data,
    _check_options,
    _check_params,
    resolve_metrics,
)
from fedtier.protocol.errors import ConfigError, LocalProtocolError
from fedtier.protocol.layout import ModelLayout

if TYPE_CHECKING:
    import torch

    from fedtier.client.torch_state import BatchNormPolicy

__all__ = ["TorchTrainer", "make_mlp", "resolve_device"]

OptimizerName = Literal["sgd", "adam", "adamw"]
LossFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]

_TASKS: Final[tuple[Task, ...]] = ("classification", "regression")
_LOSSES: Final = ("cross_entropy", "mse")
_OPTIMIZERS: Final[tuple[OptimizerName, ...]] = ("sgd", "adam", "adamw")
_EVAL_BATCH: Final = 1024


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
