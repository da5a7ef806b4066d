"""The status snapshot every daemon publishes for ``fedtier status``; never imports a bus adapter.

What it owns: the snapshot (``StatusSnapshot``), its msgpack codec with a
schema version, the windowed rates, the last-errors log handler, and the
publisher task that puts one snapshot per ``[status] interval_s`` into the
fleet's KV bucket (``NatsSubjects.status_bucket``, one key per daemon:
``NatsSubjects.status_key``). It must not import ``client``,
``simulations`` or a concrete bus: the daemon shell hands it a bus that can
open a KV bucket (``StatusBus``).

Why a KV bucket rather than request/reply: a ``fedtier status`` started at
any time sees every daemon at once without asking anyone, and a daemon that
died leaves its last snapshot behind, visibly old (the reader calls it stale
after ``STALE_AFTER_INTERVALS`` of its own intervals), until the bucket's
``STATUS_MAX_AGE_S`` removes it.

Status is best effort by design: building or publishing a snapshot never
raises into the daemon, never waits on the daemon's own work, and each
publish is bounded in time; failures are logged (the first, then once a
minute) and counted in the next snapshot (``status_failures``).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgpack
import trio

from fedtier.protocol.errors import DecodeError, UnsupportedVersion
from fedtier.protocol.names import NatsSubjects

if TYPE_CHECKING:
    from fedtier.tiers._lease import Lease
    from fedtier.tiers.tier import TierDaemon

__all__ = [
    "MAX_ERRORS",
    "SCHEMA",
    "STALE_AFTER_INTERVALS",
    "STATUS_MAX_AGE_S",
    "ErrorLog",
    "ErrorNote",
    "RateWindow",
    "Rates",
    "StatusBucket",
    "StatusBus",
    "StatusPublisher",
    "StatusSnapshot",
    "decode_snapshot",
    "encode_snapshot",
    "publish_status",
    "status_key_of",
]

SCHEMA: Final = 1
"""Version of the snapshot's fields; a reader refuses a higher one (fields may have changed)."""
STATUS_MAX_AGE_S: Final = 3600.0
"""How long the bucket keeps a snapshot nobody refreshed: a dead daemon stays visible an hour."""
STALE_AFTER_INTERVALS: Final = 3
"""A snapshot older than this many of its daemon's intervals is stale."""
MAX_ERRORS: Final = 5
"""Last errors kept in a snapshot."""
_MAX_MESSAGE_CHARS: Final = 240
_FAILURE_LOG_EVERY_S: Final = 60.0
_MIN_PUBLISH_TIMEOUT_S: Final = 5.0
_FINAL_PUBLISH_TIMEOUT_S: Final = 2.0

logger = logging.getLogger("fedtier.status")


# -- the snapshot -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ErrorNote:
    """One error the daemon logged.

    Attributes:
        at_ms: when (Unix ms).
        logger: the logger that logged it.
        message: its message, cut to 240 characters.
    """

    at_ms: int
    logger: str
    message: str


@dataclass(frozen=True, kw_only=True, slots=True)
class StatusSnapshot:
    """What one daemon says about itself; every field is a plain value (msgpack, JSON).

    Attributes:
        schema: ``SCHEMA`` of the writer.
        tier: ``edge``, ``regional`` or ``central``.
        daemon_id: the daemon's key id (its name in logs, metrics and keys).
        instance: ``host:pid`` of the process.
        fleet: the fleet token.
        region: its region (edge, regional), or None (central).
        site: its site (edge), or None.
        state: ``starting``, ``serving``, ``standby`` (``[lease]``: another
            instance is active), ``stopping`` or ``stopped`` (the last
            snapshot of a clean stop).
        model_version: the newest model version it knows.
        epoch: the open buffer's epoch, or None before it has one.
        buffer_inputs: inputs in the open buffer.
        buffer_updates: device updates they hold.
        flush_max_inputs: the flush threshold (``[flush] max_inputs``).
        buffer_age_s: age of the oldest input in the open buffer, or None if empty.
        accepted_per_s: inputs accepted per second over ``rate_window_s``.
        rejected_per_s: inputs rejected per second over the same window.
        rejected_per_s_by_reason: the rejections per second by reason token.
        rate_window_s: the window the rates were measured over (shorter
            right after the start).
        totals: inputs by outcome (``accepted``, ``duplicate``, ``rejected``) since start.
        quarantine_inputs: rows in the quarantine.
        quarantine_bytes: bytes they hold.
        quarantine_by_reason: rows by reason.
        outbox_depth: partials (or model versions, at the central) cut and
            not yet confirmed upstream.
        outbox_oldest_s: age of the oldest of them (the upstream lag), or
            None when the outbox is empty.
        errors: the last errors logged, oldest first.
        error_count: errors logged since start.
        status_failures: snapshots that could not be published since start.
        started_ms: when the process started (Unix ms).
        at_ms: when this snapshot was taken (Unix ms).
        interval_s: the publishing interval (a reader calls it stale after
            ``STALE_AFTER_INTERVALS`` of them).
        active_since_ms: with ``[lease]``, when this instance took the lease it
            holds (Unix ms); None without a lease or while standby.
        lease_tenures: with ``[lease]``, how often this process took the lease
            (above 1: it lost it and took it back).
        took_over_version: a central that took over from the registry after
            another instance's machine was lost: the version it continued
            from; None otherwise.
        target_reached_version: a central that stopped making versions at its
            evaluation target (``[evaluation] target``): the version that met
            it; None otherwise.
        input_closed: with ``[lease]``, a central past its target has closed
            its input (partials wait in the UP stream).
    """

    schema: int = SCHEMA
    tier: str
    daemon_id: str
    instance: str = ""
    fleet: str = ""
    region: str | None = None
    site: str | None = None
    state: str = "serving"
    model_version: int | None = None
    epoch: int | None = None
    buffer_inputs: int = 0
    buffer_updates: int = 0
    flush_max_inputs: int = 0
    buffer_age_s: float | None = None
    accepted_per_s: float = 0.0
    rejected_per_s: float = 0.0
    rejected_per_s_by_reason: dict[str, float] = field(default_factory=dict)
    rate_window_s: float = 0.0
    totals: dict[str, int] = field(default_factory=dict)
    quarantine_inputs: int = 0
    quarantine_bytes: int = 0
    quarantine_by_reason: dict[str, int] = field(default_factory=dict)
    outbox_depth: int = 0
    outbox_oldest_s: float | None = None
    errors: tuple[ErrorNote, ...] = ()
    error_count: int = 0
    status_failures: int = 0
    started_ms: int = 0
    at_ms: int = 0
    interval_s: float = 2.0
    active_since_ms: int | None = None
    lease_tenures: int = 0
    took_over_version: int | None = None
    target_reached_version: int | None = None
    input_closed: bool = False

    @property
    def uptime_s(self) -> float:
        """Seconds between the process start and this snapshot."""
        return max(0.0, (self.at_ms - self.started_ms) / 1000.0)

    def age_s(self, now_ms: int) -> float:
        """Seconds since this snapshot was taken, by the reader's clock ``now_ms``."""
        return (now_ms - self.at_ms) / 1000.0

    def is_stale(self, now_ms: int) -> bool:
        """Whether the daemon missed ``STALE_AFTER_INTERVALS`` snapshots (dead, hung or cut off)."""
        return self.age_s(now_ms) > STALE_AFTER_INTERVALS * self.interval_s

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as plain data (the ``--json`` form, and what is encoded)."""
        data = asdict(self)
        data["errors"] = [asdict(note) for note in self.errors]
        return data


_FIELDS: Final = {spec.name for spec in fields(StatusSnapshot)}
_REQUIRED: Final = ("schema", "tier", "daemon_id", "at_ms")


def encode_snapshot(snapshot: StatusSnapshot) -> bytes:
    """The snapshot as a msgpack map (field name -> value)."""
    packed: bytes = msgpack.packb(snapshot.to_dict(), use_bin_type=True)
    return packed


def decode_snapshot(data: bytes) -> StatusSnapshot:
    """Read a snapshot written by ``encode_snapshot`` of this or an older schema.

    Unknown fields are ignored, so a writer may add fields without a new
    schema; missing optional fields take their defaults.

    Raises:
        UnsupportedVersion: written by a newer schema.
        DecodeError: not a snapshot.
    """
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise DecodeError(f"status snapshot is not msgpack: {exc}") from exc
    if not isinstance(raw, dict) or any(key not in raw for key in _REQUIRED):
        raise DecodeError(f"status snapshot lacks one of {', '.join(_REQUIRED)}")
    schema = raw["schema"]
    if not isinstance(schema, int) or schema < 1:
        raise DecodeError(f"status snapshot schema {schema!r} is not a positive integer")
    if schema > SCHEMA:
        raise UnsupportedVersion(
            f"status snapshot schema {schema} is newer than this reader's {SCHEMA}; "
            "upgrade fedtier where you run `fedtier status`"
        )
    values = {key: value for key, value in raw.items() if key in _FIELDS}
    try:
        values["errors"] = tuple(ErrorNote(**note) for note in values.get("errors", ()))
        snapshot = StatusSnapshot(**values)
    except TypeError as exc:
        raise DecodeError(f"status snapshot has a malformed field: {exc}") from exc
    if not isinstance(snapshot.tier, str) or not isinstance(snapshot.at_ms, int):
        raise DecodeError("status snapshot tier or at_ms has the wrong type")
    return snapshot


def status_key_of(tier: str, region: str | None, daemon_id: str) -> str:
    """The KV key a daemon writes (only the central has no region in it)."""
    return NatsSubjects.status_key(tier, None if tier == "central" else region, daemon_id)


# -- rates --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rates:
    """Per-second rates over the window actually covered.

    Attributes:
        accepted_per_s: accepted inputs per second.
        rejected_per_s: rejected inputs per second.
        rejected_by_reason: rejected inputs per second by reason (non-zero only).
        window_s: seconds the rates cover (0 before a second sample).
    """

    accepted_per_s: float = 0.0
    rejected_per_s: float = 0.0
    rejected_by_reason: dict[str, float] = field(default_factory=dict)
    window_s: float = 0.0


class RateWindow:
    """Rates of monotonic counters over a sliding window of samples.

    ``observe`` takes the daemon's ``counts`` (``(outcome, reason) -> n``
    since start) at a time and returns the rates between the oldest sample
    still inside ``window_s`` and this one. Counters only grow, so two
    samples are all a rate needs; the window keeps one burst from looking
    like a steady state and a quiet spell from hiding it for long.
    """

    def __init__(self, window_s: float) -> None:
        if not window_s > 0:
            raise ValueError(f"rate window must be > 0 s, got {window_s}")
        self.window_s = window_s
        self._samples: deque[tuple[float, Counter[tuple[str, str]]]] = deque()

    def observe(self, now: float, counts: Mapping[tuple[str, str], int]) -> Rates:
        """Add the sample ``counts`` at ``now`` (seconds, monotonic); return the rates."""
        current: Counter[tuple[str, str]] = Counter(dict(counts))
        self._samples.append((now, current))
        # Keep one sample at or before the window's start, so the window is full.
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()
        then, before = self._samples[0]
        span = now - then
        if span <= 0:
            return Rates()
        accepted = 0
        rejected = 0
        by_reason: Counter[str] = Counter()
        for (outcome, reason), value in current.items():
            delta = value - before.get((outcome, reason), 0)
            if delta <= 0:
                continue
            if outcome == "accepted":
                accepted += delta
            elif outcome == "rejected":
                rejected += delta
                by_reason[reason or "unknown"] += delta
        return Rates(
            accepted_per_s=accepted / span,
            rejected_per_s=rejected / span,
            rejected_by_reason={r: n / span for r, n in sorted(by_reason.items())},
            window_s=span,
        )


# -- last errors ----------------------------------------------------------------------------


class ErrorLog(logging.Handler):
    """Keeps the last ``MAX_ERRORS`` error records of the ``fedtier`` loggers, and their count.

    Attached to the ``fedtier`` logger while a daemon publishes its status;
    one daemon per process, so every fedtier error of the process is its.
    """

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.notes: deque[ErrorNote] = deque(maxlen=MAX_ERRORS)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        """Remember ``record`` (never raises: a status helper must not break logging)."""
        try:
            message = record.getMessage()
        except Exception:  # a bad format string is the logger's problem, not ours
            message = str(record.msg)
        if len(message) > _MAX_MESSAGE_CHARS:
            message = message[: _MAX_MESSAGE_CHARS - 1] + "…"
        self.notes.append(ErrorNote(int(record.created * 1000), record.name, message))
        self.count += 1


# -- the publisher ------------------------------------------------------------------------------


class StatusBucket(Protocol):
    """The one operation the publisher needs of a KV bucket."""

    def put(self, key: str, value: bytes) -> Awaitable[int]:
        """Store ``value`` under ``key``."""


class StatusBus(Protocol):
    """A bus that opens KV buckets (``NatsBus``)."""

    def kv_bucket(
        self, name: str, *, history: int = ..., max_age_s: float | None = ...
    ) -> Awaitable[Any]:
        """Bind (or create) the bucket ``name``."""


_IMPORTED_MS: Final = time.time_ns() // 1_000_000


def _process_start_ms() -> int:
    """When this process started (Unix ms): from /proc on Linux, else when this module loaded."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            # Field 22 counts clock ticks since boot; the name (field 2) may hold spaces.
            ticks = int(stat.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith(b"btime "))
        return (boot * 1000) + ticks * 1000 // os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_MS


def _safely(read: Callable[[], Any], default: Any) -> Any:
    # A daemon that is starting or stopping lacks its buffer or upstream:
    # status says what it can and never raises into the daemon.
    try:
        return read()
    except Exception:
        return default


def _active_since_ms(daemon: TierDaemon) -> int | None:
    """When this instance took the lease it holds now, or None (no lease, or standby)."""
    lease: Lease | None = getattr(daemon, "lease", None)
    if lease is None or not lease.held.is_set() or lease.holder is None:
        return None
    return lease.holder.since_ms


def _target_version(daemon: TierDaemon) -> int | None:
    """The version that met a central's evaluation target, or None (not reached, not a central)."""
    reached = getattr(daemon, "target_reached", None)
    version = getattr(reached, "version", None)
    return version if isinstance(version, int) else None


class StatusPublisher:
    """Builds the daemon's snapshots and puts them into the status bucket.

    Args:
        daemon: the daemon described.
        bus: where the bucket lives.
        stopping: whether a stop was asked for (the daemon shell knows).
        clock_ms: wall clock in Unix ms (the snapshot's timestamps).
    """

    def __init__(
        self,
        daemon: TierDaemon,
        bus: StatusBus,
        *,
        stopping: Callable[[], bool] = lambda: False,
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        config = daemon.config
        self.daemon = daemon
        self.settings = config.status
        self._bus = bus
        self._stopping = stopping
        self._clock_ms = clock_ms if clock_ms is not None else daemon.clock_ms
        self._rates = RateWindow(self.settings.rate_window_s)
        self.errors = ErrorLog()
        self._bucket: StatusBucket | None = None
        self._subjects = NatsSubjects(config.fleet)
        self._region: str | None = getattr(config, "region", None)
        self._site: str | None = getattr(config, "site", None)
        self.key = status_key_of(daemon.tier, self._region, daemon.key_id)
        self._instance = f"{socket.gethostname()}:{os.getpid()}"
        self._started_ms = _process_start_ms()
        self.published = 0
        self.failures = 0
        self._last_failure_log = -math.inf

    def snapshot(self, *, state: str | None = None) -> StatusSnapshot:
        """The daemon's state now (reads attributes only; never raises for a missing part)."""
        daemon = self.daemon
        now = trio.current_time()
        if state is None:
            if self._stopping():
                state = "stopping"
            elif getattr(daemon, "standby", False):
                state = "standby"  # [lease]: waiting for the active instance to go
            elif daemon.ready.is_set():
                state = "serving"
            else:
                state = "starting"
        rates = self._rates.observe(now, daemon.counts)
        buffer = _safely(lambda: daemon.buffer, None)
        upstream = _safely(lambda: daemon.upstream, None)
        depth = 0 if upstream is None else int(upstream.outstanding)
        # The upstream worker's own clock of its oldest job, which its lag metric
        # reads too; getattr: a worker without it shows no age rather than failing.
        oldest_age = getattr(upstream, "oldest_age_s", None)
        oldest_s = _safely(oldest_age, None) if depth > 0 and callable(oldest_age) else None
        usage = _safely(lambda: daemon.store.quarantine_usage, None)
        totals: Counter[str] = Counter()
        for (outcome, _), value in daemon.counts.items():
            totals[outcome] += value
        oldest_at = None if buffer is None else buffer.oldest_at
        return StatusSnapshot(
            tier=daemon.tier,
            daemon_id=daemon.key_id,
            instance=self._instance,
            fleet=daemon.config.fleet,
            region=self._region,
            site=self._site,
            state=state,
            model_version=_safely(lambda: int(daemon.known_version), None),
            epoch=None if buffer is None else int(buffer.epoch),
            buffer_inputs=0 if buffer is None else int(buffer.accumulator.input_count),
            buffer_updates=0 if buffer is None else int(buffer.accumulator.update_count),
            flush_max_inputs=int(daemon.config.flush.max_inputs),
            buffer_age_s=None if oldest_at is None else max(0.0, now - oldest_at),
            accepted_per_s=rates.accepted_per_s,
            rejected_per_s=rates.rejected_per_s,
            rejected_per_s_by_reason=rates.rejected_by_reason,
            rate_window_s=rates.window_s,
            totals=dict(totals),
            quarantine_inputs=0 if usage is None else int(usage.count),
            quarantine_bytes=0 if usage is None else int(usage.total_bytes),
            quarantine_by_reason={} if usage is None else dict(usage.by_reason),
            outbox_depth=depth,
            outbox_oldest_s=None if oldest_s is None else float(oldest_s),
            errors=tuple(self.errors.notes),
            error_count=self.errors.count,
            status_failures=self.failures,
            started_ms=self._started_ms,
            at_ms=self._clock_ms(),
            interval_s=self.settings.interval_s,
            active_since_ms=_active_since_ms(daemon),
            lease_tenures=_safely(lambda: int(getattr(daemon.lease, "tenures", 0)), 0),
            took_over_version=getattr(daemon, "took_over_at", None),
            target_reached_version=_target_version(daemon),
            input_closed=bool(getattr(daemon, "input_closed", False)),
        )

    async def publish_once(
        self, *, state: str | None = None, timeout_s: float | None = None
    ) -> bool:
        """Take and publish one snapshot; False (logged, counted) when it could not be published.

        Bounded by ``timeout_s`` (default: two intervals, at least 5 s), so a
        broker that does not answer delays neither the next snapshot nor a stop.
        """
        if timeout_s is None:
            timeout_s = max(_MIN_PUBLISH_TIMEOUT_S, 2 * self.settings.interval_s)
        with trio.move_on_after(timeout_s) as scope:
            try:
                if self._bucket is None:
                    self._bucket = await self._bus.kv_bucket(
                        self._subjects.status_bucket(), history=1, max_age_s=STATUS_MAX_AGE_S
                    )
                await self._bucket.put(self.key, encode_snapshot(self.snapshot(state=state)))
            except Exception as exc:  # never into the daemon: status is best effort
                self._failed(f"{type(exc).__name__}: {exc}")
                return False
            self.published += 1
            return True
        if scope.cancelled_caught:
            self._failed(f"no confirmation within {timeout_s:.0f} s")
        return False

    def _failed(self, why: str) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self._last_failure_log >= _FAILURE_LOG_EVERY_S:
            self._last_failure_log = now
            # A warning, not an error: the error log must not fill with status' own trouble.
            logger.warning(
                "status snapshot %s not published (%d failures so far; aggregation is "
                "unaffected): %s",
                self.key,
                self.failures,
                why,
            )

    async def run(self) -> None:
        """Publish one snapshot per interval until cancelled, and one the moment it serves.

        Without the second, a daemon that became ready just after a
        ``starting`` snapshot would read as starting for a whole interval.
        """
        while True:
            await self.publish_once()
            with trio.move_on_after(self.settings.interval_s):
                if self.daemon.ready.is_set():
                    await trio.sleep_forever()
                await self.daemon.ready.wait()


@asynccontextmanager
async def publish_status(
    daemon: TierDaemon, bus: StatusBus, *, stopping: Callable[[], bool] = lambda: False
) -> AsyncIterator[StatusPublisher | None]:
    """Publish ``daemon``'s status while the block runs, and a last ``stopped`` snapshot after.

    The daemon shell's one hook: wrap the block that serves the daemon. With
    ``[status] enabled = false`` it does nothing (yields None).
    """
    if not daemon.config.status.enabled:
        yield None
        return
    publisher = StatusPublisher(daemon, bus, stopping=stopping)
    fedtier_logger = logging.getLogger("fedtier")
    fedtier_logger.addHandler(publisher.errors)
    try:
        error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(publisher.run)
                try:
                    yield publisher
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The publisher never raises, so the group holds the block's own error:
            # hand it on as the block raised it, not wrapped by this helper's nursery.
            if len(group.exceptions) != 1:
                raise
            error = group.exceptions[0]
        if error is not None:
            raise error  # outside the handler: its cause and context stay its own
        # A clean stop says so; a crash leaves the last snapshot to go stale.
        with trio.CancelScope(shield=True):
            await publisher.publish_once(state="stopped", timeout_s=_FINAL_PUBLISH_TIMEOUT_S)
    finally:
        fedtier_logger.removeHandler(publisher.errors)
