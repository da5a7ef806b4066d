"""Server optimizers the central applies to aggregates; pure numpy, imports no I/O, clock or log.

Imports numpy and ``protocol.errors`` only.

``model_{v+1} = model_v + server_step(aggregate)`` where the aggregate is the
pseudo-gradient ``sum n_i s(tau_i) delta_i / sum n_i`` (a descent direction, since
devices send ``trained - base``). FedAvg scales it by a server learning rate;
FedAdam and FedYogi follow Reddi et al. 2021, "Adaptive Federated Optimization",
Algorithm 2, with no bias correction and ``v`` initialised to ``tau ** 2``::

    m_t = beta1 * m_{t-1} + (1 - beta1) * delta
    v_t = beta2 * v_{t-1} + (1 - beta2) * delta**2                          (Adam)
    v_t = v_{t-1} - (1 - beta2) * delta**2 * sign(v_{t-1} - delta**2)       (Yogi)
    x_{t+1} = x_t + lr * m_t / (sqrt(v_t) + tau)

State is plain float32 arrays (``state_arrays``/``load_state_arrays``) so the
central persists it without pickle. Each optimizer is a small class: no
Strategy -> FedAvg -> FedOpt -> FedAdam chain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import ConfigError, LocalProtocolError

__all__ = [
    "FedAdam",
    "FedAvg",
    "FedYogi",
    "ServerOptimizer",
    "make_optimizer",
]


@runtime_checkable
class ServerOptimizer(Protocol):
    """Turns the current model and an aggregate into the next model."""

    @property
    def name(self) -> str:
        """Config name, e.g. ``"fedadam"``."""

    def step(
        self, model: npt.NDArray[np.float32], aggregate: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        """Return the next model as a new array; ``model`` and ``aggregate`` are not written."""

    def state_arrays(self) -> dict[str, npt.NDArray[Any]]:
        """Copies of the optimizer's state, to persist; empty when stateless or not started."""

    def load_state_arrays(self, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
        """Restore state saved by :meth:`state_arrays`; an empty mapping starts afresh."""


def _check_vectors(
    model: npt.NDArray[np.float32], aggregate: npt.NDArray[np.float32], size: int | None
) -> None:
    for what, array in (("model", model), ("aggregate", aggregate)):
        if not isinstance(array, np.ndarray) or array.dtype != np.float32 or array.ndim != 1:
            raise LocalProtocolError(
                f"server step needs a 1-D float32 {what}, got "
                f"{getattr(array, 'dtype', type(array).__name__)} "
                f"with shape {getattr(array, 'shape', None)}"
            )
    if model.shape != aggregate.shape:
        raise LocalProtocolError(
            f"model has {model.shape[0]} values but the aggregate has {aggregate.shape[0]}"
        )
    if size is not None and model.shape[0] != size:
        raise LocalProtocolError(
            f"model has {model.shape[0]} values but the optimizer state has {size}"
        )


def _positive(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise LocalProtocolError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _unit_interval(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise LocalProtocolError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


class FedAvg:
    """``model + lr * aggregate``; stateless.

    Args:
        lr: server learning rate; 1.0 applies the aggregate as is.
    """

    name = "fedavg"

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = _positive("lr", lr)

    def __repr__(self) -> str:
        return f"FedAvg(lr={self.lr!r})"

    def step(
        self, model: npt.NDArray[np.float32], aggregate: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        """Return ``model + lr * aggregate`` as a new array."""
        _check_vectors(model, aggregate, None)
        out = np.empty_like(model)
        if self.lr == 1.0:
            np.add(model, aggregate, out=out)
        else:
            np.multiply(aggregate, np.float32(self.lr), out=out)
            np.add(out, model, out=out)
        return out

    def state_arrays(self) -> dict[str, npt.NDArray[Any]]:
        """FedAvg has no state."""
        return {}

    def load_state_arrays(self, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
        """Accept only an empty mapping.

        Raises:
            LocalProtocolError: the mapping is not empty.
        """
        if arrays:
            raise LocalProtocolError(f"fedavg keeps no state, got arrays {sorted(arrays)}")


class _AdaptiveOptimizer:
    """Shared state and update of FedAdam and FedYogi; they differ only in ``v``."""

    name = "adaptive"

    def __init__(
        self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        self.lr = _positive("lr", lr)
        self.beta1 = _unit_interval("beta1", beta1)
        self.beta2 = _unit_interval("beta2", beta2)
        self.tau = _positive("tau", tau)
        self._m: npt.NDArray[np.float32] | None = None
        self._v: npt.NDArray[np.float32] | None = None
        self._steps = 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lr={self.lr!r}, beta1={self.beta1!r}, "
            f"beta2={self.beta2!r}, tau={self.tau!r}, steps={self._steps})"
        )

    @property
    def steps(self) -> int:
        """Server steps taken since the state was created."""
        return self._steps

    def _update_v(
        self, v: npt.NDArray[np.float32], squared: npt.NDArray[np.float32]
    ) -> None:  # pragma: no cover - each variant overrides it
        raise NotImplementedError

    def step(
        self, model: npt.NDArray[np.float32], aggregate: npt.NDArray[np.float32]
    ) -> npt.NDArray[np.float32]:
        """Apply one adaptive server step; returns the new model, updates ``m`` and ``v``."""
        _check_vectors(model, aggregate, None if self._m is None else self._m.shape[0])
        if self._m is None or self._v is None:
            self._m = np.zeros_like(model)
            self._v = np.full_like(model, self.tau**2)
        m, v = self._m, self._v
        scratch = np.empty_like(model)

        # m = beta1 * m + (1 - beta1) * delta
        m *= np.float32(self.beta1)
        np.multiply(aggregate, np.float32(1.0 - self.beta1), out=scratch)
        m += scratch

        np.square(aggregate, out=scratch)
        self._update_v(v, scratch)

        # x + lr * m / (sqrt(v) + tau)
        out = np.empty_like(model)
        np.sqrt(v, out=scratch)
        scratch += np.float32(self.tau)
        np.divide(m, scratch, out=out)
        out *= np.float32(self.lr)
        out += model
        self._steps += 1
        return out

    def state_arrays(self) -> dict[str, npt.NDArray[Any]]:
        """Copies of ``m``, ``v`` and the step count; empty before the first step."""
        if self._m is None or self._v is None:
            return {}
        return {
            "m": self._m.copy(),
            "v": self._v.copy(),
            "steps": np.array(self._steps, dtype=np.int64),
        }

    def load_state_arrays(self, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
        """Restore ``m``, ``v`` and ``steps``; an empty mapping starts afresh.

        Raises:
            LocalProtocolError: missing or extra keys, or arrays of the wrong shape,
                dtype or sign.
        """
        if not arrays:
            self._m = self._v = None
            self._steps = 0
            return
        if set(arrays) != {"m", "v", "steps"}:
            raise LocalProtocolError(
                f"{self.name} state needs arrays m, v and steps, got {sorted(arrays)}"
            )
        m, v, steps = arrays["m"], arrays["v"], arrays["steps"]
        for key, array in (("m", m), ("v", v)):
            if array.dtype != np.float32 or array.ndim != 1:
                raise LocalProtocolError(
                    f"{self.name} state {key} must be 1-D float32, got {array.dtype} {array.shape}"
                )
        if m.shape != v.shape:
            raise LocalProtocolError(
                f"{self.name} state m has {m.shape[0]} values but v has {v.shape[0]}"
            )
        if not bool(np.all(v >= 0)):
            raise LocalProtocolError(f"{self.name} state v has negative or NaN values")
        if steps.shape != () or steps.dtype.kind not in "iu" or int(steps) < 0:
            raise LocalProtocolError(
                f"{self.name} state steps must be a non-negative integer scalar, got {steps!r}"
            )
        self._m = m.astype(np.float32, copy=True)
        self._v = v.astype(np.float32, copy=True)
        self._steps = int(steps)


class FedAdam(_AdaptiveOptimizer):
    """FedAdam (Reddi et al. 2021, Algorithm 2): ``v = beta2 v + (1 - beta2) delta^2``.

    Args:
        lr: server learning rate ``eta``.
        beta1: first-moment decay.
        beta2: second-moment decay.
        tau: adaptivity ``tau``; ``v`` starts at ``tau ** 2``.
    """

    name = "fedadam"

    def _update_v(self, v: npt.NDArray[np.float32], squared: npt.NDArray[np.float32]) -> None:
        v *= np.float32(self.beta2)
        v += np.float32(1.0 - self.beta2) * squared


class FedYogi(_AdaptiveOptimizer):
    """FedYogi (Reddi et al. 2021, Algorithm 2): ``v -= (1 - beta2) delta^2 sign(v - delta^2)``.

    Args:
        lr: server learning rate ``eta``.
        beta1: first-moment decay.
        beta2: second-moment decay.
        tau: adaptivity ``tau``; ``v`` starts at ``tau ** 2``.
    """

    name = "fedyogi"

    def _update_v(self, v: npt.NDArray[np.float32], squared: npt.NDArray[np.float32]) -> None:
        direction = np.sign(v - squared)
        direction *= squared
        direction *= np.float32(1.0 - self.beta2)
        v -= direction


_OPTIMIZERS: dict[str, tuple[type[FedAvg] | type[_AdaptiveOptimizer], tuple[str, ...]]] = {
    "fedavg": (FedAvg, ("lr",)),
    "fedadam": (FedAdam, ("lr", "beta1", "beta2", "tau")),
    "fedyogi": (FedYogi, ("lr", "beta1", "beta2", "tau")),
}


def make_optimizer(name: str, **params: object) -> ServerOptimizer:
    """Build a server optimizer from its config name and parameters.

    Args:
        name: ``"fedavg"``, ``"fedadam"`` or ``"fedyogi"``.
        **params: ``lr`` for all; ``beta1``, ``beta2``, ``tau`` for the adaptive ones.

    Raises:
        ConfigError: an unknown name or parameter, or an unusable value.
    """
    if name not in _OPTIMIZERS:
        raise ConfigError(
            f"server optimizer {name!r} is unknown; expected one of {', '.join(_OPTIMIZERS)}"
        )
    cls, allowed = _OPTIMIZERS[name]
    kwargs: dict[str, float] = {}
    for key, value in params.items():
        if key not in allowed:
            raise ConfigError(
                f"server optimizer {name!r} has no parameter {key!r}; "
                f"expected some of {', '.join(allowed)}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"server optimizer {name!r} {key} is {value!r}; expected a number")
        kwargs[key] = float(value)
    try:
        return cls(**kwargs)
    except LocalProtocolError as exc:
        raise ConfigError(f"server optimizer {name!r} is unusable: {exc}") from exc
