"""The in-process engine on tiny scenarios: sync rounds, flat and hierarchical FedBuff, failures."""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest

from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import ConfigError
from fedtier.simulations.sim.cli import main
from fedtier.simulations.sim.engine import run_scenario
from fedtier.simulations.sim.experiments import run_experiment
from fedtier.simulations.sim.scenario import Scenario, dump_toml, parse_scenario

TINY: dict[str, object] = {
    "scenario": {"seed": 3},
    "fleet": {
        "regions": 2,
        "edges_per_region": 2,
        "devices": [{"kind": "phone", "count": 3}],
    },
    "data": {
        "dataset": "synthetic",
        "iid": True,
        "samples_log_mean": 2.0,
        "samples_log_sigma": 0.5,
        "samples_min": 20,
    },
    "training": {"lr": 0.05, "local_epochs": 1, "batch_size": 10},
    "clients": {"compute_median_s": 5.0, "compute_sigma": 1.0},
    "aggregation": {
        "mode": "sync",
        "clients_per_round": 4,
        "edge": {"flush": {"max_inputs": 2, "max_age_s": 4.0}},
        "regional": {"flush": {"max_inputs": 2, "max_age_s": 2.0}},
        "central": {"flush": {"max_inputs": 2, "max_age_s": False}},
    },
    "stop": {"versions": 6},
}


def scenario(**changes: object) -> Scenario:
    tables = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        node = tables
        *parents, last = dotted.split("__")
        for part in parents:
            child = node.setdefault(part, {})
            assert isinstance(child, dict)
            node = child
        node[last] = value
    return parse_scenario(tables, name="tiny")


def test_sync_rounds_learn_and_are_deterministic() -> None:
    first = run_scenario(scenario())
    again = run_scenario(scenario())
    assert [r.row() for r in first.records] == [r.row() for r in again.records]
    assert [r.version for r in first.records] == list(range(7))
    assert first.final.test_accuracy > first.records[0].test_accuracy + 0.2
    assert all(r.updates_in_version == 4 for r in first.records[1:])
    assert first.final.updates_uploaded == 24
    # Sync rounds fold flat: every update crosses the central link.
    assert first.final.central_bytes == first.final.uploaded_bytes


@pytest.mark.parametrize(("policy", "per_round"), [("drop", 2), ("partial", 4)])
def test_fedavg_drops_stragglers_and_fedprox_keeps_their_partial_work(
    policy: str, per_round: int
) -> None:
    result = run_scenario(
        scenario(
            training__local_epochs=4,
            clients__straggler_fraction=0.5,
            clients__straggler_policy=policy,
        )
    )
    assert {r.updates_in_version for r in result.records[1:]} == {per_round}


def test_flat_fedbuff_makes_a_version_every_k_updates() -> None:
    result = run_scenario(
        scenario(
            aggregation__mode="async",
            aggregation__topology="flat",
            aggregation__central={"flush": {"max_inputs": 3, "max_age_s": False}},
            clients__concurrency=5,
        )
    )
    assert result.final.version == 6
    assert all(r.updates_in_version == 3 for r in result.records[1:])
    assert result.final.central_bytes == result.final.uploaded_bytes
    assert sum(result.staleness_hist) == 18
    times = [r.time_s for r in result.records]
    assert times == sorted(times)


def test_hierarchical_fedbuff_sends_partials_up_and_discounts_staleness() -> None:
    result = run_scenario(
        scenario(aggregation__mode="async", clients__concurrency=8, stop={"versions": 8})
    )
    final = result.final
    assert final.version == 8
    num_params = result.num_params
    # Partials carry float32 numerators: the central sees whole multiples of them.
    assert final.central_bytes % (4 * num_params) == 0
    assert result.counts["edge:accepted"] >= sum(result.staleness_hist)
    assert result.counts["regional:accepted"] >= 1
    assert any(count for tau, count in enumerate(result.staleness_hist) if tau > 0)


def test_dropouts_are_lost_runs_and_the_fleet_carries_on() -> None:
    result = run_scenario(
        scenario(
            fleet={
                "regions": 1,
                "edges_per_region": 1,
                "devices": [{"kind": "flaky", "count": 8, "dropout": 0.5}],
            },
            clients__offline_s=3.0,
        )
    )
    assert result.final.version == 6
    assert result.final.lost_runs > 0


def test_topk_updates_are_counted_with_their_indices() -> None:
    result = run_scenario(scenario(codec={"name": "top10%+f16", "error_feedback": True}))
    spec = CodecSpec.parse("top10%+f16", num_params=result.num_params)
    per_update = spec.expected_payload_size(result.num_params)
    assert spec.k is not None
    assert per_update == 4 * spec.k + 2 * spec.k
    assert result.final.uploaded_bytes == per_update * result.final.updates_uploaded
    assert result.final.uploaded_wire_bytes > result.final.uploaded_bytes


def test_sim_run_writes_csv_plots_and_a_report(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text(dump_toml(TINY))
    out = tmp_path / "out"
    assert (
        main(["run", str(path), "--out", str(out), "--no-progress", "--set", "stop.versions=3"])
        == 0
    )
    for name in (
        "metrics.csv",
        "report.md",
        "accuracy_time.png",
        "accuracy_bytes.png",
        "staleness.png",
        "participation.png",
    ):
        assert (out / name).stat().st_size > 0, name
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["version"]) for r in rows] == [0, 1, 2, 3]
    assert not math.isnan(float(rows[-1]["test_accuracy"]))
    report = (out / "report.md").read_text()
    assert "![accuracy and loss against virtual time](accuracy_time.png)" in report
    assert "fedtier sim run" in report


def test_a_bad_scenario_is_one_sentence_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(dump_toml({**TINY, "training": {"lr": -1}}))
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtier sim: ")
    assert "training.lr is -1" in err


def test_an_experiment_writes_its_summary(tmp_path: Path) -> None:
    summary = run_experiment(
        "async-vs-sync",
        out=tmp_path,
        seeds=[0],
        overrides=["stop.versions=2", "stop.virtual_time_s=400"],
        show_progress=False,
    )
    text = summary.read_text()
    assert "synchronous FedAvg" in text
    assert "hierarchical FedBuff" in text
    assert (tmp_path / "async-vs-sync-time.png").exists()
    assert (tmp_path / "runs" / "hierarchical-fedbuff" / "seed0" / "metrics.csv").exists()


def test_the_fedprox_experiment_runs_only_the_datasets_asked_for(tmp_path: Path) -> None:
    summary = run_experiment(
        "fedprox",
        out=tmp_path,
        seeds=[0],
        overrides=["stop.versions=2"],
        datasets=["1-1-stragglers"],
        show_progress=False,
    )
    text = summary.read_text()
    assert "| Synthetic(1,1), 90% stragglers |" in text
    assert "Synthetic IID" not in text
    assert "2 runs, seeds 0" in text
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [
        "synthetic-1-1-90-stragglers-fedavg",
        "synthetic-1-1-90-stragglers-fedprox-mu-1",
    ]


def test_an_unknown_fedprox_dataset_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fedprox dataset '2-2' is unknown"):
        run_experiment("fedprox", out=tmp_path, seeds=[0], datasets=["2-2"], show_progress=False)
    with pytest.raises(ConfigError, match="only for the fedprox experiment"):
        run_experiment("codecs", out=tmp_path, seeds=[0], datasets=["iid"], show_progress=False)
