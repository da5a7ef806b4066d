"""Staleness of an input and how much it still counts; imports no I/O, clock or logging.

Pure math: imports only the standard library and ``protocol.errors``.

A tier that knows model version ``v_t`` receives an update trained from
``base_version``. Its staleness is ``tau = v_t - base_version``. The tier rejects
``tau > max_staleness`` and otherwise weights the update by ``n_samples * s(tau)``.

A child partial is different: the device updates inside it were acknowledged to
their devices when the edge accepted them, so refusing the partial would lose
them. :meth:`StalenessPolicy.assess_acknowledged` never refuses; past
``max_staleness`` the input is *late* and still weighted by ``s(tau)``.

A *negative* raw staleness means the update names a version this tier has not
heard of yet (the central published it and the device got it first). Such an
update is not stale at all: it is accepted as ``tau = 0``. :func:`effective_tau`
clamps, and :meth:`StalenessPolicy.assess` reports ``ahead=True`` so the caller
decides whether to count it, log it, or wait for the model pointer to catch up.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal, get_args

from fedtier.protocol.errors import ConfigError, LocalProtocolError

__all__ = [
    "StalenessAssessment",
    "StalenessKind",
    "StalenessPolicy",
    "effective_tau",
]

StalenessKind = Literal["fedbuff", "polynomial", "hinge", "constant"]
_KINDS: frozenset[str] = frozenset(get_args(StalenessKind))
_CONFIG_KEYS = ("kind", "a", "b", "max_staleness")


def _is_int(value: object) -> bool:
    # bool is an int subclass; `max_staleness = true` in a config is a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def effective_tau(known_version: int, base_version: int) -> int:
    """Staleness of an update trained from ``base_version`` at a tier that knows ``known_version``.

    Args:
        known_version: the newest model version this tier knows.
        base_version: the version the update (or partial) was computed from.

    Returns:
        ``known_version - base_version``, clamped at 0: an update from a version
        this tier does not know yet counts as fresh.

    Raises:
        LocalProtocolError: a version is not a non-negative integer.
    """
    for name, value in (("known_version", known_version), ("base_version", base_version)):
        if not _is_int(value) or value < 0:
            raise LocalProtocolError(f"{name} must be a non-negative integer, got {value!r}")
    return max(0, known_version - base_version)


@dataclass(frozen=True, slots=True)
class StalenessAssessment:
    """What a tier concluded about one input's staleness.

    Attributes:
        raw_tau: ``known_version - base_version``, negative when the input is ahead.
        tau: the staleness used for weighting and histograms (``max(0, raw_tau)``).
        ahead: the input names a version newer than the tier knows.
        accepted: ``tau <= max_staleness``, or an acknowledged input (always).
        discount: ``s(tau)``, or 0.0 when not accepted.
        late: an acknowledged input past ``max_staleness``, folded anyway.
    """

    raw_tau: int
    tau: int
    ahead: bool
    accepted: bool
    discount: float
    late: bool = False


@dataclass(frozen=True, slots=True)
class StalenessPolicy:
    """A staleness function ``s(tau)`` and the largest staleness a tier accepts.

    Kinds:
        ``fedbuff``: ``1 / sqrt(1 + tau)`` (Nguyen et al., FedBuff; the default).
        ``polynomial``: ``(1 + tau) ** -a`` (Xie et al., FedAsync).
        ``hinge``: ``1`` if ``tau <= b`` else ``1 / (a * (tau - b) + 1)`` (FedAsync).
        ``constant``: ``1``.

    Attributes:
        kind: which function.
        a: exponent (polynomial) or slope (hinge); ignored by the other kinds.
        b: hinge point in versions (hinge only).
        max_staleness: the largest ``tau`` accepted, in versions.
    """

    kind: StalenessKind = "fedbuff"
    a: float = 0.5
    b: int = 4
    max_staleness: int = 16

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise LocalProtocolError(
                f"staleness kind {self.kind!r} is not one of {', '.join(sorted(_KINDS))}"
            )
        # a = 0 is allowed: it degenerates to the constant function, which is harmless.
        if isinstance(self.a, bool) or not isinstance(self.a, (int, float)):
            raise LocalProtocolError(f"staleness a must be a number, got {self.a!r}")
        if not math.isfinite(self.a) or self.a < 0:
            raise LocalProtocolError(f"staleness a must be finite and >= 0, got {self.a!r}")
        if not _is_int(self.b) or self.b < 0:
            raise LocalProtocolError(f"staleness b must be an integer >= 0, got {self.b!r}")
        if not _is_int(self.max_staleness) or self.max_staleness < 0:
            raise LocalProtocolError(
                f"max_staleness must be an integer >= 0, got {self.max_staleness!r}"
            )

    @classmethod
    def from_config(
        cls, mapping: Mapping[str, object], *, section: str = "staleness"
    ) -> StalenessPolicy:
        """Build a policy from a config table (e.g. a TOML ``[staleness]`` section).

        Missing keys take their defaults. Integers are accepted for ``a``.

        Args:
            mapping: keys ``kind``, ``a``, ``b``, ``max_staleness``.
            section: the table's name, used in error messages.

        Raises:
            ConfigError: an unknown key or an unusable value, named in one sentence.
        """
        unknown = sorted(str(k) for k in mapping if k not in _CONFIG_KEYS)
        if unknown:
            raise ConfigError(
                f"{section} has unknown key {unknown[0]!r}; expected some of "
                f"{', '.join(_CONFIG_KEYS)}"
            )
        kwargs: dict[str, object] = {}
        if "kind" in mapping:
            kind = mapping["kind"]
            if not isinstance(kind, str) or kind not in _KINDS:
                raise ConfigError(
                    f"{section}.kind is {kind!r}; expected one of {', '.join(sorted(_KINDS))}"
                )
            kwargs["kind"] = kind
        if "a" in mapping:
            a = mapping["a"]
            if isinstance(a, bool) or not isinstance(a, (int, float)):
                raise ConfigError(f"{section}.a is {a!r}; expected a number >= 0")
            kwargs["a"] = float(a)
        for key in ("b", "max_staleness"):
            if key in mapping:
                value = mapping[key]
                if not _is_int(value):
                    raise ConfigError(f"{section}.{key} is {value!r}; expected an integer >= 0")
                kwargs[key] = value
        try:
            return cls(**kwargs)  # type: ignore[arg-type]  # each value checked above
        except LocalProtocolError as exc:
            raise ConfigError(f"{section} is unusable: {exc}") from exc

    def weight(self, tau: int) -> float:
        """The discount ``s(tau)`` in ``(0, 1]``.

        Args:
            tau: staleness in versions, >= 0 (clamp a negative raw staleness with
                :func:`effective_tau` first). Not checked against ``max_staleness``.

        Raises:
            LocalProtocolError: ``tau`` is negative or not an integer.
        """
        if not _is_int(tau) or tau < 0:
            raise LocalProtocolError(
                f"staleness tau must be an integer >= 0 (see effective_tau), got {tau!r}"
            )
        if self.kind == "fedbuff":
            return 1.0 / math.sqrt(1.0 + tau)
        if self.kind == "polynomial":
            return float((1.0 + tau) ** -self.a)
        if self.kind == "hinge":
            return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)
        return 1.0

    def accepts(self, tau: int) -> bool:
        """Whether ``0 <= tau <= max_staleness``; a raw negative staleness is not accepted here."""
        return 0 <= tau <= self.max_staleness

    def assess(self, known_version: int, base_version: int) -> StalenessAssessment:
        """Staleness, acceptance and discount of one input in one call.

        Args:
            known_version: the newest model version this tier knows.
            base_version: the version the input was computed from.

        Raises:
            LocalProtocolError: a version is not a non-negative integer.
        """
        tau = effective_tau(known_version, base_version)
        raw_tau = known_version - base_version
        accepted = self.accepts(tau)
        return StalenessAssessment(
            raw_tau=raw_tau,
            tau=tau,
            ahead=raw_tau < 0,
            accepted=accepted,
            discount=self.weight(tau) if accepted else 0.0,
        )

    def assess_acknowledged(self, known_version: int, base_version: int) -> StalenessAssessment:
        """As :meth:`assess`, for an input acknowledged below this tier: never refused.

        A child partial carries device updates that their devices hold receipts
        for. Past ``max_staleness`` it is ``late``: accepted, weighted by
        ``s(tau)`` like any other input (never below the smallest normal float,
        so no delay can make its discount 0).

        Raises:
            LocalProtocolError: a version is not a non-negative integer.
        """
        assessment = self.assess(known_version, base_version)
        if assessment.accepted:
            return assessment
        discount = max(self.weight(assessment.tau), sys.float_info.min)
        return replace(assessment, accepted=True, discount=discount, late=True)
