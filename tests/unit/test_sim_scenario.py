"""Scenario files: defaults, base files, overrides, and one-sentence errors for bad values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.sim.scenario import (
    apply_override,
    dump_toml,
    load_scenario,
    parse_scenario,
)
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
