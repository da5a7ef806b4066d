r"""Signed msgpack envelopes: seal a message and payload, parse and verify received bytes; sans-IO.

Wire form (normative text in docs/protocol.md)::

    envelope  = msgpack array [version: uint = 1, header: bin, payload: bin, signature: bin(64)]
    header    = msgpack map   (kind, fleet, sender, seq, created_ms, kind fields...,
                               payload_size, payload_blake3)
    signature = Ed25519(sender key, b"fedtier-v1-envelope\x00" || header)

The header is carried as opaque bytes and signed as such, so verification
never depends on re-encoding msgpack the same way. The header names the
BLAKE3-256 digest of the payload, so the signature covers the payload too;
only a 32-byte digest is hashed into the signature (signing a whole 1 MB
message costs 1.9 ms here, a digest 20 us).

Checks happen cheapest first: size caps before parsing, structure before
crypto, the signature (65 us) before hashing the payload (~0.1 ms per MB).
Before msgpack builds the outer array or the header, a walk over the raw bytes
checks their structure against caps derived from the schema (depth,
containers, objects: ``protocol.messages.header_caps``), so no byte string
within the size caps makes the parser build millions of empty containers or
pre-size arrays that the bytes never fill (docs/protocol.md section 10.1).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import blake3
import msgpack

from fedtier.protocol.errors import (
    DecodeError,
    DigestMismatch,
    FedtierError,
    LimitExceeded,
    LocalProtocolError,
    UnknownSender,
    UnsupportedVersion,
)
from fedtier.protocol.identity import SigningIdentity, VerifyKey
from fedtier.protocol.limits import DEFAULT_LIMITS, Limits, StructureCaps
from fedtier.protocol.messages import (
    Kind,
    Message,
    header_caps,
    message_from_wire,
    message_to_wire,
)

__all__ = [
    "PROTOCOL_VERSION",
    "SIGNING_CONTEXT",
    "Envelope",
    "KeyLookup",
    "open_envelope",
    "parse_envelope",
    "payload_digest",
    "seal",
]

PROTOCOL_VERSION: Final = 1
SIGNING_CONTEXT: Final = b"fedtier-v1-envelope\x00"
_HEADER_MAX_BIN: Final = 32  # ids are 16 bytes, digests 32: nothing larger lives in a header
# The outer array: [version, header, payload, signature], four scalars.
_ENVELOPE_CAPS: Final = StructureCaps(
    max_depth=1, max_maps=0, max_arrays=1, max_objects=5, max_map_len=0, max_array_len=4
)


def _msgpack_tables() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per first byte: the size of a scalar that byte fixes, and the length-prefix width."""
    fixed = [0] * 256
    for b in (*range(0x00, 0x80), *range(0xE0, 0x100), 0xC0, 0xC2, 0xC3):
        fixed[b] = 1  # fixints, nil, false, true
    for b in range(0xA0, 0xC0):
        fixed[b] = 1 + (b & 0x1F)  # fixstr
    for b, size in {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9}.items():
        fixed[b] = size  # float 32/64, uint 8..64
    for b, size in {0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}.items():
        fixed[b] = size  # int 8..64
    prefix = [0] * 256
    for b, width in {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}.items():
        prefix[b] = width  # bin 8/16/32, str 8/16/32
    return tuple(fixed), tuple(prefix)


_FIXED_SIZE, _LENGTH_PREFIX = _msgpack_tables()
# Per first byte, one lookup for the walk: a fixed size, or minus a length prefix's width.
_STEP: Final = tuple(
    size or -width for size, width in zip(_FIXED_SIZE, _LENGTH_PREFIX, strict=True)
)
_U32: Final = struct.Struct(">I").unpack_from
# Arrays at least this long are first tried as one run of scalars encoded alike
# (the ids of a partial): checked with strided slices in C, not item by item.
_RUN_MIN: Final = 16

KeyLookup: TypeAlias = Callable[[str], VerifyKey | None] | Mapping[str, VerifyKey]


def payload_digest(payload: bytes | memoryview) -> bytes:
    """BLAKE3-256 of the payload bytes, as the header's ``payload_blake3``."""
    return blake3.blake3(payload).digest()


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed envelope; ``verify`` before trusting any of it.

    Attributes:
        message: the decoded header.
        payload: the payload bytes.
        header_bytes: the header exactly as received (what the signature covers).
        signature: the 64-byte Ed25519 signature.
        payload_blake3: the digest the header declares.
    """

    message: Message
    payload: bytes
    header_bytes: bytes
    signature: bytes
    payload_blake3: bytes

    @property
    def sender(self) -> str:
        """Key id of the claimed sender."""
        return self.message.sender

    def verify(self, key: VerifyKey) -> None:
        """Check the signature with the sender's key, then the payload digest.

        Raises:
            LocalProtocolError: ``key`` is not the sender's key.
            SignatureError: the signature does not verify.
            DigestMismatch: the payload is not the one that was signed.
        """
        if key.key_id != self.message.sender:
            raise LocalProtocolError(
                f"verifying a message from {self.message.sender} with the key of {key.key_id}"
            )
        key.verify(self.signature, SIGNING_CONTEXT + self.header_bytes)
        if payload_digest(self.payload) != self.payload_blake3:
            raise DigestMismatch(
                f"{self.message.KIND.value} from {self.sender}: payload of "
                f"{len(self.payload)} bytes does not match its signed BLAKE3 digest"
            )


def seal(message: Message, payload: bytes | memoryview, identity: SigningIdentity) -> bytes:
    """Encode and sign ``message`` with ``payload`` into envelope bytes.

    Raises:
        LocalProtocolError: the identity is not the message's sender, or the
            payload does not fit the message (wrong size for its codec, a
            payload on a kind that has none).
    """
    if identity.key_id != message.sender:
        raise LocalProtocolError(
            f"message names sender {message.sender} but is signed by {identity.key_id}"
        )
    size = len(payload)
    problem = _payload_size_problem(message, size)
    if problem:
        raise LocalProtocolError(problem)
    header = message_to_wire(message)
    header["payload_size"] = size
    header["payload_blake3"] = payload_digest(payload)
    header_bytes = msgpack.packb(header, use_bin_type=True)
    signature = identity.sign(SIGNING_CONTEXT + header_bytes)
    return msgpack.packb([PROTOCOL_VERSION, header_bytes, payload, signature], use_bin_type=True)


def parse_envelope(
    data: bytes | bytearray | memoryview,
    limits: Limits = DEFAULT_LIMITS,
    *,
    kinds: Collection[Kind] | None = None,
) -> Envelope:
    """Parse envelope bytes and check every field, without any cryptography.

    Args:
        data: the received bytes.
        limits: decoding caps.
        kinds: the message kinds the caller takes (default: all). The header's
            structure is then held to the caps of those kinds alone (an edge
            taking updates refuses any header with an array before msgpack
            reads it), and a message of another kind is malformed.

    Raises:
        LimitExceeded: the envelope, its header, its structure or a field is
            above its cap.
        UnsupportedVersion: the version is not 1.
        DecodeError: anything else malformed (bad msgpack, wrong types,
            missing or unknown fields, a payload of the wrong size, a kind
            not in ``kinds``).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"envelope must be bytes, got {type(data).__name__}")
    if isinstance(data, memoryview) and (data.format != "B" or data.ndim != 1):
        # The walk reads bytes as ints; a view of other items is its raw bytes here.
        data = data.cast("B") if data.c_contiguous else memoryview(data.tobytes())
    if len(data) > limits.max_envelope_bytes:
        raise LimitExceeded(
            f"envelope of {len(data)} bytes is above the cap of {limits.max_envelope_bytes}"
        )
    _check_structure(data, _ENVELOPE_CAPS, "envelope")
    outer = _unpack(
        data,
        what="envelope",
        max_bin_len=len(data),
        max_array_len=4,
        max_map_len=0,
        max_str_len=0,
    )
    if not isinstance(outer, list) or len(outer) != 4:
        raise DecodeError("envelope must be a msgpack array of 4 items")
    version, header_bytes, payload, signature = outer
    if not isinstance(version, int) or isinstance(version, bool):
        raise DecodeError(f"envelope version must be an integer, got {type(version).__name__}")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"envelope version {version} is not supported; this implementation speaks version "
            f"{PROTOCOL_VERSION}"
        )
    if not isinstance(header_bytes, bytes) or not isinstance(payload, bytes):
        raise DecodeError("envelope header and payload must be msgpack bin")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise DecodeError("envelope signature must be 64 bytes of msgpack bin")
    if len(header_bytes) > limits.max_header_bytes:
        raise LimitExceeded(
            f"header of {len(header_bytes)} bytes is above the cap of {limits.max_header_bytes}"
        )
    expected = frozenset(kinds) if kinds is not None else None
    caps = header_caps(limits, expected)
    _check_structure(header_bytes, caps, "header")
    header = _unpack(
        header_bytes,
        what="header",
        max_bin_len=_HEADER_MAX_BIN,
        max_array_len=caps.max_array_len,
        max_map_len=caps.max_map_len,
        max_str_len=max(limits.max_str_chars, 1024),
    )
    if not isinstance(header, dict):
        raise DecodeError("header must be a msgpack map")
    kind_value = header.pop("kind", None)
    try:
        kind = Kind(kind_value)
    except ValueError:
        raise DecodeError(f"header kind {kind_value!r} is not a known message kind") from None
    if expected is not None and kind not in expected:
        raise DecodeError(
            f"a {kind.value} message arrived where "
            f"{' or '.join(sorted(k.value for k in expected))} is expected"
        )
    size = header.pop("payload_size", None)
    digest = header.pop("payload_blake3", None)
    if not isinstance(size, int) or isinstance(size, bool) or size != len(payload):
        raise DecodeError(
            f"{kind.value} header declares payload_size {size!r}; "
            f"the payload has {len(payload)} bytes"
        )
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise DecodeError(f"{kind.value} header field 'payload_blake3' must be 32 bytes")
    message = message_from_wire(header, kind, limits)
    problem = _payload_size_problem(message, size)
    if problem:
        raise DecodeError(problem)
    return Envelope(message, payload, header_bytes, signature, digest)


def open_envelope(
    data: bytes | bytearray | memoryview,
    keys: KeyLookup,
    limits: Limits = DEFAULT_LIMITS,
    *,
    kinds: Collection[Kind] | None = None,
) -> Envelope:
    """Parse and verify envelope bytes against the sender's registered key.

    Args:
        data: the received bytes.
        keys: key id -> public key (a mapping or a lookup function).
        limits: decoding caps.
        kinds: the message kinds the caller takes (default: all), as in
            ``parse_envelope``.

    Raises:
        UnknownSender: no key is registered for the sender.
        SignatureError, DigestMismatch: the bytes are not what the sender signed.
        DecodeError: as ``parse_envelope``.
    """
    envelope = parse_envelope(data, limits, kinds=kinds)
    key = keys.get(envelope.sender) if isinstance(keys, Mapping) else keys(envelope.sender)
    if key is None:
        raise UnknownSender(
            f"{envelope.message.KIND.value} from unregistered sender {envelope.sender}"
        )
    envelope.verify(key)
    return envelope


def _unpack(
    data: bytes | bytearray | memoryview,
    *,
    what: str,
    max_bin_len: int,
    max_array_len: int,
    max_map_len: int,
    max_str_len: int,
) -> Any:
    def unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        # msgpack keeps the last of duplicate keys; two parsers could then read
        # one signed header two ways. Refuse duplicates outright.
        out = dict(pairs)
        if len(out) != len(pairs):
            raise DecodeError(f"{what} map repeats a key")
        return out

    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_ext_len=0,
            object_pairs_hook=unique_keys,
            max_bin_len=max_bin_len,
            max_array_len=max_array_len,
            max_map_len=max_map_len,
            max_str_len=max_str_len,
        )
    except FedtierError:
        raise
    except Exception as exc:  # the C unpacker raises many types; all mean "malformed"
        kind = LimitExceeded if "exceeds max" in str(exc) else DecodeError
        raise kind(f"{what} is not valid msgpack within its caps: {exc}") from exc


def _check_structure(data: bytes | bytearray | memoryview, caps: StructureCaps, what: str) -> None:
    """Walk one msgpack value without building it; refuse a structure above ``caps``.

    msgpack builds every container it reads and sizes an array by its declared
    length before its items arrive, so this walk runs first. It visits each
    object at most once and stops at the first cap exceeded, so its cost is
    bounded by ``caps.max_objects``, whatever the bytes; a run of scalars
    encoded alike (a partial's ids) is skipped in one step.

    Raises:
        LimitExceeded: deeper than ``caps.max_depth``, or more maps, arrays,
            objects, map entries or array items than the caps allow.
        DecodeError: not exactly one msgpack value (truncated, trailing bytes,
            the reserved byte 0xc1) or an extension type.
    """
    steps = _STEP
    max_depth, max_objects = caps.max_depth, caps.max_objects
    end = len(data)
    pos = depth = maps = arrays = 0
    objects = 1
    todo = 1  # items left in the innermost open container; the top level holds one
    stack: list[int] = []  # the items left in each enclosing container
    try:
        while True:
            while todo:
                todo -= 1
                b = data[pos]  # IndexError past the end: truncated
                step = steps[b]
                if step > 0:  # a scalar of fixed size
                    pos += step
                    continue
                if step == -1:  # str 8, bin 8
                    pos += 2 + data[pos + 1]
                    continue
                if step == -2:  # str 16, bin 16
                    pos += 3 + (data[pos + 1] << 8 | data[pos + 2])
                    continue
                if step:  # str 32, bin 32
                    pos += 5 + _U32(data, pos + 1)[0]
                    continue
                if 0x80 <= b <= 0x9F:
                    n, is_map = b & 0x0F, b < 0x90
                    pos += 1
                elif b == 0xDC or b == 0xDE:
                    n, is_map = data[pos + 1] << 8 | data[pos + 2], b == 0xDE
                    pos += 3
                elif b == 0xDD or b == 0xDF:
                    n, is_map = int.from_bytes(data[pos + 1 : pos + 5], "big"), b == 0xDF
                    pos += 5
                else:
                    raise _unused_byte(what, b, pos)
                depth += 1
                if depth > max_depth:
                    raise LimitExceeded(
                        f"{what} nests containers {depth} deep; the cap is {max_depth}"
                    )
                if is_map:
                    maps += 1
                    if maps > caps.max_maps or n > caps.max_map_len:
                        raise _container_over(what, "map", maps, n, caps)
                    n *= 2
                else:
                    arrays += 1
                    if arrays > caps.max_arrays or n > caps.max_array_len:
                        raise _container_over(what, "array", arrays, n, caps)
                objects += n
                if objects > max_objects:
                    raise LimitExceeded(
                        f"{what} holds more than {max_objects} msgpack objects (the cap)"
                    )
                if n >= _RUN_MIN and not is_map:
                    stop = _uniform_run(data, pos, n, end)
                    if stop:
                        pos = stop
                        n = 0
                if n:
                    stack.append(todo)
                    todo = n
                else:
                    depth -= 1
            if not stack:
                break
            todo = stack.pop()
            depth -= 1
    except (IndexError, struct.error):
        pos = end + 1
    if pos > end:
        raise DecodeError(f"{what} is not valid msgpack: it ends inside an item")
    if pos < end:
        raise DecodeError(f"{what} is not valid msgpack: {end - pos} bytes follow its end")


def _unused_byte(what: str, byte: int, pos: int) -> DecodeError:
    if byte == 0xC1:
        return DecodeError(f"{what} is not valid msgpack: the reserved byte 0xc1 at {pos}")
    return DecodeError(
        f"{what} holds a msgpack extension type (byte 0x{byte:02x} at {pos}); fedtier uses none"
    )


def _container_over(
    what: str, kind: str, count: int, length: int, caps: StructureCaps
) -> LimitExceeded:
    most, longest = (
        (caps.max_maps, caps.max_map_len)
        if kind == "map"
        else (caps.max_arrays, caps.max_array_len)
    )
    if count > most:
        return LimitExceeded(f"{what} holds more than {most} {kind}s (the cap)")
    article, unit = ("a", "entries") if kind == "map" else ("an", "items")
    return LimitExceeded(f"{what} has {article} {kind} of {length} {unit}; the cap is {longest}")


def _uniform_run(data: bytes | bytearray | memoryview, pos: int, n: int, end: int) -> int:
    """End of ``n`` scalars from ``pos`` if all are encoded alike (same type, length), else 0."""
    first = data[pos]
    size = _FIXED_SIZE[first]
    head = 1
    if not size:
        width = _LENGTH_PREFIX[first]
        if not width:
            return 0
        head += width
        size = head + int.from_bytes(data[pos + 1 : pos + head], "big")
    stop = pos + n * size
    if stop > end:
        return 0
    # Equal heads every ``size`` bytes make every item that long: one strided
    # compare per head byte checks them all.
    for j in range(head):
        if data[pos + j : stop : size] != bytes(data[pos + j : pos + j + 1]) * n:
            return 0
    return stop


def _payload_size_problem(message: Message, size: int) -> str | None:
    codec = getattr(message, "codec", None)
    kind = message.KIND.value
    if codec is None:
        return None if size == 0 else f"{kind} carries no payload, got {size} bytes"
    num_params = message.num_params  # type: ignore[union-attr]
    expected = codec.expected_payload_size(num_params)
    if expected is not None and size != expected:
        return (
            f"{kind} from {message.sender}: codec {codec} with {num_params} values needs a "
            f"{expected}-byte payload, got {size}"
        )
    if expected is None and size > codec.max_payload_size(num_params):
        return (
            f"{kind} from {message.sender}: payload of {size} bytes is above the most codec "
            f"{codec} can need for {num_params} values"
        )
    return None
