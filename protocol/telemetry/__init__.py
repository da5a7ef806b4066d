"""Observability for every process: span names, trace context in headers, exporters, metrics.

Like ``protocol.bus`` this subpackage does I/O (exporters write files or send
OTLP) and is kept apart from the sans-IO wire contract. Names live here so a
trace explorer query written once works against every tier.

Spans (docs/architecture.md, telemetry), with their OpenTelemetry span kind::

    device send            device    PRODUCER  root of an update's trace
    edge process           edge      CONSUMER  child of device send (MQTT user properties)
    edge aggregate         edge      INTERNAL  new root per flush, linked to each input's span
    edge send              edge      PRODUCER  child of edge aggregate
    regional process       regional  CONSUMER  child of edge send (NATS headers)
    regional aggregate     regional  INTERNAL  new root, linked to inputs
    regional send          regional  PRODUCER  child of regional aggregate
    central process        central   CONSUMER  child of regional send
    central aggregate      central   INTERNAL  new root, linked to inputs
    central publish model  central   PRODUCER  child of central aggregate
    central evaluate model central   INTERNAL  held-out metrics of a version

Each messaging span also carries the OpenTelemetry messaging semantic
conventions (``messaging.*``, built by :func:`messaging_attributes`) beside the
``fedtier.*`` attributes, so a generic backend (Jaeger, Tempo) groups and
labels them like any other MQTT or NATS producer and consumer.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "ATTR_CLIP_SCALE",
    "ATTR_DEVICE",
    "ATTR_FLUSH_REASON",
    "ATTR_INPUT_COUNT",
    "ATTR_INPUT_IDS",
    "ATTR_LATE",
    "ATTR_LEAF_COUNT",
    "ATTR_METRIC_PREFIX",
    "ATTR_MODEL_VERSION",
    "ATTR_OUTCOME",
    "ATTR_OUTLIERS",
    "ATTR_OUTLIER_SCORE",
    "ATTR_PARTIAL_ID",
    "ATTR_REASON",
    "ATTR_SENDER",
    "ATTR_STALENESS",
    "ATTR_TIER",
    "ATTR_UPDATE_ID",
    "ATTR_WEIGHT",
    "MESSAGING_CLIENT_ID",
    "MESSAGING_DESTINATION_NAME",
    "MESSAGING_MESSAGE_BODY_SIZE",
    "MESSAGING_MESSAGE_ID",
    "MESSAGING_OPERATION_NAME",
    "MESSAGING_OPERATION_TYPE",
    "MESSAGING_SYSTEM",
    "OUTCOME_REJECTED",
    "SYSTEM_MQTT",
    "SYSTEM_NATS",
    "messaging_attributes",
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
# The weight an accepted input was folded with (n_samples, capped, times s(tau);
# a partial's sample count times its discount) and its norm clipping factor.
ATTR_WEIGHT: Final = "fedtier.weight"
ATTR_CLIP_SCALE: Final = "fedtier.clip_scale"
ATTR_OUTCOME: Final = "fedtier.outcome"  # accepted, duplicate, rejected
ATTR_REASON: Final = "fedtier.reason"  # rejection reason token
# On an aggregate span when [robust] quarantined inputs as outliers at that cut:
# their hex ids, and one ``outlier`` event per input with its robust z-score.
ATTR_OUTLIERS: Final = "fedtier.robust.outliers"
ATTR_OUTLIER_SCORE: Final = "fedtier.robust.score"
ATTR_FLUSH_REASON: Final = "fedtier.flush_reason"  # count, weight, deadline, shutdown
# Held-out metrics on ``central evaluate model``: fedtier.metric.accuracy and so on.
ATTR_METRIC_PREFIX: Final = "fedtier.metric."

# The value of ATTR_OUTCOME that the fedtier sampler always exports.
OUTCOME_REJECTED: Final = "rejected"

# OpenTelemetry messaging semantic conventions (the names of semconv 1.27+,
# where ``messaging.operation.type`` "publish" became "send").
MESSAGING_SYSTEM: Final = "messaging.system"  # "mqtt" or "nats"
MESSAGING_DESTINATION_NAME: Final = "messaging.destination.name"  # topic or subject
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"  # "send" or "process"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"  # "publish" or "process"
MESSAGING_MESSAGE_ID: Final = "messaging.message.id"  # update, partial or announcement id
MESSAGING_MESSAGE_BODY_SIZE: Final = "messaging.message.body.size"  # envelope bytes
MESSAGING_CLIENT_ID: Final = "messaging.client.id"  # key id of the process

SYSTEM_MQTT: Final = "mqtt"  # devices to edges
SYSTEM_NATS: Final = "nats"  # edges to regionals to central, and model announcements

MessagingSystem = Literal["mqtt", "nats"]
MessagingOperation = Literal["send", "process"]

# The protocol-level name of each operation type: an MQTT PUBLISH or a
# JetStream publish sends, a daemon's handler processes.
_OPERATION_NAMES: Final[dict[str, str]] = {"send": "publish", "process": "process"}


def span_name(tier: str, action: str) -> str:
    """The span name for ``action`` at ``tier``, e.g. ``span_name("edge", "process")``."""
    return f"{tier} {action}"


def messaging_attributes(
    system: MessagingSystem,
    operation: MessagingOperation,
    destination: str,
    *,
    message_id: str | None = None,
    body_size: int | None = None,
    client_id: str | None = None,
) -> dict[str, str | int]:
    """The ``messaging.*`` semantic-convention attributes of one send or process span.

    Args:
        system: ``"mqtt"`` (device to edge) or ``"nats"`` (between daemons).
        operation: ``"send"`` on a PRODUCER span, ``"process"`` on a CONSUMER span.
        destination: the MQTT topic or NATS subject.
        message_id: the id the message is known by (update, partial, announcement).
        body_size: the size of the envelope in bytes.
        client_id: the key id of the process that sends or processes it.
    """
    attributes: dict[str, str | int] = {
        MESSAGING_SYSTEM: system,
        MESSAGING_OPERATION_TYPE: operation,
        MESSAGING_OPERATION_NAME: _OPERATION_NAMES[operation],
        MESSAGING_DESTINATION_NAME: destination,
    }
    if message_id is not None:
        attributes[MESSAGING_MESSAGE_ID] = message_id
    if body_size is not None:
        attributes[MESSAGING_MESSAGE_BODY_SIZE] = body_size
    if client_id is not None:
        attributes[MESSAGING_CLIENT_ID] = client_id
    return attributes
