"""``python -m fedtier.simulations.testing.check``: the brokers tests will use; starts no process.

It names the Mosquitto and nats-server binaries that tests and the demo
will run, or the one missing.

``make`` runs it after installing, so a missing or too-old broker stops the
build with one clear sentence instead of failing deep inside a test.
"""

from __future__ import annotations

import sys

from fedtier.protocol.errors import ConfigError
from fedtier.simulations.testing._mosquitto import find_mosquitto
from fedtier.simulations.testing._nats_server import find_nats_server


def main() -> int:
    """Print the broker binaries found; exit 1 with the reason when one is missing."""
    try:
        print(f"brokers: mosquitto {find_mosquitto()}, nats-server {find_nats_server()}")
    except ConfigError as exc:
        print(f"brokers: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
