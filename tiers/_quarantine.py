"""The daemons' quarantine policy: which reasons can go away, and how much a daemon holds.

Imports the store's types and ``fedtier.protocol.errors``; the quarantine's
table lives in ``tiers.store`` and its use in ``tiers.tier``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from fedtier.protocol.errors import (
    Reason,
)
from fedtier.tiers.store import (
    Retry,
)

__all__ = ["QuarantineLimits", "retry_for"]


# Reasons that can go away (a registry reload, a model or layout change, a fixed
# bug): such inputs are tried again at every re-admission pass. Everything else
# (bad signature from a registered key, malformed bytes, a non-finite payload) can
# never become valid: kept for forensics and counted, tried again only when an
# operator releases it.
# ``outlier`` (robust aggregation) is never retried either: the same input would
# be the same outlier against a like buffer; an operator judges and releases it.
_RETRY_ANY: Final = frozenset(
    {
        Reason.UNKNOWN_SENDER,
        Reason.LAYOUT_MISMATCH,
        Reason.WRONG_FLEET,
        Reason.STALE,
        Reason.INTERNAL_ERROR,
    }
)


@dataclass(frozen=True, slots=True)
class QuarantineLimits:
    """Bounds of a daemon's quarantine (docs/operations.md, quarantine).

    Past a bound the tier refuses to acknowledge the input (the broker keeps and
    redelivers it) and counts ``fedtier_quarantine_refusals``: it is never lost.

    Attributes:
        max_bytes: bytes held in all.
        max_bytes_per_sender: bytes held per (claimed) sender.
        max_inputs_per_sender: rows held per (claimed) sender.
    """

    max_bytes: int = 1 << 30
    max_bytes_per_sender: int = 256 << 20
    max_inputs_per_sender: int = 10_000


def retry_for(reason: Reason) -> Retry:
    return "any" if reason in _RETRY_ANY else "never"
