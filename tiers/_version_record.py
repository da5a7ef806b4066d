"""A model version's record for a successor central (lineage, optimizer state); imports no bus.

It must not import ``client``, ``simulations``, a bus adapter or the state
store: the central builds a :class:`VersionRecord` from its store, this module
turns it into signed bytes and back, and the registry stores those bytes next
to the version's blob (``v<N>.record`` in the blob object store).

Why a record per version, beside the blob and written before the pointer
moves (docs/architecture.md, "More than one instance"): a standby central
that takes the lease with an empty or stale state directory must know, for
the newest published version, the server optimizer's state (FedAdam's
moments), and, for the recent versions, which partials and device updates
they hold, so that a redelivered partial already counted is acknowledged as a
duplicate and never folded again. The blob is signed by the central and
verified by everyone; the record is signed by the same key, over its own
domain-separated bytes, so a record that was altered, truncated or written by
anyone else is refused with a typed error, never trusted and never a crash.

Wire format (msgpack, ``use_bin_type``): an outer map
``{"k": key id, "b": body bytes, "s": Ed25519 signature over
the context "fedtier-v1-version-record", a NUL byte, then the body}``; the body a map of
``f`` (format, 1), ``fleet``, ``v`` (version), ``p`` (the version's signed
pointer envelope), ``n`` (update count), ``t`` (created ms), ``i`` (inputs:
``[[sender, 16-byte id, seq], ...]``), ``l`` (leaf update ids, 16 bytes each,
concatenated) and ``o`` (optimizer arrays: ``{name: [dtype, shape, bytes]}``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import DecodeError, LimitExceeded, SignatureError
from fedtier.protocol.identity import SigningIdentity, VerifyKey

__all__ = [
    "RECORD_FORMAT",
    "RECORD_SIGNING_CONTEXT",
    "RecordInput",
    "VersionRecord",
    "decode_optimizer_state",
    "decode_version_record",
    "encode_optimizer_state",
    "encode_version_record",
]

RECORD_FORMAT: Final = 1
RECORD_SIGNING_CONTEXT: Final = b"fedtier-v1-version-record\x00"
_ID_BYTES: Final = 16
# Only plain numeric dtypes, as the state store keeps them: loading never needs pickle.
_DTYPES: Final = frozenset({"float16", "float32", "float64", "int32", "int64", "uint64"})
_MAX_NDIM: Final = 8
_MAX_ARRAYS: Final = 64
_MAX_STR: Final = 256


@dataclass(frozen=True, slots=True)
class RecordInput:
    """One input folded into a version: a child partial (or an edge's) as the central stored it.

    Attributes:
        sender: key id of the input's sender.
        input_id: its 16-byte partial id.
        seq: the sequence number of its envelope (the replay check needs it).
    """

    sender: str
    input_id: bytes
    seq: int


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """What a successor central needs of one published model version.

    Attributes:
        fleet: the fleet token.
        version: the model version.
        pointer: the version's signed pointer envelope (the registry's ``current`` then).
        update_count: device updates inside the version.
        created_ms: when the version was made.
        inputs: the partials folded into it (empty for version 0 and rollbacks).
        leaves: the device update ids inside it (its lineage).
        optimizer: the server optimizer's arrays after the step that made it.
    """

    fleet: str
    version: int
    pointer: bytes
    update_count: int
    created_ms: int
    inputs: tuple[RecordInput, ...] = ()
    leaves: tuple[bytes, ...] = ()
    optimizer: Mapping[str, npt.NDArray[Any]] = field(default_factory=dict)


def encode_version_record(record: VersionRecord, identity: SigningIdentity) -> bytes:
    """The signed bytes of ``record`` (deterministic: Ed25519 and msgpack both are)."""
    arrays = _array_specs(record.optimizer)
    body: bytes = msgpack.packb(
        {
            "f": RECORD_FORMAT,
            "fleet": record.fleet,
            "v": record.version,
            "p": record.pointer,
            "n": record.update_count,
            "t": record.created_ms,
            "i": [[i.sender, i.input_id, i.seq] for i in record.inputs],
            "l": b"".join(record.leaves),
            "o": arrays,
        },
        use_bin_type=True,
    )
    packed: bytes = msgpack.packb(
        {
            "k": identity.verify_key.key_id,
            "b": body,
            "s": identity.sign(RECORD_SIGNING_CONTEXT + body),
        },
        use_bin_type=True,
    )
    return packed


def decode_version_record(
    data: bytes,
    keys: Callable[[str], VerifyKey | None],
    *,
    fleet: str,
    max_bytes: int,
    max_params: int,
) -> VersionRecord:
    """Parse and verify a version record.

    Args:
        data: the bytes read from the registry (untrusted).
        keys: key id -> central key this reader accepts, or None.
        fleet: the fleet the record must name.
        max_bytes: the largest record accepted.
        max_params: the most values one optimizer array may hold.

    Raises:
        LimitExceeded: larger than ``max_bytes``, or an array too large.
        DecodeError: not a record, or a field of the wrong type or shape.
        SignatureError: signed by a key the reader does not accept, or the
            signature does not verify.
    """
    if len(data) > max_bytes:
        raise LimitExceeded(f"version record of {len(data)} bytes exceeds {max_bytes}")
    outer = _unpack(data, "version record")
    key_id = _field(outer, "k", str)
    body = _field(outer, "b", bytes)
    signature = _field(outer, "s", bytes)
    key = keys(key_id) if len(key_id) <= _MAX_STR else None
    if key is None:
        raise SignatureError(f"version record signed by key {key_id[:40]!r}, not a central key")
    key.verify(signature, RECORD_SIGNING_CONTEXT + body)
    fields = _unpack(body, "version record body")
    if _field(fields, "f", int) != RECORD_FORMAT:
        raise DecodeError(f"version record format {fields.get('f')!r} is not {RECORD_FORMAT}")
    named = _field(fields, "fleet", str)
    if named != fleet:
        raise DecodeError(f"version record of fleet {named[:40]!r}, not {fleet!r}")
    version = _natural(fields, "v")
    leaves_bytes = _field(fields, "l", bytes)
    if len(leaves_bytes) % _ID_BYTES:
        raise DecodeError(f"version record leaves hold {len(leaves_bytes)} bytes, not 16-byte ids")
    return VersionRecord(
        fleet=named,
        version=version,
        pointer=_field(fields, "p", bytes),
        update_count=_natural(fields, "n"),
        created_ms=_natural(fields, "t"),
        inputs=tuple(_input(item) for item in _field(fields, "i", list)),
        leaves=tuple(
            leaves_bytes[i : i + _ID_BYTES] for i in range(0, len(leaves_bytes), _ID_BYTES)
        ),
        optimizer=_arrays(_field(fields, "o", dict), max_params),
    )


def encode_optimizer_state(arrays: Mapping[str, npt.NDArray[Any]]) -> bytes:
    """The optimizer's arrays as the record holds them (kept by the store until publication)."""
    packed: bytes = msgpack.packb(_array_specs(arrays), use_bin_type=True)
    return packed


def decode_optimizer_state(data: bytes, *, max_params: int) -> dict[str, npt.NDArray[Any]]:
    """Arrays from :func:`encode_optimizer_state` bytes.

    Raises:
        DecodeError: not such bytes.
        LimitExceeded: an array holds more than ``max_params`` values.
    """
    return _arrays(_unpack(data, "optimizer state"), max_params)


def _array_specs(arrays: Mapping[str, npt.NDArray[Any]]) -> dict[str, list[Any]]:
    return {
        name: [
            array.dtype.name,
            list(array.shape),
            np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes(),
        ]
        for name, array in sorted(arrays.items())
    }


def _unpack(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        raise DecodeError(f"{what} is not msgpack: {exc}") from exc
    except Exception as exc:  # msgpack raises a few odd types on hostile input
        raise DecodeError(f"{what} is not msgpack: {type(exc).__name__}") from exc
    if not isinstance(value, dict):
        raise DecodeError(f"{what} is a {type(value).__name__}, not a map")
    return value


def _field(fields: Mapping[str, Any], name: str, kind: type[Any]) -> Any:
    value = fields.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DecodeError(f"version record field {name!r} is not a {kind.__name__}")
    return value


def _natural(fields: Mapping[str, Any], name: str) -> int:
    value: int = _field(fields, name, int)
    if value < 0:
        raise DecodeError(f"version record field {name!r} is negative")
    return value


def _input(item: object) -> RecordInput:
    if not isinstance(item, list) or len(item) != 3:
        raise DecodeError("a version record input is not [sender, id, seq]")
    sender, input_id, seq = item
    if not isinstance(sender, str) or not 0 < len(sender) <= _MAX_STR:
        raise DecodeError("a version record input's sender is not a key id")
    if not isinstance(input_id, bytes) or len(input_id) != _ID_BYTES:
        raise DecodeError("a version record input's id is not 16 bytes")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise DecodeError("a version record input's seq is not a natural number")
    return RecordInput(sender, input_id, seq)


def _arrays(raw: Mapping[Any, Any], max_params: int) -> dict[str, npt.NDArray[Any]]:
    if len(raw) > _MAX_ARRAYS:
        raise LimitExceeded(f"version record holds {len(raw)} optimizer arrays")
    arrays: dict[str, npt.NDArray[Any]] = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or not 0 < len(name) <= _MAX_STR:
            raise DecodeError("a version record optimizer array has no name")
        if not isinstance(spec, list) or len(spec) != 3:
            raise DecodeError(f"optimizer array {name!r} is not [dtype, shape, bytes]")
        dtype, shape, data = spec
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise DecodeError(f"optimizer array {name!r} has dtype {str(dtype)[:40]!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > _MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise DecodeError(f"optimizer array {name!r} has no valid shape")
        count = math.prod(shape)
        if count > max_params:
            raise LimitExceeded(f"optimizer array {name!r} holds {count} values")
        item = np.dtype(dtype)
        if not isinstance(data, bytes) or len(data) != count * item.itemsize:
            raise DecodeError(f"optimizer array {name!r} does not hold {count} {dtype} values")
        # Little-endian on the wire; native order (and a copy) in memory.
        wire = np.frombuffer(data, dtype=item.newbyteorder("<"))
        arrays[name] = wire.astype(item).reshape(shape)
    return arrays
