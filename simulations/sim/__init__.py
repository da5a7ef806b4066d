"""The fleet simulator, its scenarios and experiments; protocol, tiers and client never import it.

``scenario`` reads the TOML format into ``specs``, ``data`` loads and splits the data it names
(through ``client.plugins``, as a device does), ``engine`` runs it on a virtual
clock over ``nodes`` (the tiers' own math) and ``devices`` (the client's own
trainers), ``report`` writes what a run measured, ``experiments`` runs the
documented studies, ``models`` holds the factories the shipped scenarios name,
and ``mesh_engine`` runs a small scenario on the real daemons. ``_workers`` trains
simulated devices in processes beside the engine (``--workers``); ``_attack`` makes
the malicious devices of ``[attack]`` lie, and ``_attribution`` follows every
device's part of each version's step (runs with ``[attack]`` or ``[defences]``).
"""

from __future__ import annotations

from fedtier.simulations.sim.engine import RunResult, Simulation, VersionRecord, run_scenario
from fedtier.simulations.sim.scenario import load_scenario, parse_scenario
from fedtier.simulations.sim.specs import Scenario

__all__ = [
    "RunResult",
    "Scenario",
    "Simulation",
    "VersionRecord",
    "load_scenario",
    "parse_scenario",
    "run_scenario",
]
