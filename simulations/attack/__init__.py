"""``fedtier sim attack``: hostile registered devices against a training mesh, then the checker.

A run (``run_attack(AttackOptions(...))``, or the command) starts Mosquitto,
nats-server, the central, regionals and edges (``simulations.mesh``) with the
edges' defences on (``[validation]``: adaptive norm bound, ``max_samples``
weight cap, per-device contribution cap and token bucket, ``future_base``),
and one fleet process per site of honest devices training. Once honest
updates flow, the attackers start: each holds a registered device key (planned
like any device, never run as one) and sends its share of ``ATTACKS`` over its
own MQTT connection, one input at a time, waiting for the edge's receipt.
Then a registered edge key publishes the hostile partials of
``TIER_EXPECTED`` to its regional's stream, and one edge is restarted onto a
model blob that fails its digest (``_run._tamper_blob``). Then the fleets
stop, the mesh drains until every receipted update is in the central's
lineage, the daemons stop, and ``_verdict.judge`` applies the rules of
``_plan.EXPECTED`` and ``_plan.TIER_EXPECTED`` and runs the exactly-once
checker over the honest devices' logs. docs/attacks.md lists the attacks and
the defence behind each.

The brokers run without TLS here: the mesh machinery writes plain configs;
tests/integration/test_transport_security.py covers the TLS listeners, ACLs and
NATS permissions.

Private modules, one concern each: ``_plan`` (attacks, rules, options),
``_craft`` (the hostile bytes), ``_run`` (processes, attackers, drain),
``_verdict`` (the judgement) and ``_cli`` (the command).
"""

from __future__ import annotations

from fedtier.simulations.attack._cli import main
from fedtier.simulations.attack._plan import (
    ATTACKS,
    EXPECTED,
    TIER_EXPECTED,
    AttackOptions,
    Expect,
    TierExpect,
)
from fedtier.simulations.attack._run import run_attack
from fedtier.simulations.attack._verdict import BROKER_REFUSED, AttackResult, Outcome

__all__ = [
    "ATTACKS",
    "BROKER_REFUSED",
    "EXPECTED",
    "TIER_EXPECTED",
    "AttackOptions",
    "AttackResult",
    "Expect",
    "Outcome",
    "TierExpect",
    "main",
    "run_attack",
]
