"""The operational series behind the dashboards and alerts: what TierMetrics exports and what
the daemon's probes (``tiers._health``) put into them."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio.testing import MockClock

from fedtier.protocol.bus import MemoryBroker, MemoryBus
from fedtier.protocol.identity import SigningIdentity
from fedtier.protocol.layout import layout_of
from fedtier.protocol.names import NatsSubjects
from fedtier.protocol.telemetry.metrics import TierMetrics, setup_metrics
from fedtier.simulations.testing import RecordingMetrics, sign_model_version
from fedtier.tiers._health import (
    BROKER_DROPPED_TOPIC,
    HealthProbes,
    consumer_pending,
    disk_watermark,
    run_probes,
    sync_always_of,
)
from fedtier.tiers._upstream import UpstreamWorker
from fedtier.tiers.config import EdgeConfig, MqttSettings, NatsSettings, RegionalConfig
from fedtier.tiers.edge import EdgeDaemon
from fedtier.tiers.flush import FlushPolicy
from fedtier.tiers.model_registry import MemoryModelRegistry
from fedtier.tiers.regional import RegionalDaemon
from fedtier.tiers.registry import KeyRegistry, TierKeys
from fedtier.tiers.testing import CREATED_MS

FLEET, REGION, SITE = "acme", "eu", "depot-1"
LAYOUT = layout_of([("w", (3,)), ("b", (2,))])
CENTRAL = SigningIdentity.from_seed(b"\x01" * 32)
ME = SigningIdentity.from_seed(b"\x05" * 32)
SUBJECTS = NatsSubjects(FLEET)


# -- TierMetrics: names and labels as Prometheus sees them -------------------------------


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def test_operational_series_are_exported_with_their_labels() -> None:
    with setup_metrics(prometheus_port=0, set_global=False) as handle:
        assert handle.port is not None
        metrics = TierMetrics("regional", "r1", meter_provider=handle.meter_provider)
        metrics.model_version_created(1_764_288_000_500)
        metrics.buffer_flush_inputs(10)
        metrics.outbox(3, 42.5)
        metrics.consumer_lag("FT_ACME_UP", "regional-eu", 17, 2)
        metrics.nats_sync_always("nats-1", True)
        metrics.nats_sync_always("nats-2", False)
        metrics.state_disk(1000, 20_000, 1)
        metrics.broker_dropped("mqtt.site:8883", 5)
        metrics.probe_failed("varz")
        metrics.probe_failed("varz")
        series = scrape(handle.port)
    base = {"tier": "regional", "fedtier_instance": "r1"}

    def value(name: str, **labels: str) -> float:
        wanted = {**base, **labels}
        matches = [v for got, v in series.get(name, []) if got == wanted]
        assert len(matches) == 1, (name, wanted, series.get(name))
        return matches[0]

    assert value("fedtier_model_version_created_seconds") == pytest.approx(1_764_288_000.5)
    assert value("fedtier_buffer_flush_inputs") == 10
    assert value("fedtier_outbox_partials") == 3
    assert value("fedtier_outbox_oldest_age_seconds") == 42.5
    lag = {"stream": "FT_ACME_UP", "consumer": "regional-eu"}
    assert value("fedtier_jetstream_consumer_pending", **lag) == 17
    assert value("fedtier_jetstream_consumer_ack_pending", **lag) == 2
    assert value("fedtier_nats_sync_always", server="nats-1") == 1
    assert value("fedtier_nats_sync_always", server="nats-2") == 0
    assert value("fedtier_state_disk_free_bytes") == 1000
    assert value("fedtier_state_disk_size_bytes") == 20_000
    assert value("fedtier_state_disk_watermark") == 1
    assert value("fedtier_mqtt_broker_dropped_messages", broker="mqtt.site:8883") == 5
    assert value("fedtier_probe_errors_total", probe="varz") == 2


def test_disk_watermark_levels() -> None:
    assert disk_watermark(50, 100) == 0
    assert disk_watermark(15, 100) == 0
    assert disk_watermark(14, 100) == 1
    assert disk_watermark(5, 100) == 1
    assert disk_watermark(4, 100) == 2
    assert disk_watermark(0, 100) == 2
    assert disk_watermark(0, 0) == 0  # no size reported: nothing to say


# -- the outbox: depth and the oldest job's age -------------------------------------------


class _HeldJobs(UpstreamWorker[int]):
    def __init__(self) -> None:
        super().__init__(capacity=4, on_room=lambda: None)
        self.release: dict[int, trio.Event] = {}
        self.done: list[int] = []

    async def run(self, job: int) -> None:
        await self.release.setdefault(job, trio.Event()).wait()
        self.done.append(job)


async def test_the_outbox_age_is_the_oldest_unacknowledged_jobs(mock_clock: MockClock) -> None:
    worker = _HeldJobs()
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.serve, [])
        assert (worker.outstanding, worker.oldest_age_s()) == (0, 0.0)
        await worker.put(1)
        mock_clock.jump(10)
        await worker.put(2)
        mock_clock.jump(5)
        assert worker.outstanding == 2
        assert worker.oldest_age_s() == pytest.approx(15)
        worker.release.setdefault(1, trio.Event()).set()
        while worker.done != [1]:
            await trio.testing.wait_all_tasks_blocked()
        # Job 2 is now the oldest: queued 5 s ago.
        assert worker.outstanding == 1
        assert worker.oldest_age_s() == pytest.approx(5)
        worker.release.setdefault(2, trio.Event()).set()
        await worker.drain()
        assert (worker.outstanding, worker.oldest_age_s()) == (0, 0.0)
        nursery.cancel_scope.cancel()


# -- the probes ------------------------------------------------------------------------


@dataclass
class Recorded:
    """The HealthMetrics calls the probes made, and an event set at each."""

    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    changed: trio.Event = field(default_factory=trio.Event)

    def _note(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        self.changed.set()
        self.changed = trio.Event()

    def of(self, name: str) -> list[tuple[Any, ...]]:
        return [args for called, args in self.calls if called == name]

    async def wait_for(self, name: str) -> list[tuple[Any, ...]]:
        with trio.fail_after(10):
            while not self.of(name):
                await self.changed.wait()
        return self.of(name)

    def model_version_created(self, created_ms: int) -> None:
        self._note("model_version_created", created_ms)

    def buffer_flush_inputs(self, max_inputs: int) -> None:
        self._note("buffer_flush_inputs", max_inputs)

    def outbox(self, jobs: int, oldest_age_s: float) -> None:
        self._note("outbox", jobs, oldest_age_s)

    def consumer_lag(self, stream: str, consumer: str, pending: int, ack_pending: int) -> None:
        self._note("consumer_lag", stream, consumer, pending, ack_pending)

    def jetstream_stream(self, stream: str, size_bytes: int, max_bytes: int) -> None:
        self._note("jetstream_stream", stream, size_bytes, max_bytes)

    def nats_sync_always(self, server: str, ok: bool) -> None:
        self._note("nats_sync_always", server, ok)

    def state_disk(self, free_bytes: int, size_bytes: int, watermark: int) -> None:
        self._note("state_disk", free_bytes, size_bytes, watermark)

    def broker_dropped(self, broker: str, dropped: int) -> None:
        self._note("broker_dropped", broker, dropped)

    def probe_failed(self, probe: str) -> None:
        self._note("probe_failed", probe)


def regional(
    tmp: Path,
    registry: MemoryModelRegistry,
    *,
    monitoring_url: str | None,
    monitoring_urls: tuple[str, ...] = (),
) -> RegionalDaemon:
    config = RegionalConfig(
        fleet=FLEET,
        region=REGION,
        identity_key=tmp / "unused.pem",
        state_dir=tmp / "regional",
        central_key=CENTRAL.verify_key.raw.hex(),
        flush=FlushPolicy(max_inputs=7, max_age_s=None),
        commit_window_s=0.001,
        nats=NatsSettings(monitoring_url=monitoring_url, monitoring_urls=monitoring_urls),
    )
    keys = TierKeys(ME, KeyRegistry.from_keys({}, role="edge"), CENTRAL.verify_key)
    return RegionalDaemon(
        config,
        nats=MemoryBus(MemoryBroker("nats")),
        registry_store=registry,
        keys=keys,
        metrics=RecordingMetrics(),
        store_in_thread=False,
    )


async def model_registry(version: int) -> MemoryModelRegistry:
    registry = MemoryModelRegistry()
    pointer, blob = sign_model_version(
        CENTRAL, FLEET, version, LAYOUT, np.zeros(LAYOUT.num_params, np.float32)
    )
    await registry.put_blob(version, blob)
    await registry.put_current(version, pointer)
    return registry


async def test_probes_read_a_serving_daemons_outbox_model_and_disk(tmp_path: Path) -> None:
    daemon = regional(tmp_path, await model_registry(3), monitoring_url=None)
    recorded = Recorded()
    probes = HealthProbes(daemon, recorded)
    probes.sample_daemon()
    await probes.sample_disk()  # its state directory does not exist yet: no failure
    assert recorded.calls == []  # not serving yet: nothing to read
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        probes.sample_daemon()
        await probes.sample_disk()
        await probes.sample_monitoring()  # no monitoring URL: nothing, no error
        nursery.cancel_scope.cancel()
    assert recorded.of("outbox") == [(0, 0.0)]
    # The signed pointer's created_ms, once per version.
    assert recorded.of("model_version_created") == [(CREATED_MS,)]
    [(free, size, watermark)] = recorded.of("state_disk")
    assert 0 <= free <= size
    assert size > 0
    assert watermark == disk_watermark(free, size)
    assert recorded.of("probe_failed") == []


async def test_run_probes_samples_until_its_block_ends(tmp_path: Path) -> None:
    daemon = regional(tmp_path, await model_registry(0), monitoring_url=None)
    recorded = Recorded()
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.serve)
        async with run_probes(daemon, recorded):
            assert await recorded.wait_for("outbox") == [(0, 0.0)]
            assert await recorded.wait_for("state_disk")
        assert recorded.of("buffer_flush_inputs") == [(7,)]
        daemon.request_shutdown()


class _Monitoring:
    """A stand-in for nats-server's monitoring endpoint (``/varz``, ``/jsz``)."""

    def __init__(self) -> None:
        self.sync_always = True
        self.consumers: list[dict[str, Any]] = [
            {"name": "regional-eu", "num_pending": 12, "num_ack_pending": 3},
            {"name": "regional-us", "num_pending": 99, "num_ack_pending": 9},
        ]
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/varz":
                    body: Any = {
                        "server_name": "nats-eu-1",
                        "jetstream": {"config": {"sync_always": outer.sync_always}},
                    }
                elif self.path == "/jsz?consumers=true":
                    body = {
                        "account_details": [
                            {
                                "name": "FEDTIER",
                                "stream_detail": [
                                    {"name": "KV_acme", "consumer_detail": []},
                                    {"name": "FT_ACME_UP", "consumer_detail": outer.consumers},
                                ],
                            }
                        ]
                    }
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def monitoring() -> Iterator[_Monitoring]:
    server = _Monitoring()
    yield server
    server.close()


async def test_probes_read_the_sync_check_and_the_consumer_lag(
    tmp_path: Path, monitoring: _Monitoring
) -> None:
    daemon = regional(tmp_path, MemoryModelRegistry(), monitoring_url=monitoring.url)
    recorded = Recorded()
    probes = HealthProbes(daemon, recorded)
    await probes.sample_monitoring()
    assert recorded.of("nats_sync_always") == [("nats-eu-1", True)]
    assert recorded.of("consumer_lag") == [("FT_ACME_UP", "regional-eu", 12, 3)]
    # A server restarted without sync_interval: always is reported, not fatal.
    monitoring.sync_always = False
    monitoring.consumers = []  # and one that does not hold our consumer
    await probes.sample_monitoring()
    assert recorded.of("nats_sync_always")[-1] == ("nats-eu-1", False)
    assert recorded.of("probe_failed") == [("jsz",)]
    assert len(recorded.of("consumer_lag")) == 1  # keeps its last value


async def test_every_node_of_a_cluster_is_checked_and_the_first_holder_gives_the_lag(
    tmp_path: Path, monitoring: _Monitoring
) -> None:
    second = _Monitoring()
    try:
        second.sync_always = False  # one node of three restarted without it
        daemon = regional(
            tmp_path,
            MemoryModelRegistry(),
            monitoring_url=None,
            monitoring_urls=(monitoring.url, second.url, monitoring.url),  # one listed twice
        )
        recorded = Recorded()
        await HealthProbes(daemon, recorded).sample_monitoring()
    finally:
        second.close()
    assert recorded.of("nats_sync_always") == [("nats-eu-1", True), ("nats-eu-1", False)]
    assert recorded.of("consumer_lag") == [("FT_ACME_UP", "regional-eu", 12, 3)]
    assert recorded.of("probe_failed") == []


async def test_an_unreachable_monitoring_endpoint_is_counted_not_raised(tmp_path: Path) -> None:
    closed = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{closed.server_address[1]}"
    closed.server_close()  # nobody listens there now
    daemon = regional(tmp_path, MemoryModelRegistry(), monitoring_url=url)
    recorded = Recorded()
    await HealthProbes(daemon, recorded).sample_monitoring()
    assert recorded.of("probe_failed") == [("varz",), ("jsz",)]
    assert recorded.of("nats_sync_always") == []


def test_monitoring_answers_are_read_like_the_start_up_check() -> None:
    assert sync_always_of({"server_id": "NABC", "jetstream": {}}) == ("NABC", False)
    assert sync_always_of({"server_name": "n", "jetstream": {"config": {"sync_always": 1}}}) == (
        "n",
        False,  # only a real true counts, as at start-up
    )
    assert consumer_pending({}, "S", "c") is None
    assert consumer_pending({"account_details": [{"stream_detail": None}]}, "S", "c") is None


async def test_the_edge_follows_the_brokers_dropped_count(tmp_path: Path) -> None:
    broker = MemoryBroker("mqtt")
    config = EdgeConfig(
        fleet=FLEET,
        site=SITE,
        region=REGION,
        identity_key=tmp_path / "unused.pem",
        state_dir=tmp_path / "edge",
        central_key=CENTRAL.verify_key.raw.hex(),
        mqtt=MqttSettings(host="mqtt.depot-1", port=8883),
    )
    keys = TierKeys(ME, KeyRegistry.from_keys({}, role="device"), CENTRAL.verify_key)
    edge = EdgeDaemon(
        config,
        mqtt=MemoryBus(broker),
        nats=MemoryBus(MemoryBroker("nats")),
        registry_store=MemoryModelRegistry(),
        keys=keys,
        metrics=RecordingMetrics(),
        store_in_thread=False,
    )
    recorded = Recorded()
    probes = HealthProbes(edge, recorded)
    assert probes.consumer is None  # the edge consumes no JetStream
    mosquitto = MemoryBus(broker)
    # Mosquitto keeps the value retained: a subscriber gets it at once.
    await mosquitto.publish(BROKER_DROPPED_TOPIC, b"0", retain=True)
    edge.ready.set()  # the probe waits for the intake; this test drives no intake
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probes.watch_broker_drops, edge)
        assert await recorded.wait_for("broker_dropped") == [("mqtt.depot-1:8883", 0)]
        await mosquitto.publish(BROKER_DROPPED_TOPIC, b"not a number")
        assert await recorded.wait_for("probe_failed") == [("mqtt_sys",)]
        await mosquitto.publish(BROKER_DROPPED_TOPIC, b"7", retain=True)
        with trio.fail_after(10):
            while len(recorded.of("broker_dropped")) < 2:
                await recorded.changed.wait()
        nursery.cancel_scope.cancel()
    assert recorded.of("broker_dropped") == [("mqtt.depot-1:8883", 0), ("mqtt.depot-1:8883", 7)]
