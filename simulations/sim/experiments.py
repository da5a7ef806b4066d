"""The experiments of ``docs/results.md`` over seeds; imports the engine, never a tier or trainer.

Imports the scenario loader, the in-process engine and the report writers;
never a tier or a trainer directly. Each experiment is a list of cells
(scenario file, overrides, seed); every cell writes its own run report under
``OUT/runs/``, and the experiment writes ``OUT/summary.md`` (the tables
``docs/results.md`` quotes) and its comparison plots. Cells are independent
and deterministic, so ``--jobs`` only changes how long it takes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.sim._attribution import summary as influence_summary
from fedtier.simulations.sim.engine import RunResult, VersionRecord, run_scenario
from fedtier.simulations.sim.report import evaluated, plot_curves, time_to_accuracy, write_run
from fedtier.simulations.sim.scenario import load_scenario
from fedtier.simulations.sim.specs import ATTACK_KINDS

__all__ = ["Cell", "fedprox_dataset_keys", "run_experiment"]

SCENARIOS_DIR = Path(__file__).resolve().parent.parent / "scenarios"

FEDPROX_DATASETS = (
    ("Synthetic IID", "fedprox-synthetic-iid"),
    ("Synthetic(0,0)", "fedprox-synthetic-0-0"),
    ("Synthetic(0.5,0.5)", "fedprox-synthetic-0.5-0.5"),
    ("Synthetic(1,1)", "fedprox-synthetic-1-1"),
    ("Synthetic(1,1), 90% stragglers", "fedprox-synthetic-1-1-stragglers"),
    (
        "Synthetic(1,1), 90% stragglers, published sizes",
        "fedprox-synthetic-1-1-stragglers-paper-sizes",
    ),
)
# Run only when asked (--datasets): a check added after the main results, not one of
# the issue's datasets.
FEDPROX_EXTRA_DATASETS = frozenset({"fedprox-synthetic-1-1-stragglers-paper-sizes"})
FEDPROX_METHODS = (
    ("FedAvg", ()),
    ("FedProx (mu=1)", ("training.mu=1", "clients.straggler_policy=partial")),
)
# Rounds from here on count as "late" in the stability table.
FEDPROX_LATE_ROUND = 150
# What the issue asks of each dataset: FedProx minus FedAvg test accuracy, in points.
FEDPROX_TARGETS = {
    "Synthetic IID": "FedAvg >= 0.90",
    "Synthetic(0.5,0.5)": "FedProx - FedAvg >= 3 points",
    "Synthetic(1,1)": "FedProx - FedAvg >= 3 points",
    "Synthetic(1,1), 90% stragglers": "FedProx - FedAvg >= 10 points",
    "Synthetic(1,1), 90% stragglers, published sizes": "FedProx - FedAvg >= 10 points",
}
# The paper's findings as its Figures 1 and 2 show them (training-loss curves, read
# qualitatively; docs/results.md quotes the sources). No per-dataset numbers are given here.
FEDPROX_PAPER = {
    "Synthetic IID": "Fig. 2: IID data converges best; heterogeneity is what hurts FedAvg",
    "Synthetic(0,0)": "Fig. 2: more heterogeneity, worse FedAvg convergence; mu > 0 helps",
    "Synthetic(0.5,0.5)": "Fig. 2: FedAvg converges worse and less stably; mu > 0 helps",
    "Synthetic(1,1)": "Fig. 2: the most heterogeneous case; mu > 0 stabilises it",
    "Synthetic(1,1), 90% stragglers": (
        "Fig. 1: FedAvg (drops stragglers) is unstable or diverges; FedProx with partial "
        "work and mu > 0 converges"
    ),
    "Synthetic(1,1), 90% stragglers, published sizes": (
        "as above; the device sizes of the published draw, the rest drawn per seed"
    ),
}
SYNC_VARIANTS = (
    ("synchronous FedAvg", "stragglers-sync"),
    ("flat FedBuff (K=10)", "stragglers-fedbuff-flat"),
    ("hierarchical FedBuff", "stragglers-fedbuff-hier"),
)
CODECS = (
    ("f32", False),
    ("f16", False),
    ("i8", False),
    ("top10%+f16", False),
    ("top10%+f16", True),
    ("top1%+f16", False),
    ("top1%+f16", True),
    # Added after the first full run put top1%+f16 + EF at -1.02 points: the same top-1%
    # with other value formats, to show how much the values' precision matters. The
    # target is judged on top1%+f16 + EF, the variant chosen before any result.
    ("top1%+i8", True),
    ("top1%+f32", True),
)
CODEC_SCENARIO = "stragglers-fedbuff-hier"
SCALE_SCENARIO = "fleet-10k"
BATCHNORM_VARIANTS = (
    ("MLP without BatchNorm", "batchnorm-none"),
    ("MLP + BatchNorm, averaged (global)", "batchnorm-global"),
    ("MLP + BatchNorm, kept local (FedBN)", "batchnorm-local"),
)
# What the issue asks: FedBN's accuracy at most this many points below the MLP without BN.
BATCHNORM_TOLERANCE_POINTS = 2.0
POISON_SCENARIO = "poison-base"
POISON_FRACTIONS = (0.1, 0.2)
# The base file turns the influence bounds on (the edge daemon's defaults, reputation
# included); "off" is the explicit unsafe switch, "on, no reputation" turns the edge's
# reputation off, "on + robust" adds the edge's cosine outlier score. Its
# min_ratio and threshold (1.5 and 2, not the core's 3 and 3.5) were picked on seed 0
# before the study ran: with 4 inputs per edge cut the defaults flagged no sign flip.
POISON_DEFENCES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("off", ("defences.unsafe=true",)),
    ("on, no reputation", ("defences.reputation.enabled=false",)),
    ("on", ()),
    (
        "on + robust",
        (
            'defences.robust.edge.outlier_score="cosine"',
            "defences.robust.edge.min_ratio=1.5",
            "defences.robust.edge.threshold=2.0",
        ),
    ),
)
# Issue 11, "Done when": these attackers at 20% cost at most 2 points with defences on.
POISON_TARGET_KINDS = ("scale", "sign_flip", "weight_inflation")
POISON_TARGET_FRACTION = 0.2
POISON_TOLERANCE_POINTS = 2.0


@dataclass(frozen=True, slots=True)
class Cell:
    """One run of an experiment.

    Attributes:
        label: the row or series it belongs to.
        scenario: the scenario file.
        overrides: ``key=value`` overrides on top of the file.
        seed: the run's seed.
    """

    label: str
    scenario: Path
    overrides: tuple[str, ...]
    seed: int

    @property
    def slug(self) -> str:
        """A directory name for the run."""
        safe = "".join(c if c.isalnum() else "-" for c in self.label.lower()).strip("-")
        while "--" in safe:
            safe = safe.replace("--", "-")
        return f"{safe}/seed{self.seed}"


def run_cell(cell: Cell) -> RunResult:
    """Run one cell in this process (the worker function of ``--jobs``)."""
    scenario = load_scenario(cell.scenario, overrides=cell.overrides, seed=cell.seed)
    return run_scenario(scenario)


def _run_cells(
    cells: Sequence[Cell],
    *,
    jobs: int,
    show_progress: bool,
    out: Path,
    name: str,
    run_plots: bool = True,
) -> dict[Cell, RunResult]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results: dict[Cell, RunResult] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not show_progress,
    ) as progress:
        task = progress.add_task(f"{name}: runs", total=len(cells))

        def finished(cell: Cell, result: RunResult) -> None:
            results[cell] = result
            write_run(
                result, out / "runs" / cell.slug, command=_cell_command(cell), plots=run_plots
            )
            progress.advance(task)

        if jobs == 1:
            for cell in cells:
                finished(cell, run_cell(cell))
        else:
            # spawn, not fork: a forked torch or BLAS runtime can deadlock in a child.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
                futures = {pool.submit(run_cell, cell): cell for cell in cells}
                for future in as_completed(futures):
                    finished(futures[future], future.result())
    return results


def _cell_command(cell: Cell) -> str:
    parts = ["fedtier sim run", str(cell.scenario), f"--seed {cell.seed}"]
    parts += [f"--set '{o}'" for o in cell.overrides]
    return " ".join(parts) + " --out DIR"


def _mean_std(values: Sequence[float], fmt: str = ".3f") -> str:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return "n/a"
    mean = statistics.fmean(clean)
    std = statistics.stdev(clean) if len(clean) > 1 else 0.0
    missing = (
        f" ({len(values) - len(clean)} of {len(values)} never)" if len(clean) < len(values) else ""
    )
    return f"{mean:{fmt}} ± {std:{fmt.lstrip('+')}}{missing}"


def _per_seed(values: Sequence[float], fmt: str = ".3f") -> str:
    return ", ".join("never" if math.isnan(v) else f"{v:{fmt}}" for v in values)


def _bytes(n: float) -> str:
    if math.isnan(n):
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


# -- FedProx reproduction -------------------------------------------------------------


def fedprox_dataset_keys() -> list[str]:
    """The short names ``--datasets`` takes: the scenario stems without ``fedprox-synthetic-``."""
    return [stem.removeprefix("fedprox-synthetic-") for _dataset, stem in FEDPROX_DATASETS]


def _fedprox_datasets(keys: Sequence[str]) -> tuple[tuple[str, str], ...]:
    if not keys:
        return tuple(d for d in FEDPROX_DATASETS if d[1] not in FEDPROX_EXTRA_DATASETS)
    known = dict(zip(fedprox_dataset_keys(), FEDPROX_DATASETS, strict=True))
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ConfigError(
            f"fedprox dataset {unknown[0]!r} is unknown; expected some of {', '.join(known)}"
        )
    return tuple(known[k] for k in dict.fromkeys(keys))


def _fedprox(
    seeds: Sequence[int],
    scenarios: Path,
    overrides: Sequence[str],
    datasets: Sequence[str] = (),
) -> tuple[list[Cell], Callable[[dict[Cell, RunResult], Path], list[str]]]:
    chosen = _fedprox_datasets(datasets)
    cells = [
        Cell(f"{dataset} / {method}", scenarios / f"{stem}.toml", (*extra, *overrides), seed)
        for dataset, stem in chosen
        for method, extra in FEDPROX_METHODS
        for seed in seeds
    ]

    def summarize(results: dict[Cell, RunResult], out: Path) -> list[str]:
        def finals(label: str) -> list[VersionRecord]:
            return [results[c].final for c in cells if c.label == label]

        lines = [
            "| dataset | FedAvg test acc. | FedProx (mu=1) test acc. | FedProx - FedAvg "
            "(points, per seed) | FedAvg train loss | FedProx train loss | target | met |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for dataset, _stem in chosen:
            avg = finals(f"{dataset} / FedAvg")
            prox = finals(f"{dataset} / FedProx (mu=1)")
            gaps = [
                100 * (p.test_accuracy - a.test_accuracy) for a, p in zip(avg, prox, strict=True)
            ]
            target = FEDPROX_TARGETS.get(dataset, "-")
            met = "-"
            if dataset == "Synthetic IID":
                met = "yes" if statistics.fmean(r.test_accuracy for r in avg) >= 0.90 else "**no**"
            elif "10 points" in target:
                met = "yes" if statistics.fmean(gaps) >= 10 else "**no**"
            elif "3 points" in target:
                met = "yes" if statistics.fmean(gaps) >= 3 else "**no**"
            lines.append(
                f"| {dataset} | {_mean_std([r.test_accuracy for r in avg])} "
                f"| {_mean_std([r.test_accuracy for r in prox])} "
                f"| {_mean_std(gaps, '.1f')} ({_per_seed(gaps, '+.1f')}) "
                f"| {_mean_std([r.train_loss for r in avg])} "
                f"| {_mean_std([r.train_loss for r in prox])} | {target} | {met} |"
            )
        lines += [
            "",
            f"Stability over the last rounds: test accuracy of the versions evaluated from "
            f"round {FEDPROX_LATE_ROUND} on (every 5 rounds), mean of each seed's mean and of "
            "each seed's worst.",
            "",
            "| dataset | FedAvg mean | FedAvg worst | FedProx mean | FedProx worst |",
            "|---|---|---|---|---|",
        ]
        for dataset, _stem in chosen:
            row = [dataset]
            for method, _extra in FEDPROX_METHODS:
                late = [
                    [
                        r.test_accuracy
                        for r in evaluated(results[c].records)
                        if r.version >= FEDPROX_LATE_ROUND
                    ]
                    for c in cells
                    if c.label == f"{dataset} / {method}"
                ]
                if all(late):
                    row.append(_mean_std([statistics.fmean(v) for v in late]))
                    row.append(_mean_std([min(v) for v in late]))
                else:  # a shortened run (--set stop.versions=...) has no late rounds
                    row += ["-", "-"]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", "What the paper reports, per dataset (qualitative, see the text):", ""]
        lines += [f"- {d}: {FEDPROX_PAPER[d]}" for d, _ in chosen]
        for dataset, stem in chosen:
            series = [
                (f"{c.label.split(' / ')[1]}, seed {c.seed}", results[c].records)
                for c in cells
                if c.label.startswith(dataset + " / ")
            ]
            plot_curves(series, out / f"{stem}.png", x="version", title=dataset)
            _plot_train_loss(series, out / f"{stem}-train-loss.png", dataset)
        return lines

    return cells, summarize


def _plot_train_loss(
    series: Sequence[tuple[str, Sequence[VersionRecord]]], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, records in series:
        points = evaluated(records)
        ax.plot([r.version for r in points], [r.train_loss for r in points], label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


# -- async vs sync --------------------------------------------------------------------


def _async_vs_sync(
    seeds: Sequence[int], scenarios: Path, overrides: Sequence[str]
) -> tuple[list[Cell], Callable[[dict[Cell, RunResult], Path], list[str]]]:
    cells = [
        Cell(label, scenarios / f"{stem}.toml", tuple(overrides), seed)
        for label, stem in SYNC_VARIANTS
        for seed in seeds
    ]

    def summarize(results: dict[Cell, RunResult], out: Path) -> list[str]:
        by = {(c.label, c.seed): results[c] for c in cells}
        sync_label = SYNC_VARIANTS[0][0]
        lines = [
            "Target per seed: the synchronous run's final test accuracy minus 1 point. "
            "Time, uploaded bytes and bytes into the central are read at the first evaluated "
            "version at or above it.",
            "",
            "| aggregation | final test acc. | time to target (s) | share of sync's total "
            "time (per seed) | uploaded bytes to target | bytes into the central to target "
            "(envelopes) | updates to target |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, _stem in SYNC_VARIANTS:
            times: list[float] = []
            shares: list[float] = []
            uploaded: list[float] = []
            central: list[float] = []
            updates: list[float] = []
            accs: list[float] = []
            for seed in seeds:
                sync = by[(sync_label, seed)]
                target = sync.final.test_accuracy - 0.01
                run = by[(label, seed)]
                accs.append(run.final.test_accuracy)
                hit = time_to_accuracy(run.records, target)
                if hit is None:
                    for bucket in (times, shares, uploaded, central, updates):
                        bucket.append(math.nan)
                    continue
                times.append(hit.time_s)
                shares.append(hit.time_s / sync.final.time_s)
                uploaded.append(float(hit.uploaded_bytes))
                central.append(float(hit.central_wire_bytes))
                updates.append(float(hit.updates_uploaded))
            lines.append(
                f"| {label} | {_mean_std(accs)} | {_mean_std(times, ',.0f')} "
                f"| {_mean_std(shares, '.1%')} ({_per_seed(shares, '.1%')}) "
                f"| {_bytes(_nanmean(uploaded))} | {_bytes(_nanmean(central))} "
                f"| {_mean_std(updates, ',.0f')} |"
            )
        lines += [
            "",
            "Whole runs (mean over seeds):",
            "",
            "| aggregation | versions | virtual time (s) | updates uploaded | uploaded bytes "
            "(payloads) | bytes into the central (payloads / envelopes) | mean staleness |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, _stem in SYNC_VARIANTS:
            runs = [by[(label, s)] for s in seeds]
            stale = [_mean_tau(r) for r in runs]
            lines.append(
                f"| {label} | {statistics.fmean(r.final.version for r in runs):,.0f} "
                f"| {statistics.fmean(r.final.time_s for r in runs):,.0f} "
                f"| {statistics.fmean(r.final.updates_uploaded for r in runs):,.0f} "
                f"| {_bytes(statistics.fmean(r.final.uploaded_bytes for r in runs))} "
                f"| {_bytes(statistics.fmean(r.final.central_bytes for r in runs))} / "
                f"{_bytes(statistics.fmean(r.final.central_wire_bytes for r in runs))} "
                f"| {statistics.fmean(stale):.2f} |"
            )
        first = seeds[0]
        target = by[(sync_label, first)].final.test_accuracy - 0.01
        series = [(label, by[(label, first)].records) for label, _ in SYNC_VARIANTS]
        plot_curves(
            series,
            out / "async-vs-sync-time.png",
            x="time_s",
            title=f"seed {first}: accuracy against virtual time",
            hline=target,
        )
        plot_curves(
            series,
            out / "async-vs-sync-bytes.png",
            x="uploaded_bytes",
            title=f"seed {first}: accuracy against uploaded bytes",
            hline=target,
            log_x=True,
        )
        return lines

    return cells, summarize


def _nanmean(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.fmean(clean) if clean else math.nan


def _mean_tau(result: RunResult) -> float:
    hist = result.staleness_hist
    total = sum(hist)
    return sum(i * c for i, c in enumerate(hist)) / total if total else math.nan


# -- codecs ---------------------------------------------------------------------------


def _codecs(
    seeds: Sequence[int], scenarios: Path, overrides: Sequence[str]
) -> tuple[list[Cell], Callable[[dict[Cell, RunResult], Path], list[str]]]:
    def label(codec: str, feedback: bool) -> str:
        return f"{codec}{' + EF' if feedback else ''}"

    cells = [
        Cell(
            label(codec, feedback),
            scenarios / f"{CODEC_SCENARIO}.toml",
            (f'codec.name="{codec}"', f"codec.error_feedback={str(feedback).lower()}", *overrides),
            seed,
        )
        for codec, feedback in CODECS
        for seed in seeds
    ]

    def summarize(results: dict[Cell, RunResult], out: Path) -> list[str]:
        by = {(c.label, c.seed): results[c] for c in cells}
        base = [by[("f32", s)] for s in seeds]
        lines = [
            "| codec | error feedback | final test acc. | minus f32 (points, per seed) "
            "| uploaded bytes (payloads) | fewer than f32 | uploaded bytes (envelopes) "
            "| fewer than f32 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for codec, feedback in CODECS:
            runs = [by[(label(codec, feedback), s)] for s in seeds]
            gaps = [
                100 * (r.final.test_accuracy - b.final.test_accuracy)
                for r, b in zip(runs, base, strict=True)
            ]
            payload_ratio = [
                b.final.uploaded_bytes / r.final.uploaded_bytes
                for r, b in zip(runs, base, strict=True)
            ]
            wire_ratio = [
                b.final.uploaded_wire_bytes / r.final.uploaded_wire_bytes
                for r, b in zip(runs, base, strict=True)
            ]
            lines.append(
                f"| {codec} | {'on' if feedback else 'off'} "
                f"| {_mean_std([r.final.test_accuracy for r in runs])} "
                f"| {_mean_std(gaps, '+.2f')} ({_per_seed(gaps, '+.2f')}) "
                f"| {_bytes(statistics.fmean(r.final.uploaded_bytes for r in runs))} "
                f"| {statistics.fmean(payload_ratio):.1f}x "
                f"| {_bytes(statistics.fmean(r.final.uploaded_wire_bytes for r in runs))} "
                f"| {statistics.fmean(wire_ratio):.1f}x |"
            )
        first = seeds[0]
        series = [(label(codec, fb), by[(label(codec, fb), first)].records) for codec, fb in CODECS]
        plot_curves(
            series,
            out / "codecs-bytes.png",
            x="uploaded_bytes",
            title=f"seed {first}: accuracy against uploaded bytes",
            log_x=True,
        )
        plot_curves(
            series,
            out / "codecs-time.png",
            x="time_s",
            title=f"seed {first}: accuracy against virtual time",
        )
        return lines

    return cells, summarize


# -- scale ----------------------------------------------------------------------------


def _scale(
    seeds: Sequence[int], scenarios: Path, overrides: Sequence[str]
) -> tuple[list[Cell], Callable[[dict[Cell, RunResult], Path], list[str]]]:
    cells = [
        Cell("10,000 devices", scenarios / f"{SCALE_SCENARIO}.toml", tuple(overrides), seed)
        for seed in seeds
    ]

    def summarize(results: dict[Cell, RunResult], out: Path) -> list[str]:
        lines = [
            "| seed | devices | model versions | updates uploaded | devices that took part "
            "| virtual time | final test acc. | wall-clock time |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for cell in cells:
            r = results[cell]
            lines.append(
                f"| {cell.seed} | {r.num_devices:,} | {r.final.version:,} "
                f"| {r.final.updates_uploaded:,} | {r.final.participants:,} "
                f"| {r.virtual_time_s / 3600:.2f} h | {r.final.test_accuracy:.4f} "
                f"| {r.wall_s:.0f} s |"
            )
        return lines

    return cells, summarize


# -- BatchNorm under label skew ------------------------------------------------------


def _batchnorm(
    seeds: Sequence[int], scenarios: Path, overrides: Sequence[str]
) -> tuple[list[Cell], Callable[[dict[Cell, RunResult], Path], list[str]]]:
    cells = [
        Cell(label, scenarios / f"{stem}.toml", tuple(overrides), seed)
        for label, stem in BATCHNORM_VARIANTS
        for seed in seeds
    ]

    def summarize(results: dict[Cell, RunResult], out: Path) -> list[str]:
        by = {(c.label, c.seed): results[c] for c in cells}
        reference = BATCHNORM_VARIANTS[0][0]
        lines = [
            "Accuracy over the union of the devices' held-out examples, each scored by its "
            "own device's model (the global model, or the global weights with the device's "
            "own BatchNorm for FedBN), at the last version.",
            "",
            "| model | final test acc. | minus no BatchNorm (points, per seed) "
            "| best test acc. | final test loss |",
            "|---|---|---|---|---|",
        ]
        gaps: dict[str, list[float]] = {}
        for label, _stem in BATCHNORM_VARIANTS:
            runs = [by[(label, s)] for s in seeds]
            gaps[label] = [
                100 * (r.final.test_accuracy - by[(reference, s)].final.test_accuracy)
                for r, s in zip(runs, seeds, strict=True)
            ]
            gap = (
                "-"
                if label == reference
                else f"{_mean_std(gaps[label], '+.1f')} ({_per_seed(gaps[label], '+.1f')})"
            )
            lines.append(
                f"| {label} | {_mean_std([r.final.test_accuracy for r in runs])} | {gap} "
                f"| {_mean_std([max(x.score for x in evaluated(r.records)) for r in runs])} "
                f"| {_mean_std([r.final.test_loss for r in runs])} |"
            )
        fedbn = statistics.fmean(gaps[BATCHNORM_VARIANTS[2][0]])
        met = "yes" if fedbn >= -BATCHNORM_TOLERANCE_POINTS else "**no**"
        lines += [
            "",
            f"Target: FedBN at most {BATCHNORM_TOLERANCE_POINTS:g} points below the MLP without "
            f"BatchNorm (mean over seeds): {fedbn:+.1f} points; met: {met}.",
            "",
            _remainders(cells, seeds),
        ]
        first = seeds[0]
        plot_curves(
            [(label, by[(label, first)].records) for label, _ in BATCHNORM_VARIANTS],
            out / "batchnorm.png",
            x="version",
            title=f"seed {first}: label-skewed digits, with and without BatchNorm",
        )
        return lines

    return cells, summarize


def _remainders(cells: Sequence[Cell], seeds: Sequence[int]) -> str:
    """How many devices end each epoch on a batch of one (what min_batch must handle)."""
    from fedtier.simulations.sim.data import build_data

    counts: list[str] = []
    batch = 0
    for seed in seeds:
        cell = next(c for c in cells if c.seed == seed and "FedBN" in c.label)
        s = load_scenario(cell.scenario, overrides=cell.overrides, seed=seed)
        volumes = [k.data_volume for k in s.fleet.kinds for _ in range(k.count)]
        volumes *= s.fleet.num_edges
        data = build_data(s.data, volumes, seed=s.seed, base_dir=s.base_dir)
        batch = s.training.batch_size
        ones = sum(1 for n in data.samples.tolist() if n % batch == 1)
        counts.append(f"{ones} of {data.num_devices}")
    return (
        f"Devices whose last batch of an epoch holds one example (batch size {batch}), per "
        f"seed: {', '.join(counts)}. BatchNorm cannot train on one example: the trainer's "
        "min_batch (2 for a model with BatchNorm) folds it into the batch before."
    )


# -- poisoning ------------------------------------------------------------------------


def _poison_label(kind: str | None, fraction: float, defences: str) -> str:
    attack = "no attack" if kind is None else f"{kind} {fraction:.0%}"
    return f"{attack}, defences {defences}"


def _poison(
    seeds: Sequence[int], scenarios: Path, overrides: Sequence[str], attacks: Sequence[str] = ()
) -> tuple[list[Cell], Callable[[dict[Cell, RunResult], Path], list[str]]]:
    unknown = [a for a in attacks if a not in ATTACK_KINDS]
    if unknown:
        raise ConfigError(
            f"attack {unknown[0]!r} is unknown; expected some of {', '.join(ATTACK_KINDS)}"
        )
    kinds = tuple(dict.fromkeys(attacks)) or ATTACK_KINDS
    scenario = scenarios / f"{POISON_SCENARIO}.toml"
    # (kind, fraction, defences) per row, in table order; kind None: the no-attack run.
    rows: list[tuple[str | None, float, str]] = [(None, 0.0, d) for d, _ in POISON_DEFENCES]
    rows += [(k, f, d) for k in kinds for f in POISON_FRACTIONS for d, _ in POISON_DEFENCES]
    switches = dict(POISON_DEFENCES)
    cells: list[Cell] = []
    for kind, fraction, defences in rows:
        attack = () if kind is None else (f'attack.kind="{kind}"', f"attack.fraction={fraction}")
        for seed in seeds:
            cells.append(
                Cell(
                    _poison_label(kind, fraction, defences),
                    scenario,
                    (*attack, *switches[defences], *overrides),
                    seed,
                )
            )

    def summarize(results: dict[Cell, RunResult], out: Path) -> list[str]:
        by = {(c.label, c.seed): results[c] for c in cells}
        lines = [
            "Final test accuracy at the last version; the change is against the no-attack "
            "run of the same seed with the same defences, in points. Backdoor success: the "
            "share of held-out non-target images, stamped with the trigger, classified as "
            "the target. Step share: a device's part of a version's step (its L2 move over "
            "the sum of every device's, so one version's shares add up to 1): the largest "
            "over versions for any device and for a malicious one, and a malicious device's "
            "mean over versions (each the mean over seeds). Refused or left out / clipped / "
            "weight-capped / down-weighted (low reputation): the first tier's counts per run "
            "(mean).",
            "",
            "| attack | defences | final test acc. | change (points, per seed) "
            "| backdoor success | step share: largest any / largest malicious / mean malicious "
            "| refused or left out / clipped / weight-capped / down-weighted |",
            "|---|---|---|---|---|---|---|",
        ]
        table: list[dict[str, object]] = []
        deltas: dict[tuple[str | None, float, str], list[float]] = {}
        for kind, fraction, defences in rows:
            label = _poison_label(kind, fraction, defences)
            runs = [by[(label, seed)] for seed in seeds]
            clean = [by[(_poison_label(None, 0.0, defences), seed)] for seed in seeds]
            accs = [r.final.test_accuracy for r in runs]
            delta = [
                100 * (r.final.test_accuracy - c.final.test_accuracy)
                for r, c in zip(runs, clean, strict=True)
            ]
            deltas[(kind, fraction, defences)] = delta
            backdoor = [
                r.attack.final_backdoor_success if r.attack is not None else math.nan for r in runs
            ]
            influence = [
                influence_summary(list(r.attack.influence)) if r.attack else {} for r in runs
            ]
            top = [float(i.get("max_top_share", math.nan)) for i in influence]
            bad = [float(i.get("max_attacker_share", math.nan)) for i in influence]
            typical = [float(i.get("mean_attacker_share", math.nan)) for i in influence]
            refused = [
                sum(
                    v
                    for k, v in r.counts.items()
                    if k.split(":", 1)[1]
                    in (
                        "future_base",
                        "rate_limited",
                        "contribution_capped",
                        "outlier",
                        "norm_exceeded",
                    )
                )
                for r in runs
            ]
            clipped = [
                sum(v for k, v in r.counts.items() if k.endswith(":norm_clipped")) for r in runs
            ]
            capped = [
                sum(v for k, v in r.counts.items() if k.endswith(":weight_capped")) for r in runs
            ]
            low = [
                sum(v for k, v in r.counts.items() if k.endswith(":low_reputation")) for r in runs
            ]
            change = (
                "-" if kind is None else f"{_mean_std(delta, '+.1f')} ({_per_seed(delta, '+.1f')})"
            )
            lines.append(
                f"| {'none' if kind is None else f'{kind}, {fraction:.0%}'} | {defences} "
                f"| {_mean_std(accs)} | {change} "
                f"| {'-' if kind != 'backdoor' else _mean_std(backdoor)} "
                f"| {_nanmean(top):.2f} / "
                + ("- / -" if kind is None else f"{_nanmean(bad):.2f} / {_nanmean(typical):.2f}")
                + " "
                f"| {statistics.fmean(refused):,.0f} / {statistics.fmean(clipped):,.0f} "
                f"/ {statistics.fmean(capped):,.0f} / {statistics.fmean(low):,.0f} |"
            )
            table.append(
                {
                    "attack": kind,
                    "fraction": fraction,
                    "defences": defences,
                    "seeds": list(seeds),
                    "final_accuracy": accs,
                    "change_points": None if kind is None else delta,
                    "backdoor_success": None if kind != "backdoor" else backdoor,
                    "max_top_share": top,
                    "max_attacker_share": None if kind is None else bad,
                    "mean_attacker_share": None if kind is None else typical,
                    "refused": refused,
                    "clipped": clipped,
                    "weight_capped": capped,
                    "down_weighted": low,
                }
            )
        lines.append("")
        cost: dict[str, list[float]] = {}
        for defences, _switch in POISON_DEFENCES[1:]:
            cost[defences] = [
                100
                * (
                    by[(_poison_label(None, 0.0, defences), s)].final.test_accuracy
                    - by[(_poison_label(None, 0.0, "off"), s)].final.test_accuracy
                )
                for s in seeds
            ]
            lines.append(
                f"What the defences ({defences}) cost with no attacker: "
                f"{_mean_std(cost[defences], '+.1f')} points ({_per_seed(cost[defences], '+.1f')})."
            )
        lines.append("")
        verdicts: dict[str, object] = {}
        for defences, _switch in POISON_DEFENCES[1:]:
            for kind in POISON_TARGET_KINDS:
                key = (kind, POISON_TARGET_FRACTION, defences)
                if key not in deltas:
                    continue
                mean = statistics.fmean(deltas[key])
                met = mean >= -POISON_TOLERANCE_POINTS
                label = _poison_label(kind, POISON_TARGET_FRACTION, defences)
                bare = [
                    100
                    * (
                        by[(label, s)].final.test_accuracy
                        - by[(_poison_label(None, 0.0, "off"), s)].final.test_accuracy
                    )
                    for s in seeds
                ]
                verdicts[f"{kind}, defences {defences}"] = {
                    "change_points": deltas[key],
                    "against_undefended_no_attack_points": bare,
                    "met": met,
                }
                lines.append(
                    f"Target: {kind} at {POISON_TARGET_FRACTION:.0%} with defences {defences} "
                    f"costs at most {POISON_TOLERANCE_POINTS:g} points: {mean:+.1f} "
                    f"({_per_seed(deltas[key], '+.1f')}); met: {'yes' if met else '**no**'}. "
                    f"Against the no-attack run without defences: {_mean_std(bare, '+.1f')}."
                )
        (out / "summary.json").write_text(
            json.dumps({"rows": table, "defences_cost_points": cost, "targets": verdicts}, indent=2)
            + "\n"
        )
        return lines

    return cells, summarize


_EXPERIMENTS = {
    "fedprox": _fedprox,
    "async-vs-sync": _async_vs_sync,
    "codecs": _codecs,
    "scale": _scale,
    "batchnorm": _batchnorm,
    "poison": _poison,
}


def run_experiment(
    name: str,
    *,
    out: Path,
    seeds: Sequence[int],
    jobs: int = 1,
    scenarios_dir: Path | None = None,
    overrides: Sequence[str] = (),
    datasets: Sequence[str] = (),
    attacks: Sequence[str] = (),
    show_progress: bool = True,
    command: str = "",
    run_plots: bool = True,
) -> Path:
    """Run an experiment's cells and write ``OUT/summary.md`` and its plots.

    Args:
        name: ``fedprox``, ``async-vs-sync``, ``codecs``, ``scale``, ``batchnorm`` or
            ``poison`` (which also writes ``OUT/summary.json``).
        out: output directory.
        seeds: seeds of every cell.
        jobs: runs in parallel processes.
        scenarios_dir: where the scenario files are (default: the shipped ones).
        overrides: applied to every run (for smaller trials; the documented
            numbers use none).
        datasets: ``fedprox`` only: run these datasets (:func:`fedprox_dataset_keys`)
            instead of all five.
        attacks: ``poison`` only: run these attack kinds (default: every kind).
        show_progress: show a progress bar over runs.
        command: the command line, quoted in the summary.
        run_plots: draw each run's own plots under ``runs/`` (the experiment's
            comparison plots are drawn either way).

    Returns:
        The summary's path.

    Raises:
        ConfigError: an unknown experiment or a bad scenario.
    """
    build = _EXPERIMENTS.get(name)
    if build is None:
        raise ConfigError(
            f"experiment {name!r} is unknown; expected one of {', '.join(_EXPERIMENTS)}"
        )
    scenarios = scenarios_dir or SCENARIOS_DIR
    if attacks and name != "poison":
        raise ConfigError("attacks can be chosen only for the poison experiment")
    if name == "fedprox":
        cells, summarize = _fedprox(seeds, scenarios, overrides, datasets)
    elif datasets:
        raise ConfigError("datasets can be chosen only for the fedprox experiment")
    elif name == "poison":
        cells, summarize = _poison(seeds, scenarios, overrides, attacks)
    else:
        cells, summarize = build(seeds, scenarios, overrides)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = _run_cells(
        cells, jobs=jobs, show_progress=show_progress, out=out, name=name, run_plots=run_plots
    )
    lines = [f"# Experiment {name}", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    lines += summarize(results, out)
    lines += [
        "",
        f"{len(cells)} runs, seeds {', '.join(map(str, seeds))}; "
        f"{time.perf_counter() - started:,.0f} s wall-clock with {jobs} job(s). "
        "Each run's report, CSV and plots are under runs/.",
        "",
    ]
    summary = out / "summary.md"
    summary.write_text("\n".join(lines))
    return summary
