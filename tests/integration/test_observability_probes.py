"""The operational series the dashboard and the alerts read, served by real daemon processes.

The three tiers start from the shipped examples (as in ``test_deploy_examples``)
against real brokers; each daemon's ``/metrics`` must then show what its probes
sample: the outbox and the model version's age everywhere, the state disk, the
``sync_interval: always`` check, the JetStream consumer lag at the regional and
the central, and Mosquitto's dropped-message count at the edge.
"""

from __future__ import annotations

import tomllib
import urllib.request
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from fedtier.simulations.testing import MosquittoProcess, NatsServerProcess
from tests.integration.test_deploy_examples import (
    DEADLINE_S,
    SERVING,
    fedtier,
    open_processes,
    prepare_tiers,
)

pytestmark = pytest.mark.brokers

Series = dict[str, list[dict[str, str]]]


def _scrape(port: int) -> Series:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    out: Series = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels) | {"": str(sample.value)})
    return out


async def _series_once_present(port: int, names: set[str]) -> Series:
    """The daemon's series once all of ``names`` are there (probes run on their own clock)."""
    series: Series = {}
    with trio.move_on_after(DEADLINE_S):
        while not names <= set(series):
            series = await trio.to_thread.run_sync(_scrape, port)
            if names <= set(series):
                return series
            await trio.sleep(0.2)  # a poll of the endpoint, bounded by the deadline
    pytest.fail(f"port {port} never served {sorted(names - set(series))}")


def _port(config: Path) -> int:
    port = tomllib.loads(config.read_text())["telemetry"]["prometheus_port"]
    assert isinstance(port, int)
    return port


EVERYWHERE = {
    "fedtier_outbox_partials",
    "fedtier_outbox_oldest_age_seconds",
    "fedtier_model_version_created_seconds",
    "fedtier_buffer_flush_inputs",
    "fedtier_state_disk_free_bytes",
    "fedtier_state_disk_watermark",
    "fedtier_nats_sync_always",
}


async def test_real_daemons_serve_the_operational_series(
    tmp_path: Path,
    fresh_nats_server: NatsServerProcess,
    fresh_mosquitto: MosquittoProcess,
) -> None:
    etc = prepare_tiers(tmp_path, fresh_nats_server, fresh_mosquitto.port)
    async with open_processes(tmp_path) as spawn:
        central = await spawn("central", fedtier("central", "--config", etc / "central.toml"))
        await central.expect(SERVING)
        regional = await spawn("regional", fedtier("regional", "--config", etc / "regional.toml"))
        edge = await spawn("edge", fedtier("edge", "--config", etc / "edge.toml"))
        await regional.expect(SERVING)
        await edge.expect(SERVING)
        lag = {"fedtier_jetstream_consumer_pending", "fedtier_jetstream_consumer_ack_pending"}
        seen = {
            "central": await _series_once_present(_port(etc / "central.toml"), EVERYWHERE | lag),
            "regional": await _series_once_present(_port(etc / "regional.toml"), EVERYWHERE | lag),
            "edge": await _series_once_present(
                _port(etc / "edge.toml"), EVERYWHERE | {"fedtier_mqtt_broker_dropped_messages"}
            ),
        }
        for daemon in (edge, regional, central):
            assert await daemon.stop() == 0, daemon.lines
    for tier, series in seen.items():
        # The test's nats-server runs sync_interval: always (the daemons would not start otherwise).
        assert [s[""] for s in series["fedtier_nats_sync_always"]] == ["1.0"], tier
        [watermark] = series["fedtier_state_disk_watermark"]
        assert watermark["tier"] == tier
        assert "fedtier_probe_errors_total" not in series, (
            tier,
            series.get("fedtier_probe_errors_total"),
        )
    consumers = {
        s["consumer"]
        for t in ("regional", "central")
        for s in seen[t]["fedtier_jetstream_consumer_pending"]
    }
    assert consumers == {"regional-eu-west", "central"}
    [dropped] = seen["edge"]["fedtier_mqtt_broker_dropped_messages"]
    assert dropped[""] == "0.0"
    assert dropped["broker"].endswith(f":{fresh_mosquitto.port}")
    assert "fedtier_jetstream_consumer_pending" not in seen["edge"]
