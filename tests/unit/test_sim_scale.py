"""The 100,000-device scenario at a small size: it runs, loses no update, and reports its cost.

``simulations/scenarios/fleet-100k.toml`` itself takes minutes (docs/performance.md,
"Simulator scale"); here the same file runs shrunk by ``--set`` to a few thousand
devices and a short horizon, so ``make test`` checks what the full run relies on:
the shipped file parses and runs through the production tier core, every device
update an edge accepts lands in exactly one version (or is still on its way when
the run stops), device runs in worker processes give the same bytes as in process,
and the report carries the wall time, peak memory and event rate.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.sim.cli import main
from fedtier.simulations.sim.engine import Simulation, run_scenario
from fedtier.simulations.sim.scenario import load_scenario

FLEET_100K = Path(__file__).resolve().parents[2] / "simulations" / "scenarios" / "fleet-100k.toml"

# 5 regions x 10 edge sites x 100 devices = 5,000 devices, 500 training at a time.
SMALL = [
    "fleet.regions=5",
    "fleet.edges_per_region=10",
    "clients.concurrency=500",
    "stop.virtual_time_s=200",
]
# 2 regions x 5 edge sites x 100 devices = 1,000 devices, 200 training at a time.
TINY = [
    "fleet.regions=2",
    "fleet.edges_per_region=5",
    "clients.concurrency=200",
    "stop.virtual_time_s=200",
]


def test_the_shipped_scenario_is_a_100k_hierarchical_fedbuff_fleet() -> None:
    scenario = load_scenario(FLEET_100K)
    assert scenario.fleet.num_devices == 100_000
    assert scenario.aggregation.mode == "async"
    assert scenario.aggregation.topology == "hierarchical"
    assert scenario.aggregation.edge.staleness.kind == "fedbuff"


def test_every_update_an_edge_accepts_lands_in_exactly_one_version() -> None:
    scenario = load_scenario(FLEET_100K, overrides=SMALL)
    assert scenario.fleet.num_devices == 5_000
    simulation = Simulation(scenario, lineage=True)
    result = simulation.run()
    lineage = simulation.lineage()

    assert result.final.version >= 2
    assert lineage.dropped_epochs == 0
    in_versions = [leaf for leaves in lineage.versions.values() for leaf in leaves]
    # No update is in two versions, or twice in one.
    assert len(set(in_versions)) == len(in_versions)
    # Every accepted update is in a version or still on its way (an open buffer, a
    # partial in flight), and nothing else is: none lost, none made up.
    assert Counter(lineage.accepted) == Counter(in_versions) + Counter(lineage.pending)
    assert len(lineage.accepted) == result.counts["edge:accepted"]
    assert len(in_versions) > len(lineage.pending)
    assert sorted(lineage.versions) == list(range(1, result.final.version + 1))
    # The versions' own counts (metrics.csv) agree with their lineage.
    assert len(in_versions) == sum(r.updates_in_version for r in result.records)


def test_sim_run_reports_wall_time_peak_memory_and_event_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = ["run", str(FLEET_100K), "--out", str(out), "--no-progress", "--workers", "1"]
    for override in TINY:
        args += ["--set", override]
    assert main(args) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["scenario"] == "fleet-100k"
    assert summary["num_devices"] == 1_000
    assert summary["workers"] == 1
    assert summary["worker_cpu_s"] > 0
    assert summary["worker_peak_rss_bytes"] > 0
    assert summary["wall_s"] > 0
    assert summary["peak_rss_bytes"] > 0
    assert summary["peak_rss_mib"] == pytest.approx(summary["peak_rss_bytes"] / 2**20, abs=0.1)
    assert summary["events"] > summary["updates_uploaded"] > 0
    assert summary["events_per_s"] == pytest.approx(summary["events"] / summary["wall_s"], rel=0.01)
    report = (out / "report.md").read_text()
    assert "| peak memory (RSS high-water mark) |" in report
    assert "| engine events |" in report
    assert "| device workers | 1:" in report
    printed = capsys.readouterr().out
    assert "wall s, peak RSS" in printed
    assert "events/s" in printed


def test_device_workers_give_the_same_run_as_in_process() -> None:
    # Dropouts, idle gaps and thousands of runs: the worker's runs must come back
    # as the same events in the same order.
    in_process = run_scenario(load_scenario(FLEET_100K, overrides=TINY))
    with_workers = run_scenario(load_scenario(FLEET_100K, overrides=TINY), workers=1)
    assert with_workers.workers == 1
    assert with_workers.worker_cpu_s > 0
    assert with_workers.worker_peak_rss_bytes > 0
    assert [r.row() for r in with_workers.records] == [r.row() for r in in_process.records]
    assert with_workers.counts == in_process.counts
    assert with_workers.events == in_process.events
    assert with_workers.final.updates_uploaded > 0
    assert in_process.counts["device:lost"] > 0


def test_workers_refuse_a_sync_scenario() -> None:
    scenario = load_scenario(FLEET_100K, overrides=[*SMALL, 'aggregation.mode="sync"'])
    with pytest.raises(ConfigError, match="device workers run async scenarios"):
        Simulation(scenario, workers=1)
