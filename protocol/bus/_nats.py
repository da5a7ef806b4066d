"""The NATS/JetStream bus; the one module that may import ``asyncio``, ``nats``, ``trio_asyncio``.

nats-py is an asyncio library. It runs here on a trio-asyncio loop and every
call into it crosses that bridge once (about 30-85 us a crossing), so the
module bridges coarse operations: one crossing per publish, per fetched batch,
per batch of acknowledgements. Everything that leaves the module is plain
data: ``bytes``, ``dict[str, str]`` headers and small frozen records; nats-py
objects never do, and neither do its exceptions, which are mapped to
``protocol.errors`` at the boundary with ``raise ... from exc``
(``docs/transport.md`` (NATS) holds the measured traps behind each rule
below).

Public surface::

    open_nats_loop()            the trio-asyncio loop; a daemon opens it once,
                                directly under trio.run
    open_nats_bus(config)       connect (bounded retry), ensure streams, check
                                sync_always; yields a NatsBus
    NatsBus.publish             JetStream publish (Nats-Msg-Id dedupe) on
                                subjects a configured stream covers, else core
                                publish + flush
    NatsBus.subscribe           core subscription, or a durable pull consumer
                                with ``durable=NAME``
    NatsBus.kv_bucket(name)     -> KvBucket: get / put / update / watch
    NatsBus.object_store(name)  -> ObjectStore: put / get

Errors added to the tree (both ``BusError``)::

    KvConflict       update() named a revision that is no longer the latest
    ObjectNotFound   no object of that name in the bucket

Durable subscriptions run two trio tasks. The fetcher asks for at most the
subscription's free capacity per ``fetch`` (one crossing per batch; a fetch
returns as soon as anything is there) and is cancelled when the connection
drops, so a restarted server is asked again at once. The acker batches:
``Delivery.ack()`` queues the message and, with ``confirm_acks`` (the
default), waits until the acker has sent every queued ack in one crossing, the
last with ``ack_sync``; the server handles a connection's acks in order, so
that reply confirms the batch, and concurrent ackers share one round trip.
An ack that cannot be confirmed is logged, not raised: the broker redelivers,
consumers are idempotent (``_base.Delivery.ack``). Closing a durable
subscription sends ``-NAK`` for every delivery it still holds, so they come
back at once rather than after ``ack_wait``; only messages a cancelled fetch
had already taken off the wire wait for ``ack_wait``.

Permissions. A server refuses a subject the user may not publish to by
dropping the message and reporting ``Permissions Violation`` to the error
callback; the connection stays up and a request would simply time out as
"outcome unknown". So each call names the subjects, streams and buckets it
touches, and a violation on one of them ends it at once: ``PublishError``
for a refused write (nothing stored), ``ConfigError`` for a refused read or
setup call. A login the server refuses raises ``ConfigError`` without
retrying.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib.util
import itertools
import json
import logging
import re
import ssl
import urllib.request
from collections import deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import nats.aio.client
import nats.errors
import nats.js.api
import nats.js.errors
import nats.js.object_store
import trio
import trio_asyncio

from fedtier.protocol.bus._base import (
    Bus,
    Delivery,
    Flavor,
    PublishAck,
    Subscription,
    subject_matches,
)
from fedtier.protocol.errors import (
    BusClosed,
    BusError,
    BusUnavailable,
    ConfigError,
    DigestMismatch,
    FedtierError,
    KvConflict,
    LimitExceeded,
    LocalProtocolError,
    ObjectNotFound,
    PublishError,
)

__all__ = [
    "KvBucket",
    "KvEntry",
    "KvWatch",
    "NatsBus",
    "NatsConfig",
    "ObjectStore",
    "StoredObject",
    "StreamSpec",
    "open_nats_bus",
    "open_nats_loop",
]

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

# Header names starting with this prefix belong to NATS (Nats-Msg-Id,
# Nats-Expected-Stream, ...): refused on publish so a caller cannot forge them,
# stripped on delivery so headers round-trip exactly as the caller wrote them.
_RESERVED_HEADER_PREFIX = "nats-"
_MSG_ID_HEADER = "Nats-Msg-Id"


# --------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A JetStream stream the bus creates or updates when it connects.

    Attributes:
        name: stream name (no ``.``, ``*``, ``>`` or whitespace).
        subjects: subject patterns the stream captures.
        max_age_s: how long messages are kept; 0 keeps them until other limits.
        duplicate_window_s: how long ``Nats-Msg-Id`` values are remembered for
            dedupe; at most ``max_age_s`` when that is set.
        max_msgs_per_subject: keep only the newest N messages per subject.
        storage: ``"file"`` (survives restarts) or ``"memory"``.
    """

    name: str
    subjects: tuple[str, ...]
    max_age_s: float
    duplicate_window_s: float
    max_msgs_per_subject: int | None = None
    storage: Literal["file", "memory"] = "file"

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in ".*> \t\r\n"):
            raise ConfigError(
                f"stream name {self.name!r} must be non-empty without . * > or spaces"
            )
        subjects: object = self.subjects
        if isinstance(subjects, str) or not subjects:
            raise ConfigError(
                f"stream {self.name!r} needs a tuple of subjects, got {self.subjects!r}"
            )
        for subject in self.subjects:
            _check_subject(subject, allow_wildcards=True)
        if self.max_age_s < 0 or self.duplicate_window_s < 0:
            raise ConfigError(
                f"stream {self.name!r} has a negative max_age_s or duplicate_window_s"
            )
        if self.max_age_s and self.duplicate_window_s > self.max_age_s:
            raise ConfigError(
                f"stream {self.name!r}: duplicate_window_s {self.duplicate_window_s} "
                f"exceeds max_age_s {self.max_age_s}"
            )
        if self.storage not in ("file", "memory"):
            raise ConfigError(f"stream {self.name!r}: storage must be 'file' or 'memory'")

    def covers(self, subject_filter: str) -> bool:
        """Return True when every subject matching ``subject_filter`` lands in this stream."""
        return any(_pattern_covers(p, subject_filter) for p in self.subjects)


@dataclass(frozen=True, slots=True)
class NatsConfig:
    """How to reach NATS and what JetStream state to expect there.

    Attributes:
        servers: server URLs (``nats://host:4222``, ``tls://...``).
        name: connection name shown in the server's monitoring.
        connect_timeout_s: per-server TCP/TLS connect timeout.
        connect_attempts: rounds over ``servers`` for the initial connect
            (nats-py's initial connect does not retry on its own; after it
            succeeds the client reconnects forever).
        connect_backoff_s: first delay between rounds; doubles, capped at 10 s.
        reconnect_wait_s: delay between reconnect attempts to one server.
        request_timeout_s: JetStream API calls, PubAcks, ack confirmations.
        close_timeout_s: bound on the goodbyes (acks, naks, unsubscribe, close).
        tls_ca_file, tls_cert_file, tls_key_file: PEM files; the cert and key
            go together.
        tls_hostname: server name to verify when it differs from the URL host.
        nkeys_seed_file: an nkeys user seed (needs the ``nkeys`` package).
        credentials_file: a ``.creds`` file with user JWT and seed (ditto).
        streams: streams this client uses: publishes to subjects they cover
            go through JetStream, durable subscriptions bind to them.
        manage_streams: create or update ``streams`` on connect (needs the
            JetStream API permissions to do so). False only checks that they
            exist, for least-privilege users (deploy/nats/nats-server.conf).
        require_sync_always: refuse to start unless the server fsyncs every
            JetStream write (``sync_interval: always``, docs/architecture.md, data guarantees).
        monitoring_url: the server's HTTP monitoring base URL
            (``http://127.0.0.1:8222``), read for that check. Without it the
            check is skipped with a logged warning: the client protocol does
            not expose the setting. With a cluster, it checks that one server.
        ack_wait_s: how long a durable consumer waits for an ack before
            redelivering (set when the consumer is created).
        max_ack_pending: server-side bound on unacked messages per consumer,
            summed over every process sharing it.
        confirm_acks: ``Delivery.ack()`` of a durable delivery returns once
            the server confirmed it (one round trip per batch of concurrent
            acks). False returns once the ack is queued: faster for a
            consumer that acks one message at a time, but an ack queued just
            before a crash of this process is lost and the message redelivered.
        fetch_batch: most messages one fetch asks for (also bounded by each
            subscription's free capacity).
        fetch_wait_s: how long one pull request lingers when the consumer has
            nothing; a fetch returns as soon as anything arrives.
        object_put_timeout_s: deadline of one object store put, which runs
            shielded from outside cancellation so it never leaves half an object.
        object_get_timeout_s: deadline of one object store get.
    """

    servers: Sequence[str]
    name: str = "fedtier"
    connect_timeout_s: float = 2.0
    connect_attempts: int = 5
    connect_backoff_s: float = 0.5
    reconnect_wait_s: float = 0.5
    request_timeout_s: float = 5.0
    close_timeout_s: float = 5.0
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_hostname: str | None = None
    nkeys_seed_file: Path | None = None
    credentials_file: Path | None = None
    streams: tuple[StreamSpec, ...] = ()
    manage_streams: bool = True
    require_sync_always: bool = True
    monitoring_url: str | None = None
    ack_wait_s: float = 30.0
    max_ack_pending: int = 10_000
    confirm_acks: bool = True
    fetch_batch: int = 256
    fetch_wait_s: float = 5.0
    object_put_timeout_s: float = 60.0
    object_get_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if isinstance(self.servers, str) or not self.servers:
            raise ConfigError(
                f"NATS servers must be a non-empty list of URLs, got {self.servers!r}"
            )
        object.__setattr__(self, "servers", tuple(self.servers))
        positive = {
            "connect_timeout_s": self.connect_timeout_s,
            "connect_backoff_s": self.connect_backoff_s,
            "reconnect_wait_s": self.reconnect_wait_s,
            "request_timeout_s": self.request_timeout_s,
            "close_timeout_s": self.close_timeout_s,
            "ack_wait_s": self.ack_wait_s,
            "fetch_wait_s": self.fetch_wait_s,
            "object_put_timeout_s": self.object_put_timeout_s,
            "object_get_timeout_s": self.object_get_timeout_s,
        }
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"NATS setting {key} must be > 0, got {value!r}")
        for key, count in {
            "connect_attempts": self.connect_attempts,
            "max_ack_pending": self.max_ack_pending,
            "fetch_batch": self.fetch_batch,
        }.items():
            if count < 1:
                raise ConfigError(f"NATS setting {key} must be >= 1, got {count!r}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("NATS tls_cert_file and tls_key_file must be given together")
        if self.nkeys_seed_file is not None and self.credentials_file is not None:
            raise ConfigError("give NATS either nkeys_seed_file or credentials_file, not both")
        names = [s.name for s in self.streams]
        if len(set(names)) != len(names):
            raise ConfigError(f"NATS stream names repeat: {names}")
        if self.monitoring_url is not None and not self.monitoring_url.startswith(
            ("http://", "https://")
        ):
            raise ConfigError(f"NATS monitoring_url must be http(s), got {self.monitoring_url!r}")

    def stream_for_subject(self, subject: str) -> StreamSpec | None:
        """Return the configured stream a concrete subject is published into, if any."""
        for spec in self.streams:
            if any(subject_matches(p, subject, "nats") for p in spec.subjects):
                return spec
        return None

    def stream_covering(self, subject_filter: str) -> StreamSpec | None:
        """Return the configured stream holding every subject the filter matches, if any."""
        for spec in self.streams:
            if spec.covers(subject_filter):
                return spec
        return None


# --------------------------------------------------------------------------
# Subjects


def _check_subject(subject: str, *, allow_wildcards: bool) -> None:
    tokens = subject.split(".")
    if not subject or any(not t or any(c.isspace() for c in t) for t in tokens):
        raise LocalProtocolError(f"{subject!r} is not a NATS subject (empty token or whitespace)")
    for i, part in enumerate(tokens):
        if part in ("*", ">"):
            if not allow_wildcards:
                raise LocalProtocolError(f"cannot publish to wildcard subject {subject!r}")
            if part == ">" and i != len(tokens) - 1:
                raise LocalProtocolError(f"'>' must be the last token of {subject!r}")


def _pattern_covers(pattern: str, subject_filter: str) -> bool:
    """Return True when every subject ``subject_filter`` matches also matches ``pattern``."""
    p_tokens = pattern.split(".")
    f_tokens = subject_filter.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(f_tokens) > i  # '>' needs at least one token; a filter '>' has one
        if i >= len(f_tokens):
            return False
        f = f_tokens[i]
        if f == ">":
            return False  # the filter reaches deeper than this pattern allows
        if p != "*" and p != f:
            return False
    return len(p_tokens) == len(f_tokens)


def _check_durable_name(durable: str) -> None:
    if not durable or any(c in durable for c in ".*>") or any(c.isspace() for c in durable):
        raise LocalProtocolError(
            f"durable name {durable!r} must be non-empty without . * > or spaces"
        )


def _wire_headers(headers: Mapping[str, str] | None, msg_id: str | None) -> dict[str, str] | None:
    """Build a fresh headers dict for one publish (js.publish mutates the dict it is given)."""
    out: dict[str, str] = {}
    for key, value in (headers or {}).items():
        if key.lower().startswith(_RESERVED_HEADER_PREFIX):
            raise LocalProtocolError(f"header {key!r} is reserved for NATS; use another name")
        out[key] = value
    if msg_id is not None:
        if not msg_id:
            raise LocalProtocolError("msg_id must be a non-empty string")
        out[_MSG_ID_HEADER] = msg_id
    return out or None


def _user_headers(raw: Mapping[str, str] | None) -> dict[str, str]:
    if not raw:
        return {}
    return {k: v for k, v in raw.items() if not k.lower().startswith(_RESERVED_HEADER_PREFIX)}


# --------------------------------------------------------------------------
# The bridge and the error boundary


@asynccontextmanager
async def open_nats_loop() -> AsyncIterator[None]:
    """Open the trio-asyncio loop that nats-py runs on.

    A daemon opens it once, directly under ``trio.run``, around everything
    that uses NATS; ``open_nats_bus`` then reuses it. (``open_nats_bus`` opens
    one itself when none is open, which suits tests and one-shot tools.)

    trio-asyncio wraps whatever leaves the loop in nested exception groups;
    when the group holds a single exception, that exception is re-raised
    alone so callers see our error types, not the wrapping.
    """
    sole: BaseException | None = None
    try:
        async with trio_asyncio.open_loop():
            yield
    except BaseExceptionGroup as group:
        sole = _sole_leaf(group)
        if sole is None:
            raise
    if sole is not None:
        # Raised outside the except block so the group is not chained onto it.
        raise sole


def _sole_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


def _loop_is_open() -> bool:
    loop = trio_asyncio.current_loop.get()
    return loop is not None and not loop.is_closed()


async def _aio(fn: Callable[_P, Awaitable[_T]], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run one asyncio coroutine function on the trio-asyncio loop: one bridge crossing.

    On trio cancellation the asyncio task is cancelled and ``trio.Cancelled``
    is raised here.
    """
    if not _loop_is_open():
        raise BusClosed(
            "no trio-asyncio loop is open here; use open_nats_loop() or open_nats_bus()"
        )
    result: _T = await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
    return result


def _translate(exc: BaseException, action: str, *, outcome_unknown: bool) -> FedtierError | None:
    """Map a nats/asyncio exception to our tree; None for anything we do not recognise.

    ``outcome_unknown`` marks writes (publish, KV put, object put): when the
    reply is missing the write may have happened, so the caller must retry
    with the same id (``PublishError``). Reads map to ``BusUnavailable``.
    """
    # The builtin TimeoutError first: nats' TimeoutError derives from it, and
    # on 3.11 it is an OSError, which would otherwise read as a socket failure.
    if isinstance(exc, TimeoutError):
        if outcome_unknown:
            return PublishError(
                f"{action}: no reply in time; outcome unknown, retry with the same id"
            )
        return BusUnavailable(f"{action}: no reply in time")
    if isinstance(exc, asyncio.CancelledError):
        # An asyncio cancellation that trio did not ask for: the loop or the
        # connection is going away underneath the call.
        if outcome_unknown:
            return PublishError(f"{action}: interrupted; outcome unknown, retry with the same id")
        return BusClosed(f"{action}: interrupted because the connection is closing")
    if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
        if outcome_unknown:
            return PublishError(
                f"{action}: no JetStream responder (stream missing or server restarting); "
                "outcome unknown, retry with the same id"
            )
        return BusUnavailable(f"{action}: no JetStream responder")
    if isinstance(exc, nats.errors.ConnectionClosedError):
        return BusClosed(f"{action}: the NATS connection is closed")
    if isinstance(exc, nats.errors.MaxPayloadError):
        return LocalProtocolError(f"{action}: message larger than the server's max_payload")
    if isinstance(exc, nats.errors.BadSubjectError | nats.errors.BadHeaderError):
        return LocalProtocolError(f"{action}: {exc}")
    if isinstance(exc, nats.js.errors.InvalidKeyError | nats.js.errors.InvalidBucketNameError):
        return LocalProtocolError(f"{action}: invalid key or bucket name")
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return BusUnavailable(f"{action}: JetStream unavailable ({exc})")
    if isinstance(exc, nats.js.errors.APIError):
        if outcome_unknown:
            return PublishError(
                f"{action}: JetStream refused it: {exc.description} (code {exc.err_code})"
            )
        return BusError(f"{action}: JetStream refused it: {exc.description} (code {exc.err_code})")
    if isinstance(exc, nats.errors.Error | OSError):
        return BusUnavailable(f"{action}: {exc}")
    return None


@contextmanager
def _boundary(action: str, *, outcome_unknown: bool = False) -> Iterator[None]:
    """Translate what nats-py raises inside the block; our own errors pass through."""
    try:
        yield
    except FedtierError:
        raise
    except (Exception, asyncio.CancelledError) as exc:
        mapped = _translate(exc, action, outcome_unknown=outcome_unknown)
        if mapped is None:
            raise
        raise mapped from exc


# --------------------------------------------------------------------------
# Refusals (server permissions)

# nats-py lowercases the server's -ERR text: 'nats: permissions violation for
# publish to "ft.fleet1.up.central"'.
_PERMISSION_VIOLATION_RE = re.compile(
    r'permissions violation for (?:publish|subscription) to "([^"]+)"', re.IGNORECASE
)


class _RefusalWatch:
    """One call in flight that a permissions violation on its subjects ends at once.

    ``names`` are lowercased subjects, stream, bucket or consumer names: a
    violating subject matches when it equals one or has one as a token
    (``$js.api.stream.info.kv_ft_fleet1_models`` matches ``kv_ft_fleet1_models``).
    """

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.scope = trio.CancelScope()
        self.violation: str | None = None

    def offer(self, subject: str, message: str) -> None:
        if self.violation is None and (
            subject in self.names or not self.names.isdisjoint(subject.split("."))
        ):
            self.violation = message
            self.scope.cancel()


@contextmanager
def _refusals(
    events: _ConnectionEvents, action: str, names: Iterable[str], *, write: bool
) -> Iterator[_RefusalWatch]:
    """End the block at once with a typed error when the server refuses one of ``names``.

    A refused write raises ``PublishError`` (nothing was stored; retrying will
    not help until the permissions change); a refused read or setup call
    raises ``ConfigError``. Yields the watch, whose ``violation`` says
    afterwards whether that is what happened.
    """
    watch = _RefusalWatch(frozenset(name.lower() for name in names))
    events.refusal_watches.add(watch)
    try:
        with watch.scope:
            yield watch
    except Exception as exc:
        if watch.violation is None:
            raise
        raise _refused(action, watch.violation, write=write) from exc
    finally:
        events.refusal_watches.discard(watch)
    if watch.violation is not None:
        raise _refused(action, watch.violation, write=write)


def _refused(action: str, violation: str, *, write: bool) -> FedtierError:
    message = (
        f"{action}: the NATS server refused it ({violation}); grant it in this user's "
        "permissions (deploy/nats/nats-server.conf) or use another user"
    )
    return PublishError(message) if write else ConfigError(message)


def _is_auth_refusal(exc: BaseException | None) -> bool:
    # nats-py raises a plain Error("nats: 'Authorization Violation'") when the
    # server refuses the CONNECT, and AuthorizationError on other paths.
    return isinstance(exc, nats.errors.AuthorizationError) or (
        isinstance(exc, nats.errors.Error) and "authorization violation" in str(exc).lower()
    )


# --------------------------------------------------------------------------
# Connection


class _ConnectionEvents:
    """nats-py's connection callbacks, turned into a trio "state changed" signal.

    The callbacks run as asyncio coroutines on the trio-asyncio loop; they only
    make synchronous trio calls (``Event.set``), which are safe there. nats-py
    flips its status before calling them, so a waiter that checked the status
    and then waits on ``changed`` cannot miss a transition.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.changed = trio.Event()
        self.established = False
        self.closing = False
        self.last_error: Exception | None = None
        self.first_error: Exception | None = None
        # Scopes of calls that wait for a reply only this connection can bring
        # (a pull request lingers on the server it was sent to): a disconnect
        # cancels them instead of letting them run into their timeout.
        self.until_disconnect: set[trio.CancelScope] = set()
        # Calls that a permissions violation on one of their subjects ends at
        # once (see _refusals).
        self.refusal_watches: set[_RefusalWatch] = set()

    def _signal(self) -> None:
        fired, self.changed = self.changed, trio.Event()
        fired.set()

    def forget_errors(self) -> None:
        """Clear ``first_error`` and ``last_error``, so that a connect attempt reports its own."""
        self.first_error = self.last_error = None

    async def on_error(self, exc: Exception) -> None:
        self.last_error = exc
        if self.first_error is None:
            self.first_error = exc
        logger.warning("nats %s: %s", self.label, exc or type(exc).__name__)
        # nats-py reports a refused publish only here (the server drops the
        # message and keeps the connection), so a request waiting for its
        # reply would otherwise run into its timeout as "outcome unknown".
        match = _PERMISSION_VIOLATION_RE.search(str(exc))
        if match is not None:
            for watch in list(self.refusal_watches):
                watch.offer(match[1].lower(), str(exc))

    async def on_disconnected(self) -> None:
        # nats-py also calls this when a first connect attempt fails; only a
        # connection that was up is "reconnecting".
        if self.established and not self.closing:
            logger.warning("nats %s: disconnected; reconnecting", self.label)
        for scope in self.until_disconnect:
            scope.cancel()
        self._signal()

    async def on_reconnected(self) -> None:
        logger.info("nats %s: reconnected", self.label)
        self._signal()

    async def on_closed(self) -> None:
        logger.info("nats %s: connection closed", self.label)
        self._signal()


class _Connection:
    """A connected nats-py client and its JetStream context (kept inside this module)."""

    def __init__(self, nc: Any, events: _ConnectionEvents, config: NatsConfig) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=config.request_timeout_s)
        self.events = events
        self.config = config

    def check_connected(self, action: str) -> None:
        if self.nc.is_closed:
            raise BusClosed(f"{action}: the NATS connection is closed")
        if not self.nc.is_connected:
            raise BusUnavailable(f"{action}: not connected to NATS now (reconnecting)")

    async def wait_connected(self) -> None:
        """Wait until the client is connected; BusClosed when it never will be again."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.nc.is_connected:
            if self.nc.is_closed:
                raise BusClosed("the NATS connection is closed")
            await self.events.changed.wait()


def _tls_context(config: NatsConfig) -> ssl.SSLContext | None:
    if config.tls_ca_file is None and config.tls_cert_file is None:
        return None
    try:
        ctx = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH,
            cafile=str(config.tls_ca_file) if config.tls_ca_file is not None else None,
        )
        if config.tls_cert_file is not None and config.tls_key_file is not None:
            ctx.load_cert_chain(str(config.tls_cert_file), str(config.tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the NATS TLS files: {exc}") from exc
    return ctx


def _connect_options(config: NatsConfig, events: _ConnectionEvents) -> dict[str, Any]:
    options: dict[str, Any] = {
        "servers": list(config.servers),
        "name": config.name,
        "connect_timeout": config.connect_timeout_s,
        "reconnect_time_wait": config.reconnect_wait_s,
        # nats-py treats 0 as "forever" and tries each server twice at 1, so 1
        # is the smallest bounded initial connect; the bounded retry around
        # it is ours, and reconnects become unbounded once connected.
        "max_reconnect_attempts": 1,
        "allow_reconnect": True,
        "error_cb": events.on_error,
        "disconnected_cb": events.on_disconnected,
        "reconnected_cb": events.on_reconnected,
        "closed_cb": events.on_closed,
    }
    tls = _tls_context(config)
    if tls is not None:
        options["tls"] = tls
        if config.tls_hostname is not None:
            options["tls_hostname"] = config.tls_hostname
    if config.nkeys_seed_file is not None or config.credentials_file is not None:
        if importlib.util.find_spec("nkeys") is None:
            raise ConfigError(
                "NATS nkeys or credentials are configured but the 'nkeys' package is missing; "
                "install it with: pip install nkeys"
            )
        if config.nkeys_seed_file is not None:
            options["nkeys_seed"] = str(config.nkeys_seed_file)
        else:
            options["user_credentials"] = str(config.credentials_file)
    return options


async def _aio_connect(options: dict[str, Any]) -> Any:
    nc = nats.aio.client.Client()
    try:
        await nc.connect(**options)
    except BaseException:
        # A failed connect can leave a transport behind; close it so nothing
        # is left for the garbage collector to warn about.
        if not nc.is_closed:
            await nc.close()
        raise
    nc.options["max_reconnect_attempts"] = -1
    return nc


async def _connect(config: NatsConfig, events: _ConnectionEvents) -> Any:
    options = _connect_options(config, events)
    delay = config.connect_backoff_s
    for attempt in range(1, config.connect_attempts + 1):
        events.forget_errors()
        try:
            return await _aio(_aio_connect, options)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            # nats-py reports a refused login to error_cb (maybe followed by
            # a broken pipe) and then gives up with NoServersError; retrying
            # will not fix credentials.
            refused = next(
                (e for e in (exc, events.first_error, events.last_error) if _is_auth_refusal(e)),
                None,
            )
            if refused is not None:
                raise ConfigError(
                    f"NATS at {', '.join(config.servers)} refused the credentials "
                    f"of {config.name!r} ({refused})"
                ) from exc
            if attempt == config.connect_attempts:
                # NoServersError says nothing of why; the first error reported
                # often does (a TLS alert such as "certificate required",
                # when it is read before the broken pipe that follows it).
                why = f"{exc or type(exc).__name__}"
                first = events.first_error
                if first is not None and first is not exc:
                    why += f"; first error: {first}"
                raise BusUnavailable(
                    f"cannot connect to NATS at {', '.join(config.servers)} after "
                    f"{attempt} attempts: {why}"
                ) from exc
            logger.warning(
                "nats %s: connect attempt %d/%d failed (%s); retrying in %.1f s",
                config.name,
                attempt,
                config.connect_attempts,
                exc or type(exc).__name__,
                delay,
            )
        await trio.sleep(delay)
        delay = min(delay * 2, 10.0)
    raise AssertionError("unreachable")  # pragma: no cover


async def _aio_ensure_streams(js: Any, streams: tuple[StreamSpec, ...], manage: bool) -> None:
    for spec in streams:
        cfg = nats.js.api.StreamConfig(
            name=spec.name,
            subjects=list(spec.subjects),
            max_age=spec.max_age_s,
            duplicate_window=spec.duplicate_window_s,
            max_msgs_per_subject=(
                spec.max_msgs_per_subject if spec.max_msgs_per_subject is not None else -1
            ),
            storage=(
                nats.js.api.StorageType.FILE
                if spec.storage == "file"
                else nats.js.api.StorageType.MEMORY
            ),
        )
        try:
            await js.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            if not manage:
                raise ConfigError(
                    f"JetStream stream {spec.name!r} does not exist and manage_streams is off; "
                    "create it from a connection allowed to (the central's)"
                ) from None
            await js.add_stream(cfg)
        else:
            if manage:
                await js.update_stream(cfg)


async def _ensure_streams(conn: _Connection) -> None:
    if not conn.config.streams:
        return
    try:
        names = [spec.name for spec in conn.config.streams]
        with (
            _refusals(conn.events, "ensure JetStream streams", names, write=False),
            _boundary("ensure JetStream streams"),
        ):
            await _aio(
                _aio_ensure_streams, conn.js, conn.config.streams, conn.config.manage_streams
            )
    except BusError as exc:
        if isinstance(exc.__cause__, nats.js.errors.APIError):
            raise ConfigError(
                f"cannot create or update the JetStream streams "
                f"{[s.name for s in conn.config.streams]}: {exc}"
            ) from exc
        raise


def _read_varz(url: str, timeout_s: float, cafile: Path | None) -> Any:
    if not url.startswith(("http://", "https://")):  # urlopen would also open file: URLs
        raise ValueError(f"not an http(s) URL: {url!r}")
    ctx = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    with urllib.request.urlopen(url, timeout=timeout_s, context=ctx) as resp:  # noqa: S310
        return json.loads(resp.read())


async def _check_sync_always(config: NatsConfig) -> None:
    """Refuse a JetStream server that acknowledges writes before they are on disk."""
    if not config.require_sync_always:
        return
    if config.monitoring_url is None:
        logger.warning(
            "nats %s: monitoring_url is not set, so JetStream's sync_interval cannot be "
            "checked; make sure every server runs with 'sync_interval: always'",
            config.name,
        )
        return
    url = config.monitoring_url.rstrip("/") + "/varz"
    # A server that restarts right after the connect (a crash loop, a rolling
    # restart) refuses or drops the monitoring request for a moment: retry as the
    # connect does. A wrong URL keeps failing and is reported after the last try.
    delay = config.connect_backoff_s
    for attempt in range(1, config.connect_attempts + 1):
        try:
            varz = await trio.to_thread.run_sync(
                _read_varz,
                url,
                config.request_timeout_s,
                config.tls_ca_file,
                abandon_on_cancel=True,
            )
            break
        except (TimeoutError, OSError) as exc:
            if attempt == config.connect_attempts:
                raise ConfigError(
                    f"cannot read {url} to check JetStream's sync_interval after {attempt} "
                    f"attempts ({exc}); fix monitoring_url or set require_sync_always = false"
                ) from exc
            logger.warning(
                "nats %s: reading %s failed (attempt %d/%d: %s); retrying in %.1f s",
                config.name,
                url,
                attempt,
                config.connect_attempts,
                exc,
                delay,
            )
        except ValueError as exc:  # not http(s), or not JSON: retrying will not help
            raise ConfigError(
                f"cannot read {url} to check JetStream's sync_interval ({exc}); fix "
                "monitoring_url or set require_sync_always = false"
            ) from exc
        await trio.sleep(delay)
        delay *= 2
    server = varz.get("server_name") or varz.get("server_id") or config.monitoring_url
    jetstream = varz.get("jetstream") or {}
    js_config = jetstream.get("config")
    if not js_config:
        raise ConfigError(
            f"nats-server {server!r} ({config.monitoring_url}) has JetStream disabled"
        )
    if js_config.get("sync_always") is not True:
        raise ConfigError(
            f"nats-server {server!r} ({config.monitoring_url}) acknowledges JetStream writes "
            "before they reach the disk; add 'sync_interval: always' to its jetstream block "
            "(see deploy/nats/nats-server.conf) and restart it"
        )


@asynccontextmanager
async def open_nats_bus(config: NatsConfig) -> AsyncIterator[NatsBus]:
    """Connect to NATS and yield a ``NatsBus``; close everything on exit.

    Connects with bounded retry (``connect_attempts``), then reconnects
    forever; creates or updates ``config.streams``; with
    ``require_sync_always`` refuses a server without ``sync_interval: always``
    (``ConfigError``). Reuses the trio-asyncio loop of ``open_nats_loop`` when
    one is open in this task's context, else opens one around the bus.

    Raises:
        BusUnavailable: no server answered within the attempts.
        ConfigError: credentials refused, streams rejected, sync check failed.
    """
    if _loop_is_open():
        async with _open_bus_on_loop(config) as bus:
            yield bus
    else:
        async with open_nats_loop(), _open_bus_on_loop(config) as bus:
            yield bus


@asynccontextmanager
async def _open_bus_on_loop(config: NatsConfig) -> AsyncIterator[NatsBus]:
    events = _ConnectionEvents(config.name)
    nc = await _connect(config, events)
    events.established = True
    conn = _Connection(nc, events, config)
    bus = NatsBus(conn)
    try:
        await _check_sync_always(config)
        await _ensure_streams(conn)
        yield bus
    finally:
        bus._closed = True
        events.closing = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(config.close_timeout_s):
                try:
                    # close(), not drain(): drain waits out drain_timeout when a
                    # pull subscription still holds an unread message.
                    await _aio(nc.close)
                except (Exception, asyncio.CancelledError) as exc:
                    logger.warning("nats %s: close failed: %s", config.name, exc)


# --------------------------------------------------------------------------
# Subscriptions


class _Inbox:
    """Deliveries waiting for ``receive`` plus the count handed out and not yet acknowledged.

    Both counts together never pass ``capacity`` by this side's doing: the
    fetcher asks only for the room left, a core callback waits for room.
    """

    def __init__(self, capacity: int, label: str) -> None:
        self.capacity = capacity
        self.label = label
        self.waiting: deque[Delivery] = deque()
        self.unacked = 0
        self.closed = False
        self.error: BusError | None = None
        self.changed = trio.lowlevel.ParkingLot()

    def outstanding(self) -> int:
        return len(self.waiting) + self.unacked

    def put(self, delivery: Delivery) -> None:
        self.waiting.append(delivery)
        self.changed.unpark_all()

    def settle(self) -> None:
        self.unacked -= 1
        self.changed.unpark_all()

    def close(self) -> None:
        self.closed = True
        self.waiting.clear()
        self.changed.unpark_all()

    def fail(self, error: BusError) -> None:
        self.error = error
        self.changed.unpark_all()

    async def receive(self) -> Delivery:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self.closed:
                raise BusClosed(f"subscription {self.label} is closed")
            if self.error is not None:
                error = self.error
                raise type(error)(f"subscription {self.label} stopped: {error}") from error
            if self.waiting and self.unacked < self.capacity:
                break
            await self.changed.park()
        delivery = self.waiting.popleft()
        self.unacked += 1
        # A schedule point that cannot be cancelled, so a delivery once popped
        # always reaches the caller.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return delivery

    async def wait_for_room(self) -> int:
        while self.outstanding() >= self.capacity:
            await self.changed.park()
        return self.capacity - self.outstanding()


class _InboxSubscription(Subscription):
    def __init__(self, inbox: _Inbox) -> None:
        self._inbox = inbox

    async def receive(self) -> Delivery:
        """See ``Subscription.receive``."""
        return await self._inbox.receive()


class _CoreReceiver:
    """Moves core NATS messages into an ``_Inbox``; its callback runs on the asyncio side."""

    def __init__(self, inbox: _Inbox) -> None:
        self.inbox = inbox

    def _delivery(self, msg: Any) -> Delivery:
        settled = False

        async def ack() -> None:
            nonlocal settled
            if not settled and not self.inbox.closed:
                settled = True
                self.inbox.settle()
            await trio.lowlevel.checkpoint()

        return Delivery(
            subject=msg.subject,
            payload=msg.data,
            headers=_user_headers(msg.headers),
            _ack=ack,
        )

    async def on_msg(self, msg: Any) -> None:
        inbox = self.inbox
        if inbox.closed:
            return
        delivery = self._delivery(msg)
        if inbox.outstanding() < inbox.capacity:
            inbox.put(delivery)
            return
        # Full: wait on the trio side. nats-py runs a subscription's callbacks
        # one at a time, so its own pending queue absorbs what comes meanwhile.
        await trio_asyncio.trio_as_aio(self._put_when_room)(delivery)

    async def _put_when_room(self, delivery: Delivery) -> None:
        inbox = self.inbox
        while not inbox.closed and inbox.outstanding() >= inbox.capacity:
            await inbox.changed.park()
        if not inbox.closed:
            inbox.put(delivery)


async def _aio_core_subscribe(nc: Any, subject_filter: str, cb: Any) -> Any:
    sub = await nc.subscribe(subject_filter, cb=cb)
    # One round trip so the server has the interest before publish() returns
    # anywhere else.
    await nc.flush()
    return sub


async def _aio_bind_pull(
    js: Any, stream: str, durable: str, subject_filter: str, ack_wait_s: float, max_ack_pending: int
) -> Any:
    try:
        info = await js.consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        await js.add_consumer(
            stream,
            nats.js.api.ConsumerConfig(
                # With a name, nats-py uses $JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>,
                # which a server permission can grant per durable and filter.
                name=durable,
                durable_name=durable,
                filter_subject=subject_filter,
                ack_policy=nats.js.api.AckPolicy.EXPLICIT,
                deliver_policy=nats.js.api.DeliverPolicy.ALL,
                ack_wait=ack_wait_s,
                max_ack_pending=max_ack_pending,
            ),
        )
    else:
        existing = info.config.filter_subject
        if existing != subject_filter:
            raise LocalProtocolError(
                f"durable {durable!r} already filters {existing!r}, not {subject_filter!r}"
            )
    return await js.pull_subscribe_bind(durable=durable, stream=stream)


async def _aio_fetch(psub: Any, batch: int, wait_s: float) -> list[Any]:
    msgs: list[Any] = await psub.fetch(batch, timeout=wait_s)
    return msgs


async def _aio_ack_batch(msgs: list[Any], timeout_s: float) -> None:
    for msg in msgs[:-1]:
        await msg.ack()
    # The reply to the last ack means the server has handled all of them: a
    # connection's acks are processed in order.
    await msgs[-1].ack_sync(timeout=timeout_s)


async def _aio_settle_and_unsubscribe(
    nc: Any, psub: Any, acks: list[Any], naks: list[Any], timeout_s: float
) -> None:
    for msg in acks:
        with suppress(nats.errors.MsgAlreadyAckdError):
            await msg.ack()
    for msg in naks:
        with suppress(nats.errors.MsgAlreadyAckdError):
            await msg.nak()
    # Unsubscribing removes the interest, which makes the server drop any pull
    # request still waiting, so nothing more is delivered to this inbox.
    await psub.unsubscribe()
    if nc.is_connected:
        await nc.flush(timeout=timeout_s)


class _PullSubscription(_InboxSubscription):
    """A JetStream durable pull consumer: a fetch task and an ack task, both trio."""

    def __init__(
        self, conn: _Connection, psub: Any, stream: str, durable: str, capacity: int
    ) -> None:
        super().__init__(_Inbox(capacity, f"{stream}/{durable}"))
        self._conn = conn
        self._psub = psub
        self._stream = stream
        self._durable = durable
        self._tokens = itertools.count()
        # Fetched and not yet acknowledged, buffered or handed out; naked on close.
        self._held: dict[int, Any] = {}
        self._queued_acks: list[Any] = []
        self._queued_done = trio.Event()
        self._sending_acks: list[Any] = []
        self._sending_done = trio.Event()
        self._ack_lot = trio.lowlevel.ParkingLot()
        self._closing = False

    def _delivery(self, msg: Any) -> Delivery:
        token = next(self._tokens)
        self._held[token] = msg

        async def ack() -> None:
            await self._ack(token)

        return Delivery(
            subject=msg.subject,
            payload=msg.data,
            headers=_user_headers(msg.headers),
            redelivered=msg.metadata.num_delivered > 1,
            _ack=ack,
        )

    async def _ack(self, token: int) -> None:
        msg = self._held.pop(token, None)
        if msg is None or self._closing:
            # Already acknowledged, or the subscription closed and gave it back.
            await trio.lowlevel.checkpoint()
            return
        self._inbox.settle()
        self._queued_acks.append(msg)
        done = self._queued_done
        self._ack_lot.unpark_all()
        if not self._conn.config.confirm_acks:
            await trio.lowlevel.checkpoint()
            return
        # Cancelling this wait does not cancel the ack: the ack task sends it.
        await done.wait()

    async def serve_acks(self) -> None:
        """Send queued acks in batches, one bridge crossing per batch."""
        timeout_s = self._conn.config.request_timeout_s
        while True:
            while not self._queued_acks:
                await self._ack_lot.park()
            self._sending_acks, self._queued_acks = self._queued_acks, []
            self._sending_done, self._queued_done = self._queued_done, trio.Event()
            try:
                with _boundary(f"ack {len(self._sending_acks)} on {self._inbox.label}"):
                    await _aio(_aio_ack_batch, self._sending_acks, timeout_s)
            except BusError as exc:
                logger.warning("%s; the server will redeliver those messages", exc)
            self._sending_acks = []
            self._sending_done.set()

    async def serve_fetches(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Fetch into the inbox, never holding more than ``capacity`` unacked."""
        config = self._conn.config
        task_status.started()
        backoff_s = 0.1
        while True:
            room = await self._inbox.wait_for_room()
            events = self._conn.events
            try:
                await self._conn.wait_connected()
                with (
                    trio.CancelScope() as fetch_scope,
                    _boundary(f"fetch from {self._inbox.label}"),
                ):
                    events.until_disconnect.add(fetch_scope)
                    try:
                        msgs = await _aio(
                            _aio_fetch,
                            self._psub,
                            min(room, config.fetch_batch),
                            config.fetch_wait_s,
                        )
                    finally:
                        events.until_disconnect.discard(fetch_scope)
                if fetch_scope.cancelled_caught:
                    # The server this pull request went to is gone; a message a
                    # cancelled fetch had already taken comes back after ack_wait.
                    continue
            except BusUnavailable as exc:
                if isinstance(exc.__cause__, TimeoutError):
                    continue  # the pull request expired with nothing to deliver
                logger.warning("%s; retrying in %.1f s", exc, backoff_s)
                await trio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            except BusError as exc:
                if isinstance(exc, BusClosed) or isinstance(
                    exc.__cause__, nats.js.errors.NotFoundError
                ):
                    self._inbox.fail(exc)
                    return
                logger.warning("%s; retrying in %.1f s", exc, backoff_s)
                await trio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            backoff_s = 0.1
            for msg in msgs:
                self._inbox.put(self._delivery(msg))

    async def close(self) -> None:
        """Give back what this subscription holds and unsubscribe; call shielded."""
        self._closing = True
        self._inbox.close()
        acks = self._sending_acks + self._queued_acks
        naks = list(self._held.values())
        self._held.clear()
        self._queued_acks = []
        config = self._conn.config
        with trio.move_on_after(config.close_timeout_s):
            try:
                with _boundary(f"close {self._inbox.label}"):
                    await _aio(
                        _aio_settle_and_unsubscribe,
                        self._conn.nc,
                        self._psub,
                        acks,
                        naks,
                        config.request_timeout_s,
                    )
            except BusError as exc:
                logger.warning("%s; the server redelivers after ack_wait", exc)
        self._sending_done.set()
        self._queued_done.set()


# --------------------------------------------------------------------------
# The bus


class NatsBus(Bus):
    """One NATS connection behind the ``Bus`` interface; opened by ``open_nats_bus``."""

    flavor: Flavor = "nats"

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._config = conn.config
        self._closed = False

    def _check_open(self, action: str) -> None:
        if self._closed:
            raise BusClosed(f"{action}: the NATS bus is closed")

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        msg_id: str | None = None,
        retain: bool = False,
    ) -> PublishAck:
        """Publish; see ``Bus.publish``.

        Subjects covered by a configured stream go to JetStream with
        ``Nats-Msg-Id`` = ``msg_id`` and return its sequence and duplicate
        flag; others use core NATS plus a flush (``msg_id`` has no effect:
        core NATS does not dedupe). ``retain`` is refused: NATS has no
        retained messages (keep the model pointer in a KV bucket).

        Raises:
            LocalProtocolError: wildcard subject, ``retain=True``, a header
                named ``Nats-*``, a payload above the server's max_payload.
            BusUnavailable: not connected now; nothing was sent.
            PublishError: no PubAck (timeout, no responder, interrupted);
                retry with the same ``msg_id``. Or the server refused the
                subject (permissions): nothing was stored.
            BusClosed: the bus is closed.

        On cancellation the message may or may not have been stored.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if retain:
            raise LocalProtocolError(
                f"cannot retain {subject!r}: NATS has no retained messages; "
                "keep the latest value in a KV bucket (NatsBus.kv_bucket)"
            )
        _check_subject(subject, allow_wildcards=False)
        action = f"publish to {subject!r}"
        self._check_open(action)
        spec = self._config.stream_for_subject(subject)
        wire_headers = _wire_headers(headers, msg_id if spec is not None else None)
        data = payload if isinstance(payload, bytes) else bytes(payload)
        self._conn.check_connected(action)
        timeout_s = self._config.request_timeout_s
        with (
            _refusals(self._conn.events, action, [subject], write=True),
            _boundary(action, outcome_unknown=True),
        ):
            if spec is not None:
                duplicate, sequence = await _aio(
                    _aio_js_publish,
                    self._conn.js,
                    subject,
                    data,
                    wire_headers,
                    spec.name,
                    timeout_s,
                )
                return PublishAck(duplicate=duplicate, sequence=sequence)
            await _aio(_aio_core_publish, self._conn.nc, subject, data, wire_headers, timeout_s)
        if not self._conn.nc.is_connected:
            # flush() returns at once while disconnected and proves nothing: the
            # message sits in nats-py's buffer and may go out after reconnect.
            raise PublishError(f"{action}: disconnected before the flush; outcome unknown")
        return PublishAck()

    @asynccontextmanager
    async def subscribe(
        self,
        subject_filter: str,
        *,
        durable: str | None = None,
        capacity: int = 64,
    ) -> AsyncIterator[Subscription]:
        """Open a subscription; see ``Bus.subscribe``.

        Without ``durable``: a core NATS subscription (at most once; what
        arrives while this side is full waits in nats-py's pending queue, and
        past its limit the server marks this a slow consumer and drops).
        With ``durable``: a JetStream durable pull consumer, explicit ack, on
        the configured stream that covers ``subject_filter``; subscribers
        sharing the name share the work. On exit every delivery still held
        is given back (``-NAK``) and the subscription is removed, shielded
        and bounded by ``close_timeout_s``.

        Raises:
            LocalProtocolError: bad filter or durable name, no configured
                stream covers the filter, or the durable exists with another
                filter.
        """
        if capacity < 1:
            raise LocalProtocolError(f"subscription capacity must be >= 1, got {capacity}")
        _check_subject(subject_filter, allow_wildcards=True)
        self._check_open(f"subscribe to {subject_filter!r}")
        if durable is None:
            async with self._open_core(subject_filter, capacity) as sub:
                yield sub
        else:
            _check_durable_name(durable)
            async with self._open_durable(subject_filter, durable, capacity) as sub:
                yield sub

    @asynccontextmanager
    async def _open_core(self, subject_filter: str, capacity: int) -> AsyncIterator[Subscription]:
        inbox = _Inbox(capacity, subject_filter)
        receiver = _CoreReceiver(inbox)
        with _boundary(f"subscribe to {subject_filter!r}"):
            handle = await _aio(_aio_core_subscribe, self._conn.nc, subject_filter, receiver.on_msg)
        try:
            yield _InboxSubscription(inbox)
        finally:
            inbox.close()
            # Shielded: without the unsubscribe the callback keeps firing into
            # a closed inbox for as long as the connection lives.
            with trio.CancelScope(shield=True), trio.move_on_after(self._config.close_timeout_s):
                try:
                    with _boundary(f"unsubscribe from {subject_filter!r}"):
                        await _aio(handle.unsubscribe)
                except BusError as exc:
                    logger.warning("%s", exc)

    @asynccontextmanager
    async def _open_durable(
        self, subject_filter: str, durable: str, capacity: int
    ) -> AsyncIterator[Subscription]:
        spec = self._config.stream_covering(subject_filter)
        if spec is None:
            raise LocalProtocolError(
                f"no configured stream covers {subject_filter!r} for durable {durable!r}; "
                f"streams: {[(s.name, s.subjects) for s in self._config.streams]}"
            )
        action = f"bind durable {durable!r} on stream {spec.name!r}"
        with (
            _refusals(self._conn.events, action, [spec.name, durable], write=False),
            _boundary(action),
        ):
            psub = await _aio(
                _aio_bind_pull,
                self._conn.js,
                spec.name,
                durable,
                subject_filter,
                self._config.ack_wait_s,
                self._config.max_ack_pending,
            )
        sub = _PullSubscription(self._conn, psub, spec.name, durable, capacity)
        body_error: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(sub.serve_fetches)
                nursery.start_soon(sub.serve_acks)
                try:
                    yield sub
                except BaseException as exc:
                    # Re-raised after the nursery, so the caller gets its own
                    # exception back rather than wrapped in an ExceptionGroup.
                    body_error = exc
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await sub.close()
        if body_error is not None:
            raise body_error

    async def kv_bucket(self, name: str, *, history: int = 1) -> KvBucket:
        """Bind to the KV bucket ``name``, creating it (file storage) if missing.

        Args:
            name: bucket name.
            history: values kept per key when the bucket is created (1-64).
        """
        self._check_open(f"KV bucket {name!r}")
        action = f"open KV bucket {name!r}"
        with (
            _refusals(self._conn.events, action, _kv_names(name), write=False),
            _boundary(action),
        ):
            kv = await _aio(_aio_kv_bucket, self._conn.js, name, history)
        return KvBucket(self, kv, name)

    async def object_store(self, name: str) -> ObjectStore:
        """Bind to the object store bucket ``name``, creating it (file storage) if missing."""
        self._check_open(f"object store {name!r}")
        action = f"open object store {name!r}"
        with (
            _refusals(self._conn.events, action, _object_names(name), write=False),
            _boundary(action),
        ):
            await _aio(_aio_object_store, self._conn.js, name)
        return ObjectStore(self, name)


async def _aio_js_publish(
    js: Any,
    subject: str,
    payload: bytes,
    headers: dict[str, str] | None,
    stream: str,
    timeout_s: float,
) -> tuple[bool, int]:
    ack = await js.publish(subject, payload, timeout=timeout_s, stream=stream, headers=headers)
    # The first PubAck says duplicate=None, a repeat says True.
    return bool(ack.duplicate), int(ack.seq)


async def _aio_core_publish(
    nc: Any, subject: str, payload: bytes, headers: dict[str, str] | None, timeout_s: float
) -> None:
    await nc.publish(subject, payload, headers=headers)
    await nc.flush(timeout=timeout_s)


# --------------------------------------------------------------------------
# Key-value buckets


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


async def _aio_kv_bucket(js: Any, name: str, history: int) -> Any:
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        # direct=True: reads use $JS.API.DIRECT.GET, which any replica answers
        # and which a read-only user can be granted on its own.
        return await js.create_key_value(
            bucket=name, history=history, storage=nats.js.api.StorageType.FILE, direct=True
        )
    except nats.js.errors.APIError:
        # Another process created it between our two calls.
        return await js.key_value(name)


async def _aio_kv_get(kv: Any, key: str) -> tuple[bytes, int] | None:
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    return bytes(entry.value or b""), int(entry.revision)


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

    def __init__(self, bus: NatsBus, kv: Any, name: str) -> None:
        self._bus = bus
        self._kv = kv
        self.name = name

    def _refusals(self, action: str, *, write: bool) -> AbstractContextManager[_RefusalWatch]:
        return _refusals(self._bus._conn.events, action, _kv_names(self.name), write=write)

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """Return ``(value, revision)`` of the key's latest value, or None if absent or deleted."""
        action = f"KV get {self.name}/{key}"
        self._bus._check_open(action)
        with self._refusals(action, write=False), _boundary(action):
            return await _aio(_aio_kv_get, self._kv, key)

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


# --------------------------------------------------------------------------
# Object store


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


async def _aio_object_store(js: Any, name: str) -> Any:
    try:
        return await js.object_store(name)
    except nats.js.errors.NotFoundError:
        pass
    try:
        return await js.create_object_store(name, storage=nats.js.api.StorageType.FILE)
    except nats.js.errors.APIError:
        return await js.object_store(name)


async def _aio_object_previous_nuid(js: Any, bucket: str, name: str) -> str | None:
    obs = await js.object_store(bucket)
    try:
        info = await obs.get_info(name)
    except nats.js.errors.NotFoundError:
        return None
    return str(info.nuid) if not info.deleted else None


async def _aio_object_put(js: Any, bucket: str, name: str, data: bytes) -> tuple[int, str]:
    obs = await js.object_store(bucket)
    info = await obs.put(name, data)
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
