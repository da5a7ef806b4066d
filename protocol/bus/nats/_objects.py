"""The JetStream object store, trio-facing; imports the bus module for typing only.

Opened by ``NatsBus.object_store``: puts run shielded and clean up after
themselves, gets read chunk by chunk and check the digest, because nats-py's
own put and get misbehave on cancellation (docs/transport.md, NATS, rule 11).
"""

from __future__ import annotations

import base64
import hashlib
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.js.api
import nats.js.errors
import nats.js.object_store
import trio

from fedtier.protocol.bus.nats._bridge import _aio, _boundary
from fedtier.protocol.bus.nats._connection import _aio_check_stream_storage
from fedtier.protocol.bus.nats._refusals import _refusals, _RefusalWatch
from fedtier.protocol.errors import (
    BusError,
    BusUnavailable,
    DigestMismatch,
    LimitExceeded,
    LocalProtocolError,
    ObjectNotFound,
    PublishError,
)

if TYPE_CHECKING:
    from fedtier.protocol.bus.nats._bus import NatsBus

logger = logging.getLogger("fedtier.protocol.bus.nats")


@dataclass(frozen=True, slots=True)
class StoredObject:
    """What the object store recorded for a put.

    Attributes:
        name: object name.
        size_bytes: stored size.
        digest: ``SHA-256=<base64url>`` as the object store writes it.
    """

    name: str
    size_bytes: int
    digest: str


def _object_names(bucket: str) -> list[str]:
    # Its subjects are $O.<bucket>.C.<nuid> and $O.<bucket>.M.<name>, its stream OBJ_<bucket>.
    return [bucket, f"OBJ_{bucket}"]


async def _aio_object_store(js: Any, name: str, replicas: int) -> Any:
    stream = _object_names(name)[1]
    try:
        obs = await js.object_store(name)
    except nats.js.errors.NotFoundError:
        pass
    else:
        # Made by someone else, maybe before the cluster grew: refuse fewer copies.
        await _aio_check_stream_storage(js, stream, replicas)
        return obs
    try:
        return await js.create_object_store(
            name, storage=nats.js.api.StorageType.FILE, replicas=replicas
        )
    except nats.js.errors.APIError:
        obs = await js.object_store(name)
        await _aio_check_stream_storage(js, stream, replicas)
        return obs


async def _aio_object_previous_nuid(js: Any, bucket: str, name: str) -> str | None:
    obs = await js.object_store(bucket)
    try:
        info = await obs.get_info(name)
    except nats.js.errors.NotFoundError:
        return None
    return str(info.nuid) if not info.deleted else None


async def _aio_object_delete(js: Any, bucket: str, name: str) -> bool:
    obs = await js.object_store(bucket)
    try:
        await obs.delete(name)
    except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
        return False
    return True


async def _aio_object_put(js: Any, bucket: str, name: str, data: bytes) -> tuple[int, str]:
    obs = await js.object_store(bucket)
    # nats-py's default chunk (128 KiB) is one message: above a server's
    # max_payload every put would fail, so a chunk leaves room for headers.
    max_payload = int(js._nc.max_payload)
    chunk = max(1024, min(nats.js.object_store.OBJ_DEFAULT_CHUNK_SIZE, max_payload - 1024))
    meta = nats.js.api.ObjectMeta(
        name=name, options=nats.js.api.ObjectMetaOptions(max_chunk_size=chunk)
    )
    info = await obs.put(name, data, meta=meta)
    return int(info.size), str(info.digest)


async def _aio_object_sweep(js: Any, bucket: str, name: str, previous_nuid: str | None) -> int:
    """Remove what a failed put may have left; return how many chunk subjects were purged.

    nats-py's put purges its chunks on an error but not on cancellation, and
    purges them even when its meta may have been stored (a lost PubAck).
    Chunk subjects no object refers to are purged; an object named ``name``
    that the failed put wrote but whose chunks are gone is deleted.
    """
    obs = await js.object_store(bucket)
    stream = nats.js.object_store.OBJ_STREAM_TEMPLATE.format(bucket=bucket)
    chunk_filter = nats.js.object_store.OBJ_ALL_CHUNKS_PRE_TEMPLATE.format(bucket=bucket)
    info = await js.stream_info(stream, subjects_filter=chunk_filter)
    chunk_subjects = set((info.state.subjects or {}).keys())
    try:
        objects = await obs.list(ignore_deletes=True)
    except nats.js.errors.NotFoundError:
        objects = []

    def chunks_of(nuid: str) -> str:
        return str(nats.js.object_store.OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=nuid))

    for obj in objects:
        if (
            obj.name == name
            and obj.nuid != previous_nuid
            and obj.size
            and chunks_of(obj.nuid) not in chunk_subjects
        ):
            await obs.delete(name)
    referenced = {chunks_of(obj.nuid) for obj in objects}
    orphans = sorted(chunk_subjects - referenced)
    for subject in orphans:
        await js.purge_stream(stream, subject=subject)
    return len(orphans)


async def _aio_object_get(js: Any, bucket: str, name: str, max_size_bytes: int | None) -> bytes:
    """Read an object chunk by chunk with direct gets, checking its size and digest.

    Not nats-py's get: that one has no timeout, leaks its ordered-consumer
    subscription when cancelled, and copies quadratically without
    ``writeinto``. Here every step is one request with a timeout, so a
    cancelled get leaves nothing behind. Our own errors raised here cross the
    bridge unchanged.
    """
    action = f"object get {bucket}/{name}"
    obs = await js.object_store(bucket)
    try:
        info = await obs.get_info(name)
    except nats.js.errors.NotFoundError as exc:
        raise ObjectNotFound(f"{action}: no such object") from exc
    if info.is_link():
        raise LocalProtocolError(f"{action}: the object is a link; links are not supported")
    size = int(info.size or 0)
    if max_size_bytes is not None and size > max_size_bytes:
        raise LimitExceeded(f"{action}: object has {size} bytes, above the cap {max_size_bytes}")
    if size == 0:
        return b""
    stream = nats.js.object_store.OBJ_STREAM_TEMPLATE.format(bucket=bucket)
    subject = nats.js.object_store.OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=bucket, obj=info.nuid)
    buf = bytearray()
    digest = hashlib.sha256()
    seq = 1
    for _ in range(int(info.chunks or 0)):
        try:
            raw = await js.get_msg(stream, seq=seq, subject=subject, next=True, direct=True)
        except nats.js.errors.NotFoundError as exc:
            raise DigestMismatch(f"{action}: a chunk is missing from the store") from exc
        chunk = raw.data or b""
        buf += chunk
        digest.update(chunk)
        seq = int(raw.seq) + 1
        if len(buf) > size:
            break
    expected = str(info.digest or "")
    _, _, encoded = expected.partition("=")
    if len(buf) != size or digest.digest() != base64.urlsafe_b64decode(encoded):
        raise DigestMismatch(f"{action}: the bytes read do not match the stored digest {expected}")
    return bytes(buf)


class ObjectStore:
    """A JetStream object store bucket, trio-facing; from ``NatsBus.object_store``.

    Written by one process at a time (the central, for the model registry):
    the clean-up after a failed put removes chunks that no object refers to,
    which would include another writer's put in progress.
    """

    def __init__(self, bus: NatsBus, name: str) -> None:
        self._bus = bus
        self.name = name
        self._put_lock = trio.Lock()

    def _refusals(self, action: str, *, write: bool) -> AbstractContextManager[_RefusalWatch]:
        return _refusals(self._bus._conn.events, action, _object_names(self.name), write=write)

    async def put(self, name: str, data: bytes) -> StoredObject:
        """Store ``data`` as object ``name`` (replacing an older one of that name).

        Runs shielded from outside cancellation with its own deadline
        (``object_put_timeout_s``), because nats-py leaves orphan chunks when a
        put is cancelled; when it fails, what it left is removed. An outside
        cancellation takes effect at the next checkpoint after the put. The
        deadline is soft: on Python 3.11 ``asyncio.wait_for`` can swallow the
        cancellation, nats-py then finishes the put and this returns normally.

        Raises:
            PublishError: the put failed or timed out, retry it; or the server
                refused it (permissions), and nothing is swept.
        """
        action = f"object put {self.name}/{name} ({len(data)} bytes)"
        self._bus._check_open(action)
        config = self._bus._config
        js = self._bus._conn.js
        payload = bytes(data)
        async with self._put_lock:
            with trio.CancelScope(shield=True):
                previous: str | None = None
                failure: BusError | None = None
                refusal = _RefusalWatch(frozenset())
                with trio.move_on_after(config.object_put_timeout_s):
                    try:
                        with (
                            self._refusals(action, write=True) as refusal,
                            _boundary(action, outcome_unknown=True),
                        ):
                            previous = await _aio(_aio_object_previous_nuid, js, self.name, name)
                            size, digest = await _aio(_aio_object_put, js, self.name, name, payload)
                        return StoredObject(name=name, size_bytes=size, digest=digest)
                    except BusError as exc:
                        failure = exc
                if refusal.violation is not None:
                    # Nothing was stored, and a user that may not write here
                    # may not purge here either: no sweep.
                    assert failure is not None
                    raise failure
                await self._sweep(action, name, previous)
        if failure is None:
            raise PublishError(f"{action}: not done within {config.object_put_timeout_s} s; retry")
        raise PublishError(f"{action} failed ({failure}); retry") from failure

    async def _sweep(self, action: str, name: str, previous_nuid: str | None) -> None:
        with trio.move_on_after(self._bus._config.close_timeout_s * 2):
            try:
                with _boundary(f"clean up after {action}"):
                    purged = await _aio(
                        _aio_object_sweep, self._bus._conn.js, self.name, name, previous_nuid
                    )
            except BusError as exc:
                logger.warning("clean-up after a failed %s failed too: %s", action, exc)
                return
        if purged:
            logger.warning("%s failed; purged %d orphan chunk sets", action, purged)

    async def delete(self, name: str) -> bool:
        """Delete object ``name``: its chunks are purged, its meta marked deleted.

        Returns False when there was no such object (a retry of a delete that
        went through is not an error).

        Raises:
            PublishError: the server did not confirm; retry.
        """
        action = f"object delete {self.name}/{name}"
        self._bus._check_open(action)
        with self._refusals(action, write=True), _boundary(action, outcome_unknown=True):
            deleted: bool = await _aio(_aio_object_delete, self._bus._conn.js, self.name, name)
        return deleted

    async def get(self, name: str, *, max_size_bytes: int | None = None) -> bytes:
        """Return the bytes of object ``name``, checked against its stored SHA-256.

        Bounded by ``object_get_timeout_s``; cancellation leaves nothing behind.

        Raises:
            ObjectNotFound: no such object.
            LimitExceeded: the object is larger than ``max_size_bytes``.
            DigestMismatch: the bytes read do not match the stored digest.
            BusUnavailable: the reads timed out or the connection is down.
        """
        action = f"object get {self.name}/{name}"
        self._bus._check_open(action)
        timeout_s = self._bus._config.object_get_timeout_s
        try:
            with trio.fail_after(timeout_s), self._refusals(action, write=False), _boundary(action):
                return await _aio(
                    _aio_object_get, self._bus._conn.js, self.name, name, max_size_bytes
                )
        except trio.TooSlowError as exc:
            raise BusUnavailable(f"{action}: not done within {timeout_s} s") from exc
