"""Local training behind the ``Trainer`` protocol (torch, numpy); must not import trio or tiers.

A trainer turns the global model's flat float32 vector into a locally trained
one. It is synchronous and CPU-bound: the device loop runs ``train`` in
``trio.to_thread.run_sync`` under a ``trio.CapacityLimiter``, so several
simulated devices in one process share the CPUs without blocking the event
loop. One trainer serves one call at a time (it owns its model and its RNG).

torch is an optional dependency: it is imported only when a ``TorchTrainer``
or ``make_mlp`` is used, so numpy-only devices never pay for it. How many
threads torch uses (``torch.set_num_threads``) is the caller's business: a
simulator running many devices wants 1, a single real device may want more.

FedProx (Li et al. 2020) is the ``mu`` option: the local objective adds
``mu/2 * ||w - w_global||^2``, which keeps heterogeneous or partial local work
close to the global model. ``max_local_steps`` caps the SGD steps of one call so
a straggler can do partial work, as in the FedProx paper's experiments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import LayoutMismatch, LocalProtocolError
from fedtier.protocol.layout import ModelLayout, layout_of

if TYPE_CHECKING:
    import torch

__all__ = [
    "NumpyLogRegTrainer",
    "TorchTrainer",
    "TrainResult",
    "Trainer",
    "make_mlp",
]

F32Array = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class TrainResult:
    """What one local training call produced.

    Attributes:
        params: the locally trained flat float32 vector (a new array).
        n_samples: local examples behind it (the update's weight): the size of
            the local dataset, also when the call did partial work.
        metrics: training metrics (``loss``, ``accuracy``, ``steps``), finite floats.
    """

    params: F32Array
    n_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Trainer(Protocol):
    """Trains a model given as a flat float32 vector of ``layout``.

    ``train`` and ``evaluate`` block (CPU-bound): call them from a worker
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
        """Return ``loss`` and ``accuracy`` of ``params`` on ``(X, y)``."""
        ...


def _check_common(
    X: npt.NDArray[np.generic],
    y: npt.NDArray[np.generic],
    *,
    epochs: float,
    batch_size: int,
    lr: float,
    mu: float,
    max_local_steps: int | None,
) -> None:
    if X.ndim < 2 or y.ndim != 1 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise LocalProtocolError(
            f"training data must be X of shape (n, ...) and y of shape (n,) with n >= 1; "
            f"got X {X.shape} and y {y.shape}"
        )
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

    Layout: ``weight`` of shape ``(num_classes, num_features)``, then ``bias``
    of shape ``(num_classes,)``. Deterministic given ``seed``: the shuffling
    RNG is created once, so successive calls see successive shuffles.

    Args:
        num_features: input dimension F.
        num_classes: number of classes C (labels are ``0..C-1``).
        X: local features, shape ``(n, F)``; kept as float32.
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
        X: npt.NDArray[np.generic],
        y: npt.NDArray[np.generic],
        *,
        epochs: float = 1.0,
        batch_size: int = 32,
        lr: float = 0.1,
        mu: float = 0.0,
        seed: int = 0,
        max_local_steps: int | None = None,
    ) -> None:
        X = np.asarray(X)
        y = np.asarray(y)
        _check_common(
            X,
            y,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            mu=mu,
            max_local_steps=max_local_steps,
        )
        if X.shape[1:] != (num_features,):
            raise LocalProtocolError(f"X has shape {X.shape}; expected (n, {num_features})")
        if num_classes < 2:
            raise LocalProtocolError(f"num_classes is {num_classes}; it must be >= 2")
        if (
            not np.issubdtype(y.dtype, np.integer)
            or int(y.min()) < 0
            or int(y.max()) >= num_classes
        ):
            raise LocalProtocolError(f"labels must be integers in 0..{num_classes - 1}")
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
    """Trains a torch ``nn.Module`` with SGD on local tensors (classification, cross-entropy).

    The layout is the module's floating-point ``state_dict`` tensors (see
    ``client.torch_state``); integer buffers stay in the module and are never
    sent. Deterministic given ``seed`` on CPU: shuffling uses a generator
    created once, so successive calls see successive shuffles; dropout and
    other randomness inside the module use torch's global RNG, which is the
    caller's to seed. ``torch.set_num_threads`` is the caller's business too.

    Args:
        model: the module; its parameters are overwritten by each ``train``.
        X: local inputs, shape ``(n, ...)``, converted to float32.
        y: local integer labels, shape ``(n,)``.
        epochs: passes over the local data per call; fractions allowed.
        batch_size: examples per SGD step.
        lr: SGD learning rate.
        momentum: SGD momentum (the buffer starts at zero every call).
        mu: FedProx proximal coefficient (0 disables it).
        seed: seed of the shuffling generator.
        max_local_steps: cap on SGD steps per call (partial work), None for none.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        X: npt.NDArray[np.generic],
        y: npt.NDArray[np.generic],
        *,
        epochs: float = 1.0,
        batch_size: int = 32,
        lr: float = 0.01,
        momentum: float = 0.0,
        mu: float = 0.0,
        seed: int = 0,
        max_local_steps: int | None = None,
    ) -> None:
        import torch

        from fedtier.client.torch_state import layout_from_state_dict

        X = np.asarray(X)
        y = np.asarray(y)
        _check_common(
            X,
            y,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            mu=mu,
            max_local_steps=max_local_steps,
        )
        if not (math.isfinite(momentum) and 0 <= momentum < 1):
            raise LocalProtocolError(f"momentum is {momentum!r}; it must be in [0, 1)")
        if not np.issubdtype(y.dtype, np.integer):
            raise LocalProtocolError(f"labels must be integers, got {y.dtype}")
        self._model = model
        self._layout = layout_from_state_dict(model.state_dict())
        self._X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        self._y = torch.from_numpy(y.astype(np.int64))
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.mu = mu
        self.max_local_steps = max_local_steps
        self._generator = torch.Generator().manual_seed(seed)

    @property
    def layout(self) -> ModelLayout:
        """The floating-point tensors of the module's ``state_dict``."""
        return self._layout

    @property
    def model(self) -> torch.nn.Module:
        """The module being trained (holds the last trained or evaluated parameters)."""
        return self._model

    def initial_params(self) -> F32Array:
        """The module's current parameters as a flat vector (its initialisation)."""
        from fedtier.client.torch_state import flat_from_state_dict

        return flat_from_state_dict(self._model.state_dict(), self._layout)

    def train(self, params: F32Array, *, max_steps: int | None = None) -> TrainResult:
        """Load ``params`` into the module, run SGD, return the new flat vector.

        Args:
            params: the global model's flat vector (not modified).
            max_steps: cap for this call only (a straggler's partial work);
                the smaller of it and ``max_local_steps`` applies.
        """
        import torch

        from fedtier.client.torch_state import flat_from_state_dict, load_flat

        _check_params(params, self._layout)
        model = self._model
        load_flat(model.state_dict(), self._layout, params)
        anchors = [p.detach().clone() for p in model.parameters()] if self.mu else []
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum)
        loss_fn = torch.nn.CrossEntropyLoss()
        cap = self.max_local_steps
        if max_steps is not None:
            cap = max_steps if cap is None else min(cap, max_steps)
        n = int(self._X.shape[0])
        steps = _planned_steps(n, self.batch_size, self.epochs, cap)
        loss_sum = 0.0
        correct = 0
        seen = 0
        order = torch.randperm(n, generator=self._generator)
        pos = 0
        model.train()
        for _ in range(steps):
            if pos >= n:
                order = torch.randperm(n, generator=self._generator)
                pos = 0
            idx = order[pos : pos + self.batch_size]
            pos += self.batch_size
            xb, yb = self._X[idx], self._y[idx]
            optimizer.zero_grad(set_to_none=True)
            out = model(xb)
            loss = loss_fn(out, yb)
            objective = loss
            if anchors:
                prox = sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors, strict=True)
                )
                objective = loss + (self.mu / 2) * prox
            objective.backward()
            optimizer.step()
            batch = int(idx.shape[0])
            loss_sum += float(loss.detach()) * batch
            correct += int((out.detach().argmax(dim=1) == yb).sum())
            seen += batch
        new_params = flat_from_state_dict(model.state_dict(), self._layout)
        return TrainResult(
            params=new_params,
            n_samples=n,
            metrics={"loss": loss_sum / seen, "accuracy": correct / seen, "steps": float(steps)},
        )

    def evaluate(
        self, params: F32Array, X: npt.NDArray[np.generic], y: npt.NDArray[np.generic]
    ) -> dict[str, float]:
        """Mean cross-entropy ``loss`` and ``accuracy`` of ``params`` on ``(X, y)``."""
        import torch

        from fedtier.client.torch_state import load_flat

        _check_params(params, self._layout)
        model = self._model
        load_flat(model.state_dict(), self._layout, params)
        xs = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        ys = torch.from_numpy(np.asarray(y).astype(np.int64))
        model.eval()
        with torch.no_grad():
            out = model(xs)
            loss = torch.nn.functional.cross_entropy(out, ys)
            accuracy = (out.argmax(dim=1) == ys).float().mean()
        return {"loss": float(loss), "accuracy": float(accuracy)}


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
