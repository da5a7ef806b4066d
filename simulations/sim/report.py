"""A run's CSVs, PNG plots and markdown report; imports matplotlib, never a tier, trainer or bus.

Imports matplotlib (Agg, no display), numpy and the scenario and result types;
never a tier, a trainer or a bus. Every file is written from a ``RunResult``,
so the mesh engine's results use the same writers.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedtier.simulations.sim._attribution import VersionInfluence
from fedtier.simulations.sim._attribution import summary as influence_summary
from fedtier.simulations.sim.engine import AttackOutcome, DataInfo, RunResult, VersionRecord
from fedtier.simulations.sim.scenario import dump_toml
from fedtier.simulations.sim.specs import Scenario

__all__ = [
    "evaluated",
    "metric_name",
    "plot_curves",
    "run_summary",
    "time_to_accuracy",
    "write_csv",
    "write_influence_csv",
    "write_run",
]

_DPI = 110


def evaluated(records: Sequence[VersionRecord]) -> list[VersionRecord]:
    """The records whose model was evaluated (their scores are not NaN)."""
    return [r for r in records if r.evaluated]


def time_to_accuracy(records: Sequence[VersionRecord], target: float) -> VersionRecord | None:
    """The first evaluated record whose score (accuracy, or R^2) is >= ``target``, or None."""
    for record in evaluated(records):
        if record.score >= target:
            return record
    return None


def metric_name(task: str) -> str:
    """The headline score of a task, as reports write it."""
    return "R^2" if task == "regression" else "accuracy"


def write_csv(result: RunResult, path: Path) -> None:
    """One row per model version (``VersionRecord`` fields; NaN where not evaluated)."""
    task = result.data.task
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(VersionRecord.columns(task))
        for record in result.records:
            writer.writerow(record.row(task))


def _pyplot() -> object:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    series: Sequence[tuple[str, Sequence[VersionRecord]]],
    path: Path,
    *,
    x: str,
    title: str,
    log_x: bool = False,
    hline: float | None = None,
    metric: str = "accuracy",
) -> None:
    """The score (left: accuracy, or R^2) and loss (right) of several runs against one x column.

    Args:
        series: (label, records) per run.
        path: the PNG to write.
        x: a ``VersionRecord`` field (``time_s``, ``uploaded_bytes``...).
        title: the figure title.
        log_x: log-scale x axis (bytes).
        hline: a horizontal line on the score panel (a target), or None.
        metric: the score's name for its axis (:func:`metric_name`).
    """
    plt = _pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))  # type: ignore[attr-defined]
    for label, records in series:
        points = evaluated(records)
        xs = [getattr(r, x) for r in points]
        acc_ax.plot(xs, [r.score for r in points], label=label)
        loss_ax.plot(xs, [r.test_loss for r in points], label=label)
    if hline is not None:
        acc_ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    xlabel = {
        "time_s": "virtual time (s)",
        "uploaded_bytes": "uploaded bytes (codec payloads)",
        "uploaded_wire_bytes": "uploaded bytes (signed envelopes)",
        "central_bytes": "bytes into the central",
        "version": "model version",
    }.get(x, x)
    for ax, ylabel in ((acc_ax, f"test {metric}"), (loss_ax, "test loss")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if log_x:
            ax.set_xscale("log")
    acc_ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI, metadata={"Software": None})
    plt.close(fig)  # type: ignore[attr-defined]


def _plot_staleness(result: RunResult, path: Path) -> None:
    plt = _pyplot()
    hist = result.staleness_hist
    last = max((i for i, c in enumerate(hist) if c), default=0)
    fig, ax = plt.subplots(figsize=(6, 3.5))  # type: ignore[attr-defined]
    ax.bar(range(last + 1), hist[: last + 1], color="tab:blue")
    ax.set_xlabel("staleness at the central (versions behind)")
    ax.set_ylabel("device updates folded")
    ax.set_title("Staleness of folded updates")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI, metadata={"Software": None})
    plt.close(fig)  # type: ignore[attr-defined]


def _plot_participation(result: RunResult, path: Path) -> None:
    plt = _pyplot()
    fig, (hist_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 3.5))  # type: ignore[attr-defined]
    counts = result.updates_per_device
    bins = np.arange(0, int(counts.max(initial=0)) + 2) - 0.5
    hist_ax.hist(counts, bins=bins if len(bins) < 80 else 40, color="tab:green")
    hist_ax.set_xlabel("accepted updates per device")
    hist_ax.set_ylabel("devices")
    hist_ax.set_title(f"{int((counts > 0).sum())} of {len(counts)} devices took part")
    records = result.records
    time_ax.plot([r.time_s for r in records], [r.participants for r in records])
    time_ax.set_xlabel("virtual time (s)")
    time_ax.set_ylabel("distinct devices with an accepted update")
    for ax in (hist_ax, time_ax):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI, metadata={"Software": None})
    plt.close(fig)  # type: ignore[attr-defined]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"  # pragma: no cover - the loop always returns


def _data_line(s: Scenario, info: DataInfo) -> str:
    data = s.data
    if data.dataset == "synthetic" and not data.args and info.holdout == "loader":
        name = "Synthetic IID" if data.iid else f"Synthetic({data.alpha:g},{data.beta:g})"
        sizes = (
            f"int(lognormal({data.samples_log_mean:g}, {data.samples_log_sigma:g})) + "
            f"{data.samples_min}"
            if data.samples_per_device is None
            else f"fixed ({', '.join(map(str, data.samples_per_device))})"
        )
        return (
            f"{name}, {data.features} features, {data.classes} classes, samples per device "
            f"{sizes}, {1 - data.test_fraction:.0%}/{data.test_fraction:.0%} "
            "train/test per device"
        )
    split = {
        "dirichlet": f"Dirichlet(alpha={data.dirichlet_alpha:g}) label skew",
        "iid": "IID split",
        "loader": "each device's data from the loader",
    }[info.partition]
    if info.partition != "loader":
        split += f", quantity skew sigma {data.quantity_sigma:g}"
    held = {
        "global": f"{data.test_fraction:.0%} held out",
        "device": f"{data.test_fraction:.0%} of each device's data held out",
        "loader": "the loader's test split held out",
    }[info.holdout]
    return f"{info.name} ({info.task}), {split}, {held}"


def _model_line(s: Scenario, local_tensors: Sequence[str]) -> str:
    model, training = s.model, s.training
    args = ", ".join(f"{k}={v}" for k, v in model.args if k != "seed")
    line = model.factory + (f" ({args})" if args else "")
    if local_tensors:
        shown = ", ".join(local_tensors[:6]) + (", ..." if len(local_tensors) > 6 else "")
        reasons = ["batchnorm local (FedBN)"] if model.batchnorm == "local" else []
        reasons += ["model.local"] if model.local else []
        why = " and ".join(reasons)
        line += (
            f", {len(local_tensors)} tensors kept on the devices by {why}: {shown}; each "
            "device's examples scored with its own"
        )
    elif model.is_torch and model.batchnorm == "global":
        line += ", batchnorm global"
    optimizer = f"{training.optimizer} lr {training.lr:g}"
    if training.momentum:
        optimizer += f" momentum {training.momentum:g}"
    if training.weight_decay:
        optimizer += f" weight decay {training.weight_decay:g}"
    batch = f"batch {training.batch_size}"
    if training.drop_last:
        batch += " (drop last)"
    loss = "" if training.loss == "auto" else f", loss {training.loss}"
    return (
        f"{line}, {optimizer}{loss}, {batch}, {training.local_epochs:g} local epochs, "
        f"FedProx mu {training.mu:g}"
    )


def _scenario_summary(s: Scenario, result: RunResult) -> list[str]:
    fleet, clients, agg = s.fleet, s.clients, s.aggregation
    kinds = ", ".join(f"{k.count} {k.name}" for k in fleet.kinds)
    data_line = _data_line(s, result.data)
    if agg.mode == "sync":
        aggregation = (
            f"synchronous rounds of {agg.clients_per_round} devices"
            + (f", deadline {agg.round_deadline_s:g} s" if agg.round_deadline_s else "")
            + f"; stragglers: {clients.straggler_fraction:.0%}, policy {clients.straggler_policy}"
        )
    elif agg.topology == "flat":
        c = agg.central
        aggregation = (
            f"flat FedBuff: K = {c.flush.max_inputs}, deadline {c.flush.max_age_s} s, "
            f"staleness {c.staleness.kind} (max {c.staleness.max_staleness})"
        )
    else:
        parts = []
        for tier_name, spec in (
            ("edge", agg.edge),
            ("regional", agg.regional),
            ("central", agg.central),
        ):
            parts.append(
                f"{tier_name} K = {spec.flush.max_inputs}, deadline {spec.flush.max_age_s} s, "
                f"{spec.staleness.kind} (max {spec.staleness.max_staleness})"
            )
        aggregation = "hierarchical FedBuff: " + "; ".join(parts)
    central = agg.central
    params = ", ".join(f"{k} {v:g}" for k, v in central.optimizer_params)
    return [
        f"- **Fleet**: {fleet.regions} region(s) x {fleet.edges_per_region} edge(s) x "
        f"({kinds}) = {fleet.num_devices:,} devices",
        f"- **Data**: {data_line}",
        f"- **Local training**: {_model_line(s, result.local_tensors)}",
        f"- **Clients**: compute log-normal(median {clients.compute_median_s:g} s, sigma "
        f"{clients.compute_sigma:g}), latency {clients.latency_s:g} s, uplink "
        f"{_human_bytes(clients.uplink_bytes_per_s)}/s, selection {clients.selection}, "
        f"concurrency {clients.concurrency or 'all devices'}",
        f"- **Aggregation**: {aggregation}",
        f"- **Server optimizer**: {central.optimizer} ({params or 'defaults'})",
        f"- **Codec**: {s.codec.name}, error feedback {'on' if s.codec.error_feedback else 'off'}",
        f"- **Seed**: {s.seed}",
    ]


def write_influence_csv(outcome: AttackOutcome, path: Path) -> None:
    """``influence.csv``: per version, how far the largest single device moved it.

    One row per model version (``simulations.sim._attribution.VersionInfluence``),
    plus the backdoor success rate at the evaluated versions of a backdoor run.
    """
    success = dict(outcome.backdoor_success)
    names = [f.name for f in dataclasses.fields(VersionInfluence)]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*names, "backdoor_success"])
        for row in outcome.influence:
            values = [getattr(row, name) for name in names]
            rate = success.get(row.version)
            writer.writerow(
                [
                    *(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values),
                    "" if rate is None else f"{rate:.6g}",
                ]
            )


def _attack_summary(outcome: AttackOutcome) -> dict[str, object]:
    """The attack's keys of ``summary.json`` (present only for runs with the tables)."""
    return {
        "kind": outcome.kind,
        "malicious_devices": len(outcome.malicious),
        "defences": outcome.defences,
        "weight_cap": outcome.weight_cap,
        "final_backdoor_success": None
        if math.isnan(outcome.final_backdoor_success)
        else outcome.final_backdoor_success,
        **influence_summary(list(outcome.influence)),
    }


def _attack_lines(outcome: AttackOutcome) -> list[str]:
    """The report table's rows about the attack and the devices' influence."""
    numbers = influence_summary(list(outcome.influence))
    rows = [
        f"| attack | {outcome.kind or 'none'}, {len(outcome.malicious)} malicious devices |",
        f"| defences | {outcome.defences} (weight cap "
        + (
            "each device's declared size"
            if outcome.declared_caps
            else "none"
            if outcome.weight_cap is None
            else f"{outcome.weight_cap:,}"
        )
        + ") |",
    ]
    if outcome.backdoor_success:
        rows.append(f"| final backdoor success | {outcome.final_backdoor_success:.4f} |")
    if numbers:
        rows += [
            f"| largest step share of one device (any version) | {numbers['max_top_share']:.3f} |",
            f"| largest step share of a malicious device | {numbers['max_attacker_share']:.3f} |",
        ]
    rows.append("| per-version influence | [influence.csv](influence.csv) |")
    return rows


def run_summary(result: RunResult) -> dict[str, object]:
    """What a run cost and made, as ``summary.json`` holds it (numbers, no prose).

    ``wall_s`` counts setup (data, trainers) and the run, ``cpu_s`` the process's CPU
    time over the same span; ``peak_rss_bytes`` is the
    process's resident-memory high-water mark when the run ended; ``events`` are
    the engine's events (see ``RunResult.events``).
    """
    final = result.final
    return {
        "scenario": result.scenario.name,
        "seed": result.scenario.seed,
        "engine": result.engine,
        "num_devices": result.num_devices,
        "num_params": result.num_params,
        "versions": final.version,
        "virtual_time_s": result.virtual_time_s,
        "wall_s": round(result.wall_s, 3),
        "cpu_s": round(result.cpu_s, 3),
        "peak_rss_bytes": result.peak_rss_bytes,
        "peak_rss_mib": round(result.peak_rss_bytes / 2**20, 1),
        "workers": result.workers,
        "worker_cpu_s": round(result.worker_cpu_s, 3),
        "worker_peak_rss_bytes": result.worker_peak_rss_bytes,
        "worker_peak_rss_mib": round(result.worker_peak_rss_bytes / 2**20, 1),
        "events": result.events,
        "events_per_s": round(result.events_per_s, 1),
        "updates_uploaded": final.updates_uploaded,
        "participants": final.participants,
        "stale_rejections": final.stale_rejections,
        "lost_runs": final.lost_runs,
        "final_score": None if math.isnan(final.score) else final.score,
        "counts": dict(sorted(result.counts.items())),
        **({} if result.attack is None else {"attack": _attack_summary(result.attack)}),
    }


def write_run(result: RunResult, out: Path, *, command: str = "", plots: bool = True) -> Path:
    """Write ``metrics.csv``, ``summary.json``, the PNG plots and ``report.md`` into ``out``.

    Args:
        result: the run.
        out: the directory (created when missing).
        command: the command line that produced the run, quoted in the report.
        plots: draw the four PNG plots. An experiment of many runs may skip
            them (``--no-run-plots``): matplotlib takes about as long as a
            small run, and the experiment's own plots compare the runs anyway.

    Returns:
        The report's path.
    """
    out.mkdir(parents=True, exist_ok=True)
    write_csv(result, out / "metrics.csv")
    (out / "summary.json").write_text(json.dumps(run_summary(result), indent=2) + "\n")
    if result.attack is not None:
        write_influence_csv(result.attack, out / "influence.csv")
    s = result.scenario
    label = s.name
    metric = metric_name(result.data.task)
    if plots:
        plot_curves(
            [(label, result.records)],
            out / "accuracy_time.png",
            x="time_s",
            title=f"{label}: vs time",
            metric=metric,
        )
        plot_curves(
            [(label, result.records)],
            out / "accuracy_bytes.png",
            x="uploaded_bytes",
            title=f"{label}: vs uploaded bytes",
            metric=metric,
        )
        _plot_staleness(result, out / "staleness.png")
        _plot_participation(result, out / "participation.png")
    final = result.final
    best = max(evaluated(result.records), key=lambda r: r.score)
    metric = metric_name(result.data.task)
    lines = [
        f"# Simulation report: {s.name}",
        "",
        s.description or "(no description)",
        "",
    ]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    engine = (
        "the real mesh (Mosquitto, nats-server, daemon and fleet processes on this machine); "
        "times are wall-clock seconds of training, and the network is the loopback"
        if result.engine == "mesh"
        else "in process, on a virtual clock (simulations/sim/engine.py)"
    )
    lines += [
        "## Scenario",
        "",
        f"- **Engine**: {engine}",
        *_scenario_summary(s, result),
        "",
    ]
    if result.data.task == "regression":
        scores = [
            f"| final test R^2 | {final.test_r2:.4f} |",
            f"| final test MSE | {final.test_mse:.4f} |",
        ]
    else:
        scores = [f"| final test accuracy | {final.test_accuracy:.4f} |"]
    lines += [
        "## Outcome",
        "",
        "| measure | value |",
        "|---|---|",
        f"| model versions | {final.version} |",
        f"| virtual time | {final.time_s:,.1f} s |",
        *scores,
        f"| final test loss | {final.test_loss:.4f} |",
    ]
    if not math.isnan(final.train_loss):
        lines.append(f"| final training loss | {final.train_loss:.4f} |")
    lines += [
        f"| best test {metric} | {best.score:.4f} (v{best.version}) |",
        f"| updates uploaded | {final.updates_uploaded:,} |",
        f"| uploaded bytes (codec payloads) | {_human_bytes(final.uploaded_bytes)} |",
        f"| uploaded bytes (signed envelopes) | {_human_bytes(final.uploaded_wire_bytes)} |",
        f"| bytes into the central (payloads / envelopes) | "
        f"{_human_bytes(final.central_bytes)} / {_human_bytes(final.central_wire_bytes)} |",
        f"| devices that took part | {final.participants:,} of {result.num_devices:,} |",
        f"| updates rejected as stale | {final.stale_rejections:,} |",
        f"| runs lost (dropouts, late) | {final.lost_runs:,} |",
        f"| model parameters | {result.num_params:,} |",
        f"| wall-clock time | {result.wall_s:,.1f} s |",
    ]
    if result.engine == "sim":
        # The mesh's memory is in its daemons and fleet processes, not this one.
        lines += [
            f"| CPU time | {result.cpu_s:,.1f} s |",
            f"| peak memory (RSS high-water mark) | {_human_bytes(result.peak_rss_bytes)} |",
            f"| engine events | {result.events:,} ({result.events_per_s:,.0f} per wall s) |",
        ]
        if result.workers:
            lines += [
                f"| device workers | {result.workers}: CPU time {result.worker_cpu_s:,.1f} s, "
                f"largest peak memory {_human_bytes(result.worker_peak_rss_bytes)} |",
            ]
    if result.attack is not None:
        lines += _attack_lines(result.attack)
    lines += [
        "",
        "Outcomes by tier: "
        + ", ".join(f"`{k}` {v:,}" for k, v in sorted(result.counts.items()) if v),
        "",
        "## Plots",
        "",
        *(
            [
                f"![{metric} and loss against virtual time](accuracy_time.png)",
                "",
                f"![{metric} and loss against uploaded bytes](accuracy_bytes.png)",
                "",
                "![staleness histogram](staleness.png)",
                "",
                "![participation](participation.png)",
            ]
            if plots
            else ["Not drawn for this run (--no-run-plots)."]
        ),
        "",
        "Per-version numbers: [metrics.csv](metrics.csv).",
        "",
        "## Scenario as run",
        "",
        "Base files merged, overrides and seed applied:",
        "",
        "```toml",
        dump_toml(s.effective).rstrip(),
        "```",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
