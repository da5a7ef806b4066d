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
        baseline, edge = row["baseline"], row["edge"]
        assert baseline["updates"] == UPDATES, name
        assert edge["updates"] == edge["accepted"] == edge["receipts_accepted"] == UPDATES, name
        for rate in (
            baseline["updates_per_s"],
            edge["updates_per_s"],
            row["publisher"]["alone_updates_per_s"],
            row["ceiling"]["updates_per_s"],
            row["edge_vs_baseline"],
        ):
            assert rate > 0, name
        latency = edge["latency_ms"]
        assert 0 < latency["p50"] <= latency["p99"] <= latency["max"], name
        # Every accept is durable before its receipt, in at least one commit,
        # and a commit never holds more than the updates outstanding at once.
        assert edge["commits"] >= 1, name
        assert edge["commits_per_update"] >= 1 / DEVICES, name
        assert edge["partials_published"] == 0  # 40 updates stay under flush.max_inputs 50
    sizes = [formats[name]["wire_bytes"] for name in DEFAULT_FORMATS]
    assert sizes == sorted(sizes, reverse=True)  # f32 > i8 > top-1%
    assert list(private_tempdir.iterdir()) == []  # broker, stores and logs removed


def test_no_malloc_tuning_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_bench(capsys, "--formats", "top1%+i8", "--no-malloc-tuning")
    assert result["settings"]["malloc_tuning"] is False
    assert list(result["formats"]) == ["top1%+i8"]
    assert result["formats"]["top1%+i8"]["edge"]["accepted"] == UPDATES


@pytest.mark.parametrize(
    "args",
    [["--updates", "0"], ["--devices", "0"], ["--formats", "nope"], ["--params", "100000000"]],
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
