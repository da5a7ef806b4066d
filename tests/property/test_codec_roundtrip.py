"""Codec round trips stay within each stated error bound; bad bytes only raise DecodeError."""

from __future__ import annotations

import contextlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedtier.protocol.codecs import CodecSpec, all_finite, decode, encode, fold_into
from fedtier.protocol.errors import DecodeError

FINITE = st.floats(width=32, allow_nan=False, allow_infinity=False)
IN_F16_RANGE = st.floats(-65504.0, 65504.0, width=32)
# Float slack on the i8 bounds: x / scale and q * scale each round once in float32
# (relative 2**-24), and subnormal scales are off by up to half an ulp (2**-150).
F32_RELATIVE_SLACK = 2.0**-23
TINY = 1e-40


def vectors(elements: st.SearchStrategy[float] = FINITE, max_size: int = 200) -> st.SearchStrategy:
    return hnp.arrays(np.float32, st.integers(1, max_size), elements=elements)


def f16_error_bound(x: np.ndarray) -> np.ndarray:
    # Round to nearest: half a unit in the last place, i.e. 2**-11 relative for
    # normal halves and 2**-25 absolute in the subnormal range (|x| < 2**-14).
    return np.maximum(np.abs(x.astype(np.float64)) * 2.0**-11, 2.0**-25)


def i8_scales(payload: bytes, offset: int, m: int, chunk: int) -> np.ndarray:
    count = -(-m // chunk)
    scales = np.frombuffer(payload, "<f4", count, offset).astype(np.float64)
    return np.repeat(scales, chunk)[:m]


def i8_error_bound(x: np.ndarray, scale: np.ndarray, stochastic: bool) -> np.ndarray:
    step = 1.0 if stochastic else 0.5
    return scale * (step + 1e-5) + F32_RELATIVE_SLACK * np.abs(x.astype(np.float64)) + TINY


def error(decoded: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.abs(decoded.astype(np.float64) - x.astype(np.float64))


@settings(max_examples=100, deadline=None)
@given(vectors())
def test_f32_is_exact(x: np.ndarray) -> None:
    out = decode(encode(x, CodecSpec("f32")), CodecSpec("f32"), x.shape[0])
    assert np.array_equal(out.view(np.uint32), x.view(np.uint32))


@settings(max_examples=100, deadline=None)
@given(vectors(IN_F16_RANGE))
def test_f16_within_half_an_ulp(x: np.ndarray) -> None:
    out = decode(encode(x, CodecSpec("f16")), CodecSpec("f16"), x.shape[0])
    assert np.all(error(out, x) <= f16_error_bound(x))
    assert np.all(out[x == 0] == 0)


@settings(max_examples=100, deadline=None)
@given(vectors(), st.integers(1, 64), st.none() | st.integers(0, 2**64 - 1))
def test_i8_within_half_a_step_or_one_step_when_stochastic(
    x: np.ndarray, chunk: int, seed: int | None
) -> None:
    spec = CodecSpec("i8", chunk=chunk)
    payload = encode(x, spec, seed=seed)
    out = decode(payload, spec, x.shape[0])
    assert np.all(np.isfinite(out))
    assert all_finite(payload, spec, x.shape[0])
    scale = i8_scales(payload, 0, x.shape[0], chunk)
    assert np.all(error(out, x) <= i8_error_bound(x, scale, stochastic=seed is not None))


@st.composite
def sparse_cases(draw: st.DrawFn) -> tuple[np.ndarray, str, int]:
    values = draw(st.sampled_from(["f32", "f16", "i8/c1", "i8/c3", "i8"]))
    x = draw(vectors(IN_F16_RANGE if values == "f16" else FINITE))
    k = draw(st.integers(1, x.shape[0]))
    return x, values, k


@settings(max_examples=100, deadline=None)
@given(sparse_cases())
def test_topk_keeps_the_largest_and_varint_equals_u32(case: tuple[np.ndarray, str, int]) -> None:
    x, values, k = case
    n = x.shape[0]
    u32 = CodecSpec.parse(f"top{k}+{values}", num_params=n)
    varint = CodecSpec.parse(f"top{k}+{values}+varint", num_params=n)
    payload = encode(x, u32)
    out = decode(payload, u32, n)
    assert np.array_equal(out, decode(encode(x, varint), varint, n))

    kept = np.frombuffer(payload, "<u4", k).astype(np.intp)
    assert np.all(np.diff(kept) > 0)
    dropped = np.setdiff1d(np.arange(n), kept)
    assert np.all(out[dropped] == 0)
    if dropped.size:
        assert np.abs(x[dropped]).max() <= np.abs(x[kept]).min()
    got, want = out[kept], x[kept]
    if u32.values == "f32":
        assert np.array_equal(got, want)
    elif u32.values == "f16":
        assert np.all(error(got, want) <= f16_error_bound(want))
    else:
        assert u32.chunk is not None
        scale = i8_scales(payload, 4 * k, k, u32.chunk)
        assert np.all(error(got, want) <= i8_error_bound(want, scale, stochastic=False))


SPEC_NAMES = [
    "f32",
    "f16",
    "i8",
    "i8/c3",
    "top3+f32",
    "top3+f16+varint",
    "top5+i8/c2",
    "top5+i8/c2+varint",
    "top1+i8+varint",
]


@st.composite
def encoded(draw: st.DrawFn) -> tuple[CodecSpec, int, bytes]:
    x = draw(vectors(st.floats(-1e4, 1e4, width=32), max_size=60).filter(lambda a: a.size >= 5))
    spec = CodecSpec.parse(draw(st.sampled_from(SPEC_NAMES)))
    return spec, x.shape[0], encode(x, spec)


@settings(max_examples=100, deadline=None)
@given(encoded(), st.floats(-4.0, 4.0, width=32))
def test_fold_into_is_acc_plus_weight_times_decode(
    case: tuple[CodecSpec, int, bytes], weight: float
) -> None:
    spec, n, payload = case
    acc = np.linspace(-1, 1, n, dtype=np.float32)
    expected = acc + np.float32(weight) * decode(payload, spec, n)
    fold_into(acc, payload, spec, weight)
    assert np.array_equal(acc, expected)


def only_decode_errors(payload: bytes, spec: CodecSpec, n: int) -> None:
    """Run every decoding entry point; anything but a DecodeError fails the test."""
    acc = np.zeros(n, np.float32)
    with contextlib.suppress(DecodeError):
        decode(payload, spec, n)
    with contextlib.suppress(DecodeError):
        all_finite(payload, spec, n)
    try:
        fold_into(acc, payload, spec, 0.5)
    except DecodeError:
        assert not acc.any()  # a rejected payload left the accumulator alone


@settings(max_examples=200, deadline=None)
@given(encoded(), st.data())
def test_mutating_one_byte_only_ever_raises_decode_error(
    case: tuple[CodecSpec, int, bytes], data: st.DataObject
) -> None:
    spec, n, payload = case
    position = data.draw(st.integers(0, len(payload) - 1))
    mutated = bytearray(payload)
    mutated[position] = data.draw(st.integers(0, 255))
    only_decode_errors(bytes(mutated), spec, n)


@settings(max_examples=100, deadline=None)
@given(encoded(), st.data())
def test_truncating_or_extending_only_ever_raises_decode_error(
    case: tuple[CodecSpec, int, bytes], data: st.DataObject
) -> None:
    spec, n, payload = case
    cut = data.draw(st.integers(0, len(payload) - 1))
    only_decode_errors(payload[:cut], spec, n)
    only_decode_errors(payload + data.draw(st.binary(min_size=1, max_size=8)), spec, n)
