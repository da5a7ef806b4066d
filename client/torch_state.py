"""torch state_dict <-> protocol.layout flat vectors; the one client module importing torch.

Floating-point tensors (float32, float16, bfloat16, float64) form the layout,
in ``state_dict`` order. Integer and boolean buffers (BatchNorm's
``num_batches_tracked``, say) are not part of it: averaging counters across
devices means nothing, so they never travel and each device keeps its own.
``load_flat`` therefore replaces only the floating tensors of a state dict.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
import torch

from fedtier.protocol.errors import LayoutMismatch
from fedtier.protocol.layout import ModelLayout, TensorSpec

__all__ = ["flat_from_state_dict", "layout_from_state_dict", "load_flat"]

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def layout_from_state_dict(state: Mapping[str, torch.Tensor]) -> ModelLayout:
    """The layout of the floating-point tensors of ``state``, in its order."""
    specs = [
        TensorSpec(name, _DTYPE_NAMES[t.dtype], tuple(int(d) for d in t.shape))
        for name, t in state.items()
        if t.dtype in _DTYPE_NAMES
    ]
    return ModelLayout(tuple(specs))


def flat_from_state_dict(
    state: Mapping[str, torch.Tensor], layout: ModelLayout
) -> npt.NDArray[np.float32]:
    """Concatenate the layout's tensors of ``state`` into one float32 vector.

    Raises:
        LayoutMismatch: a tensor is missing or has another shape or dtype.
    """
    out = np.empty(layout.num_params, dtype=np.float32)
    for spec, offset in zip(layout.tensors, layout.offsets, strict=True):
        tensor = _tensor_for(state, spec, layout)
        flat = tensor.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
        out[offset : offset + spec.size] = flat.numpy()
    return out


def load_flat(
    state: Mapping[str, torch.Tensor], layout: ModelLayout, flat: npt.NDArray[np.float32]
) -> None:
    """Copy ``flat`` into the layout's tensors of ``state``, in place, keeping their dtypes.

    Tensors outside the layout (integer buffers) are left as they are.
    """
    if flat.shape != (layout.num_params,):
        raise LayoutMismatch(
            f"vector has shape {flat.shape}; layout {layout.fingerprint.hex()} expects "
            f"({layout.num_params},)"
        )
    source = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32))
    with torch.no_grad():
        for spec, offset in zip(layout.tensors, layout.offsets, strict=True):
            tensor = _tensor_for(state, spec, layout)
            part = source[offset : offset + spec.size].reshape(spec.shape)
            tensor.copy_(part.to(device=tensor.device, dtype=tensor.dtype))


def _tensor_for(
    state: Mapping[str, torch.Tensor], spec: TensorSpec, layout: ModelLayout
) -> torch.Tensor:
    tensor = state.get(spec.name)
    if tensor is None:
        raise LayoutMismatch(
            f"state dict lacks tensor {spec.name!r} of layout {layout.fingerprint.hex()}"
        )
    if tuple(tensor.shape) != spec.shape or _DTYPE_NAMES.get(tensor.dtype) != spec.dtype:
        raise LayoutMismatch(
            f"tensor {spec.name!r} is {tensor.dtype} {tuple(tensor.shape)}; layout "
            f"{layout.fingerprint.hex()} expects {spec.dtype} {spec.shape}"
        )
    return tensor
