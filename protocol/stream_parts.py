"""A payload above nats-server's ``max_payload`` as numbered parts on its stream; sans-IO.

nats-server refuses a message above ``max_payload`` (8 MB in the shipped
configs, 64 MB at most), while a partial of a large model is hundreds of MB.
``NatsBus.publish`` therefore splits such a payload into parts and publishes
them, in order, to the same subject and stream, each with its own
``Nats-Msg-Id`` (``<msg id>#<index>/<count>``) and the headers below; a
durable subscription holds the parts it fetched until every one of a whole
has arrived, checks the size and SHA-256, and hands the subscriber one
``Delivery`` whose ack acknowledges every part.

Why parts on the same stream rather than an object store (the model
registry's blobs do use one): the parts inherit everything the stream and its
consumer already guarantee (msg id dedupe for a retried publish, work-queue
retention that deletes them once acknowledged, ``max_deliver`` and the
dead-letter path, in-progress acks while held, the users' permissions), with
no second store whose objects need their own clean-up and grants.

A publish that fails part-way is retried whole with the same msg id, as any
publish: the parts already stored are duplicates inside the dedupe window,
and past it the consumer keeps the first copy of each index and acknowledges
the repeats. Parts of a whole that never completes (its publisher gave up)
stay unacknowledged, are redelivered after ``max_hold_s`` and ``ack_wait``,
and end on the dead-letter path after ``max_deliver``: never acknowledged, so
never silently lost. What one subscription holds in incomplete wholes is
bounded in bytes; a part beyond the bound is given back with a delay.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from fedtier.protocol.errors import LocalProtocolError

__all__ = [
    "PART_HEADER",
    "PART_MARGIN_BYTES",
    "Completed",
    "Part",
    "PartsAssembly",
    "parse_part",
    "part_headers",
    "split",
]

PART_HEADER: Final = "Fedtier-Part"
"""``<index> <count> <whole size> <whole sha256 hex> <whole msg id>``, on every part."""

PART_MARGIN_BYTES: Final = 4096
"""Room left under ``max_payload`` for a part's headers (trace context, ids)."""


def split(payload: bytes, part_bytes: int) -> list[memoryview]:
    """Cut ``payload`` into views of at most ``part_bytes`` bytes, in order."""
    if part_bytes < 1:
        raise LocalProtocolError(f"part size must be >= 1 byte, got {part_bytes}")
    view = memoryview(payload)
    return [view[i : i + part_bytes] for i in range(0, len(payload), part_bytes)]


def part_headers(index: int, count: int, whole: bytes, digest: str, msg_id: str) -> str:
    """The value of ``PART_HEADER`` for part ``index`` of ``count``."""
    return f"{index} {count} {len(whole)} {digest} {msg_id}"


@dataclass(frozen=True, slots=True)
class Part:
    """What a part's header says about it and its whole."""

    index: int
    count: int
    whole_size: int
    digest: str
    msg_id: str

    @property
    def key(self) -> tuple[str, str, int]:
        """Parts of one whole share it (a whole republished with other bytes does not)."""
        return (self.msg_id, self.digest, self.count)


def parse_part(headers: Mapping[str, str] | None) -> Part | None:
    """The part a message's headers describe; None when it is not a part.

    Raises:
        LocalProtocolError: the header is there but does not parse: a
            publisher that is not this bus, or a forged message.
    """
    if not headers or PART_HEADER not in headers:
        return None
    raw = headers[PART_HEADER]
    fields_ = raw.split(" ")
    try:
        if len(fields_) != 5:
            raise ValueError("5 fields")
        index, count, size = int(fields_[0]), int(fields_[1]), int(fields_[2])
        digest, msg_id = fields_[3], fields_[4]
        if not (0 <= index < count) or size < count or len(digest) != 64 or not msg_id:
            raise ValueError("ranges")
        int(digest, 16)
    except ValueError as exc:
        raise LocalProtocolError(f"bad {PART_HEADER} header {raw[:120]!r}") from exc
    return Part(index, count, size, digest, msg_id)


@dataclass(slots=True)
class _Whole:
    part: Part
    started: float
    chunks: dict[int, bytes] = field(default_factory=dict)
    # Per index: the stream sequence of the copy held and its delivery token.
    held: dict[int, tuple[int, int]] = field(default_factory=dict)
    redelivered: bool = False
    subject: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def held_bytes(self) -> int:
        return sum(len(c) for c in self.chunks.values())

    @property
    def tokens(self) -> list[int]:
        return [token for _, token in self.held.values()]


@dataclass(frozen=True, slots=True)
class Completed:
    """A whole whose parts have all arrived."""

    subject: str
    payload: bytes
    headers: Mapping[str, str]
    redelivered: bool
    tokens: tuple[int, ...]
    intact: bool
    """False when the bytes do not match the size and digest the parts named."""


class PartsAssembly:
    """The incomplete wholes of one subscription, bounded in bytes.

    ``offer`` takes one fetched part (by its delivery token and stream
    sequence) and answers what to do with it: ``("held", None)`` (kept until
    its whole completes), ``("held", old)`` (a redelivery of the copy held
    under token ``old``, which is replaced: forget ``old`` without an ack),
    ``("repeat", None)`` (another stored copy of an index already held, from a
    publish retried past the dedupe window: acknowledge it, the first copy
    counts and stays in the stream until its whole is acknowledged),
    ``("later", None)`` (no room now: give it back with a delay) or
    ``("oversize", None)`` (its whole is above what this side assembles: never
    acknowledge). ``take_completed`` then returns a whole that is complete.
    """

    def __init__(self, max_whole_bytes: int, max_held_bytes: int) -> None:
        self.max_whole_bytes = max_whole_bytes
        self.max_held_bytes = max_held_bytes
        self._wholes: dict[tuple[str, str, int], _Whole] = {}
        self._reserved = 0

    @property
    def reserved_bytes(self) -> int:
        """The sizes of the wholes started and not complete yet: what they will hold."""
        return self._reserved

    def offer(
        self,
        part: Part,
        token: int,
        sequence: int,
        data: bytes,
        *,
        subject: str,
        headers: Mapping[str, str],
        redelivered: bool,
        now: float,
    ) -> tuple[str, int | None]:
        """File one part; see the class docstring for the answers."""
        if part.whole_size > self.max_whole_bytes:
            return "oversize", None
        whole = self._wholes.get(part.key)
        if whole is not None and part.index in whole.held:
            held_sequence, old_token = whole.held[part.index]
            if held_sequence != sequence:
                return "repeat", None
            whole.held[part.index] = (sequence, token)
            whole.redelivered = True
            return "held", old_token
        if whole is None:
            # A new whole is started only when all of it fits beside the wholes
            # already started, so those can always complete (one whole alone
            # is always taken, else a whole above the bound could never be).
            if self._wholes and self._reserved + part.whole_size > self.max_held_bytes:
                return "later", None
            whole = self._wholes[part.key] = _Whole(part, now)
            self._reserved += part.whole_size
        if len(data) > part.whole_size - whole.held_bytes:
            # More bytes than the whole was said to have: keep it out of memory;
            # the whole then fails its size check when the rest arrives.
            data = b""
        whole.chunks[part.index] = bytes(data)
        whole.held[part.index] = (sequence, token)
        whole.redelivered = whole.redelivered or redelivered
        if part.index == 0:
            whole.subject, whole.headers = subject, headers
        elif not whole.subject:
            whole.subject = subject
        return "held", None

    def take_completed(self, part: Part) -> Completed | None:
        """The whole ``part`` belongs to, removed, once every part of it is held."""
        whole = self._wholes.get(part.key)
        if whole is None or len(whole.chunks) < part.count:
            return None
        del self._wholes[part.key]
        self._reserved -= part.whole_size
        payload = b"".join(whole.chunks[i] for i in range(part.count))
        intact = (
            len(payload) == part.whole_size and hashlib.sha256(payload).hexdigest() == part.digest
        )
        return Completed(
            subject=whole.subject,
            payload=payload,
            headers=whole.headers,
            redelivered=whole.redelivered,
            tokens=tuple(whole.tokens),
            intact=intact,
        )

    def expire(self, started_before: float) -> list[int]:
        """Drop the wholes started before ``started_before``; return their tokens.

        Their parts are left to the server (no ack): redelivered after
        ``ack_wait`` they start the whole again, and a whole that never
        completes ends on the dead-letter path after ``max_deliver``.
        """
        tokens: list[int] = []
        for key, whole in list(self._wholes.items()):
            if whole.started < started_before:
                del self._wholes[key]
                self._reserved -= whole.part.whole_size
                tokens.extend(whole.tokens)
        return tokens

    def forget(self, tokens: set[int]) -> None:
        """Drop every incomplete whole holding one of ``tokens`` (given back on close)."""
        for key, whole in list(self._wholes.items()):
            if tokens.intersection(whole.tokens):
                del self._wholes[key]
                self._reserved -= whole.part.whole_size

    def clear(self) -> None:
        """Forget everything (the subscription closed and gave every part back)."""
        self._wholes.clear()
        self._reserved = 0
