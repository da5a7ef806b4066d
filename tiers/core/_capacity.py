"""The largest message a tier may have to send, and whether its broker takes it; sans-IO.

Imports ``fedtier.protocol`` and the standard library only. A partial whose
envelope is above the NATS server's ``max_payload``, or a model blob above the
MQTT broker's Maximum Packet Size, is refused by the broker on every retry: the
daemon would accept and acknowledge inputs it can never pass on. So a daemon
compares the worst case with what its brokers announced as soon as it knows the
model's size, and refuses to run instead (``check_fits``).

The worst case is computed, not sampled: a partial's header grows with the ids
it lists, and an open buffer can hold up to ``limits.max_ids`` inputs (it keeps
accepting while upstream is down), so the bound lists that many inputs and as
many leaves, with every integer at its widest msgpack encoding.
"""

from __future__ import annotations

from typing import Final

import msgpack

from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import ConfigError
from fedtier.protocol.limits import Limits
from fedtier.protocol.messages import PartialAggregate, Tier, message_to_wire

__all__ = ["MESSAGE_OVERHEAD", "check_fits", "partial_envelope_bound"]

_ID_BYTES: Final = 16
_WIDEST_INT: Final = 2**63 - 1
_SIGNATURE_BYTES: Final = 64
_DIGEST_BYTES: Final = 32

MESSAGE_OVERHEAD: Final = 1024
"""Bytes a broker counts around a fedtier payload at most: NATS headers (trace
context, message id) against ``max_payload``; an MQTT PUBLISH's fixed header,
topic, packet id and properties against the Maximum Packet Size."""


def _bin_prefix(size: int) -> int:
    """Bytes msgpack spends on the length of a ``bin`` of ``size`` bytes."""
    return 2 if size < 2**8 else 3 if size < 2**16 else 5


def partial_envelope_bound(
    *,
    fleet: str,
    sender: str,
    tier: Tier,
    layout: bytes,
    num_params: int,
    codec: CodecSpec,
    limits: Limits,
) -> int:
    """The most bytes the envelope of a partial of this model can take on the wire.

    Raises:
        LocalProtocolError: ``codec`` cannot encode ``num_params`` values.
    """
    ids = tuple(i.to_bytes(_ID_BYTES, "big") for i in range(limits.max_ids))
    widest = PartialAggregate(
        fleet=fleet,
        sender=sender,
        seq=_WIDEST_INT,
        created_ms=_WIDEST_INT,
        partial_id=bytes(_ID_BYTES),
        tier=tier,
        known_version=_WIDEST_INT,
        layout=layout,
        num_params=num_params,
        codec=codec,
        sample_count=1e300,
        weight_sum=1e300,
        update_count=_WIDEST_INT,
        staleness_hist=(_WIDEST_INT,) * limits.max_hist_buckets,
        min_base_version=_WIDEST_INT,
        max_base_version=_WIDEST_INT,
        inputs=ids,
        leaves=ids,
    )
    payload = codec.max_payload_size(num_params)
    header = message_to_wire(widest)
    header["payload_size"] = _WIDEST_INT
    header["payload_blake3"] = bytes(_DIGEST_BYTES)
    header_size = len(msgpack.packb(header, use_bin_type=True))
    return (
        1  # the envelope's array of four
        + 9  # the protocol version, at its widest
        + _bin_prefix(header_size)
        + header_size
        + _bin_prefix(payload)
        + payload
        + _bin_prefix(_SIGNATURE_BYTES)
        + _SIGNATURE_BYTES
    )


def check_fits(what: str, size: int, limit: int | None, *, broker: str, fix: str) -> None:
    """Refuse to run when a message this daemon must send can be above its broker's limit.

    Args:
        what: the message, for the sentence ("a partial of model v3 (1,000,000 f32 values)").
        size: its size in bytes, worst case.
        limit: what the broker announced; None means no limit was announced.
        broker: the broker's limit, named for the operator ("nats-server's max_payload").
        fix: what to change, one clause.

    Raises:
        ConfigError: ``size`` is above ``limit``.
    """
    if limit is not None and size > limit:
        raise ConfigError(
            f"{what} can take up to {size:,} bytes, above {broker} of {limit:,} bytes; "
            f"the broker would refuse it on every retry, so this daemon does not start: {fix}"
        )
