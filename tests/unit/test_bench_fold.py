"""``fedtier bench fold`` as a user runs it: JSON, each variant in its own process, same result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_fold_prints_every_variant_and_says_how_to_get_flower(tmp_path: Path) -> None:
    # Run where there is no .venv-flower: the Flower column says how to get it.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedtier",
            "bench",
            "fold",
            "--params",
            "3000",
            "--updates",
            "6",
            "--repeats",
            "1",
            "--codecs",
            "f32,i8,top1%+i8",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["params"], report["updates"]) == (3000, 6)
    assert report["baseline_numpy"]["seconds"] >= 0
    fedtier = report["fedtier"]
    assert list(fedtier) == ["f32", "i8", "top1%+i8"]
    # The same updates everywhere: a dense fold equals numpy's weighted mean up
    # to float32 rounding; a lossy codec differs by its own error only.
    assert fedtier["f32"]["relative_l2_vs_baseline"] < 1e-6
    assert 0 < fedtier["i8"]["relative_l2_vs_baseline"] < 0.05
    assert fedtier["top1%+i8"]["wire_mb"] < fedtier["i8"]["wire_mb"] < fedtier["f32"]["wire_mb"]
    assert report["flower"] == {
        "available": False,
        "why": "no interpreter with flwr: run `make bench-flower-env` (makes .venv-flower) "
        "or pass --flower-python",
    }
