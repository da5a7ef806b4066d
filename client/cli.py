"""The device's command, ``fedtier device --config FILE``; never imports tiers or simulations.

``fedtier.cli`` calls ``add_commands`` to build its parser; the device's
modules (trio, the MQTT bus, the trainers) are imported only when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``device`` to the subcommand table ``sub``."""
    device = sub.add_parser("device", help="run one device: train, sign, send, await receipts")
    device.add_argument("--config", type=Path, required=True, help="the device's TOML file")
    # The base install trains numpy models; the only module a device can lack
    # is torch, for an MLP or the user's own torch model.
    device.set_defaults(run=_device, extra="torch")


def _device(args: argparse.Namespace) -> int:
    from fedtier.client.runner import run_command

    return run_command(args.config)
