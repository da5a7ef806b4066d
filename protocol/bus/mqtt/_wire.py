"""What MQTT v5 allows on the wire: size limits, topic and filter checks, subscription ids.

Pure functions and constants shared by the connections and the bus; imports
no trio, nats or tiers (paho only for its ``Properties`` record).
"""

from __future__ import annotations

import hashlib
from typing import Final

from paho.mqtt.properties import Properties

from fedtier.protocol.errors import LocalProtocolError

MSG_ID_PROPERTY: Final = "ft-msg-id"
"""User property that carries ``publish(msg_id=...)``."""

_MAX_SUBSCRIPTION_ID: Final = 268_435_455
_MAX_TOPIC_BYTES: Final = 65_535
_MAX_PAYLOAD_BYTES: Final = 268_435_455


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves it untyped


def _subscription_id(subject_filter: str, durable: str | None) -> int:
    """A stable MQTT subscription identifier for (durable, filter); odd when durable.

    Stable so that messages a broker stored under it (in-flight or queued)
    reach the same subscription in a later process.
    """
    key = f"d\0{durable}\0{subject_filter}" if durable is not None else f"p\0{subject_filter}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    n = int.from_bytes(digest, "big") % (_MAX_SUBSCRIPTION_ID // 2)
    return 2 * n + (1 if durable is not None else 2)


def _is_durable_id(sub_id: int) -> bool:
    return sub_id % 2 == 1


def _check_topic(subject: str) -> None:
    if not subject or "+" in subject or "#" in subject or "\0" in subject:
        raise LocalProtocolError(
            f"cannot publish to MQTT topic {subject!r}: it must be non-empty, without wildcards"
        )
    if len(subject.encode()) > _MAX_TOPIC_BYTES:
        raise LocalProtocolError(f"MQTT topic {subject[:40]!r}... is over {_MAX_TOPIC_BYTES} bytes")


def _check_filter(subject_filter: str, durable: str | None) -> None:
    problem = None
    levels = subject_filter.split("/")
    if not subject_filter or "\0" in subject_filter:
        problem = "it is empty or holds NUL"
    elif subject_filter.startswith("$share/"):
        problem = "pass durable=<group> instead of a $share/ prefix"
    elif len(subject_filter.encode()) > _MAX_TOPIC_BYTES:
        problem = f"it is over {_MAX_TOPIC_BYTES} bytes"
    elif any("+" in level and level != "+" for level in levels):
        problem = "'+' must fill a whole level"
    elif any("#" in level for level in levels[:-1]) or ("#" in levels[-1] and levels[-1] != "#"):
        problem = "'#' must be the whole last level"
    elif durable is not None and (not durable or any(c in durable for c in "/+#\0")):
        problem = f"durable name {durable!r} must be non-empty without '/', '+', '#'"
    if problem is not None:
        raise LocalProtocolError(f"cannot subscribe to MQTT filter {subject_filter!r}: {problem}")
