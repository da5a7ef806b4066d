"""Free TCP ports for the processes the lab starts; the standard library only.

Binding port 0 returns a port from the kernel's ephemeral range, which any
outgoing connection on the machine may take between the moment a port is
picked and the moment the child process binds it. With brokers, daemons and
devices opening connections all the time, that race showed up as "Address
already in use" on a busy machine. A port below the ephemeral range is only
ever taken by another explicit bind, so the lab picks there.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Final

__all__ = ["free_port"]

_LOWEST: Final = 10_000
_ATTEMPTS: Final = 200
_RANGE_FILE: Final = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now, below the ephemeral range when it can be."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    if low - _LOWEST >= 1_000:
        for _ in range(_ATTEMPTS):
            port = rng.randrange(_LOWEST, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        chosen: int = probe.getsockname()[1]
        return chosen
