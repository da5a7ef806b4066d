"""The lab's commands (``fedtier demo``, ``fedtier sim ...``, ``fedtier bench ...``); imports any.

They plug into ``fedtier.cli`` through the ``fedtier.commands`` entry-point
group (pyproject.toml): one ``add_*`` function per top-level command, so the
production command never imports the lab. Subcommands import their modules
lazily, so ``fedtier demo --help`` works on any install; running one where the
lab's dependencies are missing names the extra to install (``fedtier[lab]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Final

from fedtier.cli import add_forwarded
from fedtier.protocol.errors import FedtierError

if TYPE_CHECKING:
    import argparse

    from fedtier.cli import Subcommands

__all__ = ["LAB_MODULES", "add_bench", "add_demo", "add_sim"]

LAB_MODULES: Final = ("rich", "matplotlib", "sklearn", "nats", "trio_asyncio", "prometheus_client")
"""What ``fedtier[lab]`` brings that the commands import; checked before one starts anything."""


def add_bench(sub: Subcommands) -> None:
    """Add ``fedtier bench codec|edge|reject|explorer|fold|connections|large-model``."""
    bench = sub.add_parser("bench", help="benchmarks against a raw baseline run alongside")
    bench.set_defaults(requires=LAB_MODULES)
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    codec = bench_sub.add_parser("codec", help="wire size, speed and error of each codec")
    codec.add_argument("--params", type=int, default=1_000_000, help="delta length")
    codec.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    codec.add_argument("--seed", type=int, default=0, help="seed of the synthetic delta")
    codec.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    codec.set_defaults(run=_bench_codec)
    add_forwarded(
        bench_sub,
        "edge",
        "fedtier.simulations.bench.edge",
        "edge daemon intake vs a bare paho+numpy pipeline on a real Mosquitto (--json)",
        requires=LAB_MODULES,
    )
    add_forwarded(
        bench_sub,
        "reject",
        "fedtier.simulations.bench.reject",
        "time to refuse the worst envelopes within the size caps, vs msgpack (JSON)",
        requires=LAB_MODULES,
    )
    add_forwarded(
        bench_sub,
        "explorer",
        "fedtier.simulations.bench.explorer",
        "trace explorer page and API load times over a synthetic day of spans (JSON)",
        requires=LAB_MODULES,
    )
    add_forwarded(
        bench_sub,
        "fold",
        "fedtier.simulations.bench.fold",
        "fedtier's fold per codec vs Flower's aggregate() and numpy, each in its own process",
        requires=LAB_MODULES,
    )
    add_forwarded(
        bench_sub,
        "connections",
        "fedtier.simulations.bench.connections",
        "many MQTT v5 device sessions on one edge site: memory per device, drops (JSON)",
        requires=LAB_MODULES,
    )
    add_forwarded(
        bench_sub,
        "large-model",
        "fedtier.simulations.bench.large",
        "a 100M-parameter model through the real daemons on loopback: peak RSS of each (JSON)",
        requires=LAB_MODULES,
    )


def add_demo(sub: Subcommands) -> None:
    """Add ``fedtier demo``."""
    # Defaults live in simulations.demo.DemoOptions; importing it here would
    # make every subcommand pay for the demo's imports.
    demo = sub.add_parser(
        "demo", help="brokers, 7 daemons and a simulated fleet on this machine, shown live"
    )
    demo.add_argument(
        "--duration-s",
        type=float,
        help="training time (default 120); start-up and shutdown add ~15 s",
    )
    demo.add_argument("--devices", type=int, help="devices in the fleet (default 240)")
    demo.add_argument("--out", type=Path, help="artefact directory (default ./fedtier-demo-out)")
    demo.add_argument(
        "--seed", type=int, help="seeds keys' order, data split, behaviour (default 0)"
    )
    demo.add_argument(
        "--target-accuracy",
        type=float,
        help="stop early once this held-out accuracy held for 5 versions (default 0.94)",
    )
    demo.add_argument(
        "--tls",
        action="store_true",
        help="brokers as deploy/ runs them: TLS, a client certificate per device and daemon, "
        "the deployed Mosquitto ACL",
    )
    demo.add_argument("--quiet", action="store_true", help="plain lines, no live display")
    demo.add_argument(
        "--keep-temp", action="store_true", help="keep keys, configs, state (debugging)"
    )
    # The demo's fleet trains a torch MLP.
    demo.set_defaults(run=_demo, requires=(*LAB_MODULES, "torch"))


def add_sim(sub: Subcommands) -> None:
    """Add ``fedtier sim fleet|check|run|experiment|chaos|attack``."""
    sim = sub.add_parser("sim", help="simulations")
    sim.set_defaults(requires=LAB_MODULES)
    sim_sub = sim.add_subparsers(dest="sim_command", required=True, metavar="SIMULATION")
    fleet = sim_sub.add_parser("fleet", help="many simulated devices in one process")
    fleet.add_argument("--config", type=Path, required=True, help="the fleet's TOML file")
    fleet.set_defaults(run=_sim_fleet)
    add_forwarded(
        sim_sub,
        "check",
        "fedtier.simulations.checker",
        "classify every update: device logs against the central's lineage",
        requires=LAB_MODULES,
    )
    add_forwarded(
        sim_sub,
        "run",
        "fedtier.simulations.sim.cli",
        "run a scenario (TOML) in the virtual-clock simulator or on a real mesh",
        keep_name=True,
        requires=LAB_MODULES,
    )
    add_forwarded(
        sim_sub,
        "experiment",
        "fedtier.simulations.sim.cli",
        "the studies of docs/results.md: fedprox, async-vs-sync, codecs, scale",
        keep_name=True,
        requires=LAB_MODULES,
    )
    add_forwarded(
        sim_sub,
        "chaos",
        "fedtier.simulations.chaos",
        "a mesh under kill -9s, broker crashes, stalls and link faults, then the checker",
        requires=LAB_MODULES,
    )
    add_forwarded(
        sim_sub,
        "attack",
        "fedtier.simulations.attack",
        "hostile registered devices and an edge key against a training mesh, then the checker",
        requires=LAB_MODULES,
    )


def _bench_codec(args: argparse.Namespace) -> int:
    from fedtier.simulations.bench.codec import run_codec_bench

    if args.params < 1 or args.repeats < 1:
        raise FedtierError("--params and --repeats must be at least 1")
    result = run_codec_bench(num_params=args.params, repeats=args.repeats, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"codecs on {args.params:,} float32 values (medians of {args.repeats})")
    for column in ("codec", "wire bytes", "encode ms", "decode+fold ms", "vs raw fold", "rel L2"):
        table.add_column(column, justify="right")
    codecs = result["codecs"]
    assert isinstance(codecs, dict)
    for name, row in codecs.items():
        table.add_row(
            name,
            f"{row['wire_bytes']:,}",
            f"{row['encode_ms']:.3f}",
            f"{row['decode_fold_ms']:.3f}",
            f"{row['decode_fold_vs_baseline']:.2f}x",
            f"{row['rel_l2_error']:.2e}",
        )
    Console().print(table)
    return 0


def _sim_fleet(args: argparse.Namespace) -> int:
    from fedtier.simulations.fleet import run_fleet

    return run_fleet(args.config)


def _demo(args: argparse.Namespace) -> int:
    from fedtier.simulations.demo import DemoOptions, main_demo

    given = {
        name: value
        for name in ("duration_s", "devices", "out", "seed", "target_accuracy")
        if (value := getattr(args, name)) is not None
    }
    return main_demo(DemoOptions(quiet=args.quiet, keep_temp=args.keep_temp, tls=args.tls, **given))
