"""What an ``ha`` chaos run reads off the bus: published lineage, lease holders; imports no checker.

With a standby central, no one state directory holds the history: a central
whose machine is lost takes its store with it, and its successor's store
holds only the versions it caught up on (``LINEAGE_HORIZON_VERSIONS``). What
is history is what the registry's pointer moved to, and each such version's
signed record (``v<N>.record``, written before the pointer moves) names the
device update ids inside it. So the observer follows the pointer and reads
every version's record once the pointer has reached it, as it is published,
long before the central deletes it past the horizon: the checker then counts
each published version exactly once, whoever published it. A version whose
record cannot be read or verified is counted in ``missing`` and fails the run,
since its lineage is unknown.

It also reads the lease bucket, so a machine-loss fault hits the instance
that is active at that moment (the holder's pid), not a standby.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import trio

from fedtier.protocol.bus.nats import KvBucket, NatsConfig, open_nats_bus, open_nats_loop
from fedtier.protocol.envelope import parse_envelope
from fedtier.protocol.errors import FedtierError
from fedtier.protocol.files import load_public_key
from fedtier.protocol.limits import DEFAULT_LIMITS
from fedtier.protocol.messages import ModelAnnouncement
from fedtier.protocol.names import NatsSubjects
from fedtier.tiers._lease import LeaseHolder
from fedtier.tiers._version_record import decode_version_record
from fedtier.tiers.model_registry import NatsModelRegistry

_POLL_S: Final = 0.5
logger = logging.getLogger("fedtier.simulations.chaos")


class _BusObserver:
    """The registry's published versions and the lease holders of one run, read as it goes.

    Attributes:
        lineage: version -> the device update ids (hex) inside it, from its record.
        missing: versions the pointer reached whose record was absent or did not verify.
        published: the newest version the pointer reached.
    """

    def __init__(
        self, fleet: str, central_key_file: Path, leases: KvBucket, registry: NatsModelRegistry
    ) -> None:
        self.fleet = fleet
        self._key = load_public_key(central_key_file)
        self._leases = leases
        self._registry = registry
        self.lineage: dict[int, list[str]] = {}
        self.missing: set[int] = set()
        self.published = 0
        self.changed = trio.Event()

    def counted(self) -> Counter[str]:
        """How often each update id appears across the published versions read so far."""
        counted: Counter[str] = Counter()
        for ids in self.lineage.values():
            counted.update(ids)
        return counted

    async def holder_pid(self, key: str) -> int | None:
        """The pid in lease ``key``'s value (None: no holder, released, or unreadable now)."""
        try:
            entry = await self._leases.get(key)
            if entry is None or not entry[0]:
                return None
            holder = LeaseHolder.decode(entry[0])
        except (FedtierError, OSError, trio.TooSlowError) as exc:
            logger.info("lease %s unreadable now: %s", key, exc)
            return None
        return None if holder.released else holder.pid

    async def follow(self) -> None:
        """Read each newly published version's record until cancelled; bus errors are retried."""
        while True:
            try:
                await self.poll()
            except (FedtierError, OSError, trio.TooSlowError) as exc:
                # A NATS node (or the whole cluster) is down: look again soon.
                logger.info("registry unreadable now: %s", exc)
            await trio.sleep(_POLL_S)

    async def settle(self, timeout_s: float) -> None:
        """Read up to the current pointer once the daemons stopped, retrying bus errors.

        Raises:
            FedtierError: the registry stayed unreadable for ``timeout_s``.
        """
        deadline = trio.current_time() + timeout_s
        while True:
            try:
                await self.poll()
                return
            except (FedtierError, OSError, trio.TooSlowError) as exc:
                if trio.current_time() > deadline:
                    raise FedtierError(f"the model registry stayed unreadable: {exc}") from exc
            await trio.sleep(_POLL_S)

    async def poll(self) -> None:
        """Read the pointer, then the record of every version up to it not read yet."""
        pointer = await self._registry.current_pointer()
        if pointer is None:
            return
        message = parse_envelope(pointer).message
        assert isinstance(message, ModelAnnouncement)
        for version in range(self.published + 1, message.version + 1):
            data = await self._registry.record(version)
            if data is None:
                self.missing.add(version)
                continue
            try:
                record = decode_version_record(
                    data,
                    {self._key.key_id: self._key}.get,
                    fleet=self.fleet,
                    max_bytes=4 * DEFAULT_LIMITS.max_envelope_bytes,
                    max_params=DEFAULT_LIMITS.max_params,
                )
            except FedtierError as exc:
                logger.warning("record of v%d does not verify: %s", version, exc)
                self.missing.add(version)
                continue
            self.lineage[version] = [leaf.hex() for leaf in record.leaves]
            self.published = version
        if message.version > self.published:
            self.published = message.version
        self.changed.set()
        self.changed = trio.Event()


@asynccontextmanager
async def open_observer(
    servers: tuple[str, ...], fleet: str, central_key_file: Path, lease_ttl_s: float, replicas: int
) -> AsyncIterator[_BusObserver]:
    """Connect to NATS and bind the lease bucket and the registry (the central created them)."""
    subjects = NatsSubjects(fleet)
    config = NatsConfig(
        servers=servers,
        name="fedtier-chaos-observer",
        require_sync_always=False,
        replicas=replicas,
        connect_attempts=20,
        object_get_timeout_s=10.0,
    )
    async with open_nats_loop(), open_nats_bus(config) as bus:
        leases = await bus.kv_bucket(subjects.lease_bucket(), max_age_s=lease_ttl_s)
        kv = await bus.kv_bucket(subjects.model_bucket())
        blobs = await bus.object_store(subjects.blob_store())
        registry = NatsModelRegistry(kv, blobs, max_blob_bytes=DEFAULT_LIMITS.max_envelope_bytes)
        yield _BusObserver(fleet, central_key_file, leases, registry)
