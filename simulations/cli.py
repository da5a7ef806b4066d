"""The ``fedtier`` command: one entry point, a subcommand per job; may import every package.

Subcommands import their modules lazily, so ``fedtier keys`` does not pay for
torch or the brokers. Errors the user can fix are one readable sentence on
stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedtier.protocol.errors import FedtierError

__all__ = ["main"]


def _keys_new(args: argparse.Namespace) -> int:
    from fedtier.protocol.identity import SigningIdentity

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    ident = SigningIdentity.generate()
    private, public = out_dir / f"{args.name}.key", out_dir / f"{args.name}.pub"
    ident.save(private)
    ident.save_public(public)
    _print_key(args, ident.key_id, ident.verify_key.raw.hex(), private=private, public=public)
    return 0


def _keys_show(args: argparse.Namespace) -> int:
    from fedtier.protocol.errors import KeyFileError
    from fedtier.protocol.identity import load_public_key, load_signing_identity

    path: Path = args.path
    try:
        key = load_public_key(path)
    except KeyFileError:
        key = load_signing_identity(path).verify_key
    _print_key(args, key.key_id, key.raw.hex(), source=path)
    return 0


def _print_key(
    args: argparse.Namespace,
    key_id: str,
    public_hex: str,
    *,
    private: Path | None = None,
    public: Path | None = None,
    source: Path | None = None,
) -> None:
    info = {"key_id": key_id, "public_key": public_hex}
    if source is not None:
        info["file"] = str(source)
    if private is not None:
        info["private_key_file"] = str(private)
    if public is not None:
        info["public_key_file"] = str(public)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for name, value in info.items():
            print(f"{name:17} {value}")


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


def _daemon(args: argparse.Namespace) -> int:
    from fedtier.tiers.daemon import run_daemon

    return run_daemon(args.command, args.config)


def _device(args: argparse.Namespace) -> int:
    from fedtier.client.runner import run_device

    return run_device(args.config)


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
    return main_demo(DemoOptions(quiet=args.quiet, keep_temp=args.keep_temp, **given))


def _forward(module: str, lead: tuple[str, ...] = ()) -> Callable[[argparse.Namespace], int]:
    """A subcommand that hands its argument list (after ``lead``) to ``module.main``."""

    def run(args: argparse.Namespace) -> int:
        main_of: Callable[[list[str]], int] = importlib.import_module(module).main
        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
        return main_of([*lead, *rest])

    return run


def _add_forwarded(
    sub: Any, name: str, module: str, help_text: str, *, keep_name: bool = False
) -> None:
    parser = sub.add_parser(name, help=help_text, add_help=False)
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    parser.set_defaults(run=_forward(module, (name,) if keep_name else ()))


# Subcommands that own their argument lists (their modules have a main(argv)).
_FORWARDED: tuple[tuple[str, ...], ...] = (
    ("trace",),
    ("sim", "check"),
    ("sim", "chaos"),
    ("sim", "run"),
    ("sim", "experiment"),
    ("bench", "edge"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtier",
        description="Federated-learning aggregation mesh: devices over MQTT, tiers over NATS.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keys = sub.add_parser("keys", help="create and inspect Ed25519 identities")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = keys_sub.add_parser("new", help="create a key pair: NAME.key (0600) and NAME.pub")
    new.add_argument("--name", required=True, help="file name stem, e.g. veh-0042")
    new.add_argument("--out", type=Path, default=Path(), help="directory (default: .)")
    new.add_argument("--json", action="store_true", help="print JSON")
    new.set_defaults(run=_keys_new)
    show = keys_sub.add_parser("show", help="print the key id and public key of a key file")
    show.add_argument("path", type=Path, help="a .key or .pub PEM file")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=_keys_show)

    bench = sub.add_parser("bench", help="benchmarks against a raw baseline run alongside")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    codec = bench_sub.add_parser("codec", help="wire size, speed and error of each codec")
    codec.add_argument("--params", type=int, default=1_000_000, help="delta length")
    codec.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    codec.add_argument("--seed", type=int, default=0, help="seed of the synthetic delta")
    codec.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    codec.set_defaults(run=_bench_codec)
    _add_forwarded(
        bench_sub,
        "edge",
        "fedtier.simulations.bench.edge",
        "edge daemon intake vs a bare paho+numpy pipeline on a real Mosquitto (--json)",
    )

    for kind, what in (
        ("edge", "device updates in over MQTT, partials out over NATS, models relayed down"),
        ("regional", "edge partials in, regional partials out to the central"),
        ("central", "partials in, signed model versions out"),
    ):
        daemon = sub.add_parser(kind, help=f"run the {kind} daemon: {what}")
        daemon.add_argument("--config", type=Path, required=True, help="the daemon's TOML file")
        daemon.set_defaults(run=_daemon)
    device = sub.add_parser("device", help="run one device: train, sign, send, await receipts")
    device.add_argument("--config", type=Path, required=True, help="the device's TOML file")
    device.set_defaults(run=_device)

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
    demo.add_argument("--quiet", action="store_true", help="plain lines, no live display")
    demo.add_argument(
        "--keep-temp", action="store_true", help="keep keys, configs, state (debugging)"
    )
    demo.set_defaults(run=_demo)

    sim = sub.add_parser("sim", help="simulations")
    sim_sub = sim.add_subparsers(dest="sim_command", required=True, metavar="SIMULATION")
    fleet = sim_sub.add_parser("fleet", help="many simulated devices in one process")
    fleet.add_argument("--config", type=Path, required=True, help="the fleet's TOML file")
    fleet.set_defaults(run=_sim_fleet)
    _add_forwarded(
        sim_sub,
        "check",
        "fedtier.simulations.checker",
        "classify every update: device logs against the central's lineage",
    )
    _add_forwarded(
        sim_sub,
        "run",
        "fedtier.simulations.sim.cli",
        "run a scenario (TOML) in the virtual-clock simulator or on a real mesh",
        keep_name=True,
    )
    _add_forwarded(
        sim_sub,
        "experiment",
        "fedtier.simulations.sim.cli",
        "the studies of docs/results.md: fedprox, async-vs-sync, codecs, scale",
        keep_name=True,
    )
    _add_forwarded(
        sim_sub,
        "chaos",
        "fedtier.simulations.chaos",
        "a mesh under kill -9s, broker crashes, stalls and link faults, then the checker",
    )

    _add_forwarded(
        sub,
        "trace",
        "fedtier.simulations.tracequery",
        "follow an update to the model version that included it (--dir DIR [--json])",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fedtier`` with ``argv`` (default: the process arguments); return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for prefix in _FORWARDED:
        if tuple(argv[: len(prefix)]) == prefix:
            # argparse.REMAINDER drops leading options: mark where the rest begins.
            argv = [*prefix, "--", *argv[len(prefix) :]]
            break
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except FedtierError as exc:
        print(f"fedtier: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedtier: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
