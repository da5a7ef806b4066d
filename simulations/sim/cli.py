"""``fedtier sim``: run a scenario or one of the documented experiments; may import every package.

``main(argv)`` takes the arguments after ``sim`` and returns an exit status;
``fedtier.simulations.cli`` hands ``fedtier sim ...`` to it, and ``python -m
simulations.sim ...`` is the same command. Errors the user can fix (a bad
scenario value, an unsupported setting for the mesh engine) are one sentence
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from fedtier.protocol.errors import FedtierError

__all__ = ["main"]

EXPERIMENTS = ("fedprox", "async-vs-sync", "codecs", "scale", "batchnorm", "poison")


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r} must be integers like 0,1,2") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds needs at least one seed")
    return seeds


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--datasets needs at least one name")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtier sim",
        description="Simulate a fleet scenario (virtual clock, in process) or run it on the mesh.",
    )
    sub = parser.add_subparsers(dest="sim_command", required=True, metavar="ACTION")
    run = sub.add_parser("run", help="run one scenario; writes metrics.csv, plots and report.md")
    run.add_argument("scenario", type=Path, help="the scenario TOML file")
    run.add_argument("--out", type=Path, required=True, help="output directory")
    run.add_argument("--seed", type=int, default=None, help="replace scenario.seed")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a scenario value, e.g. --set training.mu=1 (repeatable)",
    )
    run.add_argument(
        "--engine",
        choices=("sim", "mesh"),
        default="sim",
        help="sim: in-process virtual clock (default); mesh: real daemons and devices",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="sim engine: N processes train the devices beside the engine (async, numpy "
        "models); the results are the same bytes as with 0 (default: in process)",
    )

    exp = sub.add_parser("experiment", help="run a documented experiment over several seeds")
    exp.add_argument("name", choices=EXPERIMENTS, help="which experiment")
    exp.add_argument("--out", type=Path, required=True, help="output directory")
    exp.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated seeds")
    exp.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    exp.add_argument(
        "--scenarios",
        type=Path,
        default=None,
        help="directory of the scenario files (default: the shipped simulations/scenarios)",
    )
    exp.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value in every run (for quick, smaller trials)",
    )
    exp.add_argument(
        "--datasets",
        type=_names,
        default=[],
        help="fedprox only: comma-separated datasets to run (iid, 0-0, 0.5-0.5, 1-1, "
        "1-1-stragglers; default those five), or 1-1-stragglers-paper-sizes",
    )
    exp.add_argument(
        "--attacks",
        type=_names,
        default=[],
        help="poison only: comma-separated attack kinds to run (sign_flip, scale, "
        "weight_inflation, stale_base, future_base, backdoor; default all)",
    )
    exp.add_argument("--no-progress", action="store_true", help="no progress bar")
    exp.add_argument(
        "--no-run-plots",
        action="store_true",
        help="draw no per-run plots under runs/ (each run keeps its CSV and report)",
    )
    return parser


def _run(args: argparse.Namespace, command: str) -> int:
    from fedtier.simulations.sim.scenario import load_scenario

    scenario = load_scenario(args.scenario, overrides=args.overrides, seed=args.seed)
    if args.workers and args.engine == "mesh":
        raise FedtierError("--workers is for the sim engine; the mesh runs its own processes")
    if args.engine == "mesh":
        from fedtier.simulations.sim.mesh_engine import run_on_mesh

        result = run_on_mesh(
            scenario, show_progress=not args.no_progress, keep_dir=args.out / "mesh"
        )
    else:
        from fedtier.simulations.sim.engine import run_scenario
        from fedtier.simulations.sim.progress import progress_bar

        with progress_bar(f"{scenario.name} (seed {scenario.seed})", not args.no_progress) as tick:
            result = run_scenario(scenario, progress=tick, workers=args.workers)
    from fedtier.simulations.sim.report import write_run

    report = write_run(result, args.out, command=command)
    final = result.final
    metric = "R^2" if result.data.task == "regression" else "accuracy"
    print(
        f"{scenario.name}: v{final.version}, {metric} {final.score:.4f}, "
        f"{final.time_s:,.0f} virtual s, {result.wall_s:,.1f} wall s, "
        f"peak RSS {result.peak_rss_bytes / 2**20:,.0f} MiB"
        + (f" (workers: {result.worker_peak_rss_bytes / 2**20:,.0f} MiB)" if result.workers else "")
        + ", "
        f"{result.events_per_s:,.0f} events/s; report: {report}"
    )
    return 0


def _experiment(args: argparse.Namespace, command: str) -> int:
    from fedtier.simulations.sim.experiments import run_experiment

    if args.jobs < 1:
        raise FedtierError(f"--jobs is {args.jobs}; it must be at least 1")
    summary = run_experiment(
        args.name,
        out=args.out,
        seeds=args.seeds,
        jobs=args.jobs,
        scenarios_dir=args.scenarios,
        overrides=args.overrides,
        datasets=args.datasets,
        attacks=args.attacks,
        show_progress=not args.no_progress,
        command=command,
        run_plots=not args.no_run_plots,
    )
    # The poison study prints its numbers as JSON (summary.md beside it has the table).
    table = summary.with_name("summary.json") if args.name == "poison" else summary
    print(table.read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fedtier sim`` with ``argv`` (the arguments after ``sim``); return the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(args_list)
    command = "fedtier sim " + shlex.join(args_list)
    try:
        if args.sim_command == "run":
            return _run(args, command)
        return _experiment(args, command)
    except FedtierError as exc:
        print(f"fedtier sim: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtier sim: interrupted", file=sys.stderr)
        return 130
