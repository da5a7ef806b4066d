"""One scenario file, both engines: mesh-small runs in process and on real brokers and daemons."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedtier.simulations.sim.engine import run_scenario
from fedtier.simulations.sim.mesh_engine import run_on_mesh
from fedtier.simulations.sim.report import write_run
from fedtier.simulations.sim.scenario import load_scenario

pytestmark = pytest.mark.brokers

SCENARIO = Path(__file__).resolve().parents[2] / "simulations" / "scenarios" / "mesh-small.toml"
# Short and small: the point is that the same file runs on both engines and learns.
# The mesh runs on the wall clock, so it stops at a version count, not after a
# time: a loaded machine takes longer to get there instead of learning less.
SHORT = [
    "stop.versions=5",
    "stop.virtual_time_s=180",
    "fleet.devices=[{kind='vehicle', count=2, data_volume=3.0}, {kind='iot', count=2}]",
]


def test_mesh_small_runs_on_both_engines(tmp_path: Path) -> None:
    scenario = load_scenario(SCENARIO, overrides=SHORT)
    in_process = run_scenario(scenario)
    on_mesh = run_on_mesh(scenario, show_progress=False, keep_dir=tmp_path / "mesh")
    for result in (in_process, on_mesh):
        assert result.final.version >= 2
        assert result.final.test_accuracy > result.records[0].test_accuracy + 0.2
        assert result.final.updates_uploaded > 0
        assert result.final.central_bytes > 0
    assert on_mesh.engine == "mesh"
    assert on_mesh.num_devices == in_process.num_devices == 8
    assert not math.isnan(on_mesh.final.train_loss)
    report = write_run(on_mesh, tmp_path / "report")
    assert "the real mesh" in report.read_text()
