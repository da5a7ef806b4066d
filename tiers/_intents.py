"""A regional's intents in the ``forwarded`` KV bucket, a large one as parts; no bus adapter.

Imports protocol and msgpack only; never a concrete bus, the client or simulations.

With ``[lease] enabled`` a regional writes each sealed partial to the
``forwarded`` bucket before publishing it, so that a standby taking over can
publish the same bytes (``tiers.regional``). A KV value is one NATS message,
bounded by the server's ``max_payload`` (64 MB at most), while a partial of a
large model is not: a float32 partial of 100 million parameters is 400 MB. An
intent above the bound is written as parts, each one value:

* parts first, ``<key>.0`` .. ``<key>.<n-1>``, each at most the part size;
* then the index, under the intent's own key: ``INDEX_MAGIC`` followed by a
  msgpack map ``{"n": parts, "size": total bytes, "sha256": digest}``.

Once a standby has re-published a taken-over intent and its PubAck came, it
rewrites the intent as a small **forwarded** record (``FORWARDED_MAGIC`` and a
msgpack map ``{"partial": id, "inputs": [ids]}``): a later takeover then notes
the inputs (a redelivery of one is acknowledged as already forwarded) but does
not publish the partial again. Without it, every takeover re-published the
same bytes, and once neither the UP stream's dedupe window (lost whole when
the stream restarts) nor the central (one that took over knows 64 versions)
remembered the partial, a copy was folded twice.

The index goes last, so an intent whose index can be read had every part
written; a crash between leaves parts without an index, which no reader lists
and the bucket's ``max_age`` removes. A value starting with ``INDEX_MAGIC`` is
never an envelope (an envelope starts with a msgpack array, byte 0x94), so
intents written whole before parts existed read as before. Reading checks the
parts' count, sizes and digest: an intent that does not add up is refused
with a typed error (``RemoteProtocolError``), never half-used.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Final, Literal, Protocol

import msgpack

from fedtier.protocol.errors import RemoteProtocolError

__all__ = [
    "FORWARDED_MAGIC",
    "INDEX_MAGIC",
    "MAX_INTENT_PARTS",
    "IntentKv",
    "IntentState",
    "PartedIntents",
    "decode_forwarded",
    "encode_forwarded",
]

INDEX_MAGIC: Final = b"fedtier-intent-parts\x00"
"""How an intent's value says it is an index of parts, not the envelope itself."""

FORWARDED_MAGIC: Final = b"fedtier-intent-forwarded\x00"
"""How an intent's value says a takeover already re-published its partial upstream."""

IntentState = Literal["intent", "forwarded", "none"]
"""What a key of the ``forwarded`` bucket holds (``PartedIntents.state``)."""

_MAX_FORWARDED_INPUTS: Final = 1 << 20
"""Most input ids a forwarded record may name (a partial lists at most this many)."""

MAX_INTENT_PARTS: Final = 65_536
"""Most parts one intent may name: 4 TB at 64 MB a part; bounds what a reader trusts."""

_INDEX_MAX_BYTES: Final = 256
"""An index is a few dozen bytes; a larger value with the magic is refused unread."""

_VALUE_OVERHEAD: Final = 1024
"""Room left in each part for the KV message's subject and headers."""


class IntentKv(Protocol):
    """The ``forwarded`` KV bucket's operations (``protocol.bus.nats.KvBucket`` has them)."""

    async def keys(self) -> list[str]:
        """Every key that holds a value now."""

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """The key's value and revision, or None."""

    async def put(self, key: str, value: bytes) -> int:
        """Store ``value`` under ``key``."""

    async def delete(self, key: str) -> None:
        """Delete ``key``."""


class PartedIntents:
    """Intents by key, each whole or as parts (see the module docstring).

    Args:
        kv: the ``forwarded`` bucket.
        max_value_bytes: the largest value the bucket takes now (the server's
            ``max_payload``, known once connected), or None for no bound.
    """

    def __init__(self, kv: IntentKv, max_value_bytes: Callable[[], int | None]) -> None:
        self.kv = kv
        self._max_value_bytes = max_value_bytes

    def part_size(self) -> int | None:
        """The bytes of one part, or None when every intent goes whole."""
        bound = self._max_value_bytes()
        if bound is None:
            return None
        return max(1, bound - _VALUE_OVERHEAD)

    async def put(self, key: str, envelope: bytes) -> int:
        """Write ``envelope`` as the intent ``key``; returns the number of parts (0: whole)."""
        size = self.part_size()
        if size is None or len(envelope) <= size:
            await self.kv.put(key, envelope)
            return 0
        view = memoryview(envelope)
        count = -(-len(envelope) // size)
        if count > MAX_INTENT_PARTS:
            raise RemoteProtocolError(
                f"intent {key} of {len(envelope):,} bytes needs {count:,} parts of {size:,} bytes; "
                f"at most {MAX_INTENT_PARTS:,}"
            )
        for index in range(count):
            await self.kv.put(f"{key}.{index}", bytes(view[index * size : (index + 1) * size]))
        index_value = INDEX_MAGIC + msgpack.packb(
            {"n": count, "size": len(envelope), "sha256": hashlib.sha256(envelope).digest()},
            use_bin_type=True,
        )
        await self.kv.put(key, index_value)
        return count

    async def replace(self, key: str, value: bytes) -> bool:
        """Write a small ``value`` (one KV value) over intent ``key``, then drop its old parts.

        Returns False, writing nothing, when ``value`` does not fit in one KV
        value (a forwarded record of a partial with an enormous input list).
        """
        size = self.part_size()
        if size is not None and len(value) > size:
            return False
        old_parts = await self._part_count(key)
        await self.kv.put(key, value)
        await self._delete_parts(key, old_parts)
        return True

    async def state(self, key: str) -> IntentState:
        """What ``key`` holds: an intent (whole or parted), a forwarded record, or nothing.

        Reads the one value under ``key``, never the parts.
        """
        got = await self.kv.get(key)
        if got is None:
            return "none"
        return "forwarded" if got[0].startswith(FORWARDED_MAGIC) else "intent"

    async def keys(self) -> list[str]:
        """The intents' keys (``<prefix><partial id>``), without their parts' keys.

        An intent's key ends in a partial id (32 hex digits); a part's in its
        decimal index.
        """
        return [key for key in await self.kv.keys() if _is_intent_key(key)]

    async def get(self, key: str) -> bytes | None:
        """The intent's envelope, or None when there is no intent under ``key``.

        Raises:
            RemoteProtocolError: an index that is malformed, or parts that are
                missing or do not add up to it.
        """
        got = await self.kv.get(key)
        if got is None:
            return None
        value = got[0]
        if not value.startswith(INDEX_MAGIC):
            return value
        count, total, digest = _read_index(key, value)
        joined = bytearray()
        for index in range(count):
            part = await self.kv.get(f"{key}.{index}")
            if part is None:
                raise RemoteProtocolError(f"intent {key}: part {index} of {count} is missing")
            joined += part[0]
            if len(joined) > total:
                raise RemoteProtocolError(f"intent {key}: its parts exceed {total:,} bytes")
        if len(joined) != total or hashlib.sha256(joined).digest() != digest:
            raise RemoteProtocolError(
                f"intent {key}: its {count} parts hold {len(joined):,} bytes that do not match "
                f"the index ({total:,} bytes and its digest)"
            )
        return bytes(joined)

    async def delete(self, key: str) -> None:
        """Delete the intent: its index (or whole value) first, then its parts."""
        parts = await self._part_count(key)
        await self.kv.delete(key)
        await self._delete_parts(key, parts)

    async def _part_count(self, key: str) -> int:
        """How many parts the value under ``key`` names (0: whole, absent or unreadable).

        The parts of an unreadable index are left to the bucket's max_age.
        """
        got = await self.kv.get(key)
        if got is None or not got[0].startswith(INDEX_MAGIC):
            return 0
        try:
            return _read_index(key, got[0])[0]
        except RemoteProtocolError:
            return 0

    async def _delete_parts(self, key: str, count: int) -> None:
        for index in range(count):
            await self.kv.delete(f"{key}.{index}")


def _is_intent_key(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return len(last) == 32 and all(c in "0123456789abcdef" for c in last)


def _read_index(key: str, value: bytes) -> tuple[int, int, bytes]:
    """Parts, total bytes and SHA-256 digest named by an index value."""
    body = value[len(INDEX_MAGIC) :]
    if len(body) > _INDEX_MAX_BYTES:
        raise RemoteProtocolError(f"intent {key}: its index is {len(body)} bytes, not an index")
    try:
        index = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"intent {key}: its index is not msgpack: {exc}") from exc
    if not isinstance(index, dict):
        raise RemoteProtocolError(f"intent {key}: its index is not a map")
    count, total, digest = index.get("n"), index.get("size"), index.get("sha256")
    if not (isinstance(count, int) and 1 <= count <= MAX_INTENT_PARTS):
        raise RemoteProtocolError(
            f"intent {key}: part count {count!r} is not 1..{MAX_INTENT_PARTS}"
        )
    if not (isinstance(total, int) and total >= count):
        raise RemoteProtocolError(f"intent {key}: size {total!r} is not an integer >= its parts")
    if not (isinstance(digest, bytes) and len(digest) == 32):
        raise RemoteProtocolError(f"intent {key}: its digest is not 32 bytes")
    return count, total, digest


def encode_forwarded(partial_id: bytes, inputs: list[bytes] | tuple[bytes, ...]) -> bytes:
    """The forwarded record of a re-published partial: its id and its inputs' ids."""
    body: bytes = msgpack.packb({"partial": partial_id, "inputs": list(inputs)}, use_bin_type=True)
    return FORWARDED_MAGIC + body


def decode_forwarded(key: str, value: bytes) -> tuple[bytes, list[bytes]]:
    """The partial id and input ids of a forwarded record.

    Raises:
        RemoteProtocolError: the record is malformed.
    """
    try:
        record = msgpack.unpackb(
            value[len(FORWARDED_MAGIC) :],
            raw=False,
            strict_map_key=True,
            max_array_len=_MAX_FORWARDED_INPUTS,
        )
    except (ValueError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(
            f"intent {key}: its forwarded record is not msgpack: {exc}"
        ) from exc
    if not isinstance(record, dict):
        raise RemoteProtocolError(f"intent {key}: its forwarded record is not a map")
    partial, inputs = record.get("partial"), record.get("inputs")
    if not isinstance(partial, bytes) or not isinstance(inputs, list):
        raise RemoteProtocolError(f"intent {key}: its forwarded record lacks partial or inputs")
    if not all(isinstance(item, bytes) for item in inputs):
        raise RemoteProtocolError(f"intent {key}: its forwarded record names a non-bytes input")
    return partial, inputs
