"""Byte layouts, rejections and the spec's wire form for protocol.codecs."""

from __future__ import annotations

import math
import re
import struct

import numpy as np
import pytest

from fedtier.protocol.codecs import (
    CodecSpec,
    all_finite,
    decode,
    encode,
    fold_into,
    parse_payload,
    pick_codec,
    relative_l2_error,
)
from fedtier.protocol.errors import DecodeError, LimitExceeded, LocalProtocolError


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def le_f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def le_u32(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def i8s(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}b", *values)


I8_C2 = CodecSpec("i8", chunk=2)
TOP2_F16 = CodecSpec("f16", k=2, index="u32")
TOP1_I8_U32 = CodecSpec("i8", chunk=512, k=1, index="u32")
TOP2_I8_U32 = CodecSpec("i8", chunk=512, k=2, index="u32")
TOP1_I8_VARINT = CodecSpec("i8", chunk=512, k=1, index="varint")
TOP2_I8_VARINT = CodecSpec("i8", chunk=512, k=2, index="varint")
# One i8 value section for k=1 (scale 1.0, q=1) and for k=2 (scale 1.0, q=1, 2).
VALUES_K1 = le_f32(1.0) + i8s(1)
VALUES_K2 = le_f32(1.0) + i8s(1, 2)


# -- exact byte layouts --------------------------------------------------------


def test_f32_layout() -> None:
    payload = encode(f32(1.0, -2.0, 0.5, 0.0), CodecSpec("f32"))
    assert payload == bytes.fromhex("0000803f 000000c0 0000003f 00000000")


def test_f16_layout() -> None:
    payload = encode(f32(1.0, -2.0, 0.5, 65504.0), CodecSpec("f16"))
    assert payload == bytes.fromhex("003c 00c0 0038 ff7b")
    assert decode(payload, CodecSpec("f16"), 4).tolist() == [1.0, -2.0, 0.5, 65504.0]


def test_i8_layout_rounds_half_to_even_and_has_a_partial_last_chunk() -> None:
    # chunks: [127, -63.5] scale 1; [0, 0] scale 0; [254, 5] scale 2; [-254] scale 2
    x = f32(127.0, -63.5, 0.0, 0.0, 254.0, 5.0, -254.0)
    payload = encode(x, I8_C2)
    assert payload == le_f32(1.0, 0.0, 2.0, 2.0) + i8s(127, -64, 0, 0, 127, 2, -127)
    assert decode(payload, I8_C2, 7).tolist() == [127, -64, 0, 0, 254, 4, -254]


def test_topk_u32_f16_layout() -> None:
    payload = encode(f32(0.0, 3.0, -0.5, -4.0, 1.0), TOP2_F16)
    assert payload == le_u32(1, 3) + bytes.fromhex("0042 00c4")
    assert decode(payload, TOP2_F16, 5).tolist() == [0.0, 3.0, 0.0, -4.0, 0.0]


def test_topk_varint_i8_layout() -> None:
    x = np.zeros(70_000, np.float32)
    x[[5, 200, 65_741]] = [127.0, -1.0, 2.0]
    spec = CodecSpec("i8", chunk=512, k=3, index="varint")
    payload = encode(x, spec)
    # deltas 5, 195, 65536 + 5 as LEB128
    assert payload == bytes.fromhex("05 c301 858004") + le_f32(1.0) + i8s(127, -1, 2)
    assert np.array_equal(decode(payload, spec, 70_000), x)
    u32 = CodecSpec("i8", chunk=512, k=3, index="u32")
    assert encode(x, u32) == le_u32(5, 200, 65_741) + le_f32(1.0) + i8s(127, -1, 2)


def test_sizes() -> None:
    assert CodecSpec.parse("i8").expected_payload_size(1_000_000) == 1_007_816
    assert CodecSpec.parse("f16").expected_payload_size(10) == 20
    spec = CodecSpec.parse("top1%+i8", num_params=1_000_000)
    assert spec.expected_payload_size(1_000_000) == 4 * 10_000 + 4 * 20 + 10_000
    varint = CodecSpec.parse("top1%+i8+varint", num_params=1_000_000)
    assert varint.expected_payload_size(1_000_000) is None
    assert varint.max_payload_size(1_000_000) == 5 * 10_000 + 4 * 20 + 10_000
    with pytest.raises(LocalProtocolError, match="keeps 10000 values"):
        spec.expected_payload_size(9_999)


def test_stochastic_rounding_is_seeded_and_unbiased() -> None:
    x = np.full(20_000, 0.5, np.float32)
    x[0] = 127.0  # scale 1, so every other value sits halfway between 0 and 1
    spec = CodecSpec("i8", chunk=20_000)
    first = encode(x, spec, seed=7)
    assert first == encode(x, spec, seed=7)
    assert first != encode(x, spec, seed=8)
    q = np.frombuffer(first, np.int8, offset=4)[1:]
    assert set(np.unique(q).tolist()) == {0, 1}
    assert abs(q.mean() - 0.5) < 0.02


def test_f16_fast_conversion_matches_numpy_for_every_half() -> None:
    bits = np.arange(65_536, dtype=np.uint32).astype(np.uint16)
    payload = bits.tobytes()
    expected = bits.view(np.float16).astype(np.float32)
    got = decode(payload, CodecSpec("f16"), 65_536)
    assert np.array_equal(got, expected, equal_nan=True)
    finite = np.isfinite(expected)
    assert np.array_equal(got[finite].view(np.uint32), expected[finite].view(np.uint32))
    acc = np.ones(65_536, np.float32)
    with np.errstate(invalid="ignore"):
        reference = acc + np.float32(0.25) * expected
    fold_into(acc, payload, CodecSpec("f16"), 0.25)
    assert np.array_equal(acc, reference, equal_nan=True)


# -- encoder refusals ----------------------------------------------------------


@pytest.mark.parametrize("name", ["f32", "f16", "i8", "top1+f32"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite(name: str, bad: float) -> None:
    with pytest.raises(LocalProtocolError, match="non-finite"):
        encode(f32(1.0, bad), CodecSpec.parse(name))


def test_encode_refuses_values_beyond_f16() -> None:
    encode(f32(-65504.0), CodecSpec("f16"))
    with pytest.raises(LocalProtocolError, match="65504"):
        encode(f32(1.0, -65505.0), CodecSpec("f16"))


@pytest.mark.parametrize(
    "delta",
    [np.zeros(3, np.float64), np.zeros((2, 2), np.float32), [0.0, 1.0]],
    ids=["float64", "2-D", "list"],
)
def test_encode_refuses_wrong_arrays(delta: object) -> None:
    with pytest.raises(LocalProtocolError, match="1-D float32"):
        encode(delta, CodecSpec("f32"))  # type: ignore[arg-type]


def test_encode_refuses_k_above_length() -> None:
    with pytest.raises(LocalProtocolError, match="keeps 3 values; the model has 2"):
        encode(f32(1.0, 2.0), CodecSpec("f32", k=3, index="u32"))


# -- decoder rejections ----------------------------------------------------------

BAD_PAYLOADS = [
    # (spec, num_params, payload, error, message fragment)
    (CodecSpec("f32"), 4, b"\0" * 15, DecodeError, "must be 16 bytes; got 15"),
    (CodecSpec("f32"), 4, b"\0" * 17, LimitExceeded, "must be 16 bytes; got 17"),
    (CodecSpec("f16"), 4, b"\0" * 7, DecodeError, "must be 8 bytes; got 7"),
    (I8_C2, 3, le_f32(1.0, 1.0) + i8s(1, 2), DecodeError, "must be 11 bytes; got 10"),
    (I8_C2, 3, le_f32(1.0, 1.0) + i8s(1, -128, 2), DecodeError, "i8 value 1 is -128"),
    (I8_C2, 3, le_f32(1.0, -1.0) + i8s(1, 1, 2), DecodeError, "i8 scale 1 is -1.0"),
    (I8_C2, 3, le_f32(float("nan"), 1.0) + i8s(1, 1, 2), DecodeError, "i8 scale 0 is nan"),
    (I8_C2, 3, le_f32(1.0, float("inf")) + i8s(1, 1, 2), DecodeError, "i8 scale 1 is inf"),
    (TOP2_I8_U32, 9, le_u32(3, 1) + VALUES_K2, DecodeError, "index 1 is 1 after 3"),
    (TOP2_I8_U32, 9, le_u32(4, 4) + VALUES_K2, DecodeError, "strictly increasing"),
    (TOP2_I8_U32, 9, le_u32(1, 9) + VALUES_K2, DecodeError, "index 1 is 9; the model has 9"),
    (TOP2_I8_U32, 9, le_u32(1) + VALUES_K2, DecodeError, "must be 14 bytes; got 10"),
    (TOP2_I8_U32, 1, le_u32(0, 1) + VALUES_K2, DecodeError, "keeps 2 values; the model has 1"),
    (TOP1_I8_VARINT, 9, b"\x85" + VALUES_K1, DecodeError, "truncated"),
    (TOP1_I8_VARINT, 9, b"\x85\x80" + VALUES_K1, DecodeError, "truncated"),
    (TOP1_I8_VARINT, 10**9, b"\x81\x80\x80\x80\x80\x01" + VALUES_K1, LimitExceeded, "between"),
    (TOP2_I8_VARINT, 10**9, b"\x81\x80\x80\x80\x80\x01\x01" + VALUES_K2, DecodeError, "is 6 bytes"),
    (TOP1_I8_VARINT, 2**33, b"\x80\x80\x80\x80\x10" + VALUES_K1, DecodeError, "2**32"),
    (TOP1_I8_VARINT, 9, b"\x85\x00" + VALUES_K1, DecodeError, "redundant 0x00"),
    (TOP2_I8_VARINT, 9, b"\x05\x00" + VALUES_K2, DecodeError, "varint 1 is a delta of 0"),
    (TOP2_I8_VARINT, 9, b"\x05\x04" + VALUES_K2, DecodeError, "index 1 is 9; the model has 9"),
    (TOP2_I8_VARINT, 9, b"\x01\x01\x01" + VALUES_K2, DecodeError, "holds 3 varints"),
    (TOP2_I8_VARINT, 9, b"\x81\x81\x01" + VALUES_K2, DecodeError, "holds 1 varints"),
    (TOP2_I8_VARINT, 9, b"\x01" + VALUES_K2, DecodeError, "between 8 and 16 bytes; got 7"),
    (TOP2_I8_VARINT, 9, b"\x01" * 11 + VALUES_K2, LimitExceeded, "16 bytes; got 17"),
]


@pytest.mark.parametrize(("spec", "n", "payload", "error", "fragment"), BAD_PAYLOADS)
def test_decode_rejects(
    spec: CodecSpec, n: int, payload: bytes, error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=re.escape(fragment)) as info:
        decode(payload, spec, n)
    assert isinstance(info.value, DecodeError)
    with pytest.raises(error, match=re.escape(fragment)):
        all_finite(payload, spec, n)


@pytest.mark.parametrize(
    ("spec", "n", "payload", "error", "fragment"),
    [case for case in BAD_PAYLOADS if case[1] <= 1_000],  # acc must fit in a unit test
)
def test_fold_into_leaves_acc_unchanged_on_a_bad_payload(
    spec: CodecSpec, n: int, payload: bytes, error: type[Exception], fragment: str
) -> None:
    acc = np.arange(n, dtype=np.float32)
    with pytest.raises(error):
        fold_into(acc, payload, spec, 1.5)
    assert np.array_equal(acc, np.arange(n, dtype=np.float32))


def test_decoders_accept_any_buffer() -> None:
    payload = encode(f32(1.0, 2.0), CodecSpec("f32"))
    for buffer in (bytearray(payload), memoryview(payload)):
        assert decode(buffer, CodecSpec("f32"), 2).tolist() == [1.0, 2.0]
    with pytest.raises(LocalProtocolError, match="bytes-like"):
        decode("nope", CodecSpec("f32"), 2)  # type: ignore[arg-type]


# -- fold_into --------------------------------------------------------------------

FOLD_SPECS = [
    "f32",
    "f16",
    "i8",
    "i8/c3",
    "i8/c1",
    "top7+f32",
    "top7+f16+varint",
    "top100%+i8/c5",
    "top1+i8+varint",
]


@pytest.mark.parametrize("name", FOLD_SPECS)
@pytest.mark.parametrize("weight", [1.0, 0.37, -2.0])
@pytest.mark.parametrize("n", [1, 130, 70_001])
def test_fold_into_equals_acc_plus_weight_times_decode(name: str, weight: float, n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n, dtype=np.float32)
    spec = CodecSpec.parse(name.replace("7", str(min(7, n))), num_params=n)
    payload = encode(x, spec)
    acc = rng.standard_normal(n, dtype=np.float32)
    expected = acc + np.float32(weight) * decode(payload, spec, n)
    fold_into(acc, payload, spec, weight)
    assert np.array_equal(acc, expected)


def test_fold_into_checks_its_arguments() -> None:
    payload = encode(f32(1.0, 2.0), CodecSpec("f32"))
    with pytest.raises(LocalProtocolError, match="writeable 1-D float32"):
        fold_into(np.zeros(2, np.float64), payload, CodecSpec("f32"), 1.0)
    read_only = np.zeros(2, np.float32)
    read_only.flags.writeable = False
    with pytest.raises(LocalProtocolError, match="writeable"):
        fold_into(read_only, payload, CodecSpec("f32"), 1.0)
    with pytest.raises(LocalProtocolError, match="weight is nan"):
        fold_into(np.zeros(2, np.float32), payload, CodecSpec("f32"), float("nan"))
    with pytest.raises(DecodeError, match="must be 12 bytes; got 8"):
        fold_into(np.zeros(3, np.float32), payload, CodecSpec("f32"), 1.0)


# -- all_finite -------------------------------------------------------------------


def test_all_finite() -> None:
    assert all_finite(le_f32(1.0, -2.0), CodecSpec("f32"), 2)
    assert not all_finite(le_f32(1.0, float("nan")), CodecSpec("f32"), 2)
    assert not all_finite(le_f32(float("-inf"), 1.0), CodecSpec("f32"), 2)
    assert all_finite(bytes.fromhex("ff7b 0000"), CodecSpec("f16"), 2)
    assert not all_finite(bytes.fromhex("0000 007c"), CodecSpec("f16"), 2)
    assert not all_finite(bytes.fromhex("01fe 0000"), CodecSpec("f16"), 2)  # NaN
    huge = 3.0e38
    assert all_finite(le_f32(huge) + i8s(0, 1), CodecSpec("i8", chunk=2), 2)
    assert not all_finite(le_f32(huge) + i8s(0, 127), CodecSpec("i8", chunk=2), 2)
    sparse = CodecSpec("f32", k=1, index="u32")
    assert not all_finite(le_u32(3) + le_f32(float("inf")), sparse, 5)
    assert all_finite(b"", CodecSpec("f32"), 0)


def test_decode_of_an_overflowing_i8_scale_gives_inf_without_a_warning() -> None:
    out = decode(le_f32(3.0e38) + i8s(0, 127), CodecSpec("i8", chunk=2), 2)
    assert out[0] == 0
    assert np.isinf(out[1])


# -- CodecSpec: construction, wire form, names ----------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"values": "f64"}, "'values' is 'f64'"),
        ({"values": "i8"}, "'chunk' is missing"),
        ({"values": "i8", "chunk": 0}, "'chunk' is 0; it must be between 1 and 65536"),
        ({"values": "i8", "chunk": 65537}, "'chunk' is 65537"),
        ({"values": "i8", "chunk": True}, "'chunk' is True"),
        ({"values": "f16", "chunk": 512}, "only when values is 'i8'"),
        ({"values": "f32", "k": 0, "index": "u32"}, "'k' is 0"),
        ({"values": "f32", "k": 5}, "'index' is missing"),
        ({"values": "f32", "index": "u32"}, "allowed only with 'k'"),
        ({"values": "f32", "k": 5, "index": "u64"}, "'index' is 'u64'"),
    ],
)
def test_spec_validates_on_construction(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(LocalProtocolError, match=fragment):
        CodecSpec(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spec",
    [
        CodecSpec("f32"),
        CodecSpec("f16"),
        CodecSpec("i8", chunk=512),
        CodecSpec("i8", chunk=7),
        CodecSpec("f16", k=10_000, index="u32"),
        CodecSpec("i8", chunk=512, k=10_000, index="varint"),
    ],
)
def test_wire_and_name_round_trip(spec: CodecSpec) -> None:
    assert CodecSpec.from_wire(spec.to_wire(), num_params=10_000) == spec
    assert CodecSpec.parse(str(spec)) == spec


def test_to_wire_holds_only_the_keys_that_apply() -> None:
    assert CodecSpec("f32").to_wire() == {"values": "f32"}
    assert CodecSpec("i8", chunk=512).to_wire() == {"values": "i8", "chunk": 512}
    assert CodecSpec("f16", k=10_000, index="u32").to_wire() == {
        "values": "f16",
        "k": 10_000,
        "index": "u32",
    }
    assert CodecSpec("i8", 512, 10_000, "varint").to_wire() == {
        "values": "i8",
        "chunk": 512,
        "k": 10_000,
        "index": "varint",
    }


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        (["f32"], "codec is a list; it must be a map"),
        ({}, "'values' is missing"),
        ({"values": "f32", "extra": 1}, "unknown field 'extra'"),
        ({b"values": "f32"}, "non-string key b'values'"),
        ({"values": "i8", "chunk": True}, "'chunk' is True"),
        ({"values": "i8", "chunk": 512.0}, "'chunk' is 512.0"),
        ({"values": "i8"}, "'chunk' is missing"),
        ({"values": "i8", "chunk": 0}, "'chunk' is 0; it must be between 1 and 65536"),
        ({"values": "f32", "chunk": None}, "'chunk' is nil"),
        ({"values": "f32", "k": 11, "index": "u32"}, "'k' is 11; the model has only 10"),
        ({"values": "f32", "k": False, "index": "u32"}, "'k' is False"),
        ({"values": "f32", "k": 3}, "'index' is missing"),
        ({"values": "x" * 1000}, r"'values' is 'xxxx.*\.\.\.;"),
    ],
)
def test_from_wire_is_strict(obj: object, fragment: str) -> None:
    with pytest.raises(DecodeError, match=fragment):
        CodecSpec.from_wire(obj, num_params=10)


def test_parse() -> None:
    assert CodecSpec.parse("i8") == CodecSpec("i8", chunk=512)
    assert CodecSpec.parse("i8/c256") == CodecSpec("i8", chunk=256)
    assert CodecSpec.parse("top1%+i8", num_params=1_000_000) == CodecSpec("i8", 512, 10_000, "u32")
    assert CodecSpec.parse("top10000+f16") == CodecSpec("f16", k=10_000, index="u32")
    assert CodecSpec.parse("top1%+i8+varint", num_params=150).k == 2  # ceil(1.5)
    assert CodecSpec.parse("top0.001%+f32", num_params=10).k == 1  # at least 1
    assert CodecSpec.parse("top100%+f32+u32", num_params=10).k == 10
    assert str(CodecSpec.parse("top1%+i8+varint", num_params=1_000_000)) == "top10000+i8+varint"
    assert str(CodecSpec("i8", chunk=256, k=3, index="u32")) == "top3+i8/c256"


@pytest.mark.parametrize(
    ("name", "num_params", "fragment"),
    [
        ("f64", None, "does not parse"),
        ("F32", None, "does not parse"),
        ("top1%+i8", None, "needs num_params"),
        ("top0%+i8", 10, "must be in"),
        ("top101%+i8", 10, "must be in"),
        ("top11+i8", 10, "keeps 11 values; the model has 10"),
        ("f16/c4", None, "only i8 has one"),
        ("f16+varint", None, "without 'topK+'"),
        ("i8/c0", None, "'chunk' is 0"),
        ("top٣+f32", None, "does not parse"),
    ],
)
def test_parse_rejects(name: str, num_params: int | None, fragment: str) -> None:
    with pytest.raises(LocalProtocolError, match=re.escape(fragment)):
        CodecSpec.parse(name, num_params=num_params)


# -- pick_codec, relative_l2_error ----------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (4_000, "f32"),
        (3_999, "f16"),
        (2_000, "f16"),
        (1_999, "i8"),
        (1_008, "i8"),
        (1_007, "top200+i8"),
        (9, "top1+i8"),
    ],
)
def test_pick_codec(budget: int, expected: str) -> None:
    spec = pick_codec(1_000, budget)
    assert str(spec) == expected
    assert spec.max_payload_size(1_000) <= budget
    if spec.k is not None:
        bigger = CodecSpec("i8", 512, spec.k + 1, "u32")
        assert bigger.max_payload_size(1_000) > budget


def test_pick_codec_refuses_a_budget_too_small() -> None:
    with pytest.raises(LocalProtocolError, match="below the smallest top-k payload"):
        pick_codec(1_000, 8)


def test_relative_l2_error() -> None:
    assert relative_l2_error(f32(3.0, 4.0), f32(3.0, 4.0)) == 0.0
    assert relative_l2_error(f32(3.0, 4.0), f32(0.0, 0.0)) == 1.0
    assert relative_l2_error(f32(0.0), f32(0.0)) == 0.0
    assert relative_l2_error(f32(0.0), f32(1.0)) == float("inf")
    with pytest.raises(LocalProtocolError, match="shapes differ"):
        relative_l2_error(f32(1.0), f32(1.0, 2.0))


# -- decoded once: check, then fold, from one parse ------------------------------------

_DECODE_ONCE_SPECS = [
    CodecSpec("f32"),
    CodecSpec("f16"),
    CodecSpec("i8", chunk=64),
    CodecSpec("i8", chunk=64, k=37, index="u32"),
    CodecSpec("i8", chunk=16, k=37, index="varint"),
    CodecSpec("f16", k=37, index="u32"),
]


@pytest.mark.parametrize("spec", _DECODE_ONCE_SPECS, ids=str)
@pytest.mark.parametrize("weight", [1.0, 7.25])
def test_a_decoded_payload_folds_bit_for_bit_as_fold_into(spec: CodecSpec, weight: float) -> None:
    n = 1000
    rng = np.random.default_rng(3)
    payload = encode(rng.standard_normal(n).astype(np.float32), spec)
    start = rng.standard_normal(n).astype(np.float32)
    expected = start.copy()
    fold_into(expected, payload, spec, weight)
    decoded = parse_payload(payload, spec, n)
    values = np.asarray(decoded.norm_values(), np.float64)
    dense = decode(payload, spec, n).astype(np.float64)
    # The norm is taken over the stored values alone (top-k: the k kept ones).
    assert values.shape[0] == (n if spec.k is None else spec.k)
    assert np.linalg.norm(values) == pytest.approx(np.linalg.norm(dense), rel=1e-6)
    assert decoded.all_finite()
    got = start.copy()
    decoded.fold_into(got, weight)
    assert got.tobytes() == expected.tobytes()
    # A second fold (a dense i8 fold consumed what it decoded) decodes again, alike.
    decoded.fold_into(got, weight)
    fold_into(expected, payload, spec, weight)
    assert got.tobytes() == expected.tobytes()


def test_a_decoded_payload_is_validated_once_at_parse() -> None:
    spec = CodecSpec("i8", chunk=2)
    with pytest.raises(DecodeError, match="-128"):
        parse_payload(le_f32(1.0) + i8s(1, -128), spec, 2)
    huge = parse_payload(le_f32(3e38) + i8s(127, 1), spec, 2)
    assert not huge.all_finite()
    assert huge.all_finite() == all_finite(le_f32(3e38) + i8s(127, 1), spec, 2)
    decoded = parse_payload(le_f32(1.0) + i8s(1, 2), spec, 2)
    with pytest.raises(LocalProtocolError, match="decoded for 2"):
        decoded.fold_into(np.zeros(3, np.float32), 1.0)
    with pytest.raises(LocalProtocolError, match="finite"):
        decoded.fold_into(np.zeros(2, np.float32), math.inf)
