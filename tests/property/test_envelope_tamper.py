"""Any single changed byte of a signed envelope is rejected with a typed protocol error."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedtier.protocol.envelope import open_envelope, seal
from fedtier.protocol.errors import RemoteProtocolError
from tests.samples import KEYS, SIGNERS, all_samples

SEALED = [seal(msg, payload, SIGNERS[msg.sender]) for msg, payload in all_samples()]


@pytest.mark.parametrize("index", range(len(SEALED)), ids=lambda i: all_samples()[i][0].KIND.value)
def test_every_position_flipped_is_rejected(index: int) -> None:
    data = SEALED[index]
    open_envelope(data, KEYS)  # the untouched envelope is valid
    for pos in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            tampered = bytearray(data)
            tampered[pos] ^= mask
            with pytest.raises(RemoteProtocolError):
                open_envelope(bytes(tampered), KEYS)


@given(
    index=st.integers(0, len(SEALED) - 1),
    pos=st.integers(0, 10**6),
    value=st.integers(0, 255),
)
def test_any_single_byte_replacement_is_rejected(index: int, pos: int, value: int) -> None:
    data = bytearray(SEALED[index])
    pos %= len(data)
    if data[pos] == value:
        value = (value + 1) % 256
    data[pos] = value
    with pytest.raises(RemoteProtocolError):
        open_envelope(bytes(data), KEYS)
