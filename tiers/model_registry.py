"""Where signed model versions live for the tiers: the interface, an in-memory and a NATS one.

Imports trio and protocol only; the NATS implementation takes the KV bucket and
object store handles ``protocol.bus`` gives out, whose types it names for the
type checker only, so this module never imports nats-py or trio-asyncio.

The registry holds two kinds of signed envelopes, both written by the central:
the *pointer* (a ``model`` message) of the current version under one key, and
each version's *blob* (a ``model_blob`` message) under ``v<version>``. Readers
verify both against the pinned central key; the registry is not trusted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Protocol

import trio

from fedtier.protocol.errors import ObjectNotFound
from fedtier.protocol.names import NatsSubjects

if TYPE_CHECKING:
    # For the type checker only: importing the NATS bus at run time would
    # import trio-asyncio, which slows asyncio for the whole process.
    from fedtier.protocol.bus import KvBucket, KvEntry, ObjectStore

__all__ = [
    "MemoryModelRegistry",
    "ModelRegistryReader",
    "ModelRegistryWriter",
    "NatsModelRegistry",
]

CURRENT_KEY = "current"


class ModelRegistryReader(Protocol):
    """Read access to the model registry (edges and regional daemons)."""

    async def current_pointer(self) -> bytes | None:
        """The signed pointer of the current version, or None before version 0 exists."""

    async def blob(self, version: int) -> bytes | None:
        """The signed blob of ``version``, or None when the registry does not hold it."""

    def watch_pointers(self) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Yield the current pointer (when there is one), then each newer pointer.

        A slow reader skips intermediate pointers: only the newest matters.
        """


class ModelRegistryWriter(ModelRegistryReader, Protocol):
    """Write access (the central)."""

    async def put_blob(self, version: int, envelope: bytes) -> None:
        """Store the signed blob of ``version`` (idempotent)."""

    async def put_current(self, version: int, pointer: bytes) -> None:
        """Make ``pointer`` (of ``version``) the current one (idempotent)."""


class MemoryModelRegistry:
    """A registry in process memory, for tests and the in-process simulator."""

    def __init__(self) -> None:
        self._blobs: dict[int, bytes] = {}
        self._current: tuple[int, bytes] | None = None
        self._changed = trio.Event()

    async def current_pointer(self) -> bytes | None:
        """See ``ModelRegistryReader``."""
        await trio.lowlevel.checkpoint()
        return None if self._current is None else self._current[1]

    async def blob(self, version: int) -> bytes | None:
        """See ``ModelRegistryReader``."""
        await trio.lowlevel.checkpoint()
        return self._blobs.get(version)

    async def put_blob(self, version: int, envelope: bytes) -> None:
        """See ``ModelRegistryWriter``."""
        await trio.lowlevel.checkpoint()
        self._blobs[version] = bytes(envelope)

    async def put_current(self, version: int, pointer: bytes) -> None:
        """See ``ModelRegistryWriter``; an older version never replaces a newer one."""
        await trio.lowlevel.checkpoint()
        if self._current is not None and self._current[0] > version:
            return
        self._current = (version, bytes(pointer))
        self._changed.set()
        self._changed = trio.Event()

    @asynccontextmanager
    async def watch_pointers(self) -> AsyncIterator[AsyncIterator[bytes]]:
        """See ``ModelRegistryReader``: newest wins, nothing queues up."""
        await trio.lowlevel.checkpoint()
        yield _MemoryPointerWatch(self)


class _MemoryPointerWatch:
    """Yields the registry's current pointer each time it changes (newest wins)."""

    def __init__(self, registry: MemoryModelRegistry) -> None:
        self._registry = registry
        self._seen: tuple[int, bytes] | None = None

    def __aiter__(self) -> _MemoryPointerWatch:
        return self

    async def __anext__(self) -> bytes:
        while True:
            current = self._registry._current
            if current is not None and current is not self._seen:
                self._seen = current
                await trio.lowlevel.checkpoint()
                return current[1]
            await self._registry._changed.wait()


class NatsModelRegistry:
    """The registry on NATS: pointer in the KV bucket, blobs in the object store.

    Args:
        kv: ``await nats_bus.kv_bucket(NatsSubjects(fleet).model_bucket())``.
        objects: ``await nats_bus.object_store(NatsSubjects(fleet).blob_store())``.
        max_blob_bytes: largest blob accepted from the object store.
    """

    def __init__(
        self, kv: KvBucket, objects: ObjectStore, *, max_blob_bytes: int | None = None
    ) -> None:
        self._kv = kv
        self._objects = objects
        self._max_blob_bytes = max_blob_bytes

    async def current_pointer(self) -> bytes | None:
        """See ``ModelRegistryReader``."""
        entry = await self._kv.get(CURRENT_KEY)
        return None if entry is None else entry[0]

    async def blob(self, version: int) -> bytes | None:
        """See ``ModelRegistryReader``."""
        try:
            return await self._objects.get(
                NatsSubjects.blob_object(version), max_size_bytes=self._max_blob_bytes
            )
        except ObjectNotFound:
            return None

    async def put_blob(self, version: int, envelope: bytes) -> None:
        """See ``ModelRegistryWriter``."""
        await self._objects.put(NatsSubjects.blob_object(version), envelope)

    async def put_current(self, version: int, pointer: bytes) -> None:
        """See ``ModelRegistryWriter`` (readers ignore a pointer older than what they know)."""
        await self._kv.put(CURRENT_KEY, pointer)

    @asynccontextmanager
    async def watch_pointers(self) -> AsyncIterator[AsyncIterator[bytes]]:
        """See ``ModelRegistryReader``: a KV watch on the current key."""
        async with self._kv.watch(CURRENT_KEY) as watch:
            yield _KvPointerWatch(watch)


class _KvPointerWatch:
    """Values of a KV watch, skipping deletes and the empty initial marker."""

    def __init__(self, watch: AsyncIterator[KvEntry]) -> None:
        self._watch = watch

    def __aiter__(self) -> _KvPointerWatch:
        return self

    async def __anext__(self) -> bytes:
        while True:
            entry = await self._watch.__anext__()
            if not entry.deleted and entry.value:
                return entry.value
