"""The chaos run's pure parts: the fault schedule, options and argument parsing."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from fedtier import cli
from fedtier.protocol.errors import FedtierError
from fedtier.simulations import chaos
from fedtier.simulations.chaos import ALL_UNSAFE, ChaosOptions, FaultPlan, _cli, _plan
from fedtier.simulations.mesh import parse_regions


def test_schedule_holds_every_fault_in_the_window_and_targets_in_turn() -> None:
    plan = FaultPlan(kill_edge=5, kill_nats=2, proxy_partition=3, broker_down_s=(2.0, 3.0))
    schedule = _plan._schedule(plan, random.Random(3), window_s=10.0)
    kinds = Counter(f.kind for f in schedule)
    assert kinds == {"kill_edge": 5, "kill_nats": 2, "proxy_partition": 3}
    assert [f.at_s for f in schedule] == sorted(f.at_s for f in schedule)
    assert all(0.0 <= f.at_s <= 10.0 for f in schedule)
    assert sorted(f.target for f in schedule if f.kind == "kill_edge") == [0, 1, 2, 3, 4]
    assert all(2.0 <= f.down_s <= 3.0 for f in schedule if f.kind == "kill_nats")
    assert plan.total == 10
    again = _plan._schedule(plan, random.Random(3), window_s=10.0)
    assert again == schedule


def test_options_check_switches_and_sites(tmp_path: Path) -> None:
    with pytest.raises(FedtierError, match="unknown"):
        ChaosOptions(out_dir=tmp_path, unsafe=frozenset({"trust_everyone"}))
    with pytest.raises(FedtierError, match="cannot cover"):
        ChaosOptions(out_dir=tmp_path, devices=1)
    options = ChaosOptions(out_dir=tmp_path, unsafe=ALL_UNSAFE, edge_keepalive_s=5, ack_wait_s=3)
    assert options.stop_s == 8.5  # past 1.5 x keepalive (the broker drops the edge) and ack wait
    spec = options.mesh_spec()
    assert spec.send.unsafe_trust_puback
    assert spec.ack_wait_s == 3
    assert not ChaosOptions(out_dir=tmp_path).mesh_spec().send.unsafe_trust_puback


def test_command_arguments_parse() -> None:
    assert parse_regions("r1:s1+s2,r2:s3") == (("r1", ("s1", "s2")), ("r2", ("s3",)))
    with pytest.raises(FedtierError, match="REGION:SITE"):
        parse_regions("r1")
    assert _cli._parse_unsafe(None) == frozenset()
    assert _cli._parse_unsafe("all") == ALL_UNSAFE
    assert _cli._parse_unsafe("ack_before_commit, device_trust_puback") == {
        "ack_before_commit",
        "device_trust_puback",
    }


def test_unknown_switch_on_the_command_line_is_one_sentence(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Through `fedtier sim chaos`, forwarded like `fedtier sim check`.
    assert cli.main(["sim", "chaos", "--unsafe", "yolo", "--out", str(tmp_path)]) == 2
    assert "unsafe switch 'yolo' is unknown" in capsys.readouterr().err
    assert chaos.main(["--crash-at", "edge.after_lunch:1", "--out", str(tmp_path)]) == 2
    assert "after_lunch" in capsys.readouterr().err
