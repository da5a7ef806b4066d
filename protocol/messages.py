"""The five message kinds of the wire contract as frozen, validated dataclasses; sans-IO, no clock.

Each message is the signed header of an envelope (``protocol.envelope``); its
payload travels beside it. The header schema is one table per kind
(``SCHEMAS``): wire key, Python attribute and the check that value must pass.
Decoding and local construction run the same checks, so a message that could
not have been built here cannot be decoded either.

Kinds and payloads::

    update      device -> edge      payload: the encoded delta (codec)
    receipt     edge -> device      payload: empty
    partial     tier -> upper tier  payload: the encoded numerator (codec)
    model       central -> all      payload: empty (a pointer to a blob)
    model_blob  central -> all      payload: the encoded model parameters (codec)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from functools import lru_cache
from typing import Any, ClassVar, Final, TypeAlias

from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import DecodeError, LimitExceeded, LocalProtocolError
from fedtier.protocol.identity import valid_key_id
from fedtier.protocol.layout import ModelLayout
from fedtier.protocol.limits import DEFAULT_LIMITS, Limits, StructureCaps
from fedtier.protocol.names import check_token

__all__ = [
    "MAX_UINT",
    "SCHEMAS",
    "UNAUTHENTICATED_REJECTIONS",
    "DeviceUpdate",
    "Kind",
    "Message",
    "ModelAnnouncement",
    "ModelBlob",
    "PartialAggregate",
    "Receipt",
    "ReceiptStatus",
    "Tier",
    "header_caps",
    "message_from_wire",
    "message_to_wire",
]

MAX_UINT: Final = 2**63 - 1


class Kind(StrEnum):
    """The ``kind`` field of a header."""

    UPDATE = "update"
    RECEIPT = "receipt"
    PARTIAL = "partial"
    MODEL = "model"
    MODEL_BLOB = "model_blob"


class ReceiptStatus(StrEnum):
    """What an edge decided about an update."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


# Rejections an edge gives before it has verified the update's signature. Anyone
# able to publish on a device's topic can provoke them with the device's update id,
# so a device must not treat them as final (protocol.md section 8.1).
UNAUTHENTICATED_REJECTIONS: Final = frozenset(
    {
        "malformed",
        "too_large",
        "unsupported_version",
        "unknown_sender",
        "bad_signature",
        "digest_mismatch",
    }
)


class Tier(StrEnum):
    """The tier that sent a partial."""

    EDGE = "edge"
    REGIONAL = "regional"


class _FieldProblem(Exception):
    """A value failed its check; mapped to DecodeError or LocalProtocolError by the caller."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


_Check: TypeAlias = Callable[[Any, Limits, Mapping[str, Any]], Any]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _uint(v: Any, _l: Limits, _h: Mapping[str, Any]) -> int:
    if not _is_int(v) or not 0 <= v <= MAX_UINT:
        raise _FieldProblem(f"must be an integer in 0..2^63-1, got {_show(v)}")
    return int(v)


def _positive(v: Any, _l: Limits, _h: Mapping[str, Any]) -> int:
    if not _is_int(v) or not 1 <= v <= MAX_UINT:
        raise _FieldProblem(f"must be an integer >= 1, got {_show(v)}")
    return int(v)


def _num_params(v: Any, limits: Limits, _h: Mapping[str, Any]) -> int:
    n = _positive(v, limits, _h)
    if n > limits.max_params:
        raise _FieldProblem(f"is {n}, above the cap of {limits.max_params}", too_large=True)
    return n


def _nonneg_float(v: Any, _l: Limits, _h: Mapping[str, Any]) -> float:
    if not isinstance(v, float) or not math.isfinite(v) or v < 0:
        raise _FieldProblem(f"must be a finite float64 >= 0, got {_show(v)}")
    return v


def _token(kind: str) -> _Check:
    def check(v: Any, _l: Limits, _h: Mapping[str, Any]) -> str:
        try:
            return check_token(kind, v)
        except LocalProtocolError as exc:
            raise _FieldProblem(f"is not a valid {kind} name: {_show(v)}") from exc

    return check


def _key_id(v: Any, _l: Limits, _h: Mapping[str, Any]) -> str:
    if not isinstance(v, str) or not valid_key_id(v):
        raise _FieldProblem(f"must be a key id (24 chars of a-z2-7), got {_show(v)}")
    return v


def _bin(n: int) -> _Check:
    def check(v: Any, _l: Limits, _h: Mapping[str, Any]) -> bytes:
        if not isinstance(v, bytes) or len(v) != n:
            raise _FieldProblem(f"must be {n} bytes, got {_show(v)}")
        return v

    return check


def _enum(enum: type[StrEnum]) -> _Check:
    def check(v: Any, _l: Limits, _h: Mapping[str, Any]) -> StrEnum:
        try:
            return enum(v)
        except ValueError as exc:
            allowed = ", ".join(e.value for e in enum)
            raise _FieldProblem(f"must be one of {allowed}, got {_show(v)}") from exc

    return check


def _short_str(v: Any, limits: Limits, _h: Mapping[str, Any]) -> str:
    if not isinstance(v, str):
        raise _FieldProblem(f"must be a string, got {_show(v)}")
    if len(v) > limits.max_str_chars:
        raise _FieldProblem(
            f"has {len(v)} characters; the cap is {limits.max_str_chars}", too_large=True
        )
    return v


def _codec(v: Any, limits: Limits, header: Mapping[str, Any]) -> CodecSpec:
    if isinstance(v, CodecSpec):
        v = v.to_wire()
    num_params = header.get("num_params")
    if not isinstance(num_params, int) or isinstance(num_params, bool):
        raise _FieldProblem("cannot be checked without a valid num_params")
    try:
        return CodecSpec.from_wire(v, num_params=num_params)
    except DecodeError as exc:
        raise _FieldProblem(str(exc)) from exc


def _id_list(v: Any, limits: Limits, _h: Mapping[str, Any]) -> tuple[bytes, ...]:
    if not isinstance(v, list | tuple):
        raise _FieldProblem(f"must be an array of 16-byte ids, got {_show(v)}")
    if len(v) > limits.max_ids:
        raise _FieldProblem(f"lists {len(v)} ids; the cap is {limits.max_ids}", too_large=True)
    if any(not isinstance(i, bytes) or len(i) != 16 for i in v):
        raise _FieldProblem("must hold only 16-byte ids")
    return tuple(v)


def _hist(v: Any, limits: Limits, _h: Mapping[str, Any]) -> tuple[int, ...]:
    if not isinstance(v, list | tuple):
        raise _FieldProblem(f"must be an array of counts, got {_show(v)}")
    if len(v) > limits.max_hist_buckets:
        raise _FieldProblem(
            f"has {len(v)} buckets; the cap is {limits.max_hist_buckets}", too_large=True
        )
    if any(not _is_int(c) or not 0 <= c <= MAX_UINT for c in v):
        raise _FieldProblem("must hold only integers >= 0")
    return tuple(v)


def _metrics(v: Any, limits: Limits, _h: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    items = v.items() if isinstance(v, Mapping) else v
    if not isinstance(v, Mapping | tuple):
        raise _FieldProblem(f"must be a map of string to float, got {_show(v)}")
    pairs = tuple(items)
    if len(pairs) > limits.max_metrics:
        raise _FieldProblem(
            f"has {len(pairs)} entries; the cap is {limits.max_metrics}", too_large=True
        )
    for name, value in pairs:
        if not isinstance(name, str) or not 1 <= len(name) <= 64:
            raise _FieldProblem(f"has an invalid metric name {_show(name)}")
        if not isinstance(value, float) or not math.isfinite(value):
            raise _FieldProblem(f"metric {name!r} must be a finite float64, got {_show(value)}")
    return pairs


def _layout_spec(v: Any, limits: Limits, header: Mapping[str, Any]) -> ModelLayout:
    if isinstance(v, ModelLayout):
        v = v.to_wire()
    try:
        layout = ModelLayout.from_wire(v, limits)
    except DecodeError as exc:
        raise _FieldProblem(str(exc), too_large=isinstance(exc, LimitExceeded)) from exc
    if layout.fingerprint != header.get("layout") or layout.num_params != header.get("num_params"):
        raise _FieldProblem("does not match the declared layout fingerprint and num_params")
    return layout


def _show(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


_COMMON: Final[tuple[tuple[str, _Check], ...]] = (
    ("fleet", _token("fleet")),
    ("sender", _key_id),
    ("seq", _uint),
    ("created_ms", _uint),
)


@dataclass(frozen=True, slots=True)
class DeviceUpdate:
    """A device's model delta, trained from model version ``base_version``.

    Attributes:
        update_id: 16 bytes chosen by the device, unique per device and
            stable across resends of the same update.
        n_samples: local training examples behind the delta (its weight).
        codec: how the payload encodes the delta.
        metrics: up to 16 named training metrics (``loss``, ``accuracy``...).
    """

    KIND: ClassVar[Kind] = Kind.UPDATE
    fleet: str
    sender: str
    seq: int
    created_ms: int
    update_id: bytes
    base_version: int
    layout: bytes
    num_params: int
    n_samples: int
    codec: CodecSpec
    metrics: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        _validate_local(self)


@dataclass(frozen=True, slots=True)
class Receipt:
    """An edge's signed answer to one update; the device may forget the update once accepted.

    Attributes:
        device: key id of the device the receipt is for.
        update_seq: the ``seq`` of the update being answered.
        status: accepted, duplicate (already accepted earlier) or rejected.
        reason: why it was rejected (a metric reason token), else empty.
        model_version: the newest model version the edge knows.
        retry_after_ms: for a non-final rejection (``rate_limited``), how long the
            device waits before it resends the same update; 0 (left off the wire)
            otherwise.
    """

    KIND: ClassVar[Kind] = Kind.RECEIPT
    fleet: str
    sender: str
    seq: int
    created_ms: int
    update_id: bytes
    device: str
    update_seq: int
    status: ReceiptStatus
    reason: str
    model_version: int
    retry_after_ms: int = 0

    def __post_init__(self) -> None:
        _validate_local(self)


@dataclass(frozen=True, slots=True)
class PartialAggregate:
    """A tier's folded buffer, sent to the tier above.

    The payload encodes the numerator ``sum n_i * s(tau_i) * delta_i``; the
    aggregate delta is ``numerator / sample_count``. Upper tiers add
    numerators and sample counts (discounting numerators for further delay).

    Attributes:
        partial_id: derived from the sender and its input ids, so a retried
            flush of the same inputs has the same id.
        tier: the sending tier, ``edge`` or ``regional``.
        known_version: the model version the sender knew when it flushed.
        sample_count: ``sum n_i`` (the denominator).
        weight_sum: ``sum n_i * s(tau_i)``.
        update_count: device updates inside (leaves).
        staleness_hist: device updates by staleness; the last bucket is "or more".
        inputs: ids of the messages folded directly (update or partial ids).
        leaves: ids of every device update inside, for lineage.
    """

    KIND: ClassVar[Kind] = Kind.PARTIAL
    fleet: str
    sender: str
    seq: int
    created_ms: int
    partial_id: bytes
    tier: Tier
    known_version: int
    layout: bytes
    num_params: int
    codec: CodecSpec
    sample_count: float
    weight_sum: float
    update_count: int
    staleness_hist: tuple[int, ...]
    min_base_version: int
    max_base_version: int
    inputs: tuple[bytes, ...]
    leaves: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _validate_local(self)


@dataclass(frozen=True, slots=True)
class ModelAnnouncement:
    """The central's signed pointer to model version ``version`` (small; MQTT-retained, KV).

    Attributes:
        blob_blake3: BLAKE3-256 of the model blob's payload.
        blob_size: payload bytes of the blob.
        update_count: device updates folded into this version since the last.
    """

    KIND: ClassVar[Kind] = Kind.MODEL
    fleet: str
    sender: str
    seq: int
    created_ms: int
    version: int
    layout: bytes
    num_params: int
    blob_blake3: bytes
    blob_size: int
    update_count: int

    def __post_init__(self) -> None:
        _validate_local(self)


@dataclass(frozen=True, slots=True)
class ModelBlob:
    """The parameters of model version ``version``, with the layout to rebuild named tensors."""

    KIND: ClassVar[Kind] = Kind.MODEL_BLOB
    fleet: str
    sender: str
    seq: int
    created_ms: int
    version: int
    layout: bytes
    num_params: int
    codec: CodecSpec
    tensors: ModelLayout

    def __post_init__(self) -> None:
        _validate_local(self)


Message: TypeAlias = DeviceUpdate | Receipt | PartialAggregate | ModelAnnouncement | ModelBlob

SCHEMAS: Final[dict[Kind, tuple[type[Any], tuple[tuple[str, _Check], ...]]]] = {
    Kind.UPDATE: (
        DeviceUpdate,
        (
            *_COMMON,
            ("update_id", _bin(16)),
            ("base_version", _uint),
            ("layout", _bin(16)),
            ("num_params", _num_params),
            ("n_samples", _positive),
            ("codec", _codec),
            ("metrics", _metrics),
        ),
    ),
    Kind.RECEIPT: (
        Receipt,
        (
            *_COMMON,
            ("update_id", _bin(16)),
            ("device", _key_id),
            ("update_seq", _uint),
            ("status", _enum(ReceiptStatus)),
            ("reason", _short_str),
            ("model_version", _uint),
            ("retry_after_ms", _uint),
        ),
    ),
    Kind.PARTIAL: (
        PartialAggregate,
        (
            *_COMMON,
            ("partial_id", _bin(16)),
            ("tier", _enum(Tier)),
            ("known_version", _uint),
            ("layout", _bin(16)),
            ("num_params", _num_params),
            ("codec", _codec),
            ("sample_count", _nonneg_float),
            ("weight_sum", _nonneg_float),
            ("update_count", _uint),
            ("staleness_hist", _hist),
            ("min_base_version", _uint),
            ("max_base_version", _uint),
            ("inputs", _id_list),
            ("leaves", _id_list),
        ),
    ),
    Kind.MODEL: (
        ModelAnnouncement,
        (
            *_COMMON,
            ("version", _uint),
            ("layout", _bin(16)),
            ("num_params", _num_params),
            ("blob_blake3", _bin(32)),
            ("blob_size", _uint),
            ("update_count", _uint),
        ),
    ),
    Kind.MODEL_BLOB: (
        ModelBlob,
        (
            *_COMMON,
            ("version", _uint),
            ("layout", _bin(16)),
            ("num_params", _num_params),
            ("codec", _codec),
            ("tensors", _layout_spec),
        ),
    ),
}

# Fields a sender may leave out; every other field is required.
# An optional field left out (or empty/zero, which is never sent) takes its dataclass default.
OPTIONAL_FIELDS: Final[dict[Kind, frozenset[str]]] = {
    Kind.UPDATE: frozenset({"metrics"}),
    Kind.RECEIPT: frozenset({"retry_after_ms"}),
}


# -- structure caps -------------------------------------------------------------
# How deep and how many containers and objects a valid header can hold, derived
# from SCHEMAS and the limits. The envelope parser walks a raw header against
# them before msgpack builds anything (docs/protocol.md section 10.1), so the
# cost of refusing any header within max_header_bytes is bounded.

_SCALAR: Final = StructureCaps(
    max_depth=0, max_maps=0, max_arrays=0, max_objects=1, max_map_len=0, max_array_len=0
)
# Header entries that live beside the schema's fields (protocol.envelope).
_ENVELOPE_FIELDS: Final = ("kind", "payload_size", "payload_blake3")


def _array_of(n: int, item: StructureCaps) -> StructureCaps:
    """An array of up to ``n`` items, each at most ``item``."""
    return StructureCaps(
        max_depth=1 + item.max_depth,
        max_maps=n * item.max_maps,
        max_arrays=1 + n * item.max_arrays,
        max_objects=1 + n * item.max_objects,
        max_map_len=item.max_map_len,
        max_array_len=max(n, item.max_array_len),
    )


def _tuple_of(*items: StructureCaps) -> StructureCaps:
    """An array with one item per position, each at most its ``items`` entry."""
    return StructureCaps(
        max_depth=1 + max((i.max_depth for i in items), default=0),
        max_maps=sum(i.max_maps for i in items),
        max_arrays=1 + sum(i.max_arrays for i in items),
        max_objects=1 + sum(i.max_objects for i in items),
        max_map_len=max((i.max_map_len for i in items), default=0),
        max_array_len=max([len(items), *(i.max_array_len for i in items)]),
    )


def _map_of(values: Sequence[StructureCaps]) -> StructureCaps:
    """A map with a scalar key and a value at most ``values[i]`` per entry."""
    return StructureCaps(
        max_depth=1 + max((v.max_depth for v in values), default=0),
        max_maps=1 + sum(v.max_maps for v in values),
        max_arrays=sum(v.max_arrays for v in values),
        max_objects=1 + sum(1 + v.max_objects for v in values),
        max_map_len=max([len(values), *(v.max_map_len for v in values)]),
        max_array_len=max((v.max_array_len for v in values), default=0),
    )


# The shape of every check whose value is a container; any other check takes a
# scalar. A new container field without an entry here fails closed: a receiver
# of its kind refuses its valid headers as too large, which the exactness test
# in tests/unit/test_envelope.py catches.
_CONTAINER_SHAPES: Final[dict[_Check, Callable[[Limits], StructureCaps]]] = {
    # CodecSpec.to_wire: one scalar per field, the fields that apply.
    _codec: lambda _lim: _map_of([_SCALAR] * len(fields(CodecSpec))),
    _metrics: lambda lim: _map_of([_SCALAR] * lim.max_metrics),
    _id_list: lambda lim: _array_of(lim.max_ids, _SCALAR),
    _hist: lambda lim: _array_of(lim.max_hist_buckets, _SCALAR),
    # ModelLayout.to_wire: [[name, dtype, [dims...]], ...]
    _layout_spec: lambda lim: _array_of(
        lim.max_tensors, _tuple_of(_SCALAR, _SCALAR, _array_of(lim.max_ndim, _SCALAR))
    ),
}


def _header_shape(kind: Kind, limits: Limits) -> StructureCaps:
    values = [
        shape(limits) if (shape := _CONTAINER_SHAPES.get(check)) else _SCALAR
        for _name, check in SCHEMAS[kind][1]
    ]
    return _map_of([*values, *[_SCALAR] * len(_ENVELOPE_FIELDS)])


@lru_cache(maxsize=64)
def header_caps(limits: Limits, kinds: frozenset[Kind] | None = None) -> StructureCaps:
    """The structure caps of a header under ``limits``: the largest valid header of ``kinds``.

    With the default limits and every kind: depth 4 (a ``model_blob``'s
    ``tensors`` -> entry -> shape), 3 maps (an ``update``'s header, ``codec``,
    ``metrics``), 8,193 arrays (a ``model_blob`` of ``max_tensors`` tensors),
    131,379 objects (a ``partial`` listing ``max_ids`` inputs and leaves), 21
    entries in a map (a ``partial``'s header) and 65,536 items in an array
    (``max_ids``). A receiver that takes only updates gets far smaller caps
    (depth 2, no arrays, 69 objects).

    Args:
        limits: the receiver's limits.
        kinds: the kinds the receiver takes (default: all).
    """
    chosen = sorted(kinds if kinds is not None else Kind)
    if not chosen:
        raise LocalProtocolError("header_caps needs at least one message kind")
    caps = _header_shape(chosen[0], limits)
    for kind in chosen[1:]:
        caps = caps.union(_header_shape(kind, limits))
    return caps


# A message built here is checked for shape, not against a receiver's decoding
# caps: the model's size is the sender's to choose (a daemon raises max_params
# in its [limits], a device takes its model's), and each receiver applies its
# own caps when it decodes.
_LOCAL_LIMITS: Final = replace(DEFAULT_LIMITS, max_params=MAX_UINT)


def _validate_local(msg: Any) -> None:
    kind: Kind = msg.KIND
    _cls, schema = SCHEMAS[kind]
    values = {f.name: getattr(msg, f.name) for f in fields(msg)}
    for name, check in schema:
        try:
            converted = check(values[name], _LOCAL_LIMITS, values)
        except _FieldProblem as exc:
            raise LocalProtocolError(f"{kind.value} field {name!r} {exc}") from None
        if converted is not values[name] and not isinstance(values[name], CodecSpec | ModelLayout):
            object.__setattr__(msg, name, converted)


def message_to_wire(msg: Message) -> dict[str, object]:
    """The header map of ``msg`` in canonical key order, without the payload fields."""
    kind: Kind = msg.KIND
    out: dict[str, object] = {"kind": kind.value}
    for name, _check in SCHEMAS[kind][1]:
        value = getattr(msg, name)
        if name in OPTIONAL_FIELDS.get(kind, frozenset()) and not value:
            continue
        if isinstance(value, CodecSpec | ModelLayout):
            value = value.to_wire()
        elif isinstance(value, StrEnum):
            value = value.value
        elif name == "metrics":
            value = dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def message_from_wire(header: Mapping[str, Any], kind: Kind, limits: Limits) -> Message:
    """Build the message of ``kind`` from a decoded header map, checking every field.

    Raises:
        DecodeError: a field is missing, unknown or fails its check.
        LimitExceeded: a field is above its cap.
    """
    cls, schema = SCHEMAS[kind]
    allowed = {name for name, _ in schema}
    unknown = [k for k in header if k not in allowed]
    if unknown:
        raise DecodeError(f"{kind.value} header has unknown field {unknown[0]!r}")
    values: dict[str, Any] = {}
    for name, check in schema:
        if name not in header:
            if name in OPTIONAL_FIELDS.get(kind, frozenset()):
                values[name] = cls.__dataclass_fields__[name].default
                continue
            raise DecodeError(f"{kind.value} header lacks field {name!r}")
        try:
            values[name] = check(header[name], limits, header)
        except _FieldProblem as exc:
            error = LimitExceeded if exc.too_large else DecodeError
            raise error(f"{kind.value} field {name!r} {exc}") from None
    # The checks above ran with the receiver's limits; build without re-running
    # them (``__post_init__`` uses the default limits).
    msg: Message = object.__new__(cls)
    for name, value in values.items():
        object.__setattr__(msg, name, value)
    return msg
