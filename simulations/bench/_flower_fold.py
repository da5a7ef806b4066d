"""One fold measurement in its own process: fedtier's fold, Flower's ``aggregate()``, or numpy.

Run as a script by ``fedtier bench fold`` (``simulations/bench/fold.py``),
never imported by fedtier: the Flower variant runs under Flower's own
interpreter (a separate virtual environment, because flwr pins versions of
protobuf, cryptography and rich that fedtier's environment does not have), so
this file imports only the standard library and numpy at module level.

Every variant builds the same updates from the same seed (numpy's PCG64 and
its standard normal are stable across numpy releases), so all of them
aggregate identical data; the parent compares their results. Memory is
measured with ``tracemalloc`` around the aggregation alone (numpy reports
its buffers to it) plus the process's peak RSS; time is the median of the
repeats, after one warm-up run.

Prints one JSON object on stdout and writes the aggregate (float32, ``.npy``)
where ``--result`` says.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


def make_updates(params: int, updates: int, seed: int) -> tuple[list[F32], list[int]]:
    """The updates every variant aggregates: dense float32 deltas and sample counts."""
    rng = np.random.default_rng(seed)
    deltas = [
        rng.standard_normal(params, dtype=np.float32) * np.float32(0.01) for _ in range(updates)
    ]
    samples = [int(n) for n in rng.integers(10, 1000, size=updates)]
    return deltas, samples


def _flower(deltas: list[F32], samples: list[int]) -> Callable[[], F32]:
    from flwr.server.strategy.aggregate import aggregate  # type: ignore[import-not-found]

    # What Flower's server strategies hand aggregate(): (list of layer arrays, n).
    results = [([delta], n) for delta, n in zip(deltas, samples, strict=True)]

    def run() -> F32:
        layers: list[Any] = aggregate(results)
        return np.asarray(layers[0], dtype=np.float32)

    return run


def _numpy(deltas: list[F32], samples: list[int]) -> Callable[[], F32]:
    total = float(sum(samples))

    def run() -> F32:
        acc = np.zeros_like(deltas[0])
        for delta, n in zip(deltas, samples, strict=True):
            acc += np.float32(n) * delta
        acc /= np.float32(total)
        return acc

    return run


def _measure(run: Callable[[], F32], repeats: int) -> tuple[F32, dict[str, Any]]:
    result = run()  # warm-up: first-touch page faults are not the fold's cost
    times = []
    peaks = []
    for _ in range(repeats):
        tracemalloc.start()
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return result, {
        "seconds": round(statistics.median(times), 4),
        "alloc_peak_mb": round(max(peaks) / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure one variant; ``fedtier`` variants are run by fold.py through its own worker."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant", choices=("flower", "numpy"))
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--updates", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--result", required=True, help="where to write the aggregate (.npy)")
    args = parser.parse_args(argv)
    deltas, samples = make_updates(args.params, args.updates, args.seed)
    rss_inputs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = _flower(deltas, samples) if args.variant == "flower" else _numpy(deltas, samples)
    result, figures = _measure(run, args.repeats)
    np.save(args.result, result)
    figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    figures["inputs_rss_mb"] = round(rss_inputs / 1024, 1)
    if args.variant == "flower":
        import flwr  # type: ignore[import-not-found]

        figures["version"] = str(flwr.__version__)
    json.dump(figures, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
