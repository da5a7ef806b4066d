"""A model above the default 16 Mi parameters: a sender builds its messages, receivers cap them."""

from __future__ import annotations

import dataclasses

import pytest

from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.envelope import parse_envelope, seal
from fedtier.protocol.errors import LimitExceeded, LocalProtocolError
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import layout_of
from fedtier.protocol.limits import DEFAULT_LIMITS, limits_for_model
from fedtier.protocol.messages import DeviceUpdate, ModelAnnouncement

# Above DEFAULT_LIMITS.max_params (16 Mi): a 100-million-parameter model's count.
BIG = 100_000_000
SENDER = SigningIdentity.generate()


def test_a_message_of_a_model_above_the_default_cap_can_be_built_and_sealed() -> None:
    layout = layout_of([("w", (BIG,))])
    assert DEFAULT_LIMITS.max_params < BIG
    # A pointer carries no payload: the header alone shows the count is accepted.
    pointer = ModelAnnouncement(
        fleet="acme",
        sender=SENDER.key_id,
        seq=1,
        created_ms=1,
        version=3,
        layout=layout.fingerprint,
        num_params=BIG,
        blob_blake3=bytes(32),
        blob_size=4 * BIG,
        update_count=1,
    )
    data = seal(pointer, b"", SENDER)
    # A receiver with the default caps refuses it; one configured for the model takes it.
    with pytest.raises(LimitExceeded, match="num_params"):
        parse_envelope(data, DEFAULT_LIMITS)
    assert parse_envelope(data, limits_for_model(BIG)).message == pointer


def test_building_still_checks_shape() -> None:
    update = DeviceUpdate(
        fleet="acme",
        sender=SENDER.key_id,
        seq=1,
        created_ms=1,
        update_id=bytes(16),
        base_version=0,
        layout=layout_of([("w", (BIG,))]).fingerprint,
        num_params=BIG,
        n_samples=1,
        codec=CodecSpec.parse("i8", num_params=BIG),
    )
    assert update.num_params == BIG
    with pytest.raises(LocalProtocolError, match="num_params"):
        dataclasses.replace(update, num_params=0)
