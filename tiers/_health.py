"""The daemon's operational probes behind the dashboards and alerts; never imports a bus adapter.

What it owns: sampling what no event reports by itself (a stuck outbox, a disk
filling up, a nats-server restarted without ``sync_interval: always``, a
JetStream consumer falling behind, messages the MQTT broker dropped) into the
operational series of ``protocol.telemetry.metrics`` (docs/operations.md,
metrics). It must not import ``client``, ``simulations`` or a concrete bus: the
daemon shell hands it the daemon and its metrics.

Why polling: these are states, not events. An outbox whose publishes hang
changes nothing the daemon would notice, so its age has to be looked at. Local
state is read every ``LOCAL_INTERVAL_S`` (cheap: a few attributes and one
``statvfs``); nats-server's monitoring endpoint, where the ``sync_interval``
check, the consumer's ``num_pending`` and the UP stream's bytes are, every
``MONITORING_INTERVAL_S`` (the endpoint is shared by every daemon of a region:
keep the load modest).
The dropped-message count comes from Mosquitto itself: the edge subscribes to
``$SYS/broker/publish/messages/dropped``, which Mosquitto publishes (retained)
every ``sys_interval``; the edge's own bus never drops a message (it stops
reading instead), so counting on this side would always say 0.

A probe never raises into the daemon: a source that cannot be read is logged
(the first failure of each probe, then once per ``_LOG_EVERY_S``) and counted
in ``fedtier_probe_errors_total{probe}``; the series it feeds keep their last
value.
"""

from __future__ import annotations

import json
import logging
import math
import os
import ssl
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import trio

from fedtier.protocol.envelope import parse_envelope
from fedtier.protocol.errors import BusError, FedtierError
from fedtier.protocol.messages import ModelAnnouncement
from fedtier.tiers.central import CentralDaemon
from fedtier.tiers.edge import EdgeDaemon
from fedtier.tiers.regional import RegionalDaemon
from fedtier.tiers.tier import TierDaemon

__all__ = [
    "BROKER_DROPPED_TOPIC",
    "CRITICAL_FREE_RATIO",
    "LOCAL_INTERVAL_S",
    "LOW_FREE_RATIO",
    "MONITORING_INTERVAL_S",
    "HealthMetrics",
    "HealthProbes",
    "consumer_pending",
    "disk_watermark",
    "run_probes",
    "stream_bytes",
    "sync_always_of",
]

logger = logging.getLogger("fedtier.health")

LOCAL_INTERVAL_S: Final = 5.0
"""Seconds between samples of the daemon's own state (outbox, model, disk)."""
MONITORING_INTERVAL_S: Final = 30.0
"""Seconds between reads of nats-server's monitoring endpoint (``/varz``, ``/jsz``)."""
LOW_FREE_RATIO: Final = 0.15
"""Below this share of free space the state directory's watermark is 1 (low)."""
CRITICAL_FREE_RATIO: Final = 0.05
"""Below this share it is 2 (critical): sqlite commits may fail soon, and with them intake."""
BROKER_DROPPED_TOPIC: Final = "$SYS/broker/publish/messages/dropped"
"""Mosquitto's count of messages it dropped since it started (queue limits)."""
_HTTP_TIMEOUT_S: Final = 5.0
_LOG_EVERY_S: Final = 600.0


class HealthMetrics(Protocol):
    """What the probes record; ``protocol.telemetry.metrics.TierMetrics`` has this shape."""

    def model_version_created(self, created_ms: int, /) -> None:
        """Set when the known model version was made."""

    def buffer_flush_inputs(self, max_inputs: int, /) -> None:
        """Set the flush threshold."""

    def outbox(self, jobs: int, oldest_age_s: float, /) -> None:
        """Set the outbox depth and the oldest job's age."""

    def consumer_lag(self, stream: str, consumer: str, pending: int, ack_pending: int, /) -> None:
        """Set a JetStream consumer's pending counts."""

    def jetstream_stream(self, stream: str, size_bytes: int, max_bytes: int, /) -> None:
        """Set a stream's stored bytes and its byte cap."""

    def nats_sync_always(self, server: str, ok: bool, /) -> None:
        """Set the sync check of one server."""

    def state_disk(self, free_bytes: int, size_bytes: int, watermark: int, /) -> None:
        """Set the state directory's disk figures."""

    def broker_dropped(self, broker: str, dropped: int, /) -> None:
        """Set the broker's dropped-message count."""

    def probe_failed(self, probe: str, /) -> None:
        """Count a probe that could not read its source."""


def disk_watermark(free_bytes: int, size_bytes: int) -> int:
    """0 (ok), 1 (low: under 15 % free) or 2 (critical: under 5 %) for a filesystem."""
    if size_bytes <= 0:
        return 0
    ratio = free_bytes / size_bytes
    if ratio < CRITICAL_FREE_RATIO:
        return 2
    if ratio < LOW_FREE_RATIO:
        return 1
    return 0


def _disk_usage(path: Path) -> tuple[int, int]:
    # f_bavail: what this (unprivileged) daemon may still write, not root's reserve.
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize


def _read_json(url: str, cafile: Path | None) -> Any:
    if not url.startswith(("http://", "https://")):  # urlopen would also open file: URLs
        raise ValueError(f"not an http(s) URL: {url!r}")
    ctx = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S, context=ctx) as resp:  # noqa: S310
        return json.loads(resp.read())


def consumer_pending(jsz: Mapping[str, Any], stream: str, consumer: str) -> tuple[int, int] | None:
    """``(num_pending, num_ack_pending)`` of ``stream``/``consumer`` in a ``/jsz`` answer.

    None when the server does not hold that consumer (another server of the
    cluster may, or it is not created yet).
    """
    for account in jsz.get("account_details") or ():
        for detail in account.get("stream_detail") or ():
            if detail.get("name") != stream:
                continue
            for info in detail.get("consumer_detail") or ():
                if info.get("name") == consumer:
                    return int(info.get("num_pending", 0)), int(info.get("num_ack_pending", 0))
    return None


def stream_bytes(jsz: Mapping[str, Any], stream: str) -> int | None:
    """The bytes ``stream`` holds in a ``/jsz`` answer; None when it lists no state for it."""
    for account in jsz.get("account_details") or ():
        for detail in account.get("stream_detail") or ():
            if detail.get("name") == stream and isinstance(detail.get("state"), Mapping):
                return int(detail["state"].get("bytes", 0))
    return None


def sync_always_of(varz: Mapping[str, Any]) -> tuple[str, bool]:
    """The server's name and whether it fsyncs every JetStream write, from ``/varz``.

    The same field the start-up check reads (``jetstream.config.sync_always``);
    a server without JetStream counts as not syncing.
    """
    server = str(varz.get("server_name") or varz.get("server_id") or "")
    js_config = (varz.get("jetstream") or {}).get("config") or {}
    return server, js_config.get("sync_always") is True


@dataclass(frozen=True, slots=True)
class _Consumer:
    stream: str
    durable: str


class HealthProbes:
    """Samples one daemon's operational state into its metrics.

    Args:
        daemon: the daemon watched; its state is read only once it is serving.
        metrics: where the samples go.
        local_interval_s: seconds between samples of the daemon's own state.
        monitoring_interval_s: seconds between reads of nats-server's monitoring
            endpoint (and between tries of the broker subscription).
    """

    def __init__(
        self,
        daemon: TierDaemon,
        metrics: HealthMetrics,
        *,
        local_interval_s: float = LOCAL_INTERVAL_S,
        monitoring_interval_s: float = MONITORING_INTERVAL_S,
    ) -> None:
        self.daemon = daemon
        self.metrics = metrics
        self.local_interval_s = local_interval_s
        self.monitoring_interval_s = monitoring_interval_s
        nats = daemon.config.nats
        # Every server the daemon's fsync check reads (a cluster's three), once each.
        bases = [url.rstrip("/") for url in (nats.monitoring_url, *nats.monitoring_urls) if url]
        bases = list(dict.fromkeys(bases))
        self._varz_urls = [f"{base}/varz" for base in bases]
        self._jsz_urls = [f"{base}/jsz?consumers=true" for base in bases]
        self._cafile = nats.tls_ca_file
        self.consumer = self._consumer_of(daemon)
        self._pointer: bytes | None = None
        self._last_logged: dict[str, float] = {}

    @staticmethod
    def _consumer_of(daemon: TierDaemon) -> _Consumer | None:
        """The durable JetStream consumer this daemon reads its inputs through, if any."""
        if isinstance(daemon, RegionalDaemon):
            subjects = daemon.subjects
            region = daemon.regional_config.region
            return _Consumer(subjects.up_stream()[0], subjects.regional_consumer(region))
        if isinstance(daemon, CentralDaemon):
            return _Consumer(daemon.subjects.up_stream()[0], daemon.subjects.central_consumer())
        return None  # the edge reads MQTT

    def _failed(self, probe: str, exc: BaseException | str) -> None:
        self.metrics.probe_failed(probe)
        now = trio.current_time()
        last = self._last_logged.get(probe, -math.inf)
        if now - last >= _LOG_EVERY_S:
            self._last_logged[probe] = now
            logger.warning(
                "probe %s failed: %s (its metrics keep their last value; logged again in %.0f s "
                "at most)",
                probe,
                exc,
                _LOG_EVERY_S,
            )

    # -- the daemon's own state ---------------------------------------------------------

    def sample_daemon(self) -> None:
        """Outbox depth and age, the known version's creation time; nothing before serving."""
        daemon = self.daemon
        if not daemon.ready.is_set():
            return
        upstream = daemon.upstream
        self.metrics.outbox(upstream.outstanding, upstream.oldest_age_s())
        # The verified pointer the daemon works against; parsed again only when it changes.
        pointer = daemon._model_view().pointer
        if pointer and pointer != self._pointer:
            self._pointer = pointer
            try:
                message = parse_envelope(pointer, daemon.config.limits).message
            except FedtierError as exc:
                self._failed("model", exc)
                return
            if isinstance(message, ModelAnnouncement):
                self.metrics.model_version_created(message.created_ms)

    async def sample_disk(self) -> None:
        """Free bytes, size and watermark of the state directory's filesystem.

        Nothing before the daemon serves: its store (and the state directory
        a fresh install does not have yet) is made while it starts, and a
        missing directory then is no failure of the disk.
        """
        if not self.daemon.ready.is_set():
            return
        try:
            # A worker thread: statvfs on a stalled disk must not stall the event loop.
            free, size = await trio.to_thread.run_sync(
                _disk_usage, self.daemon.config.state_dir, abandon_on_cancel=True
            )
        except OSError as exc:
            self._failed("disk", exc)
            return
        self.metrics.state_disk(free, size, disk_watermark(free, size))

    # -- nats-server's monitoring endpoint ---------------------------------------------

    async def sample_monitoring(self) -> None:
        """The fsync check of every server, this tier's consumer lag and its stream's bytes.

        With no monitoring URL there is nothing to read.
        """
        for varz_url in self._varz_urls:
            varz = await self._get("varz", varz_url)
            if isinstance(varz, Mapping):
                server, ok = sync_always_of(varz)
                self.metrics.nats_sync_always(server or varz_url, ok)
        if self.consumer is None:
            return
        # The consumer's state is the same on every server holding a replica:
        # the first that lists it answers.
        answered = False
        for jsz_url in self._jsz_urls:
            jsz = await self._get("jsz", jsz_url)  # an unreachable one is counted there
            if not isinstance(jsz, Mapping):
                continue
            answered = True
            size = stream_bytes(jsz, self.consumer.stream)
            if size is not None:
                # The cap is this daemon's configured one (the central sets it on
                # the stream): the alert compares the two before the stream fills.
                cap = self.daemon.config.retention.up_stream_max_bytes
                self.metrics.jetstream_stream(self.consumer.stream, size, cap)
            pending = consumer_pending(jsz, self.consumer.stream, self.consumer.durable)
            if pending is not None:
                self.metrics.consumer_lag(self.consumer.stream, self.consumer.durable, *pending)
                return
        if answered:
            self._failed(
                "jsz",
                f"no monitoring endpoint lists consumer {self.consumer.durable!r} on stream "
                f"{self.consumer.stream!r}",
            )

    async def _get(self, probe: str, url: str) -> Any:
        try:
            return await trio.to_thread.run_sync(
                _read_json, url, self._cafile, abandon_on_cancel=True
            )
        except (OSError, ValueError) as exc:  # unreachable, timed out, not JSON
            self._failed(probe, exc)
            return None

    # -- the MQTT broker's $SYS tree (edge) ----------------------------------------------

    async def watch_broker_drops(self, daemon: EdgeDaemon) -> None:
        """Follow Mosquitto's dropped-message count until cancelled.

        A subscription the ACL refuses is reported once and not retried (the
        ACL must grant the edge ``read`` on the topic; docs/operations.md). A
        broker that refuses silently (Mosquitto 2.0 accepts the subscription
        and delivers nothing) leaves the series absent.
        """
        settings = daemon.edge_config.mqtt
        broker = f"{settings.host}:{settings.port}"
        # After the intake's own subscription: the probe never opens the broker link first.
        await daemon.ready.wait()
        while True:
            try:
                async with daemon.mqtt.subscribe(BROKER_DROPPED_TOPIC, capacity=4) as sub:
                    async for delivery in sub:
                        try:
                            dropped = int(bytes(delivery.payload).decode("ascii").strip())
                        except (UnicodeDecodeError, ValueError):
                            self._failed("mqtt_sys", f"not a count: {delivery.payload[:40]!r}")
                        else:
                            self.metrics.broker_dropped(broker, dropped)
                        await delivery.ack()
            except BusError as exc:  # the broker is away: try again later
                self._failed("mqtt_sys", exc)
            except FedtierError as exc:  # refused (ACL, filter): it will not change
                self._failed("mqtt_sys", exc)
                return
            await trio.sleep(self.monitoring_interval_s)

    # -- running -----------------------------------------------------------------------

    async def _guarded(self, probe: str, sample: Callable[[], Awaitable[None]]) -> None:
        # Best effort by design: an unexpected error is one failed sample, never a
        # daemon crash.
        try:
            await sample()
        except Exception as exc:
            self._failed(probe, exc)

    async def _serve_local(self) -> None:
        while True:
            try:
                self.sample_daemon()
            except Exception as exc:  # best effort, as in _guarded
                self._failed("local", exc)
            await self._guarded("disk", self.sample_disk)
            await trio.sleep(self.local_interval_s)

    async def _serve_monitoring(self) -> None:
        # From serving on: the consumer exists by then (the start-up check read
        # /varz already), and the first lag sample is not a spurious failure.
        await self.daemon.ready.wait()
        while True:
            await self._guarded("monitoring", self.sample_monitoring)
            await trio.sleep(self.monitoring_interval_s)

    async def serve(self) -> None:
        """Sample until cancelled."""
        self.metrics.buffer_flush_inputs(self.daemon.config.flush.max_inputs)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._serve_local)
            nursery.start_soon(self._serve_monitoring)
            edge = self.daemon
            if isinstance(edge, EdgeDaemon):
                nursery.start_soon(self._guarded, "mqtt_sys", lambda: self.watch_broker_drops(edge))


@asynccontextmanager
async def run_probes(daemon: TierDaemon, metrics: HealthMetrics) -> AsyncIterator[HealthProbes]:
    """Run the daemon's probes for the duration of the block (cancelled at its end)."""
    probes = HealthProbes(daemon, metrics)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probes.serve)
        try:
            yield probes
        finally:
            nursery.cancel_scope.cancel()
