"""A model blob above the MQTT broker's packet limit, as retained parts; sans-IO, no bus.

MQTT caps one packet at 256 MB and the shipped Mosquitto config at 16 MiB,
while the blob of a 100-million-parameter float32 model is 400 MB. An edge
relays such a blob as parts: the signed ``model_blob`` envelope's bytes cut
into consecutive pieces, piece ``i`` of ``n`` retained on
``ft/<fleet>/<site>/model/blob/<i>`` with the MQTT v5 user property
``fedtier-part`` = ``<i> <n> <blob size> <SHA-256 of the blob, lowercase hex>``.
A device joins the pieces of one ``(SHA-256, n, size)``, checks size and
digest, and opens the joined bytes as it opens a whole blob (the signature
and the pointer's ``blob_blake3`` are checked there, as always): the parts
carry no trust of their own.

Retained parts of an older, larger blob may linger on indices the newer one
does not use; they name another digest and never complete. A device keeps a
few assemblies at once (newest first) so that such leftovers, or a version
replaced while its parts arrive, never block the current one, and bounds
each by its ``max_envelope_bytes``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, overload

from fedtier.protocol.errors import DecodeError, LimitExceeded, LocalProtocolError

__all__ = [
    "MAX_BLOB_PARTS",
    "MODEL_PART_PROPERTY",
    "BlobAssembler",
    "BlobPart",
    "BlobParts",
    "blob_parts",
    "parse_blob_part",
]

MAX_BLOB_PARTS: Final = 4096
"""The most parts one blob is cut into (a broker limit that needs more is refused)."""

MODEL_PART_PROPERTY: Final = "fedtier-part"
"""The MQTT v5 user property on every part: ``<index> <count> <blob size> <sha256 hex>``."""


@dataclass(frozen=True, slots=True)
class BlobPart:
    """What one part's property says."""

    index: int
    count: int
    size: int
    digest: str

    @property
    def key(self) -> tuple[str, int, int]:
        """Parts of one blob share it."""
        return (self.digest, self.count, self.size)


class BlobParts(Sequence[tuple[dict[str, str], bytes]]):
    """The parts of one blob, each ``(property, bytes)``; a part's bytes are cut when it is taken.

    A relay that publishes the parts one after the other so holds one part
    besides the blob, never a second copy of the whole blob.
    """

    __slots__ = ("_blob", "_count", "_digest", "_part_bytes")

    def __init__(self, blob: bytes, part_bytes: int) -> None:
        self._blob = blob
        self._part_bytes = part_bytes
        self._count = -(-len(blob) // part_bytes)
        self._digest = hashlib.sha256(blob).hexdigest()

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> tuple[dict[str, str], bytes]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[dict[str, str], bytes]]: ...

    def __getitem__(
        self, index: int | slice
    ) -> tuple[dict[str, str], bytes] | list[tuple[dict[str, str], bytes]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(f"part {index} of a blob of {self._count} parts")
        start = index * self._part_bytes
        prop = f"{index} {self._count} {len(self._blob)} {self._digest}"
        return {MODEL_PART_PROPERTY: prop}, self._blob[start : start + self._part_bytes]


def blob_parts(blob: bytes, part_bytes: int) -> BlobParts:
    """Cut ``blob`` into parts of at most ``part_bytes`` bytes, each with its property.

    Raises:
        LocalProtocolError: ``part_bytes`` below 1, or an empty blob.
    """
    if part_bytes < 1:
        raise LocalProtocolError(f"part size must be >= 1 byte, got {part_bytes}")
    if not blob:
        raise LocalProtocolError("an empty blob has no parts")
    return BlobParts(blob, part_bytes)


def parse_blob_part(properties: Mapping[str, str]) -> BlobPart:
    """Read a part's ``fedtier-part`` property.

    Raises:
        DecodeError: missing or malformed.
    """
    raw = properties.get(MODEL_PART_PROPERTY)
    if raw is None:
        raise DecodeError(f"a model blob part without its {MODEL_PART_PROPERTY} property")
    fields_ = raw.split(" ")
    try:
        if len(fields_) != 4:
            raise ValueError("four fields")
        index, count, size = int(fields_[0]), int(fields_[1]), int(fields_[2])
        digest = fields_[3]
        if not (0 <= index < count <= MAX_BLOB_PARTS) or size < count or len(digest) != 64:
            raise ValueError("ranges")
        int(digest, 16)
    except ValueError as exc:
        raise DecodeError(
            f"bad {MODEL_PART_PROPERTY} property {raw[:120]!r} on a model blob part"
        ) from exc
    return BlobPart(index, count, size, digest)


@dataclass(slots=True)
class _Assembly:
    part: BlobPart
    chunks: dict[int, bytes] = field(default_factory=dict)


class BlobAssembler:
    """Joins retained blob parts into whole blobs, bounded in bytes and in blobs at once."""

    def __init__(self, max_blob_bytes: int, *, slots: int = 3) -> None:
        if slots < 1:
            raise LocalProtocolError(f"slots must be >= 1, got {slots}")
        self.max_blob_bytes = max_blob_bytes
        self.slots = slots
        self._assemblies: OrderedDict[tuple[str, int, int], _Assembly] = OrderedDict()

    @property
    def pending(self) -> int:
        """Blobs with some parts and not all."""
        return len(self._assemblies)

    def offer(self, topic_index: int, properties: Mapping[str, str], data: bytes) -> bytes | None:
        """File one part; return the whole blob once its last part is in.

        Args:
            topic_index: the ``<i>`` of the topic it came on (must match the property).
            properties: the message's user properties.
            data: the part's bytes.

        Raises:
            DecodeError: a malformed property, a part on the wrong topic, parts
                holding more bytes than the blob they name, or joined bytes
                that do not match its size and digest; the part (or that blob's
                assembly) is dropped, the others kept.
            LimitExceeded: a blob above ``max_blob_bytes``.
        """
        part = parse_blob_part(properties)
        if part.index != topic_index:
            raise DecodeError(
                f"model blob part {part.index} of {part.count} arrived on part topic {topic_index}"
            )
        if part.size > self.max_blob_bytes:
            raise LimitExceeded(
                f"a model blob of {part.size:,} bytes is above this device's limit "
                f"of {self.max_blob_bytes:,} (limits.max_envelope_bytes)"
            )
        assembly = self._assemblies.get(part.key)
        if assembly is None:
            assembly = self._assemblies[part.key] = _Assembly(part)
            while len(self._assemblies) > self.slots:
                self._assemblies.popitem(last=False)  # the oldest started goes first
        else:
            self._assemblies.move_to_end(part.key)
        held = sum(len(c) for i, c in assembly.chunks.items() if i != part.index)
        if held + len(data) > part.size:
            del self._assemblies[part.key]
            raise DecodeError(
                f"the parts of a model blob hold more than the {part.size:,} bytes they name"
            )
        assembly.chunks[part.index] = bytes(data)
        if len(assembly.chunks) < part.count:
            return None
        del self._assemblies[part.key]
        blob = b"".join(assembly.chunks[i] for i in range(part.count))
        if len(blob) != part.size or hashlib.sha256(blob).hexdigest() != part.digest:
            raise DecodeError(
                f"the {part.count} parts of a model blob do not join into the "
                f"{part.size:,} bytes with SHA-256 {part.digest[:16]}... they name"
            )
        return blob
