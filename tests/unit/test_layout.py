from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import torch

from fedtier.client.torch_state import flat_from_state_dict, layout_from_state_dict, load_flat
from fedtier.protocol.errors import DecodeError, LayoutMismatch, LimitExceeded, LocalProtocolError
from fedtier.protocol.layout import ModelLayout, TensorSpec, layout_of
from fedtier.protocol.limits import Limits


def test_flatten_unflatten_round_trip_keeps_order_and_dtypes() -> None:
    arrays: dict[str, npt.NDArray[np.floating]] = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "h": np.array([0.5, -1.5], dtype=np.float16),
        "s": np.array(3.0, dtype=np.float64),
    }
    layout = ModelLayout.from_arrays(arrays)
    assert layout.num_params == 9
    assert layout.offsets == (0, 6, 8)
    flat = layout.flatten(arrays)
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat, [0, 1, 2, 3, 4, 5, 0.5, -1.5, 3.0])
    back = layout.unflatten(flat)
    assert list(back) == ["w", "h", "s"]
    assert back["h"].dtype == np.float16
    assert back["s"].shape == ()
    np.testing.assert_array_equal(back["w"], arrays["w"])


def test_fingerprint_depends_on_names_shapes_dtypes_and_order() -> None:
    base = layout_of([("a", (2, 3)), ("b", (3,))])
    variants = [
        layout_of([("b", (3,)), ("a", (2, 3))]),
        layout_of([("a", (3, 2)), ("b", (3,))]),
        layout_of([("a", (2, 3)), ("c", (3,))]),
        ModelLayout((TensorSpec("a", "float16", (2, 3)), TensorSpec("b", "float32", (3,)))),
    ]
    assert len(base.fingerprint) == 16
    assert all(v.fingerprint != base.fingerprint for v in variants)
    assert layout_of([("a", (2, 3)), ("b", (3,))]).fingerprint == base.fingerprint


def test_flatten_refuses_missing_extra_and_misshaped_tensors() -> None:
    layout = layout_of([("a", (2,))])
    with pytest.raises(LayoutMismatch, match="missing"):
        layout.flatten({})
    with pytest.raises(LayoutMismatch, match="unexpected"):
        layout.flatten({"a": np.zeros(2), "b": np.zeros(1)})
    with pytest.raises(LayoutMismatch, match="shape"):
        layout.flatten({"a": np.zeros(3)})
    with pytest.raises(LayoutMismatch, match="expects 2"):
        layout.unflatten(np.zeros(3, dtype=np.float32))


def test_invalid_layouts_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError, match="twice"):
        layout_of([("a", (1,)), ("a", (2,))])
    with pytest.raises(LocalProtocolError, match="dtype"):
        TensorSpec("a", "int64", (1,))
    with pytest.raises(LocalProtocolError, match="at least one"):
        ModelLayout(())


def test_from_wire_round_trip_and_caps() -> None:
    layout = layout_of([("fc.weight", (4, 8)), ("fc.bias", (4,))])
    assert ModelLayout.from_wire(layout.to_wire()).fingerprint == layout.fingerprint
    with pytest.raises(LimitExceeded):
        ModelLayout.from_wire(layout.to_wire(), Limits(max_params=10))
    with pytest.raises(DecodeError, match="shape"):
        ModelLayout.from_wire([["a", "float32", [True]]])
    with pytest.raises(DecodeError):
        ModelLayout.from_wire([["a", "int8", [1]]])
    with pytest.raises(DecodeError):
        ModelLayout.from_wire({"a": 1})


def test_torch_state_dict_bridge_skips_integer_buffers() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    )
    state = model.state_dict()
    layout = layout_from_state_dict(state)
    names = [t.name for t in layout.tensors]
    assert "1.num_batches_tracked" not in names
    assert names[0] == "0.weight"
    assert layout.num_params == 4 * 3 + 3 + 3 * 4 + 3 * 2 + 2  # weights, biases, BN affine+stats
    flat = flat_from_state_dict(state, layout)
    state["1.num_batches_tracked"].fill_(7)
    load_flat(state, layout, flat * 2)
    np.testing.assert_allclose(flat_from_state_dict(state, layout), flat * 2, rtol=1e-6)
    assert int(state["1.num_batches_tracked"]) == 7


def test_torch_bridge_keeps_half_precision_tensors() -> None:
    state = {"w": torch.ones(3, dtype=torch.float16), "b": torch.zeros(2, dtype=torch.bfloat16)}
    layout = layout_from_state_dict(state)
    assert [t.dtype for t in layout.tensors] == ["float16", "bfloat16"]
    load_flat(state, layout, np.array([1, 2, 3, 4, 5], dtype=np.float32))
    assert state["w"].dtype == torch.float16
    assert state["b"].tolist() == [4.0, 5.0]
    with pytest.raises(LayoutMismatch):
        flat_from_state_dict({"w": torch.ones(4, dtype=torch.float16), "b": state["b"]}, layout)
