"""Update codecs and their byte layouts; imports only numpy, stdlib and protocol.errors, no trio.

A codec turns a dense float32 delta of ``n`` model parameters into a payload and
back. Which codec a payload uses travels in the signed header as a
:class:`CodecSpec` map. All multi-byte numbers are little-endian.

Payload layouts (``m`` values: ``m = n`` dense, ``m = k`` for top-k)::

    f32      m x float32
    f16      m x IEEE-754 binary16
    i8       ceil(m / chunk) x float32 scale, then m x int8 q
             value_j = q_j * scale[j // chunk]; q != -128; scales finite, >= 0
    top-k    index section, then the value section above over m = k values
      u32      k x uint32, strictly increasing, each < n
      varint   k unsigned LEB128 varints: index_0, then index_i - index_(i-1) >= 1;
               each at most 5 bytes, minimal (no trailing 0x00 group), < 2**32;
               the section is exactly payload_len - value_section_len bytes

The i8 encoder computes ``scale = float32(absmax(chunk)) / float32(127)`` and
``q = round_half_even(float32(x / scale))`` (or, with a seed, stochastic
rounding ``floor(x / scale + u)``), clamped to [-127, 127]; an all-zero chunk
gets scale 0. Top-k keeps the ``k`` entries of largest magnitude (ties are the
encoder's choice; decoders need not reproduce it).

Every failure to decode bytes is a ``DecodeError`` (``LimitExceeded`` when a
payload is longer than its codec allows); an invalid argument built on this
side is a ``LocalProtocolError``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Final, Literal, TypeAlias, cast

import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import DecodeError, LimitExceeded, LocalProtocolError

__all__ = [
    "DEFAULT_I8_CHUNK",
    "DEFAULT_INDEX",
    "MAX_CHUNK",
    "CodecSpec",
    "DecodedPayload",
    "IndexKind",
    "Payload",
    "ValuesKind",
    "all_finite",
    "decode",
    "encode",
    "fold_into",
    "parse_payload",
    "pick_codec",
    "relative_l2_error",
]

ValuesKind: TypeAlias = Literal["f32", "f16", "i8"]
IndexKind: TypeAlias = Literal["u32", "varint"]
F32Array: TypeAlias = npt.NDArray[np.float32]
# Payloads are read zero-copy through the buffer protocol.
Payload: TypeAlias = bytes | bytearray | memoryview

DEFAULT_I8_CHUNK: Final = 512
MAX_CHUNK: Final = 65536
DEFAULT_INDEX: Final[IndexKind] = "u32"
# Indices are uint32 on the wire, so a sparse codec addresses at most 2**32 values.
_MAX_SPARSE_PARAMS: Final = 2**32
_MAX_VARINT_BYTES: Final = 5
_F16_MAX: Final = 65504.0
# Smallest real that float32 rounds to inf: max + half an ulp (ties go to even, i.e. up).
_F32_OVERFLOW: Final = 2.0**128 - 2.0**103
# 64K float32 = 256 KiB of scratch: stays in L2 and never faults in fresh pages
# (2.6 us each here); a 1e6 f32 fold through it costs about what `acc += w * x`
# does with a warm allocator, and less than it with a cold one.
_BLOCK_VALUES: Final = 65536

_VALUES_KINDS: Final[dict[str, ValuesKind]] = {"f32": "f32", "f16": "f16", "i8": "i8"}
_INDEX_KINDS: Final[dict[str, IndexKind]] = {"u32": "u32", "varint": "varint"}
_WIRE_KEYS: Final = ("values", "chunk", "k", "index")
_NAME_RE: Final = re.compile(
    r"(?:top(?:(?P<pct>[0-9]{1,3}(?:\.[0-9]{1,6})?)%|(?P<k>[0-9]{1,10}))\+)?"
    r"(?P<values>f32|f16|i8)(?:/c(?P<chunk>[0-9]{1,6}))?"
    r"(?:\+(?P<index>u32|varint))?",
    re.ASCII,
)


def _show(value: object) -> str:
    """Repr of a value from the network, cut short so a hostile one cannot flood a log."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _spec_problem(values: object, chunk: object, k: object, index: object) -> str | None:
    """Say what is wrong with a codec's fields, or None when they are valid.

    ``type(x) is int`` on purpose: a bool is an int to Python but not on the wire.
    """
    if not isinstance(values, str) or values not in _VALUES_KINDS:
        return f"codec field 'values' is {_show(values)}; it must be one of 'f32', 'f16', 'i8'"
    if values == "i8":
        if chunk is None:
            return "codec field 'chunk' is missing; it is required when values is 'i8'"
        if type(chunk) is not int or not 1 <= chunk <= MAX_CHUNK:
            return f"codec field 'chunk' is {_show(chunk)}; it must be between 1 and {MAX_CHUNK}"
    elif chunk is not None:
        return f"codec field 'chunk' is {_show(chunk)}; it is allowed only when values is 'i8'"
    if k is None:
        if index is not None:
            return f"codec field 'index' is {_show(index)}; it is allowed only with 'k'"
        return None
    if type(k) is not int or not 1 <= k <= _MAX_SPARSE_PARAMS:
        return f"codec field 'k' is {_show(k)}; it must be an integer between 1 and 2**32"
    if index is None:
        return "codec field 'index' is missing; it is required with 'k'"
    if not isinstance(index, str) or index not in _INDEX_KINDS:
        return f"codec field 'index' is {_show(index)}; it must be 'u32' or 'varint'"
    return None


@dataclass(frozen=True, slots=True)
class CodecSpec:
    """How one update payload is encoded; travels in the signed header.

    Attributes:
        values: how values are stored: ``"f32"``, ``"f16"`` or ``"i8"``.
        chunk: i8 only (required there): values per float32 scale, 1..65536.
        k: top-k only: number of kept entries; None means dense.
        index: top-k only (required with ``k``): ``"u32"`` or ``"varint"``.
    """

    values: ValuesKind
    chunk: int | None = None
    k: int | None = None
    index: IndexKind | None = None

    def __post_init__(self) -> None:
        problem = _spec_problem(self.values, self.chunk, self.k, self.index)
        if problem is not None:
            raise LocalProtocolError(problem)

    # -- wire form ---------------------------------------------------------

    def to_wire(self) -> dict[str, object]:
        """Return the msgpack map for the header, holding only the keys that apply."""
        wire: dict[str, object] = {"values": self.values}
        if self.chunk is not None:
            wire["chunk"] = self.chunk
        if self.k is not None:
            wire["k"] = self.k
            wire["index"] = self.index
        return wire

    @classmethod
    def from_wire(cls, obj: object, *, num_params: int) -> CodecSpec:
        """Parse a header's codec map strictly.

        Args:
            obj: the decoded msgpack value.
            num_params: parameters of the model the update is for; bounds ``k``.

        Raises:
            DecodeError: not a map, unknown or missing keys, wrong types or values.
        """
        _check_num_params_arg(num_params)
        if not isinstance(obj, dict):
            raise DecodeError(f"codec is a {type(obj).__name__}; it must be a map")
        for key in obj:
            if not isinstance(key, str):
                raise DecodeError(f"codec has a non-string key {_show(key)}")
            if key not in _WIRE_KEYS:
                raise DecodeError(
                    f"codec has unknown field {_show(key)}; known fields are "
                    "'values', 'chunk', 'k', 'index'"
                )
            if obj[key] is None:
                # nil would otherwise read as "absent"; one spelling per spec keeps
                # the signed header canonical.
                raise DecodeError(f"codec field {key!r} is nil; omit the field instead")
        if "values" not in obj:
            raise DecodeError("codec field 'values' is missing")
        values, chunk, k, index = (obj.get(key) for key in _WIRE_KEYS)
        problem = _spec_problem(values, chunk, k, index)
        if problem is not None:
            raise DecodeError(problem)
        spec = cls(values, chunk, k, index)  # type: ignore[arg-type]  # checked above
        if spec.k is not None and spec.k > num_params:
            raise DecodeError(
                f"codec field 'k' is {spec.k}; the model has only {num_params} parameters"
            )
        return spec

    # -- sizes -------------------------------------------------------------

    def _values_size(self, m: int) -> int:
        if self.values == "f32":
            return 4 * m
        if self.values == "f16":
            return 2 * m
        assert self.chunk is not None
        return 4 * -(-m // self.chunk) + m

    def expected_payload_size(self, num_params: int) -> int | None:
        """Exact payload size in bytes, or None for varint indices (size depends on data).

        Raises:
            LocalProtocolError: ``num_params`` is negative or below ``k``.
        """
        self._check_fits(num_params, LocalProtocolError)
        if self.k is None:
            return self._values_size(num_params)
        if self.index == "varint":
            return None
        return 4 * self.k + self._values_size(self.k)

    def max_payload_size(self, num_params: int) -> int:
        """Largest payload this codec can produce for ``num_params`` values (5 bytes per varint).

        Raises:
            LocalProtocolError: ``num_params`` is negative or below ``k``.
        """
        self._check_fits(num_params, LocalProtocolError)
        if self.k is None:
            return self._values_size(num_params)
        per_index = _MAX_VARINT_BYTES if self.index == "varint" else 4
        return per_index * self.k + self._values_size(self.k)

    def _check_fits(
        self, num_params: int, error: type[DecodeError] | type[LocalProtocolError]
    ) -> None:
        _check_num_params_arg(num_params)
        if self.k is not None and self.k > num_params:
            raise error(f"codec {self} keeps {self.k} values; the model has {num_params}")

    # -- human names -------------------------------------------------------

    def __str__(self) -> str:
        name: str = self.values
        if self.chunk is not None and self.chunk != DEFAULT_I8_CHUNK:
            name += f"/c{self.chunk}"
        if self.k is not None:
            name = f"top{self.k}+{name}"
            if self.index != DEFAULT_INDEX:
                name += f"+{self.index}"
        return name

    @classmethod
    def parse(cls, name: str, *, num_params: int | None = None) -> CodecSpec:
        """Parse a short name such as ``i8``, ``i8/c256``, ``top10000+f16``, ``top1%+i8+varint``.

        Args:
            name: the name; ``str(spec)`` gives one back.
            num_params: model size; required by the ``topP%`` form (k = ceil(P% of n),
                at least 1), and checked against ``k`` when given.

        Raises:
            LocalProtocolError: the name does not parse or does not fit ``num_params``.
        """
        match = _NAME_RE.fullmatch(name)
        if match is None:
            raise LocalProtocolError(
                f"codec name {_show(name)} does not parse; examples: "
                "'f32', 'f16', 'i8', 'i8/c256', 'top1%+i8', 'top10000+f16+varint'"
            )
        values = _VALUES_KINDS[match["values"]]
        chunk: int | None = None
        if values == "i8":
            chunk = DEFAULT_I8_CHUNK if match["chunk"] is None else int(match["chunk"])
        elif match["chunk"] is not None:
            raise LocalProtocolError(
                f"codec name {name!r} gives a chunk to {values}; only i8 has one"
            )
        k: int | None = None
        if match["pct"] is not None:
            if num_params is None:
                raise LocalProtocolError(f"codec name {name!r} needs num_params to turn % into k")
            percent = Fraction(match["pct"])
            if not 0 < percent <= 100:
                raise LocalProtocolError(
                    f"codec name {name!r} keeps {percent}%; it must be in (0, 100]"
                )
            k = max(1, math.ceil(percent * num_params / 100))
        elif match["k"] is not None:
            k = int(match["k"])
        index: IndexKind | None = None
        if k is not None:
            index = DEFAULT_INDEX if match["index"] is None else _INDEX_KINDS[match["index"]]
        elif match["index"] is not None:
            raise LocalProtocolError(f"codec name {name!r} names an index without 'topK+'")
        spec = cls(values, chunk, k, index)
        if num_params is not None:
            spec._check_fits(num_params, LocalProtocolError)
        return spec


def _check_num_params_arg(num_params: int) -> None:
    if type(num_params) is not int or num_params < 0:
        raise LocalProtocolError(f"num_params is {_show(num_params)}; it must be an int >= 0")


# -- encoding ---------------------------------------------------------------


def encode(delta: F32Array, spec: CodecSpec, *, seed: int | None = None) -> bytes:
    """Encode a dense float32 delta.

    Args:
        delta: 1-D float32 array of every model parameter; all finite.
        spec: the codec.
        seed: i8 only: seed for stochastic rounding (PCG64); None rounds half to even.

    Raises:
        LocalProtocolError: wrong array, a non-finite value, a value outside the f16
            range, or ``k`` above the number of values.
    """
    if not isinstance(delta, np.ndarray) or delta.dtype != np.float32 or delta.ndim != 1:
        raise LocalProtocolError("delta must be a 1-D float32 numpy array")
    n = delta.shape[0]
    spec._check_fits(n, LocalProtocolError)
    if n:
        # min/max propagate NaN and need no temporary: the cheapest finiteness check.
        low, high = float(delta.min()), float(delta.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            raise LocalProtocolError("delta has a non-finite value; refusing to encode it")
        if spec.values == "f16" and max(-low, high) > _F16_MAX:
            raise LocalProtocolError(
                f"delta has a value of magnitude {max(-low, high):g}; f16 holds at most 65504"
            )
    if spec.k is None:
        return _encode_values(delta, spec, seed)
    if n > _MAX_SPARSE_PARAMS:
        raise LocalProtocolError(f"top-k indexes at most 2**32 values; delta has {n}")
    k = spec.k
    if k == n:
        kept = np.arange(n, dtype=np.int64)
    else:
        kept = np.argpartition(np.abs(delta), n - k)[n - k :]
        kept.sort()
    index_bytes = kept.astype("<u4").tobytes() if spec.index == "u32" else _encode_varints(kept)
    return index_bytes + _encode_values(delta[kept], spec, seed)


def _encode_values(values: F32Array, spec: CodecSpec, seed: int | None) -> bytes:
    if spec.values == "f32":
        return values.astype("<f4", copy=False).tobytes()
    if spec.values == "f16":
        return values.astype("<f2").tobytes()
    assert spec.chunk is not None
    scales, q = _quantize_i8(values, spec.chunk, seed)
    return scales.astype("<f4", copy=False).tobytes() + q.tobytes()


def _quantize_i8(
    values: F32Array, chunk: int, seed: int | None
) -> tuple[F32Array, npt.NDArray[np.int8]]:
    m = values.shape[0]
    if m == 0:
        return np.empty(0, np.float32), np.empty(0, np.int8)
    absmax = np.maximum.reduceat(np.abs(values), np.arange(0, m, chunk))
    scales = np.divide(absmax, np.float32(127), dtype=np.float32)
    with np.errstate(over="ignore"):
        overflows = ~np.isfinite(scales * np.float32(127))
    if overflows.any():
        # Near float32's maximum, a scale rounded up would decode 127 * scale to
        # inf; one ulp down keeps every decoded value finite (clamping absorbs it).
        scales[overflows] = np.nextafter(scales[overflows], np.float32(0))
    ratio = np.zeros(m, np.float32)
    full = m // chunk
    # Divide (not multiply by a reciprocal) so other implementations can match
    # these bytes exactly; zero-scale chunks keep ratio 0.
    if full:
        rows = scales[:full, None]
        np.divide(
            values[: full * chunk].reshape(full, chunk),
            rows,
            out=ratio[: full * chunk].reshape(full, chunk),
            where=rows > 0,
        )
    if full * chunk < m and scales[full] > 0:
        np.divide(values[full * chunk :], scales[full], out=ratio[full * chunk :])
    if seed is None:
        np.rint(ratio, out=ratio)
    else:
        rng = np.random.Generator(np.random.PCG64(seed))
        ratio += rng.random(m, dtype=np.float32)
        np.floor(ratio, out=ratio)
    np.clip(ratio, -127, 127, out=ratio)
    return scales, ratio.astype(np.int8)


def _encode_varints(indices: npt.NDArray[np.int64]) -> bytes:
    deltas: npt.NDArray[np.uint64] = indices.astype(np.uint64)
    deltas[1:] -= deltas[:-1].copy()
    lengths = np.ones(deltas.shape[0], np.int64)
    for bits in (7, 14, 21, 28):
        lengths += deltas >= np.uint64(1 << bits)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]) if ends.size else 0, np.uint8)
    for j in range(_MAX_VARINT_BYTES):
        sel = lengths > j
        group = (deltas[sel] >> np.uint64(7 * j)) & np.uint64(0x7F)
        more = (lengths[sel] > j + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + j] = (group | more).astype(np.uint8)
    return out.tobytes()


# -- parsing and validation ------------------------------------------------


_ValuesView: TypeAlias = npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.int8]


@dataclass(slots=True)
class _Parsed:
    """A validated payload, as zero-copy views into its buffer."""

    indices: npt.NDArray[np.intp] | None  # strictly increasing, < n; None when dense
    values: _ValuesView  # float32, float16 or int8 (i8's q)
    scales: F32Array | None  # i8 only: finite, >= 0


def _byte_view(payload: object) -> memoryview:
    try:
        return memoryview(payload).cast("B")  # type: ignore[arg-type]
    except TypeError as exc:
        raise LocalProtocolError(
            f"payload is a {type(payload).__name__}; it must be a C-contiguous bytes-like buffer"
        ) from exc


def _parse(payload: object, spec: CodecSpec, num_params: int) -> _Parsed:
    """Check every rule of the layout; a payload that passes cannot make numpy raise later."""
    if not isinstance(spec, CodecSpec):
        raise LocalProtocolError(f"spec is a {type(spec).__name__}; it must be a CodecSpec")
    spec._check_fits(num_params, DecodeError)
    buf = _byte_view(payload)
    size = buf.nbytes
    m = num_params if spec.k is None else spec.k
    values_size = spec._values_size(m)
    if spec.k is None or spec.index == "u32":
        expected = spec.expected_payload_size(num_params)
        assert expected is not None
        if size != expected:
            error = LimitExceeded if size > expected else DecodeError
            raise error(
                f"{spec} payload for {num_params} parameters must be {expected} bytes; got {size}"
            )
    indices: npt.NDArray[np.intp] | None = None
    values_offset = 0
    if spec.k is not None:
        if spec.index == "u32":
            values_offset = 4 * spec.k
            indices = _parse_u32(np.frombuffer(buf, "<u4", spec.k), num_params)
        else:
            values_offset = size - values_size
            low, high = spec.k, _MAX_VARINT_BYTES * spec.k
            if not low <= values_offset <= high:
                error = LimitExceeded if values_offset > high else DecodeError
                raise error(
                    f"{spec} payload for {num_params} parameters must be between "
                    f"{low + values_size} and {high + values_size} bytes; got {size}"
                )
            index_bytes = np.frombuffer(buf, np.uint8, values_offset)
            indices = _parse_varints(index_bytes, spec.k, num_params)
    values, scales = _parse_values(buf, values_offset, spec, m)
    return _Parsed(indices, values, scales)


def _parse_values(
    buf: memoryview, offset: int, spec: CodecSpec, m: int
) -> tuple[_ValuesView, F32Array | None]:
    if spec.values == "f32":
        return np.frombuffer(buf, "<f4", m, offset), None
    if spec.values == "f16":
        return np.frombuffer(buf, "<f2", m, offset), None
    assert spec.chunk is not None
    num_chunks = -(-m // spec.chunk)
    scales = np.frombuffer(buf, "<f4", num_chunks, offset)
    q = np.frombuffer(buf, np.int8, m, offset + 4 * num_chunks)
    if num_chunks:
        # NaN fails both comparisons, so one mask catches NaN, inf and negatives.
        bad = ~((scales >= 0) & (scales < np.inf))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise DecodeError(
                f"i8 scale {j} is {float(scales[j])!r}; scales must be finite and >= 0"
            )
        if int(q.min()) == -128:
            j = int(np.argmin(q))
            raise DecodeError(f"i8 value {j} is -128; values must be between -127 and 127")
    return q, scales


def _check_indices_tail(last: int, k: int, num_params: int) -> None:
    if last >= num_params:
        raise DecodeError(f"top-k index {k - 1} is {last}; the model has {num_params} parameters")


def _parse_u32(raw: npt.NDArray[np.uint32], num_params: int) -> npt.NDArray[np.intp]:
    k = raw.shape[0]
    if k > 1:
        bad = raw[1:] <= raw[:-1]
        if bad.any():
            j = int(np.flatnonzero(bad)[0]) + 1
            raise DecodeError(
                f"top-k index {j} is {int(raw[j])} after {int(raw[j - 1])}; "
                "indices must be strictly increasing"
            )
    _check_indices_tail(int(raw[-1]), k, num_params)
    return raw.astype(np.intp)


def _parse_varints(raw: npt.NDArray[np.uint8], k: int, num_params: int) -> npt.NDArray[np.intp]:
    # Vectorized LEB128: a byte below 0x80 ends a varint; each byte's position
    # inside its varint comes from its varint's start; reduceat sums the groups.
    ends_mask = raw < 0x80
    if not ends_mask[-1]:
        raise DecodeError("varint index section ends inside a varint (truncated)")
    ends = np.flatnonzero(ends_mask)
    if ends.shape[0] != k:
        raise DecodeError(
            f"varint index section holds {ends.shape[0]} varints; the codec declares k={k}"
        )
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    longest = int(lengths.max())
    if longest > _MAX_VARINT_BYTES:
        j = int(np.argmax(lengths))
        raise DecodeError(f"varint {j} is {longest} bytes long; at most 5 are allowed")
    last_bytes = raw[ends]
    bad = (lengths > 1) & (last_bytes == 0)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise DecodeError(f"varint {j} ends in a redundant 0x00 byte; encodings must be minimal")
    # A 5th byte carries bits 28..31, so above 0x0F the value is >= 2**32.
    bad = (lengths == _MAX_VARINT_BYTES) & (last_bytes > 0x0F)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise DecodeError(f"varint {j} is at least 2**32; indices must be below 2**32")
    group: npt.NDArray[np.intp] = np.cumsum(ends_mask) - ends_mask
    position = np.arange(raw.shape[0]) - starts[group]
    shifted = (raw & np.uint8(0x7F)).astype(np.uint64) << (7 * position).astype(np.uint64)
    deltas = np.add.reduceat(shifted, starts)
    if k > 1:
        zero = deltas[1:] == 0
        if zero.any():
            j = int(np.flatnonzero(zero)[0]) + 1
            raise DecodeError(f"varint {j} is a delta of 0; indices must be strictly increasing")
    indices = np.cumsum(deltas)
    _check_indices_tail(int(indices[-1]), k, num_params)
    return indices.astype(np.intp)


# -- dequantization into float32 -------------------------------------------


def _f16_into(bits: npt.NDArray[np.float16], out: F32Array) -> None:
    """Convert binary16 to float32 into ``out`` (same length).

    numpy's own float16 cast runs at about 1.3 ms per 1e6 values here; moving
    the bits (sign-extend, shift by 13, clear the 3 copied sign bits) and
    rescaling by 2**112 gives the exact same float32 for every finite half,
    subnormals included, in about a fifth of that. Blocks with inf/NaN fall
    back to numpy's cast, which is exact for them.
    """
    as_int = out.view(np.int32)
    np.copyto(as_int, bits.view(np.int16))
    np.left_shift(as_int, 13, out=as_int)
    np.bitwise_and(as_int, np.int32(-0x70000001), out=as_int)  # 0x8FFFFFFF
    np.multiply(out, np.float32(2.0**112), out=out)
    # An inf/NaN half (exponent 31) lands at magnitude >= 2**16 > 65504.
    if out.size and max(-float(out.min()), float(out.max())) >= 65536.0:
        np.copyto(out, bits)


def _dequantize_into(
    q: npt.NDArray[np.int8], scales: F32Array, chunk: int, start: int, out: F32Array
) -> None:
    """Write ``q[start:start+len(out)] * scale`` into ``out``; ``start`` is chunk-aligned."""
    length = out.shape[0]
    rows = length // chunk
    first = start // chunk
    body = rows * chunk
    if rows:
        np.multiply(
            q[start : start + body].reshape(rows, chunk),
            scales[first : first + rows, None],
            out=out[:body].reshape(rows, chunk),
        )
    if body < length:
        np.multiply(q[start + body : start + length], scales[first + rows], out=out[body:])


def _values_f32(parsed: _Parsed, spec: CodecSpec) -> F32Array:
    """Dense float32 copy of a parsed value section (k values for top-k, n for dense)."""
    out = np.empty(parsed.values.shape[0], np.float32)
    if spec.values == "f32":
        np.copyto(out, parsed.values)
    elif spec.values == "f16":
        for start in range(0, out.shape[0], _BLOCK_VALUES):
            stop = start + _BLOCK_VALUES
            _f16_into(parsed.values[start:stop].view(np.float16), out[start:stop])
    else:
        assert spec.chunk is not None
        assert parsed.scales is not None
        with np.errstate(over="ignore"):  # a huge scale decodes faithfully to inf
            _dequantize_into(parsed.values.view(np.int8), parsed.scales, spec.chunk, 0, out)
    return out


# -- public decoding API -----------------------------------------------------


def decode(payload: Payload, spec: CodecSpec, num_params: int) -> F32Array:
    """Decode a payload into a new dense float32 array of ``num_params`` values.

    The result may hold inf/NaN (f32/f16 carry them; a huge i8 scale can
    overflow): check with :func:`all_finite` before trusting it.

    Raises:
        DecodeError: the payload breaks the layout (``LimitExceeded`` when too long).
    """
    parsed = _parse(payload, spec, num_params)
    values = _values_f32(parsed, spec)
    if parsed.indices is None:
        return values
    out = np.zeros(num_params, np.float32)
    out[parsed.indices] = values
    return out


def fold_into(acc: F32Array, payload: Payload, spec: CodecSpec, weight: float) -> None:
    """Add ``weight * decode(payload)`` to ``acc`` in place, without a dense temporary.

    The payload is validated completely before ``acc`` is touched, so a bad
    payload raises and leaves ``acc`` unchanged. The weight is applied as a
    float32, and the result is bit-identical to ``acc + weight * decode(...)``.
    Finiteness is not checked here (see :func:`all_finite`).

    Args:
        acc: 1-D, writeable float32 accumulator of every model parameter.
        payload: bytes or any C-contiguous buffer (read zero-copy).
        spec: the payload's codec.
        weight: finite multiplier.

    Raises:
        DecodeError: the payload breaks the layout (``LimitExceeded`` when too long).
        LocalProtocolError: ``acc`` or ``weight`` is unusable.
    """
    _check_acc(acc)
    if not math.isfinite(weight):
        raise LocalProtocolError(f"weight is {weight!r}; it must be finite")
    DecodedPayload(_parse(payload, spec, acc.shape[0]), spec, acc.shape[0]).fold_into(acc, weight)


def _check_acc(acc: object) -> None:
    if (
        not isinstance(acc, np.ndarray)
        or acc.dtype != np.float32
        or acc.ndim != 1
        or not acc.flags.writeable
    ):
        raise LocalProtocolError("acc must be a writeable 1-D float32 numpy array")


class DecodedPayload:
    """A payload validated once, whose decoded values are kept for the next reader.

    Why: a tier checks an update (finiteness, L2 norm) and then folds it; each
    step parsed and dequantized the payload again, and the norm of a top-k
    update was taken over a dense scatter of the whole model
    (docs/performance.md, edge intake). Parse once with :func:`parse_payload`,
    then ask for :meth:`norm_values`, :meth:`all_finite` and :meth:`fold_into`:
    each computes what it needs from the views and the float32 values already
    made, and the fold is bit-identical to :func:`fold_into` on the same bytes.
    A dense i8 fold scales the values it decoded in place and drops them (it is
    their last reader); a second fold decodes them again.

    It holds views into the payload's buffer: keep the buffer alive and unchanged
    while it is used.
    """

    __slots__ = ("_parsed", "_values", "num_params", "spec")

    def __init__(self, parsed: _Parsed, spec: CodecSpec, num_params: int) -> None:
        self._parsed = parsed
        self.spec = spec
        self.num_params = num_params
        # i8 values dequantized to float32 (k of them for top-k, n for dense), made once.
        self._values: F32Array | None = None

    def _float_values(self) -> F32Array:
        if self._values is None:
            with np.errstate(over="ignore"):  # a huge scale decodes faithfully to inf
                self._values = _values_f32(self._parsed, self.spec)
        return self._values

    def norm_values(self) -> npt.NDArray[np.floating]:
        """The values whose L2 norm is the update's: the stored values, never a dense scatter.

        Dense f32/f16: a zero-copy view of the payload; i8: its float32 decode
        (made here once and reused by the fold); top-k: the ``k`` values only,
        since the other coordinates are zero.
        """
        if self.spec.values == "i8" or self._parsed.indices is not None:
            return self._float_values()
        # Dense f32/f16: the float view itself (int8 views are i8's, handled above).
        return cast("npt.NDArray[np.floating]", self._parsed.values)

    def all_finite(self) -> bool:
        """Whether every decoded value is finite (as :func:`all_finite`)."""
        if self._values is not None:
            return bool(np.isfinite(self._values).all())
        return _parsed_finite(self._parsed, self.spec)

    def fold_into(self, acc: F32Array, weight: float) -> None:
        """Add ``weight * values`` to ``acc`` in place, as :func:`fold_into` does.

        Raises:
            LocalProtocolError: ``acc`` is not this payload's length, or ``weight``
                is not finite.
        """
        _check_acc(acc)
        if acc.shape[0] != self.num_params:
            raise LocalProtocolError(
                f"acc has {acc.shape[0]} values; the payload was decoded for {self.num_params}"
            )
        if not math.isfinite(weight):
            raise LocalProtocolError(f"weight is {weight!r}; it must be finite")
        parsed, spec = self._parsed, self.spec
        w = np.float32(weight)
        # The caller checks finiteness; overflow here should not turn into a warning
        # (an exception under -W error) halfway through a fold.
        with np.errstate(over="ignore", invalid="ignore"):
            if parsed.indices is not None:
                values = self._float_values()
                if w != 1:
                    values = values * w  # a new array: the kept values stay as decoded
                # Indices are validated strictly increasing, so each appears once.
                np.add.at(acc, parsed.indices, values)
            elif spec.values == "f32" and w == 1:
                np.add(acc, parsed.values, out=acc)
            elif self._values is not None:
                # The fold is the decoded values' last reader: scale them in place
                # (no scratch pass) and forget them; a later fold decodes again.
                values, self._values = self._values, None
                if w != 1:
                    np.multiply(values, w, out=values)
                np.add(acc, values, out=acc)
            else:
                _fold_dense_blocks(acc, parsed, spec, w)


def parse_payload(payload: Payload, spec: CodecSpec, num_params: int) -> DecodedPayload:
    """Validate a payload completely, once, for :class:`DecodedPayload`'s readers.

    Raises:
        DecodeError: the payload breaks the layout (``LimitExceeded`` when too long).
    """
    return DecodedPayload(_parse(payload, spec, num_params), spec, num_params)


def _fold_dense_blocks(acc: F32Array, parsed: _Parsed, spec: CodecSpec, w: np.float32) -> None:
    n = acc.shape[0]
    # i8 blocks must start on a chunk boundary so each row meets one scale.
    block = _BLOCK_VALUES
    if spec.chunk is not None:
        block = max(spec.chunk, block - block % spec.chunk)
    scratch = np.empty(min(block, n), np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        buf = scratch[: stop - start]
        if spec.values == "f32":
            np.multiply(parsed.values[start:stop], w, out=buf)
        else:
            if spec.values == "f16":
                _f16_into(parsed.values[start:stop].view(np.float16), buf)
            else:
                assert spec.chunk is not None
                assert parsed.scales is not None
                _dequantize_into(parsed.values.view(np.int8), parsed.scales, spec.chunk, start, buf)
            if w != 1:
                np.multiply(buf, w, out=buf)
        np.add(acc[start:stop], buf, out=acc[start:stop])


def all_finite(payload: Payload, spec: CodecSpec, num_params: int) -> bool:
    """Tell whether every decoded value would be finite, without decoding densely.

    Raises:
        DecodeError: the payload breaks the layout (``LimitExceeded`` when too long).
    """
    return _parsed_finite(_parse(payload, spec, num_params), spec)


def _parsed_finite(parsed: _Parsed, spec: CodecSpec) -> bool:
    values = parsed.values
    if values.shape[0] == 0:
        return True
    if spec.values == "f32":
        # min/max propagate NaN and allocate nothing.
        return math.isfinite(float(values.min())) and math.isfinite(float(values.max()))
    if spec.values == "f16":
        bits = values.view(np.uint16)
        scratch = np.empty(min(_BLOCK_VALUES, bits.shape[0]), np.uint16)
        for start in range(0, bits.shape[0], _BLOCK_VALUES):
            part = bits[start : start + _BLOCK_VALUES]
            buf = scratch[: part.shape[0]]
            np.bitwise_and(part, 0x7C00, out=buf)
            if int(buf.max()) == 0x7C00:
                return False
        return True
    assert parsed.scales is not None
    # Scales are finite; only q * scale can overflow. The float64 product is
    # exact, and float32 rounds it to inf from the overflow threshold up.
    if float(parsed.scales.max()) * 127 < _F32_OVERFLOW:
        return True
    return bool(np.isfinite(_values_f32(parsed, spec)).all())


# -- choosing and measuring -------------------------------------------------


def pick_codec(num_params: int, byte_budget: int) -> CodecSpec:
    """Pick the lowest-error codec whose payload fits ``byte_budget`` bytes.

    Order: f32, f16, i8 (chunk 512), then top-k i8 with u32 indices and the
    largest k that fits.

    Raises:
        LocalProtocolError: the arguments are invalid, or not even k=1 fits.
    """
    _check_num_params_arg(num_params)
    if num_params == 0:
        raise LocalProtocolError("num_params is 0; there is nothing to encode")
    if type(byte_budget) is not int or byte_budget < 0:
        raise LocalProtocolError(f"byte_budget is {_show(byte_budget)}; it must be an int >= 0")
    for dense in (
        CodecSpec("f32"),
        CodecSpec("f16"),
        CodecSpec("i8", chunk=DEFAULT_I8_CHUNK),
    ):
        if dense.max_payload_size(num_params) <= byte_budget:
            return dense

    def size(k: int) -> int:
        return CodecSpec("i8", DEFAULT_I8_CHUNK, k, "u32").max_payload_size(num_params)

    if size(1) > byte_budget:
        raise LocalProtocolError(
            f"byte budget {byte_budget} is below the smallest top-k payload ({size(1)} bytes)"
        )
    low, high = 1, num_params  # size(low) fits; size is monotone in k
    while low < high:
        mid = (low + high + 1) // 2
        if size(mid) <= byte_budget:
            low = mid
        else:
            high = mid - 1
    return CodecSpec("i8", DEFAULT_I8_CHUNK, low, "u32")


def relative_l2_error(
    original: npt.NDArray[np.floating], reconstructed: npt.NDArray[np.floating]
) -> float:
    """Return ``||original - reconstructed|| / ||original||``, in float64.

    A zero original gives 0.0 when the reconstruction is zero too, else inf.

    Raises:
        LocalProtocolError: the shapes differ.
    """
    if original.shape != reconstructed.shape:
        raise LocalProtocolError(
            f"shapes differ: original {original.shape}, reconstructed {reconstructed.shape}"
        )
    a = np.asarray(original, np.float64)
    diff = float(np.linalg.norm(a - np.asarray(reconstructed, np.float64)))
    norm = float(np.linalg.norm(a))
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / norm
