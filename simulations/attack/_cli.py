"""``fedtier sim attack``: arguments to ``AttackOptions``, the verdict printed; no run logic."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from fedtier.protocol.errors import FedtierError, sole_error
from fedtier.simulations.attack._plan import AttackOptions
from fedtier.simulations.attack._run import run_attack
from fedtier.simulations.mesh import parse_regions


def main(argv: Sequence[str] | None = None) -> int:
    """``fedtier sim attack [options]``: see the package docstring.

    Returns:
        0 when every defence held; 1 when a guarantee broke; 2 for unusable
        arguments or a mesh that cannot start.
    """
    parser = argparse.ArgumentParser(
        prog="fedtier sim attack",
        description="Run registered-but-hostile devices against a mesh of honest ones; "
        "then check that every hostile input was refused, bounded or quarantined and that "
        "no honest update was lost or counted twice.",
    )
    add = parser.add_argument
    add("--devices", type=int, default=12, help="honest devices (default 12)")
    add("--attackers", type=int, default=2, help="attacker devices (default 2)")
    add("--regions", default="r1:s1+s2", help="REGION:SITE+SITE,... (default r1:s1+s2)")
    add("--updates", type=int, default=40, help="honest updates to see accepted (default 40)")
    add("--rounds", type=int, default=1, help="times each attack runs (default 1)")
    add("--rate", type=float, default=6.0, help="honest updates per second the fleet aims at")
    add("--duration", type=float, default=300.0, help="bound on the run phase, seconds")
    add("--seed", type=int, default=0, help="seeds the mesh and the attack bytes")
    add("--out", type=Path, default=Path("fedtier-attack-out"), help="artefact directory")
    add(
        "--no-tls",
        dest="tls",
        action="store_false",
        help="plain broker listeners (default: TLS with a client certificate per device "
        "and daemon, and the deployed Mosquitto ACL)",
    )
    add("--keep-workdir", action="store_true", help="keep keys, configs and stores")
    add("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    try:
        options = AttackOptions(
            out_dir=args.out,
            devices=args.devices,
            attackers=args.attackers,
            regions=parse_regions(args.regions),
            updates=args.updates,
            rounds=args.rounds,
            updates_per_s=args.rate,
            max_run_s=args.duration,
            seed=args.seed,
            tls=args.tls,
            keep_workdir=args.keep_workdir,
            progress=None if args.json else _print_err,
        )
        result = trio.run(run_attack, options)
    except BaseException as exc:  # mapped to an exit status below
        error = sole_error(exc)
        if isinstance(error, FedtierError):
            print(f"fedtier sim attack: {error}", file=sys.stderr)
            return 2
        if isinstance(error, KeyboardInterrupt):
            return 130
        raise
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print("\n".join(result.summary_lines()))
    return 1 if result.failed else 0


def _print_err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
