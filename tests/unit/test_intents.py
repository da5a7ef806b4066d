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
    assert await intents.put("eu.aa", data) == 0
    assert kv.values == {"eu.aa": data}
    assert await intents.get("eu.aa") == data
    assert await intents.keys() == ["eu.aa"]


async def test_a_large_intent_goes_as_parts_and_comes_back_whole() -> None:
    kv = BoundedKv()
    intents = PartedIntents(kv, lambda: BOUND)
    data = envelope(10 * BOUND + 17)
    parts = await intents.put("eu.bb", data)
    assert parts > 10
    assert sorted(kv.values) == sorted(["eu.bb", *(f"eu.bb.{i}" for i in range(parts))])
    assert kv.values["eu.bb"].startswith(INDEX_MAGIC)
    assert await intents.keys() == ["eu.bb"]  # the parts are not intents
    assert await intents.get("eu.bb") == data
    await intents.delete("eu.bb")
    assert kv.values == {}


async def test_no_bound_means_every_intent_whole() -> None:
    kv = BoundedKv(bound=None)
    intents = PartedIntents(kv, lambda: None)
    data = envelope(100_000)
    assert await intents.put("eu.cc", data) == 0
    assert await intents.get("eu.cc") == data


async def test_parts_without_their_index_are_no_intent() -> None:
    # A crash between the parts and the index: nobody lists it, max_age removes it.
    kv = BoundedKv()
    intents = PartedIntents(kv, lambda: BOUND)
    await intents.put("eu.dd", envelope(3 * BOUND))
    del kv.values["eu.dd"]
    assert await intents.keys() == []
    assert await intents.get("eu.dd") is None


@pytest.mark.parametrize("damage", ["missing_part", "changed_part", "extra_bytes"])
async def test_parts_that_do_not_add_up_are_refused(damage: str) -> None:
    kv = BoundedKv()
    intents = PartedIntents(kv, lambda: BOUND)
    parts = await intents.put("eu.ee", envelope(3 * BOUND))
    if damage == "missing_part":
        del kv.values[f"eu.ee.{parts - 1}"]
    elif damage == "changed_part":
        kv.values["eu.ee.0"] = b"\x00" + kv.values["eu.ee.0"][1:]
    else:
        kv.values["eu.ee.0"] += b"x"
    with pytest.raises(RemoteProtocolError, match=r"eu\.ee"):
        await intents.get("eu.ee")


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
    kv.values["eu.ff"] = INDEX_MAGIC + index
    intents = PartedIntents(kv, lambda: BOUND)
    with pytest.raises(RemoteProtocolError, match=r"eu\.ff"):
        await intents.get("eu.ff")
    await intents.delete("eu.ff")
    assert kv.values == {}


async def test_the_index_names_the_size_and_digest_of_the_whole() -> None:
    kv = BoundedKv()
    intents = PartedIntents(kv, lambda: BOUND)
    data = envelope(2 * BOUND)
    parts = await intents.put("eu.gg", data)
    index = msgpack.unpackb(kv.values["eu.gg"][len(INDEX_MAGIC) :])
    assert index == {"n": parts, "size": len(data), "sha256": hashlib.sha256(data).digest()}


async def test_a_forwarded_record_replaces_a_parted_intent_and_drops_its_parts() -> None:
    kv = BoundedKv()
    intents = PartedIntents(kv, lambda: BOUND)
    await intents.put("eu.hh", envelope(3 * BOUND))
    record = encode_forwarded(b"p" * 16, [b"a" * 16, b"b" * 16])
    assert await intents.replace("eu.hh", record)
    assert kv.values == {"eu.hh": record}
    # A record too large for one value is not written: the intent stays as it was.
    assert not await intents.replace("eu.hh", encode_forwarded(b"p" * 16, [b"x" * 16] * 400))
    assert kv.values == {"eu.hh": record}
    assert await intents.get("eu.hh") == record
    assert decode_forwarded("eu.hh", record) == (b"p" * 16, [b"a" * 16, b"b" * 16])


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
    with pytest.raises(RemoteProtocolError, match=r"eu\.ii"):
        decode_forwarded("eu.ii", FORWARDED_MAGIC + body)
