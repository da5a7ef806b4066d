"""A regional's intents above the bucket's value bound go as parts and come back whole."""

from __future__ import annotations

import hashlib
import os

import msgpack
import pytest

from fedtier.protocol.errors import RemoteProtocolError
from fedtier.tiers._intents import (
    FORWARDED_MAGIC,
    INDEX_MAGIC,
    MAX_INTENT_PARTS,
    PartedIntents,
    decode_forwarded,
    encode_forwarded,
)

BOUND = 4096


class BoundedKv:
    """A KV bucket in memory that refuses a value above ``bound`` bytes, as nats-server does."""

    def __init__(self, bound: int | None = BOUND) -> None:
        self.bound = bound
        self.values: dict[str, bytes] = {}

    async def keys(self) -> list[str]:
        return list(self.values)

    async def get(self, key: str) -> tuple[bytes, int] | None:
        value = self.values.get(key)
        return None if value is None else (value, 1)

    async def put(self, key: str, value: bytes) -> int:
        if self.bound is not None and len(value) > self.bound:
            raise AssertionError(f"value of {len(value)} bytes above the bound {self.bound}")
        self.values[key] = value
        return 1

    async def delete(self, key: str) -> None:
        self.values.pop(key, None)


def envelope(size: int) -> bytes:
    """Bytes shaped like an envelope (a msgpack array of 4 starts with 0x94)."""
    return b"\x94" + os.urandom(size - 1)


async def test_a_small_intent_is_one_value_as_before() -> None:
    kv = BoundedKv()
    intents = PartedIntents(kv, lambda: BOUND)
    data = envelope(1000)
    assert await intents.put("eu.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", data) == 0
    assert kv.values == {"eu.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa": data}
    assert await intents.get("eu.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa") == data
    assert await intents.keys() == ["eu.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]


async def test_a_large_intent_goes_as_parts_and_comes_back_whole() -> None:
    kv = BoundedKv()
    intents = PartedIntents(kv, lambda: BOUND)
    data = envelope(10 * BOUND + 17)
    parts = await intents.put("eu.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", data)
    assert parts > 10
    assert sorted(kv.values) == sorted(
        ["eu.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", *(f"eu.{'bb' * 16}.{i}" for i in range(parts))]
    )
    assert kv.values["eu.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"].startswith(INDEX_MAGIC)
    assert await intents.keys() == [
        "eu.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
    ]  # the parts are not intents
    assert await intents.get("eu.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb") == data
    await intents.delete("eu.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb")
    assert kv.values == {}


async def test_no_bound_means_every_intent_whole() -> None:
    kv = BoundedKv(bound=None)
    intents = PartedIntents(kv, lambda: None)
    data = envelope(100_000)
    assert await intents.put("eu.cccccccccccccccccccccccccccccccc", data) == 0
    assert await intents.get("eu.cccccccccccccccccccccccccccccccc") == data


async def test_parts_without_their_index_are_no_intent() -> None:
    # A crash between the parts and the index: nobody lists it, max_age removes it.
    kv = BoundedKv()
    intents = PartedIntents(kv, lambda: BOUND)
    await intents.put("eu.dddddddddddddddddddddddddddddddd", envelope(3 * BOUND))
    del kv.values["eu.dddddddddddddddddddddddddddddddd"]
    assert await intents.keys() == []
    assert await intents.get("eu.dddddddddddddddddddddddddddddddd") is None


@pytest.mark.parametrize("damage", ["missing_part", "changed_part", "extra_bytes"])
async def test_parts_that_do_not_add_up_are_refused(damage: str) -> None:
    kv = BoundedKv()
    intents = PartedIntents(kv, lambda: BOUND)
    parts = await intents.put("eu.eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee", envelope(3 * BOUND))
    if damage == "missing_part":
        del kv.values[f"eu.{'ee' * 16}.{parts - 1}"]
    elif damage == "changed_part":
        kv.values["eu.eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.0"] = (
            b"\x00" + kv.values["eu.eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.0"][1:]
        )
    else:
        kv.values["eu.eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.0"] += b"x"
    with pytest.raises(RemoteProtocolError, match=r"eu\.ee"):
        await intents.get("eu.eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee")


@pytest.mark.parametrize(
    "index",
    [
        b"not msgpack \xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({"n": 0, "size": 10, "sha256": bytes(32)}),
        msgpack.packb({"n": MAX_INTENT_PARTS + 1, "size": 2**40, "sha256": bytes(32)}),
        msgpack.packb({"n": 2, "size": 1, "sha256": bytes(32)}),
        msgpack.packb({"n": 2, "size": 10, "sha256": b"short"}),
        b"\x00" * 300,
    ],
)
async def test_a_malformed_index_is_refused_and_can_still_be_deleted(index: bytes) -> None:
    kv = BoundedKv()
    kv.values["eu.ffffffffffffffffffffffffffffffff"] = INDEX_MAGIC + index
    intents = PartedIntents(kv, lambda: BOUND)
    with pytest.raises(RemoteProtocolError, match=r"eu\.ff"):
        await intents.get("eu.ffffffffffffffffffffffffffffffff")
    await intents.delete("eu.ffffffffffffffffffffffffffffffff")
    assert kv.values == {}


async def test_the_index_names_the_size_and_digest_of_the_whole() -> None:
    kv = BoundedKv()
    intents = PartedIntents(kv, lambda: BOUND)
    data = envelope(2 * BOUND)
    parts = await intents.put("eu.1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a", data)
    index = msgpack.unpackb(kv.values["eu.1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a"][len(INDEX_MAGIC) :])
    assert index == {"n": parts, "size": len(data), "sha256": hashlib.sha256(data).digest()}


async def test_a_forwarded_record_replaces_a_parted_intent_and_drops_its_parts() -> None:
    kv = BoundedKv()
    intents = PartedIntents(kv, lambda: BOUND)
    await intents.put("eu.2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b", envelope(3 * BOUND))
    record = encode_forwarded(b"p" * 16, [b"a" * 16, b"b" * 16])
    assert await intents.replace("eu.2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b", record)
    assert kv.values == {"eu.2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b": record}
    # A record too large for one value is not written: the intent stays as it was.
    assert not await intents.replace(
        "eu.2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b", encode_forwarded(b"p" * 16, [b"x" * 16] * 400)
    )
    assert kv.values == {"eu.2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b": record}
    assert await intents.get("eu.2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b") == record
    assert decode_forwarded("eu.2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b2b", record) == (
        b"p" * 16,
        [b"a" * 16, b"b" * 16],
    )


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",
        msgpack.packb([1]),
        msgpack.packb({"partial": 1}),
        msgpack.packb({"partial": b"p", "inputs": [1]}),
    ],
)
def test_a_malformed_forwarded_record_is_refused(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match=r"eu\.3c3c"):
        decode_forwarded("eu.3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c", FORWARDED_MAGIC + body)


async def test_an_edges_intent_keys_are_listed_without_their_parts() -> None:
    kv = BoundedKv()
    intents = PartedIntents(kv, lambda: BOUND)
    key = "edge.eu.depot-1." + "4d" * 16
    parts = await intents.put(key, envelope(3 * BOUND))
    assert parts >= 3
    assert await intents.keys() == [key]
    assert await intents.state(key) == "intent"
    assert await intents.state("edge.eu.depot-1." + "5e" * 16) == "none"
