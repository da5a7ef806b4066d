"""Scenario files: defaults, base files, overrides, and one-sentence errors for bad values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from fedtier.client.plugins import DataRequest
from fedtier.protocol.errors import ConfigError
from fedtier.simulations.datasets import diabetes, digits, load_digits_split, synthetic
from fedtier.simulations.sim.data import build_data
from fedtier.simulations.sim.scenario import (
    apply_override,
    dump_toml,
    load_scenario,
    parse_scenario,
)
from fedtier.simulations.sim.specs import DIGITS_LOADER, SYNTHETIC_LOADER, DataSpec
from fedtier.simulations.sim.synthetic import DeviceSplit, generate_synthetic

SCENARIOS = Path(__file__).resolve().parents[2] / "simulations" / "scenarios"

MINIMAL = {
    "fleet": {"devices": [{"kind": "phone", "count": 3}]},
    "stop": {"versions": 2},
}


def test_a_minimal_scenario_takes_the_defaults() -> None:
    s = parse_scenario(MINIMAL, name="tiny")
    assert s.name == "tiny"
    assert s.fleet.num_devices == 3
    assert s.data.dataset == "synthetic"
    assert s.aggregation.mode == "async"
    assert s.aggregation.topology == "hierarchical"
    assert s.aggregation.central.staleness.kind == "fedbuff"
    assert s.codec.name == "f32"
    assert s.clients.concurrency is None


@pytest.mark.parametrize(
    ("tables", "fragment"),
    [
        ({**MINIMAL, "training": {"lr": 0}}, "training.lr is 0; expected a number > 0"),
        ({**MINIMAL, "training": {"learning_rate": 0.1}}, "unknown key 'learning_rate'"),
        ({**MINIMAL, "codec": {"name": "top1%+q4"}}, "codec.name"),
        ({**MINIMAL, "aggregation": {"mode": "semi"}}, "aggregation.mode is 'semi'"),
        (
            {**MINIMAL, "aggregation": {"edge": {"flush": {"max_inputs": 0}}}},
            "aggregation.edge.flush.max_inputs is 0",
        ),
        (
            {**MINIMAL, "aggregation": {"central": {"optimizer": {"name": "sgdm"}}}},
            "server optimizer 'sgdm' is unknown",
        ),
        ({"fleet": MINIMAL["fleet"]}, "set stop.versions or stop.virtual_time_s"),
        ({**MINIMAL, "fleet": {"devices": []}}, "needs at least one [[fleet.devices]]"),
        (
            {**MINIMAL, "data": {"samples_per_device": [80, 90]}},
            "names 2 sample counts; it needs dataset = 'synthetic' and one per device (3)",
        ),
        (
            {**MINIMAL, "data": {"samples_per_device": [80, 1, 90]}},
            "samples_per_device is [80, 1, 90]; expected a non-empty array of integers >= 2",
        ),
        ({**MINIMAL, "data": {"samples_per_device": []}}, "samples_per_device is []"),
        (
            {**MINIMAL, "data": {"dataset": "digits", "samples_per_device": [80, 80, 80]}},
            "it needs dataset = 'synthetic'",
        ),
        (
            {**MINIMAL, "data": {"dataset": "digits", "loader": "my.data:load"}},
            "sets dataset and loader; name the data once",
        ),
        ({**MINIMAL, "data": {"loader": "data.csv"}}, "data.loader is 'data.csv'; expected an"),
        ({**MINIMAL, "data": {"loader": "a:b", "label": "y"}}, "it needs data.path"),
        ({**MINIMAL, "data": {"path": "d.csv", "args": {"k": 1}}}, "data.path names a file"),
        (
            {**MINIMAL, "data": {"partition": "loader", "holdout": "global"}},
            "needs the whole data in one load",
        ),
        (
            {**MINIMAL, "data": {"path": "d.csv", "holdout": "loader"}},
            "which has no test split",
        ),
        (
            {**MINIMAL, "data": {"partition": "dirichlet", "task": "regression"}},
            "a label skew, but data.task is regression",
        ),
        (
            {**MINIMAL, "model": {"factory": "mlp"}, "training": {"model": "mlp"}},
            "keep model.factory (training.model is its old name)",
        ),
        ({**MINIMAL, "model": {"factory": "resnet"}}, "model.factory is 'resnet'; expected"),
        ({**MINIMAL, "model": {"batchnorm": "mean"}}, "model.batchnorm is 'mean'"),
        ({**MINIMAL, "training": {"momentum": 0.9}}, "training.momentum needs a torch model"),
        ({**MINIMAL, "training": {"optimizer": "adam"}}, "'adam' needs a torch model"),
        ({**MINIMAL, "data": {"task": "regression"}}, "model logreg classifies"),
        (
            {**MINIMAL, "training": {"epochs": 2, "local_epochs": 2}},
            "sets epochs and local_epochs, which are the same setting",
        ),
        (
            {**MINIMAL, "model": {"factory": "mlp"}, "training": {"lr_schedule": {"every": 2}}},
            "training.lr_schedule is {'every': 2}; it takes kind",
        ),
        (
            {**MINIMAL, "model": {"factory": "mlp"}, "training": {"lr_schedule": {"kind": "x"}}},
            "lr schedule kind is 'x'",
        ),
    ],
)
def test_bad_values_are_one_readable_sentence(tables: Mapping[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario(tables, name="tiny")
    assert fragment in str(info.value)


def test_a_file_inherits_its_base_and_overrides_apply_last(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text(
        '[fleet]\nregions = 2\n[[fleet.devices]]\nkind = "phone"\ncount = 4\n'
        "[training]\nlr = 0.5\nmu = 0.0\n[stop]\nversions = 3\n"
    )
    (tmp_path / "child.toml").write_text('base = "base.toml"\n[training]\nmu = 1.0\n')
    s = load_scenario(tmp_path / "child.toml", overrides=["training.lr=0.25"], seed=7)
    assert s.fleet.regions == 2
    assert s.training.mu == 1.0
    assert s.training.lr == 0.25
    assert s.seed == 7
    assert s.name == "child"
    # What is reported as run can be read back to the same scenario.
    again = parse_scenario(__import__("tomllib").loads(dump_toml(s.effective)), name="child")
    assert again.training == s.training
    assert again.fleet == s.fleet


def test_overrides_parse_toml_values_and_fall_back_to_strings() -> None:
    tables: dict[str, object] = {}
    apply_override(tables, "a.b=3")
    apply_override(tables, "a.c=top1%+f16")
    apply_override(tables, "d={ max_inputs = 2 }")
    assert tables == {"a": {"b": 3, "c": "top1%+f16"}, "d": {"max_inputs": 2}}
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        apply_override(tables, "novalue")


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_scenario_parses(path: Path) -> None:
    s = load_scenario(path)
    assert s.fleet.num_devices >= 1


def test_synthetic_follows_the_fedprox_recipe() -> None:
    rng = np.random.default_rng(0)
    splits = generate_synthetic(30, alpha=1.0, beta=1.0, iid=False, rng=rng)
    assert len(splits) == 30
    for split in splits:
        n = len(split.y_train) + len(split.y_test)
        assert n >= 50
        assert len(split.y_train) == int(0.9 * n)
        assert split.X_train.shape[1] == 60
        assert split.X_train.dtype == np.float32
        assert split.y_train.min() >= 0
        assert split.y_train.max() < 10
    again = generate_synthetic(30, alpha=1.0, beta=1.0, iid=False, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(again[5].X_train, splits[5].X_train)


def test_synthetic_iid_shares_one_labelling_model() -> None:
    splits = generate_synthetic(4, alpha=0.0, beta=0.0, iid=True, rng=np.random.default_rng(1))
    # Zero-mean inputs with variances j^-1.2: the first feature varies most.
    X = np.concatenate([s.X_train for s in splits])
    assert abs(float(X.mean())) < 0.05
    variances = X.var(axis=0)
    assert variances[0] > variances[-1] * 5


def test_fixed_sample_counts_replace_the_draw_and_keep_the_device_means() -> None:
    def draw(sizes: Sequence[int] | None) -> list[DeviceSplit]:
        return generate_synthetic(
            3, alpha=1.0, beta=1.0, iid=False, rng=np.random.default_rng(5), sizes=sizes
        )

    plain, fixed = draw(None), draw((20, 40, 1000))
    assert [len(s.y_train) + len(s.y_test) for s in fixed] == [20, 40, 1000]
    assert [len(s.y_test) for s in fixed] == [2, 4, 100]
    # The sizes are drawn anyway, so device 0 gets the same model, input mean and
    # first samples as without them.
    np.testing.assert_array_equal(fixed[0].X_train, plain[0].X_train[:18])
    np.testing.assert_array_equal(fixed[0].y_train, plain[0].y_train[:18])
    with pytest.raises(ConfigError, match="expected one per device"):
        draw((20, 40))


def test_the_old_keys_name_the_built_in_loaders_and_models() -> None:
    old = parse_scenario(
        {
            **MINIMAL,
            "data": {"dataset": "digits", "partition": "iid"},
            "training": {"model": "mlp", "hidden": 16, "momentum": 0.5},
        }
    )
    assert old.data.source == DIGITS_LOADER
    assert old.data.dataset == "digits"
    assert (old.model.factory, old.model.args) == ("mlp", (("hidden", 16),))
    assert (old.model.batchnorm, old.model.local) == ("local", ())
    assert old.training.momentum == 0.5
    new = parse_scenario(
        {
            **MINIMAL,
            "data": {"loader": DIGITS_LOADER, "partition": "iid"},
            "model": {"factory": "mlp", "args": {"hidden": 16}},
            "training": {"momentum": 0.5},
        }
    )
    assert (new.data, new.model, new.training) == (old.data, old.model, old.training)
    assert parse_scenario(MINIMAL).data.source == SYNTHETIC_LOADER


def test_a_data_path_is_relative_to_the_scenario_file(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(
        '[data]\npath = "data/train.csv"\nlabel = "y"\n'
        "[[fleet.devices]]\ncount = 2\n[stop]\nversions = 1\n"
    )
    s = load_scenario(tmp_path / "s.toml")
    assert s.data.source == str(tmp_path / "data" / "train.csv")
    assert s.data.label == "y"
    assert s.base_dir == tmp_path


def test_the_digits_loader_gives_the_arrays_of_the_old_split() -> None:
    whole = digits(DataRequest("fleet"))
    assert (len(whole), whole.num_features, whole.num_classes) == (1797, 64, 10)
    assert whole.name == "digits (scikit-learn, 8x8)"
    spec = DataSpec(source=DIGITS_LOADER, partition="iid", test_fraction=0.2, seed=4)
    data = build_data(spec, [1.0] * 5, seed=0)
    # The simulator draws the split's seed first from the data seed, as it always did.
    rng = np.random.default_rng(np.random.SeedSequence([4, 1]))
    old = load_digits_split(test_fraction=0.2, seed=int(rng.integers(2**31)))
    np.testing.assert_array_equal(data.X_test, old.X_test)
    np.testing.assert_array_equal(data.y_test, old.y_test)
    assert sum(len(y) for y in data.y_train) == len(old.y_train)
    assert data.test_owner is None
    # A device asking for its own share gets a seeded IID part of the whole.
    shares = [digits(DataRequest(f"d{i}", index=i, count=3, seed=1)) for i in range(3)]
    assert sum(len(s) for s in shares) == 1797


def test_the_synthetic_loader_is_generate_synthetic_per_device() -> None:
    from fedtier.simulations.sim.synthetic import generate_synthetic

    splits = generate_synthetic(
        4, alpha=1.0, beta=1.0, iid=False, rng=np.random.default_rng(np.random.SeedSequence([7, 1]))
    )
    for index in (0, 3):
        request = DataRequest(f"device-{index}", index=index, count=4, seed=7)
        train = synthetic(request, alpha=1.0, beta=1.0)
        test = synthetic(DataRequest(f"device-{index}", index, 4, 7, "test"), alpha=1.0, beta=1.0)
        np.testing.assert_array_equal(train.X, splits[index].X_train)
        np.testing.assert_array_equal(test.y, splits[index].y_test)
        assert train.num_classes == 10


def test_per_device_holdout_keeps_each_devices_test_examples_apart() -> None:
    spec = DataSpec(source=DIGITS_LOADER, holdout="device", test_fraction=0.2, seed=0)
    data = build_data(spec, [1.0] * 4, seed=0)
    assert data.test_owner is not None
    assert data.partition == "dirichlet"
    assert len(data.y_test) + int(data.samples.sum()) == 1797
    held = np.bincount(data.test_owner, minlength=4)
    # Each device keeps its first 80% for training and holds out the rest.
    assert data.samples.tolist() == [
        int(0.8 * (n + h)) for n, h in zip(data.samples, held, strict=True)
    ]
    assert sorted(np.unique(data.test_owner).tolist()) == [0, 1, 2, 3]


def test_diabetes_is_a_standardised_regression() -> None:
    data = diabetes(DataRequest("fleet"))
    assert (len(data), data.num_features, data.task) == (442, 10, "regression")
    assert data.num_classes is None
    assert abs(float(data.y.mean())) < 1e-5
    assert abs(float(data.y.std()) - 1.0) < 1e-4
    spec = DataSpec(source="fedtier.simulations.datasets:diabetes", test_fraction=0.2)
    split = build_data(spec, [1.0] * 3, seed=0)
    assert (split.partition, split.task, len(split.y_test)) == ("iid", "regression", 88)
    with pytest.raises(ConfigError, match="'dirichlet' needs class labels"):
        build_data(DataSpec(source=spec.source, partition="dirichlet"), [1.0] * 3, seed=0)
