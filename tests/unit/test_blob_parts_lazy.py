"""A blob's parts are cut when taken: the relay never holds a second copy of the whole blob."""

from __future__ import annotations

import hashlib

import pytest

from fedtier.protocol.model_parts import MODEL_PART_PROPERTY, BlobAssembler, blob_parts


def test_parts_are_views_cut_on_access_with_sequence_semantics() -> None:
    blob = bytes(range(256)) * 9 + b"tail"  # 2,308 bytes
    parts = blob_parts(blob, 1000)
    assert len(parts) == 3
    digest = hashlib.sha256(blob).hexdigest()
    # Index, negative index and slice give the same parts as cutting the blob up front.
    assert parts[-1] == parts[2] == ({MODEL_PART_PROPERTY: f"2 3 2308 {digest}"}, blob[2000:])
    assert parts[:2] == [parts[0], parts[1]]
    assert b"".join(chunk for _, chunk in parts) == blob
    with pytest.raises(IndexError):
        parts[3]
    assembler = BlobAssembler(10_000)
    for index, (properties, chunk) in reversed(list(enumerate(parts))):
        joined = assembler.offer(index, properties, chunk)
    assert joined == blob
