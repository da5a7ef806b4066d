"""Typed, checked reads from one TOML table; imports only the standard library and protocol.errors.

Every scenario section is read through a :class:`Table`, so each bad value is
one ``ConfigError`` sentence naming the file, the key and the value, and an
unknown key is an error (a typo must not silently fall back to a default).
TOML has no null: ``false`` switches an optional number off, as in the tier
configs (``tiers.flush.FlushPolicy.from_config``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeVar

from fedtier.protocol.errors import ConfigError

__all__ = ["Table"]

S = TypeVar("S", bound=str)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Table:
    """One TOML table being read; call :meth:`done` last to reject unknown keys.

    Args:
        mapping: the table's contents.
        where: its dotted name (``"fedprox.toml: clients"``) for messages.
    """

    def __init__(self, mapping: Mapping[str, object], where: str) -> None:
        self._mapping = mapping
        self._where = where
        self._read: set[str] = set()

    @property
    def where(self) -> str:
        """The table's name in messages."""
        return self._where

    def has(self, key: str) -> bool:
        """Whether ``key`` is present (and mark it read)."""
        self._read.add(key)
        return key in self._mapping

    def raw(self, key: str) -> object:
        """The value of ``key`` as parsed, or None when absent."""
        self._read.add(key)
        return self._mapping.get(key)

    def fail(self, key: str, expected: str) -> ConfigError:
        """The error for a bad value of ``key``."""
        return ConfigError(
            f"{self._where}.{key} is {_show(self._mapping.get(key))}; expected {expected}"
        )

    def number(
        self,
        key: str,
        default: float,
        *,
        low: float = -math.inf,
        high: float = math.inf,
        low_open: bool = False,
    ) -> float:
        """A finite number in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
        self._read.add(key)
        if key not in self._mapping:
            return default
        value = self._mapping[key]
        bound = f"{'>' if low_open else '>='} {low:g}" if low > -math.inf else "finite"
        expected = f"a number {bound}" + (f" and <= {high:g}" if high < math.inf else "")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, expected)
        number = float(value)
        too_low = number <= low if low_open else number < low
        if not math.isfinite(number) or too_low or number > high:
            raise self.fail(key, expected)
        return number

    def optional_number(self, key: str, default: float | None, *, low: float = 0.0) -> float | None:
        """A number > ``low``, or None when absent as default, ``false`` or 0."""
        self._read.add(key)
        if key not in self._mapping:
            return default
        value = self._mapping[key]
        if value is False or (not isinstance(value, bool) and value == 0):
            return None
        return self.number(key, 0.0, low=low, low_open=True)

    def integer(self, key: str, default: int, *, low: int = 0, high: int | None = None) -> int:
        """An integer in ``[low, high]``."""
        self._read.add(key)
        if key not in self._mapping:
            return default
        value = self._mapping[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            upper = f" and <= {high}" if high is not None else ""
            raise self.fail(key, f"an integer >= {low}{upper}")
        return value

    def integers(self, key: str, *, low: int = 0) -> tuple[int, ...] | None:
        """A non-empty array of integers >= ``low``, or None when absent."""
        value = self.raw(key)
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or not value
            or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in value)
        ):
            raise self.fail(key, f"a non-empty array of integers >= {low}")
        return tuple(value)

    def boolean(self, key: str, default: bool) -> bool:
        """``true`` or ``false``."""
        self._read.add(key)
        if key not in self._mapping:
            return default
        value = self._mapping[key]
        if not isinstance(value, bool):
            raise self.fail(key, "true or false")
        return value

    def string(self, key: str, default: str) -> str:
        """A non-empty string."""
        self._read.add(key)
        if key not in self._mapping:
            return default
        value = self._mapping[key]
        if not isinstance(value, str) or not value:
            raise self.fail(key, "a non-empty string")
        return value

    def choice(self, key: str, default: S, choices: Sequence[S]) -> S:
        """One of ``choices``."""
        self._read.add(key)
        if key not in self._mapping:
            return default
        value = self._mapping[key]
        for choice in choices:
            if value == choice:
                return choice
        raise self.fail(key, "one of " + ", ".join(repr(c) for c in choices))

    def table(self, key: str) -> Table:
        """A nested table (empty when absent)."""
        self._read.add(key)
        value = self._mapping.get(key, {})
        if not isinstance(value, Mapping):
            raise self.fail(key, "a table")
        return Table(value, f"{self._where}.{key}")

    def mapping(self, key: str) -> Mapping[str, object]:
        """A nested table as a plain mapping, for a reader that checks its own keys."""
        self._read.add(key)
        value = self._mapping.get(key, {})
        if not isinstance(value, Mapping):
            raise self.fail(key, "a table")
        return value

    def tables(self, key: str) -> list[Table]:
        """An array of tables (``[[key]]``); empty when absent."""
        self._read.add(key)
        value = self._mapping.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise self.fail(key, "an array of tables")
        return [Table(v, f"{self._where}.{key}[{i}]") for i, v in enumerate(value)]

    def done(self) -> None:
        """Raise ``ConfigError`` for a key nothing read (a typo, or a setting that does not exist).

        Raises:
            ConfigError: naming the first unknown key.
        """
        unknown = sorted(k for k in self._mapping if k not in self._read)
        if unknown:
            known = ", ".join(sorted(self._read)) or "none"
            raise ConfigError(
                f"{self._where} has unknown key {unknown[0]!r}; known keys are {known}"
            )
