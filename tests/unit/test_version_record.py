"""The version record a standby central continues from: round trip, and refusal of hostile bytes."""

from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtier.protocol.errors import DecodeError, LimitExceeded, RemoteProtocolError, SignatureError
from fedtier.protocol.identity import SigningIdentity, VerifyKey
from fedtier.tiers._version_record import (
    RECORD_SIGNING_CONTEXT,
    RecordInput,
    VersionRecord,
    decode_optimizer_state,
    decode_version_record,
    encode_optimizer_state,
    encode_version_record,
)

FLEET = "acme"
CENTRAL = SigningIdentity.from_seed(b"\x01" * 32)
OTHER = SigningIdentity.from_seed(b"\x02" * 32)
KEYS = {CENTRAL.key_id: CENTRAL.verify_key}


def lookup(key_id: str) -> VerifyKey | None:
    return KEYS.get(key_id)


def record() -> VersionRecord:
    return VersionRecord(
        fleet=FLEET,
        version=7,
        pointer=b"signed pointer bytes",
        update_count=3,
        created_ms=1_764_288_000_000,
        inputs=(
            RecordInput("regional-a", b"\x11" * 16, 5),
            RecordInput("regional-b", b"\x22" * 16, 9),
        ),
        leaves=(b"\x01" * 16, b"\x02" * 16, b"\x03" * 16),
        optimizer={
            "m": np.arange(6, dtype=np.float32),
            "v": np.full(6, 0.25, np.float32),
            "steps": np.array(7, dtype=np.int64),
        },
    )


def decode(data: bytes) -> VersionRecord:
    return decode_version_record(data, lookup, fleet=FLEET, max_bytes=1 << 20, max_params=1 << 10)


def test_a_record_round_trips_with_its_arrays() -> None:
    original = record()
    data = encode_version_record(original, CENTRAL)
    assert encode_version_record(original, CENTRAL) == data  # deterministic: retries are equal
    got = decode(data)
    assert (got.fleet, got.version, got.pointer) == (FLEET, 7, original.pointer)
    assert (got.update_count, got.created_ms) == (3, original.created_ms)
    assert got.inputs == original.inputs
    assert got.leaves == original.leaves
    assert set(got.optimizer) == {"m", "v", "steps"}
    for name, array in original.optimizer.items():
        assert got.optimizer[name].dtype == array.dtype
        assert got.optimizer[name].shape == array.shape
        np.testing.assert_array_equal(got.optimizer[name], array)
    assert got.optimizer["m"].flags.writeable  # a copy, not a view of the bytes
    state = encode_optimizer_state(original.optimizer)
    np.testing.assert_array_equal(decode_optimizer_state(state, max_params=64)["v"], 0.25)


def test_an_empty_record_of_version_zero_round_trips() -> None:
    empty = VersionRecord(fleet=FLEET, version=0, pointer=b"p", update_count=0, created_ms=1)
    got = decode(encode_version_record(empty, CENTRAL))
    assert (got.version, got.inputs, got.leaves, dict(got.optimizer)) == (0, (), (), {})


def _resigned(body: dict[str, object], identity: SigningIdentity = CENTRAL) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    outer = {
        "k": identity.verify_key.key_id,
        "b": packed,
        "s": identity.sign(RECORD_SIGNING_CONTEXT + packed),
    }
    data: bytes = msgpack.packb(outer, use_bin_type=True)
    return data


def _body() -> dict[str, object]:
    outer = msgpack.unpackb(encode_version_record(record(), CENTRAL), raw=False)
    body: dict[str, object] = msgpack.unpackb(outer["b"], raw=False)
    return body


def test_a_record_signed_by_another_key_or_altered_is_refused() -> None:
    with pytest.raises(SignatureError):
        decode(encode_version_record(record(), OTHER))
    data = bytearray(encode_version_record(record(), CENTRAL))
    outer = msgpack.unpackb(bytes(data), raw=False)
    outer["b"] = outer["b"].replace(b"regional-a", b"regional-z")
    with pytest.raises(SignatureError):
        decode(msgpack.packb(outer, use_bin_type=True))


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("fleet", "other", DecodeError),
        ("f", 2, DecodeError),
        ("v", -1, DecodeError),
        ("v", "7", DecodeError),
        ("n", True, DecodeError),
        ("l", b"\x01" * 15, DecodeError),
        ("i", [["regional-a", b"\x11" * 15, 5]], DecodeError),
        ("i", [["regional-a", b"\x11" * 16]], DecodeError),
        ("i", [["", b"\x11" * 16, 5]], DecodeError),
        ("i", [["regional-a", b"\x11" * 16, -5]], DecodeError),
        ("i", "nope", DecodeError),
        ("o", {"m": ["object", [1], b"x"]}, DecodeError),
        ("o", {"m": ["float32", [3], b"\x00" * 11]}, DecodeError),
        ("o", {"m": ["float32", [-1], b""]}, DecodeError),
        ("o", {"m": ["float32", [1 << 20], b""]}, LimitExceeded),
        ("o", {"m": ["float32", [1] * 9, b"\x00" * 4]}, DecodeError),
        ("o", {"m": "float32"}, DecodeError),
    ],
)
def test_a_record_with_a_bad_field_is_refused_with_a_typed_error(
    field: str, value: object, error: type[Exception]
) -> None:
    body = _body()
    body[field] = value
    with pytest.raises(error):
        decode(_resigned(body))


def test_bytes_that_are_no_record_are_refused_with_a_typed_error() -> None:
    for data in (b"", b"\xc1", b"\x93\x01\x02\x03", msgpack.packb({"k": 1}), b"\xff" * 64):
        with pytest.raises(DecodeError):
            decode(data)
    with pytest.raises(LimitExceeded):
        decode_version_record(
            encode_version_record(record(), CENTRAL),
            lookup,
            fleet=FLEET,
            max_bytes=16,
            max_params=1 << 10,
        )
    body = msgpack.packb({"f": 1}, use_bin_type=True)
    with pytest.raises(SignatureError):
        decode(msgpack.packb({"k": "x" * 300, "b": body, "s": b"s"}, use_bin_type=True))
    with pytest.raises(DecodeError):  # a signed body that is not a map
        decode(
            msgpack.packb(
                {
                    "k": CENTRAL.key_id,
                    "b": b"\x01",
                    "s": CENTRAL.sign(RECORD_SIGNING_CONTEXT + b"\x01"),
                },
                use_bin_type=True,
            )
        )


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_give_a_record_or_a_typed_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        decode(data)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=0, max_value=2000), st.integers(min_value=0, max_value=255))
def test_any_flipped_byte_of_a_record_is_refused(position: int, flip: int) -> None:
    data = bytearray(encode_version_record(record(), CENTRAL))
    position %= len(data)
    data[position] ^= flip or 1
    try:
        got = decode(bytes(data))
    except RemoteProtocolError:
        return
    # Only a change msgpack reads back to the same values may pass (none expected).
    same = record()
    assert (got.version, got.pointer, got.inputs, got.leaves) == (
        same.version,
        same.pointer,
        same.inputs,
        same.leaves,
    )
