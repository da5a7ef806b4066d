"""Folding a verified message's payload into an accumulator; imports protocol and tiers.aggregate.

The daemons (on admission and when they refold after a restart) and the
simulator all fold the same two message kinds the same way: the message's
fields become the accumulator's arguments, and the payload is added through
``protocol.codecs.fold_into`` without a dense temporary. This is that one place.
"""

from __future__ import annotations

import functools

from fedtier.protocol.codecs import Payload, fold_into
from fedtier.protocol.messages import DeviceUpdate, PartialAggregate
from fedtier.tiers.aggregate import Accumulator

__all__ = ["fold_partial_message", "fold_update_message"]


def fold_update_message(
    acc: Accumulator,
    message: DeviceUpdate,
    payload: Payload,
    *,
    tau: int,
    discount: float,
    clip_scale: float = 1.0,
) -> None:
    """Fold a device update with the weights the caller assessed (or stored)."""
    acc.fold_update(
        message.update_id,
        functools.partial(fold_into, payload=payload, spec=message.codec),
        n_samples=message.n_samples,
        tau=tau,
        discount=discount,
        base_version=message.base_version,
        clip_scale=clip_scale,
    )


def fold_partial_message(
    acc: Accumulator,
    message: PartialAggregate,
    payload: Payload,
    *,
    extra_tau: int,
    discount: float,
) -> None:
    """Fold a child partial, discounted for the delay since its sender flushed it."""
    acc.fold_partial(
        message.partial_id,
        functools.partial(fold_into, payload=payload, spec=message.codec),
        sample_count=message.sample_count,
        weight_sum=message.weight_sum,
        update_count=message.update_count,
        staleness_hist=message.staleness_hist,
        leaf_ids=message.leaves,
        extra_tau=extra_tau,
        discount=discount,
        min_base_version=message.min_base_version,
        max_base_version=message.max_base_version,
    )
