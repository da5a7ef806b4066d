"""What the mesh engine accepts from a scenario, and how it maps it onto the orchestration."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.sim.mesh_engine import mesh_problems, mesh_spec_for
from fedtier.simulations.sim.scenario import load_scenario

SCENARIOS = Path(__file__).resolve().parents[2] / "simulations" / "scenarios"


def test_the_small_scenario_maps_onto_the_mesh() -> None:
    s = load_scenario(SCENARIOS / "mesh-small.toml")
    assert mesh_problems(s) == []
    spec = mesh_spec_for(s)
    assert spec.devices == 24
    assert spec.sites == ("r0-e0", "r0-e1")
    assert spec.edge_flush.max_inputs == 8
    assert spec.send.codec == "i8"
    assert spec.send.error_feedback is True
    assert spec.max_staleness == 16
    assert set(spec.kinds) == {"vehicle", "factory", "iot"}
    # The base interval T is the scenario's median compute time.
    assert spec.base_interval_s() == pytest.approx(2.0)
    assert spec.kinds["vehicle"].online_mean is not None
    assert spec.kinds["factory"].online_mean is None


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ("aggregation.mode=sync", "aggregation.mode/topology"),
        ("aggregation.topology=flat", "aggregation.mode/topology"),
        ("training.mu=1", "training.mu"),
        ("training.model=logreg", "training.model"),
        ("data.dataset=synthetic", "data.dataset"),
        ("clients.concurrency=4", "clients.concurrency"),
        ("clients.latency_s=0.5", "clients.latency_s"),
        ('aggregation.central.optimizer={name="fedadam"}', "aggregation.central.optimizer"),
        ('aggregation.edge.partial_codec="f16"', "aggregation.edge"),
        ('aggregation.edge.staleness={kind="constant", max_staleness=16}', "staleness"),
    ],
)
def test_settings_the_mesh_cannot_honour_are_refused_by_name(override: str, setting: str) -> None:
    s = load_scenario(SCENARIOS / "mesh-small.toml", overrides=[override])
    problems = mesh_problems(s)
    assert any(p.startswith(setting) or setting in p.split(":")[0] for p in problems), problems
    with pytest.raises(ConfigError, match="cannot run on the mesh engine"):
        mesh_spec_for(s)


def test_shipped_in_process_scenarios_are_refused_with_a_reason() -> None:
    s = load_scenario(SCENARIOS / "fedprox-synthetic-1-1.toml")
    with pytest.raises(ConfigError) as info:
        mesh_spec_for(s)
    assert "hierarchical FedBuff only" in str(info.value)
