"""Who moved each model version: every device's share of a version's step; numpy and tiers only.

Imports numpy and the tier core's fold (``tiers.core.fold_message``, so an
input is attributed with exactly the weights admission folded it with); never
a bus, trio or an engine. Kept only for runs with ``[attack]`` or
``[defences]``: it costs one float64 vector per device per open buffer.

The fold is linear, so a version's step ``numerator / sample_count`` is the sum
of one vector per device: what its updates added (``n * s(tau) * clip * delta``),
times every upper tier's discount of the partials that carried them, over the
version's ``sample_count``. A device's *move* is the L2 norm of its vector, its
*share* that move over the sum of every device's move (so shares add up to 1,
whatever cancels), and its *weight share* its admitted ``n_samples`` over the
version's. Outliers a robust cut quarantines are attributed nothing. Under a
robust rule (median, trimmed mean) a partial is no longer a sum of its inputs;
the kept inputs are then attributed what the weighted fold would have given
them, which over-states an extreme input (its coordinates were trimmed).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedtier.tiers.core import AcceptedInput, Accumulator, fold_message

__all__ = ["Attribution", "Contributions", "VersionInfluence", "merge", "summary"]

Contributions = dict[str, tuple[npt.NDArray[np.float64], float]]
"""Per sender key id: its numerator vector (float64) and its admitted weight."""


@dataclass(frozen=True, slots=True)
class VersionInfluence:
    """How much the largest single device (and the largest attacker) moved one version.

    Attributes:
        version: the model version.
        sample_count: the version's ``sample_count`` (sum of admitted weights).
        step_norm: L2 norm of the aggregate step ``numerator / sample_count``.
        devices: devices with a non-zero weight in it.
        top_move: the largest single device's move (L2 of its part of the step).
        top_share: that move over the sum of every device's move.
        top_weight_share: the largest single device's admitted weight over ``sample_count``.
        top_is_attacker: whether the device with the largest move is malicious.
        attacker_move: the largest move of a malicious device (0 when none took part).
        attacker_share: the largest share of a malicious device.
        attacker_weight: the largest admitted weight of a malicious device.
    """

    version: int
    sample_count: float
    step_norm: float
    devices: int
    top_move: float
    top_share: float
    top_weight_share: float
    top_is_attacker: bool
    attacker_move: float
    attacker_share: float
    attacker_weight: float


class Attribution:
    """Per-device contributions through every buffer, partial and version of one run.

    Args:
        malicious: key ids of the malicious devices.
    """

    def __init__(self, malicious: Collection[str] = ()) -> None:
        self.malicious = frozenset(malicious)
        self._partials: dict[bytes, Contributions] = {}
        self.versions: list[VersionInfluence] = []

    @staticmethod
    def of_input(accepted: AcceptedInput, num_params: int) -> Contributions:
        """What one admitted input adds, per device (a device update: its sender alone)."""
        one = Accumulator(num_params, hist_buckets=1)
        fold_message(
            one,
            accepted.message,
            accepted.payload,
            tau=accepted.tau,
            discount=accepted.discount,
            clip_scale=accepted.clip_scale,
            n_samples=accepted.n_samples,
        )
        return {accepted.sender: (one.numerator.astype(np.float64), one.sample_count)}

    def of_partial(self, partial_id: bytes, discount: float) -> Contributions:
        """A child partial's contributions, discounted as the fold discounts its numerator."""
        carried = self._partials.pop(partial_id, {})
        return {key: (vec * discount, weight) for key, (vec, weight) in carried.items()}

    def sealed(self, partial_id: bytes, parts: list[Contributions]) -> None:
        """Record the contributions of a partial cut from ``parts`` (its kept inputs)."""
        self._partials[partial_id] = merge(parts)

    def version(self, version: int, sample_count: float, parts: list[Contributions]) -> None:
        """Record the influence of each device on a new version made from ``parts``."""
        merged = merge(parts)
        if not merged or sample_count <= 0.0:
            return
        total = np.zeros_like(next(iter(merged.values()))[0])
        moves: dict[str, float] = {}
        for key, (vec, _weight) in merged.items():
            total += vec
            moves[key] = float(np.linalg.norm(vec)) / sample_count
        move_sum = sum(moves.values())
        top = max(moves, key=lambda k: moves[k])
        attackers = [k for k in moves if k in self.malicious]
        self.versions.append(
            VersionInfluence(
                version=version,
                sample_count=sample_count,
                step_norm=float(np.linalg.norm(total)) / sample_count,
                devices=len(merged),
                top_move=moves[top],
                top_share=_share(moves[top], move_sum),
                top_weight_share=max(w for _v, w in merged.values()) / sample_count,
                top_is_attacker=top in self.malicious,
                attacker_move=max((moves[k] for k in attackers), default=0.0),
                attacker_share=max((_share(moves[k], move_sum) for k in attackers), default=0.0),
                attacker_weight=max((merged[k][1] for k in attackers), default=0.0),
            )
        )


def merge(parts: list[Contributions]) -> Contributions:
    """Sum contributions per device."""
    out: Contributions = {}
    for part in parts:
        for key, (vec, weight) in part.items():
            known = out.get(key)
            if known is None:
                out[key] = (vec.copy(), weight)
            else:
                out[key] = (known[0] + vec, known[1] + weight)
    return out


def _share(move: float, total: float) -> float:
    return move / total if total > 0.0 and math.isfinite(total) else 0.0


def summary(versions: list[VersionInfluence]) -> Mapping[str, float]:
    """The largest values over a run's versions (what a study table shows)."""
    if not versions:
        return {}
    return {
        "max_top_share": max(v.top_share for v in versions),
        "max_top_weight_share": max(v.top_weight_share for v in versions),
        "max_attacker_share": max(v.attacker_share for v in versions),
        "max_attacker_move": max(v.attacker_move for v in versions),
        "mean_attacker_share": float(np.mean([v.attacker_share for v in versions])),
    }
