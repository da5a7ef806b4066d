"""What ``--topology ha`` plans: a leased second instance per tier, cluster URLs; no process."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fedtier.protocol.errors import FedtierError
from fedtier.simulations.chaos import ChaosOptions, FaultPlan
from fedtier.simulations.mesh import Brokers, prepare_mesh
from fedtier.tiers.config import load_config


def _fake_cluster_brokers() -> Brokers:
    # prepare_mesh reads only addresses from the brokers; no process is started.
    mosquitto: Any = SimpleNamespace(host="127.0.0.1", port=1883, tier_port=1883)
    nodes = [
        SimpleNamespace(url=f"nats://127.0.0.1:{4222 + i}", monitoring_url=f"http://h:{8222 + i}")
        for i in range(3)
    ]
    cluster: Any = SimpleNamespace(
        nodes=nodes,
        urls=[n.url for n in nodes],
        monitoring_urls=[n.monitoring_url for n in nodes],
    )
    return Brokers(mosquitto, nodes[0], nats_cluster=cluster)  # type: ignore[arg-type]


@pytest.mark.parametrize("edge_pairs", [True, False], ids=["edge_pairs", "single_edges"])
def test_ha_plans_a_leased_standby_of_each_tier_on_every_cluster_node(
    tmp_path: Path, edge_pairs: bool
) -> None:
    options = ChaosOptions(
        out_dir=tmp_path / "out",
        topology="ha",
        edge_pairs=edge_pairs,
        regions=(("r1", ("s1", "s2")),),
    )
    plan = prepare_mesh(
        options.mesh_spec(), tmp_path / "work", tmp_path / "out", _fake_cluster_brokers()
    )
    expected = {"central-b": "central", "regional-r1-b": "regional"}
    if edge_pairs:
        expected |= {"edge-s1-b": "edge", "edge-s2-b": "edge"}
    assert {name: tier for name, (tier, _) in plan.standby_configs.items()} == expected

    firsts = {
        "central": ("central", plan.central_config),
        "regional-r1": ("regional", plan.regional_configs["r1"]),
        **{f"edge-{s}": ("edge", path) for s, path in plan.edge_configs.items()},
    }
    instances = {**firsts, **plan.standby_configs}
    configs = {name: load_config(tier, path) for name, (tier, path) in instances.items()}  # type: ignore[arg-type]
    for name, config in configs.items():
        assert config.lease.enabled, name
        assert config.lease.instance == name
        assert config.nats.replicas == 3
        assert list(config.nats.servers) == [f"nats://127.0.0.1:{4222 + i}" for i in range(3)]
        assert len(config.nats.monitoring_urls) == 3
        assert config.state_dir == plan.state_dirs[name]
    # Every instance its own state directory (a machine's loss deletes one).
    assert len({config.state_dir for config in configs.values()}) == len(configs)
    # The regional accepts the partials of both edges of a site, the central
    # those of both regionals; the central's key is the fleet's one key.
    edge_keys = (plan.workdir / "keys" / "edges-r1.toml").read_text()
    assert ('"edge-s1-b"' in edge_keys) is edge_pairs
    assert '"regional-r1-b"' in (plan.workdir / "keys" / "regionals.toml").read_text()
    assert configs["central"].identity_key == configs["central-b"].identity_key


def test_machine_losses_and_node_kills_need_the_ha_topology(tmp_path: Path) -> None:
    plan: Any = FaultPlan  # counts by kind name
    for kind in ("lose_edge", "lose_regional", "lose_central", "kill_nats_node"):
        with pytest.raises(FedtierError, match="needs --topology ha"):
            ChaosOptions(out_dir=tmp_path, faults=plan(**{kind: 1}))
    with pytest.raises(FedtierError, match="topology 'mesh' is unknown"):
        ChaosOptions(out_dir=tmp_path, topology="mesh")


def test_the_command_runs_the_ha_topology_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collections import Counter

    from fedtier.simulations.chaos import ChaosResult, _cli
    from fedtier.simulations.checker import check

    seen: list[ChaosOptions] = []

    async def fake_run(options: ChaosOptions) -> ChaosResult:
        seen.append(options)
        return ChaosResult(
            report=check({}, Counter(), 0),
            updates_in_logs=0,
            faults=Counter(),
            skipped=Counter(),
            exits=Counter(),
            failures=[],
            sent=0,
            receipted=0,
            drained=True,
            elapsed_s=0.0,
            phase_s={},
            unsafe=options.unsafe,
            crash_at="",
            topology=options.topology,
            missing_records=[5],
        )

    monkeypatch.setattr(_cli, "run_chaos", fake_run)
    argv = "--topology ha --single-edges --lease-ttl-s 15 --lose-regional 3 --lose-central 3"
    status = _cli.main([*argv.split(), "--kill-nats-node", "4", "--out", str(tmp_path)])
    (options,) = seen
    assert (options.ha, options.edge_pairs, options.lease_ttl_s) == (True, False, 15.0)
    assert (options.faults.lose_regional, options.faults.lose_central) == (3, 3)
    assert options.faults.kill_nats_node == 4
    # A published version whose lineage could not be read fails the run.
    assert status == 1
