"""The simulator's attackers and defences: knobs, the per-device cap on a version, the study."""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.sim.cli import main
from fedtier.simulations.sim.engine import RunResult, Simulation, run_scenario
from fedtier.simulations.sim.scenario import load_scenario, parse_scenario
from fedtier.simulations.sim.specs import DefencesSpec, Scenario
from fedtier.tiers.config import EdgeConfig, load_config

# 12 devices, every one in every sync round, so a version holds exactly one
# update of each device (the attacker's included).
TINY: dict[str, object] = {
    "scenario": {"seed": 5},
    "fleet": {"regions": 2, "edges_per_region": 2, "devices": [{"kind": "phone", "count": 3}]},
    "data": {
        "dataset": "synthetic",
        "iid": True,
        "samples_log_mean": 2.0,
        "samples_log_sigma": 0.5,
        "samples_min": 20,
    },
    "training": {"lr": 0.05, "local_epochs": 1, "batch_size": 10},
    "clients": {"compute_median_s": 5.0, "compute_sigma": 0.5},
    "aggregation": {
        "mode": "sync",
        "clients_per_round": 12,
        "edge": {"flush": {"max_inputs": 3, "max_age_s": 4.0}},
        "regional": {"flush": {"max_inputs": 2, "max_age_s": 2.0}},
        "central": {"flush": {"max_inputs": 2, "max_age_s": False}},
    },
    "stop": {"versions": 5},
    "eval": {"train_loss": False},
}
# The cap the test checks: a fixed norm bound and weight cap, one update per device
# per version, so one device moves a version by at most W * B / sample_count.
CAP_W = 20
CAP_B = 1.0
DEFENCES_ON: dict[str, object] = {"max_samples": CAP_W, "norm_bound": "fixed", "max_norm": CAP_B}
DEFENCES_OFF: dict[str, object] = {"unsafe": True}


def scenario(**tables: object) -> Scenario:
    merged = copy.deepcopy(TINY)
    for key, value in tables.items():
        node = merged
        *parents, last = key.split("__")
        for part in parents:
            child = node.setdefault(part, {})
            assert isinstance(child, dict)
            node = child
        node[last] = value
    return parse_scenario(merged, name="tiny")


def one_attacker(kind: str, defences: dict[str, object], **more: object) -> RunResult:
    attack = {"kind": kind, "fraction": 0.05, **more}  # 0.05 x 12 rounds to one device
    result = run_scenario(scenario(attack=attack, defences=defences))
    assert result.attack is not None
    assert len(result.attack.malicious) == 1
    return result


@pytest.mark.parametrize(("kind", "extra"), [("weight_inflation", {}), ("scale", {"scale": 50.0})])
def test_one_device_moves_a_version_by_no_more_than_its_cap(
    kind: str, extra: dict[str, object]
) -> None:
    on = one_attacker(kind, DEFENCES_ON, **extra)
    off = one_attacker(kind, DEFENCES_OFF, **extra)
    assert on.attack is not None
    assert off.attack is not None
    assert len(on.attack.influence) == 5
    for version in on.attack.influence:
        # The attacker took part in every version, and stayed within its cap.
        assert version.attacker_move > 0.0
        assert version.attacker_weight <= CAP_W
        assert version.attacker_move * version.sample_count <= CAP_W * CAP_B * (1 + 1e-5)
    assert any(v.attacker_move * v.sample_count > 2 * CAP_W * CAP_B for v in off.attack.influence)
    assert max(v.attacker_share for v in off.attack.influence) > max(
        v.attacker_share for v in on.attack.influence
    )
    if kind == "weight_inflation":
        assert on.counts["central:weight_capped"] >= 5  # the attacker's, and large devices'
        # Off, the attacker's 2**31 claimed examples are the whole version.
        assert min(v.top_weight_share for v in off.attack.influence) > 0.99
        assert on.final.test_accuracy > off.final.test_accuracy + 0.2


def test_each_device_is_capped_at_its_declared_size_and_the_median() -> None:
    # The edge daemon's default, max_samples = "declared": a device's cap is the data
    # size registered for it (in the simulator its training set), at most the median
    # of those sizes, never its claim.
    # The reputation off: it would fold the flipped updates with weight 1 from the 5th.
    defences = {
        "max_samples": "declared",
        "norm_bound": "fixed",
        "max_norm": CAP_B,
        "reputation": {"enabled": False},
    }
    sim = Simulation(
        scenario(attack={"kind": "weight_inflation", "fraction": 0.05}, defences=defences)
    )
    result = sim.run()
    assert result.attack is not None
    assert result.attack.declared_caps
    (attacker,) = result.attack.malicious
    own = int(sim.data.samples[attacker])
    median = max(1, int(statistics.median(int(n) for n in sim.data.samples)))
    cap = min(own, median)
    assert cap < int(sim.data.samples.max())  # so a fleet-wide largest cap would differ
    assert len(result.attack.influence) == 5
    for version in result.attack.influence:
        assert version.attacker_weight == cap  # claimed 2**31, folded with its declared cap
        assert version.attacker_move * version.sample_count <= cap * CAP_B * (1 + 1e-5)
    # The attacker's five updates are capped, and so is every honest update of a
    # device above the median; none of a device at or below it.
    above = sum(1 for n in sim.data.samples if int(n) > median)
    assert (result.counts["central:weight_capped"] > 5) == (above > 0)


def test_future_base_is_refused_with_defences_on_and_moves_versions_without() -> None:
    hierarchical = {
        "aggregation__mode": "async",
        "aggregation__topology": "hierarchical",
        "stop": {"virtual_time_s": 60.0},
    }
    on = run_scenario(
        scenario(**hierarchical, attack={"kind": "future_base", "fraction": 0.2}, defences={})
    )
    off = run_scenario(
        scenario(
            **hierarchical, attack={"kind": "future_base", "fraction": 0.2}, defences=DEFENCES_OFF
        )
    )
    assert on.attack is not None
    assert off.attack is not None
    assert on.counts["edge:future_base"] > 0
    assert on.counts.get("edge:future_base", 0) % 10 == 0  # whole bursts of 10
    assert max(v.attacker_share for v in on.attack.influence) == 0.0
    assert off.counts.get("edge:future_base", 0) == 0
    assert max(v.attacker_share for v in off.attack.influence) > 0.5


def test_backdoor_success_is_measured() -> None:
    attack = {"kind": "backdoor", "fraction": 0.3, "trigger": [0, 1, 2]}
    result = run_scenario(scenario(attack=attack, defences=DEFENCES_OFF))
    assert result.attack is not None
    assert len(result.attack.malicious) == 4
    rates = dict(result.attack.backdoor_success)
    assert set(rates) == {r.version for r in result.records if r.evaluated}
    assert rates[max(rates)] > rates[0]


def test_knobs_parse() -> None:
    s = scenario(
        attack={"kind": "scale", "fraction": 0.2, "scale": 3},
        defences={
            "max_samples": 64,
            "norm_bound": "adaptive",
            "norm_factor": 2.5,
            "max_updates_per_version": False,
            "rate_per_s": 0.5,
            "robust": {"edge": {"rule": "median", "outlier_score": "cosine"}},
        },
        aggregation__mode="async",
    )
    assert s.attack is not None
    assert s.defences is not None
    assert (s.attack.kind, s.attack.fraction, s.attack.scale, s.attack.burst) == (
        "scale",
        0.2,
        3.0,
        1,
    )
    d = s.defences
    assert d.active
    assert d.max_samples == 64
    assert d.max_updates_per_version is None
    assert d.adaptive is not None
    assert d.adaptive.factor == 2.5
    assert d.rate_per_s == 0.5
    assert d.edge_robust.rule == "median"
    assert not d.regional_robust.enabled
    future = {"kind": "future_base", "fraction": 0.1}
    burst = scenario(attack=future, defences={}, aggregation__mode="async").attack
    assert burst is not None
    assert burst.burst == 10
    assert burst.base_offset == 1000
    assert scenario(defences={"unsafe": True}).defences == DefencesSpec(unsafe=True)


def test_defence_defaults_are_the_edge_daemon_defaults(tmp_path: Path) -> None:
    # What a minimal edge config file loads to, against [defences] = {}.
    path = tmp_path / "edge.toml"
    path.write_text(
        'fleet = "acme"\nsite = "s1"\nregion = "r1"\nidentity_key = "k.pem"\n'
        'state_dir = "state"\n[keys]\nsenders = "devices.toml"\ncentral = "central.pub"\n'
    )
    edge = load_config("edge", path)
    assert isinstance(edge, EdgeConfig)
    rules = edge.influence
    d = DefencesSpec()
    assert d.max_norm == edge.max_norm
    assert d.adaptive == rules.adaptive_norm
    assert d.max_updates_per_version == rules.max_updates_per_version
    assert d.rate_per_s == rules.rate_per_s
    assert d.burst == rules.burst
    assert d.reject_future_base == rules.reject_future_base
    assert (d.max_samples == "declared") == rules.derive_cap
    assert d.reputation == rules.reputation


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"attack": {"kind": "scale", "fraction": 0.1}}, "needs a \\[defences\\] table"),
        ({"attack": {"kind": "nope", "fraction": 0.1}, "defences": {}}, "attack.kind"),
        ({"attack": {"kind": "scale", "fraction": 0.0}, "defences": {}}, "attack.fraction"),
        ({"attack": {"kind": "scale", "fraction": 1.5}, "defences": {}}, "attack.fraction"),
        ({"attack": {"kind": "scale"}, "defences": {}}, "attack.fraction is missing"),
        ({"attack": {"kind": "scale", "fraction": 0.1, "x": 1}, "defences": {}}, "'x'"),
        (
            {"attack": {"kind": "backdoor", "fraction": 0.1, "trigger": []}, "defences": {}},
            "trigger",
        ),
        (
            {"attack": {"kind": "future_base", "fraction": 0.1}, "defences": {}},
            "sync rounds never compare",
        ),
        ({"defences": {"norm_bound": "none"}}, "defences.norm_bound"),
        ({"defences": {"max_samples": 0}}, "defences.max_samples"),
        ({"defences": {"max_samples": "lots"}}, "defences.max_samples"),
        ({"defences": {"norm_window": 4, "norm_warmup": 8}}, "norm_warmup"),
        ({"defences": {"rate_per_s": -1}}, "defences.rate_per_s"),
        ({"defences": {"robust": {"edge": {"trim": 0.5}}}}, "trim"),
        ({"defences": {"robust": {"central": {"rule": "median"}}}}, "'central'"),
        ({"defences": {"robust": {"edge": {"rule": "median"}}}}, "hierarchical"),
        (
            {"defences": {}, "aggregation__edge__max_norm": 5.0},
            "both set a norm bound",
        ),
    ],
)
def test_nonsense_knobs_are_a_config_error(tables: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        scenario(**tables)


def test_the_study_command_runs_on_a_tiny_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The command of docs/results.md, section 7, with one attack, one seed and short runs.
    code = main(
        [
            "experiment",
            "poison",
            "--out",
            str(tmp_path),
            "--seeds",
            "0",
            "--attacks",
            "weight_inflation",
            "--set",
            "stop.virtual_time_s=60",
            "--no-progress",
            # Twelve runs' own plots would take about as long as the runs; none is read.
            "--no-run-plots",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    rows = printed["rows"]
    assert [(r["attack"], r["fraction"], r["defences"]) for r in rows] == [
        (kind, fraction, defences)
        for kind, fraction in ((None, 0.0), ("weight_inflation", 0.1), ("weight_inflation", 0.2))
        for defences in ("off", "on, no reputation", "on", "on + robust")
    ]
    assert all(0.0 <= a <= 1.0 for r in rows for a in r["final_accuracy"])
    assert set(printed["targets"]) == {
        "weight_inflation, defences on, no reputation",
        "weight_inflation, defences on",
        "weight_inflation, defences on + robust",
    }
    summary = (tmp_path / "summary.md").read_text()
    assert "| weight_inflation, 20% | on |" in summary
    assert "What the defences (on) cost with no attacker" in summary
    influence = tmp_path / "runs" / "weight-inflation-20-defences-off" / "seed0" / "influence.csv"
    header = influence.read_text().splitlines()[0]
    assert header.startswith("version,sample_count,step_norm")
    assert not math.isnan(rows[8]["max_attacker_share"][0])


def test_the_study_refuses_an_unknown_attack(tmp_path: Path) -> None:
    assert main(["experiment", "poison", "--out", str(tmp_path), "--attacks", "nope"]) == 2


def test_the_attribution_adds_up_to_each_version_step() -> None:
    # Hierarchical: device vectors pass two discounted partial folds before the central.
    s = scenario(
        aggregation__mode="async",
        aggregation__topology="hierarchical",
        stop={"virtual_time_s": 40.0},
        attack={"kind": "scale", "fraction": 0.2},
        defences=DEFENCES_OFF,
    )
    sim = Simulation(s)
    steps: dict[int, float] = {}
    make_version = sim.central.make_version

    def measured() -> bool:
        before = sim.central.params.copy()
        made = make_version()
        if made:
            steps[sim.central.version] = float(np.linalg.norm(sim.central.params - before))
        return made

    sim.central.make_version = measured  # type: ignore[method-assign]
    result = sim.run()
    assert result.attack is not None
    assert len(result.attack.influence) == len(steps) > 3
    for version in result.attack.influence:
        assert version.step_norm == pytest.approx(steps[version.version], rel=1e-4)
        assert 0.0 < version.top_share <= 1.0


def test_the_edges_down_weight_sign_flippers_and_no_honest_device() -> None:
    # The study's fleet (non-IID digits, 100 devices over 10 edge sites, 20% sign
    # flippers), cut to 1,000 virtual seconds: each device sends about 4 updates, the
    # reputation's min_updates, so about half of the flippers are judged by the end.
    s = load_scenario(
        Path("simulations/scenarios/poison-base.toml"),
        overrides=['attack.kind="sign_flip"', "attack.fraction=0.2", "stop.virtual_time_s=1000"],
        seed=0,
    )
    sim = Simulation(s)
    result = sim.run()
    assert result.attack is not None
    malicious = {sim.training.identity(d).key_id for d in result.attack.malicious}
    low: set[str] = set()
    for node in sim.nodes:
        reputation = None if node.influence is None else node.influence.reputation
        if reputation is not None:
            low |= {k for k in reputation.senders if reputation.low(k)}
    assert low
    assert low <= malicious
    assert len(low) >= len(malicious) // 4
    down_weighted = sum(v for k, v in result.counts.items() if k.endswith(":low_reputation"))
    assert down_weighted > 0
