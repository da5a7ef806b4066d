"""torch modules <-> flat vectors, and which tensors travel; imports torch, so only lazily.

``fedtier.client`` never imports this module on its own import path: a device
install may lack torch.

The one rule of which tensors travel (are aggregated) and which stay on the
device, used by the device's trainer, the simulator and the central's model
commands alike (``layout_for_module``):

* Integer and boolean buffers (BatchNorm's ``num_batches_tracked``, say) never
  travel: averaging counters across devices means nothing, so each device
  keeps its own.
* With ``batchnorm="local"`` (the default, FedBN: Li et al. 2021) every tensor
  of a BatchNorm layer stays local: its affine ``weight`` and ``bias`` and its
  ``running_mean``/``running_var``. Devices whose features are distributed
  differently then keep their own normalisation, which is what makes a
  label- or feature-skewed fleet train as well as it would without
  BatchNorm. ``batchnorm="global"`` aggregates them like any other tensor.
* Names matching a ``local`` glob (``fnmatch`` on ``state_dict`` names, e.g.
  ``"head.*"``) stay local too: a personalised head, say.
* Every other floating-point tensor (float32, float16, bfloat16, float64),
  parameter or buffer, travels, in ``state_dict`` order.

Loading a flat vector replaces only the travelling tensors; local ones keep
the device's values. Vectors are always float32 on the CPU, whatever device
and dtype the module lives on.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from fedtier.protocol.errors import ConfigError, LayoutMismatch
from fedtier.protocol.layout import ModelLayout, TensorSpec

__all__ = [
    "BatchNormPolicy",
    "flat_for_module",
    "flat_from_state_dict",
    "layout_for_module",
    "layout_from_state_dict",
    "load_flat",
    "load_into_module",
    "local_tensor_names",
]

BatchNormPolicy = Literal["local", "global"]

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def layout_from_state_dict(
    state: Mapping[str, torch.Tensor], *, exclude: frozenset[str] = frozenset()
) -> ModelLayout:
    """The layout of the floating-point tensors of ``state`` not in ``exclude``, in its order."""
    specs = [
        TensorSpec(name, _DTYPE_NAMES[t.dtype], tuple(int(d) for d in t.shape))
        for name, t in state.items()
        if t.dtype in _DTYPE_NAMES and name not in exclude
    ]
    return ModelLayout(tuple(specs))


def local_tensor_names(
    module: torch.nn.Module,
    *,
    local: Sequence[str] = (),
    batchnorm: BatchNormPolicy = "local",
) -> frozenset[str]:
    """The ``state_dict`` names of ``module`` that stay on the device (see the module docstring).

    Integer buffers are not listed: they are outside every layout anyway.

    Raises:
        ConfigError: ``batchnorm`` is neither ``"local"`` nor ``"global"``, or
            a ``local`` pattern matches no tensor (a typo must not silently
            aggregate what was meant to stay local).
    """
    if batchnorm not in ("local", "global"):
        raise ConfigError(f"batchnorm is {batchnorm!r}; expected 'local' or 'global'")
    names = [name for name, t in module.state_dict().items() if t.dtype in _DTYPE_NAMES]
    kept: set[str] = set()
    if batchnorm == "local":
        norm = torch.nn.modules.batchnorm._BatchNorm
        for prefix, sub in module.named_modules():
            if isinstance(sub, norm):
                head = f"{prefix}." if prefix else ""
                kept.update(n for n in names if n.startswith(head) and "." not in n[len(head) :])
    for pattern in local:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ConfigError(
                f"local tensor pattern {pattern!r} matches none of the model's tensors "
                f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"
            )
        kept.update(matched)
    return frozenset(kept)


def layout_for_module(
    module: torch.nn.Module,
    *,
    local: Sequence[str] = (),
    batchnorm: BatchNormPolicy = "local",
) -> ModelLayout:
    """The layout of the tensors of ``module`` that travel (are aggregated).

    Every participant that builds the same module with the same policy gets
    the same layout and fingerprint: the device's trainer, the simulator and
    ``fedtier model init``.

    Raises:
        ConfigError: a bad policy (see ``local_tensor_names``), or every
            tensor is local, leaving nothing to aggregate.
    """
    state = module.state_dict()
    excluded = local_tensor_names(module, local=local, batchnorm=batchnorm)
    if not any(t.dtype in _DTYPE_NAMES and n not in excluded for n, t in state.items()):
        raise ConfigError("every tensor of the model is local; nothing would be aggregated")
    return layout_from_state_dict(state, exclude=excluded)


def flat_for_module(module: torch.nn.Module, layout: ModelLayout) -> npt.NDArray[np.float32]:
    """The travelling tensors of ``module`` as one float32 vector on the CPU.

    Raises:
        LayoutMismatch: the module lacks a tensor of ``layout`` or it has
            another shape or dtype.
    """
    return flat_from_state_dict(module.state_dict(), layout)


def load_into_module(
    module: torch.nn.Module, layout: ModelLayout, flat: npt.NDArray[np.float32]
) -> None:
    """Copy ``flat`` into the travelling tensors of ``module`` in place; local ones are kept.

    Raises:
        LayoutMismatch: ``flat`` or the module does not fit ``layout``.
    """
    load_flat(module.state_dict(), layout, flat)


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

    Tensors outside the layout (integer buffers, local tensors) are left as they are.
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
