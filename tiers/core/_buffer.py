"""The open buffer of a tier, sans-IO: its accumulator, epoch and flush bookkeeping.

Imports the tier math only: no trio, sqlite, OpenTelemetry, logging or clock.
Time comes in as ``now`` (seconds on whatever clock the caller's flush policy
uses) and ``accepted_ms`` (wall milliseconds, for aggregate latency).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final

from fedtier.protocol.codecs import DecodedPayload, fold_into
from fedtier.protocol.messages import DeviceUpdate, PartialAggregate
from fedtier.tiers.aggregate import Accumulator
from fedtier.tiers.core._admission import AcceptedInput
from fedtier.tiers.flush import FlushPolicy, FlushReason

__all__ = ["HIST_BUCKETS", "BufferedInput", "TierBuffer", "fold_message"]

HIST_BUCKETS: Final = 32
"""Staleness histogram buckets of every partial a tier makes."""


def fold_message(
    acc: Accumulator,
    message: DeviceUpdate | PartialAggregate,
    payload: memoryview | bytes,
    *,
    tau: int,
    discount: float,
    clip_scale: float = 1.0,
    n_samples: float | None = None,
    decoded: DecodedPayload | None = None,
) -> None:
    """Fold a verified message's payload with the weights assessed (or stored) for it.

    The message's fields become the accumulator's arguments and the payload is
    added through ``fold_into`` without a dense temporary. Admission and the
    refold after a restart both come here, so they cannot fold differently.
    ``n_samples`` is an update's admitted weight (its ``n_samples`` capped at the
    tier's ``max_samples``); it never raises the message's own count.
    ``decoded`` is ``payload`` as admission already validated and decoded it
    (``AcceptedInput.decoded``): the fold then reuses that work, with the same
    result bit for bit.
    """
    folder = (
        functools.partial(fold_into, payload=payload, spec=message.codec)
        if decoded is None
        else decoded.fold_into
    )
    if isinstance(message, DeviceUpdate):
        acc.fold_update(
            message.update_id,
            folder,
            n_samples=(
                message.n_samples
                if n_samples is None
                else max(1, min(message.n_samples, int(n_samples)))
            ),
            tau=tau,
            discount=discount,
            base_version=message.base_version,
            clip_scale=clip_scale,
        )
        return
    acc.fold_partial(
        message.partial_id,
        folder,
        sample_count=message.sample_count,
        weight_sum=message.weight_sum,
        update_count=message.update_count,
        staleness_hist=message.staleness_hist,
        leaf_ids=message.leaves,
        extra_tau=tau,
        discount=discount,
        min_base_version=message.min_base_version,
        max_base_version=message.max_base_version,
    )


@dataclass(frozen=True, slots=True)
class BufferedInput:
    """One input of the open epoch as it was folded: what the robust cut re-reads.

    Kept only while ``TierBuffer.keep_inputs`` is set (``[robust]`` on): the
    payload bytes (encoded, as the store holds them) and the weights decided
    at admission, so the cut can decode the input's point and refold the kept
    inputs exactly as admission folded them.

    Attributes:
        message: the verified update or child partial.
        payload: its payload bytes.
        tau: its staleness at this tier.
        discount: its discount.
        clip_scale: its norm clipping factor (updates).
        n_samples: its admitted weight (updates), None for the message's own.
        exempt: an operator released it from the quarantine: never an outlier.
    """

    message: DeviceUpdate | PartialAggregate
    payload: bytes
    tau: int
    discount: float
    clip_scale: float
    n_samples: float | None
    exempt: bool = False

    def fold_into(self, acc: Accumulator) -> None:
        """Fold this input into ``acc`` with its stored weights (as admission did)."""
        fold_message(
            acc,
            self.message,
            self.payload,
            tau=self.tau,
            discount=self.discount,
            clip_scale=self.clip_scale,
            n_samples=self.n_samples,
        )


class TierBuffer:
    """The open epoch: its accumulator plus what the flush needs to know about its inputs.

    Attributes:
        accumulator: the accumulator of the epoch.
        epoch: the epoch number (stored beside each input).
        oldest_at: ``now`` of the oldest input, None when empty (flush deadline).
        oldest_accepted_ms: wall time of the oldest input (aggregate latency).
        tags: an opaque tag per input in fold order (the daemons keep the
            traceparent of each input's span there, for span links).
        senders: distinct senders (participation).
        keep_inputs: keep every folded input in :attr:`inputs` (``[robust]`` on;
            memory grows with the epoch: docs/architecture.md, robust aggregation).
        inputs: the folded inputs in fold order, while ``keep_inputs`` is set.
    """

    def __init__(self, num_params: int, epoch: int = 0, *, keep_inputs: bool = False) -> None:
        self.accumulator = Accumulator(num_params, hist_buckets=HIST_BUCKETS)
        self.epoch = epoch
        self.oldest_at: float | None = None
        self.oldest_accepted_ms: int | None = None
        self.tags: list[str] = []
        self.senders: set[str] = set()
        self.keep_inputs = keep_inputs
        self.inputs: list[BufferedInput] = []

    @property
    def is_empty(self) -> bool:
        """Whether nothing was folded in this epoch."""
        return self.accumulator.is_empty

    def fold(
        self,
        accepted: AcceptedInput,
        *,
        now: float,
        accepted_ms: int,
        tag: str = "",
        exempt: bool = False,
    ) -> None:
        """Fold an admitted input and book it (``exempt``: see :class:`BufferedInput`)."""
        self.refold(
            accepted.message,
            accepted.payload,
            tau=accepted.tau,
            discount=accepted.discount,
            clip_scale=accepted.clip_scale,
            now=now,
            accepted_ms=accepted_ms,
            tag=tag,
            n_samples=accepted.n_samples,
            exempt=exempt,
            decoded=accepted.decoded,
        )

    def refold(
        self,
        message: DeviceUpdate | PartialAggregate,
        payload: memoryview | bytes,
        *,
        tau: int,
        discount: float,
        clip_scale: float,
        now: float,
        accepted_ms: int,
        tag: str = "",
        n_samples: float | None = None,
        exempt: bool = False,
        decoded: DecodedPayload | None = None,
    ) -> None:
        """Fold an input with weights decided earlier (recovery after a restart) and book it.

        ``n_samples`` is the stored weight of an update (capped at admission); None
        folds the message's own count. ``decoded``: see :func:`fold_message`.
        """
        fold_message(
            self.accumulator,
            message,
            payload,
            tau=tau,
            discount=discount,
            clip_scale=clip_scale,
            n_samples=n_samples,
            decoded=decoded,
        )
        if self.oldest_at is None:
            self.oldest_at = now
            self.oldest_accepted_ms = accepted_ms
        self.tags.append(tag)
        self.senders.add(message.sender)
        if self.keep_inputs:
            self.inputs.append(
                BufferedInput(
                    message,
                    bytes(payload),
                    tau,
                    discount,
                    clip_scale,
                    n_samples,
                    exempt,
                )
            )

    def has_room(self, inputs: int, leaves: int, max_ids: int) -> bool:
        """Whether ``inputs`` more inputs holding ``leaves`` updates fit one partial's id caps."""
        acc = self.accumulator
        return acc.input_count + inputs <= max_ids and acc.update_count + leaves <= max_ids

    def due(self, policy: FlushPolicy, now: float) -> FlushReason | None:
        """Why the buffer flushes at ``now`` under ``policy``, None if it does not."""
        acc = self.accumulator
        return policy.should_flush(acc.input_count, acc.sample_count, self.oldest_at, now)

    def deadline(self, policy: FlushPolicy) -> float | None:
        """When the buffer's deadline falls, None when empty or without one."""
        return policy.deadline_at(self.oldest_at)

    def advance(self) -> None:
        """Start the next epoch with an empty accumulator."""
        self.accumulator.reset()
        self.epoch += 1
        self.oldest_at = None
        self.oldest_accepted_ms = None
        self.tags = []
        self.senders = set()
        self.inputs = []
