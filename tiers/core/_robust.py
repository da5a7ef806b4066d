"""Robust aggregation within one cut of a buffer, sans-IO: the robust centre, outlier scores, rules.

Pure numpy on a matrix of the buffer's per-input vectors; imports the tier math
and ``protocol.errors`` only: no trio, sqlite, OpenTelemetry, logging or clock.

FedBuff folds each input into a running sum and forgets it; a median or a
trimmed mean needs every input at once. So while ``[robust]`` is on, the open
buffer keeps what it folded (``TierBuffer.inputs``) and the cut
(``tiers.core._cut.robust_cut``) turns each input into its point ``x_i``: the
vector it adds to the numerator divided by what it adds to the sample count
(a device update's discounted, clipped delta; a child partial's discounted
aggregate delta). Everything here is a pure function of those points, in fold
order, so a refold after a crash makes the same decisions
(docs/architecture.md, robust aggregation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import LocalProtocolError
from fedtier.tiers.aggregate import coordinate_median, trimmed_mean

__all__ = [
    "MAD_SCALE",
    "OUTLIER_SCORES",
    "ROBUST_RULES",
    "OutlierScore",
    "RobustDecision",
    "RobustRule",
    "RobustRules",
    "decide_outliers",
    "outlier_distances",
    "robust_centre",
    "robust_mean",
    "robust_z",
]

RobustRule: TypeAlias = Literal["none", "trimmed_mean", "median"]
OutlierScore: TypeAlias = Literal["none", "norm", "cosine"]
ROBUST_RULES: Final[tuple[RobustRule, ...]] = ("none", "trimmed_mean", "median")
OUTLIER_SCORES: Final[tuple[OutlierScore, ...]] = ("none", "norm", "cosine")

MAD_SCALE: Final = 1.4826
"""Scales a median absolute deviation to a standard deviation for normal data."""
# With more than half of the distances equal, the MAD is 0; the scale then falls
# back to a millionth of the median distance, so float noise among equal honest
# inputs is no outlier while an input with a real distance still is.
_REL_FLOOR: Final = 1e-6


@dataclass(frozen=True, slots=True)
class RobustRules:
    """A tier's ``[robust]`` table: how one buffer's inputs become its partial.

    The default changes nothing: the buffer keeps no inputs and the partial is
    FedBuff's streaming fold, bit for bit.

    Attributes:
        rule: ``none`` (the weighted FedBuff sum), ``trimmed_mean`` or ``median``
            (coordinate-wise, each input counting once); the partial's numerator
            is then the robust mean times the kept inputs' sample count.
        trim: the fraction cut from each end by ``trimmed_mean``, in [0, 0.5).
        outlier_score: ``none``, ``norm`` (L2 distance to the coordinate-wise
            median) or ``cosine`` (the angle to it, in radians).
        threshold: an input whose robust z-score of that distance exceeds this,
            and whose distance is at least ``min_ratio`` times the median
            distance, is an outlier: quarantined at the cut, not folded.
        min_ratio: the second condition. A MAD from a dozen inputs is noisy:
            with the z-score alone, 5-15 % of honest cuts would lose an input
            (measured on Gaussian inputs, 4 to 32 inputs, 8 to 4096 values);
            with both, none did at the defaults.
        min_inputs: cuts with fewer inputs are not scored (no centre to speak of).
    """

    rule: RobustRule = "none"
    trim: float = 0.1
    outlier_score: OutlierScore = "none"
    threshold: float = 3.5
    min_ratio: float = 3.0
    min_inputs: int = 3

    def __post_init__(self) -> None:
        if self.rule not in ROBUST_RULES:
            raise LocalProtocolError(f"robust rule {self.rule!r} is not one of {ROBUST_RULES}")
        if self.outlier_score not in OUTLIER_SCORES:
            raise LocalProtocolError(
                f"outlier score {self.outlier_score!r} is not one of {OUTLIER_SCORES}"
            )
        if not 0.0 <= self.trim < 0.5:
            raise LocalProtocolError(f"robust trim must be in [0, 0.5), got {self.trim!r}")
        # Below ~0.67 a MAD-based score could flag half of any honest buffer.
        if not (math.isfinite(self.threshold) and self.threshold >= 1.0):
            raise LocalProtocolError(
                f"outlier threshold must be a finite number >= 1, got {self.threshold!r}"
            )
        if not (math.isfinite(self.min_ratio) and self.min_ratio >= 1.0):
            raise LocalProtocolError(
                f"outlier min_ratio must be a finite number >= 1, got {self.min_ratio!r}"
            )
        if self.min_inputs < 3:
            raise LocalProtocolError(f"robust min_inputs must be >= 3, got {self.min_inputs!r}")

    @property
    def enabled(self) -> bool:
        """Whether the buffer must keep its inputs for the cut."""
        return self.rule != "none" or self.outlier_score != "none"


@dataclass(frozen=True, slots=True)
class RobustDecision:
    """Which inputs of one cut are outliers, and why.

    Attributes:
        outliers: indices (fold order) of the inputs to quarantine, ascending.
        distances: each input's distance to the robust centre (empty when not scored).
        scores: each input's robust z-score of that distance (empty when not scored).
    """

    outliers: tuple[int, ...]
    distances: tuple[float, ...]
    scores: tuple[float, ...]


def robust_centre(points: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The coordinate-wise median of the rows of ``points``: the centre outliers are scored from."""
    return coordinate_median(points)


def outlier_distances(
    points: npt.NDArray[np.float32], centre: npt.NDArray[np.float32], score: OutlierScore
) -> npt.NDArray[np.float64]:
    """Each row's distance to ``centre``: L2 (``norm``) or the angle in radians (``cosine``).

    The angle rather than ``1 - cos``: that is about half the angle squared,
    which would square every ratio between distances. Row by row, so no second
    ``inputs x params`` matrix is allocated; dot products are taken in float64.
    A zero centre or a zero row is at a right angle: nothing to agree with.

    Raises:
        LocalProtocolError: ``score`` is ``none`` or unknown.
    """
    if score not in ("norm", "cosine"):
        raise LocalProtocolError(f"no distance for outlier score {score!r}")
    centre64 = centre.astype(np.float64)
    centre_norm = math.sqrt(float(np.dot(centre64, centre64)))
    out = np.empty(points.shape[0], dtype=np.float64)
    for i, row in enumerate(points):
        row64 = row.astype(np.float64)
        if score == "norm":
            diff = row64 - centre64
            out[i] = math.sqrt(float(np.dot(diff, diff)))
        else:
            row_norm = math.sqrt(float(np.dot(row64, row64)))
            if row_norm == 0.0 or centre_norm == 0.0:
                out[i] = math.pi / 2
            else:
                cosine = float(np.dot(row64, centre64)) / (row_norm * centre_norm)
                out[i] = math.acos(min(1.0, max(-1.0, cosine)))
    return out


def robust_z(distances: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``(d - median(d)) / (MAD_SCALE * MAD(d))``, one-sided: only far inputs score high.

    At least half of the inputs lie within one MAD of the median distance, so at
    most half can score above any threshold >= 1: the honest majority is never
    the outlier.
    """
    med = float(np.median(distances))
    mad = float(np.median(np.abs(distances - med)))
    scale = max(MAD_SCALE * mad, _REL_FLOOR * abs(med), np.finfo(np.float64).tiny)
    return np.asarray((distances - med) / scale, dtype=np.float64)


def decide_outliers(
    points: npt.NDArray[np.float32],
    rules: RobustRules,
    *,
    exempt: Sequence[bool] = (),
) -> RobustDecision:
    """Score every row of ``points`` against their coordinate-wise median and pick the outliers.

    Args:
        points: ``(inputs, params)``, one row per input in fold order.
        rules: the tier's ``[robust]`` rules.
        exempt: per row, whether it may not be quarantined (an operator
            released it from the quarantine); it still counts for the centre.

    Raises:
        LocalProtocolError: ``points`` is not a non-empty 2-D matrix.
    """
    if points.ndim != 2 or points.shape[0] < 1:
        raise LocalProtocolError(f"robust scoring needs (inputs, params), got {points.shape}")
    n = points.shape[0]
    if rules.outlier_score == "none" or n < rules.min_inputs:
        return RobustDecision((), (), ())
    distances = outlier_distances(points, robust_centre(points), rules.outlier_score)
    scores = robust_z(distances)
    far = rules.min_ratio * float(np.median(distances))
    outliers = tuple(
        i
        for i in range(n)
        if scores[i] > rules.threshold
        and distances[i] > far
        and not (i < len(exempt) and exempt[i])
    )
    return RobustDecision(
        outliers, tuple(float(d) for d in distances), tuple(float(z) for z in scores)
    )


def robust_mean(points: npt.NDArray[np.float32], rules: RobustRules) -> npt.NDArray[np.float32]:
    """The rule's centre of the kept rows: coordinate-wise median or trimmed mean.

    Raises:
        LocalProtocolError: the rule is ``none`` (the FedBuff sum needs no centre).
    """
    if rules.rule == "median":
        return coordinate_median(points)
    if rules.rule == "trimmed_mean":
        return trimmed_mean(points, rules.trim)
    raise LocalProtocolError(f"robust rule {rules.rule!r} has no centre")
