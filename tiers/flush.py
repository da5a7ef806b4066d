"""When a tier flushes its open buffer; time is an argument, it imports no clock, I/O or logging.

Imports only the standard library and ``protocol.errors``.

A buffer flushes when it holds ``max_inputs`` inputs, when its sample weight
reaches ``min_sample_weight``, or when its oldest input is ``max_age_s`` old. All
times are seconds on the caller's monotonic clock (``trio.current_time()``); a
daemon sleeps with ``trio.move_on_at(policy.deadline_at(oldest))`` and then asks
:meth:`FlushPolicy.should_flush`, which treats reaching the deadline exactly as due.
An empty buffer never flushes.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeGuard

from fedtier.protocol.errors import ConfigError, LocalProtocolError

__all__ = ["FlushPolicy", "FlushReason"]

_CONFIG_KEYS = ("max_inputs", "min_sample_weight", "max_age_s")


class FlushReason(enum.StrEnum):
    """Why a buffer flushed; the values are metric labels."""

    COUNT = "count"
    WEIGHT = "weight"
    DEADLINE = "deadline"


def _is_number(value: object) -> TypeGuard[int | float]:
    # bool is an int subclass; `max_age_s = true` in a config is a mistake.
    return not isinstance(value, bool) and isinstance(value, (int, float))


@dataclass(frozen=True, slots=True)
class FlushPolicy:
    """Thresholds that close a buffer; any one of them is enough.

    Attributes:
        max_inputs: flush at this many direct inputs, >= 1.
        min_sample_weight: flush once ``sum n_i`` reaches this, or None for no
            weight trigger.
        max_age_s: flush once the oldest input is this many seconds old, or None
            for no deadline.
    """

    max_inputs: int = 10
    min_sample_weight: float | None = None
    max_age_s: float | None = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.max_inputs, bool) or not isinstance(self.max_inputs, int):
            raise LocalProtocolError(f"max_inputs must be an integer, got {self.max_inputs!r}")
        if self.max_inputs < 1:
            raise LocalProtocolError(f"max_inputs must be >= 1, got {self.max_inputs!r}")
        for name, value in (
            ("min_sample_weight", self.min_sample_weight),
            ("max_age_s", self.max_age_s),
        ):
            if value is None:
                continue
            if not _is_number(value) or not math.isfinite(value) or value <= 0:
                raise LocalProtocolError(
                    f"{name} must be None or a finite number > 0, got {value!r}"
                )

    @classmethod
    def from_config(cls, mapping: Mapping[str, object], *, section: str = "flush") -> FlushPolicy:
        """Build a policy from a config table (e.g. a TOML ``[flush]`` section).

        Missing keys take their defaults. TOML has no null, so ``false`` (or None
        from Python) switches ``min_sample_weight`` or ``max_age_s`` off.

        Args:
            mapping: keys ``max_inputs``, ``min_sample_weight``, ``max_age_s``.
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
        if "max_inputs" in mapping:
            value = mapping["max_inputs"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{section}.max_inputs is {value!r}; expected an integer >= 1")
            kwargs["max_inputs"] = value
        for key in ("min_sample_weight", "max_age_s"):
            if key not in mapping:
                continue
            value = mapping[key]
            if value is None or value is False:
                kwargs[key] = None
            elif _is_number(value) and math.isfinite(value) and value > 0:
                kwargs[key] = float(value)
            else:
                raise ConfigError(
                    f"{section}.{key} is {value!r}; expected a number > 0, or false for none"
                )
        return cls(**kwargs)  # type: ignore[arg-type]  # each value checked above

    def deadline_at(self, oldest_input_at_s: float | None) -> float | None:
        """When the buffer whose oldest input arrived at ``oldest_input_at_s`` must flush.

        Returns:
            ``oldest_input_at_s + max_age_s``, or None when the buffer is empty or
            there is no deadline (sleep until another input arrives).
        """
        if oldest_input_at_s is None or self.max_age_s is None:
            return None
        return oldest_input_at_s + self.max_age_s

    def should_flush(
        self,
        buffer_inputs: int,
        buffer_samples: float,
        oldest_input_at_s: float | None,
        now_s: float,
    ) -> FlushReason | None:
        """Whether to flush now, and why; the first of count, weight, deadline that holds.

        Args:
            buffer_inputs: direct inputs in the open buffer.
            buffer_samples: the buffer's ``sum n_i`` (``PartialAggregate.sample_count``).
            oldest_input_at_s: when the oldest input arrived, or None when empty.
            now_s: the current time on the same clock.

        Returns:
            The reason, or None to keep buffering.
        """
        if buffer_inputs <= 0:
            return None
        if buffer_inputs >= self.max_inputs:
            return FlushReason.COUNT
        if self.min_sample_weight is not None and buffer_samples >= self.min_sample_weight:
            return FlushReason.WEIGHT
        deadline = self.deadline_at(oldest_input_at_s)
        if deadline is not None and now_s >= deadline:
            return FlushReason.DEADLINE
        return None
