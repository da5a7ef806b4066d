"""Observability for every process: span names, trace context in headers, exporters, metrics.

Like ``protocol.bus`` this subpackage does I/O (exporters write files or send
OTLP) and is kept apart from the sans-IO wire contract. Names live here so a
trace explorer query written once works against every tier.

Spans (docs/architecture.md, telemetry)::

    device send          device      root of an update's trace
    edge process         edge        child of the device span (context in MQTT user properties)
    edge aggregate       edge        new root per flush, linked to each input's span
    edge send            edge        child of edge aggregate
    regional process     regional    child of edge send (context from NATS headers)
    regional aggregate   regional    new root, linked to inputs
    regional send        regional
    central process      central     child of regional send
    central aggregate    central     new root, linked to inputs
    central publish model central    child of central aggregate
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ATTR_DEVICE",
    "ATTR_FLUSH_REASON",
    "ATTR_INPUT_COUNT",
    "ATTR_INPUT_IDS",
    "ATTR_LATE",
    "ATTR_LEAF_COUNT",
    "ATTR_MODEL_VERSION",
    "ATTR_OUTCOME",
    "ATTR_PARTIAL_ID",
    "ATTR_REASON",
    "ATTR_SENDER",
    "ATTR_STALENESS",
    "ATTR_TIER",
    "ATTR_UPDATE_ID",
    "span_name",
]

ATTR_UPDATE_ID: Final = "fedtier.update_id"  # hex of the 16-byte update id
ATTR_PARTIAL_ID: Final = "fedtier.partial_id"  # hex of the 16-byte partial id
ATTR_INPUT_IDS: Final = "fedtier.input_ids"  # list of hex ids folded into an aggregate
ATTR_INPUT_COUNT: Final = "fedtier.input_count"
ATTR_LEAF_COUNT: Final = "fedtier.leaf_count"
ATTR_DEVICE: Final = "fedtier.device"  # device key id
ATTR_SENDER: Final = "fedtier.sender"  # key id of the message's sender
ATTR_TIER: Final = "fedtier.tier"  # device, edge, regional, central
ATTR_MODEL_VERSION: Final = "fedtier.model_version"
ATTR_STALENESS: Final = "fedtier.staleness"
ATTR_LATE: Final = "fedtier.late"  # a partial folded past max_staleness
ATTR_OUTCOME: Final = "fedtier.outcome"  # accepted, duplicate, rejected
ATTR_REASON: Final = "fedtier.reason"  # rejection reason token
ATTR_FLUSH_REASON: Final = "fedtier.flush_reason"  # count, weight, deadline, shutdown


def span_name(tier: str, action: str) -> str:
    """The span name for ``action`` at ``tier``, e.g. ``span_name("edge", "process")``."""
    return f"{tier} {action}"
