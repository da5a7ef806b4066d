"""JetStream key-value buckets, trio-facing; imports the bus module for typing only.

Opened by ``NatsBus.kv_bucket``: get, entry, keys, put, delete, compare-and-set update, watch.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.js.api
import nats.js.errors
import trio

from fedtier.protocol.bus.nats._bridge import _aio, _boundary
from fedtier.protocol.bus.nats._connection import _aio_check_stream_storage
from fedtier.protocol.bus.nats._refusals import _refusals, _RefusalWatch
from fedtier.protocol.errors import BusError, KvConflict

if TYPE_CHECKING:
    from fedtier.protocol.bus.nats._bus import NatsBus

logger = logging.getLogger("fedtier.protocol.bus.nats")


@dataclass(frozen=True, slots=True)
class KvEntry:
    """One change seen by a KV watch.

    Attributes:
        key: the key.
        value: the new value; empty for a delete.
        revision: the stream sequence of this change.
        deleted: True when the key was deleted or purged.
    """

    key: str
    value: bytes
    revision: int
    deleted: bool = False


def _kv_names(bucket: str) -> list[str]:
    # Its subjects are $KV.<bucket>.<key>, its stream KV_<bucket>.
    return [bucket, f"KV_{bucket}"]


async def _aio_kv_bucket(
    js: Any, name: str, history: int, max_age_s: float | None, replicas: int
) -> Any:
    try:
        kv = await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        pass
    else:
        # Made by someone else, maybe before the cluster grew: refuse fewer copies.
        await _aio_check_stream_storage(js, _kv_names(name)[1], replicas)
        return kv
    try:
        # direct=True: reads use $JS.API.DIRECT.GET, which any replica answers
        # and which a read-only user can be granted on its own.
        return await js.create_key_value(
            bucket=name,
            history=history,
            storage=nats.js.api.StorageType.FILE,
            direct=True,
            ttl=max_age_s,
            replicas=replicas,
        )
    except nats.js.errors.APIError:
        # Another process created it between our two calls.
        kv = await js.key_value(name)
        await _aio_check_stream_storage(js, _kv_names(name)[1], replicas)
        return kv


async def _aio_kv_keys(kv: Any) -> list[str]:
    try:
        return [str(key) for key in await kv.keys()]
    except nats.js.errors.NoKeysError:
        return []


async def _aio_kv_get(kv: Any, key: str) -> tuple[bytes, int] | None:
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    return bytes(entry.value or b""), int(entry.revision)


async def _aio_kv_get_from_leader(js: Any, bucket: str, key: str) -> tuple[bytes, int] | None:
    # $JS.API.STREAM.MSG.GET is answered by the stream's leader, never by a
    # replica that has not caught up (a direct get may be, after a node restart).
    try:
        msg = await js.get_msg(f"KV_{bucket}", subject=f"$KV.{bucket}.{key}", direct=False)
    except nats.js.errors.NotFoundError:
        return None
    if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):
        return None
    return bytes(msg.data or b""), int(msg.seq)


async def _aio_kv_keys_from_leader(js: Any, bucket: str) -> list[str]:
    # STREAM.INFO with a subjects filter is answered by the stream's leader. It
    # lists a deleted key too (its marker is a message): a get says None for it.
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    subjects = info.state.subjects or {}
    return [subject[len(prefix) :] for subject in subjects if subject.startswith(prefix)]


async def _aio_kv_entry(kv: Any, key: str) -> KvEntry | None:
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError as exc:
        # nats-py turns "deleted" into "not found" but keeps the marker: a
        # compare-and-set that writes after a delete or purge must name the
        # marker's revision, not 0.
        marker = exc.entry
        if marker is None:
            return None
        return KvEntry(key=key, value=b"", revision=int(marker.revision), deleted=True)
    return KvEntry(key=key, value=bytes(entry.value or b""), revision=int(entry.revision))


_WATCH_STOPPED = object()


async def _aio_watch_next(watcher: Any) -> Any:
    async for entry in watcher:
        return entry
    return _WATCH_STOPPED


class KvWatch:
    """Changes to one key (or pattern) of a KV bucket: its current value first, then each change.

    Iterate with ``async for``; each step crosses the bridge once.
    """

    def __init__(self, watcher: Any, label: str) -> None:
        self._watcher = watcher
        self._label = label
        self._stopped = False

    def __aiter__(self) -> KvWatch:
        return self

    async def __anext__(self) -> KvEntry:
        while True:
            if self._stopped:
                raise StopAsyncIteration
            with _boundary(f"watch {self._label}"):
                item = await _aio(_aio_watch_next, self._watcher)
            if item is _WATCH_STOPPED:
                self._stopped = True
                raise StopAsyncIteration
            if item is None:
                continue  # nats-py's "initial values done" marker
            op = item.operation
            return KvEntry(
                key=item.key,
                value=b"" if op in ("DEL", "PURGE") else bytes(item.value or b""),
                revision=int(item.revision),
                deleted=op in ("DEL", "PURGE"),
            )

    async def stop(self) -> None:
        """Stop the watch; iteration then ends."""
        if self._stopped:
            return
        self._stopped = True
        with _boundary(f"stop watching {self._label}"):
            await _aio(self._watcher.stop)


class KvBucket:
    """A JetStream key-value bucket, trio-facing; from ``NatsBus.kv_bucket``."""

    def __init__(self, bus: NatsBus, kv: Any, name: str, *, leader_reads: bool = False) -> None:
        self._bus = bus
        self._kv = kv
        self.name = name
        self.leader_reads = leader_reads
        """``get`` reads through the stream's leader (see ``NatsBus.kv_bucket``)."""

    def _refusals(self, action: str, *, write: bool) -> AbstractContextManager[_RefusalWatch]:
        return _refusals(self._bus._conn.events, action, _kv_names(self.name), write=write)

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """Return ``(value, revision)`` of the key's latest value, or None if absent or deleted."""
        action = f"KV get {self.name}/{key}"
        self._bus._check_open(action)
        with self._refusals(action, write=False), _boundary(action):
            if self.leader_reads:
                return await _aio(_aio_kv_get_from_leader, self._bus._conn.js, self.name, key)
            return await _aio(_aio_kv_get, self._kv, key)

    async def entry(self, key: str) -> KvEntry | None:
        """The key's latest entry, a delete marker included; None if it never existed.

        Use this, not ``get``, to read the revision for ``update``: after a
        delete, ``get`` says None but the next ``update`` must name the
        marker's revision.
        """
        action = f"KV get {self.name}/{key}"
        self._bus._check_open(action)
        with self._refusals(action, write=False), _boundary(action):
            return await _aio(_aio_kv_entry, self._kv, key)

    async def keys(self) -> list[str]:
        """Every key that holds a value now (deleted and aged-out keys are not listed).

        With ``leader_reads``, the stream's leader answers, and a key deleted
        since it was written may be listed too (``get`` says None for it).
        """
        action = f"KV keys of {self.name}"
        self._bus._check_open(action)
        with self._refusals(action, write=False), _boundary(action):
            if self.leader_reads:
                return await _aio(_aio_kv_keys_from_leader, self._bus._conn.js, self.name)
            return await _aio(_aio_kv_keys, self._kv)

    async def put(self, key: str, value: bytes) -> int:
        """Store ``value`` under ``key`` unconditionally; return the new revision.

        Raises:
            PublishError: no confirmation, the value may have been stored; or
                the server refused it (permissions).
        """
        action = f"KV put {self.name}/{key}"
        self._bus._check_open(action)
        with self._refusals(action, write=True), _boundary(action, outcome_unknown=True):
            revision: int = await _aio(self._kv.put, key, bytes(value))
        return int(revision)

    async def delete(self, key: str) -> None:
        """Put a delete marker on ``key`` (its history stays until the bucket's limits drop it)."""
        action = f"KV delete {self.name}/{key}"
        self._bus._check_open(action)
        with self._refusals(action, write=True), _boundary(action, outcome_unknown=True):
            await _aio(self._kv.delete, key)

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        """Store ``value`` only if ``last_revision`` is still the key's latest; return the new one.

        ``last_revision=0`` means "only if the key does not exist yet".

        Raises:
            KvConflict: someone else changed the key since ``last_revision``.
            PublishError: no confirmation, read the key to learn the outcome;
                or the server refused it (permissions).
        """
        action = f"KV update {self.name}/{key} at revision {last_revision}"
        self._bus._check_open(action)
        with self._refusals(action, write=True), _boundary(action, outcome_unknown=True):
            try:
                revision: int = await _aio(self._kv.update, key, bytes(value), last_revision)
            except nats.js.errors.KeyWrongLastSequenceError as exc:
                raise KvConflict(
                    f"{action}: the key has changed since that revision; read it again"
                ) from exc
        return int(revision)

    @asynccontextmanager
    async def watch(self, key: str) -> AsyncIterator[KvWatch]:
        """Watch ``key`` (``*`` and ``>`` allowed): its current value, then every change.

        The watch is stopped on exit (shielded, bounded by ``close_timeout_s``).
        """
        label = f"{self.name}/{key}"
        self._bus._check_open(f"KV watch {label}")
        action = f"KV watch {label}"
        with self._refusals(action, write=False), _boundary(action):
            watcher = await _aio(self._kv.watch, key)
        watch = KvWatch(watcher, label)
        try:
            yield watch
        finally:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self._bus._config.close_timeout_s),
            ):
                try:
                    await watch.stop()
                except BusError as exc:
                    logger.warning("%s", exc)
