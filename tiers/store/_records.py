"""The store's record types and how a version row decodes; imports no sqlite3, trio or protocol.

They are plain frozen values: the daemons build them, the store persists and
returns them, and nothing here knows how they are stored beyond the column
order of a ``model_versions`` row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final, TypeAlias

import numpy.typing as npt

__all__ = [
    "ID_BYTES",
    "InputKey",
    "InputRecord",
    "InputState",
    "ModelVersionRecord",
    "OpenInputs",
    "OutboxEntry",
    "Recovery",
    "TargetRecord",
    "target_from_bytes",
    "target_to_bytes",
    "version_from_row",
]

ID_BYTES: Final = 16

InputKey: TypeAlias = tuple[str, bytes]
"""An input's identity: ``(sender, input_id)``."""


class InputState(StrEnum):
    """Where an accepted input is in its life."""

    PENDING = "pending"  # submitted, commit not yet durable (in memory only)
    OPEN = "open"
    FLUSHED = "flushed"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One accepted input: a device update (edge) or a child partial (regional, central).

    Attributes:
        sender: key id of the input's sender.
        input_id: its 16-byte update id or partial id.
        seq: the envelope's sequence number.
        epoch: the open buffer it was folded into.
        envelope: the signed envelope bytes, enough to refold it.
        base_version: the update's base version (a partial's min base version).
        n_samples: the update's n_samples (a partial's sample_count).
        tau: staleness used at the fold (``extra_tau`` for a partial).
        discount: the staleness discount applied.
        clip_scale: the norm clipping factor applied (1 when not clipped).
        accepted_ms: wall-clock acceptance time, ms since the epoch.
        trace: W3C traceparent of the input's process span, or empty.
        leaves: a child partial's device update ids, indexed so that none is
            counted twice; empty for a device update.
    """

    sender: str
    input_id: bytes
    seq: int
    epoch: int
    envelope: bytes
    base_version: int
    n_samples: float
    tau: int
    discount: float
    clip_scale: float
    accepted_ms: int
    trace: str = ""
    leaves: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A flushed partial waiting for its upstream PubAck.

    Attributes:
        partial_id: 16-byte id (its hex is the ``Nats-Msg-Id``).
        epoch: the buffer epoch it closed.
        seq: the envelope's sequence number.
        subject: where it is published.
        envelope: the signed envelope bytes.
        trace: traceparent of the aggregate span, the parent of the send span.
    """

    partial_id: bytes
    epoch: int
    seq: int
    subject: str
    envelope: bytes
    trace: str = ""


@dataclass(frozen=True, slots=True)
class ModelVersionRecord:
    """A model version as the central stored it.

    Attributes:
        version: the model version.
        blob: signed ``model_blob`` envelope bytes.
        pointer: signed ``model`` (announcement) envelope bytes.
        lineage: ids of every device update folded into this version.
        update_count: number of those updates.
        created_ms: wall-clock creation time.
        published: whether the registry and the announcement are done.
    """

    version: int
    blob: bytes
    pointer: bytes
    lineage: tuple[bytes, ...]
    update_count: int
    created_ms: int
    published: bool = False


@dataclass(frozen=True, slots=True)
class TargetRecord:
    """The central's evaluation target, reached: no new version until it is raised or removed.

    Attributes:
        version: the model version whose evaluation reached it.
        metric: the metric the target names (``accuracy``, ``mse``, ...).
        value: what that version scored.
        target: the target value it met (``>=`` for accuracy and r2, ``<=`` for errors).
        reached_ms: wall-clock time of the evaluation, ms since the epoch.
    """

    version: int
    metric: str
    value: float
    target: float
    reached_ms: int


class OpenInputs(Sequence[InputRecord]):
    """The open buffer's inputs as recovery returns them: each envelope read when it is taken.

    A buffer may hold thousands of inputs of a large model (an edge keeps
    accepting while upstream is down), so holding every envelope at once
    would cost the buffer's inputs times the envelope size. The records are
    kept without their envelopes; indexing or iterating reads one envelope
    (a segment read) and hands it over, so a refold that folds one record at
    a time holds one envelope at a time.

    Args:
        records: the records, each with an empty ``envelope``.
        stored: per record, what the store holds for its envelope (a segment
            reference or the bytes themselves).
        load: turns a stored value into the envelope bytes.
    """

    __slots__ = ("_load", "_records", "_stored")

    def __init__(
        self,
        records: Sequence[InputRecord],
        stored: Sequence[bytes | str],
        load: Callable[[bytes | str], bytes],
    ) -> None:
        if len(records) != len(stored):
            raise ValueError("one stored envelope per record")
        self._records = tuple(records)
        self._stored = tuple(stored)
        self._load = load

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> InputRecord:  # type: ignore[override]
        return replace(self._records[index], envelope=self._load(self._stored[index]))

    def __iter__(self) -> Iterator[InputRecord]:
        for index in range(len(self._records)):
            yield self[index]

    def __eq__(self, other: object) -> bool:
        # As a tuple of the records compares (the store's tests compare with tuples).
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OpenInputs({len(self)} records)"


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a daemon needs to resume after a stop or a crash.

    Attributes:
        open_epoch: the epoch of the open buffer.
        open_inputs: its accepted inputs, in fold order (refold them one at a
            time: each envelope is read when its record is taken).
        pending_outbox: flushed partials not yet acknowledged upstream (resend them).
        high_water: per-sender sequence high-water marks.
        out_seq: the last sequence number this daemon used on its own messages.
        known_version: the newest model version this daemon had verified.
        model_pointer: the signed pointer of that version, if any.
        latest_version: the central's newest stored model version, if any.
        unpublished_versions: the central's versions whose publication is not done.
        optimizer_state: the central optimizer's arrays, as of ``latest_version``.
    """

    open_epoch: int
    open_inputs: Sequence[InputRecord]
    pending_outbox: tuple[OutboxEntry, ...]
    high_water: Mapping[str, int]
    out_seq: int
    known_version: int | None
    model_pointer: bytes | None
    latest_version: ModelVersionRecord | None
    unpublished_versions: tuple[int, ...]
    optimizer_state: Mapping[str, npt.NDArray[Any]]


def version_from_row(row: Sequence[Any]) -> ModelVersionRecord:
    """Decode a ``SELECT version, blob, pointer, lineage, update_count, created_ms, published``.

    The lineage column is the concatenated 16-byte leaf update ids.
    """
    lineage_bytes = bytes(row[3])
    lineage = tuple(lineage_bytes[i : i + ID_BYTES] for i in range(0, len(lineage_bytes), ID_BYTES))
    return ModelVersionRecord(
        version=int(row[0]),
        blob=bytes(row[1]),
        pointer=bytes(row[2]),
        lineage=lineage,
        update_count=int(row[4]),
        created_ms=int(row[5]),
        published=bool(row[6]),
    )


def target_to_bytes(record: TargetRecord) -> bytes:
    """``record`` as the JSON the ``meta`` table keeps under ``target_reached``."""
    return json.dumps(
        {
            "version": record.version,
            "metric": record.metric,
            "value": record.value,
            "target": record.target,
            "reached_ms": record.reached_ms,
        },
        sort_keys=True,
    ).encode()


def target_from_bytes(data: bytes) -> TargetRecord:
    """Decode what :func:`target_to_bytes` wrote.

    Raises:
        ValueError: not such a JSON object.
    """
    obj = json.loads(bytes(data))
    if not isinstance(obj, dict):
        raise ValueError("target_reached is not a JSON object")
    return TargetRecord(
        version=int(obj["version"]),
        metric=str(obj["metric"]),
        value=float(obj["value"]),
        target=float(obj["target"]),
        reached_ms=int(obj["reached_ms"]),
    )
