"""The in-process engine on tiny scenarios: sync rounds, flat and hierarchical FedBuff, failures."""

from __future__ import annotations

import copy
import csv
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedtier.protocol.codecs import CodecSpec
from fedtier.protocol.errors import ConfigError
from fedtier.simulations.sim.cli import main
from fedtier.simulations.sim.engine import RunResult, run_scenario
from fedtier.simulations.sim.experiments import run_experiment
from fedtier.simulations.sim.scenario import dump_toml, load_scenario, parse_scenario
from fedtier.simulations.sim.specs import Scenario

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


def test_an_experiment_writes_its_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Per-run plots are what test_sim_run_writes_csv_plots_and_a_report checks;
    # here they would only cost matplotlib's time, so the knob is tested instead.
    argv = ["experiment", "async-vs-sync", "--out", str(tmp_path), "--seeds", "0"]
    argv += ["--set", "stop.versions=2", "--set", "stop.virtual_time_s=400"]
    assert main([*argv, "--no-progress", "--no-run-plots"]) == 0
    text = (tmp_path / "summary.md").read_text()
    assert capsys.readouterr().out.strip() == text.strip()
    assert "synchronous FedAvg" in text
    assert "hierarchical FedBuff" in text
    assert (tmp_path / "async-vs-sync-time.png").exists()
    run = tmp_path / "runs" / "hierarchical-fedbuff" / "seed0"
    assert (run / "metrics.csv").exists()
    assert "Not drawn for this run (--no-run-plots)." in (run / "report.md").read_text()
    assert not list(run.glob("*.png"))


def test_the_fedprox_experiment_runs_only_the_datasets_asked_for(tmp_path: Path) -> None:
    summary = run_experiment(
        "fedprox",
        out=tmp_path,
        seeds=[0],
        overrides=["stop.versions=2"],
        datasets=["1-1-stragglers"],
        show_progress=False,
        run_plots=False,  # no assertion reads them
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


# -- plug-ins: a user's own model factory and data loader --------------------------------

USER_PLUGINS = '''
"""A user's own model factory, data loaders and Trainer, outside the repository."""

import numpy as np
import torch

from fedtier.client.plugins import Dataset
from fedtier.client.trainers import TrainResult
from fedtier.protocol.layout import layout_of

REQUESTS = []


def make_model(*, dataset, hidden=8):
    outputs = dataset.num_classes or 1
    return torch.nn.Sequential(
        torch.nn.Linear(dataset.num_features, hidden),
        torch.nn.BatchNorm1d(hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, outputs),
    )


def blobs(request):
    """Each device's own shard: two Gaussian blobs per class, shifted per device."""
    REQUESTS.append(request)
    rng = np.random.default_rng([request.seed, request.index, request.split == "test"])
    n = 40 if request.split == "train" else 10
    y = rng.integers(0, 3, n)
    X = rng.normal(0.0, 0.5, (n, 4)) + y[:, None] + 0.2 * request.index
    return Dataset(X, y, name=f"blobs of device {request.index} of {request.count}")


def line(request):
    """One noisy linear regression task, as a plain (X, y) pair of float arrays."""
    rng = np.random.default_rng(request.seed)
    X = rng.normal(size=(300, 5))
    y = X @ np.array([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1 * rng.normal(size=300)
    return X.astype(np.float32), y.astype(np.float32)


class MeanTrainer:
    """Not torch: a one-number 'model', the mean of the device's targets."""

    def __init__(self, y):
        self._y = np.asarray(y, dtype=np.float32)
        self._layout = layout_of([("mean", (1,))])

    @property
    def layout(self):
        return self._layout

    def train(self, params):
        return TrainResult(np.array([self._y.mean()], np.float32), len(self._y), {"loss": 0.0})

    def evaluate(self, params, X, y):
        return {"loss": float(np.mean((np.asarray(y) - params[0]) ** 2))}


def make_mean(*, dataset):
    return MeanTrainer(dataset.y)
'''


@pytest.fixture
def user_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``userplugins.py`` in a folder outside the repository, put on ``sys.path``."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "userplugins.py").write_text(USER_PLUGINS)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "userplugins", raising=False)
    yield folder
    sys.modules.pop("userplugins", None)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _write_scenario(path: Path, tables: dict[str, object]) -> Path:
    path.write_text(dump_toml(tables))
    return path


def _plugin_tables(**sections: object) -> dict[str, object]:
    tables = copy.deepcopy(TINY)
    tables.pop("data")
    tables.update(sections)
    return tables


def test_a_users_factory_and_loader_run_unchanged_in_sim_run(
    user_plugins: Path, tmp_path: Path
) -> None:
    path = _write_scenario(
        tmp_path / "user.toml",
        _plugin_tables(
            data={"loader": "userplugins:blobs", "partition": "loader"},
            model={"factory": "userplugins:make_model", "args": {"hidden": 6}},
            training={"lr": 0.3, "local_epochs": 3, "batch_size": 13},
        ),
    )
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    rows = _rows(out / "metrics.csv")
    assert [int(r["version"]) for r in rows] == list(range(7))
    assert float(rows[-1]["test_accuracy"]) > float(rows[0]["test_accuracy"])
    import userplugins  # type: ignore[import-not-found]

    # The loader sharded the fleet itself: one train and one test request per device.
    asked = {(r.device, r.index, r.count, r.split) for r in userplugins.REQUESTS}
    assert asked == {
        (f"device-{i}", i, 12, split) for i in range(12) for split in ("train", "test")
    }
    report = (out / "report.md").read_text()
    assert "blobs of device 0 of 12 (classification)" in report
    # BatchNorm stays on each device (FedBN), so each device is scored with its own.
    assert "4 tensors kept on the devices by batchnorm local (FedBN)" in report


def test_batchnorm_global_sends_the_batchnorm_tensors(user_plugins: Path) -> None:
    tables = _plugin_tables(
        data={"loader": "userplugins:blobs", "partition": "loader"},
        model={"factory": "userplugins:make_model", "batchnorm": "global"},
        stop={"versions": 2},
    )
    fedbn = run_scenario(
        parse_scenario(_plugin_tables(**{**tables, "model": {"factory": "userplugins:make_model"}}))
    )
    averaged = run_scenario(parse_scenario(tables))
    hidden = 8
    assert averaged.num_params == fedbn.num_params + 4 * hidden
    assert averaged.local_tensors == ()
    assert fedbn.local_tensors == ("1.bias", "1.running_mean", "1.running_var", "1.weight")


def test_local_tensors_with_one_test_set_score_every_devices_model(user_plugins: Path) -> None:
    def run(batchnorm: str) -> RunResult:
        tables = _plugin_tables(
            data={"loader": "userplugins:line", "holdout": "global"},
            model={"factory": "userplugins:make_model", "batchnorm": batchnorm},
            training={"lr": 0.02, "batch_size": 10},
            stop={"versions": 3},
        )
        return run_scenario(parse_scenario(tables))

    fedbn, averaged = run("local"), run("global")
    assert fedbn.local_tensors
    assert fedbn.data.holdout == "global"
    # Before any training every device holds the same start: one model, one score.
    assert fedbn.records[0].test_mse == pytest.approx(averaged.records[0].test_mse)
    assert fedbn.final.test_mse < fedbn.records[0].test_mse


def test_a_csv_file_is_held_out_and_split_by_the_scenario(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    X = rng.normal(0.0, 0.5, (240, 3)) + y[:, None]
    lines = [
        "a,b,kind,c",
        *(f"{x[0]:.4f},{x[1]:.4f},{k},{x[2]:.4f}" for x, k in zip(X, y, strict=True)),
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "points.csv").write_text("\n".join(lines) + "\n")
    path = _write_scenario(
        tmp_path / "csv.toml",
        _plugin_tables(
            data={"path": "data/points.csv", "label": "kind", "test_fraction": 0.25},
            training={"lr": 0.5, "local_epochs": 2, "batch_size": 10},
        ),
    )
    result = run_scenario(load_scenario(path))
    assert result.data.name == "points.csv (CSV), label 'kind'"
    assert (result.data.partition, result.data.holdout) == ("dirichlet", "global")
    assert result.final.test_accuracy > 0.6  # three classes: chance is 1/3


def test_a_regression_scenario_reports_r2_per_version(user_plugins: Path, tmp_path: Path) -> None:
    path = _write_scenario(
        tmp_path / "line.toml",
        _plugin_tables(
            data={"loader": "userplugins:line"},
            model={"factory": "mlp", "args": {"hidden": 8}},
            training={"lr": 0.02, "local_epochs": 2, "batch_size": 10, "loss": "mse"},
        ),
    )
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 0
    rows = _rows(out / "metrics.csv")
    assert "test_accuracy" not in rows[0]
    r2 = [float(r["test_r2"]) for r in rows]
    mse = [float(r["test_mse"]) for r in rows]
    assert len(r2) == 7
    assert r2[-1] > 0.8 > r2[0]
    assert mse[-1] < mse[0]
    assert rows[-1]["test_mse"] == rows[-1]["test_loss"]  # the loss is the MSE
    report = (out / "report.md").read_text()
    assert "| final test R^2 |" in report
    assert "userplugins:line (regression), IID split" in report


def test_a_factory_may_return_its_own_trainer(user_plugins: Path) -> None:
    result = run_scenario(
        parse_scenario(
            _plugin_tables(
                data={"loader": "userplugins:line"},
                model={"factory": "userplugins:make_mean"},
                training={"lr": 0.1},
                stop={"versions": 2},
            )
        )
    )
    assert result.num_params == 1
    assert result.data.task == "regression"
    assert abs(result.final.test_r2) < 0.1  # a mean predicts nothing


def test_a_missing_user_module_is_one_sentence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_scenario(
        tmp_path / "missing.toml",
        _plugin_tables(model={"factory": "nosuchpkg.models:make"}, stop={"versions": 1}),
    )
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model factory 'nosuchpkg.models:make'" in err
    assert "cannot be found" in err


def test_the_batchnorm_experiment_compares_three_models(tmp_path: Path) -> None:
    summary = run_experiment(
        "batchnorm",
        out=tmp_path,
        seeds=[0],
        overrides=["stop.versions=2", "eval.every_versions=1"],
        show_progress=False,
        run_plots=False,  # no assertion reads them
    )
    text = summary.read_text()
    for label in ("without BatchNorm", "BatchNorm, averaged (global)", "kept local (FedBN)"):
        assert f"{label} |" in text
    assert "Target: FedBN at most 2 points below" in text
    assert "(batch size 8), per seed: 11 of 16" in text
    assert (tmp_path / "batchnorm.png").exists()
