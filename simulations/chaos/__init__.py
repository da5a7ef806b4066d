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
   kill_nats         SIGKILL of nats-server (in ``ha``: of every cluster
                     node), restart after ``broker_down_s``
   proxy_reset       every connection through a proxy is reset
   proxy_partition   a proxy forwards nothing for ``partition_s``
   proxy_delay       a proxy delays every chunk ``delay_s``
   lose_<tier>       (``ha``) the machine of the tier's ACTIVE instance (the
                     lease holder's pid) is lost: SIGKILL, its state
                     directory deleted, and after a restart pause a
                     replacement starts on an empty one and joins as a standby
   kill_nats_node    (``ha``) SIGKILL of one cluster node, restarted on its
                     store after ``broker_down_s``
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
   against the lineage of the published model versions.

**Topologies.** ``single`` (the default): one process per tier on its own
state store, one nats-server; the lineage is the central's store
(``tiers.store.read_lineages``). ``ha``: ``[lease]`` on every daemon, an
active and a standby instance of every region and of the central (and of
every edge site unless ``edge_pairs`` is off), each with its own state
directory, on a 3-node nats-server cluster whose streams, KV buckets and
object stores keep three copies (the edges reach each node through its own
proxy). No one store holds the history there: a lost central takes its store
along, and a successor's holds only what it caught up on. So ``_observer``
reads the lineage the way a successor does, from the registry: it follows
the pointer and reads the signed record (``v<N>.record``) of every version
the pointer reached, as it is published; the checker counts each published
version once, whoever published it, and a version whose record could not be
read or verified fails the run. Versions a central sealed but never published
are not history and are not counted (their inputs were never acknowledged and
come back).

Everything runs on loopback, in a temporary directory (kept with
``keep_workdir``); artefacts (process logs, device logs, ``chaos.json``) go to
``out_dir``. The command prints the checker's verdict and a fault summary and
exits 1 when anything was lost, duplicated or unexpected.

The package's private modules hold one concern each: ``_plan`` (what to do:
the fault plan, the options, the seeded schedule), ``_supervisor`` (starting
and restarting the daemons and fleets), ``_inject`` (the faults themselves),
``_run`` (the phases, the drain, the broker processes), ``_observer`` (the
registry's published lineage and the lease holders, in ``ha``), ``_result``
(what a run found) and ``_cli`` (the command).
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
