"""A device's declared data size in a key registry entry; imports ``protocol.errors`` only.

An operator registers a device with the number of training examples it holds
(``veh-0042 = { public_key = "...", max_samples = 480 }``): the edge caps each of
its updates' weight there (``tiers.core.InfluenceRules.weight_cap``), since the
``n_samples`` an update claims is the device's own word. Parsed here, beside the
registry (``tiers.registry``) that calls it, so the registry's file format has
one home and the cap's semantics another.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from fedtier.protocol.errors import ConfigError

__all__ = ["DECLARED_FIELD", "declared_size"]

DECLARED_FIELD: Final = "max_samples"
"""The registry entry field that holds a device's declared data size."""
# Far above any device's data, far below what makes a sum of weights lose precision.
_MAX_DECLARED: Final = 1 << 40


def declared_size(path: Path, name: str, entry: object) -> int | None:
    """The declared data size of one registry entry, None when it declares none.

    Args:
        path: the registry file, for the error message.
        name: the entry's name.
        entry: the entry as read (a hex string declares nothing).

    Raises:
        ConfigError: the field is not an integer in [1, 2**40].
    """
    if not isinstance(entry, dict) or DECLARED_FIELD not in entry:
        return None
    value = entry[DECLARED_FIELD]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_DECLARED:
        raise ConfigError(
            f"key registry {path}: key {name!r} {DECLARED_FIELD} must be an integer from 1 "
            f"to {_MAX_DECLARED} (the device's training examples), got {value!r}"
        )
    return value
