"""``fedtier sim chaos``: a mesh under scheduled faults, then the exactly-once checker; imports any.

A run (``run_chaos(ChaosOptions(...))``, or the command) goes through five phases:

1. **Brokers and proxies.** Mosquitto (persistence on, autosave every
   ``mosquitto_autosave_s``) and nats-server (``sync_interval: always``) on
   loopback, and two ``fedtier.simulations.testing.FaultyProxy``: edges -> nats-server
   and devices -> Mosquitto.
2. **Mesh.** ``simulations.mesh.prepare_mesh`` writes keys, data and configs
   routed through the proxies; the central, the regionals, the edges and one
   fleet process per site start. Every process is supervised: when one exits
   without being asked to (our kill -9, a crash point, an error) it is started
   again on the same state store after a short, random pause. Daemons get
   ``FEDTIER_UNSAFE`` and ``FEDTIER_CRASH_AT`` (``tiers.faults``) as asked.
3. **Faults.** Once devices send, ``FaultPlan`` counts are spread at random
   (seeded) over ``duration_s``; the faults of one kind take their targets in
   turn. Each fault waits until its target is up, so every counted kill hits a
   serving process:

   ================  =========================================================
   fault             what happens
   ================  =========================================================
   kill_<tier>       SIGKILL of a daemon of the tier; the supervisor
                     restarts it
   stop_<tier>       SIGSTOP of a daemon, SIGCONT ``stop_s`` later
                     (longer than the MQTT keepalive and the JetStream ack wait)
   kill_mosquitto    the edges are frozen (SIGSTOP) for ``edge_stall_s`` so
                     acknowledged updates queue in the broker, then the broker
                     is SIGKILLed, restarted on its port and store after
                     ``broker_down_s``, and the edges resumed
   kill_nats         SIGKILL of nats-server, restart after ``broker_down_s``
   proxy_reset       every connection through a proxy is reset
   proxy_partition   a proxy forwards nothing for ``partition_s``
   proxy_delay       a proxy delays every chunk ``delay_s``
   ================  =========================================================

   The run phase ends when every fault is done and the devices have sent
   ``updates`` updates (or after ``max_run_s``).
4. **Drain.** The fleets stop (their device logs are exported again from the
   durable outboxes, which a killed fleet would otherwise lose); crash points
   are disarmed for later restarts; the daemons keep running until every
   update the devices hold a receipt for is in the central's lineage and the
   lineage has been quiet for a while, or until ``drain_timeout_s``. Then the
   daemons stop, tier by tier.
5. **Check.** ``simulations.checker`` classifies every update: device logs
   against the central's lineage manifests.

Everything runs on loopback, in a temporary directory (kept with
``keep_workdir``); artefacts (process logs, device logs, ``chaos.json``) go to
``out_dir``. The command prints the checker's verdict and a fault summary and
exits 1 when anything was lost, duplicated or unexpected.

The package's private modules hold one concern each: ``_plan`` (what to do:
the fault plan, the options, the seeded schedule), ``_supervisor`` (starting
and restarting the daemons and fleets), ``_inject`` (the faults themselves),
``_run`` (the phases, the drain, the broker processes), ``_result`` (what a
run found) and ``_cli`` (the command).
"""

from __future__ import annotations

from fedtier.simulations.chaos._cli import main
from fedtier.simulations.chaos._plan import (
    ALL_UNSAFE,
    DEVICE_UNSAFE_SWITCH,
    FAULT_KINDS,
    ChaosOptions,
    FaultPlan,
)
from fedtier.simulations.chaos._result import ChaosResult
from fedtier.simulations.chaos._run import run_chaos

__all__ = [
    "ALL_UNSAFE",
    "DEVICE_UNSAFE_SWITCH",
    "FAULT_KINDS",
    "ChaosOptions",
    "ChaosResult",
    "FaultPlan",
    "main",
    "run_chaos",
]
