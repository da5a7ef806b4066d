"""One tier daemon as a process: config, buses, telemetry, signals, systemd; no client imports.

Never imports client or simulations. This is the one module of ``tiers`` that
opens real transports: ``fedtier.protocol.bus.mqtt`` and ``fedtier.protocol.bus.nats``
(imported when a daemon starts, so importing ``tiers`` stays free of nats-py
and trio-asyncio).

``run_daemon(kind, config_path)`` is what ``fedtier edge|regional|central
--config FILE`` calls. Inside ``trio.run`` it listens for signals first, then
opens the trio-asyncio loop once, directly (the NATS bridge needs that: errors
are handled inside it), then the buses, the daemon and its store. No signal is
ever fatal: before the event loop listens, ``tiers._signals`` holds them.
SIGTERM or SIGINT asks for a clean shutdown (stop input, flush the open buffer
upstream, wait for PubAcks up to ``shutdown_timeout_s``), or during start-up
ends the process without serving; a second one stops at once, which loses
nothing acknowledged. SIGHUP reloads the sender key registry and re-admits
quarantined inputs (docs/operations.md, quarantine); at the central it also
takes a new signing key from ``identity_key`` (``tiers._identity``). An edge or
regional daemon started before the central waits for the JetStream streams
the central creates, logging what it waits for every 10 s. Under systemd
(``Type=notify``) it reports ``READY=1`` once inputs are taken, ``STOPPING=1``
on shutdown, and pings the watchdog from the event loop at half
``WATCHDOG_USEC`` from the start, so a wedged loop gets the process restarted.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Final

import trio

from fedtier.protocol.bus import Bus
from fedtier.protocol.errors import BusUnavailable, FedtierError, sole_error
from fedtier.protocol.names import NatsSubjects
from fedtier.tiers import faults
from fedtier.tiers._follower import FollowerDaemon
from fedtier.tiers._forwarding import FORWARDED_MAX_AGE_S
from fedtier.tiers._health import run_probes
from fedtier.tiers._lease import Lease
from fedtier.tiers._retention import run_pruner
from fedtier.tiers._signals import DAEMON_SIGNALS, HeldSignals, hold_signals
from fedtier.tiers._status import publish_status
from fedtier.tiers._upstream import retry_transient
from fedtier.tiers.central import CentralDaemon, ModelEvaluator
from fedtier.tiers.config import (
    CentralConfig,
    EdgeConfig,
    RegionalConfig,
    TierConfig,
    TierKind,
    load_config,
)
from fedtier.tiers.edge import EdgeDaemon
from fedtier.tiers.model_registry import NatsModelRegistry
from fedtier.tiers.regional import RegionalDaemon
from fedtier.tiers.registry import TierKeys
from fedtier.tiers.tier import TierDaemon

__all__ = [
    "MQTT_CONNECT_ATTEMPTS",
    "KeyValueFormatter",
    "SystemdNotifier",
    "configure_logging",
    "open_registry",
    "run_daemon",
]

logger = logging.getLogger("fedtier.daemon")

_DAEMONS: Final[dict[str, type[TierDaemon]]] = {
    "edge": EdgeDaemon,
    "regional": RegionalDaemon,
    "central": CentralDaemon,
}
# JetStream retention: partials wait [retention] up_stream_max_age_s for a
# consumer that is down; ids are remembered for 10 minutes (receivers dedupe
# beyond that in their stores).
_MODEL_MAX_AGE_S: Final = 30 * 86_400.0
_DEDUPE_WINDOW_S: Final = 600.0
MQTT_CONNECT_ATTEMPTS: Final = 8
"""Tries of an edge's first MQTT connect, with the config's retry backoff in between."""

_STANDARD_RECORD_KEYS: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


# -- logging --------------------------------------------------------------------------


def _quote(value: object) -> str:
    text = str(value)
    if text and not any(c in text for c in ' "=\n\t'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class KeyValueFormatter(logging.Formatter):
    """One line per record: ``ts=... level=... logger=... msg="..." key=value...``.

    Fields passed with ``extra={...}`` are appended as ``key=value``.
    """

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one key=value line."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={stamp}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"msg={_quote(record.getMessage())}",
        ]
        for key, value in record.__dict__.items():
            if key not in _STANDARD_RECORD_KEYS and not key.startswith("_"):
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def configure_logging(level: int = logging.INFO) -> None:
    """Send structured lines to stderr (journald keeps them under systemd)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# -- systemd --------------------------------------------------------------------------


class SystemdNotifier:
    """``sd_notify`` over the unix datagram socket named by ``NOTIFY_SOCKET``; no dependency.

    Args:
        address: the socket path (a leading ``@`` names an abstract socket).
        watchdog_s: the watchdog timeout from ``WATCHDOG_USEC``, or None.
    """

    def __init__(self, address: str, watchdog_s: float | None = None) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_s = watchdog_s
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)

    @classmethod
    def from_environment(cls) -> SystemdNotifier | None:
        """The notifier systemd asked for, or None outside ``Type=notify``."""
        address = os.environ.get("NOTIFY_SOCKET")
        if not address:
            return None
        watchdog_s: float | None = None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog_s = int(usec) / 1_000_000
        return cls(address, watchdog_s)

    def notify(self, state: str) -> None:
        """Send one state line (``READY=1``, ``STOPPING=1``, ``WATCHDOG=1``...); never raises."""
        try:
            self._socket.sendto(state.encode("utf-8"), self.address)
        except OSError as exc:
            logger.warning("sd_notify %s failed: %s", state.split("=")[0], exc)

    async def serve_watchdog(self) -> None:
        """Ping the watchdog at half its timeout, from the event loop, until cancelled."""
        if self.watchdog_s is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_s / 2)

    def close(self) -> None:
        """Close the socket."""
        self._socket.close()


# -- transports -----------------------------------------------------------------------


def _nats_config(kind: TierKind, config: TierConfig, key_id: str) -> Any:
    from fedtier.protocol.bus.nats import NatsConfig, StreamSpec

    subjects = NatsSubjects(config.fleet)
    up_name, up_subjects = subjects.up_stream()
    model_name, model_subjects = subjects.model_stream()
    settings = config.nats
    manage = settings.manage_streams if settings.manage_streams is not None else kind == "central"
    return NatsConfig(
        servers=settings.servers,
        name=f"fedtier-{kind}-{key_id[:8]}",
        tls_ca_file=settings.tls_ca_file,
        tls_cert_file=settings.tls_cert_file,
        tls_key_file=settings.tls_key_file,
        nkeys_seed_file=settings.nkeys_seed_file,
        credentials_file=settings.credentials_file,
        require_sync_always=settings.require_sync_always,
        monitoring_url=settings.monitoring_url,
        monitoring_urls=settings.monitoring_urls,
        # Every KV bucket and object store this daemon creates; the streams below.
        replicas=settings.replicas,
        jetstream_domain=settings.jetstream_domain,
        ack_wait_s=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        inbox_prefix=settings.inbox_prefix,
        max_hold_s=settings.max_hold_s,
        max_parted_bytes=settings.max_parted_bytes,
        startup_backoff_s=config.retry.initial_backoff_s,
        startup_max_backoff_s=config.retry.max_backoff_s,
        manage_streams=manage,
        # A daemon that does not create the streams may start first: it waits
        # for the one that does, saying so in its log, instead of exiting.
        wait_for_streams=not manage,
        streams=(
            # Work-queue retention (a partial goes once its one consumer acked it;
            # kept while that consumer does not exist yet), a byte cap and discard
            # new: a full stream refuses publishes, which wait in the publishers'
            # outboxes, instead of dropping partials (docs/operations.md,
            # retention and limits).
            StreamSpec(
                up_name,
                (up_subjects,),
                config.retention.up_stream_max_age_s,
                min(_DEDUPE_WINDOW_S, config.retention.up_stream_max_age_s),
                replicas=settings.replicas,
                max_bytes=config.retention.up_stream_max_bytes,
                discard="new",
                retention="workqueue",
            ),
            StreamSpec(
                model_name,
                (model_subjects,),
                _MODEL_MAX_AGE_S,
                _DEDUPE_WINDOW_S,
                max_msgs_per_subject=16,
                replicas=settings.replicas,
            ),
        ),
    )


@asynccontextmanager
async def _open_mqtt(config: EdgeConfig) -> AsyncIterator[Bus]:
    from fedtier.protocol.bus.mqtt import MqttConfig, open_mqtt_bus

    settings = config.mqtt
    mqtt_config = MqttConfig(
        host=settings.host,
        port=settings.port,
        client_id=settings.client_id or "fedtier-edge",
        keepalive_s=settings.keepalive_s,
        session_expiry_s=settings.session_expiry_s,
        connect_timeout_s=settings.connect_timeout_s,
        # The broker does not honour Receive Maximum once acks flow; the bus
        # bounds itself, and the intake never holds more than this anyway.
        receive_maximum=config.intake_capacity,
        ca_file=settings.tls_ca_file,
        cert_file=settings.tls_cert_file,
        key_file=settings.tls_key_file,
        shared_durables=settings.shared_subscription,
        # With [lease], an instance starts on a fresh session: what the broker queued
        # for it while another instance was active went to that one too (or, never
        # receipted, comes back from its device); replayed here, it would be folded
        # a second time (docs/architecture.md, "An edge survives the loss of its
        # machine").
        fresh_session=config.lease.enabled,
    )
    async with AsyncExitStack() as stack:
        # Like the NATS connect, the first MQTT connect retries a few times: an
        # edge restarted while its broker restarts too (a power cut, a crash
        # loop) must wait for it, not exit.
        delay_s = config.retry.initial_backoff_s
        for attempt in range(1, MQTT_CONNECT_ATTEMPTS + 1):
            try:
                bus: Bus = await stack.enter_async_context(open_mqtt_bus(mqtt_config))
                break
            except BusUnavailable as exc:
                if attempt == MQTT_CONNECT_ATTEMPTS:
                    raise
                logger.warning(
                    "MQTT broker not reachable (attempt %d of %d): %s; retrying in %.1f s",
                    attempt,
                    MQTT_CONNECT_ATTEMPTS,
                    exc,
                    delay_s,
                )
            await trio.sleep(delay_s)
            delay_s = min(delay_s * 2, config.retry.max_backoff_s)
        yield bus


# -- the process ----------------------------------------------------------------------


class _Lifecycle:
    """How far the daemon got, which decides what a signal means.

    Attributes:
        notifier: the systemd notifier, or None outside ``Type=notify``.
        startup: cancelled by a stop signal that comes before the daemon exists
            (connecting, waiting for streams): there is nothing to flush yet.
        hard_stop: cancelled by a second stop signal: stop at once.
        keys: the key registries, once loaded (SIGHUP reloads them).
        daemon: the daemon, once built (a stop signal asks it to shut down cleanly).
        stopping: a stop signal came.
    """

    def __init__(self, notifier: SystemdNotifier | None) -> None:
        self.notifier = notifier
        self.startup = trio.CancelScope()
        self.hard_stop = trio.CancelScope()
        self.keys: TierKeys | None = None
        self.daemon: TierDaemon | None = None
        self.stopping = False

    def on_signal(self, signum: int) -> None:
        """Act on one of ``DAEMON_SIGNALS``; never raises."""
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            self._reload(name)
            return
        if self.stopping:
            logger.warning("second %s: stopping now", name)
            self.hard_stop.cancel()
            return
        self.stopping = True
        if self.notifier is not None:
            self.notifier.notify("STOPPING=1")
        if self.daemon is None:
            logger.info("%s during start-up: stopping before serving", name)
            self.startup.cancel()
        else:
            logger.info("%s: shutting down cleanly", name)
            self.daemon.request_shutdown()

    def _reload(self, name: str) -> None:
        if self.keys is None:
            logger.info(
                "%s during start-up, before the key registries were read: nothing to reload "
                "(they are read as start-up goes on)",
                name,
            )
            return
        try:
            self.keys.senders.reload()
        except FedtierError as exc:
            logger.error("key registry reload failed, keeping the old keys: %s", exc)
        else:
            logger.info(
                "%s: key registry reloaded: %d %s keys",
                name,
                len(self.keys.senders),
                self.keys.senders.role,
            )
        if isinstance(self.daemon, CentralDaemon):
            # A new key in identity_key takes over once the root's certificate for it
            # is published (tiers._identity); never raises.
            self.daemon.identity_reload.request()
        if self.daemon is not None:
            # Inputs quarantined for a sender the registry did not know (or released
            # by an operator) go through the core's admission again.
            try:
                self.daemon.readmit_quarantined()
            except FedtierError as exc:
                logger.error("re-admission of quarantined inputs failed: %s", exc)


async def _watch_signals(signals: AsyncIterator[int], life: _Lifecycle) -> None:
    async for signum in signals:
        life.on_signal(signum)


async def serve_daemon(
    kind: TierKind,
    config: TierConfig,
    *,
    held: HeldSignals | None = None,
    evaluator: ModelEvaluator | None = None,
) -> None:
    """Run the ``kind`` daemon of ``config`` with real transports until it stops.

    ``evaluator`` scores the central's model versions (``[evaluation]``; built
    by the composition root, since tiers never import the client).

    Signals are received from the first instant of the event loop, before
    anything is imported, connected or waited for; ``held`` hands over those
    that came earlier (see ``fedtier.tiers._signals``). SIGTERM or SIGINT during
    start-up ends it without serving (nothing was taken in yet), after start-up
    it shuts down cleanly; a second one stops at once. SIGHUP reloads the key
    registries, or is logged as having nothing to reload yet.

    Raises:
        FedtierError: configuration, keys, store or transports fail.
    """
    life = _Lifecycle(SystemdNotifier.from_environment())
    try:
        with life.hard_stop, trio.open_signal_receiver(*DAEMON_SIGNALS) as signals:
            # Those that came before the event loop listened, in arrival order,
            # before anything else happens.
            for signum in held.take() if held is not None else ():
                life.on_signal(signum)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_signals, signals, life)
                if life.notifier is not None:
                    # From the start, not from READY: a start-up wedged in the
                    # event loop gets the process restarted too.
                    nursery.start_soon(life.notifier.serve_watchdog)
                with life.startup:
                    await _serve(kind, config, life, evaluator)
                if life.startup.cancelled_caught:
                    logger.info("%s daemon stopped during start-up", kind)
                nursery.cancel_scope.cancel()
    finally:
        if life.notifier is not None:
            life.notifier.close()


async def _serve(
    kind: TierKind, config: TierConfig, life: _Lifecycle, evaluator: ModelEvaluator | None
) -> None:
    from fedtier.protocol.bus.nats import open_nats_bus, open_nats_loop
    from fedtier.protocol.telemetry.metrics import TierMetrics, setup_metrics
    from fedtier.protocol.telemetry.tracing import setup_tracing

    keys = life.keys = _DAEMONS[kind].load_keys(config)
    key_id = keys.identity.key_id
    service = f"fedtier-{kind}"
    tracing = setup_tracing(
        service,
        instance_id=key_id,
        jsonl_dir=config.telemetry.jsonl_dir,
        jsonl_max_bytes=config.retention.span_file_max_bytes,
        jsonl_keep=config.retention.span_files_keep,
    )
    try:
        with setup_metrics(
            prometheus_host=config.telemetry.prometheus_host,
            prometheus_port=config.telemetry.prometheus_port,
            service_name=service,
            instance_id=key_id,
        ):
            metrics = TierMetrics(kind, key_id)
            async with open_nats_loop(), open_nats_bus(_nats_config(kind, config, key_id)) as nats:
                registry = await open_registry(nats, config, metrics)
                async with _open_daemon(
                    kind, config, nats, registry, keys, metrics, tracing, evaluator
                ) as daemon:
                    life.daemon = daemon
                    if config.lease.enabled:
                        await _attach_lease(daemon, nats, config, metrics)
                    # `fedtier status`: one snapshot per [status] interval_s, best effort.
                    async with (
                        publish_status(daemon, nats, stopping=lambda: life.stopping),
                        # Dashboards and alerts: outbox, disk, nats-server checks.
                        run_probes(daemon, metrics),
                        # [retention]: prune horizons of the state store.
                        run_pruner(daemon),
                        trio.open_nursery() as nursery,
                    ):
                        await nursery.start(daemon.serve)
                        if life.notifier is not None:
                            life.notifier.notify("READY=1")
    finally:
        tracing.shutdown()


async def _attach_lease(daemon: TierDaemon, nats: Any, config: TierConfig, metrics: Any) -> None:
    """Give ``daemon`` its lease (``[lease] enabled``), and an edge or regional its intents bucket.

    The lease bucket's ``max_age`` is the TTL: the first daemon to create the
    bucket sets it, so every instance of a fleet must use the same ``ttl_s``.
    """
    subjects = NatsSubjects(config.fleet)
    retry = functools.partial(retry_transient, retry=config.retry, metrics=metrics, log=logger)
    settings = config.lease
    kv = await retry(
        "open of the lease bucket",
        "open_lease",
        lambda: nats.kv_bucket(subjects.lease_bucket(), max_age_s=settings.ttl_s),
    )
    key = NatsSubjects.lease_key(
        daemon.tier,
        None if daemon.tier == "central" else getattr(config, "region", None),
        getattr(config, "site", None) if daemon.tier == "edge" else None,
    )
    daemon.lease = Lease(kv, key, ttl_s=settings.ttl_s, instance=settings.instance)
    if isinstance(daemon, FollowerDaemon):
        daemon.forwarded = await retry(
            "open of the forwarded bucket",
            "open_lease",
            # A takeover decides on what an intent's key holds: never a stale replica's.
            lambda: nats.kv_bucket(
                subjects.forwarded_bucket(), max_age_s=FORWARDED_MAX_AGE_S, leader_reads=True
            ),
        )


async def open_registry(nats: Any, config: TierConfig, metrics: Any) -> NatsModelRegistry:
    """Bind the model registry's KV bucket and object store, retrying transient failures.

    A daemon that starts while nats-server restarts (or its link flaps) gets
    no reply in time: that is retried with the config's backoff, each retry
    logged and counted, like every other bus operation of a running daemon.
    """
    subjects = NatsSubjects(config.fleet)
    retry = functools.partial(retry_transient, retry=config.retry, metrics=metrics, log=logger)
    kv = await retry(
        "open of the model registry bucket",
        "open_registry",
        lambda: nats.kv_bucket(subjects.model_bucket()),
    )
    blobs = await retry(
        "open of the model blob store",
        "open_registry",
        lambda: nats.object_store(subjects.blob_store()),
    )
    return NatsModelRegistry(kv, blobs, max_blob_bytes=config.limits.max_envelope_bytes)


@asynccontextmanager
async def _open_daemon(
    kind: TierKind,
    config: TierConfig,
    nats: Bus,
    registry: NatsModelRegistry,
    keys: TierKeys,
    metrics: Any,
    tracing: Any,
    evaluator: ModelEvaluator | None = None,
) -> AsyncIterator[TierDaemon]:
    common: dict[str, Any] = {"keys": keys, "metrics": metrics, "tracer": tracing.tracer}
    if kind == "edge":
        assert isinstance(config, EdgeConfig)
        async with _open_mqtt(config) as mqtt:
            # One daemon per process: its collector is tuned once it started.
            yield EdgeDaemon(
                config, mqtt=mqtt, nats=nats, registry_store=registry, gc_tuning=True, **common
            )
    elif kind == "regional":
        assert isinstance(config, RegionalConfig)
        yield RegionalDaemon(config, nats=nats, registry_store=registry, **common)
    else:
        assert isinstance(config, CentralConfig)
        yield CentralDaemon(config, nats=nats, registry=registry, evaluator=evaluator, **common)


def run_daemon(
    kind: str,
    config_path: Path | str,
    *,
    make_evaluator: Callable[[TierConfig], ModelEvaluator | None] | None = None,
) -> int:
    """Run a tier daemon from its TOML config until SIGTERM/SIGINT; return the exit status.

    ``make_evaluator`` builds the central's evaluator from the loaded config
    (``fedtier central`` passes ``fedtier._evaluation.build_evaluator``), before
    the daemon starts: its errors are configuration errors.

    Returns:
        0 after a clean stop, 2 for an unusable configuration, 1 when the daemon
        failed (the reason is logged as one sentence).
    """
    # Idempotent: ``fedtier.tiers.cli`` already holds them before importing this
    # module; a caller that did not gets them held from here on.
    held = hold_signals()
    try:
        return _run_daemon(kind, config_path, held, make_evaluator)
    finally:
        held.release()


def _run_daemon(
    kind: str,
    config_path: Path | str,
    held: HeldSignals,
    make_evaluator: Callable[[TierConfig], ModelEvaluator | None] | None,
) -> int:
    configure_logging()
    if kind not in _DAEMONS:
        logger.error("daemon kind %r is not one of edge, regional, central", kind)
        return 2
    tier_kind: TierKind = kind  # type: ignore[assignment]  # checked above
    try:
        config = load_config(tier_kind, Path(config_path))
        # Crash points and unsafe switches for the chaos suite; off unless set.
        for warning in faults.configure_from_environment():
            logger.warning("%s", warning)
        evaluator = make_evaluator(config) if make_evaluator is not None else None
    except FedtierError as exc:
        logger.error("%s", exc)
        return 2
    try:
        trio.run(functools.partial(serve_daemon, tier_kind, config, held=held, evaluator=evaluator))
    except BaseException as exc:  # mapped to an exit status below
        error = sole_error(exc)
        if isinstance(error, FedtierError):
            logger.error("%s daemon stopped: %s", kind, error)
            return 1
        if isinstance(error, KeyboardInterrupt):
            return 130
        raise
    return 0
