"""The tiers' commands (``fedtier edge|regional|central|trace``); never imports client or the lab.

``fedtier.cli`` calls ``add_commands`` to build its parser; a daemon's modules
(trio, the buses, the store) are imported only when the daemon runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedtier.tiers import tracequery

__all__ = ["add_commands"]

_DAEMONS = (
    ("edge", "device updates in over MQTT, partials out over NATS, models relayed down"),
    ("regional", "edge partials in, regional partials out to the central"),
    ("central", "partials in, signed model versions out"),
)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the three daemons and ``trace`` to the subcommand table ``sub``."""
    for kind, what in _DAEMONS:
        daemon = sub.add_parser(kind, help=f"run the {kind} daemon: {what}")
        daemon.add_argument("--config", type=Path, required=True, help="the daemon's TOML file")
        # A device install lacks the NATS client and the Prometheus exporter.
        daemon.set_defaults(run=_daemon, extra="daemon")
    trace = sub.add_parser(
        "trace",
        help="follow an update to the model version that included it (--dir DIR [--json])",
        description=tracequery.DESCRIPTION,
    )
    tracequery.add_arguments(trace)
    trace.set_defaults(run=tracequery.run)


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
