r"""Model layout: named tensors <-> one flat float32 vector, and its fingerprint; numpy only.

Every update names the fingerprint of the layout it was computed for, so a
mismatch is rejected before any math. The fingerprint is the first 16 bytes of
BLAKE3 over these canonical bytes (all integers big-endian)::

    b"fedtier-v1-layout\x00"
    u32  number of tensors
    for each tensor, in order:
        u16  length of the UTF-8 name, then the name bytes
        u8   dtype code (1 float32, 2 float16, 3 bfloat16, 4 float64)
        u8   number of dimensions
        u64  each dimension

The flat vector concatenates the tensors in layout order, each flattened in
C (row-major) order, as float32. Only floating-point tensors are part of a
layout: integer buffers (a BatchNorm's ``num_batches_tracked``, say) are not
averaged and stay as each device has them.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Final

import blake3
import numpy as np
import numpy.typing as npt

from fedtier.protocol.errors import DecodeError, LayoutMismatch, LimitExceeded, LocalProtocolError
from fedtier.protocol.limits import DEFAULT_LIMITS, Limits

__all__ = ["DTYPE_CODES", "ModelLayout", "TensorSpec"]

DTYPE_CODES: Final[dict[str, int]] = {"float32": 1, "float16": 2, "bfloat16": 3, "float64": 4}
_CONTEXT: Final = b"fedtier-v1-layout\x00"
_MAX_NAME_BYTES: Final = 1024

# numpy has no bfloat16; such tensors live as float32 on the numpy side.
_NUMPY_DTYPE: Final[dict[str, type[np.floating]]] = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": np.float32,
    "float64": np.float64,
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One named tensor of a model.

    Attributes:
        name: the tensor's name (e.g. ``"fc1.weight"``), 1-1024 UTF-8 bytes.
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"float64"``.
        shape: dimensions, each >= 0 (a scalar has shape ``()``).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        encoded = self.name.encode("utf-8") if isinstance(self.name, str) else b""
        if not 1 <= len(encoded) <= _MAX_NAME_BYTES:
            raise LocalProtocolError(f"tensor name {self.name!r} must be 1-1024 UTF-8 bytes")
        if self.dtype not in DTYPE_CODES:
            raise LocalProtocolError(
                f"tensor {self.name!r} has dtype {self.dtype!r}; layouts hold only "
                f"{', '.join(DTYPE_CODES)}"
            )
        if len(self.shape) > 255 or any(
            not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in self.shape
        ):
            raise LocalProtocolError(f"tensor {self.name!r} has an invalid shape {self.shape!r}")

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class ModelLayout:
    """An ordered list of named tensors and the flat float32 vector they map to."""

    tensors: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        if not self.tensors:
            raise LocalProtocolError("a model layout needs at least one tensor")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise LocalProtocolError(f"tensor name {dup!r} appears twice in the layout")

    @cached_property
    def num_params(self) -> int:
        """Length of the flat vector."""
        return sum(t.size for t in self.tensors)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start offset of each tensor in the flat vector."""
        out, pos = [], 0
        for t in self.tensors:
            out.append(pos)
            pos += t.size
        return tuple(out)

    @cached_property
    def canonical_bytes(self) -> bytes:
        """The bytes the fingerprint hashes (see the module docstring)."""
        parts = [_CONTEXT, struct.pack(">I", len(self.tensors))]
        for t in self.tensors:
            name = t.name.encode("utf-8")
            parts.append(struct.pack(">H", len(name)))
            parts.append(name)
            parts.append(struct.pack(">BB", DTYPE_CODES[t.dtype], len(t.shape)))
            parts.append(struct.pack(f">{len(t.shape)}Q", *t.shape))
        return b"".join(parts)

    @cached_property
    def fingerprint(self) -> bytes:
        """16-byte id of this layout; every update and partial carries it."""
        return blake3.blake3(self.canonical_bytes).digest()[:16]

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, npt.NDArray[np.floating]]) -> ModelLayout:
        """Build the layout of a dict of numpy arrays, in the dict's order."""
        specs = []
        for name, arr in arrays.items():
            dtype = np.dtype(arr.dtype).name
            if dtype not in DTYPE_CODES:
                raise LocalProtocolError(
                    f"array {name!r} has dtype {dtype}; only floating arrays form a layout"
                )
            specs.append(TensorSpec(name, dtype, tuple(int(d) for d in arr.shape)))
        return cls(tuple(specs))

    def flatten(
        self,
        arrays: Mapping[str, npt.ArrayLike],
        out: npt.NDArray[np.float32] | None = None,
    ) -> npt.NDArray[np.float32]:
        """Concatenate ``arrays`` (by layout name) into one float32 vector.

        Raises:
            LayoutMismatch: a tensor is missing, extra or has another shape.
        """
        missing = [t.name for t in self.tensors if t.name not in arrays]
        extra = [n for n in arrays if n not in {t.name for t in self.tensors}]
        if missing or extra:
            raise LayoutMismatch(
                f"arrays do not match layout {self.fingerprint.hex()}: "
                f"missing {missing[:5]}, unexpected {extra[:5]}"
            )
        if out is None:
            out = np.empty(self.num_params, dtype=np.float32)
        elif out.shape != (self.num_params,) or out.dtype != np.float32:
            raise LocalProtocolError(f"out must be float32 of shape ({self.num_params},)")
        for spec, offset in zip(self.tensors, self.offsets, strict=True):
            arr = np.asarray(arrays[spec.name])
            if tuple(arr.shape) != spec.shape:
                raise LayoutMismatch(
                    f"tensor {spec.name!r} has shape {tuple(arr.shape)}; layout "
                    f"{self.fingerprint.hex()} expects {spec.shape}"
                )
            out[offset : offset + spec.size] = arr.reshape(-1)
        return out

    def unflatten(self, flat: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[np.floating]]:
        """Split a flat vector back into named arrays of each tensor's dtype.

        float32 tensors are views into ``flat``; other dtypes are converted
        copies (bfloat16 tensors come back as float32: numpy has no bfloat16).
        """
        if flat.shape != (self.num_params,):
            raise LayoutMismatch(
                f"vector has {flat.shape[0] if flat.ndim == 1 else flat.shape} values; layout "
                f"{self.fingerprint.hex()} expects {self.num_params}"
            )
        out: dict[str, npt.NDArray[np.floating]] = {}
        for spec, offset in zip(self.tensors, self.offsets, strict=True):
            part = flat[offset : offset + spec.size].reshape(spec.shape)
            out[spec.name] = part.astype(_NUMPY_DTYPE[spec.dtype], copy=False)
        return out

    def to_wire(self) -> list[list[object]]:
        """The layout as msgpack-ready data: ``[[name, dtype, [dims...]], ...]``."""
        return [[t.name, t.dtype, list(t.shape)] for t in self.tensors]

    @classmethod
    def from_wire(cls, obj: object, limits: Limits = DEFAULT_LIMITS) -> ModelLayout:
        """Parse ``to_wire`` output strictly.

        Raises:
            DecodeError: wrong structure or types.
            LimitExceeded: too many tensors, dimensions or parameters.
        """
        if not isinstance(obj, list):
            raise DecodeError(f"layout must be an array, got {type(obj).__name__}")
        if not 1 <= len(obj) <= limits.max_tensors:
            raise LimitExceeded(f"layout has {len(obj)} tensors; the cap is {limits.max_tensors}")
        specs: list[TensorSpec] = []
        total = 0
        for i, entry in enumerate(obj):
            if not (isinstance(entry, list) and len(entry) == 3):
                raise DecodeError(f"layout entry {i} must be [name, dtype, shape]")
            name, dtype, shape = entry
            if not isinstance(name, str) or not isinstance(dtype, str):
                raise DecodeError(f"layout entry {i} name and dtype must be strings")
            if not isinstance(shape, list) or len(shape) > limits.max_ndim:
                raise DecodeError(
                    f"layout entry {i} shape must be an array of <= {limits.max_ndim}"
                )
            if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
                raise DecodeError(f"layout entry {i} shape {shape!r} must hold integers >= 0")
            size = 1
            for d in shape:
                size *= d
            total += size
            if total > limits.max_params:
                raise LimitExceeded(
                    f"layout has more than {limits.max_params} parameters (the cap)"
                )
            try:
                specs.append(TensorSpec(name, dtype, tuple(shape)))
            except LocalProtocolError as exc:
                raise DecodeError(f"layout entry {i}: {exc}") from exc
        try:
            return cls(tuple(specs))
        except LocalProtocolError as exc:
            raise DecodeError(f"layout: {exc}") from exc

    def check(self, fingerprint: bytes, num_params: int, *, what: str) -> None:
        """Raise ``LayoutMismatch`` unless ``fingerprint``/``num_params`` are this layout's."""
        if fingerprint != self.fingerprint or num_params != self.num_params:
            raise LayoutMismatch(
                f"{what} is for layout {fingerprint.hex()} with {num_params} values; "
                f"this model is {self.fingerprint.hex()} with {self.num_params}"
            )


def layout_of(names_shapes: Sequence[tuple[str, tuple[int, ...]]]) -> ModelLayout:
    """Build a float32 layout from ``(name, shape)`` pairs (numpy models, tests)."""
    return ModelLayout(tuple(TensorSpec(n, "float32", s) for n, s in names_shapes))
