"""``fedtier sim chaos``: arguments to ``ChaosOptions``, the verdict printed; holds no run logic."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from fedtier.protocol.errors import FedtierError, sole_error
from fedtier.simulations.chaos._plan import ALL_UNSAFE, TOPOLOGIES, ChaosOptions, FaultPlan
from fedtier.simulations.chaos._run import run_chaos
from fedtier.simulations.checker import render_report
from fedtier.simulations.mesh import parse_regions


def _parse_unsafe(text: str | None) -> frozenset[str]:
    if text is None:
        return frozenset()
    if text == "all":
        return ALL_UNSAFE
    return frozenset(part.strip() for part in text.split(",") if part.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtier sim chaos [options]``: see the package docstring.

    Returns:
        0 when nothing was lost, duplicated or unexpected; 1 otherwise; 2 for
        unusable arguments or a mesh that cannot start.
    """
    parser = argparse.ArgumentParser(
        prog="fedtier sim chaos",
        description="Run a mesh under kill -9s, broker crashes, stalls and link faults; "
        "then check that nothing was lost or counted twice.",
    )
    add = parser.add_argument
    add("--devices", type=int, default=12, help="simulated devices (default 12)")
    add("--regions", default="r1:s1+s2", help="REGION:SITE+SITE,... (default r1:s1+s2)")
    add("--updates", type=int, default=150, help="updates the devices send at least")
    add("--duration-s", type=float, default=20.0, help="the faults are spread over this")
    add("--max-run-s", type=float, default=900.0, help="bound on the run phase")
    add("--drain-timeout-s", type=float, default=90.0, help="bound on the drain")
    add("--rate", type=float, default=8.0, help="updates per second the fleet aims at")
    add("--seed", type=int, default=0, help="seeds the mesh and the fault schedule")
    add(
        "--topology",
        choices=TOPOLOGIES,
        default="single",
        help="single: one instance per tier, one nats-server (default); ha: leases, two "
        "instances of every edge site, region and central, a 3-node NATS cluster",
    )
    add("--lease-ttl-s", type=float, default=6.0, help="[lease] ttl_s with --topology ha")
    add(
        "--single-edges",
        action="store_true",
        help="with --topology ha: one edge per site (with its lease) instead of two",
    )
    for kind in FaultPlan.kinds():
        add(f"--{kind.replace('_', '-')}", type=int, default=0, metavar="N", help=f"{kind} faults")
    add("--crash-at", default="", help="FEDTIER_CRASH_AT for the daemons (tiers.faults)")
    add("--crash-once", action="store_true", help="restart crashed daemons without crash points")
    add(
        "--unsafe",
        nargs="?",
        const="all",
        default=None,
        metavar="SWITCHES",
        help=f"turn safeties off: 'all' (the default) or some of {', '.join(sorted(ALL_UNSAFE))}",
    )
    add("--commit-window-ms", type=float, default=2.0, help="daemons' grouped-commit window")
    add("--mosquitto-autosave-s", type=int, default=1, help="Mosquitto autosave interval")
    add(
        "--partial-max-staleness",
        type=int,
        default=64,
        metavar="N",
        help="regionals' and central's max_staleness; later partials are folded as late",
    )
    add("--no-proxies", action="store_true", help="connect edges and devices directly")
    add("--out", type=Path, default=Path("fedtier-chaos-out"), help="artefact directory")
    add("--keep-workdir", action="store_true", help="keep keys, configs and stores")
    add("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        plan = FaultPlan(**{kind: getattr(args, kind) for kind in FaultPlan.kinds()})
        options = ChaosOptions(
            out_dir=args.out,
            devices=args.devices,
            regions=parse_regions(args.regions),
            updates=args.updates,
            duration_s=args.duration_s,
            max_run_s=args.max_run_s,
            drain_timeout_s=args.drain_timeout_s,
            seed=args.seed,
            faults=plan,
            crash_at=args.crash_at,
            crash_once=args.crash_once,
            unsafe=_parse_unsafe(args.unsafe),
            updates_per_s=args.rate,
            commit_window_ms=args.commit_window_ms,
            mosquitto_autosave_s=args.mosquitto_autosave_s,
            partial_max_staleness=args.partial_max_staleness,
            proxies=not args.no_proxies,
            keep_workdir=args.keep_workdir,
            progress=None if args.json else _print_err,
            topology=args.topology,
            lease_ttl_s=args.lease_ttl_s,
            edge_pairs=not args.single_edges,
        )
        if args.crash_at:
            from fedtier.tiers.faults import configure

            configure(crash_at=args.crash_at)  # checks the syntax before anything starts
            configure()
        result = trio.run(run_chaos, options)
    except BaseException as exc:  # mapped to an exit status below
        error = sole_error(exc)
        if isinstance(error, FedtierError):
            print(f"fedtier sim chaos: {error}", file=sys.stderr)
            return 2
        if isinstance(error, KeyboardInterrupt):
            return 130
        raise
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print("\n".join(render_report(result.report, result.updates_in_logs)))
        print("\n".join(result.summary_lines()))
    return 1 if result.failed else 0


def _print_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
