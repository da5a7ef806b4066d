"""Bounded fuzzing of the decoder: only typed protocol errors escape, and memory stays bounded."""

from __future__ import annotations

import contextlib
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtier.protocol.codecs import decode
from fedtier.protocol.envelope import open_envelope, parse_envelope, seal
from fedtier.protocol.errors import LimitExceeded, RemoteProtocolError
from fedtier.protocol.limits import Limits
from tests.samples import KEYS, SIGNERS, all_samples

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
