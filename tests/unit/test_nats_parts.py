"""A payload above max_payload as parts: the framing and the bounded assembly, without a server."""

from __future__ import annotations

import hashlib

import pytest

from fedtier.protocol.errors import LocalProtocolError
from fedtier.protocol.stream_parts import (
    PART_HEADER,
    PART_MARGIN_BYTES,
    Part,
    PartsAssembly,
    parse_part,
    part_headers,
    split,
)


def parts_of(payload: bytes, part_bytes: int, msg_id: str) -> list[tuple[Part, bytes]]:
    digest = hashlib.sha256(payload).hexdigest()
    chunks = split(payload, part_bytes)
    out = []
    for index, chunk in enumerate(chunks):
        header = part_headers(index, len(chunks), payload, digest, msg_id)
        part = parse_part({PART_HEADER: header})
        assert part is not None
        out.append((part, bytes(chunk)))
    return out


def offer(
    assembly: PartsAssembly, part: Part, data: bytes, token: int, seq: int, now: float = 0.0
) -> tuple[str, int | None]:
    return assembly.offer(
        part, token, seq, data, subject="s", headers={"h": "v"}, redelivered=False, now=now
    )


def test_split_cuts_in_order_and_the_header_round_trips() -> None:
    payload = bytes(range(256)) * 41  # 10,496 bytes
    parts = parts_of(payload, 4096, "edge-1:p-7")
    assert [p.index for p, _ in parts] == [0, 1, 2]
    assert {p.count for p, _ in parts} == {3}
    assert b"".join(c for _, c in parts) == payload
    assert parts[0][0].whole_size == len(payload)
    assert parts[0][0].msg_id == "edge-1:p-7"
    assert parse_part({"other": "x"}) is None
    assert parse_part(None) is None


@pytest.mark.parametrize(
    "header",
    [
        "",
        "0 1 10",
        "1 1 10 " + "a" * 64 + " id",  # index not below count
        "0 2 1 " + "a" * 64 + " id",  # fewer bytes than parts
        "0 1 10 " + "z" * 64 + " id",  # digest not hex
        "0 1 10 " + "a" * 63 + " id",
        "x 1 10 " + "a" * 64 + " id",
        "0 1 10 " + "a" * 64 + " ",
    ],
)
def test_a_bad_part_header_is_a_typed_error(header: str) -> None:
    with pytest.raises(LocalProtocolError, match=PART_HEADER):
        parse_part({PART_HEADER: header})


def test_interleaved_wholes_complete_each_with_its_own_tokens() -> None:
    a = parts_of(b"A" * 10_000, 4096, "a")
    b = parts_of(b"B" * 5_000, 4096, "b")
    assembly = PartsAssembly(max_whole_bytes=20_000, max_held_bytes=40_000)
    order = [(a[0], 1), (b[0], 2), (a[1], 3), (b[1], 4), (a[2], 5)]
    completed = []
    for seq, ((part, data), token) in enumerate(order, start=1):
        assert offer(assembly, part, data, token, seq) == ("held", None)
        whole = assembly.take_completed(part)
        if whole is not None:
            completed.append(whole)
    assert [w.payload for w in completed] == [b"B" * 5_000, b"A" * 10_000]
    assert [sorted(w.tokens) for w in completed] == [[2, 4], [1, 3, 5]]
    assert all(w.intact for w in completed)
    assert completed[0].headers == {"h": "v"}
    assert assembly.reserved_bytes == 0


def test_a_redelivered_part_replaces_its_token_and_another_copy_is_a_repeat() -> None:
    (p0, d0), (p1, d1) = parts_of(b"x" * 6_000, 4096, "m")
    assembly = PartsAssembly(10_000, 10_000)
    assert offer(assembly, p0, d0, token=1, seq=10) == ("held", None)
    # The server redelivered the same stream message: hold the new delivery instead.
    assert offer(assembly, p0, d0, token=2, seq=10) == ("held", 1)
    # A second stored copy (a retry past the dedupe window): acknowledge it alone.
    assert offer(assembly, p0, d0, token=3, seq=11) == ("repeat", None)
    assert offer(assembly, p1, d1, token=4, seq=12) == ("held", None)
    whole = assembly.take_completed(p1)
    assert whole is not None
    assert whole.payload == b"x" * 6_000
    assert sorted(whole.tokens) == [2, 4]
    assert whole.redelivered


def test_held_bytes_are_bounded_and_a_started_whole_can_always_complete() -> None:
    a = parts_of(b"a" * 8_000, 4096, "a")
    b = parts_of(b"b" * 8_000, 4096, "b")
    c = parts_of(b"c" * 30_000, 4096, "c")
    assembly = PartsAssembly(max_whole_bytes=30_000, max_held_bytes=16_000)
    assert offer(assembly, *a[0], token=1, seq=1)[0] == "held"
    assert offer(assembly, *b[0], token=2, seq=2)[0] == "held"
    assert assembly.reserved_bytes == 16_000
    # No room for a third whole until one completes; parts of started ones still fit.
    assert offer(assembly, *c[0], token=3, seq=3)[0] == "later"
    assert offer(assembly, *a[1], token=4, seq=4)[0] == "held"
    assert assembly.take_completed(a[1][0]) is not None
    assert offer(assembly, *b[1], token=5, seq=5)[0] == "held"
    assert assembly.take_completed(b[1][0]) is not None
    # Alone, a whole above max_held_bytes (but within max_whole_bytes) is taken.
    assert offer(assembly, *c[0], token=6, seq=6)[0] == "held"


def test_a_whole_above_the_cap_is_oversize_and_lying_parts_fail_the_check() -> None:
    assembly = PartsAssembly(max_whole_bytes=5_000, max_held_bytes=10_000)
    (big, data), *_ = parts_of(b"z" * 6_000, 4096, "big")
    assert offer(assembly, big, data, token=1, seq=1) == ("oversize", None)
    off = PartsAssembly(0, 0)  # parts off: every part is oversize
    assert offer(off, big, data, token=1, seq=1)[0] == "oversize"

    # A part that carries other bytes than its whole's digest names.
    (p0, d0), (p1, _) = parts_of(b"q" * 5_000, 4096, "q")
    assert offer(assembly, p0, d0, token=2, seq=2)[0] == "held"
    assert offer(assembly, p1, b"Q" * (5_000 - 4096), token=3, seq=3)[0] == "held"
    whole = assembly.take_completed(p1)
    assert whole is not None
    assert not whole.intact


def test_wholes_that_never_complete_expire_and_free_their_room() -> None:
    (p0, d0), _ = parts_of(b"e" * 6_000, 4096, "e")
    assembly = PartsAssembly(10_000, 10_000)
    assert offer(assembly, p0, d0, token=7, seq=1, now=100.0)[0] == "held"
    assert assembly.expire(started_before=50.0) == []
    assert assembly.expire(started_before=150.0) == [7]
    assert assembly.reserved_bytes == 0
    assert assembly.take_completed(p0) is None


def test_the_example_in_protocol_md_section_7() -> None:
    # docs/protocol.md: a 20,000,000-byte envelope under max_payload: 8MB.
    part_bytes = 8 * 1024 * 1024 - PART_MARGIN_BYTES
    sizes = [len(chunk) for chunk in split(bytes(20_000_000), part_bytes)]
    assert sizes == [8_384_512, 8_384_512, 3_230_976]
