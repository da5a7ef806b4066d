"""Tier metrics and their Prometheus endpoint; never imports trio, a bus, ``tiers`` or ``client``.

Uses the OpenTelemetry SDK, its Prometheus reader, ``prometheus_client`` and the
standard library, so any process (device fleet, daemon, simulator) can use it.

Series (Prometheus names; every series also has ``tier`` and ``fedtier_instance``)::

    fedtier_updates_total{outcome,reason}       M5  accepted / duplicate / rejected (+reason)
    fedtier_update_bytes                        M4  histogram of encoded update sizes
    fedtier_staleness_versions                  M6  histogram of tau = v_tier - base_version
    fedtier_anomalous_updates_total{detector}   M8  norm_clipped, norm_exceeded, non_finite, ...
    fedtier_active_devices                      M1  distinct devices seen in the current window
    fedtier_aggregation_seconds                 M2  work time of one flush
    fedtier_aggregate_latency_seconds               oldest input's creation -> flush
    fedtier_buffer_inputs                       F4  inputs waiting in the open buffer
    fedtier_model_version                       F8  the version this process knows
    fedtier_retries_total{operation}            F7  retried transient failures
    fedtier_flushed_inputs_total{reason}            inputs folded, by flush reason
    fedtier_model_metric{metric}                    central: the held-out evaluation of
                                                    the newest evaluated model version
    fedtier_model_metric_version                    central: the version it measured
    fedtier_evaluation_failures_total               central: evaluator runs that failed
    fedtier_quarantined_inputs{reason}              inputs acknowledged but held in quarantine
    fedtier_quarantine_bytes                        bytes held in quarantine
    fedtier_quarantine_refusals_total               inputs left unacknowledged (quarantine full)

Operational series, sampled by the daemon's probes (``tiers._health``) every few
seconds (local state) or every 30 s (nats-server's monitoring endpoint)::

    fedtier_model_version_created_seconds       F8  Unix time the known version was made
                                                    (``time() - x``: time since a new version)
    fedtier_buffer_flush_inputs                 F4  the flush threshold (``max_inputs``):
                                                    buffer fill = buffer_inputs / this
    fedtier_outbox_partials                     F7  jobs not yet acknowledged upstream
    fedtier_outbox_oldest_age_seconds           F7  age of the oldest of them (upstream lag)
    fedtier_jetstream_consumer_pending{stream,consumer}
                                                F4  messages not yet delivered (consumer lag)
    fedtier_jetstream_consumer_ack_pending{stream,consumer}
                                                    delivered, not yet acknowledged
    fedtier_jetstream_stream_bytes{stream}          bytes the stream holds (its state)
    fedtier_jetstream_stream_max_bytes{stream}      its byte cap; a full stream refuses publishes
    fedtier_nats_sync_always{server}                1 when the server fsyncs every write
    fedtier_state_disk_free_bytes                   free bytes of the state directory's disk
    fedtier_state_disk_size_bytes                   that filesystem's size
    fedtier_state_disk_watermark                    0 ok, 1 low (< 15 % free), 2 critical (< 5 %)
    fedtier_mqtt_broker_dropped_messages{broker}    edge: the broker's own count of dropped
                                                    messages since it started ($SYS)
    fedtier_probe_errors_total{probe}               probes that could not read their source

The label is ``fedtier_instance`` and not ``instance`` because Prometheus sets
``instance`` to the scrape target. Pass a daemon or process id as the instance,
never a device id: one ``TierMetrics`` serves a whole simulated fleet.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
from collections.abc import Mapping
from http.server import HTTPServer
from types import TracebackType
from typing import Final

from opentelemetry import metrics
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Counter, Histogram, MeterProvider, _Gauge
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter
from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.util.types import Attributes
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

__all__ = ["METER_NAME", "MetricsHandle", "TierMetrics", "setup_metrics"]

_logger = logging.getLogger(__name__)

METER_NAME: Final = "fedtier"

# Bucket bounds are advisory (the SDK's defaults, 0..10 000, fit none of these).
_BYTES_BUCKETS: Final = tuple(float(256 * 4**k) for k in range(10))  # 256 B .. 64 MiB
_STALENESS_BUCKETS: Final = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0)
_WORK_SECONDS_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_LATENCY_SECONDS_BUCKETS: Final = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0,
)  # fmt: skip

# A scrape that stalls must not hold the endpoint forever.
_SCRAPE_TIMEOUT_S: Final = 10.0
# serve_forever checks for shutdown this often; it bounds how long shutdown() waits.
_SHUTDOWN_POLL_S: Final = 0.05


class TierMetrics:
    """The instruments one tier daemon (or one simulated fleet) records into.

    Every method is a single SDK call with attribute dicts built ahead of time,
    safe from any thread. With no SDK provider installed (``setup_metrics`` not
    called, port ``None``, or ``OTEL_SDK_DISABLED=true``) every call is a no-op.

    Args:
        tier: ``device``, ``edge``, ``regional`` or ``central``.
        instance: the daemon's id (or the simulation process's), a label value.
        meter_provider: the provider to record into; ``None`` means the global
            one, which is a no-op proxy until ``setup_metrics`` installs one (and
            then forwards to it, whichever came first).
    """

    __slots__ = (
        "_active_devices",
        "_aggregate_latency",
        "_aggregation_seconds",
        "_anomalous",
        "_base",
        "_broker_dropped",
        "_buffer_flush_inputs",
        "_buffer_inputs",
        "_by_label",
        "_consumer_ack_pending",
        "_consumer_pending",
        "_disk_free",
        "_disk_size",
        "_disk_watermark",
        "_evaluation_failures",
        "_flushed",
        "_model_created",
        "_model_metric",
        "_model_metric_version",
        "_model_version",
        "_outbox_age",
        "_outbox_partials",
        "_probe_errors",
        "_quarantine_bytes",
        "_quarantine_refusals",
        "_quarantined",
        "_retries",
        "_staleness",
        "_stream_bytes",
        "_stream_max_bytes",
        "_sync_always",
        "_update_bytes",
        "_updates",
        "instance",
        "tier",
    )

    def __init__(
        self, tier: str, instance: str, meter_provider: MeterProvider | None = None
    ) -> None:
        self.tier = tier
        self.instance = instance
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter(METER_NAME)
        self._base: dict[str, str] = {"tier": tier, "fedtier_instance": instance}
        # (label, value, ...) -> attributes; label values come from small fixed sets.
        self._by_label: dict[tuple[str, ...], dict[str, str]] = {}
        # Instruments of the same name are shared by every TierMetrics on a meter.
        self._updates: Counter = meter.create_counter(
            "fedtier_updates", "{update}", "Updates received, by outcome and rejection reason."
        )
        self._update_bytes: Histogram = meter.create_histogram(
            "fedtier_update_bytes",
            "By",
            "Encoded size of each received update.",
            explicit_bucket_boundaries_advisory=_BYTES_BUCKETS,
        )
        self._staleness: Histogram = meter.create_histogram(
            "fedtier_staleness_versions",
            "{version}",
            "Staleness tau: versions between an update's base and the tier's current model.",
            explicit_bucket_boundaries_advisory=_STALENESS_BUCKETS,
        )
        self._anomalous: Counter = meter.create_counter(
            "fedtier_anomalous_updates", "{update}", "Updates flagged by a detector."
        )
        self._active_devices: _Gauge = meter.create_gauge(
            "fedtier_active_devices", "{device}", "Distinct devices seen in the current window."
        )
        self._aggregation_seconds: Histogram = meter.create_histogram(
            "fedtier_aggregation_seconds",
            "s",
            "Work time of one flush (fold, encode, sign).",
            explicit_bucket_boundaries_advisory=_WORK_SECONDS_BUCKETS,
        )
        self._aggregate_latency: Histogram = meter.create_histogram(
            "fedtier_aggregate_latency_seconds",
            "s",
            "Time from the oldest input's creation to the flush that folded it.",
            explicit_bucket_boundaries_advisory=_LATENCY_SECONDS_BUCKETS,
        )
        self._buffer_inputs: _Gauge = meter.create_gauge(
            "fedtier_buffer_inputs", "{input}", "Inputs waiting in the open aggregation buffer."
        )
        self._model_version: _Gauge = meter.create_gauge(
            "fedtier_model_version", "{version}", "The model version this process knows."
        )
        self._retries: Counter = meter.create_counter(
            "fedtier_retries", "{retry}", "Retries of transient failures, by operation."
        )
        self._flushed: Counter = meter.create_counter(
            "fedtier_flushed_inputs",
            "{input}",
            "Inputs folded into a flushed aggregate, by reason.",
        )
        self._model_metric: _Gauge = meter.create_gauge(
            "fedtier_model_metric",
            "1",
            "Held-out evaluation of the newest evaluated model version, by metric.",
        )
        self._model_metric_version: _Gauge = meter.create_gauge(
            "fedtier_model_metric_version",
            "{version}",
            "The model version fedtier_model_metric measured.",
        )
        self._evaluation_failures: Counter = meter.create_counter(
            "fedtier_evaluation_failures",
            "{evaluation}",
            "Evaluations of a model version that failed (the version itself stands).",
        )
        self._quarantined: _Gauge = meter.create_gauge(
            "fedtier_quarantined_inputs",
            "{input}",
            "Inputs acknowledged but held in quarantine, by rejection reason.",
        )
        self._quarantine_bytes: _Gauge = meter.create_gauge(
            "fedtier_quarantine_bytes", "By", "Bytes held in quarantine."
        )
        self._quarantine_refusals: Counter = meter.create_counter(
            "fedtier_quarantine_refusals",
            "{input}",
            "Inputs left unacknowledged because the quarantine was full (alert on any).",
        )
        # The operational series below are set by the daemon's probes (tiers._health).
        self._model_created: _Gauge = meter.create_gauge(
            "fedtier_model_version_created_seconds",
            "s",
            "Unix time at which the central made the model version this process knows.",
        )
        self._buffer_flush_inputs: _Gauge = meter.create_gauge(
            "fedtier_buffer_flush_inputs",
            "{input}",
            "Inputs at which the open buffer is flushed (the flush policy's max_inputs).",
        )
        self._outbox_partials: _Gauge = meter.create_gauge(
            "fedtier_outbox_partials",
            "{job}",
            "Partials (central: model versions) not yet acknowledged upstream.",
        )
        self._outbox_age: _Gauge = meter.create_gauge(
            "fedtier_outbox_oldest_age_seconds",
            "s",
            "Age of the oldest job not yet acknowledged upstream; 0 when there is none.",
        )
        self._consumer_pending: _Gauge = meter.create_gauge(
            "fedtier_jetstream_consumer_pending",
            "{message}",
            "Messages of the stream not yet delivered to this tier's durable consumer.",
        )
        self._consumer_ack_pending: _Gauge = meter.create_gauge(
            "fedtier_jetstream_consumer_ack_pending",
            "{message}",
            "Messages delivered to this tier's durable consumer and not yet acknowledged.",
        )
        self._stream_bytes: _Gauge = meter.create_gauge(
            "fedtier_jetstream_stream_bytes",
            "By",
            "Bytes the JetStream stream holds, as its server reports them.",
        )
        self._stream_max_bytes: _Gauge = meter.create_gauge(
            "fedtier_jetstream_stream_max_bytes",
            "By",
            "The stream's byte cap (discard new: a full stream refuses publishes).",
        )
        self._sync_always: _Gauge = meter.create_gauge(
            "fedtier_nats_sync_always",
            "1",
            "1 when the nats-server fsyncs every JetStream write (sync_interval: always), else 0.",
        )
        self._disk_free: _Gauge = meter.create_gauge(
            "fedtier_state_disk_free_bytes",
            "By",
            "Bytes free for this daemon on the filesystem of its state directory.",
        )
        self._disk_size: _Gauge = meter.create_gauge(
            "fedtier_state_disk_size_bytes", "By", "Size of the state directory's filesystem."
        )
        self._disk_watermark: _Gauge = meter.create_gauge(
            "fedtier_state_disk_watermark",
            "1",
            "State directory disk: 0 ok, 1 low (< 15 % free), 2 critical (< 5 % free).",
        )
        self._broker_dropped: _Gauge = meter.create_gauge(
            "fedtier_mqtt_broker_dropped_messages",
            "{message}",
            "The MQTT broker's own count of messages it dropped since it started ($SYS).",
        )
        self._probe_errors: Counter = meter.create_counter(
            "fedtier_probe_errors",
            "{error}",
            "Probe runs that could not read their source (monitoring endpoint, disk, broker).",
        )

    def _labels(self, *pairs: str) -> Attributes:
        attributes = self._by_label.get(pairs)
        if attributes is None:
            attributes = dict(self._base)
            attributes.update(zip(pairs[::2], pairs[1::2], strict=True))
            self._by_label[pairs] = attributes
        return attributes

    def update_outcome(self, outcome: str, reason: str = "") -> None:
        """Count one received update: ``accepted``, ``duplicate`` or ``rejected`` (M5)."""
        self._updates.add(1, self._labels("outcome", outcome, "reason", reason))

    def update_bytes(self, size_bytes: int) -> None:
        """Record one update's encoded size (M4)."""
        self._update_bytes.record(size_bytes, self._base)

    def staleness(self, tau: int) -> None:
        """Record one input's staleness in versions (M6)."""
        self._staleness.record(tau, self._base)

    def anomalous(self, detector: str) -> None:
        """Count one update flagged by ``detector``, e.g. ``norm_clipped`` (M8)."""
        self._anomalous.add(1, self._labels("detector", detector))

    def participation(self, active_devices: int) -> None:
        """Set the number of distinct devices seen in the current window (M1)."""
        self._active_devices.set(active_devices, self._base)

    def aggregation_duration(self, seconds: float) -> None:
        """Record the work time of one flush (M2)."""
        self._aggregation_seconds.record(seconds, self._base)

    def aggregate_latency(self, seconds: float) -> None:
        """Record the time from a flush's oldest input's creation to the flush."""
        self._aggregate_latency.record(seconds, self._base)

    def buffer_depth(self, inputs: int) -> None:
        """Set the number of inputs in the open buffer (F4)."""
        self._buffer_inputs.set(inputs, self._base)

    def model_version(self, version: int) -> None:
        """Set the model version this process knows (F8 version skew)."""
        self._model_version.set(version, self._base)

    def retry(self, operation: str) -> None:
        """Count one retry of ``operation``, e.g. ``publish`` (F7)."""
        self._retries.add(1, self._labels("operation", operation))

    def inputs_flushed(self, count: int, reason: str) -> None:
        """Count ``count`` inputs folded by a flush triggered by ``reason``."""
        self._flushed.add(count, self._labels("reason", reason))

    def model_metrics(self, version: int, metrics: Mapping[str, float]) -> None:
        """Set the held-out metrics of model ``version``, e.g. ``{"accuracy": 0.93}``.

        Metric names come from the small fixed set the central evaluates, so
        they are safe label values.
        """
        self._model_metric_version.set(version, self._base)
        for name, value in metrics.items():
            self._model_metric.set(value, self._labels("metric", name))

    def evaluation_failed(self) -> None:
        """Count one evaluation that failed (the version was kept and published)."""
        self._evaluation_failures.add(1, self._base)

    def quarantine(self, by_reason: Mapping[str, int], total_bytes: int) -> None:
        """Set what the quarantine holds: rows by reason (reasons are ``Reason`` tokens)."""
        for reason, count in by_reason.items():
            self._quarantined.set(count, self._labels("reason", reason))
        self._quarantine_bytes.set(total_bytes, self._base)

    def quarantine_refused(self) -> None:
        """Count one input left unacknowledged because the quarantine is full."""
        self._quarantine_refusals.add(1, self._base)

    # -- operational series, set by the daemon's probes --------------------------------

    def model_version_created(self, created_ms: int) -> None:
        """Set when the central made the model version this process knows (Unix ms in)."""
        self._model_created.set(created_ms / 1000.0, self._base)

    def buffer_flush_inputs(self, max_inputs: int) -> None:
        """Set the flush threshold the buffer fill is measured against."""
        self._buffer_flush_inputs.set(max_inputs, self._base)

    def outbox(self, jobs: int, oldest_age_s: float) -> None:
        """Set the jobs not yet acknowledged upstream and the oldest one's age (F7)."""
        self._outbox_partials.set(jobs, self._base)
        self._outbox_age.set(oldest_age_s, self._base)

    def consumer_lag(self, stream: str, consumer: str, pending: int, ack_pending: int) -> None:
        """Set the JetStream consumer's ``num_pending`` and ``num_ack_pending``."""
        labels = self._labels("stream", stream, "consumer", consumer)
        self._consumer_pending.set(pending, labels)
        self._consumer_ack_pending.set(ack_pending, labels)

    def jetstream_stream(self, stream: str, size_bytes: int, max_bytes: int) -> None:
        """Set a stream's stored bytes and its byte cap (``max_bytes``; 0 when it has none)."""
        labels = self._labels("stream", stream)
        self._stream_bytes.set(size_bytes, labels)
        self._stream_max_bytes.set(max_bytes, labels)

    def nats_sync_always(self, server: str, ok: bool) -> None:
        """Set the result of the ``sync_interval: always`` check of ``server``."""
        self._sync_always.set(1 if ok else 0, self._labels("server", server))

    def state_disk(self, free_bytes: int, size_bytes: int, watermark: int) -> None:
        """Set the state directory's free bytes, filesystem size and watermark level."""
        self._disk_free.set(free_bytes, self._base)
        self._disk_size.set(size_bytes, self._base)
        self._disk_watermark.set(watermark, self._base)

    def broker_dropped(self, broker: str, dropped: int) -> None:
        """Set the MQTT broker's count of dropped messages, as its ``$SYS`` tree says."""
        self._broker_dropped.set(dropped, self._labels("broker", broker))

    def probe_failed(self, probe: str) -> None:
        """Count one probe run that could not read its source (``varz``, ``jsz``, ``disk``)."""
        self._probe_errors.add(1, self._labels("probe", probe))


class MetricsHandle:
    """The meter provider and Prometheus endpoint of this process.

    ``port`` is the bound port (useful with port 0), ``None`` when nothing
    serves. ``shutdown()`` stops the endpoint and the provider.
    """

    __slots__ = ("_server", "_shut_down", "_thread", "meter_provider", "port")

    def __init__(
        self,
        meter_provider: SdkMeterProvider | None,
        server: HTTPServer | None,
        thread: threading.Thread | None,
    ) -> None:
        self.meter_provider = meter_provider
        self._server = server
        self._thread = thread
        self._shut_down = False
        self.port: int | None = server.server_address[1] if server is not None else None

    def shutdown(self) -> None:
        """Stop serving and shut the provider down; later calls do nothing."""
        if self._shut_down:
            return
        self._shut_down = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()

    def __enter__(self) -> MetricsHandle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()


def _address_family(host: str, port: int) -> socket.AddressFamily:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return infos[0][0]


def _serve_registry(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[HTTPServer, threading.Thread]:
    # One request at a time: the OTel Prometheus reader's collect is not safe to
    # run concurrently, and scrapes are rare. The timeout keeps a stalled client
    # from holding the endpoint.
    handler = type(
        "FedtierMetricsHandler",
        (MetricsHandler.factory(registry),),
        {"timeout": _SCRAPE_TIMEOUT_S},
    )

    class _Server(HTTPServer):
        address_family = _address_family(host, port)

        def server_bind(self) -> None:
            # HTTPServer.server_bind resolves the FQDN of the host, a DNS query
            # that can stall start-up on a machine without resolvers.
            socketserver.TCPServer.server_bind(self)
            self.server_name = host
            self.server_port = self.server_address[1]

    server = _Server((host, port), handler)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": _SHUTDOWN_POLL_S},
        name=f"fedtier-metrics-{server.server_port}",
        daemon=True,
    )
    thread.start()
    return server, thread


def setup_metrics(
    *,
    prometheus_host: str = "127.0.0.1",
    prometheus_port: int | None,
    service_name: str = "fedtier",
    instance_id: str = "",
    set_global: bool = True,
) -> MetricsHandle:
    """Serve this process's metrics to Prometheus at ``http://host:port/metrics``.

    Args:
        prometheus_host: address to listen on; loopback unless a scraper elsewhere needs it.
        prometheus_port: port to listen on, 0 for any free one; ``None`` turns
            metrics off (no provider, every ``TierMetrics`` call is a no-op).
        service_name: ``service.name`` resource attribute (in ``target_info``).
        instance_id: ``service.instance.id`` resource attribute.
        set_global: install the provider as the process-global one, which
            ``TierMetrics(meter_provider=None)`` records into. Tests pass
            ``False`` and hand ``handle.meter_provider`` to ``TierMetrics``.

    Raises:
        OSError: the address cannot be bound (for example the port is taken).
    """
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    if prometheus_port is None or disabled:
        return MetricsHandle(None, None, None)
    # A registry of our own, not prometheus_client's global one, so several
    # handles (tests, or a simulation hosting many daemons) never collide.
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(scope_info_enabled=False, registry=registry)
    attributes: dict[str, str] = {SERVICE_NAME: service_name}
    if instance_id:
        attributes[SERVICE_INSTANCE_ID] = instance_id
    provider = SdkMeterProvider(
        metric_readers=[reader],
        resource=Resource.create(attributes),
        # Exemplars are not exported to Prometheus text; sampling them would
        # only cost time on every recording.
        exemplar_filter=AlwaysOffExemplarFilter(),
    )
    try:
        server, thread = _serve_registry(registry, prometheus_host, prometheus_port)
    except BaseException:
        provider.shutdown()
        raise
    if set_global:
        metrics.set_meter_provider(provider)
    return MetricsHandle(provider, server, thread)
