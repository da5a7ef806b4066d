"""fedtier: a federated-learning aggregation mesh (devices over MQTT v5, tiers over NATS JetStream).

The installed namespace. Each part lives in its own top-level folder of the
repository and is importable only under this package:

- ``fedtier.protocol``: the wire contract (sans-IO) and, in ``bus``, the transports;
- ``fedtier.tiers``: the tier core (sans-IO) and the edge, regional and central daemons;
- ``fedtier.client``: the device SDK;
- ``fedtier.simulations``: the lab (simulator, demo, benchmarks, chaos harness);
  production code never imports it.

``fedtier/<part>`` are symbolic links to ``../<part>`` in the source tree, so
Python, mypy, pytest and setuptools all see one ``fedtier.<part>`` tree without
an import hook; a built wheel holds real files under ``fedtier/``.
"""

from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__"]
