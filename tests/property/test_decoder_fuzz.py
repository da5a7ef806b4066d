"""Bounded fuzzing of the decoder: only typed protocol errors escape, and memory stays bounded."""

from __future__ import annotations

import contextlib
import dataclasses
import tracemalloc
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtier.protocol.codecs import decode
from fedtier.protocol.envelope import _check_structure, open_envelope, parse_envelope, seal
from fedtier.protocol.errors import DecodeError, LimitExceeded, RemoteProtocolError
from fedtier.protocol.limits import DEFAULT_LIMITS, Limits, StructureCaps
from fedtier.protocol.messages import header_caps
from tests.samples import KEYS, SIGNERS, all_samples
from tests.unit.test_envelope import raw_envelope, structure_of

SEALED = [seal(msg, payload, SIGNERS[msg.sender]) for msg, payload in all_samples()]
SMALL = Limits(max_envelope_bytes=64 * 1024, max_header_bytes=16 * 1024, max_params=4096)


def _decode_fully(data: bytes, limits: Limits) -> None:
    """Everything a receiver does with untrusted bytes before it folds them."""
    try:
        env = open_envelope(data, KEYS, limits)
    except RemoteProtocolError:
        return
    codec = getattr(env.message, "codec", None)
    if codec is not None:
        decode(env.payload, codec, env.message.num_params)  # type: ignore[union-attr]


def _mutate(rng: np.random.Generator, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        op = int(rng.integers(0, 5))
        pos = int(rng.integers(0, len(buf) + 1))
        if op == 0 and buf:
            buf[pos % len(buf)] = int(rng.integers(0, 256))
        elif op == 1:
            buf[pos:pos] = rng.bytes(int(rng.integers(1, 9)))
        elif op == 2:
            del buf[pos : pos + int(rng.integers(1, 9))]
        elif op == 3:
            buf = buf[:pos]
        else:  # splice a piece of another valid envelope in: keeps msgpack-looking structure
            other = SEALED[int(rng.integers(0, len(SEALED)))]
            start = int(rng.integers(0, len(other)))
            buf[pos:pos] = other[start : start + int(rng.integers(1, 40))]
    return bytes(buf)


def test_mutated_envelopes_raise_only_typed_errors() -> None:
    rng = np.random.default_rng(20261128)
    outcomes = {"rejected": 0, "accepted": 0}
    for i in range(4000):
        data = _mutate(rng, SEALED[i % len(SEALED)])
        try:
            _decode_fully(data, SMALL)
            outcomes["accepted"] += 1
        except RemoteProtocolError:
            outcomes["rejected"] += 1
    # A mutation that leaves a valid, verified envelope is possible only if it is a no-op.
    assert outcomes["rejected"] + outcomes["accepted"] == 4000


@settings(max_examples=400)
@given(st.binary(max_size=2048))
def test_random_bytes_raise_only_typed_errors(data: bytes) -> None:
    _decode_fully(data, SMALL)


@given(st.binary(max_size=200))
def test_random_bytes_after_a_valid_prefix_raise_only_typed_errors(tail: bytes) -> None:
    _decode_fully(SEALED[0][:40] + tail, SMALL)


def test_declared_lengths_beyond_the_caps_allocate_nothing_large() -> None:
    hostile = [
        b"\x94\x01\xc6\xff\xff\xff\xff",  # header claims a 4 GiB bin
        b"\xdd\xff\xff\xff\xff",  # an array of 4 billion items
        b"\xdf\xff\xff\xff\xff",  # a map of 4 billion pairs
        b"\x94\x01\xc4\x05\xdd\xff\xff\xff\xff\xc4\x00\xc4\x00",  # nested huge array in the header
        b"\x91" * 100_000,  # deep nesting
    ]
    tracemalloc.start()
    try:
        for data in hostile:
            tracemalloc.reset_peak()
            with contextlib.suppress(RemoteProtocolError):
                parse_envelope(data, SMALL)
            _current, peak = tracemalloc.get_traced_memory()
            assert peak < 4 * SMALL.max_envelope_bytes + len(data) * 4, (data[:8], peak)
    finally:
        tracemalloc.stop()


def test_mutated_inputs_stay_under_the_memory_cap() -> None:
    rng = np.random.default_rng(7)
    tracemalloc.start()
    try:
        worst = 0
        for i in range(500):
            data = _mutate(rng, SEALED[i % len(SEALED)])
            tracemalloc.reset_peak()
            with contextlib.suppress(RemoteProtocolError):
                _decode_fully(data, SMALL)
            worst = max(worst, tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    # Decoded floats are capped at 4 bytes x max_params; the envelope at its cap.
    assert worst < SMALL.max_envelope_bytes + 4 * SMALL.max_params * 3


def test_over_cap_envelope_is_refused_by_size_alone() -> None:
    with pytest.raises(LimitExceeded) as info:
        parse_envelope(b"\x00" * (SMALL.max_envelope_bytes + 1), SMALL)
    assert info.value.reason == "too_large"


# -- structure caps: the walk before msgpack builds anything (docs/protocol.md 10.1) --------

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.binary(max_size=300)
)
# Runs of one repeated value take the walk's one-step path for items encoded alike;
# runs of one type but lengths that differ (bin 8 and str 8 of 32-40 bytes) must not.
_RUNS = (
    _SCALARS.flatmap(lambda v: st.lists(st.just(v), min_size=16, max_size=70))
    | st.lists(st.binary(min_size=32, max_size=40), min_size=16, max_size=40)
    | st.lists(st.text(min_size=32, max_size=40), min_size=16, max_size=40)
    | st.lists(st.integers(min_value=256, max_value=65535), min_size=16, max_size=40)
)
_VALUES = st.recursive(
    _SCALARS | _RUNS,
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=60,
)


# Drawing these recursive values is about half of the cost of each property
# (and nearly all of it under load), so both properties are checked on each
# drawn value: each still sees 150 values of the same strategy.
@settings(max_examples=150)
@given(_VALUES)
def test_the_walk_counts_exactly_and_a_header_above_its_caps_is_too_large(value: Any) -> None:
    _the_walk_counts_exactly_what_msgpack_builds(value)
    _a_header_above_its_structure_caps_is_too_large(value)


def _the_walk_counts_exactly_what_msgpack_builds(value: Any) -> None:
    data = msgpack.packb(value, use_bin_type=True)
    exact = structure_of(msgpack.unpackb(data, strict_map_key=False))
    assert exact == structure_of(value)
    _check_structure(data, exact, "value")  # exactly at every cap: accepted
    for field in dataclasses.fields(StructureCaps):
        cap = getattr(exact, field.name)
        if cap > (1 if field.name == "max_objects" else 0):
            with pytest.raises(LimitExceeded):
                _check_structure(data, dataclasses.replace(exact, **{field.name: cap - 1}), "v")
    for cut in {0, len(data) // 2, len(data) - 1}:
        with pytest.raises(DecodeError) as info:
            _check_structure(data[:cut], exact, "value")
        assert info.type is DecodeError, "a truncated value is malformed, not too large"


def _a_header_above_its_structure_caps_is_too_large(value: Any) -> None:
    data = raw_envelope(msgpack.packb(value, use_bin_type=True))
    caps = header_caps(SMALL)
    above = structure_of(value).union(caps) != caps
    error: RemoteProtocolError | None = None
    try:
        parse_envelope(data, SMALL)
    except RemoteProtocolError as exc:
        error = exc
    words = ("nests", "more than", "has a map", "has an array")
    structural = isinstance(error, LimitExceeded) and any(w in str(error) for w in words)
    assert structural == above or len(data) > SMALL.max_envelope_bytes, error


def _filled(row_items: bytes, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """``{"inputs": [[row_items] x k]}``, 65,535 items a row, as many rows as fit in the cap."""
    row = b"\xdc\xff\xff" + row_items
    k = (limits.max_header_bytes - 16) // len(row)
    return raw_envelope(b"\x81\xa6inputs\xdc" + k.to_bytes(2, "big") + row * k)


def _outer_tree(levels: int) -> bytes:
    node = b"\x90"
    for _ in range(levels):
        node = b"\x94" + node * 4
    return node


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("4 M empty arrays", _filled(b"\x90" * 65535)),
        ("4 M empty maps", _filled(b"\x80" * 65535)),
        ("4 M one-byte integers", _filled(b"\x01" * 65535)),
        ("empty arrays and integers in turn", _filled(b"\x90\x01" * 32767 + b"\x90")),
        (
            "arrays 4 Mi deep",
            raw_envelope(b"\x91" * (DEFAULT_LIMITS.max_header_bytes - 1) + b"\x90"),
        ),
        ("1024 arrays declaring 65,535 items", raw_envelope(b"\xdc\xff\xff" * 1024)),
        ("an envelope of 4**10 empty arrays", _outer_tree(10)),
    ],
)
def test_worst_shapes_within_the_default_caps_cost_no_memory(name: str, data: bytes) -> None:
    assert len(data) <= DEFAULT_LIMITS.max_envelope_bytes
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError) as info:
            parse_envelope(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason in ("too_large", "malformed"), name
    # The header's bytes, copied once out of the envelope, and little else; without
    # the structure caps the first two cost 250-300 MiB.
    assert peak < len(data) + 1024 * 1024, (name, peak)
