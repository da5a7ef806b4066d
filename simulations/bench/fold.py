"""``fedtier bench fold``: fedtier's fold per codec against Flower's ``aggregate()`` and numpy.

Each measurement runs in a fresh process of its own (the same layout for every
implementation), on the same updates built from the same seed: fedtier's
``Accumulator`` folding the updates as they arrive on the wire (one
``fold_into`` per payload: decode and weighted add in one pass, no dense
temporary), a bare numpy loop (the baseline measured in the same run, since
this machine is shared), and, when an interpreter with ``flwr`` is given,
Flower's ``flwr.server.strategy.aggregate.aggregate`` over the same dense
arrays. Flower pins protobuf, cryptography and rich at versions fedtier's
environment does not carry, so it lives in its own virtual environment:
``make bench-flower-env`` makes ``.venv-flower``, which is the default.

Prints JSON: time (median of the repeats after a warm-up) and memory (what
the aggregation itself allocates, by tracemalloc, and the process's peak RSS)
per variant, and each result's relative L2 difference from the baseline's
(0 up to float32 rounding for a dense fold; the codec's own error for the
others).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from fedtier.protocol.codecs import CodecSpec, encode, fold_into
from fedtier.protocol.errors import BenchError
from fedtier.simulations.bench import _flower_fold
from fedtier.tiers.aggregate import Accumulator

__all__ = ["DEFAULT_CODECS", "main", "run_fold_bench"]

DEFAULT_CODECS: Final = ("f32", "f16", "i8", "top1%+i8")
DEFAULT_FLOWER_PYTHON: Final = Path(".venv-flower/bin/python")
_WORKER: Final = Path(_flower_fold.__file__)
_TIMEOUT_S: Final = 1800


def _fedtier_worker(args: argparse.Namespace) -> int:
    """Fold the updates encoded with ``args.codec``, as an edge folds them off the wire."""
    deltas, samples = _flower_fold.make_updates(args.params, args.updates, args.seed)
    spec = CodecSpec.parse(args.codec, num_params=args.params)
    payloads = [encode(delta, spec) for delta in deltas]
    del deltas  # the wire form only, as an edge holds it
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def run() -> np.ndarray:
        acc = Accumulator(args.params)
        for i, (payload, n) in enumerate(zip(payloads, samples, strict=True)):
            acc.fold_update(
                i.to_bytes(16, "big"),
                functools.partial(fold_into, payload=payload, spec=spec),
                n_samples=n,
                tau=0,
                discount=1.0,
                base_version=0,
            )
        return acc.result()

    result = run()  # warm-up
    times, peaks = [], []
    for _ in range(args.repeats):
        tracemalloc.start()
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    np.save(args.result, np.asarray(result, dtype=np.float32))
    figures = {
        "seconds": round(statistics.median(times), 4),
        "alloc_peak_mb": round(max(peaks) / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "inputs_rss_mb": round(rss_inputs / 1024, 1),
        "wire_mb": round(sum(len(p) for p in payloads) / 2**20, 3),
    }
    json.dump(figures, sys.stdout)
    return 0


def _run(argv: Sequence[str], result: Path) -> dict[str, Any]:
    done = subprocess.run(  # noqa: S603 - our own interpreter(s) and script, no shell
        [*argv, "--result", str(result)],
        capture_output=True,
        text=True,
        timeout=_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"fold worker {argv[:3]} failed: {done.stderr.strip()[-2000:]}")
    figures: dict[str, Any] = json.loads(done.stdout)
    return figures


def _relative_difference(result: Path, baseline: np.ndarray) -> float:
    values = np.load(result)
    return float(np.linalg.norm(values - baseline) / max(float(np.linalg.norm(baseline)), 1e-30))


def run_fold_bench(
    *,
    params: int,
    updates: int,
    codecs: Sequence[str] = DEFAULT_CODECS,
    repeats: int = 3,
    seed: int = 0,
    flower_python: Path | None = None,
) -> dict[str, Any]:
    """Measure every variant in its own process; see the module docstring."""
    if params < 1 or updates < 1 or repeats < 1:
        raise BenchError("--params, --updates and --repeats must be at least 1")
    for name in codecs:
        CodecSpec.parse(name, num_params=params)  # a bad name fails before any run
    common = [
        f"--params={params}",
        f"--updates={updates}",
        f"--seed={seed}",
        f"--repeats={repeats}",
    ]
    out: dict[str, Any] = {
        "bench": "fold",
        "params": params,
        "updates": updates,
        "repeats": repeats,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "platform": platform.platform(),
        },
    }
    with tempfile.TemporaryDirectory(prefix="fedtier-bench-fold-") as tmp:
        workdir = Path(tmp)
        baseline_file = workdir / "numpy.npy"
        out["baseline_numpy"] = _run(
            [sys.executable, str(_WORKER), "numpy", *common], baseline_file
        )
        baseline = np.load(baseline_file)
        fedtier: dict[str, Any] = {}
        for name in codecs:
            result = workdir / f"fedtier-{len(fedtier)}.npy"
            figures = _run(
                [sys.executable, "-m", __name__, "--worker", f"--codec={name}", *common], result
            )
            figures["relative_l2_vs_baseline"] = _relative_difference(result, baseline)
            figures["seconds_vs_baseline"] = _ratio(figures, out["baseline_numpy"])
            fedtier[name] = figures
        out["fedtier"] = fedtier
        out["flower"] = _flower(flower_python, common, workdir, baseline)
    flower = out["flower"]
    if flower.get("available") and "f32" in fedtier:
        out["flower_over_fedtier_f32"] = {
            "seconds": _ratio(flower, fedtier["f32"]),
            "alloc_peak": _ratio(flower, fedtier["f32"], key="alloc_peak_mb"),
        }
    return out


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str = "seconds") -> float | None:
    return round(a[key] / b[key], 2) if b.get(key) else None


def _flower(
    python: Path | None, common: list[str], workdir: Path, baseline: np.ndarray
) -> dict[str, Any]:
    if python is None:
        python = DEFAULT_FLOWER_PYTHON if DEFAULT_FLOWER_PYTHON.exists() else None
    if python is None:
        return {
            "available": False,
            "why": "no interpreter with flwr: run `make bench-flower-env` (makes .venv-flower) "
            "or pass --flower-python",
        }
    result = workdir / "flower.npy"
    figures = _run([str(python), str(_WORKER), "flower", *common], result)
    figures["available"] = True
    figures["relative_l2_vs_baseline"] = _relative_difference(result, baseline)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtier bench fold``; with ``--worker``, one fedtier measurement (internal)."""
    parser = argparse.ArgumentParser(
        prog="fedtier bench fold",
        description="fedtier's fold (each codec) vs Flower's aggregate() and numpy; JSON",
    )
    parser.add_argument("--params", type=int, default=1_000_000, help="model size")
    parser.add_argument("--updates", type=int, default=200, help="updates folded")
    parser.add_argument(
        "--codecs", default=",".join(DEFAULT_CODECS), help="comma-separated codec names"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--flower-python",
        type=Path,
        default=None,
        help="an interpreter with flwr installed (default: .venv-flower/bin/python if present)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--codec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _fedtier_worker(args)
    report = run_fold_bench(
        params=args.params,
        updates=args.updates,
        codecs=[c.strip() for c in args.codecs.split(",") if c.strip()],
        repeats=args.repeats,
        seed=args.seed,
        flower_python=args.flower_python,
    )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
