"""The lease that makes one instance of a site, region or central active; imports no bus adapter.

It must not import ``client``, ``simulations`` or a concrete bus: the daemon
shell hands it a KV bucket (``LeaseKv``: ``entry`` and compare-and-set
``update``), the NATS one in production, an in-memory one in unit tests.

Why a KV key with a TTL and compare-and-set (docs/architecture.md, "More than
one instance"): the bus is the one thing every instance already reaches, and
JetStream serialises the writes to one key, so "create only if absent" and
"update only at the revision I hold" give one holder at a time without a
consensus service of our own. The bucket's ``max_age`` is the TTL: a holder
that stops refreshing (crashed, partitioned, its machine gone) loses the key
to age, and a standby then creates it again.

The holder must stop taking input before anyone else can start. A standby can
create the key only once the server aged it out, ``ttl_s`` after the holder's
last confirmed write, which was sent no earlier than the holder's own clock
noted before sending it. So the holder counts its lease as lost at
``sent + ttl_s * LOSS_FRACTION`` (a margin for clock rate differences and the
server's age sweep), unless a refresh confirmed meanwhile, and on any lost
compare-and-set at once.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

import msgpack
import trio

from fedtier.tiers.store import CommitTicket

if TYPE_CHECKING:
    from fedtier.tiers.config import TierConfig

from fedtier.protocol.errors import BusError, ConfigError, DecodeError, KvConflict

__all__ = [
    "LOSS_FRACTION",
    "EpochWatermark",
    "HeldTicket",
    "Lease",
    "LeaseEntry",
    "LeaseHolder",
    "LeaseKv",
    "check_hold_config",
    "default_instance",
]

LOSS_FRACTION: Final = 0.8
"""Share of ``ttl_s`` after the last confirmed refresh's send at which the holder gives up."""

_REFRESHES_PER_TTL: Final = 3

logger = logging.getLogger("fedtier.lease")


class LeaseEntry(Protocol):
    """What a KV read returns (``protocol.bus.nats.KvEntry`` has these)."""

    @property
    def value(self) -> bytes:
        """The key's value; empty for a delete marker."""

    @property
    def revision(self) -> int:
        """The revision to name in the next ``update``."""

    @property
    def deleted(self) -> bool:
        """Whether the latest entry is a delete or purge marker."""


class LeaseKv(Protocol):
    """The KV operations a lease needs (``protocol.bus.nats.KvBucket`` has them)."""

    async def entry(self, key: str) -> LeaseEntry | None:
        """The key's latest entry, a delete marker included; None when absent or aged out."""

    async def update(self, key: str, value: bytes, last_revision: int) -> int:
        """Write only if ``last_revision`` is the key's latest (0: absent); the new revision.

        Raises:
            KvConflict: someone else wrote it since.
        """


def default_instance() -> str:
    """``host:pid``: unique per process, which is what an instance is by default."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    """Who holds a lease, as written in its value.

    Attributes:
        instance: the holder's instance name (``[lease] instance``, default ``host:pid``).
        host: its host name.
        pid: its process id.
        since_ms: when it took the lease (Unix ms); with ``instance``, names one tenure.
        epoch: the KV revision at which it took the lease (0 in the very first
            write, which cannot know its own revision yet).
        released: the holder gave it up cleanly; anyone may take it at once.
    """

    instance: str
    host: str
    pid: int
    since_ms: int
    epoch: int = 0
    released: bool = False

    def encode(self) -> bytes:
        """The value as a msgpack map."""
        packed: bytes = msgpack.packb(
            {
                "instance": self.instance,
                "host": self.host,
                "pid": self.pid,
                "since_ms": self.since_ms,
                "epoch": self.epoch,
                "released": self.released,
            },
            use_bin_type=True,
        )
        return packed

    @classmethod
    def decode(cls, data: bytes) -> LeaseHolder:
        """Read a value written by :meth:`encode`.

        Raises:
            DecodeError: not a lease value.
        """
        try:
            raw = msgpack.unpackb(data, raw=False)
            return cls(
                instance=str(raw["instance"]),
                host=str(raw["host"]),
                pid=int(raw["pid"]),
                since_ms=int(raw["since_ms"]),
                epoch=int(raw.get("epoch", 0)),
                released=bool(raw.get("released", False)),
            )
        except (ValueError, TypeError, KeyError, AttributeError, msgpack.UnpackException) as exc:
            raise DecodeError(f"lease value is not a lease holder: {exc}") from exc

    def same_tenure(self, other: LeaseHolder) -> bool:
        """Whether ``other`` was written by the same holder in the same tenure."""
        return (self.instance, self.since_ms) == (other.instance, other.since_ms)


class Lease:
    """One lease: taken when free, refreshed while held, given up when it cannot be kept.

    Run :meth:`run` in a nursery. ``held`` is set while this instance holds
    the lease; :meth:`wait_lost` returns when the current tenure ends (a lost
    compare-and-set, or no confirmed refresh for ``LOSS_FRACTION * ttl_s``).
    After a loss it goes back to standby and tries again.

    Args:
        kv: the lease bucket (its ``max_age`` is ``ttl_s``).
        key: the lease's key (``NatsSubjects.lease_key``).
        ttl_s: how long the lease outlives its last refresh.
        instance: this instance's name; ``host:pid`` when empty.
        clock: monotonic seconds (``trio.current_time``).
        wall_ms: Unix milliseconds, for ``since_ms``.
    """

    def __init__(
        self,
        kv: LeaseKv,
        key: str,
        *,
        ttl_s: float,
        instance: str = "",
        clock: Callable[[], float] = trio.current_time,
        wall_ms: Callable[[], int] | None = None,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"lease ttl must be > 0 s, got {ttl_s}")
        self.kv = kv
        self.key = key
        self.ttl_s = ttl_s
        self.instance = instance or default_instance()
        self._clock = clock
        self._wall_ms = wall_ms if wall_ms is not None else _wall_ms
        self._revision = 0
        self._mine: LeaseHolder | None = None
        self._valid_until = -float("inf")
        self.held = trio.Event()
        self._lost = trio.Event()
        self.holder: LeaseHolder | None = None
        """The holder last seen (this instance while it holds the lease)."""
        self.epoch: int | None = None
        """The KV revision at which this instance took the lease, while it holds it."""
        self.tenures = 0
        """Times this instance took the lease."""
        self.losses = 0
        """Times it lost it (not counting a clean release)."""
        self._released = False
        self._attempt: LeaseHolder | None = None

    @property
    def is_held(self) -> bool:
        """Whether this instance holds the lease now (by its own clock)."""
        return self.held.is_set() and self._clock() < self._valid_until

    async def wait_held(self) -> None:
        """Wait until this instance holds the lease."""
        await self.held.wait()

    async def wait_lost(self) -> None:
        """Wait until the current tenure ends (returns at once when not held)."""
        if not self.held.is_set():
            await trio.lowlevel.checkpoint()
            return
        await self._lost.wait()

    @property
    def refresh_interval_s(self) -> float:
        """Seconds between refreshes (and between a standby's looks)."""
        return self.ttl_s / _REFRESHES_PER_TTL

    async def run(self) -> None:
        """Take the lease when free, keep it while possible, until cancelled or released."""
        while not self._released:
            if await self.try_acquire():
                await self._keep()
            else:
                await trio.sleep(self.refresh_interval_s)
        await trio.sleep_forever()  # released for good: never take it again

    async def try_acquire(self) -> bool:
        """Take the lease if it is free; True when this instance now holds it.

        Bus errors count as "not now" (logged): a standby simply looks again.
        """
        sent = self._clock()
        try:
            entry = await self.kv.entry(self.key)
            last = 0
            if entry is not None:
                last = entry.revision
                if not entry.deleted and entry.value:
                    try:
                        current = LeaseHolder.decode(entry.value)
                    except DecodeError as exc:
                        logger.warning("lease %s holds an unreadable value (%s)", self.key, exc)
                        self.holder = None
                        return False
                    self.holder = current
                    attempt = self._attempt
                    if attempt is not None and current.same_tenure(attempt):
                        # Our own take, whose reply was lost: it is ours.
                        self._attempt = None
                        self._take(attempt, entry.revision, sent)
                        return True
                    if not current.released:
                        return False
            mine = LeaseHolder(
                instance=self.instance,
                host=socket.gethostname(),
                pid=os.getpid(),
                since_ms=self._wall_ms(),
            )
            self._attempt = mine
            revision = await self.kv.update(self.key, mine.encode(), last)
            self._attempt = None
        except KvConflict:
            return False  # someone else took it between our read and our write
        except BusError as exc:
            logger.warning("lease %s: could not look at or take it: %s", self.key, exc)
            return False
        self._take(mine, revision, sent)
        return True

    def _take(self, mine: LeaseHolder, revision: int, sent: float) -> None:
        self._mine = LeaseHolder(
            instance=mine.instance,
            host=mine.host,
            pid=mine.pid,
            since_ms=mine.since_ms,
            epoch=revision,
        )
        self._revision = revision
        self._valid_until = sent + self.ttl_s * LOSS_FRACTION
        self.holder = self._mine
        self.epoch = revision
        self.tenures += 1
        self._lost = trio.Event()
        self.held.set()
        logger.info(
            "lease %s taken by %s (epoch %d): this instance is active",
            self.key,
            self.instance,
            revision,
        )

    def _lose(self, why: str) -> None:
        if not self.held.is_set():
            return
        self.losses += 1
        self.held = trio.Event()
        self.epoch = None
        self._mine = None
        self._valid_until = -float("inf")
        self._lost.set()
        logger.error("lease %s lost (%s): this instance stops taking input", self.key, why)

    async def _keep(self) -> None:
        """Refresh every third of the TTL until a refresh is refused or cannot confirm in time."""
        while self.held.is_set():
            with trio.move_on_at(self._valid_until):
                await trio.sleep(self.refresh_interval_s)
                await self._refresh_until_confirmed()
                continue
            self._lose(f"no refresh confirmed within {self.ttl_s * LOSS_FRACTION:.1f} s")

    async def _refresh_until_confirmed(self) -> None:
        """One refresh, retried on bus errors; the caller's deadline bounds the retries."""
        backoff_s = min(0.1, self.refresh_interval_s)
        while True:
            mine = self._mine
            if mine is None:
                return
            sent = self._clock()
            try:
                self._revision = await self.kv.update(self.key, mine.encode(), self._revision)
            except KvConflict:
                if await self._still_mine():
                    continue
                self._lose("another instance wrote the lease")
                return
            except BusError as exc:
                logger.warning("lease %s: refresh failed (%s); retrying", self.key, exc)
                await trio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self.refresh_interval_s)
                continue
            self._valid_until = sent + self.ttl_s * LOSS_FRACTION
            return

    async def _still_mine(self) -> bool:
        """After a conflict: whether the latest value is our own write whose reply was lost."""
        mine = self._mine
        try:
            entry = await self.kv.entry(self.key)
        except BusError:
            return False
        if mine is None or entry is None or entry.deleted or not entry.value:
            return False
        try:
            current = LeaseHolder.decode(entry.value)
        except DecodeError:
            return False
        self.holder = current
        if current.same_tenure(mine) and not current.released:
            self._revision = entry.revision
            return True
        return False

    async def release(self) -> None:
        """Give the lease up cleanly (best effort): a standby takes it without waiting ``ttl_s``."""
        self._released = True
        mine = self._mine
        if mine is None:
            return
        self._lose_quietly()
        released = LeaseHolder(
            instance=mine.instance,
            host=mine.host,
            pid=mine.pid,
            since_ms=mine.since_ms,
            epoch=mine.epoch,
            released=True,
        )
        try:
            await self.kv.update(self.key, released.encode(), self._revision)
        except BusError as exc:
            logger.warning(
                "lease %s not released (%s); it ages out in %.0f s", self.key, exc, self.ttl_s
            )
        else:
            logger.info("lease %s released", self.key)

    def _lose_quietly(self) -> None:
        self.held = trio.Event()
        self.epoch = None
        self._mine = None
        self._valid_until = -float("inf")
        self._lost.set()


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def check_hold_config(config: TierConfig, *, who: str, held: str, until: str) -> None:
    """Refuse a config under which a tier's held deliveries would come back or never be cut.

    With ``[lease]`` a regional (the central) holds each delivery until a
    partial (a model version) holding it is durable upstream (published), so:
    in-progress acks must keep it (``nats.max_hold_s`` > 0) for at least one
    buffer window (``flush.max_age_s``), and a buffer without an age limit must
    be able to fill (``intake_capacity`` >= ``flush.max_inputs``), since the
    intake holds at most ``intake_capacity``.

    Args:
        config: the daemon's config.
        who: the daemon, for the sentence ("a regional", "the central").
        held: what it holds ("edge partial", "partial").
        until: until when ("upstream has it", "a model version holding it is published").

    Raises:
        ConfigError: the combination cannot hold a buffer window.
    """
    hold_s = config.nats.max_hold_s
    window_s = config.flush.max_age_s
    if hold_s <= 0:
        raise ConfigError(
            f"[lease] enabled at {who} needs in-progress acks: set nats.max_hold_s > 0 "
            f"(it holds each {held} until {until})"
        )
    if window_s is None and config.intake_capacity < config.flush.max_inputs:
        raise ConfigError(
            f"[lease] enabled at {who} holds at most intake_capacity "
            f"({config.intake_capacity}) {held}s, fewer than flush.max_inputs "
            f"({config.flush.max_inputs}), and flush.max_age_s is unset: a buffer would "
            "never be cut; set flush.max_age_s or raise intake_capacity"
        )
    if window_s is not None and hold_s < window_s:
        raise ConfigError(
            f"nats.max_hold_s ({hold_s:g} s) is shorter than flush.max_age_s ({window_s:g} s): "
            f"with [lease] enabled {who} holds each {held} for a whole buffer window; "
            "raise max_hold_s"
        )


class EpochWatermark:
    """Which epochs are durable upstream, for a tier that holds deliveries until they are.

    ``published_epoch``: every epoch up to it is durable upstream (a regional's
    partial PubAcked by the UP stream, a central's version published by the
    registry's compare-and-set). Cuts are published in epoch order, so an
    input folded into epoch E may be acknowledged once ``published_epoch >= E``.
    An epoch that produced nothing (its inputs went to the quarantine) counts
    as done once the epochs before it are.
    """

    def __init__(self) -> None:
        self.published_epoch = -1
        self._closed: set[int] = set()
        self._changed = trio.Event()

    def advance(self, epoch: int) -> None:
        """``epoch`` (and so every epoch before it) is durable upstream."""
        done = max(epoch, self.published_epoch)
        while done + 1 in self._closed:
            done += 1
            self._closed.discard(done)
        if done > self.published_epoch:
            self.published_epoch = done
            self._changed.set()
            self._changed = trio.Event()

    def closed_without_partial(self, epoch: int) -> None:
        """An epoch whose inputs went to the quarantine: done once the epochs before it are."""
        self._closed.add(epoch)
        self.advance(self.published_epoch)

    def reset(self, published_epoch: int) -> None:
        """Everything up to ``published_epoch`` is durable (at start, at a takeover)."""
        self._closed = {e for e in self._closed if e > published_epoch}
        self.advance(published_epoch)

    async def wait_published(self, epoch: int) -> None:
        """Wait until ``epoch`` is durable upstream."""
        while self.published_epoch < epoch:
            await self._changed.wait()


class HeldTicket(CommitTicket):
    """An input's commit, then the upstream durability of the epoch holding it."""

    def __init__(self, commit: CommitTicket | None, watermark: EpochWatermark, epoch: int) -> None:
        super().__init__(what=f"epoch {epoch} upstream")
        self.commit = commit
        self.watermark = watermark
        self.epoch = epoch

    async def wait(self) -> None:
        """Wait for the commit, then until ``epoch`` (or a later one) is durable upstream."""
        if self.commit is not None:
            await self.commit.wait()
        await self.watermark.wait_published(self.epoch)
