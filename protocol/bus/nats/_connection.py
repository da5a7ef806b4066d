"""The NATS connection, its callbacks and streams; imports no bus, subscription or store module.

The initial connect retries on our side and a refused login is not retried
(docs/transport.md, NATS, rules 13, 16 and 18); streams are created or
updated, or only checked for least-privilege users.
"""

from __future__ import annotations

import importlib.util
import logging
import ssl
from typing import Any, Final

import nats.aio.client
import nats.errors
import nats.js.api
import nats.js.errors
import trio

from fedtier.protocol.bus.nats._bridge import _aio, _boundary
from fedtier.protocol.bus.nats._config import NatsConfig, StreamSpec
from fedtier.protocol.bus.nats._refusals import (
    _PERMISSION_VIOLATION_RE,
    _is_auth_refusal,
    _refusals,
    _RefusalWatch,
)
from fedtier.protocol.errors import BusClosed, BusError, BusUnavailable, ConfigError

logger = logging.getLogger("fedtier.protocol.bus.nats")

# While waiting for streams another connection creates: how often to look, and
# how often to say so in the log (a wait can last hours; one line per poll would flood).
_STREAM_POLL_S: Final = 1.0
_STREAM_WAIT_LOG_S: Final = 10.0


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
        # Counted so the fsync re-check (_varz) can tell a reconnect from any
        # other state change: the client may now write through another node.
        self.reconnects = 0
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
        self.reconnects += 1
        self._signal()

    async def on_closed(self) -> None:
        logger.info("nats %s: connection closed", self.label)
        self._signal()


class _Connection:
    """A connected nats-py client and its JetStream context (kept inside this module)."""

    def __init__(self, nc: Any, events: _ConnectionEvents, config: NatsConfig) -> None:
        self.nc = nc
        # A domain prefixes every JetStream API subject ($JS.<domain>.API.>):
        # from a leaf node, that reaches the cluster's JetStream, not the leaf's.
        domain = {"domain": config.jetstream_domain} if config.jetstream_domain else {}
        self.js = nc.jetstream(timeout=config.request_timeout_s, **domain)
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
        "inbox_prefix": config.inbox_prefix,
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


_RETENTION: Final = {
    "limits": nats.js.api.RetentionPolicy.LIMITS,
    "workqueue": nats.js.api.RetentionPolicy.WORK_QUEUE,
    "interest": nats.js.api.RetentionPolicy.INTEREST,
}


def _keep_unchangeable_retention(name: str, cfg: Any, have: Any) -> None:
    """Keep an existing stream's retention where nats-server cannot change it in place.

    A stream cannot move to or from work-queue retention by an update; refusing
    to start would stop a whole fleet over a setting whose only cost is that
    consumed messages stay until ``max_age``. So the stream keeps what it has and
    the log says how to move it: drain it (every consumer caught up), delete it,
    and start the daemon that manages the streams, which creates it anew.
    """
    want = cfg.retention
    work_queue = nats.js.api.RetentionPolicy.WORK_QUEUE
    if have is None or have == want or work_queue not in (have, want):
        return
    logger.warning(
        "JetStream stream %s keeps %s retention: nats-server cannot change it to %s in "
        "place; drain the stream, delete it and restart this daemon to recreate it "
        "(docs/operations.md, retention and limits)",
        name,
        getattr(have, "value", have),
        getattr(want, "value", want),
    )
    cfg.retention = have


def _storage_problem(info: Any, replicas: int, file_storage: bool) -> str | None:
    """Why a stream's info falls short of ``replicas`` copies (and file storage), or None."""
    config = info.config
    have = int(config.num_replicas or 1)
    if have < replicas:
        return f"keeps {have} copies, fewer than the configured replicas = {replicas}"
    if file_storage and config.storage != nats.js.api.StorageType.FILE:
        return f"is on {config.storage} storage, not file (a restart would lose it)"
    return None


async def _aio_check_stream_storage(js: Any, stream: str, replicas: int) -> None:
    """Raise ``ConfigError`` when a KV bucket's or object store's ``stream`` is under-replicated."""
    problem = _storage_problem(await js.stream_info(stream), replicas, True)
    if problem is not None:
        raise ConfigError(
            f"JetStream stream {stream!r} {problem}; raise its replicas with a stream "
            "update (nats-server copies it to the new replicas) or recreate it"
        )


async def _aio_ensure_streams(js: Any, streams: tuple[StreamSpec, ...], manage: bool) -> list[str]:
    """Create or update ``streams`` (``manage``), or only look them up; return the missing names.

    Every stream found or made is then checked against its spec's replicas and
    storage (``ConfigError``): a server may keep an older, weaker definition
    (an update that could not apply, or a check-only user's stream made by
    someone else).
    """
    missing: list[str] = []
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
            num_replicas=spec.replicas,
            max_bytes=spec.max_bytes if spec.max_bytes is not None else -1,
            discard=(
                nats.js.api.DiscardPolicy.NEW
                if spec.discard == "new"
                else nats.js.api.DiscardPolicy.OLD
            ),
            retention=_RETENTION[spec.retention],
        )
        try:
            info = await js.stream_info(spec.name)
        except nats.js.errors.NotFoundError:
            if not manage:
                missing.append(spec.name)
                continue
            info = await js.add_stream(cfg)
        else:
            if manage:
                _keep_unchangeable_retention(spec.name, cfg, info.config.retention)
                info = await js.update_stream(cfg)
        problem = _storage_problem(info, spec.replicas, spec.storage == "file")
        if problem is not None:
            raise ConfigError(
                f"JetStream stream {spec.name!r} {problem}; "
                + (
                    "the update did not change it: recreate the stream"
                    if manage
                    else "let the central (manage_streams) update it, or recreate it"
                )
            )
    return missing


async def _check_streams(conn: _Connection) -> list[str]:
    """One pass of :func:`_aio_ensure_streams` at the bus boundary; the missing stream names."""
    names = [spec.name for spec in conn.config.streams]
    # The reply inbox too: a user not allowed to subscribe to its prefix never
    # gets an answer, which must read as the refusal it is, not as a wait.
    watched = [*names, conn.config.inbox_prefix]
    try:
        with (
            _refusals(conn.events, "ensure JetStream streams", watched, write=False),
            _boundary("ensure JetStream streams"),
        ):
            return await _aio(
                _aio_ensure_streams, conn.js, conn.config.streams, conn.config.manage_streams
            )
    except BusError as exc:
        cause = exc.__cause__
        if isinstance(cause, nats.js.errors.ServiceUnavailableError) and cause.err_code is None:
            # A bare 503 status, no API error: no JetStream answers on this server
            # now (restarting, or reached before its JetStream is up). A wait.
            raise BusUnavailable(
                f"ensure JetStream streams: JetStream unavailable ({cause})"
            ) from cause
        if isinstance(cause, nats.js.errors.APIError):
            raise ConfigError(
                f"cannot create or update the JetStream streams {names}: {exc}"
            ) from exc
        raise


async def _check_streams_retrying(conn: _Connection) -> list[str]:
    """:func:`_check_streams`, retrying ``BusUnavailable`` until the server answers.

    A daemon started while JetStream is away (a server restarting, a cluster
    still electing its meta leader, a link that dropped right after the
    connect) used to exit with "no reply in time": that is a wait, like every
    other bus operation of a running daemon, not a reason to die. Each retry is
    logged with its backoff (``startup_backoff_s`` doubling up to
    ``startup_max_backoff_s``); a caller's cancellation (a stop signal) ends it.
    """
    config = conn.config
    delay = config.startup_backoff_s
    while True:
        try:
            return await _check_streams(conn)
        except BusUnavailable as exc:
            logger.warning(
                "nats %s: JetStream stream check failed (%s); retrying in %.1f s",
                config.name,
                exc,
                delay,
            )
        await trio.sleep(delay)
        delay = min(delay * 2, config.startup_max_backoff_s)


async def _ensure_streams(conn: _Connection) -> None:
    """Create, update or check the configured streams; wait for missing ones when asked to.

    A daemon that only checks (``manage_streams`` off) may start before the one
    that creates the streams: with ``wait_for_streams`` it polls until they
    exist, saying so at a bounded interval, so an operator reading its log
    knows what it waits for; without, the first missing one is a ``ConfigError``.
    A check the server does not answer (``BusUnavailable``) is retried with the
    connection's start-up backoff, never fatal.
    """
    if not conn.config.streams:
        return
    missing = await _check_streams_retrying(conn)
    if missing and not conn.config.wait_for_streams:
        raise ConfigError(
            f"JetStream stream {missing[0]!r} does not exist and manage_streams is off; "
            "create it from a connection allowed to (the central's)"
        )
    waited = bool(missing)
    next_log_at = trio.current_time()
    while missing:
        if trio.current_time() >= next_log_at:
            logger.warning(
                "waiting for JetStream stream %s (created by the central); start the central first",
                " and ".join(missing),
            )
            next_log_at = trio.current_time() + _STREAM_WAIT_LOG_S
        await trio.sleep(_STREAM_POLL_S)
        # The server restarting during a long wait is still a wait.
        missing = await _check_streams_retrying(conn)
    if waited:
        logger.info(
            "JetStream streams %s exist now; continuing", [s.name for s in conn.config.streams]
        )
