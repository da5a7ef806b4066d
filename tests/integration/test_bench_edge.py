"""`fedtier bench edge` with tiny numbers: well-formed JSON, positive rates, right counts.

No timing assertions (speed is measured by benchmarks, never by
tests); the bench starts its own Mosquitto, so this needs the real broker.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from fedtier.cli import main
from fedtier.simulations.bench.edge import DEFAULT_FORMATS

pytestmark = pytest.mark.brokers

UPDATES, PARAMS, DEVICES = 40, 1000, 8


@pytest.fixture
def private_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The bench's temporary folder goes here, so the test can see it is removed."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def run_bench(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    argv = ["bench", "edge", "--json", "--updates", str(UPDATES), "--params", str(PARAMS)]
    assert main([*argv, "--devices", str(DEVICES), "--repeats", "1", *extra]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def test_reports_every_default_format_with_consistent_counts(
    capsys: pytest.CaptureFixture[str], private_tempdir: Path
) -> None:
    result = run_bench(capsys)
    assert (result["num_params"], result["updates"], result["devices"]) == (
        PARAMS,
        UPDATES,
        DEVICES,
    )
    assert result["machine"]["cpu_count"] >= 1
    assert len(result["machine"]["load_avg_at_start"]) == 3
    assert result["settings"]["malloc_tuning"] is True
    formats = result["formats"]
    assert list(formats) == list(DEFAULT_FORMATS)
    for name, row in formats.items():
        baseline, edge, closed = row["baseline"], row["edge"], row["edge_closed_loop"]
        assert baseline["updates"] == UPDATES, name
        assert (baseline["load"], edge["load"], closed["load"]) == ("open", "open", "closed")
        for run in (edge, closed):
            assert run["updates"] == run["accepted"] == run["receipts_accepted"] == UPDATES, name
            latency = run["latency_ms"]
            assert 0 < latency["p50"] <= latency["p99"] <= latency["max"], name
            # Every accept is durable before its receipt, in at least one commit.
            assert run["commits"] >= 1, name
            assert run["partials_published"] == 0  # 40 updates stay under flush.max_inputs 50
            assert run["partial_bytes_per_update"] == 0, name
            assert set(run["cpu_ms_per_update"]) == {"publisher", "broker", "edge"}, name
            assert run["cpu_ms_per_update"]["edge"] > 0, name
            # Each envelope is written (once) before its receipt: at least the wire bytes.
            assert run["intake_write_bytes_per_update"] >= row["wire_bytes"], name
            assert run["intake_write_vs_wire"] >= 1.0, name
        # A commit never holds more than the updates outstanding at once: one per
        # device in the closed loop.
        assert closed["commits_per_update"] >= 1 / DEVICES, name
        for rate in (
            baseline["updates_per_s"],
            edge["updates_per_s"],
            closed["updates_per_s"],
            row["publisher"]["alone_updates_per_s"],
            row["ceiling"]["updates_per_s"],
            row["edge_vs_baseline"],
            row["edge_closed_loop_vs_baseline"],
        ):
            assert rate > 0, name
        assert set(baseline["cpu_ms_per_update"]) == {"publisher", "broker", "bare"}, name
    sizes = [formats[name]["wire_bytes"] for name in DEFAULT_FORMATS]
    assert sizes == sorted(sizes, reverse=True)  # f32 > i8 > top-1%
    assert list(private_tempdir.iterdir()) == []  # broker, stores and logs removed
    assert result["model_latency"] is None  # not asked for


def test_no_malloc_tuning_profiles_and_the_model_latency_are_reported(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # One format, profiled, then one round through a real mesh (nats-server,
    # central, regional, edge): a buffer's last update until the new model is at the device.
    profiles = tmp_path / "profiles"
    result = run_bench(
        capsys,
        "--formats",
        "top1%+i8",
        "--no-malloc-tuning",
        "--profile",
        str(profiles),
        "--model-rounds",
        "1",
    )
    # The bare run and both edge runs, each with its stats and their summary.
    stems = ["baseline-1-baseline", "edge-2-edge", "edge-3-edge"]
    assert sorted(p.name for p in profiles.iterdir()) == sorted(
        f"{stem}{suffix}" for stem in stems for suffix in (".pstats", ".txt")
    )
    assert "function calls" in (profiles / "edge-2-edge.txt").read_text()
    assert result["settings"]["malloc_tuning"] is False
    assert list(result["formats"]) == ["top1%+i8"]
    assert result["formats"]["top1%+i8"]["edge"]["accepted"] == UPDATES
    model = result["model_latency"]
    assert model["rounds"] == 1
    (sample,) = model["latency_ms"]["samples"]
    assert 0 < sample == model["latency_ms"]["p50"] == model["latency_ms"]["max"]


@pytest.mark.parametrize(
    "args",
    [
        ["--updates", "0"],
        ["--devices", "0"],
        ["--formats", "nope"],
        ["--params", "100000000"],
        ["--model-rounds", "-1"],
    ],
)
def test_bad_arguments_are_one_sentence(
    capsys: pytest.CaptureFixture[str], private_tempdir: Path, args: list[str]
) -> None:
    assert main(["bench", "edge", "--json", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("fedtier: ")
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert list(private_tempdir.iterdir()) == []  # nothing started


def test_too_many_bytes_per_format_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "edge", "--json", "--params", "1000000", "--updates", "2000"]
    assert main([*argv, "--formats", "f32"]) == 2
    assert "use fewer updates" in capsys.readouterr().err
