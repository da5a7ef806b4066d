"""The tiers' commands (``fedtier edge|regional|central|trace|status``); no client or lab.

``fedtier.cli`` calls ``add_commands`` to build its parser; a daemon's modules
(trio, the buses, the store) are imported only when the daemon runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedtier.tiers import statuscmd, tracequery

__all__ = ["add_commands"]

_DAEMONS = (
    ("edge", "device updates in over MQTT, partials out over NATS, models relayed down"),
    ("regional", "edge partials in, regional partials out to the central"),
    ("central", "partials in, signed model versions out"),
)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the three daemons, ``trace`` and ``status`` to the subcommand table ``sub``."""
    for kind, what in _DAEMONS:
        daemon = sub.add_parser(kind, help=f"run the {kind} daemon: {what}")
        daemon.add_argument("--config", type=Path, required=True, help="the daemon's TOML file")
        # A device install lacks the NATS client and the Prometheus exporter.
        daemon.set_defaults(run=_daemon, extra="daemon")
    trace = sub.add_parser(
        "trace",
        help="follow an update to the model version that included it (--dir DIR [--json]);"
        " 'trace serve' opens the web explorer, 'trace collect' receives OTLP spans",
        description=f"{tracequery.DESCRIPTION} {_TRACE_MORE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tracequery.add_arguments(trace)
    trace.add_argument(
        "--db", type=Path, help="serve/collect: the sqlite span database of a collector"
    )
    trace.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="serve/collect: where to listen (serve: 127.0.0.1:8321, collect: 127.0.0.1:4318;"
        " port 0 picks a free one)",
    )
    trace.set_defaults(run=_trace)
    status = sub.add_parser(
        "status",
        help="every daemon of a fleet from the status it publishes (--config FILE [--watch])",
        description=statuscmd.DESCRIPTION,
    )
    statuscmd.add_arguments(status)
    # It reads the bus: the NATS client comes with the daemon extra.
    status.set_defaults(run=statuscmd.run, extra="daemon")


_TRACE_MORE = """
Also:
  fedtier trace serve --dir DIR [--listen HOST:PORT]   web explorer over span files
  fedtier trace serve --db FILE [--listen HOST:PORT]   web explorer over a collector's database
  fedtier trace collect --db FILE [--listen HOST:PORT] OTLP/HTTP receiver (POST /v1/traces)
"""

# Subcommands of ``trace`` share its parser: no hex update id is "serve" or
# "collect", and argparse cannot mix a subcommand with an optional positional.
_TRACE_ACTIONS = ("serve", "collect")


def _trace(args: argparse.Namespace) -> int:
    action = args.update_id
    if action not in _TRACE_ACTIONS:
        if args.db is not None or args.listen is not None:
            print("fedtier trace: --db and --listen are for trace serve|collect", file=sys.stderr)
            return 2
        return tracequery.run(args)
    if args.json:
        print(f"fedtier trace: --json is not an option of trace {action}", file=sys.stderr)
        return 2
    # The explorer's modules (http.server, sqlite) only when it runs.
    from fedtier.tiers import explorer

    return explorer.run_serve(args) if action == "serve" else explorer.run_collect(args)


def _daemon(args: argparse.Namespace) -> int:
    from fedtier.tiers._signals import hold_signals

    # Before the daemon's imports (about a second): a SIGHUP or SIGTERM that
    # comes meanwhile is held for the daemon, never a silent death.
    hold_signals()
    from fedtier.tiers.daemon import run_daemon

    # The composition root (``fedtier.cli``) gives the central its evaluator factory.
    return run_daemon(
        args.command, args.config, make_evaluator=getattr(args, "make_evaluator", None)
    )
