"""A model blob above the MQTT packet limit as retained parts: cutting, joining, refusing."""

from __future__ import annotations

import hashlib

import pytest

from fedtier.protocol.errors import DecodeError, LimitExceeded, LocalProtocolError
from fedtier.protocol.limits import DEFAULT_LIMITS, limits_for_model
from fedtier.protocol.model_parts import (
    MAX_BLOB_PARTS,
    MODEL_PART_PROPERTY,
    BlobAssembler,
    blob_parts,
    parse_blob_part,
)
from fedtier.protocol.names import MqttTopics

TOPICS = MqttTopics("acme", "site-1")


def test_parts_cut_in_order_name_their_blob_and_join_back() -> None:
    blob = bytes(range(256)) * 10  # 2,560 bytes
    parts = blob_parts(blob, 1000)
    assert [len(chunk) for _, chunk in parts] == [1000, 1000, 560]
    digest = hashlib.sha256(blob).hexdigest()
    assert parts[1][0] == {MODEL_PART_PROPERTY: f"1 3 2560 {digest}"}
    assembler = BlobAssembler(10_000)
    # Retained parts arrive in any order.
    assert assembler.offer(2, *parts[2]) is None
    assert assembler.offer(0, *parts[0]) is None
    assert assembler.offer(1, *parts[1]) == blob
    assert assembler.pending == 0


def test_part_topics_and_their_indices() -> None:
    assert TOPICS.model_blob_part(7) == "ft/acme/site-1/model/blob/7"
    assert TOPICS.model_blob_parts() == "ft/acme/site-1/model/blob/+"
    assert TOPICS.blob_part_index("ft/acme/site-1/model/blob/7") == 7
    for topic in (
        "ft/acme/site-1/model/blob",
        "ft/acme/site-1/model/blob/07",
        "ft/acme/site-1/model/blob/-1",
        "ft/acme/site-1/model/blob/x",
        "ft/acme/site-2/model/blob/1",
    ):
        assert TOPICS.blob_part_index(topic) is None
    with pytest.raises(LocalProtocolError):
        TOPICS.model_blob_part(-1)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "0 1 10",
        "1 1 10 " + "a" * 64,  # index not below count
        "0 2 1 " + "a" * 64,  # fewer bytes than parts
        f"0 {MAX_BLOB_PARTS + 1} 999999 " + "a" * 64,
        "0 1 10 " + "g" * 64,
        "0 1 10 " + "a" * 63,
    ],
)
def test_a_bad_property_is_a_decode_error(value: str) -> None:
    with pytest.raises(DecodeError, match=MODEL_PART_PROPERTY):
        parse_blob_part({MODEL_PART_PROPERTY: value})


def test_refusals_drop_the_part_and_keep_the_rest() -> None:
    blob = b"m" * 3000
    parts = blob_parts(blob, 1000)
    assembler = BlobAssembler(3000)
    with pytest.raises(DecodeError, match="without"):
        assembler.offer(0, {}, b"x")
    with pytest.raises(DecodeError, match="arrived on part topic 1"):
        assembler.offer(1, *parts[0])
    with pytest.raises(LimitExceeded, match="above this device's limit"):
        BlobAssembler(2999).offer(0, *parts[0])
    assert assembler.offer(0, *parts[0]) is None
    with pytest.raises(DecodeError, match="hold more than"):
        assembler.offer(1, parts[1][0], b"m" * 2500)  # longer than what is left of the blob
    # That blob's assembly is gone; sent again, it joins.
    for index, (properties, chunk) in enumerate(parts[:2]):
        assert assembler.offer(index, properties, chunk) is None
    assert assembler.offer(2, *parts[2]) == blob


def test_joined_bytes_that_miss_the_digest_are_refused() -> None:
    parts = blob_parts(b"a" * 2000, 1000)
    assembler = BlobAssembler(10_000)
    assert assembler.offer(0, parts[0][0], b"b" * 1000) is None
    with pytest.raises(DecodeError, match="do not join"):
        assembler.offer(1, *parts[1])


def test_leftover_and_replaced_blobs_never_block_the_newest() -> None:
    assembler = BlobAssembler(100_000, slots=2)
    old = blob_parts(b"o" * 5000, 1000)
    older = blob_parts(b"p" * 5000, 1000)
    new = blob_parts(b"n" * 3000, 1000)
    assert assembler.offer(4, *old[4]) is None
    assert assembler.offer(3, *older[3]) is None
    assert assembler.offer(0, *new[0]) is None  # evicts the first-started (old)
    assert assembler.pending == 2
    assert assembler.offer(1, *new[1]) is None
    assert assembler.offer(2, *new[2]) == b"n" * 3000
    with pytest.raises(LocalProtocolError):
        blob_parts(b"", 10)
    with pytest.raises(LocalProtocolError):
        blob_parts(b"x", 0)


def test_the_example_in_protocol_md_section_7() -> None:
    # docs/protocol.md: a 40,000,000-byte blob under a 16,777,216-byte packet limit.
    parts = blob_parts(bytes(40_000_000), 16_777_216 - 1024)
    assert [len(chunk) for _, chunk in parts] == [16_776_192, 16_776_192, 6_447_616]
    assert parts[2][0][MODEL_PART_PROPERTY].startswith("2 3 40000000 ")


def test_a_device_s_limits_fit_a_blob_of_its_own_layout_however_large() -> None:
    small = limits_for_model(1_000)
    assert small == DEFAULT_LIMITS  # the defaults already fit a small model
    large = limits_for_model(100_000_000)
    assert large.max_params == 100_000_000
    assert large.max_envelope_bytes >= 4 * 100_000_000 + DEFAULT_LIMITS.max_header_bytes
    # Every other cap stays the default's: a large model is no licence for a large header.
    assert large.max_header_bytes == DEFAULT_LIMITS.max_header_bytes
    assert large.max_ids == DEFAULT_LIMITS.max_ids
    with pytest.raises(LocalProtocolError):
        limits_for_model(0)
