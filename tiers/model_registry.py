"""Where signed model versions and key documents live for the tiers: memory and NATS registries.

Imports trio, protocol and ``tiers.registry`` only; the NATS implementation takes
the KV bucket and object store handles ``protocol.bus`` gives out, whose types it
names for the type checker only, so this module never imports nats-py or
trio-asyncio.

The registry holds two kinds of signed envelopes, both written by the central:
the *pointer* (a ``model`` message) of the current version under one key, and
each version's *blob* (a ``model_blob`` message) under ``v<version>``. Readers
verify both against the central keys they accept; the registry is not trusted.

One writer per fleet is enforced here, not by convention: the pointer moves only
by compare-and-set on the revision the writer read (``replace_current``), and a
blob is never overwritten by different bytes (``put_blob`` raises
``RegistryConflict``). The central decides what a read pointer means (it alone
holds the key that verifies it and the store that says what it wrote).

Beside the models the registry holds the fleet's key documents, both signed and
so again not trusted: the certificate of each central key (KV key
``cert.<key_id>``), which a follower pinning the fleet root fetches when a
pointer names a key it does not know, and the current revocation list (KV key
``revocations``), which every tier polls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from fedtier.protocol.certificates import RevocationList, open_revocations
from fedtier.protocol.errors import (
    BusError,
    KvConflict,
    ObjectNotFound,
    RegistryConflict,
    RemoteProtocolError,
)
from fedtier.protocol.identity import VerifyKey
from fedtier.protocol.names import NatsSubjects
from fedtier.tiers.registry import TierKeys

if TYPE_CHECKING:
    # For the type checker only: importing the NATS bus at run time would
    # import trio-asyncio, which slows asyncio for the whole process.
    from fedtier.protocol.bus import KvBucket, KvEntry, ObjectStore

__all__ = [
    "REVOCATIONS_KEY",
    "MemoryModelRegistry",
    "ModelRegistryReader",
    "ModelRegistryWriter",
    "NatsModelRegistry",
    "RevocationFollower",
    "certificate_key",
    "record_object",
]

CURRENT_KEY = "current"
REVOCATIONS_KEY = "revocations"


def record_object(version: int) -> str:
    """The object name of the version record of ``version``: beside its blob ``v<version>``."""
    return f"{NatsSubjects.blob_object(version)}.record"


def certificate_key(key_id: str) -> str:
    """The KV key of the certificate of central key ``key_id``."""
    return f"cert.{key_id}"


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

    async def certificate(self, key_id: str) -> bytes | None:
        """The certificate of central key ``key_id`` as the central published it, or None."""

    async def revocations(self) -> bytes | None:
        """The fleet's current signed revocation list, or None when none was published."""


class ModelRegistryWriter(ModelRegistryReader, Protocol):
    """Write access (the central)."""

    async def current_entry(self) -> tuple[bytes, int] | None:
        """The current pointer and its revision (for ``replace_current``), or None.

        The pointer is empty (with the delete's revision) when someone deleted it.
        """

    async def put_blob(self, version: int, envelope: bytes) -> None:
        """Store the signed blob of ``version``; the same bytes again is a no-op.

        Raises:
            RegistryConflict: the registry holds different bytes for ``version``.
        """

    async def replace_current(self, pointer: bytes, last_revision: int) -> int:
        """Make ``pointer`` current if ``last_revision`` is still the latest; return the new one.

        ``last_revision=0`` means "only if there is no pointer yet".

        Raises:
            KvConflict: the pointer changed since ``last_revision`` was read.
        """

    async def delete_blob(self, version: int) -> None:
        """Remove the blob of an old ``version`` (retention); absent already is fine."""

    async def put_record(self, version: int, record: bytes) -> None:
        """Store the signed version record of ``version`` (``tiers._version_record``).

        Written before the pointer moves to ``version``, so a standby central
        that reads the pointer finds the record. Rewriting it is allowed (the
        bytes of a retried publication are the same; the pointer decides).
        """

    async def record(self, version: int) -> bytes | None:
        """The version record of ``version``, or None when the registry does not hold it."""

    async def delete_record(self, version: int) -> None:
        """Remove the version record of an old ``version``; absent already is fine."""

    async def put_certificate(self, key_id: str, certificate: bytes) -> None:
        """Publish the certificate of central key ``key_id`` (readers verify it)."""

    async def put_revocations(self, revocations: bytes) -> None:
        """Publish a signed revocation list (readers verify it and keep the highest serial)."""


class MemoryModelRegistry:
    """A registry in process memory, for tests and the in-process simulator."""

    def __init__(self) -> None:
        self._blobs: dict[int, bytes] = {}
        self._records: dict[int, bytes] = {}
        self._documents: dict[str, bytes] = {}
        self._current: tuple[int, bytes] | None = None
        self._revision = 0
        self._changed = trio.Event()

    async def current_pointer(self) -> bytes | None:
        """See ``ModelRegistryReader``."""
        await trio.lowlevel.checkpoint()
        return None if self._current is None else self._current[1]

    async def blob(self, version: int) -> bytes | None:
        """See ``ModelRegistryReader``."""
        await trio.lowlevel.checkpoint()
        return self._blobs.get(version)

    async def current_entry(self) -> tuple[bytes, int] | None:
        """See ``ModelRegistryWriter``."""
        await trio.lowlevel.checkpoint()
        return None if self._current is None else (self._current[1], self._revision)

    async def certificate(self, key_id: str) -> bytes | None:
        """See ``ModelRegistryReader``."""
        await trio.lowlevel.checkpoint()
        return self._documents.get(certificate_key(key_id))

    async def revocations(self) -> bytes | None:
        """See ``ModelRegistryReader``."""
        await trio.lowlevel.checkpoint()
        return self._documents.get(REVOCATIONS_KEY)

    async def put_certificate(self, key_id: str, certificate: bytes) -> None:
        """See ``ModelRegistryWriter``."""
        await trio.lowlevel.checkpoint()
        self._documents[certificate_key(key_id)] = bytes(certificate)

    async def put_revocations(self, revocations: bytes) -> None:
        """See ``ModelRegistryWriter``."""
        await trio.lowlevel.checkpoint()
        self._documents[REVOCATIONS_KEY] = bytes(revocations)

    async def put_blob(self, version: int, envelope: bytes) -> None:
        """See ``ModelRegistryWriter``."""
        await trio.lowlevel.checkpoint()
        held = self._blobs.get(version)
        if held is not None and held != envelope:
            raise RegistryConflict(_blob_conflict(version))
        self._blobs[version] = bytes(envelope)

    async def delete_blob(self, version: int) -> None:
        """See ``ModelRegistryWriter``."""
        await trio.lowlevel.checkpoint()
        self._blobs.pop(version, None)

    async def put_record(self, version: int, record: bytes) -> None:
        """See ``ModelRegistryWriter``."""
        await trio.lowlevel.checkpoint()
        self._records[version] = bytes(record)

    async def record(self, version: int) -> bytes | None:
        """See ``ModelRegistryWriter``."""
        await trio.lowlevel.checkpoint()
        return self._records.get(version)

    async def delete_record(self, version: int) -> None:
        """See ``ModelRegistryWriter``."""
        await trio.lowlevel.checkpoint()
        self._records.pop(version, None)

    async def replace_current(self, pointer: bytes, last_revision: int) -> int:
        """See ``ModelRegistryWriter``."""
        await trio.lowlevel.checkpoint()
        if last_revision != (0 if self._current is None else self._revision):
            raise KvConflict(f"registry pointer changed since revision {last_revision}")
        self._set(None, pointer)
        return self._revision

    async def put_current(self, version: int, pointer: bytes) -> None:
        """Make ``pointer`` current unconditionally: tests and benches standing in for a central.

        An older version never replaces a newer one.
        """
        await trio.lowlevel.checkpoint()
        if self._current is not None and self._current[0] > version:
            return
        self._set(version, pointer)

    def _set(self, version: int | None, pointer: bytes) -> None:
        known = -1 if self._current is None else self._current[0]
        self._current = (known + 1 if version is None else version, bytes(pointer))
        self._revision += 1
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
        # A record holds the optimizer's arrays (FedAdam: two model-sized vectors)
        # and recent lineage, so it may be a few times the blob.
        self._max_record_bytes = None if max_blob_bytes is None else 4 * max_blob_bytes

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

    async def current_entry(self) -> tuple[bytes, int] | None:
        """See ``ModelRegistryWriter``."""
        entry = await self._kv.entry(CURRENT_KEY)
        return None if entry is None else (entry.value, entry.revision)

    async def certificate(self, key_id: str) -> bytes | None:
        """See ``ModelRegistryReader``."""
        entry = await self._kv.get(certificate_key(key_id))
        return None if entry is None or not entry[0] else entry[0]

    async def revocations(self) -> bytes | None:
        """See ``ModelRegistryReader``."""
        entry = await self._kv.get(REVOCATIONS_KEY)
        return None if entry is None or not entry[0] else entry[0]

    async def put_certificate(self, key_id: str, certificate: bytes) -> None:
        """See ``ModelRegistryWriter``."""
        await self._kv.put(certificate_key(key_id), certificate)

    async def put_revocations(self, revocations: bytes) -> None:
        """See ``ModelRegistryWriter``."""
        await self._kv.put(REVOCATIONS_KEY, revocations)

    async def put_blob(self, version: int, envelope: bytes) -> None:
        """See ``ModelRegistryWriter``.

        The object store has no compare-and-set, so two writers racing on one
        version can still both write; the pointer's compare-and-set is what
        decides, and the loser stops before it moves the pointer. Reading first
        closes the common cases: a retry, a restart, a second central started
        later.
        """
        held = await self.blob(version)
        if held is not None:
            if held != envelope:
                raise RegistryConflict(_blob_conflict(version))
            return
        await self._objects.put(NatsSubjects.blob_object(version), envelope)

    async def delete_blob(self, version: int) -> None:
        """See ``ModelRegistryWriter``."""
        await self._objects.delete(NatsSubjects.blob_object(version))

    async def put_record(self, version: int, record: bytes) -> None:
        """See ``ModelRegistryWriter``: object ``v<version>.record`` beside the blob."""
        await self._objects.put(record_object(version), record)

    async def record(self, version: int) -> bytes | None:
        """See ``ModelRegistryWriter``."""
        try:
            return await self._objects.get(
                record_object(version), max_size_bytes=self._max_record_bytes
            )
        except ObjectNotFound:
            return None

    async def delete_record(self, version: int) -> None:
        """See ``ModelRegistryWriter``."""
        await self._objects.delete(record_object(version))

    async def replace_current(self, pointer: bytes, last_revision: int) -> int:
        """See ``ModelRegistryWriter``: a KV update on the current key's revision."""
        return await self._kv.update(CURRENT_KEY, pointer, last_revision)

    @asynccontextmanager
    async def watch_pointers(self) -> AsyncIterator[AsyncIterator[bytes]]:
        """See ``ModelRegistryReader``: a KV watch on the current key."""
        async with self._kv.watch(CURRENT_KEY) as watch:
            yield _KvPointerWatch(watch)


def _blob_conflict(version: int) -> str:
    return (
        f"the model registry already holds different bytes for v{version}: another "
        "central writes to this fleet's registry, or this central's store is behind it"
    )


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


class RevocationFollower:
    """Keeps the newest verified revocation list of a fleet and applies it to a daemon's keys.

    Lists come from a file (``[keys] revocations``) and from the registry
    (KV key ``revocations``); one signed by the fleet root or by a central key
    the daemon accepts, for its fleet, with a serial above the one in force,
    replaces it and applies at once to the sender registry and the model
    signers. A list never goes backwards (an old file or a replayed KV value
    changes nothing), and one that fails to verify is logged and ignored.

    Args:
        keys: the daemon's keys; their ``senders`` and ``models`` get the list.
        fleet: the fleet token lists must name.
        registry: where the fleet's list is published.
        path: the list file, None for none.
        poll_s: seconds between reads: the bound on how late a revocation applies.
        log: the daemon's logger.
        publish: the registry writer when this daemon publishes the file's list
            for the fleet (the central), else None.
    """

    def __init__(
        self,
        keys: TierKeys,
        *,
        fleet: str,
        registry: ModelRegistryReader,
        path: Path | None,
        poll_s: float,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
        publish: ModelRegistryWriter | None = None,
    ) -> None:
        self.keys = keys
        self.fleet = fleet
        self.registry = registry
        self.path = path
        self.poll_s = poll_s
        self.log = log
        self.publish = publish
        self.current: RevocationList | None = None
        self._current_bytes = b""
        self._refused: set[bytes] = set()
        self._file_error: str | None = None
        self._overdue_warned = 0

    def _signers(self) -> dict[str, VerifyKey]:
        signers = {key.key_id: key for key in self.keys.models.pinned}
        signers.update({c.key_id: c.verify_key for c in self.keys.models.certificates})
        if self.keys.root is not None:
            signers[self.keys.root.key_id] = self.keys.root
        return signers

    def offer(self, data: bytes, where: str) -> bool:
        """Apply ``data`` if it is a valid list newer than the one in force; True if applied."""
        if data == self._current_bytes or data in self._refused:
            return False
        try:
            revocations = open_revocations(data, self._signers(), self.fleet)
        except RemoteProtocolError as exc:
            self._refused.add(data)
            self.log.warning("ignored the revocation list from %s: %s", where, exc)
            return False
        if self.current is not None and revocations.serial <= self.current.serial:
            return False
        self.current, self._current_bytes = revocations, data
        self.keys.senders.set_revocations(revocations)
        self.keys.models.set_revocations(revocations)
        self.log.warning(
            "revocation list %d from %s in force: %d keys and %d names revoked",
            revocations.serial,
            where,
            len(revocations.key_ids),
            len(revocations.names),
        )
        return True

    async def poll_once(self) -> None:
        """Read the file and the registry once; publish the file's list when it is newer."""
        if self.path is not None:
            try:
                data = await trio.Path(self.path).read_bytes()
            except OSError as exc:
                if exc.strerror != self._file_error:  # once per cause, not every poll
                    self.log.warning("cannot read revocation list %s: %s", self.path, exc.strerror)
                self._file_error = exc.strerror
            else:
                self._file_error = None
                self.offer(data, str(self.path))
        try:
            published = await self.registry.revocations()
            if published is not None:
                self.offer(published, "the model registry")
            if (
                self.publish is not None
                and self._current_bytes
                and published != self._current_bytes
            ):
                await self.publish.put_revocations(self._current_bytes)
        except BusError as exc:
            self.log.warning("cannot read or publish the fleet's revocation list: %s", exc)
        current = self.current
        now_ms = time.time_ns() // 1_000_000
        if (
            current is not None
            and self._overdue_warned != current.serial
            and current.overdue(now_ms)
        ):
            # Still enforced: an overdue list is stale, never void.
            self._overdue_warned = current.serial
            self.log.warning(
                "revocation list %d was due to be replaced at %d ms; still enforcing it",
                current.serial,
                current.next_update_ms,
            )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll every ``poll_s``; started once the first poll applied what it found."""
        await self.poll_once()
        task_status.started()
        while True:
            await trio.sleep(self.poll_s)
            await self.poll_once()
