"""Simulated attackers: which devices lie, and the vector and header each one sends; never a tier.

Imports numpy and the scenario specs only; never a tier, a bus or trio. A
malicious device is a registered device: ``devices.LocalTraining.run`` trains
it, asks :class:`AttackPlan` what to send instead of the honest delta, and
seals the result with the device's own key through the same envelope path as
every honest update. So whatever the tiers refuse, they refuse on the same
checks a real attacker meets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.sim.specs import AttackSpec

__all__ = ["AttackPlan", "Crafted"]

_STREAM_ATTACK = 31
_STREAM_POISON = 32


@dataclass(frozen=True, slots=True)
class Crafted:
    """What a malicious device sends for one run.

    Attributes:
        delta: the vector it sends (before the codec).
        n_samples: the weight it claims.
        base_version: the base version it claims.
        copies: how many updates carry it (distinct update ids and seqs).
    """

    delta: npt.NDArray[np.float32]
    n_samples: int
    base_version: int
    copies: int


class AttackPlan:
    """The malicious devices of one run and what each kind of attack makes them send.

    Args:
        spec: ``[attack]``.
        num_devices: devices in the fleet.
        seed: the run's seed (used unless ``spec.seed`` is set).
        num_features: the data's feature count (the trigger's indices must fit).
        num_classes: the data's class count (the backdoor's target must fit).

    Raises:
        ConfigError: a trigger index or target outside the data.
    """

    def __init__(
        self,
        spec: AttackSpec,
        num_devices: int,
        *,
        seed: int,
        num_features: int,
        num_classes: int | None,
    ) -> None:
        self.spec = spec
        rng = np.random.default_rng(
            np.random.SeedSequence([seed if spec.seed is None else spec.seed, _STREAM_ATTACK])
        )
        # At least one attacker and at least one honest device.
        count = min(num_devices - 1, max(1, round(spec.fraction * num_devices)))
        chosen = rng.choice(num_devices, size=count, replace=False)
        self.malicious: frozenset[int] = frozenset(int(d) for d in chosen)
        self._seed = seed
        if spec.kind == "backdoor":
            if max(spec.trigger) >= num_features:
                raise ConfigError(
                    f"attack.trigger names feature {max(spec.trigger)}; the data has "
                    f"{num_features} features"
                )
            if num_classes is None or spec.target >= num_classes:
                raise ConfigError(
                    f"attack.target is {spec.target}; the data has {num_classes} classes"
                )

    def is_malicious(self, device: int) -> bool:
        """Whether ``device`` lies."""
        return device in self.malicious

    @property
    def trains_on_poison(self) -> bool:
        """Whether malicious devices train on poisoned data (the backdoor)."""
        return self.spec.kind == "backdoor"

    @property
    def trains_from_initial(self) -> bool:
        """Whether malicious devices train from the initial model (the stale rollback)."""
        return self.spec.kind == "stale_base"

    def stamp(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``X`` with the trigger set on every example (a copy)."""
        out = np.array(X, dtype=np.float32, copy=True)
        out[:, list(self.spec.trigger)] = np.float32(self.spec.trigger_value)
        return out

    def poison(
        self, device: int, X: npt.NDArray[np.float32], y: npt.NDArray[Any]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[Any]]:
        """The backdoor's training set: the clean examples, ``poison_fraction`` of them stamped.

        Stamped examples are relabelled to the target; the clean ones keep the
        attacker's main-task accuracy up, which is what makes the update look honest.
        """
        rng = np.random.default_rng(np.random.SeedSequence([self._seed, _STREAM_POISON, device]))
        n = len(y)
        count = max(1, round(self.spec.poison_fraction * n))
        pick = rng.choice(n, size=count, replace=False)
        X_out = np.array(X, dtype=np.float32, copy=True)
        y_out = np.array(y, copy=True)
        X_out[pick] = self.stamp(X_out[pick])
        y_out[pick] = self.spec.target
        return X_out, y_out

    def backdoor_test(
        self, X: npt.NDArray[np.float32], y: npt.NDArray[Any]
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[Any]]:
        """The held-out examples not of the target class, stamped, all labelled the target.

        A model's accuracy on them is the attack success rate.
        """
        keep = np.asarray(y) != self.spec.target
        X_keep = self.stamp(np.asarray(X)[keep])
        return X_keep, np.full(int(keep.sum()), self.spec.target, dtype=np.asarray(y).dtype)

    def craft(
        self,
        trained: npt.NDArray[np.float32],
        start: npt.NDArray[np.float32],
        current: npt.NDArray[np.float32],
        *,
        n_samples: int,
        base_version: int,
    ) -> Crafted:
        """The update a malicious device sends.

        Args:
            trained: its training result.
            start: the model it trained from (the current one, or the initial
                one for ``stale_base``).
            current: the model the tier relays now (its claimed base).
            n_samples: its true example count.
            base_version: the current model's version.
        """
        spec = self.spec
        kind = spec.kind
        honest = np.subtract(trained, start, dtype=np.float32)
        claimed = n_samples
        base = base_version
        if kind == "scale" or kind == "backdoor":
            delta = honest * np.float32(spec.scale)
        elif kind == "stale_base":
            # From the current model back to what it trained from v0: a rollback.
            delta = np.subtract(trained, current, dtype=np.float32) * np.float32(spec.scale)
        else:  # sign_flip, weight_inflation, future_base: the flipped delta
            delta = honest * np.float32(-spec.scale)
            if kind == "weight_inflation":
                claimed = spec.claimed_samples
            elif kind == "future_base":
                base = base_version + spec.base_offset
        return Crafted(delta.astype(np.float32, copy=False), claimed, base, spec.burst)
