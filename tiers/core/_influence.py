"""Bounded influence per device, sans-IO: weight cap, norm bound, contribution cap, rate limit.

Imports the standard library and ``tiers.core._reputation`` only: no trio,
sqlite, OpenTelemetry, logging or clock. Time comes in as ``now`` (seconds on
the caller's monotonic clock).

Why each bound exists (a signed, registered device is not a trusted one):

* ``n_samples`` is self-reported, so the fold weight is ``min(n_samples, cap)``
  (:func:`capped_weight`); the capped value is what the tier stores, so a
  refold after a restart folds the same weight. The cap is per device
  (:meth:`InfluenceRules.weight_cap`): the data size the operator declared for
  it when registering it, else the fleet's default, which is the median of the
  declared sizes (``max_samples = "declared"``, :func:`declared_default`) or a
  fixed number; with ``"declared"`` a declared size above the median is
  capped at the median too. A weight-inflating attacker then weighs what it
  really holds (at most the median device), as a sign flip does; honest
  devices above the median lose some weight, which the study measured as
  within the seeds' spread, while a per-device cap alone let 20 % flippers
  with large data sets cost three times more.
* a norm bound is always on: :class:`NormBound` is either fixed or adaptive
  (``factor`` times a quantile of the last ``window`` accepted norms, with the
  configured bound until ``warmup`` norms were seen). Each observed norm is
  first clamped to the bound in force, so one huge update moves the quantile by
  at most one rank, and the bound can grow by at most ``factor`` per window.
* :class:`ContributionCounter`: at most ``limit`` accepted updates per device
  while the tier knows one model version (keyed by the tier's version, not the
  update's base, so a refused update resent after the next version can pass).
* :class:`TokenBuckets`: ``rate`` updates per second per device, ``burst`` at
  once; an update over the limit learns how long to wait.

State lives in :class:`InfluenceState`, owned by the caller (the edge daemon,
or a test); it is not persisted. After a restart the rate limits start full,
the contribution counts start empty and the adaptive norm bound restarts its
warm-up from the configured bound: admission only decides, the store keeps the
weight and clip factor each accepted update was folded with, so a restart never
changes what was folded, only how the next inputs are judged.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

from fedtier.tiers.core._reputation import Reputation, ReputationRules

__all__ = [
    "DEFAULT_BURST",
    "DEFAULT_MAX_SAMPLES",
    "DEFAULT_MAX_UPDATES_PER_VERSION",
    "DEFAULT_RATE_PER_S",
    "DEFAULT_WARMUP_NORM",
    "AdaptiveNorm",
    "ContributionCounter",
    "DeclaredCaps",
    "InfluenceRules",
    "InfluenceState",
    "NormBound",
    "TokenBuckets",
    "capped_weight",
    "declared_default",
]

NormMode = Literal["fixed", "adaptive"]

# The edge daemon's defaults, in one home: tiers.config reads them for a config
# file and the simulator's ``[defences]`` for its "on" runs (the poisoning study
# measures what the daemon would do). The adaptive norm's quantile, factor,
# window and warm-up are :class:`AdaptiveNorm`'s defaults.
DEFAULT_WARMUP_NORM: Final = 10.0
"""The adaptive norm bound's warm-up value when ``max_norm`` is not given."""
DEFAULT_MAX_SAMPLES: Final = 10_000
"""The fleet's weight cap when no device has a declared data size (or no cap is configured)."""
DEFAULT_MAX_UPDATES_PER_VERSION: Final = 8
"""Accepted updates per device while the tier knows one version."""
DEFAULT_RATE_PER_S: Final = 2.0
"""Updates per second per device (the token bucket's refill)."""
DEFAULT_BURST: Final = 10.0
"""The token bucket's size."""
_NO_SIZES: Final[Mapping[str, int]] = MappingProxyType({})


def capped_weight(n_samples: int, cap: int | None) -> int:
    """The weight an update is folded with: its ``n_samples``, at most ``cap`` (None: no cap)."""
    if cap is None:
        return n_samples
    return min(n_samples, cap)


def declared_default(sizes: Iterable[int], fallback: int | None) -> int | None:
    """The fleet's weight cap for a device without a declared size.

    The median of the declared sizes (rounded down, at least 1), or
    ``fallback`` when none is declared. The median, not the largest: 20% of
    undeclared devices that all claim the largest size would outweigh the rest
    of a quantity-skewed fleet (docs/results.md, section 7).
    """
    values = list(sizes)
    if not values:
        return fallback
    return max(1, int(statistics.median(values)))


@dataclass(frozen=True, slots=True)
class AdaptiveNorm:
    """Settings of the adaptive norm bound.

    Attributes:
        quantile: the quantile of recent accepted norms, in (0, 1].
        factor: the bound is ``factor`` times that quantile, > 0.
        window: how many recent norms are kept (the memory bound), >= 1.
        warmup: how many norms are needed before the quantile is used, >= 1;
            until then the configured bound holds.
    """

    quantile: float = 0.5
    factor: float = 3.0
    window: int = 256
    warmup: int = 16

    def __post_init__(self) -> None:
        if not 0.0 < self.quantile <= 1.0:
            raise ValueError(f"norm quantile {self.quantile} is not in (0, 1]")
        if not (math.isfinite(self.factor) and self.factor > 0.0):
            raise ValueError(f"norm factor {self.factor} is not a finite number > 0")
        if self.window < 1 or self.warmup < 1 or self.warmup > self.window:
            raise ValueError(
                f"norm window {self.window} and warmup {self.warmup}: expected "
                "1 <= warmup <= window"
            )


class NormBound:
    """The L2 bound in force: fixed, or adaptive from recent accepted norms.

    Memory is ``window`` floats (a ring and the same values sorted); ``observe``
    costs O(window) at worst, a few microseconds for the default 256.

    Args:
        initial: the fixed bound, or the adaptive bound's warm-up value; > 0.
        adaptive: the adaptive settings, None for a fixed bound.
    """

    def __init__(self, initial: float, adaptive: AdaptiveNorm | None = None) -> None:
        if not (math.isfinite(initial) and initial > 0.0):
            raise ValueError(f"norm bound {initial} is not a finite number > 0")
        self.initial = initial
        self.adaptive = adaptive
        self._ring: deque[float] = deque()
        self._sorted: list[float] = []

    @property
    def mode(self) -> NormMode:
        """``fixed`` or ``adaptive``."""
        return "fixed" if self.adaptive is None else "adaptive"

    def bound(self) -> float:
        """The bound now."""
        adaptive = self.adaptive
        if adaptive is None or len(self._sorted) < adaptive.warmup:
            return self.initial
        values = self._sorted
        rank = min(len(values) - 1, max(0, math.ceil(adaptive.quantile * len(values)) - 1))
        value = adaptive.factor * values[rank]
        # A fleet whose accepted norms are all 0 would otherwise refuse everything.
        return value if value > 0.0 else self.initial

    def observe(self, norm: float) -> None:
        """Record the norm of an accepted update (clamped to the bound in force)."""
        adaptive = self.adaptive
        if adaptive is None or not math.isfinite(norm):
            return
        value = min(max(norm, 0.0), self.bound())
        if len(self._ring) == adaptive.window:
            old = self._ring.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        self._ring.append(value)
        bisect.insort(self._sorted, value)


class ContributionCounter:
    """At most ``limit`` accepted updates per device while the tier knows one version.

    Memory: one count per device that contributed at the current version.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"contribution limit {limit} is not >= 1")
        self.limit = limit
        self._version: int | None = None
        self._counts: dict[str, int] = {}

    def _at(self, version: int) -> dict[str, int]:
        if version != self._version:
            self._version = version
            self._counts = {}
        return self._counts

    def full(self, sender: str, version: int) -> bool:
        """Whether ``sender`` has used its share at ``version``."""
        return self._at(version).get(sender, 0) >= self.limit

    def add(self, sender: str, version: int) -> None:
        """Count one accepted update of ``sender`` at ``version``."""
        counts = self._at(version)
        counts[sender] = counts.get(sender, 0) + 1


class TokenBuckets:
    """A token bucket per device: ``rate`` tokens per second, at most ``burst``.

    Memory: one (tokens, time) pair per device seen, so bounded by the registry
    (only authenticated senders reach it).
    """

    def __init__(self, rate: float, burst: float) -> None:
        if not (math.isfinite(rate) and rate > 0.0):
            raise ValueError(f"rate {rate} is not a finite number > 0")
        if not (math.isfinite(burst) and burst >= 1.0):
            raise ValueError(f"burst {burst} is not a finite number >= 1")
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, sender: str, now: float) -> float:
        """Take a token for ``sender`` at ``now``; 0.0 when taken, else seconds until one is due."""
        tokens, last = self._buckets.get(sender, (self.burst, now))
        # A clock that goes backwards (a restored fake clock) refills nothing.
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[sender] = (tokens - 1.0, now)
            return 0.0
        self._buckets[sender] = (tokens, now)
        return (1.0 - tokens) / self.rate


@dataclass(frozen=True, slots=True)
class InfluenceRules:
    """How much one device may weigh; every bound off by default (the simulator's choice).

    Attributes:
        max_samples: the weight cap of a device without a declared size (None:
            its raw ``n_samples``); with ``derive_cap``, the fallback when no
            device has one.
        adaptive_norm: adapt the norm bound (``AdmissionRules.max_norm`` is then
            its warm-up value); None keeps ``max_norm`` fixed.
        max_updates_per_version: accepted updates per device while the tier knows
            one version (None: unlimited).
        rate_per_s: updates per second per device (None: unlimited).
        burst: the token bucket's size.
        reject_future_base: refuse an update whose base version is above the
            tier's (``future_base``).
        declared: sender key id -> the data size registered for that device
            (``max_samples`` of its key registry entry): its weight cap. A device
            rotating its key holds two entries for a while and counts twice in
            the median; that moves the median by at most a rank per such device.
        derive_cap: ``max_samples = "declared"``: a device without a declared
            size is capped at the median of the declared sizes
            (:func:`declared_default`), or at ``max_samples`` when there are none;
            a device with one at the smaller of its size and that median.
        reputation: the edge's per-device reputation (``tiers.core._reputation``):
            a device whose summed updates point against the model's movement is
            down-weighted; None: off.
    """

    max_samples: int | None = None
    adaptive_norm: AdaptiveNorm | None = None
    max_updates_per_version: int | None = None
    rate_per_s: float | None = None
    burst: float = 1.0
    reject_future_base: bool = False
    declared: Mapping[str, int] = field(default_factory=lambda: _NO_SIZES, hash=False)
    derive_cap: bool = False
    reputation: ReputationRules | None = None
    _default_cap: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples {self.max_samples} is not >= 1")
        bad = next((k for k, v in self.declared.items() if v < 1), None)
        if bad is not None:
            raise ValueError(f"declared size {self.declared[bad]} of {bad} is not >= 1")
        # A read-only copy: the caller's dict may change, the rules may not.
        object.__setattr__(self, "declared", MappingProxyType(dict(self.declared)))
        default = (
            declared_default(self.declared.values(), self.max_samples)
            if self.derive_cap
            else self.max_samples
        )
        object.__setattr__(self, "_default_cap", default)

    @property
    def default_cap(self) -> int | None:
        """The weight cap of a device without a declared size (None: no cap)."""
        return self._default_cap

    def weight_cap(self, sender: str | None) -> int | None:
        """The weight cap of ``sender``'s updates.

        Its declared size, else the fleet's default; with ``derive_cap`` (the
        edge's default) also never above the median declared size, so that no
        single device weighs more than the median device: a device with less
        data keeps its smaller weight, and a device that holds (or was
        registered with) a large data set cannot use it to outweigh honest
        ones. Measured (docs/results.md, section 7): with each device capped at
        its own size only, 20 % sign-flipping devices cost 8.7 points, at the
        median 3.0.
        """
        if sender is not None:
            size = self.declared.get(sender)
            if size is not None:
                if self.derive_cap and self._default_cap is not None:
                    return min(size, self._default_cap)
                return size
        return self._default_cap

    def with_declared(self, declared: Mapping[str, int]) -> InfluenceRules:
        """These rules with the declared sizes of a (re)loaded key registry."""
        return InfluenceRules(
            max_samples=self.max_samples,
            adaptive_norm=self.adaptive_norm,
            max_updates_per_version=self.max_updates_per_version,
            rate_per_s=self.rate_per_s,
            burst=self.burst,
            reject_future_base=self.reject_future_base,
            declared=declared,
            derive_cap=self.derive_cap,
            reputation=self.reputation,
        )

    def for_sender(self, sender: str | None) -> InfluenceRules:
        """These rules with ``max_samples`` set to ``sender``'s weight cap.

        What a caller of ``admit_update`` passes, since admission caps every
        update at ``max_samples``: the device's declared size, or the fleet's default.
        """
        cap = self.weight_cap(sender)
        if cap == self.max_samples and not self.declared and not self.derive_cap:
            return self
        return InfluenceRules(
            max_samples=cap,
            adaptive_norm=self.adaptive_norm,
            max_updates_per_version=self.max_updates_per_version,
            rate_per_s=self.rate_per_s,
            burst=self.burst,
            reject_future_base=self.reject_future_base,
            reputation=self.reputation,
        )


class DeclaredCaps:
    """Each device's weight cap from the key registry's declared sizes, current after a reload.

    Admission caps an update at ``rules.influence.max_samples``; the caller
    passes :meth:`rules_for` the sender's rules. The rules with the registry's
    sizes are rebuilt only when the registry hands out a new mapping
    (``KeyRegistry.declared_samples`` returns the same object until a reload).

    Args:
        rules: the configured bounds (``derive_cap`` and ``max_samples`` as the config says).
    """

    def __init__(self, rules: InfluenceRules) -> None:
        self.rules = rules
        self._source: Mapping[str, int] | None = None
        self._current = rules

    def current(self, declared: Mapping[str, int]) -> InfluenceRules:
        """The bounds with ``declared`` (key id -> declared data size) applied."""
        if declared is not self._source:
            self._current = self.rules.with_declared(declared)
            self._source = declared
        return self._current

    def rules_for(self, declared: Mapping[str, int], sender: str | None) -> InfluenceRules:
        """The bounds to admit ``sender``'s update with: ``max_samples`` is its cap."""
        return self.current(declared).for_sender(sender)


class InfluenceState:
    """The mutable side of the influence bounds, owned by the tier that admits updates.

    Args:
        rules: the bounds.
        max_norm: the fixed norm bound or the adaptive one's warm-up value; None
            for no bound (only behind an unsafe switch at the edge).
    """

    def __init__(self, rules: InfluenceRules, max_norm: float | None) -> None:
        self.rules = rules
        self.norm = NormBound(max_norm, rules.adaptive_norm) if max_norm is not None else None
        self.contributions = (
            ContributionCounter(rules.max_updates_per_version)
            if rules.max_updates_per_version is not None
            else None
        )
        self.buckets = (
            TokenBuckets(rules.rate_per_s, rules.burst) if rules.rate_per_s is not None else None
        )
        reputation = rules.reputation
        self.reputation = (
            Reputation(reputation) if reputation is not None and reputation.enabled else None
        )

    def down_weighted(self, rules: InfluenceRules, sender: str | None) -> InfluenceRules | None:
        """``rules`` with ``sender``'s cap lowered by its reputation; None when it is not low.

        The caller admits the update with the returned rules (admission caps its
        weight at ``max_samples``, and the store keeps that weight), counts the
        down-weighting and traces it.
        """
        reputation = self.reputation
        if reputation is None or sender is None or not reputation.low(sender):
            return None
        return dataclasses.replace(
            rules, max_samples=reputation.weight_cap(sender, rules.max_samples)
        )

    def norm_bound(self) -> float | None:
        """The norm bound in force (None: none)."""
        return None if self.norm is None else self.norm.bound()

    def accepted(self, sender: str, version: int, norm: float) -> None:
        """Book an accepted update: its share of the version and its norm."""
        if self.contributions is not None:
            self.contributions.add(sender, version)
        if self.norm is not None:
            self.norm.observe(norm)
